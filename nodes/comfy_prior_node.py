"""PriorFromCheckpoint: the prior built from ComfyUI's own MODEL, CLIP and VAE sockets.

A user's graph already loads checkpoints (core Load Checkpoint, UNet/CLIP/VAE loaders, merges, LoRA loaders …). This
node takes the weights from those objects — with every LoRA / merge patch of the ModelPatchers applied — and builds
the same ``l2vsd_core.prior.DiffusionPrior`` that LoadPrior builds from a file, without reading anything from disk.

How the weights are taken (the facts are ComfyUI's; the code is ours):

* ``MODEL`` and ``CLIP`` are ModelPatchers: the base weights plus a list of patches that ComfyUI applies only while
  the model is "loaded" (``comfy.model_management.load_models_gpu``), and undoes when it unloads it. This node
  loads a temporary *clone* of each patcher whose load device is the CPU — ComfyUI then applies all the patches
  fully, on the CPU (no partial/low-VRAM load, no GPU memory), takes care of any other clone of the same weights
  that was loaded — copies the weights, and unloads the clone through model management again, which restores the
  unpatched weights. The user's objects are left as they were.
* The weights are put into the single-file checkpoint layout by ComfyUI's own model config
  (``process_*_state_dict_for_saving``, what its checkpoint save uses), then converted by the same code as a
  ``.safetensors`` file (``l2vsd_core.prior.load_prior_from_state_dict``).
* The family (SD 1.x / 2.x) is ComfyUI's detected model type; ε or v and the noise schedule are read from the model's
  sampling object (so a ModelSamplingDiscrete patch counts); CLIP Set Last Layer's choice becomes the text encoder's
  depth; the tokenizer is the shipped CLIP BPE.

Memory: this node never moves ComfyUI's copies to the GPU (one left there by an earlier sampler is moved off when the
clone unloads); before our prior goes there, ComfyUI is asked to unload what it keeps on the GPU (as LoadPrior does). The prior is a second copy in RAM/VRAM next to ComfyUI's (which belongs to the graph).
``load_again`` (a separate LoRA base) rebuilds from the same ComfyUI objects: nothing is kept besides references.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

from .common import CATEGORY_MODEL, PRIOR_TYPE, check_choice, input_error
from .model_nodes import DEVICES, DTYPES, LoadedPrior, _make_room_on_the_gpu

# ComfyUI's detected model types (comfy.supported_models) that are a prior here, and our family of each.
FAMILIES = {"SD15": "sd15", "SD20": "sd21"}
FAMILY_NAMES = {"sd15": "SD 1.x", "sd21": "SD 2.x"}
# The text encoder each family's CLIP holds (the prefix of its state dict in ComfyUI) and the layer it runs by
# default (SD 1.x: the last; SD 2.x: the penultimate).
CLIP_PREFIXES = {"sd15": "clip_l.", "sd21": "clip_h."}
DEFAULT_CLIP_LAYER = {"sd15": -1, "sd21": -2}
# ComfyUI sampling classes (model_sampling's MRO) that are not the discrete ε/v DDPM schedule of SD 1.x/2.x.
UNSUPPORTED_SAMPLING = ("EDM", "X0", "LCM", "CONST", "IMG_TO_IMG", "COSMOS_RFLOW", "ModelSamplingDiscreteDistilled",
                        "ModelSamplingContinuousEDM", "ModelSamplingContinuousV", "ModelSamplingDiscreteFlow",
                        "ModelSamplingFlux", "StableCascadeSampling")
LOG = logging.getLogger(__name__)
MODEL_FIX = ("connect a Stable Diffusion 1.x or 2.x model (ComfyUI type SD15 or SD20, e.g. from Load Checkpoint); "
             "SDXL, SD3, Flux and other families cannot be the prior")


@dataclass
class ComfyModelsPrior(LoadedPrior):
    """An L2VSD_PRIOR built from ComfyUI objects: ``load_again`` rebuilds it from them (no file to read)."""
    rebuild: Optional[Callable] = field(default=None, repr=False, compare=False)

    def load_again(self):
        return self.rebuild()


@dataclass
class ComfyWeights:
    """A model's weights taken from ComfyUI, in the single-file LDM layout (CPU copies), and its settings."""
    state_dict: dict
    family: str
    model_type: str          # ComfyUI's detected type (SD15, SD20)
    prediction_type: str
    alphas_cumprod: object   # torch tensor [T]
    text_layers: Optional[int]
    patched: dict            # {"unet": n, "clip": n}: how many weights carry patches


