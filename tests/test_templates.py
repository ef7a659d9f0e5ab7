"""Prompt templates, request options (thinking, extra_body, multimodal), structured output and kept columns."""

import http.server
import json
import os
import threading

import apache_beam as beam
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to

from arkbatch_beam import BatchChatInference, ChatRequest, Endpoint, InputOptions, OptionError, parse_input
from arkbatch_beam._inputs import derive_id
from pipelines import batch_chat

from .conftest import KEY_ENV

# --- parsing ---------------------------------------------------------------------------------------


def test_template_over_json_fields_and_text_lines():
    opts = InputOptions(template="Summarise: {text} ({lang})", system_template="Answer in {lang}.")
    req = parse_input('{"id": 7, "text": "the sea", "lang": "fr"}', opts)
    assert isinstance(req, ChatRequest) and req.custom_id == "7"
    assert req.body == {"messages": [{"role": "system", "content": "Answer in fr."},
                                     {"role": "user", "content": "Summarise: the sea (fr)"}]}
    plain = parse_input("just a line", InputOptions(template="Translate: {text}", system="Be brief."))
    assert plain.body["messages"] == [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Translate: just a line"}]
    braces = parse_input({"text": "x"}, InputOptions(template='{{"q": "{text}"}}'))
    assert braces.body["messages"][-1]["content"] == '{"q": "x"}'


def test_a_missing_or_null_column_is_a_failure_row_naming_it():
    opts = InputOptions(template="Summarise: {text}", keep_columns="lang")
    row = parse_input('{"custom_id": "a", "txt": "typo", "lang": "en"}', opts)
    assert (row.custom_id, row.error_type, row.status) == ("a", "missing_column", "failed")
    assert "'text'" in row.error_message and "txt" in row.error_message
    assert row.columns_json == '{"lang":"en"}'
    null = parse_input({"id": 3, "text": None}, opts)
    assert (null.custom_id, null.error_type) == ("3", "missing_column") and "is null" in null.error_message


def test_template_file_fills_text_and_image_parts(tmp_path):
    path = tmp_path / "messages.json"
    path.write_text(json.dumps([
        {"role": "system", "content": "You describe {kind}."},
        {"role": "user", "content": [{"type": "text", "text": "What is in this {kind}?"},
                                     {"type": "image_url", "image_url": {"url": "{url}"}}]},
    ]), encoding="utf-8")
    opts = InputOptions(template_file=os.fspath(path))
    req = parse_input({"kind": "photo", "url": "https://example.invalid/cat.png"}, opts)
    assert req.body["messages"][1]["content"][1] == {"type": "image_url",
                                                     "image_url": {"url": "https://example.invalid/cat.png"}}
    with pytest.raises(OptionError, match="template_file"):
        InputOptions(template_file=os.fspath(tmp_path / "missing.json"))
    with pytest.raises(OptionError, match="template"):
        InputOptions(template="{unclosed")


def test_request_options_are_added_but_the_input_wins_and_ids_do_not_move():
    line = {"custom_id": None, "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}
    line.pop("custom_id")
    plain = parse_input(dict(line), InputOptions())
    opts = InputOptions(thinking="disabled", extra_body='{"temperature": 0, "top_p": 0.9}',
                        response_format='{"type": "object", "properties": {"a": {"type": "integer"}}}')
    req = parse_input(dict(line), opts)
    assert req.custom_id == plain.custom_id == derive_id(plain.body)
    assert req.body["thinking"] == {"type": "disabled"}
    assert req.body["temperature"] == 0.5 and req.body["top_p"] == 0.9
    assert req.body["response_format"]["type"] == "json_schema"
    assert req.body["response_format"]["json_schema"]["schema"]["properties"] == {"a": {"type": "integer"}}
    with pytest.raises(OptionError, match="extra_body"):
        InputOptions(extra_body="[1]")
    with pytest.raises(OptionError, match="not a valid JSON schema"):
        InputOptions(response_format='{"type": 12}')


def test_multimodal_content_passes_untouched():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}
    line = json.dumps({"custom_id": "img", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, image]}]})
    req = parse_input(line, InputOptions(thinking="enabled"))
    assert req.body["messages"][0]["content"][1] == image


def test_keep_columns_are_not_sent_but_kept():
    opts = InputOptions(keep_columns="row,model")
    req = parse_input('{"id": 1, "row": {"a": [1]}, "model": "m", "messages": [{"role": "user", "content": "q"}]}',
                      opts)
    assert "row" not in req.body and req.body["model"] == "m"  # a request field stays in the body
    assert json.loads(req.columns_json) == {"row": {"a": [1]}, "model": "m"}


# --- end to end against a server that answers JSON and records what it was sent ---------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    bodies: list = []
    ANSWERS = {
        "good": '{"name": "sea", "n": 1}',
        "fenced": '```json\n{"name": "sky", "n": 2}\n```',
        "wrong": '{"name": 3}',
        "prose": "I think the answer is 4.",
    }

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        content = body["messages"][-1]["content"]
        text = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)
        key = text.split()[-1]
        answer = {"id": "c-" + key, "model": body.get("model"),
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": self.ANSWERS.get(key, "echo"),
                                           "reasoning_content": "because " + key}}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def json_server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-json-server")
    _Recorder.bodies = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/api/v3"
    srv.shutdown()
    srv.server_close()
    thread.join()


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}


