"""Progress bars of the long loops (training, evaluation): ``tqdm``, set up alike everywhere.

On a terminal the bar is redrawn in place; in a log (stderr is not a terminal: CI, a batch
job, ``2> log``) it is written as a line at every tenth of the way, not redrawn, so that logs
stay short and readable; with ``enabled=False`` (``--no-progress``, every rank but rank 0
under ``torchrun``) nothing is written.
"""

from __future__ import annotations

import math
import re
import sys
from typing import TextIO

from tqdm.auto import tqdm

_NOTEBOOK = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)  # tqdm.auto chose its widget


def progress_bar(total: int, desc: str, initial: int = 0, enabled: bool = True, stream: TextIO | None = None) -> tqdm:
    """``with progress_bar(total, "train") as b: b.set_postfix(loss=0.3, refresh=False); b.update(1)``."""
    stream = stream or sys.stderr
    if not enabled or total <= 0 or _NOTEBOOK or _is_terminal(stream):
        return tqdm(total=total, desc=desc, initial=initial, file=stream, disable=not enabled or total <= 0,
                    dynamic_ncols=True)
    # A log: a new line at each tenth (and none in between, however slow the loop).
    return tqdm(total=total, desc=desc, initial=initial, file=_Lines(stream), miniters=max(1, math.ceil(total / 10)),
                mininterval=0, maxinterval=math.inf)


def _is_terminal(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


class _Lines:
    """A stream for tqdm that turns its in-place redraws (``\\r`` + bar) into lines, one per
    count (the final count is drawn twice: by the last update and on closing)."""

    def __init__(self, stream: TextIO):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        count = re.search(r"\|\s*(\d+/\d+)\s", line)
        key = count.group(1) if count else line
        if line and key != self.last:
            self.stream.write(line + "\n")
            self.last = key

    def flush(self) -> None:
        self.stream.flush()
