"""The procedural world: one colored solid at the origin, rendered by sphere tracing in pure torch.

Every object is a signed distance function (SDF) designed at *unit scale* to fit inside the unit sphere; an instance
scales it by ``size`` (0.4–0.6, so it fits the NeRF's scene radius 1.0 with a wide margin) and turns it by ``yaw``
about the world's vertical z axis.  World and cameras follow :mod:`l2vsd_core.scene.cameras` (z up, azimuth 0 on +x = "front").

Shading is Lambertian with an ambient term and one light fixed in the *world* (``LIGHT_DIRECTION``, from the front and
above), so the back of an object is darker than its front; a render is the object composited over ``BACKGROUND``
(plain white).  Edges are anti-aliased by supersampling (render ``supersample``× larger, average-pool down), which
also gives the ground-truth silhouette a soft coverage value per pixel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ...scene.cameras import CameraBatch

BACKGROUND = (1.0, 1.0, 1.0)   # the one background color of every render (and of the prior's training images)
# Instance scale; unit-scale shapes fit in radius 0.96, so objects fit in radius 0.58.  Not larger: the stage-1 cameras
# come as close as distance 1.0 with fovy 40°, which sees only ±0.36 around the origin, so larger objects would be
# cropped in many renders (a cropped sphere is a colored square) and the prior could not tell the shapes apart.
SIZE_RANGE = (0.4, 0.6)
BOUNDING_RADIUS = 0.6          # every instance lies inside this sphere: rays that miss it are background
LIGHT_DIRECTION = (0.45, 0.25, 0.86)   # towards the light (normalised below): front-right, high above
AMBIENT, DIFFUSE = 0.4, 0.6    # a surface facing the light gets exactly its albedo; one facing away, 40 % of it
COLOR_JITTER = 0.04            # ± per channel, uniform, so that a color name covers a small patch of RGB

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.12, 0.68, 0.16),
    "blue": (0.12, 0.26, 0.92),
    "yellow": (0.96, 0.86, 0.10),
    "orange": (1.00, 0.52, 0.02),
    "purple": (0.56, 0.16, 0.76),
    "white": (0.92, 0.92, 0.92),   # below 1.0 so that even its lit side stays distinguishable from the background
    "black": (0.08, 0.08, 0.08),
}
COLOR_NAMES = tuple(COLORS)


# --------------------------------------------------------------------------------------- unit-scale shape SDFs
# Each takes points [..., 3] in the object's own frame and returns signed distances [...] (negative inside).  All
# are exact distances except the octahedron's, which is a lower bound (sphere tracing stays safe with a bound).

def _sphere(p: torch.Tensor) -> torch.Tensor:
    return p.norm(dim=-1) - 0.9


def _cube(p: torch.Tensor) -> torch.Tensor:
    half, rounding = 0.58, 0.06   # slightly rounded edges read better at 32 px and keep the corners inside 0.96
    q = p.abs() - (half - rounding)
    return q.clamp_min(0).norm(dim=-1) + q.max(dim=-1).values.clamp_max(0) - rounding


def _cylinder(p: torch.Tensor) -> torch.Tensor:
    radius, half_height = 0.62, 0.68
    d = torch.stack([p[..., :2].norm(dim=-1) - radius, p[..., 2].abs() - half_height], -1)
    return d.clamp_min(0).norm(dim=-1) + d.max(dim=-1).values.clamp_max(0)


def _segment_distance(q: torch.Tensor, a: Sequence[float], b: Sequence[float]) -> torch.Tensor:
    """Distance from 2D points q [..., 2] to the segment a–b."""
    a_t = q.new_tensor(a)
    ab = q.new_tensor(b) - a_t
    h = (((q - a_t) * ab).sum(-1) / (ab * ab).sum()).clamp(0, 1)
    return (q - a_t - h[..., None] * ab).norm(dim=-1)


def _cone(p: torch.Tensor) -> torch.Tensor:
    """Upright cone, apex up: the solid of revolution of the triangle (0, z_base)–(r_base, z_base)–(0, z_apex)."""
    apex, base_z, base_r = 0.85, -0.6, 0.72
    q = torch.stack([p[..., :2].norm(dim=-1), p[..., 2]], -1)   # (distance from the axis, height)
    distance = torch.minimum(_segment_distance(q, (0.0, base_z), (base_r, base_z)),
                             _segment_distance(q, (base_r, base_z), (0.0, apex)))
    inside = (q[..., 1] > base_z) & (q[..., 0] < base_r * (apex - q[..., 1]) / (apex - base_z))
    return torch.where(inside, -distance, distance)


def _torus(p: torch.Tensor) -> torch.Tensor:
    """A ring lying flat (axis z): the hole shows from the usual elevated cameras."""
    major, minor = 0.62, 0.3
    q = torch.stack([p[..., :2].norm(dim=-1) - major, p[..., 2]], -1)
    return q.norm(dim=-1) - minor


def _octahedron(p: torch.Tensor) -> torch.Tensor:
    return (p.abs().sum(-1) - 0.95) * (1.0 / math.sqrt(3.0))


SHAPES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone, "torus": _torus,
    "octahedron": _octahedron,
}
SHAPE_NAMES = tuple(SHAPES)


# ---------------------------------------------------------------------------------------------------- objects
@dataclass
class Objects:
    """B object instances: shape index [B] (into SHAPE_NAMES), albedo [B, 3], size [B], yaw in radians [B]."""

    shape: torch.Tensor
    albedo: torch.Tensor
    size: torch.Tensor
    yaw: torch.Tensor

    def __len__(self) -> int:
        return int(self.shape.shape[0])


def sample_objects(batch: int, generator: Optional[torch.Generator] = None) -> tuple[Objects, torch.Tensor]:
    """(B random instances, their color indices [B]): shape and color uniform, size in SIZE_RANGE, yaw uniform."""
    shape = torch.randint(len(SHAPE_NAMES), (batch,), generator=generator)
    color = torch.randint(len(COLOR_NAMES), (batch,), generator=generator)
    size = torch.rand(batch, generator=generator) * (SIZE_RANGE[1] - SIZE_RANGE[0]) + SIZE_RANGE[0]
    yaw = torch.rand(batch, generator=generator) * (2 * math.pi)
    jitter = (torch.rand(batch, 3, generator=generator) * 2 - 1) * COLOR_JITTER
    albedo = (color_table()[color] + jitter).clamp(0, 1)
    return Objects(shape, albedo, size, yaw), color


def color_table() -> torch.Tensor:
    """[len(COLORS), 3] albedos in COLOR_NAMES order."""
    return torch.tensor([COLORS[name] for name in COLOR_NAMES], dtype=torch.float32)


def named_objects(shape: Union[str, int], color: Union[str, int], batch: int, size: float = 0.5,
                  yaw: float = 0.0) -> Objects:
    """B copies of one (shape, color) instance with no jitter: what later metrics compare a generation against."""
    shape_index = SHAPE_NAMES.index(shape) if isinstance(shape, str) else int(shape)
    color_index = COLOR_NAMES.index(color) if isinstance(color, str) else int(color)
    return Objects(shape=torch.full((batch,), shape_index, dtype=torch.long),
                   albedo=color_table()[color_index].expand(batch, 3).clone(),
                   size=torch.full((batch,), float(size)), yaw=torch.full((batch,), float(yaw)))


def object_sdf(points: torch.Tensor, objects: Objects) -> torch.Tensor:
    """Signed distances [B, N] of world points [B, N, 3], object b for row b (scaled and turned by yaw)."""
    c, s = torch.cos(-objects.yaw)[:, None], torch.sin(-objects.yaw)[:, None]   # world → object: turn by −yaw
    x, y = points[..., 0], points[..., 1]
    local = torch.stack([c * x - s * y, s * x + c * y, points[..., 2]], -1) / objects.size[:, None, None]
    out = torch.empty(points.shape[:2], dtype=points.dtype)
    for index, sdf in enumerate(SHAPES.values()):
        rows = objects.shape == index
        if rows.any():
            out[rows] = sdf(local[rows])
    return out * objects.size[:, None]


# -------------------------------------------------------------------------------------------- sphere tracing
def _trace(origins: torch.Tensor, directions: torch.Tensor, objects: Objects, iterations: int = 48
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hit [B, N] bool, hit points [B, N, 3]) of rays [B, N, 3], starting where each enters the bounding sphere."""
    # ray–sphere: |o + t d|² = R², d unit
    b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - BOUNDING_RADIUS ** 2
    disc = b * b - c
    enters = disc > 0
    root = disc.clamp_min(0).sqrt()
    t = (-b - root).clamp_min(0)
    t_far = -b + root
    for _ in range(iterations):
        # 0.9: a margin for the octahedron's bound and for the union of rounding errors near grazing hits
        t = t + 0.9 * object_sdf(origins + t[..., None] * directions, objects)
    points = origins + t[..., None] * directions
    hit = enters & (t < t_far) & (object_sdf(points, objects).abs() < 2e-3)
    return hit, points


