"""Helpers shared by the L2VSD nodes: categories, input errors, ComfyUI output folders and IMAGE conversion.

Only the standard library is imported at module level: ComfyUI imports every node module at start-up, and the
pack must stay importable (cheaply, without torch) where ComfyUI is absent.
"""
from __future__ import annotations

import math
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


def eval_mode(*modules):
    """The torch modules among ``modules`` in evaluation mode for the block, then back to their own modes (node
    inputs are cached by ComfyUI and shared: they are left as they came) — ``l2vsd_core.runner.eval_mode``."""
    from l2vsd_core.runner import eval_mode as core_eval_mode
    return core_eval_mode(*modules)


# ------------------------------------------------------------------------------------------------ parsing inputs
def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def parse_schedule(name: str, text) -> object:
    """A STRING input holding a number or threestudio's schedule ``start_step,v0,v1,end_step`` → a float or
    ``[start, v0, v1, end]`` (the config's ``Scheduled``); anything else is an input error naming ``name``."""
    fix = "write a number such as 0.98, or start_step,v0,v1,end_step such as 5000,0.98,0.5,5001"
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [_number(p) for p in parts]
    except ValueError:
        raise input_error(name, f"{str(text)!r} is not a number or a schedule", fix) from None
    if len(values) == 1:
        return values[0]
    if len(values) != 4:
        raise input_error(name, f"{str(text)!r} has {len(values)} numbers (a schedule has 4)", fix)
    start, v0, v1, end = values
    if not (start.is_integer() and end.is_integer()):
        raise input_error(name, f"the steps of {str(text)!r} are not whole numbers", fix)
    return [int(start), v0, v1, int(end)]


def parse_resolution_schedule(name: str, text) -> tuple:
    """``"WIDTH@STEP, ..."`` → ``((width, ...), (step, ...))``; empty → ``((), ())``."""
    fix = "write comma-separated WIDTH@STEP entries such as 512@5000 (the render width becomes WIDTH at STEP), " \
          "or leave it empty for one resolution throughout"
    text = str(text).strip()
    if not text:
        return (), ()
    widths, steps = [], []
    for entry in text.split(","):
        width, at, step = entry.strip().partition("@")
        try:
            if not at:
                raise ValueError(entry)
            widths.append(int(width.strip()))
            steps.append(int(step.strip()))
        except ValueError:
            raise input_error(name, f"{entry.strip()!r} is not WIDTH@STEP", fix) from None
    if any(w < 1 for w in widths) or any(s < 1 for s in steps):
        raise input_error(name, f"{text!r} has a width or step below 1", fix)
    if any(a >= b for a, b in zip(steps, steps[1:])):
        raise input_error(name, f"the steps of {text!r} do not increase", fix)
    return tuple(widths), tuple(steps)


def make_config(kind, fields_to_inputs: dict, fix: str = "change it", **settings):
    """``kind(**settings)`` (a core config, which validates itself); its ``ValueError`` becomes an input error naming
    the node input behind the config field the message starts with (``fields_to_inputs``: field → input)."""
    try:
        return kind(**settings)
    except ValueError as e:
        raise config_error(e, fields_to_inputs, fix) from e


def config_error(error: ValueError, fields_to_inputs: dict, fix: str = "change it") -> ValueError:
    """A core config's ``ValueError`` as an input error naming the input behind the field it names (the longest
    field name the message starts with), else the error itself."""
    message = str(error)
    for field_name in sorted(fields_to_inputs, key=len, reverse=True):
        if message.startswith(field_name) or message.startswith(f"invalid setting: {field_name}"):
            return input_error(fields_to_inputs[field_name], message, fix)
    return error


def check_timestep_range(config, min_input: str = "min_step_percent", max_input: str = "max_step_percent") -> None:
    """0 <= min_step_percent <= max_step_percent <= 1 at every step of the stage (both are piecewise linear, so their
    break points, the first and the last step suffice); the sampler itself checks only when it draws."""
    from l2vsd_core.schedules import scheduled_value

    timesteps = config.distill.timesteps
    steps = {0, int(config.steps)}
    for value in (timesteps.min_step_percent, timesteps.max_step_percent):
        if isinstance(value, (list, tuple)):
            steps |= {int(value[0]), int(value[3])}
    for step in sorted(steps):
        lo = scheduled_value(timesteps.min_step_percent, step)
        hi = scheduled_value(timesteps.max_step_percent, step)
        if not 0.0 <= lo <= 1.0:
            raise input_error(min_input, f"is {lo:g} at step {step}", "keep it in [0, 1] (ProlificDreamer: 0.02)")
        if not 0.0 <= hi <= 1.0:
            raise input_error(max_input, f"is {hi:g} at step {step}", "keep it in [0, 1] (ProlificDreamer: 0.98, "
                                                                      "then 0.5)")
        if lo > hi:
            raise input_error(min_input, f"{lo:g} is above max_step_percent {hi:g} at step {step}",
                              "make min_step_percent <= max_step_percent at every step")


