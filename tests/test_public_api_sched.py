"""Direct tests of public sched functions that had none (session 21): IOS emission helpers
(mlsys_jax.sched.emit), graph analysis (graph), cost-model helpers (cost), Nimble's length distribution and
Tree-LSTM (dynamic), FirePlace policies, DAgger rollouts and training (placement). Each function is checked
against an independent reference (numpy / float64 / hand-computed numbers / the documented formula) or a
property a wrong implementation breaks, plus its errors on bad input."""

from __future__ import annotations

import collections
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mlsys_jax.sched import cost as C
from mlsys_jax.sched import dynamic as dyn
from mlsys_jax.sched import emit
from mlsys_jax.sched import graph as G
from mlsys_jax.sched import placement as P
from mlsys_jax.sched.dp import Stage
from mlsys_jax.sched.placement import hindsight as H

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride=(1, 1), padding="SAME", groups=1):
  return lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=_DN, feature_group_count=groups)


def _np_conv(x, w, pad):
  """float64 NHWC x HWIO conv, stride 1, explicit padding ((lo, hi), (lo, hi))."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pad[0], pad[1], (0, 0)))
  w = np.asarray(w, np.float64)
  kh, kw = w.shape[:2]
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("nhwc,co->nhwo", x[:, i:i + ho, j:j + wo], w[i, j])
  return out


_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(1, 6, 6, 3)).astype(np.float32)
W1 = _RNG.normal(size=(1, 1, 3, 4)).astype(np.float32)
W2 = _RNG.normal(size=(3, 3, 3, 5)).astype(np.float32)
B1 = _RNG.normal(size=(4,)).astype(np.float32)
B2 = _RNG.normal(size=(5,)).astype(np.float32)


def _f_epi(x):
  """Two mergeable convs with the same epilogue structure (bias + relu), summed channel-wise via concat."""
  return jnp.concatenate([jax.nn.relu(_conv(x, W1) + B1), jax.nn.relu(_conv(x, W2) + B2)], axis=-1)


def _ref_epi(x):
  a = np.maximum(_np_conv(x, W1, ((0, 0), (0, 0))) + B1, 0)
  b = np.maximum(_np_conv(x, W2, ((1, 1), (1, 1))) + B2, 0)
  return np.concatenate([a, b], -1)


@functools.lru_cache(None)
def _g_epi():
  return G.build_graph(_f_epi, X)


@functools.lru_cache(None)
def _g_plain():
  """Two convs without epilogues, plus a stride-2 conv that cannot merge with them."""
  return G.build_graph(lambda x: (_conv(x, W1), _conv(x, W2), _conv(x, W2, stride=(2, 2))), X)


def _conv_units(g):
  return [u.idx for u in g.units if u.kind == "conv_general_dilated"]


# ------------------------------------------------------------------------------------------ emit
def test_merged_conv_params_zero_pads_centred_and_concatenates():
  g = _g_epi()
  u1, u2 = _conv_units(g)
  kernel, params, ranges = emit.merged_conv_params(g, (u1, u2))
  want = np.concatenate([np.pad(W1, ((1, 1), (1, 1), (0, 0), (0, 0))), W2], axis=3)  # 1x1 centred in 3x3
  np.testing.assert_array_equal(np.asarray(kernel), want)
  assert ranges == [(0, 4), (4, 9)]
  assert tuple(map(tuple, params["padding"])) == ((1, 1), (1, 1))   # the largest kernel's padding
  # the merged conv's channel slices are the separate convs (float64 reference)
  y = np.asarray(lax.conv_general_dilated_p.bind(jnp.asarray(X), kernel, **params), np.float64)
  np.testing.assert_allclose(y[..., 0:4], _np_conv(X, W1, ((0, 0), (0, 0))), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y[..., 4:9], _np_conv(X, W2, ((1, 1), (1, 1))), rtol=1e-5, atol=1e-5)


def test_merged_conv_params_and_merge_entry_reject_units_that_cannot_merge():
  g = _g_plain()
  a, b, strided = _conv_units(g)
  for fn in (emit.merged_conv_params, emit.merge_entry):
    with pytest.raises(ValueError, match="cannot be merged"):
      fn(g, (a, strided))                         # stride 2 vs 1
    with pytest.raises(TypeError, match="non-empty tuple"):
      fn(g, ())
    with pytest.raises(ValueError, match="not a unit"):
      fn(g, (a, 99))
  gd = G.build_graph(lambda x: jnp.tanh(x @ jnp.ones((4, 4))) + x @ jnp.ones((4, 4)), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="not mergeable convolutions"):
    emit.merged_conv_params(gd, (0, 1))


def test_epilogue_chain_steps_reproduce_each_units_output():
  g = _g_epi()
  for ui, w, b, pad in zip(_conv_units(g), (W1, W2), (B1, B2), (((0, 0), (0, 0)), ((1, 1), (1, 1)))):
    steps = emit.epilogue_chain(g, ui)
    assert [(p.name, pos) for p, _, pos, _ in steps] == [("add", 0), ("max", 0)]
    np.testing.assert_array_equal(steps[0][3], b)            # the bias, per output channel
    assert isinstance(steps[1][3], G.Lit) and float(steps[1][3].val) == 0.0   # relu's 0
    y = _np_conv(X, w, pad)
    for prim, _, _, op in steps:                              # apply the documented steps in numpy
      other = np.asarray(op.val if isinstance(op, G.Lit) else op, np.float64)
      y = {"add": np.add, "max": np.maximum}[prim.name](y, other)
    np.testing.assert_allclose(y, np.maximum(_np_conv(X, w, pad) + b, 0), rtol=1e-6)
  gp = _g_plain()
  assert emit.epilogue_chain(gp, _conv_units(gp)[0]) == []     # no epilogue
  spatial = _RNG.normal(size=(1, 6, 6, 1)).astype(np.float32)  # varies along H, W: not per channel
  gs = G.build_graph(lambda x: _conv(x, W1) * spatial, X)
  assert emit.epilogue_chain(gs, _conv_units(gs)[0]) is None


def test_epilogue_chain_rejects_non_conv_units():
  gd = G.build_graph(lambda x: jnp.tanh(x @ jnp.ones((4, 4))), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="convolution units only"):
    emit.epilogue_chain(gd, 0)
  with pytest.raises(ValueError, match="not a unit"):
    emit.epilogue_chain(gd, 5)
  with pytest.raises(TypeError, match="integer unit index"):
    emit.epilogue_chain(gd, "0")
  with pytest.raises(TypeError, match="must be a Graph"):
    emit.epilogue_chain(None, 0)


def test_const_value_of_literal_constant_and_lazy_values():
  w = _RNG.normal(size=(4, 4)).astype(np.float32)
  g = G.build_graph(lambda x: x @ w + x @ jnp.full((4, 4), 2.0) + 1.5, jnp.ones((1, 4)))
  (cid,) = [c for c in g.consts if np.shape(g.consts[c]) == (4, 4)]
  np.testing.assert_array_equal(np.asarray(emit.const_value(g, cid)), w)
  (lid,) = list(g.lazy)                                          # jnp.full, re-emitted by its consumer
  np.testing.assert_array_equal(np.asarray(emit.const_value(g, lid)), np.full((4, 4), 2.0, np.float32))
  assert float(emit.const_value(g, G.Lit(1.5))) == 1.5
  with pytest.raises(KeyError, match="computed from the function's inputs"):
    emit.const_value(g, g.in_ids[0])


def test_merge_entry_and_prepare_merges_hold_the_common_epilogue():
  g = _g_epi()
  u1, u2 = _conv_units(g)
  kernel, params, ranges, epi = emit.merge_entry(g, (u1, u2))
  k2, _, r2 = emit.merged_conv_params(g, (u1, u2))
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(k2))
  assert ranges == r2
  assert [p.name for p, _, _, _ in epi] == ["add", "max"]
  np.testing.assert_array_equal(np.asarray(epi[0][3]), np.concatenate([B1, B2]))   # biases side by side
  assert emit.merge_entry(g, (u1, u2), fuse_epilogue=False)[3] is None
  rest = tuple(u for u in range(len(g.units)) if u not in (u1, u2))
  stages = [Stage("merge", ((u1, u2),)), Stage("parallel", (rest,))]
  merges = emit.prepare_merges(g, stages)
  assert list(merges) == [0]                                     # parallel stages get no entry
  np.testing.assert_array_equal(np.asarray(merges[0][0]), np.asarray(kernel))
  assert emit.prepare_merges(g, stages, fuse_epilogue=False)[0][3] is None
  with pytest.raises(TypeError, match="list of Stage"):
    emit.prepare_merges(g, [((u1, u2),)])
  with pytest.raises(ValueError, match="exactly one group"):
    emit.prepare_merges(g, [Stage("merge", ((u1,), (u2,)))])
  with pytest.raises(ValueError, match="expected 'parallel' or 'merge'"):
    emit.prepare_merges(g, [Stage("fuse", ((u1, u2),))])


@pytest.mark.parametrize("fuse", [True, False])
def test_run_merge_equals_separate_convs_and_epilogues(fuse):
  g = _g_epi()
  u1, u2 = _conv_units(g)
  env = {g.in_ids[0]: jnp.asarray(X)}
  emit.run_merge(g, (u1, u2), emit.merge_entry(g, (u1, u2), fuse), env, g.consts)
  ref = _ref_epi(X)
  np.testing.assert_allclose(np.asarray(env[g.units[u1].outputs[0]]), ref[..., :4], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(env[g.units[u2].outputs[0]]), ref[..., 4:], rtol=1e-5, atol=1e-5)


def test_run_merge_rejects_a_wrong_merged_entry():
  g = _g_plain()
  a, b, _ = _conv_units(g)
  env = {g.in_ids[0]: jnp.asarray(X)}
  with pytest.raises(TypeError, match=r"\(kernel, params, ranges, epi\)"):
    emit.run_merge(g, (a, b), emit.merged_conv_params(g, (a, b)), env, g.consts)   # 3-tuple
  k, p, r, e = emit.merge_entry(g, (a, b))
  with pytest.raises(ValueError, match="channel ranges"):
    emit.run_merge(g, (a, b), (k, p, r[:1], e), env, g.consts)


_WD = _RNG.normal(size=(4, 4)).astype(np.float32)


@functools.lru_cache(None)
def _g_dot():
  return G.build_graph(lambda x: jnp.tanh(x @ _WD) + x @ (2 * _WD), jnp.ones((2, 4)))


def _ref_dot(x):
  x = np.asarray(x, np.float64)
  return np.tanh(x @ _WD) + x @ (2.0 * _WD)


def test_run_group_runs_a_chain_into_env():
  g = _g_dot()
  x = _RNG.normal(size=(2, 4)).astype(np.float32)
  env = {g.in_ids[0]: jnp.asarray(x)}
  emit.run_group(g, (0, 1, 2), env, g.consts)
  np.testing.assert_allclose(np.asarray(env[g.out_ids[0]]), _ref_dot(x), rtol=1e-5, atol=1e-5)
  with pytest.raises(KeyError):
    emit.run_group(g, (2,), {g.in_ids[0]: jnp.asarray(x)}, g.consts)     # its predecessors have not run
  with pytest.raises(TypeError, match="non-empty tuple"):
    emit.run_group(g, (), env, g.consts)
  with pytest.raises(ValueError, match="not a unit"):
    emit.run_group(g, (0, 7), env, g.consts)


@pytest.mark.parametrize("mode", ["plain", "streams"])
def test_run_stage_parallel_groups_in_every_mode(mode):
  g = _g_dot()
  x = _RNG.normal(size=(2, 4)).astype(np.float32)

  def prog(x):
    env = {g.in_ids[0]: x}
    emit.run_stage(g, Stage("parallel", ((0,), (1,))), env, g.consts, mode)
    emit.run_stage(g, Stage("parallel", ((2,),)), env, g.consts, mode)
    return env[g.out_ids[0]]

  np.testing.assert_allclose(np.asarray(jax.jit(prog)(x)), _ref_dot(x), rtol=1e-5, atol=1e-5)


def test_run_stage_merge_and_bad_input():
  g = _g_epi()
  u1, u2 = _conv_units(g)
  env = {g.in_ids[0]: jnp.asarray(X)}
  st = Stage("merge", ((u1, u2),))
  emit.run_stage(g, st, env, g.consts, "cuda_graph", emit.merge_entry(g, (u1, u2)))
  np.testing.assert_allclose(np.asarray(env[g.units[u2].outputs[0]]), _ref_epi(X)[..., 4:], rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(ValueError, match="needs merged"):
    emit.run_stage(g, st, env, g.consts, "plain")
  with pytest.raises(ValueError, match="mode must be one of"):
    emit.run_stage(g, Stage("parallel", ((u1,),)), env, g.consts, "stream")
  with pytest.raises(TypeError, match="list of Stage"):
    emit.run_stage(g, ((u1,),), env, g.consts, "plain")


@pytest.mark.parametrize("mode", emit.EMISSION_MODES)
def test_make_program_computes_the_function_in_every_mode(mode):
  g = _g_epi()
  u1, u2 = _conv_units(g)
  rest = tuple(u for u in range(len(g.units)) if u not in (u1, u2))
  stages = [Stage("merge", ((u1, u2),)), Stage("parallel", (rest,))]
  run = emit.make_program(g, stages, mode=mode, keep_alive=(mode == "cuda_graph"))
  np.testing.assert_allclose(np.asarray(jax.jit(run)(g.consts, jnp.asarray(X))), _ref_epi(X), rtol=1e-5,
                             atol=1e-5)


def test_make_program_rejects_bad_schedules_and_arguments():
  g = _g_dot()
  good = [Stage("parallel", ((0,), (1,))), Stage("parallel", ((2,),))]
  with pytest.raises(ValueError, match="mode must be one of"):
    emit.make_program(g, good, mode="cuda-graph")
  with pytest.raises(ValueError, match="every unit exactly once"):
    emit.make_program(g, good[:1])
  with pytest.raises(ValueError, match="before its predecessor"):
    emit.make_program(g, [Stage("parallel", ((2,),)), Stage("parallel", ((0,), (1,)))])
  with pytest.raises(TypeError, match="list of Stage"):
    emit.make_program(g, [((0, 1, 2),)])
  ge = _g_epi()
  u1, u2 = _conv_units(ge)
  rest = tuple(u for u in range(len(ge.units)) if u not in (u1, u2))
  with pytest.raises(ValueError, match="no entry for merge stages"):
    emit.make_program(ge, [Stage("merge", ((u1, u2),)), Stage("parallel", (rest,))], merges={})
  run = emit.make_program(g, good)
  with pytest.raises(TypeError, match="traced for"):
    run(g.consts, jnp.ones((3, 4)))                          # traced for (2, 4)


def test_stream_call_computes_f_and_checks_its_arguments():
  if not emit.stream_call_available():
    pytest.skip("this jax has no function-form compute_on")
  f = lambda a, b: (a * b + 1.0, jnp.sin(a))
  a, b = jnp.arange(3.0), jnp.full(3, 2.0)
  got = jax.jit(emit.stream_call(f, 2))(a, b)
  for x, y in zip(got, f(a, b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
  with pytest.raises(TypeError, match="callable"):
    emit.stream_call(3, 1)
  with pytest.raises(ValueError, match="stream"):
    emit.stream_call(f, -1)
  with pytest.raises(TypeError, match="stream must be an integer"):
    emit.stream_call(f, 1.5)


# ------------------------------------------------------------------------------------------ graph
def _eqn(g, name):
  (e,) = [e for e in g.eqns if e.prim.name == name]
  return e


def test_eqn_flops_matches_hand_counts():
  x = jnp.ones((1, 7, 7, 4))
  w = jnp.ones((3, 3, 4, 6))
  g = G.build_graph(lambda x: _conv(x, w, (2, 2), "VALID"), x)
  assert G.eqn_flops(_eqn(g, "conv_general_dilated"), g.avals) == 2 * (3 * 3 * 6) * 4 * 9   # 3888
  wg = jnp.ones((3, 3, 2, 6))                                      # 2 groups of 2 input channels
  g = G.build_graph(lambda x: _conv(x, wg, groups=2), jnp.ones((1, 5, 5, 4)))
  assert G.eqn_flops(_eqn(g, "conv_general_dilated"), g.avals) == 2 * (5 * 5 * 6) * 2 * 9   # 5400
  g = G.build_graph(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)))
  assert G.eqn_flops(_eqn(g, "dot_general"), g.avals) == 2 * (2 * 3 * 5) * 4                # 240
  pool = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  g = G.build_graph(pool, jnp.ones((1, 4, 4, 6)))
  assert G.eqn_flops(_eqn(g, "reduce_window_max"), g.avals) == (2 * 2 * 6) * 4               # 96
  g = G.build_graph(lambda a: jnp.tanh(a).sum(axis=(1, 2)), jnp.ones((2, 3, 5)))
  assert G.eqn_flops(_eqn(g, "tanh"), g.avals) == 30.0
  assert G.eqn_flops(_eqn(g, "reduce_sum"), g.avals) == 30.0     # max(in 30, out 2) elements
  with pytest.raises(TypeError, match="FlatEqn"):
    G.eqn_flops("tanh", g.avals)
  with pytest.raises(KeyError, match="no abstract value"):
    G.eqn_flops(_eqn(g, "tanh"), {})


def test_avals_of_value_ids_and_literals():
  g = _g_dot()
  v = g.in_ids[0]
  assert G.avals_of(v, g.avals) is g.avals[v]
  lit = G.avals_of(G.Lit(np.float32(2.0)), g.avals)
  assert lit.shape == () and lit.dtype == jnp.float32
  assert G.avals_of(G.Lit(np.zeros((2, 3), np.int32)), g.avals).shape == (2, 3)
  assert G.avals_of(10 ** 6, g.avals) is None                     # an id the graph does not know
  with pytest.raises(TypeError, match="value id or a Lit"):
    G.avals_of("x", g.avals)


def _cut_points_bruteforce(g):
  """Unit i is a cut point iff no input->output path avoids it (BFS on the DAG without i)."""
  n = len(g.units)
  srcs = [u.idx for u in g.units if not u.preds or any(a not in g.producer for a in u.inputs)]
  sinks = {u.idx for u in g.units if not u.succs or any(o in g.out_ids for o in u.outputs)}
  cuts = []
  for i in range(n):
    seen, stack = set(), [s for s in srcs if s != i]
    while stack:
      u = stack.pop()
      if u in seen:
        continue
      seen.add(u)
      stack.extend(s for s in g.units[u].succs if s != i)
    if not (seen & sinks):
      cuts.append(i)
  return cuts


def _chain_of_diamonds(x):
  ws = [jnp.full((4, 4), 0.1 * (k + 1)) for k in range(5)]
  c = jnp.tanh(x @ ws[0]) + x @ ws[1]          # diamond: dot, dot, add
  d = jnp.tanh(c @ ws[2])                      # a cut point
  return d @ ws[3] + jnp.sin(d @ ws[4])        # diamond again


def test_partition_blocks_matches_bruteforce_cut_points():
  g = G.build_graph(_chain_of_diamonds, jnp.ones((1, 4)))
  cuts = _cut_points_bruteforce(g)
  want, cur = [], []
  for i in range(len(g.units)):
    cur.append(i)
    if i in cuts:
      want.append(cur)
      cur = []
  if cur:
    want.append(cur)
  assert len(want) == 2                         # two diamonds (the add joins the next dot's unit)
  assert G.partition_blocks(g, 50) == want
  parts = G.partition_blocks(g, 2)
  assert [u for p in parts for u in p] == list(range(len(g.units)))
  assert all(1 <= len(p) <= 2 for p in parts)
  ends = {blk[-1] for blk in want}
  starts_ok = {0} | {e + 1 for e in ends}
  for blk in want:                              # parts never straddle a block boundary
    assert [p for p in parts if p[0] in blk] == [blk[s:s + 2] for s in range(0, len(blk), 2)]
  assert all(p[0] in starts_ok or p[0] - 2 >= 0 for p in parts)
  with pytest.raises(ValueError, match="part_size"):
    G.partition_blocks(g, 0)
  with pytest.raises(TypeError, match="part_size"):
    G.partition_blocks(g, 2.0)
  with pytest.raises(TypeError, match="must be a Graph"):
    G.partition_blocks([[0]], 2)


def test_summarize_graph_counts():
  g = G.build_graph(_chain_of_diamonds, jnp.ones((1, 4)), part_size=2)
  s = G.summarize_graph(g)
  assert s == {"units": len(g.units), "eqns": len(g.eqns), "blocks": len(g.blocks),
               "largest_part": max(len(p) for p in g.blocks),
               "kinds": dict(collections.Counter(u.kind for u in g.units))}
  assert s["largest_part"] == 2 and s["kinds"]["dot_general"] == 5
  with pytest.raises(TypeError, match="must be a Graph"):
    G.summarize_graph({"units": []})


# ------------------------------------------------------------------------------------------ cost
def _roofline_ref(f, b, peak, bw, sat):
  return max(max(f, min(sat, 50.0 * f)) / peak, b / bw)


def test_roofline_time_matches_the_formula():
  assert C.roofline_time(4e9, 1e3, 400e12, 3e12, 2e9) == pytest.approx(1e-5)      # compute-bound
  assert C.roofline_time(1e3, 3e6, 400e12, 3e12, 2e9) == pytest.approx(1e-6)      # memory-bound
  assert C.roofline_time(1e8, 0.0, 400e12, 3e12, 2e9) == pytest.approx(5e-6)      # under-filled: sat / peak
  assert C.roofline_time(1e3, 0.0, 400e12, 3e12, 2e9) == pytest.approx(50e3 / 400e12)   # 50 F cap
  rng = np.random.default_rng(1)
  f, b = 10 ** rng.uniform(0, 12, 64), 10 ** rng.uniform(0, 10, 64)
  for peak, bw, sat in ((1e12, 1e9, 1e8), (400e12, 3e12, 0.0)):
    arr = C.roofline_time(f, b, peak, bw, sat)
    ref = np.array([_roofline_ref(fi, bi, peak, bw, sat) for fi, bi in zip(f, b)])
    np.testing.assert_allclose(arr, ref, rtol=1e-12)
    assert [C.roofline_time(float(fi), float(bi), peak, bw, sat) for fi, bi in zip(f, b)] == \
        pytest.approx(ref.tolist(), rel=1e-12)


@pytest.mark.parametrize("bad,match", [(dict(peak=0.0), "peak"), (dict(bw=-1.0), "bw"),
                                       (dict(sat=float("nan")), "sat"), (dict(peak=float("inf")), "peak"),
                                       (dict(f=-1.0), "f "), (dict(b=float("inf")), "b "),
                                       (dict(f=np.array([1.0, -2.0])), "f ")])
def test_roofline_time_rejects_bad_arguments(bad, match):
  args = dict(f=1e6, b=1e3, peak=1e12, bw=1e9, sat=1e6)
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    C.roofline_time(**args)


def test_merge_flops_bytes_hand_counts():
  g = _g_plain()
  a, b, strided = _conv_units(g)
  f, nbytes, n = C.merge_flops_bytes(g, Stage("merge", ((a, b),)))
  assert n == 2
  assert f == 2.0 * (36 * 4 + 36 * 5) * 3 * 9          # 4 + 5 output channels, 3x3 window, 3 inputs
  x_b, out_b, w_b = 36 * 3 * 4, (36 * 4 + 36 * 5) * 4, (1 * 1 * 3 * 4 + 3 * 3 * 3 * 5) * 4
  assert nbytes == x_b + out_b + w_b                    # input read once
  with pytest.raises(ValueError, match="merge Stage"):
    C.merge_flops_bytes(g, Stage("parallel", ((a,), (b,))))
  gd = _g_dot()
  with pytest.raises(ValueError, match="convolution unit"):
    C.merge_flops_bytes(gd, Stage("merge", ((0, 1),)))


def test_chain_program_chains_k_copies_through_barriers():
  calls = []

  def fn(consts, xs):
    calls.append(1)
    return (xs[0] * consts["s"] + xs[1],)

  run = C.chain_program(fn, 3)
  xs = (jnp.arange(3.0), jnp.ones(3))
  out = jax.jit(run)({"s": 2.0}, xs)
  assert len(out) == 3 and len(calls) == 3
  for ys in out:
    np.testing.assert_array_equal(np.asarray(ys[0]), np.arange(3.0) * 2 + 1)
  jaxpr = jax.make_jaxpr(run)({"s": 2.0}, xs)
  assert sum(e.primitive.name == "optimization_barrier" for e in jaxpr.eqns) == 3
  with pytest.raises(ValueError, match="k must be an integer in"):
    C.chain_program(fn, 0)
  with pytest.raises(TypeError, match="k must be an integer"):
    C.chain_program(fn, 2.0)
  with pytest.raises(TypeError, match="callable"):
    C.chain_program(None, 2)


def test_time_calls_counts_calls_and_measures_seconds_per_call(monkeypatch):
  clock = {"now": 0.0, "calls": 0}

  def f(x):                                     # each call takes 0.25 s of a fake clock
    clock["calls"] += 1
    clock["now"] += 0.25
    return x

  monkeypatch.setattr(C.time, "perf_counter", lambda: clock["now"])
  ts = C.time_calls(f, (jnp.ones(2),), number=2, repeat=3)
  monkeypatch.undo()
  assert ts == [0.25, 0.25, 0.25]               # seconds per call, one entry per round
  assert clock["calls"] == 1 + 2 * 3            # one warm-up call
  for kw, err in ((dict(number=0, repeat=1), ValueError), (dict(number=1, repeat=0), ValueError),
                  (dict(number=1.0, repeat=1), TypeError)):
    with pytest.raises(err, match="number|repeat"):
      C.time_calls(f, (jnp.ones(2),), **kw)
  with pytest.raises(TypeError, match="tuple of positional"):
    C.time_calls(f, jnp.ones(2), number=1, repeat=1)
  with pytest.raises(TypeError, match="callable"):
    C.time_calls("f", (1,), number=1, repeat=1)


# ------------------------------------------------------------------------------------------ dynamic
def test_length_distribution_matches_counts():
  lengths = [5, 3, 5, 9, 5, 3]
  uniq, p = dyn.length_distribution(lengths)
  cnt = collections.Counter(lengths)
  assert uniq.tolist() == sorted(cnt) and uniq.dtype == np.int64
  np.testing.assert_allclose(p, [cnt[n] / len(lengths) for n in sorted(cnt)], rtol=1e-15)
  uniq, p = dyn.length_distribution([9, 3, 9], weights=[1.0, 2.0, 5.0])     # pooled, then normalised
  assert uniq.tolist() == [3, 9]
  np.testing.assert_allclose(p, [2 / 8, 6 / 8], rtol=1e-15)
  assert dyn.length_distribution(np.array([2.0, 4.0]))[0].tolist() == [2, 4]   # integral floats


@pytest.mark.parametrize("lengths,weights,err,match", [
    ([], None, ValueError, "non-empty 1-D"), ([[1, 2]], None, ValueError, "non-empty 1-D"),
    ([1.5, 2], None, TypeError, "integers"), ([0, 2], None, ValueError, ">= 1"),
    ([1, 2], [1.0], ValueError, "match"), ([1, 2], [1.0, -1.0], ValueError, ">= 0"),
    ([1, 2], [np.nan, 1.0], ValueError, "finite"), ([1, 2], [0.0, 0.0], ValueError, "not all zero")])
def test_length_distribution_rejects_bad_input(lengths, weights, err, match):
  with pytest.raises(err, match=match):
    dyn.length_distribution(lengths, weights)


def _sig(z):
  return 1.0 / (1.0 + np.exp(-z))


def _np_cell(p, x, ch, cc):
  """Tai et al. (ACL 2015) child-sum Tree-LSTM, eq. 2-8, in float64."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x, ch, cc = (np.asarray(a, np.float64) for a in (x, ch, cc))
  hd = p["U_f"].shape[0]
  ht = ch.sum(0)
  i = _sig(x @ p["W_iou"][:, :hd] + p["b_iou"][:hd] + ht @ p["U_iou"][:, :hd])
  o = _sig(x @ p["W_iou"][:, hd:2 * hd] + p["b_iou"][hd:2 * hd] + ht @ p["U_iou"][:, hd:2 * hd])
  u = np.tanh(x @ p["W_iou"][:, 2 * hd:] + p["b_iou"][2 * hd:] + ht @ p["U_iou"][:, 2 * hd:])
  c = i * u
  for k in range(ch.shape[0]):
    c = c + _sig(x @ p["W_f"] + p["b_f"] + ch[k] @ p["U_f"]) * cc[k]
  return o * np.tanh(c), c


