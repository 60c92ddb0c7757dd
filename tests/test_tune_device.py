"""``tune`` on the device the pilot lives on: every stage (the probes, the guard, the tail
ranking and check included) runs on CUDA when it is present and chooses what it chooses
on the CPU. Without CUDA both runs are on the CPU (this machine); a GPU machine runs the
real check."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dpmsolver as dp

pytest.importorskip("scipy")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SD = dp.DiscreteVPSchedule()
MIX = dp.default_mixture(dim=6, num_classes=3, components_per_class=2, seed=5)
N = 24
Z = torch.randn(N, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
Y = torch.arange(N) % 3
OPTS: dict[str, Any] = {
    "fine_knots": 8,
    "refine_runs": 2,
    "screen_rows": 2,
    "fine_rows": 2,
    "finalists": 3,
    "step_bases": 1,
    "shift_runs": 2,
    "guard_rows": 64,
    "probe_pairs": 2,
    "probe_levels": 2,
    "micro_batch": 16,
}


def _tune(device: str) -> dp.Profile:
    net = dp.MixtureNetwork(MIX, SD, "eps")
    y = Y.to(device)
    return dp.tune(
        net,
        Z.to(device),
        schedule=SD,
        cond={"y": y},
        uncond={"y": torch.full_like(y, 3)},
        guidance_scale=5.0,
        nfe=[5, 8],
        workers=1,
        **OPTS,
    )


def test_tune_on_the_device_chooses_as_on_the_cpu() -> None:
    here, cpu = _tune(DEVICE), _tune("cpu")
    for a, b in zip(here.choices, cpu.choices, strict=True):
        assert (a.nfe, a.recipe.solver, a.stage) == (b.nfe, b.recipe.solver, b.stage)
        assert a.heldout_error == pytest.approx(b.heldout_error, rel=1e-6)
