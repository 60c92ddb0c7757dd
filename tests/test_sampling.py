"""The sampling loop: identities, NFE accounting, warm-up and final steps, inversion,
NaN detection, memory, dtypes, devices, batches, callbacks."""

from __future__ import annotations

import gc
import io
import math
from contextlib import redirect_stderr

import pytest
import torch

import dpmsolver as dp
from dpmsolver.progress import Progress
from dpmsolver.solvers import AdaptiveSolver, Form, MultistepDPMSolver, configurations

SD = dp.DiscreteVPSchedule()
MIX = dp.default_mixture(dim=6, num_classes=3, components_per_class=2, seed=1)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def noise(b: int = 4, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 6, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_first_order_solvers_are_ddim() -> None:
    """DPM-Solver++(1) = DPM-Solver(1) = DDIM: x_t = alpha_t x0 + sigma_t eps (DDIM Eq. 12)."""
    net = dp.MixtureNetwork(MIX, SD, "eps")
    z = noise()
    results = [
        dp.sample(
            net, z, schedule=SD, steps=12, solver=dp.Recipe(name, {"order": o}, final="t_min")
        ).x
        for name, o in (
            ("ddim", 1),
            ("dpmpp_multistep", 1),
            ("dpm_multistep", 1),
            ("dpmpp_singlestep", 1),
        )
    ]
    grid = dp.make_grid(SD, 12, final="t_min")
    x = z * grid.knots[0].sigma
    for s, t in zip(grid.knots, grid.knots[1:], strict=False):
        eps = net(x, torch.full((4,), s.model_t, dtype=torch.float64))
        x0 = (x - s.sigma * eps) / s.alpha
        x = t.alpha * x0 + t.sigma * eps
    for r in results:
        assert torch.allclose(r, x, atol=1e-12, rtol=1e-10)


NFE_CASES = [
    (name, dict(cfg)) for name, cfg, s in configurations() if not isinstance(s, AdaptiveSolver)
]


@pytest.mark.parametrize(("name", "cfg"), NFE_CASES, ids=[f"{n}-{c}" for n, c in NFE_CASES])
@pytest.mark.parametrize("final", ["zero", "t_min"])
@pytest.mark.parametrize("steps", [1, 2, 5, 16])
def test_nfe_spent_equals_nfe_claimed(name: str, cfg: dict, final: str, steps: int) -> None:
    net = dp.MixtureNetwork(MIX, SD)
    cfg = dict(cfg)
    order = cfg.pop("order")
    r = dp.sample(
        net,
        noise(),
        schedule=SD,
        steps=steps,
        solver=dp.Recipe(name, {**cfg, "order": order}, final=final),
    )  # type: ignore[arg-type]
    assert r.nfe == r.planned_nfe == net.calls
    solver = dp.get_solver(name, order, **cfg)
    per_step = [
        1 if (final == "zero" and i == steps - 1) else solver.step_evals(i, o)
        for i, o in enumerate(r.orders)
    ]
    assert r.nfe == sum(per_step)
    assert torch.isfinite(r.x).all()


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "dpmpp_fast", "dpm_fast", "ddim"])
@pytest.mark.parametrize("budget", [1, 2, 3, 4, 5, 7, 10, 11, 20])
@pytest.mark.parametrize("final", ["zero", "t_min"])
def test_nfe_budget_is_spent_exactly(name: str, budget: int, final: str) -> None:
    net = dp.MixtureNetwork(MIX, SD)
    r = dp.sample(net, noise(), schedule=SD, nfe=budget, solver=dp.Recipe(name, final=final))  # type: ignore[arg-type]
    assert r.nfe == budget == net.calls


def test_singlestep_budget_must_fit() -> None:
    net = dp.MixtureNetwork(MIX, SD)
    r = dp.sample(net, noise(), schedule=SD, nfe=10, solver=dp.Recipe("dpmpp_3s", final="zero"))
    assert r.nfe == 10 and r.orders == [3, 3, 3, 1]
    with pytest.raises(ValueError, match="nfe=11 cannot be spent"):
        dp.sample(net, noise(), schedule=SD, nfe=11, solver=dp.Recipe("dpmpp_3s", final="zero"))


