#!/usr/bin/env bash
# The one test command (README and .ci/run call exactly this): installs what the tests need
# from the repo's own files, lints, and runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
python3 -m ruff check .
python3 -m pytest "$@"
