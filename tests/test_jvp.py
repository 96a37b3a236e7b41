"""J·v with respect to parameters: every exact mode against each other and a float64 finite-difference reference."""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from l2vsd_core.jvp import APPROX_JVP_MODES, EXACT_JVP_MODES, JVP_MODES, jvp


class TinyScore(nn.Module):
    """Norm, attention (through SDPA, whose fused CPU kernel has no forward-AD) and an MLP: a UNet block in little."""

    def __init__(self, dim=8, tokens=6):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.SiLU(), nn.Linear(16, dim))
        self.tokens = tokens

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = x + self.out(F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0])
        return h + self.mlp(F.group_norm(h.transpose(1, 2), 2).transpose(1, 2))


def make_case(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = TinyScore().to(dtype)
    for p in model.parameters():  # random, not the default init: the test must not depend on special values
        nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 6, 8, dtype=dtype)
    params = dict(model.named_parameters())
    tangents = {k: torch.randn_like(p) for k, p in params.items()}
    return model, x, params, tangents


def score_fn(model, x):
    return lambda params: torch.func.functional_call(model, dict(params), (x,))


def float64_reference(model, x, params, tangents, h=1e-6):
    """Central difference in float64: truncation error ~h², rounding ~1e-16/h."""
    m64 = copy.deepcopy(model).double()
    p64 = {k: v.detach().double() for k, v in params.items()}
    t64 = {k: v.detach().double() for k, v in tangents.items()}
    f = lambda s: torch.func.functional_call(m64, {k: p64[k] + s * t64[k] for k in p64}, (x.double(),))
    with torch.no_grad():
        return (f(h) - f(-h)) / (2 * h)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_modes_match_float64_reference_and_each_other(seed):
    model, x, params, tangents = make_case(seed)
    ref = float64_reference(model, x, params, tangents)
    primal_ref = model(x).detach()
    results = {mode: jvp(score_fn(model, x), params, tangents, mode) for mode in EXACT_JVP_MODES}
    for mode, (primal, tangent) in results.items():
        assert torch.allclose(primal, primal_ref, atol=1e-5), mode
        assert rel_err(tangent, ref) < 1e-4, (mode, rel_err(tangent, ref))
    base = results["forward_ad"][1]
    for mode, (_, tangent) in results.items():
        assert rel_err(tangent, base) < 1e-5, mode


def test_exact_modes_in_float64_agree_to_rounding():
    model, x, params, tangents = make_case(3, dtype=torch.float64)
    ref = float64_reference(model, x, params, tangents, h=1e-5)
    for mode in EXACT_JVP_MODES:
        _, tangent = jvp(score_fn(model, x), params, tangents, mode)
        assert rel_err(tangent, ref) < 1e-8, mode


def test_finite_difference_modes_approximate_the_reference():
    model, x, params, tangents = make_case(4)
    ref = float64_reference(model, x, params, tangents)
    primal = model(x).detach()
    _, central = jvp(score_fn(model, x), params, tangents, "fd_central")
    _, forward = jvp(score_fn(model, x), params, tangents, "fd_forward", primal=primal)
    assert rel_err(central, ref) < 5e-3
    assert rel_err(forward, ref) < 5e-2
    assert rel_err(forward, ref) > rel_err(central, ref)  # one-sided carries the curvature error


def test_fd_forward_reuses_the_given_primal():
    model, x, params, tangents = make_case(5)
    calls = []
    fn = score_fn(model, x)
    counted = lambda p: (calls.append(1), fn(p))[1]
    primal = model(x).detach()
    out, _ = jvp(counted, params, tangents, "fd_forward", primal=primal)
    assert len(calls) == 1 and torch.equal(out, primal)


