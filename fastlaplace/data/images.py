"""Readers for the standard on-disk formats of few-shot image data sets.

Nothing is downloaded: each reader takes a folder in the layout its data set is
distributed in, checks it, and returns :class:`ImageClasses` per split. A missing or
malformed folder raises :class:`DataLayoutError` showing the expected layout.

Data folders are not trusted to be well formed: every image is verified by Pillow and
refused above :data:`MAX_PIXELS` (a decompression bomb) before it is decoded, file names
from CSV files must stay inside ``ROOT/images``, pickles are read only when the caller
allows it (loading a pickle can run code), and a decoded cache is used only while it is
well formed and its source files are unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_write
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

# Larger than any photograph of these data sets; far smaller than what a crafted header can claim.
MAX_PIXELS = 40_000_000

PICKLE_ADVICE = """\
loading a pickle can run arbitrary code, so pickles are only read with --allow-pickle (use it only for \
files you trust); or convert them once into a cache that loads without running code: \
python -m fastlaplace.data.convert ROOT"""


class DataLayoutError(FileNotFoundError):
    """The data folder does not have the expected layout."""

    def __init__(self, problem: str, layout: str | None = None):
        super().__init__(f"{problem}\nExpected layout:\n{layout}" if layout else problem)


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading image files needs Pillow: pip install 'fastlaplace[images]'") from exc
    return Image


def _load_image(path: Path, size: int, mode: str) -> np.ndarray:
    """[C, size, size] uint8; :class:`DataLayoutError` naming the file if it is not a sound image."""
    Image = _pil()
    try:
        with Image.open(path) as im:  # reads the header only
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise DataLayoutError(f"{path}: {im.size[0]}×{im.size[1]} pixels is more than the limit of "
                                      f"{MAX_PIXELS} (a corrupted or malicious image?)")
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable: open it again to decode
            im = im.convert(mode)
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except DataLayoutError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError) as exc:
        raise DataLayoutError(f"{path} is not a readable image ({str(exc).strip() or type(exc).__name__})") from exc
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


def _mini_files(root: Path) -> tuple[str, dict[str, Path]]:
    """Which format ``root`` holds ("pickle" or "csv") and its per-split files."""
    pickles = {s: root / f"mini-imagenet-cache-{n}.pkl" for s, n in
               (("train", "train"), ("val", "validation"), ("test", "test"))}
    if all(p.is_file() for p in pickles.values()):
        return "pickle", pickles
    csvs = {s: root / f"{s}.csv" for s in ("train", "val", "test")}
    if all(p.is_file() for p in csvs.values()):
        return "csv", csvs
    raise DataLayoutError(f"miniImageNet: {root} has neither the three CSV files nor the three pickle files",
                          MINIIMAGENET_LAYOUT)


def miniimagenet_sources(root: str | os.PathLike) -> list[Path]:
    """The files :func:`read_miniimagenet` reads (for the cache's fingerprint)."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"miniImageNet: {root} is not a folder", MINIIMAGENET_LAYOUT)
    kind, files = _mini_files(root)
    images = root / "images"
    extra = sorted(images.iterdir()) if kind == "csv" and images.is_dir() else []
    return [*files.values(), *extra]


def read_miniimagenet(root: str | os.PathLike, size: int = 84, allow_pickle: bool = False) -> dict[str, ImageClasses]:
    """miniImageNet (Vinyals et al. 2016) in Ravi & Larochelle's split, from their CSV files
    and image folder or from the pickle cache (only with ``allow_pickle``: a pickle can run
    code when loaded); splits 'train', 'val', 'test'."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"miniImageNet: {root} is not a folder", MINIIMAGENET_LAYOUT)
    kind, files = _mini_files(root)
    if kind == "pickle":
        if not allow_pickle:
            raise DataLayoutError(f"miniImageNet: {root} holds the pickle files mini-imagenet-cache-*.pkl; "
                                  + PICKLE_ADVICE.replace("ROOT", str(root)))
        return {split: _read_mini_pickle(path) for split, path in files.items()}
    return {split: _read_mini_csv(path, root / "images", size) for split, path in files.items()}


def _read_mini_pickle(path: Path) -> ImageClasses:
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)  # the caller allowed it: a file the user trusts
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as exc:
        raise DataLayoutError(f"miniImageNet: {path} is not a readable pickle ({exc})", MINIIMAGENET_LAYOUT) from exc
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        raise DataLayoutError(f"miniImageNet: {path} is not a dict with 'image_data' and 'class_dict'",
                              MINIIMAGENET_LAYOUT)
    images = data["image_data"]
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataLayoutError(f"miniImageNet: {path}: image_data must be an N×H×W×3 uint8 array, got "
                              f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}",
                              MINIIMAGENET_LAYOUT)
    classes = data["class_dict"]
    if not isinstance(classes, dict) or not classes:
        raise DataLayoutError(f"miniImageNet: {path}: class_dict must be a non-empty dict", MINIIMAGENET_LAYOUT)
    n = images.shape[0]
    names = sorted(classes, key=str)
    groups = []
    for name in names:
        index = classes[name]
        if not isinstance(index, (list, tuple, range, np.ndarray)) or len(index) == 0 or not all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < n for i in index):
            raise DataLayoutError(f"miniImageNet: {path}: class_dict[{name!r}] must be a non-empty list of indices "
                                  f"in 0..{n - 1}", MINIIMAGENET_LAYOUT)
        groups.append(torch.from_numpy(images[np.asarray(index, dtype=np.int64)]).permute(0, 3, 1, 2).contiguous())
    return ImageClasses.from_groups(groups, [str(name) for name in names])


def _read_mini_csv(path: Path, image_dir: Path, size: int) -> ImageClasses:
    if not image_dir.is_dir():
        raise DataLayoutError(f"miniImageNet: no image folder {image_dir}", MINIIMAGENET_LAYOUT)
    base = image_dir.resolve()
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != ["filename", "label"]:
                raise DataLayoutError(f"miniImageNet: {path} must start with the header 'filename,label', got "
                                      f"{header}", MINIIMAGENET_LAYOUT)
            rows = [(reader.line_num, r) for r in reader if r]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataLayoutError(f"miniImageNet: {path} is not a readable CSV file ({exc})", MINIIMAGENET_LAYOUT) from exc
    by_label: dict[str, list[Path]] = {}
    for line, row in rows:
        if len(row) != 2 or not row[0] or not row[1]:
            raise DataLayoutError(f"miniImageNet: {path}, line {line}: expected 'filename,label', got {row}",
                                  MINIIMAGENET_LAYOUT)
        file = (image_dir / row[0]).resolve()
        if not file.is_relative_to(base) or file == base:
            raise DataLayoutError(f"miniImageNet: {path}, line {line}: {row[0]!r} is not a file inside {image_dir}",
                                  MINIIMAGENET_LAYOUT)
        by_label.setdefault(row[1], []).append(file)
    if not by_label:
        raise DataLayoutError(f"miniImageNet: {path} lists no images", MINIIMAGENET_LAYOUT)
    names = sorted(by_label)
    groups = []
    for label in names:
        files = by_label[label]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise DataLayoutError(f"miniImageNet: {len(absent)} images of {path.name} are missing from {image_dir}, "
                                  f"e.g. {absent[0]}", MINIIMAGENET_LAYOUT)
        groups.append(torch.from_numpy(np.stack([_load_image(f, size, "RGB") for f in files])))
    return ImageClasses.from_groups(groups, names)


# ---------------------------------------------------------------------------------------- digits


def read_digits(size: int = 16, val_digits: tuple[int, ...] = (3, 4)) -> dict[str, ImageClasses]:
    """scikit-learn's bundled 8×8 handwritten digits (no download), as three disjoint sets of
    classes: meta-training on digits 0-4 except ``val_digits``, validation on ``val_digits``
    (by default 3 and 4), each with its rotations by 90°, 180° and 270° as extra classes
    (12 and 8 classes), and testing on digits 5-9. Validation classes are never meta-trained
    on, so that a setting chosen on them (η, τ, a temperature) is chosen on unseen classes, as
    the test classes are. Images are upsampled to ``size``×``size`` so that four 2×2 poolings fit."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits data set ships with scikit-learn: pip install 'fastlaplace[digits]'") from exc
    if not val_digits or not set(val_digits) < set(range(5)):
        raise ValueError(f"val_digits must be some but not all of the digits 0-4, got {val_digits!r}")
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.from_numpy(digits.target)

    def classes(ds) -> ImageClasses:
        return ImageClasses.from_groups([images[labels == d] for d in ds], [str(d) for d in ds])

    return {
        "train": classes([d for d in range(5) if d not in val_digits]).with_rotations(),
        "val": classes(sorted(val_digits)).with_rotations(),
        "test": classes(range(5, 10)),
    }


