"""Demo rows of mlsys_jax.robust.bit_errors: fault statistics and RErr of a CNN on digits."""

import jax
import jax.numpy as jnp
import optax

from mlsys_jax import data, models
from mlsys_jax.robust import bit_errors as be

ORDER = 30
TECHNIQUE = "RandBET (bit errors)"


def run(seed: int):
  codes = jax.random.randint(jax.random.PRNGKey(seed), (1_000_000,), 0, 256).astype(jnp.uint8)
  noisy = be.inject_bit_errors(jax.random.PRNGKey(seed + 1), codes, 0.01, 8)
  rate = float(be.bit_error_rate(codes, noisy, 8))
  ds = data.load_digits(seed=seed)
  m = models.CNN(channels=(16, 32), hidden=64)
  v, _ = models.train_classifier(m, ds, optax.adam(2e-3), epochs=4, batch_size=32, seed=seed)
  apply = lambda p, x: m.apply({"params": p}, x)
  x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
  sym = be.robust_error(apply, v["params"], x, y, p=0.01, bits=8, num_patterns=5, symmetric=True)
  rq = be.robust_error(apply, v["params"], x, y, p=0.01, bits=8, num_patterns=5)
  return [
      ("RandBET (bit errors)", "measured flip rate of 8M bits at p=1%", f"{100 * rate:.3f}%"),
      ("RandBET (bit errors)", "digits CNN 8-bit: Err / RErr@p=1% symmetric quant. vs RQuant (5 patterns; "
       "too few, on too easy a task, to separate them: the full experiment, MNIST-1D with 25 patterns, gives "
       "normal 37.8% vs RQuant 22.3% vs clipping + RandBET 9.8%)",
       f"{100 * rq.err:.1f}% / {100 * sym.rerr_mean:.1f}% vs {100 * rq.rerr_mean:.1f}%"),
  ]
