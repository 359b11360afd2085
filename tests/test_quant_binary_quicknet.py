"""QuickNet family: parameter counts and memory against the Larq Zoo's published numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlsys_jax.quant import binary as qb

# Published in the docstrings of larq_zoo/sota/quicknet.py (Larq Zoo v1.0, "ImageNet Metrics" tables):
# parameters and memory (MiB, Larq's models.summary: 1 bit per binary weight, 32 bits otherwise).
ZOO = {qb.QuickNet: (13_234_088, 4.17), qb.QuickNetSmall: (12_655_688, 4.00),
       qb.QuickNetLarge: (23_342_248, 5.40)}


@pytest.mark.parametrize("cls", list(ZOO))
def test_param_counts_match_larq_zoo(cls):
  m = cls()
  # Counts do not depend on the image size: a 32x32 input keeps this fast (shapes only).
  v = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  c = qb.larq_param_count(m, v)
  params, mib = ZOO[cls]
  assert c["larq_total"] == params
  assert round(c["larq_memory_bytes"] / 2**20, 2) == mib
  n_binary = sum(b * 9 * f * f for b, f in zip(m.section_blocks, m.section_filters))
  assert c["binary"] == n_binary
  labels = qb.binary_param_labels(v["params"])
  assert jax.tree_util.tree_leaves(labels).count("binary") == sum(m.section_blocks)


@pytest.mark.slow
def test_small_quicknet_forward_train_and_bop_step():
  m = qb.QuickNet(section_blocks=(1, 1), section_filters=(8, 16), num_classes=3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
  y = jnp.array([0, 1, 2, 0])
  v = jax.jit(m.init)(jax.random.PRNGKey(0), x)
  assert v["params"]["QuickNetBlock_0"]["BinaryConv"]["kernel"].shape == (3, 3, 8, 8)
  tx = qb.case_optimizer(optax.chain(qb.bop(threshold=0.0, gamma=1.0)), optax.adam(1e-3))

  @jax.jit
  def step(params, stats, opt):
    def loss(p):
      logits, new = m.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
    (l, new), g = jax.value_and_grad(loss, has_aux=True)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), new["batch_stats"], opt, l

  p, s, o, l0 = step(v["params"], v["batch_stats"], tx.init(v["params"]))
  k = np.asarray(p["QuickNetBlock_0"]["BinaryConv"]["kernel"])
  np.testing.assert_allclose(np.abs(k), 1.0, atol=2e-7)   # Bop leaves binary kernels at +-1
  assert float(qb.flip_ratio(o)) > 0 and np.isfinite(float(l0))
