"""Helpers shared by the L2VSD nodes: categories, input errors, ComfyUI output folders and IMAGE conversion.

Only the standard library is imported at module level: ComfyUI imports every node module at start-up, and the
pack must stay importable (cheaply, without torch) where ComfyUI is absent.
"""
from __future__ import annotations

from contextlib import contextmanager
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
MESH_TYPE = "L2VSD_MESH"


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


def check_sockets(**sockets) -> None:
    """``name=(value, expected class, node to connect)``: an input error for the first socket of another type."""
    for name, (value, kind, source) in sockets.items():
        if not isinstance(value, kind):
            raise input_error(name, f"got {type(value).__name__}", f"connect the output of a {source} node")


def check_prompt(prompt: str) -> None:
    if not str(prompt).strip():
        raise input_error("prompt", "is empty", "describe the object to generate, e.g. 'a red cube'")


@contextmanager
def eval_mode(*modules):
    """The torch modules among ``modules`` in evaluation mode for the block, then back to their own modes (node
    inputs are cached by ComfyUI and shared: they are left as they came)."""
    import torch
    modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    was_training = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in zip(modules, was_training):
            module.train(training)


def on_device(module, device):
    """``module`` if it already lives on ``device``, else a copy moved there (``.to`` would move a cached input)."""
    import copy

    import torch
    try:
        current = next(module.parameters()).device
    except StopIteration:
        return module
    device = torch.device(device)
    if current.type == device.type and (device.index is None or current.index == device.index):
        return module  # "cuda" is whichever GPU the module is on
    return copy.deepcopy(module).to(device)


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
                 fovy: float, output: str = "rgb", device=None):
    """``views`` evenly spaced turntable renders [views, H, W, 3] (evaluation mode, no gradients) with anything that
    has the volume renderer's ``render_camera`` (a ``VolumeRenderer``, or a ``MeshRenderer`` bound to a mesh, whose
    ``field`` may then be None for a normal map: ``output="comp_normal"``)."""
    import torch
    from l2vsd_core.scene.cameras import CameraBatch, orbit_cameras

    device = device if device is not None else next(field.parameters()).device
    cameras = orbit_cameras(views, elevation_deg=elevation, distance=distance, fovy_deg=fovy, width=resolution,
                            height=resolution, device=device)
    frames = []
    with eval_mode(field, background, renderer), torch.no_grad():
        for i in range(views):  # one view at a time keeps memory bounded
            camera = CameraBatch(*(t[i:i + 1] for t in (cameras.c2w, cameras.position, cameras.elevation_deg,
                                                        cameras.azimuth_deg, cameras.distance, cameras.fovy_deg)),
                                 cameras.width, cameras.height)
            out = renderer.render_camera(camera, field, background, stratified=False)
            frames.append(out[output][0].float().clamp(0, 1).cpu())
    return to_image_batch(frames)
