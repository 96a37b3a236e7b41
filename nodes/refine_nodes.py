"""RefineGeometry and RefineTexture: ProlificDreamer's stages 2 and 3 after L2VSDOptimize, with the same progress,
previews, interruption and checkpoint/resume. Each node turns its inputs into the core's ``GeometryConfig`` /
``TextureConfig`` and calls ``l2vsd_core.pipeline.refine_geometry`` / ``refine_texture`` once, as ``generate`` chains
them: the geometry stage starts a DMTet from the stage-1 density, the texture stage a fresh colour field, background
and LoRA on the fixed mesh."""
from __future__ import annotations

from .common import (CATEGORY_OPTIMIZE, DEFAULT_MAX_STEP, DEFAULT_MIN_STEP, HIFA_INPUTS, MESH_TYPE, PRIOR_TYPE,
                     SCENE_TYPE, SCORE_TYPE, TIMESTEP_INPUTS, check_choice, check_pixel_factor, check_prompt,
                     check_sockets, check_timestep_range, input_error, make_config, on_device, parse_schedule,
                     render_orbit)
from .export_node import parse_threshold
from .model_nodes import METHODS, LoadedPrior, ScoreSettings
from .runs import (checkpoint_file, checkpoint_folder_input, curves_image, lora_base, run_folder, run_stage,
                   stage_ui)
from .scene_nodes import RefinedMesh, Scene

ORBIT_VIEWS = 8
PREVIEW_LIMIT = 256  # previews and orbit renders at the training resolution, at most this (progress previews: 256)
FROM_SCORE = "from score"
# ProlificDreamer's timestep range in both stages (the configs' defaults; tests/test_nodes_refine.py checks them)
# config field → input, for the configs' ValueErrors
_FIELDS = {"steps": "steps", "seed": "seed", "resolution": "resolution", "checkpoint_every": "checkpoint_every",
           "preview_every": "preview_every", "preview_resolution": "resolution", "guidance_scale": "guidance_scale",
           "min_step_percent": "min_step_percent", "max_step_percent": "max_step_percent"}
GEOMETRY_FIELDS = {**_FIELDS, "dmtet_resolution": "dmtet_resolution", "lr": "learning_rate",
                   "lambda_normal_consistency": "lambda_normal_consistency",
                   "lambda_laplacian_smoothness": "lambda_laplacian_smoothness", "isosurface_threshold": "threshold"}
TEXTURE_FIELDS = {**_FIELDS, "lr_encoding": "lr_encoding", "lr_network": "lr_network",
                  "lr_background": "lr_background", "lambda_image": "lambda_image"}
FIX = "change it (see its tooltip)"


def _preview_resolution(resolution: int) -> int:
    return min(int(resolution), PREVIEW_LIMIT)


def _stage_config(kind, fields: dict, prior, score: ScoreSettings, method: str, guidance_scale: float,
                  min_step_percent, max_step_percent, sqrt_anneal: bool = False, **settings):
    """``kind`` (GeometryConfig / TextureConfig) from the node's inputs: the stage's recipe estimator with the
    method, guidance, timestep range and the score's η / JVP / ESD; refused values name their input."""
    distill = make_config(score.distill, fields, FIX, default=kind().distill, guidance_scale=float(guidance_scale),
                          method=method, min_step_percent=parse_schedule("min_step_percent", min_step_percent),
                          max_step_percent=parse_schedule("max_step_percent", max_step_percent),
                          sqrt_anneal=bool(sqrt_anneal))
    config = make_config(kind, fields, FIX, distill=distill, **settings)
    check_timestep_range(config)
    check_pixel_factor(prior, {"resolution": [config.resolution]})
    return config


