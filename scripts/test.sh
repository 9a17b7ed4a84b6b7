#!/usr/bin/env bash
# Install what is needed (idempotent) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh --browser
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q -ra "$@"
