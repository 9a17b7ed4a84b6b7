#!/usr/bin/env bash
# The main job on a fresh machine: install, make the demo hospitals, federate, report, serve.
# Idempotent: existing demo sites are kept; every run trains a new federation run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"

fedmri generate --out data                                   # 4 hospitals, MNI152-based, 2 mm
fedmri federate --mode simulation --data data --out runs \
  --rounds 15 --local-epochs 2 --lr 0.003                    # Flower simulation (~3 min on 2 cores) -> runs/registry, served
fedmri report --data data --registry runs/registry --out runs/reports
echo "Report: $PWD/runs/reports/<model version>/report.html"
exec fedmri serve --host 127.0.0.1 --port "${FEDMRI_PORT:-8080}" --registry runs/registry
