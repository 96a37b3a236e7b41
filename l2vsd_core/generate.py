"""``generate``: prompt → stage-1 NeRF (→ refined mesh → texture) → textured mesh, the whole run in one call.

:func:`generate` is a thin chain over :mod:`l2vsd_core.pipeline`: the run's :class:`~l2vsd_core.config.RunConfig`
(flat CLI-style options are laid over the prior's recipe, :mod:`l2vsd_core.recipes`) → :func:`load_prior` → prompts →
the stage-1 scene (:mod:`l2vsd_core.build`) → :func:`~l2vsd_core.pipeline.optimize_nerf` → with ``stages`` 2 and 3
:func:`~l2vsd_core.pipeline.refine_geometry` and :func:`~l2vsd_core.pipeline.refine_texture` → the last stage's GLB
and turntable.

Outputs in ``out``: ``config.json`` (every setting, written before the first step), each stage's checkpoint and
curves (:data:`~l2vsd_core.runner.STAGE_FILES`: ``checkpoint.safetensors`` + ``.json``, ``curves.json`` / ``.png``;
``geometry…``; ``texture…``), ``model.glb``, ``turntable.gif`` and, with ``preview_every``, ``preview_*.png``; every
file written atomically.  ``resume`` continues stage 1 from its checkpoint; a later stage continues from its own
when the stage before it did not run further in this call (otherwise its checkpoint is stale and it starts anew); a
fresh stage 1 deletes the later stages' checkpoints.

A stop request (``should_stop()``, or the CLI's first Ctrl-C) writes the checkpoint and skips the export; a
:class:`KeyboardInterrupt` inside a step writes the checkpoint of the last finished step, then propagates.  User
errors raise :class:`GenerateError` (or the loaders' ``ValueError`` / ``FileNotFoundError``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Union

from .config import RunConfig, from_options, option_defaults, scheduled_max
from .files import atomic_write_bytes, atomic_write_text
from .runner import STAGE_FILES, Hooks, ResumeError

__all__ = ["GenerateError", "generate", "run_config", "OUTPUT_NAMES"]

OUTPUT_NAMES = {"checkpoint": STAGE_FILES["nerf"][0], "mesh": "model.glb", "turntable": "turntable.gif",
                "curves": "curves.png", "curves_data": "curves.json", "config": "config.json"}
STAGE_NAMES = {1: "nerf", 2: "geometry", 3: "texture"}


class GenerateError(ValueError):
    """A problem with the user's input (bad option, missing file); the CLI prints it as one line."""


def run_config(options: Union[RunConfig, dict]) -> RunConfig:
    """A :class:`RunConfig` as is; flat options (``{"steps": 400, …}``) over the recipe of their ``prior``."""
    if isinstance(options, RunConfig):
        return options
    from .recipes import recipe_for

    options = {k: v for k, v in options.items() if k not in ("command", "no_progress")}
    try:
        return from_options({**recipe_for(options.get("prior", ""), options), **options})
    except ValueError as e:
        raise GenerateError(str(e)) from e


def _check(config: RunConfig) -> Path:
    if not str(config.prompt).strip():
        raise GenerateError("--prompt must be a non-empty text")
    if not str(config.prior).strip():
        raise GenerateError("--prior must name a prior: 'toy' (bundled), a diffusers folder or an SD .safetensors")
    if scheduled_max(config.nerf.lambda_orient) > 0 and config.scene.normal_type == "none":
        raise GenerateError("--lambda-orient > 0 needs normals from the field: add --normal-type finite_difference "
                            "(or analytic)")
    out = Path(config.out).expanduser()
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise GenerateError(f"--out {str(out)!r}: {str(p)!r} is an existing file, not a folder")
    if config.resume and not (out / OUTPUT_NAMES["checkpoint"]).is_file():
        raise GenerateError(f"--resume: no checkpoint to resume from: looked for "
                            f"{str(out / OUTPUT_NAMES['checkpoint'])!r}")
    return out