def _params(d, hd, seed=0):
  r = np.random.default_rng(seed)
  shapes = {"W_iou": (d, 3 * hd), "b_iou": (3 * hd,), "U_iou": (hd, 3 * hd), "W_f": (d, hd), "b_f": (hd,),
            "U_f": (hd, hd)}
  return {k: (0.5 * r.normal(size=s)).astype(np.float32) for k, s in shapes.items()}


def test_tree_lstm_cell_matches_numpy_child_sum_equations():
  p = _params(3, 4)
  r = np.random.default_rng(1)
  cell = jax.jit(dyn.tree_lstm_cell)
  for k in (0, 1, 3):
    x, ch, cc = (r.normal(size=s).astype(np.float32) for s in ((3,), (k, 4), (k, 4)))
    h, c = cell(p, x, ch, cc)
    h_ref, c_ref = _np_cell(p, x, ch, cc)
    np.testing.assert_allclose(np.asarray(c), c_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(h), h_ref, rtol=1e-5, atol=1e-6)


def test_tree_lstm_cell_rejects_bad_shapes_and_params():
  p = _params(3, 4)
  x, ch = np.zeros(3, np.float32), np.zeros((2, 4), np.float32)
  with pytest.raises(ValueError, match="x_j must be one node"):
    dyn.tree_lstm_cell(p, np.zeros((1, 3)), ch, ch)
  with pytest.raises(ValueError, match="child_h and child_c"):
    dyn.tree_lstm_cell(p, x, ch, ch[:1])
  with pytest.raises(ValueError, match="child_h and child_c"):
    dyn.tree_lstm_cell(p, x, np.zeros((2, 5)), np.zeros((2, 5)))
  with pytest.raises(ValueError, match="keys"):
    dyn.tree_lstm_cell({k: v for k, v in p.items() if k != "U_f"}, x, ch, ch)
  with pytest.raises(ValueError, match=r"params\['W_iou'\]"):
    dyn.tree_lstm_cell(p, np.zeros(2, np.float32), ch, ch)          # d = 2 vs W_iou's 3 rows
  bad = dict(p, b_iou=np.zeros(5, np.float32))
  with pytest.raises(ValueError, match=r"params\['b_iou'\]"):
    dyn.tree_lstm_cell(bad, x, ch, ch)


