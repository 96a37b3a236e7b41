"""What the nodes show and where, without a ComfyUI host: output tooltips, the previews enlarged for display (the IMAGE
outputs keep their size), each stage's own checkpoint folder, and bundled layouts in which no node — with the room its
image previews take — covers another. The same layouts in the real frontend: tests/test_browser.py."""
import inspect
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from nodes import NODE_CLASS_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted(p for p in (ROOT / "workflows").glob("*.json") if not p.name.endswith(".api.json"))
STAGES = {"L2VSD_Optimize": "nerf", "L2VSD_RefineGeometry": "geometry", "L2VSD_RefineTexture": "texture"}

# ----------------------------------------------------------------------------------------------- layout geometry
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar sits above its pos
# The room a node showing images needs below its widgets: the 2024 frontend grows such a node to its widgets + 220
# (setSizeForImage); a live progress preview is drawn up to 256 px (runs.PREVIEW_SIZE).
PREVIEW_ROOM = 256
# Nodes that show images on the canvas: the optimizing nodes (live previews while they run, their orbit renders
# after), Export Mesh (its turntable) and core PreviewImage.
SHOWS_IMAGES = {"L2VSD_Optimize", "L2VSD_RefineGeometry", "L2VSD_RefineTexture", "L2VSD_ExportMesh", "PreviewImage"}
# Height of each node's widgets (to the top of its image area) in the 2024 frontend, measured with
# tests/browser/load_workflow.mjs; tests/test_browser.py checks that the loaded nodes are no taller.
WIDGETS_HEIGHT = {"L2VSD_LoadPrior": 106, "L2VSD_AttachLoRAScore": 274, "L2VSD_InitNeRF": 346,
                  "L2VSD_Optimize": 646, "L2VSD_RefineGeometry": 660, "L2VSD_RefineTexture": 580,
                  "L2VSD_ExportMesh": 266, "PreviewImage": 26,
                  "Preview3D": 600}  # core Preview 3D (current frontends only): its viewer fills the node


def node_rectangle(node: dict, widgets_height: float) -> tuple:
    """``(x0, y0, x1, y1)`` a UI-format node covers on the canvas: its title bar, then (unless collapsed) at least its
    widgets, plus :data:`PREVIEW_ROOM` where it shows images."""
    (x, y), (w, h) = node["pos"], node["size"]
    if node.get("flags", {}).get("collapsed"):
        return (x, y - TITLE_HEIGHT, x + w, y)
    needed = widgets_height + (PREVIEW_ROOM if node["type"] in SHOWS_IMAGES else 0)
    return (x, y - TITLE_HEIGHT, x + w, y + max(h, needed))


def overlaps(rectangles: dict) -> list:
    """The pairs of ``{name: (x0, y0, x1, y1)}`` that overlap (touching edges do not)."""
    return [(a, b) for (a, ra), (b, rb) in itertools.combinations(sorted(rectangles.items()), 2)
            if ra[0] < rb[2] and rb[0] < ra[2] and ra[1] < rb[3] and rb[1] < ra[3]]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_bundled_layouts_leave_room_for_previews(path):
    """No node of a bundled UI workflow covers another, counting the room the image previews take (a live preview
    grows its node); every node's stated size holds its widgets, so that the frontend need not grow it on load."""
    nodes = json.loads(path.read_text())["nodes"]
    assert {n["type"] for n in nodes} <= set(WIDGETS_HEIGHT), "measure the new node type's widgets"
    for node in nodes:
        if not node.get("flags", {}).get("collapsed"):
            assert node["size"][1] >= WIDGETS_HEIGHT[node["type"]], (node["id"], node["type"], node["size"])
    rectangles = {f'{n["id"]} {n["type"]}': node_rectangle(n, WIDGETS_HEIGHT[n["type"]]) for n in nodes}
    assert not overlaps(rectangles), overlaps(rectangles)
    assert all(x0 >= 0 and y0 >= 0 for x0, y0, _, _ in rectangles.values())


