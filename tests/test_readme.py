"""The README's code is run exactly as written, and its solver table covers the registry."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import dpmsolver as dp

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    text = README.read_text()
    start = text.index(f"## {section}")
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block under '## {section}'"
    return match.group(1)


def test_quick_start_snippet_runs_as_written() -> None:
    namespace: dict[str, object] = {}
    exec(compile(python_block("Quick start"), str(README), "exec"), namespace)
    result = namespace["result"]
    assert isinstance(result, dp.SampleResult)
    assert result.x.shape == (2, 4, 32, 32)
    assert result.nfe == 15 and torch.isfinite(result.x).all()


def test_solver_table_lists_every_registered_solver() -> None:
    text = README.read_text()
    table = text[text.index("## Solvers and their measured orders") :]
    for name in dp.REGISTRY:
        assert f"`{name}`" in table, name
