"""Readers for the standard on-disk formats of few-shot image data sets.

Nothing is downloaded: each reader takes a folder in the layout its data set is
distributed in, checks it, and returns :class:`ImageClasses` per split. A missing or
malformed folder raises :class:`DataLayoutError` showing the expected layout.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .episodes import ImageClasses

OMNIGLOT_LAYOUT = """\
ROOT/
  images_background/<alphabet>/<character>/*.png   (the 964 background characters)
  images_evaluation/<alphabet>/<character>/*.png   (the 659 evaluation characters)"""

MINIIMAGENET_LAYOUT = """\
ROOT/                                  either Ravi & Larochelle's CSV split:
  train.csv, val.csv, test.csv         header 'filename,label'
  images/<filename>                    (84×84, or larger and resized)
ROOT/                                  or the pickle cache:
  mini-imagenet-cache-train.pkl        dict: 'image_data' N×84×84×3 uint8,
  mini-imagenet-cache-validation.pkl         'class_dict' class name -> list of indices
  mini-imagenet-cache-test.pkl"""


class DataLayoutError(FileNotFoundError):
    """The data folder does not have the expected layout."""

    def __init__(self, problem: str, layout: str):
        super().__init__(f"{problem}\nExpected layout:\n{layout}")


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading image files needs Pillow: pip install 'fastlaplace[images]'") from exc
    return Image


def _load_image(path: Path, size: int, mode: str) -> np.ndarray:
    Image = _pil()
    with Image.open(path) as im:
        im = im.convert(mode)
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------- Omniglot


def omniglot_characters(root: str | os.PathLike) -> list[Path]:
    """All character folders, sorted, from both Omniglot archives."""
    root = Path(root)
    dirs = [root / "images_background", root / "images_evaluation"]
    missing = [d.name for d in dirs if not d.is_dir()]
    if missing:
        raise DataLayoutError(f"Omniglot: {root} has no {' or '.join(missing)}", OMNIGLOT_LAYOUT)
    chars = sorted(c for d in dirs for a in sorted(d.iterdir()) if a.is_dir() for c in sorted(a.iterdir())
                   if c.is_dir())
    if not chars:
        raise DataLayoutError(f"Omniglot: no <alphabet>/<character>/ folders under {root}", OMNIGLOT_LAYOUT)
    return chars


def read_omniglot(root: str | os.PathLike, size: int = 28, seed: int = 0, train: int = 1100, val: int = 100,
                  rotations: bool = True) -> dict[str, ImageClasses]:
    """Omniglot as in Finn et al. (2017): a seeded shuffle of all characters (regardless of
    alphabet), the first ``train`` for meta-training, the next ``val`` for validation (1200
    meta-training characters in all) and the rest (423 of 1623) for testing; images resized
    to ``size``×``size``, strokes bright on dark; each character also rotated by 90°, 180°
    and 270° as new classes."""
    chars = omniglot_characters(root)
    if len(chars) <= train + val:
        raise DataLayoutError(f"Omniglot: found {len(chars)} characters, need more than train + val = "
                              f"{train + val}", OMNIGLOT_LAYOUT)
    order = torch.randperm(len(chars), generator=torch.Generator().manual_seed(seed)).tolist()
    groups, names = [], []
    for i in order:
        files = sorted(chars[i].glob("*.png"))
        if not files:
            raise DataLayoutError(f"Omniglot: no PNG images in {chars[i]}", OMNIGLOT_LAYOUT)
        images = np.stack([255 - _load_image(f, size, "L") for f in files])
        groups.append(torch.from_numpy(images))
        names.append(f"{chars[i].parent.name}/{chars[i].name}")
    bounds = {"train": (0, train), "val": (train, train + val), "test": (train + val, len(chars))}
    out = {}
    for split, (a, b) in bounds.items():
        classes = ImageClasses.from_groups(groups[a:b], names[a:b])
        out[split] = classes.with_rotations() if rotations else classes
    return out


# ---------------------------------------------------------------------------------------- miniImageNet


def read_miniimagenet(root: str | os.PathLike, size: int = 84) -> dict[str, ImageClasses]:
    """miniImageNet (Vinyals et al. 2016) in Ravi & Larochelle's split, from their CSV files
    and image folder or from the pickle cache; splits 'train', 'val', 'test'."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"miniImageNet: {root} is not a folder", MINIIMAGENET_LAYOUT)
    pickles = {s: root / f"mini-imagenet-cache-{n}.pkl" for s, n in
               (("train", "train"), ("val", "validation"), ("test", "test"))}
    if all(p.exists() for p in pickles.values()):
        return {split: _read_mini_pickle(path) for split, path in pickles.items()}
    csvs = {s: root / f"{s}.csv" for s in ("train", "val", "test")}
    if all(p.exists() for p in csvs.values()):
        return {split: _read_mini_csv(path, root / "images", size) for split, path in csvs.items()}
    raise DataLayoutError(f"miniImageNet: {root} has neither the three CSV files nor the three pickle files",
                          MINIIMAGENET_LAYOUT)


def _read_mini_pickle(path: Path) -> ImageClasses:
    with open(path, "rb") as f:
        data = pickle.load(f)  # a local file the user points at (the format is a pickle)
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        raise DataLayoutError(f"miniImageNet: {path} is not a dict with 'image_data' and 'class_dict'",
                              MINIIMAGENET_LAYOUT)
    images = np.asarray(data["image_data"])
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataLayoutError(f"miniImageNet: {path}: image_data must be N×H×W×3 uint8, got "
                              f"{images.dtype} {images.shape}", MINIIMAGENET_LAYOUT)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    names = sorted(data["class_dict"])
    groups = [tensor[torch.as_tensor(list(data["class_dict"][n]), dtype=torch.long)] for n in names]
    return ImageClasses.from_groups(groups, names)


def _read_mini_csv(path: Path, image_dir: Path, size: int) -> ImageClasses:
    if not image_dir.is_dir():
        raise DataLayoutError(f"miniImageNet: no image folder {image_dir}", MINIIMAGENET_LAYOUT)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["filename", "label"]:
            raise DataLayoutError(f"miniImageNet: {path} must start with the header 'filename,label', got {header}",
                                  MINIIMAGENET_LAYOUT)
        rows = [r for r in reader if r]
    by_label: dict[str, list[str]] = {}
    for filename, label in rows:
        by_label.setdefault(label, []).append(filename)
    names = sorted(by_label)
    groups = []
    for label in names:
        files = [image_dir / name for name in by_label[label]]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise DataLayoutError(f"miniImageNet: {len(absent)} images of {path.name} are missing from {image_dir}, "
                                  f"e.g. {absent[0]}", MINIIMAGENET_LAYOUT)
        groups.append(torch.from_numpy(np.stack([_load_image(f, size, "RGB") for f in files])))
    return ImageClasses.from_groups(groups, names)


# ---------------------------------------------------------------------------------------- digits


def read_digits(size: int = 16, val_fraction: float = 0.3, seed: int = 0) -> dict[str, ImageClasses]:
    """scikit-learn's bundled 8×8 handwritten digits (no download): meta-training on digits
    0-4 with rotations by 90°, 180° and 270° as extra classes (20 classes), validation on
    held-out images of those classes, testing on digits 5-9. Images are upsampled to
    ``size``×``size`` so that four 2×2 poolings fit."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits data set ships with scikit-learn: pip install 'fastlaplace[digits]'") from exc
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.from_numpy(digits.target)
    g = torch.Generator().manual_seed(seed)
    train_groups, val_groups = [], []
    for d in range(5):
        members = images[labels == d]
        perm = torch.randperm(len(members), generator=g)
        n_val = int(len(members) * val_fraction)
        val_groups.append(members[perm[:n_val]])
        train_groups.append(members[perm[n_val:]])
    names = [str(d) for d in range(5)]
    return {
        "train": ImageClasses.from_groups(train_groups, names).with_rotations(),
        "val": ImageClasses.from_groups(val_groups, names).with_rotations(),
        "test": ImageClasses.from_groups([images[labels == d] for d in range(5, 10)], [str(d) for d in range(5, 10)]),
    }


def cached(reader, cache: Path | None, *args, **kwargs) -> dict[str, ImageClasses]:
    """Run ``reader`` once and keep its result in ``cache`` (a torch file) for later runs."""
    if cache is not None and cache.exists():
        state = torch.load(cache, weights_only=True)
        return {s: ImageClasses(v["images"], v["labels"]) for s, v in state.items()}
    splits = reader(*args, **kwargs)
    if cache is not None:
        try:
            buffer = io.BytesIO()
            torch.save({s: {"images": c.images, "labels": c.labels} for s, c in splits.items()}, buffer)
            tmp = cache.with_name(cache.name + ".tmp")
            tmp.write_bytes(buffer.getvalue())
            os.replace(tmp, cache)
        except OSError:  # a read-only data folder: just do without the cache
            pass
    return splits
