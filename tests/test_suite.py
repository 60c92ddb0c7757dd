"""The benchmark suite: exact low-rank-plus-diagonal mixtures, references from pure noise,
the problems and their split, and the peer runner's evaluation counts."""

from __future__ import annotations

import math

import pytest
import torch

import dpmsolver as dp
from dpmsolver.analytic import (
    GaussianMixture,
    LowRankMixture,
    LowRankMixtureDenoiser,
    MixtureDenoiser,
    default_mixture,
    exact_sample,
    reference_sample,
    solve_from_pure_noise,
)
from dpmsolver.bench.records import read_text

torch.set_num_threads(1)


def _random_lowrank(
    k: int, d: int, r: int, classes: int, seed: int, small: float = 0.01
) -> LowRankMixture:
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    return LowRankMixture(
        torch.randn(k, d, generator=g, dtype=f64),
        0.7 * torch.randn(k, d, r, generator=g, dtype=f64),
        small + 0.2 * torch.rand(k, d, generator=g, dtype=f64),
        0.2 + torch.rand(k, generator=g, dtype=f64),
        torch.arange(k) % classes,
        classes,
    )


def _brute_force_x0(
    mix: LowRankMixture, x: torch.Tensor, a: float, s: float, cls: int | None
) -> torch.Tensor:
    """Tweedie's formula with the score from autograd of the exact log density of the
    noisy mixture (dense covariances, torch.distributions)."""
    cov = mix.covariances()
    eye = torch.eye(mix.dim, dtype=torch.float64)
    x = x.clone().requires_grad_(True)
    terms = []
    for k in range(mix.means.shape[0]):
        if cls is not None and int(mix.labels[k]) != cls:
            continue
        mvn = torch.distributions.MultivariateNormal(a * mix.means[k], a * a * cov[k] + s * s * eye)
        terms.append(torch.log(mix.weights[k]) + mvn.log_prob(x))
    (score,) = torch.autograd.grad(torch.logsumexp(torch.stack(terms), 0).sum(), x)
    return ((x + s * s * score) / a).detach()


@pytest.mark.parametrize(("a", "s"), [(0.95, 0.3), (0.2, 0.98), (1.0, 0.02), (0.5, 4.0)])
def test_lowrank_posterior_mean_equals_tweedie_with_autograd_score(a: float, s: float) -> None:
    mix = _random_lowrank(k=5, d=4, r=2, classes=3, seed=1)
    x = a * mix.sample(6, generator=torch.Generator().manual_seed(2)) + s * torch.randn(
        6, 4, dtype=torch.float64
    )
    for cls in (None, 0, 2):
        y = None if cls is None else torch.full((6,), cls)
        got = mix.x0(x, a, s, y)
        want = _brute_force_x0(mix, x, a, s, cls)
        assert torch.allclose(got, want, rtol=0, atol=1e-11 * (1 + float(want.abs().max())))


def test_lowrank_guided_denoiser_is_exact_cfg_with_per_row_labels() -> None:
    mix = _random_lowrank(k=6, d=5, r=3, classes=3, seed=3)
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])  # 3 = unconditional rows
    knot = dp.DiscreteVPSchedule().knot(400.0)
    got = LowRankMixtureDenoiser(mix, y, 7.5)(x, knot)
    for i in range(9):
        cls = None if int(y[i]) == 3 else int(y[i])
        c = _brute_force_x0(mix, x[i : i + 1], knot.alpha, knot.sigma, cls)
        u = _brute_force_x0(mix, x[i : i + 1], knot.alpha, knot.sigma, None)
        assert torch.allclose(got[i : i + 1], u + 7.5 * (c - u), atol=1e-10)


