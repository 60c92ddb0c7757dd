"""The recorded policy study (benchmarks/policy.md, benchmarks/policy.csv.gz) agrees with
itself and with the shipped ``solver="auto"``: the claim the README quotes is recomputed
from the recorded errors, and the table in dpmsolver.auto is the one the selection rule
picks from them. Editing one without the others fails here."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from dpmsolver.auto import recommend
from dpmsolver.bench.policy import (
    FAMILIES,
    Study,
    choose_rule,
    fit,
    policy_ratios,
    recipe_label,
    rows_from_text,
    rule_named,
    usable_cells,
)
from dpmsolver.bench.records import read_text
from dpmsolver.bench.suite import make_schedule_named, rows_from_csv

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = ROOT / "benchmarks" / "policy.md"
CSV = ROOT / "benchmarks" / "policy.csv.gz"
PEERS = ROOT / "benchmarks" / "suite_baseline.csv.gz"
SCHEDULE = {"discrete": "sd", "vp": "vp_linear", "ve": "edm", "flow": "flow"}


def claim_pattern(word: str) -> re.Pattern[str]:
    """The CLAIM line for one split (``held-out`` or ``fresh``)."""
    return re.compile(
        rf"CLAIM: {word} worst ratio (?P<ours>[0-9.e+]+) \((?P<cell>[^)]*)\), (?P<verdict>below|"
        rf"NOT below) every single peer configuration's {word} worst ratio \(the smallest: "
        rf"(?P<peer>[0-9.e+]+), (?P<label>[^,]+), over the (?P<cells>\d+) {word} cells it can "
        r"run\); library default dpmpp_2m (?P<default>[0-9.e+]+); previous auto "
        rf"(?P<previous>[0-9.e+]+)\. On each peer configuration's own {word} cells, our worst "
        r"ratio is below its worst for (?P<own>\d+) of (?P<configs>\d+) configurations\."
    )


CLAIM = claim_pattern("held-out")


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v < 1000 else f"{v:.2e}"


@pytest.fixture(scope="module")
def study() -> Study:
    rows, _ = rows_from_text(read_text(str(CSV)))
    return Study(rows, rows_from_csv(read_text(str(PEERS))))


@pytest.fixture(scope="module")
def markdown() -> str:
    return MARKDOWN.read_text()


@pytest.mark.parametrize(
    ("split", "word", "count"), [("held_out", "held-out", 8), ("fresh", "fresh", 8)]
)
def test_the_claim_is_what_the_recorded_errors_say(
    study: Study, markdown: str, split: str, word: str, count: int
) -> None:
    m = claim_pattern(word).search(markdown)
    assert m is not None, f"benchmarks/policy.md lost its {word} CLAIM line"
    chosen = re.search(r"### Chosen: (.+), per left-out problem", markdown)
    assert chosen is not None
    rule = rule_named(chosen.group(1))
    sel, held = study.problems("selection"), study.problems(split)
    assert len(sel) == 76 and len(held) == count
    table = fit(study.ratios, study.family, sel, rule.granularity, study.candidates, rule.power)
    ours = policy_ratios(table, study.ratios, study.family, held)
    assert len(ours) == 32 * count and all(math.isfinite(v) for v in ours.values())
    worst = max(ours.values())
    peers = study.peer_worst(held)
    label = min(peers, key=lambda k: peers[k][0])
    assert m.group("ours") == _fmt(worst)
    assert m.group("peer") == _fmt(peers[label][0]) and m.group("label") == label
    assert int(m.group("cells")) == peers[label][1]
    # the verdict is what the errors say; what the README claims in any case: below the
    # library default and the previous auto table
    below_all = all(worst < v for v, _, _ in peers.values())
    assert m.group("verdict") == ("below" if below_all else "NOT below")
    # each peer on the cells it runs (a flow-only scheduler against our flow cells)
    own = study.peer_ratios(held)
    beaten = [k for k, got in own.items() if max(ours[c] for c in got) < max(got.values())]
    assert int(m.group("own")) == len(beaten) and int(m.group("configs")) == len(own)
    assert worst < float(m.group("default")) and worst < float(m.group("previous"))
    for method, key in (("library default dpmpp_2m", "default"), ("previous auto", "previous")):
        got = [v[method] for c, v in study.ratios.items() if c[0] in held]
        assert len(got) == 32 * count and m.group(key) == _fmt(max(got))


@pytest.mark.parametrize("split", ["held_out", "fresh"])
def test_the_usable_cells_line_is_what_the_recorded_errors_say(
    study: Study, markdown: str, split: str
) -> None:
    word = split.replace("_", "-")
    m = re.search(
        rf"USABLE: {word} worst ratio over usable cells (?P<ours>[0-9.e+]+) \((?P<cell>[^)]*)\), "
        r"(?P<verdict>below|NOT below) every peer configuration's worst over its usable cells "
        r"\(the smallest: (?P<peer>[0-9.e+]+), (?P<label>[^,]+), over (?P<cells>\d+) cells\)",
        markdown,
    )
    assert m is not None, f"benchmarks/policy.md lost its {word} USABLE line"
    chosen = re.search(r"### Chosen: (.+), per left-out problem", markdown)
    assert chosen is not None
    rule = rule_named(chosen.group(1))
    table = fit(
        study.ratios,
        study.family,
        study.problems("selection"),
        rule.granularity,
        study.candidates,
        rule.power,
    )
    problems = study.problems(split)
    usable = usable_cells(study, problems)
    # a cell is usable where the best peer ends within the data's spread, and only there
    stds = {(r.problem, r.guidance, r.nfe): (r.best_peer, r.data_std) for r in study.peers}
    assert all(stds[c][0] < stds[c][1] for c in usable)
    left = [c for c, (best, std) in stds.items() if c[0] in problems and c not in usable]
    assert all(best >= std for best, std in (stds[c] for c in left))
    ours = {
        c: v
        for c, v in policy_ratios(table, study.ratios, study.family, problems).items()
        if c in usable
    }
    assert m.group("ours") == _fmt(max(ours.values()))
    peers = {
        k: {c: v for c, v in got.items() if c in usable}
        for k, got in study.peer_ratios(problems).items()
    }
    worsts = {k: max(got.values()) for k, got in peers.items() if got}
    label = min(worsts, key=lambda k: worsts[k])
    assert (m.group("peer"), m.group("label")) == (_fmt(worsts[label]), label)
    assert int(m.group("cells")) == len(peers[label])
    below = all(max(ours.values()) < v for v in worsts.values())
    assert m.group("verdict") == ("below" if below else "NOT below")


def test_auto_ships_the_table_the_rule_picks_from_the_record(study: Study, markdown: str) -> None:
    chosen = re.search(r"### Chosen: (.+), per left-out problem", markdown)
    assert chosen is not None
    rule = rule_named(chosen.group(1))
    sel = study.problems("selection")
    table = fit(study.ratios, study.family, sel, rule.granularity, study.candidates, rule.power)
    for (family, w, nfe), method in sorted(table.items()):
        schedule = make_schedule_named(SCHEDULE[family])  # type: ignore[arg-type]
        assert recipe_label(recommend(nfe, w, schedule)) == method, (family, w, nfe)
    assert {f for f, _, _ in table} == set(FAMILIES)


def test_the_readme_quotes_the_record(markdown: str) -> None:
    readme = (ROOT / "README.md").read_text()
    quoted = readme[readme.index("<!-- policy:start -->") : readme.index("<!-- policy:end -->")]
    held = CLAIM.search(markdown)
    fresh = claim_pattern("fresh").search(markdown)
    assert held is not None and fresh is not None
    row = f'| `solver="auto"` (this table) | {held.group("ours")} | {fresh.group("ours")} |'
    assert row in quoted
    for key in ("default", "previous"):
        assert f"| {held.group(key)} | {fresh.group(key)} |" in quoted
    assert f"| {held.group('peer')} | {fresh.group('peer')} |" in quoted
    # the stop-20 table: on the held-out half, and on the last fresh round
    old_held = re.search(
        r"The stop-20 table on the held-out half: worst ratio ([0-9.e+]+)\.", markdown
    )
    rounds = re.findall(
        r"^\| (\d+) \| \d+ \| [^|]+ \| ([0-9.e+]+) \| ([0-9.e+]+) \|", markdown, re.M
    )
    assert old_held is not None and rounds and rounds[-1][1] == fresh.group("ours")
    assert f"| the stop-20 table | {old_held.group(1)} | {rounds[-1][2]} |" in quoted
    assert f"at **{rounds[0][2]}**" in readme  # the first round's score of the stop-20 table


def test_the_recorded_rule_is_the_one_leave_one_out_picks(study: Study, markdown: str) -> None:
    chosen = re.search(r"### Chosen: (.+), per left-out problem", markdown)
    assert chosen is not None
    rule, _ = choose_rule(study.ratios, study.family, study.problems("selection"), study.candidates)
    assert rule.name == chosen.group(1)


def test_the_recorded_splits_are_the_suites(study: Study) -> None:
    from dpmsolver.bench.suite import FRESH_ROUNDS, get_problem

    assert {p: get_problem(p).split for p in study.split} == study.split
    assert len(study.split) == 92
    # a finished fresh round is part of the selection half
    assert all(study.split[p] == "selection" for r in FRESH_ROUNDS for p in r)


def test_the_whole_suite_comparison_is_what_the_recorded_errors_say(
    study: Study, markdown: str
) -> None:
    """Each peer configuration's worst over every problem it runs, against the default's
    worst on the problems it never saw and, in sample, on those it was fitted on."""
    m = re.search(
        r"Over all (\d+) problems the smallest worst of the (\d+) peer configurations is "
        r"([0-9.e+]+) \((.+?), over (\d+) cells\)\. Ours: ([0-9.e+]+) on the held-out and "
        r"fresh problems, which the table never saw; ([0-9.e+]+) on the selection problems.*?"
        r"Our blind worst is below the whole-suite worst of (\d+) of (\d+) configurations",
        markdown,
    )
    assert m is not None, "benchmarks/policy.md lost its whole-suite comparison"
    chosen = re.search(r"### Chosen: (.+), per left-out problem", markdown)
    assert chosen is not None
    rule = rule_named(chosen.group(1))
    splits = [study.problems(s) for s in ("selection", "held_out", "fresh")]
    table = fit(
        study.ratios, study.family, splits[0], rule.granularity, study.candidates, rule.power
    )
    everything = [p for ps in splits for p in ps]
    suite = study.peer_worst(everything)
    best = min(suite, key=lambda k: suite[k][0])
    assert int(m.group(1)) == len(everything) == 92 and int(m.group(2)) == len(suite)
    assert m.group(3) == _fmt(suite[best][0]) and m.group(4) == best
    assert int(m.group(5)) == suite[best][1]
    blind = max(
        max(policy_ratios(table, study.ratios, study.family, ps).values()) for ps in splits[1:]
    )
    fitted = max(policy_ratios(table, study.ratios, study.family, splits[0]).values())
    assert m.group(6) == _fmt(blind) and m.group(7) == _fmt(fitted)
    assert int(m.group(8)) == sum(blind < v for v, _, _ in suite.values())
    # the flow-only configuration the CLAIM lines name blows up on the selection problems
    section = markdown[markdown.index("## The peer configurations the default does not beat") :]
    row = re.search(r"^\| diffusers UniPC bh2 flow \| .* \| ([0-9.e+]+) \|$", section, re.M)
    assert row is not None and float(row.group(1)) == float(
        _fmt(suite["diffusers UniPC bh2 flow"][0])
    )
