"""The recommended configuration for a budget and a guidance scale (``solver="auto"``).

A :class:`~dpmsolver.recipe.Recipe` is a solver, its options, a time grid and where to stop,
chosen per (guidance, NFE) cell by :mod:`dpmsolver.bench.search`: every candidate is scored by its
error ratio to the best peer configuration (diffusers, k-diffusion) of that cell, on the
exact Gaussian mixture and on the built-in digits network over several noise seeds
(geometric mean per problem, the worse of the two; candidates that ever exceed 2.5x the best
peer, or have a sample diverging among 4 x 1024 other noises, are excluded); the table keeps
the lowest. ``dpmsolver bench`` re-measures it on
held-out seeds (README).

Why it works: at few evaluations and strong guidance the guided ODE is stiff, so the winners
stop a little early (``sigma_end``: the data prediction at sigma~ 0.07-0.14 is better than two
more unstable steps), use singlestep or corrected (UniPC) updates that evaluate inside the
interval, and grids that spend steps where the guided trajectory bends (quadratic in time,
log-SNR); with more evaluations, higher-order UniPC (often on the noise prediction, which is
smoother at high noise) and fixed-weight iPNDM win.
"""

from __future__ import annotations

import math

from ._validate import check_finite_float, check_int
from .recipe import PolicyRequest, Recipe, register_policy
from .solvers import Form, get_solver

__all__ = ["recommend"]


# (guidance, NFE) -> recipe, from `python -m dpmsolver.bench.search`. Beside each entry: the
# geometric mean over seeds of its error ratio to the best peer configuration of the cell,
# on the mixture (seeds 0, 1, 3, and 4-8 for guidance >= 3) and on the network (seeds 0-1).
# Five cells changed when the search gained its stability filter (a sample diverging among
# 4 x 1024 other noises drops a candidate): (3, 5), (7.5, 6), (7.5, 8), (7.5, 10), (15, 8).
_TABLE: dict[tuple[float, int], Recipe] = {
    (1.0, 5): Recipe("unipc", {"order": 2}, "logsnr", sigma_end=0.07),  # mixture 0.73, network 0.94
    (1.0, 6): Recipe(
        "unipc", {"order": 2, "variant": "bh1"}, "polyexponential", rho=1.5, sigma_end=0.07
    ),  # mixture 0.76, network 1.07
    (1.0, 8): Recipe(
        "unipc", {"form": Form.NOISE, "order": 2}, "logsnr", sigma_end=0.07
    ),  # mixture 0.50, network 0.62
    (1.0, 10): Recipe(
        "unipc", {"form": Form.NOISE, "order": 2}, "logsnr"
    ),  # mixture 0.60, network 0.55
    (1.0, 12): Recipe(
        "unipc", {"form": Form.NOISE, "order": 2}, "logsnr"
    ),  # mixture 0.64, network 0.50
    (1.0, 15): Recipe("unipc", {"order": 3}, "logsnr"),  # mixture 0.64, network 0.63
    (1.0, 20): Recipe(
        "unipc", {"form": Form.NOISE, "order": 3}, "logsnr"
    ),  # mixture 0.55, network 0.92
    (1.0, 25): Recipe(
        "unipc", {"form": Form.NOISE, "order": 3}, "logsnr"
    ),  # mixture 0.49, network 0.94
    (1.0, 50): Recipe(
        "unipc", {"form": Form.NOISE, "order": 2}, "time_quadratic"
    ),  # mixture 0.20, network 0.72
    (3.0, 5): Recipe(
        "dpmpp_fast", {}, "polyexponential", rho=1.5, sigma_end=0.14
    ),  # mixture 0.83, network 1.18
    (3.0, 6): Recipe(
        "unipc", {"order": 2}, "time_quadratic", sigma_end=0.14
    ),  # mixture 0.66, network 1.15
    (3.0, 8): Recipe("unipc", {"order": 2}, "logsnr", sigma_end=0.07),  # mixture 0.57, network 1.01
    (3.0, 10): Recipe(
        "deis", {"order": 3}, "polyexponential", rho=0.7
    ),  # mixture 0.73, network 0.76
    (3.0, 12): Recipe(
        "ipndm", {"coefficients": "fixed", "order": 3}, "polyexponential", rho=0.7
    ),  # mixture 0.62, network 0.84
    (3.0, 15): Recipe("unipc", {"order": 3}, "logsnr"),  # mixture 0.64, network 0.83
    (3.0, 20): Recipe("unipc", {"order": 3}, "logsnr"),  # mixture 0.54, network 0.62
    (3.0, 25): Recipe(
        "unipc", {"form": Form.NOISE, "order": 2}, "logsnr"
    ),  # mixture 0.75, network 0.93
    (3.0, 50): Recipe("unipc", {"order": 3}, "karras", rho=7.0),  # mixture 0.27, network 0.96
    (7.5, 5): Recipe(
        "dpmpp_fast", {}, "time_quadratic", sigma_end=0.14
    ),  # mixture 0.83, network 0.91
    (7.5, 6): Recipe("dpmpp_fast", {}, "logsnr", sigma_end=0.07),  # mixture 0.79, network 0.86
    (7.5, 8): Recipe("unipc", {"order": 2}, "logsnr", sigma_end=0.14),  # mixture 0.71, network 0.95
    (7.5, 10): Recipe(
        "unipc", {"order": 2}, "logsnr", sigma_end=0.07
    ),  # mixture 1.06, network 0.73
    (7.5, 12): Recipe(
        "ipndm", {"coefficients": "fixed", "order": 3}, "polyexponential", rho=0.7
    ),  # mixture 0.89, network 0.98
    (7.5, 15): Recipe("dpm_3m", {}, "karras", rho=7.0),  # mixture 0.66, network 0.87
    (7.5, 20): Recipe(
        "unipc", {"form": Form.NOISE, "order": 2}, "logsnr"
    ),  # mixture 0.72, network 0.74
    (7.5, 25): Recipe(
        "unipc", {"form": Form.NOISE, "order": 2}, "karras", rho=7.0
    ),  # mixture 0.86, network 0.98
    (7.5, 50): Recipe("unipc", {"order": 3}, "karras", rho=7.0),  # mixture 0.46, network 1.12
    (15.0, 5): Recipe(
        "dpmpp_2s", {}, "polyexponential", rho=0.7, sigma_end=0.14
    ),  # mixture 0.90, network 1.29; diverges on the stability set (no candidate does not)
    (15.0, 6): Recipe(
        "dpmpp_fast", {}, "logsnr", sigma_end=0.14
    ),  # mixture 0.76, network 0.82; diverges on the stability set (as all 8 pooled do)
    (15.0, 8): Recipe(
        "dpmpp_fast", {}, "time_quadratic", sigma_end=0.14
    ),  # mixture 1.23, network 1.04
    (15.0, 10): Recipe(
        "unipc", {"order": 2}, "logsnr", sigma_end=0.07
    ),  # mixture 0.88, network 0.85
    (15.0, 12): Recipe(
        "unipc", {"order": 2}, "polyexponential", rho=0.7
    ),  # mixture 1.03, network 1.25
    (15.0, 15): Recipe("unipc", {"order": 2}, "karras", rho=7.0),  # mixture 1.02, network 1.16
    (15.0, 20): Recipe(
        "unipc", {"order": 2, "variant": "bh1"}, "logsnr"
    ),  # mixture 1.16, network 1.10
    (15.0, 25): Recipe(
        "unipc", {"form": Form.NOISE, "order": 2}, "logsnr"
    ),  # mixture 1.00, network 1.14
    (15.0, 50): Recipe(
        "unipc", {"order": 3}, "karras", rho=7.0
    ),  # no candidate under the cap; best worst case
}
_GUIDANCE = sorted({w for w, _ in _TABLE})
_NFES = sorted({n for _, n in _TABLE})


