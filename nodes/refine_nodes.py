"""RefineGeometry and RefineTexture: ProlificDreamer's stages 2 and 3 after L2VSDOptimize, with the same progress,
previews, interruption and checkpoint/resume. The loops are ``l2vsd_core.mesh.refine``'s ``GeometryRefiner`` and
``TextureRefiner``; the nodes chain them as ``l2vsd_core.generate`` does (``_refine``): the geometry stage starts a
DMTet from the stage-1 density, the texture stage a fresh colour field, background and LoRA on the fixed mesh."""
from __future__ import annotations

import dataclasses

from .common import (CATEGORY_OPTIMIZE, MESH_TYPE, PRIOR_TYPE, SCENE_TYPE, SCORE_TYPE, check_choice, check_prompt,
                     check_sockets, eval_mode, input_error, on_device, render_orbit)
from .export_node import parse_threshold
from .model_nodes import METHODS, LoadedPrior, ScoreSettings
from .runs import curves_image, make_lora, remove_lora, resume_from, run_folder, run_info, run_with_progress
from .scene_nodes import RefinedMesh, Scene, hashgrid_config, make_background

ORBIT_VIEWS = 8
PREVIEW_LIMIT = 256  # previews and orbit renders at the training resolution, at most this (progress previews: 256)
FROM_SCORE = "from score"
# The files of each stage in its checkpoint_folder: generate's names (STAGE_CHECKPOINTS), so that the three stages
# can share one folder, as generate's --out.
GEOMETRY_FILES = ("geometry.safetensors", "geometry_curves.json")
TEXTURE_FILES = ("texture.safetensors", "texture_curves.json")
GEOMETRY_ADAPTER, TEXTURE_ADAPTER = "l2vsd_geometry", "l2vsd_texture"  # generate's adapter names


def _preview_resolution(resolution: int) -> int:
    return min(int(resolution), PREVIEW_LIMIT)


def _distill(default, method: str, score: ScoreSettings, guidance_scale: float, steps: int):
    """The stage's estimator: its recipe (``default``) with the method, guidance and the score's η / JVP / ESD."""
    return dataclasses.replace(default, method=method, guidance_scale=float(guidance_scale), eta=score.eta,
                               esd_lambda=score.esd_lambda, jvp_mode=score.jvp_mode,
                               timesteps=dataclasses.replace(default.timesteps, max_steps=int(steps)))


def _config(kind, prior, **settings):
    """``kind(**settings)`` checked against the prior; a render size that the prior cannot take names the input."""
    try:
        config = kind(**settings)
        config.check_prior(prior)
    except ValueError as e:
        if "resolution" in str(e):
            raise input_error("resolution", str(e), "use a multiple of the prior's pixel factor (8 for Stable "
                                                    "Diffusion's VAE)") from e
        raise
    return config


def _prompts(prior, prompt: str, negative_prompt: str, source):
    """The stage's prompts (empty: those ``source``, the input scene or mesh, was made with), encoded."""
    from l2vsd_core.prompts import PromptProcessor

    prompt = str(prompt).strip() or source.prompt
    negative_prompt = str(negative_prompt).strip() or source.negative_prompt
    check_prompt(prompt)
    return prompt, negative_prompt, PromptProcessor(prior.encode_text, prompt, negative_prompt=negative_prompt)


def _run_stage(loop, config, checkpoint, curves, resume: bool):
    """Resume (or not), run with ComfyUI's progress and interrupt; returns (history, start step, end step)."""
    history = resume_from(loop, checkpoint, curves) if resume else []
    start = loop.global_step
    run_with_progress(loop, config.steps, checkpoint, curves, history)
    return history, start, loop.global_step


_COMMON_INPUTS = {
    "prompt": ("STRING", {"multiline": True, "default": "",
                          "tooltip": "What to generate; empty = the prompt the input was made with (L2VSD "
                                     "Optimize's)."}),
    "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                   "tooltip": "What to steer away from (classifier-free guidance); empty = the "
                                              "input's negative prompt."}),
}
_RUN_INPUTS = {
    "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 100000,
                                 "tooltip": "Write the checkpoint every N steps (0 = only at the end and when "
                                            "interrupted)."}),
    "preview_every": ("INT", {"default": 10, "min": 0, "max": 100000,
                              "tooltip": "Show an orbit render in the progress bar every N steps (0 = none)."}),
    "resume": ("BOOLEAN", {"default": False,
                           "tooltip": "Continue from this stage's checkpoint in checkpoint_folder (e.g. after Cancel) "
                                      "up to 'steps'; the other settings must match that run. Off: start over and "
                                      "overwrite it."}),
    "checkpoint_folder": ("STRING", {"default": "l2vsd/run",
                                     "tooltip": "Folder under ComfyUI's output folder for this stage's checkpoint "
                                                "and loss curves (each stage has its own files, so the three "
                                                "stages may share a folder)."}),
}


