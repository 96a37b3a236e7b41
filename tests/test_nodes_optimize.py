"""The nodes as adapters over the core's configs, without a ComfyUI host: a fresh L2VSD Optimize (with fresh Init NeRF
and Attach LoRA Score nodes) is ProlificDreamer's ``NerfConfig()``; its new inputs (resolution schedule, timestep
range, HiFA, regularizer weights) reach the config, and text it cannot parse is an input error naming the input; the
bundled workflows carry their recipes (the toy prior's ``recipes.TOY``, ProlificDreamer's, HiFA's); and no node module
imports the toys. Running the nodes on a real server: tests/test_comfy_server.py."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from l2vsd_core.distill import DistillConfig
from nodes.model_nodes import AttachLoRAScore, LoadedPrior, ScoreSettings
from nodes.optimize_node import L2VSDOptimize, nerf_config
from nodes.scene_nodes import InitNeRF, Scene, scene_settings

ROOT = Path(__file__).resolve().parents[1]
RUN_INPUTS = ("prompt", "negative_prompt", "resume", "checkpoint_folder")  # not settings of the config


def _defaults(node) -> dict:
    spec = node.INPUT_TYPES()
    return {name: s[1]["default"] for part in ("required", "optional") for name, s in spec.get(part, {}).items()
            if len(s) > 1 and "default" in s[1]}


def _prior(factor: int = 1):
    return LoadedPrior(prior=SimpleNamespace(vae_scale_factor=factor), source="toy", device="cpu", dtype="auto")


def _score(**changes) -> ScoreSettings:
    return AttachLoRAScore().attach(prior=_prior(), **{**_defaults(AttachLoRAScore), **changes})[0]


def _scene(**changes) -> Scene:
    """A scene of InitNeRF's settings (no field is built: the config only takes the settings)."""
    return Scene(settings=scene_settings(**{**_defaults(InitNeRF), **changes}), field=None, background=None)


def _config(score=None, scene=None, **changes):
    inputs = {k: v for k, v in {**_defaults(L2VSDOptimize), **changes}.items() if k not in RUN_INPUTS}
    return nerf_config(score or _score(), scene or _scene(), **inputs)


def _optimize(**changes):
    """L2VSDOptimize's node function with the fresh node's inputs (it stops at the first bad input, before it
    touches ComfyUI's folders)."""
    inputs = dict(prior=_prior(), score=_score(), scene=_scene(), **_defaults(L2VSDOptimize))
    inputs.update(changes)
    return L2VSDOptimize().optimize(**inputs)


def test_a_fresh_optimize_node_is_prolificdreamers_stage_1():
    from l2vsd_core.config import NerfConfig, to_json

    config, reference = _config(), NerfConfig()
    assert (config.steps, config.widths, config.resolution_milestones) == (25000, (64, 512), (5000,))
    assert to_json(config.distill.timesteps) == to_json(reference.distill.timesteps)
    for name in ("lambda_sparsity", "lambda_opaque", "lambda_z_variance", "lambda_image", "lambda_distill"):
        assert to_json(getattr(config, name)) == to_json(getattr(reference, name)), name
    assert to_json(config) == to_json(reference)  # every setting, the estimator and the renderer's included


def test_a_fresh_init_nerf_is_prolificdreamers_scene():
    """Init NeRF's defaults are the configs' (ProlificDreamer's): the hash grid and MLP (``SceneConfig()``), the learned
    environment background (``BackgroundSettings()``) and stage 1's renderer (radius, samples, occupancy grid)."""
    from l2vsd_core.config import BackgroundSettings, NerfConfig, SceneConfig

    settings = _scene().settings
    assert settings.scene == SceneConfig() and settings.background == BackgroundSettings()
    reference = NerfConfig()
    assert (settings.radius, settings.samples_per_ray, settings.grid_resolution) == \
        (reference.radius, reference.num_samples_per_ray, reference.grid_resolution)
    assert settings.seed == 0


def test_a_fresh_attach_lora_score_is_threestudios_lora():
    from l2vsd_core.config import DistillConfig, LoRAConfig

    score = _score()
    assert score.lora == LoRAConfig()  # rank 4, alpha = rank, lr 1e-4, camera dropout 0.1, last layer attention
    assert (score.lora.lr, score.lora.alpha, score.lora.last_layer) == (1e-4, None, "attention")
    assert score.distill(DistillConfig()) == DistillConfig()
    assert _score(base="separate").lora.separate_base
    for name, value in (("learning_rate", 0.0), ("camera_dropout", 1.5), ("eta", float("nan")), ("esd_lambda", 2.0),
                        ("guidance_scale", float("inf"))):
        with pytest.raises(ValueError, match=f"^input '{name}': "):
            _score(**{name: value})


