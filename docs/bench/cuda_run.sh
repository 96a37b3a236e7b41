#!/usr/bin/env bash
# One call on a lent CUDA machine (see README "Speed"): the step and render benchmarks, then the test suite.
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
python3 -m l2vsd_core.bench step --config sd21 --steps 10 --json "$OUT/step_cuda_sd21_64.json" 2>/dev/null
python3 -m l2vsd_core.bench step --config tiny --steps 10 --json "$OUT/step_cuda_tiny.json" 2>/dev/null
[ "${SKIP_RENDER:-0}" = 1 ] || python3 -m l2vsd_core.bench render --json "$OUT/render_cuda_pd.json" 2>/dev/null
timeout ${COMPILE_TIMEOUT:-180} python3 -m l2vsd_core.bench step --config sd21 --steps 10 --compile \
  --methods sds,vsd,l2vsd:forward_ad,l2vsd:func,l2vsd:fd_forward,l2vsd_last --json "$OUT/step_cuda_sd21_64_compile.json" 2>"$OUT/compile_stderr.txt"
echo "compile rc=$?"; grep -v '^.round' "$OUT/compile_stderr.txt" | tail -5
timeout ${PYTEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests > "$OUT/pytest_cuda.txt" 2>&1; echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_cuda.txt" | tail -30
