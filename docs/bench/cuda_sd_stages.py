"""Issue 15: the SD-2.1-base architecture (random weights) through all three stages at the recipe's real sizes — does
the three-stage workflow run end to end on one GPU, and how many seconds per step and how much memory each stage takes.

1. Builds a random-weight SD-2.1-base-shaped diffusers folder (seeded): the shipped ``l2vsd_core/prior/configs/sd21``
   configs with 2.1-base's settings (UNet ``sample_size`` 64 → 512 px, ε-prediction, no attention upcast; the
   shipped ones are 2.1-v's 96 / v / upcast), the shipped CLIP BPE tokenizer, fp16 safetensors.  On CUDA the models
   are initialised on the GPU (a 1.3 B-parameter CPU init is slow).
2. ``generate`` with ``stages=3``, method ``l2vsd``, everything else at the ProlificDreamer defaults (hash grid 16
   levels × 2^19, 512 samples per ray, stage 1 at 64 px then 512 px, a 64³ DMTet, stages 2 and 3 at 512 px, export
   to a GLB with a 1024² texture) — except the step counts, and the 64 → 512 px switch moved from step 5000 to
   ``--milestone`` so that the short run reaches it.
3. Per stage, from generate's ``progress`` callback: steps, skipped steps (the NaN guard), wall seconds (from the end
   of the previous stage — stage 1: from the call, so it includes loading the prior — to its last step), the
   median seconds/step without the first ``--warmup`` steps of each render size (stage 1: per 64 px and 512 px phase
   too), and on CUDA the peak ``torch.cuda.max_memory_allocated`` (reset at each stage's start and at the 512 px
   switch).  The export (GLB, turntable) is timed as what follows the last step.

Random weights: the timings and memory are the real architecture's; the 3D result means nothing.  Everything large
(the 2.6 GB prior, checkpoints) goes to ``--work`` (default: a temporary folder, removed afterwards), never next to
the JSON.  A SIGTERM (``timeout``) ends the run as an interrupt, so the JSON still holds what was measured.

Usage: python docs/bench/cuda_sd_stages.py --json OUT.json [--steps 150 --milestone 100 --geometry-steps 100
       --texture-steps 100] [--tiny] [--device cpu] [--work DIR]
``--tiny``: the tests' tiny SD-2.1-family model at toy sizes (a CPU check of this script, well under a minute).
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: l2vsd_core from this checkout

import torch  # noqa: E402

from l2vsd_core.prior.load import CONFIG_ROOT, _shipped_or_config_tokenizer  # noqa: E402

PROMPT = "a hamburger"
# the toy sizes of --tiny (as in tests/test_refine.py): every stage and the export run, in seconds on one CPU thread
TINY_OPTIONS = {"levels": 2, "log2_hashmap_size": 8, "base_resolution": 4, "max_resolution": 8, "mlp_neurons": 16,
                "backend": "torch", "samples_per_ray": 16, "grid_resolution": 8, "lora_rank": 2, "lora_lr": 1e-3,
                "preview_resolution": 16, "widths": [8, 16], "geometry_resolution": 16, "dmtet_resolution": 12,
                "texture_resolution": 16, "texture_size": 32, "turntable_views": 2, "turntable_resolution": 16}


# ------------------------------------------------------------------------------------------------------ the prior
def build_sd21_base(folder: Path, seed: int = 0, device: str = "cpu", dtype=torch.float16) -> Path:
    """A random-weight SD-2.1-base diffusers folder that ``load_prior(folder)`` reads offline; returns ``folder``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = CONFIG_ROOT / "sd21"
    # 2.1-base differs from the shipped 2.1-v configs only here: 64² latents (512 px), ε, no fp32 attention upcast
    unet_config = {**UNet2DConditionModel.load_config(str(configs / "unet")), "sample_size": 64,
                   "upcast_attention": False}
    vae_config = {**AutoencoderKL.load_config(str(configs / "vae")), "sample_size": 512}
    text_config = CLIPTextConfig.from_pretrained(str(configs / "text_encoder"))
    torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
    with torch.device(device):  # initialise where the weights will be used (fast on a GPU)
        parts = {"unet": UNet2DConditionModel.from_config(unet_config), "vae": AutoencoderKL.from_config(vae_config),
                 "text_encoder": CLIPTextModel(text_config)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in parts.items():
        module.to(dtype).save_pretrained(str(folder / name))  # safetensors
    del parts
    # the loader's own SD 2.x tokenizer (shipped BPE, pad "!"), written as a complete tokenizer folder
    _shipped_or_config_tokenizer(configs).save_pretrained(str(folder / "tokenizer"))
    scheduler = json.loads((configs / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**scheduler, "prediction_type": "epsilon"}, indent=1))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def build_tiny_sd21(folder: Path, seed: int = 0) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_sd

    return tiny_sd.save_diffusers_folder(tiny_sd.build_tiny(folder, seed=seed, family="sd21"), folder / "sd21")


