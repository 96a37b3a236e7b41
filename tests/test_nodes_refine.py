"""The refine nodes and ExportMesh's two inputs, without a ComfyUI host: input declarations (tooltips, defaults that
are the library's recipe), the bundled three-stage workflows' settings, and the input errors a node raises before it
touches ComfyUI (wrong or missing sockets, bad choices). Running them on a real server: tests/test_comfy_server.py."""
import json
from pathlib import Path

import pytest

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from nodes.common import MESH_TYPE, SCENE_TYPE
from nodes.export_node import ExportMesh
from nodes.model_nodes import METHODS, LoadedPrior, ScoreSettings
from nodes.refine_nodes import FROM_SCORE, RefineGeometry, RefineTexture
from nodes.scene_nodes import RefinedMesh, Scene

ROOT = Path(__file__).resolve().parents[1]
EXPORT_WIDGETS = dict(mesh_resolution=32, threshold="auto", max_faces=1000, texture_size=64, format="glb",
                      filename_prefix="3d/x", turntable_views=1, turntable_resolution=16)


def _prior():
    return LoadedPrior(prior=object(), source="toy", device="cpu", dtype="auto")


def _score(method="l2vsd"):
    from l2vsd_core.config import LoRAConfig
    return ScoreSettings(method=method, lora=LoRAConfig(lr=1e-3), eta=0.01, jvp_mode="auto", esd_lambda=0.0,
                         guidance_scale=7.5)


def _scene():
    return Scene(settings=None, field=None, background=None, prompt="a red cube")


def _mesh():
    return RefinedMesh(mesh=None, color=None, background=None, settings=None, stage="geometry", prompt="a red cube")


def _defaults(node) -> dict:
    spec = node.INPUT_TYPES()
    return {name: s[1]["default"] for part in ("required", "optional") for name, s in spec.get(part, {}).items()
            if len(s) > 1 and "default" in s[1]}


