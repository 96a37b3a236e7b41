"""InitNeRF: a fresh stage-1 scene (hash-grid NeRF field + environment background); the scene and mesh socket
types."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Optional

from .common import CATEGORY_SCENE, SCENE_TYPE, check_choice, input_error

BACKENDS = ("auto", "torch", "tcnn")
# "learned": ProlificDreamer's environment map with random solid-colour augmentation; a colour: fixed, for a prior
# that only knows one background (the bundled toy prior: white)
BACKGROUNDS = {"learned": None, "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}


@dataclass(frozen=True)
class SceneSettings:
    """Everything InitNeRF was given; L2VSDOptimize turns the render settings into its Stage1Config."""
    levels: int
    log2_hashmap_size: int
    base_resolution: int
    max_resolution: float
    mlp_neurons: int
    samples_per_ray: int
    grid_resolution: int
    radius: float
    seed: int
    backend: str
    background: str = "learned"


def make_background(settings: SceneSettings, seed: int):
    """A fresh background of the kind ``settings`` names (stage 1's, and the texture stage's own)."""
    from l2vsd_core.scene.field import BackgroundConfig, EnvironmentBackground, SolidBackground

    color = BACKGROUNDS[settings.background]
    return EnvironmentBackground(BackgroundConfig(), seed=seed) if color is None else SolidBackground(color)


@dataclass
class Scene:
    """What an L2VSD_SCENE socket carries. ComfyUI caches node outputs and may hand the same Scene to several
    nodes, so nodes never change one in place: L2VSDOptimize trains a copy (:meth:`copy`) and returns that."""
    settings: SceneSettings
    field: object                     # l2vsd_core.scene.field.ImplicitVolume
    background: object                # l2vsd_core.scene.field.EnvironmentBackground or SolidBackground
    renderer: Optional[object] = None  # VolumeRenderer with its occupancy grid, once optimized
    steps_done: int = 0
    prompt: str = ""
    history: list = field(default_factory=list)  # loss terms per step, for the curves
    negative_prompt: str = ""

    def copy(self) -> "Scene":
        return replace(self, field=copy.deepcopy(self.field), background=copy.deepcopy(self.background),
                       renderer=copy.deepcopy(self.renderer), history=list(self.history))

    def make_renderer(self):
        """The scene's renderer, or (never optimized) a plain one without an occupancy grid."""
        if self.renderer is not None:
            return self.renderer
        from l2vsd_core.scene.renderer import VolumeRenderer
        return VolumeRenderer(radius=self.settings.radius, num_samples_per_ray=self.settings.samples_per_ray)


@dataclass
class RefinedMesh:
    """What an L2VSD_MESH socket carries: the refined mesh and what colours it. ComfyUI caches node outputs and may
    hand one to several nodes, so nodes never change one in place (RefineTexture makes a new one)."""
    mesh: object                   # l2vsd_core.mesh.dmtet.TriangleMesh, detached, on the prior's device
    color: object                  # the colour field: stage 1's (after RefineGeometry) or a TextureField
    background: Optional[object]   # drawn behind it in turntables: stage 1's, or the texture stage's own
    settings: SceneSettings        # the stage-1 scene's: radius and hash grid of the texture stage's field
    stage: str                     # "geometry" or "texture"
    prompt: str = ""               # the prompts it was refined with (the next stage's default)
    negative_prompt: str = ""
    history: list = field(default_factory=list)


def hashgrid_config(settings: SceneSettings):
    """The hash grid of ``settings`` (also the texture stage's colour field's, as in threestudio)."""
    from l2vsd_core.scene.hashgrid import HashGridConfig

    # The hash grid takes the growth factor between levels; users think in the finest resolution (tcnn's and
    # threestudio's convention), so convert, as the CLI does.
    ratio = max(settings.max_resolution / settings.base_resolution, 1.0)
    per_level_scale = 1.0 if settings.levels == 1 else math.exp(math.log(ratio) / (settings.levels - 1))
    return HashGridConfig(n_levels=settings.levels, log2_hashmap_size=settings.log2_hashmap_size,
                          base_resolution=settings.base_resolution, per_level_scale=per_level_scale)


