"""Mesh export of a trained radiance field: isosurface, floater removal, texture baking, GLB/OBJ/PLY, turntable GIF.

Pipeline (threestudio's ``--export`` path, re-implemented on CPU-friendly libraries):

1. :func:`extract_mesh` turns the field's density into the surface its volume renders show.

   *Grids.*  It samples ``field.density`` (no grad, in chunks) on a regular ``resolution``³ grid over the field's box
   ``[-radius, radius]^3`` (what the renderer sees), then again on a grid fitted to the object (the box around the
   level set the first grid shows, plus :data:`FIT_MARGIN_CELLS` cells; ``resolution`` points along its longest
   side), so the object spans the whole grid instead of the third of the box it usually fills.

   *Level.*  ``threshold="auto"`` is the **render-matched** level (:func:`render_matched_level`): the density at
   which the mesh's silhouettes best match the volume renders'.  Parallel rays from :data:`CALIBRATION_VIEWS`
   directions, about one per cell, cross the fitted grid; a ray is *seen* where its opacity ``1 − exp(−∫σ dt)`` is
   above 0.5 (the optical depth integrated over the whole box, on the fitted grid where it reaches: a density step
   is only as sharp as the cells), and crosses the mesh at level τ where the meshed density along it exceeds τ;
   τ maximizes the IoU of the two ray sets (a sort and a cumulative sum).  That level follows the field's own
   scale (a toy field's density tops at ~20, an SD-sized run's at hundreds) and puts the surface where rays turn
   opaque, not in the fuzz around it.  threestudio's ``ImplicitVolume`` rule, the mean of the densities above
   ``1e-5``, is ``threshold="mean"`` (:func:`auto_threshold`; what ``"auto"`` meant before, and still what the
   DMTet's initial surface uses): on a softplus density with the blob bias the whole box is above 1e-5, that mean
   lands in the faint fuzz around the object, and the surface bulges and grows spikes and floaters where the
   renders show nothing (the toy demo's red cube: level 0.51 where the renders turn opaque at ≈4.5).  A float
   threshold is used as given.

   *Cleaning.*  The density is **carved** to the visual hull of the renders: a grid point is kept only where every
   calibration ray through it is more than 0.5 opaque (widened by a ray's width, so the surface at the
   silhouettes' edge is not cut); a needle, sheet or speck that no ray sees as opaque (thin: its optical depth
   across is small) goes, whatever its density, while a thin part the renders do show (a leg, a cone's tip)
   stays.  Then a Gaussian blur of :data:`SMOOTH_CELLS` cell (:func:`clean_density`) smooths the hash grid's
   cell-scale lumps (``opening`` adds a grey opening, off by default).  Marching cubes comes from PyMCubes
   (``import mcubes``) when installed, else scikit-image.  Floaters are removed by :func:`remove_floaters`:
   threestudio's ``remove_outlier`` rule (keep the connected components with at least 1 % of the largest one's
   faces) and 1 % of its volume (a thin sheet has many faces and no volume).

   :func:`mesh_silhouettes` and :func:`opacity_iou` measure the result against the volume renders (``make demo``
   reports it as ``mesh_iou``: the red cube's GLB 0.75 before, 0.96 after).
2. :func:`bake_texture` unwraps the mesh with xatlas, rasterizes every UV triangle in texture space (pure numpy
   barycentric rasterization) to get one 3D point per covered texel, queries ``field(points, dirs)["rgb"]`` there,
   and dilates the colours into empty texels ``padding`` times so bilinear filtering / mip-mapping does not bleed
   the background across UV seams.
3. :func:`save_mesh` writes GLB, OBJ (+MTL+PNG) or PLY atomically (temporary name in the same folder, then
   ``os.replace``), so an interrupted export never leaves a half-written file behind.  GLB and OBJ are written in
   their usual axes, y up with the object's front facing +z (:data:`WORLD_TO_Y_UP`); PLY keeps the world's z up.
4. :func:`turntable_gif` renders an orbit with the volume renderer and writes an animated GIF, also atomically.

Axes: everything here but the files works in world coordinates (:mod:`l2vsd_core.scene.cameras`: right-handed, z
up, the object's front facing +x, the side the azimuth-0 "front view" camera sees).  glTF 2.0 is right-handed with
+y up and an asset's front facing +z, the convention OBJ files share (Blender's OBJ defaults: up +y, forward −z), so
:func:`save_mesh` turns GLB and OBJ vertices (and any normals written) by the proper rotation :data:`WORLD_TO_Y_UP`,
world (x, y, z) → file (y, z, x), when writing, and :func:`y_up_to_world` turns what is read back into the world
again.  The rotation has determinant +1: no mirror, so the faces' winding and the outward normals stay as they were.

Optional dependencies (not needed by the rest of ``l2vsd_core``): ``trimesh`` (+ Pillow), ``xatlas`` for
:func:`bake_texture`, and ``PyMCubes`` or ``scikit-image`` for :func:`extract_mesh`.
"""

from __future__ import annotations

import copy
import io
import math
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .files import atomic_write_bytes

__all__ = ["save_textured_mesh", "extract_mesh", "remove_floaters", "bake_texture", "save_mesh", "turntable_gif", "orbit_views", "auto_threshold",
           "render_matched_level", "clean_density", "mesh_silhouettes", "opacity_iou",
           "AUTO_THRESHOLD_EPS", "FLOATER_FRACTION", "OPACITY_LEVEL", "CALIBRATION_VIEWS", "OPENING_CELLS", "SMOOTH_CELLS",
           "WORLD_TO_Y_UP", "world_to_y_up", "y_up_to_world"]

AUTO_THRESHOLD_EPS = 1.0e-5  # threestudio: threshold = field[field > eps].mean() ("mean"; DMTet's "auto")
FLOATER_FRACTION = 0.01      # threestudio remove_outlier: drop components with < 1 % of the largest's faces
OPACITY_LEVEL = 0.5          # a volume-rendered ray is "seen" (in the silhouette) above this opacity
CALIBRATION_VIEWS = 9        # directions (over a hemisphere: a ray and its reverse see the same) of the level's rays
OPENING_CELLS = 0            # grey opening of the density over that many cells³ (0 = off: the hull carve does it)
SMOOTH_CELLS = 1.0           # Gaussian blur (standard deviation, in grid cells) of the density before marching cubes
FIT_MARGIN_CELLS = 3         # margin of the fitted grid's box around the object, in cells of the first grid

#: World axes (z up, front +x) → GLB/OBJ axes (y up, front +z): ``file = WORLD_TO_Y_UP @ world``, i.e.
#: (x, y, z) ↦ (y, z, x).  A cyclic permutation of the axes, so a proper rotation (det +1, no mirror): world up +z
#: goes to +y, the front +x to +z, and the front view's right-hand side (+y) to +x, where a glTF viewer's front
#: view (camera on +z looking along −z, +y up) shows it.
WORLD_TO_Y_UP = np.array([[0.0, 1.0, 0.0],
                          [0.0, 0.0, 1.0],
                          [1.0, 0.0, 0.0]])

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------- helpers
def _require_trimesh():
    try:
        import trimesh  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("mesh export needs the 'trimesh' package (pip install trimesh pillow)") from e
    return trimesh


