"""Saving and loading stage predictors (mlsys_jax.cost.value_ios.save_predictor / load_predictor)."""

from __future__ import annotations

import numpy as np
import pytest

from mlsys_jax import sched
from mlsys_jax.cost import value as V
from mlsys_jax.cost import value_ios as VI


@pytest.fixture(scope="module")
def fitted():
  # a freshly initialised (untrained) model is enough to test that saving and loading change nothing,
  # and skips compiling the training step
  import jax
  import jax.numpy as jnp
  g = sched.build_graph(*V.random_conv_net(1))
  ex = VI.stage_examples([g], sched.AnalyticalCost(), r=2, s=2, max_per_graph=12, seed=0)
  vocab = {}
  for u in g.units:
    vocab.setdefault(u.kind, len(vocab) + 1)
  module = V.ValueLSTM(vocab=len(vocab), hidden=8)
  params = module.init(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32),
                       jnp.zeros((1, 8, V.NUM_FEATURES), jnp.float32), jnp.ones((1,), jnp.int32))
  static = V.static_features(g)[:, :V.NUM_STATIC]
  model = V.ValueModel(module, params, vocab, static.min(0), static.max(0), 2, 2)
  return g, ex, VI.StagePredictor(model, base=sched.AnalyticalCost())


def test_round_trip_keeps_predictions_base_and_ood(fitted, tmp_path):
  g, ex, p = fitted
  path = str(tmp_path / "p.npz")
  VI.save_predictor(path, p, base="analytical")
  q = VI.load_predictor(path)
  sts = [st for _, st, _ in ex]
  np.testing.assert_allclose(q.log_predict(g, sts), p.log_predict(g, sts), rtol=1e-6)
  assert q.base is not None and q.margin == p.margin and q.model.vocab == p.model.vocab
  np.testing.assert_array_equal(q.model.feat_lo, p.model.feat_lo)
  assert q.ood(g) == p.ood(g)


def test_base_must_match(fitted, tmp_path):
  _, _, p = fitted
  with pytest.raises(ValueError, match="base"):
    VI.save_predictor(str(tmp_path / "p.npz"), p, base=None)


def test_not_a_predictor_file(tmp_path):
  path = str(tmp_path / "x.npz")
  np.savez(path, meta=np.asarray('{"format": "other"}'))
  with pytest.raises(ValueError, match="not a saved StagePredictor"):
    VI.load_predictor(path)
