"""Large-scale generation: sharded, resumable, deterministic, multi-process.

``generate(model, num, out_dir, ...)`` (and ``dpmsolver generate``) writes samples
``0 .. num-1`` of a run into ``out_dir``:

- ``shard-000000.npz`` ... : shard k holds samples ``[k * shard_size, (k+1) * shard_size)``
  (the last one fewer). Arrays: ``samples`` (float32; float64 for ``dtype=float64`` runs),
  ``indices`` (int64, the global sample indices, ascending) and, for class-conditional
  models, ``labels`` (int64). Samples that went non-finite under ``on_nonfinite="skip"``
  are absent from all three. The zip is written with fixed timestamps, so equal samples
  give byte-equal files (and equal checksums).
- ``shard-000000.json`` ... : the shard's record (range, file, sha256, sample count,
  status, failed samples) and the hash of the run configuration; written after its
  ``.npz``, it is what marks the shard as done.
- ``manifest.json``: format, the run configuration (everything that determines the
  output), and every shard's record (status ``complete``, ``partial`` or ``pending``) with
  a summary. Written when a run starts and rewritten when it ends.

Every file is written atomically (temporary file, fsync, rename), so a crash leaves each
file either whole or absent. Re-running the same command resumes: a shard whose record
exists, matches the configuration and whose ``.npz`` has the recorded sha256 is kept;
every other shard (missing, half-written, truncated, corrupted) is generated again. A
re-run whose configuration differs is refused (:class:`ConfigMismatchError`, naming each
differing field). The batch size, the number of processes and the progress bar are not
part of the configuration: they do not change the output.

Determinism: sample i's initial noise and its stochastic-solver noise are drawn from
streams seeded by ``(seed, i)`` (:mod:`dpmsolver.noise`) and its label depends only on i.
Networks are not batch-invariant in general (measured: on CPU a row of the built-in
U-Net's output changes in the last bits with the number of rows in its call, for calls
below 16 rows), so the network is always
called on the same rows: each shard is cut into micro-batches of ``micro_batch`` samples
aligned at the shard's start, and every network call holds exactly one micro-batch
(both halves of it under classifier-free guidance). The solver arithmetic between calls
is elementwise per sample. Hence the output is bit-identical whatever the batch size,
number of processes or interruptions, for the same configuration (which includes the
micro-batch size, device type, dtype and torch version), on the same hardware and
libraries. Not covered: different CPU instruction sets or GPU models, nondeterministic
kernels (keep ``torch.backends.cudnn.benchmark`` off), and adaptive solvers, whose step
sizes depend on the whole batch (refused).

Multiple processes: run the same command under ``torchrun --nproc_per_node K -m
dpmsolver.cli generate ...``. The launcher's environment variables start a
``torch.distributed`` group (gloo: it only passes shard records; ``--device cuda`` means
each process's ``cuda:LOCAL_RANK`` modulo the GPUs, so that more processes than GPUs share
them); the shards still to do are dealt out in turn, each process
writes its own, and rank 0 writes the manifest. Processes agree after every round of
shards, so one failing process stops all of them.

Non-finite samples (``NaN``/``Inf`` anywhere along a sample's trajectory) are never
written as good. ``on_nonfinite="stop"`` (default) raises :class:`GenerationError` naming
the global sample indices and step; the shard being generated is not written.
``"skip"`` writes that shard's finite samples, marks the shard ``partial`` and records
each failed index with its first bad step in the shard record and the manifest. Failures
are a deterministic function of the configuration, so a resumed run keeps a partial
shard as it is (a retry would fail the same way) and the manifest keeps listing its
failed samples; resuming such a directory with ``"stop"`` raises, naming them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from . import __version__
from ._validate import check_choice, check_finite_float, check_int
from .analytic import MixtureNetwork
from .ems import EMS
from .io import atomic_write_bytes, atomic_write_text
from .loop import NonFiniteError
from .model import LoadedModel, evaluations, sample_indices
from .progress import Progress
from .recipe import POLICIES, Recipe, RecipeSource
from .schedules import NoiseSchedule
from .solvers import ALIASES, REGISTRY, AdaptiveSolver, get_solver
from .solvers.v3 import recommended_options

if TYPE_CHECKING:
    from .tune import Profile

__all__ = [
    "FORMAT",
    "ConfigMismatchError",
    "FailedSample",
    "GenerationError",
    "Manifest",
    "ShardRecord",
    "files_sha256",
    "generate",
    "model_fingerprint",
    "read_samples",
    "sha256_file",
]

FORMAT = "dpmsolver-generate/1"
MANIFEST = "manifest.json"
OnNonFinite = Literal["stop", "skip"]
Status = Literal["complete", "partial", "pending"]


class ConfigMismatchError(ValueError):
    """The output directory belongs to a run with a different configuration."""


class GenerationError(RuntimeError):
    """Generation stopped: non-finite samples under ``on_nonfinite="stop"``, or another
    process of the run failed."""


# ----------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailedSample:
    """A sample that went non-finite: its global index and the first step it did."""

    index: int
    step: int


@dataclass(frozen=True)
class ShardRecord:
    """One shard: samples ``[start, stop)`` in ``file``.

    Attributes:
        shard: shard number.
        start, stop: global index range.
        file: the ``.npz`` file name inside the output directory.
        status: ``complete`` (every sample), ``partial`` (some failed, see ``failed``) or
            ``pending`` (not generated yet).
        count: samples stored in the file.
        sha256: hex digest of the file.
        failed: samples left out because they went non-finite.
    """

    shard: int
    start: int
    stop: int
    file: str
    status: Status = "pending"
    count: int = 0
    sha256: str | None = None
    failed: tuple[FailedSample, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out: dict[str, Any] = {
            "shard": self.shard,
            "start": self.start,
            "stop": self.stop,
            "file": self.file,
            "status": self.status,
        }
        if self.status != "pending":
            out.update(
                count=self.count,
                sha256=self.sha256,
                failed=[{"index": f.index, "step": f.step} for f in self.failed],
            )
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ShardRecord:
        """Inverse of :meth:`to_json` (KeyError/TypeError/ValueError on malformed input)."""
        status = check_choice("status", d["status"], ("complete", "partial", "pending"))
        failed = tuple(FailedSample(int(f["index"]), int(f["step"])) for f in d.get("failed", ()))
        return cls(
            int(d["shard"]),
            int(d["start"]),
            int(d["stop"]),
            str(d["file"]),
            status,
            int(d.get("count", 0)),
            d.get("sha256"),
            failed,
        )


@dataclass
class Manifest:
    """What ``manifest.json`` holds: the run configuration and every shard's record."""

    config: dict[str, Any]
    shards: list[ShardRecord] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when no shard is pending (partial shards count as done)."""
        return all(s.status != "pending" for s in self.shards)

    @property
    def samples(self) -> int:
        """Samples written."""
        return sum(s.count for s in self.shards)

    @property
    def failed(self) -> list[FailedSample]:
        """Every sample skipped because it went non-finite."""
        return [f for s in self.shards for f in s.failed]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the content of ``manifest.json``)."""
        pending = [s.shard for s in self.shards if s.status == "pending"]
        return {
            "format": FORMAT,
            "config": self.config,
            "config_sha256": _config_hash(self.config),
            "summary": {
                "complete": self.complete,
                "samples": self.samples,
                "failed": len(self.failed),
                "shards": len(self.shards),
                "pending_shards": len(pending),
            },
            "shards": [s.to_json() for s in self.shards],
        }

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> Manifest:
        """Read ``out_dir/manifest.json``."""
        d = json.loads((Path(out_dir) / MANIFEST).read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"{Path(out_dir) / MANIFEST} is not a {FORMAT} manifest")
        return cls(d["config"], [ShardRecord.from_json(s) for s in d["shards"]])


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [
        f"{k}: directory has {a.get(k, '(absent)')!r}, this run {b.get(k, '(absent)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


# ----------------------------------------------------------------------------------------
# model identity
# ----------------------------------------------------------------------------------------


def _hash_tensors(h: Any, items: Sequence[tuple[str, Tensor]]) -> None:
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(network: Callable[..., Tensor]) -> dict[str, str]:
    """Identify a network by content: the sha256 of a ``torch.nn.Module``'s state dict (names,
    dtypes, shapes, values), or of a :class:`~dpmsolver.analytic.MixtureNetwork`'s mixture
    and prediction. Other callables cannot be fingerprinted (ValueError)."""
    h = hashlib.sha256()
    if isinstance(network, torch.nn.Module):
        _hash_tensors(h, sorted(network.state_dict().items()))
        return {"kind": f"module {type(network).__name__}", "sha256": h.hexdigest()}
    if isinstance(network, MixtureNetwork):
        m = network.mixture
        h.update(f"{network.prediction}|{m.num_classes}|{m.shape}|".encode())
        _hash_tensors(
            h, [("means", m.means), ("stds", m.stds), ("weights", m.weights), ("labels", m.labels)]
        )
        return {"kind": "mixture", "sha256": h.hexdigest()}
    raise ValueError(
        f"model_id: cannot fingerprint a network of type {type(network).__name__} "
        "(only torch.nn.Module and MixtureNetwork); pass model_id= to name the model"
    )


def _schedule_identity(schedule: NoiseSchedule) -> dict[str, Any]:
    """A schedule is identified by what it does: lambda and the network time on a fixed
    grid of its range, plus the range itself."""
    ts = torch.linspace(schedule.t_min, schedule.t_max, 257, dtype=torch.float64)
    h = hashlib.sha256()
    _hash_tensors(
        h,
        [
            ("range", torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64)),
            ("lambda", schedule.lambda_(ts)),
            ("model_time", schedule.model_time(ts)),
        ],
    )
    return {"type": type(schedule).__name__, "sha256": h.hexdigest()}


