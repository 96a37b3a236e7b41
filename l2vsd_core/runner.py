"""The one driver of a stage: resume from its checkpoint, run it with progress and previews, turn an interrupt into a
checkpoint, keep the loss curves — used by ``generate`` (CLI, toys) and the ComfyUI nodes alike, which differ only
in their :class:`Hooks` (the CLI: a tqdm bar and Ctrl-C; a node: ComfyUI's progress bar and interrupt flag).

A stop request (``should_stop()`` true, or the hooks' interrupt signal) ends the stage after the current step with
the checkpoint written and ``stopped`` set; an exception of ``interrupt_errors`` raised inside a step (a second
Ctrl-C, ComfyUI's interrupt raised from its progress hook) writes the checkpoint of the last finished step, then
propagates.  The curves (``[{"done": step, term: value}]``) are written however the stage ends.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional

from .files import atomic_write_text

__all__ = ["Hooks", "StageRun", "ResumeError", "run_stage", "read_curves", "STAGE_FILES", "stage_files"]

# Each stage's files in a run folder (so the three stages can share one): checkpoint and curves (.json, .png)
STAGE_FILES = {"nerf": ("checkpoint.safetensors", "curves"), "geometry": ("geometry.safetensors", "geometry_curves"),
               "texture": ("texture.safetensors", "texture_curves")}


def stage_files(folder, stage: str) -> tuple[Path, Path]:
    """``(checkpoint, curves.json)`` of ``stage`` in ``folder``."""
    checkpoint, curves = STAGE_FILES[stage]
    return Path(folder) / checkpoint, Path(folder) / f"{curves}.json"


class ResumeError(ValueError):
    """The checkpoint exists but cannot be resumed (unreadable, another stage, other settings or shapes)."""


class _NoSignal:
    requested = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@dataclass
class Hooks:
    """How a stage talks to whoever runs it.  ``progress(done, total, terms, preview_or_None)`` after each step;
    ``should_stop()`` before each; ``log(message)``; ``interrupts()`` a context manager whose value has a
    ``requested`` flag (the CLI's Ctrl-C handler); ``interrupt_errors`` the exceptions that mean "interrupted"."""

    progress: Optional[Callable[[int, int, dict, object], None]] = None
    should_stop: Optional[Callable[[], bool]] = None
    log: Callable[[str], None] = lambda message: None
    interrupts: Callable[[], ContextManager] = _NoSignal
    interrupt_errors: tuple = (KeyboardInterrupt,)


@dataclass
class StageRun:
    start: int                      # the step it started (or resumed) from
    step: int                       # the step it reached
    total: int
    history: list = field(default_factory=list)
    resumed: bool = False

    @property
    def stopped(self) -> bool:
        return self.step < self.total

    @property
    def ran(self) -> bool:
        return self.step > self.start


def read_curves(path: Path, up_to: int) -> list:
    """The curves of an earlier run up to step ``up_to`` (a missing or broken file: none; they are a convenience)."""
    try:
        return [t for t in json.loads(Path(path).read_text()) if t.get("done", 0) <= up_to]
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def run_stage(stage, checkpoint: Path, curves: Path, resume: bool, hooks: Optional[Hooks] = None) -> StageRun:
    """Resume ``stage`` from ``checkpoint`` when ``resume`` and it exists (``ResumeError`` if it cannot), run it to
    its ``config.steps`` with ``hooks``, checkpoint and write ``curves``."""
    hooks = hooks or Hooks()
    history, resumed = [], False
    if resume and Path(checkpoint).is_file():
        try:
            meta = stage.load_checkpoint(checkpoint)
        except ValueError as e:
            raise ResumeError(str(e)) from e
        hooks.log(f"resumed from {checkpoint} at step {meta['step']} ({stage.STAGE} stage)")
        history, resumed = read_curves(curves, stage.global_step), True
    elif resume:
        hooks.log(f"resume: no checkpoint at {checkpoint} yet; starting the {stage.STAGE} stage from the beginning")
    total = stage.config.steps
    run = StageRun(stage.global_step, stage.global_step, total, history, resumed)

    def callback(done, terms, preview):
        history.append({"done": done, **{k: v for k, v in terms.items() if isinstance(v, float)}})
        if hooks.progress is not None:
            hooks.progress(done, total, terms, preview)

    with hooks.interrupts() as signal:
        def stop() -> bool:
            return signal.requested or (hooks.should_stop is not None and bool(hooks.should_stop()))
        try:
            stage.run(callback=callback, should_stop=stop, checkpoint_path=checkpoint)
        except hooks.interrupt_errors:
            stage.save_checkpoint(checkpoint)  # the last finished step, so that a resumed run continues from it
            raise
        finally:
            run.step = stage.global_step
            Path(curves).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(curves, json.dumps(history))
    return run


@contextlib.contextmanager
def eval_mode(*modules):
    """The torch modules among ``modules`` in evaluation mode for the block, then back to their own modes."""
    import torch

    modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    was = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in zip(modules, was):
            module.train(training)
