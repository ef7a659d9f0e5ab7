import json

import pytest

from arkbatch_beam import ChatRequest, ChatResult, InputOptions, derive_id, parse_input

MSG = [{"role": "user", "content": "hello"}]


def ok(item, **kw):
    out = parse_input(item, InputOptions(**kw))
    assert isinstance(out, ChatRequest), out
    return out


def bad(item, **kw):
    out = parse_input(item, InputOptions(**kw))
    assert isinstance(out, ChatResult) and out.status == "failed", out
    return out


def test_batch_jsonl_line():
    line = json.dumps({"custom_id": "a1", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": MSG, "temperature": 0.2}})
    r = ok(line)
    assert r.custom_id == "a1" and r.body["temperature"] == 0.2 and r.raw == line


def test_chat_jsonl_line_takes_id_and_keeps_other_fields():
    r = ok(json.dumps({"id": 7, "messages": MSG, "max_tokens": 5}))
    assert r.custom_id == "7" and r.body == {"messages": MSG, "max_tokens": 5}


def test_plain_text_with_system_prompt():
    r = ok("  What is Beam?  ", system="Be brief.")
    assert r.body["messages"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is Beam?"}]


def test_dict_input():
    assert ok({"custom_id": "d", "body": {"messages": MSG}}).custom_id == "d"


def test_derived_ids_are_stable_and_content_based():
    a = ok(json.dumps({"messages": MSG, "model": "m"}))
    b = ok(json.dumps({"model": "m", "messages": MSG}))
    c = ok(json.dumps({"model": "m2", "messages": MSG}))
    assert a.custom_id == b.custom_id == derive_id({"messages": MSG, "model": "m"})
    assert a.custom_id != c.custom_id
    assert ok("same prompt").custom_id == ok("same prompt").custom_id


@pytest.mark.parametrize(
    "line, error_type",
    [
        ('{"custom_id": "x", "body": ', "invalid_json"),
        ('{"custom_id": "x", "body": {"model": "m"}}', "no_messages"),
        ('{"custom_id": "x", "body": {"messages": []}}', "no_messages"),
        ('{"custom_id": "x", "body": {"messages": "hi"}}', "invalid_input"),
        ('{"custom_id": "x", "body": {"messages": [{"role": "wizard", "content": "hi"}]}}',
         "invalid_input"),
        ('{"custom_id": "x", "body": {"messages": [{"role": "user", "content": 5}]}}',
         "invalid_input"),
        ('{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "  "}]}}',
         "empty_prompt"),
        ('{"custom_id": "x", "body": 3}', "invalid_input"),
        ('{"custom_id": ["x"], "body": {"messages": [{"role": "user", "content": "a"}]}}',
         "invalid_input"),
        ('{"custom_id": "x", "body": {"stream": true, "messages": [{"role": "user", "content": "a"}]}}',
         "stream_not_allowed"),
    ],
)
def test_bad_lines_become_failure_rows_keeping_the_line(line, error_type):
    r = bad(line)
    assert r.error_type == error_type and r.error_message
    assert r.request_json == line
    if '"custom_id": "x"' in line:
        assert r.custom_id == "x"


def test_stream_is_fine_off_the_batch_path():
    ok(json.dumps({"messages": MSG, "stream": True}), batch_path=False)


def test_size_limit_and_strict_model():
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]})
    assert bad(big, max_request_bytes=2048).error_type == "request_too_large"
    line = json.dumps({"custom_id": "m", "body": {"model": "other", "messages": MSG}})
    assert bad(line, model="mine", strict_model=True).error_type == "model_mismatch"
    ok(line, model="mine")


@pytest.mark.parametrize(
    "kw, text",
    [({"input_format": "xml"}, "input_format must be one of"),
     ({"max_request_bytes": 10}, "max_request_bytes must be in 1024..67108864"),
     ({"strict_model": True}, "strict_model needs model")],
)
def test_bad_options_fail_fast(kw, text):
    with pytest.raises(ValueError, match=text):
        InputOptions(**kw)


def test_json_array_is_rejected_when_format_is_json():
    assert bad("[1, 2]", input_format="chat").error_type == "invalid_input"
    assert bad("plain words", input_format="batch").error_type == "invalid_json"


def test_table_rows_become_requests_or_failures():
    from arkbatch_beam._inputs import row_to_item

    r = ok(row_to_item({"prompt": "hi", "key": 12}, "prompt", "key", system="S"))
    assert r.custom_id == "12" and r.body["messages"][0] == {"role": "system", "content": "S"}
    msgs = [{"role": "user", "content": "x"}]
    assert ok(row_to_item({"prompt": msgs}, "prompt")).body["messages"] == msgs
    assert bad(row_to_item({"prompt": None, "key": "k"}, "prompt", "key")).error_type == "no_messages"
    assert bad(row_to_item({"prompt": "", "key": "k"}, "prompt", "key")).custom_id == "k"
