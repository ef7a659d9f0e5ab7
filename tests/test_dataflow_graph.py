"""The production path, offline: Dataflow (and Flink) options, the graph they build, and no key in it.

No GCP project is reachable here, so this checks everything up to the point where Beam would
upload the job: the CLI's flags and Beam's separate cleanly; the pipeline graph for Dataflow
options builds without running; and Beam's own ``DataflowRunner`` translates it into the
Dataflow job (``--dry_run=True`` stops before the API call; the job description, with every
file Beam would stage, is then built by Beam's ``DataflowApplicationClient`` with only the
upload itself captured in memory). Throughout, the API key sits in the environment under a
distinctive value, and none of the graph, the pickled DoFns/coders/window fns, the display
data, the job JSON or the staged files may contain it.

Offline by construction: sockets may only reach loopback addresses, Google's credential
look-up is replaced by "none found" (and a call to ``google.auth.default`` fails the test),
``--no_auth`` gives Beam's Dataflow client anonymous credentials, and ``--dry_run=True`` also
skips Beam's GCS bucket check of ``--temp_location``.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import io
import json
import shutil
import socket
import sys
import tarfile
import zlib
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import (
    DebugOptions,
    GoogleCloudOptions,
    PipelineOptions,
    PortableOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
    _BeamArgumentParser,
)
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from google.protobuf.message import Message

from pipelines import batch_chat

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "ARKBATCH_GRAPH_TEST_KEY"
SECRET = "ark-GRAPH-SECRET-7d41c09e5b3a"

# What docs/production.md tells a user to paste (after our own flags), for Dataflow and for Flink.
DATAFLOW_FLAGS = [
    "--runner=DataflowRunner", "--project=my-project", "--region=us-central1",
    "--temp_location=gs://my-bucket/tmp", "--setup_file=./setup.py",
    "--machine_type=n2-standard-4", "--max_num_workers=20",
    "--experiments=no_use_multiple_sdk_containers", "--number_of_worker_harness_threads=8",
    "--service_account_email=ark-batch@my-project.iam.gserviceaccount.com",
    "--sdk_container_image=us-central1-docker.pkg.dev/my-project/beam/arkbatch:2.77.0",
]
ONE_PROCESS_PER_VM = "--experiments=no_use_multiple_sdk_containers"
FLINK_FLAGS = [
    "--runner=PortableRunner", "--job_endpoint=localhost:8099", "--parallelism=8",
    "--sdk_worker_parallelism=2", "--environment_type=EXTERNAL", "--environment_config=localhost:50000",
]
# Offline switches: stop before the Dataflow API call (and before Beam's GCS bucket check), and
# give Beam's Dataflow client anonymous credentials instead of looking any up.
OFFLINE_FLAGS = ["--dry_run=True", "--no_auth"]


def our_flags(inp: str, out: str, *extra: str) -> list[str]:
    return ["--input", inp, "--output", out, "--model", "ep-20240101-abcde", "--api_key_env", KEY_ENV,
            "--max_concurrency", "64", "--timeout", "86400", *extra]


# ---------------------------------------------------------------------------------------------
# Offline guard


def _is_loopback(host: object) -> bool:
    return host in (None, "", "localhost", "::1") or str(host).startswith("127.")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Only loopback sockets; no Google credential look-up; the key set to ``SECRET``."""
    import google.auth
    from apache_beam.internal.gcp import auth

    refused: list[object] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            refused.append(address)
            raise OSError(f"offline test: connection to {address!r} refused")

    def connect(sock, address):
        check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return real_connect_ex(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            refused.append(host)
            raise socket.gaierror(f"offline test: no name look-ups ({host!r})")
        return real_getaddrinfo(host, *args, **kwargs)

    def no_default_credentials(*args, **kwargs):
        refused.append("google.auth.default")
        raise google.auth.exceptions.DefaultCredentialsError("offline test: no credential look-up")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(google.auth, "default", no_default_credentials)
    # Beam's per-process credential cache: "looked up, none found" (see tests/test_gcs.py).
    monkeypatch.setattr(auth._Credentials, "_credentials_init", True)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)
    monkeypatch.setenv(KEY_ENV, SECRET)
    yield refused
    assert not refused, f"something tried to leave 127.0.0.1: {refused}"


def test_the_offline_guard_refuses_everything_but_loopback(offline):
    with socket.socket() as s, pytest.raises(OSError, match="offline test"):
        s.connect(("192.0.2.1", 443))
    with pytest.raises(OSError, match="offline test"):
        socket.getaddrinfo("dataflow.googleapis.com", 443)
    import google.auth

    with pytest.raises(google.auth.exceptions.DefaultCredentialsError):
        google.auth.default()
    assert offline == [("192.0.2.1", 443), "dataflow.googleapis.com", "google.auth.default"]
    offline.clear()
    with socket.socket() as s:  # loopback stays allowed (nothing listens there: refused by the OS)
        assert s.connect_ex(("127.0.0.1", 9)) != 0
    assert offline == []


