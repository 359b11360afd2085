"""sensAI class-parallel execution over devices: make_sharded_predictor on 8 simulated CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from mlsys_jax import models
from mlsys_jax.infer import sensai


def _subnets(groups, num_classes, seed=0):
  """Subnets of a small CNN with different widths per group (random weights: exactness, not accuracy)."""
  model = models.CNN(num_classes=num_classes, channels=(6, 8), hidden=10)
  x = np.random.default_rng(seed).normal(size=(5, 8, 8, 1)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(seed), x[:1])
  st = sensai.channel_stats(model, variables, x)
  subs = [sensai.make_subnet(model, variables, g, sensai.prune_masks(st, keep_fraction=0.3 + 0.2 * (i % 3)))
          for i, g in enumerate(groups)]
  return subs, x


def _combine64(subs, x, num_classes, temps):
  """float64 numpy reference: per-subnet softmax(z / T) without "other", scattered and renormalised."""
  p = np.zeros((len(x), num_classes))
  for s, t in zip(subs, temps):
    z = np.asarray(sensai.subnet_predict(s, x), np.float64) / t
    e = np.exp(z - z.max(-1, keepdims=True))
    p[:, list(s.classes)] = (e / e.sum(-1, keepdims=True))[:, 1:]
  return p / p.sum(-1, keepdims=True)


def test_sharded_predictor_own_width_and_padded_match_float64(devices):
  groups = [(0, 7), (1,), (2, 5), (3,), (4, 6)]          # 5 groups of 1-2 classes
  subs, x = _subnets(groups, 8, seed=3)
  assert len({s.model.channels for s in subs}) == 3         # the widths differ
  temps = [0.6, 1.0, 1.5, 0.8, 2.0]
  ref = _combine64(subs, x, 8, temps)
  mesh5 = Mesh(np.array(devices[:5]), ("g",))
  own = sensai.make_sharded_predictor(subs, 8, temps)      # default: 5 devices, own widths
  assert len(own.variables) == 5                           # every device holds all 5 subnets' weights
  np.testing.assert_allclose(own(x), ref, rtol=2e-5, atol=1e-6)
  host = sensai.make_sharded_predictor(subs, 8, temps, combine_on_host=True)   # no collective at all
  out = host(x)
  assert isinstance(out, np.ndarray) and out.dtype == np.float32
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-6)
  padded = sensai.make_sharded_predictor(subs, 8, temps, mesh=mesh5, own_width=False)
  np.testing.assert_allclose(padded(x), ref, rtol=2e-5, atol=1e-6)
  # the weights were placed once, sharded over the 5 devices (one subnet each)
  kernel = jax.tree_util.tree_leaves(padded.variables)[0]
  assert len(kernel.sharding.device_set) == 5 and kernel.addressable_shards[0].data.shape[0] == 1
  np.testing.assert_allclose(jax.jit(lambda a: own(a))(jnp.asarray(x[:1])), ref[:1], rtol=2e-5, atol=1e-6)
  with pytest.raises(ValueError, match="one subnet per device"):
    sensai.make_sharded_predictor(subs[:4] + [subs[4]], 8, mesh=Mesh(np.array(devices[:1]), ("g",)),
                                  own_width=True)
  with pytest.raises(ValueError, match="dividing"):
    sensai.make_sharded_predictor(subs, 8, mesh=Mesh(np.array(devices[:3]), ("g",)))


def test_sharded_predictor_several_subnets_per_device(devices):
  groups = [(0,), (1,), (2, 3), (4,)]
  subs, x = _subnets(groups, 5, seed=4)
  two = sensai.make_sharded_predictor(subs, 5, mesh=Mesh(np.array(devices[:2]), ("g",)))  # 2 per device
  np.testing.assert_allclose(two(x), _combine64(subs, x, 5, [1.0] * 4), rtol=2e-5, atol=1e-6)
  nan = x.copy()
  nan[1, 0, 0, 0] = np.nan                                     # NaN input: its row is NaN, others finite
  out = np.asarray(two(nan))
  assert np.isnan(out[1]).all() and np.isfinite(np.delete(out, 1, 0)).all()
