"""The trainable score ε_φ of VSD / L²-VSD: a camera-conditioned LoRA on a diffusers ``UNet2DConditionModel``.

``LoRAScore`` implements the engine's ``TrainableScore`` protocol (``distill.py``), following threestudio's VSD
guidance (``notes/anchors.md`` §1.4):

- **LoRA** through peft (``unet.add_adapter(LoraConfig(r, lora_alpha, target_modules=[to_q, to_k, to_v, to_out.0]))``),
  peft's default init (B = 0), so at the start the LoRA adds nothing to the base UNet.
- **Camera embedding**: a ``TimestepEmbedding(16, time_embed_dim)`` (Linear → SiLU → Linear) of the flattened 4×4
  camera-to-world matrix, added to the time embedding as the UNet's *class embedding* (``class_labels=camera``).  A
  zero camera means "unconditioned" (ESD's branch, camera dropout).  Its last Linear starts at zero
  (``zero_init_camera=True``), so that ε_φ starts *exactly* at the base UNet for every camera; threestudio keeps
  PyTorch's default init there (``zero_init_camera=False``).
- **Loss** (threestudio's ``train_lora``): x0 detached, t′ ~ U{0, …, T−1}, ε′ ~ N(0, I), target ε′
  (ε-prediction) or the velocity √ᾱ ε′ − √(1−ᾱ) x0 (v-prediction), the camera zeroed with probability
  ``camera_dropout`` *per sample* (threestudio zeroes the whole batch with probability 0.1; the same for its batch
  size 1), MSE mean.
  Random draws come from ``self.generator`` (seeded by ``seed``) in the order t′, ε′, dropout.
- Under a float16 / bfloat16 UNet the trainable weights are kept in float32 (peft's LoRA casts its input to them).
- **Optimizer**: AdamW over the LoRA and camera-embedding parameters (lr 1e-4, betas (0.9, 0.99), eps 1e-15: the
  ``guidance`` group of threestudio's ProlificDreamer config).

Two ways to hold the UNet:

- *separate* (threestudio's default): the LoRA sits on its own base UNet (SD-2.1, v-prediction, for an SD-2.1-base
  prior); the UNet then belongs to this module.
- *shared*: the LoRA sits on the prior's own UNet (less memory).  The prior must call it with adapters disabled and
  without class embedding.  This module keeps the UNet as a plain prior between its calls: the camera embedding is
  installed as ``unet.class_embedding`` only inside ``forward`` and the previous value restored afterwards, and
  ``forward`` runs the LoRA enabled whatever the adapters' enable flag was, restoring that flag afterwards.  The
  flag is flipped directly (``BaseTunerLayer._disable_adapters``) rather than through peft's ``enable_adapters``,
  which also sets ``requires_grad`` on the LoRA weights — a side effect that must not happen inside
  ``torch.func.functional_call`` / ``torch.func.jvp`` (the LoRA weights are then substituted tensors).

``lookahead_parameters("last")`` — the paper's "last layer" variant (sec. 5.4.2).  The LoRA on a UNet has no single
last layer; threestudio's LoRA (which the paper's code builds on) is one LoRA processor per attention module (q, k,
v, out), so its "layer" is an attention module.  ``"last"`` is therefore the LoRA of the last attention module in
*forward* order: the cross-attention (``attn2``) of the last transformer block of the last attention of the last
up-block (for SD: ``up_blocks.3.attentions.2.transformer_blocks.0.attn2``; note that ``named_modules()`` lists the
mid-block after the up-blocks, so "last by name" would be wrong).  ``last_layer`` picks another cut.

Cost (one J·v over one LoRA forward, exact modes) and closeness to the full J·v (‖J·v_last‖ / ‖J·v_all‖,
cosine; v = −∇L_lora, float64, random LoRA and camera weights, so only indicative): (a) notes/jvp.md, a 1.5
M-parameter UNet;
(b) the tests' 0.8 M-parameter UNet at 16×16 latents, 2 cores, 2 seeds (measured once, by hand, not in the suite):

=====================  ===============================  ================  ====================================
``last_layer``         LoRA parameters                  cost (a) / (b)    norm ratio, cosine (a) / (b)
=====================  ===============================  ================  ====================================
``lora_module``        last to_out.0                    1.2× / 2.4–2.7×   0.03, 0.77 / 0.02–0.11, 0.39–0.52
``attention``          last attention (q, k, v, out)    — / 2.5–3.1×      — / 0.12–0.27, 0.33–0.44
``transformer_block``  last transformer block           4–8× / 3.4–4.2×   0.63, 0.76 / 0.17–0.38, 0.65–0.70
``up_block``           last up-block                    7–10× / 4.0–5.2×  0.79, 0.89 / 0.50–0.52, 0.92–0.97
scope ``"all"``        every LoRA + camera embedding    7–17× / 6.1–7.3×  1, 1
=====================  ===============================  ================  ====================================

On the tiny UNet the fixed overhead of the tangent pass (math attention, dual tensors) dominates, so the cheap cuts
cost about the same there; (a) did not measure the last attention.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LAST_LAYERS = ("lora_module", "attention", "transformer_block", "up_block")
PREDICTION_TYPES = ("epsilon", "v_prediction")
CAMERA_DIM = 16


def _require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


class LoRAScore(nn.Module):
    """ε_φ: a peft LoRA + camera embedding on a diffusers ``UNet2DConditionModel`` (engine ``TrainableScore``).

    ``unet``: the base UNet (a separate one, or the prior's own to share it); its weights are frozen.
    ``alphas_cumprod``: ᾱ_t, t = 0 … T−1, of the base model's scheduler; ``prediction_type``: "epsilon" or
    "v_prediction" (the base model's scheduler config).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", *,
                 rank: int = 4, alpha: Optional[float] = None, lr: float = 1e-4, betas=(0.9, 0.99),
                 eps: float = 1e-15, weight_decay: float = 0.01, camera_dropout: float = 0.1, seed: int = 0,
                 adapter_name: str = "l2vsd", last_layer: str = "attention", zero_init_camera: bool = True):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        _require(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1, "rank", rank,
                 "an integer >= 1 (LoRA rank; threestudio uses 4)")
        alpha = float(rank if alpha is None else alpha)
        _require(alpha > 0, "alpha", alpha, "a number > 0 (LoRA scale = alpha / rank)")
        _require(prediction_type in PREDICTION_TYPES, "prediction_type", prediction_type,
                 f"one of {', '.join(PREDICTION_TYPES)}")
        _require(0.0 <= camera_dropout <= 1.0, "camera_dropout", camera_dropout, "a number in [0, 1]")
        _require(lr > 0, "lr", lr, "a number > 0")
        _require(last_layer in LAST_LAYERS, "last_layer", last_layer, f"one of {', '.join(LAST_LAYERS)}")
        if getattr(unet, "class_embedding", None) is not None or unet.config.get("class_embed_type") is not None \
                or unet.config.get("num_class_embeds") is not None:
            raise ValueError("unet already has a class embedding; LoRAScore needs its class-embedding slot for the "
                             "camera embedding")
        existing = getattr(unet, "peft_config", None) or {}
        if adapter_name in existing:
            raise ValueError(f"unet already has an adapter named {adapter_name!r}: one LoRAScore per UNet and "
                             f"adapter name (pass another adapter_name)")

        self.prediction_type = prediction_type
        self.adapter_name = adapter_name
        self.camera_dropout = float(camera_dropout)
        self.last_layer = last_layer
        # A plain attribute, not a buffer: see distill.FrozenScore.
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().clone().float()

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS)),
                         adapter_name=adapter_name)
        self.unet = unet
        param = next(unet.parameters())
        self._unet_dtype = param.dtype
        time_embed_dim = unet.time_embedding.linear_2.out_features
        # Trainable weights (camera here, LoRA below) are kept in fp32 under a half-precision UNet; the UNet casts
        # the class embedding to its own dtype.
        cam_dtype = torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype
        self.camera_embedding = TimestepEmbedding(CAMERA_DIM, time_embed_dim).to(param.device, cam_dtype)
        if zero_init_camera:
            nn.init.zeros_(self.camera_embedding.linear_2.weight)
            nn.init.zeros_(self.camera_embedding.linear_2.bias)

        # Our LoRA layers and trainable parameter names (fixed now: peft's enable/disable toggles requires_grad).
        self._lora_layers = [m for m in unet.modules()
                             if isinstance(m, BaseTunerLayer) and adapter_name in getattr(m, "lora_A", {})]
        tag = f".{adapter_name}."
        self._lora_names = [n for n, _ in self.named_parameters()
                            if n.startswith("unet.") and (".lora_A" + tag in n or ".lora_B" + tag in n)]
        self._trainable_names = self._lora_names + [f"camera_embedding.{n}"
                                                    for n, _ in self.camera_embedding.named_parameters()]
        params = dict(self.named_parameters())
        for n in self._trainable_names:
            if params[n].dtype in (torch.float16, torch.bfloat16):
                params[n].data = params[n].data.float()  # peft's LoRA casts its input to the LoRA weights' dtype
            params[n].requires_grad_(True)
        self._last_names = self._find_last(last_layer)
        # Looked up once: scanning the whole UNet's parameters on every step would sit on the hot path.
        self._trainable = {n: params[n] for n in self._trainable_names}

        self.generator = torch.Generator().manual_seed(int(seed))
        self.optimizer = torch.optim.AdamW([params[n] for n in self._trainable_names], lr=lr, betas=tuple(betas),
                                           eps=eps, weight_decay=weight_decay)

    # ------------------------------------------------------------------------------------------------ structure
    def _find_last(self, last_layer: str) -> list[str]:
        """LoRA parameter names of the "last layer" (see the module docstring), in forward order of the UNet."""
        up = [(i, b) for i, b in enumerate(self.unet.up_blocks) if getattr(b, "attentions", None)]
        if not up:
            raise ValueError("unet has no up-block with attention: no LoRA 'last layer' to take")
        i, block = up[-1]
        j = len(block.attentions) - 1
        tb = block.attentions[j].transformer_blocks
        k = len(tb) - 1
        attn = "attn2" if getattr(tb[k], "attn2", None) is not None else "attn1"
        prefix = {
            "up_block": f"unet.up_blocks.{i}.",
            "transformer_block": f"unet.up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.",
            "attention": f"unet.up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.{attn}.",
            "lora_module": f"unet.up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.{attn}.to_out.0.",
        }[last_layer]
        names = [n for n in self._lora_names if n.startswith(prefix)]
        assert names, prefix
        return names

    def lookahead_parameters(self, scope: str) -> dict[str, nn.Parameter]:
        """``"all"``: every trainable parameter (LoRA + camera embedding); ``"last"``: the LoRA of the last layer."""
        if scope not in ("all", "last"):
            raise ValueError(f"scope must be one of all, last; got {scope!r}")
        return {n: self._trainable[n] for n in (self._trainable_names if scope == "all" else self._last_names)}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA and camera-embedding weights only (what a checkpoint of φ needs)."""
        return {n: p.detach().clone() for n, p in self._trainable.items()}

    # ----------------------------------------------------------------------------------------------------- calls
    @contextlib.contextmanager
    def _lora_on(self):
        """The UNet as ε_φ for one call: our adapter on, camera embedding as class embedding; restored after."""
        for layer in self._lora_layers:
            if self.adapter_name not in layer.active_adapters:
                raise RuntimeError(f"LoRA adapter {self.adapter_name!r} is not active on the UNet (active: "
                                   f"{layer.active_adapters}); do not switch the UNet's adapters while LoRAScore "
                                   f"uses it")
        disabled = [layer._disable_adapters for layer in self._lora_layers]
        previous = self.unet.class_embedding
        try:
            for layer in self._lora_layers:
                layer._disable_adapters = False
            self.unet.class_embedding = self.camera_embedding
            yield
        finally:
            self.unet.class_embedding = previous
            for layer, flag in zip(self._lora_layers, disabled):
                layer._disable_adapters = flag

    def _camera(self, camera: Optional[torch.Tensor], batch: int, like: torch.Tensor) -> torch.Tensor:
        dtype = self.camera_embedding.linear_1.weight.dtype
        if camera is None:
            return torch.zeros(batch, CAMERA_DIM, device=like.device, dtype=dtype)
        camera = camera.reshape(camera.shape[0], -1)
        if camera.shape != (batch, CAMERA_DIM):
            raise ValueError(f"camera must be [B, 16] or [B, 4, 4] (flattened camera-to-world) with B = {batch}; got "
                             f"shape {tuple(camera.shape)}")
        return camera.to(device=like.device, dtype=dtype)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: Optional[torch.Tensor],
                camera: Optional[torch.Tensor]) -> torch.Tensor:
        """Raw UNet output (ε or v, per ``prediction_type``) with the LoRA on and the camera as class label.

        Computed in the UNet's dtype (fp16 on CUDA), returned in ``x_t``'s dtype (the render's fp32), like the prior."""
        if text is None:
            raise ValueError("text must be the text-encoder embeddings [B, L, D]; the UNet needs a condition")
        cam = self._camera(camera, x_t.shape[0], x_t)
        dtype = self._unet_dtype
        with self._lora_on():
            out = self.unet(x_t.to(dtype), t, encoder_hidden_states=text.to(dtype), class_labels=cam,
                            return_dict=False)[0]
        return out.to(x_t.dtype)

    def draw(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss's random draws from ``self.generator``, in this order: t′ ~ U{0, …, T−1} [B], ε′ like x0, and
        which cameras are kept ([B] bool, each dropped with probability ``camera_dropout``)."""
        batch, g = x0.shape[0], self.generator
        t = torch.randint(0, self.alphas_cumprod.shape[0], (batch,), generator=g).to(x0.device)
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
        keep = (torch.rand(batch, generator=g) >= self.camera_dropout).to(x0.device)
        return t, noise, keep

    def loss(self, x0: torch.Tensor, text: Optional[torch.Tensor], camera: Optional[torch.Tensor]) -> torch.Tensor:
        """threestudio's ``train_lora``: denoising loss on the detached render at a fresh t′, ε′; camera dropout."""
        x0 = x0.detach()
        for p in self._trainable.values():  # peft's disable_adapters() (a prior call in shared mode) clears these
            if not p.requires_grad:
                p.requires_grad_(True)
        batch = x0.shape[0]
        t, noise, keep = self.draw(x0)
        cam = self._camera(camera, batch, x0)
        cam = cam * keep.to(cam.dtype)[:, None]
        a_bar = self.alphas_cumprod.to(x0.device)[t].reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        x_t = a_bar.sqrt() * x0 + (1 - a_bar).sqrt() * noise
        target = noise if self.prediction_type == "epsilon" else a_bar.sqrt() * noise - (1 - a_bar).sqrt() * x0
        out = self(x_t, t, text, cam)
        return F.mse_loss(out.float(), target.float(), reduction="mean")

    def loss_elements(self, x0: torch.Tensor) -> int:
        """How many squared residuals :meth:`loss` averages (the ``paper`` lookahead sums them)."""
        return x0.numel()

    def step(self) -> None:
        """One AdamW step on the accumulated gradients, then clear them."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
