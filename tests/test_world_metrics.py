"""The toy world's scores of a 3D model: prompt parsing, the Fréchet distance against its closed form, the metrics on
ground-truth objects rendered by the stage-1 volume renderer (right object high, wrong object low), and the same
scores of an exported GLB (its UV convention, and agreement with the field it was exported from)."""
import numpy as np
import pytest
import torch

from l2vsd_core.export import opacity_iou
from l2vsd_core.scene.cameras import orbit_cameras
from l2vsd_core.scene.renderer import VolumeRenderer
from l2vsd_core.toys.world.metrics import (GroundTruthField, frechet_distance, load_glb, orbit, parse_prompt,
                                           prompt_fidelity, render_mesh, render_model, score_glb, score_model,
                                           silhouette_iou)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_prompt():
    assert parse_prompt("a red cube") == ("cube", "red")
    assert parse_prompt("An Orange torus, back view") == ("torus", "orange")
    with pytest.raises(ValueError, match="not a prompt of the toy world.*COLOR one of"):
        parse_prompt("a delicious hamburger")


def test_frechet_distance_matches_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5])
    b = torch.randn(20000, 4, generator=g) * 2 + shift  # N(shift, 4I): ‖Δμ‖² + tr(I + 4I − 2·2I) = 5.25 + 4 · 1
    assert frechet_distance(a, b) == pytest.approx(5.25 + 4.0, rel=0.03)
    with pytest.raises(ValueError, match="two feature sets"):
        frechet_distance(a[:1], b)


@pytest.fixture(scope="module")
def renders():
    renderer = VolumeRenderer(radius=1.0, num_samples_per_ray=64)
    cams = orbit(8)
    return cams, {(s, c): render_model(renderer, GroundTruthField(s, c), cams)
                  for s, c in [("cube", "red"), ("sphere", "blue"), ("torus", "green")]}


def test_fidelity_is_high_for_the_right_object_and_low_for_a_wrong_one(renders):
    _, views = renders
    for (shape, color), (rgb, _) in views.items():
        assert rgb.shape == (8, 3, 32, 32)
        assert prompt_fidelity(rgb, shape, color) > 0.9, (shape, color)
    assert prompt_fidelity(views[("sphere", "blue")][0], "cube", "red") < 0.05
    assert prompt_fidelity(views[("cube", "red")][0], "cube", "blue") < 0.05  # right shape, wrong colour


def test_silhouette_iou_prefers_the_right_shape(renders):
    cams, views = renders
    for shape, other in [("sphere", "torus"), ("torus", "cube"), ("cube", "torus")]:
        opacity = views[next(k for k in views if k[0] == shape)][1]
        assert silhouette_iou(opacity, cams, shape) > 0.8
        assert silhouette_iou(opacity, cams, shape) > silhouette_iou(opacity, cams, other) + 0.1, (shape, other)
    assert silhouette_iou(torch.zeros(8, 32, 32), cams, "cube") == 0.0


# ------------------------------------------------------------------------------------------------ exported GLBs
def test_glb_texture_lands_where_the_uvs_say(tmp_path):
    """A quad facing the front camera, its texture's quadrants red / green (top row of the image) and blue / yellow:
    the render must show them in the same places, through save_mesh's glTF (v down) and trimesh's uv (v up)."""
    import trimesh
    from PIL import Image
    from l2vsd_core.export import save_mesh

    half = 0.3  # the front camera (azimuth 0) sits on +x with z up, so image right is +y
    corners = np.array([[0, -half, -half], [0, half, -half], [0, half, half], [0, -half, half]], float)
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)  # OpenGL's: (0, 0) bottom-left
    quadrants = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], np.uint8)  # row 0 = top
    image = Image.fromarray(quadrants).resize((16, 16), Image.NEAREST)
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=image, baseColorFactor=[255, 255, 255, 255])
    quad = trimesh.Trimesh(corners, [[0, 1, 2], [0, 2, 3]], process=False,
                           visual=trimesh.visual.TextureVisuals(uv=uv, material=material))
    path = save_mesh(quad, tmp_path / "quad.glb")
    front = orbit_cameras(1, 0.0, 1.25, 55.0, 32, 32, start_azimuth_deg=0.0)
    rgb, opacity = render_mesh(load_glb(path), front)
    expected = {(10, 10): (1, 0, 0), (10, 21): (0, 1, 0), (21, 10): (0, 0, 1), (21, 21): (1, 1, 0)}
    for (row, col), colour in expected.items():
        assert torch.allclose(rgb[0, :, row, col], torch.tensor(colour, dtype=torch.float32), atol=1e-3), (row, col)
    assert opacity[0, 16, 16] == 1 and opacity[0, 1, 1] == 0 and torch.equal(rgb[0, :, 1, 1], torch.ones(3))


@pytest.fixture(scope="module")
def true_glbs(tmp_path_factory):
    """GLBs of ground-truth objects, made as a run's stage-1 export is (isosurface, xatlas, baked texture)."""
    from l2vsd_core.export import bake_texture, extract_mesh, save_mesh
    folder = tmp_path_factory.mktemp("glb")
    paths = {}
    for shape, color in [("cube", "red"), ("torus", "green"), ("cube", "blue")]:
        field = GroundTruthField(shape, color)
        mesh = bake_texture(extract_mesh(field, resolution=64), field, texture_size=256)
        paths[shape, color] = save_mesh(mesh, folder / f"{color}_{shape}.glb")
    return paths


