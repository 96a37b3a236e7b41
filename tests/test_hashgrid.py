"""Pure-PyTorch hash grid (l2vsd_core/scene/hashgrid.py): tcnn geometry, dense levels against grid_sample,
hashed levels against hand-computed indices, gradcheck, input handling, backend switch."""

import math

import pytest
import torch
import torch.nn.functional as F

from l2vsd_core.scene import hashgrid as hg
from l2vsd_core.scene.hashgrid import HashGridConfig, TorchHashGrid, make_hashgrid

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def default_grid():
    """ProlificDreamer config (12.6M params) in float64 with O(1) table values so comparisons are meaningful."""
    torch.manual_seed(0)
    g = TorchHashGrid(HashGridConfig()).double()
    with torch.no_grad():
        g.params.normal_()
    return g


def test_config_defaults_and_tcnn_geometry():
    c = HashGridConfig()
    assert (c.n_levels, c.n_features_per_level, c.log2_hashmap_size, c.base_resolution) == (16, 2, 19, 16)
    assert c.per_level_scale == pytest.approx(1.447269237440378) and c.interpolation == "Linear"
    assert c.to_tcnn()["otype"] == "HashGrid"
    levels = hg.level_geometry(c)
    # tcnn: scale = base * pls^l - 1, resolution = ceil(scale) + 1; dense while resolution^3 <= 2^19.
    assert [lv["resolution"] for lv in levels[:6]] == [16, 24, 34, 49, 71, 102]
    assert levels[-1]["resolution"] == 4096
    assert [lv["hashed"] for lv in levels] == [False] * 5 + [True] * 11
    for lv in levels:
        assert lv["scale"] == pytest.approx(16 * c.per_level_scale ** levels.index(lv) - 1, rel=1e-5)
        assert lv["entries"] == min(math.ceil(lv["resolution"] ** 3 / 8) * 8, 2**19)
    g = TorchHashGrid(c)
    assert g.params.numel() == 2 * sum(lv["entries"] for lv in levels) == 12599920
    assert g.params.abs().max() <= 1e-4 and g.params.std() > 3e-5  # uniform(-1e-4, 1e-4) like tcnn


def _dense_reference(grid: TorchHashGrid, level: int, x: torch.Tensor) -> torch.Tensor:
    """One dense level as a [F, R+1, R+1, R+1] volume sampled with grid_sample (trilinear, align_corners=True).

    Vertex (i, j, k) holds table row ``(i + j R + k R^2) mod entries`` (tcnn's dense layout); the extra vertex at
    index R on each axis is where tcnn's +0.5 offset lets x near 1 reach (it wraps in the linear index)."""
    lv = grid.levels[level]
    R, scale = lv["resolution"], lv["scale"]
    assert not lv["hashed"]
    ar = torch.arange(R + 1)
    k, j, i = torch.meshgrid(ar, ar, ar, indexing="ij")  # volume axes D=z, H=y, W=x
    rows = (i + j * R + k * R * R) % lv["entries"] + lv["offset"]
    vol = grid.table[rows]  # [R+1, R+1, R+1, F]
    vol = vol.permute(3, 0, 1, 2)[None]  # [1, F, D, H, W]
    pos = x * scale + 0.5  # vertex units, in [0, R]
    g = (pos / R * 2 - 1).view(1, 1, 1, -1, 3)  # grid_sample wants (x, y, z) = (W, H, D) order
    out = F.grid_sample(vol, g, mode="bilinear", align_corners=True)  # [1, F, 1, 1, N]
    return out.view(vol.shape[1], -1).T


def test_dense_levels_match_grid_sample_reference(default_grid):
    torch.manual_seed(1)
    x = torch.rand(2000, 3, dtype=torch.float64)
    x[:8] = torch.tensor([0.0, 1.0]).double()[torch.randint(0, 2, (8, 3))]  # corners of the cube (wraparound)
    out = default_grid(x).view(len(x), 16, 2)
    n_dense = sum(not lv["hashed"] for lv in default_grid.levels)
    assert n_dense == 5
    for level in range(n_dense):
        ref = _dense_reference(default_grid, level, x)
        torch.testing.assert_close(out[:, level], ref, atol=1e-6, rtol=0)