def test_fast_order_mix() -> None:
    s = dp.get_solver("dpmpp_fast")
    plan = s.plan(steps=None, nfe=10, final_zero=False, lower_order_final=False)
    assert plan == [3, 3, 3, 1] and sum(plan) == 10
    assert s.plan(steps=None, nfe=12, final_zero=False, lower_order_final=False) == [3, 3, 3, 2, 1]
    assert s.plan(steps=None, nfe=11, final_zero=False, lower_order_final=False) == [3, 3, 3, 2]
    assert s.plan(steps=None, nfe=11, final_zero=True, lower_order_final=False) == [3, 3, 3, 1, 1]


def test_warm_up_and_lower_order_final_orders() -> None:
    s3 = dp.get_solver("dpmpp_3m")
    assert s3.plan(steps=10, nfe=None, final_zero=False, lower_order_final=True) == [
        1,
        2,
        3,
        3,
        3,
        3,
        3,
        3,
        2,
        1,
    ]
    assert s3.plan(steps=20, nfe=None, final_zero=True, lower_order_final=False) == [1, 2] + [
        3
    ] * 17 + [1]
    net = dp.MixtureNetwork(MIX, SD)
    assert dp.sample(net, noise(), schedule=SD, solver="dpmpp_3m", steps=10).orders == [
        1,
        2,
        3,
        3,
        3,
        3,
        3,
        3,
        2,
        1,
    ]
    assert dp.sample(net, noise(), schedule=SD, solver="dpmpp_3m", steps=16).orders == [1, 2] + [
        3
    ] * 13 + [1]
    assert dp.sample(
        net, noise(), schedule=SD, steps=16, solver=dp.Recipe("dpmpp_3m", lower_order_final=True)
    ).orders[-3:] == [3, 2, 1]


def test_pndm_warm_up_plans_and_budgets() -> None:
    """PNDM's warm-up costs extra evaluations: 3 pseudo Runge-Kutta steps of 4 (PNDM) or one
    pseudo improved Euler step of 2 (PLMS); budgets must fit whole steps."""
    pndm, plms = dp.get_solver("pndm"), dp.get_solver("plms")
    plan = pndm.plan(steps=6, nfe=None, final_zero=True, lower_order_final=True)
    assert plan == [4, 4, 4, 4, 4, 1]
    assert [pndm.step_evals(i, o) for i, o in enumerate(plan)] == [4, 4, 4, 1, 1, 1]
    plan = plms.plan(steps=6, nfe=None, final_zero=False, lower_order_final=True)
    assert plan == [2, 2, 3, 4, 4, 4]
    assert [plms.step_evals(i, o) for i, o in enumerate(plan)] == [2, 1, 1, 1, 1, 1]
    net = dp.MixtureNetwork(MIX, SD)
    cases = (("pndm", 20, [4] * 10 + [1]), ("pndm", 4, [4]), ("plms", 7, [2, 2, 3, 4, 4, 1]))
    for name, budget, orders in cases:
        net.calls = 0
        final = "zero" if orders[-1] == 1 else "t_min"
        r = dp.sample(net, noise(), schedule=SD, nfe=budget, solver=dp.Recipe(name, final=final))
        assert r.orders == orders and r.nfe == budget == net.calls
    with pytest.raises(ValueError, match="nfe=6 cannot be spent by whole PNDM steps"):
        dp.sample(net, noise(), schedule=SD, solver="pndm", nfe=6)


def test_unipc_corrector_reuses_the_next_evaluation() -> None:
    """UniPC's corrector costs nothing: same NFE as the predictor alone, and only the states
    after the first step differ (the last step's output is never corrected)."""
    den = dp.MixtureDenoiser(MIX)
    grid = dp.make_grid(SD, 6, final="t_min")
    x = noise() * grid.knots[0].sigma
    with_c = dp.solve(den, x, grid, dp.get_solver("unipc", 3), return_intermediates=True)
    unip = dp.get_solver("unipc", 3, use_corrector=False)
    without = dp.solve(den, x, grid, unip, return_intermediates=True)
    assert with_c.nfe == without.nfe == 6
    assert with_c.trajectory is not None and without.trajectory is not None
    assert torch.equal(with_c.trajectory[0], without.trajectory[0])
    assert not torch.allclose(with_c.trajectory[1], without.trajectory[1])


