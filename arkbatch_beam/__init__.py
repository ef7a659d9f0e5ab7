"""arkbatch-beam: very large offline chat-inference jobs on Apache Beam.

Volcengine Ark batch inference or any OpenAI-compatible chat endpoint, through one shared,
bounded, deadline-aware client per worker process.

The client, config, errors and retry policy import without Apache Beam or pyarrow (an asyncio
script that only uses :class:`ArkClient` does not pay for them); ``BatchChatInference``,
``WriteResults`` and ``OUTPUT_SCHEMA`` load them on first use.

Example:
    >>> from arkbatch_beam import ClientConfig, Endpoint
    >>> ClientConfig(Endpoint("ep-20240101-xyz"), max_concurrency=100).max_concurrency
    100
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._attempt import is_loopback, raise_open_file_limit, read_secret, tls_context
from ._client import ArkClient, parse_completion
from ._config import (
    ARK_BASE_URL,
    ARK_BATCH_PATH,
    OPENAI_CHAT_PATH,
    Backoff,
    ClientConfig,
    Endpoint,
    InputOptions,
    Keepalive,
    SinkConfig,
    add_flags,
    flags,
    from_flags,
    option,
    render_options_table,
    validate,
)
from ._errors import (
    ERROR_TYPES,
    ArkError,
    AttemptsExhausted,
    AttemptTimeout,
    Cancelled,
    DeadlineExceeded,
    DuplicateCustomId,
    EndpointError,
    EndpointUnusable,
    InputError,
    InternalError,
    InvalidOutput,
    InvalidRequest,
    InvalidResponse,
    JobError,
    MissingApiKey,
    MissingColumn,
    OptionError,
    RateLimited,
    RequestRejected,
    RetryableError,
    RetryableStatus,
    RetryLimit,
    RuntimeDied,
    TransportError,
    final_on_resume,
    job_error_in,
    render_error_types_table,
)
from ._inputs import derive_id, parse_input, row_to_item
from ._pacing import PushbackGate
from ._progress import JobProgress
from ._retry import Decision, backoff_delay, next_delay, parse_retry_after
from ._types import NAMESPACE, ChatRequest, ChatResult

if TYPE_CHECKING:  # type checkers and IDEs see the real names
    from ._schema import OUTPUT_SCHEMA
    from ._sink import FAILURES_DIR, RESULTS_DIR, CompactOutput, WriteResults, part_files
    from .handler import ArkChatModelHandler
    from .transform import FAILED_TAG, BatchChatInference

# The Beam/pyarrow half of the API, imported on first use (PEP 562). (``import *`` loads it.)
_LAZY = {
    "ArkChatModelHandler": ".handler",
    "BatchChatInference": ".transform",
    "FAILED_TAG": ".transform",
    "WriteResults": "._sink",
    "CompactOutput": "._sink",
    "RESULTS_DIR": "._sink",
    "FAILURES_DIR": "._sink",
    "part_files": "._sink",
    "OUTPUT_SCHEMA": "._schema",
}


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "add_flags",
    "ARK_BASE_URL",
    "ARK_BATCH_PATH",
    "ArkChatModelHandler",
    "ArkClient",
    "ArkError",
    "AttemptsExhausted",
    "AttemptTimeout",
    "Backoff",
    "backoff_delay",
    "BatchChatInference",
    "Cancelled",
    "ChatRequest",
    "ChatResult",
    "ClientConfig",
    "CompactOutput",
    "DeadlineExceeded",
    "Decision",
    "derive_id",
    "DuplicateCustomId",
    "Endpoint",
    "EndpointError",
    "EndpointUnusable",
    "ERROR_TYPES",
    "FAILED_TAG",
    "FAILURES_DIR",
    "final_on_resume",
    "flags",
    "from_flags",
    "InputError",
    "InputOptions",
    "InternalError",
    "InvalidOutput",
    "InvalidRequest",
    "InvalidResponse",
    "is_loopback",
    "job_error_in",
    "JobError",
    "JobProgress",
    "Keepalive",
    "MissingApiKey",
    "MissingColumn",
    "NAMESPACE",
    "next_delay",
    "OPENAI_CHAT_PATH",
    "option",
    "OptionError",
    "OUTPUT_SCHEMA",
    "parse_completion",
    "parse_input",
    "parse_retry_after",
    "part_files",
    "PushbackGate",
    "raise_open_file_limit",
    "RateLimited",
    "read_secret",
    "render_error_types_table",
    "render_options_table",
    "RequestRejected",
    "RESULTS_DIR",
    "RetryableError",
    "RetryableStatus",
    "RetryLimit",
    "row_to_item",
    "RuntimeDied",
    "SinkConfig",
    "tls_context",
    "TransportError",
    "validate",
    "WriteResults",
]