def recommend(nfe: int, guidance_scale: float = 1.0) -> Recipe:
    """The recipe for ``nfe`` network evaluations at classifier-free guidance
    ``guidance_scale`` (1 = unguided): the measured cell nearest in log-guidance (scales
    below 1 use the unguided row) with the largest budget not above ``nfe`` (the
    5-evaluation recipe below 5)."""
    check_int("nfe", nfe, minimum=1)
    w = max(check_finite_float("guidance_scale", guidance_scale), 1.0)
    bucket = min(_GUIDANCE, key=lambda g: abs(math.log(g) - math.log(w)))
    budget = max([n for n in _NFES if n <= nfe] or [_NFES[0]])
    # A singlestep recipe may not divide an unmeasured budget; fall back to the nearest
    # smaller measured budget whose recipe can spend it, then to a multistep one.
    for n in sorted((m for m in _NFES if m <= budget), reverse=True):
        recipe = _TABLE[(bucket, n)]
        if _can_spend(recipe, nfe):
            return recipe
    return _FALLBACK


_FALLBACK = Recipe("unipc", {"order": 2}, "logsnr", sigma_end=0.07)


def _can_spend(recipe: Recipe, nfe: int) -> bool:
    try:
        get_solver(recipe.solver, **recipe.options).plan(
            steps=None, nfe=nfe, final_zero=True, lower_order_final=True
        )
    except ValueError:
        return False
    return True


def _policy(request: PolicyRequest) -> Recipe:
    return recommend(request.nfe, request.guidance_scale)


register_policy("auto", _policy)
