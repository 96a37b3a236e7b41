"""``python -m l2vsd_core generate`` end to end on a tiny latent prior (loaded by the real loader) and a tiny field:
the five outputs, the GLB's UVs, config.json, --resume, stop requests, and bad inputs (exit 2, one line, no
traceback)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_sd
from l2vsd_core.__main__ import main
from l2vsd_core.config import OPTIONS
from l2vsd_core.generate import generate

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    return tiny_sd.save_diffusers_folder(tiny_sd.build_tiny(tmp, seed=0, family="sd15"), tmp / "eps")


def _args(prior_dir, out, steps=4, *extra):
    return ["generate", "--prompt", "a red cube", "--negative-prompt", "blurry", "--prior", str(prior_dir),
            "--out", str(out), "--method", "l2vsd", "--steps", str(steps), "--device", "cpu", "--threads", "1",
            "--levels", "2", "--log2-hashmap-size", "8", "--base-resolution", "4", "--max-resolution", "8",
            "--mlp-neurons", "16", "--backend", "torch", "--widths", "8,16", "--milestones", "2",
            "--samples-per-ray", "16", "--grid-resolution", "8", "--lora-rank", "2", "--lora-lr", "1e-3",
            "--checkpoint-every", "2", "--preview-resolution", "8", "--mesh-resolution", "24",
            "--texture-size", "32", "--turntable-views", "3", "--turntable-resolution", "16", *extra]


def _cli(args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "l2vsd_core", *args], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_every_stage1_setting_is_reachable_from_the_cli():
    from l2vsd_core.config import NerfConfig
    names = {f.name for f in dataclasses.fields(NerfConfig)} - {"distill", "checkpoint_path", "lambda_distill"}
    reachable = {path.split(".", 1)[1] for o in OPTIONS for path in o.paths if path.startswith("nerf.")}
    assert names <= reachable


def test_generate_then_resume(prior_dir, tmp_path):
    import trimesh

    out = tmp_path / "run"
    r = _cli(_args(prior_dir, out, 4))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for name in ("checkpoint.safetensors", "checkpoint.safetensors.json", "model.glb", "turntable.gif",
                 "curves.png", "config.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert json.loads((out / "checkpoint.safetensors.json").read_text())["step"] == 4
    config = json.loads((out / "config.json").read_text())
    opts = config["options"]
    assert opts["prompt"] == "a red cube" and opts["negative_prompt"] == "blurry" and opts["method"] == "l2vsd"
    assert opts["steps"] == 4 and opts["levels"] == 2 and opts["samples_per_ray"] == 16 and opts["widths"] == [8, 16]
    nerf = config["config"]["nerf"]
    assert nerf["num_samples_per_ray"] == 16 and nerf["distill"]["method"] == "l2vsd"
    scene = trimesh.load(out / "model.glb")
    meshes = list(scene.geometry.values()) if isinstance(scene, trimesh.Scene) else [scene]
    assert meshes and len(meshes[0].faces) > 0
    assert meshes[0].visual.uv is not None and len(meshes[0].visual.uv) == len(meshes[0].vertices)
    assert len(json.loads((out / "curves.json").read_text())) == 4

    r = _cli(_args(prior_dir, out, 6, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "at step 4" in r.stderr
    assert json.loads((out / "checkpoint.safetensors.json").read_text())["step"] == 6
    assert [t["done"] for t in json.loads((out / "curves.json").read_text())] == [1, 2, 3, 4, 5, 6]


def _options(prior_dir, out, **kw):
    import argparse
    from l2vsd_core.cli import add_generate_arguments, options_from_args
    parser = add_generate_arguments(argparse.ArgumentParser())
    opts = options_from_args(parser.parse_args(_args(prior_dir, out, 3)[1:]))
    opts.update(kw)
    return opts


def test_stop_request_writes_checkpoint_and_no_mesh(prior_dir, tmp_path):
    out = tmp_path / "stopped"
    seen = []
    result = generate(_options(prior_dir, out, method="sds"), progress=lambda d, n, t: seen.append(d),
                      should_stop=lambda: len(seen) >= 1, log=lambda m: None)
    assert result["stopped"] and result["step"] == 1
    assert json.loads((out / "checkpoint.safetensors.json").read_text())["step"] == 1
    assert not (out / "model.glb").exists() and (out / "config.json").exists()


def test_keyboard_interrupt_writes_checkpoint_and_no_mesh(prior_dir, tmp_path):
    out = tmp_path / "interrupted"

    def progress(done, total, terms):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(_options(prior_dir, out, method="sds"), progress=progress, log=lambda m: None)
    assert json.loads((out / "checkpoint.safetensors.json").read_text())["step"] == 2
    assert not (out / "model.glb").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_no_surface_still_writes_the_other_outputs(prior_dir, tmp_path):
    out = tmp_path / "empty"
    msgs = []
    result = generate(_options(prior_dir, out, method="sds", steps=1, threshold=1e9), log=msgs.append)
    assert "mesh" not in result["paths"] and any("no surface" in w for w in result["warnings"])
    assert any("no mesh written" in m for m in msgs)
    for name in ("checkpoint.safetensors", "turntable.gif", "curves.png", "config.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.glb").exists()


@pytest.mark.parametrize("case, expect", [
    ("out_is_file", "is an existing file"),
    ("steps0", "--steps must be an integer >= 1"),
    ("steps_neg", "--steps must be an integer >= 1"),
    ("bad_width", "must be a multiple of the prior's pixel factor"),
    ("missing_prior", "no diffusion prior at"),
    ("resume_without_checkpoint", "looked for"),
    ("bad_widths_syntax", "expected comma-separated integers"),
    ("orient_without_normals", "--lambda-orient > 0 needs normals"),
])
def test_bad_inputs_exit_2_with_one_line(prior_dir, tmp_path, capsys, case, expect):
    out = tmp_path / "o"
    args = _args(prior_dir, out, 4)
    if case == "out_is_file":
        out.write_text("x")
    elif case == "steps0":
        args = _args(prior_dir, out, 0)
    elif case == "steps_neg":
        args = _args(prior_dir, out, -2)
    elif case == "bad_width":
        args += ["--widths", "9,16"]
    elif case == "missing_prior":
        args[args.index("--prior") + 1] = str(tmp_path / "nowhere")
    elif case == "resume_without_checkpoint":
        args += ["--resume"]
    elif case == "bad_widths_syntax":
        args += ["--widths", "8;16"]
    elif case == "orient_without_normals":
        args += ["--lambda-orient", "0.1"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m l2vsd_core generate: error:") and expect in last
    if case == "out_is_file":
        assert str(out) in last
    if case == "resume_without_checkpoint":
        assert str(out / "checkpoint.safetensors") in last
    assert not (out / "model.glb").exists()
    if case in ("bad_width", "missing_prior", "bad_widths_syntax", "steps0", "orient_without_normals"):
        assert not out.exists()  # nothing is created before every input is checked


def test_bad_input_in_a_subprocess_has_no_traceback(prior_dir, tmp_path):
    r = _cli(_args(prior_dir, tmp_path / "o", 4, "--widths", "9,16"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "pixel factor" in r.stderr.strip().splitlines()[-1]


def test_bench_is_forwarded(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0 and "l2vsd_core.bench" in capsys.readouterr().out


def test_ctrl_c_in_a_real_process_stops_after_the_step_with_a_checkpoint(prior_dir, tmp_path):
    """A real SIGINT to the CLI (what Ctrl-C sends): the step finishes, the checkpoint is written, no mesh, exit 130,
    and --resume continues from it."""
    import signal
    import time
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "l2vsd_core", *_args(prior_dir, out, 10_000)], cwd=str(ROOT),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.safetensors").exists():  # the first periodic checkpoint: it is training
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "stopped at step" in err and "Traceback" not in err
    meta = json.loads((out / "checkpoint.safetensors.json").read_text())
    assert 2 <= meta["step"] < 10_000
    assert not (out / "model.glb").exists()
    r = _cli(_args(prior_dir, out, meta["step"] + 1, "--resume", "--max-faces", "200"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {out / 'checkpoint.safetensors'} at step {meta['step']}" in r.stderr
    assert "decimating the isosurface" in r.stderr  # the exported mesh is capped at --max-faces
    import trimesh
    assert 0 < len(trimesh.load(out / "model.glb", force="mesh").faces) <= 200


def test_fixed_background_colour(prior_dir, tmp_path):
    """--background-color: a fixed colour behind the object (no parameters, no augmentation), kept through a resume;
    a bad colour is refused before anything runs."""
    from PIL import Image
    from l2vsd_core.generate import GenerateError
    from l2vsd_core.scene.field import SolidBackground

    background = SolidBackground((1.0, 0.5, 0.0)).train()
    dirs = torch.randn(2, 4, 4, 3)
    assert torch.equal(background(dirs, generator=torch.Generator()), torch.tensor([1.0, 0.5, 0.0]).expand(2, 4, 4, 3))
    assert background.parameter_groups() == [] and not list(background.parameters())
    out = tmp_path / "white"
    generate(_options(prior_dir, out, method="sds", steps=2, background_color=[1.0, 1.0, 1.0], threshold=1e9),
             log=lambda m: None)
    corner = Image.open(out / "turntable.gif").convert("RGB").getpixel((0, 0))
    assert corner == (255, 255, 255)
    result = generate(_options(prior_dir, out, method="sds", steps=3, background_color=[1.0, 1.0, 1.0],
                               threshold=1e9, resume=True), log=lambda m: None)
    assert result["step"] == 3
    with pytest.raises(GenerateError, match="--background-color must be three numbers"):
        generate(_options(prior_dir, tmp_path / "bad", background_color=[1.0, 2.0, 0.0]), log=lambda m: None)
    with pytest.raises(ValueError, match="three numbers in \\[0, 1\\]"):
        SolidBackground((0.5, 0.5))


def test_a_fresh_stage_1_drops_the_later_stages_checkpoints(prior_dir, tmp_path):
    """Without --resume, stage 1 starts anew, so an old geometry/texture checkpoint in the folder is stale: it is
    removed, or a later --resume --stages 2 would continue an old mesh on top of the new NeRF."""
    from l2vsd_core.runner import STAGE_FILES

    out = tmp_path / "run"
    out.mkdir()
    stale = [out / STAGE_FILES[name][0] for name in ("geometry", "texture")]
    stale += [p.with_name(p.name + ".json") for p in stale]
    for path in stale:
        path.write_text("old")
    keep = out / "notes.txt"
    keep.write_text("mine")
    generate(_options(prior_dir, out, method="sds", steps=1, threshold=1e9), log=lambda m: None)
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"