def test_registered_with_display_names_and_tooltips():
    for name in ("L2VSD_RefineGeometry", "L2VSD_RefineTexture"):
        assert NODE_CLASS_MAPPINGS[name].RETURN_TYPES == (MESH_TYPE, "IMAGE", "IMAGE")
        assert NODE_DISPLAY_NAME_MAPPINGS[name].startswith("L2VSD Refine ")
    for name, node in NODE_CLASS_MAPPINGS.items():
        spec = node.INPUT_TYPES()
        for input_name, s in {**spec["required"], **spec.get("optional", {})}.items():
            assert s[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    export = ExportMesh.INPUT_TYPES()
    assert "scene" not in export["required"]
    assert {k: v[0] for k, v in export["optional"].items()} == {"scene": SCENE_TYPE, "mesh": MESH_TYPE}


def _settings(node) -> dict:
    """A node's widget inputs that are settings of its config (not prompts, sockets or the run folder)."""
    return {k: v for k, v in _defaults(node).items() if k not in ("prompt", "negative_prompt", "resume",
                                                                  "checkpoint_folder")}


def test_defaults_are_the_library_recipes():
    """A fresh Refine Geometry / Refine Texture / Export Mesh (with a fresh Attach LoRA Score) makes exactly the
    library's ``GeometryConfig()`` / ``TextureConfig()`` / ``ExportConfig()`` — but for the refine nodes' preview size,
    the training size up to 256 (the config's 64 is the CLI's PNG previews)."""
    from l2vsd_core.config import ExportConfig, GeometryConfig, TextureConfig, to_json
    from nodes.export_node import export_config
    from nodes.model_nodes import AttachLoRAScore
    from nodes.refine_nodes import geometry_config, texture_config

    g, t = GeometryConfig(), TextureConfig()
    geometry = _defaults(RefineGeometry)
    assert (geometry["method"], geometry["guidance_scale"]) == (g.distill.method, g.distill.guidance_scale)
    assert (geometry["steps"], geometry["resolution"], geometry["dmtet_resolution"], geometry["learning_rate"]) == \
        (g.steps, g.resolution, g.dmtet_resolution, g.lr)
    texture = _defaults(RefineTexture)
    assert (texture["steps"], texture["resolution"]) == (t.steps, t.resolution)
    assert texture["method"] == FROM_SCORE and texture["guidance_scale"] == -1.0  # the score's (7.5 by default)
    assert RefineTexture.INPUT_TYPES()["required"]["method"][0] == [FROM_SCORE, *METHODS]
    score = AttachLoRAScore().attach(prior=_prior(), **_defaults(AttachLoRAScore))[0]
    made = geometry_config(None, score, **_settings(RefineGeometry))
    assert made.preview_resolution == 256
    assert to_json(made) == {**to_json(g), "preview_resolution": 256}
    made = texture_config(None, score, **_settings(RefineTexture))
    assert made.distill.method == score.method  # "from score": the estimator of stage 1
    assert to_json(made) == {**to_json(t), "distill": {**to_json(t.distill), "method": score.method},
                             "preview_resolution": 256}
    assert export_config(**{k: v for k, v in _defaults(ExportMesh).items()
                            if k not in ("format", "filename_prefix")}) == ExportConfig()


def _api(name: str) -> dict:
    return {node["class_type"]: node["inputs"]
            for node in json.loads((ROOT / "workflows" / "api" / f"{name}.api.json").read_text()).values()}


def _widgets(inputs: dict, *skip) -> dict:
    return {k: v for k, v in inputs.items() if not isinstance(v, list) and k not in skip}


def _workflow_run(name: str) -> dict:
    """The core configs a bundled API workflow's nodes make: ``{"scene", "background", "lora", "nerf", "geometry",
    "texture", "export"}`` (the stages the workflow has)."""
    from nodes.export_node import export_config
    from nodes.model_nodes import AttachLoRAScore
    from nodes.optimize_node import nerf_config
    from nodes.refine_nodes import geometry_config, texture_config
    from nodes.scene_nodes import scene_settings

    api, run_inputs = _api(name), ("prompt", "negative_prompt", "resume", "checkpoint_folder")
    score = AttachLoRAScore().attach(prior=_prior(), **_widgets(api["L2VSD_AttachLoRAScore"]))[0]
    settings = scene_settings(**api["L2VSD_InitNeRF"])
    scene = Scene(settings=settings, field=None, background=None)
    run = {"scene": settings.scene, "background": settings.background, "lora": score.lora,
           "nerf": nerf_config(score, scene, **_widgets(api["L2VSD_Optimize"], *run_inputs)),
           "export": export_config(**_widgets(api["L2VSD_ExportMesh"], "format", "filename_prefix"))}
    if "L2VSD_RefineGeometry" in api:
        run["geometry"] = geometry_config(None, score, **_widgets(api["L2VSD_RefineGeometry"], *run_inputs))
    if "L2VSD_RefineTexture" in api:
        run["texture"] = texture_config(None, score, **_widgets(api["L2VSD_RefineTexture"], *run_inputs))
    return run


@pytest.mark.parametrize("name", ["toy_demo", "toy_three_stage"])
def test_toy_workflows_are_what_generate_runs_on_the_toy_prior(name):
    """Every setting a toy workflow's nodes make is the one ``python -m l2vsd_core generate --prior toy --stages 3``
    runs (``recipes.TOY`` over the defaults) — but the live previews: every 10 steps in ComfyUI's progress bar, where
    the CLI writes no preview PNGs."""
    from l2vsd_core.config import from_options, to_json
    from l2vsd_core.recipes import recipe_for

    cli = from_options({**recipe_for("toy"), "stages": 3})
    for part, config in _workflow_run(name).items():
        made, expected = to_json(config), to_json(getattr(cli, part))
        if part in ("nerf", "geometry", "texture"):
            assert made["preview_every"] == 10, (name, part)
            made["preview_every"] = expected["preview_every"]
        assert made == expected, (name, part)


@pytest.mark.parametrize("name", ["sd21_stage1", "sd21_three_stage"])
def test_sd_workflows_are_the_fresh_nodes(name):
    """The SD workflows are ProlificDreamer's recipe in every stage (the configs' defaults, what fresh nodes make),
    with L²-VSD as the estimator; the refine stages preview at 256 px."""
    from l2vsd_core.config import RunConfig, to_json

    defaults = RunConfig()
    for part, config in _workflow_run(name).items():
        made, expected = to_json(config), to_json(getattr(defaults, part))
        if part in ("nerf", "texture"):
            assert made["distill"]["method"] == "l2vsd"
            made["distill"]["method"] = expected["distill"]["method"]
        if part in ("geometry", "texture"):
            assert made["preview_resolution"] == 256
            made["preview_resolution"] = expected["preview_resolution"]
        assert made == expected, (name, part)


@pytest.mark.parametrize("changes, message", [
    ({"min_step_percent": "0.6", "max_step_percent": "0.5"}, "input 'min_step_percent': 0.6 is above"),
    ({"max_step_percent": "100,0.98,0.5,10"}, "input 'max_step_percent': max_step_percent: end_step 10 is before"),
    ({"max_step_percent": "0.98,0.5"}, "input 'max_step_percent': '0.98,0.5' has 2 numbers"),
    ({"min_step_percent": "low"}, "input 'min_step_percent': 'low' is not a number"),
])
def test_refine_timestep_inputs_are_checked_and_named(changes, message):
    with pytest.raises(ValueError) as error:
        RefineGeometry().refine(**_geometry_inputs(**changes))
    assert str(error.value).startswith(message)
    with pytest.raises(ValueError) as error:
        RefineTexture().refine(**_texture_inputs(**changes))
    assert str(error.value).startswith(message)


def test_sd21_three_stage_has_prolificdreamers_settings():
    api = json.loads((ROOT / "workflows" / "api" / "sd21_three_stage.api.json").read_text())
    by_class = {node["class_type"]: node["inputs"] for node in api.values()}
    geometry, texture, score = (by_class["L2VSD_RefineGeometry"], by_class["L2VSD_RefineTexture"],
                                by_class["L2VSD_AttachLoRAScore"])
    assert (geometry["resolution"], geometry["steps"], geometry["method"], geometry["guidance_scale"]) == \
        (512, 15000, "sds", 100.0)
    assert (texture["resolution"], texture["steps"], texture["guidance_scale"]) == (512, 30000, -1.0)
    assert texture["method"] == FROM_SCORE and score["method"] in ("vsd", "l2vsd") and score["guidance_scale"] == 7.5
    texture_id = next(k for k, n in api.items() if n["class_type"] == "L2VSD_RefineTexture")
    assert by_class["L2VSD_ExportMesh"]["mesh"] == [texture_id, 0]
    toy = json.loads((ROOT / "workflows" / "api" / "toy_three_stage.api.json").read_text())
    assert {n["class_type"] for n in toy.values()} == {n["class_type"] for n in api.values()}
    toy_prior = next(n for n in toy.values() if n["class_type"] == "L2VSD_LoadPrior")
    assert toy_prior["inputs"]["source"].startswith("bundled")


@pytest.mark.parametrize("inputs, message", [
    ({}, "input 'scene': neither scene nor mesh is connected"),
    ({"scene": _scene(), "mesh": _mesh()}, "input 'mesh': both scene and mesh are connected"),
    ({"scene": _mesh()}, "input 'scene': got RefinedMesh; connect the output of an L2VSD Optimize node"),
    ({"mesh": _scene()}, "input 'mesh': got Scene; connect the output of an L2VSD Refine Geometry or Refine"),
])
def test_export_mesh_needs_exactly_one_of_scene_and_mesh(inputs, message):
    with pytest.raises(ValueError) as error:
        ExportMesh().export(**EXPORT_WIDGETS, **inputs)
    assert str(error.value).startswith(message)


def _geometry_inputs(**changes):
    inputs = dict(prior=_prior(), score=_score(), scene=_scene(), **_defaults(RefineGeometry))
    inputs.update(changes)
    return inputs


def _texture_inputs(**changes):
    inputs = dict(prior=_prior(), score=_score(), mesh=_mesh(), **_defaults(RefineTexture))
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize("changes, message", [
    ({"scene": _mesh()}, "input 'scene': got RefinedMesh; connect the output of a L2VSD Optimize node"),
    ({"prior": _score()}, "input 'prior': got ScoreSettings; connect the output of a LoadPrior node"),
    ({"score": _prior()}, "input 'score': got LoadedPrior"),
    ({"method": "esd"}, "input 'method': 'esd' is not an option"),
    ({"threshold": "dense"}, "input 'threshold': 'dense' is neither 'auto' nor a number"),
])
def test_refine_geometry_names_the_bad_input(changes, message):
    with pytest.raises(ValueError) as error:
        RefineGeometry().refine(**_geometry_inputs(**changes))
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("changes, message", [
    ({"mesh": _scene()}, "input 'mesh': got Scene; connect the output of a L2VSD Refine Geometry node"),
    ({"score": None}, "input 'score': got NoneType; connect the output of a AttachLoRAScore node"),
    ({"method": "score"}, "input 'method': 'score' is not an option"),
])
def test_refine_texture_names_the_bad_input(changes, message):
    with pytest.raises(ValueError) as error:
        RefineTexture().refine(**_texture_inputs(**changes))
    assert str(error.value).startswith(message)


def test_every_refine_input_is_an_argument_of_its_function():
    """ComfyUI calls FUNCTION with every input by name: the signatures and the declarations must agree."""
    import inspect
    for node in NODE_CLASS_MAPPINGS.values():
        spec = node.INPUT_TYPES()
        declared = [*spec["required"], *spec.get("optional", {})]
        params = list(inspect.signature(getattr(node, node.FUNCTION)).parameters)[1:]
        assert params == declared, node.__name__


def test_cached_inputs_are_neither_moved_nor_left_in_another_mode():
    """Node inputs are ComfyUI's cached outputs, shared with other nodes: a module already on the device is used as
    it is (no copy), and eval_mode gives back each module's own mode."""
    import torch
    from nodes.common import eval_mode, on_device

    field, background = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).eval()
    assert on_device(field, "cpu") is field and on_device(field, torch.device("cpu")) is field
    with eval_mode(field, background, None):
        assert not field.training and not background.training
    assert field.training and not background.training


