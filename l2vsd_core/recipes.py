"""A recipe belongs to its prior: the settings a run takes when the user sets nothing else.

Stable Diffusion priors bring ProlificDreamer's (the config defaults, :mod:`l2vsd_core.config`).  The bundled toy prior
(``--prior toy``, a 32×32 pixel model of a world of coloured shapes on white) brings :data:`TOY`: stage 1 sized for
two CPU cores (one 32 px resolution, a small hash grid, 64 samples per ray, 400 steps), the world's fixed white
background (it never saw another: behind a learned environment map it distilled a frame-filling blob), the LoRA at
lr 1e-3 (a few hundred steps instead of 25 000) and ProlificDreamer's timestep anneal scaled to the run (t ≤ 0.98 for
its first fifth, then t ≤ 0.5); stages 2 and 3 at the prior's 32 px on a 32³ DMTet, each about a minute on one CPU
thread.  The estimators stay ProlificDreamer's (CFG 7.5, SDS at CFG 100 on normal maps, LoRA rank 4).
"""
from __future__ import annotations

__all__ = ["TOY", "toy_anneal", "recipe_for"]


def toy_anneal(steps: int) -> list:
    """ProlificDreamer's ``max_step_percent [5000, 0.98, 0.5, 5001]`` of 25 000 steps, scaled to ``steps``."""
    at = max(1, int(steps) // 5)
    return [at, 0.98, 0.5, at + 1]


TOY = {
    "steps": 400, "widths": [32], "milestones": [], "samples_per_ray": 64, "grid_resolution": 32,
    "levels": 8, "log2_hashmap_size": 15, "base_resolution": 16, "max_resolution": 256.0, "mlp_neurons": 32,
    "lora_rank": 4, "lora_lr": 1e-3, "guidance_scale": 7.5, "max_step_percent": toy_anneal(400),
    "checkpoint_every": 100, "preview_every": 0, "preview_resolution": 32, "lambda_opaque": 0.0,
    "mesh_resolution": 64, "texture_size": 256, "turntable_views": 24, "turntable_resolution": 64, "device": "cpu",
    "background_color": [1.0, 1.0, 1.0],
    "front_threshold": 45.0, "back_threshold": 45.0,  # what the toy tables were measured with
    # stages 2 and 3: measured with l2vsd on "a red cube" (one thread of 2 shared cores), 0.13-0.21 s per geometry
    # step and 0.20-0.32 s per texture step, plus ≈6 s per stage of loading, DMTet set-up, export and turntable
    "geometry_steps": 300, "geometry_resolution": 32, "dmtet_resolution": 32,
    "texture_steps": 200, "texture_resolution": 32,
}


def recipe_for(prior, given: dict = None) -> dict:
    """The option defaults ``prior`` (a name or a path) brings: :data:`TOY` for the bundled toy prior (its anneal
    scaled to the ``steps`` in ``given``, the options the user set), none (the ProlificDreamer defaults) for any
    other."""
    from .prior.load import bundled_prior_name

    if bundled_prior_name(prior) != "toy":
        return {}
    recipe = dict(TOY)
    if given and "steps" in given:
        recipe["max_step_percent"] = toy_anneal(given["steps"])
    return recipe
