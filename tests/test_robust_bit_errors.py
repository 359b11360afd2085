"""Tests of mlsys_jax.robust.bit_errors: fault statistics, subset property, clipping, RandBET, RErr."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlsys_jax.robust import bit_errors as be

N = 250_000


@pytest.mark.parametrize("p", [1e-4, 1e-3, 1e-2, 0.1])
def test_flip_rate_within_three_standard_errors(p):
  codes = jax.random.randint(jax.random.PRNGKey(1), (N,), 0, 256).astype(jnp.uint8)
  noisy = jax.jit(be.inject_bit_errors, static_argnums=3)(jax.random.PRNGKey(2), codes, p, 8)
  flips = np.unpackbits(np.asarray(codes ^ noisy)[:, None], axis=1)  # (N, 8)
  n_bits = flips.size
  rate = flips.mean()
  se = np.sqrt(p * (1 - p) / n_bits)
  assert abs(rate - p) < 3 * se, (rate, p, se)
  # Every bit plane flips at rate p (no plane is favoured), within 4 SE of a plane's count.
  plane = flips.mean(axis=0)
  assert np.all(np.abs(plane - p) < 4 * np.sqrt(p * (1 - p) / N))


def test_low_bits_only_and_traced_p_and_vmap():
  codes = jnp.zeros((4096,), jnp.uint8)
  noisy = jax.jit(lambda p: be.inject_bit_errors(jax.random.PRNGKey(0), codes, p, 4))(0.3)
  assert int(jnp.max(noisy)) < 16 and int(jnp.max(noisy)) > 0
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  many = jax.vmap(lambda k: be.inject_bit_errors(k, codes, 0.1, 4))(keys)
  assert many.shape == (5, 4096)
  assert len({bytes(np.asarray(m)) for m in many}) == 5  # different patterns per key
  assert int(jnp.sum(be.inject_bit_errors(jax.random.PRNGKey(0), codes, 0.0, 4))) == 0
  assert bool(jnp.all(be.inject_bit_errors(jax.random.PRNGKey(0), codes, 1.0, 4) == 15))
  c16 = jnp.full((100,), 1000, jnp.uint16)
  assert be.inject_bit_errors(jax.random.PRNGKey(0), c16, 0.5, 12).dtype == jnp.uint16


def test_subset_property_exact():
  codes = jax.random.randint(jax.random.PRNGKey(0), (20000,), 0, 256).astype(jnp.uint8)
  key = jax.random.PRNGKey(7)
  rates = [1e-4, 1e-3, 1e-2, 5e-2, 0.2]
  masks = [np.asarray(be.inject_bit_errors(key, codes, p, 8) ^ codes) for p in rates]
  for lo, hi in zip(masks, masks[1:]):
    assert np.all((lo & ~hi) == 0)  # every fault at the lower rate is present at the higher one
  emap = be.profiled_error_map(jax.random.PRNGKey(9), codes.shape, 8)
  faulty = [np.asarray(be._plane_mask(emap.rate_draw, p, jnp.uint8)) for p in rates]
  for lo, hi in zip(faulty, faulty[1:]):
    assert np.all((lo & ~hi) == 0)
  # Stuck-at map: faulty bits read their stuck value, healthy bits keep the stored value.
  out = np.asarray(be.apply_error_map(codes, emap, 0.2, 8))
  f, stuck, c = faulty[-1], np.asarray(emap.stuck), np.asarray(codes)
  np.testing.assert_array_equal(out & f, stuck & f)
  np.testing.assert_array_equal(out & ~f, c & ~f)
  mask = be.error_mask(emap, 0.2)
  np.testing.assert_array_equal(np.asarray(mask), f)
  np.testing.assert_array_equal(np.asarray(be.apply_error_mask(codes, mask, emap.stuck)), out)
  np.testing.assert_array_equal(np.asarray(be.apply_error_mask(codes, mask)), c ^ f)
  with pytest.raises(ValueError, match="must match"):
    be.apply_error_mask(codes, mask[:5])
  flip_map = emap._replace(flip=True)
  np.testing.assert_array_equal(np.asarray(be.apply_error_map(codes, flip_map, 0.2, 8)), c ^ f)


def test_stuck_at():
  codes = jnp.full((1000,), 0b1010, jnp.uint8)
  ones = be.inject_stuck_at(jax.random.PRNGKey(0), codes, 1.0, 4, p_one=1.0)
  zeros = be.inject_stuck_at(jax.random.PRNGKey(0), codes, 1.0, 4, p_one=0.0)
  assert bool(jnp.all(ones == 0b1111)) and bool(jnp.all(zeros == 0))
  half = be.inject_stuck_at(jax.random.PRNGKey(1), jnp.zeros((100000,), jnp.uint8), 0.1, 8)
  assert abs(float(be.bit_error_rate(jnp.zeros((100000,), jnp.uint8), half, 8)) - 0.05) < 0.003


def test_bad_inputs():
  codes = jnp.zeros((8,), jnp.uint8)
  with pytest.raises(ValueError, match="p must lie"):
    be.inject_bit_errors(jax.random.PRNGKey(0), codes, 1.5, 8)
  with pytest.raises(ValueError, match="p must lie"):
    be.inject_bit_errors(jax.random.PRNGKey(0), codes, -0.1, 8)
  with pytest.raises(TypeError, match="Quantize first"):
    be.inject_bit_errors(jax.random.PRNGKey(0), jnp.zeros((8,)), 0.1, 8)
  with pytest.raises(TypeError, match="unsigned"):
    be.inject_bit_errors(jax.random.PRNGKey(0), jnp.zeros((8,), jnp.int8), 0.1, 8)
  with pytest.raises(ValueError, match="wider than bits"):
    be.inject_bit_errors(jax.random.PRNGKey(0), jnp.full((8,), 20, jnp.uint8), 0.1, 4)
  with pytest.raises(ValueError, match="exceeds the width"):
    be.inject_bit_errors(jax.random.PRNGKey(0), codes, 0.1, 12)
  with pytest.raises(ValueError, match="does not match"):
    be.apply_error_map(codes, be.profiled_error_map(jax.random.PRNGKey(0), (9,), 8), 0.1, 8)
  with pytest.raises(ValueError, match="w_max"):
    be.clip_weights(0.0)


def _params():
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  return {"w": jax.random.normal(k[0], (16, 4)) * 0.3, "b": jax.random.normal(k[1], (4,)) * 0.1,
          "step": jnp.array(3, jnp.int32)}


def test_param_tree_roundtrip_and_perturbation():
  params = _params()
  qp = be.quantize_params(params, 8, w_max=0.5)
  assert qp["w"].codes.dtype == jnp.uint8 and not qp["w"].symmetric and qp["step"].dtype == jnp.int32
  deq = be.dequantize_params(qp)
  np.testing.assert_allclose(deq["w"], jnp.clip(params["w"], -0.5, 0.5), atol=float(qp["w"].scale.reshape(())) / 2 + 1e-7)
  same = be.perturb_params(jax.random.PRNGKey(1), params, 0.0, 8, w_max=0.5)
  np.testing.assert_array_equal(same["w"], deq["w"])
  noisy = be.perturb_params(jax.random.PRNGKey(1), params, 0.05, 8, w_max=0.5)
  assert float(jnp.abs(noisy["w"] - deq["w"]).max()) > 0
  # Robust (asymmetric, unsigned) codes keep perturbed weights inside the clean range.
  lo, hi = float(deq["w"].min()), float(deq["w"].max())
  step = float(qp["w"].scale.reshape(()))
  assert float(noisy["w"].min()) >= lo - step and float(noisy["w"].max()) <= hi + step


def test_clip_weights_is_a_projection():
  params = {"w": jnp.array([0.05, -0.09, 0.3])}
  tx = optax.chain(optax.sgd(1.0), be.clip_weights(0.1))
  st = tx.init(params)
  grads = {"w": jnp.array([-0.1, 0.0, 0.1])}
  upd, st = tx.update(grads, st, params)
  new = optax.apply_updates(params, upd)
  np.testing.assert_allclose(new["w"], [0.1, -0.09, 0.1], atol=1e-7)
  with pytest.raises(ValueError, match="needs params"):
    be.clip_weights(0.1).update(grads, be.clip_weights(0.1).init(params))


def test_randbet_gradient_formula():
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 3)) * 0.2}
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 8))
  y = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 3)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(x @ p["w"], y).mean()
  key = jax.random.PRNGKey(5)
  (lc, lp), g = jax.jit(lambda p: be.randbet_value_and_grad(loss, p, key, p=0.05, bits=8, w_max=0.3,
                                                            grad_clamp=0.01))(params)
  clean = be.dequantize_params(be.quantize_params(params, 8, 0.3))
  noisy = be.perturb_params(key, params, 0.05, 8, w_max=0.3)
  gc = jax.grad(loss)(clean)["w"]
  gp = jax.grad(loss)(noisy)["w"]
  np.testing.assert_allclose(lc, loss(clean), rtol=1e-6)
  np.testing.assert_allclose(lp, loss(noisy), rtol=1e-6)
  np.testing.assert_allclose(g["w"], (gc + jnp.clip(gp, -0.01, 0.01)) / 2, rtol=1e-5, atol=1e-7)
  (_, _), g0 = be.randbet_value_and_grad(loss, params, key, p=0.05, bits=8, w_max=0.3, perturbed=False)
  np.testing.assert_allclose(g0["w"], gc, rtol=1e-5, atol=1e-7)
  (_, _), gt = be.randbet_value_and_grad(loss, params, key, p=0.05, bits=8, w_max=0.3,
                                         loss_threshold=1e-3)
  np.testing.assert_allclose(gt["w"], gc, rtol=1e-5, atol=1e-7)  # curriculum keeps it clean-only


def test_robust_error_properties():
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 3))}
  x = jax.random.normal(jax.random.PRNGKey(1), (200, 8))
  y = jnp.argmax(x @ params["w"], -1)
  apply = lambda p, xb: xb @ p["w"]
  r0 = be.robust_error(apply, params, x, y, p=0.0, bits=8, num_patterns=3)
  assert r0.rerr_mean == pytest.approx(r0.err) and r0.err < 0.05
  r1 = be.robust_error(apply, params, x, y, p=0.01, bits=8, num_patterns=5)
  r2 = be.robust_error(apply, params, x, y, p=0.1, bits=8, num_patterns=5)
  assert r0.rerr_mean <= r1.rerr_mean <= r2.rerr_mean and r2.rerr_mean > r0.rerr_mean
  assert r1.rerr_per_pattern.shape == (5,)


# ----------------------------------------------------------------------------------------------------
# The counter-based in-register generator (mlsys_jax/robust/_pallas_bits.py).

from mlsys_jax.robust import _pallas_bits as pb  # noqa: E402


def test_threefry_matches_jax():
  import jax.extend.random as jr
  kd = jax.random.key_data(jax.random.PRNGKey(11))
  x = jax.random.bits(jax.random.PRNGKey(4), (2, 37), jnp.uint32)
  y0, y1 = pb.threefry2x32(kd[0], kd[1], x[0], x[1])
  np.testing.assert_array_equal(np.concatenate([y0, y1]), jr.threefry_2x32(kd, x.reshape(-1)))


def test_philox_known_answers():
  """Random123's known-answer vectors of Philox-4x32-10 (counter, key -> output)."""
  u = jnp.uint32
  cases = [((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
           ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
           ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
            (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]
  for ctr, key, want in cases:
    got = pb.philox4x32(u(key[0]), u(key[1]), *(jnp.full((1,), c, u) for c in ctr))
    assert [int(g[0]) for g in got] == list(want)
  a = jax.random.bits(jax.random.PRNGKey(0), (1000,), jnp.uint32)
  hi, lo = pb._mulhilo_split(a, 0xCD9E8D57)
  prod = np.asarray(a).astype(np.uint64) * np.uint64(0xCD9E8D57)
  np.testing.assert_array_equal(np.asarray(hi), prod >> np.uint64(32))
  np.testing.assert_array_equal(np.asarray(lo), prod & np.uint64(0xFFFFFFFF))


@pytest.mark.parametrize("hash", ["philox", "threefry"])
def test_bitsliced_comparison_is_the_32_bit_draw(hash):
  """Faults equal U < t exactly, with U rebuilt from all 32 level words (most significant first)."""
  k0, k1 = np.uint32(123), np.uint32(456789)
  nw = 300
  idx = jnp.arange(nw, dtype=jnp.uint32)
  lv = []
  for m in range(16 if hash == "threefry" else 8):
    lv += [np.asarray(r, np.uint64) for r in pb.level_words(jnp.uint32(k0), jnp.uint32(k1), idx, m, hash)]
  lanes = np.arange(32, dtype=np.uint64)
  u = sum(((lv[l][:, None] >> lanes) & 1) << np.uint64(31 - l) for l in range(32))   # (nw, 32) draws
  # p's threshold, extreme and "adversarial" thresholds (equal to some lane's draw, or one above).
  below = jax.jit(lambda t: pb.below_words(jnp.uint32(k0), jnp.uint32(k1), t, jnp.bool_(False), idx,
                                           0xFFFFFFFF, hash))
  for t in [0, 1, 2 ** 20, int(0.01 * 2 ** 32), 2 ** 31, int(u[7, 3]), int(u[7, 3]) + 1, 2 ** 32 - 1]:
    got = np.asarray(below(jnp.uint32(t)), np.uint64)
    want = ((u < t).astype(np.uint64) << lanes).sum(axis=1)
    np.testing.assert_array_equal(got, want, err_msg=f"t={t}")
  always = pb.below_words(jnp.uint32(k0), jnp.uint32(k1), jnp.uint32(0), jnp.bool_(True), idx, 0x0F0F0F0F)
  assert bool(jnp.all(always == 0x0F0F0F0F))


@pytest.mark.parametrize("dtype,bits,n", [(jnp.uint8, 5, 515),
                                          pytest.param(jnp.uint16, 12, 999, marks=pytest.mark.slow)])
def test_kernel_matches_xla_bit_for_bit(dtype, bits, n):
  codes = jax.random.randint(jax.random.PRNGKey(n), (n,), 0, 2 ** bits).astype(dtype).reshape(-1, 1)
  key = jax.random.PRNGKey(5)
  kw = dict(words=64, sub=32, unroll=True)    # 3 programs of 2 sub-blocks, loads first; the last one ragged
  both = lambda impl, kw: jax.jit(lambda p, q: (be._inject(key, codes, p, bits, impl=impl, **kw),
                                                be._inject(key, codes, p, bits, p_one=q, impl=impl, **kw)))
  xla, kernel = both("xla", {}), both("interpret", kw)
  for p, q in ((0.0, 0.5), (0.03, 0.3), (1.0, 1.0)):
    for a, b in zip(kernel(p, q), xla(p, q)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert a.shape == (n, 1) and a.dtype == dtype
  # The public function is the XLA path here (no GPU), with the same bits.
  np.testing.assert_array_equal(np.asarray(be.inject_bit_errors(key, codes, 0.03, bits)),
                                np.asarray(kernel(0.03, 0.3)[0]))


def test_flip_statistics_uint16_and_symmetry():
  """Binomial bounds per bit plane (uint16, 12 bits), equal 0->1 and 1->0 rates, no pairwise coupling."""
  n, p = 60_000, 0.05
  codes = jax.random.randint(jax.random.PRNGKey(0), (n,), 0, 2 ** 12).astype(jnp.uint16)
  noisy = be.inject_bit_errors(jax.random.key(3, impl="rbg"), codes, p, 12)
  c, d = np.asarray(codes), np.asarray(codes ^ noisy)
  assert d.max() < 2 ** 12                                   # bits 12..15 never touched
  planes = (d[:, None] >> np.arange(12)) & 1                 # (n, 12) flips
  se = np.sqrt(p * (1 - p) / n)
  assert np.all(np.abs(planes.mean(0) - p) < 4.5 * se), planes.mean(0)
  stored = (c[:, None] >> np.arange(12)) & 1
  r01, r10 = planes[stored == 0].mean(), planes[stored == 1].mean()   # 0->1 and 1->0 flip rates
  se2 = np.sqrt(p * (1 - p) * (1 / (stored == 0).sum() + 1 / (stored == 1).sum()))
  assert abs(r01 - r10) < 4 * se2, (r01, r10)
  # Neighbouring planes of one code and the same plane of neighbouring codes flip independently.
  for a, b in ((planes[:, :-1], planes[:, 1:]), (planes[:-1], planes[1:])):
    both = (a & b).mean()
    assert abs(both - p * p) < 4.5 * np.sqrt(p * p * (1 - p * p) / a.size), both


def test_subset_property_exact_for_stuck_at_faults():
  zeros = jnp.zeros((5000,), jnp.uint8)
  key = jax.random.PRNGKey(2)
  stuck = jax.jit(lambda p: be.inject_stuck_at(key, zeros, p, 8, p_one=1.0))
  masks = [np.asarray(stuck(p)) for p in (0.001, 0.01, 0.1, 0.5)]
  assert masks[0].any()
  for lo, hi in zip(masks, masks[1:]):
    assert np.all((lo & ~hi) == 0)


@pytest.mark.slow
def test_kernel_self_test_runs_while_tracing(monkeypatch):
  orig = pb.inject
  monkeypatch.setattr(pb, "inject", lambda *a, impl="xla", **k: orig(*a, impl="interpret" if impl == "pallas"
                                                                       else impl, **k))
  pb._kernel_self_test.cache_clear()
  seen = []
  jax.jit(lambda x: seen.append(pb._kernel_self_test()) or x)(jnp.ones(2))
  pb._kernel_self_test.cache_clear()
  assert seen == [True]
