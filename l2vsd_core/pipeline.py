"""Each stage as one call — its LoRA, its loop, its driver — and each export as one call: what ``generate`` chains
and what each ComfyUI node calls once.

==================  ===========================================================================================
``optimize_nerf``   stage 1 on a given field, background and renderer (:class:`~l2vsd_core.stages.NerfStage`)
``refine_geometry`` stage 2: a DMTet from the stage-1 density, refined on normal maps; → its final mesh
``refine_texture``  stage 3: a fresh colour field and background on the fixed mesh
``export_nerf``     iso-surface (cleaned, at the render-matched level) → decimation → UV atlas + baked texture →
                    GLB/OBJ/PLY
``export_refined``  a refined mesh → decimation → UV atlas + baked texture (colour field) → GLB/OBJ
``write_turntable`` an orbit GIF of either
==================  ===========================================================================================

Every stage call takes its folder (files: :data:`~l2vsd_core.runner.STAGE_FILES`), ``resume`` and the caller's
:class:`~l2vsd_core.runner.Hooks`, and returns the :class:`~l2vsd_core.runner.StageRun`.  A LoRA is made for the
stage (on ``lora_base``, a second copy of the prior, when given) and taken off the UNet when the stage ends.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from . import build
from .config import ExportConfig, GeometryConfig, LoRAConfig, NerfConfig, SceneConfig, BackgroundSettings, TextureConfig
from .runner import Hooks, StageRun, eval_mode, run_stage, stage_files

__all__ = ["optimize_nerf", "refine_geometry", "refine_texture", "export_nerf", "export_refined", "write_turntable",
           "TEXELS_PER_FACE"]

#: ``export_nerf`` decimates the iso-surface to at most ``texture_size² / TEXELS_PER_FACE`` faces (and ``max_faces``):
#: a face smaller than a few texels gets no texel of its own, and its corners read the neighbouring UV charts' colours
#: or the fill (the grid fitted to the object gives four times the faces of the box's grid at one resolution).
TEXELS_PER_FACE = 8


def optimize_nerf(prior, prompts, field, background, renderer, config: NerfConfig, lora: LoRAConfig, folder,
                  resume: bool = False, hooks: Optional[Hooks] = None, lora_base=None) -> StageRun:
    from .stages import NerfStage

    checkpoint, curves = stage_files(folder, "nerf")
    with build.attached_lora(lora, prior, config.seed, build.ADAPTERS["nerf"], config.distill.needs_trainable_score,
                             lora_base) as score:
        stage = NerfStage(prior, score, prompts, field, background, renderer, config)
        return run_stage(stage, checkpoint, curves, resume, hooks)


def refine_geometry(prior, prompts, field, config: GeometryConfig, lora: LoRAConfig, folder, resume: bool = False,
                    hooks: Optional[Hooks] = None, lora_base=None):
    """→ ``(StageRun, final mesh or None when stopped, the stage)``.  ``ValueError`` ("no surface") when the stage-1
    field has no surface at the config's threshold."""
    from .stages import GeometryStage

    checkpoint, curves = stage_files(folder, "geometry")
    with build.attached_lora(lora, prior, config.seed, build.ADAPTERS["geometry"],
                             config.distill.needs_trainable_score, lora_base) as score:
        with eval_mode(field):
            stage = GeometryStage.from_stage1(prior, score, prompts, field, config)
        if hooks is not None:
            box = [round(float(x), 3) for x in stage.dmtet.bbox.flatten()]
            hooks.log(f"geometry stage: DMTet {config.dmtet_resolution}^3 over the box {box} at density "
                      f"{stage.dmtet.isosurface_threshold:g}")
        run = run_stage(stage, checkpoint, curves, resume, hooks)
        return run, (None if run.stopped else stage.final_mesh()), stage


