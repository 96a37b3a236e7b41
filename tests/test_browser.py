"""The bundled UI workflow in ComfyUI's own frontend, in a real (headless) browser.

Debian's chromium, driven by ``playwright-core`` from npm (``tests/browser/``, no browser download), opens the 2024
host of ``tests/comfy_host.py`` (its litegraph frontend) and, when ``COMFYUI_DIR`` is set, the current host (the
Vue frontend of ``comfyui-frontend-package``), loads ``workflows/toy_demo.json`` (with CPU-test sizes) with ``app.loadGraphData`` as
a user's drag-and-drop does, checks that no "missing nodes" warning appears (after checking that an unknown node type
does raise it), queues it with ``app.queuePrompt(0, 1)``, waits for the run to succeed and takes a screenshot. The nodes
show their renders enlarged (≥ 256 px), and no node covers another as the frontend places and sizes them, before the
run and after it (its previews grew no node over a neighbour); the other bundled workflows are loaded and checked too.

chromium, node and the npm package are required, not optional: CI installs them (``.ci/run``), so a missing one
fails with the command that installs it. ``UPDATE_DOCS_SCREENSHOT=1`` also copies the screenshot to
``docs/comfyui/toy_demo.png`` (the README's picture; ``BROWSER_TEST_STEPS=100`` makes it show a trained scene).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from comfy_host import HOST_2024
from test_nodes_ui import SHOWS_IMAGES, TITLE_HEIGHT, overlaps

pytest_plugins = ["comfy_host"]  # the session fixture comfy_host, shared with test_comfy_server.py

ROOT = Path(__file__).resolve().parents[1]
BROWSER_DIR = ROOT / "tests" / "browser"
SCRIPT = BROWSER_DIR / "load_workflow.mjs"
UI_WORKFLOW = ROOT / "workflows" / "toy_demo.json"
API_WORKFLOW = ROOT / "workflows" / "api" / "toy_demo.api.json"
DOCS_SCREENSHOT = ROOT / "docs" / "comfyui" / "toy_demo.png"
RUN_TIMEOUT_S = 240
SEED_CONTROLS = {"fixed", "increment", "decrement", "randomize"}  # the extra widget value after a seed


def browser_tools() -> tuple[str, str]:
    """(chromium, node) executables; fails, with how to install them, when one is missing."""
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    node = shutil.which("node")
    problems = []
    if not chromium:
        problems.append("chromium is not installed: `sudo apt-get install -y chromium` (or set CHROMIUM to its path)")
    if not node or not shutil.which("npm"):
        problems.append("node/npm are not installed: `sudo apt-get install -y nodejs npm`")
    if not (BROWSER_DIR / "node_modules" / "playwright-core" / "package.json").is_file():
        problems.append("playwright-core is not installed: `npm ci --prefix tests/browser`")
    if problems:
        pytest.fail("the browser test needs chromium, node and playwright-core (.ci/run installs them):\n  "
                    + "\n  ".join(problems), pytrace=False)
    return chromium, node


def widget_indices(node_id: str, ui_node: dict) -> dict:
    """Input name → index in the UI node's ``widgets_values``, from the API twin's inputs (linked inputs are no
    widgets; a seed is followed by its control value, e.g. ``"fixed"``)."""
    api_inputs = json.loads(API_WORKFLOW.read_text())[node_id]["inputs"]
    indices, i = {}, 0
    for name, value in api_inputs.items():
        if isinstance(value, list):
            continue
        indices[name] = i
        i += 1
        if name == "seed" and i < len(ui_node["widgets_values"]) and ui_node["widgets_values"][i] in SEED_CONTROLS:
            i += 1
    assert i == len(ui_node["widgets_values"]), f"node {node_id}: the UI and API workflows disagree on its widgets"
    return indices


def check_layout(host_name: str, workflow: dict, nodes: list) -> None:
    """No node covers another as the frontend placed and sized them (``nodeGeometry`` in load_workflow.mjs; a
    collapsed node is its title bar). The 2024 frontend grows a node whose widgets or images do not fit its size:
    there every node keeps the size the workflow states, which tests/test_nodes_ui.py checks for room."""
    stated = {n["id"]: n for n in workflow["nodes"]}
    rectangles = {}
    for n in nodes:
        (x, y), (w, h) = n["pos"], n["size"]
        rectangles[f'{n["id"]} {n["type"]}'] = (x, y - TITLE_HEIGHT, x + w, y if n["collapsed"] else y + h)
        if host_name == HOST_2024:
            assert [round(v) for v in (*n["pos"], *n["size"])] == [*stated[n["id"]]["pos"],
                                                                   *stated[n["id"]]["size"]], n
    assert not overlaps(rectangles), (overlaps(rectangles), nodes)


def tiny_ui_workflow(steps: int = 4) -> dict:
    """``toy_demo.json`` with CPU-test sizes (the same as the API test's ``tiny_graph``)."""
    workflow = json.loads(UI_WORKFLOW.read_text())
    changes = {"4": {"steps": steps, "preview_every": 2, "checkpoint_folder": "l2vsd/browser"},
               "5": {"mesh_resolution": 32, "texture_size": 64, "turntable_views": 4, "turntable_resolution": 32,
                     "filename_prefix": "3d/browser"}}
    for node in workflow["nodes"]:
        for name, value in changes.get(str(node["id"]), {}).items():
            node["widgets_values"][widget_indices(str(node["id"]), node)[name]] = value
    return workflow


def test_toy_workflow_loads_and_runs_in_the_frontend(comfy_host, tmp_path):
    chromium, node = browser_tools()
    if comfy_host.name != HOST_2024:
        # the current frontend opens a template browser on a first visit; a finished tutorial skips it
        status, _ = comfy_host.post("/settings/Comfy.TutorialCompleted", True)
        assert status == 200
    workflow = tmp_path / "toy_demo.tiny.json"
    workflow.write_text(json.dumps(tiny_ui_workflow(int(os.environ.get("BROWSER_TEST_STEPS", "4")))))
    screenshot = tmp_path / "toy_demo.png"
    command = [node, str(SCRIPT), "--url", comfy_host.url, "--workflow", str(workflow), "--screenshot",
               str(screenshot), "--chromium", chromium, "--timeout-ms", str(RUN_TIMEOUT_S * 1000)]
    done = subprocess.run(command, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 120)
    assert done.returncode == 0, f"{done.stderr[-4000:]}\nhost log:\n{comfy_host.log()[-3000:]}"
    found = json.loads(done.stdout.strip().splitlines()[-1])
    (tmp_path / "findings.json").write_text(json.dumps(found, indent=1))  # console errors etc., for debugging

    assert found["control"]["shown"], f"an unknown node type raised no missing-nodes warning: {found['control']}"
    assert found["controlClosed"], "the missing-nodes warning of the control graph did not close"
    assert not found["missing"]["shown"], f"the bundled workflow has missing nodes: {found['missing']}"
    assert sorted(found["loadedTypes"]) == sorted(n["type"] for n in workflow_nodes())
    assert not found["nodeErrors"], found["nodeErrors"]
    assert found["promptId"], f"nothing was queued; page errors: {found['pageErrors']}"
    assert found["status"] == "success", (found, comfy_host.get(f"/history/{found['promptId']}"))
    assert not found["pageErrors"], found["pageErrors"]
    # the optimizer shows its 8 orbit renders and Export Mesh plays its turntable, both enlarged to 256 px (the
    # toy's renders are 32 px, its turntable 32 here); the expanded PreviewImage shows the loss curves (the collapsed
    # ones hold the IMAGE outputs at their own size)
    shown = {n["id"]: n for n in found["nodesAfterRun"]}
    assert shown[4]["images"] == [256] * 8, shown[4]
    assert shown[5]["images"] == [256], shown[5]
    if comfy_host.name == HOST_2024:
        assert shown[5]["animated"], shown[5]
    assert shown[7]["type"] == "PreviewImage" and len(shown[7]["images"]) == 1, shown[7]
    assert {n["id"] for n in found["nodesAfterRun"] if n["type"] in SHOWS_IMAGES} == {4, 5, 6, 7, 8}
    # the previews showed inside the nodes' stated sizes: none grew over a neighbour
    check_layout(comfy_host.name, json.loads(workflow.read_text()), found["nodesLoaded"])
    check_layout(comfy_host.name, json.loads(workflow.read_text()), found["nodesAfterRun"])
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, DOCS_SCREENSHOT)


