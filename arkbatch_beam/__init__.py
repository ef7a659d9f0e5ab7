"""arkbatch-beam: very large offline chat-inference jobs on Apache Beam.

Volcengine Ark batch inference or any OpenAI-compatible chat endpoint, through one shared,
bounded, deadline-aware client per worker process.

Example:
    >>> from arkbatch_beam import ClientConfig, Endpoint
    >>> ClientConfig(Endpoint("ep-20240101-xyz"), max_concurrency=100).max_concurrency
    100
"""

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
from ._schema import OUTPUT_SCHEMA
from ._sink import WriteResults
from ._types import ChatRequest, ChatResult
from .transform import BatchChatInference

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
