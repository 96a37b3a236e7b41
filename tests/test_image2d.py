"""The 2D image-distillation study (``l2vsd_core.toys.image2d``): method names, a short run on the bundled prior, the
summary's statistics against hand-computed values, and resuming a study from its kept runs."""
import json
import math

import pytest

import torch

from l2vsd_core.distill import DistillConfig
from l2vsd_core.toys.image2d import StudyConfig, Variant, parse_method, plot, roughness, run_study, summarize, table

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


def test_method_names_parse_into_engine_settings():
    assert parse_method("vsd") == Variant(name="vsd", method="vsd")
    plain = parse_method("l2vsd")  # the engine's defaults: the row a user gets
    assert (plain.lookahead, plain.eta) == (DistillConfig().lookahead, DistillConfig().eta)
    assert parse_method("sds@cfg100") == Variant(name="sds@cfg100", method="sds", guidance_scale=100.0)
    assert parse_method("lvsd[gamma=5]").lora_steps == 5
    v = parse_method("l2vsd[optimizer,eta=1]")
    assert (v.method, v.lookahead, v.eta) == ("l2vsd", "optimizer", 1.0)
    assert parse_method("l2vsd_last[paper,eta=0.1]").lookahead == "paper"
    for bad in ("vds", "l2vsd[adam]", "lvsd[gamma=x]", "sds@cfg"):
        with pytest.raises(ValueError, match="method"):
            parse_method(bad)


def test_summary_means_intervals_and_pairs():
    rows = [{"prompt": "p", "method": m, "seed": s, "fidelity": f, "frechet": d, "diversity": 1.0, "roughness": 0.1,
             "seconds": 2.0, "ratio": [[0, 0.5]]}
            for m, s, f, d in (("vsd", 0, 0.5, 10.0), ("vsd", 1, 0.7, 12.0), ("sds", 0, 0.4, 13.0),
                               ("sds", 1, 0.6, 16.0))]
    study = summarize(rows)
    vsd = study["methods"]["vsd"]
    assert vsd["frechet_mean"] == 11.0 and vsd["fidelity_mean"] == pytest.approx(0.6)
    assert vsd["frechet_ci95"] == pytest.approx(12.706 * math.sqrt(2.0) / math.sqrt(2))  # t(1) · sd / √n
    paired = study["paired"]["sds"]
    assert paired["frechet_diff_mean"] == 3.5 and paired["pairs"] == 2  # (3 + 4) / 2
    assert "vsd" not in study["paired"]
    assert "| sds |" in table({**study, "config": {}})


def test_a_short_study_runs_scores_and_resumes(tmp_path):
    config = StudyConfig(steps=3, particles=2, log_every=1, reference_samples=4)
    study = run_study(["a red cube"], ["sds", "l2vsd[optimizer,eta=1]"], 1, config, tmp_path, log=lambda m: None)
    rows = {r["method"]: r for r in study["rows"]}
    for row in rows.values():
        assert 0.0 <= row["fidelity"] <= 1.0 and row["frechet"] >= 0 and row["diversity"] > 0
        assert [step for step, _ in row["ratio"]] == [0, 1, 2]
    assert all(ratio == 0.0 for _, ratio in rows["sds"]["ratio"])  # no lookahead in sds
    assert all(ratio > 0.0 for _, ratio in rows["l2vsd[optimizer,eta=1]"]["ratio"])  # the correction is applied
    kept = tmp_path / "a_red_cube" / "l2vsd_optimizer_eta_1" / "seed0.json"
    assert kept.is_file() and kept.with_suffix(".png").is_file()
    before = kept.stat().st_mtime_ns
    again = run_study(["a red cube"], ["sds", "l2vsd[optimizer,eta=1]"], 1, config, tmp_path, log=lambda m: None)
    assert again["rows"] == json.loads(json.dumps(study["rows"])) and kept.stat().st_mtime_ns == before
    # a run kept before roughness was measured gets it from its kept particles
    row = json.loads(kept.read_text())
    measured = row.pop("roughness")
    kept.write_text(json.dumps(row))
    old = run_study(["a red cube"], ["l2vsd[optimizer,eta=1]"], 1, config, tmp_path, log=lambda m: None)
    assert old["rows"][0]["roughness"] == pytest.approx(measured, abs=1 / 255)
    assert 0 < study["config"]["reference_roughness"]["a red cube"] < 1
    path = plot(study, tmp_path / "lookahead.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roughness_is_the_mean_neighbour_difference():
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert roughness(flat) == 0.0
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float().expand(1, 3, 8, 8)
    assert roughness(checker) == pytest.approx(1.0)  # every neighbour differs by 1
    ramp = torch.linspace(0, 1, 8).expand(1, 3, 8, 8)  # horizontal steps of 1/7, no vertical change
    assert roughness(ramp) == pytest.approx((1 / 7) * 56 / 112)
