"""Tetrahedral grid of a cube, generated here (no third-party grid files such as threestudio's ``load/tets/*.npz``).

Layout
    The cube ``[-1, 1]^3`` is divided into ``N^3`` cubes of side ``h = 2 / N``; the grid vertices are the
    ``(N+1)^3`` cube corners, vertex ``(i, j, k)`` (integer grid coordinates, ``i`` along x) has index
    ``(i * (N+1) + j) * (N+1) + k`` and position ``-1 + h * (i, j, k)``.  Callers scale it to their bounding box
    (:func:`scale_to_bbox`).

Split (Kuhn / Freudenthal)
    Every cube is cut into 6 tetrahedra along its main diagonal ``(0,0,0) -> (1,1,1)``: for each permutation
    ``p`` of the axes, the tet ``c, c + e_p0, c + e_p0 + e_p1, c + (1,1,1)``.  All 6 have volume ``h^3 / 6``.
    Because every cube is split the same way (the split is translation invariant), the two triangles on a face
    shared by neighbouring cubes coincide: the grid is conforming.

Conventions
    * ``tets [T, 4]`` (int64) are positively oriented: ``det[v1 - v0, v2 - v0, v3 - v0] > 0``.
    * ``edges [E, 2]`` (int64) are the unique undirected edges, stored as ``(lower index, higher index)``.
    * ``tet_edges [T, 6]`` maps each tet to its edges, in the local order :data:`TET_EDGE_PAIRS`
      ``(0,1), (0,2), (0,3), (1,2), (1,3), (2,3)``; marching tets uses it to index surface vertices by edge id.
    * Every Kuhn edge joins a vertex ``u`` to ``u + d`` with ``d`` a non-zero 0/1 vector (7 directions), so the
      edge table is built directly from (start vertex, direction) without sorting: ``O(T)`` even at ``N = 128``.
      :func:`unique_edges` is the general, sort-based version for any tet mesh.

Size: ``N = 64`` gives 274,625 vertices and 1.57 M tets; ``N = 128`` gives 2.15 M vertices and 12.6 M tets (the
index tensors alone are about 1 GB in int64).  threestudio's ``isosurface_resolution: 128`` grid (a Quartet
BCC grid) has tets about ``2 / 128`` of the box across ("half tet size is approximately 1 / resolution" in its
code), i.e. about the size of our ``N = 64`` cells.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["TET_EDGE_PAIRS", "TetGrid", "cube_tet_grid", "unique_edges", "tet_volumes", "scale_to_bbox", "as_bbox"]

TET_EDGE_PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))

BBoxLike = Union[float, torch.Tensor, tuple, list]


@dataclass
class TetGrid:
    """A tetrahedral grid: ``vertices [V,3]``, ``tets [T,4]``, ``edges [E,2]``, ``tet_edges [T,6]``."""

    vertices: torch.Tensor
    tets: torch.Tensor
    edges: torch.Tensor
    tet_edges: torch.Tensor
    resolution: int

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "TetGrid":
        return TetGrid(self.vertices.to(device=device, dtype=dtype), self.tets.to(device), self.edges.to(device),
                       self.tet_edges.to(device), self.resolution)


def _kuhn_cube_tets() -> torch.Tensor:
    """The 6 positively oriented tets of the unit cube, as corner offsets ``[6, 4, 3]`` (0/1 integers)."""
    tets = []
    for perm in itertools.permutations(range(3)):
        corner = [0, 0, 0]
        corners = [tuple(corner)]
        for axis in perm:
            corner[axis] = 1
            corners.append(tuple(corner))
        tet = torch.tensor(corners, dtype=torch.int64)
        volume6 = torch.linalg.det((tet[1:] - tet[0]).double())
        if volume6 < 0:  # odd permutations come out negatively oriented: swap two vertices
            tet = tet[[0, 1, 3, 2]]
        tets.append(tet)
    return torch.stack(tets)


def cube_tet_grid(resolution: int, device: Optional[torch.device] = None,
                  dtype: torch.dtype = torch.float32) -> TetGrid:
    """Kuhn-split tetrahedral grid of ``[-1, 1]^3`` with ``resolution^3`` cubes (see the module docstring)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be an int >= 1, got {resolution!r}")
    n = resolution
    side = n + 1
    num_vertices = side ** 3

    axis = torch.arange(side, device=device)
    ijk = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)  # index order = layout
    vertices = (ijk.to(torch.float64) * (2.0 / n) - 1.0).to(dtype)

    # Every tet and every edge is "cube's lowest corner + a per-Kuhn-tet constant", so both tables are one
    # broadcast add over the cubes (no sorting: the whole N = 128 grid takes about 2 s on one CPU thread).
    cell_axis = torch.arange(n, device=device)
    cube_corner = ((cell_axis[:, None, None] * side + cell_axis[None, :, None]) * side
                   + cell_axis[None, None, :]).reshape(-1, 1, 1)  # [C, 1, 1] index of each cube's lowest corner
    local_tets = _kuhn_cube_tets()  # [6, 4, 3] corner offsets
    strides = torch.tensor([side * side, side, 1])
    local_index = (local_tets * strides).sum(-1)  # [6, 4]
    tets = (cube_corner + local_index.to(device)).reshape(-1, 4)

    # edge (u, d): start vertex u, direction bits d = 4 dx + 2 dy + dz in 1..7; raw id (d - 1) * V + u
    pairs = torch.tensor(TET_EDGE_PAIRS)
    first, second = local_tets[:, pairs[:, 0]], local_tets[:, pairs[:, 1]]  # [6, 6, 3]
    first_is_lower = (local_index[:, pairs[:, 0]] < local_index[:, pairs[:, 1]])[..., None]
    lower = torch.where(first_is_lower, first, second)
    step = torch.where(first_is_lower, second - first, first - second)
    assert bool(((step == 0) | (step == 1)).all()), "Kuhn edges step by a 0/1 vector"
    direction = (step * torch.tensor([4, 2, 1])).sum(-1)
    local_raw = (direction - 1) * num_vertices + (lower * strides).sum(-1)  # [6, 6]
    raw_id = (cube_corner + local_raw.to(device)).reshape(-1, 6)

    used = torch.zeros(7 * num_vertices, dtype=torch.bool, device=device)
    used[raw_id.reshape(-1)] = True
    compact = torch.cumsum(used, 0) - 1  # raw id -> edge id
    tet_edges = compact[raw_id]
    used_raw = used.nonzero()[:, 0]
    start = used_raw % num_vertices
    used_direction = used_raw // num_vertices + 1
    offset_bits = torch.stack([(used_direction >> 2) & 1, (used_direction >> 1) & 1, used_direction & 1], -1)
    edges = torch.stack([start, start + (offset_bits * strides.to(device)).sum(-1)], -1)
    return TetGrid(vertices, tets, edges, tet_edges, n)


