"""GPU time of a training step with the GradSigns regularizer (double backprop through the expected
input gradient of 64 target-class inputs) against a plain step, ResNet-20 on CIFAR-shaped data.

  PYTHONPATH=. python benchmarks/gradsigns_step.py --out $OUT
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import environment, parse_args, print_table, write_json  # noqa: E402
from mlsys_jax import models, stats  # noqa: E402
from mlsys_jax.robust import gradsigns as gs  # noqa: E402


def main():
  args = parse_args(__doc__)
  env = environment()
  batch, n_target = (8, 4) if args.small else (128, 64)
  model = models.ResNet20()
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, 32, 32, 3))
  y = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, 10)
  xt = jax.random.normal(jax.random.PRNGKey(2), (n_target, 32, 32, 3))
  wm = gs.gradsigns_keygen(jax.random.PRNGKey(3), (32, 32, 3), 64)
  tx = optax.adam(1e-3)
  st = models.create_train_state(model, jax.random.PRNGKey(4), x, tx)
  extra = lambda p, xb, yb, k: gs.gradsigns_regularizer(
      lambda xx: model.apply({"params": p, **st.model_state}, xx, train=False), xt, wm)
  plain = models.make_train_step(model, tx)
  signed = models.make_train_step(model, tx, loss_extra=extra)
  key = jax.random.PRNGKey(5)
  t = stats.time_interleaved(lambda: signed(st, x, y, key)[0].params, lambda: plain(st, x, y, key)[0].params,
                             repeats=30, warmup=3)
  rows = [{"step": f"ResNet-20, batch {batch}, {n_target} carrier inputs, N=64",
           "plain ms": t.median_b * 1e3, "with GradSigns ms": t.median_a * 1e3,
           "ratio": t.median_a / t.median_b}]
  print(env)
  print_table(rows, ["step", "plain ms", "with GradSigns ms", "ratio"])
  write_json(args.out, "gradsigns_step", {"env": env, "rows": rows})


if __name__ == "__main__":
  main()
