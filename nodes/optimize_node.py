"""L2VSDOptimize: stage-1 score distillation of a scene from a prior, with ComfyUI progress, previews, interruption
and checkpoint/resume. The node turns its inputs into a ``NerfConfig`` and calls ``l2vsd_core.pipeline.optimize_nerf``
once; the fresh node's defaults are ProlificDreamer's (``NerfConfig()``)."""
from __future__ import annotations

from .common import (CATEGORY_OPTIMIZE, DEFAULT_MAX_STEP, DEFAULT_MIN_STEP, HIFA_INPUTS, PRIOR_TYPE, SCENE_TYPE,
                     SCORE_TYPE, TIMESTEP_INPUTS, check_pixel_factor, check_prompt, check_sockets, check_timestep_range,
                     input_error, make_config, parse_resolution_schedule, parse_schedule, render_orbit)
from .model_nodes import LoadedPrior, ScoreSettings
from .runs import (checkpoint_file, checkpoint_folder_input, curves_image, lora_base, run_folder, run_stage,
                   stage_ui)
from .scene_nodes import Scene

ORBIT_VIEWS = 8
# NerfConfig field → the input that sets it (a config's ValueError names the field)
FIELDS_TO_INPUTS = {**{name: name for name in (
    "steps", "seed", "lr_encoding", "lr_network", "lr_background", "checkpoint_every", "preview_every",
    "lambda_sparsity", "lambda_opaque", "lambda_z_variance", "lambda_image", "min_step_percent", "max_step_percent",
    "guidance_scale")}, "widths": "resolution_schedule", "resolution_milestones": "resolution_schedule",
    "preview_resolution": "resolution"}
# ProlificDreamer's (NerfConfig's defaults), spelled out so that listing the node needs no torch import;
# tests/test_nodes_optimize.py checks that a fresh node gives exactly NerfConfig()'s values
DEFAULT_SCHEDULE = "512@5000"
DEFAULT_OPAQUE = "10000,0,1000,10001"