def workflow_nodes() -> list:
    return json.loads(UI_WORKFLOW.read_text())["nodes"]


@pytest.mark.parametrize("name", ["sd21_stage1", "sd21_l2esd", "sd21_l2hifa", "toy_three_stage",
                                  "sd21_three_stage"])
def test_workflows_load_without_missing_nodes(comfy_host, tmp_path, name):
    """Loaded into the real frontend (not run: the SD workflows have no weights here, the toy three-stage one runs in
    tests/test_comfy_server.py), every node is found, and the frontend turns the graph into its API twin."""
    chromium, node = browser_tools()
    if comfy_host.name != HOST_2024:
        status, _ = comfy_host.post("/settings/Comfy.TutorialCompleted", True)
        assert status == 200
    source = ROOT / "workflows" / f"{name}.json"
    screenshot = tmp_path / f"{name}.png"
    command = [node, str(SCRIPT), "--url", comfy_host.url, "--workflow", str(source), "--screenshot",
               str(screenshot), "--chromium", chromium, "--queue", "no"]
    done = subprocess.run(command, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{done.stderr[-4000:]}\nhost log:\n{comfy_host.log()[-3000:]}"
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["control"]["shown"] and not found["missing"]["shown"], found["missing"]
    assert sorted(found["loadedTypes"]) == sorted(n["type"] for n in json.loads(source.read_text())["nodes"])
    assert not found["pageErrors"], found["pageErrors"]
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.api.json").read_text())
    queued = {node_id: (node["class_type"], node["inputs"]) for node_id, node in found["apiPrompt"].items()}
    assert queued == {node_id: (node["class_type"], node["inputs"]) for node_id, node in api.items()}
    check_layout(comfy_host.name, json.loads(source.read_text()), found["nodesLoaded"])
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(screenshot, DOCS_SCREENSHOT.parent / f"{name}.png")
