"""What the command-line programs share: argument checks and the one-line error ending.

Every expected failure of a program (a bad option, a missing or malformed file, a run that
diverged) ends with a single ``error: ...`` line on stderr and a non-zero exit code. Only
these expected kinds are turned into messages: anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch


class UsageError(ValueError):
    """A command line, a configuration file or an input that cannot be used as given."""


# ValueError covers UsageError, JSON and Unicode errors; OSError covers missing files,
# DataLayoutError, permissions and a full disk; FloatingPointError a diverged run.
EXPECTED = (ValueError, OSError, FloatingPointError, ImportError)


def error_text(exc: BaseException) -> str:
    """The message of ``exc`` as lines of context followed by one ``error:`` line."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return "\n".join([*lines[1:], f"error: {lines[0]}"])


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, shortened (state-dict errors span several)."""
    text = " ".join(str(exc).split())
    return text[:limit] + ("…" if len(text) > limit else "")


@contextlib.contextmanager
def errors_as_messages():
    """Turn the expected failures inside the block into ``error: ...`` and exit code 1."""
    try:
        yield
    except EXPECTED as exc:
        raise SystemExit(error_text(exc)) from None


def positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")


def positive_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{name} must be a finite number > 0, got {value!r}")


def check_output(name: str, path: str) -> None:
    """An output file whose folder exists, checked before the work rather than after it."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise UsageError(f"{name} {path!r}: expected a file in an existing folder")


def check_seed(name: str, value) -> None:
    """A seed that torch's generators take (and ``seed + 1`` too)."""
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**62) <= value < 2**62:
        raise UsageError(f"{name} must be an integer between -2**62 and 2**62, got {value!r}")


def check_device(value: str) -> None:
    """``cpu``, ``cuda`` or ``cuda:N`` that this machine has."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"device must be cpu, cuda or cuda:N, got {value!r}") from exc
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise UsageError(f"device must be cpu, cuda or cuda:N, got {value!r}")
    if not torch.cuda.is_available():
        raise UsageError(f"device {value!r} asked for, but torch sees no CUDA device")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {value!r} asked for, but there are only {torch.cuda.device_count()} CUDA devices")
