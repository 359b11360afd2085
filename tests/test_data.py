"""Tests of mlsys_jax.data: shapes, determinism, the CIFAR-10 binary parser on files written here."""

import numpy as np
import pytest

from mlsys_jax import data


def test_digits_split_is_deterministic_and_disjoint():
  a, b = data.load_digits(seed=3), data.load_digits(seed=3)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  assert a.x_train.shape == (1348, 8, 8, 1) and a.x_test.shape == (449, 8, 8, 1)
  assert a.x_train.dtype == np.float32 and 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
  assert set(np.unique(a.y_train)) == set(range(10))
  # Train and test images together are exactly the 1797 originals (no duplicates introduced, none lost).
  allx = np.concatenate([a.x_train, a.x_test]).reshape(1797, -1)
  from sklearn.datasets import load_digits
  ref = load_digits().data / 16.0
  np.testing.assert_allclose(np.sort(allx.sum(1)), np.sort(ref.sum(1)), rtol=1e-6)
  c = data.load_digits(seed=4)
  assert not np.array_equal(a.y_train, c.y_train)


def test_mnist1d_is_procedural_and_restores_global_rng():
  np.random.seed(123)
  before = np.random.random()
  np.random.seed(123)
  ds = data.load_mnist1d(seed=1, num_samples=200)
  after = np.random.random()
  assert before == after, "load_mnist1d must not disturb numpy's global RNG"
  assert ds.x_train.shape == (160, 40, 1) and ds.x_test.shape == (40, 40, 1)
  ds2 = data.load_mnist1d(seed=1, num_samples=200)
  np.testing.assert_array_equal(ds.x_train, ds2.x_train)


def _write_cifar_batch(path, images, labels):
  rec = np.concatenate([labels[:, None].astype(np.uint8),
                        images.transpose(0, 3, 1, 2).reshape(len(images), -1)], axis=1)
  rec.tofile(path)


def test_cifar10_parser_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  imgs = {}
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    im = rng.integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
    lb = rng.integers(0, 10, size=7)
    _write_cifar_batch(tmp_path / name, im, lb)
    imgs[name] = (im, lb)
  x, y = data.read_cifar10_batch(tmp_path / "test_batch.bin")
  np.testing.assert_array_equal(x, imgs["test_batch.bin"][0])
  np.testing.assert_array_equal(y, imgs["test_batch.bin"][1])
  ds = data.load_cifar10(tmp_path, normalize=False)
  assert ds.x_train.shape == (35, 32, 32, 3) and ds.x_test.shape == (7, 32, 32, 3)
  np.testing.assert_allclose(ds.x_train[:7] * 255.0, imgs["data_batch_1.bin"][0], atol=1e-3)
  dsn = data.load_cifar10(tmp_path, normalize=True, max_train=10)
  assert dsn.x_train.shape[0] == 10
  np.testing.assert_allclose(dsn.x_test, (ds.x_test - data.CIFAR10_MEAN) / data.CIFAR10_STD, rtol=1e-5)


def test_cifar10_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="data_batch_1.bin"):
    data.load_cifar10(tmp_path)
  (tmp_path / "bad.bin").write_bytes(b"\x00" * 100)
  with pytest.raises(ValueError, match="record size"):
    data.read_cifar10_batch(tmp_path / "bad.bin")


def test_synthetic_and_batches():
  ds = data.synthetic_classification(seed=0, num_samples=100, shape=(4, 2), num_classes=3)
  assert ds.x_train.shape == (75, 4, 2)
  seen = np.concatenate([yb for _, yb in data.batches(ds.x_train, ds.y_train, 10, seed=1)])
  assert len(seen) == 70  # last partial batch dropped
  full = [xb for xb, _ in data.batches(ds.x_train, ds.y_train, 10, seed=1, drop_remainder=False)]
  assert sum(len(b) for b in full) == 75
  with pytest.raises(ValueError, match="same length"):
    next(data.batches(ds.x_train, ds.y_train[:-1], 10))
  with pytest.raises(ValueError, match="noise"):
    data.synthetic_classification(noise=-1.0)


def test_load_dataset_by_name(tmp_path):
  assert data.load_dataset("digits").name == "digits"
  with pytest.raises(ValueError, match="needs data_dir"):
    data.load_dataset("cifar10")
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load_dataset("imagenet")


def test_mnist1d_cache_folder_round_trips_without_the_package(tmp_path, monkeypatch):
  import builtins
  monkeypatch.setenv("MLSYS_JAX_MNIST1D_CACHE", str(tmp_path))
  ds = data.load_mnist1d(seed=2, num_samples=60)
  files = list(tmp_path.glob("mnist1d_s2_n60_*.npz"))
  assert len(files) == 1
  real_import = builtins.__import__

  def no_mnist1d(name, *args, **kwargs):
    if name.startswith("mnist1d"):
      raise ImportError("simulated: package absent")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_mnist1d)
  again = data.load_mnist1d(seed=2, num_samples=60)
  for a, b in zip(ds[:4], again[:4]):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  with pytest.raises(ImportError, match="MLSYS_JAX_MNIST1D_CACHE"):
    data.load_mnist1d(seed=3, num_samples=60)
