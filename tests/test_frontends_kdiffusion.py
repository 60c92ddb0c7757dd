"""k-diffusion / ComfyUI sampler functions.

- Every k-diffusion 0.1.1 name gives k-diffusion's result (1e-6 relative, float64, a guided
  exact mixture denoiser, Karras and exponential grids, the same noise sampler or the same
  global seed) with the same number of network calls, including EDM's churn, ``eta > 0``
  for DPM-Solver-fast / adaptive, and the default noise.
- ComfyUI's own names against ComfyUI's computation, re-derived here from its source
  (``sample_ddim`` is its Euler, ``sample_ipndm`` / ``_v`` / ``sample_deis`` / ``sample_ddpm``
  its loops and coefficients) or, for UniPC, against a hand-derived two-step run and the
  registered solver run directly.
- The interface: plain functions with the peers' signatures, ``UNAVAILABLE`` empty, no
  autograd graph, errors that name the parameter; and the sigma grids and DDPM wrappers.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import dpmsolver as dp
from dpmsolver.frontends import kdiffusion as kd
from dpmsolver.orders import SDE_MIXTURE, marginal_samples, sde_end_samples, sliced_w2

from .kdiff_loader import load_kdiffusion_external, load_kdiffusion_sampling

K: Any = load_kdiffusion_sampling()
needs_k = pytest.mark.skipif(
    K is None, reason="k-diffusion (and its sampling imports) not installed"
)
try:
    import torchsde as _torchsde  # noqa: F401

    HAVE_TORCHSDE = True
except ImportError:
    HAVE_TORCHSDE = False
needs_torchsde = pytest.mark.skipif(not HAVE_TORCHSDE, reason="torchsde not installed")

_BASE = dp.default_mixture(dim=8, num_classes=2, components_per_class=2, seed=4)
MIX = dataclasses.replace(_BASE, stds=_BASE.stds * 2)
LABELS = torch.tensor([0, 1, 0, 1, 1])
RTOL = 1e-6

K_NAMES = [
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_lms",
    "sample_dpm_fast",
    "sample_dpm_adaptive",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
]
SIGMA_NAMES = [n for n in K_NAMES if n not in ("sample_dpm_fast", "sample_dpm_adaptive")]
STOCHASTIC = [n for n in SIGMA_NAMES if "ancestral" in n or "sde" in n]
COMFY_NAMES = [
    "sample_ddim",
    "sample_uni_pc",
    "sample_uni_pc_bh2",
    "sample_ipndm",
    "sample_ipndm_v",
    "sample_deis",
    "sample_ddpm",
    "sample_dpmpp_2m_sde_gpu",
    "sample_dpmpp_3m_sde_gpu",
    "sample_dpmpp_sde_gpu",
]
ALL_NAMES = [*K_NAMES, *COMFY_NAMES, "sample_dpmpp_3m", "sample_dpmv3"]


@pytest.fixture
def float64() -> Iterator[None]:
    """k-diffusion builds some tensors in the default dtype (dpm_fast's grid, the sigma
    helpers); float64 makes the comparison about the algorithms, not float32 rounding."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Guided:
    """The mixture's exact class-conditional denoiser with classifier-free guidance, as a
    k-diffusion model ``model(x, sigma)`` (VE: ``x = x0 + sigma eps``); counts calls.
    ``extra_args={"y": ...}`` overrides the labels."""

    def __init__(self, labels: Tensor | None = LABELS, scale: float = 3.0) -> None:
        self.labels = labels
        self.scale = scale
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls += 1
        assert sigma.shape == (x.shape[0],)
        labels = self.labels if y is None else y
        one = torch.ones_like(sigma, dtype=torch.float64)
        cond = MIX.x0(x, one, sigma.double(), labels)
        if labels is None or self.scale == 1.0:
            return cond
        uncond = MIX.x0(x, one, sigma.double(), None)
        return uncond + self.scale * (cond - uncond)


def start(sigma0: float | Tensor, seed: int = 0, batch: int = 5) -> Tensor:
    z = torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z * float(sigma0)


