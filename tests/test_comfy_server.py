"""Integration: the bundled toy workflows (stage 1, and the three stages) through a real ComfyUI server: the 2024 host
of ``tests/comfy_host.py``, and also a current ComfyUI when ``COMFYUI_DIR`` names its source tree (each test runs
once per host).

Nothing of ``comfy`` is stubbed: the server loads the pack from ``custom_nodes/``, validates the API-format graph,
runs it on the CPU and reports over HTTP and its websocket, as it does for a user.
"""
from __future__ import annotations

import asyncio
import copy
import io
import json
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from comfy_host import HOST_2024, PACK_FOLDER

# the session fixture comfy_host, registered once as a plugin: test modules that import it each get their own
# fixture, hence their own servers
pytest_plugins = ["comfy_host"]

aiohttp = pytest.importorskip("aiohttp")

ROOT = Path(__file__).resolve().parents[1]
API_WORKFLOW = ROOT / "workflows" / "api" / "toy_demo.api.json"
UI_WORKFLOW = ROOT / "workflows" / "toy_demo.json"
THREE_STAGE_API = ROOT / "workflows" / "api" / "toy_three_stage.api.json"
NODES = {"L2VSD_LoadPrior": "L2VSD_PRIOR", "L2VSD_AttachLoRAScore": "L2VSD_SCORE", "L2VSD_InitNeRF": "L2VSD_SCENE",
         "L2VSD_Optimize": "L2VSD_SCENE", "L2VSD_RefineGeometry": "L2VSD_MESH", "L2VSD_RefineTexture": "L2VSD_MESH",
         "L2VSD_ExportMesh": "STRING"}
OPTIMIZE, EXPORT = "4", "5"  # node ids in the bundled workflow
GEOMETRY, TEXTURE, EXPORT3 = "5", "6", "7"  # node ids in the three-stage workflow (1-4 as in the stage-1 one)
RUN_TIMEOUT_S = 120


def tiny_graph(steps: int = 4, **optimize_inputs) -> dict:
    """The bundled API workflow with CPU-test sizes: a few steps, a small mesh, texture and turntable."""
    graph = json.loads(API_WORKFLOW.read_text())
    optimize_inputs = {"steps": steps, "preview_every": 2, "checkpoint_folder": "l2vsd/test", **optimize_inputs}
    graph[OPTIMIZE]["inputs"].update(optimize_inputs)
    graph[EXPORT]["inputs"].update(mesh_resolution=32, texture_size=64, turntable_views=4, turntable_resolution=32,
                                   filename_prefix="3d/test")
    return graph


def tiny_three_stage(folder: str = "l2vsd/three", geometry=None, texture=None) -> dict:
    """The three-stage toy API workflow with CPU-test sizes: 4 steps per stage at 32 px, a 16³ DMTet, previews every
    2 steps, a small texture and turntable; ``geometry`` / ``texture``: more inputs of those nodes."""
    graph = json.loads(THREE_STAGE_API.read_text())
    graph[OPTIMIZE]["inputs"].update(steps=4, preview_every=2, checkpoint_folder=folder)
    graph[GEOMETRY]["inputs"].update({"steps": 4, "resolution": 32, "dmtet_resolution": 16, "preview_every": 2,
                                      "checkpoint_folder": folder, **(geometry or {})})
    graph[TEXTURE]["inputs"].update({"steps": 4, "resolution": 32, "preview_every": 2, "checkpoint_folder": folder,
                                     **(texture or {})})
    graph[EXPORT3]["inputs"].update(texture_size=64, turntable_views=4, turntable_resolution=32,
                                    filename_prefix="3d/three")
    return graph


async def _run(host, graph: dict, interrupt_at_step: int | None = None, interrupt_node: str = OPTIMIZE) -> dict:
    """POST the graph and follow the websocket until it ends; returns the prompt id, its events (type, data) and
    the number of binary preview frames. With ``interrupt_at_step``, POST /interrupt once ``interrupt_node`` (the
    optimizer by default) reports that many steps."""
    events, previews, interrupted = [], 0, False
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(host.ws_url) as ws:
            async with session.post(host.url + "/prompt", json={"prompt": host.for_host(graph), "client_id": host.client_id}) as r:
                body = await r.json()
                assert r.status == 200, body
            prompt_id = body["prompt_id"]
            while True:
                message = await ws.receive(timeout=RUN_TIMEOUT_S)
                if message.type == aiohttp.WSMsgType.BINARY:
                    previews += 1
                    continue
                assert message.type == aiohttp.WSMsgType.TEXT, message
                event = json.loads(message.data)
                kind, data = event["type"], event.get("data", {})
                if data.get("prompt_id", prompt_id) != prompt_id:
                    continue
                events.append((kind, data))
                if (kind == "progress" and interrupt_at_step is not None and not interrupted
                        and data.get("node") == interrupt_node and data["value"] >= interrupt_at_step):
                    interrupted = True
                    async with session.post(host.url + "/interrupt") as r:
                        assert r.status == 200
                # The end: "executing" with no node, which both hosts' prompt worker sends after it has stored the
                # history (a current ComfyUI sends execution_success/_error/_interrupted before that: stopping there
                # races /history).
                if kind == "executing" and data.get("node") is None:
                    break
    return {"prompt_id": prompt_id, "events": events, "previews": previews}


