"""The paper's 2D Gaussian study (sec. 3.2, Fig. 1, 13, 14; code in its Appendix F), run through the real engine.

A "scene" q = N(μ_q, L_q L_qᵀ) is optimized towards the "pretrained" p = N(μ_p, L_p L_pᵀ); a "render" is a sample
x = μ_q + L_q c with c ~ N(0, I) (c plays the camera).  r = N(μ_r, L_r L_rᵀ) plays the LoRA: it is trained to track q,
and its exact noisy score is the trainable score ε_φ of :mod:`l2vsd_core.distill`.  All scores are exact: for
``x_t = α x + σ ε`` a Gaussian N(μ, Σ) becomes N(α μ, α² Σ + σ² I), whose ε-prediction is
``σ (α² Σ + σ² I)⁻¹ (x_t − α μ)``.

Setup as in Appendix F: p and q drawn from ``torch.rand`` (μ_q is ~10 away), AdamW lr 1e-2 with a cosine schedule
(100 warm-up steps over 1.5× the run) for q; AdamW lr 5e-2, 10 steps per iteration, for r regressing q's parameters
(``loss = ‖μ_q − μ_r‖² + ‖L_q − L_r‖²``); β_t uniform in [1e-4, 0.02] with ᾱ_t = 1 − β_t (one render; the paper's
code takes a cumulative product across the batch when it draws several — we draw each independently); w(t) = 1 − ᾱ_t.

Methods (paper names; the engine method that runs each):
  sds          SDS.
  vsd          the paper's "ideal" VSD: the score of q(x | c), a delta at the current sample (an r that fits the current
               sample exactly, looking ahead).  In ε-units this is *identical* to SDS (ε_r = ε); the paper's code mixes
               score and ε units in its sds branch, which is why its two curves differ.
  real-vsd     VSD in the practical order (engine ``vsd``).
  l-vsd        lookahead VSD (engine ``lvsd``).
  l2vsd        linearized lookahead (engine ``l2vsd``), η = ``--eta``.
  l2vsd_last   the same with only μ_r (the last thing the score applies) carrying the tangent.
  hlvsd        the high-order remainder only (engine ``hlvsd``).
  exact-vsd    reference, not in the paper: r = q exactly at every step (the marginal score VSD's theory asks for).
Variants: ``fig1`` (one sample per step), ``fig13`` (4 samples per step), ``fig14`` (r over-fitted: it is fitted
exactly to the current samples instead of regressing q's parameters).

Setups (``--setup``): ``engine`` (above: the engine's VP noise x_t = √ᾱ x + √(1−ᾱ) ε with ᾱ = 1 − β, independent
renders, every practical method in the engine's order) and ``listing``, Appendix F's code where it differs:
  - its noise model: x_t = α x + σ ε with α = 1 − β and σ = √((1 − α)/α), and its weight w = (1 − α) σ on the score
    difference, differentiated through x_t (so x gets α (1 − α)(ε̂_pre − ε̂_est));
  - N_render = 4 renders per step whose α are a cumulative product of the 4 draws (α_k = Π_{j≤k} (1 − β_j));
  - its real-vsd trains r *after* q's optimizer step (on q_{i+1}); every other method keeps the engine's order.
The engine stays VP: x_t = α x + σ ε is √(α² + σ²) times a VP state with ᾱ' = α² / (α² + σ²) and the same ε, so the
listing's noise runs through the engine on a fine table of ᾱ' (:class:`ListingNoise`), and the listing's weight
is applied to the engine's unweighted ε difference.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..distill import Conditioning, DistillConfig, score_distillation, train_trainable_score
from ..files import atomic_write, atomic_write_text
from ..schedules import TimestepSampler

PAPER_METHODS = ("sds", "vsd", "real-vsd", "l-vsd", "l2vsd", "l2vsd_last", "hlvsd", "exact-vsd")
VARIANTS = ("fig1", "fig13", "fig14")
SETUPS = ("engine", "listing")
NUM_TIMESTEPS = 1000
LISTING_RENDERS = 4        # Appendix F's N_render
LISTING_LEVELS = 100_000   # α grid of the listing's noise table: spacing ≈ 8e-7, far below any effect measured


def paper_alphas_cumprod(num: int = NUM_TIMESTEPS, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_t = 1 − β_t with β_t linear in t: a uniform t draws β uniformly, as Appendix F does."""
    return 1.0 - torch.linspace(beta_start, beta_end, num, dtype=torch.float64)


