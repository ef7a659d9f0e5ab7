"""The key from Secret Manager (--api_key_secret): read in the worker through Beam's GcpSecret,
never in the graph; a failed read stops the job with a clear message. Secret Manager itself is a
stand-in at the client boundary (its client class)."""

import asyncio
import json
import os
import types

import pytest
from google.cloud import secretmanager

from arkbatch_beam import ArkClient, ClientConfig, Endpoint, MissingApiKey
from arkbatch_beam.testing import FakeArkServer
from pipelines import batch_chat

from .conftest import write_jsonl

VERSION = "projects/my-project/secrets/ark-key/versions/3"
SECRET = "sk-from-secret-manager-7781"


class StandIn:
    """What SecretManagerServiceClient does for access_secret_version, with a record of calls."""

    versions: dict = {}
    calls: list = []

    def __init__(self, *args, **kwargs):
        pass

    def access_secret_version(self, request):
        StandIn.calls.append((os.getpid(), request["name"]))
        value = StandIn.versions.get(request["name"])
        if value is None:
            raise PermissionError(f"403 Permission 'secretmanager.versions.access' denied for {request['name']}")
        return types.SimpleNamespace(payload=types.SimpleNamespace(data=value))


@pytest.fixture
def secret_manager(monkeypatch):
    monkeypatch.setattr(secretmanager, "SecretManagerServiceClient", StandIn)
    StandIn.versions = {VERSION: SECRET.encode()}
    StandIn.calls = []
    monkeypatch.delenv("ARK_API_KEY", raising=False)
    return StandIn


def test_the_cli_reads_the_key_from_secret_manager_and_never_writes_it(secret_manager, tmp_path, capsys):
    with FakeArkServer(api_key=SECRET) as server:  # answers 401 to any other key
        inp = write_jsonl(tmp_path / "in.jsonl", 6)
        out = str(tmp_path / "out")
        rc = batch_chat.main(["--input", inp, "--output", out, "--model", "ep-s", "--base_url", server.base_url,
                              "--api_key_secret", VERSION, "--progress_seconds", "0"])
        assert rc == 0, capsys.readouterr().err
        assert server.total_requests == 6
    assert capsys.readouterr().out.splitlines()[-1].startswith("summary: ok=6 failed=0")
    assert {name for _, name in secret_manager.calls} == {VERSION}
    for root, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert SECRET.encode() not in f.read(), name


def test_the_graph_holds_the_version_name_never_the_key(secret_manager, tmp_path):
    import apache_beam as beam

    inp = write_jsonl(tmp_path / "in.jsonl", 2)
    args = batch_chat.build_parser().parse_args(["--input", inp, "--output", str(tmp_path / "o"), "--model", "m",
                                                 "--api_key_secret", VERSION])
    p = beam.Pipeline()
    batch_chat.build_pipeline(p, args)
    proto = p.to_runner_api().SerializeToString()
    assert VERSION.encode() in proto and SECRET.encode() not in proto
    assert secret_manager.calls == []  # building the graph reads nothing


def test_a_failed_secret_read_stops_with_a_message_not_a_retry_loop(secret_manager, tmp_path, capsys):
    StandIn.versions = {}
    cfg = ClientConfig(Endpoint("m", base_url="http://127.0.0.1:9/v3", api_key_secret=VERSION))
    with pytest.raises(MissingApiKey, match=r"could not read the API key from Secret Manager version "
                                            r"projects/my-project/secrets/ark-key/versions/3: .*Permission"):
        asyncio.run(ArkClient(cfg).start())
    # The CLI checks it from the launcher when the workers run here: exit 2, the same message.
    inp = write_jsonl(tmp_path / "in.jsonl", 2)
    rc = batch_chat.main(["--input", inp, "--output", str(tmp_path / "o"), "--model", "m", "--no_preflight",
                          "--api_key_secret", VERSION])
    err = capsys.readouterr().err
    assert rc == 2 and "secretmanager.secretAccessor" in err and "Traceback" not in err


def test_a_bad_version_name_fails_fast_naming_the_flag(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", 2)
    rc = batch_chat.main(["--input", inp, "--output", str(tmp_path / "o"), "--model", "m",
                          "--api_key_secret", "ark-key"])
    assert rc == 2 and "--api_key_secret must name a Secret Manager version" in capsys.readouterr().err


def test_summary_json_does_not_hold_the_key(secret_manager, tmp_path):
    with FakeArkServer(api_key=SECRET) as server:
        inp = write_jsonl(tmp_path / "in.jsonl", 2)
        out = str(tmp_path / "out")
        batch_chat.main(["--input", inp, "--output", out, "--model", "m", "--base_url", server.base_url,
                         "--api_key_secret", VERSION, "--progress_seconds", "0"])
    text = (tmp_path / "out" / "summary.json").read_text()
    assert SECRET not in text and json.loads(text)["ok"] == 2
