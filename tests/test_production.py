"""Production without an attached launcher: the job writes its own summary.json; the Flex
Template's parameters are the CLI's options; the deployment files hold no key."""

import json
import os

import apache_beam as beam

from arkbatch_beam.testing import Fault
from pipelines import batch_chat

from .conftest import KEY_ENV, write_jsonl


def test_the_pipeline_writes_summary_json_itself_with_no_launcher_waiting(server, tmp_path):
    server.add_fault(Fault.bad_request("refused", match="p 3"))
    inp = write_jsonl(tmp_path / "in.jsonl", 12, extra=["{broken"])
    out = str(tmp_path / "out")
    args = batch_chat.build_parser().parse_args([
        "--input", inp, "--output", out, "--model", "ep-prod", "--base_url", server.base_url,
        "--api_key_env", KEY_ENV, "--progress_seconds", "0"])
    # What a detached launcher does: build, submit and leave (nothing of run() happens after it).
    p = beam.Pipeline()
    batch_chat.build_pipeline(p, args)
    p.run().wait_until_finish()
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["written_by"] == "pipeline"
    assert (summary["ok"], summary["failed"]) == (11, 2)
    assert summary["failures_by_type"] == {"rejected": 1, "invalid_json": 1}
    assert summary["config"]["model"] == "ep-prod" and summary["config"]["api_key_env"] == KEY_ENV
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_with_no_compact_the_summary_is_written_after_the_parts(server, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", 5)
    out = str(tmp_path / "out")
    assert batch_chat.main(["--input", inp, "--output", out, "--model", "m", "--base_url", server.base_url,
                            "--api_key_env", KEY_ENV, "--no_compact", "--progress_seconds", "0"]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["ok"] == 5 and summary["written_by"] == "launcher"  # the waiting launcher rewrote it
    assert summary["requests"] == 5


def test_the_flex_template_parameters_are_exactly_the_cli_options():
    from pipelines import flex_template

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "deploy", "flex-template", "metadata.json")) as f:
        committed = json.load(f)
    regenerate = "python -m pipelines.flex_template > deploy/flex-template/metadata.json"
    assert committed == flex_template.metadata(), f"run: {regenerate}"
    names = [p["name"] for p in committed["parameters"]]
    assert set(names) == set(batch_chat.our_flags()) and len(names) == len(set(names))
    assert [p["name"] for p in committed["parameters"] if not p["isOptional"]] == ["input", "output"]


def test_a_dataflow_job_built_from_template_parameters_holds_no_key(tmp_path, monkeypatch):
    # What the launcher does with the template's parameters (--name=value each, booleans as
    # true/false), offline: the graph names the key's variable or secret, never its value.
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import flex_template

    secret_value = "sk-must-never-appear-1234"
    monkeypatch.setenv("ARK_API_KEY", secret_value)
    inp = write_jsonl(tmp_path / "in.jsonl", 2)
    given = {"input": inp, "output": "gs://bucket/out", "model": "ep-1", "max_concurrency": "64",
             "resume": "true", "no_compact": "false", "api_key_secret": "projects/p/secrets/s/versions/1"}
    assert set(given) <= {p["name"] for p in flex_template.metadata()["parameters"]}
    argv = [f"--{k}={v}" for k, v in given.items()]
    args, beam_args = batch_chat.build_parser().parse_known_args(argv + [
        "--runner=DataflowRunner", "--project=my-project", "--region=us-central1", "--temp_location=gs://bucket/tmp",
        "--sdk_container_image=us-central1-docker.pkg.dev/my-project/beam/arkbatch:2.77.0", "--dry_run=True",
        "--no_auth"])
    assert args.resume is True and args.no_compact is False and args.max_concurrency == 64
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    batch_chat.build_pipeline(p, args)
    proto = p.to_runner_api().SerializeToString()
    assert secret_value.encode() not in proto and b"projects/p/secrets/s/versions/1" in proto


def test_a_flex_template_launch_counts_as_detached_and_writes_no_launcher_summary(tmp_path):
    # The Flex launcher runs the CLI with --template_location: Beam only writes the job file and
    # the run "finishes" at once; a launcher summary then would say ok=0 before the job started.
    args = ["--input", "x", "--output", str(tmp_path / "o")]
    ns, beam_args = batch_chat.build_parser().parse_known_args(
        args + ["--runner=DataflowRunner", "--template_location=gs://b/staging/job_object"])
    assert batch_chat.detached(batch_chat.configure(ns, beam_args))
    ns, beam_args = batch_chat.build_parser().parse_known_args(args)
    assert not batch_chat.detached(batch_chat.configure(ns, beam_args))
    ns, beam_args = batch_chat.build_parser().parse_known_args(args + ["--no_wait_until_finish"])
    assert batch_chat.detached(batch_chat.configure(ns, beam_args))
