"""DPM-Solver-v3 and its empirical model statistics (dpmsolver.ems, dpmsolver.solvers.v3).

Every claim is checked on the exact Gaussian mixtures in float64: without statistics the
solver is DPM-Solver++ to rounding; with the exact statistics of a mixture it converges with
its claimed order; the estimator approaches the exact statistics; files round-trip; every
mismatch between statistics and sampling run is refused with a ValueError that names it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import dpmsolver as dp
from dpmsolver.ems import (
    EMS,
    EMSFingerprint,
    estimate_ems,
    mixture_ems,
    mixture_x0_and_diag,
    schedule_fingerprint,
)
from dpmsolver.orders import ExactProblem, exact_problem, measure_order, run_fixed, slope
from dpmsolver.solvers.v3 import (
    DPMSolverV3,
    interpolation_matrix,
    interval_integrals,
    recommended_options,
    sample_v3,
    transfer,
)

SD = dp.DiscreteVPSchedule()
SD_RANGE = (SD.knot(SD.t_max).lam, SD.knot(SD.t_min).lam)
MIX4 = dp.default_mixture(dim=4, num_classes=2, components_per_class=2, seed=0)  # sd_problem's


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS difference."""
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def exact4() -> EMS:
    """Exact statistics of sd_problem's mixture (unguided; noised data = ODE marginals)."""
    return mixture_ems(MIX4, SD, points=48, samples=2048, lam_range=SD_RANGE)


# ----------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3])
def test_without_statistics_v3_is_dpmpp_multistep(sd_problem: ExactProblem, order: int) -> None:
    """l = 1, s = b = 0 (no EMS, and the same as tables through the quadrature path) is
    DPM-Solver++ multistep with the exact-interpolation updates (heun / Taylor 3M)."""
    ref = run_fixed(sd_problem, dp.get_solver("dpmpp_multistep", order, variant="heun"), 24).x
    plain = run_fixed(sd_problem, dp.get_solver("dpmv3", order, corrector="off"), 24).x
    tables = run_fixed(
        sd_problem, dp.get_solver("dpmv3", order, corrector="off", ems=EMS.degenerate()), 24
    ).x
    assert float((plain - ref).abs().max()) < 1e-13
    assert float((tables - ref).abs().max()) < 1e-11
    # and through dp.sample (warm-up, lower-order final steps, the step to sigma = 0)
    net = dp.MixtureNetwork(MIX4, SD)
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = dp.sample(
        net,
        z,
        schedule=SD,
        steps=7,
        solver=dp.Recipe("dpmpp_multistep", {"variant": "heun", "order": order}),
    ).x
    b = dp.sample(
        net,
        z,
        schedule=SD,
        steps=7,
        solver=dp.Recipe("dpmv3", {"corrector": "off", "ems": EMS.degenerate(), "order": order}),
    ).x
    assert float((a - b).abs().max()) < 1e-11


def test_interval_integrals_match_fine_quadrature() -> None:
    """The step integrals (exact spline antiderivatives + nested Gauss) against a fine
    trapezoidal evaluation of their definitions, across grid intervals, both directions."""
    ems = EMS.synthetic(points=31)
    sp = ems.spline()
    for a, c in ((-1.3, 0.9), (2.2, 0.4)):
        ints = interval_integrals(sp, a, c, 3)
        lam = torch.linspace(a, c, 40001, dtype=torch.float64)
        (_, _, b_), (big_l, big_s) = sp.at(lam.tolist())
        u, v = big_l - big_l[0], big_s - big_s[0]

        def trap(f: torch.Tensor, lam: torch.Tensor = lam) -> torch.Tensor:
            return torch.trapezoid(f, lam)

        e = torch.exp(u + v)
        tau = (lam - a) / (c - a)
        w_run = torch.cat(
            [
                torch.zeros(1, dtype=torch.float64),
                torch.cumulative_trapezoid(torch.exp(-v) * b_, lam),
            ]
        )
        assert abs(float(ints.u - u[-1])) < 1e-12 and abs(float(ints.v - v[-1])) < 1e-12
        for k in range(3):
            assert abs(float(ints.moments[k] - trap(e * tau**k))) < 1e-8
        assert abs(float(ints.bias - trap(e * w_run))) < 1e-8
        assert abs(float(ints.w_end - w_run[-1])) < 1e-8
        dv, beta = transfer(sp, a, c)
        assert abs(float(dv - v[-1])) < 1e-12 and abs(float(beta - w_run[-1])) < 1e-8


