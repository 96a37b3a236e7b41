"""ProlificDreamer's 2D experiment on the bundled toy prior: the parameters are ``n`` images (particles), rendered as
themselves, distilled from the prior by one estimator; in the VSD family the particles share one LoRA.  No NeRF in
the way, so a difference between estimators shows here first, and fast.

``python -m l2vsd_core.toys.image2d --prompts "a red cube" "a blue sphere" --methods sds@cfg100 vsd
"l2vsd[optimizer,eta=1]" --seeds 3 --steps 400 --particles 4 --out out/image2d --json docs/image2d/study.json
--grid docs/image2d/grid.png``

A method is the engine's (``DistillConfig.method``) with its variant after it: ``sds@cfg100`` (CFG 100 instead of
7.5), ``lvsd[gamma=5]`` (γ LoRA steps), ``l2vsd[paper,eta=0.1]`` (lookahead kind and η), ``l2vsd_last[optimizer]``,
``hlvsd[optimizer,eta=1]``.  ``--plot F`` draws the lookahead's ratio over the run, the ratio against η per lookahead
kind, and the paired differences from vsd against the ratio.

A particle is ``tanh(θ)`` in the prior's input space ([-1, 1] pixels; image = (tanh θ + 1) / 2), θ ~ N(0, 1) at the
start, optimized by Adam; every particle is a front view (elevation 15°, azimuth 0°: the prompt gets "front view",
the LoRA that camera).  Timesteps: ProlificDreamer's range, annealed as in the toy recipe (t ≤ 0.98 for the first
fifth of the steps, then ≤ 0.5).

Scores of a run (its ``n`` final particles): the judge's **prompt fidelity** (mean joint probability of shape and
colour), the **Fréchet distance** of the judge's features to 64 prior samples of the same prompt and view, the
particles' **diversity** (mean pairwise distance of their judge features), their **roughness** (mean absolute
difference between neighbouring pixels: pixel noise, which the judge's features can read as diversity and a lower
Fréchet distance; the prior's own samples give the scale) and, over the run, the ratio ‖Δε_first‖ / ‖ε_pre − ε_est‖
(how large the lookahead correction is next to the VSD term).  A method's row averages
its runs over prompts × seeds with a 95 % interval (Student t); ``paired`` compares each method with ``vsd`` on the same
prompt and seed (the same initial particles).

Each run is kept in ``--out`` (``<prompt>/<method>/seed<k>.json`` and ``.png``) and skipped when the study is started
again, so an interrupted study resumes where it stopped.
"""
from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..distill import DistillConfig
from ..files import atomic_write, atomic_write_text
from ..prompt_list import slug as _slug

__all__ = ["Variant", "parse_method", "StudyConfig", "run_particles", "run_study", "ci95", "roughness", "plot", "main"]

VIEW = (15.0, 0.0)          # (elevation°, azimuth°) of every particle: a front view at the orbit's elevation
_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
          11: 2.201, 12: 2.179, 14: 2.145, 17: 2.110, 19: 2.093, 23: 2.069, 29: 2.045}


@dataclass(frozen=True)
class Variant:
    """One row of the study: an engine method and its settings."""

    name: str
    method: str
    guidance_scale: float = 7.5
    lookahead: str = DistillConfig.lookahead  # the engine's defaults: "l2vsd" is what a user gets
    eta: float = DistillConfig.eta
    lora_steps: int = 1