def keyed_noise(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """A noise sampler whose draw depends only on the interval (``log sigma`` to 1e-6, so
    the last-bit differences of computed intermediate sigmas do not matter): k-diffusion and
    we get the same noise for the same interval, whatever the order of the calls."""

    def key(v: Tensor) -> int:
        f = float(v)
        return 0 if f == 0 else round(1e6 * math.log(f))

    seed = hash((key(sigma), key(sigma_next))) % 2**31
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rel(ours: Tensor, theirs: Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def grids() -> list[Any]:
    return [
        pytest.param(lambda: K.get_sigmas_karras(12, 0.03, 20.0), id="karras-12"),
        pytest.param(lambda: K.get_sigmas_exponential(7, 0.05, 10.0), id="exponential-7"),
        pytest.param(lambda: K.get_sigmas_karras(9, 0.03, 20.0)[:-1], id="karras-to-sigma-min"),
        pytest.param(lambda: torch.tensor([14.0, 0.0]), id="one-step"),
    ]


def _takes_noise(name: str) -> bool:
    return "noise_sampler" in inspect.signature(getattr(kd, name)).parameters


# --------------------------------------------------------------------------------------
# Parity with k-diffusion
# --------------------------------------------------------------------------------------


@needs_k
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("make_sigmas", grids())
@pytest.mark.parametrize("name", SIGMA_NAMES)
def test_reproduces_k_diffusion(name: str, make_sigmas: Callable[[], Tensor]) -> None:
    """Every k-diffusion name with ``(model, x, sigmas)`` gives k-diffusion's result under
    guidance, with the same network calls; the stochastic ones with the same noise sampler."""
    sigmas = make_sigmas()
    x = start(sigmas[0])
    extra = {"noise_sampler": keyed_noise} if _takes_noise(name) else {}
    ours_model, theirs_model = Guided(), Guided()
    ours = getattr(kd, name)(ours_model, x, sigmas, disable=True, **extra)
    if len(sigmas) == 2 and name in ("sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"):
        # k-diffusion 0.1.1 raises UnboundLocalError for one step into sigma = 0; the step
        # is the data prediction.
        assert torch.equal(ours, Guided()(x, sigmas[:1].expand(5)))
        return
    theirs = getattr(K, name)(theirs_model, x, sigmas, disable=True, **extra)
    assert ours_model.calls == theirs_model.calls
    assert rel(ours, theirs) < RTOL


@needs_k
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpm_2"])
@pytest.mark.parametrize(
    "churn",
    [
        {"s_churn": 1.0},
        {"s_churn": 5.0, "s_noise": 1.007},
        {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 3.0},
        {"s_churn": 40.0, "s_tmin": 50.0},  # the window holds no sigma: deterministic
    ],
    ids=["churn-1", "churn-5-s_noise", "churn-window", "churn-empty-window"],
)
@pytest.mark.parametrize("make_sigmas", grids()[:2])
def test_churn_reproduces_k_diffusion(
    name: str, churn: dict[str, float], make_sigmas: Callable[[], Tensor]
) -> None:
    """EDM's stochastic churn (Alg. 2), with k-diffusion's draws from the global generator:
    the same seed gives k-diffusion's sample, with the same network calls."""
    sigmas = make_sigmas()
    x = start(sigmas[0])
    ours_model, theirs_model = Guided(), Guided()
    torch.manual_seed(7)
    ours = getattr(kd, name)(ours_model, x, sigmas, disable=True, **churn)
    torch.manual_seed(7)
    theirs = getattr(K, name)(theirs_model, x, sigmas, disable=True, **churn)
    assert ours_model.calls == theirs_model.calls
    assert rel(ours, theirs) < RTOL
    if churn.get("s_tmin") != 50.0:
        torch.manual_seed(8)
        other = getattr(kd, name)(Guided(), x, sigmas, disable=True, **churn)
        assert rel(other, ours) > 1e-3  # the churn noise matters


@needs_k
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 10])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_dpm_fast_reproduces_k_diffusion(n: int, eta: float) -> None:
    x = start(20.0)
    ours_model, theirs_model = Guided(), Guided()
    kw = {"eta": eta, "noise_sampler": keyed_noise}
    ours = kd.sample_dpm_fast(ours_model, x, 0.03, 20.0, n, disable=True, **kw)
    theirs = K.sample_dpm_fast(theirs_model, x, 0.03, 20.0, n, disable=True, **kw)
    assert ours_model.calls == theirs_model.calls == n
    assert rel(ours, theirs) < RTOL


@needs_k
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize(
    "options",
    [{}, {"rtol": 1e-3, "atol": 1e-4}, {"pcoeff": 0.3, "dcoeff": 0.1, "h_init": 0.2}],
    ids=["defaults", "tight", "pid"],
)
def test_dpm_adaptive_reproduces_k_diffusion(
    order: int, eta: float, options: dict[str, float]
) -> None:
    """The PID-controlled DPM-Solver-12/23: the same accepted and rejected steps, the same
    calls and info, the same sample."""
    x = start(20.0)
    ours_model, theirs_model = Guided(), Guided()
    kw = {"order": order, "eta": eta, "noise_sampler": keyed_noise, "return_info": True}
    ours, ours_info = kd.sample_dpm_adaptive(
        ours_model, x, 0.05, 20.0, disable=True, **kw, **options
    )
    theirs, theirs_info = K.sample_dpm_adaptive(
        theirs_model, x, 0.05, 20.0, disable=True, **kw, **options
    )
    assert ours_info == theirs_info and ours_info["n_accept"] > 3
    assert ours_model.calls == theirs_model.calls == ours_info["nfe"]
    assert rel(ours, theirs) < RTOL


@needs_k
@needs_torchsde
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", STOCHASTIC)
def test_brownian_tree_noise_sampler_plugs_in(name: str) -> None:
    """k-diffusion's ``BrownianTreeNoiseSampler`` is asked for the same intervals by both."""
    sigmas = K.get_sigmas_karras(10, 0.03, 20.0)
    x = start(sigmas[0])
    ours_model, theirs_model = Guided(), Guided()

    def tree() -> Any:
        return K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=3)

    ours = getattr(kd, name)(ours_model, x, sigmas, disable=True, noise_sampler=tree())
    theirs = getattr(K, name)(theirs_model, x, sigmas, disable=True, noise_sampler=tree())
    assert ours_model.calls == theirs_model.calls
    assert rel(ours, theirs) < RTOL


@needs_k
@needs_torchsde
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", STOCHASTIC)
def test_default_noise_is_k_diffusions(name: str) -> None:
    """Without a noise sampler each function draws k-diffusion's default noise (fresh draws
    for the ancestral samplers, a seeded Brownian tree for the SDE ones) in its order, so
    the same global seed gives k-diffusion's sample."""
    sigmas = K.get_sigmas_karras(10, 0.03, 20.0)
    x = start(sigmas[0])
    torch.manual_seed(11)
    ours = getattr(kd, name)(Guided(), x, sigmas, disable=True)
    torch.manual_seed(11)
    theirs = getattr(K, name)(Guided(), x, sigmas, disable=True)
    assert rel(ours, theirs) < RTOL
    torch.manual_seed(12)
    assert rel(getattr(kd, name)(Guided(), x, sigmas, disable=True), ours) > 1e-3


@needs_k
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_dpm_fast_default_noise_is_k_diffusions(eta: float) -> None:
    x = start(20.0)
    torch.manual_seed(3)
    ours = kd.sample_dpm_fast(Guided(), x, 0.03, 20.0, 8, disable=True, eta=eta)
    torch.manual_seed(3)
    theirs = K.sample_dpm_fast(Guided(), x, 0.03, 20.0, 8, disable=True, eta=eta)
    assert rel(ours, theirs) < RTOL


