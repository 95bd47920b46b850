"""Datasets that need no download, loaders for files a user already has, and batching.

Every loader returns a :class:`Dataset`: host (NumPy) arrays split into train and test,
plus what the model and the loss need to know (the kind of problem, the number of
classes or the vocabulary). Nothing here touches the network.

* :func:`digits`: scikit-learn's bundled 8x8 digits, a fixed stratified split.
* :func:`synthetic_classification`, :func:`synthetic_regression`: generated problems.
* :func:`text_corpus`: a byte-level language-model corpus of real text, held out by
  file: by default the Python standard library's source of the running interpreter
  (about 4 MB, nothing to download), or a text file or directory of your own.
* :func:`char_corpus`: a character-level corpus from one text file (the package ships a
  public-domain 8 KB one, :data:`DEFAULT_CORPUS`, for fast tests: models memorise it,
  so its held-out loss says nothing about quality).
* :func:`mnist` (IDX files, :func:`read_idx`) and :func:`cifar10` (the "python" batches)
  read from a path.

Batches come from :class:`BatchStream`: epoch ``e`` visits the training set in the order
of a permutation drawn from ``(seed, e)``, and the stream's :class:`DataPosition`
``(epoch, index)`` says exactly where it is, so a checkpoint that stores the position
resumes the same stream.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
import struct
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from lore_jax.training.errors import TrainingError

Kind = Literal["classification", "regression", "language_model"]

DEFAULT_CORPUS = Path(__file__).parent / "corpus" / "carroll_wonderland.txt"


class DataError(TrainingError):
    """A dataset could not be built: a missing or malformed file, or bad arguments."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split held in host memory.

    Attributes:
      name: short name, e.g. ``"digits"``.
      kind: ``"classification"`` (integer labels), ``"regression"`` (float targets) or
        ``"language_model"`` (token windows; targets are the inputs shifted by one).
      x_train: inputs, ``(n_train, *input_shape)``; float32 features or int32 tokens.
      y_train: ``(n_train,)`` int32 labels, ``(n_train, d_out)`` float32 targets, or
        ``(n_train, seq_len)`` int32 next tokens.
      x_test: ``(n_test, *input_shape)``.
      y_test: like ``y_train`` with ``n_test`` rows.
      num_outputs: classes, regression targets or vocabulary size.
      vocab: the characters of a character-level corpus (token ``i`` is ``vocab[i]``);
        ``None`` for byte-level corpora (token ``i`` is the byte ``i``).
      files: ``(train, test)`` relative POSIX paths of the files of a corpus held out by
        file (:func:`text_corpus` on a directory), else ``None``.
    """

    name: str
    kind: Kind
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_outputs: int
    vocab: str | None = None
    files: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(8, 8, 1)``."""
        return tuple(self.x_train.shape[1:])

    def test_subset(self, n: int | None) -> tuple[np.ndarray, np.ndarray]:
        """``n`` test examples evenly spaced over the test set (all of it when ``n`` is
        ``None`` or at least its size): a fixed subset, so every evaluation sees the same
        examples. On a corpus held out by file the subset spans the held-out files.

        Example:
          >>> x, y = digits().test_subset(10)
          >>> x.shape
          (10, 8, 8, 1)
        """
        x, y = self.x_test, self.y_test
        if n is None or n >= len(x):
            return x, y
        idx = np.linspace(0, len(x) - 1, max(1, n)).round().astype(np.int64)
        return x[idx], y[idx]


# --------------------------------------------------------------------------- datasets


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, stratify: bool):
    from sklearn.model_selection import train_test_split

    return train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y if stratify else None
    )


def digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled handwritten digits: 1797 images, 8x8, 10 classes.

    Pixels are scaled to ``[0, 1]``; the stratified split is fixed by ``split_seed``.

    Returns:
      A classification :class:`Dataset` with ``x`` of shape ``(n, 8, 8, 1)`` float32 and
      ``y`` of shape ``(n,)`` int32 (1437 train and 360 test examples by default).

    Example:
      >>> data = digits()
      >>> data.x_train.shape, data.x_test.shape
      ((1437, 8, 8, 1), (360, 8, 8, 1))
    """
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = (raw.images / 16.0).astype(np.float32)[..., None]
    y = raw.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = _split(x, y, test_fraction, split_seed, stratify=True)
    return Dataset("digits", "classification", x_tr, y_tr, x_te, y_te, num_outputs=10)


def synthetic_classification(
    n_samples: int = 4096, n_features: int = 32, n_classes: int = 4, seed: int = 0,
    test_fraction: float = 0.2,
) -> Dataset:
    """A generated classification problem (``sklearn.datasets.make_classification``).

    Returns:
      ``x`` of shape ``(n, n_features)`` float32 (standardised), ``y`` ``(n,)`` int32.
    """
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n_samples, n_features=n_features, n_informative=n_features // 2,
        n_redundant=n_features // 4, n_classes=n_classes, n_clusters_per_class=2,
        class_sep=1.5, random_state=seed,
    )
    x = ((x - x.mean(0)) / (x.std(0) + 1e-8)).astype(np.float32)
    x_tr, x_te, y_tr, y_te = _split(x, y.astype(np.int32), test_fraction, seed, stratify=True)
    return Dataset("classification", "classification", x_tr, y_tr, x_te, y_te, n_classes)


def synthetic_regression(
    n_samples: int = 4096, n_features: int = 32, n_targets: int = 4, seed: int = 0,
    test_fraction: float = 0.2,
) -> Dataset:
    """A generated nonlinear regression problem: ``y = W2 tanh(W1 x) + noise``.

    Returns:
      ``x`` of shape ``(n, n_features)`` and ``y`` of shape ``(n, n_targets)``, float32,
      targets standardised.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_samples, n_features)).astype(np.float32)
    w1 = rng.standard_normal((n_features, 64)) / np.sqrt(n_features)
    w2 = rng.standard_normal((64, n_targets)) / np.sqrt(64)
    y = np.tanh(x @ w1) @ w2 + 0.05 * rng.standard_normal((n_samples, n_targets))
    y = ((y - y.mean(0)) / y.std(0)).astype(np.float32)
    x_tr, x_te, y_tr, y_te = _split(x, y, test_fraction, seed, stratify=False)
    return Dataset("regression", "regression", x_tr, y_tr, x_te, y_te, n_targets)


def char_corpus(
    path: str | os.PathLike | None = None, seq_len: int = 64, test_fraction: float = 0.1,
) -> Dataset:
    """A character-level language-model corpus read from a UTF-8 text file.

    The text is tokenised by character (the vocabulary is its sorted set of characters),
    the last ``test_fraction`` of it is held out, and each part is cut into windows of
    ``seq_len + 1`` characters at stride ``seq_len // 2``: inputs are a window's first
    ``seq_len`` tokens, targets its last ``seq_len``.

    Args:
      path: the text file; ``None`` reads the bundled public-domain corpus.
      seq_len: tokens per example.
      test_fraction: share of the text held out for evaluation.

    Returns:
      A language-model :class:`Dataset` with int32 ``x`` and ``y`` of shape
      ``(n, seq_len)`` and ``num_outputs`` the vocabulary size.

    Raises:
      DataError: the file is missing, or too short for one training and one test window.
    """
    path = Path(path) if path is not None else DEFAULT_CORPUS
    text = _read_text(path)
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    tokens = np.fromiter((lookup[c] for c in text), dtype=np.int32, count=len(text))
    cut = int(len(tokens) * (1.0 - test_fraction))
    stride = max(1, seq_len // 2)
    train, test = _windows(tokens[:cut], seq_len, stride), _windows(tokens[cut:], seq_len, stride)
    if len(train) == 0 or len(test) == 0:
        raise DataError(
            f"corpus {path} has {len(text)} characters, too few for seq_len={seq_len}; "
            f"use a longer text or a smaller --seq-len."
        )
    return Dataset(
        "charlm", "language_model", train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:],
        num_outputs=len(vocab), vocab=vocab,
    )


def _windows(tokens: np.ndarray, seq_len: int, stride: int) -> np.ndarray:
    starts = range(0, len(tokens) - seq_len, stride)
    return np.stack([tokens[s:s + seq_len + 1] for s in starts]) if len(starts) else (
        np.zeros((0, seq_len + 1), np.int32))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"text file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read text file {path}: {e}") from None


