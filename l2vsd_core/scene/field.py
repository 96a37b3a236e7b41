"""Stage-1 radiance field (threestudio ``implicit-volume`` + ``no-material``) and neural environment background.

Settings follow threestudio's ProlificDreamer stage 1 (``configs/prolificdreamer.yaml``, see
``shared/notes/anchors.md`` §1.1); the code is our own.

:class:`ImplicitVolume`
    world points ``x`` ``[N, 3]`` in the box ``[-radius, radius]^3``
    -> ``u = (x + radius) / (2 radius)`` in ``[0,1]^3`` (threestudio's bounded ``contract_to_unisphere``)
    -> hash grid (:func:`~l2vsd_core.scene.hashgrid.make_hashgrid`, 16 levels x 2 features, 2^19, base 16,
    per-level scale 1.447..., max resolution 4096)
    -> ``density_network`` (VanillaMLP: ReLU, 64 neurons, 1 hidden layer, no bias) -> raw density ``r``;
    ``feature_network`` (same shape) -> 3 features -> ``rgb = sigmoid(features)`` (``no-material``: the feature is
    the colour, no shading).

    Density: ``sigma = act(r + b(x))`` with ``act = softplus`` and the Magic3D blob bias
    ``b(x) = density_blob_scale * (1 - ||x|| / density_blob_std)`` evaluated on the *world* (unscaled) point,
    ``scale 10``, ``std 0.5`` (so ``b = 10 (1 - 2||x||)``: +10 at the centre, 0 at ``||x|| = 0.5``, negative
    beyond).  ``"blob_dreamfusion"`` (``scale * exp(-||x||^2 / (2 std^2))``), a float constant, or ``"none"``
    are also accepted.

    Normals: ``n = -grad(sigma) / ||grad(sigma)||``, either by central finite differences with world-space step
    ``finite_difference_normal_eps = 0.01`` (offset points clamped to the box, as threestudio does:
    ``-(sigma(x + eps e_i) - sigma(x - eps e_i)) / (2 eps)``) or by autograd (``"analytic"``).  threestudio's
    class default is ``"finite_difference"``; the ProlificDreamer yaml sets ``normal_type: null`` because stage 1
    never uses normals (``lambda_orient 0``).  We default to ``"finite_difference"`` so the renderer always gets a
    ``"normal"`` entry; ``normal_type=None`` skips the normal computation (``forward`` then omits ``"normal"``).

    Out-of-box points: the grid input ``u`` is clamped to ``[0,1]^3`` (i.e. the point is clamped to the box for
    the hash grid; the clamped coordinate carries no positional gradient), while the blob bias uses the unclamped
    point, so density keeps decaying outside the box.  The blob norm is ``sqrt(max(sum x^2, 1e-20))`` so the
    gradient at the origin is finite (0) instead of NaN; the value differs from ``||x||`` by at most 1e-10.

:class:`EnvironmentBackground`
    threestudio's ``neural-environment-map-background``: normalised view direction -> real spherical harmonics
    with tcnn's ``degree`` convention (``degree`` bands, ``degree^2`` components; the config's ``degree 3`` gives
    bands l = 0, 1, 2, 9 components) -> VanillaMLP (16 neurons, 2 hidden layers, ReLU, no bias) -> sigmoid.
    ``random_aug``: in training, with probability ``random_aug_prob`` (0.5), the whole output is replaced by a
    random solid colour per batch item (threestudio draws ``rand(B, 1, 1, 3)``), from the given generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .hashgrid import HashGridConfig, make_hashgrid

__all__ = [
    "TextureField",
    "DENSITY_ACTIVATIONS",
    "DENSITY_BIASES",
    "NORMAL_TYPES",
    "FieldConfig",
    "BackgroundConfig",
    "VanillaMLP",
    "ImplicitVolume",
    "EnvironmentBackground",
    "blob_bias",
    "spherical_harmonics",
]

DENSITY_ACTIVATIONS = ("softplus", "shifted_softplus", "exp", "trunc_exp", "relu", "none")
DENSITY_BIASES = ("blob_magic3d", "blob_dreamfusion", "none")  # or a float constant
NORMAL_TYPES = ("finite_difference", "analytic", None)
_NORM_FLOOR = 1e-20


# ------------------------------------------------------------------------------------------------------- configs
@dataclass
class FieldConfig:
    """``ImplicitVolume`` settings; defaults are threestudio's ProlificDreamer stage 1."""

    radius: float = 1.0
    hashgrid: HashGridConfig = field(default_factory=HashGridConfig)
    backend: str = "auto"  # hash grid backend: "auto" | "torch" | "tcnn"
    mlp_neurons: int = 64
    mlp_hidden_layers: int = 1
    n_feature_dims: int = 3
    density_activation: str = "softplus"
    density_bias: Union[str, float] = "blob_magic3d"
    density_blob_scale: float = 10.0
    density_blob_std: float = 0.5
    normal_type: Optional[str] = "finite_difference"
    finite_difference_normal_eps: float = 0.01
    isosurface_threshold: float = 25.0  # threestudio's default level for mesh extraction (used by later stages)

    def validate(self) -> "FieldConfig":
        if not (isinstance(self.radius, (int, float)) and math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"radius must be a finite number > 0, got {self.radius!r}")
        if self.density_activation not in DENSITY_ACTIVATIONS:
            raise ValueError(
                f"density_activation must be one of {DENSITY_ACTIVATIONS}, got {self.density_activation!r}"
            )
        if not isinstance(self.density_bias, (int, float)) and self.density_bias not in DENSITY_BIASES:
            raise ValueError(f"density_bias must be one of {DENSITY_BIASES} or a float, got {self.density_bias!r}")
        if self.density_bias in ("blob_magic3d", "blob_dreamfusion") and not self.density_blob_std > 0:
            raise ValueError(f"density_blob_std must be > 0, got {self.density_blob_std!r}")
        if self.normal_type not in NORMAL_TYPES:
            raise ValueError(f"normal_type must be one of {NORMAL_TYPES}, got {self.normal_type!r}")
        if not self.finite_difference_normal_eps > 0:
            raise ValueError(
                f"finite_difference_normal_eps must be > 0, got {self.finite_difference_normal_eps!r}"
            )
        for name in ("mlp_neurons", "mlp_hidden_layers", "n_feature_dims"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        return self


@dataclass
class BackgroundConfig:
    """``EnvironmentBackground`` settings; defaults are threestudio's ``neural-environment-map-background``
    as configured for ProlificDreamer stage 1."""

    sh_degree: int = 3  # tcnn convention: number of SH bands; degree^2 components
    mlp_neurons: int = 16
    mlp_hidden_layers: int = 2
    n_output_dims: int = 3
    random_aug: bool = True
    random_aug_prob: float = 0.5

    def validate(self) -> "BackgroundConfig":
        if self.sh_degree not in (1, 2, 3, 4):
            raise ValueError(f"sh_degree must be one of (1, 2, 3, 4), got {self.sh_degree!r}")
        if not 0.0 <= float(self.random_aug_prob) <= 1.0:
            raise ValueError(f"random_aug_prob must be in [0, 1], got {self.random_aug_prob!r}")
        for name in ("mlp_neurons", "mlp_hidden_layers", "n_output_dims"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        return self


# ------------------------------------------------------------------------------------------------------- pieces
class VanillaMLP(nn.Module):
    """threestudio's ``VanillaMLP``: Linear(no bias) + ReLU, ``n_hidden_layers`` hidden layers, linear output."""

    def __init__(self, dim_in: int, dim_out: int, n_neurons: int, n_hidden_layers: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim_in, n_neurons, bias=False), nn.ReLU()]
        for _ in range(n_hidden_layers - 1):
            layers += [nn.Linear(n_neurons, n_neurons, bias=False), nn.ReLU()]
        layers.append(nn.Linear(n_neurons, dim_out, bias=False))
        self.layers = nn.Sequential(*layers)

    @property
    def output_layer(self) -> nn.Linear:
        return self.layers[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _TruncExp(torch.autograd.Function):
    """exp forward; backward uses exp(clamp(x, max=15)) (torch-ngp / threestudio ``trunc_exp``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15.0))


def _activate(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "softplus":
        return F.softplus(x)
    if name == "shifted_softplus":
        return F.softplus(x - 1.0)
    if name == "exp":
        return torch.exp(x)
    if name == "trunc_exp":
        return _TruncExp.apply(x)
    if name == "relu":
        return F.relu(x)
    return x  # "none"


def blob_bias(points: torch.Tensor, kind: Union[str, float], scale: float, std: float) -> torch.Tensor:
    """Pre-activation density bias ``[N]`` at world points ``[N, 3]``.

    ``blob_magic3d``: ``scale * (1 - ||x|| / std)``; ``blob_dreamfusion``: ``scale * exp(-||x||^2 / (2 std^2))``;
    a float: that constant; ``"none"``: 0.
    """
    if isinstance(kind, (int, float)):
        return torch.full(points.shape[:-1], float(kind), dtype=points.dtype, device=points.device)
    if kind == "none":
        return points.new_zeros(points.shape[:-1])
    sq = (points * points).sum(-1)
    if kind == "blob_magic3d":
        return scale * (1.0 - torch.sqrt(sq.clamp_min(_NORM_FLOOR)) / std)
    if kind == "blob_dreamfusion":
        return scale * torch.exp(-0.5 * sq / (std * std))
    raise ValueError(f"density_bias must be one of {DENSITY_BIASES} or a float, got {kind!r}")


# --------------------------------------------------------------------------------------------------- the field
class ImplicitVolume(nn.Module):
    """Hash-grid density/colour field (threestudio ``implicit-volume`` with ``no-material``).

    ``forward(points [N,3], directions [N,3] | None) -> {"density": [N], "rgb": [N,3], "normal": [N,3]}``
    (``"normal"`` only when ``normal_type`` is not None; directions are unused: the colour is view-independent).
    ``density(points) -> [N]`` (activated, for the occupancy grid).  ``parameter_groups()`` for AdamW.
    """

    def __init__(self, config: Optional[FieldConfig] = None, seed: Optional[int] = None):
        super().__init__()
        self.config = config = (config or FieldConfig()).validate()
        self.radius = float(config.radius)
        self.encoding = make_hashgrid(config.hashgrid, backend=config.backend, seed=seed)
        n_enc = self.encoding.n_output_dims
        # MLPs: torch's default Linear init (as threestudio's VanillaMLP); ``seed`` makes it reproducible without
        # touching the global RNG stream.
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(int(seed))
            self.density_network = VanillaMLP(n_enc, 1, config.mlp_neurons, config.mlp_hidden_layers)
            self.feature_network = VanillaMLP(
                n_enc, config.n_feature_dims, config.mlp_neurons, config.mlp_hidden_layers
            )

    # -- coordinates -----------------------------------------------------------------------------------------
    def normalize_points(self, points: torch.Tensor) -> torch.Tensor:
        """World ``[-r, r]^3`` -> ``[0,1]^3``, clamped (out-of-box points take the nearest box point)."""
        return ((points + self.radius) / (2.0 * self.radius)).clamp(0.0, 1.0)

    def _check(self, points: torch.Tensor) -> torch.Tensor:
        if points.dim() != 2 or points.shape[-1] != 3:
            raise ValueError(f"points must have shape [N, 3], got {tuple(points.shape)}")
        return points

    def _encode(self, points: torch.Tensor) -> torch.Tensor:
        enc = self.encoding(self.normalize_points(points))
        return enc.to(points.dtype) if enc.dtype != points.dtype else enc

    def _density_from_encoding(self, points: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        raw = self.density_network(enc)[:, 0]
        raw = raw + blob_bias(points, cfg.density_bias, cfg.density_blob_scale, cfg.density_blob_std)
        return _activate(cfg.density_activation, raw)

    # -- public API ------------------------------------------------------------------------------------------
    def density(self, points: torch.Tensor) -> torch.Tensor:
        """Activated density ``sigma`` ``[N]`` at world points ``[N, 3]``."""
        points = self._check(points)
        return self._density_from_encoding(points, self._encode(points))

    def normals(self, points: torch.Tensor, normal_type: Optional[str] = None) -> torch.Tensor:
        """``-grad(sigma)`` normalised, ``[N, 3]`` (zero where the gradient vanishes)."""
        normal_type = normal_type or self.config.normal_type or "finite_difference"
        if normal_type not in ("finite_difference", "analytic"):
            raise ValueError(f"normal_type must be one of ('finite_difference', 'analytic'), got {normal_type!r}")
        points = self._check(points)
        if normal_type == "finite_difference":
            eps = float(self.config.finite_difference_normal_eps)
            offsets = torch.cat([torch.eye(3), -torch.eye(3)]).to(points) * eps  # [+x,+y,+z,-x,-y,-z]
            shifted = (points[:, None, :] + offsets[None]).clamp(-self.radius, self.radius)
            sig = self.density(shifted.reshape(-1, 3)).view(-1, 6)
            grad = (sig[:, :3] - sig[:, 3:]) / (2.0 * eps)
        else:
            # Differentiable normals (create_graph) only when the caller records a graph in training mode; under
            # no_grad (evaluation, export) the gradient is still computed, then detached.
            outer_grad = torch.is_grad_enabled()
            with torch.enable_grad():
                pts = points if (outer_grad and points.requires_grad) else points.detach().requires_grad_(True)
                sig = self.density(pts)
                (grad,) = torch.autograd.grad(sig.sum(), pts, create_graph=outer_grad and self.training)
            if not (outer_grad and self.training):
                grad = grad.detach()
        return F.normalize(-grad, dim=-1)

    def forward(self, points: torch.Tensor, directions: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        points = self._check(points)
        enc = self._encode(points)
        out = {
            "density": self._density_from_encoding(points, enc),
            "rgb": torch.sigmoid(self.feature_network(enc)),
        }
        if self.config.normal_type is not None:
            out["normal"] = self.normals(points)
        return out

    def parameter_groups(self, lr_encoding: float = 0.01, lr_network: float = 0.001) -> list[dict]:
        """AdamW groups as ProlificDreamer: encoding 0.01, density/feature networks 0.001 (betas (0.9, 0.99) and
        eps 1e-15 are optimizer arguments, not group entries)."""
        return [
            {"params": list(self.encoding.parameters()), "lr": lr_encoding, "name": "geometry.encoding"},
            {"params": list(self.density_network.parameters()), "lr": lr_network, "name": "geometry.density_network"},
            {"params": list(self.feature_network.parameters()), "lr": lr_network, "name": "geometry.feature_network"},
        ]


# ---------------------------------------------------------------------------------------------- background
_C0 = 0.28209479177387814
_C1 = 0.48860251190291987
_C2 = (1.0925484305920792, 0.94617469575755997, 0.31539156525251999, 0.54627421529603959)
_C3 = (0.59004358992664352, 2.8906114426405538, 0.45704579946446572, 0.3731763325901154, 1.4453057213202769)


def spherical_harmonics(dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Real SH basis of unit directions ``[..., 3]`` -> ``[..., degree^2]`` (bands l < degree; tcnn's ordering
    and signs)."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, _C0)]
    if degree > 1:
        out += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree > 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            _C2[0] * x * y,
            -_C2[0] * y * z,
            _C2[1] * zz - _C2[2],
            -_C2[0] * x * z,
            _C2[3] * (xx - yy),
        ]
    if degree > 3:
        out += [
            _C3[0] * y * (3 * xx - yy) * -1.0,
            _C3[1] * x * y * z,
            _C3[2] * y * (1 - 5 * zz),
            _C3[3] * z * (5 * zz - 3),
            _C3[2] * x * (1 - 5 * zz),
            _C3[4] * z * (xx - yy),
            _C3[0] * x * (3 * yy - xx),
        ]
    return torch.stack(out, -1)


class EnvironmentBackground(nn.Module):
    """Neural environment map: view direction ``[..., 3]`` -> colour ``[..., 3]`` in [0, 1].

    ``forward(dirs, generator=None)``.  In training mode with ``random_aug``, with probability
    ``random_aug_prob`` (one draw per call, from ``generator``) the output is replaced by a random solid colour:
    one colour per batch item (leading dimension) when ``dirs`` has 3 or more dimensions (e.g. ``[B, H, W, 3]``),
    one colour for all rows when ``dirs`` is ``[N, 3]`` (a single image's rays).
    """

    def __init__(self, config: Optional[BackgroundConfig] = None, seed: Optional[int] = None):
        super().__init__()
        self.config = config = (config or BackgroundConfig()).validate()
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(int(seed))
            self.network = VanillaMLP(
                config.sh_degree**2, config.n_output_dims, config.mlp_neurons, config.mlp_hidden_layers
            )

    def forward(self, dirs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if dirs.shape[-1] != 3:
            raise ValueError(f"dirs must have shape [..., 3], got {tuple(dirs.shape)}")
        unit = F.normalize(dirs, dim=-1)
        color = torch.sigmoid(self.network(spherical_harmonics(unit, self.config.sh_degree)))
        cfg = self.config
        if self.training and cfg.random_aug and cfg.random_aug_prob > 0:
            draw = torch.rand((), generator=generator, device="cpu" if generator is None else generator.device)
            if float(draw) < cfg.random_aug_prob:
                if dirs.dim() >= 3:
                    shape = (dirs.shape[0],) + (1,) * (dirs.dim() - 2) + (cfg.n_output_dims,)
                else:
                    shape = (1,) * (dirs.dim() - 1) + (cfg.n_output_dims,)
                solid = torch.rand(shape, generator=generator, device=draw.device).to(color)
                color = color * 0 + solid  # keeps the graph (zero gradient), as threestudio does
        return color

    def parameter_groups(self, lr: float = 0.001) -> list[dict]:
        return [{"params": list(self.network.parameters()), "lr": lr, "name": "background"}]


class SolidBackground(nn.Module):
    """One fixed colour behind the object (threestudio's ``solid-color-background`` with ``learned: false``), for a
    prior that only ever saw one background — the toy world's white.  No parameters: nothing to learn, and no
    random colour augmentation, which would show such a prior backgrounds it does not know."""

    def __init__(self, color=(1.0, 1.0, 1.0)):
        super().__init__()
        color = torch.as_tensor(color, dtype=torch.float32).flatten()
        if color.shape != (3,) or not bool(((color >= 0) & (color <= 1)).all()):
            raise ValueError(f"background color must be three numbers in [0, 1] (R, G, B); got {color.tolist()}")
        self.register_buffer("color", color)

    def forward(self, dirs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if dirs.shape[-1] != 3:
            raise ValueError(f"dirs must have shape [..., 3], got {tuple(dirs.shape)}")
        return self.color.to(dirs).expand(dirs.shape)

    def parameter_groups(self, lr: float = 0.001) -> list[dict]:
        return []


class TextureField(nn.Module):
    """The texture stage's colour field (threestudio ``tetrahedra-sdf-grid`` appearance + ``no-material``): world
    points in ``[-radius, radius]^3`` -> ``[0, 1]^3`` (clamped) -> hash grid -> MLP -> sigmoid.

    ``forward(points [N, 3], directions=None) -> {"rgb": [N, 3]}`` (view-independent), so it plugs into
    :class:`MeshRenderer` and :func:`l2vsd_core.export.bake_texture` like a stage-1 field.
    """

    def __init__(self, radius: float = 1.0, hashgrid: Optional[HashGridConfig] = None, backend: str = "auto",
                 mlp_neurons: int = 64, mlp_hidden_layers: int = 1, seed: Optional[int] = None):
        super().__init__()
        if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be a finite number > 0; got {radius!r}")
        self.radius = float(radius)
        self.encoding = make_hashgrid(hashgrid or HashGridConfig(), backend=backend, seed=seed)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):  # reproducible, global RNG untouched
            if seed is not None:
                torch.manual_seed(int(seed))
            self.feature_network = VanillaMLP(self.encoding.n_output_dims, 3, mlp_neurons, mlp_hidden_layers)

    def forward(self, points: torch.Tensor, directions: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        unit = ((points + self.radius) / (2.0 * self.radius)).clamp(0.0, 1.0)
        enc = self.encoding(unit).to(points.dtype)
        return {"rgb": torch.sigmoid(self.feature_network(enc))}

    def parameter_groups(self, lr_encoding: float = 0.01, lr_network: float = 0.001) -> list[dict]:
        return [{"params": list(self.encoding.parameters()), "lr": lr_encoding, "name": "texture.encoding"},
                {"params": list(self.feature_network.parameters()), "lr": lr_network,
                 "name": "texture.feature_network"}]
