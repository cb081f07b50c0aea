"""Readers of the standard on-disk formats, on small fixtures made here, and episode sampling."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fastlaplace.config import Config
from fastlaplace.data import EpisodeSampler, ImageClasses, SinusoidTasks
from fastlaplace.data.images import DataLayoutError, read_digits, read_miniimagenet, read_omniglot
from fastlaplace.datasets import DATASETS


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def omniglot_root(tmp_path):
    rng = np.random.default_rng(0)
    for archive, alphabets in (("images_background", ["Latin", "Greek"]), ("images_evaluation", ["Runic"])):
        for alphabet in alphabets:
            for c in range(4):
                for k in range(3):
                    img = (rng.random((105, 105)) > 0.5).astype(np.uint8) * 255
                    write_png(tmp_path / archive / alphabet / f"character{c:02d}" / f"{c}_{k:02d}.png", img)
    return tmp_path


def test_omniglot_reader(omniglot_root):
    splits = read_omniglot(omniglot_root, train=6, val=2, seed=0)
    assert {s: c.num_classes for s, c in splits.items()} == {"train": 24, "val": 8, "test": 16}  # × 4 rotations
    assert splits["train"].image_shape == (1, 28, 28)
    assert splits["train"].images.dtype == torch.uint8
    names = {s: {n.split("@")[0] for n in c.names} for s, c in splits.items()}
    assert not names["train"] & names["test"] and not names["train"] & names["val"]
    # the split is a seeded shuffle over all characters, regardless of alphabet
    assert read_omniglot(omniglot_root, train=6, val=2, seed=0)["test"].names == splits["test"].names
    assert read_omniglot(omniglot_root, train=6, val=2, seed=1)["test"].names != splits["test"].names
    # a rotated class is the original rotated
    base = splits["train"]
    torch.testing.assert_close(base.images[base.members[6]], torch.rot90(base.images[base.members[0]], 1, (2, 3)))


def test_omniglot_missing_folder_shows_layout(tmp_path):
    with pytest.raises(DataLayoutError, match="images_background") as err:
        read_omniglot(tmp_path)
    assert "Expected layout" in str(err.value)


def make_mini_csv(root, classes=3, per_class=4, size=84):
    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        lines = ["filename,label"]
        for c in range(classes):
            for k in range(per_class):
                name = f"{split}{c}_{k}.jpg"
                shape = (size, size, 3) if k else (100, 120, 3)  # one larger image, resized on reading
                write_png(root / "images" / name, rng.integers(0, 255, shape, dtype=np.uint8))
                lines.append(f"{name},n0{split}{c}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def test_miniimagenet_csv_reader(tmp_path):
    make_mini_csv(tmp_path)
    splits = read_miniimagenet(tmp_path)
    for s in ("train", "val", "test"):
        assert splits[s].num_classes == 3 and splits[s].images.shape == (12, 3, 84, 84)


def test_miniimagenet_pickle_reader(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("train", "validation", "test"):
        data = {"image_data": rng.integers(0, 255, (10, 84, 84, 3), dtype=np.uint8),
                "class_dict": {"n01": list(range(0, 5)), "n02": list(range(5, 10))}}
        with open(tmp_path / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
            pickle.dump(data, f)
    splits = read_miniimagenet(tmp_path, allow_pickle=True)
    assert splits["val"].num_classes == 2 and splits["test"].images.shape == (10, 3, 84, 84)
    test = splits["test"]  # the last file written: `data` holds its contents
    expected = torch.from_numpy(data["image_data"][5]).permute(2, 0, 1)
    torch.testing.assert_close(test.images[test.members[1][0]], expected)


@pytest.mark.parametrize("damage", ["header", "missing image", "nothing"])
def test_miniimagenet_malformed(tmp_path, damage):
    if damage != "nothing":
        make_mini_csv(tmp_path)
    if damage == "header":
        (tmp_path / "val.csv").write_text("file,class\nx.jpg,n01\n")
    elif damage == "missing image":
        next((tmp_path / "images").glob("test*")).unlink()
    with pytest.raises(DataLayoutError, match="Expected layout"):
        read_miniimagenet(tmp_path)


def test_digits_reader():
    splits = read_digits()
    # validation classes are held out of meta-training: digits 3 and 4 and their rotations
    assert splits["train"].num_classes == 12 and splits["val"].num_classes == 8
    assert {n.split("@")[0] for n in splits["train"].names} == {"0", "1", "2"}
    assert {n.split("@")[0] for n in splits["val"].names} == {"3", "4"}
    assert splits["test"].num_classes == 5 and splits["test"].names == ["5", "6", "7", "8", "9"]
    assert splits["train"].image_shape == (1, 16, 16)
    with pytest.raises(ValueError, match="val_digits"):
        read_digits(val_digits=(0, 1, 2, 3, 4))


def test_episode_sampler():
    classes = ImageClasses.from_groups([torch.full((6, 1, 4, 4), c, dtype=torch.uint8) for c in range(7)])
    sampler = EpisodeSampler(classes, ways=5, shots=2, query=3)
    xs, ys, xq, yq = sampler.sample(4, torch.Generator().manual_seed(0))
    assert xs.shape == (4, 10, 1, 4, 4) and xq.shape == (4, 15, 1, 4, 4)
    assert ys.shape == (4, 10) and int(ys.max()) == 4 and (torch.bincount(yq[0]) == 3).all()
    # labels are consistent between support and query within a task: same class, same label
    for t in range(4):
        for label in range(5):
            assert xs[t][ys[t] == label].unique().numel() == 1
            assert torch.equal(xs[t][ys[t] == label].unique(), xq[t][yq[t] == label].unique())
    with pytest.raises(ValueError, match="at least 8 classes"):
        EpisodeSampler(classes, ways=8, shots=1, query=1)
    with pytest.raises(ValueError, match="fewer than shots"):
        EpisodeSampler(classes, ways=5, shots=4, query=3)


def image_problem(dataset: str, **settings):
    """The data set's problem, built as a run of these settings builds it."""
    return DATASETS[dataset].problem(Config(dataset=dataset, **settings).resolved())


