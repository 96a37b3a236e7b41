"""Stage-1 optimization loop (ProlificDreamer "coarse" NeRF stage), pure library code.

One :meth:`Stage1Optimizer.step` is threestudio's ``training_step`` for ``prolificdreamer.yaml``:

1. sample B random cameras (:class:`~l2vsd_core.scene.cameras.RandomCameraSampler`) at the current resolution of
   the schedule ``widths`` / ``resolution_milestones`` (64 px until step 5000, then 512 px by default);
2. render them with the :class:`~l2vsd_core.scene.renderer.VolumeRenderer` (stratified, background with random
   solid-colour augmentation), image ``[B, 3, H, W]``, bilinearly resized to ``prior.image_size`` if it differs;
3. ``prior.encode_images`` → x0; ``prompt_processor.conditioning(elevation, azimuth, c2w_flat)``;
4. :func:`~l2vsd_core.distill.score_distillation` (sds / vsd / lvsd / l2vsd / … as ``config.distill.method``);
5. loss = distill loss + λ_sparsity·mean(√(opacity² + 0.01)) + λ_opaque·BCE(opacity, opacity) (clamped to
   [1e-3, 1 − 1e-3]) + λ_z_variance·mean(z_variance[opacity > 0.5]) + λ_orient·Σ sg(w)·max(0, n·d)² / #(opacity
   > 0) (needs a field with normals; ProlificDreamer's stage 1 has them off: ``normal_type: null``,
   ``lambda_orient 0``) + λ_image·(HiFA's image-space loss, :func:`~l2vsd_core.distill.image_space_loss`); the λ
   may be threestudio schedules ``[start_step, v0, v1, end_step]``;
6. backward, one AdamW step (betas (0.9, 0.99), eps 1e-15; encoding 0.01, networks 0.001, background 0.001);
7. ``occupancy_grid.maybe_update(step, field)``.

NaN guard: a non-finite render or loss skips the step (no parameter update of the scene; counted in
``skipped_steps``).  Note that the LoRA score may already have taken its own step inside ``score_distillation``
when only the final loss is non-finite.

Every random draw of the loop (cameras, stratified samples, background augmentation, VAE posterior sample,
timesteps and noise, occupancy-grid jitter) comes from one CPU ``torch.Generator`` seeded with ``config.seed``; the
LoRA score draws from its own generator.  Checkpoints hold both generators' states (and torch's global CPU RNG),
the scene, the occupancy grid, the LoRA weights and both optimizers' states, so a run resumed from a checkpoint
continues bit-for-bit (on the same device and thread count).  Previews are rendered without touching any RNG, so
they do not change the trajectory.

Checkpoints: one ``.safetensors`` file (tensors + the JSON metadata under the ``"l2vsd_stage1"`` key) written
atomically (temporary file + ``os.replace``) and a human-readable ``.json`` sidecar with the same metadata.
Tensor names: ``field.<name>``, ``background.<name>``, ``grid.<name>``, ``score.<name>``,
``optim.<group>.<i>.<state>`` (the scene's AdamW; ``<i>`` is the parameter's position in its group) and
``score_optim.<i>.<state>`` (the LoRA's AdamW).
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .files import atomic_write
from .distill import DistillConfig, image_space_loss, score_distillation
from .schedules import Scheduled, check_scheduled, scheduled_value
from .scene.cameras import RandomCameraSampler, orbit_cameras
from .scene.renderer import OccupancyGrid, VolumeRenderer

__all__ = ["Stage1Config", "Stage1Optimizer", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "l2vsd_stage1/1"
_META_KEY = "l2vsd_stage1"


def _require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------------------------------------------ config
@dataclass
class Stage1Config:
    """Stage-1 settings; defaults are threestudio's ``configs/prolificdreamer.yaml``."""

    steps: int = 25000
    seed: int = 0
    batch_size: int = 1
    widths: Sequence[int] = (64, 512)            # square renders; one entry per resolution stage
    resolution_milestones: Sequence[int] = (5000,)  # step at which the next entry of ``widths`` starts
    distill: DistillConfig = field(default_factory=DistillConfig)
    lr_encoding: float = 0.01
    lr_network: float = 0.001
    lr_background: float = 0.001
    betas: Sequence[float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.01                   # torch's AdamW default (threestudio passes none)
    lambda_sparsity: Scheduled = 10.0
    lambda_opaque: Scheduled = (10000, 0.0, 1000.0, 10001)
    lambda_z_variance: Scheduled = 0.0
    lambda_orient: Scheduled = 0.0               # needs a field with normals (ProlificDreamer stage 1: 0, no normals)
    lambda_image: Scheduled = 0.0                # HiFA's image-space loss (threestudio lambda_vsd_img; HiFA: 0.01)
    checkpoint_every: int = 1000                 # 0: only at the end / on stop
    checkpoint_path: Optional[str] = None        # where run() writes; None: run() writes no checkpoint
    preview_every: int = 200                     # 0: no previews
    preview_resolution: int = 64
    preview_views: int = 120                     # orbit; the preview at step s shows view (s // preview_every) % n
    preview_elevation: float = 15.0
    preview_distance: float = 1.5
    preview_fovy: float = 70.0
    # scene / renderer (used by make_renderer and the camera sampler)
    radius: float = 1.0
    num_samples_per_ray: int = 512
    grid_resolution: int = 32
    grid_update_every: int = 16
    grid_decay: float = 0.95
    grid_threshold: float = 0.01
    camera_distance_range: Sequence[float] = (1.0, 1.5)
    fovy_range: Sequence[float] = (40.0, 70.0)
    elevation_range: Sequence[float] = (-10.0, 45.0)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "Stage1Config":
        for name in ("steps", "batch_size", "num_samples_per_ray", "grid_resolution", "grid_update_every",
                     "preview_resolution", "preview_views"):
            v = getattr(self, name)
            _require(_is_int(v) and v >= 1, name, v, "an integer >= 1")
        _require(_is_int(self.seed), "seed", self.seed, "an integer")
        for name in ("checkpoint_every", "preview_every"):
            v = getattr(self, name)
            _require(_is_int(v) and v >= 0, name, v, "an integer >= 0 (0 = off)")
        widths = list(self.widths) if isinstance(self.widths, (list, tuple)) else None
        _require(bool(widths) and all(_is_int(w) and w >= 1 for w in widths), "widths", self.widths,
                 "a non-empty list of integers >= 1")
        ms = list(self.resolution_milestones) if isinstance(self.resolution_milestones, (list, tuple)) else None
        _require(ms is not None and len(ms) == len(widths) - 1 and all(_is_int(m) and m >= 1 for m in ms)
                 and all(a < b for a, b in zip(ms, ms[1:])), "resolution_milestones", self.resolution_milestones,
                 f"{len(widths) - 1} increasing integers >= 1 (one fewer than widths)")
        self.widths, self.resolution_milestones = tuple(widths), tuple(ms)
        for name in ("lr_encoding", "lr_network", "lr_background", "weight_decay"):
            v = getattr(self, name)
            _require(_is_num(v) and v >= 0, name, v, "a finite number >= 0")
        _require(_is_num(self.eps) and self.eps > 0, "eps", self.eps, "a finite number > 0")
        _require(isinstance(self.betas, (list, tuple)) and len(self.betas) == 2
                 and all(_is_num(b) and 0 <= b < 1 for b in self.betas), "betas", self.betas, "two numbers in [0, 1)")
        for name in ("lambda_sparsity", "lambda_opaque", "lambda_z_variance", "lambda_orient", "lambda_image"):
            v = getattr(self, name)
            check_scheduled(name, v)
            vals = [v] if _is_num(v) else [v[1], v[2]]
            _require(all(x >= 0 for x in vals), name, v, "a weight >= 0 (or a schedule of weights >= 0)")
        _require(isinstance(self.distill, DistillConfig), "distill", self.distill, "a DistillConfig")
        for name in ("radius", "preview_distance", "preview_fovy", "grid_decay", "grid_threshold"):
            v = getattr(self, name)
            _require(_is_num(v), name, v, "a finite number")
        _require(self.radius > 0, "radius", self.radius, "> 0")
        _require(self.checkpoint_path is None or isinstance(self.checkpoint_path, (str, os.PathLike)),
                 "checkpoint_path", self.checkpoint_path, "a path or None")
        return self

    def resolution(self, step: int) -> int:
        """The render width (= height) at ``step``: ``widths[i]`` with i = number of milestones <= step."""
        return self.widths[bisect.bisect_right(self.resolution_milestones, step)]

    def check_prior(self, prior) -> None:
        """Every resolution must be a multiple of the prior's pixel factor (8 for SD's VAE, 1 for pixel priors)."""
        factor = int(getattr(prior, "vae_scale_factor", 1))
        for w in (*self.widths, self.preview_resolution):
            if w % factor:
                raise ValueError(f"resolution {w} (widths {list(self.widths)}, preview_resolution "
                                 f"{self.preview_resolution}) must be a multiple of the prior's pixel factor "
                                 f"{factor}")

    def make_renderer(self) -> VolumeRenderer:
        """A :class:`VolumeRenderer` with an :class:`OccupancyGrid` from these settings."""
        grid = OccupancyGrid(radius=self.radius, resolution=self.grid_resolution, decay=self.grid_decay,
                             threshold=self.grid_threshold, update_every_n_steps=self.grid_update_every)
        return VolumeRenderer(radius=self.radius, num_samples_per_ray=self.num_samples_per_ray,
                              occupancy_grid=grid)

    def to_json(self) -> dict:
        def conv(v):
            if dataclasses.is_dataclass(v):
                return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, (list, tuple)):
                return [conv(x) for x in v]
            if isinstance(v, os.PathLike):
                return os.fspath(v)
            return v
        return conv(self)


