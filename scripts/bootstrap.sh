#!/usr/bin/env bash
# Create .venv and install fedmri with everything it needs; safe to run again (does nothing new).
# Usage: scripts/bootstrap.sh [--browser]   (--browser also installs Debian chromium for the UI tests and
# Orthanc with its DICOMweb plugin for the PACS round-trip test)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Reinstall only when the dependency list changed.
stamp=.venv/.fedmri-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: the CPU wheel; a looser spec would pull GBs of CUDA packages.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
scripts/vendor-niivue.sh   # NiiVue bundle for the web page (npm at install time only; without npm: a note, exit 0)

if [ "${1:-}" = "--browser" ] && { ! command -v chromium >/dev/null 2>&1 || ! command -v Orthanc >/dev/null 2>&1; }; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver orthanc orthanc-dicomweb >/dev/null
  else
    echo "note: chromium/Orthanc not installed (needs root: apt-get install chromium chromium-driver orthanc" \
         "orthanc-dicomweb); the browser and PACS tests will be skipped" >&2
  fi
fi

# Flower: no run-time `uv sync` of the app's dependencies, no telemetry, no update checks.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