def _marching_cubes(volume: np.ndarray, level: float):
    """(vertices in index coordinates [V, 3], faces [F, 3]) from PyMCubes, else scikit-image."""
    try:
        import mcubes
    except ImportError:
        mcubes = None
    if mcubes is not None:
        verts, faces = mcubes.marching_cubes(volume, float(level))
        return np.asarray(verts, dtype=np.float64), np.asarray(faces, dtype=np.int64)
    try:
        from skimage.measure import marching_cubes
    except ImportError as e:
        raise ImportError("extract_mesh needs a marching-cubes implementation: install 'PyMCubes' "
                          "(pip install pymcubes) or 'scikit-image' (pip install scikit-image)") from e
    verts, faces, _normals, _values = marching_cubes(volume, level=float(level))
    return np.asarray(verts, dtype=np.float64), np.asarray(faces, dtype=np.int64)


def _field_radius(field, radius: Optional[float]) -> float:
    if radius is None:
        radius = getattr(field, "radius", None)
    if radius is None:
        raise ValueError("the field has no 'radius' attribute; pass radius= (the half-size of its box)")
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite number > 0; got {radius!r}")
    return float(radius)


def _field_device_dtype(field):
    params = list(field.parameters()) if isinstance(field, torch.nn.Module) else []
    if params:
        return params[0].device, (params[0].dtype if params[0].is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


def auto_threshold(density: Union[np.ndarray, torch.Tensor], eps: float = AUTO_THRESHOLD_EPS) -> float:
    """threestudio's ``isosurface_threshold: auto``: the mean of the density values ``> eps``."""
    d = density.detach().cpu().numpy() if isinstance(density, torch.Tensor) else np.asarray(density)
    pos = d[np.isfinite(d) & (d > eps)]
    if pos.size == 0:
        raise ValueError("no surface: the density is <= 1e-05 everywhere on the grid, so the 'auto' threshold is "
                         "undefined (the field is empty; train longer or check the field)")
    return float(pos.mean())


def world_to_y_up(points) -> np.ndarray:
    """[..., 3] world points or directions in the GLB/OBJ axes (:data:`WORLD_TO_Y_UP`), float64."""
    return np.asarray(points, dtype=np.float64) @ WORLD_TO_Y_UP.T


def y_up_to_world(points) -> np.ndarray:
    """The inverse of :func:`world_to_y_up`: [..., 3] points or directions read from a GLB/OBJ this module wrote,
    back in world axes (z up, front +x), float64."""
    return np.asarray(points, dtype=np.float64) @ WORLD_TO_Y_UP


def _in_y_up(mesh):
    """A copy of the world-axes ``mesh`` turned into the GLB/OBJ axes: vertices and any cached (hence written)
    normals rotated by :data:`WORLD_TO_Y_UP`; faces, UVs, material, colours and metadata unchanged."""
    turned = mesh.copy(include_cache=True)  # the cache: normals trimesh would write get rotated, not dropped
    transform = np.eye(4)
    transform[:3, :3] = WORLD_TO_Y_UP
    turned.apply_transform(transform)  # a proper rotation: trimesh keeps the faces' order (no winding flip)
    return turned


def _check_parent(path: Path) -> None:
    """Refuse a path that has an existing non-directory among its ancestors (or is itself a directory)."""
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot write {str(path)!r}: its parent {str(parent)!r} is a file, not a folder")
            break
    if path.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: it is an existing folder")


# ----------------------------------------------------------------------------------------------- isosurface
class _Grid:
    """Density samples ``values[i, j, k]`` at the world points ``lo + cell * (i, j, k)`` (index order x, y, z; ``cell``
    per axis), with trilinear lookup (zero outside, as the renderer sees nothing outside its box)."""

    def __init__(self, values: np.ndarray, lo, cell):
        self.values = values
        self.lo = np.asarray(lo, dtype=np.float64)
        self.cell = np.broadcast_to(np.asarray(cell, dtype=np.float64), (3,)).copy()
        self._torch = None

    @property
    def hi(self) -> np.ndarray:
        return self.lo + (np.asarray(self.values.shape) - 1) * self.cell

    def sphere(self) -> tuple:
        """(centre [3], radius) of the ball around the grid's box."""
        return (self.lo + self.hi) / 2.0, float(np.linalg.norm(self.hi - self.lo) / 2.0)

    def _lookup(self, normalized: torch.Tensor) -> torch.Tensor:
        """Trilinear values at grid_sample coordinates [..., 3] ([−1, 1] across the grid; 0 outside)."""
        if self._torch is None:  # grid_sample's [N, C, D, H, W] reads x along W: the values transposed to z, y, x
            self._torch = torch.from_numpy(np.ascontiguousarray(self.values.transpose(2, 1, 0)))[None, None].float()
        out = torch.nn.functional.grid_sample(self._torch, normalized.reshape(1, -1, 1, 1, 3), mode="bilinear",
                                              padding_mode="zeros", align_corners=True)
        return out.reshape(normalized.shape[:-1])

    def _normalized_lines(self, origins: torch.Tensor, direction: np.ndarray, t: torch.Tensor) -> torch.Tensor:
        """[R, S, 3] float32 grid_sample coordinates of the points ``origins + t · direction`` (affine: the world →
        grid map is applied to the origins and the direction once, in float64)."""
        scale = 2.0 / np.maximum((np.asarray(self.values.shape) - 1) * self.cell, 1e-30)
        start = ((origins.double() - torch.as_tensor(self.lo)) * torch.as_tensor(scale) - 1.0).float()
        step = torch.as_tensor(np.asarray(direction, dtype=np.float64) * scale).float()
        return start[:, None, :] + t.float()[None, :, None] * step

    def sample_lines(self, origins: torch.Tensor, direction: np.ndarray, t: torch.Tensor) -> torch.Tensor:
        """[R, S] values at ``origins [R, 3] + t [S] · direction``."""
        return self._lookup(self._normalized_lines(origins, direction, t))


class _Layered:
    """The ``fine`` grid where it reaches, the ``coarse`` one elsewhere (its box and sphere), read along lines at
    the fine grid's cells: the optical depth of a sharp field is only right at the finer cells (trilinear
    interpolation spreads a density step over a cell, and a grazing ray reads the spread)."""

    def __init__(self, fine: _Grid, coarse: _Grid):
        self.fine, self.coarse = fine, coarse
        self.cell = np.minimum(fine.cell, coarse.cell)

    def sphere(self) -> tuple:
        return self.coarse.sphere()

    def sample_lines(self, origins: torch.Tensor, direction: np.ndarray, t: torch.Tensor) -> torch.Tensor:
        fine = self.fine._normalized_lines(origins, direction, t)
        inside = (fine.abs() <= 1.0).all(-1)
        coarse = self.coarse.sample_lines(origins, direction, t)
        return torch.where(inside, self.fine._lookup(fine), coarse)


@torch.no_grad()
def _density_grid(field, lo, cell, shape, chunk: int) -> _Grid:
    """``field.density`` on the grid ``lo + cell * (i, j, k)`` of ``shape`` points (no grad, ``chunk`` points per
    call); NaN and −inf read as 0, +inf as 3e38."""
    device, dtype = _field_device_dtype(field)
    cell = np.broadcast_to(np.asarray(cell, dtype=np.float64), (3,))
    axes = [torch.as_tensor(float(lo[a]) + cell[a] * np.arange(shape[a]), dtype=torch.float64) for a in range(3)]
    out = np.empty(tuple(shape), dtype=np.float32)
    flat = out.reshape(-1)
    per_slab = int(shape[1]) * int(shape[2])
    yz = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), -1).reshape(-1, 2)  # x is the slow axis
    slabs = max(1, chunk // per_slab)
    for i0 in range(0, int(shape[0]), slabs):
        xs = axes[0][i0:i0 + slabs]
        pts = torch.cat([xs.repeat_interleave(per_slab)[:, None], yz.repeat(len(xs), 1)], 1)
        vals = []
        for s in range(0, pts.shape[0], chunk):
            p = pts[s:s + chunk].to(device=device, dtype=dtype)
            vals.append(field.density(p).reshape(-1).float().cpu())
        flat[i0 * per_slab:i0 * per_slab + pts.shape[0]] = torch.cat(vals).numpy()
    out = np.nan_to_num(out, nan=0.0, posinf=np.float32(3.0e38), neginf=0.0)
    return _Grid(out, lo, cell)


def clean_density(volume: np.ndarray, opening: int = OPENING_CELLS, smooth: float = SMOOTH_CELLS) -> np.ndarray:
    """The density grid :func:`extract_mesh` meshes: a grey opening over ``opening``³ cells (a minimum then a maximum
    filter: a needle, sheet or speck thinner than ``opening`` cells loses its peak, anything wider keeps its values;
    0 or 1 = off, the default: it also blunts real tips, which the carve by the renders does not), then a Gaussian
    blur of standard deviation ``smooth`` cells (0 = off).  float32, same shape."""
    from scipy import ndimage

    if isinstance(opening, bool) or not isinstance(opening, int) or opening < 0:
        raise ValueError(f"opening must be an int >= 0 (cells); got {opening!r}")
    if isinstance(smooth, bool) or not isinstance(smooth, (int, float)) or not (math.isfinite(smooth) and smooth >= 0):
        raise ValueError(f"smooth must be a number >= 0 (cells); got {smooth!r}")
    out = np.asarray(volume, dtype=np.float32)
    if opening > 1:
        out = ndimage.grey_opening(out, size=(opening,) * 3, mode="nearest")
    if smooth > 0:
        out = ndimage.gaussian_filter(out, sigma=float(smooth), mode="nearest", truncate=3.0)
    return out.astype(np.float32, copy=False)


def _hemisphere(n: int) -> np.ndarray:
    """``n`` unit directions spread over the upper hemisphere (a Fibonacci spiral from the pole down)."""
    i = np.arange(n) + 0.5
    z = 1.0 - i / n
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    phi = math.pi * (3.0 - math.sqrt(5.0)) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], -1)


