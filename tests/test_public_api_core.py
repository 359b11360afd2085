"""Direct tests of public functions of the core modules that had no test of their own (session 21):
_checks, comm.distributed.initialize_from_flags, cost.{graph,hlo,value,value_ios}, profile.{overhead,
workloads,report,attribution} and stats.bootstrap_ci. Each checks the documented contract against an
independent reference (hand-computed values, float64 formulas, brute force) and the bad-input errors."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax import _checks
from mlsys_jax import sched
from mlsys_jax import stats
from mlsys_jax.comm import distributed as dist
from mlsys_jax.cost import graph as graph_lib
from mlsys_jax.cost import hlo as hlo_lib
from mlsys_jax.cost import value as V
from mlsys_jax.cost import value_ios
from mlsys_jax.profile import attribution as attr_lib
from mlsys_jax.profile import overhead
from mlsys_jax.profile import report
from mlsys_jax.profile import workloads as wl
from mlsys_jax.profile.attribution import Attribution
from mlsys_jax.profile.overhead import Corrected
from mlsys_jax.profile.scopes import HOST_CATEGORIES, Record
from mlsys_jax.sched.api import _check_cover


# ----------------------------------------------------------------------------------------------------
# mlsys_jax._checks


def test_check_range_bounds_types_and_messages():
  for v in (0, 0.5, 1, np.float32(0.25), np.int64(1), jnp.asarray(0.5), np.asarray(1.0)):
    _checks.check_range("lr", v, 0.0, 1.0)
  with pytest.raises(ValueError, match=r"lr must lie in \(0.0, 1.0\], got 0.0"):
    _checks.check_range("lr", 0.0, 0.0, 1.0, low_inclusive=False)
  with pytest.raises(ValueError, match=r"lr must lie in \[0.0, 1.0\), got 1.0"):
    _checks.check_range("lr", 1.0, 0.0, 1.0, high_inclusive=False)
  with pytest.raises(ValueError, match=r"lr must lie in \[-inf, 2\]"):
    _checks.check_range("lr", 3, None, 2)
  with pytest.raises(ValueError, match=r"lr must lie in \[0.5, inf\]"):
    _checks.check_range("lr", 0.4, 0.5)
  for bad in (float("nan"), float("inf"), np.float32(-np.inf)):
    with pytest.raises(ValueError, match="lr must be finite"):
      _checks.check_range("lr", bad)
  for bad in (True, "0.1", None, [0.1], np.ones(2)):
    with pytest.raises(TypeError, match="lr must be a real number"):
      _checks.check_range("lr", bad)
  # A traced scalar cannot be checked: it passes through (the callers document this).
  jax.jit(lambda x: (_checks.check_range("lr", x, 0.0, 1.0), x)[1])(jnp.float32(5.0))


def test_check_int_and_check_choice():
  for v in (0, 3, np.int32(3), np.int64(5)):
    _checks.check_int("n", v, 0, 5)
  for bad in (3.0, True, np.float32(2), "3", None):
    with pytest.raises(TypeError, match="n must be an integer"):
      _checks.check_int("n", bad)
  with pytest.raises(ValueError, match=r"n must be an integer in \[1, 5\], got 0"):
    _checks.check_int("n", 0, 1, 5)
  with pytest.raises(ValueError, match=r"n must be an integer in \[1, 5\], got 6"):
    _checks.check_int("n", 6, 1, 5)
  with pytest.raises(ValueError, match=r"in \[-inf, 2\]"):
    _checks.check_int("n", 3, None, 2)
  _checks.check_choice("mode", "b", ("a", "b"))
  with pytest.raises(ValueError, match=r"mode must be one of \['a', 'b'\], got 'c'"):
    _checks.check_choice("mode", "c", ("b", "a"))


def test_check_floating_finite_rank_and_is_concrete():
  _checks.check_floating("params", {"w": jnp.ones(2), "b": np.zeros(1, np.float16)})
  with pytest.raises(TypeError, match=r"params\['n'\] must be a floating-point array, got dtype int32"):
    _checks.check_floating("params", {"w": jnp.ones(2), "n": jnp.ones(2, jnp.int32)})
  with pytest.raises(ValueError, match="params is an empty pytree"):
    _checks.check_floating("params", {})
  _checks.check_finite("g", {"a": jnp.ones(3), "i": np.arange(3)})
  with pytest.raises(ValueError, match=r"g\['a'\] holds 2 NaN/inf"):
    _checks.check_finite("g", {"a": jnp.asarray([1.0, jnp.nan, jnp.inf])})
  with pytest.raises(ValueError, match=r"g holds 1 NaN/inf"):
    _checks.check_finite("g", float("nan"))
  seen = []

  def f(x):
    _checks.check_finite("x", x)  # skipped for tracers
    seen.append(_checks.is_concrete(x))
    return x

  jax.jit(f)(jnp.asarray([jnp.nan]))
  assert seen == [False] and _checks.is_concrete(jnp.ones(1)) and _checks.is_concrete(1.0)
  _checks.check_rank("x", np.ones((2, 3)), 2)
  _checks.check_rank("x", np.ones(3), (1, 2))
  _checks.check_rank("x", np.ones((2, 2)), (1, 2))
  with pytest.raises(ValueError, match=r"x must have rank 1 or 2, got shape \(1, 1, 1\)"):
    _checks.check_rank("x", np.ones((1, 1, 1)), (1, 2))
  _checks.check_bool("flag", True)
  _checks.check_bool("flag", np.bool_(False))
  for bad in (1, 0.0, "yes", np.array([True]), None):
    with pytest.raises(TypeError, match="flag must be a bool"):
      _checks.check_bool("flag", bad)


# ----------------------------------------------------------------------------------------------------
# comm.distributed.initialize_from_flags


def _flags(argv):
  from absl import flags
  fv = flags.FlagValues()
  dist.define_flags(fv)
  fv(["prog", *argv])
  return fv


def test_initialize_from_flags_reads_each_flag_and_checks_them():
  info = dist.initialize_from_flags(_flags([]))
  assert (info.process_index, info.process_count, info.coordinator_address) == (0, 1, None)
  assert info.device_count == jax.device_count() and info.local_device_count == jax.local_device_count()
  # Each flag reaches initialize (its checks fire with the flag's value), none of them joins a cluster.
  with pytest.raises(ValueError, match="num_processes=3 needs coordinator_address"):
    dist.initialize_from_flags(_flags(["--num_processes=3", "--process_id=1"]))
  with pytest.raises(ValueError, match=r"process_id must lie in \[0, num_processes\) = \[0, 2\), got 2"):
    dist.initialize_from_flags(_flags(["--num_processes=2", "--process_id=2",
                                       "--coordinator_address=127.0.0.1:1234"]))
  with pytest.raises(ValueError, match="coordinator_address must look like 'host:port'"):
    dist.initialize_from_flags(_flags(["--num_processes=2", "--coordinator_address=nohostport"]))
  with pytest.raises(ValueError, match="initialization_timeout must lie in"):
    dist.initialize_from_flags(_flags(["--num_processes=2", "--coordinator_address=127.0.0.1:1234",
                                       "--initialization_timeout=0"]))
  # kwargs reach initialize too.
  with pytest.raises(ValueError, match="cpu_collectives must be one of"):
    dist.initialize_from_flags(_flags(["--num_processes=2", "--coordinator_address=127.0.0.1:1234"]),
                               cpu_collectives="nccl")


def test_initialize_from_flags_bad_flag_values():
  from absl import flags
  with pytest.raises(TypeError, match="flag_values must be an absl.flags.FlagValues"):
    dist.initialize_from_flags({"num_processes": 1})
  with pytest.raises(ValueError, match="not defined on flag_values; call .*define_flags"):
    dist.initialize_from_flags(flags.FlagValues())
  fv = flags.FlagValues()
  dist.define_flags(fv)
  with pytest.raises(ValueError, match="has not been parsed yet"):
    dist.initialize_from_flags(fv)
  with pytest.raises(ValueError, match=r"\['num_processes'\] come from the flags"):
    dist.initialize_from_flags(_flags([]), num_processes=2)


# ----------------------------------------------------------------------------------------------------
# cost.hlo attribute parsers and cost.graph kernel nodes/bytes


def test_int_list_parse_window_backend_tiles():
  assert hlo_lib.int_list("{1,0}") == [1, 0]
  assert hlo_lib.int_list('["-1","2"]') == [-1, 2]
  assert hlo_lib.int_list("{}") == [] and hlo_lib.int_list(None) == [] and hlo_lib.int_list("") == []
  with pytest.raises(TypeError, match="value must be an HLO attribute value"):
    hlo_lib.int_list([1, 0])
  w = hlo_lib.parse_window("{size=3x3 stride=2x1 pad=1_1x0_2 lhs_dilate=1x1 rhs_dilate=2x2}")
  assert w == {"size": [3, 3], "stride": [2, 1], "pad": [2, 2], "lhs_dilate": [1, 1], "rhs_dilate": [2, 2]}
  assert hlo_lib.parse_window("size=2 pad=-1_3") == {"size": [2], "pad": [2]}
  assert hlo_lib.parse_window(None) == {} and hlo_lib.parse_window("") == {}
  for bad in ("{size=3xq}", "{size}", "{pad=1_x}", "{=3}"):
    with pytest.raises(ValueError, match="is not 'key=AxB...' with integer fields"):
      hlo_lib.parse_window(bad)
  with pytest.raises(TypeError):
    hlo_lib.parse_window({"size": [3]})
  cfg = ('{"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_gemm","triton_gemm_config":'
         '{"block_m":"64","block_n":"128","block_k":"32","split_k":"1","num_stages":"3","num_warps":4,'
         '"num_ctas": 1}}}')
  assert hlo_lib.backend_tiles(cfg) == {"block_m": 64.0, "block_n": 128.0, "block_k": 32.0, "split_k": 1.0,
                                        "num_stages": 3.0, "num_warps": 4.0, "num_ctas": 1.0,
                                        "kind:__triton_gemm": 1.0}
  assert hlo_lib.backend_tiles('{"kind":"kLoop"}') == {"kind:kLoop": 1.0}
  assert hlo_lib.backend_tiles(None) == {} and hlo_lib.backend_tiles("{}") == {}
  with pytest.raises(TypeError):
    hlo_lib.backend_tiles(b'{"block_m":"64"}')


def test_parse_window_reads_xla_windows_as_written_by_lax():
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 1), [(1, 1), (0, 2)], rhs_dilation=(2, 1),
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  pool = lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 2, 1), (1, 2, 2, 1),
                                         [(0, 0), (1, 1), (0, 1), (0, 0)])
  found = {}
  for fn, args in ((conv, (jnp.ones((1, 9, 9, 2)), jnp.ones((3, 3, 2, 4)))), (pool, (jnp.ones((1, 8, 8, 2)),))):
    mod = hlo_lib.parse_hlo(jax.jit(fn).lower(*args).compile().as_text())
    for comp in mod.computations.values():
      for ins in comp.instructions:
        if "window" in ins.attrs:
          found[ins.opcode] = hlo_lib.parse_window(ins.attrs["window"])
  assert found["convolution"]["size"] == [3, 3] and found["convolution"]["stride"] == [2, 1]
  assert found["convolution"]["pad"] == [1 + 1, 0 + 2] and found["convolution"]["rhs_dilate"] == [2, 1]
  assert found["reduce-window"] == {"size": [1, 3, 2, 1], "stride": [1, 2, 2, 1], "pad": [0, 2, 1, 0]}


def _module():
  fn = lambda x, y: jnp.tanh(x @ y) + jnp.sum(y)
  return hlo_lib.parse_hlo(jax.jit(fn).lower(jnp.ones((8, 4)), jnp.ones((4, 4))).compile().as_text())


def test_kernel_nodes_and_io_bytes_match_entry_instructions():
  mod = _module()
  g = graph_lib.program_graph(mod)
  entry = mod.entry.instructions
  names = mod.entry.by_name()
  # Reference straight from the parsed module: entry instructions that launch a kernel, and the bytes
  # of their operands plus their output.
  want_mask = np.asarray([ins.opcode not in graph_lib.TRIVIAL for ins in entry])
  want_bytes = np.asarray([ins.shape.num_bytes + sum(names[o].shape.num_bytes for o in ins.operands)
                           if ins.opcode not in graph_lib.TRIVIAL else 0.0 for ins in entry])
  mask = graph_lib.kernel_nodes(g)
  io = graph_lib.kernel_io_bytes(g)
  n_entry = len(entry)
  assert g.opcode.shape[0] > n_entry  # fused computations are inlined after the entry rows
  assert mask.dtype == bool and io.dtype == np.float64 and io.shape == mask.shape == g.opcode.shape
  np.testing.assert_array_equal(mask[:n_entry], want_mask)
  assert not mask[n_entry:].any() and np.all(io[n_entry:] == 0)
  np.testing.assert_array_equal(io[:n_entry], want_bytes)
  assert want_mask.sum() >= 2 and want_bytes.sum() > 0
  assert io.sum() == sum(k["bytes"] for k in graph_lib.kernel_costs(mod))
  # Batched and padded: padding nodes are no kernels, and the bytes are unchanged.
  k1 = graph_lib.kernel_graphs(mod)[0][1]
  b = graph_lib.pad_graph(graph_lib.batch_graphs([g, k1]), int(g.n_node[0] + k1.n_node[0]) + 5,
                          int(g.n_edge[0] + k1.n_edge[0]) + 3, int(g.n_kernel[0] + k1.n_kernel[0]) + 1, 3)
  bm, bio = graph_lib.kernel_nodes(b), graph_lib.kernel_io_bytes(b)
  assert bm.sum() == mask.sum() + graph_lib.kernel_nodes(k1).sum() and not bm[-5:].any()
  assert bio.sum() == io.sum() + graph_lib.kernel_io_bytes(k1).sum()


def test_kernel_nodes_bad_input():
  g = graph_lib.program_graph(_module())
  for fn in (graph_lib.kernel_nodes, graph_lib.kernel_io_bytes):
    with pytest.raises(TypeError, match="g must be an HloGraph"):
      fn(tuple(g))
    with pytest.raises(ValueError, match="g is inconsistent"):
      fn(g._replace(attrs=g.attrs[:, :5]))
    with pytest.raises(ValueError, match="g is inconsistent"):
      fn(g._replace(num_bytes=g.num_bytes[:-1]))


# ----------------------------------------------------------------------------------------------------
# cost.value: valid_actions, beam_schedule, out_of_distribution; cost.value_ios.stage_features

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)


@pytest.fixture(scope="module")
def net():
  """Units: 0 = conv(x), 1 = conv(x) (mergeable with 0), 2 = conv(unit 0), 3 = concat(2, 1)."""
  w1, w2, w3 = jnp.full((3, 3, 2, 2), 0.1), jnp.full((3, 3, 2, 2), 0.2), jnp.full((1, 1, 2, 2), 0.3)

  def f(x):
    a = _conv(x, w1)
    b = _conv(x, w2)
    return jnp.concatenate([_conv(a, w3), b], -1)

  g = sched.build_graph(f, jnp.ones((1, 4, 4, 2)))
  assert [sorted(u.preds) for u in g.units] == [[], [], [0], [1, 2]] and g.blocks == [[0, 1, 2, 3]]
  return g


def _place(g, st, u, action):
  return V.apply_action(st, u, action, 0)


def _all_final_states(g, r=3, s=8):
  def rec(st):
    if st.step == len(st.order):
      return [st]
    u = st.order[st.step]
    return [f for a in V.valid_actions(g, st, u, r, s) for f in rec(_place(g, st, u, a))]
  return rec(V.initial_state(g))


def test_valid_actions_hand_cases(net):
  g = net
  st0 = V.initial_state(g)
  assert V.valid_actions(g, st0, 0) == [("new", -1, -1)]
  st1 = _place(g, st0, 0, ("new", -1, -1))
  # Unit 1 has no predecessor: a stage before stage 0, joining unit 0's group, a concurrent group, or a
  # merge with the convolution unit 0 (same input and window).
  assert V.valid_actions(g, st1, 1) == [("new", -1, -1), ("new", 0, -1), ("group", 0, 0), ("par", 0, -1),
                                        ("merge", 0, -1)]
  assert V.valid_actions(g, st1, 1, r=1) == [("new", -1, -1), ("new", 0, -1), ("par", 0, -1), ("merge", 0, -1)]
  assert V.valid_actions(g, st1, 1, s=1) == [("new", -1, -1), ("new", 0, -1), ("group", 0, 0), ("merge", 0, -1)]
  assert V.valid_actions(g, st1, 1, merge_key=lambda u: None) == [("new", -1, -1), ("new", 0, -1),
                                                                   ("group", 0, 0), ("par", 0, -1)]
  # Unit 2 depends on unit 0: no stage before it; in stage 0 it may only follow unit 0 in its group.
  st2 = _place(g, st1, 1, ("par", 0, -1))
  assert V.valid_actions(g, st2, 2) == [("new", -1, -1), ("group", 0, 0)]
  # After a merge stage {0, 1}, unit 2 (a successor) cannot join it.
  st2m = _place(g, st1, 1, ("merge", 0, -1))
  assert V.valid_actions(g, st2m, 2) == [("new", -1, -1)]
  # With unit 1 in its own stage 1 after stage 0, unit 2 may go before stage 1 or into it.
  st2n = _place(g, st1, 1, ("new", -1, -1))
  assert V.valid_actions(g, st2n, 2) == [("new", -1, -1), ("new", 1, -1), ("group", 0, 0), ("group", 1, 0),
                                         ("par", 1, -1)]


def test_valid_actions_every_completion_is_a_valid_schedule(net):
  finals = _all_final_states(net)
  assert len({tuple(V.to_stages(s)) for s in finals}) == len(finals) >= 15
  for s in finals:
    _check_cover(net, V.to_stages(s))
  for r in (1, 2):  # r bounds the group length, s the groups per stage (merge stages: neither)
    finals_r = _all_final_states(net, r=r, s=1)
    assert len(finals_r) < len(finals)
    for s in finals_r:
      par = [st for st in V.to_stages(s) if st.kind == "parallel"]
      assert all(len(grp) <= r for st in par for grp in st.groups) and all(len(st.groups) == 1 for st in par)


def test_valid_actions_numpy_ints_and_bool_refused(net):
  # s21 review: valid_actions checks its ints with one chained test on the common path (it runs per
  # decision of every rollout); numpy integers still take the named checks and pass, bools are refused
  st1 = _place(net, V.initial_state(net), 0, ("new", -1, -1))
  assert V.valid_actions(net, st1, np.int64(1), np.int32(3), np.int64(8)) == V.valid_actions(net, st1, 1, 3, 8)
  with pytest.raises(TypeError, match="r must be an integer"):
    V.valid_actions(net, st1, 1, r=True)
  with pytest.raises(ValueError, match="unit 0 is already placed"):
    V.valid_actions(net, st1, np.int64(0))


def test_valid_actions_bad_input(net):
  st1 = _place(net, V.initial_state(net), 0, ("new", -1, -1))
  with pytest.raises(ValueError, match="unit 0 is already placed"):
    V.valid_actions(net, st1, 0)
  with pytest.raises(ValueError, match=r"u must be an integer in \[0, 3\]"):
    V.valid_actions(net, st1, 4)
  with pytest.raises(TypeError, match="u must be an integer"):
    V.valid_actions(net, st1, 1.0)
  for kw in ({"r": 0}, {"s": 0}, {"max_merge": 1}):
    with pytest.raises(ValueError, match=next(iter(kw))):
      V.valid_actions(net, st1, 1, **kw)


@pytest.fixture(scope="module")
def model(net):
  info = V.graph_info(net)
  vocab = {k: i + 1 for i, k in enumerate(sorted(set(info.kinds)))}
  module = V.ValueLSTM(vocab=len(vocab), hidden=8, embed=4)
  x = np.zeros((1, 4, V.NUM_FEATURES), np.float32)
  # Random parameters of the right shapes (an untrained model is enough to test decoding; eval_shape
  # avoids the slow eager initialization of the LSTM).
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), np.ones((1, 4), np.int32), x,
                          np.asarray([4], np.int32))
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(0.0, 0.5, a.shape), a.dtype), shapes)
  return V.ValueModel(module, params, vocab, info.static.min(0), info.static.max(0), 3, 8)


def _scores(model, info, states):
  """Reference scorer: each state's feature sequence alone in a row of an [8, 8] batch (the other rows
  and steps zero, masked by the lengths)."""
  ids = [model.vocab.get(k, 0) for k in info.kinds]
  out = []
  for st in states:
    x = np.zeros((8, 8, V.NUM_FEATURES), np.float32)
    k = np.zeros((8, 8), np.int32)
    x[0, :len(ids)] = V.state_features(info, st)
    k[0, :len(ids)] = ids
    out.append(float(V.predict(model, k, x, np.asarray([len(ids)] + [1] * 7, np.int32))[0]))
  return np.asarray(out)


def test_beam_schedule_exhaustive_and_greedy_match_brute_force(net, model):
  info = V.graph_info(net)
  finals = _all_final_states(net)
  ref = _scores(model, info, finals)
  assert np.min(np.diff(np.sort(ref))) > 1e-6  # the random model separates every schedule
  # A beam wider than any step's candidates is exhaustive: every complete schedule, sorted by score.
  beam = V.beam_schedule(model, net, width=100, info=info)
  assert len(beam) == len(finals)
  by_stages = {tuple(V.to_stages(s)): v for s, v in zip(finals, ref)}
  got = [p for p, _ in beam]
  assert got == sorted(got)
  np.testing.assert_allclose(got, [by_stages[tuple(V.to_stages(s))] for _, s in beam], rtol=0, atol=1e-5)
  np.testing.assert_allclose(got, np.sort(ref), rtol=0, atol=1e-5)
  # width=k keeps k states, best first, each a complete valid schedule.
  top = V.beam_schedule(model, net, width=3)
  assert len(top) == 3 and [p for p, _ in top] == sorted(p for p, _ in top)
  for _, s in top:
    assert s.step == len(net.units)
    _check_cover(net, V.to_stages(s))
  # width=1 is greedy: each unit takes the successor with the lowest predicted value.
  st = V.initial_state(net)
  for u in st.order:
    cands = [_place(net, st, u, a) for a in V.valid_actions(net, st, u, model.r, model.s)]
    st = cands[int(np.argmin(_scores(model, info, cands)))] if len(cands) > 1 else cands[0]
  (p1, s1), = V.beam_schedule(model, net, width=1)
  assert V.to_stages(s1) == V.to_stages(st)
  assert abs(p1 - _scores(model, info, [st])[0]) < 1e-5


def test_beam_schedule_bad_input(net, model):
  other = sched.build_graph(lambda x: jnp.tanh(x) * 2.0, jnp.ones((2, 2)))
  # A one-unit graph has a single candidate at its only step: the final state is still scored.
  (p, st), = V.beam_schedule(model, other, 4)
  assert st.step == len(other.units) == 1
  assert abs(p - _scores(model, V.graph_info(other), [st])[0]) < 1e-5 and p != 0.0
  with pytest.raises(ValueError, match="info was built for another graph"):
    V.beam_schedule(model, net, 2, info=V.graph_info(other))
  for w in (0, -1):
    with pytest.raises(ValueError, match="width must be an integer in"):
      V.beam_schedule(model, net, w)
  with pytest.raises(TypeError, match="width must be an integer"):
    V.beam_schedule(model, net, 2.0)


def test_out_of_distribution_flags_unseen_kinds_and_features_outside_margin(net, model):
  info = V.graph_info(net)
  assert V.out_of_distribution(model, info) == []
  conv_only = model._replace(vocab={"conv_general_dilated": 1})
  flagged = V.out_of_distribution(conv_only, info)
  assert flagged == [(3, "kind 'identity' unseen in training")]
  # Feature j of the units: move the training range so that unit order[0] lies 0.05 past it.
  j = 0
  u0 = info.order[0]
  f0 = float(info.static[0, j])
  for margin, expect in ((0.04, True), (0.06, False), (0.0, True)):
    hi = model.feat_hi.astype(np.float64).copy()
    hi[j] = f0 - 0.05
    lo = np.minimum(model.feat_lo.astype(np.float64), hi)
    out = V.out_of_distribution(model._replace(feat_hi=hi, feat_lo=lo), info, margin=margin)
    # Reference: every unit whose feature j exceeds hi + margin.
    want = [(u, f"features [{j}] outside the training range") for jj, u in enumerate(info.order)
            if info.static[jj, j] > hi[j] + margin]
    assert out == want and ((u0, f"features [{j}] outside the training range") in out) == expect
  lo = model.feat_lo.astype(np.float64).copy()
  lo[1] = float(info.static[:, 1].max()) + 0.2
  shifted = model._replace(feat_lo=lo, feat_hi=np.maximum(model.feat_hi, lo))
  out = V.out_of_distribution(shifted, info)
  assert [u for u, _ in out] == list(info.order) and all("[1]" in r for _, r in out)
  # One reason per unit: an unseen kind is reported alone.
  out = V.out_of_distribution(shifted._replace(vocab={"conv_general_dilated": 1}), info)
  assert [u for u, _ in out] == list(info.order) and out[-1] == (3, "kind 'identity' unseen in training")
  with pytest.raises(ValueError, match="margin must lie in"):
    V.out_of_distribution(model, info, margin=-0.1)
  with pytest.raises(ValueError, match="margin must be finite"):
    V.out_of_distribution(model, info, margin=float("nan"))
  with pytest.raises(ValueError, match=r"model.feat_lo must have shape \(9,\)"):
    V.out_of_distribution(model._replace(feat_lo=np.zeros(3)), info)


def test_collect_states_keeps_merged_and_grouped_states_apart(net):
  # Regression (session 21): merging unit 1 into unit 0's stage and chaining it after unit 0 in the same
  # group give states with the same unit positions (stage 0, group 0) but different schedules and costs;
  # targets were keyed by the positions alone, so both got the cheaper one's target and one of them was
  # dropped from the training data.
  def policy(how):
    return lambda state, u, acts: next((a for a in acts if a[0] == how), acts[0]) if u == 1 else acts[0]

  cost = lambda g, st: 1.0 if st.kind == "merge" else float(len(st.units))
  info = V.graph_info(net)
  data, best = V.collect_states([info], cost, 2, policies=[policy("merge"), policy("group")])
  (_, merged), (_, grouped) = (V.rollout(info, policy(h), 3, 8) for h in ("merge", "group"))
  assert [st.kind for st in V.to_stages(merged)][0] == "merge" and V.to_stages(grouped)[0].groups == ((0, 1),)
  c_merge, c_group = (V.schedule_cost(net, V.to_stages(f), cost) for f in (merged, grouped))
  assert (c_merge, c_group) == (3.0, 4.0)
  # 2 shared prefix states (empty, unit 0 placed) + 3 of each rollout, each with its own best completion.
  assert len(data.target) == 8
  np.testing.assert_allclose(sorted(data.target), np.log([3.0] * 5 + [4.0] * 3))
  merge_flag = V.NUM_STATIC + 1
  for f, t in zip(data.feats, data.target):
    if f[:, merge_flag].any():  # a state holding the merge stage
      assert t == math.log(3.0)


def test_stage_features_match_hand_built_rows(net):
  g = net
  static = V.static_features(g)
  fb = np.asarray([g.unit_flops_bytes(u.idx) for u in g.units], np.float64)
  for st in (sched.Stage("parallel", ((0, 2), (1,))), sched.Stage("merge", ((1, 0),))):
    units = [u for grp in st.groups for u in grp]
    rows = []
    for gi, grp in enumerate(st.groups):
      for pos, u in enumerate(grp):
        rows.append([1.0, float(st.kind == "merge"), len(units) / 8, len(st.groups) / 8, len(grp) / 3, pos / 3,
                     0.0, float(gi == 0 and pos == 0), math.log1p(fb[units, 0].sum()) / 25,
                     math.log1p(fb[units, 1].sum()) / 20])
    want = np.concatenate([static[units], np.asarray(rows)], axis=1)
    got = value_ios.stage_features(g, st)
    assert got.shape == (len(units), V.NUM_FEATURES) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(value_ios.stage_features(g, st, static, fb), got)


def test_stage_features_bad_input(net):
  with pytest.raises(TypeError, match="st must be a mlsys_jax.sched.Stage"):
    value_ios.stage_features(net, ((0,),))
  with pytest.raises(ValueError, match=r"stage units \[7\] are not unit indices of g \(0..3\)"):
    value_ios.stage_features(net, sched.Stage("parallel", ((0, 7),)))
  with pytest.raises(ValueError, match="repeats a unit"):
    value_ios.stage_features(net, sched.Stage("parallel", ((0,), (0,))))
  with pytest.raises(ValueError, match="has no units"):
    value_ios.stage_features(net, sched.Stage("parallel", ()))
  with pytest.raises(ValueError, match=r"static must be value.static_features\(g\) with shape \(4, 9\)"):
    value_ios.stage_features(net, sched.Stage("parallel", ((0,),)), np.zeros((3, 9)))
  with pytest.raises(ValueError, match=r"fb must hold \(FLOPs, bytes\) per unit of g, shape \(4, 2\)"):
    value_ios.stage_features(net, sched.Stage("parallel", ((0,),)), None, np.zeros((4, 3)))


# ----------------------------------------------------------------------------------------------------
# profile.overhead.calibrate_micro


def test_calibrate_micro_follows_its_formula():
  n, repeats = 30, 2
  try:
    cal = overhead.calibrate_micro(n=n, repeats=repeats, clock="process")
  except RuntimeError as e:  # no jax.profiler trace on this machine (the profiler warned); see the next test
    if "recorded no 'trace' events" not in str(e):
      raise
    pytest.skip(str(e))
  assert cal.clock == "process" and set(cal.delta_ns) == set(cal.raw_delta_ns) == {"scope", "intercept", "trace"}
  assert set(cal.wall_s) == {"scope:off", "scope:scopes", "intercept:scopes", "intercept:intercept",
                             "trace:intercept", "trace:trace"}
  assert all(len(v) == repeats and min(v) > 0 for v in cal.wall_s.values())
  # Each loop emits exactly n events of its source (the trace loop: >= 2 per scoped call).
  assert cal.counts["scope:scopes"] == {"scope": n, "intercept": 0, "trace": 0}
  assert cal.counts["intercept:intercept"] == {"scope": 0, "intercept": n, "trace": 0}
  c = cal.counts["trace:trace"]
  assert c["scope"] == n and c["intercept"] == n and c["trace"] >= 2 * n
  # delta_k = (min T_hi - min T_lo) * 1e9 / n_k, clamped at 0 (other sources run equally often here).
  for src, lo, hi in (("scope", "off", "scopes"), ("intercept", "scopes", "intercept"), ("trace", "intercept", "trace")):
    want = (min(cal.wall_s[f"{src}:{hi}"]) - min(cal.wall_s[f"{src}:{lo}"])) * 1e9 / cal.counts[f"{src}:{hi}"][src]
    assert math.isclose(cal.raw_delta_ns[src], want, rel_tol=1e-9, abs_tol=1e-6)
    assert cal.delta_ns[src] == max(0.0, cal.raw_delta_ns[src])


def _fake_run_levels(loops):
  """A stand-in for overhead.run_levels: ``loops[(lo, hi)] = (times lo, times hi, counts lo, counts hi)``."""
  def run(work, levels, repeats, warmup, clock):
    t_lo, t_hi, c_lo, c_hi = loops[tuple(levels)]
    lo, hi = levels
    return {lo: list(t_lo), hi: list(t_hi)}, {lo: dict(c_lo), hi: dict(c_hi)}, {}
  return run


def test_calibrate_micro_formula_clamp_and_correction_on_fixed_timings(monkeypatch):
  # The loops' timings are replaced by fixed numbers, so the formula is checked exactly: differences of
  # minima, per event of the added source, minus the calibrated cost of extra events of other sources,
  # clamped at 0 in delta_ns.
  z = {"scope": 0, "intercept": 0, "trace": 0}
  loops = {("off", "scopes"): ([1.2, 1.0], [1.5, 1.9], z, dict(z, scope=5)),
           ("scopes", "intercept"): ([1.5, 1.6], [0.9, 1.7], z, dict(z, intercept=5)),
           ("intercept", "trace"): ([0.9, 1.0], [2.0, 3.0], dict(z, scope=5, intercept=5),
                                    dict(z, scope=7, intercept=5, trace=20))}
  monkeypatch.setattr(overhead, "run_levels", _fake_run_levels(loops))
  cal = overhead.calibrate_micro(n=5, repeats=2)
  d_scope = (1.5 - 1.0) * 1e9 / 5  # 1e8 ns
  d_int = (0.9 - 1.5) * 1e9 / 5  # negative: clamped
  d_trace = ((2.0 - 0.9) - (7 - 5) * d_scope * 1e-9) * 1e9 / 20  # 2 extra scope events in the traced run
  for k, v in (("scope", d_scope), ("intercept", d_int), ("trace", d_trace)):
    assert math.isclose(cal.raw_delta_ns[k], v, rel_tol=1e-9)
    assert cal.delta_ns[k] == max(0.0, cal.raw_delta_ns[k])
  assert cal.delta_ns["intercept"] == 0.0 and cal.wall_s["trace:intercept"] == [0.9, 1.0]
  # A loop without events of its source (e.g. no jax.profiler trace on this machine) is an error.
  lo_t, hi_t, c_lo, c_hi = loops[("intercept", "trace")]
  loops[("intercept", "trace")] = (lo_t, hi_t, c_lo, dict(c_hi, trace=0))
  with pytest.raises(RuntimeError, match="recorded no 'trace' events"):
    overhead.calibrate_micro(n=5, repeats=1)


def test_calibrate_micro_bad_input():
  for kw, err in (({"n": 0}, ValueError), ({"n": 2.0}, TypeError), ({"repeats": 0}, ValueError),
                  ({"clock": "thread"}, ValueError)):
    with pytest.raises(err, match=next(iter(kw))):
      overhead.calibrate_micro(**kw)


# ----------------------------------------------------------------------------------------------------
# profile.workloads: JAX CartPole and Pendulum against the classic-control equations in float64


def _cartpole_ref(s, a):
  """Gym's CartPole-v1 step, written out in float64."""
  g, mc, mp, half_len, fmag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
  x, xd, th, thd, t = (float(v) for v in s)
  f = fmag if a == 1 else -fmag
  total = mc + mp
  tmp = (f + mp * half_len * thd ** 2 * math.sin(th)) / total
  thacc = (g * math.sin(th) - math.cos(th) * tmp) / (half_len * (4 / 3 - mp * math.cos(th) ** 2 / total))
  xacc = tmp - mp * half_len * thacc * math.cos(th) / total
  ns = [x + tau * xd, xd + tau * xacc, th + tau * thd, thd + tau * thacc, t + 1]
  done = abs(ns[0]) > 2.4 or abs(ns[2]) > 12 * math.pi / 180 or ns[4] >= 200
  return np.asarray(ns), done