def run(host, graph, **kwargs) -> dict:
    return asyncio.run(_run(host, graph, **kwargs))


def _kinds(result) -> list:
    return [kind for kind, _ in result["events"]]


def _progress(result, node=OPTIMIZE) -> list:
    return [(d["value"], d["max"]) for kind, d in result["events"] if kind == "progress" and d.get("node") == node]


def test_object_info_lists_the_nodes_with_tooltips(comfy_host):
    info = comfy_host.get("/object_info")
    for name, first_output in NODES.items():
        assert name in info, f"{name} not registered; host log:\n{comfy_host.log()[-3000:]}"
        node = info[name]
        assert node["category"].startswith("L2VSD/")
        assert node["output"][0] == first_output
        assert node["display_name"].startswith("L2VSD ")
        for input_name, spec in {**node["input"]["required"], **node["input"].get("optional", {})}.items():
            assert len(spec) == 2 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert info["L2VSD_Optimize"]["output"] == ["L2VSD_SCENE", "IMAGE", "IMAGE"]
    assert info["L2VSD_RefineGeometry"]["output"] == info["L2VSD_RefineTexture"]["output"] == \
        ["L2VSD_MESH", "IMAGE", "IMAGE"]
    assert info["L2VSD_RefineGeometry"]["input"]["required"]["scene"][0] == "L2VSD_SCENE"
    assert info["L2VSD_RefineTexture"]["input"]["required"]["mesh"][0] == "L2VSD_MESH"
    assert info["L2VSD_ExportMesh"]["output"] == ["STRING", "IMAGE", "MESH"]
    # one socket type each: a stage-1 scene or a refined mesh, both optional (exactly one is checked at run time)
    export_optional = info["L2VSD_ExportMesh"]["input"]["optional"]
    assert (export_optional["scene"][0], export_optional["mesh"][0]) == ("L2VSD_SCENE", "L2VSD_MESH")
    assert info["L2VSD_RefineGeometry"]["input"]["required"]["method"][1]["default"] == "sds"
    assert info["L2VSD_RefineGeometry"]["input"]["required"]["guidance_scale"][1]["default"] == 100.0
    optimize_inputs = info["L2VSD_Optimize"]["input"]["required"]
    assert optimize_inputs["resume"][0] == "BOOLEAN" and optimize_inputs["steps"][1]["min"] == 1
    assert (optimize_inputs["steps"][1]["default"], optimize_inputs["resolution"][1]["default"]) == (25000, 64)
    # the inputs added since the first workflows are optional, so that graphs without them still validate
    optimize_optional = info["L2VSD_Optimize"]["input"]["optional"]
    assert optimize_optional["resolution_schedule"][1]["default"] == "512@5000"
    assert optimize_optional["max_step_percent"][1]["default"] == "5000,0.98,0.5,5001"
    assert optimize_optional["sqrt_anneal"][0] == "BOOLEAN" and optimize_optional["lambda_image"][0] == "FLOAT"
    for name in ("L2VSD_RefineGeometry", "L2VSD_RefineTexture"):
        assert info[name]["input"]["optional"]["min_step_percent"][1]["default"] == "0.02"
    assert info["L2VSD_InitNeRF"]["input"]["optional"]["features_per_level"][1]["default"] == 2
    assert info["L2VSD_ExportMesh"]["input"]["required"]["filename_prefix"][1]["default"] == "3d/l2vsd"
    assert "bundled toy prior (32x32 world)" in info["L2VSD_LoadPrior"]["input"]["required"]["source"][0]
    # the choices listed without importing torch match the library's
    from l2vsd_core.distill import METHODS
    from l2vsd_core.jvp import JVP_MODES
    score_inputs = info["L2VSD_AttachLoRAScore"]["input"]["required"]
    assert score_inputs["method"][0] == list(METHODS)
    assert score_inputs["jvp_mode"][0] == ["auto", *JVP_MODES]


def test_bundled_workflows_use_the_pack_nodes():
    api = json.loads(API_WORKFLOW.read_text())
    ui = json.loads(UI_WORKFLOW.read_text())
    api_types = sorted(node["class_type"] for node in api.values())
    ui_types = sorted(node["type"] for node in ui["nodes"])
    assert api_types == ui_types
    assert set(NODES) - {"L2VSD_RefineGeometry", "L2VSD_RefineTexture"} <= set(api_types)
    assert "Preview3D" in api_types  # core Preview 3D shows the GLB (dropped on the 2024 host: no 3D nodes there)
    three = json.loads(THREE_STAGE_API.read_text())
    assert set(NODES) <= {node["class_type"] for node in three.values()}
    assert three[EXPORT3]["inputs"]["mesh"] == [TEXTURE, 0] and "scene" not in three[EXPORT3]["inputs"]


