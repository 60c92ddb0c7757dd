"""bench.flow_timesteps: diffusers' UniPC on flow sigmas with the network at its integer
timestep or at its own noise level, and ours on the same noise levels."""

from __future__ import annotations

import pytest

from dpmsolver.bench.flow_timesteps import FlowCell, markdown, measure
from dpmsolver.bench.peer_suite import flow_config
from dpmsolver.bench.suite import MixtureProblem, get_problem

pytest.importorskip("diffusers")


def test_the_network_time_is_checked() -> None:
    with pytest.raises(ValueError, match="model_time"):
        flow_config("UniPCMultistepScheduler", "x", model_time="t")  # type: ignore[arg-type]


def test_ours_integrates_the_ode_the_scheduler_steps() -> None:
    problem = get_problem("iso4-flow")
    assert isinstance(problem, MixtureProblem)
    (a, b) = measure(problem, 3.0, (10, 15), n=8)
    for c in (a, b):
        # the same method on the same noise levels: the same error (float32 in diffusers)
        assert c.ours == pytest.approx(c.sigma, rel=2e-3)
        # the integer timestep is another ODE's evaluation points: a different error
        assert abs(c.timestep / c.sigma - 1.0) > 1e-3
    assert b.sigma < a.sigma  # more steps, smaller error


def test_markdown_counts_the_cells_the_integer_timestep_wins() -> None:
    cells = [
        FlowCell("p", 1.0, 10, timestep=1.0, sigma=2.0, ours=2.0),
        FlowCell("p", 1.0, 15, timestep=3.0, sigma=1.5, ours=1.5),
        FlowCell("p", 3.0, 10, timestep=0.5, sigma=2.0, ours=2.2),
    ]
    text = markdown(cells, "cmd", 0.1)
    # 2 of 3 better; geo-mean of 0.5, 2, 0.25 = 0.63; ours / sigma from 1 to 1.1
    assert "| 3 | 2 | 0.630 | 0.25-2 | 1.0000-1.1000 |" in text
    assert "| p | 3 | 10 | 5.000e-01 | 2.000e+00 | 2.200e+00 | 0.250 | 1.1000 |" in text
