"""Load a diffusion prior from local files, strictly offline.

Formats
-------
* **diffusers folder** — ``model_index.json`` with subfolders ``unet``, ``text_encoder``, ``tokenizer``,
  ``scheduler`` and optionally ``vae`` (without it: a pixel-space prior).  SD 1.x / 2.x and look-alikes; the
  prediction type comes from ``scheduler/scheduler_config.json`` unless ``prediction_type`` overrides it.
* **single-file checkpoint** (ComfyUI's ``models/checkpoints``): an SD 1.x or SD 2.x ``.safetensors`` in the original
  LDM key layout (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``).  The model configs
  ship with this package under ``configs/sd15`` and ``configs/sd21`` (nothing is fetched); diffusers' own LDM→diffusers
  key converters (``diffusers.loaders.single_file_utils``) map the weights, and every component is loaded strictly
  (a missing or unexpected key is an error, not a silently random weight).
  SD 1 vs SD 2 is read from the cross-attention width (768 vs 1024) and confirmed by the text-encoder layout
  (``cond_stage_model.transformer`` = OpenAI CLIP vs ``cond_stage_model.model`` = OpenCLIP).  ε vs v: an explicit
  ``prediction_type`` wins; else a ``v_pred`` key in the file (ComfyUI writes one) means v; SD 1.x is ε; for SD 2.x the
  file does not say, so ComfyUI's heuristic decides (std of
  ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` > 0.09 → v, the 768-v models; else ε, the 512-base models),
  and a ``.ckpt`` whose ``global_step`` is 875000 (2.x-base) is ε as in diffusers.  Pass ``prediction_type`` when
  you know it.
* **pickled** ``.ckpt/.pt/.pth/.bin``: accepted only if ``torch.load(weights_only=True)`` can read it (plain tensors
  and containers); anything needing arbitrary unpickling is refused for safety — convert it to safetensors.

Tokenizer
---------
SD's tokenizer is OpenAI CLIP's BPE (49408 tokens).  This package ships ``configs/clip_tokenizer/vocab.json`` and
``merges.txt`` (≈1.5 MB), derived from OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence, see
``configs/clip_tokenizer/LICENSE``) exactly as ``clip.simple_tokenizer`` builds its tables; transformers'
``CLIPTokenizer`` reads them offline and produces the same ids as OpenAI's tokenizer.  SD 1.x pads with
``<|endoftext|>``, SD 2.x with ``!`` (id 0), as the official diffusers repos do (``configs/sd*/tokenizer``).
``tokenizer_dir`` overrides this with any local folder ``CLIPTokenizer.from_pretrained`` can read (e.g. ComfyUI's
``comfy/sd1_tokenizer``).  Diffusers folders use their own ``tokenizer`` subfolder.

Everything is read with ``local_files_only=True``; no code path here can reach the network.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Optional, Union

import torch

from .model import DiffusionPrior, check_prediction_type, resolve_device, resolve_dtype

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
CLIP_TOKENIZER_DIR = CONFIG_ROOT / "clip_tokenizer"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."     # SD 1.x: OpenAI CLIP ViT-L/14, HF key layout
OPEN_CLIP_PREFIX = "cond_stage_model.model."      # SD 2.x: OpenCLIP ViT-H/14
CROSS_ATTN_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
V_HEURISTIC_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
FAMILIES = {768: "sd15", 1024: "sd21"}

PathLike = Union[str, Path]


# Priors that ship with the pack, by name: ``load_prior("toy")``, ``generate --prior toy``, the LoadPrior node's list.
BUNDLED_PRIORS = {"toy": Path(__file__).resolve().parents[1] / "toys" / "world" / "prior"}


def resolve_prior_path(path: PathLike) -> Path:
    """A bundled prior's name (:data:`BUNDLED_PRIORS`) → its folder; any other path as given (``~`` expanded)."""
    if isinstance(path, str) and path in BUNDLED_PRIORS:
        return BUNDLED_PRIORS[path]
    return Path(path).expanduser()


def bundled_prior_name(path: PathLike) -> Optional[str]:
    """The name of the bundled prior at ``path`` (or named ``path``), else None."""
    if isinstance(path, str) and path in BUNDLED_PRIORS:
        return path
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, TypeError):
        return None
    return next((name for name, folder in BUNDLED_PRIORS.items() if folder.resolve() == resolved), None)


