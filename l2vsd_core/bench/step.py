"""Seconds per optimization step of each estimator, measured in one process.

One step is the 2D part of a distillation step: a render stand-in θ (the latent itself, a leaf) → the prior (CFG,
batch 2) → the trainable LoRA score (lookahead, JVP …) → θ's gradient and optimizer step, plus the LoRA update.
Methods are interleaved round by round so that drift of the machine hits all of them alike; the median is reported.

Configurations:
  ``tiny``     an SD-shaped UNet (3 levels, cross-attention, 1.47 M parameters) at 16×16 latents — runs anywhere;
  ``sd21``     the SD-2.1-base UNet architecture (``prior/configs/sd21``) with random weights at 64×64 latents —
               timing needs no weights; meant for CUDA (fp16).
The LoRA shares the prior's UNet (adapters off for prior calls), rank 4, one render per step, CFG 7.5, λ = 0.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Optional

import torch

from ..files import atomic_write_text
from ..distill import Conditioning, DistillConfig, score_distillation
from ..prior.model import DiffusionPrior
from ..schedules import TimestepSampler
from ..score import LoRAScore

DEFAULT_METHODS = ("sds", "vsd", "lvsd", "l2vsd:forward_ad", "l2vsd:func", "l2vsd:double_backward",
                   "l2vsd:fd_forward", "l2vsd:fd_central", "l2vsd_last")
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "prediction_type": "epsilon"}


def _tiny_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def _sd21_unet():
    from diffusers import UNet2DConditionModel
    folder = os.path.join(os.path.dirname(__file__), "..", "prior", "configs", "sd21", "unet")
    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))


CONFIGS = {
    "tiny": {"unet": _tiny_unet, "latent": 16, "text_len": 77},
    "sd21": {"unet": _sd21_unet, "latent": 64, "text_len": 77},
}


def parse_method(name: str) -> tuple[str, str]:
    """``"l2vsd:func"`` → ("l2vsd", "func"); a bare name uses the default JVP mode ("auto")."""
    method, _, mode = name.partition(":")
    return method, (mode or "auto")


def run_step_benchmark(config: str = "tiny", methods=DEFAULT_METHODS, steps: int = 10, warmup: int = 2,
                       device: str = "auto", dtype: str = "auto", seed: int = 0, latent: Optional[int] = None,
                       compile: bool = False, progress=None, profile: int = 0) -> dict:
    """Median seconds per step of each method (and with ``profile`` > 0, one more step of each under
    ``torch.profiler``: its ``profile`` operators with the most self time, to show where a method's time goes)."""
    if config not in CONFIGS:
        raise ValueError(f"config must be one of {', '.join(CONFIGS)}; got {config!r}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0; got steps={steps}, warmup={warmup}")
    configs = {}
    for name in methods:  # validate every method name up front
        method, mode = parse_method(name)
        configs[name] = DistillConfig(method=method, jvp_mode=mode, eta=1e-2, guidance_scale=7.5,
                                      timesteps=TimestepSampler(1000, 0.02, 0.98))
    torch.manual_seed(seed)
    spec = CONFIGS[config]
    unet = spec["unet"]()
    if compile:
        # torch.compile of the UNet's forward: the passes that compile (prior, LoRA forward/backward) get faster; a
        # forward-AD pass through it falls back or fails, which the table then shows per method.
        unet.forward = torch.compile(unet.forward, dynamic=False)
    prior = DiffusionPrior(unet, SCHEDULER, text_encoder=None, tokenizer=None, device=device, dtype=dtype,
                           name=f"random {config}")
    dev = prior.device
    score = LoRAScore(prior.unet, prior.alphas_cumprod, prior.prediction_type, rank=4, seed=seed)
    text_dim = unet.config.cross_attention_dim
    g = torch.Generator(device="cpu").manual_seed(seed)
    text = torch.randn(1, spec["text_len"], text_dim, generator=g).to(dev)
    uncond = torch.randn(1, spec["text_len"], text_dim, generator=g).to(dev)
    camera = torch.randn(1, 16, generator=g).to(dev)
    cond = Conditioning(text=text, text_uncond=uncond, score_text=text, camera=camera)
    size = spec["latent"] if latent is None else latent
    if size < 8 or size % 8:
        raise ValueError(f"latent must be a multiple of 8 (the UNet downsamples by up to 8); got {size}")
    theta = torch.nn.Parameter(torch.randn(1, unet.config.in_channels, size, size, generator=g).to(dev))
    theta_opt = torch.optim.Adam([theta], lr=1e-2)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    cuda = dev.type == "cuda"

    def one_step(name: str, step: int) -> tuple[float, Optional[float]]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        theta_opt.zero_grad(set_to_none=True)
        result = score_distillation(theta, prior, score, cond, configs[name], step=step, generator=gen)
        result.loss.backward()
        theta_opt.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
        return seconds, peak

    times = {name: [] for name in methods}
    peaks = {name: [] for name in methods}
    errors: dict[str, str] = {}
    for round_ in range(warmup + steps):
        for name in methods:
            if name in errors:
                continue
            try:
                seconds, peak = one_step(name, round_)
            except (RuntimeError, NotImplementedError, AssertionError) as err:  # e.g. a mode that does not compile
                errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                continue
            if round_ >= warmup:
                times[name].append(seconds)
                if peak is not None:
                    peaks[name].append(peak)
        if progress:
            progress(round_ + 1, warmup + steps)
    profiles = {name: _profile_step(lambda: one_step(name, warmup + steps), profile, cuda)
                for name in methods if profile and name not in errors}
    results = {name: {"s_per_step": statistics.median(times[name]),
                      "peak_mem_mb": max(peaks[name]) if peaks[name] else None} for name in methods
               if name not in errors}
    base = results.get("vsd", {}).get("s_per_step")
    return {
        "device": torch.cuda.get_device_name(dev) if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                                                                 f"{torch.get_num_threads()} threads)",
        "config": {"name": config, "latent": size, "dtype": str(prior.dtype).replace("torch.", ""),
                   "unet_parameters": sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n),
                   "lora_parameters": sum(p.numel() for p in score.lookahead_parameters("all").values()),
                   "last_layer_parameters": sum(p.numel() for p in score.lookahead_parameters("last").values()),
                   "steps": steps, "warmup": warmup, "torch": torch.__version__, "shared_unet": True,
                   "compile": compile,
                   "peak_mem": "torch.cuda.max_memory_allocated per step" if cuda else "not measured on CPU"},
        "methods": results,
        "ratio_to_vsd": {name: r["s_per_step"] / base for name, r in results.items()} if base else {},
        "errors": errors,
        **({"profile": profiles} if profile else {}),
    }


