"""View-dependent prompts (threestudio's rules), the embedding cache and the engine's Conditioning."""
import pytest
import torch

from l2vsd_core.distill import Conditioning
from l2vsd_core.prompts import DIRECTIONS, PromptProcessor, direction_index, view_direction

L, D = 7, 12


class FakeEncoder:
    """A deterministic text encoder that records what it was asked to encode."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        out = torch.zeros(len(texts), L, D)
        for i, s in enumerate(texts):
            g = torch.Generator().manual_seed(sum(ord(c) * (k + 1) for k, c in enumerate(s)) % (2 ** 31))
            out[i] = torch.randn(L, D, generator=g)
        return out

    def encoded(self):
        return [s for call in self.calls for s in call]


@pytest.mark.parametrize("elevation, azimuth, expected", [
    (0, 0, "front"), (10, 44.9, "front"), (10, -44.9, "front"),
    (0, 45, "side"), (0, -45, "side"), (0, 90, "side"), (0, -135, "side"), (0, 135, "side"),
    (0, 135.1, "back"), (0, -135.1, "back"), (0, 180, "back"), (0, -180, "back"),
    (0, 360, "front"), (0, 405, "side"), (0, -315, "side"), (0, -330, "front"), (0, 540, "back"),
    (60, 0, "front"), (60.1, 0, "overhead"), (89, 180, "overhead"), (-30, 180, "back"),
])
def test_view_direction_boundaries(elevation, azimuth, expected):
    assert view_direction(elevation, azimuth) == expected


def test_thresholds_are_configurable_and_checked():
    assert view_direction(0, 35, front_threshold=30) == "side"
    assert view_direction(0, 145, back_threshold=30) == "side"
    assert view_direction(50, 0, overhead_threshold=45) == "overhead"
    idx = direction_index(torch.tensor([0.0, 0.0, 70.0]), torch.tensor([0.0, 180.0, 90.0]))
    assert [DIRECTIONS[i] for i in idx] == ["front", "back", "overhead"]
    with pytest.raises(ValueError, match=r"front_threshold must be an angle in \[0, 180\]"):
        view_direction(0, 0, front_threshold=200)
    with pytest.raises(ValueError, match="azimuth_deg must be a finite number"):
        view_direction(0, float("nan"))


def test_conditioning_shapes_and_contents():
    enc = FakeEncoder()
    pp = PromptProcessor(enc, "a corgi", negative_prompt="blurry")
    cams = torch.randn(4, 4, 4)
    cond = pp.conditioning([0, 10, 0, 80], [0, 90, 180, 0], cams)
    assert isinstance(cond, Conditioning)
    for name in ("text", "text_uncond", "score_text"):
        assert getattr(cond, name).shape == (4, L, D), name
    assert cond.camera.shape == (4, 16) and torch.equal(cond.camera, cams.reshape(4, 16))
    views = ["a corgi, front view", "a corgi, side view", "a corgi, back view", "a corgi, overhead view"]
    expected = enc(views)
    assert torch.equal(cond.text, expected)
    assert torch.equal(cond.text_uncond, enc(["blurry"]).expand(4, -1, -1))
    assert torch.equal(cond.score_text, enc(["a corgi"]).expand(4, -1, -1))
    assert cond.trainable_text is cond.score_text
    assert pp.conditioning(0, 0).camera is None and pp.conditioning([0, 0], 0).text.shape == (2, L, D)
    with pytest.raises(ValueError, match=r"camera_c2w_flat must be \[B, 16\] or \[B, 4, 4\] with B = 2"):
        pp.conditioning([0, 0], [0, 0], torch.zeros(3, 16))
    with pytest.raises(ValueError, match="same number of cameras"):
        pp.conditioning([0, 0, 0], [0, 0])


def test_each_distinct_string_is_encoded_once():
    enc = FakeEncoder()
    pp = PromptProcessor(enc, "  a corgi ")
    for _ in range(3):
        pp.conditioning(torch.rand(8) * 90, torch.rand(8) * 360 - 180)
    assert len(enc.calls) == 1
    assert sorted(enc.encoded()) == sorted(["a corgi", "", "a corgi, side view", "a corgi, front view",
                                            "a corgi, back view", "a corgi, overhead view"])
    same = PromptProcessor(FakeEncoder(), "x", negative_prompt="x", view_dependent=False)
    same.conditioning([0, 90], [0, 0])
    assert same.encode_text.encoded() == ["x"]


def test_view_independent_prompting_uses_the_plain_prompt():
    enc = FakeEncoder()
    cond = PromptProcessor(enc, "a corgi", view_dependent=False).conditioning([0, 80], [180, 0])
    assert torch.equal(cond.text, cond.score_text)


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_empty_prompt_is_refused(prompt):
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        PromptProcessor(FakeEncoder(), prompt)


def test_bad_encoder_output_is_refused():
    pp = PromptProcessor(lambda texts: torch.zeros(len(texts), D), "a corgi")
    with pytest.raises(ValueError, match=r"encode_text must return a tensor \[N, L, D\]"):
        pp.conditioning(0, 0)
