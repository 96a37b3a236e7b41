"""Mesh export: isosurface, floater removal, texture baking, GLB/OBJ/PLY round trips, turntable GIF."""

import math
import os

import numpy as np
import pytest
import torch

trimesh = pytest.importorskip("trimesh")
pytest.importorskip("PIL")

from l2vsd_core import export as ex  # noqa: E402

HAS_MC = any(__import__("importlib").util.find_spec(m) is not None for m in ("mcubes", "skimage"))
HAS_XATLAS = __import__("importlib").util.find_spec("xatlas") is not None
needs_mc = pytest.mark.skipif(not HAS_MC, reason="needs PyMCubes or scikit-image")
needs_xatlas = pytest.mark.skipif(not HAS_XATLAS, reason="needs xatlas")

RED = torch.tensor([0.9, 0.1, 0.1])
BLUE = torch.tensor([0.1, 0.1, 0.9])


class BallField(torch.nn.Module):
    """Analytic field: a ball of radius 0.5 whose density ramps linearly from 100 (inside) to 0 (outside) over a
    shell of width 0.1, so the level 50 is exactly the sphere |x| = 0.5.  Optional tiny extra blob (a floater).
    Colour: red for x > 0, blue for x < 0."""

    def __init__(self, blob=None, scale=1.0):
        super().__init__()
        self.radius = 1.0
        self.blob = blob  # (centre (3,), radius)
        self.scale = scale

    def _ramp(self, d, r):
        return 100.0 * self.scale * ((r - d) / 0.1 + 0.5).clamp(0.0, 1.0)

    def density(self, x):
        sigma = self._ramp(x.norm(dim=-1), 0.5)
        if self.blob is not None:
            c, r = self.blob
            sigma = torch.maximum(sigma, self._ramp((x - torch.as_tensor(c, dtype=x.dtype)).norm(dim=-1), r))
        return sigma

    def forward(self, x, dirs=None):
        rgb = torch.where((x[:, :1] > 0), RED.to(x.dtype), BLUE.to(x.dtype))
        return {"density": self.density(x), "rgb": rgb}


@pytest.fixture(scope="module")
def ball_mesh():
    return ex.extract_mesh(BallField(), resolution=64, threshold=50.0)


