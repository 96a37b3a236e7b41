"""Jacobian-vector products of a score with respect to (some of) its parameters.

L²-VSD needs ``J_φ ε_φ(x_t) · v``: how the score at the *current* noisy render moves when the parameters φ move along
``v`` (the lookahead direction).  Every mode here takes the same inputs:

``fn(params) -> Tensor``
    evaluates the score with the named tensors in ``params`` substituted for the module's parameters
    (``torch.func.functional_call`` does this for any ``nn.Module``);
``params``, ``tangents``
    dicts with the same keys: the point φ and the direction v.  Parameters left out carry no tangent.

and returns ``(fn(params), J·v)``, so the primal ε_φ(x_t) that VSD needs anyway comes out of the same pass.

Exact modes: ``func`` (``torch.func.jvp``), ``forward_ad`` (dual tensors), ``double_backward`` (the vjp of a vjp,
linear in a dummy cotangent).  Approximate modes: ``fd_forward`` (one extra forward, reusing a given primal) and
``fd_central`` (two extra forwards).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Mapping, Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

EXACT_JVP_MODES = ("forward_ad", "func", "double_backward")
APPROX_JVP_MODES = ("fd_forward", "fd_central")
JVP_MODES = EXACT_JVP_MODES + APPROX_JVP_MODES

ScoreFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


HALF_DTYPES = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def tangent_safe_kernels():
    """Make attention and normalization safe for a tangent pass, where a tangent flows through them.

    - ``scaled_dot_product_attention`` goes to the math kernel: fused kernels (flash, memory-efficient) have no
      forward-mode AD or double-backward rules (pytorch #98164, #128971); the math kernel is plain differentiable ops.
    - Half-precision (fp16/bf16) inputs of attention, ``layer_norm`` and ``group_norm`` are computed in float32 and
      cast back: on CUDA these kernels keep float32 statistics for half inputs, and their forward-AD formulas then
      mix dtypes (seen on an H100 with torch 2.11: "expected mat1 and mat2 to have the same dtype, float != Half").

    Calls that no tangent reaches (everything before the first tangent-carrying parameter, e.g. all but the end of
    the network for a last-layer JVP) keep the fast kernels.  While active, the three functions of
    ``torch.nn.functional`` (which diffusers and ``nn.LayerNorm``/``nn.GroupNorm`` look up at call time) are wrapped;
    the originals are restored on exit.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: no kernel switch
        SDPBackend = sdpa_kernel = None
    originals = {name: getattr(F, name) for name in ("scaled_dot_product_attention", "layer_norm", "group_norm")}
    attention_, layer_norm_, group_norm_ = (originals[n] for n in originals)

    def attention(query, key, value, attn_mask=None, *args, **kwargs):
        if not any(_carries_tangent(x) for x in (query, key, value)):
            return attention_(query, key, value, attn_mask, *args, **kwargs)
        dtype = query.dtype
        if dtype in HALF_DTYPES:
            query, key, value = query.float(), key.float(), value.float()
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.float()
        with (sdpa_kernel([SDPBackend.MATH]) if sdpa_kernel is not None else contextlib.nullcontext()):
            return attention_(query, key, value, attn_mask, *args, **kwargs).to(dtype)

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        if input.dtype not in HALF_DTYPES or not _carries_tangent(input):
            return layer_norm_(input, normalized_shape, weight, bias, eps)
        return layer_norm_(input.float(), normalized_shape, _float(weight), _float(bias), eps).to(input.dtype)

    def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
        if input.dtype not in HALF_DTYPES or not _carries_tangent(input):
            return group_norm_(input, num_groups, weight, bias, eps)
        return group_norm_(input.float(), num_groups, _float(weight), _float(bias), eps).to(input.dtype)

    F.scaled_dot_product_attention, F.layer_norm, F.group_norm = attention, layer_norm, group_norm
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


@contextlib.contextmanager
def forward_mode_rules():
    """Cheaper forward-mode AD rules for the UNet's costly calls, exact: the same products, fewer of them.

    - **Frozen convolutions and linear layers.**  Torch's rule for ``conv2d(x, W, b)`` (and ``linear``) computes
      ``conv(ẋ, W) + conv(x, Ẇ)`` even when W carries no tangent (Ẇ is then a zero tensor, still convolved), so a dual
      call costs three primal ones (profiled on the SD-2.1-base UNet: docs/bench/profile_cpu_sd21_32_before.md).  Here a call
      whose *input* alone is dual (the frozen UNet weights downstream of the LoRA) computes ``conv(x, W, b)`` and
      ``conv(ẋ, W)`` (no bias: it is constant); calls with a dual weight or bias (the LoRA's own layers) keep torch's
      rule.  Small convolutions run primal and tangent as one batch-2 call: on CPU oneDNN is weight-bound at small
      spatial size (1280 channels at 8²: batch 1 23 ms, batch 2 27 ms) but not at 64² (batch 2 slower than two calls);
      on CUDA one call also halves the launches.
    - **Attention** (``scaled_dot_product_attention`` without mask or dropout): :func:`attention_with_tangent`, block
      by block of queries, instead of the math kernel's dual pass (3.4 × faster for 4096 tokens on CPU, and its memory
      is one block's, not the whole attention matrix and its tangent).

    Only for forward-AD dual tensors (``jvp`` mode ``forward_ad``); anything else goes to the functions in place.
    """
    conv2d_, linear_, attention_ = F.conv2d, F.linear, F.scaled_dot_product_attention

    def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        x, dx = _primal_and_tangent(input)
        if dx is None or input.dim() != 4 or _is_dual(weight) or _is_dual(bias):
            return conv2d_(input, weight, bias, stride, padding, dilation, groups)
        if x.is_cuda or x.shape[-1] * x.shape[-2] <= _BATCHED_CONV_MAX_PIXELS:
            y, dy = conv2d_(torch.cat([x, dx]), weight, None, stride, padding, dilation, groups).chunk(2)
            if bias is not None:
                y = y + bias.reshape(1, -1, 1, 1)
        else:
            y = conv2d_(x, weight, bias, stride, padding, dilation, groups)
            dy = conv2d_(dx, weight, None, stride, padding, dilation, groups)
        return fwAD.make_dual(y, dy)

    def linear(input, weight, bias=None):
        x, dx = _primal_and_tangent(input)
        if dx is None or _is_dual(weight) or _is_dual(bias):
            return linear_(input, weight, bias)
        return fwAD.make_dual(linear_(x, weight, bias), linear_(dx, weight))

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        parts = [_primal_and_tangent(x) for x in (query, key, value)]
        if attn_mask is not None or dropout_p or is_causal or kwargs or all(t is None for _, t in parts) \
                or not query.dim() == key.dim() == value.dim() >= 3 or query.shape[:-2] != key.shape[:-2]:
            return attention_(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        (q, dq), (k, dk), (v, dv) = parts
        return fwAD.make_dual(*attention_with_tangent(q, k, v, dq, dk, dv, scale))

    F.conv2d, F.linear, F.scaled_dot_product_attention = conv2d, linear, attention
    try:
        yield
    finally:
        F.conv2d, F.linear, F.scaled_dot_product_attention = conv2d_, linear_, attention_


# Largest H·W at which a frozen convolution's primal and tangent run as one batched call on CPU (see
# forward_mode_rules: measured 32² faster batched, 64² slower, oneDNN on 2 cores).
_BATCHED_CONV_MAX_PIXELS = 32 * 32
# Elements of one block of the attention matrix in attention_with_tangent: 4 M (16 MB in float32) was the fastest of
# 0.25 M … 4 M on CPU (4096 and 1024 tokens, 5 heads); on CUDA, fewer and larger blocks.
ATTENTION_BLOCK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def attention_with_tangent(q, k, v, dq=None, dk=None, dv=None, scale=None, block_elements=None):
    """``O = softmax(s Q Kᵀ) V`` and its tangent along ``(Q̇, K̇, V̇)`` (None: no tangent), for [..., L, D] inputs.

    With ``P = softmax(S)``, ``Ṡ = s (Q̇ Kᵀ + Q K̇ᵀ)`` and ``W = P ⊙ Ṡ``:  ``Ȯ = P V̇ + W V − rowsum(W) ⊙ O``
    (softmax's JVP is ``P ⊙ (Ṡ − rowsum(P ⊙ Ṡ))``).  Computed block by block of query rows, so only one block of
    the attention matrix exists at a time; half-precision inputs are computed in float32 (like the math kernel under
    ``tangent_safe_kernels``) and the results cast back."""
    dtype = q.dtype
    wide = torch.float32 if dtype in HALF_DTYPES else dtype
    s = q.shape[-1] ** -0.5 if scale is None else scale
    lead = q.shape[:-2]
    q, k, v, dq, dk, dv = (None if x is None else x.to(wide).reshape(-1, *x.shape[-2:])
                           for x in (q, k, v, dq, dk, dv))
    # Fewer, wider products (each reads the big block once): Ṡ = s [Q̇ | Q] [K | K̇]ᵀ, and P [V | V̇] gives O and P V̇.
    left = torch.cat([x for x, on in ((dq, dq is not None), (q, dk is not None)) if on], -1) \
        if dq is not None or dk is not None else None
    right = torch.cat([x for x, on in ((k, dq is not None), (dk, dk is not None)) if on], -1).transpose(1, 2) \
        if left is not None else None
    values = v if dv is None else torch.cat([v, dv], -1)
    width = v.shape[-1]
    kt = k.transpose(1, 2)
    if block_elements is None:
        block_elements = ATTENTION_BLOCK_ELEMENTS.get(q.device.type, ATTENTION_BLOCK_ELEMENTS["cpu"])
    rows = max(1, block_elements // (q.shape[0] * k.shape[1]))
    outs, tangents = [], []
    for i in range(0, q.shape[1], rows):
        p = torch.softmax(torch.bmm(q[:, i:i + rows], kt).mul_(s), dim=-1)
        pv = torch.bmm(p, values)
        o = pv[..., :width]
        do = torch.zeros_like(o) if dv is None else pv[..., width:]
        if left is not None:
            w = torch.bmm(left[:, i:i + rows], right).mul_(s).mul_(p)
            do = torch.baddbmm(do, w, v).sub_(w.sum(-1, keepdim=True) * o)
        outs.append(o)
        tangents.append(do)
    shape = (*lead, q.shape[1], v.shape[-1])
    return torch.cat(outs, 1).reshape(shape).to(dtype), torch.cat(tangents, 1).reshape(shape).to(dtype)


def _primal_and_tangent(x) -> tuple:
    if not isinstance(x, torch.Tensor):
        return x, None
    unpacked = fwAD.unpack_dual(x)
    return unpacked.primal, unpacked.tangent


def _is_dual(x) -> bool:
    return isinstance(x, torch.Tensor) and fwAD.unpack_dual(x).tangent is not None


def _float(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.float()


def _carries_tangent(x: torch.Tensor) -> bool:
    """A dual tensor (forward AD), a functorch-wrapped one (``torch.func.jvp``), or one in a graph (double backward)."""
    if x.requires_grad:
        return True
    if is_functorch_wrapped(x):
        return True
    return fwAD.unpack_dual(x).tangent is not None


def is_functorch_wrapped(x: torch.Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except AttributeError:  # a torch without the query: assume the worst, use the math kernel
        return True


def _check(params: Mapping[str, torch.Tensor], tangents: Mapping[str, torch.Tensor], mode: str) -> None:
    if mode not in JVP_MODES:
        raise ValueError(f"jvp mode must be one of {', '.join(JVP_MODES)}; got {mode!r}")
    if set(params) != set(tangents):
        raise ValueError(f"tangents must have the same keys as params; missing {sorted(set(params) - set(tangents))},"
                         f" extra {sorted(set(tangents) - set(params))}")
    for name, p in params.items():
        if tangents[name].shape != p.shape:
            raise ValueError(f"tangent for {name!r} has shape {tuple(tangents[name].shape)}, "
                             f"parameter has {tuple(p.shape)}")


def _norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors))


def fastest_exact_mode(device: torch.device | str) -> str:
    """The exact mode that ``"auto"`` picks on this kind of device, from ``python -m l2vsd_core.bench step``
    (README, "Speed"): forward_ad on CPU (SD-2.1-base at 32², with :func:`forward_mode_rules`: 1.20 × vsd against
    double_backward's 1.83) and on CUDA (H100, fp16, before those rules: 2.37 against 2.31 at a third of the memory)."""
    return FASTEST_EXACT_MODE.get(torch.device(device).type, "forward_ad")


FASTEST_EXACT_MODE = {"cpu": "forward_ad", "cuda": "forward_ad"}


def jvp(fn: ScoreFn, params: Mapping[str, torch.Tensor], tangents: Mapping[str, torch.Tensor],
        mode: str = "auto", *, primal: torch.Tensor | None = None,
        fd_rel_step: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(fn(params), J_params fn · tangents)``, both detached.

    ``mode``: one of ``JVP_MODES``, or ``"auto"`` for the fastest exact mode on the parameters' device.
    ``primal`` (optional) is ``fn(params)`` already computed; only ``fd_forward`` can reuse it (the exact modes produce
    the primal in the same pass anyway).  Finite-difference modes step ``h = fd_rel_step * max(‖φ‖, 1) / ‖v‖`` along
    v: too large a step measures curvature, too small one rounding (see ``notes/jvp.md``).
    """
    if mode == "auto":
        mode = fastest_exact_mode(next(iter(params.values())).device) if params else "forward_ad"
    _check(params, tangents, mode)
    params = {k: v.detach() for k, v in params.items()}
    tangents = {k: v.detach().to(params[k].dtype) for k, v in tangents.items()}
    if mode in EXACT_JVP_MODES:
        # J·v is linear in v: run the pass on v/‖v‖ and scale the result back in float32.  The lookahead direction
        # −η∇L is tiny (η = 1e-2 times a small gradient); in an fp16 network its tangents would underflow.
        v_norm = float(_norm(tangents.values()))
        if v_norm == 0.0:
            with torch.no_grad():
                out = fn(params).detach()
            return out, torch.zeros_like(out)
        unit = {k: (v / v_norm).to(v.dtype) for k, v in tangents.items()}
        out, tangent_out = _exact_jvp(fn, params, unit, mode)
        wide = torch.promote_types(tangent_out.dtype, torch.float32)  # float32, or float64 if that is what ran
        return out, (tangent_out.to(wide) * v_norm).to(tangent_out.dtype)
    return _finite_difference_jvp(fn, params, tangents, mode, primal, fd_rel_step)


def _exact_jvp(fn: ScoreFn, params, tangents, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Forward mode needs no autograd graph: under no_grad, tensors that no tangent reaches stay plain, so their
    # attention keeps the fused kernels (see tangent_safe_kernels) and nothing is recorded for a backward pass.
    if mode == "func":
        with tangent_safe_kernels(), torch.no_grad():
            out, tangent_out = torch.func.jvp(fn, (params,), (tangents,))
        return out.detach(), tangent_out.detach()

    if mode == "forward_ad":
        with tangent_safe_kernels(), forward_mode_rules(), torch.no_grad(), fwAD.dual_level():
            duals = {k: fwAD.make_dual(p, tangents[k]) for k, p in params.items()}
            out = fwAD.unpack_dual(fn(duals))
            tangent_out = out.tangent if out.tangent is not None else torch.zeros_like(out.primal)
            return out.primal.detach(), tangent_out.detach()

    # double_backward: g(u) = J^T u is linear in u, so d<g(u), v>/du = J v.
    with tangent_safe_kernels(), torch.enable_grad():
        leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
        out = fn(leaves)
        u = torch.zeros_like(out, requires_grad=True)
        names = list(leaves)
        vjps = torch.autograd.grad(out, [leaves[k] for k in names], u, create_graph=True, allow_unused=True)
        used = [(g, tangents[k]) for g, k in zip(vjps, names) if g is not None and g.requires_grad]
        if not used:
            return out.detach(), torch.zeros_like(out)
        (tangent_out,) = torch.autograd.grad([g for g, _ in used], u, [v for _, v in used], allow_unused=True)
    tangent_out = torch.zeros_like(out) if tangent_out is None else tangent_out
    return out.detach(), tangent_out.detach()


def _finite_difference_jvp(fn: ScoreFn, params, tangents, mode: str, primal, fd_rel_step: float):
    # Finite differences along v.
    with torch.no_grad():
        v_norm = _norm(tangents.values())
        if primal is None or mode == "fd_central":
            primal_out = fn(params)
        else:
            primal_out = primal.detach()
        if v_norm == 0:
            return primal_out, torch.zeros_like(primal_out)
        h = float(fd_rel_step * max(float(_norm(params.values())), 1.0) / v_norm)
        plus = fn({k: p + h * tangents[k] for k, p in params.items()})
        if mode == "fd_forward":
            return primal_out, (plus - primal_out) / h
        minus = fn({k: p - h * tangents[k] for k, p in params.items()})
        return primal_out, (plus - minus) / (2 * h)
