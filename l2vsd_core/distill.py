"""Score-distillation gradients: SDS, VSD, L-VSD, L²-VSD (full / last layer), HL-VSD, and ESD's λ.

Read next to the L²-VSD paper (arXiv 2507.09748).  With ``x0 = g(θ, c)`` the render (or its latent),
``x_t = α_t x0 + σ_t ε`` and ``w(t)`` a weight, every method returns the gradient ``w(t) (ε_pre − ε_est)`` for ``x0``:

==========  ======================================================================  ====================
method      ε_est                                                                   paper
==========  ======================================================================  ====================
sds         ε (the injected noise)                                                  eq. 4
vsd         ε_φi(x_t); φ trained γ steps *after* (the practical order)              eq. 5, 6
lvsd        ε_φi+γ(x_t): φ trained γ steps *first* (lookahead)                       eq. 7, 8
l2vsd       ε_φi(x_t) + J_φi(x_t)·(−η ∇_φ L_lora): the linearized lookahead        eq. 9–11
l2vsd_last  the same, with only the last layer's parameters carrying the tangent    sec. 5.4.2
hlvsd       ε_φi(x_t) + Δε_high, the lookahead minus its first-order term           app. B.2, C.4
==========  ======================================================================  ====================

ESD (eq. 12) mixes the camera-conditioned and unconditioned LoRA scores,
``ε_φ = λ ε_φ(x_t, ∅) + (1 − λ) ε_φ(x_t, c)``, in every VSD-family row (so ``l2vsd`` with λ > 0 is L²-ESD).

The lookahead (``DistillConfig.lookahead``): which step of φ the l2vsd / hlvsd rows linearize, ``Δε_first = J·τ``.

=============  ====================================================================================================
``paper``      eq. 7/11 exactly: ``τ = −2η Δ_φ`` with ``Δ_φ = (ε_φ(x_t′) − ε′)ᵀ J``, the vector–Jacobian product of
               the *summed* residual: an SGD step of size η on ``‖ε_φ − ε′‖²`` summed over its n elements (the
               paper's η, range 1e-3 … 1)
``sgd_mean``   ``τ = −η ∇_φ L_lora`` with ``L_lora`` the score's own loss, the *mean* squared error (threestudio's):
               the paper's step with η divided by n (3 072 for a 32² RGB render, 16 384 for SD's 4 × 64² latents).
               The default, at η = 0.5 (it was η = 0.01 before the README's study, "Does the lookahead do
               anything?"): the one setting that improved anything there (the Gaussian study) and, on images, below
               the size where the correction starts to add noise; unlike ``paper`` its η means the same at every
               render size
``optimizer``  ``τ = η (φ_i+γ − φ_i)``: the update the score's own optimizer (AdamW: m, v, step, weight decay) makes
               in its γ steps, taken once and linearized at φ_i — the exact first-order part of practical L-VSD, at
               no extra forward pass; η scales it (1 = the real step)
=============  ====================================================================================================

For ``paper`` and ``sgd_mean`` the real update of φ afterwards uses the score's optimizer (AdamW) with the same
gradient, as in the paper.  HL-VSD takes the same lookahead: ``Δε_high = ε_φi+τ − ε_φi − J·τ``.

The gradient reaches θ through any differentiable renderer by the target trick:
``loss = ½‖x0 − sg(x0 − grad)‖² / B`` has ``d loss / d x0 = grad / B`` (threestudio's normalisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .jvp import JVP_MODES, jvp
from .schedules import Scheduled, TimestepSampler, check_scheduled, scheduled_value

METHODS = ("sds", "vsd", "lvsd", "l2vsd", "l2vsd_last", "hlvsd")
LOOKAHEADS = ("paper", "sgd_mean", "optimizer")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
WEIGHTINGS = ("sds", "uniform")


# --------------------------------------------------------------------------------------------------------- protocols
@runtime_checkable
class FrozenScore(Protocol):
    """The pretrained prior ε_pre: called as ``prior(x_t, t, text)`` → raw model output.

    ``alphas_cumprod`` must be a plain attribute (or property), not an ``nn.Module`` buffer: from Python 3.12 on,
    ``isinstance`` against a runtime-checkable protocol looks members up with ``inspect.getattr_static``, which does
    not see buffers (they live in ``_buffers``).  Users call ``.to(device)`` on it where they index it.
    """

    prediction_type: str          # "epsilon", "v_prediction" or "sample"
    alphas_cumprod: torch.Tensor  # ᾱ_t for t = 0 … T−1

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, text: Optional[torch.Tensor]) -> torch.Tensor: ...


@runtime_checkable
class TrainableScore(Protocol):
    """The tunable score ε_φ (the LoRA in the product, r in the Gaussian toy); an ``nn.Module``.

    ``forward(x_t, t, text, camera)`` → raw model output; a zero camera means "unconditioned".
    ``loss(x0, text, camera)`` → its own training loss on ``x0`` (fresh t′, ε′, camera dropout), a scalar with graph.
    ``lookahead_parameters(scope)`` → ``{name: parameter}`` that carry the lookahead: scope ``"all"`` (every trainable
    parameter) or ``"last"`` (the last layer), names as in ``named_parameters()``.
    ``step()`` → apply its optimizer to the accumulated ``.grad`` and clear them.
    Optional ``loss_elements(x0)`` → n, the number of squared residuals ``loss`` averages (the ``paper`` lookahead
    sums them); a score without it has a summed loss (n = 1).
    """

    prediction_type: str
    alphas_cumprod: torch.Tensor

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, text: Optional[torch.Tensor],
                 camera: Optional[torch.Tensor]) -> torch.Tensor: ...

    def loss(self, x0: torch.Tensor, text: Optional[torch.Tensor], camera: Optional[torch.Tensor]) -> torch.Tensor: ...

    def lookahead_parameters(self, scope: str) -> dict[str, torch.nn.Parameter]: ...

    def step(self) -> None: ...


@dataclass
class Conditioning:
    """What the scores are conditioned on for one batch of renders.

    ``text`` / ``text_uncond``: the prior's (view-dependent) condition and its negative/empty one for CFG; with
    ``text_uncond=None`` no CFG is applied.  ``score_text``: the trainable score's (view-independent) condition,
    ``text`` when omitted.  ``camera``: ``[B, …]`` camera features for the trainable score (flattened c2w).
    """

    text: Optional[torch.Tensor] = None
    text_uncond: Optional[torch.Tensor] = None
    score_text: Optional[torch.Tensor] = None
    camera: Optional[torch.Tensor] = None

    @property
    def trainable_text(self) -> Optional[torch.Tensor]:
        return self.text if self.score_text is None else self.score_text


# ------------------------------------------------------------------------------------------------------------ config
@dataclass
class DistillConfig:
    method: str = "l2vsd"
    guidance_scale: float = 7.5         # CFG scale for the prior, diffusers-style: ε_u + s (ε_c − ε_u)
    eta: float = 0.5                    # lookahead step η of l2vsd / l2vsd_last / hlvsd (its meaning: lookahead)
    lookahead: str = "sgd_mean"         # which step of φ is linearized: "paper", "sgd_mean", "optimizer" (above);
                                        # both defaults by the README's study ("Does the lookahead do anything?")
    lora_steps: int = 1                 # γ: updates of φ per iteration (after for vsd, before for lvsd / hlvsd)
    esd_lambda: float = 0.0             # ESD λ: weight of the camera-unconditioned score
    jvp_mode: str = "auto"              # see jvp.JVP_MODES; "auto": the fastest exact mode on the device
    fd_rel_step: float = 1e-3           # step of the finite-difference JVP modes, relative to ‖φ‖
    weighting: str = "sds"              # w(t): "sds" = 1 − ᾱ_t (DreamFusion, threestudio), "uniform" = 1
    grad_clip: Optional[Scheduled] = None  # clamp |grad| elementwise (threestudio's grad_clip), may be scheduled
    timesteps: TimestepSampler = field(default_factory=TimestepSampler)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.jvp_mode not in ("auto",) + JVP_MODES:
            raise ValueError(f"jvp_mode must be one of auto, {', '.join(JVP_MODES)}; got {self.jvp_mode!r}")
        if self.lookahead not in LOOKAHEADS:
            raise ValueError(f"lookahead must be one of {', '.join(LOOKAHEADS)}; got {self.lookahead!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {self.weighting!r}")
        _require(math.isfinite(self.eta) and self.eta >= 0, "eta", self.eta, "a finite number >= 0")
        _require(isinstance(self.lora_steps, int) and not isinstance(self.lora_steps, bool) and self.lora_steps >= 1,
                 "lora_steps (γ)", self.lora_steps, "an integer >= 1")
        _require(0.0 <= self.esd_lambda <= 1.0, "esd_lambda", self.esd_lambda, "a number in [0, 1]")
        _require(math.isfinite(self.guidance_scale) and self.guidance_scale >= 0, "guidance_scale",
                 self.guidance_scale, "a finite number >= 0")
        _require(math.isfinite(self.fd_rel_step) and self.fd_rel_step > 0, "fd_rel_step", self.fd_rel_step,
                 "a finite number > 0")
        if self.grad_clip is not None:
            check_scheduled("grad_clip", self.grad_clip)

    @property
    def needs_trainable_score(self) -> bool:
        return self.method != "sds"


def _require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


# ------------------------------------------------------------------------------------------------------------ output
@dataclass
class DistillResult:
    loss: torch.Tensor               # target-trick loss: backward() sends grad / B into x0
    grad: torch.Tensor               # w(t) (ε_pre − ε_est), after the NaN guard and clipping
    t: torch.Tensor                  # the timesteps used, [B]
    noise: torch.Tensor              # the ε injected into x_t = √ᾱ x0 + √(1−ᾱ) ε
    lora_loss: Optional[float]       # mean training loss of the trainable score this step
    terms: dict[str, float]          # RMS norms for logging (‖ε_pre − ε_φ‖, ‖Δε_first‖, …)
    x_t: Optional[torch.Tensor] = None       # the noisy input both scores saw (detached)
    eps_pre: Optional[torch.Tensor] = None   # ε_pre after CFG (detached)
    eps_est: Optional[torch.Tensor] = None   # the method's ε_est (detached; the noise itself for sds)


# ----------------------------------------------------------------------------------------------------------- helpers
def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def to_epsilon(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """Convert a model output to an ε prediction (linear in ``output``, so JVPs pass through)."""
    if prediction_type == "epsilon":
        return output
    a_bar = _expand(alphas_cumprod.to(x_t.device)[t], x_t)
    if prediction_type == "v_prediction":   # v = α ε − σ x0  ⇒  ε = σ x_t + α v
        return (1 - a_bar).sqrt() * x_t + a_bar.sqrt() * output
    if prediction_type == "sample":         # x0-prediction
        return (x_t - a_bar.sqrt() * output) / (1 - a_bar).sqrt()
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().double().pow(2).mean().sqrt())


def _cat(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if a is None else torch.cat([a, b])


def prior_epsilon(prior: FrozenScore, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                  guidance_scale: float) -> torch.Tensor:
    """ε_pre with classifier-free guidance when ``cond.text_uncond`` is given (one batched call)."""
    if cond.text_uncond is None:
        return to_epsilon(prior(x_t, t, cond.text), x_t, t, prior.alphas_cumprod, prior.prediction_type)
    out = prior(torch.cat([x_t, x_t]), torch.cat([t, t]), _cat(cond.text, cond.text_uncond))
    eps = to_epsilon(out, torch.cat([x_t, x_t]), torch.cat([t, t]), prior.alphas_cumprod, prior.prediction_type)
    eps_cond, eps_uncond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def trainable_epsilon(score: TrainableScore, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      esd_lambda: float, params: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
    """ε_φ(x_t) — ESD's λ-mix of the camera-unconditioned and conditioned branches — with ``params`` substituted."""
    def call(*args):
        if params is None:
            return score(*args)
        # tie_weights=False: the substituted (trainable) parameters are never tied, and skipping the scan over every
        # parameter of the UNet saves ~12% of a forward on the tiny benchmark UNet.
        return torch.func.functional_call(score, dict(params), args, tie_weights=False)

    text = cond.trainable_text
    if esd_lambda == 0.0:
        out = call(x_t, t, text, cond.camera)
        return to_epsilon(out, x_t, t, score.alphas_cumprod, score.prediction_type)
    x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
    out = call(x2, t2, _cat(text, text), torch.cat([cond.camera, torch.zeros_like(cond.camera)]))
    eps_cam, eps_uncam = to_epsilon(out, x2, t2, score.alphas_cumprod, score.prediction_type).chunk(2)
    return esd_lambda * eps_uncam + (1.0 - esd_lambda) * eps_cam


