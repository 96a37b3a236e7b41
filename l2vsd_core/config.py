"""Every setting of a run, as dataclasses: the one place where names, defaults and valid ranges live.

=================  ========================================================================================
``SceneConfig``    the stage-1 field's architecture: hash grid, MLP width, backend, normals
``BackgroundSettings``  learned environment map (with random solid-colour augmentation) or one fixed colour
``LoRAConfig``     the trainable score ε_φ: rank, alpha, learning rate, camera dropout, what "last layer" is
``DistillConfig``  the estimator (method, CFG, η, γ, ESD λ, JVP mode, weighting, timesteps) — from ``distill``
``NerfConfig``     stage 1 (the NeRF loop, its renderer, cameras, previews, checkpoints)
``GeometryConfig`` stage 2 (DMTet on normal maps)          ``TextureConfig``  stage 3 (a new texture)
``ExportConfig``   mesh extraction, texture bake, turntable
``RunConfig``      all of the above plus the prompt, prior, output folder and device: one ``generate`` run
=================  ========================================================================================

Defaults are ProlificDreamer's (threestudio ``prolificdreamer.yaml``, ``-geometry.yaml``, ``-texture.yaml``; the
README's recipe table lists each value).  A prior may bring its own recipe (:mod:`l2vsd_core.recipes`: the bundled
toy prior's is toy-sized).  ``RunConfig.to_json`` / ``from_json`` round-trip ``config.json``; the CLI's flags are
built from :data:`OPTIONS` (flag → the config fields it sets), so a flag's default is the field's.

Every config validates itself on construction and raises ``ValueError`` naming the field, the value and what is
allowed; nodes turn that into an input error.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from .distill import DistillConfig
from .schedules import Scheduled, TimestepSampler, check_scheduled

__all__ = ["SceneConfig", "BackgroundSettings", "LoRAConfig", "DistillConfig", "StageConfig", "NerfConfig",
           "GeometryConfig", "TextureConfig", "ExportConfig", "RunConfig", "OPTIONS", "Option", "to_json",
           "config_changes", "PD_MAX_STEP_PERCENT"]

# ProlificDreamer's upper timestep bound in every stage: 0.98 until step 5000, then 0.5
PD_MAX_STEP_PERCENT = (5000, 0.98, 0.5, 5001)


# ------------------------------------------------------------------------------------------------------ validation
def require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ints_at_least(cfg, least: int, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        require(is_int(v) and v >= least, name, v, f"an integer >= {least}")


def _weights(cfg, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        check_scheduled(name, v)
        vals = [v] if is_num(v) else [v[1], v[2]]
        require(all(x >= 0 for x in vals), name, v, "a weight >= 0 (or a schedule of weights >= 0)")
        if isinstance(v, list):
            setattr(cfg, name, tuple(v))  # one spelling of a schedule, so that configs compare equal


def _pair(cfg, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        require(isinstance(v, (list, tuple)) and len(v) == 2 and all(is_num(x) for x in v), name, v,
                "a pair of numbers (min, max)")
        setattr(cfg, name, tuple(v))


def scheduled_max(value: Scheduled) -> float:
    """The largest value a schedule takes."""
    return float(value) if is_num(value) else float(max(value[1], value[2]))


def to_json(value) -> Any:
    """A config (or any nesting of dataclasses, tuples and paths) as plain JSON values."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_json(x) for x in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


