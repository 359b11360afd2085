"""Tests of mlsys_jax.robust.byzshield: constructions, worst-case search, vote, aggregators, attacks."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax._compat import shard_map
from mlsys_jax.robust import byzshield as bz


@pytest.mark.parametrize("a,k,f,l,r", [
    (bz.mols_assignment(5, 3), 15, 25, 5, 3),
    (bz.mols_assignment(7, 5), 35, 49, 7, 5),
    (bz.ramanujan_assignment(5, 3), 15, 25, 5, 3),
    (bz.ramanujan_assignment(5, 5), 25, 25, 5, 5),
    (bz.ramanujan_assignment(3, 6), 9, 18, 6, 3),
    (bz.detox_assignment(15, 3), 15, 5, 1, 3),
    (bz.baseline_assignment(8), 8, 8, 1, 1),
])
def test_assignment_parameters(a, k, f, l, r):
  assert a.matrix.shape == (k, f) and a.load == l and a.replication == r
  assert (a.matrix.sum(1) == l).all() and (a.matrix.sum(0) == r).all()
  # worker_files / file_workers are consistent with the matrix
  for w in range(k):
    assert set(a.worker_files[w]) == set(np.flatnonzero(a.matrix[w]))
  for j in range(f):
    for w, s in a.file_workers[j]:
      assert a.worker_files[w, s] == j


def test_mols_workers_share_at_most_one_file():
  a = bz.mols_assignment(7, 3)
  overlap = a.matrix.astype(int) @ a.matrix.T.astype(int)
  np.fill_diagonal(overlap, 0)
  assert overlap.max() == 1
  # workers of different squares share exactly one file, of the same square none
  cls = np.arange(a.num_workers) // 7
  same = cls[:, None] == cls[None, :]
  assert (overlap[~same] == 1).all() and (overlap[same] == 0).all()


def test_bad_parameters():
  with pytest.raises(ValueError, match="prime"):
    bz.mols_assignment(6, 3)
  with pytest.raises(ValueError, match="orthogonal Latin squares"):
    bz.mols_assignment(5, 5)
  with pytest.raises(ValueError, match="s \\| m"):
    bz.ramanujan_assignment(5, 7)
  with pytest.raises(ValueError, match="r \\| K"):
    bz.detox_assignment(10, 3)
  with pytest.raises(ValueError, match="fewer than K"):
    bz.worst_case_distortion(bz.mols_assignment(5, 3), 15)
  with pytest.raises(ValueError, match="kind"):
    bz.byzshield_assignment("latin")


def _brute_cmax(a, q):
  best = 0
  for sub in itertools.combinations(range(a.num_workers), q):
    m = np.zeros(a.num_workers, int)
    m[list(sub)] = 1
    best = max(best, int(bz.distorted_files(a, m).sum()))
  return best


@pytest.mark.parametrize("q", [1, 2, 3, 4, 5])
def test_worst_case_exact_matches_brute_force_and_heuristic_bounds(q):
  a = bz.mols_assignment(5, 3)
  cmax, workers = bz.worst_case_distortion(a, q)
  assert cmax == _brute_cmax(a, q)
  m = np.zeros(15, int)
  m[workers] = 1
  assert int(bz.distorted_files(a, m).sum()) == cmax  # the returned set achieves it
  heur, _ = bz.worst_case_distortion(a, q, exact=False, restarts=16)
  assert heur <= cmax and heur >= cmax - 1
  assert cmax <= bz.spectral_bound(a, q) + 1e-9


def test_epsilon_table_byzshield_below_detox():
  # K = 15 (MOLS l=5, r=3, f=25) against DETOX (K=15, r=3, f=5): the ByzShield paper's first setting.
  mols, detox = bz.mols_assignment(5, 3), bz.detox_assignment(15, 3)
  eps_m = [bz.worst_case_distortion(mols, q)[0] / 25 for q in range(2, 8)]
  eps_d = [bz.worst_case_distortion(detox, q)[0] / 5 for q in range(2, 8)]
  np.testing.assert_allclose(eps_m, [0.04, 0.12, 0.20, 0.32, 0.48, 0.56])
  np.testing.assert_allclose(eps_d, [0.2, 0.2, 0.4, 0.4, 0.6, 0.6])  # floor(q / r') / f
  assert all(m < d for m, d in zip(eps_m, eps_d))


def _stack(a, d=6, seed=0):
  fg = jax.random.normal(jax.random.PRNGKey(seed), (a.num_files, d))
  return fg, bz.files_to_workers({"g": fg}, a)


def test_majority_vote_recovers_honest_files_and_loses_distorted_ones():
  a = bz.mols_assignment(5, 3)
  fg, workers = _stack(a)
  byz = np.zeros(15, bool)
  byz[[0, 5]] = True  # two workers of different squares share one file: it is distorted
  dist = bz.distorted_files(a, byz)
  assert dist.sum() == 1
  for attack in ("constant", "nan", "reversed"):
    attacked = bz.apply_attack(workers, jnp.asarray(byz), attack)
    voted = jax.jit(functools.partial(bz.majority_vote, assignment=a))(attacked)["g"]
    np.testing.assert_array_equal(np.asarray(voted)[~dist], np.asarray(fg)[~dist])
    assert not np.array_equal(np.asarray(voted)[dist], np.asarray(fg)[dist], equal_nan=True)


def test_vote_rejects_wrong_stack():
  a = bz.mols_assignment(5, 3)
  with pytest.raises(ValueError, match="\\(K, l, ...\\)"):
    bz.majority_vote({"g": jnp.zeros((14, 5, 3))}, a)


def _np_krum(x, b, m):
  n = len(x)
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  scores = []
  for i in range(n):
    others = np.sort(np.delete(d[i], i))[:n - b - 2]
    scores.append(others.sum())
  sel = np.argsort(scores)[:m]
  return x[sel].mean(0)


def test_aggregators_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(11, 7)).astype(np.float32)
  t = {"a": jnp.asarray(x)}
  np.testing.assert_allclose(bz.coordinate_median(t)["a"], np.median(x, 0), rtol=1e-6)
  s = np.sort(x, 0)
  np.testing.assert_allclose(bz.trimmed_mean(t, 2)["a"], s[2:9].mean(0), rtol=1e-5)
  np.testing.assert_allclose(bz.multi_krum(t, 2)["a"], _np_krum(x.astype(np.float64), 2, 9), rtol=1e-4)
  np.testing.assert_allclose(bz.multi_krum(t, 2, 1)["a"], _np_krum(x.astype(np.float64), 2, 1), rtol=1e-4)
  np.testing.assert_array_equal(bz.sign_majority(t)["a"], np.sign(np.sign(x).sum(0)))
  np.testing.assert_allclose(bz.mean(t)["a"], x.mean(0), rtol=1e-6)
  out = bz.bulyan(t, 2)["a"]
  assert out.shape == (7,) and np.all(np.abs(np.asarray(out) - np.median(x, 0)) < 1.5)
  with pytest.raises(ValueError, match="4b \\+ 3"):
    bz.bulyan(t, 3)


def test_aggregators_survive_attackers_with_nan_and_huge_values():
  rng = np.random.default_rng(1)
  honest = rng.normal(size=(9, 5)).astype(np.float32) * 0.1 + 1.0
  bad = np.stack([np.full(5, np.nan), np.full(5, np.inf), np.full(5, -1e30)]).astype(np.float32)
  t = {"a": jnp.asarray(np.concatenate([honest, bad]))}
  for fn in (bz.coordinate_median, lambda g: bz.trimmed_mean(g, 3), lambda g: bz.multi_krum(g, 3),
             lambda g: bz.bulyan(g, 2)):
    out = np.asarray(jax.jit(fn)(t)["a"])
    assert np.all(np.isfinite(out)) and np.all(np.abs(out - 1.0) < 0.5), out
  assert not np.all(np.isfinite(np.asarray(bz.mean(t)["a"])))  # the mean is not robust


def test_vmap_over_problems():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 9, 3))
  out = jax.vmap(lambda g: bz.multi_krum({"a": g}, 2)["a"])(x)
  ref = jnp.stack([bz.multi_krum({"a": g}, 2)["a"] for g in x])
  np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_coordinate_sharded_vote_and_krum_under_shard_map(devices):
  a = bz.mols_assignment(5, 3)
  fg = jax.random.normal(jax.random.PRNGKey(3), (25, 64))
  workers = bz.files_to_workers({"g": fg}, a)
  byz = jnp.zeros(15, bool).at[jnp.array([0, 5, 10])].set(True)
  attacked = bz.apply_attack(workers, byz, "alie")
  mesh = Mesh(np.array(devices), ("d",))

  def local(w):
    voted = bz.majority_vote(w, a, axis_name="d")
    return bz.multi_krum(voted, 3, axis_name="d")

  sharded = shard_map(local, mesh=mesh, in_specs=({"g": P(None, None, "d")},),
                      out_specs={"g": P("d")}, check_vma=False)
  got = jax.jit(sharded)(attacked)["g"]
  ref = bz.multi_krum(bz.majority_vote(attacked, a), 3)["g"]
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_robust_step_alie_end_to_end():
  a = bz.mols_assignment(5, 3)
  fg = {"w": jax.random.normal(jax.random.PRNGKey(0), (25, 10)) + 2.0}
  byz = jnp.zeros(15, bool).at[jnp.array([0, 5])].set(True)
  step = jax.jit(functools.partial(bz.robust_step, assignment=a, attack="alie", aggregator="median"))
  out = step(fg, byzantine=byz)
  assert out["w"].shape == (10,) and np.all(np.isfinite(np.asarray(out["w"])))
  clean = bz.coordinate_median(fg)["w"]
  assert float(jnp.abs(out["w"] - clean).max()) < 0.5
  with pytest.raises(ValueError, match="key"):
    bz.robust_step(fg, a, byz, attack="random", aggregator="mean")


# ----------------------------------------------------------------------------------------------------
# Issue 17: honest copies that are not bit-identical, even replication, bad masks, Bulyan reference.


def _perturbed_copies(a, fg, seed=0, ulps=3):
  """Honest worker stacks whose copies of a file differ by a few ulps (nondeterministic reductions)."""
  w = bz.files_to_workers({"g": fg}, a)["g"]
  steps = np.random.default_rng(seed).integers(-ulps, ulps + 1, size=w.shape)
  out = np.asarray(w).copy()
  for _ in range(ulps):
    out = np.where(steps > 0, np.nextafter(out, np.inf), np.where(steps < 0, np.nextafter(out, -np.inf), out))
    steps = steps - np.sign(steps)
  return {"g": jnp.asarray(out)}


def test_vote_with_perturbed_honest_copies_follows_distorted_files():
  a = bz.mols_assignment(5, 3)
  fg = jax.random.normal(jax.random.PRNGKey(1), (25, 8))
  workers = _perturbed_copies(a, fg)
  assert not np.array_equal(workers["g"][0], bz.files_to_workers({"g": fg}, a)["g"][0])
  byz = np.zeros((4, 15), bool)  # four Byzantine sets: one worker (first / middle copy), 2 and 3 workers
  for row, ws in enumerate([[0], [3], [0, 5], [2, 7, 11]]):
    byz[row, ws] = True
  dist = bz.distorted_files(a, byz)
  assert dist[:2].sum() == 0 and dist[2:].sum() > 0
  attacked = jax.vmap(lambda m: bz.apply_attack(workers, m, "constant"))(jnp.asarray(byz))
  for kw in ({"rtol": 1e-5}, {}):  # with a tolerance, and exact bits + median fallback (atol: below)
    vote = jax.jit(jax.vmap(functools.partial(bz.majority_vote, assignment=a, return_no_majority=True, **kw)))
    voted, no_major = vote(attacked)
    lost = np.abs(np.asarray(voted["g"]) - np.asarray(fg)).max(-1) > 1e-4
    np.testing.assert_array_equal(lost, dist)  # exactly the files distorted_files predicts
    if kw:
      assert not np.any(no_major)
    else:  # exact comparison: honest copies never agree; the vote counts it and falls back
      assert np.all(np.asarray(no_major)[~dist])


def test_vote_tolerance_bounds_and_old_first_copy_behaviour():
  a = bz.mols_assignment(5, 3)
  fg = jax.random.normal(jax.random.PRNGKey(2), (25, 4))
  workers = _perturbed_copies(a, fg)
  byz = jnp.zeros(15, bool).at[0].set(True)  # worker 0 is the first copy of each of its files
  attacked = bz.apply_attack(workers, byz, "constant")
  # fallback='first' is the old rule: the first copy wins when no copy has a majority.
  old = jax.jit(functools.partial(bz.majority_vote, assignment=a, fallback="first"))(attacked)["g"]
  mine = np.asarray(a.worker_files[0])
  assert np.all(np.asarray(old)[mine] == -100.0)
  # A tolerance too small to cover the perturbation cannot merge honest copies: every file falls back.
  _, nm = jax.jit(functools.partial(bz.majority_vote, assignment=a, rtol=1e-12, return_no_majority=True))(attacked)
  assert np.all(nm)
  with pytest.raises(ValueError, match="rtol"):
    bz.majority_vote(attacked, a, rtol=-1.0)
  with pytest.raises(ValueError, match="fallback"):
    bz.majority_vote(attacked, a, fallback="last")


def test_even_replication_warns_and_ties_do_not_follow_worker_order():
  with pytest.warns(UserWarning, match="even replication"):
    a = bz.mols_assignment(5, 2)
  fg = jax.random.normal(jax.random.PRNGKey(3), (25, 4))
  workers = bz.files_to_workers({"g": fg}, a)
  byz = np.zeros(10, bool)
  byz[0] = True
  dist = bz.distorted_files(a, byz)
  assert dist.sum() == 5  # r' = r / 2 = 1: a tie counts as lost
  voted = jax.jit(functools.partial(bz.majority_vote, assignment=a))(
      bz.apply_attack(workers, jnp.asarray(byz), "constant"))["g"]
  # a 1-1 tie: the median of the two copies, not whichever worker comes first
  np.testing.assert_allclose(np.asarray(voted)[dist], (np.asarray(fg)[dist] - 100.0) / 2, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(voted)[~dist], np.asarray(fg)[~dist])


def test_robust_step_rejects_wrong_mask_length():
  a = bz.mols_assignment(5, 3)
  fg = {"w": jnp.ones((25, 3))}
  with pytest.raises(ValueError, match="byzantine.*\\(15,\\)"):
    bz.robust_step(fg, a, jnp.zeros(14, bool), attack="constant", aggregator="mean")
  with pytest.raises(ValueError, match="byzantine.*\\(15,\\)"):
    bz.apply_attack(bz.files_to_workers(fg, a), jnp.zeros((15, 2), bool), "constant")
  with pytest.raises(ValueError, match="file_grads.*25"):
    bz.robust_step({"w": jnp.ones((24, 3))}, a, jnp.zeros(15, bool), attack="constant", aggregator="mean")


def _np_bulyan(x, b):
  """float64 Bulyan (El Mhamdi, Guerraoui and Rouault, ICML 2018, Algorithm 1): theta = n - 2b rounds of
  Krum on the remaining set (score: distances to the rem - b - 2 nearest others, at least 1), then per
  coordinate the mean of the beta = theta - 2b selected values closest to their median."""
  n = len(x)
  rem = list(range(n))
  sel = []
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  for _ in range(n - 2 * b):
    m = max(len(rem) - b - 2, 1)
    scores = [np.sort([d[i, j] for j in rem if j != i])[:m].sum() for i in rem]
    best = rem[int(np.argmin(scores))]
    sel.append(best)
    rem.remove(best)
  s = x[sel]
  beta = len(sel) - 2 * b
  med = np.median(s, 0)
  idx = np.argsort(np.abs(s - med), axis=0, kind="stable")[:beta]
  return np.take_along_axis(s, idx, 0).mean(0), sel


@pytest.mark.parametrize("n,b", [(11, 2), (7, 1)])
def test_bulyan_matches_numpy_reference(n, b):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, 5)) * rng.uniform(0.5, 3.0, size=(n, 1))  # spread so Krum's choice matters
  x[:b] += 40.0 * np.arange(1, b + 1)[:, None]                        # b scattered outliers
  ref, sel = _np_bulyan(x, b)
  assert not set(range(b)) & set(sel)                                 # the outliers are not selected
  got = np.asarray(jax.jit(bz.bulyan, static_argnums=1)({"a": jnp.asarray(x, jnp.float32)}, b)["a"])
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # and differs from the trivial answers a weak test would accept
  for trivial in (x.mean(0), x[0], np.zeros(5), np.median(x, 0)):
    assert np.abs(got - trivial).max() > 1e-3


class VoteVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_tolerant_vote_and_step_same_with_and_without_jit(self):
    a = bz.mols_assignment(5, 3)
    fg = jax.random.normal(jax.random.PRNGKey(4), (25, 3))
    workers = _perturbed_copies(a, fg, seed=1)
    byz = jnp.zeros(15, bool).at[jnp.array([1, 6])].set(True)     # workers 1, 6 share one file
    dist = bz.distorted_files(a, np.asarray(byz))
    voted = self.variant(lambda w: bz.majority_vote(bz.apply_attack(w, byz, "reversed"), a, atol=1e-5))(workers)
    chex.assert_trees_all_close(voted["g"][~dist], fg[~dist], rtol=1e-5)
    assert not np.allclose(voted["g"][dist], fg[dist])
