#!/usr/bin/env bash
# The toy world's numbers in the README, from the repo root (CPU). Each command resumes where it stopped.
set -euo pipefail
PY=${PY:-.venv/bin/python}
# the prior (≈3,400 steps/hour on one thread; the checkpoint lives in out/world_prior_train, the export in the package)
$PY -m l2vsd_core.toys.world train --steps 20000 --resume
$PY -m l2vsd_core.toys.world loss-curve --png docs/world/prior_loss.png
# the demo: "a red cube" with L²-VSD → out/demo (model.glb, turntable.gif, curves.png, metrics.json)
$PY -m l2vsd_core.toys.world.demo --prompt "a red cube" --method l2vsd --out out/demo
# the quality table: 12 prompts × 7 methods × 3 seeds (hours on 2 cores; finished runs are reused)
$PY -m l2vsd_core.bench quality --prompts docs/world/prompts.txt --seeds 3 --json docs/world/quality.json
