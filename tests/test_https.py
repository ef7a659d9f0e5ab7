"""The CLI and the client over HTTPS against the fake server's test CA: trusted through
``--ca_bundle`` or ``SSL_CERT_FILE``, never by turning verification off; keep-alive
connections survive a pause the server announces (no reconnect storm after it)."""

import asyncio
import os

import pyarrow.dataset as ds
import pytest

from arkbatch_beam import ArkClient, ChatRequest, ClientConfig, Endpoint
from arkbatch_beam.testing import FakeArkServer
from pipelines import batch_chat

from .conftest import KEY, KEY_ENV, write_jsonl

CONCURRENCY = 8


@pytest.fixture
def tls_server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with FakeArkServer(api_key=KEY, tls=True) as srv:
        yield srv


def argv(server, inp, out, *extra):
    return ["--input", inp, "--output", out, "--model", "ep-https", "--base_url", server.base_url,
            "--api_key_env", KEY_ENV, "--max_concurrency", str(CONCURRENCY), "--timeout", "60", *extra]


def read(out, kind):
    path = os.path.join(out, kind)
    if not os.path.isdir(path):
        return []
    return ds.dataset(path, format="parquet").to_table().to_pylist()


def assert_every_id_once_ok(out, n):
    ok, failed = read(out, "results"), read(out, "failures")
    assert failed == []
    assert sorted(r["custom_id"] for r in ok) == sorted(f"id-{i}" for i in range(n))
    assert {r["content"] for r in ok} == {f"echo: p {i}" for i in range(n)}


def test_cli_over_https_with_ca_bundle(tls_server, tmp_path):
    assert tls_server.base_url.startswith("https://127.0.0.1:")
    inp = write_jsonl(tmp_path / "in.jsonl", 40)
    out = str(tmp_path / "out")
    assert batch_chat.main(argv(tls_server, inp, out, "--ca_bundle", tls_server.ca_pem_path, "--no_preflight")) == 0
    assert_every_id_once_ok(out, 40)
    assert tls_server.ok_responses == 40
    # one connection (one handshake) per request in flight, reused: never one per request
    assert tls_server.connections_opened <= CONCURRENCY + 2


def test_cli_preflight_trusts_the_ca_bundle(tls_server, tmp_path):
    # Before: the launcher's GET probe used urllib's default trust, so --ca_bundle jobs exited 2.
    inp = write_jsonl(tmp_path / "in.jsonl", 5)
    out = str(tmp_path / "out")
    assert batch_chat.main(argv(tls_server, inp, out, "--ca_bundle", tls_server.ca_pem_path)) == 0
    assert_every_id_once_ok(out, 5)