def test_pseudo_interpolation_is_newton_without_its_products() -> None:
    taus = [0.0, 1.0, -0.8]
    exact, pseudo = interpolation_matrix(taus, False), interpolation_matrix(taus, True)
    g = [0.3, -1.1, 2.0]
    # pseudo: g0 + g[0,1] tau + g[0,1,2] tau^2
    d01 = (g[0] - g[1]) / (taus[0] - taus[1])
    d12 = (g[1] - g[2]) / (taus[1] - taus[2])
    d012 = (d01 - d12) / (taus[0] - taus[2])
    coeffs = [sum(pseudo[i][k] * g[i] for i in range(3)) for k in range(3)]
    assert coeffs == pytest.approx([g[0], d01, d012])
    # exact: the interpolating quadratic reproduces g at the nodes
    for j, t in enumerate(taus):
        value = sum(exact[i][k] * g[i] * t**k for i in range(3) for k in range(3))
        assert value == pytest.approx(g[j])
    two = [0.0, -0.5]
    flat = [v for row in interpolation_matrix(two, False) for v in row]
    assert [v for row in interpolation_matrix(two, True) for v in row] == pytest.approx(flat)


def test_mixture_jacobian_diagonal_matches_autograd() -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 2])  # 2 = unconditional
    k = SD.knot(400.0)
    for w in (1.0, 4.0):
        den = dp.MixtureDenoiser(MIX4, y=y, guidance_scale=w)
        jac = torch.autograd.functional.jacobian(lambda xx, den=den: den(xx, k).sum(0), x)
        auto = torch.stack([jac[:, i, :].diagonal() for i in range(5)])
        mean, diag = mixture_x0_and_diag(MIX4, x, k.alpha, k.sigma, y, w)
        assert float((mean - den(x, k)).abs().max()) < 1e-14
        assert float((diag - auto).abs().max()) < 1e-12


# ----------------------------------------------------------------------------------------
# Convergence order with exact statistics
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        {"order": 2, "corrector": "off"},
        {"order": 3, "corrector": "off"},
        {"order": 2, "corrector": "pseudo"},
        {"order": 3, "corrector": "full"},
    ],
    ids=str,
)
def test_order_with_exact_statistics(sd_problem: ExactProblem, exact4: EMS, cfg: dict) -> None:
    solver = dp.get_solver("dpmv3", ems=exact4, **cfg)
    nfes, errs = measure_order(sd_problem, solver)
    assert abs(slope(nfes, errs) - solver.claimed_order) <= 0.3, (cfg, errs)
    assert errs[-1] < 1e-4


def test_order_with_exact_guided_trajectory_statistics() -> None:
    """Guidance 4 (exact_problem's labels cycle over 2 classes), statistics on the guided
    ODE's own trajectories; the UniC-like corrector makes it fourth order.

    (Without a corrector the first, first-order step's O(h^2) error, 2.3e-7 at h = 0.01
    with or without statistics, is what remains at 640 steps: the order-3 predictor's
    slope there is 2.5 with these statistics. DPM-Solver++(3M) has the same start.)"""
    problem = exact_problem(SD, 50.0, guidance=4.0)
    ems = mixture_ems(
        MIX4,
        SD,
        guidance_scale=4.0,
        states="trajectory",
        points=40,
        samples=512,
        lam_range=SD_RANGE,
    )
    solver = dp.get_solver("dpmv3", 3, ems=ems, corrector="full")
    nfes, errs = measure_order(problem, solver)
    assert abs(slope(nfes, errs) - solver.claimed_order) <= 0.3, errs


def test_claimed_orders() -> None:
    def claim(**kw: object) -> float:
        return DPMSolverV3(**kw).claimed_order  # type: ignore[arg-type]

    assert claim(order=3, corrector="off") == 3.0
    assert claim(order=3, corrector="off", pseudo_order=True) == 2.0
    assert claim(order=3, corrector="pseudo") == 2.0
    assert claim(order=1, corrector="pseudo") == 2.0
    assert claim(order=3, corrector="same") == 3.0
    assert claim(order=2, corrector="full") == 3.0
    assert claim(order=2, corrector="full", half_corrector=True) == 2.0


# ----------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------


