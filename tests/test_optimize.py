"""Stage-1 loop on a tiny latent prior (loaded by the real loader) and a tiny hash-grid field: steps of sds / l2vsd,
bit-exact resume from a checkpoint, stop requests, corrupt / mismatched checkpoints, config validation, previews."""
import json
import math

import pytest
import torch

import tiny_sd
from l2vsd_core.distill import DistillConfig
from l2vsd_core.config import NerfConfig
from l2vsd_core.stages import NerfStage, make_volume_renderer
from l2vsd_core.prior import load_prior
from l2vsd_core.prompts import PromptProcessor
from l2vsd_core.scene.field import BackgroundConfig, EnvironmentBackground, FieldConfig, ImplicitVolume
from l2vsd_core.scene.hashgrid import HashGridConfig
from l2vsd_core.schedules import TimestepSampler
from l2vsd_core.score import LoRAScore

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:prompt .* tokens long")]


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage1")
    return tiny_sd.save_diffusers_folder(tiny_sd.build_tiny(tmp, seed=0, family="sd15"), tmp / "eps")


def _config(method="l2vsd", **kw):
    base = dict(steps=6, seed=3, widths=(8, 16), resolution_milestones=(3,), num_samples_per_ray=16,
                grid_resolution=8, grid_update_every=2, checkpoint_every=0, preview_every=0, preview_resolution=8,
                preview_views=4, lambda_opaque=(2, 0.0, 1.0, 4), lambda_z_variance=0.5,
                distill=DistillConfig(method=method, timesteps=TimestepSampler(1000, 0.02, 0.98)))
    base.update(kw)
    return NerfConfig(**base)


def _build(prior_dir, config, log2_table=8):
    """Everything from scratch, as a fresh process would."""
    prior = load_prior(prior_dir, device="cpu")
    score = None
    if config.distill.needs_trainable_score:
        with torch.random.fork_rng(devices=[]):  # peft initialises the LoRA from the global RNG
            torch.manual_seed(0)
            score = LoRAScore(prior.unet, prior.alphas_cumprod, prior.prediction_type, rank=2, lr=1e-3, seed=0)
    prompts = PromptProcessor(prior.encode_text, "a red cube", negative_prompt="blurry")
    field = ImplicitVolume(FieldConfig(hashgrid=HashGridConfig(n_levels=2, n_features_per_level=2,
                                                               log2_hashmap_size=log2_table, base_resolution=4,
                                                               per_level_scale=2.0),
                                       backend="torch", mlp_neurons=16, normal_type=None), seed=1)
    background = EnvironmentBackground(BackgroundConfig(sh_degree=2, mlp_neurons=8, mlp_hidden_layers=1), seed=2)
    return NerfStage(prior, score, prompts, field, background, make_volume_renderer(config), config)


def _params(opt):
    return {n: p.detach().clone() for n, p in opt.field.named_parameters()}


@pytest.mark.parametrize("method", ["sds", "l2vsd"])
def test_steps_run_and_move_the_scene(prior_dir, method):
    opt = _build(prior_dir, _config(method))
    before = _params(opt)
    lora_before = opt.score.trainable_state_dict() if opt.score is not None else None
    losses = [opt.step() for _ in range(4)]
    for terms in losses:
        assert terms["skipped"] == 0.0 and math.isfinite(terms["loss"]) and math.isfinite(terms["loss_distill"])
    assert [t["resolution"] for t in losses] == [8, 8, 8, 16]  # milestone 3: 8 px, then 16 px (resized for 16)
    assert "loss_sparsity" in losses[0] and "loss_z_variance" in losses[0]
    assert "loss_opaque" not in losses[0] and "loss_opaque" in losses[3]  # lambda_opaque is 0 until step 2
    after = _params(opt)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if lora_before is not None:
        assert "loss_lora" in losses[0]
        lora_after = opt.score.trainable_state_dict()
        assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    assert opt.grid.num_updates.item() == 2  # steps 0 and 2