# -------------------------------------------------------------------------------------------------- scene and LoRA
@dataclass
class SceneConfig:
    """The stage-1 field (threestudio ``implicit-volume``): hash grid (users give the finest resolution, as tcnn and
    threestudio do; the per-level growth factor follows), MLP width, backend; also the texture field's grid."""

    levels: int = 16
    features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    max_resolution: float = 4096.0
    mlp_neurons: int = 64
    backend: str = "auto"                 # "auto" (tcnn when it imports), "torch", "tcnn"
    normal_type: str = "none"             # "none" (ProlificDreamer stage 1), "finite_difference", "analytic"

    def __post_init__(self):
        _ints_at_least(self, 1, "levels", "features_per_level", "log2_hashmap_size", "base_resolution",
                       "mlp_neurons")
        require(is_num(self.max_resolution) and self.max_resolution >= self.base_resolution, "max_resolution",
                self.max_resolution, f"a number >= base_resolution ({self.base_resolution})")
        require(self.backend in ("auto", "torch", "tcnn"), "backend", self.backend, "one of auto, torch, tcnn")
        require(self.normal_type in ("none", "finite_difference", "analytic"), "normal_type", self.normal_type,
                "one of none, finite_difference, analytic")

    def hashgrid(self):
        """The :class:`~l2vsd_core.scene.hashgrid.HashGridConfig` (growth factor from the finest resolution)."""
        from .scene.hashgrid import HashGridConfig

        ratio = max(self.max_resolution / self.base_resolution, 1.0)
        scale = 1.0 if self.levels == 1 else math.exp(math.log(ratio) / (self.levels - 1))
        return HashGridConfig(n_levels=self.levels, n_features_per_level=self.features_per_level,
                              log2_hashmap_size=self.log2_hashmap_size, base_resolution=self.base_resolution,
                              per_level_scale=scale)


@dataclass
class BackgroundSettings:
    """``color=None``: ProlificDreamer's learned environment map, replaced by a random solid colour with probability
    ``aug_prob``; a colour ``(r, g, b)`` in [0, 1]: that colour, fixed (for a prior that knows one background)."""

    color: Optional[Sequence[float]] = None
    aug_prob: float = 0.5

    def __post_init__(self):
        if self.color is not None:
            require(isinstance(self.color, (list, tuple)) and len(self.color) == 3
                    and all(is_num(c) and 0.0 <= c <= 1.0 for c in self.color), "color", self.color,
                    "three numbers in [0, 1] (R, G, B)")
            self.color = tuple(float(c) for c in self.color)
        require(is_num(self.aug_prob) and 0.0 <= self.aug_prob <= 1.0, "aug_prob", self.aug_prob,
                "a number in [0, 1]")


@dataclass
class LoRAConfig:
    """The camera-conditioned LoRA score ε_φ (threestudio: rank 4, lr 1e-4, camera dropout 0.1)."""

    rank: int = 4
    alpha: Optional[float] = None         # None: the rank (scale 1)
    lr: float = 1e-4
    camera_dropout: float = 0.1
    last_layer: str = "attention"         # what l2vsd_last's "last layer" is
    separate_base: bool = False           # on a second copy of the prior's UNet instead of the prior's own

    def __post_init__(self):
        _ints_at_least(self, 1, "rank")
        require(self.alpha is None or (is_num(self.alpha) and self.alpha > 0), "alpha", self.alpha,
                "a number > 0 (or None: the rank)")
        require(is_num(self.lr) and self.lr > 0, "lr", self.lr, "a finite number > 0")
        require(is_num(self.camera_dropout) and 0.0 <= self.camera_dropout <= 1.0, "camera_dropout",
                self.camera_dropout, "a number in [0, 1]")


# ------------------------------------------------------------------------------------------------------------ stages
def _pd_distill(method: str = "l2vsd", guidance_scale: float = 7.5, max_steps: int = 25000) -> DistillConfig:
    return DistillConfig(method=method, guidance_scale=guidance_scale, weighting="sds",
                         timesteps=TimestepSampler(1000, 0.02, list(PD_MAX_STEP_PERCENT), max_steps=max_steps))


