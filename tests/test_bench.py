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
    assert set(data) == {"device", "config", "methods", "ratio_to_vsd"}
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
