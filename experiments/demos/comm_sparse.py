"""Demo rows of mlsys_jax.comm.sparse: SIDCo's density on real gradients and exact error feedback."""

import jax
import optax

from mlsys_jax import data, models
from mlsys_jax.comm import sparse as sp

ORDER = 20
TECHNIQUE = "SIDCo"


def digits_cnn(seed: int):
  """``(dataset, model, params, grad)`` of the digits CNN both comm demos train; ``grad(params, x, y)`` is
  the jitted cross-entropy gradient."""
  ds = data.load_digits(seed=seed)
  m = models.CNN(channels=(16, 32), hidden=64)
  params = m.init(jax.random.PRNGKey(seed), ds.x_train[:2])["params"]
  grad = jax.jit(jax.grad(lambda p, x, y: models.cross_entropy(m.apply({"params": p}, x), y)))
  return ds, m, params, grad


def run(seed: int):
  ds, m, params, grad = digits_cnn(seed)
  tx = optax.chain(sp.sidco(0.01, distribution="gpareto"), optax.adam(2e-3))
  st = tx.init(params)
  step = jax.jit(tx.update)
  dens = []
  for xb, yb in data.batches(ds.x_train, ds.y_train, 32, seed=seed):
    g = grad(params, xb, yb)
    upd, st = step(g, st, params)
    params = optax.apply_updates(params, upd)
    dens.append(float(st[0].density))
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  acc = models.evaluate(m, {"params": params}, ds.x_test, ds.y_test)
  return [
      ("SIDCo", "achieved/target density, GP estimator, target 1%, one epoch of digits CNN grads",
       f"{sum(dens) / len(dens) / 0.01:.2f} (min {min(dens) / 0.01:.2f}, max {max(dens) / 0.01:.2f})"),
      ("SIDCo", "digits accuracy after 1 epoch with optax.chain(sidco(0.01), adam); KB sent",
       f"{acc:.3f}; {float(st[0].total_bytes) / 1e3:.0f} KB vs {4 * n * len(dens) / 1e3:.0f} KB dense"),
  ]