def test_overlap_check_sees_a_preview_over_its_neighbour():
    optimize = {"id": 4, "type": "L2VSD_Optimize", "pos": [440, 60], "size": [400, 650], "flags": {}}
    below = {"id": 8, "type": "PreviewImage", "pos": [440, 760], "size": [400, 300], "flags": {}}
    rectangles = {n["id"]: node_rectangle(n, WIDGETS_HEIGHT[n["type"]]) for n in (optimize, below)}
    assert overlaps(rectangles) == [(4, 8)]  # 650 holds the widgets, not the preview under them
    below["flags"] = {"collapsed": True}
    below["pos"] = [440, 60 + 650 + PREVIEW_ROOM + TITLE_HEIGHT]
    assert not overlaps({n["id"]: node_rectangle(n, WIDGETS_HEIGHT[n["type"]]) for n in (optimize, below)})


# ------------------------------------------------------------------------------------------------ output tooltips
def test_every_output_has_a_tooltip():
    """``OUTPUT_TOOLTIPS``: one text per output, which a current ComfyUI serves as ``output_tooltips`` in
    /object_info and shows on hover over the output slot (the 2024 host ignores it)."""
    missing = set()
    for name, node in NODE_CLASS_MAPPINGS.items():
        tooltips = getattr(node, "OUTPUT_TOOLTIPS", None)
        if tooltips is None:
            missing.add(name)
            continue
        assert isinstance(tooltips, tuple) and len(tooltips) == len(node.RETURN_TYPES), name
        for output, text in zip(node.RETURN_NAMES, tooltips):
            assert isinstance(text, str) and len(text.strip()) > 20, (name, output)
    assert not missing, missing


# --------------------------------------------------------------------------------------------- checkpoint folders
def test_each_stage_has_its_own_default_folder():
    from nodes.runs import DEFAULT_FOLDERS

    folders = {name: NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"]["checkpoint_folder"][1]["default"]
               for name in STAGES}
    assert folders == {name: DEFAULT_FOLDERS[stage] for name, stage in STAGES.items()} == \
        {"L2VSD_Optimize": "l2vsd/nerf", "L2VSD_RefineGeometry": "l2vsd/geometry", "L2VSD_RefineTexture": "l2vsd/texture"}


def test_no_two_bundled_stages_share_a_folder():
    """Each optimizing node of each bundled workflow has its own folder, ``l2vsd/<workflow>/<stage>``: a workflow
    queued with resume on continues its own run, never a stage or another workflow that ran before it."""
    seen = {}
    for path in sorted((ROOT / "workflows" / "api").glob("*.api.json")):
        name = path.name[:-len(".api.json")]
        for node in json.loads(path.read_text()).values():
            if node["class_type"] in STAGES:
                folder = node["inputs"]["checkpoint_folder"]
                assert folder == f"l2vsd/{name}/{STAGES[node['class_type']]}", (name, folder)
                assert folder not in seen, (name, seen.get(folder))
                seen[folder] = name
    assert len(seen) == 10  # 4 stage-1 workflows, 2 three-stage ones


def test_run_folder_and_checkpoint_of_each_stage(tmp_path, monkeypatch):
    """A stage's folder is under the output folder; its checkpoint keeps the stage's own file name (so folders shared
    with ``generate --out`` or between stages still work), and resume finds it there."""
    from nodes import runs

    monkeypatch.setattr(runs, "output_directory", lambda: tmp_path)
    for stage, name in (("nerf", "checkpoint"), ("geometry", "geometry"), ("texture", "texture")):
        folder = runs.run_folder(runs.DEFAULT_FOLDERS[stage])
        assert folder == tmp_path / "l2vsd" / stage
        assert runs.checkpoint_file(folder, stage) == folder / f"{name}.safetensors"
    with pytest.raises(ValueError, match="^input 'checkpoint_folder'"):
        runs.run_folder("../elsewhere")


# ------------------------------------------------------------------------------------------ previews for display
def test_upscaled_is_nearest_neighbour_by_a_whole_factor():
    from PIL import Image

    from nodes.common import DISPLAY_SIZE, display_factor, upscaled

    assert DISPLAY_SIZE == 256
    assert [display_factor(s, s) for s in (32, 64, 100, 256, 512)] == [8, 4, 3, 1, 1]
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    image.putpixel((3, 5), (255, 0, 0))
    big = upscaled(image)
    assert big.size == (256, 256)
    block = [big.getpixel((x, y)) for x in range(24, 32) for y in range(40, 48)]
    assert set(block) == {(255, 0, 0)}  # one render pixel, one sharp 8 × 8 square
    assert big.getpixel((23, 40)) == big.getpixel((32, 47)) == (255, 255, 255)
    large = Image.new("RGB", (300, 300))
    assert upscaled(large) is large