# --------------------------------------------------------------------------- byte-level text

DEFAULT_TEXT_BYTES = 4 * 2**20
"""Default cap on the bytes :func:`text_corpus` reads (4 MiB)."""
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages"})
"""Directories left out of the default corpus: test packages and installed packages."""
FILE_SEPARATOR = b"\x00"
"""The byte between two files of a split (NUL: it never occurs in source code)."""


def unit_hash(name: str, salt: str) -> float:
    """A stable number in ``[0, 1)`` for ``name``: the first 8 bytes of
    ``sha256(salt + "\\0" + name)`` (big-endian) over ``2**64``.

    The same on every machine and Python version (unlike ``hash``), so it can decide
    which file is held out. :func:`text_corpus` uses the salts ``"split"`` (held out
    iff below ``test_fraction``) and ``"take"`` (the order files fill ``max_bytes``).

    Example:
      >>> 0.0 <= unit_hash("json/decoder.py", "split") < 1.0
      True
    """
    digest = hashlib.sha256(f"{salt}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def text_corpus(
    path: str | os.PathLike | None = None, seq_len: int = 64, test_fraction: float = 0.1,
    max_bytes: int | None = DEFAULT_TEXT_BYTES, suffixes: str | Sequence[str] | None = None,
) -> Dataset:
    """A byte-level language-model corpus of real text, held out by file.

    Tokens are UTF-8 bytes (vocabulary 256), which suits code and prose alike. Sources:

    * ``path=None``: the Python standard library source of the running interpreter
      (``sysconfig.get_paths()["stdlib"]``): every ``*.py`` file, recursively, outside
      directories named ``test``, ``tests``, ``idle_test`` and ``site-packages``
      (:data:`STDLIB_EXCLUDED_DIRS`). Python 3.11 has about 12 MB of it, so the default
      ``max_bytes`` takes about a third; the files depend on the Python version.
    * a directory: every regular file, recursively (symbolic links and directories
      whose name starts with ``.`` are skipped), whose name ends with one of
      ``suffixes`` (``None``: any name) and whose bytes decode as UTF-8.
    * a text file (UTF-8): its first ``max_bytes`` bytes.

    Files are named by their POSIX path relative to the directory. When they hold more
    than ``max_bytes``, they are taken in the order of :func:`unit_hash` ``(name,
    "take")``, each one that still fits, until the cap is full: which files are taken
    depends only on the names and sizes, not on the order of the file system.

    Held-out split: a file is a test file iff ``unit_hash(name, "split") <
    test_fraction``, so every file is in exactly one split, no file is cut in two, and a
    larger ``test_fraction`` only moves files into the test split. A single text file is
    split by position instead (its last ``test_fraction``: the only option).

    Each split is the concatenation of its files in sorted order of their names, with
    :data:`FILE_SEPARATOR` (a NUL byte) between two files, cut into non-overlapping
    windows of ``seq_len + 1`` bytes (a remainder shorter than a window is dropped):
    inputs are a window's first ``seq_len`` bytes, targets its last ``seq_len``.

    Args:
      path: a text file or a directory; ``None`` reads the standard library's source.
      seq_len: tokens per example.
      test_fraction: share of the files (of the text, for one file) held out, in (0, 1).
      max_bytes: cap on the bytes read (``None``: no cap); default 4 MiB.
      suffixes: for a directory, the file-name endings to read, e.g. ``(".py", ".md")``
        (default: ``".py"`` for the standard library, any name otherwise).

    Returns:
      A language-model :class:`Dataset` named ``"lm"``: int32 ``x`` and ``y`` of shape
      ``(n, seq_len)``, ``num_outputs=256``, ``vocab=None``, and ``files`` the
      ``(train, test)`` names (``None`` for a single file). With Python 3.11 the default
      corpus is 290 files (22 held out), about 60,000 training and 4,100 test windows of
      65 bytes (17 MB as int32), read in a fraction of a second.

    Raises:
      DataError: a missing path, a directory with no readable file, too few bytes for
        one training and one test window, or a directory whose files all fall in one
        split.

    Example:
      >>> data = text_corpus(seq_len=64)
      >>> data.num_outputs, data.x_train.shape[1], data.x_train.dtype
      (256, 64, dtype('int32'))
    """
    _check_text_arguments(seq_len, test_fraction, max_bytes)
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _directory_files(root, _suffixes(suffixes, (".py",)), max_bytes,
                                 STDLIB_EXCLUDED_DIRS)
        return _file_split(root, files, seq_len, test_fraction)
    path = Path(path)
    if path.is_dir():
        files = _directory_files(path, _suffixes(suffixes, None), max_bytes, frozenset())
        return _file_split(path, files, seq_len, test_fraction)
    if not path.exists():
        raise DataError(f"text corpus not found: {path}; pass an existing text file or "
                        f"directory (or no --data for the Python standard library's source).")
    return _position_split(path, _read_utf8(path, max_bytes), seq_len, test_fraction)


