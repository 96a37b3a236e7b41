"""``python -m l2vsd_core generate …`` (prompt → NeRF (→ mesh → texture) → GLB; see :mod:`l2vsd_core.cli`) and
``python -m l2vsd_core bench …`` (forwards to ``python -m l2vsd_core.bench``)."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_generate_arguments

    parser = argparse.ArgumentParser(prog="python -m l2vsd_core", description="L²-VSD text-to-3D engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,bench}")
    gen = sub.add_parser("generate", help="text → NeRF (→ mesh → texture) → textured mesh (model.glb, ...)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_generate_arguments(gen)
    sub.add_parser("bench", help="benchmarks (python -m l2vsd_core bench --help)", add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench.__main__ import main as bench_main
        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from .cli import run_cli
    sub = parser._subparsers._group_actions[0].choices[args.command]  # errors name the subcommand's usage
    return run_cli(argv[1:], sub)


if __name__ == "__main__":
    sys.exit(main())
