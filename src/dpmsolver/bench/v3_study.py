"""DPM-Solver-v3 study: how good are the statistics, and what do they buy?

(a) Estimator accuracy: :func:`dpmsolver.ems.estimate_ems` (Rademacher JVP probes, central
    differences) against :func:`dpmsolver.ems.mixture_ems` (closed-form Jacobian diagonal,
    exact derivatives) on three mixtures, for the paper's noised samples and for the
    model's own ODE trajectories, against the sample count. The "MC floor" column is the
    exact computation with the same number of samples (another seed): the part of the
    error that is the Monte Carlo average over data, not the estimator.
(b) Error against the exact sample on ``bench.accuracy.mixture_problem(w, seed=2)`` by NFE
    (log-SNR grid, last step to sigma = 0, lower-order final steps below 15 NFE, as the
    accuracy benchmark runs our solvers) at guidance 1, 3, 7.5 and 15: ``dpmpp_2m`` and
    ``unipc`` (bh2, order 2) beside v3 with the official settings
    (:func:`dpmsolver.solvers.v3.recommended_options`), without statistics and with
    exact / estimated statistics over noised own samples and over trajectories.
(c) The built-in digits network (eps prediction, SD schedule, guidance 3, null label 10):
    cost of an EMS pass (network calls, seconds, peak memory) and error against its
    reference sample (:func:`dpmsolver.bench.accuracy.digits_problem`) by NFE.
(d) v3's settings (order 2/3, each corrector) on the mixture problem at guidance 1 and 7.5
    with estimated trajectory statistics, beside UniPC of orders 2 and 3.

The paper (abstract) claims a 15%~30% speed-up over the previous best training-free
solvers at 5~10 NFE; the "speed-up" columns give, for each v3 error, how many more NFE the
better of dpmpp_2m / unipc needs to reach it (log-log interpolation of its best-so-far
curve; ">" where it never does within 25 NFE).

Run ``python -m dpmsolver.bench.v3_study [--quick] [--sections abcd] [--out FILE]`` (one
thread; the full run took 25 minutes on a shared CPU core, the digits reference sample
alone 5 of them; ``--quick`` about 4).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..analytic import GaussianMixture, MixtureDenoiser, default_mixture
from ..denoiser import Denoiser
from ..ems import (
    EMS,
    MODEL_EMS_POINTS,
    MODEL_EMS_SAMPLES,
    EMSFingerprint,
    States,
    estimate_ems,
    estimate_model_ems,
    mixture_ems,
    schedule_fingerprint,
)
from ..loop import NonFiniteError, solve
from ..schedules import DiscreteVPSchedule, Knot, NoiseSchedule
from ..solvers import Solver, get_solver
from ..solvers.v3 import recommended_options
from ..timegrid import make_grid
from .accuracy import GuidedProblem, digits_problem, mixture_problem, rmse
from .records import write_text

__all__ = ["Sizes", "main", "speedup"]

NFES = (5, 6, 8, 10, 12, 15, 20, 25)
GUIDANCE = (1.0, 3.0, 7.5, 15.0)


@dataclass(frozen=True)
class Sizes:
    """Sample counts and grids (full run / ``--quick``)."""

    a_points: int = 50
    a_exact: int = 4096
    a_counts: tuple[int, ...] = (128, 512, 2048)
    b_points: int = 100
    b_exact: int = 2048
    b_est: int = 1024
    b_nfes: tuple[int, ...] = NFES
    c_points: int = 60
    c_samples: int = 192
    c_batch: int = 32
    c_nfes: tuple[int, ...] = NFES
    e_samples: int = MODEL_EMS_SAMPLES
    e_points: int = MODEL_EMS_POINTS
    e_batch: int = 32
    e_fd: int = 1000
    f_block: int = 64
    f_blocks: int = 8
    f_points: tuple[int, ...] = (25, 50, 200)
    f_points_blocks: int = 2


QUICK = Sizes(
    a_points=20,
    a_exact=1024,
    a_counts=(64, 256),
    b_points=40,
    b_exact=256,
    b_est=128,
    b_nfes=(5, 10),
    c_points=12,
    c_samples=64,
    c_batch=4,
    c_nfes=(5, 10),
    e_samples=16,
    e_points=12,
    e_batch=4,
    e_fd=100,
    f_block=8,
    f_blocks=4,
    f_points=(8,),
    f_points_blocks=2,
)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def final_sample(
    denoiser: Denoiser, schedule: NoiseSchedule, x_T: Tensor, solver: Solver, nfe: int
) -> Tensor | None:
    """``solver``'s sample from ``x_T`` at ``nfe`` (log-SNR grid, final step to sigma = 0,
    lower-order final steps below 15 NFE); None when it diverges."""
    orders = solver.plan(steps=None, nfe=nfe, final_zero=True, lower_order_final=nfe < 15)
    grid = make_grid(schedule, len(orders), "logsnr", final="zero")
    try:
        with torch.no_grad():
            return solve(denoiser, x_T, grid, solver, orders=orders).x
    except NonFiniteError:
        return None


def run_solver(problem: GuidedProblem, solver: Solver, nfe: int) -> float:
    """RMS error of ``solver`` at ``nfe`` on ``problem`` (:func:`final_sample`); inf when
    it diverges."""
    x = final_sample(problem.denoiser, problem.schedule, problem.x_T, solver, nfe)
    return math.inf if x is None else rmse(x, problem.reference)


def v3(w: float, nfe: int, ems: EMS | None) -> Solver:
    """DPM-Solver-v3 with the official settings for this guidance and budget (the mixture
    and digits problems are class-conditional)."""
    opts = recommended_options(w, nfe, conditional=True)
    return get_solver("dpmv3", opts.pop("order"), ems=ems, **opts)


def speedup(v3_err: float, nfe: int, base: dict[int, float]) -> str:
    """How many more NFE the baseline curve ``base`` (NFE -> error, best so far) needs to
    reach ``v3_err``, as a percentage of ``nfe`` (log-log interpolation)."""
    pts = sorted(base.items())
    best: list[tuple[int, float]] = []
    for n, e in pts:
        e = min(e, best[-1][1]) if best else e
        best.append((n, e))
    if best[0][1] <= v3_err:
        need = float(best[0][0])
        return f"{100 * (need / nfe - 1):+.0f}%" if need != nfe else "+0%"
    for (n0, e0), (n1, e1) in itertools.pairwise(best):
        if e1 <= v3_err < e0:
            if e1 == e0:
                need = float(n1)
            else:
                frac = math.log(e0 / v3_err) / math.log(e0 / e1)
                need = math.exp(math.log(n0) + frac * math.log(n1 / n0))
            return f"{100 * (need / nfe - 1):+.0f}%"
    return f">{100 * (best[-1][0] / nfe - 1):+.0f}%"


def _fmt(e: float) -> str:
    return "diverged" if not math.isfinite(e) else f"{e:.2e}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _own_samples(
    mix: GaussianMixture, schedule: NoiseSchedule, w: float, n: int, bs: int, seed: int
) -> Tensor:
    """``n`` samples of the guided mixture model itself: its ODE solved accurately
    (DPM-Solver++(3M), 100 log-SNR steps) from fresh noise, labels ``i mod C``."""
    den = MixtureDenoiser(mix, y=torch.arange(bs) % mix.num_classes, guidance_scale=w)
    grid = make_grid(schedule, 100, "logsnr", final="zero")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n // bs):
        z = torch.randn(bs, mix.dim, generator=gen, dtype=torch.float64)
        out.append(solve(den, z * grid.knots[0].sigma, grid, get_solver("dpmpp_3m")).x)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------
# (a) estimator accuracy
# ----------------------------------------------------------------------------------------


def section_a(sizes: Sizes, log: Callable[[str], None]) -> str:
    """Estimator vs exact statistics on three mixtures."""
    sched = DiscreteVPSchedule()
    rng = (sched.knot(sched.t_max).lam, sched.knot(sched.t_min).lam)
    cases = [
        ("4-d, unguided (sd_problem)", default_mixture(4, 2, 2, seed=0), 1.0, False),
        ("16-d, conditional w=1", default_mixture(16, 4, 3, seed=2), 1.0, True),
        ("16-d, guided w=7.5", default_mixture(16, 4, 3, seed=2), 7.5, True),
    ]
    rows = []
    bs = 64
    for label, mix, w, cond in cases:
        states: States
        for states in ("noised", "trajectory"):
            t0 = time.perf_counter()
            exact = mixture_ems(
                mix,
                sched,
                guidance_scale=w,
                conditional=cond,
                states=states,
                points=sizes.a_points,
                samples=sizes.a_exact,
                lam_range=rng,
                seed=0,
            )
            y = torch.arange(bs) % mix.num_classes if cond else None
            den = MixtureDenoiser(mix, y=y, guidance_scale=w)
            for n in sizes.a_counts:
                floor = mixture_ems(
                    mix,
                    sched,
                    guidance_scale=w,
                    conditional=cond,
                    states=states,
                    points=sizes.a_points,
                    samples=n,
                    lam_range=rng,
                    seed=100 + n,
                )
                gen = torch.Generator().manual_seed(200 + n)
                data = noise = None
                if states == "noised":
                    labels = torch.arange(n) % mix.num_classes if cond else None
                    data = mix.sample(n, generator=gen, y=labels)
                else:
                    noise = torch.randn(n, mix.dim, generator=gen, dtype=torch.float64)
                est = estimate_ems(
                    den,
                    sched,
                    data=data,
                    noise=noise,
                    prediction="eps",
                    guidance_scale=w,
                    points=sizes.a_points,
                    lam_range=rng,
                    batch_size=min(bs, n),
                    seed=300 + n,
                )
                rows.append(
                    [
                        label,
                        states,
                        str(n),
                        *(f"{_rel(getattr(est, k), getattr(exact, k)):.3f}" for k in "lsb"),
                        *(f"{_rel(getattr(floor, k), getattr(exact, k)):.3f}" for k in "lsb"),
                    ]
                )
            log(f"(a) {label} {states}: {time.perf_counter() - t0:.0f}s")
    head = (
        f"### (a) Estimator vs exact statistics\n\nRelative RMS difference over the grid "
        f"({sizes.a_points} log-SNR points, SD schedule t = 999..0) and the dimensions; exact "
        f"statistics from {sizes.a_exact} samples. One Rademacher probe per sample, central "
        "differences with step 1e-3 (float64).\n\n"
    )
    return head + _table(
        ["mixture", "states", "N", "l", "s", "b", "MC floor l", "MC floor s", "MC floor b"], rows
    )


# ----------------------------------------------------------------------------------------
# (b) error vs NFE on the mixture problem
# ----------------------------------------------------------------------------------------


def _mixture_stats(problem: GuidedProblem, w: float, sizes: Sizes) -> dict[str, EMS]:
    mix = problem.denoiser.mixture  # type: ignore[attr-defined]
    sched = problem.schedule
    rng = (sched.knot(sched.t_max).lam, sched.knot(sched.t_min).lam)
    pts = sizes.b_points
    bs = 64
    den = MixtureDenoiser(mix, y=torch.arange(bs) % mix.num_classes, guidance_scale=w)
    own = _own_samples(mix, sched, w, sizes.b_est, bs, seed=31)
    noise = torch.randn(
        sizes.b_est, mix.dim, generator=torch.Generator().manual_seed(32), dtype=torch.float64
    )

    def exact(states: States) -> EMS:
        return mixture_ems(
            mix,
            sched,
            guidance_scale=w,
            conditional=True,
            states=states,
            samples=sizes.b_exact,
            substeps=2,
            points=pts,
            lam_range=rng,
        )

    def est(data: Tensor | None, noise: Tensor | None) -> EMS:
        return estimate_ems(
            den,
            sched,
            data=data,
            noise=noise,
            prediction="eps",
            guidance_scale=w,
            batch_size=bs,
            points=pts,
            lam_range=rng,
        )

    return {
        "exact noised": exact("noised"),
        "est. noised own": est(own, None),
        "exact traj.": exact("trajectory"),
        "est. traj.": est(None, noise),
    }


def section_b(sizes: Sizes, log: Callable[[str], None]) -> str:
    """Error vs NFE on the guided mixture problem, v3 beside dpmpp_2m and unipc."""
    out = [
        "### (b) Error vs NFE, exact mixture problem (`mixture_problem(w, seed=2)`)\n\n"
        "RMS error per coordinate against the exact sample (64 samples, 16-d, 4 classes x 3 "
        "components). v3 runs the official settings (order 2; pseudo-order corrector below "
        "guidance 5, none from 5). Statistics: exact or estimated; over noised samples of "
        "the model itself (the paper's recipe; exact = noised class data) or over its own "
        f"ODE trajectories ({sizes.b_points} grid points, estimates from {sizes.b_est} "
        f"samples, exact from {sizes.b_exact}). Speed-up: extra NFE the better of dpmpp_2m "
        "and unipc needs for v3's error (est. traj.).\n"
    ]
    summary = []
    for w in GUIDANCE:
        t0 = time.perf_counter()
        problem = mixture_problem(w, seed=2)
        stats = _mixture_stats(problem, w, sizes)
        log(f"(b) w={w:g}: statistics {time.perf_counter() - t0:.0f}s")
        errs: dict[str, dict[int, float]] = {}
        for nfe in sizes.b_nfes:
            errs.setdefault("dpmpp_2m", {})[nfe] = run_solver(problem, get_solver("dpmpp_2m"), nfe)
            errs.setdefault("unipc", {})[nfe] = run_solver(problem, get_solver("unipc"), nfe)
            errs.setdefault("v3 no EMS", {})[nfe] = run_solver(problem, v3(w, nfe, None), nfe)
            for name, ems in stats.items():
                errs.setdefault(f"v3 {name}", {})[nfe] = run_solver(problem, v3(w, nfe, ems), nfe)
        base = {n: min(errs["dpmpp_2m"][n], errs["unipc"][n]) for n in sizes.b_nfes}
        names = list(errs)
        rows = []
        for nfe in sizes.b_nfes:
            rows.append(
                [
                    str(nfe),
                    *(_fmt(errs[k][nfe]) for k in names),
                    speedup(errs["v3 est. traj."][nfe], nfe, base),
                ]
            )
            if nfe <= 10:
                summary.append(
                    (w, nfe, base[nfe], errs["v3 est. traj."][nfe], errs["v3 est. noised own"][nfe])
                )
        out.append(f"\n**guidance {w:g}**\n\n" + _table(["NFE", *names, "speed-up"], rows))
        log(f"(b) w={w:g}: done {time.perf_counter() - t0:.0f}s")
    rows = [
        [
            f"{w:g}",
            str(n),
            _fmt(b),
            _fmt(t),
            f"{100 * (1 - t / b):+.0f}%",
            _fmt(o),
            f"{100 * (1 - o / b):+.0f}%",
        ]
        for w, n, b, t, o in summary
    ]
    out.append(
        "\nError reduction at 5-10 NFE relative to the better of dpmpp_2m / unipc (positive = "
        "v3 better):\n\n"
        + _table(
            [
                "w",
                "NFE",
                "best baseline",
                "v3 est. traj.",
                "change",
                "v3 est. noised own",
                "change",
            ],
            rows,
        )
    )
    return "".join(out)


def section_d(sizes: Sizes, log: Callable[[str], None]) -> str:
    """v3's settings (order, corrector) with trajectory statistics, beside UniPC-3."""
    out = [
        "### (d) Settings, mixture problem, estimated trajectory statistics\n\n"
        "Same problem and statistics as (b) (est. traj.). `pseudo`/`same` are the official "
        "correctors (`c_pseudo` True/False), `full` the UniC-like one (p + 1 nodes).\n"
    ]
    for w in (1.0, 7.5):
        t0 = time.perf_counter()
        problem = mixture_problem(w, seed=2)
        mix = problem.denoiser.mixture  # type: ignore[attr-defined]
        sched = problem.schedule
        rng = (sched.knot(sched.t_max).lam, sched.knot(sched.t_min).lam)
        den = MixtureDenoiser(mix, y=torch.arange(64) % mix.num_classes, guidance_scale=w)
        noise = torch.randn(
            sizes.b_est, mix.dim, generator=torch.Generator().manual_seed(32), dtype=torch.float64
        )
        ems = estimate_ems(
            den,
            sched,
            noise=noise,
            prediction="eps",
            guidance_scale=w,
            batch_size=64,
            points=sizes.b_points,
            lam_range=rng,
        )
        rows = []
        for order in (2, 3):
            for corrector in ("off", "pseudo", "same", "full"):
                solver = get_solver("dpmv3", order, ems=ems, corrector=corrector)
                rows.append(
                    [
                        f"v3 order {order}, corrector {corrector}",
                        *(_fmt(run_solver(problem, solver, n)) for n in sizes.b_nfes),
                    ]
                )
        for order in (2, 3):
            solver = get_solver("unipc", order)
            rows.append(
                [
                    f"unipc order {order}",
                    *(_fmt(run_solver(problem, solver, n)) for n in sizes.b_nfes),
                ]
            )
        out.append(
            f"\n**guidance {w:g}** (NFE across)\n\n"
            + _table(["method", *map(str, sizes.b_nfes)], rows)
        )
        log(f"(d) w={w:g}: {time.perf_counter() - t0:.0f}s")
    return "".join(out)


