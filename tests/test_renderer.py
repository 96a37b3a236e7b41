"""Volume renderer: analytic checks on constant-density balls, gradients, the occupancy grid, shapes and validation."""
import math

import pytest
import torch
from torch import nn

from l2vsd_core.scene.cameras import CameraBatch
from l2vsd_core.scene.renderer import Field, OccupancyGrid, VolumeRenderer

D = torch.float64


class Ball(nn.Module):
    """σ inside the ball |x − center| < r, exactly 0 outside; constant colour; outward normals.  Counts its points."""

    def __init__(self, r=0.45, sigma=2.0, color=(0.2, 0.5, 0.8), center=(0.0, 0.0, 0.0), learnable=False):
        super().__init__()
        self.r = r
        s = torch.tensor(float(sigma), dtype=D)
        c = torch.tensor(color, dtype=D)
        self.sigma = nn.Parameter(s) if learnable else s
        self.color = nn.Parameter(c) if learnable else c
        self.register_buffer("center", torch.tensor(center, dtype=D))
        self.points_seen = 0

    def density(self, points):
        inside = (points - self.center).norm(dim=-1) < self.r
        return torch.where(inside, self.sigma.expand(points.shape[0]), torch.zeros((), dtype=points.dtype))

    def forward(self, points, directions):
        self.points_seen += points.shape[0]
        rel = points - self.center
        return {"density": self.density(points), "rgb": self.color.expand(points.shape[0], 3),
                "normal": rel / rel.norm(dim=-1, keepdim=True).clamp_min(1e-12)}


def rays_along_x(offsets, x0=-3.0):
    """Rays from (x0, b, 0) along +x for each offset b."""
    b = torch.as_tensor(offsets, dtype=D)
    o = torch.stack([torch.full_like(b, x0), b, torch.zeros_like(b)], -1)
    d = torch.tensor([1.0, 0.0, 0.0], dtype=D).expand_as(o).clone()
    return o, d


def test_field_protocol():
    assert isinstance(Ball(), Field)


def test_constant_ball_opacity_converges_to_beer_lambert():
    r, sigma = 0.45, 2.0
    field = Ball(r, sigma)
    offsets = [0.0, 0.2, 0.4]
    o, d = rays_along_x(offsets)
    expected = torch.tensor([1 - math.exp(-sigma * 2 * math.sqrt(r * r - b * b)) for b in offsets], dtype=D)
    errors = []
    for n in (16, 64, 256, 1024):
        out = VolumeRenderer(radius=1.0, num_samples_per_ray=n).eval().render(o, d, field)
        err = (out["opacity"][:, 0] - expected).abs()
        delta = 2.0 / n  # the cube's chord along x is 2
        assert (err <= sigma * delta + 1e-12).all(), (n, err)  # |Δchord| ≤ δ and |d opacity / d chord| ≤ σ
        errors.append(float(err.max()))
    assert errors[-1] < 5e-3
    assert errors[-1] < errors[0] / 4


def test_opaque_ball_depth_and_missing_rays_background():
    r = 0.45
    field = Ball(r, sigma=1e4, color=(0.9, 0.1, 0.3))
    offsets = [0.0, 0.3, 0.6, 2.0]  # last two miss the ball; 2.0 misses the cube too
    o, d = rays_along_x(offsets)
    bg = torch.tensor([0.1, 0.7, 0.2], dtype=D)
    n = 1024
    out = VolumeRenderer(radius=1.0, num_samples_per_ray=n).eval().render(o, d, field, background=bg)
    delta = 2.0 / n
    for i, b in enumerate(offsets[:2]):
        surface = 3.0 - math.sqrt(r * r - b * b)
        assert abs(float(out["opacity"][i, 0]) - 1.0) < 1e-6
        assert abs(float(out["depth"][i, 0]) - surface) <= delta
        torch.testing.assert_close(out["rgb"][i], field.color, atol=1e-6, rtol=0)
    # normal at the entry point of the central ray points back along −x
    torch.testing.assert_close(out["normal"][0], torch.tensor([-1.0, 0, 0], dtype=D), atol=5e-3, rtol=0)
    for i in (2, 3):
        assert float(out["opacity"][i, 0]) == 0.0
        torch.testing.assert_close(out["rgb"][i], bg, atol=0, rtol=0)
        assert float(out["depth"][i, 0]) == 0.0 and float(out["z_variance"][i, 0]) == 0.0