def parse_method(text: str) -> Variant:
    """``"sds@cfg100"``, ``"vsd"``, ``"lvsd[gamma=5]"``, ``"l2vsd[optimizer,eta=1]"`` → a :class:`Variant`
    (``ValueError`` naming what is wrong)."""
    from ..distill import LOOKAHEADS, METHODS

    match = re.fullmatch(r"([a-z0-9_]+)(?:@cfg([0-9.]+))?(?:\[([^\]]*)\])?", text.strip())
    if not match or match.group(1) not in METHODS:
        raise ValueError(f"method {text!r}: expected METHOD[@cfgX][[lookahead,eta=..,gamma=..]] with METHOD one of "
                         f"{', '.join(METHODS)}")
    kw = {"name": text.strip(), "method": match.group(1)}
    if match.group(2):
        kw["guidance_scale"] = float(match.group(2))
    for part in filter(None, (p.strip() for p in (match.group(3) or "").split(","))):
        key, _, value = part.partition("=")
        try:
            if part in LOOKAHEADS:
                kw["lookahead"] = part
            elif key == "eta" and value:
                kw["eta"] = float(value)
            elif key == "gamma" and value:
                kw["lora_steps"] = int(value)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"method {text!r}: {part!r} is not one of {', '.join(LOOKAHEADS)}, eta=NUMBER, "
                             f"gamma=INTEGER") from None
    return Variant(**kw)


@dataclass
class StudyConfig:
    steps: int = 400
    particles: int = 4
    lr: float = 0.03              # Adam on the particles' θ
    lora_lr: float = 1e-3         # the toy recipe's
    lora_rank: int = 4
    log_every: int = 20
    reference_samples: int = 64   # prior samples of each prompt (and the view) for the Fréchet distance


def _distill_config(variant: Variant, steps: int):
    from ..config import DistillConfig
    from ..recipes import toy_anneal
    from ..schedules import TimestepSampler

    return DistillConfig(method=variant.method, guidance_scale=variant.guidance_scale, eta=variant.eta,
                         lookahead=variant.lookahead, lora_steps=variant.lora_steps,
                         timesteps=TimestepSampler(1000, 0.02, toy_anneal(steps), max_steps=steps))


def run_particles(prior, prompt: str, variant: Variant, seed: int, config: StudyConfig,
                  reference: torch.Tensor) -> dict:
    """One run: the final particles [n, 3, H, W] in [0, 1] and the scores (see the module docstring)."""
    from .. import build
    from ..config import LoRAConfig
    from ..distill import score_distillation
    from ..scene.cameras import orbit_cameras
    from .world.judge import judge_features
    from .world.metrics import ORBIT, frechet_distance, parse_prompt, prompt_fidelity

    shape, color = parse_prompt(prompt)
    n, side = config.particles, int(prior.image_size)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, 3, side, side, generator=g).requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=config.lr)
    camera = orbit_cameras(1, VIEW[0], ORBIT["distance"], ORBIT["fovy_deg"], side, side, start_azimuth_deg=VIEW[1])
    prompts = build.prompt_processor(prior, prompt, front_threshold=45.0, back_threshold=45.0)  # the toy's
    cond = prompts.conditioning(torch.full((n,), VIEW[0]), torch.full((n,), VIEW[1]),
                                camera.c2w_flat().expand(n, -1))
    distill = _distill_config(variant, config.steps)
    lora = LoRAConfig(rank=config.lora_rank, lr=config.lora_lr)
    ratios, start = [], time.perf_counter()
    with build.attached_lora(lora, prior, seed, build.ADAPTERS["nerf"], distill.needs_trainable_score) as score:
        for step in range(config.steps):
            optimizer.zero_grad(set_to_none=True)
            x0 = prior.encode_images((torch.tanh(theta) + 1) / 2, generator=g)
            result = score_distillation(x0, prior, score, cond, distill, step=step, generator=g)
            result.loss.backward()
            optimizer.step()
            if step % config.log_every == 0 or step == config.steps - 1:
                ratios.append([step, result.terms.get("delta_first_rms", 0.0)
                               / max(result.terms["eps_pre_minus_est_rms"], 1e-12)])
    seconds = time.perf_counter() - start
    with torch.no_grad():
        images = ((torch.tanh(theta) + 1) / 2).detach()
        features = judge_features(images)
        pairs = [float((features[i] - features[j]).norm()) for i in range(n) for j in range(i + 1, n)]
        scores = {"fidelity": prompt_fidelity(images, shape, color),
                  "frechet": frechet_distance(features, judge_features(reference)),
                  "diversity": statistics.fmean(pairs) if pairs else 0.0, "roughness": roughness(images)}
    return {"prompt": prompt, "method": variant.name, "seed": seed, **scores, "seconds": seconds,
            "ratio": ratios, "images": images}


