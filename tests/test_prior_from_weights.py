"""The prior from weights already in memory (issue 16.6), without ComfyUI: ``load_prior_from_state_dict`` equals the
single-file loader on the same weights, the UNet architecture read from the weights (a shallow SD-1.5-shaped UNet, as
ComfyUI's detection accepts), CLIP skip, a schedule given as ᾱ; and the ComfyUI node's pure helpers (model type,
text encoder, sampling, CLIP Set Last Layer) on stand-ins for ComfyUI's objects. The node itself, on real ComfyUI
objects: tests/test_comfy_server.py."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sd15_shaped  # noqa: E402
import tiny_sd  # noqa: E402
from l2vsd_core.prior import load_prior, load_prior_from_state_dict, scheduler_config_from_alphas_cumprod  # noqa: E402
from l2vsd_core.prior.load import (CONFIG_ROOT, build_components_from_ldm, infer_unet_config,  # noqa: E402
                                   shipped_scheduler_config)
from l2vsd_core.prior.model import alphas_cumprod_from_scheduler_config  # noqa: E402

safetensors_torch = pytest.importorskip("safetensors.torch")
pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("from_weights")
    out = {}
    for family, seed in (("sd15", 0), ("sd21", 1)):
        model = tiny_sd.build_tiny(tmp, seed=seed, family=family)
        folder = tiny_sd.save_diffusers_folder(model, tmp / f"{family}_configs")
        ldm = tiny_sd.to_ldm_state_dict(model)
        safetensors_torch.save_file(ldm, str(tmp / f"{family}.safetensors"))
        out[family] = SimpleNamespace(model=model, configs=folder, ldm=ldm, file=tmp / f"{family}.safetensors")
    return out


def _probe(prior, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        text = prior.encode_text(["a photo of a hamburger", ""])
        return {"text": text, "eps": prior(x, torch.tensor([20, 600]), text), "rgb": prior.decode_latents(x[:1])}


# ----------------------------------------------------------------------------------------------------- the core
@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_state_dict_in_memory_gives_the_single_file_prior(tiny, family):
    t = tiny[family]
    from_file = load_prior(t.file, device="cpu", config_dir=t.configs)
    in_memory = load_prior_from_state_dict(dict(t.ldm), device="cpu", config_dir=t.configs, name="memory")
    assert in_memory.name == "memory" and in_memory.prediction_type == from_file.prediction_type
    torch.testing.assert_close(in_memory.alphas_cumprod, from_file.alphas_cumprod, rtol=0, atol=0)
    a, b = _probe(in_memory), _probe(from_file)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert set(t.ldm) == set(tiny_sd.to_ldm_state_dict(t.model))  # the dict was not changed


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_text_layers_run_fewer_text_encoder_layers(tiny, family):
    """CLIP skip: the first n layers, then the final layer norm (ComfyUI's CLIP Set Last Layer with SD's
    layer-normed hidden states); out of range is refused, naming the usable range."""
    t = tiny[family]
    prior = load_prior_from_state_dict(dict(t.ldm), device="cpu", config_dir=t.configs, text_layers=1)
    assert prior.text_encoder.config.num_hidden_layers == 1
    ids = t.model.tokenizer(["a red dog"], padding="max_length", max_length=tiny_sd.MAX_TEXT, truncation=True,
                            return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = t.model.text_encoder(ids, output_hidden_states=True).hidden_states[1]
        encoder = t.model.text_encoder
        expected = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)  # transformers 4 / 5
    torch.testing.assert_close(prior.encode_text(["a red dog"]), expected, rtol=1e-5, atol=1e-5)
    # SD 2.x files hold one layer more than the default runs (the penultimate): all of them may be asked for
    available = 2 if family == "sd15" else 3
    load_prior_from_state_dict(dict(t.ldm), device="cpu", config_dir=t.configs, text_layers=available)
    with pytest.raises(ValueError, match=rf"text_layers={available + 1}, but the text encoder has {available} "
                                         rf"layers; pick 1…{available}"):
        load_prior_from_state_dict(dict(t.ldm), device="cpu", config_dir=t.configs, text_layers=available + 1)


def test_a_schedule_given_as_alphas_is_used(tiny):
    base = shipped_scheduler_config("sd15")
    own = alphas_cumprod_from_scheduler_config(base)
    assert scheduler_config_from_alphas_cumprod(own.double() * (1 + 1e-6), base) == base  # float noise: the same
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
    rescaled = torch.cumprod(1 - rescale_zero_terminal_snr(1 - own / torch.cat([torch.ones(1), own[:-1]])), 0)
    rescaled[-1] = 4.8973451890853435e-08  # ComfyUI's zero-SNR keeps the last ᾱ just above 0
    config = scheduler_config_from_alphas_cumprod(rescaled, base)
    assert "beta_schedule" not in config and len(config["trained_betas"]) == 1000
    torch.testing.assert_close(alphas_cumprod_from_scheduler_config(config).double(), rescaled.double(),
                               rtol=1e-4, atol=1e-9)
    prior = load_prior_from_state_dict(dict(tiny["sd15"].ldm), device="cpu", config_dir=tiny["sd15"].configs,
                                       scheduler_config=config)
    torch.testing.assert_close(prior.alphas_cumprod.double(), rescaled.double(), rtol=1e-4, atol=1e-9)
    for bad in (torch.tensor([0.5, 0.9]), torch.tensor([1.0]), torch.tensor([0.9, -0.1])):
        with pytest.raises(ValueError, match="not a diffusion schedule"):
            scheduler_config_from_alphas_cumprod(bad, base)


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_published_unet_layouts_keep_the_shipped_config(family):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.load_config(str(CONFIG_ROOT / family / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(base)
    inferred = infer_unet_config(tiny_sd.unet_to_ldm(unet.state_dict(), unet.config), base)
    assert {k: v for k, v in inferred.items() if k != "use_linear_projection"} == \
        {k: v for k, v in base.items() if k != "use_linear_projection"}
    assert inferred["use_linear_projection"] == bool(base.get("use_linear_projection", False))


def test_a_shallow_sd15_shaped_unet_is_read_from_its_weights():
    """What ComfyUI detects as SD 1.5 (320 channels, 768 context) but shallower: its own config, loaded strictly."""
    from diffusers import UNet2DConditionModel

    ldm = sd15_shaped.ldm_state_dict(meta=True)
    base = UNet2DConditionModel.load_config(str(CONFIG_ROOT / "sd15" / "unet"))
    config = infer_unet_config(ldm, base)
    expected = sd15_shaped.shallow_unet_config()
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "attention_head_dim",
                "cross_attention_dim", "in_channels", "out_channels"):
        assert config[key] == expected[key], key
    unet, _, _ = build_components_from_ldm(ldm, CONFIG_ROOT / "sd15", "sd15", unet_config=config)
    assert sum(p.numel() for p in unet.parameters()) == 36_653_124
    # SD 2.x-style (linear projections, 64 channels per head): the heads per level follow the channels
    with torch.device("meta"):
        sd2 = UNet2DConditionModel.from_config(dict(expected, cross_attention_dim=1024, use_linear_projection=True,
                                                    block_out_channels=[320, 640], attention_head_dim=[5, 10]))
    base2 = UNet2DConditionModel.load_config(str(CONFIG_ROOT / "sd21" / "unet"))
    config2 = infer_unet_config(tiny_sd.unet_to_ldm(sd2.state_dict(), sd2.config), base2)
    assert config2["attention_head_dim"] == [5, 10] and config2["use_linear_projection"]


def test_unet_layouts_diffusers_cannot_build_are_named():
    ldm = sd15_shaped.ldm_state_dict(meta=True)
    base = sd15_shaped.shallow_unet_config()
    block = "model.diffusion_model.input_blocks.4.0."  # a second residual block on level 1 only
    uneven = dict(ldm, **{block + "in_layers.0.weight": torch.empty(320, device="meta"),
                          block + "out_layers.3.weight": torch.empty(320, 320, 3, 3, device="meta")})
    with pytest.raises(ValueError, match=r"different numbers of residual blocks \(\[1, 2\]\)"):
        infer_unet_config(uneven, base)
    no_mid = {k: v for k, v in ldm.items() if not k.startswith("model.diffusion_model.middle_block.1.")}
    with pytest.raises(ValueError, match="middle block has no cross-attention"):
        infer_unet_config(no_mid, base)


# --------------------------------------------------------------------------- the ComfyUI node's pure helpers
def _named(name, *bases):
    return type(name, bases or (object,), {})


def test_only_sd1_and_sd2_models_with_their_own_clip_are_accepted():
    from nodes.comfy_prior_node import _check_clip, _family

    def model_of(config_name):
        return SimpleNamespace(model=SimpleNamespace(model_config=_named(config_name)()))

    assert _family(model_of("SD15"))[:2] == ("sd15", "SD15")
    assert _family(model_of("SD20"))[:2] == ("sd21", "SD20")
    for other in ("SDXL", "SD3", "Flux", "SD15_instructpix2pix"):
        with pytest.raises(ValueError, match=rf"input 'model': ComfyUI detected this model as {other};.*Stable "
                                             rf"Diffusion 1.x or 2.x"):
            _family(model_of(other))
    with pytest.raises(ValueError, match="input 'model': got str"):
        _family("not a model")

    def clip_of(*towers):
        return SimpleNamespace(state_dict=lambda: {f"{t}.transformer.text_model.final_layer_norm.weight": 0
                                                    for t in towers})

    _check_clip(clip_of("clip_l"), "sd15")
    _check_clip(clip_of("clip_h"), "sd21")
    with pytest.raises(ValueError, match=r"input 'clip': this CLIP holds clip_g, clip_l; the SD 1.x MODEL needs"):
        _check_clip(clip_of("clip_l", "clip_g"), "sd15")
    with pytest.raises(ValueError, match=r"holds clip_l; the SD 2.x MODEL needs its own clip_h"):
        _check_clip(clip_of("clip_l"), "sd21")


def test_prediction_type_and_schedule_come_from_the_sampling_object_the_model_runs():
    from nodes.comfy_prior_node import _model_object, _sampling

    eps, discrete = _named("EPS"), _named("ModelSamplingDiscrete")
    v_pred = _named("V_PREDICTION", eps)
    edm = _named("EDM", v_pred)
    alphas = alphas_cumprod_from_scheduler_config(shipped_scheduler_config("sd15"))
    sigmas = ((1 - alphas) / alphas).sqrt()

    def patcher(kind, base=discrete, patched=None, backup=None):
        sampling = _named("ModelSampling", base, kind)()
        sampling.sigmas = sigmas
        return SimpleNamespace(model=SimpleNamespace(model_sampling=sampling),
                               object_patches={"model_sampling": patched} if patched else {},
                               object_patches_backup={"model_sampling": backup} if backup else {})

    prediction, got = _sampling(patcher(eps))
    assert prediction == "epsilon"
    torch.testing.assert_close(got, alphas.double(), rtol=1e-5, atol=0)
    assert _sampling(patcher(v_pred))[0] == "v_prediction"
    with pytest.raises(ValueError, match="input 'model': it samples with EDM"):
        _sampling(patcher(edm))
    with pytest.raises(ValueError, match="samples with ModelSamplingDiscreteDistilled"):
        _sampling(patcher(eps, base=_named("ModelSamplingDiscreteDistilled", discrete)))
    # a ModelSamplingDiscrete patch wins; a loaded clone's swapped-in patch is not this model's (the backup is)
    mine, original, theirs = object(), object(), object()
    assert _model_object(patcher(eps, patched=mine), "model_sampling") is mine
    swapped = patcher(eps, backup=original)
    swapped.model.model_sampling = theirs
    assert _model_object(swapped, "model_sampling") is original


@pytest.mark.parametrize("family,layer,expected", [
    ("sd15", None, None), ("sd15", -1, None), ("sd15", -2, 11), ("sd15", -12, 1), ("sd15", -30, None),
    ("sd15", 3, 4), ("sd21", None, None), ("sd21", -2, None), ("sd21", -3, 22), ("sd21", -1, 24)])
def test_clip_set_last_layer_becomes_the_text_encoder_depth(family, layer, expected):
    from nodes.comfy_prior_node import CLIP_PREFIXES, _text_layers

    total = 12 if family == "sd15" else 24
    clip_sd = {f"{CLIP_PREFIXES[family]}transformer.text_model.encoder.layers.{i}.mlp.fc1.weight": 0
               for i in range(total)}
    assert _text_layers(SimpleNamespace(layer_idx=layer), clip_sd, family) == expected


def test_sampling_time_patches_are_named_as_left_out():
    from nodes.comfy_prior_node import runtime_patches

    assert runtime_patches(SimpleNamespace(model_options={"transformer_options": {}})) == []
    model = SimpleNamespace(model_options={"transformer_options": {"patches": {"output_block_patch": [print]},
                                                                   "patches_replace": {"attn2": {}}},
                                           "sampler_post_cfg_function": [print]})
    assert runtime_patches(model) == ["output_block_patch", "sampler_post_cfg_function"]


def test_node_lists_without_torch_and_declares_its_sockets():
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from nodes.comfy_prior_node import ComfyModelsPrior, PriorFromCheckpoint
    from nodes.model_nodes import LoadedPrior

    node = NODE_CLASS_MAPPINGS["L2VSD_PriorFromCheckpoint"]
    assert node is PriorFromCheckpoint
    assert NODE_DISPLAY_NAME_MAPPINGS["L2VSD_PriorFromCheckpoint"] == "L2VSD Prior from Model/CLIP/VAE"
    required = node.INPUT_TYPES()["required"]
    assert [required[k][0] for k in ("model", "clip", "vae")] == ["MODEL", "CLIP", "VAE"]
    assert node.RETURN_TYPES == ("L2VSD_PRIOR",) and node.CATEGORY == "L2VSD/model"
    calls = []
    prior = ComfyModelsPrior(prior="p", source="s", device="cpu", dtype="auto", rebuild=lambda: calls.append(1) or 7)
    assert isinstance(prior, LoadedPrior) and prior.load_again() == 7 and calls == [1]
    with pytest.raises(ValueError, match="input 'dtype'"):
        node().build(None, None, None, "fp64", "cpu")