# ---------------------------------------------------------------------------------------------
# Where a key could hide in a pipeline proto: raw bytes, and Beam's pickles (base64 of bz2/zlib,
# so a pickled secret is NOT visible in the raw bytes; they must be decompressed).

_NESTED_PAYLOADS = {
    common_urns.primitives.PAR_DO.urn: beam_runner_api_pb2.ParDoPayload,
    common_urns.composites.COMBINE_PER_KEY.urn: beam_runner_api_pb2.CombinePayload,
    common_urns.composites.COMBINE_GLOBALLY.urn: beam_runner_api_pb2.CombinePayload,
    common_urns.combine_components.COMBINE_PER_KEY_PRECOMBINE.urn: beam_runner_api_pb2.CombinePayload,
    common_urns.combine_components.COMBINE_PER_KEY_MERGE_ACCUMULATORS.urn: beam_runner_api_pb2.CombinePayload,
    common_urns.combine_components.COMBINE_PER_KEY_EXTRACT_OUTPUTS.urn: beam_runner_api_pb2.CombinePayload,
    common_urns.deprecated_primitives.READ.urn: beam_runner_api_pb2.ReadPayload,
    common_urns.primitives.ASSIGN_WINDOWS.urn: beam_runner_api_pb2.WindowIntoPayload,
}


def _unpickled_bytes(data: bytes) -> bytes | None:
    """The raw pickle inside a Beam pickler payload (base64 of bz2 or zlib), else None."""
    try:
        packed = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    for decompress in (bz2.decompress, zlib.decompress):
        try:
            return decompress(packed)
        except (OSError, ValueError, zlib.error):
            continue
    return None


