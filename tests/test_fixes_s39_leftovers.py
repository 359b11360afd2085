"""Regression tests (s39) for five leftovers of the s38 review: swish_sign's gradient at +-inf, a traced
NaN bit-error rate, quantize of an empty tensor, a traced negative BFP align_bits, and negative usage in
traced placement traces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.quant.binary.quantizers import swish_sign
from mlsys_jax.quant.fixed_point import dequantize, quantize
from mlsys_jax.quant.fp_align import BfpConfig, bfp_quantize
from mlsys_jax.robust.bit_errors import bit_error_rate, inject_bit_errors, perturb_params
from mlsys_jax.sched.placement import policies, sim, traces

# ---------------------------------------------------------------- 1: swish_sign gradient at +-inf


def _swish_grad_np(x, beta):
  bx = beta * np.asarray(x, np.float64)
  with np.errstate(over="ignore"):                        # cosh overflows to inf: the value is then 0
    return beta * (2 - bx * np.tanh(bx / 2)) / (1 + np.cosh(bx))


def test_swish_sign_grad_at_inf_is_zero_limit():
  x = jnp.array([-jnp.inf, jnp.inf, -1e30, 1e30], jnp.float32)
  g = jax.grad(lambda v: swish_sign(v, beta=5.0).sum())(x)
  np.testing.assert_array_equal(np.asarray(g), 0.0)      # was NaN at +-inf (-inf / inf)
  gj = jax.jit(jax.grad(lambda v: swish_sign(v, beta=2.0).sum()))(x)
  np.testing.assert_array_equal(np.asarray(gj), 0.0)


def test_swish_sign_grad_finite_inputs_unchanged():
  x = jnp.array([-3.0, -0.5, -0.0, 0.0, 0.1, 1.0, 40.0, -200.0], jnp.float32)
  beta = 5.0
  g = jax.grad(lambda v: swish_sign(v, beta=beta).sum())(x)
  bx = beta * x                                           # the unguarded formula, bit for bit
  ref = beta * (2 - bx * jnp.tanh(bx * 0.5)) / (1 + jnp.cosh(bx))
  np.testing.assert_array_equal(np.asarray(g), np.asarray(ref))
  np.testing.assert_allclose(np.asarray(g), _swish_grad_np(x, beta), rtol=1e-5, atol=1e-30)
  assert np.isnan(float(jax.grad(lambda v: swish_sign(v))(jnp.float32(jnp.nan))))


# ---------------------------------------------------------------- 2: traced NaN bit-error rate


def test_inject_bit_errors_traced_nan_p_poisons_not_p0():
  codes = jnp.arange(0, 256, 17, dtype=jnp.uint8) % 16
  key = jax.random.PRNGKey(3)
  f = jax.jit(lambda p: inject_bit_errors(key, codes, p, 4))
  out = f(jnp.float32(jnp.nan))
  assert not bool(jnp.all(out == codes))                 # was: no flip at all (acts like p = 0)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(codes ^ jnp.uint8(15)))  # every low bit flips
  assert float(bit_error_rate(codes, out, 4)) == 1.0
  for p in (0.0, 0.3, 1.0):                              # valid rates: as before, and jit = eager
    np.testing.assert_array_equal(np.asarray(f(jnp.float32(p))),
                                  np.asarray(inject_bit_errors(key, codes, p, 4)))
  with pytest.raises(ValueError):
    inject_bit_errors(key, codes, float("nan"), 4)       # concrete NaN is refused


def test_perturb_params_traced_nan_p_gives_nan():
  params = {"w": jnp.linspace(-1.0, 1.0, 7), "step": jnp.int32(2)}
  key = jax.random.PRNGKey(0)
  f = jax.jit(lambda p: perturb_params(key, params, p, 8))
  out = f(jnp.float32(jnp.nan))
  assert np.all(np.isnan(np.asarray(out["w"]))) and int(out["step"]) == 2
  np.testing.assert_array_equal(np.asarray(f(jnp.float32(0.05))["w"]),
                                np.asarray(perturb_params(key, params, 0.05, 8)["w"]))


# ---------------------------------------------------------------- 3: quantize of an empty tensor


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape,axis", [((0,), None), ((0, 3), 0), ((3, 0), 1), ((3, 0), None)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_empty_in_empty_out(jit, shape, axis, symmetric):
  q = lambda x: quantize(x, 8, axis=axis, symmetric=symmetric)
  x = jnp.zeros(shape, jnp.float32)
  qt = (jax.jit(q) if jit else q)(x)                     # was: raw "zero-size array to reduction" error
  ref = quantize(jnp.zeros(tuple(1 if d == 0 else d for d in shape)), 8, axis=axis, symmetric=symmetric)
  assert qt.codes.shape == shape and qt.codes.dtype == ref.codes.dtype
  assert qt.scale.shape == tuple(1 if a in qt.axis else d for a, d in enumerate(shape))
  np.testing.assert_array_equal(np.asarray(qt.scale), 1.0)   # an empty group: as an all-zero group
  np.testing.assert_array_equal(np.unique(np.asarray(qt.zero_point)), np.unique(np.asarray(ref.zero_point)))
  assert dequantize(qt).shape == shape


# ---------------------------------------------------------------- 4: traced negative BFP align_bits


def test_bfp_quantize_traced_negative_align_bits_is_nan():
  x = jnp.array([1.0, 0.75, 3 * 2.0 ** -12, 0.0, -0.3, 5.0, 2.0 ** -9, 1.5])
  f = jax.jit(lambda w: bfp_quantize(x, BfpConfig("fp16", w, block=4)))
  assert np.all(np.isnan(np.asarray(f(jnp.int32(-1)))))  # was finite, silently over-truncated
  for w in (0, 1, 8, 29, 40):                             # valid (40 clamps): jit = static int, bitwise
    np.testing.assert_array_equal(np.asarray(f(jnp.int32(w))),
                                  np.asarray(bfp_quantize(x, BfpConfig("fp16", min(w, 29), block=4))))


def test_bfp_config_concrete_negative_align_bits_raises():
  with pytest.raises(ValueError, match="align_bits"):
    BfpConfig("fp16", -1)
  with pytest.raises(ValueError, match="align_bits"):
    BfpConfig("fp16", jnp.int32(-2))                     # a concrete array was not checked


# ---------------------------------------------------------------- 5: negative usage in traced placement


def _u():
  return jnp.array([[[2.0], [1.0]], [[-1.0], [1.0]]])    # machine 1 at step 0 uses -1


@pytest.mark.parametrize("jit", [False, True])
def test_par_per_step_negative_usage_is_nan(jit):
  f = jax.jit(sim.par_per_step) if jit else sim.par_per_step
  got = np.asarray(f(_u(), jnp.ones((2, 1))))
  assert np.isnan(got[0, 0])                              # was 4.0 (2 / mean 0.5)
  assert got[1, 0] == 1.0


@pytest.mark.parametrize("aggregate", ["mean", "peak"])
def test_par_objective_negative_usage_nan_under_jit(aggregate):
  f = jax.jit(sim.par_objective, static_argnums=2)
  assert np.isnan(float(f(_u(), jnp.ones((2, 1)), aggregate)))     # was 2.5 / 2.67
  good = jnp.abs(_u())
  assert float(f(good, jnp.ones((2, 1)), aggregate)) == float(sim.par_objective(good, jnp.ones((2, 1)),
                                                                                aggregate))


def test_simulate_under_vmap_negative_usage_scores_nan():
  tr = traces.synthetic_trace(jax.random.PRNGKey(0), n_vms=8, horizon=16, max_life=4)
  cluster, spec = sim.make_cluster(2), sim.Spec(horizon=16)
  bad = tr._replace(usage=tr.usage.at[2, 0, 0].set(-0.3))
  with pytest.raises(ValueError, match="negative usage"):
    sim.simulate(bad, cluster, policies.least_loaded, spec=spec)   # concrete: refused
  batch = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), tr, bad)
  run = jax.vmap(lambda t: sim.simulate(t, cluster, policies.least_loaded, spec=spec))
  obj = np.asarray(run(batch).objective)
  assert np.isnan(obj[1])                                 # was a finite, plausible score
  assert obj[0] == float(sim.simulate(tr, cluster, policies.least_loaded, spec=spec).objective)
