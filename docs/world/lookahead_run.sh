#!/bin/bash
# The toy world at 1500 steps (issue 14, deliverable 3; README "Does the lookahead do anything?"): stage 1 with the
# toy recipe and ProlificDreamer's timestep anneal scaled to the run, 2 prompts × 3 seeds: VSD, L²-VSD with the
# optimizer lookahead (η = 1) and SDS, then L²-VSD at the chosen default (sgd_mean, η = 0.5). One thread per run; every
# finished run is kept under out/world1500 and skipped when started again. ≈ 2.5 h on one core (it was run as two
# processes, one per prompt for the last method).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
mkdir -p out/world1500
printf "a red cube\na blue sphere\n" > out/world1500/prompts.txt
bench() { OMP_NUM_THREADS=1 "$PY" -m l2vsd_core.bench quality --prompts out/world1500/prompts.txt --seeds 3 --steps 1500 \
  --out out/world1500 "$@"; }
bench --methods "vsd,l2vsd[optimizer,eta=1],sds"
bench --methods "l2vsd[sgd_mean,eta=0.5]"
bench --methods "vsd,l2vsd[sgd_mean,eta=0.5],l2vsd[optimizer,eta=1],sds" --json docs/world/lookahead1500.json \
  --grid docs/world/lookahead1500_grid.png
