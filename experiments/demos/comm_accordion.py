"""Demo rows of mlsys_jax.comm.lowrank / accordion: PowerSGD against the truncated SVD on a real gradient,
and ACCORDION's per-layer switching with its bytes on a short digits run with a learning-rate decay."""

import jax
import numpy as np
import optax

from mlsys_jax import data, models
from mlsys_jax.comm import accordion, accordion_regime, lowrank

from .comm_sparse import digits_cnn

ORDER = 21
TECHNIQUE = "ACCORDION / PowerSGD"


def run(seed: int):
  ds, m, params, grad = digits_cnn(seed)
  # (1) PowerSGD rank 2 on the hidden layer's gradient: warm-started steps vs the best rank-2 (SVD).
  g = np.asarray(grad(params, ds.x_train[:256], ds.y_train[:256])["Dense_0"]["kernel"], np.float64)
  s = np.linalg.svd(g, compute_uv=False)
  best = np.sqrt(np.sum(s[2:] ** 2))
  q = jax.random.normal(jax.random.PRNGKey(seed), (g.shape[1], 2))
  errs = []
  for _ in range(10):
    approx, _, q = lowrank.powersgd_step(jax.numpy.asarray(g, jax.numpy.float32), q)
    errs.append(np.linalg.norm(np.asarray(approx, np.float64) - g) / best)
  # (2) ACCORDION rank 4 vs 1, two epochs, lr drop after the first; decisions every 15 steps.
  spe = len(ds.x_train) // 32
  sched = optax.piecewise_constant_schedule(0.05, {spe: 0.1})
  make = lambda reg: optax.chain(   # noqa: E731
      accordion("powersgd", low=4, high=1, interval=15, accumulate=5, lr_schedule=sched, regime=reg),
      optax.sgd(sched, momentum=0.9))
  tx = make(None)
  st = st_static = tx.init(params)
  params_static = params
  step = jax.jit(tx.update)
  static_steps = {}   # (3) the same run with one compiled step per regime (no lax.cond; the GPU form)
  crit = []
  for epoch in range(2):
    for xb, yb in data.batches(ds.x_train, ds.y_train, 32, seed=seed + epoch):
      crit.append(float(np.mean(np.asarray(st[0].critical))))
      upd, st = step(grad(params, xb, yb), st, params)
      params = optax.apply_updates(params, upd)
      reg = accordion_regime(st_static[0])
      if reg not in static_steps:
        static_steps[reg] = jax.jit(make(reg).update)
      upd, st_static = static_steps[reg](grad(params_static, xb, yb), st_static, params_static)
      params_static = optax.apply_updates(params_static, upd)
  acc = models.evaluate(m, {"params": params}, ds.x_test, ds.y_test)
  acc_static = models.evaluate(m, {"params": params_static}, ds.x_test, ds.y_test)
  gap = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_static)))
  n_steps = len(crit)
  frac = float(np.mean(crit))
  static4 = lowrank.powersgd_bytes(params, 4) * n_steps
  return [
      ("PowerSGD", "rank-2 error / SVD optimum on a digits CNN gradient after 1, 3, 10 warm-started steps",
       f"{errs[0]:.3f}, {errs[2]:.3f}, {errs[-1]:.3f}"),
      ("ACCORDION", "digits, 2 epochs, rank 4 vs 1, lr drop after epoch 1: share of layer-steps at rank 4; "
       "accuracy; KB sent vs static rank 4",
       f"{frac:.2f}; {acc:.3f}; {float(st[0].total_bytes) / 1e3:.0f} KB vs {static4 / 1e3:.0f} KB"),
      ("ACCORDION", "the same run with accordion(regime=accordion_regime(state)): compiled regimes; accuracy; "
       "largest parameter difference from the lax.cond run; steps run off regime",
       f"{len(static_steps)}; {acc_static:.3f}; {gap:.1e}; {int(st_static[0].off_regime_steps)}"),
  ]
