"""L2VSDOptimize: stage-1 score distillation of a scene from a prior, with ComfyUI progress, previews, interruption
and checkpoint/resume. The loop itself is ``l2vsd_core.optimize.Stage1Optimizer``; this module only wires it up."""
from __future__ import annotations

import json
from pathlib import Path

from .common import (CATEGORY_OPTIMIZE, PRIOR_TYPE, SCENE_TYPE, SCORE_TYPE, input_error, output_directory,
                     relative_subpath, render_orbit, temp_directory, to_image_batch, to_pil)
from .model_nodes import LoadedPrior, ScoreSettings
from .scene_nodes import Scene

CHECKPOINT_FILE = "checkpoint.safetensors"
CURVES_FILE = "curves.json"
ORBIT_VIEWS = 8
PREVIEW_SIZE = 256  # the server scales progress previews to fit this size (up, too: toy renders are 32 wide)
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
        _check_sockets(prior, score, scene)
        if not str(prompt).strip():
            raise input_error("prompt", "is empty", "describe the object to generate, e.g. 'a red cube'")
        run_dir = output_directory() / relative_subpath("checkpoint_folder", checkpoint_folder, "folder name")
        checkpoint = run_dir / CHECKPOINT_FILE
        if run_dir.exists() and not run_dir.is_dir():
            raise input_error("checkpoint_folder", f"{run_dir} is a file", "pick another folder name")

        import torch
        with torch.inference_mode(False), torch.enable_grad():
            run = _Run(prior.prior, score, scene, run_dir, checkpoint, steps=int(steps), resolution=int(resolution),
                       guidance_scale=float(guidance_scale), lrs=(lr_encoding, lr_network, lr_background),
                       seed=int(seed), checkpoint_every=int(checkpoint_every), preview_every=int(preview_every))
            result = run.execute(prompt, negative_prompt, resume=bool(resume))
        ui = {"l2vsd_run": [{"start_step": run.start_step, "step": run.step, "steps": int(steps),
                             "checkpoint": str(checkpoint.relative_to(output_directory()).as_posix())}]}
        return {"ui": ui, "result": result}