@pytest.fixture(scope="module")
def baked(ball_mesh):
    # decimated as export_nerf does (pipeline.TEXELS_PER_FACE): smaller faces than a few texels read their neighbours
    return ex.bake_texture(ex.decimate(ball_mesh, 256 * 256 // 8), BallField(), texture_size=256, padding=4)


def _no_tmp(folder):
    return [f for f in os.listdir(folder) if f.endswith(".tmp")] == []


@needs_mc
def test_extract_sphere(ball_mesh):
    cell = 2.0 / 63
    norms = np.linalg.norm(ball_mesh.vertices, axis=1)
    assert np.abs(norms - 0.5).max() < cell
    assert ball_mesh.is_watertight
    vol = 4.0 / 3.0 * math.pi * 0.5 ** 3
    assert ball_mesh.volume == pytest.approx(vol, rel=0.03)  # positive: faces oriented outwards
    assert ball_mesh.metadata["isosurface_threshold"] == 50.0


@needs_mc
def test_mean_threshold_and_chunking():
    field = BallField()
    mesh = ex.extract_mesh(field, resolution=48, threshold="mean", chunk=1000)
    level = mesh.metadata["isosurface_threshold"]
    # threestudio's rule: mean of the positive densities on the grid over the field's box
    g = torch.linspace(-1, 1, 48)
    pts = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    d = field.density(pts)
    assert level == pytest.approx(float(d[d > 1e-5].mean()), rel=1e-4)
    assert mesh.metadata["isosurface_rule"] == "mean"
    norms = np.linalg.norm(mesh.vertices, axis=1)
    assert np.all((norms > 0.44) & (norms < 0.56))  # inside the density ramp
    assert mesh.is_watertight


class GaussianBlob(torch.nn.Module):
    """σ(x) = a·exp(−|x|²/2s²).  Closed forms: a ray passing at distance b from the centre has optical depth
    a·s·√(2π)·exp(−b²/2s²), so the volume render is more than 50 % opaque for b < b* with
    b*² = 2s²·ln(a·s·√(2π)/ln 2); the level set σ = τ is the sphere of radius s·√(2 ln(a/τ)), which is b* exactly at
    τ* = ln 2 / (s·√(2π)), whatever the amplitude a."""

    radius = 1.0

    def __init__(self, a, s=0.15):
        super().__init__()
        self.a, self.s = a, s

    def density(self, x):
        return self.a * torch.exp(-(x * x).sum(-1) / (2 * self.s ** 2))

    def forward(self, x, dirs=None):
        return {"density": self.density(x), "rgb": torch.full_like(x, 0.5)}


@needs_mc
@pytest.mark.parametrize("amplitude", [100.0, 1000.0])
def test_auto_level_is_where_rays_turn_half_opaque(amplitude):
    s = 0.15
    level_star = math.log(2) / (s * math.sqrt(2 * math.pi))  # 1.84 for both amplitudes
    b_star = s * math.sqrt(2 * math.log(amplitude / level_star))  # 0.424 and 0.532
    # unblurred, the meshed density is the field's own: the level is τ*
    raw = ex.extract_mesh(GaussianBlob(amplitude, s), resolution=48, smooth=0)
    assert raw.metadata["isosurface_rule"] == "auto"
    assert raw.metadata["isosurface_threshold"] == pytest.approx(level_star, rel=0.1)
    assert raw.metadata["render_match_iou"] > 0.97
    # blurred (the default), the level moves with the blurred profile, the surface stays the sphere of radius b*
    for mesh in (raw, ex.extract_mesh(GaussianBlob(amplitude, s), resolution=48)):
        radii = np.linalg.norm(mesh.vertices, axis=1)
        assert abs(radii.mean() - b_star) < 0.005 and radii.max() - radii.min() < 0.02
        # the grid was fitted to the object: its cells are under half the box's 2 / 47, hence the many faces
        assert mesh.is_watertight and len(mesh.faces) > 8000


def test_render_matched_level_on_plain_arrays():
    s, a = 0.15, 100.0
    axis = np.linspace(-1.0, 1.0, 81)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    values = a * np.exp(-(x * x + y * y + z * z) / (2 * s * s))
    grid = (values, (-1.0, -1.0, -1.0), 2.0 / 80)
    level, iou = ex.render_matched_level(grid, grid)
    assert level == pytest.approx(math.log(2) / (s * math.sqrt(2 * math.pi)), rel=0.1) and iou > 0.95
    with pytest.raises(ValueError, match="no surface"):
        ex.render_matched_level((np.zeros((4, 4, 4)), (-1, -1, -1), 2 / 3), (np.zeros((4, 4, 4)), (-1, -1, -1), 2 / 3))


def test_opacity_iou_closed_form():
    a = torch.zeros(2, 20, 20)
    b = torch.zeros(2, 20, 20)
    a[0, :10, :10] = 1.0
    b[0, :10, 5:15] = 0.9  # overlap 10×5 = 50, union 150
    a[1, 2:6, 2:6] = 0.7   # view 1: 16 pixels against none
    assert ex.opacity_iou(a[0], b[0]) == pytest.approx(1 / 3)
    assert ex.opacity_iou(a, b) == pytest.approx((1 / 3 + 0.0) / 2)
    # above 0.95: view 0 is a against nothing (0), view 1 nothing against nothing (1)
    assert ex.opacity_iou(a, b, threshold=0.95) == pytest.approx((0.0 + 1.0) / 2)
    assert ex.opacity_iou(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)) == 1.0  # both empty: they agree
    with pytest.raises(ValueError, match="one shape"):
        ex.opacity_iou(a, b[0])


def test_mesh_silhouette_of_a_sphere_is_its_disc():
    from l2vsd_core.scene.cameras import orbit_cameras

    radius, distance, fovy, size = 0.5, 2.0, 50.0, 96
    sphere = trimesh.creation.icosphere(5, radius=radius)
    cams = orbit_cameras(3, 20.0, distance, fovy, size, size)
    coverage = ex.mesh_silhouettes(sphere.vertices, sphere.faces, cams)
    # a sphere seen from its centre's distance d fills the cone of half-angle asin(r/d): a disc on the image
    disc = math.tan(math.asin(radius / distance)) / math.tan(math.radians(fovy / 2)) * size / 2
    for view in coverage:
        assert float((view > 0.5).sum()) == pytest.approx(math.pi * disc ** 2, rel=0.03)
        assert float(view.sum()) == pytest.approx(math.pi * disc ** 2, rel=0.02)  # antialiased coverage: the area
    assert ex.mesh_silhouettes(np.zeros((0, 3)), np.zeros((0, 3), np.int64), cams).sum() == 0


NEEDLES = ((1, 0, 0), (0, 1, 0), (-1, 0, 0), (0, -1, 0), (0.6, 0.6, -0.53), (-0.6, 0.3, -0.74))


class SpikyFuzzyBall(torch.nn.Module):
    """What a young NeRF's density looks like to the exporter: a ball (density 20 inside radius 0.3) with a fuzzy
    edge (a sigmoid 0.03 wide) in a faint haze, six needles (radius 0.02, density 12: their optical depth across,
    0.48, stays under ln 2, so a volume render shows them faint, under 50 % opaque, except end-on) and a faint
    floater (a ball of radius 0.1 at z = 0.6, density 1.5: never 50 % opaque)."""

    radius = 1.0

    def __init__(self, needles=True, floater=True):
        super().__init__()
        self.needles, self.floater = needles, floater

    def density(self, x):
        r = x.norm(dim=-1)
        sigma = 20.0 * torch.sigmoid((0.3 - r) / 0.03) + 0.2 * torch.exp(-r ** 2 / 0.5)
        for d in NEEDLES if self.needles else ():
            d = torch.nn.functional.normalize(torch.tensor(d, dtype=x.dtype), dim=0)
            along = x @ d
            off = (x - along[:, None] * d).norm(dim=-1)
            sigma = torch.where((off < 0.02) & (along > 0.25) & (along < 0.6), sigma.clamp_min(12.0), sigma)
        if self.floater:
            near = (x - torch.tensor([0.0, 0.0, 0.6], dtype=x.dtype)).norm(dim=-1) < 0.1
            sigma = torch.where(near, sigma + 1.5, sigma)
        return sigma

    def forward(self, x, dirs=None):
        return {"density": self.density(x), "rgb": torch.full_like(x, 0.5)}


@pytest.fixture(scope="module")
def spiky_renders():
    """The volume renders' opacity of SpikyFuzzyBall from 8 orbit cameras, and the cameras."""
    from l2vsd_core.scene.cameras import orbit_cameras
    from l2vsd_core.scene.renderer import VolumeRenderer

    cams = orbit_cameras(8, 20.0, 2.0, 50.0, 64, 64)
    renderer = VolumeRenderer(radius=1.0, num_samples_per_ray=256).eval()
    with torch.no_grad():
        opacity = renderer.render_camera(cams, SpikyFuzzyBall(), None, stratified=False)["opacity"][..., 0]
    return opacity, cams


def _glb_silhouettes(mesh, cams, path):
    """Write ``mesh`` as a GLB (y up), read it back into world axes and rasterize its silhouettes."""
    ex.save_mesh(mesh, path)
    back = trimesh.load(str(path), force="mesh", process=False)
    return ex.mesh_silhouettes(ex.y_up_to_world(back.vertices), back.faces, cams)


@needs_mc
def test_exported_glb_matches_the_volume_renders(spiky_renders, tmp_path):
    opacity, cams = spiky_renders
    field = SpikyFuzzyBall()
    mesh = ex.extract_mesh(field, resolution=48)
    iou = ex.opacity_iou(_glb_silhouettes(mesh, cams, tmp_path / "clean.glb"), opacity)
    assert iou > 0.93
    assert len(mesh.split(only_watertight=False)) == 1  # the floater is gone
    # the needles are gone but for stubs within a ray's width of the ball (its silhouette radius is 0.369, see below)
    assert np.linalg.norm(mesh.vertices, axis=1).max() < 0.45

    # the same field the old way (threestudio's mean threshold, the box's grid, no cleaning): the level sits in the
    # fuzz, the surface bulges, the needles are spikes and the floater a second component
    old = ex.extract_mesh(field, resolution=48, threshold="mean", fit=False, carve=False, smooth=0,
                          remove_outliers=False)
    old_iou = ex.opacity_iou(_glb_silhouettes(old, cams, tmp_path / "old.glb"), opacity)
    assert old_iou < 0.75 and iou > old_iou + 0.2
    assert len(old.split(only_watertight=False)) >= 2 and np.linalg.norm(old.vertices, axis=1).max() > 0.55

    # what each part does, the level chosen the new way: the carve by the renders' silhouettes takes the needles
    # off (the level alone keeps them: their density 12 is far above it) ...
    uncarved = ex.extract_mesh(field, resolution=48, carve=False)
    assert np.linalg.norm(uncarved.vertices, axis=1).max() > 0.55
    assert ex.opacity_iou(_glb_silhouettes(uncarved, cams, tmp_path / "uncarved.glb"), opacity) < iou - 0.02
    # ... and the render-matched level alone leaves the floater out (its density, 1.6 with the haze, < the level)
    lone = ex.extract_mesh(field, resolution=48, carve=False, remove_outliers=False)
    assert lone.metadata["isosurface_threshold"] > 1.8 and len(lone.split(only_watertight=False)) == 1


@needs_mc
def test_render_matched_silhouette_radius_has_its_closed_form():
    """Without needles and floater the surface is a sphere whose radius must be b*, where a ray at distance b* from
    the centre reaches optical depth ln 2 (found by quadrature here), whatever the cleaning."""
    from scipy import integrate, optimize

    def sigma(r):
        return 20.0 / (1.0 + np.exp(-(0.3 - r) / 0.03)) + 0.2 * np.exp(-r ** 2 / 0.5)

    def depth(b):  # through the box: the chord is at most 2·√3 long; beyond |x| ≈ 1 the haze is negligible anyway
        return 2.0 * integrate.quad(lambda t: sigma(math.hypot(b, t)), 0.0, math.sqrt(3.0 - b * b), limit=200)[0]

    b_star = optimize.brentq(lambda b: depth(b) - math.log(2.0), 0.2, 0.6)  # 0.3695
    for options in ({}, {"opening": 0, "smooth": 0}, {"fit": False}):
        mesh = ex.extract_mesh(SpikyFuzzyBall(needles=False, floater=False), resolution=48, **options)
        assert np.linalg.norm(mesh.vertices, axis=1).mean() == pytest.approx(b_star, abs=0.006), options


@needs_mc
def test_floater_removed():
    field = BallField(blob=((0.75, 0.75, 0.0), 0.04))
    # the blob is 2.5 cells across: unblurred, so that its level set survives
    raw = ex.extract_mesh(field, resolution=64, threshold=50.0, remove_outliers=False, smooth=0)
    assert len(raw.split(only_watertight=False)) == 2
    clean = ex.extract_mesh(field, resolution=64, threshold=50.0, smooth=0)
    assert len(clean.split(only_watertight=False)) == 1
    assert np.abs(np.linalg.norm(clean.vertices, axis=1) - 0.5).max() < 2.0 / 63


def test_remove_floaters_by_volume_drops_a_sheet():
    """A thin sheet has plenty of faces (so threestudio's face rule keeps it) but hardly any volume."""
    ball = trimesh.creation.icosphere(3, radius=0.5)  # 1280 faces
    sheet = trimesh.creation.box((0.6, 0.6, 0.01))
    sheet = trimesh.Trimesh(*trimesh.remesh.subdivide_to_size(sheet.vertices, sheet.faces, 0.05))  # many faces
    sheet.apply_translation((0, 0, 0.8))
    both = trimesh.util.concatenate([ball, sheet])
    assert len(sheet.faces) > 0.01 * len(ball.faces)
    assert len(ex.remove_floaters(both).faces) == len(both.faces)
    kept = ex.remove_floaters(both, by_volume=True)
    assert len(kept.faces) == len(ball.faces) and kept.volume == pytest.approx(ball.volume)


@needs_mc
def test_no_surface_raises():
    with pytest.raises(ValueError, match="no surface.*threshold"):
        ex.extract_mesh(BallField(), resolution=16, threshold=1000.0)
    with pytest.raises(ValueError, match="no surface"):
        ex.extract_mesh(BallField(scale=0.0), resolution=16, threshold="auto")


@needs_mc
def test_surface_cut_by_box_is_closed():
    class Full(BallField):
        def density(self, x):
            return torch.full(x.shape[:-1], 10.0, dtype=x.dtype)

    mesh = ex.extract_mesh(Full(), resolution=8, threshold=5.0)
    assert mesh.is_watertight
    assert np.abs(mesh.vertices).max() <= 1.0 + 1e-3 * 2 / 7
    assert mesh.volume == pytest.approx(8.0, rel=1e-3)


def _sample_at_vertices(mesh):
    img = mesh.visual.material.baseColorTexture
    return ex._sample_texture(img, np.asarray(mesh.visual.uv))


def _check_colours(mesh, y_up=False):
    """Red on the world's +x side, blue on −x; ``y_up``: ``mesh`` was read from a GLB/OBJ (turned back first)."""
    cols = _sample_at_vertices(mesh)
    x = (ex.y_up_to_world(mesh.vertices) if y_up else np.asarray(mesh.vertices))[:, 0]
    right, left = cols[x > 0.1], cols[x < -0.1]
    assert len(right) > 50 and len(left) > 50
    assert np.all(right[:, 0] > 0.6) and np.all(right[:, 2] < 0.4)
    assert np.all(left[:, 2] > 0.6) and np.all(left[:, 0] < 0.4)


@needs_mc
@needs_xatlas
def test_bake_and_glb_round_trip(baked, tmp_path):
    assert baked.visual.uv.shape == (len(baked.vertices), 2)
    assert baked.metadata["texture_coverage"] > 0.2
    _check_colours(baked)
    path = ex.save_mesh(baked, tmp_path / "sub" / "model.glb")
    assert path.exists() and _no_tmp(path.parent)
    loaded = trimesh.load(path, force="mesh")
    assert loaded.visual.uv is not None and len(loaded.visual.uv) == len(loaded.vertices)
    img = loaded.visual.material.baseColorTexture
    assert img is not None and img.size == (256, 256)
    _check_colours(loaded, y_up=True)


@needs_mc
@needs_xatlas
def test_obj_and_ply(baked, tmp_path):
    obj = ex.save_mesh(baked, tmp_path / "model.obj")
    names = sorted(os.listdir(tmp_path))
    assert names == ["model.mtl", "model.obj", "model.png"]
    assert baked.visual.material.name == "baked"  # the caller's mesh is not renamed
    assert "map_Kd model.png" in (tmp_path / "model.mtl").read_text()
    assert _no_tmp(tmp_path)
    m = trimesh.load(obj, force="mesh")
    assert len(m.faces) == len(baked.faces)
    assert m.visual.uv is not None

    ply = ex.save_mesh(baked, tmp_path / "model.ply")
    p = trimesh.load(ply, force="mesh")
    assert len(p.faces) == len(baked.faces)
    cols = np.asarray(p.visual.vertex_colors)[:, :3] / 255.0
    x = np.asarray(p.vertices)[:, 0]
    assert np.all(cols[x > 0.1, 0] > 0.6) and np.all(cols[x < -0.1, 2] > 0.6)
    assert _no_tmp(tmp_path)


@needs_mc
def test_ply_colours_from_field(ball_mesh, tmp_path):
    ply = ex.save_mesh(ball_mesh, tmp_path / "raw.ply", field=BallField())
    p = trimesh.load(ply, force="mesh")
    cols = np.asarray(p.visual.vertex_colors)[:, :3] / 255.0
    x = np.asarray(p.vertices)[:, 0]
    assert np.all(cols[x > 0.05, 0] > 0.8) and np.all(cols[x < -0.05, 2] > 0.8)


@needs_mc
def test_bad_paths(ball_mesh, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for fmt in ("glb", "obj", "ply"):
        with pytest.raises(ValueError, match="afile"):
            ex.save_mesh(ball_mesh, blocker / "deeper" / f"m.{fmt}")
    assert sorted(os.listdir(tmp_path)) == ["afile"]
    with pytest.raises(ValueError, match="format"):
        ex.save_mesh(ball_mesh, tmp_path / "m.glb", format="stl")
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_turntable_gif(tmp_path):
    from PIL import Image

    from l2vsd_core.scene.renderer import VolumeRenderer

    renderer = VolumeRenderer(radius=1.0, num_samples_per_ray=24)
    path = ex.turntable_gif(renderer, BallField(), 1.0, tmp_path / "turn.gif", n_views=6, resolution=16)
    assert _no_tmp(tmp_path)
    with Image.open(path) as im:
        assert im.n_frames == 6
        assert im.size == (16, 16)
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    # the view from azimuth -180 (back, camera on -x) sees blue; azimuth 0 (front, +x) sees red
    c = slice(6, 10)
    assert frames[0][c, c, 2].mean() > frames[0][c, c, 0].mean() + 50
    assert frames[3][c, c, 0].mean() > frames[3][c, c, 2].mean() + 50


@pytest.mark.skipif(__import__("importlib").util.find_spec("skimage") is None, reason="needs scikit-image")
def test_skimage_fallback(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mcubes", None)  # `import mcubes` now raises ImportError
    mesh = ex.extract_mesh(BallField(), resolution=48, threshold=50.0)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4.0 / 3.0 * math.pi * 0.125, rel=0.03)
    assert np.abs(np.linalg.norm(mesh.vertices, axis=1) - 0.5).max() < 2.0 / 47


def test_no_marching_cubes_library(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mcubes", None)
    monkeypatch.setitem(sys.modules, "skimage.measure", None)
    with pytest.raises(ImportError, match="PyMCubes.*scikit-image"):
        ex.extract_mesh(BallField(), resolution=16, threshold=50.0)


@needs_mc
@needs_xatlas
def test_real_implicit_volume(tmp_path):
    from l2vsd_core.scene.field import ImplicitVolume

    field = ImplicitVolume(seed=0)  # untrained: the blob_magic3d density bias is a ball of radius ~0.5
    mesh = ex.extract_mesh(field, resolution=32, threshold="auto", chunk=4096)
    assert len(mesh.faces) > 100 and mesh.volume > 0
    textured = ex.bake_texture(mesh, field, texture_size=64, padding=2)
    path = ex.save_mesh(textured, tmp_path / "real.glb")
    assert trimesh.load(path, force="mesh").visual.uv is not None


def test_turntable_refuses_file_parent(tmp_path):
    from l2vsd_core.scene.renderer import VolumeRenderer

    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        ex.turntable_gif(VolumeRenderer(num_samples_per_ray=4), BallField(), None, tmp_path / "f" / "t.gif",
                         n_views=2, resolution=4)
    assert os.listdir(tmp_path) == ["f"]


def test_decimate_caps_the_faces_and_keeps_the_shape():
    sphere = trimesh.creation.icosphere(5, radius=0.5)  # 20480 faces
    assert ex.decimate(sphere, 50_000) is sphere
    small = ex.decimate(sphere, 2000)
    assert 1000 <= len(small.faces) <= 2000
    assert abs(small.volume / sphere.volume - 1) < 0.02
    radii = np.linalg.norm(small.vertices, axis=1)
    assert np.abs(radii - 0.5).max() < 0.01  # vertices stay on the sphere
    with pytest.raises(ValueError, match="max_faces"):
        ex.decimate(sphere, 0)


# ----------------------------------------------------------------------------------------------- axes of the files
class ConeField(torch.nn.Module):
    """An asymmetric analytic field in world axes (z up, the front facing +x): a cone along +z (base disc of radius
    0.4 at z = −0.5, tip at z = +0.6), a ball of radius 0.2 bulging out of its front (+x, what the azimuth-0 "front
    view" camera sees) low down, and a ball of radius 0.15 out of its right-hand side as the front view shows it
    (+y) at mid height.  Density 100 inside the union, ramping to 0 over 0.05 across its surface (level 50).
    Colour: red on the front half (x > 0), blue behind."""

    FRONT = ((0.35, 0.0, -0.3), 0.2)
    RIGHT = ((0.0, 0.25, 0.0), 0.15)

    def __init__(self):
        super().__init__()
        self.radius = 1.0

    def density(self, x):
        r, z = x[:, :2].norm(dim=-1), x[:, 2]
        d = torch.maximum(torch.maximum(r - 0.4 * (0.6 - z) / 1.1, -0.5 - z), z - 0.6)
        for centre, radius in (self.FRONT, self.RIGHT):
            d = torch.minimum(d, (x - torch.tensor(centre, dtype=x.dtype)).norm(dim=-1) - radius)
        return 100.0 * (0.5 - d / 0.05).clamp(0.0, 1.0)

    def forward(self, x, dirs=None):
        rgb = torch.where((x[:, :1] > 0), RED.to(x.dtype), BLUE.to(x.dtype))
        return {"density": self.density(x), "rgb": rgb}


CONE_EXPORT = dict(mesh_resolution=64, threshold=50.0, texture_size=64)


def _check_cone_y_up(vertices, normals=None):
    """``vertices`` [V, 3] (and their ``normals``) of ConeField's surface in a GLB/OBJ's axes: y up, front +z."""
    v = np.asarray(vertices, dtype=np.float64)
    x, y, z = v.T
    tip = v[np.argmax(y)]
    assert tip[1] > 0.5 and math.hypot(tip[0], tip[2]) < 0.08, tip  # the tip is the highest point, on the axis
    assert -0.55 < y.min() < -0.45 and abs(x).max() < 0.45  # the base disc below, at y = −0.5
    front = v[np.argmax(z)]
    assert front[2] > 0.5 and abs(front[1] + 0.3) < 0.08 and abs(front[0]) < 0.08, front  # the front bump: +z
    assert z.min() > -0.45  # nothing sticks out behind
    band = np.abs(y) < 0.05  # at mid height: the right-hand bump (world +y) is on +x, not mirrored to −x
    assert x[band].max() > 0.35 and x[band].min() > -0.3, (x[band].min(), x[band].max())
    if normals is not None:  # normals turned with the vertices: outwards at the tip (up) and the front bump (+z)
        n = np.asarray(normals, dtype=np.float64)
        assert n[np.argmax(y)][1] > 0.5 and n[np.argmax(z)][2] > 0.9, (n[np.argmax(y)], n[np.argmax(z)])


def _check_proper(vertices, faces, world):
    """The rotation is proper: the file's surface, its UV-seam vertices merged, is closed, consistently wound and
    encloses the same positive volume as the world mesh (a mirror would flip the sign or the winding)."""
    merged = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), faces, process=True)
    assert merged.is_watertight and merged.is_winding_consistent
    assert world.volume > 0 and merged.volume == pytest.approx(world.volume, rel=1e-4)


def _gltf_json(path):
    import json
    import struct
    data = path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 12)  # the first chunk, after the 12-byte header and its 8-byte head
    return json.loads(data[20:20 + length])


