"""The bundled UI workflow in ComfyUI's own frontend, in a real (headless) browser.

Debian's chromium, driven by ``playwright-core`` from npm (``tests/browser/``, no browser download), opens the 2024
host of ``tests/comfy_host.py`` (its litegraph frontend) and, when ``COMFYUI_DIR`` is set, the current host (the
Vue frontend of ``comfyui-frontend-package``), loads ``workflows/toy_demo.json`` (with CPU-test sizes) with ``app.loadGraphData`` as
a user's drag-and-drop does, checks that no "missing nodes" warning appears (after checking that an unknown node type
does raise it), queues it with ``app.queuePrompt(0, 1)``, waits for the run to succeed and takes a screenshot. The nodes
show their renders enlarged (≥ 256 px), and no node covers another as the frontend places and sizes them, before the
run and after it (its previews grew no node over a neighbour); the other bundled workflows are loaded and checked too.

chromium, node and the npm package are required, not optional: CI installs them (``.ci/run``), so a missing one
fails with the command that installs it. ``UPDATE_DOCS_SCREENSHOT=1`` also copies the screenshots into
``docs/comfyui/`` (``BROWSER_TEST_STEPS=200`` makes the runs show a trained scene, and checks that the Preview3D
cone stands apex up): from the 2024 host
``toy_demo.png`` (the README's picture) and the other workflows' ``<name>.png``; from the current host
``toy_demo_current.png`` (the finished run), ``templates.png`` (Templates → Extensions → the pack) and
``preview3d.png`` (core Preview3D showing the exported GLB).

On the current host only (the 2024 frontend has neither a Templates panel nor a 3D viewer): the pack's templates
are opened from the Templates panel (``tests/browser/templates.mjs``), each listed card with its thumbnail, each
graph loaded with every node known; and a copy of the toy graph with core ``Preview3D`` wired to Export Mesh's
``model_file`` runs and shows the GLB in the frontend's 3D viewer.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_host import HOST_2024, PACK_FOLDER
from test_nodes_ui import SHOWS_IMAGES, TITLE_HEIGHT, overlaps

pytest_plugins = ["comfy_host"]  # the session fixture comfy_host, shared with test_comfy_server.py

ROOT = Path(__file__).resolve().parents[1]
BROWSER_DIR = ROOT / "tests" / "browser"
SCRIPT = BROWSER_DIR / "load_workflow.mjs"
TEMPLATES_SCRIPT = BROWSER_DIR / "templates.mjs"
UI_WORKFLOW = ROOT / "workflows" / "toy_demo.json"
API_WORKFLOW = ROOT / "workflows" / "api" / "toy_demo.api.json"
DOCS = ROOT / "docs" / "comfyui"
DOCS_SCREENSHOT = DOCS / "toy_demo.png"
PREVIEW3D_PROMPT = "a green cone"  # apex up: which way the viewer shows "up" is plain to see
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


def update_docs(screenshot: Path, target: Path) -> None:
    """With ``UPDATE_DOCS_SCREENSHOT=1``: the screenshot into ``docs/comfyui/``."""
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, target)


def skip_tutorial(host) -> None:
    """The current frontend opens a template browser on a first visit; a finished tutorial skips it."""
    if host.name != HOST_2024:
        status, _ = host.post("/settings/Comfy.TutorialCompleted", True)
        assert status == 200


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
    skip_tutorial(comfy_host)
    workflow = tmp_path / "toy_demo.tiny.json"
    workflow.write_text(json.dumps(comfy_host.for_host(tiny_ui_workflow(int(os.environ.get("BROWSER_TEST_STEPS", "4"))))))
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
    assert sorted(found["loadedTypes"]) == sorted(n["type"] for n in json.loads(workflow.read_text())["nodes"])
    assert not found["nodeErrors"], found["nodeErrors"]
    assert found["promptId"], f"nothing was queued; page errors: {found['pageErrors']}"
    assert found["status"] == "success", (found, comfy_host.get(f"/history/{found['promptId']}"))
    assert not found["pageErrors"], found["pageErrors"]
    # the optimizer shows its 8 orbit renders and Export Mesh plays its turntable, both enlarged to 256 px (the
    # toy's renders are 32 px, its turntable 32 here); the expanded PreviewImage shows the loss curves (the collapsed
    # ones hold the IMAGE outputs at their own size)
    shown = {n["id"]: n for n in found["nodesAfterRun"]}
    assert shown[4]["outputImages"] == 8, shown[4]
    if comfy_host.name == HOST_2024:
        # the 8 renders, and sometimes the last live preview as well when its message arrives after the output's
        # (seen once in CI: 9 images)
        assert len(shown[4]["images"]) in (8, 9) and set(shown[4]["images"]) == {256}, shown[4]
    else:
        # frontend 1.5x draws a node's last live preview (the progress bar's, 256 px) over its output images until
        # the node runs again: the 8 renders are in its output (and the collapsed "Orbit renders" PreviewImage)
        assert shown[4]["images"] and set(shown[4]["images"]) == {256}, shown[4]
    assert shown[5]["images"] == [256] and shown[5]["animated"], shown[5]
    assert shown[7]["type"] == "PreviewImage" and len(shown[7]["images"]) == 1, shown[7]
    assert {n["id"] for n in found["nodesAfterRun"] if n["type"] in SHOWS_IMAGES} == {4, 5, 6, 7, 8}
    # the previews showed inside the nodes' stated sizes: none grew over a neighbour
    check_layout(comfy_host.name, json.loads(workflow.read_text()), found["nodesLoaded"])
    check_layout(comfy_host.name, json.loads(workflow.read_text()), found["nodesAfterRun"])
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    update_docs(screenshot, DOCS_SCREENSHOT if comfy_host.name == HOST_2024 else DOCS / "toy_demo_current.png")


@pytest.mark.parametrize("name", ["sd21_stage1", "sd21_l2esd", "sd21_l2hifa", "toy_three_stage",
                                  "sd21_three_stage"])
def test_workflows_load_without_missing_nodes(comfy_host, tmp_path, name):
    """Loaded into the real frontend (not run: the SD workflows have no weights here, the toy three-stage one runs in
    tests/test_comfy_server.py), every node is found, and the frontend turns the graph into its API twin."""
    chromium, node = browser_tools()
    skip_tutorial(comfy_host)
    source = tmp_path / f"{name}.json"
    source.write_text(json.dumps(comfy_host.for_host(json.loads((ROOT / "workflows" / f"{name}.json").read_text()))))
    screenshot = tmp_path / f"{name}.png"
    command = [node, str(SCRIPT), "--url", comfy_host.url, "--workflow", str(source), "--screenshot",
               str(screenshot), "--chromium", chromium, "--queue", "no"]
    done = subprocess.run(command, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{done.stderr[-4000:]}\nhost log:\n{comfy_host.log()[-3000:]}"
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["control"]["shown"] and not found["missing"]["shown"], found["missing"]
    assert sorted(found["loadedTypes"]) == sorted(n["type"] for n in json.loads(source.read_text())["nodes"])
    assert not found["pageErrors"], found["pageErrors"]
    api = comfy_host.for_host(json.loads((ROOT / "workflows" / "api" / f"{name}.api.json").read_text()))
    queued = {node_id: (node["class_type"], node["inputs"]) for node_id, node in found["apiPrompt"].items()}
    assert queued == {node_id: (node["class_type"], node["inputs"]) for node_id, node in api.items()}
    check_layout(comfy_host.name, json.loads(source.read_text()), found["nodesLoaded"])
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    if comfy_host.name == HOST_2024:  # the README's pictures
        update_docs(screenshot, DOCS / f"{name}.png")


def run_script(command: list, host, timeout: float) -> dict:
    """Runs a browser script; its findings (the last line of its stdout)."""
    done = subprocess.run(command, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{done.stderr[-4000:]}\nhost log:\n{host.log()[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_templates_panel_lists_and_opens_every_bundled_workflow(comfy_host, tmp_path):
    """Templates → Extensions → the pack, in the current frontend: exactly the bundled UI workflows are listed (their
    API twins in workflows/api/ are not), each card shows its own JPEG thumbnail (fetched with 200, no fallback
    picture), and each template opened from its card loads the file's graph (node types, link count) under its name
    with every node known (after checking that an unknown node type does fire the missing-nodes hook)."""
    if comfy_host.name == HOST_2024:
        pytest.skip("the 2024 frontend has no Templates panel")
    chromium, node = browser_tools()
    skip_tutorial(comfy_host)
    names = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    screenshot = tmp_path / "templates.png"
    found = run_script([node, str(TEMPLATES_SCRIPT), "--url", comfy_host.url, "--pack", PACK_FOLDER,
                        "--expect", ",".join(names), "--screenshot", str(screenshot), "--chromium", chromium],
                       comfy_host, timeout=180)
    (tmp_path / "findings.json").write_text(json.dumps(found, indent=1))

    assert PACK_FOLDER in found["pageTitle"], found["pageTitle"]
    listed = {card["name"]: card for card in found["listed"]}
    assert sorted(listed) == names and len(found["listed"]) == len(names), sorted(listed)
    for name, card in listed.items():
        assert card["thumbnail"] and card["thumbnail"]["complete"] and card["thumbnail"]["naturalWidth"] > 0, card
        assert not card["fallback"], f"{name}: the frontend shows its default picture, not the thumbnail"
    pack_urls = f"/api/workflow_templates/{PACK_FOLDER}/"
    responses = [r for r in found["responses"] if pack_urls in r["url"]]
    assert not [r for r in responses if r["status"] >= 400] and not found["failedRequests"], \
        (responses, found["failedRequests"])
    fetched = {r["url"].split(pack_urls, 1)[1]: r for r in responses}
    for name in names:
        assert fetched.get(f"{name}.jpg", {}).get("status") == 200, (name, sorted(fetched))
        assert fetched[f"{name}.jpg"]["contentType"] == "image/jpeg"
    assert not [url for url in fetched if url.endswith(".api.json") or url.startswith("api/")]

    assert sorted(found["opened"]) == names
    for name, opened in found["opened"].items():
        workflow = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
        assert opened["loaded"] and opened["panelClosed"], (name, opened)
        assert [load["name"] for load in opened["loads"]] == [name] and opened["loads"][0]["loaded"], opened
        assert not opened["missing"]["shown"], (name, opened["missing"])
        assert sorted(opened["types"]) == sorted(n["type"] for n in workflow["nodes"]), name
        assert opened["links"] == len(workflow["links"]), name
    assert found["control"]["shown"], f"an unknown node type fired no missing-nodes hook: {found['control']}"
    assert not found["templateWarnings"] and not found["pageErrors"], (found["templateWarnings"], found["pageErrors"])
    assert found["openedAfterMs"] < 60_000, found["openedAfterMs"]
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    update_docs(screenshot, DOCS / "templates.png")


def preview3d_ui_workflow(steps: int) -> dict:
    """The tiny toy graph (prompt: a cone) and its core ``Preview3D``, which the bundled workflow wires to Export
    Mesh's first output (the GLB's path relative to the output folder)."""
    workflow = tiny_ui_workflow(steps)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    optimize, export = nodes[4], nodes[5]
    optimize["widgets_values"][widget_indices("4", optimize)["prompt"]] = PREVIEW3D_PROMPT
    export["widgets_values"][widget_indices("5", export)["filename_prefix"]] = "3d/preview3d_browser"
    assert [n["type"] for n in workflow["nodes"]].count("Preview3D") == 1
    return workflow


def test_preview3d_shows_the_exported_glb(comfy_host, tmp_path):
    """Export Mesh → core Preview3D in the current frontend: the run succeeds, the viewer gets Export Mesh's GLB
    (its model_file widget is that path, its GET returns 200) and draws it in a WebGL canvas inside the node. The
    screenshot of the node shows the object as the viewer stands it (y up): with ``BROWSER_TEST_STEPS`` ≥ 200 a cone,
    checked to stand apex up."""
    if "Preview3D" not in comfy_host.get("/object_info"):
        pytest.skip(f"the {comfy_host.name} host has no core Preview3D node")
    chromium, node = browser_tools()
    skip_tutorial(comfy_host)
    workflow = tmp_path / "toy_preview3d.json"
    steps = int(os.environ.get("BROWSER_TEST_STEPS", "4"))
    workflow.write_text(json.dumps(preview3d_ui_workflow(steps)))
    screenshot, viewer = tmp_path / "graph.png", tmp_path / "preview3d.png"
    found = run_script([node, str(SCRIPT), "--url", comfy_host.url, "--workflow", str(workflow), "--screenshot",
                        str(screenshot), "--preview3d-screenshot", str(viewer), "--chromium", chromium,
                        "--timeout-ms", str(RUN_TIMEOUT_S * 1000)], comfy_host, timeout=RUN_TIMEOUT_S + 120)
    (tmp_path / "findings.json").write_text(json.dumps(found, indent=1))

    assert not found["missing"]["shown"], found["missing"]
    assert found["status"] == "success", (found, comfy_host.get(f"/history/{found['promptId']}"))
    outputs = comfy_host.get(f"/history/{found['promptId']}")[found["promptId"]]["outputs"]
    mesh = outputs["5"]["l2vsd_mesh"][0]
    model_file = f"{mesh['subfolder']}/{mesh['filename']}"
    assert model_file.startswith("3d/preview3d_browser") and model_file.endswith(".glb")
    preview = found["preview3d"]
    assert preview["modelFile"] == model_file, preview
    assert [r["status"] for r in preview["modelRequests"] if mesh["filename"] in r["url"]][-1:] == [200], preview
    assert preview["viewerCanvases"], f"no viewer canvas in the Preview3D node: {preview}"
    assert not found["pageErrors"], found["pageErrors"]
    assert viewer.is_file() and viewer.stat().st_size > 10_000
    # the viewer drew the object: a good part of its canvas differs from its background (the gizmo alone is < 1 %)
    v = max(preview["viewerCanvases"], key=lambda c: c["width"] * c["height"])
    pixels = np.asarray(Image.open(viewer).convert("RGB"), dtype=int)
    pixels = pixels[round(v["y"]):round(v["y"] + v["height"]), round(v["x"]):round(v["x"] + v["width"])]
    background = np.median(pixels.reshape(-1, 3), axis=0)
    drawn = (np.abs(pixels - background).max(axis=-1) > 40).mean()
    assert drawn > 0.05, f"the viewer shows no object ({drawn:.1%} of its canvas drawn): {preview}"
    if steps >= 200:  # a trained (green) cone: apex up, so narrower a quarter down its height than three quarters down
        mask = pixels.max(axis=-1) - pixels.min(axis=-1) > 60  # coloured: not the grey grid and background
        mask[:, : mask.shape[1] // 5] = False  # nor the gizmo, bottom left
        rows = np.flatnonzero(mask.sum(axis=1) > 5)
        height = rows[-1] - rows[0]
        upper, lower = (mask[rows[0] + round(f * height)].sum() for f in (0.25, 0.75))
        assert upper < 0.8 * lower, f"the cone is not upright in the viewer ({upper} px wide above, {lower} below)"
    update_docs(viewer, DOCS / "preview3d.png")