def test_the_lookahead_reaches_every_stage_and_the_node_lists_the_cores_kinds():
    from l2vsd_core.config import GeometryConfig
    from l2vsd_core.distill import LOOKAHEADS
    from nodes.model_nodes import LOOKAHEADS as NODE_LOOKAHEADS

    assert NODE_LOOKAHEADS == LOOKAHEADS
    # a fresh node takes the defaults the study chose (README "Does the lookahead do anything?"), the core's; a graph
    # saved before the input existed ran sgd_mean and still does
    assert (_config().distill.lookahead, _config().distill.eta) == ("sgd_mean", 0.5) == \
        (DistillConfig().lookahead, DistillConfig().eta)
    saved = {k: v for k, v in _defaults(AttachLoRAScore).items() if k != "lookahead"}
    assert AttachLoRAScore().attach(prior=_prior(), **saved)[0].lookahead == "sgd_mean"
    for kind in LOOKAHEADS:
        score = _score(lookahead=kind, eta=0.5)
        assert (_config(score=score).distill.lookahead, _config(score=score).distill.eta) == (kind, 0.5)
        assert score.distill(GeometryConfig().distill).lookahead == kind
    with pytest.raises(ValueError, match="^input 'lookahead': 'adam' is not an option"):
        _score(lookahead="adam")


def test_init_nerf_is_a_scene_config_whose_features_reach_the_hash_grid():
    import torch

    small = dict(levels=2, log2_hashmap_size=10, base_resolution=4, max_resolution=16, mlp_neurons=8,
                 samples_per_ray=8, grid_resolution=8, radius=1.0, seed=0, backend="torch")
    scene = InitNeRF().init(**small, features_per_level=4)[0]
    assert scene.settings.scene.features_per_level == 4
    assert scene.settings.scene.hashgrid().n_features_per_level == 4
    encoding = [m for m in scene.field.modules() if hasattr(m, "n_output_dims")]
    assert encoding and encoding[0].n_output_dims == 2 * 4  # levels × features per level
    assert scene.field(torch.zeros(3, 3))["density"].shape[0] == 3
    with pytest.raises(ValueError, match="^input 'max_resolution'"):
        InitNeRF().init(**dict(small, max_resolution=2))


def test_a_scene_never_optimized_renders_with_stage_1s_fresh_renderer():
    """Export Mesh may take Init NeRF's scene directly: its renderer is the one stage 1 starts with (the scene's
    radius and samples, an occupancy grid with every cell occupied)."""
    from nodes.common import render_orbit

    small = dict(levels=2, log2_hashmap_size=10, base_resolution=4, max_resolution=16, mlp_neurons=8,
                 samples_per_ray=8, grid_resolution=8, radius=1.5, seed=0, backend="torch")
    scene = InitNeRF().init(**small)[0]
    renderer = scene.make_renderer()
    assert (renderer.radius, renderer.num_samples_per_ray) == (1.5, 8)
    assert renderer.occupancy_grid.binary.shape == (8, 8, 8) and bool(renderer.occupancy_grid.binary.all())
    images = render_orbit(renderer, scene.field, scene.background, 2, 8, 15.0, 1.5, 70.0)
    assert images.shape == (2, 8, 8, 3) and 0.0 <= float(images.min()) <= float(images.max()) <= 1.0


def test_resolution_schedule_and_timesteps_reach_the_config():
    config = _config(resolution=8, resolution_schedule="16@2", max_step_percent="5000,0.98,0.5,5001",
                     min_step_percent="0.3", sqrt_anneal=True, steps=10)
    assert (config.widths, config.resolution_milestones) == ((8, 16), (2,))
    assert [config.render_size(s) for s in (0, 1, 2, 9)] == [8, 8, 16, 16]
    assert config.preview_resolution == 8
    timesteps = config.distill.timesteps
    assert timesteps.max_step_percent == [5000, 0.98, 0.5, 5001] and timesteps.min_step_percent == 0.3
    assert timesteps.sqrt_anneal and timesteps.max_steps == 10  # HiFA's anneal spans the node's steps
    config = _config(resolution=32, resolution_schedule=" 64@100, 128@200 ", max_step_percent="0.7")
    assert (config.widths, config.resolution_milestones) == ((32, 64, 128), (100, 200))
    assert config.distill.timesteps.max_step_percent == 0.7
    assert _config(resolution=32, resolution_schedule="").widths == (32,)


