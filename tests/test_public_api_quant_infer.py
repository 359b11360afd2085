"""Direct tests of public functions of mlsys_jax.infer and mlsys_jax.quant that had none: each against an
independent reference (numpy / float64 / brute force / hand-computed values) or a property a wrong
implementation breaks, plus its errors on bad input."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mlsys_jax import models
from mlsys_jax.infer import microrec as mr
from mlsys_jax.infer import sensai
from mlsys_jax.infer import video
from mlsys_jax.quant import fixed_point as fxp
from mlsys_jax.quant import fp_align
from mlsys_jax.quant.binary import packed, quantizers, quicknet


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
  # another batch size: the same up to float32 rounding (a CPU's dot kernels may sum a 1-row and a 4-row batch
  # in different orders: 3 of 25 entries differed by one ulp on one CI host)
  np.testing.assert_allclose(got, sensai.penultimate_features(model, v, x, batch_size=4), rtol=1e-6, atol=0)


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


# ----------------------------------------------------------------------------------------------------
# quant.fixed_point.compute_scale and straight_through


def _scale_ref(lo, hi, bits, symmetric, unsigned):
  lo, hi = min(lo, 0.0), max(hi, 0.0)
  half = 2 ** (bits - 1)
  if symmetric:
    q = half - 1
    amax = max(-lo, hi)
    return (amax / q if amax > 0 else 1.0), (half if unsigned else 0)
  qmin, qmax = (0, 2 * half - 1) if unsigned else (-half, half - 1)
  s = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
  return s, min(max(round(qmin - lo / s), qmin), qmax)


@pytest.mark.parametrize("symmetric,unsigned", [(True, False), (True, True), (False, True), (False, False)])
def test_compute_scale_matches_float64_formulas(symmetric, unsigned):
  # (no range puts qmin - lo / s on a rounding tie, where float32 and float64 may round apart)
  cases = [(-1.0, 3.0), (-2.0, 0.5), (0.25, 2.0), (-3.0, -1.0), (0.0, 0.0), (-0.1, 0.3)]
  for bits in (2, 4, 8, 12):
    lo = np.array([c[0] for c in cases], np.float32)
    hi = np.array([c[1] for c in cases], np.float32)
    scale, zp = fxp.compute_scale(lo, hi, bits, symmetric, unsigned)
    assert scale.dtype == jnp.float32 and scale.shape == zp.shape == (len(cases),)
    for i, (l, h) in enumerate(cases):
      s, z = _scale_ref(float(lo[i]), float(hi[i]), bits, symmetric, unsigned)
      assert float(scale[i]) == pytest.approx(s, rel=1e-6), (bits, l, h)
      assert float(zp[i]) == z, (bits, l, h)
    qmin, qmax = fxp.qrange(bits, symmetric, unsigned)
    # real 0 has an exact code and the (widened) range ends map to the extreme codes
    assert np.all((np.asarray(zp) >= qmin) & (np.asarray(zp) <= qmax))
    lo_w, hi_w = np.minimum(lo, 0), np.maximum(hi, 0)
    wide = hi_w > lo_w
    top = np.round(hi_w / np.asarray(scale)) + np.asarray(zp)
    if symmetric:
      amax = np.maximum(-lo_w, hi_w)
      np.testing.assert_array_equal(np.round(amax / np.asarray(scale))[wide], qmax - (qmin + qmax) // 2)
    else:
      bottom = np.round(lo_w / np.asarray(scale)) + np.asarray(zp)
      assert np.all(np.abs(bottom[wide] - qmin) <= 1) and np.all(np.abs(top[wide] - qmax) <= 1)
  # per-channel ranges broadcast: (2, 1) against (1, 3)
  s2, _ = fxp.compute_scale(np.array([[-1.0], [-2.0]]), np.array([[1.0, 2.0, 4.0]]), 8, symmetric, unsigned)
  assert s2.shape == (2, 3)


def test_compute_scale_bad_input():
  with pytest.raises(ValueError, match="bits"):
    fxp.compute_scale(-1.0, 1.0, 1, True, False)
  with pytest.raises(ValueError, match="bits"):
    fxp.compute_scale(-1.0, 1.0, 17, True, False)
  with pytest.raises(ValueError, match="lo must be <= hi"):
    fxp.compute_scale(np.array([0.0, 2.0]), np.array([1.0, 1.0]), 8, False, True)
  with pytest.raises(ValueError, match="hi holds 1 NaN/inf"):
    fxp.compute_scale(-1.0, np.inf, 8, True, False)
  with pytest.raises(ValueError, match="lo holds 1 NaN/inf"):
    fxp.compute_scale(jnp.array([np.nan]), 1.0, 8, True, False)
  with pytest.raises(ValueError, match="broadcast"):
    fxp.compute_scale(np.zeros(2), np.ones(3), 8, True, False)
  with pytest.raises(TypeError, match="symmetric must be a bool"):
    fxp.compute_scale(-1.0, 1.0, 8, "yes", False)
  with pytest.raises(TypeError, match="unsigned must be a bool"):
    fxp.compute_scale(-1.0, 1.0, 8, True, None)
  # traced ranges are not checked: a NaN end gives a NaN scale under jit (regression: it gave scale 1 for
  # symmetric codes, so quantize(x, bounds=NaN) under jit silently returned [0, 0, 3] for x = [0.5, -0.2, 3])
  s, _ = jax.jit(lambda l, h: fxp.compute_scale(l, h, 8, True, False))(jnp.float32(np.nan), jnp.float32(1.0))
  assert np.isnan(float(s))
  y = jax.jit(lambda v, b: fxp.dequantize(fxp.quantize(v, 8, bounds=b)))(jnp.array([0.5, -0.2, 3.0]),
                                                                      jnp.float32(np.nan))
  assert np.all(np.isnan(np.asarray(y)))
  with pytest.raises(ValueError, match="hi holds 1 NaN/inf"):   # concrete: refused at call time
    fxp.quantize(jnp.array([0.5, -0.2]), 8, symmetric=False, bounds=(-1.0, np.nan))


def test_quantize_data_range_scale_equals_compute_scale_and_bounds_stay_checked():
  # s21 review: quantize's data-driven range (min/max of the checked x) skips compute_scale's argument
  # checks (a second host copy per eager call); the scale and zero point must stay those of compute_scale,
  # and a calibrated range (bounds) must still be checked.
  x = jnp.asarray(np.random.default_rng(5).normal(size=(6, 5)).astype(np.float32)) + jnp.arange(5.0)
  for symmetric, unsigned in ((True, False), (True, True), (False, False), (False, True)):
    qt = fxp.quantize(x, 6, symmetric=symmetric, unsigned=unsigned, axis=0, impl="xla")
    s, z = fxp.compute_scale(jnp.min(x, 0, keepdims=True), jnp.max(x, 0, keepdims=True), 6, symmetric,
                             unsigned or not symmetric)
    np.testing.assert_array_equal(qt.scale, s)
    shift = 2 ** 5 if not symmetric and not unsigned else 0
    np.testing.assert_array_equal(qt.zero_point, z - shift)
  with pytest.raises(ValueError, match="lo must be <= hi"):
    fxp.quantize(x, 8, symmetric=False, bounds=(1.0, -1.0))
  with pytest.raises(ValueError, match="lo holds 1 NaN/inf"):
    fxp.quantize(x, 8, symmetric=False, bounds=(-np.inf, 1.0))


def test_straight_through_forward_value_and_identity_gradient_inside_the_range():
  x = jnp.array([[-1.5, -1.0, -0.3, 0.0], [0.4, 1.0, 1.0001, jnp.nan]])
  xq = jnp.round(x * 4) / 4
  lo, hi = jnp.float32(-1.0), jnp.float32(1.0)
  np.testing.assert_array_equal(fxp.straight_through(x, xq, lo, hi), xq)
  w = jnp.arange(1.0, 9.0).reshape(2, 4)                  # a non-uniform cotangent
  g = jax.grad(lambda v: jnp.sum(w * fxp.straight_through(v, xq, lo, hi)))(x)
  inside = np.array([[0, 1, 1, 1], [1, 1, 0, 0]], bool)    # bounds inclusive; NaN gets 0
  np.testing.assert_array_equal(np.asarray(g), np.where(inside, np.asarray(w), 0.0))
  # the Jacobian is the identity on the range, elementwise: jacfwd-free check through vjp of one-hots
  _, vjp = jax.vjp(lambda v: fxp.straight_through(v, xq, lo, hi), x)
  for idx in [(0, 2), (1, 1), (0, 0)]:
    e = jnp.zeros_like(x).at[idx].set(1.0)
    np.testing.assert_array_equal(np.asarray(vjp(e)[0]), np.asarray(e) * inside[idx])
  # x_quant and the bounds get no gradient; per-channel bounds broadcast; same under jit
  gq = jax.grad(lambda q: jnp.sum(fxp.straight_through(x, q, lo, hi)))(xq)
  np.testing.assert_array_equal(gq, 0.0)
  glo = jax.grad(lambda l: jnp.sum(fxp.straight_through(x, xq, l, hi)))(lo)
  assert float(glo) == 0.0
  lo_c, hi_c = jnp.array([[-2.0], [0.0]]), jnp.array([[0.0], [2.0]])
  g2 = jax.jit(jax.grad(lambda v: jnp.sum(fxp.straight_through(v, xq, lo_c, hi_c))))(x)
  np.testing.assert_array_equal(np.asarray(g2), [[1, 1, 1, 1], [1, 1, 1, 0]])


def test_straight_through_bad_input():
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="x_quant must have the shape of x"):
    fxp.straight_through(x, jnp.ones((3, 2)), -1.0, 1.0)
  with pytest.raises(TypeError, match="x_quant must have the dtype of x"):
    fxp.straight_through(x, jnp.ones((2, 3), jnp.bfloat16), -1.0, 1.0)
  with pytest.raises(TypeError, match="x must be a floating-point array"):
    fxp.straight_through(jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3), jnp.int32), -1, 1)
  with pytest.raises(ValueError, match=r"lo of shape \(3, 1\) does not broadcast"):
    fxp.straight_through(x, x, jnp.zeros((3, 1)), 1.0)
  with pytest.raises(ValueError, match=r"hi of shape \(2, 1, 1\) does not broadcast"):
    fxp.straight_through(x, x, -1.0, jnp.zeros((2, 1, 1)))


# ----------------------------------------------------------------------------------------------------
# quant.binary: blur_kernel, fold_batchnorm, larq_sign


def test_blur_kernel_values_normalisation_and_depthwise_action():
  k = quicknet.blur_kernel(3)
  assert k.shape == (3, 3, 1, 3) and k.dtype == np.float32
  want = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16.0
  for c in range(3):
    np.testing.assert_array_equal(k[:, :, 0, c], want)
  x = np.random.default_rng(4).normal(size=(1, 6, 6, 3)).astype(np.float32)
  x[..., 1] = 2.5                                          # a constant channel is kept (taps sum to 1)
  y = np.asarray(jax.lax.conv_general_dilated(x, k, (2, 2), "SAME", feature_group_count=3,
                                              dimension_numbers=("NHWC", "HWIO", "NHWC")))
  ref = np.concatenate([_np_conv_same(x[..., c:c + 1], want[:, :, None, None], 2) for c in range(3)], -1)
  np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y[0, :2, :2, 1], 2.5, rtol=1e-6)   # away from the padded bottom/right edge
  with pytest.raises(ValueError, match="channels"):
    quicknet.blur_kernel(0)
  with pytest.raises(TypeError, match="channels must be an integer"):
    quicknet.blur_kernel(2.0)


@pytest.mark.parametrize("affine", [True, False])
def test_fold_batchnorm_equals_unfused_dense_and_conv_plus_batchnorm_in_float64(affine):
  rng = np.random.default_rng(5)
  c = 4
  mean, var = rng.normal(size=c), rng.uniform(0.0, 2.0, c)
  var[0] = 0.0                                             # a dead channel: eps keeps it finite
  scale = rng.normal(size=c) if affine else None
  bias = rng.normal(size=c) if affine else None
  eps = 1e-3
  mul, add = packed.fold_batchnorm(scale, bias, mean, var, eps)
  assert mul.dtype == add.dtype == np.float32 and mul.shape == add.shape == (c,)

  def bn(y):   # inference BatchNorm, float64
    out = (y - mean) / np.sqrt(var + eps)
    return out * scale + bias if affine else out

  x = rng.normal(size=(3, 5))
  w = rng.normal(size=(5, c))
  y = x @ w
  np.testing.assert_allclose(y * mul.astype(np.float64) + add, bn(y), rtol=2e-6, atol=2e-6 * np.abs(bn(y)).max())
  xi = rng.normal(size=(1, 4, 4, 2))
  wc = rng.normal(size=(3, 3, 2, c))
  yc = _np_conv_same(xi, wc)
  np.testing.assert_allclose(yc * mul + add, bn(yc), rtol=2e-6, atol=2e-6 * np.abs(bn(yc)).max())
  # the same convention as flax's BatchNorm (epsilon inside the square root)
  mod = nn.BatchNorm(use_running_average=True, epsilon=eps, use_scale=affine, use_bias=affine)
  variables = {"batch_stats": {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}}
  if affine:
    variables["params"] = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
  yf = y.astype(np.float32)
  np.testing.assert_allclose(np.asarray(mod.apply(variables, yf)), yf * mul + add, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_bad_input():
  ones, zeros = np.ones(3), np.zeros(3)
  with pytest.raises(ValueError, match=r"eps must lie in \[0.0, inf\]"):
    packed.fold_batchnorm(None, None, zeros, ones, -1e-5)
  with pytest.raises(ValueError, match="var must be >= 0"):
    packed.fold_batchnorm(None, None, zeros, -ones, 1e-5)
  with pytest.raises(ValueError, match="var \\+ eps > 0"):
    packed.fold_batchnorm(None, None, zeros, zeros, 0.0)
  with pytest.raises(ValueError, match="mean and var must have the same shape"):
    packed.fold_batchnorm(None, None, np.zeros(2), ones, 1e-5)
  with pytest.raises(ValueError, match=r"scale of shape \(2,\) does not broadcast"):
    packed.fold_batchnorm(np.ones(2), None, zeros, ones, 1e-5)
  with pytest.raises(ValueError, match="BatchNorm mean holds 1 NaN/inf"):
    packed.fold_batchnorm(None, None, np.array([0.0, np.nan, 0.0]), ones, 1e-5)
  with pytest.raises(ValueError, match="BatchNorm bias holds 1 NaN/inf"):
    packed.fold_batchnorm(None, np.array([0.0, 0.0, np.inf]), zeros, ones, 1e-5)


def test_larq_sign_convention_dtypes_and_gradient():
  x = jnp.array([-3.0, -1e-30, -0.0, 0.0, 1e-30, 2.0, -jnp.inf, jnp.inf, jnp.nan])
  got = np.asarray(quantizers.larq_sign(x))
  np.testing.assert_array_equal(got[:-1], [-1, -1, 1, 1, 1, 1, -1, 1])   # never 0; sign(+-0) = +1
  assert np.isnan(got[-1])                                              # NaN stays NaN
  for dt in (jnp.float16, jnp.bfloat16, jnp.float32):
    y = quantizers.larq_sign(jnp.array([-0.5, 0.0, 0.5], dt))
    assert y.dtype == dt and np.asarray(y, np.float32).tolist() == [-1.0, 1.0, 1.0]
  np.testing.assert_array_equal(jax.jit(quantizers.larq_sign)(x)[:-1], got[:-1])
  # the forward function alone has gradient 0 (documented); the STE quantizer built on it has the
  # clipped straight-through gradient 1{|x| <= clip}
  v = jnp.array([-1.5, -1.0, -0.2, 0.0, 0.7, 1.0, 1.2])
  np.testing.assert_array_equal(jax.grad(lambda t: quantizers.larq_sign(t).sum())(v), 0.0)
  np.testing.assert_array_equal(quantizers.ste_sign(v), quantizers.larq_sign(v))
  np.testing.assert_array_equal(jax.grad(lambda t: quantizers.ste_sign(t).sum())(v), [0, 1, 1, 1, 1, 1, 0])
  with pytest.raises(TypeError, match="floating-point"):
    quantizers.larq_sign(jnp.array([0, -2, 3]))
  with pytest.raises(TypeError, match="floating-point"):
    quantizers.larq_sign(jnp.array([True, False]))


# ----------------------------------------------------------------------------------------------------
# quant.fp_align.bfp_dot_general and bfp_conv_general_dilated


_FMT_NP = {"fp16": (np.float16, 10, -14), "bf16": (ml_dtypes.bfloat16, 7, -126)}


def _np_bfp(x: np.ndarray, fmt: str, w: int, block: int, axis: int) -> np.ndarray:
  """float64 block floating point along ``axis``: round to fmt (nearest-even), then per block of ``block``
  elements truncate toward zero to the grid 2^(E_max - M - w), E_max = the largest floor(log2|v|)
  (subnormals count as emin) of the block's nonzero elements."""
  dt, man, emin = _FMT_NP[fmt]
  v = np.moveaxis(np.asarray(x, np.float32).astype(dt).astype(np.float64), axis, -1)
  out = np.zeros_like(v)
  for s in range(0, v.shape[-1], block):
    blk = v[..., s:s + block]
    e = np.where(blk != 0, np.maximum(np.floor(np.log2(np.where(blk != 0, np.abs(blk), 1.0))), emin), -np.inf)
    emax = e.max(axis=-1, keepdims=True)
    grid = np.exp2(np.where(np.isfinite(emax), emax - man - w, 0.0))
    out[..., s:s + block] = np.trunc(blk / grid) * grid
  return np.moveaxis(out, -1, axis)