def _check_text_arguments(seq_len: int, test_fraction: float, max_bytes: int | None) -> None:
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}.")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}; e.g. 0.1 "
                        f"holds out a tenth.")
    if max_bytes is not None and max_bytes < 1:
        raise DataError(f"max_bytes must be at least 1 (or None for no cap), got {max_bytes}.")


def _suffixes(suffixes: str | Sequence[str] | None, default: tuple[str, ...] | None):
    if suffixes is None:
        return default
    return (suffixes,) if isinstance(suffixes, str) else tuple(suffixes)


def _walk(root: Path, excluded: frozenset[str]) -> list[tuple[str, Path]]:
    """``(relative POSIX name, path)`` of the regular files under ``root``, sorted by name."""
    out = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in excluded and not d.startswith(".")]
        for name in names:
            p = Path(directory, name)
            if p.is_file() and not p.is_symlink():
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def _directory_files(root: Path, suffixes: tuple[str, ...] | None, max_bytes: int | None,
                     excluded: frozenset[str]) -> list[tuple[str, bytes]]:
    """The ``(name, bytes)`` that :func:`text_corpus` takes from ``root``, sorted by name."""
    found = [(n, p) for n, p in _walk(root, excluded) if suffixes is None or
             n.endswith(suffixes)]
    budget = float("inf") if max_bytes is None else max_bytes
    taken, unreadable = [], 0
    for name, p in sorted(found, key=lambda f: unit_hash(f[0], "take")):
        if budget <= 0:
            break
        if p.stat().st_size > budget:
            continue
        try:
            raw = p.read_bytes()
            raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            unreadable += 1
            continue
        if len(raw) <= budget:
            taken.append((name, raw))
            budget -= len(raw)
    if not taken:
        which = f"ending in {' or '.join(suffixes)} " if suffixes else ""
        raise DataError(
            f"no readable UTF-8 file {which}of at most max_bytes={max_bytes} bytes in {root} "
            f"({len(found)} files {which}found, {unreadable} unreadable or not UTF-8); pass a "
            f"directory of text files, other suffixes, or a larger max_bytes.")
    return sorted(taken)


def _file_split(root: Path, files: list[tuple[str, bytes]], seq_len: int,
                test_fraction: float) -> Dataset:
    test = [f for f in files if unit_hash(f[0], "split") < test_fraction]
    train = [f for f in files if unit_hash(f[0], "split") >= test_fraction]
    if not train or not test:
        side, fix = ("training", "a larger") if train else ("test", "a smaller")
        raise DataError(
            f"all {len(files)} files of {root} fall in the {side} split (a file is held out "
            f"when a hash of its name is below test_fraction={test_fraction}); use "
            f"{fix} test_fraction or a directory with more files.")
    parts = [_byte_windows(FILE_SEPARATOR.join(raw for _, raw in split), seq_len)
             for split in (train, test)]
    if min(len(w) for w in parts) == 0:
        sizes = [sum(len(raw) for _, raw in split) for split in (train, test)]
        raise DataError(
            f"{root}: the training split has {sizes[0]} bytes ({len(train)} files) and the "
            f"test split {sizes[1]} bytes ({len(test)} files), too few for one window of "
            f"seq_len + 1 = {seq_len + 1} bytes in each; use more text or a smaller "
            f"--seq-len.")
    (tr, te) = parts
    names = (tuple(n for n, _ in train), tuple(n for n, _ in test))
    return Dataset("lm", "language_model", tr[:, :-1], tr[:, 1:], te[:, :-1], te[:, 1:],
                   num_outputs=256, files=names)


