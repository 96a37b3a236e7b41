"""The batch on Ray: one task per planned run, retried when its worker dies, with progress for the whole batch.

:func:`run_batch` plans the runs (:mod:`~l2vsd_core.batch.plan`), skips those finished earlier, writes
``OUT/summary.json`` and only then starts (or joins, with ``address``) Ray — a batch with nothing left to do never
starts it.  Each run is a Ray task (:func:`~l2vsd_core.batch.task.run_one`) needing ``cpus_per_run`` CPUs and
``gpus_per_run`` GPUs (Ray assigns the GPU: the run sees only its own); ``workers`` caps how many run at once.

Fault tolerance is Ray's: a task whose worker process or node dies is run again (``retries`` times), and the retry
resumes from the run's last checkpoint.  A run's own error (bad prompt, a crash) is not retried: its record says
``failed`` and the others go on.  Ctrl-C (or SIGTERM, as a cluster scheduler sends) creates ``OUT/STOP``: every run
stops after its current step with its checkpoint written, nothing new starts, and ``summary.json`` says what is
left; a second Ctrl-C cancels the workers at once (each run then resumes from its last periodic checkpoint).
Starting the batch again does what is left.  Two batches cannot share an ``OUT`` (a lock file).

The driver learns each run's attempt and steps from its ``running.json`` in the shared folder, not from a Ray actor:
nothing the progress needs can be lost with a node.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..files import atomic_write_text
from ..prompt_list import read_prompts
from .plan import RECORD, RUNNING, STOP_FILE, SUMMARY, PlannedRun, is_finished, plan_runs, read_record, total_steps
from ..cli import CtrlC
from .task import read_running, run_one, steps_done

__all__ = ["BatchError", "run_batch", "exit_code", "summary_table"]

LOCK = ".batch.lock"
POLL = 1.0  # seconds between looks at the running tasks


class BatchError(ValueError):
    """A problem with the batch's input or set-up (the CLI prints it as one line)."""


def _require_ray():
    try:
        import ray
    except ImportError:
        raise BatchError("batch runs on Ray, which is not installed: pip install 'comfyui-l2vsd[distributed]' "
                         "(or pip install ray)") from None
    return ray


def _task(ray, batch_dir: str, metrics: bool):
    @ray.remote
    def batch_run(run: dict) -> dict:
        return run_one(PlannedRun(**run), batch_dir, metrics,
                       where={"ray_node": ray.get_runtime_context().get_node_id()})
    return batch_run


@contextlib.contextmanager
def _lock(out: Path):
    handle = open(out / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise BatchError(f"another batch is running in {out} (it holds {out / LOCK}); wait for it or stop it "
                         f"(Ctrl-C, or create {out / STOP_FILE})") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr, desc="batch")


