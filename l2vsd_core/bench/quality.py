"""Quality of each method on the toy world: stage 1 with the bundled prior for every prompt × method × seed, scored
by prompt fidelity, Fréchet distance and silhouette IoU (``l2vsd_core.toys.world.metrics``).

With ``stages`` 2 or 3 each run then goes on in its folder through the geometry and the texture refinement
(:func:`l2vsd_core.toys.world.demo.refine_run`, ``generate --resume``: the finished stage 1 is loaded, not
re-optimized), and its row gets the scores of the GLB the user would get after each stage: ``fidelity_s<k>``,
``frechet_s<k>``, ``iou_s<k>`` for k = 1 .. stages and ``seconds_s<k>`` for k ≥ 2.  The unsuffixed ``fidelity``,
``frechet``, ``iou`` and ``seconds`` stay what they are with ``stages`` 1: the stage-1 NeRF, volume-rendered as it
was optimized, and the time of stage 1 with its export.

Resumable: each finished run leaves ``metrics.json`` (and ``seconds.json``) in ``OUT/<prompt>/<method>/seed<k>``
and is not run again, nor is a finished stage; the rows are collected from those files, so an interrupted benchmark
continues where it stopped.  Finished work is reused whatever the settings: use a new ``OUT`` to change them.
The prior's reference samples of each prompt (the Fréchet distance's other side, about a minute of CPU per prompt)
are kept too, in ``OUT/<prompt>/reference.safetensors``, and reused only while the prior's weights and the sampling
settings they were drawn with stay the same.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import re
import statistics
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..files import atomic_write_text
from ..prompt_list import slug as _slug
from ..toys.image2d import ci95

DEFAULT_METHODS = ("sds", "vsd", "lvsd", "l2vsd", "l2vsd_last", "esd", "l2esd")
SCORES = ("fidelity", "frechet", "iou")
DIGITS = {"fidelity": 3, "frechet": 2, "iou": 3}  # decimals the tables show of each score
METRICS = SCORES + ("seconds",)
STAGE_LABELS = {1: "1 GLB", 2: "2 GLB (geometry)", 3: "3 GLB (texture)"}


def metric_keys(stages: int = 1) -> tuple[str, ...]:
    """The metrics of a row: :data:`METRICS`, then with ``stages`` > 1 each stage's GLB scores (and time)."""
    keys = list(METRICS)
    if stages > 1:
        for stage in range(1, stages + 1):
            keys += [f"{name}_s{stage}" for name in SCORES] + ([f"seconds_s{stage}"] if stage > 1 else [])
    return tuple(keys)


