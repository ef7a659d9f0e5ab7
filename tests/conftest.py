import json
import os

import pytest

from arkbatch_beam.testing import FakeArkServer

KEY_ENV = "ARKBATCH_TEST_KEY"
KEY = "sk-test-SECRET-0042"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeArkServer(api_key=KEY) as srv:
        yield srv


def write_jsonl(path, n, *, prefix="p", extra=()):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"id-{i}",
                                "body": {"messages": [{"role": "user", "content": f"{prefix} {i}"}]}}) + "\n")
        for line in extra:
            f.write(line + "\n")
    return os.fspath(path)