def _values(rng, shape):
  """Values spread over ~12 binades with low bits set, so the alignment window truncates some of them."""
  return (rng.normal(size=shape) * np.exp2(rng.integers(-8, 4, shape))).astype(np.float32)


@pytest.mark.parametrize("fmt,w,block", [("fp16", 2, 4), ("bf16", 1, 3)])
def test_bfp_dot_general_matches_numpy_block_floating_point(fmt, w, block):
  rng = np.random.default_rng(6)
  cfg = fp_align.BfpConfig(fmt, w, block)
  dot = fp_align.bfp_dot_general(cfg)
  # contracting axis 0 of lhs (K = 10, blocks 4+4+2 or 3+3+3+1), a batch axis, and a float64 reference
  a = _values(rng, (10, 2, 3))                        # (K, B, M)
  b = _values(rng, (2, 10, 4))                        # (B, K, N)
  got = np.asarray(jax.jit(lambda u, v: dot(u, v, (((0,), (1,)), ((1,), (0,)))))(a, b))
  qa, qb = _np_bfp(a, fmt, w, block, 0), _np_bfp(b, fmt, w, block, 1)
  want = np.einsum("kbm,bkn->bmn", qa, qb)
  bound = np.einsum("kbm,bkn->bmn", np.abs(qa), np.abs(qb)) * 10 * 2.0 ** -23    # float32 accumulation
  assert got.shape == (2, 3, 4) and got.dtype == np.float32
  assert np.all(np.abs(got - want) <= bound + 1e-30)
  # the blocks matter: plain rounding to fmt (no shared exponent) gives a different result
  dt = _FMT_NP[fmt][0]
  plain = np.einsum("kbm,bkn->bmn", a.astype(dt).astype(np.float64), b.astype(dt).astype(np.float64))
  assert np.max(np.abs(plain - want)) > 100 * np.max(bound)
  # a flax Dense with the injected product: the same as the reference on its (in, out) kernel
  layer = nn.Dense(4, use_bias=False, dot_general=dot)
  x = _values(rng, (3, 10))
  k = _values(rng, (10, 4))
  y = np.asarray(jax.jit(layer.apply)({"params": {"kernel": jnp.asarray(k)}}, jnp.asarray(x)))
  ref = _np_bfp(x, fmt, w, block, 1) @ _np_bfp(k, fmt, w, block, 0)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
  out = jax.eval_shape(lambda u, v: dot(u, v, (((0,), (0,)), ((), ()))), a[:, 0, :].astype(jnp.bfloat16),
                       b[0].astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and out.shape == (3, 4)


def _np_im2col_conv_bfp(x, k, fmt, w, block, stride):
  """NHWC x HWIO SAME convolution as one inner product per output pixel, K = (c_in, kh, kw) with the input
  channel slowest, BFP blocks along K on both operands (float64)."""
  kh, kw, cin, cout = k.shape
  n, h, wd, _ = x.shape
  ho, wo = -(-h // stride), -(-wd // stride)
  ph, pw = max((ho - 1) * stride + kh - h, 0), max((wo - 1) * stride + kw - wd, 0)
  xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  cols = np.zeros((n, ho, wo, cin, kh, kw), np.float32)
  for i in range(kh):
    for j in range(kw):
      cols[..., i, j] = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
  pa = cols.reshape(-1, cin * kh * kw)
  km = np.transpose(k, (2, 0, 1, 3)).reshape(cin * kh * kw, cout)
  qa, qk = _np_bfp(pa, fmt, w, block, 1), _np_bfp(km, fmt, w, block, 0)
  return (qa @ qk).reshape(n, ho, wo, cout), (np.abs(qa) @ np.abs(qk)).reshape(n, ho, wo, cout)


@pytest.mark.parametrize("stride", [1, 2])
def test_bfp_conv_general_dilated_matches_numpy_im2col_reference(stride):
  rng = np.random.default_rng(7)
  x = _values(rng, (1, 5, 5, 3))
  k = _values(rng, (3, 3, 3, 2))
  cfg = fp_align.BfpConfig("fp16", 2, 5)               # K = 27: blocks straddle channels and window rows
  conv = fp_align.bfp_conv_general_dilated(cfg)
  run = jax.jit(lambda u, v, dn: conv(u, v, (stride, stride), "SAME", dimension_numbers=dn), static_argnums=2)
  got = np.asarray(run(x, k, ("NHWC", "HWIO", "NHWC")))
  want, mag = _np_im2col_conv_bfp(x, k, "fp16", 2, 5, stride)
  assert got.shape == want.shape
  assert np.all(np.abs(got - want) <= mag * 27 * 2.0 ** -23 + 1e-30)
  if stride == 2:   # NCHW / OIHW layouts give the same numbers, transposed
    got_t = run(np.transpose(x, (0, 3, 1, 2)), np.transpose(k, (3, 2, 0, 1)), ("NCHW", "OIHW", "NCHW"))
    np.testing.assert_array_equal(np.transpose(np.asarray(got_t), (0, 2, 3, 1)), got)
  else:             # a flax Conv with the injected convolution (flax passes ConvDimensionNumbers)
    layer = nn.Conv(2, (3, 3), use_bias=False, conv_general_dilated=conv)
    y = np.asarray(jax.jit(layer.apply)({"params": {"kernel": jnp.asarray(k)}}, jnp.asarray(x)))
    np.testing.assert_array_equal(y, got)


def test_bfp_products_bad_input():
  with pytest.raises(TypeError, match="cfg must be a BfpConfig"):
    fp_align.bfp_dot_general(fp_align.FpAlignConfig())
  with pytest.raises(TypeError, match="cfg must be a BfpConfig"):
    fp_align.bfp_conv_general_dilated(None)
  dot = fp_align.bfp_dot_general(fp_align.BfpConfig("fp16", 2, 4))
  a, b = jnp.ones((2, 6)), jnp.ones((6, 3))
  with pytest.raises(ValueError, match="exactly one contracting dimension"):
    dot(jnp.ones((2, 3, 4)), jnp.ones((3, 4, 5)), (((1, 2), (0, 1)), ((), ())))
  with pytest.raises(ValueError, match=r"axes \[2\] of lhs, which has rank 2"):
    dot(a, b, (((2,), (0,)), ((), ())))
  with pytest.raises(ValueError, match="contracting dimensions differ"):
    dot(a, jnp.ones((5, 3)), (((1,), (0,)), ((), ())))
  with pytest.raises(ValueError, match="dimension_numbers must be"):
    dot(a, b, ((1,), (0,)))
  with pytest.raises(TypeError, match="lhs must be a floating-point array"):
    dot(jnp.ones((2, 6), jnp.int32), b, (((1,), (0,)), ((), ())))
  conv = fp_align.bfp_conv_general_dilated(fp_align.BfpConfig("fp16", 2, 4))
  x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
  dn = ("NHWC", "HWIO", "NHWC")
  with pytest.raises(ValueError, match="feature_group_count=1"):
    conv(x, jnp.ones((3, 3, 1, 2)), (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
  with pytest.raises(ValueError, match="lhs has 2 input features but the kernel expects 3"):
    conv(x, jnp.ones((3, 3, 3, 2)), (1, 1), "SAME", dimension_numbers=dn)
  with pytest.raises(ValueError, match="same rank"):
    conv(x, jnp.ones((3, 2, 2)), (1, 1), "SAME", dimension_numbers=dn)
  with pytest.raises(TypeError, match="rhs must be a floating-point array"):
    conv(x, k.astype(jnp.int8), (1, 1), "SAME", dimension_numbers=dn)


# s21 review: infer.sensai checks the variables' shapes against the model's declared widths


def test_sensai_variables_of_another_width_are_refused_naming_layer_shapes_and_fix():
  # Before: _check_structure only compared the variables with each other, so variables of a wider CNN
  # reached flax (ScopeParamShapeError from channel_stats) or were silently re-modelled (make_subnet).
  x = np.random.default_rng(0).normal(size=(6, 8, 8, 1)).astype(np.float32)
  big = models.CNN(num_classes=4, channels=(4, 8), hidden=16)
  v = big.init(jax.random.PRNGKey(0), x[:1])
  small = models.CNN(num_classes=4, channels=(2, 8), hidden=16)
  msg = (r"layer Conv_0 of CNN: variable params/Conv_0/\w+ has shape \((3, 3, 1, )?4,?\), but the model "
         r"declares \((3, 3, 1, )?2,?\).*Fix: .*model\.clone\(channels=\(4, 8\)\)")
  keep = sensai.prune_masks(sensai.channel_stats(big, v, x), keep_fraction=0.5)
  for call in (lambda: sensai.channel_stats(small, v, x), lambda: sensai.penultimate_features(small, v, x),
               lambda: sensai.make_subnet(small, v, (0, 1), keep), lambda: sensai.prune(small, v, keep),
               lambda: sensai.zero_pruned(small, v, keep)):
    with pytest.raises(ValueError, match=msg):
      call()
  # a hidden width or number of classes of another model: the layer named is the dense one
  with pytest.raises(ValueError, match=r"layer Dense_0 of CNN: .* has shape \(16,\), but the model declares "
                                       r"\(5,\).*model\.clone\(hidden=16\)"):
    sensai.channel_stats(big.clone(hidden=5), v, x)
  with pytest.raises(ValueError, match=r"layer Dense_1 of CNN: .* has shape \(4,\), but the model declares "
                                       r"\(3,\).*model\.clone\(num_classes=4\)"):
    sensai.penultimate_features(big.clone(num_classes=3), v, x)
  # MLP: hidden widths
  mlp = models.MLP(features=(6, 5), num_classes=3)
  vm = mlp.init(jax.random.PRNGKey(1), x[:1])
  with pytest.raises(ValueError, match=r"layer Dense_1 of MLP: variable params/Dense_1/\w+ has shape "
                                       r"\((6, )?5,?\), but the model declares \((6, )?7,?\).*features=\(6, 5\)"):
    sensai.channel_stats(mlp.clone(features=(6, 7)), vm, x)
  # ResNet-20 against a SlimResNet20 of other inner widths, and a pruned ResNet's variables against the
  # unpruned model (the fix names the SlimResNet20 they belong to)
  res = models.ResNet20(num_classes=3, width=4, blocks_per_stage=1)
  xr = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)
  vr = res.init(jax.random.PRNGKey(2), xr[:1])
  slim = sensai.SlimResNet20(num_classes=3, width=4, blocks_per_stage=1, inner=(4, 8, 9))
  with pytest.raises(ValueError, match=r"layer _BasicBlock_2/\w+ of SlimResNet20: .* has shape \(.*16,?\), "
                                       r"but the model declares \(.*9,?\)"):
    sensai.channel_stats(slim, vr, xr)
  masks = sensai.prune_masks(sensai.channel_stats(res, vr, xr), keep_fraction=0.5)
  pm, pv = sensai.prune(res, vr, masks)
  with pytest.raises(ValueError, match=r"SlimResNet20\(.*inner=\(2, 4, 8\)"):
    sensai.channel_stats(res, pv, xr)
  # matching variables still pass, and the pruned pair works together
  assert sensai.channel_stats(pm, pv, xr).apoz["_BasicBlock_0/BatchNorm_0"].shape == (2,)
  # a variable the model declares outside the pruned layers (the stem's batch norm) is missing
  no_stem = {**vr, "params": {**vr["params"], "BatchNorm_0": {"bias": vr["params"]["BatchNorm_0"]["bias"]}}}
  with pytest.raises(ValueError, match=r"layer BatchNorm_0 of ResNet20: the model declares variable "
                                       r"params/BatchNorm_0/scale of shape \(4,\), which the variables lack"):
    sensai.channel_stats(res, no_stem, xr)


# s21 review: quant.fixed_point.quantize with traced bounds that define no range


def test_quantize_traced_reversed_or_infinite_bounds_give_nan_groups_under_jit():
  # Eager calls refuse these bounds (ValueError); under jit the check cannot run. Before, reversed bounds
  # gave a finite scale and silently wrong values (e.g. [0, 0, 2] for [-1, 0.5, 2] with (lo, hi) = (1, -1))
  # and infinite ones an infinite scale; now every group whose bounds define no range has scale NaN and
  # dequantizes to NaN, and the other groups are exactly the eager result.
  x = jnp.asarray(np.random.default_rng(7).normal(size=(4, 3)).astype(np.float32))
  lo = np.array([[-1.0, 2.0, -np.inf]], np.float32)     # group 1 reversed (lo 2 > hi 1), group 2 infinite
  hi = np.array([[1.0, 1.0, 1.0]], np.float32)
  ok = np.array([True, False, False])
  for symmetric, unsigned in ((False, True), (False, False), (True, False), (True, True)):
    f = jax.jit(lambda v, l, h: fxp.quantize(v, 8, symmetric=symmetric, unsigned=unsigned, axis=0,
                                             bounds=(l, h)))
    qt = f(x, lo, hi)
    y = np.asarray(fxp.dequantize(qt))
    assert np.all(np.isnan(np.asarray(qt.scale)[0, ~ok])) and np.all(np.isnan(y[:, ~ok]))
    eager = fxp.quantize(x[:, :1], 8, symmetric=symmetric, unsigned=unsigned, axis=0,
                         bounds=(lo[:, :1], hi[:, :1]))
    np.testing.assert_array_equal(np.asarray(qt.codes)[:, :1], np.asarray(eager.codes))
    np.testing.assert_array_equal(y[:, :1], np.asarray(fxp.dequantize(eager)))
    with pytest.raises(ValueError, match="lo must be <= hi|NaN/inf"):   # eager: refused
      fxp.quantize(x, 8, symmetric=symmetric, unsigned=unsigned, axis=0, bounds=(lo, hi))
  # symmetric amax bounds: +inf amax under jit (and under vmap), and fake_quant's forward value
  g = jax.jit(lambda v, a: fxp.dequantize(fxp.quantize(v, 8, axis=0, bounds=a)))
  y = np.asarray(g(x, jnp.array([[1.0, np.inf, 0.5]], jnp.float32)))
  assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, [0, 2]]))
  fq = jax.jit(lambda v, l, h: fxp.fake_quant(v, 4, symmetric=False, axis=0, bounds=(l, h)))(x, lo, hi)
  assert np.all(np.isnan(np.asarray(fq)[:, ~ok])) and np.all(np.isfinite(np.asarray(fq)[:, ok]))
  vm = jax.vmap(lambda v, l, h: fxp.compute_scale(l, h, 8, False, True)[0] + 0 * v.sum())(
      x[:3], jnp.array([0.0, 3.0, np.inf]), jnp.array([1.0, 2.0, np.inf]))
  assert np.isfinite(float(vm[0])) and np.all(np.isnan(np.asarray(vm[1:])))
  # traced compute_scale: reversed, +-inf and NaN ends give a NaN scale; a proper range its formula
  s, _ = jax.jit(lambda l, h: fxp.compute_scale(l, h, 8, True, False))(
      jnp.array([2.0, -np.inf, 0.0, np.nan, -1.0]), jnp.array([1.0, 1.0, np.inf, 1.0, 2.0]))
  assert np.all(np.isnan(np.asarray(s)[:4])) and float(s[4]) == pytest.approx(2.0 / 127)