def _pendulum_ref(s, a):
  """Gym's Pendulum-v1 step (g = 10, m = l = 1, dt = 0.05, torque in {-2, 0, 2}), in float64."""
  th, thd, t = (float(v) for v in s)
  u = (-2.0, 0.0, 2.0)[a]
  th_n = ((th + math.pi) % (2 * math.pi)) - math.pi
  cost = th_n ** 2 + 0.1 * thd ** 2 + 0.001 * u ** 2
  thd2 = min(max(thd + (3 * 10.0 / 2 * math.sin(th) + 3.0 * u) * 0.05, -8.0), 8.0)
  th2 = th + thd2 * 0.05
  return np.asarray([th2, thd2, t + 1]), np.asarray([math.cos(th2), math.sin(th2), thd2]), -cost


def test_cartpole_step_matches_classic_control_equations():
  step = jax.jit(wl.cartpole_step)
  # From rest, a push right: temp = 100/11, thacc = -600/41, xacc = 4400/451 (hand-computed).
  ns, obs, r, done = step(jnp.zeros(5), jnp.int32(1))
  np.testing.assert_allclose(np.asarray(ns), [0.0, 0.02 * 4400 / 451, 0.0, -0.02 * 600 / 41, 1.0], rtol=1e-6)
  for s, a in (([0.1, -0.2, 0.05, 0.3, 7.0], 0), ([-1.0, 0.5, -0.15, -1.2, 0.0], 1),
               ([2.39, 0.8, 0.0, 0.0, 3.0], 1), ([0.0, 0.0, 0.0, 0.0, 199.0], 0)):
    want, want_done = _cartpole_ref(s, a)
    ns, obs, r, done = step(jnp.asarray(s, jnp.float32), jnp.int32(a))
    np.testing.assert_allclose(np.asarray(ns), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(obs), np.asarray(ns)[:4])
    assert float(r) == 1.0 and bool(done) == want_done
  # Batched under vmap.
  nb = jax.jit(jax.vmap(wl.cartpole_step))(jnp.zeros((2, 5)), jnp.asarray([0, 1]))[0]
  np.testing.assert_allclose(np.asarray(nb[:, 1]), [-0.02 * 4400 / 451, 0.02 * 4400 / 451], rtol=1e-6)