def test_toy_workflow_runs_and_writes_a_textured_glb(comfy_host):
    import trimesh

    result = run(comfy_host, tiny_graph(steps=4))
    kinds = _kinds(result)
    assert "execution_error" not in kinds, result["events"][-1]
    assert _progress(result)[-1] == (4, 4)
    assert result["previews"] >= 1  # the orbit preview every 2 steps
    history = comfy_host.get(f"/history/{result['prompt_id']}")[result["prompt_id"]]
    assert history["status"]["status_str"] == "success"
    outputs = history["outputs"]
    assert outputs[OPTIMIZE]["l2vsd_run"][0]["step"] == 4
    mesh_info = outputs[EXPORT]["l2vsd_mesh"][0]
    glb = comfy_host.output_dir / mesh_info["subfolder"] / mesh_info["filename"]
    assert glb.is_file() and glb.suffix == ".glb" and glb.with_suffix(".gif").is_file()
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 0
    assert mesh.visual.uv is not None and len(mesh.visual.uv) == len(mesh.vertices)
    for node_id, count in (("6", 8), ("7", 1)):  # orbit renders, loss curves (PreviewImage writes temp files)
        assert len(outputs[node_id]["images"]) == count
    checkpoint = comfy_host.output_dir / "l2vsd/test/checkpoint.safetensors.json"
    meta = json.loads(checkpoint.read_text())
    assert meta["step"] == 4
    # the toy workflow's recipe reached the core config (recipes.TOY: one 32-px stage, its anneal, no opacity loss)
    assert (meta["config"]["widths"], meta["config"]["resolution_milestones"]) == ([32], [])
    assert meta["config"]["distill"]["timesteps"]["max_step_percent"] == [80, 0.98, 0.5, 81]
    assert meta["config"]["lambda_opaque"] == 0


def _images(outputs, node_id) -> int:
    return len(outputs[node_id]["images"])


def test_three_stage_workflow_runs_and_writes_a_textured_glb(comfy_host):
    """Stage 1 → Refine Geometry → Refine Texture → Export Mesh (its mesh input): each optimizing node reports
    progress with previews, writes its own checkpoint into the shared folder, and the GLB carries the texture."""
    import trimesh

    result = run(comfy_host, tiny_three_stage())
    kinds = _kinds(result)
    assert "execution_error" not in kinds, result["events"][-1]
    for node in (OPTIMIZE, GEOMETRY, TEXTURE):
        progress = _progress(result, node)
        assert progress[0] == (0, 4) and progress[-1] == (4, 4), (node, progress)
    assert result["previews"] >= 6  # every 2 steps in each of the three optimizing nodes
    history = comfy_host.get(f"/history/{result['prompt_id']}")[result["prompt_id"]]
    assert history["status"]["status_str"] == "success"
    outputs = history["outputs"]
    geometry_run = outputs[GEOMETRY]["l2vsd_run"][0]
    assert geometry_run["step"] == 4 and geometry_run["faces"] > 100
    assert geometry_run["checkpoint"] == "l2vsd/three/geometry.safetensors"
    assert outputs[TEXTURE]["l2vsd_run"][0]["step"] == 4
    for node_id, count in (("8", 8), ("9", 8), ("10", 8), ("11", 4)):  # stage 1, normals, texture, turntable
        assert _images(outputs, node_id) == count, node_id
    mesh_info = outputs[EXPORT3]["l2vsd_mesh"][0]
    glb = comfy_host.output_dir / mesh_info["subfolder"] / mesh_info["filename"]
    assert glb.is_file() and glb.name.startswith("three_") and glb.with_suffix(".gif").is_file()
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) == mesh_info["faces"] > 100
    assert mesh.visual.material.baseColorTexture is not None
    assert mesh.visual.uv is not None and len(mesh.visual.uv) == len(mesh.vertices)
    folder = comfy_host.output_dir / "l2vsd/three"
    for name in ("checkpoint", "geometry", "texture"):  # three stages, one folder, no file shared
        assert json.loads((folder / f"{name}.safetensors.json").read_text())["step"] == 4, name
    texture_meta = json.loads((folder / "texture.safetensors.json").read_text())
    assert texture_meta["stage"] == "texture" and texture_meta["config"]["distill"]["method"] == "l2vsd"
    geometry_meta = json.loads((folder / "geometry.safetensors.json").read_text())
    assert geometry_meta["config"]["distill"]["method"] == "sds"
    assert geometry_meta["config"]["distill"]["guidance_scale"] == 100.0
    assert [t["done"] for t in json.loads((folder / "texture_curves.json").read_text())] == [1, 2, 3, 4]


