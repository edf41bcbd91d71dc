import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import make_cifar_python, make_idx_dataset, make_image_folder, make_tarball, write_idx

from dart_ee.core.errors import DataError
from dart_ee.data import datasets as data


def test_idx_gzipped_and_plain(tmp_path):
    for gz in (True, False):
        root = make_idx_dataset(tmp_path / f"gz{gz}", gz=gz)
        train, test = data.load_dataset("mnist", root, use_cache=False)
        assert train.x.shape == (200, 1, 28, 28) and train.x.dtype == np.uint8
        assert test.y.shape == (100,) and set(test.y.tolist()) == set(range(10))


def test_fashion_and_kmnist_layouts(tmp_path):
    make_idx_dataset(tmp_path / "FashionMNIST" / "raw")
    make_idx_dataset(tmp_path / "kmnist", gz=False)
    assert len(data.load_dataset("fashion-mnist", tmp_path)[0]) == 200
    assert len(data.load_dataset("kmnist", tmp_path)[1]) == 100


def test_cifar_python_format(tmp_path):
    make_cifar_python(tmp_path)
    train, test = data.load_dataset("cifar10", tmp_path)
    assert train.x.shape == (200, 3, 32, 32) and test.x.shape == (40, 3, 32, 32)
    assert train.classes[0] == "c0"


def test_image_folder_dir_and_tarball(tmp_path):
    tree = make_image_folder(tmp_path / "cifar10", per_class=2, classes=10)
    a_train, a_test = data.load_dataset("cifar10", tmp_path)
    tar = make_tarball(tree, tmp_path / "pack" / "cifar10-jpeg.tar.gz")
    b_train, b_test = data.read_image_folder_tar(tar)
    assert a_train.x.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(a_train.x, b_train.x)
    np.testing.assert_array_equal(a_test.y, b_test.y)
    assert len(data.load_dataset("cifar10", tmp_path / "pack")[0]) == 20


def test_cache_skips_decoding(tmp_path, monkeypatch):
    make_idx_dataset(tmp_path / "mnist")
    first = data.load_dataset("mnist", tmp_path)
    assert list(data.cache_dir().glob("mnist-*.npz"))
    monkeypatch.setitem(data._READERS, "idx", lambda p: (_ for _ in ()).throw(AssertionError("decoded again")))
    second = data.load_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(first[0].x, second[0].x)


def test_data_dir_from_env(tmp_path, monkeypatch):
    make_idx_dataset(tmp_path / "mnist")
    monkeypatch.setenv("DART_DATA", str(tmp_path))
    assert len(data.load_dataset("mnist")[0]) == 200


# -- bad files: every one is a DataError naming the file ---------------------------------------


def test_truncated_idx(tmp_path):
    p = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((10, 28, 28), np.uint8), gz=False)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as e:
        data.read_idx(p)
    assert str(p) in str(e.value)


def test_truncated_gzip(tmp_path):
    p = write_idx(tmp_path / "x-idx3-ubyte.gz", np.zeros((10, 28, 28), np.uint8))
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(DataError, match="x-idx3-ubyte.gz"):
        data.read_idx(p)


def test_wrong_magic(tmp_path):
    p = tmp_path / "bad-idx1-ubyte"
    p.write_bytes(b"\x12\x34\x56\x78" + b"\x00" * 20)
    with pytest.raises(DataError, match="magic"):
        data.read_idx(p)


def test_count_mismatch(tmp_path):
    root = make_idx_dataset(tmp_path / "mnist")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(150, np.uint8))
    with pytest.raises(DataError, match="counts differ"):
        data.load_dataset("mnist", tmp_path)


def test_empty_class_folder(tmp_path):
    make_image_folder(tmp_path / "cifar10")
    os.makedirs(tmp_path / "cifar10" / "train" / "emptyclass")
    with pytest.raises(DataError, match="empty class folder"):
        data.read_image_folder(tmp_path / "cifar10")


def test_unreadable_image(tmp_path):
    make_image_folder(tmp_path / "cifar10")
    bad = tmp_path / "cifar10" / "train" / "class0" / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="unreadable image") as e:
        data.read_image_folder(tmp_path / "cifar10")
    assert "broken.png" in str(e.value)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(DataError, match="DART_DATA"):
        data.resolve_data_dir(None)
    with pytest.raises(DataError, match="mnist not found"):
        data.load_dataset("mnist", tmp_path)


