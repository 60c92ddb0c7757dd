"""Bad input gets a clear error naming the parameter and what is accepted."""

from __future__ import annotations

import pytest
import torch

import dpmsolver as dp

SD = dp.DiscreteVPSchedule()
MIX = dp.default_mixture(dim=6, num_classes=3, components_per_class=2, seed=1)
NET = dp.MixtureNetwork(MIX, SD)
Z = torch.randn(2, 6, dtype=torch.float64)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            dict(solver="dpmpp_4m"),
            ValueError,
            r"solver='dpmpp_4m' is not supported; accepted values: .*'dpmpp_2m'",
        ),
        (
            dict(solver=dp.Recipe("dpmpp_multistep", {"order": 4})),
            ValueError,
            r"order \(for solver 'dpmpp_multistep'\)=4 .*accepted values: 1, 2, 3",
        ),
        (dict(solver=dp.Recipe("dpmpp_2m", {"order": 3})), ValueError, "has order 2"),
        (
            dict(solver=dp.Recipe("dpmpp_adaptive", {"order": 1})),
            ValueError,
            "accepted values: 2, 3",
        ),
        (
            dict(solver=dp.Recipe("dpmpp_multistep", {"variant": "bogus"})),
            ValueError,
            "variant='bogus'",
        ),
        (
            dict(solver=dp.Recipe("dpmpp_multistep", {"eta": 1.0})),
            ValueError,
            "option of solver 'dpmpp_multistep'.*'eta'",
        ),
        (dict(steps=0), ValueError, "steps must be >= 1"),
        (dict(steps=True), TypeError, "steps must be an integer"),
        (dict(nfe=-3), ValueError, "nfe must be >= 1"),
        (dict(steps=10, nfe=10), ValueError, "at most one of steps and nfe"),
        (dict(grid="linear"), ValueError, "grid='linear'"),
        (dict(prediction="epsilon"), ValueError, "prediction='epsilon'"),
        (dict(solver=dp.Recipe(t_start=2000.0)), ValueError, "t_start=2000"),
        (dict(timesteps=[999, 10, 500]), ValueError, "strictly monotone"),
        (
            dict(timesteps=[999, 10], sigmas=[10.0, 0.0]),
            ValueError,
            "at most one of timesteps and sigmas",
        ),
        (dict(timesteps=[999, 10], steps=5), ValueError, "implied by timesteps"),
        (
            dict(solver="dpmpp_adaptive", steps=10),
            ValueError,
            "adaptive solvers choose their own steps",
        ),
        (dict(solver="dpmpp_3s", nfe=8), ValueError, "nfe=8 cannot be spent"),
        (
            dict(options=dp.SampleOptions(check_finite="sometimes")),
            ValueError,
            "check_finite='sometimes'",
        ),
        (
            dict(
                guidance_scale=float("inf"),
                cond={"y": torch.zeros(2, dtype=torch.long)},
                uncond={"y": torch.full((2,), 3)},
            ),
            ValueError,
            "guidance_scale must be finite",
        ),
    ],
)
def test_sample_argument_errors(kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        dp.sample(NET, Z, schedule=SD, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(final="none"), "final='none'"),
        (dict(grid="linear"), "grid='linear'"),
        (dict(final_step="halfway"), "final_step='halfway'"),
        (dict(t_end=10.0, sigma_end=0.1), "at most one of t_end and sigma_end"),
    ],
)
def test_recipe_errors_are_raised_when_it_is_made(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dp.Recipe("dpmpp_2m", **kwargs)


def test_the_order_is_a_recipe_option() -> None:
    a = dp.sample(NET, Z, schedule=SD, steps=8, solver=dp.Recipe("dpmpp_multistep", {"order": 3}))
    b = dp.sample(NET, Z, schedule=SD, steps=8, solver="dpmpp_3m")
    c = dp.sample(NET, Z, schedule=SD, steps=8, solver=dp.Recipe("dpmpp_multistep", {"order": 2}))
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert not torch.equal(a.x, c.x)


def test_model_output_shape_mismatch_is_named() -> None:
    def bad(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x[:, :3]

    with pytest.raises(
        ValueError,
        match=r"model output must be a tensor of the input's shape \(2, 6\), got \(2, 3\)",
    ):
        dp.sample(bad, Z, schedule=SD, steps=3)


def test_non_tensor_noise_and_schedule_type() -> None:
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        dp.sample(NET, Z, schedule="discrete", steps=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        dp.solve(
            dp.MixtureDenoiser(MIX),
            torch.zeros(2, 6, dtype=torch.long),
            dp.make_grid(SD, 3),
            dp.get_solver("ddim"),
        )
    with pytest.raises(TypeError, match="model must be callable"):
        dp.ModelDenoiser("unet")  # type: ignore[arg-type]


def test_orders_must_fit_grid_and_solver() -> None:
    grid = dp.make_grid(SD, 4)
    den = dp.MixtureDenoiser(MIX)
    with pytest.raises(ValueError, match="orders has 3 entries but the grid has 4 steps"):
        dp.solve(den, Z, grid, dp.get_solver("dpmpp_2m"), orders=[1, 2, 2])
    with pytest.raises(ValueError, match=r"orders\[2\]=3 exceeds the solver's order 2"):
        dp.solve(den, Z, grid, dp.get_solver("dpmpp_2m"), orders=[1, 2, 3, 1])