@pytest.mark.parametrize("node", [GEOMETRY, TEXTURE])
def test_interrupting_a_refine_stage_writes_its_checkpoint_and_resume_continues(comfy_host, node):
    """Cancel inside Refine Geometry / Refine Texture: execution_interrupted, that stage's checkpoint at the step
    reached; queued again with resume on, the stage's progress bar starts there and ends at the new step count."""
    folder = f"l2vsd/interrupt_{node}"
    stage = {GEOMETRY: "geometry", TEXTURE: "texture"}[node]
    many = {"steps": 200, "checkpoint_every": 0}

    def graph(**inputs):
        return tiny_three_stage(folder, **{stage: inputs})

    result = run(comfy_host, graph(**many), interrupt_at_step=2, interrupt_node=node)
    assert "execution_interrupted" in _kinds(result), _kinds(result)
    sidecar = comfy_host.output_dir / folder / f"{stage}.safetensors.json"
    stopped_at = json.loads(sidecar.read_text())["step"]
    assert 2 <= stopped_at < 200

    resumed = run(comfy_host, graph(steps=stopped_at + 2, checkpoint_every=0, resume=True))
    assert "execution_error" not in _kinds(resumed), resumed["events"][-1]
    progress = _progress(resumed, node)
    assert progress[0][0] == stopped_at and progress[-1] == (stopped_at + 2, stopped_at + 2), progress
    outputs = comfy_host.get(f"/history/{resumed['prompt_id']}")[resumed["prompt_id"]]["outputs"]
    assert outputs[node]["l2vsd_run"][0]["start_step"] == stopped_at
    assert json.loads(sidecar.read_text())["step"] == stopped_at + 2
    assert outputs[EXPORT3]["l2vsd_mesh"][0]["faces"] > 0


def test_export_mesh_bakes_stage1_colours_onto_a_geometry_only_result(comfy_host):
    """Refine Geometry's mesh straight into Export Mesh (no texture stage): the GLB is the refined surface textured
    by the stage-1 field, which the mesh socket carries."""
    import numpy as np
    import trimesh

    graph = {k: v for k, v in tiny_three_stage("l2vsd/geometry_only").items() if k not in (TEXTURE, "10")}
    graph[EXPORT3]["inputs"].update(mesh=[GEOMETRY, 0], filename_prefix="3d/geometry_only")
    result = run(comfy_host, graph)
    assert "execution_error" not in _kinds(result), result["events"][-1]
    outputs = comfy_host.get(f"/history/{result['prompt_id']}")[result["prompt_id"]]["outputs"]
    mesh_info = outputs[EXPORT3]["l2vsd_mesh"][0]
    mesh = trimesh.load(comfy_host.output_dir / mesh_info["subfolder"] / mesh_info["filename"], force="mesh")
    assert len(mesh.faces) == outputs[GEOMETRY]["l2vsd_run"][0]["faces"] == mesh_info["faces"]
    texture = mesh.visual.material.baseColorTexture
    assert texture is not None
    assert np.unique(np.asarray(texture.convert("RGB")).reshape(-1, 3), axis=0).shape[0] > 1  # a bake, not a fill


NEW_INPUTS = {"L2VSD_Optimize": ("resolution_schedule", "min_step_percent", "max_step_percent", "sqrt_anneal",
                                 "lambda_image", "lambda_z_variance", "lambda_sparsity", "lambda_opaque"),
              "L2VSD_InitNeRF": ("features_per_level",)}


def test_a_graph_made_before_the_new_inputs_still_runs_with_their_defaults(comfy_host):
    """An API graph without the optional inputs added with the core refactor validates and runs: Optimize takes
    ProlificDreamer's defaults for them (its checkpoint records the 512-px stage from step 5000)."""
    graph = tiny_graph(steps=2, checkpoint_folder="l2vsd/old_graph")
    for node in graph.values():
        for name in NEW_INPUTS.get(node["class_type"], ()):
            del node["inputs"][name]
    result = run(comfy_host, graph)
    assert "execution_error" not in _kinds(result), result["events"][-1]
    meta = json.loads((comfy_host.output_dir / "l2vsd/old_graph/checkpoint.safetensors.json").read_text())
    assert meta["step"] == 2
    assert (meta["config"]["widths"], meta["config"]["resolution_milestones"]) == ([32, 512], [5000])
    assert meta["config"]["distill"]["timesteps"]["max_step_percent"] == [5000, 0.98, 0.5, 5001]


def test_a_new_input_that_does_not_parse_is_named(comfy_host):
    graph = tiny_graph(steps=2)
    graph[OPTIMIZE]["inputs"]["resolution_schedule"] = "64 from step 100"
    result = run(comfy_host, graph)
    errors = [data for kind, data in result["events"] if kind == "execution_error"]
    assert errors and errors[0]["node_id"] == OPTIMIZE, _kinds(result)
    message = errors[0]["exception_message"]
    assert message.startswith("input 'resolution_schedule': '64 from step 100' is not WIDTH@STEP"), message


def test_export_mesh_with_neither_input_is_named(comfy_host):
    graph = {"1": {"class_type": "L2VSD_ExportMesh", "inputs": {
        "mesh_resolution": 32, "threshold": "auto", "max_faces": 1000, "texture_size": 64, "format": "glb",
        "filename_prefix": "3d/none", "turntable_views": 1, "turntable_resolution": 16}}}
    result = run(comfy_host, graph)
    errors = [data for kind, data in result["events"] if kind == "execution_error"]
    assert errors and errors[0]["node_id"] == "1", _kinds(result)
    assert "neither scene nor mesh" in errors[0]["exception_message"]