def test_sde_default_noise_without_torchsde_is_fresh_draws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without torchsde the SDE samplers' default is fresh standard normal draws."""
    monkeypatch.setitem(sys.modules, "torchsde", None)
    sigmas = kd.get_sigmas_karras(6, 0.03, 20.0).double()
    x = start(sigmas[0])
    torch.manual_seed(5)
    default = kd.sample_dpmpp_2m_sde(Guided(), x, sigmas, disable=True)
    torch.manual_seed(5)
    fresh = kd.sample_dpmpp_2m_sde(
        Guided(), x, sigmas, disable=True, noise_sampler=lambda s, t: torch.randn_like(x)
    )
    assert torch.equal(default, fresh)


@needs_k
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", ["sample_euler_ancestral", "sample_dpmpp_2s_ancestral"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.5])
def test_ancestral_eta_reproduces_k_diffusion(name: str, eta: float) -> None:
    """Any ``eta`` (with ``eta > 1`` every ``sigma_down`` is 0 on this grid: the step is the
    data prediction plus ``sigma_next`` noise) and ``s_noise``."""
    sigmas = K.get_sigmas_karras(6, 0.03, 20.0)
    x = start(sigmas[0])
    kw = {"eta": eta, "s_noise": 0.9, "noise_sampler": keyed_noise}
    ours = getattr(kd, name)(Guided(), x, sigmas, disable=True, **kw)
    assert rel(ours, getattr(K, name)(Guided(), x, sigmas, disable=True, **kw)) < RTOL


@needs_k
@pytest.mark.usefixtures("float64")
def test_dpm_2_ancestral_keeps_the_noise_when_sigma_down_is_zero() -> None:
    """The deliberate difference: with ``eta = 1.5`` every step's ``sigma_down`` is 0 on
    this grid. k-diffusion's ``sample_dpm_2_ancestral`` then adds no noise, so the state it
    hands to the model at ``sigma_1`` is a clean sample; ours adds ``sigma_up = sigma_1``, so
    the state has the noise level the model is told (``|x - D| / sigma_1 ~ 1``)."""
    sigmas = K.get_sigmas_karras(6, 0.03, 20.0)
    x = start(sigmas[0])
    levels = {}
    for who, fn in (("ours", kd.sample_dpm_2_ancestral), ("theirs", K.sample_dpm_2_ancestral)):
        seen: list[dict[str, Any]] = []
        fn(
            Guided(),
            x,
            sigmas,
            callback=seen.append,
            disable=True,
            eta=1.5,
            noise_sampler=keyed_noise,
        )
        state, prev = seen[1]["x"], seen[0]["denoised"]
        levels[who] = float(((state - prev) / sigmas[1]).std())
    assert 0.7 < levels["ours"] < 1.3 and levels["theirs"] < 1e-12


@needs_k
@pytest.mark.usefixtures("float64")
def test_published_3m_is_k_diffusion_3m_and_ours_is_third_order() -> None:
    """``sample_dpmpp_3m_sde`` with ``eta=0`` is k-diffusion's DPM-Solver++(3M) (our
    ``third_order="legacy"`` update with the heun-form warm-up). ``sample_dpmpp_3m`` (the
    full second-derivative term) converges with third order, the published one with second:
    under guidance, from 60 to 120 steps ours falls 8x (theirs 3x) and ends 2.5x closer to
    the exact solution. (At 30 steps they are alike: 1.1e-3 ours, 6.7e-4 theirs.)"""
    sched = dp.VESchedule(0.05, 20.0)
    den = dp.MixtureDenoiser(MIX, y=LABELS, guidance_scale=3.0)
    errors: dict[str, list[float]] = {"ours": [], "theirs": []}
    for n in (60, 120):
        sigmas = K.get_sigmas_exponential(n, 0.05, 20.0)[:-1]
        x = start(sigmas[0])
        theirs = K.sample_dpmpp_3m_sde(
            Guided(), x, sigmas, disable=True, eta=0.0, noise_sampler=keyed_noise
        )
        published = kd.sample_dpmpp_3m_sde(Guided(), x, sigmas, disable=True, eta=0.0)
        assert rel(published, theirs) < RTOL
        ours = kd.sample_dpmpp_3m(Guided(), x, sigmas, disable=True)
        grid = dp.grid_from_sigmas(sched, sigmas)
        ref = dp.reference_solve(den, x, grid.knots[0], grid.knots[-1], sched)
        errors["ours"].append(float((ours - ref).abs().max()))
        errors["theirs"].append(float((theirs - ref).abs().max()))
    assert errors["ours"][0] / errors["ours"][1] > 6.0  # ~2^3
    assert errors["theirs"][0] / errors["theirs"][1] < 4.5  # ~2^2
    assert errors["ours"][1] < 0.5 * errors["theirs"][1]


@needs_k
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    ("name", "options"),
    [("sample_dpmpp_2m", {}), ("sample_heun", {"s_churn": 2.0}), ("sample_dpm_2", {})],
)
def test_callback_matches_k_diffusion(name: str, options: dict[str, float]) -> None:
    sigmas = K.get_sigmas_karras(6, 0.03, 20.0)
    x = start(sigmas[0])
    seen: dict[str, list[dict[str, Any]]] = {"ours": [], "theirs": []}
    torch.manual_seed(1)
    getattr(kd, name)(Guided(), x, sigmas, callback=seen["ours"].append, disable=True, **options)
    torch.manual_seed(1)
    getattr(K, name)(Guided(), x, sigmas, callback=seen["theirs"].append, disable=True, **options)
    assert len(seen["ours"]) == len(seen["theirs"]) == 6
    for a, b in zip(seen["ours"], seen["theirs"], strict=True):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"] and float(a["sigma"]) == float(b["sigma"])
        assert float(a["sigma_hat"]) == float(b["sigma_hat"])
        assert torch.allclose(a["x"], b["x"], atol=1e-9)
        assert torch.allclose(a["denoised"], b["denoised"], atol=1e-9)


