"""Every command end to end on the built-in model with small sizes, and its error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
        (["compare", "--nfe", "0"], "--nfe values must be >= 1"),
        (["compare", "--solvers", "ddim,bogus"], "--solvers: 'bogus' is not a solver"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if "--out" not in args and args[0] in ("sample", "compare"):
        args = [*args, "--out", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as e:
        run_cli(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


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


def test_sample_with_a_local_diffusers_model(tmp_path: Path) -> None:
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
            "--guidance",
            "1",
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
