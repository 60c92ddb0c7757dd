"""File output that never leaves a half-written file behind, and checks that an output
location can be written before any work is done."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable_dir",
    "check_writable_file",
]


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename
    it over ``path`` (atomic on POSIX). On any error the temporary file is removed and
    ``path`` is untouched."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {directory}")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _can_create_in(directory: Path) -> bool:
    """Whether a file can be created in ``directory``: tried, not inferred from permission
    bits (which root bypasses and read-only file systems contradict)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".dpmsolver-probe-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def check_writable_file(path: str | os.PathLike[str], name: str) -> None:
    """A ValueError naming ``name`` unless ``path`` can be written by :func:`atomic_write`:
    its directory exists and accepts new files, and ``path`` is not a directory."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.exists():
        raise ValueError(f"{name}: directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise ValueError(f"{name}: {str(directory)!r} is not a directory")
    if target.is_dir():
        raise ValueError(f"{name}: {str(target)!r} is a directory")
    if not _can_create_in(directory):
        raise ValueError(f"{name}: directory {str(directory)!r} is not writable")


def check_writable_dir(path: str | os.PathLike[str], name: str, *, create: bool = False) -> None:
    """A ValueError naming ``name`` unless ``path`` is a directory that accepts new files
    or can be made one (its nearest existing ancestor is a writable directory). With
    ``create``, a missing ``path`` is created, parents included."""
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"{name}: {str(target)!r} exists and is not a directory")
        if not _can_create_in(target):
            raise ValueError(f"{name}: directory {str(target)!r} is not writable")
        return
    ancestor = target.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(
            f"{name}: cannot create {str(target)!r}: {str(ancestor)!r} is not a directory"
        )
    if not _can_create_in(ancestor):
        raise ValueError(
            f"{name}: cannot create {str(target)!r}: {str(ancestor)!r} is not writable"
        )
    if create:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{name}: cannot create {str(target)!r} ({e.strerror})") from None