# --------------------------------------------------------------------------------------
# ComfyUI's names against ComfyUI's computation (re-derived from its source)
# --------------------------------------------------------------------------------------


def comfy_linear_multistep(
    model: Guided,
    x: Tensor,
    sigmas: Tensor,
    max_order: int,
    weights: Callable[[int, int], list[float]],
) -> Tensor:
    """ComfyUI's iPNDM / DEIS loop: ``d = (x - D) / sigma``; order ``min(max_order, i + 1)``;
    ``x = D`` into sigma = 0 (ipndm) / Euler there (deis, the same); otherwise
    ``x += sum_j w_j d_{i-j}`` with ``weights(i, order)`` (sigma units), newest first."""
    history: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s * x.new_ones([x.shape[0]]))
        d = (x - denoised) / s
        order = min(max_order, i + 1)
        if s_next == 0:
            x = denoised
        elif order == 1:
            x = x + (s_next - s) * d
        else:
            w = weights(i, order)
            ds = [d, *reversed(history[-(order - 1) :])]
            x = x + sum(wj * dj for wj, dj in zip(w, ds, strict=True))
        history.append(d)
    return x


def ipndm_fixed_weights(sigmas: Tensor) -> Callable[[int, int], list[float]]:
    table = {2: [3, -1], 3: [23, -16, 5], 4: [55, -59, 37, -9]}
    den = {2: 2, 3: 12, 4: 24}

    def weights(i: int, order: int) -> list[float]:
        h = float(sigmas[i + 1] - sigmas[i])
        return [h * c / den[order] for c in table[order]]

    return weights


