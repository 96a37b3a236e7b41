#!/bin/bash
# The toy world at 1500 steps (issue 14, deliverable 3; README "Does the lookahead do anything?"): stage 1 with the
# toy recipe and ProlificDreamer's timestep anneal scaled to the run, 3 prompts × 3 seeds: VSD, L²-VSD at the chosen
# default (sgd_mean, η = 0.5) and SDS; on the first two prompts also L²-VSD with the optimizer lookahead (η = 1). One thread per run; every
# finished run is kept under out/world1500 and skipped when started again. ≈ 3.5 h on one core (it was run as two or
# three processes).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
mkdir -p out/world1500
printf "a red cube\na blue sphere\n" > out/world1500/prompts.txt
printf "a red cube\na blue sphere\na green cone\n" > out/world1500/prompts3.txt
bench() { OMP_NUM_THREADS=1 "$PY" -m l2vsd_core.bench quality --seeds 3 --steps 1500 --out out/world1500 "$@"; }
# two prompts with the optimizer lookahead too, then a third prompt for VSD, the default L²-VSD and SDS
bench --prompts out/world1500/prompts.txt --methods "vsd,l2vsd[optimizer,eta=1],sds"
bench --prompts out/world1500/prompts.txt --methods "l2vsd[sgd_mean,eta=0.5]"
bench --prompts out/world1500/prompts.txt --methods "vsd,l2vsd[sgd_mean,eta=0.5],l2vsd[optimizer,eta=1],sds" \
  --json docs/world/lookahead1500_2prompts.json
bench --prompts out/world1500/prompts3.txt --methods "vsd,l2vsd[sgd_mean,eta=0.5],sds" \
  --json docs/world/lookahead1500.json --grid docs/world/lookahead1500_grid.png
