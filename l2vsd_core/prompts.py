"""View-dependent prompting (DreamFusion / threestudio) and the engine's ``Conditioning`` for a batch of cameras.

Directions, with azimuth in degrees (front at 0, wrapped to [−180, 180)) and elevation in degrees; later rules win:

- ``side``: everything else;
- ``front``: −front_threshold < azimuth < front_threshold;
- ``back``: azimuth > 180 − back_threshold or azimuth < −180 + back_threshold;
- ``overhead``: elevation > overhead_threshold.

Defaults are threestudio's prompt-processor defaults (front 45°, back 45°, overhead 60°); its ProlificDreamer config
uses front 30°, back 30°.  The view prompt is ``"{prompt}, {direction} view"``; the negative prompt has no view
suffix (threestudio's default, no prompt debiasing, no Perp-Neg).  The prior gets the view-dependent prompt, the
trainable score the view-independent one (threestudio's VSD guidance).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from .distill import Conditioning

DIRECTIONS = ("side", "front", "back", "overhead")
Angles = Union[float, Sequence[float], torch.Tensor]


def _require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def _check_thresholds(front: float, back: float, overhead: float) -> None:
    _require(0 <= front <= 180, "front_threshold", front, "an angle in [0, 180] degrees")
    _require(0 <= back <= 180, "back_threshold", back, "an angle in [0, 180] degrees")
    _require(-90 <= overhead <= 90, "overhead_threshold", overhead, "an elevation in [-90, 90] degrees")


def wrap_azimuth(azimuth_deg: torch.Tensor) -> torch.Tensor:
    """Azimuth in degrees wrapped to [−180, 180)."""
    return torch.remainder(azimuth_deg + 180.0, 360.0) - 180.0


def direction_index(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, front_threshold: float = 45.0,
                    back_threshold: float = 45.0, overhead_threshold: float = 60.0) -> torch.Tensor:
    """Index into ``DIRECTIONS`` per camera (tensors of the same shape, degrees)."""
    _check_thresholds(front_threshold, back_threshold, overhead_threshold)
    elevation_deg, azimuth_deg = torch.broadcast_tensors(torch.as_tensor(elevation_deg, dtype=torch.float64),
                                                         torch.as_tensor(azimuth_deg, dtype=torch.float64))
    azi = wrap_azimuth(azimuth_deg)
    idx = torch.zeros(azi.shape, dtype=torch.long)  # side
    idx[(azi > -front_threshold) & (azi < front_threshold)] = DIRECTIONS.index("front")
    idx[(azi > 180 - back_threshold) | (azi < -180 + back_threshold)] = DIRECTIONS.index("back")
    idx[elevation_deg > overhead_threshold] = DIRECTIONS.index("overhead")
    return idx


def view_direction(elevation_deg: float, azimuth_deg: float, front_threshold: float = 45.0,
                   back_threshold: float = 45.0, overhead_threshold: float = 60.0) -> str:
    """``"front"``, ``"side"``, ``"back"`` or ``"overhead"`` for one camera (degrees, front at azimuth 0)."""
    for name, v in (("elevation_deg", elevation_deg), ("azimuth_deg", azimuth_deg)):
        _require(isinstance(v, (int, float)) and math.isfinite(v), name, v, "a finite number of degrees")
    idx = direction_index(torch.tensor([float(elevation_deg)]), torch.tensor([float(azimuth_deg)]),
                          front_threshold, back_threshold, overhead_threshold)
    return DIRECTIONS[int(idx[0])]


def view_prompt(prompt: str, direction: str) -> str:
    return f"{prompt}, {direction} view"


def _angles(name: str, value: Angles) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).reshape(-1).cpu()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite degrees; got {value!r}")
    return t


class PromptProcessor:
    """Text embeddings for a prompt, its view-dependent variants and the negative prompt, each encoded once.

    ``encode_text(list[str]) -> Tensor [N, L, D]`` is the prior's text encoder.  ``conditioning(elevation, azimuth,
    camera_c2w_flat)`` gives the engine's ``Conditioning`` for a batch of B cameras: ``text`` the view-dependent
    prompt (the prior's condition), ``text_uncond`` the negative prompt (CFG), ``score_text`` the plain prompt (the
    LoRA's condition), ``camera`` the flattened camera-to-world matrices [B, 16] (or None).
    """

    def __init__(self, encode_text: Callable[[list[str]], torch.Tensor], prompt: str, negative_prompt: str = "",
                 view_dependent: bool = True, front_threshold: float = 45.0, back_threshold: float = 45.0,
                 overhead_threshold: float = 60.0):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string (the text to generate); got {prompt!r}")
        _require(isinstance(negative_prompt, str), "negative_prompt", negative_prompt, "a string (may be empty)")
        _require(callable(encode_text), "encode_text", encode_text, "a function list[str] -> Tensor [N, L, D]")
        _check_thresholds(front_threshold, back_threshold, overhead_threshold)
        self.encode_text = encode_text
        self.prompt = prompt.strip()
        self.negative_prompt = negative_prompt.strip()
        self.view_dependent = bool(view_dependent)
        self.front_threshold, self.back_threshold = float(front_threshold), float(back_threshold)
        self.overhead_threshold = float(overhead_threshold)
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def view_prompts(self) -> dict[str, str]:
        """Direction → prompt the prior sees (the plain prompt for every direction when not view-dependent)."""
        return {d: view_prompt(self.prompt, d) if self.view_dependent else self.prompt for d in DIRECTIONS}

    def embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), L, D]``; strings not yet cached are encoded together in one call, each once."""
        missing = list(dict.fromkeys(s for s in texts if s not in self._cache))
        if missing:
            out = self.encode_text(missing)
            if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[0] != len(missing):
                raise ValueError(f"encode_text must return a tensor [N, L, D] with N = {len(missing)} strings; got "
                                 f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
            for s, e in zip(missing, out.detach()):
                self._cache[s] = e
        return torch.stack([self._cache[s] for s in texts])

    def all_strings(self) -> list[str]:
        return list(dict.fromkeys([self.prompt, self.negative_prompt, *self.view_prompts.values()]))

    def directions(self, elevation: Angles, azimuth: Angles) -> list[str]:
        idx = direction_index(_angles("elevation", elevation), _angles("azimuth", azimuth), self.front_threshold,
                              self.back_threshold, self.overhead_threshold)
        return [DIRECTIONS[int(i)] for i in idx]

    def conditioning(self, elevation: Angles, azimuth: Angles,
                     camera_c2w_flat: Optional[torch.Tensor] = None) -> Conditioning:
        """The engine's ``Conditioning`` for B cameras (elevation, azimuth in degrees: B values or one value)."""
        elevation, azimuth = _angles("elevation", elevation), _angles("azimuth", azimuth)
        if elevation.numel() != azimuth.numel() and 1 not in (elevation.numel(), azimuth.numel()):
            raise ValueError(f"elevation and azimuth must have the same number of cameras; got {elevation.numel()} "
                             f"and {azimuth.numel()}")
        elevation, azimuth = torch.broadcast_tensors(elevation, azimuth)
        batch = elevation.numel()
        self.embeddings(self.all_strings())  # everything in one encoder call, the first time
        names = self.view_prompts
        text = self.embeddings([names[d] for d in self.directions(elevation, azimuth)])
        uncond = self.embeddings([self.negative_prompt]).expand(batch, -1, -1)
        plain = self.embeddings([self.prompt]).expand(batch, -1, -1)
        camera = None
        if camera_c2w_flat is not None:
            camera = camera_c2w_flat.reshape(camera_c2w_flat.shape[0], -1)
            if camera.shape != (batch, 16):
                raise ValueError(f"camera_c2w_flat must be [B, 16] or [B, 4, 4] with B = {batch} cameras; got shape "
                                 f"{tuple(camera_c2w_flat.shape)}")
        return Conditioning(text=text, text_uncond=uncond, score_text=plain, camera=camera)
