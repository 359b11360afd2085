"""Session 40: four defects left over from session 39's review, each test fails on the code before the fix.

1. profile.attribute charged time outside every operation to the LAST phase of the run (phase changes had
   no timestamps); now phase changes are timestamped on the records' clock (Profiler.phase_changes) and
   that time goes to the phase active at that instant (host time, device time and trace events alike).
2. profile.format_table misaligned a row whose operation name is longer than 22 characters.
3. cost.value.apply_action (public: in value.__all__) took any action: an out-of-range group or a stage
   of -1 indexed from the end, a merge into a stage of two groups dropped one, an unknown unit or an
   already placed one was placed (again), a NaN index gave a bare list-index TypeError.
4. comm.sparse.decompress(..., dtype=<narrower float>) emitted JAX's implicit-narrowing FutureWarning.
"""

import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax import profile, sched
from mlsys_jax._compat import shard_map
from mlsys_jax.comm.sparse import SparsePayload, allgather_mean, decompress
from mlsys_jax.cost import value as V
from mlsys_jax.profile import report as R
from mlsys_jax.sched.api import _check_cover

# ------------------------------------------------------------------------------------------------------
# 1. Phases outside operations.


def _phased_run(level):
  """default -> 'warmup' (a device_put and 2 ms outside any operation) -> 'train' (one operation)."""
  with profile.Profiler(level) as p:
    profile.set_phase("warmup")
    profile.device_put(np.ones(4, np.float32))
    profile.spin_ns(2_000_000, clock="wall")
    profile.set_phase("train")
    with profile.operation("step"):
      profile.spin_ns(200_000, clock="wall")
  return p


def test_time_outside_operations_goes_to_the_phase_active_at_that_instant():
  p = _phased_run("intercept")
  (t_w, ph_w), (t_t, ph_t) = p.phase_changes
  assert (ph_w, ph_t) == ("warmup", "train") and p.start_ns <= t_w <= t_t <= p.end_ns
  a = profile.attribute(p)
  none = "(none)"
  step = next(r for r in p.records if r.kind == "operation")
  # Exact, from the timestamps: the run splits at the phase changes and at the operation's bounds.
  assert a.table[("default", none)]["total"] == t_w - p.start_ns
  assert a.table[("warmup", none)]["total"] == t_t - t_w >= 2_000_000
  assert a.table[("train", none)]["total"] == (step.start - t_t) + (p.end_ns - step.end)
  assert a.table[("train", "step")]["total"] == step.end - step.start
  assert sum(r["total"] for r in a.table.values()) == a.wall_ns
  # The device_put outside any operation: its time and its intercept event are warmup's.
  assert a.table[("warmup", none)]["transfer"] > 0
  assert a.counts[("warmup", none)]["intercept"] == 1 and a.counts[("train", none)]["intercept"] == 0
  # Overhead correction keeps the split: each '(none)' row loses only its own events' cost.
  c = profile.correct(a, {"scope": 0.0, "intercept": 1000.0, "trace": 0.0})
  assert c.table[("warmup", none)]["total"] == a.table[("warmup", none)]["total"] - 1000.0
  assert c.table[("train", none)]["total"] == a.table[("train", none)]["total"]


def test_level_off_and_a_phase_set_before_the_run():
  p = profile.Profiler("off")
  p.set_phase("setup")                      # before the run: active from its start
  with p:
    profile.set_phase("a")
    profile.spin_ns(300_000, clock="wall")
    profile.set_phase("b")
  (t0, _), (ta, _), (tb, _) = p.phase_changes
  a = profile.attribute(p)
  assert t0 < p.start_ns and p.records == []
  assert a.table[("setup", "(none)")]["total"] == ta - p.start_ns
  assert a.table[("a", "(none)")]["total"] == tb - ta >= 300_000
  assert a.table[("b", "(none)")]["total"] == p.end_ns - tb
  assert ("default", "(none)") not in a.table


def test_device_time_and_trace_events_outside_operations_follow_the_phase_timestamps():
  # A synthetic trace on the records' clock (offset 0: the annotation starts where the operation does):
  # one kernel in the warmup window and one inside the operation.
  p = _phased_run("scopes")
  (t_w, _), (t_t, _) = p.phase_changes
  step = next(r for r in p.records if r.kind == "operation")
  mid = (t_w + t_t) // 2
  ev = [{"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "name": "rlscope/step", "pid": 1, "tid": 1, "ts": step.start / 1e3,
         "dur": (step.end - step.start) / 1e3},
        {"ph": "X", "name": "kernel", "pid": 2, "tid": 7, "ts": mid / 1e3, "dur": 100.0},
        {"ph": "X", "name": "kernel", "pid": 2, "tid": 7, "ts": step.start / 1e3 + 10, "dur": 50.0}]
  a = profile.attribute(p, {"traceEvents": ev})
  assert a.has_device
  assert a.table[("warmup", "(none)")]["device"] == pytest.approx(100_000, abs=2)
  assert a.table[("train", "(none)")]["device"] == 0
  assert a.table[("train", "step")]["device"] == pytest.approx(50_000, abs=2)
  assert a.counts[("warmup", "(none)")]["trace"] == 1 and a.counts[("train", "(none)")]["trace"] == 0


