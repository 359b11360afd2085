"""Demo rows of mlsys_jax.quant.fp_align: accuracy of a digits CNN vs alignment bits of its FP16 dots."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax import data, models
from mlsys_jax.quant import fp_align

ORDER = 13
TECHNIQUE = "FP alignment (Abdelaziz)"


def run(seed: int):
  ds = data.load_digits(seed=seed)
  kw = dict(channels=(8, 16), hidden=32)
  variables, hist = models.train_classifier(models.CNN(**kw), ds, optax.adam(3e-3), epochs=3,
                                            batch_size=32, seed=seed)
  x, y = jnp.asarray(ds.x_test), ds.y_test
  shifts = [fp_align.max_alignment_shift(f) for f in ("fp16", "fp8_e4m3", "bf16")]
  rows = [(TECHNIQUE, "largest alignment shift FP16 / FP8-E4M3 / BF16 (2 (emax - emin))",
           " / ".join(map(str, shifts)))]

  @functools.partial(jax.jit, static_argnums=0)
  def acc(conv, w):   # one compiled program for every w (align_bits traced, accumulator for w <= 12)
    cfg = fp_align.FpAlignConfig("fp16", w, conv, max_align_bits=12)
    m = models.CNN(dot_general=fp_align.fp_align_dot_general(cfg),
                   conv_general_dilated=fp_align.fp_align_conv_general_dilated(cfg), **kw)
    return jnp.mean(jnp.argmax(m.apply(variables, x), -1) == y)

  ws = (2, 4, 8, 12)
  drop = [float(acc("drop", jnp.int32(w))) for w in ws]
  trunc = float(acc("truncate", jnp.int32(2)))
  rows.append((TECHNIQUE, "digits CNN, FP16 dots, test acc. at w = 2/4/8/12 bits, 'drop' convention "
               f"(float32: {hist['test_accuracy'][-1]:.3f})", " / ".join(f"{a:.3f}" for a in drop)))
  rows.append((TECHNIQUE, "same at w = 2, 'truncate' convention (bits below the window chopped)",
               f"{trunc:.3f}"))
  # exponent spread of the last dense layer's products (the paper's motivation)
  hist_fn = jax.jit(lambda v, xb: fp_align.alignment_shift_histogram(
      _hidden(v, kw, xb).astype(jnp.float16), v["params"]["Dense_1"]["kernel"].astype(jnp.float16),
      fmt="fp16"))
  h = np.asarray(hist_fn(variables, x[:64]))
  rows.append((TECHNIQUE, "logit layer: share of products shifted by more than 8 bits / largest shift",
               f"{h[9:].sum() / h.sum():.3f} / {int(np.nonzero(h)[0].max())}"))
  r = fp_align.temporal_product(jnp.arange(-1024, 1024, dtype=jnp.int32), jnp.int32(2047), 12, 4)
  exact = bool(np.array_equal(np.asarray(r.product), np.arange(-1024, 1024) * 2047))
  rows.append((TECHNIQUE, "FP16 significand products from 4-bit lanes: passes, bit-exact",
               f"{r.passes}, {exact}"))
  return rows


def _hidden(variables, kw, x):
  """Input of the logit layer (the hidden dense activations)."""
  _, st = models.CNN(**kw).apply(variables, x, capture_intermediates=True,
                                 mutable=["intermediates"])
  return jax.nn.relu(st["intermediates"]["Dense_0"]["__call__"][0])
