"""Multiresolution hash-grid encoding (Instant-NGP) in pure PyTorch, with tiny-cuda-nn's configuration names.

``TorchHashGrid`` maps points in [0,1]^3, shape ``[N, 3]``, to features ``[N, n_levels * n_features_per_level]``
(level-major: output column ``l * F + f`` is feature ``f`` of level ``l``), the layout tcnn's ``HashGrid`` gives.
``make_hashgrid`` picks this module or a tinycudann wrapper with the same interface.

Level geometry: the rule tiny-cuda-nn uses (``include/tiny-cuda-nn/encodings/grid.h`` and ``common_device.h``:
``grid_scale``, ``grid_resolution``, ``pos_fract``, ``grid_index``, the params-per-level loop in the
``GridEncodingTemplated`` constructor), written out here and reimplemented, not copied:

* ``scale_l = 2^(l * log2(per_level_scale)) * base_resolution - 1``, evaluated in float32 as tcnn does
  (``exp2f``, ``std::log2`` of a float).  "-1" makes ``base_resolution`` count grid *vertices*, not cells.
* ``resolution_l = ceil(scale_l) + 1`` vertices per axis.  (Not ``floor(base * per_level_scale^l)`` as in the
  paper's notation; e.g. the ProlificDreamer config gives resolutions 16, 24, 34, 49, 71, 102, ..., 4096.)
* ``entries_l = min(next_multiple(resolution_l^3, 8), 2^log2_hashmap_size)`` table rows, stored back to back in one
  flat parameter vector (``params``, row-major ``[entry, feature]``, the same layout as ``tcnn.Encoding.params``).
* a point ``x`` in [0,1] sits at grid position ``p = x * scale_l + 0.5`` (the 0.5 staggers the levels, paper
  appendix A); corner ``c = floor(p)`` and ``c + 1`` per axis, trilinear weights from ``p - floor(p)``.
* corner index: if ``resolution_l^3 <= entries_l`` ("dense" level) ``(cx + cy*R + cz*R^2) mod entries_l``, else
  the spatial hash ``(cx*1 xor cy*2654435761 xor cz*805459861) mod 2^32 mod entries_l``.  Because of the +0.5 a
  corner can reach index ``R`` on an axis (x near 1), which in a dense level wraps into the next row/slab of the
  linear index exactly as in tcnn (tcnn's source notes this wraparound; it is harmless).

Dense-level test: the brief phrased the dense condition as ``(resolution+1)^3 fits``; tcnn's condition is
``resolution^3 <= entries`` with ``resolution = ceil(scale)+1`` already counting vertices, and that is what is used.

Inputs outside [0,1] are **clamped** to [0,1] (tcnn does not check, and lets the integer corner wrap).  Clamping
keeps stray ray samples just outside the bounding box harmless; their positional gradient is zero outside.
Parameters start uniform in [-1e-4, 1e-4], like tcnn.  Gradients flow to the table and to the input positions
(``d p / d x = scale_l``) through ordinary autograd; all levels are evaluated in one batched gather.

Only ``interpolation="Linear"`` is implemented in the torch backend.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "HASH_PRIMES",
    "HashGridConfig",
    "TorchHashGrid",
    "TcnnHashGrid",
    "level_geometry",
    "make_hashgrid",
]

# tcnn's "coherent prime" hash: 1 for x keeps neighbouring x in neighbouring rows (cache coherence).
HASH_PRIMES = (1, 2654435761, 805459861)
_MASK32 = 0xFFFFFFFF
_N_DIMS = 3

TCNN_MISSING_MSG = "pip install tinycudann needs CUDA; use backend='torch'"


@dataclass
class HashGridConfig:
    """tiny-cuda-nn ``HashGrid`` encoding config; defaults are threestudio's ProlificDreamer stage-1 values
    (``configs/prolificdreamer.yaml``: 16 levels x 2 features, 2^19 entries, base 16, max resolution 4096)."""

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.447269237440378
    interpolation: str = "Linear"

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def to_tcnn(self) -> dict[str, Any]:
        """The ``encoding_config`` dict for ``tinycudann.Encoding``."""
        return {"otype": "HashGrid", **asdict(self)}


def _float32_scale(level: int, per_level_scale: float, base_resolution: int) -> float:
    """``exp2f(level * log2f(per_level_scale)) * base_resolution - 1.0f`` in float32 arithmetic, as tcnn computes it
    (CPU exp2 may differ from CUDA's exp2f by an ulp; that only matters if ``scale`` lands on an integer)."""
    f32 = torch.float32
    log2_pls = torch.log2(torch.tensor(per_level_scale, dtype=f32))
    e = torch.tensor(float(level), dtype=f32) * log2_pls
    s = torch.exp2(e) * torch.tensor(float(base_resolution), dtype=f32) - torch.tensor(1.0, dtype=f32)
    return float(s.item())


def level_geometry(config: HashGridConfig) -> list[dict[str, Any]]:
    """Per level: ``scale``, ``resolution``, ``entries`` (table rows), ``offset`` (first row), ``hashed``."""
    table_size = 1 << int(config.log2_hashmap_size)
    out = []
    offset = 0
    for level in range(int(config.n_levels)):
        scale = _float32_scale(level, config.per_level_scale, config.base_resolution)
        resolution = int(math.ceil(scale)) + 1
        dense_entries = resolution**_N_DIMS
        entries = min(-(-dense_entries // 8) * 8, table_size)
        out.append(
            {
                "scale": scale,
                "resolution": resolution,
                "entries": entries,
                "offset": offset,
                "hashed": dense_entries > entries,
            }
        )
        offset += entries
    return out


def _check_points(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[-1] != _N_DIMS:
        raise ValueError(f"hash grid expects points of shape [N, 3] in [0,1]^3, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"hash grid expects floating-point points, got {x.dtype}")
    # Out-of-range points are clamped (documented choice, see module docstring).
    return x.clamp(0.0, 1.0)


class TorchHashGrid(nn.Module):
    """Instant-NGP hash-grid encoding in pure PyTorch, matching tiny-cuda-nn's ``HashGrid`` (Linear interpolation).

    ``forward(x)``: ``x`` ``[N, 3]`` in [0,1] (clamped) -> ``[N, n_levels * n_features_per_level]``.
    ``params`` is the flat table (tcnn layout), so a ``tcnn.Encoding``'s ``params`` can be loaded into it.
    """

    def __init__(self, config: HashGridConfig | None = None, seed: int | None = None):
        super().__init__()
        self.config = config = config or HashGridConfig()
        if str(config.interpolation).lower() != "linear":
            raise ValueError(f"TorchHashGrid only implements interpolation='Linear', got {config.interpolation!r}")
        if config.n_levels < 1 or config.n_features_per_level < 1:
            raise ValueError("n_levels and n_features_per_level must be >= 1")
        self.n_input_dims = _N_DIMS
        self.n_output_dims = config.n_output_dims
        self.levels = level_geometry(config)
        self.n_entries = self.levels[-1]["offset"] + self.levels[-1]["entries"]

        self.params = nn.Parameter(torch.empty(self.n_entries * config.n_features_per_level, dtype=torch.float32))
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            self.params.uniform_(-1e-4, 1e-4, generator=gen)

        # Scales stay Python floats (a module-wide .half()/.double() must not round them); integer geometry is kept
        # in non-persistent buffers so it follows .to(device) without entering the state dict.
        self._scales = tuple(lv["scale"] for lv in self.levels)
        long = torch.long
        self.register_buffer("_resolution", torch.tensor([lv["resolution"] for lv in self.levels], dtype=long), False)
        self.register_buffer("_entries", torch.tensor([lv["entries"] for lv in self.levels], dtype=long), False)
        self.register_buffer("_offset", torch.tensor([lv["offset"] for lv in self.levels], dtype=long), False)
        self.register_buffer("_hashed", torch.tensor([lv["hashed"] for lv in self.levels], dtype=torch.bool), False)
        # The 8 corners of a cell: bit d of the corner number selects +1 along axis d (x is bit 0).
        corners = torch.tensor([[(c >> d) & 1 for d in range(_N_DIMS)] for c in range(1 << _N_DIMS)], dtype=long)
        self.register_buffer("_corners", corners, False)
        self.register_buffer("_primes", torch.tensor(HASH_PRIMES, dtype=long), False)

    @property
    def table(self) -> torch.Tensor:
        """The table as ``[n_entries, n_features_per_level]`` (a view of ``params``)."""
        return self.params.view(self.n_entries, self.config.n_features_per_level)

    def corner_indices(self, cells: torch.Tensor) -> torch.Tensor:
        """Table rows (global, offset included) of integer grid corners ``cells`` ``[..., L, 3]`` -> ``[..., L]``."""
        res = self._resolution
        cx, cy, cz = cells.unbind(-1)
        dense = cx + cy * res + cz * (res * res)
        # uint32 products/xor, emulated in int64 (coordinates are >= 0 and < 2^13, so nothing overflows int64).
        p = self._primes
        hashed = ((cx * p[0]) ^ (cy * p[1]) ^ (cz * p[2])) & _MASK32
        idx = torch.where(self._hashed, hashed, dense)
        return torch.remainder(idx, self._entries) + self._offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_points(x)
        n = x.shape[0]
        n_levels = self.config.n_levels
        feats = self.config.n_features_per_level
        scales = torch.tensor(self._scales, dtype=x.dtype, device=x.device)

        pos = x[:, None, :] * scales[None, :, None] + 0.5  # [N, L, 3] grid coordinates
        base = torch.floor(pos)
        frac = pos - base  # d frac / d x = scale (floor contributes no gradient)
        base = base.long()

        corners = self._corners  # [8, 3]
        cells = base[:, :, None, :] + corners  # [N, L, 8, 3]
        rows = self.corner_indices(cells.permute(0, 2, 1, 3)).permute(0, 2, 1)  # [N, L, 8]

        # Trilinear weights: product over axes of (frac if corner bit set else 1 - frac).
        w_axes = torch.where(corners.bool(), frac[:, :, None, :], 1.0 - frac[:, :, None, :])  # [N, L, 8, 3]
        weights = w_axes.prod(-1)  # [N, L, 8]

        table = self.table
        vals = table.index_select(0, rows.reshape(-1)).view(n, n_levels, 1 << _N_DIMS, feats)
        out = (weights.to(table.dtype)[..., None] * vals).sum(2)  # [N, L, F]
        return out.reshape(n, n_levels * feats)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"n_levels={c.n_levels}, n_features_per_level={c.n_features_per_level}, "
            f"log2_hashmap_size={c.log2_hashmap_size}, base_resolution={c.base_resolution}, "
            f"per_level_scale={c.per_level_scale}, n_params={self.params.numel()}"
        )


class TcnnHashGrid(nn.Module):
    """tinycudann ``HashGrid`` behind the same interface: ``[N, 3]`` in [0,1] (clamped) -> float32 features."""

    def __init__(self, config: HashGridConfig | None = None, seed: int | None = None):
        super().__init__()
        tcnn = _import_tcnn()
        self.config = config = config or HashGridConfig()
        self.n_input_dims = _N_DIMS
        self.n_output_dims = config.n_output_dims
        kwargs: dict[str, Any] = {}
        if seed is not None:
            kwargs["seed"] = int(seed)
        try:
            self.encoding = tcnn.Encoding(_N_DIMS, config.to_tcnn(), dtype=torch.float32, **kwargs)
        except TypeError:  # bindings older than the `dtype` argument: half precision, cast on the way out
            self.encoding = tcnn.Encoding(_N_DIMS, config.to_tcnn(), **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_points(x)
        device = self.encoding.params.device
        return self.encoding(x.to(device=device, dtype=torch.float32)).float()


def _import_tcnn():
    if not torch.cuda.is_available():
        raise RuntimeError(f"backend='tcnn' needs a CUDA device (none available): {TCNN_MISSING_MSG}")
    try:
        import tinycudann as tcnn  # noqa: PLC0415 (lazy: CUDA-only dependency)
    except ImportError as exc:  # includes failures to load its CUDA extension
        raise RuntimeError(f"tinycudann is not importable ({exc}): {TCNN_MISSING_MSG}") from exc
    return tcnn


def _tcnn_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 (a broken CUDA build raises more than ImportError)
        return False
    return True


def make_hashgrid(config: HashGridConfig | None = None, backend: str = "auto", seed: int | None = None) -> nn.Module:
    """Build a hash-grid encoder.

    ``backend``: ``"torch"`` (:class:`TorchHashGrid`, any device), ``"tcnn"`` (:class:`TcnnHashGrid`; raises
    ``RuntimeError`` naming the fix when CUDA or tinycudann is missing), or ``"auto"`` (tcnn only when CUDA is
    available *and* tinycudann imports, else torch).  Both take ``[N, 3]`` in [0,1] and return
    ``[N, n_levels * n_features_per_level]``.
    """
    config = config or HashGridConfig()
    backend = str(backend).lower()
    if backend not in ("auto", "torch", "tcnn"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'tcnn', got {backend!r}")
    if backend == "tcnn" or (backend == "auto" and _tcnn_usable()):
        return TcnnHashGrid(config, seed=seed)
    return TorchHashGrid(config, seed=seed)