class RefineGeometry:
    """Stage 2: refine the stage-1 geometry as a DMTet mesh, distilled on normal maps (ProlificDreamer: SDS, 100)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prior": (PRIOR_TYPE, {"tooltip": "The frozen prior from LoadPrior."}),
            "score": (SCORE_TYPE, {"tooltip": "From AttachLoRAScore: the LoRA settings (rank, learning rate, η, JVP "
                                              "mode, ESD λ) when 'method' is of the VSD family; unused for sds."}),
            "scene": (SCENE_TYPE, {"tooltip": "The optimized stage-1 scene from L2VSD Optimize: its density "
                                              "initialises the mesh, its colours texture the result."}),
            **_COMMON_INPUTS,
            "method": (list(METHODS), {"default": "sds",
                                       "tooltip": "Estimator on the normal maps: sds (ProlificDreamer's geometry "
                                                  "stage) or a VSD-family method with a fresh LoRA."}),
            "steps": ("INT", {"default": 15000, "min": 1, "max": 100000,
                              "tooltip": "Optimization steps (ProlificDreamer: 15000; the toy prior: a few "
                                         "hundred)."}),
            "resolution": ("INT", {"default": 512, "min": 8, "max": 2048, "step": 8,
                                   "tooltip": "Width = height of the normal-map renders (ProlificDreamer: 512; toy: "
                                              "64); resized to the prior's input size."}),
            "dmtet_resolution": ("INT", {"default": 64, "min": 4, "max": 256,
                                         "tooltip": "DMTet cubes per axis over the object's box (64 ≈ threestudio's "
                                                    "128-tet grid; toy: 32). Memory grows as its cube."}),
            "guidance_scale": ("FLOAT", {"default": 100.0, "min": 0.0, "max": 200.0, "step": 0.5,
                                         "tooltip": "Classifier-free guidance scale (ProlificDreamer's geometry "
                                                    "stage: 100)."}),
            "lambda_normal_consistency": ("FLOAT", {"default": 10000.0, "min": 0.0, "max": 1e7, "step": 100.0,
                                                    "tooltip": "Weight of the normal-consistency regularizer "
                                                               "(threestudio: 10000)."}),
            "lambda_laplacian_smoothness": ("FLOAT", {"default": 10000.0, "min": 0.0, "max": 1e7, "step": 100.0,
                                                      "tooltip": "Weight of the Laplacian smoothness regularizer "
                                                                 "(threestudio: 10000)."}),
            "learning_rate": ("FLOAT", {"default": 0.005, "min": 1e-6, "max": 1.0, "step": 0.0005,
                                        "tooltip": "Adam learning rate of the SDF and the deformation (0.005)."}),
            "threshold": ("STRING", {"default": "auto",
                                     "tooltip": "Stage-1 density level of the initial surface: 'auto' (mean of the "
                                                "non-empty densities, as Export Mesh) or a number."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1,
                             "tooltip": "Seed of cameras, noise and the LoRA's initial weights."}),
            **_RUN_INPUTS,
        }}

    RETURN_TYPES = (MESH_TYPE, "IMAGE", "IMAGE")
    RETURN_NAMES = ("mesh", "normal_renders", "loss_curves")
    FUNCTION = "refine"
    CATEGORY = CATEGORY_OPTIMIZE
    DESCRIPTION = ("Stage 2: refines the stage-1 geometry as a mesh (DMTet) by score distillation on normal maps. "
                   "Cancel writes a checkpoint; run again with resume on to continue.")

    def refine(self, prior, score, scene, prompt, negative_prompt, method, steps, resolution, dmtet_resolution,
               guidance_scale, lambda_normal_consistency, lambda_laplacian_smoothness, learning_rate, threshold,
               seed, checkpoint_every, preview_every, resume, checkpoint_folder):
        check_sockets(prior=(prior, LoadedPrior, "LoadPrior"), score=(score, ScoreSettings, "AttachLoRAScore"),
                      scene=(scene, Scene, "L2VSD Optimize"))
        check_choice("method", method, METHODS)
        level = parse_threshold(threshold)
        run_dir = run_folder(checkpoint_folder)
        checkpoint, curves = (run_dir / name for name in GEOMETRY_FILES)

        import torch
        from l2vsd_core.mesh.refine import GeometryConfig, GeometryRefiner

        with torch.inference_mode(False), torch.enable_grad():
            config = _config(GeometryConfig, prior.prior, steps=int(steps), seed=int(seed),
                             resolution=int(resolution), dmtet_resolution=int(dmtet_resolution),
                             distill=_distill(GeometryConfig().distill, method, score, guidance_scale, steps),
                             lr=float(learning_rate), lambda_normal_consistency=float(lambda_normal_consistency),
                             lambda_laplacian_smoothness=float(lambda_laplacian_smoothness),
                             isosurface_threshold=level, checkpoint_every=int(checkpoint_every),
                             checkpoint_path=str(checkpoint), preview_every=int(preview_every),
                             preview_resolution=_preview_resolution(resolution))
            prompt, negative_prompt, prompts = _prompts(prior.prior, prompt, negative_prompt, scene)
            color = on_device(scene.field, prior.prior.device)
            background = on_device(scene.background, prior.prior.device)
            lora, unet = (make_lora(score, prior.prior, config.seed, GEOMETRY_ADAPTER)
                          if config.distill.needs_trainable_score else (None, None))
            try:
                try:
                    with eval_mode(color):
                        loop = GeometryRefiner.from_stage1(prior.prior, lora, prompts, color, config)
                except ValueError as e:
                    if "no surface" not in str(e):
                        raise
                    raise input_error("threshold", str(e), "use 'auto' or a lower density, or optimize stage 1 "
                                                           "longer") from e
                history, start, step = _run_stage(loop, config, checkpoint, curves, bool(resume))
                mesh = loop.final_mesh()
            finally:
                remove_lora(unet, GEOMETRY_ADAPTER)
            normals = render_orbit(loop.renderer.bind(mesh), None, None, ORBIT_VIEWS, config.preview_resolution,
                                   config.preview_elevation, config.preview_distance, config.preview_fovy,
                                   output="comp_normal", device=mesh.vertices.device)
        result = RefinedMesh(mesh=mesh, color=color, background=background, settings=scene.settings,
                             stage="geometry", prompt=prompt, negative_prompt=negative_prompt, history=history)
        ui = run_info(start, step, int(steps), checkpoint)
        ui["l2vsd_run"][0].update(vertices=int(mesh.vertices.shape[0]), faces=int(mesh.faces.shape[0]))
        return {"ui": ui, "result": (result, normals, curves_image(history))}


class RefineTexture:
    """Stage 3: a new texture on the refined mesh, distilled with the attached LoRA score (ProlificDreamer: VSD)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prior": (PRIOR_TYPE, {"tooltip": "The frozen prior from LoadPrior."}),
            "score": (SCORE_TYPE, {"tooltip": "Estimator and LoRA settings from AttachLoRAScore (a fresh LoRA is "
                                              "trained for this stage)."}),
            "mesh": (MESH_TYPE, {"tooltip": "The refined mesh from L2VSD Refine Geometry (its geometry stays "
                                            "fixed)."}),
            **_COMMON_INPUTS,
            "method": ([FROM_SCORE, *METHODS], {"default": FROM_SCORE,
                                                "tooltip": "Estimator: the score's (AttachLoRAScore) or another one; "
                                                           "ProlificDreamer's texture stage uses vsd."}),
            "steps": ("INT", {"default": 30000, "min": 1, "max": 100000,
                              "tooltip": "Optimization steps (ProlificDreamer: 30000; the toy prior: a few "
                                         "hundred)."}),
            "resolution": ("INT", {"default": 512, "min": 8, "max": 2048, "step": 8,
                                   "tooltip": "Width = height of the colour renders (ProlificDreamer: 512; toy: "
                                              "64); resized to the prior's input size."}),
            "guidance_scale": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0, "step": 0.5,
                                         "tooltip": "Classifier-free guidance scale; -1 = the one set in "
                                                    "AttachLoRAScore (ProlificDreamer: 7.5)."}),
            "lr_encoding": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "Learning rate of the texture's hash-grid encoding."}),
            "lr_network": ("FLOAT", {"default": 0.001, "min": 0.0, "max": 1.0, "step": 0.0001,
                                     "tooltip": "Learning rate of the texture's MLP."}),
            "lr_background": ("FLOAT", {"default": 0.001, "min": 0.0, "max": 1.0, "step": 0.0001,
                                        "tooltip": "Learning rate of the (new) environment background."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1,
                             "tooltip": "Seed of cameras, noise and the initial weights of the texture, "
                                        "background and LoRA."}),
            **_RUN_INPUTS,
        }}

    RETURN_TYPES = (MESH_TYPE, "IMAGE", "IMAGE")
    RETURN_NAMES = ("mesh", "renders", "loss_curves")
    FUNCTION = "refine"
    CATEGORY = CATEGORY_OPTIMIZE
    DESCRIPTION = ("Stage 3: trains a new texture on the refined mesh by score distillation. Cancel writes a "
                   "checkpoint; run again with resume on to continue.")

    def refine(self, prior, score, mesh, prompt, negative_prompt, method, steps, resolution, guidance_scale,
               lr_encoding, lr_network, lr_background, seed, checkpoint_every, preview_every, resume,
               checkpoint_folder):
        check_sockets(prior=(prior, LoadedPrior, "LoadPrior"), score=(score, ScoreSettings, "AttachLoRAScore"),
                      mesh=(mesh, RefinedMesh, "L2VSD Refine Geometry"))
        check_choice("method", method, (FROM_SCORE, *METHODS))
        run_dir = run_folder(checkpoint_folder)
        checkpoint, curves = (run_dir / name for name in TEXTURE_FILES)

        import torch
        from l2vsd_core.mesh.refine import TextureConfig, TextureField, TextureRefiner

        method = score.method if method == FROM_SCORE else method
        guidance = score.guidance_scale if guidance_scale < 0 else guidance_scale
        settings, device = mesh.settings, prior.prior.device
        with torch.inference_mode(False), torch.enable_grad():
            config = _config(TextureConfig, prior.prior, steps=int(steps), seed=int(seed), resolution=int(resolution),
                             distill=_distill(TextureConfig().distill, method, score, guidance, steps),
                             lr_encoding=float(lr_encoding), lr_network=float(lr_network),
                             lr_background=float(lr_background), checkpoint_every=int(checkpoint_every),
                             checkpoint_path=str(checkpoint), preview_every=int(preview_every),
                             preview_resolution=_preview_resolution(resolution))
            prompt, negative_prompt, prompts = _prompts(prior.prior, prompt, negative_prompt, mesh)
            # threestudio's texture stage starts anew: colour field (stage-1 grid settings), background and LoRA
            try:
                color = TextureField(settings.radius, hashgrid_config(settings), backend=settings.backend,
                                     mlp_neurons=settings.mlp_neurons, seed=config.seed + 2).to(device)
            except ImportError as e:  # tcnn asked for in InitNeRF but not importable here
                raise input_error("mesh", str(e), "pick the 'torch' or 'auto' backend in Init NeRF") from e
            background = make_background(settings, config.seed + 3).to(device)
            lora, unet = (make_lora(score, prior.prior, config.seed, TEXTURE_ADAPTER)
                          if config.distill.needs_trainable_score else (None, None))
            try:
                loop = TextureRefiner(prior.prior, lora, prompts, mesh.mesh, color, background, config)
                history, start, step = _run_stage(loop, config, checkpoint, curves, bool(resume))
            finally:
                remove_lora(unet, TEXTURE_ADAPTER)
            renders = render_orbit(loop.renderer.bind(loop.mesh), color, background, ORBIT_VIEWS,
                                   config.preview_resolution, config.preview_elevation, config.preview_distance,
                                   config.preview_fovy)
        result = RefinedMesh(mesh=loop.mesh, color=color, background=background, settings=settings,
                             stage="texture", prompt=prompt, negative_prompt=negative_prompt, history=history)
        return {"ui": run_info(start, step, int(steps), checkpoint),
                "result": (result, renders, curves_image(history))}