def load_prior(path: PathLike, device: Union[str, torch.device] = "auto", dtype: Union[str, torch.dtype] = "auto",
               prediction_type: Optional[str] = None, *, tokenizer_dir: Optional[PathLike] = None,
               config_dir: Optional[PathLike] = None) -> DiffusionPrior:
    """Load a frozen :class:`DiffusionPrior` from a diffusers folder or a single-file SD 1.x/2.x checkpoint, or
    the bundled prior by name (``"toy"``: the 32×32 toy world's, :data:`BUNDLED_PRIORS`).

    ``device``: ``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"``, …; ``dtype``: ``"auto"`` (fp16 on
    CUDA, fp32 on CPU), ``"fp32"``, ``"fp16"``, ``"bf16"``; ``prediction_type``: ``"epsilon"`` or
    ``"v_prediction"`` to override what the files say.  ``tokenizer_dir``: a local tokenizer folder to use instead of
    the model's (or the shipped CLIP BPE).  ``config_dir``: single files only — a diffusers-layout folder of configs
    (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``, optional ``tokenizer/``) to use instead of the shipped
    SD 1.5 / 2.1 ones (for fine-tunes with another architecture, and the tests' tiny models).
    See the module docstring for formats and rules.
    """
    if prediction_type is not None:
        check_prediction_type(prediction_type)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path = resolve_prior_path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no diffusion prior at {str(path)!r}: looked for a diffusers model folder (containing model_index.json) "
            f"or a checkpoint file ({', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}) at that path, and nothing "
            f"exists there")
    if path.is_dir():
        return _load_diffusers_folder(path, torch_device, torch_dtype, prediction_type, tokenizer_dir)
    state_dict = load_state_dict_file(path)
    return _load_single_file(path, state_dict, torch_device, torch_dtype, prediction_type, tokenizer_dir, config_dir)