def test_subset_of_parameters_equals_zero_tangent_elsewhere():
    """A last-layer JVP: only some parameters carry the tangent."""
    model, x, params, tangents = make_case(6)
    last = {k: v for k, v in params.items() if k.startswith("mlp.2")}
    full_tangents = {k: (tangents[k] if k in last else torch.zeros_like(v)) for k, v in params.items()}
    _, partial = jvp(score_fn(model, x), last, {k: tangents[k] for k in last}, "forward_ad")
    _, full = jvp(score_fn(model, x), params, full_tangents, "forward_ad")
    assert torch.allclose(partial, full, atol=1e-6)
    # The output bias enters linearly: its J·v is the tangent itself, broadcast.
    bias = {"mlp.2.bias": params["mlp.2.bias"]}
    for mode in JVP_MODES:
        _, tangent = jvp(score_fn(model, x), bias, {"mlp.2.bias": tangents["mlp.2.bias"]}, mode)
        assert torch.allclose(tangent, tangents["mlp.2.bias"].expand_as(tangent), atol=2e-3), mode


def test_jvp_is_linear_in_the_tangent():
    model, x, params, tangents = make_case(7)
    _, a = jvp(score_fn(model, x), params, tangents, "double_backward")
    _, b = jvp(score_fn(model, x), params, {k: -2.5 * v for k, v in tangents.items()}, "double_backward")
    assert torch.allclose(b, -2.5 * a, rtol=1e-4, atol=1e-5)


def test_zero_tangent_gives_zero_in_every_mode():
    model, x, params, _ = make_case(8)
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    for mode in JVP_MODES:
        _, tangent = jvp(score_fn(model, x), params, zeros, mode)
        assert float(tangent.abs().max()) == 0.0, mode


def test_works_under_no_grad_and_leaves_parameter_grads_alone():
    model, x, params, tangents = make_case(9)
    with torch.no_grad():
        results = [jvp(score_fn(model, x), params, tangents, mode)[1] for mode in EXACT_JVP_MODES]
    for r in results[1:]:
        assert rel_err(r, results[0]) < 1e-5
    assert all(p.grad is None for p in model.parameters())


