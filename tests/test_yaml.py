"""Beam YAML: ReadFromJson -> BatchChatInference -> WriteToParquet, run by apache_beam.yaml.main."""

import glob
import json
import os
import subprocess
import sys

import pandas  # noqa: F401 - Beam YAML's file readers need it (the test extra's apache-beam[yaml])
import pyarrow.parquet as pq

from .conftest import KEY_ENV


def _job(tmp_path, server, body):
    job = tmp_path / "job.yaml"
    job.write_text(body.replace("BASE_URL", server.base_url).replace("KEY_ENV", KEY_ENV)
                   .replace("TMP", os.fspath(tmp_path)), encoding="utf-8")
    return os.fspath(job)


def _run(job):
    from apache_beam.yaml import main

    main.run(argv=["--yaml_pipeline_file", job])


def _rows(pattern):
    rows = []
    for path in sorted(glob.glob(pattern)):
        rows.extend(pq.read_table(path).to_pylist())
    return sorted(rows, key=lambda r: r["custom_id"])


def test_read_json_infer_write_parquet(tmp_path, server):
    from arkbatch_beam.yaml_provider import PROVIDERS_FILE

    with open(tmp_path / "in.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(["the sea", "the sky", None]):
            f.write(json.dumps({"id": i, "text": text, "lang": "en"}) + "\n")
    job = _job(tmp_path, server, f"""
pipeline:
  type: chain
  transforms:
    - type: ReadFromJson
      config:
        path: TMP/in.jsonl
    - type: BatchChatInference
      config:
        model: ep-yaml
        base_url: BASE_URL
        api_key_env: KEY_ENV
        max_concurrency: 8
        timeout: 60
        template: "Summarise: {{text}}"
        keep_columns: [id, lang]
    - type: WriteToParquet
      config:
        path: TMP/out/results
providers:
  - include: {PROVIDERS_FILE}
""")
    _run(job)
    rows = _rows(os.fspath(tmp_path / "out" / "results*"))
    assert [(r["custom_id"], r["status"], r["content"] or r["error_type"]) for r in rows] == [
        ("0", "ok", "echo: Summarise: the sea"),
        ("1", "ok", "echo: Summarise: the sky"),
        ("2", "failed", "missing_column"),
    ]
    assert json.loads(rows[0]["columns_json"]) == {"id": 0, "lang": "en"}
    assert "'text' is null" in rows[2]["error_message"]


def test_inline_provider_and_prompt_column(tmp_path, server):
    job = _job(tmp_path, server, """
pipeline:
  type: chain
  transforms:
    - type: Create
      config:
        elements:
          - {prompt: "hello", key: "a"}
          - {prompt: "world", key: "b"}
    - type: BatchChatInference
      config:
        model: ep-yaml
        base_url: BASE_URL
        path: /chat/completions
        api_key_env: KEY_ENV
        id_column: key
    - type: WriteToParquet
      config:
        path: TMP/out/rows
providers:
  - type: python
    config: {}
    transforms:
      BatchChatInference: arkbatch_beam.yaml_provider.BatchChatInference
""")
    _run(job)
    rows = _rows(os.fspath(tmp_path / "out" / "rows*"))
    assert [(r["custom_id"], r["content"]) for r in rows] == [("a", "echo: hello"), ("b", "echo: world")]


def test_the_provider_file_path_is_printed():
    out = subprocess.run([sys.executable, "-m", "arkbatch_beam.yaml_provider"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out.endswith(os.path.join("arkbatch_beam", "yaml", "providers.yaml")) and os.path.exists(out)
