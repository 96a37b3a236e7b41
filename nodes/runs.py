"""What every optimizing node shares (L2VSDOptimize, RefineGeometry, RefineTexture): the LoRA made for one run, the
resume from a checkpoint, and running a loop of ``l2vsd_core`` under ComfyUI's progress bar (previews) and interrupt
flag — an interrupt writes the checkpoint of the last finished step, then the node raises it as ComfyUI expects.

The loops (``Stage1Optimizer``, ``GeometryRefiner``, ``TextureRefiner``) share one surface: ``run(callback,
should_stop)`` (checkpoints to ``config.checkpoint_path``), ``save_checkpoint``, ``load_checkpoint`` and
``global_step``; this module only relies on that.
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import input_error, output_directory, relative_subpath, temp_directory, to_image_batch, to_pil

CHECKPOINT_FILE = "checkpoint.safetensors"
CURVES_FILE = "curves.json"
PREVIEW_SIZE = 256  # the server scales progress previews to fit this size (up, too: toy renders are 32 wide)


def run_folder(checkpoint_folder: str) -> Path:
    """The node's ``checkpoint_folder`` under ComfyUI's output folder (never outside it)."""
    run_dir = output_directory() / relative_subpath("checkpoint_folder", checkpoint_folder, "folder name")
    if run_dir.exists() and not run_dir.is_dir():
        raise input_error("checkpoint_folder", f"{run_dir} is a file", "pick another folder name")
    return run_dir


def make_lora(settings, prior, seed: int, adapter_name: str):
    """A fresh LoRA score (``settings``: the ScoreSettings from AttachLoRAScore) on the prior's UNet, or on a second
    copy of it for a separate base; returns ``(lora, unet)``. Each run makes its own: ComfyUI caches node outputs,
    so a LoRA passed between nodes would be trained further by every run that reuses the cache."""
    import warnings

    import torch
    from l2vsd_core.score import LoRAScore

    base = settings.base.load_again() if settings.separate_base else prior
    # peft initialises the LoRA from the global RNG; an emptied peft_config of an earlier run is harmless
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        torch.manual_seed(seed)
        lora = LoRAScore(base.unet, base.alphas_cumprod, base.prediction_type, rank=settings.rank,
                         lr=settings.lora_lr, camera_dropout=settings.camera_dropout, seed=seed,
                         adapter_name=adapter_name)
    return lora, base.unet


def remove_lora(unet, adapter_name: str) -> None:
    """Take the run's adapter off the UNet (the shared base is the cached prior's own UNet, so the next run starts
    clean) and give the freed blocks back to other nodes."""
    if unet is not None and adapter_name in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters(adapter_name)
    import comfy.model_management as model_management
    model_management.soft_empty_cache()


def resume_from(loop, checkpoint: Path, curves: Path) -> list:
    """Restore ``checkpoint`` into ``loop`` if there is one (resume on a first run simply starts from the input) and
    return the loss history up to its step."""
    if not checkpoint.is_file():
        print(f"[L2VSD] resume: no checkpoint at {checkpoint} yet; starting from the input")
        return []
    try:
        meta = loop.load_checkpoint(checkpoint)
    except ValueError as e:
        raise input_error("resume", str(e), "set the same settings as the checkpointed run, or turn resume off "
                                            "(or pick another checkpoint_folder) to start over") from e
    print(f"[L2VSD] resumed from {checkpoint} at step {meta['step']}")
    try:
        return [t for t in json.loads(curves.read_text()) if t.get("done", 0) <= loop.global_step]
    except (OSError, ValueError, TypeError, AttributeError):
        return []  # the curves are a convenience; a run resumes without them


def run_with_progress(loop, steps: int, checkpoint: Path, curves: Path, history: list) -> None:
    """``loop.run`` up to ``steps`` with a ComfyUI progress bar (starting at the loop's step, with each preview)
    and ComfyUI's interrupt: the checkpoint of the last finished step is written, then the interrupt is raised.
    ``history`` gets each step's float terms; it is written to ``curves`` however the run ends."""
    import comfy.model_management as model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(steps)
    bar.update_absolute(loop.global_step, steps)
    interrupted = []

    def should_stop() -> bool:
        try:
            model_management.throw_exception_if_processing_interrupted()
        except model_management.InterruptProcessingException as e:
            interrupted.append(e)  # re-raised once the loop has written the checkpoint
            return True
        return False

    def callback(done, terms, preview):
        history.append({"done": done, **{k: v for k, v in terms.items() if isinstance(v, float)}})
        image = None if preview is None else ("JPEG", to_pil(preview), PREVIEW_SIZE)
        bar.update_absolute(done, steps, image)

    try:
        loop.run(callback=callback, should_stop=should_stop)
    except (KeyboardInterrupt, model_management.InterruptProcessingException):
        # ComfyUI's progress hook raises the interrupt itself, from the loop's callback, i.e. after a complete
        # step: checkpoint that step so that a resumed run continues from it.
        loop.save_checkpoint(checkpoint)
        raise
    finally:
        write_json(curves, history)
    if interrupted:
        raise interrupted[0]


def curves_image(history: list):
    """The loss curves as a one-image IMAGE batch."""
    from PIL import Image
    from l2vsd_core.generate import write_curves

    plot = write_curves(history, unique_temp_file("l2vsd_curves", ".png"))
    with Image.open(plot) as image:
        return to_image_batch([image])


def run_info(start_step: int, step: int, steps: int, checkpoint: Path) -> dict:
    """The node's ``ui`` entry: where the run started and stopped, and its checkpoint (relative to the output)."""
    return {"l2vsd_run": [{"start_step": start_step, "step": step, "steps": steps,
                           "checkpoint": str(checkpoint.relative_to(output_directory()).as_posix())}]}


def write_json(path: Path, data) -> None:
    from l2vsd_core.files import atomic_write_text
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data))


def unique_temp_file(stem: str, suffix: str) -> Path:
    import uuid
    folder = temp_directory()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}_{uuid.uuid4().hex[:12]}{suffix}"