def _position_split(path: Path, raw: bytes, seq_len: int, test_fraction: float) -> Dataset:
    cut = int(len(raw) * (1.0 - test_fraction))
    tr, te = _byte_windows(raw[:cut], seq_len), _byte_windows(raw[cut:], seq_len)
    if len(tr) == 0 or len(te) == 0:
        raise DataError(
            f"text file {path} has {len(raw)} bytes, too few for one training and one test "
            f"window of seq_len + 1 = {seq_len + 1} bytes with the last "
            f"test_fraction={test_fraction} held out; use a longer text or a smaller "
            f"--seq-len.")
    return Dataset("lm", "language_model", tr[:, :-1], tr[:, 1:], te[:, :-1], te[:, 1:],
                   num_outputs=256)


def _byte_windows(raw: bytes, seq_len: int) -> np.ndarray:
    """``raw`` as ``(len(raw) // (seq_len + 1), seq_len + 1)`` int32 windows, no overlap."""
    n = len(raw) // (seq_len + 1)
    return np.frombuffer(raw, np.uint8, count=n * (seq_len + 1)).reshape(
        n, seq_len + 1).astype(np.int32)


def _read_utf8(path: Path, max_bytes: int | None) -> bytes:
    """The file's first ``max_bytes`` bytes, less a character the cap cut in two."""
    try:
        with open(path, "rb") as f:
            raw = f.read() if max_bytes is None else f.read(max_bytes)
    except OSError as e:
        raise DataError(f"cannot read text file {path}: {e}") from None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if not (e.reason == "unexpected end of data" and len(raw) == max_bytes):
            raise DataError(f"text file {path} is not UTF-8 (byte {e.start}: {e.reason}); "
                            f"pass a UTF-8 text file.") from None
        raw = raw[:e.start]
    return raw


# --------------------------------------------------------------------------- file formats

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (the MNIST format), plain or gzip-compressed.

    The header is two zero bytes, a type code (``0x08`` = uint8, ...), the number of
    dimensions ``d``, then ``d`` big-endian int32 sizes; the data follow in C order.

    Returns:
      The array with its stored shape and dtype (native byte order).

    Raises:
      DataError: the file is missing, not IDX, or truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4]!r}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}i", raw[4:header]) if len(raw) >= header else None
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    if shape is None or len(raw) - header != int(np.prod(shape)) * dtype.itemsize:
        raise DataError(f"{path} is truncated or its header does not match its size.")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        for candidate in (directory / name, directory / (name + ".gz")):
            if candidate.exists():
                return candidate
    raise DataError(f"{names[0]} (or .gz) not found in {directory}")