def roughness(images: torch.Tensor) -> float:
    """Mean absolute difference between horizontally and vertically neighbouring pixels of images [N, 3, H, W] in
    [0, 1]: flat shapes on white score low, pixel noise high."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs()
    return float((dx.sum() + dy.sum()) / (dx.numel() + dy.numel()))


def _png_roughness(path: Path, scale: int = 4) -> float:
    """:func:`roughness` of particles kept by :func:`_save_png` (a row of ``scale``-times enlarged images)."""
    from PIL import Image
    import numpy as np

    with Image.open(path) as image:
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).float().div(255)[::scale, ::scale]
    side = pixels.shape[0]
    return roughness(pixels.permute(2, 0, 1).unflatten(2, (-1, side)).permute(2, 0, 1, 3))


def ci95(values: Sequence[float]) -> float:
    """Half-width of the 95 % interval of the mean of ``values`` (Student t; NaN for fewer than 2)."""
    if len(values) < 2:
        return float("nan")
    dof = len(values) - 1
    t = _T_975.get(dof) or next((v for k, v in sorted(_T_975.items(), reverse=True) if k <= dof), 1.96)
    return t * statistics.stdev(values) / math.sqrt(len(values))


def summarize(rows: list, baseline: str = "vsd") -> dict:
    """``{"methods": {name: means and 95 % intervals}, "paired": {name: differences from the baseline}}``."""
    methods, paired = {}, {}
    names = list(dict.fromkeys(r["method"] for r in rows))
    for name in names:
        mine = [r for r in rows if r["method"] == name]
        entry = {"runs": len(mine), "seconds": statistics.fmean(r["seconds"] for r in mine)}
        for key in ("fidelity", "frechet", "diversity", "roughness"):
            values = [r[key] for r in mine]
            entry[f"{key}_mean"], entry[f"{key}_ci95"] = statistics.fmean(values), ci95(values)
        final = [r["ratio"][-1][1] for r in mine if r["ratio"]]
        entry["ratio_final_mean"] = statistics.fmean(final) if final else 0.0
        methods[name] = entry
    base = {(r["prompt"], r["seed"]): r for r in rows if r["method"] == baseline}
    for name in names:
        if name == baseline:
            continue
        pairs = [(r, base[(r["prompt"], r["seed"])]) for r in rows
                 if r["method"] == name and (r["prompt"], r["seed"]) in base]
        if not pairs:
            continue
        entry = {"pairs": len(pairs)}
        for key in ("fidelity", "frechet", "diversity", "roughness"):
            diffs = [a[key] - b[key] for a, b in pairs]
            entry[f"{key}_diff_mean"], entry[f"{key}_diff_ci95"] = statistics.fmean(diffs), ci95(diffs)
        paired[name] = entry
    return {"methods": methods, "paired": paired}


def _save_png(images: torch.Tensor, path: Path, scale: int = 4) -> None:
    """The particles side by side, each upscaled ``scale``× (nearest)."""
    from PIL import Image

    row = torch.cat(list(images), dim=2)  # [3, H, n·W]
    array = (row.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: image.save(tmp, format="png"))


def run_study(prompts: Sequence[str], methods: Sequence[str], seeds: int, config: StudyConfig, out,
              log: Callable[[str], None] = print) -> dict:
    """Every (prompt, method, seed) run not already kept in ``out``; → the study's JSON (config, rows, summary)."""
    from ..prior import load_prior
    from .world.metrics import parse_prompt, prior_samples

    variants = [parse_method(m) for m in methods]
    for prompt in prompts:
        parse_prompt(prompt)
    out = Path(out)
    prior = load_prior("toy", device="cpu")
    rows, reference_roughness = [], {}
    for prompt in prompts:
        reference = prior_samples(prior, prompt, count=config.reference_samples, view=VIEW)
        reference_roughness[prompt] = roughness(reference)
        for variant in variants:
            for seed in range(seeds):
                path = out / _slug(prompt) / _slug(variant.name) / f"seed{seed}.json"
                if path.is_file():
                    row = json.loads(path.read_text())
                    if "roughness" not in row:  # kept before the metric existed: measured on its kept particles
                        row["roughness"] = _png_roughness(path.with_suffix(".png"))
                    rows.append(row)
                    continue
                row = run_particles(prior, prompt, variant, seed, config, reference)
                _save_png(row.pop("images"), path.with_suffix(".png"))
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(row))
                rows.append(row)
                log(f"{prompt!r} {variant.name} seed {seed}: fidelity {row['fidelity']:.3f}, Fréchet "
                    f"{row['frechet']:.1f}, diversity {row['diversity']:.2f} ({row['seconds']:.0f} s)")
    return {"config": {**asdict(config), "prompts": list(prompts), "methods": list(methods), "seeds": seeds,
                       "view": list(VIEW), "reference_roughness": reference_roughness},
            "rows": rows, **summarize(rows)}