def fingerprint(files: list[Path]) -> str:
    """A digest of the names, sizes and modification times of ``files``: changes when any is
    added, removed or rewritten."""
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _from_cache(state, source: str) -> dict[str, ImageClasses] | None:
    """The splits of a cache if it is well formed and made from ``source``, else ``None``."""
    if not isinstance(state, dict) or state.get("source") != source or not isinstance(state.get("splits"), dict):
        return None
    out = {}
    for split, v in state["splits"].items():
        if not isinstance(v, dict) or not all(isinstance(v.get(k), torch.Tensor) for k in ("images", "labels")):
            return None
        images, labels = v["images"], v["labels"]
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.dim() != 1 or labels.dtype != torch.int64 \
                or labels.shape[0] != images.shape[0] or labels.numel() == 0 or int(labels.min()) < 0 \
                or int(labels.max()) >= labels.numel():
            return None
        if not (torch.bincount(labels) > 0).all():  # every class in 0..max has images
            return None
        out[split] = ImageClasses(images, labels)
    return out or None


def cached(reader, cache: Path | None, *args, sources: list[Path] | None = None, **kwargs) -> dict[str, ImageClasses]:
    """Run ``reader`` once and keep its result in ``cache`` (a torch file, loaded without
    running code) for later runs while the ``sources`` files are unchanged."""
    source = fingerprint(sources or [])
    if cache is not None and cache.is_file():
        try:
            splits = _from_cache(torch.load(cache, weights_only=True), source)
        except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError) as exc:
            print(f"note: ignoring the unreadable cache {cache} ({str(exc).splitlines()[0] if str(exc) else exc!r})",
                  file=sys.stderr)
            splits = None
        if splits is not None:
            return splits
        print(f"note: {cache} is stale or malformed; reading the data again", file=sys.stderr)
    splits = reader(*args, **kwargs)
    if cache is not None:
        write_cache(cache, splits, source)
    return splits


def write_cache(cache: Path, splits: dict[str, ImageClasses], source: str) -> bool:
    """Best effort (whether it was written): a read-only data folder or a full disk just means no cache."""
    buffer = io.BytesIO()
    torch.save({"source": source, "splits": {s: {"images": c.images, "labels": c.labels} for s, c in splits.items()}},
               buffer)
    try:
        atomic_write(cache, lambda f: f.write(buffer.getvalue()))
    except OSError:
        return False
    return True