def test_callable_background_gets_directions_and_sphere_bound():
    field = Ball(0.45, sigma=0.0)
    o, d = rays_along_x([0.0, 0.5])
    for bound in ("box", "sphere"):
        out = VolumeRenderer(1.0, 32, bound=bound).eval().render(o, d, field, background=lambda dirs: dirs.abs())
        torch.testing.assert_close(out["rgb"], d.abs())
    # sphere bound: a dense ball of radius 0.9 sampled inside the unit sphere converges as well
    big = Ball(0.9, sigma=1.0)
    out = VolumeRenderer(1.0, 1024, bound="sphere").eval().render(*rays_along_x([0.0]), big)
    assert abs(float(out["opacity"][0, 0]) - (1 - math.exp(-1.8))) < 2.0 / 1024 * 1.0 + 1e-9


def test_gradients_match_finite_differences():
    field = Ball(0.45, sigma=1.5)  # plain-tensor attributes, swapped for the checked leaves below
    o, d = rays_along_x([0.0, 0.25, 0.42])
    renderer = VolumeRenderer(1.0, 64).eval()
    bg = torch.tensor([0.3, 0.3, 0.3], dtype=D)

    def f(sigma, color):
        field.sigma, field.color = sigma, color
        return renderer.render(o, d, field, background=bg)["rgb"]

    sigma = torch.tensor(1.5, dtype=D, requires_grad=True)
    color = torch.tensor([0.2, 0.5, 0.8], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(f, (sigma, color), eps=1e-6, atol=1e-8)

    # the same through a training-mode (stratified) render with a fixed generator
    renderer.train()

    def g(sigma, color):
        field.sigma, field.color = sigma, color
        gen = torch.Generator().manual_seed(0)
        return renderer.render(o, d, field, background=bg, generator=gen)["rgb"]

    assert torch.autograd.gradcheck(g, (sigma, color), eps=1e-6, atol=1e-8)


def test_occupancy_grid_skips_empty_space_without_changing_result():
    torch.manual_seed(0)
    field = Ball(0.45, sigma=5.0, center=(0.1, -0.05, 0.0))
    cam = CameraBatch.from_spherical([10.0, 40.0], [0.0, 120.0], 1.5, 60.0, width=16, height=16, dtype=D)
    plain = VolumeRenderer(1.0, 128).eval()
    ref = plain.render_camera(cam, field, background=0.5)
    seen_plain = field.points_seen

    grid = OccupancyGrid(radius=1.0, resolution=32, dilation=1)
    assert grid.binary.all()  # warm-up: everything occupied
    skipping = VolumeRenderer(1.0, 128, occupancy_grid=grid).eval()
    field.points_seen = 0
    warm = skipping.render_camera(cam, field, background=0.5)
    assert field.points_seen == seen_plain
    torch.testing.assert_close(warm["rgb"], ref["rgb"], atol=0, rtol=0)

    gen = torch.Generator().manual_seed(1)
    updated = [grid.maybe_update(step, field, gen) for step in range(0, 64)]
    assert sum(updated) == 4 and int(grid.num_updates) == 4
    assert 0.0 < grid.occupancy_fraction < 0.2
    field.points_seen = 0
    out = skipping.render_camera(cam, field, background=0.5)
    assert field.points_seen < seen_plain / 3
    assert int(out["num_evaluated"]) == field.points_seen
    for key in ("rgb", "opacity", "depth", "z_variance", "normal"):
        torch.testing.assert_close(out[key], ref[key], atol=1e-6, rtol=0)
    # the grid points at the ball: its centre cell is occupied, a far corner is not
    pts = torch.tensor([[0.1, -0.05, 0.0], [0.95, 0.95, 0.95]], dtype=D)
    assert grid.occupied(pts).tolist() == [True, False]


def test_occupancy_grid_ema_forgets_a_moved_object():
    field = Ball(0.3, sigma=10.0)
    grid = OccupancyGrid(radius=1.0, resolution=16, decay=0.5, threshold=0.01, render_step_size=0.01)
    gen = torch.Generator().manual_seed(0)
    grid.update(field, gen)
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]], dtype=D)
    assert grid.occupied(pts).tolist() == [True, False]
    field.center = pts[1].clone()
    grid.update(field, gen)
    assert grid.occupied(pts).tolist() == [True, True]  # EMA = max(decay · old, new): the old cell lingers
    for _ in range(6):  # 0.1 · 0.5^k falls below min(threshold, mean EMA) ≈ 0.006
        grid.update(field, gen)
    assert grid.occupied(pts).tolist() == [False, True]


