"""Checkpoint files of every stage: one ``.safetensors`` (tensors + JSON metadata under the stage's key) and a
human-readable ``.json`` sidecar, both written atomically; optimizer states flattened to named tensors.

Optimizer tensor names: ``<prefix>.<group>.<i>.<state>`` (``<group>``: the param group's ``name``, or its index when
groups are unnamed; ``<i>``: the parameter's position in its group), e.g. ``optim.field.encoding.0.exp_avg`` or
``score_optim.0.3.exp_avg_sq``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .files import atomic_write

__all__ = ["flatten_optimizer", "load_optimizer", "check_keys", "generator_state", "set_generator_state",
           "write_checkpoint", "read_checkpoint"]


def generator_state(g: torch.Generator) -> list[int]:
    return [int(x) for x in g.get_state().tolist()]


def set_generator_state(g: torch.Generator, state: list[int]) -> None:
    g.set_state(torch.tensor(state, dtype=torch.uint8))


def flatten_optimizer(optimizer: torch.optim.Optimizer, prefix: str, group_names: Optional[list[str]]) -> dict:
    sd = optimizer.state_dict()
    out = {}
    for gi, grp in enumerate(sd["param_groups"]):
        for pos, idx in enumerate(grp["params"]):
            for k, v in sd["state"].get(idx, {}).items():
                t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
                name = f"{prefix}.{group_names[gi]}.{pos}.{k}" if group_names else f"{prefix}.{gi}.{pos}.{k}"
                out[name] = t.detach().clone().contiguous().cpu()
    return out


def load_optimizer(optimizer: torch.optim.Optimizer, prefix: str, group_names: Optional[list[str]],
                   tensors: dict) -> None:
    """Restore what :func:`flatten_optimizer` wrote; ``ValueError`` for state of the wrong shape or of unknown
    parameters."""
    sd = optimizer.state_dict()
    params = [p for grp in optimizer.param_groups for p in grp["params"]]
    state, used = {}, set()
    for gi, grp in enumerate(sd["param_groups"]):
        for pos, idx in enumerate(grp["params"]):
            head = f"{prefix}.{group_names[gi]}.{pos}." if group_names else f"{prefix}.{gi}.{pos}."
            entry = {}
            for k in [k for k in tensors if k.startswith(head)]:
                name, v = k[len(head):], tensors[k]
                if name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and v.shape != params[idx].shape:
                    raise ValueError(f"checkpoint does not match this configuration: optimizer state {k} has "
                                     f"shape {tuple(v.shape)}, the parameter {tuple(params[idx].shape)}")
                entry[name] = v
                used.add(k)
            if entry:
                state[idx] = entry
    extra = sorted(k for k in tensors if k.startswith(prefix + ".") and k not in used)
    if extra:
        raise ValueError(f"checkpoint does not match this configuration: optimizer state for unknown parameters "
                         f"({', '.join(extra[:5])}{', …' if len(extra) > 5 else ''})")
    sd["state"] = state
    optimizer.load_state_dict(sd)


def check_keys(path, expected: dict, got: dict) -> None:
    """``ValueError`` naming what differs when the checkpoint's tensors ``got`` are not exactly ``expected`` (names
    and shapes) — checked before anything is loaded."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:5])}{', …' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"checkpoint {path} does not match this configuration ({'; '.join(parts)})")


def write_checkpoint(path, tensors: dict, meta: dict, key: str) -> Path:
    """``path`` (safetensors, ``meta`` as JSON under ``key``) and ``path + '.json'``, both atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={key: text}))
    sidecar = path.with_name(path.name + ".json")
    atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    return path


def read_checkpoint(path, key: str, what: str) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a checkpoint written with ``key``; ``ValueError`` if it is not one
    (``FileNotFoundError`` passes through)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        if key not in metadata:
            raise ValueError(f"no {key!r} metadata (found: {', '.join(sorted(metadata)) or 'none'})")
        meta = json.loads(metadata[key])
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"cannot read checkpoint {path}: not a valid {what} checkpoint ({e})") from e
    return tensors, meta
