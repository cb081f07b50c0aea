"""Builds the image classification problems of ``python -m fastlaplace.train --dataset ...``."""

from __future__ import annotations

from pathlib import Path

from ..problems import ImageProblem
from .episodes import EpisodeSampler
from .images import cached, read_digits, read_miniimagenet, read_omniglot


def image_problem(dataset: str, root: str | None, ways: int, shots: int, query: int, filters: int,
                  seed: int = 0) -> ImageProblem:
    if dataset == "digits":
        splits = read_digits(seed=seed)
    elif dataset == "omniglot":
        splits = cached(read_omniglot, Path(root) / f"fastlaplace-omniglot-28-seed{seed}.pt", root, seed=seed)
    elif dataset == "miniimagenet":
        splits = cached(read_miniimagenet, Path(root) / "fastlaplace-miniimagenet-84.pt", root)
    else:
        raise ValueError(f"unknown image data set {dataset!r}")
    samplers = {s: EpisodeSampler(c, ways, shots, query) for s, c in splits.items()}
    channels, size, _ = splits["train"].image_shape
    return ImageProblem(samplers, channels, size, ways, filters)
