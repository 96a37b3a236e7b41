"""Packaging checks: the pack imports as ComfyUI loads it, cheaply, and never touches the user's torch."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "My-Pack_clone"  # ComfyUI uses the folder name, dashes and all, as the module name
# Modules the root import must not pull in: ComfyUI's own, optional CUDA accelerators, and Ray (batch only).
FORBIDDEN = {"comfy", "folder_paths", "tinycudann", "nvdiffrast", "ray"}
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def _load_pack(path: Path, name: str):
    """Import a pack folder the way ComfyUI's load_custom_node does."""
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py", submodule_search_locations=[str(path)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # needed before exec for the pack's relative imports
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack_clone(tmp_path_factory):
    """A copy of the repo (like a clone in custom_nodes/) under a name unlike the repo's."""
    dest = tmp_path_factory.mktemp("custom_nodes") / PACK_NAME
    shutil.copytree(
        ROOT, dest,
        ignore=shutil.ignore_patterns(".venv", ".git", "out", "__pycache__", ".pytest_cache", "*.egg-info"),
    )
    return dest


def _top_level_modules():
    return {name.split(".")[0] for name in sys.modules}


def test_pack_imports_under_any_folder_name(pack_clone):
    before = _top_level_modules()
    try:
        pack = _load_pack(pack_clone, PACK_NAME)
        assert isinstance(pack.NODE_CLASS_MAPPINGS, dict)
        assert isinstance(pack.NODE_DISPLAY_NAME_MAPPINGS, dict)
        assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) <= set(pack.NODE_CLASS_MAPPINGS)
        assert f"{PACK_NAME}.nodes" in sys.modules  # the mappings came from nodes/, not the fallback
        gained = _top_level_modules() - before
        assert not gained & FORBIDDEN
    finally:
        for name in [n for n in sys.modules if n == PACK_NAME or n.startswith(PACK_NAME + ".")]:
            del sys.modules[name]