@pytest.fixture(scope="module")
def cone_exports(tmp_path_factory):
    """ConeField exported through the pipeline (iso-surface → bake → save_mesh) to GLB, OBJ and PLY: {format:
    (path, the in-memory mesh export_nerf returns, in world axes)}."""
    if not (HAS_MC and HAS_XATLAS):
        pytest.skip("needs a marching-cubes library and xatlas")
    from l2vsd_core.config import ExportConfig
    from l2vsd_core.pipeline import export_nerf
    folder = tmp_path_factory.mktemp("cone")
    return {fmt: (folder / f"cone.{fmt}", export_nerf(ConeField(), ExportConfig(**CONE_EXPORT), folder / f"cone.{fmt}",
                                                        format=fmt)) for fmt in ("glb", "obj", "ply")}


def test_world_to_y_up_is_the_proper_rotation_to_gltf_axes():
    r = ex.WORLD_TO_Y_UP
    assert np.allclose(r @ r.T, np.eye(3)) and np.linalg.det(r) == pytest.approx(1.0)  # a rotation, no mirror
    up, front, right = np.eye(3)[[2, 0, 1]]  # world: z up, front +x, the front view's right +y (cameras.py)
    assert np.array_equal(ex.world_to_y_up(up), [0, 1, 0]) and np.array_equal(ex.world_to_y_up(front), [0, 0, 1])
    assert np.array_equal(ex.world_to_y_up(right), [1, 0, 0])
    points = np.random.default_rng(0).normal(size=(5, 3))
    assert np.allclose(ex.y_up_to_world(ex.world_to_y_up(points)), points)


