"""One distillation step of every method on tiny priors saved in each format and loaded by the real loader, with the
LoRA score on a separate base UNet and sharing the prior's UNet; render → encode → prompts → estimator → θ."""
import pytest
import safetensors.torch as safetensors_torch
import torch

import tiny_sd
from l2vsd_core.distill import DistillConfig, score_distillation
from l2vsd_core.prior import load_prior
from l2vsd_core.prompts import PromptProcessor
from l2vsd_core.schedules import TimestepSampler
from l2vsd_core.score import LoRAScore

METHODS = [("sds", {}), ("vsd", {}), ("lvsd", {"lora_steps": 2}), ("l2vsd", {"jvp_mode": "forward_ad"}),
           ("l2vsd", {"jvp_mode": "func"}), ("l2vsd", {"jvp_mode": "double_backward"}),
           ("l2vsd", {"jvp_mode": "fd_forward"}), ("l2vsd_last", {}), ("hlvsd", {}),
           ("l2vsd", {"esd_lambda": 0.5})]


# The tiny text encoder takes 16 tokens: view-suffixed prompts are truncated, with the loader's (tested) warning.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:prompt .* tokens long")]


@pytest.fixture(scope="module")
def prior_paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    latent = tiny_sd.build_tiny(tmp, seed=0, family="sd15")
    pixel = tiny_sd.build_tiny(tmp, seed=2, latent=False)
    safetensors_torch.save_file(tiny_sd.to_ldm_state_dict(latent), str(tmp / "tiny15.safetensors"))
    return {
        "folder_eps": tiny_sd.save_diffusers_folder(latent, tmp / "eps"),
        "folder_v": tiny_sd.save_diffusers_folder(latent, tmp / "v", prediction_type="v_prediction"),
        "pixel": tiny_sd.save_diffusers_folder(pixel, tmp / "pixel"),
        "single_file": tmp / "tiny15.safetensors",
    }


def _camera(batch):
    c2w = torch.eye(4).repeat(batch, 1, 1)
    c2w[:, 2, 3] = 2.5
    return c2w.reshape(batch, 16)


def _run(prior, score, method, extra, step=0):
    image = torch.nn.Parameter(torch.rand(1, 3, 16, 16))  # the render stand-in θ
    x0 = prior.encode_images(image, generator=torch.Generator().manual_seed(0))
    prompts = PromptProcessor(prior.encode_text, "a red cube", negative_prompt="blurry")
    cond = prompts.conditioning([10.0], [30.0], _camera(1))
    config = DistillConfig(method=method, timesteps=TimestepSampler(1000, 0.02, 0.98), **extra)
    result = score_distillation(x0, prior, score, cond, config, step=step, generator=torch.Generator().manual_seed(1))
    result.loss.backward()
    return image, result


@pytest.mark.parametrize("kind", ["folder_eps", "folder_v", "pixel", "single_file"])
def test_every_method_runs_on_a_loaded_prior_with_a_shared_unet(prior_paths, kind):
    # a tiny single file is not SD1/SD2-sized: its architecture comes from a config folder (the tiny diffusers one)
    extra_args = {"config_dir": prior_paths["folder_eps"]} if kind == "single_file" else {}
    prior = load_prior(prior_paths[kind], device="cpu", **extra_args)
    score = LoRAScore(prior.unet, prior.alphas_cumprod, prior.prediction_type, rank=2, lr=1e-3)
    x = torch.randn(1, prior.latent_channels, 8, 8)
    t = torch.tensor([400])
    text = prior.encode_text(["a red cube"])
    with torch.no_grad():
        before = prior(x, t, text)
    for method, extra in METHODS:
        lora_before = {k: v.detach().clone() for k, v in score.lookahead_parameters("all").items()}
        image, result = _run(prior, score, method, extra)
        assert torch.isfinite(result.grad).all() and image.grad is not None and torch.isfinite(image.grad).all()
        assert float(image.grad.abs().sum()) > 0, (kind, method)
        moved = any(not torch.equal(lora_before[k], v) for k, v in score.lookahead_parameters("all").items())
        assert moved == (method != "sds"), (kind, method, extra)
    with torch.no_grad():
        after = prior(x, t, text)
    assert torch.allclose(before, after, atol=1e-6)  # the shared UNet still answers as the pretrained model


def test_separate_base_unet_for_the_lora(prior_paths):
    """threestudio's layout: the LoRA sits on its own base (here a v-prediction copy), the prior is untouched."""
    prior = load_prior(prior_paths["folder_eps"], device="cpu")
    base = load_prior(prior_paths["folder_v"], device="cpu")
    score = LoRAScore(base.unet, base.alphas_cumprod, base.prediction_type, rank=2, lr=1e-3)
    assert not any("lora_" in n for n, _ in prior.unet.named_parameters())
    for method, extra in METHODS:
        _, result = _run(prior, score, method, extra)
        assert torch.isfinite(result.grad).all(), method
        assert (result.lora_loss is None) == (method == "sds")


def test_every_method_runs_on_a_half_precision_prior_with_float32_renders(prior_paths):
    """CUDA runs the UNet in fp16 while the NeRF renders in fp32; bf16 is the half precision CPU has, so this is the
    CPU stand-in for that path: every method (every JVP mode) on a bf16 prior and a shared bf16 UNet."""
    prior = load_prior(prior_paths["folder_eps"], device="cpu", dtype="bf16")
    score = LoRAScore(prior.unet, prior.alphas_cumprod, prior.prediction_type, rank=2, lr=1e-3)
    for method, extra in METHODS:
        image, result = _run(prior, score, method, extra)
        assert result.grad.dtype == torch.float32 and image.grad.dtype == torch.float32, method
        assert torch.isfinite(result.grad).all() and float(image.grad.abs().sum()) > 0, (method, extra)