def table(study: dict) -> str:
    """The summary as a markdown table (mean ± 95 % half-width; paired: the difference from vsd)."""
    lines = ["| method | fidelity | Fréchet | diversity | roughness | Fréchet − vsd (paired) | roughness − vsd "
             "(paired) | final ‖Δε_first‖/‖ε_pre − ε_est‖ | s/run |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in study["methods"].items():
        p = study["paired"].get(name)
        diff = f"{p['frechet_diff_mean']:+.1f} ± {p['frechet_diff_ci95']:.1f}" if p else "—"
        rough = f"{p['roughness_diff_mean']:+.3f} ± {p['roughness_diff_ci95']:.3f}" if p else "—"
        lines.append(f"| {name} | {m['fidelity_mean']:.3f} ± {m['fidelity_ci95']:.3f} | {m['frechet_mean']:.1f} ± "
                     f"{m['frechet_ci95']:.1f} | {m['diversity_mean']:.2f} ± {m['diversity_ci95']:.2f} | "
                     f"{m['roughness_mean']:.3f} | {diff} | {rough} | {m['ratio_final_mean']:.2e} | "
                     f"{m['seconds']:.0f} |")
    return "\n".join(lines)


def grid(study: dict, out, path, seed: int = 0) -> Path:
    """One row per method (its seed-``seed`` particles of each prompt, side by side), labelled."""
    from PIL import Image, ImageDraw

    out, rows = Path(out), []
    for name in study["methods"]:
        tiles = [Image.open(out / _slug(p) / _slug(name) / f"seed{seed}.png").convert("RGB")
                 for p in study["config"]["prompts"]]
        width = sum(t.width for t in tiles) + 8 * (len(tiles) - 1)
        row = Image.new("RGB", (width + 220, tiles[0].height), "white")
        ImageDraw.Draw(row).text((4, tiles[0].height // 2 - 6), name, fill="black")
        x = 220
        for tile in tiles:
            row.paste(tile, (x, 0))
            x += tile.width + 8
        rows.append(row)
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 4 for r in rows)), "white")
    y = 0
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height + 4
    atomic_write(Path(path), lambda tmp: canvas.save(tmp, format="png"))
    return Path(path)


def _eta_sweeps(study: dict) -> dict:
    """``{(method, lookahead): [(η, name), …]}`` of the study's lookahead rows, η ascending."""
    sweeps = {}
    for name in study["methods"]:
        variant = parse_method(name)
        if variant.method in ("l2vsd", "l2vsd_last", "hlvsd"):
            sweeps.setdefault((variant.method, variant.lookahead), []).append((variant.eta, name))
    return {key: sorted(rows) for key, rows in sweeps.items()}


