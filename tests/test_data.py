"""Data loaders and batching: file formats on tiny files written here, deterministic streams,
the byte-level corpus against the files read again with plain Python."""

import gzip
import hashlib
import os
import pickle
import struct
import sysconfig
from pathlib import Path

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


# --------------------------------------------------------------------------- byte-level text


def _u(name, salt):
    """The documented hash, written out again: sha256(salt NUL name), 8 bytes / 2**64."""
    return int.from_bytes(hashlib.sha256(f"{salt}\0{name}".encode()).digest()[:8],
                          "big") / 2**64


def _windows_of(raw: bytes, seq_len: int) -> np.ndarray:
    n = len(raw) // (seq_len + 1)
    return np.array(list(raw[:n * (seq_len + 1)]), np.int32).reshape(n, seq_len + 1)


def _assert_windows(ds, train: bytes, test: bytes, seq_len: int):
    for x, y, raw in ((ds.x_train, ds.y_train, train), (ds.x_test, ds.y_test, test)):
        ref = _windows_of(raw, seq_len)
        np.testing.assert_array_equal(x, ref[:, :-1])
        np.testing.assert_array_equal(y, ref[:, 1:])


def _joined(root, names):
    return b"\0".join((Path(root) / n).read_bytes() for n in sorted(names))


def test_text_corpus_default_is_the_standard_library_source():
    seq_len = 64
    ds = data.text_corpus(seq_len=seq_len)
    root = Path(sysconfig.get_paths()["stdlib"])
    # Every .py file outside test packages and site-packages, found with plain Python.
    every = set()
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("test", "tests", "idle_test",
                                                      "site-packages")]
        every |= {(Path(directory) / n).relative_to(root).as_posix() for n in names
                  if n.endswith(".py")}
    train, test = ds.files
    assert not set(train) & set(test) and set(train) | set(test) <= every
    assert all(_u(n, "split") < 0.1 for n in test) and all(_u(n, "split") >= 0.1 for n in train)
    # The 4 MiB cap, filled in the documented order: each file that still fits.
    budget, taken = 4 * 2**20, set()
    for n in sorted(every, key=lambda n: _u(n, "take")):
        size = (root / n).stat().st_size
        if size <= budget:
            taken.add(n)
            budget -= size
    assert set(train) | set(test) == taken and budget < 2**14
    # The tokens are the files' bytes, NUL between files, cut into 65-byte windows.
    assert ds.num_outputs == 256 and ds.kind == "language_model" and ds.vocab is None
    assert ds.x_train.dtype == np.int32 and ds.x_train.shape[1:] == (seq_len,)
    _assert_windows(ds, _joined(root, train), _joined(root, test), seq_len)
    again = data.text_corpus(seq_len=seq_len)
    assert again.files == ds.files
    np.testing.assert_array_equal(again.x_test, ds.x_test)


def _write_tree(root: Path) -> dict[str, bytes]:
    """40 small UTF-8 files in nested directories, plus files the loader must skip."""
    rng = np.random.default_rng(0)
    written = {}
    for i in range(40):
        name = f"{'ab'[i % 2]}/{i % 3}/f{i}.{'txt' if i % 4 else 'md'}"
        body = f"file {i} é ∑ ".encode() + bytes(rng.integers(97, 123, 30 + i).tolist())
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body)
        written[name] = body
    (root / "binary.bin").write_bytes(b"\xff\xfe\x00\x81" * 10)      # not UTF-8
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n" * 10)          # hidden directory
    (root / "link.txt").symlink_to(root / "a/0/f0.md")                # a symbolic link
    return written


