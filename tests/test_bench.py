"""The step and render benchmarks and docs/bench/cuda_sd_stages.py run end to end and write the documented JSON
(timings themselves are not asserted)."""
import json
import os
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


def test_cuda_sd_stages_script_runs_three_stages_tiny(tmp_path):
    """docs/bench/cuda_sd_stages.py --tiny (the issue-15 GPU script's CPU check): a tiny SD-2.1-family prior through
    stages 1-3 with the step counts asked for, each timed per step; stage 1 in two render sizes; the GLB written."""
    out = tmp_path / "sd_stages.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "docs/bench/cuda_sd_stages.py", "--tiny", "--device", "cpu", "--steps", "5",
                           "--milestone", "2", "--geometry-steps", "3", "--texture-steps", "4", "--json", str(out),
                           "--work", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["ok"] and data["error"] is None and data["device"] == "cpu"
    assert data["options"]["stages"] == 3 and data["options"]["method"] == "l2vsd"
    stages = data["stages"]
    assert [(s["stage"], s["name"]) for s in stages] == [(1, "nerf"), (2, "geometry"), (3, "texture")]
    assert [(s["steps"], s["total"], s["skipped"]) for s in stages] == [(5, 5, 0), (3, 3, 0), (4, 4, 0)]
    assert {size: p["steps"] for size, p in stages[0]["phases"].items()} == {"8": 2, "16": 3}  # switch at step 2
    assert list(stages[1]["phases"]) == ["16"] and list(stages[2]["phases"]) == ["16"]
    for s in stages:
        step_s = [t for p in s["phases"].values() for t in p["step_s"]]
        assert len(step_s) == s["steps"] and all(t > 0 for t in step_s)
        assert s["s_per_step"] > 0 and all(p["s_per_step"] > 0 for p in s["phases"].values())
        # step_s is rounded to 0.1 ms; the wall time holds the stage's set-up and every step
        assert abs(s["first_step_s"] - step_s[0]) < 1e-4 and sum(step_s) <= s["wall_s"] + 1e-3
        assert s["peak_mem_mb"] is None  # CPU: no CUDA peak
    # the stages' wall times and the export add up to the generate call
    assert abs(sum(s["wall_s"] for s in stages) + data["after_last_step_s"] - data["generate_s"]) < 1e-6
    mesh = Path(data["outputs"]["mesh"]["path"])
    assert mesh.is_file() and mesh.read_bytes()[:4] == b"glTF" and data["outputs"]["mesh"]["bytes"] > 0
    assert Path(data["outputs"]["turntable"]["path"]).is_file() and data["stage_steps"]["texture"] == 4
    assert "| **3 texture** | 16 | 4/4 |" in proc.stdout


def test_batch_benchmark_times_each_layout(tmp_path):
    """One toy prompt × 1 step in each of the three layouts on a local Ray (needs Ray)."""
    import pytest
    pytest.importorskip("ray")
    out = tmp_path / "batch.json"
    proc = subprocess.run([sys.executable, "-m", "l2vsd_core.bench", "batch", "--prompts", "1", "--steps", "1",
                           "--out", str(tmp_path / "runs"), "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    cpus = os.cpu_count()
    assert [r["name"] for r in data["layouts"]] == ["1 worker × 1 thread", f"1 worker × {cpus} threads",
                                                   f"{cpus} workers × 1 thread"]
    for r in data["layouts"]:
        assert r["wall_s"] > 0 and len(r["run_s"]) == 1
        assert abs(r["speedup_vs_1x1"] - data["layouts"][0]["wall_s"] / r["wall_s"]) < 0.01
    assert data["layouts"][0]["speedup_vs_1x1"] == 1.0
    assert "| 1 worker × 1 thread |" in proc.stdout
