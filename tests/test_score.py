"""The LoRA score on a tiny SD-shaped UNet: protocol, camera embedding, shared UNet, loss, JVPs, every engine method."""
import inspect
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from l2vsd_core.distill import (METHODS, Conditioning, DistillConfig, FrozenScore, TrainableScore,
                                score_distillation, trainable_epsilon)
from l2vsd_core.jvp import EXACT_JVP_MODES, jvp
from l2vsd_core.schedules import TimestepSampler
from l2vsd_core.score import LAST_LAYERS, LoRAScore

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

T = 1000
ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2, 0).float()
B, L, D = 2, 5, 32


def tiny_unet(seed=0, dtype=torch.float32):
    """SD-shaped (cross-attention down and up, plain blocks, mid-block with attention), 0.8 M parameters."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D, attention_head_dim=8, norm_num_groups=8)
    return (unet if dtype == torch.float32 else unet.to(dtype)).eval()


def randomize(score, seed=0, std=0.3):
    """Random (not zero) LoRA B and camera embedding, so that every J·v term is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in score.lookahead_parameters("all").items():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return score


def make_score(unet_seed=0, dtype=torch.float32, unet=None, random=True, **kwargs):
    score = LoRAScore(tiny_unet(unet_seed, dtype) if unet is None else unet, ALPHAS, **kwargs)
    return randomize(score, unet_seed + 100) if random else score


def inputs(seed=0, batch=B, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.randint(20, 980, (batch,), generator=g)
    text = torch.randn(batch, L, D, generator=g, dtype=dtype)
    camera = torch.randn(batch, 16, generator=g, dtype=dtype)
    return x, t, text, camera


def plain(unet, x, t, text):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text, return_dict=False)[0]


class UNetPrior(torch.nn.Module):
    """A minimal FrozenScore on a UNet; on a shared UNet it turns the LoRA off and has no class embedding."""
    prediction_type = "epsilon"

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.alphas_cumprod = ALPHAS  # plain attribute: distill.FrozenScore

    def forward(self, x_t, t, text):
        shared = getattr(self.unet, "_hf_peft_config_loaded", False)
        assert self.unet.class_embedding is None  # LoRAScore never leaves its camera embedding installed
        if shared:
            self.unet.disable_adapters()
        try:
            return self.unet(x_t, t, encoder_hidden_states=text, return_dict=False)[0]
        finally:
            if shared:
                self.unet.enable_adapters()


# ------------------------------------------------------------------------------------------------ construction
def test_protocol_and_trainable_set():
    score = make_score(random=False)
    assert isinstance(score, TrainableScore) and isinstance(UNetPrior(tiny_unet()), FrozenScore)
    # What isinstance does from Python 3.12 on (ComfyUI's Python): members found without __getattr__ (no buffers).
    for member in ("prediction_type", "alphas_cumprod", "loss", "lookahead_parameters", "step"):
        inspect.getattr_static(score, member)
    trainable = {n for n, p in score.named_parameters() if p.requires_grad}
    every = score.lookahead_parameters("all")
    assert trainable == set(every)
    assert all(".lora_A.l2vsd." in n or ".lora_B.l2vsd." in n or n.startswith("camera_embedding.") for n in every)
    assert sum(n.startswith("camera_embedding.") for n in every) == 4  # Linear → SiLU → Linear
    assert sum(".lora_" in n for n in every) == 2 * 4 * 8  # A, B × (q, k, v, out) × 8 attention modules
    assert score.camera_embedding.linear_1.in_features == 16
    assert score.camera_embedding.linear_2.out_features == score.unet.time_embedding.linear_2.out_features == 128
    assert score.unet.class_embedding is None
    # peft's default init: B = 0; our camera embedding ends in zeros: ε_φ is the base UNet for every camera.
    assert all(float(p.abs().max()) == 0 for n, p in every.items() if ".lora_B." in n)
    x, t, text, camera = inputs()
    unet = tiny_unet()
    with torch.no_grad():
        assert torch.allclose(score(x, t, text, camera), plain(unet, x, t, text), atol=1e-6)


def test_last_scope_is_the_last_attention_in_forward_order():
    score = make_score(random=False)
    last = score.lookahead_parameters("last")
    prefix = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2."  # the mid-block is listed after: not it
    assert set(last) == {f"{prefix}{m}.lora_{ab}.l2vsd.weight" for m in ("to_q", "to_k", "to_v", "to_out.0")
                         for ab in "AB"}
    sizes = {}
    for layer in LAST_LAYERS:
        names = set(make_score(random=False, last_layer=layer).lookahead_parameters("last"))
        assert names <= set(score.lookahead_parameters("all")), layer
        sizes[layer] = len(names)
    assert sizes == {"lora_module": 2, "attention": 8, "transformer_block": 16, "up_block": 32}
    with pytest.raises(ValueError, match="scope must be one of all, last"):
        score.lookahead_parameters("first")


