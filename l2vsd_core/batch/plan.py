"""A batch's plan: prompts (× seeds) → one ``generate`` run each in ``OUT/<folder>/``, and the record a run leaves.

A run's folder is its prompt's :func:`~l2vsd_core.prompt_list.slug` (``_seed<k>`` added when ``--seeds`` asks for
several), cut to :data:`MAX_SLUG` characters; prompts whose slugs collide get a short hash of their text, so that
every prompt keeps one folder whatever the other lines of the file.  The run's record, ``batch_run.json``
(:data:`RECORD`), is written when it ends (done, failed or stopped); a later start skips the run when the record
says done *with the same options*, and otherwise runs it again, resuming from its checkpoint.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..prompt_list import slug

__all__ = ["PlannedRun", "plan_runs", "read_record", "is_finished", "stage_steps", "total_steps", "RECORD", "SUMMARY", "STOP_FILE",
           "RUNNING", "LOG", "MAX_SLUG"]

RECORD = "batch_run.json"    # in a run's folder: how it ended (status, steps, seconds, paths, metrics, options)
RUNNING = "running.json"     # in a run's folder while a worker runs it: host, pid, attempt
LOG = "log.txt"              # in a run's folder: what generate logged, every attempt
SUMMARY = "summary.json"     # in OUT: every run's state, rewritten as runs end
STOP_FILE = "STOP"           # in OUT: while it exists, runs stop after their current step (checkpoint written)
MAX_SLUG = 60
RESULT_NEUTRAL = ("threads",)  # options that do not change a run's result: a finished run stays finished


@dataclass(frozen=True)
class PlannedRun:
    prompt: str
    seed: int
    folder: str     # OUT/<folder>
    options: dict   # generate's options (prompt, seed and out included)

    @property
    def out(self) -> Path:
        return Path(self.options["out"])


def _normal(options: dict) -> dict:
    """Options as they read back from JSON (tuples → lists), so that a record's options compare equal."""
    return json.loads(json.dumps(options, default=str))


def plan_runs(prompts: Sequence[str], out, options: dict, seeds: Optional[Sequence[int]] = None) -> list[PlannedRun]:
    """One run per distinct prompt (a repeated line runs once) and per seed of ``seeds`` (None: the one of
    ``options``, default 0), each with ``options`` and its own ``prompt``, ``seed`` and ``out``."""
    distinct = list(dict.fromkeys(p.strip() for p in prompts if p.strip()))
    bases = {p: (slug(p)[:MAX_SLUG].strip("_") or "prompt") for p in distinct}
    taken = {}
    for p, base in bases.items():
        taken.setdefault(base, []).append(p)
    folders = {p: base if len(taken[base]) == 1 else f"{base}_{hashlib.sha1(p.encode()).hexdigest()[:8]}"
               for p, base in bases.items()}
    out = Path(out)
    runs = []
    for p in distinct:
        for seed in (seeds if seeds else [int(options.get("seed", 0))]):
            folder = folders[p] if not seeds else f"{folders[p]}_seed{int(seed)}"
            run_options = _normal({**options, "prompt": p, "seed": int(seed), "out": str(out / folder)})
            runs.append(PlannedRun(p, int(seed), folder, run_options))
    return runs


def read_record(run: PlannedRun) -> Optional[dict]:
    """The run's :data:`RECORD`, or None (none yet, or unreadable: a record is written atomically, so only a
    hand-edited one can be broken, and the run is then simply run again, from its checkpoint)."""
    try:
        record = json.loads((run.out / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_finished(run: PlannedRun, record: Optional[dict] = None) -> bool:
    """Done earlier with these very options (a changed option, e.g. more ``steps``, runs it again from its
    checkpoint)."""
    record = read_record(run) if record is None else record
    if not record or record.get("status") != "done" or not isinstance(record.get("options"), dict):
        return False
    same = lambda options: {k: v for k, v in options.items() if k not in RESULT_NEUTRAL}  # noqa: E731
    return same(record["options"]) == same(run.options)


def stage_steps(config) -> list[int]:
    """The steps of each stage a run with :class:`~l2vsd_core.config.RunConfig` ``config`` goes through."""
    return [int(stage.steps) for stage in (config.nerf, config.geometry, config.texture)][:config.stages]


def total_steps(options: dict) -> int:
    """Every stage's steps of a run with ``options`` (what the batch's progress counts)."""
    from ..generate import run_config

    return sum(stage_steps(run_config(options)))
