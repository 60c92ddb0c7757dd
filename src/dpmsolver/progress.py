"""A dependency-free progress bar for the sampling loop (stderr, one line)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Minimal ``[#####-----] i/n  it/s`` progress line; a no-op when disabled."""

    def __init__(self, total: int | None, *, enabled: bool, desc: str = "sampling", stream: TextIO | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self._t0 = time.perf_counter()

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` and redraw."""
        if not self.enabled:
            return
        self.count += n
        elapsed = time.perf_counter() - self._t0
        rate = self.count / elapsed if elapsed > 0 else 0.0
        if self.total:
            width = 24
            filled = int(width * min(self.count, self.total) / self.total)
            bar = "#" * filled + "-" * (width - filled)
            line = f"\r{self.desc} [{bar}] {self.count}/{self.total} {rate:.1f} it/s"
        else:
            line = f"\r{self.desc} {self.count} {rate:.1f} it/s"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        """Finish the line."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