class L2VSDOptimize:
    """Distil the prompt into the scene (ProlificDreamer stage 1 with the chosen estimator)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prior": (PRIOR_TYPE, {"tooltip": "The frozen prior from LoadPrior."}),
            "score": (SCORE_TYPE, {"tooltip": "Estimator and LoRA settings from AttachLoRAScore."}),
            "scene": (SCENE_TYPE, {"tooltip": "The scene to optimize (InitNeRF, or the output of another L2VSD "
                                              "Optimize to refine it further). It is copied, never changed."}),
            "prompt": ("STRING", {"multiline": True, "default": "a red cube",
                                  "tooltip": "What to generate. View words (front/side/back/overhead view) are "
                                             "added per camera."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "What to steer away from (classifier-free guidance)."}),
            "steps": ("INT", {"default": 25000, "min": 1, "max": 100000,
                              "tooltip": "Optimization steps (ProlificDreamer: 25000; the toy prior: 400)."}),
            "resolution": ("INT", {"default": 64, "min": 8, "max": 1024, "step": 8,
                                   "tooltip": "Width = height of the training renders at the start (and of the "
                                              "previews); resolution_schedule switches to larger ones later. "
                                              "ProlificDreamer: 64 (then 512 from step 5000); the toy prior: 32. A "
                                              "multiple of the prior's pixel factor (8 for SD's VAE)."}),
            "guidance_scale": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0, "step": 0.5,
                                         "tooltip": "Classifier-free guidance scale; -1 = the one set in "
                                                    "AttachLoRAScore."}),
            "lr_encoding": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "Learning rate of the hash-grid encoding."}),
            "lr_network": ("FLOAT", {"default": 0.001, "min": 0.0, "max": 1.0, "step": 0.0001,
                                     "tooltip": "Learning rate of the field's MLP."}),
            "lr_background": ("FLOAT", {"default": 0.001, "min": 0.0, "max": 1.0, "step": 0.0001,
                                        "tooltip": "Learning rate of the environment background."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1,
                             "tooltip": "Seed of cameras, noise and the LoRA's initial weights."}),
            "checkpoint_every": ("INT", {"default": 1000, "min": 0, "max": 100000,
                                         "tooltip": "Write the checkpoint every N steps (0 = only at the end and "
                                                    "when interrupted)."}),
            "preview_every": ("INT", {"default": 200, "min": 0, "max": 100000,
                                      "tooltip": "Show an orbit render in the progress bar every N steps (0 = none)."}),
            "resume": ("BOOLEAN", {"default": False,
                                   "tooltip": "Continue from the checkpoint in checkpoint_folder (e.g. after Cancel) "
                                              "up to 'steps'; the other settings must match that run. Off: start "
                                              "over and overwrite it."}),
            "checkpoint_folder": checkpoint_folder_input("nerf"),
        }, "optional": {
            "resolution_schedule": ("STRING", {"default": DEFAULT_SCHEDULE,
                                               "tooltip": "Later render widths: comma-separated WIDTH@STEP (the "
                                                          "width becomes WIDTH at STEP), after 'resolution' at the "
                                                          "start. ProlificDreamer: 512@5000; empty: 'resolution' "
                                                          "throughout (the toy prior)."}),
            **TIMESTEP_INPUTS,
            **HIFA_INPUTS,
            "lambda_z_variance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e6, "step": 1.0,
                                            "tooltip": "Weight of HiFA's z-variance regularizer, which sharpens the "
                                                       "surface along each ray (HiFA: 300; 0 = off)."}),
            "lambda_sparsity": ("FLOAT", {"default": 10.0, "min": 0.0, "max": 1e6, "step": 0.1,
                                          "tooltip": "Weight of the sparsity regularizer on the rendered opacity "
                                                     "(ProlificDreamer: 10)."}),
            "lambda_opaque": ("STRING", {"default": DEFAULT_OPAQUE,
                                         "tooltip": "Weight of the opacity-binarization regularizer: a number or "
                                                    "start_step,v0,v1,end_step (ProlificDreamer: 10000,0,1000,10001 "
                                                    "= off, then 1000 from step 10000; the toy prior: 0)."}),
        }}

    RETURN_TYPES = (SCENE_TYPE, "IMAGE", "IMAGE")
    RETURN_NAMES = ("scene", "orbit_renders", "loss_curves")
    OUTPUT_TOOLTIPS = (
        "The optimized NeRF scene (a copy; the input scene is unchanged): into L2VSD Refine Geometry, L2VSD Export "
        "Mesh, or another L2VSD Optimize to continue.",
        "8 renders around the object (15° elevation) at the preview size ('resolution'), as an IMAGE batch at that "
        "size; the node itself shows them enlarged.",
        "The loss terms per step, plotted (one image).",
    )
    FUNCTION = "optimize"
    CATEGORY = CATEGORY_OPTIMIZE
    DESCRIPTION = ("Optimizes the scene by score distillation (SDS / VSD / L²-VSD ...). Cancel writes a checkpoint; "
                   "run again with resume on to continue.")

    def optimize(self, prior, score, scene, prompt, negative_prompt, steps, resolution, guidance_scale,
                 lr_encoding, lr_network, lr_background, seed, checkpoint_every, preview_every, resume,
                 checkpoint_folder, resolution_schedule=DEFAULT_SCHEDULE, min_step_percent=DEFAULT_MIN_STEP,
                 max_step_percent=DEFAULT_MAX_STEP, sqrt_anneal=False, lambda_image=0.0, lambda_z_variance=0.0,
                 lambda_sparsity=10.0, lambda_opaque=DEFAULT_OPAQUE):
        check_sockets(prior=(prior, LoadedPrior, "LoadPrior"), score=(score, ScoreSettings, "AttachLoRAScore"),
                      scene=(scene, Scene, "InitNeRF"))
        check_prompt(prompt)
        config = nerf_config(score, scene, steps=steps, resolution=resolution, guidance_scale=guidance_scale,
                             lr_encoding=lr_encoding, lr_network=lr_network, lr_background=lr_background, seed=seed,
                             checkpoint_every=checkpoint_every, preview_every=preview_every,
                             resolution_schedule=resolution_schedule, min_step_percent=min_step_percent,
                             max_step_percent=max_step_percent, sqrt_anneal=sqrt_anneal, lambda_image=lambda_image,
                             lambda_z_variance=lambda_z_variance, lambda_sparsity=lambda_sparsity,
                             lambda_opaque=lambda_opaque)
        check_pixel_factor(prior.prior, {"resolution": [resolution], "resolution_schedule": config.widths[1:]})
        run_dir = run_folder(checkpoint_folder)
        checkpoint = checkpoint_file(run_dir, "nerf")

        import torch
        from l2vsd_core import build, pipeline
        from l2vsd_core.stages import make_volume_renderer

        with torch.inference_mode(False), torch.enable_grad():
            device = prior.prior.device
            trained = scene.copy()  # ComfyUI may hand the same cached scene to other nodes
            trained.field, trained.background = trained.field.to(device), trained.background.to(device)
            trained.renderer = (trained.renderer if trained.renderer is not None
                                else make_volume_renderer(config)).to(device)
            prompts = build.prompt_processor(prior.prior, prompt, negative_prompt)
            run = run_stage(lambda hooks: pipeline.optimize_nerf(
                prior.prior, prompts, trained.field, trained.background, trained.renderer, config, score.lora,
                run_dir, bool(resume), hooks, lora_base(score)), config.steps, checkpoint, bool(resume))
            trained.steps_done = scene.steps_done + run.step - run.start
            trained.prompt, trained.negative_prompt, trained.history = prompt, negative_prompt, run.history
            orbit = render_orbit(trained.renderer, trained.field, trained.background, ORBIT_VIEWS,
                                 config.preview_resolution, config.preview_elevation, config.preview_distance,
                                 config.preview_fovy)
        return {"ui": stage_ui(run, checkpoint, orbit, "l2vsd_orbit"),
                "result": (trained, orbit, curves_image(run.history))}


def nerf_config(score: ScoreSettings, scene: Scene, *, steps, resolution, guidance_scale, lr_encoding, lr_network,
                lr_background, seed, checkpoint_every, preview_every, resolution_schedule=DEFAULT_SCHEDULE,
                min_step_percent=DEFAULT_MIN_STEP, max_step_percent=DEFAULT_MAX_STEP, sqrt_anneal=False,
                lambda_image=0.0, lambda_z_variance=0.0, lambda_sparsity=10.0, lambda_opaque=DEFAULT_OPAQUE):
    """The node's inputs as the core's ``NerfConfig`` (the scene's renderer settings, the score's estimator); a
    value the config refuses is an input error naming the input."""
    from l2vsd_core.config import NerfConfig

    widths, milestones = parse_resolution_schedule("resolution_schedule", resolution_schedule)
    distill = make_config(
        score.distill, FIELDS_TO_INPUTS, "change it (see its tooltip)", default=NerfConfig().distill,
        guidance_scale=float(guidance_scale), min_step_percent=parse_schedule("min_step_percent", min_step_percent),
        max_step_percent=parse_schedule("max_step_percent", max_step_percent), sqrt_anneal=bool(sqrt_anneal))
    settings = scene.settings
    config = make_config(
        NerfConfig, FIELDS_TO_INPUTS, "change it (see its tooltip)", steps=int(steps), seed=int(seed),
        widths=(int(resolution), *widths), resolution_milestones=milestones, distill=distill,
        lr_encoding=float(lr_encoding), lr_network=float(lr_network), lr_background=float(lr_background),
        lambda_image=float(lambda_image), lambda_z_variance=float(lambda_z_variance),
        lambda_sparsity=float(lambda_sparsity), lambda_opaque=parse_schedule("lambda_opaque", lambda_opaque),
        checkpoint_every=int(checkpoint_every), preview_every=int(preview_every),
        preview_resolution=int(resolution), radius=settings.radius, num_samples_per_ray=settings.samples_per_ray,
        grid_resolution=settings.grid_resolution)
    check_timestep_range(config)
    return config
