"""``python -m l2vsd_core batch --prompts FILE --out DIR --prior P [--seeds 0,1] [--address ADDR] [--workers N]
[--cpus-per-run C] [--gpus-per-run G|auto] [--retries R] [generate's settings]``."""
from __future__ import annotations

import argparse
import sys

from ..cli import _ints, add_generate_arguments, auto_or_number, options_from_args

__all__ = ["add_batch_arguments", "run_batch_cli"]


def add_batch_arguments(parser: argparse.ArgumentParser, defaults: bool = True) -> argparse.ArgumentParser:
    """``batch``'s own flags, then generate's settings (``defaults=False``: the namespace holds only what was
    given, so that the prior's recipe fills the rest)."""
    keep = (lambda d: d) if defaults else (lambda d: argparse.SUPPRESS)
    batch = parser.add_argument_group("batch")
    batch.add_argument("--prompts", required=True, help="a text file, one prompt per line ('#' starts a comment)")
    batch.add_argument("--out", required=True, help="output folder: one run folder per prompt (and seed), "
                                                    "summary.json; on a cluster a folder every node mounts")
    batch.add_argument("--prior", required=True, help="'toy' (bundled), a diffusers folder or an SD .safetensors "
                                                      "(on a cluster: a path every node has)")
    batch.add_argument("--negative-prompt", default=keep(""), help="negative prompt of every run")
    batch.add_argument("--seeds", type=_ints, default=keep(None),
                       help="comma-separated seeds: one run per prompt and seed, in OUT/<slug>_seed<k>/ "
                            "(default: one run per prompt with --seed, in OUT/<slug>/)")
    batch.add_argument("--address", default=keep(None),
                       help="a Ray cluster's address (ray://host:10001, or auto for the cluster this machine is in); "
                            "default: a local Ray on this machine")
    batch.add_argument("--workers", type=int, default=keep(None),
                       help="runs at once at most (default: as many as the CPUs/GPUs allow)")
    batch.add_argument("--cpus-per-run", type=float, default=keep(1.0),
                       help="CPUs each run takes (also its torch threads unless --threads)")
    gpus = auto_or_number("a number of GPUs (0, 0.5, 1, ...)", at_least=0)
    batch.add_argument("--gpus-per-run", type=gpus, default=keep("auto"),
                       help="GPUs each run takes; auto: 1 when the cluster has GPUs, else 0 (fractions share one)")
    batch.add_argument("--retries", type=int, default=keep(3),
                       help="how often a run whose worker died (killed, node lost) is run again, from its checkpoint")
    batch.add_argument("--no-metrics", action="store_true", default=keep(False),
                       help="with the bundled toy prior: skip the toy metrics (metrics.json)")
    batch.add_argument("--no-progress", action="store_true", default=keep(False), help="no progress bar")
    return add_generate_arguments(parser, defaults=defaults, run_flags=False)


BATCH_KEYS = ("prompts", "out", "seeds", "address", "workers", "cpus_per_run", "gpus_per_run", "retries",
              "no_metrics", "no_progress")


def run_batch_cli(argv: list, parser: argparse.ArgumentParser) -> int:
    """``batch`` for ``argv`` (already checked by ``parser``); user errors → ``parser.error`` (exit 2, one line)."""
    from .driver import BatchError, exit_code, run_batch, summary_table

    args = add_batch_arguments(argparse.ArgumentParser(add_help=False), defaults=True).parse_args(argv)
    given = options_from_args(add_batch_arguments(argparse.ArgumentParser(add_help=False),
                                                  defaults=False).parse_args(argv))
    options = {k: v for k, v in given.items() if k not in BATCH_KEYS}
    try:
        summary = run_batch(args.prompts, args.out, options, seeds=args.seeds, address=args.address,
                            gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run, workers=args.workers,
                            retries=args.retries, metrics=not args.no_metrics, progress=not args.no_progress)
    except BatchError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        print(f"interrupted; start the same command again to go on (summary: {args.out}/summary.json)",
              file=sys.stderr)
        return 130
    print(summary_table(summary))
    print(f"summary: {summary['out']}/summary.json")
    return exit_code(summary)
