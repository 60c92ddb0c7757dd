"""The README's code is run exactly as written, and its solver table covers the registry."""

from __future__ import annotations

import gzip
import math
import re
from pathlib import Path

import pytest
import torch

import dpmsolver as dp
from dpmsolver.bench.suite import BaselineRow, rows_from_csv

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"


def all_text() -> str:
    """The README and the pages it links in docs/: numbers may be quoted in any of them."""
    return "\n".join(p.read_text() for p in [README, *sorted(DOCS.glob("*.md"))])


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 3)
    blocks = re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)
    assert blocks, f"no python block under '## {section}'"
    return blocks


def python_block(section: str) -> str:
    return python_blocks(section)[0]


def test_quick_start_snippets_run_as_written() -> None:
    namespace: dict[str, object] = {}
    first, *rest = python_blocks("Quick start")
    exec(compile(first, str(README), "exec"), namespace)
    result = namespace["result"]
    assert isinstance(result, dp.SampleResult)
    assert result.x.shape == (2, 4, 32, 32)
    assert result.nfe == 15 and torch.isfinite(result.x).all()
    assert rest, "the solver='auto' snippet"
    for block in rest:  # continue in the same namespace, as a reader would
        exec(compile(block, str(README), "exec"), namespace)
    result = namespace["result"]
    assert (
        isinstance(result, dp.SampleResult) and result.nfe == 10 and torch.isfinite(result.x).all()
    )


def test_solver_table_lists_every_registered_solver() -> None:
    text = (DOCS / "solvers.md").read_text()
    table = text[text.index("## Measured orders") :]
    for name in dp.REGISTRY:
        assert f"`{name}`" in table, name


def test_kdiffusion_snippet_runs_as_written() -> None:
    namespace: dict[str, object] = {}
    text = README.read_text()
    start = text.index("## Drop-in front ends")
    blocks = re.findall(r"```python\n(.*?)```", text[start : text.index("\n## ", start)], re.S)
    assert len(blocks) == 2
    exec(compile(blocks[1], str(README), "exec"), namespace)
    x = namespace["x"]
    assert isinstance(x, torch.Tensor) and x.shape == (2, 4, 32, 32) and torch.isfinite(x).all()
    # N(0, I) data: the samples have unit scale.
    assert 0.7 < float(x.std()) < 1.3


def test_diffusers_snippet_runs_as_written() -> None:
    diffusers = pytest.importorskip("diffusers")
    from types import SimpleNamespace

    pipe = SimpleNamespace(
        scheduler=diffusers.PNDMScheduler(beta_schedule="scaled_linear", steps_offset=1)
    )
    namespace: dict[str, object] = {"pipe": pipe}
    exec(compile(python_block("Drop-in front ends"), str(README), "exec"), namespace)
    assert type(pipe.scheduler).__name__ == "DPMSolverScheduler"
    assert pipe.scheduler.config.solver == "dpmpp_2m"


BENCH = README.parent / "benchmarks"


def _between(text: str, start: str, end: str) -> str:
    return text[text.index(start) + len(start) : text.index(end)].strip()


def test_readme_benchmark_numbers_are_the_recorded_outputs() -> None:
    """Every benchmark number quoted in the README is the one its command wrote to benchmarks/."""
    text = all_text()
    assert (
        _between(text, "<!-- bench:start -->", "<!-- bench:end -->")
        == (BENCH / "summary.md").read_text().strip()
    )
    assert (
        _between(text, "<!-- orders:start -->", "<!-- orders:end -->")
        in (BENCH / "orders.md").read_text()
    )
    overhead = [
        line for line in (BENCH / "overhead.md").read_text().splitlines() if line.startswith("| (")
    ]
    assert overhead and all(line in text for line in overhead)
    import csv

    with open(BENCH / "quality_digits.csv", newline="") as f:
        quality = {(float(r["guidance"]), int(r["nfe"])): r for r in csv.DictReader(f)}
    rows = re.findall(
        r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| [-+][\d.]+% \|$", text, re.M
    )
    assert len(rows) == 4
    for w, acc, fd10, fd100 in rows:
        assert f"{float(quality[(float(w), 10)]['class_accuracy']):.3f}" == acc
        assert f"{float(quality[(float(w), 10)]['frechet_distance']):.3f}" == fd10
        assert f"{float(quality[(float(w), 100)]['frechet_distance']):.3f}" == fd100