def test_input_below_its_minimum_is_rejected_with_node_errors(comfy_host):
    graph = tiny_graph(steps=0)
    # only the outputs fed by Optimize's required sockets (see the next test for the one behind ExportMesh)
    graph = {k: v for k, v in graph.items() if k not in (EXPORT, "8")}
    status, body = comfy_host.post("/prompt", {"prompt": graph, "client_id": comfy_host.client_id})
    assert status == 400
    assert OPTIMIZE in body["node_errors"]
    assert "steps" in json.dumps(body["node_errors"][OPTIMIZE])


def test_an_input_below_its_minimum_behind_export_mesh_is_named(comfy_host):
    """ExportMesh's sockets are optional (a scene or a mesh). A current ComfyUI validates optional inputs too and
    refuses the graph; the 2024 host validates only required inputs, so it accepts the export branch and the run
    stops at Optimize with an error naming the input."""
    graph = {k: v for k, v in tiny_graph(steps=0).items() if k in ("1", "2", "3", OPTIMIZE, EXPORT)}
    if comfy_host.name != HOST_2024:
        status, body = comfy_host.post("/prompt", {"prompt": graph, "client_id": comfy_host.client_id})
        assert status == 400 and "steps" in json.dumps(body["node_errors"][OPTIMIZE])
        return
    result = run(comfy_host, graph)
    errors = [data for kind, data in result["events"] if kind == "execution_error"]
    assert errors and errors[0]["node_id"] == OPTIMIZE, _kinds(result)
    assert "steps" in errors[0]["exception_message"]


def test_node_error_names_the_input_and_the_server_keeps_serving(comfy_host):
    graph = tiny_graph(steps=4)
    graph[EXPORT]["inputs"]["filename_prefix"] = "../x"
    result = run(comfy_host, graph)
    errors = [data for kind, data in result["events"] if kind == "execution_error"]
    assert errors, _kinds(result)
    assert errors[0]["node_id"] == EXPORT and errors[0]["exception_type"].endswith("ValueError")
    assert "filename_prefix" in errors[0]["exception_message"] and ".." in errors[0]["exception_message"]
    assert not (comfy_host.output_dir.parent / "x_00001_.glb").exists()
    assert "L2VSD_ExportMesh" in comfy_host.get("/object_info")


def test_interrupt_writes_a_checkpoint_and_resume_continues_from_it(comfy_host):
    folder = "l2vsd/interrupt"
    # many steps so that the interrupt lands mid-run; checkpoint_every 0: only the interrupt writes one
    result = run(comfy_host, tiny_graph(steps=200, checkpoint_folder=folder, checkpoint_every=0),
                 interrupt_at_step=3)
    assert "execution_interrupted" in _kinds(result), _kinds(result)
    sidecar = comfy_host.output_dir / folder / "checkpoint.safetensors.json"
    stopped_at = json.loads(sidecar.read_text())["step"]
    assert 3 <= stopped_at < 200

    resumed = run(comfy_host, tiny_graph(steps=stopped_at + 2, checkpoint_folder=folder, checkpoint_every=0,
                                         resume=True))
    assert "execution_error" not in _kinds(resumed), resumed["events"][-1]
    progress = _progress(resumed)
    assert progress[0][0] == stopped_at  # the bar starts where the checkpoint left off
    assert progress[-1] == (stopped_at + 2, stopped_at + 2)
    outputs = comfy_host.get(f"/history/{resumed['prompt_id']}")[resumed["prompt_id"]]["outputs"]
    assert outputs[OPTIMIZE]["l2vsd_run"][0]["start_step"] == stopped_at
    assert json.loads(sidecar.read_text())["step"] == stopped_at + 2


def test_export_mesh_path_feeds_core_preview3d(comfy_host):
    """On a ComfyUI with 3D nodes, ExportMesh's ``model_file`` STRING wires into core Preview3D, which hands the
    path (relative to the output folder) to the frontend's viewer."""
    preview3d = comfy_host.get("/object_info").get("Preview3D")
    if preview3d is None:
        pytest.skip(f"the {comfy_host.name} host has no core Preview3D node")
    assert preview3d["input"]["required"]["model_file"][0] == "STRING"
    graph = tiny_graph(steps=2)
    graph[EXPORT]["inputs"]["filename_prefix"] = "3d/preview3d"
    graph["9"] = {"class_type": "Preview3D", "inputs": {"model_file": [EXPORT, 0]}}
    result = run(comfy_host, graph)
    assert "execution_error" not in _kinds(result), result["events"][-1]
    history = comfy_host.get(f"/history/{result['prompt_id']}")[result["prompt_id"]]
    assert history["status"]["status_str"] == "success"
    model_file = history["outputs"]["9"]["result"][0]
    assert model_file.startswith("3d/preview3d_") and model_file.endswith(".glb")
    assert (comfy_host.output_dir / model_file).is_file()
    mesh_info = history["outputs"][EXPORT]["l2vsd_mesh"][0]
    assert model_file == f"{mesh_info['subfolder']}/{mesh_info['filename']}"


def ui_workflow_names() -> list:
    """The bundled UI workflows: what ComfyUI lists as this pack's templates (``workflows/*.json``, not recursive)."""
    return sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))