class _Views:
    """Parallel-ray images of the ball (``centre``, ``reach``) from ``count`` directions (:func:`_hemisphere`; a ray
    and its reverse see the same, so half the sphere is enough): ``pixels``² rays per direction, through the centres
    of the pixels of a square of side ``2 · reach`` across the direction."""

    def __init__(self, centre, reach: float, count: int, pixels: int):
        self.centre, self.reach, self.pixels = np.asarray(centre, dtype=np.float64), float(reach), int(pixels)
        self.directions = _hemisphere(count)
        helper = np.where(np.abs(self.directions[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
        self.u = np.cross(self.directions, helper)
        self.u /= np.linalg.norm(self.u, axis=1, keepdims=True)
        self.v = np.cross(self.directions, self.u)
        side = (torch.arange(self.pixels, dtype=torch.float64) + 0.5) / self.pixels * 2.0 * self.reach - self.reach
        a, b = torch.meshgrid(side, side, indexing="ij")  # image [i, j] at u·a_i + v·b_j
        self._ab = a.reshape(-1, 1), b.reshape(-1, 1)

    def origins(self, k: int) -> torch.Tensor:
        """[pixels², 3] points of direction ``k``'s rays, in the plane through the centre across it."""
        a, b = self._ab
        return torch.as_tensor(self.centre) + a * torch.as_tensor(self.u[k]) + b * torch.as_tensor(self.v[k])

    def along(self, grid: "_Grid", reduce: str) -> np.ndarray:
        """[count, pixels, pixels]: the max (``reduce="max"``) or the integral (``"sum"``: the optical depth) of
        ``grid`` along every ray, over the whole stretch that crosses the ball around ``grid``, at steps ≤ a cell."""
        g_centre, g_reach = grid.sphere()
        out = []
        for k, direction in enumerate(self.directions):
            origins = self.origins(k)
            mid = float(np.dot(g_centre - self.centre, direction))  # the grid's centre along the rays
            count = max(2, int(math.ceil(2.0 * g_reach / float(grid.cell.min()))))
            dt = 2.0 * g_reach / count
            t = mid - g_reach + dt * (torch.arange(count, dtype=torch.float64) + 0.5)
            rows = max(1, (1 << 21) // count)  # ≤ 2M samples at a time
            values = []
            for s in range(0, origins.shape[0], rows):
                samples = grid.sample_lines(origins[s:s + rows], direction, t)
                values.append(samples.max(1).values if reduce == "max" else samples.sum(1) * dt)
            out.append(torch.cat(values).double().numpy().reshape(self.pixels, self.pixels))
        return np.stack(out)

    def lookup(self, images: np.ndarray, points: np.ndarray) -> np.ndarray:
        """[count, N]: ``images`` [count, pixels, pixels] read (bilinear, 0 outside) where each direction's rays
        through ``points`` [N, 3] cross its image."""
        rel = torch.as_tensor(np.asarray(points, dtype=np.float64) - self.centre)
        out = []
        for k in range(len(self.directions)):
            a = rel @ torch.as_tensor(self.u[k]) / self.reach  # align_corners=False: pixel centres at (i + ½)/P·2 − 1
            b = rel @ torch.as_tensor(self.v[k]) / self.reach
            grid = torch.stack([b, a], -1).float().reshape(1, -1, 1, 2)  # x → W = j (along v), y → H = i (along u)
            image = torch.as_tensor(images[k], dtype=torch.float32)[None, None]
            out.append(torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="zeros",
                                                       align_corners=False).reshape(-1).double().numpy())
        return np.stack(out)


def _views_of(grid: "_Grid", count: int, pixels: Optional[int] = None) -> _Views:
    """:class:`_Views` of ``grid``'s ball, about a ray per cell across it (16² to 128² per direction)."""
    centre, reach = grid.sphere()
    if pixels is None:
        pixels = int(np.clip(math.ceil(2.0 * reach / float(grid.cell.min())), 16, 128))
    return _Views(centre, reach, count, pixels)


def _opacity_cut(opacity: float) -> float:
    """The optical depth at which a ray is ``opacity`` opaque: 1 − exp(−depth) = opacity."""
    return -math.log1p(-opacity)


def _match_level(peaks: np.ndarray, depths: np.ndarray, opacity: float) -> tuple:
    """(level, IoU): the cut of the rays' peak densities that best matches the rays more than ``opacity`` opaque."""
    peak = peaks.reshape(-1)
    depth = depths.reshape(-1)
    hit = depth > _opacity_cut(opacity)
    if not hit.any():
        if not depth.max() > 0:
            raise ValueError("no surface: the density is 0 along every ray (the field is empty; train longer or "
                             "check the field)")
        hit = depth >= -math.log1p(-0.5 * -math.expm1(-depth.max()))  # at least half as opaque as the most opaque
    order = np.argsort(-peak, kind="stable")
    ranked = peak[order]
    inter = np.cumsum(hit[order])
    iou = inter / (np.arange(1, len(ranked) + 1) + hit.sum() - inter)
    valid = np.r_[ranked[:-1] > ranked[1:], False]  # a cut between two distinct ray maxima
    if not valid.any():
        raise ValueError("no surface: the density is the same along every ray (a constant field has no level set)")
    best = int(np.argmax(np.where(valid, iou, -1.0)))
    return float(0.5 * (ranked[best] + ranked[best + 1])), float(iou[best])


def _as_grid(grid) -> _Grid:
    return grid if isinstance(grid, _Grid) else _Grid(np.asarray(grid[0], dtype=np.float32), grid[1], grid[2])


def render_matched_level(seen, meshed, opacity: float = OPACITY_LEVEL, views: int = CALIBRATION_VIEWS,
                         pixels: Optional[int] = None) -> tuple:
    """The iso-level at which the silhouettes of ``meshed``'s level set best match the volume renders of ``seen``.

    Each grid is ``(values [X, Y, Z], lo [3], cell)``: densities at the world points ``lo + cell · (i, j, k)``
    (``cell`` a number or one per axis), read trilinearly, 0 outside.

    Parallel rays from ``views`` directions over the ball around ``meshed`` (:class:`_Views`, about a ray per cell,
    at most 128² per direction).  A ray is *seen* where a volume render of ``seen`` (the raw density over the
    renderer's whole box) is more than ``opacity`` opaque, ``1 − exp(−∫σ dt) > opacity``; it crosses the mesh at
    level τ where the largest ``meshed`` value along it exceeds τ.  τ maximizes the IoU of the two ray sets over
    all its distinct cuts (a sort and a cumulative sum) and sits halfway between the two ray maxima of the best cut.
    A field no ray of which reaches ``opacity`` is matched to its most opaque rays (those at least half as opaque as
    the most opaque one).  Returns ``(level, IoU of the ray sets)``; ``ValueError`` ("no surface") for an empty
    field."""
    seen, meshed = _as_grid(seen), _as_grid(meshed)
    rays = _views_of(meshed, views, pixels)
    return _match_level(rays.along(meshed, "max"), rays.along(seen, "sum"), opacity)


def _opaque_hull(grid: "_Grid", rays: _Views, depths: np.ndarray, opacity: float) -> np.ndarray:
    """bool mask of ``grid``'s points every ray of ``rays`` through which is more than ``opacity`` opaque
    (``depths``: their optical depths): the visual hull of the volume renders' silhouettes from those directions,
    widened by the width of a ray (in cells), so the surface where it meets the silhouettes' edge is never cut."""
    from scipy import ndimage

    axes = [grid.lo[a] + grid.cell[a] * np.arange(grid.values.shape[a]) for a in range(3)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    cut = _opacity_cut(opacity)
    inside = np.ones(len(points), dtype=bool)
    for start in range(0, len(points), 1 << 20):
        part = points[start:start + (1 << 20)]
        inside[start:start + len(part)] = (rays.lookup(depths, part) > cut).all(0)
    inside = inside.reshape(grid.values.shape)
    width = 2.0 * rays.reach / rays.pixels  # a ray's spacing
    reach = np.maximum(1, np.ceil(width / grid.cell - 1e-9)).astype(int)
    return ndimage.maximum_filter(inside, size=tuple(2 * reach + 1), mode="constant", cval=False)


def remove_floaters(mesh, fraction: float = FLOATER_FRACTION, by_volume: bool = False):
    """Keep the connected components with at least ``fraction`` of the largest component's face count
    (threestudio's ``remove_outlier`` with its 1 % default) and, with ``by_volume``, also at least ``fraction`` of
    the largest component's enclosed volume (a thin sheet or shell has faces but no volume; needs closed
    components, as :func:`extract_mesh` makes).  Returns a new mesh (or ``mesh`` if it has one component or
    none)."""
    trimesh = _require_trimesh()
    if len(mesh.faces) == 0:
        return mesh
    # Component labels over shared edges (what mesh.split uses), without building one mesh per component: a young
    # NeRF's isosurface can have tens of thousands of floaters, and split() then takes minutes.
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    counts = np.bincount(labels)
    if len(counts) <= 1:
        return mesh
    keep = counts >= fraction * counts.max()
    if by_volume:
        # the divergence theorem per component: Σ over its faces of v0 · (v1 × v2) / 6
        tri = np.asarray(mesh.triangles, dtype=np.float64)
        signed = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])) / 6.0
        volumes = np.abs(np.bincount(labels, weights=signed, minlength=len(counts)))
        keep &= volumes >= fraction * volumes.max()
    kept = mesh.copy()
    kept.update_faces(keep[labels])
    kept.remove_unreferenced_vertices()
    return kept


def decimate(mesh, max_faces: int):
    """Quadric-error decimation (fast-simplification, through trimesh) down to ``max_faces`` when the mesh has more;
    otherwise ``mesh`` itself.  UV unwrapping (xatlas) time grows quickly with the face count, and a young NeRF's
    isosurface can have a million faces."""
    if isinstance(max_faces, bool) or not isinstance(max_faces, int) or max_faces < 4:
        raise ValueError(f"max_faces must be an int >= 4; got {max_faces!r}")
    if len(mesh.faces) <= max_faces:
        return mesh
    try:
        simplified = mesh.simplify_quadric_decimation(face_count=max_faces)
    except ImportError as e:  # trimesh delegates to the optional package
        raise ImportError("decimating a mesh needs 'fast-simplification' (pip install fast-simplification)") from e
    simplified.remove_unreferenced_vertices()
    simplified.metadata.update(mesh.metadata)
    return simplified


def _fitted_box(grid: _Grid, level: float, radius: float, fraction: Optional[float]) -> tuple:
    """(lo, hi) of the cells above ``level`` (with ``fraction``: only the connected pieces with at least that
    fraction of the largest one's cells, so a far speck does not stretch the box), widened by
    :data:`FIT_MARGIN_CELLS` cells and kept inside the field's box."""
    from scipy import ndimage

    mask = grid.values > level
    if fraction is not None:
        labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        if count > 1:
            sizes = np.bincount(labels.reshape(-1))[1:]
            mask = np.isin(labels, 1 + np.flatnonzero(sizes >= fraction * sizes.max()))
    index = np.argwhere(mask)
    lo = grid.lo + (index.min(0) - FIT_MARGIN_CELLS) * grid.cell
    hi = grid.lo + (index.max(0) + FIT_MARGIN_CELLS) * grid.cell
    return np.maximum(lo, -radius), np.minimum(hi, radius)


def extract_mesh(field, resolution: int = 128, threshold: Union[str, float] = "auto", chunk: int = 262144,
                 radius: Optional[float] = None, remove_outliers: bool = True,
                 floater_fraction: float = FLOATER_FRACTION, close_boundary: bool = True, fit: bool = True,
                 carve: bool = True, opening: int = OPENING_CELLS, smooth: float = SMOOTH_CELLS,
                 views: int = CALIBRATION_VIEWS):
    """Marching-cubes mesh of ``field``'s density isosurface, in world coordinates (the module docstring, point 1).

    ``field.density(points [N, 3]) -> [N]`` is evaluated without gradients on a ``resolution``³ grid spanning
    ``[-radius, radius]^3`` (``radius`` defaults to ``field.radius``), ``chunk`` points per call; with ``fit``, again
    on a grid fitted to the object (``resolution`` points along its longest side, about the same cell size along
    the others).  ``threshold``: ``"auto"``, the render-matched level (:func:`render_matched_level`, rays from
    ``views`` directions), ``"mean"`` (threestudio's rule: the mean of the first grid's densities > 1e-5,
    :func:`auto_threshold`) or a float density level.  ``carve``: keep only what every one of those rays through
    it sees as more than half opaque (the renders' visual hull, a ray wider).  The density is then cleaned
    (:func:`clean_density`: grey opening over ``opening``³ cells, off by default, Gaussian blur of ``smooth`` cells;
    0 turns either off) and meshed.  ``close_boundary``: pad the grid with empty cells so a surface cut by the box
    is closed at the box faces (those vertices lie within 1e-3 grid cell outside the box).  ``remove_outliers``:
    :func:`remove_floaters` by faces and by volume.  The faces are oriented outwards (positive volume).  Returns a
    ``trimesh.Trimesh`` with ``metadata["isosurface_threshold"]`` (the level), ``["isosurface_rule"]`` (``"auto"``,
    ``"mean"`` or ``"given"``) and, for ``"auto"``, ``["render_match_iou"]`` (the ray sets' IoU at that level);
    raises ``ValueError`` ("no surface") when the level set is empty.
    """
    trimesh = _require_trimesh()
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution must be an int >= 2; got {resolution!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1; got {chunk!r}")
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"views must be an int >= 1; got {views!r}")
    if isinstance(threshold, str):
        if threshold not in ("auto", "mean"):
            raise ValueError(f"threshold must be a number, 'auto' or 'mean'; got {threshold!r}")
    elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, 'auto' or 'mean'; got {threshold!r}")
    radius = _field_radius(field, radius)
    clean_density(np.zeros((1, 1, 1), np.float32), opening, smooth)  # checks the arguments before any work

    cell = 2.0 * radius / (resolution - 1)
    box = _density_grid(field, np.full(3, -radius), cell, (resolution,) * 3, chunk)  # what the renderer sees
    raw_max = float(box.values.max())

    def no_surface(level: float, where: str = "") -> ValueError:
        if raw_max <= AUTO_THRESHOLD_EPS:
            hint = "; the field looks empty"
        elif isinstance(threshold, str):
            hint = ""
        else:
            hint = "; try a threshold inside that range, e.g. threshold='auto'"
        return ValueError(f"no surface at density threshold {level:g}: the density on the {resolution}^3 grid "
                          f"ranges over [{float(box.values.min()):g}, {raw_max:g}]{where}{hint}")

    if raw_max <= AUTO_THRESHOLD_EPS and threshold in ("auto", "mean"):
        raise no_surface(AUTO_THRESHOLD_EPS)
    box_clean = _Grid(clean_density(box.values, opening, smooth), box.lo, box.cell) if fit else None
    if threshold == "mean":
        level = auto_threshold(box.values)
    elif threshold != "auto":
        level = float(threshold)
    elif fit:  # a first level, on the box's grid, only to find the object
        level, _ = render_matched_level(box, box_clean, views=views)
    if (threshold != "auto" or fit) and not raw_max > level:
        raise no_surface(level)

    grid = box
    if fit:
        # the box around the level set (of the raw density if the cleaning left none: the error below says why)
        found = box_clean if box_clean.values.max() > level else box
        lo, hi = _fitted_box(found, level, radius, floater_fraction if remove_outliers else None)
        if (hi - lo).max() <= 0.9 * 2.0 * radius:  # else the object fills the box: the box's grid is as fine
            step = float((hi - lo).max()) / (resolution - 1)
            shape = np.maximum(2, np.round((hi - lo) / step).astype(int) + 1)
            grid = _density_grid(field, lo, (hi - lo) / (shape - 1), tuple(int(n) for n in shape), chunk)

    # the rays of the level and of the hull: over the meshed grid, their optical depth through the whole box
    rays = _views_of(grid, views) if (threshold == "auto" or carve) else None
    depths = rays.along(box if grid is box else _Layered(grid, box), "sum") if rays is not None else None
    volume = clean_density(grid.values, opening, smooth)
    match_iou = None
    if threshold == "auto":
        level, match_iou = _match_level(rays.along(_Grid(volume, grid.lo, grid.cell), "max"), depths, OPACITY_LEVEL)
        if not raw_max > level:
            raise no_surface(level)
    if carve:
        hull = _opaque_hull(grid, rays, depths, OPACITY_LEVEL)
        if not hull.all():
            volume = clean_density(np.where(hull, grid.values, np.float32(0.0)), opening, smooth)
    vmin, vmax = float(volume.min()), float(volume.max())
    if not (vmax > level) or not (vmin < level or close_boundary):
        raise no_surface(level, " (after cleaning: max {:g}; what no ray sees as opaque is carved off{})".format(
            vmax, f", and opening={opening} removes parts thinner than that many cells" if opening > 1 else ""))

    offset = 0.0
    if close_boundary:
        # far below the level, so the closing vertices sit within 1e-3 cell of the box face (not clamped onto it:
        # clamping would collapse vertices and break the manifold)
        pad = max(min(vmin, level) - 1.0e3 * max(vmax - level, 1.0), -1.0e30)
        volume = np.pad(volume, 1, mode="constant", constant_values=np.float32(pad))
        offset = 1.0
    verts, faces = _marching_cubes(volume, level)
    if len(faces) == 0:
        raise ValueError(f"no surface at density threshold {level:g} (marching cubes found no faces); "
                         f"try a lower threshold or threshold='auto'")
    verts = (verts - offset) * grid.cell + grid.lo

    mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=True)
    mesh.remove_unreferenced_vertices()
    if mesh.volume < 0:  # inside = high density; make the normals point outwards whatever the library's convention
        mesh.invert()
    if remove_outliers:
        mesh = remove_floaters(mesh, floater_fraction, by_volume=True)
    mesh.metadata["isosurface_threshold"] = level
    mesh.metadata["isosurface_rule"] = threshold if isinstance(threshold, str) else "given"
    if match_iou is not None:
        mesh.metadata["render_match_iou"] = match_iou
    return mesh