def test_readme_tail_counts_are_the_recorded_ones() -> None:
    recorded = re.search(
        r"in (\d+) of (\d+) cells by RMS and in (\d+) of \d+ by the median",
        (BENCH / "tails.md").read_text(),
    )
    assert recorded is not None
    rms, cells, median = recorded.groups()
    text = " ".join(all_text().split())
    assert f"in {rms} of {cells} cells; by the median sample in {median} of {cells}" in text


def _wins(stem: str) -> tuple[int, int, int]:
    """(cells auto wins with guidance <= 7.5, those cells, cells it wins in all) from a CSV."""
    import csv

    with open(BENCH / f"{stem}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cells: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in rows:
        cells.setdefault((r["problem"], r["nfe"]), []).append(r)
    low = low_total = total = 0
    for (prob, _), cell in cells.items():
        auto = next(float(r["error"]) for r in cell if r["method"] == "auto")
        win = auto <= min(float(r["error"]) for r in cell if r["source"] != "ours")
        total += win
        if float(prob.split("w=")[1].split()[0]) <= 7.5:
            low, low_total = low + win, low_total + 1
    return low, low_total, total


def test_readme_win_counts_are_the_recorded_ones() -> None:
    text = " ".join(all_text().split())
    low, low_total, _ = _wins("accuracy_mixture")
    assert f"in {low} of the {low_total} cells with guidance <= 7.5" in text
    _, _, digits = _wins("accuracy_digits")
    assert f"it wins {digits} of 36 cells" in text


def test_readme_ceiling_is_the_recorded_one() -> None:
    rows = [
        line.split("|")[1:-1]
        for line in (BENCH / "ceiling.md").read_text().splitlines()
        if line.startswith("| mixture") or line.startswith("| digits")
    ]
    best = {(cells[0].strip(), int(cells[1])): cells[3].strip() for cells in rows}
    text = " ".join(all_text().split())
    for problem, where in (
        ("mixture w=7.5 seed 2", "on the mixture"),
        ("digits w=7.5 seed 2", "on the digits network"),
    ):
        v = [best[(problem, n)] for n in (5, 6, 8, 10)]
        assert f"{v[0]}, {v[1]}, {v[2]} and {v[3]} {where}" in text
    top = max(float(b) for (p, _), b in best.items() if p == "mixture w=15 seed 2")
    assert f"the ceiling is at most {top:.2f} in every guidance-15 cell" in text


def test_readme_calibrated_steps_are_the_recorded_ones() -> None:
    rows = [
        line.split("|")[1:-1]
        for line in (BENCH / "steps.md").read_text().splitlines()
        if line.startswith("| mixture")
    ]
    cell = {(r[0].strip(), int(r[1])): (r[2].strip(), r[3].strip(), r[6].strip()) for r in rows}
    text = " ".join(all_text().split())
    a8, c8, _ = cell[("mixture w=7.5 seed 2", 8)]
    assert f"take 8 NFE from {a8} to {c8} of the best peer's error" in text
    assert (
        f"were ({cell[('mixture w=7.5 seed 2', 5)][1]}, {cell[('mixture w=7.5 seed 2', 6)][1]})"
        in text
    )
    assert (
        cell[("mixture w=7.5 seed 2", 10)][2] == "no"
        and "at 10 NFE validation dropped the fit" in text
    )
    (a, c, _), (b, d, _) = cell[("mixture w=15 seed 2", 8)], cell[("mixture w=15 seed 2", 10)]
    assert f"from {a} and {b} to {c} and {d}" in text


def test_readme_divergence_counts_are_the_recorded_ones() -> None:
    tails = (BENCH / "tails.md").read_text()
    diverged, total = re.search(
        r"auto samples that diverged \(error above 1\): (\d+) of (\d+)", tails
    ).groups()  # type: ignore[union-attr]
    text = " ".join(all_text().split())
    assert diverged == "0" and f"None of auto's {total} samples diverged" in text
    for w, nfe in (("7.5", 5), ("15", 5)):
        row = next(
            line
            for line in tails.splitlines()
            if line.startswith(f"| mixture w={w} seed 9 | {nfe} |")
        )
        peers = row.rstrip(" |").split("| ")[-1]  # "14 of 22"
        assert f"{peers} peer configurations" in text or f"({peers} at guidance {w})" in text


def test_readme_throughput_is_the_recorded_one() -> None:
    text = " ".join(all_text().split())
    for name in ("generate.md", "generate_busy.md"):
        rows = [
            line.split("|")
            for line in (BENCH / name).read_text().splitlines()
            if line.startswith("| 1 ") or line.startswith("| 2 ")
        ]
        assert len(rows) == 3
        for cells in rows:
            assert f" {cells[5].strip()} " in text, (name, cells[1])  # samples/s


def test_tune_snippet_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tuning example, with the search made cheap (its defaults are timed by
    ``python -m dpmsolver.bench.tuned``)."""
    from .test_tune import CHEAP  # here: test_tune skips its module without scipy

    real = dp.tune
    cheap = {**CHEAP, "rtol": 1e-4, "solvers": (("dpmpp_multistep", {"order": 2}), ("ddim", {}))}

    def tune(model: object, noise: torch.Tensor, **kw: dict[str, torch.Tensor]) -> dp.Profile:
        # 8 of the pilot rows: a pilot of 32 costs minutes on a shared CPU
        kw["cond"], kw["uncond"] = ({"y": kw[k]["y"][:8]} for k in ("cond", "uncond"))
        return real(model, noise[:8], **kw, **cheap)  # type: ignore[arg-type]

    monkeypatch.setattr(dp, "tune", tune)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(python_block("Fit the sampler to your model"), str(README), "exec"), namespace)
    result, profile = namespace["result"], namespace["profile"]
    assert isinstance(result, dp.SampleResult) and isinstance(profile, dp.Profile)
    assert (tmp_path / "profile.json").exists() and [c.nfe for c in profile.choices] == [6, 10]
    assert result.nfe == 10 and result.x.shape == (10, 1, 8, 8) and torch.isfinite(result.x).all()


@pytest.mark.parametrize(
    ("block", "record"),
    [
        ("tuned", "tuned_entry.md"),
        ("tuned-fresh", "tuned_fresh_entry.md"),
        ("tuned-new", "tuned_entry.md"),
        ("tuned-fresh-new", "tuned_fresh_entry.md"),
        ("tuned-fresh4", "tuned_fresh4.md"),
        ("tuned-fresh4-new", "tuned_fresh4.md"),
        ("tuned-fresh5", "tuned_fresh5.md"),
        ("tuned-fresh5-new", "tuned_fresh5.md"),
        ("tuned-fresh6", "tuned_fresh6.md"),
        ("tuned-fresh6-new", "tuned_fresh6.md"),
        ("tuned-fresh7", "tuned_fresh7.md"),
        ("tuned-fresh7-new", "tuned_fresh7.md"),
        ("tuned-fresh8", "tuned_fresh8.md"),
        ("tuned-fresh8-new", "tuned_fresh8.md"),
        ("tuned-fresh9", "tuned_fresh9.md"),
        ("tuned-fresh9-new", "tuned_fresh9.md"),
        ("calibrated", "calibrated_peer.md"),
        ("calibrated-fresh", "calibrated_peer_fresh.md"),
    ],
)
def test_readme_tuned_summary_is_the_recorded_one(block: str, record: str) -> None:
    quoted = _between(all_text(), f"<!-- {block}:start -->", f"<!-- {block}:end -->")
    recorded = (BENCH / record).read_text()
    assert quoted and all(line in recorded for line in quoted.splitlines())


def test_readme_tune_cost_is_the_recorded_one() -> None:
    """The tuning times the README quotes are the ones benchmarks/tune_cost.md records:
    the generated guidance-3 run (#11's bound: under 10 minutes) and the CLI run at guidance
    7.5, each quoted as measured and called over the bound when it is."""
    recorded = (BENCH / "tune_cost.md").read_text()
    minutes = re.findall(r"\*\*(\d+\.\d) min\*\*", recorded)
    cli = re.findall(r"tuning took \d+ s \((\d+\.\d) min\)", recorded)
    assert len(minutes) == 1 and len(cli) == 1, (minutes, cli)
    text = " ".join(README.read_text().split())
    for m in (*minutes, *cli):
        assert f"**{m} minutes**" in text, m
    # over the bound, the README must say so next to the time
    assert (f"**{minutes[0]} minutes**, over the 10-minute bound" in text) == (
        float(minutes[0]) >= 10.0
    )
    over = float(cli[0]) >= 10.0
    assert ("over the bound" in text) == over
    assert (": over the 10-minute bound." in recorded) == over


def _recorded(name: str) -> list[BaselineRow]:
    """A suite run's rows as ``python -m dpmsolver.bench.suite --csv`` wrote them."""
    with gzip.open(BENCH / name, "rt") as f:
        return rows_from_csv(f.read())


def _better_flow_scheduler(r: BaselineRow) -> float:
    """The better of diffusers' FlowMatch Euler and DPM-Solver++ 2M (flow sigmas)."""
    return min(r.errors["diffusers FlowMatch Euler"], r.errors["diffusers DPM++2M flow"])


def test_readme_flow_table_is_the_recorded_one() -> None:
    """The flow table's every entry, recomputed from benchmarks/flow.csv.gz."""
    cells = {(r.guidance, r.nfe): r for r in _recorded("flow.csv.gz")}
    assert {r.ours_label for r in cells.values()} == {"default"}
    quoted = _between(all_text(), "<!-- flow:start -->", "<!-- flow:end -->")
    lines = [ln for ln in quoted.splitlines() if re.match(r"\| \d", ln)]
    assert len(lines) == len(cells) == 16
    for line in lines:
        w, n, ours, euler, dpm, best = (c.strip() for c in line.strip("|").split("|"))
        r = cells[(float(w), int(n))]
        assert ours == f"{r.ours:.4f}" and best == f"{r.best_peer:.4f} ({r.best_label})"
        assert euler == f"{r.errors['diffusers FlowMatch Euler']:.4f}"
        assert dpm == f"{r.errors['diffusers DPM++2M flow']:.4f}"
    # #15's target: with its defaults `sample` is at most the better of diffusers' two flow
    # schedulers at 5, 10 and 20 NFE, guidance 1 and 3
    for (w, n), r in cells.items():
        if n in (5, 10, 20):
            assert r.ours <= _better_flow_scheduler(r), (w, n, r.ours)


def test_flow_snippet_runs_as_written() -> None:
    namespace: dict[str, object] = {}
    exec(compile(python_block("Flow-matching and EDM models"), str(README), "exec"), namespace)
    result = namespace["result"]
    assert isinstance(result, dp.SampleResult) and result.nfe == 10
    assert result.x.shape == (10, 1, 8, 8) and torch.isfinite(result.x).all()


def _flow_mixture_bands() -> list[str]:
    """The held-out check of the flow default, recomputed from
    benchmarks/flow_mixtures.csv.gz: per guidance band, the cells where ours is at most
    the better of diffusers' FlowMatch Euler and DPM-Solver++ 2M, the geometric mean and
    the worst of ours / that better one."""
    rows = _recorded("flow_mixtures.csv.gz")
    assert {r.ours_label for r in rows} == {"default"}
    lines = []
    for band, ws in (("1-3", (1.0, 3.0)), ("7.5-15", (7.5, 15.0))):
        ratios = [r.ours / _better_flow_scheduler(r) for r in rows if r.guidance in ws]
        gm = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
        met = sum(v <= 1 for v in ratios)
        lines.append(f"| {band} | {len(ratios)} | {met} | {gm:.2f} | {max(ratios):.3g} |")
    return lines


def test_readme_flow_mixture_table_is_the_recorded_one() -> None:
    quoted = _between(all_text(), "<!-- flowmix:start -->", "<!-- flowmix:end -->")
    lines = [ln.strip() for ln in quoted.splitlines() if re.match(r"\| \d", ln)]
    assert lines == _flow_mixture_bands()
