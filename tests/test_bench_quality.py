"""``bench quality`` end to end on the bundled toy prior (a few steps): the documented JSON, the summary's arithmetic,
resuming from finished runs, stages 2 and 3 continuing finished stage-1 runs (per-stage scores, nothing recomputed),
and bad inputs named before anything runs."""
import json
import shutil

import pytest
import torch

from l2vsd_core.bench.quality import (metric_keys, paired_differences, paired_table, quality_table,
                                      run_quality_benchmark, summarize)
from l2vsd_core.prompt_list import read_prompts

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]

# stages 2 and 3 at a few steps on tiny renders and a coarse DMTet: seconds, not minutes
TINY_REFINE = {"geometry_steps": 2, "geometry_resolution": 16, "dmtet_resolution": 8, "texture_steps": 2,
               "texture_resolution": 16}


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory):
    """A finished stage-1 benchmark (two runs), shared: stage-1 runs are the slow part."""
    out = tmp_path_factory.mktemp("bench") / "runs"
    data = run_quality_benchmark(["a red cube"], ["sds", "l2vsd"], seeds=1, steps=3, out=out, reference_samples=8,
                                 log=lambda message: None)
    return out, data


def test_quality_benchmark_rows_summary_and_resume(stage1_runs):
    out, data = stage1_runs
    assert [(r["prompt"], r["method"], r["seed"]) for r in data["rows"]] == [("a red cube", "sds", 0),
                                                                            ("a red cube", "l2vsd", 0)]
    for row in data["rows"]:
        assert 0 <= row["fidelity"] <= 1 and 0 <= row["iou"] <= 1 and row["frechet"] >= 0 and row["seconds"] > 0
    assert set(data["summary"]) == {"sds", "l2vsd"}
    assert data["summary"]["sds"]["means"]["iou"] == pytest.approx(data["rows"][0]["iou"])
    assert (out / "a_red_cube" / "l2vsd" / "seed0" / "model.glb").is_file()
    again = run_quality_benchmark(["a red cube"], ["sds", "l2vsd"], seeds=1, steps=3, out=out, reference_samples=8,
                                  log=lambda message: None)  # every run is finished: read back, nothing re-run
    assert again["rows"] == data["rows"]
    assert "| l2vsd |" in quality_table(again)
    json.dumps(again)  # the JSON the CLI writes


def test_stages_continue_finished_runs_and_resume(stage1_runs, tmp_path, monkeypatch):
    import l2vsd_core.generate as generate_module
    from l2vsd_core.stages import GeometryStage, TextureStage
    from l2vsd_core.stages import NerfStage

    out = tmp_path / "runs"
    shutil.copytree(stage1_runs[0], out)  # the stage-1 runs of the fixture, finished; theirs stay as they are
    stage1_row = next(r for r in stage1_runs[1]["rows"] if r["method"] == "l2vsd")
    calls, steps = [], []  # generate's stages per call; (that call's stages, loop) per optimization step
    real_generate = generate_module.generate

    def counted_generate(options, **kw):
        calls.append(options["stages"])
        return real_generate(options, **kw)
    monkeypatch.setattr(generate_module, "generate", counted_generate)
    for loop in (NerfStage, GeometryStage, TextureStage):
        def counted(self, _step=loop.step, _name=loop.__name__):
            steps.append((calls[-1], _name))
            return _step(self)
        monkeypatch.setattr(loop, "step", counted)

    logs = []
    data = run_quality_benchmark(["a red cube"], ["l2vsd"], seeds=1, steps=3, out=out, reference_samples=8,
                                 log=logs.append, stages=3, refine_options=TINY_REFINE)
    assert calls == [2, 3]  # stage 1 was finished: only stages 2 and 3 ran ...
    assert sorted(set(steps)) == [(2, "GeometryStage"), (3, "TextureStage")]  # ... each optimized once
    assert steps.count((2, "GeometryStage")) == 2 and steps.count((3, "TextureStage")) == 2
    [row] = data["rows"]
    assert list(row) == ["prompt", "method", "seed", *metric_keys(3)]
    assert {k: row[k] for k in ("fidelity", "frechet", "iou", "seconds")} == {
        k: stage1_row[k] for k in ("fidelity", "frechet", "iou", "seconds")}  # the stage-1 NeRF's, unchanged
    for stage in (1, 2, 3):
        assert 0 <= row[f"fidelity_s{stage}"] <= 1 and 0 <= row[f"iou_s{stage}"] <= 1 and row[f"frechet_s{stage}"] >= 0
        assert (out / "a_red_cube" / "l2vsd" / "seed0" / f"model_s{stage}.glb").is_file()
    assert row["seconds_s2"] > 0 and row["seconds_s3"] > 0
    assert "1 NeRF: fidelity" in logs[-1] and "3 GLB (texture): fidelity" in logs[-1]
    assert data["config"]["stages"] == 3 and data["config"]["refine_options"] == TINY_REFINE
    assert data["summary"]["l2vsd"]["means"]["iou_s2"] == pytest.approx(row["iou_s2"])
    table = quality_table(data)
    assert "| l2vsd | 1 NeRF |" in table and "| l2vsd | 3 GLB (texture) |" in table and table.count("\n") == 5

    calls.clear()
    again = run_quality_benchmark(["a red cube"], ["l2vsd"], seeds=1, steps=3, out=out, reference_samples=8,
                                  log=lambda message: None, stages=3, refine_options=TINY_REFINE)
    assert calls == [] and again["rows"] == data["rows"]  # every stage finished: read back, nothing re-run
    json.dumps(again)