def _np_tree(p, parents, x):
  """States of every node of one tree by float64 recursion over the children."""
  kids = [[] for _ in parents]
  for j, q in enumerate(parents):
    if q >= 0:
      kids[q].append(j)
  hs, cs = {}, {}

  def node(j):
    for k in kids[j]:
      node(k)
    ch = np.array([hs[k] for k in kids[j]]).reshape(-1, p["U_f"].shape[0])
    cc = np.array([cs[k] for k in kids[j]]).reshape(ch.shape)
    hs[j], cs[j] = _np_cell(p, x[j], ch, cc)

  node(parents.index(-1))
  return np.array([hs[j] for j in range(len(parents))])


def test_tree_lstm_levels_matches_per_tree_recursion():
  p = _params(3, 4, seed=2)
  trees = [[-1, 0, 0, 1, 1, 2], [-1], [1, -1, 1, 0]]
  r = np.random.default_rng(3)
  feats = [r.normal(size=(len(t), 3)).astype(np.float32) for t in trees]
  batch = dyn.encode_trees(trees, feats, num_trees=4)              # numpy arrays; one padded root
  root_h, node_h = dyn.tree_lstm_levels(p, batch)                   # the numpy batch works (regression)
  off = 0
  for t, (par, f) in enumerate(zip(trees, feats)):
    ref = _np_tree(p, par, f)
    np.testing.assert_allclose(np.asarray(node_h[off:off + len(par)]), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(root_h[t]), ref[par.index(-1)], rtol=1e-5, atol=1e-6)
    off += len(par)
  assert not np.any(np.asarray(root_h[3])) and not np.any(np.asarray(node_h[-1]))   # padding stays 0


