"""L2VSDOptimize: stage-1 score distillation of a scene from a prior, with ComfyUI progress, previews, interruption
and checkpoint/resume. The loop itself is ``l2vsd_core.optimize.Stage1Optimizer``; this module only wires it up."""
from __future__ import annotations

from pathlib import Path

from .common import (CATEGORY_OPTIMIZE, PRIOR_TYPE, SCENE_TYPE, SCORE_TYPE, check_prompt, check_sockets, input_error,
                     render_orbit)
from .model_nodes import LoadedPrior, ScoreSettings
from .runs import (CHECKPOINT_FILE, CURVES_FILE, curves_image, make_lora, remove_lora, resume_from, run_folder,
                   run_info, run_with_progress)
from .scene_nodes import Scene

ORBIT_VIEWS = 8
ADAPTER_NAME = "l2vsd"  # fixed: a checkpoint's LoRA weights are stored under names that contain it


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
            "steps": ("INT", {"default": 400, "min": 1, "max": 100000,
                              "tooltip": "Optimization steps (toy demo: a few hundred; SD priors: thousands)."}),
            "resolution": ("INT", {"default": 32, "min": 8, "max": 1024, "step": 8,
                                   "tooltip": "Width = height of the training renders: 32 for the bundled toy "
                                              "prior, 64 (then 512) for SD; a multiple of the prior's pixel factor "
                                              "(8 for SD's VAE)."}),
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
            "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 100000,
                                         "tooltip": "Write the checkpoint every N steps (0 = only at the end and "
                                                    "when interrupted)."}),
            "preview_every": ("INT", {"default": 10, "min": 0, "max": 100000,
                                      "tooltip": "Show an orbit render in the progress bar every N steps (0 = none)."}),
            "resume": ("BOOLEAN", {"default": False,
                                   "tooltip": "Continue from the checkpoint in checkpoint_folder (e.g. after Cancel) "
                                              "up to 'steps'; the other settings must match that run. Off: start "
                                              "over and overwrite it."}),
            "checkpoint_folder": ("STRING", {"default": "l2vsd/run",
                                             "tooltip": "Folder under ComfyUI's output folder for the checkpoint "
                                                        "and loss curves."}),
        }}

    RETURN_TYPES = (SCENE_TYPE, "IMAGE", "IMAGE")
    RETURN_NAMES = ("scene", "orbit_renders", "loss_curves")
    FUNCTION = "optimize"
    CATEGORY = CATEGORY_OPTIMIZE
    DESCRIPTION = ("Optimizes the scene by score distillation (SDS / VSD / L²-VSD ...). Cancel writes a checkpoint; "
                   "run again with resume on to continue.")

    def optimize(self, prior, score, scene, prompt, negative_prompt, steps, resolution, guidance_scale,
                 lr_encoding, lr_network, lr_background, seed, checkpoint_every, preview_every, resume,
                 checkpoint_folder):
        check_sockets(prior=(prior, LoadedPrior, "LoadPrior"), score=(score, ScoreSettings, "AttachLoRAScore"),
                      scene=(scene, Scene, "InitNeRF"))
        check_prompt(prompt)
        run_dir = run_folder(checkpoint_folder)
        checkpoint = run_dir / CHECKPOINT_FILE

        import torch
        with torch.inference_mode(False), torch.enable_grad():
            run = _Run(prior.prior, score, scene, run_dir, checkpoint, steps=int(steps), resolution=int(resolution),
                       guidance_scale=float(guidance_scale), lrs=(lr_encoding, lr_network, lr_background),
                       seed=int(seed), checkpoint_every=int(checkpoint_every), preview_every=int(preview_every))
            result = run.execute(prompt, negative_prompt, resume=bool(resume))
        return {"ui": run_info(run.start_step, run.step, int(steps), checkpoint), "result": result}


class _Run:
    """One execution of the node: builds the core objects, runs the loop with ComfyUI's hooks, cleans up."""

    def __init__(self, prior, score: ScoreSettings, scene: Scene, run_dir: Path, checkpoint: Path, *, steps,
                 resolution, guidance_scale, lrs, seed, checkpoint_every, preview_every):
        from l2vsd_core.distill import DistillConfig
        from l2vsd_core.optimize import Stage1Config

        self.prior, self.settings, self.run_dir, self.checkpoint = prior, score, run_dir, checkpoint
        self.scene = scene.copy()  # ComfyUI may hand the same cached scene to other nodes
        scene_settings = self.scene.settings
        distill = DistillConfig(method=score.method, eta=score.eta, esd_lambda=score.esd_lambda,
                                jvp_mode=score.jvp_mode,
                                guidance_scale=score.guidance_scale if guidance_scale < 0 else guidance_scale)
        try:
            self.config = Stage1Config(
                steps=steps, seed=seed, widths=(resolution,), resolution_milestones=(), distill=distill,
                lr_encoding=float(lrs[0]), lr_network=float(lrs[1]), lr_background=float(lrs[2]),
                checkpoint_every=checkpoint_every, checkpoint_path=str(checkpoint), preview_every=preview_every,
                preview_resolution=resolution, radius=scene_settings.radius,
                num_samples_per_ray=scene_settings.samples_per_ray, grid_resolution=scene_settings.grid_resolution)
            self.config.check_prior(prior)
        except ValueError as e:
            if "resolution" in str(e):
                raise input_error("resolution", str(e), "use a multiple of the prior's pixel factor (toy prior: 32; "
                                                        "SD: 64)") from e
            raise
        self.start_step = self.step = 0

    def _build(self, prompt: str, negative_prompt: str):
        from l2vsd_core.optimize import Stage1Optimizer
        from l2vsd_core.prompts import PromptProcessor

        prompts = PromptProcessor(self.prior.encode_text, prompt, negative_prompt=negative_prompt)
        self.lora_unet, lora = None, None
        if self.config.distill.needs_trainable_score:
            lora, self.lora_unet = make_lora(self.settings, self.prior, self.config.seed, ADAPTER_NAME)
        device = self.prior.device
        field, background = self.scene.field.to(device), self.scene.background.to(device)
        renderer = self.scene.renderer if self.scene.renderer is not None else self.config.make_renderer()
        renderer = renderer.to(device)
        self.scene.field, self.scene.background, self.scene.renderer = field, background, renderer
        return Stage1Optimizer(self.prior, lora, prompts, field, background, renderer, self.config)

    def execute(self, prompt: str, negative_prompt: str, resume: bool):
        self.lora_unet = None
        try:
            optimizer = self._build(prompt, negative_prompt)
            curves = self.run_dir / CURVES_FILE
            history = resume_from(optimizer, self.checkpoint, curves) if resume else []
            self.start_step = optimizer.global_step
            try:
                run_with_progress(optimizer, self.config.steps, self.checkpoint, curves, history)
            finally:
                self.step = optimizer.global_step
            return self._outputs(optimizer, prompt, negative_prompt, history)
        finally:
            remove_lora(self.lora_unet, ADAPTER_NAME)

    def _outputs(self, optimizer, prompt: str, negative_prompt: str, history: list):
        cfg = self.config
        scene = self.scene
        scene.steps_done = scene.steps_done + optimizer.global_step - self.start_step
        scene.prompt, scene.negative_prompt, scene.history = prompt, negative_prompt, history
        orbit = render_orbit(scene.renderer, scene.field, scene.background, ORBIT_VIEWS, cfg.preview_resolution,
                             cfg.preview_elevation, cfg.preview_distance, cfg.preview_fovy)
        return (scene, orbit, curves_image(history))