def test_refine_run_refuses_an_unfinished_stage_before(stage1_runs, tmp_path):
    from l2vsd_core.toys.world.demo import refine_run
    run_dir = tmp_path / "seed0"
    shutil.copytree(stage1_runs[0] / "a_red_cube" / "l2vsd" / "seed0", run_dir)
    with pytest.raises(ValueError, match="no finished stage 2"):
        refine_run(run_dir, 3)
    sidecar = run_dir / "checkpoint.safetensors.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "step": 1}))  # stopped after 1 of 3 steps
    with pytest.raises(ValueError, match=r"stage 1 in .* is not finished \(step 1 of 3\)"):
        refine_run(run_dir, 2)  # generate --resume would go on optimizing stage 1


def test_toy_options_add_the_refinement_settings_only_for_later_stages():
    from l2vsd_core.toys.world.demo import TOY_STAGE1, TOY_REFINE, toy_options
    one = toy_options("a red cube", "l2vsd", "out/x")
    three = toy_options("a red cube", "l2vsd", "out/x", stages=3, texture_steps=5)
    assert one["stages"] == 1 and not set(TOY_REFINE) & set(one)
    assert three == {**one, **TOY_REFINE, "stages": 3, "texture_steps": 5}  # stage 1 as with stages=1
    assert all(one[k] == v for k, v in TOY_STAGE1.items())


def test_method_variants_set_the_engine_options_they_name():
    """bench quality's methods take the 2D study's variants; what each sets reaches generate's config."""
    from l2vsd_core.bench.quality import split_methods
    from l2vsd_core.config import from_options, option_defaults
    from l2vsd_core.toys.world.demo import method_options, toy_options

    assert split_methods("vsd, l2vsd[paper,eta=0.001],sds@cfg100") == ("vsd", "l2vsd[paper,eta=0.001]", "sds@cfg100")
    assert method_options("l2vsd[paper,eta=0.001]") == {"method": "l2vsd", "lookahead": "paper", "eta": 0.001}
    assert method_options("l2esd[optimizer,eta=1]") == {"method": "l2vsd", "esd_lambda": 0.5, "lookahead": "optimizer",
                                                        "eta": 1.0}
    assert method_options("sds@cfg100") == {"method": "sds", "guidance_scale": 100.0}
    assert method_options("lvsd[gamma=5]") == {"method": "lvsd", "lora_steps": 5}
    options = toy_options("a red cube", "l2vsd[optimizer,eta=2]", "out/x", lora_lr=1e-2)
    config = from_options({**option_defaults(), **options})
    d = config.nerf.distill
    assert (d.method, d.lookahead, d.eta, config.lora.lr) == ("l2vsd", "optimizer", 2.0, 1e-2)
    for bad, message in [("l3vsd[paper]", "method must be one of"), ("l2vsd[papr]", "'papr' is not one of")]:
        with pytest.raises(ValueError, match=message):
            method_options(bad)


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
    with pytest.raises(ValueError, match="stages must be 1, 2 or 3"):
        run_quality_benchmark(["a red cube"], ["vsd"], out=tmp_path, stages=4)
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