def test_estimator_approaches_the_exact_statistics() -> None:
    """Noised-sample statistics of the unguided mixture: the estimate (Rademacher probes,
    central differences) against the exact ones, at two sample counts."""
    exact = mixture_ems(MIX4, SD, points=24, samples=16384, batch_size=8192, lam_range=SD_RANGE)
    errs = []
    for n in (128, 2048):
        data = MIX4.sample(n, generator=torch.Generator().manual_seed(5))
        est = estimate_ems(
            dp.MixtureDenoiser(MIX4),
            SD,
            data=data,
            prediction="eps",
            guidance_scale=1.0,
            points=24,
            lam_range=SD_RANGE,
            batch_size=128,
        )
        errs.append((rel(est.l, exact.l), rel(est.s, exact.s), rel(est.b, exact.b)))
    (l1, s1, b1), (l2, s2, b2) = errs
    assert l2 < 0.012 and s2 < 0.05 and b2 < 0.05, errs  # measured 0.005, 0.02, 0.02
    assert l2 + s2 + b2 < 0.5 * (l1 + s1 + b1), errs  # 16x the samples: ~4x less noise
    assert est.samples == 2048 and est.source == "estimated"
    assert est.fingerprint == EMSFingerprint(schedule_fingerprint(SD), "eps", 1.0)


