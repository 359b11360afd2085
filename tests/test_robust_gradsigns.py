"""Tests of mlsys_jax.robust.gradsigns: keys, regularizer, extraction, verification, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlsys_jax import data, models
from mlsys_jax.robust import gradsigns as gs


def _linear_logits(w):
  return lambda x: x.reshape(x.shape[0], -1) @ w


def test_keygen_shapes_and_determinism():
  a = gs.gradsigns_keygen(jax.random.PRNGKey(0), (8, 8, 1), 16, 40, target_class=3)
  b = gs.gradsigns_keygen(jax.random.PRNGKey(0), (8, 8, 1), 16, 40, target_class=3)
  assert a.projection.shape == (16, 40) and a.carriers.shape == (40,) and a.signature.shape == (16,)
  np.testing.assert_array_equal(a.projection, b.projection)
  assert len(set(np.asarray(a.carriers).tolist())) == 40 and float(jnp.abs(a.projection).max()) <= 1.0
  with pytest.raises(ValueError, match="num_carriers"):
    gs.gradsigns_keygen(jax.random.PRNGKey(0), (4,), 8, 5)
  with pytest.raises(ValueError, match="num_carriers"):       # empty carrier set
    gs.gradsigns_keygen(jax.random.PRNGKey(0), (4,), 8, 0)
  with pytest.raises(ValueError, match="target_class"):
    gs.gradsigns_keygen(jax.random.PRNGKey(0), (4,), 8, target_class=3, num_classes=3)
  with pytest.raises(ValueError, match="input_shape"):
    gs.gradsigns_keygen(jax.random.PRNGKey(0), (4, 0), 8)


def test_mean_input_gradient_matches_closed_form():
  # softmax regression: d CE / dx = W (p - onehot_t)
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
  got = gs.mean_input_gradient(_linear_logits(w), x, 1)
  p = jax.nn.softmax(x @ w)
  ref = ((p - jax.nn.one_hot(1, 3)) @ w.T).mean(0)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_whitebox_and_blackbox_agree_and_regularizer_is_bce():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(20, 10)), jnp.float32)
  wm = gs.gradsigns_keygen(jax.random.PRNGKey(2), (10,), 8, 10, num_classes=4)
  logits = _linear_logits(w)
  wb = gs.extract_whitebox(logits, x, wm)
  bb, q = gs.extract_blackbox(lambda xx: jax.nn.softmax(logits(xx)), x, wm, step=1e-3)
  assert q == 20 * 11
  z = wm.projection @ gs.mean_input_gradient(logits, x, 0)[wm.carriers]
  np.testing.assert_array_equal(wb, (z >= 0).astype(int))
  confident = jnp.abs(z) > 0.05
  np.testing.assert_array_equal(np.asarray(bb)[confident], np.asarray(wb)[confident])
  b = wm.signature
  ref = -jnp.mean(b * jnp.log(jax.nn.sigmoid(z)) + (1 - b) * jnp.log(1 - jax.nn.sigmoid(z)))
  np.testing.assert_allclose(gs.gradsigns_regularizer(logits, x, wm), ref, rtol=1e-5)


def _hinge_ref(z, b, kappa):
  z = np.asarray(z, np.float64)
  s = 2.0 * np.asarray(b) - 1.0
  return np.mean(np.maximum(0.0, kappa - s * z / np.sqrt(np.mean(z ** 2, axis=-1, keepdims=True))))


def test_hinge_regularizer_matches_numpy_and_vanishes_at_the_margin():
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(7, 12)), jnp.float32)
  wm = gs.gradsigns_keygen(jax.random.PRNGKey(4), (12,), 16, 12, target_class=2, num_classes=5)
  logits = _linear_logits(w)
  # float64 reference: per-input gradient of CE w.r.t. x for softmax regression is W (p - e_t)
  w64, x64 = np.asarray(w, np.float64), np.asarray(x, np.float64)
  p = np.exp(x64 @ w64)
  p /= p.sum(1, keepdims=True)
  g = (p - np.eye(5)[2]) @ w64.T                                     # (7, 12)
  k = np.asarray(wm.projection, np.float64)
  zs = g[:, np.asarray(wm.carriers)] @ k.T
  z = zs.mean(0)
  b = np.asarray(wm.signature)
  got = gs.gradsigns_regularizer(logits, x, wm, 2.5, loss="hinge", margin=0.3)
  np.testing.assert_allclose(got, 2.5 * _hinge_ref(z, b, 0.3), rtol=1e-4, atol=1e-6)
  got = gs.gradsigns_regularizer(logits, x, wm, 1.0, loss="hinge", margin=0.3, per_example=True)
  np.testing.assert_allclose(got, _hinge_ref(z, b, 0.3) + _hinge_ref(zs, b, 0.3), rtol=1e-4, atol=1e-6)
  # a key whose signature is the model's own signs has zero loss at margin 0, and positive if flipped
  own = wm._replace(signature=jnp.asarray((z >= 0).astype(np.int32)))
  assert float(gs.gradsigns_regularizer(logits, x, own, loss="hinge", margin=0.0)) == 0.0
  assert float(gs.gradsigns_regularizer(logits, x, own._replace(signature=1 - own.signature), loss="hinge",
                                        margin=0.0)) > 0.0
  # scale-free: f(x) = 10 * logits(x) at x / 10 has the same softmax and 10x the input gradient, so the
  # hinge is unchanged while the paper's BCE is not
  scaled = lambda xx: logits(xx) * 10.0
  for kw, same in ((dict(loss="hinge", margin=0.3), True), (dict(loss="bce"), False)):
    a = float(gs.gradsigns_regularizer(scaled, x * 0.1, wm, **kw))
    c = float(gs.gradsigns_regularizer(logits, x, wm, **kw))
    assert (abs(a - c) <= 1e-4 * abs(c)) == same, (kw, a, c)
  jitted = jax.jit(lambda xx: gs.gradsigns_regularizer(logits, xx, wm, loss="hinge", margin=0.3))
  np.testing.assert_allclose(jitted(x), _hinge_ref(z, b, 0.3), rtol=1e-4, atol=1e-6)


def test_false_claim_probability_binomial_tail():
  assert gs.false_claim_probability(64, 64) == 2.0 ** -64
  assert gs.false_claim_probability(0, 10) == 1.0
  assert gs.false_claim_probability(6, 10) == pytest.approx(sum(math.comb(10, k) for k in range(6, 11)) / 1024)
  wm = gs.gradsigns_keygen(jax.random.PRNGKey(0), (4,), 32, 4)
  assert gs.verify(wm.signature, wm).owned
  assert not gs.verify(1 - wm.signature, wm).owned


def test_training_embeds_signature_and_independent_model_is_not_claimed():
  ds = data.load_digits(seed=0)
  m = models.MLP(features=(64,))
  wm = gs.gradsigns_keygen(jax.random.PRNGKey(7), (8, 8, 1), 32)
  xt = jnp.asarray(ds.x_train[ds.y_train == 0][:32])
  extra = lambda p, xb, yb, k: gs.gradsigns_regularizer(lambda x: m.apply({"params": p}, x), xt, wm)
  v, h = models.train_classifier(m, ds, optax.adam(2e-3), epochs=4, batch_size=32, loss_extra=extra)
  assert h["test_accuracy"][-1] > 0.85
  bits = gs.extract_whitebox(lambda x: m.apply(v, x), xt, wm)
  assert gs.signature_ber(bits, wm) <= 0.1 and gs.verify(bits, wm).owned
  v2, _ = models.train_classifier(m, ds, optax.adam(2e-3), epochs=2, batch_size=32, seed=5)
  other = gs.verify(gs.extract_whitebox(lambda x: m.apply(v2, x), xt, wm), wm)
  assert not other.owned


def test_bad_inputs():
  wm = gs.gradsigns_keygen(jax.random.PRNGKey(0), (8, 8, 1), 8)
  f = lambda x: jnp.zeros((x.shape[0], 10))
  with pytest.raises(ValueError, match="carrier set is empty"):
    gs.gradsigns_regularizer(f, jnp.zeros((0, 8, 8, 1)), wm)
  with pytest.raises(ValueError, match="do not match"):
    gs.extract_whitebox(f, jnp.zeros((3, 8, 8)), wm)
  with pytest.raises(ValueError, match="probabilities"):
    gs.extract_blackbox(lambda x: jnp.zeros((x.shape[0],)), jnp.zeros((2, 8, 8, 1)), wm)
  with pytest.raises(ValueError, match="weight"):
    gs.gradsigns_regularizer(f, jnp.zeros((2, 8, 8, 1)), wm, weight=-0.1)
  with pytest.raises(ValueError, match="target class"):
    gs.extract_whitebox(lambda x: jnp.zeros((x.shape[0],)), jnp.zeros((2, 8, 8, 1)), wm)
  with pytest.raises(ValueError, match="matches"):
    gs.false_claim_probability(9, 8)
  with pytest.raises(ValueError, match="num_classes"):              # logits of the wrong class count
    gs.gradsigns_regularizer(lambda x: jnp.zeros((x.shape[0], 7)), jnp.zeros((2, 8, 8, 1)), wm)
  with pytest.raises(ValueError, match="num_classes"):
    gs.extract_blackbox(lambda x: jnp.full((x.shape[0], 7), 1 / 7), jnp.zeros((2, 8, 8, 1)), wm)
  with pytest.raises(ValueError, match="loss"):
    gs.gradsigns_regularizer(f, jnp.zeros((2, 8, 8, 1)), wm, loss="l2")
  with pytest.raises(ValueError, match="margin"):
    gs.gradsigns_regularizer(f, jnp.zeros((2, 8, 8, 1)), wm, loss="hinge", margin=1.0)
  with pytest.raises(ValueError, match="per_example"):
    gs.gradsigns_regularizer(f, jnp.zeros((2, 8, 8, 1)), wm, per_example=True)
  # keys whose parts do not fit the model input or each other
  x = jnp.zeros((2, 8, 8, 1))
  with pytest.raises(ValueError, match="projection"):
    gs.extract_whitebox(f, x, wm._replace(projection=wm.projection[:, :-1]))
  with pytest.raises(ValueError, match="carriers must be integer indices"):
    gs.extract_whitebox(f, x, wm._replace(carriers=wm.carriers.at[0].set(64)))
  with pytest.raises(ValueError, match="distinct"):
    gs.extract_whitebox(f, x, wm._replace(carriers=wm.carriers.at[1].set(wm.carriers[0])))
  with pytest.raises(ValueError, match="carrier set is empty"):
    gs.extract_whitebox(f, x, wm._replace(carriers=jnp.zeros((0,), jnp.int32),
                                          projection=jnp.zeros((8, 0))))
  with pytest.raises(ValueError, match="0/1 bits"):
    gs.extract_whitebox(f, x, wm._replace(signature=wm.signature.at[0].set(2)))
  with pytest.raises(ValueError, match="target_class"):
    gs.extract_whitebox(f, x, wm._replace(target_class=10))
  with pytest.raises(ValueError, match="signature of shape"):
    gs.verify(wm.signature[:-1], wm)
  with pytest.raises(ValueError, match="signature of shape"):
    gs.signature_ber(jnp.zeros((8, 1), jnp.int32), wm)
  assert gs.check_watermark_key(wm) is None                          # the public check itself
  with pytest.raises(ValueError, match="projection"):
    gs.check_watermark_key(wm._replace(projection=wm.projection[:-1]))