def test_reference_samples_are_kept_and_redrawn_when_their_settings_change(stage1_runs, tmp_path, monkeypatch):
    import functools

    from safetensors import safe_open

    import l2vsd_core.toys.world.metrics as metrics
    from l2vsd_core.bench.quality import _reference_samples

    kept = tmp_path / "reference.safetensors"  # the fixture's, drawn by the benchmark; theirs stays as it is
    shutil.copy(stage1_runs[0] / "a_red_cube" / "reference.safetensors", kept)
    with safe_open(str(kept), framework="pt") as f:
        assert f.metadata()["count"] == "8" and f.get_tensor("images").shape == (8, 3, 32, 32)
    drawn = []
    real = metrics.prior_samples

    @functools.wraps(real)  # the cache reads the sampler's defaults off its signature
    def counted(prior, prompt, **kw):
        drawn.append(kw["count"])
        return real(prior, prompt, **kw)
    monkeypatch.setattr(metrics, "prior_samples", counted)
    first = _reference_samples(None, "a red cube", 8, kept.parent)  # the fixture's file: read, not drawn
    assert drawn == [] and first.shape == (8, 3, 32, 32)
    from l2vsd_core.prior import load_prior
    from l2vsd_core.toys.world import demo
    prior = load_prior(demo.BUNDLED_PRIOR, device="cpu")
    fewer = _reference_samples(prior, "a red cube", 4, kept.parent)  # another count: drawn again, file replaced
    assert drawn == [4] and fewer.shape[0] == 4
    assert torch.equal(_reference_samples(None, "a red cube", 4, kept.parent), fewer) and drawn == [4]  # kept


def test_paired_differences_match_the_same_prompt_and_seed():
    def row(prompt, method, seed, fidelity, frechet, iou):
        return {"prompt": prompt, "method": method, "seed": seed, "fidelity": fidelity, "frechet": frechet,
                "iou": iou, "seconds": 1.0}
    rows = [row("a red cube", "vsd", 0, 0.9, 10.0, 0.80), row("a red cube", "vsd", 1, 0.5, 20.0, 0.60),
            row("a blue sphere", "vsd", 0, 0.7, 5.0, 0.90),
            # l2vsd: better on the cube's seed 0 (all three), worse Fréchet on seed 1, the sphere unpaired
            row("a red cube", "l2vsd", 0, 1.0, 8.0, 0.85), row("a red cube", "l2vsd", 1, 0.5004, 23.0, 0.70),
            row("a green cone", "l2vsd", 0, 0.1, 99.0, 0.10), row("a green cone", "sds", 0, 0.2, 1.0, 0.5)]
    paired = paired_differences(rows)
    assert set(paired) == {"l2vsd"}  # sds has no vsd run on the same prompt and seed
    fid, fre, iou = (paired["l2vsd"][n] for n in ("fidelity", "frechet", "iou"))
    assert fid["pairs"] == fre["pairs"] == iou["pairs"] == 2
    # +0.0004 rounds to 0.000 at the table's precision: a tie, counted neither way
    assert fid["mean"] == pytest.approx(0.0502) and (fid["better"], fid["worse"]) == (1, 0)
    assert fre["mean"] == pytest.approx(0.5) and fre["std"] == pytest.approx(2.5)
    # deltas −2 and +3: sample sd 5/√2, t(1) = 12.706, so the 95 % half-width is 12.706 · (5/√2) / √2 = 31.765
    assert fre["ci95"] == pytest.approx(12.706 * 2.5)
    assert (fre["better"], fre["worse"]) == (1, 1)  # lower Fréchet is better
    assert iou["mean"] == pytest.approx(0.075) and (iou["better"], iou["worse"]) == (2, 0)
    table = paired_table({"paired": paired})
    assert "| l2vsd | +0.050 ± 0.050 (1 better, 0 worse) | +0.50 ± 2.50 (1 better, 1 worse) |" in table
    assert paired_differences(rows, baseline="esd") == {}