def files_sha256(files: Sequence[Path], root: Path) -> str:
    """One sha256 over ``files``: their paths relative to ``root`` and their sha256s."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.relative_to(root).as_posix()}|{sha256_file(f)}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------


class _MicroBatched:
    """Calls ``network`` on fixed groups of rows, whatever batch the sampler integrates.

    The sampler's batch is a run of whole micro-batches (``sizes``); a call carries
    ``copies`` stacked copies of it (2 under classifier-free guidance, which stacks the
    unconditional rows on the conditional ones). Each network call gets one micro-batch,
    with its rows from every copy, so the rows a sample shares a call with depend only on
    the configuration."""

    def __init__(self, network: Callable[..., Tensor], sizes: Sequence[int]) -> None:
        self.network = network
        self.sizes = list(sizes)
        self.n = sum(self.sizes)
        self._rows: dict[tuple[int, torch.device], list[Tensor]] = {}

    def _groups(self, copies: int, device: torch.device) -> list[Tensor]:
        """Row indices of each call: micro-batch j's rows from every copy."""
        key = (copies, device)
        if key not in self._rows:
            starts = np.cumsum([0, *self.sizes[:-1]]).tolist()
            self._rows[key] = [
                torch.cat(
                    [torch.arange(c * self.n + o, c * self.n + o + size) for c in range(copies)]
                ).to(device)
                for o, size in zip(starts, self.sizes, strict=True)
            ]
        return self._rows[key]

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        rows = x.shape[0]
        copies = rows // self.n
        if copies < 1 or copies * self.n != rows:
            raise RuntimeError(f"network call with {rows} rows for a batch of {self.n} samples")

        def take(v: Any, idx: Tensor) -> Any:
            return v[idx] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == rows else v

        groups = self._groups(copies, x.device)
        out = torch.cat(
            [
                self.network(x[idx], take(t, idx), **{k: take(v, idx) for k, v in kwargs.items()})
                for idx in groups
            ]
        )
        if copies == 1:
            return out  # the groups are consecutive rows already
        result = torch.empty_like(out)
        result[torch.cat(groups)] = out
        return result


