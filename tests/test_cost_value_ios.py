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


def test_shared_programs_groups_equal_schedules_only():
  g = sched.build_graph(*V.random_conv_net(1))
  seq = sched.sequential_schedule(g)
  assert len(seq) >= 3
  swapped = list(reversed(seq))   # another order (validity does not matter here)
  mk = lambda stages, emission="plain", **info: sched.Schedule(g, list(stages), [0.0] * len(stages),
                                                               emission, 0.0, {"s": 8, **info})
  g2 = sched.build_graph(*V.random_conv_net(1))   # built again: same structure
  other = sched.Schedule(g2, list(seq), [1.0] * len(seq), "plain", 5.0, {"s": 8})
  named = {"a": mk(seq), "b": mk(swapped), "c": mk(seq), "d": mk(seq, "cuda_graph"),
           "e": mk(seq, s=4), "f": other, "g": mk(swapped)}
  assert VI.shared_programs(named) == {"a": "a", "b": "b", "c": "a", "d": "d", "e": "e", "f": "a", "g": "b"}
  # a different graph never shares
  g3 = sched.build_graph(*V.random_conv_net(2))
  s3 = sched.Schedule(g3, list(sched.sequential_schedule(g3)), [], "plain", 0.0, {"s": 8})
  assert VI.shared_programs({"a": mk(seq), "z": s3}) == {"a": "a", "z": "z"}
  assert VI.shared_programs({}) == {}
  with pytest.raises(TypeError, match="dict"):
    VI.shared_programs([mk(seq)])
  with pytest.raises(TypeError, match="not a sched.Schedule"):
    VI.shared_programs({"a": mk(seq), "x": seq})
