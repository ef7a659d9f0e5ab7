"""Beam YAML: ``type: BatchChatInference`` between Beam YAML's own readers and writers.

The package ships a provider file, ``arkbatch_beam/yaml/providers.yaml`` (its path:
``python -m arkbatch_beam.yaml_provider``); a pipeline file includes it, or names the
transform itself::

    providers:
      - type: python
        config: {}
        transforms:
          BatchChatInference: arkbatch_beam.yaml_provider.BatchChatInference

The transform takes schema'd rows (from ``ReadFromJson``, ``ReadFromParquet``, ``Create``, ...)
and returns one row per input with the output schema's columns (``custom_id``, ``status``,
``content``, ``reasoning_content``, ..., ``parsed_json``, ``columns_json``), answered and failed
alike (``status`` says which), ready for ``WriteToParquet``.

Example:
    >>> t = BatchChatInference("ep-demo", template="Summarise: {text}", keep_columns=["id"])
    >>> t.label, t.inference.input_options.kept_columns
    ('BatchChatInference', ('id',))
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Optional

import apache_beam as beam
import pyarrow as pa
from apache_beam.typehints.row_type import RowTypeConstraint

from ._config import ARK_BASE_URL, ARK_BATCH_PATH, DEFAULT_API_KEY_ENV, ClientConfig, Endpoint
from ._inputs import row_to_item
from ._schema import OUTPUT_SCHEMA
from .transform import BatchChatInference as _BatchChatInference

# The client options' defaults, from their one definition (ClientConfig's fields).
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ClientConfig)}

PROVIDERS_FILE = os.path.join(os.path.dirname(__file__), "yaml", "providers.yaml")


def _python_type(field: pa.Field) -> Any:
    if pa.types.is_string(field.type):
        base: Any = str
    elif pa.types.is_integer(field.type):
        base = int
    elif pa.types.is_floating(field.type):
        base = float
    elif pa.types.is_boolean(field.type):
        base = bool
    else:  # pragma: no cover - the schema holds only the types above
        raise TypeError(f"no Beam type for {field}")
    return base if not field.nullable else Optional[base]  # noqa: UP045 - Beam's schemas read Optional


# The output rows' Beam schema: the Parquet schema's columns, in order.
OUTPUT_ROW_TYPE = RowTypeConstraint.from_fields([(f.name, _python_type(f)) for f in OUTPUT_SCHEMA])


def _to_output_row(row: dict[str, Any]) -> beam.Row:
    return beam.Row(**row)


class BatchChatInference(beam.PTransform):
    """Chat inference over schema'd rows: one output row per input row (see the module docstring).

    Args:
        model: the Ark endpoint id (or the model name of an OpenAI-compatible server).
        base_url: the server's base URL (default Ark's).
        path: the chat path (default Ark's batch path; ``/chat/completions`` for others).
        api_key_env: the environment variable holding the API key ('' for none).
        max_concurrency: requests in flight per worker process.
        timeout: per-request deadline in seconds.
        max_attempts: attempts that fail without the server asking to wait.
        prompt_column: without a template, the column holding the prompt (a string or a
            list of messages).
        id_column: the column holding the custom_id (default: ``custom_id``/``id`` with a
            template, else derived from the prompt).
        system: the system prompt.
        template: the user message built from the row's columns ('Summarise: {text}').
        system_template: the system message built from the row's columns.
        template_file: a JSON messages list whose strings hold {column}s.
        response_format: a JSON schema (a mapping, or a file path) the answer must match.
        thinking: enabled, disabled or auto (Ark's deep thinking).
        extra_body: fields merged into every request body (a mapping or JSON text).
        keep_columns: columns copied to the output's columns_json (a list or 'a,b').
        dedupe: send a repeated custom_id once.
        include_request: keep request_json on ok rows too.
    """

    def __init__(
        self,
        model: str,
        base_url: str = ARK_BASE_URL,
        path: str = ARK_BATCH_PATH,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        max_concurrency: int = _DEFAULTS["max_concurrency"],
        timeout: float = _DEFAULTS["timeout"],
        max_attempts: int = _DEFAULTS["max_attempts"],
        prompt_column: str = "prompt",
        id_column: Optional[str] = None,  # noqa: UP045 - Beam YAML reads these annotations
        system: Optional[str] = None,  # noqa: UP045
        template: Optional[str] = None,  # noqa: UP045
        system_template: Optional[str] = None,  # noqa: UP045
        template_file: Optional[str] = None,  # noqa: UP045
        response_format: Any = None,
        thinking: Optional[str] = None,  # noqa: UP045
        extra_body: Any = None,
        keep_columns: Any = None,
        dedupe: bool = True,
        include_request: bool = False,
    ) -> None:
        super().__init__(label="BatchChatInference")
        config = ClientConfig(Endpoint(model, base_url=base_url, path=path, api_key_env=api_key_env),
                              max_concurrency=max_concurrency, timeout=float(timeout), max_attempts=max_attempts)
        if isinstance(keep_columns, (list, tuple)):
            keep_columns = ",".join(keep_columns)
        if isinstance(response_format, dict):
            response_format = json.dumps(response_format)
        if isinstance(extra_body, dict):
            extra_body = json.dumps(extra_body)
        self.inference = _BatchChatInference(
            config, dedupe=dedupe, include_request=include_request, system=system, template=template,
            system_template=system_template, template_file=template_file, response_format=response_format,
            thinking=thinking, extra_body=extra_body, keep_columns=keep_columns, input_format="chat",
        )
        self._prompt_column = prompt_column
        self._id_column = id_column

    def expand(self, rows: beam.PCollection[Any]) -> beam.PCollection[Any]:
        opts = self.inference.input_options
        items = rows | "ToItems" >> beam.Map(
            _row_item, self._prompt_column, self._id_column, opts.system, opts.has_template, opts.kept_columns)
        return (items | "Infer" >> self.inference
                | "ToRows" >> beam.Map(_to_output_row).with_output_types(OUTPUT_ROW_TYPE))


def _row_item(row: Any, prompt_column: str, id_column: str | None, system: str | None, templated: bool,
              keep: tuple[str, ...]) -> dict[str, Any]:
    fields = row._asdict() if hasattr(row, "_asdict") else dict(row)
    return row_to_item(fields, prompt_column, id_column, system, templated=templated, keep=keep)


def main() -> None:
    """Print the path of the provider file to ``include`` from a Beam YAML pipeline."""
    print(PROVIDERS_FILE)
    sys.exit(0)


if __name__ == "__main__":
    main()
