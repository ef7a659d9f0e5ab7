"""The one Arrow schema of every output row (results and failures alike).

Example:
    >>> from arkbatch_beam import OUTPUT_SCHEMA
    >>> OUTPUT_SCHEMA.names[:3]
    ['custom_id', 'status', 'model']
"""

from __future__ import annotations

import pyarrow as pa

from ._types import RESULT_FIELDS

OUTPUT_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("custom_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "failed"
        pa.field("model", pa.string()),
        pa.field("response_id", pa.string()),
        pa.field("content", pa.string()),
        pa.field("reasoning_content", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("total_tokens", pa.int64()),
        pa.field("cached_tokens", pa.int64()),
        pa.field("reasoning_tokens", pa.int64()),
        pa.field("http_status", pa.int32()),
        pa.field("error_type", pa.string()),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("retryable", pa.bool_()),
        pa.field("attempts", pa.int32()),
        pa.field("latency_ms", pa.float64()),
        pa.field("request_id", pa.string()),
        pa.field("request_sha256", pa.string()),  # sha256 hex of the canonical request body
        pa.field("request_json", pa.string()),
        pa.field("response_json", pa.string()),
        # Added later; kept last so files written before them still read (as nulls).
        pa.field("parsed_json", pa.string()),  # the answer as JSON text, valid for --response_format
        pa.field("columns_json", pa.string()),  # --keep_columns: the input's fields, as a JSON object
    ]
)

assert tuple(OUTPUT_SCHEMA.names) == RESULT_FIELDS, "schema and ChatResult drifted apart"
