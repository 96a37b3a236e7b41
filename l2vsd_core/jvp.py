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
from typing import Callable, Mapping

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

EXACT_JVP_MODES = ("forward_ad", "func", "double_backward")
APPROX_JVP_MODES = ("fd_forward", "fd_central")
JVP_MODES = EXACT_JVP_MODES + APPROX_JVP_MODES

ScoreFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


@contextlib.contextmanager
def math_attention():
    """Route ``scaled_dot_product_attention`` to the math kernel where a tangent flows through it.

    Fused attention kernels (flash, memory-efficient) have no forward-mode AD or double-backward rules
    (pytorch #98164, #128971); the math kernel is plain differentiable ops.  Attention calls that no tangent reaches
    (everything before the first tangent-carrying parameter, e.g. all but the end of the network for a last-layer
    JVP) keep the fast kernels.  While active, ``torch.nn.functional.scaled_dot_product_attention`` (which diffusers'
    attention processors look up at call time) is wrapped; the original is restored on exit.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to switch
        yield
        return
    original = F.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        if any(_carries_tangent(x) for x in (query, key, value)):
            with sdpa_kernel([SDPBackend.MATH]):
                return original(query, key, value, *args, **kwargs)
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


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


def jvp(fn: ScoreFn, params: Mapping[str, torch.Tensor], tangents: Mapping[str, torch.Tensor],
        mode: str = "forward_ad", *, primal: torch.Tensor | None = None,
        fd_rel_step: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(fn(params), J_params fn · tangents)``, both detached.

    ``primal`` (optional) is ``fn(params)`` already computed; only ``fd_forward`` can reuse it (the exact modes produce
    the primal in the same pass anyway).  Finite-difference modes step ``h = fd_rel_step * max(‖φ‖, 1) / ‖v‖`` along
    v: too large a step measures curvature, too small one rounding (see ``notes/jvp.md``).
    """
    _check(params, tangents, mode)
    params = {k: v.detach() for k, v in params.items()}
    tangents = {k: v.detach().to(params[k].dtype) for k, v in tangents.items()}

    # Forward mode needs no autograd graph: under no_grad, tensors that no tangent reaches stay plain, so their
    # attention keeps the fused kernels (see math_attention) and nothing is recorded for a backward pass.
    if mode == "func":
        with math_attention(), torch.no_grad():
            out, tangent_out = torch.func.jvp(fn, (params,), (tangents,))
        return out.detach(), tangent_out.detach()

    if mode == "forward_ad":
        with math_attention(), torch.no_grad(), fwAD.dual_level():
            duals = {k: fwAD.make_dual(p, tangents[k]) for k, p in params.items()}
            out = fwAD.unpack_dual(fn(duals))
            tangent_out = out.tangent if out.tangent is not None else torch.zeros_like(out.primal)
            return out.primal.detach(), tangent_out.detach()

    if mode == "double_backward":
        # g(u) = J^T u is linear in u, so d<g(u), v>/du = J v.
        with math_attention(), torch.enable_grad():
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