def geometry_config(prior, score: ScoreSettings, *, method, steps, resolution, dmtet_resolution, guidance_scale,
                    lambda_normal_consistency, lambda_laplacian_smoothness, learning_rate, threshold, seed,
                    checkpoint_every, preview_every, min_step_percent=DEFAULT_MIN_STEP,
                    max_step_percent=DEFAULT_MAX_STEP):
    """RefineGeometry's inputs (but its sockets, prompts and run folder) as the core's ``GeometryConfig``; a value it
    refuses is an input error naming the input."""
    from l2vsd_core.config import GeometryConfig

    check_choice("method", method, METHODS)
    return _stage_config(
        GeometryConfig, GEOMETRY_FIELDS, prior, score, method, guidance_scale, min_step_percent, max_step_percent,
        steps=int(steps), seed=int(seed), resolution=int(resolution), dmtet_resolution=int(dmtet_resolution),
        lr=float(learning_rate), lambda_normal_consistency=float(lambda_normal_consistency),
        lambda_laplacian_smoothness=float(lambda_laplacian_smoothness), isosurface_threshold=parse_threshold(threshold),
        checkpoint_every=int(checkpoint_every), preview_every=int(preview_every),
        preview_resolution=_preview_resolution(resolution))


def texture_config(prior, score: ScoreSettings, *, method, steps, resolution, guidance_scale, lr_encoding, lr_network,
                   lr_background, seed, checkpoint_every, preview_every, min_step_percent=DEFAULT_MIN_STEP,
                   max_step_percent=DEFAULT_MAX_STEP, sqrt_anneal=False, lambda_image=0.0):
    """RefineTexture's inputs (but its sockets, prompts and run folder) as the core's ``TextureConfig`` ("from score":
    the score's estimator); a value it refuses is an input error naming the input."""
    from l2vsd_core.config import TextureConfig

    check_choice("method", method, (FROM_SCORE, *METHODS))
    return _stage_config(
        TextureConfig, TEXTURE_FIELDS, prior, score, score.method if method == FROM_SCORE else method, guidance_scale,
        min_step_percent, max_step_percent, sqrt_anneal, steps=int(steps), seed=int(seed), resolution=int(resolution),
        lr_encoding=float(lr_encoding), lr_network=float(lr_network), lr_background=float(lr_background),
        lambda_image=float(lambda_image), checkpoint_every=int(checkpoint_every), preview_every=int(preview_every),
        preview_resolution=_preview_resolution(resolution))


def _prompts(prior, prompt: str, negative_prompt: str, source):
    """The stage's prompts (empty: those ``source``, the input scene or mesh, was made with), encoded."""
    from l2vsd_core import build

    prompt = str(prompt).strip() or source.prompt
    negative_prompt = str(negative_prompt).strip() or source.negative_prompt
    check_prompt(prompt)
    return prompt, negative_prompt, build.prompt_processor(prior, prompt, negative_prompt)


_COMMON_INPUTS = {
    "prompt": ("STRING", {"multiline": True, "default": "",
                          "tooltip": "What to generate; empty = the prompt the input was made with (L2VSD "
                                     "Optimize's)."}),
    "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                   "tooltip": "What to steer away from (classifier-free guidance); empty = the "
                                              "input's negative prompt."}),
}
_RUN_INPUTS = {
    "checkpoint_every": ("INT", {"default": 1000, "min": 0, "max": 100000,
                                 "tooltip": "Write the checkpoint every N steps (0 = only at the end and when "
                                            "interrupted)."}),
    "preview_every": ("INT", {"default": 200, "min": 0, "max": 100000,
                              "tooltip": "Show an orbit render in the progress bar every N steps (0 = none)."}),
    "resume": ("BOOLEAN", {"default": False,
                           "tooltip": "Continue from this stage's checkpoint in checkpoint_folder (e.g. after Cancel) "
                                      "up to 'steps'; the other settings must match that run. Off: start over and "
                                      "overwrite it."}),
}


