"""Diffusion priors (the frozen ε_pre of score distillation): loading from local files and the ``FrozenScore`` model.

``load_prior(path, device="auto", dtype="auto", prediction_type=None)`` reads a diffusers folder or a single-file
SD 1.x / 2.x checkpoint, strictly offline, and returns a :class:`DiffusionPrior`;
``load_prior_from_state_dict(state_dict, …)`` does the same for a single file's weights already in memory (e.g.
taken from a host application's loaded models).
"""
from .load import (BUNDLED_PRIORS, bundled_prior_name, load_prior, load_prior_from_state_dict, load_state_dict_file,
                   resolve_prior_path, scheduler_config_from_alphas_cumprod)
from .model import DiffusionPrior, PRIOR_PREDICTION_TYPES

__all__ = ["BUNDLED_PRIORS", "bundled_prior_name", "resolve_prior_path", "DiffusionPrior", "PRIOR_PREDICTION_TYPES", "load_prior", "load_state_dict_file",
           "load_prior_from_state_dict", "scheduler_config_from_alphas_cumprod"]
