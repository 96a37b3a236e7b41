"""One run of a batch, as a Ray worker executes it (and as anything else may: nothing here imports Ray).

:func:`run_one` is ``generate`` in the run's folder, resumed from its checkpoint when the folder has one: a worker
that died (killed, out of memory, node lost) is retried by Ray, and the retry goes on from the last checkpoint
(``checkpoint_every`` steps) instead of starting over.  Checkpoints are written atomically, so a worker killed
while writing one leaves the previous checkpoint whole (and a stray temporary file, removed here).

While it runs, the folder holds :data:`~l2vsd_core.batch.plan.RUNNING` (host, pid, Ray node, attempt, steps done:
the batch's progress travels through the shared folder, so no process is needed for it that a lost node could take
down) and every attempt appends to :data:`~l2vsd_core.batch.plan.LOG`; the run stops after its current step, checkpoint written, when
``OUT/STOP`` appears (the driver's Ctrl-C).  Its end is the :data:`~l2vsd_core.batch.plan.RECORD`.
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from ..files import atomic_write_text
from .plan import LOG, RECORD, RUNNING, STOP_FILE, SUMMARY, PlannedRun, stage_steps

__all__ = ["run_one", "read_running", "checkpoint_steps", "steps_done", "toy_metrics"]

STAGES = ("nerf", "geometry", "texture")
REPORT_EVERY = 1.0  # seconds between progress writes (the driver reads them from the run's folder)


def checkpoint_steps(out: Path) -> dict:
    """``{stage: step}`` of the stage checkpoints in ``out`` (what a resumed run starts from)."""
    from ..runner import stage_files

    steps = {}
    for stage in STAGES:
        checkpoint, _ = stage_files(out, stage)
        try:
            steps[stage] = int(json.loads(Path(f"{checkpoint}.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return steps


def steps_done(out: Path, stages: int) -> tuple[dict, int]:
    """``({stage: step}, all of them)`` of the checkpoints a run in ``out`` with ``stages`` stages resumes from:
    none without a stage-1 checkpoint (``generate`` then starts anew)."""
    found = checkpoint_steps(out)
    if "nerf" not in found:
        return {}, 0
    return found, sum(found.get(stage, 0) for stage in STAGES[:stages])


def toy_metrics(out: Path, prompt: str, stages: int, log: Callable[[str], None]) -> Optional[dict]:
    """The toy world's scores of a finished run on the bundled prior (``metrics.json``): the stage-1 field's, its
    GLB's ``mesh_iou`` and, after stage 2 or 3, the final GLB's ``*_s<stages>``; None for a prompt outside the
    world (the scores need to know its shape and colour)."""
    from ..prior import load_prior
    from ..prior.load import BUNDLED_PRIORS
    from ..toys.world.demo import score_run
    from ..toys.world.metrics import parse_prompt, score_glb

    try:
        parse_prompt(prompt)
    except ValueError as e:
        log(f"no toy metrics: {e}")
        return None
    prior = load_prior(BUNDLED_PRIORS["toy"], device="cpu")
    scores = score_run(out, prior)
    if stages > 1:
        glb = score_glb(out / "model.glb", prompt, prior).as_dict()
        scores.update({f"{name}_s{stages}": value for name, value in glb.items()})
        atomic_write_text(out / "metrics.json", json.dumps(scores, indent=1))
    return scores


class _Log:
    """Appends timestamped lines to the run's log file."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, message: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def read_running(out: Path) -> Optional[dict]:
    """The :data:`~l2vsd_core.batch.plan.RUNNING` state of the run in ``out``, or None."""
    try:
        state = json.loads((Path(out) / RUNNING).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def run_one(run: PlannedRun, batch_dir, metrics: bool = True, where: Optional[dict] = None) -> dict:
    """Run ``run`` to its end and return its record (also written to its folder).  While it runs, its
    :data:`~l2vsd_core.batch.plan.RUNNING` file says where (host, pid, ``where``: how the scheduler names this
    worker's place, Ray's node id), which attempt (one more than a dead attempt's file says), the step it resumed
    from and, at most every :data:`REPORT_EVERY` s, all stages' steps done of their total: the driver's progress.
    User errors and crashes of the run itself end in a ``failed`` record; only the worker's death (which Ray retries)
    and ``KeyboardInterrupt`` (Ray's cancel) escape."""
    from ..generate import GenerateError, generate, run_config
    from ..prior.load import bundled_prior_name

    batch_dir, out = Path(batch_dir), run.out
    if not (batch_dir / SUMMARY).is_file():  # the driver writes it before submitting anything
        raise RuntimeError(f"{batch_dir} is not visible on {socket.gethostname()}: a batch's --out must be a folder "
                           f"every node mounts (a shared file system), or a retried run could not resume")
    dead = read_running(out)  # left by an attempt whose worker died
    state = {"host": socket.gethostname(), "pid": os.getpid(), **(where or {}),
             "attempt": int(dead.get("attempt", 1)) + 1 if dead else 1, "started": time.time()}
    record = {"prompt": run.prompt, "seed": run.seed, "folder": run.folder, "status": "failed",
              "attempt": state["attempt"], "host": state["host"], **(where or {}), "options": run.options}
    stop_file = batch_dir / STOP_FILE
    if stop_file.exists():  # queued when the batch was stopped: leave the folder as it is
        return {**record, "status": "stopped", "seconds": 0.0}
    out.mkdir(parents=True, exist_ok=True)
    for stray in out.glob(".*.tmp"):  # an earlier attempt killed inside an atomic write
        stray.unlink(missing_ok=True)
    log = _Log(out / LOG)
    write_state = lambda: atomic_write_text(out / RUNNING, json.dumps(state))  # noqa: E731
    write_state()
    try:
        config = run_config(run.options)
        totals = stage_steps(config)
        resumed, resumed_from = steps_done(out, config.stages)
        resume = bool(resumed)
        record["resumed_from"] = resumed_from
        log(f"attempt {state['attempt']} on {state['host']} (pid {state['pid']}): "
            + (f"resuming from {resumed}" if resume else "starting"))
        state.update(resumed_from=resumed_from, done=resumed_from, total=sum(totals))
        write_state()
        last = [time.monotonic()]

        def progress(done, total, terms):
            now = time.monotonic()
            if now - last[0] >= REPORT_EVERY:
                last[0] = now
                state["done"] = sum(totals[:int(terms.get("stage", 1)) - 1]) + done
                write_state()

        result = generate({**run.options, "resume": resume}, progress=progress, log=log,
                          should_stop=stop_file.exists)
        record.update(status="stopped" if result["stopped"] else "done",
                      steps=result.get("stage_steps", {"stage1": result["step"]}), paths=result["paths"],
                      warnings=result["warnings"])
        if not result["stopped"] and metrics and bundled_prior_name(config.prior) == "toy":
            scoring = time.time()
            record["metrics"] = toy_metrics(out, run.prompt, config.stages, log)
            record["metrics_seconds"] = round(time.time() - scoring, 3)
    except (GenerateError, ValueError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        record["error"] = " ".join(str(e).split())
        log(f"failed: {record['error']}")
    except Exception as e:  # a crash of this run (CUDA out of memory, a bug): the batch goes on with the others
        record["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"
        log(f"failed:\n{traceback.format_exc()}")
    record["seconds"] = round(time.time() - state["started"], 3)
    log(f"{record['status']} after {record['seconds']:.1f} s")
    atomic_write_text(out / RECORD, json.dumps(record, indent=1, default=str))
    (out / RUNNING).unlink(missing_ok=True)
    return record
