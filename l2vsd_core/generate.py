"""``python -m l2vsd_core generate``: prompt → stage-1 NeRF (→ refined mesh → texture) → textured mesh, one command.

:func:`generate` chains the pieces: :func:`~l2vsd_core.prior.load_prior` → :class:`~l2vsd_core.prompts.PromptProcessor`
→ :class:`~l2vsd_core.score.LoRAScore` (sharing the prior's UNet; none for ``sds``) → field, background, renderer →
:class:`~l2vsd_core.optimize.Stage1Optimizer` ``.run`` → :func:`~l2vsd_core.export.extract_mesh` +
:func:`~l2vsd_core.export.bake_texture` + :func:`~l2vsd_core.export.save_mesh` → turntable GIF → loss curves.

Outputs in ``--out DIR``: ``config.json`` (every option, written first), ``checkpoint.safetensors`` (+ ``.json``
sidecar; periodic and final, by the loop), ``model.glb``, ``turntable.gif``, ``curves.png`` (loss terms over steps;
the raw numbers in ``curves.json``).  Every file is written atomically.  ``--resume`` loads
``DIR/checkpoint.safetensors`` and continues to ``--steps``.

``--stages 2`` / ``3`` go on after stage 1 with ProlificDreamer's geometry refinement
(:class:`~l2vsd_core.mesh.refine.GeometryRefiner`, DMTet initialised from the stage-1 density at ``--threshold``)
and then its texture refinement (:class:`~l2vsd_core.mesh.refine.TextureRefiner` on the fixed refined mesh; a fresh
colour field, background and LoRA, as threestudio's stages each start anew), each with its own checkpoint,
``geometry.safetensors`` / ``texture.safetensors`` (+ ``.json``), and curves, ``geometry_curves.png`` / ``.json`` and
``texture_curves.png`` / ``.json``.  ``model.glb`` and ``turntable.gif`` then come from the last stage: the refined
mesh textured by the stage-1 colour field (stage 2) or by the texture stage's field (stage 3).  With ``--resume`` a
stage continues from its checkpoint when the stage before it did not run further in this call (otherwise the stale
checkpoint is replaced).  The progress terms carry ``stage`` (1, 2, 3) when more than one stage runs.

A stop request (``should_stop``, or Ctrl-C in the CLI: the first one stops after the current step) writes the
checkpoint and skips the export; a :class:`KeyboardInterrupt` raised inside a step also writes the checkpoint (of
the last finished step count) before propagating.  User errors raise :class:`GenerateError` (or the loaders'
``ValueError`` / ``FileNotFoundError``); the CLI turns them into a one-line message and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from .files import atomic_write, atomic_write_text

__all__ = ["GenerateError", "add_generate_arguments", "generate", "options_from_args", "CONFIG_OPTIONS",
           "CHECKPOINT_NAME", "OUTPUT_NAMES", "STAGE_CHECKPOINTS"]

CHECKPOINT_NAME = "checkpoint.safetensors"
DEFAULT_MAX_FACES = 200_000
OUTPUT_NAMES = {"checkpoint": CHECKPOINT_NAME, "mesh": "model.glb", "turntable": "turntable.gif",
                "curves": "curves.png", "curves_data": "curves.json", "config": "config.json"}
# stages 2 and 3: name → (stage number, checkpoint file); curves go to "<name>_curves.png" / ".json"
STAGE_CHECKPOINTS = {"geometry": (2, "geometry.safetensors"), "texture": (3, "texture.safetensors")}

# Stage1Config field → CLI option dest (every Stage1Config setting is reachable; ``distill`` has its own options and
# ``checkpoint_path`` is ``DIR/checkpoint.safetensors``)
CONFIG_OPTIONS = {
    "steps": "steps", "seed": "seed", "batch_size": "batch_size", "widths": "widths",
    "resolution_milestones": "milestones", "lr_encoding": "lr_encoding", "lr_network": "lr_network",
    "lr_background": "lr_background", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay",
    "lambda_sparsity": "lambda_sparsity", "lambda_opaque": "lambda_opaque", "lambda_z_variance": "lambda_z_variance",
    "lambda_orient": "lambda_orient", "lambda_image": "lambda_image", "checkpoint_every": "checkpoint_every", "preview_every": "preview_every",
    "preview_resolution": "preview_resolution", "preview_views": "preview_views",
    "preview_elevation": "preview_elevation", "preview_distance": "preview_distance", "preview_fovy": "preview_fovy",
    "radius": "radius", "num_samples_per_ray": "samples_per_ray", "grid_resolution": "grid_resolution",
    "grid_update_every": "grid_update_every", "grid_decay": "grid_decay", "grid_threshold": "grid_threshold",
    "camera_distance_range": "camera_distance_range", "fovy_range": "fovy_range",
    "elevation_range": "elevation_range",
}
DISTILL_OPTIONS = {"method": "method", "guidance_scale": "guidance_scale", "eta": "eta", "lora_steps": "lora_steps",
                   "esd_lambda": "esd_lambda", "jvp_mode": "jvp_mode", "fd_rel_step": "fd_rel_step",
                   "weighting": "weighting", "grad_clip": "grad_clip"}


class GenerateError(ValueError):
    """A problem with the user's input (bad option, missing file); the CLI prints it as one line."""


