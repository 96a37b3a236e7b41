"""Stage 1, ProlificDreamer's "coarse" NeRF stage: a hash-grid field and background, volume-rendered and distilled.

The step is :class:`~l2vsd_core.stages.base.Stage`'s; this stage renders with the
:class:`~l2vsd_core.scene.renderer.VolumeRenderer` (stratified, background with random solid-colour augmentation),
adds threestudio's regularizers — λ_sparsity·mean(√(opacity² + 0.01)) + λ_opaque·BCE(opacity, opacity) (clamped to
[1e-3, 1 − 1e-3]) + λ_z_variance·mean(z_variance[opacity > 0.5]) + λ_orient·Σ sg(w)·max(0, n·d)² / #(opacity > 0)
(needs field normals; ProlificDreamer has them off) — takes one AdamW step (encoding 0.01, networks 0.001,
background 0.001) and updates the occupancy grid.

Checkpoint tensors: ``field.*``, ``background.*``, ``grid.*``, ``score.*``, ``optim.<group>.<i>.<state>``,
``score_optim.<i>.<state>``; metadata key ``"l2vsd_stage1"``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NerfConfig
from ..schedules import scheduled_value
from ..scene.renderer import OccupancyGrid, VolumeRenderer
from .base import Stage, colour_optimizer, field_modules

__all__ = ["NerfStage", "make_volume_renderer", "NERF_FORMAT"]

NERF_FORMAT = "l2vsd_stage1/1"


def make_volume_renderer(config: NerfConfig) -> VolumeRenderer:
    """The stage's :class:`VolumeRenderer` with its :class:`OccupancyGrid`."""
    grid = OccupancyGrid(radius=config.radius, resolution=config.grid_resolution, decay=config.grid_decay,
                         threshold=config.grid_threshold, update_every_n_steps=config.grid_update_every)
    return VolumeRenderer(radius=config.radius, num_samples_per_ray=config.num_samples_per_ray, occupancy_grid=grid)


class NerfStage(Stage):
    """Stage 1 over ``field`` (``ImplicitVolume``), ``background`` (or None) and the LoRA ``score`` (None for
    ``sds``), rendered by ``renderer`` (e.g. :func:`make_volume_renderer`)."""

    FORMAT = NERF_FORMAT
    STAGE = "NeRF"
    CONFIG = NerfConfig
    RENDERER = VolumeRenderer

    def __init__(self, prior, score, prompt_processor, field: nn.Module, background: Optional[nn.Module],
                 renderer: VolumeRenderer, config: NerfConfig):
        try:
            device = next(field.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        super().__init__(prior, score, prompt_processor, config, renderer, device)
        self.field, self.background = field, background
        self.grid: Optional[OccupancyGrid] = renderer.occupancy_grid
        self.optimizer = colour_optimizer(field, background, config)

    def modules(self) -> dict[str, nn.Module]:
        return {**field_modules(self.field, self.background), **({"grid": self.grid} if self.grid is not None else {})}

    def mode_modules(self) -> list[nn.Module]:
        return [m for m in (self.field, self.background, self.renderer) if m is not None]

    def render_image(self, cameras, resolution: int, generator=None, stratified=None) -> dict:
        return self.renderer.render_camera(cameras, self.field, self.background, height=resolution, width=resolution,
                                           generator=generator, stratified=stratified)

    def render_for_training(self, cameras, size: int, terms: dict) -> dict:
        out = self.render_image(cameras, size, generator=self.generator)
        return {**out, "image": out["rgb"].permute(0, 3, 1, 2)}

    def regularizers(self, out: dict, step: int) -> dict[str, tuple[float, torch.Tensor]]:
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
            zv = out["z_variance"][opacity > 0.5]
            terms["z_variance"] = (lam, zv.mean() if zv.numel() else opacity.sum() * 0)
        lam = scheduled_value(cfg.lambda_orient, step)
        if lam > 0:
            if "orient" not in out:
                raise ValueError("lambda_orient > 0 needs normals from the field: build it with normal_type "
                                 "'finite_difference' or 'analytic' (generate --normal-type)")
            terms["orient"] = (lam, out["orient"].sum() / (opacity > 0).sum().clamp_min(1))
        return terms

    def after_update(self, step: int, terms: dict) -> None:
        if self.grid is not None:
            terms["grid_updated"] = float(self.grid.maybe_update(step, self.field, generator=self.generator))
            terms["grid_occupancy"] = self.grid.occupancy_fraction

    def render_preview(self, cameras) -> torch.Tensor:
        return self.render_image(cameras, cameras.height, generator=None, stratified=False)["rgb"]