# ----------------------------------------------------------------------------------------------- silhouettes
@torch.no_grad()
def mesh_silhouettes(vertices, faces, cameras) -> torch.Tensor:
    """Antialiased coverage ``[N, H, W]`` in [0, 1] of a mesh (world-axes ``vertices`` [V, 3], ``faces`` [F, 3]) seen
    by a :class:`~l2vsd_core.scene.cameras.CameraBatch` at its own size, with the mesh renderer's projection, so
    it lines up pixel for pixel with the volume renderer's ``opacity`` of the same cameras.  A GLB read back is
    turned to world axes first (:func:`y_up_to_world`)."""
    from .mesh.mesh_renderer import clip_positions
    from .mesh.rasterize import antialias, edge_topology, rasterize

    v = torch.as_tensor(np.asarray(vertices, dtype=np.float32))
    f = torch.as_tensor(np.asarray(faces, dtype=np.int64))
    height, width = int(cameras.height), int(cameras.width)
    if f.shape[0] == 0:
        return torch.zeros(cameras.batch_size, height, width)
    pos = clip_positions(v, cameras.to(v.device), height, width)
    rast, _ = rasterize(pos, f, (height, width))
    mask = (rast[..., 3:] > 0).float()
    return antialias(mask, rast, pos, f, topology=edge_topology(f))[..., 0].clamp(0, 1)


