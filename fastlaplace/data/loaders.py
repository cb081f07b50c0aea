"""The splits of the image data sets of ``python -m fastlaplace.train --dataset ...``, and the
checks that make their episode samplers.

Each reader takes ``(root, seed, allow_pickle)`` and gives the classes of every split,
through the decoded cache beside the data when there is one; :data:`fastlaplace.datasets.DATASETS`
names them. Nothing here builds a problem (that is :mod:`fastlaplace.problems`).
"""

from __future__ import annotations

from pathlib import Path

from .episodes import EpisodeSampler, ImageClasses
from .images import DataLayoutError, cached, miniimagenet_sources, read_digits, read_miniimagenet, read_omniglot

SPLITS = ("train", "val", "test")


def digits_splits(root: str | None, seed: int = 0, allow_pickle: bool = False) -> dict[str, ImageClasses]:
    """scikit-learn's 8×8 digits, upsampled to 16×16 (no data folder)."""
    return read_digits()


def omniglot_splits(root: str | None, seed: int = 0, allow_pickle: bool = False) -> dict[str, ImageClasses]:
    root = _folder("omniglot", root)
    sources = sorted(root.glob("images_*/*/*/*.png"))
    return cached(read_omniglot, root / f"fastlaplace-omniglot-28-seed{seed}.pt", root, seed=seed, sources=sources)


def miniimagenet_splits(root: str | None, seed: int = 0, allow_pickle: bool = False) -> dict[str, ImageClasses]:
    root = _folder("miniimagenet", root)
    return cached(read_miniimagenet, root / "fastlaplace-miniimagenet-84.pt", root, allow_pickle=allow_pickle,
                  sources=miniimagenet_sources(root))


def _folder(dataset: str, root: str | None) -> Path:
    if root is None or not Path(root).is_dir():
        raise DataLayoutError(f"{dataset}: the data root {root} is not a folder (see README: Data)")
    return Path(root)


def episode_samplers(dataset: str, splits: dict[str, ImageClasses], ways: int, shots: int,
                     query: int) -> dict[str, EpisodeSampler]:
    """The episode sampler of every split. Checks every split up front (one image shape, enough
    classes and images per class for the episodes), so that a bad test split fails before
    training rather than after it."""
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise DataLayoutError(f"{dataset}: no {', '.join(missing)} split")
    shapes = {s: c.image_shape for s, c in splits.items()}
    if len(set(shapes.values())) != 1:
        raise DataLayoutError(f"{dataset}: the splits' images differ in shape (channels, height, width): {shapes}")
    samplers = {}
    for s, c in splits.items():
        try:
            samplers[s] = EpisodeSampler(c, ways, shots, query)
        except ValueError as exc:
            raise DataLayoutError(f"{dataset}, {s} split: {exc}") from exc
    _, size, width = splits["train"].image_shape
    if size < 16 or size != width:
        raise DataLayoutError(f"{dataset}: images must be square and at least 16×16 for Conv4 and ResNet-12, got "
                              f"{size}×{width}")
    return samplers
