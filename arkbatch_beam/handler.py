"""``ArkChatModelHandler``: Beam's ``RunInference`` over Ark or any OpenAI-compatible chat endpoint.

    p | beam.Create(["What is Beam?"]) | RunInference(ArkChatModelHandler("ep-...")) | ...

The "model" is this worker process's shared runtime (the same client, retries, pacing and
``max_concurrency`` cap as :class:`~arkbatch_beam.BatchChatInference`), so every batch Beam
hands over is sent at once, concurrently, never one request after another, and a retry is
one request's, never a whole batch's.

Elements: a prompt string, a list of messages, a request body (a dict with ``messages``, or
a batch-form ``{"custom_id", "body"}``), or, with a ``template``, a dict or ``beam.Row`` of
fields. A ``(key, element)`` tuple is keyed: its prediction comes back as
``(key, PredictionResult)``. Each answer is a ``PredictionResult(example, inference,
model_id)`` whose ``inference`` is the :class:`~arkbatch_beam.ChatResult` row (``content``,
``reasoning_content``, ``parsed_json``, token counts, ...).

Failures, per element (``on_failure``):

* ``"raise"`` (default, Beam's way): under ``RunInference(...).with_exception_handling()``
  each failed element goes to the dead letters alone, as Beam's record for a batch of one,
  ``([example], (exception type, repr, [message]))``, while the rest of its batch is answered;
  without exception handling the batch raises the failure (an
  :class:`~arkbatch_beam.ArkError` subclass) and the pipeline stops. Inside Beam's
  ``KeyedModelHandler`` (which pairs keys with predictions by position, so no handler can set
  one element of a keyed batch aside) the handler asks for batches of one element instead:
  each failure is still its own dead letter, but only the runner's threads send concurrently;
  give the handler ``(key, element)`` tuples directly to keep whole batches in flight.
* ``"return"``: a failed element is a ``PredictionResult`` too, its ``inference`` a row with
  ``status == "failed"`` and the ``error_type`` that says why (nothing raises).

Example:
    >>> import apache_beam as beam
    >>> from apache_beam.ml.inference.base import RunInference
    >>> from arkbatch_beam import ArkChatModelHandler, Endpoint
    >>> from arkbatch_beam.testing import FakeArkServer
    >>> with FakeArkServer(api_key=None) as server:
    ...     handler = ArkChatModelHandler(Endpoint("ep-demo", base_url=server.base_url, api_key_env=""))
    ...     with beam.Pipeline() as p:
    ...         _ = (p | beam.Create(["hello"]) | RunInference(handler)
    ...                | beam.Map(lambda r: print(r.example, "->", r.inference.content)))
    hello -> echo: hello
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, MaybeKeyedModelHandler, ModelHandler, PredictionResult
from apache_beam.pvalue import TaggedOutput

from . import _runtime
from ._config import ClientConfig, Endpoint, InputOptions
from ._errors import (
    ERROR_TYPE_BY_NAME,
    ArkError,
    EndpointUnusable,
    InputError,
    InternalError,
    InvalidInput,
    InvalidOutput,
)
from ._inputs import parse_input
from ._progress import TOKEN_KINDS
from ._types import ChatRequest, ChatResult

ON_FAILURE = ("raise", "return")
DEFAULT_NAMESPACE = "ArkChatModelHandler"


class ArkModel:
    """What ``load_model`` returns: a handle on the process's shared runtime for one config.

    The runtime is released when Beam drops the handle (its last reference), so the process's
    session and loop thread close when no RunInference step uses them any more.
    """

    def __init__(self, config: ClientConfig, rate_limiter: Any = None) -> None:
        self.config = config
        self.runtime = _runtime.acquire(config, rate_limiter)
        weakref.finalize(self, _runtime.release, self.runtime)

    def __repr__(self) -> str:
        return f"ArkModel({self.config.endpoint.url!r})"


class ArkChatModelHandler(ModelHandler):
    """A ``RunInference`` model handler that sends every batch concurrently through the shared runtime.

    Args:
        endpoint: an Ark endpoint id, an :class:`~arkbatch_beam.Endpoint` or a
            :class:`~arkbatch_beam.ClientConfig` (as for ``BatchChatInference``).
        input_options: how elements become requests (:class:`~arkbatch_beam.InputOptions`:
            ``system``, ``template``, ``response_format``, ``thinking``, ``extra_body``, ...).
        on_failure: ``"raise"`` (failed elements are dead letters, one each, under
            ``with_exception_handling()``) or ``"return"`` (failed rows are predictions too).
        min_batch_size, max_batch_size: Beam's batching bounds; a batch is sent at once, so
            the default largest batch is ``max_concurrency``.
        metrics_namespace: the namespace of this handler's metrics and of RunInference's own.
        rate_limiter: a Beam ``RateLimiter`` every request also asks (see ``BatchChatInference``).
        **overrides: any :class:`~arkbatch_beam.ClientConfig` or
            :class:`~arkbatch_beam.InputOptions` field (``max_concurrency=200``,
            ``template="Summarise: {text}"``, ...).

    ``inference_args`` given to ``RunInference`` are body fields added to every request (a
    field the element sets wins), e.g. ``{"temperature": 0}``.
    """

    def __init__(
        self,
        endpoint: str | Endpoint | ClientConfig,
        *,
        input_options: InputOptions | None = None,
        on_failure: str = "raise",
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        metrics_namespace: str = DEFAULT_NAMESPACE,
        rate_limiter: Any = None,
        **overrides: Any,
    ) -> None:
        from .transform import BatchChatInference  # one place that splits the overrides

        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {', '.join(ON_FAILURE)}, got {on_failure!r}")
        resolved = BatchChatInference(endpoint, input_options=input_options, **overrides)
        self.config: ClientConfig = resolved.config
        self.input_options: InputOptions = resolved.input_options
        super().__init__(
            min_batch_size=min_batch_size or 1,
            max_batch_size=max_batch_size or self.config.max_concurrency,
        )
        self._text_options = dataclasses.replace(self.input_options, input_format="text")
        self._on_failure = on_failure
        self._namespace = metrics_namespace
        self._rate_limiter = rate_limiter
        self._metrics: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"ArkChatModelHandler({self.config.endpoint.url!r})"

    # -- ModelHandler ----------------------------------------------------------------------
    def load_model(self) -> ArkModel:
        """The process's shared runtime for this handler's config (made on first use)."""
        return ArkModel(self.config, self._rate_limiter)

    def get_metrics_namespace(self) -> str:
        return self._namespace

    def batch_elements_kwargs(self) -> dict[str, Any]:
        kwargs = dict(super().batch_elements_kwargs())
        caller = sys._getframe(1).f_locals.get("self")
        if self._on_failure == "raise" and isinstance(caller, (KeyedModelHandler, MaybeKeyedModelHandler)):
            # Beam zips keys with predictions: only a batch of one can fail alone.
            kwargs.update(min_batch_size=1, max_batch_size=1)
        return kwargs

    def share_model_across_processes(self) -> bool:
        return False

    def run_inference(
        self, batch: Sequence[Any], model: ArkModel, inference_args: dict[str, Any] | None = None
    ) -> Iterable[Any]:
        """Send the whole batch at once; one prediction (or dead letter) per element, in order."""
        keyed = [isinstance(e, tuple) and len(e) == 2 and not hasattr(e, "_fields") for e in batch]
        examples = [e[1] if k else e for e, k in zip(batch, keyed, strict=True)]
        parsed = [self._request(e, inference_args) for e in examples]
        todo = [(req, i) for i, req in enumerate(parsed) if isinstance(req, ChatRequest)]
        results: list[ChatResult | None] = [None if isinstance(p, ChatRequest) else p for p in parsed]
        for i, result in self._send(model.runtime, todo):
            request = parsed[i]
            assert isinstance(request, ChatRequest)
            result.columns_json = result.columns_json or request.columns_json
            results[i] = result  # (checked against its response_format by the client)
        dead_letters = _dead_letter_tag() if self._on_failure == "raise" else None
        out: list[Any] = []
        failures: list[ArkError] = []
        self._count([r for r in results if r is not None])
        for element, example, is_keyed, maybe in zip(batch, examples, keyed, results, strict=True):
            assert maybe is not None
            result = maybe
            if not result.ok and self._on_failure == "raise":
                error = _error_of(result)
                if dead_letters is not None:
                    out.append(TaggedOutput(dead_letters, ([element], (type(error), repr(error), [str(error)]))))
                    continue
                failures.append(error)
                continue
            prediction = PredictionResult(example, result, result.model or self.config.endpoint.model)
            out.append((element[0], prediction) if is_keyed else prediction)
        if failures:
            first = failures[0]
            if len(failures) > 1:
                first.args = (f"{first.message} (and {len(failures) - 1} more failed element(s) in this batch)",)
            raise first
        return out

    # -- internals -------------------------------------------------------------------------
    def _request(self, example: Any, inference_args: dict[str, Any] | None) -> ChatRequest | ChatResult:
        """An element -> a request, or a failure row naming what is wrong with it."""
        if hasattr(example, "_asdict"):  # beam.Row, NamedTuple
            example = dict(example._asdict())
        if isinstance(example, (str, bytes)):
            parsed = parse_input(example, self._text_options)
        elif isinstance(example, list):
            parsed = parse_input({"messages": example}, self.input_options)
        elif isinstance(example, dict):
            parsed = parse_input(example, self.input_options)
        else:
            parsed = ChatResult.failure(
                "element", InvalidInput.error_type,
                f"an element must be a prompt string, a list of messages or a dict, got {type(example).__name__}")
        if isinstance(parsed, ChatRequest) and inference_args:
            body = dict(parsed.body)
            for key, value in inference_args.items():
                body.setdefault(key, value)
            parsed = dataclasses.replace(parsed, body=body)
        return parsed

    def _send(
        self, rt: _runtime.SharedRuntime, todo: list[tuple[ChatRequest, int]]
    ) -> Iterable[tuple[int, ChatResult]]:
        if not todo:
            return
        owner = object()
        done: queue.SimpleQueue[list[tuple[Any, ChatResult]]] = queue.SimpleQueue()
        left = len(todo)
        try:
            rt.check_alive()
            rt.submit_batch(todo, done.put, owner)
            while left:
                try:
                    items = done.get(timeout=1.0)
                except queue.Empty:
                    if rt.fatal:
                        raise EndpointUnusable(rt.fatal) from None
                    rt.check_alive()
                    continue
                for index, result in items:
                    left -= 1
                    yield index, result
        except BaseException:
            rt.cancel(owner)  # this batch failed or was abandoned: send none of the rest
            raise

    def _get_metrics(self) -> dict[str, Any]:
        if self._metrics is None:
            ns = self._namespace
            self._metrics = {
                name: Metrics.counter(ns, name)
                for name in ("requests", "ok", "failed", "retries", *TOKEN_KINDS, "invalid_output")
            }
            self._metrics["latency_ms"] = Metrics.distribution(ns, "latency_ms")
        return self._metrics

    def _count(self, results: Sequence[ChatResult]) -> None:
        """A batch's rows on Beam's counters: summed here, each counter asked once per batch."""
        metrics = self._get_metrics()
        sums = dict.fromkeys(("requests", "ok", "failed", "retries", *TOKEN_KINDS, "invalid_output"), 0)
        for result in results:
            sums["requests"] += result.attempts > 0
            if result.ok:
                sums["ok"] += 1
                for kind in TOKEN_KINDS:
                    sums[kind] += getattr(result, kind) or 0
                if result.latency_ms is not None:
                    metrics["latency_ms"].update(int(result.latency_ms))
            else:
                sums["failed"] += 1
                sums["invalid_output"] += result.error_type == InvalidOutput.error_type
            sums["retries"] += max(0, result.attempts - 1)
        for name, n in sums.items():
            if n:
                metrics[name].inc(n)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_metrics"] = None
        return state


def _error_of(result: ChatResult) -> ArkError:
    """The :class:`ArkError` a failed row stands for (its class from ``error_type``), carrying the row."""
    cls = ERROR_TYPE_BY_NAME.get(result.error_type or "", InternalError)
    message = f"{result.custom_id}: {result.error_type}: {result.error_message or ''}".rstrip(": ")
    if issubclass(cls, InputError):
        error: ArkError = cls(message)
    else:
        error = cls(message, http_status=result.http_status, error_code=result.error_code)
    error.row = result  # type: ignore[attr-defined]
    return error


def _dead_letter_tag(limit: int = 40) -> str | None:
    """The dead-letter tag of the ``RunInference(...).with_exception_handling()`` step running this
    call on this thread, when single elements can go there; else ``None``.

    Found by looking up this thread's stack for Beam's exception-handling wrapper DoFn (only
    RunInference's wrapper, around RunInference's own DoFn). ``None`` (so the batch raises,
    as every Beam handler does) when there is none (no exception handling, or a timeout or
    subprocess wrapper that runs the call elsewhere) or when a keyed handler stands between
    (it pairs keys with predictions by position, so nothing may be set aside).
    """
    try:
        from apache_beam.ml.inference.base import _RunInferenceDoFn
        from apache_beam.transforms.core import _ExceptionHandlingWrapperDoFn
    except ImportError:  # another Beam: raise per batch, like every handler
        return None
    frame = sys._getframe(1)
    for _ in range(limit):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, KeyedModelHandler):
            return None
        if isinstance(owner, MaybeKeyedModelHandler) and frame.f_locals.get("is_keyed"):
            return None
        if isinstance(owner, _ExceptionHandlingWrapperDoFn):
            inner = owner.__dict__.get("_fn")
            tag = owner.__dict__.get("_dead_letter_tag")
            return tag if isinstance(inner, _RunInferenceDoFn) and isinstance(tag, str) else None
        frame = frame.f_back  # type: ignore[assignment]
    return None