# ----------------------------------------------------------------------------------------------- state-dict files
def load_state_dict_file(path: PathLike) -> dict:
    """Read a ``.safetensors`` file, or a pickled checkpoint that loads with ``weights_only=True``; refuse the rest."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError on a damaged header
            raise ValueError(f"{str(path)!r} is not a readable safetensors file ({exc})") from exc
    if suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError, ValueError) as exc:
            raise ValueError(
                f"{str(path)!r} is a pickled checkpoint that needs arbitrary code to load; it was refused for "
                f"safety (only weights-only pickles are read). Convert it to .safetensors (e.g. with ComfyUI's "
                f"checkpoint save node or safetensors.torch.save_file on a trusted machine) and load that. "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            inner = dict(obj["state_dict"])
            if "global_step" in obj and "global_step" not in inner:
                inner["global_step"] = obj["global_step"]
            obj = inner
        if not isinstance(obj, dict):
            raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict of tensors")
        return obj
    raise ValueError(f"{str(path)!r}: unsupported file type {suffix or '(no extension)'}; expected a diffusers folder, "
                     f"a .safetensors checkpoint, or a weights-only {'/'.join(PICKLE_SUFFIXES)}")


# ------------------------------------------------------------------------------------------------- diffusers folder
def _load_diffusers_folder(path: Path, device, dtype, prediction_type, tokenizer_dir) -> DiffusionPrior:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    index_file = path / "model_index.json"
    if not index_file.is_file():
        found = sorted(p.name for p in path.iterdir())[:12]
        hint = ""
        if any(p.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES for p in path.iterdir() if p.is_file()):
            hint = " It holds checkpoint files: pass the path of the .safetensors file itself."
        raise ValueError(f"{str(path)!r} is not a diffusers model folder: it has no model_index.json "
                         f"(found: {', '.join(found) or 'nothing'}).{hint}")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    if not (path / "unet").is_dir() or not index.get("unet"):
        what = "a transformer" if index.get("transformer") else "no unet"
        raise ValueError(f"{str(path)!r} is a diffusers folder ({index.get('_class_name', 'unknown pipeline')}) with "
                         f"{what}: only UNet-based text-to-image models (SD 1.x/2.x-like) can be a prior here; "
                         f"expected a 'unet' subfolder")
    for part in ("text_encoder", "tokenizer", "scheduler"):
        if part == "tokenizer" and tokenizer_dir is not None:
            continue
        if not (path / part).is_dir():
            raise ValueError(f"{str(path)!r} has no {part!r} subfolder; a text-conditioned prior needs unet, "
                             f"text_encoder, tokenizer and scheduler (vae optional)")
    unet_config = UNet2DConditionModel.load_config(str(path), subfolder="unet", local_files_only=True)
    if unet_config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{str(path / 'unet')!r} holds a {unet_config.get('_class_name')}, not a "
                         f"UNet2DConditionModel")
    _refuse_unsupported_unet(unet_config, str(path))

    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise ValueError(f"missing {str(scheduler_file)!r}: the noise schedule (betas) of the model")
    scheduler_config = json.loads(scheduler_file.read_text(encoding="utf-8"))

    unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", local_files_only=True,
                                                torch_dtype=dtype)
    vae = None
    if index.get("vae") and index["vae"][0] is not None and (path / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", local_files_only=True, torch_dtype=dtype)
    encoder_cls = _transformers_class(index.get("text_encoder"), "CLIPTextModel", transformers)
    text_encoder = encoder_cls.from_pretrained(str(path / "text_encoder"), local_files_only=True, dtype=dtype)
    if tokenizer_dir is not None:
        tokenizer = _tokenizer_from_dir(tokenizer_dir)
    else:
        tokenizer_cls = _transformers_class(index.get("tokenizer"), "CLIPTokenizer", transformers)
        tokenizer = tokenizer_cls.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    return DiffusionPrior(unet, scheduler_config, text_encoder, tokenizer, vae=vae, prediction_type=prediction_type,
                          device=device, dtype=dtype, name=path.name)


def _transformers_class(entry, default: str, transformers):
    name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] else default
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ValueError(f"model_index.json names {name!r}, which this transformers version does not provide")
    return cls


def _refuse_unsupported_unet(unet_config: dict, where: str) -> None:
    if unet_config.get("addition_embed_type") is not None:
        raise ValueError(f"{where}: the UNet needs added conditioning ({unet_config['addition_embed_type']!r}, "
                         f"e.g. SDXL); only SD 1.x/2.x-style priors are supported")


# ------------------------------------------------------------------------------------------------------ single file
def detect_family(state_dict: dict) -> str:
    """``"sd15"`` or ``"sd21"`` from an LDM-layout state dict; ValueError for anything else."""
    if not any(k.startswith(UNET_PREFIX) for k in state_dict):
        if any(k.startswith(("lora_", "lora.", "lora_unet_")) or ".lora_" in k for k in list(state_dict)[:2000]):
            kind = " It looks like a LoRA, not a full model."
        elif any(k.startswith(("encoder.", "decoder.")) for k in state_dict):
            kind = " It looks like a standalone VAE."
        else:
            kind = ""
        raise ValueError(f"not a Stable Diffusion checkpoint: no '{UNET_PREFIX}*' keys (the UNet in the original "
                         f"LDM layout).{kind}")
    if any(k.startswith("conditioner.embedders.") for k in state_dict) or UNET_PREFIX + "label_emb.0.0.weight" \
            in state_dict:
        raise ValueError("this is an SDXL-style checkpoint (conditioner.embedders / label_emb); only SD 1.x and 2.x "
                         "single files are supported")
    if CROSS_ATTN_KEY not in state_dict:
        raise ValueError(f"unrecognised UNet layout: missing {CROSS_ATTN_KEY!r}")
    width = int(state_dict[CROSS_ATTN_KEY].shape[1])
    family = FAMILIES.get(width)
    has_clip = any(k.startswith(CLIP_PREFIX) for k in state_dict)
    has_open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in state_dict)
    if family is None:
        raise ValueError(f"cross-attention width {width} is neither SD 1.x (768) nor SD 2.x (1024); pass config_dir= "
                         f"a diffusers-layout config folder matching this model")
    if (family == "sd15" and not has_clip) or (family == "sd21" and not has_open_clip):
        expected = CLIP_PREFIX if family == "sd15" else OPEN_CLIP_PREFIX
        raise ValueError(f"cross-attention width {width} means {family}, but the text encoder "
                         f"('{expected}*') is missing or of the other kind")
    return family


def infer_prediction_type(state_dict: dict, family: str, default: Optional[str] = None) -> str:
    """ε or v for a single file (see the module docstring)."""
    if "v_pred" in state_dict:
        return "v_prediction"
    if family == "sd15":
        return default or "epsilon"
    global_step = state_dict.get("global_step")
    if global_step is not None and int(torch.as_tensor(global_step).reshape(-1)[0]) == 875000:
        return "epsilon"
    if default is not None:
        return default
    bias = state_dict.get(V_HEURISTIC_KEY)
    if bias is not None and float(bias.float().std(unbiased=False)) > 0.09:
        return "v_prediction"
    return "epsilon"


def _load_single_file(path: Path, state_dict: dict, device, dtype, prediction_type, tokenizer_dir,
                      config_dir) -> DiffusionPrior:
    if config_dir is None:
        family = detect_family(state_dict)
        configs = CONFIG_ROOT / family
        config_default_pred = None
    else:
        configs = Path(config_dir).expanduser()
        for part, file in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                           ("scheduler", "scheduler_config.json")):
            if not (configs / part / file).is_file():
                raise FileNotFoundError(f"config_dir {str(configs)!r} lacks {part}/{file}; it must be a "
                                        f"diffusers-layout folder of configs (unet, vae, text_encoder, scheduler)")
        if not any(k.startswith(UNET_PREFIX) for k in state_dict):
            detect_family(state_dict)  # raises with the diagnosis
        family = "sd21" if any(k.startswith(OPEN_CLIP_PREFIX) for k in state_dict) else "sd15"
        config_default_pred = json.loads((configs / "scheduler" / "scheduler_config.json").read_text(
            encoding="utf-8")).get("prediction_type")
    if not any(k.startswith(VAE_PREFIX) for k in state_dict):
        raise ValueError(f"{str(path)!r} has no VAE weights ('{VAE_PREFIX}*'); only full SD checkpoints are supported")
    text_prefix = CLIP_PREFIX if family == "sd15" else OPEN_CLIP_PREFIX
    if not any(k.startswith(text_prefix) for k in state_dict):
        raise ValueError(f"{str(path)!r} has no text encoder weights ('{text_prefix}*'); only full SD checkpoints "
                         f"are supported")
    in_key = UNET_PREFIX + "input_blocks.0.0.weight"
    if in_key in state_dict and int(state_dict[in_key].shape[1]) != 4 and config_dir is None:
        raise ValueError(f"the UNet takes {int(state_dict[in_key].shape[1])} input channels (an inpainting or other "
                         f"special model); only 4-channel text-to-image checkpoints are supported")

    scheduler_config = json.loads((configs / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    if prediction_type is None:
        prediction_type = infer_prediction_type(state_dict, family, config_default_pred)
    unet, vae, text_encoder = build_components_from_ldm(state_dict, configs, family, dtype, str(path))
    if config_dir is None and family == "sd21":  # 2.x-v models are trained at 768², 2.x-base at 512²
        unet.register_to_config(sample_size=96 if prediction_type == "v_prediction" else 64)
    tokenizer = _tokenizer_from_dir(tokenizer_dir) if tokenizer_dir is not None else \
        _shipped_or_config_tokenizer(configs)
    return DiffusionPrior(unet, scheduler_config, text_encoder, tokenizer, vae=vae, prediction_type=prediction_type,
                          device=device, dtype=dtype, name=path.stem)


def build_components_from_ldm(state_dict: dict, configs: PathLike, family: str, dtype: torch.dtype = torch.float32,
                              where: str = "checkpoint"):
    """(unet, vae, text_encoder) from an LDM-layout state dict and a diffusers-layout config folder, each loaded
    strictly (every weight present, none left over, shapes equal).  ``family`` picks the text-encoder layout:
    ``"sd15"`` (OpenAI CLIP, HF keys) or ``"sd21"`` (OpenCLIP, penultimate layer).  Models are built on the meta
    device and take the checkpoint's tensors (cast to ``dtype``), so nothing is randomly initialised first."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = str(configs)
    unet_config = UNet2DConditionModel.load_config(configs, subfolder="unet", local_files_only=True)
    _refuse_unsupported_unet(unet_config, where)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    _load_strict(unet, convert_ldm_unet_checkpoint(state_dict, unet.config), "UNet", where, dtype)

    vae_config = AutoencoderKL.load_config(configs, subfolder="vae", local_files_only=True)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
    _load_strict(vae, convert_ldm_vae_checkpoint(state_dict, vae.config), "VAE", where, dtype)

    text_config = CLIPTextConfig.from_pretrained(str(Path(configs) / "text_encoder"), local_files_only=True)
    with torch.device("meta"):
        text_encoder = CLIPTextModel(text_config)
    if family == "sd15":
        text_sd = convert_ldm_clip_checkpoint(state_dict)
    else:
        text_sd = convert_open_clip_checkpoint(text_encoder, state_dict, prefix=OPEN_CLIP_PREFIX)
        # SD 2.x uses OpenCLIP's penultimate layer: the diffusers text encoder has one layer less than the file.
        n_layers = text_config.num_hidden_layers
        text_sd = {k: v for k, v in text_sd.items()
                   if not (".layers." in k and int(k.split(".layers.")[1].split(".")[0]) >= n_layers)}
    own = set(text_encoder.state_dict())
    text_sd = {_strip_text_model(k, own): v for k, v in text_sd.items()}
    # position_ids is a constant buffer; some merged SD 1.x checkpoints carry a corrupted (float) copy of it.
    text_sd = {k: v for k, v in text_sd.items() if not k.endswith("position_ids") and not k.endswith("logit_scale")
               and not k.startswith(("text_projection", "visual"))}
    _load_strict(text_encoder, text_sd, "text encoder", where, dtype)
    _materialize_position_ids(text_encoder)
    for module in (unet, vae, text_encoder):
        module.eval()
    return unet, vae, text_encoder


