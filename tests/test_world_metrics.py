"""The toy world's scores of a 3D model: prompt parsing, the Fréchet distance against its closed form, and the
metrics on ground-truth objects rendered by the stage-1 volume renderer (right object high, wrong object low)."""
import pytest
import torch

from l2vsd_core.scene.renderer import VolumeRenderer
from l2vsd_core.toys.world.metrics import (GroundTruthField, frechet_distance, orbit, parse_prompt, prompt_fidelity,
                                           render_model, silhouette_iou)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_prompt():
    assert parse_prompt("a red cube") == ("cube", "red")
    assert parse_prompt("An Orange torus, back view") == ("torus", "orange")
    with pytest.raises(ValueError, match="not a prompt of the toy world.*COLOR one of"):
        parse_prompt("a delicious hamburger")


def test_frechet_distance_matches_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5])
    b = torch.randn(20000, 4, generator=g) * 2 + shift  # N(shift, 4I): ‖Δμ‖² + tr(I + 4I − 2·2I) = 5.25 + 4 · 1
    assert frechet_distance(a, b) == pytest.approx(5.25 + 4.0, rel=0.03)
    with pytest.raises(ValueError, match="two feature sets"):
        frechet_distance(a[:1], b)


@pytest.fixture(scope="module")
def renders():
    renderer = VolumeRenderer(radius=1.0, num_samples_per_ray=64)
    cams = orbit(8)
    return cams, {(s, c): render_model(renderer, GroundTruthField(s, c), cams)
                  for s, c in [("cube", "red"), ("sphere", "blue"), ("torus", "green")]}


def test_fidelity_is_high_for_the_right_object_and_low_for_a_wrong_one(renders):
    _, views = renders
    for (shape, color), (rgb, _) in views.items():
        assert rgb.shape == (8, 3, 32, 32)
        assert prompt_fidelity(rgb, shape, color) > 0.9, (shape, color)
    assert prompt_fidelity(views[("sphere", "blue")][0], "cube", "red") < 0.05
    assert prompt_fidelity(views[("cube", "red")][0], "cube", "blue") < 0.05  # right shape, wrong colour


def test_silhouette_iou_prefers_the_right_shape(renders):
    cams, views = renders
    for shape, other in [("sphere", "torus"), ("torus", "cube"), ("cube", "torus")]:
        opacity = views[next(k for k in views if k[0] == shape)][1]
        assert silhouette_iou(opacity, cams, shape) > 0.8
        assert silhouette_iou(opacity, cams, shape) > silhouette_iou(opacity, cams, other) + 0.1, (shape, other)
    assert silhouette_iou(torch.zeros(8, 32, 32), cams, "cube") == 0.0
