"""ArkChatModelHandler under Beam's RunInference, on the DirectRunner against the fake server."""

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.testing.util import assert_that, equal_to

from arkbatch_beam import ArkChatModelHandler, ChatResult, Endpoint, RequestRejected
from arkbatch_beam.testing import Fault

from .conftest import KEY_ENV

PROMPTS = [f"question {i}" for i in range(40)]
BAD = {"question 3", "question 17", "question 31"}


def handler(server, **kw):
    return ArkChatModelHandler(Endpoint("ep-test", base_url=server.base_url, api_key_env=KEY_ENV),
                               max_concurrency=16, **kw)


def hostile(server):
    server.latency = 0.02
    for prompt in BAD:
        server.add_fault(Fault.bad_request("bad prompt (fake)", match=prompt, times=-1))


def _content(prediction):
    assert isinstance(prediction, PredictionResult)
    assert isinstance(prediction.inference, ChatResult)
    return prediction.example, prediction.inference.content


def test_only_the_failed_elements_are_dead_letters(server):
    hostile(server)
    with beam.Pipeline() as p:
        good, dlq = (p | beam.Create(PROMPTS)
                     | RunInference(handler(server, min_batch_size=8)).with_exception_handling())
        assert_that(good | beam.Map(_content),
                    equal_to([(q, "echo: " + q) for q in PROMPTS if q not in BAD]), label="good")
        bad = dlq.failed_inferences | beam.Map(lambda rec: (tuple(rec[0]), rec[1][0].__name__))
        assert_that(bad, equal_to([((q,), "RequestRejected") for q in BAD]), label="bad")
    for q in PROMPTS:
        assert server.ok_by_key[q] == (0 if q in BAD else 1), q
    assert server.peak_in_flight > 1  # a batch is sent at once


def test_keyed_model_handler_puts_single_elements_in_the_dead_letters(server):
    hostile(server)
    keyed = [(f"k{i}", q) for i, q in enumerate(PROMPTS[:20])]
    with beam.Pipeline() as p:
        good, dlq = (p | beam.Create(keyed)
                     | RunInference(KeyedModelHandler(handler(server))).with_exception_handling())
        assert_that(good | beam.Map(lambda kv: (kv[0], kv[1].inference.content)),
                    equal_to([(k, "echo: " + q) for k, q in keyed if q not in BAD]), label="good")
        assert_that(dlq.failed_inferences | beam.Map(lambda rec: list(rec[0])),
                    equal_to([[(k, q)] for k, q in keyed if q in BAD]), label="bad")
    for _, q in keyed:
        assert server.ok_by_key[q] == (0 if q in BAD else 1), q


def test_key_value_elements_keep_whole_batches_in_flight(server):
    hostile(server)
    keyed = [(i, q) for i, q in enumerate(PROMPTS)]
    with beam.Pipeline() as p:
        good, dlq = (p | beam.Create(keyed)
                     | RunInference(handler(server, min_batch_size=8)).with_exception_handling())
        assert_that(good | beam.Map(lambda kv: (kv[0], kv[1].inference.content)),
                    equal_to([(k, "echo: " + q) for k, q in keyed if q not in BAD]), label="good")
        assert_that(dlq.failed_inferences | beam.Map(lambda rec: list(rec[0])),
                    equal_to([[(k, q)] for k, q in keyed if q in BAD]), label="bad")
    assert server.peak_in_flight > 1


def test_without_exception_handling_a_failure_stops_the_pipeline(server):
    hostile(server)
    with pytest.raises(Exception, match="bad prompt") as info:
        with beam.Pipeline() as p:
            _ = p | beam.Create(["question 3"]) | RunInference(handler(server))
    assert "RequestRejected" in repr(info.value) or isinstance(info.value, RequestRejected)


def test_on_failure_return_gives_failed_rows_as_predictions(server):
    hostile(server)
    with beam.Pipeline() as p:
        out = (p | beam.Create(PROMPTS[:10]) | RunInference(handler(server, on_failure="return"))
               | beam.Map(lambda r: (r.example, r.inference.status, r.inference.error_type)))
        assert_that(out, equal_to([(q, "failed", "rejected") if q in BAD else (q, "ok", None)
                                   for q in PROMPTS[:10]]))


def test_each_element_form_and_the_metrics(server):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    elements = [
        "a prompt",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "messages"}],
        [{"role": "user", "content": [{"type": "text", "text": "what is this"}, image]}],
        {"messages": [{"role": "user", "content": "a body"}], "temperature": 0},
        {"custom_id": "b1", "body": {"messages": [{"role": "user", "content": "batch form"}]}},
    ]
    with beam.Pipeline() as p:
        out = (p | beam.Create(elements) | RunInference(handler(server), inference_args={"max_tokens": 16})
               | beam.Map(lambda r: r.inference.content))
        assert_that(out, equal_to(["echo: a prompt", "echo: messages", "echo: what is this", "echo: a body",
                                   "echo: batch form"]))
    result = p.result
    counters = {c.key.metric.name: c.committed for c in
                result.metrics().query(MetricsFilter().with_namespace("ArkChatModelHandler"))["counters"]}
    assert counters["ok"] == 5 and counters["requests"] == 5
    assert counters.get("failed", 0) == 0
    # Every token kind (before: only prompt and completion tokens were counted here).
    assert counters["total_tokens"] == counters["prompt_tokens"] + counters["completion_tokens"] > 0
    assert counters["num_inferences"] == 5  # RunInference's own metrics share the namespace


def test_rows_with_a_template(server):
    rows = [beam.Row(id=1, text="first"), beam.Row(id=2, text=None)]
    with beam.Pipeline() as p:
        out = (p | beam.Create(rows)
               | RunInference(handler(server, template="Summarise: {text}", keep_columns="id",
                                      on_failure="return"))
               | beam.Map(lambda r: (r.inference.custom_id, r.inference.content or r.inference.error_type,
                                     r.inference.columns_json)))
        assert_that(out, equal_to([("1", "echo: Summarise: first", '{"id":1}'),
                                   ("2", "missing_column", '{"id":2}')]))


def test_reasoning_content_is_its_own_column(server):
    h = ArkChatModelHandler(Endpoint("ep-thinking", base_url=server.base_url, api_key_env=KEY_ENV),
                            thinking="enabled")
    with beam.Pipeline() as p:
        out = (p | beam.Create(["why"]) | RunInference(h)
               | beam.Map(lambda r: (r.inference.content, r.inference.reasoning_content)))
        assert_that(out, equal_to([("echo: why", "thinking about: why")]))


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="on_failure"):
        ArkChatModelHandler("ep", on_failure="ignore")
    with pytest.raises(TypeError, match="unknown options"):
        ArkChatModelHandler("ep", max_concurency=3)
