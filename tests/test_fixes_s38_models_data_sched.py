"""Regression tests (s38) for models.training, data.loaders and sched.dp: evaluate with (n, 1) labels, predict
on empty input, cross_entropy with out-of-range labels, ios_dp on unordered/duplicate/cyclic nodes, empty
train/test splits, CIFAR-10 caps, synthetic_classification seed and shape."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax import data
from mlsys_jax.models import MLP, cross_entropy, evaluate, predict
from mlsys_jax.sched import ios_dp


def _mlp():
  m = MLP(features=(8,), num_classes=2)
  v = m.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
  x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  return m, v, x


# ---------------------------------------------------------------- bug 1: evaluate label shape


def test_evaluate_flat_labels_match_numpy():
  m, v, x = _mlp()
  logits = predict(m, v, x)
  y = np.array([0, 1, 1, 0], np.int32)
  assert evaluate(m, v, x, y) == float(np.mean(logits.argmax(-1) == y))
  assert evaluate(m, v, x, logits.argmax(-1)) == 1.0


@pytest.mark.parametrize("bad", ["column", "onehot", "float"])
def test_evaluate_refuses_non_flat_or_non_integer_labels(bad):
  m, v, x = _mlp()
  p = predict(m, v, x).argmax(-1)
  y = {"column": p[:, None], "onehot": np.eye(2, dtype=np.int32)[p], "float": p.astype(np.float32)}[bad]
  with pytest.raises(ValueError, match="argmax"):
    evaluate(m, v, x, y)


# ---------------------------------------------------------------- bug 2: ios_dp node order


def _cost(st):
  return float(len(st.units))


def test_ios_dp_refuses_non_topological_order():
  with pytest.raises(ValueError, match="edge 1 -> 2"):
    ios_dp([2, 1, 0], {0: {1}, 1: {2}, 2: set()}, _cost)


def test_ios_dp_refuses_duplicate_nodes():
  with pytest.raises(ValueError, match="unit 0 twice"):
    ios_dp([0, 0, 1, 2], {0: {1}, 1: {2}, 2: set()}, _cost)


@pytest.mark.parametrize("succ", [{0: {1}, 1: {0}}, {0: {0}, 1: set()}])
def test_ios_dp_refuses_cycles(succ):
  with pytest.raises(ValueError, match="topological"):
    ios_dp([0, 1], succ, _cost)


@pytest.mark.parametrize("r, exc, msg", [(0, ValueError, "r and s must be >= 1"),
                                         (1.5, TypeError, "r must be an integer"),
                                         (True, TypeError, "r must be an integer")])
def test_ios_dp_checks_r(r, exc, msg):
  with pytest.raises(exc, match=msg):
    ios_dp([0, 1], {0: {1}}, _cost, r=r)


def test_ios_dp_valid_order_still_works():
  stages, total = ios_dp([0, 1, 2], {0: {1}, 1: {2}, 2: set(), 5: {0}}, _cost)   # unit 5 outside the part
  order = [u for st in stages for u in st.units]
  assert sorted(order) == [0, 1, 2] and order.index(0) < order.index(1) < order.index(2)
  assert total == 3.0


# ---------------------------------------------------------------- bug 3: empty splits


def test_synthetic_refuses_empty_train_split():
  with pytest.raises(ValueError, match="train split empty"):
    data.synthetic_classification(num_samples=2, test_fraction=0.75)


def test_synthetic_refuses_empty_test_split():
  with pytest.raises(ValueError, match="test split empty"):
    data.synthetic_classification(num_samples=10, test_fraction=0.01)


def test_load_digits_refuses_empty_test_split():
  pytest.importorskip("sklearn")
  with pytest.raises(ValueError, match="test split empty"):
    data.load_digits(test_fraction=0.0001)


@pytest.mark.parametrize("tf, which", [(1e-17, "test"), (0.99, "train")])   # mnist1d: int(20 * (1 - tf)) train
def test_load_mnist1d_refuses_empty_split(tf, which):
  with pytest.raises(ValueError, match=f"{which} split empty"):
    data.load_mnist1d(num_samples=20, test_fraction=tf)   # checked before generating or importing anything


def test_synthetic_smallest_nonempty_split_sizes():
  ds = data.synthetic_classification(num_samples=4, test_fraction=0.25)
  assert len(ds.x_train) == 3 and len(ds.x_test) == 1


# ---------------------------------------------------------------- bug 4: CIFAR-10 caps


@pytest.fixture
def cifar_dir(tmp_path):
  rec = np.zeros((3, 3073), np.uint8)
  rec[:, 0] = [1, 2, 3]
  for f in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    rec.tofile(os.path.join(tmp_path, f))
  return tmp_path


@pytest.mark.parametrize("kw, exc", [({"max_train": -1}, ValueError), ({"max_test": -1}, ValueError),
                                     ({"max_train": 2.0}, TypeError), ({"max_test": 1.5}, TypeError)])
def test_load_cifar10_checks_caps(cifar_dir, kw, exc):
  with pytest.raises(exc, match=next(iter(kw))):
    data.load_cifar10(cifar_dir, **kw)


def test_load_cifar10_caps_ok(cifar_dir):
  ds = data.load_cifar10(cifar_dir, max_train=4, max_test=0)
  assert ds.x_train.shape == (4, 32, 32, 3) and ds.x_test.shape == (0, 32, 32, 3)
  assert ds.y_train.tolist() == [1, 2, 3, 1]


# ---------------------------------------------------------------- bug 5: predict on empty input


def test_predict_empty_input_shape():
  m, v, _ = _mlp()
  out = predict(m, v, np.zeros((0, 3), np.float32))
  assert out.shape == (0, 2) and out.dtype == predict(m, v, np.zeros((1, 3), np.float32)).dtype


# ---------------------------------------------------------------- bug 6: cross_entropy range, synthetic seed/shape


@pytest.mark.parametrize("bad", [-1, 4])
def test_cross_entropy_refuses_out_of_range_labels(bad):
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    cross_entropy(jnp.zeros((2, 4)), jnp.array([0, bad]))


def test_cross_entropy_matches_numpy():
  logits = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
  y = np.array([0, 3, 2, 1, 3])
  shifted = logits - logits.max(-1, keepdims=True)
  ref = -(shifted[np.arange(5), y] - np.log(np.exp(shifted).sum(-1))).mean()
  np.testing.assert_allclose(float(cross_entropy(jnp.asarray(logits), jnp.asarray(y))), ref, rtol=1e-5)
  # under jit the labels are tracers: not checked, but in-range labels give the same value
  np.testing.assert_allclose(float(jax.jit(cross_entropy)(logits, y)), ref, rtol=1e-5)


@pytest.mark.parametrize("seed, exc", [(-1, ValueError), (1.5, TypeError)])
def test_synthetic_checks_seed(seed, exc):
  with pytest.raises(exc, match="seed"):
    data.synthetic_classification(seed=seed, num_samples=8)


@pytest.mark.parametrize("shape, exc", [((0,), ValueError), ((4, -1), ValueError), ((), TypeError),
                                        (16, TypeError)])
def test_synthetic_checks_shape(shape, exc):
  with pytest.raises(exc, match=r"shape(\[\d\])? must be"):
    data.synthetic_classification(num_samples=8, shape=shape)
