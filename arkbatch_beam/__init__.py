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

from ._client import ArkClient, MissingApiKey, parse_completion
from ._config import (
    ARK_BASE_URL,
    ARK_BATCH_PATH,
    OPENAI_CHAT_PATH,
    Backoff,
    ClientConfig,
    Endpoint,
)
from ._errors import (
    ArkError,
    AttemptTimeout,
    DeadlineExceeded,
    EndpointError,
    InvalidResponse,
    RateLimited,
    RequestRejected,
    RetryableError,
    RetryableStatus,
    TransportError,
)
from ._inputs import InputOptions, derive_id, parse_input
from ._pacing import PushbackGate
from ._retry import Decision, backoff_delay, next_delay, parse_retry_after
from ._types import ChatRequest, ChatResult

if TYPE_CHECKING:  # type checkers and IDEs see the real names
    from ._schema import OUTPUT_SCHEMA
    from ._sink import WriteResults
    from .transform import BatchChatInference

# The Beam/pyarrow half of the API, imported on first use (PEP 562). (``import *`` loads it.)
_LAZY = {"BatchChatInference": ".transform", "WriteResults": "._sink", "OUTPUT_SCHEMA": "._schema"}


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
    "ARK_BASE_URL",
    "ARK_BATCH_PATH",
    "ArkClient",
    "ArkError",
    "AttemptTimeout",
    "Backoff",
    "BatchChatInference",
    "ChatRequest",
    "ChatResult",
    "ClientConfig",
    "DeadlineExceeded",
    "Decision",
    "Endpoint",
    "EndpointError",
    "InputOptions",
    "InvalidResponse",
    "MissingApiKey",
    "OPENAI_CHAT_PATH",
    "OUTPUT_SCHEMA",
    "PushbackGate",
    "RateLimited",
    "RequestRejected",
    "RetryableError",
    "RetryableStatus",
    "TransportError",
    "WriteResults",
    "backoff_delay",
    "derive_id",
    "next_delay",
    "parse_completion",
    "parse_input",
    "parse_retry_after",
]
