"""Quality of each method on the toy world: stage 1 with the bundled prior for every prompt × method × seed, scored
by prompt fidelity, Fréchet distance and silhouette IoU (``l2vsd_core.toys.world.metrics``).

Resumable: each finished run leaves ``metrics.json`` in ``OUT/<prompt>/<method>/seed<k>`` and is not run again; the
rows are collected from those files, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..files import atomic_write_text

DEFAULT_METHODS = ("sds", "vsd", "lvsd", "l2vsd", "l2vsd_last", "esd", "l2esd")
METRICS = ("fidelity", "frechet", "iou", "seconds")


def read_prompts(path) -> list[str]:
    """One prompt per line; blank lines and ``#`` comments skipped."""
    lines = Path(path).read_text().splitlines()
    prompts = [line.split("#", 1)[0].strip() for line in lines]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line)")
    return prompts


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def run_quality_benchmark(prompts: Sequence[str], methods: Sequence[str] = DEFAULT_METHODS, seeds: int = 3,
                          steps: Optional[int] = None, out="out/bench_quality", reference_samples: int = 64,
                          log: Callable[[str], None] = print) -> dict:
    from ..prior import load_prior
    from ..toys.world import demo
    from ..toys.world.metrics import parse_prompt, prior_samples

    for prompt in prompts:
        parse_prompt(prompt)  # every prompt must be a world prompt before anything runs
    for method in methods:
        if method not in demo.METHOD_PRESETS:
            raise ValueError(f"method must be one of {', '.join(demo.METHOD_PRESETS)}; got {method!r}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1; got {seeds}")
    prior = load_prior(demo.BUNDLED_PRIOR, device="cpu")
    rows = []
    total, done = len(prompts) * len(methods) * seeds, 0
    for prompt in prompts:
        reference = prior_samples(prior, prompt, count=reference_samples)
        for method in methods:
            for seed in range(seeds):
                run_dir = Path(out) / _slug(prompt) / method / f"seed{seed}"
                metrics_file = run_dir / "metrics.json"
                done += 1
                if metrics_file.is_file() and (run_dir / "seconds.json").is_file():
                    row = {**json.loads(metrics_file.read_text()), **json.loads((run_dir / "seconds.json").read_text())}
                else:
                    result = demo.run(prompt, method, run_dir, seed=seed, steps=steps, prior=prior,
                                      reference=reference)
                    if result["stopped"]:
                        raise KeyboardInterrupt
                    atomic_write_text(run_dir / "seconds.json", json.dumps({"seconds": result["seconds"]}))
                    row = {k: result[k] for k in METRICS}
                rows.append({"prompt": prompt, "method": method, "seed": seed, **{k: row[k] for k in METRICS}})
                log(f"[{done}/{total}] {prompt} / {method} / seed {seed}: fidelity {row['fidelity']:.3f}, "
                    f"frechet {row['frechet']:.1f}, iou {row['iou']:.3f}, {row['seconds']:.0f} s")
    return {"config": {"prompts": list(prompts), "methods": list(methods), "seeds": seeds,
                       "steps": steps or demo.TOY_OPTIONS["steps"], "prior": str(demo.BUNDLED_PRIOR),
                       "reference_samples": reference_samples},
            "rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    """Per method: mean and standard deviation (over prompts and seeds) of every metric."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        values = {k: [r[k] for r in rows if r["method"] == method] for k in METRICS}
        summary[method] = {"means": {k: statistics.fmean(v) for k, v in values.items()},
                           "stds": {k: statistics.pstdev(v) for k, v in values.items()},
                           "runs": len(values["fidelity"])}
    return summary


def quality_table(data: dict) -> str:
    lines = ["| method | fidelity ↑ | Fréchet ↓ | silhouette IoU ↑ | s/run | runs |", "|---|---|---|---|---|---|"]
    for method, s in data["summary"].items():
        m, d = s["means"], s["stds"]
        lines.append(f"| {method} | {m['fidelity']:.3f} ± {d['fidelity']:.3f} | {m['frechet']:.1f} ± "
                     f"{d['frechet']:.1f} | {m['iou']:.3f} ± {d['iou']:.3f} | {m['seconds']:.0f} | {s['runs']} |")
    return "\n".join(lines)


def picture_grid(out, prompts: Sequence[str], methods: Sequence[str], path, seed: int = 0, frames: int = 6) -> Path:
    """One row per (prompt, method): ``frames`` turntable frames of that run, labelled; a PNG written atomically."""
    from PIL import Image, ImageDraw

    from ..files import atomic_write

    rows = []
    for prompt in prompts:
        for method in methods:
            gif = Path(out) / _slug(prompt) / method / f"seed{seed}" / "turntable.gif"
            if not gif.is_file():
                continue
            with Image.open(gif) as image:
                count = getattr(image, "n_frames", 1)
                picked = []
                for k in range(frames):
                    image.seek(k * count // frames)
                    picked.append(image.convert("RGB").copy())
            rows.append((f"{prompt} / {method}", picked))
    if not rows:
        raise ValueError(f"no turntables under {out} for these prompts and methods")
    w, h = rows[0][1][0].size
    label = 150
    grid = Image.new("RGB", (label + w * frames, h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (text, picked) in enumerate(rows):
        draw.text((4, r * h + h // 2 - 6), text, fill="black")
        for k, frame in enumerate(picked):
            grid.paste(frame, (label + k * w, r * h))
    atomic_write(Path(path), lambda tmp: grid.save(tmp, format="PNG"))
    return Path(path)
