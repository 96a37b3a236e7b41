"""Stages 2 and 3 of ProlificDreamer as library code: geometry refinement on a DMTet mesh, then texture refinement
on the fixed mesh (threestudio's ``prolificdreamer-geometry.yaml`` and ``prolificdreamer-texture.yaml``, see
``shared/notes/anchors.md`` §1.2, §1.3, §1.5).  Our own code; the loop is the stage-1 loop of
:mod:`l2vsd_core.optimize` with another scene and renderer.

Geometry (:class:`GeometryRefiner`, settings :class:`GeometryConfig`)
    scene: a :class:`~l2vsd_core.mesh.dmtet.DMTet` (per-vertex SDF + deformation) initialised from the stage-1
    density (:func:`dmtet_from_density`: a tight box around the dense region, then ``sdf = threshold - density``,
    threshold ``"auto"`` as the exporter); one step = random cameras -> marching tets -> rasterize
    (:class:`~l2vsd_core.mesh.mesh_renderer.MeshRenderer`) -> ``comp_normal`` (the normal map in [0, 1]) -> resize
    to the prior's size -> encode -> :func:`~l2vsd_core.distill.score_distillation` (SDS, guidance 100, w = 1 - ᾱ_t,
    t in [0.02, 0.98 -> 0.5 at step 5000]; or any VSD-family method) + 10000 · threestudio's normal consistency
    (:func:`~l2vsd_core.mesh.regularizers.vertex_normal_consistency`) + 10000 · its Laplacian
    (:func:`~l2vsd_core.mesh.regularizers.graph_laplacian_norm`) -> Adam (lr 0.005, betas (0.9, 0.99), eps 1e-15) on
    the SDF and the deformation.  15000 steps at 512 px by default.

Texture (:class:`TextureRefiner`, settings :class:`TextureConfig`)
    scene: a fixed :class:`~l2vsd_core.mesh.dmtet.TriangleMesh` (e.g. :meth:`GeometryRefiner.final_mesh`, floaters
    removed as threestudio's ``isosurface_remove_outliers``), a fresh :class:`TextureField` (hash grid + MLP +
    sigmoid, the stage-1 grid settings) and a background (threestudio: a fresh environment map with random solid
    colours); one step = random cameras -> rasterize -> colour field at the surface points, over the background ->
    ``rgb`` -> encode -> score distillation (VSD, guidance 7.5, the stage-1 t range; any method of the engine, ESD λ
    included) -> AdamW (encoding 0.01, network 0.001, background 0.001).  30000 steps at 512 px by default.
    threestudio's ``lambda_lora 1`` is implicit: the LoRA takes its own optimizer steps inside the estimator.

Both loops have :class:`~l2vsd_core.optimize.Stage1Optimizer`'s surface: ``step()`` -> float terms, ``preview()``,
``run(callback, should_stop, checkpoint_path)``, ``save_checkpoint``/``load_checkpoint`` (one safetensors file with
the metadata inside plus a ``.json`` sidecar, both written atomically; every random draw comes from one seeded
generator whose state is saved, so a resumed run continues bit-for-bit on the same device and thread count), a NaN
guard (a non-finite render, loss or gradient skips the step, counted in ``skipped_steps``) and the refusal to resume
with other settings (only the step count, checkpoint and preview settings may change).  A texture checkpoint also
holds its mesh and refuses to load onto another one.

Export: :func:`save_textured_mesh` bakes any colour function (the stage-1 field after stage 2, the texture field
after stage 3) onto the refined mesh with :func:`l2vsd_core.export.bake_texture` and writes it with
:func:`~l2vsd_core.export.save_mesh`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..distill import DistillConfig, score_distillation
from ..files import atomic_write
from ..optimize import (Stage1Optimizer, _gen_state, _is_int, _is_num, _require, check_checkpoint_keys, config_changes,
                        restore_training_state)
from ..scene.cameras import RandomCameraSampler, orbit_cameras
from ..scene.field import VanillaMLP
from ..scene.hashgrid import HashGridConfig, make_hashgrid
from ..schedules import Scheduled, TimestepSampler, check_scheduled, scheduled_value
from .dmtet import DMTet, TriangleMesh, surface_bbox
from .mesh_renderer import MeshRenderer
from .regularizers import graph_laplacian_norm, vertex_normal_consistency

__all__ = ["GeometryConfig", "GeometryRefiner", "TextureConfig", "TextureRefiner", "TextureField",
           "dmtet_from_density", "save_textured_mesh", "GEOMETRY_FORMAT", "TEXTURE_FORMAT"]

GEOMETRY_FORMAT = "l2vsd_geometry/1"
TEXTURE_FORMAT = "l2vsd_texture/1"
PathLike = Union[str, os.PathLike]

# ProlificDreamer's max_step_percent for every stage: 0.98 until step 5000, then 0.5
_PD_MAX_STEP = (5000, 0.98, 0.5, 5001)


def _geometry_distill() -> DistillConfig:
    return DistillConfig(method="sds", guidance_scale=100.0, weighting="sds",
                         timesteps=TimestepSampler(1000, 0.02, list(_PD_MAX_STEP), max_steps=15000))


def _texture_distill() -> DistillConfig:
    return DistillConfig(method="vsd", guidance_scale=7.5, weighting="sds",
                         timesteps=TimestepSampler(1000, 0.02, list(_PD_MAX_STEP), max_steps=30000))


# ------------------------------------------------------------------------------------------------------------ configs
@dataclass
class _RefineConfig:
    """Settings shared by both stages (threestudio's random-camera datamodule and trainer)."""

    steps: int = 15000
    seed: int = 0
    batch_size: int = 1
    resolution: int = 512                        # square renders (threestudio: 512 in both stages)
    distill: DistillConfig = field(default_factory=_geometry_distill)
    lambda_distill: Scheduled = 1.0              # threestudio lambda_sds / lambda_vsd; 0 skips the prior entirely
    betas: Sequence[float] = (0.9, 0.99)
    eps: float = 1e-15
    checkpoint_every: int = 1000                 # 0: only at the end / on stop
    checkpoint_path: Optional[str] = None
    preview_every: int = 200                     # 0: no previews
    preview_resolution: int = 64
    preview_views: int = 120
    preview_elevation: float = 15.0
    preview_distance: float = 1.5
    preview_fovy: float = 70.0
    camera_distance_range: Sequence[float] = (1.0, 1.5)
    fovy_range: Sequence[float] = (40.0, 70.0)
    elevation_range: Sequence[float] = (-10.0, 45.0)

    def __post_init__(self):
        self.validate()

    def validate(self):
        for name in ("steps", "batch_size", "resolution", "preview_resolution", "preview_views"):
            v = getattr(self, name)
            _require(_is_int(v) and v >= 1, name, v, "an integer >= 1")
        _require(_is_int(self.seed), "seed", self.seed, "an integer")
        for name in ("checkpoint_every", "preview_every"):
            v = getattr(self, name)
            _require(_is_int(v) and v >= 0, name, v, "an integer >= 0 (0 = off)")
        _require(isinstance(self.distill, DistillConfig), "distill", self.distill, "a DistillConfig")
        _require(_is_num(self.eps) and self.eps > 0, "eps", self.eps, "a finite number > 0")
        _require(isinstance(self.betas, (list, tuple)) and len(self.betas) == 2
                 and all(_is_num(b) and 0 <= b < 1 for b in self.betas), "betas", self.betas, "two numbers in [0, 1)")
        self.betas = tuple(self.betas)
        for name in ("preview_elevation", "preview_distance", "preview_fovy"):
            v = getattr(self, name)
            _require(_is_num(v), name, v, "a finite number")
        for name in ("camera_distance_range", "fovy_range", "elevation_range"):
            v = getattr(self, name)
            _require(isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(x) for x in v), name, v,
                     "a pair of numbers (min, max)")
            setattr(self, name, tuple(v))
        self._check_weights("lambda_distill")
        _require(self.checkpoint_path is None or isinstance(self.checkpoint_path, (str, os.PathLike)),
                 "checkpoint_path", self.checkpoint_path, "a path or None")
        return self

    def _check_weights(self, *names: str) -> None:
        for name in names:
            v = getattr(self, name)
            check_scheduled(name, v)
            vals = [v] if _is_num(v) else [v[1], v[2]]
            _require(all(x >= 0 for x in vals), name, v, "a weight >= 0 (or a schedule of weights >= 0)")

    def check_prior(self, prior) -> None:
        """The render and preview sizes must be multiples of the prior's pixel factor (8 for SD's VAE)."""
        factor = int(getattr(prior, "vae_scale_factor", 1))
        for name in ("resolution", "preview_resolution"):
            if getattr(self, name) % factor:
                raise ValueError(f"{name} {getattr(self, name)} must be a multiple of the prior's pixel factor "
                                 f"{factor}")

    def to_json(self) -> dict:
        def conv(v):
            if dataclasses.is_dataclass(v):
                return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, (list, tuple)):
                return [conv(x) for x in v]
            if isinstance(v, os.PathLike):
                return os.fspath(v)
            return v
        return conv(self)