def test_alpha_threshold_and_early_stop_prune_with_small_error():
    field = Ball(0.45, sigma=50.0)
    o, d = rays_along_x([0.0, 0.2, 0.449, 0.6])
    exact = VolumeRenderer(1.0, 256).eval().render(o, d, field, background=0.5)
    seen = field.points_seen
    field.points_seen = 0
    pruned = VolumeRenderer(1.0, 256, alpha_threshold=0.01, early_stop_eps=1e-4).eval()
    out = pruned.render(o, d, field, background=0.5)
    assert int(out["num_evaluated"]) < seen / 4  # only the first few samples past each entry point
    for key in ("rgb", "opacity", "depth"):
        torch.testing.assert_close(out[key], exact[key], atol=2e-3, rtol=0)


def test_z_variance_opaque_vs_diffuse():
    o, d = rays_along_x([0.0])
    n = 512
    renderer = VolumeRenderer(1.0, n).eval()
    opaque = renderer.render(o, d, Ball(0.45, sigma=1e4))
    diffuse = renderer.render(o, d, Ball(0.45, sigma=0.05))
    assert float(opaque["z_variance"][0, 0]) < (2.0 / n) ** 2
    # nearly uniform weights over the chord 0.9: variance ≈ 0.9² / 12
    assert abs(float(diffuse["z_variance"][0, 0]) - 0.9 ** 2 / 12) < 3e-3


def test_render_camera_shapes_full_and_low_resolution_and_chunking():
    field = Ball(0.45, sigma=3.0)
    cam = CameraBatch.from_spherical([0.0, 20.0], [0.0, 90.0], 1.5, 70.0, width=12, height=10, dtype=D)
    renderer = VolumeRenderer(1.0, 32, chunk_size=37).train()  # chunk size not dividing the ray count
    gen = torch.Generator().manual_seed(0)
    full = renderer.render_camera(cam, field, background=torch.ones(3, dtype=D), generator=gen)
    low = renderer.render_camera(cam, field, height=5, width=6, generator=gen)
    for out, (h, w) in ((full, (10, 12)), (low, (5, 6))):
        assert out["rgb"].shape == (2, h, w, 3) and out["normal"].shape == (2, h, w, 3)
        for key in ("opacity", "depth", "z_variance"):
            assert out[key].shape == (2, h, w, 1)
        assert out["weights"].shape == (2, h, w, 32)
        assert torch.isfinite(out["rgb"]).all()
    # a chunk whose rays all miss still gets (zero) normals when other chunks have them
    o, d = rays_along_x([0.0, 2.0, 2.0, 2.0])
    mixed = VolumeRenderer(1.0, 16, chunk_size=1).eval().render(o, d, field)
    assert mixed["normal"].shape == (4, 3) and torch.equal(mixed["normal"][1:], torch.zeros(3, 3, dtype=D))
    # chunking changes nothing at eval
    renderer.eval()
    a = renderer.render_camera(cam, field)
    b = VolumeRenderer(1.0, 32, chunk_size=10_000).eval().render_camera(cam, field)
    torch.testing.assert_close(a["rgb"], b["rgb"], atol=1e-12, rtol=0)
    # eval is deterministic; training jitter changes the samples
    torch.testing.assert_close(renderer.render_camera(cam, field)["t"], a["t"], atol=0, rtol=0)
    renderer.train()
    assert not torch.equal(renderer.render_camera(cam, field)["t"], a["t"])


