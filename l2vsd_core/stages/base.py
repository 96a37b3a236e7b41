"""The loop every stage shares: one :class:`Stage` owns the step, the NaN guard, previews, ``run`` and checkpoints.

One :meth:`Stage.step` is threestudio's ``training_step``:

1. B random cameras (:class:`~l2vsd_core.scene.cameras.RandomCameraSampler`) at the config's render size for this
   step (stage 1: 64 px, then 512 px from step 5000);
2. the subclass renders them (:meth:`Stage.render_for_training`: the NeRF's colour, the DMTet's normal map, the
   textured mesh's colour) to an image ``[B, 3, H, W]`` in [0, 1];
3. :meth:`Stage.distill`: resized to the prior's input size, encoded, conditioned on the view-dependent prompt and
   the camera, :func:`~l2vsd_core.distill.score_distillation` with the config's estimator (the LoRA takes its own
   optimizer steps inside), weighted by ``lambda_distill``; plus HiFA's image-space loss (``lambda_image``);
4. + the subclass's regularizers ``{name: (λ, value)}``;
5. backward and one step of the scene's optimizer; the subclass's :meth:`Stage.after_update` (stage 1: the
   occupancy grid).

NaN guard: a non-finite render, loss or gradient (or an empty mesh) skips the step — no update of the scene,
counted in ``skipped_steps``, the reason in the terms.  (The LoRA may already have taken its own step.)

Every random draw (cameras, stratified samples, background augmentation, VAE posterior sample, timesteps and noise,
occupancy-grid jitter) comes from one CPU generator seeded with ``config.seed``; the LoRA draws from its own.
Checkpoints hold both generators' states and torch's global CPU RNG, every module, the LoRA and both optimizers'
states, so a resumed run continues bit-for-bit (same device and thread count).  Previews draw nothing, so they do
not change the trajectory.  A checkpoint made with other settings is refused, except the step count, checkpoint
and preview settings (:data:`~l2vsd_core.config.RESUMABLE_CHANGES`); settings added since a checkpoint was written
count as their defaults.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import (check_keys, flatten_optimizer, generator_state, load_optimizer, read_checkpoint,
                          set_generator_state, write_checkpoint)
from ..config import StageConfig, config_changes
from ..distill import image_space_loss, score_distillation
from ..schedules import scheduled_value
from ..scene.cameras import RandomCameraSampler, orbit_cameras

PathLike = Union[str, os.PathLike]


def colour_optimizer(field: nn.Module, background: Optional[nn.Module], config) -> torch.optim.AdamW:
    """AdamW over a colour field's and a background's named parameter groups (stages 1 and 3: threestudio's
    encoding 0.01, networks 0.001, background 0.001)."""
    groups = field.parameter_groups(config.lr_encoding, config.lr_network)
    if background is not None:
        groups += background.parameter_groups(config.lr_background)
    return torch.optim.AdamW(groups, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)


def field_modules(field: nn.Module, background: Optional[nn.Module]) -> dict[str, nn.Module]:
    return {"field": field, **({"background": background} if background is not None else {})}


class Stage:
    """A score-distillation stage over a scene (subclass: its modules, render, regularizers and preview).

    Subclasses set ``FORMAT`` (checkpoint format, ``"<key>/<version>"``), ``STAGE`` (its name), ``CONFIG`` (its
    config class), ``self.optimizer`` (named param groups), and implement :meth:`modules`,
    :meth:`render_for_training` and :meth:`render_preview`.
    """

    FORMAT = ""
    STAGE = ""
    CONFIG = StageConfig
    RENDERER: type = object

    def __init__(self, prior, score, prompt_processor, config: StageConfig, renderer, device):
        if not isinstance(config, self.CONFIG):
            raise ValueError(f"config must be a {self.CONFIG.__name__}; got {type(config).__name__}")
        config.validate()
        config.check_prior(prior)
        if config.distill.needs_trainable_score and score is None:
            raise ValueError(f"method {config.distill.method!r} needs a trainable score (the LoRA); got score=None "
                             f"— attach one or use method 'sds'")
        if not isinstance(renderer, self.RENDERER):
            raise ValueError(f"renderer must be a {self.RENDERER.__name__}; got {type(renderer).__name__}")
        self.prior, self.score, self.prompts = prior, score, prompt_processor
        self.config, self.renderer = config, renderer
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.sampler = RandomCameraSampler(camera_distance_range=config.camera_distance_range,
                                           fovy_range=config.fovy_range, elevation_range=config.elevation_range)
        self.optimizer: torch.optim.Optimizer
        self.global_step = 0
        self.skipped_steps = 0

    # ------------------------------------------------------------------------------------------ what subclasses give
    def modules(self) -> dict[str, nn.Module]:
        """The checkpointed modules by tensor prefix (also switched between train and eval mode)."""
        raise NotImplementedError

    def mode_modules(self) -> list[nn.Module]:
        """What :meth:`step` puts in training mode and :meth:`preview` in evaluation mode."""
        return list(self.modules().values())

    def render_for_training(self, cameras, size: int, terms: dict) -> Union[dict, str]:
        """``{"image": [B, 3, H, W], ...}`` for the distillation and the regularizers, or a skip reason."""
        raise NotImplementedError

    def regularizers(self, rendered: dict, step: int) -> dict[str, tuple[float, torch.Tensor]]:
        return {}

    def after_update(self, step: int, terms: dict) -> None:
        """After the scene's optimizer step (stage 1: the occupancy grid)."""

    def render_preview(self, cameras) -> torch.Tensor:
        """``[1, H, W, 3]`` in evaluation mode, no random draw."""
        raise NotImplementedError

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def check_extra_tensors(self, tensors: dict, path: Path) -> None:
        pass

    def extra_metadata(self) -> dict:
        return {}

    def load_extra_metadata(self, meta: dict) -> None:
        pass

    # ---------------------------------------------------------------------------------------------------- step
    def _train_mode(self, on: bool) -> None:
        for m in self.mode_modules():
            m.train(on)

    def step(self) -> dict[str, float]:
        """One optimization step; returns float terms (``loss``, ``loss_distill``, ``loss_<regularizer>``, …,
        ``skipped`` = 1.0 when the NaN guard skipped it)."""
        cfg, step = self.config, self.global_step
        self._train_mode(True)
        size = cfg.render_size(step)
        self.sampler.width = self.sampler.height = size
        cameras = self.sampler.sample(cfg.batch_size, generator=self.generator, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, float] = {"step": float(step), "resolution": float(size), "skipped": 0.0}
        rendered = self.render_for_training(cameras, size, terms)
        if isinstance(rendered, str):
            return self._skip(terms, rendered)
        if not torch.isfinite(rendered["image"].detach()).all():
            return self._skip(terms, "render")
        loss = self.distill(rendered["image"], cameras, terms)
        for name, (lam, value) in self.regularizers(rendered, step).items():
            loss = loss + lam * value
            terms[f"loss_{name}"] = float(value.detach())
        return self._finish(loss, terms)

    def distill(self, image: torch.Tensor, cameras, terms: dict) -> torch.Tensor:
        """λ_distill · the estimator's loss for ``image`` [B, 3, H, W] in [0, 1] (resized to the prior's size), plus
        λ_image · HiFA's image-space loss of the same estimate."""
        cfg, step, g = self.config, self.global_step, self.generator
        lam = scheduled_value(cfg.lambda_distill, step)
        if lam == 0:
            return image.new_zeros(())
        size = int(self.prior.image_size)
        if image.shape[-1] != size or image.shape[-2] != size:
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        x0 = self.prior.encode_images(image, generator=g)
        cond = self.prompts.conditioning(cameras.elevation_deg.detach().cpu(), cameras.azimuth_deg.detach().cpu(),
                                         cameras.c2w_flat())
        result = score_distillation(x0, self.prior, self.score, cond, cfg.distill, step=step, generator=g)
        loss = lam * result.loss
        terms["loss_distill"] = float(result.loss.detach())
        if result.lora_loss is not None:
            terms["loss_lora"] = float(result.lora_loss)
        for k, v in result.terms.items():
            terms[f"distill_{k}"] = float(v)
        lam_image = scheduled_value(cfg.lambda_image, step)
        if lam_image > 0:  # HiFA: the same estimate, distilled in image space too
            image_loss, _ = image_space_loss(image, result, self.prior.decode_latents, self.prior.alphas_cumprod,
                                             cfg.distill.weighting)
            loss = loss + lam_image * image_loss
            terms["loss_image"] = float(image_loss.detach())
        return loss

    def _finish(self, loss: torch.Tensor, terms: dict) -> dict[str, float]:
        """NaN guard, backward, one optimizer step."""
        terms["loss"] = float(loss.detach())
        if not math.isfinite(terms["loss"]):
            return self._skip(terms, "loss")
        if loss.requires_grad:
            loss.backward()
        params = [p for grp in self.optimizer.param_groups for p in grp["params"]]
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params):
            return self._skip(terms, "grad")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.after_update(self.global_step, terms)
        self.global_step += 1
        return terms

    def _skip(self, terms: dict, why: str) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.global_step += 1
        terms["skipped"] = 1.0
        terms.setdefault("loss", float("nan"))
        terms["skipped_steps"] = float(self.skipped_steps)
        terms["skip_reason_" + why] = 1.0
        return terms

    # ------------------------------------------------------------------------------------------------- preview
    @torch.no_grad()
    def preview(self, step: Optional[int] = None) -> torch.Tensor:
        """An orbit-camera render [H, W, 3] in [0, 1], in evaluation mode and without any random draw (the training
        trajectory is unchanged); view ``(step // preview_every) % preview_views`` of the orbit."""
        cfg = self.config
        step = self.global_step if step is None else step
        view = (step // max(cfg.preview_every, 1)) % cfg.preview_views
        cam = orbit_cameras(1, cfg.preview_elevation, cfg.preview_distance, cfg.preview_fovy, cfg.preview_resolution,
                            cfg.preview_resolution, start_azimuth_deg=-180.0 + 360.0 * view / cfg.preview_views,
                            device=self.device)
        modules = self.mode_modules()
        was = [m.training for m in modules]
        self._train_mode(False)
        try:
            image = self.render_preview(cam)
        finally:
            for m, t in zip(modules, was):
                m.train(t)
        return image[0].detach().float().clamp(0, 1).cpu()

    # ----------------------------------------------------------------------------------------------------- run
    def run(self, callback: Optional[Callable] = None, should_stop: Optional[Callable[[], bool]] = None,
            checkpoint_path: Optional[PathLike] = None) -> int:
        """Step until ``config.steps``: ``callback(done, terms, preview_or_None)`` after each step, ``should_stop()``
        before each; checkpoints every ``checkpoint_every`` steps, on stop and at the end when a path is known
        (``checkpoint_path`` or the config's).  Returns the number of steps done."""
        cfg = self.config
        path = checkpoint_path if checkpoint_path is not None else cfg.checkpoint_path
        while self.global_step < cfg.steps:
            if should_stop is not None and should_stop():
                break
            terms = self.step()
            done = self.global_step
            preview = self.preview(done) if cfg.preview_every and done % cfg.preview_every == 0 else None
            if callback is not None:
                callback(done, terms, preview)
            if path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                self.save_checkpoint(path)
        if path is not None:
            self.save_checkpoint(path)
        return self.global_step

    # ---------------------------------------------------------------------------------------------- checkpoint
    @property
    def metadata_key(self) -> str:
        return self.FORMAT.split("/")[0]

    def _group_names(self) -> list[str]:
        return [grp.get("name", f"group{i}") for i, grp in enumerate(self.optimizer.param_groups)]

    def _expected_tensors(self) -> dict[str, torch.Tensor]:
        expected = {f"{prefix}.{k}": v for prefix, module in self.modules().items()
                    for k, v in module.state_dict().items()}
        expected.update(self.extra_tensors())
        if self.score is not None:
            expected.update({f"score.{k}": v for k, v in self.score.trainable_state_dict().items()})
        return expected

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {k: v.detach().clone().contiguous().cpu() for k, v in self._expected_tensors().items()}
        if self.score is not None:
            tensors.update(flatten_optimizer(self.score.optimizer, "score_optim", None))
        tensors.update(flatten_optimizer(self.optimizer, "optim", self._group_names()))
        return tensors

    def state_metadata(self) -> dict:
        meta = {"format": self.FORMAT, "stage": self.STAGE, "step": self.global_step,
                "skipped_steps": self.skipped_steps, "config": self.config.to_json(),
                "rng": {"loop": generator_state(self.generator),
                        "torch_cpu": [int(x) for x in torch.get_rng_state().tolist()]}}
        if self.score is not None and getattr(self.score, "generator", None) is not None:
            meta["rng"]["score"] = generator_state(self.score.generator)
        meta.update(self.extra_metadata())
        return meta

    def save_checkpoint(self, path: PathLike) -> Path:
        """Write ``path`` (safetensors, the metadata inside) and ``path + '.json'`` atomically; returns the path."""
        return write_checkpoint(path, self.state_tensors(), self.state_metadata(), self.metadata_key)

    def load_checkpoint(self, path: PathLike) -> dict:
        """Restore everything from ``path``; ``ValueError`` (before anything changes) if it is unreadable, of
        another stage, or made with other settings or shapes.  Returns the metadata."""
        path = Path(path)
        tensors, meta = read_checkpoint(path, self.metadata_key, f"{self.STAGE}-stage")
        if meta.get("format") != self.FORMAT:
            raise ValueError(f"checkpoint {path} has format {meta.get('format')!r}; expected {self.FORMAT!r}")
        changed = config_changes(meta.get("config", {}), self.config.to_json(), type(self.config)().to_json())
        if changed:
            shown = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in changed[:6])
            raise ValueError(f"checkpoint {path} was made with other settings ({shown}"
                             f"{'; …' if len(changed) > 6 else ''}): resume with the same settings (only the step "
                             f"count, checkpoint and preview settings may change) or start the {self.STAGE} stage "
                             f"anew")
        got = {k: v for k, v in tensors.items() if not k.startswith(("optim.", "score_optim."))}
        self.check_extra_tensors(got, path)
        check_keys(path, self._expected_tensors(), got)
        if self.score is None and any(k.startswith("score_optim.") for k in tensors):
            raise ValueError(f"checkpoint {path} does not match this configuration (it has a LoRA score, this run "
                             f"has none)")
        self.load_extra_metadata(meta)
        self._restore(tensors, meta)
        return meta

    def _restore(self, tensors: dict, meta: dict) -> None:
        """Module and LoRA weights, both optimizers' states, every RNG and the step."""
        with torch.no_grad():
            for prefix, module in self.modules().items():
                module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items()
                                        if k.startswith(prefix + ".")})
            if self.score is not None:
                params = dict(self.score.named_parameters())
                for k, v in tensors.items():
                    if k.startswith("score."):
                        params[k[len("score."):]].copy_(v)
        load_optimizer(self.optimizer, "optim", self._group_names(),
                       {k: v for k, v in tensors.items() if k.startswith("optim.")})
        if self.score is not None:
            load_optimizer(self.score.optimizer, "score_optim", None,
                           {k: v for k, v in tensors.items() if k.startswith("score_optim.")})
        rng = meta.get("rng", {})
        set_generator_state(self.generator, rng["loop"])
        if "torch_cpu" in rng:
            torch.set_rng_state(torch.tensor(rng["torch_cpu"], dtype=torch.uint8))
        if self.score is not None and "score" in rng:
            set_generator_state(self.score.generator, rng["score"])
        self.global_step = int(meta["step"])
        self.skipped_steps = int(meta.get("skipped_steps", 0))
