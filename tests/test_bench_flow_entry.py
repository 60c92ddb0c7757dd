"""bench.flow_entry: every flow recipe run from the same noise with the step out of pure
noise and without it, against the exact ODE solution from the noise."""

from __future__ import annotations

from dpmsolver.bench.flow_entry import EntryCell, markdown, measure


def test_the_entry_step_lowers_the_floor_and_changes_nothing_else() -> None:
    cells = {(c.recipe, c.nfe): c for c in measure("iso4-flow", 3.0, (8, 80), 16)}
    assert set(cells) == {
        (r, n) for r in ("auto", "unipc3", "dpmpp_2m", "unipc3_eps") for n in (8, 80)
    }
    # at 80 NFE the old start's bias is most of UniPC's error
    assert cells["unipc3", 80].ratio < 0.5, cells["unipc3", 80]
    # at 8 the solver's own error dominates: within a few percent either way
    assert 0.9 < cells["unipc3", 8].ratio < 1.1
    # a noise prediction's grid starts a whole step in: there the old start's bias was
    # alpha = 1/8 and 1/80 of the data's distance from the noise
    assert cells["unipc3_eps", 8].ratio < 0.8 and cells["unipc3_eps", 80].ratio < 0.2


def test_markdown_summarizes_each_recipe_by_budget_band() -> None:
    cells = [
        EntryCell("p", "held_out", "auto", 1.0, 8, 2.0, 1.0, 1.0, 1.0),
        EntryCell("p", "held_out", "auto", 1.0, 10, 0.5, 1.0, 0.25, 1.0),
        EntryCell("p", "held_out", "auto", 1.0, 80, 1.0, 4.0, 1.0, 2.0),
    ]
    text = markdown(cells, "cmd", 0.1)
    # 5-10: ratios 2 and 0.5 (geo-mean 1), one better and one worse; medians 1 and 0.25
    assert "| auto | 5-10 | 2 | 1.000 | 0.500 | 2.000 | 1 | 1 | 0.500 | 1 | 0 |" in text
    assert "| auto | 40-80 | 1 | 0.250 | 0.250 | 0.250 | 1 | 0 | 0.500 | 1 | 0 |" in text
    assert "| p | held_out | auto | 1 | 80 | 1.000e+00 | 4.000e+00 | 0.250 | 0.500 |" in text
