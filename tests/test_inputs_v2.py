"""Issue 11, input side: encodings, non-object JSON, binary lines, ids, Parquet messages, huge lines.

Every test here fails on the parser before the fix (see the report of the change).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import random

import pytest

from arkbatch_beam import ChatRequest, ChatResult, InputOptions, derive_id, parse_input
from arkbatch_beam._inputs import row_to_item

MSG = [{"role": "user", "content": "hello"}]
KIB64 = 64 * 1024


def ok(item, **kw) -> ChatRequest:
    out = parse_input(item, InputOptions(**kw))
    assert isinstance(out, ChatRequest), out
    return out


def bad(item, error_type: str, **kw) -> ChatResult:
    out = parse_input(item, InputOptions(**kw))
    assert isinstance(out, ChatResult) and out.status == "failed", out
    assert out.error_type == error_type, (out.error_type, out.error_message)
    assert out.error_message and out.attempts == 0 and out.retryable is False
    return out


def line_id(data: bytes) -> str:
    return "line-" + hashlib.sha256(data).hexdigest()[:32]


def unescape(request_json: str) -> bytes:
    return codecs.escape_decode(request_json.encode("utf-8"))[0]


# --- 1. encodings ---------------------------------------------------------------------------------

LATIN1 = '{"custom_id": "lat-2", "body": {"messages": [{"role": "user", "content": "caf\xe9"}]}}'.encode("latin-1")


def test_a_line_that_is_not_utf8_is_a_failure_row_not_a_paid_prompt():
    r = bad(LATIN1, "invalid_encoding")
    assert r.custom_id == "lat-2"  # the id is plain ASCII: salvaged at the top level
    assert "caf\\xe9" in r.request_json and "\ufffd" not in r.request_json
    assert unescape(r.request_json) == LATIN1  # the raw bytes, escaped reversibly
    assert "utf-8" in r.error_message and "0xe9" in r.error_message and "input_encoding" in r.error_message


def test_plain_text_in_gbk_fails_by_default_and_is_read_with_input_encoding():
    data = "用一句话介绍北京".encode("gbk")
    r = bad(data, "invalid_encoding")
    assert r.custom_id == line_id(data)  # no id in the line: derived from its bytes
    assert unescape(r.request_json) == data
    for enc in ("gbk", "GB18030"):
        req = ok(data, input_encoding=enc)
        assert req.body["messages"] == [{"role": "user", "content": "用一句话介绍北京"}]
        assert req.raw == "用一句话介绍北京"
    assert ok(LATIN1, input_encoding="latin-1").body["messages"][0]["content"] == "caf\xe9"


def test_a_line_that_fails_the_chosen_encoding_too_is_invalid_encoding():
    r = bad(b"ok \x81", "invalid_encoding", input_encoding="gbk")  # a lead byte with nothing after it
    assert "gbk" in r.error_message and unescape(r.request_json) == b"ok \x81"


def test_utf8_bom_is_still_accepted_and_stripped():
    line = json.dumps({"custom_id": "bom-1", "body": {"messages": MSG}}).encode()
    assert ok(b"\xef\xbb\xbf" + line).custom_id == "bom-1"
    assert ok(b"\xef\xbb\xbfhello").body["messages"][0]["content"] == "hello"
    assert ok("\ufeffhello".encode("utf-8-sig"), input_encoding="utf-8-sig").body["messages"][0]["content"] == "hello"


def test_a_str_line_with_a_lone_surrogate_is_a_failure_row_not_an_exception():
    r = bad("hi \ud800 there", "invalid_encoding")
    assert "surrogate" in r.error_message and "\\xed\\xa0\\x80" in r.request_json


@pytest.mark.parametrize("name", ["nope", "", "utf-16", "utf-32", "base64", "rot13", "cp037", "utf-7", 5])
def test_input_encoding_is_checked_when_the_options_are_made(name):
    with pytest.raises(ValueError, match=r"^input_encoding must (name a text codec|be a string)"):
        InputOptions(input_encoding=name)


@pytest.mark.parametrize("name", [None, "utf-8", "UTF8", "gbk", "gb18030", "big5", "shift_jis", "latin-1", "cp1252"])
def test_usual_codecs_are_accepted(name):
    assert InputOptions(input_encoding=name).input_encoding == name


# --- 2. JSON that is not an object; binary lines -----------------------------------------------


@pytest.mark.parametrize(
    "line, kind",
    [("[1, 2, 3]", "an array"), ("null", "null"), ("42", "a number"), ("-1.5e3", "a number"),
     ('"str"', "a string"), ("true", "true/false"), ("  false  ", "true/false"),
     ("[" * 3000 + "]" * 3000, "an array")],
)
def test_json_that_is_not_an_object_is_not_a_prompt_in_auto(line, kind):
    r = bad(line.encode(), "invalid_input")
    assert kind in r.error_message and r.request_json == line
    assert r.custom_id == line_id(line.encode())
    ok(line, input_format="text")  # asked for text: every line is a prompt


@pytest.mark.parametrize(
    "line",
    ["What is 2+2?", "[INST] say hi [/INST]", "42 is the answer", "true story", "null and void", "1. first",
     '"quoted" words', "-", "[1, 2", "línea en español", "第一行\x0b第二行 (a vertical tab from a spreadsheet cell)",
     "some \x1b[1mbold\x1b[0m text that was pasted from a terminal, still mostly text"],
)
def test_plain_text_lines_are_still_prompts_in_auto(line):
    assert ok(line.encode()).body["messages"] == [{"role": "user", "content": line}]


def test_a_gzip_file_without_gz_suffix_never_becomes_prompts():
    payload = b"".join(
        json.dumps({"custom_id": f"g-{i}", "body": {"messages": [{"role": "user", "content": f"p {i}"}]}}).encode()
        + b"\n"
        for i in range(200)
    )
    lines = [x for x in gzip.compress(payload, mtime=0).split(b"\n") if x.strip()]
    rows = [parse_input(x, InputOptions()) for x in lines]
    assert rows and all(isinstance(r, ChatResult) and r.error_type == "invalid_encoding" for r in rows), rows
    assert "gzip" in rows[0].error_message
    assert [unescape(r.request_json) for r in rows] == lines


@pytest.mark.parametrize(
    "data",
    [b"abc\x00def", b"\x00", b"h\x00e\x00l\x00l\x00o\x00", b'{"messages": []}\x00', b"\x01\x02\x03hello",
     b"\x05", b"ab\x07cd\x08ef\x1agh"],
)
def test_binary_lines_that_decode_are_still_invalid_encoding(data):
    r = bad(data, "invalid_encoding")
    assert "binary" in r.error_message
    assert unescape(r.request_json) == data and "\x00" not in r.request_json
    bad(data, "invalid_encoding", input_format="text")
    bad(data, "invalid_encoding", input_encoding="latin-1")
    bad(data.decode("latin-1"), "invalid_encoding")  # a str line too


def test_random_bytes_never_reach_the_server_as_long_lines():
    rng = random.Random(11)
    lines = bytes(rng.randrange(256) for _ in range(300_000)).split(b"\n")
    assert sum(len(x) >= 200 for x in lines) > 300
    for x in lines:
        if len(x) >= 16:
            bad(x, "invalid_encoding")
        if len(x) >= 200:  # latin-1 decodes any bytes: the control characters give them away
            bad(x, "invalid_encoding", input_encoding="latin-1")


# --- 6. ids ---------------------------------------------------------------------------------------


def test_integer_ids_are_their_decimal_string_and_meet_string_ids():
    assert ok(json.dumps({"custom_id": 12, "body": {"messages": MSG}})).custom_id == "12"
    assert ok(json.dumps({"id": 12, "messages": MSG})).custom_id == "12"
    assert ok(json.dumps({"custom_id": -3, "messages": MSG})).custom_id == "-3"
    assert ok(json.dumps({"custom_id": 2**63 - 1, "messages": MSG})).custom_id == str(2**63 - 1)
    assert ok({"custom_id": 12, "messages": MSG}).custom_id == ok({"custom_id": "12", "messages": MSG}).custom_id


@pytest.mark.parametrize(
    "cid",
    ["12.5", "1e3", "12.0", "-0.0", str(2**63), str(2**64 - 1), str(2**64), str(-(2**63) - 1), str(10**30)],
)
def test_numbers_that_cannot_be_exact_ids_are_refused(cid):
    line = '{"custom_id": ' + cid + ', "body": {"messages": [{"role": "user", "content": "a"}]}}'
    r = bad(line, "invalid_id")
    assert r.custom_id == line_id(line.encode()) and r.request_json == line


def test_long_blank_and_bool_ids_are_refused():
    ok(json.dumps({"custom_id": "x" * 512, "messages": MSG}))
    r = bad(json.dumps({"custom_id": "x" * 513, "messages": MSG}), "invalid_id")
    assert "513 characters" in r.error_message and r.custom_id.startswith("line-")
    bad(json.dumps({"custom_id": "   ", "messages": MSG}), "invalid_id")
    for flag in (True, False):
        r = bad(json.dumps({"custom_id": flag, "messages": MSG}), "invalid_input")
        assert r.custom_id.startswith("line-")
    bad({"custom_id": 12.0, "messages": MSG}, "invalid_id")  # a dict item (e.g. a table row) too


@pytest.mark.parametrize(
    "line, want",
    [
        # only a TOP-LEVEL key counts; nested ones and ones inside strings are someone else's
        ('{"x": {"custom_id": "victim"}, "body": ', None),
        ('{"x": ["custom_id", {"custom_id": "victim"}], "body": {', None),
        ('{"note": "say \\"custom_id\\": \\"victim\\"", "body": {', None),
        ('{"x": {"a": 1], "custom_id": "victim", "body": {', None),  # broken nesting: unsure
        ('{"x": "unterminated, "custom_id": "victim", "body": {', None),
        ('{"custom_id": "a", "custom_id": "b", "body": {', None),  # repeated: unsure
        ('{"custom_id": "cut', None),
        ('{"custom_id": 1.5, "body": {', None),
        ('{"id": "b-1", "body": {"messages": [', None),  # batch form: id is not the id
        ('{"id": "c-1", "messages": [{"role": "user", "content": "a"}', None),  # form unknown: unsure
        ('{"custom_id": "ok-1", "body": {"messages": [', "ok-1"),
        ('{"body": {"messages": [], "custom_id": "inner"}, "custom_id": "outer", ', "outer"),
        ('{"custom_id": 42, "body": {', "42"),
        ('{"custom_id": "a\\u00e9\\"q", "body": {', 'a\u00e9"q'),
        ('{"id": "c-2", "messages": [{"role": "user", "content": "a"}], "temperature": NaN}', "c-2"),
        ('{"custom_id": "t-1", "body": {"messages": []}} trailing junk', "t-1"),
    ],
)
def test_the_id_of_a_broken_line_is_salvaged_only_from_its_top_level(line, want):
    r = bad(line, "invalid_json")
    assert r.custom_id == (want or line_id(line.encode()))


def test_chat_format_salvages_id_of_a_cut_line():
    line = '{"id": "c-1", "messages": [{"role": "user", "content": "a"}'
    assert bad(line, "invalid_json", input_format="chat").custom_id == "c-1"
    assert bad(line, "invalid_json", input_format="batch").custom_id == line_id(line.encode())


def test_an_undecodable_line_keeps_its_id_only_when_the_id_itself_decodes():
    assert bad(LATIN1, "invalid_encoding").custom_id == "lat-2"
    broken_id = '{"custom_id": "caf\xe9", "body": {"messages": [{"role": "user", "content": "x"}]}}'.encode("latin-1")
    assert bad(broken_id, "invalid_encoding").custom_id == line_id(broken_id)


def test_the_failure_row_takes_the_id_the_valid_line_would_have():
    # batch form: a top-level "id" is not the request's id, on a good line or a bad one alike
    good = json.dumps({"id": "b-1", "body": {"messages": MSG}})
    assert ok(good).custom_id == derive_id({"messages": MSG})
    broken = json.dumps({"id": "b-1", "body": {"messages": []}})
    assert bad(broken, "no_messages").custom_id == line_id(broken.encode())


# --- 7. Parquet messages --------------------------------------------------------------------------


def test_parquet_struct_messages_lose_their_none_fields():
    pa = pytest.importorskip("pyarrow")
    table = pa.table({
        "prompt": [
            [{"role": "user", "content": "hi"}],
            [{"role": "system", "content": "S", "name": "bob"}, {"role": "user", "content": "yo"}],
        ]
    })
    rows = table.to_pylist()
    assert rows[0]["prompt"][0]["name"] is None  # what pyarrow gives: every field of the struct
    r = ok(row_to_item(rows[0], "prompt"))
    assert r.body == {"messages": [{"role": "user", "content": "hi"}]}
    assert r.custom_id == ok(json.dumps({"messages": [{"role": "user", "content": "hi"}]})).custom_id
    assert ok(row_to_item(rows[1], "prompt")).body["messages"] == [
        {"role": "system", "content": "S", "name": "bob"}, {"role": "user", "content": "yo"}]


def test_parquet_content_parts_lose_their_none_fields_at_every_depth():
    pa = pytest.importorskip("pyarrow")
    parts = [
        [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                      {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u", "detail": "low"}}]}],
    ]
    rows = pa.table({"prompt": parts}).to_pylist()
    assert rows[0]["prompt"][0]["content"][0]["image_url"] is None
    assert ok(row_to_item(rows[0], "prompt")).body["messages"] == parts[0]
    assert ok(row_to_item(rows[1], "prompt")).body["messages"] == parts[1]


def test_a_null_content_is_still_reported_not_hidden():
    item = row_to_item({"prompt": [{"role": "user", "content": None, "name": None}]}, "prompt")
    assert bad(item, "invalid_input").error_message.startswith("messages[0].content must be")


# --- 8. huge lines --------------------------------------------------------------------------------


def _assert_bounded(r: ChatResult, data: bytes) -> None:
    assert f"line of {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}" in r.error_message
    assert f"request_json keeps its first {KIB64} bytes" in r.error_message


def test_request_too_large_keeps_a_bounded_prefix_with_length_and_hash():
    line = json.dumps({"custom_id": "big", "body": {"messages": [{"role": "user", "content": "x" * 200_000}]}})
    r = bad(line.encode(), "request_too_large", max_request_bytes=2048)
    assert r.custom_id == "big"
    assert len(r.request_json.encode()) == KIB64 and line.startswith(r.request_json)
    _assert_bounded(r, line.encode())


def test_the_prefix_is_cut_at_a_character_boundary():
    line = "中" * 40_000  # 120000 bytes of text
    r = bad(line.encode(), "request_too_large", max_request_bytes=2048)
    kept = r.request_json.encode()
    assert KIB64 - 3 < len(kept) <= KIB64 and line.startswith(r.request_json)
    _assert_bounded(r, line.encode())


def test_gbk_line_bound_and_hash_are_of_the_bytes_as_read():
    data = ("中" * 40_000).encode("gbk")
    r = bad(data, "request_too_large", input_encoding="gbk", max_request_bytes=2048)
    assert "中" * 1000 in r.request_json and len(r.request_json.encode()) <= KIB64
    _assert_bounded(r, data)


def test_undecodable_and_broken_huge_lines_are_bounded_the_same_way():
    data = b"\xe9" * 100_000
    r = bad(data, "invalid_encoding")
    assert r.request_json == "\\xe9" * KIB64
    _assert_bounded(r, data)
    line = ('{"custom_id": "j", "body": ' + "[" * 10 + "1" * 100_000).encode()
    r = bad(line, "invalid_json")
    assert r.custom_id == "j" and r.request_json.encode() == line[:KIB64]
    _assert_bounded(r, line)


def test_small_bad_lines_keep_the_whole_line_and_no_note():
    line = '{"custom_id": "x", "body": {"messages": []}}'
    r = bad(line, "no_messages")
    assert r.request_json == line and "sha256" not in r.error_message


# --- the list the README and --resume rely on ------------------------------------------------------


def test_every_input_error_type_is_listed():
    from arkbatch_beam._inputs import INPUT_ERROR_TYPES

    assert {"invalid_encoding", "invalid_id", "invalid_input", "invalid_json", "no_messages", "empty_prompt",
            "request_too_large", "stream_not_allowed", "model_mismatch", "missing_column"} == INPUT_ERROR_TYPES


# --- rows that name their body; requests rebuilt from raw (the dedupe shuffle re-parses raw) -------


def test_failure_rows_name_the_body_when_there_is_one():
    from arkbatch_beam._types import request_hash

    body = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert bad(json.dumps({"custom_id": "t", "body": body}), "request_too_large",
               max_request_bytes=2048).request_sha256 == request_hash(body)
    chat = {"messages": MSG, "stream": True}
    assert bad(json.dumps({"id": 1.5, **chat}), "invalid_id").request_sha256 == request_hash(chat)
    for line in (b"{broken", b"caf\xe9", b"[1]", b'{"body": 3}'):
        assert parse_input(line, InputOptions()).request_sha256 is None


@pytest.mark.parametrize("kw", [{}, {"input_encoding": "gbk"}, {"input_format": "text"}])
def test_a_request_is_rebuilt_from_its_raw_text(kw):
    opts = InputOptions(**kw)
    items = ["中文提示".encode(kw.get("input_encoding", "utf-8")),
             json.dumps({"custom_id": 12, "messages": MSG}).encode(), b"\xef\xbb\xbf  hi  ",
             row_to_item({"p": [{"role": "user", "content": "hi", "name": None}]}, "p")]
    for item in items:
        r = parse_input(item, opts)
        if isinstance(r, ChatRequest):
            assert parse_input(r.raw, opts) == r


def test_a_parquet_id_column_follows_the_json_id_rules() -> None:
    from arkbatch_beam._inputs import InputOptions, parse_input, row_to_item

    opts = InputOptions(input_format="chat", model="m")
    assert parse_input(row_to_item({"q": "hi", "k": 12}, "q", "k"), opts).custom_id == "12"
    bad = parse_input(row_to_item({"q": "hi", "k": 12.5}, "q", "k"), opts)
    assert bad.error_type == "invalid_id"  # before: sent as id "12.5"


def test_a_file_mixing_utf8_and_gbk_lines_is_read_right_with_input_encoding() -> None:
    from arkbatch_beam._inputs import InputOptions, parse_input

    zh = "十字花科植物有哪些"
    def line(cid: str) -> str:
        return json.dumps({"custom_id": cid, "messages": [{"role": "user", "content": zh}]}, ensure_ascii=False)

    utf8, gbk = line("u").encode("utf-8"), line("g").encode("gbk")
    opts = InputOptions(input_encoding="gbk", model="m")
    for line in (utf8, gbk):
        assert parse_input(line, opts).body["messages"][0]["content"] == zh  # before: the UTF-8 line garbled
    assert parse_input(gbk, InputOptions(model="m")).error_type == "invalid_encoding"  # default: never sent