def test_pack_import_does_not_import_torch(pack_clone):
    # A fresh interpreter, so that nothing imported by other tests hides an import.
    script = (
        "import importlib.util, json, sys\n"
        "path, name = sys.argv[1], sys.argv[2]\n"
        "spec = importlib.util.spec_from_file_location(name, path + '/__init__.py',"
        " submodule_search_locations=[path])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules[name] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(pack_clone), PACK_NAME],
        cwd=pack_clone.parent, capture_output=True, text=True, check=True,
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert PACK_NAME in loaded
    assert not loaded & (FORBIDDEN | TORCH_FAMILY)


def test_l2vsd_core_imports_from_repo_root():
    out = subprocess.run(
        [sys.executable, "-c", "import l2vsd_core; print(l2vsd_core.__file__)"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip().splitlines()[-1]).resolve().parent == ROOT / "l2vsd_core"


def _requirement_name(line: str) -> str:
    """Normalized distribution name of a requirement line (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    assert match, f"not a requirement: {line!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _requirements_txt():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    lines = [line.split("#", 1)[0].strip() for line in lines]
    return [line for line in lines if line]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_requirements_never_install_torch():
    names = {_requirement_name(line) for line in _requirements_txt()}
    assert names, "requirements.txt lists nothing"
    assert not names & TORCH_FAMILY
    # Same runtime dependencies as pyproject, less torch (which ComfyUI already provides).
    deps = {_requirement_name(d) for d in _pyproject()["project"]["dependencies"]}
    assert names == deps - {"torch"}
    assert "ray" not in names  # an optional extra of the headless batch, never a need of the node pack
    assert "ray" in {_requirement_name(d) for d in _pyproject()["project"]["optional-dependencies"]["distributed"]}


def test_pyproject_registry_fields_and_no_torch_pin():
    data = _pyproject()
    comfy = data["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert key in comfy
    assert comfy["PublisherId"] and comfy["DisplayName"]
    project = data["project"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,99}", project["name"])  # registry node id rules
    assert project["urls"]["Repository"].startswith("https://")

    extras = data["project"].get("optional-dependencies", {})
    all_deps = project["dependencies"] + [d for group in extras.values() for d in group]
    torch_deps = [d for d in all_deps if _requirement_name(d) in TORCH_FAMILY]
    # Only a bare `torch` is allowed: no version, no upper bound, no URL.
    assert [d.strip() for d in torch_deps] == ["torch"]


def test_registry_icon_is_a_square_image_in_this_repository():
    """[tool.comfy] names a publisher, a display name and an icon: the raw URL, on the main branch, of a file of this
    repository (so that the registry shows what the repo holds), a square PNG of at most 400 px (the registry's
    limit)."""
    from PIL import Image

    data = _pyproject()
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"].strip() and comfy["DisplayName"].strip()
    repository = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)/?", data["project"]["urls"]["Repository"])
    assert repository, data["project"]["urls"]["Repository"]
    owner, name = repository.groups()
    prefix = f"https://raw.githubusercontent.com/{owner}/{name}/main/"
    assert comfy["Icon"].startswith(prefix), comfy["Icon"]
    icon = ROOT / comfy["Icon"][len(prefix):]
    assert icon.is_file(), f"{comfy['Icon']} is no file of this repository"
    with Image.open(icon) as image:
        assert image.format == "PNG"
        assert image.width == image.height <= 400


def _registry():
    """The pack's own mappings (nodes/, imported as ComfyUI does, under the repo's folder name)."""
    name = "L2VSD_registry_check"
    try:
        pack = _load_pack(ROOT, name)
        return dict(pack.NODE_CLASS_MAPPINGS), dict(pack.NODE_DISPLAY_NAME_MAPPINGS)
    finally:
        for module in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
            del sys.modules[module]


# Display names are what users see and search for: the prefixed type ids must not change them.
DISPLAY_NAMES = {
    "L2VSD_LoadPrior": "L2VSD Load Prior",
    "L2VSD_PriorFromCheckpoint": "L2VSD Prior from Model/CLIP/VAE",
    "L2VSD_AttachLoRAScore": "L2VSD Attach LoRA Score",
    "L2VSD_InitNeRF": "L2VSD Init NeRF",
    "L2VSD_Optimize": "L2VSD Optimize",
    "L2VSD_RefineGeometry": "L2VSD Refine Geometry",
    "L2VSD_RefineTexture": "L2VSD Refine Texture",
    "L2VSD_ExportMesh": "L2VSD Export Mesh",
}
# The type ids before the prefix (issue 16): generic names that other packs register too (the last one loaded wins).
OLD_TYPE_IDS = {"LoadPrior", "AttachLoRAScore", "InitNeRF", "L2VSDOptimize", "RefineGeometry", "RefineTexture",
                "ExportMesh"}


def test_every_type_id_carries_the_pack_prefix_and_keeps_its_display_name():
    classes, display = _registry()
    assert all(type_id.startswith("L2VSD_") for type_id in classes), sorted(classes)
    assert display == DISPLAY_NAMES
    assert set(classes) == set(DISPLAY_NAMES)
    assert not set(classes) & OLD_TYPE_IDS


def _workflow_types(path: Path) -> list:
    """The node types of a bundled workflow: a UI graph's nodes' ``type``, an API graph's ``class_type``."""
    graph = json.loads(path.read_text())
    if path.name.endswith(".api.json"):
        return [node["class_type"] for node in graph.values()]
    types = [node["type"] for node in graph["nodes"]]
    # ComfyUI stores the type id a second time, for search and replace
    types += [node["properties"]["Node name for S&R"] for node in graph["nodes"]
              if "Node name for S&R" in node.get("properties", {})]
    return types


WORKFLOWS = sorted([*(ROOT / "workflows").glob("*.json"), *(ROOT / "workflows" / "api").glob("*.json")])
CORE_NODES = {"PreviewImage", "Preview3D"}  # the core nodes the bundled workflows use


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_bundled_workflows_name_only_registered_type_ids(path):
    classes, _ = _registry()
    types = _workflow_types(path)
    ours = [t for t in types if t.startswith("L2VSD") or t in OLD_TYPE_IDS]
    assert ours, f"{path.name} has none of this pack's nodes"
    assert set(ours) <= set(classes), f"{path.name}: not registered: {sorted(set(ours) - set(classes))}"
    # every other node is one of ComfyUI's core nodes: a misspelt or unprefixed id of ours fails here
    assert set(types) - set(ours) <= CORE_NODES, sorted(set(types) - set(ours))


# ComfyUI (v0.3.64, app/custom_node_manager.py) lists a pack's templates as ``<pack>/<folder>/*.json`` for the folder
# names below, without recursing; frontend 1.58.1 shows ``<name>.jpg`` from the same folder as the thumbnail.
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")


def test_the_template_list_holds_the_ui_workflows_each_with_a_thumbnail():
    from PIL import Image

    listed = sorted(p for folder in TEMPLATE_FOLDERS for p in (ROOT / folder).glob("*.json"))
    assert listed, "no template folder"
    for path in listed:
        graph = json.loads(path.read_text())
        assert isinstance(graph, dict) and "nodes" in graph and "links" in graph, \
            f"{path.name} is not a UI workflow: ComfyUI would list it as a template that cannot open"
        thumbnail = path.with_suffix(".jpg")
        assert thumbnail.is_file(), f"{path.name} has no thumbnail {thumbnail.name}"
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and min(image.size) >= 256
    # the API twins stay bundled (the tests run them), out of the list
    twins = sorted((ROOT / "workflows" / "api").glob("*.api.json"))
    assert [p.name[:-len(".api.json")] for p in twins] == [p.stem for p in listed]
