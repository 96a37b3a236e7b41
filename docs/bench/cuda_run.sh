#!/usr/bin/env bash
# One call on a lent CUDA machine (see README "Speed"), most wanted first so that a cut-off run still answers issue 15:
# the SD-2.1-base step benchmark, the SD three-stage run (cuda_sd_stages.py, ≤ SD_STAGES_TIMEOUT s), the tiny step
# benchmark, the test suite; the render benchmark and a torch.compile trial only when asked (RENDER=1, COMPILE=1).
# About 9 min in all on an H100 (a call may run 10): set SKIP_SD_STAGES=1 or a smaller SD_STAGES_TIMEOUT to shorten.
# Runs from the repo root; wheels missing on that machine (diffusers, trimesh, …) travel in .whl/; results go to $OUT.
set -uo pipefail
OUT=${OUT:-out/cuda}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, peft, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
python3 -m l2vsd_core.bench step --config sd21 --steps 10 --json "$OUT/step_cuda_sd21_64.json" --profile 12 2>/dev/null
# issue 15: the SD-2.1-base architecture (random weights) through stages 1-3 at the recipe's sizes (s/step, peak
# memory per stage); SD_STAGES_ARGS passes flags (e.g. "--steps 200 --milestone 100"); a SIGTERM still writes the JSON
[ "${SKIP_SD_STAGES:-0}" = 1 ] || { timeout -k 30 ${SD_STAGES_TIMEOUT:-330} python3 docs/bench/cuda_sd_stages.py \
  --json "$OUT/sd_stages_cuda.json" ${SD_STAGES_ARGS:-} 2>"$OUT/sd_stages_stderr.txt"; echo "sd stages rc=$?"
  grep -E "^stage|Error|error" "$OUT/sd_stages_stderr.txt" | tail -8; }
python3 -m l2vsd_core.bench step --config tiny --steps 10 --json "$OUT/step_cuda_tiny.json" 2>/dev/null
timeout ${PYTEST_TIMEOUT:-150} python3 -m pytest -q -x -p no:cacheprovider tests/test_jvp.py tests/test_score.py \
  tests/test_distill.py tests/test_end_to_end_step.py > "$OUT/pytest_cuda.txt" 2>&1; echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_cuda.txt" | tail -30
[ "${RENDER:-0}" = 1 ] && python3 -m l2vsd_core.bench render --json "$OUT/render_cuda_pd.json" 2>/dev/null
if [ "${COMPILE:-0}" = 1 ]; then
  timeout ${COMPILE_TIMEOUT:-180} python3 -m l2vsd_core.bench step --config sd21 --steps 10 --compile \
    --methods sds,vsd,l2vsd:forward_ad,l2vsd:func,l2vsd:fd_forward,l2vsd_last --json "$OUT/step_cuda_sd21_64_compile.json" 2>"$OUT/compile_stderr.txt"
  echo "compile rc=$?"; grep -v '^.round' "$OUT/compile_stderr.txt" | tail -5
fi
exit 0
