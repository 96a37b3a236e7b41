"""Stage 3, ProlificDreamer's texture refinement (threestudio ``prolificdreamer-texture.yaml``).

Scene: a fixed :class:`~l2vsd_core.mesh.dmtet.TriangleMesh` (the geometry stage's final mesh), a fresh colour field
(:class:`~l2vsd_core.scene.field.TextureField`) and a background.  One step of
:class:`~l2vsd_core.stages.base.Stage`: random cameras → rasterize → colour field at the surface points over the
background → score distillation (VSD, CFG 7.5, the stage-1 timestep range; any method, ESD λ included) → AdamW
(encoding 0.01, network 0.001, background 0.001).

Checkpoint tensors: ``field.*``, ``background.*``, ``mesh.vertices``, ``mesh.faces``, ``optim.<group>.<i>.<state>``,
``score.*`` / ``score_optim.*``; metadata key ``"l2vsd_texture"``.  A checkpoint refuses to load onto another mesh.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import TextureConfig
from ..mesh.dmtet import TriangleMesh
from ..mesh.mesh_renderer import MeshRenderer
from .base import Stage, colour_optimizer, field_modules

__all__ = ["TextureStage", "TEXTURE_FORMAT"]

TEXTURE_FORMAT = "l2vsd_texture/1"


class TextureStage(Stage):
    """Stage 3: the colour ``field`` and ``background`` (or None for black) on the fixed ``mesh``; ``score``: the
    LoRA for the VSD-family methods (the default, ``vsd``), None for ``sds``."""

    FORMAT = TEXTURE_FORMAT
    STAGE = "texture"
    CONFIG = TextureConfig
    RENDERER = MeshRenderer

    def __init__(self, prior, score, prompt_processor, mesh: TriangleMesh, field: nn.Module,
                 background: Optional[nn.Module], config: Optional[TextureConfig] = None,
                 renderer: Optional[MeshRenderer] = None):
        config = TextureConfig() if config is None else config
        vertices, faces = mesh
        if faces.dim() != 2 or faces.shape[-1] != 3 or faces.shape[0] == 0:
            raise ValueError(f"the texture stage needs a mesh with faces; got faces of shape {tuple(faces.shape)}")
        if not hasattr(field, "parameter_groups"):
            raise ValueError(f"field must be a colour field with parameter_groups() (e.g. TextureField); got "
                             f"{type(field).__name__}")
        first = next(field.parameters())
        super().__init__(prior, score, prompt_processor, config, MeshRenderer() if renderer is None else renderer,
                         first.device)
        # the geometry is fixed: plain detached tensors, never optimised
        self.mesh = TriangleMesh(vertices.detach().to(device=first.device, dtype=first.dtype).clone(),
                                 faces.detach().to(device=first.device, dtype=torch.long).clone())
        self.field, self.background = field, background
        self.optimizer = colour_optimizer(field, background, config)

    def modules(self) -> dict[str, nn.Module]:
        return field_modules(self.field, self.background)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"mesh.vertices": self.mesh.vertices, "mesh.faces": self.mesh.faces}

    def check_extra_tensors(self, tensors: dict, path: Path) -> None:
        saved = [tensors.get("mesh.vertices"), tensors.get("mesh.faces")]
        if any(t is None for t in saved):
            return  # reported with the other missing tensors
        if not all(a.shape == b.shape and torch.equal(a, b.cpu()) for a, b in zip(saved, self.mesh)):
            raise ValueError(f"checkpoint {path} was made on another mesh: a texture belongs to the mesh it was "
                             f"trained on — start the texture stage anew, or resume with that mesh")

    def render_image(self, cameras, resolution: int, generator=None) -> dict[str, torch.Tensor]:
        return self.renderer.render(self.mesh, cameras, resolution, resolution, rgb_fn=self.field,
                                    background=self.background, generator=generator)

    def render_for_training(self, cameras, size: int, terms: dict) -> dict:
        out = self.render_image(cameras, size, generator=self.generator)
        return {**out, "image": out["rgb"].permute(0, 3, 1, 2)}

    def render_preview(self, cameras) -> torch.Tensor:
        return self.render_image(cameras, cameras.height)["rgb"]