def test_tree_lstm_levels_rejects_bad_input():
  p = _params(3, 4)
  batch = dyn.encode_trees([[-1, 0]], [np.ones((2, 3), np.float32)])
  with pytest.raises(TypeError, match="TreeBatch"):
    dyn.tree_lstm_levels(p, tuple(batch))
  with pytest.raises(ValueError, match=r"params\['W_iou'\]"):
    dyn.tree_lstm_levels(_params(5, 4), batch)                      # d = 5 vs features of width 3
  with pytest.raises(ValueError, match="parent"):
    dyn.tree_lstm_levels(p, batch._replace(parent=batch.parent[:-1]))
  with pytest.raises(ValueError, match="keys"):
    dyn.tree_lstm_levels({"W_iou": p["W_iou"]}, batch)


# ------------------------------------------------------------------------------------------ placement
def _obs(m=3, w=4, r=2, seed=0):
  rng = np.random.default_rng(seed)
  return P.Observation(
      usage_hist=jnp.asarray(rng.uniform(0, 1, (m, w, r)), jnp.float32),
      reserved=jnp.asarray(rng.uniform(0, 0.5, (m, r)), jnp.float32),
      counts=jnp.asarray(rng.integers(0, 3, (m, 4)), jnp.float32),
      size_frac=jnp.asarray(np.tile(rng.uniform(0, 0.3, (1, r)), (m, 1)), jnp.float32),
      vm_type=jnp.int32(1), feasible=jnp.ones(m, bool), index=jnp.int32(0), time=jnp.int32(0),
      hindsight=jnp.zeros(m))


