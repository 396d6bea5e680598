#!/usr/bin/env bash
# The README's test command: installs everything the tests need into .venv (Python packages,
# the compiled core, the npm packages for the JavaScript clients), then runs ruff and pytest.
# Needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (.ci/run starts them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip setuptools wheel
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
.venv/bin/python -m ruff check fastrelay tests bench
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
