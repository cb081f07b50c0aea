"""Loads the compiled kernels (fastlaplace._C), with readable errors when that fails.

``python -m fastlaplace.train`` run from the repository root puts the checkout first on
``sys.path``, so this package is then the source tree, which has no ``_C``. In that case
the compiled files of an installed fastlaplace (``pip install .``) are used: the installed
package's folder is added to this package's search path, and a warning says when the
installed build came from other C++ sources than this checkout's ``csrc/``.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import sys
import warnings
from pathlib import Path

import torch

_REBUILD = (
    "Rebuild fastlaplace against the torch you import: `pip install --no-build-isolation "
    "--force-reinstall --no-deps .` (needs scikit-build-core, pybind11, cmake>=3.26 and ninja "
    "installed), or install the torch it was built against."
)
_PACKAGE_DIR = Path(__file__).resolve().parent


def _installed_build() -> Path | None:
    """The folder of another fastlaplace on ``sys.path`` that holds a compiled build."""
    search = [p for p in sys.path if Path(p or ".").resolve() != _PACKAGE_DIR.parent]
    spec = importlib.machinery.PathFinder.find_spec(__package__, search)
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location).resolve()
        if folder != _PACKAGE_DIR and (folder / "_build_config.py").is_file():
            return folder
    return None


def sources_digest(csrc: Path) -> str:
    """SHA-256 over the C++/CUDA sources, as CMakeLists.txt computes it at build time."""
    files = sorted((p for p in csrc.rglob("*") if p.is_file() and p.suffix in (".cpp", ".cu", ".h", ".cuh")),
                   key=lambda p: p.relative_to(csrc).as_posix())
    per_file = "".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in files)
    return hashlib.sha256(per_file.encode()).hexdigest()


if importlib.util.find_spec(f"{__package__}._build_config") is None:
    # A source checkout: use the compiled files of an installed build.
    _installed = _installed_build()
    if _installed is None:
        raise ImportError(
            "fastlaplace: no compiled extension found; run `pip install .` in the repository first "
            "(or `pip install -e .` for development, see the README)."
        )
    sys.modules[__package__].__path__.append(str(_installed))
    from . import _build_config

    _csrc = _PACKAGE_DIR.parent / "csrc"
    if _csrc.is_dir() and getattr(_build_config, "SOURCES_DIGEST", None) != sources_digest(_csrc):
        warnings.warn(
            f"fastlaplace: the compiled extension in {_installed} was built from other C++ sources "
            f"than {_csrc}; run `pip install .` again to rebuild it.",
            stacklevel=2,
        )
else:
    from . import _build_config

if torch.__version__ != _build_config.TORCH_VERSION:
    raise ImportError(
        f"fastlaplace was built against torch {_build_config.TORCH_VERSION} but torch "
        f"{torch.__version__} is imported. {_REBUILD}"
    )

try:
    from . import _C
except (ImportError, OSError) as exc:
    raise ImportError(f"fastlaplace: could not load its compiled kernels: {exc}. {_REBUILD}") from exc


def build_info() -> dict:
    """How the extension was built: torch version, whether CUDA kernels were compiled, CUDA archs."""
    info = dict(_C.build_info())
    return {
        "torch_version": info["torch_version"],
        "with_cuda": info["with_cuda"] == "1",
        "cuda_architectures": info["cuda_architectures"],
        "torch_cuda_version": _build_config.TORCH_CUDA_VERSION or None,
    }
