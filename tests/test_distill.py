"""The estimators against hand-computed cases."""
import math

import pytest
import torch
import torch.nn as nn

from l2vsd_core.distill import (METHODS, Conditioning, DistillConfig, FrozenScore, TrainableScore,
                                score_distillation, to_epsilon)
from l2vsd_core.jvp import EXACT_JVP_MODES
from l2vsd_core.schedules import TimestepSampler

T = 1000
ALPHAS = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).float()


def fixed_t(frac):
    return TimestepSampler(T, min_step_percent=frac, max_step_percent=frac)


class ConstantPrior(nn.Module):
    """ε_pre = c_cond for text = +1 and c_uncond for text = −1 (a text is one number per sample)."""
    prediction_type = "epsilon"

    def __init__(self, c_cond, c_uncond=None):
        super().__init__()
        self.c_cond, self.c_uncond = c_cond, c_uncond
        self.alphas_cumprod = ALPHAS  # plain attribute: distill.FrozenScore

    def forward(self, x_t, t, text):
        if text is None:
            return self.c_cond.expand_as(x_t).clone()
        pick = (text.reshape(-1, *([1] * (x_t.dim() - 1))) > 0).to(x_t.dtype)
        return pick * self.c_cond + (1 - pick) * self.c_uncond


class LinearScore(nn.Module):
    """ε_φ(x_t, c) = W x_t + b + M c: linear in φ = (W, b, M), so its lookahead is exactly its first-order term.

    Loss: ‖W − W*‖² + ‖b − b*‖² + ‖M − M*‖², trained with SGD(lr).
    """
    prediction_type = "epsilon"

    def __init__(self, dim=4, cam=3, lr=0.1, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(dim, dim, generator=g) * 0.3)
        self.b = nn.Parameter(torch.randn(dim, generator=g))
        self.M = nn.Parameter(torch.randn(dim, cam, generator=g))
        self.goal = [torch.randn(dim, dim, generator=g), torch.randn(dim, generator=g), torch.randn(dim, cam, generator=g)]
        self.alphas_cumprod = ALPHAS  # plain attribute: distill.FrozenScore
        self.opt = torch.optim.SGD(self.parameters(), lr=lr)

    def forward(self, x_t, t, text, camera):
        out = x_t @ self.W.T + self.b
        return out if camera is None else out + camera @ self.M.T

    def loss(self, x0, text, camera):
        return sum(((p - g) ** 2).sum() for p, g in zip((self.W, self.b, self.M), self.goal))

    def grads(self):
        return [2 * (p.detach() - g) for p, g in zip((self.W, self.b, self.M), self.goal)]

    def lookahead_parameters(self, scope):
        return {"W": self.W, "b": self.b, "M": self.M} if scope == "all" else {"b": self.b}

    def step(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class MLPScore(LinearScore):
    """A nonlinear ε_φ, to check that l2vsd is the first-order term of the real lookahead."""

    def forward(self, x_t, t, text, camera):
        h = torch.tanh(x_t @ self.W.T + self.b)
        return h @ self.W + (0 if camera is None else camera @ self.M.T)


def run(method, score=None, prior=None, x0=None, cond=None, seed=0, **cfg):
    torch.manual_seed(0)
    x0 = torch.randn(2, 4) if x0 is None else x0
    prior = ConstantPrior(torch.full((4,), 0.3)) if prior is None else prior
    cfg.setdefault("timesteps", fixed_t(0.5))
    cfg.setdefault("lookahead", "sgd_mean")  # the SGD-step closed forms below; other kinds are named where tested
    config = DistillConfig(method=method, **cfg)
    return score_distillation(x0, prior, score, cond or Conditioning(), config, generator=torch.Generator().manual_seed(seed))


def weight(result):
    return (1 - ALPHAS[result.t])[:, None]


def x_t_of(result, x0):
    a = ALPHAS[result.t][:, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * result.noise


def test_protocols_are_satisfied_by_the_test_models():
    assert isinstance(ConstantPrior(torch.zeros(4)), FrozenScore)
    assert isinstance(LinearScore(), TrainableScore)


def test_sds_is_weighted_prior_minus_noise_and_loss_sends_it_to_x0():
    x0 = torch.randn(3, 4, requires_grad=True)
    r = run("sds", x0=x0)
    assert torch.all(r.t == 500)
    expected = (1 - ALPHAS[500]) * (0.3 - r.noise)
    assert torch.allclose(r.grad, expected, atol=1e-6)
    r.loss.backward()
    assert torch.allclose(x0.grad, expected / 3, atol=1e-6)  # threestudio's 0.5·sum/B normalisation


def test_uniform_weighting_and_noise_statistics():
    r = run("sds", x0=torch.zeros(4000, 4), weighting="uniform")
    assert torch.allclose(r.grad, 0.3 - r.noise, atol=1e-6)
    assert abs(float(r.noise.mean())) < 0.02 and abs(float(r.noise.std()) - 1) < 0.02


def test_classifier_free_guidance():
    prior = ConstantPrior(torch.full((4,), 1.0), torch.full((4,), -0.5))
    cond = Conditioning(text=torch.ones(2), text_uncond=-torch.ones(2))
    r = run("sds", prior=prior, cond=cond, guidance_scale=7.5, weighting="uniform")
    assert torch.allclose(r.grad, (-0.5 + 7.5 * 1.5) - r.noise, atol=1e-5)


def test_prediction_type_conversions_recover_epsilon():
    x0, eps = torch.randn(5, 4), torch.randn(5, 4)
    t = torch.tensor([0, 10, 300, 700, 999])
    a = ALPHAS[t][:, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(to_epsilon(eps, x_t, t, ALPHAS, "epsilon"), eps)
    assert torch.allclose(to_epsilon(v, x_t, t, ALPHAS, "v_prediction"), eps, atol=1e-5)
    assert torch.allclose(to_epsilon(x0, x_t, t, ALPHAS, "sample"), eps, atol=1e-3)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        to_epsilon(eps, x_t, t, ALPHAS, "flow")


def test_vsd_uses_phi_before_its_update_and_lvsd_after():
    x0 = torch.randn(2, 4)
    for method, lora_steps in (("vsd", 1), ("vsd", 3), ("lvsd", 1), ("lvsd", 3)):
        score = LinearScore(lr=0.1)
        before = [p.detach().clone() for p in (score.W, score.b)]
        r = run(method, score=score, x0=x0, lora_steps=lora_steps)
        # SGD(0.1) on ‖p − g‖²: p ← p − 0.2 (p − g), γ times.
        after = [g + 0.8 ** lora_steps * (p - g) for p, g in zip(before, score.goal)]
        assert torch.allclose(score.W, after[0], atol=1e-5) and torch.allclose(score.b, after[1], atol=1e-5)
        W, b = before if method == "vsd" else after
        eps_phi = x_t_of(r, x0) @ W.T + b
        assert torch.allclose(r.grad, weight(r) * (0.3 - eps_phi), atol=1e-5), (method, lora_steps)
        assert r.lora_loss > 0


@pytest.mark.parametrize("mode", EXACT_JVP_MODES)
def test_l2vsd_on_a_linear_score_is_the_exact_sgd_lookahead(mode):
    """ε is linear in φ, so ε_φi + J·(−η∇L) = ε_{φi − η∇L} exactly; then φ takes its own optimizer step."""
    x0, eta = torch.randn(2, 4), 0.05
    score = LinearScore(lr=0.1)
    W, b = score.W.detach().clone(), score.b.detach().clone()
    gW, gb, _ = score.grads()
    r = run("l2vsd", score=score, x0=x0, eta=eta, jvp_mode=mode)
    x_t = x_t_of(r, x0)
    eps_lin = x_t @ (W - eta * gW).T + (b - eta * gb)
    assert torch.allclose(r.grad, weight(r) * (0.3 - eps_lin), atol=1e-5)
    assert torch.allclose(score.W, W - 0.1 * gW, atol=1e-6)  # the real update reuses the same gradient
    expected_delta = float((x_t @ (-eta * gW).T - eta * gb).pow(2).mean().sqrt())
    assert math.isclose(r.terms["delta_first_rms"], expected_delta, rel_tol=1e-4)


def test_l2vsd_last_only_moves_the_last_layer():
    x0, eta = torch.randn(2, 4), 0.05
    score = LinearScore()
    W, b = score.W.detach().clone(), score.b.detach().clone()
    _, gb, _ = score.grads()
    r = run("l2vsd_last", score=score, x0=x0, eta=eta)
    eps_lin = x_t_of(r, x0) @ W.T + (b - eta * gb)
    assert torch.allclose(r.grad, weight(r) * (0.3 - eps_lin), atol=1e-5)


def test_l2vsd_is_the_first_order_term_of_the_lookahead_on_a_nonlinear_score():
    """‖ε_{φ−η∇L}(x_t) − (ε_φ(x_t) + Δε_first)‖ = O(η²): halving η quarters the error."""
    x0 = torch.randn(2, 4)
    errors = []
    for eta in (0.04, 0.02, 0.01):
        score = MLPScore(lr=eta)  # lvsd's SGD(η) step is the lookahead that l2vsd linearizes
        l2 = run("l2vsd", score=score, x0=x0, eta=eta, weighting="uniform")
        score = MLPScore(lr=eta)
        la = run("lvsd", score=score, x0=x0, weighting="uniform")
        errors.append(float((l2.grad - la.grad).norm()))
    assert errors[0] > 0
    assert 3.0 < errors[0] / errors[1] < 5.0 and 3.0 < errors[1] / errors[2] < 5.0, errors


def test_hlvsd_on_a_linear_score_has_no_high_order_term():
    x0 = torch.randn(2, 4)
    score = LinearScore()
    W, b = score.W.detach().clone(), score.b.detach().clone()
    r = run("hlvsd", score=score, x0=x0, lora_steps=2)
    assert r.terms["delta_high_rms"] < 1e-6
    assert torch.allclose(r.grad, weight(r) * (0.3 - (x_t_of(r, x0) @ W.T + b)), atol=1e-5)


def test_hlvsd_is_the_lookahead_minus_its_first_order_term():
    x0 = torch.randn(2, 4)
    score = MLPScore(lr=0.2)
    phi_i = {k: v.detach().clone() for k, v in score.named_parameters()}
    r = run("hlvsd", score=score, x0=x0, weighting="uniform", lookahead="optimizer", eta=1.0)  # the real step
    x_t = x_t_of(r, x0)
    f = lambda p: torch.func.functional_call(score, p, (x_t, r.t, None, None))
    step = {k: v.detach() - phi_i[k] for k, v in score.named_parameters()}
    eps_i, first = torch.func.jvp(f, (phi_i,), (step,))
    eps_next = f({k: v.detach() for k, v in score.named_parameters()})
    expected = 0.3 - (eps_i + (eps_next - eps_i - first))
    assert torch.allclose(r.grad, expected, atol=1e-5)
    assert r.terms["delta_high_rms"] > 1e-4


class ResidualScore(LinearScore):
    """A linear ε_φ whose loss is a *mean* of squared residuals over x0's elements, r = x0 Wᵀ + b − Y (as the LoRA's
    denoising loss is): the three lookaheads have closed forms."""

    def __init__(self, optimizer="sgd", lr=0.1, **kw):
        super().__init__(lr=lr, **kw)
        g = torch.Generator().manual_seed(7)
        self.Y = torch.randn(2, 4, generator=g)
        if optimizer == "adamw":
            self.opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.01)

    def loss(self, x0, text, camera):
        return ((x0 @ self.W.T + self.b - self.Y) ** 2).mean()

    def loss_elements(self, x0):
        return x0.numel()

    def residual_grads(self, x0):
        """∇ of Σ r² (the paper's loss) in closed form: (2 Rᵀ x0, 2 Σ R)."""
        R = x0 @ self.W.detach().T + self.b.detach() - self.Y
        return 2 * R.T @ x0, 2 * R.sum(0)


@pytest.mark.parametrize("method", ["l2vsd", "hlvsd"])
def test_paper_lookahead_is_eq7_on_the_summed_residual(method):
    """eq. 7/11: τ = −2η Δ_φ = −η ∇ Σ r²; linear ε, so ε_φi + J·τ = ε_{φi+τ} exactly (and hlvsd's Δε_high = 0)."""
    x0, eta = torch.randn(2, 4), 1e-3
    score = ResidualScore()
    W, b = score.W.detach().clone(), score.b.detach().clone()
    gW, gb = score.residual_grads(x0)
    r = run(method, score=score, x0=x0, eta=eta, lookahead="paper")
    x_t = x_t_of(r, x0)
    eps_lin = x_t @ (W - eta * gW).T + (b - eta * gb)
    eps_est = eps_lin if method == "l2vsd" else x_t @ W.T + b  # hlvsd: ε_φi + Δε_high, Δε_high = 0 here
    assert torch.allclose(r.grad, weight(r) * (0.3 - eps_est), atol=1e-5)
    expected_delta = float((x_t @ (-eta * gW).T - eta * gb).pow(2).mean().sqrt())
    assert math.isclose(r.terms["delta_first_rms"], expected_delta, rel_tol=1e-4)
    n = x0.numel()  # the paper's step is sgd_mean's with η·n
    assert torch.allclose(run(method, score=ResidualScore(), x0=x0, eta=eta * n, lookahead="sgd_mean").grad, r.grad,
                          atol=1e-5)
    assert torch.allclose(score.W, W - 0.1 * gW / n, atol=1e-6)  # the real update: the score's SGD on its mean loss


@pytest.mark.parametrize("method, scope", [("l2vsd", "all"), ("l2vsd_last", "last")])
def test_optimizer_lookahead_is_the_real_adamw_step_once(method, scope):
    """τ = η (φ_i+1 − φ_i) of the score's own AdamW (m, v, step, weight decay), applied once: on a linear ε the
    estimate is ε at φ_i + τ over the carried parameters (the others stay at φ_i), and φ ends where AdamW puts it."""
    x0 = torch.randn(2, 4)
    twin = ResidualScore(optimizer="adamw", lr=0.05)
    twin.loss(x0, None, None).backward()
    twin.step()
    for eta in (1.0, 0.5):
        score = ResidualScore(optimizer="adamw", lr=0.05)
        W, b = score.W.detach().clone(), score.b.detach().clone()
        r = run(method, score=score, x0=x0, eta=eta, lookahead="optimizer")
        dW, db = twin.W.detach() - W, twin.b.detach() - b
        W_la = W + eta * dW if scope == "all" else W
        assert torch.allclose(r.grad, weight(r) * (0.3 - (x_t_of(r, x0) @ W_la.T + b + eta * db)), atol=1e-5)
        assert torch.equal(score.W, twin.W) and torch.equal(score.b, twin.b)  # one real step, not two
        assert score.opt.state[score.W]["step"] == 1


def test_optimizer_lookahead_is_the_first_order_change_under_the_real_step():
    """On a nonlinear ε: ‖ε_{φ_i+1} − (ε_φi + J·(φ_i+1 − φ_i))‖ = O(‖step‖²) for the real AdamW step — lvsd's
    lookahead; halving AdamW's learning rate (its first step is ≈ lr per parameter) quarters the error."""
    x0 = torch.randn(2, 4)
    errors = []
    for lr in (0.04, 0.02, 0.01):
        def adamw_mlp():
            score = MLPScore()
            score.opt = torch.optim.AdamW(score.parameters(), lr=lr)
            return score
        l2 = run("l2vsd", score=adamw_mlp(), x0=x0, eta=1.0, lookahead="optimizer", weighting="uniform")
        la = run("lvsd", score=adamw_mlp(), x0=x0, weighting="uniform")
        errors.append(float((l2.grad - la.grad).norm()))
    assert errors[0] > 0
    assert 3.0 < errors[0] / errors[1] < 5.0 and 3.0 < errors[1] / errors[2] < 5.0, errors


def test_esd_lambda_mixes_camera_conditioned_and_unconditioned_scores():
    x0, cam = torch.randn(2, 4), torch.randn(2, 3)
    cond = Conditioning(camera=cam)
    for lam in (0.0, 0.5, 1.0):
        score = LinearScore()
        W, b, M = (p.detach().clone() for p in (score.W, score.b, score.M))
        r = run("vsd", score=score, x0=x0, cond=cond, esd_lambda=lam)
        base = x_t_of(r, x0) @ W.T + b
        eps = lam * base + (1 - lam) * (base + cam @ M.T)
        assert torch.allclose(r.grad, weight(r) * (0.3 - eps), atol=1e-5), lam


def test_l2esd_linearizes_both_branches():
    x0, cam, eta, lam = torch.randn(2, 4), torch.randn(2, 3), 0.05, 0.5
    score = LinearScore()
    W, b, M = (p.detach().clone() for p in (score.W, score.b, score.M))
    gW, gb, gM = score.grads()
    r = run("l2vsd", score=score, x0=x0, cond=Conditioning(camera=cam), esd_lambda=lam, eta=eta)
    W, b, M = W - eta * gW, b - eta * gb, M - eta * gM
    base = x_t_of(r, x0) @ W.T + b
    eps = lam * base + (1 - lam) * (base + cam @ M.T)
    assert torch.allclose(r.grad, weight(r) * (0.3 - eps), atol=1e-5)


def test_every_jvp_mode_gives_the_l2vsd_gradient():
    x0 = torch.randn(2, 4)
    grads = {}
    for mode in ("forward_ad", "func", "double_backward", "fd_central", "fd_forward"):
        grads[mode] = run("l2vsd", score=MLPScore(), x0=x0, eta=0.05, jvp_mode=mode).grad
    for mode, g in grads.items():
        tol = 1e-5 if mode in EXACT_JVP_MODES else 1e-3
        assert torch.allclose(g, grads["forward_ad"], atol=tol), mode


def test_nan_guard_and_gradient_clipping():
    r = run("sds", prior=ConstantPrior(torch.tensor([float("nan"), 1e6, -1e6, 0.0])), x0=torch.randn(2, 4),
            grad_clip=0.5)
    assert torch.isfinite(r.grad).all()
    assert r.terms["nonfinite"] == 2.0
    assert torch.all(r.grad[:, 0] == 0) and torch.all(r.grad[:, 1] == 0.5) and torch.all(r.grad[:, 2] == -0.5)


def test_scheduled_gradient_clip():
    prior = ConstantPrior(torch.full((4,), 1e6))
    config = DistillConfig(method="sds", grad_clip=[0, 0.1, 1.0, 100], timesteps=fixed_t(0.5))
    for step, clip in ((0, 0.1), (50, 0.55), (500, 1.0)):
        r = score_distillation(torch.randn(1, 4), prior, None, Conditioning(), config, step=step)
        assert torch.allclose(r.grad, torch.full((1, 4), clip)), step


def test_gradient_reaches_parameters_through_a_differentiable_renderer():
    theta = torch.randn(4, requires_grad=True)
    render = lambda: torch.stack([theta * 2.0, theta ** 2])  # any differentiable g(θ)
    r = run("sds", x0=render())
    r.loss.backward()
    expected = (r.grad[0] * 2.0 + r.grad[1] * 2 * theta.detach()) / 2
    assert torch.allclose(theta.grad, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, pattern", [
    ({"method": "vds"}, r"method must be one of sds, vsd, lvsd, l2vsd, l2vsd_last, hlvsd; got 'vds'"),
    ({"eta": -0.1}, r"eta must be a finite number >= 0"),
    ({"lookahead": "adam"}, r"lookahead must be one of paper, sgd_mean, optimizer; got 'adam'"),
    ({"eta": float("nan")}, r"eta must be"),
    ({"lora_steps": 0}, r"lora_steps \(γ\) must be an integer >= 1"),
    ({"lora_steps": 1.5}, r"lora_steps \(γ\) must be an integer >= 1"),
    ({"esd_lambda": 1.5}, r"esd_lambda must be a number in \[0, 1\]"),
    ({"jvp_mode": "backward"}, r"jvp_mode must be one of auto, forward_ad"),
    ({"weighting": "snr"}, r"weighting must be one of sds, uniform"),
    ({"guidance_scale": -1}, r"guidance_scale must be"),
    ({"grad_clip": [1, 2]}, r"grad_clip must be a number or \[start_step, v0, v1, end_step\]"),
])
def test_bad_config_names_the_argument_and_allowed_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DistillConfig(**kwargs)


def test_bad_inputs_are_refused_clearly():
    score = LinearScore()
    with pytest.raises(ValueError, match="x0 contains NaN or Inf"):
        run("vsd", score=score, x0=torch.tensor([[float("nan")] * 4]))
    with pytest.raises(ValueError, match=r"cond.camera must have the batch size of x0 \(2\)"):
        run("vsd", score=score, cond=Conditioning(camera=torch.zeros(3, 3)))
    with pytest.raises(ValueError, match=r"cond.text must have the batch size"):
        run("sds", cond=Conditioning(text=torch.ones(5)))
    with pytest.raises(ValueError, match="needs a trainable score"):
        run("l2vsd", score=None)
    with pytest.raises(ValueError, match="cond.camera is needed"):
        run("vsd", score=score, esd_lambda=0.5)
    with pytest.raises(ValueError, match="x0 must be a floating-point tensor"):
        run("sds", x0=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="cond.camera contains NaN"):
        run("vsd", score=score, cond=Conditioning(camera=torch.full((2, 3), float("inf"))))


def test_every_method_runs_and_reports_its_terms():
    for method in METHODS:
        r = run(method, score=None if method == "sds" else MLPScore(), x0=torch.randn(2, 4))
        assert torch.isfinite(r.grad).all() and torch.isfinite(r.loss)
        assert (r.lora_loss is None) == (method == "sds")
        assert ("delta_first_rms" in r.terms) == (method in ("l2vsd", "l2vsd_last", "hlvsd"))


def test_image_space_loss_is_the_latent_gradient_in_image_space():
    """HiFA's image loss on a pixel-space decoder x ↦ (x + 1)/2: grad_img = w·(ε_pre − ε_est)/2 wherever neither
    decoded estimate is clamped, and the loss sends grad_img / B into the render."""
    from l2vsd_core.distill import DistillResult, image_space_loss
    torch.manual_seed(0)
    alphas = torch.linspace(0.999, 0.01, 1000)
    image = torch.rand(2, 3, 4, 4, requires_grad=True)
    x0 = image.detach() * 2 - 1
    t = torch.tensor([100, 300])
    a = alphas[t].view(-1, 1, 1, 1)
    noise = torch.randn_like(x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps_pre, eps_est = noise + 0.05 * torch.randn_like(x0), noise + 0.05 * torch.randn_like(x0)
    result = DistillResult(loss=torch.zeros(()), grad=torch.zeros_like(x0), t=t, noise=noise, lora_loss=None,
                           terms={}, x_t=x_t, eps_pre=eps_pre, eps_est=eps_est)
    decode = lambda x: ((x + 1) / 2).clamp(0, 1)
    loss, grad_img = image_space_loss(image, result, decode, alphas)
    loss.backward()
    torch.testing.assert_close(image.grad, grad_img / 2)
    inside = ((x_t - (1 - a).sqrt() * eps_pre) / a.sqrt()).abs().lt(1) & \
             ((x_t - (1 - a).sqrt() * eps_est) / a.sqrt()).abs().lt(1)
    expected = (1 - a) * (eps_pre - eps_est) / 2
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(grad_img[inside], expected.expand_as(grad_img)[inside], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="do not match the render"):
        image_space_loss(image[:, :, :2], result, decode, alphas)