def test_text_corpus_directory_is_split_by_file(tmp_path):
    written = _write_tree(tmp_path)
    ds = data.text_corpus(tmp_path, seq_len=8, test_fraction=0.3)
    train, test = ds.files
    assert set(train) | set(test) == set(written) and not set(train) & set(test)
    assert set(test) == {n for n in written if _u(n, "split") < 0.3}
    assert list(train) == sorted(train) and 0 < len(test) < 40
    _assert_windows(ds, _joined(tmp_path, train), _joined(tmp_path, test), 8)
    # A larger test_fraction only moves files into the test split.
    assert set(test) < set(data.text_corpus(tmp_path, seq_len=8, test_fraction=0.6).files[1])
    # suffixes pick files by name; max_bytes keeps what fits, in the hash order.
    md = data.text_corpus(tmp_path, seq_len=8, test_fraction=0.3, suffixes=".md")
    assert set(md.files[0]) | set(md.files[1]) == {n for n in written if n.endswith(".md")}
    capped = data.text_corpus(tmp_path, seq_len=8, test_fraction=0.3, max_bytes=1000)
    budget, taken = 1000, set()
    for n in sorted(written, key=lambda n: _u(n, "take")):
        if len(written[n]) <= budget:
            taken.add(n)
            budget -= len(written[n])
    assert set(capped.files[0]) | set(capped.files[1]) == taken


def test_text_corpus_file_is_split_by_position(tmp_path):
    raw = ("naïve café ∑ " * 40).encode()
    (tmp_path / "t.txt").write_bytes(raw)
    ds = data.text_corpus(tmp_path / "t.txt", seq_len=8, test_fraction=0.25)
    cut = int(len(raw) * 0.75)
    assert ds.files is None and ds.num_outputs == 256
    _assert_windows(ds, raw[:cut], raw[cut:], 8)
    # A cap that would cut a two-byte character keeps only whole characters.
    (tmp_path / "e.txt").write_text("é" * 100)
    capped = data.text_corpus(tmp_path / "e.txt", seq_len=4, test_fraction=0.2, max_bytes=51)
    assert (len(capped.x_train) + len(capped.x_test)) * 5 <= 50
    np.testing.assert_array_equal(capped.x_train[0], list("éé".encode()))


def test_text_corpus_errors_name_the_path_and_the_fix(tmp_path):
    def error(path, **kw):
        with pytest.raises(data.DataError) as e:
            data.text_corpus(path, **kw)
        return str(e.value)

    msg = error(tmp_path / "nowhere")
    assert "not found" in msg and str(tmp_path / "nowhere") in msg
    (tmp_path / "empty").mkdir()
    msg = error(tmp_path / "empty")
    assert "no readable UTF-8 file" in msg and str(tmp_path / "empty") in msg
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.py").write_bytes(b"\xff" * 100)
    assert "1 unreadable or not UTF-8" in error(tmp_path / "bin")
    (tmp_path / "b.txt").write_bytes(b"\xff" * 100)
    assert "not UTF-8" in error(tmp_path / "b.txt")
    (tmp_path / "short.txt").write_text("abc" * 5)
    msg = error(tmp_path / "short.txt", seq_len=8)
    assert "too few" in msg and "--seq-len" in msg
    # One file: all of it in one split, whichever side its hash puts it.
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("x" * 1000)
    side = "test" if _u("a.txt", "split") < 0.5 else "training"
    msg = error(tmp_path / "one", test_fraction=0.5)
    assert f"all 1 files of {tmp_path / 'one'} fall in the {side} split" in msg
    assert ("a smaller" if side == "test" else "a larger") + " test_fraction" in msg
    # Files in both splits, but 8 files of 10 bytes cannot fill a 65-byte window in each.
    (tmp_path / "two").mkdir()
    names = ["a.txt", "b.txt", "c.txt", "d.txt", "e.txt", "f.txt", "g.txt", "h.txt"]
    assert 0 < sum(_u(n, "split") < 0.5 for n in names) < len(names)
    for n in names:
        (tmp_path / "two" / n).write_text("y" * 10)
    msg = error(tmp_path / "two", seq_len=64, test_fraction=0.5)
    assert "too few for one window of seq_len + 1 = 65 bytes" in msg
    assert "test_fraction must be in (0, 1), got 0" in error(None, test_fraction=0)
    assert "seq_len must be at least 1" in error(None, seq_len=0)