def split_methods(text: str) -> tuple[str, ...]:
    """``"vsd,l2vsd[paper,eta=0.001]"`` → ``("vsd", "l2vsd[paper,eta=0.001]")``: commas inside a variant's brackets
    do not separate."""
    return tuple(m.strip() for m in re.split(r",(?![^\[]*\])", text) if m.strip())


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_quality_benchmark(prompts: Sequence[str], methods: Sequence[str] = DEFAULT_METHODS, seeds: int = 3,
                          steps: Optional[int] = None, out="out/bench_quality", reference_samples: int = 64,
                          log: Callable[[str], None] = print, stages: int = 1,
                          refine_options: Optional[dict] = None, lora_lr: Optional[float] = None) -> dict:
    """Every prompt × method × seed on the toy prior, ``stages`` 1..3 each; returns ``{"config", "rows",
    "summary"}``.  A method is a ``demo.METHOD_PRESETS`` name, optionally with a variant (``sds@cfg100``,
    ``l2vsd[paper,eta=0.001]``: :func:`~l2vsd_core.toys.world.demo.method_options`).  ``refine_options``: settings
    of stages 2 and 3 (default ``demo.TOY_REFINE``); ``lora_lr``: the LoRA's learning rate in every stage (default
    the toy recipe's)."""
    from ..prior import load_prior
    from ..toys.world import demo
    from ..toys.world.metrics import parse_prompt, prior_samples

    for prompt in prompts:
        parse_prompt(prompt)  # every prompt must be a world prompt before anything runs
    for method in methods:
        demo.method_options(method)  # every method known before anything runs
    if lora_lr is not None and not lora_lr > 0:
        raise ValueError(f"lora_lr must be > 0; got {lora_lr!r}")
    overrides = {} if lora_lr is None else {"lora_lr": float(lora_lr)}
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1; got {seeds}")
    if stages not in (1, 2, 3):
        raise ValueError(f"stages must be 1, 2 or 3; got {stages!r}")
    refine_options = dict(demo.TOY_REFINE if refine_options is None else refine_options)
    prior = load_prior(demo.BUNDLED_PRIOR, device="cpu")
    keys = metric_keys(stages)
    rows = []
    total, done = len(prompts) * len(methods) * seeds, 0
    for prompt in prompts:
        reference = _reference_samples(prior, prompt, reference_samples, Path(out) / _slug(prompt))
        for method in methods:
            for seed in range(seeds):
                run_dir = Path(out) / _slug(prompt) / _slug(method) / f"seed{seed}"
                metrics_file, seconds_file = run_dir / "metrics.json", run_dir / "seconds.json"
                done += 1
                if metrics_file.is_file() and seconds_file.is_file():
                    scores, seconds = _read_json(metrics_file), _read_json(seconds_file)
                else:
                    result = demo.run(prompt, method, run_dir, seed=seed, steps=steps, prior=prior,
                                      reference=reference, **overrides)
                    if result["stopped"]:
                        raise KeyboardInterrupt
                    seconds = {"seconds": result["seconds"]}  # a fresh stage 1: later stages' times are stale
                    atomic_write_text(seconds_file, json.dumps(seconds))
                    scores = result
                for stage in range(2, stages + 1):
                    wanted = [f"{name}_s{k}" for name in SCORES for k in (1, stage)]
                    if all(k in scores for k in wanted) and f"seconds_s{stage}" in seconds:
                        continue  # finished before
                    log(f"{prompt} / {method} / seed {seed}: stage {stage}")
                    result = demo.refine_run(run_dir, stage, prior, reference, **refine_options, **overrides)
                    if result["stopped"]:
                        raise KeyboardInterrupt
                    seconds[f"seconds_s{stage}"] = result[f"seconds_s{stage}"]
                    atomic_write_text(seconds_file, json.dumps(seconds))
                    scores = result
                row = {**scores, **seconds}
                rows.append({"prompt": prompt, "method": method, "seed": seed, **{k: row[k] for k in keys}})
                log(f"[{done}/{total}] {prompt} / {method} / seed {seed}: " + "; ".join(
                    (f"{label}: " if stages > 1 else "") + f"fidelity {row[f'fidelity{sfx}']:.3f}, frechet "
                    f"{row[f'frechet{sfx}']:.1f}, iou {row[f'iou{sfx}']:.3f}"
                    + (f", {row[f'seconds{sfx}']:.0f} s" if f"seconds{sfx}" in row else "")
                    for label, sfx in _stage_rows(stages)))
    config = {"prompts": list(prompts), "methods": list(methods), "seeds": seeds,
              "steps": steps or demo.TOY["steps"], "prior": str(demo.BUNDLED_PRIOR),
              "reference_samples": reference_samples, "stages": stages,
              "lora_lr": lora_lr if lora_lr is not None else demo.TOY["lora_lr"]}
    if stages > 1:
        config["refine_options"] = refine_options
    return {"config": config, "rows": rows, "summary": summarize(rows), "paired": paired_differences(rows)}


def _weights_digest(folder) -> str:
    """sha256 over the prior folder's weight files (names and bytes): what the reference samples depend on."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.safetensors")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _reference_samples(prior, prompt: str, count: int, folder: Path):
    """:func:`prior_samples` of ``prompt``, kept in ``folder/reference.safetensors`` and read back while the
    prior's weights and the sampling settings match the file's metadata (otherwise drawn again and replaced)."""
    from safetensors.torch import load_file, save_file

    from ..files import atomic_write
    from ..toys.world import demo
    from ..toys.world.metrics import prior_samples

    path = folder / "reference.safetensors"
    # the sampler's own defaults (steps, guidance, seed) are what it draws with: a change to them is a new reference
    sampling = {name: repr(p.default) for name, p in inspect.signature(prior_samples).parameters.items()
                if name in ("steps", "guidance_scale", "seed")}
    wanted = {"prompt": prompt, "count": str(count), **sampling,
              "prior_weights_sha256": _weights_digest(demo.BUNDLED_PRIOR)}
    if path.is_file():
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            if f.metadata() == wanted:
                return load_file(str(path))["images"]
    images = prior_samples(prior, prompt, count=count)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({"images": images.contiguous()}, tmp, metadata=wanted))
    return images


def _stage_rows(stages: int) -> list[tuple[str, str]]:
    """(label, key suffix) of what a run is scored as: the stage-1 NeRF, then with stages > 1 each stage's GLB."""
    if stages == 1:
        return [("stage 1", "")]
    return [("1 NeRF", "")] + [(STAGE_LABELS[k], f"_s{k}") for k in range(1, stages + 1)]