def pickles_in(msg: Message, where: str = "", found: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Every Beam pickle in a proto (DoFns, CombineFns, sources, window fns, coders), decoded."""
    found = {} if found is None else found
    for field, value in msg.ListFields():
        name = f"{where}.{field.name}" if where else field.name
        if field.type == field.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                items = [(f"{name}[{k}]", v) for k, v in value.items()]
            elif isinstance(value, Message):
                items = [(name, value)]
            else:  # a repeated field
                items = [(f"{name}[{i}]", v) for i, v in enumerate(value)]
            for item_name, item in items:
                if isinstance(item, Message):
                    pickles_in(item, item_name, found)
        elif field.type == field.TYPE_BYTES:
            nested = _NESTED_PAYLOADS.get(getattr(msg, "urn", None))
            if nested is not None and field.name == "payload":
                pickles_in(nested.FromString(value), name, found)
            else:
                raw = _unpickled_bytes(value)
                if raw is not None:
                    found[name] = raw
    return found


def assert_no_secret_in(proto: beam_runner_api_pb2.Pipeline) -> dict[str, bytes]:
    assert SECRET.encode() not in proto.SerializeToString()
    pickles = pickles_in(proto)
    leaks = [where for where, raw in pickles.items() if SECRET.encode() in raw]
    assert not leaks, f"the key is pickled into {leaks}"
    return pickles


def display_data(proto: beam_runner_api_pb2.Pipeline, unique_name: str) -> dict[str, str]:
    (t,) = [t for t in proto.components.transforms.values() if t.unique_name == unique_name]
    items = {}
    for dd in t.display_data:
        p = beam_runner_api_pb2.LabelledPayload.FromString(dd.payload)
        items[p.key] = getattr(p, p.WhichOneof("value"))
    return items


def package_copy(dest: Path) -> Path:
    """The project's setup.py and packages, so Beam's sdist for --setup_file is built outside the repo."""
    dest.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    for pkg in ("arkbatch_beam", "pipelines"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture
def prompts(tmp_path) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(
        json.dumps({"custom_id": f"id-{i}", "body": {"messages": [{"role": "user", "content": f"p {i}"}]}}) + "\n"
        for i in range(3)))
    return str(path)


# ---------------------------------------------------------------------------------------------
# (a) the command line


def test_dataflow_flags_pass_through_our_parser_and_parse_as_beam_options(prompts):
    argv = our_flags(prompts, "gs://my-bucket/out", "--resume") + DATAFLOW_FLAGS
    args, beam_args = batch_chat.build_parser().parse_known_args(argv)  # what run() does
    assert beam_args == DATAFLOW_FLAGS  # nothing of ours leaks to Beam, nothing of Beam's is taken
    assert (args.input, args.output, args.model, args.api_key_env, args.max_concurrency, args.resume) == (
        prompts, "gs://my-bucket/out", "ep-20240101-abcde", KEY_ENV, 64, True)

    options = PipelineOptions(beam_args, save_main_session=False)
    # Every flag is a Beam option (a typo would be "unknown" and silently dropped by Beam).
    assert options.get_all_options(retain_unknown_options=True) == options.get_all_options()
    gcp, workers = options.view_as(GoogleCloudOptions), options.view_as(WorkerOptions)
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert (gcp.project, gcp.region, gcp.temp_location) == ("my-project", "us-central1", "gs://my-bucket/tmp")
    assert gcp.service_account_email == "ark-batch@my-project.iam.gserviceaccount.com"
    assert options.view_as(SetupOptions).setup_file == "./setup.py"
    assert options.view_as(DebugOptions).number_of_worker_harness_threads == 8
    assert "no_use_multiple_sdk_containers" in options.view_as(DebugOptions).experiments
    assert (workers.max_num_workers, workers.machine_type) == (20, "n2-standard-4")
    assert workers.sdk_container_image.endswith("/arkbatch:2.77.0")
    # The key is never an option: no flag of ours or Beam's holds it.
    assert SECRET not in json.dumps(options.get_all_options(retain_unknown_options=True), default=str)
    assert SECRET not in repr(vars(args))


def test_flink_flags_pass_through_our_parser_and_parse_as_beam_options(prompts):
    args, beam_args = batch_chat.build_parser().parse_known_args(our_flags(prompts, "/data/out") + FLINK_FLAGS)
    assert beam_args == FLINK_FLAGS and args.max_concurrency == 64
    options = PipelineOptions(beam_args, save_main_session=False)
    assert options.get_all_options(retain_unknown_options=True) == options.get_all_options()
    portable = options.view_as(PortableOptions)
    assert (portable.job_endpoint, portable.environment_type, portable.environment_config) == (
        "localhost:8099", "EXTERNAL", "localhost:50000")
    assert int(portable.sdk_worker_parallelism) == 2
    assert options.get_all_options()["parallelism"] == 8


def _beam_flags() -> list[str]:
    """Every --flag Beam's own PipelineOptions classes declare."""
    classes, todo = {}, [PipelineOptions]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("apache_beam."):
                classes[f"{sub.__module__}.{sub.__qualname__}"] = sub
    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in classes.values():
        cls._add_argparse_args(parser)
    return sorted(s for s in parser._option_string_actions if s.startswith("--") and s != "--help")


def test_no_beam_option_is_taken_by_our_parser():
    """argparse accepts unambiguous prefixes: no Beam flag may match (or abbreviate) one of ours."""
    flags = _beam_flags()
    assert len(flags) > 100 and "--number_of_worker_harness_threads" in flags and "--sdk_worker_parallelism" in flags
    parser = batch_chat.build_parser()
    taken = []
    for flag in flags:
        try:
            _, rest = parser.parse_known_args(["--input", "a", "--output", "o", f"{flag}=1"])
        except SystemExit:
            rest = None
        if rest != [f"{flag}=1"]:
            taken.append(flag)
    assert not taken


# ---------------------------------------------------------------------------------------------
# (b, c) the graph for Dataflow options, built and never run


def test_dataflow_graph_builds_offline_with_the_expected_steps_and_no_key(prompts):
    argv = our_flags(prompts, "gs://my-bucket/out", "--resume") + DATAFLOW_FLAGS + OFFLINE_FLAGS
    args, beam_args = batch_chat.build_parser().parse_known_args(argv)
    p = beam.Pipeline(options=PipelineOptions(beam_args, save_main_session=False))
    assert type(p.runner).__name__ == "DataflowRunner"
    batch_chat.build_pipeline(p, args)
    proto = p.to_runner_api()

    # (c) the steps, wired as the CLI promises: Read -> Infer -> one writer (both statuses) -> Compact.
    transforms = proto.components.transforms
    by_name = {t.unique_name: t for t in transforms.values()}
    (root,) = proto.root_transform_ids
    top = {transforms[i].unique_name: transforms[i] for i in transforms[root].subtransforms}
    assert {"Read", "Infer", "WriteResults", "Compact"} <= set(top)
    for step in ("Infer/Parse", "Infer/Dedupe", "Infer/DoneIds", "Infer/Infer"):  # parse, dedupe+resume, send
        assert step in by_name, step
    read_out = set(top["Read"].outputs.values())
    assert set(top["Infer"].inputs.values()) == read_out
    assert list(top["WriteResults"].inputs.values()) == list(top["Infer"].outputs.values())
    assert set(top["Compact"].inputs.values()) == set(top["WriteResults"].outputs.values())
    # The job's last step writes summary.json itself (no launcher needs to stay attached).
    assert set(top["Summary"].inputs.values()) == set(top["Compact"].outputs.values())

    # (b) no key anywhere: raw bytes, and every pickle decoded (the inference DoFn among them).
    pickles = assert_no_secret_in(proto)
    infer_dofn = [w for w, raw in pickles.items() if b"InferDoFn" in raw]
    assert infer_dofn and any(b"ep-20240101-abcde" in pickles[w] for w in infer_dofn)
    # The display data names the variable, never its value.
    shown = display_data(proto, "Infer")
    assert shown["api_key_env"] == KEY_ENV and shown["model"] == "ep-20240101-abcde"
    assert SECRET not in json.dumps(shown, default=str)

    # --no_compact drops the last step only.
    args2, _ = batch_chat.build_parser().parse_known_args(our_flags(prompts, "gs://my-bucket/out", "--no_compact"))
    p2 = beam.Pipeline(options=PipelineOptions(beam_args, save_main_session=False))
    batch_chat.build_pipeline(p2, args2)
    names2 = {t.unique_name for t in p2.to_runner_api().components.transforms.values()}
    assert {"Read", "Infer", "WriteResults"} <= names2
    assert "Compact" not in names2 and "Infer/DoneIds" not in names2


def test_the_leak_check_finds_a_key_that_is_pickled(prompts):
    """Control: a DoFn that captured the key is caught, although its bytes are compressed."""
    p = beam.Pipeline(options=PipelineOptions(DATAFLOW_FLAGS + OFFLINE_FLAGS, save_main_session=False))
    captured = SECRET  # what `lambda x, key=os.environ[...]` in user code would do
    _ = p | beam.io.ReadFromText(prompts) | "Leaky" >> beam.Map(lambda x, key=captured: (key, x))
    proto = p.to_runner_api()
    assert any(SECRET.encode() in raw for raw in pickles_in(proto).values())
    with pytest.raises(AssertionError, match="pickled into"):
        assert_no_secret_in(proto)


# ---------------------------------------------------------------------------------------------
# Beam's DataflowRunner itself: translation to the Dataflow job, offline


@pytest.mark.parametrize("one_process_per_vm", [True, False], ids=["as_documented", "default_processes"])
def test_dataflow_runner_translates_the_cli_job_without_the_key(tmp_path, prompts, monkeypatch, capsys,
                                                                 one_process_per_vm):
    from apache_beam.runners.dataflow import dataflow_runner
    from apache_beam.runners.dataflow.internal import apiclient

    monkeypatch.chdir(package_copy(tmp_path / "src"))  # so "--setup_file=./setup.py" is the project
    seen = {}
    real_run_pipeline = dataflow_runner.DataflowRunner.run_pipeline

    def spy(self, pipeline, options, pipeline_proto=None):
        seen["result"] = real_run_pipeline(self, pipeline, options, pipeline_proto)
        seen["runner"], seen["options"] = self, options
        return seen["result"]

    staged: dict[str, bytes] = {}

    def stage_file(self, location, name, stream, mime_type=None, total_size=None):  # the upload, in memory
        staged[name] = stream.read()

    monkeypatch.setattr(dataflow_runner.DataflowRunner, "run_pipeline", spy)
    monkeypatch.setattr(apiclient.DataflowApplicationClient, "stage_file", stage_file)

    # The real CLI entry point; --dry_run=True makes Beam return before calling the Dataflow API.
    out = str(tmp_path / "out")
    flags = [f for f in DATAFLOW_FLAGS if one_process_per_vm or f != ONE_PROCESS_PER_VM]
    argv = our_flags(prompts, out, "--no_preflight") + flags + OFFLINE_FLAGS
    summary = batch_chat.run(argv)
    assert (summary["ok"], summary["failed"]) == (0, 0)
    printed = capsys.readouterr()
    assert printed.out.strip().splitlines()[-1].startswith("summary: ok=0 failed=0 ")
    assert SECRET not in printed.out + printed.err

    runner, options, job = seen["runner"], seen["options"], seen["result"].job
    assert_no_secret_in(runner.proto_pipeline)  # the graph after Dataflow's own overrides
    # What create_job() does before submitting: stage the files, describe the job.
    apiclient.DataflowApplicationClient(options, job.root_staging_location).create_job_description(job)
    job_json = job.json()
    assert SECRET not in job_json
    desc = json.loads(job_json)

    # Staged: the pipeline, our package as an sdist, the launcher's pip freeze; no main session
    # (run() turns off what Beam would otherwise default to on Dataflow with cloudpickle).
    assert {"pipeline.pb", "workflow.tar.gz", "submission_environment_dependencies.txt"} <= set(staged)
    assert "pickled_main_session" not in staged
    assert options.view_as(SetupOptions).save_main_session is False
    assert_no_secret_in(beam_runner_api_pb2.Pipeline.FromString(staged["pipeline.pb"]))
    for name, blob in staged.items():
        assert SECRET.encode() not in blob, name
    with tarfile.open(fileobj=io.BytesIO(staged["workflow.tar.gz"])) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        for wanted in ("setup.py", "arkbatch_beam/_dofn.py", "arkbatch_beam/_client.py", "pipelines/batch_chat.py"):
            assert wanted in members, wanted
        for m in members.values():
            if m.isfile():
                assert SECRET.encode() not in tar.extractfile(m).read(), m.name

    # The worker sizing flags reach the job; our flags (and the key) are not pipeline options.
    env = desc["environment"]
    (pool,) = env["workerPools"]
    assert pool["numThreadsPerWorker"] == 8
    assert pool["autoscalingSettings"]["maxNumWorkers"] == 20
    assert pool["machineType"] == "n2-standard-4"
    assert {p["name"] for p in pool["packages"]} >= {"workflow.tar.gz"}
    if one_process_per_vm:
        assert "no_use_multiple_sdk_containers" in env["experiments"]
        assert "use_multiple_sdk_containers" not in env["experiments"]
    else:  # Beam's default for Python on Dataflow: one SDK process per vCPU
        assert "use_multiple_sdk_containers" in env["experiments"]
    assert pool["workerHarnessContainerImage"] == options.view_as(WorkerOptions).sdk_container_image
    sdk_options = env["sdkPipelineOptions"]["options"]
    assert (sdk_options["project"], sdk_options["region"]) == ("my-project", "us-central1")
    ours = {a.dest for a in batch_chat.build_parser()._actions} - {"help"}
    assert not ours & set(sdk_options), ours & set(sdk_options)


# ---------------------------------------------------------------------------------------------
# Flink: the graph a portable runner receives, per SDK environment type


@pytest.mark.parametrize("environment", [
    [],  # DOCKER, Beam's default image for this SDK
    ["--environment_type=EXTERNAL", "--environment_config=localhost:50000"],
    ["--environment_type=PROCESS", '--environment_config={"command": "/opt/apache/beam/boot"}'],
], ids=["docker", "external", "process"])
def test_flink_graph_carries_no_key(prompts, environment):
    from apache_beam.runners.portability.flink_runner import FlinkRunner

    argv = our_flags(prompts, "/data/out") + [
        "--runner=FlinkRunner", "--flink_master=flink-jm:8081", "--parallelism=4", "--sdk_worker_parallelism=2",
        *environment]
    args, beam_args = batch_chat.build_parser().parse_known_args(argv)
    options = PipelineOptions(beam_args, save_main_session=False)
    assert options.get_all_options(retain_unknown_options=True) == options.get_all_options()
    p = beam.Pipeline(options=options)
    batch_chat.build_pipeline(p, args)
    env = FlinkRunner().default_environment(options)  # what PortableRunner puts into the job
    proto = p.to_runner_api(default_environment=env)
    assert_no_secret_in(proto)
    urns = {e.urn for e in proto.components.environments.values()}
    kind = (options.view_as(PortableOptions).environment_type or "DOCKER").lower()
    assert urns == {f"beam:env:{kind}:v1"}
    if kind == "docker":
        payload = beam_runner_api_pb2.DockerPayload.FromString(
            next(iter(proto.components.environments.values())).payload)
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        assert payload.container_image == f"apache/beam_python{py}_sdk:{beam.__version__}"


def test_a_key_given_to_a_process_environment_travels_in_the_graph(prompts):
    """Why the guide says never to pass the key with process_variables / environment_config "env"."""
    from apache_beam.runners.portability.flink_runner import FlinkRunner

    options = PipelineOptions(["--runner=FlinkRunner", "--flink_master=flink-jm:8081", "--environment_type=PROCESS",
                               "--environment_option=process_command=/opt/apache/beam/boot",
                               f"--environment_option=process_variables={KEY_ENV}={SECRET}"])
    p = beam.Pipeline(options=options)
    _ = p | beam.io.ReadFromText(prompts)
    proto = p.to_runner_api(default_environment=FlinkRunner().default_environment(options))
    assert SECRET.encode() in proto.SerializeToString()
