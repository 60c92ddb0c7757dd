"""The benchmark records: how each ``python -m dpmsolver.bench.*`` command reads and writes
its files and names itself in them (one place, so every record is written the same way)."""

from __future__ import annotations

import gzip
import io
import sys
from collections.abc import Sequence

from ..io import atomic_write_bytes

__all__ = ["command_line", "publish", "read_text", "write_text"]


def read_text(path: str) -> str:
    """A text file, gunzipped if its name ends in ``.gz``."""
    if path.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            return f.read()
    with open(path) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Write a text file atomically (a crash leaves the old record), gzipped if its name
    ends in ``.gz`` (reproducibly: no name or time stamp, so a rerun with the same output
    gives the same bytes)."""
    data = text.encode()
    if path.endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile("", "wb", 9, buf, mtime=0) as f:
            f.write(data)
        data = buf.getvalue()
    atomic_write_bytes(path, data)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command a record was made by: ``python -m module`` and its arguments (``argv``,
    or the process's own where None)."""
    return " ".join(["python -m " + module, *(sys.argv[1:] if argv is None else argv)])


def publish(text: str, out: str | None) -> None:
    """A command's record: printed, and written to ``out`` where given."""
    print(text)
    if out:
        write_text(out, text)