def _run_inputs(stage: str) -> dict:
    return {**_RUN_INPUTS, "checkpoint_folder": checkpoint_folder_input(stage)}


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
                              "tooltip": "Optimization steps (ProlificDreamer: 15000; the toy prior: 300)."}),
            "resolution": ("INT", {"default": 512, "min": 8, "max": 2048, "step": 8,
                                   "tooltip": "Width = height of the normal-map renders (ProlificDreamer: 512; toy: "
                                              "32); resized to the prior's input size."}),
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
            **_run_inputs("geometry"),
        }, "optional": dict(TIMESTEP_INPUTS)}

    RETURN_TYPES = (MESH_TYPE, "IMAGE", "IMAGE")
    RETURN_NAMES = ("mesh", "normal_renders", "loss_curves")
    OUTPUT_TOOLTIPS = (
        "The refined mesh, coloured by the stage-1 field: into L2VSD Refine Texture, or L2VSD Export Mesh (which "
        "bakes the stage-1 colours onto it).",
        "8 normal-map renders of the mesh around it (15° elevation) at 'resolution' (at most 256 px), as an IMAGE "
        "batch at that size; the node itself shows them enlarged.",
        "The loss terms per step, plotted (one image).",
    )
    FUNCTION = "refine"
    CATEGORY = CATEGORY_OPTIMIZE
    DESCRIPTION = ("Stage 2: refines the stage-1 geometry as a mesh (DMTet) by score distillation on normal maps. "
                   "Cancel writes a checkpoint; run again with resume on to continue.")

    def refine(self, prior, score, scene, prompt, negative_prompt, method, steps, resolution, dmtet_resolution,
               guidance_scale, lambda_normal_consistency, lambda_laplacian_smoothness, learning_rate, threshold,
               seed, checkpoint_every, preview_every, resume, checkpoint_folder, min_step_percent=DEFAULT_MIN_STEP,
               max_step_percent=DEFAULT_MAX_STEP):
        check_sockets(prior=(prior, LoadedPrior, "LoadPrior"), score=(score, ScoreSettings, "AttachLoRAScore"),
                      scene=(scene, Scene, "L2VSD Optimize"))
        config = geometry_config(
            prior.prior, score, method=method, steps=steps, resolution=resolution, dmtet_resolution=dmtet_resolution,
            guidance_scale=guidance_scale, lambda_normal_consistency=lambda_normal_consistency,
            lambda_laplacian_smoothness=lambda_laplacian_smoothness, learning_rate=learning_rate,
            threshold=threshold, seed=seed, checkpoint_every=checkpoint_every, preview_every=preview_every,
            min_step_percent=min_step_percent, max_step_percent=max_step_percent)
        run_dir = run_folder(checkpoint_folder)
        checkpoint = checkpoint_file(run_dir, "geometry")

        import torch
        from l2vsd_core import pipeline
        from l2vsd_core.runner import ResumeError

        with torch.inference_mode(False), torch.enable_grad():
            prompt, negative_prompt, prompts = _prompts(prior.prior, prompt, negative_prompt, scene)
            color = on_device(scene.field, prior.prior.device)
            background = on_device(scene.background, prior.prior.device)

            def call(hooks):
                try:
                    return pipeline.refine_geometry(prior.prior, prompts, color, config, score.lora, run_dir,
                                                    bool(resume), hooks, lora_base(score))
                except ValueError as e:
                    if isinstance(e, ResumeError) or "no surface" not in str(e):
                        raise
                    raise input_error("threshold", str(e), "use 'auto' or a lower density, or optimize stage 1 "
                                                           "longer") from e

            run, mesh, stage = run_stage(call, config.steps, checkpoint, bool(resume))
            normals = render_orbit(stage.renderer.bind(mesh), None, None, ORBIT_VIEWS, config.preview_resolution,
                                   config.preview_elevation, config.preview_distance, config.preview_fovy,
                                   output="comp_normal", device=mesh.vertices.device)
        result = RefinedMesh(mesh=mesh, color=color, background=background, settings=scene.settings,
                             stage="geometry", prompt=prompt, negative_prompt=negative_prompt, history=run.history)
        ui = stage_ui(run, checkpoint, normals, "l2vsd_normals")
        ui["l2vsd_run"][0].update(vertices=int(mesh.vertices.shape[0]), faces=int(mesh.faces.shape[0]))
        return {"ui": ui, "result": (result, normals, curves_image(run.history))}


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
                              "tooltip": "Optimization steps (ProlificDreamer: 30000; the toy prior: 200)."}),
            "resolution": ("INT", {"default": 512, "min": 8, "max": 2048, "step": 8,
                                   "tooltip": "Width = height of the colour renders (ProlificDreamer: 512; toy: "
                                              "32); resized to the prior's input size."}),
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
            **_run_inputs("texture"),
        }, "optional": {
            **TIMESTEP_INPUTS,
            **HIFA_INPUTS,
        }}

    RETURN_TYPES = (MESH_TYPE, "IMAGE", "IMAGE")
    RETURN_NAMES = ("mesh", "renders", "loss_curves")
    OUTPUT_TOOLTIPS = (
        "The same mesh with its new texture: into L2VSD Export Mesh (its mesh input).",
        "8 renders of the textured mesh around it (15° elevation) at 'resolution' (at most 256 px), as an IMAGE "
        "batch at that size; the node itself shows them enlarged.",
        "The loss terms per step, plotted (one image).",
    )
    FUNCTION = "refine"
    CATEGORY = CATEGORY_OPTIMIZE
    DESCRIPTION = ("Stage 3: trains a new texture on the refined mesh by score distillation. Cancel writes a "
                   "checkpoint; run again with resume on to continue.")

    def refine(self, prior, score, mesh, prompt, negative_prompt, method, steps, resolution, guidance_scale,
               lr_encoding, lr_network, lr_background, seed, checkpoint_every, preview_every, resume,
               checkpoint_folder, min_step_percent=DEFAULT_MIN_STEP, max_step_percent=DEFAULT_MAX_STEP,
               sqrt_anneal=False, lambda_image=0.0):
        check_sockets(prior=(prior, LoadedPrior, "LoadPrior"), score=(score, ScoreSettings, "AttachLoRAScore"),
                      mesh=(mesh, RefinedMesh, "L2VSD Refine Geometry"))
        config = texture_config(
            prior.prior, score, method=method, steps=steps, resolution=resolution, guidance_scale=guidance_scale,
            lr_encoding=lr_encoding, lr_network=lr_network, lr_background=lr_background, seed=seed,
            checkpoint_every=checkpoint_every, preview_every=preview_every, min_step_percent=min_step_percent,
            max_step_percent=max_step_percent, sqrt_anneal=sqrt_anneal, lambda_image=lambda_image)
        run_dir = run_folder(checkpoint_folder)
        checkpoint = checkpoint_file(run_dir, "texture")

        import torch
        from l2vsd_core import pipeline

        settings = mesh.settings
        with torch.inference_mode(False), torch.enable_grad():
            prompt, negative_prompt, prompts = _prompts(prior.prior, prompt, negative_prompt, mesh)

            def call(hooks):
                # threestudio's texture stage starts anew: colour field (stage-1 grid settings), background and LoRA
                try:
                    return pipeline.refine_texture(prior.prior, prompts, mesh.mesh, settings.scene,
                                                   settings.background, settings.radius, config, score.lora, run_dir,
                                                   bool(resume), hooks, lora_base(score))
                except ImportError as e:  # tcnn asked for in InitNeRF but not importable here
                    raise input_error("mesh", str(e), "pick the 'torch' or 'auto' backend in Init NeRF") from e

            run, stage = run_stage(call, config.steps, checkpoint, bool(resume))
            renders = render_orbit(stage.renderer.bind(stage.mesh), stage.field, stage.background, ORBIT_VIEWS,
                                   config.preview_resolution, config.preview_elevation, config.preview_distance,
                                   config.preview_fovy)
        result = RefinedMesh(mesh=stage.mesh, color=stage.field, background=stage.background, settings=settings,
                             stage="texture", prompt=prompt, negative_prompt=negative_prompt, history=run.history)
        return {"ui": stage_ui(run, checkpoint, renders, "l2vsd_texture"),
                "result": (result, renders, curves_image(run.history))}
