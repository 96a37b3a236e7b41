"""Stages 2 and 3 (geometry and texture refinement): the mesh renderer against the volume renderer and finite
differences, the two loops on a tiny latent prior (steps, regularizers, NaN guard, bit-exact resume, refused
checkpoints), the colour-function bake, and ``generate(stages=3)`` end to end with resume.

References are independent of the code under test: an analytic two-ball density rendered by the volume renderer,
central finite differences in float64, uninterrupted runs."""
import json
import math

import pytest
import torch

import tiny_sd
from l2vsd_core.distill import DistillConfig
from l2vsd_core.mesh.dmtet import DMTet, TriangleMesh
from l2vsd_core.mesh.mesh_renderer import MeshRenderer
from l2vsd_core.config import GeometryConfig, TextureConfig
from l2vsd_core.export import save_textured_mesh, y_up_to_world
from l2vsd_core.mesh.dmtet import dmtet_from_density
from l2vsd_core.scene.field import TextureField
from l2vsd_core.stages import GeometryStage, TextureStage
from l2vsd_core.prior import load_prior
from l2vsd_core.prompts import PromptProcessor
from l2vsd_core.scene.cameras import CameraBatch
from l2vsd_core.scene.field import BackgroundConfig, EnvironmentBackground, FieldConfig, ImplicitVolume
from l2vsd_core.scene.hashgrid import HashGridConfig
from l2vsd_core.scene.renderer import VolumeRenderer
from l2vsd_core.schedules import TimestepSampler
from l2vsd_core.score import LoRAScore

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:prompt .* tokens long")]

TINY_GRID = HashGridConfig(n_levels=2, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4,
                           per_level_scale=2.0)


# ------------------------------------------------------------------------------------------------ an analytic scene
BALLS = [(torch.tensor([0.15, 0.2, 0.25]), 0.3), (torch.tensor([-0.25, -0.1, -0.15]), 0.2)]  # no symmetry


def inside_distance(x):
    """Distance inside the union of the balls (negative outside): a smooth field whose level 0 is the surface."""
    return torch.stack([radius - (x - centre.to(x.dtype)).norm(dim=-1) for centre, radius in BALLS]).amax(0)


def two_balls(x):
    """Density ramping from 1000 inside to 0 outside over a shell 0.01 wide; the level 500 is the balls' surface."""
    return 1000.0 * (inside_distance(x) / 0.01 + 0.5).clamp(0.0, 1.0)


class TwoBalls(torch.nn.Module):
    radius = 1.0

    def density(self, x):
        return two_balls(x)

    def forward(self, x, directions=None):
        return {"density": two_balls(x), "rgb": torch.ones_like(x)}


@pytest.fixture(scope="module")
def balls_mesh():
    dmtet = DMTet(32)
    dmtet.init_from_density(inside_distance, threshold=0.0)  # the same surface as two_balls at LEVEL
    with torch.no_grad():
        return dmtet()


