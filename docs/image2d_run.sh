#!/bin/bash
# The 2D image-distillation study of the README ("Does the lookahead do anything?"), as it was run: two processes of
# one thread each over disjoint methods (each run is kept under out/ and skipped when started again), first at the
# toy recipe's LoRA learning rate 1e-3 (two prompts × 3 seeds: the estimators, then the η sweeps of the paper and
# optimizer lookaheads), then at 1e-2 (one prompt × 3 seeds), then one call per learning rate that reads every kept run
# and writes docs/image2d/study*.json, grid*.png and lookahead.png. ≈ 2.5 h on 2 cores.
# "l2vsd[sgd_mean,eta=0.01]" is what plain "l2vsd" meant before the study chose the default (sgd_mean, η = 0.5).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
run() { OMP_NUM_THREADS=1 "$PY" -m l2vsd_core.toys.image2d --seeds 3 --steps 300 --particles 4 --threads 1 "$@"; }
TWO=(--prompts "a red cube" "a blue sphere" --out out/image2d)
ONE=(--prompts "a red cube" --lora-lr 1e-2 --out out/image2d_lr1e-2)
{ run "${TWO[@]}" --methods sds sds@cfg100 vsd lvsd "l2vsd[paper,eta=0.01]"
  run "${ONE[@]}" --methods vsd lvsd
  run "${TWO[@]}" --methods "lvsd[gamma=5]" "hlvsd[optimizer,eta=1]"
  run "${TWO[@]}" --methods "l2vsd[paper,eta=0.0001]" "l2vsd[paper,eta=0.003]" "l2vsd[paper,eta=0.03]"; } \
  > out/image2d_A.log 2>&1 &
{ run "${TWO[@]}" --methods "l2vsd[sgd_mean,eta=0.01]" "l2vsd[optimizer,eta=1]"
  run "${ONE[@]}" --methods "l2vsd[sgd_mean,eta=0.01]" "l2vsd[optimizer,eta=1]" "l2vsd[paper,eta=0.01]"
  run "${TWO[@]}" --methods "l2vsd_last[optimizer,eta=1]" "l2vsd[paper,eta=0.001]"
  run "${TWO[@]}" --methods "l2vsd[paper,eta=0.1]" "l2vsd[optimizer,eta=10]" "l2vsd[optimizer,eta=100]"
  run "${TWO[@]}" --methods "l2vsd[sgd_mean,eta=0.5]"; } \
  > out/image2d_B.log 2>&1 &
wait
LR3=(sds sds@cfg100 vsd lvsd "lvsd[gamma=5]" "l2vsd[sgd_mean,eta=0.01]" "l2vsd[sgd_mean,eta=0.5]"
     "l2vsd[paper,eta=0.0001]" "l2vsd[paper,eta=0.001]" "l2vsd[paper,eta=0.003]" "l2vsd[paper,eta=0.01]"
     "l2vsd[paper,eta=0.03]" "l2vsd[paper,eta=0.1]"
     "l2vsd[optimizer,eta=1]" "l2vsd[optimizer,eta=10]" "l2vsd[optimizer,eta=100]"
     "l2vsd_last[optimizer,eta=1]" "hlvsd[optimizer,eta=1]")
run "${TWO[@]}" --methods "${LR3[@]}" --json docs/image2d/study.json --grid docs/image2d/grid.png \
  --plot docs/image2d/lookahead.png
run "${ONE[@]}" --methods vsd lvsd "l2vsd[sgd_mean,eta=0.01]" "l2vsd[paper,eta=0.01]" "l2vsd[optimizer,eta=1]" \
  --json docs/image2d/study_lora_lr1e-2.json --grid docs/image2d/grid_lora_lr1e-2.png
