"""The 2D Gaussian study: exact scores, closed-form metrics, the paper's setup through the engine."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence as torch_kl

from l2vsd_core.distill import Conditioning, DistillConfig, score_distillation
from l2vsd_core.schedules import TimestepSampler
from l2vsd_core.toys import gaussian as G

ROOT = Path(__file__).resolve().parents[1]


def autograd_epsilon(x_t, t, alphas, mu, factor):
    """Independent reference: ε = −σ_t ∇ log p_t(x_t), with p_t = N(α μ, α² Σ + σ² I) from torch.distributions."""
    out = []
    for i in range(x_t.shape[0]):
        a = alphas[t[i]]
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        dist = MultivariateNormal(alpha * mu, alpha ** 2 * factor @ factor.T + sigma ** 2 * torch.eye(2, dtype=mu.dtype))
        x = x_t[i].clone().requires_grad_(True)
        (score,) = torch.autograd.grad(dist.log_prob(x), x)
        out.append(-sigma * score)
    return torch.stack(out)


def test_exact_epsilon_matches_the_autograd_score_of_the_noised_gaussian():
    g = torch.Generator().manual_seed(0)
    alphas = G.paper_alphas_cumprod()
    mu, factor = torch.randn(2, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g, dtype=torch.float64)
    x_t = torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 200, 500, 900, 999])
    expected = autograd_epsilon(x_t, t, alphas, mu, factor)
    assert torch.allclose(G.gaussian_epsilon(x_t, t, alphas, mu, factor), expected, atol=1e-10)
    # A degenerate (delta) r still has a well-defined noisy score: ε = (x_t − α μ) / σ.
    a = alphas[t][:, None]
    delta = G.gaussian_epsilon(x_t, t, alphas, mu, torch.zeros(2, 2, dtype=torch.float64))
    assert torch.allclose(delta, (x_t - a.sqrt() * mu) / (1 - a).sqrt(), atol=1e-10)


def test_paper_noise_schedule():
    alphas = G.paper_alphas_cumprod()
    assert alphas.shape == (1000,)
    assert float(alphas[0]) == pytest.approx(1 - 1e-4) and float(alphas[-1]) == pytest.approx(0.98)


def problem_with_r(seed, alphas):
    """Appendix F's p and q for ``seed`` and an r away from zero; → p's μ and factor, prior, q, r, r's μ and factor."""
    p_mu, p_factor, q_mu, q_factor = G.make_problem(seed)
    prior = G.GaussianPrior(p_mu, p_factor, alphas)
    scene = G.GaussianScene(q_mu.clone(), q_factor.clone())
    score = G.GaussianScore(scene, alphas)
    with torch.no_grad():
        score.mu.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64))
        score.factor.copy_(torch.tensor([[0.5, 0.1], [0.0, 0.7]], dtype=torch.float64))
    return p_mu, p_factor, prior, scene, score, score.mu.detach().clone(), score.factor.detach().clone()


def test_one_vsd_step_of_the_toy_is_the_papers_score_difference():
    """Appendix F's real-vsd: grad = −w (∇log p_t − ∇log r_t) with w = (1 − ᾱ) σ; in ε-units (1 − ᾱ)(ε_p − ε_r)."""
    alphas = G.paper_alphas_cumprod()
    p_mu, p_factor, prior, scene, score, r_mu, r_factor = problem_with_r(3, alphas)
    x0 = scene.render(4, torch.Generator().manual_seed(1))
    cfg = DistillConfig(method="vsd", lora_steps=10, timesteps=TimestepSampler(1000, 0.0, 1.0))
    res = score_distillation(x0, prior, score, Conditioning(), cfg, generator=torch.Generator().manual_seed(2))
    a = alphas[res.t][:, None]
    x_t = a.sqrt() * x0.detach() + (1 - a).sqrt() * res.noise
    sigma = (1 - a).sqrt()
    score_p = -autograd_epsilon(x_t, res.t, alphas, p_mu, p_factor) / sigma
    score_r = -autograd_epsilon(x_t, res.t, alphas, r_mu, r_factor) / sigma
    assert torch.allclose(res.grad, -((1 - a) * sigma) * (score_p - score_r), atol=1e-10)
    assert not torch.allclose(score.mu.detach(), r_mu)  # r was trained after (10 AdamW steps)


def test_overfitting_r_lands_exactly_on_the_samples():
    p_mu, p_factor, q_mu, q_factor = G.make_problem(0)
    scene = G.GaussianScene(q_mu, q_factor)
    score = G.GaussianScore(scene, G.paper_alphas_cumprod(), target="samples", optimizer="sgd", lr=0.5)
    x0 = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]], dtype=torch.float64)
    loss = score.loss(x0)
    loss.backward()
    score.step()
    cov = torch.cov(x0.T, correction=0)
    assert torch.allclose(score.mu, x0.mean(0))
    assert torch.allclose(score.factor @ score.factor.T, cov, atol=1e-10)


