"""Scalar schedules and diffusion-timestep sampling.

threestudio writes a scheduled scalar as ``[start_step, v0, v1, end_step]``: ``v0`` until ``start_step``, a linear ramp to
``v1`` at ``end_step``, then ``v1``.  A plain number is a constant.  ProlificDreamer schedules the upper end of the
timestep range this way (``max_step_percent: [5000, 0.98, 0.5, 5001]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

Scheduled = Union[float, int, Sequence[float]]


def check_scheduled(name: str, value: Scheduled) -> None:
    """Raise ``ValueError`` unless ``value`` is a number or ``[start_step, v0, v1, end_step]``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        return
    if isinstance(value, (list, tuple)) and len(value) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        if value[3] < value[0]:
            raise ValueError(f"{name}: end_step {value[3]} is before start_step {value[0]} in {list(value)}")
        return
    raise ValueError(f"{name} must be a number or [start_step, v0, v1, end_step], got {value!r}")


def scheduled_value(value: Scheduled, step: int) -> float:
    """The value of a threestudio-style schedule at ``step``."""
    if isinstance(value, (int, float)):
        return float(value)
    start, v0, v1, end = (float(v) for v in value)
    if step <= start:
        return v0
    if step >= end:
        return v1
    return v0 + (v1 - v0) * (step - start) / (end - start)


@dataclass
class TimestepSampler:
    """Draws diffusion timesteps for score distillation.

    ``min_step_percent`` / ``max_step_percent`` are fractions of ``num_train_timesteps`` (each may be scheduled).
    With ``sqrt_anneal`` (HiFA) the timestep is deterministic and decreases as
    ``t = (max - min) * (1 - sqrt(step / max_steps)) + min``, the same for the whole batch.
    """

    num_train_timesteps: int = 1000
    min_step_percent: Scheduled = 0.02
    max_step_percent: Scheduled = 0.98
    sqrt_anneal: bool = False
    max_steps: int = 25000

    def __post_init__(self):
        check_scheduled("min_step_percent", self.min_step_percent)
        check_scheduled("max_step_percent", self.max_step_percent)
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.sqrt_anneal and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 with sqrt_anneal, got {self.max_steps}")

    def step_range(self, step: int) -> tuple[int, int]:
        """Inclusive integer range ``[min_step, max_step]`` at training step ``step``."""
        lo = scheduled_value(self.min_step_percent, step)
        hi = scheduled_value(self.max_step_percent, step)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"timestep range must satisfy 0 <= min_step_percent <= max_step_percent <= 1, "
                             f"got [{lo}, {hi}] at step {step}")
        last = self.num_train_timesteps - 1
        return min(int(self.num_train_timesteps * lo), last), min(int(self.num_train_timesteps * hi), last)

    def sample(self, batch: int, step: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        lo, hi = self.step_range(step)
        if self.sqrt_anneal:
            progress = math.sqrt(min(max(step, 0), self.max_steps) / self.max_steps)
            t = int(round((hi - lo) * (1.0 - progress) + lo))
            return torch.full((batch,), t, dtype=torch.long, device=device)
        t = torch.randint(lo, hi + 1, (batch,), generator=generator, device=generator.device if generator else None)
        return t.to(device)
