"""Cameras for stage 1: a batch of look-at cameras, the random training sampler and the evaluation orbit.

Conventions (threestudio's, checked in ``tests/test_cameras.py``):

- **World**: right-handed, z up.  A camera at (elevation e, azimuth a, distance d), angles in degrees, sits at
  ``x = d·cos e·cos a``, ``y = d·cos e·sin a``, ``z = d·sin e`` and looks at the origin.
- **Camera** (OpenGL): it looks down its own −z, +y is up on the image, +x is right.  ``c2w[:, :3, :3]`` has columns
  (right, up, −look) and ``c2w[:, :3, 3]`` is the position; the last row is (0, 0, 0, 1).  For ``cos e > 0`` the right
  vector is ``(−sin a, cos a, 0)`` (= look × z, what threestudio computes).  We build it from the azimuth directly,
  so straight up/down (e = ±90°, where look × z vanishes) stays finite and is the limit of nearby cameras.
- **Front**: azimuth 0 puts the camera on +x, looking along −x; this is the view that
  :func:`l2vsd_core.prompts.view_direction` calls ``"front"`` (|azimuth| < front threshold), ±180 (camera on −x) is
  ``"back"`` and ±90 (camera on ±y) is ``"side"``.  So the object's front faces +x, as in threestudio.
- **Rays**: pixel (i, j), column i, row j from the top, has its center at (i + 0.5, j + 0.5); its camera-space
  direction is ``((i + 0.5 − W/2)/f, −(j + 0.5 − H/2)/f, −1)`` with ``f = H / (2·tan(fovy/2))`` (square pixels, so
  the horizontal fov follows from the aspect ratio).  Directions are returned unit length in world space.
- **LoRA camera**: :meth:`CameraBatch.c2w_flat` is ``c2w.reshape(B, 16)`` (row-major), what
  :class:`l2vsd_core.score.LoRAScore` (threestudio's ``camera_embedding``) reads.
- **Projection**: :meth:`CameraBatch.projection` is the standard OpenGL perspective matrix (NDC y up).  threestudio
  hands nvdiffrast a y-flipped one (``proj[1, 1] = −1/tan(fovy/2)``) so that image row 0 is the top, matching the
  rays; pass ``flip_y=True`` for that.

The random sampler follows threestudio's ``RandomCameraIterableDataset.collate`` (``data/uncond.py``) with the
ProlificDreamer stage-1 ranges; light sampling and the perturbations (all 0 there) are not implemented.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["CameraBatch", "RandomCameraSampler", "orbit_cameras", "look_at_c2w", "spherical_from_position"]


def _require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def _check_size(name: str, value) -> int:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "a positive int")
    return value


def _check_range(name: str, value, lo: float = -math.inf, hi: float = math.inf, open_lo: bool = False,
                 open_hi: bool = False) -> Tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (min, max) of numbers; got {value!r}") from None
    _require(math.isfinite(a) and math.isfinite(b), name, value, "finite")
    _require(a <= b, name, value, "a range with min <= max")
    ok_lo = (a > lo) if open_lo else (a >= lo)
    ok_hi = (b < hi) if open_hi else (b <= hi)
    interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
    _require(ok_lo and ok_hi, name, value, f"a range inside {interval}")
    return a, b


def _as_batch(name: str, value, batch: Optional[int], dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype).reshape(-1)
    if batch is not None and t.numel() == 1:
        t = t.expand(batch).clone()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite; got {value!r}")
    return t


def look_at_c2w(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """[B, 4, 4] camera-to-world matrices of cameras on the sphere looking at the origin, world up +z (see module)."""
    e, a = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    ce, se, ca, sa = torch.cos(e), torch.sin(e), torch.cos(a), torch.sin(a)
    position = distance[:, None] * torch.stack([ce * ca, ce * sa, se], -1)
    look = -torch.stack([ce * ca, ce * sa, se], -1)  # unit, from the camera to the origin
    right = torch.stack([-sa, ca, torch.zeros_like(sa)], -1)  # = normalize(look × z) whenever cos e > 0
    up = torch.linalg.cross(right, look, dim=-1)  # unit: right ⟂ look, both unit
    c2w = torch.zeros(e.shape[0], 4, 4, dtype=e.dtype, device=e.device)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, -look, position
    c2w[:, 3, 3] = 1.0
    return c2w


def spherical_from_position(position: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(elevation_deg, azimuth_deg in (−180, 180], distance) of [B, 3] positions; the inverse of the module's map."""
    distance = position.norm(dim=-1)
    elevation = torch.rad2deg(torch.asin((position[..., 2] / distance.clamp_min(1e-12)).clamp(-1.0, 1.0)))
    azimuth = torch.rad2deg(torch.atan2(position[..., 1], position[..., 0]))
    return elevation, azimuth, distance