def unique_edges(tets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique edges ``[E, 2]`` (lower, higher) and ``tet_edges [T, 6]`` of any tet mesh (sort-based; general)."""
    pairs = torch.tensor(TET_EDGE_PAIRS, device=tets.device)
    a, b = tets[:, pairs[:, 0]], tets[:, pairs[:, 1]]
    all_edges = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], -1).reshape(-1, 2)
    edges, inverse = torch.unique(all_edges, dim=0, return_inverse=True)
    return edges, inverse.reshape(-1, 6)


def tet_volumes(vertices: torch.Tensor, tets: torch.Tensor) -> torch.Tensor:
    """Signed volumes ``[T]`` (positive for positively oriented tets)."""
    v = vertices[tets]
    return torch.linalg.det(v[:, 1:] - v[:, :1]) / 6.0


def as_bbox(bbox: BBoxLike, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``[2, 3]`` (min corner, max corner) from a half-size (float: the box ``[-r, r]^3``) or a ``[2, 3]`` array."""
    if isinstance(bbox, (int, float)) and not isinstance(bbox, bool):
        if not bbox > 0:
            raise ValueError(f"a bounding-box radius must be > 0, got {bbox!r}")
        return torch.tensor([[-bbox] * 3, [bbox] * 3], dtype=dtype, device=device)
    box = torch.as_tensor(bbox, dtype=dtype, device=device)
    if box.shape != (2, 3) or not bool(torch.isfinite(box).all()) or not bool((box[1] > box[0]).all()):
        raise ValueError(f"bbox must be a radius or [[xmin, ymin, zmin], [xmax, ymax, zmax]] with max > min, "
                         f"got {bbox!r}")
    return box


def scale_to_bbox(unit_vertices: torch.Tensor, bbox: BBoxLike) -> torch.Tensor:
    """Map grid vertices from ``[-1, 1]^3`` onto ``bbox`` (per-axis affine; keeps orientation)."""
    box = as_bbox(bbox, unit_vertices.dtype, unit_vertices.device)
    return box[0] + (unit_vertices + 1.0) * (0.5 * (box[1] - box[0]))
