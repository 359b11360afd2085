"""Exploratory screen (issue 18 item 1, density 0.1%): do more *distinct* released coordinates help
``chain(c, adam)``? By the burst argument in docs/comm.md (one error-feedback release moves Adam by at most
~32 lr whatever its size), the chain's reach grows with the number of distinct coordinates released per
step, and Top-k's workers largely pick the same ones. "Disjoint Top-k": worker w selects its k entries
only among coordinates i with (i + step) % W == w (the partition rotates every step, so every coordinate
is eligible on every worker once per W steps; error feedback keeps the rest), so the W payloads never
overlap: W*k distinct coordinates per step at Top-k's bytes. Not a library transform; the aggregate is
formed with a dense psum here (simulation), the bytes counted are k (index, value) slots per step.

  python3 experiments/results/compressed_adam_disjoint_screen.py [--dataset=mnist1d] [--seeds=2]
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from mlsys_jax import data, models, stats  # noqa: E402
from mlsys_jax.comm import sparse as sp  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "digits", ["mnist1d", "digits"], "Data set.")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Paired seeds.")
_STEPS = flags.DEFINE_integer("steps", 600, "Steps.")
_RATIO = flags.DEFINE_float("ratio", 0.001, "Density per worker.")
W, B, LR = 8, 32, 1e-3


def disjoint_topk(ratio: float, workers: int, axis_name: str = "d") -> optax.GradientTransformation:
  def init(params):
    return (jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

  def update(g, st, params=None):
    flat, unravel = ravel_pytree(g)
    acc = flat + ravel_pytree(st[0])[0]
    n = acc.shape[0]
    k = max(1, int(round(ratio * n)))
    mine = ((jnp.arange(n) + st[1]) % workers) == jax.lax.axis_index(axis_name)
    _, idx = jax.lax.top_k(jnp.where(mine, jnp.abs(acc), -1.0), k)
    sent = jnp.zeros_like(acc).at[idx].set(acc[idx])
    out = jax.lax.psum(sent, axis_name) / workers
    return unravel(out), (unravel(acc - sent), st[1] + 1, st[2] + float(k * 8 + 4))

  return optax.GradientTransformation(init, update)


def main(argv):
  del argv
  ds = data.load_mnist1d(seed=0) if _DATASET.value == "mnist1d" else data.load_digits(seed=0)
  model = (models.CNN(dims=1, kernel_size=5, channels=(32, 64)) if ds.name == "mnist1d"
           else models.CNN(channels=(32, 64)))
  arms = {"adam": (optax.adam(LR), True),
          "topk": (optax.chain(sp.topk(_RATIO.value, axis_name="d"), optax.adam(LR)), False),
          "disjoint_topk": (optax.chain(disjoint_topk(_RATIO.value, W), optax.adam(LR)), False)}
  steps = {k: models.make_simulated_data_parallel_step(model, tx, axis_name="d", average_grads=avg)
           for k, (tx, avg) in arms.items()}
  acc, t0 = {k: [] for k in arms}, time.perf_counter()
  for s in range(_SEEDS.value):
    for name, (tx, _) in arms.items():
      params = model.init(jax.random.PRNGKey(s), ds.x_train[:2])["params"]
      state = models.replicate(tx.init(params), W)
      rng = np.random.default_rng(s)
      for _ in range(_STEPS.value):
        idx = rng.choice(len(ds.x_train), W * B, replace=False)
        params, state = steps[name](params, state, ds.x_train[idx].reshape(W, B, *ds.x_train.shape[1:]),
                                    ds.y_train[idx].reshape(W, B))
      acc[name].append(models.evaluate(model, {"params": params}, ds.x_test, ds.y_test))
      print(f"seed {s} {name:14s} {acc[name][-1]:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
  comp = {k: stats.compare(acc[k], acc["adam"])._asdict() for k in ("topk", "disjoint_topk")}
  comp["disjoint_topk vs topk"] = stats.compare(acc["disjoint_topk"], acc["topk"])._asdict()
  for k, v in acc.items():
    print(f"{k:14s} {np.mean(v) * 100:.2f}  diff vs adam {np.mean(np.subtract(v, acc['adam'])) * 100:+.2f} pt")
  out = pathlib.Path(__file__).with_name(f"compressed_adam_disjoint_screen_{ds.name}.json")
  out.write_text(json.dumps({"dataset": ds.name, "steps": _STEPS.value, "ratio": _RATIO.value, "workers": W,
                             "batch": B, "lr": LR, "accuracy": acc, "comparisons": comp}, indent=1))
  print("wrote", out)


if __name__ == "__main__":
  app.run(main)