def test_lowrank_with_zero_factors_equals_the_diagonal_mixture() -> None:
    diag = default_mixture(dim=16, num_classes=4, components_per_class=3, seed=0)
    lr = LowRankMixture.from_diagonal(diag)
    y = torch.arange(32) % 5
    z = torch.randn(32, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (999.0, 500.0, 50.0, 0.0):
        k = dp.DiscreteVPSchedule().knot(t)
        x = k.sigma * z + k.alpha * diag.sample(32, generator=torch.Generator().manual_seed(1))
        want = MixtureDenoiser(diag, y, 3.0)(x, k)
        got = LowRankMixtureDenoiser(lr, y, 3.0)(x, k)
        assert torch.allclose(got, want, rtol=0, atol=1e-13)
        assert torch.allclose(
            lr.log_prob(x, k.alpha, k.sigma), diag.log_prob(x, k.alpha, k.sigma), atol=1e-10
        )
    assert math.isclose(
        lr.data_std() ** 2,
        float(
            diag.stds.pow(2).mean(1) @ diag.weights
            + (diag.weights @ (diag.means - diag.weights @ diag.means) ** 2).mean()
        ),
        rel_tol=1e-12,
    )


def test_lowrank_per_row_noise_levels_and_sample_moments() -> None:
    mix = _random_lowrank(k=3, d=4, r=1, classes=2, seed=4)
    x = torch.randn(4, 4, dtype=torch.float64)
    al = torch.tensor([0.9, 0.5, 0.9, 0.5], dtype=torch.float64)
    sg = (1 - al**2).sqrt()
    rows = mix.x0(x, al, sg)
    for i in range(4):
        assert torch.allclose(
            rows[i], mix.x0(x[i : i + 1], float(al[i]), float(sg[i]))[0], atol=1e-14
        )
    one = LowRankMixture(
        mix.means[:1],
        mix.factors[:1],
        mix.diag[:1],
        torch.ones(1),
        torch.zeros(1, dtype=torch.long),
        1,
    )
    xs = one.sample(40000, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(torch.cov(xs.T), one.covariances()[0], atol=0.05)


def test_solve_from_pure_noise_matches_the_closed_form_flow_of_one_gaussian() -> None:
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture(
        torch.randn(1, 6, generator=g, dtype=torch.float64),
        0.3 + torch.rand(1, 6, generator=g, dtype=torch.float64),
        torch.ones(1),
        torch.zeros(1, dtype=torch.long),
        1,
    )
    sched = dp.RectifiedFlowSchedule(3.0)
    start, end = sched.knot(sched.t_max), sched.knot(sched.t_min)
    assert start.alpha == 0.0 and start.lam == -math.inf
    with pytest.raises(ValueError, match="finite"):
        dp.reference_solve(MixtureDenoiser(mix), torch.zeros(1, 6), start, end, sched)
    z = torch.randn(8, 6, generator=g, dtype=torch.float64)
    got = solve_from_pure_noise(MixtureDenoiser(mix), z, start, end, sched, rtol=1e-9, atol=1e-11)
    exact = (
        end.alpha * mix.means[0] + torch.sqrt(end.alpha**2 * mix.stds[0] ** 2 + end.sigma**2) * z
    )
    assert float((got - exact).abs().max()) < 1e-9


def test_exact_sample_is_reference_sample_where_that_applies() -> None:
    mix = default_mixture(dim=4, seed=2)
    den = MixtureDenoiser(mix, torch.arange(4) % 3, 3.0)
    sched = dp.ContinuousVPSchedule("cosine")
    x = torch.randn(4, 4, dtype=torch.float64)
    assert torch.equal(
        exact_sample(den, x, sched, rtol=1e-6), reference_sample(den, x, sched, rtol=1e-6)
    )


# --------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------

from dpmsolver.bench import peer_suite, peers, suite  # noqa: E402


def test_every_problem_builds_and_its_reference_passes_the_two_tolerance_check() -> None:
    assert len(suite.SPECS) >= 12
    names = [s.name for s in suite.SPECS]
    assert len(set(names)) == len(names)
    for p in suite.suite_problems():
        z = p.noise(2)
        assert z.shape == (2, *p.shape) and torch.equal(z, p.noise(2))
        assert not torch.equal(z, p.noise(2, seed=12345))
        x_T = p.x_T(z)
        den = p.denoiser(3.0, p.labels(2))
        if p.family == "flow":
            assert torch.equal(x_T, z)  # pure noise at t = 1
        # Tolerances ten times looser than the driver's (1e-9 / 1e-8), to keep the test short; the
        # driver refuses to run on a reference that fails its own check.
        check = p.check_reference(den, x_T, rtol=1e-8, loose_rtol=1e-7)
        assert check.passed, (p.name, check.error, check.tolerance)
        assert check.sample.shape == x_T.shape and bool(torch.isfinite(check.sample).all())


def test_problems_span_the_stated_structure() -> None:
    probs = suite.suite_problems()
    dims = [p.features["dim"] for p in probs]
    comps = [p.features["components"] for p in probs]
    stds = [p.data_std for p in probs]
    assert min(dims) == 2 and max(dims) == 1024
    assert min(comps) == 2 and max(comps) >= 48
    assert min(stds) == pytest.approx(0.3) and max(stds) == pytest.approx(3.0)
    assert len({p.num_classes for p in probs}) >= 4
    assert {p.features["schedule"] for p in probs} == {
        "sd",
        "vp_linear",
        "vp_cosine",
        "edm",
        "flow",
        "flow_shift3",
    }
    for p in probs:  # the data scale is what the spec says
        spec = p.spec  # type: ignore[attr-defined]
        if not spec.today:
            assert p.data_std == pytest.approx(spec.data_std, rel=1e-9)
    ill = [p.features["condition"] for p in probs if p.features["covariance"] == "illcond"]
    assert min(ill) > 1e3


def test_selection_and_held_out_are_disjoint_and_each_covers_every_feature_level() -> None:
    sel = suite.suite_problems("selection")
    held = suite.suite_problems("held_out")
    fresh = suite.suite_problems("fresh")
    assert {p.name for p in sel}.isdisjoint({p.name for p in held})
    assert not {p.name for p in fresh} & {p.name for p in sel + held}
    assert len(sel) + len(held) + len(fresh) == len(suite.SPECS)
    # the fresh problems span every schedule family too
    assert {p.family for p in fresh} == {p.family for p in sel}
    for feature in suite.FEATURES:
        levels = {p.features[feature] for p in sel + held}
        assert {p.features[feature] for p in sel} == levels, feature
        assert {p.features[feature] for p in held} == levels, feature
    # choices were already made on today's mixture and the digits network
    assert suite.get_problem("mix16-sd").split == "selection"
    assert suite.NETWORK_PROBLEMS["digits-unet-sd"]().split == "selection"


def test_todays_problem_is_todays_mixture() -> None:
    p = suite.get_problem("mix16-sd")
    diag = default_mixture(dim=16, num_classes=4, components_per_class=3, seed=0)
    x = torch.randn(4, 16, dtype=torch.float64)
    k = p.schedule.knot(300.0)
    y = torch.arange(4)
    assert torch.allclose(p.denoiser(7.5, y)(x, k), MixtureDenoiser(diag, y, 7.5)(x, k), atol=1e-13)


@pytest.mark.parametrize("name", ["iso2-sd", "iso2-vplin", "ill256-edm", "iso8-flow"])
def test_every_peer_configuration_spends_exactly_the_nfe_or_is_skipped(name: str) -> None:
    p = suite.get_problem(name)
    labels = p.labels(2)
    x_T = p.x_T(p.noise(2))
    configs = peer_suite.peer_configs(p.family)
    assert len(configs) >= 40
    for nfe in (5, 6):
        results = peer_suite.run_peers(p, 3.0, labels, x_T, nfe)
        assert [r.label for r in results] == [c.label for c in configs]
        ran = [r for r in results if r.sample is not None]
        assert all(r.nfe == nfe for r in ran)
        assert all(r.sample is None for r in results if r.nfe != nfe)
        assert len(ran) >= (30 if nfe == 6 else 40)


def test_peer_nfe_counts_are_the_calls_made_and_odd_only_for_two_stage_samplers() -> None:
    p = suite.get_problem("iso2-sd")
    den = p.denoiser(1.0, p.labels(2))
    task = peer_suite.PeerTask(p, den, p.x_T(p.noise(2)))
    by = {c.label: c for c in peer_suite.peer_configs()}
    heun = by["k-diffusion heun karras"]
    assert peer_suite.run_peer(heun, task, 7).nfe == 7
    assert peer_suite.run_peer(heun, task, 8).sample is None  # 2 per step, 1 on the last
    for label in (
        "diffusers DPM++2M karras",
        "diffusers Heun",
        "diffusers PLMS trailing",
        "k-diffusion dpm_fast + denoise",
        "diffusers EDM DPM++2M karras",
    ):
        start = task.calls
        r = peer_suite.run_peer(by[label], task, 9)
        assert r.nfe == task.calls - start == 9 and r.sample is not None, label


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        (
            "iso2-vplin",
            (
                "diffusers DPM++2M karras",
                "diffusers EDM DPM++2M karras",
                "k-diffusion dpmpp_2m exponential",
            ),
        ),
        ("ill3-vplin", ("diffusers UniPC bh2 karras", "diffusers Euler karras")),
        (
            "iso8-flow",
            (
                "diffusers FlowMatch Euler",
                "diffusers UniPC bh2 flow",
                "k-diffusion dpmpp_2m own",
                "k-diffusion dpmpp_2m flow-sigma own",
            ),
        ),
    ],
)
def test_peers_converge_to_the_exact_sample(name: str, labels: tuple[str, ...]) -> None:
    """A wrong conversion (time, scaling, parameterization) would leave an error that does
    not shrink with the step count."""
    p = suite.get_problem(name)
    y = p.labels(4)
    x_T = p.x_T(p.noise(4))
    den = p.denoiser(3.0, y)
    ref = p.reference(den, x_T, 1e-8)
    by = {c.label: c for c in peer_suite.peer_configs()}
    for label in labels:
        errs = []
        for nfe in (15, 60):
            out = peer_suite.run_peers(p, 3.0, y, x_T, nfe, configs=[by[label]], denoiser=den)[0]
            assert out.sample is not None, label
            errs.append(float(((out.sample - ref) ** 2).mean().sqrt()) / p.data_std)
        assert errs[1] < 0.35 * errs[0], (label, errs)  # at least first order


