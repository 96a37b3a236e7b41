"""Rays per second of the stage-1 renderer, forward + backward, with and without the occupancy grid.

One timed iteration: random cameras (threestudio's sampler) → rays → volume rendering of the NeRF field over the
environment-map background → ``rgb.mean().backward()``.  The grid variant first runs a few grid updates on the
untrained field (its initial blob), as training would.  Median over rounds, variants interleaved.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..scene.cameras import RandomCameraSampler
from ..scene.field import EnvironmentBackground, FieldConfig, ImplicitVolume
from ..scene.hashgrid import HashGridConfig
from ..scene.renderer import OccupancyGrid, VolumeRenderer


def run_render_benchmark(resolution: int = 64, samples: int = 64, levels: int = 16, log2_hashmap_size: int = 19,
                         rounds: int = 5, warmup: int = 1, backend: str = "auto", grid_resolution: int = 32,
                         seed: int = 0, progress=None) -> dict:
    if resolution < 8 or samples < 1 or levels < 1 or rounds < 1:
        raise ValueError(f"need resolution >= 8, samples >= 1, levels >= 1, rounds >= 1; got resolution="
                         f"{resolution}, samples={samples}, levels={levels}, rounds={rounds}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = FieldConfig(hashgrid=HashGridConfig(n_levels=levels, log2_hashmap_size=log2_hashmap_size),
                         backend=backend, normal_type=None)  # stage 1 renders no normals (ProlificDreamer)
    field = ImplicitVolume(config, seed=seed).to(device)
    background = EnvironmentBackground(seed=seed).to(device)
    grid = OccupancyGrid(radius=config.radius, resolution=grid_resolution).to(device)
    renderers = {"no_grid": VolumeRenderer(radius=config.radius, num_samples_per_ray=samples),
                 "occupancy_grid": VolumeRenderer(radius=config.radius, num_samples_per_ray=samples,
                                                  occupancy_grid=grid)}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        grid.update(field, gen)
    sampler = RandomCameraSampler(width=resolution, height=resolution)
    rays = resolution * resolution

    def one(name: str) -> tuple[float, int]:
        cameras = sampler.sample(1, gen).to(device)
        field.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = renderers[name].render_camera(cameras, field, background, generator=gen, stratified=True)
        out["rgb"].mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, int(out["num_evaluated"])

    times = {name: [] for name in renderers}
    evaluated = {name: [] for name in renderers}
    for i in range(warmup + rounds):
        for name in renderers:
            seconds, n = one(name)
            if i >= warmup:
                times[name].append(seconds)
                evaluated[name].append(n)
        if progress:
            progress(i + 1, warmup + rounds)
    results = {}
    for name in renderers:
        median = statistics.median(times[name])
        results[name] = {"s_per_render": median, "rays_per_s": rays / median,
                         "field_points_per_render": statistics.median(evaluated[name])}
    return {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "accelerators": accelerators(),
            "config": {"resolution": resolution, "samples_per_ray": samples, "levels": levels,
                       "log2_hashmap_size": log2_hashmap_size, "backend": type(field.encoding).__name__
                       if hasattr(field, "encoding") else backend, "grid_resolution": grid_resolution,
                       "rounds": rounds, "torch": torch.__version__},
            "variants": results}


def accelerators() -> dict:
    """Which optional CUDA accelerators import here (a tcnn row needs ``--backend tcnn``; nerfacc has no path yet)."""
    import importlib.util
    return {name: importlib.util.find_spec(name) is not None for name in ("tinycudann", "nerfacc")}


def render_table(data: dict) -> str:
    c = data["config"]
    lines = [f"device: {data['device']}; {c['resolution']}² rays, {c['samples_per_ray']} samples/ray, hash grid "
             f"{c['levels']} levels × 2^{c['log2_hashmap_size']} ({c['backend']})", "",
             "accelerators importable: " + ", ".join(f"{k} {'yes' if v else 'no'}"
                                                     for k, v in data.get("accelerators", {}).items()), "",
             "| variant | rays/s (fwd+bwd) | s/render | field points/render |", "|---|---|---|---|"]
    for name, r in data["variants"].items():
        lines.append(f"| {name} | {r['rays_per_s']:.0f} | {r['s_per_render']:.3f} | {r['field_points_per_render']:.0f} |")
    return "\n".join(lines)
