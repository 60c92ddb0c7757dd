"""Guidance and correctors: exactness, batching, counting, thresholding."""

from __future__ import annotations

import pytest
import torch

import dpmsolver as dp

SD = dp.DiscreteVPSchedule()
MIX = dp.default_mixture(dim=6, num_classes=3, components_per_class=2, seed=1)
Y = torch.tensor([0, 1, 2, 1])
NULL = torch.full_like(Y, 3)


def z() -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "flow", "score"])
def test_cfg_equals_exact_guided_denoiser(prediction: str) -> None:
    """Guidance on raw outputs of any parameterization = guidance on x0 (affine maps)."""
    net = dp.MixtureNetwork(MIX, SD, prediction)  # type: ignore[arg-type]
    r = dp.sample(
        net,
        z(),
        schedule=SD,
        prediction=prediction,
        cond={"y": Y},
        uncond={"y": NULL},  # type: ignore[arg-type]
        guidance_scale=5.0,
        steps=15,
        solver="dpmpp_3m",
    )
    grid = r.grid
    exact = dp.solve(
        dp.MixtureDenoiser(MIX, y=Y, guidance_scale=5.0),
        z() * grid.knots[0].sigma,
        grid,
        dp.get_solver("dpmpp_3m"),
        orders=r.orders,
    )
    assert torch.allclose(r.x, exact.x, atol=1e-9)


def test_cfg_is_one_batched_call_and_scale_one_skips_uncond() -> None:
    batches: list[int] = []
    base = dp.MixtureNetwork(MIX, SD)

    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batches.append(x.shape[0])
        return base(x, t, y)

    r = dp.sample(
        net, z(), schedule=SD, cond={"y": Y}, uncond={"y": NULL}, guidance_scale=4.0, steps=6
    )
    assert r.nfe == 6 and batches == [8] * 6
    batches.clear()
    r = dp.sample(
        net, z(), schedule=SD, cond={"y": Y}, uncond={"y": NULL}, guidance_scale=1.0, steps=6
    )
    assert r.nfe == 6 and batches == [4] * 6


def test_per_sample_guidance_scales() -> None:
    net = dp.MixtureNetwork(MIX, SD)
    scales = torch.tensor([1.0, 2.0, 5.0, 7.5], dtype=torch.float64)
    r = dp.sample(
        net, z(), schedule=SD, cond={"y": Y}, uncond={"y": NULL}, guidance_scale=scales, steps=8
    )
    for i, w in enumerate(scales.tolist()):
        one = dp.sample(
            net,
            z()[i : i + 1],
            schedule=SD,
            cond={"y": Y[i : i + 1]},
            uncond={"y": NULL[i : i + 1]},
            guidance_scale=w,
            steps=8,
        )
        assert torch.allclose(one.x[0], r.x[i], atol=1e-12)


def test_unconditional_rows_can_broadcast() -> None:
    net = dp.MixtureNetwork(MIX, SD)
    a = dp.sample(
        net,
        z(),
        schedule=SD,
        cond={"y": Y},
        uncond={"y": torch.tensor([3])},
        guidance_scale=2.0,
        steps=5,
    ).x
    b = dp.sample(
        net, z(), schedule=SD, cond={"y": Y}, uncond={"y": NULL}, guidance_scale=2.0, steps=5
    ).x
    assert torch.equal(a, b)


