"""What the command-line programs share: argument checks and the one-line error ending.

Every expected failure of a program (a bad option, a missing or malformed file, a run that
diverged) ends with a single ``error: ...`` line on stderr and a non-zero exit code. Only
these expected kinds are turned into messages: anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

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


# The largest value of each size (docs/guide.md, "Command line"): beyond these a run cannot end in a
# useful time or fit in any memory, so a larger value is a typo, not a request.
MAXIMA = {"iterations": 10**8, "meta_batch": 10**5, "inner_steps": 1000, "test_inner_steps": 1000,
          "eval_tasks": 10**6, "samples": 10**4, "support": 10**6, "query_points": 10**6, "ways": 1000,
          "shots": 10**4, "query": 10**4, "filters": 4096}


def positive_int(name: str, value, minimum: int = 1, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{name} must be at most {maximum}, got {value!r}")


def positive_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{name} must be a finite number > 0, got {value!r}")


def check_output(name: str, path: str, inputs=()) -> None:
    """An output file whose folder exists and that is none of the ``inputs`` (files, or
    folders it must not be inside), compared after resolving links and relative paths;
    checked before the work rather than after it."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise UsageError(f"{name} {path!r}: expected a file in an existing folder")
    refuse_inputs(name, path, inputs)


def refuse_inputs(name: str, path: str | os.PathLike, inputs) -> None:
    """Refuse an output ``path`` that is one of the ``inputs`` (or inside one that is a folder)."""
    target = Path(path).resolve()
    for source in inputs:
        if source is None:
            continue
        resolved = Path(source).resolve()
        same = target == resolved or resolved in target.parents or (
            target.exists() and resolved.exists() and os.path.samefile(target, resolved))
        if same:
            raise UsageError(f"{name} {str(path)!r} would overwrite an input, {source}: choose another path")


def available_memory(device: str | torch.device) -> int:
    """Bytes that can still be allocated on ``device``: the free memory of a CUDA device; on the
    CPU Linux's MemAvailable, else the physical memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no estimate
        return 2**63


def check_memory(what: str, needed: int, device: str | torch.device) -> None:
    """Refuse work whose estimated need (a lower bound, in bytes) exceeds the device's free memory."""
    have = available_memory(device)
    if needed > have:
        raise UsageError(f"{what} needs at least {needed / 2**30:.3g} GiB, more than the {have / 2**30:.3g} GiB "
                         f"of memory available on {device}")


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