@dataclass
class StageConfig:
    """What every stage shares (threestudio's random-camera datamodule, trainer and guidance)."""

    steps: int = 25000
    seed: int = 0
    batch_size: int = 1
    distill: DistillConfig = field(default_factory=_pd_distill)
    lambda_distill: Scheduled = 1.0               # threestudio lambda_sds / lambda_vsd; 0 skips the prior
    lambda_image: Scheduled = 0.0                 # HiFA's image-space loss (threestudio lambda_vsd_img; HiFA: 0.01)
    betas: Sequence[float] = (0.9, 0.99)
    eps: float = 1e-15
    checkpoint_every: int = 1000                  # 0: only at the end / on stop
    checkpoint_path: Optional[str] = None         # where run() writes; None: no checkpoint
    preview_every: int = 200                      # 0: no previews
    preview_resolution: int = 64
    preview_views: int = 120                      # orbit; the preview at step s shows view (s // every) % views
    preview_elevation: float = 15.0
    preview_distance: float = 1.5
    preview_fovy: float = 70.0
    camera_distance_range: Sequence[float] = (1.0, 1.5)
    fovy_range: Sequence[float] = (40.0, 70.0)
    elevation_range: Sequence[float] = (-10.0, 45.0)

    def __post_init__(self):
        self.validate()

    def validate(self):
        _ints_at_least(self, 1, "steps", "batch_size", "preview_resolution", "preview_views")
        require(is_int(self.seed), "seed", self.seed, "an integer")
        for name in ("checkpoint_every", "preview_every"):
            v = getattr(self, name)
            require(is_int(v) and v >= 0, name, v, "an integer >= 0 (0 = off)")
        require(isinstance(self.distill, DistillConfig), "distill", self.distill, "a DistillConfig")
        require(is_num(self.eps) and self.eps > 0, "eps", self.eps, "a finite number > 0")
        require(isinstance(self.betas, (list, tuple)) and len(self.betas) == 2
                and all(is_num(b) and 0 <= b < 1 for b in self.betas), "betas", self.betas, "two numbers in [0, 1)")
        self.betas = tuple(self.betas)
        for name in ("preview_elevation", "preview_distance", "preview_fovy"):
            require(is_num(getattr(self, name)), name, getattr(self, name), "a finite number")
        _pair(self, "camera_distance_range", "fovy_range", "elevation_range")
        _weights(self, "lambda_distill", "lambda_image")
        require(self.checkpoint_path is None or isinstance(self.checkpoint_path, (str, os.PathLike)),
                "checkpoint_path", self.checkpoint_path, "a path or None")
        if self.distill.timesteps.max_steps != self.steps:  # HiFA's √-anneal spans this stage's steps
            self.distill = dataclasses.replace(
                self.distill, timesteps=dataclasses.replace(self.distill.timesteps, max_steps=self.steps))
        return self

    def render_size(self, step: int) -> int:
        """Width = height of the training renders at ``step``."""
        raise NotImplementedError

    def render_sizes(self) -> tuple:
        raise NotImplementedError

    def check_prior(self, prior) -> None:
        """Every render size must be a multiple of the prior's pixel factor (8 for SD's VAE, 1 for pixel priors)."""
        factor = int(getattr(prior, "vae_scale_factor", 1))
        for size in (*self.render_sizes(), self.preview_resolution):
            if size % factor:
                raise ValueError(f"resolution {size} (renders {list(self.render_sizes())}, preview_resolution "
                                 f"{self.preview_resolution}) must be a multiple of the prior's pixel factor {factor}")

    def to_json(self) -> dict:
        return to_json(self)


@dataclass
class NerfConfig(StageConfig):
    """Stage 1, threestudio's ``prolificdreamer.yaml``: 64 px until step 5000, then 512 px; t ∈ [0.02, 0.98 → 0.5]."""

    widths: Sequence[int] = (64, 512)             # square renders; one entry per resolution stage
    resolution_milestones: Sequence[int] = (5000,)  # step at which the next entry of ``widths`` starts
    lr_encoding: float = 0.01
    lr_network: float = 0.001
    lr_background: float = 0.001
    weight_decay: float = 0.01                    # torch's AdamW default (threestudio passes none)
    lambda_sparsity: Scheduled = 10.0
    lambda_opaque: Scheduled = (10000, 0.0, 1000.0, 10001)
    lambda_z_variance: Scheduled = 0.0            # HiFA: 300
    lambda_orient: Scheduled = 0.0                # needs a field with normals (stage 1: 0, no normals)
    # the volume renderer and its occupancy grid
    radius: float = 1.0
    num_samples_per_ray: int = 512
    grid_resolution: int = 32
    grid_update_every: int = 16
    grid_decay: float = 0.95
    grid_threshold: float = 0.01

    def validate(self) -> "NerfConfig":
        super().validate()
        _ints_at_least(self, 1, "num_samples_per_ray", "grid_resolution", "grid_update_every")
        widths = list(self.widths) if isinstance(self.widths, (list, tuple)) else None
        require(bool(widths) and all(is_int(w) and w >= 1 for w in widths), "widths", self.widths,
                "a non-empty list of integers >= 1")
        ms = list(self.resolution_milestones) if isinstance(self.resolution_milestones, (list, tuple)) else None
        require(ms is not None and len(ms) == len(widths) - 1 and all(is_int(m) and m >= 1 for m in ms)
                and all(a < b for a, b in zip(ms, ms[1:])), "resolution_milestones", self.resolution_milestones,
                f"{len(widths) - 1} increasing integers >= 1 (one fewer than widths)")
        self.widths, self.resolution_milestones = tuple(widths), tuple(ms)
        for name in ("lr_encoding", "lr_network", "lr_background", "weight_decay"):
            require(is_num(getattr(self, name)) and getattr(self, name) >= 0, name, getattr(self, name),
                    "a finite number >= 0")
        _weights(self, "lambda_sparsity", "lambda_opaque", "lambda_z_variance", "lambda_orient")
        for name in ("radius", "grid_decay", "grid_threshold"):
            require(is_num(getattr(self, name)), name, getattr(self, name), "a finite number")
        require(self.radius > 0, "radius", self.radius, "> 0")
        return self

    def render_size(self, step: int) -> int:
        """``widths[i]`` with i = the number of milestones <= step."""
        return self.widths[bisect.bisect_right(self.resolution_milestones, step)]

    resolution = render_size  # the name stage 1 has always had

    def render_sizes(self) -> tuple:
        return tuple(self.widths)