_FIT_OR_FORECAST = P.switch_policy(P.best_fit, P.forecast)   # one compiled simulation for both hand cases


def test_best_fit_scores_and_tightest_placement():
  obs = _obs()
  want = (np.asarray(obs.reserved, np.float64) + np.asarray(obs.size_frac, np.float64)).sum(-1)
  np.testing.assert_allclose(np.asarray(P.best_fit(None, obs, None)), want, rtol=1e-6)
  # hand case, capacity 1: 0.3 -> m0 (tie: lowest index); 0.3 -> m0 (fullest); 0.5 does not fit m0 -> m1
  tr = P.make_trace([0, 0, 0], np.full((3, 3, 1), 0.1), np.array([[0.3], [0.3], [0.5]]))
  res = P.simulate(tr, P.Cluster(jnp.ones((3, 1))), _FIT_OR_FORECAST, spec=P.Spec(4, window=2), params=(0, None))
  assert res.actions.tolist() == [0, 0, 1]


def test_forecast_scores_are_minus_the_moving_average_load():
  obs = _obs(seed=1)
  want = -np.asarray(obs.usage_hist, np.float64).mean(1).sum(-1)
  np.testing.assert_allclose(np.asarray(P.forecast(None, obs, None)), want, rtol=1e-6)
  # hand case: the first VM's usage (0.4 at ages 0-2) makes m0 busy; the next arrivals avoid it
  tr = P.make_trace([0, 1, 2], np.full((3, 3, 1), 0.4), np.full((3, 1), 0.4))
  res = P.simulate(tr, P.Cluster(jnp.ones((3, 1))), _FIT_OR_FORECAST, spec=P.Spec(4, window=2), params=(1, None))
  assert res.actions.tolist() == [0, 1, 2]