def summarize(rows: list[dict]) -> dict:
    """Per method: mean and standard deviation (over prompts and seeds) of every metric its rows share."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        names = [k for k in mine[0] if k not in ("prompt", "method", "seed") and all(k in r for r in mine)]
        values = {k: [r[k] for r in mine] for k in names}
        summary[method] = {"means": {k: statistics.fmean(v) for k, v in values.items()},
                           "stds": {k: statistics.pstdev(v) for k, v in values.items()},
                           "runs": len(mine)}
    return summary


def paired_differences(rows: list[dict], baseline: str = "vsd") -> dict:
    """Per method other than ``baseline``: its stage-1 scores minus the baseline's on the same (prompt, seed), as
    ``{metric: {"mean", "std", "ci95", "better", "worse", "pairs"}}`` (``ci95``: half-width of the 95 % interval of the
    mean difference, Student t) ("better": higher fidelity or IoU, lower Fréchet; a
    difference that rounds to zero at the table's precision, :data:`DIGITS`, is a tie and counts as neither).
    Runs of one prompt and seed start from the same initial scene, so these differences are free of the spread
    between prompts that dominates the summary's standard deviations.  Empty when ``baseline`` has no rows."""
    base = {(r["prompt"], r["seed"]): r for r in rows if r["method"] == baseline}
    paired = {}
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != baseline):
        pairs = [(r, base[(r["prompt"], r["seed"])]) for r in rows
                 if r["method"] == method and (r["prompt"], r["seed"]) in base]
        if not pairs:
            continue
        paired[method] = {}
        for name in SCORES:
            sign = -1.0 if name == "frechet" else 1.0  # which way is better
            deltas = [r[name] - b[name] for r, b in pairs]
            shown = [sign * round(d, DIGITS[name]) for d in deltas]
            paired[method][name] = {"mean": statistics.fmean(deltas), "std": statistics.pstdev(deltas),
                                    "ci95": ci95(deltas),
                                    "better": sum(d > 0 for d in shown), "worse": sum(d < 0 for d in shown),
                                    "pairs": len(deltas)}
    return paired


def paired_table(data: dict, baseline: str = "vsd") -> str:
    """A markdown table of :func:`paired_differences`: mean ± std of each method's difference from ``baseline`` on
    the same prompt and seed, and in how many pairs it was better / worse."""
    lines = [f"| method − {baseline} | Δ fidelity | Δ Fréchet | Δ IoU | pairs |", "|---|---|---|---|---|"]
    for method, scores in data.get("paired", {}).items():
        cells = [f"{scores[n]['mean']:+.{DIGITS[n]}f} ± {scores[n]['std']:.{DIGITS[n]}f} "
                 f"({scores[n]['better']} better, {scores[n]['worse']} worse)" for n in SCORES]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {scores['iou']['pairs']} |")
    return "\n".join(lines)


def quality_table(data: dict) -> str:
    """A markdown table of the summary: one line per method, or with several stages one per (method, stage)."""
    stages = data.get("config", {}).get("stages", 1)
    if stages == 1:
        lines = ["| method | fidelity ↑ | Fréchet ↓ | silhouette IoU ↑ | s/run | runs |",
                 "|---|---|---|---|---|---|"]
    else:
        lines = ["| method | stage | fidelity ↑ | Fréchet ↓ | silhouette IoU ↑ | s/run | runs |",
                 "|---|---|---|---|---|---|---|"]
    for method, s in data["summary"].items():
        m, d = s["means"], s["stds"]
        for label, sfx in _stage_rows(stages):
            # the stage-1 GLB is stage 1's export: its time is in the NeRF's line
            took = f"{m[f'seconds{sfx}']:.0f}" if f"seconds{sfx}" in m else "–"
            cells = [method] + ([label] if stages > 1 else []) + [
                f"{m[f'fidelity{sfx}']:.3f} ± {d[f'fidelity{sfx}']:.3f}",
                f"{m[f'frechet{sfx}']:.1f} ± {d[f'frechet{sfx}']:.1f}",
                f"{m[f'iou{sfx}']:.3f} ± {d[f'iou{sfx}']:.3f}", took, str(s["runs"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def picture_grid(out, prompts: Sequence[str], methods: Sequence[str], path, seed: int = 0, frames: int = 6) -> Path:
    """One row per (prompt, method): ``frames`` turntable frames of that run, labelled; a PNG written atomically."""
    from PIL import Image, ImageDraw

    from ..files import atomic_write

    rows = []
    for prompt in prompts:
        for method in methods:
            gif = Path(out) / _slug(prompt) / _slug(method) / f"seed{seed}" / "turntable.gif"
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