# ------------------------------------------------------------------------------------------------------
# 2. format_table alignment.


def _spans(line):
  return [(m.start(), m.end()) for m in re.finditer(r"\S+", line)]


@pytest.mark.parametrize("names", [["sim", "x" * 22, "y" * 23, "op_" * 20],
                                   ["a" * 40],
                                   ["short", "b" * 21]])
def test_format_table_columns_stay_aligned_for_any_name_length(names):
  cols = ("total", "share", "python", "a_column_name_longer_than_11")
  rows = [{"operation": n, "total": 0.0125 * (i + 1), "share": 0.5, "python": 1e5 * (i == 1),
           "a_column_name_longer_than_11": 0.001} for i, n in enumerate(names)]
  lines = R.format_table(rows, cols).split("\n")
  assert len(lines) == 1 + len(names)
  assert len({len(line) for line in lines}) == 1, lines          # every line equally wide
  spans = [_spans(line) for line in lines]
  assert all(len(s) == 1 + len(cols) for s in spans), lines       # no two cells ran together
  for s, n in zip(spans[1:], names):
    assert s[0] == (0, len(n))                                    # names left-aligned at column 0
  for j in range(1, 1 + len(cols)):                               # every column right-aligned at one edge
    assert len({s[j][1] for s in spans}) == 1, (j, lines)
  first = min(s[1][0] for s in spans)                             # the name column ends before the numbers
  assert first > max(len(n) for n in names)


def test_format_table_short_names_keep_the_22_and_11_character_layout():
  out = R.format_table([{"operation": "sim", "total": 0.0125, "share": 0.5}], ("total", "share"))
  assert out.split("\n") == [f"{'operation':<22}{'total':>11}{'share':>11}", f"{'sim':<22}{'12.50':>11}{'50.0%':>11}"]


# ------------------------------------------------------------------------------------------------------
# 3. apply_action input checks.


@pytest.fixture(scope="module")
def two_group_state():
  # three independent matmuls: units 0 and 1 side by side in stage 0, unit 2 to place
  g = sched.build_graph(lambda x, w: (x @ w, x @ (2 * w), x @ (3 * w)), jnp.ones((2, 4)), jnp.ones((4, 4)))
  st = V.initial_state(g)
  assert st.order == (0, 1, 2) and g.blocks == [[0, 1, 2]]
  u0, u1, u2 = st.order
  assert ("par", 0, -1) in V.valid_actions(g, V.apply_action(st, u0, ("new", -1, -1), 0), u1)
  st = V.apply_action(V.apply_action(st, u0, ("new", -1, -1), 0), u1, ("par", 0, -1), 0)
  assert st.stages == (("parallel", ((u0,), (u1,)), 0),)
  return g, st, u0, u2


@pytest.mark.parametrize("args, exc, msg", [
    (("merge", 0, -1), ValueError, "a merge would drop units"),        # was: stage 0's group 1 dropped
    (("group", 0, -1), ValueError, "has 2 groups"),                    # was: groups duplicated
    (("group", 0, 2), ValueError, "has 2 groups"),                     # was: IndexError-free garbage
    (("par", -1, -1), ValueError, "does not exist"),                   # was: the last stage
    (("par", 1, -1), ValueError, "does not exist"),                    # was: IndexError
    (("new", 99, -1), ValueError, "new stage goes at the end"),        # was: silently appended
    (("new", -1, 3), ValueError, "has group -1"),
    (("group", math.nan, 0), TypeError, r"action\[1\] \(stage\) must be an integer"),  # was: bare list index
    (("group", 0, 0.0), TypeError, r"action\[2\] \(group\) must be an integer"),      # was: bare slice
    (("new", -1), TypeError, "tuple"),                                 # was: bare unpacking ValueError
    (["new", -1, -1], TypeError, "tuple"),
    (("teleport", 0, 0), ValueError, "unknown action"),
])
def test_apply_action_rejects_malformed_actions(two_group_state, args, exc, msg):
  g, st, _, u2 = two_group_state
  with pytest.raises(exc, match=msg):
    V.apply_action(st, u2, args, 0)