def test_pendulum_step_matches_classic_control_equations():
  step = jax.jit(wl.pendulum_step)
  # th = 4 rad normalizes to 4 - 2 pi; thd = 7.95 at th = 0.5 clips at 8 for every torque.
  assert _pendulum_ref([0.5, 7.95, 0.0], 0)[0][1] == 8.0
  for s in ([2.0, -1.5, 3.0], [4.0, 0.5, 0.0], [0.5, 7.95, 199.0], [-0.5, -7.95, 1.0], [math.pi, 0.0, 10.0]):
    for a in range(3):
      want_s, want_obs, want_r = _pendulum_ref(s, a)
      ns, obs, r, done = step(jnp.asarray(s, jnp.float32), jnp.int32(a))
      np.testing.assert_allclose(np.asarray(ns), want_s, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(np.asarray(obs), want_obs, rtol=1e-5, atol=1e-5)
      assert math.isclose(float(r), want_r, rel_tol=1e-5, abs_tol=1e-5)
      assert bool(done) == (want_s[2] >= 200)


def test_resets_draw_the_documented_ranges():
  @jax.jit
  def draw(key):
    keys = jax.random.split(key, 64)
    typed = jax.random.wrap_key_data(keys[5])  # new-style typed keys are accepted too
    return (jax.vmap(wl.cartpole_reset)(keys), jax.vmap(wl.pendulum_reset)(keys), wl.cartpole_reset(keys[3]),
            wl.pendulum_reset(typed))

  cp, pd, cp3, pd_typed = draw(jax.random.PRNGKey(0))
  assert cp.shape == (64, 5) and pd.shape == (64, 3) and pd_typed.shape == (3,)
  assert np.all(np.abs(cp[:, :4]) <= 0.05) and np.all(cp[:, 4] == 0) and np.std(cp[:, :4]) > 0.02
  assert np.all(np.abs(pd[:, 0]) <= math.pi) and np.all(np.abs(pd[:, 1]) <= 1.0) and np.all(pd[:, 2] == 0)
  assert pd[:, 0].min() < -2.0 and pd[:, 0].max() > 2.0  # spans the circle, not only a small range
  assert abs(np.corrcoef(pd[:, 0], pd[:, 1])[0, 1]) < 0.4  # theta and theta_dot drawn independently
  np.testing.assert_array_equal(cp3, cp[3])  # deterministic per key
  assert not np.array_equal(cp[0], cp[1])


def test_env_functions_bad_input():
  for reset in (wl.cartpole_reset, wl.pendulum_reset):
    for bad in (0, np.zeros(2, np.uint32), jax.random.split(jax.random.PRNGKey(0), 2)):
      with pytest.raises(TypeError, match="key must be one PRNG key"):
        reset(bad)
  with pytest.raises(ValueError, match=r"s must be a float state of shape \(5,\)"):
    wl.cartpole_step(jnp.zeros(4), 1)
  with pytest.raises(ValueError, match=r"s must be a float state of shape \(3,\)"):
    wl.pendulum_step(jnp.zeros(5), 1)
  with pytest.raises(ValueError, match=r"s must be a float state"):
    wl.pendulum_step(jnp.zeros(3, jnp.int32), 1)
  with pytest.raises(ValueError, match=r"action a must lie in \[0, 2\), got 2"):
    wl.cartpole_step(jnp.zeros(5), 2)
  with pytest.raises(ValueError, match=r"action a must lie in \[0, 3\), got -1"):
    wl.pendulum_step(jnp.zeros(3), jnp.int32(-1))
  for bad in (1.0, jnp.asarray([1]), True):
    with pytest.raises(TypeError, match="a must be one integer action"):
      wl.pendulum_step(jnp.zeros(3), bad)
  with pytest.raises(ValueError, match=r"shape \(5,\)"):
    jax.jit(wl.cartpole_step)(jnp.zeros(6), jnp.int32(0))  # shapes are checked under jit as well


# ----------------------------------------------------------------------------------------------------
# profile.report


def _attribution():
  table = {("train", "sim"): {"total": 3e9, "simulator": 2e9, "python": 1e9, "cpu_only": 3e9},
           ("eval", "sim"): {"total": 1e9, "python": 1e9, "device": 0.5e9, "overlap": 0.5e9},
           ("train", "nn"): {"total": 2e9, "dispatch": 2e9},
           ("train", "(none)"): {"total": 4e9, "python": 4e9}}
  return Attribution(table, {}, 10_000_000_000, True, "")


def test_table_rows_merge_phases_shares_and_order():
  rows = report.table_rows(_attribution())
  assert [r["operation"] for r in rows] == ["sim", "nn", "(none)"]  # largest first, '(none)' last
  sim = rows[0]
  assert set(sim) == {"operation", "share", *report.COLUMNS}
  assert (sim["total"], sim["simulator"], sim["python"], sim["device"], sim["overlap"]) == (4.0, 2.0, 2.0, 0.5, 0.5)
  assert sim["compile"] == 0.0 and sim["cpu_only"] == 3.0
  assert [r["share"] for r in rows] == [0.4, 0.2, 0.4]
  by_phase = report.table_rows(_attribution(), by_phase=True)
  assert [r["operation"] for r in by_phase] == ["train/sim", "train/nn", "eval/sim", "train/(none)"]
  # A Corrected table reads the same way; an all-zero table has zero shares.
  zero = Corrected({("p", "a"): {"total": 0.0}}, 0.0, 0.0, 0.0)
  assert report.table_rows(zero)[0]["share"] == 0.0
  with pytest.raises(TypeError, match="a must be an Attribution"):
    report.table_rows({("p", "a"): {"total": 1.0}})
  with pytest.raises(TypeError, match="a must be an Attribution"):
    report.table_rows(Corrected({"a": {"total": 1.0}}, 0.0, 0.0, 0.0))


def test_format_table_and_to_jsonable():
  rows = report.table_rows(_attribution())
  text = report.format_table(rows, ("total", "share", "python"))
  lines = text.split("\n")
  assert lines[0] == f"{'operation':<22}{'total':>11}{'share':>11}{'python':>11}"
  assert lines[1] == f"{'sim':<22}{'4000.00':>11}{'40.0%':>11}{'2000.00':>11}"
  assert len(lines) == 4 and not text.endswith("\n")
  assert report.format_table([], ("total",)) == f"{'operation':<22}{'total':>11}"
  with pytest.raises(ValueError, match=r"rows\[0\] lacks column\(s\) \['device'\]"):
    report.format_table([{"operation": "x", "total": 1.0}], ("total", "device"))
  with pytest.raises(TypeError, match="rows must be a list of row dicts"):
    report.format_table({"operation": "x"})
  src = [{"operation": "sim", "total": np.float32(0.5), "share": np.float64(1.0), "n": np.int64(3),
          "d": jnp.asarray(0.25)}]
  out = report.to_jsonable(src)
  assert out == [{"operation": "sim", "total": 0.5, "share": 1.0, "n": 3.0, "d": 0.25}]
  assert all(type(v) is float for k, v in out[0].items() if k != "operation")
  assert isinstance(src[0]["total"], np.float32)  # input untouched
  json.loads(json.dumps(report.to_jsonable(rows), allow_nan=False))
  for bad in ("fast", np.ones(2), None):
    with pytest.raises(ValueError, match=r"rows\[0\]\['total'\] = .* is not a real number"):
      report.to_jsonable([{"operation": "sim", "total": bad}])
  with pytest.raises(ValueError, match=r"lacks column\(s\) \['operation'\]"):
    report.to_jsonable([{"total": 1.0}])


def test_plot_stacked_writes_a_png(tmp_path, monkeypatch):
  pytest.importorskip("matplotlib")
  import matplotlib.pyplot as plt
  figs = []
  close = plt.close
  monkeypatch.setattr(plt, "close", lambda fig: (figs.append(fig), close(fig)))
  rows = report.table_rows(_attribution())
  path = tmp_path / "ops.png"
  report.plot_stacked({"a2c": rows, "dqn": rows[:1]}, str(path), title="t")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
  # One bar per (group, operation) without '(none)', stacked by host category in ms.
  ax, = figs[0].axes
  assert [t.get_text() for t in ax.get_yticklabels()] == ["a2c: sim", "a2c: nn", "dqn: sim"]
  drawn = [rows[0], rows[1], rows[0]]
  bars = ax.patches
  assert len(bars) == len(HOST_CATEGORIES) * 3
  for ci, c in enumerate(HOST_CATEGORIES):
    for i, r in enumerate(drawn):
      left = sum(1e3 * r[c2] for c2 in HOST_CATEGORIES[:ci])
      assert math.isclose(bars[3 * ci + i].get_width(), 1e3 * r[c]) and math.isclose(bars[3 * ci + i].get_x(), left)
  with pytest.raises(ValueError, match="no operation to draw"):
    report.plot_stacked({"a2c": [r for r in rows if r["operation"] == "(none)"]}, str(path))
  with pytest.raises(ValueError, match="does not exist"):
    report.plot_stacked({"a2c": rows}, str(tmp_path / "missing" / "ops.png"))
  with pytest.raises(ValueError, match=r"groups\['a2c'\]\[0\] lacks column"):
    report.plot_stacked({"a2c": [{"operation": "x", "total": 1.0}]}, str(path))
  with pytest.raises(TypeError, match="groups must map a workload name"):
    report.plot_stacked(rows, str(path))


# ----------------------------------------------------------------------------------------------------
# profile.attribution.parse_trace


def _trace(device=True):
  m = lambda name, pid, tid=None, val="": {"ph": "M", "name": name, "pid": pid, "tid": tid, "args": {"name": val}}
  x = lambda name, pid, tid, ts, dur: {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur}
  ev = [m("process_name", 1, val="/host:CPU"), m("thread_name", 1, 10, "python"),
        m("thread_name", 1, 11, "tf_XLACpuClient/0"), m("thread_name", 1, 12, "tf_XLAEigen/3"),
        m("thread_name", 1, 13, "grpc_global_timer"), x("Poll", 1, 13, 400.0, 3.0),
        x("rlscope/step", 1, 10, 100.0, 50.0), x("rlscope/other", 1, 10, 200.5, 10.0),
        x("rlscope/step", 1, 10, 300.0, 40.0), x("PjitFunction(f)", 1, 10, 105.0, 1.0),
        x("fusion.3", 1, 11, 112.0, 10.0), x("ThreadpoolListener::StartRegion", 1, 11, 113.0, 1.0),
        x("SimplifierPass", 1, 12, 120.0, 5.0), x("dot.1", 1, 12, 118.0, 6.0),
        {"ph": "i", "name": "instant", "pid": 1, "tid": 10, "ts": 101.0}]
  if device:
    ev += [m("process_name", 2, val="/device:GPU:0"), x("kernel_a", 2, 7, 110.0, 20.0),
           x("kernel_b", 2, 8, 125.0, 20.0), x("kernel_c", 2, 7, 310.0, 5.0)]
  return {"traceEvents": ev}


_OPS = [Record("operation", "step", 1_000, 51_000, "p"), Record("operation", "other", 101_000, 111_000, "p"),
        Record("operation", "step", 201_000, 241_000, "p")]


def test_parse_trace_aligns_by_median_offset_and_unions_device_time():
  # Offsets (annotation ts * 1e3 - record start): 99_000, 99_500, 99_000 -> median 99_000 ns.
  kinds = []
  dev, host = attr_lib.parse_trace(_trace(), _OPS, kinds)
  assert dev == [(11_000, 46_000), (211_000, 216_000)]  # kernels a and b overlap: one interval
  t = _trace()["traceEvents"]
  xs = [e for e in t if e["ph"] == "X"]
  assert host == sorted(int(e["ts"] * 1e3 - 99_000) for e in xs)
  assert kinds == ["executor", "annotation", "annotation", "annotation", "host_thread", "executor", "executor",
                   "executor", "executor", "device", "device", "device"]
  assert attr_lib.device_intervals(_trace(), _OPS) == dev
  # CPU backend (no /device process): XLA:CPU executor threads, minus markers and compiler passes.
  dev_cpu, host_cpu = attr_lib.parse_trace(_trace(device=False), _OPS)
  assert dev_cpu == [(13_000, 25_000)]  # fusion.3 [13, 23] us and dot.1 [19, 25] us after the offset
  assert len(host_cpu) == 9  # the grpc thread's event is a tracer event, not device time
  # No operations: no alignment, offset 0.
  assert attr_lib.parse_trace(_trace(), [])[0][0] == (110_000, 145_000)


def test_parse_trace_bad_input():
  with pytest.raises(TypeError, match="trace must be a chrome-trace dict with a 'traceEvents' list"):
    attr_lib.parse_trace([], _OPS)
  with pytest.raises(TypeError, match="with keys"):
    attr_lib.parse_trace({"events": []}, _OPS)
  with pytest.raises(TypeError, match="kinds must be None or a list"):
    attr_lib.parse_trace(_trace(), _OPS, kinds=())
  no_ann = {"traceEvents": [e for e in _trace()["traceEvents"] if not e["name"].startswith("rlscope/")]}
  with pytest.raises(ValueError, match="the trace has no operation annotations"):
    attr_lib.parse_trace(no_ann, _OPS)
  with pytest.raises(ValueError, match="no trace annotation matches a recorded operation"):
    attr_lib.parse_trace(_trace(), [Record("operation", "elsewhere", 0, 10, "p")])


# ----------------------------------------------------------------------------------------------------
# stats.bootstrap_ci


def _win(d):
  return 1.0 if d > 0 else 0.5 if d == 0 else 0.0


def test_bootstrap_ci_equals_a_numpy_percentile_bootstrap_with_the_same_seed():
  rng = np.random.default_rng(5)
  a = np.round(rng.normal(0.9, 0.01, 12), 2)  # rounded: some ties
  b = np.round(rng.normal(0.895, 0.01, 12), 2)
  n_boot, level, seed = 300, 0.9, 11
  # Paired: resample trial indices (n_boot x n from default_rng(seed)), P(A > B) per resample.
  idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
  ps = [np.mean([_win(a[i] - b[i]) for i in row]) for row in idx]
  want = np.percentile(ps, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
  got = stats.bootstrap_ci(a, b, n_boot=n_boot, level=level, seed=seed)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
  assert isinstance(got[0], float) and 0 <= got[0] <= got[1] <= 1
  # Unpaired (a 9-trial B): resample A's then B's indices; Mann-Whitney estimate per resample.
  b9 = b[:9]
  r = np.random.default_rng(seed)
  ia, ib = r.integers(0, a.size, size=(n_boot, a.size)), r.integers(0, b9.size, size=(n_boot, b9.size))
  ps = [np.mean([_win(a[i] - b9[j]) for i in ra for j in rb]) for ra, rb in zip(ia, ib)]
  want = np.percentile(ps, [5, 95])
  got = stats.bootstrap_ci(a, b9, n_boot=n_boot, level=level, seed=seed, paired=False)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
  # lower_is_better mirrors the interval: P(B > A) = 1 - P(A > B) on every resample.
  lo, hi = stats.bootstrap_ci(a, b, n_boot=n_boot, level=level, seed=seed, lower_is_better=True)
  lo0, hi0 = stats.bootstrap_ci(a, b, n_boot=n_boot, level=level, seed=seed)
  assert math.isclose(lo, 1 - hi0, abs_tol=1e-12) and math.isclose(hi, 1 - lo0, abs_tol=1e-12)


def test_bootstrap_ci_covers_a_known_probability():
  # d_i ~ N(0.5, 1): P(A > B) = Phi(0.5). A 90% interval must cover it in about 90% of experiments.
  p_true = 0.5 * (1 + math.erf(0.5 / math.sqrt(2)))
  rng = np.random.default_rng(0)
  hits, reps = 0, 300
  for k in range(reps):
    b = rng.normal(0.0, 1.0, 40)
    a = b + rng.normal(0.5, 1.0, 40)
    lo, hi = stats.bootstrap_ci(a, b, n_boot=200, level=0.9, seed=k)
    hits += lo <= p_true <= hi
  assert 0.82 <= hits / reps <= 0.97, hits / reps


def test_bootstrap_ci_bad_input():
  a, b = [0.9, 0.8, 0.7], [0.8, 0.8, 0.6]
  with pytest.raises(ValueError, match=r"n_boot must be an integer in \[100, inf\]"):
    stats.bootstrap_ci(a, b, n_boot=50)
  for lvl in (0.0, 1.0, 1.5):
    with pytest.raises(ValueError, match="level must lie in"):
      stats.bootstrap_ci(a, b, level=lvl)
  with pytest.raises(ValueError, match=r"seed must be an integer in \[0, inf\]"):
    stats.bootstrap_ci(a, b, seed=-1)
  with pytest.raises(TypeError, match="seed must be an integer"):
    stats.bootstrap_ci(a, b, seed=1.5)
  with pytest.raises(ValueError, match="a holds NaN/inf"):
    stats.bootstrap_ci([0.9, float("nan"), 0.7], b)
  with pytest.raises(ValueError, match="paired comparison needs as many trials"):
    stats.bootstrap_ci(a, b[:2])
  with pytest.raises(ValueError, match="b must be a non-empty 1-D sequence"):
    stats.bootstrap_ci(a, [], paired=False)


# s21 review: cost.value's unit -> part map is cached per graph (valid_actions runs once per decision)


def _recorded_rollouts(g, seed, n=6):
  info = V.graph_info(g)
  rng = np.random.default_rng(seed)
  pol = V.random_policy(rng, 0.3)
  log = []

  def rec(state, u, acts):
    a = pol(state, u, acts)
    log.append((u, tuple(acts), a))
    return a

  finals = [V.rollout(info, rec, 3, 8)[1] for _ in range(n)]
  return log, finals


def test_part_map_cache_gives_identical_actions_and_follows_repartitioning(monkeypatch):
  g = sched.build_graph(*V.random_conv_net(3, blocks=3), part_size=4)
  assert len(g.blocks) > 2   # several parts: the part map decides which stages a unit may join
  cached = _recorded_rollouts(g, seed=11)
  assert V._part_of(g) is V._part_of(g)   # built once per graph
  # reference: the map rebuilt from g.blocks on every call (the code before the cache)
  with monkeypatch.context() as m:
    m.setattr(V, "_part_of", lambda gg: {u: i for i, p in enumerate(gg.blocks) for u in p})
    fresh = _recorded_rollouts(g, seed=11)
  assert cached == fresh
  # re-partitioning the graph (a new g.blocks list) rebuilds the map: one part now, other actions
  g.blocks = [[u for p in g.blocks for u in p]]
  assert V._part_of(g) == {u: 0 for u in range(len(g.units))}
  with monkeypatch.context() as m:
    m.setattr(V, "_part_of", lambda gg: {u: i for i, p in enumerate(gg.blocks) for u in p})
    fresh_one = _recorded_rollouts(g, seed=11)
  assert _recorded_rollouts(g, seed=11) == fresh_one and fresh_one[0] != cached[0]
  # the cache does not keep graphs alive, and a freed graph's entry is dropped
  key = id(g)
  del g
  import gc
  gc.collect()
  assert key not in V._PART_CACHE
