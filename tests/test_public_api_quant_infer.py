"""Direct tests of public functions of mlsys_jax.infer and mlsys_jax.quant that had none: each against an
independent reference (numpy / float64 / brute force / hand-computed values) or a property a wrong
implementation breaks, plus its errors on bad input."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax import models
from mlsys_jax.infer import microrec as mr
from mlsys_jax.infer import sensai
from mlsys_jax.infer import video


def _np_conv_same(x: np.ndarray, w: np.ndarray, stride: int = 1) -> np.ndarray:
  """float64 NHWC x HWIO cross-correlation with SAME zero padding (odd kernels, stride 1 or 2)."""
  kh, kw = w.shape[:2]
  n, h, wd, _ = x.shape
  ho, wo = -(-h // stride), -(-wd // stride)
  ph = max((ho - 1) * stride + kh - h, 0)
  pw = max((wo - 1) * stride + kw - wd, 0)
  xp = np.pad(x.astype(np.float64), ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  out = np.zeros((n, ho, wo, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      out += patch @ w[i, j].astype(np.float64)
  return out


# ----------------------------------------------------------------------------------------------------
# infer.microrec.frontier


def _partitions(items):
  if not items:
    yield []
    return
  first, rest = items[0], items[1:]
  for p in _partitions(rest):
    yield [[first]] + p
    for i in range(len(p)):
      yield p[:i] + [[first] + p[i]] + p[i + 1:]


def _brute_force_best(specs, budget, max_group=3):
  """Fewest lookups, then least storage, over every partition of the tables (groups <= max_group)."""
  base = sum(r * d for r, d in specs)
  best = None
  for p in _partitions(list(range(len(specs)))):
    if any(len(g) > max_group for g in p):
      continue
    elems = sum(math.prod(specs[i][0] for i in g) * sum(specs[i][1] for i in g) for g in p)
    if elems - base <= budget * base and (best is None or (len(p), elems) < best):
      best = (len(p), elems)
  return best


def test_frontier_optimal_matches_brute_force_and_every_curve_is_monotone_within_budget():
  specs = [(2, 3), (3, 1), (4, 2), (5, 1), (6, 2)]
  budgets = [0.0, 0.6, 2.0, 4.0]
  base = sum(r * d for r, d in specs)
  curves = {p: mr.frontier(specs, p, budgets) for p in ("authors", "greedy", "optimal")}
  for planner, curve in curves.items():
    assert [r["budget"] for r in curve] == budgets
    assert all(r["tables"] == 5 and r["base_elements"] == base for r in curve)
    for r in curve:
      assert r["overhead"] == pytest.approx(r["elements"] / base - 1.0)
      assert r["elements"] - base <= r["budget"] * base + 1e-9, planner   # within the budget
    lookups = [r["lookups"] for r in curve]
    assert lookups == sorted(lookups, reverse=True), planner            # more budget, never more lookups
    assert lookups[0] == 5                                               # no budget: nothing combined
  assert [(r["lookups"], r["elements"]) for r in curves["optimal"]] == \
      [_brute_force_best(specs, b) for b in budgets]
  for a, g, o in zip(curves["authors"], curves["greedy"], curves["optimal"]):
    assert o["lookups"] <= min(a["lookups"], g["lookups"])
  # the heuristics are really different curves here (greedy stores more than optimal at budget 2)
  assert curves["greedy"][2]["elements"] > curves["optimal"][2]["elements"]
  # planner keywords pass through: pairs only
  pairs = mr.frontier(specs, "optimal", [4.0], max_group=2)
  assert pairs[0]["lookups"] == _brute_force_best(specs, 4.0, max_group=2)[0]


def test_frontier_bad_input():
  specs = [(2, 3), (3, 1)]
  with pytest.raises(ValueError, match="planner"):
    mr.frontier(specs, "best", [0.1])
  with pytest.raises(ValueError, match="budgets must be a non-empty sequence"):
    mr.frontier(specs, "greedy", [])
  with pytest.raises(ValueError, match="budgets must be a non-empty sequence"):
    mr.frontier(specs, "greedy", 0.5)
  with pytest.raises(ValueError, match=r"budgets\[1\] must lie in \[0.0, inf\]"):
    mr.frontier(specs, "greedy", [0.1, -0.2])
  with pytest.raises(ValueError, match=r"budgets\[0\] must be finite"):
    mr.frontier(specs, "optimal", [float("nan")])
  with pytest.raises(ValueError, match="specs is empty"):
    mr.frontier([], "authors", [0.1])
  with pytest.raises(ValueError, match=r"specs\[1\].rows"):
    mr.frontier([(2, 3), (0, 1)], "authors", [0.1])


# ----------------------------------------------------------------------------------------------------
# infer.sensai.penultimate_features


def _mlp_variables(rng, widths):
  """flax variables of models.MLP with the given layer widths (input first), drawn with numpy."""
  return {"params": {f"Dense_{i}": {"kernel": rng.normal(size=(a, b)).astype(np.float32),
                                    "bias": rng.normal(size=b).astype(np.float32) * 0.5}
                     for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))}}


def test_penultimate_features_mlp_numpy_reference():
  model = models.MLP(features=(6, 5), num_classes=3)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 2, 2)).astype(np.float32)
  v = _mlp_variables(rng, (4, 6, 5, 3))
  h = x.reshape(5, -1).astype(np.float64)
  for i in range(2):                                # the ReLU output of the last hidden layer, float64
    h = np.maximum(h @ v["params"][f"Dense_{i}"]["kernel"] + v["params"][f"Dense_{i}"]["bias"], 0.0)
  assert np.any(h == 0) and np.any(h > 0)          # the ReLU matters on this input
  got = sensai.penultimate_features(model, v, x, batch_size=2)   # 3 batches, the last one short
  assert got.shape == (5, 5)
  np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got, sensai.penultimate_features(model, v, x, batch_size=4))


def test_penultimate_features_cnn_feed_the_logits_layer():
  model = models.CNN(num_classes=4, channels=(3,), hidden=6)
  x = np.random.default_rng(1).normal(size=(5, 4, 4, 1)).astype(np.float32)
  rng = np.random.default_rng(2)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])
  v = jax.tree_util.tree_map(lambda a: (rng.normal(size=a.shape) * 0.5).astype(np.float32), shapes)
  f = sensai.penultimate_features(model, v, x, batch_size=5)
  assert f.shape == (5, 6) and np.all(f >= 0)
  head = v["params"]["Dense_1"]
  np.testing.assert_allclose(f @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"]),
                             np.asarray(jax.jit(model.apply)(v, x)), rtol=1e-5, atol=1e-5)


def test_penultimate_features_bad_input():
  model = models.MLP(features=(4,), num_classes=2)
  x = np.ones((3, 2), np.float32)
  v = _mlp_variables(np.random.default_rng(0), (2, 4, 2))
  with pytest.raises(ValueError, match="at least one example"):
    sensai.penultimate_features(model, v, x[:0])
  with pytest.raises(ValueError, match="x.* NaN/inf"):
    sensai.penultimate_features(model, v, np.where(np.eye(3, 2) > 0, np.nan, x))
  with pytest.raises(ValueError, match="batch_size"):
    sensai.penultimate_features(model, v, x, batch_size=0)
  with pytest.raises(ValueError, match=r"collection\(s\) \['batch_stats'\]"):
    sensai.penultimate_features(model, {**v, "batch_stats": {}}, x)   # not this model's variables
  no_bias = {"params": {**v["params"], "Dense_1": {"kernel": v["params"]["Dense_1"]["kernel"]}}}
  with pytest.raises(ValueError, match="logits layer Dense_1: variable 'bias' missing"):
    sensai.penultimate_features(model, no_bias, x)
  bad = jax.tree_util.tree_map(lambda a: a * np.nan, v)
  with pytest.raises(ValueError, match="penultimate features .* NaN/inf"):
    sensai.penultimate_features(model, bad, x)
  with pytest.raises(TypeError, match="sensAI surgery follows"):
    sensai.penultimate_features(nn.Dense(2), v, x)


# ----------------------------------------------------------------------------------------------------
# infer.video.relu_cnn and highpass_variables


def test_relu_cnn_is_same_conv_bias_relu_per_layer():
  net = video.relu_cnn([3, 2], kernel_size=3)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 5, 6, 2)).astype(np.float32)
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.asarray(x))
  v = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32), shapes)
  ref = x.astype(np.float64)
  for name in ("layers_0", "layers_2"):
    p = v["params"][name]
    ref = np.maximum(_np_conv_same(ref, np.asarray(p["kernel"])) + np.asarray(p["bias"], np.float64), 0)
  assert np.any(ref == 0) and np.any(ref > 0)
  np.testing.assert_allclose(np.asarray(jax.jit(net.apply)(v, jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)
  assert v["params"]["layers_0"]["kernel"].shape == (3, 3, 2, 3)
  layers = video.layers_from_flax(net, v)       # the class range_bound_model covers
  assert [(l.padding, l.relu, l.kernel.shape) for l in layers] == [("SAME", True, (3, 3, 2, 3)),
                                                                    ("SAME", True, (3, 3, 3, 2))]
  k5 = video.relu_cnn(np.array([1]), kernel_size=5)
  shapes = jax.eval_shape(k5.init, jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 1)))
  assert shapes["params"]["layers_0"]["kernel"].shape == (5, 5, 1, 1)


def test_relu_cnn_bad_input():
  with pytest.raises(ValueError, match="at least one conv layer"):
    video.relu_cnn([])
  with pytest.raises(TypeError, match="channels must be a sequence"):
    video.relu_cnn(8)
  with pytest.raises(ValueError, match=r"channels\[1\]"):
    video.relu_cnn([4, 0])
  with pytest.raises(TypeError, match=r"channels\[0\] must be an integer"):
    video.relu_cnn([2.5])
  with pytest.raises(ValueError, match="kernel_size must be odd"):
    video.relu_cnn([4], kernel_size=2)
  with pytest.raises(ValueError, match="kernel_size"):
    video.relu_cnn([4], kernel_size=0)


def test_highpass_variables_zero_mean_taps_bias_and_flat_regions_give_zero():
  net = video.relu_cnn([3, 2])
  rng = np.random.default_rng(3)
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 9, 9, 2)))
  v0 = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), shapes)
  extra = {"params": v0["params"], "stats": {"kernel_like": jnp.ones(3)}}   # no kernel/bias: untouched
  v = video.highpass_variables(v0, -0.1)
  for name in ("layers_0", "layers_2"):
    k0 = np.asarray(v0["params"][name]["kernel"], np.float64)
    want = k0 - k0.mean(axis=(0, 1), keepdims=True)                  # per (c_in, c_out) spatial mean
    np.testing.assert_allclose(np.asarray(v["params"][name]["kernel"]), want, rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(v["params"][name]["bias"]) == np.float32(-0.1))
  assert not np.allclose(np.asarray(v0["params"]["layers_0"]["bias"]), -0.1)   # input not modified
  e = video.highpass_variables(extra, -0.1)
  np.testing.assert_array_equal(np.asarray(e["stats"]["kernel_like"]), 1.0)
  # a constant frame: every output away from the zero-padded border (2 layers x 1 pixel) is exactly 0
  y = np.asarray(jax.jit(net.apply)(v, jnp.full((1, 9, 9, 2), 0.7)))
  assert np.all(y[0, 2:-2, 2:-2] == 0.0)


def test_highpass_variables_bad_input():
  v = {"params": {"layers_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)}}}
  with pytest.raises(ValueError, match=r"bias must lie in \[-inf, 0.0\)"):
    video.highpass_variables(v, 0.05)
  with pytest.raises(ValueError, match="bias must be finite"):
    video.highpass_variables(v, float("nan"))
  with pytest.raises(ValueError, match="no 'kernel' leaf"):
    video.highpass_variables({"params": {"w": jnp.ones((3, 3, 1, 2))}})
  dense = {"params": {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}}
  with pytest.raises(ValueError, match=r"\['kernel'\] has shape \(3, 2\).*conv"):
    video.highpass_variables(dense)
  bad = jax.tree_util.tree_map(lambda a: a.at[(0,) * a.ndim].set(jnp.inf), v)
  with pytest.raises(ValueError, match="NaN/inf"):
    video.highpass_variables(bad)
