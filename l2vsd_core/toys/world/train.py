"""Train the world's pixel-space text-to-image diffusion prior on CPU, resumably, and export it as a diffusers folder.

Model.  A diffusers ``UNet2DConditionModel`` on 32×32 RGB (channels 32/64/128, one ResNet per level, cross-attention
at 16×16 and 8×8 and in the middle; ≈4.1 M parameters) and a 2-layer ``CLIPTextModel`` (hidden 64, 16 tokens),
trained jointly from scratch.  The tokenizer is the CLIP BPE shipped in ``l2vsd_core/prior/configs/clip_tokenizer``
(SD 1.x special tokens, padding with ``<|endoftext|>``), with ``model_max_length`` 16: the longest caption is 10
tokens with start and end, and the prior pads every prompt to that length exactly as here
(``DiffusionPrior.encode_text``).

Objective.  DDPM, 1000 steps, **linear** betas 1e-4 → 0.02 (the pixel-space DDPM schedule; SD's ``scaled_linear`` is
tuned for latents, whose signal is weaker), v-prediction (``prediction_type``; ε was the first objective, see
``TrainConfig``); x0 = rgb·2 − 1, what the prior's ``encode_images`` gives for a pixel-space model.  Captions become ``""`` with probability ``cfg_drop`` (0.1) so that the empty prompt —
the product's default negative prompt — is the unconditional model for classifier-free guidance.

Optimisation.  AdamW (lr 2e-4 after a linear warm-up, gradient norm clipped at 1), EMA of the UNet and text-encoder
weights (decay 0.999, warmed up as ``(1 + n) / (10 + n)``, n the steps since the EMA started: at step 0, or where
``--init-from`` changed the objective); exports use the EMA weights.

Reproducible and resumable.  Model init comes from ``seed``; everything random in step k (the batch, the caption
drop, noise and timesteps) comes from generators seeded by (seed, k).  So a run resumed from step k's checkpoint does
exactly what the uninterrupted run would have done.  The checkpoint is one safetensors file (weights, EMA, AdamW
moments) whose metadata holds the step and the config as JSON — no pickle anywhere — replaced atomically.

Files (``train_dir``, default ``out/world_prior_train/``): ``checkpoint.safetensors``, ``train.log`` (one line per
``log_every`` steps: step, loss, lr, steps/hour), ``samples_STEP.png`` (one row per prompt, DDIM 25 steps,
``SAMPLE_GUIDANCE``).
The export (default ``l2vsd_core/toys/world/prior/``): model_index.json, unet/, text_encoder/, tokenizer/,
scheduler/ and no vae, weights as fp16 safetensors (they load back as fp32); it is replaced as a whole.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ...files import atomic_write_bytes
from ...prior.load import BUNDLED_PRIORS, CLIP_TOKENIZER_DIR
from .data import batch_generator, drop_captions, make_batch

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_EXPORT_DIR = BUNDLED_PRIORS["toy"]  # the prior loader owns where the bundled prior lives
DEFAULT_TRAIN_DIR = Path("out") / "world_prior_train"
CHECKPOINT_NAME = "checkpoint.safetensors"
TEXT_LENGTH = 16
PREDICTION_TYPES = ("v_prediction", "epsilon")


def scheduler_config(prediction_type: str) -> dict:
    """The DDPM schedule the prior is trained and sampled with (exported as ``scheduler/scheduler_config.json``)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r}: use one of {PREDICTION_TYPES}")
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
            "beta_schedule": "linear", "prediction_type": prediction_type, "clip_sample": True,
            "clip_sample_range": 1.0}


# Samples show the prior's conditional distribution (guidance 1): this small pixel-space prior oversaturates under
# classifier-free guidance above ≈ 2 (measured: a red cube at CFG 5 comes out as a red frame around white).
SAMPLE_GUIDANCE = 1.0
SAMPLE_PROMPTS = ("a red cube, front view", "a blue sphere, side view", "a green cone, front view",
                  "a yellow torus, back view", "a purple cylinder, side view", "a white octahedron, front view")