@dataclass
class CameraBatch:
    """B pinhole cameras (angles in degrees) sharing one image size; see the module docstring for conventions."""

    c2w: torch.Tensor  # [B, 4, 4]
    position: torch.Tensor  # [B, 3]
    elevation_deg: torch.Tensor  # [B]
    azimuth_deg: torch.Tensor  # [B]
    distance: torch.Tensor  # [B]
    fovy_deg: torch.Tensor  # [B]
    width: int
    height: int

    @classmethod
    def from_spherical(cls, elevation_deg, azimuth_deg, distance, fovy_deg, width: int = 64, height: int = 64,
                       dtype: torch.dtype = torch.float32, device=None) -> "CameraBatch":
        """Cameras looking at the origin.  Each argument is B values or one value (broadcast to B)."""
        _check_size("width", width)
        _check_size("height", height)
        args = {"elevation_deg": elevation_deg, "azimuth_deg": azimuth_deg, "distance": distance,
                "fovy_deg": fovy_deg}
        ts = {k: _as_batch(k, v, None, torch.float64) for k, v in args.items()}
        batch = max(t.numel() for t in ts.values())
        for k, t in ts.items():
            _require(t.numel() in (1, batch), k, args[k], f"one value or {batch} values (the batch)")
            ts[k] = t.expand(batch).clone() if t.numel() == 1 else t
        _require(bool(((ts["elevation_deg"] >= -90) & (ts["elevation_deg"] <= 90)).all()), "elevation_deg",
                 elevation_deg, "in [-90, 90] degrees")
        _require(bool((ts["distance"] > 0).all()), "distance", distance, "> 0")
        _require(bool(((ts["fovy_deg"] > 0) & (ts["fovy_deg"] < 180)).all()), "fovy_deg", fovy_deg,
                 "in (0, 180) degrees")
        c2w = look_at_c2w(ts["elevation_deg"], ts["azimuth_deg"], ts["distance"])
        out = {k: v.to(device=device, dtype=dtype) for k, v in ts.items()}
        c2w = c2w.to(device=device, dtype=dtype)
        return cls(c2w=c2w, position=c2w[:, :3, 3].clone(), width=width, height=height, **out)

    @property
    def batch_size(self) -> int:
        return self.c2w.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "CameraBatch":
        f = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return CameraBatch(f(self.c2w), f(self.position), f(self.elevation_deg), f(self.azimuth_deg),
                           f(self.distance), f(self.fovy_deg), self.width, self.height)

    def c2w_flat(self) -> torch.Tensor:
        """[B, 16]: the row-major flattened camera-to-world matrix, the LoRA's camera condition."""
        return self.c2w.reshape(self.batch_size, 16)

    def focal(self, height: Optional[int] = None) -> torch.Tensor:
        """[B] focal length in pixels for an image ``height`` rows tall (default: self.height)."""
        h = self.height if height is None else _check_size("height", height)
        return 0.5 * h / torch.tan(0.5 * torch.deg2rad(self.fovy_deg))

    def rays(self, height: Optional[int] = None, width: Optional[int] = None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(origins, directions), each [B, H, W, 3] in world space, directions unit, through the pixel centers."""
        h = self.height if height is None else _check_size("height", height)
        w = self.width if width is None else _check_size("width", width)
        dev, dt = self.c2w.device, self.c2w.dtype
        f = self.focal(h)[:, None, None]
        i = (torch.arange(w, device=dev, dtype=dt) + 0.5 - 0.5 * w)[None, None, :]
        j = (torch.arange(h, device=dev, dtype=dt) + 0.5 - 0.5 * h)[None, :, None]
        x = (i / f).expand(-1, h, w)
        y = (-j / f).expand(-1, h, w)
        d_cam = torch.stack([x, y, -torch.ones_like(x)], -1)  # [B, H, W, 3]
        d = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], d_cam)
        d = d / d.norm(dim=-1, keepdim=True)
        o = self.c2w[:, None, None, :3, 3].expand(-1, h, w, 3)
        return o, d

    def w2c(self) -> torch.Tensor:
        """[B, 4, 4] world-to-camera (view) matrices: the rigid inverse of ``c2w``."""
        r, t = self.c2w[:, :3, :3], self.c2w[:, :3, 3:]
        out = torch.zeros_like(self.c2w)
        out[:, :3, :3] = r.transpose(1, 2)
        out[:, :3, 3:] = -r.transpose(1, 2) @ t
        out[:, 3, 3] = 1.0
        return out

    def projection(self, near: float = 0.01, far: float = 100.0, flip_y: bool = False) -> torch.Tensor:
        """[B, 4, 4] OpenGL perspective matrices (clip = P · camera; NDC z in [−1, 1] from near to far)."""
        _require(isinstance(near, (int, float)) and near > 0, "near", near, "> 0")
        _require(isinstance(far, (int, float)) and far > near, "far", far, f"> near ({near})")
        t = torch.tan(0.5 * torch.deg2rad(self.fovy_deg))
        aspect = self.width / self.height
        p = torch.zeros(self.batch_size, 4, 4, dtype=self.c2w.dtype, device=self.c2w.device)
        p[:, 0, 0] = 1.0 / (aspect * t)
        p[:, 1, 1] = (-1.0 if flip_y else 1.0) / t
        p[:, 2, 2] = -(far + near) / (far - near)
        p[:, 2, 3] = -2.0 * far * near / (far - near)
        p[:, 3, 2] = -1.0
        return p

    def mvp(self, near: float = 0.01, far: float = 100.0, flip_y: bool = False) -> torch.Tensor:
        """[B, 4, 4] projection × view: world homogeneous points to clip space (for rasterizers)."""
        return self.projection(near, far, flip_y) @ self.w2c()


@dataclass
class RandomCameraSampler:
    """Random training cameras, threestudio's ``random-camera-datamodule`` with ProlificDreamer stage-1 ranges.

    Per call of :meth:`sample` (threestudio's ``collate``, one batch):

    - elevation: one fair coin **per batch** (threestudio's ``random.random() < 0.5`` in ``collate``): heads, uniform
      in degrees over ``elevation_range``; tails, uniform on the sphere band, ``asin(U·(sin e1 − sin e0) + sin e0)``;
    - azimuth: with ``batch_uniform_azimuth``, stratified: ``(U_k + k)/B`` for k = 0..B−1 spread over the range (one
      sample in each of B equal strata); otherwise i.i.d. uniform;
    - distance and fovy: i.i.d. uniform over their ranges.

    All draws come from the ``generator`` passed to :meth:`sample` (torch's CPU generator), so runs are reproducible.
    """

    camera_distance_range: Sequence[float] = (1.0, 1.5)
    fovy_range: Sequence[float] = (40.0, 70.0)
    elevation_range: Sequence[float] = (-10.0, 45.0)
    azimuth_range: Sequence[float] = (-180.0, 180.0)
    batch_uniform_azimuth: bool = True
    width: int = 64
    height: int = 64

    def __post_init__(self):
        self.camera_distance_range = _check_range("camera_distance_range", self.camera_distance_range, 0.0,
                                                  open_lo=True)
        self.fovy_range = _check_range("fovy_range", self.fovy_range, 0.0, 180.0, open_lo=True, open_hi=True)
        self.elevation_range = _check_range("elevation_range", self.elevation_range, -90.0, 90.0)
        self.azimuth_range = _check_range("azimuth_range", self.azimuth_range)
        _require(isinstance(self.batch_uniform_azimuth, bool), "batch_uniform_azimuth", self.batch_uniform_azimuth,
                 "a bool")
        _check_size("width", self.width)
        _check_size("height", self.height)

    @staticmethod
    def _uniform(n: int, lo: float, hi: float, generator: Optional[torch.Generator]) -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64) * (hi - lo) + lo

    def sample_elevation(self, batch: int, generator: Optional[torch.Generator] = None
                         ) -> Tuple[torch.Tensor, bool]:
        """([B] elevations in degrees, whether this batch took the sphere-uniform branch)."""
        e0, e1 = self.elevation_range
        sphere = bool(torch.rand((), generator=generator, dtype=torch.float64) >= 0.5)
        if not sphere:
            return self._uniform(batch, e0, e1, generator), False
        s0, s1 = math.sin(math.radians(e0)), math.sin(math.radians(e1))
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        return torch.rad2deg(torch.asin((u * (s1 - s0) + s0).clamp(-1.0, 1.0))), True

    def sample_azimuth(self, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[B] azimuths in degrees (stratified across the batch when ``batch_uniform_azimuth``)."""
        a0, a1 = self.azimuth_range
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        if self.batch_uniform_azimuth:
            u = (u + torch.arange(batch, dtype=torch.float64)) / batch
        return u * (a1 - a0) + a0

    def sample(self, batch: int = 1, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32, device=None) -> CameraBatch:
        _check_size("batch", batch)
        elevation, _ = self.sample_elevation(batch, generator)
        azimuth = self.sample_azimuth(batch, generator)
        distance = self._uniform(batch, *self.camera_distance_range, generator)
        fovy = self._uniform(batch, *self.fovy_range, generator)
        return CameraBatch.from_spherical(elevation, azimuth, distance, fovy, self.width, self.height,
                                          dtype=dtype, device=device)


def orbit_cameras(n_views: int = 120, elevation_deg: float = 15.0, distance: float = 1.5, fovy_deg: float = 70.0,
                  width: int = 64, height: int = 64, start_azimuth_deg: float = -180.0,
                  dtype: torch.dtype = torch.float32, device=None) -> CameraBatch:
    """``n_views`` cameras evenly spaced in azimuth (step 360/n) at one elevation, distance and fov: a turntable.

    Azimuths are ``start + 360·k/n`` for k = 0..n−1; the default start −180 (the back view) is threestudio's
    test set (``linspace(−180, 180, n + 1)[:n]``), so view n/2 is the front.  Defaults: ProlificDreamer's evaluation
    cameras (elevation 15°, distance 1.5, fovy 70°, 120 views).
    """
    _check_size("n_views", n_views)
    _require(isinstance(start_azimuth_deg, (int, float)) and math.isfinite(start_azimuth_deg), "start_azimuth_deg",
             start_azimuth_deg, "a finite number")
    azimuth = start_azimuth_deg + 360.0 * torch.arange(n_views, dtype=torch.float64) / n_views
    return CameraBatch.from_spherical(elevation_deg, azimuth, distance, fovy_deg, width, height, dtype=dtype,
                                      device=device)