def test_workflow_templates_are_the_ui_workflows_with_jpeg_thumbnails(comfy_host):
    """A current ComfyUI lists ``<pack>/workflows/*.json`` under the pack's folder name (Templates → Extensions) and
    serves the folder at ``/api/workflow_templates/<pack>/``, where the frontend takes each template's ``<name>.json``
    and its thumbnail ``<name>.jpg``: exactly the UI workflows are listed (their API twins in ``workflows/api/`` are
    not), and each one's JSON and JPEG thumbnail are served."""
    if comfy_host.name == HOST_2024:
        pytest.skip("the 2024 host has no workflow templates (no /workflow_templates, no Templates panel)")
    names = ui_workflow_names()
    assert names and not any(name.endswith(".api") for name in names)
    templates = comfy_host.get("/workflow_templates")
    assert sorted(templates.get(PACK_FOLDER, [])) == names, templates
    for name in names:
        base = f"{comfy_host.url}/api/workflow_templates/{PACK_FOLDER}/{name}"
        with urllib.request.urlopen(base + ".json", timeout=30) as response:
            assert response.status == 200
            assert json.loads(response.read()) == json.loads((ROOT / "workflows" / f"{name}.json").read_text())
        with urllib.request.urlopen(base + ".jpg", timeout=30) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg", name
            image = Image.open(io.BytesIO(response.read()))
            assert image.format == "JPEG" and min(image.size) > 0, name


@pytest.mark.parametrize("name", sorted(p.name[:-len(".api.json")] for p in (ROOT / "workflows" / "api").glob("*.api.json")))
def test_every_bundled_workflow_matches_the_installed_nodes(comfy_host, name):
    """UI and API twins agree (node types, widget values in input order); the server accepts the API twin's every
    input except a Stable Diffusion checkpoint that is not installed here (then only LoadPrior's `source` is
    refused)."""
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.api.json").read_text())
    ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    assert sorted(n["class_type"] for n in api.values()) == sorted(n["type"] for n in ui["nodes"])
    for node in ui["nodes"]:
        if node["type"] == "Preview3D":  # core node: its widgets (the viewer's state) are the frontend's own
            continue
        inputs = api[str(node["id"])]["inputs"]
        widgets = [v for k, value in inputs.items() if not isinstance(value, list)
                   for v in ((value, "fixed") if k == "seed" else (value,))]
        assert node.get("widgets_values", []) == widgets, (name, node["type"])
    graph = {k: v for k, v in api.items()}
    graph["4"] = dict(graph["4"], inputs=dict(graph["4"]["inputs"], steps=0))  # never run: refused at validation
    # ExportMesh's sockets are optional and the 2024 host validates only required inputs, so it would take the export
    # branch as valid and run it: refuse ExportMesh itself too, so that no output is left to run on any host
    export = next(nid for nid, node in api.items() if node["class_type"] == "L2VSD_ExportMesh")
    graph[export] = dict(graph[export], inputs=dict(graph[export]["inputs"], turntable_views=0))
    status, body = comfy_host.post("/prompt", {"prompt": graph, "client_id": comfy_host.client_id})
    assert status == 400
    errors = {(nid, e["extra_info"]["input_name"]) for nid, info in body["node_errors"].items()
              for e in info["errors"]}
    expected = {("4", "steps"), (export, "turntable_views")}
    if api["1"]["inputs"]["source"].startswith("checkpoints/"):
        expected.add(("1", "source"))  # no SD checkpoint in this host's models/checkpoints
    assert errors == expected, body["node_errors"]


def test_a_file_that_is_not_a_checkpoint_is_named_and_the_server_keeps_serving(comfy_host):
    comfy_host.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    (comfy_host.checkpoints_dir / "not_a_model.safetensors").write_bytes(b"garbage that is not a model")
    graph = tiny_graph(steps=2)
    graph["1"]["inputs"]["source"] = "checkpoints/not_a_model.safetensors"
    result = run(comfy_host, graph)
    errors = [data for kind, data in result["events"] if kind == "execution_error"]
    assert errors and errors[0]["node_id"] == "1", _kinds(result)
    message = errors[0]["exception_message"]
    assert "source" in message and "not_a_model.safetensors" in message and "pick a Stable Diffusion" in message
    assert "L2VSD_LoadPrior" in comfy_host.get("/object_info")


def test_export_mesh_geometry_feeds_core_saveglb(comfy_host):
    """Newer hosts' SaveGLB takes a core MESH (.vertices [B, N, 3], .faces [B, M, 3]): ExportMesh's third output."""
    if "SaveGLB" not in comfy_host.get("/object_info"):
        pytest.skip(f"the {comfy_host.name} host has no core SaveGLB node")
    import trimesh
    graph = tiny_graph(steps=2)
    graph["9"] = {"class_type": "SaveGLB", "inputs": {"mesh": [EXPORT, 2], "filename_prefix": "mesh/l2vsd"}}
    result = run(comfy_host, graph)
    assert "execution_error" not in _kinds(result), result["events"][-1]
    history = comfy_host.get(f"/history/{result['prompt_id']}")[result["prompt_id"]]
    saved = history["outputs"]["9"]["3d"][0]
    mesh = trimesh.load(comfy_host.output_dir / saved["subfolder"] / saved["filename"], force="mesh")
    exported = history["outputs"][EXPORT]["l2vsd_mesh"][0]
    assert len(mesh.faces) == exported["faces"] > 0


