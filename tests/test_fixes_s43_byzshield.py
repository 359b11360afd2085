"""Regression tests for the s43 review of mlsys_jax/robust/byzshield.py (each failed before its fix)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.robust import byzshield as bz


def _np_krum_scores(x, b):
  x = np.asarray(x, np.float64)
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  return np.sort(d, 1)[:, :x.shape[0] - b - 2].sum(1)


def _offset_gradients():
  # Honest gradients share a large common component (3000) and differ by ~1e-3; the two Byzantine ones are
  # 0.3 away per coordinate. |x|^2 ~ 6e8 in float32 rounds the Gram-matrix distances away unless centred.
  rng = np.random.default_rng(0)
  n, b, d = 9, 2, 64
  hon = 3000.0 + 1e-3 * rng.standard_normal((n - b, d))
  byz = 3000.3 + 1e-3 * rng.standard_normal((b, d))
  return np.concatenate([byz, hon]).astype(np.float32), b


def test_krum_distances_survive_a_large_common_offset():
  g, b = _offset_gradients()
  n = g.shape[0]
  scores = _np_krum_scores(g, b)
  for m in (1, n - b):
    sel = np.argsort(scores)[:m]
    assert sorted(sel.tolist()) == list(range(b, b + m)) or m == 1   # numpy never picks a Byzantine row
    ref = g[sel].astype(np.float64).mean(0)
    out = np.asarray(bz.multi_krum(jnp.asarray(g), b, num_selected=m), np.float64)
    # the Byzantine rows are 0.3 off; float32 rounding of values near 3000 is ~2.4e-4
    np.testing.assert_allclose(out, ref, atol=2e-3)
  jitted = jax.jit(bz.multi_krum, static_argnums=1)(jnp.asarray(g), b)
  assert float(jnp.max(jnp.abs(jitted - 3000.0))) < 0.05


def test_krum_distances_with_offset_under_shard_map(devices):
  from jax.sharding import Mesh, PartitionSpec as P

  from mlsys_jax._compat import shard_map
  g, b = _offset_gradients()
  mesh = Mesh(np.array(devices[:4]), ("c",))
  fn = shard_map(lambda x: bz.multi_krum(x, b, axis_name="c"), mesh=mesh, in_specs=P(None, "c"),
                 out_specs=P("c"))
  out = np.asarray(jax.jit(fn)(jnp.asarray(g)), np.float64)
  sel = np.argsort(_np_krum_scores(g, b))[:g.shape[0] - b]
  np.testing.assert_allclose(out, g[sel].astype(np.float64).mean(0), atol=2e-3)


def _enable_x64():
  ctx = getattr(jax, "enable_x64", None)
  if ctx is None:
    from jax.experimental import enable_x64 as ctx
  return ctx(True)


def test_tolerant_vote_on_float64_does_not_round_to_float32():
  a = bz.detox_assignment(3, 3)
  with _enable_x64():
    # three honest float64 copies, pairwise 2e-8 and 4e-8 apart: none agree within atol=1e-9 (float32
    # rounds all three to 1.0 and made them agree, so copy 0 won with a "majority").
    copies = jnp.array([[[1.0]], [[1.0 + 2e-8]], [[1.0 + 4e-8]]], jnp.float64)
    voted, no_major = bz.majority_vote(copies, a, atol=1e-9, return_no_majority=True)
    assert voted.dtype == jnp.float64
    assert bool(no_major[0])
    assert float(voted[0, 0]) == 1.0 + 2e-8                  # the median of the copies
    # and copies within the tolerance still agree
    close = jnp.array([[[1.0]], [[1.0 + 2e-8]], [[1.0 + 9e-8]]], jnp.float64)
    voted, no_major = bz.majority_vote(close, a, atol=3e-8, return_no_majority=True)
    assert not bool(no_major[0]) and float(voted[0, 0]) == 1.0


@pytest.mark.parametrize("l,r,q", [(5, 4, 4), (5, 4, 5), (7, 4, 4)])
def test_spectral_bound_is_an_upper_bound_under_even_replication(l, r, q):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    a = bz.mols_assignment(l, r)
  cmax, _ = bz.worst_case_distortion(a, q, exact=True)
  # brute-force reference: ties (r/2 Byzantine copies) are lost, as distorted_files counts them
  assert cmax <= bz.spectral_bound(a, q) + 1e-9
  # odd r keeps the paper's (r - 1) / 2 divisor
  assert bz.spectral_bound(bz.mols_assignment(5, 3), 3) == pytest.approx(4.2857, abs=1e-4)


def test_spectral_bound_rejects_q_out_of_range():
  a = bz.mols_assignment(5, 3)
  with pytest.raises(ValueError, match="q"):
    bz.spectral_bound(a, 16)
  with pytest.raises(ValueError, match="q"):
    bz.spectral_bound(a, -1)
  assert bz.spectral_bound(a, 0) == 0.0


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_tolerant_vote_is_not_won_by_one_infinite_copy(bad):
  # rtol * max(|inf|, |x|) = inf made an inf copy "agree" with every honest copy; the first worker won.
  a = bz.detox_assignment(3, 3)
  w = jnp.array([[[bad, 1.0]], [[1.0, 1.0]], [[1.0, 1.0]]], jnp.float32)      # worker 0 Byzantine
  voted, no_major = bz.majority_vote(w, a, rtol=1e-5, return_no_majority=True)
  np.testing.assert_array_equal(np.asarray(voted), [[1.0, 1.0]])
  assert not bool(no_major[0])
  # reference: distorted_files says one Byzantine worker of MOLS(5, 3) distorts nothing
  m = bz.mols_assignment(5, 3)
  byz = np.zeros(15, bool)
  byz[0] = True
  assert not bz.distorted_files(m, byz).any()
  g = jax.random.normal(jax.random.PRNGKey(0), (25, 3))
  workers = bz.files_to_workers(g, m).at[0].set(bad)
  vote = lambda w: bz.majority_vote(w, m, rtol=1e-6, atol=1e-7)
  for fn in (vote, jax.jit(vote)):
    voted = fn(workers)
    np.testing.assert_array_equal(np.asarray(voted), np.asarray(g))
  # two colluding inf copies still win the file they share (that file is distorted)
  both = bz.files_to_workers(g, m).at[jnp.array([0, 5])].set(bad)
  lost = np.flatnonzero(~np.isfinite(np.asarray(bz.majority_vote(both, m, rtol=1e-6))).all(1))
  byz[5] = True
  np.testing.assert_array_equal(lost, np.flatnonzero(bz.distorted_files(m, byz)))


def test_krum_keeps_float64_distances():
  # float64 gradients were cast to float32 before the distances: a Byzantine row 5e-8 away from honest rows
  # that differ by 1e-10 became indistinguishable and Krum picked it (worker order).
  rng = np.random.default_rng(0)
  n, b, d = 7, 1, 16
  with _enable_x64():
    hon = 1.0 + 1e-10 * rng.standard_normal((n - b, d))
    byz = 1.0 + 5e-8 + 1e-10 * rng.standard_normal((b, d))
    g = np.concatenate([byz, hon])
    pick = int(np.argmin(_np_krum_scores(g, b)))
    assert pick >= b
    out = np.asarray(bz.multi_krum(jnp.asarray(g, jnp.float64), b, num_selected=1))
    np.testing.assert_allclose(out, g[pick], rtol=0, atol=1e-12)