def test_wasserstein_and_kl_closed_forms():
    mu, cov = torch.tensor([1.0, -2.0]), torch.tensor([[2.0, 0.3], [0.3, 1.0]])
    assert G.wasserstein2(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-6)
    assert G.wasserstein2(mu, cov, mu + torch.tensor([3.0, 4.0]), cov) == pytest.approx(5.0, abs=1e-6)
    d1, d2 = torch.diag(torch.tensor([4.0, 1.0])), torch.diag(torch.tensor([1.0, 9.0]))
    assert G.wasserstein2(mu, d1, mu, d2) == pytest.approx(math.sqrt((2 - 1) ** 2 + (1 - 3) ** 2), abs=1e-6)
    p = MultivariateNormal(torch.tensor([0.5, 0.0], dtype=torch.float64), torch.tensor([[1.0, 0.2], [0.2, 0.5]], dtype=torch.float64))
    q = MultivariateNormal(torch.tensor([1.5, -1.0], dtype=torch.float64), torch.tensor([[0.3, 0.0], [0.0, 2.0]], dtype=torch.float64))
    assert G.kl_divergence(q.mean, q.covariance_matrix, p.mean, p.covariance_matrix) == pytest.approx(float(torch_kl(q, p)), rel=1e-9)
    assert G.kl_divergence(mu, torch.zeros(2, 2), mu, cov) == math.inf


def test_ideal_vsd_is_sds_in_epsilon_units():
    cfg = G.StudyConfig(steps=60)
    sds, vsd = G.run("sds", 0, cfg), G.run("vsd", 0, cfg)
    assert sds["w2"] == pytest.approx(vsd["w2"], abs=1e-6)


def test_lookahead_beats_the_practical_order_on_the_papers_setup():
    """The paper's fig. 1 claim, measured: over 400 steps q gets closer to p with L-VSD and L²-VSD than with VSD."""
    cfg = G.StudyConfig(steps=400)
    w2 = {m: sum(G.run(m, s, cfg)["w2"][-1] for s in range(2)) for m in ("real-vsd", "l-vsd", "l2vsd", "exact-vsd")}
    assert w2["exact-vsd"] < w2["l-vsd"] < w2["real-vsd"]
    assert w2["l2vsd"] < w2["real-vsd"]


def test_lookahead_kinds_on_the_gaussian_toy():
    """r's loss is a sum (no loss_elements): the paper's step is sgd_mean's; the optimizer lookahead (r's own AdamW
    steps, η a scale) is another run, and at η = 0 every kind is real VSD's estimate."""
    cfg = dict(steps=40)
    paper = G.run("l2vsd", 0, G.StudyConfig(lookahead="paper", **cfg))["w2"]
    assert paper == G.run("l2vsd", 0, G.StudyConfig(lookahead="sgd_mean", **cfg))["w2"]
    optimizer = G.run("l2vsd", 0, G.StudyConfig(lookahead="optimizer", eta=1.0, **cfg))["w2"]
    assert optimizer != paper
    zero = [G.run("l2vsd", 0, G.StudyConfig(lookahead=kind, eta=0.0, **cfg))["w2"]
            for kind in ("paper", "optimizer")]
    assert zero[0] == pytest.approx(zero[1], rel=1e-6)


def test_cli_writes_the_json_and_png(tmp_path):
    out_json, out_png = tmp_path / "g.json", tmp_path / "g.png"
    proc = subprocess.run([sys.executable, "-m", "l2vsd_core.toys.gaussian", "--methods", "sds,l2vsd,hlvsd",
                           "--seeds", "2", "--steps", "20", "--json", str(out_json), "--plot", str(out_png)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out_json.read_text())
    assert data["seeds"] == 2 and data["steps"] == 20 and list(data["methods"]) == ["sds", "l2vsd", "hlvsd"]
    for m in data["methods"].values():
        assert {"w2_final_mean", "w2_final_std", "kl_final_mean", "w2_curve"} <= set(m)
        assert len(m["w2_curve"]) == 3 and m["w2_final_mean"] == pytest.approx(m["w2_curve"][-1])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| l2vsd |" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--methods", "sds,foo"], "unknown ['foo']"),
    (["--eta", "-1"], "eta must be a finite number >= 0"),
    (["--variant", "fig2"], "invalid choice: 'fig2'"),
    (["--setup", "paper"], "invalid choice: 'paper'"),
    (["--steps", "0"], "steps must be >= 1"),
])
def test_cli_bad_input(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "l2vsd_core.toys.gaussian", "--json", str(tmp_path / "x.json"), *args],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------- Appendix F's listing (--setup listing)
def listing_score(x_t, mu, factor, alpha, sigma):
    """The listing's calc_perturbed_gaussian_score, written from its text: ∇ log N(x_t; α μ, α² Σ + σ² I)."""
    cov = alpha[:, None, None] ** 2 * (factor @ factor.T) + sigma[:, None, None] ** 2 * torch.eye(2, dtype=x_t.dtype)
    return torch.linalg.solve(cov, (alpha[:, None] * mu - x_t)[..., None])[..., 0]


