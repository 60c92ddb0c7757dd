"""Is a tuned miss a few samples ending in another mode? One cell re-tuned and sampled.

The eighth round's worst new-noise cell (ill32-flow, guidance 1, 25 NFE: 11.83x the best
peer on 512 new noises, 1.81x on the test set) re-tuned at its budget alone on the round's
pilot, then sampled with the profile from the same 512 new noises
(:func:`dpmsolver.bench.rescore.rescore_seed`) and compared with the exact samples sample by
sample: the median and upper quantiles of the squared error, the largest, and how many
samples end farther than RMS 1 from their reference (the data's spread is the problem's
data std). Beside it the same profile without its norm cap, and a few fixed recipes of ours
from the same noises. Nothing is chosen from it.

Usage: python benchmarks/mode_flips.py PROBLEM W NFE  (about a minute per cell)
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import Tensor

from dpmsolver.bench.policy import run_recipe
from dpmsolver.bench.rescore import rescore_seed, run_auto
from dpmsolver.bench.suite import get_problem
from dpmsolver.bench.tuned import tune_problem
from dpmsolver.recipe import Recipe

NEW = 512
FIXED = (
    Recipe("dpmpp_3m", {}, "karras", rho=7.0),
    Recipe("dpmpp_2m", {}, "karras", rho=7.0),
    Recipe("dpmpp_3m", {}, "time_uniform"),
)


def main(argv: list[str]) -> None:
    name, w, nfe = argv[0], float(argv[1]), int(argv[2])
    torch.set_num_threads(1)
    p = get_problem(name)
    prof = tune_problem(p, w, nfes=(nfe,), progress=False)
    (c,) = prof.choices
    print(f"{name} w={w:g} NFE {nfe}: tuned {c.recipe.describe()} (stage {c.stage})")
    z = p.noise(NEW, seed=rescore_seed(p))
    den = p.denoiser(w, p.labels(NEW))
    ref = p.reference(den, p.x_T(z))

    def report(what: str, x: Tensor | None) -> None:
        if x is None:
            print(f"{what}: did not run")
            return
        e = (x.double() - ref.double()).pow(2).flatten(1).mean(1)
        q = torch.quantile(e, torch.tensor([0.5, 0.9, 0.99], dtype=e.dtype)).tolist()
        far = int((e.sqrt() > 1.0).sum())
        print(
            f"{what}: RMS {float(e.mean().sqrt()):.4g}; squared error median {q[0]:.2e}, "
            f"90% {q[1]:.2e}, 99% {q[2]:.2e}, largest {float(e.max()):.3g}; "
            f"{far} of {NEW} farther than RMS 1"
        )

    report("the profile", run_auto(p, w, z, prof, nfe)[0])
    bare = dataclasses.replace(prof, choices=(c.with_recipe(x0_norm_cap=None),))
    report("the profile without its norm cap", run_auto(p, w, z, bare, nfe)[0])
    for r in FIXED:
        report(r.describe(), run_recipe(p, den, z, r, nfe)[0])


if __name__ == "__main__":
    main(sys.argv[1:])