def _strip_text_model(key: str, own: set) -> str:
    if key in own:
        return key
    if key.startswith("text_model.") and key[len("text_model."):] in own:
        return key[len("text_model."):]
    if "text_model." + key in own:
        return "text_model." + key
    return key


def _load_strict(module: torch.nn.Module, converted: dict, what: str, where: str, dtype: torch.dtype) -> None:
    expected = set(module.state_dict())
    missing = sorted(expected - set(converted))
    unexpected = sorted(set(converted) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{where}: the {what} weights do not match the {what} config ({len(missing)} missing, "
            f"{len(unexpected)} unexpected; e.g. missing {missing[:3]}, unexpected {unexpected[:3]}). The file is "
            f"not a standard SD 1.x/2.x checkpoint, or needs config_dir= with matching configs")
    wrong = [(k, tuple(v.shape), tuple(module.state_dict()[k].shape)) for k, v in converted.items()
             if tuple(v.shape) != tuple(module.state_dict()[k].shape)]
    if wrong:
        raise ValueError(f"{where}: {len(wrong)} {what} tensors have the wrong shape for the config, e.g. "
                         f"{wrong[0][0]} is {wrong[0][1]}, expected {wrong[0][2]}")
    module.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in converted.items()},
                           strict=True, assign=True)
    if any(v.is_meta for v in converted.values()):  # a shape-only dry run (tests of the shipped configs)
        return
    leftover = [n for n, t in module.state_dict().items() if t.is_meta]
    if leftover:
        raise ValueError(f"{what}: tensors left uninitialised after loading: {leftover[:5]}")


