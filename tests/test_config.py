"""The one config module: JSON round trip, CLI flags built from it, flat options → RunConfig, errors that name the
flag, and recipes that belong to their prior (``--prior toy``)."""
import argparse
import json

import pytest

from l2vsd_core.cli import add_generate_arguments, given_options, options_from_args
from l2vsd_core.config import (OPTIONS, GeometryConfig, NerfConfig, RunConfig, TextureConfig, config_changes,
                               from_options, get_path, option_defaults)
from l2vsd_core.generate import GenerateError, run_config
from l2vsd_core.recipes import TOY, recipe_for, toy_anneal

REQUIRED = ["--prompt", "a red cube", "--prior", "some/model.safetensors", "--out", "out/x"]


def test_run_config_round_trips_through_json():
    config = from_options({"steps": 123, "widths": [32, 64], "milestones": [50], "method": "vsd",
                           "background_color": [1, 1, 1], "lambda_opaque": [10, 0.0, 5.0, 20], "threshold": 3.5,
                           "stages": 3, "texture_method": "l2vsd", "sqrt_anneal": True, "lora_alpha": 8.0})
    text = json.dumps(config.to_json())
    again = RunConfig.from_json(json.loads(text))
    assert again == config and again.to_json() == config.to_json()
    assert again.nerf.widths == (32, 64) and again.background.color == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown setting.*nerf.*stpes"):
        RunConfig.from_json({**config.to_json(), "nerf": {**config.to_json()["nerf"], "stpes": 1}})


def test_options_set_every_field_they_name():
    config = from_options({"seed": 7, "betas": [0.5, 0.6], "method": "vsd", "threshold": 2.0, "texture_method": None})
    assert config.nerf.seed == config.geometry.seed == config.texture.seed == 7
    assert config.nerf.betas == config.geometry.betas == config.texture.betas == (0.5, 0.6)
    assert config.nerf.distill.method == config.texture.distill.method == "vsd"
    assert config.geometry.distill.method == "sds"  # stage 2 keeps its own estimator (ProlificDreamer: SDS)
    assert config.export.threshold == config.geometry.isosurface_threshold == 2.0
    assert from_options({"method": "vsd", "texture_method": "l2vsd"}).texture.distill.method == "l2vsd"
    # each stage's √-anneal spans that stage's own steps
    config = from_options({"steps": 40, "texture_steps": 30, "sqrt_anneal": True})
    assert config.nerf.distill.timesteps.max_steps == 40 and config.texture.distill.timesteps.max_steps == 30
    for option in OPTIONS:  # every path exists
        for path in option.paths:
            get_path(RunConfig(), path)


def test_cli_defaults_are_the_config_defaults():
    parser = add_generate_arguments(argparse.ArgumentParser())
    parsed = options_from_args(parser.parse_args(REQUIRED))
    defaults = option_defaults()
    for option in OPTIONS:
        assert parsed[option.dest] == defaults[option.dest], option.dest
    assert defaults["max_step_percent"] == [5000, 0.98, 0.5, 5001] and defaults["widths"] == [64, 512]
    assert run_config(parsed) == run_config({"prompt": "a red cube", "prior": "some/model.safetensors",
                                             "out": "out/x"})
    assert given_options(REQUIRED + ["--steps", "9", "--widths", "32"]) == {
        "prompt": "a red cube", "prior": "some/model.safetensors", "out": "out/x", "steps": 9, "widths": [32]}


@pytest.mark.parametrize("options, message", [
    ({"dmtet_resolution": 1}, "--dmtet-resolution must be an integer >= 2; got 1"),
    ({"stages": 4}, "--stages must be 1, 2 or 3"),
    ({"background_color": [1, 2, 0]}, "--background-color must be three numbers in [0, 1]"),
    ({"lora_lr": -1.0}, "--lora-lr must be a finite number > 0"),
    ({"widths": [64, 512], "milestones": []}, "--milestones must be 1 increasing integers"),
    ({"stpes": 3}, "unknown option(s): stpes"),
])
def test_bad_options_name_the_flag(options, message):
    with pytest.raises(ValueError) as err:
        from_options(options)
    assert message in str(err.value)


def test_a_recipe_belongs_to_its_prior():
    sd = run_config({"prompt": "x", "prior": "models/sd21.safetensors", "out": "o"})
    assert sd == RunConfig(prompt="x", prior="models/sd21.safetensors", out="o")  # ProlificDreamer's defaults
    toy = run_config({"prompt": "x", "prior": "toy", "out": "o"})
    flat = option_defaults(toy)
    assert all(flat[k] == v for k, v in TOY.items()), {k: (flat[k], v) for k, v in TOY.items() if flat[k] != v}
    assert toy.nerf.widths == (32,) and toy.nerf.steps == 400 and toy.background.color == (1.0, 1.0, 1.0)
    # the bundled prior by path brings the same recipe; the user's own settings win, the anneal follows their steps
    from l2vsd_core.prior import BUNDLED_PRIORS
    assert recipe_for(str(BUNDLED_PRIORS["toy"])) == recipe_for("toy") == TOY
    mine = run_config({"prompt": "x", "prior": "toy", "out": "o", "steps": 100, "widths": [16]})
    assert mine.nerf.steps == 100 and mine.nerf.widths == (16,)
    assert mine.nerf.distill.timesteps.max_step_percent == toy_anneal(100) == [20, 0.98, 0.5, 21]
    with pytest.raises(GenerateError, match="--steps must be an integer >= 1"):
        run_config({"prompt": "x", "prior": "toy", "out": "o", "steps": 0})


def test_the_bundled_prior_loads_by_name():
    from l2vsd_core.prior import load_prior
    prior = load_prior("toy", device="cpu")
    assert prior.image_size == 32 and prior.prediction_type == "v_prediction"


def test_settings_added_since_a_checkpoint_count_as_their_defaults():
    saved = NerfConfig().to_json()
    del saved["lambda_distill"]  # an older checkpoint's config has no such key
    assert config_changes(saved, NerfConfig().to_json(), NerfConfig().to_json()) == []
    changed = config_changes(saved, NerfConfig(lambda_distill=0.5).to_json(), NerfConfig().to_json())
    assert changed == [("lambda_distill", 1.0, 0.5)]
    # only the step count, checkpoint and preview settings may change on resume
    assert config_changes(GeometryConfig().to_json(), GeometryConfig(steps=5, preview_every=3).to_json()) == []
    assert [k for k, _a, _b in config_changes(TextureConfig().to_json(), TextureConfig(lr_network=0.5).to_json())] \
        == ["lr_network"]
