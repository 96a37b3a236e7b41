"""Prior loading (``l2vsd_core.prior``): diffusers folders, single-file SD checkpoints, the FrozenScore model.

Every model here is a tiny random one built and saved by ``tests/tiny_sd.py``; no test touches the network (a guard
makes any socket connection fail).
"""
from __future__ import annotations

import inspect
import json
import shutil
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_sd  # noqa: E402
from l2vsd_core.distill import Conditioning, DistillConfig, FrozenScore, score_distillation  # noqa: E402
from l2vsd_core.prior import DiffusionPrior, load_prior  # noqa: E402
from l2vsd_core.prior.load import (CONFIG_ROOT, CROSS_ATTN_KEY, V_HEURISTIC_KEY,  # noqa: E402
                                   _shipped_or_config_tokenizer, build_components_from_ldm, detect_family,
                                   infer_prediction_type)
from l2vsd_core.prior.model import resolve_dtype  # noqa: E402
from l2vsd_core.schedules import TimestepSampler  # noqa: E402

safetensors_torch = pytest.importorskip("safetensors.torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")


class NotAStateDict:
    """A custom class: pickling it needs arbitrary code on load, so a weights-only load must refuse it."""

    def __init__(self):
        self.payload = torch.zeros(2)


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Fail loudly if anything tries to open a network connection."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    yield
    mp.undo()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models in memory and on disk: latent ε / v folders, a pixel folder, SD 1.x- and SD 2.x-layout single
    files (+ a weights-only .pt twin), all from the same in-memory weights."""
    tmp = tmp_path_factory.mktemp("priors")
    sd15 = tiny_sd.build_tiny(tmp, seed=0, family="sd15")
    sd21 = tiny_sd.build_tiny(tmp, seed=1, family="sd21")
    pixel = tiny_sd.build_tiny(tmp, seed=2, latent=False)
    paths = {
        "latent_eps": tiny_sd.save_diffusers_folder(sd15, tmp / "latent_eps"),
        "latent_v": tiny_sd.save_diffusers_folder(sd15, tmp / "latent_v", prediction_type="v_prediction"),
        "pixel": tiny_sd.save_diffusers_folder(pixel, tmp / "pixel"),
        "sd21_folder": tiny_sd.save_diffusers_folder(sd21, tmp / "sd21_folder"),
    }
    ldm15 = tiny_sd.to_ldm_state_dict(sd15)
    safetensors_torch.save_file(ldm15, str(tmp / "tiny15.safetensors"))
    torch.save(ldm15, str(tmp / "tiny15.pt"))
    safetensors_torch.save_file(tiny_sd.to_ldm_state_dict(sd21), str(tmp / "tiny21.safetensors"))
    paths.update(single15=tmp / "tiny15.safetensors", single15_pt=tmp / "tiny15.pt",
                 single21=tmp / "tiny21.safetensors", tmp=tmp)
    return {"sd15": sd15, "sd21": sd21, "pixel": pixel, "paths": paths}


@pytest.fixture(scope="module")
def prior(models):
    return load_prior(models["paths"]["latent_eps"], device="cpu")


def _inputs(seed=0, channels=4, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, 8, 8, generator=g), torch.tensor([17, 640][:batch])


def _reference_text(tiny, prompts):
    ids = tiny.tokenizer(prompts, padding="max_length", max_length=tiny_sd.MAX_TEXT, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return tiny.text_encoder(ids)[0]


def _reference_unet(tiny, x, t, text):
    with torch.no_grad():
        return tiny.unet(x, t, encoder_hidden_states=text).sample


# ------------------------------------------------------------------------------------------- diffusers folders
def test_folder_prior_matches_the_in_memory_model(models, prior):
    tiny = models["sd15"]
    assert isinstance(prior, DiffusionPrior) and isinstance(prior, FrozenScore)
    for member in ("prediction_type", "alphas_cumprod"):  # isinstance's lookup from Python 3.12 on
        inspect.getattr_static(prior, member)
    assert prior.prediction_type == "epsilon" and prior.is_latent
    assert prior.latent_channels == 4 and prior.vae_scale_factor == 2 and prior.image_size == 16
    assert prior.device == torch.device("cpu") and prior.dtype == torch.float32
    assert not any(p.requires_grad for p in prior.parameters())
    prompts = ["a photo of a cat", ""]
    text = prior.encode_text(prompts)
    assert text.shape == (2, tiny_sd.MAX_TEXT, 32)
    torch.testing.assert_close(text, _reference_text(tiny, prompts), atol=1e-5, rtol=1e-5)
    x, t = _inputs()
    with torch.no_grad():
        out = prior(x, t, text)
    torch.testing.assert_close(out, _reference_unet(tiny, x, t, text), atol=1e-5, rtol=1e-5)
    assert out.abs().mean() > 0.01  # a real output, not zeros


def test_alphas_cumprod_follow_the_scaled_linear_schedule(prior):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    torch.testing.assert_close(prior.alphas_cumprod, torch.cumprod(1 - betas, 0))
    assert prior.num_train_timesteps == 1000


def test_v_prediction_is_read_from_the_scheduler_and_can_be_overridden(models):
    paths = models["paths"]
    assert load_prior(paths["latent_v"], device="cpu").prediction_type == "v_prediction"
    assert load_prior(paths["latent_v"], device="cpu", prediction_type="epsilon").prediction_type == "epsilon"
    with pytest.raises(ValueError, match="epsilon, v_prediction"):
        load_prior(paths["latent_v"], device="cpu", prediction_type="sample")


def test_encode_images_is_differentiable_and_decode_inverts_shapes(prior):
    rgb = torch.rand(2, 3, 16, 16, requires_grad=True)
    latents = prior.encode_images(rgb, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    latents.square().sum().backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    with torch.no_grad():  # a posterior *sample* (not the mean) times the VAE's scaling factor, as threestudio
        posterior = prior.vae.encode(rgb.detach() * 2 - 1).latent_dist
        sample = posterior.sample(generator=torch.Generator().manual_seed(0))
        image = prior.decode_latents(latents.detach())
    torch.testing.assert_close(latents.detach(), sample * 0.18215)
    assert not torch.allclose(latents.detach(), posterior.mean * 0.18215)
    assert image.shape == (2, 3, 16, 16) and image.min() >= 0 and image.max() <= 1


def test_pixel_prior_has_no_vae(models):
    pixel = load_prior(models["paths"]["pixel"], device="cpu")
    assert pixel.vae is None and not pixel.is_latent and pixel.vae_scale_factor == 1 and pixel.latent_channels == 3
    rgb = torch.rand(1, 3, 8, 8, requires_grad=True)
    x0 = pixel.encode_images(rgb)
    torch.testing.assert_close(x0, rgb * 2 - 1)
    torch.testing.assert_close(pixel.decode_latents(x0), rgb)
    x0.sum().backward()
    torch.testing.assert_close(rgb.grad, torch.full_like(rgb, 2.0))
    x, t = _inputs(channels=3)
    text = pixel.encode_text(["a dog", "a cat"])
    with torch.no_grad():
        torch.testing.assert_close(pixel(x, t, text), _reference_unet(models["pixel"], x, t, text), atol=1e-5,
                                   rtol=1e-5)


def test_encode_text_warns_and_truncates_long_prompts_and_accepts_the_empty_prompt(prior):
    long_prompt = " ".join(["a red cat"] * 10)
    with pytest.warns(UserWarning, match=f"at most {tiny_sd.MAX_TEXT} tokens"):
        emb = prior.encode_text([long_prompt])
    assert emb.shape == (1, tiny_sd.MAX_TEXT, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = prior.encode_text([""])
    assert empty.shape == (1, tiny_sd.MAX_TEXT, 32) and torch.isfinite(empty).all()
    x, t = _inputs(batch=1)
    with torch.no_grad():  # text=None means the empty prompt
        torch.testing.assert_close(prior(x, t, None), prior(x, t, empty))


# ------------------------------------------------------------------------------------- shared UNet with a LoRA
def test_pretrained_mode_disables_a_peft_adapter_and_the_class_embedding(models):
    from diffusers.models.embeddings import TimestepEmbedding
    from peft import LoraConfig

    fresh = load_prior(models["paths"]["latent_eps"], device="cpu")
    x, t = _inputs(seed=3)
    text = fresh.encode_text(["a photo of a dog", "an astronaut"])
    with torch.no_grad():
        before = fresh.unet(x, t, encoder_hidden_states=text).sample
    torch.manual_seed(0)
    fresh.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights="gaussian"))
    with torch.no_grad():  # peft's "gaussian" init has lora_B = 0; move it as training would
        for name, param in fresh.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    lora = {n: p for n, p in fresh.unet.named_parameters() if "lora_" in n}
    frozen_one = next(iter(lora))
    lora[frozen_one].requires_grad_(False)                   # a score may freeze part of its LoRA
    flags = {n: p.requires_grad for n, p in lora.items()}
    assert sum(flags.values()) == len(lora) - 1
    with torch.no_grad():
        with_lora = fresh.unet(x, t, encoder_hidden_states=text).sample
        assert (with_lora - before).abs().max() > 1e-3     # the adapter really changes the UNet
        torch.testing.assert_close(fresh(x, t, text), before)
        with fresh.pretrained_mode():
            torch.testing.assert_close(fresh.unet(x, t, encoder_hidden_states=text).sample, before)
        torch.testing.assert_close(fresh.unet(x, t, encoder_hidden_states=text).sample, with_lora)  # restored
    assert {n: p.requires_grad for n, p in lora.items()} == flags   # trainability untouched

    camera = TimestepEmbedding(16, fresh.unet.config.block_out_channels[0] * 4)
    fresh.unet.class_embedding = camera
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, text), before)
    assert fresh.unet.class_embedding is camera
    with pytest.raises(RuntimeError, match="boom"):      # restored on errors too
        with fresh.pretrained_mode():
            assert fresh.unet.class_embedding is None
            raise RuntimeError("boom")
    assert fresh.unet.class_embedding is camera
    with torch.no_grad():
        labels = torch.randn(2, 16)
        with_cam = fresh.unet(x, t, encoder_hidden_states=text, class_labels=labels).sample
    assert (with_cam - with_lora).abs().max() > 1e-4       # adapters are still on and the camera is used


# --------------------------------------------------------------------------------------------- single files
@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_single_file_matches_the_diffusers_weights(models, family):
    paths = models["paths"]
    tiny = models[family]
    folder = paths["latent_eps"] if family == "sd15" else paths["sd21_folder"]
    single = load_prior(paths["single15" if family == "sd15" else "single21"], device="cpu", config_dir=folder)
    assert single.prediction_type == "epsilon" and single.is_latent
    prompts = ["a photo of a hamburger", ""]
    text = single.encode_text(prompts)
    torch.testing.assert_close(text, _reference_text(tiny, prompts), atol=1e-5, rtol=1e-5)
    x, t = _inputs(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(single(x, t, text), _reference_unet(tiny, x, t, text), atol=1e-5, rtol=1e-5)
        rgb = torch.rand(1, 3, 16, 16)
        torch.testing.assert_close(single.vae.encode(rgb * 2 - 1).latent_dist.mean,
                                   tiny.vae.encode(rgb * 2 - 1).latent_dist.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single.decode_latents(x[:1]), ((tiny.vae.decode(x[:1] / 0.18215).sample + 1) / 2)
                                   .clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_weights_only_pickle_loads_and_v_pred_key_is_honoured(models, tmp_path):
    paths = models["paths"]
    pt = load_prior(paths["single15_pt"], device="cpu", config_dir=paths["latent_eps"])
    ref = load_prior(paths["single15"], device="cpu", config_dir=paths["latent_eps"])
    x, t = _inputs(seed=7)
    text = ref.encode_text(["a cat", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(pt(x, t, text), ref(x, t, text))
    own_tok = load_prior(paths["single15"], device="cpu", config_dir=paths["latent_eps"],
                         tokenizer_dir=paths["latent_eps"] / "tokenizer")
    torch.testing.assert_close(own_tok.encode_text(["a cat", "a dog"]), text)
    with pytest.raises(FileNotFoundError, match="tokenizer_dir"):
        load_prior(paths["single15"], device="cpu", config_dir=paths["latent_eps"], tokenizer_dir=tmp_path)
    sd = safetensors_torch.load_file(str(paths["single15"]))
    sd["v_pred"] = torch.tensor([])
    safetensors_torch.save_file(sd, str(tmp_path / "vpred.safetensors"))
    assert load_prior(tmp_path / "vpred.safetensors", device="cpu",
                      config_dir=paths["latent_eps"]).prediction_type == "v_prediction"


def test_pickled_custom_objects_are_refused(tmp_path):
    bad = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": NotAStateDict()}, str(bad))
    with pytest.raises(ValueError, match=r"pickled.*refused for safety.*safetensors"):
        load_prior(bad, device="cpu")


def test_family_detection_and_prediction_type_rules():
    def fake(width, text_prefix):
        return {CROSS_ATTN_KEY: torch.zeros(320, width), text_prefix + "x": torch.zeros(1)}

    assert detect_family(fake(768, "cond_stage_model.transformer.")) == "sd15"
    assert detect_family(fake(1024, "cond_stage_model.model.")) == "sd21"
    with pytest.raises(ValueError, match="other kind"):
        detect_family(fake(1024, "cond_stage_model.transformer."))
    with pytest.raises(ValueError, match="neither SD 1.x"):
        detect_family(fake(4096, "cond_stage_model.model."))
    with pytest.raises(ValueError, match="SDXL"):
        detect_family({**fake(2048, "x."), "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="LoRA"):
        detect_family({"lora_unet_down_blocks_0.alpha": torch.zeros(1)})
    assert infer_prediction_type({}, "sd15") == "epsilon"
    assert infer_prediction_type({"v_pred": torch.zeros(0)}, "sd15") == "v_prediction"
    assert infer_prediction_type({V_HEURISTIC_KEY: torch.randn(320)}, "sd21") == "v_prediction"
    assert infer_prediction_type({V_HEURISTIC_KEY: torch.zeros(320)}, "sd21") == "epsilon"
    assert infer_prediction_type({V_HEURISTIC_KEY: torch.randn(320), "global_step": 875000}, "sd21") == "epsilon"


# ------------------------------------------------------------------------------------- shipped configs/tokenizer
@pytest.mark.parametrize("family,counts", [("sd15", (859_520_964, 83_653_863, 123_060_480)),
                                           ("sd21", (865_910_724, 83_653_863, 340_387_840))])
def test_shipped_configs_take_a_full_size_ldm_checkpoint(family, counts):
    """Real-size SD 1.5 / 2.1 layouts on the meta device (no memory): the shipped configs have the published
    parameter counts, and an LDM-layout state dict with the real key names and shapes converts into them strictly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = CONFIG_ROOT / family
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(configs / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(configs / "vae")))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(configs / "text_encoder")))
    assert tuple(sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)) == counts
    tiny = tiny_sd.Tiny(unet, vae, text, None, {}, family)
    ldm = tiny_sd.to_ldm_state_dict(tiny)
    # a few key names and shapes as they are in the published checkpoints
    conv = (1, 1) if family == "sd15" else ()
    assert ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320, *conv)
    assert ldm["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert ldm["model.diffusion_model.output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ldm["first_stage_model.decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    if family == "sd15":
        assert ldm["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight"].shape == (3072, 768)
    else:
        assert ldm["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"].shape == (3072, 1024)
    assert detect_family(ldm) == family
    unet2, vae2, text2 = build_components_from_ldm(ldm, configs, family, where=family)
    assert sum(p.numel() for p in text2.parameters()) == counts[2]


def test_shipped_tokenizer_gives_openai_clip_ids():
    ids15 = _shipped_or_config_tokenizer(CONFIG_ROOT / "sd15")(
        ["a photo of a hamburger"], padding="max_length", max_length=77).input_ids[0]
    ids21 = _shipped_or_config_tokenizer(CONFIG_ROOT / "sd21")(
        ["a photo of a hamburger"], padding="max_length", max_length=77).input_ids[0]
    assert ids15[:8] == [49406, 320, 1125, 539, 320, 33928, 49407, 49407] and len(ids15) == 77
    assert ids21[:8] == [49406, 320, 1125, 539, 320, 33928, 49407, 0]  # SD 2.x pads with "!"


# ---------------------------------------------------------------------------------------------- device / dtype
def test_dtype_rules_and_bf16_prior(models):
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    with pytest.raises(ValueError, match="fp32.*bf16"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="fp32"):
        resolve_dtype("float8", cpu)
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        load_prior(models["paths"]["latent_eps"], device="cpu", dtype="fp16")
    bf16 = load_prior(models["paths"]["latent_eps"], device="cpu", dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and next(bf16.unet.parameters()).dtype == torch.bfloat16
    x, t = _inputs()
    text = bf16.encode_text(["a cat", "a dog"])
    assert text.dtype == torch.bfloat16
    with torch.no_grad():
        out = bf16(x, t, text)
    assert out.dtype == torch.float32
    ref = _reference_unet(models["sd15"], x, t, text.float())
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


# ----------------------------------------------------------------------------------------------- bad inputs
def test_bad_paths_and_folders_are_explained(models, tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nope.*model_index\.json.*\.safetensors"):
        load_prior(missing, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no model_index.json"):
        load_prior(empty, device="cpu")
    no_unet = tmp_path / "no_unet"
    shutil.copytree(models["paths"]["latent_eps"], no_unet)
    shutil.rmtree(no_unet / "unet")
    with pytest.raises(ValueError, match="unet"):
        load_prior(no_unet, device="cpu")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_prior(empty / "readme.txt", device="cpu")
    lora = tmp_path / "lora.safetensors"
    safetensors_torch.save_file({"lora_unet_down_blocks_0_attentions_0.alpha": torch.ones(1)}, str(lora))
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint"):
        load_prior(lora, device="cpu")
    with pytest.raises(ValueError, match="prediction_type must be one of epsilon, v_prediction"):
        load_prior(models["paths"]["latent_eps"], device="cpu", prediction_type="x0")


def test_single_file_with_wrong_configs_is_refused(models):
    paths = models["paths"]
    with pytest.raises(ValueError, match="wrong shape"):   # SD 2-style linear projections vs SD 1 convolutions
        load_prior(paths["single15"], device="cpu", config_dir=paths["sd21_folder"])
    with pytest.raises(FileNotFoundError, match="lacks vae/config.json"):
        load_prior(paths["single15"], device="cpu", config_dir=paths["pixel"])


def test_folder_with_sdxl_style_unet_is_refused(models, tmp_path):
    folder = tmp_path / "xl"
    shutil.copytree(models["paths"]["latent_eps"], folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["addition_embed_type"] = "text_time"
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="SDXL"):
        load_prior(folder, device="cpu")


# ------------------------------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("which", ["latent_eps", "latent_v"])
def test_one_sds_step_with_cfg_on_a_loaded_prior(models, which):
    prior = load_prior(models["paths"][which], device="cpu")
    rgb = torch.rand(1, 3, 16, 16, requires_grad=True)
    x0 = prior.encode_images(rgb, generator=torch.Generator().manual_seed(0))
    cond = Conditioning(text=prior.encode_text(["a photo of a cat"]), text_uncond=prior.encode_text([""]))
    config = DistillConfig(method="sds", guidance_scale=7.5,
                           timesteps=TimestepSampler(min_step_percent=0.02, max_step_percent=0.98))
    out = score_distillation(x0, prior, None, cond, config, step=0, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.terms["nonfinite"] == 0
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    assert out.grad.shape == x0.shape == (1, 4, 8, 8)
