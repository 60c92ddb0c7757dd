"""k-diffusion-style sampler functions: the same results as k-diffusion's own (1e-6 on the
same denoiser and sigmas, float64), its callback and progress conventions, inversion with
ascending sigmas, the sigma grids and the discrete DDPM wrappers; one table, so every
registered entry is exercised and the rest are listed with a reason."""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
from collections.abc import Iterator
from contextlib import redirect_stderr
from typing import Any

import pytest
import torch
from torch import Tensor

import dpmsolver as dp
from dpmsolver.frontends import kdiffusion as kd

from .kdiff_loader import load_kdiffusion_external, load_kdiffusion_sampling

K = load_kdiffusion_sampling()
needs_k = pytest.mark.skipif(
    K is None, reason="k-diffusion (and its sampling imports) not installed"
)

_BASE = dp.default_mixture(dim=8, num_classes=2, components_per_class=2, seed=4)
MIX = dataclasses.replace(_BASE, stds=_BASE.stds * 2)
AVAILABLE = [name for name in kd.SAMPLERS if name not in kd.UNAVAILABLE]


@pytest.fixture
def float64() -> Iterator[None]:
    """k-diffusion builds some tensors in the default dtype (dpm_fast's grid, the sigma
    helpers); float64 makes the comparison about the algorithms, not float32 rounding."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Denoiser:
    """The mixture's exact denoiser in k-diffusion's variables (VE: x = x0 + sigma eps),
    class-conditional through ``extra_args={"y": ...}``; counts calls."""

    def __init__(self, mixture: dp.GaussianMixture = MIX) -> None:
        self.mixture = mixture
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls += 1
        assert sigma.shape == (x.shape[0],)
        return self.mixture.x0(x, torch.ones_like(sigma, dtype=torch.float64), sigma.double(), y)


def start(sigmas: Tensor, seed: int = 0, batch: int = 5) -> Tensor:
    return (
        torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        * sigmas[0]
    )


def keyed_noise(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """A noise sampler whose draw depends only on the step's sigmas, so k-diffusion and we
    see the same noise (for stochastic entries once their solvers are registered)."""
    seed = int(1e6 * float(sigma)) ^ int(1e6 * float(sigma_next))
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grids() -> list[Any]:
    return [
        pytest.param(lambda: K.get_sigmas_karras(12, 0.03, 20.0), id="karras-12"),  # type: ignore[union-attr]
        pytest.param(lambda: K.get_sigmas_exponential(7, 0.05, 10.0), id="exponential-7"),  # type: ignore[union-attr]
        pytest.param(lambda: K.get_sigmas_karras(9, 0.03, 20.0)[:-1], id="karras-to-sigma-min"),  # type: ignore[union-attr]
        pytest.param(lambda: torch.tensor([14.0, 0.0]), id="one-step"),
    ]


SIGMA_ENTRIES = [n for n in AVAILABLE if kd.SAMPLERS[n].interface == "sigmas"]
COMPARABLE = [n for n in SIGMA_ENTRIES if K is not None and hasattr(K, n)]


@needs_k
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("make_sigmas", grids())
@pytest.mark.parametrize("name", COMPARABLE)
def test_reproduces_k_diffusion(name: str, make_sigmas: Any) -> None:
    """Every registered entry that k-diffusion also has gives its result to 1e-6."""
    sigmas = make_sigmas()
    x = start(sigmas)
    extra = {"noise_sampler": keyed_noise} if "noise_sampler" in kd.SAMPLERS[name].params else {}
    ours_model, theirs_model = Denoiser(), Denoiser()
    ours = getattr(kd, name)(ours_model, x, sigmas, disable=True, **extra)
    theirs = getattr(K, name)(theirs_model, x, sigmas, disable=True, **extra)
    assert ours_model.calls == theirs_model.calls
    assert (ours - theirs).abs().max().item() < 1e-6


@needs_k
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 10])
def test_dpm_fast_reproduces_k_diffusion(n: int) -> None:
    x = start(torch.tensor([20.0]))
    ours_model, theirs_model = Denoiser(), Denoiser()
    ours = kd.sample_dpm_fast(ours_model, x, 0.03, 20.0, n, disable=True)  # type: ignore[attr-defined]
    theirs = K.sample_dpm_fast(theirs_model, x, 0.03, 20.0, n, disable=True)  # type: ignore[union-attr]
    assert ours_model.calls == theirs_model.calls == n
    assert (ours - theirs).abs().max().item() < 1e-6


@needs_k
@pytest.mark.usefixtures("float64")
def test_published_3m_is_k_diffusion_3m_and_ours_is_closer_to_exact() -> None:
    """k-diffusion's DPM-Solver++(3M) (its ``sample_dpmpp_3m_sde`` with ``eta=0``) is our
    ``third_order="legacy"`` update to 1e-6; ``sample_dpmpp_3m`` (the full second-derivative
    term) is closer to the exact solution on the same sigmas."""
    sigmas = K.get_sigmas_exponential(30, 0.05, 20.0)[:-1]  # type: ignore[union-attr]
    x = start(sigmas)
    theirs = K.sample_dpmpp_3m_sde(
        Denoiser(), x, sigmas, disable=True, eta=0.0, noise_sampler=keyed_noise
    )  # type: ignore[union-attr]
    sched = dp.VESchedule(0.05, 20.0)
    grid = dp.grid_from_sigmas(sched, sigmas)
    legacy = dp.get_solver("dpmpp_multistep", 3, third_order="legacy", variant="heun")
    den = kd._KDenoiser(Denoiser(), None)
    published = dp.solve(den, x, grid, legacy, lower_order_final=False).x
    assert (published - theirs).abs().max().item() < 1e-6
    ours = kd.sample_dpmpp_3m(Denoiser(), x, sigmas, disable=True)  # type: ignore[attr-defined]
    ref = dp.reference_solve(dp.MixtureDenoiser(MIX), x, grid.knots[0], grid.knots[-1], sched)
    assert (ours - ref).abs().max() < 0.5 * (theirs - ref).abs().max()


@needs_k
@pytest.mark.usefixtures("float64")
def test_callback_matches_k_diffusion() -> None:
    sigmas = K.get_sigmas_karras(6, 0.03, 20.0)  # type: ignore[union-attr]
    x = start(sigmas)
    seen: dict[str, list[dict[str, Any]]] = {"ours": [], "theirs": []}
    kd.sample_dpmpp_2m(Denoiser(), x, sigmas, callback=seen["ours"].append, disable=True)  # type: ignore[attr-defined]
    K.sample_dpmpp_2m(Denoiser(), x, sigmas, callback=seen["theirs"].append, disable=True)  # type: ignore[union-attr]
    assert len(seen["ours"]) == len(seen["theirs"]) == 6
    for a, b in zip(seen["ours"], seen["theirs"], strict=True):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"] and float(a["sigma"]) == float(b["sigma"]) == float(a["sigma_hat"])
        assert torch.allclose(a["x"], b["x"], atol=1e-9) and torch.allclose(
            a["denoised"], b["denoised"], atol=1e-9
        )


@needs_k
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    "name", ["get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential"]
)
@pytest.mark.parametrize("n", [1, 2, 9])
def test_sigma_grids_match_k_diffusion(name: str, n: int) -> None:
    ours, theirs = getattr(kd, name)(n, 0.03, 14.6), getattr(K, name)(n, 0.03, 14.6)
    assert ours.shape == theirs.shape == (n + 1,)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=0)
    assert torch.allclose(kd.get_sigmas_vp(n), K.get_sigmas_vp(n), rtol=1e-12)  # type: ignore[union-attr]
    assert torch.allclose(
        kd.get_sigmas_polyexponential(n, 0.03, 14.6, rho=2.5),
        K.get_sigmas_polyexponential(n, 0.03, 14.6, rho=2.5),
        rtol=1e-12,
    )  # type: ignore[union-attr]


def test_logsnr_grid_is_uniform_in_lambda() -> None:
    s = kd.get_sigmas_logsnr(6, 0.03, 14.6)
    lam = -torch.log(s[:-1].double())
    assert torch.allclose(lam.diff(), lam.diff()[:1].expand(5), rtol=1e-5) and s[-1] == 0
    assert torch.equal(s, kd.get_sigmas_exponential(6, 0.03, 14.6))
    sd = dp.DiscreteVPSchedule()
    uniform = kd.get_sigmas_schedule(sd, 5, "time_uniform")
    expected = [sd.knot(t).ksigma for t in (999.0, 749.25, 499.5, 249.75, 0.0)]
    assert torch.allclose(
        uniform[:-1].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6
    )


@needs_k
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("quantize", [False, True])
def test_discrete_wrappers_match_k_diffusion(prediction: str, quantize: bool) -> None:
    """Discrete eps / v networks wrapped as k-diffusion denoisers: the same as k-diffusion's
    ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``, and exact on the mixture."""
    external = load_kdiffusion_external()
    assert external is not None
    sd = dp.DiscreteVPSchedule()
    net = dp.MixtureNetwork(MIX, sd, prediction)  # type: ignore[arg-type]
    acp = sd.alphas_cumprod
    ours_cls, theirs_cls = (
        (kd.DiscreteEpsDDPMDenoiser, external.DiscreteEpsDDPMDenoiser)
        if prediction == "eps"
        else (kd.DiscreteVDDPMDenoiser, external.DiscreteVDDPMDenoiser)
    )
    ours, theirs = ours_cls(net, acp, quantize=quantize), theirs_cls(net, acp, quantize)
    x = torch.randn(4, 8, dtype=torch.float64) * 3
    sigma = torch.tensor([0.05, 0.7, 3.0, 14.0], dtype=torch.float64)
    a, b = ours(x, sigma), theirs(x, sigma)
    assert (a - b).abs().max() < 1e-6
    if not quantize:
        alpha = 1 / torch.sqrt(1 + sigma**2)
        exact = MIX.x0(x * alpha[:, None], alpha, sigma * alpha)
        assert (a - exact).abs().max() < 1e-9
    assert ours.sigma_max == pytest.approx(float(theirs.sigma_max), rel=1e-6)
    assert ours.sigma_min == pytest.approx(float(theirs.sigma_min), rel=1e-6)
    assert torch.allclose(ours.get_sigmas(7).double(), theirs.get_sigmas(7).double(), rtol=1e-5)


def test_discrete_wrapper_samples_an_sd_style_network() -> None:
    """End to end: an eps network on Stable Diffusion's schedule, wrapped and sampled with
    our k-diffusion-style 2M, equals dp.sample on the same grid."""
    sd = dp.DiscreteVPSchedule()
    net = dp.MixtureNetwork(MIX, sd, "eps")
    wrapped = kd.DiscreteEpsDDPMDenoiser(net, sd.alphas_cumprod)
    sigmas = wrapped.get_sigmas(10).double()
    noise = start(torch.tensor([1.0]))
    x = kd.sample_dpmpp_2m(wrapped, noise * sigmas[0], sigmas, disable=True)  # type: ignore[attr-defined]
    ref = dp.sample(
        net,
        noise,
        schedule=sd,
        sigmas=sigmas,
        solver=dp.Recipe("dpmpp_2m", lower_order_final=False),
    )
    assert (x - ref.x).abs().max() < 1e-6


@pytest.mark.parametrize(
    "name", ["sample_dpmpp_2m", "sample_dpmpp_3m", "sample_dpm_2", "sample_euler"]
)
def test_ascending_sigmas_invert(name: str) -> None:
    """Ascending sigmas run the same solver from data to noise; sampling back returns the
    data up to the solver's error, which shrinks with the steps."""
    data = MIX.sample(5, generator=torch.Generator().manual_seed(8))
    errors = []
    for n in (15, 30):
        down = kd.get_sigmas_karras(n, 0.02, 20.0)[:-1].double()
        up = down.flip(0)
        fn = getattr(kd, name)
        latents = fn(Denoiser(), data, up, disable=True)
        back = fn(Denoiser(), latents, down, disable=True)
        errors.append((back - data).abs().max().item())
    # Measured at 30 steps: 2.2e-3 (2M), 4.9e-3 (3M), 6e-4 (DPM-2), 0.19 (Euler, first order).
    assert errors[1] < errors[0] / 1.9 and errors[1] < (0.25 if name == "sample_euler" else 1e-2)


