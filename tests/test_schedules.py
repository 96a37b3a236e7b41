import math

import pytest
import torch

from l2vsd_core.schedules import TimestepSampler, check_scheduled, scheduled_value


def test_scheduled_value_is_threestudios_linear_ramp():
    sched = [5000, 0.98, 0.5, 5001]  # ProlificDreamer's max_step_percent
    assert scheduled_value(sched, 0) == 0.98
    assert scheduled_value(sched, 5000) == 0.98
    assert scheduled_value(sched, 5001) == 0.5
    assert scheduled_value([0, 1.0, 0.0, 100], 25) == pytest.approx(0.75)
    assert scheduled_value(0.3, 123) == 0.3


def test_sampled_timesteps_follow_the_scheduled_range():
    sampler = TimestepSampler(1000, min_step_percent=0.02, max_step_percent=[100, 0.98, 0.5, 200])
    g = torch.Generator().manual_seed(0)
    early = sampler.sample(20000, 0, generator=g)
    late = sampler.sample(20000, 300, generator=g)
    assert int(early.min()) == 20 and int(early.max()) == 980
    assert int(late.min()) == 20 and int(late.max()) == 500
    # uniform over the inclusive integer range
    assert abs(float(late.double().mean()) - 260) < 3
    assert sampler.step_range(150) == (20, 740)


def test_hifa_sqrt_anneal_is_deterministic_and_decreasing():
    sampler = TimestepSampler(1000, 0.02, 0.98, sqrt_anneal=True, max_steps=10000)
    values = [int(sampler.sample(3, s)[0]) for s in (0, 100, 2500, 10000, 20000)]
    assert values[0] == 980 and values[3] == 20 and values[4] == 20
    # t = (max - min)(1 - sqrt(step / max_steps)) + min
    assert values[1] == round(960 * (1 - math.sqrt(0.01)) + 20)
    assert values[2] == round(960 * 0.5 + 20)
    assert torch.all(sampler.sample(3, 100) == values[1])


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match=r"must be a number or \[start_step, v0, v1, end_step\]"):
        check_scheduled("max_step_percent", "0.98")
    with pytest.raises(ValueError, match="end_step 10 is before start_step 20"):
        check_scheduled("x", [20, 1, 0, 10])
    with pytest.raises(ValueError, match="must be finite"):
        check_scheduled("x", float("inf"))
    with pytest.raises(ValueError, match="0 <= min_step_percent <= max_step_percent <= 1"):
        TimestepSampler(1000, 0.9, 0.5).sample(1, 0)
    with pytest.raises(ValueError, match="num_train_timesteps must be >= 1"):
        TimestepSampler(0)
