#!/usr/bin/env bash
# The toy world's numbers in the README, from the repo root (CPU). Each command resumes where it stopped.
set -euo pipefail
PY=${PY:-.venv/bin/python}
# the prior (≈3,400 steps/hour on one thread; the checkpoint lives in --out, the export in the package). It was
# trained 2,600 steps with ε-prediction, then fine-tuned to v-prediction from that export up to step 6500:
#   $PY -m l2vsd_core.toys.world train --prediction-type epsilon --steps 2600
#   $PY -m l2vsd_core.toys.world train --init-from <the ε export> --steps 6500 --out out/world_prior_v
# To train on from the committed export:
$PY -m l2vsd_core.toys.world train --init-from l2vsd_core/toys/world/prior --steps 20000 --out out/world_prior_v
$PY -m l2vsd_core.toys.world loss-curve --log out/world_prior_v/train.log --png docs/world/prior_loss_v.png
# the demo: "a red cube" with L²-VSD → out/demo (model.glb, turntable.gif, curves.png, metrics.json)
$PY -m l2vsd_core.toys.world.demo --prompt "a red cube" --method l2vsd --out out/demo
# the three stages on the same prompt → out/demo3 (model_s1/2/3.glb and their scores)
$PY -m l2vsd_core.toys.world.demo --prompt "a red cube" --method l2vsd --stages 3 --out out/demo3
# the quality table: 12 prompts × 5 methods × 3 seeds at 200 steps (≈95 min on 2 cores). Finished runs and each
# prompt's reference samples are reused, so it can be split: one process per half of the prompts (one thread each),
# then the full command collects the rows without running anything again.
mkdir -p out
grep -v '^#' docs/world/prompts.txt | awk 'NF && NR % 2' > out/prompts_a.txt
grep -v '^#' docs/world/prompts.txt | awk 'NF && !(NR % 2)' > out/prompts_b.txt
QUALITY="--methods sds,vsd,lvsd,l2vsd,esd --seeds 3 --steps 200 --out out/bench_quality_200"
for half in a b; do OMP_NUM_THREADS=1 $PY -m l2vsd_core.bench quality --prompts out/prompts_$half.txt $QUALITY & done; wait
$PY -m l2vsd_core.bench quality --prompts docs/world/prompts.txt $QUALITY \
    --json docs/world/quality.json --grid docs/world/quality_grid.png
# the 7-method table: the first 6 prompts (one per shape) × seed 0 at the demo's 400 steps (≈1.5 min per run)
grep -v '^#' docs/world/prompts.txt | awk 'NF' | head -n 6 > out/prompts_6.txt
$PY -m l2vsd_core.bench quality --prompts out/prompts_6.txt --seeds 1 --out out/bench_quality_v \
    --json docs/world/quality6.json --grid docs/world/quality6_grid.png
