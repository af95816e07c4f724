import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypergradient.apps import datasets

FASHION_ENV = "HYPERGRADIENT_FASHION_MNIST_DIR"
SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, gz: bool = False, magic: bytes | None = None) -> Path:
    """Writes an unsigned-byte IDX file (gzipped if gz, with '.gz' appended)."""
    array = np.asarray(array, dtype=np.uint8)
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    raw = header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def make_idx_dataset(folder, seed=0, gz=(False, True, False, True), n=(12, 6), hw=(4, 5)):
    """Writes the four IDX files of a tiny random dataset; returns its arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n[0], *hw)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n[0]),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n[1], *hw)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n[1]),
    }
    for (name, array), compress in zip(arrays.items(), gz):
        write_idx(folder / name, array, gz=compress)
    return arrays


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    """Makes the system folders and environment variables point nowhere."""
    for name, source in datasets._IDX_SOURCES.items():
        nowhere = str(tmp_path / f"system-{name}")
        monkeypatch.setitem(datasets._IDX_SOURCES, name, source._replace(system_dir=nowhere))
        monkeypatch.delenv(source.env_var, raising=False)


@pytest.mark.parametrize("gz", [(False,) * 4, (True,) * 4, (False, True, True, False)])
def test_idx_through_data_dir(tmp_path, gz):
    arrays = make_idx_dataset(tmp_path / "d", gz=gz)
    s = datasets.load("fashion-mnist", data_dir=tmp_path / "d", n_train=5, n_val=4, n_test=6)
    train_x, train_y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    test_x, test_y = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    np.testing.assert_array_equal(s.train.x, train_x[:5].reshape(5, 20).astype(np.float32) / 255)
    np.testing.assert_array_equal(s.val.x, train_x[5:9].reshape(4, 20).astype(np.float32) / 255)
    np.testing.assert_array_equal(s.test.x, test_x.reshape(6, 20).astype(np.float32) / 255)
    np.testing.assert_array_equal(s.train.y, train_y[:5])
    np.testing.assert_array_equal(s.val.y, train_y[5:9])
    np.testing.assert_array_equal(s.test.y, test_y)
    for part in s[:3]:
        assert part.x.dtype == np.float32 and part.y.dtype == np.int32
        assert part.x.min() >= 0 and part.x.max() <= 1
    assert (s.n_classes, s.image_shape, s.name) == (10, (4, 5), "fashion-mnist")


def test_idx_through_env_var(tmp_path, monkeypatch, no_system_data):
    arrays = make_idx_dataset(tmp_path / "env", seed=1)
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "env"))
    s = datasets.load("fashion-mnist", n_train=3, n_val=2, n_test=4)
    np.testing.assert_array_equal(s.train.y, arrays["train-labels-idx1-ubyte"][:3])
    np.testing.assert_array_equal(s.test.y, arrays["t10k-labels-idx1-ubyte"][:4])


def test_data_dir_comes_before_env_var(tmp_path, monkeypatch):
    make_idx_dataset(tmp_path / "env", seed=1, hw=(3, 3))
    make_idx_dataset(tmp_path / "arg", seed=2, hw=(2, 7))
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "env"))
    s = datasets.load("fashion-mnist", data_dir=tmp_path / "arg", n_train=1, n_val=1, n_test=1)
    assert s.image_shape == (2, 7)


def test_mnist_uses_its_own_env_var(tmp_path, monkeypatch, no_system_data):
    make_idx_dataset(tmp_path / "m", hw=(6, 6))
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError):
        datasets.load("mnist", n_train=1, n_val=1, n_test=1)
    monkeypatch.setenv("HYPERGRADIENT_MNIST_DIR", str(tmp_path / "m"))
    s = datasets.load("mnist", n_train=1, n_val=1, n_test=1)
    assert (s.name, s.image_shape) == ("mnist", (6, 6))


def test_missing_dataset_names_every_place(tmp_path, monkeypatch, no_system_data):
    partial = tmp_path / "partial"
    make_idx_dataset(partial)
    os.remove(partial / "t10k-labels-idx1-ubyte.gz")
    monkeypatch.setenv(FASHION_ENV, str(partial))
    with pytest.raises(FileNotFoundError) as info:
        datasets.load("fashion-mnist", data_dir=tmp_path / "absent")
    message = str(info.value)
    assert str(tmp_path / "absent") in message
    assert FASHION_ENV in message and str(partial) in message
    assert "missing t10k-labels-idx1-ubyte" in message
    assert str(tmp_path / "system-fashion-mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message

    monkeypatch.delenv(FASHION_ENV)
    with pytest.raises(FileNotFoundError, match="HYPERGRADIENT_MNIST_DIR") as info:
        datasets.load("mnist")
    assert str(tmp_path / "system-mnist") in str(info.value)


def test_a_given_data_dir_is_the_only_place_read(tmp_path, monkeypatch, no_system_data):
    make_idx_dataset(tmp_path / "env")
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as info:  # a mistyped folder does not fall back to another copy
        datasets.load("fashion-mnist", data_dir=tmp_path / "typo", n_train=1, n_val=1, n_test=1)
    assert f"{tmp_path / 'typo'} (no such folder)" in str(info.value)
    assert f"{tmp_path / 'env'} (holds the files; used when no data_dir is given)" in str(info.value)


@pytest.mark.parametrize("gz", [False, True])
def test_bad_magic_names_the_file(tmp_path, gz):
    make_idx_dataset(tmp_path, gz=(False,) * 4)
    magic = b"\x01\x02\x08\x01"
    bad = write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(12), gz=gz, magic=magic)
    if gz:  # the plain file would be read first
        os.remove(tmp_path / "train-labels-idx1-ubyte")
    with pytest.raises(ValueError, match=f"{bad.name}.*magic"):
        datasets.load("fashion-mnist", data_dir=tmp_path, n_train=1, n_val=1, n_test=1)


def test_truncated_file_is_rejected(tmp_path):
    make_idx_dataset(tmp_path, gz=(False,) * 4)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        datasets.load("fashion-mnist", data_dir=tmp_path, n_train=1, n_val=1, n_test=1)


def cut_gzip(raw: bytes) -> bytes:
    return gzip.compress(raw)[: len(gzip.compress(raw)) // 2]  # an interrupted copy


def bad_crc(raw: bytes) -> bytes:
    data = bytearray(gzip.compress(raw))
    data[-8] ^= 0xFF  # the CRC-32 of the uncompressed data, just before its length
    return bytes(data)


@pytest.mark.parametrize("spoil, reason", [
    (cut_gzip, "truncated"),
    (lambda raw: gzip.compress(raw)[:5], "truncated"),  # cut inside the gzip header
    (bad_crc, "CRC"),
    (lambda raw: raw, "Not a gzipped file"),  # named .gz, but plain
    (lambda raw: gzip.compress(raw[:-3]), "IDX header says shape"),  # short payload
])
def test_unreadable_gzip_file_names_the_file(tmp_path, spoil, reason):
    make_idx_dataset(tmp_path, gz=(True,) * 4)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(spoil(gzip.decompress(path.read_bytes())))
    with pytest.raises(ValueError, match=f"^{path}: .*{reason}") as info:
        datasets.load("fashion-mnist", data_dir=tmp_path, n_train=1, n_val=1, n_test=1)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_names_the_file(tmp_path):
    make_idx_dataset(tmp_path, gz=(False,) * 4)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.chmod(0)
    with pytest.raises(ValueError, match=f"^{path}: cannot be read \\(Permission denied\\)"):
        datasets.load("fashion-mnist", data_dir=tmp_path, n_train=1, n_val=1, n_test=1)


def test_rewritten_file_is_read_again(tmp_path):
    sizes = dict(n_train=1, n_val=1, n_test=1)
    make_idx_dataset(tmp_path, seed=0, hw=(4, 5))
    assert datasets.load("mnist", data_dir=tmp_path, **sizes).image_shape == (4, 5)
    make_idx_dataset(tmp_path, seed=0, hw=(3, 3))
    assert datasets.load("mnist", data_dir=tmp_path, **sizes).image_shape == (3, 3)


def test_cached_arrays_cannot_be_corrupted(tmp_path):
    make_idx_dataset(tmp_path)
    first = datasets.load("mnist", data_dir=tmp_path, n_train=2, n_val=2, n_test=2)
    first.train.x[:] = 7.0
    first.train.y[:] = 7
    again = datasets.load("mnist", data_dir=tmp_path, n_train=2, n_val=2, n_test=2)
    assert again.train.x.max() <= 1 and not np.all(again.train.y == 7)


def test_sizes_too_large_are_named(tmp_path):
    make_idx_dataset(tmp_path)  # 12 train, 6 test images
    with pytest.raises(ValueError, match=r"n_train=10 \+ n_val=5 = 15"):
        datasets.load("fashion-mnist", data_dir=tmp_path, n_train=10, n_val=5, n_test=1)
    with pytest.raises(ValueError, match="n_test=7"):
        datasets.load("fashion-mnist", data_dir=tmp_path, n_train=1, n_val=1, n_test=7)
    with pytest.raises(ValueError, match="n_train=10000"):  # the defaults
        datasets.load("fashion-mnist", data_dir=tmp_path)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="digits, fashion-mnist, mnist"):
        datasets.load("cifar")
    assert datasets.names() == datasets.DATASETS == ("digits", "fashion-mnist", "mnist")


def test_digits_splits():
    s = datasets.load("digits")
    assert [len(p.x) for p in s[:3]] == [800, 500, 497]
    assert (s.n_classes, s.image_shape, s.name) == (10, (8, 8), "digits")
    for part in s[:3]:
        assert part.x.dtype == np.float32 and part.y.dtype == np.int32
        assert part.x.shape[1] == 64 and len(part.y) == len(part.x)
        assert part.x.min() >= 0 and part.x.max() <= 1

    # Together the three parts are exactly the dataset, each image once.
    from sklearn.datasets import load_digits

    d = load_digits()
    ours = np.concatenate([np.column_stack([p.x * 16, p.y]) for p in s[:3]])
    theirs = np.column_stack([d.data, d.target])
    np.testing.assert_array_equal(ours[np.lexsort(ours.T)], theirs[np.lexsort(theirs.T)])
    # ...in a shuffled order, not the file's order.
    assert not np.array_equal(s.train.y, d.target[:800])


def test_digits_is_deterministic_and_test_set_is_stable():
    a, b = datasets.load("digits"), datasets.load("digits")
    for pa, pb in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(pa.x, pb.x)
        np.testing.assert_array_equal(pa.y, pb.y)
    small = datasets.load("digits", n_train=100, n_val=50, n_test=497)
    np.testing.assert_array_equal(small.test.x, a.test.x)
    np.testing.assert_array_equal(small.train.x, a.train.x[:100])
    with pytest.raises(ValueError, match="n_train=1000 \\+ n_val=500 \\+ n_test=400"):
        datasets.load("digits", n_train=1000, n_val=500, n_test=400)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(0, 300),
    fraction=st.floats(0, 1),
    n_classes=st.integers(2, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_flip_labels(n, fraction, n_classes, seed):
    y = np.random.default_rng(seed).integers(0, n_classes, n)
    y_noisy, flipped = datasets.flip_labels(y, fraction, n_classes, seed)
    assert flipped.sum() == round(fraction * n)
    np.testing.assert_array_equal(flipped, y_noisy != y)  # flipped ones all changed
    assert y_noisy.dtype == np.int32 and flipped.dtype == bool
    assert np.all((0 <= y_noisy) & (y_noisy < n_classes))
    again, _ = datasets.flip_labels(y, fraction, n_classes, seed)
    np.testing.assert_array_equal(again, y_noisy)


def test_flip_labels_reaches_every_other_class():
    y = np.zeros(1000, dtype=np.int32)
    y_noisy, flipped = datasets.flip_labels(y, 0.5, 5, seed=3)
    assert flipped.sum() == 500
    assert set(np.unique(y_noisy[flipped])) == {1, 2, 3, 4}
    np.testing.assert_array_equal(y, 0)  # input untouched
    with pytest.raises(ValueError):
        datasets.flip_labels(y, 1.5, 5)
    with pytest.raises(ValueError):
        datasets.flip_labels(np.array([0, 5]), 0.5, 5)


def test_synthetic_regression():
    s = datasets.synthetic_regression(seed=4, n_train=30, n_val=20, n_test=10, d=5, noise=0.0)
    assert [p.x.shape for p in s[:3]] == [(30, 5), (20, 5), (10, 5)]
    assert [p.y.shape for p in s[:3]] == [(30,), (20,), (10,)]
    assert (s.n_classes, s.image_shape) == (0, (5, 1))
    # Without noise one linear map fits all three parts.
    w = np.linalg.lstsq(s.train.x, s.train.y, rcond=None)[0]
    for part in s[:3]:
        np.testing.assert_allclose(part.x @ w, part.y, atol=1e-4)
    same = datasets.synthetic_regression(seed=4, n_train=30, n_val=20, n_test=10, d=5, noise=0.0)
    np.testing.assert_array_equal(same.val.x, s.val.x)
    other = datasets.synthetic_regression(seed=5, n_train=30, n_val=20, n_test=10, d=5, noise=0.0)
    assert not np.array_equal(other.train.x, s.train.x)
    noisy = datasets.synthetic_regression(seed=4, n_train=30, n_val=20, n_test=10, d=5, noise=0.5)
    residual = noisy.train.y - noisy.train.x @ w
    assert 0.2 < residual.std() < 1.0


@pytest.mark.skipif(
    not all((SYSTEM_FASHION / f"{f}.gz").exists() or (SYSTEM_FASHION / f).exists()
            for f in datasets._IDX_FILES),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv(FASHION_ENV, raising=False)
    s = datasets.load("fashion-mnist", n_train=200, n_val=100, n_test=100)
    assert [p.x.shape for p in s[:3]] == [(200, 784), (100, 784), (100, 784)]
    assert s.image_shape == (28, 28)
    assert s.train.x.min() == 0 and s.train.x.max() == 1
    assert set(np.unique(s.train.y)) == set(range(10))


def test_an_empty_split_is_an_empty_array_not_an_error():
    d = datasets.load("digits", n_train=100, n_val=0, n_test=50)
    assert d.val.x.shape == (0, 64) and d.val.y.shape == (0,)
    assert d.train.x.shape == (100, 64)