def ipndm_v_weights(sigmas: Tensor) -> Callable[[int, int], list[float]]:
    """zju-pi/diff-sampler's iPNDM_v weights as written in ComfyUI's ``sample_ipndm_v``."""
    t = [float(v) for v in sigmas]

    def weights(i: int, order: int) -> list[float]:
        h = t[i + 1] - t[i]
        h1 = t[i] - t[i - 1]
        c = [(2 + h / h1) / 2, -(h / h1) / 2]
        if order >= 3:
            h2 = t[i - 1] - t[i - 2]
            temp = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
            c = [c[0] + temp, c[1] - (1 + h1 / h2) * temp, temp * h1 / h2]
        if order == 4:
            h3 = t[i - 2] - t[i - 3]
            temp2 = (
                (1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2))
            ) * ((h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
            q = h1 * (h1 + h2) / (h2 * (h2 + h3))
            c = [
                c[0] + temp2,
                c[1] - (1 + h1 / h2 + q) * temp2,
                c[2] + (h1 / h2 + q * (1 + h2 / h3)) * temp2,
                -temp2 * q * h1 / h2,
            ]
        return [h * ci for ci in c]

    return weights


def deis_weights(
    sigmas: Tensor, mode: str, points: int = 10_000
) -> Callable[[int, int], list[float]]:
    """ComfyUI's ``deis.get_deis_coeff_list``. ``tab``: the integral over the VP-SDE time
    ``tau`` (the linear schedule fitted to EDM's range, ``edm2t``) of ``l_j(tau)
    dsigma/dtau``, by its rectangle rule over ``points`` samples of ``linspace(t_i,
    t_{i+1})``; ``rhoab``: the exact integral of the Lagrange basis in sigma (its closed
    forms), for the order the sampler uses."""
    eps_s, smin, smax = 1e-3, 0.002, 80.0
    beta_d = 2 * (math.log(smin**2 + 1) / eps_s - math.log(smax**2 + 1)) / (eps_s - 1)
    beta_min = math.log(smax**2 + 1) - 0.5 * beta_d
    s64 = sigmas.double()
    vp_t = (torch.sqrt(beta_min**2 + 2 * beta_d * torch.log(s64**2 + 1)) - beta_min) / beta_d

    def basis(nodes: list[float], j: int, x: Tensor) -> Tensor:
        out = torch.ones_like(x)
        for k, nk in enumerate(nodes):
            if k != j:
                out = out * (x - nk) / (nodes[j] - nk)
        return out

    def weights(i: int, order: int) -> list[float]:
        if mode == "tab":
            nodes = [float(vp_t[i - k]) for k in range(order)]
            taus = torch.linspace(float(vp_t[i]), float(vp_t[i + 1]), points, dtype=torch.float64)
            dtau = (float(vp_t[i + 1]) - float(vp_t[i])) / points
            alpha = torch.exp(-0.5 * beta_d * taus**2 - beta_min * taus)  # alpha-bar
            integrand = 0.5 * (beta_d * taus + beta_min) / torch.sqrt(alpha * (1 - alpha))
            return [float((integrand * basis(nodes, j, taus)).sum()) * dtau for j in range(order)]
        nodes = [float(s64[i - k]) for k in range(order)]
        out = []
        for j in range(order):
            coef = torch.tensor([1.0], dtype=torch.float64)  # polynomial, highest power first
            for k, nk in enumerate(nodes):
                if k != j:
                    coef = torch.tensor([*(coef / (nodes[j] - nk)).tolist(), 0.0]) - torch.tensor(
                        [0.0, *(coef * nk / (nodes[j] - nk)).tolist()]
                    )
            powers = torch.arange(len(coef) - 1, -1, -1, dtype=torch.float64)
            antider = coef / (powers + 1)
            a, b = float(s64[i]), float(s64[i + 1])
            out.append(float((antider * (b ** (powers + 1) - a ** (powers + 1))).sum()))
        return out

    return weights


@needs_k
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("make_sigmas", grids()[:3])
def test_ddim_is_comfyuis_euler(make_sigmas: Callable[[], Tensor]) -> None:
    """ComfyUI's ``ddim`` sampler is ``sample_euler`` (DDIM in k-diffusion's variables)."""
    sigmas = make_sigmas()
    x = start(sigmas[0])
    ours = kd.sample_ddim(Guided(), x, sigmas, disable=True)
    assert torch.equal(ours, kd.sample_euler(Guided(), x, sigmas, disable=True))
    assert rel(ours, K.sample_euler(Guided(), x, sigmas, disable=True)) < RTOL
    torch.manual_seed(4)
    churned = kd.sample_ddim(Guided(), x, sigmas, disable=True, s_churn=3.0)
    torch.manual_seed(4)
    assert rel(churned, K.sample_euler(Guided(), x, sigmas, disable=True, s_churn=3.0)) < RTOL


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", ["sample_ipndm", "sample_ipndm_v"])
@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
@pytest.mark.parametrize("to_zero", [True, False], ids=["to-zero", "to-sigma-min"])
def test_ipndm_reproduces_comfyui(name: str, max_order: int, to_zero: bool) -> None:
    sigmas = kd.get_sigmas_karras(12, 0.03, 20.0).double()
    sigmas = sigmas if to_zero else sigmas[:-1]
    x = start(sigmas[0])
    make = ipndm_fixed_weights if name == "sample_ipndm" else ipndm_v_weights
    ours_model, theirs_model = Guided(), Guided()
    ours = getattr(kd, name)(ours_model, x, sigmas, disable=True, max_order=max_order)
    theirs = comfy_linear_multistep(theirs_model, x, sigmas, max_order, make(sigmas))
    assert ours_model.calls == theirs_model.calls == len(sigmas) - 1
    assert rel(ours, theirs) < 1e-12


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_deis_tab_reproduces_comfyuis_coefficients(max_order: int) -> None:
    """``deis_mode="tab"``: ComfyUI's coefficients are a 10 000-point rectangle rule for
    the integrals we evaluate to machine precision; its result lies within that rule's error
    (~1e-4 of a weight) and converges to ours as the rule is refined (error ~ 1/points)."""
    sigmas = kd.get_sigmas_karras(10, 0.03, 14.6).double()
    x = start(sigmas[0])
    model = Guided()
    ours = kd.sample_deis(model, x, sigmas, disable=True, max_order=max_order)
    assert model.calls == len(sigmas) - 1
    diffs = []
    for points in (10_000, 1_000_000):
        comfy = comfy_linear_multistep(
            Guided(), x, sigmas, max_order, deis_weights(sigmas, "tab", points)
        )
        diffs.append(rel(ours, comfy))
    # Measured: 4e-6 / 4e-8 for max_order 2-4 (exactly 0 for max_order 1, Euler).
    assert diffs[0] < 2e-5 and diffs[1] < 1e-6
    if max_order > 1:
        assert diffs[1] < diffs[0] / 30


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("max_order", [2, 3, 4])
def test_deis_rhoab_reproduces_comfyui_and_is_lms(max_order: int) -> None:
    """``deis_mode="rhoab"``: the Adams-Bashforth weights in sigma for the actual steps.
    ComfyUI's table uses one node too many from the fourth step on (it raises for
    max_order <= 3 and reuses stale weights for 4), so its result is compared over the
    steps it computes as intended (``max_order`` steps); longer runs equal LMS's update."""
    sigmas = kd.get_sigmas_karras(max_order, 0.03, 14.6).double()
    x = start(sigmas[0])
    ours = kd.sample_deis(Guided(), x, sigmas, disable=True, max_order=max_order, deis_mode="rhoab")
    comfy = comfy_linear_multistep(Guided(), x, sigmas, max_order, deis_weights(sigmas, "rhoab"))
    assert rel(ours, comfy) < 1e-12
    long = kd.get_sigmas_karras(12, 0.03, 14.6).double()[:-1]
    x = start(long[0])
    deis = kd.sample_deis(Guided(), x, long, disable=True, max_order=max_order, deis_mode="rhoab")
    lms = kd.sample_lms(Guided(), x, long, disable=True, order=max_order)
    assert rel(deis, lms) < 1e-12


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("make_sigmas", [lambda: kd.get_sigmas_karras(9, 0.03, 14.6)])
def test_ddpm_reproduces_comfyui(make_sigmas: Callable[[], Tensor]) -> None:
    """ComfyUI's ``DDPMSampler_step``, in its VP variables ``x / sqrt(1 + sigma^2)``: the
    eps-form posterior mean plus the posterior standard deviation times the noise."""
    sigmas = make_sigmas().double()
    x = start(sigmas[0])
    ours_model, theirs_model = Guided(), Guided()
    ours = kd.sample_ddpm(ours_model, x, sigmas, disable=True, noise_sampler=keyed_noise)
    y = x
    for i in range(len(sigmas) - 1):
        s, s_prev = sigmas[i], sigmas[i + 1]
        eps = (y - theirs_model(y, s * y.new_ones([5]))) / s
        ac, ac_prev = 1 / (s * s + 1), 1 / (s_prev * s_prev + 1)
        a = ac / ac_prev
        mu = (1 / a).sqrt() * (y / torch.sqrt(1 + s**2) - (1 - a) * eps / (1 - ac).sqrt())
        if s_prev > 0:
            mu = mu + ((1 - a) * (1 - ac_prev) / (1 - ac)).sqrt() * keyed_noise(s, s_prev)
            mu = mu * torch.sqrt(1 + s_prev**2)
        y = mu
    assert ours_model.calls == theirs_model.calls
    assert rel(ours, y) < RTOL


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_uni_pc_two_steps_by_hand(variant: str) -> None:
    """Two steps to 0: ComfyUI's order ``min(3, steps - 1) = 1``; UniP-1 (DDIM) to sigma_1,
    the corrector UniC-1 with the model output there (``rho = 1/2``, ``B(h) = -h`` for bh1,
    ``expm1(-h)`` for bh2, in the data-prediction form), then UniP-1 to 0.001 (ComfyUI's
    stand-in for the final 0), uncorrected; two network calls."""
    sigmas = torch.tensor([8.0, 1.5, 0.0])
    x = start(sigmas[0])
    model = Guided()
    fn = kd.sample_uni_pc_bh2 if variant == "bh2" else kd.sample_uni_pc
    ours = fn(model, x, sigmas, disable=True)
    den = Guided()
    s0, s1, s2 = 8.0, 1.5, 0.001
    d0 = den(x, torch.full((5,), s0))
    x1_pred = (s1 / s0) * x + (1 - s1 / s0) * d0
    d1 = den(x1_pred, torch.full((5,), s1))
    h = math.log(s0 / s1)
    big_b = -h if variant == "bh1" else math.expm1(-h)
    x1 = x1_pred - big_b * 0.5 * (d1 - d0)
    x2 = (s2 / s1) * x1 + (1 - s2 / s1) * d1
    assert model.calls == 2
    assert rel(ours, x2) < 1e-12


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("steps", [1, 3, 4, 10])
def test_uni_pc_is_comfyuis_configuration_of_the_registered_solver(
    variant: str, steps: int
) -> None:
    """Order ``min(3, steps - 1)``, lower-order warm-up and final steps, a final 0 replaced
    by 0.001 and the state there returned (one step: a first-order step, where ComfyUI's
    loop makes none)."""
    sigmas = kd.get_sigmas_karras(steps, 0.03, 14.6).double()
    x = start(sigmas[0])
    ours = kd.sample_uni_pc(Guided(), x, sigmas, disable=True, variant=variant)
    levels = torch.cat([sigmas[:-1], torch.tensor([0.001])])
    sched = dp.VESchedule(0.001, float(sigmas[0]))
    grid = dp.grid_from_sigmas(sched, levels)
    solver = dp.get_solver("unipc", max(1, min(3, steps - 1)), variant=variant)
    den = dp.MixtureDenoiser(MIX, y=LABELS, guidance_scale=3.0)
    ref = dp.solve(den, x, grid, solver, lower_order_final=True)
    assert rel(ours, ref.x) < 1e-10
    assert torch.equal(sigmas[-1], torch.tensor(0.0))  # the caller's sigmas are not modified


@needs_k
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    ("gpu", "base"),
    [
        ("sample_dpmpp_2m_sde_gpu", "sample_dpmpp_2m_sde"),
        ("sample_dpmpp_3m_sde_gpu", "sample_dpmpp_3m_sde"),
        ("sample_dpmpp_sde_gpu", "sample_dpmpp_sde"),
    ],
)
def test_gpu_aliases_are_their_samplers(gpu: str, base: str) -> None:
    """ComfyUI's ``*_gpu`` names differ only in where their default Brownian tree lives."""
    sigmas = K.get_sigmas_karras(8, 0.03, 20.0)
    x = start(sigmas[0])
    ours = getattr(kd, gpu)(Guided(), x, sigmas, disable=True, noise_sampler=keyed_noise)
    theirs = getattr(K, base)(Guided(), x, sigmas, disable=True, noise_sampler=keyed_noise)
    assert rel(ours, theirs) < RTOL
    assert torch.equal(
        ours, getattr(kd, base)(Guided(), x, sigmas, disable=True, noise_sampler=keyed_noise)
    )


# --------------------------------------------------------------------------------------
# The new solvers behind the names
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stochastic", "deterministic"),
    [
        (("dpmpp_sde", {"eta": 0.0}), ("dpmpp_singlestep", {"order": 2})),
        (("dpmpp_sde", {"eta": 0.0, "r1": 0.3}), ("dpmpp_singlestep", {"order": 2, "r1": 0.3})),
        (("heun_churn", {"gamma": 0.0}), ("heun", {})),
        (("euler_churn", {"gamma": 0.0}), ("ddim", {})),
        (("dpm_2_churn", {"gamma": 0.0}), ("dpm_singlestep", {"order": 2})),
        (("dpm_2_ancestral", {"eta": 0.0}), ("dpm_singlestep", {"order": 2})),
    ],
)
def test_zero_noise_is_the_base_solver(
    stochastic: tuple[str, dict[str, Any]], deterministic: tuple[str, dict[str, Any]]
) -> None:
    sd = dp.DiscreteVPSchedule()
    den = dp.MixtureDenoiser(SDE_MIXTURE)
    grid = dp.make_grid(sd, 9, "logsnr", final="zero")
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * grid.knots[0].sigma
    a = dp.solve(den, x, grid, dp.get_solver(stochastic[0], **stochastic[1]))
    b = dp.solve(den, x, grid, dp.get_solver(deterministic[0], **deterministic[1]))
    assert not a.x.isnan().any() and torch.allclose(a.x, b.x, atol=1e-12, rtol=0)