@pytest.mark.parametrize("kwargs, pattern", [
    ({"rank": 0}, r"rank must be an integer >= 1 .*got 0"),
    ({"rank": -2}, r"rank must be an integer >= 1"),
    ({"rank": 2.5}, r"rank must be an integer >= 1"),
    ({"prediction_type": "sample"}, r"prediction_type must be one of epsilon, v_prediction"),
    ({"camera_dropout": 1.5}, r"camera_dropout must be a number in \[0, 1\]"),
    ({"last_layer": "conv_out"}, r"last_layer must be one of lora_module, attention"),
])
def test_bad_arguments_name_the_argument_and_allowed_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_score(random=False, **kwargs)


def test_second_score_on_the_same_unet_and_bad_camera_are_refused():
    score = make_score(random=False)
    with pytest.raises(ValueError, match="already has an adapter named 'l2vsd'"):
        LoRAScore(score.unet, ALPHAS)
    x, t, text, _ = inputs()
    with pytest.raises(ValueError, match=r"camera must be \[B, 16\] or \[B, 4, 4\]"):
        score(x, t, text, torch.zeros(B, 12))


# -------------------------------------------------------------------------------------- camera and shared UNet
def test_camera_conditions_the_output_and_zero_camera_is_unconditioned():
    score = make_score()
    x, t, text, camera = inputs()
    with torch.no_grad():
        a, b = score(x, t, text, camera), score(x, t, text, 2 * camera)
        none, zero = score(x, t, text, None), score(x, t, text, torch.zeros_like(camera))
        mat = score(x, t, text, camera.reshape(B, 4, 4))
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.equal(none, zero) and torch.equal(a, mat)


def test_class_embedding_and_adapter_state_are_only_changed_inside_a_call():
    score = make_score()
    unet = score.unet
    x, t, text, camera = inputs()
    with torch.no_grad():
        lora_on = score(x, t, text, camera)
    assert unet.class_embedding is None
    assert "class_embedding" not in dict(unet.named_children()) or unet.class_embedding is None
    unet.disable_adapters()  # what a prior does on a shared UNet
    base = plain(unet, x, t, text)  # a plain call works: no class embedding waiting for class_labels
    with torch.no_grad():
        during = score(x, t, text, camera)  # LoRA on for our call even with adapters disabled outside
    assert torch.equal(during, lora_on)
    assert torch.equal(plain(unet, x, t, text), base)  # still disabled after it
    assert not torch.allclose(base, lora_on, atol=1e-4)
    unet.enable_adapters()
    with torch.no_grad():
        assert torch.equal(score(x, t, text, camera), lora_on)


