"""Loads the compiled kernels (fastlaplace._C), with readable errors when that fails."""

from __future__ import annotations

import torch

_REBUILD = (
    "Rebuild fastlaplace against the torch you import: `pip install --no-build-isolation "
    "--force-reinstall --no-deps .` (needs scikit-build-core, pybind11, cmake>=3.26 and ninja "
    "installed), or install the torch it was built against."
)

try:
    from . import _build_config
except ImportError as exc:  # pragma: no cover - only from a source checkout
    raise ImportError(
        "fastlaplace: the compiled extension is not there (no fastlaplace/_build_config.py). "
        "Install the package with `pip install .` and import it from outside the source tree."
    ) from exc

if _build_config.TORCH_VERSION != torch.__version__:
    raise ImportError(
        f"fastlaplace was built against torch {_build_config.TORCH_VERSION} but torch "
        f"{torch.__version__} is imported. {_REBUILD}"
    )

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.fastlaplace.*)
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
