"""How good is a generated 3D model of a world prompt?  Three scores against what the world knows.

* **prompt fidelity** (the CLIP-similarity analogue): the judge's joint probability of the prompt's shape *and*
  color, averaged over orbit views of the model (1 = every view is unmistakably "a red cube");
* **Fréchet distance** (the FID analogue): between the judge's penultimate features of the orbit views and of
  samples the prior draws for the same prompt from the training camera distribution (lower is closer to what the
  prior believes the prompt looks like);
* **silhouette IoU**: the model's opacity mask (> 0.5) against the ground-truth object's silhouette from the same
  views, the best over the object's unknown size and turn about the vertical axis (sizes 0.4/0.5/0.6, 12 turns).

Views: an orbit of ``VIEWS`` cameras at the middle of the training distribution (distance 1.25, fovy 55°, elevation
15°) rendered at the judge's 32×32 over the world's white background, so the judge sees what it was trained on.

A fourth number checks the export rather than the generation: **mesh IoU** (:func:`glb_volume_iou`), the silhouette
IoU of the exported stage-1 GLB (rasterized) against the volume renders of the field it came from (opacity > 0.5), from
the turntable's cameras at its resolution: 1 when what a mesh viewer (ComfyUI's Preview 3D) shows is what the
turntable shows.

Two ways to render a model, scored alike: :func:`score_model` draws a radiance field with the volume renderer (the
stage-1 NeRF as it was optimized), :func:`score_glb` draws an exported GLB (what the user gets, after any stage) with
the rasterizer: base-colour texture looked up through the mesh's UVs, over the white background, opacity = the
antialiased coverage mask.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ...distill import to_epsilon
from ...scene.cameras import CameraBatch, RandomCameraSampler, orbit_cameras
from .scene import BACKGROUND, COLOR_NAMES, SHAPE_NAMES, named_objects, silhouette
from .train import SAMPLE_GUIDANCE

VIEWS = 16
RESOLUTION = 32
ORBIT = {"elevation_deg": 15.0, "distance": 1.25, "fovy_deg": 55.0}
IOU_SIZES = (0.4, 0.5, 0.6)
IOU_TURNS = 12


def parse_prompt(prompt: str) -> tuple[str, str]:
    """``"a red cube"`` (optionally with a view suffix) → ("cube", "red"); ValueError for a prompt outside the world."""
    text = re.sub(r",\s*(front|side|back|overhead) view\s*$", "", prompt.strip().lower())
    match = re.fullmatch(r"(?:an?\s+)?(\w+)\s+(\w+)", text)
    if not match or match.group(1) not in COLOR_NAMES or match.group(2) not in SHAPE_NAMES:
        raise ValueError(f"{prompt!r} is not a prompt of the toy world: use 'a COLOR SHAPE' with COLOR one of "
                         f"{', '.join(COLOR_NAMES)} and SHAPE one of {', '.join(SHAPE_NAMES)}")
    return match.group(2), match.group(1)


def orbit(views: int = VIEWS, resolution: int = RESOLUTION) -> CameraBatch:
    return orbit_cameras(views, ORBIT["elevation_deg"], ORBIT["distance"], ORBIT["fovy_deg"], resolution, resolution)


# --------------------------------------------------------------------------------------------- rendering a model
@torch.no_grad()
def render_model(renderer, field, cameras: CameraBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rgb [N, 3, H, W] over the world's white background, opacity [N, H, W]) in evaluation mode."""
    device = next(field.parameters()).device if any(True for _ in field.parameters()) else torch.device("cpu")
    was = renderer.training, field.training
    renderer.eval(), field.eval()
    try:
        out = renderer.render_camera(cameras.to(device), field, torch.tensor(BACKGROUND, device=device),
                                     stratified=False)
    finally:
        renderer.train(was[0]), field.train(was[1])
    return out["rgb"].permute(0, 3, 1, 2).float().cpu().clamp(0, 1), out["opacity"][..., 0].float().cpu()