def test_dpm_adaptive_is_accurate_and_reports_nfe() -> None:
    """Our adaptive solver uses DPM-Solver's step-size control (Alg. 4), not k-diffusion's
    PID controller, so it takes other steps; it must reach the exact solution to about its
    tolerance."""
    x = start(torch.tensor([20.0]))
    model = Denoiser()
    out, info = kd.sample_dpm_adaptive(model, x, 0.05, 20.0, rtol=1e-3, atol=1e-4, return_info=True)  # type: ignore[attr-defined]
    sched = dp.VESchedule(0.05, 20.0)
    ref = dp.reference_solve(dp.MixtureDenoiser(MIX), x, sched.knot(20.0), sched.knot(0.05), sched)
    assert (out - ref).abs().max() < 1e-2
    assert info["nfe"] == model.calls > 0
    loose = kd.sample_dpm_adaptive(Denoiser(), x, 0.05, 20.0, order=2, disable=True)  # type: ignore[attr-defined]
    assert (loose - ref).abs().max() < 0.1


def test_extra_args_reach_the_model() -> None:
    sigmas = kd.get_sigmas_karras(8, 0.03, 20.0).double()
    x = start(sigmas)
    y = torch.tensor([0, 1, 0, 1, 1])
    cond = kd.sample_dpmpp_2m(Denoiser(), x, sigmas, extra_args={"y": y}, disable=True)  # type: ignore[attr-defined]
    uncond = kd.sample_dpmpp_2m(Denoiser(), x, sigmas, disable=True)  # type: ignore[attr-defined]
    assert (cond - uncond).abs().max() > 1e-3