def test_glb_of_the_true_object_scores_like_the_field(true_glbs):
    renderer = VolumeRenderer(radius=1.0, num_samples_per_ray=64)
    cams = orbit()
    references = {}
    for shape, color in [("cube", "red"), ("torus", "green")]:
        field = GroundTruthField(shape, color)
        # the reference "prior samples": the true object from another orbit, so its Fréchet distance is small
        references[shape, color], _ = render_model(renderer, field, orbit_cameras(16, 30.0, 1.4, 50.0, 32, 32))
        prompt = f"a {color} {shape}"
        glb = score_glb(true_glbs[shape, color], prompt, None, reference=references[shape, color])
        nerf = score_model(renderer, field, prompt, None, reference=references[shape, color])
        # the export follows the volume renders (export.extract_mesh), and the field's skirt, density 200·sigmoid(−400·sdf),
        # is opaque to grazing rays out to sdf ≈ 0.01: the renders' silhouettes (so the GLB's) are a little larger than
        # the object's (the red cube's render scores 0.895 against its own silhouette, 32 px; the GLB 0.87)
        assert glb.fidelity > 0.95 and glb.iou > 0.85, (prompt, glb)
        assert abs(glb.fidelity - nerf.fidelity) < 0.02, (prompt, glb, nerf)
        # the rasterized isosurface has the sharper silhouette (the volume renderer blurs edges a little)
        assert abs(glb.iou - nerf.iou) < 0.1, (prompt, glb, nerf)
        assert abs(glb.frechet - nerf.frechet) < 3.0, (prompt, glb, nerf)
        # pixel for pixel the same colours where both cover: a flipped v would put other charts' shades there
        rgb, opacity = render_mesh(load_glb(true_glbs[shape, color]), cams)
        rgb_nerf, opacity_nerf = render_model(renderer, field, cams)
        both = (opacity > 0.5) & (opacity_nerf > 0.5)
        assert (rgb - rgb_nerf).abs().mean(1)[both].mean() < 0.05, prompt
        assert opacity_iou(opacity, opacity_nerf) > 0.95, prompt  # the GLB's silhouettes are the renders'

    red = score_glb(true_glbs["cube", "red"], "a red cube", None, reference=references["cube", "red"])
    blue = score_glb(true_glbs["cube", "blue"], "a red cube", None, reference=references["cube", "red"])
    assert blue.fidelity < 0.05 and blue.iou > 0.85  # the wrong colour, the right shape (0.85: see above)
    assert blue.frechet > red.frechet + 10, (blue, red)


def test_glb_without_a_texture_is_refused(tmp_path):
    import trimesh
    from l2vsd_core.export import save_mesh
    path = save_mesh(trimesh.creation.box(extents=(0.5, 0.5, 0.5)), tmp_path / "plain.glb")
    with pytest.raises(ValueError, match="no base-colour texture"):
        load_glb(path)


def test_volume_opacity_skips_only_what_adds_nothing():
    """The occupancy grid that makes the mesh IoU's volume renders cheap changes their opacity by < 0.01."""
    from l2vsd_core.toys.world.metrics import volume_opacity
    field = GroundTruthField("cone", "green")
    cams = orbit_cameras(4, 15.0, 1.5, 70.0, 32, 32)
    fast = volume_opacity(field, cams, 1.0, 64)
    with torch.no_grad():
        full = VolumeRenderer(radius=1.0, num_samples_per_ray=64).eval().render_camera(cams, field, None,
                                                                                      stratified=False)
    assert (fast - full["opacity"][..., 0]).abs().max() < 0.01
    assert (fast > 0.5).sum() > 100


def _fake_run(folder, stages=1):
    """A run folder as ``generate`` leaves it, as far as :func:`demo.mesh_iou` reads it: config.json."""
    import json
    from l2vsd_core.config import ExportConfig, RunConfig
    config = RunConfig(stages=stages, export=ExportConfig(turntable_views=8, turntable_resolution=32))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"options": {"radius": 1.0, "samples_per_ray": 64,
                                                                "stages": stages},
                                                    "config": config.to_json()}, default=str))
    return folder


def test_demo_mesh_iou_is_the_stage1_glb_against_the_volume_renders(tmp_path):
    from l2vsd_core.config import ExportConfig
    from l2vsd_core.pipeline import export_nerf
    from l2vsd_core.toys.world import demo
    from l2vsd_core.toys.world.metrics import glb_volume_iou

    cone, cube = GroundTruthField("cone", "green"), GroundTruthField("cube", "red")
    run = _fake_run(tmp_path / "run")
    assert demo.stage1_glb(run) is None and demo.mesh_iou(run, field=cone) is None  # nothing exported yet
    export_nerf(cone, ExportConfig(mesh_resolution=48, texture_size=128), run / "model.glb")
    assert demo.stage1_glb(run) == run / "model.glb"
    matched = demo.mesh_iou(run, field=cone)
    assert matched > 0.93  # the cone's GLB against the cone's renders
    # the same GLB against another object's renders: the IoU says so
    assert demo.mesh_iou(run, field=cube) < matched - 0.2
    cams = orbit_cameras(8, 15.0, 1.5, 70.0, 32, 32)  # the turntable orbit of the fake run's config
    assert glb_volume_iou(run / "model.glb", cone, cams, 1.0, 64) == pytest.approx(matched)
    # a run taken on to stage 2: model.glb is the refined mesh's, model_s1.glb the stage-1 one
    later = _fake_run(tmp_path / "later", stages=2)
    export_nerf(cube, ExportConfig(mesh_resolution=32, texture_size=64), later / "model.glb")
    assert demo.stage1_glb(later) is None  # model.glb is not stage 1's
    (later / "model_s1.glb").write_bytes((run / "model.glb").read_bytes())
    assert demo.stage1_glb(later) == later / "model_s1.glb"
    assert demo.mesh_iou(later, field=cone) == pytest.approx(matched)