class GroundTruthField(nn.Module):
    """The world's object as a radiance field (density ``sharpness`` inside the SDF, the renderer's Lambertian
    colour): the reference the metrics must score high, rendered by the same volume renderer as a generation."""

    def __init__(self, shape: str, color: str, size: float = 0.5, yaw: float = 0.0, sharpness: float = 200.0):
        super().__init__()
        self.objects = named_objects(shape, color, 1, size, yaw)
        self.sharpness = sharpness
        self.radius = 1.0
        self._anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the field a device

    def density(self, points: torch.Tensor) -> torch.Tensor:
        from .scene import object_sdf
        sdf = object_sdf(points.float()[None].cpu(), self.objects)[0]
        return (self.sharpness * torch.sigmoid(-sdf * 400.0)).to(points)

    def forward(self, points: torch.Tensor, directions: torch.Tensor) -> dict:
        from .scene import AMBIENT, DIFFUSE, LIGHT_DIRECTION, _normals
        pts = points.float()[None].cpu()
        light = torch.nn.functional.normalize(torch.tensor(LIGHT_DIRECTION), dim=0)
        lambert = (_normals(pts, self.objects)[0] @ light).clamp_min(0)
        rgb = (AMBIENT + DIFFUSE * lambert)[:, None] * self.objects.albedo[0]
        return {"density": self.density(points), "rgb": rgb.to(points)}


# ---------------------------------------------------------------------------------------- rendering a GLB
@dataclass
class TexturedMesh:
    """A mesh as the rasterizer takes it: ``vertices`` [V, 3] float32, ``faces`` [F, 3] int64, ``uv`` [V, 2] in
    OpenGL's convention (origin bottom-left, v up: trimesh's ``visual.uv``) and the base colour ``texture``
    [Ht, Wt, 3] in [0, 1] with row 0 the *bottom* row (the rasterizer's ``texture()`` convention), so the UVs index
    it directly."""
    vertices: torch.Tensor
    faces: torch.Tensor
    uv: torch.Tensor
    texture: torch.Tensor


def load_glb(path) -> TexturedMesh:
    """The textured mesh of a GLB written by :func:`l2vsd_core.export.save_mesh` (any stage's ``model.glb``), in
    world axes: the file is y up (glTF's convention), so its vertices are turned back to the world's z up by
    :func:`l2vsd_core.export.y_up_to_world`, and the world's cameras see it as they saw the field.

    UVs: glTF stores them with the origin top-left and v down; trimesh flips v on load (and back on export), so
    ``visual.uv`` is OpenGL's v-up, the convention :func:`l2vsd_core.export.bake_texture` bakes in (texel row r at
    v = 1 − (r + ½)/size, image row 0 at the top).  The image is therefore flipped to bottom-up here.  The glTF
    base-colour factor multiplies the texture, as a viewer would."""
    import numpy as np
    import trimesh

    from ...export import y_up_to_world

    mesh = trimesh.load(str(path), force="mesh", process=False)  # applies the scene's node transforms
    visual = mesh.visual
    material = getattr(visual, "material", None)
    image = getattr(material, "baseColorTexture", None)
    image = getattr(material, "image", None) if image is None else image  # an OBJ-style SimpleMaterial
    if getattr(visual, "uv", None) is None or image is None or len(visual.uv) != len(mesh.vertices):
        raise ValueError(f"{path}: no base-colour texture with per-vertex UVs (the exporter always writes one)")
    texels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    factor = getattr(material, "baseColorFactor", None)
    if factor is not None:
        factor = np.asarray(factor)[:3]
        texels = texels * (factor / 255.0 if factor.dtype.kind in "ui" else factor)  # trimesh keeps uint8 RGBA
    return TexturedMesh(vertices=torch.as_tensor(y_up_to_world(mesh.vertices), dtype=torch.float32),
                        faces=torch.as_tensor(np.asarray(mesh.faces), dtype=torch.long),
                        uv=torch.as_tensor(np.asarray(visual.uv), dtype=torch.float32),
                        texture=torch.from_numpy(np.ascontiguousarray(texels[::-1])))


