"""The frozen diffusion prior ε_pre: a diffusers UNet (+ VAE, text encoder, tokenizer) behind the engine's
``FrozenScore`` protocol (``prior(x_t, t, text) → raw output``, ``prediction_type``, ``alphas_cumprod``).

Precision.  One dtype for every component (UNet, VAE, text encoder): ``"auto"`` is fp16 on CUDA and fp32 on CPU, as
threestudio runs SD in fp16 (``half_precision_weights``).  The SD 1.x/2.x VAE is fine in fp16 at 512²; outputs are
returned in the caller's dtype (the NeRF's fp32), so only the network itself runs in reduced precision.

Shared UNet.  The trainable score (the LoRA) may reuse this UNet: it adds peft adapters and a camera
``class_embedding`` to it.  Every prior call runs inside :meth:`DiffusionPrior.pretrained_mode`, which disables the
adapters and removes the class embedding for the duration of the call, then restores both (threestudio's shared
pipeline, with peft instead of ``cross_attention_kwargs={"scale": 0}``).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional, Sequence, Union

import torch

PRIOR_PREDICTION_TYPES = ("epsilon", "v_prediction")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------- device and dtype
def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``"auto"`` (or None) → cuda if available, else cpu; anything else is passed to ``torch.device``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', … ; got {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for CUDA, but torch sees no CUDA device; use 'cpu' or 'auto'")
    return resolved


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """``"auto"`` → fp16 on CUDA, fp32 elsewhere; ``"fp32"``/``"fp16"``/``"bf16"`` or a torch float dtype.

    fp16 on CPU is refused: half-precision convolutions are slow or missing there; fp32 or bf16 work.
    """
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
        resolved = DTYPES[dtype]
    elif isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        resolved = dtype
    else:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    if resolved == torch.float16 and device.type == "cpu":
        raise ValueError("dtype fp16 is not supported on CPU (half-precision kernels are missing or very slow there); "
                         "use 'fp32' or 'bf16' on CPU, or 'auto'")
    return resolved


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PRIOR_PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PRIOR_PREDICTION_TYPES)}; "
                         f"got {prediction_type!r}")
    return prediction_type


def alphas_cumprod_from_scheduler_config(config: dict) -> torch.Tensor:
    """ᾱ_t, t = 0 … T−1, from a diffusers scheduler config (``beta_start/beta_end/beta_schedule`` incl.
    ``scaled_linear`` and ``squaredcos_cap_v2``, ``trained_betas``, ``rescale_betas_zero_snr``), computed by diffusers'
    own DDPMScheduler so that it matches the model's training schedule exactly."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr")
    kwargs = {k: config[k] for k in keys if k in config and config[k] is not None}
    try:
        scheduler = DDPMScheduler(**kwargs)
    except NotImplementedError as exc:
        raise ValueError(f"unsupported beta_schedule {config.get('beta_schedule')!r} in the scheduler config") from exc
    return scheduler.alphas_cumprod.detach().clone().float()