def opacity_iou(a: torch.Tensor, b: torch.Tensor, threshold: float = OPACITY_LEVEL) -> float:
    """Silhouette IoU of two opacity stacks ``[N, H, W]`` (or one view ``[H, W]``): per view,
    |A ∩ B| / |A ∪ B| of the masks ``a > threshold`` and ``b > threshold``, averaged over the views; a view where
    both masks are empty counts 1 (they agree)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"need two opacity stacks of one shape [N, H, W] or [H, W]; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    ma = (a > threshold).reshape(-1, a.shape[-2] * a.shape[-1])
    mb = (b > threshold).reshape(-1, a.shape[-2] * a.shape[-1])
    inter = (ma & mb).sum(1).double()
    union = (ma | mb).sum(1).double()
    per_view = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return float(per_view.mean())


# ----------------------------------------------------------------------------------------------- texture baking
def _rasterize_uv(uv: np.ndarray, faces: np.ndarray, size: int, budget: int = 1 << 22):
    """Rasterize UV triangles into a ``size``² texture.  Returns (face index [size, size] int64, −1 = empty,
    barycentric weights [size, size, 3]).  Texel (row r, col c) has its centre at u = (c+.5)/size,
    v = 1 − (r+.5)/size (OpenGL/trimesh UVs, image row 0 at the top)."""
    face_id = np.full((size, size), -1, dtype=np.int64)
    bary = np.zeros((size, size, 3), dtype=np.float32)
    if len(faces) == 0:
        return face_id, bary
    # triangle corners in continuous pixel coordinates (x = column, y = row), texel centres at integer + .5
    px = np.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], -1)[faces]  # [F, 3, 2]
    lo = np.clip(np.floor(px.min(1) - 0.5), 0, size - 1).astype(np.int64)  # first texel index whose centre may hit
    hi = np.clip(np.ceil(px.max(1) - 0.5), 0, size - 1).astype(np.int64)
    ext = hi - lo + 1  # [F, 2] bbox in texels
    order = np.argsort(ext.max(1), kind="stable")
    eps = -1e-6
    start = 0
    while start < len(order):
        side = int(ext[order[start]].max())
        # grow the batch while the padded box of its biggest member fits the budget
        end = start + 1
        while end < len(order):
            side_end = int(ext[order[min(end + 255, len(order) - 1)]].max())
            if (min(end + 256, len(order)) - start) * side_end * side_end > budget:
                break
            end = min(end + 256, len(order))
            side = side_end
        side = int(ext[order[start:end]].max())
        idx = order[start:end]
        tri = px[idx].astype(np.float64)  # [T, 3, 2]
        offs = np.arange(side)
        cx = lo[idx, 0][:, None, None] + offs[None, None, :]  # [T, 1, S]
        cy = lo[idx, 1][:, None, None] + offs[None, :, None]  # [T, S, 1]
        x = cx + 0.5
        y = cy + 0.5
        a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
        det = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
        ok = np.abs(det) > 1e-12
        det = np.where(ok, det, 1.0)[:, None, None]
        w0 = ((b[:, 1] - c[:, 1])[:, None, None] * (x - c[:, 0][:, None, None])
              + (c[:, 0] - b[:, 0])[:, None, None] * (y - c[:, 1][:, None, None])) / det
        w1 = ((c[:, 1] - a[:, 1])[:, None, None] * (x - c[:, 0][:, None, None])
              + (a[:, 0] - c[:, 0])[:, None, None] * (y - c[:, 1][:, None, None])) / det
        w2 = 1.0 - w0 - w1
        inside = (w0 >= eps) & (w1 >= eps) & (w2 >= eps) & ok[:, None, None]
        inside &= (cx <= hi[idx, 0][:, None, None]) & (cy <= hi[idx, 1][:, None, None])
        t, r, q = np.nonzero(inside)
        rows = (lo[idx, 1][t] + r)
        cols = (lo[idx, 0][t] + q)
        face_id[rows, cols] = idx[t]
        bary[rows, cols] = np.stack([w0[t, r, q], w1[t, r, q], w2[t, r, q]], -1)
        start = end
    return face_id, bary


def _dilate(image: np.ndarray, filled: np.ndarray, iterations: int):
    """Grow the filled region ``iterations`` texels: each empty texel with filled 8-neighbours gets their mean."""
    img = image.astype(np.float32).copy()
    mask = filled.copy()
    h, w = mask.shape
    for _ in range(iterations):
        if mask.all():
            break
        acc = np.zeros_like(img)
        cnt = np.zeros((h, w), dtype=np.float32)
        pm = np.pad(mask, 1)
        pi = np.pad(img * mask[..., None], ((1, 1), (1, 1), (0, 0)))
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy == 0 and dx == 0:
                    continue
                m = pm[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                acc += pi[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                cnt += m
        grow = (~mask) & (cnt > 0)
        img[grow] = acc[grow] / cnt[grow][:, None]
        mask = mask | grow
    return img, mask


@torch.no_grad()
def _query_rgb(field, points: np.ndarray, dirs: np.ndarray, chunk: int) -> np.ndarray:
    device, dtype = _field_device_dtype(field)
    out = []
    for s in range(0, len(points), chunk):
        p = torch.as_tensor(points[s:s + chunk], dtype=dtype, device=device)
        d = torch.as_tensor(dirs[s:s + chunk], dtype=dtype, device=device)
        rgb = field(p, d)
        rgb = rgb["rgb"] if isinstance(rgb, dict) else rgb  # a field's output dict, or a colour function's [N, 3]
        out.append(rgb.reshape(-1, 3).float().clamp(0, 1).cpu().numpy())
    return np.concatenate(out, 0) if out else np.zeros((0, 3), np.float32)


def bake_texture(mesh, field, texture_size: int = 1024, padding: int = 4, chunk: int = 65536,
                 background: Optional[tuple] = None):
    """UV-unwrap ``mesh`` with xatlas and bake ``field(points, dirs)["rgb"]`` into a ``texture_size``² texture.

    ``field`` is anything queried as ``field(points [N, 3], dirs [N, 3])``: a radiance field returning a dict with
    ``"rgb"`` (stage 1's ``ImplicitVolume``, the texture stage's ``TextureField``) or a colour function returning
    ``[N, 3]`` directly; a module's parameters give the query's device and dtype (CPU float32 otherwise).

    Every texel covered by a UV triangle gets the field's colour at its 3D point (barycentric interpolation of
    the triangle's corners); the view direction passed to the field is minus the face normal (looking at the
    surface from outside).  The colours are then dilated ``padding`` texels into the empty texels (seam padding);
    texels still empty after that get ``background`` (RGB in [0, 1]; default the mean baked colour).
    Returns a new ``trimesh.Trimesh`` (vertices split along the UV seams) with
    ``TextureVisuals(uv, material=PBRMaterial(baseColorTexture=image))``.
    """
    trimesh = _require_trimesh()
    from PIL import Image
    try:
        import xatlas
    except ImportError as e:
        raise ImportError("bake_texture needs the 'xatlas' package (pip install xatlas)") from e
    if isinstance(texture_size, bool) or not isinstance(texture_size, int) or texture_size < 8:
        raise ValueError(f"texture_size must be an int >= 8; got {texture_size!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0; got {padding!r}")
    if len(mesh.faces) == 0:
        raise ValueError("cannot bake a texture on a mesh without faces")

    verts = np.asarray(mesh.vertices, dtype=np.float32)
    faces = np.asarray(mesh.faces, dtype=np.uint32)
    atlas = xatlas.Atlas()
    atlas.add_mesh(verts, faces)
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = max(1, padding // 2)
    pack.bilinear = True
    atlas.generate(pack_options=pack)
    vmapping, new_faces, uv = atlas[0]
    new_verts = verts[vmapping].astype(np.float64)
    new_faces = new_faces.astype(np.int64)
    uv = uv.astype(np.float64)

    face_id, bary = _rasterize_uv(uv, new_faces, texture_size)
    covered = face_id >= 0
    fid = face_id[covered]
    corners = new_verts[new_faces[fid]]  # [K, 3, 3]
    points = (bary[covered][..., None] * corners).sum(1)
    fn = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    fn /= np.maximum(np.linalg.norm(fn, axis=-1, keepdims=True), 1e-12)
    rgb = _query_rgb(field, points.astype(np.float32), (-fn).astype(np.float32), chunk)

    image = np.zeros((texture_size, texture_size, 3), dtype=np.float32)
    image[covered] = rgb
    image, filled = _dilate(image, covered, padding)
    fill = np.asarray(background, dtype=np.float32) if background is not None else (
        rgb.mean(0) if len(rgb) else np.zeros(3, np.float32))
    image[~filled] = fill
    img = Image.fromarray(np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8), mode="RGB")

    material = trimesh.visual.material.PBRMaterial(
        name="baked", baseColorTexture=img, baseColorFactor=[255, 255, 255, 255], metallicFactor=0.0,
        roughnessFactor=1.0)
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    out = trimesh.Trimesh(vertices=new_verts, faces=new_faces, visual=visual, process=False)
    out.metadata.update(mesh.metadata)
    out.metadata["texture_coverage"] = float(covered.mean())
    return out


# ----------------------------------------------------------------------------------------------- saving
def _texture_image(mesh):
    vis = getattr(mesh, "visual", None)
    if vis is None or getattr(vis, "kind", None) != "texture" or getattr(vis, "uv", None) is None:
        return None
    mat = getattr(vis, "material", None)
    img = getattr(mat, "baseColorTexture", None)
    if img is None:
        img = getattr(mat, "image", None)
    return img


def _sample_texture(image, uv: np.ndarray) -> np.ndarray:
    """Bilinear sample of a PIL image at OpenGL UVs (v up, wrapping) -> float RGB [N, 3] in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    h, w = arr.shape[:2]
    x = (np.mod(uv[:, 0], 1.0)) * w - 0.5
    y = (1.0 - np.mod(uv[:, 1], 1.0)) * h - 0.5
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0c, x1c = np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)
    y0c, y1c = np.clip(y0, 0, h - 1), np.clip(y0 + 1, 0, h - 1)
    top = arr[y0c, x0c] * (1 - fx) + arr[y0c, x1c] * fx
    bot = arr[y1c, x0c] * (1 - fx) + arr[y1c, x1c] * fx
    return top * (1 - fy) + bot * fy


