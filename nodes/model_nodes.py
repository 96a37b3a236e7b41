"""LoadPrior and AttachLoRAScore: the frozen diffusion prior and the settings of the score that distils it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .common import CATEGORY_MODEL, PRIOR_TYPE, SCORE_TYPE, check_choice, input_error, make_config

BUNDLED_SOURCE = "bundled toy prior (32x32 world)"
DIFFUSERS_PREFIX = "diffusers/"
CHECKPOINT_PREFIX = "checkpoints/"
DTYPES = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
# l2vsd_core.distill.METHODS, spelled out so that listing the node needs no torch import.
METHODS = ("sds", "vsd", "lvsd", "l2vsd", "l2vsd_last", "hlvsd")
# "auto" + l2vsd_core.jvp.JVP_MODES (same reason; tests/test_comfy_server.py checks the two agree).
JVP_MODES = ("auto", "forward_ad", "func", "double_backward", "fd_forward", "fd_central")
# l2vsd_core.distill.LOOKAHEADS (same reason; tests/test_nodes_optimize.py checks the two agree).
LOOKAHEADS = ("paper", "sgd_mean", "optimizer")


@dataclass
class LoadedPrior:
    """What an L2VSD_PRIOR socket carries: the frozen prior and how to load it again (for a separate LoRA base)."""
    prior: object  # l2vsd_core.prior.DiffusionPrior
    source: str    # the file or folder it came from
    device: str
    dtype: str

    def load_again(self):
        return load_prior_for_training(self.source, self.device, self.dtype)


def load_prior_for_training(path, device: str, dtype: str):
    """``load_prior`` outside inference mode: ComfyUI runs nodes under ``torch.inference_mode()``, and weights made
    there are inference tensors, which autograd refuses to save for the backward pass through the UNet."""
    import torch
    from l2vsd_core.prior import load_prior
    with torch.inference_mode(False):
        return load_prior(path, device=device, dtype=dtype)


@dataclass(frozen=True)
class ScoreSettings:
    """What an L2VSD_SCORE socket carries: the LoRA's ``l2vsd_core.config.LoRAConfig`` and the estimator's settings
    (the stages' ``DistillConfig`` takes them). The LoRA itself is made by each stage's run (``l2vsd_core.build``):
    ComfyUI caches node outputs, so a LoRA made here would be trained further (mutated) by every run that reuses
    the cache."""
    method: str
    lora: object          # l2vsd_core.config.LoRAConfig
    eta: float
    jvp_mode: str
    esd_lambda: float
    guidance_scale: float
    base: Optional[LoadedPrior] = field(default=None, compare=False)  # the prior the LoRA goes on
    lookahead: str = "sgd_mean"

    def distill(self, default, guidance_scale: float = -1.0, method: Optional[str] = None, **timesteps):
        """``default`` (a stage's ``DistillConfig``) with this estimator (or ``method``), its η / JVP mode / ESD λ,
        the guidance scale (-1: this score's) and ``timesteps`` (``TimestepSampler`` fields)."""
        import dataclasses

        return dataclasses.replace(
            default, method=method or self.method, eta=self.eta, lookahead=self.lookahead, esd_lambda=self.esd_lambda,
            jvp_mode=self.jvp_mode,
            guidance_scale=float(self.guidance_scale if guidance_scale < 0 else guidance_scale),
            timesteps=dataclasses.replace(default.timesteps, **timesteps))


def _bundled_prior_path() -> Path:
    from l2vsd_core.prior import BUNDLED_PRIORS
    return Path(BUNDLED_PRIORS["toy"])


def _prior_sources() -> list:
    """The bundled prior first, then ComfyUI's diffusers folders and single-file checkpoints."""
    sources = [BUNDLED_SOURCE]
    try:
        import folder_paths
    except ImportError:  # listed outside ComfyUI (e.g. by a packaging check): only the bundled prior
        return sources
    for root in folder_paths.get_folder_paths("diffusers"):
        root = Path(root)
        if root.is_dir():
            sources += sorted(DIFFUSERS_PREFIX + p.parent.name for p in root.glob("*/model_index.json"))
    sources += [CHECKPOINT_PREFIX + name for name in folder_paths.get_filename_list("checkpoints")]
    return sources


def _resolve_source(source: str) -> Path:
    if source == BUNDLED_SOURCE:
        path = _bundled_prior_path()
        if not (path / "model_index.json").is_file():
            raise input_error("source", f"the bundled prior is missing at {path}",
                              "train and export it with `python -m l2vsd_core.toys.world train`, or pick another "
                              "source")
        return path
    import folder_paths
    if source.startswith(CHECKPOINT_PREFIX):
        full = folder_paths.get_full_path("checkpoints", source[len(CHECKPOINT_PREFIX):])
        if full:
            return Path(full)
    elif source.startswith(DIFFUSERS_PREFIX):
        name = source[len(DIFFUSERS_PREFIX):]
        for root in folder_paths.get_folder_paths("diffusers"):
            if (Path(root) / name / "model_index.json").is_file():
                return Path(root) / name
    raise input_error("source", f"{source!r} was not found",
                      "put the model in ComfyUI's models/diffusers (a folder) or models/checkpoints (a file), "
                      "restart ComfyUI and pick it from the list")


class LoadPrior:
    """Load a frozen text-to-image diffusion model to distil from."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "source": (_prior_sources(), {"tooltip": "The diffusion prior: the bundled toy prior (CPU demo, 32x32 "
                                                     "pixels, 'a COLOR SHAPE' prompts), a diffusers folder from "
                                                     "models/diffusers or an SD 1.x/2.x file from models/checkpoints."}),
            "dtype": (list(DTYPES), {"default": "auto",
                                     "tooltip": "Weights precision; auto = fp16 on CUDA, fp32 on the CPU."}),
            "device": (list(DEVICES), {"default": "auto",
                                       "tooltip": "Where the prior runs; auto = CUDA when available, else the CPU."}),
        }}

    RETURN_TYPES = (PRIOR_TYPE,)
    RETURN_NAMES = ("prior",)
    OUTPUT_TOOLTIPS = ("The frozen diffusion prior (UNet, text encoder and VAE, or the bundled toy model): into Attach "
                       "LoRA Score and every optimizing node.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY_MODEL
    DESCRIPTION = "Loads the frozen diffusion prior that the 3D scene is distilled from."

    def load(self, source, dtype, device):
        check_choice("dtype", dtype, DTYPES)
        check_choice("device", device, DEVICES)
        path = _resolve_source(source)
        if device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise input_error("device", "cuda was asked for but torch sees no CUDA device",
                                  "pick 'auto' or 'cpu'")
        _make_room_on_the_gpu(device)
        try:
            prior = load_prior_for_training(path, device, dtype)
        except (ValueError, FileNotFoundError) as e:
            raise input_error("source", str(e), "pick a Stable Diffusion 1.x/2.x .safetensors checkpoint or a "
                                                "diffusers folder (a model_index.json inside)") from e
        return (LoadedPrior(prior=prior, source=str(path), device=device, dtype=dtype),)


def _make_room_on_the_gpu(device: str) -> None:
    """Before a prior goes to the GPU, ask ComfyUI to unload the models it keeps there (a checkpoint a KSampler used,
    say) and return cached blocks: our prior is not one of ComfyUI's managed models, so it cannot evict it for us."""
    import torch
    if device == "cpu" or not torch.cuda.is_available():
        return
    try:
        import comfy.model_management as model_management
    except ImportError:  # outside ComfyUI
        return
    model_management.unload_all_models()
    model_management.soft_empty_cache()


class AttachLoRAScore:
    """Choose the score-distillation estimator and the LoRA score ε_φ it trains alongside the scene."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prior": (PRIOR_TYPE, {"tooltip": "The prior from LoadPrior; the LoRA goes on its UNet."}),
            "method": (list(METHODS), {"default": "l2vsd",
                                       "tooltip": "Estimator: sds (no LoRA), vsd (ProlificDreamer), lvsd, l2vsd "
                                                  "(linearized lookahead, this pack's default), l2vsd_last (lookahead "
                                                  "on the last layer only), hlvsd."}),
            "rank": ("INT", {"default": 4, "min": 1, "max": 256,
                             "tooltip": "LoRA rank of the trainable score (ProlificDreamer: 4)."}),
            "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5,
                                        "tooltip": "AdamW learning rate of the LoRA (threestudio: 1e-4 for long SD "
                                                   "runs; 1e-3 for the toy prior's few hundred steps)."}),
            "base": (["shared", "separate"], {"default": "shared",
                                              "tooltip": "shared: the LoRA sits on the prior's own UNet (no extra "
                                                         "memory); separate: on a second copy of it."}),
            "camera_dropout": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": "Probability of dropping the camera condition of the LoRA."}),
            "eta": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.001,
                              "tooltip": "η: lookahead step of l2vsd / l2vsd_last / hlvsd; its meaning is the "
                                         "'lookahead' input's (the default: sgd_mean at 0.5, chosen by the README's "
                                         "study; 0.01 before it)."}),
            "jvp_mode": (list(JVP_MODES), {"default": "auto",
                                           "tooltip": "How l2vsd computes its Jacobian-vector product; auto = the "
                                                      "fastest exact mode on the device, fd_* = finite differences."}),
            "esd_lambda": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                     "tooltip": "ESD λ: weight of the camera-unconditioned score (0 = off)."}),
            "guidance_scale": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.5,
                                         "tooltip": "Classifier-free guidance scale of the prior (ProlificDreamer: "
                                                    "7.5)."}),
        }, "optional": {
            "lookahead": (list(LOOKAHEADS), {"default": "sgd_mean",
                                             "tooltip": "The step of the LoRA that l2vsd linearizes: sgd_mean (the "
                                                        "default: η on the mean loss, the paper's η divided by the "
                                                        "number of latent elements, so it means the same at every "
                                                        "render size), paper (eq. 7, the summed residual; the paper "
                                                        "reports η 1e-3 to 1, on the toy 1e-2 already breaks the "
                                                        "images), optimizer (the LoRA's own AdamW step, scaled by "
                                                        "η; 1 = the real step)."}),
        }}

    RETURN_TYPES = (SCORE_TYPE,)
    RETURN_NAMES = ("score",)
    OUTPUT_TOOLTIPS = ("The estimator and its LoRA settings (no weights: each optimizing stage makes its own LoRA): "
                       "into L2VSD Optimize, Refine Geometry and Refine Texture.",)
    FUNCTION = "attach"
    CATEGORY = CATEGORY_MODEL
    DESCRIPTION = "Settings of the score estimator; the LoRA is created fresh by each L2VSD Optimize run."

    def attach(self, prior, method, rank, learning_rate, base, camera_dropout, eta, jvp_mode, esd_lambda,
               guidance_scale, lookahead="sgd_mean"):
        check_choice("method", method, METHODS)
        check_choice("lookahead", lookahead, LOOKAHEADS)
        check_choice("jvp_mode", jvp_mode, JVP_MODES)
        check_choice("base", base, ("shared", "separate"))
        if not isinstance(prior, LoadedPrior):
            raise input_error("prior", f"got {type(prior).__name__}", "connect the output of a LoadPrior node")
        from l2vsd_core.config import DistillConfig, LoRAConfig

        lora = make_config(LoRAConfig, {"rank": "rank", "lr": "learning_rate", "lora lr": "learning_rate",
                                        "camera_dropout": "camera_dropout"},
                           rank=int(rank), lr=float(learning_rate), camera_dropout=float(camera_dropout),
                           separate_base=(base == "separate"))
        settings = ScoreSettings(method=method, lora=lora, eta=float(eta), jvp_mode=jvp_mode,
                                 esd_lambda=float(esd_lambda), guidance_scale=float(guidance_scale), base=prior,
                                 lookahead=lookahead)
        # the estimator's settings checked now, where they are set (DistillConfig validates itself)
        make_config(lambda: settings.distill(DistillConfig()),
                    {"eta": "eta", "esd_lambda": "esd_lambda", "guidance_scale": "guidance_scale"})
        return (settings,)