def _normals(points: torch.Tensor, objects: Objects, eps: float = 1e-3) -> torch.Tensor:
    """Unit normals [B, N, 3]: the SDF's gradient by central differences."""
    offsets = torch.eye(3, dtype=points.dtype) * eps
    grad = torch.stack([object_sdf(points + o, objects) - object_sdf(points - o, objects) for o in offsets], -1)
    return F.normalize(grad, dim=-1)


def render(objects: Objects, cameras: CameraBatch, supersample: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(rgb [B, 3, H, W] in [0, 1] over BACKGROUND, coverage [B, 1, H, W] in [0, 1]) of object b seen by camera b.

    H, W are the cameras' image size; ``supersample`` × ``supersample`` rays per pixel are averaged (anti-aliasing).
    """
    if len(objects) != cameras.batch_size:
        raise ValueError(f"{len(objects)} objects but {cameras.batch_size} cameras; pass one camera per object")
    h, w = cameras.height * supersample, cameras.width * supersample
    cams = cameras.to(dtype=torch.float32)
    origins, directions = (r.reshape(len(objects), h * w, 3) for r in cams.rays(h, w))
    hit, points = _trace(origins, directions, objects)
    light = F.normalize(torch.tensor(LIGHT_DIRECTION, dtype=torch.float32), dim=0)
    lambert = (_normals(points, objects) @ light).clamp_min(0)
    shade = (AMBIENT + DIFFUSE * lambert)[..., None] * objects.albedo[:, None, :]
    background = torch.tensor(BACKGROUND, dtype=torch.float32)
    coverage = hit.float()[..., None]
    rgb = coverage * shade + (1 - coverage) * background

    def to_image(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(objects), h, w, -1).permute(0, 3, 1, 2)
        return F.avg_pool2d(x, supersample) if supersample > 1 else x

    return to_image(rgb).clamp(0, 1), to_image(coverage)


def silhouette(objects: Objects, cameras: CameraBatch, supersample: int = 2, threshold: float = 0.5
               ) -> torch.Tensor:
    """Ground-truth silhouette masks [B, H, W] (bool: a pixel is object when more than ``threshold`` of it is)."""
    _, coverage = render(objects, cameras, supersample)
    return coverage[:, 0] > threshold


def render_named(shape: Union[str, int], color: Union[str, int], cameras: CameraBatch, size: float = 0.5,
                 yaw: float = 0.0, supersample: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(rgb [B, 3, H, W], coverage [B, 1, H, W]) of one jitter-free (shape, color) instance from every camera."""
    return render(named_objects(shape, color, cameras.batch_size, size, yaw), cameras, supersample)
