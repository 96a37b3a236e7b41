"""The judge: a small CNN that names the shape and the color of a world render, for scoring generations.

It reads 32×32 RGB in [0, 1] (other sizes are resized with area averaging first) and has two heads, shape
(``SHAPE_NAMES``) and color (``COLOR_NAMES``), on a shared 128-d feature: :func:`judge_probabilities` gives both
distributions, :func:`judge_features` the feature (for a Fréchet distance between sets of renders).

Training data are world renders from their own seed (not the prior's), pre-rendered once into a pool (rendering is
the slow part on CPU) with a held-out split for the accuracy that is stored with the weights.  Light Gaussian pixel
noise during training keeps the judge from relying on the renderer's perfectly clean pixels, since the images it
grades come out of a diffusion model or a NeRF.  Weights: ``judge/judge.safetensors`` next to this file, with the
architecture, the training settings and the held-out accuracies as JSON in the safetensors metadata.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...files import atomic_write_bytes
from .data import make_batch
from .scene import COLOR_NAMES, SHAPE_NAMES

DEFAULT_JUDGE_DIR = Path(__file__).resolve().parent / "judge"
WEIGHTS_NAME = "judge.safetensors"
RESOLUTION = 32
FEATURES = 128


class Judge(nn.Module):
    """conv(32) → conv(64, /2) → conv(128, /2) → conv(128, /2) → global average → 128-d feature → two linear heads."""

    def __init__(self):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())

        self.body = nn.Sequential(block(3, 32, 1), block(32, 64, 2), block(64, 128, 2), block(128, FEATURES, 2))
        self.shape_head = nn.Linear(FEATURES, len(SHAPE_NAMES))
        self.color_head = nn.Linear(FEATURES, len(COLOR_NAMES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1).mean((2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shape logits [N, 6], color logits [N, 8]) of images [N, 3, 32, 32] in [0, 1]."""
        f = self.features(images)
        return self.shape_head(f), self.color_head(f)


# ------------------------------------------------------------------------------------------------------ use
_LOADED: dict[str, Judge] = {}


def load_judge(path: Optional[Path] = None) -> Judge:
    """The trained judge (cached per path), in eval mode on the CPU."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_JUDGE_DIR / WEIGHTS_NAME
    key = str(path.resolve())
    if key not in _LOADED:
        if not path.is_file():
            raise FileNotFoundError(f"no judge weights at {path}; train them with "
                                    f"`python -m l2vsd_core.toys.world judge-train`")
        judge = Judge()
        judge.load_state_dict(load_file(str(path)))
        _LOADED[key] = judge.eval()
    return _LOADED[key]


def _prepare(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"the judge reads RGB images [N, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}")
    images = images.detach().float().cpu()
    if images.shape[-2:] != (RESOLUTION, RESOLUTION):
        images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="area")
    return images.clamp(0, 1)


@torch.no_grad()
def judge_probabilities(images: torch.Tensor, path: Optional[Path] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(shape probabilities [N, len(SHAPE_NAMES)], color probabilities [N, len(COLOR_NAMES)]) of images in [0, 1]."""
    shape_logits, color_logits = load_judge(path)(_prepare(images))
    return shape_logits.softmax(-1), color_logits.softmax(-1)


@torch.no_grad()
def judge_features(images: torch.Tensor, path: Optional[Path] = None) -> torch.Tensor:
    """[N, 128] penultimate features of images in [0, 1] (for a Fréchet distance between two sets)."""
    return load_judge(path).features(_prepare(images))


# ---------------------------------------------------------------------------------------------------- train
def render_pool(seed: int, count: int, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images [count, 3, 32, 32], shape labels, color labels) from data set ``seed``'s first batches."""
    batches = [make_batch(seed, i, batch_size, RESOLUTION) for i in range((count + batch_size - 1) // batch_size)]
    images = torch.cat([b.images for b in batches])[:count]
    return images, torch.cat([b.shape for b in batches])[:count], torch.cat([b.color for b in batches])[:count]


@torch.no_grad()
def accuracy(judge: Judge, images: torch.Tensor, shapes: torch.Tensor, colors: torch.Tensor) -> tuple[float, float]:
    judge.eval()
    shape_logits, color_logits = judge(images)
    return (float((shape_logits.argmax(-1) == shapes).float().mean()),
            float((color_logits.argmax(-1) == colors).float().mean()))


def train_judge(steps: int = 1500, batch_size: int = 64, seed: int = 1234, pool: int = 8192, held_out: int = 1024,
                lr: float = 2e-3, noise: float = 0.05, out_dir: Path = DEFAULT_JUDGE_DIR) -> dict:
    """Train on a pool of ``pool`` renders, report accuracy on ``held_out`` others, save; returns the summary."""
    from safetensors.torch import save

    started = time.perf_counter()
    images, shapes, colors = render_pool(seed, pool + held_out)
    train_x, train_s, train_c = images[:pool], shapes[:pool], colors[:pool]
    test_x, test_s, test_c = images[pool:], shapes[pool:], colors[pool:]
    print(f"rendered {pool + held_out} images in {time.perf_counter() - started:.0f} s", flush=True)

    torch.manual_seed(seed)
    judge = Judge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        judge.train()
        index = torch.randint(pool, (batch_size,), generator=generator)
        x = train_x[index]
        sigma = torch.rand(batch_size, 1, 1, 1, generator=generator) * noise
        x = (x + sigma * torch.randn(x.shape, generator=generator)).clamp(0, 1)
        shape_logits, color_logits = judge(x)
        loss = F.cross_entropy(shape_logits, train_s[index]) + F.cross_entropy(color_logits, train_c[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            shape_acc, color_acc = accuracy(judge, test_x, test_s, test_c)
            print(f"step {step} loss {float(loss.detach()):.4f} held-out accuracy shape {shape_acc:.3f} "
                  f"color {color_acc:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    shape_acc, color_acc = accuracy(judge, test_x, test_s, test_c)
    summary = {"steps": steps, "batch_size": batch_size, "seed": seed, "pool": pool, "held_out": held_out,
               "lr": lr, "noise": noise, "shape_accuracy": shape_acc, "color_accuracy": color_acc,
               "shapes": list(SHAPE_NAMES), "colors": list(COLOR_NAMES), "resolution": RESOLUTION,
               "seconds": round(time.perf_counter() - started, 1)}
    state = {k: v.contiguous() for k, v in judge.state_dict().items()}
    path = atomic_write_bytes(Path(out_dir) / WEIGHTS_NAME, save(state, metadata={"summary": json.dumps(summary)}))
    _LOADED.pop(str(path.resolve()), None)
    print(f"saved {path}: held-out accuracy shape {shape_acc:.3f}, color {color_acc:.3f}", flush=True)
    return summary