def _geometry_distill() -> DistillConfig:
    return _pd_distill("sds", 100.0, 15000)


def _texture_distill() -> DistillConfig:
    return _pd_distill("l2vsd", 7.5, 30000)  # stage 1's estimator (threestudio: the same VSD guidance)


@dataclass
class _MeshStageConfig(StageConfig):
    resolution: int = 512                         # square renders (threestudio: 512 in both mesh stages)

    def validate(self):
        super().validate()
        _ints_at_least(self, 1, "resolution")
        return self

    def render_size(self, step: int) -> int:
        return self.resolution

    def render_sizes(self) -> tuple:
        return (self.resolution,)


@dataclass
class GeometryConfig(_MeshStageConfig):
    """Stage 2, threestudio's ``prolificdreamer-geometry.yaml``: SDS at CFG 100 on normal maps of a DMTet."""

    steps: int = 15000
    distill: DistillConfig = field(default_factory=_geometry_distill)
    lr: float = 0.005                             # Adam on the SDF and the deformation (no weight decay)
    lambda_normal_consistency: Scheduled = 10000.0
    lambda_laplacian_smoothness: Scheduled = 10000.0
    dmtet_resolution: int = 64                    # cubes per axis; our 64 ~ threestudio's 128 tets
    deformation_scale: float = 0.5                # largest offset, in grid cells
    isosurface_threshold: Union[str, float] = "auto"  # stage-1 density level of the surface
    bbox_resolution: int = 64                     # lattice of the coarse pass that finds the object's box
    bbox_margin: float = 0.1
    normal_background: float = 0.0                # comp_normal off the mesh (threestudio: 0)

    def validate(self) -> "GeometryConfig":
        super().validate()
        require(is_num(self.lr) and self.lr > 0, "lr", self.lr, "a finite number > 0")
        _weights(self, "lambda_normal_consistency", "lambda_laplacian_smoothness")
        _ints_at_least(self, 2, "dmtet_resolution", "bbox_resolution")
        for name in ("deformation_scale", "bbox_margin"):
            require(is_num(getattr(self, name)) and getattr(self, name) >= 0, name, getattr(self, name),
                    "a finite number >= 0")
        require(self.isosurface_threshold == "auto" or is_num(self.isosurface_threshold), "isosurface_threshold",
                self.isosurface_threshold, "'auto' or a finite density value")
        require(is_num(self.normal_background), "normal_background", self.normal_background, "a finite number")
        return self


