"""Tests of mlsys_jax.sched.dynamic (Nimble: bucketed/symbolic shapes, dynamic control flow)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.sched import dynamic as dyn


def _masked_fn(x, w, length):
  """Per-token projection, masked prefix sum and masked mean pooling: x (b, n, d), w (d, e)."""
  m = dyn.length_mask(length, x.shape[1], x.dtype)[None, :, None]
  h = jnp.tanh(x @ w) * m
  return {"tokens": h, "cumsum": jnp.cumsum(h, axis=1), "pooled": h.sum(1) / length}


def _reference(x, w):
  h = np.tanh(x.astype(np.float64) @ w.astype(np.float64))
  return {"tokens": h, "cumsum": np.cumsum(h, 1), "pooled": h.mean(1)}


def test_bucketed_matches_unpadded_reference_and_counts_compiles():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 5)).astype(np.float32)
  f = dyn.bucketed_jit(_masked_fn, dims={0: 1}, buckets=(4, 8, 16))
  for n in (1, 3, 4, 5, 8, 9, 16, 2):
    x = rng.normal(size=(2, n, 3)).astype(np.float32)
    out, ref = f(x, w), _reference(x, w)
    assert set(out) == set(ref)
    for k in ref:
      assert out[k].shape == ref[k].shape, k
      np.testing.assert_allclose(out[k], ref[k], rtol=2e-5, atol=2e-5, err_msg=k)
  assert f.compile_count == 3 and f.calls == 8
  assert f.out_axes == ((1,), (), (1,))  # dict leaves sorted: cumsum, pooled, tokens
  s = f.stats()
  assert s["compiles"] == 3 and s["padding_overhead"] == pytest.approx((4 + 4 + 4 + 8 + 8 + 16 + 16 + 4)
                                                                       / (1 + 3 + 4 + 5 + 8 + 9 + 16 + 2) - 1)
  by_bucket = s["compile_seconds_by_bucket"]
  assert list(by_bucket) == [4, 8, 16]  # in compilation order: the first calls were 1, 5, 9
  assert sum(by_bucket.values()) == pytest.approx(s["compile_seconds"]) and min(by_bucket.values()) > 0


def test_compile_all_ahead_of_time_then_no_compiles():
  w = jnp.ones((3, 5))
  f = dyn.bucketed_jit(_masked_fn, dims=(1, None), buckets=dyn.pow2_buckets(32, 8))
  assert f.buckets == (8, 16, 32)
  f.compile_all(jax.ShapeDtypeStruct((2, 1, 3), jnp.float32), w)
  assert f.compile_count == 3 and f.compile_seconds > 0
  for n in (5, 17, 32, 9):
    f(np.ones((2, n, 3), np.float32), w)
  assert f.compile_count == 3
  f(np.ones((4, 5, 3), np.float32), w)  # a new batch size is a new program
  assert f.compile_count == 4


def test_parameters_swapped_in_place_are_used_and_shape_changes_are_caught():
  # the wrapper caches the signature of a non-dynamic argument by the container's identity: a leaf
  # swapped in place must still be used, and a leaf of another shape must fail loudly (never run)
  def f(p, x, length):
    return (x * p["w"][:, None]).sum(1) / length
  params = {"w": np.float32(2.0) * np.ones((3,), np.float32)}
  g = dyn.bucketed_jit(f, dims={1: 1}, buckets=(4, 8))
  x = np.arange(15, dtype=np.float32).reshape(3, 5)
  np.testing.assert_allclose(g(params, x), (x * 2.0).sum(1) / 5, rtol=1e-6)
  params["w"] = np.array([1.0, -1.0, 0.5], np.float32)       # same shape, new values
  np.testing.assert_allclose(g(params, x), (x * params["w"][:, None]).sum(1) / 5, rtol=1e-6)
  assert g.compile_count == 1
  params["w"] = np.ones((4,), np.float32)                    # new shape in the same dict
  with pytest.raises((TypeError, ValueError)):
    g(params, x)


def test_overflow_error_and_opt_in_compile():
  f = dyn.bucketed_jit(lambda x, length: x * 2, dims={0: 0}, buckets=(4, 8))
  with pytest.raises(ValueError, match="exceeds the largest bucket 8"):
    f(np.ones(9, np.float32))
  g = dyn.bucketed_jit(lambda x, length: x * 2, dims={0: 0}, buckets=(4, 8), overflow="compile")
  np.testing.assert_array_equal(g(np.ones(9, np.float32)), 2 * np.ones(9))
  g(np.ones(13, np.float32))
  assert g.overflow_compiles == 1 and g.compile_count == 1 and g.buckets == (4, 8, 16)


def test_padding_check_names_the_output_that_depends_on_padding():
  def leaky(x, length):
    m = dyn.length_mask(length, x.shape[0], x.dtype)
    return {"good": (x * m).sum(), "bad": x.sum(), "tokens": x + 1}
  f = dyn.bucketed_jit(leaky, dims={0: 0}, buckets=(8,), check_padding=True)
  with pytest.raises(dyn.PaddingInvarianceError, match=r"output\['bad'\]"):
    f(np.ones(5, np.float32))
  ok = dyn.bucketed_jit(lambda x, length: (x * dyn.length_mask(length, x.shape[0], x.dtype)).sum(),
                        dims={0: 0}, buckets=(8,), check_padding=True)
  assert float(ok(np.ones(5, np.float32))) == 5.0 and ok.padding_checks == 1


@pytest.mark.parametrize("unpad", ["host", "device", "none"])
def test_padding_check_compares_the_valid_slice_for_every_unpad_mode(unpad):
  masked = lambda x, length: x * dyn.length_mask(length, x.shape[0], x.dtype)
  f = dyn.bucketed_jit(masked, {0: 0}, (8,), unpad=unpad, check_padding=True)
  out = np.asarray(f(np.arange(1.0, 4.0, dtype=np.float32)))
  assert out.shape == ((8,) if unpad == "none" else (3,))   # 'none' returns the padded output
  np.testing.assert_array_equal(out[:3], [1.0, 2.0, 3.0])
  assert f.padding_checks == 1
  leaky = dyn.bucketed_jit(lambda x, length: x + x.sum(), {0: 0}, (8,), unpad=unpad, check_padding=True)
  with pytest.raises(dyn.PaddingInvarianceError, match="random values"):
    leaky(np.ones(3, np.float32))


def test_mask_argument_out_dims_and_bad_specs():
  f = dyn.bucketed_jit(lambda x, mask: jnp.where(mask, x, 0.0), dims={0: 0}, buckets=(8,),
                       length_arg=None, mask_arg="mask", unpad="device")
  y = f(np.arange(3, dtype=np.float32))
  assert isinstance(y, jax.Array) and y.tolist() == [0.0, 1.0, 2.0]
  g = dyn.bucketed_jit(lambda x, length: x * 2, dims={0: 0}, buckets=(8,), out_dims=None)
  assert g(np.ones(3, np.float32)).shape == (8,)
  h = dyn.bucketed_jit(lambda x, length: jnp.concatenate([x, x]), dims={0: 0}, buckets=(8,))
  with pytest.raises(ValueError, match="Declare out_dims"):
    h(np.ones(3, np.float32))
  tree = dyn.bucketed_jit(lambda d, length: {"s": d["a"][:, None] * d["b"], "n": length},
                          dims={0: 0}, buckets=(8,))
  out = tree({"a": np.arange(3, dtype=np.float32), "b": np.ones((3, 2), np.float32)})
  assert out["s"].shape == (3, 2) and out["s"][:, 0].tolist() == [0.0, 1.0, 2.0] and int(out["n"]) == 3
  two = dyn.bucketed_jit(lambda a, b, length: a + b, dims={0: 0, 1: 0}, buckets=(8,))
  with pytest.raises(ValueError, match="share one length"):
    two(np.ones(3), np.ones(4))
  with pytest.raises(TypeError, match="positional"):
    two(np.ones(3), b=np.ones(3))
  with pytest.raises(ValueError, match="buckets"):
    dyn.bucketed_jit(lambda x, length: x, dims={0: 0}, buckets=(0, 4))
  with pytest.raises(TypeError, match="buckets must be an integer"):
    dyn.bucketed_jit(lambda x, length: x, dims={0: 0}, buckets=(4.5,))
  with pytest.raises(ValueError, match="unpad"):
    dyn.bucketed_jit(lambda x, length: x, dims={0: 0}, buckets=(4,), unpad="gpu")


def test_donated_buffers_leave_user_arrays_alive():
  f = dyn.bucketed_jit(lambda x, length: x * 3.0, dims={0: 1}, buckets=(4,), donate=True)
  x = jnp.ones((2, 4))
  y = f(x)
  assert not x.is_deleted() and np.allclose(y, 3.0) and np.allclose(x, 1.0)


def _brute_force(lengths, k_max, run, comp, s):
  best = (np.inf, None)
  uniq = sorted(set(lengths))
  for k in range(1, k_max + 1):
    for bs in itertools.combinations(uniq, k):
      if bs[-1] != uniq[-1]:
        continue
      c = dyn.expected_cost(bs, lengths, run_cost=run, compile_cost=comp, stream_length=s)
      best = min(best, (c, bs))
  return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_choose_buckets_dp_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 40, size=30).tolist()
  a, b = rng.uniform(0.1, 1.0), rng.uniform(0.01, 0.1)
  run = lambda n: a + b * n + 0.001 * n * n
  comp, s = float(rng.uniform(0, 20)), int(rng.integers(1, 50))
  plan = dyn.choose_buckets(lengths, num_buckets=4, run_cost=run, compile_cost=comp, stream_length=s)
  cost, bs = _brute_force(lengths, 4, run, comp, s)
  assert plan.total_cost == pytest.approx(cost, rel=1e-9)
  assert dyn.expected_cost(plan.buckets, lengths, run_cost=run, compile_cost=comp,
                           stream_length=s) == pytest.approx(cost, rel=1e-9)
  assert len(plan.costs_by_k) == 4 and min(plan.costs_by_k) == pytest.approx(cost)


def test_choose_buckets_properties():
  lengths = [3, 5, 9, 17, 17, 33]
  full = dyn.choose_buckets(lengths, num_buckets=10)
  assert full.buckets == (3, 5, 9, 17, 33) and full.padding_overhead == 0.0
  one = dyn.choose_buckets(lengths, num_buckets=1)
  assert one.buckets == (33,) and one.run_cost == pytest.approx(33.0)
  # costs never increase with more buckets when compiling is free
  assert all(x >= y - 1e-12 for x, y in zip(full.costs_by_k, full.costs_by_k[1:]))
  # candidates restrict the sizes (multiples of 8 here)
  c8 = dyn.choose_buckets(lengths, num_buckets=3, candidates=range(8, 41, 8))
  assert set(c8.buckets) <= {8, 16, 24, 32, 40} and c8.buckets[-1] == 40
  # a long stream pays for more compiled buckets, a short one does not
  long = dyn.choose_buckets(lengths, num_buckets=5, compile_cost=10.0, stream_length=10_000)
  short = dyn.choose_buckets(lengths, num_buckets=5, compile_cost=100.0, stream_length=1)
  assert len(long.buckets) == 5 and short.buckets == (33,)
  exact = dyn.choose_buckets(lengths, num_buckets=3, compile_cost=10.0, exact_k=True)
  assert len(exact.buckets) == 3
  with pytest.raises(ValueError, match="non-decreasing"):
    dyn.choose_buckets(lengths, num_buckets=2, run_cost=lambda n: 100 - n)
  with pytest.raises(ValueError, match="candidates must include"):
    dyn.choose_buckets(lengths, num_buckets=2, candidates=[8, 16])
  with pytest.raises(ValueError, match="lengths must be >= 1"):
    dyn.choose_buckets([0, 3], num_buckets=2)
  with pytest.raises(ValueError, match="largest bucket"):
    dyn.expected_cost((4,), [5])


# ---------------------------------------------------------------- models: padding invariance
def _np_lstm(v, x, length):
  p = v["params"]
  wx, bx, wh = (np.asarray(p["wx"]["kernel"], np.float64), np.asarray(p["wx"]["bias"], np.float64),
                np.asarray(p["wh"], np.float64))
  sig = lambda z: 1 / (1 + np.exp(-z))
  hd = wh.shape[0]
  outs, finals = np.zeros(x.shape[:2] + (hd,)), np.zeros((x.shape[0], hd))
  for r in range(x.shape[0]):
    h = c = np.zeros(hd)
    for t in range(length[r]):
      i, f, u, o = np.split(x[r, t] @ wx + bx + h @ wh, 4)
      c = sig(f + 1) * c + sig(i) * np.tanh(u)
      h = sig(o) * np.tanh(c)
      outs[r, t] = h
    finals[r] = h
  return outs, finals


def test_masked_lstm_matches_numpy_and_ignores_padding():
  m = dyn.MaskedLSTM(6)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 7, 4)).astype(np.float32)
  v = jax.jit(m.init)(jax.random.PRNGKey(0), x, 7)  # jit: one compile instead of many eager ops
  lengths = np.array([7, 2, 5])
  out, h = jax.jit(m.apply)(v, x, lengths)
  ref_out, ref_h = _np_lstm(v, x.astype(np.float64), lengths)
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  np.testing.assert_allclose(h, ref_h, atol=1e-5)
  # padding the time axis (bucketed_jit path) leaves every output unchanged
  diffs = dyn.check_padding_invariance(lambda x, length: m.apply(v, x, length), x, dims={0: 1},
                                       pad_to=16)
  assert set(diffs) == {"[0]", "[1]"} and max(diffs.values()) < 1e-5


def test_transformer_encoder_padding_invariance_and_leak_is_named():
  m = dyn.TransformerEncoder(num_layers=1, d_model=8, num_heads=2)
  x = np.random.default_rng(2).normal(size=(2, 5, 8)).astype(np.float32)
  v = jax.jit(m.init)(jax.random.PRNGKey(0), x, 5)
  f = lambda x, length: m.apply(v, x, length)
  diffs = dyn.check_padding_invariance(f, x, dims={0: 1}, pad_to=8)
  assert max(diffs.values()) < 1e-5
  leaky = lambda x, length: m.apply(v, x, x.shape[1])  # forgets the mask: attends to the padding
  with pytest.raises(dyn.PaddingInvarianceError, match=r"output\[0\]"):
    dyn.check_padding_invariance(leaky, x, dims={0: 1}, pad_to=8)


# ---------------------------------------------------------------- symbolic export
def test_export_symbolic_one_trace_matches_reference_and_buckets():
  w = np.random.default_rng(3).normal(size=(3, 5)).astype(np.float32)
  sym = dyn.export_symbolic(_masked_fn, np.ones((2, 1, 3), np.float32), w, dims={0: 1})
  assert str(sym.exported.in_avals[1].shape[1]) == "n"
  assert sym.out_axes == ((1,), (), (1,))
  sym_b = dyn.export_symbolic(_masked_fn, np.ones((2, 1, 3), np.float32), w, dims={0: 1}, buckets=(8,))
  rng = np.random.default_rng(3)
  for n in (3, 6, 3):
    x = rng.normal(size=(2, n, 3)).astype(np.float32)
    ref = _reference(x, w)
    for got in (sym(x, w), sym_b(x, w)):
      for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=2e-5, err_msg=k)
  assert sym.compile_count == 2 and sym_b.compile_count == 1 and sym.calls == 3


# ---------------------------------------------------------------- Tree-LSTM
def _random_tree(rng, n):
  return [-1] + [int(rng.integers(0, j)) for j in range(1, n)]


def test_tree_levels_and_encoding_errors():
  assert dyn.tree_levels([-1, 0, 1, 2, 0]).tolist() == [3, 2, 1, 0, 0]
  with pytest.raises(ValueError, match="exactly one root"):
    dyn.tree_levels([-1, -1])
  with pytest.raises(ValueError, match="cycle"):
    dyn.tree_levels([-1, 2, 1])
  with pytest.raises(ValueError, match="smaller than"):
    dyn.encode_trees([[-1, 0, 0]], [np.ones((3, 2))], num_nodes=2)
  with pytest.raises(ValueError, match="features"):
    dyn.encode_trees([[-1, 0]], [np.ones((3, 2))])


def _levels_loop(p):
  """Heights by a per-node walk: preorder from the root, then children before parents."""
  p = [int(q) for q in p]
  children = [[] for _ in p]
  for j, q in enumerate(p):
    if q >= 0:
      children[q].append(j)
  order, stack = [], [p.index(-1)]
  while stack:
    j = stack.pop()
    order.append(j)
    stack.extend(children[j])
  h = np.zeros(len(p), np.int64)
  for j in reversed(order):
    if p[j] >= 0:
      h[p[j]] = max(h[p[j]], h[j] + 1)
  return h


def _encode_trees_loop(parents_list, features, pad="pow2", num_nodes=None, num_levels=None, width=None,
                      num_trees=None):
  """The per-node Python encoding (the library's first version), kept as the reference."""
  heights = [_levels_loop(p) for p in parents_list]
  total = sum(len(p) for p in parents_list)
  levels = max(int(h.max()) for h in heights) + 1
  counts = sum(np.bincount(h, minlength=levels) for h in heights)
  rnd = (lambda n: 1 << max(0, n - 1).bit_length()) if pad == "pow2" else int
  n_pad = num_nodes or rnd(total)
  n_lev, w, n_tr = num_levels or rnd(levels), width or rnd(int(counts.max())), num_trees or rnd(
      len(parents_list))
  x = np.zeros((n_pad + 1, features[0].shape[1]), features[0].dtype)
  parent = np.full(n_pad + 1, n_pad, np.int32)
  level_nodes = np.full((n_lev, w), n_pad, np.int32)
  roots = np.full(n_tr, n_pad, np.int32)
  fill, off = np.zeros(levels, np.int64), 0
  for t, (p, f, h) in enumerate(zip(parents_list, features, heights)):
    p = np.asarray(p)
    x[off:off + len(p)] = f
    parent[off:off + len(p)] = np.where(p >= 0, p + off, n_pad)
    roots[t] = off + int(np.flatnonzero(p == -1)[0])
    for j, lv in enumerate(h):
      level_nodes[lv, fill[lv]] = off + j
      fill[lv] += 1
    off += len(p)
  return x, parent, level_nodes, roots, np.int32(levels)


def _random_relabelled_tree(rng, n):
  """A random tree whose node labels are shuffled (parents may come after their children)."""
  p = _random_tree(rng, n)
  perm = rng.permutation(n)  # new label of old node j is perm[j]
  out = [0] * n
  for j, q in enumerate(p):
    out[perm[j]] = -1 if q < 0 else int(perm[q])
  return out


def test_encode_trees_vectorised_equals_per_node_reference():
  rng = np.random.default_rng(11)
  for trial in range(30):
    count = int(rng.integers(1, 20))
    sizes = rng.integers(1, 60, size=count)
    trees = [(_random_relabelled_tree if trial % 2 else _random_tree)(rng, int(n)) for n in sizes]
    if trial % 3 == 0:  # chains: one level per node
      trees[0] = [-1] + list(range(int(sizes[0]) - 1))
    dtype = np.float64 if trial % 4 == 0 else np.float32
    feats = [rng.normal(size=(len(t), 3)).astype(dtype) for t in trees]
    pad = "exact" if trial % 2 else "pow2"
    forced = {}
    if trial % 5 == 0:
      forced = dict(num_nodes=int(sizes.sum()) + 7, num_trees=count + 2, width=int(sizes.sum()),
                    num_levels=int(sizes.max()) + 1)
    ref = _encode_trees_loop(trees, feats, pad, **forced)
    for parents in (trees, [np.asarray(t, np.int32) for t in trees]):
      got = dyn.encode_trees(parents, feats, pad=pad, **forced)
      for name, a, b in zip(dyn.TreeBatch._fields, got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (trial, name)
        np.testing.assert_array_equal(a, b, err_msg=f"trial {trial}: {name}")
    for t in trees[:3]:
      np.testing.assert_array_equal(dyn.tree_levels(t), _levels_loop(t))
      np.testing.assert_array_equal(dyn.tree_levels(np.asarray(t)), _levels_loop(t))


def test_encode_trees_names_the_bad_tree():
  good = [-1, 0, 0]
  f = lambda *ts: [np.ones((len(t), 2)) for t in ts]
  with pytest.raises(ValueError, match="exactly one root.*tree 1"):
    dyn.encode_trees([good, [-1, -1]], f(good, [0, 0]))
  with pytest.raises(ValueError, match="same tree; tree 1"):
    dyn.encode_trees([good, [-1, 3]], f(good, [0, 0]))  # 3 would be a node of another tree
  with pytest.raises(ValueError, match="cycle.*tree 2"):
    dyn.encode_trees([good, good, [-1, 2, 1]], f(good, good, good))
  with pytest.raises(TypeError, match="integers"):
    dyn.encode_trees([[-1, 0.5]], f([0, 0]))
  with pytest.raises(TypeError, match="integers"):
    dyn.encode_trees([np.array([-1.0, 0.0])], f([0, 0]))
  with pytest.raises(ValueError, match="empty"):
    dyn.encode_trees([good, []], [np.ones((3, 2)), np.ones((0, 2))])
  with pytest.raises(ValueError, match="1-D"):
    dyn.encode_trees([np.array([[-1, 0]])], [np.ones((2, 2))])


def test_tree_lstm_batched_matches_per_tree_recursion_and_ignores_padding():
  rng = np.random.default_rng(4)
  trees = [_random_tree(rng, int(n)) for n in (1, 3, 6, 10)]
  feats = [rng.normal(size=(len(t), 3)).astype(np.float32) for t in trees]
  m = dyn.ChildSumTreeLSTM(4)
  batch = dyn.encode_trees(trees, feats)
  v = jax.jit(m.init)(jax.random.PRNGKey(0), batch)
  root_h, _ = jax.jit(m.apply)(v, batch)
  ref = np.stack([dyn.tree_lstm_recursive(v, t, f) for t, f in zip(trees, feats)])  # eager
  np.testing.assert_allclose(root_h[:len(trees)], ref, atol=1e-5)
  assert np.all(np.asarray(root_h[len(trees):]) == 0)  # padded tree slots
  # another padding and another batch order give the same root states
  order = [3, 0, 2, 1]
  other = dyn.encode_trees([trees[i] for i in order], [feats[i] for i in order], pad="exact",
                           num_nodes=40, width=13, num_levels=16)
  root2, _ = jax.jit(m.apply)(v, other)
  np.testing.assert_allclose(np.asarray(root2)[np.argsort(order)], ref, atol=1e-5)


def test_choose_buckets_from_a_distribution_equals_samples():
  rng = np.random.default_rng(5)
  samples = rng.integers(8, 100, size=200)
  uniq, counts = np.unique(samples, return_counts=True)
  a = dyn.choose_buckets(samples, num_buckets=4, compile_cost=3.0, stream_length=50)
  b = dyn.choose_buckets(uniq, num_buckets=4, weights=counts / counts.sum(), compile_cost=3.0,
                         stream_length=50)
  assert a.buckets == b.buckets and a.total_cost == pytest.approx(b.total_cost)
  assert dyn.bucket_for(a.buckets[0], a.buckets) == a.buckets[0]
  with pytest.raises(ValueError, match="weights must match"):
    dyn.choose_buckets(uniq, num_buckets=2, weights=[1.0])


# ---------------------------------------------------------------- streaming (chunked) entry point
def _params_fn(p, x, length):
  """x (b, n, d); a parameter pytree with float32, int32 and Python-scalar leaves."""
  m = dyn.length_mask(length, x.shape[1], x.dtype)[None, :, None]
  h = jnp.tanh(x @ p["w"] + p["b"]) * m * p["scale"] + p["shift"].astype(x.dtype)
  return {"tokens": h * m, "pooled": (h * m).sum(1) / length}


def _params_reference(p, x):
  h = np.tanh(x.astype(np.float64) @ p["w"].astype(np.float64) + p["b"]) * p["scale"] + float(p["shift"])
  return {"tokens": h, "pooled": h.mean(1)}


def _params(rng, d=3, e=4):
  return {"w": rng.normal(size=(d, e)).astype(np.float32), "b": rng.normal(size=(e,)).astype(np.float32),
          "scale": 0.5, "shift": np.int32(2)}


@pytest.mark.parametrize("pack_static", [True, False])
def test_map_matches_reference_per_call_and_keeps_request_order(pack_static):
  rng = np.random.default_rng(1)
  p = _params(rng)
  f = dyn.bucketed_jit(_params_fn, dims={1: 1}, buckets=(4, 8, 16))
  lengths = [3, 9, 1, 16, 5, 4, 12, 2, 7]
  xs = [rng.normal(size=(2, n, 3)).astype(np.float32) for n in lengths]
  xs[4] = rng.normal(size=(3, 5, 3)).astype(np.float32)  # another batch size: its own group/program
  outs = f.map([(p, x) for x in xs], chunk_size=4, pack_static=pack_static)
  assert len(outs) == len(xs)
  for x, out in zip(xs, outs):
    ref = _params_reference(p, x)
    assert isinstance(out["pooled"], np.ndarray) and out["tokens"].shape == x.shape[:2] + (4,)
    for k in ref:
      np.testing.assert_allclose(out[k], ref[k], rtol=2e-5, atol=2e-5, err_msg=k)
  # exactly the per-call computation (same padded program body): identical to float32 rounding
  g = dyn.bucketed_jit(_params_fn, dims={1: 1}, buckets=(4, 8, 16))
  for x, out in zip(xs, outs):
    per_call = g(p, x)
    for k in out:
      np.testing.assert_allclose(out[k], per_call[k], rtol=1e-6, atol=1e-6)
  # one program per (bucket, dynamic signature), compiled once whatever the number of chunks
  assert f.compile_count == 4 and f.calls == len(xs)
  assert f.stats()["padding_overhead"] == pytest.approx(
      sum(dyn.bucket_for(n, (4, 8, 16)) for n in lengths) / sum(lengths) - 1)
  f.map([(p, x) for x in xs[::-1]], chunk_size=4, pack_static=pack_static)
  assert f.compile_count == 4


def test_stream_is_lazy_repacks_new_parameters_and_compile_all_warms_it():
  rng = np.random.default_rng(2)
  p1, p2 = _params(rng), _params(rng)
  f = dyn.bucketed_jit(_params_fn, dims={1: 1}, buckets=(8,))
  f.compile_all(p1, jax.ShapeDtypeStruct((2, 1, 3), jnp.float32), chunk_size=2)
  assert f.compile_count == 1
  xs = [rng.normal(size=(2, n, 3)).astype(np.float32) for n in (2, 8, 5, 1, 6)]
  seen = []

  def requests(p):
    for x in xs:
      seen.append(x.shape[1])
      yield (p, x)

  it = f.stream(requests(p1), chunk_size=2)
  first = next(it)  # chunk 1 is collected after chunk 2 was dispatched: 4 requests consumed, not 5
  assert len(seen) == 4
  np.testing.assert_allclose(first["pooled"], _params_reference(p1, xs[0])["pooled"], rtol=2e-5,
                             atol=2e-5)
  assert len(list(it)) == 4 and f.compile_count == 1
  out2 = f.map(requests(p2), chunk_size=2)  # new parameter objects: packed again, same program
  np.testing.assert_allclose(out2[3]["pooled"], _params_reference(p2, xs[3])["pooled"], rtol=2e-5,
                             atol=2e-5)
  p2["w"] *= -1.0  # a numpy leaf changed in place: the next map() must see the new values
  out3 = f.map(requests(p2), chunk_size=2)
  np.testing.assert_allclose(out3[3]["pooled"], _params_reference(p2, xs[3])["pooled"], rtol=2e-5,
                             atol=2e-5)
  pj = dict(p2, w=jnp.asarray(p2["w"]), b=jnp.asarray(p2["b"]))  # same layout, jax array leaves
  out4 = f.map(requests(pj), chunk_size=2)
  packs = f._pack_cache[2]
  f.map(requests(pj), chunk_size=2)  # jax arrays: the packed copy is reused
  assert f._pack_cache[2] is packs
  np.testing.assert_allclose(out4[3]["pooled"], out3[3]["pooled"], rtol=1e-6)
  assert f.compile_count == 1


def test_map_steps_per_call_equals_one_request_per_call_and_counts_discarded_rows():
  rng = np.random.default_rng(4)
  p = _params(rng)
  lengths = [3, 9, 1, 16, 5, 4, 12, 2, 7, 8, 15]
  xs = [rng.normal(size=(2, n, 3)).astype(np.float32) for n in lengths]
  one = dyn.bucketed_jit(_params_fn, dims={1: 1}, buckets=(4, 8, 16)).map(
      [(p, x) for x in xs], chunk_size=5)
  f = dyn.bucketed_jit(_params_fn, dims={1: 1}, buckets=(4, 8, 16))
  outs = f.map([(p, x) for x in xs], chunk_size=5, steps_per_call=3)
  for a, b, x in zip(outs, one, xs):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a["pooled"], _params_reference(p, x)["pooled"], rtol=2e-5, atol=2e-5)
  # chunks of 5 requests, group sizes per bucket: {4: 2, 16: 2, 8: 1}, {4: 2, 16: 1, 8: 2}, {16: 1};
  # each group's calls run 3 rows: a group of k computes -k % 3 discarded rows
  groups = [2, 2, 1, 2, 1, 2, 1]
  assert f.stats()["stream_dummy_requests"] == sum(-k % 3 for k in groups)
  assert f.calls == len(xs) and f.compile_count == 3
  with pytest.raises(ValueError, match="steps_per_call"):
    f.map([(p, xs[0])], steps_per_call=0)


def test_map_bad_input_errors():
  rng = np.random.default_rng(3)
  p = _params(rng)
  x = lambda n: np.ones((2, n, 3), np.float32)
  f = dyn.bucketed_jit(_params_fn, dims={1: 1}, buckets=(4, 8))
  with pytest.raises(TypeError, match="tuple of the positional arguments"):
    f.map([x(3)])
  with pytest.raises(TypeError, match="request 1 is a"):
    f.map([(p, x(3)), x(3)])
  with pytest.raises(ValueError, match="argument 0 of request 2 is not the same object"):
    f.map([(p, x(3)), (p, x(4)), (dict(p), x(5))])
  with pytest.raises(ValueError, match="request 1 has 1 arguments"):
    f.map([(p, x(3)), (x(3),)])
  with pytest.raises(ValueError, match="dims names argument 1 but the call has 1"):
    f.map([(x(3),)])
  calls = f.calls
  with pytest.raises(ValueError, match="length 9 exceeds the largest bucket 8"):
    f.map([(p, x(3)), (p, x(9))])
  assert f.calls == calls  # the chunk is validated before any of it runs
  with pytest.raises(ValueError, match="request 0: .*share one length"):
    dyn.bucketed_jit(lambda a, b, length: a + b, dims={0: 0, 1: 0}, buckets=(8,)).map(
        [(np.ones(3), np.ones(4))])
  with pytest.raises(ValueError, match="chunk_size"):
    f.map([(p, x(3))], chunk_size=0)
  with pytest.raises(ValueError, match="check_padding"):
    dyn.bucketed_jit(_params_fn, dims={1: 1}, buckets=(8,), check_padding=True).map([(p, x(3))])
  g = dyn.bucketed_jit(_params_fn, dims={1: 1}, buckets=(4, 8), overflow="compile")
  out = g.map([(p, x(3)), (p, x(11))], chunk_size=8)
  assert out[1]["tokens"].shape == (2, 11, 4) and g.overflow_compiles == 1 and g.buckets == (4, 8, 16)
  padded = dyn.bucketed_jit(_params_fn, dims={1: 1}, buckets=(8,), unpad="none").map([(p, x(3))])
  assert padded[0]["tokens"].shape == (2, 8, 4)
