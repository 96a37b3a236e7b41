"""Cameras: look-at matrices, rays, projection, the random sampler (threestudio's collate) and the orbit."""
import math

import pytest
import torch

from l2vsd_core.prompts import view_direction
from l2vsd_core.scene.cameras import CameraBatch, RandomCameraSampler, orbit_cameras, spherical_from_position

D = torch.float64


def grid_cameras(width=9, height=7):
    e = torch.tensor([-90.0, -60.0, -10.0, 0.0, 15.0, 45.0, 89.9, 90.0])
    a = torch.tensor([-180.0, -135.0, -90.0, -30.0, 0.0, 30.0, 90.0, 170.0])
    ee, aa = torch.meshgrid(e, a, indexing="ij")
    n = ee.numel()
    dist = torch.linspace(0.5, 3.0, n)
    fovy = torch.linspace(20.0, 120.0, n)
    return CameraBatch.from_spherical(ee.reshape(-1), aa.reshape(-1), dist, fovy, width, height, dtype=D)


def test_c2w_is_rigid_with_position_and_last_row():
    cam = grid_cameras()
    r = cam.c2w[:, :3, :3]
    eye = torch.eye(3, dtype=D).expand_as(r)
    assert torch.isfinite(cam.c2w).all()
    torch.testing.assert_close(r.transpose(1, 2) @ r, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(len(cam), dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(cam.c2w[:, 3], torch.tensor([0, 0, 0, 1], dtype=D).expand(len(cam), 4))
    torch.testing.assert_close(cam.c2w[:, :3, 3], cam.position)
    torch.testing.assert_close(cam.position.norm(dim=-1), cam.distance)
    torch.testing.assert_close(cam.w2c() @ cam.c2w, torch.eye(4, dtype=D).expand(len(cam), 4, 4), atol=1e-12,
                               rtol=0)


def test_position_formula_and_looks_at_origin_with_z_up():
    cam = grid_cameras()
    e, a, d = torch.deg2rad(cam.elevation_deg), torch.deg2rad(cam.azimuth_deg), cam.distance
    expected = d[:, None] * torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], -1)
    torch.testing.assert_close(cam.position, expected)
    forward = -cam.c2w[:, :3, 2]  # the camera looks down its −z
    to_origin = -cam.position / cam.position.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(forward, to_origin, atol=1e-12, rtol=0)
    # +y of the camera is "up": it has a non-negative world-z component, and right is horizontal.
    assert (cam.c2w[:, 2, 1] >= -1e-12).all()
    torch.testing.assert_close(cam.c2w[:, 2, 0], torch.zeros(len(cam), dtype=D), atol=1e-12, rtol=0)


def test_elevation_azimuth_round_trip():
    cam = grid_cameras()
    e, a, d = spherical_from_position(cam.position)
    torch.testing.assert_close(e, cam.elevation_deg, atol=1e-6, rtol=0)
    torch.testing.assert_close(d, cam.distance)
    off_pole = cam.elevation_deg.abs() < 90
    wrapped = torch.remainder(cam.azimuth_deg + 180.0, 360.0) - 180.0  # −180 ↔ 180 are the same azimuth
    diff = torch.remainder(a - wrapped + 180.0, 360.0) - 180.0
    assert diff[off_pole].abs().max() < 1e-9


def test_degenerate_vertical_cameras_are_finite_and_continuous():
    for elev in (90.0, -90.0):
        cam = CameraBatch.from_spherical(elev, [0.0, 37.0, -120.0], 1.5, 60.0, dtype=D)
        near = CameraBatch.from_spherical(elev - math.copysign(1e-6, elev), [0.0, 37.0, -120.0], 1.5, 60.0,
                                          dtype=D)
        assert torch.isfinite(cam.c2w).all() and torch.isfinite(cam.mvp()).all()
        _, d = cam.rays(5, 5)
        assert torch.isfinite(d).all()
        torch.testing.assert_close(cam.c2w, near.c2w, atol=1e-6, rtol=0)
        torch.testing.assert_close(-cam.c2w[:, :3, 2], torch.tensor([0.0, 0.0, -math.copysign(1, elev)],
                                                                     dtype=D).expand(3, 3), atol=1e-12, rtol=0)