def test_churn_distribution_test_can_fail() -> None:
    """Negative control for the churn solvers' distribution test (tests/test_sde.py): churn
    noise 50% too small or 60% too large is detected; the right amount passes."""
    end = dp.DiscreteVPSchedule().knot(0.0)
    floor = sliced_w2(marginal_samples(1, end), marginal_samples(2, end))
    target = marginal_samples(3, end)

    def distance(s_noise: float) -> float:
        solver = dp.get_solver("heun_churn", gamma=0.4, s_noise=s_noise)
        return sliced_w2(sde_end_samples(solver), target)

    assert distance(1.0) < 1.8 * floor < min(distance(0.5), distance(1.6))


# --------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------


def test_every_name_is_a_plain_function_and_nothing_is_unavailable() -> None:
    assert kd.UNAVAILABLE == {}
    assert set(kd.SAMPLERS) == set(ALL_NAMES)
    source = Path(inspect.getfile(kd)).read_text()
    for name, solvers in kd.SAMPLERS.items():
        fn = getattr(kd, name)
        assert inspect.isfunction(inspect.unwrap(fn)) and fn.__name__ == name
        assert fn.__module__ == kd.__name__ and name in kd.__all__
        assert f"\ndef {name}(" in source  # greppable: written out, not generated
        for solver in solvers:
            assert solver in dp.REGISTRY or solver in dp.solvers.ALIASES, (name, solver)
        doc = inspect.getdoc(fn) or ""
        # Each names the paper or algorithm it implements.
        assert re.search(r"et al\. 20\d\d|Zhang & Chen 2022", doc), name


