"""The step benchmark runs end to end and writes the documented JSON (timings themselves are not asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_benchmark_writes_ratios(tmp_path):
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, "-m", "l2vsd_core.bench", "step", "--config", "tiny", "--steps", "1",
                           "--warmup", "0", "--methods", "vsd,l2vsd:double_backward,l2vsd_last", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"device", "config", "methods", "ratio_to_vsd", "errors"}
    assert data["errors"] == {}
    assert list(data["methods"]) == ["vsd", "l2vsd:double_backward", "l2vsd_last"]
    for result in data["methods"].values():
        assert result["s_per_step"] > 0
    assert data["ratio_to_vsd"]["vsd"] == 1.0
    assert data["config"]["last_layer_parameters"] < data["config"]["lora_parameters"]
    assert "| l2vsd_last |" in proc.stdout


def test_step_benchmark_refuses_unknown_methods(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "l2vsd_core.bench", "step", "--methods", "vsd,l3vsd"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "method must be one of" in proc.stderr


def test_render_benchmark_runs_field_and_renderer_together(tmp_path):
    out = tmp_path / "render.json"
    proc = subprocess.run([sys.executable, "-m", "l2vsd_core.bench", "render", "--resolution", "16", "--samples", "16",
                           "--levels", "4", "--log2-hashmap-size", "12", "--rounds", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    variants = data["variants"]
    assert set(variants) == {"no_grid", "occupancy_grid"}
    assert variants["no_grid"]["field_points_per_render"] == 16 * 16 * 16
    # the initial blob leaves most of the box empty: the grid must spare the field most points
    assert variants["occupancy_grid"]["field_points_per_render"] < variants["no_grid"]["field_points_per_render"] / 2
    assert all(v["rays_per_s"] > 0 for v in variants.values())


def test_step_benchmark_profiles_each_method(tmp_path):
    """--profile N: one more step of each method under torch.profiler, its N costliest operators by self time; the
    shares are of that step's total, so they sum to at most 1."""
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, "-m", "l2vsd_core.bench", "step", "--config", "tiny", "--steps", "1",
                           "--warmup", "0", "--methods", "vsd,l2vsd:forward_ad", "--profile", "5", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    profile = json.loads(out.read_text())["profile"]
    assert list(profile) == ["vsd", "l2vsd:forward_ad"]
    for p in profile.values():
        ops = p["ops"]
        assert len(ops) == 5 and p["self_ms_total"] > 0
        assert [o["self_ms"] for o in ops] == sorted((o["self_ms"] for o in ops), reverse=True)
        assert 0 < sum(o["share"] for o in ops) <= 1 + 1e-9
    assert "**l2vsd:forward_ad**" in proc.stdout and "| operator | self ms |" in proc.stdout
