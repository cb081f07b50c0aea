"""Shared helpers of the benchmark scripts: timing, machine description, RESULTS.md blocks."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as tb

RESULTS = Path(__file__).with_name("RESULTS.md")


def timeit(fn, min_run_time: float = 0.3) -> float:
    """Median seconds per call (torch.utils.benchmark, which synchronises CUDA)."""
    fn()  # warm up (and fail early)
    return tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_block(name: str, body: str, device: str) -> None:
    """Replace (or append) this benchmark's block of RESULTS.md."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    stamp = datetime.date.today().isoformat()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS.parent).stdout.strip()
    except OSError:
        commit = ""
    block = (f"<!-- {name}:{device_kind(device)}:start -->\n"
             f"Command: `{command}`  \nMachine: {machine(device)}  \nDate: {stamp}"
             f"{f' (commit {commit})' if commit else ''}\n\n{body}\n<!-- {name}:{device_kind(device)}:end -->")
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"<!-- {name}:{device_kind(device)}:start -->.*?<!-- {name}:{device_kind(device)}:end -->",
                         re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"