@needs_k
@pytest.mark.parametrize("name", K_NAMES)
def test_signatures_match_k_diffusion(name: str) -> None:
    def params(fn: Any) -> list[tuple[str, Any, Any]]:
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    ours, theirs = params(getattr(kd, name)), params(getattr(K, name))
    assert len(ours) == len(theirs)
    for (on, ok, od), (tn, tk, td) in zip(ours, theirs, strict=True):
        assert (on, ok) == (tn, tk)
        assert od == td or (isinstance(od, float) and math.isinf(od) and math.isinf(td))


def _comfy(extra: str, second: str = "x", disable: str = "None") -> str:
    head = f"model, {second}, sigmas, extra_args=None, callback=None, disable={disable}"
    return f"({head}{', ' + extra if extra else ''})"


# ComfyUI's signatures (comfy/k_diffusion/sampling.py, comfy/extra_samplers/uni_pc.py; its
# "ddim" sampler is sample_euler).
COMFY_SIGNATURES = {
    "sample_ddim": _comfy("s_churn=0.0, s_tmin=0.0, s_tmax=inf, s_noise=1.0"),
    "sample_uni_pc": _comfy("variant='bh1'", "noise", "False"),
    "sample_uni_pc_bh2": _comfy("", "noise", "False"),
    "sample_ipndm": _comfy("max_order=4"),
    "sample_ipndm_v": _comfy("max_order=4"),
    "sample_deis": _comfy("max_order=3, deis_mode='tab'"),
    "sample_ddpm": _comfy("noise_sampler=None"),
    "sample_dpmpp_2m_sde_gpu": _comfy(
        "eta=1.0, s_noise=1.0, noise_sampler=None, solver_type='midpoint'"
    ),
    "sample_dpmpp_3m_sde_gpu": _comfy("eta=1.0, s_noise=1.0, noise_sampler=None"),
    "sample_dpmpp_sde_gpu": _comfy("eta=1.0, s_noise=1.0, noise_sampler=None, r=0.5"),
    "sample_dpmpp_3m": _comfy(""),
}


@pytest.mark.parametrize("name", sorted(COMFY_SIGNATURES))
def test_signatures_match_comfyui(name: str) -> None:
    sig = inspect.signature(getattr(kd, name)).replace(return_annotation=inspect.Signature.empty)
    plain = sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()])
    assert str(plain) == COMFY_SIGNATURES[name]