def test_an_empty_prompt_is_named(comfy_host):
    graph = tiny_graph(steps=2)
    graph[OPTIMIZE]["inputs"]["prompt"] = "   "
    result = run(comfy_host, graph)
    errors = [data for kind, data in result["events"] if kind == "execution_error"]
    assert errors and errors[0]["node_id"] == OPTIMIZE, _kinds(result)
    assert "prompt" in errors[0]["exception_message"] and "empty" in errors[0]["exception_message"]


def test_unchanged_inputs_hit_the_cache_and_a_new_seed_reoptimizes(comfy_host):
    graph = tiny_graph(steps=2, checkpoint_folder="l2vsd/cache")
    first = run(comfy_host, graph)
    again = run(comfy_host, graph)
    executed = lambda result: {d["node"] for kind, d in result["events"]  # noqa: E731
                               if kind == "executing" and d.get("node") is not None}
    assert OPTIMIZE in executed(first) and OPTIMIZE not in executed(again)  # ComfyUI reused the cached outputs
    reseeded = copy.deepcopy(graph)
    reseeded[OPTIMIZE]["inputs"]["seed"] = 1
    third = run(comfy_host, reseeded)
    assert OPTIMIZE in executed(third) and _progress(third)[-1] == (2, 2)


# ------------------------------------------------------------------------------- the user's own checkpoint as prior
SD15_SHAPED = "l2vsd_sd15_shaped.safetensors"
TEST_LORA = "l2vsd_test_lora.safetensors"
LORA_STRENGTHS = {"model": 1.0, "clip": 0.7}


@pytest.fixture(scope="module")
def sd15_shaped_files(tmp_path_factory):
    """A small SD-1.5-shaped checkpoint (``tests/sd15_shaped.py``: a shallow UNet, the published text encoder and VAE
    shapes, random fp16 weights) and a LoRA for it, written once per module."""
    pytest.importorskip("diffusers")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import sd15_shaped

    folder = tmp_path_factory.mktemp("sd15_shaped")
    safetensors_torch.save_file(sd15_shaped.ldm_state_dict(seed=0), str(folder / SD15_SHAPED))
    safetensors_torch.save_file(sd15_shaped.lora_state_dict(seed=1), str(folder / TEST_LORA))
    return folder


def _install_sd15_shaped(host, files: Path) -> None:
    """The checkpoint into the host's models/checkpoints, the LoRA into models/loras (links; idempotent)."""
    models = (host.base_directory or host.root) / "models"
    for sub, name in (("checkpoints", SD15_SHAPED), ("loras", TEST_LORA)):
        (models / sub).mkdir(parents=True, exist_ok=True)
        if not (models / sub / name).exists():
            (models / sub / name).symlink_to(files / name)


PROBE_PROMPT = "a photo of a hamburger"


def _probe(name: str, prior, **inputs) -> dict:
    """The test-only probe node (``tests/comfy_probe.py``); ``inputs``: its flags, a MODEL and a CONDITIONING."""
    return {"class_type": "L2VSDTest_PriorProbe",
            "inputs": {"prior": prior, "name": name, "prompt": PROBE_PROMPT, "seed": 3, "check_training": False,
                       "load_again": False, **inputs}}


def _from_checkpoint(model, clip, vae) -> dict:
    return {"class_type": "L2VSD_PriorFromCheckpoint",
            "inputs": {"model": model, "clip": clip, "vae": vae, "dtype": "fp32", "device": "cpu"}}


def _probed(host, result, name: str) -> dict:
    import torch
    errors = [(d["node_type"], d["exception_message"], "".join(d.get("traceback", []))[-2000:])
              for kind, d in result["events"] if kind == "execution_error"]
    assert not errors, errors
    return torch.load(host.output_dir / "l2vsd_probe" / f"{name}.pt", weights_only=False)


