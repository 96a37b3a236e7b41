"""Text → 3D on the bundled toy prior, scored: what ``make demo`` and ``bench quality`` run.

``run(prompt, method, out)`` is :func:`l2vsd_core.generate.generate` on the bundled prior with its recipe
(:data:`l2vsd_core.recipes.TOY`: stage 1 sized for the 32×32 world prior and two CPU cores) followed by
:func:`score_run`, which rebuilds the optimized scene from the run's ``config.json`` and checkpoint and writes
``metrics.json`` next to the GLB.

``metrics.json`` also holds ``mesh_iou``: how well the exported stage-1 GLB matches the field's volume renders (their
silhouette IoU from :data:`MESH_IOU_VIEWS` of the turntable's cameras at its resolution,
:func:`~l2vsd_core.toys.world.metrics.glb_volume_iou`), i.e. whether a mesh viewer shows what the turntable shows.

``run(..., stages=2 or 3)`` goes on in the same folder with :func:`refine_run`: ``generate --resume --stages k``,
which reuses the finished stage-1 checkpoint (and, for stage 3, the finished geometry one).  Since ``model.glb`` is always the last stage's, each stage's GLB is kept as ``model_s<k>.glb`` and
scored as what the user would get after that stage (``fidelity_s<k>``, ``frechet_s<k>``, ``iou_s<k>`` in
``metrics.json``, next to the stage-1 field's ``fidelity``, ``frechet``, ``iou``).

Methods are the engine's, plus the combinations the paper compares (:data:`METHOD_PRESETS`): ``esd`` is VSD with
ESD's λ = 0.5, ``l2esd`` L²-VSD with it, ``hifa`` VSD with HiFA's √-annealed timesteps, z-variance and image loss.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ...files import atomic_write_bytes, atomic_write_text
from ...prior.load import BUNDLED_PRIORS
from ...recipes import TOY, toy_anneal

BUNDLED_PRIOR = BUNDLED_PRIORS["toy"]
REFINE_KEYS = ("geometry_steps", "geometry_resolution", "dmtet_resolution", "texture_steps", "texture_resolution")
TOY_STAGE1 = {k: v for k, v in TOY.items() if k not in REFINE_KEYS}  # what a one-stage run records
TOY_REFINE = {k: TOY[k] for k in REFINE_KEYS}  # stages 2 and 3

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


FIELD_SCORES = ("fidelity", "frechet", "iou")  # of the stage-1 field; a stage's GLB scores carry "_s<stage>"
MESH_IOU_VIEWS = 12  # turntable views (evenly spaced) of the stage-1 GLB's silhouette IoU against the volume renders


def method_options(method: str) -> dict:
    """``generate``'s options of a method: a :data:`METHOD_PRESETS` name, optionally with the 2D study's variant
    after it (:func:`l2vsd_core.toys.image2d.parse_method`): ``sds@cfg100``, ``lvsd[gamma=5]``,
    ``l2vsd[paper,eta=0.001]``, ``l2esd[optimizer,eta=1]``.  ``ValueError`` names what is wrong."""
    from ..image2d import Variant, parse_method

    match = re.fullmatch(r"([a-z0-9_]+)((?:@cfg[^\[]*)?(?:\[.*\])?)", method.strip())
    if not match or match.group(1) not in METHOD_PRESETS:
        raise ValueError(f"method must be one of {', '.join(METHOD_PRESETS)}, optionally with a variant "
                         f"(sds@cfg100, l2vsd[paper,eta=0.001]); got {method!r}")
    options = dict(METHOD_PRESETS[match.group(1)])
    if match.group(2):
        variant = parse_method(options["method"] + match.group(2))
        plain = Variant(name=variant.name, method=variant.method)
        options.update({name: getattr(variant, name) for name in ("guidance_scale", "lookahead", "eta", "lora_steps")
                        if getattr(variant, name) != getattr(plain, name)})  # generate's options of the same names
    return options


def stage_glb(run_dir, stage: int) -> Path:
    """Where the GLB of ``stage`` is kept: ``model.glb`` is overwritten by every later stage."""
    return Path(run_dir) / f"model_s{stage}.glb"


def toy_options(prompt: str, method: str, out, seed: int = 0, steps: Optional[int] = None, stages: int = 1,
                **overrides) -> dict:
    """:func:`~l2vsd_core.generate.generate`'s options for the toy: the toy recipe (:data:`l2vsd_core.recipes.TOY`;
    the later stages' settings with ``stages`` 2 and 3), the method's preset, then ``overrides``."""
    preset = method_options(method)
    options = dict(TOY if stages > 1 else TOY_STAGE1, prompt=prompt, prior="toy", out=str(out), seed=int(seed))
    options["stages"] = int(stages)
    if steps is not None:
        options["steps"] = int(steps)
    options["max_step_percent"] = toy_anneal(options["steps"])  # ProlificDreamer's anneal, scaled to the run
    options.update(preset)
    options.update(overrides)
    return options


def load_run(run_dir, device: str = "cpu"):
    """(field, renderer, options) of a finished or stopped ``generate`` run, from its config.json and checkpoint."""
    from safetensors.torch import load_file
    from ...build import nerf_field
    from ...config import RunConfig
    from ...generate import OUTPUT_NAMES
    from ...scene.renderer import VolumeRenderer

    run_dir = Path(run_dir)
    recorded = json.loads((run_dir / OUTPUT_NAMES["config"]).read_text())
    options, config = recorded["options"], RunConfig.from_json(recorded["config"])
    field = nerf_field(config.scene, config.nerf.radius, config.nerf.seed).to(torch.device(device))
    tensors = load_file(str(run_dir / OUTPUT_NAMES["checkpoint"]))
    field.load_state_dict({k[len("field."):]: v for k, v in tensors.items() if k.startswith("field.")})
    renderer = VolumeRenderer(radius=float(options["radius"]), num_samples_per_ray=int(options["samples_per_ray"]))
    return field.eval(), renderer.eval(), options


def stage1_glb(run_dir) -> Optional[Path]:
    """The run's stage-1 GLB: ``model_s1.glb`` once a later stage ran, else ``model.glb`` of a one-stage run; None
    when there is none (no surface, or not exported yet)."""
    from ...generate import OUTPUT_NAMES

    run_dir = Path(run_dir)
    if stage_glb(run_dir, 1).is_file():
        return stage_glb(run_dir, 1)
    options = json.loads((run_dir / OUTPUT_NAMES["config"]).read_text())["options"]
    glb = run_dir / OUTPUT_NAMES["mesh"]
    return glb if int(options.get("stages", 1)) == 1 and glb.is_file() else None


def mesh_iou(run_dir, field=None) -> Optional[float]:
    """Silhouette IoU of the run's stage-1 GLB (:func:`stage1_glb`) against its field's volume renders, from
    :data:`MESH_IOU_VIEWS` evenly spaced cameras of the run's turntable orbit (the stage-1 preview's elevation,
    distance and fovy) at the turntable's resolution (:func:`~l2vsd_core.toys.world.metrics.glb_volume_iou`);
    None without a stage-1 GLB."""
    from ...config import RunConfig
    from ...generate import OUTPUT_NAMES
    from ...scene.cameras import orbit_cameras
    from .metrics import glb_volume_iou

    run_dir = Path(run_dir)
    glb = stage1_glb(run_dir)
    if glb is None:
        return None
    recorded = json.loads((run_dir / OUTPUT_NAMES["config"]).read_text())
    options, config = recorded["options"], RunConfig.from_json(recorded["config"])
    if field is None:
        field, _, options = load_run(run_dir)
    views = min(MESH_IOU_VIEWS, config.export.turntable_views)
    size = config.export.turntable_resolution
    cameras = orbit_cameras(views, config.nerf.preview_elevation, config.nerf.preview_distance,
                            config.nerf.preview_fovy, size, size)
    return glb_volume_iou(glb, field, cameras, float(options["radius"]), int(options["samples_per_ray"]))


def score_run(run_dir, prior=None, reference: Optional[torch.Tensor] = None,
              keep_field_scores: bool = False) -> dict:
    """Score a run of a world prompt and write ``metrics.json`` into it; returns the scores: the stage-1 field's
    (``fidelity``, ``frechet``, ``iou``; volume-rendered, as it was optimized), its GLB's ``mesh_iou`` against it
    (:func:`mesh_iou`; absent without a stage-1 GLB) and, for a run taken beyond stage 1, the kept GLB of every
    stage (``fidelity_s<k>``, ``frechet_s<k>``, ``iou_s<k>``; rasterized).
    ``keep_field_scores``: reuse the field's scores (and ``mesh_iou``) already in ``metrics.json`` (later stages load
    stage 1 and never change it, and volume-rendering the field is most of the scoring time)."""
    from ...prior import load_prior
    from .metrics import score_glb, score_model

    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.json"
    options = json.loads((run_dir / "config.json").read_text())["options"]
    prior = prior if prior is not None else load_prior(options["prior"], device="cpu")  # "toy" or a path
    known = json.loads(metrics_file.read_text()) if keep_field_scores and metrics_file.is_file() else {}
    field = None
    if all(name in known for name in FIELD_SCORES):
        scores = {name: known[name] for name in FIELD_SCORES}
    else:
        field, renderer, options = load_run(run_dir)
        scores = score_model(renderer, field, options["prompt"], prior, reference=reference).as_dict()
    if "mesh_iou" in known:
        scores["mesh_iou"] = known["mesh_iou"]
    else:
        matched = mesh_iou(run_dir, field)
        if matched is not None:
            scores["mesh_iou"] = matched
    for stage in (1, 2, 3):
        if stage_glb(run_dir, stage).is_file():
            glb = score_glb(stage_glb(run_dir, stage), options["prompt"], prior, reference=reference).as_dict()
            scores.update({f"{name}_s{stage}": value for name, value in glb.items()})
    atomic_write_text(metrics_file, json.dumps(scores, indent=1))
    return scores


def _forget_later_stages(run_dir: Path) -> None:
    """A fresh stage 1 makes the kept per-stage GLBs stale (``generate`` itself drops the later stages'
    checkpoints)."""
    for stage in (1, 2, 3):
        stage_glb(run_dir, stage).unlink(missing_ok=True)


def run(prompt: str, method: str, out, seed: int = 0, steps: Optional[int] = None, prior=None,
        reference: Optional[torch.Tensor] = None, log: Optional[Callable[[str], None]] = None,
        progress: Optional[Callable] = None, stages: int = 1, **overrides) -> dict:
    """Stage 1 + export + scores for one (prompt, method, seed), then stages 2.. ``stages`` with
    :func:`refine_run` (``overrides`` go to every stage); returns the scores with ``seconds`` (stage 1 and export,
    not scoring) and ``seconds_s<k>`` per later stage."""
    from ...generate import generate
    from ...prior import load_prior

    if stages not in (1, 2, 3):
        raise ValueError(f"stages must be 1, 2 or 3; got {stages!r}")
    out = Path(out)
    options = toy_options(prompt, method, out, seed, steps, **overrides)
    _forget_later_stages(out)
    start = time.perf_counter()
    result = generate(options, progress=progress, log=log or (lambda m: None))
    seconds = time.perf_counter() - start
    if result["stopped"]:
        return {"seconds": seconds, "paths": result["paths"], "stopped": True}
    if stages > 1 and prior is None:  # one prior (and one set of reference samples) for every stage's scores
        prior = load_prior(BUNDLED_PRIOR, device="cpu")
    scores = score_run(out, prior, reference)
    done = {**scores, "seconds": seconds, "paths": result["paths"], "stopped": False}
    for stage in range(2, stages + 1):
        later = refine_run(out, stage, prior, reference, log=log, progress=progress, **overrides)
        done.update(later)
        if later["stopped"]:
            break
    return done


def refine_run(out, stage: int, prior=None, reference: Optional[torch.Tensor] = None,
               log: Optional[Callable[[str], None]] = None, progress: Optional[Callable] = None,
               **overrides) -> dict:
    """Take a finished run in ``out`` on to ``stage`` (2: geometry, 3: texture; the stage before must be finished)
    and score it: ``generate`` with the run's recorded options (so stage 1 is loaded, never re-optimized), the toy
    recipe's later-stage settings and ``overrides``, ``stages=stage``, ``resume=True``.  Keeps the stage-1 GLB as
    ``model_s1.glb`` before stage 2 overwrites ``model.glb``, and this stage's as ``model_s<stage>.glb``.  Returns
    :func:`score_run`'s scores with ``seconds_s<stage>`` (the whole ``generate`` call: loading, the stage, its
    export and turntable), ``paths`` and ``stopped``."""
    from ...generate import OUTPUT_NAMES, generate

    if stage not in (2, 3):
        raise ValueError(f"refine_run takes a run on to stage 2 or 3; got {stage!r}")
    run_dir = Path(out)
    recorded = json.loads((run_dir / OUTPUT_NAMES["config"]).read_text())["options"]
    # generate --resume would go on optimizing an unfinished stage 1 (or run stage 2 inside the stage-3 call, its GLB
    # never kept): refuse instead
    stage1 = json.loads((run_dir / f"{OUTPUT_NAMES['checkpoint']}.json").read_text())
    if stage1["step"] < recorded["steps"]:
        raise ValueError(f"stage 1 in {run_dir} is not finished (step {stage1['step']} of {recorded['steps']}): "
                         f"finish it first (python -m l2vsd_core generate --resume, see its config.json)")
    if stage == 3 and not stage_glb(run_dir, 2).is_file():
        raise ValueError(f"{run_dir} has no finished stage 2 ({stage_glb(run_dir, 2).name}): run stage 2 first")
    glb = run_dir / OUTPUT_NAMES["mesh"]
    if stage == 2 and glb.is_file() and not stage_glb(run_dir, 1).is_file():
        atomic_write_bytes(stage_glb(run_dir, 1), glb.read_bytes())  # still stage 1's: stage 2 has not exported
    options = {**recorded, **TOY_REFINE, **overrides, "stages": stage, "resume": True, "out": str(run_dir)}
    start = time.perf_counter()
    result = generate(options, progress=progress, log=log or (lambda m: None))
    seconds = time.perf_counter() - start
    if result["stopped"]:
        return {f"seconds_s{stage}": seconds, "paths": result["paths"], "stopped": True}
    atomic_write_bytes(stage_glb(run_dir, stage), glb.read_bytes())
    scores = score_run(run_dir, prior, reference, keep_field_scores=True)
    return {**scores, f"seconds_s{stage}": seconds, "paths": result["paths"], "stopped": False}


def main(argv=None) -> int:
    """``python -m l2vsd_core.toys.world.demo [--prompt "a red cube"] [--method l2vsd] [--steps N] [--stages 1|2|3]
    [--out out/demo]``"""
    import argparse
    import sys
    from ...cli import StageBars

    parser = argparse.ArgumentParser(prog="python -m l2vsd_core.toys.world.demo",
                                     description="text → textured mesh on the bundled toy prior, with its scores")
    parser.add_argument("--prompt", default="a red cube", help="'a COLOR SHAPE' of the toy world")
    parser.add_argument("--method", default="l2vsd", choices=sorted(METHOD_PRESETS))
    parser.add_argument("--steps", type=int, default=TOY["steps"])
    parser.add_argument("--stages", type=int, default=1, choices=(1, 2, 3),
                        help="2: + geometry refinement, 3: + texture refinement (the toy recipe's sizes)")
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
    bars = StageBars(label=lambda stage: None if args.stages == 1 else f"stage {int(stage or 1)}")
    progress, log, close_bar = bars, bars.log, bars.close

    try:
        result = run(args.prompt, args.method, args.out, seed=args.seed, steps=args.steps, log=log,
                     progress=progress, stages=args.stages, **({"threads": args.threads} if args.threads else {}))
    except KeyboardInterrupt:
        close_bar()
        print(f"interrupted; continue with python -m l2vsd_core generate --resume (see {args.out}/config.json)",
              file=sys.stderr)
        return 130
    close_bar()
    if result["stopped"]:
        return 130
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    print(f"{args.prompt!r} with {args.method}, {args.steps} steps in {result['seconds']:.0f} s: prompt fidelity "
          f"{result['fidelity']:.3f}, Fréchet distance {result['frechet']:.1f}, silhouette IoU {result['iou']:.3f} "
          f"(metrics.json)")
    if "mesh_iou" in result:
        print(f"stage-1 GLB against the volume renders (turntable cameras): silhouette IoU {result['mesh_iou']:.3f} "
              f"(metrics.json: mesh_iou)")
    for stage in range(1, args.stages + 1) if args.stages > 1 else ():
        took = f" in {result[f'seconds_s{stage}']:.0f} s" if f"seconds_s{stage}" in result else ""
        print(f"GLB after stage {stage}{took}: prompt fidelity {result[f'fidelity_s{stage}']:.3f}, Fréchet distance "
              f"{result[f'frechet_s{stage}']:.1f}, silhouette IoU {result[f'iou_s{stage}']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