def test_disable_controls_the_progress_bar() -> None:
    sigmas = kd.get_sigmas_karras(4, 0.03, 20.0).double()
    for disable, shown in ((True, False), (False, True)):
        err = io.StringIO()
        with redirect_stderr(err):
            kd.sample_euler(Denoiser(), start(sigmas), sigmas, disable=disable)  # type: ignore[attr-defined]
        assert ("4/4" in err.getvalue()) is shown


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_available_entry_runs(name: str) -> None:
    spec = kd.SAMPLERS[name]
    fn = getattr(kd, name)
    model = Denoiser()
    if spec.interface == "sigmas":
        sigmas = kd.get_sigmas_karras(6, 0.03, 20.0).double()
        out = fn(model, start(sigmas), sigmas, disable=True)
    elif spec.interface == "fast":
        out = fn(model, start(torch.tensor([20.0])), 0.03, 20.0, 7, disable=True)
    else:
        out = fn(model, start(torch.tensor([20.0])), 0.03, 20.0, disable=True)
    assert out.shape == (5, 8) and torch.isfinite(out).all() and model.calls > 0
    assert fn.__name__ == name and spec.solver in (fn.__doc__ or "")


def test_table_lists_every_name_once() -> None:
    names = set(kd.SAMPLERS)
    assert set(AVAILABLE) | set(kd.UNAVAILABLE) == names and not set(AVAILABLE) & set(
        kd.UNAVAILABLE
    )
    assert {
        "sample_dpmpp_2m",
        "sample_euler",
        "sample_dpm_2",
        "sample_dpm_fast",
        "sample_dpm_adaptive",
    } <= set(AVAILABLE)
    comfy = {
        "sample_dpmpp_2m_sde",
        "sample_dpmpp_3m_sde",
        "sample_dpmpp_2s_ancestral",
        "sample_uni_pc",
        "sample_uni_pc_bh2",
        "sample_deis",
        "sample_ipndm",
        "sample_euler",
        "sample_heun",
        "sample_lms",
        "sample_dpm_fast",
        "sample_dpm_adaptive",
        "sample_dpmpp_sde",
    }
    assert comfy <= names
    for name, why in kd.UNAVAILABLE.items():
        assert "not registered" in why or "option" in why or "rejects" in why
        with pytest.raises(AttributeError, match=f"{name} is not available"):
            getattr(kd, name)