def _manual_level(grid: TorchHashGrid, level: int, p):
    """Hashed level evaluated with Python ints and floats, corner by corner."""
    lv = grid.levels[level]
    table = grid.table.detach()
    pos = [c * lv["scale"] + 0.5 for c in p]
    base = [math.floor(q) for q in pos]
    frac = [q - b for q, b in zip(pos, base)]
    acc = torch.zeros(table.shape[1], dtype=table.dtype)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                cx, cy, cz = base[0] + dx, base[1] + dy, base[2] + dz
                h = ((cx * 1) ^ (cy * 2654435761) ^ (cz * 805459861)) % 2**32
                row = h % lv["entries"] + lv["offset"]
                w = 1.0
                for bit, f in zip((dx, dy, dz), frac):
                    w *= f if bit else 1 - f
                acc += w * table[row]
    return acc


def test_hashed_levels_match_manual_hash(default_grid):
    pts = [(0.1234, 0.5678, 0.9012), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.999, 0.001, 0.5), (0.3333, 0.6667, 0.25)]
    out = default_grid(torch.tensor(pts, dtype=torch.float64)).view(len(pts), 16, 2)
    for level in (5, 9, 15):
        assert default_grid.levels[level]["hashed"]
        for n, p in enumerate(pts):
            torch.testing.assert_close(out[n, level], _manual_level(default_grid, level, p), atol=1e-9, rtol=0)


TINY = HashGridConfig(n_levels=2, n_features_per_level=2, log2_hashmap_size=6, base_resolution=3, per_level_scale=2.0)


def test_gradcheck_inputs_and_table():
    torch.manual_seed(2)
    g = TorchHashGrid(TINY).double()
    assert [lv["hashed"] for lv in g.levels] == [False, True]  # 3^3 dense, 6^3 > 64 hashed
    with torch.no_grad():
        g.params.normal_()
    x = (0.05 + 0.9 * torch.rand(6, 3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(g, (x,), eps=1e-6, atol=1e-6)

    x0 = x.detach()

    def of_table(params):
        return torch.func.functional_call(g, {"params": params}, (x0,))

    params = g.params.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(of_table, (params,), eps=1e-6, atol=1e-6)


def test_shape_dtype_and_out_of_range_clamped():
    g = TorchHashGrid(TINY, seed=0)
    x = torch.rand(7, 3)
    y = g(x)
    assert y.shape == (7, 4) and y.dtype == torch.float32 and g.n_output_dims == 4
    assert g(torch.zeros(0, 3)).shape == (0, 4)
    outside = torch.tensor([[-0.5, 0.3, 1.7], [2.0, -3.0, 0.5]])
    torch.testing.assert_close(g(outside), g(outside.clamp(0, 1)), atol=0, rtol=0)
    with pytest.raises(ValueError):
        g(torch.rand(5, 2))
    with pytest.raises(ValueError):
        g(torch.rand(5))
    with pytest.raises(ValueError):
        TorchHashGrid(HashGridConfig(interpolation="Smoothstep"))
    # same seed, same table
    torch.testing.assert_close(TorchHashGrid(TINY, seed=3).params, TorchHashGrid(TINY, seed=3).params)


def test_backends(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="use backend='torch'"):
        make_hashgrid(TINY, backend="tcnn")
    assert isinstance(make_hashgrid(TINY, backend="auto"), TorchHashGrid)
    assert isinstance(make_hashgrid(TINY, backend="torch"), TorchHashGrid)
    with pytest.raises(ValueError):
        make_hashgrid(TINY, backend="cuda")
    # CUDA present but tinycudann missing: tcnn errors with the fix, auto falls back to torch.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(__import__("sys").modules, "tinycudann", None)  # makes `import tinycudann` fail
    with pytest.raises(RuntimeError, match="pip install tinycudann needs CUDA"):
        make_hashgrid(TINY, backend="tcnn")
    assert isinstance(make_hashgrid(TINY, backend="auto"), TorchHashGrid)


def test_no_cuda_import_at_module_top():
    import sys

    assert "tinycudann" not in sys.modules or sys.modules["tinycudann"] is None
    src = open(hg.__file__).read().split("def _import_tcnn")[0]
    assert "import tinycudann" not in src