def test_mesh_lines_up_with_the_volume_renderer(balls_mesh):
    """Same cameras, same pixels: silhouettes agree (IoU > 0.9; a flipped image would not), the surface points lie
    at the volume renderer's depth, and the normals face the camera."""
    cams = CameraBatch.from_spherical([20.0, -5.0], [30.0, 200.0], 1.5, 45.0, 64, 48)  # a batch, not square
    mesh_out = MeshRenderer().render(balls_mesh, cams)
    volume_out = VolumeRenderer(radius=1.0, num_samples_per_ray=256).eval().render_camera(cams, TwoBalls(), None)
    for b in range(2):
        m, v = mesh_out["opacity"][b, ..., 0] > 0.5, volume_out["opacity"][b, ..., 0] > 0.5
        assert m.shape == (48, 64) and 200 < m.sum() < 0.5 * m.numel()
        iou = float((m & v).sum() / (m | v).sum())
        assert iou > 0.9, iou
        for flipped in (m.flip(0), m.flip(1)):  # the test can tell up from down and left from right
            assert float((flipped & v).sum() / (flipped | v).sum()) < 0.7
        both = m & v & (volume_out["opacity"][b, ..., 0] > 0.99)
        origin = cams.position[b]
        mesh_depth = (mesh_out["position"][b][both] - origin).norm(dim=-1)
        assert (mesh_depth - volume_out["depth"][b, ..., 0][both]).abs().median() < 0.02
        towards_camera = origin - mesh_out["position"][b][both]
        assert ((mesh_out["normal"][b][both] * towards_camera).sum(-1) > 0).float().mean() > 0.97
    comp = mesh_out["comp_normal"]
    assert comp.min() >= 0 and comp.max() <= 1
    off, on = mesh_out["opacity"][..., 0] == 0, mesh_out["opacity"][..., 0] == 1  # away from the antialiased edge
    assert torch.all(comp[off] == 0)  # threestudio's black background
    # inside, (n + 1) / 2 except where antialiasing blends one surface over another (an occluding silhouette)
    unblended = ((comp[on] - (mesh_out["normal"][on] + 1) / 2).abs().amax(-1) < 1e-6).float().mean()
    assert unblended > 0.9


def test_rgb_is_the_colour_function_over_the_volume_renderers_background(balls_mesh):
    cams = CameraBatch.from_spherical(10.0, 45.0, 1.5, 45.0, 32, 32)
    calls = []

    def red(points, dirs):
        calls.append(points.shape[0])
        assert torch.allclose(dirs.norm(dim=-1), torch.ones(len(dirs)))
        return torch.tensor([1.0, 0.0, 0.0]).expand_as(points)

    sky = lambda d: d * 0.5 + 0.5  # noqa: E731
    out = MeshRenderer().render(balls_mesh, cams, rgb_fn=red, background=sky)
    inside = out["opacity"][0, ..., 0] == 1
    outside = out["opacity"][0, ..., 0] == 0
    assert torch.allclose(out["rgb"][0][inside], torch.tensor([1.0, 0.0, 0.0]))
    volume = VolumeRenderer(radius=1.0, num_samples_per_ray=8).eval().render_camera(cams, TwoBalls(), sky)
    far = outside & (volume["opacity"][0, ..., 0] == 0)
    assert far.sum() > 100 and torch.allclose(out["rgb"][0][far], volume["rgb"][0][far], atol=1e-6)
    assert calls == [int(out["mask"].sum())]
    away = CameraBatch.from_spherical(10.0, 45.0, 1.5, 45.0, 16, 16)
    away.c2w[:, :3, 2] *= -1  # looking away from the mesh
    empty = MeshRenderer().render(balls_mesh, away, rgb_fn=red, background=sky)
    assert empty["opacity"].sum() == 0 and len(calls) == 1  # never called with 0 points


def test_gradients_wrt_vertices_match_finite_differences():
    """float64: d(weighted comp_normal + weighted opacity)/d vertices by autograd vs central differences; the
    opacity alone has a nonzero (silhouette) gradient."""
    dmtet = DMTet(4).double()
    with torch.no_grad():
        p = dmtet.grid_vertices
        dmtet.sdf.copy_(((p - torch.tensor([0.07, -0.04, 0.03], dtype=torch.float64)) / torch.tensor(
            [0.7, 0.5, 0.6], dtype=torch.float64)).norm(dim=-1) - 1.0)
        mesh = dmtet()
    cams = CameraBatch.from_spherical(25.0, 40.0, 2.2, 50.0, 20, 20, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    w_normal = torch.rand(1, 20, 20, 3, generator=g, dtype=torch.float64)
    w_opacity = torch.rand(1, 20, 20, 1, generator=g, dtype=torch.float64)
    renderer = MeshRenderer()

    def objective(vertices):
        out = renderer.render(TriangleMesh(vertices, mesh.faces), cams)
        return (w_normal * out["comp_normal"]).sum() + (w_opacity * out["opacity"]).sum()

    vertices = mesh.vertices.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(vertices), vertices)
    vertices2 = mesh.vertices.clone().requires_grad_(True)
    (opacity_grad,) = torch.autograd.grad(renderer.render(TriangleMesh(vertices2, mesh.faces), cams)["opacity"].sum(),
                                          vertices2)
    assert opacity_grad.abs().sum() > 1.0
    picks = torch.randperm(vertices.numel(), generator=g)[:12].tolist()
    picks += grad.abs().flatten().topk(4).indices.tolist()
    eps = 1e-6
    for flat in picks:
        plus, minus = mesh.vertices.clone(), mesh.vertices.clone()
        plus.view(-1)[flat] += eps
        minus.view(-1)[flat] -= eps
        fd = (objective(plus) - objective(minus)) / (2 * eps)
        assert float(grad.view(-1)[flat]) == pytest.approx(float(fd), rel=1e-4, abs=1e-6), flat


