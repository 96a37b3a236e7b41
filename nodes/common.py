"""Helpers shared by the L2VSD nodes: categories, input errors, ComfyUI output folders and IMAGE conversion.

Only the standard library is imported at module level: ComfyUI imports every node module at start-up, and the
pack must stay importable (cheaply, without torch) where ComfyUI is absent.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

CATEGORY_ROOT = "L2VSD"
CATEGORY_MODEL = f"{CATEGORY_ROOT}/model"
CATEGORY_SCENE = f"{CATEGORY_ROOT}/scene"
CATEGORY_OPTIMIZE = f"{CATEGORY_ROOT}/optimize"
CATEGORY_EXPORT = f"{CATEGORY_ROOT}/export"

# Socket types the nodes pass to each other (ComfyUI only compares the names).
PRIOR_TYPE = "L2VSD_PRIOR"
SCORE_TYPE = "L2VSD_SCORE"
SCENE_TYPE = "L2VSD_SCENE"


def input_error(name: str, problem: str, fix: str) -> ValueError:
    """A ValueError that ComfyUI shows as the node's error: which input, what is wrong, what to do."""
    return ValueError(f"input '{name}': {problem}; {fix}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise input_error(name, f"{value!r} is not an option", f"pick one of {', '.join(map(str, choices))}")


def relative_subpath(name: str, value: str, what: str) -> str:
    """``value`` as a relative, forward-slash path that cannot leave its base folder (ComfyUI's output folder).

    Both path flavours are checked, so a Windows-style ``C:\\x`` or ``..\\x`` is refused on Linux too."""
    text = str(value).strip()
    fix = f"use a relative {what} such as '3d/l2vsd' that stays inside ComfyUI's output folder"
    if not text:
        raise input_error(name, "is empty", fix)
    for flavour in (PurePosixPath, PureWindowsPath):
        path = flavour(text)
        if path.is_absolute() or path.drive or path.root:
            raise input_error(name, f"{text!r} is an absolute path", fix)
        if ".." in path.parts:
            raise input_error(name, f"{text!r} contains '..'", fix)
    return PurePosixPath(*PureWindowsPath(text).parts).as_posix()


def output_directory() -> Path:
    import folder_paths  # ComfyUI's module; present whenever a node runs
    return Path(folder_paths.get_output_directory())


def temp_directory() -> Path:
    import folder_paths
    return Path(folder_paths.get_temp_directory())


def to_image_batch(frames):
    """Float tensors [H, W, 3] or uint8 PIL images → one ComfyUI IMAGE, float32 [B, H, W, 3] in [0, 1] on the CPU."""
    import numpy as np
    import torch

    tensors = []
    for frame in frames:
        if isinstance(frame, torch.Tensor):
            tensors.append(frame.detach().float().cpu().clamp(0, 1)[..., :3])
        else:
            array = np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0
            tensors.append(torch.from_numpy(array))
    return torch.stack(tensors, 0).contiguous()


def to_pil(image):
    """A float tensor [H, W, 3] in [0, 1] → an RGB PIL image (what ComfyUI's progress previews take)."""
    import numpy as np
    from PIL import Image

    array = (image.detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def render_orbit(renderer, field, background, views: int, resolution: int, elevation: float, distance: float,
                 fovy: float):
    """``views`` evenly spaced turntable renders [views, H, W, 3] of the scene (evaluation mode, no gradients)."""
    import torch
    from l2vsd_core.scene.cameras import CameraBatch, orbit_cameras

    device = next(field.parameters()).device
    cameras = orbit_cameras(views, elevation_deg=elevation, distance=distance, fovy_deg=fovy, width=resolution,
                            height=resolution, device=device)
    modules = [m for m in (field, background, renderer) if m is not None]
    was_training = [m.training for m in modules]
    for module in modules:
        module.eval()
    frames = []
    try:
        with torch.no_grad():
            for i in range(views):  # one view at a time keeps memory bounded
                camera = CameraBatch(*(t[i:i + 1] for t in (cameras.c2w, cameras.position, cameras.elevation_deg,
                                                            cameras.azimuth_deg, cameras.distance, cameras.fovy_deg)),
                                     cameras.width, cameras.height)
                out = renderer.render_camera(camera, field, background, stratified=False)
                frames.append(out["rgb"][0].float().clamp(0, 1).cpu())
    finally:
        for module, training in zip(modules, was_training):
            module.train(training)
    return to_image_batch(frames)
