"""Demo rows of mlsys_jax.robust.gradsigns: embed (hinge loss with a relative margin, fresh class-0 inputs
per step) and extract a 32-bit signature on digits."""

import jax
import jax.numpy as jnp
import optax

from mlsys_jax import data, models
from mlsys_jax.robust import gradsigns as gs

ORDER = 50
TECHNIQUE = "GradSigns"


def run(seed: int):
  ds = data.load_digits(seed=seed)
  m = models.MLP(features=(64,))
  wm = gs.gradsigns_keygen(jax.random.PRNGKey(seed + 7), ds.input_shape, 32)
  pool = jnp.asarray(ds.x_train[ds.y_train == 0])

  def extra(p, xb, yb, k):
    xt = pool[jax.random.choice(k, pool.shape[0], (32,), replace=False)]
    return gs.gradsigns_regularizer(lambda x: m.apply({"params": p}, x), xt, wm, 3.0, loss="hinge",
                                    per_example=True)
  v, h = models.train_classifier(m, ds, optax.adam(2e-3), epochs=4, batch_size=32, seed=seed,
                                 loss_extra=extra)
  v0, h0 = models.train_classifier(m, ds, optax.adam(2e-3), epochs=4, batch_size=32, seed=seed)
  xtest = jnp.asarray(ds.x_test[ds.y_test == 0])
  wb = gs.extract_whitebox(lambda x: m.apply(v, x), xtest, wm)
  bb, q = gs.extract_blackbox(lambda x: jax.nn.softmax(m.apply(v, x)), xtest[:20], wm)
  ver = gs.verify(bb, wm)
  other = gs.verify(gs.extract_whitebox(lambda x: m.apply(v0, x), xtest, wm), wm)
  return [
      ("GradSigns", "digits MLP accuracy plain / watermarked (32-bit signature)",
       f"{h0['test_accuracy'][-1]:.3f} / {h['test_accuracy'][-1]:.3f}"),
      ("GradSigns", f"BER white-box / black-box ({q} queries); owner claim P(false)",
       f"{gs.signature_ber(wb, wm):.3f} / {gs.signature_ber(bb, wm):.3f}; {ver.false_claim_probability:.1e}"),
      ("GradSigns", "independent model: matching bits, claimed?", f"{other.matches}/32, {other.owned}"),
  ]