def test_ours_runs_on_every_family_including_flow_from_pure_noise() -> None:
    for name in ("iso2-sd", "iso2-vplin", "ill256-edm", "iso8-flow"):
        p = suite.get_problem(name)
        x_T = p.x_T(p.noise(2))
        x, made = suite.run_ours(p, p.denoiser(3.0, p.labels(2)), x_T, 8)
        assert made == 8 and x is not None and bool(torch.isfinite(x).all())


def test_the_digits_network_fits_the_problem_interface() -> None:
    p = suite.get_problem("digits-unet-sd")
    assert p.kind == "network" and p.family == "discrete" and p.num_classes == 10
    y = p.labels(2)
    x_T = p.x_T(p.noise(2))
    den = p.denoiser(3.0, y)
    out = den(x_T, p.schedule.knot(500.0))
    assert out.shape == (2, 1, 8, 8) and out.dtype == torch.float64
    x, made = suite.run_ours(p, den, x_T, 5)
    assert made == 5 and x is not None
    by = {c.label: c for c in peer_suite.peer_configs()}
    r = peer_suite.run_peers(p, 3.0, y, x_T, 5, configs=[by["diffusers DPM++2M karras"]])[0]
    assert r.nfe == 5 and r.sample is not None and r.sample.shape == x_T.shape