@dataclass
class GeometryConfig(_RefineConfig):
    """Stage-2 settings; defaults are threestudio's ``prolificdreamer-geometry.yaml`` (SDS on normal maps)."""

    steps: int = 15000
    distill: DistillConfig = field(default_factory=_geometry_distill)
    lr: float = 0.005                            # Adam on the SDF and the deformation (no weight decay)
    lambda_normal_consistency: Scheduled = 10000.0
    lambda_laplacian_smoothness: Scheduled = 10000.0
    dmtet_resolution: int = 64                   # cubes per axis; our 64 ~ threestudio's 128 tets (dmtet docstring)
    deformation_scale: float = 0.5               # largest offset, in grid cells
    isosurface_threshold: Union[str, float] = "auto"  # stage-1 density level of the surface
    bbox_resolution: int = 64                    # lattice of the coarse pass that finds the object's box
    bbox_margin: float = 0.1
    normal_background: float = 0.0               # comp_normal off the mesh (threestudio: 0)

    def validate(self) -> "GeometryConfig":
        super().validate()
        _require(_is_num(self.lr) and self.lr > 0, "lr", self.lr, "a finite number > 0")
        self._check_weights("lambda_normal_consistency", "lambda_laplacian_smoothness")
        for name in ("dmtet_resolution", "bbox_resolution"):
            v = getattr(self, name)
            _require(_is_int(v) and v >= 2, name, v, "an integer >= 2")
        _require(_is_num(self.deformation_scale) and self.deformation_scale >= 0, "deformation_scale",
                 self.deformation_scale, "a finite number >= 0")
        _require(_is_num(self.bbox_margin) and self.bbox_margin >= 0, "bbox_margin", self.bbox_margin,
                 "a finite number >= 0")
        _require(self.isosurface_threshold == "auto" or _is_num(self.isosurface_threshold), "isosurface_threshold",
                 self.isosurface_threshold, "'auto' or a finite density value")
        _require(_is_num(self.normal_background), "normal_background", self.normal_background, "a finite number")
        return self


