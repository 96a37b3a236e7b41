"""A small checkpoint that ComfyUI's loader takes for Stable Diffusion 1.5, with random weights (no downloads).

ComfyUI detects SD 1.5 from the UNet (``model_channels`` 320, ``context_dim`` 768, conv projections, no ``label_emb``)
but builds the text encoder and VAE from fixed configs, so only the UNet may be small: two levels of 320 channels, one
residual block each, cross-attention on the first level and in the middle block (≈36 M weights, the published UNet
has 860 M); the text encoder (CLIP ViT-L/14, 123 M) and the VAE (84 M) have their published shapes. The weights are
random (seeded) and written in fp16, as published checkpoints are; the key layout is the original LDM one.

``lora_state_dict``: a kohya-style LoRA (``lora_unet_*`` / ``lora_te_*``, ``lora_up``/``lora_down``/``alpha``) for one
linear and one convolution weight of that UNet and one weight of the text encoder, with :data:`LORA_TARGETS` naming
each one's LDM key and diffusers name.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_sd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "l2vsd_core" / "prior" / "configs" / "sd15"
# lora key → (the checkpoint's key, the diffusers module's parameter name)
LORA_TARGETS = {
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
    "lora_unet_input_blocks_1_0_in_layers_2": (
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "encoder.layers.0.self_attn.q_proj.weight"),
}
LORA_RANK, LORA_ALPHA = 4, 2.0


def shallow_unet_config() -> dict:
    """The shipped SD 1.5 UNet config, shallow: (320, 320) channels, 1 block per level, attention on level 0."""
    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(str(CONFIGS / "unet")))
    config.update(block_out_channels=[320, 320], layers_per_block=1,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    return config


def meta_modules(unet_config: dict | None = None):
    """(unet, vae, text_encoder) with the shallow UNet and the shipped VAE / text encoder, on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config or shallow_unet_config())
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(CONFIGS / "vae")))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(CONFIGS / "text_encoder")))
    return unet, vae, text


def _random_like(state_dict: dict, generator: torch.Generator, dtype: torch.dtype) -> dict:
    """Random values for a diffusers/transformers state dict: norm weights ≈ 1, everything else ≈ N(0, 0.02²)."""
    out = {}
    for name in sorted(state_dict):
        if name.endswith("position_ids"):
            continue
        shape = tuple(state_dict[name].shape)
        value = 0.02 * torch.randn(shape, generator=generator)
        if "norm" in name and name.endswith(".weight"):
            value += 1.0
        out[name] = value.to(dtype)
    return out


def ldm_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16, meta: bool = False) -> dict:
    """The checkpoint's weights in the LDM single-file layout (``meta=True``: shapes only, no memory)."""
    unet, vae, text = meta_modules()
    g = torch.Generator().manual_seed(seed)
    parts = []
    for module in (unet, vae, text):
        sd = module.state_dict()
        parts.append({k: v for k, v in sd.items() if not k.endswith("position_ids")} if meta
                     else _random_like(sd, g, dtype))
    out = tiny_sd.unet_to_ldm(parts[0], unet.config)
    out.update(tiny_sd.vae_to_ldm(parts[1], vae.config))
    out.update(tiny_sd.clip_to_ldm(parts[2]))
    return {k: v if meta else v.contiguous() for k, v in out.items()}


def lora_state_dict(seed: int = 1, dtype: torch.dtype = torch.float16) -> dict:
    """A LoRA on :data:`LORA_TARGETS` with rank :data:`LORA_RANK` and alpha :data:`LORA_ALPHA`."""
    shapes = {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": ((320, 768), ()),
              "lora_unet_input_blocks_1_0_in_layers_2": ((320, 320), (3, 3)),
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((768, 768), ())}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, ((rows, cols), kernel) in shapes.items():
        out[f"{key}.lora_down.weight"] = (0.1 * torch.randn(LORA_RANK, cols, *kernel, generator=g)).to(dtype)
        out[f"{key}.lora_up.weight"] = (0.1 * torch.randn(rows, LORA_RANK, *((1, 1) if kernel else ()),
                                                          generator=g)).to(dtype)
        out[f"{key}.alpha"] = torch.tensor(LORA_ALPHA)
    return out


def lora_delta(lora: dict, key: str, shape) -> torch.Tensor:
    """The weight change of one LoRA key at strength 1: (alpha / rank) · up @ down, in fp32."""
    up = lora[f"{key}.lora_up.weight"].float().flatten(1)
    down = lora[f"{key}.lora_down.weight"].float().flatten(1)
    return (float(lora[f"{key}.alpha"]) / LORA_RANK) * (up @ down).reshape(shape)
