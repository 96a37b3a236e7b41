"""``bench quality`` end to end on the bundled toy prior (a few steps): the documented JSON, the summary's arithmetic,
resuming from finished runs, and bad inputs named before anything runs."""
import json

import pytest

from l2vsd_core.bench.quality import quality_table, read_prompts, run_quality_benchmark, summarize

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


def test_quality_benchmark_rows_summary_and_resume(tmp_path):
    out = tmp_path / "runs"
    logs = []
    data = run_quality_benchmark(["a red cube"], ["sds", "l2vsd"], seeds=1, steps=3, out=out, reference_samples=8,
                                 log=logs.append)
    assert [(r["prompt"], r["method"], r["seed"]) for r in data["rows"]] == [("a red cube", "sds", 0),
                                                                            ("a red cube", "l2vsd", 0)]
    for row in data["rows"]:
        assert 0 <= row["fidelity"] <= 1 and 0 <= row["iou"] <= 1 and row["frechet"] >= 0 and row["seconds"] > 0
    assert set(data["summary"]) == {"sds", "l2vsd"}
    assert data["summary"]["sds"]["means"]["iou"] == pytest.approx(data["rows"][0]["iou"])
    assert (out / "a_red_cube" / "l2vsd" / "seed0" / "model.glb").is_file()
    again = run_quality_benchmark(["a red cube"], ["sds", "l2vsd"], seeds=1, steps=3, out=out, reference_samples=8,
                                  log=logs.append)  # every run is finished: read back, nothing re-run
    assert again["rows"] == data["rows"]
    assert "| l2vsd |" in quality_table(again)
    json.dumps(again)  # the JSON the CLI writes


def test_summary_means_and_stds():
    rows = [{"method": "vsd", "fidelity": f, "frechet": 1.0, "iou": 0.5, "seconds": 2.0} for f in (0.2, 0.4)]
    s = summarize(rows)["vsd"]
    assert s["means"]["fidelity"] == pytest.approx(0.3) and s["stds"]["fidelity"] == pytest.approx(0.1)
    assert s["runs"] == 2


def test_bad_inputs_are_named_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="not a prompt of the toy world"):
        run_quality_benchmark(["a delicious hamburger"], ["vsd"], out=tmp_path)
    with pytest.raises(ValueError, match="method must be one of"):
        run_quality_benchmark(["a red cube"], ["l3vsd"], out=tmp_path)
    empty = tmp_path / "prompts.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(empty)
    assert not any(tmp_path.iterdir()) or list(tmp_path.iterdir()) == [empty]


def test_picture_grid_of_turntables(tmp_path):
    from PIL import Image
    from l2vsd_core.bench.quality import picture_grid
    for method, color in (("sds", "red"), ("vsd", "blue")):
        run_dir = tmp_path / "runs" / "a_red_cube" / method / "seed0"
        run_dir.mkdir(parents=True)
        frames = [Image.new("RGB", (16, 16), color) for _ in range(8)]
        frames[0].save(run_dir / "turntable.gif", save_all=True, append_images=frames[1:])
    path = picture_grid(tmp_path / "runs", ["a red cube"], ["sds", "vsd", "l2vsd"], tmp_path / "grid.png", frames=4)
    grid = Image.open(path).convert("RGB")
    assert grid.size == (150 + 4 * 16, 2 * 16)  # two runs exist: two rows
    assert grid.getpixel((150 + 8, 8)) == (255, 0, 0) and grid.getpixel((150 + 8, 24)) == (0, 0, 255)
    with pytest.raises(ValueError, match="no turntables"):
        picture_grid(tmp_path / "runs", ["a blue sphere"], ["sds"], tmp_path / "none.png")