def save_mesh(mesh, path: PathLike, format: Optional[str] = None, field=None) -> Path:
    """Write ``mesh`` (in world axes) to ``path`` atomically; returns the path of the main file.

    ``format``: ``"glb"`` (binary glTF with the baked texture), ``"obj"`` (``path`` plus ``<stem>.mtl`` and the
    texture ``<stem>.png`` next to it, via trimesh) or ``"ply"`` (binary PLY with per-vertex colours sampled from the texture,
    or from ``field(vertices)["rgb"]`` when the mesh has no texture and a ``field`` is given).  ``None``: from the
    suffix of ``path`` (default ``"glb"``).  Every file goes to a temporary name in the same folder first and is
    then ``os.replace``-d into place, so an interrupted export leaves no partial file.  Missing folders are
    created; a path with a *file* as parent raises ``ValueError`` and writes nothing.

    Axes: GLB and OBJ are written y up with the object's front facing +z (glTF 2.0's convention, and OBJ's usual
    one), by the proper rotation :data:`WORLD_TO_Y_UP` of the world's z-up, front-+x vertices (normals, if written,
    rotated alike); :func:`y_up_to_world` undoes it on what is read back.  PLY keeps the world axes unchanged (z up,
    front +x), the usual convention of scanning and point-cloud tools (and Blender's PLY import default).
    ``mesh`` itself is not changed.
    """
    trimesh = _require_trimesh()
    path = Path(path)
    if format is None:
        suffix = path.suffix.lower().lstrip(".")
        format = suffix if suffix in ("glb", "obj", "ply") else "glb"
    format = str(format).lower()
    if format not in ("glb", "obj", "ply"):
        raise ValueError(f"format must be 'glb', 'obj' or 'ply'; got {format!r}")
    _check_parent(path)

    if format == "glb":
        data = trimesh.Scene(_in_y_up(mesh)).export(file_type="glb")
        atomic_write_bytes(path, data)
    elif format == "obj":
        from trimesh.exchange.obj import export_obj
        mtl_name = f"{path.stem}.mtl"
        turned = _in_y_up(mesh)
        if _texture_image(mesh) is not None:
            # name the material (hence the texture file) after the OBJ, so two exports in one folder don't clash
            turned.visual.material = copy.copy(turned.visual.material)
            turned.visual.material.name = path.stem
            text, files = export_obj(turned, include_texture=True, return_texture=True, mtl_name=mtl_name)
        else:
            text, files = export_obj(turned, include_texture=False, return_texture=True, mtl_name=mtl_name)
        # side files (MTL, PNG) first, the OBJ last: once the OBJ exists its references are complete
        for name, blob in (files or {}).items():
            name = os.path.basename(name)
            atomic_write_bytes(path.parent / name, blob if isinstance(blob, bytes) else str(blob).encode())
        atomic_write_bytes(path, text.encode("utf-8"))
    else:  # ply: world axes (z up), see the docstring
        colors = None
        image = _texture_image(mesh)
        if image is not None:
            colors = _sample_texture(image, np.asarray(mesh.visual.uv, dtype=np.float64))
        elif field is not None and len(mesh.vertices):
            v = np.asarray(mesh.vertices, dtype=np.float32)
            n = np.asarray(mesh.vertex_normals, dtype=np.float32)
            colors = _query_rgb(field, v, -n, 65536)
        elif getattr(mesh.visual, "kind", None) == "vertex":
            colors = np.asarray(mesh.visual.vertex_colors, dtype=np.float32)[:, :3] / 255.0
        out = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=False)
        if colors is not None:
            rgba = np.concatenate([np.clip(np.round(colors * 255), 0, 255),
                                   np.full((len(colors), 1), 255.0)], 1).astype(np.uint8)
            out.visual = trimesh.visual.ColorVisuals(out, vertex_colors=rgba)
        data = out.export(file_type="ply", encoding="binary")
        atomic_write_bytes(path, data)
    return path