class PriorFromCheckpoint:
    """Build the prior from the MODEL, CLIP and VAE of the user's own loaders (LoRAs and merges applied)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD 1.x/2.x diffusion model, e.g. from Load Checkpoint; LoRA, merge "
                                           "and ModelSamplingDiscrete patches on it are used."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder (LoRA patches and CLIP Set Last Layer are used)."}),
            "vae": ("VAE", {"tooltip": "Its VAE."}),
            "dtype": (list(DTYPES), {"default": "auto",
                                     "tooltip": "Precision of the prior's weights; auto = fp16 on CUDA, fp32 on the "
                                                "CPU."}),
            "device": (list(DEVICES), {"default": "auto",
                                       "tooltip": "Where the prior runs; auto = CUDA when available, else the CPU."}),
        }}

    RETURN_TYPES = (PRIOR_TYPE,)
    RETURN_NAMES = ("prior",)
    OUTPUT_TOOLTIPS = ("The frozen diffusion prior built from these MODEL/CLIP/VAE weights (patches applied): into "
                       "L2VSD Attach LoRA Score and the prior input of Optimize / Refine, like Load Prior's.",)
    FUNCTION = "build"
    CATEGORY = CATEGORY_MODEL
    DESCRIPTION = ("The diffusion prior from ComfyUI's MODEL, CLIP and VAE (Load Checkpoint, LoRA loaders, merges): "
                   "the same prior as Load Prior on that checkpoint, with the patches applied; nothing is read from "
                   "disk.")

    def build(self, model, clip, vae, dtype, device):
        check_choice("dtype", dtype, DTYPES)
        check_choice("device", device, DEVICES)
        if device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise input_error("device", "cuda was asked for but torch sees no CUDA device", "pick 'auto' or 'cpu'")
        info = {}

        def make():
            prior, taken = build_prior(model, clip, vae, device, dtype)
            info.update(model_type=taken.model_type, patched=taken.patched)
            return prior

        prior = make()
        source = (f"ComfyUI {info['model_type']} MODEL/CLIP/VAE ({info['patched']['unet']} UNet and "
                  f"{info['patched']['clip']} text-encoder weights patched)")
        return (ComfyModelsPrior(prior=prior, source=source, device=device, dtype=dtype, rebuild=make),)


def build_prior(model, clip, vae, device: str, dtype: str):
    """(the DiffusionPrior, the ComfyWeights it was built from); input errors for what cannot be a prior."""
    import torch
    from l2vsd_core.prior import load_prior_from_state_dict, scheduler_config_from_alphas_cumprod
    from l2vsd_core.prior.load import shipped_scheduler_config

    taken = take_weights(model, clip, vae)
    _make_room_on_the_gpu(device)
    try:
        scheduler = scheduler_config_from_alphas_cumprod(taken.alphas_cumprod, shipped_scheduler_config(taken.family))
    except ValueError as e:
        raise input_error("model", f"its sampling schedule cannot be used ({e})", MODEL_FIX) from e
    try:
        # weights made under ComfyUI's inference mode could not be saved for the backward pass of the LoRA training
        with torch.inference_mode(False):
            prior = load_prior_from_state_dict(
                taken.state_dict, device=device, dtype=dtype, prediction_type=taken.prediction_type,
                name=f"comfyui-{taken.model_type}", where=f"ComfyUI's {taken.model_type} MODEL/CLIP/VAE",
                scheduler_config=scheduler, text_layers=taken.text_layers)
    except ValueError as e:
        text = str(e)
        socket = "vae" if "VAE" in text else "clip" if "text encoder" in text or "text_layers" in text else "model"
        raise input_error(socket, text, "connect the MODEL, CLIP and VAE of one SD 1.x/2.x checkpoint") from e
    return prior, taken


# ------------------------------------------------------------------------------------------------ from ComfyUI
def take_weights(model, clip, vae) -> ComfyWeights:
    """The patched weights of ``model`` (a ModelPatcher), ``clip`` (comfy.sd.CLIP) and ``vae`` (comfy.sd.VAE) as CPU
    copies in the single-file LDM layout, with the family, prediction type, schedule and text depth."""
    family, model_type, config = _family(model)
    clip_model = getattr(clip, "cond_stage_model", None)
    if clip_model is None or not hasattr(clip, "patcher"):
        raise input_error("clip", f"got {type(clip).__name__}", "connect the CLIP output of a loader")
    if getattr(vae, "first_stage_model", None) is None or not hasattr(vae, "get_sd"):
        raise input_error("vae", f"got {type(vae).__name__}", "connect the VAE output of a loader")
    _check_clip(clip_model, family)
    if getattr(config, "scaled_fp8", None) is not None:
        raise input_error("model", "its weights are stored as scaled fp8", "load the checkpoint without fp8 weight "
                                                                            "options")
    prediction_type, alphas = _sampling(model)
    text_layers = _text_layers(clip, clip_model.state_dict(), family)
    left_out = runtime_patches(model)
    if left_out:
        LOG.warning("L2VSD Prior from Model/CLIP/VAE: the MODEL's sampling-time patches are not part of the prior "
                    "(only weight patches such as LoRAs and merges are): %s", ", ".join(left_out))

    unet_sd = _patched_weights(model, "diffusion_model.")
    clip_sd = _patched_weights(clip.patcher, "")
    vae_sd = _cpu_copies(vae.get_sd())
    state_dict = {}
    # ComfyUI's own conversion to the checkpoint layout (prefixes; SD 2.x text encoder back to OpenCLIP's layout)
    state_dict.update(config.process_unet_state_dict_for_saving(unet_sd))
    state_dict.update(config.process_clip_state_dict_for_saving(clip_sd))
    state_dict.update(config.process_vae_state_dict_for_saving(vae_sd))
    meta = [k for k, v in state_dict.items() if getattr(v, "is_meta", False)]
    if meta:
        raise input_error("model", f"ComfyUI holds no data for {len(meta)} weights (e.g. {meta[0]})",
                          "load the checkpoint with a core loader")
    return ComfyWeights(state_dict=state_dict, family=family, model_type=model_type, prediction_type=prediction_type,
                        alphas_cumprod=alphas, text_layers=text_layers,
                        patched={"unet": _patch_count(model, "diffusion_model."), "clip": _patch_count(clip.patcher)})


def runtime_patches(model) -> list:
    """What the MODEL changes only while ComfyUI samples (FreeU, attention patches, IP-Adapter, CFG functions …): the
    names of its ``model_options`` patches, which a prior built from its weights does not have."""
    options = getattr(model, "model_options", None) or {}
    transformer = options.get("transformer_options") or {}
    found = [name for key in ("patches", "patches_replace") for name, value in (transformer.get(key) or {}).items()
             if value]
    found += [key for key in ("model_function_wrapper", "sampler_cfg_function", "sampler_pre_cfg_function",
                              "sampler_post_cfg_function") if options.get(key)]
    return found


def _family(model):
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    if config is None:
        raise input_error("model", f"got {type(model).__name__}, not a ComfyUI diffusion model",
                          "connect the MODEL output of a loader such as Load Checkpoint")
    model_type = type(config).__name__
    family = FAMILIES.get(model_type)
    if family is None:
        raise input_error("model", f"ComfyUI detected this model as {model_type}", MODEL_FIX)
    return family, model_type, config


def _check_clip(clip_model, family: str) -> None:
    towers = sorted({k.split(".", 1)[0] + "." for k in clip_model.state_dict()
                     if k.split(".", 1)[0].startswith(("clip_", "t5", "llama", "qwen", "gemma", "umt5"))})
    expected = CLIP_PREFIXES[family]
    if towers != [expected]:
        found = ", ".join(t.rstrip(".") for t in towers) or type(clip_model).__name__
        raise input_error("clip", f"this CLIP holds {found}; the {FAMILY_NAMES[family]} MODEL needs its own "
                                  f"{expected.rstrip('.')} text encoder",
                          "connect the CLIP of the same checkpoint as the MODEL")


def _model_object(patcher, name: str):
    """A model attribute as the patcher would run it: its own object patch, else the unpatched original (a loaded
    clone may have swapped its patch in), else the model's."""
    if name in getattr(patcher, "object_patches", {}):
        return patcher.object_patches[name]
    backup = getattr(patcher, "object_patches_backup", {}) or {}
    if name in backup:
        return backup[name]
    return getattr(patcher.model, name)