def test_the_world_field_is_what_the_checks_expect():
    mesh = ex.extract_mesh(ConeField(), resolution=64, threshold=50.0)  # world axes: turned, it must pass
    _check_cone_y_up(ex.world_to_y_up(mesh.vertices), ex.world_to_y_up(mesh.vertex_normals))
    with pytest.raises(AssertionError):  # and unturned (z up) it must not
        _check_cone_y_up(mesh.vertices)


def test_glb_is_y_up_with_the_front_on_plus_z(cone_exports):
    path, world = cone_exports["glb"]
    loaded = trimesh.load(path, force="mesh", process=False)
    _check_cone_y_up(loaded.vertices)
    # exactly the world mesh turned: same vertex order, same faces (the winding is kept, not flipped)
    assert np.allclose(loaded.vertices, ex.world_to_y_up(world.vertices), atol=1e-6)
    assert np.array_equal(loaded.faces, world.faces)
    assert np.allclose(ex.y_up_to_world(loaded.vertices), world.vertices, atol=1e-6)
    _check_proper(loaded.vertices, loaded.faces, world)
    assert _gltf_json(path)["asset"]["version"] == "2.0"


def test_obj_is_y_up_with_the_front_on_plus_z(cone_exports):
    path, world = cone_exports["obj"]
    loaded = trimesh.load(path, force="mesh")
    assert loaded.visual.uv is not None
    _check_cone_y_up(loaded.vertices)
    _check_proper(loaded.vertices, loaded.faces, world)