# --------------------------------------------------------------------------------------------------------- parsing
def _ints(text: str) -> tuple:
    text = text.strip()
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 64,512; got {text!r}") from None


def _floats(n: Optional[int] = None):
    def parse(text: str) -> tuple:
        try:
            vals = tuple(float(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers; got {text!r}") from None
        if n is not None and len(vals) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers; got {text!r}")
        if not all(math.isfinite(v) for v in vals):
            raise argparse.ArgumentTypeError(f"expected finite numbers; got {text!r}")
        return vals
    parse.__name__ = "numbers"
    return parse


def _schedule(text: str):
    """A number, or threestudio's schedule ``start_step,v0,v1,end_step``."""
    vals = _floats()(text)
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 4:
        return [int(vals[0]) if vals[0].is_integer() else vals[0], vals[1], vals[2],
                int(vals[3]) if vals[3].is_integer() else vals[3]]
    raise argparse.ArgumentTypeError(f"expected a number or start_step,v0,v1,end_step; got {text!r}")


def _threshold(text: str):
    if text == "auto":
        return "auto"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a density value; got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a finite density value; got {text!r}")
    return v


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``generate`` options (defaults: ProlificDreamer stage 1 via :class:`Stage1Config`)."""
    from .distill import DistillConfig, METHODS, WEIGHTINGS
    from .jvp import JVP_MODES
    from .optimize import Stage1Config
    from .scene.hashgrid import HashGridConfig

    c, d, h = Stage1Config(), DistillConfig(), HashGridConfig()
    j = lambda v: ",".join(str(x) for x in v)  # noqa: E731
    g = parser.add_argument_group("run")
    g.add_argument("--prompt", required=True, help="the text to generate")
    g.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")
    g.add_argument("--prior", required=True, help="diffusers folder or single-file SD 1.x/2.x .safetensors")
    g.add_argument("--out", required=True, help="output folder (created)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors up to --steps")
    g.add_argument("--steps", type=int, default=c.steps, help=f"total steps (default {c.steps})")
    g.add_argument("--seed", type=int, default=c.seed)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = parser.add_argument_group("prior and LoRA")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    g.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="override the prior's prediction type (768-v models)")
    g.add_argument("--config-dir", default=None, help="single files only: diffusers-layout config folder")
    g.add_argument("--tokenizer-dir", default=None, help="a local tokenizer folder to use instead of the model's")
    g.add_argument("--lora-rank", type=int, default=4)
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    g.add_argument("--lora-lr", type=float, default=1e-4)
    g.add_argument("--camera-dropout", type=float, default=0.1, help="LoRA camera-condition dropout")
    g.add_argument("--lora-last-layer", default="attention", help="what l2vsd_last's 'last layer' is")
    g = parser.add_argument_group("score distillation")
    g.add_argument("--method", default=d.method, choices=METHODS)
    g.add_argument("--guidance-scale", type=float, default=d.guidance_scale)
    g.add_argument("--eta", type=float, default=d.eta, help="lookahead step of l2vsd")
    g.add_argument("--lora-steps", type=int, default=d.lora_steps, help="gamma: LoRA updates per step")
    g.add_argument("--esd-lambda", type=float, default=d.esd_lambda)
    g.add_argument("--jvp-mode", default=d.jvp_mode, choices=("auto",) + JVP_MODES)
    g.add_argument("--fd-rel-step", type=float, default=d.fd_rel_step)
    g.add_argument("--weighting", default=d.weighting, choices=WEIGHTINGS)
    g.add_argument("--grad-clip", type=_schedule, default=None, help="number or start,v0,v1,end")
    g.add_argument("--min-step-percent", type=_schedule, default=d.timesteps.min_step_percent)
    g.add_argument("--max-step-percent", type=_schedule, default=d.timesteps.max_step_percent)
    g.add_argument("--sqrt-anneal", action="store_true", help="HiFA's deterministic timestep annealing")
    g = parser.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=c.batch_size)
    g.add_argument("--widths", type=_ints, default=c.widths, help=f"render widths (default {j(c.widths)})")
    g.add_argument("--milestones", type=_ints, default=c.resolution_milestones,
                   help=f"steps where the next width starts (default {j(c.resolution_milestones)})")
    g.add_argument("--lr-encoding", type=float, default=c.lr_encoding)
    g.add_argument("--lr-network", type=float, default=c.lr_network)
    g.add_argument("--lr-background", type=float, default=c.lr_background)
    g.add_argument("--betas", type=_floats(2), default=c.betas)
    g.add_argument("--eps", type=float, default=c.eps)
    g.add_argument("--weight-decay", type=float, default=c.weight_decay)
    g.add_argument("--lambda-sparsity", type=_schedule, default=c.lambda_sparsity)
    g.add_argument("--lambda-opaque", type=_schedule, default=c.lambda_opaque)
    g.add_argument("--lambda-z-variance", type=_schedule, default=c.lambda_z_variance, help="HiFA: 300")
    g.add_argument("--lambda-orient", type=_schedule, default=c.lambda_orient,
                   help="orientation loss; needs --normal-type (stage 1 default: 0, no normals)")
    g.add_argument("--lambda-image", type=_schedule, default=c.lambda_image,
                   help="HiFA's image-space distillation loss (threestudio lambda_vsd_img; HiFA: 0.01)")
    g.add_argument("--checkpoint-every", type=int, default=c.checkpoint_every, help="0: only at the end / on stop")
    g.add_argument("--preview-every", type=int, default=0, help="orbit preview PNG every N steps (0: none)")
    g.add_argument("--preview-resolution", type=int, default=c.preview_resolution)
    g.add_argument("--preview-views", type=int, default=c.preview_views)
    g.add_argument("--preview-elevation", type=float, default=c.preview_elevation)
    g.add_argument("--preview-distance", type=float, default=c.preview_distance)
    g.add_argument("--preview-fovy", type=float, default=c.preview_fovy)
    g.add_argument("--camera-distance-range", type=_floats(2), default=c.camera_distance_range)
    g.add_argument("--fovy-range", type=_floats(2), default=c.fovy_range)
    g.add_argument("--elevation-range", type=_floats(2), default=c.elevation_range)
    g = parser.add_argument_group("scene")
    g.add_argument("--radius", type=float, default=c.radius, help="half-size of the scene box")
    g.add_argument("--samples-per-ray", type=int, default=c.num_samples_per_ray)
    g.add_argument("--grid-resolution", type=int, default=c.grid_resolution, help="occupancy grid")
    g.add_argument("--grid-update-every", type=int, default=c.grid_update_every)
    g.add_argument("--grid-decay", type=float, default=c.grid_decay)
    g.add_argument("--grid-threshold", type=float, default=c.grid_threshold)
    g.add_argument("--levels", type=int, default=h.n_levels, help="hash-grid levels")
    g.add_argument("--features-per-level", type=int, default=h.n_features_per_level)
    g.add_argument("--log2-hashmap-size", type=int, default=h.log2_hashmap_size)
    g.add_argument("--base-resolution", type=int, default=h.base_resolution)
    g.add_argument("--max-resolution", type=float, default=4096.0,
                   help="finest hash-grid resolution (sets the per-level scale; ProlificDreamer: 4096)")
    g.add_argument("--mlp-neurons", type=int, default=64)
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "tcnn"], help="hash-grid backend")
    g.add_argument("--background-aug-prob", type=float, default=0.5,
                   help="probability of a random solid background colour per training render (ProlificDreamer: "
                        "0.5; 0 for a prior that only knows one background)")
    g.add_argument("--background-color", type=_floats(3), default=None, metavar="R,G,B",
                   help="a fixed background colour in [0, 1] instead of the learned environment map (no "
                        "augmentation); the toy world's prior knows only white: 1,1,1")
    g.add_argument("--normal-type", default="none", choices=["none", "finite_difference", "analytic"],
                   help="field normals (stage 1: none; --lambda-orient needs them)")
    from .mesh.refine import GeometryConfig, TextureConfig

    gc, tc = GeometryConfig(), TextureConfig()
    g = parser.add_argument_group("refinement (stages 2 and 3)")
    g.add_argument("--stages", type=int, default=1, choices=(1, 2, 3),
                   help="1: NeRF only; 2: + DMTet geometry refinement; 3: + texture refinement (ProlificDreamer)")
    g.add_argument("--geometry-steps", type=int, default=gc.steps)
    g.add_argument("--geometry-resolution", type=int, default=gc.resolution, help="render size of stage 2")
    g.add_argument("--dmtet-resolution", type=int, default=gc.dmtet_resolution,
                   help="DMTet cubes per axis over the object's box (64 ~ threestudio's 128 tets)")
    g.add_argument("--geometry-method", default=gc.distill.method, choices=METHODS,
                   help="estimator on the normal maps (ProlificDreamer: sds)")
    g.add_argument("--geometry-guidance-scale", type=float, default=gc.distill.guidance_scale)
    g.add_argument("--texture-steps", type=int, default=tc.steps)
    g.add_argument("--texture-resolution", type=int, default=tc.resolution, help="render size of stage 3")
    g.add_argument("--texture-method", default=None, choices=METHODS,
                   help="estimator of stage 3 (default: --method; its other settings are stage 1's)")
    g = parser.add_argument_group("export")
    g.add_argument("--mesh-resolution", type=int, default=128, help="marching-cubes grid")
    g.add_argument("--threshold", type=_threshold, default="auto",
                   help="density level of the surface (export; with --stages 2/3 the DMTet initialisation), or auto")
    g.add_argument("--max-faces", type=int, default=DEFAULT_MAX_FACES,
                   help="decimate the isosurface to at most this many faces before UV unwrapping")
    g.add_argument("--texture-size", type=int, default=1024)
    g.add_argument("--turntable-views", type=int, default=30)
    g.add_argument("--turntable-resolution", type=int, default=128)
    return parser


def options_from_args(args: argparse.Namespace) -> dict:
    opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    opts.pop("command", None)
    return opts


def _defaults() -> dict:
    return options_from_args(add_generate_arguments(argparse.ArgumentParser()).parse_args(
        ["--prompt", "x", "--prior", "x", "--out", "x"]))


# -------------------------------------------------------------------------------------------------------- building
def _check_options(o: dict) -> Path:
    if not str(o.get("prompt") or "").strip():
        raise GenerateError("--prompt must be a non-empty text")
    steps = o["steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise GenerateError(f"--steps must be an integer >= 1; got {steps!r}")
    for name in ("mesh_resolution", "texture_size", "turntable_views", "turntable_resolution", "levels",
                 "log2_hashmap_size", "lora_rank", "max_faces"):
        v = o.get(name, DEFAULT_MAX_FACES if name == "max_faces" else None)
        least = {"mesh_resolution": 2, "texture_size": 8, "max_faces": 4}.get(name, 1)
        if not isinstance(v, int) or v < least:
            raise GenerateError(f"--{name.replace('_', '-')} is too small: {v!r}")
    orient = o.get("lambda_orient", 0.0)
    if (orient if isinstance(orient, (int, float)) else max(orient[1], orient[2])) > 0 \
            and o.get("normal_type", "none") == "none":
        raise GenerateError("--lambda-orient > 0 needs normals from the field: add --normal-type finite_difference "
                            "(or analytic)")
    aug = o.get("background_aug_prob", 0.5)
    if not isinstance(aug, (int, float)) or not 0.0 <= aug <= 1.0:
        raise GenerateError(f"--background-aug-prob must be a number in [0, 1]; got {aug!r}")
    color = o.get("background_color")
    if color is not None and (not isinstance(color, (list, tuple)) or len(color) != 3
                              or not all(isinstance(c, (int, float)) and 0.0 <= c <= 1.0 for c in color)):
        raise GenerateError(f"--background-color must be three numbers in [0, 1] (R,G,B); got {color!r}")
    stages = o.get("stages", 1)
    if stages not in (1, 2, 3) or isinstance(stages, bool):
        raise GenerateError(f"--stages must be 1, 2 or 3 (NeRF; + geometry refinement; + texture); got {stages!r}")
    if stages > 1:
        for name, least in (("geometry_steps", 1), ("geometry_resolution", 1), ("dmtet_resolution", 2),
                            ("texture_steps", 1), ("texture_resolution", 1)):
            v = o.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise GenerateError(f"--{name.replace('_', '-')} must be an integer >= {least}; got {v!r}")
    if o.get("threads") is not None and o["threads"] < 1:
        raise GenerateError(f"--threads must be >= 1; got {o['threads']!r}")
    out = Path(o["out"]).expanduser()
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise GenerateError(f"--out {str(out)!r}: {str(p)!r} is an existing file, not a folder")
    if o.get("resume"):
        ckpt = out / CHECKPOINT_NAME
        if not ckpt.is_file():
            raise GenerateError(f"--resume: no checkpoint to resume from: looked for {str(ckpt)!r}")
    return out


def _stage1_config(o: dict, out: Path):
    from .distill import DistillConfig
    from .optimize import Stage1Config
    from .schedules import TimestepSampler

    timesteps = TimestepSampler(1000, o["min_step_percent"], o["max_step_percent"], sqrt_anneal=o["sqrt_anneal"],
                                max_steps=o["steps"])
    distill = DistillConfig(timesteps=timesteps, **{f: o[k] for f, k in DISTILL_OPTIONS.items()})
    kw = {f: (tuple(o[k]) if isinstance(o[k], list) and f not in ("lambda_sparsity", "lambda_opaque",
                                                                   "lambda_z_variance", "lambda_orient",
                                                                   "lambda_image") else o[k])
          for f, k in CONFIG_OPTIONS.items()}
    return Stage1Config(distill=distill, checkpoint_path=str(out / CHECKPOINT_NAME), **kw)


def _refine_configs(o: dict, out: Path) -> dict:
    """The stage-2 and stage-3 configs for ``--stages`` (empty for 1): threestudio's recipes, with the run's cameras,
    previews, checkpoint cadence and (for the texture) stage 1's estimator settings and learning rates."""
    from .distill import DistillConfig
    from .mesh.refine import GeometryConfig, TextureConfig
    from .schedules import TimestepSampler

    shared = dict(seed=o["seed"], batch_size=o["batch_size"], betas=tuple(o["betas"]), eps=o["eps"],
                  checkpoint_every=o["checkpoint_every"], preview_every=o["preview_every"],
                  preview_resolution=o["preview_resolution"], preview_views=o["preview_views"],
                  preview_elevation=o["preview_elevation"], preview_distance=o["preview_distance"],
                  preview_fovy=o["preview_fovy"], camera_distance_range=tuple(o["camera_distance_range"]),
                  fovy_range=tuple(o["fovy_range"]), elevation_range=tuple(o["elevation_range"]))
    method_knobs = {k: o[k] for k in ("eta", "lora_steps", "esd_lambda", "jvp_mode", "fd_rel_step")}
    configs = {}
    if o["stages"] >= 2:
        default = GeometryConfig().distill
        timesteps = dataclasses.replace(default.timesteps, max_steps=o["geometry_steps"])
        distill = DistillConfig(method=o["geometry_method"], guidance_scale=o["geometry_guidance_scale"],
                                weighting=default.weighting, timesteps=timesteps, **method_knobs)
        configs["geometry"] = GeometryConfig(
            steps=o["geometry_steps"], resolution=o["geometry_resolution"], distill=distill,
            dmtet_resolution=o["dmtet_resolution"], isosurface_threshold=o["threshold"],
            checkpoint_path=str(out / STAGE_CHECKPOINTS["geometry"][1]), **shared)
    if o["stages"] >= 3:
        timesteps = TimestepSampler(1000, o["min_step_percent"], o["max_step_percent"],
                                    sqrt_anneal=o["sqrt_anneal"], max_steps=o["texture_steps"])
        knobs = {f: o[k] for f, k in DISTILL_OPTIONS.items()}
        knobs["method"] = o.get("texture_method") or o["method"]
        distill = DistillConfig(timesteps=timesteps, **knobs)
        configs["texture"] = TextureConfig(
            steps=o["texture_steps"], resolution=o["texture_resolution"], distill=distill,
            lr_encoding=o["lr_encoding"], lr_network=o["lr_network"], lr_background=o["lr_background"],
            weight_decay=o["weight_decay"], checkpoint_path=str(out / STAGE_CHECKPOINTS["texture"][1]), **shared)
    return configs


def _lora_score(o: dict, prior, **kw):
    """A fresh LoRA score on the prior's UNet (each stage trains its own, as threestudio's stages each start a new
    guidance); ``kw``: e.g. another ``adapter_name`` next to stage 1's."""
    import warnings

    import torch
    from .score import LoRAScore

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # peft initialises it from the global RNG
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # one adapter per stage, on purpose
        torch.manual_seed(o["seed"])
        return LoRAScore(prior.unet, prior.alphas_cumprod, prior.prediction_type, rank=o["lora_rank"],
                         alpha=o["lora_alpha"], lr=o["lora_lr"], camera_dropout=o["camera_dropout"],
                         seed=o["seed"], last_layer=o["lora_last_layer"], **kw)


def _hashgrid(o: dict):
    from .scene.hashgrid import HashGridConfig

    levels = o["levels"]
    scale = 1.0 if levels == 1 else math.exp(math.log(max(o["max_resolution"] / o["base_resolution"], 1.0))
                                                 / (levels - 1))
    return HashGridConfig(n_levels=levels, n_features_per_level=o["features_per_level"],
                          log2_hashmap_size=o["log2_hashmap_size"], base_resolution=o["base_resolution"],
                          per_level_scale=scale)


def _background(o: dict, seed: int):
    from .scene.field import BackgroundConfig, EnvironmentBackground

    if o.get("background_color") is not None:
        from .scene.field import SolidBackground
        return SolidBackground(o["background_color"])
    aug = float(o.get("background_aug_prob", BackgroundConfig.random_aug_prob))
    return EnvironmentBackground(BackgroundConfig(random_aug=aug > 0, random_aug_prob=aug), seed=seed)


def _scene(o: dict, device):
    from .scene.field import FieldConfig, ImplicitVolume

    grid = _hashgrid(o)
    field = ImplicitVolume(FieldConfig(radius=o["radius"], hashgrid=grid, backend=o["backend"],
                                       mlp_neurons=o["mlp_neurons"],
                                       normal_type=None if o.get("normal_type", "none") == "none"
                                       else o["normal_type"]),
                          seed=o["seed"])
    background = _background(o, o["seed"] + 1)
    return field.to(device), background.to(device)


def write_curves(history: list, path: Path) -> Path:
    """Plot every ``loss*`` term of ``history`` (list of step → terms dicts) over steps; atomic PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for t in history for k in t if k.startswith("loss")})
    fig, axes = plt.subplots(len(keys) or 1, 1, figsize=(7, 1.8 * max(len(keys), 1) + 0.6), sharex=True,
                             squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(t["done"], t[key]) for t in history if key in t and math.isfinite(t[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, lw=1, marker="." if len(pts) < 50 else None)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    if not keys:
        axes[0, 0].text(0.5, 0.5, "no steps", ha="center", va="center")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    finally:
        plt.close(fig)
    return path


class _Interrupts:
    """In the main thread: the first SIGINT asks the loop to stop after the current step (checkpoint written), a
    second one raises KeyboardInterrupt."""

    def __init__(self):
        self.requested, self._old = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                if self.requested:
                    raise KeyboardInterrupt
                self.requested = True
                print("\ninterrupt: stopping after this step and writing the checkpoint (Ctrl-C again to abort)",
                      file=sys.stderr, flush=True)
            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- generate
def generate(options: dict, progress: Optional[Callable] = None,
             should_stop: Optional[Callable[[], bool]] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Run stage 1 (and stages 2, 3 with ``options["stages"]``) and the export for ``options`` (the CLI's options
    as a dict; missing keys take the defaults).

    ``progress(done, total, terms)`` after every step (of the running stage; ``terms["stage"]`` says which when
    more than one runs); ``should_stop()`` before every step (true: checkpoint, no export).  Returns ``{"out",
    "step" (stage 1's), "stopped", "paths": {name: path}, "warnings": [...]}``, plus ``"stage_steps"`` with more
    than one stage.
    """
    log = log or (lambda m: _log(m))
    o = _defaults()
    o.update(options)
    out = _check_options(o)

    import torch
    from .optimize import Stage1Optimizer
    from .prior import load_prior
    from .prompts import PromptProcessor

    if o.get("threads"):
        torch.set_num_threads(int(o["threads"]))
    config = _stage1_config(o, out)  # validates every stage-1 value before the (slow) prior load
    refine_configs = _refine_configs(o, out)  # and those of stages 2 and 3
    prior = load_prior(o["prior"], device=o["device"], dtype=o["dtype"], prediction_type=o["prediction_type"],
                       tokenizer_dir=o["tokenizer_dir"], config_dir=o["config_dir"])
    config.check_prior(prior)
    for refine_config in refine_configs.values():
        refine_config.check_prior(prior)
    prompts = PromptProcessor(prior.encode_text, o["prompt"], negative_prompt=o["negative_prompt"])
    score = _lora_score(o, prior) if config.distill.needs_trainable_score else None
    field, background = _scene(o, prior.device)
    renderer = config.make_renderer().to(prior.device)
    opt = Stage1Optimizer(prior, score, prompts, field, background, renderer, config)
    # everything is validated: only now create the folder and record the options
    out.mkdir(parents=True, exist_ok=True)
    recorded = {"options": o, "stage1": config.to_json(), **{k: c.to_json() for k, c in refine_configs.items()}}
    atomic_write_text(out / OUTPUT_NAMES["config"], json.dumps(recorded, indent=1, default=str))

    ckpt = out / CHECKPOINT_NAME
    curves_json = out / OUTPUT_NAMES["curves_data"]
    history: list = []
    if not o["resume"]:
        # a fresh stage 1 makes the later stages' checkpoints in this folder stale: a later --resume --stages 2
        # would otherwise continue an old geometry on top of the new NeRF
        for _number, name in STAGE_CHECKPOINTS.values():
            for path in (out / name, out / f"{name}.json"):
                path.unlink(missing_ok=True)
    if o["resume"]:
        meta = opt.load_checkpoint(ckpt)
        log(f"resumed from {ckpt} at step {meta['step']}")
        if curves_json.is_file():
            try:
                history = [t for t in json.loads(curves_json.read_text()) if t.get("done", 0) <= opt.global_step]
            except (ValueError, TypeError):
                history = []
    start = opt.global_step

    def callback(done, terms, preview):
        history.append({"done": done, **{k: v for k, v in terms.items() if isinstance(v, float)}})
        if preview is not None:
            from PIL import Image
            import numpy as np
            img = Image.fromarray((preview.numpy() * 255).round().astype(np.uint8))
            img.save(out / f"preview_{done:06d}.png")
        if progress is not None:
            progress(done, config.steps, {**terms, "stage": 1.0} if refine_configs else terms)

    result = {"out": str(out), "stopped": False, "paths": {}, "warnings": []}
    with _Interrupts() as interrupts:
        stop = lambda: interrupts.requested or (should_stop is not None and bool(should_stop()))  # noqa: E731
        try:
            opt.run(callback=callback, should_stop=stop)
        except KeyboardInterrupt:
            opt.save_checkpoint(ckpt)
            atomic_write_text(curves_json, json.dumps(history))
            raise
    result["step"] = opt.global_step
    result["paths"]["checkpoint"] = str(ckpt)
    atomic_write_text(curves_json, json.dumps(history))
    result["paths"]["curves"] = str(write_curves(history, out / OUTPUT_NAMES["curves"]))
    if opt.global_step < config.steps:
        result["stopped"] = True
        log(f"stopped at step {opt.global_step}/{config.steps}; checkpoint {ckpt} (continue with --resume)")
        return result
    if start >= config.steps:
        log(f"checkpoint already at step {start} >= --steps {config.steps}: "
            + ("exporting only" if not refine_configs else "going on with the next stage"))
    if refine_configs:
        return _refine(o, out, prior, prompts, field, background, refine_configs, opt.global_step > start, result,
                       progress, should_stop, log)

    from .export import bake_texture, decimate, extract_mesh, save_mesh, turntable_gif
    field.eval()
    background.eval()
    renderer.eval()
    t0 = time.perf_counter()
    try:
        mesh = extract_mesh(field, resolution=o["mesh_resolution"], threshold=o["threshold"])
    except ValueError as e:
        if "no surface" not in str(e):
            raise
        mesh = None
        msg = f"no mesh written: {e}"
        result["warnings"].append(msg)
        log("warning: " + msg)
    if mesh is not None:
        if len(mesh.faces) > o.get("max_faces", DEFAULT_MAX_FACES):
            log(f"decimating the isosurface from {len(mesh.faces)} to {o.get('max_faces', DEFAULT_MAX_FACES)} faces")
            mesh = decimate(mesh, o.get("max_faces", DEFAULT_MAX_FACES))
        mesh = bake_texture(mesh, field, texture_size=o["texture_size"])
        result["paths"]["mesh"] = str(save_mesh(mesh, out / OUTPUT_NAMES["mesh"]))
        log(f"mesh: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces ({time.perf_counter() - t0:.1f} s)")
    result["paths"]["turntable"] = str(turntable_gif(
        renderer, field, background, out / OUTPUT_NAMES["turntable"], n_views=o["turntable_views"],
        resolution=o["turntable_resolution"], elevation_deg=config.preview_elevation,
        distance=config.preview_distance, fovy_deg=config.preview_fovy))
    result["paths"]["config"] = str(out / OUTPUT_NAMES["config"])
    return result


# ------------------------------------------------------------------------------------------------- stages 2 and 3
def _run_stage(loop, name: str, o: dict, out: Path, may_resume: bool, result: dict, progress, should_stop,
               log) -> bool:
    """Run one refinement stage with its checkpoint, curves, previews and interrupt handling (as stage 1 in
    :func:`generate`); returns whether it did any step in this call.  Sets ``result["stopped"]`` on a stop."""
    number, ckpt_name = STAGE_CHECKPOINTS[name]
    ckpt, curves_json = out / ckpt_name, out / f"{name}_curves.json"
    history: list = []
    if may_resume and ckpt.is_file():
        meta = loop.load_checkpoint(ckpt)
        log(f"resumed the {name} stage from {ckpt} at step {meta['step']}")
        if curves_json.is_file():
            try:
                history = [t for t in json.loads(curves_json.read_text()) if t.get("done", 0) <= loop.global_step]
            except (ValueError, TypeError):
                history = []
    elif o["resume"] and ckpt.is_file():
        log(f"the stage before the {name} stage ran further: {ckpt} is out of date, starting the {name} stage anew")
    start, total = loop.global_step, loop.config.steps

    def callback(done, terms, preview):
        history.append({"done": done, **{k: v for k, v in terms.items() if isinstance(v, float)}})
        if preview is not None:
            from PIL import Image
            import numpy as np
            Image.fromarray((preview.numpy() * 255).round().astype(np.uint8)).save(
                out / f"preview_{name}_{done:06d}.png")
        if progress is not None:
            progress(done, total, {**terms, "stage": float(number)})

    with _Interrupts() as interrupts:
        stop = lambda: interrupts.requested or (should_stop is not None and bool(should_stop()))  # noqa: E731
        try:
            loop.run(callback=callback, should_stop=stop, checkpoint_path=ckpt)
        except KeyboardInterrupt:
            loop.save_checkpoint(ckpt)
            atomic_write_text(curves_json, json.dumps(history))
            raise
    result["stage_steps"][name] = loop.global_step
    result["paths"][f"{name}_checkpoint"] = str(ckpt)
    atomic_write_text(curves_json, json.dumps(history))
    result["paths"][f"{name}_curves"] = str(write_curves(history, out / f"{name}_curves.png"))
    if loop.global_step < total:
        result["stopped"] = True
        log(f"stopped at step {loop.global_step}/{total} of the {name} stage; checkpoint {ckpt} (continue with "
            f"--resume)")
    return loop.global_step > start


def _refine(o: dict, out: Path, prior, prompts, field, background, configs: dict, stage1_ran: bool, result: dict,
            progress, should_stop, log) -> dict:
    """Stages 2 (and 3) after a finished stage 1, then the GLB and turntable of the last one."""
    from .export import turntable_gif
    from .mesh.mesh_renderer import MeshRenderer
    from .mesh.refine import GeometryRefiner, TextureField, TextureRefiner, save_textured_mesh

    for module in (field, background):
        module.eval()
    result["stage_steps"] = {"stage1": result["step"]}
    geometry_config = configs["geometry"]
    geometry_score = (_lora_score(o, prior, adapter_name="l2vsd_geometry")
                      if geometry_config.distill.needs_trainable_score else None)
    try:
        geometry = GeometryRefiner.from_stage1(prior, geometry_score, prompts, field, geometry_config)
    except ValueError as e:  # stage 1 is saved: the user can fix --threshold (or train longer) and resume
        raise GenerateError(f"{e} (the option is --threshold; stage 1 is in {out / CHECKPOINT_NAME}: continue with "
                            f"--resume)") from e
    log(f"geometry stage: DMTet {geometry_config.dmtet_resolution}^3 over the box "
        f"{[round(float(x), 3) for x in geometry.dmtet.bbox.flatten()]} at density "
        f"{geometry.dmtet.isosurface_threshold:g}")
    previous_ran = _run_stage(geometry, "geometry", o, out, o["resume"] and not stage1_ran, result, progress,
                              should_stop, log)
    if result["stopped"]:
        return result
    mesh, color, shown_background = geometry.final_mesh(), field, background
    if "texture" in configs:
        texture_config = configs["texture"]
        texture_score = (_lora_score(o, prior, adapter_name="l2vsd_texture")
                         if texture_config.distill.needs_trainable_score else None)
        texture_field = TextureField(o["radius"], _hashgrid(o), backend=o["backend"], mlp_neurons=o["mlp_neurons"],
                                     seed=o["seed"] + 2).to(prior.device)
        texture_background = _background(o, o["seed"] + 3).to(prior.device)
        texture = TextureRefiner(prior, texture_score, prompts, mesh, texture_field, texture_background,
                                 texture_config)
        _run_stage(texture, "texture", o, out, o["resume"] and not previous_ran, result, progress, should_stop, log)
        if result["stopped"]:
            return result
        mesh, color, shown_background = texture.mesh, texture_field, texture_background
        for module in (texture_field, texture_background):
            module.eval()

    t0 = time.perf_counter()
    baked, path = save_textured_mesh(mesh, color, out / OUTPUT_NAMES["mesh"], texture_size=o["texture_size"],
                                     max_faces=o.get("max_faces", DEFAULT_MAX_FACES))
    result["paths"]["mesh"] = str(path)
    log(f"mesh: {len(baked.vertices)} vertices, {len(baked.faces)} faces ({time.perf_counter() - t0:.1f} s)")
    preview = configs["geometry"]
    result["paths"]["turntable"] = str(turntable_gif(
        MeshRenderer().bind(mesh), color, shown_background, out / OUTPUT_NAMES["turntable"],
        n_views=o["turntable_views"], resolution=o["turntable_resolution"], elevation_deg=preview.preview_elevation,
        distance=preview.preview_distance, fovy_deg=preview.preview_fovy))
    result["paths"]["config"] = str(out / OUTPUT_NAMES["config"])
    return result


# ------------------------------------------------------------------------------------------------------------ CLI
_STAGE_NAMES = {1: "stage 1 (NeRF)", 2: "stage 2 (geometry)", 3: "stage 3 (texture)"}


class _Bar:
    """tqdm when importable, else a plain ``\\r`` line on stderr."""

    def __init__(self, total: int, initial: int, desc: Optional[str] = None):
        self.total, self.initial, self.last, self.desc = total, initial, initial, desc
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                            desc=desc)
        except ImportError:
            self.bar = None
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int, terms: dict) -> None:
        loss = terms.get("loss", float("nan"))
        if self.bar is not None:
            self.bar.update(done - self.last)
            self.bar.set_postfix(loss=f"{loss:.4g}", res=int(terms.get("resolution", 0)), refresh=False)
        else:
            rate = (time.perf_counter() - self.t0) / max(done - self.initial, 1)
            print(f"\r{self.desc + ': ' if self.desc else ''}step {done}/{total}  loss {loss:.4g}  {rate:.2f} s/step",
                  end="", file=sys.stderr, flush=True)
        self.last = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def run_cli(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``generate`` from parsed arguments; user errors → ``parser.error`` (exit 2, one line)."""
    options = options_from_args(args)
    bar, stage = None, None

    def progress(done, total, terms):
        nonlocal bar, stage
        if options.get("no_progress"):
            return
        if bar is not None and terms.get("stage") != stage:  # a new stage: a new bar
            bar.close()
            bar = None
        if bar is None:
            stage = terms.get("stage")
            bar = _Bar(total, done - 1, None if stage is None else _STAGE_NAMES[int(stage)])
        bar(done, total, terms)

    def log(msg):
        nonlocal bar
        if bar is not None:  # finish the bar's line first
            bar.close()
            bar = None
        print(msg, file=sys.stderr, flush=True)

    try:
        result = generate(options, progress=progress, log=log)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        where = (os.path.join(options["out"], CHECKPOINT_NAME) if options.get("stages", 1) == 1
                 else f"{options['out']} (one per stage)")
        print(f"interrupted; checkpoint in {where} (continue with --resume)", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        if bar is not None:
            bar.close()
        parser.error(" ".join(str(e).split()))
    if bar is not None:
        bar.close()
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    if result["stopped"]:
        return 130
    return 0
