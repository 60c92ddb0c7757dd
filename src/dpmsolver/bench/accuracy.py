"""Error against the exact solution by NFE and guidance scale, ours and peers side by side.

Problem ("mixture"): a class-conditional Gaussian mixture (16 dimensions, 4 classes x 3
components, image-like scale) under Stable Diffusion's discrete schedule, with
classifier-free guidance ``D = D_u + w (D_c - D_u)`` computed exactly. Every method starts
from the same state ``x_T = sigma_T z`` at t = 999 and is scored by the RMS error of its
final sample against the exact sample: the probability-flow ODE solution at t = 0 (the
schedule's last time; :func:`dpmsolver.analytic.reference_solve`) followed by the exact data
prediction there (:func:`dpmsolver.analytic.reference_sample`). With thresholding, the
reference solves the thresholded ODE.

Methods: every deterministic registered solver of ours on several grids, diffusers'
schedulers (stepping ``scheduler.step`` with the exact eps at the scheduler's own
timesteps) and k-diffusion's samplers (on the exact denoiser in k-diffusion variables), in
their default and best-known settings. Peers are benchmark extras and are skipped when not
installed. NFE is counted by the network calls actually made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..analytic import GaussianMixture, MixtureDenoiser, default_mixture, reference_sample
from ..calibrate import rms_error as rmse
from ..calibrate import run_calibrated
from ..denoiser import Denoiser
from ..guidance import DynamicThresholding
from ..recipe import Recipe
from ..sampling import NonFiniteError, solve
from ..schedules import DiscreteVPSchedule, Knot, NoiseSchedule
from ..solvers import get_solver
from ..timegrid import make_grid
from .peers import diffusers_class, load_kdiffusion_sampling, run_scheduler

__all__ = [
    "DIVERGED",
    "GuidedProblem",
    "Method",
    "digits_problem",
    "mixture_problem",
    "our_methods",
    "peer_methods",
    "recipe_sample",
    "rmse",
    "sample_errors",
]

NFES = (5, 6, 8, 10, 12, 15, 20, 25, 50)
# A sample this far (RMS per coordinate) from its exact sample has diverged: farther than the
# data's whole spread (a sample that lands in the wrong mixture component is ~0.5 away).
DIVERGED = 1.0
GUIDANCE = (1.0, 3.0, 7.5, 15.0)


@dataclass
class GuidedProblem:
    """A guided sampling problem with an exact answer.

    Attributes:
        schedule: the network's schedule (SD discrete).
        denoiser: ``x0_hat = D(x, knot)`` including guidance (and thresholding if any).
        x_T: the common start at ``t_start``.
        reference: the exact sample at sigma = 0.
        name: for tables.
    """

    schedule: NoiseSchedule
    denoiser: Denoiser
    x_T: Tensor
    reference: Tensor
    name: str
    guidance: float = 1.0
    calls: list[int] = field(default_factory=lambda: [0])

    def counted(self) -> Denoiser:
        """The denoiser, counting evaluations in ``calls[0]``."""

        def den(x: Tensor, knot: Knot) -> Tensor:
            self.calls[0] += 1
            return self.denoiser(x, knot)

        return den

    def eps_network(self) -> Callable[[Tensor, Any], Tensor]:
        """``eps(x, t)`` at network time ``t`` (what a diffusers scheduler sees)."""
        den = self.counted()
        sched = self.schedule

        def eps(x: Tensor, t: Any) -> Tensor:
            tt = float(t)
            k = sched.knot(min(max(tt, sched.t_min), sched.t_max))
            x0 = den(x, k)
            return (x - k.alpha * x0) / k.sigma

        return eps

    def k_denoiser(self) -> Callable[..., Tensor]:
        """k-diffusion's ``model(x~, sigma~) -> x0`` with ``x~ = x / alpha``."""
        den = self.counted()
        sched = self.schedule

        def model(xk: Tensor, sigma: Tensor, **_: Any) -> Tensor:
            k = sched.knot_at_lambda(-math.log(float(sigma.flatten()[0])))
            return den(xk * k.alpha, k)

        return model


def mixture_problem(
    guidance: float,
    *,
    thresholding: bool = False,
    batch: int = 64,
    seed: int = 0,
    noise_seed: int | None = None,
) -> GuidedProblem:
    """The mixture problem at guidance ``guidance`` (see module doc): ``seed`` draws the
    mixture and, unless ``noise_seed`` is given, the starting noise."""
    mix: GaussianMixture = default_mixture(dim=16, num_classes=4, components_per_class=3, seed=seed)
    sched = DiscreteVPSchedule()
    y = torch.arange(batch) % mix.num_classes
    den: Denoiser = MixtureDenoiser(mix, y=y, guidance_scale=guidance)
    if thresholding:
        den = DynamicThresholding(den, 0.995, 1.0)
    noise = 1000 + seed if noise_seed is None else noise_seed
    z = torch.randn(batch, 16, generator=torch.Generator().manual_seed(noise), dtype=torch.float64)
    x_T = z * sched.knot(sched.t_max).sigma
    name = f"mixture w={guidance:g} seed {seed}" + (
        "" if noise_seed is None else f" noise {noise_seed}"
    )
    name += " thresholded" if thresholding else ""
    return GuidedProblem(
        sched, den, x_T, reference_sample(den, x_T, sched, rtol=1e-9, atol=1e-11), name, guidance
    )


