"""Rendering a triangle mesh for a batch of cameras: the renderer of the geometry and texture stages (threestudio's
``nvdiff-rasterizer``), built on :mod:`l2vsd_core.mesh.rasterize` (torch backend on CPU, nvdiffrast on CUDA).

Recipe, per batch of cameras at ``H x W``:

1. world vertices -> clip space with :meth:`CameraBatch.mvp` (``flip_y=True``), -> ``rasterize``;
2. ``opacity`` = ``antialias(mask)``;
3. ``normal`` = interpolated area-weighted vertex normals, renormalised (world space, 0 on the background);
   ``comp_normal`` = ``antialias(lerp(normal_background, (normal + 1) / 2, mask))``, the normal map in [0, 1] that the
   geometry stage feeds the guidance.  threestudio blends over 0 (black), so ``normal_background`` defaults to 0;
4. ``position`` = interpolated surface points; with an ``rgb_fn(points, view_dirs)``, the covered pixels are coloured
   by it and composited over ``background`` (evaluated on the pixels' ray directions), then antialiased -> ``rgb``.

Conventions (the ones of :class:`~l2vsd_core.scene.renderer.VolumeRenderer`, so a mesh and a NeRF line up pixel for
pixel):

* every output is channels-last ``[B, H, W, C]`` with **row 0 the top** of the image.  The rasterizer's row 0 is
  the bottom (OpenGL), but the y-flipped projection (threestudio's choice) turns the image upside down in NDC, so no
  flip of the result is needed: pixel ``(row j, column i)`` is the point seen along :meth:`CameraBatch.rays`'s ray
  ``((i + 0.5 - W/2) / f, -(j + 0.5 - H/2) / f, -1)``;
* the background sees the same unit ray directions as the volume renderer's (threestudio's rasterizer passes the
  direction towards the interpolated surface point, which is the camera-to-origin direction on the background:
  one constant colour there);
* ``view_dirs`` given to ``rgb_fn`` are unit vectors from the camera to the surface point.

Gradients reach the vertex positions through ``interpolate`` (barycentrics and vertex normals) and through
``antialias`` (silhouettes), and the colour function's parameters through its output.  Coverage itself is piecewise
constant.  The renderer has no randomness of its own (the background may: it gets ``generator``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..scene.cameras import CameraBatch
from ..scene.renderer import VolumeRenderer
from .dmtet import TriangleMesh, vertex_normals
from .rasterize import antialias, edge_topology, interpolate, rasterize

__all__ = ["MeshRenderer", "BoundMeshRenderer", "clip_positions"]

ColorFn = Callable[[torch.Tensor, torch.Tensor], Union[torch.Tensor, dict]]


def clip_positions(vertices: torch.Tensor, cameras: CameraBatch, height: int, width: int, near: float = 0.01,
                   far: float = 100.0) -> torch.Tensor:
    """``[B, V, 4]`` clip-space positions of world ``vertices [V, 3]`` for ``cameras`` rendered at ``height x width``
    (aspect from the render size; y-flipped projection, so image row 0 is the top)."""
    at_size = dataclasses.replace(cameras, width=int(width), height=int(height))
    mvp = at_size.mvp(near, far, flip_y=True).to(vertices.dtype)
    homogeneous = torch.cat([vertices, torch.ones_like(vertices[:, :1])], -1)
    return torch.einsum("bij,vj->bvi", mvp, homogeneous)


def _colour(rgb_fn: ColorFn, points: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    out = rgb_fn(points, dirs)
    if isinstance(out, dict):  # a field (ImplicitVolume, TextureField) passed as the colour function
        out = out["rgb"]
    if not isinstance(out, torch.Tensor) or out.shape != points.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"rgb_fn must return colours [N, 3] for N = {points.shape[0]} points; got {shape}")
    return out


class MeshRenderer(nn.Module):
    """Rasterize a :class:`~l2vsd_core.mesh.dmtet.TriangleMesh` for a :class:`CameraBatch` (module docstring).

    ``normal_background``: the colour of ``comp_normal`` off the mesh (threestudio: 0).  ``near``/``far``: the
    clip planes of the projection.  ``backend``: the rasterizer's (``"auto"`` | ``"torch"`` | ``"nvdiffrast"``).
    """

    def __init__(self, normal_background: float = 0.0, near: float = 0.01, far: float = 100.0,
                 backend: str = "auto"):
        super().__init__()
        if not (isinstance(near, (int, float)) and isinstance(far, (int, float)) and 0 < near < far):
            raise ValueError(f"near and far must satisfy 0 < near < far; got near={near!r}, far={far!r}")
        self.normal_background = float(normal_background)
        self.near, self.far, self.backend = float(near), float(far), backend

    def render(self, mesh: TriangleMesh, cameras: CameraBatch, height: Optional[int] = None,
               width: Optional[int] = None, rgb_fn: Optional[ColorFn] = None, background=None,
               generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Render ``mesh`` for ``cameras`` at ``height x width`` (default: the cameras' size).

        Returns ``opacity`` ``[B, H, W, 1]`` (antialiased coverage), ``mask`` ``[B, H, W, 1]`` (bool, hard coverage),
        ``normal`` and ``position`` ``[B, H, W, 3]`` (0 off the mesh), ``comp_normal`` ``[B, H, W, 3]``; with
        ``rgb_fn`` also ``rgb`` (over ``background``, antialiased), ``rgb_fg`` (0 off the mesh) and
        ``background`` ``[B, H, W, 3]``.  ``background``: as :meth:`VolumeRenderer.render` (None = black, a colour,
        or a callable on unit directions, given ``generator`` when it takes one).
        """
        vertices, faces = mesh
        height = cameras.height if height is None else int(height)
        width = cameras.width if width is None else int(width)
        cameras = cameras.to(device=vertices.device, dtype=vertices.dtype)
        pos_clip = clip_positions(vertices, cameras, height, width, self.near, self.far)
        rast, _ = rasterize(pos_clip, faces, (height, width), backend=self.backend)
        topology = edge_topology(faces)
        mask = rast[..., 3:] > 0
        maskf = mask.to(vertices.dtype)

        def smooth(image: torch.Tensor) -> torch.Tensor:
            return antialias(image, rast, pos_clip, faces, topology=topology, backend=self.backend)

        normals = vertex_normals(vertices, faces)
        normal = F.normalize(interpolate(normals, rast, faces, backend=self.backend)[0], dim=-1)
        position = interpolate(vertices, rast, faces, backend=self.backend)[0]
        out = {
            "opacity": smooth(maskf),
            "mask": mask,
            "normal": normal,
            "comp_normal": smooth(torch.lerp(torch.full_like(normal, self.normal_background), (normal + 1) / 2,
                                             maskf)),
            "position": position,
        }
        if rgb_fn is None:
            return out

        origins, rays_d = cameras.rays(height, width)
        bg = VolumeRenderer._background_all(background, rays_d, generator).to(vertices.dtype)
        covered = mask[..., 0]
        points = position[covered]
        rgb_fg = torch.zeros_like(position)
        if points.shape[0] > 0:  # like the volume renderer, never call the colour function on 0 points
            dirs = F.normalize(points - origins[covered], dim=-1)
            rgb_fg = rgb_fg.index_put((covered,), _colour(rgb_fn, points, dirs).to(rgb_fg.dtype))
        out.update(rgb=smooth(torch.lerp(bg, rgb_fg, maskf)), rgb_fg=rgb_fg, background=bg)
        return out

    def forward(self, mesh: TriangleMesh, cameras: CameraBatch, height: Optional[int] = None,
                width: Optional[int] = None, rgb_fn: Optional[ColorFn] = None, background=None,
                generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        return self.render(mesh, cameras, height, width, rgb_fn, background, generator)

    def bind(self, mesh: TriangleMesh) -> "BoundMeshRenderer":
        """This renderer with ``mesh`` fixed, drawable by code written for the volume renderer (turntables)."""
        return BoundMeshRenderer(self, mesh)


class BoundMeshRenderer:
    """A mesh and a :class:`MeshRenderer` behind the volume renderer's ``render_camera(cameras, field, background,
    height, width, generator, stratified)``: the ``field`` is the colour function (anything ``rgb_fn`` accepts), so
    :func:`l2vsd_core.export.turntable_gif` can draw a textured mesh."""

    def __init__(self, renderer: MeshRenderer, mesh: TriangleMesh):
        self.renderer, self.mesh = renderer, mesh

    def render_camera(self, cameras: CameraBatch, field: ColorFn, background=None, height: Optional[int] = None,
                      width: Optional[int] = None, generator: Optional[torch.Generator] = None,
                      stratified: Optional[bool] = None) -> dict[str, torch.Tensor]:
        del stratified  # rasterization has no samples to jitter
        return self.renderer.render(self.mesh, cameras, height, width, rgb_fn=field, background=background,
                                    generator=generator)