def test_trajectory_estimator_under_guidance() -> None:
    """With guidance the expectations are over the guided ODE's states: the estimator
    integrates them itself and matches the exact trajectory statistics."""
    w, bs = 4.0, 64
    exact = mixture_ems(
        MIX4, SD, guidance_scale=w, states="trajectory", points=24, samples=4096, lam_range=SD_RANGE
    )
    den = dp.MixtureDenoiser(MIX4, y=torch.arange(bs) % 2, guidance_scale=w)
    noise = torch.randn(512, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    est = estimate_ems(
        den,
        SD,
        noise=noise,
        prediction="eps",
        guidance_scale=w,
        points=24,
        lam_range=SD_RANGE,
        batch_size=bs,
    )
    assert rel(est.l, exact.l) < 0.02 and rel(est.s, exact.s) < 0.1, (
        rel(est.l, exact.l),
        rel(est.s, exact.s),
        rel(est.b, exact.b),
    )


class _Counting:
    """A mixture denoiser that counts calls and can fail after a number of them."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.den = dp.MixtureDenoiser(MIX4)
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, x: torch.Tensor, knot: dp.Knot) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        return self.den(x, knot)


@pytest.mark.parametrize("mode", ["data", "noise"])
def test_checkpoint_resumes_where_it_stopped(tmp_path: Path, mode: str) -> None:
    samples = torch.randn(64, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    if mode == "data":
        samples = MIX4.sample(64, generator=torch.Generator().manual_seed(2))
    kw = dict(
        prediction="eps",
        guidance_scale=1.0,
        points=12,
        lam_range=SD_RANGE,
        batch_size=32,
        chunk=4,
        **{mode: samples},
    )
    full = estimate_ems(_Counting(), SD, **kw)  # type: ignore[arg-type]
    ckpt = tmp_path / "ems.ckpt"
    per_point = 2 * 3  # two batches, one JVP and two differences each
    with pytest.raises(KeyboardInterrupt):
        estimate_ems(_Counting(fail_after=6 * per_point), SD, checkpoint=ckpt, **kw)  # type: ignore[arg-type]
    again = _Counting()
    resumed = estimate_ems(again, SD, checkpoint=ckpt, **kw)  # type: ignore[arg-type]
    assert again.calls == (12 - 4) * per_point  # the first chunk of 4 points was kept
    for name in ("l", "s", "b"):
        assert torch.equal(getattr(resumed, name), getattr(full, name))
    other = dict(kw, points=13)
    with pytest.raises(ValueError, match="another EMS run"):
        estimate_ems(_Counting(), SD, checkpoint=ckpt, **other)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------
# Files and errors
# ----------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path, exact4: EMS, sd_problem: ExactProblem) -> None:
    path = tmp_path / "stats.safetensors"
    exact4.save(path)
    back = EMS.load(path)
    assert back.fingerprint == exact4.fingerprint and back.source == "exact"
    for name in ("lams", "l", "s", "b"):
        assert torch.equal(getattr(back, name), getattr(exact4, name))
    a = run_fixed(sd_problem, dp.get_solver("dpmv3", 3, ems=exact4), 10).x
    b = run_fixed(sd_problem, dp.get_solver("dpmv3", 3, ems=back), 10).x
    assert torch.equal(a, b)


def test_files_that_are_not_ems_files_are_refused(tmp_path: Path, exact4: EMS) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="corrupt"):
        EMS.load(bad)
    weights = Path(dp.__file__).parent / "digits" / "weights" / "denoiser.safetensors"
    with pytest.raises(ValueError, match="not a dpmsolver EMS file"):
        EMS.load(weights)
    import safetensors.torch as st

    good = tmp_path / "good.safetensors"
    exact4.save(good)
    tensors = st.load_file(str(good))
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
    st.save_file(
        tensors, str(tmp_path / "v9.safetensors"), metadata={**meta, "format_version": "9"}
    )
    with pytest.raises(ValueError, match="format_version"):
        EMS.load(tmp_path / "v9.safetensors")
    del tensors["s"]
    st.save_file(tensors, str(tmp_path / "no_s.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"lacks tensors \['s'\]"):
        EMS.load(tmp_path / "no_s.safetensors")


def test_statistics_of_another_run_are_refused(exact4: EMS) -> None:
    net = dp.MixtureNetwork(MIX4, SD)
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # another schedule: the solver checks the fingerprint at its first step
    other = dp.ContinuousVPSchedule("linear")
    with pytest.raises(ValueError, match="schedule") as info:
        dp.sample(
            dp.MixtureNetwork(MIX4, other),
            z,
            schedule=other,
            steps=5,
            solver=dp.Recipe("dpmv3", {"ems": exact4}),
        )
    assert "DiscreteVPSchedule" in str(info.value) and "ContinuousVPSchedule" in str(info.value)
    # another prediction or guidance scale: sample_v3 checks what the solver cannot see
    with pytest.raises(ValueError, match="prediction='v'"):
        sample_v3(net, z, ems=exact4, schedule=SD, prediction="v", steps=5)
    with pytest.raises(ValueError, match=r"guidance_scale=7\.5"):
        sample_v3(net, z, ems=exact4, schedule=SD, guidance_scale=7.5, steps=5)
    assert sample_v3(net, z, ems=exact4, schedule=SD, steps=5).nfe == 5
    # a grid that does not cover the sampling interval
    short = mixture_ems(MIX4, SD, points=8, samples=64, lam_range=(-1.0, 2.0))
    with pytest.raises(ValueError, match=r"covers lambda in \[-1, 2\]"):
        dp.sample(net, z, schedule=SD, steps=5, solver=dp.Recipe("dpmv3", {"ems": short}))
    with pytest.raises(ValueError, match="covers lambda"):
        sample_v3(net, z, ems=short, schedule=SD, steps=5)
    # statistics of another sample shape
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        dp.sample(
            dp.MixtureNetwork(dp.default_mixture(dim=5), SD),
            torch.randn(2, 5),
            schedule=SD,
            steps=4,
            solver=dp.Recipe("dpmv3", {"ems": exact4}),
        )
    with pytest.raises(TypeError, match="ems must be"):
        dp.get_solver("dpmv3", ems="stats.safetensors")


def test_estimator_arguments_are_checked() -> None:
    den = dp.MixtureDenoiser(MIX4)
    x = torch.randn(10, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="exactly one of data"):
        estimate_ems(den, SD, prediction="eps", guidance_scale=1.0)
    with pytest.raises(ValueError, match="exactly one of data"):
        estimate_ems(den, SD, data=x, noise=x, prediction="eps", guidance_scale=1.0)
    with pytest.raises(ValueError, match="batch_size=4 must divide"):
        estimate_ems(den, SD, data=x, prediction="eps", guidance_scale=1.0, batch_size=4)
    with pytest.raises(ValueError, match="lam_range is required"):
        estimate_ems(
            den,
            dp.RectifiedFlowSchedule(),
            data=x,
            prediction="eps",
            guidance_scale=1.0,
            batch_size=5,
        )


# ----------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------


def test_auto_corrector_follows_the_official_large_guidance_rule() -> None:
    def with_w(w: float) -> EMS:
        e = EMS.synthetic(points=8)
        return EMS(e.lams, e.l, e.s, e.b, EMSFingerprint("x", "eps", w))

    assert DPMSolverV3(ems=with_w(7.5)).corrector_mode == "off"
    assert DPMSolverV3(ems=with_w(3.0)).corrector_mode == "pseudo"
    assert DPMSolverV3().corrector_mode == "pseudo"
    assert recommended_options(7.5, 10) == {
        "order": 2,
        "corrector": "off",
        "pseudo_order": False,
        "half_corrector": False,
    }
    assert recommended_options(1.0, 5)["order"] == 3 and recommended_options(1.0, 5)["pseudo_order"]


def test_half_corrector_corrects_only_the_noisier_half(exact4: EMS) -> None:
    """Points with t > (t_min + t_max)/2 are corrected, the others are not."""
    den = dp.MixtureDenoiser(MIX4)
    z = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(t_start: float, t_end: float, **kw: object) -> torch.Tensor:
        grid = dp.make_grid(SD, 6, "logsnr", t_start=t_start, t_end=t_end, final="t_min")
        solver = dp.get_solver("dpmv3", 2, ems=exact4, **kw)
        return dp.solve(den, z * grid.knots[0].sigma, grid, solver).x

    half = {"corrector": "pseudo", "half_corrector": True}
    assert torch.equal(run(450.0, 20.0, **half), run(450.0, 20.0, corrector="off"))
    assert torch.equal(run(999.0, 560.0, **half), run(999.0, 560.0, corrector="pseudo"))
    assert not torch.equal(run(999.0, 560.0, **half), run(999.0, 560.0, corrector="off"))


def test_per_dimension_statistics_never_read_tensors_on_the_host() -> None:
    from tests.test_no_sync import forbid_host_reads

    e = EMS.synthetic(points=40)
    shape = (3, 4, 4)
    ramp = torch.linspace(0.9, 1.1, math.prod(shape), dtype=torch.float64).view(1, *shape)
    ems = EMS(
        e.lams,
        e.l[:, None, None, None] * ramp[0],
        e.s[:, None, None, None] * ramp[0],
        e.b[:, None, None, None] * ramp[0],
        source="synthetic",
    )
    fixed = torch.randn(2, *shape) * 0.1

    def denoiser(xt: torch.Tensor, knot: dp.Knot) -> torch.Tensor:
        return fixed + 0.01 * xt

    grid = dp.make_grid(SD, 8)
    with forbid_host_reads():
        out = dp.solve(
            denoiser,
            torch.randn(2, *shape),
            grid,
            dp.get_solver("dpmv3", 3, ems=ems, corrector="pseudo"),
            check_finite="off",
        )
    assert out.x.dtype == torch.float32 and torch.isfinite(out.x).all()


def test_v3_with_statistics_runs_through_the_front_ends(tmp_path: Path) -> None:
    """The diffusers scheduler (statistics as a file path in solver_options, replayed since
    the coefficients are per dimension) and the k-diffusion-style function give what the
    loop gives on the same knots."""
    diffusers = pytest.importorskip("diffusers")
    from dpmsolver.frontends import kdiffusion as kd
    from dpmsolver.frontends.diffusers_scheduler import DPMSolverScheduler

    sched_cfg = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).config
    schedule = dp.schedule_from_diffusers_config(sched_cfg)
    mix = dp.default_mixture(dim=4, num_classes=2, components_per_class=2, seed=0)
    ems = mixture_ems(mix, schedule, points=64, samples=256)
    path = tmp_path / "ems.safetensors"
    ems.save(path)
    s = DPMSolverScheduler.from_config(
        sched_cfg, solver="dpmv3", solver_options={"ems": str(path), "corrector": "pseudo"}
    )
    s.set_timesteps(8)
    net = dp.MixtureNetwork(mix, schedule, "eps")
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = z * s._knots[0].sigma
    for t in s.timesteps:
        x = s.step(net(x, torch.full((3,), float(t), dtype=torch.float64)), t, x).prev_sample
    solver = dp.get_solver("dpmv3", 2, ems=ems, corrector="pseudo")
    # the scheduler's own knots (their network times are diffusers' integer timesteps)
    grid = dp.TimeGrid(tuple(s._knots), schedule)
    ref = dp.solve(dp.ModelDenoiser(net), z * grid.knots[0].sigma, grid, solver)
    assert torch.isfinite(x).all() and float((x - ref.x).abs().max()) < 1e-6
    # k-diffusion: the same statistics in k-diffusion's variables
    sigmas = kd.get_sigmas_karras(7, 0.05, 14.0).double()
    ve = dp.VESchedule(0.01, 20.0)

    def kmodel(xk: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        k = schedule.knot_at_lambda(-math.log(float(sigma.flatten()[0])))
        return dp.MixtureDenoiser(mix)(xk * k.alpha, k)

    out = kd.sample_dpmv3(kmodel, z * sigmas[0], sigmas, disable=True, ems=ems, corrector="off")
    plain = kd.sample_dpmv3(kmodel, z * sigmas[0], sigmas, disable=True, corrector="off")
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert ve.t_min < 0.05  # the VE view the function builds covers these sigmas
