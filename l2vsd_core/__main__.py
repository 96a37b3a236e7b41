"""``python -m l2vsd_core generate …`` (prompt → NeRF (→ mesh → texture) → GLB; see :mod:`l2vsd_core.cli`),
``python -m l2vsd_core batch …`` (many prompts as ``generate`` runs on Ray; see :mod:`l2vsd_core.batch`) and
``python -m l2vsd_core bench …`` (forwards to ``python -m l2vsd_core.bench``)."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from .batch.cli import add_batch_arguments
    from .cli import add_generate_arguments

    parser = argparse.ArgumentParser(prog="python -m l2vsd_core", description="L²-VSD text-to-3D engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,batch,bench}")
    gen = sub.add_parser("generate", help="text → NeRF (→ mesh → texture) → textured mesh (model.glb, ...)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_generate_arguments(gen)
    batch = sub.add_parser("batch", help="many prompts (× seeds), each a generate run in OUT/<slug>/, on Ray "
                                         "(local or a cluster); resumable, retries lost workers",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_batch_arguments(batch)
    sub.add_parser("bench", help="benchmarks (python -m l2vsd_core bench --help)", add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench.__main__ import main as bench_main
        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # errors name the subcommand's usage
    if args.command == "batch":
        from .batch.cli import run_batch_cli
        return run_batch_cli(argv[1:], sub)
    from .cli import run_cli
    return run_cli(argv[1:], sub)


if __name__ == "__main__":
    sys.exit(main())