def test_cli_over_https_with_ssl_cert_file(tls_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", tls_server.ca_pem_path)
    inp = write_jsonl(tmp_path / "in.jsonl", 30)
    out = str(tmp_path / "out")
    assert batch_chat.main(argv(tls_server, inp, out)) == 0  # the preflight probe trusts it too
    assert_every_id_once_ok(out, 30)
    assert tls_server.connections_opened <= CONCURRENCY + 3  # + the preflight's probe


def test_without_the_ca_the_launcher_names_the_certificate_problem(tls_server, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", 5)
    assert batch_chat.main(argv(tls_server, inp, str(tmp_path / "out"))) == 2
    err = capsys.readouterr().err
    assert "certificate verify failed" in err and tls_server.base_url in err
    assert tls_server.total_requests == 0


def test_without_the_ca_no_request_is_sent_unverified(tls_server, tmp_path, capsys):
    """Past the launcher's probe, the workers refuse the server's certificate: the job either
    stops naming the problem, or ends every row failed naming it; no request reaches the server."""
    inp = write_jsonl(tmp_path / "in.jsonl", 6)
    out = str(tmp_path / "out")
    code = batch_chat.main(argv(tls_server, inp, out, "--no_preflight", "--max_attempts", "2",
                                "--backoff_initial", "0.01", "--backoff_max", "0.02"))
    assert tls_server.total_requests == 0 and tls_server.connections_opened >= 1
    assert read(out, "results") == []
    # Fewer requests than it takes to call the endpoint unusable: every row fails at its first
    # attempt (before: 20 doomed handshakes each), as a certificate_error naming the fix.
    assert code == 0
    failed = read(out, "failures")
    assert sorted(r["custom_id"] for r in failed) == [f"id-{i}" for i in range(6)]
    for r in failed:
        assert r["error_type"] == "certificate_error" and r["attempts"] == 1 and r["retryable"] is False
        assert "CERTIFICATE_VERIFY_FAILED" in r["error_message"] and "--ca_bundle" in r["error_message"]


def test_an_untrusted_certificate_stops_the_job_naming_it(tls_server, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", 30)
    code = batch_chat.main(argv(tls_server, inp, str(tmp_path / "out"), "--no_preflight"))
    err = capsys.readouterr().err
    assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in err and "--ca_bundle" in err
    assert tls_server.total_requests == 0


def _through_a_pause(seconds: float, status: int, form: str = "seconds", **config) -> tuple[list, dict, int]:
    """48 requests at C = CONCURRENCY over HTTPS, with a pause of ``seconds`` announced at the
    tenth arrival: (results, the server's snapshot, connections opened before the pause)."""
    n = 48
    seen: dict[str, int] = {}
    with FakeArkServer(api_key=None, tls=True) as srv:

        def pause_at_the_tenth(total: int) -> None:
            if total == 10:
                seen["opened_before_pause"] = srv.connections_opened
                srv.pause(seconds, retry_after_form=form, status=status)

        srv.on_request(pause_at_the_tenth)

        async def run() -> list:
            cfg = ClientConfig(Endpoint("ep", base_url=srv.base_url, api_key_env="", ca_bundle=srv.ca_pem_path),
                               max_concurrency=CONCURRENCY, timeout=60, **config)
            async with ArkClient(cfg) as client:
                return await asyncio.gather(*(
                    client.complete(ChatRequest(f"r{i}", {"messages": [{"role": "user", "content": f"p {i}"}]}))
                    for i in range(n)))

        results = asyncio.run(run())
        snap = srv.snapshot()
    assert all(r.ok for r in results) and snap["ok_responses"] == n
    assert snap["statuses"][status] >= 1 and snap["requests_during_pause"] >= 1
    return results, snap, seen["opened_before_pause"]


@pytest.mark.parametrize("status, form", [(429, "seconds"), (503, "float")])
def test_keepalive_connections_survive_an_announced_pause(status, form):
    """A pause of ~1 s announced to every in-flight connection: the clients wait on the
    connections they have, and reuse them after it (handshakes stay at the concurrency)."""
    _, snap, before = _through_a_pause(1.0, status, form)
    assert before <= CONCURRENCY
    # no reconnect storm: near the concurrency, not near the request count (56+ arrivals)
    assert snap["connections_opened"] <= CONCURRENCY + 2
    assert snap["connections_opened"] - before <= 2


def test_a_pause_longer_than_the_idle_connection_time_reconnects():
    """The other side of the test above: connections idle past ``idle_connection_seconds``
    (default 120 s; aiohttp's own default is 15 s) are closed, and a new TLS handshake is paid
    for each when sending resumes. So the setting decides which pauses keep the connections."""
    _, snap, before = _through_a_pause(2.0, 503, idle_connection_seconds=1.0)
    assert snap["connections_opened"] - before >= CONCURRENCY - 2  # closed while idle, opened again


def test_the_cli_keeps_its_connections_through_a_pause(tls_server, tmp_path):
    seen: dict[str, int] = {}

    def pause_at_the_tenth(total: int) -> None:
        if total == 10:
            seen["opened_before_pause"] = tls_server.connections_opened
            tls_server.pause(1.0)

    tls_server.on_request(pause_at_the_tenth)
    inp = write_jsonl(tmp_path / "in.jsonl", 40)
    out = str(tmp_path / "out")
    assert batch_chat.main(argv(tls_server, inp, out, "--ca_bundle", tls_server.ca_pem_path, "--no_preflight")) == 0
    assert_every_id_once_ok(out, 40)
    assert tls_server.requests_during_pause >= 1
    assert tls_server.connections_opened <= CONCURRENCY + 2
    assert tls_server.connections_opened - seen["opened_before_pause"] <= 2
