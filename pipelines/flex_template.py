"""The Dataflow Flex Template's ``metadata.json``, generated from the CLI's own options.

Every parameter of the template is a flag of ``python -m pipelines.batch_chat`` (same name,
same help, optional unless the CLI requires it), so the template can never drift from the CLI;
``tests/test_production.py`` checks the committed file against this. Regenerate it with::

    python -m pipelines.flex_template > deploy/flex-template/metadata.json

Example:
    >>> names = [p["name"] for p in metadata()["parameters"]]
    >>> names[:2], "max_concurrency" in names, "api_key_secret" in names
    (['input', 'output'], True, True)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from arkbatch_beam import flags
from pipelines.batch_chat import CONFIG_CLASSES


def metadata() -> dict[str, Any]:
    """The template's metadata: name, description, and one parameter per CLI flag."""
    params = []
    for cls in CONFIG_CLASSES:
        for fl in flags(cls):
            required = fl.field.default is dataclasses.MISSING and fl.field.default_factory is dataclasses.MISSING
            params.append({
                "name": fl.name,
                "label": fl.name.replace("_", " "),
                "helpText": f"{fl.meta['help']} [{fl.accepted()}; default {fl.default_text()}]",
                "isOptional": not required,
                **({"regexes": ["^(true|false)$"]} if fl.meta["kind"] is bool else {}),
            })
    return {
        "name": "arkbatch-batch-chat",
        "description": "Chat prompts (JSONL/text or Parquet) through Volcengine Ark batch inference or any "
        "OpenAI-compatible endpoint, to Parquet results and failures (arkbatch-beam).",
        "streaming": False,
        "parameters": params,
    }


def main() -> int:
    """Print the metadata as JSON (what ``deploy/flex-template/metadata.json`` holds)."""
    json.dump(metadata(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
