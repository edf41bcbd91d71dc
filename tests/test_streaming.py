"""Streamed ImageFolder data: the same pixels, batches and training as the in-memory path, bounded memory."""

import json

import numpy as np
import pytest
import torch
from conftest import make_idx_dataset, make_image_folder, tiny_config
from PIL import Image

from dart_ee.config import parse_config
from dart_ee.core.errors import ConfigError, DataError
from dart_ee.data import datasets as data
from dart_ee.data import streaming


def _mixed_tree(root, n=12, classes=3):
    """JPEGs and PNGs of several sizes, one grey: what a real folder holds."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(n):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            h, w = (20 + 3 * i, 30 - i)
            arr = rng.integers(0, 256, (h, w) if i == 5 else (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def test_streamed_images_equal_the_decoded_ones_at_any_index(tmp_path):
    root = _mixed_tree(tmp_path / "tree")
    mem_train, mem_test = data.load_dataset("imagefolder", root, use_cache=False, size=16)
    st_train, st_test = data.load_dataset("imagefolder", root, size=16, stream=True)
    assert isinstance(st_train.x, streaming.FileImages) and st_train.x.shape == mem_train.x.shape == (12, 3, 16, 16)
    assert st_train.classes == mem_train.classes and (st_train.y == mem_train.y).all()
    np.testing.assert_array_equal(st_train.x[:], mem_train.x)
    np.testing.assert_array_equal(st_test.x[np.array([7, 2, 2])], mem_test.x[[7, 2, 2]])
    np.testing.assert_array_equal(st_train.x[3], mem_train.x[3])
    sub = st_train.subset(np.array([1, 4]))
    assert isinstance(sub.x, streaming.FileImages)  # a subset stays on disk
    np.testing.assert_array_equal(sub.x[:], mem_train.x[[1, 4]])
    np.testing.assert_array_equal(sub.decoded().x, mem_train.x[[1, 4]])


def test_batches_come_in_order_from_worker_processes(tmp_path):
    root = _mixed_tree(tmp_path / "tree")
    train, _ = data.load_dataset("imagefolder", root, size=16, stream=True)
    order = [np.array([5, 0, 3]), np.array([11]), np.array([2, 2, 9, 1])]
    for workers in (0, 2):
        got = list(streaming.batches(train.x, order, workers))
        assert [g.dtype for g in got] == [torch.uint8] * 3
        for idx, g in zip(order, got):
            np.testing.assert_array_equal(g.numpy(), train.x[idx])
    arr = train.decoded().x  # an in-memory array is sliced, the same batches
    for idx, g in zip(order, streaming.batches(arr, order)):
        np.testing.assert_array_equal(g.numpy(), arr[idx])


def test_a_streamed_run_trains_and_traces_exactly_as_an_in_memory_one(tmp_path):
    from dart_ee.runs import tracing
    from dart_ee.runs.run import Run
    from dart_ee.training.train import train

    make_image_folder(tmp_path / "tree", per_class=24, classes=3, size=20)
    out = {}
    for stream in (False, True):
        raw = tiny_config(tmp_path / "tree", epochs=2, batch_size=12)
        raw["data"].update(dataset="imagefolder", image_size=16, stream=stream, workers=2, cal_fraction=0.25)
        run_dir = tmp_path / f"run{int(stream)}"
        metrics = train(parse_config(raw), run_dir)
        tracing.trace_run(run_dir)
        out[stream] = (metrics, Run(run_dir).model().state_dict(), np.load(run_dir / "trace_test.npz"))
    (m0, w0, t0), (m1, w1, t1) = out[False], out[True]
    assert m1["streamed"] and not m0["streamed"] and m1["decode_workers"] == 2
    for key in ("exit_test_accuracy", "exit_cal_accuracy", "exit_macs", "steps_per_epoch"):
        assert m0[key] == m1[key], key
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0)
    for k in ("probs", "alpha", "terms"):
        np.testing.assert_array_equal(t0[k], t1[k])


def test_image_size_resizes_in_memory_data_and_the_model_follows(tmp_path):
    from dart_ee.training.train import build_model, prepare_splits

    make_idx_dataset(tmp_path / "data" / "mnist", n_train=60, n_test=20)
    raw = tiny_config(tmp_path / "data")
    raw["data"]["image_size"] = 32
    cfg = parse_config(raw)
    splits = prepare_splits(cfg, tmp_path / "run")
    assert splits.train.x.shape[1:] == (1, 32, 32) and splits.spec.image_size == 32
    assert splits.spec.crop_pad == round(data.get_spec("mnist").crop_pad * 32 / 28)  # scaled with the image
    model = build_model(cfg, splits.spec)
    assert model(torch.rand(2, 1, 32, 32))[-1].shape == (2, 10)


def test_max_steps_caps_an_epoch(tmp_path):
    from dart_ee.training.train import train

    make_idx_dataset(tmp_path / "data" / "mnist", n_train=200, n_test=40)
    raw = tiny_config(tmp_path / "data", batch_size=16, max_steps=3)
    metrics = train(parse_config(raw), tmp_path / "run")
    assert metrics["steps_per_epoch"] == 3


def test_streaming_errors_name_the_file_and_the_fix(tmp_path):
    make_idx_dataset(tmp_path / "mnist", n_train=20, n_test=10)
    with pytest.raises(DataError, match="data.stream"):
        data.load_dataset("mnist", tmp_path, stream=True)
    raw = tiny_config(tmp_path)
    raw["data"]["dataset"] = "imagefolder"
    with pytest.raises(ConfigError, match="image_size"):
        parse_config(raw)
    root = _mixed_tree(tmp_path / "tree")
    train, _ = data.load_dataset("imagefolder", root, size=16, stream=True)
    bad = root / "train" / "c0" / "000.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="000.jpg.*unreadable"):
        train.x[:]
    bad.unlink()
    with pytest.raises(DataError, match="000.jpg.*tree changed"):
        train.x[0]
    with pytest.raises(DataError, match="empty class folder"):
        (root / "test" / "c9").mkdir()
        data.load_dataset("imagefolder", root, size=16, stream=True)


def test_make_tree_writes_a_learnable_imagefolder(tmp_path):
    from dart_ee.bench.data_speed import make_tree

    rec = make_tree(tmp_path / "t", n_train=40, n_test=20, size=24, classes=4, processes=1)
    train, test = data.load_dataset("imagefolder", tmp_path / "t", size=24, stream=True)
    assert (len(train), len(test), train.classes) == (40, 20, ("class00", "class01", "class02", "class03"))
    assert rec["bytes"] > 0 and train.x[0].shape == (3, 24, 24)
    with pytest.raises(ConfigError, match="not empty"):
        make_tree(tmp_path / "t", 4, 4)


@pytest.mark.slow
def test_data_speed_measures_both_paths(tmp_path):
    from dart_ee.bench.data_speed import data_speed, make_tree

    make_tree(tmp_path / "t", n_train=400, n_test=40, size=16, classes=4, processes=1)
    raw = tiny_config(tmp_path / "t", batch_size=32)
    raw["data"].update(dataset="imagefolder", image_size=16, workers=1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(raw))
    rec = data_speed(cfg, steps=3, cap_mb=1e6)
    assert [r["mode"] for r in rec["rows"]] == ["memory", "stream"]
    for r in rec["rows"]:
        assert r["steps"] == 3 and r["images_per_s"] > 0 and r["peak_pss_mb"] > 50 and r["under_cap"]
    assert rec["rows"][1]["workers"] == 1 and rec["stream_vs_memory"] > 0


def test_a_share_of_a_batch_is_augmented_as_in_the_whole_batch():
    """Each torchrun process decodes only its share of a global batch and must augment it as one process would."""
    x = torch.rand(10, 3, 12, 12)
    whole = data.augment(x, 2, True, torch.Generator().manual_seed(5))
    part = data.augment(x[4:7], 2, True, torch.Generator().manual_seed(5), batch=10, share=slice(4, 7))
    torch.testing.assert_close(part, whole[4:7], rtol=0, atol=0)


def test_an_uncompressed_tar_streams_like_its_tree_and_a_gzipped_one_is_refused(tmp_path):
    import tarfile

    root = _mixed_tree(tmp_path / "tree")
    with tarfile.open(tmp_path / "tree.tar", "w") as tar:
        tar.add(root, arcname="tree")
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tar:
        tar.add(root, arcname="tree")
    tree = data.load_dataset("imagefolder", root, size=16, stream=True)
    from_tar = data.load_dataset("imagefolder", tmp_path / "tree.tar", size=16, stream=True)
    in_memory = data.load_dataset("imagefolder", tmp_path / "tree.tar", use_cache=False, size=16)
    for a, b, c in zip(tree, from_tar, in_memory):
        assert a.classes == b.classes == c.classes and (a.y == b.y).all() and (b.y == c.y).all()
        assert b.x.spans is not None
        np.testing.assert_array_equal(b.x[:], a.x[:])
        np.testing.assert_array_equal(b.x[:], c.x)
        np.testing.assert_array_equal(b.subset(np.array([3, 0])).x[:], c.x[[3, 0]])
    with pytest.raises(DataError, match="gunzip"):
        data.load_dataset("imagefolder", tmp_path / "tree.tar.gz", size=16, stream=True)
    train = from_tar[0]
    with open(tmp_path / "tree.tar", "r+b") as f:
        f.truncate(int(train.x.spans[:, 0].max()))  # the last member's bytes are gone
    with pytest.raises(DataError, match="truncated"):
        train.x[int(train.x.spans[:, 0].argmax())]