def build_scene(settings: SceneSettings) -> Scene:
    import torch
    from l2vsd_core.scene.field import FieldConfig, ImplicitVolume

    grid = hashgrid_config(settings)
    # Stage 1 uses no normals (ProlificDreamer); the background is seeded apart from the field, as in the CLI.
    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; these weights will be trained
        field_ = ImplicitVolume(FieldConfig(radius=settings.radius, hashgrid=grid, backend=settings.backend,
                                            mlp_neurons=settings.mlp_neurons, normal_type=None), seed=settings.seed)
        background = make_background(settings, settings.seed + 1)
    return Scene(settings=settings, field=field_, background=background)


class InitNeRF:
    """A new, untrained NeRF scene for L2VSDOptimize."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "levels": ("INT", {"default": 16, "min": 1, "max": 32,
                               "tooltip": "Hash-grid levels (ProlificDreamer: 16; the toy demo: 8)."}),
            "log2_hashmap_size": ("INT", {"default": 19, "min": 10, "max": 24,
                                          "tooltip": "log2 of the entries per hash-grid level (ProlificDreamer: 19; "
                                                     "toy: 15). Memory grows as 2^this."}),
            "base_resolution": ("INT", {"default": 16, "min": 2, "max": 1024,
                                        "tooltip": "Coarsest hash-grid resolution."}),
            "max_resolution": ("INT", {"default": 4096, "min": 2, "max": 65536,
                                       "tooltip": "Finest hash-grid resolution (ProlificDreamer: 4096; toy: 256)."}),
            "mlp_neurons": ("INT", {"default": 64, "min": 8, "max": 256, "step": 8,
                                    "tooltip": "Width of the density/colour MLP (toy: 32)."}),
            "samples_per_ray": ("INT", {"default": 512, "min": 8, "max": 2048,
                                        "tooltip": "Samples along each ray when rendering (toy: 64)."}),
            "grid_resolution": ("INT", {"default": 32, "min": 8, "max": 256,
                                        "tooltip": "Occupancy-grid resolution used to skip empty space."}),
            "radius": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.05,
                                 "tooltip": "Half size of the scene box."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1,
                             "tooltip": "Seed of the field's initial weights."}),
            "backend": (list(BACKENDS), {"default": "auto",
                                         "tooltip": "Hash-grid implementation: tcnn (tiny-cuda-nn, CUDA only), "
                                                    "torch (anywhere), auto = tcnn when installed."}),
            "background": (list(BACKGROUNDS), {"default": "learned",
                                               "tooltip": "learned: ProlificDreamer's environment map, randomly "
                                                          "recoloured half the time (for Stable Diffusion). white / "
                                                          "black: a fixed colour, for a prior that knows only that "
                                                          "background (the bundled toy prior: white)."}),
        }}

    RETURN_TYPES = (SCENE_TYPE,)
    RETURN_NAMES = ("scene",)
    FUNCTION = "init"
    CATEGORY = CATEGORY_SCENE
    DESCRIPTION = "Creates an untrained stage-1 NeRF scene (hash-grid field and background)."

    def init(self, levels, log2_hashmap_size, base_resolution, max_resolution, mlp_neurons, samples_per_ray,
             grid_resolution, radius, seed, backend, background="learned"):
        check_choice("backend", backend, BACKENDS)
        check_choice("background", background, tuple(BACKGROUNDS))
        if max_resolution < base_resolution:
            raise input_error("max_resolution", f"{max_resolution} is below base_resolution {base_resolution}",
                              "make max_resolution >= base_resolution")
        settings = SceneSettings(levels=int(levels), log2_hashmap_size=int(log2_hashmap_size),
                                 base_resolution=int(base_resolution), max_resolution=float(max_resolution),
                                 mlp_neurons=int(mlp_neurons), samples_per_ray=int(samples_per_ray),
                                 grid_resolution=int(grid_resolution), radius=float(radius), seed=int(seed),
                                 backend=backend, background=background)
        try:
            return (build_scene(settings),)
        except ImportError as e:  # tcnn asked for but not installed
            raise input_error("backend", str(e), "pick 'torch' or 'auto'") from e