class Net(torch.nn.Module):
    """A model with a trainable parameter: a call outside no_grad builds a graph."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.scale * MIX.x0(x, torch.ones_like(sigma), sigma.double())


def run_twenty_steps(name: str, model: Any, x: Tensor) -> Tensor:
    fn = getattr(kd, name)
    if name == "sample_dpm_fast":
        return fn(model, x, 0.03, 20.0, 20, disable=True)
    if name == "sample_dpm_adaptive":
        return fn(model, x, 0.03, 20.0, disable=True)
    sigmas = kd.get_sigmas_karras(20, 0.03, 20.0).double()
    return fn(model, x, sigmas, disable=True)


# torchsde rounds the tree's ends to its tolerance and then warns about queries at the
# unrounded sigma_min; k-diffusion's default tree (which the SDE samplers mirror) does too.
@pytest.mark.filterwarnings("ignore:Should have ta>=t0")
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", ALL_NAMES)
def test_no_autograd_graph(name: str) -> None:
    """Every function runs under no_grad, as k-diffusion's: a 20-step run of a model with
    trainable parameters returns a sample with no graph behind it."""
    net = Net()
    x = start(20.0)
    assert net(x, torch.full((5,), 3.0)).grad_fn is not None  # the model does build graphs
    torch.manual_seed(0)
    out = run_twenty_steps(name, net, x)
    assert out.grad_fn is None and not out.requires_grad and torch.isfinite(out).all()
    assert torch.is_grad_enabled()


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda s, x: kd.sample_dpmpp_2m_sde(Guided(), x, s, solver_type="x"),
            ValueError,
            r"solver_type='x' is not supported; accepted values: 'midpoint', 'heun'",
        ),
        (
            lambda s, x: kd.sample_dpmpp_2m_sde_gpu(Guided(), x, s, solver_type="euler"),
            ValueError,
            r"solver_type='euler'",
        ),
        (lambda s, x: kd.sample_deis(Guided(), x, s, deis_mode="x"), ValueError, r"deis_mode='x'"),
        (lambda s, x: kd.sample_deis(Guided(), x, s, max_order=5), ValueError, r"max_order=5"),
        (lambda s, x: kd.sample_ipndm(Guided(), x, s, max_order=0), ValueError, r"max_order=0"),
        (lambda s, x: kd.sample_uni_pc(Guided(), x, s, variant="bh3"), ValueError, "variant"),
        (
            lambda s, x: kd.sample_euler_ancestral(Guided(), x, s, eta=-1.0),
            ValueError,
            r"eta must be >= 0",
        ),
        (
            lambda s, x: kd.sample_dpmpp_sde(Guided(), x, s, s_noise=float("nan")),
            ValueError,
            r"s_noise must be finite",
        ),
        (lambda s, x: kd.sample_dpmpp_sde(Guided(), x, s, r=1.5), ValueError, r"\br\b.*\(0, 1\)"),
        (lambda s, x: kd.sample_euler(Guided(), x, s, s_churn=-1.0), ValueError, "s_churn"),
        (
            lambda s, x: kd.sample_heun(Guided(), x, s.flip(0)[1:], s_churn=1.0),
            ValueError,
            r"s_churn > 0 needs decreasing sigmas",
        ),
        (
            lambda s, x: kd.sample_euler_ancestral(Guided(), x, s, noise_sampler=3),
            TypeError,
            r"noise_sampler must be callable",
        ),
        (
            lambda s, x: kd.sample_dpm_fast(Guided(), x, 0.03, 20.0, 5, eta=-0.5),
            ValueError,
            r"eta must be >= 0",
        ),
        (
            lambda s, x: kd.sample_dpm_fast(Guided(), x, 20.0, 0.03, 5),
            ValueError,
            r"sigma_min=20.0 must be < sigma_max",
        ),
        (
            lambda s, x: kd.sample_dpm_fast(Guided(), x, 0.0, 20.0, 5),
            ValueError,
            r"sigma_min must be > 0",
        ),
        (lambda s, x: kd.sample_dpm_fast(Guided(), x, 0.03, 20.0, 0), ValueError, r"n must be"),
        (
            lambda s, x: kd.sample_dpm_adaptive(Guided(), x, 0.03, 20.0, order=4),
            ValueError,
            r"order=4 is not supported",
        ),
        (
            lambda s, x: kd.sample_dpm_adaptive(Guided(), x, 0.03, 20.0, rtol=0.0),
            ValueError,
            r"rtol must be > 0",
        ),
        (
            lambda s, x: kd.sample_dpmpp_2m(Guided(), x, s[None]),
            ValueError,
            r"sigmas must be a 1-D sequence",
        ),
        (
            lambda s, x: kd.sample_dpmpp_2m(Guided(), x, torch.tensor([5.0, 0.0, 1.0])),
            ValueError,
            r"sigma 0 may only be the last",
        ),
        (
            lambda s, x: kd.sample_dpmpp_2m(Guided(), x, torch.tensor([5.0, 1.0, 3.0])),
            ValueError,
            "strictly monotone",
        ),
        (
            lambda s, x: kd.sample_uni_pc(Guided(), x, torch.tensor([5.0, 0.0005, 0.0])),
            ValueError,
            r"sigmas: ComfyUI's UniPC replaces the final 0 by 0.001",
        ),
        (lambda s, x: kd.sample_dpmpp_2m("model", x, s), TypeError, r"model must be callable"),
        (lambda s, x: kd.get_sigmas_karras(0, 0.03, 20.0), ValueError, "n must be >= 1"),
        (lambda s, x: kd.get_sigmas_karras(5, 0.0, 20.0), ValueError, "sigma_min must be > 0"),
        (
            lambda s, x: kd.DiscreteDDPMDenoiser(
                Guided(), dp.DiscreteVPSchedule().alphas_cumprod, "epsilon"
            ),
            ValueError,
            r"prediction='epsilon'",
        ),
    ],
)
def test_bad_input_names_the_parameter(call: Any, exc: type[Exception], match: str) -> None:
    sigmas = kd.get_sigmas_karras(5, 0.03, 20.0).double()
    with pytest.raises(exc, match=match):
        call(sigmas, start(sigmas[0]))


def test_extra_args_reach_the_model() -> None:
    sigmas = kd.get_sigmas_karras(8, 0.03, 20.0).double()
    x = start(sigmas[0])
    unguided = Guided(labels=None)
    cond = kd.sample_dpmpp_2m(unguided, x, sigmas, extra_args={"y": LABELS}, disable=True)
    uncond = kd.sample_dpmpp_2m(Guided(labels=None), x, sigmas, disable=True)
    assert (cond - uncond).abs().max() > 1e-3


def test_disable_controls_the_progress_bar() -> None:
    sigmas = kd.get_sigmas_karras(4, 0.03, 20.0).double()
    for disable, shown in ((True, False), (False, True)):
        err = io.StringIO()
        with redirect_stderr(err):
            kd.sample_euler(Guided(), start(sigmas[0]), sigmas, disable=disable)
        assert ("4/4" in err.getvalue()) is shown


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
        fn = getattr(kd, name)
        latents = fn(Guided(labels=None), data, down.flip(0), disable=True)
        back = fn(Guided(labels=None), latents, down, disable=True)
        errors.append((back - data).abs().max().item())
    # Measured at 30 steps: 2.2e-3 (2M), 4.9e-3 (3M), 6e-4 (DPM-2), 0.19 (Euler, first order).
    assert errors[1] < errors[0] / 1.9 and errors[1] < (0.25 if name == "sample_euler" else 1e-2)


# --------------------------------------------------------------------------------------
# Sigma grids and discrete DDPM wrappers
# --------------------------------------------------------------------------------------


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
    assert torch.allclose(kd.get_sigmas_vp(n), K.get_sigmas_vp(n), rtol=1e-12)
    assert torch.allclose(
        kd.get_sigmas_polyexponential(n, 0.03, 14.6, rho=2.5),
        K.get_sigmas_polyexponential(n, 0.03, 14.6, rho=2.5),
        rtol=1e-12,
    )
    for helper in ("get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_vp"):
        sig = inspect.signature
        assert list(sig(getattr(kd, helper)).parameters) == list(sig(getattr(K, helper)).parameters)


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
    noise = start(1.0)
    x = kd.sample_dpmpp_2m(wrapped, noise * sigmas[0], sigmas, disable=True)
    ref = dp.sample(
        net,
        noise,
        schedule=sd,
        sigmas=sigmas,
        solver=dp.Recipe("dpmpp_2m", lower_order_final=False),
    )
    assert (x - ref.x).abs().max() < 1e-6