@torch.no_grad()
def render_mesh(mesh: TexturedMesh, cameras: CameraBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rgb [N, 3, H, W] over the world's white background, opacity [N, H, W]) of a textured mesh, rasterized with
    the mesh renderer's projection (so it lines up pixel for pixel with :func:`render_model`): bilinear texture
    lookup at the interpolated UVs, composited over white and antialiased; opacity is the antialiased mask."""
    from ...mesh.mesh_renderer import clip_positions
    from ...mesh.rasterize import antialias, edge_topology, interpolate, rasterize, texture

    height, width = cameras.height, cameras.width
    if mesh.faces.shape[0] == 0:
        return (torch.tensor(BACKGROUND).view(1, 3, 1, 1).expand(cameras.batch_size, 3, height, width).clone(),
                torch.zeros(cameras.batch_size, height, width))
    pos_clip = clip_positions(mesh.vertices, cameras, height, width)
    rast, _ = rasterize(pos_clip, mesh.faces, (height, width))
    uv, _ = interpolate(mesh.uv, rast, mesh.faces)
    # bilinear, wrapping as glTF's default sampler; the exporter's seam padding keeps the lookup inside a chart
    colour = texture(mesh.texture[None], uv, filter_mode="linear", boundary_mode="wrap")
    mask = (rast[..., 3:] > 0).to(colour.dtype)
    over_white = torch.lerp(torch.tensor(BACKGROUND, dtype=colour.dtype).expand_as(colour), colour, mask)
    topology = edge_topology(mesh.faces)
    rgb = antialias(over_white, rast, pos_clip, mesh.faces, topology=topology)
    opacity = antialias(mask, rast, pos_clip, mesh.faces, topology=topology)
    return rgb.permute(0, 3, 1, 2).float().clamp(0, 1), opacity[..., 0].float().clamp(0, 1)


@torch.no_grad()
def volume_opacity(field, cameras: CameraBatch, radius: float, samples_per_ray: int) -> torch.Tensor:
    """Opacity ``[N, H, W]`` of ``field``'s volume renders (no jitter), as a run's renderer draws them (``radius``,
    ``samples_per_ray``), with empty space skipped by an occupancy grid that drops only cells whose density adds
    < 1e-4 of alpha per renderer step (64³, dilated by a cell): the opacity differs from a full render by < 0.01 and
    it takes seconds instead of a minute on a CPU."""
    from ...scene.renderer import OccupancyGrid, VolumeRenderer

    grid = OccupancyGrid(radius=radius, resolution=64, threshold=1.0e-4, dilation=1)
    was = field.training
    field.eval()
    try:
        grid.update(field, generator=torch.Generator().manual_seed(0))
        renderer = VolumeRenderer(radius=radius, num_samples_per_ray=samples_per_ray, occupancy_grid=grid).eval()
        device = next(field.parameters()).device if any(True for _ in field.parameters()) else torch.device("cpu")
        out = renderer.render_camera(cameras.to(device), field, None, stratified=False)
    finally:
        field.train(was)
    return out["opacity"][..., 0].float().cpu().clamp(0, 1)


def glb_volume_iou(path, field, cameras: CameraBatch, radius: float, samples_per_ray: int) -> float:
    """Silhouette IoU of the GLB at ``path`` (read back into world axes, rasterized: :func:`render_mesh`) against
    ``field``'s volume renders (:func:`volume_opacity`) from the same ``cameras``, both masks at opacity > 0.5,
    averaged over the views (:func:`l2vsd_core.export.opacity_iou`)."""
    from ...export import opacity_iou

    _, mesh_opacity = render_mesh(load_glb(path), cameras)
    return opacity_iou(mesh_opacity, volume_opacity(field, cameras, radius, samples_per_ray))


# ------------------------------------------------------------------------------------------------------ metrics
def prompt_fidelity(images: torch.Tensor, shape: str, color: str, judge_path=None) -> float:
    from .judge import judge_probabilities
    p_shape, p_color = judge_probabilities(images, judge_path)
    return float((p_shape[:, SHAPE_NAMES.index(shape)] * p_color[:, COLOR_NAMES.index(color)]).mean())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½) between two feature sets [N, F] (float64; the matrix square root by
    scipy, its rounding-level imaginary part dropped)."""
    from scipy import linalg
    a, b = a.double().numpy(), b.double().numpy()
    if a.shape[0] < 2 or b.shape[0] < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two feature sets [N >= 2, F] of one width; got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(root):
        root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def silhouette_iou(opacity: torch.Tensor, cameras: CameraBatch, shape: str, threshold: float = 0.5) -> float:
    """Mean IoU over views of ``opacity > threshold`` with the object's silhouette, best over size and turn."""
    mask = opacity > threshold
    best = 0.0
    for truth in _silhouettes(shape, cameras):
        inter = (mask & truth).flatten(1).sum(1).float()
        union = (mask | truth).flatten(1).sum(1).float().clamp_min(1)
        best = max(best, float((inter / union).mean()))
    return best


_SILHOUETTES: dict = {}


def _silhouettes(shape: str, cameras: CameraBatch) -> list[torch.Tensor]:
    """Ground-truth masks of ``shape`` for every (size, turn) candidate, cached per shape and camera set."""
    key = (shape, cameras.c2w_flat().numpy().tobytes(), cameras.height, cameras.width,
           cameras.fovy_deg.numpy().tobytes())
    if key not in _SILHOUETTES:
        n = cameras.batch_size
        _SILHOUETTES[key] = [silhouette(named_objects(shape, COLOR_NAMES[0], n, size, 2 * math.pi * k / IOU_TURNS),
                                        cameras) for size in IOU_SIZES for k in range(IOU_TURNS)]
    return _SILHOUETTES[key]


# --------------------------------------------------------------------------------------------- prior samples
_SAMPLE_CACHE: dict = {}


@torch.no_grad()
def prior_samples(prior, prompt: str, count: int = 64, steps: int = 25, guidance_scale: float = SAMPLE_GUIDANCE,
                  seed: int = 0, batch_size: int = 32, view: Optional[tuple] = None) -> torch.Tensor:
    """``count`` images [count, 3, H, W] the prior draws for ``prompt`` (view-suffixed per random training camera, or
    for one ``view`` = (elevation°, azimuth°)), by deterministic DDIM with classifier-free guidance; cached per
    (prior, arguments)."""
    key = (id(prior), prompt, count, steps, guidance_scale, seed, view)
    if key in _SAMPLE_CACHE:
        return _SAMPLE_CACHE[key]
    from ...prompts import PromptProcessor
    g = torch.Generator().manual_seed(seed)
    cams = RandomCameraSampler(width=RESOLUTION, height=RESOLUTION).sample(count, generator=g)  # drawn either way
    elevation, azimuth = (cams.elevation_deg, cams.azimuth_deg) if view is None else (float(view[0]), float(view[1]))
    cond = PromptProcessor(prior.encode_text, prompt).conditioning(torch.as_tensor(elevation).expand(count),
                                                                   torch.as_tensor(azimuth).expand(count))
    a_bar = prior.alphas_cumprod.double().cpu()
    times = torch.linspace(a_bar.shape[0] - 1, 0, steps).round().long()
    side = int(prior.image_size) // int(getattr(prior, "vae_scale_factor", 1))
    channels = int(getattr(prior, "latent_channels", 3))
    images = []
    for start in range(0, count, batch_size):
        sl = slice(start, min(start + batch_size, count))
        n = sl.stop - sl.start
        x = torch.randn(n, channels, side, side, generator=g).to(prior.device)
        text = torch.cat([cond.text[sl], cond.text_uncond[sl]]).to(prior.device)
        for i, t in enumerate(times):
            tt = torch.full((2 * n,), int(t), device=prior.device)
            out = prior(torch.cat([x, x]), tt, text)
            eps_c, eps_u = to_epsilon(out, torch.cat([x, x]), tt, prior.alphas_cumprod,
                                      prior.prediction_type).float().chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            a, a_prev = float(a_bar[t]), float(a_bar[times[i + 1]]) if i + 1 < len(times) else 1.0
            x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        images.append(prior.decode_latents(x0).float().cpu())
    result = torch.cat(images)
    _SAMPLE_CACHE[key] = result
    return result


# -------------------------------------------------------------------------------------------------- together
@dataclass
class Scores:
    fidelity: float
    frechet: float
    iou: float

    def as_dict(self) -> dict:
        return {"fidelity": self.fidelity, "frechet": self.frechet, "iou": self.iou}


def score_model(renderer, field, prompt: str, prior, views: int = VIEWS, judge_path=None,
                reference: Optional[torch.Tensor] = None) -> Scores:
    """The three scores of the model ``field`` (rendered by ``renderer``) for a world prompt.  ``reference``: prior
    samples to compare features with (default: :func:`prior_samples` of the prompt)."""
    cams = orbit(views)
    rgb, opacity = render_model(renderer, field, cams)
    return score_views(rgb, opacity, cams, prompt, prior, judge_path, reference)


def score_glb(path, prompt: str, prior, views: int = VIEWS, judge_path=None,
              reference: Optional[torch.Tensor] = None) -> Scores:
    """The three scores of an exported GLB (:func:`load_glb`, drawn by :func:`render_mesh` from the same orbit as
    :func:`score_model`) for a world prompt; ``reference`` as there."""
    cams = orbit(views)
    rgb, opacity = render_mesh(load_glb(path), cams)
    return score_views(rgb, opacity, cams, prompt, prior, judge_path, reference)


def score_views(rgb: torch.Tensor, opacity: torch.Tensor, cameras: CameraBatch, prompt: str, prior, judge_path=None,
                reference: Optional[torch.Tensor] = None) -> Scores:
    """The three scores of orbit views ``rgb`` [N, 3, H, W] over white with their ``opacity`` [N, H, W]."""
    from .judge import judge_features
    shape, color = parse_prompt(prompt)
    reference = prior_samples(prior, prompt) if reference is None else reference
    return Scores(fidelity=prompt_fidelity(rgb, shape, color, judge_path),
                  frechet=frechet_distance(judge_features(rgb, judge_path), judge_features(reference, judge_path)),
                  iou=silhouette_iou(opacity, cameras, shape))