def test_structured_output_reasoning_thinking_and_kept_columns(json_server, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA), encoding="utf-8")
    rows = [{"id": k, "text": k, "grp": i} for i, k in enumerate(["good", "fenced", "wrong", "prose"])]
    with beam.Pipeline() as p:
        ok, failed = (
            p | beam.Create(rows)
            | BatchChatInference(Endpoint("ep-json", base_url=json_server, api_key_env=KEY_ENV),
                                 max_concurrency=4, template="Answer about {text}", response_format=os.fspath(schema),
                                 thinking="enabled", extra_body='{"max_tokens": 64}', keep_columns="grp")
            .with_exception_handling())
        assert_that(ok | beam.Map(lambda r: (r["custom_id"], json.loads(r["parsed_json"]), r["reasoning_content"],
                                             json.loads(r["columns_json"]))),
                    equal_to([("good", {"name": "sea", "n": 1}, "because good", {"grp": 0}),
                              ("fenced", {"name": "sky", "n": 2}, "because fenced", {"grp": 1})]), label="ok")
        assert_that(failed | beam.Map(lambda r: (r["custom_id"], r["error_type"], r["retryable"], r["content"],
                                                 r["parsed_json"], json.loads(r["columns_json"])["grp"])),
                    equal_to([("wrong", "invalid_output", True, '{"name": 3}', None, 2),
                              ("prose", "invalid_output", True, "I think the answer is 4.", None, 3)]),
                    label="failed")
    assert len(_Recorder.bodies) == 4
    for body in _Recorder.bodies:
        assert body["thinking"] == {"type": "enabled"} and body["max_tokens"] == 64
        assert body["response_format"] == {"type": "json_schema",
                                           "json_schema": {"name": "response", "schema": SCHEMA, "strict": True}}
        assert "grp" not in body and "id" not in body


def _read(out, kind):
    return ds.dataset(os.path.join(out, kind), format="parquet").to_table().to_pylist()


def test_cli_template_keep_columns_and_response_format_over_jsonl(json_server, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "text": k, "src": f"s{i}"}) + "\n"
                           for i, k in enumerate(["good", "wrong"])), encoding="utf-8")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA), encoding="utf-8")
    out = os.fspath(tmp_path / "out")
    args = ["--input", os.fspath(inp), "--output", out, "--model", "ep-cli", "--base_url", json_server,
            "--api_key_env", KEY_ENV, "--timeout", "60", "--template", "Tell me about {text}",
            "--keep_columns", "src", "--response_format", os.fspath(schema), "--thinking", "auto",
            "--extra_body", '{"temperature": 0}', "--no_preflight"]
    assert batch_chat.main(args) == 0
    ok, failed = _read(out, "results"), _read(out, "failures")
    assert [(r["custom_id"], r["parsed_json"], r["columns_json"]) for r in ok] == [
        ("r0", '{"name":"sea","n":1}', '{"src":"s0"}')]
    assert [(r["custom_id"], r["error_type"], r["columns_json"]) for r in failed] == [
        ("r1", "invalid_output", '{"src":"s1"}')]
    assert failed[0]["request_json"]  # a failure row keeps its request, to fix and re-run
    assert all(b["thinking"] == {"type": "auto"} and b["temperature"] == 0 for b in _Recorder.bodies)
    # The counters agree with the rows (before: the invalid answer was counted ok, then filed failed).
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        run = json.load(f)["run"]
    assert (run["ok"], run["failed"], run["failures_by_type"]) == (1, 1, {"invalid_output": 1})


def test_cli_template_over_parquet_columns(server, tmp_path):
    pq.write_table(pa.table({"k": ["a", "b"], "text": ["the sea", None], "n": [1, 2]}), tmp_path / "in.parquet")
    out = os.fspath(tmp_path / "out")
    # --prompt_column names an existing column: the launcher checks it even when a template builds the prompt.
    args = ["--input", os.fspath(tmp_path / "in.parquet"), "--output", out, "--model", "ep-cli",
            "--base_url", server.base_url, "--api_key_env", KEY_ENV, "--timeout", "60", "--no_preflight",
            "--prompt_column", "text", "--id_column", "k", "--template", "Summarise {text} #{n}",
            "--keep_columns", "n"]
    assert batch_chat.main(args) == 0
    ok, failed = _read(out, "results"), _read(out, "failures")
    assert [(r["custom_id"], r["content"], r["columns_json"]) for r in ok] == [
        ("a", "echo: Summarise the sea #1", '{"n":1}')]
    assert [(r["custom_id"], r["error_type"]) for r in failed] == [("b", "missing_column")]


@pytest.mark.parametrize("template, value", [("score {s:.2f}", [1, 2]), ("first {s[0]}", 3)])
def test_a_field_of_the_wrong_type_for_its_template_is_a_row_not_a_crash(template, value):
    # Before: a TypeError out of str.format escaped parse_input and failed the whole bundle.
    from arkbatch_beam import InputOptions, parse_input

    row = parse_input({"id": "r1", "s": value}, InputOptions(template=template))
    assert (row.custom_id, row.status, row.error_type) == ("r1", "failed", "missing_column")
    assert "TypeError" in row.error_message and template in row.error_message