@dataclass(frozen=True)
class _Job:
    """Everything a shard needs, fixed for the run."""

    model: LoadedModel
    out: Path
    config: dict[str, Any]
    config_sha256: str
    classes: list[int] | None
    seed: int
    solver: str | Recipe
    nfe: int | None
    steps: int | None
    guidance: float
    grid: str | None
    batch: int
    micro_batch: int
    on_nonfinite: OnNonFinite
    device: torch.device
    dtype: torch.dtype
    profile: RecipeSource | None = None


class _Group:
    """This process among the launcher's processes (torch.distributed), or alone."""

    def __init__(self, device: torch.device) -> None:
        self.created = False
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if launched and not dist.is_available():
            raise RuntimeError(
                "started by a multi-process launcher, but this torch has no torch.distributed"
            )
        if launched and not dist.is_initialized():
            # The group only passes small Python objects (shard records, errors) between the
            # processes, so gloo serves CUDA runs too; nccl would refuse two processes
            # sharing one GPU. Processes wait for each other once per round of shards; a
            # shard may take long.
            dist.init_process_group("gloo", timeout=timedelta(hours=6))
            self.created = True
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.size = dist.get_world_size() if self.active else 1

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def from_rank0(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only; every process returns its result or raises its error."""
        result: Any = None
        if self.rank == 0:
            try:
                result = ("ok", fn())
            except Exception as e:
                result = ("error", e)
        if self.active:
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        kind, value = result
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        """Leave the group if this object created it."""
        if self.created:
            dist.destroy_process_group()


def _plan(num: int, shard_size: int) -> list[ShardRecord]:
    return [
        ShardRecord(k, start, min(num, start + shard_size), f"shard-{k:06d}.npz")
        for k, start in enumerate(range(0, num, shard_size))
    ]


def _record_path(out: Path, shard: ShardRecord) -> Path:
    return out / shard.file.replace(".npz", ".json")


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An ``.npz`` (uncompressed zip of ``.npy``) with fixed timestamps, so that equal
    arrays give equal bytes; ``numpy.load`` reads it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, npy.getvalue())
    return buf.getvalue()


def _valid_record(job: _Job, planned: ShardRecord) -> ShardRecord | None:
    """The shard's record if it is done and its file is intact, else None."""
    path = _record_path(job.out, planned)
    try:
        d = json.loads(path.read_text())
        rec = ShardRecord.from_json(d)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if d.get("config_sha256") != job.config_sha256 or rec.status == "pending":
        return None
    if (rec.shard, rec.start, rec.stop, rec.file) != (
        planned.shard,
        planned.start,
        planned.stop,
        planned.file,
    ):
        return None
    try:
        return rec if sha256_file(job.out / rec.file) == rec.sha256 else None
    except OSError:
        return None


def _labels_for(job: _Job, indices: Sequence[int]) -> Tensor | None:
    if job.classes is None:
        return None
    return torch.tensor([job.classes[i % len(job.classes)] for i in indices], dtype=torch.long)


def _make_shard(job: _Job, planned: ShardRecord, bar: Progress) -> ShardRecord:
    """Generate, write and record one shard."""
    store = torch.float64 if job.dtype == torch.float64 else torch.float32
    xs: list[Tensor] = []
    kept: list[int] = []
    failed: list[FailedSample] = []
    for b0 in range(planned.start, planned.stop, job.batch):
        idx = list(range(b0, min(planned.stop, b0 + job.batch)))
        # Micro-batches start at the shard's start; batches are whole micro-batches.
        sizes = [min(job.micro_batch, len(idx) - o) for o in range(0, len(idx), job.micro_batch)]
        try:
            x = sample_indices(
                job.model,
                idx,
                _labels_for(job, idx),
                solver=job.solver,
                nfe=job.nfe,
                steps=job.steps,
                guidance=job.guidance,
                seed=job.seed,
                device=job.device,
                grid=job.grid,
                dtype=job.dtype,
                network=_MicroBatched(job.model.network, sizes),
                profile=job.profile,
            ).x
            good = list(range(len(idx)))
        except NonFiniteError as e:
            bad = sorted(e.sample_steps)
            if job.on_nonfinite == "stop" or e.x is None:
                where = ", ".join(f"{idx[j]} (step {e.sample_steps[j]})" for j in bad[:20])
                more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
                raise GenerationError(
                    f"samples went non-finite (NaN/Inf): indices {where}{more}; first at step "
                    f"{e.step} (to t={e.t:.6g}). Shard {planned.shard} ({planned.file}) was not "
                    "written; rerun with --on-nonfinite skip (on_nonfinite='skip') to record "
                    "such samples and keep the rest"
                ) from e
            x = e.x
            failed += [FailedSample(idx[j], e.sample_steps[j]) for j in bad]
            good = [j for j in range(len(idx)) if j not in e.sample_steps]
        xs.append(x[good].to(device="cpu", dtype=store))
        kept += [idx[j] for j in good]
        bar.update(len(idx))
    arrays = {
        "samples": torch.cat(xs).numpy(),
        "indices": np.asarray(kept, dtype=np.int64),
    }
    labels = _labels_for(job, kept)
    if labels is not None:
        arrays["labels"] = labels.numpy()
    data = _npz_bytes(arrays)
    rec = ShardRecord(
        planned.shard,
        planned.start,
        planned.stop,
        planned.file,
        "partial" if failed else "complete",
        len(kept),
        hashlib.sha256(data).hexdigest(),
        tuple(failed),
    )
    # The file first, then its record: a record always points at a whole file.
    atomic_write_bytes(job.out / rec.file, data)
    atomic_write_text(
        _record_path(job.out, rec),
        json.dumps({"config_sha256": job.config_sha256, **rec.to_json()}, indent=1),
    )
    return rec


def _write_manifest(out: Path, manifest: Manifest) -> None:
    atomic_write_text(out / MANIFEST, json.dumps(manifest.to_json(), indent=1) + "\n")


def _prepare(job: _Job, plan: list[ShardRecord]) -> None:
    """Rank 0, before any work: check the directory against this configuration, remove
    temporary files left by a killed run, write the initial manifest."""
    out = job.out
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    if path.exists():
        try:
            old = Manifest.load(out)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigMismatchError(
                f"{path} is unreadable ({e}); move it away to rebuild it from the shard records"
            ) from None
        diffs = _differences(old.config, job.config)
        if diffs:
            raise ConfigMismatchError(
                f"{out} holds a run with a different configuration; use another directory "
                "or the original settings. Differences: " + "; ".join(diffs)
            )
    else:
        # No manifest: shard records from another configuration must not be overwritten.
        for rec_path in sorted(out.glob("shard-*.json")):
            try:
                theirs = json.loads(rec_path.read_text()).get("config_sha256")
            except (OSError, ValueError, AttributeError):
                continue  # a damaged record is regenerated like a missing one
            if theirs != job.config_sha256:
                raise ConfigMismatchError(
                    f"{out} has no {MANIFEST} but holds {rec_path.name} from a run with a "
                    "different configuration; use another directory"
                )
    for tmp in out.glob(".shard-*.tmp"):
        tmp.unlink(missing_ok=True)
    for tmp in out.glob(f".{MANIFEST}.*.tmp"):
        tmp.unlink(missing_ok=True)
    if not path.exists():
        _write_manifest(out, Manifest(job.config, plan))


def _rounds(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for r in range(math.ceil(len(items) / size)):
        yield list(items[r * size : (r + 1) * size])


def _run(job: _Job, plan: list[ShardRecord], group: _Group, progress: bool) -> Manifest:
    group.from_rank0(lambda: _prepare(job, plan))

    # Check the existing shards, each process a share, then agree on what is left to do.
    mine = {p.shard: _valid_record(job, p) for p in plan if p.shard % group.size == group.rank}
    done: dict[int, ShardRecord] = {}
    for part in group.gather(mine):
        done.update({k: v for k, v in part.items() if v is not None})
    partial = [r for r in done.values() if r.status == "partial"]
    if partial and job.on_nonfinite == "stop":
        listed = ", ".join(f"{f.index} (step {f.step})" for r in partial for f in r.failed[:20])
        raise GenerationError(
            f"shards {[r.shard for r in partial]} hold samples that went non-finite in an earlier "
            f"run with on_nonfinite='skip': {listed}; rerun with --on-nonfinite skip "
            "(on_nonfinite='skip') to finish the run with them recorded as failed"
        )
    todo = [p.shard for p in plan if p.shard not in done]

    # Deal the remaining shards out in rounds; after each round every process learns
    # whether any failed, so that all stop together.
    my_shards = todo[group.rank :: group.size]
    bar = Progress(
        sum(plan[k].stop - plan[k].start for k in my_shards),
        enabled=progress and group.rank == 0,
        desc="generate",
    )
    error: Exception | None = None
    failures: list[tuple[int, str]] = []
    new: dict[int, ShardRecord] = {}
    try:
        for shards in _rounds(todo, group.size):
            if group.rank < len(shards):
                try:
                    k = shards[group.rank]
                    new[k] = _make_shard(job, plan[k], bar)
                except Exception as e:  # every process must hear of it, or the others wait
                    error = e
            said = group.gather(None if error is None else f"{type(error).__name__}: {error}")
            failures = [(r, msg) for r, msg in enumerate(said) if msg]
            if failures:
                break
    finally:
        bar.close()
    for part in group.gather(new):
        done.update(part)
    manifest = Manifest(job.config, [done.get(p.shard, p) for p in plan])
    group.from_rank0(lambda: _write_manifest(job.out, manifest))
    if error is not None:
        raise error
    if failures:
        rank, msg = failures[0]
        raise GenerationError(f"stopped because process {rank} of {group.size} failed: {msg}")
    return manifest


_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _classes(
    model: LoadedModel, labels: Literal["cycle"] | Sequence[int] | None
) -> list[int] | None:
    """The classes sample ``i`` cycles through (None for an unconditional model)."""
    if model.num_classes is None:
        if labels not in ("cycle", None):
            raise ValueError("labels: the model is not class-conditional; use 'cycle' or None")
        return None
    if labels == "cycle" or labels is None:
        return list(range(model.num_classes))
    if isinstance(labels, str) or not labels:
        raise ValueError(f"labels must be 'cycle' or a non-empty list of classes, got {labels!r}")
    classes = [check_int(f"labels[{i}]", c, minimum=0) for i, c in enumerate(labels)]
    if max(classes) >= model.num_classes:
        raise ValueError(f"labels must lie in [0, {model.num_classes - 1}], got {max(classes)}")
    return classes


def _check_sampler(
    model: LoadedModel, solver: str, nfe: int | None, steps: int | None, grid: str | None
) -> None:
    """Fail now, before anything is written, on a solver that cannot be used here or a
    solver/budget/grid combination that cannot run: a one-row run through a zero network
    costs only the grid arithmetic."""
    check_choice("solver", solver, [*POLICIES, *sorted(REGISTRY), *sorted(ALIASES)])
    if solver not in POLICIES and isinstance(get_solver(solver), AdaptiveSolver):
        raise ValueError(
            f"solver={solver!r} is adaptive: its step sizes come from the whole batch's error, "
            "so a sample would depend on its batch; choose a fixed-step solver or 'auto'"
        )
    evaluations(model, solver, nfe=nfe, steps=steps, grid=grid)


def _check_ems(model: LoadedModel, solver: str, guidance: float, ems: EMS) -> str:
    """The solver for a run with statistics ``ems`` (``"dpmv3"``), after checking that they
    describe this model's schedule, prediction and range at this guidance scale."""
    if not isinstance(ems, EMS):
        raise TypeError(f"ems must be a dpmsolver.ems.EMS or None, got {type(ems).__name__}")
    if solver not in ("auto", "dpmv3"):
        raise ValueError(
            f"ems: the statistics are DPM-Solver-v3's and solver={solver!r} does not use them; "
            "use solver='dpmv3' or 'auto'"
        )
    sched = model.schedule
    lam_a, lam_b = sched.knot(sched.t_max).lam, sched.knot(sched.t_min).lam
    finite = math.isfinite(lam_a) and math.isfinite(lam_b)
    ems.check(
        schedule=sched,
        prediction=model.prediction,
        guidance_scale=guidance,
        lam_range=(lam_a, lam_b) if finite else None,
    )
    if ems.shape not in ((), tuple(model.shape)):
        raise ValueError(
            f"ems describes samples of shape {ems.shape}, the model's are {tuple(model.shape)}"
        )
    return "dpmv3"


def _ems_identity(ems: EMS) -> dict[str, Any]:
    """What identifies the statistics in the run's configuration: their SHA-256 (grid and
    values) and how they were made."""
    h = hashlib.sha256()
    _hash_tensors(h, [(k, getattr(ems, k)) for k in ("lams", "l", "s", "b")])
    return {"sha256": h.hexdigest(), "points": ems.lams.numel(), "samples": ems.samples}


def _model_identity(model: LoadedModel, model_id: Mapping[str, Any] | str) -> dict[str, Any]:
    return {
        "name": model.name,
        "id": model_id,
        "prediction": model.prediction,
        "shape": list(model.shape),
        "num_classes": model.num_classes,
        "null_label": model.null_label,
        "schedule": _schedule_identity(model.schedule),
    }


def generate(
    model: LoadedModel,
    num: int,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    solver: str = "auto",
    nfe: int | None = None,
    guidance: float = 1.0,
    labels: Literal["cycle"] | Sequence[int] | None = "cycle",
    grid: str | None = None,
    batch_size: int = 64,
    micro_batch: int = 32,
    shard_size: int = 1000,
    on_nonfinite: OnNonFinite = "stop",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_id: Mapping[str, Any] | str | None = None,
    progress: bool = False,
    steps: int | None = None,
    ems: EMS | None = None,
    profile: Profile | None = None,
) -> Manifest:
    """Generate samples ``0 .. num-1`` into ``out_dir`` as checksummed shards with a
    manifest, resuming whatever a previous run of the same configuration left (see the
    module docstring for the formats and guarantees). Under ``torchrun`` every process
    calls this with the same arguments.

    Args:
        model: the model (:class:`dpmsolver.model.LoadedModel`), on ``device``.
        num: number of samples (>= 1).
        out_dir: output directory (created if missing).
        seed: run seed (>= 0); sample i's noise depends only on ``(seed, i)``. Default 0.
        solver: solver name, alias or ``"auto"`` (default); adaptive solvers are refused.
        nfe: network evaluations per sample (default 10 when ``steps`` is not given).
        guidance: classifier-free guidance scale (default 1 = none; needs a conditional
            model with a null label otherwise).
        labels: class of sample i for conditional models: ``"cycle"`` (default; None
            means the same: ``i mod num_classes``) or a list of classes, sample i taking
            entry ``i mod len(list)``. Unconditional models take no labels.
        grid: time grid kind (default: the solver's recommendation, else ``logsnr``).
        batch_size: samples integrated together (default 64; rounded down to a multiple of
            ``micro_batch``, at least one micro-batch). Does not change the output.
        micro_batch: samples per network call (default 32); part of the configuration,
            since networks are not batch-invariant.
        shard_size: samples per shard file (default 1000).
        on_nonfinite: ``"stop"`` (default) or ``"skip"``; see the module docstring.
        device: where sampling runs (default CPU); the model must live there.
        dtype: dtype of the noise and solver state (default float32).
        model_id: what identifies the model in the configuration (default:
            :func:`model_fingerprint` of ``model.network``).
        progress: progress bar on stderr (rank 0 only).
        steps: grid steps instead of an ``nfe`` budget (at most one of the two; part of
            the configuration only when given).
        ems: DPM-Solver-v3 statistics of this model at this guidance scale
            (:func:`dpmsolver.ems.estimate_model_ems`): ``solver`` must be ``"dpmv3"`` or
            ``"auto"`` (which then means dpmv3), and the run uses the official settings for
            the budget (:func:`~dpmsolver.solvers.v3.recommended_options`). Part of the
            configuration (a digest of the statistics) only when given.
        profile: with ``solver="auto"``, a profile fitted to this model
            (:func:`dpmsolver.tune`); its choice for ``nfe`` and ``guidance`` runs (a
            profile of another schedule or prediction is an error; a budget it lacks falls
            back to the default recipe with a warning). Part of the configuration (its
            sha256) only when given.

    Returns:
        The :class:`Manifest` as written.

    Raises:
        ConfigMismatchError: ``out_dir`` holds a run with another configuration.
        GenerationError: non-finite samples under ``"stop"``, or another process failed.
    """
    if not isinstance(model, LoadedModel):
        raise TypeError(f"model must be a LoadedModel, got {type(model).__name__}")
    num = check_int("num", num, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    if nfe is not None and steps is not None:
        raise ValueError("give at most one of nfe and steps")
    if steps is not None:
        steps = check_int("steps", steps, minimum=1)
    else:
        nfe = check_int("nfe", 10 if nfe is None else nfe, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    micro_batch = check_int("micro_batch", micro_batch, minimum=1)
    shard_size = check_int("shard_size", shard_size, minimum=1)
    check_choice("on_nonfinite", on_nonfinite, ("stop", "skip"))
    check_choice("dtype", dtype, list(_DTYPES.values()))
    guidance = check_finite_float("guidance", guidance)
    if guidance != 1.0 and (model.num_classes is None or model.null_label is None):
        raise ValueError(f"guidance={guidance:g} needs a class-conditional model with a null label")
    classes = _classes(model, labels)
    device = torch.device(device)
    if ems is not None and profile is not None:
        raise ValueError("ems= and profile= exclude each other: a profile picks its own solver")
    if ems is not None:
        solver = _check_ems(model, solver, guidance, ems)
    _check_sampler(model, solver, nfe, steps, grid)
    if profile is not None:
        if solver != "auto":
            raise ValueError(f"profile= is used with solver='auto', not solver={solver!r}")
        profile.check(model.schedule, model.prediction)
    if model_id is None:
        model_id = model_fingerprint(model.network)
    config: dict[str, Any] = {
        "library_version": __version__,
        "torch_version": torch.__version__,
        "model": _model_identity(model, model_id),
        "solver": solver,
        "nfe": nfe,
        "grid": grid,
        "guidance": guidance,
        "seed": seed,
        "labels": {"policy": "none"}
        if classes is None
        else {"policy": "cycle", "classes": classes},
        "num": num,
        "shard_size": shard_size,
        "micro_batch": micro_batch,
        "dtype": str(dtype).removeprefix("torch."),
        "device_type": device.type,
    }
    if steps is not None:  # absent otherwise: directories of earlier runs stay resumable
        config["steps"] = steps
    run_solver: str | Recipe = solver
    if ems is not None:  # likewise
        config["ems"] = _ems_identity(ems)
        budget = steps if nfe is None else nfe
        cond = model.num_classes is not None
        options = recommended_options(guidance, budget or 10, conditional=cond)
        run_solver = Recipe("dpmv3", {"ems": ems, **options})
    if profile is not None:  # likewise
        text = json.dumps(profile.to_json(), sort_keys=True).encode()
        config["profile"] = {"sha256": hashlib.sha256(text).hexdigest()}
    config = json.loads(_canonical(config))  # exactly what the manifest will hold
    job = _Job(
        model=model,
        out=Path(out_dir),
        config=config,
        config_sha256=_config_hash(config),
        classes=classes,
        seed=seed,
        solver=run_solver,
        nfe=nfe,
        steps=steps,
        guidance=guidance,
        grid=grid,
        batch=max(micro_batch, batch_size // micro_batch * micro_batch),
        micro_batch=micro_batch,
        on_nonfinite=on_nonfinite,
        device=device,
        dtype=dtype,
        profile=profile,
    )
    group = _Group(device)
    try:
        return _run(job, _plan(num, shard_size), group, progress)
    finally:
        group.close()


def read_samples(out_dir: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load every written shard of ``out_dir`` (checking each file's sha256 against the
    manifest) as one dict of arrays ordered by sample index: ``samples``, ``indices`` and,
    for conditional models, ``labels``."""
    out = Path(out_dir)
    manifest = Manifest.load(out)
    parts: dict[str, list[np.ndarray]] = {}
    for rec in manifest.shards:
        if rec.status == "pending":
            continue
        path = out / rec.file
        if sha256_file(path) != rec.sha256:
            raise ValueError(
                f"{path} does not match its sha256 in {out / MANIFEST}; rerun generate to repair it"
            )
        with np.load(path) as z:
            for key in z.files:
                parts.setdefault(key, []).append(z[key])
    return {k: np.concatenate(v) for k, v in parts.items()}