# Model sizes: "default" is the real prior; "tiny" exists so tests can train and export in seconds.
MODEL_SIZES = {
    "default": {"unet_channels": (32, 64, 128), "text_hidden": 64, "text_layers": 2, "attention_heads": 4},
    "tiny": {"unet_channels": (8, 16, 16), "text_hidden": 16, "text_layers": 1, "attention_heads": 2},
}


@dataclass
class TrainConfig:
    steps: int = 20000
    batch_size: int = 32
    lr: float = 2e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_drop: float = 0.1
    # v-prediction: at high noise an ε-model must output almost exactly x_t/σ and its small errors become large x0
    # errors (measured: the ε prior was worse than that trivial predictor above t ≈ 720, and sampled frame-filling
    # colour); v's target there is the mean image, which a small UNet learns.
    prediction_type: str = "v_prediction"
    seed: int = 0
    model: str = "default"
    checkpoint_every: int = 200
    export_every: int = 500
    log_every: int = 10
    sample_grid: bool = True
    train_dir: Path = field(default=DEFAULT_TRAIN_DIR)
    export_dir: Path = field(default=DEFAULT_EXPORT_DIR)

    def to_json(self) -> dict:
        out = asdict(self)
        out["train_dir"], out["export_dir"] = str(self.train_dir), str(self.export_dir)
        return out


# ------------------------------------------------------------------------------------------------------ models
def build_tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer(str(CLIP_TOKENIZER_DIR / "vocab.json"), str(CLIP_TOKENIZER_DIR / "merges.txt"),
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                         pad_token="<|endoftext|>", model_max_length=TEXT_LENGTH)


