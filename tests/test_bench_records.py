"""bench.records: how the benchmark commands read, write and name their records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dpmsolver.bench.records import command_line, publish, read_text, write_text


@pytest.mark.parametrize("name", ["r.md", "r.csv.gz"])
def test_a_record_reads_back_and_leaves_no_temporary(tmp_path: Path, name: str) -> None:
    path = str(tmp_path / name)
    write_text(path, "a,b\n1,2\n")
    assert read_text(path) == "a,b\n1,2\n"
    write_text(path, "new\n")  # replaced whole
    assert read_text(path) == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_gzipped_record_is_the_same_bytes_each_time(tmp_path: Path) -> None:
    a, b = tmp_path / "a.csv.gz", tmp_path / "b.csv.gz"
    write_text(str(a), "x\n" * 100)
    write_text(str(b), "x\n" * 100)
    assert a.read_bytes() == b.read_bytes()  # no name or time stamp in the header
    assert len(a.read_bytes()) < 100  # and compressed


def test_the_command_line_names_the_module_and_its_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert command_line("dpmsolver.bench.x", ["--a", "1"]) == "python -m dpmsolver.bench.x --a 1"
    monkeypatch.setattr(sys, "argv", ["prog", "--b"])
    assert command_line("dpmsolver.bench.x", None) == "python -m dpmsolver.bench.x --b"


def test_a_published_record_is_printed_and_written_where_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish("# r\n", None)
    assert capsys.readouterr().out == "# r\n\n"
    assert list(tmp_path.iterdir()) == []
    publish("# s\n", str(tmp_path / "s.md"))
    assert capsys.readouterr().out == "# s\n\n"
    assert read_text(str(tmp_path / "s.md")) == "# s\n"
