"""Each step's correction ratio, on the pilot and on new noises, for one tuned cell.

The ratio is ``||x_next - x1|| / ||x1 - x_s||``: a step's departure from its first-order
(DDIM) step over that step's own displacement, what :class:`dpmsolver.steplimit.StepLimit`
bounds. The cell is tuned as ``python -m dpmsolver.bench.tuned`` tunes it (same pilot seed,
same budgets, so the same profile), then its budget's choice runs, limit-free, on the 128
pilot noises and on the 512 new noises of the rescore seed. Per step: the pilot's largest
ratio, the largest of the new noises' other samples, and the ratio and first-order
displacement of the new noises' worst sample (largest error to its exact sample). Then the
same for the correction's own norm ``||x_next - x1||`` (what the envelope of
:attr:`dpmsolver.tune.TuneOptions.envelope_margin` bounds), as multiples of the pilot's
largest at that step.

It asks whether a runaway sample's corrections stand out from the pilot's, step by step,
by more than ordinary new samples' do (benchmarks/step_limit_calibrated.md,
benchmarks/correction_envelope.md).

Usage: python benchmarks/step_limit_ratios.py PROBLEM GUIDANCE NFE BUDGETS
       e.g. python benchmarks/step_limit_ratios.py lowrank16-edm 3 25 12,15,20,25
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch

from dpmsolver.bench.rescore import rescore_seed, run_auto
from dpmsolver.bench.suite import MixtureProblem, get_problem
from dpmsolver.bench.tuned import pilot_seed, tune_problem
from dpmsolver.recipe import Recipe
from dpmsolver.steplimit import departures


class _Recorder:
    """Stands in for StepLimit: limits nothing, keeps each step's per-sample ratio and
    first-order displacement (one list per run)."""

    runs: ClassVar[list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = []

    def __init__(self) -> None:
        _Recorder.runs.append([])

    def apply(self, x: Any, x0: Any, x_next: Any, s: Any, t: Any, index: int) -> Any:
        got = departures(x, x0, x_next, s, t)
        if got is not None:
            _, c, d = got
            _Recorder.runs[-1].append((c / d, d, c))
        return x_next


def main(argv: list[str]) -> None:
    name, w, nfe, budgets = argv[0], float(argv[1]), int(argv[2]), argv[3]
    torch.set_num_threads(1)
    p = get_problem(name)
    assert isinstance(p, MixtureProblem)
    prof = tune_problem(p, w, nfes=tuple(int(v) for v in budgets.split(",")), progress=False)
    c = prof.choice(nfe, w)
    assert c is not None
    times = c.recipe.timesteps
    knots = "" if times is None else f" on {len(times)} fitted knots"
    print(f"{name} w={w:g} NFE {nfe}: {c.recipe.describe()}{knots} (stage {c.stage})")
    # every run samples with a recorder in place of its step limit, limit-free
    Recipe.step_limiter = lambda self: _Recorder()
    run_auto(p, w, p.noise(128, seed=pilot_seed(p)), prof, nfe)
    z = p.noise(512, seed=rescore_seed(p))
    x, _ = run_auto(p, w, z, prof, nfe)
    assert x is not None
    pilot, new = _Recorder.runs[-2], _Recorder.runs[-1]
    ref = p.check_reference(p.denoiser(w, p.labels(512)), p.x_T(z)).sample
    err = ((x - ref) ** 2).flatten(1).mean(1)
    bad = int(err.argmax())
    print(
        f"worst new sample {bad}: squared error {float(err[bad]):.3g} "
        f"(median {float(err.median()):.3g})"
    )
    print(
        "| step | pilot's largest | other new samples' largest | worst sample "
        "| its first-order step |"
    )
    print("|---|---|---|---|---|")
    for i, ((rp, _, _), (rn, dn, _)) in enumerate(zip(pilot, new, strict=True)):
        others = torch.cat([rn[:bad], rn[bad + 1 :]])
        print(
            f"| {i} | {float(rp[torch.isfinite(rp)].max()):.3g} | "
            f"{float(others[torch.isfinite(others)].max()):.3g} | {float(rn[bad]):.3g} | "
            f"{float(dn[bad]):.3g} |"
        )
    print()
    print(
        "| step | other new samples' largest correction / the pilot's "
        "| worst sample's / the pilot's |"
    )
    print("|---|---|---|")
    for i, ((_, _, cp), (_, _, cn)) in enumerate(zip(pilot, new, strict=True)):
        top = float(cp[torch.isfinite(cp)].max())
        if not top > 0.0:
            continue
        others = torch.cat([cn[:bad], cn[bad + 1 :]])
        print(
            f"| {i} | {float(others[torch.isfinite(others)].max()) / top:.3g} | "
            f"{float(cn[bad]) / top:.3g} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
