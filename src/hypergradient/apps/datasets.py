"""Datasets for the experiments: loaded from disk, never downloaded.

- ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1797 images).
- ``"fashion-mnist"`` and ``"mnist"``: the four standard IDX files (plain or
  gzipped), found in ``data_dir`` if given, else in an environment variable's
  folder, then a system folder (Debian's ``dataset-fashion-mnist`` installs
  Fashion-MNIST under ``/usr/share/datasets/fashion-mnist``).

Every loader returns a :class:`Splits` of numpy arrays: images flattened to
``(N, H*W)`` float32 in [0, 1], labels int32.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

DATASETS = ("digits", "fashion-mnist", "mnist")

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class Split(NamedTuple):
    """One part of a dataset.

    Attributes:
      x: inputs, float32 of shape ``(N, D)``; images are flattened row-major
        and scaled to [0, 1].
      y: int32 class labels of shape ``(N,)`` (float32 targets for regression).
    """

    x: np.ndarray
    y: np.ndarray


class Splits(NamedTuple):
    """Train, validation and test parts of a dataset.

    Attributes:
      train, val, test: the three disjoint parts.
      n_classes: number of classes (0 for regression).
      image_shape: ``(H, W)`` with ``H * W == D``; reshape ``x`` to
        ``(N, H, W)`` to get images back.
      name: dataset name, one of :data:`DATASETS` or a synthetic name.
    """

    train: Split
    val: Split
    test: Split
    n_classes: int
    image_shape: tuple[int, int]
    name: str


class _IdxSource(NamedTuple):
    title: str
    env_var: str
    system_dir: str
    how_to_get: str


_IDX_SOURCES = {
    "fashion-mnist": _IdxSource(
        title="Fashion-MNIST",
        env_var="HYPERGRADIENT_FASHION_MNIST_DIR",
        system_dir="/usr/share/datasets/fashion-mnist",
        how_to_get="install Debian's package (apt-get install dataset-fashion-mnist), or ",
    ),
    "mnist": _IdxSource(
        title="MNIST",
        env_var="HYPERGRADIENT_MNIST_DIR",
        system_dir="/usr/share/datasets/mnist",
        how_to_get="",
    ),
}


def names() -> tuple[str, ...]:
    """Returns the names :func:`load` accepts."""
    return DATASETS


def load(
    name: str,
    data_dir: str | os.PathLike | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
) -> Splits:
    """Loads a dataset split into train, validation and test parts.

    ``"digits"`` has no official test set: its 1797 images are shuffled once
    with the fixed generator ``np.random.default_rng(0)``; train and val are
    the first ``n_train`` and next ``n_val`` of that order, test the last
    ``n_test`` (default: all the rest, 497 with the default sizes), so an
    explicit ``n_test`` keeps the test set fixed when ``n_train`` or ``n_val``
    change. For ``"fashion-mnist"`` and ``"mnist"``, train and val are the
    first ``n_train`` and next ``n_val`` official training images and test the
    first ``n_test`` official test images.

    Args:
      name: one of :data:`DATASETS`.
      data_dir: folder holding the four IDX files (IDX datasets only); when
        given, the only place read (else the environment variable, then the
        system folder).
      n_train: training set size (default 800 for digits, 10000 otherwise).
      n_val: validation set size (default 500 for digits, 10000 otherwise).
      n_test: test set size (default: the rest for digits, 10000 otherwise).

    Returns:
      The :class:`Splits`.

    Raises:
      ValueError: unknown name, sizes larger than what is available, or an IDX
        file that cannot be read (truncated, corrupt, not IDX): one line naming it.
      FileNotFoundError: the IDX files are in none of the searched places.
    """
    if name == "digits":
        return _load_digits(n_train, n_val, n_test)
    if name in _IDX_SOURCES:
        return _load_idx_dataset(name, data_dir, n_train, n_val, n_test)
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def check(name: str, data_dir: str | os.PathLike | None = None, n_train: int | None = 1, n_val: int | None = 1,
          n_test: int | None = 1) -> None:
    """Raise what :func:`load` would (``ValueError``, ``FileNotFoundError``) if ``name`` cannot be
    loaded with these sizes (by default one example of each part): a command checks this before it
    writes anything."""
    load(name, data_dir, n_train=n_train, n_val=n_val, n_test=n_test)


def _check_sizes(**sizes: int) -> None:
    for key, value in sizes.items():
        if value < 0:
            raise ValueError(f"{key} must be non-negative, got {value}")


def _split(x: np.ndarray, y: np.ndarray, scale: float) -> Split:
    return Split(
        np.ascontiguousarray(x.reshape(len(x), int(np.prod(x.shape[1:]))), dtype=np.float32) / np.float32(scale),
        np.ascontiguousarray(y, dtype=np.int32),
    )


def _load_digits(n_train: int | None, n_val: int | None, n_test: int | None) -> Splits:
    from sklearn.datasets import load_digits  # optional dependency

    digits = load_digits()
    n = len(digits.target)
    n_train = 800 if n_train is None else n_train
    n_val = 500 if n_val is None else n_val
    n_test = n - n_train - n_val if n_test is None else n_test
    _check_sizes(n_train=n_train, n_val=n_val, n_test=n_test)
    if n_train + n_val + n_test > n:
        raise ValueError(
            f"digits has {n} images: n_train={n_train} + n_val={n_val} + "
            f"n_test={n_test} = {n_train + n_val + n_test} is too many"
        )
    order = np.random.default_rng(0).permutation(n)
    parts = (order[:n_train], order[n_train : n_train + n_val], order[n - n_test :])
    x, y = digits.images, digits.target
    train, val, test = (_split(x[i], y[i], 16.0) for i in parts)
    return Splits(train, val, test, n_classes=10, image_shape=(8, 8), name="digits")


def _load_idx_dataset(
    name: str,
    data_dir: str | os.PathLike | None,
    n_train: int | None,
    n_val: int | None,
    n_test: int | None,
) -> Splits:
    files = _find_idx_files(name, data_dir)
    train_x, train_y, test_x, test_y = (_read_idx(f) for f in files)
    for path, images, labels in ((files[0], train_x, train_y), (files[2], test_x, test_y)):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{path}: expected images (N, H, W) and labels (N,), got "
                f"{images.shape} and {labels.shape}"
            )
        if images.dtype != np.uint8 or labels.dtype != np.uint8 or np.any(labels > 9):
            raise ValueError(f"{path}: expected unsigned-byte images and labels 0..9")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(
            f"train images {train_x.shape[1:]} and test images {test_x.shape[1:]} differ in size"
        )

    n_train = 10000 if n_train is None else n_train
    n_val = 10000 if n_val is None else n_val
    n_test = 10000 if n_test is None else n_test
    _check_sizes(n_train=n_train, n_val=n_val, n_test=n_test)
    if n_train + n_val > len(train_x):
        raise ValueError(
            f"{name} has {len(train_x)} official training images: n_train={n_train} + "
            f"n_val={n_val} = {n_train + n_val} is too many"
        )
    if n_test > len(test_x):
        raise ValueError(
            f"{name} has {len(test_x)} official test images: n_test={n_test} is too many"
        )

    return Splits(
        train=_split(train_x[:n_train], train_y[:n_train], 255.0),
        val=_split(train_x[n_train : n_train + n_val], train_y[n_train : n_train + n_val], 255.0),
        test=_split(test_x[:n_test], test_y[:n_test], 255.0),
        n_classes=10,
        image_shape=tuple(int(s) for s in train_x.shape[1:]),
        name=name,
    )


def _find_idx_files(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Returns the four IDX paths from ``data_dir`` if given (the other places only named in the
    error, so a mistyped folder never falls back silently), else from the first place holding them."""
    source = _IDX_SOURCES[name]
    env_dir = os.environ.get(source.env_var)
    places = [
        ("data_dir argument", data_dir),
        (f"${source.env_var}", env_dir),
        ("system folder", source.system_dir),
    ]
    given = data_dir not in (None, "")
    looked = []
    for label, folder in places:
        if folder is None or folder == "":
            looked.append(f"  - {label}: not set")
            continue
        folder = Path(folder)
        found = [_idx_path(folder, stem) for stem in _IDX_FILES]
        if all(found) and (not given or folder == Path(data_dir)):
            return found
        if all(found):
            looked.append(f"  - {label}: {folder} (holds the files; used when no data_dir is given)")
        elif not folder.is_dir():
            looked.append(f"  - {label}: {folder} (no such folder)")
        else:
            missing = ", ".join(s for s, f in zip(_IDX_FILES, found) if f is None)
            looked.append(f"  - {label}: {folder} (missing {missing})")
    raise FileNotFoundError(
        f"{source.title} not found. Looked in:\n"
        + "\n".join(looked)
        + f"\nTo get it, {source.how_to_get}pass --data-dir DIR (data_dir=DIR) or set "
        f"{source.env_var}=DIR, where DIR holds the four IDX files "
        f"{', '.join(_IDX_FILES)} (each plain or .gz)."
    )


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file, cached in-process while the file is unchanged."""
    stat = path.stat()
    return _read_idx_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    del mtime_ns, size  # cache keys only
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except EOFError:  # gzip's way of saying the compressed stream was cut short
        raise ValueError(f"{path}: truncated (the compressed data end early); copy the file again") from None
    except (OSError, zlib.error) as e:  # unreadable, not gzip, or corrupt (a bad CRC)
        raise ValueError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e}); "
                         "copy the file again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape}, {expected} bytes; the file has {len(raw)}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    array = array.astype(dtype.newbyteorder("="), copy=False)
    array.setflags(write=False)  # the cache hands the same array to every caller
    return array


def synthetic_regression(
    seed: int = 0,
    n_train: int = 100,
    n_val: int = 100,
    n_test: int = 100,
    d: int = 10,
    noise: float = 0.1,
) -> Splits:
    """A linear-regression problem ``y = x @ w_true + noise * eps``.

    Inputs and ``w_true`` have i.i.d. standard normal entries (inputs are not
    in [0, 1]), ``eps`` is standard normal; all three parts come from one
    ``np.random.default_rng(seed)`` so the problem is deterministic by seed.

    Args:
      seed: integer seed.
      n_train, n_val, n_test: part sizes.
      d: number of features.
      noise: standard deviation of the label noise.

    Returns:
      :class:`Splits` with float32 ``x`` of shape ``(N, d)`` and float32
      targets ``y`` of shape ``(N,)``, ``n_classes=0``,
      ``image_shape=(d, 1)`` (a column vector per example) and
      ``name="synthetic-regression"``.
    """
    _check_sizes(n_train=n_train, n_val=n_val, n_test=n_test)
    rng = np.random.default_rng(seed)
    w_true = rng.standard_normal(d)
    n = n_train + n_val + n_test
    x = rng.standard_normal((n, d))
    y = x @ w_true + noise * rng.standard_normal(n)
    x, y = x.astype(np.float32), y.astype(np.float32)
    bounds = np.cumsum([0, n_train, n_val, n_test])
    train, val, test = (Split(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
    return Splits(train, val, test, n_classes=0, image_shape=(d, 1), name="synthetic-regression")


def flip_labels(
    y: np.ndarray, fraction: float, n_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupts labels for data hyper-cleaning.

    Exactly ``round(fraction * len(y))`` examples, chosen uniformly without
    replacement, get a label drawn uniformly from the other ``n_classes - 1``
    classes.

    Args:
      y: integer labels of shape ``(N,)`` in ``[0, n_classes)``.
      fraction: fraction of labels to flip, in [0, 1].
      n_classes: number of classes, at least 2.
      seed: integer seed of ``np.random.default_rng``.

    Returns:
      ``(y_noisy, flipped)``: the int32 corrupted labels (a copy) and a boolean
      mask, True where a label was changed.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes to flip labels, got {n_classes}")
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must be in [0, {n_classes}), got range [{y.min()}, {y.max()}]")
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(y), dtype=bool)
    flipped[rng.choice(len(y), size=int(round(fraction * len(y))), replace=False)] = True
    shift = rng.integers(1, n_classes, size=int(flipped.sum()))
    y_noisy = y.astype(np.int32, copy=True)
    y_noisy[flipped] = (y_noisy[flipped] + shift) % n_classes
    return y_noisy, flipped
