"""Builds the image classification problems of ``python -m fastlaplace.train --dataset ...``."""

from __future__ import annotations

from pathlib import Path

from ..problems import ImageProblem
from .episodes import EpisodeSampler, ImageClasses
from .images import DataLayoutError, cached, miniimagenet_sources, read_digits, read_miniimagenet, read_omniglot

SPLITS = ("train", "val", "test")


def read_splits(dataset: str, root: str | None, seed: int = 0, allow_pickle: bool = False) -> dict[str, ImageClasses]:
    """The data set's splits, through the decoded cache beside the data when there is one."""
    if dataset == "digits":
        return read_digits()
    if dataset not in ("omniglot", "miniimagenet"):
        raise ValueError(f"unknown image data set {dataset!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"{dataset}: the data root {root} is not a folder (see README: Data)")
    if dataset == "omniglot":
        sources = sorted(root.glob("images_*/*/*/*.png"))
        return cached(read_omniglot, root / f"fastlaplace-omniglot-28-seed{seed}.pt", root, seed=seed, sources=sources)
    return cached(read_miniimagenet, root / "fastlaplace-miniimagenet-84.pt", root, allow_pickle=allow_pickle,
                  sources=miniimagenet_sources(root))


def image_problem(dataset: str, root: str | None, ways: int, shots: int, query: int, filters: int,
                  seed: int = 0, allow_pickle: bool = False, model: str = "conv4") -> ImageProblem:
    """Checks every split up front (one image shape, enough classes and images per class for
    the episodes), so that a bad test split fails before training rather than after it."""
    splits = read_splits(dataset, root, seed, allow_pickle)
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
    channels, size, width = splits["train"].image_shape
    if size < 16 or size != width:
        raise DataLayoutError(f"{dataset}: images must be square and at least 16×16 for Conv4 and ResNet-12, got "
                              f"{size}×{width}")
    return ImageProblem(samplers, channels, size, ways, filters, model=model)