# ----------------------------------------------------------------------------------------------------- the loops
@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refine")
    return tiny_sd.save_diffusers_folder(tiny_sd.build_tiny(tmp, seed=0, family="sd15"), tmp / "eps")


def _stage1_field():
    """A fresh stage-1 field: its blob bias alone gives a ball to refine."""
    return ImplicitVolume(FieldConfig(hashgrid=TINY_GRID, backend="torch", mlp_neurons=16, normal_type=None),
                          seed=1)


def _distill(method, **kw):
    return DistillConfig(method=method, timesteps=TimestepSampler(1000, 0.02, 0.98), **kw)


def _score(prior, name):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LoRAScore(prior.unet, prior.alphas_cumprod, prior.prediction_type, rank=2, lr=1e-3, seed=0,
                         adapter_name=name)


def _geometry(prior_dir, method="sds", **kw):
    prior = load_prior(prior_dir, device="cpu")
    base = dict(steps=6, seed=3, resolution=16, dmtet_resolution=12, bbox_resolution=16, checkpoint_every=0,
                preview_every=0, preview_resolution=16, distill=_distill(method, guidance_scale=100.0))
    base.update(kw)
    score = _score(prior, "geometry") if method != "sds" else None
    prompts = PromptProcessor(prior.encode_text, "a red cube", negative_prompt="blurry")
    return GeometryStage.from_stage1(prior, score, prompts, _stage1_field(), GeometryConfig(**base))


def _sphere():
    dmtet = DMTet(10)
    with torch.no_grad():
        dmtet.sdf.copy_(dmtet.grid_vertices.norm(dim=-1) - 0.45)
        return dmtet()


def _texture(prior_dir, method="vsd", mesh=None, **kw):
    prior = load_prior(prior_dir, device="cpu")
    base = dict(steps=6, seed=5, resolution=16, checkpoint_every=0, preview_every=0, preview_resolution=16,
                distill=_distill(method))
    base.update(kw)
    score = _score(prior, "texture") if method != "sds" else None
    prompts = PromptProcessor(prior.encode_text, "a red cube", negative_prompt="blurry")
    field = TextureField(hashgrid=TINY_GRID, backend="torch", mlp_neurons=16, seed=7)
    background = EnvironmentBackground(BackgroundConfig(sh_degree=2, mlp_neurons=8, mlp_hidden_layers=1), seed=8)
    return TextureStage(prior, score, prompts, _sphere() if mesh is None else mesh, field, background,
                          TextureConfig(**base))


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_defaults_are_threestudios():
    g, t = GeometryConfig(), TextureConfig()
    assert (g.steps, g.resolution, g.lr, g.betas, g.eps) == (15000, 512, 0.005, (0.9, 0.99), 1e-15)
    assert (g.lambda_normal_consistency, g.lambda_laplacian_smoothness, g.dmtet_resolution) == (10000, 10000, 64)
    assert (g.distill.method, g.distill.guidance_scale, g.distill.weighting) == ("sds", 100.0, "sds")
    assert (g.distill.timesteps.min_step_percent, list(g.distill.timesteps.max_step_percent)) == \
        (0.02, [5000, 0.98, 0.5, 5001])
    # stage 3 takes stage 1's estimator, as in threestudio (there VSD; here the pack's default, L²-VSD)
    assert (t.steps, t.resolution, t.distill.method, t.distill.guidance_scale) == (30000, 512, "l2vsd", 7.5)
    assert (t.lr_encoding, t.lr_network, t.lr_background) == (0.01, 0.001, 0.001)
    assert list(t.distill.timesteps.max_step_percent) == [5000, 0.98, 0.5, 5001]
    with pytest.raises(ValueError, match="dmtet_resolution"):
        GeometryConfig(dmtet_resolution=1)
    with pytest.raises(ValueError, match="lambda_laplacian_smoothness"):
        GeometryConfig(lambda_laplacian_smoothness=-1.0)
    with pytest.raises(ValueError, match="lr_encoding"):
        TextureConfig(lr_encoding=float("nan"))


