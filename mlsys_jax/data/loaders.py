"""Implementation of :mod:`mlsys_jax.data` (see the package docstring)."""

from __future__ import annotations

import os
import pathlib
from typing import Iterator, NamedTuple

import numpy as np

from mlsys_jax._checks import check_int, check_range

# Per-channel statistics of the CIFAR-10 training set (RGB, pixel values in [0, 1]).
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)

_CIFAR_RECORD = 1 + 32 * 32 * 3
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch.bin"


class Dataset(NamedTuple):
  """A supervised classification set split into train and test parts.

  Attributes:
    x_train: float32 inputs, shape ``(n_train, *input_shape)``.
    y_train: int32 labels in ``[0, num_classes)``, shape ``(n_train,)``.
    x_test: float32 inputs, shape ``(n_test, *input_shape)``.
    y_test: int32 labels, shape ``(n_test,)``.
    num_classes: number of classes.
    name: a short name for tables and file names.

  Example:
    >>> ds = synthetic_classification(seed=0, num_samples=8, shape=(4,), num_classes=2)
    >>> ds, ds.input_shape
    (Dataset(synthetic: train (6, 4), test (2, 4), 2 classes), (4,))
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.x_train.shape[1:])

  def __repr__(self) -> str:
    return (f"Dataset({self.name}: train {self.x_train.shape}, test {self.x_test.shape}, "
            f"{self.num_classes} classes)")


def _check_split_sizes(n: int, n_test: int, test_fraction: float) -> None:
  """Raise ``ValueError`` if holding out ``n_test`` of ``n`` examples leaves the test or train split empty."""
  if n_test <= 0:
    raise ValueError(f"test_fraction={test_fraction!r} of {n} examples leaves the test split empty; raise "
                     f"test_fraction (to at least {1.0 / n:.3g}) or use more samples.")
  if n_test >= n:
    raise ValueError(f"test_fraction={test_fraction!r} of {n} examples leaves the train split empty; lower "
                     f"test_fraction (to at most {1.0 - 1.0 / n:.3g}) or use more samples.")


def _split(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float):
  check_range("test_fraction", test_fraction, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  n_test = int(round(len(x) * test_fraction))
  _check_split_sizes(len(x), n_test, test_fraction)
  perm = np.random.default_rng(seed).permutation(len(x))
  te, tr = perm[:n_test], perm[n_test:]
  return x[tr], y[tr], x[te], y[te]


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Dataset:
  """The 8x8 handwritten digits of scikit-learn as images in ``[0, 1]``.

  Args:
    seed: seed of the train/test permutation (the same seed gives the same split).
    test_fraction: fraction of the 1797 images held out for testing (``ValueError`` if the test or train
      split would be empty).

  Returns:
    A :class:`Dataset` with inputs of shape ``(n, 8, 8, 1)`` and 10 classes.

  Example:
    >>> ds = load_digits(seed=0)
    >>> ds.x_train.shape
    (1348, 8, 8, 1)
  """
  check_int("seed", seed, 0)
  try:
    from sklearn.datasets import load_digits as _sk_digits
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("load_digits needs scikit-learn: pip install 'mlsys-jax[experiments]'") from e
  raw = _sk_digits()
  x = (raw.images.astype(np.float32) / 16.0)[..., None]
  y = raw.target.astype(np.int32)
  return Dataset(*_split(x, y, seed, test_fraction), num_classes=10, name="digits")


def load_mnist1d(seed: int = 0, num_samples: int = 5000, test_fraction: float = 0.2) -> Dataset:
  """MNIST-1D (Greydanus, 2020): 1-D digit templates under random shifts, shear, scale and noise.

  The sequences are generated procedurally by the ``mnist1d`` package with its standard arguments (length
  40), so nothing is downloaded. The package seeds numpy's global generator; this function restores the
  global state afterwards so it has no side effect on the caller.

  Machines without the package (or without its plotting and download dependencies, e.g. an offline GPU
  host) can read a pre-generated copy: set the environment variable ``MLSYS_JAX_MNIST1D_CACHE`` to a
  folder; a call finds ``mnist1d_s{seed}_n{num_samples}_t{test_fraction}.npz`` there, or generates it with
  the package and writes it there for the next machine.

  Args:
    seed: generator seed (sequences and split both depend on it).
    num_samples: number of sequences in total (the paper's set has 5000).
    test_fraction: fraction held out for testing (``ValueError`` if the test or train split would be empty).

  Returns:
    A :class:`Dataset` with inputs of shape ``(n, 40, 1)`` and 10 classes.

  Example:
    >>> ds = load_mnist1d(seed=0, num_samples=100)
    >>> ds.x_train.shape, ds.x_test.shape
    ((80, 40, 1), (20, 40, 1))
  """
  check_int("seed", seed, 0)
  check_int("num_samples", num_samples, 20)
  check_range("test_fraction", test_fraction, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  # mnist1d makes num_samples // 10 sequences per class and keeps the first int(total * train_split) for training.
  total = (num_samples // 10) * 10
  _check_split_sizes(total, total - int(total * (1.0 - test_fraction)), test_fraction)
  cache_dir = os.environ.get("MLSYS_JAX_MNIST1D_CACHE")
  cache = (pathlib.Path(cache_dir) / f"mnist1d_s{seed}_n{num_samples}_t{test_fraction:g}.npz"
           if cache_dir else None)
  if cache is not None and cache.exists():
    with np.load(cache) as f:
      return Dataset(f["x_train"], f["y_train"], f["x_test"], f["y_test"], num_classes=10, name="mnist1d")
  try:
    from mnist1d.data import get_dataset_args, make_dataset
  except ImportError as e:  # pragma: no cover - depends on the environment
    where = f" (no cached copy at {cache})" if cache is not None else ""
    raise ImportError("load_mnist1d needs the mnist1d package: pip install 'mlsys-jax[experiments]', or "
                      f"set MLSYS_JAX_MNIST1D_CACHE to a folder with a pre-generated copy{where}") from e
  args = get_dataset_args()
  args.num_samples = num_samples
  args.seed = seed
  args.train_split = 1.0 - test_fraction
  state = np.random.get_state()
  try:
    data = make_dataset(args)
  finally:
    np.random.set_state(state)
  cast = lambda a: np.asarray(a, np.float32)[..., None]
  ds = Dataset(cast(data["x"]), np.asarray(data["y"], np.int32), cast(data["x_test"]),
               np.asarray(data["y_test"], np.int32), num_classes=10, name="mnist1d")
  if cache is not None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
    os.replace(tmp, cache)
  return ds


def read_cifar10_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Parse one CIFAR-10 binary batch file.

  The format (https://www.cs.toronto.edu/~kriz/cifar.html): records of 3073 bytes, one label byte then
  1024 red, 1024 green and 1024 blue bytes of a 32x32 image in row-major order.

  Returns:
    ``(images, labels)``: uint8 ``(n, 32, 32, 3)`` and int32 ``(n,)``.

  Example:
    >>> import os, tempfile
    >>> rec = np.zeros((2, 3073), np.uint8); rec[:, 0] = [3, 7]       # two all-black images, labels 3 and 7
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "b.bin"); rec.tofile(path)
    >>> images, labels = read_cifar10_batch(path)
    >>> images.shape, labels.tolist()
    ((2, 32, 32, 3), [3, 7])
    >>> tmp.cleanup()
  """
  raw = np.fromfile(path, dtype=np.uint8)
  if raw.size == 0 or raw.size % _CIFAR_RECORD:
    raise ValueError(f"{path}: size {raw.size} bytes is not a positive multiple of the CIFAR-10 record "
                     f"size {_CIFAR_RECORD}; is this a CIFAR-10 *binary* batch file?")
  rec = raw.reshape(-1, _CIFAR_RECORD)
  labels = rec[:, 0].astype(np.int32)
  if labels.max() > 9:
    raise ValueError(f"{path}: label byte {labels.max()} outside 0..9; not a CIFAR-10 binary file.")
  images = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels


def load_cifar10(data_dir: str | os.PathLike, normalize: bool = True,
                 max_train: int | None = None, max_test: int | None = None) -> Dataset:
  """CIFAR-10 from the standard binary distribution in ``data_dir``.

  ``data_dir`` must contain ``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin`` (the
  contents of ``cifar-10-binary.tar.gz``, or the folder ``cifar-10-batches-bin`` inside it). The official
  test set is the test split; nothing is downloaded.

  Args:
    data_dir: directory with the batch files (or its parent holding ``cifar-10-batches-bin``).
    normalize: subtract the per-channel mean and divide by the std (else scale to ``[0, 1]``).
    max_train, max_test: optional caps on the number of images (the first ones of the files): None (no cap)
      or an integer >= 0.

  Returns:
    A :class:`Dataset` with inputs ``(n, 32, 32, 3)`` float32 and 10 classes.

  Example:
    >>> import os, tempfile
    >>> tmp = tempfile.TemporaryDirectory(); d = tmp.name
    >>> rec = np.zeros((2, 3073), np.uint8)   # a tiny stand-in: 2 images per file
    >>> for f in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    ...   rec.tofile(os.path.join(d, f))
    >>> load_cifar10(d)
    Dataset(cifar10: train (10, 32, 32, 3), test (2, 32, 32, 3), 10 classes)
    >>> tmp.cleanup()
  """
  for name, cap in (("max_train", max_train), ("max_test", max_test)):
    if cap is not None:
      check_int(name, cap, 0)
  root = pathlib.Path(data_dir)
  if (root / "cifar-10-batches-bin").is_dir():
    root = root / "cifar-10-batches-bin"
  missing = [f for f in (*_CIFAR_TRAIN_FILES, _CIFAR_TEST_FILE) if not (root / f).is_file()]
  if missing:
    raise FileNotFoundError(
        f"CIFAR-10 binary files missing in {root}: {missing}. Put the contents of cifar-10-binary.tar.gz "
        "(data_batch_1.bin .. data_batch_5.bin, test_batch.bin) in that directory; mlsys-jax never "
        "downloads data.")
  parts = [read_cifar10_batch(root / f) for f in _CIFAR_TRAIN_FILES]
  x_tr = np.concatenate([p[0] for p in parts])
  y_tr = np.concatenate([p[1] for p in parts])
  x_te, y_te = read_cifar10_batch(root / _CIFAR_TEST_FILE)
  if max_train is not None:
    x_tr, y_tr = x_tr[:max_train], y_tr[:max_train]
  if max_test is not None:
    x_te, y_te = x_te[:max_test], y_te[:max_test]

  def prep(x):
    x = x.astype(np.float32) / 255.0
    return (x - CIFAR10_MEAN) / CIFAR10_STD if normalize else x

  return Dataset(prep(x_tr), y_tr, prep(x_te), y_te, num_classes=10, name="cifar10")


def synthetic_classification(seed: int = 0, num_samples: int = 1024, shape: tuple[int, ...] = (16,),
                             num_classes: int = 4, noise: float = 1.0,
                             test_fraction: float = 0.25) -> Dataset:
  """Gaussian clusters, one random unit-norm mean (times 3) per class, isotropic noise of std ``noise``.

  Useful for tests: the Bayes accuracy is high for small ``noise`` and falls toward chance as it grows.
  ``seed`` (an integer >= 0) seeds the data and the split; ``shape`` is a tuple of positive integers;
  ``ValueError`` if ``test_fraction`` leaves the test or train split empty.

  Example:
    >>> ds = synthetic_classification(seed=0, num_samples=100, shape=(4, 4), num_classes=3)
    >>> ds.x_train.shape, ds.y_test.shape, ds.num_classes
    ((75, 4, 4), (25,), 3)
  """
  check_int("seed", seed, 0)
  check_int("num_samples", num_samples, 2)
  check_int("num_classes", num_classes, 2)
  check_range("noise", noise, 0.0)
  if not isinstance(shape, (tuple, list)) or len(shape) == 0:
    raise TypeError(f"shape must be a non-empty tuple of positive integers (the input shape of one example, e.g. "
                    f"(16,)), got {shape!r}.")
  for i, d in enumerate(shape):
    check_int(f"shape[{i}]", d, 1)
  rng = np.random.default_rng(seed)
  dim = int(np.prod(shape))
  means = rng.normal(size=(num_classes, dim))
  means = 3.0 * means / np.linalg.norm(means, axis=1, keepdims=True)
  y = rng.integers(0, num_classes, size=num_samples).astype(np.int32)
  x = (means[y] + noise * rng.normal(size=(num_samples, dim))).astype(np.float32).reshape(-1, *shape)
  return Dataset(*_split(x, y, seed, test_fraction), num_classes=num_classes, name="synthetic")


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0,
            drop_remainder: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yield one epoch of shuffled minibatches ``(xb, yb)``; the order depends only on ``seed``.

  Example:
    >>> x, y = np.zeros((10, 3)), np.arange(10)
    >>> [xb.shape for xb, yb in batches(x, y, batch_size=4)]           # the remainder of 2 is dropped
    [(4, 3), (4, 3)]
    >>> [yb.tolist() for xb, yb in batches(x, y, batch_size=4, drop_remainder=False)]
    [[4, 6, 2, 7], [3, 5, 9, 0], [8, 1]]
  """
  check_int("batch_size", batch_size, 1)
  if len(x) != len(y):
    raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}.")
  if drop_remainder and batch_size > len(x):
    raise ValueError(f"batch_size {batch_size} exceeds the {len(x)} examples; lower it or pass "
                     "drop_remainder=False.")
  perm = np.random.default_rng(seed).permutation(len(x))
  stop = len(x) - (len(x) % batch_size if drop_remainder else 0)
  for i in range(0, stop, batch_size):
    idx = perm[i:i + batch_size]
    yield x[idx], y[idx]


DATASETS = ("digits", "mnist1d", "cifar10")


def load_dataset(name: str, seed: int = 0, data_dir: str | os.PathLike | None = None) -> Dataset:
  """Load a data set by name (what experiments' ``--dataset``/``--data_dir`` flags pass).

  ``'digits'`` and ``'mnist1d'`` need no files; ``'cifar10'`` needs ``data_dir`` with the binary batches.

  Example:
    >>> load_dataset("digits", seed=0)
    Dataset(digits: train (1348, 8, 8, 1), test (449, 8, 8, 1), 10 classes)
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}.")
  if name == "cifar10":
    if not data_dir:
      raise ValueError("dataset 'cifar10' needs data_dir: the folder with the CIFAR-10 binary batches "
                       "(data_batch_1.bin .. data_batch_5.bin, test_batch.bin).")
    return load_cifar10(data_dir)
  return load_digits(seed=seed) if name == "digits" else load_mnist1d(seed=seed)
