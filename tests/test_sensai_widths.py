"""sensAI widths rounded to SIMD multiples: ``prune_masks(multiple_of=...)``."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from mlsys_jax import models
from mlsys_jax.infer import sensai


def _stats(rng, sizes):
  apoz = {f"L{i}": rng.uniform(size=c) for i, c in enumerate(sizes)}
  mean = {k: rng.uniform(size=v.size) for k, v in apoz.items()}
  return sensai.ChannelStats(apoz, mean, 10)


@pytest.mark.parametrize("m", [1, 8, 16])
@pytest.mark.parametrize("keep", [0.05, 0.3, 0.4, 0.93])
def test_keep_fraction_rounded_up(m, keep):
  rng = np.random.default_rng(0)
  st = _stats(rng, [3, 20, 64, 128, 154])
  base = sensai.prune_masks(st, keep_fraction=keep)
  got = sensai.prune_masks(st, keep_fraction=keep, multiple_of=m)
  for k, mask in got.items():
    c = mask.size
    n0 = max(1, math.ceil(keep * c - 1e-9))
    assert base[k].sum() == n0
    assert mask.sum() == min(c, -(-n0 // m) * m)          # the next multiple, capped at the layer
    assert np.all(mask[base[k]])                           # every unrounded channel stays
    # the kept ones are exactly the lowest-APoZ channels
    assert np.max(st.apoz[k][mask]) <= np.min(st.apoz[k][~mask], initial=np.inf)


def test_paper_rule_rounded_up():
  rng = np.random.default_rng(1)
  st = _stats(rng, [64, 100])
  rule = sensai.prune_masks(st, apoz_threshold=0.5, mean_threshold=0.6)
  got = sensai.prune_masks(st, apoz_threshold=0.5, mean_threshold=0.6, multiple_of=16)
  for k, mask in got.items():
    assert 0 < rule[k].sum() < mask.size
    assert mask.sum() == min(mask.size, -(-int(rule[k].sum()) // 16) * 16)
    assert np.all(mask[rule[k]])
    added = mask & ~rule[k]
    if added.any():   # the channels that join are the lowest-APoZ ones the rule dropped
      assert np.max(st.apoz[k][added]) <= np.min(st.apoz[k][~mask], initial=np.inf)


@pytest.mark.parametrize("bad, err", [(0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_multiple(bad, err):
  st = _stats(np.random.default_rng(0), [8])
  with pytest.raises(err, match="multiple_of"):
    sensai.prune_masks(st, keep_fraction=0.5, multiple_of=bad)


@pytest.mark.slow
def test_subnet_widths_and_flops():
  """Rounded masks give a subnet of those widths; its FLOPs match the closed form."""
  model = models.CNN(num_classes=4, channels=(20, 24), hidden=40)
  x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
  v = model.init(jax.random.PRNGKey(0), x[:1])
  rng = np.random.default_rng(2)
  st = sensai.ChannelStats({k: rng.uniform(size=c) for k, c in (("Conv_0", 20), ("Conv_1", 24), ("Dense_0", 40))},
                           {k: np.ones(c) for k, c in (("Conv_0", 20), ("Conv_1", 24), ("Dense_0", 40))}, 8)
  masks = sensai.prune_masks(st, keep_fraction=0.3, multiple_of=8)
  assert {k: int(m.sum()) for k, m in masks.items()} == {"Conv_0": 8, "Conv_1": 8, "Dense_0": 16}
  sub = sensai.make_subnet(model, v, (0, 1), masks)
  assert sub.variables["params"]["Conv_1"]["kernel"].shape == (3, 3, 8, 8)
  flops = 2 * (8 * 8 * 9 * 3 * 8 + 4 * 4 * 9 * 8 * 8 + (2 * 2 * 8) * 16 + 16 * 3)
  assert sensai.count_flops(sub.model, sub.variables, (8, 8, 3)) == flops
  # the subnet computes what the original with the dropped channels zeroed computes (head aside)
  full = np.asarray(sensai.subnet_predict(sensai.make_subnet(model, sensai.zero_pruned(model, v, masks), (0, 1)), x))
  np.testing.assert_allclose(np.asarray(sensai.subnet_predict(sub, x)), full, rtol=1e-5, atol=1e-5)
