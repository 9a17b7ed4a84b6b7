#!/usr/bin/env bash
# Install what is needed (idempotent), lint, and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh --browser
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/ruff check .            # lint: pyproject [tool.ruff]
exec .venv/bin/python -m pytest -q -ra "$@"
