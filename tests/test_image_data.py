"""Image folders and CIFAR folders as --data: layouts, decoding, normalisation, refusals."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnmove import BnmoveError
from bnmove.study.data import Streamed, load_dataset


def _write_images(
    root: Path, classes: dict[str, int], size: int = 6, mode: str = "RGB", seed: int = 0
) -> None:
    g = np.random.default_rng(seed)
    for label, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            channels = 3 if mode == "RGB" else 1
            pixels = (g.integers(0, 60, (size, size, channels)) + 60 * label).astype(np.uint8)
            Image.fromarray(pixels if channels == 3 else pixels[:, :, 0], mode).save(folder / f"{i}.png")


def test_train_and_val_folders(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"cat": 6, "dog": 5})
    _write_images(tmp_path / "val", {"cat": 3, "dog": 2}, seed=1)
    data = load_dataset(tmp_path)
    assert isinstance(data.train, Streamed) and isinstance(data.val, Streamed)  # decoded batch by batch
    (train_x, train_y), (val_x, val_y) = data.train.tensors(), data.val.tensors()
    assert train_x.shape == (11, 3, 6, 6) and val_x.shape == (5, 3, 6, 6)
    assert train_y.tolist() == [0] * 6 + [1] * 5 and val_y.tolist() == [0] * 3 + [1] * 2
    # scaled to [0, 1] and normalised per channel with the training split's statistics
    raw = np.stack([np.asarray(Image.open(tmp_path / "train" / "cat" / "0.png"))]).transpose(0, 3, 1, 2) / 255
    train_raw = torch.cat(
        [
            torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32)).permute(2, 0, 1)[None] / 255
            for c in ("cat", "dog")
            for f in sorted((tmp_path / "train" / c).glob("*.png"))
        ]
    )
    mean, std = train_raw.mean((0, 2, 3), keepdim=True), train_raw.std((0, 2, 3), keepdim=True)
    torch.testing.assert_close(train_x[:1], (torch.from_numpy(raw).float() - mean) / std)
    torch.testing.assert_close(train_x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    assert any("normalised per channel" in n for n in data.notes)


def test_one_folder_split_resized_grayscale(tmp_path: Path) -> None:
    _write_images(tmp_path, {"a": 10, "b": 10, "c": 10}, size=9, mode="L")
    data = load_dataset(tmp_path, val_split=0.2, image_size=4)
    assert data.train.tensors()[0].shape == (24, 1, 4, 4) and data.val.tensors()[0].shape == (6, 1, 4, 4)
    assert data.num_classes == 3


def test_image_folder_errors(tmp_path: Path) -> None:
    _write_images(tmp_path / "bad" / "train", {"a": 2, "b": 2})
    (tmp_path / "bad" / "train" / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(BnmoveError, match=r"broken\.png: not a readable image"):
        load_dataset(tmp_path / "bad")
    _write_images(tmp_path / "empty" / "a", {"x": 2})
    (tmp_path / "empty" / "b").mkdir()
    (tmp_path / "empty" / "b" / "readme.txt").write_text("no images")
    with pytest.raises(BnmoveError, match="class folder holds no images"):
        load_dataset(tmp_path / "empty")
    _write_images(tmp_path / "mismatch" / "train", {"a": 2, "b": 2})
    _write_images(tmp_path / "mismatch" / "val", {"a": 2, "c": 2})
    with pytest.raises(BnmoveError, match=r"train and validation class folders differ \(b, c\)"):
        load_dataset(tmp_path / "mismatch")


def _cifar_batch(path: Path, n: int, key: str, seed: int) -> tuple[np.ndarray, list[int]]:
    g = np.random.default_rng(seed)
    data, labels = g.integers(0, 256, (n, 3072)).astype(np.uint8), [int(v) for v in g.integers(0, 10, n)]
    with path.open("wb") as fh:
        pickle.dump(
            {b"batch_label": b"x", b"labels" if key == "labels" else b"fine_labels": labels, b"data": data},
            fh,
        )
    return data, labels


def test_cifar_python_folders(tmp_path: Path) -> None:
    ten = tmp_path / "cifar-10-batches-py"
    ten.mkdir()
    parts = [_cifar_batch(ten / f"data_batch_{i}", 4, "labels", i) for i in range(1, 3)]
    _, test_labels = _cifar_batch(ten / "test_batch", 3, "labels", 9)
    data = load_dataset(ten)
    assert data.train.x.dtype == torch.uint8  # held as bytes, normalised batch by batch
    assert data.train.x.shape == (8, 3, 32, 32) and data.val.x.shape == (3, 3, 32, 32)
    assert data.train.y.tolist() == parts[0][1] + parts[1][1] and data.val.y.tolist() == test_labels
    # pixel layout: 1024 red, then green, then blue, row-major (the CIFAR format); then [0, 1] and
    # normalised per channel with the training split's statistics
    raw = torch.from_numpy(np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)).float() / 255
    mean, std = raw.mean((0, 2, 3), keepdim=True), raw.std((0, 2, 3), keepdim=True)
    torch.testing.assert_close(data.train.tensors()[0], (raw - mean) / std)
    hundred = tmp_path / "cifar-100-python"
    hundred.mkdir()
    _cifar_batch(hundred / "train", 5, "fine", 1)
    _cifar_batch(hundred / "test", 2, "fine", 2)
    (hundred / "meta").write_bytes(pickle.dumps({b"fine_label_names": []}))
    assert load_dataset(hundred).train.x.shape == (5, 3, 32, 32)


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_pickles_never_run_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": [0]}))
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
    )
    with pytest.raises(BnmoveError, match=r"data_batch_1: not a CIFAR batch \(refusing posix\.system"):
        load_dataset(folder)


def test_image_size_scales_and_crops_the_centre_without_distortion(tmp_path: Path) -> None:
    # a 12x6 image (wide): left third red, middle third green, right third blue
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            pixels = np.zeros((6, 12, 3), np.uint8)
            pixels[:, :4, 0], pixels[:, 4:8, 1], pixels[:, 8:, 2] = 200, 200, 200
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    data = load_dataset(tmp_path, val_split=0.3, image_size=6)
    x = data.train.items[0][0]  # type: ignore[union-attr]
    assert x.shape == (3, 6, 6)
    # the centre 6x6 of the wide image: green in the middle columns, hardly any red or blue there
    assert int(x[1, :, 2:4].min()) == 200 and int(x[0, :, 2:4].max()) == 0 and int(x[2, :, 2:4].max()) == 0


def test_images_of_another_size_are_refused_before_training(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 3, "b": 3}, size=6)
    _write_images(tmp_path / "val", {"a": 1, "b": 1}, size=6)
    Image.fromarray(np.zeros((7, 5, 3), np.uint8)).save(tmp_path / "val" / "b" / "odd.png")
    with pytest.raises(BnmoveError, match=r"odd\.png: 5x7, the others 6x6 \(--image-size resizes"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, image_size=6).val.tensors()[0].shape == (3, 3, 6, 6)
