"""Stage 1 end to end on CUDA with a tiny random prior (the tests' tiny SD): checks the device path of the whole loop
(fp16 prior, fp32 field, renderer, export) and times it.  Usage: python docs/bench/cuda_generate.py OUT_DIR"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_sd  # noqa: E402

from l2vsd_core.__main__ import main  # noqa: E402

out = Path(sys.argv[1])
prior = tiny_sd.save_diffusers_folder(tiny_sd.build_tiny(out / "prior", seed=0, family="sd15"), out / "prior" / "eps")
start = time.perf_counter()
rc = main(["generate", "--prompt", "a red cube", "--prior", str(prior), "--out", str(out / "run"), "--method", "l2vsd",
           "--steps", "200", "--checkpoint-every", "100"])
print(f"generate rc={rc} in {time.perf_counter() - start:.1f} s; outputs: "
      f"{sorted(p.name for p in (out / 'run').iterdir())}")