def write_tokenizer_folder(folder: Path) -> Path:
    """The tokenizer as vocab.json + merges.txt + tokenizer_config.json: the shipped files as they are (with their
    licence), 1.5 MB instead of the 3.6 MB tokenizer.json that ``save_pretrained`` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "LICENSE"):
        shutil.copyfile(CLIP_TOKENIZER_DIR / name, folder / name)
    settings = {"tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": TEXT_LENGTH,
                "do_lower_case": True, "add_prefix_space": False, "errors": "replace"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return folder


def build_models(model: str, seed: int):
    """(unet, text_encoder), freshly initialised from ``seed``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    size = MODEL_SIZES[model]
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=size["text_hidden"], intermediate_size=4 * size["text_hidden"],
        num_attention_heads=size["attention_heads"], num_hidden_layers=size["text_layers"],
        max_position_embeddings=TEXT_LENGTH, hidden_act="quick_gelu", projection_dim=size["text_hidden"],
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=size["unet_channels"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=size["text_hidden"], attention_head_dim=size["attention_heads"],
        norm_num_groups=min(8, min(size["unet_channels"])))
    return unet, text_encoder


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TextCache:
    """Token ids per caption, computed once (the slow Python tokenizer would otherwise run every step)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ids: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._ids]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                                 return_tensors="pt")["input_ids"]
            self._ids.update(zip(missing, ids))
        return torch.stack([self._ids[c] for c in captions])


# ------------------------------------------------------------------------------------------------- the state
class Trainer:
    """Models, optimizer, EMA and step counter; one :meth:`train_step` per optimizer step."""

    def __init__(self, config: TrainConfig):
        from diffusers import DDPMScheduler

        self.config = config
        self.unet, self.text_encoder = build_models(config.model, config.seed)
        self.tokens = TextCache(build_tokenizer())
        self.alphas_cumprod = DDPMScheduler.from_config(
            scheduler_config(config.prediction_type)).alphas_cumprod.float()
        self.parameters = {**{f"unet.{k}": p for k, p in self.unet.named_parameters()},
                           **{f"text_encoder.{k}": p for k, p in self.text_encoder.named_parameters()}}
        self.optimizer = torch.optim.AdamW(list(self.parameters.values()), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.ema = {k: p.detach().clone() for k, p in self.parameters.items()}
        self.step = 0   # optimizer steps done
        self.ema_start = 0   # the step the EMA (re)started from: its warm-up counts from here

    def lr_at(self, step: int) -> float:
        return self.config.lr * min(1.0, (step + 1) / max(1, self.config.warmup_steps))

    def loss(self, step: int) -> torch.Tensor:
        """The denoising loss (ε or v target, per ``prediction_type``) of step ``step``'s batch (everything random
        drawn from (seed, step))."""
        cfg = self.config
        batch = make_batch(cfg.seed, step, cfg.batch_size)
        generator = batch_generator(cfg.seed + 7919, step)   # a stream apart from the data's
        captions = drop_captions(batch.captions, cfg.cfg_drop, generator)
        x0 = batch.images * 2 - 1
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), generator=generator)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        text = self.text_encoder(self.tokens(captions), return_dict=False)[0]
        prediction = self.unet(x_t, t, encoder_hidden_states=text, return_dict=False)[0]
        target = noise if cfg.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        return F.mse_loss(prediction, target)

    def train_step(self) -> float:
        self.unet.train()
        self.text_encoder.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss = self.loss(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.parameters.values()), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        since = self.step - self.ema_start
        decay = min(self.config.ema_decay, (1 + since) / (10 + since))
        with torch.no_grad():
            for k, p in self.parameters.items():
                self.ema[k].lerp_(p.detach(), 1 - decay)
        return float(loss.detach())

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything as flat named tensors: ``model.*``, ``ema.*``, ``optim.<param name>.<exp_avg|…>``."""
        out = {f"model.{k}": p.detach().contiguous() for k, p in self.parameters.items()}
        out.update({f"ema.{k}": v.contiguous() for k, v in self.ema.items()})
        names = list(self.parameters)
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                out[f"optim.{names[index]}.{key}"] = torch.as_tensor(value).contiguous()
        return out

    def save_checkpoint(self, path: Path) -> Path:
        from safetensors.torch import save
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.state_dict()["param_groups"]]
        metadata = {"step": str(self.step), "ema_start": str(self.ema_start),
                    "config": json.dumps(self.config.to_json()),
                    "param_groups": json.dumps(groups)}
        return atomic_write_bytes(path, save(self.state_tensors(), metadata=metadata))

    def load_checkpoint(self, path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(path))
        saved = {"prediction_type": "epsilon", **json.loads(metadata["config"])}   # older checkpoints: ε
        for key in ("model", "seed", "batch_size", "prediction_type"):
            if saved[key] != getattr(self.config, key):
                raise ValueError(f"{path} was trained with {key}={saved[key]!r}, this run has "
                                 f"{getattr(self.config, key)!r}; resume with the same {key}")
        with torch.no_grad():
            for k, p in self.parameters.items():
                p.copy_(tensors[f"model.{k}"])
                self.ema[k].copy_(tensors[f"ema.{k}"])
        names = list(self.parameters)
        state = {}
        for index, name in enumerate(names):
            prefix = f"optim.{name}."
            entries = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if entries:
                state[index] = entries
        groups = json.loads(metadata["param_groups"])
        groups[0]["params"] = list(range(len(names)))
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.step = int(metadata["step"])
        self.ema_start = int(metadata.get("ema_start", 0))

    def init_from_export(self, folder: Path) -> None:
        """Continue from an exported prior alone (its EMA weights become the weights and the EMA; fresh AdamW
        moments; the step it records): the full checkpoint, with the optimizer state, is too large to commit, so a
        fresh machine has only the export."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        folder = Path(folder)
        state_file = folder / TRAINING_STATE
        if not state_file.is_file():
            raise FileNotFoundError(f"--init-from: {folder} has no {TRAINING_STATE} (the step it was exported at); "
                                    f"export it again with `python -m l2vsd_core.toys.world export`")
        state = json.loads(state_file.read_text())
        for key in ("model", "seed", "batch_size"):
            if state["config"][key] != getattr(self.config, key):
                raise ValueError(f"{folder} was trained with {key}={state['config'][key]!r}, this run has "
                                 f"{getattr(self.config, key)!r}; continue with the same {key}")
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32)
        loaded = {**{f"unet.{k}": v for k, v in unet.state_dict().items()},
                  **{f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()}}
        with torch.no_grad():
            for k, p in self.parameters.items():
                p.copy_(loaded[k])
                self.ema[k].copy_(loaded[k])
        self.step = int(state["step"])
        self.ema_start = int(state.get("ema_start", 0))
        exported_type = state["config"].get("prediction_type", "epsilon")
        if exported_type != self.config.prediction_type:
            # a change of objective: the weights are a starting point (the features carry over, the output head
            # relearns), and the EMA restarts so that it does not average in the other objective's weights
            self.ema_start = self.step

    def ema_models(self):
        """Copies of (unet, text_encoder) carrying the EMA weights, in eval mode."""
        unet, text_encoder = build_models(self.config.model, self.config.seed)
        with torch.no_grad():
            for prefix, module in (("unet.", unet), ("text_encoder.", text_encoder)):
                for k, p in module.named_parameters():
                    p.copy_(self.ema[prefix + k])
        return unet.eval(), text_encoder.eval()


# ----------------------------------------------------------------------------------------- export and samples
TRAINING_STATE = "l2vsd_training.json"  # in the export: the step and config it came from (for --init-from)


def export_prior(unet, text_encoder, export_dir: Path, prediction_type: str = "v_prediction",
                 training: Optional[dict] = None) -> Path:
    """Write the diffusers folder (no vae: a pixel-space prior) to a temporary sibling, then swap it in.
    ``training``: the step and config to record next to it, so that training can continue from the export alone."""
    export_dir = Path(export_dir)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.", suffix=".tmp", dir=str(export_dir.parent)))
    try:
        # fp16 storage halves the files; the loader casts to its dtype (fp32 on CPU) when reading them
        copy.deepcopy(unet).half().save_pretrained(tmp / "unet", safe_serialization=True)
        copy.deepcopy(text_encoder).half().save_pretrained(tmp / "text_encoder", safe_serialization=True)
        write_tokenizer_folder(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(prediction_type), indent=2))
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(),
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": [None, None],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                 "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
                 "feature_extractor": [None, None]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if training is not None:
            (tmp / TRAINING_STATE).write_text(json.dumps(training, indent=2))
        os.chmod(tmp, 0o755)
        # the old folder is moved aside first, so a reader sees the old or the new prior, never a mix of both
        old = None
        if export_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.", suffix=".old", dir=str(export_dir.parent)))
            os.replace(export_dir, old / "prior")
        os.replace(tmp, export_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return export_dir


def _diffusers_version() -> str:
    import diffusers
    return diffusers.__version__


@torch.no_grad()
def sample_images(unet, text_encoder, prompts: list[str], per_prompt: int = 6, steps: int = 25,
                  guidance: float = SAMPLE_GUIDANCE, seed: int = 0,
                  prediction_type: str = "v_prediction") -> torch.Tensor:
    """[len(prompts)·per_prompt, 3, 32, 32] in [0, 1]: DDIM (η = 0) with classifier-free guidance against ""."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config(prediction_type))
    scheduler.set_timesteps(steps)
    tokens = TextCache(build_tokenizer())
    all_prompts = [p for p in prompts for _ in range(per_prompt)]
    cond = text_encoder(tokens(all_prompts), return_dict=False)[0]
    uncond = text_encoder(tokens([""]), return_dict=False)[0].expand_as(cond)
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(len(all_prompts), 3, size, size, generator=generator)
    for t in scheduler.timesteps:
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, uncond]), return_dict=False)[0]
        out_cond, out_uncond = out.chunk(2)   # ε or v: guidance is linear, so either mixes the same way
        x = scheduler.step(out_uncond + guidance * (out_cond - out_uncond), t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


def save_image_grid(images: torch.Tensor, path: Path, columns: int, scale: int = 3) -> Path:
    """A PNG of images [N, 3, H, W] in [0, 1], ``columns`` per row, upscaled ``scale``× (nearest), written atomically."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = torch.ones(rows * h, columns * w, 3)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = image.permute(1, 2, 0)
    picture = Image.fromarray((canvas * 255).round().byte().numpy())
    picture = picture.resize((columns * w * scale, rows * h * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def export_with_samples(trainer: Trainer, samples: bool = True) -> Path:
    unet, text_encoder = trainer.ema_models()
    config = trainer.config
    path = export_prior(unet, text_encoder, config.export_dir, prediction_type=config.prediction_type,
                        training={"step": trainer.step, "ema_start": trainer.ema_start, "config": config.to_json()})
    if samples:
        images = sample_images(unet, text_encoder, list(SAMPLE_PROMPTS), seed=config.seed,
                               prediction_type=config.prediction_type)
        save_image_grid(images, Path(trainer.config.train_dir) / f"samples_{trainer.step:06d}.png", columns=6)
    return path


def export_from_checkpoint(train_dir: Path, export_dir: Path, samples: bool = True) -> Path:
    """Export the EMA prior of ``train_dir``'s checkpoint (the config it was trained with) to ``export_dir``."""
    from safetensors import safe_open

    path = Path(train_dir) / CHECKPOINT_NAME
    with safe_open(str(path), framework="pt") as f:
        saved = json.loads(f.metadata()["config"])
    config = TrainConfig(**{**saved, "train_dir": Path(train_dir), "export_dir": Path(export_dir)})
    trainer = Trainer(config)
    trainer.load_checkpoint(path)
    return export_with_samples(trainer, samples)


# ------------------------------------------------------------------------------------------------- the loop
def _log(config: TrainConfig, line: str) -> None:
    print(line, flush=True)
    with open(Path(config.train_dir) / "train.log", "a", encoding="utf-8") as f:
        f.write(line + "\n")


def train(config: TrainConfig, resume: bool = False, init_from: Optional[Path] = None) -> Trainer:
    """Train to ``config.steps`` total steps (continuing from the checkpoint when ``resume``, or from an exported
    prior when ``init_from``); returns the trainer."""
    Path(config.train_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config)
    checkpoint = Path(config.train_dir) / CHECKPOINT_NAME
    if init_from is not None:
        if resume:
            raise ValueError("--resume and --init-from exclude each other: the checkpoint already has the weights")
        trainer.init_from_export(Path(init_from))
        _log(config, f"initialised from the export {init_from} at step {trainer.step} (fresh optimizer moments)")
    elif resume:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}; start without --resume")
        trainer.load_checkpoint(checkpoint)
        _log(config, f"resumed from {checkpoint} at step {trainer.step}")
    else:
        _log(config, f"start: unet {count_parameters(trainer.unet) / 1e6:.2f} M parameters, text encoder "
                     f"{count_parameters(trainer.text_encoder) / 1e6:.2f} M, torch threads "
                     f"{torch.get_num_threads()}, config {json.dumps(config.to_json())}")
    window_losses, window_start = [], time.perf_counter()
    while trainer.step < config.steps:
        window_losses.append(trainer.train_step())
        step = trainer.step
        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - window_start
            rate = len(window_losses) / max(elapsed, 1e-9) * 3600
            _log(config, f"step {step} loss {sum(window_losses) / len(window_losses):.5f} "
                         f"lr {trainer.lr_at(step - 1):.2e} steps/hour {rate:.0f} time {time.strftime('%H:%M:%S')}")
            window_losses, window_start = [], time.perf_counter()
        if step % config.checkpoint_every == 0 or step == config.steps:
            trainer.save_checkpoint(checkpoint)
        if step % config.export_every == 0 or step == config.steps:
            started = time.perf_counter()
            path = export_with_samples(trainer, config.sample_grid)
            _log(config, f"exported the EMA prior at step {step} to {path} ({time.perf_counter() - started:.0f} s)")
            window_start += time.perf_counter() - started   # keep exports out of the steps/hour figure
    return trainer
