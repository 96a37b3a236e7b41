"""``python -m l2vsd_core batch``: many prompts (× seeds), each a normal ``generate`` run in ``OUT/<slug>/``, run as
Ray tasks on a local Ray (one machine) or a cluster (``--address``).

=============  =====================================================================================================
``plan``       the prompts file → one :class:`~l2vsd_core.batch.plan.PlannedRun` per prompt (× seed); the record a
               run leaves in its folder (``batch_run.json``), by which a second start skips what finished
``task``       one run inside a Ray worker: ``generate`` resumed from the folder's checkpoint when there is one,
               its progress in ``running.json``, the toy metrics with the bundled prior, the record
``driver``     Ray: submit, retry a lost worker's run (it resumes from its checkpoint), batch progress and ETA,
               Ctrl-C, ``summary.json``
=============  =====================================================================================================

Ray is an optional extra (``pip install 'comfyui-l2vsd[distributed]'``): only ``driver`` imports it, lazily, and the
node pack never does.
"""
from .plan import PlannedRun, plan_runs, read_record, RECORD, SUMMARY, STOP_FILE  # noqa: F401
