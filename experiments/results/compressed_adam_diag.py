"""Per-step diagnosis of ``optax.chain(topk(ratio), optax.adam(lr))`` against ``optax.adam(lr)`` (issue 18
item 1, mnist1d at 1%): one seed, the same batches for both arms, 8 simulated workers x 32.

Records every ``--every`` steps: the training loss of the step's batch (before the update), the test
accuracy, the error-feedback residual's norm over the gradient's norm (worker 0), the fraction of
coordinates released by the aggregate (any worker sent it), how long the released coordinates waited since
their previous release, Adam's sqrt(v_hat) on released vs silent coordinates, and per leaf how far the
parameters moved from their initial values (|theta_t - theta_0|, mean over the leaf) in both arms.

  nice -n 5 python3 experiments/results/compressed_adam_diag.py --dataset=mnist1d --seed=3 --steps=600 \
    --out=experiments/results/compressed_adam_diag_mnist1d_s3.json
"""
import json
import pathlib
import sys

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mlsys_jax import data, models  # noqa: E402
from mlsys_jax.comm import sparse as sp  # noqa: E402
from mlsys_jax.comm.adaptive_ef import spread_releases  # noqa: E402
from mlsys_jax.comm.lowrank import _state_field  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "mnist1d", ["mnist1d", "digits"], "Data set.")
_SEED = flags.DEFINE_integer("seed", 3, "Seed.")
_STEPS = flags.DEFINE_integer("steps", 600, "Steps.")
_RATIO = flags.DEFINE_float("ratio", 0.01, "Density.")
_EVERY = flags.DEFINE_integer("every", 25, "Record every N steps.")
_OUT = flags.DEFINE_string("out", "/tmp/diag.json", "Output JSON.")
_ARMS = flags.DEFINE_list(
    "arms", ["adam", "topk"],
    "Arms: adam, topk (the plain chain), oraclev (diagnostic: Adam's first moment from topk's releases, its "
    "second moment from the DENSE averaged gradient, which no compressor has), freshmask (diagnostic: the dense "
    "averaged gradient of the step on topk's released coordinates only), spread16 (chain(spread_releases(topk, "
    "mode='leaky', max_interval=16), adam); its 'released' statistics count deliveries).")

W, B, LR = 8, 32, 1e-3


