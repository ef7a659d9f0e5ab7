"""Frozen, validated, picklable configuration values, each option defined once.

Options become config once, at the edge (the CLI or the transform's constructor); every
module below works with these immutable values. Each option is a dataclass field made by
:func:`option`: its default, accepted range, unit and help live there and nowhere else. The
constructors check them (an :class:`~arkbatch_beam._errors.OptionError`, a ``ValueError``
naming the option and the accepted range), the CLI's flags are generated from them
(:func:`add_flags`, :func:`from_flags`) and so is the README's option table
(:func:`render_options_table`). The API key itself is never part of a config: only the *name*
of the environment variable that holds it.

Example:
    >>> from arkbatch_beam import Endpoint, ClientConfig
    >>> cfg = ClientConfig(Endpoint("ep-2024-demo"), max_concurrency=200, timeout=3600)
    >>> cfg.endpoint.url
    'https://ark.cn-beijing.volces.com/api/v3/batch/chat/completions'
    >>> ClientConfig(Endpoint("ep"), max_concurrency=0)
    Traceback (most recent call last):
    ...
    arkbatch_beam._errors.OptionError: max_concurrency must be in 1..10000, got 0
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import math
import re
import string
from collections.abc import Iterator, Mapping
from typing import Any

from ._errors import OptionError

ARK_BASE_URL = "https://ark.cn-beijing.volces.com/api/v3"
ARK_BATCH_PATH = "/batch/chat/completions"
OPENAI_CHAT_PATH = "/chat/completions"
DEFAULT_API_KEY_ENV = "ARK_API_KEY"

MAX_TIMEOUT = 72 * 3600.0  # Ark's longest batch deadline
_SECRET_VERSION = re.compile(r"^projects/[^/\s]+/secrets/[^/\s]+/versions/[^/\s]+$")


def _num(x: float) -> str:
    """A bound as people write it: ``10000000``, ``0.5``."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _check_range(name: str, value: float, lo: float, hi: float, unit: str = "", note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(name, f"must be a number in {_num(lo)}..{_num(hi)}{unit}{note}, got {value!r}")
    if math.isnan(value) or not lo <= value <= hi:
        raise OptionError(name, f"must be in {_num(lo)}..{_num(hi)}{unit}{note}, got {value!r}")


