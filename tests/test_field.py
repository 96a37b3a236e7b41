"""Stage-1 field (ImplicitVolume) and neural environment background: blob density, normals, gradients, clamping,
random background augmentation, config validation.  Small torch hash grid for speed."""

import math

import pytest
import torch

from l2vsd_core.scene.field import (
    BackgroundConfig,
    EnvironmentBackground,
    FieldConfig,
    ImplicitVolume,
    spherical_harmonics,
)
from l2vsd_core.scene.hashgrid import HashGridConfig

SMALL_GRID = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                            per_level_scale=1.5)


def small_field(**kw) -> ImplicitVolume:
    cfg = FieldConfig(hashgrid=SMALL_GRID, backend="torch", **kw)
    return ImplicitVolume(cfg, seed=0)


def zero_outputs(field: ImplicitVolume) -> ImplicitVolume:
    """Zero the output layers: raw density 0 and features 0, so sigma is the blob alone and rgb = 0.5."""
    with torch.no_grad():
        field.density_network.output_layer.weight.zero_()
        field.feature_network.output_layer.weight.zero_()
    return field


def softplus_py(v: float) -> float:
    return math.log1p(math.exp(v)) if v < 30 else v


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def test_defaults_are_prolificdreamer_stage1():
    cfg = FieldConfig()
    assert cfg.radius == 1.0 and cfg.density_activation == "softplus" and cfg.density_bias == "blob_magic3d"
    assert cfg.density_blob_scale == 10.0 and cfg.density_blob_std == 0.5
    assert (cfg.mlp_neurons, cfg.mlp_hidden_layers, cfg.n_feature_dims) == (64, 1, 3)
    assert cfg.hashgrid == HashGridConfig()  # 16 x 2, 2^19, base 16, scale 1.4472...
    bg = BackgroundConfig()
    assert (bg.sh_degree, bg.mlp_neurons, bg.mlp_hidden_layers, bg.random_aug, bg.random_aug_prob) == (
        3, 16, 2, True, 0.5)
    f = small_field()
    linears = [m for m in f.density_network.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(64, 8), (1, 64)] and all(m.bias is None for m in linears)


def test_density_at_init_is_activated_blob():
    field = zero_outputs(small_field())
    pts = [(0.0, 0.0, 0.0), (0.25, 0.0, 0.0), (0.3, 0.4, 0.0), (0.0, -0.6, 0.8), (0.1, 0.2, -0.2)]
    expected = []
    for p in pts:
        r = math.sqrt(sum(c * c for c in p))
        expected.append(softplus_py(10.0 * (1.0 - r / 0.5)))  # Magic3D blob, scale 10, std 0.5
    x = torch.tensor(pts)
    sigma = field.density(x)
    torch.testing.assert_close(sigma, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert abs(sigma[2].item() - math.log(2.0)) < 1e-5  # ||x|| = std: bias 0, softplus(0) = ln 2
    out = field(x, torch.nn.functional.normalize(torch.randn(5, 3), dim=-1))
    torch.testing.assert_close(out["density"], sigma)
    torch.testing.assert_close(out["rgb"], torch.full((5, 3), 0.5))
    assert out["normal"].shape == (5, 3)

    # At plain init (nothing zeroed) the network's contribution is tiny: the blob dominates.
    fresh = small_field()
    torch.testing.assert_close(fresh.density(x), torch.tensor(expected), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("normal_type", ["finite_difference", "analytic"])
def test_normals_of_blob_point_outward(normal_type):
    field = zero_outputs(small_field(normal_type=normal_type)).train()
    gen = torch.Generator().manual_seed(1)
    d = torch.nn.functional.normalize(torch.randn(64, 3, generator=gen), dim=-1)
    r = 0.1 + 0.7 * torch.rand(64, 1, generator=gen)
    x = d * r  # |x| in [0.1, 0.8], at least 0.2 inside the box (finite-difference offsets are not clamped)
    n = field(x)["normal"]
    cos = (n * d).sum(-1)
    assert torch.all(cos > 1 - 1e-4), cos.min()
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(64), rtol=1e-5, atol=1e-5)
    other = "analytic" if normal_type == "finite_difference" else "finite_difference"
    assert torch.all((field.normals(x, other) * n).sum(-1) > 1 - 1e-4)


def test_scene_blob_sign_gives_inward_normals():
    """prolificdreamer-scene uses density_blob_scale -10: density grows outwards, so -grad(sigma) points in."""
    field = zero_outputs(small_field(density_blob_scale=-10.0, density_blob_std=2.5, normal_type="analytic"))
    x = torch.tensor([[0.3, 0.2, -0.4]])
    assert (field(x)["normal"] * x).sum().item() < 0


def test_gradients_reach_every_parameter_group():
    field = small_field(normal_type="analytic").train()
    gen = torch.Generator().manual_seed(2)
    x = (torch.rand(256, 3, generator=gen) * 2 - 1) * 0.9
    out = field(x)
    # A one-sample "composite": colour weighted by alpha, as a renderer would produce it.
    alpha = 1 - torch.exp(-out["density"] * 0.01)
    rgb_loss = ((alpha[:, None] * out["rgb"] - 0.3) ** 2).mean()
    normal_loss = (out["normal"][:, 2] ** 2).mean()  # analytic normals are differentiable in training
    groups = field.parameter_groups()
    assert [g["name"] for g in groups] == ["geometry.encoding", "geometry.density_network",
                                           "geometry.feature_network"]
    assert [g["lr"] for g in groups] == [0.01, 0.001, 0.001]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in field.parameters())  # each parameter exactly once
    for loss in (rgb_loss, normal_loss):
        field.zero_grad()
        loss.backward(retain_graph=True)
        for g in groups if loss is rgb_loss else groups[:2]:
            for p in g["params"]:
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, g["name"]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99), eps=1e-15)
    opt.step()