@dataclass
class TextureConfig(_RefineConfig):
    """Stage-3 settings; defaults are threestudio's ``prolificdreamer-texture.yaml`` (VSD on the rendered colour)."""

    steps: int = 30000
    distill: DistillConfig = field(default_factory=_texture_distill)
    lr_encoding: float = 0.01
    lr_network: float = 0.001
    lr_background: float = 0.001
    weight_decay: float = 0.01                   # torch's AdamW default (threestudio passes none)

    def validate(self) -> "TextureConfig":
        super().validate()
        for name in ("lr_encoding", "lr_network", "lr_background", "weight_decay"):
            v = getattr(self, name)
            _require(_is_num(v) and v >= 0, name, v, "a finite number >= 0")
        return self


# ------------------------------------------------------------------------------------------------------ the scenes
def dmtet_from_density(density_fn: Callable[[torch.Tensor], torch.Tensor], radius: float, resolution: int = 64,
                       threshold: Union[str, float] = "auto", bbox_resolution: int = 64, bbox_margin: float = 0.1,
                       deformation_scale: float = 0.5, device=None) -> DMTet:
    """A :class:`DMTet` over the tight box of the dense region of ``density_fn`` (a stage-1 field's ``density``)
    with ``sdf = threshold - density`` (threestudio's ``create_from``); ``threshold="auto"`` is the exporter's rule
    on the coarse lattice, then used for both passes.  ``ValueError`` naming the fix when there is no surface."""
    try:
        bbox, level = surface_bbox(density_fn, radius, threshold, resolution=bbox_resolution, margin=bbox_margin,
                                   device=device)
        dmtet = DMTet(resolution, bbox, deformable=True, deformation_scale=deformation_scale)
        if device is not None:
            dmtet = dmtet.to(device)
        dmtet.init_from_density(density_fn, threshold=level)
        with torch.no_grad():
            empty = dmtet().faces.shape[0] == 0
        if empty:
            raise ValueError(f"marching tetrahedra found no faces at density {level:g} on the "
                             f"{resolution}^3 grid")
    except ValueError as e:
        raise ValueError(f"the stage-1 field has no surface to refine ({e}): train stage 1 longer (or check the "
                         f"prompt and seed), or set isosurface_threshold to a density inside the field's range") from e
    return dmtet


