"""Text → 3D on the bundled toy prior, scored: what ``make demo`` and ``bench quality`` run.

``run(prompt, method, out)`` is :func:`l2vsd_core.generate.generate` with :data:`TOY_OPTIONS` (stage 1 sized for the
32×32 world prior and two CPU cores) followed by :func:`score_run`, which rebuilds the optimized scene from the run's
``config.json`` and checkpoint and writes ``metrics.json`` next to the GLB.

Methods are the engine's, plus the combinations the paper compares (:data:`METHOD_PRESETS`): ``esd`` is VSD with
ESD's λ = 0.5, ``l2esd`` L²-VSD with it, ``hifa`` VSD with HiFA's √-annealed timesteps, z-variance and image loss.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ...files import atomic_write_text
from .train import DEFAULT_EXPORT_DIR

BUNDLED_PRIOR = DEFAULT_EXPORT_DIR

# Stage 1 for a 32×32 pixel prior: one resolution, a small hash grid, 64 samples per ray, a short run; the
# estimator settings stay ProlificDreamer's (CFG 7.5, t ∈ [0.02, 0.98], LoRA rank 4) except the LoRA's learning
# rate (1e-3: a few hundred steps instead of 25 000).
TOY_OPTIONS = {
    "steps": 400, "widths": [32], "milestones": [], "samples_per_ray": 64, "grid_resolution": 32,
    "levels": 8, "log2_hashmap_size": 15, "base_resolution": 16, "max_resolution": 256.0, "mlp_neurons": 32,
    "lora_rank": 4, "lora_lr": 1e-3, "guidance_scale": 7.5, "checkpoint_every": 100, "preview_every": 0,
    "preview_resolution": 32, "lambda_opaque": 0.0, "mesh_resolution": 64, "texture_size": 256,
    "turntable_views": 24, "turntable_resolution": 64, "device": "cpu",
}

METHOD_PRESETS = {
    "sds": {"method": "sds"},
    "vsd": {"method": "vsd"},
    "lvsd": {"method": "lvsd"},
    "l2vsd": {"method": "l2vsd"},
    "l2vsd_last": {"method": "l2vsd_last"},
    "hlvsd": {"method": "hlvsd"},
    "esd": {"method": "vsd", "esd_lambda": 0.5},
    "l2esd": {"method": "l2vsd", "esd_lambda": 0.5},
    "hifa": {"method": "vsd", "sqrt_anneal": True, "min_step_percent": 0.3, "max_step_percent": 0.98,
             "lambda_z_variance": 300.0, "lambda_image": 0.01},  # prolificdreamer-hifa.yaml
}


def toy_options(prompt: str, method: str, out, seed: int = 0, steps: Optional[int] = None, **overrides) -> dict:
    if method not in METHOD_PRESETS:
        raise ValueError(f"method must be one of {', '.join(METHOD_PRESETS)}; got {method!r}")
    options = dict(TOY_OPTIONS, prompt=prompt, prior=str(BUNDLED_PRIOR), out=str(out), seed=int(seed))
    if steps is not None:
        options["steps"] = int(steps)
    # ProlificDreamer's timestep range, scaled to the run: t ≤ 0.98 for the first fifth (its 5000 of 25 000 steps),
    # then t ≤ 0.5
    anneal = max(1, options["steps"] // 5)
    options["max_step_percent"] = [anneal, 0.98, 0.5, anneal + 1]
    options.update(METHOD_PRESETS[method])
    options.update(overrides)
    return options


def load_run(run_dir, device: str = "cpu"):
    """(field, renderer, options) of a finished or stopped ``generate`` run, from its config.json and checkpoint."""
    from safetensors.torch import load_file
    from ...generate import CHECKPOINT_NAME, _scene
    from ...scene.renderer import VolumeRenderer

    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    options = config["options"]
    field, _background = _scene(options, torch.device(device))
    tensors = load_file(str(run_dir / CHECKPOINT_NAME))
    field.load_state_dict({k[len("field."):]: v for k, v in tensors.items() if k.startswith("field.")})
    renderer = VolumeRenderer(radius=float(options["radius"]), num_samples_per_ray=int(options["samples_per_ray"]))
    return field.eval(), renderer.eval(), options


def score_run(run_dir, prior=None, reference: Optional[torch.Tensor] = None) -> dict:
    """Score a run of a world prompt and write ``metrics.json`` into it; returns the scores."""
    from ...prior import load_prior
    from .metrics import score_model

    field, renderer, options = load_run(run_dir)
    prior = prior if prior is not None else load_prior(options["prior"], device="cpu")
    scores = score_model(renderer, field, options["prompt"], prior, reference=reference).as_dict()
    atomic_write_text(Path(run_dir) / "metrics.json", json.dumps(scores, indent=1))
    return scores


def run(prompt: str, method: str, out, seed: int = 0, steps: Optional[int] = None, prior=None,
        reference: Optional[torch.Tensor] = None, log: Optional[Callable[[str], None]] = None,
        progress: Optional[Callable] = None, **overrides) -> dict:
    """Stage 1 + export + scores for one (prompt, method, seed); returns the scores with ``seconds`` (stage 1 and
    export, not scoring)."""
    from ...generate import generate

    options = toy_options(prompt, method, out, seed, steps, **overrides)
    start = time.perf_counter()
    result = generate(options, progress=progress, log=log or (lambda m: None))
    seconds = time.perf_counter() - start
    scores = score_run(out, prior, reference) if not result["stopped"] else {}
    return {**scores, "seconds": seconds, "paths": result["paths"], "stopped": result["stopped"]}


def main(argv=None) -> int:
    """``python -m l2vsd_core.toys.world.demo [--prompt "a red cube"] [--method l2vsd] [--steps N] [--out out/demo]``"""
    import argparse
    import sys
    from ...generate import _Bar

    parser = argparse.ArgumentParser(prog="python -m l2vsd_core.toys.world.demo",
                                     description="text → textured mesh on the bundled toy prior, with its scores")
    parser.add_argument("--prompt", default="a red cube", help="'a COLOR SHAPE' of the toy world")
    parser.add_argument("--method", default="l2vsd", choices=sorted(METHOD_PRESETS))
    parser.add_argument("--steps", type=int, default=TOY_OPTIONS["steps"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    from .metrics import parse_prompt
    try:
        parse_prompt(args.prompt)
        if not (BUNDLED_PRIOR / "model_index.json").is_file():
            raise ValueError(f"the bundled prior is missing at {BUNDLED_PRIOR}; train and export it with "
                             f"`python -m l2vsd_core.toys.world train`")
    except ValueError as e:
        parser.error(str(e))
    bar = _Bar(args.steps, 0)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        result = run(args.prompt, args.method, args.out, seed=args.seed, steps=args.steps, log=log,
                     progress=lambda done, total, terms: bar(done, total, terms),
                     **({"threads": args.threads} if args.threads else {}))
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted; continue with python -m l2vsd_core generate --resume (see {args.out}/config.json)",
              file=sys.stderr)
        return 130
    bar.close()
    if result["stopped"]:
        return 130
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    print(f"{args.prompt!r} with {args.method}, {args.steps} steps in {result['seconds']:.0f} s: prompt fidelity "
          f"{result['fidelity']:.3f}, Fréchet distance {result['frechet']:.1f}, silhouette IoU {result['iou']:.3f} "
          f"(metrics.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