def test_ply_keeps_the_world_axes(cone_exports):
    path, world = cone_exports["ply"]
    loaded = trimesh.load(path, force="mesh", process=False)
    assert np.allclose(loaded.vertices, world.vertices, atol=1e-6)  # z up, front +x: the world's, documented
    _check_cone_y_up(ex.world_to_y_up(loaded.vertices))
    _check_proper(ex.world_to_y_up(loaded.vertices), loaded.faces, world)


@pytest.mark.parametrize("fmt", ["glb", "obj"])
@needs_mc
def test_written_normals_turn_with_the_vertices(fmt, tmp_path):
    # the box's grid, unblurred: trimesh recomputes the normals from the float32 vertices it reads, and the slivers
    # of a finer (fitted) grid's surface turn that way by more than the float32 rounding this compares against (and a
    # blur of a cell of the box's grid would round the cone's tip below what _check_cone_y_up expects)
    mesh = ex.extract_mesh(ConeField(), resolution=64, threshold=50.0, fit=False, smooth=0)
    before = mesh.vertices.copy()
    world_normals = mesh.vertex_normals.copy()  # cached now, so trimesh writes them
    path = ex.save_mesh(mesh, tmp_path / f"n.{fmt}")
    assert np.array_equal(mesh.vertices, before) and np.allclose(mesh.vertex_normals, world_normals)  # untouched
    text = path.read_text() if fmt == "obj" else None
    if fmt == "glb":
        assert "NORMAL" in _gltf_json(path)["meshes"][0]["primitives"][0]["attributes"]
    else:
        assert "\nvn " in text
    loaded = trimesh.load(path, force="mesh", process=False)
    _check_cone_y_up(loaded.vertices, loaded.vertex_normals)
    if fmt == "glb":
        assert np.allclose(loaded.vertex_normals, ex.world_to_y_up(world_normals), atol=1e-4)  # float32 in the file


