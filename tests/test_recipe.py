"""The README's "ProlificDreamer's recipe" table is the truth about our defaults: every row that names a config field
(a dotted ``RunConfig`` path in backticks in its last column) holds in ``RunConfig()`` and in what ``generate`` runs
for a Stable Diffusion prior; every CLI flag it names sets that field; the HiFA table's flags give HiFA's values; and
the SD workflows' node inputs are the table's values."""
import json
import math
import re
from pathlib import Path

import pytest

from l2vsd_core.config import OPTIONS, RunConfig, to_json
from l2vsd_core.generate import run_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RECIPE_HEADER = ["stage", "threestudio key", "threestudio", "ours", "where (config field / CLI flag)"]
HIFA_HEADER = ["threestudio key", "prolificdreamer-hifa.yaml", "CLI flag", "L2VSD Optimize input", "config field"]
SD_WORKFLOWS = ["sd21_stage1", "sd21_three_stage", "sd21_l2esd", "sd21_l2hifa"]
PATH = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")   # a config path (files have a "/")
MISSING = object()


# ------------------------------------------------------------------------------------------------------- parsing
def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(header: list) -> list:
    """The README table whose header row is ``header``, as a list of ``{column: cell}``."""
    lines = README.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and _cells(line) == header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = _cells(row)
                assert len(cells) == len(header), f"README table row has {len(cells)} cells: {row}"
                rows.append(dict(zip(header, cells)))
            return rows
    raise AssertionError(f"no README table with the header {header}")


def _ticks(cell: str) -> list:
    return re.findall(r"`([^`]*)`", cell)