class TextureField(nn.Module):
    """The texture stage's colour field (threestudio ``tetrahedra-sdf-grid`` appearance + ``no-material``): world
    points in ``[-radius, radius]^3`` -> ``[0, 1]^3`` (clamped) -> hash grid -> MLP -> sigmoid.

    ``forward(points [N, 3], directions=None) -> {"rgb": [N, 3]}`` (view-independent), so it plugs into
    :class:`MeshRenderer` and :func:`l2vsd_core.export.bake_texture` like a stage-1 field.
    """

    def __init__(self, radius: float = 1.0, hashgrid: Optional[HashGridConfig] = None, backend: str = "auto",
                 mlp_neurons: int = 64, mlp_hidden_layers: int = 1, seed: Optional[int] = None):
        super().__init__()
        _require(_is_num(radius) and radius > 0, "radius", radius, "a finite number > 0")
        self.radius = float(radius)
        self.encoding = make_hashgrid(hashgrid or HashGridConfig(), backend=backend, seed=seed)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):  # reproducible, global RNG untouched
            if seed is not None:
                torch.manual_seed(int(seed))
            self.feature_network = VanillaMLP(self.encoding.n_output_dims, 3, mlp_neurons, mlp_hidden_layers)

    def forward(self, points: torch.Tensor, directions: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        unit = ((points + self.radius) / (2.0 * self.radius)).clamp(0.0, 1.0)
        enc = self.encoding(unit).to(points.dtype)
        return {"rgb": torch.sigmoid(self.feature_network(enc))}

    def parameter_groups(self, lr_encoding: float = 0.01, lr_network: float = 0.001) -> list[dict]:
        return [{"params": list(self.encoding.parameters()), "lr": lr_encoding, "name": "texture.encoding"},
                {"params": list(self.feature_network.parameters()), "lr": lr_network,
                 "name": "texture.feature_network"}]


# ------------------------------------------------------------------------------------------------ the shared loop
class _RefinementLoop:
    """What both stages share: cameras, the distillation of a rendered image, the NaN guard, run() and checkpoints.
    Subclasses set ``FORMAT`` and ``optimizer`` and write ``step``, ``_render_preview`` and ``_modules``."""

    FORMAT = ""
    STAGE = ""

    def __init__(self, prior, score, prompt_processor, config: _RefineConfig, renderer: MeshRenderer, device):
        config.validate()
        config.check_prior(prior)
        if config.distill.needs_trainable_score and score is None:
            raise ValueError(f"method {config.distill.method!r} needs a trainable score (the LoRA); got score=None "
                             f"— attach one or use method 'sds'")
        if not isinstance(renderer, MeshRenderer):
            raise ValueError(f"renderer must be a MeshRenderer; got {type(renderer).__name__}")
        self.prior, self.score, self.prompts = prior, score, prompt_processor
        self.config, self.renderer = config, renderer
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.sampler = RandomCameraSampler(camera_distance_range=config.camera_distance_range,
                                           fovy_range=config.fovy_range, elevation_range=config.elevation_range)
        self.optimizer: torch.optim.Optimizer
        self.global_step = 0
        self.skipped_steps = 0

    # ---------------------------------------------------------------------------------------------------- step
    def _cameras(self):
        res = self.config.resolution
        self.sampler.width = self.sampler.height = res
        return self.sampler.sample(self.config.batch_size, generator=self.generator, device=self.device)

    def _distill(self, image: torch.Tensor, cameras, terms: dict) -> torch.Tensor:
        """λ_distill · the estimator's loss for ``image`` [B, 3, H, W] in [0, 1] (resized to the prior's size)."""
        cfg, step, g = self.config, self.global_step, self.generator
        lam = scheduled_value(cfg.lambda_distill, step)
        if lam == 0:
            return image.new_zeros(())
        size = int(self.prior.image_size)
        if image.shape[-1] != size or image.shape[-2] != size:
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        x0 = self.prior.encode_images(image, generator=g)
        cond = self.prompts.conditioning(cameras.elevation_deg.detach().cpu(), cameras.azimuth_deg.detach().cpu(),
                                         cameras.c2w_flat())
        result = score_distillation(x0, self.prior, self.score, cond, cfg.distill, step=step, generator=g)
        terms["loss_distill"] = float(result.loss.detach())
        if result.lora_loss is not None:
            terms["loss_lora"] = float(result.lora_loss)
        for k, v in result.terms.items():
            terms[f"distill_{k}"] = float(v)
        return lam * result.loss

    def _new_terms(self) -> dict[str, float]:
        return {"step": float(self.global_step), "resolution": float(self.config.resolution), "skipped": 0.0}

    def _finish(self, loss: torch.Tensor, terms: dict) -> dict[str, float]:
        """NaN guard, backward, one optimizer step."""
        terms["loss"] = float(loss.detach())
        if not math.isfinite(terms["loss"]):
            return self._skip(terms, "loss")
        if loss.requires_grad:
            loss.backward()
        params = [p for grp in self.optimizer.param_groups for p in grp["params"]]
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params):
            return self._skip(terms, "grad")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return terms

    def _skip(self, terms: dict, why: str) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.global_step += 1
        terms["skipped"] = 1.0
        terms.setdefault("loss", float("nan"))
        terms["skipped_steps"] = float(self.skipped_steps)
        terms["skip_reason_" + why] = 1.0
        return terms

    # ------------------------------------------------------------------------------------------------- preview
    def _train_mode(self, on: bool) -> None:
        for m in self._modules().values():
            m.train(on)

    @torch.no_grad()
    def preview(self, step: Optional[int] = None) -> torch.Tensor:
        """An orbit-camera render [H, W, 3] in [0, 1], in evaluation mode and without any random draw (the training
        trajectory is unchanged); view ``(step // preview_every) % preview_views`` of the orbit."""
        cfg = self.config
        step = self.global_step if step is None else step
        view = (step // max(cfg.preview_every, 1)) % cfg.preview_views
        cam = orbit_cameras(1, cfg.preview_elevation, cfg.preview_distance, cfg.preview_fovy, cfg.preview_resolution,
                            cfg.preview_resolution, start_azimuth_deg=-180.0 + 360.0 * view / cfg.preview_views,
                            device=self.device)
        modules = list(self._modules().values())
        was = [m.training for m in modules]
        self._train_mode(False)
        try:
            image = self._render_preview(cam)
        finally:
            for m, t in zip(modules, was):
                m.train(t)
        return image[0].detach().float().clamp(0, 1).cpu()

    def _render_preview(self, cameras) -> torch.Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------- run
    def step(self) -> dict[str, float]:
        raise NotImplementedError

    def run(self, callback: Optional[Callable] = None, should_stop: Optional[Callable[[], bool]] = None,
            checkpoint_path: Optional[PathLike] = None) -> int:
        """Step until ``config.steps`` (:meth:`Stage1Optimizer.run`'s contract): ``callback(step, terms, preview)``
        after each step, ``should_stop()`` before each; checkpoints every ``checkpoint_every`` steps, on stop and at
        the end when a path is known.  Returns the number of steps done."""
        cfg = self.config
        path = checkpoint_path if checkpoint_path is not None else cfg.checkpoint_path
        while self.global_step < cfg.steps:
            if should_stop is not None and should_stop():
                break
            terms = self.step()
            done = self.global_step
            preview = self.preview(done) if cfg.preview_every and done % cfg.preview_every == 0 else None
            if callback is not None:
                callback(done, terms, preview)
            if path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                self.save_checkpoint(path)
        if path is not None:
            self.save_checkpoint(path)
        return self.global_step

    # ---------------------------------------------------------------------------------------------- checkpoint
    def _modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def _check_extra_tensors(self, tensors: dict, path: Path) -> None:
        pass

    def _extra_metadata(self) -> dict:
        return {}

    def _load_extra_metadata(self, meta: dict) -> None:
        pass

    def _group_names(self) -> list[str]:
        return [grp.get("name", f"group{i}") for i, grp in enumerate(self.optimizer.param_groups)]

    def _expected_tensors(self) -> dict[str, torch.Tensor]:
        expected = {f"{prefix}.{k}": v for prefix, module in self._modules().items()
                    for k, v in module.state_dict().items()}
        expected.update(self._extra_tensors())
        if self.score is not None:
            expected.update({f"score.{k}": v for k, v in self.score.trainable_state_dict().items()})
        return expected

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {k: v.detach().clone().contiguous().cpu() for k, v in self._expected_tensors().items()}
        if self.score is not None:
            tensors.update(Stage1Optimizer._flatten_optim(self.score.optimizer, "score_optim", None))
        tensors.update(Stage1Optimizer._flatten_optim(self.optimizer, "optim", self._group_names()))
        return {k: v.cpu() for k, v in tensors.items()}

    def state_metadata(self) -> dict:
        meta = {"format": self.FORMAT, "stage": self.STAGE, "step": self.global_step,
                "skipped_steps": self.skipped_steps, "config": self.config.to_json(),
                "rng": {"loop": _gen_state(self.generator),
                        "torch_cpu": [int(x) for x in torch.get_rng_state().tolist()]}}
        if self.score is not None and getattr(self.score, "generator", None) is not None:
            meta["rng"]["score"] = _gen_state(self.score.generator)
        meta.update(self._extra_metadata())
        return meta

    def save_checkpoint(self, path: PathLike) -> Path:
        """Write ``path`` (safetensors, the metadata inside) and ``path + '.json'`` atomically; returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors, meta = self.state_tensors(), self.state_metadata()
        text = json.dumps(meta)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={self.FORMAT.split("/")[0]: text}))
        sidecar = path.with_name(path.name + ".json")
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
        return path

    def load_checkpoint(self, path: PathLike) -> dict:
        """Restore everything from ``path``; ``ValueError`` (before anything changes) if it is unreadable, of
        another stage, or made with other settings or shapes.  Returns the metadata."""
        from safetensors import safe_open

        path = Path(path)
        key = self.FORMAT.split("/")[0]
        try:
            tensors = {}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
            if key not in metadata:
                found = ", ".join(sorted(metadata)) or "none"
                raise ValueError(f"no {key!r} metadata (found: {found})")
            meta = json.loads(metadata[key])
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"cannot read checkpoint {path}: not a valid {self.STAGE}-stage checkpoint ({e})") from e
        if meta.get("format") != self.FORMAT:
            raise ValueError(f"checkpoint {path} has format {meta.get('format')!r}; expected {self.FORMAT!r}")
        changed = config_changes(meta.get("config", {}), self.config.to_json())
        if changed:
            shown = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in changed[:6])
            raise ValueError(f"checkpoint {path} was made with other settings ({shown}"
                             f"{'; …' if len(changed) > 6 else ''}): resume with the same settings (only the step "
                             f"count, checkpoint and preview settings may change) or start the {self.STAGE} stage "
                             f"anew")
        got = {k: v for k, v in tensors.items() if not k.startswith(("optim.", "score_optim."))}
        self._check_extra_tensors(got, path)
        expected = self._expected_tensors()
        check_checkpoint_keys(path, expected, got)

        self._load_extra_metadata(meta)
        restore_training_state(self, tensors, meta)
        return meta


# ------------------------------------------------------------------------------------------------ stage 2: geometry
class GeometryRefiner(_RefinementLoop):
    """Stage-2 loop over ``dmtet`` (a :class:`DMTet`; build it with :meth:`from_stage1`), distilled from ``prior``
    on normal maps with ``prompt_processor``'s conditioning; ``score``: a LoRA for the VSD-family methods, else None.

    Checkpoint tensors: ``dmtet.sdf``, ``dmtet.deformation``, ``dmtet.bbox``, ``optim.geometry.<i>.<state>`` (Adam),
    and ``score.*`` / ``score_optim.*`` with a LoRA; metadata key ``"l2vsd_geometry"``.
    """

    FORMAT = GEOMETRY_FORMAT
    STAGE = "geometry"

    def __init__(self, prior, score, prompt_processor, dmtet: DMTet, config: Optional[GeometryConfig] = None,
                 renderer: Optional[MeshRenderer] = None):
        config = GeometryConfig() if config is None else config
        if not isinstance(config, GeometryConfig):
            raise ValueError(f"config must be a GeometryConfig; got {type(config).__name__}")
        if not isinstance(dmtet, DMTet):
            raise ValueError(f"dmtet must be a DMTet; got {type(dmtet).__name__}")
        renderer = MeshRenderer(normal_background=config.normal_background) if renderer is None else renderer
        super().__init__(prior, score, prompt_processor, config, renderer, dmtet.sdf.device)
        self.dmtet = dmtet
        params = [dmtet.sdf] + ([dmtet.deformation] if dmtet.deformable else [])
        self.optimizer = torch.optim.Adam([{"params": params, "lr": config.lr, "name": "geometry"}],
                                          betas=tuple(config.betas), eps=config.eps)

    @classmethod
    def from_stage1(cls, prior, score, prompt_processor, field, config: Optional[GeometryConfig] = None,
                    renderer: Optional[MeshRenderer] = None) -> "GeometryRefiner":
        """The stage-2 loop initialised from a stage-1 field (anything with ``density(points)`` and ``radius``):
        :func:`dmtet_from_density` with the config's grid, threshold and box settings, on the field's device."""
        config = GeometryConfig() if config is None else config
        try:
            device = next(field.parameters()).device
        except (AttributeError, StopIteration):
            device = torch.device("cpu")
        dmtet = dmtet_from_density(field.density, float(getattr(field, "radius", 1.0)), config.dmtet_resolution,
                                   config.isosurface_threshold, config.bbox_resolution, config.bbox_margin,
                                   config.deformation_scale, device=device)
        return cls(prior, score, prompt_processor, dmtet, config, renderer)

    def _modules(self) -> dict[str, nn.Module]:
        return {"dmtet": self.dmtet}

    def _extra_metadata(self) -> dict:
        return {"isosurface_threshold": self.dmtet.isosurface_threshold}

    def _load_extra_metadata(self, meta: dict) -> None:
        self.dmtet.isosurface_threshold = meta.get("isosurface_threshold", self.dmtet.isosurface_threshold)

    def regularizers(self, mesh: TriangleMesh, step: int) -> dict[str, tuple[float, torch.Tensor]]:
        """threestudio's mesh terms at their scale: ``normal_consistency`` (vertex normals along edges) and
        ``laplacian_smoothness`` (mean ‖(D − A) v‖); ``{name: (λ, value)}`` for the λ > 0."""
        cfg, terms = self.config, {}
        lam = scheduled_value(cfg.lambda_normal_consistency, step)
        if lam > 0:
            terms["normal_consistency"] = (lam, vertex_normal_consistency(*mesh))
        lam = scheduled_value(cfg.lambda_laplacian_smoothness, step)
        if lam > 0:
            terms["laplacian_smoothness"] = (lam, graph_laplacian_norm(*mesh))
        return terms

    def step(self) -> dict[str, float]:
        """One step; returns float terms (``loss``, ``loss_distill``, ``loss_normal_consistency``,
        ``loss_laplacian_smoothness``, ``mesh_faces``, …, ``skipped`` = 1.0 when the NaN guard skipped it)."""
        self._train_mode(True)
        cams = self._cameras()
        self.optimizer.zero_grad(set_to_none=True)
        terms = self._new_terms()
        mesh = self.dmtet()
        terms["mesh_vertices"], terms["mesh_faces"] = float(mesh.vertices.shape[0]), float(mesh.faces.shape[0])
        if mesh.faces.shape[0] == 0:  # the SDF has no sign change left: nothing to render or regularise
            return self._skip(terms, "empty_mesh")
        out = self.renderer.render(mesh, cams, self.config.resolution, self.config.resolution)
        image = out["comp_normal"].permute(0, 3, 1, 2)
        if not torch.isfinite(image.detach()).all():
            return self._skip(terms, "render")
        loss = self._distill(image, cams, terms)
        for name, (lam, value) in self.regularizers(mesh, self.global_step).items():
            loss = loss + lam * value
            terms[f"loss_{name}"] = float(value.detach())
        return self._finish(loss, terms)

    def _render_preview(self, cameras) -> torch.Tensor:
        mesh = self.dmtet()
        if mesh.faces.shape[0] == 0:
            return torch.full((1, cameras.height, cameras.width, 3), self.config.normal_background)
        return self.renderer.render(mesh, cameras)["comp_normal"]

    @torch.no_grad()
    def final_mesh(self, remove_outliers: bool = True) -> TriangleMesh:
        """The current surface, detached; ``remove_outliers``: drop the components with under 1 % of the largest
        one's faces (threestudio's ``isosurface_remove_outliers`` of the texture stage).  ``ValueError`` when the
        surface is empty."""
        mesh = self.dmtet()
        if mesh.faces.shape[0] == 0:
            raise ValueError("the refined surface is empty (the SDF has no sign change): lower the geometry "
                             "stage's learning rate or regularizer weights, or restart it from stage 1")
        if remove_outliers:
            from ..export import remove_floaters

            kept = remove_floaters(mesh.to_trimesh())
            mesh = TriangleMesh(torch.as_tensor(kept.vertices, dtype=mesh.vertices.dtype, device=self.device),
                                torch.as_tensor(kept.faces, dtype=torch.long, device=self.device))
        return TriangleMesh(mesh.vertices.detach().clone(), mesh.faces.detach().clone())


# ------------------------------------------------------------------------------------------------- stage 3: texture
class TextureRefiner(_RefinementLoop):
    """Stage-3 loop: the colour ``field`` (e.g. a fresh :class:`TextureField`) and ``background`` (e.g. a fresh
    :class:`~l2vsd_core.scene.field.EnvironmentBackground`, or None for black) on the fixed ``mesh``, distilled from
    ``prior``; ``score``: the LoRA for the VSD-family methods (the default, ``vsd``), None for ``sds``.

    Checkpoint tensors: ``field.*``, ``background.*``, ``mesh.vertices``, ``mesh.faces``,
    ``optim.<group>.<i>.<state>`` (AdamW), ``score.*`` / ``score_optim.*``; metadata key ``"l2vsd_texture"``.
    """

    FORMAT = TEXTURE_FORMAT
    STAGE = "texture"

    def __init__(self, prior, score, prompt_processor, mesh: TriangleMesh, field: nn.Module,
                 background: Optional[nn.Module], config: Optional[TextureConfig] = None,
                 renderer: Optional[MeshRenderer] = None):
        config = TextureConfig() if config is None else config
        if not isinstance(config, TextureConfig):
            raise ValueError(f"config must be a TextureConfig; got {type(config).__name__}")
        vertices, faces = mesh
        if faces.dim() != 2 or faces.shape[-1] != 3 or faces.shape[0] == 0:
            raise ValueError(f"the texture stage needs a mesh with faces; got faces of shape {tuple(faces.shape)}")
        if not hasattr(field, "parameter_groups"):
            raise ValueError(f"field must be a colour field with parameter_groups() (e.g. TextureField); got "
                             f"{type(field).__name__}")
        first = next(field.parameters())
        super().__init__(prior, score, prompt_processor, config, MeshRenderer() if renderer is None else renderer,
                         first.device)
        # the geometry is fixed: plain detached tensors, never optimised
        self.mesh = TriangleMesh(vertices.detach().to(device=first.device, dtype=first.dtype).clone(),
                                 faces.detach().to(device=first.device, dtype=torch.long).clone())
        self.field, self.background = field, background
        groups = field.parameter_groups(config.lr_encoding, config.lr_network)
        if background is not None:
            groups += background.parameter_groups(config.lr_background)
        self.optimizer = torch.optim.AdamW(groups, betas=tuple(config.betas), eps=config.eps,
                                           weight_decay=config.weight_decay)

    def _modules(self) -> dict[str, nn.Module]:
        mods = {"field": self.field}
        if self.background is not None:
            mods["background"] = self.background
        return mods

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"mesh.vertices": self.mesh.vertices, "mesh.faces": self.mesh.faces}

    def _check_extra_tensors(self, tensors: dict, path: Path) -> None:
        saved = [tensors.get("mesh.vertices"), tensors.get("mesh.faces")]
        if any(t is None for t in saved):
            return  # reported with the other missing tensors
        same = all(a.shape == b.shape and torch.equal(a, b.cpu()) for a, b in zip(saved, self.mesh))
        if not same:
            raise ValueError(f"checkpoint {path} was made on another mesh: a texture belongs to the mesh it was "
                             f"trained on — start the texture stage anew, or resume with that mesh")

    def render_image(self, cameras, resolution: int, generator=None) -> dict[str, torch.Tensor]:
        return self.renderer.render(self.mesh, cameras, resolution, resolution, rgb_fn=self.field,
                                    background=self.background, generator=generator)

    def step(self) -> dict[str, float]:
        """One step; returns float terms (``loss``, ``loss_distill``, ``loss_lora``, …, ``skipped``)."""
        self._train_mode(True)
        cams = self._cameras()
        self.optimizer.zero_grad(set_to_none=True)
        terms = self._new_terms()
        out = self.render_image(cams, self.config.resolution, generator=self.generator)
        image = out["rgb"].permute(0, 3, 1, 2)
        if not torch.isfinite(image.detach()).all():
            return self._skip(terms, "render")
        return self._finish(self._distill(image, cams, terms), terms)

    def _render_preview(self, cameras) -> torch.Tensor:
        return self.render_image(cameras, cameras.height)["rgb"]


# -------------------------------------------------------------------------------------------------------- export
def save_textured_mesh(mesh: TriangleMesh, color_field, path: PathLike, texture_size: int = 1024,
                       max_faces: Optional[int] = None):
    """Bake ``color_field`` (anything :func:`l2vsd_core.export.bake_texture` queries: a field returning
    ``{"rgb"}`` or a function returning colours) onto ``mesh`` and write it (GLB by the suffix, via
    :func:`~l2vsd_core.export.save_mesh`); decimated to ``max_faces`` first when given.  Returns
    ``(trimesh.Trimesh, path)``."""
    from ..export import bake_texture, decimate, save_mesh

    if mesh.faces.shape[0] == 0:
        raise ValueError("cannot export an empty mesh (no faces)")
    surface = mesh.to_trimesh()
    if max_faces is not None and len(surface.faces) > max_faces:
        surface = decimate(surface, max_faces)
    baked = bake_texture(surface, color_field, texture_size=texture_size)
    return baked, save_mesh(baked, path)
