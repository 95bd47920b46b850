"""Data loaders and batching: file formats on tiny files written here, deterministic streams."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from lore_jax.training import data

# --------------------------------------------------------------------------- IDX / MNIST


def _write_idx(path, array, type_code=0x08, compress=False):
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + body)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    path = tmp_path / ("x.idx3-ubyte" + (".gz" if compress else ""))
    _write_idx(path, images, compress=compress)
    out = data.read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, images)


def test_read_idx_big_endian_ints(tmp_path):
    values = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    _write_idx(tmp_path / "ints", values, type_code=0x0C)
    out = data.read_idx(tmp_path / "ints")
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, values)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros((4, 4), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(data.DataError, match="truncated"):
        data.read_idx(tmp_path / "short")
    with pytest.raises(data.DataError, match="not found"):
        data.read_idx(tmp_path / "missing")


def test_mnist_from_tiny_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    tr_x, te_x = (rng.integers(0, 256, (n, 6, 5), dtype=np.uint8) for n in (7, 3))
    tr_y, te_y = np.array([0, 1, 2, 3, 4, 5, 9], np.uint8), np.array([9, 0, 1], np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", tr_x, compress=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", tr_y)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", te_x)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", te_y)
    ds = data.mnist(tmp_path)
    assert ds.kind == "classification" and ds.num_outputs == 10
    assert ds.x_train.shape == (7, 6, 5, 1) and ds.x_train.dtype == np.float32
    np.testing.assert_allclose(ds.x_train[..., 0], tr_x / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, te_y)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(data.DataError, match="t10k-labels"):
        data.mnist(tmp_path)


# --------------------------------------------------------------------------- CIFAR-10


def _write_cifar_batch(path, images_hwc, labels):
    rows = images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)  # channel-major
    with open(path, "wb") as f:
        pickle.dump({b"data": rows, b"labels": list(labels), b"batch_label": b"x"}, f)


def test_cifar10_from_tiny_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    _write_cifar_batch(root / "data_batch_1", imgs[:2], [3, 4])
    _write_cifar_batch(root / "data_batch_2", imgs[2:4], [5, 6])
    _write_cifar_batch(root / "test_batch", imgs[4:], [7])
    ds = data.cifar10(tmp_path)  # the parent directory works too
    assert ds.x_train.shape == (4, 32, 32, 3) and ds.x_test.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(ds.x_train, imgs[:4] / 255.0, rtol=1e-6)  # HWC, not CHW
    np.testing.assert_array_equal(ds.y_train, [3, 4, 5, 6])
    np.testing.assert_array_equal(ds.y_test, [7])
    with pytest.raises(data.DataError, match="not found"):
        data.cifar10(tmp_path / "nowhere")


# --------------------------------------------------------------------------- text, digits


def test_char_corpus_windows(tmp_path):
    text = "abcdefghij" * 20
    (tmp_path / "t.txt").write_text(text)
    ds = data.char_corpus(tmp_path / "t.txt", seq_len=8, test_fraction=0.25)
    assert ds.kind == "language_model" and ds.vocab == "abcdefghij" and ds.num_outputs == 10
    assert ds.x_train.shape[1:] == (8,) and ds.y_train.shape == ds.x_train.shape
    np.testing.assert_array_equal(ds.x_train[:, 1:], ds.y_train[:, :-1])  # shifted by one
    decoded = "".join(ds.vocab[i] for i in ds.x_train[0])
    assert decoded == text[:8]
    # Consecutive windows start seq_len // 2 apart.
    assert "".join(ds.vocab[i] for i in ds.x_train[1]) == text[4:12]
    with pytest.raises(data.DataError, match="not found"):
        data.char_corpus(tmp_path / "missing.txt")
    (tmp_path / "tiny.txt").write_text("abc")
    with pytest.raises(data.DataError, match="too few"):
        data.char_corpus(tmp_path / "tiny.txt", seq_len=8)


def test_bundled_corpus_and_digits():
    ds = data.char_corpus(seq_len=32)
    assert ds.x_train.shape[0] > 100 and ds.x_test.shape[0] > 5 and ds.num_outputs > 30
    a, b = data.digits(), data.digits()
    assert a.x_train.shape == (1437, 8, 8, 1) and a.x_test.shape == (360, 8, 8, 1)
    assert a.x_train.max() <= 1.0
    np.testing.assert_array_equal(a.y_test, b.y_test)  # deterministic split


# --------------------------------------------------------------------------- batching


def test_stream_epochs_are_permutations_and_seeded():
    x = np.arange(10)[:, None]
    s = data.BatchStream(x, np.arange(10), batch_size=3, seed=5)
    assert s.batches_per_epoch == 3
    epoch0 = np.concatenate([next(s)[1] for _ in range(3)])
    assert s.position == data.DataPosition(1, 0)
    assert len(set(epoch0.tolist())) == 9  # 9 distinct examples, remainder dropped
    epoch1 = np.concatenate([next(s)[1] for _ in range(3)])
    assert not np.array_equal(epoch0, epoch1)  # a fresh order each epoch
    other = data.BatchStream(x, np.arange(10), batch_size=3, seed=6)
    assert not np.array_equal(np.concatenate([next(other)[1] for _ in range(3)]), epoch0)


def test_stream_resumes_exactly_from_position():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((23, 2)), np.arange(23)
    full = data.BatchStream(x, y, batch_size=4, seed=3)
    reference = [next(full)[1] for _ in range(17)]
    first = data.BatchStream(x, y, batch_size=4, seed=3)
    for _ in range(7):
        next(first)
    resumed = data.BatchStream(x, y, batch_size=4, seed=3, position=tuple(first.position))
    rest = [next(resumed)[1] for _ in range(10)]
    for a, b in zip(reference[7:], rest, strict=True):
        np.testing.assert_array_equal(a, b)
    # An index past the end of an epoch is normalised into the next epoch.
    assert data.BatchStream(x, y, 4, 3, position=(0, 7)).position == data.DataPosition(1, 2)


def test_stream_rejects_bad_batch_size():
    with pytest.raises(data.DataError, match="batch size"):
        data.BatchStream(np.zeros((3, 1)), np.zeros(3), batch_size=4, seed=0)
