"""InitNeRF: a fresh stage-1 scene (hash-grid NeRF field + background, made by ``l2vsd_core.build``); the scene and
mesh socket types."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Optional

from .common import CATEGORY_SCENE, SCENE_TYPE, check_choice, input_error, make_config

BACKENDS = ("auto", "torch", "tcnn")
# "learned": ProlificDreamer's environment map with random solid-colour augmentation; a colour: fixed, for a prior
# that only knows one background (the bundled toy prior: white)
BACKGROUNDS = {"learned": None, "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}


@dataclass(frozen=True)
class SceneSettings:
    """Everything InitNeRF was given, as the core's configs: the field's ``SceneConfig``, the ``BackgroundSettings``
    (also the texture stage's), and the renderer's radius, samples per ray and occupancy grid, which L2VSDOptimize
    puts into its ``NerfConfig``."""
    scene: object                  # l2vsd_core.config.SceneConfig
    background: object             # l2vsd_core.config.BackgroundSettings
    radius: float
    samples_per_ray: int
    grid_resolution: int
    seed: int


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
        """The scene's renderer, or (never optimized) stage 1's fresh one (its occupancy grid all occupied)."""
        if self.renderer is not None:
            return self.renderer
        from l2vsd_core.config import NerfConfig
        from l2vsd_core.stages import make_volume_renderer
        settings = self.settings
        renderer = make_volume_renderer(NerfConfig(radius=settings.radius, num_samples_per_ray=settings.samples_per_ray,
                                                   grid_resolution=settings.grid_resolution))
        return renderer.to(next(self.field.parameters()).device)


@dataclass
class RefinedMesh:
    """What an L2VSD_MESH socket carries: the refined mesh and what colours it. ComfyUI caches node outputs and may
    hand one to several nodes, so nodes never change one in place (RefineTexture makes a new one)."""
    mesh: object                   # l2vsd_core.mesh.dmtet.TriangleMesh, detached, on the prior's device
    color: object                  # the colour field: stage 1's (after RefineGeometry) or a TextureField
    background: Optional[object]   # drawn behind it in turntables: stage 1's, or the texture stage's own
    settings: SceneSettings        # the stage-1 scene's: radius, hash grid and background of the texture stage
    stage: str                     # "geometry" or "texture"
    prompt: str = ""               # the prompts it was refined with (the next stage's default)
    negative_prompt: str = ""
    history: list = field(default_factory=list)


def build_scene(settings: SceneSettings) -> Scene:
    """A fresh field (seed) and background (seed + 1), as ``generate`` makes them."""
    import torch
    from l2vsd_core import build

    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; these weights will be trained
        field_ = build.nerf_field(settings.scene, settings.radius, settings.seed)
        background = build.background(settings.background, settings.seed + 1)
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
        }, "optional": {
            "features_per_level": ("INT", {"default": 2, "min": 1, "max": 8,
                                           "tooltip": "Features per hash-grid level (ProlificDreamer and the toy: "
                                                      "2)."}),
        }}

    RETURN_TYPES = (SCENE_TYPE,)
    RETURN_NAMES = ("scene",)
    OUTPUT_TOOLTIPS = ("A new, untrained NeRF (hash-grid field, background and these renderer settings): into L2VSD "
                       "Optimize's scene input.",)
    FUNCTION = "init"
    CATEGORY = CATEGORY_SCENE
    DESCRIPTION = "Creates an untrained stage-1 NeRF scene (hash-grid field and background)."

    def init(self, levels, log2_hashmap_size, base_resolution, max_resolution, mlp_neurons, samples_per_ray,
             grid_resolution, radius, seed, backend, background="learned", features_per_level=2):
        settings = scene_settings(levels, log2_hashmap_size, base_resolution, max_resolution, mlp_neurons,
                                  samples_per_ray, grid_resolution, radius, seed, backend, background,
                                  features_per_level)
        try:
            return (build_scene(settings),)
        except ImportError as e:  # tcnn asked for but not installed
            raise input_error("backend", str(e), "pick 'torch' or 'auto'") from e


SCENE_FIELDS = ("levels", "features_per_level", "log2_hashmap_size", "base_resolution", "max_resolution",
                "mlp_neurons", "backend")


def scene_settings(levels, log2_hashmap_size, base_resolution, max_resolution, mlp_neurons, samples_per_ray,
                   grid_resolution, radius, seed, backend, background="learned", features_per_level=2) -> SceneSettings:
    """InitNeRF's inputs as the core's ``SceneConfig`` and ``BackgroundSettings`` (+ the renderer's settings); a value
    the config refuses is an input error naming the input."""
    from l2vsd_core.config import BackgroundSettings, SceneConfig

    check_choice("backend", backend, BACKENDS)
    check_choice("background", background, tuple(BACKGROUNDS))
    scene = make_config(SceneConfig, {name: name for name in SCENE_FIELDS}, "change it (see its tooltip)",
                        levels=int(levels), features_per_level=int(features_per_level),
                        log2_hashmap_size=int(log2_hashmap_size), base_resolution=int(base_resolution),
                        max_resolution=float(max_resolution), mlp_neurons=int(mlp_neurons), backend=backend)
    return SceneSettings(scene=scene, background=BackgroundSettings(color=BACKGROUNDS[background]),
                         radius=float(radius), samples_per_ray=int(samples_per_ray),
                         grid_resolution=int(grid_resolution), seed=int(seed))
