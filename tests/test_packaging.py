"""What the wheel ships from the package folder: Python modules and the ``py.typed`` marker,
nothing that only the build reads (templates live in ``cmake/``)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_package_folder_holds_only_modules_and_the_typed_marker():
    tracked = subprocess.run(["git", "ls-files", "fastlaplace"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert "fastlaplace/py.typed" in tracked
    others = [f for f in tracked if not f.endswith(".py") and f != "fastlaplace/py.typed"]
    assert others == [], f"not Python modules, yet in the wheel: {others}"


def test_changelog_names_the_current_version_or_unreleased_changes():
    import fastlaplace

    text = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {fastlaplace.__version__}" in text and "## Unreleased" in text
