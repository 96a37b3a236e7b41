"""Checkpoints written before the stage/runner/config refactor (main at 7a9a10b, by ``fixtures/.../make_fixture.py``)
still resume: each stage continues from its saved step with the same settings."""
import json
import shutil
from pathlib import Path

import pytest

from l2vsd_core.generate import generate

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]
FIXTURE = Path(__file__).parent / "fixtures" / "checkpoints_7a9a10b"

# The fixture's settings (make_fixture.py) spelled out where today's toy recipe differs from what they were made with
OPTIONS = dict(prompt="a red cube", prior="toy", steps=2, seed=0, widths=[32], milestones=[], samples_per_ray=8,
               grid_resolution=8, levels=2, log2_hashmap_size=8, base_resolution=4, max_resolution=8.0,
               mlp_neurons=8, lora_rank=1, lora_lr=1e-4, method="l2vsd", checkpoint_every=0, preview_every=0,
               preview_resolution=32, device="cpu", background_color=[1.0, 1.0, 1.0], stages=3, geometry_steps=2,
               geometry_resolution=32, dmtet_resolution=8, texture_steps=2, texture_resolution=32,
               mesh_resolution=16, texture_size=16, turntable_views=1, turntable_resolution=16, threshold="auto",
               max_step_percent=0.98, lambda_opaque=[10000, 0.0, 1000.0, 10001],
               eta=0.01)  # the estimator's default then


def _steps(out: Path, name: str) -> int:
    return json.loads((out / f"{name}.json").read_text())["step"]


@pytest.mark.parametrize("stage", ["nerf", "geometry", "texture"])
def test_old_checkpoints_resume(tmp_path, stage):
    out = tmp_path / "run"
    shutil.copytree(FIXTURE, out)
    more = {"nerf": "steps", "geometry": "geometry_steps", "texture": "texture_steps"}[stage]
    logs = []
    result = generate({**OPTIONS, "out": str(out), "resume": True, more: 3}, log=logs.append)
    assert not result["stopped"], logs
    files = {"nerf": "checkpoint.safetensors", "geometry": "geometry.safetensors", "texture": "texture.safetensors"}
    assert any(f"resumed from {out / files[stage]} at step 2" in m for m in logs), logs
    assert _steps(out, files[stage]) == 3
    # the stages before it were finished: loaded at their step, not restarted
    order = list(files)
    for earlier in order[:order.index(stage)]:
        assert any(f"resumed from {out / files[earlier]} at step 2" in m for m in logs), logs
        assert _steps(out, files[earlier]) == 2
    assert (out / "model.glb").is_file()


def test_an_old_checkpoint_under_todays_eta_default_is_refused_by_name(tmp_path):
    """The checkpoint ran η = 0.01, the default before the lookahead study: resuming it with today's default names
    the setting to pass, and changes nothing in the folder (its config.json keeps the settings it was made with)."""
    out = tmp_path / "run"
    shutil.copytree(FIXTURE, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    today = {k: v for k, v in OPTIONS.items() if k != "eta"}
    with pytest.raises(Exception, match=r"distill.eta: checkpoint 0.01, now 0.5"):
        generate({**today, "out": str(out), "resume": True, "steps": 3}, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