def digits_problem(
    guidance: float,
    *,
    thresholding: bool = False,
    batch: int = 32,
    seed: int = 0,
    rtol: float = 1e-6,
    device: str = "cpu",
) -> GuidedProblem:
    """The built-in digits network at guidance ``guidance`` (labels cycling 0..9).

    The network is only defined on its training times t in [0, 999], so the reference is
    the solution of its probability-flow ODE from t = 999 to t = 0 (Dormand-Prince at
    ``rtol``) followed by its data prediction there, which is where every sampler's last
    step aims (``final_step="denoise"``).
    """
    from ..models import load_builtin
    from ..noise import sample_seeds, seeded_randn
    from ..sampling import SampleOptions, build_denoiser

    model = load_builtin(torch.device(device))
    sched = model.schedule
    y = torch.arange(batch, device=device) % 10
    den = build_denoiser(
        model.network,
        prediction="eps",
        cond={"y": y},
        uncond={"y": torch.full_like(y, 10)},
        guidance_scale=guidance,
        options=SampleOptions(thresholding=thresholding),
    )
    z = seeded_randn(
        sample_seeds(1000 + seed, range(batch)), model.shape, device=device, dtype=torch.float64
    )
    x_T = z * sched.knot(sched.t_max).sigma

    def den64(x: Tensor, knot: Knot) -> Tensor:
        return den(x.float(), knot).double()

    with torch.no_grad():
        ref = reference_sample(den64, x_T, sched, rtol=rtol)
    name = f"digits w={guidance:g} seed {seed}" + (" thresholded" if thresholding else "")
    return GuidedProblem(sched, den64, x_T, ref, name, guidance)


@dataclass(frozen=True)
class Method:
    """A sampler configuration: ``run(problem, nfe)`` returns the final sample, or None when
    the configuration cannot spend exactly ``nfe`` evaluations."""

    label: str
    source: str  # "ours", "diffusers" or "k-diffusion"
    run: Callable[[GuidedProblem, int], Tensor | None]


def _ours(solver: str, grid: str, **options: Any) -> Method:
    def run(p: GuidedProblem, nfe: int) -> Tensor | None:
        s = get_solver(solver, **options)
        try:
            orders = s.plan(steps=None, nfe=nfe, final_zero=True, lower_order_final=nfe < 15)
        except ValueError:
            return None
        g = make_grid(p.schedule, len(orders), grid, final="zero")  # type: ignore[arg-type]
        try:
            return solve(p.counted(), p.x_T, g, s, orders=orders, check_finite="off").x
        except NonFiniteError:
            return None

    opts = "".join(f" {k}={v}" for k, v in options.items())
    return Method(f"{solver}{opts} [{grid}]", "ours", run)


def our_methods(grids: Sequence[str] = ("logsnr", "karras", "time_uniform")) -> list[Method]:
    """Our main deterministic solvers on each grid."""
    names: list[tuple[str, dict[str, Any]]] = [
        ("ddim", {}),
        ("dpmpp_2m", {}),
        ("dpmpp_3m", {}),
        ("dpmpp_2s", {}),
        ("dpmpp_fast", {}),
        ("dpm_2m", {}),
        ("dpmpp_2m_hb", {}),
        ("ghvb", {}),
    ]
    return [_ours(n, g, **o) for g in grids for n, o in names]


def _diffusers(cls_name: str, label: str, **config: Any) -> Method | None:
    cls = diffusers_class(cls_name)
    if cls is None:
        return None

    def run(p: GuidedProblem, nfe: int) -> Tensor | None:
        order = getattr(cls, "order", 1)
        steps = nfe if order == 1 else (nfe + 1) // 2
        sched = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **config)
        sched.set_timesteps(steps)
        eps = p.eps_network()
        # x-space schedulers start from x_T; sigma~-space ones (Euler, Heun, LMS) from x_T / alpha_T
        sample = p.x_T.clone()
        x_space = float(getattr(sched, "init_noise_sigma", 1.0)) == 1.0
        if not x_space:
            sample = sample / p.schedule.knot(p.schedule.t_max).alpha
        start = p.calls[0]
        sample = run_scheduler(sched, eps, sample)
        if p.calls[0] - start != nfe:
            return None
        return sample

    return Method(label, "diffusers", run)


def _kdiff(fn: str, label: str, sigmas: str, per_step: int, **kwargs: Any) -> Method | None:
    k = load_kdiffusion_sampling()
    if k is None:
        return None

    def run(p: GuidedProblem, nfe: int) -> Tensor | None:
        sched = p.schedule
        smin, smax = sched.knot(sched.t_min).ksigma, sched.knot(sched.t_max).ksigma
        n = (nfe + per_step - 1) // per_step  # sigmas before the appended 0
        if sigmas == "karras":
            sig = k.get_sigmas_karras(n, smin, smax)
        else:
            sig = k.get_sigmas_exponential(n, smin, smax)
        sig = sig.double()
        start = p.calls[0]
        x = getattr(k, fn)(
            p.k_denoiser(), p.x_T / sched.knot(sched.t_max).alpha, sig, disable=True, **kwargs
        )
        if p.calls[0] - start != nfe:
            return None
        return x

    return Method(label, "k-diffusion", run)