def test_background_called_once_on_the_image_shape_despite_chunking():
    calls = []

    def background(dirs, generator=None):
        calls.append((tuple(dirs.shape), generator))
        return torch.rand(dirs.shape[0], 1, 1, 3, generator=generator, dtype=dirs.dtype)  # one colour per image

    cam = CameraBatch.from_spherical([0.0, 20.0], [0.0, 90.0], 1.5, 70.0, width=8, height=6, dtype=D)
    gen = torch.Generator().manual_seed(0)
    out = VolumeRenderer(1.0, 8, chunk_size=5).eval().render_camera(cam, Ball(0.45, sigma=0.0), background,
                                                                      generator=gen)
    assert calls == [((2, 6, 8, 3), gen)]
    for b in range(2):  # empty field: every pixel of image b shows that image's single colour
        assert torch.equal(out["rgb"][b], out["rgb"][b, :1, :1].expand(6, 8, 3))


@pytest.mark.parametrize("kwargs, name", [
    ({"radius": 0.0}, "radius"), ({"radius": -1.0}, "radius"), ({"num_samples_per_ray": 0}, "num_samples_per_ray"),
    ({"num_samples_per_ray": 2.5}, "num_samples_per_ray"), ({"bound": "cone"}, "bound"),
    ({"near_plane": -1.0}, "near_plane"), ({"chunk_size": 0}, "chunk_size"),
    ({"occupancy_grid": "yes"}, "occupancy_grid"), ({"alpha_threshold": 1.0}, "alpha_threshold"),
    ({"early_stop_eps": -0.1}, "early_stop_eps"),
])
def test_renderer_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VolumeRenderer(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"radius": 0.0}, "radius"), ({"resolution": 0}, "resolution"), ({"decay": 1.0}, "decay"),
    ({"threshold": -1.0}, "threshold"), ({"update_every_n_steps": 0}, "update_every_n_steps"),
    ({"dilation": -1}, "dilation"),
])
def test_grid_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        OccupancyGrid(**kwargs)


def test_bad_rays():
    renderer = VolumeRenderer(1.0, 8)
    field = Ball()
    o, d = rays_along_x([0.0, 0.1])
    with pytest.raises(ValueError, match="rays_d"):
        renderer.render(o, d[:1], field)
    with pytest.raises(ValueError, match="rays_o"):
        renderer.render(o[:, :2], d[:, :2], field)
    with pytest.raises(ValueError, match="background"):
        renderer.render(o, d, field, background=torch.ones(4, dtype=D))


def test_orientation_term_is_weighted_back_facing_normals():
    """``orient`` = Σ_i sg(w_i)·max(0, n_i·d)² per ray, checked against the ball's geometric normals at the samples;
    an opaque ball shows only its front (normals face the camera): ≈ 0."""
    field = Ball(r=0.45, sigma=2.0)
    o, d = rays_along_x([0.0, 0.2, 0.6])  # through the centre, off-centre, a miss
    out = VolumeRenderer(radius=1.0, num_samples_per_ray=256).eval().render(o, d, field)
    points = o[:, None, :] + d[:, None, :] * out["t"][..., None]
    normals = points / points.norm(dim=-1, keepdim=True)
    expected = (out["weights"] * (normals * d[:, None, :]).sum(-1).clamp_min(0) ** 2).sum(-1, keepdim=True)
    torch.testing.assert_close(out["orient"], expected, atol=1e-9, rtol=1e-9)
    assert float(out["orient"][0]) > 0.05 and float(out["orient"][2]) == 0.0  # semi-transparent: the back shows
    opaque = VolumeRenderer(radius=1.0, num_samples_per_ray=1024).eval().render(o, d, Ball(r=0.45, sigma=1e4))
    assert float(opaque["orient"].max()) < 1e-3
    # no gradient through the weights (threestudio detaches them): only normals are pushed, and this ball's normals
    # do not depend on its (learnable) density
    learn = Ball(r=0.45, sigma=2.0, learnable=True)
    learned = VolumeRenderer(radius=1.0, num_samples_per_ray=64).eval().render(o, d, learn)
    assert learned["opacity"].requires_grad and not learned["orient"].requires_grad