def test_init_nerf_background_choice():
    """InitNeRF's background: the learned environment map by default (Stable Diffusion), a fixed colour for a prior
    that knows one background; the toy workflows pick white, the SD ones the learned map; a bad name is refused."""
    import torch
    from l2vsd_core.scene.field import EnvironmentBackground, SolidBackground
    from nodes.scene_nodes import InitNeRF

    small = dict(levels=2, log2_hashmap_size=10, base_resolution=4, max_resolution=16, mlp_neurons=8,
                 samples_per_ray=8, grid_resolution=8, radius=1.0, seed=0, backend="torch")
    assert isinstance(InitNeRF().init(**small)[0].background, EnvironmentBackground)
    scene = InitNeRF().init(**small, background="white")[0]
    assert isinstance(scene.background, SolidBackground) and scene.settings.background.color == (1.0, 1.0, 1.0)
    assert torch.equal(scene.background(torch.randn(5, 3)), torch.ones(5, 3))
    with pytest.raises(Exception, match="background"):
        InitNeRF().init(**small, background="plaid")
    for path in sorted((ROOT / "workflows" / "api").glob("*.api.json")):
        inits = [n for n in json.loads(path.read_text()).values() if n["class_type"] == "L2VSD_InitNeRF"]
        assert [n["inputs"]["background"] for n in inits] == ["white" if path.name.startswith("toy") else "learned"]