def test_listing_noise_draws_the_cumulative_product_of_the_listings_betas():
    noise = G.ListingNoise(renders=4)
    t = noise.sample(4, 0, generator=torch.Generator().manual_seed(5))
    beta = torch.rand(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * (0.02 - 1e-4) + 1e-4
    assert torch.allclose(noise.alpha(t), torch.cumprod(1 - beta, 0), atol=1e-6)
    assert bool((noise.alpha(t)[1:] < noise.alpha(t)[:-1]).all())  # each later render is noisier
    a, table = noise.alpha(t), noise.alphas_cumprod()[t]
    assert torch.allclose(table, a ** 2 / (a ** 2 + (1 - a) / a))  # the VP state x_t / √(α² + σ²)
    with pytest.raises(ValueError, match="4 renders per step"):
        noise.sample(5, 0)


def test_listing_setup_gives_q_the_listings_gradient():
    """One real-vsd step with the listing's noise: the engine's ε-units path gives the renders exactly the gradient of
    the listing's own loss (scores in score units, x_t = α x + σ ε, w = (1 − α) σ, differentiated through x_t)."""
    noise = G.ListingNoise(renders=4)
    p_mu, p_factor, prior, scene, score, r_mu, r_factor = problem_with_r(2, noise.alphas_cumprod())
    x = scene.render(4, torch.Generator().manual_seed(1)).detach().requires_grad_(True)
    cfg = DistillConfig(method="vsd", weighting="uniform", timesteps=noise)
    res = score_distillation(x, prior, score, Conditioning(), cfg, generator=torch.Generator().manual_seed(3))
    (ours,) = torch.autograd.grad(noise.loss(x, res), x)

    alpha = noise.alpha(res.t)
    sigma = ((1 - alpha) / alpha).sqrt()
    x2 = x.detach().clone().requires_grad_(True)
    x_t = x2 * alpha[:, None] + res.noise * sigma[:, None]
    w = ((1 - alpha) * sigma)[:, None]
    grad = -w * (listing_score(x_t.detach(), p_mu, p_factor, alpha, sigma)
                 - listing_score(x_t.detach(), r_mu, r_factor, alpha, sigma))
    loss = 0.5 * torch.nn.functional.mse_loss(x_t, (x_t - grad).detach(), reduction="sum") / 4
    (listing,) = torch.autograd.grad(loss, x2)
    assert torch.allclose(ours, listing, rtol=1e-5, atol=1e-9)


def test_listing_real_vsd_trains_r_after_q_steps():
    """The listing's real-vsd: at step 1, r has taken its γ AdamW steps towards q after q's first step (q_1); the
    engine's order trains it on q_0."""
    cfg = dict(steps=1, log_every=1, lora_steps=10, warmup_steps=0)  # no warm-up: q moves at its first step

    def adamw_towards(goal):  # r's μ alone: its loss and AdamW are elementwise, so μ_r depends on μ_q only
        mu = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.AdamW([mu], lr=G.StudyConfig.lora_lr, weight_decay=0.0)
        for _ in range(10):
            opt.zero_grad()
            ((mu - goal) ** 2).sum().backward()
            opt.step()
        return mu.detach()

    listing = G.run("real-vsd", 0, G.StudyConfig(setup="listing", samples_per_step=4, **cfg), snapshot_steps=(0, 1))
    engine = G.run("real-vsd", 0, G.StudyConfig(samples_per_step=4, **cfg), snapshot_steps=(0, 1))
    q0, q1 = (torch.tensor(listing["snapshots"][s]["q_mu"], dtype=torch.float64) for s in (0, 1))
    assert not torch.allclose(q0, q1)
    assert torch.allclose(torch.tensor(listing["snapshots"][1]["r_mu"], dtype=torch.float64), adamw_towards(q1))
    assert torch.allclose(torch.tensor(engine["snapshots"][1]["r_mu"], dtype=torch.float64), adamw_towards(q0))
    assert listing["snapshots"][0]["r_mu"] == [0.0, 0.0]  # and nothing before q's first step
