"""Progress bars: tqdm where it is installed (``tqdm.auto``: a widget in notebooks, a bar on
terminals, as diffusers and k-diffusion show), else a plain fallback that draws a bar only
on a terminal and writes one line at the end into logs (no carriage returns)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class _Plain:
    """The fallback: a one-line bar on a terminal, a summary line elsewhere."""

    def __init__(self, total: int | None, desc: str, stream: TextIO) -> None:
        self.total, self.desc, self.stream = total, desc, stream
        self.count = 0
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._t0 = time.perf_counter()

    def _rate(self) -> float:
        elapsed = time.perf_counter() - self._t0
        return self.count / elapsed if elapsed > 0 else 0.0

    def update(self, n: int) -> None:
        self.count += n
        if not self.tty:
            return
        if self.total:
            width = 24
            filled = int(width * min(self.count, self.total) / self.total)
            bar = "#" * filled + "-" * (width - filled)
            line = f"\r{self.desc} [{bar}] {self.count}/{self.total} {self._rate():.1f} it/s"
        else:
            line = f"\r{self.desc} {self.count} {self._rate():.1f} it/s"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
        else:
            of = f"/{self.total}" if self.total else ""
            self.stream.write(
                f"{self.desc}: {self.count}{of} in {time.perf_counter() - self._t0:.1f}s\n"
            )
        self.stream.flush()


class Progress:
    """A progress bar over ``total`` items; a no-op when not ``enabled``.

    Args:
        total: number of items (None if unknown).
        enabled: draw anything at all.
        desc: the label.
        stream: where to draw (default stderr).
    """

    def __init__(
        self,
        total: int | None,
        *,
        enabled: bool,
        desc: str = "sampling",
        stream: TextIO | None = None,
    ) -> None:
        self.enabled = enabled
        self._bar: Any = None
        if not enabled:
            return
        out = stream if stream is not None else sys.stderr
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._bar = _Plain(total, desc, out)
        else:
            self._bar = tqdm(total=total, desc=desc, file=out, leave=True, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """Advance by ``n``."""
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