def run_batch(prompts_file, out, options: dict, seeds: Optional[Sequence[int]] = None, address: Optional[str] = None,
              gpus_per_run="auto", cpus_per_run: float = 1.0, workers: Optional[int] = None, retries: int = 3,
              metrics: bool = True, progress: bool = True, echo: Optional[Callable[[str], None]] = None) -> dict:
    """Run every prompt of ``prompts_file`` (× ``seeds``) with generate's ``options`` (its flags' names: ``prior``,
    ``steps``, …) in ``OUT/<slug>/``; returns the summary (also ``OUT/summary.json``).  ``BatchError`` for bad input,
    before anything runs; KeyboardInterrupt after a second Ctrl-C."""
    echo = echo or (lambda message: print(message, file=sys.stderr, flush=True))
    out = Path(out).expanduser().resolve()
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise BatchError(f"--out {str(out)!r}: {str(p)!r} is an existing file, not a folder")
    if workers is not None and int(workers) < 1:
        raise BatchError(f"--workers must be at least 1; got {workers}")
    if not float(cpus_per_run) > 0:
        raise BatchError(f"--cpus-per-run must be > 0; got {cpus_per_run}")
    if gpus_per_run != "auto" and not float(gpus_per_run) >= 0:
        raise BatchError(f"--gpus-per-run must be 'auto' or >= 0; got {gpus_per_run}")
    if int(retries) < 0:
        raise BatchError(f"--retries must be >= 0; got {retries}")
    options = {"threads": max(1, round(float(cpus_per_run))), **options}  # torch's threads: the run's CPUs
    try:
        runs = plan_runs(read_prompts(prompts_file), out, options, seeds)
        totals = {run.folder: total_steps(run.options) for run in runs}  # validates the options, once per run
    except (ValueError, FileNotFoundError) as e:
        raise BatchError(" ".join(str(e).split())) from e
    ray = _require_ray()

    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        (out / STOP_FILE).unlink(missing_ok=True)  # a stop request of an earlier start
        started = time.time()
        records = {}
        for run in runs:
            record = read_record(run)
            if is_finished(run, record):
                records[run.folder] = {**record, "ran": False}
        todo = [run for run in runs if run.folder not in records]
        for run in todo:  # an earlier start's attempt that was cancelled: this start counts attempts anew
            (run.out / RUNNING).unlink(missing_ok=True)
        for run in todo:
            records[run.folder] = {"prompt": run.prompt, "seed": run.seed, "folder": run.folder, "status": "queued"}
        summary = _write_summary(out, prompts_file, runs, records, started)
        if not todo:
            echo(f"nothing to do: all {len(runs)} runs in {out} finished earlier (summary: {out / SUMMARY})")
            return summary
        if len(records) > len(todo):
            echo(f"{len(runs) - len(todo)} of {len(runs)} runs finished earlier; running {len(todo)}")

        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            gpus = _gpus(ray, gpus_per_run)
            _check_resources(ray, float(cpus_per_run), gpus)
            task = _task(ray, str(out), metrics).options(num_cpus=float(cpus_per_run), num_gpus=gpus,
                                                         max_retries=int(retries), retry_exceptions=False)
            _drive(ray, task, out, todo, totals, records, int(workers) if workers else None, int(retries),
                   lambda: _write_summary(out, prompts_file, runs, records, started), progress, echo)
        finally:
            ray.shutdown()
            (out / STOP_FILE).unlink(missing_ok=True)
            summary = _write_summary(out, prompts_file, runs, records, started)
        return summary


def _gpus(ray, gpus_per_run) -> float:
    if gpus_per_run == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return float(gpus_per_run)


def _check_resources(ray, cpus: float, gpus: float) -> None:
    """A run asking for more than any node has would wait forever: say so instead."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        most = max(((n.get("CPU", 0), n.get("GPU", 0)) for n in nodes), default=(0, 0))
        raise BatchError(f"no Ray node has {cpus:g} CPUs and {gpus:g} GPUs for one run (the largest: {most[0]:g} "
                         f"CPUs, {most[1]:g} GPUs): lower --cpus-per-run / --gpus-per-run (0 runs on the CPU)")


def _drive(ray, task, out: Path, todo: list, totals: dict, records: dict, workers: Optional[int], retries: int,
           write_summary: Callable[[], dict], progress: bool, echo) -> None:
    """Submit, watch, record; Ctrl-C → STOP file; a second Ctrl-C → cancel."""
    queue, pending = list(todo), {}
    seen_attempts = {}
    initial = {run.folder: steps_done(run.out, int(run.options.get("stages", 1)))[1] for run in todo}
    bar = _bar(sum(totals[run.folder] for run in todo), sum(initial.values()), progress)
    say = (lambda message: bar.write(message, file=sys.stderr)) if bar is not None else echo
    stop = {"requested": False}

    def request_stop():
        stop["requested"] = True
        (out / STOP_FILE).touch()
        say("stopping: every run stops after its current step with its checkpoint written; nothing new starts "
            "(Ctrl-C again to cancel at once; start the batch again to go on)")

    snapshot = {}
    try:
        with CtrlC(request_stop, signals=(signal.SIGINT, signal.SIGTERM)):
            while pending or (queue and not stop["requested"]):
                while queue and not stop["requested"] and (workers is None or len(pending) < workers):
                    run = queue.pop(0)
                    records[run.folder]["status"] = "submitted"
                    pending[task.remote(asdict(run))] = run
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL)
                snapshot = {run.folder: state for run in pending.values()
                            if (state := read_running(run.out)) is not None}
                for folder, state in snapshot.items():
                    if state["attempt"] > seen_attempts.get(folder, 1) and "resumed_from" in state:
                        seen_attempts[folder] = state["attempt"]
                        say(f"{folder}: its worker was lost; attempt {state['attempt']} resumes from step "
                            f"{state['resumed_from']}")
                for ref in ready:
                    run = pending.pop(ref)
                    record = _result(ray, ref, run, retries)
                    record.update(ran=True, attempts=record.get("attempt", seen_attempts.get(run.folder, 1)))
                    records[run.folder] = record
                    say(_event(record, out))
                    write_summary()
                if bar is not None:
                    _update_bar(bar, todo, totals, initial, snapshot, records, pending)
    except KeyboardInterrupt:
        say("cancelling the running workers; each run resumes from its last checkpoint when the batch starts again")
        for ref in pending:
            ray.cancel(ref, force=True)
        for run in pending.values():
            records[run.folder] = {**records[run.folder], "status": "interrupted"}
        raise
    finally:
        if bar is not None:
            bar.close()
        for run in queue:
            records[run.folder]["status"] = "queued"


def _result(ray, ref, run: PlannedRun, retries: int) -> dict:
    """The task's record, or a ``failed`` one when its worker died more often than ``retries`` allows."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        reason = type(e).__name__
        state = read_running(run.out) or {}
        record = {"prompt": run.prompt, "seed": run.seed, "folder": run.folder, "status": "failed",
                  "options": run.options, "attempt": state.get("attempt", retries + 1),
                  "error": f"its worker was lost {retries + 1} times ({reason}); start the batch again to resume it "
                           f"from its checkpoint"}
        (run.out / RUNNING).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            atomic_write_text(run.out / RECORD, json.dumps(record, indent=1, default=str))
        return record