@needs_mc
@needs_xatlas
def test_refined_mesh_export_is_y_up(tmp_path):
    """save_textured_mesh (stages 2 and 3: a DMTet TriangleMesh) writes through save_mesh: the same axes."""
    from l2vsd_core.mesh.dmtet import TriangleMesh
    world = ex.extract_mesh(ConeField(), resolution=48, threshold=50.0)
    surface = TriangleMesh(torch.as_tensor(world.vertices, dtype=torch.float32), torch.as_tensor(world.faces))
    baked, path = ex.save_textured_mesh(surface, ConeField(), tmp_path / "refined.glb", texture_size=32)
    _check_cone_y_up(ex.world_to_y_up(baked.vertices))  # the returned mesh stays in world axes
    loaded = trimesh.load(path, force="mesh", process=False)
    _check_cone_y_up(loaded.vertices)
    _check_proper(loaded.vertices, loaded.faces, baked)


@needs_mc
def test_export_node_core_mesh_is_y_up():
    """ExportMesh's core MESH output goes to SaveGLB, which writes its vertices into a glTF as they are."""
    from nodes.export_node import CoreMesh
    world = ex.extract_mesh(ConeField(), resolution=48, threshold=50.0)
    core = CoreMesh.of(world)
    assert core.vertices.shape == (1, len(world.vertices), 3) and torch.equal(core.faces[0],
                                                                              torch.as_tensor(world.faces))
    _check_cone_y_up(core.vertices[0].numpy())
    _check_proper(core.vertices[0].numpy(), world.faces, world)
