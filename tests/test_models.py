"""Tests of mlsys_jax.models: shapes, injected primitives, a real training run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlsys_jax import data, models


@pytest.mark.parametrize("model,shape", [
    (models.MLP(features=(16,), num_classes=5), (2, 8, 8, 1)),
    (models.CNN(num_classes=5, channels=(4, 8)), (2, 8, 8, 1)),
    (models.CNN(num_classes=5, channels=(4,), dims=1, kernel_size=5), (2, 40, 1)),
    (models.ResNet20(num_classes=5, width=4, blocks_per_stage=1), (2, 16, 16, 3)),
])
def test_forward_shapes(model, shape):
  x = jnp.ones(shape)
  v = model.init(jax.random.PRNGKey(0), x)
  assert model.apply(v, x).shape == (2, 5)


def test_injected_primitives_are_used():
  calls = {"dot": 0, "conv": 0}

  def counting_dot(*a, **k):
    calls["dot"] += 1
    return jax.lax.dot_general(*a, **k)

  def counting_conv(*a, **k):
    calls["conv"] += 1
    return jax.lax.conv_general_dilated(*a, **k)

  m = models.CNN(num_classes=3, channels=(4, 4), dot_general=counting_dot,
                 conv_general_dilated=counting_conv)
  x = jnp.ones((1, 8, 8, 1))
  v = m.init(jax.random.PRNGKey(0), x)
  calls.update(dot=0, conv=0)
  ref = models.CNN(num_classes=3, channels=(4, 4)).apply(v, x)
  np.testing.assert_allclose(m.apply(v, x), ref, rtol=1e-6)
  assert calls == {"dot": 2, "conv": 2}


def test_cnn_rank_error():
  with pytest.raises(ValueError, match="rank 4"):
    models.CNN().init(jax.random.PRNGKey(0), jnp.ones((2, 8, 8)))


def test_resnet_batchnorm_state_updates():
  ds = data.synthetic_classification(seed=0, num_samples=64, shape=(32, 32, 3), num_classes=2)
  m = models.ResNet20(num_classes=2, width=4, blocks_per_stage=1)
  v, hist = models.train_classifier(m, ds, optax.sgd(0.05, momentum=0.9), epochs=1, batch_size=16)
  assert "batch_stats" in v
  init = m.init(jax.random.PRNGKey(0), ds.x_train[:16])
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), v["batch_stats"],
                                 init["batch_stats"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  assert np.isfinite(hist["loss"][0])


def test_cnn_learns_digits():
  ds = data.load_digits(seed=0)
  v, hist = models.train_classifier(models.CNN(channels=(16, 32), hidden=64), ds, optax.adam(2e-3),
                                    epochs=4, batch_size=32, seed=0)
  assert hist["test_accuracy"][-1] > 0.9
  assert models.evaluate(models.CNN(channels=(16, 32), hidden=64), v, ds.x_test, ds.y_test) == \
      pytest.approx(hist["test_accuracy"][-1])


def test_loss_extra_and_errors():
  ds = data.synthetic_classification(seed=1, num_samples=64, shape=(4,), num_classes=2)
  m = models.MLP(features=(8,), num_classes=2)
  extra = lambda p, xb, yb, key: 0.1 * sum(jnp.sum(w ** 2) for w in jax.tree_util.tree_leaves(p))
  _, hist = models.train_classifier(m, ds, optax.sgd(0.1), epochs=1, batch_size=16, loss_extra=extra)
  assert np.isfinite(hist["loss"][0])
  tx = optax.sgd(0.1)
  st = models.create_train_state(m, jax.random.PRNGKey(0), ds.x_train[:4], tx)
  st2, metrics = models.make_train_step(m, tx)(st, ds.x_train[:16], ds.y_train[:16], jax.random.PRNGKey(1))
  assert int(st2.step) == 1 and set(metrics) == {"loss", "extra", "accuracy"}
  with pytest.raises(ValueError, match="logits"):
    models.cross_entropy(jnp.ones((3,)), jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match="epochs"):
    models.train_classifier(m, ds, optax.sgd(0.1), epochs=0)


def test_simulated_data_parallel_step_equals_full_batch_sgd():
  ds = data.load_digits(seed=0)
  model = models.MLP(features=(16,), num_classes=10)
  params = model.init(jax.random.PRNGKey(0), ds.x_train[:2])["params"]
  tx = optax.sgd(0.1)
  workers, b = 4, 8
  xb = ds.x_train[:workers * b].reshape(workers, b, *ds.x_train.shape[1:])
  yb = ds.y_train[:workers * b].reshape(workers, b)
  step = models.make_simulated_data_parallel_step(model, tx, average_grads=True)
  states = models.replicate(tx.init(params), workers)
  new, new_states = step(params, states, xb, yb)
  # the mean of equal-size per-worker mean gradients is the full-batch gradient
  g = jax.grad(lambda p: models.cross_entropy(model.apply({"params": p}, ds.x_train[:workers * b]),
                                              ds.y_train[:workers * b]))(params)
  ref = optax.apply_updates(params, jax.tree_util.tree_map(lambda x: -0.1 * x, g))
  for a, r in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
  assert jax.tree_util.tree_structure(new_states) == jax.tree_util.tree_structure(states)
  with pytest.raises(ValueError, match="workers"):
    models.replicate(params, 0)
