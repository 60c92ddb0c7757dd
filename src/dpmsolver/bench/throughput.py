"""Throughput of ``dpmsolver generate``: samples per second, 1 process vs 2 under torchrun.

Each configuration runs the real command in a fresh directory and is timed from launch to
exit (interpreter start, model load and checksums included: what a user waits for).
The same command is then run again on the finished directory, which only starts up and
verifies every shard; that fixed cost is reported separately, and "generation" rates
exclude it. The shards of every configuration are compared byte for byte: process count
and threads must not change the output.

Configurations: one process with torch's default intra-op threads, one process with one
thread, and ``torchrun --nproc_per_node 2`` (torchrun gives each worker one thread).

Run ``python -m dpmsolver.bench.throughput --out benchmarks/generate.md`` (``--model
builtin`` needs the built-in digits weights; the default ``auto`` falls back to the exact
mixture model, ``dpmsolver.models:exact_model``, when they are missing).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import __version__
from .records import write_text

__all__ = ["main", "measure"]

EXACT = "dpmsolver.models:exact_model"


def _builtin_available() -> bool:
    try:
        from ..digits import load
    except ImportError:
        return False
    return bool((load.WEIGHTS_DIR / load.DENOISER_FILE).is_file())


def _env(threads: int | None) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _timed(cmd: Sequence[str], threads: int | None) -> float:
    t0 = time.perf_counter()
    run = subprocess.run(list(cmd), env=_env(threads), capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr}")
    return elapsed


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.npz"))}


def measure(
    model: str,
    num: int,
    *,
    nfe: int,
    guidance: float,
    batch: int,
    micro_batch: int,
    shard_size: int,
) -> list[dict[str, object]]:
    """Time the three configurations; one dict per configuration."""
    args = [
        "generate",
        "--num-samples",
        str(num),
        "--model",
        model,
        "--nfe",
        str(nfe),
        "--guidance",
        str(guidance),
        "--batch",
        str(batch),
        "--micro-batch",
        str(micro_batch),
        "--shard-size",
        str(shard_size),
        "--device",
        "cpu",
        "--no-progress",
    ]
    single = [sys.executable, "-m", "dpmsolver.cli", *args]
    multi = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dpmsolver.cli",
        *args,
    ]
    configs = [
        ("1 process, default threads", single, None, torch.get_num_threads()),
        ("1 process, 1 thread", single, 1, 1),
        ("2 processes (torchrun), 1 thread each", multi, None, 1),
    ]
    rows: list[dict[str, object]] = []
    reference: dict[str, bytes] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cmd, threads, shown) in enumerate(configs):
            out = Path(tmp) / f"run{i}"
            total = _timed([*cmd, "--out", str(out)], threads)
            fixed = _timed([*cmd, "--out", str(out)], threads)  # all shards done: startup + checks
            shards = _shards(out)
            reference = reference if reference is not None else shards
            rows.append(
                {
                    "config": name,
                    "threads": shown,
                    "wall_s": total,
                    "fixed_s": fixed,
                    "rate": num / total,
                    "gen_rate": num / max(total - fixed, 1e-9),
                    "identical": shards == reference,
                }
            )
            print(f"{name}: {total:.1f} s, {num / total:.1f} samples/s", file=sys.stderr)
    return rows


def _markdown(rows: list[dict[str, object]], model: str, settings: dict[str, object]) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        loads = os.getloadavg()
        load = " / ".join(f"{v:.2f}" for v in loads)
        # The runs themselves keep a core or two busy; more than that is someone else's work.
        if loads[0] > (os.cpu_count() or 1) + 0.5:
            load += " (the cores were shared with other work)"
    except OSError:
        load = "n/a"
    lines = [
        "# `dpmsolver generate` throughput",
        "",
        f"Model `{model}`; " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, dpmsolver "
        f"{__version__}, {datetime.date.today().isoformat()}; load average before the runs "
        f"{load}.",
        "",
        "Wall time from launch to exit; *fixed* is a re-run on the finished directory "
        "(interpreter and torch start-up, model load, checksum of every shard), and the "
        "generation rate excludes it. *Identical*: shards byte-equal to the first row's.",
        "Regenerate: `python -m dpmsolver.bench.throughput --out benchmarks/generate.md`",
        "",
        "| configuration | threads/process | wall (s) | fixed (s) | samples/s | generation "
        "samples/s | identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['threads']} | {r['wall_s']:.1f} | {r['fixed_s']:.1f} | "
            f"{r['rate']:.1f} | {r['gen_rate']:.1f} | {'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument(
        "--model",
        default="auto",
        help="'auto' (default: builtin if its weights exist, else the exact model), 'builtin' or "
        "a --model spec",
    )
    p.add_argument("--num", type=int, default=2000, help="samples per run (default 2000)")
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--out", default=None, help="write the markdown table here (default: stdout)")
    args = p.parse_args(argv)
    model = args.model if args.model != "auto" else ("builtin" if _builtin_available() else EXACT)
    settings: dict[str, object] = {
        "samples": args.num,
        "NFE": args.nfe,
        "guidance": args.guidance,
        "solver": "auto",
        "batch": args.batch,
        "micro-batch": args.micro_batch,
        "shard size": args.shard_size,
    }
    rows = measure(
        model,
        args.num,
        nfe=args.nfe,
        guidance=args.guidance,
        batch=args.batch,
        micro_batch=args.micro_batch,
        shard_size=args.shard_size,
    )
    text = _markdown(rows, model, settings)
    if args.out:
        write_text(args.out, text)
    else:
        print(text)
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