def test_functional_call_substitutes_lora_and_camera_tensors():
    score = make_score()
    x, t, text, camera = inputs()
    params = score.lookahead_parameters("all")
    with torch.no_grad():
        out = score(x, t, text, camera)
        same = torch.func.functional_call(score, {k: v.detach().clone() for k, v in params.items()},
                                          (x, t, text, camera))
        for scope in ("all", "last"):
            moved = {k: v.detach() + 0.1 for k, v in score.lookahead_parameters(scope).items()}
            other = torch.func.functional_call(score, moved, (x, t, text, camera))
            assert float((other - out).abs().max()) > 1e-4, scope
        cam_only = {k: v.detach() * 2 for k, v in params.items() if k.startswith("camera_embedding.")}
        other = torch.func.functional_call(score, cam_only, (x, t, text, camera))
        assert float((other - out).abs().max()) > 1e-4
        assert torch.equal(score(x, t, text, camera), out)  # the module's own tensors are back
    assert torch.allclose(same, out, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- loss
def hand_loss(score, x0, text, camera, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    keep = torch.rand(x0.shape[0], generator=g) >= score.camera_dropout
    a = ALPHAS[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    with torch.no_grad():
        out = score(x_t, t, text, camera * keep[:, None].float())
    return float(((out - v) ** 2).mean()), float(((out - noise) ** 2).mean()), keep


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_loss_targets_velocity_or_noise_with_the_seeded_generator(prediction_type):
    score = make_score(prediction_type=prediction_type, camera_dropout=0.5, seed=3)
    x0, _, text, camera = inputs(1, batch=4)
    v_loss, eps_loss, keep = hand_loss(score, x0, text, camera, seed=3)
    assert 0 < int(keep.sum()) < 4  # this seed drops some cameras and keeps others
    loss = score.loss(x0, text, camera)
    assert loss.requires_grad and loss.dim() == 0
    expected = v_loss if prediction_type == "v_prediction" else eps_loss
    assert abs(float(loss) - expected) < 1e-6 * max(1.0, expected)
    assert abs(v_loss - eps_loss) > 1e-3  # the two targets are distinguishable


def test_camera_dropout_rate_and_draws():
    score = make_score(random=False)
    x0 = torch.zeros(20000, 1)
    t, noise, keep = score.draw(x0)
    assert abs(1 - float(keep.float().mean()) - 0.1) < 0.01
    assert int(t.min()) >= 0 and int(t.max()) == T - 1 and abs(float(t.float().mean()) - (T - 1) / 2) < 10
    assert abs(float(noise.std()) - 1) < 0.02
    assert bool(make_score(random=False, camera_dropout=0.0).draw(x0)[2].all())
    assert not bool(make_score(random=False, camera_dropout=1.0).draw(x0)[2].any())


def test_step_updates_only_the_trainable_parameters_with_adamw():
    score = make_score(lr=1e-3)
    frozen = {n: p.detach().clone() for n, p in score.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in score.lookahead_parameters("all").items()}
    x0, _, text, camera = inputs()
    score.loss(x0, text, camera).backward()
    score.step()
    assert all(p.grad is None for p in score.parameters())
    for n, p in score.lookahead_parameters("all").items():
        assert 0 < float((p - before[n]).abs().max()) < 2e-3, n  # Adam: |Δ| ≲ lr
    assert all(torch.equal(p, frozen[n]) for n, p in score.named_parameters() if n in frozen)


def test_half_precision_unet_keeps_float32_trainable_weights():
    score = make_score(dtype=torch.bfloat16, random=False)
    assert {p.dtype for p in score.lookahead_parameters("all").values()} == {torch.float32}
    x0, t, text, camera = inputs(dtype=torch.bfloat16)
    before = {k: v.detach().clone() for k, v in score.lookahead_parameters("all").items()}
    loss = score.loss(x0, text, camera)
    loss.backward()
    score.step()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert any(not torch.equal(v, before[k]) for k, v in score.lookahead_parameters("all").items())
    with torch.no_grad():
        assert score(x0, t, text, camera).dtype == torch.bfloat16
        # The product passes fp32 renders and latents to a half-precision UNet (fp16 on CUDA): computed in the
        # UNet's dtype, returned in the caller's, as the prior does.
        out32 = score(x0.float(), t, text.float(), camera.float())
    assert out32.dtype == torch.float32
    assert torch.equal(out32, score(x0, t, text, camera).float())
    loss32 = score.loss(x0.float(), text.float(), camera.float())
    assert torch.isfinite(loss32) and loss32.dtype == torch.float32


# -------------------------------------------------------------------------------------------------------- JVP
def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def float64_reference(scope, x, t, cond, esd_lambda, tangents, h=1e-6):
    score = make_score(dtype=torch.float64)
    params = {k: v.detach() for k, v in score.lookahead_parameters(scope).items()}
    cond64 = Conditioning(text=cond.text.double(), camera=cond.camera.double())

    def f(s):
        p = {k: params[k] + s * tangents[k].double() for k in params}
        return trainable_epsilon(score, x.double(), t, cond64, esd_lambda, p)

    with torch.no_grad():
        return f(0.0), (f(h) - f(-h)) / (2 * h)


@pytest.mark.parametrize("scope, esd_lambda", [("all", 0.0), ("last", 0.5)])
def test_exact_jvp_modes_through_the_unet_match_a_float64_reference(scope, esd_lambda):
    """Default attention processor (SDPA): ``jvp.tangent_safe_kernels`` is what lets the exact modes through."""
    score = make_score()
    assert type(score.unet.attn_processors[next(iter(score.unet.attn_processors))]).__name__ == "AttnProcessor2_0"
    x, t, text, camera = inputs(2)
    cond = Conditioning(text=text, camera=camera)
    params = score.lookahead_parameters(scope)
    g = torch.Generator().manual_seed(5)
    tangents = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    fn = lambda p: trainable_epsilon(score, x, t, cond, esd_lambda, p)
    primal_ref, ref = float64_reference(scope, x, t, cond, esd_lambda, tangents)
    results = {mode: jvp(fn, params, tangents, mode) for mode in EXACT_JVP_MODES}
    for mode, (primal, tangent) in results.items():
        assert rel_err(primal, primal_ref) < 1e-5, mode
        assert rel_err(tangent, ref) < 1e-4, (mode, rel_err(tangent, ref))
        assert rel_err(tangent, results["forward_ad"][1]) < 1e-5, mode
    assert float(ref.norm()) > 1e-3 * float(primal_ref.norm())  # a non-trivial J·v
    assert all(p.grad is None for p in score.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fp16 UNet kernels); runs on a GPU machine")
@pytest.mark.parametrize("scope", ["all", "last"])
def test_exact_jvp_modes_on_an_fp16_cuda_unet_match_float64(scope):
    """The product's CUDA path: fp16 UNet, fp32 LoRA weights and inputs, a tiny lookahead-sized direction."""
    score = make_score().cuda()
    score.unet.half()
    for p in score.lookahead_parameters("all").values():
        p.data = p.data.float()
    score._unet_dtype = torch.float16
    x, t, text, camera = inputs(2)
    cond = Conditioning(text=text.cuda(), camera=camera.cuda())
    params = score.lookahead_parameters(scope)
    g = torch.Generator().manual_seed(5)
    tangents = {k: 1e-6 * torch.randn(p.shape, generator=g) for k, p in params.items()}  # ~ η ∇L
    fn = lambda p: trainable_epsilon(score, x.cuda(), t.cuda(), cond, 0.0, p)
    _, ref = float64_reference(scope, x, t, Conditioning(text=text, camera=camera), 0.0,
                               {k: v * 1e6 for k, v in tangents.items()})
    for mode in EXACT_JVP_MODES:
        primal, tangent = jvp(fn, params, {k: v.cuda() for k, v in tangents.items()}, mode)
        assert primal.dtype == tangent.dtype == torch.float32 and torch.isfinite(tangent).all(), mode
        assert rel_err(tangent.cpu() * 1e6, ref) < 2e-2, (mode, rel_err(tangent.cpu() * 1e6, ref))


def test_forward_ad_through_the_unet_needs_tangent_safe_kernels():
    """Without ``jvp.tangent_safe_kernels`` the fused CPU attention kernel has no forward-AD rule: the test above means it."""
    score = make_score()
    x, t, text, camera = inputs()
    params = score.lookahead_parameters("last")
    with pytest.raises((NotImplementedError, RuntimeError), match="(?i)scaled_dot_product|attention|forward AD"):
        with fwAD.dual_level():
            duals = {k: fwAD.make_dual(p.detach(), torch.ones_like(p)) for k, p in params.items()}
            torch.func.functional_call(score, duals, (x, t, text, camera))


# ------------------------------------------------------------------------------------------ through the engine
CASES = [(m, "forward_ad", 0.0) for m in METHODS if m != "l2vsd"] + \
        [("l2vsd", mode, 0.0) for mode in EXACT_JVP_MODES] + [("l2vsd", "forward_ad", 0.5)]


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
def test_every_method_runs_one_step_through_the_engine(shared):
    x, t_probe, text, camera = inputs(3)
    uncond = torch.zeros_like(text)
    timesteps = TimestepSampler(T, min_step_percent=0.02, max_step_percent=0.98)
    prior_unet = tiny_unet(7)
    base = plain(prior_unet, x, t_probe, text)
    for method, mode, lam in CASES:
        if shared:
            unet = tiny_unet(7)  # the same weights as prior_unet: the LoRA goes on the prior's own UNet
            score = make_score(unet=unet)
            prior = UNetPrior(unet)
        else:
            score, prior = make_score(), UNetPrior(prior_unet)
        before = {k: v.detach().clone() for k, v in score.lookahead_parameters("all").items()}
        cond = Conditioning(text=text, text_uncond=uncond, score_text=text * 0.5, camera=camera)
        config = DistillConfig(method=method, jvp_mode=mode, esd_lambda=lam, eta=0.1, timesteps=timesteps)
        x0 = x.clone().requires_grad_(True)
        r = score_distillation(x0, prior, score, cond, config, generator=torch.Generator().manual_seed(0))
        r.loss.backward()
        case = (method, mode, lam, shared)
        assert torch.isfinite(r.grad).all() and torch.isfinite(x0.grad).all() and float(x0.grad.abs().max()) > 0, case
        assert r.terms["nonfinite"] == 0, case
        changed = [k for k, v in score.lookahead_parameters("all").items() if not torch.equal(v, before[k])]
        if method == "sds":
            assert r.lora_loss is None and not changed, case
        else:
            assert r.lora_loss is not None and r.lora_loss > 0, case
            assert set(changed) == set(before), (case, set(before) - set(changed))
        if method in ("l2vsd", "l2vsd_last", "hlvsd"):
            assert r.terms["delta_first_rms"] > 0, case
        assert score.unet.class_embedding is None, case
        # The prior is untouched by the LoRA and its training: on a shared UNet it still gives the base output.
        with torch.no_grad():
            assert torch.allclose(prior(x, t_probe, text), base, atol=1e-5), case
            assert not torch.allclose(score(x, t_probe, text, camera), base, atol=1e-4), case
