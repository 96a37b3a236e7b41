"""A real learning signal on the bundled toy prior: a short L²-VSD run turns the initial blob into something the
judge takes for the prompt far more often than the blob (prompt fidelity, ``toys/world/metrics.py``)."""
import pytest

from l2vsd_core.prior import load_prior
from l2vsd_core.toys.world import demo
from l2vsd_core.toys.world.metrics import prior_samples

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


def test_a_short_optimization_raises_prompt_fidelity_above_the_initial_blob(tmp_path):
    prior = load_prior(demo.BUNDLED_PRIOR, device="cpu")
    reference = prior_samples(prior, "a red cube", count=8)
    blob = demo.run("a red cube", "l2vsd", tmp_path / "blob", steps=1, prior=prior, reference=reference)
    trained = demo.run("a red cube", "l2vsd", tmp_path / "trained", steps=STEPS, prior=prior, reference=reference)
    assert blob["fidelity"] < 0.01  # the initial blob is not "a red cube"
    assert trained["fidelity"] > MIN_FIDELITY, trained


STEPS = 150
MIN_FIDELITY = 0.05
