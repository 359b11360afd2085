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
  """Subnets of a small CNN with different widths per group. Random weights (shapes from
  ``jax.eval_shape``, nothing compiled) and random channel statistics: this tests exactness of the
  execution, not accuracy."""
  model = models.CNN(num_classes=num_classes, channels=(6, 8), hidden=10)
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))
  variables = jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) / np.sqrt(max(1, np.prod(a.shape[:-1]))), jnp.float32),
      shapes)
  widths = {"Conv_0": 6, "Conv_1": 8, "Dense_0": 10}
  st = sensai.ChannelStats({k: rng.uniform(0, 1, w) for k, w in widths.items()},
                           {k: rng.uniform(0, 1, w) for k, w in widths.items()}, 5)
  subs = [sensai.make_subnet(model, variables, g, sensai.prune_masks(st, keep_fraction=0.3 + 0.2 * (i % 3)))
          for i, g in enumerate(groups)]
  x = rng.normal(size=(5, 8, 8, 1)).astype(np.float32)
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
  groups = [(0, 4), (1,), (2, 3)]                         # 3 groups of 1-2 classes
  subs, x = _subnets(groups, 5, seed=3)
  assert len({s.model.channels for s in subs}) == 3         # the widths differ
  temps = [0.6, 1.0, 1.5]
  ref = _combine64(subs, x, 5, temps)
  mesh3 = Mesh(np.array(devices[:3]), ("g",))
  own = sensai.make_sharded_predictor(subs, 5, temps)      # default: 3 devices, own widths
  assert len(own.variables) == 3                           # every device holds all 3 subnets' weights
  np.testing.assert_allclose(own(x), ref, rtol=2e-5, atol=1e-6)
  host = sensai.make_sharded_predictor(subs, 5, temps, combine_on_host=True)   # no collective at all
  out = host(x)
  assert isinstance(out, np.ndarray) and out.dtype == np.float32
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-6)
  padded = sensai.make_sharded_predictor(subs, 5, temps, mesh=mesh3, own_width=False)
  np.testing.assert_allclose(padded(x), ref, rtol=2e-5, atol=1e-6)
  # the weights were placed once, sharded over the 3 devices (one subnet each)
  kernel = jax.tree_util.tree_leaves(padded.variables)[0]
  assert len(kernel.sharding.device_set) == 3 and kernel.addressable_shards[0].data.shape[0] == 1
  with pytest.raises(ValueError, match="one subnet per device"):
    sensai.make_sharded_predictor(subs, 5, mesh=Mesh(np.array(devices[:1]), ("g",)), own_width=True)
  with pytest.raises(ValueError, match="dividing"):
    sensai.make_sharded_predictor(subs, 5, mesh=Mesh(np.array(devices[:2]), ("g",)))


def test_sharded_predictor_several_subnets_per_device(devices):
  groups = [(0,), (1,), (2, 3), (4,)]
  subs, x = _subnets(groups, 5, seed=4)
  two = sensai.make_sharded_predictor(subs, 5, mesh=Mesh(np.array(devices[:2]), ("g",)))  # 2 per device
  np.testing.assert_allclose(two(x), _combine64(subs, x, 5, [1.0] * 4), rtol=2e-5, atol=1e-6)
  nan = x.copy()
  nan[1, 0, 0, 0] = np.nan                                     # NaN input: its row is NaN, others finite
  out = np.asarray(two(nan))
  assert np.isnan(out[1]).all() and np.isfinite(np.delete(out, 1, 0)).all()
