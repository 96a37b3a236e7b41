"""Stage 2, ProlificDreamer's geometry refinement (threestudio ``prolificdreamer-geometry.yaml``).

Scene: a :class:`~l2vsd_core.mesh.dmtet.DMTet` (per-vertex SDF + deformation) initialised from the stage-1 density
(:func:`~l2vsd_core.mesh.dmtet.dmtet_from_density`).  One step of :class:`~l2vsd_core.stages.base.Stage`: random
cameras → marching tets → rasterize (:class:`~l2vsd_core.mesh.mesh_renderer.MeshRenderer`) → ``comp_normal`` (the
normal map in [0, 1]) → score distillation (SDS, CFG 100, w = 1 − ᾱ_t; or any VSD-family method) + 10000 ·
threestudio's normal consistency + 10000 · its Laplacian → Adam (lr 0.005) on the SDF and the deformation.

Checkpoint tensors: ``dmtet.sdf``, ``dmtet.deformation``, ``dmtet.bbox``, ``optim.geometry.<i>.<state>``, and
``score.*`` / ``score_optim.*`` with a LoRA; metadata key ``"l2vsd_geometry"``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import GeometryConfig
from ..mesh.dmtet import DMTet, TriangleMesh, dmtet_from_density
from ..mesh.mesh_renderer import MeshRenderer
from ..mesh.regularizers import graph_laplacian_norm, vertex_normal_consistency
from ..schedules import scheduled_value
from .base import Stage

__all__ = ["GeometryStage", "GEOMETRY_FORMAT"]

GEOMETRY_FORMAT = "l2vsd_geometry/1"


class GeometryStage(Stage):
    """Stage 2 over ``dmtet`` (build it with :meth:`from_stage1`), distilled on normal maps; ``score``: a LoRA for
    the VSD-family methods, else None."""

    FORMAT = GEOMETRY_FORMAT
    STAGE = "geometry"
    CONFIG = GeometryConfig
    RENDERER = MeshRenderer

    def __init__(self, prior, score, prompt_processor, dmtet: DMTet, config: Optional[GeometryConfig] = None,
                 renderer: Optional[MeshRenderer] = None):
        config = GeometryConfig() if config is None else config
        if not isinstance(dmtet, DMTet):
            raise ValueError(f"dmtet must be a DMTet; got {type(dmtet).__name__}")
        if renderer is None and isinstance(config, GeometryConfig):
            renderer = MeshRenderer(normal_background=config.normal_background)
        super().__init__(prior, score, prompt_processor, config, renderer, dmtet.sdf.device)
        self.dmtet = dmtet
        params = [dmtet.sdf] + ([dmtet.deformation] if dmtet.deformable else [])
        self.optimizer = torch.optim.Adam([{"params": params, "lr": config.lr, "name": "geometry"}],
                                          betas=tuple(config.betas), eps=config.eps)

    @classmethod
    def from_stage1(cls, prior, score, prompt_processor, field, config: Optional[GeometryConfig] = None,
                    renderer: Optional[MeshRenderer] = None) -> "GeometryStage":
        """Initialised from a stage-1 field (anything with ``density(points)`` and ``radius``) with the config's
        grid, threshold and box settings, on the field's device."""
        config = GeometryConfig() if config is None else config
        try:
            device = next(field.parameters()).device
        except (AttributeError, StopIteration):
            device = torch.device("cpu")
        dmtet = dmtet_from_density(field.density, float(getattr(field, "radius", 1.0)), config.dmtet_resolution,
                                   config.isosurface_threshold, config.bbox_resolution, config.bbox_margin,
                                   config.deformation_scale, device=device)
        return cls(prior, score, prompt_processor, dmtet, config, renderer)

    def modules(self) -> dict[str, nn.Module]:
        return {"dmtet": self.dmtet}

    def extra_metadata(self) -> dict:
        return {"isosurface_threshold": self.dmtet.isosurface_threshold}

    def load_extra_metadata(self, meta: dict) -> None:
        self.dmtet.isosurface_threshold = meta.get("isosurface_threshold", self.dmtet.isosurface_threshold)

    def render_for_training(self, cameras, size: int, terms: dict):
        mesh = self.dmtet()
        terms["mesh_vertices"], terms["mesh_faces"] = float(mesh.vertices.shape[0]), float(mesh.faces.shape[0])
        if mesh.faces.shape[0] == 0:  # the SDF has no sign change left: nothing to render or regularise
            return "empty_mesh"
        out = self.renderer.render(mesh, cameras, size, size)
        return {"image": out["comp_normal"].permute(0, 3, 1, 2), "mesh": mesh}

    def regularizers(self, rendered: dict, step: int) -> dict[str, tuple[float, torch.Tensor]]:
        """threestudio's mesh terms at their scale: ``normal_consistency`` (vertex normals along edges) and
        ``laplacian_smoothness`` (mean ‖(D − A) v‖)."""
        cfg, terms, mesh = self.config, {}, rendered["mesh"]
        lam = scheduled_value(cfg.lambda_normal_consistency, step)
        if lam > 0:
            terms["normal_consistency"] = (lam, vertex_normal_consistency(*mesh))
        lam = scheduled_value(cfg.lambda_laplacian_smoothness, step)
        if lam > 0:
            terms["laplacian_smoothness"] = (lam, graph_laplacian_norm(*mesh))
        return terms

    def render_preview(self, cameras) -> torch.Tensor:
        mesh = self.dmtet()
        if mesh.faces.shape[0] == 0:
            return torch.full((1, cameras.height, cameras.width, 3), self.config.normal_background)
        return self.renderer.render(mesh, cameras)["comp_normal"]

    @torch.no_grad()
    def final_mesh(self, remove_outliers: bool = True) -> TriangleMesh:
        """The current surface, detached; ``remove_outliers``: drop the components with under 1 % of the largest
        one's faces (threestudio's ``isosurface_remove_outliers``).  ``ValueError`` when the surface is empty."""
        mesh = self.dmtet()
        if mesh.faces.shape[0] == 0:
            raise ValueError("the refined surface is empty (the SDF has no sign change): lower the geometry "
                             "stage's learning rate or regularizer weights, or restart it from stage 1")
        if remove_outliers:
            from ..export import remove_floaters

            kept = remove_floaters(mesh.to_trimesh())
            mesh = TriangleMesh(torch.as_tensor(kept.vertices, dtype=mesh.vertices.dtype, device=self.device),
                                torch.as_tensor(kept.faces, dtype=torch.long, device=self.device))
        return TriangleMesh(mesh.vertices.detach().clone(), mesh.faces.detach().clone())