def test_image_problem_digits():
    problem = image_problem("digits", ways=5, shots=1, query=2, filters=8)
    batch = problem.sample("test", 3, torch.Generator().manual_seed(0))
    assert batch.x_support.shape == (3, 5, 1, 16, 16) and batch.y_query.shape == (3, 10)
    model = problem.build_model()
    assert model(batch.x_support[0]).shape == (5, 5)


def test_sinusoid_tasks():
    tasks = SinusoidTasks()
    b = tasks.sample(50, torch.Generator().manual_seed(0), support_range=(-10, -6))
    assert b.x_support.shape == (50, 10, 1) and float(b.x_support.max()) <= -6
    assert float(b.amplitude.min()) >= 0.1 and float(b.amplitude.max()) <= 5.0
    torch.testing.assert_close(b.y_query, b.amplitude[:, None, None] * torch.sin(b.x_query - b.phase[:, None, None]))
    with pytest.raises(ValueError):
        tasks.sample(0)


def test_train_cli_on_miniimagenet_pickles(tmp_path):
    """The whole image path from an on-disk data set: read, train LLAMA two iterations, evaluate."""
    import json
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    for name in ("train", "validation", "test"):
        data = {"image_data": rng.integers(0, 255, (12, 84, 84, 3), dtype=np.uint8),
                "class_dict": {f"n{c:02d}": list(range(2 * c, 2 * c + 2)) for c in range(6)}}
        with open(tmp_path / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
            pickle.dump(data, f)
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "fastlaplace.train", "--dataset", "miniimagenet", "--data-root", str(tmp_path),
         "--method", "llama", "--iterations", "2", "--meta-batch", "2", "--inner-steps", "1", "--test-inner-steps", "1",
         "--query", "1", "--filters", "4", "--eval-tasks", "4", "--out", str(out), "--no-progress",
         "--allow-pickle"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads((out / "results.json").read_text())
    assert result["metric"] == "accuracy" and 0 <= result["test"]["1"]["mean"] <= 1
    assert (tmp_path / "fastlaplace-miniimagenet-84.pt").exists()  # decoded cache beside the data


# ---------------------------------------------------------------------------------------- hostile data


def png_claiming(path, width, height):
    """A tiny PNG file whose header claims ``width``×``height`` pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("damage, message", [
    ("text", "not a readable image"),
    ("truncated", "not a readable image"),
    ("bomb", "not a readable image|more than the limit"),
    ("large", "more than the limit"),
])
def test_omniglot_bad_image_names_the_file(omniglot_root, damage, message):
    victim = sorted(omniglot_root.glob("images_background/*/*/*.png"))[5]
    if damage == "text":
        victim.write_text("this is not an image")
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:60])
    elif damage == "bomb":
        png_claiming(victim, 100_000, 100_000)
    else:
        png_claiming(victim, 8000, 8000)  # under Pillow's own limit, over ours
    with pytest.raises(DataLayoutError, match=message) as err:
        read_omniglot(omniglot_root, train=6, val=2)
    assert victim.name in str(err.value)


def write_mini_pickles(root, images=None, class_dict=None, test_size=84):
    rng = np.random.default_rng(4)
    for name in ("train", "validation", "test"):
        size = test_size if name == "test" else 84
        data = {"image_data": rng.integers(0, 255, (12, size, size, 3), dtype=np.uint8) if images is None else images,
                "class_dict": class_dict or {f"n{c:02d}": list(range(2 * c, 2 * c + 2)) for c in range(6)}}
        with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
            pickle.dump(data, f)


@pytest.mark.parametrize("images, class_dict, message", [
    (np.zeros((4, 84, 84, 4), np.uint8), None, "N×H×W×3 uint8"),
    (np.zeros((4, 84, 84), np.uint8), None, "N×H×W×3 uint8"),
    (np.zeros((4, 84, 84, 3), np.float32), None, "N×H×W×3 uint8"),
    ([[1, 2, 3]], None, "N×H×W×3 uint8"),
    (np.zeros((4, 84, 84, 3), np.uint8), {"a": [0, 1], "b": [2, 4]}, "indices in 0..3"),
    (np.zeros((4, 84, 84, 3), np.uint8), {"a": [0, 1], "b": [-1]}, "indices in 0..3"),
    (np.zeros((4, 84, 84, 3), np.uint8), {"a": [0, 1], "b": []}, "non-empty list"),
    (np.zeros((4, 84, 84, 3), np.uint8), {"a": [0, 1], "b": "23"}, "non-empty list"),
    (np.zeros((4, 84, 84, 3), np.uint8), {"a": [0, 1], "b": [True]}, "non-empty list"),
])
def test_miniimagenet_malformed_pickle(tmp_path, images, class_dict, message):
    write_mini_pickles(tmp_path, images, class_dict)
    with pytest.raises(DataLayoutError, match=message):
        read_miniimagenet(tmp_path, allow_pickle=True)


def test_pickles_need_an_explicit_opt_in_or_a_conversion(tmp_path, capsys):
    from fastlaplace.data import convert
    from fastlaplace.data.loaders import miniimagenet_splits

    write_mini_pickles(tmp_path)
    with pytest.raises(DataLayoutError, match="--allow-pickle.*python -m fastlaplace.data.convert"):
        miniimagenet_splits(str(tmp_path))
    convert.main([str(tmp_path)])
    splits = miniimagenet_splits(str(tmp_path))  # from the converted cache, no pickle read
    assert splits["test"].num_classes == 6 and splits["test"].images.shape == (12, 3, 84, 84)
    write_mini_pickles(tmp_path, test_size=32)  # the pickles changed: the cache is stale, pickles refused again
    with pytest.raises(DataLayoutError, match="--allow-pickle"):
        miniimagenet_splits(str(tmp_path))


def test_split_of_another_image_size_fails_before_training(tmp_path):
    from fastlaplace.train import main

    write_mini_pickles(tmp_path, test_size=32)
    with pytest.raises(SystemExit, match="error: miniimagenet: the splits' images differ in shape"):
        main(["--dataset", "miniimagenet", "--data-root", str(tmp_path), "--allow-pickle", "--out",
              str(tmp_path / "run"), "--no-progress"])
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_split_with_too_few_classes_is_named(tmp_path):
    write_mini_pickles(tmp_path)
    with pytest.raises(DataLayoutError, match="train split: 8-way episodes need at least 8 classes"):
        image_problem("miniimagenet", data_root=str(tmp_path), ways=8, shots=1, query=1, filters=4, allow_pickle=True)
    with pytest.raises(DataLayoutError, match="train split: .* fewer than shots \\+ query = 3"):
        image_problem("miniimagenet", data_root=str(tmp_path), ways=5, shots=1, query=2, filters=4, allow_pickle=True)


@pytest.mark.parametrize("name", ["../secret.png", "../../secret.png", "{abs}", "sub/../../secret.png", "."])
def test_csv_file_names_stay_inside_the_image_folder(tmp_path, name):
    root = tmp_path / "root"
    make_mini_csv(root)
    write_png(tmp_path / "secret.png", np.zeros((84, 84, 3), np.uint8))
    write_png(root / "secret.png", np.zeros((84, 84, 3), np.uint8))
    name = name.format(abs=tmp_path / "secret.png")
    (root / "val.csv").write_text(f"filename,label\n{name},n01\n")
    with pytest.raises(DataLayoutError, match="is not a file inside"):
        read_miniimagenet(root)


@pytest.mark.parametrize("content", ["filename,label\nonly-one-field\n", "filename,label\na.jpg,n01,extra\n",
                                     "filename,label\n", "filename,label\n,n01\n"])
def test_malformed_csv_rows(tmp_path, content):
    make_mini_csv(tmp_path)
    (tmp_path / "test.csv").write_text(content)
    with pytest.raises(DataLayoutError, match="test.csv"):
        read_miniimagenet(tmp_path)


def test_decoded_cache_is_validated_and_invalidated(tmp_path, capsys):
    from fastlaplace.data.loaders import miniimagenet_splits

    make_mini_csv(tmp_path, classes=2, per_class=2)
    cache = tmp_path / "fastlaplace-miniimagenet-84.pt"
    first = miniimagenet_splits(str(tmp_path))
    assert cache.exists()
    # a cache of the wrong shape or of malformed labels is ignored and rebuilt
    state = torch.load(cache, weights_only=True)
    state["splits"]["train"]["labels"] = torch.tensor([0, 7, 1, 1])
    torch.save(state, cache)
    assert torch.equal(miniimagenet_splits(str(tmp_path))["train"].labels, first["train"].labels)
    torch.save({"source": state["source"], "splits": {"train": {"images": torch.zeros(3, 84, 84),
                                                              "labels": torch.zeros(3)}}}, cache)
    assert miniimagenet_splits(str(tmp_path))["train"].images.shape == (4, 3, 84, 84)
    # a cache that would run code is not executed
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Payload()}, cache)
    miniimagenet_splits(str(tmp_path))
    assert not marker.exists()
    assert "note:" in capsys.readouterr().err
    # images gone after caching: the cache is stale and the missing image is reported
    next((tmp_path / "images").glob("test*")).unlink()
    with pytest.raises(DataLayoutError, match="missing"):
        miniimagenet_splits(str(tmp_path))
