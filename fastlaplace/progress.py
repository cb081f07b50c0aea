"""A dependency-free progress bar for long loops (training, evaluation)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress(total, "train") as bar: bar.update(1, loss=0.3)``.

    On a terminal it redraws one line at most 10 times a second; otherwise (logs, CI) it
    prints a line every 10% so that output stays short.
    """

    def __init__(self, total: int, desc: str = "", start: int = 0, stream: TextIO | None = None,
                 enabled: bool = True):
        self.total, self.desc, self.n = total, desc, start
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.start = start
        self._last_draw = 0.0
        self._last_decile = start * 10 // max(total, 1)
        self.fields: dict[str, float] = {}

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **fields: float) -> None:
        self.n += n
        self.fields.update(fields)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty and (now - self._last_draw > 0.1 or self.n >= self.total):
            self._last_draw = now
            self.stream.write("\r" + self._line(now))
            self.stream.flush()
        elif not self.tty and self.n * 10 // self.total > self._last_decile:
            self._last_decile = self.n * 10 // self.total
            self.stream.write(self._line(now) + "\n")
            self.stream.flush()

    def _line(self, now: float) -> str:
        done = self.n - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * self.n / self.total)
        bar = "#" * filled + "-" * (width - filled)
        extra = " ".join(f"{k}={v:.4g}" for k, v in self.fields.items())
        return (f"{self.desc} [{bar}] {self.n}/{self.total} {rate:.1f} it/s "
                f"eta {_fmt_time(eta)} {extra}").rstrip()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_time(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