def test_baseline_driver_writes_its_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "b.md"
    csv = tmp_path / "b.csv.gz"
    assert (
        suite.main(
            [
                "--problems",
                "iso2-sd",
                "--guidance",
                "3",
                "--nfe",
                "5",
                "--batch",
                "2",
                "--out",
                str(out),
                "--csv",
                str(csv),
            ]
        )
        == 0
    )
    text = out.read_text()
    assert "| iso2-sd |" in text and "ours / peer" in text and "Peer configurations" in text
    assert "## Timing" in text
    assert read_text(str(csv)).count("\n") > 30
    rows = suite.rows_from_csv(read_text(str(csv)))
    assert len(rows) == 1 and rows[0].problem == "iso2-sd" and rows[0].peers_run > 30
    assert rows[0].best_peer == min(rows[0].errors.values())
    # --reuse keeps the recorded problem as it is and runs only the one it lacks
    again = tmp_path / "c.csv.gz"
    args = ["--guidance", "3", "--nfe", "5", "--batch", "2", "--reuse", str(csv)]
    assert (
        suite.main(
            ["--problems", "iso2-vplin,iso2-sd", *args, "--out", str(out), "--csv", str(again)]
        )
        == 0
    )
    both = suite.rows_from_csv(read_text(str(again)))
    assert [r.problem for r in both] == ["iso2-vplin", "iso2-sd"]
    assert both[1].errors == rows[0].errors  # as recorded, not rerun
    text = out.read_text()
    assert "for the 1 problem(s) it ran; the other 1 are `--reuse`d as recorded" in text
    timing = text[text.index("## Timing") :]
    assert "| iso2-vplin |" in timing and "| iso2-sd |" not in timing


def test_missing_peer_packages_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "optional_import", lambda name: None)  # no diffusers
    assert {c.source for c in peer_suite._build_configs()} == {"k-diffusion"}
    monkeypatch.setattr(peer_suite, "load_kdiffusion_sampling", lambda: None)
    assert peer_suite._build_configs() == []


def test_a_rerun_keeps_the_hand_kept_commands_paragraph(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out`` onto a record whose ``Commands:`` paragraph is kept by hand (the history of
    the runs that measured its problems) keeps it, and names the new run on stderr to add;
    onto a new file it writes the run's own ``Command:`` line."""
    from pathlib import Path

    out = Path(str(tmp_path)) / "baseline.md"
    csv = Path(__file__).resolve().parents[1] / "benchmarks" / "suite_baseline.csv.gz"
    argv = ["--quick", "--problems", "mix16-sd", "--reuse", str(csv), "--out", str(out)]
    assert suite.main(argv) == 0  # every problem reused: nothing runs
    assert "\nCommand: `python -m dpmsolver.bench.suite --quick" in out.read_text()
    history = "Commands: the first run (40.3 min), then the second (1.2 min)."
    out.write_text(out.read_text().replace("Command: `", f"{history}\n\nOld: `", 1))
    capsys.readouterr()
    assert suite.main(argv) == 0
    text = out.read_text()
    assert history in text and "\nCommand: `" not in text
    assert "kept its hand-kept 'Commands:' paragraph; add this run to it" in capsys.readouterr().err