def _hooks(out: Path, number: int, stages: int, progress, should_stop, log, interrupts) -> Hooks:
    """The caller's progress (``terms["stage"]`` when several stages run), previews saved as PNGs."""
    name = STAGE_NAMES[number]

    def on_step(done, total, terms, preview):
        if preview is not None:
            from PIL import Image
            import numpy as np
            stem = "preview" if number == 1 else f"preview_{name}"
            Image.fromarray((preview.numpy() * 255).round().astype(np.uint8)).save(out / f"{stem}_{done:06d}.png")
        if progress is not None:
            progress(done, total, {**terms, "stage": float(number)} if stages > 1 else terms)

    return Hooks(progress=on_step, should_stop=should_stop, log=log,
                 **({"interrupts": interrupts} if interrupts is not None else {}))


def generate(options: Union[RunConfig, dict], progress: Optional[Callable] = None,
             should_stop: Optional[Callable[[], bool]] = None, log: Optional[Callable[[str], None]] = None,
             interrupts=None) -> dict:
    """Run stage 1 (and stages 2, 3) and the export.  ``progress(done, total, terms)`` after every step;
    ``should_stop()`` before every step (true: checkpoint, no export); ``interrupts``: the CLI's Ctrl-C handler
    (:class:`~l2vsd_core.runner.Hooks`).  Returns ``{"out", "step" (stage 1's), "stopped", "paths": {name: path},
    "warnings": [...]}``, plus ``"stage_steps"`` with more than one stage."""
    import torch

    from . import build, pipeline
    from .prior import load_prior
    from .stages import make_volume_renderer

    log = log or (lambda m: None)
    config = run_config(options)
    out = _check(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    prior = load_prior(config.prior, device=config.device, dtype=config.dtype,
                       prediction_type=config.prediction_type, tokenizer_dir=config.tokenizer_dir,
                       config_dir=config.config_dir)
    stage_configs = [config.nerf, config.geometry, config.texture][:config.stages]
    try:
        for stage_config in stage_configs:
            stage_config.check_prior(prior)
    except ValueError as e:
        raise GenerateError(str(e)) from e
    prompts = build.prompt_processor(prior, config.prompt, config.negative_prompt, config.front_threshold,
                                     config.back_threshold)
    field = build.nerf_field(config.scene, config.nerf.radius, config.nerf.seed).to(prior.device)
    background = build.background(config.background, config.nerf.seed + 1).to(prior.device)
    renderer = make_volume_renderer(config.nerf).to(prior.device)
    # everything is validated: only now create the folder and record the settings
    out.mkdir(parents=True, exist_ok=True)
    recorded = {"options": {**option_defaults(config), **{k: getattr(config, k) for k in
                                                          ("prompt", "negative_prompt", "prior", "out", "resume")}},
                "config": config.to_json()}
    record = out / OUTPUT_NAMES["config"]
    earlier = record.read_bytes() if config.resume and record.is_file() else None
    atomic_write_text(record, json.dumps(recorded, indent=1, default=str))

    def refused(e: Exception) -> GenerateError:
        """A checkpoint refused these settings before anything ran: the folder keeps the settings it was made with."""
        if earlier is not None:
            atomic_write_bytes(record, earlier)
        return GenerateError(str(e))
    if not config.resume:  # a fresh stage 1 makes the later stages' checkpoints stale
        for name in ("geometry", "texture"):
            for path in (out / STAGE_FILES[name][0], out / f"{STAGE_FILES[name][0]}.json"):
                path.unlink(missing_ok=True)

    hooks = lambda number: _hooks(out, number, config.stages, progress, should_stop, log, interrupts)  # noqa: E731
    result = {"out": str(out), "stopped": False, "paths": {}, "warnings": []}
    try:
        run = pipeline.optimize_nerf(prior, prompts, field, background, renderer, config.nerf, config.lora, out,
                                     config.resume, hooks(1))
    except ResumeError as e:
        raise refused(e) from e
    result["step"] = run.step
    result["paths"].update(checkpoint=str(out / OUTPUT_NAMES["checkpoint"]),
                           curves=str(_curves_png(out, "nerf", run.history)))
    if run.stopped:
        log(f"stopped at step {run.step}/{run.total}; checkpoint {result['paths']['checkpoint']} (continue with "
            f"--resume)")
        return {**result, "stopped": True}
    if not run.ran and config.resume:
        log(f"checkpoint already at step {run.step} >= --steps {run.total}: "
            + ("exporting only" if config.stages == 1 else "going on with the next stage"))
    mesh, color, shown = None, field, background
    view = _view(config.nerf if config.stages == 1 else config.geometry)
    if config.stages > 1:
        result["stage_steps"] = {"stage1": run.step}
        for module in (field, background):
            module.eval()
        ran = ran_any = run.ran
        for number in range(2, config.stages + 1):
            name = STAGE_NAMES[number]
            try:
                stage_run, mesh, color, shown = _refine(number, config, prior, prompts, field, background, mesh,
                                                        out, ran, hooks(number), log)
            except ResumeError as e:
                if ran_any:
                    raise GenerateError(str(e)) from e
                raise refused(e) from e
            result["stage_steps"][name] = stage_run.step
            result["paths"][f"{name}_checkpoint"] = str(out / STAGE_FILES[name][0])
            result["paths"][f"{name}_curves"] = str(_curves_png(out, name, stage_run.history))
            if stage_run.stopped:
                log(f"stopped at step {stage_run.step}/{stage_run.total} of the {name} stage; checkpoint "
                    f"{out / STAGE_FILES[name][0]} (continue with --resume)")
                return {**result, "stopped": True}
            ran = stage_run.ran
            ran_any = ran_any or ran
    _export(config, out, mesh, color, shown, renderer, view, result, log)
    result["paths"]["config"] = str(out / OUTPUT_NAMES["config"])
    return result


def _refine(number: int, config: RunConfig, prior, prompts, field, background, mesh, out: Path, previous_ran: bool,
            hooks, log):
    """Stage 2 or 3; → (its run, the mesh, its colour field, its background)."""
    from . import pipeline

    name = STAGE_NAMES[number]
    may_resume = config.resume and not previous_ran
    if config.resume and previous_ran and (out / STAGE_FILES[name][0]).is_file():
        log(f"the stage before the {name} stage ran further: {out / STAGE_FILES[name][0]} is out of date, "
            f"starting the {name} stage anew")
    if number == 2:  # a ResumeError goes up to generate: it knows whether anything ran before
        try:
            run, mesh, _ = pipeline.refine_geometry(prior, prompts, field, config.geometry, config.lora, out,
                                                    may_resume, hooks)
        except ValueError as e:
            if isinstance(e, ResumeError) or "no surface" not in str(e):
                raise
            raise GenerateError(f"{e} (the option is --threshold; stage 1 is in {out / OUTPUT_NAMES['checkpoint']}:"
                                f" continue with --resume)") from e
        return run, mesh, field, background
    run, stage = pipeline.refine_texture(prior, prompts, mesh, config.scene, config.background,
                                         float(field.radius), config.texture, config.lora, out, may_resume, hooks)
    return run, stage.mesh, stage.field, stage.background


def _view(stage_config) -> tuple:
    return stage_config.preview_elevation, stage_config.preview_distance, stage_config.preview_fovy


def _curves_png(out: Path, name: str, history: list) -> Path:
    from .plots import write_curves
    return write_curves(history, out / f"{STAGE_FILES[name][1]}.png")


def _export(config: RunConfig, out: Path, mesh, color, background, renderer, view, result: dict, log) -> None:
    """The last stage's GLB (stage 1: its iso-surface; a warning, not an error, when there is none) and turntable."""
    from . import pipeline

    mesh_path, turntable_path = out / OUTPUT_NAMES["mesh"], out / OUTPUT_NAMES["turntable"]
    if mesh is None:
        try:
            pipeline.export_nerf(color, config.export, mesh_path, log=log)
            result["paths"]["mesh"] = str(mesh_path)
        except ValueError as e:
            if "no surface" not in str(e):
                raise
            result["warnings"].append(f"no mesh written: {e}")
            log(f"warning: no mesh written: {e}")
        result["paths"]["turntable"] = str(pipeline.write_turntable(turntable_path, config.export, color, background,
                                                                    renderer=renderer, view=view))
        return
    pipeline.export_refined(mesh, color, config.export, mesh_path, log=log)
    result["paths"]["mesh"] = str(mesh_path)
    result["paths"]["turntable"] = str(pipeline.write_turntable(turntable_path, config.export, color, background,
                                                                mesh=mesh, view=view))
