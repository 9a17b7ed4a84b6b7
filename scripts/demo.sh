#!/usr/bin/env bash
# The main job on a fresh machine: install, make the demo hospitals, federate, report, serve.
# Idempotent: existing demo sites are kept; every run trains a new federation run.
# Env: FEDMRI_PORT (8080), FEDMRI_DATA (data), FEDMRI_RUNS (runs), FEDMRI_SERVE=0 stops after the report
# (bench/bench_demo.py times the demo that way).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
data=${FEDMRI_DATA:-data}
runs=${FEDMRI_RUNS:-runs}

fedmri generate --out "$data"                                # 4 hospitals, MNI152-based, 2 mm
# The recipe (README "The demo recipe"): 14 rounds x exactly 44 optimiser steps per site (local-epochs is
# only an upper bound), poly LR decay over all rounds, 48^3 crops x 4 per volume with lesion-centred crops
# oversampled, Dice + lesion-weighted cross-entropy, random gamma (the last three are defaults in shared/),
# and a random coil field on 30 % of crops (hospital-d's scanner has one).
run="demo-$(date -u +%Y%m%d-%H%M%S)"
fedmri federate --mode simulation --data "$data" --out "$runs" --run-name "$run" \
  --rounds 14 --local-epochs 40 --max-steps 44 --lr 0.003 \
  --roi-size 48,48,48 --samples-per-volume 4 --bias-field-prob 0.3 --lesion-paste-prob 1.0 \
  --select-checkpoint best-val                               # serve the round with the best validation Dice
fedmri report --data "$data" --registry "$runs/registry" --out "$runs/reports"
echo "Report: $runs/reports/<model version>/report.html"
if [ "${FEDMRI_SERVE:-1}" = 0 ]; then exit 0; fi
exec fedmri serve --host 127.0.0.1 --port "${FEDMRI_PORT:-8080}" --registry "$runs/registry"
