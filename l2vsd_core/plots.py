"""Loss curves as a PNG."""
from __future__ import annotations

import math
from pathlib import Path

from .files import atomic_write


def write_curves(history: list, path: Path) -> Path:
    """Plot every ``loss*`` term of ``history`` (a list of ``{"done": step, term: value}``) over steps; atomic
    PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for t in history for k in t if k.startswith("loss")})
    fig, axes = plt.subplots(len(keys) or 1, 1, figsize=(7, 1.8 * max(len(keys), 1) + 0.6), sharex=True,
                             squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(t["done"], t[key]) for t in history if key in t and math.isfinite(t[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, lw=1, marker="." if len(pts) < 50 else None)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    if not keys:
        axes[0, 0].text(0.5, 0.5, "no steps", ha="center", va="center")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    finally:
        plt.close(fig)
    return Path(path)