@pytest.mark.parametrize("policy", [P.best_fit, P.forecast])
def test_best_fit_and_forecast_reject_a_bad_observation(policy):
  obs = _obs()
  with pytest.raises(TypeError, match="Observation"):
    policy(None, tuple(obs), None)
  with pytest.raises(ValueError, match="usage_hist"):
    policy(None, obs._replace(usage_hist=obs.usage_hist[0]), None)
  with pytest.raises(ValueError, match="size_frac"):
    policy(None, obs._replace(size_frac=obs.size_frac[:2]), None)


_F = 2 * (5 * 2 + 4) + 4 + 2    # machine_features width for R=2, K=4


def _net(seed, m=3):
  """PlacementNet parameters drawn in numpy (the structure from eval_shape: no init compilation)."""
  shapes = jax.eval_shape(H.PlacementNet().init, jax.random.PRNGKey(0), jnp.zeros((m, _F)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


def test_ppo_policy_is_the_actor_logits_and_equivariant():
  actor = _net(0)
  obs = _obs(seed=2)

  @jax.jit   # one compilation: the policy and, independently traced, the actor's logits
  def both(params, obs, key):
    return P.ppo_policy(params, obs, key), H.PlacementNet().apply(params[0], H.machine_features(obs))

  s, ref = both((actor, jnp.float32(0)), obs, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(np.asarray(s), np.asarray(ref))
  pol = lambda params, obs, key: both(params, obs, key)[0]
  np.testing.assert_array_equal(np.asarray(pol((actor, jnp.float32(5)), obs, jax.random.PRNGKey(9))),
                                np.asarray(s))                       # critic and key unused
  perm = np.array([2, 0, 1])
  obs_p = obs._replace(**{k: getattr(obs, k)[perm] for k in ("usage_hist", "reserved", "counts", "size_frac",
                                                            "feasible", "hindsight")})
  s_p = pol((actor, jnp.float32(0)), obs_p, jax.random.PRNGKey(1))
  np.testing.assert_allclose(np.asarray(s_p), np.asarray(s)[perm], rtol=1e-5, atol=1e-6)
  with pytest.raises(TypeError, match=r"\(actor, critic\)"):
    P.ppo_policy(actor, obs, None)


_SPEC = P.Spec(horizon=16, window=4)
_CL = P.make_cluster(3)


@functools.lru_cache(None)
def _traces():
  """Two random traces of 12 VMs (built in numpy: no compilation), stacked into a batch."""
  rng = np.random.default_rng(4)
  out = []
  for _ in range(2):
    arrival = np.sort(rng.integers(0, 12, 12))
    size = rng.choice([0.25, 0.5], size=(12, 2))
    life = rng.integers(1, 5, 12)
    usage = size[:, None, :] * rng.uniform(0.2, 1.0, (12, 4, 2)) * (np.arange(4)[None, :, None] < life[:, None, None])
    out.append(P.make_trace(arrival, usage, size, vm_type=rng.integers(0, 4, 12), lifetime=life))
  return jax.tree.map(lambda *a: jnp.stack(a), *out)


def _greedy(scores, feasible):
  """The simulator's rule: the feasible machine with the highest score (ties: lowest index), -1 if none."""
  s = np.where(feasible, scores, -np.inf)
  return np.where(feasible.any(-1), np.argmax(s, -1), -1)


_par_objectives = jax.jit(jax.vmap(P.par_objective, in_axes=(0, None)))


def test_dagger_rollouts_shapes_and_the_two_ends_of_beta():
  trs = _traces()
  net = _net(1)
  scores = jax.jit(lambda n, o: H.PlacementNet().apply(n, jax.vmap(jax.vmap(H.machine_features))(o)))
  for beta in (1.0, 0.0):
    res = P.dagger_rollouts(trs, _CL, spec=_SPEC, params=net, beta=beta, key=jax.random.PRNGKey(2))
    assert res.actions.shape == (2, 12) and res.objective.shape == (2,)
    assert res.usage.shape == (2, 3, 16, 2)
    assert res.obs.hindsight.shape == (2, 12, 3) and res.obs.feasible.shape == (2, 12, 3)
    assert res.obs.usage_hist.shape == (2, 12, 3, 4, 2)
    hs, fe = np.asarray(res.obs.hindsight), np.asarray(res.obs.feasible)
    assert np.any(hs != 0)                                              # hindsight costs recorded
    # beta = 1: every decision is the oracle's (lowest hindsight cost); beta = 0: the net's (highest score)
    want = _greedy(-hs, fe) if beta == 1.0 else _greedy(np.asarray(scores(net, res.obs)), fe)
    np.testing.assert_array_equal(np.asarray(res.actions), want)
    obj = _par_objectives(res.usage, _CL.capacity)
    np.testing.assert_allclose(np.asarray(res.objective), np.asarray(obj), rtol=1e-6)
  with pytest.raises(ValueError, match="beta"):
    P.dagger_rollouts(trs, _CL, spec=_SPEC, params=net, beta=1.5, key=jax.random.PRNGKey(2))
  with pytest.raises(ValueError, match="batch"):
    P.dagger_rollouts(jax.tree.map(lambda a: a[0], trs), _CL, spec=_SPEC, params=net, beta=0.5,
                      key=jax.random.PRNGKey(2))
  with pytest.raises(ValueError, match="resources"):
    P.dagger_rollouts(trs, P.make_cluster(3, capacity=(1.0,)), spec=_SPEC, params=net, beta=0.5,
                      key=jax.random.PRNGKey(2))


def test_train_imitation_reduces_the_loss_on_a_fixed_expert():
  trs = _traces()
  # batch_size 16 <= the states of one rollout: every minibatch has one shape (one compilation)
  res = P.train_imitation(trs, _CL, spec=_SPEC, key=jax.random.PRNGKey(3), iterations=2, beta=1.0, epochs=20,
                          batch_size=16, learning_rate=1e-2)
  assert len(res.losses) == 2 and len(res.rollout_objective) == 2
  # beta = 1: every rollout is the (deterministic) hindsight oracle
  ro = P.dagger_rollouts(trs, _CL, spec=_SPEC, params=res.params, beta=1.0, key=jax.random.PRNGKey(4))
  want_obj = float(np.mean(np.asarray(ro.objective)))
  assert res.rollout_objective == pytest.approx([want_obj, want_obj], rel=1e-5)
  fe = np.asarray(ro.obs.feasible)
  assert res.n_samples == 2 * int(np.sum(fe.sum(-1) >= 2))   # two identical oracle rollouts aggregated

  @jax.jit
  def loss(params, obs):   # states with < 2 feasible machines carry weight 0 in imitation_loss
    feats = jax.vmap(jax.vmap(H.machine_features))(obs).reshape(-1, 3, _F)
    return P.imitation_loss(params, feats, obs.hindsight.reshape(-1, 3), obs.feasible.reshape(-1, 3))

  before, after = float(loss(_net(7), ro.obs)), float(loss(res.params, ro.obs))
  assert after < 0.7 * before, (before, after)
  for kw, match in ((dict(iterations=0), "iterations"), (dict(beta=1.5), "beta"),
                    (dict(learning_rate=0.0), "learning_rate"), (dict(temperature=-1.0), "temperature")):
    with pytest.raises(ValueError, match=match):
      P.train_imitation(trs, _CL, spec=_SPEC, key=jax.random.PRNGKey(3), **kw)
  with pytest.raises(ValueError, match="batch"):
    P.train_imitation(jax.tree.map(lambda a: a[0], trs), _CL, spec=_SPEC, key=jax.random.PRNGKey(3))
