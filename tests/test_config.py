import pickle

import pytest

from arkbatch_beam import ARK_BASE_URL, Backoff, ClientConfig, Endpoint


def test_ark_defaults_from_a_plain_endpoint_id():
    cfg = ClientConfig("ep-123")
    assert cfg.endpoint.model == "ep-123"
    assert cfg.endpoint.url == ARK_BASE_URL + "/batch/chat/completions"
    assert cfg.endpoint.api_key_env == "ARK_API_KEY"
    assert cfg.timeout == 24 * 3600
    assert (cfg.backoff.initial, cfg.backoff.factor, cfg.backoff.max_delay) == (0.5, 2.0, 8.0)


@pytest.mark.parametrize(
    "kw, field, accepted",
    [
        ({"max_concurrency": 0}, "max_concurrency", "1..10000"),
        ({"max_concurrency": 10_001}, "max_concurrency", "1..10000"),
        ({"max_concurrency": 2.5}, "max_concurrency", "1..10000"),
        ({"timeout": 0.5}, "timeout", "1..259200"),
        ({"timeout": 72 * 3600 + 1}, "timeout", "1..259200"),
        ({"attempt_timeout": 0}, "attempt_timeout", ".."),
        ({"connect_timeout": 0}, "connect_timeout", "0.1..300"),
        ({"max_requests_per_second": 0}, "max_requests_per_second", "0.01..100000"),
        ({"max_requests_per_second": float("nan")}, "max_requests_per_second", "0.01..100000"),
    ],
)
def test_out_of_range_values_name_field_and_range(kw, field, accepted):
    with pytest.raises(ValueError) as ei:
        ClientConfig("ep", **kw)
    assert field in str(ei.value) and accepted in str(ei.value)


def test_backoff_validation_names_the_field():
    with pytest.raises(ValueError, match=r"backoff.max_delay must be in 0.5\.\.3600"):
        Backoff(initial=0.5, max_delay=0.1)
    with pytest.raises(ValueError, match="backoff.jitter"):
        Backoff(jitter=2)


def test_endpoint_validation():
    with pytest.raises(ValueError, match="base_url"):
        Endpoint("m", base_url="ftp://x")
    with pytest.raises(ValueError, match="path"):
        Endpoint("m", path="chat/completions")
    with pytest.raises(ValueError, match="Authorization"):
        Endpoint("m", headers={"Authorization": "Bearer x"})


def test_configs_are_frozen_hashable_and_picklable():
    cfg = ClientConfig(Endpoint("m", headers={"X-A": "1"}), max_concurrency=7)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert hash(cfg) == hash(ClientConfig(Endpoint("m", headers={"X-A": "1"}), max_concurrency=7))
    with pytest.raises(AttributeError):
        cfg.max_concurrency = 8  # type: ignore[misc]


def test_openai_compatible_path_is_configuration():
    ep = Endpoint.openai_compatible("llama", "http://127.0.0.1:8000/v1/")
    assert ep.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert not ep.is_batch and Endpoint("x").is_batch


def test_describe_has_no_key(monkeypatch):
    monkeypatch.setenv("ARK_API_KEY", "sk-should-not-appear")
    text = repr(ClientConfig("ep").describe()) + repr(ClientConfig("ep"))
    assert "sk-should-not-appear" not in text