def test_bad_input_names_the_problem():
    model, x, params, tangents = make_case(0)
    with pytest.raises(ValueError, match="jvp mode must be one of .*forward_ad"):
        jvp(score_fn(model, x), params, tangents, "reverse")
    with pytest.raises(ValueError, match="same keys"):
        jvp(score_fn(model, x), params, {k: v for k, v in list(tangents.items())[1:]}, "func")
    bad = dict(tangents)
    bad["out.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="out.bias.*shape"):
        jvp(score_fn(model, x), params, bad, "func")


def test_mode_lists_are_consistent():
    assert set(JVP_MODES) == set(EXACT_JVP_MODES) | set(APPROX_JVP_MODES)


def test_auto_mode_is_the_fastest_exact_mode_of_the_device():
    from l2vsd_core.jvp import FASTEST_EXACT_MODE, fastest_exact_mode
    assert set(FASTEST_EXACT_MODE.values()) <= set(EXACT_JVP_MODES) and {"cpu", "cuda"} <= set(FASTEST_EXACT_MODE)
    model, x, params, tangents = make_case(0)
    picked = fastest_exact_mode(x.device)
    out_auto, tan_auto = jvp(score_fn(model, x), params, tangents, "auto")
    out_pick, tan_pick = jvp(score_fn(model, x), params, tangents, picked)
    assert torch.equal(out_auto, out_pick) and torch.equal(tan_auto, tan_pick)


@pytest.mark.parametrize("mode", EXACT_JVP_MODES)
def test_a_tiny_direction_in_half_precision_keeps_its_digits(mode):
    """The lookahead direction −η∇L is tiny; fp16/bf16 tangents of that size would underflow or lose their digits.
    The exact modes run on v/‖v‖ and rescale, so the relative error is that of half precision itself (bf16: ~1e-2),
    however small v is."""
    model, x, params, tangents = make_case(1)
    ref = float64_reference(model, x, params, tangents)
    half = copy.deepcopy(model).to(torch.float16)
    p16 = dict(half.named_parameters())
    for scale in (1.0, 1e-6):  # 1e-6 · v sits at fp16's subnormals (6e-8): without the rescaling, digits are lost
        t16 = {k: (scale * v).to(torch.float16) for k, v in tangents.items()}
        _, tangent = jvp(score_fn(half, x.to(torch.float16)), p16, t16, mode)
        assert tangent.dtype == torch.float16
        assert rel_err(tangent.double() / scale, ref) < 0.02, (mode, scale)


def test_tangent_passes_compute_half_precision_norms_and_attention_in_float32():
    """Inside ``tangent_safe_kernels``, half inputs that carry a tangent go through layer_norm, group_norm and attention in
    float32 (CUDA's half kernels keep float32 statistics and their forward-AD formulas then mix dtypes); inputs that
    carry none keep the original kernels, and the originals are back afterwards."""
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from l2vsd_core.jvp import tangent_safe_kernels
    originals = (F.scaled_dot_product_attention, F.layer_norm, F.group_norm)
    x = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    dx = torch.randn_like(x)
    with tangent_safe_kernels(), fwAD.dual_level():
        dual = fwAD.make_dual(x, dx)
        outs = {
            "layer_norm": (F.layer_norm(dual, (8,)), lambda a: F.layer_norm(a, (8,))),
            "group_norm": (F.group_norm(dual, 2), lambda a: F.group_norm(a, 2)),
            "attention": (F.scaled_dot_product_attention(dual, dual, dual), lambda a: F.scaled_dot_product_attention(a, a, a)),
        }
        plain = F.layer_norm(x, (8,))
        results = {name: (fwAD.unpack_dual(out), f) for name, (out, f) in outs.items()}
    for name, ((primal, tangent), f) in results.items():
        assert primal.dtype == tangent.dtype == torch.bfloat16, name
        with sdpa_kernel([SDPBackend.MATH]):  # the reference: float64, the math kernel
            _, ref_tangent = torch.func.jvp(f, (x.double(),), (dx.double(),))
        assert rel_err(tangent, ref_tangent) < 0.02, name
    assert plain.dtype == torch.bfloat16 and torch.equal(plain, F.layer_norm(x, (8,)))
    assert (F.scaled_dot_product_attention, F.layer_norm, F.group_norm) == originals



class FrozenTail(nn.Module):
    """A trainable input scale, then frozen convolutions (small and large spatial, strided, grouped), an unbatched
    convolution and a frozen linear: the UNet's shape of a JVP, where the tangent enters early and then flows through
    layers whose weights carry none."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4, 1, 1))
        self.small = nn.Conv2d(4, 6, 3, padding=1)                        # 8² input: the batched path
        self.large = nn.Conv2d(6, 6, 3, padding=1, groups=2, bias=False)  # 40² input: two calls
        self.down = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.linear = nn.Linear(4, 5)

    def forward(self, x):
        h = F.silu(self.small(x * self.scale))
        h = self.down(self.large(F.interpolate(h, scale_factor=5)))       # [B, 4, 20, 20]
        h = h[:, :, :8, :8] + self.small(h[0, :, :8, :8])[None, :4]        # an unbatched [C, H, W] input
        return self.linear(h.permute(0, 2, 3, 1))


def test_frozen_layer_tangents_are_exact():
    """Frozen layers downstream of the tangent (``forward_mode_rules``'s own rule): the same J·v as a float64
    central difference and as torch's rule; with every weight dual too, torch's rule runs and is exact as well."""
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(0)
    model = FrozenTail().requires_grad_(False)
    x = torch.randn(2, 4, 8, 8)
    only_scale = {"scale": model.scale}
    v = {"scale": torch.randn(4, 1, 1)}
    _, fast = jvp(score_fn(model, x), only_scale, v, "forward_ad")
    assert rel_err(fast, float64_reference(model, x, only_scale, v)) < 1e-5
    with torch.no_grad(), fwAD.dual_level():  # torch's own rule: outside the context
        out = torch.func.functional_call(model, {"scale": fwAD.make_dual(model.scale, v["scale"])}, (x,))
        torch_rule = fwAD.unpack_dual(out).tangent
    assert rel_err(fast, torch_rule) < 1e-5
    everything = dict(model.named_parameters())
    all_v = {k: torch.randn_like(p) for k, p in everything.items()}
    _, full = jvp(score_fn(model, x), everything, all_v, "forward_ad")
    assert rel_err(full, float64_reference(model, x, everything, all_v)) < 1e-5


def test_a_frozen_convolution_costs_one_call_with_its_tangent_not_three():
    """torch's rule convolves the input tangent and a zero weight tangent besides the primal; ours one batched call
    (small spatial size) or two (large).  The originals are back after the context."""
    import torch.autograd.forward_ad as fwAD
    from torch.profiler import profile
    from l2vsd_core.jvp import forward_mode_rules
    originals = (F.conv2d, F.linear, F.scaled_dot_product_attention)
    w = torch.randn(6, 4, 3, 3)

    def convolutions(size, ours):
        x = torch.randn(1, 4, size, size)
        with torch.no_grad(), fwAD.dual_level(), profile() as prof:
            with (forward_mode_rules() if ours else contextlib.nullcontext()):
                F.conv2d(fwAD.make_dual(x, torch.randn_like(x)), w, torch.randn(6), padding=1)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")

    assert (convolutions(8, False), convolutions(8, True), convolutions(40, True)) == (3, 1, 2)
    assert (F.conv2d, F.linear, F.scaled_dot_product_attention) == originals


@pytest.mark.parametrize("which", ["qkv", "q", "k", "v", "kv"])
def test_attention_with_tangent_matches_float64_forward_ad_of_the_math_kernel(which):
    """Block by block (3 query rows per block), cross-attention shapes (10 queries, 7 keys, value width ≠ key width),
    a given scale, any subset of Q, K, V carrying a tangent: primal and tangent against torch.func.jvp of the math
    kernel in float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from l2vsd_core.jvp import attention_with_tangent
    g = torch.Generator().manual_seed(len(which))
    q, k, v = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g), torch.randn(2, 3, 7, 5, generator=g)
    dq, dk, dv = (torch.randn(x.shape, generator=g) if name in which else None for name, x in zip("qkv", (q, k, v)))
    out, tangent = attention_with_tangent(q, k, v, dq, dk, dv, scale=0.3, block_elements=3 * 2 * 3 * 7)
    f = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=0.3)
    zero = lambda d, x: (torch.zeros_like(x) if d is None else d).double()
    with sdpa_kernel([SDPBackend.MATH]):
        ref_out, ref_tangent = torch.func.jvp(f, (q.double(), k.double(), v.double()),
                                              (zero(dq, q), zero(dk, k), zero(dv, v)))
    assert rel_err(out, ref_out) < 1e-6 and rel_err(tangent, ref_tangent) < 1e-6


