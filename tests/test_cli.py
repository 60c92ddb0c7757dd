"""Every command end to end on the built-in model with small sizes, and its error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dpmsolver.cli import main
from dpmsolver.images import encode_png


def run_cli(*args: str) -> int:
    return main(list(args))


def test_sample_writes_a_grid_and_npz_of_the_requested_classes(tmp_path: Path) -> None:
    png, npz = tmp_path / "g.png", tmp_path / "s.npz"
    assert (
        run_cli(
            "sample",
            "--nfe",
            "5",
            "--per-class",
            "1",
            "--out",
            str(png),
            "--npz",
            str(npz),
            "--no-progress",
            "--device",
            "cpu",
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = np.load(npz)
    assert data["samples"].shape == (10, 1, 8, 8) and np.isfinite(data["samples"]).all()
    assert data["labels"].tolist() == list(range(10))
    # the shipped classifier recognises most of them even at 5 NFE
    from dpmsolver.bench.quality import classify
    from dpmsolver.digits import load_classifier

    pred, _ = classify(load_classifier(), torch.from_numpy(data["samples"]))
    assert (pred == data["labels"]).mean() >= 0.7


def test_sample_is_reproducible_and_batch_independent(tmp_path: Path) -> None:
    """Same seed, same samples; another batch size changes only the network's float
    rounding (sample i's noise depends on (seed, i) alone). Bit-identical output across
    batch sizes is `dpmsolver generate`'s job (fixed micro-batches)."""
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    common = [
        "sample",
        "--nfe",
        "4",
        "--labels",
        "3,1,4,1,5",
        "--out",
        "",
        "--no-progress",
        "--device",
        "cpu",
    ]
    run_cli(*common, "--npz", str(a), "--batch", "5")
    run_cli(*common, "--npz", str(b), "--batch", "2")
    run_cli(*common, "--npz", str(c), "--batch", "5")
    assert np.array_equal(np.load(a)["samples"], np.load(c)["samples"])
    assert np.allclose(np.load(a)["samples"], np.load(b)["samples"], atol=1e-4)


GENERATE = ["generate", "--num", "4", "--out", "{tmp}/run"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sample", "--solver", "dpmpp_9m"], "--solver: 'dpmpp_9m' is not a solver"),
        (["sample", "--nfe", "-2"], "--nfe must be >= 1"),
        (["sample", "--nfe", "ten"], "--nfe must be an integer"),
        (["sample", "--labels", "3,12"], "--labels values must be in [0, 9]"),
        (["sample", "--guidance", "nan"], "--guidance must be a finite number"),
        (["sample", "--model", "/nonexistent/model"], "no such directory"),
        (["sample", "--device", "tpu"], "--device 'tpu' is not a device"),
        (["sample", "--out", ""], "nothing to write"),
        (["sample", "--bogus"], "unrecognized arguments: --bogus"),
        # budgets
        (
            ["sample", "--solver", "heun", "--nfe", "10"],
            "--nfe 10: heun cannot spend exactly 10 network evaluations per sample (its steps "
            "cost a fixed number each); budgets nearby that it can spend: 9 or 11; or give "
            "--steps N",
        ),
        (["sample", "--solver", "pndm", "--nfe", "7"], "nearby that it can spend: 5 or 9"),
        (["sample", "--nfe", "5", "--steps", "3"], "argument --steps: not allowed with"),
        (["sample", "--steps", "0"], "--steps must be >= 1"),
        (["sample", "--steps", "4"], "--steps: --solver auto chooses its steps"),
        (["sample", "--solver", "heun", "--rtol", "0.1"], "--rtol applies to adaptive solvers"),
        (["sample", "--atol", "0.1"], "--atol applies to adaptive solvers only"),
        (["sample", "--solver", "dpmpp_adaptive", "--rtol", "0"], "--rtol must be a finite"),
        (["sample", "--solver", "dpm_adaptive", "--nfe", "5"], "--nfe: --solver dpm_adaptive is"),
        (["sample", "--solver", "dpmpp_adaptive", "--steps", "5"], "--steps: --solver dpmpp_ad"),
        (["sample", "--solver", "dpmpp_adaptive", "--grid", "karras"], "--grid: --solver dpmpp"),
        (["sample", "--grid", "cosine"], "--grid: 'cosine' is not a grid; choose one of: logsnr,"),
        (["sample", "--threads", "-1"], "--threads must be >= 0, got -1"),
        (["sample", "--null-label", "10"], "--null-label applies to a diffusers model directory"),
        (["compare", "--nfe", "0"], "--nfe values must be >= 1"),
        (["compare", "--solvers", "ddim,bogus"], "--solvers: 'bogus' is not a solver"),
        (["compare", "--solvers", "ddim,dpmpp_adaptive"], "--solvers: dpmpp_adaptive is adapt"),
        (["compare", "--nfe", "5", "--steps", "3"], "argument --steps: not allowed with"),
        (["compare", "--steps", "2,x"], "--steps must be comma-separated integers"),
        ([*GENERATE, "--solver", "dpmpp_adaptive"], "--solver dpmpp_adaptive is adaptive"),
        ([*GENERATE, "--rtol", "0.1"], "unrecognized arguments: --rtol"),
        ([*GENERATE, "--solver", "dpmpp_2s", "--nfe", "4"], "--nfe 4: dpmpp_2s cannot spend"),
        ([*GENERATE, "--nfe", "4", "--steps", "2"], "argument --steps: not allowed with"),
        ([*GENERATE, "--grid", "linear"], "--grid: 'linear' is not a grid"),
        ([*GENERATE, "--guidance", "-1"], "--guidance must be a finite number >= 0"),
        (["bench", "--out", "{tmp}/b", "--only", "speed"], "--only: unknown section 'speed'"),
        (["solvers", "--threads", "x"], "--threads must be an integer"),
    ],
)
def test_bad_options_exit_2_with_one_line_naming_the_option(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Before any work (nothing is written; the output directories stay absent)."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args and args[0] in ("sample", "compare"):
        args = [*args, "--out", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as e:
        run_cli(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("dpmsolver: error: ") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_fails_before_sampling_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions do not bind
            target = tmp_path / "missing_dir" / "x.png"
            expected = "does not exist"
        else:
            target = locked / "x.png"
            expected = "not writable"
        with pytest.raises(SystemExit) as e:
            run_cli("sample", "--out", str(target), "--no-progress")
        assert e.value.code == 2 and expected in capsys.readouterr().err
        assert not target.exists()
    finally:
        locked.chmod(0o700)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can create files in: one without write permission, or, for
    root (whom permissions do not bind), /sys where the kernel refuses new files."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not _can_create_in(locked):
            yield locked
        elif not _can_create_in(Path("/sys")):
            yield Path("/sys")
        else:
            pytest.skip("no read-only directory to test with")
    finally:
        locked.chmod(0o700)


def _can_create_in(directory: Path) -> bool:
    try:
        (directory / "probe").touch()
    except OSError:
        return False
    (directory / "probe").unlink()
    return True


COUNTING = ["--model", "tests.generate_models:counting_model", "--device", "cpu"]
README = "# title\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\nrest\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sample", "--out", "{tmp}/missing/x.png"], "--out: directory '{tmp}/missing' does not"),
        (["sample", "--out", "{ro}/x.png"], "--out: directory '{ro}' is not writable"),
        (["sample", "--out", "{tmp}/file/x.png"], "--out: '{tmp}/file' is not a directory"),
        (["sample", "--out", "{tmp}"], "--out: '{tmp}' is a directory"),
        (["sample", "--out", "", "--npz", "{ro}/x.npz"], "--npz: directory '{ro}' is not writ"),
        (["sample", "--npz", "{tmp}/missing/x.npz"], "--npz: directory '{tmp}/missing' does"),
        (["compare", "--out", "{ro}/c.png"], "--out: directory '{ro}' is not writable"),
        (["generate", "--num", "4", "--out", "{ro}/run"], "--out: cannot create '{ro}/run': '{ro}"),
        (["generate", "--num", "4", "--out", "{ro}"], "--out: directory '{ro}' is not writable"),
        (["generate", "--num", "4", "--out", "{tmp}/file/r"], "'{tmp}/file' is not a directory"),
        (["generate", "--num", "4", "--out", "{tmp}/file"], "'{tmp}/file' exists and is not a d"),
    ],
)
def test_unwritable_outputs_fail_before_any_work(
    args: list[str],
    message: str,
    tmp_path: Path,
    read_only_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A missing, read-only or wrong-kind output location: one line naming the option, exit
    status 2, before the model is even loaded (so no network call either)."""
    from tests.generate_models import COUNTS

    (tmp_path / "file").write_text("not a directory")
    before = sorted(tmp_path.rglob("*"))
    fill = {"{tmp}": str(tmp_path), "{ro}": str(read_only_dir)}
    for key, value in fill.items():
        args = [a.replace(key, value) for a in args]
        message = message.replace(key, value)
    COUNTS.update(loads=0, calls=0)
    with pytest.raises(SystemExit) as e:
        run_cli(*args, *COUNTING, "--no-progress" if args[0] != "compare" else "--seed=0")
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert COUNTS == {"loads": 0, "calls": 0}
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("where", "readme", "message"),
    [
        ("{ro}/out", None, "--out: cannot create '{ro}/out': '{ro}' is not writable"),
        ("{tmp}/file", None, "--out: '{tmp}/file' exists and is not a directory"),
        ("{tmp}/file/out", None, "--out: cannot create '{tmp}/file/out': '{tmp}/file' is not a d"),
        ("{tmp}/out", "{tmp}/missing.md", "--readme: '{tmp}/missing.md' is not a file"),
        ("{tmp}/out", "{tmp}/file", "--readme: '{tmp}/file' lacks the <!-- bench:start --> ..."),
        ("{tmp}/out", "{ro}/README.md", "--readme: directory '{ro}' is not writable"),
    ],
)
def test_bench_checks_out_and_readme_before_any_work(
    where: str,
    readme: str | None,
    message: str,
    tmp_path: Path,
    read_only_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dpmsolver.bench.run as bench_run

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("a benchmark started")

    monkeypatch.setattr(bench_run, "mixture_problem", no_work)
    (tmp_path / "file").write_text("no markers here\n")
    fill = {"{tmp}": str(tmp_path), "{ro}": str(read_only_dir)}
    for key, value in fill.items():
        where = where.replace(key, value)
        readme = readme.replace(key, value) if readme else None
        message = message.replace(key, value)
    if readme and Path(readme).parent == read_only_dir:
        if read_only_dir.name == "locked":
            read_only_dir.chmod(0o700)
            Path(readme).write_text(README)
            read_only_dir.chmod(0o500)
        else:  # /sys: a README cannot be put there; make a directory that refuses files
            import dpmsolver.io

            ro = tmp_path / "ro"
            ro.mkdir()
            (ro / "README.md").write_text(README)
            probe = dpmsolver.io._can_create_in
            monkeypatch.setattr(dpmsolver.io, "_can_create_in", lambda d: d != ro and probe(d))
            readme, message = str(ro / "README.md"), message.replace(str(read_only_dir), str(ro))
    args = ["bench", "--quick", "--only", "mixture", "--out", where]
    with pytest.raises(SystemExit) as e:
        run_cli(*args, *(["--readme", readme] if readme else []))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_bench_creates_out_with_its_parents_and_fills_the_readme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dpmsolver.bench.run as bench_run

    def overhead(sizes: object, out: Path, device: str) -> str:  # the section, not its work
        (out / "overhead.md").write_text("table\n")
        return "table\n"

    monkeypatch.setattr(bench_run, "overhead_section", overhead)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    out = tmp_path / "new" / "deeper" / "bench"
    assert run_cli("bench", "--quick", "--only", "overhead", "--out", str(out)) == 0
    assert (out / "overhead.md").is_file()
    # --summarize needs the directory of an earlier run; then it rewrites only the part
    # between the markers.
    assert run_cli("bench", "--summarize", "--out", str(out), "--readme", str(readme)) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\n<!-- bench:start -->\n") and text.endswith(
        "<!-- bench:end -->\n\nrest\n"
    )
    assert "old" not in text


def test_failed_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash while writing leaves neither the target nor a temporary file behind."""
    import dpmsolver.images as images

    def broken(image: np.ndarray) -> bytes:
        raise RuntimeError("disk full")

    monkeypatch.setattr(images, "encode_png", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_cli(
            "sample",
            "--nfe",
            "2",
            "--per-class",
            "1",
            "--out",
            str(tmp_path / "g.png"),
            "--no-progress",
        )
    assert list(tmp_path.iterdir()) == []
    assert encode_png(np.zeros((2, 2), np.uint8))[:4] == b"\x89PNG"


def test_compare_draws_a_labelled_figure(tmp_path: Path) -> None:
    out = tmp_path / "c.png"
    assert (
        run_cli(
            "compare",
            "--solvers",
            "ddim,dpmpp_2m",
            "--nfe",
            "2,4",
            "--out",
            str(out),
            "--device",
            "cpu",
        )
        == 0
    )
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 2000


def test_solvers_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    import dpmsolver as dp

    assert run_cli("solvers", "--verbose") == 0
    out = capsys.readouterr().out
    for name in dp.REGISTRY:
        assert name in out
    assert "aliases:" in out and "dpmpp_2m = dpmpp_multistep order=2" in out


def test_bench_quick_writes_every_output(tmp_path: Path) -> None:
    assert run_cli("bench", "--quick", "--out", str(tmp_path)) == 0
    names = {p.name for p in tmp_path.iterdir()}
    for stem in ("accuracy_mixture", "accuracy_digits"):
        assert {f"{stem}.csv", f"{stem}.md", f"{stem}.png"} <= names
    assert {
        "quality_digits.csv",
        "quality_digits.md",
        "thresholding.csv",
        "thresholding.md",
        "overhead.md",
        "tails.csv",
        "tails.md",
        "ceiling.csv",
        "ceiling.md",
        "steps.csv",
        "steps.md",
    } <= names
    assert "auto" in (tmp_path / "accuracy_mixture.csv").read_text()
    import csv

    with open(tmp_path / "ceiling.csv", newline="") as f:
        ceiling = list(csv.DictReader(f))
    assert ceiling and all(
        float(r["ceiling"]) <= float(r["auto"]) for r in ceiling
    )  # auto's recipe is a candidate
    with open(tmp_path / "steps.csv", newline="") as f:
        steps = list(csv.DictReader(f))
    assert steps and all(float(r["fit_end"]) <= float(r["fit_start"]) for r in steps)
    overhead = (tmp_path / "overhead.md").read_text()
    assert "| (1, 4, 16, 16) |" in overhead and "n/a" not in overhead  # diffusers is a test extra


def test_bench_rejects_unknown_sections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        run_cli("bench", "--quick", "--out", str(tmp_path), "--only", "speed")
    assert e.value.code == 2 and "unknown section 'speed'" in capsys.readouterr().err


def test_bench_rejects_a_bad_device_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        run_cli("bench", "--quick", "--out", str(tmp_path), "--device", "gpu7")
    assert e.value.code == 2 and "--device 'gpu7' is not a device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_every_command_has_help() -> None:
    for cmd in ("sample", "compare", "solvers", "bench", "generate"):
        r = subprocess.run(
            [sys.executable, "-m", "dpmsolver.cli", cmd, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_sample_with_a_local_diffusers_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    sched = diffusers.DDPMScheduler(beta_schedule="linear", prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "model")
    assert (
        json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())[
            "prediction_type"
        ]
        == "v_prediction"
    )
    out = tmp_path / "s.npz"
    assert (
        run_cli(
            "sample",
            "--model",
            str(tmp_path / "model"),
            "--num",
            "3",
            "--nfe",
            "3",
            "--out",
            "",
            "--npz",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        )
        == 0
    )
    assert np.load(out)["samples"].shape == (3, 3, 8, 8)
    assert "guidance 1:" in capsys.readouterr().out  # unconditional: no guidance by default
    for args, message in (
        (["--guidance", "3"], "--guidance 3: {dir} is not class-conditional"),
        (["--null-label", "0"], "--null-label: the model in '{dir}' is not class-conditional"),
    ):
        with pytest.raises(SystemExit) as e:
            run_cli("sample", "--model", str(tmp_path / "model"), "--out", str(out), *args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message.format(dir=tmp_path / "model") in err, err


# ----------------------------------------------------------------------------------------
# interrupts, threads, help
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["sample", "compare", "bench"])
def test_ctrl_c_exits_130_with_one_line(
    command: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dpmsolver.bench.run as bench_run
    import dpmsolver.cli.sample as cli_sample

    def ctrl_c(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_sample, "sample_batches", ctrl_c)
    monkeypatch.setattr(bench_run, "mixture_problem", ctrl_c)
    args = {
        "sample": ["sample", "--out", str(tmp_path / "s.png"), *COUNTING],
        "compare": ["compare", "--out", str(tmp_path / "c.png"), *COUNTING],
        "bench": ["bench", "--quick", "--only", "mixture", "--out", str(tmp_path / "b")],
    }[command]
    assert run_cli(*args) == 130
    captured = capsys.readouterr()
    assert captured.err.startswith("dpmsolver: interrupted") and captured.err.count("\n") == 1
    assert captured.out == ""
    assert [p.name for p in tmp_path.iterdir()] == (["b"] if command == "bench" else [])


@pytest.mark.parametrize(
    ("args", "threads"),
    [
        (["solvers", "--threads", "2"], 2),
        (["--threads", "3", "solvers"], 3),
        (["--threads", "3", "solvers", "--threads", "2"], 2),  # the later one wins
        (["solvers"], 1),
    ],
)
def test_threads_before_or_after_the_command(args: list[str], threads: int) -> None:
    try:
        torch.set_num_threads(4)
        assert run_cli(*args) == 0
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("args", "threads"),
    [
        (["tune"], 0),  # tune evaluates the whole pilot at once: every core
        (["tune", "--threads", "1"], 1),
        (["--threads", "1", "tune"], 1),
        (["sample"], 1),
        (["generate", "--out", "d", "--num", "4"], 1),
    ],
)
def test_thread_default_per_command(args: list[str], threads: int) -> None:
    from dpmsolver.cli import build_parser
    from dpmsolver.cli.options import thread_count

    assert thread_count(build_parser().parse_args(args)) == threads


def test_sample_help_lists_the_solvers_and_grids(capsys: pytest.CaptureFixture[str]) -> None:
    from dpmsolver.solvers import ALIASES, REGISTRY
    from dpmsolver.timegrid import GRID_KINDS

    with pytest.raises(SystemExit) as e:
        run_cli("sample", "--help")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the wrapping
    for name in [*REGISTRY, *ALIASES, *GRID_KINDS, "auto", "--steps", "--rtol", "--null-label"]:
        assert name in out, name
    assert "adaptive (--rtol/--atol, no --nfe/--steps): dpm_adaptive, dpmpp_adaptive" in out


# ----------------------------------------------------------------------------------------
# budgets: --steps, defaults, adaptive solvers
# ----------------------------------------------------------------------------------------


def _sample_npz(tmp_path: Path, name: str, *args: str) -> tuple[np.ndarray, str]:
    out = tmp_path / f"{name}.npz"
    cmd = ["sample", "--labels", "0,3,7", "--out", "", "--npz", str(out), "--no-progress"]
    assert run_cli(*cmd, "--model", "dpmsolver.models:exact_model", "--device", "cpu", *args) == 0
    return np.load(out)["samples"], name


def test_steps_and_the_default_budget_of_a_singlestep_solver(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """heun's steps cost 2 evaluations (the last one 1): 5 steps spend 9. Without a budget
    it takes 9, the largest below the default 10 that it can spend, and says so."""
    by_steps, _ = _sample_npz(tmp_path, "steps", "--solver", "heun", "--steps", "5")
    assert "9 network evaluations per sample on 5 steps" in capsys.readouterr().out
    by_nfe, _ = _sample_npz(tmp_path, "nfe", "--solver", "heun", "--nfe", "9")
    default, _ = _sample_npz(tmp_path, "default", "--solver", "heun")
    assert "heun cannot spend the default 10 evaluations exactly; it spends 9" in (
        capsys.readouterr().out
    )
    assert np.array_equal(by_steps, by_nfe) and np.array_equal(by_steps, default)
    # Every registered solver and alias runs at the defaults.
    from dpmsolver.cli.options import check_budget_options, is_adaptive, resolve_budget
    from dpmsolver.models import exact_model
    from dpmsolver.solvers import ALIASES, REGISTRY

    model = exact_model()
    for name in [*REGISTRY, *ALIASES]:
        if is_adaptive(name):
            continue
        args = run_args(solver=name)
        check_budget_options(args)
        budget = resolve_budget(model, args)
        assert budget.evaluations == budget.nfe and 8 <= budget.nfe <= 10, name


def run_args(**kw: object) -> Any:
    from argparse import Namespace

    return Namespace(**{"nfe": None, "steps": None, "grid": None, "rtol": None, **kw})


def test_adaptive_solvers_take_tolerances_and_no_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spent = {}
    for rtol in ("0.3", "0.01"):
        x, _ = _sample_npz(tmp_path, rtol, "--solver", "dpmpp_adaptive", "--rtol", rtol)
        out = capsys.readouterr().out
        assert f"adaptive steps (rtol {float(rtol):g})" in out and np.isfinite(x).all()
        spent[rtol] = int(out.split(" batched network calls")[0].rsplit(" ", 1)[1])
    assert spent["0.3"] < spent["0.01"]  # the tolerance reaches the solver
    _sample_npz(tmp_path, "atol", "--solver", "dpm_adaptive", "--atol", "0.05")
    assert "adaptive steps (atol 0.05)" in capsys.readouterr().out


def test_compare_by_steps_marks_what_cannot_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c.png"
    args = ["compare", "--solvers", "auto,heun", "--steps", "2,3", "--out", str(out)]
    assert run_cli(*args, "--model", "dpmsolver.models:exact_model", "--device", "cpu") == 0
    err = capsys.readouterr().err
    assert "auto at 2 steps: n/a: auto chooses its steps for an evaluation budget" in err
    assert "heun" not in err and out.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------
# a class-conditional model directory and its null label
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conditional_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class-conditional diffusers UNet2DModel: 11 class embeddings, the last one
    meaning 'no class' (as for the built-in model)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=11,
    )
    with torch.no_grad():  # an untrained embedding table is all but ignored; make it matter
        unet.class_embedding.weight.mul_(50)
    path = tmp_path_factory.mktemp("conditional") / "model"
    sched = diffusers.DDPMScheduler(beta_schedule="linear")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    return path


def test_model_dir_guidance_with_a_null_label(
    conditional_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dpmsolver.models import load_model

    model = load_model(str(conditional_dir), torch.device("cpu"), null_label=10)
    assert (model.num_classes, model.null_label) == (10, 10)
    labels = torch.tensor([2, 5])
    assert model.conditioning(labels, 2.0)["uncond"]["y"].tolist() == [10, 10]

    common = ["sample", "--model", str(conditional_dir), "--labels", "0,4,9", "--nfe", "3"]
    common += ["--out", "", "--no-progress", "--device", "cpu"]
    guided, plain = tmp_path / "guided.npz", tmp_path / "plain.npz"
    assert run_cli(*common, "--null-label", "10", "--npz", str(guided)) == 0
    assert "guidance 3:" in capsys.readouterr().out  # the default with a null label
    assert run_cli(*common, "--npz", str(plain)) == 0  # without one: no guidance by default
    assert "guidance 1:" in capsys.readouterr().out
    g, p = np.load(guided), np.load(plain)
    assert g["labels"].tolist() == [0, 4, 9] and np.isfinite(g["samples"]).all()
    assert not np.allclose(g["samples"], p["samples"], atol=1e-3)

    # generate records the null label in the run's configuration
    out = tmp_path / "run"
    gen = ["generate", "--num", "4", "--out", str(out), "--model", str(conditional_dir)]
    assert run_cli(*gen, "--null-label", "10", "--nfe", "3", "--no-progress") == 0
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["model"]["null_label"] == 10 and config["guidance"] == 3.0
    assert config["labels"]["classes"] == list(range(10))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--guidance", "2"],
            "--guidance 2: {dir} has no null label (the label meaning 'no class') for "
            "classifier-free guidance; give --null-label N for a model directory trained with "
            "one, or --guidance 1",
        ),
        (
            ["--null-label", "3"],
            "--null-label 3: the null label must be the model's last class embedding, 10 "
            "(classes 0..9)",
        ),
        (["--null-label", "-1"], "--null-label must be >= 0"),
        (["--labels", "10", "--null-label", "10"], "--labels values must be in [0, 9]"),
    ],
)
def test_model_dir_guidance_errors(
    conditional_dir: Path,
    args: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as e:
        run_cli("sample", "--model", str(conditional_dir), "--out", str(tmp_path / "x.png"), *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message.format(dir=conditional_dir) in err, err
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_non_finite_samples_exit_1_with_one_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.png"
    args = ["sample", "--model", "tests.generate_models:nan_model", "--labels", "3,7", "--nfe"]
    assert run_cli(*args, "4", "--out", str(out), "--no-progress", "--device", "cpu") == 1
    err = capsys.readouterr().err
    assert err.startswith("dpmsolver: error: non-finite values (NaN/Inf) appeared at step")
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
