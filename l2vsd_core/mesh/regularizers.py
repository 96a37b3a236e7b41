"""Mesh regularizers of ProlificDreamer's geometry stage (``lambda_normal_consistency`` and
``lambda_laplacian_smoothness``, both 10000 in threestudio's ``prolificdreamer-geometry.yaml``).

All take plain tensors ``vertices [V, 3]`` (float, differentiable) and ``faces [F, 3]`` (int64) and return a
scalar.  The connectivity is rebuilt on every call (the DMTet mesh changes topology every step); only the vertex
positions carry gradients.

* :func:`normal_consistency`: ``1 - cos`` between the unit normals of the two faces sharing each edge, averaged
  over those edges (the pytorch3d-style definition).  Uses oriented normals, so it assumes consistently oriented
  faces (marching tets output is).  Boundary edges (one face) are skipped; an edge with more than two faces
  contributes the pairs of consecutive faces in sorted order.
* :func:`laplacian_smoothness`: uniform Laplacian ``delta_i = v_i - mean(neighbours of i)``, the mean of
  ``||delta_i||^2`` over the vertices that have neighbours.

threestudio's own versions differ in scale, which matters for its 10000 weights: its ``normal_consistency``
compares the *vertex* normals at the two ends of each edge (:func:`vertex_normal_consistency` here), and its
``laplacian`` is the mean of ``||(D - A) v||`` (unnormalised graph Laplacian, norm not squared;
:func:`graph_laplacian_norm` here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dmtet import face_normals, vertex_normals

__all__ = ["mesh_edges", "edge_face_pairs", "normal_consistency", "vertex_normal_consistency",
           "uniform_laplacian", "laplacian_smoothness", "graph_laplacian_norm"]


def mesh_edges(faces: torch.Tensor) -> torch.Tensor:
    """Unique undirected edges ``[E, 2]`` (lower index first)."""
    directed = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    return torch.unique(torch.sort(directed, dim=1).values, dim=0)


def edge_face_pairs(faces: torch.Tensor) -> torch.Tensor:
    """Pairs of faces ``[P, 2]`` that share an edge (one pair per interior edge of a manifold mesh)."""
    directed = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    undirected = torch.sort(directed, dim=1).values
    num_vertices = int(faces.max()) + 1 if faces.numel() else 0
    key = undirected[:, 0] * num_vertices + undirected[:, 1]
    order = torch.argsort(key)
    sorted_key = key[order]
    same = (sorted_key[1:] == sorted_key[:-1]).nonzero()[:, 0]  # consecutive equal keys share the edge
    face_of = torch.arange(faces.shape[0], device=faces.device).repeat_interleave(3)[order]
    return torch.stack([face_of[same], face_of[same + 1]], -1)


def normal_consistency(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean over edges shared by two faces of ``1 - cos(n_f, n_g)`` (0 for a flat mesh, 1 for a right-angle crease,
    up to 2 for a fold back onto itself).  Zero when there is no such edge."""
    pairs = edge_face_pairs(faces)
    if pairs.shape[0] == 0:
        return vertices.sum() * 0.0
    normals = face_normals(vertices, faces)
    return (1.0 - (normals[pairs[:, 0]] * normals[pairs[:, 1]]).sum(-1)).mean()


def vertex_normal_consistency(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """threestudio's variant: mean over unique edges of ``1 - cos`` between the area-weighted vertex normals at
    the edge's two ends."""
    edges = mesh_edges(faces)
    if edges.shape[0] == 0:
        return vertices.sum() * 0.0
    normals = vertex_normals(vertices, faces)
    return (1.0 - F.cosine_similarity(normals[edges[:, 0]], normals[edges[:, 1]], dim=-1)).mean()


def _neighbour_sum_and_degree(vertices: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    edges = mesh_edges(faces)
    both_ways = torch.cat([edges, edges.flip(1)], 0)  # (i, j) and (j, i): each edge counts once per end
    neighbour_sum = torch.zeros_like(vertices).index_add_(0, both_ways[:, 0], vertices[both_ways[:, 1]])
    degree = torch.zeros(vertices.shape[0], dtype=vertices.dtype, device=vertices.device)
    degree.index_add_(0, both_ways[:, 0], torch.ones_like(both_ways[:, 0], dtype=vertices.dtype))
    return neighbour_sum, degree


def uniform_laplacian(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """``v_i - mean(neighbours)`` per vertex ``[V, 3]`` (0 for a vertex without neighbours)."""
    neighbour_sum, degree = _neighbour_sum_and_degree(vertices, faces)
    connected = (degree > 0)[:, None]
    mean = neighbour_sum / degree.clamp_min(1.0)[:, None]
    return torch.where(connected, vertices - mean, torch.zeros_like(vertices))


def laplacian_smoothness(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean of ``||v_i - mean(neighbours)||^2`` over the vertices that have neighbours."""
    neighbour_sum, degree = _neighbour_sum_and_degree(vertices, faces)
    connected = degree > 0
    if not bool(connected.any()):
        return vertices.sum() * 0.0
    delta = vertices[connected] - neighbour_sum[connected] / degree[connected, None]
    return (delta * delta).sum(-1).mean()


def graph_laplacian_norm(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """threestudio's ``laplacian()`` scale: mean over all vertices of ``||deg_i v_i - sum(neighbours)||``."""
    neighbour_sum, degree = _neighbour_sum_and_degree(vertices, faces)
    return (degree[:, None] * vertices - neighbour_sum).norm(dim=-1).mean()