def test_attention_under_forward_mode_rules_is_exact_and_falls_back_with_a_mask():
    """Through ``F.scaled_dot_product_attention`` in a ``forward_ad`` jvp: the block-wise rule, and with a mask (which
    it does not handle) the math kernel; both against a float64 central difference.  bf16 inputs come back bf16."""
    torch.manual_seed(3)
    proj = nn.Linear(8, 24)
    x = torch.randn(2, 12, 8)
    mask = torch.rand(12, 12) > 0.3
    mask.fill_diagonal_(True)

    def attend(module, params, inputs, masked):
        q, k, v = torch.func.functional_call(module, params, (inputs,)).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if masked else None)

    params = dict(proj.named_parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}
    proj64 = copy.deepcopy(proj).double()
    p64 = {k: p.detach().double() for k, p in params.items()}
    tangents = {}
    for masked in (False, True):
        _, tangents[masked] = jvp(lambda p: attend(proj, p, x, masked), params, v, "forward_ad")
        at = lambda s: attend(proj64, {n: p64[n] + s * v[n].double() for n in p64}, x.double(), masked)  # noqa: E731
        with torch.no_grad():
            ref = (at(1e-6) - at(-1e-6)) / 2e-6
        assert rel_err(tangents[masked], ref) < 1e-5, masked
    half = {k: p.to(torch.bfloat16) for k, p in params.items()}
    out, tangent = jvp(lambda p: attend(proj, p, x.to(torch.bfloat16), False), half,
                       {k: t.to(torch.bfloat16) for k, t in v.items()}, "forward_ad")
    assert out.dtype == tangent.dtype == torch.bfloat16 and rel_err(tangent, tangents[False]) < 0.03
