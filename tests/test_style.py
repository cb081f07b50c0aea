"""The code stays as the linters configured in pyproject.toml ([tool.ruff]) and .clang-format
want it: ``ruff check .`` and ``clang-format --dry-run --Werror`` on csrc/ pass."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    # The test extra installs both next to this interpreter; a bare checkout may not have them.
    local = Path(sys.executable).with_name(name)
    path = str(local) if local.exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install '.[test]')")
    return path


def test_ruff_is_clean():
    run = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_clang_format_is_clean():
    sources = sorted(str(p) for p in (ROOT / "csrc").rglob("*") if p.suffix in {".h", ".cpp", ".cu"})
    assert sources
    run = subprocess.run([_tool("clang-format"), "--dry-run", "--Werror", *sources], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-4000:]