def check_pixel_factor(prior, sizes: dict) -> None:
    """Every render size (``{input name: [sizes]}``) a multiple of the prior's pixel factor (8 for SD's VAE)."""
    factor = int(getattr(prior, "vae_scale_factor", 1))
    for name, values in sizes.items():
        for size in values:
            if int(size) % factor:
                raise input_error(name, f"{size} is not a multiple of the prior's pixel factor {factor}",
                                  "use a multiple of it (toy prior: any; Stable Diffusion: 8, e.g. 64 or 512)")


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


# ------------------------------------------------------------------------------------------ previews for display
# What a node shows on the canvas is enlarged to at least this many pixels (its larger side): ComfyUI's frontend
# draws a batch of images at most at their own size, so a 32-px toy render would show as a 32-px speck. Only the
# displayed copies are enlarged; the IMAGE outputs keep the renders' own size.
DISPLAY_SIZE = 256


def display_factor(width: int, height: int, target: int = DISPLAY_SIZE) -> int:
    """The smallest whole factor that makes the larger side of a ``width`` × ``height`` image at least ``target``
    (1 for an image that large already)."""
    return max(1, math.ceil(target / max(1, int(width), int(height))))


def upscaled(image, target: int = DISPLAY_SIZE):
    """A PIL image enlarged by :func:`display_factor`, nearest-neighbour (each render pixel a sharp square)."""
    from PIL import Image

    factor = display_factor(image.width, image.height, target)
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def display_images(images, stem: str) -> list:
    """An IMAGE batch as the ``ui`` ``images`` entry ComfyUI shows on the node (as core PreviewImage's): one PNG per
    image in the temp folder, enlarged for display (:func:`upscaled`)."""
    import uuid

    folder = temp_directory()
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    shown = []
    for i, image in enumerate(images):
        name = f"{stem}_{token}_{i:03}.png"
        upscaled(to_pil(image)).save(folder / name, compress_level=1)
        shown.append({"filename": name, "subfolder": "", "type": "temp"})
    return shown


def display_animation(gif: Path, stem: str) -> dict:
    """The ``ui`` entries that show the animated GIF ``gif`` on the node, enlarged for display (:func:`upscaled`,
    each frame's duration kept): ``images`` (one animated WebP in the temp folder) and ``animated``, which makes the
    frontend play it rather than draw its first frame. WebP, as core SaveAnimatedWEBP writes: the current frontend
    (1.5x) plays an animated output that is not .webp or .png in a <video> element, which shows no GIF; the 2024
    frontend shows either in an <img>."""
    import uuid

    from PIL import Image, ImageSequence

    folder = temp_directory()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{stem}_{uuid.uuid4().hex[:12]}.webp"
    with Image.open(gif) as source:
        frames, durations = [], []
        for frame in ImageSequence.Iterator(source):
            frames.append(upscaled(frame.convert("RGB")))
            durations.append(int(frame.info.get("duration", source.info.get("duration", 100))))
    frames[0].save(folder / name, format="WEBP", save_all=True, append_images=frames[1:], duration=durations, loop=0,
                   lossless=True, method=0)
    return {"images": [{"filename": name, "subfolder": "", "type": "temp"}], "animated": (True,)}


def render_orbit(renderer, field, background, views: int, resolution: int, elevation: float, distance: float,
                 fovy: float, output: str = "rgb", device=None):
    """``views`` evenly spaced turntable renders [views, H, W, 3] (evaluation mode, no gradients) with anything that
    has the volume renderer's ``render_camera`` (a ``VolumeRenderer``, or a ``MeshRenderer`` bound to a mesh, whose
    ``field`` may then be None for a normal map: ``output="comp_normal"``)."""
    import torch
    from l2vsd_core.export import orbit_views

    device = device if device is not None else next(field.parameters()).device
    with eval_mode(field, background, renderer), torch.no_grad():
        frames = orbit_views(renderer, field, background, views, resolution, elevation, distance, fovy, output=output,
                             device=device)
    return to_image_batch(frames)


# ------------------------------------------------------------------------------------ inputs several nodes share
DEFAULT_MIN_STEP, DEFAULT_MAX_STEP = "0.02", "5000,0.98,0.5,5001"  # ProlificDreamer's timestep range, every stage
TIMESTEP_INPUTS = {
    "min_step_percent": ("STRING", {"default": DEFAULT_MIN_STEP,
                                    "tooltip": "Lower end of the diffusion timestep t / 1000: a number, or "
                                               "threestudio's start_step,v0,v1,end_step (ProlificDreamer: 0.02; "
                                               "HiFA: 0.3)."}),
    "max_step_percent": ("STRING", {"default": DEFAULT_MAX_STEP,
                                    "tooltip": "Upper end of t / 1000: a number, or start_step,v0,v1,end_step "
                                               "(ProlificDreamer: 5000,0.98,0.5,5001 = 0.98, then 0.5 from step "
                                               "5000; HiFA: 0.98)."}),
}
HIFA_INPUTS = {
    "sqrt_anneal": ("BOOLEAN", {"default": False,
                                "tooltip": "HiFA's timestep schedule: t falls deterministically from the upper to the "
                                           "lower end as 1 - sqrt(step / steps) (off: t drawn at random in the range, "
                                           "ProlificDreamer)."}),
    "lambda_image": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.001,
                               "tooltip": "Weight of HiFA's image-space loss (threestudio lambda_vsd_img; HiFA: 0.01; "
                                          "0 = off)."}),
}