def _value(text: str):
    """A cell's value: JSON (numbers, lists, true/false/null) or else the word itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _paths(cell: str) -> list:
    return [t for t in _ticks(cell) if not t.startswith("-") and PATH.match(t)]


def _flags(cell: str) -> list:
    return [t.split()[0] for t in _ticks(cell) if t.startswith("--")]


def _get(config, path: str):
    node = config
    for part in path.split("."):
        if not hasattr(node, part):
            return MISSING
        node = getattr(node, part)
    return to_json(node)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


RECIPE = _table(RECIPE_HEADER)
CHECKED = [row for row in RECIPE if _paths(row["where (config field / CLI flag)"])]
SD = dict(prompt="x", prior="some/sd/model", out="o")


def _ours(row):
    ticks = _ticks(row["ours"])
    assert len(ticks) == 1, f"the 'ours' cell must be one value in backticks: {row}"
    return _value(ticks[0])


def _row_for(path: str) -> dict:
    found = [row for row in CHECKED if path in _paths(row["where (config field / CLI flag)"])]
    assert len(found) == 1, f"expected one README recipe row naming {path}; found {len(found)}"
    return found[0]


def _recipe(path: str):
    return _ours(_row_for(path))


# ---------------------------------------------------------------------------------------------- README vs config
def test_the_table_is_there_and_names_config_fields():
    assert len(RECIPE) >= 60
    assert len(CHECKED) >= 50
    stages = {row["stage"] for row in CHECKED}
    assert {"1", "2", "3", "all"} <= stages


@pytest.mark.parametrize("row", CHECKED, ids=lambda r: f"{r['stage']}:{_paths(r['where (config field / CLI flag)'])[0]}")
def test_recipe_row_is_our_default(row):
    ours = _ours(row)
    defaults, sd = RunConfig(), run_config(SD)
    for path in _paths(row["where (config field / CLI flag)"]):
        value = _get(defaults, path)
        assert value is not MISSING, f"README names {path!r}, which is not a RunConfig field"
        assert _same(value, ours), f"{path}: RunConfig() has {value!r}, the README says {ours!r}"
        from_cli = _get(sd, path)
        assert _same(from_cli, ours), f"{path}: generate.run_config for an SD prior has {from_cli!r}, README {ours!r}"


@pytest.mark.parametrize("row", [r for r in RECIPE if _flags(r["where (config field / CLI flag)"])],
                         ids=lambda r: f"{r['stage']}:{_flags(r['where (config field / CLI flag)'])[0]}")
def test_recipe_flags_set_the_named_fields(row):
    """Each flag a row names exists and sets at least one of the row's fields (and every field it names, when the
    row names exactly one flag)."""
    by_dest = OPTIONS.by_dest()
    where = row["where (config field / CLI flag)"]
    paths, flags = _paths(where), _flags(where)
    assert paths, f"a row with a flag must name the config field too: {row}"
    for flag in flags:
        dest = flag[2:].replace("-", "_")
        assert dest in by_dest, f"README names {flag}, which generate does not have"
        assert set(by_dest[dest].paths) & set(paths), f"{flag} sets {by_dest[dest].paths}, not {paths}"
    if len(flags) == 1:
        missing = set(paths) - set(by_dest[flags[0][2:].replace("-", "_")].paths)
        assert not missing, f"{flags[0]} does not set {sorted(missing)}"


def test_hifa_flags_give_hifas_values():
    rows = _table(HIFA_HEADER)
    assert len(rows) == 5
    by_dest = OPTIONS.by_dest()
    options = dict(SD)
    for row in rows:
        flag, *value = _ticks(row["CLI flag"])[0].split()
        option = by_dest[flag[2:].replace("-", "_")]
        options[option.dest] = True if option.kind == "flag" else _value(value[0])
    config = run_config(options)
    for row in rows:
        path = _ticks(row["config field"])[0]
        expected = _value(row["prolificdreamer-hifa.yaml"].split(",")[-1].strip())
        assert _same(_get(config, path), expected), f"{path}: {_get(config, path)!r} vs HiFA's {expected!r}"


# ----------------------------------------------------------------------------------------------------- workflows
def _number_list(value):
    """A node input ("0.02", "5000,0.98,0.5,5001", 0.02, [..]) as a number or a list of numbers."""
    if isinstance(value, str):
        parts = [float(x) for x in value.split(",")]
        return parts[0] if len(parts) == 1 else parts
    return value


def _nodes(workflow: dict, class_type: str) -> list:
    return [node["inputs"] for node in workflow.values() if node.get("class_type") == class_type]


def _one(workflow: dict, class_type: str, name: str) -> dict:
    found = _nodes(workflow, class_type)
    assert len(found) == 1, f"{name}: expected one {class_type} node, found {len(found)}"
    return found[0]


def _check_input(inputs: dict, key: str, expected, name: str, node: str):
    assert key in inputs, f"{name}: {node} has no input {key!r} (inputs: {sorted(inputs)})"
    got = inputs[key]
    ok = _same(_number_list(got), expected) if not isinstance(expected, str) else got == expected
    assert ok, f"{name}: {node}.{key} is {got!r}; the README recipe says {expected!r}"


def _workflow_params():
    return [pytest.param(name, marks=pytest.mark.skipif(not (ROOT / "workflows" / "api" / f"{name}.api.json").is_file(),
                                                        reason=f"workflows/api/{name}.api.json not present"))
            for name in SD_WORKFLOWS]


@pytest.mark.parametrize("name", _workflow_params())
def test_sd_workflow_is_the_recipe(name):
    workflow = json.loads((ROOT / "workflows" / "api" / f"{name}.api.json").read_text())
    hifa = name == "sd21_l2hifa"
    widths, milestones = _recipe("nerf.widths"), _recipe("nerf.resolution_milestones")
    guidance = _recipe("nerf.distill.guidance_scale")

    optimize = _one(workflow, "L2VSD_Optimize", name)
    _check_input(optimize, "steps", _recipe("nerf.steps"), name, "L2VSD_Optimize")
    _check_input(optimize, "resolution", widths[0], name, "L2VSD_Optimize")
    schedule = ",".join(f"{w}@{m}" for w, m in zip(widths[1:], milestones))
    _check_input(optimize, "resolution_schedule", schedule, name, "L2VSD_Optimize")
    assert "guidance_scale" in optimize, f"{name}: L2VSD_Optimize has no guidance_scale"
    assert _same(optimize["guidance_scale"], -1) or _same(optimize["guidance_scale"], guidance), \
        f"{name}: L2VSD_Optimize.guidance_scale is {optimize['guidance_scale']!r}; expected -1 (the score's) or {guidance}"
    if hifa:
        rows = {_ticks(r["L2VSD Optimize input"])[0]: _value(r["prolificdreamer-hifa.yaml"].split(",")[-1].strip())
                for r in _table(HIFA_HEADER)}
        for key, value in rows.items():
            _check_input(optimize, key, value, name, "L2VSD_Optimize")
    else:
        _check_input(optimize, "min_step_percent", _recipe("nerf.distill.timesteps.min_step_percent"), name,
                     "L2VSD_Optimize")
        _check_input(optimize, "max_step_percent", _recipe("nerf.distill.timesteps.max_step_percent"), name,
                     "L2VSD_Optimize")
        for key, path in (("sqrt_anneal", "nerf.distill.timesteps.sqrt_anneal"), ("lambda_image", "nerf.lambda_image"),
                          ("lambda_z_variance", "nerf.lambda_z_variance")):
            if key in optimize:
                _check_input(optimize, key, _recipe(path), name, "L2VSD_Optimize")
    for key, path in (("lambda_sparsity", "nerf.lambda_sparsity"), ("lambda_opaque", "nerf.lambda_opaque")):
        if key in optimize:
            _check_input(optimize, key, _recipe(path), name, "L2VSD_Optimize")
    for key, path in (("lr_encoding", "nerf.lr_encoding"), ("lr_network", "nerf.lr_network"),
                      ("lr_background", "nerf.lr_background")):
        _check_input(optimize, key, _recipe(path), name, "L2VSD_Optimize")

    score = _one(workflow, "L2VSD_AttachLoRAScore", name)
    _check_input(score, "learning_rate", _recipe("lora.lr"), name, "L2VSD_AttachLoRAScore")
    _check_input(score, "rank", _recipe("lora.rank"), name, "L2VSD_AttachLoRAScore")
    _check_input(score, "camera_dropout", _recipe("lora.camera_dropout"), name, "L2VSD_AttachLoRAScore")
    _check_input(score, "guidance_scale", guidance, name, "L2VSD_AttachLoRAScore")

    scene = _one(workflow, "L2VSD_InitNeRF", name)
    for key, path in (("levels", "scene.levels"), ("log2_hashmap_size", "scene.log2_hashmap_size"),
                      ("base_resolution", "scene.base_resolution"), ("max_resolution", "scene.max_resolution"),
                      ("mlp_neurons", "scene.mlp_neurons"), ("samples_per_ray", "nerf.num_samples_per_ray"),
                      ("grid_resolution", "nerf.grid_resolution"), ("radius", "nerf.radius")):
        _check_input(scene, key, _recipe(path), name, "L2VSD_InitNeRF")

    for geometry in _nodes(workflow, "L2VSD_RefineGeometry"):
        _check_input(geometry, "steps", _recipe("geometry.steps"), name, "L2VSD_RefineGeometry")
        _check_input(geometry, "resolution", _recipe("geometry.resolution"), name, "L2VSD_RefineGeometry")
        _check_input(geometry, "guidance_scale", _recipe("geometry.distill.guidance_scale"), name,
                     "L2VSD_RefineGeometry")
        _check_input(geometry, "method", _recipe("geometry.distill.method"), name, "L2VSD_RefineGeometry")
        _check_input(geometry, "dmtet_resolution", _recipe("geometry.dmtet_resolution"), name, "L2VSD_RefineGeometry")
        _check_input(geometry, "learning_rate", _recipe("geometry.lr"), name, "L2VSD_RefineGeometry")
        for key in ("lambda_normal_consistency", "lambda_laplacian_smoothness"):
            _check_input(geometry, key, _recipe(f"geometry.{key}"), name, "L2VSD_RefineGeometry")
    for texture in _nodes(workflow, "L2VSD_RefineTexture"):
        _check_input(texture, "steps", _recipe("texture.steps"), name, "L2VSD_RefineTexture")
        _check_input(texture, "resolution", _recipe("texture.resolution"), name, "L2VSD_RefineTexture")
        for key in ("lr_encoding", "lr_network", "lr_background"):
            _check_input(texture, key, _recipe(f"texture.{key}"), name, "L2VSD_RefineTexture")
    if name == "sd21_three_stage":
        assert _nodes(workflow, "L2VSD_RefineGeometry") and _nodes(workflow, "L2VSD_RefineTexture"), \
            f"{name}: expected an L2VSD_RefineGeometry and an L2VSD_RefineTexture node"
