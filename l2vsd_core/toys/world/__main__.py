"""``python -m l2vsd_core.toys.world {render-samples,train,export,judge-train} …``

* ``render-samples`` — a grid of data-set images (one shape per row, colors across) to look at the world.
* ``train`` — train the pixel-space prior (``--resume`` continues from ``--out``'s checkpoint); exports on the way.
* ``export`` — export the prior folder from the latest checkpoint (EMA weights) without training.
* ``judge-train`` — train the (shape, color) classifier used to score generations.

Every command runs torch with one thread unless ``--threads`` says otherwise: the machines this runs on are small
and shared, and oversubscribed cores slow everything down far more than one thread does.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .train import DEFAULT_EXPORT_DIR, DEFAULT_TRAIN_DIR, PREDICTION_TYPES, TrainConfig


def _render_samples(args) -> int:
    from .data import make_batch
    from .scene import COLOR_NAMES, SHAPE_NAMES, named_objects, render
    from ...scene.cameras import RandomCameraSampler
    from .train import save_image_grid

    rows = []
    generator = torch.Generator().manual_seed(args.seed)
    sampler = RandomCameraSampler(width=args.resolution, height=args.resolution)
    for shape in SHAPE_NAMES:   # one row per shape, every color, random stage-1 cameras
        cameras = sampler.sample(len(COLOR_NAMES), generator=generator)
        objects = named_objects(shape, 0, len(COLOR_NAMES))
        objects.albedo = torch.stack([named_objects(shape, c, 1).albedo[0] for c in COLOR_NAMES])
        rows.append(render(objects, cameras)[0])
    rows.append(make_batch(args.seed, 0, len(COLOR_NAMES), args.resolution).images)   # a data-set batch
    path = save_image_grid(torch.cat(rows), Path(args.out), columns=len(COLOR_NAMES), scale=args.scale)
    print(f"wrote {path}: rows {', '.join(SHAPE_NAMES)}, then a data-set batch; columns {', '.join(COLOR_NAMES)}")
    return 0


def _train(args) -> int:
    from .train import train
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, export_every=args.export_every,
                         log_every=args.log_every, model=args.model, train_dir=Path(args.out),
                         export_dir=Path(args.export_dir), prediction_type=args.prediction_type)
    train(config, resume=args.resume, init_from=Path(args.init_from) if args.init_from else None)
    return 0


def _export(args) -> int:
    from .train import export_from_checkpoint
    path = export_from_checkpoint(Path(args.out), Path(args.export_dir), samples=not args.no_samples)
    print(f"exported {path}")
    return 0


def _judge_train(args) -> int:
    from .judge import DEFAULT_JUDGE_DIR, train_judge
    train_judge(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                out_dir=Path(args.out) if args.out else DEFAULT_JUDGE_DIR)
    return 0


def _loss_curve(args) -> int:
    """The training log's loss over steps (raw and a moving average) as a PNG, for the README."""
    import re
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ...files import atomic_write

    steps, losses = [], []
    for line in Path(args.log).read_text().splitlines():
        m = re.match(r"step (\d+) loss ([0-9.eE+-]+)", line)
        if m:
            steps.append(int(m.group(1)))
            losses.append(float(m.group(2)))
    if not steps:
        raise SystemExit(f"{args.log}: no 'step N loss L' lines")
    window = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(steps, losses, lw=0.5, alpha=0.4, label="loss (every logged step)")
    ax.plot(steps, smooth, lw=1.5, label=f"moving average ({window} logs)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("ε-MSE")
    ax.legend()
    fig.tight_layout()
    atomic_write(Path(args.png), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    print(args.png)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m l2vsd_core.toys.world", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("render-samples", help="a grid of world renders", formatter_class=fmt)
    p.add_argument("--out", default="out/world_samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the PNG")
    p.set_defaults(run=_render_samples)

    defaults = TrainConfig()
    p = sub.add_parser("train", help="train the pixel-space prior", formatter_class=fmt)
    p.add_argument("--steps", type=int, default=defaults.steps, help="total optimizer steps (a resumed run included)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--model", choices=("default", "tiny"), default=defaults.model,
                   help="'tiny' is for tests only")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=defaults.prediction_type,
                   help="the training target; --init-from an export with the other type fine-tunes it to this one")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--export-every", type=int, default=defaults.export_every)
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--out", default=str(DEFAULT_TRAIN_DIR), help="checkpoints, log and sample grids")
    p.add_argument("--export-dir", default=str(DEFAULT_EXPORT_DIR), help="the exported diffusers folder")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--init-from", default=None, help="continue from an exported prior folder (e.g. the bundled one) "
                                                   "when the checkpoint is not there: its weights and step, fresh "
                                                   "optimizer moments")
    p.set_defaults(run=_train)

    p = sub.add_parser("export", help="export the prior from the latest checkpoint", formatter_class=fmt)
    p.add_argument("--out", default=str(DEFAULT_TRAIN_DIR), help="the training folder holding the checkpoint")
    p.add_argument("--export-dir", default=str(DEFAULT_EXPORT_DIR))
    p.add_argument("--no-samples", action="store_true", help="skip the sample grid")
    p.set_defaults(run=_export)

    p = sub.add_parser("judge-train", help="train the (shape, color) judge classifier", formatter_class=fmt)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="", help="folder for the judge weights (default: the package's judge/)")
    p.set_defaults(run=_judge_train)

    p = sub.add_parser("loss-curve", help="plot the training log's loss", formatter_class=fmt)
    p.add_argument("--log", default=str(DEFAULT_TRAIN_DIR / "train.log"))
    p.add_argument("--png", default="docs/world/prior_loss.png")
    p.set_defaults(run=_loss_curve)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