def test_prior_from_model_clip_vae_equals_load_prior_and_takes_lora_patches(comfy_host, sd15_shaped_files):
    """Core Load Checkpoint → L2VSD Prior from Model/CLIP/VAE gives the prior that L2VSD Load Prior reads from the
    same file (equal ε, text embedding, VAE decode, schedule); a core LoraLoader's patches change exactly the weights
    they patch, by the LoRA's product (strength × alpha/rank × up·down), and the score with them, as ComfyUI's own
    patched UNet and CLIPTextEncode compute them; CLIP Set Last Layer -2 drops a text-encoder layer, as in ComfyUI's
    encoding; the patched prior trains (backward through the UNet) and its load_again (the separate LoRA base) is an
    equal copy rebuilt from the ComfyUI objects. The patched run comes first and leaves ComfyUI's model loaded with the
    LoRA: the unpatched prior built afterwards from the same (cached) loader outputs must not see it."""
    import torch
    from safetensors import safe_open
    import sd15_shaped

    node = comfy_host.get("/object_info")["L2VSD_PriorFromCheckpoint"]
    assert (node["output"], node["category"], node["display_name"]) == \
        (["L2VSD_PRIOR"], "L2VSD/model", "L2VSD Prior from Model/CLIP/VAE")
    inputs = node["input"]["required"]
    assert [inputs[k][0] for k in ("model", "clip", "vae")] == ["MODEL", "CLIP", "VAE"]
    assert all(spec[1].get("tooltip") for spec in inputs.values())
    _install_sd15_shaped(comfy_host, sd15_shaped_files)
    loader = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_SHAPED}}
    patched_graph = {
        "1": loader,
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": TEST_LORA,
                                                     "strength_model": LORA_STRENGTHS["model"],
                                                     "strength_clip": LORA_STRENGTHS["clip"]}},
        "3": _from_checkpoint(["2", 0], ["2", 1], ["1", 2]),
        "4": _probe("lora", ["3", 0], check_training=True, load_again=True, model=["2", 0], conditioning=["10", 0]),
        "5": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": -2}},
        "6": _from_checkpoint(["1", 0], ["5", 0], ["1", 2]),
        "7": _probe("skip", ["6", 0], conditioning=["11", 0]),
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": PROBE_PROMPT}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["5", 0], "text": PROBE_PROMPT}},
    }
    patched_run = run(comfy_host, patched_graph)
    lora, skip = _probed(comfy_host, patched_run, "lora"), _probed(comfy_host, patched_run, "skip")
    plain_graph = {
        "1": loader,
        "3": _from_checkpoint(["1", 0], ["1", 1], ["1", 2]),
        "4": _probe("comfy", ["3", 0]),
        "8": {"class_type": "L2VSD_LoadPrior",
              "inputs": {"source": f"checkpoints/{SD15_SHAPED}", "dtype": "fp32", "device": "cpu"}},
        "9": _probe("file", ["8", 0]),
    }
    plain_run = run(comfy_host, plain_graph)
    comfy, file = _probed(comfy_host, plain_run, "comfy"), _probed(comfy_host, plain_run, "file")
    executed = {d["node"] for kind, d in plain_run["events"] if kind == "executing" and d.get("node")}
    assert "1" not in executed  # the loader's outputs came from the cache: the same objects the LoRA run patched

    # the same prior as the file's
    assert (comfy["prediction_type"], comfy["image_size"], comfy["text_layers"]) == ("epsilon", 512, 12)
    assert comfy["dtype"] == file["dtype"] == "torch.float32" and comfy["inference_weights"] == 0
    for key in ("eps", "text", "decoded", "alphas_cumprod"):
        torch.testing.assert_close(comfy[key], file[key], rtol=1e-5, atol=1e-6, msg=key)
    for name in comfy["weights"]:
        torch.testing.assert_close(comfy["weights"][name], file["weights"][name], rtol=0, atol=0, msg=name)
    assert comfy["eps"].abs().max() > 0.1

    # the LoRA: each patched weight moved by its product, the score and embedding with them; the rest unchanged
    lora_sd = {}
    with safe_open(str(sd15_shaped_files / TEST_LORA), "pt") as f:
        lora_sd = {k: f.get_tensor(k) for k in f.keys()}
    for key, (_, diffusers_name) in sd15_shaped.LORA_TARGETS.items():
        base = file["weights"][diffusers_name]
        strength = LORA_STRENGTHS["clip" if key.startswith("lora_te_") else "model"]
        expected = base + strength * sd15_shaped.lora_delta(lora_sd, key, base.shape)
        torch.testing.assert_close(lora["weights"][diffusers_name], expected, rtol=2e-3, atol=2e-3, msg=key)
        assert (lora["weights"][diffusers_name] - base).abs().max() > 1e-3, key
    assert (lora["text"] - file["text"]).abs().max() > 1e-3
    assert (lora["eps"] - file["eps"]).abs().max() > 1e-3
    torch.testing.assert_close(lora["decoded"], file["decoded"], rtol=1e-5, atol=1e-6)  # the VAE has no patch
    # … as ComfyUI itself runs them: its patched UNet (loaded as for sampling) and CLIPTextEncode on the LoRA's CLIP
    torch.testing.assert_close(lora["comfy_eps"], lora["eps"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lora["comfy_text"][0], lora["text"][0], rtol=1e-4, atol=1e-4)
    assert lora["grad_finite"] and lora["inference_weights"] == 0
    torch.testing.assert_close(lora["eps_again"], lora["eps"], rtol=1e-5, atol=1e-6)
    assert not lora["again_shares_weights"]
    assert "2 UNet and 1 text-encoder weights patched" in lora["source"]

    # CLIP Set Last Layer -2: one text-encoder layer less, the same UNet
    assert skip["text_layers"] == 11 and (skip["text"] - file["text"]).abs().max() > 1e-3
    torch.testing.assert_close(skip["comfy_text"][0], skip["text"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(skip["weights"], file["weights"], rtol=0, atol=0)