def test_points_outside_the_box_are_clamped_for_the_grid():
    field = small_field()
    outside = torch.tensor([[5.0, 5.0, 5.0], [-3.0, 0.0, 0.0], [1.0001, -1.0001, 0.5], [0.0, 0.0, 0.0]])
    clamped = outside.clamp(-1, 1)
    for nt in ("finite_difference", "analytic"):
        field.config.normal_type = nt
        out = field(outside)
        for k, v in out.items():
            assert torch.isfinite(v).all(), (nt, k)
    torch.testing.assert_close(field(outside)["rgb"], field(clamped)["rgb"])  # grid sees the clamped point
    # density: network at the clamped point, blob at the true point (keeps decaying outside the box)
    zero_outputs(field)
    r = outside.norm(dim=-1)
    torch.testing.assert_close(field.density(outside), torch.nn.functional.softplus(10 * (1 - r / 0.5)))
    # gradient at the origin (||x|| = 0) is finite
    x0 = torch.zeros(1, 3, requires_grad=True)
    field.density(x0).sum().backward()
    assert torch.isfinite(x0.grad).all()


def test_background_range_direction_dependence_and_random_aug():
    bg = EnvironmentBackground(BackgroundConfig(random_aug_prob=1.0), seed=0)
    gen = torch.Generator().manual_seed(3)
    dirs = torch.randn(2, 8, 8, 3, generator=gen)
    bg.eval()
    col = bg(dirs)
    assert col.shape == (2, 8, 8, 3) and col.min() >= 0 and col.max() <= 1
    assert col.reshape(-1, 3).std(0).max() > 1e-4  # direction-dependent
    torch.testing.assert_close(bg(dirs * 3.0), col)  # only the direction matters
    # p = 1: always a solid colour per batch item
    bg.train()
    for _ in range(5):
        aug = bg(dirs, generator=gen)
        assert aug.shape == col.shape and aug.min() >= 0 and aug.max() <= 1
        flat = aug.reshape(2, -1, 3)
        assert torch.all(flat == flat[:, :1])
    flat_rays = bg(dirs.reshape(-1, 3), generator=gen)
    assert torch.all(flat_rays == flat_rays[:1])  # [N, 3]: one colour for the whole image
    # same generator seed -> same colours
    a = bg(dirs, generator=torch.Generator().manual_seed(7))
    b = bg(dirs, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    # p = 0 (or eval mode): never
    bg0 = EnvironmentBackground(BackgroundConfig(random_aug_prob=0.0), seed=0).train()
    for _ in range(5):
        torch.testing.assert_close(bg0(dirs, generator=gen), col)
    assert [g["name"] for g in bg.parameter_groups()] == ["background"]
    # background gradients flow when not augmented
    bg0(dirs).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bg0.parameters())


def test_spherical_harmonics_are_orthonormal():
    gen = torch.Generator().manual_seed(4)
    d = torch.nn.functional.normalize(torch.randn(200000, 3, generator=gen, dtype=torch.float64), dim=-1)
    for degree in (3, 4):
        y = spherical_harmonics(d, degree)
        gram = 4 * math.pi * (y.T @ y) / d.shape[0]
        torch.testing.assert_close(gram, torch.eye(degree**2, dtype=torch.float64), atol=0.03, rtol=0)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"radius": 0.0}, r"radius"),
        ({"radius": -1.0}, r"radius"),
        ({"density_activation": "sigmoid"}, r"density_activation.*softplus"),
        ({"normal_type": "pred"}, r"normal_type.*finite_difference.*analytic"),
        ({"density_bias": "blob"}, r"density_bias.*blob_magic3d"),
        ({"finite_difference_normal_eps": 0.0}, r"finite_difference_normal_eps"),
        ({"mlp_neurons": 0}, r"mlp_neurons"),
    ],
)
def test_bad_field_config_raises(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ImplicitVolume(FieldConfig(hashgrid=SMALL_GRID, backend="torch", **kwargs))


def test_normal_type_none_and_no_grad_eval():
    x = torch.tensor([[0.2, -0.1, 0.3], [0.5, 0.5, 0.0]])
    assert "normal" not in small_field(normal_type=None)(x)
    field = small_field(normal_type="analytic").eval()
    with torch.no_grad():
        out = field(x)
    assert not out["normal"].requires_grad and torch.isfinite(out["normal"]).all()
    torch.testing.assert_close(out["normal"].norm(dim=-1), torch.ones(2))
    # same seed -> same field
    torch.testing.assert_close(small_field().density(x), small_field().density(x))


def test_bad_background_config_raises():
    with pytest.raises(ValueError, match=r"sh_degree.*\(1, 2, 3, 4\)"):
        EnvironmentBackground(BackgroundConfig(sh_degree=5))
    with pytest.raises(ValueError, match=r"random_aug_prob"):
        EnvironmentBackground(BackgroundConfig(random_aug_prob=1.5))