@dataclass
class TextureConfig(_MeshStageConfig):
    """Stage 3, threestudio's ``prolificdreamer-texture.yaml``: VSD on the colour of the fixed mesh."""

    steps: int = 30000
    distill: DistillConfig = field(default_factory=_texture_distill)
    lr_encoding: float = 0.01
    lr_network: float = 0.001
    lr_background: float = 0.001
    weight_decay: float = 0.01

    def validate(self) -> "TextureConfig":
        super().validate()
        for name in ("lr_encoding", "lr_network", "lr_background", "weight_decay"):
            require(is_num(getattr(self, name)) and getattr(self, name) >= 0, name, getattr(self, name),
                    "a finite number >= 0")
        return self


# Settings a resumed run may change: they do not alter the trajectory up to the step it resumes from.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "checkpoint_path", "preview_", "distill.timesteps.max_steps")


def config_changes(saved: dict, current: dict, defaults: Optional[dict] = None,
                   prefix: str = "") -> list[tuple[str, object, object]]:
    """``(key, saved, current)`` for every setting that differs, except :data:`RESUMABLE_CHANGES`.  A key that an
    older checkpoint's config lacks counts as its value in ``defaults`` (a setting added since then)."""
    changes = []
    defaults = defaults or {}
    for key in sorted(set(saved) | set(current)):
        name = prefix + key
        a = saved[key] if key in saved else defaults.get(key)
        b = current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, defaults.get(key) if isinstance(defaults.get(key), dict) else None,
                                      name + ".")
        elif a != b and not name.startswith(RESUMABLE_CHANGES):
            changes.append((name, a, b))
    return changes


# ------------------------------------------------------------------------------------------------------------ export
@dataclass
class ExportConfig:
    mesh_resolution: int = 128                    # marching-cubes grid of the stage-1 density
    threshold: Union[str, float] = "auto"         # density level of the surface (and of the DMTet initialisation)
    max_faces: int = 200_000                      # decimate before UV unwrapping
    texture_size: int = 1024
    turntable_views: int = 30
    turntable_resolution: int = 128

    def __post_init__(self):
        _ints_at_least(self, 2, "mesh_resolution")
        _ints_at_least(self, 4, "max_faces")
        _ints_at_least(self, 8, "texture_size")
        _ints_at_least(self, 1, "turntable_views", "turntable_resolution")
        require(self.threshold == "auto" or is_num(self.threshold), "threshold", self.threshold,
                "'auto' or a finite density value")