# Settings a resumed run may change: they do not alter the trajectory up to the step it resumes from.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "checkpoint_path", "preview_", "distill.timesteps.max_steps")


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(key, saved, current)`` for every setting that differs, except ``RESUMABLE_CHANGES``."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        name = prefix + key
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, name + ".")
        elif a != b and not name.startswith(RESUMABLE_CHANGES):
            changes.append((name, a, b))
    return changes


# ---------------------------------------------------------------------------------------------------- the optimizer
def _gen_state(g: torch.Generator) -> list[int]:
    return [int(x) for x in g.get_state().tolist()]


def _set_gen_state(g: torch.Generator, state: list[int]) -> None:
    g.set_state(torch.tensor(state, dtype=torch.uint8))


def check_checkpoint_keys(path, expected: dict, got: dict) -> None:
    """``ValueError`` naming what differs when the checkpoint's module tensors ``got`` are not exactly ``expected``
    (names and shapes) — checked before anything is loaded."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:5])}{', …' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"checkpoint {path} does not match this configuration ({'; '.join(parts)})")


def restore_training_state(loop, tensors: dict, meta: dict) -> None:
    """Load a validated checkpoint into a loop (stage 1's or a refinement stage's: they share ``_modules()``,
    ``score``, ``optimizer``, ``_group_names()``, ``generator`` and the step counters): module weights, LoRA
    weights, both optimizers' states, every RNG and the step, so that the run continues bit-for-bit."""
    with torch.no_grad():
        for prefix, module in loop._modules().items():
            module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        if loop.score is not None:
            params = dict(loop.score.named_parameters())
            for k, v in tensors.items():
                if k.startswith("score."):
                    params[k[len("score."):]].copy_(v)
    Stage1Optimizer._unflatten_optim(loop.optimizer, "optim", loop._group_names(),
                                     {k: v for k, v in tensors.items() if k.startswith("optim.")})
    if loop.score is not None:
        Stage1Optimizer._unflatten_optim(loop.score.optimizer, "score_optim", None,
                                         {k: v for k, v in tensors.items() if k.startswith("score_optim.")})
    rng = meta.get("rng", {})
    _set_gen_state(loop.generator, rng["loop"])
    if "torch_cpu" in rng:
        torch.set_rng_state(torch.tensor(rng["torch_cpu"], dtype=torch.uint8))
    if loop.score is not None and "score" in rng:
        _set_gen_state(loop.score.generator, rng["score"])
    loop.global_step = int(meta["step"])
    loop.skipped_steps = int(meta.get("skipped_steps", 0))