def test_hifa_and_regularizer_weights_reach_the_config():
    from l2vsd_core.schedules import scheduled_value

    config = _config(lambda_image=0.01, lambda_z_variance=300.0, lambda_sparsity=2.5, lambda_opaque="0",
                     guidance_scale=20.0, seed=7)
    assert (config.lambda_image, config.lambda_z_variance, config.lambda_sparsity) == (0.01, 300.0, 2.5)
    assert config.lambda_opaque == 0.0 and config.seed == 7 and config.distill.guidance_scale == 20.0
    config = _config(lambda_opaque="100,0,50,200")
    assert [scheduled_value(config.lambda_opaque, s) for s in (0, 150, 300)] == [0.0, 25.0, 50.0]
    # -1: the score's guidance scale; the scene's renderer settings
    scene = _scene(radius=2.0, samples_per_ray=64, grid_resolution=16)
    config = _config(score=_score(guidance_scale=12.0), scene=scene)
    assert config.distill.guidance_scale == 12.0
    assert (config.radius, config.num_samples_per_ray, config.grid_resolution) == (2.0, 64, 16)


@pytest.mark.parametrize("changes, message", [
    ({"resolution_schedule": "512"}, "input 'resolution_schedule': '512' is not WIDTH@STEP"),
    ({"resolution_schedule": "512@soon"}, "input 'resolution_schedule': '512@soon' is not WIDTH@STEP"),
    ({"resolution_schedule": "128@200,256@100"}, "input 'resolution_schedule': the steps of"),
    ({"resolution_schedule": "0@10"}, "input 'resolution_schedule': '0@10' has a width or step below 1"),
    ({"min_step_percent": "two percent"}, "input 'min_step_percent': 'two percent' is not a number"),
    ({"max_step_percent": "5000,0.98,0.5"}, "input 'max_step_percent': '5000,0.98,0.5' has 3 numbers"),
    ({"max_step_percent": "5000.5,0.98,0.5,5001"}, "input 'max_step_percent': the steps of"),
    ({"max_step_percent": "nan"}, "input 'max_step_percent': 'nan' is not a number"),
    ({"max_step_percent": "5000,0.98,0.5,10"}, "input 'max_step_percent': max_step_percent: end_step 10 is before"),
    ({"max_step_percent": "1.5"}, "input 'max_step_percent': is 1.5 at step 0"),
    ({"min_step_percent": "0.6"}, "input 'min_step_percent': 0.6 is above max_step_percent 0.5 at step 5001"),
    ({"lambda_opaque": "lots"}, "input 'lambda_opaque': 'lots' is not a number"),
    ({"lambda_opaque": "10,-1,1,20"}, "input 'lambda_opaque': lambda_opaque must be a weight >= 0"),
    ({"lambda_sparsity": -1.0}, "input 'lambda_sparsity': lambda_sparsity must be a weight >= 0"),
    ({"resolution": 60}, "input 'resolution': 60 is not a multiple of the prior's pixel factor 8"),
    ({"resolution_schedule": "500@5000"}, "input 'resolution_schedule': 500 is not a multiple of the prior's"),
])
def test_bad_optimize_inputs_are_named(changes, message):
    with pytest.raises(ValueError) as error:
        _optimize(prior=_prior(factor=8), **changes)
    assert str(error.value).startswith(message)


def test_an_old_api_graph_without_the_new_inputs_calls_the_node():
    """ComfyUI passes only the inputs a graph has: the new ones are optional, with the same defaults in the
    declaration and in the signature."""
    import inspect

    for node in (L2VSDOptimize, InitNeRF):
        spec = node.INPUT_TYPES()
        parameters = inspect.signature(getattr(node, node.FUNCTION)).parameters
        for name, (_, options) in spec["optional"].items():
            assert parameters[name].default == options["default"], (node.__name__, name)
    optional = L2VSDOptimize.INPUT_TYPES()["optional"]
    assert {"resolution_schedule", "min_step_percent", "max_step_percent", "sqrt_anneal", "lambda_image",
            "lambda_z_variance", "lambda_sparsity", "lambda_opaque"} <= set(optional)


def _api(name: str) -> dict:
    return {node["class_type"]: node["inputs"]
            for node in json.loads((ROOT / "workflows" / "api" / f"{name}.api.json").read_text()).values()}


def _workflow_config(name: str):
    api = _api(name)
    widgets = lambda inputs: {k: v for k, v in inputs.items() if not isinstance(v, list)}  # noqa: E731
    score = AttachLoRAScore().attach(prior=_prior(), **widgets(api["L2VSD_AttachLoRAScore"]))[0]
    scene = Scene(settings=scene_settings(**api["L2VSD_InitNeRF"]), field=None, background=None)
    optimize = {k: v for k, v in widgets(api["L2VSD_Optimize"]).items() if k not in RUN_INPUTS}
    return score, scene, nerf_config(score, scene, **optimize)