def _sampling(model):
    """(prediction type, ᾱ_t) of the model's sampling object (ModelSamplingDiscrete patches included)."""
    import torch

    sampling = _model_object(model, "model_sampling")
    names = [c.__name__ for c in type(sampling).__mro__]
    unsupported = [n for n in names if n in UNSUPPORTED_SAMPLING]
    if unsupported or "ModelSamplingDiscrete" not in names:
        kind = unsupported[0] if unsupported else type(sampling).__name__
        raise input_error("model", f"it samples with {kind}; the prior needs the discrete ε- or v-prediction schedule "
                                   f"of SD 1.x/2.x", "remove the model-sampling patch (or use eps / v_prediction)")
    prediction_type = "v_prediction" if "V_PREDICTION" in names else "epsilon" if "EPS" in names else None
    if prediction_type is None:
        raise input_error("model", f"unknown prediction type of {type(sampling).__name__}", MODEL_FIX)
    with torch.inference_mode(False):
        sigmas = sampling.sigmas.detach().to("cpu", torch.float64)
        alphas = 1.0 / (1.0 + sigmas ** 2)
    return prediction_type, alphas


def _patched_weights(patcher, prefix: str) -> dict:
    """``patcher``'s weights under ``prefix`` (prefix removed) with all its patches applied, as CPU copies.

    A clone of the patcher that loads on the CPU goes through ComfyUI's model management: it unloads (or takes over)
    other loaded clones of the same weights and patches every weight, fully; after the copy, the clone is unloaded,
    which restores the original weights."""
    import torch
    import comfy.model_management as model_management

    clone = patcher.clone()
    clone.load_device = torch.device("cpu")
    options = inspect.signature(model_management.load_models_gpu).parameters
    kwargs = {name: True for name in ("force_patch_weights", "force_full_load") if name in options}
    model_management.load_models_gpu([clone], **kwargs)
    try:
        weights = {k[len(prefix):]: v for k, v in clone.model_state_dict().items() if k.startswith(prefix)}
        if getattr(clone.model, "model_lowvram", False) or getattr(clone, "model_lowvram", False):
            raise input_error("model", "ComfyUI loaded it only partially, so its patches are not all applied",
                              "free memory (or restart ComfyUI) and run again")
        return _cpu_copies(weights)
    finally:
        _unload(clone)