class Stage1Optimizer:
    """Stage-1 loop over ``field`` (``ImplicitVolume``), ``background`` (``EnvironmentBackground`` or None) and the
    LoRA ``score`` (``LoRAScore``, or None for ``sds``), distilled from ``prior`` with ``prompt_processor``'s
    conditioning and rendered by ``renderer`` (e.g. ``config.make_renderer()``)."""

    def __init__(self, prior, score, prompt_processor, field, background, renderer: VolumeRenderer,
                 config: Stage1Config):
        if not isinstance(config, Stage1Config):
            raise ValueError(f"config must be a Stage1Config; got {type(config).__name__}")
        config.validate()
        config.check_prior(prior)
        if config.distill.needs_trainable_score and score is None:
            raise ValueError(f"method {config.distill.method!r} needs a trainable score (the LoRA); got score=None "
                             f"— attach one or use method 'sds'")
        if not isinstance(renderer, VolumeRenderer):
            raise ValueError(f"renderer must be a VolumeRenderer; got {type(renderer).__name__}")
        self.prior, self.score, self.prompts = prior, score, prompt_processor
        self.field, self.background, self.renderer, self.config = field, background, renderer, config
        self.grid: Optional[OccupancyGrid] = renderer.occupancy_grid
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.sampler = RandomCameraSampler(camera_distance_range=config.camera_distance_range,
                                           fovy_range=config.fovy_range, elevation_range=config.elevation_range)
        groups = field.parameter_groups(config.lr_encoding, config.lr_network)
        if background is not None:
            groups += background.parameter_groups(config.lr_background)
        self.optimizer = torch.optim.AdamW(groups, betas=tuple(config.betas), eps=config.eps,
                                           weight_decay=config.weight_decay)
        self.global_step = 0
        self.skipped_steps = 0
        try:
            self.device = next(field.parameters()).device
        except StopIteration:
            self.device = torch.device("cpu")

    # ---------------------------------------------------------------------------------------------------- step
    def _train_mode(self, on: bool) -> None:
        for m in (self.field, self.background, self.renderer):
            if m is not None:
                m.train(on)

    def render_image(self, cameras, resolution: int, generator=None, stratified=None) -> dict:
        out = self.renderer.render_camera(cameras, self.field, self.background, height=resolution, width=resolution,
                                          generator=generator, stratified=stratified)
        return out

    def regularizers(self, out: dict, step: int) -> dict[str, torch.Tensor]:
        cfg, terms = self.config, {}
        opacity = out["opacity"]
        lam = scheduled_value(cfg.lambda_sparsity, step)
        if lam > 0:
            terms["sparsity"] = (lam, (opacity ** 2 + 0.01).sqrt().mean())
        lam = scheduled_value(cfg.lambda_opaque, step)
        if lam > 0:
            oc = opacity.clamp(1e-3, 1 - 1e-3)
            terms["opaque"] = (lam, F.binary_cross_entropy(oc, oc))
        lam = scheduled_value(cfg.lambda_z_variance, step)
        if lam > 0:
            mask = opacity > 0.5
            zv = out["z_variance"][mask]
            terms["z_variance"] = (lam, zv.mean() if zv.numel() else opacity.sum() * 0)
        lam = scheduled_value(cfg.lambda_orient, step)
        if lam > 0:
            if "orient" not in out:
                raise ValueError("lambda_orient > 0 needs normals from the field: build it with normal_type "
                                 "'finite_difference' or 'analytic' (generate --normal-type)")
            terms["orient"] = (lam, out["orient"].sum() / (opacity > 0).sum().clamp_min(1))
        return terms

    def step(self) -> dict[str, float]:
        """One optimization step; returns float loss terms (``loss``, ``loss_distill``, ``loss_<reg>``, …,
        ``skipped`` = 1.0 when the NaN guard skipped it)."""
        cfg, step, g = self.config, self.global_step, self.generator
        self._train_mode(True)
        res = cfg.resolution(step)
        self.sampler.width = self.sampler.height = res
        cams = self.sampler.sample(cfg.batch_size, generator=g, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.render_image(cams, res, generator=g)
        image = out["rgb"].permute(0, 3, 1, 2)  # [B, 3, H, W]
        terms: dict[str, float] = {"step": float(step), "resolution": float(res), "skipped": 0.0}
        if not torch.isfinite(image.detach()).all():
            return self._skip(terms, "render")
        size = int(self.prior.image_size)
        if image.shape[-1] != size or image.shape[-2] != size:
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        x0 = self.prior.encode_images(image, generator=g)
        cond = self.prompts.conditioning(cams.elevation_deg.detach().cpu(), cams.azimuth_deg.detach().cpu(),
                                         cams.c2w_flat())
        result = score_distillation(x0, self.prior, self.score, cond, cfg.distill, step=step, generator=g)
        loss = result.loss
        terms["loss_distill"] = float(result.loss.detach())
        if result.lora_loss is not None:
            terms["loss_lora"] = float(result.lora_loss)
        for k, v in result.terms.items():
            terms[f"distill_{k}"] = float(v)
        lam = scheduled_value(cfg.lambda_image, step)
        if lam > 0:  # HiFA: the same estimate, distilled in image space too
            image_loss, _ = image_space_loss(image, result, self.prior.decode_latents, self.prior.alphas_cumprod,
                                             cfg.distill.weighting)
            loss = loss + lam * image_loss
            terms["loss_image"] = float(image_loss.detach())
        for name, (lam, value) in self.regularizers(out, step).items():
            loss = loss + lam * value
            terms[f"loss_{name}"] = float(value.detach())
        terms["loss"] = float(loss.detach())
        if not math.isfinite(terms["loss"]):
            return self._skip(terms, "loss")
        loss.backward()
        bad = any(p.grad is not None and not torch.isfinite(p.grad).all()
                  for grp in self.optimizer.param_groups for p in grp["params"])
        if bad:
            return self._skip(terms, "grad")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.grid is not None:
            terms["grid_updated"] = float(self.grid.maybe_update(step, self.field, generator=g))
            terms["grid_occupancy"] = self.grid.occupancy_fraction
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
        """An orbit-camera render [H, W, 3] in [0, 1] (evaluation mode: no jitter, no background augmentation and
        no random draw, so the training trajectory is unchanged)."""
        cfg = self.config
        step = self.global_step if step is None else step
        view = (step // max(cfg.preview_every, 1)) % cfg.preview_views
        azimuth = -180.0 + 360.0 * view / cfg.preview_views  # view k of orbit_cameras(preview_views)
        cam = orbit_cameras(1, cfg.preview_elevation, cfg.preview_distance, cfg.preview_fovy,
                            cfg.preview_resolution, cfg.preview_resolution, start_azimuth_deg=azimuth,
                            device=self.device)
        was = [m.training for m in (self.field, self.background, self.renderer) if m is not None]
        self._train_mode(False)
        try:
            out = self.render_image(cam, cfg.preview_resolution, generator=None, stratified=False)
        finally:
            for m, t in zip([m for m in (self.field, self.background, self.renderer) if m is not None], was):
                m.train(t)
        return out["rgb"][0].detach().float().clamp(0, 1).cpu()

    # ----------------------------------------------------------------------------------------------------- run
    def run(self, callback: Optional[Callable] = None, should_stop: Optional[Callable[[], bool]] = None,
            checkpoint_path: Union[str, os.PathLike, None] = None) -> int:
        """Step until ``config.steps``; ``callback(step, terms, preview_or_None)`` after every step (``step`` =
        steps done); ``should_stop()`` is checked before every step: when true, a checkpoint is written (if a path
        is known) and run returns.  Checkpoints every ``checkpoint_every`` steps and at the end.  Returns the number
        of steps done."""
        cfg = self.config
        path = checkpoint_path if checkpoint_path is not None else cfg.checkpoint_path
        while self.global_step < cfg.steps:
            if should_stop is not None and should_stop():
                break
            terms = self.step()
            done = self.global_step
            preview = None
            if cfg.preview_every and done % cfg.preview_every == 0:
                preview = self.preview(done)
            if callback is not None:
                callback(done, terms, preview)
            if path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                self.save_checkpoint(path)
        if path is not None:
            self.save_checkpoint(path)
        return self.global_step

    # ----------------------------------------------------------------------------------------------- checkpoint
    def _group_names(self) -> list[str]:
        return [grp.get("name", f"group{i}") for i, grp in enumerate(self.optimizer.param_groups)]

    @staticmethod
    def _flatten_optim(optimizer: torch.optim.Optimizer, prefix: str, group_names: Optional[list[str]]) -> dict:
        sd = optimizer.state_dict()
        out = {}
        for gi, grp in enumerate(sd["param_groups"]):
            for pos, idx in enumerate(grp["params"]):
                for k, v in sd["state"].get(idx, {}).items():
                    t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
                    name = f"{prefix}.{group_names[gi]}.{pos}.{k}" if group_names else f"{prefix}.{gi}.{pos}.{k}"
                    out[name] = t.detach().clone().contiguous()
        return out

    @staticmethod
    def _unflatten_optim(optimizer: torch.optim.Optimizer, prefix: str, group_names: Optional[list[str]],
                         tensors: dict) -> None:
        sd = optimizer.state_dict()
        params = [p for grp in optimizer.param_groups for p in grp["params"]]
        state, used = {}, set()
        for gi, grp in enumerate(sd["param_groups"]):
            for pos, idx in enumerate(grp["params"]):
                head = f"{prefix}.{group_names[gi]}.{pos}." if group_names else f"{prefix}.{gi}.{pos}."
                entry = {}
                for k in [k for k in tensors if k.startswith(head)]:
                    name = k[len(head):]
                    v = tensors[k]
                    if name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and v.shape != params[idx].shape:
                        raise ValueError(f"checkpoint does not match this configuration: optimizer state {k} has "
                                         f"shape {tuple(v.shape)}, the parameter {tuple(params[idx].shape)}")
                    entry[name] = v
                    used.add(k)
                if entry:
                    state[idx] = entry
        extra = sorted(k for k in tensors if k.startswith(prefix + ".") and k not in used)
        if extra:
            raise ValueError(f"checkpoint does not match this configuration: optimizer state for unknown parameters "
                             f"({', '.join(extra[:5])}{', …' if len(extra) > 5 else ''})")
        sd["state"] = state
        optimizer.load_state_dict(sd)

    def _modules(self) -> dict:
        mods = {"field": self.field}
        if self.background is not None:
            mods["background"] = self.background
        if self.grid is not None:
            mods["grid"] = self.grid
        return mods

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for prefix, module in self._modules().items():
            for k, v in module.state_dict().items():
                tensors[f"{prefix}.{k}"] = v.detach().clone().contiguous().cpu()
        if self.score is not None:
            for k, v in self.score.trainable_state_dict().items():
                tensors[f"score.{k}"] = v.detach().clone().contiguous().cpu()
            tensors.update(self._flatten_optim(self.score.optimizer, "score_optim", None))
        tensors.update(self._flatten_optim(self.optimizer, "optim", self._group_names()))
        return {k: v.cpu() for k, v in tensors.items()}

    def state_metadata(self) -> dict:
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "config": self.config.to_json(),
            "rng": {"loop": _gen_state(self.generator), "torch_cpu": [int(x) for x in torch.get_rng_state().tolist()]},
        }
        if self.score is not None and getattr(self.score, "generator", None) is not None:
            meta["rng"]["score"] = _gen_state(self.score.generator)
        return meta

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``path`` (safetensors) and ``path + '.json'`` atomically; returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = self.state_tensors()
        meta = self.state_metadata()
        text = json.dumps(meta)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_META_KEY: text}))
        sidecar = path.with_name(path.name + ".json")
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
        return path

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> dict:
        """Restore everything from ``path``; ValueError if unreadable or not matching this configuration.  Returns
        the metadata."""
        from safetensors import safe_open

        path = Path(path)
        try:
            tensors = {}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
            meta = json.loads(metadata[_META_KEY])
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"cannot read checkpoint {path}: not a valid stage-1 checkpoint ({e})") from e
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint {path} has format {meta.get('format')!r}; expected {CHECKPOINT_FORMAT!r}")
        changed = config_changes(meta.get("config", {}), self.config.to_json())
        if changed:
            shown = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in changed[:6])
            raise ValueError(f"checkpoint {path} was made with other settings ({shown}"
                             f"{'; …' if len(changed) > 6 else ''}): resume with the same settings (only the step "
                             f"count, checkpoint and preview settings may change) or start a new run")

        # validate every module's keys and shapes before touching anything
        expected = {}
        for prefix, module in self._modules().items():
            for k, v in module.state_dict().items():
                expected[f"{prefix}.{k}"] = v
        if self.score is not None:
            for k, v in self.score.trainable_state_dict().items():
                expected[f"score.{k}"] = v
        got = {k: v for k, v in tensors.items() if not k.startswith(("optim.", "score_optim."))}
        check_checkpoint_keys(path, expected, got)
        if self.score is None and any(k.startswith("score_optim.") for k in tensors):
            raise ValueError(f"checkpoint {path} does not match this configuration (it has a LoRA score, this run "
                             f"has none)")

        restore_training_state(self, tensors, meta)
        return meta