# ------------------------------------------------------------------------------------------------------- the prior
class DiffusionPrior(torch.nn.Module):
    """A frozen text-conditioned diffusion model usable as the engine's ``FrozenScore``.

    ``unet``: a diffusers ``UNet2DConditionModel``; ``vae``: an ``AutoencoderKL`` or None for a pixel-space prior;
    ``text_encoder`` / ``tokenizer``: transformers models (CLIP for SD 1.x/2.x); ``scheduler_config``: the training
    noise schedule (a diffusers scheduler config dict).  Components are moved to ``device``/``dtype`` and frozen.
    """

    def __init__(self, unet, scheduler_config: dict, text_encoder, tokenizer, vae=None,
                 prediction_type: Optional[str] = None, device: Union[str, torch.device] = "auto",
                 dtype: Union[str, torch.dtype] = "auto", name: str = ""):
        super().__init__()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.prediction_type = check_prediction_type(
            prediction_type if prediction_type is not None else scheduler_config.get("prediction_type", "epsilon"))
        self.name = name
        self.scheduler_config = dict(scheduler_config)
        for module in (unet, vae, text_encoder):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
                module.to(device=self.device)
                if any(p.is_floating_point() and p.dtype != self.dtype for p in module.parameters()):
                    module.to(dtype=self.dtype)
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        # A plain attribute, not a buffer: see distill.FrozenScore.
        self.alphas_cumprod = alphas_cumprod_from_scheduler_config(scheduler_config).to(self.device)
        self._uncond_cache: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD); 1 for a pixel-space prior."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The resolution the model was trained at, in pixels (512 for SD 1.5 / 2.1-base, 768 for 2.1-v)."""
        sample = self.unet.config.sample_size
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return int(sample) * self.vae_scale_factor

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    @property
    def max_text_length(self) -> int:
        """Tokens per prompt incl. start/end (77 for CLIP)."""
        limits = [getattr(self.text_encoder.config, "max_position_embeddings", None),
                  getattr(self.tokenizer, "model_max_length", None)]
        limits = [int(v) for v in limits if v is not None and 0 < v < 100_000]
        if not limits:
            raise ValueError("cannot tell the text encoder's maximum prompt length (no max_position_embeddings and "
                             "no tokenizer model_max_length)")
        return min(limits)

    # ---------------------------------------------------------------------------------------- pretrained mode
    @contextlib.contextmanager
    def pretrained_mode(self) -> Iterator[None]:
        """Run the UNet as the pretrained model: peft adapters disabled and no ``class_embedding`` inside the block;
        the previous state (adapters enabled or not, the class embedding) is restored on exit, also on error."""
        unet = self.unet
        active_layers = _active_peft_layers(unet)
        # peft's enable_adapters(True) also sets requires_grad=True on the active adapters: remember the flags
        flags = [(p, p.requires_grad) for layer in active_layers for p in layer.parameters()]
        class_embedding = getattr(unet, "class_embedding", None)
        for layer in active_layers:
            layer.enable_adapters(False)
        if class_embedding is not None:
            unet.class_embedding = None
        try:
            yield
        finally:
            if class_embedding is not None:
                unet.class_embedding = class_embedding
            for layer in active_layers:
                layer.enable_adapters(True)
            for param, requires_grad in flags:
                param.requires_grad_(requires_grad)

    # ------------------------------------------------------------------------------------------------- the score
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: Optional[torch.Tensor]) -> torch.Tensor:
        """The UNet's raw output (ε or v, see ``prediction_type``) for ``x_t`` [B, C, h, w] at integer timesteps
        ``t`` [B] (or a scalar) and text embeddings ``text`` [B, L, D] (None → the empty prompt's embedding).
        Computed in the prior's dtype on its device; returned in ``x_t``'s dtype and device."""
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=self.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if text is None:
            text = self.unconditional_embedding().expand(batch, -1, -1)
        with self.pretrained_mode():
            out = self.unet(x_t.to(self.device, self.dtype), t,
                            encoder_hidden_states=text.to(self.device, self.dtype), return_dict=False)[0]
        return out.to(device=x_t.device, dtype=x_t.dtype)

    # ---------------------------------------------------------------------------------------------- images ↔ x0
    def encode_images(self, rgb: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """RGB [B, 3, H, W] in [0, 1] → the prior's x0, differentiable w.r.t. ``rgb``.

        Latent priors: a VAE posterior *sample* × ``vae.config.scaling_factor`` (threestudio), [B, C, H/f, W/f];
        pixel priors: ``rgb·2 − 1``.  No resizing: pass the resolution the model expects (``image_size``).
        Returned in ``rgb``'s dtype.
        """
        if rgb.dim() != 4 or rgb.shape[1] != 3:
            raise ValueError(f"encode_images expects rgb [B, 3, H, W] in [0, 1]; got shape {tuple(rgb.shape)}")
        x = rgb * 2.0 - 1.0
        if self.vae is None:
            return x
        posterior = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return (latents * self.scaling_factor).to(device=rgb.device, dtype=rgb.dtype)

    def decode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The prior's x0 → RGB [B, 3, H, W] in [0, 1] (differentiable; clamped), in ``x``'s dtype."""
        if self.vae is None:
            return ((x + 1.0) / 2.0).clamp(0.0, 1.0)
        z = x.to(self.device, self.dtype) / self.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            z = z + shift
        image = self.vae.decode(z, return_dict=False)[0]
        return ((image + 1.0) / 2.0).clamp(0.0, 1.0).to(device=x.device, dtype=x.dtype)

    # ------------------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def encode_text(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Prompts → text-encoder hidden states [B, L, D] (L = ``max_text_length``, padded), in the prior's dtype.

        A prompt longer than the limit is truncated with a warning naming the limit.  The empty string is allowed:
        it is the unconditional embedding used for CFG.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"encode_text expects a non-empty list of strings; got {prompts!r}")
        limit = self.max_text_length
        for prompt in prompts:
            n = len(self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
            if n > limit:
                warnings.warn(f"prompt {_short(prompt)} is {n} tokens long, but the text encoder takes at most "
                              f"{limit} tokens (incl. start/end); it was truncated to {limit}", stacklevel=2)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=limit, truncation=True,
                                return_tensors="pt")
        hidden = self.text_encoder(tokens["input_ids"].to(self.device), return_dict=False)[0]
        return hidden.to(self.dtype)

    def unconditional_embedding(self) -> torch.Tensor:
        """The empty prompt's embedding [1, L, D] (cached)."""
        if self._uncond_cache is None:
            self._uncond_cache = self.encode_text([""])
        return self._uncond_cache

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, prediction_type={self.prediction_type!r}, is_latent={self.is_latent}, "
                f"device={self.device}, dtype={self.dtype}")


def _active_peft_layers(module) -> list:
    """The peft tuner layers of ``module`` whose adapters are currently enabled (toggled layer by layer, so this works
    for ``unet.add_adapter`` as well as for adapters injected with peft directly)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: no adapters can be attached
        return []
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "…")
