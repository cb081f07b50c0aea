"""The README's commands as a user types them: from the repository root, where ``python -m``
puts the source checkout (no compiled ``_C`` in it) first on ``sys.path``."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["fastlaplace.train", "fastlaplace.evaluate", "fastlaplace.uncertainty", "fastlaplace.plot",
                "fastlaplace.doctor"]


def run_from_root(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_from_repository_root(module):
    run = run_from_root("-m", module, "--help")
    assert run.returncode == 0, run.stderr
    assert f"python -m {module}" in run.stdout
    assert "Traceback" not in run.stderr and "Warning" not in run.stderr, run.stderr


def test_import_from_repository_root_finds_the_compiled_kernels():
    code = ("import fastlaplace, torch; "
            "print(fastlaplace.__version__, fastlaplace.has_cuda(), "
            "float(fastlaplace.kfac_logdet(torch.ones(1, 2, 1), torch.ones(1, 2, 1), 2.0, 1.0)))")
    run = run_from_root("-c", code)
    assert run.returncode == 0, run.stderr
    version, _, logdet = run.stdout.splitlines()[-1].split()
    assert version == __import__("fastlaplace").__version__
    assert float(logdet) == pytest.approx(__import__("fastlaplace").kfac_logdet(
        *[__import__("torch").ones(1, 2, 1)] * 2, 2.0, 1.0).item())


def test_version_has_one_source():
    from importlib.metadata import version

    import fastlaplace

    assert version("fastlaplace") == fastlaplace.__version__
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