def test_geometry_steps_move_the_sdf_and_report_the_regularizers(prior_dir):
    geo = _geometry(prior_dir)
    # initialised from the stage-1 density: a closed surface inside a box around the blob
    bbox = geo.dmtet.bbox
    assert torch.all(bbox[0] > -1) and torch.all(bbox[1] < 1) and geo.dmtet.isosurface_threshold > 0
    before = _state(geo.dmtet)
    terms = [geo.step() for _ in range(3)]
    for t in terms:
        assert t["skipped"] == 0.0 and math.isfinite(t["loss"]) and t["mesh_faces"] > 100
        assert t["loss_normal_consistency"] >= 0 and t["loss_laplacian_smoothness"] > 0 and "loss_distill" in t
    after = _state(geo.dmtet)
    assert not torch.equal(before["sdf"], after["sdf"]) and not torch.equal(before["deformation"],
                                                                            after["deformation"])
    assert torch.equal(before["bbox"], after["bbox"])
    preview = geo.preview()
    assert preview.shape == (16, 16, 3) and preview.max() > 0


def test_geometry_regularizers_alone_go_down(prior_dir):
    """Without the prior (lambda_distill 0), the loop minimises threestudio's mesh terms."""
    geo = _geometry(prior_dir, lambda_distill=0.0)
    totals = []
    for _ in range(8):
        t = geo.step()
        assert "loss_distill" not in t
        totals.append(t["loss"])
    assert totals[-1] < 0.9 * totals[0]


