"""What every optimizing node shares (L2VSDOptimize, RefineGeometry, RefineTexture) and only ComfyUI needs: the run
folder under the output folder, ComfyUI's :class:`~l2vsd_core.runner.Hooks` (its progress bar with previews, its
interrupt flag, ``print`` for the log), a resume that cannot be done as an input error, the loss-curves image, the
``ui`` run info and giving memory back after a stage.

The stages themselves — LoRA, loop, resume, checkpoint on interrupt, curves — are ``l2vsd_core.pipeline``'s
(``optimize_nerf``, ``refine_geometry``, ``refine_texture``), driven by ``l2vsd_core.runner``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import (DISPLAY_SIZE, display_images, input_error, output_directory, relative_subpath, temp_directory,
                     to_image_batch, to_pil, upscaled)

PREVIEW_SIZE = DISPLAY_SIZE  # the server fits progress previews into this size (enlarged here first: crisp pixels)
LOG_PREFIX = "[L2VSD] "
# Each stage's default checkpoint_folder under the output folder: one folder per stage, so that fresh nodes of the
# three stages never share one (their files would not collide anyway: l2vsd_core.runner.STAGE_FILES)
DEFAULT_FOLDERS = {"nerf": "l2vsd/nerf", "geometry": "l2vsd/geometry", "texture": "l2vsd/texture"}


def checkpoint_folder_input(stage: str) -> tuple:
    """The ``checkpoint_folder`` input of the node that runs ``stage``, defaulting to its own folder."""
    return ("STRING", {"default": DEFAULT_FOLDERS[stage],
                       "tooltip": "Folder under ComfyUI's output folder for this stage's checkpoint and loss curves "
                                  f"(default: {DEFAULT_FOLDERS[stage]}, this stage's own). 'resume' continues the run "
                                  "found there: give each graph its own folder (the bundled workflows use "
                                  "l2vsd/<workflow>/<stage>)."})


def log(message: str) -> None:
    print(LOG_PREFIX + message)


def run_folder(checkpoint_folder: str) -> Path:
    """The node's ``checkpoint_folder`` under ComfyUI's output folder (never outside it)."""
    run_dir = output_directory() / relative_subpath("checkpoint_folder", checkpoint_folder, "folder name")
    if run_dir.exists() and not run_dir.is_dir():
        raise input_error("checkpoint_folder", f"{run_dir} is a file", "pick another folder name")
    return run_dir


def checkpoint_file(run_dir: Path, stage: str) -> Path:
    """The stage's checkpoint in ``run_dir`` (``l2vsd_core.runner.STAGE_FILES``: each stage has its own file names, so
    the three stages may also share a folder, as ``generate --stages 3`` does in ``--out``)."""
    from l2vsd_core.runner import stage_files
    return stage_files(run_dir, stage)[0]


class ComfyHooks:
    """ComfyUI's side of a stage: a progress bar (with each preview) that starts at the step the stage starts from,
    and ComfyUI's interrupt flag as ``should_stop`` — the interrupt is recorded and raised by :meth:`finish` once the
    stage has returned with its checkpoint written. ComfyUI's progress hook may also raise the interrupt from inside a
    step's callback: that is one of the ``interrupt_errors``, on which the runner checkpoints the last finished step."""

    def __init__(self, total: int, checkpoint: Path, resume: bool):
        import comfy.model_management as model_management
        import comfy.utils

        self.model_management = model_management
        self.total, self.checkpoint, self.resume = int(total), Path(checkpoint), bool(resume)
        self.bar = comfy.utils.ProgressBar(self.total)
        self.interrupted = []

    def hooks(self):
        from l2vsd_core.runner import Hooks
        return Hooks(progress=self.progress, should_stop=self.should_stop, log=log, interrupts=self.starting,
                     interrupt_errors=(KeyboardInterrupt, self.model_management.InterruptProcessingException))

    def start_step(self) -> int:
        """The step the stage starts from: the checkpoint's when resuming (the runner has loaded it by now)."""
        if not self.resume:
            return 0
        try:
            return int(json.loads(self.checkpoint.with_name(self.checkpoint.name + ".json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def starting(self):
        """Entered by the runner after the resume, before the first step: the bar shows where the stage starts."""
        self.bar.update_absolute(self.start_step(), self.total)
        from l2vsd_core.runner import Hooks
        return Hooks().interrupts()

    def progress(self, done: int, total: int, terms: dict, preview) -> None:
        image = None if preview is None else ("JPEG", upscaled(to_pil(preview)), PREVIEW_SIZE)
        self.bar.update_absolute(done, total, image)

    def should_stop(self) -> bool:
        try:
            self.model_management.throw_exception_if_processing_interrupted()
        except self.model_management.InterruptProcessingException as e:
            self.interrupted.append(e)  # raised by finish() once the stage has written its checkpoint
            return True
        return False

    def finish(self) -> None:
        if self.interrupted:
            raise self.interrupted[0]


def run_stage(call, total: int, checkpoint: Path, resume: bool):
    """``call(hooks)`` (a ``l2vsd_core.pipeline`` stage) with ComfyUI's hooks; a checkpoint that cannot be resumed is
    an input error of ``resume``; ComfyUI's interrupt is raised after the stage stopped; memory is given back to
    the other nodes afterwards in any case."""
    from l2vsd_core.runner import ResumeError

    comfy = ComfyHooks(total, checkpoint, resume)
    try:
        try:
            result = call(comfy.hooks())
        except ResumeError as e:
            raise input_error("resume", str(e), "set the same settings as the checkpointed run, or turn resume off "
                                                "(or pick another checkpoint_folder) to start over") from e
        comfy.finish()
        return result
    finally:
        comfy.model_management.soft_empty_cache()


def curves_image(history: list):
    """The loss curves as a one-image IMAGE batch."""
    from PIL import Image
    from l2vsd_core.plots import write_curves

    plot = write_curves(history, unique_temp_file("l2vsd_curves", ".png"))
    with Image.open(plot) as image:
        return to_image_batch([image])


def run_info(run, checkpoint: Path) -> dict:
    """The node's ``ui`` entry from the stage's ``StageRun``: where it started and stopped, and its checkpoint
    (relative to the output folder)."""
    return {"l2vsd_run": [{"start_step": run.start, "step": run.step, "steps": run.total,
                           "checkpoint": str(checkpoint.relative_to(output_directory()).as_posix())}]}


def stage_ui(run, checkpoint: Path, renders, stem: str) -> dict:
    """The optimizing node's ``ui``: :func:`run_info` and its orbit ``renders`` shown on the node, enlarged for
    display (the IMAGE output keeps their size)."""
    return {**run_info(run, checkpoint), "images": display_images(renders, stem)}


def lora_base(score):
    """A second copy of the prior for a separate LoRA base (``AttachLoRAScore``'s ``base``), else None."""
    return score.base.load_again() if score.lora.separate_base and score.base is not None else None


def unique_temp_file(stem: str, suffix: str) -> Path:
    import uuid
    folder = temp_directory()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}_{uuid.uuid4().hex[:12]}{suffix}"
