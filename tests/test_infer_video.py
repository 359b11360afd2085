"""Tests of mlsys_jax.infer.video: sound bounds (float64 reference), bitwise exactness against the flax
model on many streams (including adversarial ones), fallback, bad input."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.infer import video

H = W = 20
TILE = 4


def _sparse_net_variables(net, seed=0, bias=-0.04):
  """Zero-mean (high-pass) kernels and a negative bias: zero on smooth background, like a detector."""
  v = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, H, W, 3)))
  p = jax.tree_util.tree_map(lambda a: a, v["params"])
  for k in p:
    ker = p[k]["kernel"]
    p[k] = {"kernel": ker - jnp.mean(ker, axis=(0, 1), keepdims=True),
            "bias": jnp.full_like(p[k]["bias"], bias)}
  return {"params": p}


NET = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, nn.Conv(4, (3, 3)), nn.relu])
VARS = _sparse_net_variables(NET)


_CACHE = {}


def _model_cache():
  if "m" not in _CACHE:
    rb = video.range_bound_model(NET, VARS, (H, W, 3), tile=TILE, max_active_fraction=0.5, buckets=())
    _CACHE["m"] = rb, jax.jit(rb.step), jax.jit(lambda f: NET.apply(VARS, f[None])[0])
  return _CACHE["m"]


@pytest.fixture(scope="module")
def model():
  return _model_cache()


def _run(model, frames):
  rb, step, ref = model
  st, y = rb.init(frames[0])
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref(frames[0])))
  all_stats = []
  for f in frames[1:]:
    st, y, s = step(st, f)
    r = ref(f)
    same = np.asarray(y).view(np.uint32) == np.asarray(r).view(np.uint32)
    assert same.all(), f"{(~same).sum()} outputs differ from the flax model"
    all_stats.append(s)
  return all_stats


def test_bounds_are_sound_against_float64():
  rng = np.random.default_rng(0)
  layer = video.ConvLayer(jnp.asarray(rng.normal(size=(3, 3, 5, 7)), jnp.float32),
                          jnp.asarray(rng.normal(size=7), jnp.float32))
  x0 = rng.uniform(-1, 2, (30, 3, 3, 5)).astype(np.float32)
  x1 = (x0 + rng.normal(0, 0.1, x0.shape)).astype(np.float32)
  k64, b64 = np.asarray(layer.kernel, np.float64), np.asarray(layer.bias, np.float64)
  z = lambda x: np.einsum("nijc,ijco->no", x.astype(np.float64), k64) + b64
  ub0, m0 = video.range_upper_bound(layer, x0.min((1, 2)), x0.max((1, 2)))
  assert np.all(np.asarray(ub0, np.float64) >= z(x0))
  # a pre-activation bound of frame 0 that is exact up to the margin, propagated to frame 1
  prev = jnp.asarray(z(x0) + np.asarray(m0), jnp.float32)
  d = x1 - x0
  amax = np.abs(x1).max((1, 2)) + np.abs(x0).max((1, 2))
  ub1 = video.temporal_upper_bound(layer, prev, d.min((1, 2)), d.max((1, 2)), amax)
  assert np.all(np.asarray(ub1, np.float64) >= z(x1))
  # the temporal bound is tighter than the range bound for a small change
  ubr1, _ = video.range_upper_bound(layer, x1.min((1, 2)), x1.max((1, 2)))
  assert np.mean(np.asarray(ub1) < np.asarray(ubr1)) > 0.5
  # the dense float32 error lies inside the margin
  zf = np.einsum("nijc,ijco->no", x0, np.asarray(layer.kernel)) + np.asarray(layer.bias)
  assert np.all(np.abs(zf - z(x0)) <= np.asarray(m0))


def test_margin_factor_closed_form_and_limit():
  assert video.fp_margin_factor(27) == pytest.approx(2 * 28 * 2.0 ** -24)
  with pytest.raises(ValueError, match="margin derivation"):
    video.fp_margin_factor(10 ** 6, 2.0 ** -10)


@pytest.mark.slow  # the stream tests check the same through the model; this one checks one layer's flags
def test_tile_conv_is_bitwise_the_full_conv_on_cpu():
  rng = np.random.default_rng(1)
  layer = video.ConvLayer(jnp.asarray(rng.normal(size=(3, 3, 6, 8)), jnp.float32),
                          jnp.asarray(rng.normal(size=8), jnp.float32))
  x = jnp.asarray(rng.normal(size=(18, 18, 6)), jnp.float32)
  st, y = video.conv_layer_init(layer, x, 4)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(video.dense_conv(layer, x)))
  x2 = x.at[5, 7].add(1.0)
  changed = jnp.zeros((5, 5), bool).at[1:3, 1:3].set(True)  # the tiles around pixel (5, 7)
  amax = jnp.ones((5, 5, 6), jnp.float32)
  _, y2, flags, s = jax.jit(lambda st, a, b: video.conv_layer_step(
      layer, st, a, b, changed, amax, tile=4, capacity=(6,)))(st, x2, x)
  assert int(s.dense) == 0 and int(s.computed) == 4 and int(s.reused) == 21
  np.testing.assert_array_equal(np.asarray(y2), np.asarray(video.dense_conv(layer, x2)))
  # the output change flags: exactly the tiles whose bits changed
  diff = np.any(np.asarray(y2) != np.asarray(y), axis=-1)
  got = np.asarray(flags[..., 1, 1])
  want = np.array([[diff[i * 4:i * 4 + 4, j * 4:j * 4 + 4].any() for j in range(5)] for i in range(5)])
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("activity", ["static", "low", "medium", "full"])
def test_exact_on_synthetic_streams(model, activity):
  frames = video.synthetic_video(3, num_frames=5, height=H, width=W, activity=activity)
  stats = _run(model, frames)
  last = stats[-1]
  if activity == "static":
    assert all(int(s.reused) == (H // TILE) * (W // TILE) for s in last)
  if activity == "low":
    assert sum(int(s.skipped) + int(s.reused) for s in last) > 0
  for s in last:  # a skipped tile is always a zero tile
    assert int(s.skipped) <= int(s.zero_tiles)


def test_skips_happen_and_are_exact(model):
  # a bright object moving over a flat background: the changed tiles away from edges are provably zero
  f = np.full((6, H, W, 3), 0.5, np.float32)
  for t in range(6):
    f[t, 2:6, 2 + 2 * t:6 + 2 * t] = 0.9
  stats = _run(model, f)
  assert sum(int(s[0].skipped) for s in stats) > 0


def test_adversarial_every_pixel_changes(model):
  rng = np.random.default_rng(7)
  frames = rng.uniform(0, 1, (5, H, W, 3)).astype(np.float32)
  frames[2] = -frames[2]  # sign flips
  frames[3] = frames[2] + np.float32(1e-7)  # sub-ulp-scale changes
  stats = _run(model, frames)
  assert int(stats[0][0].dense) == 1  # above the capacity: dense fallback
  # alternating 0.0 / -0.0 changes bits but not values
  z = np.zeros((3, H, W, 3), np.float32)
  z[1] = -0.0
  _run(model, z)


def test_network_level_fallback_is_taken_and_exact(model):
  # every pixel changes (adversarial values) -> the whole network runs densely (one decision per
  # frame, counted in the state); a quiet frame after it takes the skip path again; bitwise throughout
  rb, step, ref = model
  rng = np.random.default_rng(11)
  low = video.synthetic_video(4, num_frames=3, height=H, width=W, activity="low")
  noisy = rng.uniform(-1, 1, (2, H, W, 3)).astype(np.float32)
  noisy[1] = np.nextafter(noisy[0], np.float32(np.inf))  # every pixel moves by one ulp
  frames = np.concatenate([low[:1], noisy, low[1:]])
  st, _ = rb.init(frames[0])
  assert int(st.dense_frames) == 0
  counts = []
  for f in frames[1:]:
    st, y, s = step(st, f)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint32), np.asarray(ref(f)).view(np.uint32))
    counts.append(int(st.dense_frames))
    if counts[-1] > (counts[-2] if len(counts) > 1 else 0):  # network-level dense: every layer dense
      assert all(int(l.dense) == 1 and int(l.reused) == 0 for l in s)
  # noise, one-ulp noise, the jump back to the scene: dense network; then low activity: skip path,
  # reusing tiles of the state the dense network left
  assert counts == [1, 2, 3, 3]
  assert int(s[0].dense) == 0 and int(s[0].reused) > 0


def test_step_updates_the_state_in_place():
  # a stream step compiled with the state donated holds no copy of a layer output (the network-level
  # fallback and the per-layer buckets are 0/1-trip while loops: XLA updates their carry in place)
  rb, _, _ = _model_cache()
  frames = jnp.asarray(video.synthetic_video(0, num_frames=3, height=H, width=W, activity="low"))

  def loop(st, seq):
    return jax.lax.scan(lambda st, f: (rb.step(st, f)[0], None), st, seq)[0]
  text = jax.jit(loop, donate_argnums=0).lower(rb.init(frames[0])[0], frames[1:]).compile().as_text()
  assert text.count(f"f32[{H},{W},4]") > 0
  assert f"f32[{H},{W},4]{{2,1,0}} copy(" not in text
  assert f"f32[1,{H},{W},4]{{3,2,1,0}} copy(" not in text


def test_nan_frame_under_jit_propagates_and_recovers(model):
  rb, step, ref = model
  frames = video.synthetic_video(1, num_frames=4, height=H, width=W, activity="low")
  st, _ = rb.init(frames[0])
  bad = frames[1].copy()
  bad[3, 4, 0] = np.nan
  st, y, _ = step(st, jnp.asarray(bad))
  r = np.asarray(ref(jnp.asarray(bad)))
  np.testing.assert_array_equal(np.isnan(np.asarray(y)), np.isnan(r))
  assert np.isnan(r).any()
  for f in frames[2:]:
    st, y, _ = step(st, f)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref(f)))


def test_valid_padding_and_ragged_tiles():
  rng = np.random.default_rng(2)
  layers = [video.ConvLayer(jnp.asarray(rng.normal(size=(3, 3, 2, 3)), jnp.float32),
                            jnp.full((3,), -0.5, jnp.float32), "VALID"),
            video.ConvLayer(jnp.asarray(rng.normal(size=(5, 5, 3, 2)), jnp.float32),
                            jnp.zeros((2,), jnp.float32), "SAME", relu=False)]
  rb = video.range_bound_model(layers, None, (13, 11, 2), tile=4, buckets=())
  dense = jax.jit(video.dense_model(layers))
  x = rng.uniform(0, 1, (13, 11, 2)).astype(np.float32)
  st, y = rb.init(x)
  assert y.shape == (11, 9, 2)
  step = jax.jit(rb.step)
  for t in range(3):
    x = x.copy()
    x[t * 3:t * 3 + 2, 1:4] += 0.5
    st, y, _ = step(st, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(dense(x)))


@pytest.mark.parametrize("kernel,padding", [((3, 3), "SAME"), ((5, 3), "SAME"), ((3, 5), "VALID")])
def test_changed_tiles_are_exactly_the_changed_receptive_fields(kernel, padding):
  # region flags of the input tiles + neighbour strips == brute-force receptive-field change test
  rng = np.random.default_rng(5)
  t, h, w = 4, 17, 14
  layer = video.ConvLayer(jnp.zeros(kernel + (1, 1), jnp.float32), jnp.zeros((1,), jnp.float32), padding)
  ho, wo, nh, nw, ph, pw = video._geometry(layer, (h, w), t)
  for trial in range(4):
    m = rng.uniform(size=(h, w)) < [0.01, 0.03, 0.1, 0.0][trial]
    flags = video._grid_flags(jnp.asarray(m), t, -(-h // t), -(-w // t), video._strips(layer))
    got = np.asarray(video._rf_changed(flags, nh, nw))
    mp = np.pad(m, ((ph, kernel[0] + t), (pw, kernel[1] + t)))
    want = np.array([[mp[i * t:i * t + t + kernel[0] - 1, j * t:j * t + t + kernel[1] - 1].any()
                      for j in range(nw)] for i in range(nh)])
    np.testing.assert_array_equal(got, want)
  big = video.ConvLayer(jnp.zeros((5, 5, 1, 1), jnp.float32), jnp.zeros((1,), jnp.float32))
  with pytest.raises(ValueError, match="halo"):
    video.range_bound_model([big], None, (10, 10, 1), tile=2)


def test_gpu_tile_conv_path_is_bitwise_too(monkeypatch):
  # other backends convolve the patches with a VALID conv: run that code path here (same values)
  rng = np.random.default_rng(3)
  layer = video.ConvLayer(jnp.asarray(rng.normal(size=(3, 5, 4, 6)), jnp.float32),
                          jnp.asarray(rng.normal(size=6), jnp.float32))
  p = jnp.asarray(rng.normal(size=(5, 4 + 2, 4 + 4, 4)), jnp.float32)
  cpu = np.asarray(video._conv_valid(p, layer))
  monkeypatch.setattr(video.jax, "default_backend", lambda: "gpu")
  other = np.asarray(video._conv_valid(p, layer))
  assert cpu.shape == other.shape == (5, 4, 4, 6)
  np.testing.assert_array_equal(cpu.view(np.uint32), other.view(np.uint32))


def test_change_propagation_stops_where_outputs_keep_their_bits():
  # a flat patch of the background changes level: the high-pass first layer's outputs there stay
  # exactly 0 (proved or recomputed), so the second layer sees no change and does no work at all
  rb, step, ref = _model_cache()
  f0 = np.full((H, W, 3), 0.5, np.float32)
  f1 = f0.copy()
  f1[8:12, 8:12] = 0.5 + 2 ** -9
  st, _ = rb.init(f0)
  st, y, s = step(st, f1)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref(f1)))
  assert int(s[0].reused) < (H // TILE) * (W // TILE)  # the first layer looked at the changed tiles
  assert int(s[1].reused) == (H // TILE) * (W // TILE) and int(s[1].computed) == 0


def test_fallback_thresholds_per_layer():
  frames = video.synthetic_video(2, num_frames=3, height=H, width=W, activity="full")
  ref = jax.jit(lambda f: NET.apply(VARS, f[None])[0])
  # layer 0 always dense once anything changed, layer 1 sparse up to all its tiles
  rb = video.range_bound_model(NET, VARS, (H, W, 3), tile=TILE, max_active_fraction=(0.0, 1.0),
                               buckets=())
  assert rb.capacities == ((), (25,))
  st, _ = rb.init(frames[0])
  st, y, s = jax.jit(rb.step)(st, frames[1])
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref(frames[1])))
  assert int(s[0].dense) == 1 and int(s[1].dense) == 0
  with pytest.raises(ValueError, match="entries"):
    video.range_bound_model(NET, VARS, (H, W, 3), tile=TILE, max_active_fraction=(0.5,))


def _fake_timer(network_wins: bool, layer_wins: bool):
  """A deterministic stand-in for stats.time_interleaved that still calls both sides once."""
  from mlsys_jax import stats

  def fake(fn_a, fn_b, **kw):
    a, _ = fn_a(), fn_b()
    wins = network_wins if a.shape[-1] == 3 else layer_wins  # whole steps return the frame
    ta, tb = (0.5, 1.0) if wins else (2.0, 1.0)
    return stats.Timing(np.array([ta]), np.array([tb]), ta, tb, tb / ta, float(ta < tb))
  return fake


def test_network_switch_is_calibrated_on_whole_steps(monkeypatch):
  from mlsys_jax import stats
  layers = video.layers_from_flax(NET, VARS)
  for wins, want in ((True, 0.5), (False, 0.0)):
    monkeypatch.setattr(stats, "time_interleaved", _fake_timer(wins, False))
    best, rec = video._calibrate_network(layers, (H, W, 3), TILE, (5, 5), (0.0, 0.0), (0.5,), 1, 1.0,
                                         np.random.default_rng(0), 2.0 ** -24, ())
    assert best == want and set(rec["sparse_s"]) == {0.5}


@pytest.mark.slow  # compiles every layer step and a whole step
def test_calibration_sets_the_network_switch_from_whole_steps(monkeypatch):
  # a first layer that loses on its own (cheap: few input channels) must still get a sparse threshold
  # when whole steps win
  from mlsys_jax import stats
  monkeypatch.setattr(stats, "time_interleaved", _fake_timer(True, False))
  fr, cal = video.calibrate_active_fraction(NET, VARS, (H, W, 3), tile=TILE, fractions=(0.5,),
                                            repeats=1, return_timings=True)
  assert fr == (0.5, 0.0) and set(cal[0]["network"]["sparse_s"]) == {0.5}
  # the first layer lost on its own: per layer only, it would have disabled the sparse path
  assert cal[0]["sparse_s"][0.5] > cal[0]["dense_s"]


def test_calibration_block_changes_exactly_its_tiles():
  rng = np.random.default_rng(0)
  layer = video.ConvLayer(jnp.zeros((3, 3, 3, 1), jnp.float32), jnp.zeros((1,), jnp.float32))
  x0 = rng.uniform(-1, 1, (H, W, 3)).astype(np.float32)
  for n, want in ((1, 1), (3, 3), (6, 6), (7, 6), (25, 25)):
    x1 = video._changed_block(x0, n, TILE, (5, 5), max(video._strips(layer)), rng)
    flags = video._grid_flags(jnp.asarray(np.any(x1 != x0, axis=-1)), TILE, 5, 5, video._strips(layer))
    assert int(jnp.sum(video._rf_changed(flags, 5, 5))) == want  # never more than n (the capacity)


@pytest.mark.slow  # compiles and times one layer step per layer and fraction
def test_calibration_returns_a_measured_fraction_per_layer():
  fr = video.calibrate_active_fraction(NET, VARS, (H, W, 3), tile=TILE, fractions=(0.25, 0.5), repeats=1)
  assert len(fr) == 2 and all(f in (0.0, 0.25, 0.5) for f in fr)


def test_bad_input():
  with pytest.raises(ValueError, match="gelu"):
    net = nn.Sequential([nn.Conv(2, (3, 3)), nn.gelu])
    video.range_bound_model(net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))), (8, 8, 1))
  with pytest.raises(ValueError, match="strides"):
    net = nn.Sequential([nn.Conv(2, (3, 3), strides=2), nn.relu])
    video.range_bound_model(net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))), (8, 8, 1))
  with pytest.raises(ValueError, match="Dense"):
    net = nn.Sequential([nn.Conv(2, (3, 3)), nn.relu, nn.Dense(3)])
    video.range_bound_model(net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))), (8, 8, 1))
  with pytest.raises(TypeError, match="Sequential"):
    video.range_bound_model(nn.Conv(2, (3, 3)), {}, (8, 8, 1))
  rb = video.range_bound_model(NET, VARS, (H, W, 3), tile=TILE)
  st, _ = rb.init(np.zeros((H, W, 3), np.float32))
  with pytest.raises(ValueError, match="differs from the stream"):
    rb.step(st, np.zeros((H + 1, W, 3), np.float32))
  with pytest.raises(ValueError, match="NaN"):
    rb.step(st, np.full((H, W, 3), np.nan, np.float32))
  with pytest.raises(TypeError, match="float32"):
    rb.init(np.zeros((H, W, 3), np.float64))


def test_synthetic_video_and_loader(tmp_path):
  a = video.synthetic_video(5, num_frames=4, height=16, width=12, activity="medium")
  np.testing.assert_array_equal(a, video.synthetic_video(5, num_frames=4, height=16, width=12,
                                                         activity="medium"))
  assert a.shape == (4, 16, 12, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
  s = video.synthetic_video(0, num_frames=3, height=8, width=8, activity="static")
  assert np.array_equal(s[0], s[2])
  f = video.synthetic_video(0, num_frames=3, height=16, width=16, activity="full")
  assert np.mean(np.any(f[1] != f[2], axis=-1)) > 0.9
  with pytest.raises(ValueError, match="activity"):
    video.synthetic_video(0, activity="busy")
  p = tmp_path / "v.npy"
  np.save(p, (a * 255).round().astype(np.uint8)[..., 0])
  b = video.load_frames(str(p))
  assert b.shape == (4, 16, 12, 1)
  np.testing.assert_allclose(b[..., 0], a[..., 0], atol=1e-6)
  with pytest.raises(ValueError, match=".npy"):
    video.load_frames(str(tmp_path / "v.mp4"))