def _materialize_position_ids(text_encoder) -> None:
    for name, buf in list(text_encoder.named_buffers()):
        if name.endswith("position_ids") and buf.is_meta:
            owner = text_encoder.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape).clone(),
                                  persistent=False)
    leftover = [n for n, t in text_encoder.named_buffers() if t.is_meta]
    if leftover:
        raise ValueError(f"text encoder: buffers left uninitialised after loading: {leftover[:5]}")


# -------------------------------------------------------------------------------------------------------- tokenizer
def _tokenizer_from_dir(tokenizer_dir: PathLike):
    from transformers import CLIPTokenizer

    tokenizer_dir = Path(tokenizer_dir).expanduser()
    complete = (tokenizer_dir / "tokenizer.json").is_file() or (
        (tokenizer_dir / "vocab.json").is_file() and (tokenizer_dir / "merges.txt").is_file())
    if not complete:
        raise FileNotFoundError(f"tokenizer_dir {str(tokenizer_dir)!r} must contain tokenizer.json, or vocab.json and "
                                f"merges.txt (a CLIP BPE tokenizer, e.g. ComfyUI's comfy/sd1_tokenizer)")
    return CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def _shipped_or_config_tokenizer(configs: Path):
    """The CLIP BPE tokenizer: ``configs/tokenizer`` if it is a complete tokenizer folder (tokenizer.json, or
    vocab.json + merges.txt), else the shipped
    vocab/merges with ``configs/tokenizer/tokenizer_config.json``'s special tokens (SD 1.x defaults if absent)."""
    from transformers import CLIPTokenizer

    folder = configs / "tokenizer"
    if (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                  and (folder / "merges.txt").is_file()):
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    settings = {}
    if (folder / "tokenizer_config.json").is_file():
        settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    kwargs = {k: settings[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length")
              if k in settings}
    kwargs.setdefault("model_max_length", 77)
    # positional: the first two parameters are vocab_file/merges_file in transformers 4.x, vocab/merges in 5.x
    return CLIPTokenizer(str(CLIP_TOKENIZER_DIR / "vocab.json"), str(CLIP_TOKENIZER_DIR / "merges.txt"),
                         **kwargs)
