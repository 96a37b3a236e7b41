"""``python -m l2vsd_core batch``: the plan (folders, seeds, what counts as finished), one run outside Ray (records,
errors, the toy metrics), and the real thing on a local Ray of two workers with the bundled toy prior: three prompts
equal sequential ``generate`` runs bit for bit, a second start does no work, a worker killed mid-run is retried and
goes on from its checkpoint, and Ctrl-C leaves every run resumable."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from l2vsd_core.batch import plan_runs, read_record
from l2vsd_core.batch.plan import RECORD, RUNNING, STOP_FILE, SUMMARY, is_finished, total_steps
from l2vsd_core.batch.task import run_one
from l2vsd_core.prompt_list import read_prompts, slug

ROOT = Path(__file__).resolve().parents[1]
# Toy runs as small as a real run gets: a few steps at the toy recipe, a coarse export.
SMALL = ["--prior", "toy", "--turntable-views", "2", "--mesh-resolution", "32"]
SMALL_OPTIONS = {"prior": "toy", "turntable_views": 2, "mesh_resolution": 32}
PROMPTS = ["a red cube", "a green cone", "a blue sphere"]

ray = pytest.importorskip("ray", reason="the batch tests need Ray: pip install -e '.[test,distributed]'")


# ------------------------------------------------------------------------------------------------------------ plan
def test_prompts_file_and_slugs(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red cube  # the demo's\n\n# a comment line\nA Red Cube!\n")
    assert read_prompts(f) == ["a red cube", "A Red Cube!"]
    assert slug("A Red Cube!") == "a_red_cube"
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_plan_gives_every_prompt_its_own_folder(tmp_path):
    runs = plan_runs(["a red cube", "A Red Cube!", "a red cube", "x" * 100], tmp_path, {"prior": "toy", "seed": 7})
    folders = [r.folder for r in runs]
    assert len(runs) == 3  # the repeated line runs once
    assert len(set(folders)) == 3 and all(f.startswith("a_red_cube_") for f in folders[:2])  # a clash: hashed
    assert folders[2] == "x" * 60
    assert all(r.seed == 7 and r.options["seed"] == 7 and r.options["out"] == str(tmp_path / r.folder) for r in runs)
    # a prompt's folder does not depend on the other lines
    assert plan_runs(["a red cube", "A Red Cube!"], tmp_path, {})[0].folder == folders[0]
    seeded = plan_runs(["a red cube"], tmp_path, {"prior": "toy"}, seeds=[0, 3])
    assert [(r.folder, r.seed) for r in seeded] == [("a_red_cube_seed0", 0), ("a_red_cube_seed3", 3)]
    assert total_steps({"prior": "toy", "prompt": "a red cube", "out": str(tmp_path), "steps": 9}) == 9
    assert total_steps({"prior": "toy", "prompt": "a red cube", "out": str(tmp_path), "stages": 3}) == 400 + 300 + 200


def test_finished_means_done_with_the_same_options(tmp_path):
    run = plan_runs(["a red cube"], tmp_path, {"prior": "toy", "steps": 5, "threads": 1})[0]
    assert not is_finished(run)
    run.out.mkdir()
    record = {"status": "done", "options": dict(run.options)}
    (run.out / RECORD).write_text(json.dumps(record))
    assert is_finished(run) and read_record(run) == record
    more = plan_runs(["a red cube"], tmp_path, {"prior": "toy", "steps": 6, "threads": 1})[0]
    assert not is_finished(more)  # more steps: run again (from the checkpoint)
    other_threads = plan_runs(["a red cube"], tmp_path, {"prior": "toy", "steps": 5, "threads": 2})[0]
    assert is_finished(other_threads)  # threads do not change the result
    (run.out / RECORD).write_text(json.dumps({**record, "status": "failed"}))
    assert not is_finished(run)
    (run.out / RECORD).write_text("{broken")
    assert read_record(run) is None and not is_finished(run)


# ------------------------------------------------------------------------------------------------- one run, no Ray
def _summary(batch_dir: Path) -> None:
    batch_dir.mkdir(parents=True, exist_ok=True)
    (batch_dir / SUMMARY).write_text("{}")


def test_run_one_records_a_failure_with_its_reason(tmp_path):
    _summary(tmp_path)
    run = plan_runs(["a red cube"], tmp_path, {"prior": str(tmp_path / "no_such_prior"), "steps": 2})[0]
    record = run_one(run, tmp_path)
    assert record["status"] == "failed" and "no_such_prior" in record["error"]
    assert json.loads((run.out / RECORD).read_text())["status"] == "failed"
    assert not (run.out / RUNNING).exists()
    assert "failed" in (run.out / "log.txt").read_text()


def test_run_one_refuses_a_batch_folder_it_cannot_see(tmp_path):
    run = plan_runs(["a red cube"], tmp_path, {"prior": "toy", "steps": 2})[0]
    with pytest.raises(RuntimeError, match="shared file system"):
        run_one(run, tmp_path)  # no summary.json: this "node" does not see the driver's folder


def test_run_one_after_a_stop_request_leaves_the_folder_alone(tmp_path):
    _summary(tmp_path)
    (tmp_path / STOP_FILE).touch()
    run = plan_runs(["a red cube"], tmp_path, {"prior": "toy", "steps": 2})[0]
    assert run_one(run, tmp_path)["status"] == "stopped"
    assert not run.out.exists()


def test_run_one_scores_a_toy_run(tmp_path, one_thread):
    _summary(tmp_path)
    run = plan_runs(["a red cube"], tmp_path, {**SMALL_OPTIONS, "steps": 3, "threads": 1})[0]
    record = run_one(run, tmp_path)
    assert record["status"] == "done", record.get("error")
    assert record["steps"] == {"stage1": 3} and record["resumed_from"] == 0
    metrics = json.loads((run.out / "metrics.json").read_text())
    assert record["metrics"] == metrics and {"fidelity", "frechet", "iou", "mesh_iou"} <= set(metrics)
    assert Path(record["paths"]["mesh"]).is_file()


# ------------------------------------------------------------------------------------------------------ on Ray
def _batch_command(prompts: Path, out: Path, *extra: str, bar: bool = False) -> list:
    return [sys.executable, "-m", "l2vsd_core", "batch", "--prompts", str(prompts), "--out", str(out), *SMALL,
            "--no-metrics", *([] if bar else ["--no-progress"]), *extra]


def _env() -> dict:
    # the batch's own runs set their threads; the driver itself needs none
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def _batch(prompts: Path, out: Path, *extra: str, timeout: int = 300,
           bar: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(_batch_command(prompts, out, *extra, bar=bar), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _prompts(tmp_path: Path, prompts=PROMPTS) -> Path:
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n")
    return f


def _sequential(record: dict, out: Path) -> Path:
    """The same run as plain ``generate`` (in this process, same options and threads) in ``out``."""
    from l2vsd_core.generate import generate
    generate({**record["options"], "out": str(out), "resume": False})
    return out


def _same_run(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "checkpoint.safetensors")), load_file(str(b / "checkpoint.safetensors"))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert (a / "model.glb").read_bytes() == (b / "model.glb").read_bytes()


def _wait_for(condition, timeout: float, what: str, process=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the batch ended before {what}: {process.communicate()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _checkpoint_step(folder: Path):
    try:
        return json.loads((folder / "checkpoint.safetensors.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def test_three_prompts_on_two_workers_equal_sequential_runs_and_a_second_start_does_nothing(tmp_path):
    prompts, out = _prompts(tmp_path), tmp_path / "batch"
    r = _batch(prompts, out, "--steps", "6", "--workers", "2", bar=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # the batch's bar: all runs' steps, the runs done / running / failed, and tqdm's elapsed<remaining
    bar = r.stderr.replace("\r", "\n").splitlines()
    assert any("batch:" in line and "18/18" in line and "done 3/3, running 0, failed 0" in line for line in bar)
    assert any("batch:" in line and "done 0/3, running 2, failed 0" in line for line in bar)
    assert any(re.search(r"\d+/18 \[\d\d:\d\d<\d\d:\d\d", line) for line in bar)
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["counts"] == {"done": 3}
    assert [run["prompt"] for run in summary["runs"]] == PROMPTS
    hosts_pids = set()
    for run in summary["runs"]:
        folder = out / run["folder"]
        assert run["ran"] and run["attempts"] == 1 and run["resumed_from"] == 0 and run["steps"] == {"stage1": 6}
        assert run["seconds"] > 0 and Path(run["paths"]["mesh"]).is_file()
        assert "metrics" not in run  # --no-metrics
        record = json.loads((folder / RECORD).read_text())
        assert record["options"]["threads"] == 1 and record["options"]["seed"] == 0
        hosts_pids.add((folder / "log.txt").read_text().split("pid ")[1].split(")")[0])
        _same_run(folder, _sequential(record, tmp_path / "sequential" / run["folder"]))
    assert len(hosts_pids) >= 2  # the runs shared two workers

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != SUMMARY}
    start = time.perf_counter()
    again = _batch(prompts, out, "--steps", "6", "--workers", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stderr and time.perf_counter() - start < 30
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no run touched
    assert all(not run["ran"] for run in json.loads((out / SUMMARY).read_text())["runs"])


def test_a_killed_worker_is_retried_and_goes_on_from_the_checkpoint(tmp_path):
    prompts, out = _prompts(tmp_path, PROMPTS[:1]), tmp_path / "batch"
    folder = out / slug(PROMPTS[0])
    batch = subprocess.Popen(_batch_command(prompts, out, "--steps", "30", "--checkpoint-every", "5"), cwd=ROOT,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = _wait_for(lambda: (_checkpoint_step(folder) or 0) >= 5 and _checkpoint_step(folder), 240,
                         "the first checkpoint", batch)
        worker = json.loads((folder / RUNNING).read_text())
        assert worker["attempt"] == 1
        os.kill(worker["pid"], signal.SIGKILL)
        stdout, stderr = batch.communicate(timeout=300)
    finally:
        batch.kill()
    assert batch.returncode == 0, stderr[-3000:]
    run = json.loads((out / SUMMARY).read_text())["runs"][0]
    assert run["status"] == "done" and run["attempts"] == 2 and run["steps"] == {"stage1": 30}
    assert seen <= run["resumed_from"] < 30 and run["resumed_from"] % 5 == 0
    assert f"attempt 2 resumes from step {run['resumed_from']}" in stderr
    assert f"at step {run['resumed_from']} (NeRF stage)" in (folder / "log.txt").read_text()
    # the retried run is the uninterrupted one (a resume is exact)
    _same_run(folder, _sequential(json.loads((folder / RECORD).read_text()), tmp_path / "sequential"))


def test_ctrl_c_stops_every_run_at_a_checkpoint_and_a_new_start_finishes_them(tmp_path):
    prompts, out = _prompts(tmp_path), tmp_path / "batch"
    steps = "30"
    # no periodic checkpoint: the one a run has after the stop is the stop's; a preview every 2 steps shows progress
    batch = subprocess.Popen(_batch_command(prompts, out, "--steps", steps, "--workers", "2", "--checkpoint-every",
                                            "1000", "--preview-every", "2"), cwd=ROOT, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: all((out / slug(p) / "preview_000002.png").is_file() for p in PROMPTS[:2]), 240,
                  "two runs past their second step", batch)
        os.killpg(batch.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        stdout, stderr = batch.communicate(timeout=120)
    finally:
        batch.kill()
    assert batch.returncode == 130, stderr[-3000:]
    assert "stopping" in stderr
    summary = json.loads((out / SUMMARY).read_text())
    status = {run["prompt"]: run["status"] for run in summary["runs"]}
    assert status == {PROMPTS[0]: "stopped", PROMPTS[1]: "stopped", PROMPTS[2]: "queued"}
    stopped_at = {p: _checkpoint_step(out / slug(p)) for p in PROMPTS[:2]}
    assert all(2 <= step < int(steps) for step in stopped_at.values())  # a checkpoint at the step it stopped
    assert not (out / slug(PROMPTS[2])).exists() and not (out / STOP_FILE).exists()

    r = _batch(prompts, out, "--steps", steps, "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {run["prompt"]: run for run in json.loads((out / SUMMARY).read_text())["runs"]}
    assert all(run["status"] == "done" and run["steps"] == {"stage1": int(steps)} for run in runs.values())
    assert {p: runs[p]["resumed_from"] for p in PROMPTS} == {**stopped_at, PROMPTS[2]: 0}


def test_bad_input_is_one_line_before_anything_runs(tmp_path):
    prompts = _prompts(tmp_path)
    for extra, message in ((("--steps", "0"), "steps"), (("--workers", "0"), "--workers"),
                           (("--cpus-per-run", "64"), "no Ray node has 64 CPUs")):
        r = _batch(prompts, tmp_path / "out", *extra, timeout=120)
        assert r.returncode == 2 and message in r.stderr.splitlines()[-1], r.stderr[-2000:]
    r = _batch(tmp_path / "missing.txt", tmp_path / "out", timeout=120)
    assert r.returncode == 2 and "missing.txt" in r.stderr.splitlines()[-1]
    assert not any((tmp_path / "out").glob("*/config.json"))  # no run started


def test_without_ray_the_batch_says_how_to_install_it(tmp_path, monkeypatch):
    from l2vsd_core.batch.driver import BatchError, run_batch
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(BatchError, match=r"pip install 'comfyui-l2vsd\[distributed\]'"):
        run_batch(_prompts(tmp_path), tmp_path / "out", {"prior": "toy"})


def test_a_lost_node_s_run_resumes_on_another_node(tmp_path):
    """A Ray cluster of a head (no CPUs: it runs nothing) and two one-CPU nodes on this machine; the node running the
    prompt is removed (its raylet and workers killed) after a checkpoint: the run goes on, on the other node, from that
    checkpoint, and ends equal to the uninterrupted run."""
    from ray.cluster_utils import Cluster

    prompts, out = _prompts(tmp_path, PROMPTS[:1]), tmp_path / "batch"
    folder = out / slug(PROMPTS[0])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    batch = None
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        batch = subprocess.Popen(_batch_command(prompts, out, "--steps", "30", "--checkpoint-every", "5",
                                                "--address", cluster.address), cwd=ROOT, env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = _wait_for(lambda: (_checkpoint_step(folder) or 0) >= 5 and _checkpoint_step(folder), 240,
                         "the first checkpoint", batch)
        lost = json.loads((folder / RUNNING).read_text())["ray_node"]
        cluster.remove_node(next(node for node in nodes if node.node_id == lost), allow_graceful=False)
        stdout, stderr = batch.communicate(timeout=300)
    finally:
        if batch is not None:
            batch.kill()
        cluster.shutdown()
    assert batch.returncode == 0, stderr[-3000:]
    run = json.loads((out / SUMMARY).read_text())["runs"][0]
    assert run["status"] == "done" and run["attempts"] == 2 and run["ray_node"] != lost
    assert seen <= run["resumed_from"] < 30
    assert f"attempt 2 resumes from step {run['resumed_from']}" in stderr
    _same_run(folder, _sequential(json.loads((folder / RECORD).read_text()), tmp_path / "sequential"))
