"""Demo rows of mlsys_jax.comm.sparse: SIDCo's density on real gradients, exact error feedback, SIDCo
before Adam (the user's chain) versus after the local moment update (``precondition``), and the residual kept
as one buffer (``flat_state=True``)."""

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

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


def _train(ds, m, params, grad, tx, seed):
  """One epoch (batch 32) with ``tx``: ``(accuracy, densities, state)``."""
  st = tx.init(params)
  step = jax.jit(tx.update)
  dens = []
  for xb, yb in data.batches(ds.x_train, ds.y_train, 32, seed=seed):
    upd, st = step(grad(params, xb, yb), st, params)
    params = optax.apply_updates(params, upd)
    if hasattr(st[0], "density"):
      dens.append(float(st[0].density))
  return models.evaluate(m, {"params": params}, ds.x_test, ds.y_test), dens, st


def run(seed: int):
  ds, m, params, grad = digits_cnn(seed)
  lr = 2e-3
  acc_adam, _, _ = _train(ds, m, params, grad, optax.adam(lr), seed)
  acc, dens, st = _train(ds, m, params, grad, optax.chain(sp.sidco(0.01, distribution="gpareto"),
                                                          optax.adam(lr)), seed)
  acc_pre, _, st_pre = _train(ds, m, params, grad, optax.chain(
      sp.sidco(0.01, distribution="gpareto", precondition=optax.scale_by_adam()), optax.sgd(lr)), seed)
  acc_flat, _, st_flat = _train(ds, m, params, grad, optax.chain(
      sp.sidco(0.01, distribution="gpareto", flat_state=True), optax.adam(lr)), seed)
  same = acc_flat == acc and bool(jnp.array_equal(ravel_pytree(st[0].residual)[0], st_flat[0].residual))
  buffers = lambda s_: len(jax.tree_util.tree_leaves(s_))
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  return [
      ("SIDCo", "achieved/target density, GP estimator, target 1%, one epoch of digits CNN grads",
       f"{sum(dens) / len(dens) / 0.01:.2f} (min {min(dens) / 0.01:.2f}, max {max(dens) / 0.01:.2f})"),
      ("SIDCo", "digits acc., 1 epoch, 1%: chain(sidco, adam) / sidco(precondition=scale_by_adam) + sgd / "
       "adam; KB sent",
       f"{acc:.3f} / {acc_pre:.3f} / {acc_adam:.3f}; {float(st_pre[0].total_bytes) / 1e3:.0f} KB vs "
       f"{4 * n * len(dens) / 1e3:.0f} KB dense"),
      ("SIDCo", "chain(sidco(flat_state=True), adam): optimizer-state buffers, tree vs flat residual; the same "
       "epoch's accuracy and residual bitwise",
       f"{buffers(st)} vs {buffers(st_flat)}; {same}"),
  ]
