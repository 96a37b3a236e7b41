"""The procedural world (l2vsd_core.toys.world): renders, captions, and the prior trainer's export and resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from l2vsd_core.prompts import view_direction
from l2vsd_core.scene.cameras import CameraBatch
from l2vsd_core.toys.world.data import caption, make_batch, object_prompt
from l2vsd_core.toys.world.scene import (BACKGROUND, COLOR_NAMES, SHAPE_NAMES, named_objects, render, render_named,
                                         silhouette)
from l2vsd_core.toys.world.train import CHECKPOINT_NAME, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _cameras(n: int = 3, resolution: int = 32) -> CameraBatch:
    azimuth = torch.linspace(0.0, 120.0, n)
    return CameraBatch.from_spherical(25.0, azimuth, 1.5, 50.0, resolution, resolution)


def test_batches_are_deterministic_in_seed_and_index():
    a, b = make_batch(3, 5, 4), make_batch(3, 5, 4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert torch.equal(a.shape, b.shape) and torch.equal(a.color, b.color)
    assert a.images.shape == (4, 3, 32, 32) and a.images.min() >= 0 and a.images.max() <= 1
    assert not torch.equal(a.images, make_batch(3, 6, 4).images)
    assert not torch.equal(a.images, make_batch(4, 5, 4).images)


def test_background_is_the_constant_and_objects_are_inside_the_frame():
    rgb, coverage = render_named("cube", "red", _cameras())
    empty = coverage[:, 0] == 0
    background = torch.tensor(BACKGROUND).view(1, 3, 1, 1).expand_as(rgb)
    assert torch.equal(rgb.permute(0, 2, 3, 1)[empty], background.permute(0, 2, 3, 1)[empty])
    assert (coverage > 0.5).float().mean() > 0.05                     # a sizable object …
    border = torch.cat([coverage[..., 0, :], coverage[..., -1, :], coverage[..., :, 0], coverage[..., :, -1]], -1)
    assert border.max() == 0                                          # … that is not cropped


def test_every_shape_has_its_own_silhouette():
    cameras = _cameras()
    masks = {s: silhouette(named_objects(s, "blue", cameras.batch_size, yaw=0.3), cameras) for s in SHAPE_NAMES}
    for i, a in enumerate(SHAPE_NAMES):
        for b in SHAPE_NAMES[i + 1:]:
            inter = (masks[a] & masks[b]).sum().item()
            union = (masks[a] | masks[b]).sum().item()
            assert inter / union < 0.85, f"{a} and {b} look alike (silhouette IoU {inter / union:.2f})"


def test_render_named_matches_render_and_colors_differ():
    cameras = _cameras(1)
    rgb, _ = render_named("sphere", "green", cameras)
    assert torch.equal(rgb, render(named_objects("sphere", "green", 1), cameras)[0])
    means = [render_named("sphere", c, cameras)[0].mean((0, 2, 3)) for c in COLOR_NAMES]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert (means[i] - means[j]).abs().max() > 0.02, (COLOR_NAMES[i], COLOR_NAMES[j])


def test_captions_carry_the_prompt_processors_view_suffix():
    batch = make_batch(0, 1, 16, plain_caption_p=0.0)
    for b, text in enumerate(batch.captions):
        shape, color = SHAPE_NAMES[int(batch.shape[b])], COLOR_NAMES[int(batch.color[b])]
        direction = view_direction(float(batch.cameras.elevation_deg[b]), float(batch.cameras.azimuth_deg[b]))
        assert text == f"{object_prompt(shape, color)}, {direction} view"
    assert caption("cube", "red", 10.0, 0.0) == "a red cube, front view"
    assert caption("sphere", "orange", 10.0, 180.0) == "an orange sphere, back view"
    plain = make_batch(0, 1, 16, plain_caption_p=1.0).captions
    assert all(", " not in text for text in plain)


def _tiny_config(tmp: Path, steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, model="tiny", seed=5, warmup_steps=2, checkpoint_every=2,
                       export_every=1000, log_every=1, sample_grid=False, train_dir=tmp / "train",
                       export_dir=tmp / "prior")


def test_tiny_prior_trains_exports_and_loads_as_a_pixel_prior(tmp_path):
    from l2vsd_core.prior import load_prior

    train(_tiny_config(tmp_path, 2))
    folder = tmp_path / "prior"
    assert (folder / "model_index.json").is_file() and not (folder / "vae").exists()
    assert any((folder / "unet").glob("*.safetensors")) and any((folder / "text_encoder").glob("*.safetensors"))
    prior = load_prior(folder, device="cpu")
    assert prior.is_latent is False and prior.image_size == 32
    from l2vsd_core.toys.world.train import build_tokenizer
    caption_ids = build_tokenizer()("an orange cone, side view")["input_ids"]
    assert prior.tokenizer("an orange cone, side view")["input_ids"] == caption_ids   # the ids it was trained on
    text = prior.encode_text(["a red cube, front view", ""])
    assert text.shape[0] == 2 and text.dtype == torch.float32 and torch.isfinite(text).all()
    x0 = prior.encode_images(torch.rand(1, 3, 32, 32))
    out = prior(x0, torch.tensor([500]), text[:1])
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_resume_continues_exactly(tmp_path):
    from safetensors.torch import load_file

    straight = train(_tiny_config(tmp_path / "straight", 4))
    train(_tiny_config(tmp_path / "split", 2))
    resumed = train(_tiny_config(tmp_path / "split", 4), resume=True)
    assert straight.step == resumed.step == 4
    a = load_file(str(tmp_path / "straight" / "train" / CHECKPOINT_NAME))
    b = load_file(str(tmp_path / "split" / "train" / CHECKPOINT_NAME))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = (tmp_path / "split" / "train" / "train.log").read_text()
    assert "resumed" in log and "step 3 loss" in log and "step 4 loss" in log


def test_judge_api_on_a_briefly_trained_judge(tmp_path):
    from l2vsd_core.toys.world.judge import FEATURES, WEIGHTS_NAME, judge_features, judge_probabilities, train_judge

    summary = train_judge(steps=3, batch_size=8, pool=32, held_out=16, out_dir=tmp_path)
    assert 0 <= summary["shape_accuracy"] <= 1
    path = tmp_path / WEIGHTS_NAME
    images = make_batch(9, 0, 4, resolution=64).images            # another size: resized to 32 inside
    shape_p, color_p = judge_probabilities(images, path)
    assert shape_p.shape == (4, len(SHAPE_NAMES)) and color_p.shape == (4, len(COLOR_NAMES))
    assert torch.allclose(shape_p.sum(-1), torch.ones(4)) and torch.allclose(color_p.sum(-1), torch.ones(4))
    assert judge_features(images, path).shape == (4, FEATURES)


def test_shipped_judge_names_clean_renders():
    from l2vsd_core.toys.world.judge import DEFAULT_JUDGE_DIR, WEIGHTS_NAME, judge_probabilities

    if not (DEFAULT_JUDGE_DIR / WEIGHTS_NAME).is_file():
        pytest.skip("no trained judge in the package (python -m l2vsd_core.toys.world judge-train)")
    cameras = _cameras(2)
    right = total = 0
    for s in SHAPE_NAMES:
        for c in ("red", "blue", "white"):
            shape_p, color_p = judge_probabilities(render_named(s, c, cameras)[0])
            right += int((shape_p.argmax(-1) == SHAPE_NAMES.index(s)).sum() + (color_p.argmax(-1) ==
                                                                                 COLOR_NAMES.index(c)).sum())
            total += 4
    assert right / total > 0.9


def test_training_continues_from_the_export_alone(tmp_path):
    """A fresh machine has the committed export but not the (large) checkpoint: --init-from takes the export's EMA
    weights and step, then trains on with the same data stream."""
    first = train(_tiny_config(tmp_path / "a", 2))
    exported = tmp_path / "a" / "prior"
    assert json.loads((exported / "l2vsd_training.json").read_text())["step"] == 2
    config = _tiny_config(tmp_path / "b", 3)
    config.export_dir = tmp_path / "b" / "prior"
    continued = train(config, init_from=exported)
    assert continued.step == 3
    log = (tmp_path / "b" / "train" / "train.log").read_text()
    assert "initialised from the export" in log and "at step 2" in log and "step 3 loss" in log
    fresh = train(_tiny_config(tmp_path / "c", 0))
    ema = first.ema_models()[0].state_dict()
    # started from the export (fp16-rounded EMA weights), not from a fresh init, before its one step
    restarted = _trainer_from_export(exported)
    for k, v in restarted.unet.state_dict().items():
        assert torch.allclose(v, ema[k].half().float(), atol=1e-6), k
    assert any(not torch.equal(v, fresh.unet.state_dict()[k]) for k, v in restarted.unet.state_dict().items())
    with pytest.raises(ValueError, match="exclude each other"):
        train(_tiny_config(tmp_path / "a", 4), resume=True, init_from=exported)
    with pytest.raises(FileNotFoundError, match="l2vsd_training.json"):
        train(_tiny_config(tmp_path / "d", 3), init_from=tmp_path / "nowhere")


def _trainer_from_export(folder):
    from l2vsd_core.toys.world.train import Trainer
    trainer = Trainer(_tiny_config(folder.parent / "probe", 3))
    trainer.init_from_export(folder)
    return trainer


def test_objective_change_fine_tunes_and_restarts_the_ema(tmp_path):
    """--init-from an ε export with a v-prediction run: the weights carry over, the EMA warms up again from that step
    (so it does not average in the ε weights), the export says v_prediction, and the loader converts v to ε."""
    from l2vsd_core.prior import load_prior

    eps_config = _tiny_config(tmp_path / "eps", 2)
    eps_config.prediction_type = "epsilon"
    train(eps_config)
    exported = tmp_path / "eps" / "prior"
    assert json.loads((exported / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    v_config = _tiny_config(tmp_path / "v", 3)
    assert v_config.prediction_type == "v_prediction"
    v_config.export_dir = tmp_path / "v" / "prior"
    trainer = train(v_config, init_from=exported)
    assert trainer.ema_start == 2
    # one step after the restart the EMA decay is 2/11: mostly the new weights, not the ε export's
    before = _trainer_from_export(exported)
    k = next(iter(trainer.parameters))
    expected = before.ema[k].lerp(trainer.parameters[k].detach(), 1 - 2 / 11)
    assert torch.allclose(trainer.ema[k], expected, atol=1e-6)
    assert load_prior(tmp_path / "v" / "prior", device="cpu").prediction_type == "v_prediction"
    # resuming the v run with the ε objective is refused, naming the setting
    wrong = _tiny_config(tmp_path / "v", 4)
    wrong.prediction_type = "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        train(wrong, resume=True)
