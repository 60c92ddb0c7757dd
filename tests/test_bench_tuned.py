"""The tuned benchmark's study switch: ``--set OPTION=VALUE`` reaches dpmsolver.tune, and a
misspelt or bad one stops before any tuning."""

from __future__ import annotations

import pytest

from dpmsolver.bench.suite import FRESH_ROUNDS
from dpmsolver.bench.tuned import tune_settings


def test_settings_are_tune_options_given_as_literals() -> None:
    assert tune_settings(["shift_rows=32", "shift_bound=0.2"]) == {
        "shift_rows": 32,
        "shift_bound": 0.2,
    }
    assert tune_settings([]) == {}


@pytest.mark.parametrize(
    ("item", "error", "message"),
    [
        ("shift_row=32", SystemExit, r"OPTION one of \[.*'shift_rows'"),
        ("shift_rows", SystemExit, "expected OPTION=VALUE"),
        ("shift_rows=many", SystemExit, "VALUE must be a Python literal"),
        ("shift_rows=0", ValueError, "shift_rows must be >= 1"),
    ],
)
def test_bad_settings_are_named(item: str, error: type[BaseException], message: str) -> None:
    with pytest.raises(error, match=message):
        tune_settings([item])


@pytest.mark.parametrize("k", ["0", str(len(FRESH_ROUNDS) + 1)])
def test_a_fresh_round_that_does_not_exist_is_refused_by_name(
    k: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from dpmsolver.bench.tuned import main

    with pytest.raises(SystemExit):
        main(["--fresh-round", k, "--no-cost"])
    assert f"--fresh-round must be 1 to {len(FRESH_ROUNDS)}, got {k}" in capsys.readouterr().err


def test_a_rerendered_run_keeps_only_the_guidance_and_budgets_asked_for(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--from-csv`` with ``--guidance`` / ``--nfe`` compares only those cells (the record
    of stop 48 against stop 49's scope: guidance 7.5 and 15, 5-10 NFE)."""
    from pathlib import Path

    from dpmsolver.bench.tuned import main

    rec = Path(__file__).resolve().parents[1] / "benchmarks"
    argv = ["--from-csv", str(rec / "tuned_selection_v3.csv.gz")]
    argv += ["--compare", str(rec / "tuned_selection_g510.csv.gz")]
    assert main([*argv, "--guidance", "7.5,15", "--nfe", "5,6,8,10"]) == 0
    assert "| new noises | 224 | 203 | 203 |" in capsys.readouterr().out
    assert main(argv) == 0
    assert "| new noises | 448 |" in capsys.readouterr().out


def test_a_joined_rerender_writes_the_joined_cells(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--from-csv A,B --csv OUT``: a record with some problems re-run, as one CSV (the
    re-run's cells replace the record's, every other cell kept)."""
    from pathlib import Path

    from dpmsolver.bench.records import read_text
    from dpmsolver.bench.tuned import main, rows_from_tuned_csv

    rec = Path(__file__).resolve().parents[1] / "benchmarks"
    new, old = rec / "tuned_entry_heldflow.csv.gz", rec / "tuned_g.csv.gz"
    out = Path(str(tmp_path)) / "joined.csv.gz"
    assert main(["--from-csv", f"{new},{old}", "--csv", str(out)]) == 0
    capsys.readouterr()
    joined = {(r.problem, r.guidance, r.nfe): r for r in rows_from_tuned_csv(read_text(str(out)))}
    fresh = rows_from_tuned_csv(read_text(str(new)))
    assert len(joined) == len(rows_from_tuned_csv(read_text(str(old)))) == 256
    assert all(joined[r.problem, r.guidance, r.nfe].tuned == r.tuned for r in fresh)


def test_a_rerendered_run_is_written_where_out_says(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--from-csv X --out F`` writes the page to F as well as printing it (it used to print
    only, so each round's record was written from stdout)."""
    from pathlib import Path

    from dpmsolver.bench.tuned import main

    rec = Path(__file__).resolve().parents[1] / "benchmarks"
    out = Path(str(tmp_path)) / "page.md"
    assert main(["--from-csv", str(rec / "tuned_fresh7.csv.gz"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text().strip() == printed.strip()
    assert "| tuned <= best peer (every cell) | 256 | 232 | 24 | 0.35 | 4.38 |" in printed
