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
  (a missing or unexpected key is an error, not a silently random weight).  The UNet's architecture (levels, channels,
  blocks per level, attention depth, projection kind) is read from the weights on top of the shipped config, as
  ComfyUI's model detection does: the published layouts give the shipped configs unchanged, and shallower SD-shaped
  UNets load too.  ``load_prior_from_state_dict`` converts such weights already in memory (e.g. taken from ComfyUI's
  loaded models, with a schedule and CLIP skip of the caller's).
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
    return load_prior_from_state_dict(state_dict, device, dtype, prediction_type, name=path.stem, where=str(path),
                                      tokenizer_dir=tokenizer_dir, config_dir=config_dir)


def load_prior_from_state_dict(state_dict: dict, device: Union[str, torch.device] = "auto",
                               dtype: Union[str, torch.dtype] = "auto", prediction_type: Optional[str] = None, *,
                               name: str = "checkpoint", where: Optional[str] = None,
                               tokenizer_dir: Optional[PathLike] = None, config_dir: Optional[PathLike] = None,
                               scheduler_config: Optional[dict] = None,
                               text_layers: Optional[int] = None) -> DiffusionPrior:
    """A :class:`DiffusionPrior` from an in-memory state dict in the single-file LDM layout (what an SD 1.x/2.x
    ``.safetensors`` holds, and what ComfyUI's checkpoint save writes): the conversion :func:`load_prior` applies to
    such a file, without the file.  The dict is read, not changed; its tensors may end up shared with the prior's
    modules (same device and dtype), so pass copies that nothing else writes to.

    ``name``: the prior's name; ``where``: how errors name the source (default ``name``).  Without ``config_dir``
    the UNet's architecture (levels, channels, blocks per level, attention) is read from the weights on top of the
    family's shipped config, so shallower or narrower SD-shaped UNets load too.  ``scheduler_config``: the noise
    schedule to use instead of the family's (e.g. :func:`scheduler_config_from_alphas_cumprod` of the schedule a
    host application samples with).  ``text_layers``: how many text-encoder layers to run (CLIP skip: SD 1.x's
    12 - 1 for "the penultimate layer"; default: the family's, 12 for SD 1.x and 23 for SD 2.x).  Other arguments
    as for :func:`load_prior`."""
    if prediction_type is not None:
        check_prediction_type(prediction_type)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    where = where or name
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
        raise ValueError(f"{where!r} has no VAE weights ('{VAE_PREFIX}*'); only full SD checkpoints are supported")
    text_prefix = CLIP_PREFIX if family == "sd15" else OPEN_CLIP_PREFIX
    if not any(k.startswith(text_prefix) for k in state_dict):
        raise ValueError(f"{where!r} has no text encoder weights ('{text_prefix}*'); only full SD checkpoints "
                         f"are supported")
    in_key = UNET_PREFIX + "input_blocks.0.0.weight"
    if in_key in state_dict and int(state_dict[in_key].shape[1]) != 4 and config_dir is None:
        raise ValueError(f"the UNet takes {int(state_dict[in_key].shape[1])} input channels (an inpainting or other "
                         f"special model); only 4-channel text-to-image checkpoints are supported")

    if scheduler_config is None:
        scheduler_config = json.loads((configs / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    if prediction_type is None:
        prediction_type = infer_prediction_type(state_dict, family, config_default_pred)
    unet_config = None
    if config_dir is None:
        from diffusers import UNet2DConditionModel
        unet_config = infer_unet_config(
            state_dict, UNet2DConditionModel.load_config(str(configs), subfolder="unet", local_files_only=True), where)
    unet, vae, text_encoder = build_components_from_ldm(state_dict, configs, family, dtype, where,
                                                        unet_config=unet_config, text_layers=text_layers)
    if config_dir is None and family == "sd21":  # 2.x-v models are trained at 768², 2.x-base at 512²
        unet.register_to_config(sample_size=96 if prediction_type == "v_prediction" else 64)
    tokenizer = _tokenizer_from_dir(tokenizer_dir) if tokenizer_dir is not None else \
        _shipped_or_config_tokenizer(configs)
    return DiffusionPrior(unet, scheduler_config, text_encoder, tokenizer, vae=vae, prediction_type=prediction_type,
                          device=device, dtype=dtype, name=name)


def shipped_scheduler_config(family: str) -> dict:
    """The noise schedule (a diffusers scheduler config) shipped for ``family``: ``"sd15"`` or ``"sd21"``."""
    if family not in FAMILIES.values():
        raise ValueError(f"family must be one of {', '.join(FAMILIES.values())}; got {family!r}")
    return json.loads((CONFIG_ROOT / family / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))


def scheduler_config_from_alphas_cumprod(alphas_cumprod, base: dict, rtol: float = 1e-4) -> dict:
    """A scheduler config whose ᾱ_t is ``alphas_cumprod`` (T values): ``base`` itself when its own schedule gives
    the same ᾱ (within ``rtol``; the usual case), else ``base`` with ``trained_betas``
    (β_t = 1 - ᾱ_t / ᾱ_{t-1}), e.g. for a zero-terminal-SNR rescaled schedule."""
    from .model import alphas_cumprod_from_scheduler_config

    alphas = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
    valid = alphas.numel() >= 2 and bool(((alphas > 0) & (alphas <= 1)).all()) and \
        bool((alphas[1:] <= alphas[:-1]).all())
    if not valid:
        raise ValueError(f"not a diffusion schedule: ᾱ must decrease within (0, 1] over at least 2 steps; got "
                         f"{alphas.numel()} values from {float(alphas[0]) if alphas.numel() else 'none'}")
    own = alphas_cumprod_from_scheduler_config(base).double()
    if own.shape == alphas.shape and torch.allclose(own, alphas, rtol=rtol, atol=0.0):
        return dict(base)
    betas = 1.0 - alphas / torch.cat([torch.ones(1, dtype=alphas.dtype), alphas[:-1]])
    config = {k: v for k, v in base.items() if k not in ("beta_start", "beta_end", "beta_schedule",
                                                         "rescale_betas_zero_snr")}
    config.update(num_train_timesteps=int(alphas.numel()), trained_betas=[float(b) for b in betas])
    return config


def infer_unet_config(state_dict: dict, base: dict, where: str = "checkpoint") -> dict:
    """``base`` (a diffusers ``UNet2DConditionModel`` config, e.g. the family's shipped one) with the architecture
    read from an LDM-layout UNet (``model.diffusion_model.*``): input/output channels, the channels and number of
    residual blocks of each level, which levels have cross-attention and how deep, the cross-attention width and
    projection kind.  For the published SD 1.x/2.x layouts this is ``base`` unchanged; a shallower SD-shaped UNet
    (fewer levels or blocks, as ComfyUI's model detection also accepts) gets its own values.  Heads: a per-level
    list in ``base`` (SD 2.x: fixed 64 channels per head) is recomputed for the new levels; a single number (SD 1.x:
    8 heads) is kept."""
    p = UNET_PREFIX
    conv_in = state_dict.get(p + "input_blocks.0.0.weight")
    if conv_in is None:
        raise ValueError(f"{where}: unrecognised UNet layout: missing {p + 'input_blocks.0.0.weight'!r}")
    indices = sorted({int(k[len(p + "input_blocks."):].split(".")[0]) for k in state_dict
                      if k.startswith(p + "input_blocks.")})
    levels: list[list] = [[]]  # per level: (channels, transformer depth) of each residual block
    for i in indices[1:]:
        block = f"{p}input_blocks.{i}."
        if block + "0.op.weight" in state_dict:
            levels.append([])
        elif block + "0.out_layers.3.weight" in state_dict:
            levels[-1].append((int(state_dict[block + "0.out_layers.3.weight"].shape[0]),
                               _transformer_depth(state_dict, block + "1.")))
        else:
            raise ValueError(f"{where}: unrecognised UNet layout: input block {i} is neither a residual block nor a "
                             f"downsampler")
    if any(not level for level in levels):
        raise ValueError(f"{where}: unrecognised UNet layout: a level without residual blocks")
    counts = {len(level) for level in levels}
    if len(counts) != 1:
        raise ValueError(f"{where}: the UNet's levels have different numbers of residual blocks "
                         f"({[len(level) for level in levels]}); only a uniform layers_per_block is supported")
    channels, depths = [], []
    for n, level in enumerate(levels):
        if len({c for c, _ in level}) != 1 or len({d for _, d in level}) != 1:
            raise ValueError(f"{where}: the residual blocks of UNet level {n} differ in width or attention: {level}")
        channels.append(level[0][0])
        depths.append(level[0][1])
    mid_depth = _transformer_depth(state_dict, p + "middle_block.1.")
    if mid_depth == 0:
        raise ValueError(f"{where}: the UNet's middle block has no cross-attention; only SD-style UNets (a "
                         f"transformer in the middle block) are supported")
    attention = [d for d in depths if d > 0] + [mid_depth]
    first = next((f"{p}{block}.1." for block in [f"input_blocks.{i}" for i in indices] + ["middle_block"]
                  if f"{p}{block}.1.proj_in.weight" in state_dict), None)
    config = dict(base)
    config.update(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(state_dict[p + "out.2.weight"].shape[0]) if p + "out.2.weight" in state_dict
        else int(conv_in.shape[1]),
        block_out_channels=list(channels), layers_per_block=counts.pop(),
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        cross_attention_dim=int(state_dict[first + "transformer_blocks.0.attn2.to_k.weight"].shape[1]),
        use_linear_projection=state_dict[first + "proj_in.weight"].dim() == 2)
    if set(attention) != {1}:
        # diffusers: one depth per level (up blocks mirrored); the middle block takes the last level's
        if depths[-1] and depths[-1] != mid_depth:
            raise ValueError(f"{where}: the UNet's middle block has {mid_depth} transformer layers and its last level "
                             f"{depths[-1]}; only equal depths are supported")
        config["transformer_layers_per_block"] = [d or 1 for d in depths[:-1]] + [depths[-1] or mid_depth]
    heads = base.get("attention_head_dim")
    if isinstance(heads, (list, tuple)) and list(channels) != list(base.get("block_out_channels", [])):
        per_head = int(base["block_out_channels"][0]) // int(heads[0])
        config["attention_head_dim"] = [max(1, c // per_head) for c in channels]
    return config


def _transformer_depth(state_dict: dict, prefix: str) -> int:
    """How many ``transformer_blocks`` the spatial transformer at ``prefix`` (``….1.``) has; 0 if none."""
    if prefix + "proj_in.weight" not in state_dict:
        return 0
    depth = 0
    while f"{prefix}transformer_blocks.{depth}.attn2.to_k.weight" in state_dict:
        depth += 1
    return depth


def build_components_from_ldm(state_dict: dict, configs: PathLike, family: str, dtype: torch.dtype = torch.float32,
                              where: str = "checkpoint", *, unet_config: Optional[dict] = None,
                              text_layers: Optional[int] = None):
    """(unet, vae, text_encoder) from an LDM-layout state dict and a diffusers-layout config folder, each loaded
    strictly (every weight present, none left over, shapes equal).  ``family`` picks the text-encoder layout:
    ``"sd15"`` (OpenAI CLIP, HF keys) or ``"sd21"`` (OpenCLIP, penultimate layer).  Models are built on the meta
    device and take the checkpoint's tensors (cast to ``dtype``), so nothing is randomly initialised first.
    ``unet_config``: the UNet's config instead of ``configs/unet`` (see :func:`infer_unet_config`);
    ``text_layers``: how many text-encoder layers to keep instead of the config's (CLIP skip)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = str(configs)
    if unet_config is None:
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
    if text_layers is not None:
        _check_text_layers(state_dict, family, int(text_layers), where)
        text_config.num_hidden_layers = int(text_layers)
    with torch.device("meta"):
        text_encoder = CLIPTextModel(text_config)
    if family == "sd15":
        text_sd = convert_ldm_clip_checkpoint(state_dict)
    else:
        # diffusers' converter skips the file's 24th OpenCLIP layer by its full key name (SD 2.x runs the penultimate
        # layer); under another prefix every layer converts, and CLIP skip may then ask for all of them
        renamed = {"open_clip." + k[len(OPEN_CLIP_PREFIX):]: v for k, v in state_dict.items()
                   if k.startswith(OPEN_CLIP_PREFIX)}
        text_sd = convert_open_clip_checkpoint(text_encoder, renamed, prefix="open_clip.")
    # SD 2.x uses OpenCLIP's penultimate layer: the diffusers text encoder has one layer less than the file; CLIP
    # skip (text_layers) drops more (or, for SD 2.x, none).
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


def _check_text_layers(state_dict: dict, family: str, text_layers: int, where: str) -> None:
    prefix, block = (CLIP_PREFIX + "text_model.encoder.layers.", "self_attn.q_proj.weight") if family == "sd15" else \
        (OPEN_CLIP_PREFIX + "transformer.resblocks.", "attn.in_proj_weight")
    available = 0
    while f"{prefix}{available}.{block}" in state_dict:
        available += 1
    if not 1 <= text_layers <= available:
        raise ValueError(f"{where}: text_layers={text_layers}, but the text encoder has {available} layers; pick "
                         f"1…{available}")


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