def _check_int(name: str, value: int, lo: int, hi: int, unit: str = "", note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(name, f"must be an integer in {lo}..{hi}{unit}{note}, got {value!r}")
    _check_range(name, value, lo, hi, unit, note)


_NO_DEFAULT: Any = dataclasses.MISSING


def option(
    default: Any = _NO_DEFAULT,
    *,
    help: str,  # noqa: A002 - argparse's word
    kind: type = str,
    lo: float | None = None,
    hi: float | None = None,
    unit: str = "",
    choices: tuple[str, ...] | None = None,
    off: Any = None,
    note: str = "",
    flag: str | None = None,
    cli: bool = True,
    factory: Any = None,
) -> Any:
    """A config field that carries its own definition (the one place an option is described).

    Args:
        default: the default (``None`` makes the option optional: ``None`` is always accepted).
        help: one line saying what it does.
        kind: ``int``, ``float``, ``str`` or ``bool``.
        lo, hi: the accepted range (numbers); ``unit`` is shown after it (``" s"``).
        choices: the accepted values (strings).
        off: a value outside the range that is accepted too and turns the feature off (``0``).
        note: words shown after the range in errors and help (``" (0: off)"``).
        flag: the CLI flag's name when it is not the field's name (without ``--``).
        cli: ``False`` keeps the field out of the CLI.
        factory: a default factory (for a nested config).

    Example:
        >>> import dataclasses
        >>> @dataclasses.dataclass(frozen=True)
        ... class Demo:
        ...     n: int = option(3, help="how many", kind=int, lo=1, hi=9)
        ...     def __post_init__(self): validate(self)
        >>> Demo(10)
        Traceback (most recent call last):
        ...
        arkbatch_beam._errors.OptionError: n must be in 1..9, got 10
    """
    meta = {"help": help, "kind": kind, "lo": lo, "hi": hi, "unit": unit, "choices": choices,
            "off": off, "note": note, "flag": flag, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def group(factory: Any, *, prefix: str, help: str, optional_when: tuple[str, Any] | None = None) -> Any:  # noqa: A002
    """A field holding a nested config whose options become flags named ``prefix + name``.

    ``optional_when=("idle", 0)``: the CLI value ``0`` for that flag makes the field ``None``.
    """
    meta = {"group": prefix, "help": help, "optional_when": optional_when}
    if factory is None:
        return dataclasses.field(default=None, metadata=meta)
    return dataclasses.field(default_factory=factory, metadata=meta)


def _label(obj: Any, name: str) -> str:
    prefix = getattr(type(obj), "_label_prefix", "")
    return prefix + name


def validate(obj: Any) -> None:
    """Check every :func:`option` field of a config dataclass against its definition."""
    for f in dataclasses.fields(obj):
        m = f.metadata
        if "kind" not in m:
            continue
        value = getattr(obj, f.name)
        name = _label(obj, f.name)
        if value is None and f.default is None:
            continue
        if m["off"] is not None and value == m["off"] and not isinstance(value, bool):
            continue
        kind = m["kind"]
        if kind is bool:
            if not isinstance(value, bool):
                raise OptionError(name, f"must be True or False, got {value!r}")
        elif kind is int:
            _check_int(name, value, int(m["lo"]), int(m["hi"]), m["unit"], m["note"])
        elif kind is float:
            _check_range(name, value, m["lo"], m["hi"], m["unit"], m["note"])
        elif kind is not str:
            continue  # checked by its class (e.g. headers)
        elif not isinstance(value, str):
            raise OptionError(name, f"must be a string, got {value!r}")
        elif m["choices"] is not None and value not in m["choices"]:
            raise OptionError(name, f"must be one of {', '.join(m['choices'])}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Flag:
    """One CLI flag generated from a config field (see :func:`flags`)."""

    name: str  # without "--"
    path: tuple[str, ...]  # field names from the top config down
    field: dataclasses.Field  # type: ignore[type-arg]
    owner: type
    off_note: str = ""  # what a value outside the range means on the CLI (" (0: off)")

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.field.metadata

    def accepted(self) -> str:
        """The accepted values, as help and the README say them."""
        m = self.meta
        if m["kind"] is bool:
            return "flag"
        if m["choices"]:
            return "|".join(m["choices"])
        if m["lo"] is not None:
            return f"{_num(m['lo'])}..{_num(m['hi'])}{m['unit']}{m['note']}{self.off_note}"
        return "text"

    def default_text(self) -> str:
        d = self.field.default
        if d is dataclasses.MISSING:
            return "required"
        if d is None:
            return "none"
        if self.meta["kind"] is bool:
            return "off"
        if d == "":
            return "''"
        return _num(d) if isinstance(d, float) else str(d)


def flags(
    cls: type, prefix: str = "", path: tuple[str, ...] = (), off: tuple[str, Any] | None = None
) -> Iterator[Flag]:
    """The CLI flags of config class ``cls`` (nested groups included), in field order.

    Example:
        >>> [f.name for f in flags(Keepalive)]
        ['idle', 'interval', 'count']
    """
    for f in dataclasses.fields(cls):
        m = f.metadata
        if "group" in m:
            yield from flags(_group_class(cls, f), prefix + m["group"], (*path, f.name), m["optional_when"])
        elif m.get("cli"):
            note = f" ({off[1]}: off)" if off is not None and off[0] == f.name else ""
            yield Flag(prefix + (m["flag"] or f.name), (*path, f.name), f, cls, note)


def _group_class(cls: type, f: dataclasses.Field) -> type:  # type: ignore[type-arg]
    return _GROUPS[(cls.__name__, f.name)]


def add_flags(parser: argparse.ArgumentParser | Any, *classes: type) -> None:
    """Add the flags of config ``classes`` to an argparse parser (or argument group)."""
    for cls in classes:
        for fl in flags(cls):
            m = fl.meta
            help_text = f"{m['help']} [{fl.accepted()}; default {fl.default_text()}]"
            if m["kind"] is bool:
                # --flag, or --flag=true/false (how a Flex Template passes every parameter).
                parser.add_argument("--" + fl.name, nargs="?", const=True, default=False, type=_flag_value,
                                    metavar="true|false", help=help_text)
                continue
            required = fl.field.default is dataclasses.MISSING
            parser.add_argument("--" + fl.name, type=m["kind"], default=None if required else fl.field.default,
                                required=required, help=help_text, metavar=fl.name.upper() if not m["unit"] else
                                m["unit"].strip().upper() or fl.name.upper())


def _flag_value(text: str) -> bool:
    """``true``/``false`` (and ``1``/``0``, ``yes``/``no``) for a flag given a value."""
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def from_flags(cls: type, values: Mapping[str, Any], **given: Any) -> Any:
    """Build config ``cls`` from parsed flag ``values`` (``vars(args)``); ``given`` fields win.

    Example:
        >>> from_flags(Keepalive, {"idle": 30, "interval": 5, "count": 3})
        Keepalive(idle=30, interval=5, count=3)
    """
    return _build(cls, values, "", given)


def _build(cls: type, values: Mapping[str, Any], prefix: str, given: Mapping[str, Any]) -> Any:
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            kw[f.name] = given[f.name]
            continue
        m = f.metadata
        if "group" in m:
            sub_prefix = prefix + m["group"]
            when = m["optional_when"]
            if when is not None and values.get(sub_prefix + when[0]) == when[1]:
                kw[f.name] = None
            else:
                kw[f.name] = _build(_group_class(cls, f), values, sub_prefix, {})
        elif m.get("cli"):
            name = prefix + (m["flag"] or f.name)
            if name in values:
                kw[f.name] = values[name]
    try:
        return cls(**kw)
    except OptionError as exc:
        raise _flag_error(exc, cls, prefix) from None


def _flag_error(exc: OptionError, cls: type, prefix: str) -> OptionError:
    """``exc`` naming the CLI flag (``--backoff_max``) of the field it is about."""
    for fl in flags(cls, prefix):
        if _label_of(fl) == exc.name:
            return OptionError("--" + fl.name, exc.problem)
    return exc if exc.name.startswith("--") else OptionError("--" + exc.name, exc.problem)


def _label_of(fl: Flag) -> str:
    return getattr(fl.owner, "_label_prefix", "") + fl.field.name


def render_options_table(*classes: type) -> str:
    """The Markdown table of the flags of config ``classes`` (the README's option table).

    Example:
        >>> print(render_options_table(Keepalive).splitlines()[2])
        | `--idle` | 60 | 1..7200 s | seconds a connection may sit idle before TCP keepalive probes start |
    """
    lines = ["| flag | default | accepted | meaning |", "|---|---|---|---|"]
    for cls in classes:
        for fl in flags(cls):
            lines.append(f"| `--{fl.name}` | {fl.default_text()} | {fl.accepted()} | {fl.meta['help']} |")
    return "\n".join(lines) + "\n"


# Header names that carry credentials: their values must come from the worker's environment
# (Endpoint.secret_headers), never from the config that is pickled into the pipeline graph.
_SECRET_HEADER_WORDS = ("auth", "key", "token", "secret", "password", "cookie", "credential", "signature")


def _is_secret_header(name: str) -> bool:
    low = name.lower()
    return any(word in low for word in _SECRET_HEADER_WORDS)


def _freeze_headers(
    headers: Mapping[str, str] | tuple[tuple[str, str], ...] | None, field: str = "headers"
) -> tuple[tuple[str, str], ...]:
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

    _label_prefix = "keepalive."

    idle: int = option(60, kind=int, lo=1, hi=7200, unit=" s",
                       help="seconds a connection may sit idle before TCP keepalive probes start")
    interval: int = option(15, kind=int, lo=1, hi=600, unit=" s", help="seconds between keepalive probes")
    count: int = option(4, kind=int, lo=1, hi=50, help="unanswered probes before the connection is dropped")

    def __post_init__(self) -> None:
        validate(self)


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter for retries that carry no ``Retry-After``.

    The n-th retry waits ``min(max_delay, initial * factor**(n-1))``, scaled by a random
    factor in ``[1 - jitter, 1]`` ("equal jitter" when ``jitter=0.5``).

    Example:
        >>> Backoff(initial=0.5, factor=2.0, max_delay=8.0, jitter=0.5).initial
        0.5
    """

    _label_prefix = "backoff."

    initial: float = option(0.5, kind=float, lo=0.001, hi=3600.0, unit=" s", help="first retry's backoff")
    factor: float = option(2.0, kind=float, lo=1.0, hi=10.0, help="backoff growth per retry")
    max_delay: float = option(8.0, kind=float, lo=0.001, hi=3600.0, unit=" s", flag="max",
                              help="longest backoff (at least the first)")
    jitter: float = option(0.5, kind=float, lo=0.0, hi=1.0, help="random share taken off each backoff")

    def __post_init__(self) -> None:
        validate(self)
        if self.max_delay < self.initial:
            raise OptionError("backoff.max_delay", f"must be in {_num(self.initial)}..3600 s (at least "
                              f"backoff.initial), got {self.max_delay!r}")


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
        api_key_secret: a Secret Manager version (``projects/P/secrets/S/versions/V``) that
            holds the key instead: read in the worker (Beam's ``GcpSecret``) when its client
            starts, never in the graph.
        ca_bundle: a PEM file of certificate authorities to trust for ``https://`` (a private
            CA, a test certificate); the file must exist where the workers run. Default: the
            system's store (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` are honoured).
        headers: extra request headers (never ``Authorization`` or another credential: a
            header whose name says key, token, secret, auth, password or cookie is refused).
        secret_headers: headers whose *values* are read from the environment in the worker,
            as ``{header name: environment variable}``, e.g. ``{"X-Api-Key": "MY_KEY"}``; like
            the key they never enter the pickled config, the graph or the display data.

    Example:
        >>> Endpoint("gpt-x", base_url="http://127.0.0.1:8000/v1", path="/chat/completions").url
        'http://127.0.0.1:8000/v1/chat/completions'
    """

    model: str | None = option(None, help="Ark endpoint id (ep-...) or model name, for request bodies without "
                               "a model")
    base_url: str = option(ARK_BASE_URL, help="API root (http:// or https://)")
    path: str = option(ARK_BATCH_PATH, help="/batch/chat/completions (Ark batch) or /chat/completions "
                       "(any OpenAI-compatible server)")
    api_key_env: str = option(DEFAULT_API_KEY_ENV, help="environment variable holding the API key, read in the "
                              "workers ('' sends no key)")
    api_key_secret: str | None = option(
        None, help="Secret Manager version holding the API key (projects/P/secrets/S/versions/V), read in the "
        "workers through Beam's GcpSecret instead of --api_key_env")
    ca_bundle: str | None = option(
        None, help="PEM file of the certificate authorities to trust for https:// (default: the system's, or "
        "the file named by SSL_CERT_FILE); verification is never turned off")
    headers: tuple[tuple[str, str], ...] = option((), kind=tuple, help="extra request headers", cli=False)
    secret_headers: tuple[tuple[str, str], ...] = option((), kind=tuple, help="headers read from environment variables",
                                                         cli=False)

    def __post_init__(self) -> None:
        validate(self)
        if self.model is not None and not self.model:
            raise OptionError("model", f"must be a non-empty string or None, got {self.model!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise OptionError("base_url", f"must start with http:// or https://, got {self.base_url!r}")
        if not self.path.startswith("/"):
            raise OptionError("path", f"must start with '/', got {self.path!r}")
        if self.api_key_secret is not None and not _SECRET_VERSION.match(self.api_key_secret):
            raise OptionError("api_key_secret", "must name a Secret Manager version, "
                              f"projects/PROJECT/secrets/NAME/versions/VERSION, got {self.api_key_secret!r}")
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
        idle_connection_seconds: how long an unused connection is kept for the next request
            (1..3600; default 120): a pause shorter than this resumes on the same connections,
            with no new TLS handshakes (the server may still close them sooner).
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
        max_tokens_per_minute: optional token budget per worker process per model (prompt
            + completion: estimated at the send from the body's size and ``max_tokens``,
            corrected from ``usage`` when the answer comes).
        pacing: ``adaptive`` (default): the in-flight window starts small, grows while answers
            are clean and is cut on pushback, so several replicas share one quota without a
            coordinator; ``fixed``: the window is always ``max_concurrency``.

    Example:
        >>> ClientConfig("ep-123").endpoint.model
        'ep-123'
    """

    endpoint: Endpoint = group(None, prefix="", help="where requests go (a plain str is taken as Endpoint(str))")
    max_concurrency: int = option(500, kind=int, lo=1, hi=10_000,
                                  help="requests in flight per worker process (Ark's workerNum)")
    timeout: float = option(24 * 3600.0, kind=float, lo=1.0, hi=MAX_TIMEOUT, unit=" s",
                            help="per-request deadline from its first send; retries and pauses happen inside it")
    attempt_timeout: float | None = option(None, kind=float, lo=0.01, hi=MAX_TIMEOUT, unit=" s",
                                           help="bound on one attempt (none: until the deadline)")
    connect_timeout: float = option(10.0, kind=float, lo=0.1, hi=300.0, unit=" s", help="TCP/TLS connect bound")
    idle_connection_seconds: float = option(
        120.0, kind=float, lo=1.0, hi=3600.0, unit=" s", help="how long an unused connection is kept for the next "
        "request: a pause shorter than this resumes on the same connections, without new TLS handshakes")
    backoff: Backoff = group(Backoff, prefix="backoff_", help="retry backoff without Retry-After")
    max_invalid_responses: int = option(3, kind=int, lo=1, hi=20,
                                        help="200 answers that are not a completion before a request fails")
    progress_seconds: float = option(30.0, kind=float, lo=1.0, hi=86400.0, unit=" s", off=0.0,
                                     note=" (or 0: off)", help="each worker process logs a progress line this often")
    max_requests_per_second: float | None = option(
        None, kind=float, lo=0.01, hi=100_000.0,
        help="requests (retries included) each worker process starts per second per model; a fleet's share "
        "of a quota (none: only the cap and the server's pushback)")
    max_tokens_per_minute: float | None = option(
        None, kind=float, lo=1.0, hi=1e12,
        help="tokens (prompt + completion, estimated before the send and corrected from usage) each worker "
        "process may use per minute per model; a fleet's share of a token quota (none: no budget)")
    pacing: str = option("adaptive", choices=("adaptive", "fixed"),
                         help="adaptive: the in-flight window starts small, grows while answers are clean and is "
                         "cut on pushback (429, 503, Retry-After, rising latency), so replicas share a quota; "
                         "fixed: always max_concurrency")
    max_attempts: int = option(20, kind=int, lo=0, hi=10_000, note=" (0: until the deadline)",
                               help="attempts that fail without the server announcing a wait, before a request "
                               "ends as attempts_exhausted")
    min_attempt_seconds: float = option(1.0, kind=float, lo=0.0, hi=3600.0, unit=" s",
                                        help="no attempt starts with less of the deadline left (at most half "
                                        "the timeout)")
    keepalive: Keepalive | None = group(Keepalive, prefix="tcp_keepalive_", optional_when=("idle", 0),
                                        help="TCP keepalive (--tcp_keepalive_idle 0: off)")

    def __post_init__(self) -> None:
        if isinstance(self.endpoint, str):
            object.__setattr__(self, "endpoint", Endpoint(self.endpoint))
        if not isinstance(self.endpoint, Endpoint):
            raise OptionError("endpoint", f"must be an Endpoint or a str, got {self.endpoint!r}")
        validate(self)
        if not isinstance(self.backoff, Backoff):
            raise OptionError("backoff", f"must be a Backoff, got {self.backoff!r}")
        if self.keepalive is not None and not isinstance(self.keepalive, Keepalive):
            raise OptionError("keepalive", f"must be a Keepalive or None, got {self.keepalive!r}")

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
            "api_key_secret": self.endpoint.api_key_secret or "",
            "max_concurrency": self.max_concurrency,
            "timeout_s": self.timeout,
            "attempt_timeout_s": self.attempt_timeout or 0.0,
            "connect_timeout_s": self.connect_timeout,
            "idle_connection_s": self.idle_connection_seconds,
            "max_requests_per_second": self.max_requests_per_second or 0.0,
            "max_tokens_per_minute": self.max_tokens_per_minute or 0.0,
            "pacing": self.pacing,
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


_GROUPS: dict[tuple[str, str], type] = {
    ("ClientConfig", "endpoint"): Endpoint,
    ("ClientConfig", "backoff"): Backoff,
    ("ClientConfig", "keepalive"): Keepalive,
}

INPUT_FORMATS = ("auto", "batch", "chat", "text")
# What any accepted input_encoding must read as itself: lines are split on b"\n" and JSON is
# recognised after decoding, so UTF-16/32, EBCDIC and escape-based codecs (utf-7, hz) cannot work.
_ASCII_PROBE = bytes(range(0x20, 0x7F)) + b"\t\n\r"


def _reads_ascii(name: str) -> bool:
    if not name:
        return False
    try:
        codecs.lookup(name)
        return _ASCII_PROBE.decode(name) == _ASCII_PROBE.decode("ascii")
    except (LookupError, UnicodeError):  # unknown, not a text codec (base64), or not ASCII-based
        return False


@dataclasses.dataclass(frozen=True)
class InputOptions:
    """How input lines become requests.

    Args:
        input_format: ``auto`` (per line), ``batch``, ``chat`` or ``text``.
        system: system prompt added to ``text`` prompts.
        model: model for bodies that have none (only used to check ``strict_model``).
        strict_model: reject a body whose ``model`` differs from ``model``.
        max_request_bytes: larger bodies become ``request_too_large`` failures.
        batch_path: True on Ark's batch path, where ``stream: true`` is rejected.
        input_encoding: codec of byte lines (any text codec Python knows that reads ASCII as
            ASCII: ``gbk``, ``gb18030``, ``shift_jis``, ``latin-1``, ...); ``None`` = UTF-8. A line
            that is valid UTF-8 is read as UTF-8 either way (so a file mixing UTF-8 and GBK lines
            is read right). Decoding is strict: a line that does not decode is an
            ``invalid_encoding`` row. ``str`` and dict items are already text and ignore it.
        template: the user message, built from each input object's fields (JSONL) or row's
            columns (Parquet, dicts, Beam Rows) with ``str.format`` fields: ``"Summarise: {text}"``
            (``{{``/``}}`` for literal braces). A plain-text line is the field ``text``. A field
            that is absent or null makes a ``missing_column`` row naming it.
        system_template: the system message, built the same way (default: ``system``).
        template_file: a JSON file holding a messages list whose strings hold ``{field}``s
            (text parts, image URLs, ...); read when the options are made (so on the launcher).
        messages_template: that list as JSON text (what ``template_file`` is read into).
        response_format: a JSON schema (a file path, or the JSON itself) the answer must match;
            sent as ``response_format: {"type": "json_schema", ...}``. A file that already holds
            a whole ``response_format`` (``{"type": "json_schema" | "json_object", ...}``) is sent
            as it is. Valid answers fill ``parsed_json``; others become ``invalid_output`` rows.
        response_format_json: the ``response_format`` object sent, as JSON text (set from
            ``response_format``).
        thinking: ``enabled``, ``disabled`` or ``auto``: Ark's deep thinking switch, sent as
            ``thinking: {"type": ...}``; the reasoning lands in ``reasoning_content``.
        extra_body: a JSON object merged into every request body (a field the input sets wins).
        keep_columns: comma-separated input fields/columns copied to the output's
            ``columns_json`` (a JSON object) so answers join back to their input; they are not
            sent (unless they are request fields such as ``messages`` or ``model``).

    Request options (``response_format``, ``thinking``, ``extra_body``) are added after the
    ``custom_id`` is derived, so ids depend on the prompts only.

    Example:
        >>> InputOptions(input_format="text", system="Be brief.").system
        'Be brief.'
        >>> InputOptions(input_encoding="gbk").input_encoding
        'gbk'
        >>> InputOptions(template="Summarise: {text}", keep_columns="id, lang").kept_columns
        ('id', 'lang')
        >>> InputOptions(response_format='{"type": "object"}').response_format_json[:30]
        '{"type":"json_schema","json_sc'
        >>> InputOptions(thinking="sometimes")
        Traceback (most recent call last):
        ...
        arkbatch_beam._errors.OptionError: thinking must be one of enabled, disabled, auto, got 'sometimes'
    """

    input_format: str = option("auto", choices=INPUT_FORMATS, cli=False, help="how a line is read")
    system: str | None = option(None, help="system prompt for plain-text prompts")
    model: str | None = option(None, cli=False, help="the endpoint's model")
    strict_model: bool = option(False, kind=bool, help="reject bodies whose model differs from --model")
    max_request_bytes: int = option(4 * 1024 * 1024, kind=int, lo=1024, hi=64 * 1024 * 1024, unit=" bytes",
                                    help="larger request bodies become request_too_large rows")
    batch_path: bool = option(True, kind=bool, cli=False, help="Ark's batch path (no streaming)")
    input_encoding: str | None = option(
        None, help="codec of text/JSONL input: gbk, gb18030, shift_jis, latin-1, ... (none: UTF-8); a line that "
        "does not decode, or is binary, becomes an invalid_encoding row, never a prompt")
    template: str | None = option(
        None, help="the user message built from each input's fields/columns, e.g. 'Summarise: {text}' (a plain-text "
        "line is {text}); an absent or null field makes a missing_column row")
    system_template: str | None = option(None, help="the system message, built from the fields like --template")
    template_file: str | None = option(
        None, help="JSON file: a messages list whose strings hold {field}s (text parts, image URLs, ...)")
    messages_template: str | None = option(None, cli=False, help="the messages template as JSON text")
    response_format: str | None = option(
        None, help="JSON schema file (or inline JSON) the answer must match; sent as response_format; valid answers "
        "fill parsed_json, others become invalid_output rows")
    response_format_json: str | None = option(None, cli=False, help="the response_format object sent, as JSON")
    thinking: str | None = option(None, choices=("enabled", "disabled", "auto"),
                                  help="Ark's deep thinking, sent as thinking: {type: ...} (none: the model's default)")
    extra_body: str | None = option(None, help="JSON object merged into every request body (the input's own fields "
                                    "win)")
    keep_columns: str | None = option(
        None, help="comma-separated input fields/columns copied to the output's columns_json (a JSON object), to "
        "join answers back to their input")

    def __post_init__(self) -> None:
        validate(self)
        if self.strict_model and not self.model:
            raise OptionError("strict_model", "needs model to be set")
        if self.input_encoding is not None and not _reads_ascii(self.input_encoding):
            raise OptionError(
                "input_encoding", "must name a text codec Python knows that reads ASCII as ASCII "
                f"(e.g. gbk, gb18030, shift_jis, latin-1), got {self.input_encoding!r}"
            )
        if self.template_file is not None and self.messages_template is None:
            messages = _read_json("template_file", self.template_file)
            text = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
            object.__setattr__(self, "messages_template", text)
        if self.messages_template is not None:
            messages = json.loads(self.messages_template)
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise OptionError("template_file", "must hold a non-empty JSON list of message objects")
            if self.template is not None:
                raise OptionError("template", "and template_file are two ways to say one thing: give one")
        for name in ("template", "system_template"):
            _check_template(name, getattr(self, name))
        if self.response_format is not None and self.response_format_json is None:
            spec = _read_json("response_format", self.response_format)
            text = json.dumps(_as_response_format(spec), separators=(",", ":"))
            object.__setattr__(self, "response_format_json", text)
        if self.extra_body is not None:
            extra = _read_json("extra_body", self.extra_body, path_ok=False)
            if not isinstance(extra, dict):
                raise OptionError("extra_body", f"must be a JSON object, got {self.extra_body!r}")
        if self.keep_columns is not None and not self.kept_columns:
            raise OptionError("keep_columns", f"must name at least one column, got {self.keep_columns!r}")

    @property
    def has_template(self) -> bool:
        """True when prompts are built from fields (``template`` or ``template_file``)."""
        return self.template is not None or self.messages_template is not None

    @property
    def kept_columns(self) -> tuple[str, ...]:
        """``keep_columns`` as a tuple of names."""
        if not self.keep_columns:
            return ()
        return tuple(c.strip() for c in self.keep_columns.split(",") if c.strip())


def _read_json(name: str, value: str, *, path_ok: bool = True) -> Any:
    """``value`` as JSON: inline text (starting with ``{`` or ``[``) or, when ``path_ok``, a file's."""
    text = value
    if path_ok and not value.lstrip().startswith(("{", "[")):
        try:
            from apache_beam.io.filesystems import FileSystems  # local or gs:// alike

            with FileSystems.open(value) as f:
                text = f.read().decode("utf-8")
        except Exception as exc:  # noqa: BLE001 - any filesystem's error, named with the option
            raise OptionError(name, f"cannot read {value!r}: {exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise OptionError(name, f"is not valid JSON ({exc})") from None


def _check_template(name: str, template: str | None) -> None:
    if template is None:
        return
    try:
        list(string.Formatter().parse(template))
    except ValueError as exc:
        raise OptionError(name, f"is not a valid template ({exc}; write {{{{ and }}}} for literal braces)") from None


def _as_response_format(spec: Any) -> dict[str, Any]:
    """A JSON schema (or a whole ``response_format``) -> the ``response_format`` object sent."""
    if not isinstance(spec, dict):
        raise OptionError("response_format", "must be a JSON object (a JSON schema)")
    if spec.get("type") == "json_object":
        return spec
    if spec.get("type") == "json_schema" and isinstance(spec.get("json_schema"), dict):
        inner = spec["json_schema"]
    elif isinstance(spec.get("schema"), dict) and "name" in spec:
        inner = spec  # the json_schema part: {"name", "schema", "strict"?}
    else:
        inner = {"name": "response", "schema": spec, "strict": True}
    try:
        import jsonschema

        jsonschema.validators.validator_for(inner["schema"]).check_schema(inner["schema"])
    except ImportError:  # pragma: no cover - jsonschema is a dependency
        pass
    except Exception as exc:  # noqa: BLE001 - jsonschema.SchemaError and friends
        raise OptionError("response_format", f"is not a valid JSON schema: {str(exc).splitlines()[0]}") from None
    return {"type": "json_schema", "json_schema": inner}


@dataclasses.dataclass(frozen=True)
class SinkConfig:
    """How result rows become Parquet files under the output folder.

    Example:
        >>> SinkConfig().part_rows
        5000
    """

    part_rows: int = option(5000, kind=int, lo=1, hi=10_000_000, help="a part is written when it holds this many rows")
    part_bytes: int = option(64 * 1024 * 1024, kind=int, lo=64 * 1024, hi=1024**3, unit=" bytes",
                             help="... or this many bytes of rows")
    part_seconds: float = option(10.0, kind=float, lo=0.1, hi=86400.0, unit=" s",
                                 help="... or when its oldest row is this old")
    output_shards: int = option(0, kind=int, lo=0, hi=100_000, note=" (0: from the data size)",
                                help="hash buckets of custom_id that compaction merges in parallel")

    def __post_init__(self) -> None:
        validate(self)