# --------------------------------------------------------------------------------------------------------------- run
@dataclass
class RunConfig:
    """One ``generate`` run: what to make, from which prior, where, and every stage's settings."""

    prompt: str = ""
    negative_prompt: str = ""
    prior: str = ""                               # "toy" (bundled), a diffusers folder or an SD 1.x/2.x file
    out: str = ""
    stages: int = 1                               # 1: NeRF; 2: + geometry; 3: + texture
    resume: bool = False
    device: str = "auto"
    dtype: str = "auto"
    prediction_type: Optional[str] = None
    config_dir: Optional[str] = None
    tokenizer_dir: Optional[str] = None
    threads: Optional[int] = None
    front_threshold: float = 30.0                 # view-dependent prompts: azimuth within ±30° is "front view"
    back_threshold: float = 30.0                  # (threestudio's ProlificDreamer configs; its class default: 45)
    scene: SceneConfig = field(default_factory=SceneConfig)
    background: BackgroundSettings = field(default_factory=BackgroundSettings)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    nerf: NerfConfig = field(default_factory=NerfConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    texture: TextureConfig = field(default_factory=TextureConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self):
        require(is_int(self.stages) and self.stages in (1, 2, 3), "stages", self.stages,
                "1, 2 or 3 (NeRF; + geometry refinement; + texture)")
        require(self.threads is None or (is_int(self.threads) and self.threads >= 1), "threads", self.threads,
                "an integer >= 1")

    def to_json(self) -> dict:
        return to_json(self)

    @classmethod
    def from_json(cls, data: dict) -> "RunConfig":
        """The inverse of :meth:`to_json` (keys it does not know are an error: a typo must not pass silently)."""
        return _from_json(cls, data, "")


class ConfigError(ValueError):
    """An invalid setting, with the dotted path of the field (``geometry.dmtet_resolution``)."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


def _from_json(kind, data, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be an object; got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown setting(s) in {where or 'config'}: {', '.join(unknown)}")
    kw = {}
    for name, value in data.items():
        hint = fields[name].type if isinstance(fields[name].type, type) else None
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING \
            else fields[name].default
        sub = type(default) if dataclasses.is_dataclass(default) else hint
        if sub is not None and dataclasses.is_dataclass(sub):
            kw[name] = _from_json(sub, value, f"{where}{name}.")
        elif isinstance(value, list) and name not in ("min_step_percent", "max_step_percent", "grad_clip"):
            kw[name] = tuple(value)
        else:
            kw[name] = value
    try:
        return kind(**kw)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # the configs name the field first: "dmtet_resolution must be …"
        raise ConfigError(where + str(e).split(" ")[0], str(e)) from e


# ------------------------------------------------------------------------------------------------------- CLI options
@dataclass(frozen=True)
class Option:
    """One CLI flag: its ``dest`` and the config fields (dotted paths in :class:`RunConfig`) it sets; its default is
    the first field's.  ``kind`` parses the text ("int", "float", "ints", "floats2", "floats3", "schedule", "str",
    "flag", "threshold")."""

    dest: str
    paths: tuple
    kind: str = "float"
    help: str = ""
    choices: Optional[tuple] = None
    inherit: bool = False        # default None: the fields keep what the other options set (--texture-method)


def _o(dest, paths, kind="float", help="", choices=None, inherit=False) -> Option:
    return Option(dest, (paths,) if isinstance(paths, str) else tuple(paths), kind, help, choices, inherit)


_STAGES = ("nerf", "geometry", "texture")


def _all(field_name: str) -> tuple:
    return tuple(f"{s}.{field_name}" for s in _STAGES)


def _distill_options() -> list:
    from .distill import LOOKAHEADS, METHODS, WEIGHTINGS
    from .jvp import JVP_MODES

    both = ("nerf", "texture")  # stage 3 takes stage 1's estimator (threestudio: the same VSD guidance)
    every = _STAGES
    return [
        _o("method", [f"{s}.distill.method" for s in both], "str", "score-distillation estimator", METHODS),
        _o("guidance_scale", [f"{s}.distill.guidance_scale" for s in both], help="CFG scale of the prior"),
        _o("eta", [f"{s}.distill.eta" for s in every], help="lookahead step η of l2vsd (its meaning: --lookahead)"),
        _o("lookahead", [f"{s}.distill.lookahead" for s in every], "str",
           "the step l2vsd / hlvsd linearize: paper (eq. 7, summed residual), sgd_mean (η on the mean loss), "
           "optimizer (the score's own AdamW step, scaled by η)", LOOKAHEADS),
        _o("lora_steps", [f"{s}.distill.lora_steps" for s in every], "int", "γ: LoRA updates per step"),
        _o("esd_lambda", [f"{s}.distill.esd_lambda" for s in every], help="ESD λ (0: off)"),
        _o("jvp_mode", [f"{s}.distill.jvp_mode" for s in every], "str", "how l2vsd computes J·v",
           ("auto",) + JVP_MODES),
        _o("fd_rel_step", [f"{s}.distill.fd_rel_step" for s in every]),
        _o("weighting", [f"{s}.distill.weighting" for s in both], "str", "w(t)", WEIGHTINGS),
        _o("grad_clip", [f"{s}.distill.grad_clip" for s in both], "schedule", "number or start,v0,v1,end"),
        _o("min_step_percent", [f"{s}.distill.timesteps.min_step_percent" for s in both], "schedule",
           "lower end of t / 1000: a number or start_step,v0,v1,end_step"),
        _o("max_step_percent", [f"{s}.distill.timesteps.max_step_percent" for s in both], "schedule",
           "upper end of t / 1000 (ProlificDreamer: 5000,0.98,0.5,5001)"),
        _o("sqrt_anneal", [f"{s}.distill.timesteps.sqrt_anneal" for s in both], "flag",
           "HiFA's deterministic √-annealed timesteps"),
    ]


def _build_options() -> list:
    return [
        # run
        _o("steps", "nerf.steps", "int", "stage-1 steps"),
        _o("seed", _all("seed"), "int"),
        _o("threads", "threads", "int", "torch CPU threads (default: torch's)"),
        # prior and LoRA
        _o("device", "device", "str", "auto, cpu, cuda, cuda:1, ..."),
        _o("dtype", "dtype", "str", "auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16"),
        _o("prediction_type", "prediction_type", "str", "override the prior's prediction type (768-v models)",
           ("epsilon", "v_prediction")),
        _o("config_dir", "config_dir", "str", "single files only: diffusers-layout config folder"),
        _o("tokenizer_dir", "tokenizer_dir", "str", "a local tokenizer folder to use instead of the model's"),
        _o("front_threshold", "front_threshold", help="azimuth half-range (°) of the 'front view' prompt"),
        _o("back_threshold", "back_threshold", help="azimuth half-range (°) of the 'back view' prompt"),
        _o("lora_rank", "lora.rank", "int"),
        _o("lora_alpha", "lora.alpha", help="LoRA alpha (default: the rank)"),
        _o("lora_lr", "lora.lr"),
        _o("camera_dropout", "lora.camera_dropout", help="LoRA camera-condition dropout"),
        _o("lora_last_layer", "lora.last_layer", "str", "what l2vsd_last's 'last layer' is"),
        # score distillation
        *_distill_options(),
        # optimization (stage 1; betas/eps/cameras/previews: every stage)
        _o("batch_size", _all("batch_size"), "int"),
        _o("widths", "nerf.widths", "ints", "stage-1 render widths, e.g. 64,512"),
        _o("milestones", "nerf.resolution_milestones", "ints", "steps where the next width starts, e.g. 5000"),
        _o("lr_encoding", ("nerf.lr_encoding", "texture.lr_encoding")),
        _o("lr_network", ("nerf.lr_network", "texture.lr_network")),
        _o("lr_background", ("nerf.lr_background", "texture.lr_background")),
        _o("betas", _all("betas"), "floats2"),
        _o("eps", _all("eps")),
        _o("weight_decay", ("nerf.weight_decay", "texture.weight_decay")),
        _o("lambda_sparsity", "nerf.lambda_sparsity", "schedule"),
        _o("lambda_opaque", "nerf.lambda_opaque", "schedule"),
        _o("lambda_z_variance", "nerf.lambda_z_variance", "schedule", "HiFA: 300"),
        _o("lambda_orient", "nerf.lambda_orient", "schedule", "orientation loss; needs --normal-type"),
        _o("lambda_image", ("nerf.lambda_image", "texture.lambda_image"), "schedule",
           "HiFA's image-space loss (threestudio lambda_vsd_img; HiFA: 0.01)"),
        _o("checkpoint_every", _all("checkpoint_every"), "int", "0: only at the end / on stop"),
        _o("preview_every", _all("preview_every"), "int", "orbit preview PNG every N steps (0: none)"),
        _o("preview_resolution", _all("preview_resolution"), "int"),
        _o("preview_views", _all("preview_views"), "int"),
        _o("preview_elevation", _all("preview_elevation")),
        _o("preview_distance", _all("preview_distance")),
        _o("preview_fovy", _all("preview_fovy")),
        _o("camera_distance_range", _all("camera_distance_range"), "floats2"),
        _o("fovy_range", _all("fovy_range"), "floats2"),
        _o("elevation_range", _all("elevation_range"), "floats2"),
        # scene
        _o("radius", "nerf.radius", help="half-size of the scene box"),
        _o("samples_per_ray", "nerf.num_samples_per_ray", "int"),
        _o("grid_resolution", "nerf.grid_resolution", "int", "occupancy grid"),
        _o("grid_update_every", "nerf.grid_update_every", "int"),
        _o("grid_decay", "nerf.grid_decay"),
        _o("grid_threshold", "nerf.grid_threshold"),
        _o("levels", "scene.levels", "int", "hash-grid levels"),
        _o("features_per_level", "scene.features_per_level", "int"),
        _o("log2_hashmap_size", "scene.log2_hashmap_size", "int"),
        _o("base_resolution", "scene.base_resolution", "int"),
        _o("max_resolution", "scene.max_resolution", help="finest hash-grid resolution (ProlificDreamer: 4096)"),
        _o("mlp_neurons", "scene.mlp_neurons", "int"),
        _o("backend", "scene.backend", "str", "hash-grid backend", ("auto", "torch", "tcnn")),
        _o("background_aug_prob", "background.aug_prob",
           help="probability of a random solid background colour per render (0 for a prior that knows one)"),
        _o("background_color", "background.color", "floats3",
           "a fixed background colour R,G,B in [0, 1] instead of the learned environment map"),
        _o("normal_type", "scene.normal_type", "str", "field normals (stage 1: none)",
           ("none", "finite_difference", "analytic")),
        # refinement
        _o("stages", "stages", "int", "1: NeRF; 2: + DMTet geometry refinement; 3: + texture refinement",
           (1, 2, 3)),
        _o("geometry_steps", "geometry.steps", "int"),
        _o("geometry_resolution", "geometry.resolution", "int", "render size of stage 2"),
        _o("dmtet_resolution", "geometry.dmtet_resolution", "int", "DMTet cubes per axis over the object's box"),
        _o("geometry_method", "geometry.distill.method", "str", "estimator on the normal maps (ProlificDreamer: "
                                                                 "sds)", _distill_options()[0].choices),
        _o("geometry_guidance_scale", "geometry.distill.guidance_scale"),
        _o("texture_steps", "texture.steps", "int"),
        _o("texture_resolution", "texture.resolution", "int", "render size of stage 3"),
        _o("texture_method", "texture.distill.method", "str", "estimator of stage 3 (default: --method)",
           _distill_options()[0].choices, inherit=True),
        # export
        _o("mesh_resolution", "export.mesh_resolution", "int", "marching-cubes grid"),
        _o("threshold", ("export.threshold", "geometry.isosurface_threshold"), "threshold",
           "density level of the surface (export; with --stages 2/3 the DMTet initialisation), or auto: the export's render-matched level, the DMTet's threestudio mean of the non-empty densities"),
        _o("max_faces", "export.max_faces", "int", "decimate to at most this many faces before UV unwrapping"),
        _o("texture_size", "export.texture_size", "int"),
        _o("turntable_views", "export.turntable_views", "int"),
        _o("turntable_resolution", "export.turntable_resolution", "int"),
    ]


class _Options(list):
    def by_dest(self) -> dict:
        return {o.dest: o for o in self}


OPTIONS = _Options(_build_options())


def get_path(config, path: str):
    for part in path.split("."):
        config = getattr(config, part)
    return config


def option_defaults(config: Optional[RunConfig] = None) -> dict:
    """``{dest: value}`` of every option in ``config`` (default: a default :class:`RunConfig`), as JSON values."""
    config = RunConfig() if config is None else config
    return {o.dest: None if o.inherit else to_json(get_path(config, o.paths[0])) for o in OPTIONS}


RUN_KEYS = ("prompt", "negative_prompt", "prior", "out", "resume")


def from_options(options: dict, base: Optional[RunConfig] = None) -> RunConfig:
    """The :class:`RunConfig` of flat CLI-style ``options`` (``{dest: value}``, e.g. ``{"steps": 400}``) over
    ``base`` (default: ProlificDreamer's defaults).  Unknown keys are an error; invalid values raise the configs'
    ``ValueError``, prefixed with the option's flag."""
    data = (RunConfig() if base is None else base).to_json()
    by_dest = OPTIONS.by_dest()
    unknown = sorted(k for k in options if k not in by_dest and k not in RUN_KEYS)
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(unknown)}")
    for key in RUN_KEYS:
        if key in options:
            data[key] = options[key]
    for option in OPTIONS:  # in table order: --texture-method after --method, so it overrides it
        if option.dest not in options or (option.inherit and options[option.dest] is None):
            continue
        value = to_json(options[option.dest])
        for path in option.paths:
            *parents, last = path.split(".")
            node = data
            for part in parents:
                node = node[part]
            node[last] = value
    try:
        return RunConfig.from_json(data)
    except ConfigError as e:
        option = next((o for o in OPTIONS if e.path in o.paths), None)
        if option is None:
            raise ValueError(f"{e.path}: {e}") from e
        field_name = e.path.rsplit(".", 1)[-1]
        message = str(e)
        flag = "--" + option.dest.replace("_", "-")
        raise ValueError(flag + message[len(field_name):] if message.startswith(field_name)
                         else f"{flag}: {message}") from e