def train_trainable_score(score: TrainableScore, x0: torch.Tensor, cond: Conditioning, steps: int) -> list[float]:
    """γ optimizer steps of the trainable score on the (detached) render; returns the losses."""
    losses = []
    for _ in range(steps):
        score.zero_grad(set_to_none=True)
        loss = score.loss(x0.detach(), cond.trainable_text, cond.camera)
        loss.backward()
        score.step()
        losses.append(float(loss.detach()))
    return losses


def _validate_inputs(x0: torch.Tensor, prior, score, cond: Conditioning, config: DistillConfig) -> None:
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 2:
        raise ValueError(f"x0 must be a floating-point tensor [B, ...] (the rendered batch); got "
                         f"{type(x0).__name__} {tuple(getattr(x0, 'shape', ()))}")
    if not torch.isfinite(x0.detach()).all():
        raise ValueError("x0 contains NaN or Inf: the render is broken (check the scene's parameters and learning "
                         "rates); refusing to distill from it")
    if prior is None:
        raise ValueError("prior must be a FrozenScore (the pretrained model); got None")
    if config.needs_trainable_score and score is None:
        raise ValueError(f"method {config.method!r} needs a trainable score (the LoRA); got score=None — "
                         f"attach one or use method 'sds'")
    batch = x0.shape[0]
    for name in ("text", "text_uncond", "score_text", "camera"):
        value = getattr(cond, name)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.shape[0] != batch:
            raise ValueError(f"cond.{name} must have the batch size of x0 ({batch}) in its first dimension; got "
                             f"shape {tuple(getattr(value, 'shape', ()))}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"cond.{name} contains NaN or Inf")
    if cond.text_uncond is not None and cond.text is not None and cond.text_uncond.shape != cond.text.shape:
        raise ValueError(f"cond.text_uncond shape {tuple(cond.text_uncond.shape)} must equal cond.text shape "
                         f"{tuple(cond.text.shape)}")
    if config.esd_lambda > 0 and config.needs_trainable_score and cond.camera is None:
        raise ValueError("esd_lambda > 0 mixes camera-conditioned and unconditioned scores: cond.camera is needed")


# ------------------------------------------------------------------------------------------------------ the estimator
def score_distillation(x0: torch.Tensor, prior: FrozenScore, score: Optional[TrainableScore], cond: Conditioning,
                       config: DistillConfig, step: int = 0,
                       generator: Optional[torch.Generator] = None) -> DistillResult:
    """One score-distillation step on the batch ``x0`` (with graph to θ); updates the trainable score as the method
    orders it and returns the loss whose backward gives θ its gradient."""
    _validate_inputs(x0, prior, score, cond, config)
    batch = x0.shape[0]
    t = config.timesteps.sample(batch, step, device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                        device=generator.device if generator is not None else x0.device).to(x0.device)
    a_bar = _expand(prior.alphas_cumprod.to(x0.device)[t], x0)
    with torch.no_grad():
        x_t = a_bar.sqrt() * x0.detach() + (1 - a_bar).sqrt() * noise
        eps_pre = prior_epsilon(prior, x_t, t, cond, config.guidance_scale)

    terms: dict[str, float] = {"t_mean": float(t.double().mean())}
    lora_losses: list[float] = []
    method, lam = config.method, config.esd_lambda

    if method == "sds":
        eps_est = noise
    elif method == "vsd":
        with torch.no_grad():
            eps_est = trainable_epsilon(score, x_t, t, cond, lam)
        lora_losses = train_trainable_score(score, x0, cond, config.lora_steps)
    elif method == "lvsd":
        lora_losses = train_trainable_score(score, x0, cond, config.lora_steps)
        with torch.no_grad():
            eps_est = trainable_epsilon(score, x_t, t, cond, lam)
    elif method in ("l2vsd", "l2vsd_last"):
        eps_est, lora_losses = _linearized_lookahead(score, x0, x_t, t, cond, config, terms)
    else:  # hlvsd
        eps_est, lora_losses = _high_order_lookahead(score, x0, x_t, t, cond, config, terms)

    if method != "sds":
        terms["eps_phi_rms"] = _rms(eps_est)
    terms["eps_pre_minus_est_rms"] = _rms(eps_pre - eps_est)

    weight = (1 - a_bar) if config.weighting == "sds" else torch.ones_like(a_bar)
    grad = weight * (eps_pre - eps_est)
    terms["nonfinite"] = float((~torch.isfinite(grad)).sum())
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if config.grad_clip is not None:
        clip = scheduled_value(config.grad_clip, step)
        grad = grad.clamp(-clip, clip)
    grad = grad.to(x0.dtype)
    terms["grad_rms"] = _rms(grad)

    target = (x0 - grad).detach()
    loss = 0.5 * F.mse_loss(x0, target, reduction="sum") / batch
    lora_loss = sum(lora_losses) / len(lora_losses) if lora_losses else None
    return DistillResult(loss=loss, grad=grad.detach(), t=t, noise=noise, lora_loss=lora_loss, terms=terms,
                         x_t=x_t, eps_pre=eps_pre.detach(), eps_est=eps_est.detach())


def image_space_loss(image: torch.Tensor, result: DistillResult, decode, alphas_cumprod: torch.Tensor,
                     weighting: str = "sds") -> tuple[torch.Tensor, torch.Tensor]:
    """HiFA's image-space score distillation (threestudio ``use_img_loss``), for any method's ``result``.

    Both one-step denoised estimates ``x̂0 = (x_t − σ ε) / α`` (with ε_pre and with ε_est) are decoded to RGB, and
    ``grad_img = w(t) · (img_est − img_pre) · α / σ`` is sent into ``image`` (the render the latents were encoded
    from, [B, 3, H, W] with graph) by the same target trick.  Where the decoder is the identity up to scale this is
    the latent gradient in image space: ``x̂0_est − x̂0_pre = σ (ε_pre − ε_est) / α``.  Returns (loss, grad_img).
    """
    a_bar = _expand(alphas_cumprod.to(result.x_t.device)[result.t], result.x_t)
    alpha, sigma = a_bar.sqrt(), (1 - a_bar).sqrt()
    with torch.no_grad():
        img_pre = decode((result.x_t - sigma * result.eps_pre) / alpha)
        img_est = decode((result.x_t - sigma * result.eps_est) / alpha)
        weight = (1 - a_bar) if weighting == "sds" else torch.ones_like(a_bar)
        scale = _expand((weight * alpha / sigma).flatten(), img_pre).to(img_pre.device)
        grad_img = torch.nan_to_num(scale * (img_est - img_pre), nan=0.0, posinf=0.0, neginf=0.0)
    if grad_img.shape != image.shape:
        raise ValueError(f"decoded images {tuple(grad_img.shape)} do not match the render {tuple(image.shape)}: "
                         f"pass the render at the prior's image size")
    grad_img = grad_img.to(image.dtype)
    target = (image - grad_img).detach()
    return 0.5 * F.mse_loss(image, target, reduction="sum") / image.shape[0], grad_img


def _loss_elements(score, x0: torch.Tensor) -> int:
    counter = getattr(score, "loss_elements", None)
    return 1 if counter is None else int(counter(x0))


def _take_steps(score, carry: dict, x0, cond, steps: int) -> tuple[dict, list[float], dict]:
    """γ real optimizer steps; → (φ_i+γ − φ_i over ``carry``, the losses, φ_i+γ of every trainable parameter).  The
    parameters are put back at φ_i, where the caller linearizes; it then ``_set``s them to φ_i+γ again."""
    every = score.lookahead_parameters("all")
    before = {k: p.detach().clone() for k, p in every.items()}
    losses = train_trainable_score(score, x0, cond, steps)
    after = {k: p.detach().clone() for k, p in every.items()}
    with torch.no_grad():
        for k, p in every.items():
            p.copy_(before[k])
    return {k: after[k] - before[k] for k in carry}, losses, after


def _set(params: dict, values: dict) -> None:
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(values[k])


def _gradient_tangent(score, carry: dict, x0, cond, config) -> tuple[dict, torch.Tensor]:
    """The ``paper`` / ``sgd_mean`` tangent from one backward of the score's loss at φ_i (the gradient stays in
    ``.grad`` for the real update)."""
    score.zero_grad(set_to_none=True)
    loss = score.loss(x0.detach(), cond.trainable_text, cond.camera)
    loss.backward()
    # paper: −2η Δ_φ = −η ∇ Σ r² = −η n ∇ mean(r²)
    scale = config.eta * (_loss_elements(score, x0) if config.lookahead == "paper" else 1)
    return {k: -scale * (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in carry.items()}, loss


def _linearized_lookahead(score, x0, x_t, t, cond, config, terms):
    """L²-VSD: ε_φi(x_t) + J_φi(x_t)·τ for the config's lookahead τ; φ then takes its real update."""
    scope = "last" if config.method == "l2vsd_last" else "all"
    carry = score.lookahead_parameters(scope)
    f = lambda params: trainable_epsilon(score, x_t, t, cond, config.esd_lambda, params)  # noqa: E731
    if config.lookahead == "optimizer":
        step, losses, after = _take_steps(score, carry, x0, cond, config.lora_steps)
        tangent = {k: config.eta * v for k, v in step.items()}
        eps_phi, delta_first = jvp(f, carry, tangent, config.jvp_mode, fd_rel_step=config.fd_rel_step)
        _set(score.lookahead_parameters("all"), after)
    else:
        tangent, loss = _gradient_tangent(score, carry, x0, cond, config)
        eps_phi, delta_first = jvp(f, carry, tangent, config.jvp_mode, fd_rel_step=config.fd_rel_step)
        score.step()  # the same gradient now updates φ with the score's own optimizer
        losses = [float(loss.detach())]
        if config.lora_steps > 1:
            losses += train_trainable_score(score, x0, cond, config.lora_steps - 1)
    terms["delta_first_rms"] = _rms(delta_first)
    return eps_phi + delta_first, losses


def _high_order_lookahead(score, x0, x_t, t, cond, config, terms):
    """HL-VSD (the paper's ablation): ε_φi + Δε_high with Δε_high = ε_φi+τ − ε_φi − J_φi·τ, for the same lookahead
    τ as l2vsd (``optimizer``: τ = η(φ_i+γ − φ_i), the update φ really makes, scaled)."""
    carry = score.lookahead_parameters("all")
    f = lambda params: trainable_epsilon(score, x_t, t, cond, config.esd_lambda, params)  # noqa: E731
    if config.lookahead == "optimizer":
        step, losses, after = _take_steps(score, carry, x0, cond, config.lora_steps)
        tangent = {k: config.eta * v for k, v in step.items()}
    else:
        tangent, loss = _gradient_tangent(score, carry, x0, cond, config)
    with torch.no_grad():
        eps_next = f({k: p.detach() + tangent[k] for k, p in carry.items()})
    eps_phi, delta_first = jvp(f, carry, tangent, config.jvp_mode, fd_rel_step=config.fd_rel_step)
    if config.lookahead == "optimizer":
        _set(carry, after)
    else:
        score.step()
        losses = [float(loss.detach())]
        if config.lora_steps > 1:
            losses += train_trainable_score(score, x0, cond, config.lora_steps - 1)
    delta_high = eps_next - eps_phi - delta_first
    terms["delta_first_rms"] = _rms(delta_first)
    terms["delta_high_rms"] = _rms(delta_high)
    return eps_phi + delta_high, losses
