"""A procedural 3D world with known ground truth (colored solids at the origin) and what is trained on it.

* :mod:`.scene` — the shapes (SDFs), colors and the sphere-tracing renderer; silhouettes and named renders.
* :mod:`.data` — captioned renders ("a red cube, front view"), generated reproducibly per batch.
* :mod:`.train` — a small pixel-space text-to-image diffusion prior trained on them, exported as a diffusers folder
  (``prior/`` next to this file) that :func:`l2vsd_core.prior.load_prior` loads.
* :mod:`.judge` — a small classifier (shape, color) for scoring generations.

CLI: ``python -m l2vsd_core.toys.world {render-samples,train,export,judge-train} --help``.
"""