def test_apply_action_rejects_bad_unit_part_and_state(two_group_state):
  g, st, u0, u2 = two_group_state
  with pytest.raises(ValueError, match="already placed"):
    V.apply_action(st, u0, ("new", -1, -1), 0)                        # was: placed twice
  with pytest.raises(ValueError, match="not a unit of this state's graph"):
    V.apply_action(st, len(g.units) + 5, ("new", -1, -1), 0)          # was: placed
  with pytest.raises(ValueError, match="part"):
    V.apply_action(st, u2, ("par", 0, -1), 3)                         # was: joined a stage of part 0
  with pytest.raises(TypeError, match="integer"):
    V.apply_action(st, float(u2), ("new", -1, -1), 0)
  with pytest.raises(TypeError, match="integer"):
    V.apply_action(st, u2, ("new", -1, -1), -0.5)
  with pytest.raises(TypeError, match="State"):
    V.apply_action(tuple(st), u2, ("new", -1, -1), 0)


def test_every_valid_action_is_still_accepted_and_rollouts_stay_valid():
  g = sched.build_graph(*V.random_conv_net(3, blocks=2))
  info = V.graph_info(g)
  part = V._part_of(g)
  seen = set()
  for seed in range(6):
    rng = np.random.default_rng(seed)
    st = V.initial_state(g)
    for u in st.order:
      acts = V.valid_actions(g, st, u)
      nxt = [V.apply_action(st, u, a, part[u]) for a in acts]      # none raises
      seen.update(a[0] for a in acts)
      st = nxt[rng.integers(len(nxt))]
    _check_cover(g, V.to_stages(st))
  states, final = V.rollout(info, V.random_policy(np.random.default_rng(0)), 3, 8)
  _check_cover(g, V.to_stages(final))
  assert {"new", "par"} <= seen


# ------------------------------------------------------------------------------------------------------
# 4. decompress to a narrower dtype.


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("jit", [False, True])
def test_decompress_narrower_dtype_rounds_explicitly_without_warning(dtype, jit):
  values = np.array([1.0 + 2.0 ** -12, -3.14159265, 1e5, 7.0, 123.0], np.float32)  # 1e5 > float16's max
  indices = np.array([4, 0, 6, 0, 0], np.int32)                      # last two slots invalid (count 3)
  p = SparsePayload(jnp.asarray(indices), jnp.asarray(values), jnp.array(3), jnp.array(False))
  f = jax.jit(decompress, static_argnums=(1, 2)) if jit else decompress
  with warnings.catch_warnings():
    warnings.simplefilter("error")                                   # the FutureWarning was raised here
    out = f(p, 8, dtype)
  ref = np.zeros(8, np.dtype(dtype))
  with np.errstate(over="ignore"):
    ref[indices[:3]] = values[:3].astype(np.dtype(dtype))            # each value rounded to dtype
  assert out.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(out), ref)
  if dtype == jnp.float16:
    assert np.isinf(np.asarray(out)[6])                               # beyond float16's range
  assert np.asarray(out, np.float32)[4] != values[0]                  # actually rounded

@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_allgather_mean_narrower_dtype_rounds_explicitly_without_warning(dtype):
  """allgather_mean had decompress's implicit narrowing scatter (a JAX FutureWarning): now the same explicit
  cast, each worker's value rounded to ``dtype`` before the sum (the mean taken in float32 and rounded once to
  ``dtype`` since session 43)."""
  n_dev = 4
  rng = np.random.default_rng(3)
  values = rng.normal(size=(n_dev, 5)).astype(np.float32) * 3
  indices = rng.integers(0, 8, size=(n_dev, 5)).astype(np.int32)
  counts = np.array([5, 3, 0, 2], np.int32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_dev]), ("d",))
  spec = jax.sharding.PartitionSpec("d")

  def body(i, v, c):
    p = SparsePayload(i[0], v[0], c[0], jnp.array(False))
    return allgather_mean(p, 8, "d", dtype)[None]

  f = jax.jit(shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = np.asarray(f(jnp.asarray(indices), jnp.asarray(values), jnp.asarray(counts)))
  assert out.dtype == np.dtype(dtype)
  ref = np.zeros(8, np.float64)
  for d in range(n_dev):
    for j in range(counts[d]):
      ref[indices[d, j]] += float(values[d, j].astype(np.dtype(dtype)))
  np.testing.assert_allclose(out[0].astype(np.float64), ref / n_dev, rtol=2e-2, atol=2e-2)
  assert all(np.array_equal(out[0], out[d]) for d in range(n_dev))  # every replica identical