@pytest.mark.parametrize("method", ["sds", "l2vsd"])
def test_resume_is_exact(prior_dir, tmp_path, method):
    n = 6
    full = _build(prior_dir, _config(method, steps=n))
    reference = [full.step()["loss"] for _ in range(n)]

    first = _build(prior_dir, _config(method, steps=n))
    part1 = [first.step()["loss"] for _ in range(n // 2)]
    ckpt = first.save_checkpoint(tmp_path / "c.safetensors")
    del first
    torch.manual_seed(12345)  # a fresh process has another global RNG state: the checkpoint restores it
    second = _build(prior_dir, _config(method, steps=n))
    meta = second.load_checkpoint(ckpt)
    assert meta["step"] == n // 2 and second.global_step == n // 2
    part2 = [second.step()["loss"] for _ in range(n - n // 2)]
    assert part1 + part2 == reference  # bit-exact
    assert torch.equal(second.grid.binary, full.grid.binary)
    for k, v in _params(full).items():
        assert torch.equal(v, _params(second)[k]), k


def test_should_stop_leaves_a_loadable_checkpoint(prior_dir, tmp_path):
    path = tmp_path / "run" / "stage1.safetensors"
    opt = _build(prior_dir, _config("sds", steps=10, checkpoint_path=str(path)))
    calls = []
    done = opt.run(callback=lambda s, t, p: calls.append(s), should_stop=lambda: len(calls) >= 2)
    assert done == 2 and calls == [1, 2]
    assert path.exists() and (tmp_path / "run" / "stage1.safetensors.json").exists()
    sidecar = json.loads((tmp_path / "run" / "stage1.safetensors.json").read_text())
    assert sidecar["step"] == 2 and sidecar["config"]["steps"] == 10 and isinstance(sidecar["rng"]["loop"], list)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    fresh = _build(prior_dir, _config("sds", steps=10))
    fresh.load_checkpoint(path)
    assert fresh.global_step == 2
    assert math.isfinite(fresh.step()["loss"])


def test_corrupt_and_mismatched_checkpoints(prior_dir, tmp_path):
    opt = _build(prior_dir, _config("sds"))
    opt.step()
    good = opt.save_checkpoint(tmp_path / "good.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        opt.load_checkpoint(corrupt)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError):
        opt.load_checkpoint(garbage)
    bigger = _build(prior_dir, _config("sds"), log2_table=9)
    with pytest.raises(ValueError, match="does not match this configuration"):
        bigger.load_checkpoint(good)
    with_lora = _build(prior_dir, _config("vsd"))
    with pytest.raises(ValueError, match="other settings .*distill.method: checkpoint 'sds', now 'vsd'"):
        with_lora.load_checkpoint(good)
    other = _build(prior_dir, _config("sds", lambda_sparsity=3.0, seed=4))
    with pytest.raises(ValueError, match="lambda_sparsity: checkpoint 10.0, now 3.0; seed: checkpoint 3, now 4"):
        other.load_checkpoint(good)
    longer = _build(prior_dir, _config("sds", steps=20, checkpoint_every=5, preview_every=2))
    assert longer.load_checkpoint(good)["step"] == 1  # a longer run, other checkpoint/preview cadence: fine


@pytest.mark.parametrize("kw, name", [
    ({"steps": 0}, "steps"), ({"steps": -3}, "steps"), ({"lr_encoding": -0.1}, "lr_encoding"),
    ({"lr_network": -1e-3}, "lr_network"), ({"lr_background": float("nan")}, "lr_background"),
    ({"batch_size": 0}, "batch_size"), ({"widths": (8, 16), "resolution_milestones": ()}, "resolution_milestones"),
    ({"widths": ()}, "widths"), ({"lambda_sparsity": -1.0}, "lambda_sparsity"),
    ({"checkpoint_every": -1}, "checkpoint_every"), ({"num_samples_per_ray": 0}, "num_samples_per_ray"),
])
def test_bad_config_values(kw, name):
    with pytest.raises(ValueError, match=name):
        _config(**kw)


def test_resolution_must_be_a_multiple_of_the_pixel_factor(prior_dir):
    with pytest.raises(ValueError, match="resolution 9 .* pixel factor 2"):
        _build(prior_dir, _config("sds", widths=(9, 16)))


def test_callback_gets_previews_every_n_steps(prior_dir):
    opt = _build(prior_dir, _config("sds", steps=4, preview_every=2))
    got = []
    opt.run(callback=lambda s, t, p: got.append((s, None if p is None else tuple(p.shape))))
    assert got == [(1, None), (2, (8, 8, 3)), (3, None), (4, (8, 8, 3))]


def test_nan_guard_skips_and_counts(prior_dir, monkeypatch, tmp_path):
    opt = _build(prior_dir, _config("sds"))
    assert opt.step()["skipped"] == 0.0
    # a non-finite loss from the estimator: the scene is not updated
    import l2vsd_core.stages.base as optimize
    real = optimize.score_distillation

    def nan_loss(*args, **kwargs):
        result = real(*args, **kwargs)
        result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(optimize, "score_distillation", nan_loss)
    before = _params(opt)
    terms = opt.step()
    assert terms["skipped"] == 1.0 and opt.skipped_steps == 1 and opt.global_step == 2
    assert all(torch.equal(v, _params(opt)[k]) for k, v in before.items())
    monkeypatch.setattr(optimize, "score_distillation", real)
    # a broken scene (NaN weights) renders NaN: skipped too, nothing else touched
    with torch.no_grad():
        opt.field.feature_network.output_layer.weight.fill_(float("nan"))
    terms = opt.step()
    assert terms["skipped"] == 1.0 and terms.get("skip_reason_render") == 1.0 and opt.skipped_steps == 2
    path = opt.save_checkpoint(tmp_path / "nan.safetensors")
    assert json.loads((tmp_path / "nan.safetensors.json").read_text())["skipped_steps"] == 2
    assert path.exists()


def test_periodic_checkpoints(prior_dir, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    opt = _build(prior_dir, _config("sds", steps=5, checkpoint_every=2, checkpoint_path=str(path)))
    seen = []

    def callback(step, terms, preview):
        sidecar = tmp_path / "ckpt.safetensors.json"
        seen.append(json.loads(sidecar.read_text())["step"] if sidecar.exists() else None)

    opt.run(callback=callback)
    assert seen == [None, None, 2, 2, 4]  # written after steps 2 and 4 (the callback runs before the write)
    assert json.loads((tmp_path / "ckpt.safetensors.json").read_text())["step"] == 5  # and at the end


def test_hifa_image_loss_and_orientation_term(prior_dir):
    opt = _build(prior_dir, _config("vsd", lambda_image=0.01))
    terms = [opt.step() for _ in range(2)]
    assert all(math.isfinite(t["loss_image"]) and t["loss_image"] > 0 for t in terms)
    with pytest.raises(ValueError, match="lambda_orient > 0 needs normals"):
        _build(prior_dir, _config("sds", lambda_orient=0.1)).step()
    opt = _build(prior_dir, _config("sds", lambda_orient=0.1))
    opt.field.config.normal_type = "finite_difference"  # the field now returns normals
    terms = opt.step()
    assert math.isfinite(terms["loss_orient"]) and terms["loss_orient"] >= 0


@pytest.mark.parametrize("method", ["sds", "l2vsd"])
def test_a_batch_of_cameras_per_step(prior_dir, method):
    opt = _build(prior_dir, _config(method, batch_size=3))
    before = _params(opt)
    terms = [opt.step() for _ in range(2)]
    assert all(t["skipped"] == 0.0 and math.isfinite(t["loss"]) for t in terms)
    assert any(not torch.equal(before[k], v) for k, v in _params(opt).items())
