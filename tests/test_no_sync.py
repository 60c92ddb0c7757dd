"""No host-device synchronisation inside a step: every operation that would read a tensor
value on the host raises while the loop runs (a CPU-checkable proxy for CUDA syncs).

The state runs in float32; schedule arithmetic (knots of intermediate points) is float64
host-side by construction and never touches the device, so float64 tensors are exempt."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import dpmsolver as dp
from dpmsolver.loop import FiniteMonitor
from dpmsolver.solvers import AdaptiveSolver, configurations

HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "cpu")


@contextmanager
def forbid_host_reads() -> Iterator[None]:
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def forbidden(name: str):  # type: ignore[no-untyped-def]
        original = saved[name]

        def raiser(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if self.dtype == torch.float64:
                return original(self, *args, **kwargs)
            raise AssertionError(f"host read Tensor.{name} inside the sampling loop")

        return raiser

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, forbidden(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


CASES = [
    (n, dict(c))
    for n, c, s in configurations()
    if not isinstance(s, AdaptiveSolver) and not s.stochastic
]


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_steps_never_read_tensors_on_the_host(name: str, cfg: dict) -> None:
    cfg = dict(cfg)
    solver = dp.get_solver(name, cfg.pop("order"), **cfg)
    grid = dp.make_grid(dp.DiscreteVPSchedule(), 8)
    x = torch.randn(2, 3, 4, 4)
    fixed = torch.randn(2, 3, 4, 4) * 0.1

    def denoiser(xt: torch.Tensor, knot: dp.Knot) -> torch.Tensor:
        return fixed + 0.01 * xt

    with forbid_host_reads():
        out = dp.solve(denoiser, x, grid, solver, check_finite="off")
        monitor = FiniteMonitor("end", grid.knots)
        monitor.record(0, out.x)  # the per-step NaN bookkeeping stays on the device
    monitor.finish()  # the one host read, after the loop
    assert torch.isfinite(out.x).all()


def test_the_check_itself_catches_a_host_read() -> None:
    with pytest.raises(AssertionError, match="host read"), forbid_host_reads():
        float(torch.ones((), dtype=torch.float32))


def test_guidance_and_thresholding_chain_never_reads_on_the_host() -> None:
    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 0.1 + y.view(-1, 1, 1, 1) * 0.01 + t.view(-1, 1, 1, 1) * 1e-4

    y = torch.tensor([1.0, 2.0])
    den = dp.build_denoiser(
        net,
        prediction="v",
        cond={"y": y},
        uncond={"y": torch.zeros(2)},
        guidance_scale=5.0,
        options=dp.SampleOptions(thresholding=True),
    )
    grid = dp.make_grid(dp.DiscreteVPSchedule(), 6)
    x = torch.randn(2, 3, 4, 4)
    with forbid_host_reads():
        out = dp.solve(den, x, grid, dp.get_solver("dpmpp_3m"), check_finite="off")
    assert torch.isfinite(out.x).all()