def test_classifier_guidance_matches_its_eps_form() -> None:
    """x0 + w sigma^2/alpha grad  ==  x0 recomputed from eps - w sigma grad."""
    target = torch.tensor([0.2, -0.1, 0.3, 0.0, 0.1, -0.2], dtype=torch.float64)

    def log_prob(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -((x - target) ** 2).sum(1)

    den = dp.MixtureDenoiser(MIX)
    guided = dp.ClassifierGuidance(den, log_prob, 2.5)
    k = SD.knot(400.0)
    x = z()
    x0 = den(x, k)
    eps = (x - k.alpha * x0) / k.sigma
    grad = -2 * (x - target)
    eps_g = eps - 2.5 * k.sigma * grad
    assert torch.allclose(guided(x, k), (x - k.sigma * eps_g) / k.alpha, atol=1e-12)

    def noisy_log_prob(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # exact noisy log-likelihood of a Gaussian "class" N(target, 0.1^2) at time t
        a, s = SD.alpha(t[0]), SD.sigma(t[0])
        var = a**2 * 0.01 + s**2
        return -((x - a * target) ** 2).sum(1) / (2 * var)

    net = dp.MixtureNetwork(MIX, SD)
    r = dp.sample(
        net,
        z(),
        schedule=SD,
        steps=10,
        options=dp.SampleOptions(classifier=noisy_log_prob, classifier_scale=1.0),
    )
    plain = dp.sample(net, z(), schedule=SD, steps=10)
    # guidance pulls the samples towards the classifier's target
    assert torch.isfinite(r.x).all()
    assert float((r.x - target).norm()) < 0.7 * float((plain.x - target).norm())


def naive_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    flat = x0.float().reshape(x0.shape[0], -1)
    s = (
        torch.quantile(flat.abs(), ratio, dim=1)
        .clamp(1.0, max_value)
        .view(-1, *([1] * (x0.ndim - 1)))
    )
    return (torch.clamp(x0.float(), -s, s) / s).to(x0.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("ratio", "max_value"), [(0.995, 1.0), (0.9, 1.5), (0.5, 3.0)])
def test_dynamic_thresholding(dtype: torch.dtype, ratio: float, max_value: float) -> None:
    x0 = (3 * torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))).to(dtype)
    th = dp.DynamicThresholding(lambda x, k: x, ratio, max_value)
    out = th(x0, SD.knot(10.0))
    assert out.dtype == dtype and out.abs().max() <= 1.0
    assert torch.allclose(
        out.float(),
        naive_threshold(x0, ratio, max_value).float(),
        atol=1e-6 if dtype == torch.float32 else 1e-2,
    )


def test_thresholding_keeps_samples_in_range() -> None:
    net = dp.MixtureNetwork(MIX, SD)
    y = torch.tensor([0, 1, 2, 1])
    r = dp.sample(
        net,
        3 * z(),
        schedule=SD,
        cond={"y": y},
        uncond={"y": NULL},
        guidance_scale=15.0,
        steps=10,
        options=dp.SampleOptions(thresholding=True, thresholding_max_value=1.0),
    )
    assert r.x.abs().max() <= 1.0 + 1e-9


def test_x0_corrector_sees_every_evaluation() -> None:
    net = dp.MixtureNetwork(MIX, SD)
    calls: list[float] = []

    def corr(x0: torch.Tensor, x: torch.Tensor, knot: dp.Knot) -> torch.Tensor:
        calls.append(knot.t)
        return x0.clamp(-0.5, 0.5)

    r = dp.sample(
        net,
        z(),
        schedule=SD,
        solver="dpmpp_3s",
        steps=4,
        options=dp.SampleOptions(x0_corrector=corr),
    )
    assert len(calls) == r.nfe == 10
    assert r.x.abs().max() <= 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(guidance_scale=float("nan"), cond={"y": Y}, uncond={"y": NULL}),
            "guidance_scale must be finite",
        ),
        (dict(guidance_scale=3.0, cond={"y": Y}), "needs both cond and uncond"),
        (dict(guidance_scale=3.0, cond={"y": Y}, uncond={"label": NULL}), "same keys"),
        (dict(guidance_scale=3.0, cond={"y": Y}, uncond={"y": NULL[:2]}), "batch 2"),
        (
            dict(guidance_scale=torch.tensor([1.0, 2.0]), cond={"y": Y}, uncond={"y": NULL}),
            "2 entries",
        ),
        (
            dict(options=dp.SampleOptions(thresholding=True, thresholding_ratio=1.5)),
            "thresholding_ratio",
        ),
        (
            dict(options=dp.SampleOptions(thresholding=True, thresholding_max_value=0.5)),
            "thresholding_max_value",
        ),
        (dict(cond={"y": Y}, options=dp.SampleOptions(model_kwargs={"y": Y})), "both set"),
    ],
)
def test_bad_guidance_arguments(kwargs: dict, match: str) -> None:
    net = dp.MixtureNetwork(MIX, SD)
    with pytest.raises(ValueError, match=match):
        dp.sample(net, z(), schedule=SD, steps=4, **kwargs)