@pytest.mark.parametrize("name", ["toy_demo", "toy_three_stage"])
def test_toy_workflows_carry_the_toy_recipe(name):
    from l2vsd_core.recipes import TOY, toy_anneal

    score, scene, config = _workflow_config(name)
    assert config.steps == TOY["steps"]
    assert list(config.widths) == TOY["widths"] and list(config.resolution_milestones) == TOY["milestones"]
    assert config.distill.timesteps.max_step_percent == toy_anneal(TOY["steps"]) == TOY["max_step_percent"]
    assert config.lambda_opaque == TOY["lambda_opaque"]
    assert (config.num_samples_per_ray, config.grid_resolution) == (TOY["samples_per_ray"], TOY["grid_resolution"])
    assert (score.lora.rank, score.lora.lr, score.guidance_scale) == (TOY["lora_rank"], TOY["lora_lr"],
                                                                      TOY["guidance_scale"])
    grid = scene.settings.scene
    assert (grid.levels, grid.log2_hashmap_size, grid.base_resolution, grid.max_resolution, grid.mlp_neurons) == \
        (TOY["levels"], TOY["log2_hashmap_size"], TOY["base_resolution"], TOY["max_resolution"], TOY["mlp_neurons"])
    assert list(scene.settings.background.color) == TOY["background_color"]


@pytest.mark.parametrize("name", ["sd21_stage1", "sd21_l2esd", "sd21_three_stage"])
def test_sd_workflows_carry_prolificdreamers_recipe(name):
    from l2vsd_core.config import LoRAConfig, NerfConfig, SceneConfig, to_json

    score, scene, config = _workflow_config(name)
    reference = NerfConfig()
    reference.distill.method = "l2vsd"
    reference.distill.esd_lambda = 0.5 if name == "sd21_l2esd" else 0.0
    assert to_json(config) == to_json(reference)
    assert score.lora == LoRAConfig() and scene.settings.scene == SceneConfig()
    assert scene.settings.background.color is None


def test_the_l2hifa_workflow_is_threestudios_hifa_recipe_with_l2vsd():
    """threestudio's prolificdreamer-hifa.yaml (at 28d9d80, shared/notes/anchors.md): t / 1000 from 0.98 down to 0.3
    by HiFA's √-anneal, the
    image-space loss at 0.01 and the z-variance at 300; everything else ProlificDreamer's."""
    import dataclasses

    from l2vsd_core.config import NerfConfig, to_json

    _, _, config = _workflow_config("sd21_l2hifa")
    timesteps = config.distill.timesteps
    assert config.distill.method == "l2vsd"
    assert (timesteps.min_step_percent, timesteps.max_step_percent, timesteps.sqrt_anneal) == \
        (0.3, 0.98, True)
    assert (config.lambda_image, config.lambda_z_variance) == (0.01, 300.0)
    hifa = dataclasses.replace(NerfConfig(), lambda_image=0.01, lambda_z_variance=300.0, distill=dataclasses.replace(
        NerfConfig().distill, timesteps=dataclasses.replace(NerfConfig().distill.timesteps, min_step_percent=0.3,
                                                            max_step_percent=0.98, sqrt_anneal=True)))
    assert to_json(config) == to_json(hifa)
    stage1 = _api("sd21_stage1")
    assert {k: v for k, v in _api("sd21_l2hifa").items() if k != "L2VSD_Optimize"} == {
        k: (dict(v, filename_prefix="3d/l2vsd_sd21_l2hifa") if k == "L2VSD_ExportMesh" else v)
        for k, v in stage1.items() if k != "L2VSD_Optimize"}


def test_no_node_module_imports_the_toys():
    """The toys are a demo of the core, not a part the nodes build on: the bundled prior's path comes from
    ``l2vsd_core.prior.BUNDLED_PRIORS``."""
    pattern = re.compile(r"^\s*(from\s+l2vsd_core\.toys|import\s+l2vsd_core\.toys|from\s+l2vsd_core\s+import\s+"
                         r"[^#\n]*\btoys\b|from\s+\.+toys)", re.MULTILINE)
    modules = sorted((ROOT / "nodes").glob("*.py"))
    assert modules
    offenders = [p.name for p in modules if pattern.search(p.read_text())]
    assert not offenders, offenders
    from l2vsd_core.prior import BUNDLED_PRIORS
    from nodes.model_nodes import _bundled_prior_path
    assert _bundled_prior_path() == BUNDLED_PRIORS["toy"]