def plot(study: dict, path) -> Path:
    """The lookahead's size and effect: ‖Δε_first‖/‖ε_pre − ε_est‖ over the run per lookahead row (mean of its runs),
    the final ratio against η per lookahead kind, and the paired Fréchet and roughness differences from vsd (95 %
    intervals) against that ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, sweeps = study["rows"], _eta_sweeps(study)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for (method, lookahead), named in sweeps.items():
        for eta, name in named:
            mine = [r["ratio"] for r in rows if r["method"] == name and r["ratio"]]
            if mine:
                steps = [s for s, _ in mine[0]]
                mean = [statistics.fmean(r[i][1] for r in mine) for i in range(len(steps))]
                axes[0].semilogy(steps, [max(v, 1e-6) for v in mean], lw=1, label=name)
        etas = [eta for eta, _ in named]
        label = f"{method} [{lookahead}]"
        axes[1].loglog(etas, [max(study["methods"][n]["ratio_final_mean"], 1e-6) for _, n in named], "o-",
                       label=label)
        # the effect against the correction's size: every kind on one axis (η means something else in each)
        ratios = [max(study["methods"][n]["ratio_final_mean"], 1e-6) for _, n in named]
        for ax, key in ((axes[2], "frechet"), (axes[3], "roughness")):
            paired = [study["paired"].get(n) for _, n in named]
            keep = [(r, p) for r, p in zip(ratios, paired) if p]
            if keep:
                ax.errorbar([r for r, _ in keep], [p[f"{key}_diff_mean"] for _, p in keep],
                            yerr=[p[f"{key}_diff_ci95"] for _, p in keep], fmt="o-", capsize=3, label=label)
                ax.set_xscale("log")
    axes[0].set(title="‖Δε_first‖ / ‖ε_pre − ε_est‖ over the run", xlabel="step")
    axes[1].set(title="final ratio against η (each kind's own η)", xlabel="η")
    axes[2].set(title="Fréchet − vsd (paired, 95 %)", xlabel="final ratio ‖Δε_first‖ / ‖ε_pre − ε_est‖")
    axes[3].set(title="roughness − vsd (paired, 95 %)", xlabel="final ratio ‖Δε_first‖ / ‖ε_pre − ε_est‖")
    for ax in axes[2:]:
        ax.axhline(0, color="0.5", lw=0.8)
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return Path(path)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m l2vsd_core.toys.image2d", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", nargs="+", default=["a red cube"])
    parser.add_argument("--methods", nargs="+", default=["sds", "sds@cfg100", "vsd", "l2vsd[optimizer,eta=1]"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=StudyConfig.steps)
    parser.add_argument("--particles", type=int, default=StudyConfig.particles)
    parser.add_argument("--lr", type=float, default=StudyConfig.lr)
    parser.add_argument("--lora-lr", type=float, default=StudyConfig.lora_lr)
    parser.add_argument("--out", default="out/image2d", help="work folder: each run kept, an interrupted study resumes")
    parser.add_argument("--json", default=None)
    parser.add_argument("--grid", default=None)
    parser.add_argument("--plot", default=None, help="PNG of the lookahead's ratio curves and η sweeps")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        for method in args.methods:
            parse_method(method)
        if args.steps < 1 or args.particles < 2 or args.seeds < 1:
            raise ValueError("--steps and --seeds must be >= 1 and --particles >= 2")
    except ValueError as e:
        parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    config = StudyConfig(steps=args.steps, particles=args.particles, lr=args.lr, lora_lr=args.lora_lr)
    study = run_study(args.prompts, args.methods, args.seeds, config, args.out)
    print(table(study))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.json), json.dumps(study, indent=1))
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        grid(study, args.out, args.grid)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(study, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