def _check_sockets(prior, score, scene) -> None:
    for name, value, kind, source in (("prior", prior, LoadedPrior, "LoadPrior"),
                                      ("score", score, ScoreSettings, "AttachLoRAScore"),
                                      ("scene", scene, Scene, "InitNeRF")):
        if not isinstance(value, kind):
            raise input_error(name, f"got {type(value).__name__}", f"connect the output of a {source} node")


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
        import torch
        from l2vsd_core.optimize import Stage1Optimizer
        from l2vsd_core.prompts import PromptProcessor

        prompts = PromptProcessor(self.prior.encode_text, prompt, negative_prompt=negative_prompt)
        self.lora_unet, lora = None, None
        if self.config.distill.needs_trainable_score:
            from l2vsd_core.score import LoRAScore
            s = self.settings
            base = s.base.load_again() if s.separate_base else self.prior
            self.lora_unet = base.unet
            with torch.random.fork_rng(devices=[]):  # peft initialises the LoRA from the global RNG
                torch.manual_seed(self.config.seed)
                lora = LoRAScore(base.unet, base.alphas_cumprod, base.prediction_type, rank=s.rank,
                                 lr=s.lora_lr, camera_dropout=s.camera_dropout, seed=self.config.seed,
                                 adapter_name=ADAPTER_NAME)
        device = self.prior.device
        field, background = self.scene.field.to(device), self.scene.background.to(device)
        renderer = self.scene.renderer if self.scene.renderer is not None else self.config.make_renderer()
        renderer = renderer.to(device)
        self.scene.field, self.scene.background, self.scene.renderer = field, background, renderer
        return Stage1Optimizer(self.prior, lora, prompts, field, background, renderer, self.config)

    def _remove_lora(self) -> None:
        # The shared base is the cached prior's own UNet: take our adapter off so the next run starts clean.
        if self.lora_unet is not None and ADAPTER_NAME in (getattr(self.lora_unet, "peft_config", None) or {}):
            self.lora_unet.delete_adapters(ADAPTER_NAME)
        # The LoRA, its optimizer state and the activations are gone: give the blocks back to other nodes.
        import comfy.model_management as model_management
        model_management.soft_empty_cache()

    def execute(self, prompt: str, negative_prompt: str, resume: bool):
        import comfy.model_management as model_management
        import comfy.utils

        self.lora_unet = None
        try:
            optimizer = self._build(prompt, negative_prompt)
            history = self._resume(optimizer) if resume else []
            self.start_step = optimizer.global_step
            bar = comfy.utils.ProgressBar(self.config.steps)
            bar.update_absolute(self.start_step, self.config.steps)
            interrupted = []

            def should_stop() -> bool:
                try:
                    model_management.throw_exception_if_processing_interrupted()
                except model_management.InterruptProcessingException as e:
                    interrupted.append(e)  # re-raised once the loop has written the checkpoint
                    return True
                return False

            def callback(done, terms, preview):
                history.append({"done": done, **{k: v for k, v in terms.items() if isinstance(v, float)}})
                image = None if preview is None else ("JPEG", to_pil(preview), PREVIEW_SIZE)
                bar.update_absolute(done, self.config.steps, image)

            try:
                optimizer.run(callback=callback, should_stop=should_stop)
            except (KeyboardInterrupt, model_management.InterruptProcessingException):
                # ComfyUI's progress hook raises the interrupt itself, from the loop's callback, i.e. after a
                # complete step: checkpoint that step so that a resumed run continues from it.
                optimizer.save_checkpoint(self.checkpoint)
                raise
            finally:
                self.step = optimizer.global_step
                _write_json(self.run_dir / CURVES_FILE, history)
            if interrupted:
                raise interrupted[0]
            return self._outputs(optimizer, prompt, history)
        finally:
            self._remove_lora()

    def _resume(self, optimizer) -> list:
        """Restore the checkpoint, if there is one (resume on a first run simply starts from the scene)."""
        if not self.checkpoint.is_file():
            print(f"[L2VSD] resume: no checkpoint at {self.checkpoint} yet; starting from the input scene")
            return []
        try:
            meta = optimizer.load_checkpoint(self.checkpoint)
        except ValueError as e:
            raise input_error("resume", str(e), "set the same settings as the checkpointed run, or turn resume off "
                                                "(or pick another checkpoint_folder) to start over") from e
        print(f"[L2VSD] resumed from {self.checkpoint} at step {meta['step']}")
        curves = self.run_dir / CURVES_FILE
        try:
            return [t for t in json.loads(curves.read_text()) if t.get("done", 0) <= optimizer.global_step]
        except (OSError, ValueError, TypeError, AttributeError):
            return []  # the curves are a convenience; a run resumes without them

    def _outputs(self, optimizer, prompt: str, history: list):
        from l2vsd_core.generate import write_curves

        cfg = self.config
        scene = self.scene
        scene.steps_done = scene.steps_done + optimizer.global_step - self.start_step
        scene.prompt, scene.history = prompt, history
        orbit = render_orbit(scene.renderer, scene.field, scene.background, ORBIT_VIEWS, cfg.preview_resolution,
                             cfg.preview_elevation, cfg.preview_distance, cfg.preview_fovy)
        plot = write_curves(history, _unique_temp_file("l2vsd_curves", ".png"))
        from PIL import Image
        with Image.open(plot) as image:
            curves = to_image_batch([image])
        return (scene, orbit, curves)


def _write_json(path: Path, data) -> None:
    from l2vsd_core.files import atomic_write_text
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data))


def _unique_temp_file(stem: str, suffix: str) -> Path:
    import uuid
    folder = temp_directory()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}_{uuid.uuid4().hex[:12]}{suffix}"