def test_corrupt_tarball_and_cifar_batch(tmp_path):
    tar = tmp_path / "cifar10-jpeg.tar.gz"
    tar.write_bytes(gzip.compress(b"garbage" * 100)[:50])
    with pytest.raises(DataError, match="tarball"):
        data.read_image_folder_tar(tar)
    make_cifar_python(tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04junk")
    with pytest.raises(DataError, match="data_batch_3"):
        data.load_dataset("cifar10", tmp_path / "c")


# -- split and augmentation --------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint():
    a, b = data.make_split(1000, 0.1, 3), data.make_split(1000, 0.1, 3)
    assert a == b and len(a["cal_indices"]) == 100
    assert not set(a["cal_indices"]) & set(a["train_indices"])
    assert data.make_split(1000, 0.1, 4)["cal_indices"] != a["cal_indices"]
    with pytest.raises(DataError):
        data.check_split(a, 999)


def test_augment_shapes_and_determinism():
    x = torch.rand(8, 3, 32, 32)
    a = data.augment(x, 4, True, torch.Generator().manual_seed(0))
    b = data.augment(x, 4, True, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert torch.equal(data.augment(x, 0, False, torch.Generator()), x)


@pytest.mark.parametrize("labels,match", [([12], r"\[0, 10\), found 0\.\.12"), ([-1], r"found -1\.\."),
                                          (["cat"], "must be integers")])
def test_cifar_labels_out_of_range(tmp_path, labels, match):
    root = make_cifar_python(tmp_path, per_batch=4)
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    d = pickle.loads(batch.read_bytes())
    d["labels"] = d["labels"][:3] + labels
    batch.write_bytes(pickle.dumps(d))
    with pytest.raises(DataError, match=match) as e:
        data.read_cifar_python(root / "cifar-10-batches-py")
    assert "data_batch_2" in str(e.value)


def test_float_pixels_are_refused_not_wrapped(tmp_path):
    root = make_cifar_python(tmp_path / "c", per_batch=4)
    batch = root / "cifar-10-batches-py" / "test_batch"
    d = pickle.loads(batch.read_bytes())
    d["data"] = d["data"].astype(np.float32) / 255
    batch.write_bytes(pickle.dumps(d))
    with pytest.raises(DataError, match="pixels are float32"):
        data.read_cifar_python(root / "cifar-10-batches-py")
    # an IDX file of type float (0x0D)
    x = np.random.default_rng(0).random((3, 28, 28)).astype(">f4")
    raw = bytes([0, 0, 0x0D, 3]) + b"".join(int(s).to_bytes(4, "big") for s in x.shape) + x.tobytes()
    (tmp_path / "f.gz").write_bytes(gzip.compress(raw))
    write_idx(tmp_path / "l.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DataError, match="f.gz: pixels are float32"):
        data.read_idx_pair(tmp_path / "f.gz", tmp_path / "l.gz")
    write_idx(tmp_path / "e.gz", np.zeros((0, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "le.gz", np.zeros(0, dtype=np.uint8))
    with pytest.raises(DataError, match="holds no images"):
        data.read_idx_pair(tmp_path / "e.gz", tmp_path / "le.gz")


@pytest.mark.parametrize("classes", [3, 12])
def test_class_count_must_match_the_dataset(tmp_path, classes):
    make_image_folder(tmp_path / "cifar10", per_class=1, classes=classes)
    with pytest.raises(DataError, match=f"{classes} classes .* but cifar10 has 10"):
        data.load_dataset("cifar10", tmp_path, use_cache=False)


@pytest.mark.parametrize("side,match", [(5000, "5000x5000 pixels is too large"), (20000, "decompression bomb")])
def test_huge_image_header_is_refused_before_decoding(tmp_path, side, match):
    import struct
    import zlib

    make_image_folder(tmp_path / "cifar10", per_class=1, classes=10)
    png = next((tmp_path / "cifar10" / "train").rglob("*.png"))
    raw = bytearray(png.read_bytes())
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4: ihdr + 12] = struct.pack(">II", side, side)  # claims side x side pixels
    raw[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr: ihdr + 17])))
    png.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=match):
        data.read_image_folder(tmp_path / "cifar10")