def test_warm_up_steps_equal_the_lower_order_updates() -> None:
    """Step 1 of 3M is DDIM and step 2 is the 2M update (shared history)."""
    den = dp.MixtureDenoiser(MIX)
    grid = dp.make_grid(SD, 2, final="t_min")
    x = noise() * grid.knots[0].sigma
    r3 = dp.solve(den, x, grid, dp.get_solver("dpmpp_3m"), lower_order_final=False)
    r2 = dp.solve(den, x, grid, dp.get_solver("dpmpp_2m"), lower_order_final=False)
    r1 = dp.solve(den, x, grid, dp.get_solver("ddim"), return_intermediates=True)
    assert r3.orders == [1, 2]
    assert torch.equal(r3.x, r2.x)
    assert not torch.allclose(r2.x, r1.x)


def test_final_step_to_zero_is_the_data_prediction() -> None:
    net = dp.MixtureNetwork(MIX, SD)
    seen: list[dp.StepInfo] = []
    r = dp.sample(net, noise(), schedule=SD, solver="dpmpp_3m", steps=8, callback=seen.append)
    assert seen[-1].sigma_next == 0.0
    assert torch.equal(r.x, seen[-1].denoised)
    assert torch.isfinite(r.x).all()


PURE_NOISE_SOLVERS = ["dpmpp_2m", "dpmpp_3m", "dpm_2m", "dpmpp_2s", "dpmpp_3s"]
PURE_NOISE_SOLVERS += ["unipc", "unipc_bh1", "deis", "euler", "heun", "ipndm", "pndm", "plms"]


@pytest.mark.parametrize("name", PURE_NOISE_SOLVERS)
def test_starting_from_pure_noise_is_finite(name: str) -> None:
    """Rectified flow at t = 1 (alpha = 0, lambda = -inf): first-order step out of it."""
    flow = dp.RectifiedFlowSchedule(t_max=1.0)
    net = dp.MixtureNetwork(MIX, flow, "flow")
    recipe = dp.Recipe(name, grid="time_uniform", t_start=1.0)  # the default starts inside
    r = dp.sample(net, noise(), schedule=flow, prediction="flow", solver=recipe, steps=6)
    assert r.orders[0] == 1 and torch.isfinite(r.x).all()


@pytest.mark.parametrize(
    ("name", "steps", "tol"),
    [
        ("ddim", 400, 2e-2),
        ("dpmpp_2m", 100, 5e-3),
        ("dpmpp_3m", 100, 1e-3),
        ("dpm_3m", 100, 1e-3),
        ("dpmpp_3s", 40, 1e-3),
    ],
)
def test_inversion_then_sampling_returns_the_input(name: str, steps: int, tol: float) -> None:
    net = dp.MixtureNetwork(MIX, SD)
    data = MIX.sample(4, generator=torch.Generator().manual_seed(3))
    recipe = dp.Recipe(name, t_end=20.0, final="t_min")
    z = dp.invert(net, data, schedule=SD, solver=recipe, steps=steps)
    assert z.grid.is_inversion and torch.isfinite(z.x).all()
    back = dp.sample(net, z.x, schedule=SD, solver=recipe, steps=steps)
    err = float((back.x - data).abs().max())
    assert err < tol, err


