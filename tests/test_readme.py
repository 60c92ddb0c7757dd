"""The README's code is run exactly as written, and its solver table covers the registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import dpmsolver as dp

README = Path(__file__).resolve().parents[1] / "README.md"


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
    assert isinstance(result, dp.SampleResult) and result.nfe == 10 and torch.isfinite(result.x).all()


def test_solver_table_lists_every_registered_solver() -> None:
    text = README.read_text()
    table = text[text.index("## Solvers and their measured orders") :]
    for name in dp.REGISTRY:
        assert f"`{name}`" in table, name


def test_kdiffusion_snippet_runs_as_written() -> None:
    namespace: dict[str, object] = {}
    text = README.read_text()
    start = text.index("## Drop-in front ends")
    blocks = re.findall(r"```python\n(.*?)```", text[start : text.index("## The pieces")], re.S)
    assert len(blocks) == 2
    exec(compile(blocks[1], str(README), "exec"), namespace)
    x = namespace["x"]
    assert isinstance(x, torch.Tensor) and x.shape == (2, 4, 32, 32) and torch.isfinite(x).all()
    # N(0, I) data: the samples have unit scale.
    assert 0.7 < float(x.std()) < 1.3


def test_diffusers_snippet_runs_as_written() -> None:
    diffusers = pytest.importorskip("diffusers")
    from types import SimpleNamespace

    pipe = SimpleNamespace(scheduler=diffusers.PNDMScheduler(beta_schedule="scaled_linear", steps_offset=1))
    namespace: dict[str, object] = {"pipe": pipe}
    exec(compile(python_block("Drop-in front ends"), str(README), "exec"), namespace)
    assert type(pipe.scheduler).__name__ == "DPMSolverScheduler"
    assert pipe.scheduler.config.solver == "dpmpp_2m"


BENCH = README.parent / "benchmarks"


def _between(text: str, start: str, end: str) -> str:
    return text[text.index(start) + len(start) : text.index(end)].strip()


def test_readme_benchmark_numbers_are_the_recorded_outputs() -> None:
    """Every benchmark number quoted in the README is the one its command wrote to benchmarks/."""
    text = README.read_text()
    assert _between(text, "<!-- bench:start -->", "<!-- bench:end -->") == (BENCH / "summary.md").read_text().strip()
    assert _between(text, "<!-- orders:start -->", "<!-- orders:end -->") in (BENCH / "orders.md").read_text()
    overhead = [line for line in (BENCH / "overhead.md").read_text().splitlines() if line.startswith("| (")]
    assert overhead and all(line in text for line in overhead)
    import csv

    with open(BENCH / "quality_digits.csv", newline="") as f:
        quality = {(float(r["guidance"]), int(r["nfe"])): r for r in csv.DictReader(f)}
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| [-+][\d.]+% \|$", text, re.M)
    assert len(rows) == 4
    for w, acc, fd10, fd100 in rows:
        assert f"{float(quality[(float(w), 10)]['class_accuracy']):.3f}" == acc
        assert f"{float(quality[(float(w), 10)]['frechet_distance']):.3f}" == fd10
        assert f"{float(quality[(float(w), 100)]['frechet_distance']):.3f}" == fd100


def test_readme_tail_counts_are_the_recorded_ones() -> None:
    recorded = re.search(r"in (\d+) of (\d+) cells by RMS and in (\d+) of \d+ by the median", (BENCH / "tails.md").read_text())
    assert recorded is not None
    rms, cells, median = recorded.groups()
    text = " ".join(README.read_text().split())
    assert f"in {rms} of {cells} cells; by the median sample in {median} of {cells}" in text


def test_readme_divergence_counts_are_the_recorded_ones() -> None:
    tails = (BENCH / "tails.md").read_text()
    diverged, total = re.search(r"auto samples that diverged \(error above 1\): (\d+) of (\d+)", tails).groups()  # type: ignore[union-attr]
    text = " ".join(README.read_text().split())
    assert diverged == "0" and f"None of auto's {total} samples diverged" in text
    for w, nfe in (("7.5", 5), ("15", 5)):
        row = next(line for line in tails.splitlines() if line.startswith(f"| mixture w={w} seed 9 | {nfe} |"))
        peers = row.rstrip(" |").split("| ")[-1]  # "14 of 22"
        assert f"{peers} peer configurations" in text or f"({peers} at guidance {w})" in text


def test_readme_throughput_is_the_recorded_one() -> None:
    text = " ".join(README.read_text().split())
    for name in ("generate.md", "generate_busy.md"):
        rows = [line.split("|") for line in (BENCH / name).read_text().splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
        assert len(rows) == 3
        for cells in rows:
            assert f" {cells[5].strip()} " in text, (name, cells[1])  # samples/s