# ----------------------------------------------------------------------------------------------------- recording
class StageRecorder:
    """generate's ``progress(done, total, terms)``: the time of every step (synchronised on CUDA), per stage and
    render size, and the peak memory of each (stage, render size) segment."""

    def __init__(self, milestones, warmup: int, cuda: bool, echo_every: int = 50):
        self.milestones, self.warmup, self.cuda, self.echo_every = set(milestones), warmup, cuda, echo_every
        self.stages: dict[int, dict] = {}
        self.t0 = self.last = 0.0

    def _sync(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _peak_mb(self):
        return torch.cuda.max_memory_allocated() / 2 ** 20 if self.cuda else None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.t0 = self.last = self._sync()

    def __call__(self, done: int, total: int, terms: dict) -> None:
        now = self._sync()
        number = int(terms.get("stage", 1))
        stage = self.stages.setdefault(number, {"phases": {}, "skipped": 0})
        size = int(terms.get("resolution", 0))
        phase = stage["phases"].setdefault(size, {"step_s": [], "peak_mb": None})
        phase["step_s"].append(now - self.last)  # a stage's first step also holds its set-up
        stage.update(steps=done, total=total, end=now, skipped=stage["skipped"] + int(terms.get("skipped", 0)),
                     last_terms={k: v for k, v in terms.items() if isinstance(v, float)})
        if self.cuda:
            phase["peak_mb"] = self._peak_mb()  # the running peak since this segment's reset
            # the next step starts a new segment (the next stage, or 512 px): its peak starts from what is held now
            if done == total or (number == 1 and done in self.milestones):
                torch.cuda.reset_peak_memory_stats()
        if done == 1 or done == total or done % self.echo_every == 0:
            print(f"stage {number} step {done}/{total} ({size} px) {phase['step_s'][-1]:.3f} s "
                  f"[{now - self.t0:.0f} s]", file=sys.stderr, flush=True)
        self.last = self._sync()  # the callback's own time is nobody's

    def _median(self, times: list):
        timed = times[self.warmup:] or times  # a phase shorter than the warm-up: all of it
        return statistics.median(timed) if timed else None

    def summary(self, end: float) -> dict:
        stages, previous_end = [], self.t0
        for number in sorted(self.stages):
            s = self.stages[number]
            phases = {str(size): {"steps": len(p["step_s"]), "s_per_step": self._median(p["step_s"]),
                                  "peak_mem_mb": p["peak_mb"], "step_s": [round(t, 4) for t in p["step_s"]]}
                      for size, p in s["phases"].items()}
            timed = [t for p in s["phases"].values() for t in (p["step_s"][self.warmup:] or p["step_s"])]
            peaks = [p["peak_mem_mb"] for p in phases.values() if p["peak_mem_mb"] is not None]
            first_phase = next(iter(s["phases"].values()))
            stages.append({"stage": number, "name": {1: "nerf", 2: "geometry", 3: "texture"}[number],
                           "steps": s["steps"], "total": s["total"], "skipped": s["skipped"],
                           "wall_s": s["end"] - previous_end, "first_step_s": first_phase["step_s"][0],
                           "s_per_step": statistics.median(timed) if timed else None,
                           "peak_mem_mb": max(peaks) if peaks else None, "phases": phases,
                           "last_terms": s["last_terms"]})
            previous_end = s["end"]
        return {"stages": stages, "after_last_step_s": end - previous_end, "after_last_step_peak_mem_mb":
                self._peak_mb() if self.stages else None}


# ------------------------------------------------------------------------------------------------------------ run
class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``) as an interrupt: generate checkpoints and re-raises it; the JSON is still written."""


def _on_sigterm(signum, frame):
    raise Terminated("SIGTERM")


def generate_options(args, prior: Path, out: Path) -> dict:
    options = {"prompt": PROMPT, "prior": str(prior), "out": str(out), "stages": 3, "method": args.method,
               "device": args.device, "steps": args.steps, "widths": [64, 512], "milestones": [args.milestone],
               "geometry_steps": args.geometry_steps, "texture_steps": args.texture_steps}
    if args.tiny:
        options.update(TINY_OPTIONS)
    return options


def table(data: dict) -> str:
    def num(v, fmt):
        return "–" if v is None else format(v, fmt)

    rows = ["| stage | render px | steps | skipped | wall s | s/step (median) | peak MiB |",
            "|---|---|---|---|---|---|---|"]
    for s in data.get("stages", []):
        if len(s["phases"]) > 1:  # stage 1: a row per render size, then the stage's
            for size, p in s["phases"].items():
                rows.append(f"| {s['stage']} {s['name']} | {size} | {p['steps']} | | | {num(p['s_per_step'], '.3f')} "
                            f"| {num(p['peak_mem_mb'], '.0f')} |")
        sizes = "+".join(s["phases"])
        rows.append(f"| **{s['stage']} {s['name']}** | {sizes} | {s['steps']}/{s['total']} | {s['skipped']} | "
                    f"{s['wall_s']:.1f} | {num(s['s_per_step'], '.3f')} | {num(s['peak_mem_mb'], '.0f')} |")
    if "after_last_step_s" in data:  # the export when every stage finished, else what ran after the last step
        what = "export (GLB, turntable)" if data["ok"] else "after the last step"
        rows.append(f"| {what} | | | | {data['after_last_step_s']:.1f} | | "
                    f"{num(data.get('after_last_step_peak_mem_mb'), '.0f')} |")
    rows.append(f"\nbuild prior {data.get('build_s', 0):.1f} s, generate {num(data.get('generate_s'), '.1f')} s on "
                f"{data['device']}; ok: {data['ok']}" + (f"; error: {data['error']}" if data.get("error") else ""))
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny SD-2.1-family model at toy sizes (CPU check)")
    p.add_argument("--steps", type=int, help="stage-1 steps (default 150; --tiny 6)")
    p.add_argument("--milestone", type=int, help="the stage-1 step where 512 px starts (default 100; --tiny 3)")
    p.add_argument("--geometry-steps", type=int, help="stage-2 steps (default 100; --tiny 3)")
    p.add_argument("--texture-steps", type=int, help="stage-3 steps (default 100; --tiny 3)")
    p.add_argument("--warmup", type=int, help="steps of each render size left out of the medians (default 2; "
                                              "--tiny 1)")
    p.add_argument("--method", default="l2vsd")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cpu")
    p.add_argument("--seed", type=int, default=0, help="of the random prior weights")
    p.add_argument("--work", help="folder for the prior and the run (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    small = {"steps": 6, "milestone": 3, "geometry_steps": 3, "texture_steps": 3, "warmup": 1}
    full = {"steps": 150, "milestone": 100, "geometry_steps": 100, "texture_steps": 100, "warmup": 2}
    for name, value in (small if args.tiny else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    import diffusers
    import transformers
    from l2vsd_core.generate import generate
    from l2vsd_core.scene.hashgrid import _tcnn_usable

    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    device = args.device if args.device.startswith("cuda") else ("cuda" if cuda else "cpu")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sd_stages_"))
    data = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "model": "tiny sd21 (tests/tiny_sd.py)"
            if args.tiny else "SD-2.1-base architecture, random weights (seed %d), fp16 safetensors" % args.seed,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "hashgrid_backend": "tcnn" if cuda and _tcnn_usable() else "torch", "warmup": args.warmup,
            "ok": False, "error": None}
    signal.signal(signal.SIGTERM, _on_sigterm)
    recorder = StageRecorder([args.milestone], args.warmup, cuda)
    try:
        start = time.perf_counter()
        prior = build_tiny_sd21(work / "prior", args.seed) if args.tiny else \
            build_sd21_base(work / "prior", args.seed, device)
        if cuda:
            torch.cuda.empty_cache()
        data["build_s"] = time.perf_counter() - start
        options = generate_options(args, prior, work / "run")
        data["options"] = options
        recorder.start()
        try:
            result = generate(options, progress=recorder, log=lambda m: print(m, file=sys.stderr, flush=True))
        finally:
            end = recorder._sync()
            data["generate_s"] = end - recorder.t0
            data.update(recorder.summary(end))
        data["stage_steps"], data["warnings"] = result.get("stage_steps"), result["warnings"]
        data["outputs"] = {name: {"path": path, "bytes": Path(path).stat().st_size if Path(path).is_file() else None}
                           for name, path in result["paths"].items()}
        mesh = result["paths"].get("mesh")
        data["ok"] = (not result["stopped"] and len(data["stages"]) == 3 and mesh is not None and Path(mesh).is_file()
                      and all(s["steps"] == s["total"] for s in data["stages"]))
    except BaseException as e:  # OOM, SIGTERM, …: what was measured so far is the answer
        data["error"] = f"{type(e).__name__}: {e}"
        data["traceback"] = traceback.format_exc()[-4000:]
        print(data["traceback"], file=sys.stderr)
    finally:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1))
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(data))
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