def peer_methods() -> list[Method]:
    """Peer configurations, defaults and best-known settings; missing peers are skipped."""
    specs: list[Method | None] = [
        _diffusers("DPMSolverMultistepScheduler", "diffusers DPM++2M", solver_order=2),
        _diffusers(
            "DPMSolverMultistepScheduler",
            "diffusers DPM++2M karras",
            solver_order=2,
            use_karras_sigmas=True,
        ),
        _diffusers(
            "DPMSolverMultistepScheduler",
            "diffusers DPM++2M logSNR",
            solver_order=2,
            use_lu_lambdas=True,
        ),
        _diffusers("DPMSolverMultistepScheduler", "diffusers DPM++3M", solver_order=3),
        _diffusers(
            "DPMSolverMultistepScheduler",
            "diffusers DPM++3M karras",
            solver_order=3,
            use_karras_sigmas=True,
        ),
        _diffusers("UniPCMultistepScheduler", "diffusers UniPC bh2", solver_order=2),
        _diffusers(
            "UniPCMultistepScheduler",
            "diffusers UniPC bh2 karras",
            solver_order=2,
            use_karras_sigmas=True,
        ),
        _diffusers("UniPCMultistepScheduler", "diffusers UniPC bh2 o3", solver_order=3),
        _diffusers("DEISMultistepScheduler", "diffusers DEIS", solver_order=2),
        _diffusers("EulerDiscreteScheduler", "diffusers Euler"),
        _diffusers("EulerDiscreteScheduler", "diffusers Euler karras", use_karras_sigmas=True),
        _diffusers("HeunDiscreteScheduler", "diffusers Heun"),
        _diffusers("LMSDiscreteScheduler", "diffusers LMS"),
        _diffusers("LMSDiscreteScheduler", "diffusers LMS karras", use_karras_sigmas=True),
        _diffusers("DDIMScheduler", "diffusers DDIM trailing", timestep_spacing="trailing"),
        _kdiff("sample_dpmpp_2m", "k-diffusion dpmpp_2m karras", "karras", 1),
        _kdiff("sample_dpmpp_2m", "k-diffusion dpmpp_2m exponential", "exponential", 1),
        _kdiff("sample_dpmpp_3m_sde", "k-diffusion dpmpp_3m (eta 0) karras", "karras", 1, eta=0.0),
        _kdiff("sample_euler", "k-diffusion euler karras", "karras", 1),
        _kdiff("sample_heun", "k-diffusion heun karras", "karras", 2),
        _kdiff("sample_lms", "k-diffusion lms karras", "karras", 1),
        _kdiff(
            "sample_dpmpp_2s_ancestral", "k-diffusion dpmpp_2s (eta 0) karras", "karras", 2, eta=0.0
        ),
    ]
    return [m for m in specs if m is not None]


def sample_errors(a: Tensor, b: Tensor) -> Tensor:
    """Each sample's RMS error (float64; inf where ``a`` is not finite)."""
    err = ((a.double() - b.double()) ** 2).flatten(1).mean(1).sqrt()
    return torch.where(torch.isfinite(a).flatten(1).all(1), err, torch.full_like(err, math.inf))


def evaluate(
    methods: Iterable[Method],
    problems: Iterable[GuidedProblem],
    nfes: Sequence[int] = NFES,
    *,
    per_sample: bool = False,
) -> list[dict[str, Any]]:
    """One row per (problem, method, nfe) that could be run: the RMS error, and with
    ``per_sample`` the median of the samples' errors, the share of the total squared error
    that the worst sample carries, the worst sample's error and how many samples diverged
    (error above ``DIVERGED``)."""
    rows = []
    for p in problems:
        for m in methods:
            for nfe in nfes:
                with torch.no_grad():
                    x = m.run(p, nfe)
                if x is None:
                    continue
                row = {
                    "problem": p.name,
                    "method": m.label,
                    "source": m.source,
                    "nfe": nfe,
                    "error": rmse(x, p.reference),
                }
                if per_sample:
                    e = sample_errors(x, p.reference)
                    row["median"] = float(e.median())
                    row["worst_share"] = (
                        float(e.max() ** 2 / (e**2).sum()) if bool(torch.isfinite(e).all()) else 1.0
                    )
                    row["worst"] = float(e.max())
                    row["diverged"] = int((e > DIVERGED).sum())
                rows.append(row)
    return rows


def recipe_sample(p: GuidedProblem, nfe: int, recipe: Recipe) -> Tensor | None:
    """``recipe``'s final sample on ``p`` with exactly ``nfe`` evaluations (None if it cannot
    spend ``nfe`` or diverges)."""
    try:
        return run_calibrated(p.counted(), p.x_T, p.schedule, recipe, nfe)
    except ValueError:  # the recipe cannot spend nfe
        return None