@needs_k
@pytest.mark.parametrize("name", [n for n in AVAILABLE if K is not None and hasattr(K, n)])
def test_signatures_match_k_diffusion(name: str) -> None:
    ours = inspect.signature(getattr(kd, name))
    theirs = inspect.signature(getattr(K, name))
    assert list(ours.parameters) == list(theirs.parameters)
    for p in theirs.parameters.values():
        if p.default is not inspect.Parameter.empty:
            d = ours.parameters[p.name].default
            assert d == p.default or (
                isinstance(d, float) and math.isinf(d) and math.isinf(p.default)
            )


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda s, x: kd.sample_euler(Denoiser(), x, s, s_churn=1.0),
            ValueError,
            r"s_churn=1.0 is not supported; accepted values: 0.0",
        ),  # type: ignore[attr-defined]
        (
            lambda s, x: kd.sample_dpmpp_2m(Denoiser(), x, s, eta=1.0),
            TypeError,
            r"unexpected keyword argument\(s\) \['eta'\]",
        ),  # type: ignore[attr-defined]
        (
            lambda s, x: kd.sample_dpm_fast(Denoiser(), x, 0.03, 20.0, 5, eta=0.5),
            ValueError,
            r"eta=0.5 is not supported",
        ),  # type: ignore[attr-defined]
        (
            lambda s, x: kd.sample_dpm_fast(Denoiser(), x, 20.0, 0.03, 5),
            ValueError,
            r"sigma_min=20.0 must be < sigma_max",
        ),  # type: ignore[attr-defined]
        (
            lambda s, x: kd.sample_dpm_fast(Denoiser(), x, 0.03, 20.0, 0),
            ValueError,
            r"n must be >= 1",
        ),  # type: ignore[attr-defined]
        (
            lambda s, x: kd.sample_dpm_adaptive(Denoiser(), x, 0.03, 20.0, pcoeff=0.3),
            ValueError,
            r"pcoeff=0.3 .*not a PID",
        ),  # type: ignore[attr-defined]
        (
            lambda s, x: kd.sample_dpm_adaptive(Denoiser(), x, 0.03, 20.0, order=4),
            ValueError,
            r"order \(for solver 'dpm_adaptive'\)=4",
        ),  # type: ignore[attr-defined]
        (
            lambda s, x: kd.sample_dpmpp_2m(Denoiser(), x, s[None]),
            ValueError,
            r"sigmas must be a 1-D sequence",
        ),  # type: ignore[attr-defined]
        (
            lambda s, x: kd.sample_dpmpp_2m(Denoiser(), x, torch.tensor([5.0, 0.0, 1.0])),
            ValueError,
            r"sigma 0 may only be the last",
        ),  # type: ignore[attr-defined]
        (
            lambda s, x: kd.sample_dpmpp_2m(Denoiser(), x, torch.tensor([5.0, 1.0, 3.0])),
            ValueError,
            "strictly monotone",
        ),  # type: ignore[attr-defined]
        (lambda s, x: kd.get_sigmas_karras(0, 0.03, 20.0), ValueError, "n must be >= 1"),
        (lambda s, x: kd.get_sigmas_karras(5, 0.0, 20.0), ValueError, "sigma_min must be > 0"),
        (
            lambda s, x: kd.DiscreteDDPMDenoiser(
                Denoiser(), dp.DiscreteVPSchedule().alphas_cumprod, "epsilon"
            ),
            ValueError,
            r"prediction='epsilon'",
        ),  # type: ignore[arg-type]
    ],
)
def test_bad_input_names_the_problem(call: Any, exc: type[Exception], match: str) -> None:
    sigmas = kd.get_sigmas_karras(5, 0.03, 20.0).double()
    with pytest.raises(exc, match=match):
        call(sigmas, start(sigmas))