def _unload(clone) -> None:
    import comfy.model_management as model_management

    for loaded in list(model_management.current_loaded_models):
        if loaded.model is clone:
            model_management.current_loaded_models.remove(loaded)
            loaded.model_unload()


def _cpu_copies(state_dict: dict) -> dict:
    """Copies on the CPU, made outside inference mode (ComfyUI's tensors are inference tensors)."""
    import torch

    with torch.inference_mode(False):
        return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def _patch_count(patcher, prefix: str = "") -> int:
    return sum(1 for k in getattr(patcher, "patches", {}) if isinstance(k, str) and k.startswith(prefix))


def _text_layers(clip, clip_sd: dict, family: str) -> Optional[int]:
    """How many text-encoder layers run: CLIP Set Last Layer's choice, else the family's; None = the default.
    ``clip_sd``: the CLIP model's state dict (only its key names are read)."""
    prefix = CLIP_PREFIXES[family] + "transformer.text_model.encoder.layers."
    total = len({k[len(prefix):].split(".")[0] for k in clip_sd if k.startswith(prefix)})
    layer = getattr(clip, "layer_idx", None)
    if layer is None:  # ComfyUI: no choice = the model's default layer; out of range = the last layer
        layer = DEFAULT_CLIP_LAYER[family]
    elif abs(layer) > total:
        layer = -1
    layers = layer + 1 if layer >= 0 else total + layer + 1
    default = total + DEFAULT_CLIP_LAYER[family] + 1
    return None if layers == default else layers