def test_nan_is_reported_with_step_time_and_samples() -> None:
    base = dp.MixtureNetwork(MIX, SD)

    def bad(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = base(x, t)
        if float(t[0]) < 500:
            out = out.clone()
            out[1] = float("nan")
        return out

    for mode in ("end", "step"):
        with pytest.raises(dp.NonFiniteError, match=r"step \d+ \(to t=") as info:
            dp.sample(
                bad,
                noise(),
                schedule=SD,
                steps=10,
                grid="time_uniform",
                options=dp.SampleOptions(check_finite=mode),
            )  # type: ignore[arg-type]
        assert info.value.samples == [1]
        assert info.value.step == 5  # knots 999, 888, ..., 555, 444: step 5 starts below 500
    calls = {"n": 0}

    def counting(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return bad(x, t)

    with pytest.raises(dp.NonFiniteError):
        dp.sample(
            counting,
            noise(),
            schedule=SD,
            steps=10,
            grid="time_uniform",
            options=dp.SampleOptions(check_finite="step"),
        )
    assert calls["n"] == 6  # stopped at the bad step


def test_nan_error_lists_every_bad_sample_and_keeps_the_finite_ones() -> None:
    """check_finite="end": each sample that went bad is mapped to its own first bad step,
    and the final state is attached so the finite rows are not lost."""
    base = dp.MixtureNetwork(MIX, SD)

    def bad(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = base(x, t).clone()
        if float(t[0]) < 800:
            out[2] = float("inf")
        if float(t[0]) < 500:
            out[0] = float("nan")
        return out

    clean = dp.sample(base, noise(), schedule=SD, steps=10, grid="time_uniform")
    with pytest.raises(dp.NonFiniteError) as info:
        dp.sample(bad, noise(), schedule=SD, steps=10, grid="time_uniform")
    err = info.value
    assert err.step == 2 and err.samples == [2]
    assert err.sample_steps == {0: 5, 2: 2}
    assert err.x is not None and torch.equal(err.x[1], clean.x[1])
    with pytest.raises(dp.NonFiniteError) as info:
        dp.sample(
            bad,
            noise(),
            schedule=SD,
            steps=10,
            grid="time_uniform",
            options=dp.SampleOptions(check_finite="step"),
        )
    assert info.value.sample_steps == {2: 2} and info.value.x is None


def test_multistep_memory_is_bounded() -> None:
    """History holds at most order-1 predictions; live state tensors do not grow with steps."""
    den = dp.MixtureDenoiser(MIX)
    shape = (3, 6)

    def live() -> int:
        gc.collect()
        return sum(
            1 for o in gc.get_objects() if type(o) is torch.Tensor and tuple(o.shape) == shape
        )

    for order in (2, 3):
        counts: dict[int, int] = {}

        def cb(info: dp.StepInfo, counts: dict[int, int] = counts) -> None:
            if info.index in (10, 40, 70):
                counts[info.index] = live()

        grid = dp.make_grid(SD, 80, final="t_min")
        solver = dp.get_solver("dpmpp_multistep", order)
        dp.solve(den, noise(3) * grid.knots[0].sigma, grid, solver, callback=cb)
        assert counts[10] == counts[40] == counts[70], counts
        state = solver.init_state()
        for i in range(5):
            ctx = dp.solvers.StepContext(i, grid.knots[i], grid.knots[i + 1], order, den, SD)
            _, state = solver.step(ctx, noise(3), noise(3), state)
        assert len(state.preds) == order - 1


@pytest.mark.parametrize("model_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_outputs(model_dtype: torch.dtype) -> None:
    net = dp.MixtureNetwork(MIX, SD)
    dtypes: list[torch.dtype] = []

    def half_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x.dtype == model_dtype
        return net(x, t).to(model_dtype)

    z = noise(dtype=torch.float32)
    ref = dp.sample(net, z, schedule=SD, steps=10).x
    r = dp.sample(
        half_net,
        z.to(model_dtype),
        schedule=SD,
        steps=10,
        callback=lambda i: dtypes.append(i.x.dtype),
    )
    assert r.x.dtype == model_dtype
    assert set(dtypes) == {torch.float32}  # solver arithmetic stays in float32
    assert float((r.x.float() - ref).abs().max()) < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_dtypes_and_device(dtype: torch.dtype) -> None:
    mix = MIX

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x.device.type == torch.device(DEVICE).type
        return dp.MixtureNetwork(mix, SD)(x.cpu(), t.cpu()).to(x.device)

    r = dp.sample(
        net,
        noise(dtype=dtype).to(DEVICE),
        schedule=SD,
        steps=10,
        options=dp.SampleOptions(thresholding=True),
    )
    assert r.x.dtype == dtype and r.x.device.type == torch.device(DEVICE).type
    assert torch.isfinite(r.x).all()


def test_batch_of_one_and_per_sample_conditioning() -> None:
    net = dp.MixtureNetwork(MIX, SD)
    y = torch.tensor([0, 2, 1, 0])
    null = torch.full_like(y, MIX.num_classes)
    z = noise()
    kw = dict(schedule=SD, solver="dpmpp_3m", steps=12, guidance_scale=3.0)
    batch = dp.sample(net, z, cond={"y": y}, uncond={"y": null}, **kw).x  # type: ignore[arg-type]
    for i in range(4):
        one = dp.sample(
            net, z[i : i + 1], cond={"y": y[i : i + 1]}, uncond={"y": null[i : i + 1]}, **kw
        ).x  # type: ignore[arg-type]
        assert torch.allclose(one[0], batch[i], atol=1e-12)


def test_callback_intermediates_and_progress() -> None:
    net = dp.MixtureNetwork(MIX, SD)
    infos: list[dp.StepInfo] = []
    err = io.StringIO()
    with redirect_stderr(err):
        r = dp.sample(
            net,
            noise(),
            schedule=SD,
            steps=6,
            callback=infos.append,
            progress=True,
            options=dp.SampleOptions(return_intermediates=True),
        )
    assert [i.index for i in infos] == list(range(6))
    assert [i.nfe for i in infos] == list(range(1, 7))
    assert (
        r.trajectory is not None and len(r.trajectory) == 6 and torch.equal(r.trajectory[-1], r.x)
    )
    assert r.denoised is not None and len(r.denoised) == 6
    assert infos[0].t == 999.0 and "6/6" in err.getvalue()
    quiet = io.StringIO()
    with redirect_stderr(quiet):
        dp.sample(net, noise(), schedule=SD, steps=6)
    assert quiet.getvalue() == ""


def test_xt_corrector_sees_every_step() -> None:
    net = dp.MixtureNetwork(MIX, SD)
    seen: list[int] = []

    def corr(x: torch.Tensor, knot: dp.Knot, i: int) -> torch.Tensor:
        seen.append(i)
        return x

    dp.sample(
        net,
        noise(),
        schedule=SD,
        steps=5,
        solver=dp.Recipe("dpmpp_2m", final="t_min"),
        options=dp.SampleOptions(xt_corrector=corr),
    )
    assert seen == [0, 1, 2, 3, 4]


def test_noise_form_solver_from_state_dict_is_a_pure_step() -> None:
    """A step depends only on its inputs: replaying it gives the same result."""
    s = MultistepDPMSolver(order=2, form=Form.NOISE)
    den = dp.MixtureDenoiser(MIX)
    k = dp.make_grid(SD, 3, final="t_min").knots
    x = noise() * k[0].sigma
    ctx0 = dp.solvers.StepContext(0, k[0], k[1], 1, den, SD)
    x1, st = s.step(ctx0, x, den(x, k[0]), s.init_state())
    ctx1 = dp.solvers.StepContext(1, k[1], k[2], 2, den, SD)
    a, _ = s.step(ctx1, x1, den(x1, k[1]), st)
    b, _ = s.step(ctx1, x1, den(x1, k[1]), st)
    assert torch.equal(a, b) and math.isfinite(float(a.sum()))


def test_adaptive_solver_spends_what_it_counts() -> None:
    net = dp.MixtureNetwork(MIX, SD)
    r = dp.sample(
        net,
        noise(),
        schedule=SD,
        solver=dp.Recipe("dpmpp_adaptive", {**{"rtol": 0.01, "atol": 1e-3}}),
    )
    assert r.planned_nfe is None and r.nfe == net.calls and r.nfe > 3
    loose = dp.sample(
        net,
        noise(),
        schedule=SD,
        solver=dp.Recipe("dpmpp_adaptive", {**{"rtol": 0.1, "atol": 1e-2}}),
    )
    assert loose.nfe < r.nfe


def test_progress_in_a_log_is_one_line_without_carriage_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without tqdm the fallback bar draws only on a terminal; a redirected log gets one
    summary line."""
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    log = io.StringIO()
    bar = Progress(5, enabled=True, stream=log)
    for _ in range(5):
        bar.update()
    bar.close()
    assert "\r" not in log.getvalue() and log.getvalue().startswith("sampling: 5/5 in ")


def test_sampling_keeps_no_autograd_graph_unless_asked() -> None:
    """A 20-step run under autograd-tracked parameters returns a plain tensor: no graph is
    kept (a real U-Net would otherwise run out of memory); grad=True keeps it for users who
    differentiate through the solver."""
    weight = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    base = dp.MixtureNetwork(MIX, SD)

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return base(x, t) * weight

    r = dp.sample(net, noise(), schedule=SD, steps=20)
    assert not r.x.requires_grad and r.x.grad_fn is None
    g = dp.sample(net, noise(), schedule=SD, steps=20, options=dp.SampleOptions(grad=True))
    assert g.x.requires_grad
    g.x.sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad)
    z = dp.invert(net, noise(), schedule=SD, steps=20)
    assert not z.x.requires_grad