def test_displayed_renders_are_enlarged_copies(tmp_path, monkeypatch):
    """The nodes' ``ui`` images (what the canvas shows) are PNGs in the temp folder at ≥ 256 px; the IMAGE output they
    were made from keeps its size."""
    import torch
    from PIL import Image

    from nodes import common, runs

    monkeypatch.setattr(common, "temp_directory", lambda: tmp_path)
    monkeypatch.setattr(runs, "output_directory", lambda: tmp_path)
    renders = torch.rand(8, 32, 32, 3)
    before = renders.clone()
    run = SimpleNamespace(start=0, step=4, total=4)
    ui = runs.stage_ui(run, tmp_path / "l2vsd" / "nerf" / "checkpoint.safetensors", renders, "l2vsd_orbit")
    assert ui["l2vsd_run"] == [{"start_step": 0, "step": 4, "steps": 4,
                                "checkpoint": "l2vsd/nerf/checkpoint.safetensors"}]
    assert len(ui["images"]) == 8 and torch.equal(renders, before)
    for shown, render in zip(ui["images"], renders):
        assert shown["type"] == "temp" and shown["subfolder"] == ""
        with Image.open(tmp_path / shown["filename"]) as image:
            assert image.size == (256, 256)
            assert image.resize((32, 32), Image.NEAREST).tobytes() == common.to_pil(render).tobytes()


def test_the_turntable_plays_enlarged(tmp_path, monkeypatch):
    from PIL import Image, ImageSequence

    from nodes import common

    monkeypatch.setattr(common, "temp_directory", lambda: tmp_path / "temp")
    frames = [Image.new("RGB", (64, 64), (40 * i, 0, 0)) for i in range(4)]
    gif = tmp_path / "turntable.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=80, loop=0)
    ui = common.display_animation(gif, "l2vsd_turntable")
    assert ui["animated"] == (True,) and len(ui["images"]) == 1 and ui["images"][0]["type"] == "temp"
    with Image.open(tmp_path / "temp" / ui["images"][0]["filename"]) as shown:
        # WebP: the current frontend plays no animated GIF (see display_animation)
        assert shown.format == "WEBP" and shown.size == (256, 256)
        durations = []
        for frame in ImageSequence.Iterator(shown):
            frame.load()  # a WebP frame's duration is known once it is decoded
            durations.append(frame.info["duration"])
        assert durations == [80] * 4
    with Image.open(gif) as source:
        assert source.size == (64, 64)  # the GIF next to the mesh keeps the turntable's size


def test_progress_previews_are_enlarged_before_the_server_fits_them():
    """ComfyUI's server fits a progress preview into ``max_size`` with a bilinear filter, which would blur a 32-px
    render: it gets the render enlarged by a whole factor (nearest-neighbour) to that size first."""
    import torch

    from nodes.runs import PREVIEW_SIZE, ComfyHooks

    sent = []
    hooks = ComfyHooks.__new__(ComfyHooks)
    hooks.bar = SimpleNamespace(update_absolute=lambda done, total, image=None: sent.append((done, total, image)))
    hooks.progress(3, 10, {}, torch.rand(32, 32, 3))
    hooks.progress(4, 10, {}, None)
    (done, total, (kind, image, max_size)), last = sent
    assert (done, total, kind, max_size, image.size) == (3, 10, "JPEG", PREVIEW_SIZE, (256, 256))
    assert last == (4, 10, None)


def test_the_optimizing_nodes_show_their_renders_and_export_its_turntable():
    """The node functions put the displayed copies in their ``ui`` (run on a real server: test_comfy_server.py)."""
    from nodes.export_node import ExportMesh
    from nodes.optimize_node import L2VSDOptimize
    from nodes.refine_nodes import RefineGeometry, RefineTexture

    for node in (L2VSDOptimize, RefineGeometry, RefineTexture):
        assert "stage_ui(" in inspect.getsource(node)
    assert "display_animation(" in inspect.getsource(ExportMesh)
