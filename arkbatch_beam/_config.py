"""Frozen, validated, picklable configuration values.

Options become config once, at the edge (the CLI or the transform's constructor); every
module below works with these immutable values. Out-of-range values raise ``ValueError``
naming the field and the accepted range. The API key itself is never part of a config: only
the *name* of the environment variable that holds it.

Example:
    >>> from arkbatch_beam import Endpoint, ClientConfig
    >>> cfg = ClientConfig(Endpoint("ep-2024-demo"), max_concurrency=200, timeout=3600)
    >>> cfg.endpoint.url
    'https://ark.cn-beijing.volces.com/api/v3/batch/chat/completions'
    >>> ClientConfig(Endpoint("ep"), max_concurrency=0)
    Traceback (most recent call last):
    ...
    ValueError: max_concurrency must be in 1..10000, got 0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

ARK_BASE_URL = "https://ark.cn-beijing.volces.com/api/v3"
ARK_BATCH_PATH = "/batch/chat/completions"
OPENAI_CHAT_PATH = "/chat/completions"
DEFAULT_API_KEY_ENV = "ARK_API_KEY"

MAX_CONCURRENCY_RANGE = (1, 10_000)
TIMEOUT_RANGE = (1.0, 72 * 3600.0)
DEFAULT_TIMEOUT = 24 * 3600.0
DEFAULT_MAX_CONCURRENCY = 500


def _check_range(name: str, value: float, lo: float, hi: float, unit: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in {lo:g}..{hi:g}{unit}, got {value!r}")
    if math.isnan(value) or not lo <= value <= hi:
        raise ValueError(f"{name} must be in {lo:g}..{hi:g}{unit}, got {value!r}")


# Header names that carry credentials: their values must come from the worker's environment
# (Endpoint.secret_headers), never from the config that is pickled into the pipeline graph.
_SECRET_HEADER_WORDS = ("auth", "key", "token", "secret", "password", "cookie", "credential", "signature")


def _is_secret_header(name: str) -> bool:
    low = name.lower()
    return any(word in low for word in _SECRET_HEADER_WORDS)


def _freeze_headers(
    headers: Mapping[str, str] | tuple[tuple[str, str], ...] | None, field: str = "headers"
) -> tuple:
    if not headers:
        return ()
    items = headers.items() if isinstance(headers, Mapping) else headers
    out = []
    for k, v in items:
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise ValueError(f"{field} must map str to str, got {k!r}: {type(v).__name__}")
        if k.lower() == "authorization":
            raise ValueError(
                f"{field} must not carry Authorization: the key is read from the "
                "environment variable named by api_key_env"
            )
        if field == "headers" and _is_secret_header(k):
            raise ValueError(
                f"headers must not carry credentials ({k!r}): they would be pickled into the "
                f"pipeline graph; name the environment variable that holds it instead, "
                f"secret_headers={{{k!r}: 'MY_ENV_VAR'}}"
            )
        out.append((k, v))
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class Keepalive:
    """TCP keepalive on every client socket, so a connection dropped silently is noticed.

    Ark may hold a batch request for minutes to hours; NAT gateways and load balancers drop
    idle connections without a FIN (Cloud NAT after 1,200 s). With keepalive the kernel probes
    an idle connection after ``idle`` seconds, every ``interval`` seconds, and gives up after
    ``count`` unanswered probes: the attempt fails as a connection error and is retried.

    Example:
        >>> k = Keepalive()
        >>> (k.idle, k.interval, k.count)
        (60, 15, 4)
    """

    idle: int = 60
    interval: int = 15
    count: int = 4

    def __post_init__(self) -> None:
        _check_int("keepalive.idle", self.idle, 1, 7200, " s")
        _check_int("keepalive.interval", self.interval, 1, 600, " s")
        _check_int("keepalive.count", self.count, 1, 50)


def _check_int(name: str, value: int, lo: int, hi: int, unit: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer in {lo}..{hi}{unit}, got {value!r}")
    _check_range(name, value, lo, hi, unit)


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter for retries that carry no ``Retry-After``.

    The n-th retry waits ``min(max_delay, initial * factor**(n-1))``, scaled by a random
    factor in ``[1 - jitter, 1]`` ("equal jitter" when ``jitter=0.5``).

    Example:
        >>> Backoff(initial=0.5, factor=2.0, max_delay=8.0, jitter=0.5).initial
        0.5
    """

    initial: float = 0.5
    factor: float = 2.0
    max_delay: float = 8.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        _check_range("backoff.initial", self.initial, 0.001, 3600.0, " s")
        _check_range("backoff.factor", self.factor, 1.0, 10.0)
        _check_range("backoff.max_delay", self.max_delay, self.initial, 3600.0, " s")
        _check_range("backoff.jitter", self.jitter, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where requests go and how they authenticate.

    Args:
        model: Ark endpoint id (``ep-...``) or model name; used when a request body has no
            ``model``. ``None`` means every request must carry its own.
        base_url: API root, default Ark's ``https://ark.cn-beijing.volces.com/api/v3``.
        path: ``/batch/chat/completions`` (Ark batch) or ``/chat/completions`` (any
            OpenAI-compatible server).
        api_key_env: name of the environment variable holding the key, read in the worker.
            An empty string sends no ``Authorization`` header (local servers).
        headers: extra request headers (never ``Authorization`` or another credential: a
            header whose name says key, token, secret, auth, password or cookie is refused).
        secret_headers: headers whose *values* are read from the environment in the worker,
            as ``{header name: environment variable}``, e.g. ``{"X-Api-Key": "MY_KEY"}``; like
            the key they never enter the pickled config, the graph or the display data.

    Example:
        >>> Endpoint("gpt-x", base_url="http://127.0.0.1:8000/v1", path="/chat/completions").url
        'http://127.0.0.1:8000/v1/chat/completions'
    """

    model: str | None = None
    base_url: str = ARK_BASE_URL
    path: str = ARK_BATCH_PATH
    api_key_env: str = DEFAULT_API_KEY_ENV
    headers: tuple[tuple[str, str], ...] = ()
    secret_headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"model must be a non-empty string or None, got {self.model!r}")
        if not isinstance(self.base_url, str) or not self.base_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")
        if not isinstance(self.api_key_env, str):
            raise ValueError("api_key_env must be an environment variable name (str)")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        object.__setattr__(self, "headers", _freeze_headers(self.headers))
        object.__setattr__(self, "secret_headers", _freeze_headers(self.secret_headers, "secret_headers"))
        clash = {k.lower() for k, _ in self.headers} & {k.lower() for k, _ in self.secret_headers}
        if clash:
            raise ValueError(f"headers and secret_headers both set {sorted(clash)}")

    @property
    def url(self) -> str:
        """The full URL requests are POSTed to."""
        return self.base_url + self.path

    @property
    def is_batch(self) -> bool:
        """True on Ark's batch path, where streaming is not allowed."""
        return "/batch/" in self.path

    @classmethod
    def openai_compatible(
        cls, model: str | None, base_url: str, *, api_key_env: str = "OPENAI_API_KEY", **kw: Any
    ) -> Endpoint:
        """An endpoint for any OpenAI-compatible server (path ``/chat/completions``).

        Example:
            >>> Endpoint.openai_compatible("m", "http://127.0.0.1:8000/v1").path
            '/chat/completions'
        """
        return cls(model, base_url=base_url, path=OPENAI_CHAT_PATH, api_key_env=api_key_env, **kw)


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Everything the shared client needs; the key to the per-process runtime registry.

    Args:
        endpoint: an :class:`Endpoint`, or an Ark endpoint id as a plain string.
        max_concurrency: most requests in flight from one worker process (Ark's
            ``workerNum``), 1..10000.
        timeout: per-request deadline in seconds, counted from the request's first send,
            1 s..72 h (default 24 h). Retries, pauses and queueing all happen inside it.
        attempt_timeout: optional bound on one attempt, seconds; default ``None`` lets an
            attempt run until the deadline (the server may queue a batch request for hours).
        connect_timeout: TCP/TLS connect bound, seconds (0.1..300).
        backoff: :class:`Backoff` for retries without ``Retry-After``.
        max_invalid_responses: how many 200 answers with unparseable JSON a request may
            get before it fails (1..20).
        progress_seconds: every this-many seconds each worker process logs one progress
            line (done, ok, failed, in flight, queued, rate, paused) at INFO on the
            ``arkbatch_beam`` logger; 0 turns it off (0 or 1..86400, default 30).
        max_attempts: most attempts that fail without the server announcing a wait (5xx,
            resets, timeouts, invalid answers), 0..10000, default 20; a 429/503 that names a
            ``Retry-After`` and an announced pause do not count (the server asked us to wait).
            ``0`` means "until the deadline" (Ark's SDK). The failure row's ``error_type``
            says which limit ended a request: ``attempts_exhausted`` or ``deadline_exceeded``.
        min_attempt_seconds: no attempt starts with less than this much of the deadline left
            (0..3600, default 1 s; at most half of ``timeout`` is used): the request ends as
            ``deadline_exceeded`` instead of paying for an answer it would throw away.
        keepalive: TCP keepalive for every connection (:class:`Keepalive`), or ``None``
            to leave the operating system's default (usually off).
        max_requests_per_second: optional bound on how many requests (attempts, retries
            included) one worker process starts per second per model, 0.01..100000, on
            average (bursts of at most 0.1 s worth); a fleet's share of a quota: e.g.
            10,000 RPM over 20 processes -> 8.3. ``None`` (default): only
            ``max_concurrency`` and the server's pushback bound the rate.

    Example:
        >>> ClientConfig("ep-123").endpoint.model
        'ep-123'
    """

    endpoint: Endpoint
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    timeout: float = DEFAULT_TIMEOUT
    attempt_timeout: float | None = None
    connect_timeout: float = 10.0
    backoff: Backoff = dataclasses.field(default_factory=Backoff)
    max_invalid_responses: int = 3
    progress_seconds: float = 30.0
    max_requests_per_second: float | None = None
    max_attempts: int = 20
    min_attempt_seconds: float = 1.0
    keepalive: Keepalive | None = dataclasses.field(default_factory=Keepalive)

    def __post_init__(self) -> None:
        if isinstance(self.endpoint, str):
            object.__setattr__(self, "endpoint", Endpoint(self.endpoint))
        if not isinstance(self.endpoint, Endpoint):
            raise ValueError(f"endpoint must be an Endpoint or a str, got {self.endpoint!r}")
        if isinstance(self.max_concurrency, bool) or not isinstance(self.max_concurrency, int):
            raise ValueError(
                f"max_concurrency must be an integer in 1..10000, got {self.max_concurrency!r}"
            )
        _check_range("max_concurrency", self.max_concurrency, *MAX_CONCURRENCY_RANGE)
        _check_range("timeout", self.timeout, *TIMEOUT_RANGE, " s")
        if self.attempt_timeout is not None:
            _check_range("attempt_timeout", self.attempt_timeout, 0.01, TIMEOUT_RANGE[1], " s")
        _check_range("connect_timeout", self.connect_timeout, 0.1, 300.0, " s")
        if not isinstance(self.backoff, Backoff):
            raise ValueError(f"backoff must be a Backoff, got {self.backoff!r}")
        _check_range("max_invalid_responses", self.max_invalid_responses, 1, 20)
        if self.progress_seconds != 0:
            _check_range("progress_seconds", self.progress_seconds, 1, 86400, " s (or 0: off)")
        if self.max_requests_per_second is not None:
            _check_range("max_requests_per_second", self.max_requests_per_second, 0.01, 100_000.0)
        _check_int("max_attempts", self.max_attempts, 0, 10_000, " (0: until the deadline)")
        _check_range("min_attempt_seconds", self.min_attempt_seconds, 0.0, 3600.0, " s")
        if self.keepalive is not None and not isinstance(self.keepalive, Keepalive):
            raise ValueError(f"keepalive must be a Keepalive or None, got {self.keepalive!r}")

    @property
    def min_attempt_window(self) -> float:
        """``min_attempt_seconds``, at most half the timeout (what the client applies)."""
        return min(self.min_attempt_seconds, self.timeout / 2.0)

    def describe(self) -> dict[str, Any]:
        """A flat, key-free description (for display_data and logs)."""
        return {
            "model": self.endpoint.model or "",
            "url": self.endpoint.url,
            "api_key_env": self.endpoint.api_key_env,
            "max_concurrency": self.max_concurrency,
            "timeout_s": self.timeout,
            "attempt_timeout_s": self.attempt_timeout or 0.0,
            "connect_timeout_s": self.connect_timeout,
            "max_requests_per_second": self.max_requests_per_second or 0.0,
            "max_attempts": self.max_attempts,
            "min_attempt_seconds": self.min_attempt_seconds,
            "tcp_keepalive": (
                f"idle {self.keepalive.idle}s interval {self.keepalive.interval}s x{self.keepalive.count}"
                if self.keepalive else "off"
            ),
            "secret_headers": ",".join(f"{k}<-${v}" for k, v in self.endpoint.secret_headers),
            "backoff": f"{self.backoff.initial:g}s x{self.backoff.factor:g} "
            f"cap {self.backoff.max_delay:g}s jitter {self.backoff.jitter:g}",
        }


@dataclasses.dataclass(frozen=True)
class SinkConfig:
    """How result rows become Parquet files under the output folder.

    Args:
        part_rows: a part is written when its buffer holds this many rows (1..10,000,000).
        part_bytes: ... or this many bytes of rows (64 KiB..1 GiB).
        part_seconds: ... or when its oldest row is this old (0.1..86,400 s).
        output_shards: hash buckets of ``custom_id`` that compaction merges in parallel, one
            merged file set per bucket; ``0`` chooses from the data size.

    Example:
        >>> SinkConfig().part_rows
        5000
    """

    part_rows: int = 5000
    part_bytes: int = 64 * 1024 * 1024
    part_seconds: float = 10.0
    output_shards: int = 0

    def __post_init__(self) -> None:
        _check_int("part_rows", self.part_rows, 1, 10_000_000)
        _check_int("part_bytes", self.part_bytes, 64 * 1024, 1024**3, " bytes")
        _check_range("part_seconds", self.part_seconds, 0.1, 86400.0, " s")
        _check_int("output_shards", self.output_shards, 0, 100_000, " (0: chosen from the data size)")