class ListingNoise:
    """Appendix F's noise through the engine.  As the engine's timestep sampler (:meth:`sample`): per step,
    β_k ~ U[β_start, β_end] for each of the batch's renders, α = cumprod(1 − β) across the batch, and t the index of α
    on a uniform grid of :data:`LISTING_LEVELS` values (:meth:`alpha`).  :meth:`alphas_cumprod` is the VP table
    ᾱ'_t = α² / (α² + σ²) with σ² = (1 − α)/α, and :meth:`loss` the listing's weighted loss."""

    def __init__(self, renders: int = LISTING_RENDERS, beta_start: float = 1e-4, beta_end: float = 0.02,
                 levels: int = LISTING_LEVELS):
        if renders < 1:
            raise ValueError(f"renders must be >= 1; got {renders}")
        self.renders, self.beta_start, self.beta_end, self.levels = renders, beta_start, beta_end, levels
        self.lo, self.hi = (1 - beta_end) ** renders, 1 - beta_start  # the α any draw can reach

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """The listing's α at index ``t``."""
        return self.lo + (self.hi - self.lo) * t.double() / (self.levels - 1)

    def alphas_cumprod(self) -> torch.Tensor:
        alpha = self.alpha(torch.arange(self.levels))
        return alpha ** 2 / (alpha ** 2 + (1 - alpha) / alpha)

    def sample(self, batch: int, step: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if batch > self.renders:
            raise ValueError(f"the listing's noise table holds {self.renders} renders per step; got {batch}")
        beta = torch.rand(batch, generator=generator, dtype=torch.float64) * (self.beta_end - self.beta_start)
        alpha = torch.cumprod(1 - (beta + self.beta_start), dim=0)
        t = ((alpha - self.lo) / (self.hi - self.lo) * (self.levels - 1)).round().long()
        return t.to(device)

    def loss(self, x: torch.Tensor, result) -> torch.Tensor:
        """The listing's ½‖x_t − (x_t − w (s_pre − s_est))‖² / N with w = (1 − α) σ, as a loss on the renders ``x``
        whose gradient is α (1 − α)(ε̂_pre − ε̂_est) / N (``result``: an engine step with ``weighting="uniform"``, so
        ``result.grad`` is ε̂_pre − ε̂_est)."""
        alpha = self.alpha(result.t).to(x.dtype)[:, None]
        return (x * (alpha * (1 - alpha) * result.grad)).sum() / x.shape[0]


def gaussian_epsilon(x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, mu: torch.Tensor,
                     factor: torch.Tensor) -> torch.Tensor:
    """Exact ε-prediction for N(mu, factor factorᵀ) noised to x_t = √ᾱ x + √(1−ᾱ) ε."""
    a_bar = alphas_cumprod.to(x_t.device, x_t.dtype)[t]
    alpha, sigma = a_bar.sqrt()[:, None, None], (1 - a_bar).sqrt()[:, None, None]
    eye = torch.eye(mu.shape[-1], dtype=x_t.dtype, device=x_t.device)
    cov_t = alpha ** 2 * (factor @ factor.T) + sigma ** 2 * eye
    residual = (x_t - alpha[:, :, 0] * mu)[..., None]
    return (sigma * torch.linalg.solve(cov_t, residual))[..., 0]


class GaussianPrior(nn.Module):
    """ε_pre: the exact noisy score of p (a FrozenScore)."""

    prediction_type = "epsilon"

    def __init__(self, mu: torch.Tensor, factor: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("mu", mu)
        self.register_buffer("factor", factor)
        self.alphas_cumprod = alphas_cumprod  # plain attribute: distill.FrozenScore

    def forward(self, x_t, t, text=None):
        return gaussian_epsilon(x_t, t, self.alphas_cumprod, self.mu, self.factor)


class GaussianScene(nn.Module):
    """q: the distribution being optimized; ``render`` draws x = μ_q + L_q c."""

    def __init__(self, mu: torch.Tensor, factor: torch.Tensor):
        super().__init__()
        self.mu = nn.Parameter(mu)
        self.factor = nn.Parameter(factor)

    def render(self, n: int, generator: torch.Generator) -> torch.Tensor:
        c = torch.randn(n, self.mu.shape[0], generator=generator, dtype=self.mu.dtype)
        return self.mu + c @ self.factor.T


class GaussianScore(nn.Module):
    """r: the trainable score ("LoRA") with its own optimizer.

    ``target="params"`` regresses q's parameters (Appendix F); ``target="samples"`` fits r to the samples it is given
    (their mean and covariance square root: a delta for a single sample), as in Fig. 14.
    """

    prediction_type = "epsilon"

    def __init__(self, scene: GaussianScene, alphas_cumprod: torch.Tensor, target: str = "params",
                 optimizer: str = "adamw", lr: float = 5e-2):
        super().__init__()
        if target not in ("params", "samples"):
            raise ValueError(f"target must be 'params' or 'samples'; got {target!r}")
        d = scene.mu.shape[0]
        self.mu = nn.Parameter(torch.zeros(d, dtype=scene.mu.dtype))
        self.factor = nn.Parameter(torch.zeros(d, d, dtype=scene.mu.dtype))
        self.alphas_cumprod = alphas_cumprod  # plain attribute: distill.FrozenScore
        self._scene = [scene]  # a list, so the scene's parameters are not registered as r's
        self.target = target
        params = [self.mu, self.factor]
        self.optimizer = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if optimizer == "adamw"
                          else torch.optim.SGD(params, lr=lr))
        self.frozen = False  # the listing's real-vsd: r takes no step inside the engine's call (it trains after q's)

    def forward(self, x_t, t, text=None, camera=None):
        return gaussian_epsilon(x_t, t, self.alphas_cumprod, self.mu, self.factor)

    def loss(self, x0, text=None, camera=None):
        if self.target == "params":
            scene = self._scene[0]
            mu_goal, factor_goal = scene.mu.detach(), scene.factor.detach()
        else:
            x0 = x0.detach()
            mu_goal = x0.mean(0)
            centered = x0 - mu_goal
            cov = centered.T @ centered / x0.shape[0]
            evals, evecs = torch.linalg.eigh(cov)
            factor_goal = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
        return ((self.mu - mu_goal) ** 2).sum() + ((self.factor - factor_goal) ** 2).sum()

    def lookahead_parameters(self, scope: str):
        if scope == "all":
            return {"mu": self.mu, "factor": self.factor}
        if scope == "last":  # μ_r is applied last (a shift), the analogue of the last layer
            return {"mu": self.mu}
        raise ValueError(f"scope must be 'all' or 'last'; got {scope!r}")

    def step(self):
        if not self.frozen:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------- metrics
def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T


def wasserstein2(mu1, cov1, mu2, cov2) -> float:
    """Closed-form 2-Wasserstein distance between two Gaussians."""
    mu1, cov1, mu2, cov2 = (v.detach().double() for v in (mu1, cov1, mu2, cov2))
    root2 = _sqrtm_psd(cov2)
    cross = _sqrtm_psd(root2 @ cov1 @ root2)
    w2sq = ((mu1 - mu2) ** 2).sum() + torch.trace(cov1 + cov2 - 2 * cross)
    return float(w2sq.clamp_min(0).sqrt())


def kl_divergence(mu_q, cov_q, mu_p, cov_p) -> float:
    """KL(q ‖ p) between Gaussians; +inf when q is degenerate."""
    mu_q, cov_q, mu_p, cov_p = (v.detach().double() for v in (mu_q, cov_q, mu_p, cov_p))
    d = mu_q.shape[0]
    sign, logdet_q = torch.linalg.slogdet(cov_q)
    if sign <= 0:
        return math.inf
    inv_p = torch.linalg.inv(cov_p)
    diff = mu_p - mu_q
    kl = 0.5 * (torch.trace(inv_p @ cov_q) + diff @ inv_p @ diff - d + torch.linalg.slogdet(cov_p)[1] - logdet_q)
    return float(kl)


# ----------------------------------------------------------------------------------------------------------- one run
@dataclass
class StudyConfig:
    steps: int = 2000
    samples_per_step: int = 1
    variant: str = "fig1"
    eta: float = 0.5
    lookahead: str = "sgd_mean"   # r's loss is a sum, so "paper" is the same step; "optimizer": r's AdamW step
    jvp_mode: str = "forward_ad"
    lr: float = 1e-2
    lora_lr: float = 5e-2
    lora_steps: int = 10
    warmup_steps: int = 100
    dist_0: float = 10.0
    log_every: int = 10
    setup: str = "engine"         # "listing": Appendix F's noise model, N_render = 4, real-vsd's r after q's step

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}")
        if self.setup not in SETUPS:
            raise ValueError(f"setup must be one of {', '.join(SETUPS)}; got {self.setup!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1; got {self.steps}")
        if self.samples_per_step < 1:
            raise ValueError(f"samples_per_step must be >= 1; got {self.samples_per_step}")


