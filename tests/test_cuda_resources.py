"""The fused CUDA kernels' resources, from ptxas's report of the build (CMakeLists.txt keeps
it as fastlaplace/_ptxas/*.log): no stack frame, spill or local memory in any function of the
four fused translation units, registers within what a block of 128 threads may use. Runs on
the machine that built the CUDA kernels, GPU or not (kernels installed from the kernel cache
come with the report of the build that made them); skipped for a CPU-only build."""

import re
from pathlib import Path

import pytest

import fastlaplace as fl
from fastlaplace import _build_config

# Beside the compiled build (which a source checkout's package borrows from the installed one).
REPORTS = sorted((Path(_build_config.__file__).parent / "_ptxas").glob("logdet_*.log"))
pytestmark = pytest.mark.skipif(not fl.has_cuda(), reason="a CPU-only build: no CUDA kernels")


def test_the_build_kept_its_report():
    assert len(REPORTS) == 4, f"ptxas's report of the four fused units is missing: {REPORTS}"


def functions():
    """(file, function, properties line, usage line) for each function ptxas reported."""
    for path in REPORTS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.search(r"Function properties for (\S+)", line)
            if m:
                usage = next((x for x in lines[i + 1:i + 4] if "Used" in x), "")
                yield path.name, m.group(1), lines[i + 1], usage


def test_report_covers_the_fused_kernels():
    kernels = [f for _, f, _, _ in functions() if "fused_tasks" in f]
    assert len(REPORTS) == 4 and len(kernels) >= 4, [p.name for p in REPORTS]


def test_no_stack_spill_or_local_memory():
    bad = []
    for name, function, props, usage in functions():
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", props)
        if not m or any(int(x) for x in m.groups()) or "lmem" in usage:
            bad.append(f"{name}: {function}: {props.strip()} {usage.strip()}")
    assert not bad, "\n".join(bad)


def test_registers_fit_a_block_of_128():
    for name, function, _, usage in functions():
        m = re.search(r"Used (\d+) registers", usage)
        assert m and int(m.group(1)) * 128 <= 65536, f"{name}: {function}: {usage}"