def _profile_step(step, top: int, cuda: bool) -> dict:
    """One ``step()`` under ``torch.profiler``: its total self time and the ``top`` operators by self time (CPU, or
    CUDA kernels on a GPU), each with its calls and share of the total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return {"self_ms_total": total / 1e3, "time": "CUDA kernels" if cuda else "CPU",
            "ops": [{"op": e.key, "self_ms": getattr(e, attr) / 1e3, "calls": e.count,
                     "share": getattr(e, attr) / total} for e in events[:top]]}


def profile_table(data: dict) -> str:
    """The profiled steps as markdown: per method, its top operators by self time."""
    lines = []
    for name, p in data.get("profile", {}).items():
        lines += [f"**{name}**: {p['self_ms_total']:.0f} ms of {p['time']} self time in one step", "",
                  "| operator | self ms | calls | share |", "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['self_ms']:.1f} | {o['calls']} | {o['share']:.1%} |" for o in p["ops"]]
        lines.append("")
    return "\n".join(lines)


def write_json(data: dict, path: str) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def table(data: dict) -> str:
    lines = [f"device: {data['device']}; config: {data['config']['name']} ({data['config']['latent']}² latents, "
             f"{data['config']['dtype']}{', torch.compile' if data['config'].get('compile') else ''})", "", "| method | s/step (median) | × vsd | peak MB |", "|---|---|---|---|"]
    for name, r in data["methods"].items():
        ratio = data["ratio_to_vsd"].get(name)
        peak = "—" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"| {name} | {r['s_per_step']:.4f} | {'—' if ratio is None else f'{ratio:.2f}'} | {peak} |")
    for name, err in data.get("errors", {}).items():
        lines.append(f"| {name} | failed: {err} | — | — |")
    return "\n".join(lines)