def _oracle_v(compressor, lr, b1=0.9, b2=0.999, eps=1e-8):
  """Diagnostic only: ``(compressor_state, adam_state)`` as ``chain(compressor, adam)``, but Adam's ``nu``
  is fed the dense ``pmean`` of the gradients (bytes no compressor sends) and ``mu`` the releases."""
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def init(p):
    return compressor.init(p), (adam.init(p),)

  def update(g, state, p=None):
    cs, (s,) = state
    rel, cs = compressor.update(g, cs, p)
    dense = jax.lax.pmean(g, "d")
    count = s.count + 1
    mu = jax.tree_util.tree_map(lambda m, x: b1 * m + (1 - b1) * x, s.mu, rel)
    nu = jax.tree_util.tree_map(lambda v, x: b2 * v + (1 - b2) * x * x, s.nu, dense)
    c1, c2 = 1 - b1 ** count, 1 - b2 ** count
    upd = jax.tree_util.tree_map(lambda m, v: -lr * (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
    return upd, (cs, (s._replace(count=count, mu=mu, nu=nu),))
  return optax.GradientTransformation(init, update)


def _fresh_mask(compressor):
  """Diagnostic only: the compressor runs as usual (its residuals, its selection), but what reaches Adam is
  the DENSE averaged gradient of this step on the coordinates the compressor released (zero elsewhere):
  the same sparsity pattern in time, without the error feedback's stale mass."""
  def update(g, state, p=None):
    rel, state = compressor.update(g, state, p)
    dense = jax.lax.pmean(g, "d")
    return jax.tree_util.tree_map(lambda r, x: jnp.where(r != 0, x, 0.0), rel, dense), state
  return optax.GradientTransformation(compressor.init, update)


def main(argv):
  del argv
  ds = data.load_mnist1d(seed=0) if _DATASET.value == "mnist1d" else data.load_digits(seed=0)
  model = (models.CNN(dims=1, kernel_size=5, channels=(32, 64)) if ds.name == "mnist1d"
           else models.CNN(channels=(32, 64)))
  params0 = model.init(jax.random.PRNGKey(_SEED.value), ds.x_train[:2])["params"]
  names = ["/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params0)[0]]
  every = {"adam": (optax.adam(LR), True),
           "topk": (optax.chain(sp.topk(_RATIO.value, axis_name="d"), optax.adam(LR)), False),
           "oraclev": (_oracle_v(sp.topk(_RATIO.value, axis_name="d"), LR), False),
           "freshmask": (optax.chain(_fresh_mask(sp.topk(_RATIO.value, axis_name="d")), optax.adam(LR)), False),
           "spread16": (optax.chain(spread_releases(sp.topk(_RATIO.value, axis_name="d"), mode="leaky",
                                                    max_interval=16), optax.adam(LR)), False)}
  arms = {a: every[a] for a in _ARMS.value}
  loss_fn = jax.jit(lambda p, x, y: models.cross_entropy(model.apply({"params": p}, x), y))
  rec = {}
  for arm, (tx, avg) in arms.items():
    step = models.make_simulated_data_parallel_step(model, tx, axis_name="d", average_grads=avg)
    params = params0
    state = models.replicate(tx.init(params), W)
    rng = np.random.default_rng(_SEED.value)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    last = np.full(n, -1, np.int64)   # step of the previous release of each coordinate
    waits_hist, rows = [], []
    waits_window = []
    sent_count = np.zeros(n)
    adam_state = lambda s: s if avg else s[1]   # noqa: E731  (chain: (compressor, adam); adam: (ScaleByAdam, ..))
    for t in range(_STEPS.value):
      idx = rng.choice(len(ds.x_train), W * B, replace=False)
      xb = ds.x_train[idx].reshape(W, B, *ds.x_train.shape[1:])
      yb = ds.y_train[idx].reshape(W, B)
      loss = float(loss_fn(params, ds.x_train[idx], ds.y_train[idx]))
      mu_prev = jax.tree_util.tree_leaves(adam_state(state)[0].mu)
      params, state = step(params, state, xb, yb)
      ad = adam_state(state)[0]
      mu = np.concatenate([np.asarray(x)[0].ravel() for x in jax.tree_util.tree_leaves(ad.mu)])
      mu_p = np.concatenate([np.asarray(x)[0].ravel() for x in mu_prev])
      released = mu != np.float32(0.9) * mu_p
      if not avg:
        w = t - last[released]
        waits_window.append(w)
        last[released] = t
        sent_count += released
      if (t + 1) % _EVERY.value == 0 or t == 0:
        nu = np.concatenate([np.asarray(x)[0].ravel() for x in jax.tree_util.tree_leaves(ad.nu)])
        vhat = np.sqrt(nu / (1 - 0.999 ** (t + 1)))
        disp = [float(np.abs(np.asarray(a) - np.asarray(b)).mean())
                for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params0))]
        row = {"step": t + 1, "loss": loss,
               "test_acc": float(models.evaluate(model, {"params": params}, ds.x_test, ds.y_test)),
               "disp_per_leaf_in_lr": [d / LR for d in disp],
               "sqrt_vhat_median": float(np.median(vhat))}
        if not avg:
          res = np.concatenate([np.asarray(x)[0].ravel()
                                for x in jax.tree_util.tree_leaves(_state_field(state[0], "residual"))])
          ww = np.concatenate(waits_window) if waits_window else np.zeros(0)
          waits_hist.append(ww)
          waits_window = []
          row.update({
              "released_frac_last_step": float(released.mean()),
              "residual_norm": float(np.linalg.norm(res)),
              "wait_median": float(np.median(ww)) if ww.size else 0.0,
              "wait_p90": float(np.quantile(ww, 0.9)) if ww.size else 0.0,
              "wait_mean_weighted": float(ww.mean()) if ww.size else 0.0,
              "ever_released_frac": float((last >= 0).mean()),
              "sqrt_vhat_median_released": float(np.median(vhat[released])) if released.any() else 0.0,
              "sqrt_vhat_median_silent": float(np.median(vhat[~released])),
              "mu_over_sqrtv_median_released": float(np.median(np.abs(mu[released]) / (vhat[released] + 1e-8)
                                                               * 1 / (1 - 0.9 ** (t + 1)))) if released.any()
              else 0.0,
          })
        rows.append(row)
        print(arm, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                    if k != "disp_per_leaf_in_lr"}, flush=True)
    out = {"rows": rows, "leaves": names,
           "leaf_sizes": [int(x.size) for x in jax.tree_util.tree_leaves(params0)]}
    if not avg:
      offs = np.cumsum([0] + out["leaf_sizes"])
      out["sent_per_leaf_mean_steps_between"] = [
          float(_STEPS.value / max(sent_count[a:b].mean(), 1e-9)) for a, b in zip(offs[:-1], offs[1:])]
      out["never_sent_per_leaf"] = [float((sent_count[a:b] == 0).mean()) for a, b in zip(offs[:-1], offs[1:])]
    rec[arm] = out
  pathlib.Path(_OUT.value).write_text(json.dumps({"dataset": ds.name, "seed": _SEED.value, "ratio": _RATIO.value,
                                                  "steps": _STEPS.value, "arms": rec}, indent=1))
  print("wrote", _OUT.value)


if __name__ == "__main__":
  app.run(main)
