"""The world's captioned image data set, generated on the fly and reproducibly from (seed, batch index).

Batch k of seed s is a pure function of (s, k): its own generator is seeded from both, so a resumed training run sees
exactly the batches it would have seen, and there is nothing to store.  Each batch draws its cameras with the project's
own :class:`~l2vsd_core.scene.cameras.RandomCameraSampler` (the stage-1 ranges the distillation uses), so the prior is
trained on the views it will be asked about.

Captions: ``"a red cube"`` (``"an"`` before a vowel: ``"an orange cube"``) plus the view suffix exactly as the prompt
processor writes it, ``view_prompt(prompt, view_direction(elevation, azimuth))`` with the default thresholds, e.g.
``"a red cube, front view"``.  With probability ``PLAIN_CAPTION_P`` the suffix is left out (the LoRA is conditioned on
the plain prompt, and ``view_dependent=False`` runs use it), and with ``EMPTY_CAPTION_P`` the caption is ``""`` — the
unconditional prompt classifier-free guidance needs (the trainer applies that drop, see ``train.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...prompts import view_direction, view_prompt
from ...scene.cameras import CameraBatch, RandomCameraSampler
from .scene import COLOR_NAMES, SHAPE_NAMES, render, sample_objects

RESOLUTION = 32
PLAIN_CAPTION_P = 0.1
EMPTY_CAPTION_P = 0.1


def object_prompt(shape: str, color: str) -> str:
    """``"a red cube"`` / ``"an orange sphere"``: the prompt a user types for a (shape, color)."""
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape}"


def caption(shape: str, color: str, elevation_deg: float, azimuth_deg: float) -> str:
    """The view-dependent caption, formatted as :class:`~l2vsd_core.prompts.PromptProcessor` formats prompts."""
    return view_prompt(object_prompt(shape, color), view_direction(float(elevation_deg), float(azimuth_deg)))


def all_captions() -> list[str]:
    """Every caption the data can produce (for checking token lengths and for sampling grids)."""
    from ...prompts import DIRECTIONS
    prompts = [object_prompt(s, c) for s in SHAPE_NAMES for c in COLOR_NAMES]
    return prompts + [view_prompt(p, d) for p in prompts for d in DIRECTIONS]


@dataclass
class WorldBatch:
    images: torch.Tensor          # [B, 3, R, R] in [0, 1], BACKGROUND where there is no object
    captions: list[str]           # view-dependent captions (see the module)
    shape: torch.Tensor           # [B] index into SHAPE_NAMES
    color: torch.Tensor           # [B] index into COLOR_NAMES
    cameras: CameraBatch


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The generator of batch ``index`` of data set ``seed`` (independent streams for different pairs)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2 ** 63))


def make_batch(seed: int, index: int, batch_size: int = 32, resolution: int = RESOLUTION,
               plain_caption_p: float = PLAIN_CAPTION_P, supersample: int = 2) -> WorldBatch:
    """Batch ``index`` of data set ``seed``: random objects seen by random stage-1 cameras, rendered and captioned."""
    generator = batch_generator(seed, index)
    sampler = RandomCameraSampler(width=resolution, height=resolution)
    cameras = sampler.sample(batch_size, generator=generator)
    objects, color = sample_objects(batch_size, generator)
    plain = torch.rand(batch_size, generator=generator) < plain_caption_p
    with torch.no_grad():
        images, _ = render(objects, cameras, supersample)
    captions = []
    for b in range(batch_size):
        shape_name, color_name = SHAPE_NAMES[int(objects.shape[b])], COLOR_NAMES[int(color[b])]
        if plain[b]:
            captions.append(object_prompt(shape_name, color_name))
        else:
            captions.append(caption(shape_name, color_name, cameras.elevation_deg[b], cameras.azimuth_deg[b]))
    return WorldBatch(images=images, captions=captions, shape=objects.shape, color=color, cameras=cameras)


def drop_captions(captions: list[str], p: float, generator: Optional[torch.Generator] = None) -> list[str]:
    """Each caption replaced by ``""`` with probability ``p`` (classifier-free guidance training)."""
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())]