def refine_texture(prior, prompts, mesh, scene: SceneConfig, background: BackgroundSettings, radius: float,
                   config: TextureConfig, lora: LoRAConfig, folder, resume: bool = False,
                   hooks: Optional[Hooks] = None, lora_base=None):
    """A fresh colour field (the stage-1 grid settings) and background (threestudio's texture stage starts anew) on
    the fixed ``mesh``; → ``(StageRun, the stage)`` (``stage.field``, ``stage.background``, ``stage.mesh``)."""
    from .stages import TextureStage

    device = mesh.vertices.device
    color = build.texture_field(scene, radius, config.seed + 2).to(device)
    # threestudio's texture config leaves the environment map's random recolouring off
    shown = build.background(dataclasses.replace(background, aug_prob=0.0), config.seed + 3).to(device)
    checkpoint, curves = stage_files(folder, "texture")
    with build.attached_lora(lora, prior, config.seed, build.ADAPTERS["texture"], config.distill.needs_trainable_score,
                             lora_base) as score:
        stage = TextureStage(prior, score, prompts, mesh, color, shown, config)
        return run_stage(stage, checkpoint, curves, resume, hooks), stage


def export_nerf(field, export: ExportConfig, path, format: Optional[str] = None, log=lambda m: None):
    """The stage-1 field's iso-surface (:func:`l2vsd_core.export.extract_mesh`: a grid fitted to the object, the
    density cleaned of needles and cell-scale lumps, meshed at the level where its silhouettes match the volume
    renders' for ``threshold="auto"``), decimated (to ``max_faces`` and :data:`TEXELS_PER_FACE`), UV-unwrapped, baked and written (GLB/OBJ y up, PLY z up:
    :func:`l2vsd_core.export.save_mesh`); → the ``trimesh.Trimesh``, in world axes (z up).  ``ValueError`` ("no
    surface") when the density never reaches the threshold."""
    import time

    from .export import bake_texture, decimate, extract_mesh, save_mesh

    t0 = time.perf_counter()
    with eval_mode(field):
        mesh = extract_mesh(field, resolution=export.mesh_resolution, threshold=export.threshold)
        matched = mesh.metadata.get("render_match_iou")
        log(f"isosurface at density {mesh.metadata['isosurface_threshold']:.4g}"
            + (f" (render-matched: silhouette IoU {matched:.3f} over the calibration rays)" if matched is not None
               else ""))
        budget = max(4, min(export.max_faces, export.texture_size ** 2 // TEXELS_PER_FACE))
        if len(mesh.faces) > budget:
            log(f"decimating the isosurface from {len(mesh.faces)} to {budget} faces (max_faces {export.max_faces}, "
                f"{TEXELS_PER_FACE} texels a face of the {export.texture_size}² texture)")
            mesh = decimate(mesh, budget)
        mesh = bake_texture(mesh, field, texture_size=export.texture_size)
        save_mesh(mesh, path, format=format, field=field)
    log(f"mesh: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces ({time.perf_counter() - t0:.1f} s)")
    return mesh


def export_refined(mesh, color, export: ExportConfig, path, log=lambda m: None):
    """A refined mesh coloured by ``color`` (the stage-1 field after stage 2, the texture field after stage 3),
    decimated, UV-unwrapped, baked and written (format by the suffix; GLB/OBJ y up); → the ``trimesh.Trimesh``, in
    world axes (z up)."""
    import time

    from .export import save_textured_mesh

    t0 = time.perf_counter()
    with eval_mode(color):
        baked, _ = save_textured_mesh(mesh, color, path, texture_size=export.texture_size, max_faces=export.max_faces)
    log(f"mesh: {len(baked.vertices)} vertices, {len(baked.faces)} faces ({time.perf_counter() - t0:.1f} s)")
    return baked


def write_turntable(path, export: ExportConfig, color, background, renderer=None, mesh=None,
                    view=(15.0, 1.5, 70.0)) -> Path:
    """An orbit GIF of a stage-1 field (``renderer``: its volume renderer) or of a ``mesh`` coloured by ``color``;
    ``view``: (elevation°, distance, fovy°)."""
    from .export import turntable_gif

    if mesh is not None:
        from .mesh.mesh_renderer import MeshRenderer
        renderer = MeshRenderer().bind(mesh)
    with eval_mode(color, background, renderer):
        return Path(turntable_gif(renderer, color, background, path, n_views=export.turntable_views,
                                  resolution=export.turntable_resolution, elevation_deg=view[0], distance=view[1],
                                  fovy_deg=view[2]))