# ----------------------------------------------------------------------------------------
# (c) the digits network
# ----------------------------------------------------------------------------------------


class _Calls:
    """Counts denoiser calls (a JVP call counts once: one forward with tangents)."""

    def __init__(self, den: Denoiser) -> None:
        self.den = den
        self.calls = 0

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        self.calls += 1
        return self.den(x, knot)


def _digits_denoiser(w: float, bs: int) -> tuple[Denoiser, DiscreteVPSchedule, tuple[int, ...]]:
    from ..models import load_builtin
    from ..sampling import build_denoiser

    model = load_builtin(torch.device("cpu"))
    y = torch.arange(bs) % 10
    den = build_denoiser(
        model.network,
        prediction="eps",
        cond={"y": y},
        uncond={"y": torch.full_like(y, 10)},
        guidance_scale=w,
    )
    return den, model.schedule, tuple(model.shape)  # type: ignore[return-value]


def _ems_child(kind: str, path: str, w: float, points: int, bs: int, how: str, out: Any) -> None:
    """Child process of :func:`section_c`: one EMS pass, timed, with its peak memory."""
    torch.set_num_threads(1)
    den, sched, _ = _digits_denoiser(w, bs)
    samples = torch.load(path)
    counted = _Calls(den)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    kw = {"data": samples} if kind == "noised" else {"noise": samples}
    ems = estimate_ems(
        counted,
        sched,
        prediction="eps",
        guidance_scale=w,
        points=points,
        batch_size=bs,
        jvp=how,  # type: ignore[arg-type]
        **kw,
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ems.save(path + ".ems")
    out.put((counted.calls, seconds, base_rss, peak))


def section_c(sizes: Sizes, log: Callable[[str], None], w: float = 3.0) -> str:
    """EMS cost on the digits network and v3 vs dpmpp_2m there."""
    bs = 64 if sizes.c_samples % 64 == 0 else sizes.c_samples
    t0 = time.perf_counter()
    den, sched, shape = _digits_denoiser(w, bs)
    gen = torch.Generator().manual_seed(41)
    grid = make_grid(sched, 50, "logsnr", final="zero")
    own = []
    with torch.no_grad():
        for _ in range(sizes.c_samples // bs):
            z = torch.randn(bs, *shape, generator=gen)
            own.append(solve(den, z * grid.knots[0].sigma, grid, get_solver("dpmpp_3m")).x)
    noise = torch.randn(sizes.c_samples, *shape, generator=gen)
    log(f"(c) own samples {time.perf_counter() - t0:.0f}s")
    cost_rows: list[list[str]] = []
    stats: dict[str, EMS] = {}
    ctx = mp.get_context("spawn")
    passes = (
        ("noised", "vjp", torch.cat(own)),
        ("trajectory", "vjp", noise),
        ("trajectory", "forward", noise),
    )
    with tempfile.TemporaryDirectory() as tmp:
        for kind, how, samples in passes:
            path = os.path.join(tmp, f"{kind}-{how}.pt")
            torch.save(samples, path)
            queue = ctx.Queue()
            args = (kind, path, w, sizes.c_points, bs, how, queue)
            proc = ctx.Process(target=_ems_child, args=args)
            proc.start()
            calls, seconds, base_rss, peak = queue.get()
            proc.join()
            stats.setdefault(kind, EMS.load(path + ".ems"))
            per_point = sizes.c_samples * sizes.c_points
            cost_rows.append(
                [
                    kind,
                    how,
                    str(sizes.c_samples),
                    str(sizes.c_points),
                    str(calls),
                    f"{3 * per_point} ({per_point} probe + {2 * per_point} forward)",
                    f"{seconds:.1f}",
                    f"{(peak - base_rss) / 1024:.0f}",
                    f"{peak / 1024:.0f}",
                ]
            )
            log(f"(c) EMS pass {kind} {how}: {seconds:.0f}s")
    t0 = time.perf_counter()
    problem = digits_problem(w, batch=sizes.c_batch)
    log(f"(c) reference {time.perf_counter() - t0:.0f}s")
    methods: dict[str, Callable[[int], Solver]] = {
        "dpmpp_2m": lambda n: get_solver("dpmpp_2m"),
        "unipc": lambda n: get_solver("unipc"),
        "v3 no EMS": lambda n: v3(w, n, None),
        "v3 est. noised own": lambda n: v3(w, n, stats["noised"]),
        "v3 est. traj.": lambda n: v3(w, n, stats["trajectory"]),
    }
    errs = {
        k: {n: run_solver(problem, make(n), n) for n in sizes.c_nfes} for k, make in methods.items()
    }
    base = {n: min(errs["dpmpp_2m"][n], errs["unipc"][n]) for n in sizes.c_nfes}
    rows = [
        [
            str(n),
            *(_fmt(errs[k][n]) for k in methods),
            speedup(errs["v3 est. traj."][n], n, base),
            speedup(errs["v3 est. noised own"][n], n, base),
        ]
        for n in sizes.c_nfes
    ]
    return (
        f"### (c) Digits network (guidance {w:g}, null label 10)\n\n"
        "EMS pass (one CPU thread, float32 network, batches of "
        f"{bs} rows = {2 * bs} network rows with classifier-free guidance; calls counted at "
        "the guided denoiser, a probe call is one forward with tangents (``vjp``: forward + "
        "backward); memory from the pass's own process, MiB; the solver below uses the "
        "``vjp`` passes):\n\n"
        + _table(
            [
                "states",
                "probes by",
                "samples",
                "grid points",
                "denoiser calls",
                "sample-evaluations",
                "seconds",
                "peak RSS increase",
                "peak RSS",
            ],
            cost_rows,
        )
        + f"\nRMS error against the reference sample (`digits_problem(3, batch={sizes.c_batch})`, "
        "Dormand-Prince at rtol 1e-6):\n\n"
        + _table(["NFE", *methods, "speed-up traj.", "speed-up noised"], rows)
    )


# ----------------------------------------------------------------------------------------
# (e) the built-in model at guidance 7.5 with `dpmsolver ems`'s statistics
# ----------------------------------------------------------------------------------------

E_GUIDANCE = 7.5
E_NFES = (5, 6, 8, 10)


@functools.lru_cache(maxsize=2)
def _digits_reference(w: float, batch: int) -> GuidedProblem:
    """:func:`digits_problem` (noises ``sample_seeds(1000, i)``: none of the statistics'),
    computed once for (e) and (f)."""
    return digits_problem(w, batch=batch)


def _e_methods(w: float, ems: EMS) -> dict[str, Callable[[int], Solver]]:
    return {
        "dpmv3 + EMS": lambda n: v3(w, n, ems),
        "dpmv3 no EMS": lambda n: v3(w, n, None),
        "dpmpp_2m": lambda n: get_solver("dpmpp_2m"),
        "unipc": lambda n: get_solver("unipc"),
    }


def section_e(sizes: Sizes, log: Callable[[str], None], w: float = E_GUIDANCE) -> str:
    """v3 with `dpmsolver ems`'s default statistics against DPM-Solver++ and UniPC on the
    built-in model at guidance 7.5: RMS error and classifier-feature Frechet distance."""
    from ..digits import load_classifier
    from ..models import load_builtin
    from ..noise import sample_seeds, seeded_randn
    from .quality import classify, frechet_distance, real_digits

    cpu = torch.device("cpu")
    model = load_builtin(cpu)
    calls = [0]

    def network(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        calls[0] += 1
        return model.network(x, t, **kwargs)

    t0 = time.perf_counter()
    # What `dpmsolver ems --guidance 7.5` runs (its defaults; noises sample_seeds(0, i)).
    ems = estimate_model_ems(
        model,
        guidance=w,
        samples=sizes.e_samples,
        points=sizes.e_points,
        batch_size=min(64, sizes.e_samples),
        network=network,
    )
    ems_seconds = time.perf_counter() - t0
    log(f"(e) EMS {ems_seconds:.0f}s")
    t0 = time.perf_counter()
    problem = _digits_reference(w, sizes.e_batch)
    ref_seconds = time.perf_counter() - t0
    log(f"(e) reference {ref_seconds:.0f}s")
    methods = _e_methods(w, ems)
    t0 = time.perf_counter()
    errs = {k: {n: run_solver(problem, make(n), n) for n in E_NFES} for k, make in methods.items()}
    rms_seconds = time.perf_counter() - t0

    # Quality: e_fd samples per method and budget from noises sample_seeds(2000, i) (none
    # of the statistics' or the reference's), labels cycling 0..9 in batches of 250.
    t0 = time.perf_counter()
    bs = min(250, sizes.e_fd)
    den, sched, shape = _digits_denoiser(w, bs)
    z = seeded_randn(sample_seeds(2000, range(sizes.e_fd)), shape)
    x_T = z * sched.knot(sched.t_max).sigma
    labels = (torch.arange(sizes.e_fd) % bs % 10).numpy()
    clf = load_classifier(cpu)
    _, real_f = classify(clf, real_digits()[0])

    def samples(solver: Solver, nfe: int) -> Tensor | None:
        parts = []
        for i in range(0, sizes.e_fd, bs):
            x = final_sample(den, sched, x_T[i : i + bs], solver, nfe)
            if x is None:
                return None
            parts.append(x)
        return torch.cat(parts)

    converged = samples(get_solver("dpmpp_3m"), 100)
    assert converged is not None
    _, conv_f = classify(clf, converged)
    quality: dict[str, dict[int, tuple[float, float, float]]] = {}
    for k, make in methods.items():
        for n in E_NFES:
            x = samples(make(n), n)
            if x is None:
                quality.setdefault(k, {})[n] = (math.inf, math.inf, math.nan)
                continue
            pred, feats = classify(clf, x)
            quality.setdefault(k, {})[n] = (
                frechet_distance(feats, real_f),
                frechet_distance(feats, conv_f),
                float((pred == labels).mean()),
            )
    conv_pred, _ = classify(clf, converged)
    conv_row = (frechet_distance(conv_f, real_f), float((conv_pred == labels).mean()))
    fd_seconds = time.perf_counter() - t0
    log(f"(e) errors {rms_seconds:.0f}s, quality {fd_seconds:.0f}s")

    names = list(methods)
    base = {n: min(errs["dpmpp_2m"][n], errs["unipc"][n]) for n in E_NFES}
    rms_rows = [
        [
            str(n),
            *(_fmt(errs[k][n]) for k in names),
            f"{errs['dpmv3 + EMS'][n] / base[n]:.2f}",
            speedup(errs["dpmv3 + EMS"][n], n, base),
        ]
        for n in E_NFES
    ]

    def fd(v: float) -> str:
        return "diverged" if not math.isfinite(v) else f"{v:.3f}"

    fd_rows = [
        [
            str(n),
            *(fd(quality[k][n][0]) for k in names),
            *(fd(quality[k][n][1]) for k in names),
            *(f"{quality[k][n][2]:.3f}" for k in names),
        ]
        for n in E_NFES
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    short = {"dpmv3 + EMS": "v3+EMS", "dpmv3 no EMS": "v3", "dpmpp_2m": "2M", "unipc": "UniPC"}
    return (
        f"### (e) Built-in model at guidance {w:g}: `dpmsolver ems` statistics\n\n"
        f"Statistics as `dpmsolver ems --guidance {w:g}` makes them by default: "
        f"{sizes.e_samples} trajectories from the noises of `dpmsolver sample --seed 0`, "
        f"{sizes.e_points} log-SNR grid points, probes by `vjp`, batches of "
        f"{min(64, sizes.e_samples)} (labels cycling 0..9): {calls[0]} network calls "
        f"({2 * min(64, sizes.e_samples)} rows each with guidance), {ems_seconds:.0f} s on one "
        f"CPU thread (load average {load:.1f} on the machine's 2 cores while it ran). "
        "v3 runs the official settings at this guidance (order 2, no corrector: "
        "`recommended_options`); all solvers on the log-SNR grid with the last step to sigma = "
        "0 and lower-order final steps, as in (c).\n\n"
        f"RMS error against the reference sample (`digits_problem({w:g}, batch={sizes.e_batch})`"
        f", Dormand-Prince at rtol 1e-6, {ref_seconds:.0f} s; its noises are not the "
        "statistics'). v3+EMS / best: v3+EMS's error over the better of dpmpp_2m and unipc "
        "(below 1: v3 better); speed-up: extra NFE that better baseline needs for v3+EMS's "
        "error (interpolated within these budgets; '>' where it never gets there):\n\n"
        + _table(["NFE", *names, "v3+EMS / best", "speed-up"], rms_rows)
        + f"\nQuality of {sizes.e_fd} samples per cell (noises `sample_seeds(2000, i)`, labels "
        f"cycling 0..9): Frechet distance of the shipped classifier's penultimate features "
        f"(128-d; `bench.quality`) to the {len(real_f)} held-out real digits (FD real) and to "
        "the same noises' converged samples (DPM-Solver++(3M), 100 NFE: FD conv., the "
        "discretisation's own effect on the distribution, free of the real set's noise), and "
        "the fraction the classifier assigns to the requested class. The converged samples "
        f"score FD real {conv_row[0]:.3f}, class accuracy {conv_row[1]:.3f}. "
        f"({rms_seconds + fd_seconds:.0f} s for errors and quality.)\n\n"
        + _table(
            [
                "NFE",
                *(f"FD real {short[k]}" for k in names),
                *(f"FD conv. {short[k]}" for k in names),
                *(f"acc. {short[k]}" for k in names),
            ],
            fd_rows,
        )
    )


# ----------------------------------------------------------------------------------------
# (f) how many samples and grid points the statistics need
# ----------------------------------------------------------------------------------------


def section_f(sizes: Sizes, log: Callable[[str], None], w: float = E_GUIDANCE) -> str:
    """v3's error on the built-in model at guidance 7.5 against the statistics' sample
    count and grid (the measurement behind `dpmsolver ems`'s defaults)."""
    from safetensors.torch import load_file

    from ..ems import _finalize, _grid_range  # the checkpoint's sums, private on purpose
    from ..noise import sample_seeds, seeded_randn

    problem = _digits_reference(w, sizes.e_batch)
    bs = sizes.f_block
    den, sched, shape = _digits_denoiser(w, bs)
    total = bs * sizes.f_blocks
    noise = seeded_randn(sample_seeds(0, range(total)), shape)
    fp = EMSFingerprint(schedule_fingerprint(sched), "eps", w)
    lo, hi = _grid_range(sched, None)
    rows: list[list[str]] = []
    per_point: list[float] = []

    def score(label: str, n: int, points: int, seconds: float, ems: EMS) -> None:
        errs = [run_solver(problem, v3(w, k, ems), k) for k in E_NFES]
        rows.append([label, str(n), str(points), f"{seconds:.0f}", *map(_fmt, errs)])
        per_point.append(seconds / (n * points))
        log(f"(f) {label} n={n} points={points}: {seconds:.0f}s")

    def run(rows_: slice, points: int, seed: int, ckpt: str | None) -> float:
        t0 = time.perf_counter()
        estimate_ems(
            den,
            sched,
            noise=noise[rows_],
            prediction="eps",
            guidance_scale=w,
            points=points,
            batch_size=bs,
            seed=seed,
            jvp="vjp",
            checkpoint=ckpt,
        )
        return time.perf_counter() - t0

    # Sample counts, nested: the checkpoint's per-point sums add up over disjoint blocks
    # of trajectories, so one pass over f_blocks blocks gives every prefix count.
    points = sizes.e_points
    lams = torch.linspace(lo, hi, points, dtype=torch.float64)
    alphas = [sched.knot_at_lambda(float(v)).alpha for v in lams]
    sums: list[Tensor] = []
    seconds: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(sizes.f_blocks):
            ckpt = os.path.join(tmp, f"block{k}.safetensors")
            seconds.append(run(slice(k * bs, (k + 1) * bs), points, k, ckpt))
            sums.append(load_file(ckpt)["sums"])
    counts = [bs * 2**i for i in range(sizes.f_blocks.bit_length()) if 2**i <= sizes.f_blocks]
    half = sizes.f_blocks // 2

    def nested(blocks: range, label: str) -> None:
        n = bs * len(blocks)
        l_, s_, b_ = _finalize(torch.stack([sums[i] for i in blocks]).sum(0), n, lams, alphas)
        ems = EMS(lams, l_, s_, b_, fp, samples=n)
        score(label, n, points, sum(seconds[i] for i in blocks), ems)

    for n in counts:
        nested(range(n // bs), "first trajectories")
    if half:
        nested(range(half, sizes.f_blocks), "the other half")
    # Grid points, on the first f_points_blocks blocks' trajectories.
    for pts in sizes.f_points:
        n = bs * sizes.f_points_blocks
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "run.safetensors")
            t = run(slice(0, n), pts, 0, ckpt)
            sm = load_file(ckpt)["sums"]
        lams_p = torch.linspace(lo, hi, pts, dtype=torch.float64)
        alphas_p = [sched.knot_at_lambda(float(v)).alpha for v in lams_p]
        l_, s_, b_ = _finalize(sm, n, lams_p, alphas_p)
        score("first trajectories", n, pts, t, EMS(lams_p, l_, s_, b_, fp, samples=n))
    base = [
        min(run_solver(problem, get_solver(s), k) for s in ("dpmpp_2m", "unipc")) for k in E_NFES
    ]
    rows.append(["better of dpmpp_2m, unipc", "-", "-", "-", *map(_fmt, base)])
    ms = 1e3 * sorted(per_point)[len(per_point) // 2]
    return (
        f"### (f) Statistics size, built-in model at guidance {w:g}\n\n"
        f"v3 (official settings) with trajectory statistics of the first n of the noises "
        f"`sample_seeds(0, i)` (as `dpmsolver ems`), or of the other half; RMS error against "
        f"(e)'s reference sample by NFE. Batches of {bs}, probes by `vjp`, one CPU thread; "
        f"the median cost was {ms:.1f} ms per trajectory and grid point on this shared "
        "machine.\n\n"
        + _table(
            ["trajectories", "n", "grid points", "seconds", *(f"{k} NFE" for k in E_NFES)], rows
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print (and optionally write) the study as markdown."""
    doc = (__doc__ or "").split("\n\n")[0]
    p = argparse.ArgumentParser(prog="python -m dpmsolver.bench.v3_study", description=doc)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--sections", default="abcd", help="which sections to run (default abcd)")
    p.add_argument("--out", help="also write the markdown to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sizes = QUICK if args.quick else Sizes()
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    parts = [
        "## DPM-Solver-v3 study\n\nRegenerate: `python -m dpmsolver.bench.v3_study"
        + (" --quick" if args.quick else "")
        + (f" --sections {args.sections}" if args.sections != "abcd" else "")
        + "`\n"
    ]
    sections = {
        "a": section_a,
        "b": section_b,
        "c": section_c,
        "d": section_d,
        "e": section_e,
        "f": section_f,
    }
    unknown = sorted(set(args.sections) - set(sections))
    if unknown:
        p.error(f"--sections: unknown section(s) {', '.join(unknown)}; choose from abcdef")
    for key in args.sections:
        parts.append("\n" + sections[key](sizes, log))
    text = "".join(parts)
    if args.out:
        write_text(args.out, text)
    sys.stdout.write(text)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
