"""A test-only custom node that the test hosts load next to the pack (``tests/comfy_host.py`` links it into
``custom_nodes/``): it reads an ``L2VSD_PRIOR`` and writes what the prior computes to the output folder, so that a
server test can compare priors built by different nodes. Never part of the pack.

``L2VSDTest_PriorProbe`` writes ``output/l2vsd_probe/<name>.pt`` (``torch.save`` of a dict): the ε/v prediction for
fixed noisy latents, timesteps and the prompt's embedding, the embedding, a small VAE decode, two named weights,
the schedule and settings; with ``check_training``, whether a backward pass through the UNet works; with
``load_again``, the prediction of ``prior.load_again()`` (the separate LoRA base); given a ``model`` (MODEL) and a
``conditioning`` (of CLIPTextEncode on the same prompt), ComfyUI's own UNet output on the same inputs and its own text
encoding, for comparison.
"""
from __future__ import annotations

UNET_WEIGHTS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.0.resnets.0.conv1.weight")
TEXT_WEIGHTS = ("encoder.layers.0.self_attn.q_proj.weight",)  # transformers 5: no "text_model." in the names


def probe(loaded, prompt: str, seed: int, check_training: bool = False, load_again: bool = False, model=None,
          conditioning=None) -> dict:
    import torch

    prior = loaded.prior
    with torch.inference_mode(False), torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, prior.latent_channels, 8, 8, generator=g)
        t = torch.tensor([100, 700])
        text = prior.encode_text([prompt, ""]).float()
        out = {"eps": prior(x, t, text).float(), "text": text, "x": x, "t": t,
               "decoded": prior.decode_latents(x[:1, :, :4, :4]).float(),
               "alphas_cumprod": prior.alphas_cumprod.float().cpu(),
               "prediction_type": prior.prediction_type, "image_size": prior.image_size,
               "text_layers": int(prior.text_encoder.config.num_hidden_layers),
               "dtype": str(prior.dtype), "device": str(prior.device), "source": loaded.source}
        unet, encoder = dict(prior.unet.named_parameters()), dict(prior.text_encoder.named_parameters())
        encoder = {k.removeprefix("text_model."): v for k, v in encoder.items()}
        out["weights"] = {**{k: unet[k].detach().float().cpu().clone() for k in UNET_WEIGHTS},
                          **{k: encoder[k].detach().float().cpu().clone() for k in TEXT_WEIGHTS}}
        out["inference_weights"] = sum(p.is_inference() for p in prior.parameters())
    if conditioning is not None:  # ComfyUI's own text encoding (CLIPTextEncode) of the prompt
        out["comfy_text"] = conditioning[0][0].detach().float().cpu().clone()
    if model is not None:  # ComfyUI's own UNet (patches applied as for sampling) on the same x_t, t and embedding
        import comfy.model_management
        comfy.model_management.load_models_gpu([model])
        unet = model.model.diffusion_model
        device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
        with torch.no_grad():
            comfy_eps = unet(x.to(device, dtype), t.to(device), context=text.to(device, dtype))
        out["comfy_eps"] = comfy_eps.float().cpu().clone()
    if check_training:
        with torch.inference_mode(False), torch.enable_grad():
            x_grad = x[:1].clone().requires_grad_(True)
            prior(x_grad, t[:1], text[:1]).square().mean().backward()
            out["grad_finite"] = bool(torch.isfinite(x_grad.grad).all()) and float(x_grad.grad.abs().sum()) > 0
    if load_again:
        again = loaded.load_again()
        with torch.inference_mode(False), torch.no_grad():
            out["eps_again"] = again(x, t, text).float()
            out["again_shares_weights"] = any(a.data_ptr() == b.data_ptr() for a, b in
                                              zip(again.unet.parameters(), prior.unet.parameters()))
    return out


class PriorProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prior": ("L2VSD_PRIOR",),
            "name": ("STRING", {"default": "probe"}),
            "prompt": ("STRING", {"default": "a photo of a hamburger"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31}),
            "check_training": ("BOOLEAN", {"default": False}),
            "load_again": ("BOOLEAN", {"default": False}),
        }, "optional": {"model": ("MODEL",), "conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, prior, name, prompt, seed, check_training, load_again, model=None, conditioning=None):
        from pathlib import Path

        import folder_paths
        import torch

        folder = Path(folder_paths.get_output_directory()) / "l2vsd_probe"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(probe(prior, prompt, seed, check_training, load_again, model, conditioning), folder / f"{name}.pt")
        return {"ui": {"l2vsd_probe": [{"name": name}]}}


NODE_CLASS_MAPPINGS = {"L2VSDTest_PriorProbe": PriorProbe}
