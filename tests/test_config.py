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


# --- one definition per option: the CLI's flags and the README's table come from it ---------------


def test_readme_option_table_is_rendered_from_the_config_fields():
    from pathlib import Path

    from arkbatch_beam import render_options_table
    from pipelines import batch_chat

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- options:start -->", "<!-- options:end -->"
    assert start in text and end in text, f"README.md needs the option table between {start} and {end}"
    table = text.split(start, 1)[1].split(end, 1)[0].strip("\n") + "\n"
    assert table == render_options_table(*batch_chat.CONFIG_CLASSES), "paste render_options_table(...) into README"


def test_every_flag_is_generated_from_a_config_field_with_its_default_and_range():
    from arkbatch_beam import ClientConfig, InputOptions, SinkConfig, flags
    from pipelines import batch_chat

    parser = batch_chat.build_parser()
    ours = {a.dest for a in parser._actions if a.dest != "help"}
    generated = {f.name for cls in batch_chat.CONFIG_CLASSES for f in flags(cls)}
    assert ours == generated  # no flag is written by hand
    ns = parser.parse_args(["--input", "a", "--output", "o"])
    # Defaults come from the config classes themselves (one place), e.g. part sizes and the cap.
    assert ns.max_concurrency == ClientConfig("ep").max_concurrency
    assert (ns.part_rows, ns.part_seconds) == (SinkConfig().part_rows, SinkConfig().part_seconds)
    assert ns.max_request_bytes == InputOptions().max_request_bytes
    helps = {a.dest: a.help for a in parser._actions}
    assert "1..10000" in helps["max_concurrency"] and "default 500" in helps["max_concurrency"]
    assert "1..259200 s" in helps["timeout"] and "(0: off)" in helps["tcp_keepalive_idle"]


def test_a_nested_option_error_names_its_flag():
    from arkbatch_beam import OptionError
    from pipelines import batch_chat

    ns = batch_chat.build_parser().parse_args(["--input", "a", "--output", "o", "--model", "m",
                                                "--backoff_max", "0.1"])
    with pytest.raises(batch_chat.UsageError, match=r"^--backoff_max must be in 0.5..3600 s"):
        batch_chat.configure(ns)
    ns.backoff_max, ns.tcp_keepalive_count = 8.0, 99
    with pytest.raises(batch_chat.UsageError, match=r"^--tcp_keepalive_count must be in 1..50"):
        batch_chat.configure(ns)
    ns.tcp_keepalive_count, ns.tcp_keepalive_idle = 4, 0  # 0 = off
    assert batch_chat.configure(ns).config.keepalive is None
    with pytest.raises(OptionError) as info:
        ClientConfig("ep", max_attempts=-1)
    assert info.value.name == "max_attempts" and isinstance(info.value, ValueError)


def test_batch_chat_inference_takes_any_client_config_field_as_an_override():
    from arkbatch_beam import BatchChatInference, Keepalive

    t = BatchChatInference("ep-1", max_concurrency=7, max_attempts=3, keepalive=Keepalive(idle=30))
    assert (t.config.max_concurrency, t.config.max_attempts, t.config.keepalive.idle) == (7, 3, 30)
    base = ClientConfig(Endpoint("ep-2"), timeout=60)
    t = BatchChatInference(base, max_concurrency=9)
    assert (t.config.endpoint.model, t.config.timeout, t.config.max_concurrency) == ("ep-2", 60, 9)
    with pytest.raises(TypeError, match="max_concurency"):
        BatchChatInference("ep", max_concurency=9)


def test_the_public_api_is_pinned():
    import arkbatch_beam

    # A change here is a change of the public API: say so in the README and the changelog.
    assert sorted(arkbatch_beam.__all__) == sorted([
        "ARK_BASE_URL", "ARK_BATCH_PATH", "ArkChatModelHandler", "ArkClient", "ArkError", "AttemptTimeout",
        "AttemptsExhausted",
        "Backoff", "BatchChatInference", "Cancelled", "ChatRequest", "ChatResult", "ClientConfig",
        "CompactOutput", "DeadlineExceeded", "Decision", "DuplicateCustomId", "ERROR_TYPES", "Endpoint",
        "EndpointError", "EndpointUnusable", "FAILED_TAG", "FAILURES_DIR", "InputError", "InputOptions",
        "InternalError", "InvalidOutput", "InvalidRequest", "InvalidResponse", "JobError", "JobProgress", "Keepalive",
        "MissingApiKey", "MissingColumn", "NAMESPACE", "OPENAI_CHAT_PATH", "OUTPUT_SCHEMA", "OptionError",
        "PushbackGate",
        "RESULTS_DIR", "RateLimited", "RequestRejected", "RetryLimit", "RetryableError", "RetryableStatus",
        "RuntimeDied", "SinkConfig", "TransportError", "WriteResults", "add_flags", "backoff_delay",
        "derive_id", "final_on_resume", "flags", "from_flags", "job_error_in", "next_delay", "option",
        "is_loopback", "parse_completion", "parse_input", "parse_retry_after", "part_files", "raise_open_file_limit",
        "read_secret",
        "render_error_types_table", "render_options_table", "row_to_item", "tls_context", "validate",
    ])
    for name in arkbatch_beam.__all__:
        assert getattr(arkbatch_beam, name) is not None, name
