"""Factories: the one place where a run's objects are made from its configs (the CLI, the nodes and the toys all
call these), with the seed of each object fixed relative to the stage's seed.

Seeds: the stage-1 field ``seed``, its background ``seed + 1``, the texture stage's colour field ``seed + 2`` and
background ``seed + 3``, every LoRA ``seed`` (initialised from a forked global RNG: peft draws from it).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from .config import BackgroundSettings, LoRAConfig, SceneConfig

__all__ = ["prompt_processor", "nerf_field", "background", "texture_field", "lora_score", "attached_lora", "ADAPTERS"]

# The LoRA adapter of each stage (a checkpoint's LoRA tensors are named after it).
ADAPTERS = {"nerf": "l2vsd", "geometry": "l2vsd_geometry", "texture": "l2vsd_texture"}


def prompt_processor(prior, prompt: str, negative_prompt: str = "", front_threshold: float = 30.0,
                     back_threshold: float = 30.0):
    """The view-dependent prompts, encoded once (ProlificDreamer: front/back view within ±30° of azimuth)."""
    from .prompts import PromptProcessor

    return PromptProcessor(prior.encode_text, prompt, negative_prompt=negative_prompt,
                           front_threshold=front_threshold, back_threshold=back_threshold)


def nerf_field(scene: SceneConfig, radius: float, seed: int):
    """A fresh stage-1 :class:`~l2vsd_core.scene.field.ImplicitVolume` (CPU; move it to the prior's device)."""
    from .scene.field import FieldConfig, ImplicitVolume

    normal_type = None if scene.normal_type == "none" else scene.normal_type
    return ImplicitVolume(FieldConfig(radius=radius, hashgrid=scene.hashgrid(), backend=scene.backend,
                                      mlp_neurons=scene.mlp_neurons, normal_type=normal_type), seed=seed)


def background(settings: BackgroundSettings, seed: int):
    """The learned environment map (with random solid-colour augmentation) or a fixed colour."""
    from .scene.field import BackgroundConfig, EnvironmentBackground, SolidBackground

    if settings.color is not None:
        return SolidBackground(settings.color)
    return EnvironmentBackground(BackgroundConfig(random_aug=settings.aug_prob > 0, random_aug_prob=settings.aug_prob),
                                 seed=seed)


def texture_field(scene: SceneConfig, radius: float, seed: int):
    """The texture stage's fresh colour field: the stage-1 hash grid and MLP width (threestudio)."""
    from .scene.field import TextureField

    return TextureField(radius, scene.hashgrid(), backend=scene.backend, mlp_neurons=scene.mlp_neurons, seed=seed)


def lora_score(config: LoRAConfig, prior, seed: int, adapter_name: str = ADAPTERS["nerf"]):
    """A fresh camera-conditioned LoRA score on ``prior``'s UNet (each stage trains its own, as threestudio's stages
    each start a new guidance)."""
    from .score import LoRAScore

    # peft initialises the LoRA from the global RNG; one adapter per stage on a shared UNet is on purpose
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        torch.manual_seed(seed)
        return LoRAScore(prior.unet, prior.alphas_cumprod, prior.prediction_type, rank=config.rank,
                         alpha=config.alpha, lr=config.lr, camera_dropout=config.camera_dropout, seed=seed,
                         last_layer=config.last_layer, adapter_name=adapter_name)


@contextmanager
def attached_lora(config: LoRAConfig, prior, seed: int, adapter_name: str, needed: bool = True,
                  base=None) -> Iterator[Optional[object]]:
    """:func:`lora_score` on ``base`` (a second copy of the prior, for ``separate_base``) or the prior, taken off
    the UNet again afterwards, so that a cached prior (ComfyUI's) starts the next run clean; None when not
    ``needed`` (sds)."""
    if not needed:
        yield None
        return
    owner = base if base is not None else prior
    score = lora_score(config, owner, seed, adapter_name)
    try:
        yield score
    finally:
        unet = owner.unet
        if adapter_name in (getattr(unet, "peft_config", None) or {}):
            unet.delete_adapters(adapter_name)