def _event(record: dict, out: Path) -> str:
    head = f"{record['status']:>7}  {record['folder']}"
    if record["status"] == "done":
        mesh = record.get("paths", {}).get("mesh")
        where = f" → {os.path.relpath(mesh, out)}" if mesh else ""
        return f"{head}  ({record.get('seconds', 0):.1f} s){where}"
    if record["status"] == "failed":
        return f"{head}: {record.get('error', '')}"
    return head


def _update_bar(bar, todo, totals, initial, snapshot, records, pending) -> None:
    done = 0
    for run in todo:
        status = records[run.folder]["status"]
        if status == "done":
            done += totals[run.folder]
        else:
            done += snapshot.get(run.folder, {}).get("done", initial[run.folder])
    counts = _counts(records)
    running = sum(1 for run in pending.values() if run.folder in snapshot)
    bar.set_postfix_str(f"done {counts.get('done', 0)}/{len(records)}, running {running}, "
                        f"failed {counts.get('failed', 0)}", refresh=False)
    bar.update(max(done, bar.n) - bar.n)


def _counts(records: dict) -> dict:
    counts = {}
    for record in records.values():
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    return counts


SUMMARY_KEYS = ("prompt", "seed", "folder", "status", "ran", "attempts", "resumed_from", "steps", "seconds", "paths",
                "metrics", "metrics_seconds", "error", "warnings", "host", "ray_node")


def _write_summary(out: Path, prompts_file, runs: list, records: dict, started: float) -> dict:
    summary = {"prompts": str(prompts_file), "out": str(out), "started": time.strftime(
        "%Y-%m-%dT%H:%M:%S", time.localtime(started)), "seconds": round(time.time() - started, 3),
               "counts": _counts(records),
               "runs": [{k: records[run.folder][k] for k in SUMMARY_KEYS if k in records[run.folder]}
                        for run in runs if run.folder in records]}
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=1, default=str))
    return summary


def exit_code(summary: dict) -> int:
    """0: every run done; 1: some failed; 130: some left (stopped, interrupted, queued)."""
    counts = summary["counts"]
    if counts.get("failed"):
        return 1
    return 0 if counts.get("done", 0) == len(summary["runs"]) else 130


def summary_table(summary: dict) -> str:
    rows = [f"{'status':<11} {'seconds':>8}  {'steps':<24} run"]
    for run in summary["runs"]:
        steps = ",".join(f"{v}" for v in (run.get("steps") or {}).values()) or "-"
        seconds = f"{run['seconds']:.1f}" if "seconds" in run else "-"
        status = run["status"] + ("" if run.get("ran", True) else "*")
        rows.append(f"{status:<11} {seconds:>8}  {steps:<24} {run['folder']}")
    if any(not run.get("ran", True) for run in summary["runs"]):
        rows.append("* finished earlier, not run again")
    return "\n".join(rows)