def mnist(directory: str | os.PathLike) -> Dataset:
    """MNIST (or Fashion-MNIST) from the four IDX files a user already has.

    ``directory`` must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``;
    the dotted names ``train-images.idx3-ubyte`` also work).

    Returns:
      A classification :class:`Dataset`, ``x`` of shape ``(n, 28, 28, 1)`` float32 in
      ``[0, 1]`` and ``y`` ``(n,)`` int32.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"MNIST directory not found: {directory}")

    def load(prefix: str, kind: str, rank: str) -> np.ndarray:
        return read_idx(_find(directory, (f"{prefix}-{kind}-{rank}-ubyte",
                                          f"{prefix}-{kind}.{rank}-ubyte")))

    x_tr, y_tr = load("train", "images", "idx3"), load("train", "labels", "idx1")
    x_te, y_te = load("t10k", "images", "idx3"), load("t10k", "labels", "idx1")
    for x, y, part in ((x_tr, y_tr, "train"), (x_te, y_te, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"MNIST {part} files in {directory} have shapes {x.shape} and "
                            f"{y.shape}; expected (n, rows, cols) images and (n,) labels.")

    def images(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float32) / 255.0)[..., None]

    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    return Dataset("mnist", "classification", images(x_tr), y_tr.astype(np.int32),
                   images(x_te), y_te.astype(np.int32), num_classes)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 batch not found: {path}") from None
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {e}") from None


def cifar10(directory: str | os.PathLike) -> Dataset:
    """CIFAR-10 from its "python version" batches a user already has.

    ``directory`` is the extracted ``cifar-10-batches-py`` folder (or its parent) holding
    ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``: pickled dicts with
    ``b"data"``, ``(n, 3072)`` uint8 rows in channel-major order, and ``b"labels"``.
    Only open files you trust: the format is Python pickle.

    Returns:
      A classification :class:`Dataset`, ``x`` of shape ``(n, 32, 32, 3)`` float32 in
      ``[0, 1]``, ``y`` ``(n,)`` int32.
    """
    directory = Path(directory)
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    if not directory.is_dir():
        raise DataError(f"CIFAR-10 directory not found: {directory}")
    train_files = sorted(directory.glob("data_batch_*"))
    if not train_files:
        raise DataError(f"no data_batch_* files in {directory}")

    def load(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for p in paths:
            batch = _unpickle(p)
            if b"data" not in batch or b"labels" not in batch:
                raise DataError(f"{p} is not a CIFAR-10 batch (needs b'data' and b'labels').")
            data = np.asarray(batch[b"data"], np.uint8)
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(batch[b"labels"], np.int32))
        return (np.concatenate(xs).astype(np.float32) / 255.0), np.concatenate(ys)

    x_tr, y_tr = load(train_files)
    x_te, y_te = load([directory / "test_batch"])
    return Dataset("cifar10", "classification", x_tr, y_tr, x_te, y_te, num_outputs=10)


# --------------------------------------------------------------------------- batching


class DataPosition(NamedTuple):
    """Where a :class:`BatchStream` stands: the epoch and the batch index within it."""

    epoch: int
    index: int


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits ``n`` examples (a function of both seeds)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class BatchStream(Iterator[tuple[np.ndarray, np.ndarray]]):
    """Deterministic shuffled minibatches with an explicit, restorable position.

    Each epoch holds ``n // batch_size`` batches (the remainder is dropped), drawn in the
    order of :func:`epoch_permutation`. ``next(stream)`` returns the batch at
    ``stream.position`` and advances it; a stream created with that position later
    continues identically.

    Example:
      >>> x, y = np.arange(10.0)[:, None], np.arange(10)
      >>> s = BatchStream(x, y, batch_size=4, seed=0)
      >>> _ = next(s); s.position
      DataPosition(epoch=0, index=1)
      >>> same = BatchStream(x, y, 4, seed=0, position=s.position)
      >>> bool((next(same)[1] == next(s)[1]).all())
      True
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                 position: DataPosition | tuple[int, int] = (0, 0)):
        if len(x) != len(y):
            raise DataError(f"inputs and targets differ in length: {len(x)} vs {len(y)}.")
        if not 0 < batch_size <= len(x):
            raise DataError(f"batch size {batch_size} must be in [1, {len(x)}] (the number "
                            f"of training examples).")
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.batches_per_epoch = len(x) // batch_size
        epoch, index = (int(v) for v in position)
        epoch, index = epoch + index // self.batches_per_epoch, index % self.batches_per_epoch
        self.position = DataPosition(epoch, index)
        self._order_epoch, self._order = -1, np.empty(0, np.int64)

    def indices(self) -> np.ndarray:
        """The example indices of the batch at the current position."""
        epoch, index = self.position
        if epoch != self._order_epoch:
            self._order_epoch, self._order = epoch, epoch_permutation(len(self.x), self.seed,
                                                                      epoch)
        return self._order[index * self.batch_size:(index + 1) * self.batch_size]

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        idx = self.indices()
        epoch, index = self.position
        index += 1
        if index == self.batches_per_epoch:
            epoch, index = epoch + 1, 0
        self.position = DataPosition(epoch, index)
        return self.x[idx], self.y[idx]
