"""``python -m l2vsd_core.bench step [--config tiny|sd21] [--steps N] [--json F]``, ``… render [--json F]``,
``… quality --prompts FILE [--methods …] [--seeds N] [--steps N] [--stages 1|2|3] [--json F]`` and
``… batch [--prompts N] [--steps N] [--json F]`` (one worker against several on a local Ray)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2vsd_core.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step", help="seconds per optimization step of each estimator (one process)")
    step.add_argument("--config", default="auto", help="tiny, sd21, or auto (sd21 on CUDA, tiny otherwise)")
    step.add_argument("--methods", default=None, help="comma-separated, e.g. vsd,l2vsd:func,l2vsd_last")
    step.add_argument("--steps", type=int, default=10, help="timed rounds (median reported)")
    step.add_argument("--warmup", type=int, default=2)
    step.add_argument("--latent", type=int, help="latent side (default: 16 for tiny, 64 for sd21)")
    step.add_argument("--device", default="auto")
    step.add_argument("--dtype", default="auto")
    step.add_argument("--compile", action="store_true", help="torch.compile the UNet's forward")
    step.add_argument("--profile", type=int, default=0, metavar="N",
                      help="also profile one more step of each method and show its N costliest operators")
    step.add_argument("--json", help="write the results here")
    render = sub.add_parser("render", help="rays/s of the stage-1 renderer, forward+backward, with and without "
                                           "the occupancy grid")
    render.add_argument("--resolution", type=int, default=64)
    render.add_argument("--samples", type=int, default=64, help="samples per ray")
    render.add_argument("--levels", type=int, default=16, help="hash-grid levels (ProlificDreamer: 16)")
    render.add_argument("--log2-hashmap-size", type=int, default=19, help="ProlificDreamer: 19")
    render.add_argument("--backend", default="auto", help="hash grid: auto, torch or tcnn")
    render.add_argument("--rounds", type=int, default=5)
    render.add_argument("--json", help="write the results here")
    quality = sub.add_parser("quality", help="stage 1 (to 3) on the bundled toy prior per prompt × method × seed, "
                                             "scored by prompt fidelity, Fréchet distance and silhouette IoU "
                                             "(resumable)")
    quality.add_argument("--prompts", required=True, help="a file with one world prompt per line ('a red cube')")
    quality.add_argument("--methods", default=None, help="comma-separated (default: sds,vsd,lvsd,l2vsd,l2vsd_last,"
                                                         "esd,l2esd; also hifa, hlvsd), each optionally with a "
                                                         "variant: sds@cfg100, l2vsd[paper,eta=0.001]")
    quality.add_argument("--lora-lr", type=float, default=None, help="the LoRA's learning rate (default: the toy's)")
    quality.add_argument("--seeds", type=int, default=3)
    quality.add_argument("--steps", type=int, default=None, help="stage-1 steps per run (default: the demo's)")
    quality.add_argument("--stages", type=int, default=1, choices=(1, 2, 3),
                         help="2: each run goes on through the geometry refinement, 3: and the texture one "
                              "(the toy's TOY_REFINE), each stage's GLB scored")
    quality.add_argument("--out", default="out/bench_quality", help="run folders (finished runs are reused)")
    quality.add_argument("--json", help="write the results here")
    quality.add_argument("--grid", help="also write a PNG of turntable frames per prompt and method (seed 0)")
    batch = sub.add_parser("batch", help="a toy batch on a local Ray: one worker (one thread, all threads) against one "
                                         "worker per CPU; wall times and speed-ups (needs Ray)")
    batch.add_argument("--prompts", type=int, default=4, help="how many toy prompts (up to 8)")
    batch.add_argument("--steps", type=int, default=100, help="stage-1 steps per run")
    batch.add_argument("--out", default="out/bench_batch", help="scratch folder (each layout's batch, replaced)")
    batch.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    progress = lambda i, n: print(f"\rround {i}/{n}", end="", file=sys.stderr, flush=True)
    from .step import write_json

    if args.command == "batch":
        from .batch import WORLD_PROMPTS, batch_table, run_batch_benchmark
        count = max(1, min(args.prompts, len(WORLD_PROMPTS)))
        run = lambda: run_batch_benchmark(args.out, WORLD_PROMPTS[:count], args.steps,
                                          log=lambda m: print(m, file=sys.stderr, flush=True))
        show = batch_table
    elif args.command == "quality":
        from ..prompt_list import read_prompts
        from .quality import DEFAULT_METHODS as QUALITY_METHODS, quality_table, run_quality_benchmark, split_methods
        methods = QUALITY_METHODS if args.methods is None else split_methods(args.methods)
        def run():
            prompts = read_prompts(args.prompts)
            data = run_quality_benchmark(prompts, methods, args.seeds, args.steps, args.out,
                                         log=lambda m: print(m, file=sys.stderr, flush=True), stages=args.stages,
                                         lora_lr=args.lora_lr)
            if args.grid:
                from .quality import picture_grid
                picture_grid(args.out, prompts, methods, args.grid)
            return data
        def show(data):
            from .quality import paired_table
            return quality_table(data) + ("\n\n" + paired_table(data) if data.get("paired") else "")
    elif args.command == "render":
        from .render import render_table, run_render_benchmark
        run = lambda: run_render_benchmark(args.resolution, args.samples, args.levels, args.log2_hashmap_size,
                                           args.rounds, backend=args.backend, progress=progress)
        show = render_table
    else:
        import torch
        from .step import DEFAULT_METHODS, run_step_benchmark, table

        config = args.config if args.config != "auto" else ("sd21" if torch.cuda.is_available() else "tiny")
        methods = (DEFAULT_METHODS if args.methods is None
                   else tuple(m.strip() for m in args.methods.split(",") if m.strip()))
        run = lambda: run_step_benchmark(config, methods, steps=args.steps, warmup=args.warmup, device=args.device,
                                         dtype=args.dtype, latent=args.latent, compile=args.compile,
                                         progress=progress, profile=args.profile)
        from .step import profile_table
        show = lambda data: table(data) + ("\n\n" + profile_table(data) if data.get("profile") else "")
    try:
        data = run()
    except ValueError as err:
        parser.error(str(err))
    print(file=sys.stderr)
    if args.json:
        write_json(data, args.json)
    print(show(data))
    return 0

if __name__ == "__main__":
    sys.exit(main())
