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
from ..ems import EMS, States, estimate_ems, mixture_ems
from ..loop import NonFiniteError, solve
from ..schedules import DiscreteVPSchedule, Knot, NoiseSchedule
from ..solvers import Solver, get_solver
from ..solvers.v3 import recommended_options
from ..timegrid import make_grid
from .accuracy import GuidedProblem, digits_problem, mixture_problem, rmse

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
)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def run_solver(problem: GuidedProblem, solver: Solver, nfe: int) -> float:
    """RMS error of ``solver`` at ``nfe`` on ``problem`` (log-SNR grid, final step to
    sigma = 0, lower-order final steps below 15 NFE); inf when it diverges."""
    orders = solver.plan(steps=None, nfe=nfe, final_zero=True, lower_order_final=nfe < 15)
    grid = make_grid(problem.schedule, len(orders), "logsnr", final="zero")
    try:
        with torch.no_grad():
            x = solve(problem.denoiser, problem.x_T, grid, solver, orders=orders).x
    except NonFiniteError:
        return math.inf
    return rmse(x, problem.reference)


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
        + "`\n"
    ]
    sections = {"a": section_a, "b": section_b, "c": section_c, "d": section_d}
    for key in args.sections:
        parts.append("\n" + sections[key](sizes, log))
    text = "".join(parts)
    if args.out:
        from ..io import atomic_write_text

        atomic_write_text(args.out, text)
    sys.stdout.write(text)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
