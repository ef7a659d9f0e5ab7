#!/usr/bin/env bash
# The one test command (README and .ci/run call exactly this): installs what the tests need
# from the repo's own files, lints, and runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
python3 -m ruff check .
python3 -m mypy  # strict on the public API (pyproject.toml)
# Debian's chromium, for the report page's headless-browser test (it skips only without one).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
    >/dev/null 2>&1 || true
fi
# Beam's Flink job server for tests/test_flink.py, cached outside the repo (never committed).
if command -v java >/dev/null 2>&1 && command -v mvn >/dev/null 2>&1; then
  ARKBATCH_FLINK_JAR=$(PYTHON=python3 bash scripts/fetch_flink_jar.sh) && export ARKBATCH_FLINK_JAR
fi
python3 -m pytest "$@"