# ----------------------------------------------------------------------------------------------- turntable
@torch.no_grad()
def orbit_views(renderer, field, background, n_views: int, resolution: int, elevation_deg: float = 15.0,
                distance: float = 1.5, fovy_deg: float = 70.0, output: str = "rgb", device=None,
                dtype: torch.dtype = torch.float32) -> list:
    """``n_views`` orbit renders (:func:`~l2vsd_core.scene.cameras.orbit_cameras`), each ``[H, W, C]`` float in
    [0, 1] on the CPU, with anything that has the volume renderer's ``render_camera`` (no jitter; the caller sets
    evaluation mode and no-grad).  One view at a time: bounded memory whatever ``n_views``."""
    from .scene.cameras import CameraBatch, orbit_cameras

    cams = orbit_cameras(n_views, elevation_deg=elevation_deg, distance=distance, fovy_deg=fovy_deg,
                         width=resolution, height=resolution, dtype=dtype, device=device)
    views = []
    for i in range(n_views):
        cam = CameraBatch(*(t[i:i + 1] for t in (cams.c2w, cams.position, cams.elevation_deg, cams.azimuth_deg,
                                                 cams.distance, cams.fovy_deg)), cams.width, cams.height)
        out = renderer.render_camera(cam, field, background, stratified=False)
        views.append(out[output][0].float().clamp(0, 1).cpu())
    return views


