"""l2vsd_core: text-to-3D by score distillation (SDS, VSD, L-VSD, L²-VSD, ESD), free of ComfyUI.

The estimators live in :mod:`l2vsd_core.distill`, the Jacobian-vector products in :mod:`l2vsd_core.jvp`, timestep and
scalar schedules in :mod:`l2vsd_core.schedules`.  Nothing here imports ``comfy``; the pack's ``nodes/`` adapt it.
"""
__version__ = "0.1.0"