def test_front_is_azimuth_zero_as_the_prompt_processor_says():
    """Azimuth 0: the camera is on +x looking along −x; the prompts call it front, ±180 back, ±90 side."""
    cam = CameraBatch.from_spherical(0.0, [0.0, 180.0, 90.0, -90.0], 1.0, 60.0, dtype=D)
    torch.testing.assert_close(cam.position[0], torch.tensor([1.0, 0.0, 0.0], dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(-cam.c2w[0, :3, 2], torch.tensor([-1.0, 0.0, 0.0], dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(cam.position[1], torch.tensor([-1.0, 0.0, 0.0], dtype=D), atol=1e-12, rtol=0)
    names = [view_direction(e, a, 30.0, 30.0) for e, a in zip(cam.elevation_deg.tolist(), cam.azimuth_deg.tolist())]
    assert names == ["front", "back", "side", "side"]
    # Front camera: image right is world +y, image up is world +z.
    torch.testing.assert_close(cam.c2w[0, :3, 0], torch.tensor([0.0, 1.0, 0.0], dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(cam.c2w[0, :3, 1], torch.tensor([0.0, 0.0, 1.0], dtype=D), atol=1e-12, rtol=0)


def test_rays_center_corners_and_unit_length():
    h, w = 33, 47
    cam = grid_cameras(width=w, height=h)
    o, d = cam.rays()
    assert o.shape == d.shape == (len(cam), h, w, 3)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(len(cam), h, w, dtype=D))
    torch.testing.assert_close(o, cam.position[:, None, None].expand_as(o))
    forward = -cam.c2w[:, :3, 2]
    torch.testing.assert_close(d[:, h // 2, w // 2], forward, atol=1e-12, rtol=0)  # odd sizes: a center pixel
    half = torch.deg2rad(cam.fovy_deg) / 2
    f = cam.focal()
    torch.testing.assert_close(f, 0.5 * h / torch.tan(half))
    # Top-middle pixel center: angle atan((H/2 − 0.5)/f) above the axis; the image edge itself is at fovy/2.
    cos_top = (d[:, 0, w // 2] * forward).sum(-1)
    torch.testing.assert_close(torch.acos(cos_top), torch.atan((h / 2 - 0.5) / f))
    edge_angle = torch.atan((h / 2) / f)
    torch.testing.assert_close(edge_angle, half)
    assert ((d[:, 0, w // 2] - forward) * cam.c2w[:, :3, 1]).sum(-1).gt(0).all()  # row 0 is the top (+y)
    assert ((d[:, h // 2, -1] - forward) * cam.c2w[:, :3, 0]).sum(-1).gt(0).all()  # last column is the right
    # Corner pixel: camera-space direction ((W/2−.5)/f, (H/2−.5)/f, −1).
    cx, cy = (w / 2 - 0.5) / f, (h / 2 - 0.5) / f
    cos_corner = (d[:, 0, 0] * forward).sum(-1)
    torch.testing.assert_close(cos_corner, 1 / torch.sqrt(1 + cx ** 2 + cy ** 2))
    # Other resolutions: same fov, the focal scales with the height.
    _, d2 = cam.rays(height=8, width=12)
    assert d2.shape == (len(cam), 8, 12, 3)
    torch.testing.assert_close(d2.norm(dim=-1), torch.ones(len(cam), 8, 12, dtype=D))


def test_projection_maps_frustum_corners():
    cam = CameraBatch.from_spherical([10.0, -5.0], [30.0, -170.0], [1.2, 2.0], [50.0, 70.0], 48, 32, dtype=D)
    near, far = 0.1, 10.0
    o, d = cam.rays(32, 48)
    fwd = -cam.c2w[:, :3, 2]
    for depth, ndc_z in ((near, -1.0), (far, 1.0)):
        # A point on the center ray at that depth maps to NDC (0, 0, ±1).
        p = cam.position + depth * fwd
        clip = cam.mvp(near, far) @ torch.cat([p, torch.ones(2, 1, dtype=D)], -1)[..., None]
        ndc = clip[:, :3, 0] / clip[:, 3:, 0]
        torch.testing.assert_close(ndc, torch.tensor([0.0, 0.0, ndc_z], dtype=D).expand(2, 3), atol=1e-9, rtol=0)
    # The top-right pixel center's ray lands at NDC x = 1 − 1/W, y = 1 − 1/H (and y flips with flip_y).
    p = o[:, 0, -1] + 3.0 * d[:, 0, -1]
    ph = torch.cat([p, torch.ones(2, 1, dtype=D)], -1)[..., None]
    for flip, sy in ((False, 1.0), (True, -1.0)):
        clip = cam.mvp(near, far, flip_y=flip) @ ph
        ndc = clip[:, :2, 0] / clip[:, 3:, 0]
        torch.testing.assert_close(ndc, torch.tensor([1 - 1 / 48, sy * (1 - 1 / 32)], dtype=D).expand(2, 2))
    with pytest.raises(ValueError, match="far"):
        cam.projection(1.0, 0.5)
    with pytest.raises(ValueError, match="near"):
        cam.projection(0.0, 1.0)


def test_c2w_flat_is_the_lora_camera():
    cam = RandomCameraSampler().sample(5, torch.Generator().manual_seed(0))
    flat = cam.c2w_flat()
    assert flat.shape == (5, 16) and flat.dtype == torch.float32
    torch.testing.assert_close(flat, cam.c2w.reshape(5, 16))
    # Row-major: entries 3, 7, 11 are the position, 12..15 the last row (0, 0, 0, 1).
    torch.testing.assert_close(flat[:, [3, 7, 11]], cam.position)
    torch.testing.assert_close(flat[:, 12:], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(5, 4))


def test_sampler_defaults_ranges_and_reproducibility():
    s = RandomCameraSampler()
    assert (s.camera_distance_range, s.fovy_range, s.elevation_range, s.azimuth_range) == (
        (1.0, 1.5), (40.0, 70.0), (-10.0, 45.0), (-180.0, 180.0))
    assert s.batch_uniform_azimuth and s.width == s.height == 64
    a = s.sample(64, torch.Generator().manual_seed(3))
    b = s.sample(64, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.c2w, b.c2w)
    assert a.width == a.height == 64 and a.c2w.shape == (64, 4, 4)
    g = torch.Generator().manual_seed(4)
    for _ in range(50):
        c = s.sample(16, g, dtype=D)
        assert ((c.elevation_deg >= -10) & (c.elevation_deg <= 45)).all()
        assert ((c.azimuth_deg >= -180) & (c.azimuth_deg <= 180)).all()
        assert ((c.distance >= 1.0) & (c.distance <= 1.5)).all()
        assert ((c.fovy_deg >= 40) & (c.fovy_deg <= 70)).all()
        torch.testing.assert_close(-c.c2w[:, :3, 2], -c.position / c.distance[:, None])


def _ks(samples: torch.Tensor) -> float:
    """Kolmogorov–Smirnov distance of samples in [0, 1] to U(0, 1)."""
    x, _ = torch.sort(samples)
    n = x.numel()
    k = torch.arange(1, n + 1, dtype=x.dtype)
    return float(torch.maximum(k / n - x, x - (k - 1) / n).max())


def test_elevation_branches_coin_per_batch_and_distributions():
    s = RandomCameraSampler()
    e0, e1 = s.elevation_range
    s0, s1 = math.sin(math.radians(e0)), math.sin(math.radians(e1))
    g = torch.Generator().manual_seed(11)
    flags, sphere, degree = [], [], []
    for _ in range(400):
        e, flag = s.sample_elevation(32, g)
        flags.append(flag)
        (sphere if flag else degree).append(e)
    frac = sum(flags) / len(flags)
    assert abs(frac - 0.5) < 0.1  # one coin per batch: 400 coins, sd 0.025
    sphere, degree = torch.cat(sphere), torch.cat(degree)
    # Sphere branch: sin(e) uniform on [sin e0, sin e1]; degree branch: e uniform on [e0, e1].
    u_sphere = (torch.sin(torch.deg2rad(sphere)) - s0) / (s1 - s0)
    u_degree = (degree - e0) / (e1 - e0)
    assert _ks(u_sphere) < 0.02 and _ks(u_degree) < 0.02  # n ≈ 6400: the 1% critical value is ≈ 0.02
    # …and they are distinguishable: under the sphere branch, e is not uniform in degrees.
    assert _ks((sphere - e0) / (e1 - e0)) > 0.03


def test_azimuth_stratified_one_per_stratum():
    s = RandomCameraSampler()
    g = torch.Generator().manual_seed(5)
    for batch in (1, 2, 7, 16):
        for _ in range(20):
            a = s.sample_azimuth(batch, g)
            strata = torch.floor((a + 180.0) / 360.0 * batch).long()
            assert sorted(strata.tolist()) == list(range(batch))
    # Without stratification the azimuths are i.i.d. (some batch hits a stratum twice).
    s2 = RandomCameraSampler(batch_uniform_azimuth=False, azimuth_range=(0.0, 90.0))
    hits = [torch.floor(s2.sample_azimuth(8, g) / 90.0 * 8).long() for _ in range(20)]
    assert any(len(set(h.tolist())) < 8 for h in hits)
    assert all(((h >= 0) & (h < 8)).all() for h in hits)


@pytest.mark.parametrize("kwargs, name", [
    ({"camera_distance_range": (1.5, 1.0)}, "camera_distance_range"),
    ({"camera_distance_range": (0.0, 1.0)}, "camera_distance_range"),
    ({"camera_distance_range": (-1.0, 1.0)}, "camera_distance_range"),
    ({"fovy_range": (70.0, 40.0)}, "fovy_range"),
    ({"fovy_range": (0.0, 40.0)}, "fovy_range"),
    ({"fovy_range": (40.0, 180.0)}, "fovy_range"),
    ({"elevation_range": (45.0, -10.0)}, "elevation_range"),
    ({"elevation_range": (-10.0, 91.0)}, "elevation_range"),
    ({"azimuth_range": (180.0, -180.0)}, "azimuth_range"),
    ({"azimuth_range": (0.0,)}, "azimuth_range"),
    ({"width": 0}, "width"),
    ({"height": 32.5}, "height"),
])
def test_sampler_rejects_bad_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RandomCameraSampler(**kwargs)


def test_bad_camera_inputs_name_the_argument():
    with pytest.raises(ValueError, match="batch"):
        RandomCameraSampler().sample(0)
    with pytest.raises(ValueError, match="distance"):
        CameraBatch.from_spherical(0.0, 0.0, 0.0, 60.0)
    with pytest.raises(ValueError, match="fovy_deg"):
        CameraBatch.from_spherical(0.0, 0.0, 1.0, 180.0)
    with pytest.raises(ValueError, match="fovy_deg"):
        CameraBatch.from_spherical(0.0, 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="elevation_deg"):
        CameraBatch.from_spherical(95.0, 0.0, 1.0, 60.0)
    with pytest.raises(ValueError, match="elevation_deg must be one value or 3 values"):
        CameraBatch.from_spherical([0.0, 1.0], [0.0, 1.0, 2.0], 1.0, 60.0)
    with pytest.raises(ValueError, match="azimuth_deg"):
        CameraBatch.from_spherical(0.0, float("nan"), 1.0, 60.0)
    with pytest.raises(ValueError, match="n_views"):
        orbit_cameras(0)
    with pytest.raises(ValueError, match="height"):
        orbit_cameras(4).rays(height=0)


def test_orbit_count_spacing_and_defaults():
    cam = orbit_cameras(dtype=D)
    assert len(cam) == 120 and cam.width == cam.height == 64
    torch.testing.assert_close(cam.azimuth_deg, -180.0 + 3.0 * torch.arange(120, dtype=D))
    torch.testing.assert_close(cam.elevation_deg, torch.full((120,), 15.0, dtype=D))
    torch.testing.assert_close(cam.distance, torch.full((120,), 1.5, dtype=D))
    torch.testing.assert_close(cam.fovy_deg, torch.full((120,), 70.0, dtype=D))
    assert view_direction(15.0, float(cam.azimuth_deg[60])) == "front"
    assert view_direction(15.0, float(cam.azimuth_deg[0])) == "back"
    # Consecutive cameras are 3° apart on the horizontal circle, wrapping round.
    xy = cam.position[:, :2] / cam.position[:, :2].norm(dim=-1, keepdim=True)
    cosines = (xy * xy.roll(-1, 0)).sum(-1)
    torch.testing.assert_close(cosines, torch.full((120,), math.cos(math.radians(3.0)), dtype=D))
    other = orbit_cameras(8, elevation_deg=30.0, distance=2.0, fovy_deg=45.0, width=32, height=16,
                          start_azimuth_deg=0.0)
    assert len(other) == 8 and (other.width, other.height) == (32, 16)
    torch.testing.assert_close(other.azimuth_deg, 45.0 * torch.arange(8, dtype=torch.float32))