def turntable_gif(renderer, field, background, path: PathLike, n_views: int = 30, resolution: int = 64,
                  elevation_deg: float = 15.0, distance: float = 1.5, fovy_deg: float = 70.0,
                  fps: float = 15.0, loop: int = 0) -> Path:
    """Render ``n_views`` orbit views (:func:`~l2vsd_core.scene.cameras.orbit_cameras`, ProlificDreamer's eval
    camera by default) at ``resolution``² with ``renderer.render_camera`` (no jitter, no grad) and write them as
    an animated GIF (``fps`` frames per second, ``loop`` 0 = forever) atomically to ``path``.
    Note: Pillow merges consecutive identical frames (e.g. a rotation-symmetric object) into one longer frame.
    """
    from PIL import Image

    if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
        raise ValueError(f"n_views must be an int >= 1; got {n_views!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be an int >= 1; got {resolution!r}")
    if not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"fps must be > 0; got {fps!r}")
    path = Path(path)
    _check_parent(path)
    device, dtype = _field_device_dtype(field)
    views = orbit_views(renderer, field, background, n_views, resolution, elevation_deg, distance, fovy_deg,
                        device=device, dtype=dtype)
    frames = [Image.fromarray(np.round(view.numpy() * 255).astype(np.uint8), mode="RGB") for view in views]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:],
                   duration=int(round(1000.0 / fps)), loop=loop, optimize=False)
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_textured_mesh(mesh, color_field, path: PathLike, texture_size: int = 1024,
                       max_faces: Optional[int] = None):
    """Bake ``color_field`` (anything :func:`l2vsd_core.export.bake_texture` queries: a field returning
    ``{"rgb"}`` or a function returning colours) onto ``mesh`` and write it (GLB by the suffix, via
    :func:`~l2vsd_core.export.save_mesh`, which turns GLB/OBJ to y up); decimated to ``max_faces`` first when
    given.  Returns ``(trimesh.Trimesh in world axes, path)``."""
    if mesh.faces.shape[0] == 0:
        raise ValueError("cannot export an empty mesh (no faces)")
    surface = mesh.to_trimesh()
    if max_faces is not None and len(surface.faces) > max_faces:
        surface = decimate(surface, max_faces)
    baked = bake_texture(surface, color_field, texture_size=texture_size)
    return baked, save_mesh(baked, path)