def _cosine_with_warmup(optimizer, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_problem(seed: int, dist_0: float = 10.0, dtype=torch.float64):
    """p and the initial q of Appendix F for ``seed``."""
    g = torch.Generator().manual_seed(seed)
    d = 2
    p_mu = torch.rand(d, generator=g, dtype=dtype)
    p_factor = torch.rand(d, d, generator=g, dtype=dtype) + torch.eye(d, dtype=dtype)
    q_mu = torch.rand(d, generator=g, dtype=dtype) * dist_0 + p_mu
    q_factor = torch.rand(d, d, generator=g, dtype=dtype)
    return p_mu, p_factor, q_mu, q_factor


def _engine_setup(method: str, cfg: StudyConfig):
    """(engine method, r's target, r's optimizer, r's lr, γ) for a paper method name and variant."""
    overfit = ("samples", "sgd", 0.5, 1)  # an SGD step of 0.5 on r's quadratic loss lands exactly on its target
    if method == "sds":
        return "sds", None
    if method == "vsd":                     # ideal conditional score: r = delta at the current sample, looked ahead
        return "lvsd", overfit
    if method == "exact-vsd":               # r = q exactly, looked ahead
        return "lvsd", ("params", "sgd", 0.5, 1)
    engine = {"real-vsd": "vsd", "l-vsd": "lvsd", "l2vsd": "l2vsd", "l2vsd_last": "l2vsd_last",
              "hlvsd": "hlvsd"}[method]
    return engine, (overfit if cfg.variant == "fig14" else ("params", "adamw", cfg.lora_lr, cfg.lora_steps))


def run(method: str, seed: int, cfg: StudyConfig, snapshot_steps=()) -> dict:
    """Optimize q with ``method``; returns the W2/KL curves and samples of p, q, r at ``snapshot_steps``."""
    if method not in PAPER_METHODS:
        raise ValueError(f"method must be one of {', '.join(PAPER_METHODS)}; got {method!r}")
    engine_method, r_setup = _engine_setup(method, cfg)
    p_mu, p_factor, q_mu, q_factor = make_problem(seed, cfg.dist_0)
    listing = ListingNoise(cfg.samples_per_step) if cfg.setup == "listing" else None
    alphas = listing.alphas_cumprod() if listing else paper_alphas_cumprod()
    r_after_q = listing is not None and method == "real-vsd"  # the listing's order of real-vsd
    prior = GaussianPrior(p_mu, p_factor, alphas)
    scene = GaussianScene(q_mu.clone(), q_factor.clone())
    score = None
    if r_setup is not None:
        target, opt, lora_lr, lora_steps = r_setup
        score = GaussianScore(scene, alphas, target=target, optimizer=opt, lr=lora_lr)
    else:
        lora_steps = 1
    distill_cfg = DistillConfig(method=engine_method, eta=cfg.eta, lookahead=cfg.lookahead, lora_steps=lora_steps,
                                jvp_mode=cfg.jvp_mode,
                                weighting="uniform" if listing else "sds",  # the listing's weight: applied below
                                timesteps=listing or TimestepSampler(NUM_TIMESTEPS, min_step_percent=0.0,
                                                                     max_step_percent=1.0))
    if r_after_q:
        score.frozen = True
    optimizer = torch.optim.AdamW(scene.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = _cosine_with_warmup(optimizer, cfg.warmup_steps, int(cfg.steps * 1.5))
    gen = torch.Generator().manual_seed(10_000 + seed)
    vis = torch.Generator().manual_seed(20_000 + seed)
    vis_c = torch.randn(3, 256, 2, generator=vis, dtype=torch.float64)  # fixed draws for the pictures
    p_cov = p_factor @ p_factor.T

    w2, kl, steps_logged, snaps, terms_log = [], [], [], {}, []
    cond = Conditioning()
    for step in range(cfg.steps + 1):
        q_cov = scene.factor.detach() @ scene.factor.detach().T
        if step % cfg.log_every == 0 or step == cfg.steps:
            w2.append(wasserstein2(scene.mu, q_cov, p_mu, p_cov))
            kl.append(kl_divergence(scene.mu, q_cov, p_mu, p_cov))
            steps_logged.append(step)
        if step in snapshot_steps:
            r_mu, r_f = (score.mu.detach(), score.factor.detach()) if score is not None else (None, None)
            snaps[step] = {
                "p": (p_mu + vis_c[0] @ p_factor.T).tolist(),
                "q": (scene.mu.detach() + vis_c[1] @ scene.factor.detach().T).tolist(),
                "q_mu": scene.mu.detach().tolist(), "q_cov": q_cov.tolist(),
                "r_mu": None if r_mu is None else r_mu.tolist(),
                "r_cov": None if r_mu is None else (r_f @ r_f.T).tolist(),
            }
        if step == cfg.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        x = scene.render(cfg.samples_per_step, gen)
        result = score_distillation(x, prior, score, cond, distill_cfg, step=step, generator=gen)
        (listing.loss(x, result) if listing else result.loss).backward()
        optimizer.step()
        scheduler.step()
        if r_after_q:  # r regresses the q that the step just made
            score.frozen = False
            train_trainable_score(score, x, cond, lora_steps)
            score.frozen = True
        terms_log.append(result.terms)
    return {"w2": w2, "kl": kl, "steps": steps_logged, "snapshots": snaps,
            "final_mu": scene.mu.detach().tolist(), "p_mu": p_mu.tolist(),
            "delta_first_rms_mean": _mean([t.get("delta_first_rms") for t in terms_log]),
            "delta_high_rms_mean": _mean([t.get("delta_high_rms") for t in terms_log])}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _std(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / max(1, len(values) - 1))


def _finite_or_none(v: float):
    return v if math.isfinite(v) else None


# -------------------------------------------------------------------------------------------------------- the study
def study(methods, seeds: int, cfg: StudyConfig, progress=None) -> tuple[dict, dict]:
    """Run every method for seeds 0…seeds−1. Returns (the JSON summary, the first seed's snapshots per method)."""
    snapshot_steps = sorted({0, cfg.steps // 8, cfg.steps // 4, cfg.steps // 2, cfg.steps})
    summary = {"methods": {}, "seeds": seeds, "steps": cfg.steps, "variant": cfg.variant,
               "samples_per_step": cfg.samples_per_step, "eta": cfg.eta, "lookahead": cfg.lookahead,
               "log_every": cfg.log_every, "setup": cfg.setup}
    pictures = {}
    for method in methods:
        runs = []
        start = time.perf_counter()
        for seed in range(seeds):
            runs.append(run(method, seed, cfg, snapshot_steps if seed == 0 else ()))
            if progress:
                progress(method, seed)
        w2_final = [r["w2"][-1] for r in runs]
        kl_final = [r["kl"][-1] for r in runs]
        n = len(runs[0]["w2"])
        summary["methods"][method] = {
            "w2_final_mean": sum(w2_final) / seeds,
            "w2_final_std": _std(w2_final) if seeds > 1 else 0.0,
            "kl_final_mean": _finite_or_none(sum(kl_final) / seeds),
            "kl_final_median": _finite_or_none(sorted(kl_final)[seeds // 2]),
            "w2_final": w2_final,
            "w2_curve": [sum(r["w2"][i] for r in runs) / seeds for i in range(n)],
            "curve_steps": runs[0]["steps"],
            "delta_first_rms_mean": _mean([r["delta_first_rms_mean"] for r in runs]),
            "delta_high_rms_mean": _mean([r["delta_high_rms_mean"] for r in runs]),
            "seconds_per_run": (time.perf_counter() - start) / seeds,
        }
        pictures[method] = runs[0]["snapshots"]
    return summary, pictures


def _ellipse(ax, mu, cov, color, style="-", width=1.2, label=None):
    """The 2-σ contour of N(mu, cov)."""
    evals, evecs = torch.linalg.eigh(torch.tensor(cov, dtype=torch.float64))
    angle = torch.linspace(0, 2 * math.pi, 100, dtype=torch.float64)
    circle = torch.stack([angle.cos(), angle.sin()], 1) * 2 * evals.clamp_min(0).sqrt()
    pts = circle @ evecs.T + torch.tensor(mu, dtype=torch.float64)
    ax.plot(pts[:, 0], pts[:, 1], style, color=color, lw=width, label=label)


def plot(summary: dict, pictures: dict, path: str) -> None:
    """Fig. 1-style trajectories (p's samples; q's 2-σ contour at a few steps and its samples at the end; r's contour
    at the end), one panel per method, and the mean W2 curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary["methods"])
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig = plt.figure(figsize=(3.3 * cols, 3.1 * rows + 3.2))
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1] * rows + [1.05])
    cmap = plt.get_cmap("viridis")
    for i, method in enumerate(methods):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        snaps = pictures[method]
        steps = sorted(snaps)
        p = torch.tensor(snaps[steps[0]]["p"])
        ax.scatter(p[:, 0], p[:, 1], s=2, c="0.65", label="p samples")
        last = snaps[steps[-1]]
        q = torch.tensor(last["q"])
        ax.scatter(q[:, 0], q[:, 1], s=2, color=cmap(1.0), alpha=0.6)
        for j, s in enumerate(steps):
            _ellipse(ax, snaps[s]["q_mu"], snaps[s]["q_cov"], cmap(j / max(1, len(steps) - 1)), label=f"q @ {s}")
        if last["r_mu"] is not None:
            _ellipse(ax, last["r_mu"], last["r_cov"], "tab:red", "--", 1.0, label="r at the end")
        m = summary["methods"][method]
        ax.set_title(f"{method}: W2 {m['w2_final_mean']:.2f} ± {m['w2_final_std']:.2f}", fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=6, markerscale=3, loc="lower right")
    curve_ax = fig.add_subplot(grid[rows, :])
    for method in methods:
        m = summary["methods"][method]
        curve_ax.semilogy(m["curve_steps"], [max(v, 1e-6) for v in m["w2_curve"]], label=method, lw=1.2)
    curve_ax.set_xlabel("step", fontsize=8)
    curve_ax.set_ylabel(f"W2(q, p), mean of {summary['seeds']} seeds", fontsize=8)
    curve_ax.legend(fontsize=7, ncol=4)
    fig.suptitle(f"2D Gaussian study ({summary.get('setup', 'engine')} setup), variant {summary['variant']}, "
                 f"{summary['samples_per_step']} sample(s)/step, "
                 f"η={summary['eta']} (seed 0 shown above)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def table(summary: dict) -> str:
    """Markdown table; with real-vsd present, each method's per-seed W2 ratio to it (geometric mean) and wins."""
    base = summary["methods"].get("real-vsd")
    lines = ["| method | W2 final (mean ± std) | W2 / W2(real-vsd), geo-mean | seeds better than real-vsd "
             "| KL(q‖p) final, median | ‖Δε_first‖ rms | ‖Δε_high‖ rms |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "—" if v is None else f"{v:.2e}"
    for method, m in summary["methods"].items():
        kl = m["kl_final_median"]
        ratio = wins = "—"
        if base is not None:
            pairs = list(zip(m["w2_final"], base["w2_final"]))
            ratio = f"{math.exp(sum(math.log(a / b) for a, b in pairs) / len(pairs)):.3f}"
            wins = f"{sum(a < b for a, b in pairs)}/{len(pairs)}"
        lines.append(f"| {method} | {m['w2_final_mean']:.3f} ± {m['w2_final_std']:.3f} | {ratio} | {wins} | "
                     f"{'∞ (q collapsed)' if kl is None else f'{kl:.3f}'} | {fmt(m['delta_first_rms_mean'])} | "
                     f"{fmt(m['delta_high_rms_mean'])} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2vsd_core.toys.gaussian", description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(PAPER_METHODS),
                        help=f"comma-separated, from {', '.join(PAPER_METHODS)}")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--variant", default="fig1", choices=VARIANTS,
                        help="fig1: one sample/step; fig13: 4 samples/step; fig14: r over-fitted to the samples")
    parser.add_argument("--eta", type=float, default=StudyConfig.eta, help="lookahead step η of l2vsd")
    parser.add_argument("--lookahead", default=StudyConfig.lookahead, choices=("paper", "sgd_mean", "optimizer"),
                        help="the step of r that l2vsd linearizes (optimizer: r's AdamW steps, scaled by η)")
    parser.add_argument("--setup", default="engine", choices=SETUPS,
                        help="listing: Appendix F's noise model (α = 1 − β, σ = √((1 − α)/α)), N_render = 4 with a "
                             "cumulative product, and real-vsd's r trained after q's step")
    parser.add_argument("--jvp-mode", default="forward_ad")
    parser.add_argument("--json", required=True, help="where to write the summary JSON")
    parser.add_argument("--plot", help="where to write the PNG")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PAPER_METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown or '(empty)'}; allowed: {', '.join(PAPER_METHODS)}")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    try:
        cfg = StudyConfig(steps=args.steps, variant=args.variant, eta=args.eta, lookahead=args.lookahead,
                          jvp_mode=args.jvp_mode, setup=args.setup,
                          samples_per_step=4 if args.variant == "fig13" or args.setup == "listing" else 1)
        DistillConfig(method="l2vsd", eta=cfg.eta, lookahead=cfg.lookahead, jvp_mode=cfg.jvp_mode)  # validate early
    except ValueError as err:
        parser.error(str(err))
    total = len(methods) * args.seeds
    done = [0]

    def progress(method, seed):
        done[0] += 1
        print(f"\r[{done[0]:3d}/{total}] {method:<11s} seed {seed}", end="", file=sys.stderr, flush=True)

    summary, pictures = study(methods, args.seeds, cfg, progress)
    print(file=sys.stderr)
    atomic_write_text(args.json, json.dumps(summary, indent=1))
    if args.plot:
        plot(summary, pictures, args.plot)
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