@pytest.mark.parametrize("method", ["sds", "vsd"])
def test_geometry_resume_is_exact(prior_dir, tmp_path, method):
    n = 4
    straight = _geometry(prior_dir, method)
    reference = [straight.step()["loss"] for _ in range(n)]
    first = _geometry(prior_dir, method)
    part1 = [first.step()["loss"] for _ in range(n // 2)]
    ckpt = first.save_checkpoint(tmp_path / "geometry.safetensors")
    sidecar = json.loads((tmp_path / "geometry.safetensors.json").read_text())
    assert sidecar["format"] == "l2vsd_geometry/1" and sidecar["step"] == 2
    del first
    torch.manual_seed(999)  # another process, another global RNG state
    second = _geometry(prior_dir, method)
    assert second.load_checkpoint(ckpt)["step"] == n // 2
    part2 = [second.step()["loss"] for _ in range(n - n // 2)]
    assert part1 + part2 == reference
    for k, v in _state(straight.dmtet).items():
        assert torch.equal(v, _state(second.dmtet)[k]), k


def test_geometry_nan_guard_and_empty_mesh(prior_dir, monkeypatch):
    import l2vsd_core.stages.base as refine

    geo = _geometry(prior_dir)
    real = refine.score_distillation

    def nan_loss(*args, **kwargs):
        result = real(*args, **kwargs)
        result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(refine, "score_distillation", nan_loss)
    before = _state(geo.dmtet)
    t = geo.step()
    assert t["skipped"] == 1.0 and t["skip_reason_loss"] == 1.0 and geo.skipped_steps == 1 and geo.global_step == 1
    assert all(torch.equal(v, _state(geo.dmtet)[k]) for k, v in before.items())
    monkeypatch.setattr(refine, "score_distillation", real)
    assert geo.step()["skipped"] == 0.0
    with torch.no_grad():
        geo.dmtet.sdf.fill_(1.0)  # no sign change left
    t = geo.step()
    assert t["skipped"] == 1.0 and t["skip_reason_empty_mesh"] == 1.0 and geo.skipped_steps == 2
    with pytest.raises(ValueError, match="refined surface is empty"):
        geo.final_mesh()


def test_texture_steps_change_only_the_colour(prior_dir):
    tex = _texture(prior_dir, "vsd")
    mesh_before = [t.clone() for t in tex.mesh]
    field_before, lora_before = _state(tex.field), tex.score.trainable_state_dict()
    terms = [tex.step() for _ in range(3)]
    assert all(t["skipped"] == 0.0 and math.isfinite(t["loss"]) and "loss_lora" in t for t in terms)
    assert all(torch.equal(a, b) for a, b in zip(mesh_before, tex.mesh))
    assert not any(p.requires_grad for p in tex.mesh)
    assert any(not torch.equal(v, _state(tex.field)[k]) for k, v in field_before.items())
    assert any(not torch.equal(v, tex.score.trainable_state_dict()[k]) for k, v in lora_before.items())
    assert tex.preview().shape == (16, 16, 3)


@pytest.mark.parametrize("method", ["sds", "l2vsd"])
def test_texture_resume_is_exact(prior_dir, tmp_path, method):
    n = 4
    straight = _texture(prior_dir, method)
    reference = [straight.step()["loss"] for _ in range(n)]
    first = _texture(prior_dir, method)
    part1 = [first.step()["loss"] for _ in range(n // 2)]
    ckpt = first.save_checkpoint(tmp_path / "texture.safetensors")
    torch.manual_seed(999)
    second = _texture(prior_dir, method)
    second.load_checkpoint(ckpt)
    part2 = [second.step()["loss"] for _ in range(n - n // 2)]
    assert part1 + part2 == reference
    for k, v in _state(straight.field).items():
        assert torch.equal(v, _state(second.field)[k]), k


def test_refused_checkpoints(prior_dir, tmp_path):
    from l2vsd_core.config import NerfConfig
    from l2vsd_core.stages import NerfStage, make_volume_renderer

    geo = _geometry(prior_dir)
    geo.step()
    good = geo.save_checkpoint(tmp_path / "g.safetensors")
    with pytest.raises(ValueError, match="lambda_normal_consistency: checkpoint 10000.0, now 5.0"):
        _geometry(prior_dir, lambda_normal_consistency=5.0).load_checkpoint(good)
    with pytest.raises(ValueError, match="dmtet_resolution"):
        _geometry(prior_dir, dmtet_resolution=10).load_checkpoint(good)
    assert _geometry(prior_dir, steps=50, checkpoint_every=5).load_checkpoint(good)["step"] == 1  # cadence: fine
    tex = _texture(prior_dir, "sds")
    with pytest.raises(ValueError, match="not a valid texture-stage checkpoint"):
        tex.load_checkpoint(good)
    tex.step()
    tex_ckpt = tex.save_checkpoint(tmp_path / "t.safetensors")
    other_mesh = TriangleMesh(_sphere().vertices * 1.1, _sphere().faces)
    with pytest.raises(ValueError, match="made on another mesh"):
        _texture(prior_dir, "sds", mesh=other_mesh).load_checkpoint(tex_ckpt)
    # a stage-1 checkpoint is not a geometry checkpoint
    prior = load_prior(prior_dir, device="cpu")
    s1 = NerfConfig(steps=1, widths=(16,), resolution_milestones=(), num_samples_per_ray=8, grid_resolution=8,
                      preview_resolution=16, distill=_distill("sds"))
    prompts = PromptProcessor(prior.encode_text, "a red cube")
    stage1 = NerfStage(prior, None, prompts, _stage1_field(), None, make_volume_renderer(s1), s1)
    s1_ckpt = stage1.save_checkpoint(tmp_path / "s1.safetensors")
    with pytest.raises(ValueError, match="not a valid geometry-stage checkpoint"):
        _geometry(prior_dir).load_checkpoint(s1_ckpt)


def test_no_surface_and_bad_inputs(prior_dir):
    empty = ImplicitVolume(FieldConfig(hashgrid=TINY_GRID, backend="torch", mlp_neurons=16, normal_type=None,
                                       density_bias=-30.0), seed=1)
    with pytest.raises(ValueError, match="no surface to refine .*train stage 1 longer"):
        dmtet_from_density(empty.density, 1.0, resolution=8, bbox_resolution=8)
    with pytest.raises(ValueError, match="no surface to refine"):
        _geometry(prior_dir, isosurface_threshold=1e9)
    with pytest.raises(ValueError, match="needs a trainable score"):
        prior = load_prior(prior_dir, device="cpu")
        GeometryStage(prior, None, PromptProcessor(prior.encode_text, "x"), DMTet(4),
                        GeometryConfig(resolution=16, preview_resolution=16, distill=_distill("vsd")))
    with pytest.raises(ValueError, match=r"resolution 9 \(renders \[9\].*must be a multiple of the prior.s pixel factor 2"):
        _geometry(prior_dir, resolution=9)
    with pytest.raises(ValueError, match="needs a mesh with faces"):
        _texture(prior_dir, "sds", mesh=TriangleMesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)))


def test_export_bakes_any_colour_function(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    pytest.importorskip("xatlas")
    mesh = _sphere()
    baked, path = save_textured_mesh(mesh, lambda p, d: torch.where(p[:, :1] > 0, 1.0, 0.0).expand(-1, 3).clone(),
                                     tmp_path / "m.glb", texture_size=64)
    loaded = trimesh.load(path, force="mesh")
    image = loaded.visual.material.baseColorTexture
    assert image is not None and len(loaded.faces) == len(mesh.faces)
    colours = trimesh.visual.uv_to_color(loaded.visual.uv, image)[:, :3] / 255.0
    x = y_up_to_world(loaded.vertices)[:, 0]  # the GLB is y up; the colour function saw world x
    assert colours[x > 0.1].mean() > 0.9 and colours[x < -0.1].mean() < 0.1


# ----------------------------------------------------------------------------------------------------- generate
def _options(prior_dir, out, **kw):
    import argparse
    from l2vsd_core.cli import add_generate_arguments, options_from_args
    args = ["--prompt", "a red cube", "--negative-prompt", "blurry", "--prior", str(prior_dir), "--out", str(out),
            "--method", "vsd", "--steps", "2", "--device", "cpu", "--threads", "1", "--levels", "2",
            "--log2-hashmap-size", "8", "--base-resolution", "4", "--max-resolution", "8", "--mlp-neurons", "16",
            "--backend", "torch", "--widths", "16", "--milestones", "", "--samples-per-ray", "16",
            "--grid-resolution", "8", "--lora-rank", "2", "--lora-lr", "1e-3", "--checkpoint-every", "0",
            "--preview-resolution", "16", "--texture-size", "32", "--turntable-views", "2",
            "--turntable-resolution", "16", "--stages", "3", "--geometry-steps", "2", "--geometry-resolution", "16",
            "--texture-steps", "2", "--texture-resolution", "16", "--dmtet-resolution", "12"]
    opts = options_from_args(add_generate_arguments(argparse.ArgumentParser()).parse_args(args))
    opts.update(kw)
    return opts


def test_generate_three_stages_then_resume(prior_dir, tmp_path):
    trimesh = pytest.importorskip("trimesh")
    from l2vsd_core.generate import generate

    out = tmp_path / "run"
    stages, messages = [], []
    result = generate(_options(prior_dir, out), progress=lambda d, n, t: stages.append((t["stage"], d, n)),
                      log=messages.append)
    assert stages == [(1.0, 1, 2), (1.0, 2, 2), (2.0, 1, 2), (2.0, 2, 2), (3.0, 1, 2), (3.0, 2, 2)]
    assert not result["stopped"] and result["stage_steps"] == {"stage1": 2, "geometry": 2, "texture": 2}
    for name in ("checkpoint.safetensors", "geometry.safetensors", "geometry.safetensors.json",
                 "texture.safetensors", "texture.safetensors.json", "geometry_curves.png", "texture_curves.json",
                 "model.glb", "turntable.gif", "curves.png"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["geometry"]["distill"]["method"] == "sds" and config["texture"]["distill"]["method"] == "vsd"
    assert config["geometry"]["dmtet_resolution"] == 12 and config["texture"]["resolution"] == 16
    loaded = trimesh.load(out / "model.glb", force="mesh")
    assert len(loaded.faces) > 0 and loaded.visual.material.baseColorTexture is not None
    assert len(loaded.visual.uv) == len(loaded.vertices)

    # one more texture step: stage 1 and the geometry are done, the texture stage continues from its checkpoint
    messages.clear()
    result = generate(_options(prior_dir, out, resume=True, texture_steps=3), log=messages.append)
    assert result["stage_steps"] == {"stage1": 2, "geometry": 2, "texture": 3}
    assert any("resumed from" in m and "at step 2 (texture stage)" in m for m in messages), messages
    assert [t["done"] for t in json.loads((out / "texture_curves.json").read_text())] == [1, 2, 3]
    # a longer geometry stage makes the texture checkpoint stale: the texture stage starts anew
    messages.clear()
    result = generate(_options(prior_dir, out, resume=True, geometry_steps=3, texture_steps=3), log=messages.append)
    assert result["stage_steps"] == {"stage1": 2, "geometry": 3, "texture": 3}
    assert any("starting the texture stage anew" in m for m in messages), messages


def test_generate_stops_inside_a_stage_and_checks_stages(prior_dir, tmp_path):
    from l2vsd_core.generate import GenerateError, generate

    out = tmp_path / "stop"
    seen = []
    result = generate(_options(prior_dir, out, stages=2, method="sds"),
                      progress=lambda d, n, t: seen.append(t["stage"]),
                      should_stop=lambda: seen.count(2.0) >= 1, log=lambda m: None)
    assert result["stopped"] and result["stage_steps"]["geometry"] == 1
    assert json.loads((out / "geometry.safetensors.json").read_text())["step"] == 1
    assert not (out / "model.glb").exists() and not (out / "texture.safetensors").exists()
    with pytest.raises(GenerateError, match="--stages must be 1, 2 or 3"):
        generate(_options(prior_dir, tmp_path / "bad", stages=4), log=lambda m: None)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(GenerateError, match="--dmtet-resolution must be an integer >= 2"):
        generate(_options(prior_dir, tmp_path / "bad", dmtet_resolution=1), log=lambda m: None)
    with pytest.raises(GenerateError, match="no surface to refine .*--threshold.*--resume"):
        generate(_options(prior_dir, tmp_path / "empty", stages=2, method="sds", steps=1, threshold=1e9),
                 log=lambda m: None)
    assert (tmp_path / "empty" / "checkpoint.safetensors").is_file()
    with pytest.raises(ValueError, match=r"resolution 13 \(renders \[13\].*must be a multiple of the prior.s pixel factor 2"):
        generate(_options(prior_dir, tmp_path / "bad", texture_resolution=13, method="sds"), log=lambda m: None)
