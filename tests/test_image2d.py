"""The 2D image-distillation study (``l2vsd_core.toys.image2d``): method names, a short run on the bundled prior, the
summary's statistics against hand-computed values, and resuming a study from its kept runs."""
import json
import math

import pytest

from l2vsd_core.toys.image2d import StudyConfig, Variant, parse_method, run_study, summarize, table

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


def test_method_names_parse_into_engine_settings():
    assert parse_method("vsd") == Variant(name="vsd", method="vsd")
    assert parse_method("sds@cfg100") == Variant(name="sds@cfg100", method="sds", guidance_scale=100.0)
    assert parse_method("lvsd[gamma=5]").lora_steps == 5
    v = parse_method("l2vsd[optimizer,eta=1]")
    assert (v.method, v.lookahead, v.eta) == ("l2vsd", "optimizer", 1.0)
    assert parse_method("l2vsd_last[paper,eta=0.1]").lookahead == "paper"
    for bad in ("vds", "l2vsd[adam]", "lvsd[gamma=x]", "sds@cfg"):
        with pytest.raises(ValueError, match="method"):
            parse_method(bad)


def test_summary_means_intervals_and_pairs():
    rows = [{"prompt": "p", "method": m, "seed": s, "fidelity": f, "frechet": d, "diversity": 1.0, "seconds": 2.0,
             "ratio": [[0, 0.5]]}
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
