"""Mesh export of a trained radiance field: isosurface, floater removal, texture baking, GLB/OBJ/PLY, turntable GIF.

Pipeline (threestudio's ``--export`` path, re-implemented on CPU-friendly libraries):

1. :func:`extract_mesh` evaluates ``field.density`` on a regular grid over the field's box ``[-radius, radius]^3``
   (no grad, in chunks) and runs marching cubes at a density threshold.  ``threshold="auto"`` is threestudio's
   ``ImplicitVolume`` rule: the mean of the density values greater than ``1e-5`` (its default fixed threshold is
   25).  Marching cubes comes from PyMCubes (``import mcubes``) when installed, else scikit-image.  Floaters are
   removed with threestudio's ``remove_outlier`` rule: keep the connected components having at least 1 % of the
   faces of the largest one.
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
           "AUTO_THRESHOLD_EPS", "FLOATER_FRACTION", "WORLD_TO_Y_UP", "world_to_y_up", "y_up_to_world"]

AUTO_THRESHOLD_EPS = 1.0e-5  # threestudio: threshold = field[field > eps].mean() for "auto"
FLOATER_FRACTION = 0.01      # threestudio remove_outlier: drop components with < 1 % of the largest's faces

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
@torch.no_grad()
def _density_grid(field, radius: float, resolution: int, chunk: int) -> np.ndarray:
    device, dtype = _field_device_dtype(field)
    axis = torch.linspace(-radius, radius, resolution, dtype=torch.float64)
    out = np.empty((resolution,) * 3, dtype=np.float32)
    flat = out.reshape(-1)
    n = resolution ** 3
    yz = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)  # [R², 2], x is the slow axis
    per_slab = resolution * resolution
    slabs = max(1, chunk // per_slab)
    for i0 in range(0, resolution, slabs):
        xs = axis[i0:i0 + slabs]
        pts = torch.cat([xs.repeat_interleave(per_slab)[:, None], yz.repeat(len(xs), 1)], 1)
        vals = []
        for s in range(0, pts.shape[0], chunk):
            p = pts[s:s + chunk].to(device=device, dtype=dtype)
            vals.append(field.density(p).reshape(-1).float().cpu())
        flat[i0 * per_slab:i0 * per_slab + pts.shape[0]] = torch.cat(vals).numpy()
    assert n == flat.size
    return out


def remove_floaters(mesh, fraction: float = FLOATER_FRACTION):
    """Keep the connected components with at least ``fraction`` of the largest component's face count
    (threestudio's ``remove_outlier`` with its 1 % default).  Returns a new mesh (or ``mesh`` if it has one
    component or none)."""
    trimesh = _require_trimesh()
    if len(mesh.faces) == 0:
        return mesh
    # Component labels over shared edges (what mesh.split uses), without building one mesh per component: a young
    # NeRF's isosurface can have tens of thousands of floaters, and split() then takes minutes.
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    counts = np.bincount(labels)
    if len(counts) <= 1:
        return mesh
    kept = mesh.copy()
    kept.update_faces(counts[labels] >= fraction * counts.max())
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


def extract_mesh(field, resolution: int = 128, threshold: Union[str, float] = "auto", chunk: int = 262144,
                 radius: Optional[float] = None, remove_outliers: bool = True,
                 floater_fraction: float = FLOATER_FRACTION, close_boundary: bool = True):
    """Marching-cubes mesh of ``field``'s density isosurface, in world coordinates.

    ``field.density(points [N, 3]) -> [N]`` is evaluated without gradients on a ``resolution``³ grid of points
    spanning ``[-radius, radius]^3`` (``radius`` defaults to ``field.radius``), ``chunk`` points per call.
    ``threshold``: a float density level, or ``"auto"`` (threestudio's rule: mean of the densities > 1e-5).
    ``close_boundary``: pad the grid with empty cells so a surface cut by the box is closed at the box faces
    (those vertices lie within 1e-3 grid cell outside the box).  ``remove_outliers``: :func:`remove_floaters`.  The faces are oriented
    outwards (positive volume).  Returns a ``trimesh.Trimesh``; raises ``ValueError`` when the level set is empty.
    """
    trimesh = _require_trimesh()
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution must be an int >= 2; got {resolution!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1; got {chunk!r}")
    radius = _field_radius(field, radius)
    volume = _density_grid(field, radius, resolution, chunk)
    volume = np.nan_to_num(volume, nan=0.0, posinf=np.float32(3.0e38), neginf=0.0)

    if isinstance(threshold, str):
        if threshold != "auto":
            raise ValueError(f"threshold must be a number or 'auto'; got {threshold!r}")
        level = auto_threshold(volume)
    elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number or 'auto'; got {threshold!r}")
    else:
        level = float(threshold)

    vmin, vmax = float(volume.min()), float(volume.max())
    if not (vmax > level) or not (vmin < level or close_boundary):
        hint = auto_threshold(volume) if vmax > AUTO_THRESHOLD_EPS else None
        raise ValueError(
            f"no surface at density threshold {level:g}: the density on the {resolution}^3 grid ranges over "
            f"[{vmin:g}, {vmax:g}]; try a threshold inside that range"
            + (f", e.g. threshold='auto' (= {hint:g} here)" if hint is not None else " (the field looks empty)"))

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
    cell = 2.0 * radius / (resolution - 1)
    verts = (verts - offset) * cell - radius

    mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=True)
    mesh.remove_unreferenced_vertices()
    if mesh.volume < 0:  # inside = high density; make the normals point outwards whatever the library's convention
        mesh.invert()
    if remove_outliers:
        mesh = remove_floaters(mesh, floater_fraction)
    mesh.metadata["isosurface_threshold"] = level
    return mesh


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
