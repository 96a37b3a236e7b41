"""``python -m l2vsd_core.bench batch``: the same toy batch (prompts × steps on the bundled prior, no metrics) on a
local Ray with each layout of :func:`layouts` — one worker with one thread, one worker with every thread, as many
workers as CPUs with one thread each — in fresh folders, one after the other in this process; the wall time of each
(Ray's start included, as a user waits for it) and the speed-ups over the one-worker layouts.

Also per layout: the runs' mean seconds (each run's own wall time, from its record), which shows what limits the
speed-up: runs that share the CPUs each run slower than one run alone.
"""
from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["run_batch_benchmark", "batch_table", "layouts", "WORLD_PROMPTS"]

WORLD_PROMPTS = ("a red cube", "a green cone", "a blue sphere", "a yellow torus", "a purple cylinder",
                 "an orange cube", "a red sphere", "a blue cone")  # toy-world prompts the benchmark draws from


def layouts(cpus: int) -> list[dict]:
    """(name, workers, cpus per run) of each measured layout on a machine with ``cpus`` CPUs."""
    return [{"name": "1 worker × 1 thread", "workers": 1, "cpus_per_run": 1},
            {"name": f"1 worker × {cpus} threads", "workers": 1, "cpus_per_run": cpus},
            {"name": f"{cpus} workers × 1 thread", "workers": cpus, "cpus_per_run": 1}]


def run_batch_benchmark(out, prompts: Sequence[str] = WORLD_PROMPTS[:4], steps: int = 100,
                        cpus: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    from ..batch.driver import run_batch

    log = log or (lambda message: None)
    cpus = int(cpus or os.cpu_count() or 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    options = {"prior": "toy", "steps": int(steps)}
    results = []
    for layout in layouts(cpus):
        folder = out / layout["name"].replace(" ", "").replace("×", "x")
        shutil.rmtree(folder, ignore_errors=True)
        log(f"{layout['name']}: {len(prompts)} prompts × {steps} steps")
        start = time.perf_counter()
        summary = run_batch(prompts_file, folder, options, workers=layout["workers"],
                            cpus_per_run=layout["cpus_per_run"], gpus_per_run=0, metrics=False, progress=False,
                            echo=log)
        wall = time.perf_counter() - start
        if summary["counts"].get("done", 0) != len(prompts):
            raise RuntimeError(f"{layout['name']}: not every run finished: {summary['counts']}")
        run_seconds = [run["seconds"] for run in summary["runs"]]
        results.append({**layout, "wall_s": round(wall, 2), "run_s_mean": round(statistics.fmean(run_seconds), 2),
                        "run_s": run_seconds})
        log(f"  {wall:.1f} s")
    base_one, base_all = results[0]["wall_s"], results[1]["wall_s"]
    for r in results:
        r["speedup_vs_1x1"] = round(base_one / r["wall_s"], 3)
        r["speedup_vs_1xall"] = round(base_all / r["wall_s"], 3)
    return {"cpus": cpus, "prompts": list(prompts), "steps": int(steps), "layouts": results}


def batch_table(data: dict) -> str:
    lines = [f"{len(data['prompts'])} toy prompts × {data['steps']} steps, {data['cpus']} CPUs, local Ray", "",
             "| layout | wall s | × 1 worker × 1 thread | × 1 worker × all threads | mean s per run |",
             "|---|---|---|---|---|"]
    for r in data["layouts"]:
        lines.append(f"| {r['name']} | {r['wall_s']:.1f} | {r['speedup_vs_1x1']:.2f} | {r['speedup_vs_1xall']:.2f} | "
                     f"{r['run_s_mean']:.1f} |")
    return "\n".join(lines)
