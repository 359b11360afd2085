"""Value Learning for IOS schedules: an LSTM value model, greedy/beam decoding, a top-k hybrid.

Steiner, Cummins, He, Leather, "Value Learning for Throughput Optimization of Deep Learning Workloads"
(MLSys 2021; arXiv 2011.14486 "Value Function Based Performance Optimization of Deep Learning
Workloads"), Sec. 3-4: scheduling is a sequence of decisions (an MDP). The state is a partially
scheduled network; the value ``V(s)`` is the runtime of the best completion of ``s``. An LSTM reads the
operators in topological order -- each step gets the operator's features (type, shapes, FLOPs, bytes,
arithmetic intensity) and its current decision, or "undecided" -- and regresses ``log V``. Decoding is
greedy: for each operator in turn take the action whose successor state has the lowest predicted value,
with no runs on the target (here: no stage-cost calls at all).

The decision space here is IOS's (Ding et al., MLSys 2021; :mod:`mlsys_jax.sched`): the units of a part,
in topological order, are each placed either in a new stage at the end, or in an existing stage after
all of their predecessors' stages -- appended to one of its groups (a chain run in order), as a new
concurrent group, or merged with convolutions of the same :func:`~mlsys_jax.sched.emit.merge_key`. Every
decoded schedule passes the schedule checks of :mod:`mlsys_jax.sched.api`.

Training targets (:func:`collect_states`): complete schedules are rolled out (random, then model-greedy
with exploration) and costed with a stage cost function (:class:`~mlsys_jax.sched.AnalyticalCost` on
CPU; the GPU stage profiler would give measured ones); the target of a partial state is the best cost
of the rollouts that pass through it (Monte-Carlo estimate of the best completion).

Operator kinds absent from training, or FLOPs/bytes far outside the training range, are reported in
:attr:`ValueSchedule.ood` and make :attr:`ValueSchedule.confident` False; :func:`hybrid_schedule` then
falls back to the cost function's DP.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from mlsys_jax import sched
  >>> g = sched.build_graph(lambda x: jnp.tanh(x) @ jnp.ones((4, 4)), jnp.ones((2, 4)))
  >>> st = initial_state(g)
  >>> len(valid_actions(g, st, g.blocks[0][0])) >= 1
  True
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax._checks import check_int, check_range
from mlsys_jax.sched import emit
from mlsys_jax.sched.dp import Stage, ios_dp
from mlsys_jax.sched.graph import Graph
# Per-program XLA option choice (issue 24 item 2b) lives in a private module; its API is this one's.
from mlsys_jax.cost._value_options import (COMPILE_DECISIONS, OptionConfig, OptionData, OptionModel,  # noqa: F401
                                           canonical_hlo, choice_metrics, choose, choose_options,
                                           compile_decision_features, fit_option_model, fixed_choice, group_folds,
                                           hybrid_choice, option_data, option_ood, predict_gain,
                                           predict_members)

# ------------------------------------------------------------------------------------------------
# Decision process.

NUM_STATIC = 9
NUM_DECISION = 10
NUM_FEATURES = NUM_STATIC + NUM_DECISION
MAX_STAGE_CANDIDATES = 8


class State(NamedTuple):
  """A partial IOS schedule: ``stages`` is a tuple of ``(kind, groups, part)`` (groups: tuples of unit
  indices), ``where`` a tuple of ``(unit, stage index, group index)`` triples for the units placed so
  far (in decision order), ``step`` the number of units decided, ``order`` the decision order (the
  parts' units, each part topological)."""
  stages: tuple
  where: tuple  # tuple of (unit, stage, group) triples, in decision order
  step: int
  order: tuple


def initial_state(g: Graph) -> State:
  """The empty schedule of ``g`` (every unit undecided)."""
  return State((), (), 0, tuple(u for part in g.blocks for u in part))


def _part_of(g: Graph) -> dict:
  """``unit -> index of its part`` (``g.blocks``), cached per graph: :func:`valid_actions` asks for it
  once per decision of every rollout and beam step, and rebuilding it from all of ``g.blocks`` each
  time cost as much as the rest of the call on large graphs (s21 review). The cache is keyed by the
  graph's identity and checked against the ``g.blocks`` list it was built from, so re-partitioning a
  graph (``g.blocks = sched.partition_blocks(g, n)``) rebuilds it; mutating ``g.blocks`` in place is
  not supported (``graph_info``'s decision order would be stale as well). Callers must not mutate the
  returned dict."""
  ent = _PART_CACHE.get(id(g))
  if ent is not None and ent[0]() is g and ent[1] is g.blocks:
    return ent[2]
  blocks = g.blocks
  part = {u: i for i, p in enumerate(blocks) for u in p}
  key = id(g)
  # the weakref's callback drops the entry when g is freed (before its id can be reused)
  _PART_CACHE[key] = (weakref.ref(g, lambda _, key=key: _PART_CACHE.pop(key, None)), blocks, part)
  return part


_PART_CACHE: dict = {}   # id(graph) -> (weakref to the graph, its blocks list, unit -> part)


def valid_actions(g: Graph, state: State, u: int, r: int = 3, s: int = 8,
                  merge_key: Callable[[int], Any] | None = None, max_merge: int = 8) -> list:
  """The IOS decisions open to unit ``u`` (the next undecided one) in the partial schedule ``state``.

  Value Learning (Steiner et al., MLSys 2021, Sec. 3) treats scheduling as a sequence of decisions, one
  per operator in topological order; here a decision places unit ``u`` in IOS's stage space (Ding et
  al., MLSys 2021, Sec. 4: stages of concurrent groups, each group a chain, or a merge of convolutions
  that share their input). The actions, in this order:

  - ``("new", -1, -1)``: a new stage at the end (always valid, always first);
  - ``("new", p, -1)``: a new stage inserted before stage ``p``, which must come after every stage
    holding a predecessor of ``u`` (at most ``MAX_STAGE_CANDIDATES // 2`` of them);
  - ``("group", k, gi)``: appended to group ``gi`` of parallel stage ``k`` (the group then runs ``u``
    after its current units; allowed when the stage's predecessors of ``u`` all sit in that group and
    the group has fewer than ``r`` units);
  - ``("par", k, -1)``: a new concurrent group of parallel stage ``k`` (no predecessor of ``u`` in
    stage ``k``, fewer than ``s`` groups);
  - ``("merge", k, -1)``: merged with the convolutions of stage ``k`` (same ``merge_key``, no
    predecessor in the stage, fewer than ``max_merge`` units).

  Stages of other parts and opaque units (control flow) never share a stage. Only the first
  ``MAX_STAGE_CANDIDATES`` stages at or after the last predecessor's are considered.

  Args:
    g: the unit graph (:func:`mlsys_jax.sched.build_graph`).
    state: a partial schedule of ``g`` (:func:`initial_state`, then :func:`apply_action`).
    u: the unit to place; it must not be placed in ``state`` yet.
    r, s: IOS's pruning parameters: the longest group (units), the most groups per stage; >= 1.
    merge_key: ``unit -> key`` (None: :func:`mlsys_jax.sched.emit.merge_key`); units with equal,
      non-None keys may merge.
    max_merge: the most units of one merge stage (>= 2).

  Returns:
    A list of action tuples for :func:`apply_action`.

  Raises:
    ValueError/TypeError: ``u`` is not a unit of ``g`` or is already placed; ``r``, ``s`` or
    ``max_merge`` out of range.

  Example:
    >>> from mlsys_jax import sched
    >>> g = sched.build_graph(lambda x: jnp.tanh(x) + jnp.exp(x), jnp.ones((2, 4)))
    >>> valid_actions(g, initial_state(g), g.blocks[0][0])
    [('new', -1, -1)]
  """
  # this runs once per decision of every rollout and beam step: one chained test on the common path
  # (plain ints in range), the named checks only to raise
  if not (type(u) is int and type(r) is int and type(s) is int and type(max_merge) is int
          and 0 <= u < len(g.units) and r >= 1 and s >= 1 and max_merge >= 2):
    check_int("u", u, 0, len(g.units) - 1)
    check_int("r", r, 1)
    check_int("s", s, 1)
    check_int("max_merge", max_merge, 2)
  mk = merge_key if merge_key is not None else (lambda v: emit.merge_key(g, v))
  part = _part_of(g)[u]
  where = {v: (k, gi) for v, k, gi in state.where}
  if u in where:   # a dict look-up, not a scan of state.where
    raise ValueError(f"unit {u} is already placed in state; pass the next undecided unit, "
                     f"state.order[state.step] = {state.order[state.step] if state.step < len(state.order) else None}.")
  preds = [p for p in g.units[u].preds if p in where]
  kmin = 0
  for p in preds:
    kmin = max(kmin, where[p][0])
  acts = [("new", -1, -1)]
  first = next((k for k, st in enumerate(state.stages) if st[2] == part), len(state.stages))
  lo_new = max(first, kmin + 1 if preds else first)
  acts += [("new", p, -1) for p in range(lo_new, len(state.stages))][:MAX_STAGE_CANDIDATES // 2]
  opaque = g.units[u].opaque
  ku = mk(u)
  cands = [k for k in range(max(kmin, first), len(state.stages))][:MAX_STAGE_CANDIDATES]
  for k in cands:
    kind, groups, _ = state.stages[k]
    members = [v for grp in groups for v in grp]
    if opaque or any(g.units[v].opaque for v in members):
      continue
    in_stage = {p for p in preds if where[p][0] == k}
    if kind == "merge":
      if not in_stage and ku is not None and mk(groups[0][0]) == ku and len(members) < max_merge:
        acts.append(("merge", k, -1))
      continue
    for gi, grp in enumerate(groups):
      if in_stage <= set(grp) and len(grp) < r:
        acts.append(("group", k, gi))
    if not in_stage and len(groups) < s:
      acts.append(("par", k, -1))
    if (not in_stage and ku is not None and len(groups) == 1 and len(groups[0]) == 1
        and mk(groups[0][0]) == ku):
      acts.append(("merge", k, -1))
  return acts


_ACTION_KINDS = ("new", "group", "par", "merge")


def _check_action(state: Any, u: Any, action: Any, part: Any) -> None:
  """Raise unless ``action`` is a well-formed IOS decision for unit ``u`` in ``state`` (see apply_action)."""
  if not isinstance(state, State):
    raise TypeError(f"state must be a value.State (initial_state(g), then apply_action), got "
                    f"{type(state).__name__}.")
  if not (type(u) is int and type(part) is int and u >= 0 and part >= 0):  # the named checks only to raise
    check_int("u", u, 0)
    check_int("part", part, 0)
  if u not in state.order:
    raise ValueError(f"unit {u} is not a unit of this state's graph (state.order holds {len(state.order)} "
                     "units); pass a unit of the graph the state was built from.")
  if u in [w[0] for w in state.where]:
    raise ValueError(f"unit {u} is already placed in state; pass the next undecided unit, "
                     f"state.order[state.step] = {state.order[state.step] if state.step < len(state.order) else None}.")
  if not isinstance(action, tuple) or len(action) != 3:
    raise TypeError(f"action must be a (kind, stage, group) tuple from valid_actions, got {action!r}.")
  kind, k, gi = action
  if kind not in _ACTION_KINDS:
    raise ValueError(f"unknown action {action!r}: kind must be one of {_ACTION_KINDS}; take the action from "
                     "valid_actions(g, state, u).")
  if not (type(k) is int and type(gi) is int and k >= -1 and gi >= -1):
    check_int("action[1] (stage)", k, -1)
    check_int("action[2] (group)", gi, -1)
  n = len(state.stages)
  fix = "; take the action from valid_actions(g, state, u)."
  if kind != "group" and gi != -1:
    raise ValueError(f"action {action!r}: a {kind!r} action has group -1 (it names no group){fix}")
  if kind == "new":
    if not (k == -1 or k < n):
      raise ValueError(f"action {action!r}: a new stage goes at the end (-1) or before an existing stage "
                       f"0..{n - 1}, got stage {k}{fix}")
    return
  if not 0 <= k < n:
    raise ValueError(f"action {action!r}: stage {k} does not exist (the state has {n} stages, 0..{n - 1}){fix}")
  sk, groups, p = state.stages[k]
  if p != part:
    raise ValueError(f"action {action!r}: stage {k} holds units of part {p}, not of part {part}; units of "
                     f"different parts never share a stage (pass u's own part){fix}")
  if kind == "merge":
    if not (sk == "merge" or (len(groups) == 1 and len(groups[0]) == 1)):
      raise ValueError(f"action {action!r}: only a merge stage or a parallel stage of one unit can take a merge "
                       f"(stage {k} is {sk} with groups {groups}; a merge would drop units){fix}")
  elif sk != "parallel":
    raise ValueError(f"action {action!r}: stage {k} is a merge stage; only a 'merge' action can join it{fix}")
  elif kind == "group" and not 0 <= gi < len(groups):
    raise ValueError(f"action {action!r}: stage {k} has {len(groups)} groups (0..{len(groups) - 1}), got "
                     f"group {gi}{fix}")


def apply_action(state: State, u: int, action: tuple, part: int) -> State:
  """The state after placing unit ``u`` (of part ``part``) by ``action`` (from :func:`valid_actions`).

  One step of Value Learning's decision process (Steiner et al., MLSys 2021, Sec. 3) over IOS's stage
  space (Ding et al., MLSys 2021, Sec. 4); :func:`valid_actions` lists the actions.

  Args:
    state: a partial schedule (:func:`initial_state`, then this function).
    u: the unit to place: a unit of ``state.order`` not placed yet.
    action: ``(kind, stage, group)``: ``("new", -1, -1)`` (a new stage at the end), ``("new", p, -1)``
      (a new stage before existing stage ``p``), ``("group", k, gi)`` (after the units of group ``gi`` of
      parallel stage ``k``), ``("par", k, -1)`` (a new group of parallel stage ``k``), ``("merge", k, -1)``
      (merged into merge stage ``k``, or into parallel stage ``k`` of one unit).
    part: the index of ``u``'s part (``g.blocks``); a stage joined by ``u`` must hold that part.

  Returns:
    The new :class:`State` (``state`` is not modified).

  Raises:
    TypeError/ValueError: ``state`` is not a :class:`State`; ``u`` is not an unplaced unit of it;
    ``part`` is not an integer >= 0 or differs from the joined stage's; ``action`` is not a 3-tuple of a
    kind and integers (a NaN or float index included), or names a stage or group that does not exist, a
    merge stage for ``group``/``par``, or a merge into a stage of several units. Only the action's form
    against ``state`` is checked: that it respects ``u``'s predecessors and the ``r``/``s`` limits is
    what :func:`valid_actions` guarantees (it needs the graph), so pass one of its actions.

  Example:
    >>> from mlsys_jax import sched
    >>> g = sched.build_graph(lambda x, w: (x @ w, x @ (2 * w)), jnp.ones((2, 4)), jnp.ones((4, 4)))
    >>> st = apply_action(initial_state(g), 0, ("new", -1, -1), 0)
    >>> apply_action(st, 1, ("par", 0, -1), 0).stages      # two independent matmuls side by side
    (('parallel', ((0,), (1,)), 0),)
  """
  _check_action(state, u, action, part)
  kind, k, gi = action
  stages = list(state.stages)
  where = state.where
  if kind == "new" and 0 <= k < len(stages):  # a new stage inserted before stage k
    stages.insert(k, ("parallel", ((u,),), part))
    where = tuple((v, kk + (kk >= k), gg) for v, kk, gg in where)
    gi = 0
  elif kind == "new":
    stages.append(("parallel", ((u,),), part))
    k, gi = len(stages) - 1, 0
  elif kind == "group":
    sk, groups, p = stages[k]
    groups = groups[:gi] + (groups[gi] + (u,),) + groups[gi + 1:]
    stages[k] = (sk, groups, p)
  elif kind == "par":
    sk, groups, p = stages[k]
    stages[k] = (sk, groups + ((u,),), p)
    gi = len(groups)
  elif kind == "merge":
    _, groups, p = stages[k]
    stages[k] = ("merge", (groups[0] + (u,),), p)
    gi = 0
  else:
    raise ValueError(f"unknown action {action!r}")
  if kind == "merge":  # units of the merged stage all sit in group 0
    where = tuple((v, kk, 0 if kk == k else gg) for v, kk, gg in where)
  return State(tuple(stages), where + ((u, k, gi),), state.step + 1, state.order)


def to_stages(state: State) -> list:
  """The :class:`~mlsys_jax.sched.Stage` list of a complete state (a merge of one unit is a parallel
  stage)."""
  out = []
  for kind, groups, _ in state.stages:
    if kind == "merge" and len(groups[0]) < 2:
      kind = "parallel"
    out.append(Stage(kind, tuple(tuple(grp) for grp in groups)))
  return out


def schedule_cost(g: Graph, stages: Sequence[Stage], cost: Callable, memo: dict | None = None) -> float:
  """Sum of stage costs ``cost(g, stage)`` (memoized in ``memo``). A NaN or negative stage cost is
  refused (a NaN total would be taken as the cheapest schedule by ``np.argmin``); ``inf`` is kept."""
  memo = {} if memo is None else memo
  tot = 0.0
  for st in stages:
    if st not in memo:
      c = float(cost(g, st))
      if not c >= 0.0:
        raise ValueError(f"cost(g, {st}) returned {c}; a stage cost must be a non-negative number of seconds "
                         "(or inf for a stage that cannot run). Fix the stage cost function.")
      memo[st] = c
    tot += memo[st]
  return tot


# ------------------------------------------------------------------------------------------------
# Features.

def static_features(g: Graph) -> np.ndarray:
  """float32 [units, NUM_STATIC] in unit order: log FLOPs, log bytes, log arithmetic intensity, log
  output elements, output rank, predecessors, successors, mergeable, first unit of its part."""
  firsts = {part[0] for part in g.blocks if part}
  rows = []
  for u in g.units:
    f, b = g.unit_flops_bytes(u.idx)
    out = [g.avals[v] for v in u.outputs] or [None]
    elems = sum(int(np.prod(a.shape)) for a in out if a is not None)
    rank = max((len(a.shape) for a in out if a is not None), default=0)
    rows.append([math.log1p(f) / 25.0, math.log1p(b) / 20.0, math.log1p(f / max(b, 1.0)) / 5.0,
                 math.log1p(elems) / 15.0, rank / 4.0, len(u.preds) / 4.0, len(u.succs) / 4.0,
                 float(emit.merge_key(g, u.idx) is not None), float(u.idx in firsts)])
  return np.asarray(rows, np.float32).reshape(len(g.units), NUM_STATIC)


def decision_features(g: Graph, state: State, fb: np.ndarray) -> np.ndarray:
  """float32 [units, NUM_DECISION] in decision order: decided, merge stage, stage units/8, stage groups
  /8, group length/3, position in group/3, stage index / stages, first unit of its stage, and the log
  FLOPs and bytes of its stage (``fb``: [units, 2] raw flops, bytes)."""
  n = len(state.order)
  out = np.zeros((n, NUM_DECISION), np.float32)
  pos = {u: i for i, u in enumerate(state.order)}
  ns = max(len(state.stages), 1)
  for k, (kind, groups, _) in enumerate(state.stages):
    members = [v for grp in groups for v in grp]
    sf = float(sum(fb[v, 0] for v in members))
    sb = float(sum(fb[v, 1] for v in members))
    for gi, grp in enumerate(groups):
      for j, v in enumerate(grp):
        out[pos[v]] = [1.0, float(kind == "merge"), len(members) / 8.0, len(groups) / 8.0, len(grp) / 3.0,
                       j / 3.0, k / ns, float(j == 0 and gi == 0), math.log1p(sf) / 25.0,
                       math.log1p(sb) / 20.0]
  return out


@dataclasses.dataclass
class GraphInfo:
  """Per-graph precomputation: static features and kind ids in decision order."""
  graph: Graph
  static: np.ndarray  # [n, NUM_STATIC] decision order
  kinds: list
  fb: np.ndarray  # [units, 2] unit order
  order: tuple


def graph_info(g: Graph) -> GraphInfo:
  """The per-graph inputs of the value model, computed once: static unit features in the decision order,
  unit kinds, per-unit (FLOPs, bytes) and the order itself (the units of ``g`` in topological order)."""
  st = static_features(g)
  order = initial_state(g).order
  fb = np.asarray([g.unit_flops_bytes(u.idx) for u in g.units], np.float64).reshape(len(g.units), 2)
  return GraphInfo(g, st[list(order)], [g.units[u].kind for u in order], fb, order)


def state_features(info: GraphInfo, state: State) -> np.ndarray:
  return np.concatenate([info.static, decision_features(info.graph, state, info.fb)], axis=1)


# ------------------------------------------------------------------------------------------------
# Model.

class ValueLSTM(nn.Module):
  """LSTM over operators in topological order -> predicted log latency of the best completion.

  Each step's output gives a log-contribution ``z_t``; the prediction is ``logsumexp_t z_t + c``, a
  positive sum over operators (latency adds over stages), so longer programs are not extrapolated from
  a single final state.
  """
  vocab: int
  hidden: int = 64
  embed: int = 16

  @nn.compact
  def __call__(self, kind_ids, x, lengths):
    e = nn.Embed(self.vocab + 1, self.embed)(kind_ids)
    h = nn.relu(nn.Dense(self.hidden)(jnp.concatenate([e, x], -1)))
    ys = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(h, seq_lengths=lengths)
    z = nn.Dense(1)(nn.relu(nn.Dense(self.hidden)(jnp.concatenate([ys, h], -1))))[..., 0]
    mask = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
    z = jnp.where(mask, z, -jnp.inf)
    c = self.param("offset", nn.initializers.zeros, ())
    return jax.nn.logsumexp(z, axis=1) + c


class ValueModel(NamedTuple):
  """A trained value model: flax module, parameters, kind vocabulary (kind -> id >= 1, 0 = unseen),
  training range of the static features (``feat_lo``, ``feat_hi``; for out-of-distribution flags) and
  the IOS pruning parameters ``r``, ``s`` its decisions were made under (the target offset is the
  module's ``offset`` parameter)."""
  module: ValueLSTM
  params: Any
  vocab: dict
  feat_lo: np.ndarray
  feat_hi: np.ndarray
  r: int
  s: int


def _pad(seqs: list, ids: list, t: int) -> tuple:
  b = len(seqs)
  x = np.zeros((b, t, NUM_FEATURES), np.float32)
  k = np.zeros((b, t), np.int32)
  ln = np.zeros((b,), np.int32)
  for i, (s_, d) in enumerate(zip(seqs, ids)):
    x[i, :len(s_)] = s_
    k[i, :len(d)] = d
    ln[i] = len(s_)
  return k, x, ln


def _bucket(n: int) -> int:
  return max(8, 1 << (n - 1).bit_length())


_APPLY_CACHE: dict = {}


def predict(model: ValueModel, kind_ids: np.ndarray, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Predicted log latency (log seconds) of a batch of padded state sequences."""
  key = (model.module.vocab, model.module.hidden, model.module.embed)
  fn = _APPLY_CACHE.get(key)
  if fn is None:
    fn = _APPLY_CACHE[key] = jax.jit(model.module.apply)
  return np.asarray(fn(model.params, jnp.asarray(kind_ids), jnp.asarray(x), jnp.asarray(lengths)))


# ------------------------------------------------------------------------------------------------
# Data: rollouts and targets.

class StateData(NamedTuple):
  """Training states: features ([n, NUM_FEATURES] each), kind strings, targets (log seconds of the best
  rollout through the state) and ``keys`` = (graph index, state key = ``State.stages``) to refresh
  targets later."""
  feats: list
  kinds: list
  target: np.ndarray
  keys: list


def _merge_keys(g: Graph) -> Callable:
  """``emit.merge_key(g, u)`` memoised per unit (decoding asks for the same units many times)."""
  return functools.lru_cache(maxsize=None)(lambda u: emit.merge_key(g, u))


def rollout(info: GraphInfo, policy: Callable, r: int, s: int) -> tuple[list, State]:
  """Decide every unit with ``policy(state, u, actions) -> action``; return (states visited incl. the
  final one, final state)."""
  g = info.graph
  part = _part_of(g)
  mk = _merge_keys(g)

  st = initial_state(g)
  states = [st]
  for u in st.order:
    acts = valid_actions(g, st, u, r, s, mk)
    st = apply_action(st, u, policy(st, u, acts), part[u])
    states.append(st)
  return states, st


def demo_policy(g: Graph, stages: Sequence[Stage]) -> Callable:
  """A policy that reproduces ``stages`` (e.g. the DP's schedule) in the decision process: used to add
  the DP's completions (IOS's stage-cost cache) to the training targets. Falls back to a new stage at
  the end where the schedule cannot be followed (r/s limits)."""
  dpos = {}
  for d, st in enumerate(stages):
    for gi, grp in enumerate(st.groups):
      for u in grp:
        dpos[u] = (d, gi, st.kind)
  missing = [u for part in g.blocks for u in part if u not in dpos]
  if missing:
    raise ValueError(f"the demonstration schedule leaves units {missing[:8]} of the graph out; pass a complete "
                     "schedule of this graph (e.g. dp_schedule(g, cost)[0]).")
  mine: dict = {}  # dp stage index -> list of dp group indices in my stage order

  def pol(state, u, acts):
    d, gi, kind = dpos[u]
    ids = [dpos[grp[0]][0] for _, grp_s, _ in state.stages for grp in grp_s[:1]]
    if d in ids:
      k = ids.index(d)
      if kind == "merge":
        want = ("merge", k, -1)
      else:
        groups = state.stages[k][1]
        gis = [dpos[grp[0]][1] for grp in groups]
        want = ("group", k, gis.index(gi)) if gi in gis else ("par", k, -1)
    else:
      p = sum(1 for x in ids if x < d)
      want = ("new", p if p < len(ids) else -1, -1)
    return want if want in acts else acts[0]

  return pol


def random_policy(rng: np.random.Generator, p_new: float = 0.3) -> Callable:
  def pol(state, u, acts):
    if len(acts) == 1 or rng.random() < p_new:
      return acts[0]
    return acts[1 + rng.integers(len(acts) - 1)]
  return pol


def _state_key(st: State) -> tuple:
  """What identifies a partial schedule: its stages (kind, groups, part). ``State.where`` (unit ->
  stage, group) alone does not: a merge of units 0 and 1 and a chain of 1 after 0 place both units in
  stage 0, group 0."""
  return st.stages


def collect_states(infos: Sequence[GraphInfo], cost: Callable, n_rollouts: int, seed: int = 0,
                   policies: Sequence[Callable] | None = None, r: int = 3, s: int = 8,
                   extra: dict | None = None, demos: Sequence[Sequence] | None = None
                   ) -> tuple[StateData, dict]:
  """Roll out ``n_rollouts`` schedules per graph (random policy, or the given ones in turn), cost them
  with ``cost(g, stage)`` and return the prefix states with the best total cost through each (log
  seconds). ``demos[i]`` lists schedules (Stage lists, e.g. the DP's) of graph ``i`` that the first
  rollouts follow (:func:`demo_policy`). ``extra`` (returned, updated) keeps ``{graph index: {prefix key: best cost}}`` across calls
  so later rounds improve earlier targets; a prefix key is the state's ``stages`` (``State.where`` alone
  would not tell a merge stage from a chain of the same units)."""
  check_int("n_rollouts", n_rollouts, low=1)
  if demos is not None and len(demos) != len(infos):
    raise ValueError(f"demos must hold one list of schedules per graph ({len(infos)}), got {len(demos)}; pass "
                     "[] for a graph without demonstrations.")
  rng = np.random.default_rng(seed)
  best = extra if extra is not None else {}
  visits = []
  for gi, info in enumerate(infos):
    memo: dict = {}
    table = best.setdefault(gi, {})
    for j in range(n_rollouts):
      if demos is not None and j < len(demos[gi]):
        pol = demo_policy(info.graph, demos[gi][j])
      elif policies:
        pol = policies[j % len(policies)]
      else:
        pol = random_policy(rng, p_new=rng.uniform(0.1, 0.7))
      states, final = rollout(info, pol, r, s)
      c = schedule_cost(info.graph, to_stages(final), cost, memo)
      if not (math.isfinite(c) and c > 0):
        raise ValueError(f"graph {gi}: a complete schedule costs {c} seconds; the targets are log costs, so every "
                         "schedule's total cost must be finite and positive. Fix the stage cost function.")
      for st in states:
        key = _state_key(st)
        table[key] = min(table.get(key, math.inf), c)
        visits.append((gi, st))
  feats, kinds, tgt, keys = [], [], [], []
  seen = set()
  for gi, st in visits:
    key = _state_key(st)
    if (gi, key) in seen:
      continue
    seen.add((gi, key))
    feats.append(state_features(infos[gi], st))
    kinds.append(infos[gi].kinds)
    tgt.append(math.log(best[gi][key]))
    keys.append((gi, key))
  return StateData(feats, kinds, np.asarray(tgt, np.float64), keys), best


# ------------------------------------------------------------------------------------------------
# Training.

_STEP_CACHE: dict = {}


def _train_step(module: ValueLSTM, opt) -> Callable:
  """One jitted Adam step per model shape (reused across fits: compiling the LSTM's backward pass
  dominates small fits on CPU)."""
  key = (module.vocab, module.hidden, module.embed)
  if key not in _STEP_CACHE:
    def loss_fn(p, k, x, ln, yy):
      return jnp.mean((module.apply(p, k, x, ln) - yy) ** 2)

    @jax.jit
    def step(p, o, k, x, ln, yy):
      loss, grad = jax.value_and_grad(loss_fn)(p, k, x, ln, yy)
      upd, o = opt.update(grad, o, p)
      return optax.apply_updates(p, upd), o, loss

    _STEP_CACHE[key] = step
  return _STEP_CACHE[key]


def _check_state_data(data: StateData) -> None:
  """Raise unless ``data``'s features, kinds and targets agree state by state (``_pad`` zips them, so a
  short list silently dropped states or left them at length 0) and the targets are finite."""
  n = len(data.feats)
  if len(data.kinds) != n or np.shape(data.target) != (n,):
    raise ValueError(f"data must hold one kind list and one target per state: {n} feature arrays, "
                     f"{len(data.kinds)} kind lists, targets of shape {np.shape(data.target)}.")
  for i, (f, ks) in enumerate(zip(data.feats, data.kinds)):
    if np.ndim(f) != 2 or np.shape(f)[1] != NUM_FEATURES or len(f) != len(ks) or len(ks) == 0:
      raise ValueError(f"state {i}: features of shape {np.shape(f)} and {len(ks)} kinds; each state needs "
                       f"[n, {NUM_FEATURES}] features for its n >= 1 operators and one kind per operator.")
  if not np.all(np.isfinite(data.target)):
    raise ValueError(f"data.target holds {int(np.sum(~np.isfinite(data.target)))} non-finite value(s); the "
                     "targets are log seconds of finite, positive costs.")


def fit_value_model(data: StateData, vocab: dict | None = None, *, hidden: int = 64, steps: int = 800,
                    batch: int = 128, lr: float = 3e-3, seed: int = 0, r: int = 3, s: int = 8,
                    init: ValueModel | None = None) -> tuple[ValueModel, list]:
  """Fit :class:`ValueLSTM` to ``data`` by mean squared error of log latency (Adam). Returns (model,
  loss per 50 steps)."""
  check_int("steps", steps, low=1)
  check_int("batch", batch, low=1)
  check_int("hidden", hidden, low=1)
  check_range("lr", lr, low=0.0, low_inclusive=False)
  if not data.feats:
    raise ValueError("fit_value_model needs at least one state; collect_states returned none.")
  _check_state_data(data)
  if vocab is None:
    vocab = {}
    for ks in data.kinds:
      for k in ks:
        vocab.setdefault(k, len(vocab) + 1)
  t = _bucket(max(len(f) for f in data.feats))
  ids = [[vocab.get(k, 0) for k in ks] for ks in data.kinds]
  K, X, L = _pad(data.feats, ids, t)
  y = data.target.astype(np.float32)
  allf = np.concatenate(data.feats, 0)[:, :NUM_STATIC]
  lo, hi = allf.min(0), allf.max(0)
  module = ValueLSTM(vocab=max(vocab.values(), default=0), hidden=hidden)
  if init is not None:
    params = init.params
  else:
    params = module.init(jax.random.PRNGKey(seed), K[:2], X[:2], L[:2])
    params = jax.tree_util.tree_map(lambda a: a, params)
    off = float(np.mean(y) - np.mean(np.log(np.maximum(L, 1))))
    params["params"]["offset"] = jnp.asarray(off, jnp.float32)
  opt = optax.inject_hyperparams(optax.adam)(learning_rate=lr)
  ostate = opt.init(params)
  step = _train_step(module, opt)
  sched_lr = optax.cosine_decay_schedule(lr, steps, 0.05)

  rng = np.random.default_rng(seed)
  losses, run = [], []
  n = len(y)
  for i in range(steps):
    idx = rng.integers(0, n, min(batch, n))
    ostate.hyperparams["learning_rate"] = jnp.asarray(sched_lr(i), jnp.float32)
    params, ostate, loss = step(params, ostate, K[idx], X[idx], L[idx], y[idx])
    run.append(float(loss))
    if (i + 1) % 50 == 0 or i + 1 == steps:
      losses.append(float(np.mean(run)))
      run = []
  if not np.isfinite(losses[-1]):
    raise FloatingPointError(f"value model training diverged (loss {losses[-1]}); lower lr.")
  return ValueModel(module, params, vocab, lo, hi, r, s), losses


# ------------------------------------------------------------------------------------------------
# Decoding.

@dataclasses.dataclass
class ValueSchedule:
  """A decoded schedule: ``stages`` (valid for the graph), the model's ``predicted_s`` latency,
  ``ood`` = [(unit, reason)] for operators unlike the training data, ``confident`` = not ood,
  ``evaluated`` stage-cost calls made (0 for pure greedy), ``search_s`` wall time."""
  stages: list
  predicted_s: float
  ood: list
  evaluated: int
  search_s: float
  cost_s: float | None = None
  fallback: bool = False

  @property
  def confident(self) -> bool:
    return not self.ood


def out_of_distribution(model: ValueModel, info: GraphInfo, margin: float = 0.15) -> list:
  """The units of a graph that the value model was not trained for: a learned model is trusted only
  inside its training distribution (Value Learning, Steiner et al., MLSys 2021, Sec. 5 discusses
  generalization to unseen operators; here such graphs fall back to the cost function's search).

  A unit is flagged when its kind (operator type) is absent from ``model.vocab``, or else when any of
  its static features (:func:`static_features`, scaled to about [0, 1]) lies outside
  ``[feat_lo - margin, feat_hi + margin]``, the training range widened by ``margin`` (strictly
  outside: a feature at the widened bound is in range).

  Args:
    model: a :class:`ValueModel` (its ``vocab``, ``feat_lo``, ``feat_hi``).
    info: :func:`graph_info` of the graph.
    margin: tolerance (feature units, >= 0) around the training range.

  Returns:
    ``[(unit, reason)]`` in decision order; ``reason`` names the unseen kind or the feature indices.

  Raises:
    ValueError: ``margin`` negative or not finite; ``model.feat_lo``/``feat_hi`` not of length
    ``NUM_STATIC``.

  Example (see tests/test_public_api_core.py for a hand-built model).
  """
  check_range("margin", margin, 0.0)
  for name in ("feat_lo", "feat_hi"):
    if np.shape(getattr(model, name)) != (NUM_STATIC,):
      raise ValueError(f"model.{name} must have shape ({NUM_STATIC},) (the static-feature training range), got "
                       f"{np.shape(getattr(model, name))}; build the model with fit_value_model.")
  out = []
  for j, u in enumerate(info.order):
    if info.kinds[j] not in model.vocab:
      out.append((u, f"kind {info.kinds[j]!r} unseen in training"))
      continue
    f = info.static[j]
    bad = np.nonzero((f < model.feat_lo - margin) | (f > model.feat_hi + margin))[0]
    if bad.size:
      out.append((u, f"features {bad.tolist()} outside the training range"))
  return out


def _score(model: ValueModel, info: GraphInfo, states: list) -> np.ndarray:
  ids = [model.vocab.get(k, 0) for k in info.kinds]
  feats = [state_features(info, st) for st in states]
  nb = _bucket(len(feats))  # fixed batch and length buckets: few compilations
  k, x, ln = _pad(feats + feats[:1] * (nb - len(feats)), [ids] * nb, _bucket(len(ids)))
  return predict(model, k, x, ln)[:len(feats)]


def beam_schedule(model: ValueModel, g: Graph, width: int = 1, info: GraphInfo | None = None) -> list:
  """Beam search over the decisions of :func:`valid_actions` guided by the value model.

  Value Learning (Steiner et al., MLSys 2021, Sec. 4) decodes greedily: for each unit in decision
  order, every action is applied and the successor with the lowest predicted value (log latency of the
  best completion) is kept. With ``width > 1`` the ``width`` lowest successors of all states in the beam
  are kept (ties keep the earlier candidate); a step with a single candidate keeps it unscored. With
  ``width`` at least the number of candidates of every step this is exhaustive. No cost-function
  (profiling) calls.

  Args:
    model: a trained :class:`ValueModel` (its ``r``/``s`` bound the actions).
    g: the unit graph to schedule.
    width: beam width (>= 1; 1 is greedy decoding).
    info: :func:`graph_info` of ``g`` when already computed (it must be ``g``'s).

  Returns:
    The final beam, ``[(predicted log latency, complete State)]`` sorted best (lowest) first; at most
    ``width`` entries. :func:`to_stages` turns a state into a schedule.

  Raises:
    ValueError/TypeError: ``width`` not an integer >= 1; ``info`` built for another graph.

  Example (see tests/test_cost_value.py for a trained model).
  """
  check_int("width", width, low=1)
  if info is not None and info.graph is not g:
    raise ValueError("info was built for another graph; pass info=graph_info(g) for this g, or None.")
  info = graph_info(g) if info is None else info
  part = _part_of(g)
  mk = _merge_keys(g)

  beam = [(0.0, initial_state(g))]
  for u in info.order:
    cands = []
    for _, st in beam:
      for a in valid_actions(g, st, u, model.r, model.s, mk):
        cands.append(apply_action(st, u, a, part[u]))
    if len(cands) == 1:
      beam = [(0.0, cands[0])]
      continue
    scores = _score(model, info, cands)
    order = np.argsort(scores, kind="stable")[:width]
    beam = [(float(scores[i]), cands[i]) for i in order]
  final = _score(model, info, [st for _, st in beam])
  return sorted(zip(final.tolist(), [st for _, st in beam]), key=lambda t: t[0])


def greedy_schedule(model: ValueModel, g: Graph) -> ValueSchedule:
  """Greedy decoding (Value Learning Sec. 4): each unit takes the action whose successor state has the
  lowest predicted value. No stage-cost calls; unfamiliar operators are flagged in ``ood``.

  Example (see tests/test_cost_value.py for a trained model)."""
  t0 = time.perf_counter()
  info = graph_info(g)
  (pred, st), *_ = beam_schedule(model, g, 1, info)
  return ValueSchedule(to_stages(st), math.exp(pred), out_of_distribution(model, info), 0,
                       time.perf_counter() - t0)


def dp_schedule(g: Graph, cost: Callable, r: int = 3, s: int = 8) -> tuple[list, float, int]:
  """IOS's DP over every part with ``cost(g, stage)`` (as :func:`mlsys_jax.sched.ios_schedule` does):
  (stages, total cost, distinct stage-cost calls)."""
  memo: dict = {}

  def c(st):
    if st not in memo:
      memo[st] = float(cost(g, st))
    return memo[st]

  succ = {u.idx: u.succs for u in g.units}
  stages, tot = [], 0.0
  for part in g.blocks:
    st, lat = ios_dp(part, succ, c, r=r, s=s, merge_key=lambda u: emit.merge_key(g, u))
    stages.extend(st)
    tot += lat
  return stages, tot, len(memo)


def hybrid_schedule(model: ValueModel, g: Graph, cost: Callable, k: int = 4) -> ValueSchedule:
  """Beam search of width ``k`` with the model, then ``cost`` evaluates only the ``k`` final candidates
  (plus the greedy one and the sequential schedule) and the cheapest is kept. If any operator is out of distribution the
  model is not trusted: the DP with ``cost`` runs instead (``fallback=True``). ``k`` >= 1."""
  check_int("k", k, low=1)
  t0 = time.perf_counter()
  info = graph_info(g)
  ood = out_of_distribution(model, info)
  if ood:
    stages, tot, n = dp_schedule(g, cost, model.r, model.s)
    return ValueSchedule(stages, tot, ood, n, time.perf_counter() - t0, tot, True)
  beam = beam_schedule(model, g, k, info) + (beam_schedule(model, g, 1, info) if k > 1 else [])
  memo: dict = {}
  seq = [Stage("parallel", ((u,),)) for u in info.order]
  cands = [(to_stages(st), p) for p, st in beam] + [(seq, math.nan)]
  costs = [schedule_cost(g, sts, cost, memo) for sts, _ in cands]
  i = int(np.argmin(costs))
  pred = cands[i][1] if np.isfinite(cands[i][1]) else math.log(costs[i])
  return ValueSchedule(cands[i][0], math.exp(pred), [], len(memo), time.perf_counter() - t0, costs[i])


def train_value_model(graphs: Sequence[Graph], cost: Callable, *, rounds: int = 2, rollouts: int = 48,
                      steps: int = 600, hidden: int = 64, seed: int = 0, r: int = 3, s: int = 8,
                      eps: float = 0.2, use_dp: bool = True, verbose: bool = False
                      ) -> tuple[ValueModel, dict]:
  """Rollouts (the DP's schedule under ``cost`` when ``use_dp``, as IOS's stage cache would give, then
  random ones), fit, then ``rounds - 1`` rounds of model-greedy rollouts with ``eps``-random
  actions (their costs improve the targets of states already seen), refitting each round (``steps // 2``
  steps, at least one, from the previous round's parameters).

  Returns (model, stats: states, cost-function rollouts, training seconds, loss curves)."""
  check_int("rounds", rounds, low=1)
  check_range("eps", eps, 0.0, 1.0)
  t0 = time.perf_counter()
  infos = [graph_info(g) for g in graphs]
  demos = [[dp_schedule(g, cost, r, s)[0]] for g in graphs] if use_dp else None
  data, best = collect_states(infos, cost, rollouts, seed, r=r, s=s, demos=demos)
  model, losses = fit_value_model(data, hidden=hidden, steps=steps, seed=seed, r=r, s=s)
  curves = [losses]
  rng = np.random.default_rng(seed + 1)
  for rd in range(1, rounds):
    feats, kinds, keys = list(data.feats), list(data.kinds), list(data.keys)
    for gi, info in enumerate(infos):

      def pol(state, u, acts, info=info):
        if len(acts) == 1:
          return acts[0]
        if rng.random() < eps:
          return acts[rng.integers(len(acts))]
        part = _part_of(info.graph)[u]
        sc = _score(model, info, [apply_action(state, u, a, part) for a in acts])
        return acts[int(np.argmin(sc))]

      tbl = {0: best[gi]}
      new, tbl = collect_states([info], cost, max(2, rollouts // 8), seed + rd, [pol], r=r, s=s,
                                extra=tbl)
      best[gi] = tbl[0]
      feats += new.feats
      kinds += new.kinds
      keys += [(gi, k) for _, k in new.keys]
    # Later rollouts may improve the best completion of states seen earlier: refresh every target.
    data = StateData(feats, kinds, np.asarray([math.log(best[gi][k]) for gi, k in keys]), keys)
    model, losses = fit_value_model(data, model.vocab, hidden=hidden, steps=max(1, steps // 2), seed=seed + rd,
                                    r=r, s=s, init=model)
    curves.append(losses)
    if verbose:
      print(f"value: round {rd + 1}/{rounds}: {len(keys)} states, loss {losses[-1]:.4f}", flush=True)
  return model, {"states": len(data.target), "train_s": time.perf_counter() - t0, "losses": curves}


# ------------------------------------------------------------------------------------------------
# Small conv nets for training and tests.

def random_conv_net(seed: int, blocks: int = 1, hw: int = 9, cin: int = 8,
                    avg_pool: bool = False) -> tuple[Callable, Any]:
  """An Inception-style net of ``blocks`` random blocks (3-5 branches of 1-3 convolutions with 1x1,
  3x3 or 5x5 kernels, 4-16 channels, an optional pooled branch, concatenated), weights closed over as
  constants so that IOS may merge convolutions. Pooled branches max-pool 3x3; with ``avg_pool`` half
  of them (at random) average-pool instead. Returns (fn, example input)."""
  check_int("seed", seed, low=0)
  check_int("blocks", blocks, low=1)
  check_int("hw", hw, low=1)
  check_int("cin", cin, low=1)
  rng = np.random.default_rng(seed)
  dn = ("NHWC", "HWIO", "NHWC")

  def conv_p(ci, k, co):
    w = rng.normal(size=(k, k, ci, co)).astype(np.float32) * np.float32((2.0 / (k * k * ci)) ** 0.5)
    return jnp.asarray(w), jnp.asarray(rng.normal(size=(co,)).astype(np.float32) * 0.01)

  spec = []
  c = cin
  for _ in range(blocks):
    branches = []
    for _ in range(int(rng.integers(3, 6))):
      depth, ci, chain = int(rng.integers(1, 4)), c, []
      for _ in range(depth):
        co = int(rng.choice([4, 8, 12, 16]))
        chain.append(conv_p(ci, int(rng.choice([1, 3, 5])), co))
        ci = co
      pooled = "max" if rng.random() < 0.2 else None
      if pooled and avg_pool and rng.random() < 0.5:
        pooled = "avg"
      branches.append((pooled, chain))
    spec.append(branches)
    c = sum(ch[-1][0].shape[-1] for _, ch in branches)

  def fn(x):
    for branches in spec:
      outs = []
      for pooled, chain in branches:
        if pooled == "max":
          y = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
        elif pooled == "avg":
          y = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME") / 9.0
        else:
          y = x
        for w, b in chain:
          y = jax.nn.relu(jax.lax.conv_general_dilated(y, w, (1, 1), "SAME", dimension_numbers=dn) + b)
        outs.append(y)
      x = jnp.concatenate(outs, axis=-1)
    return x

  return fn, jnp.ones((1, hw, hw, cin), jnp.float32)


__all__ = ["State", "ValueLSTM", "ValueModel", "ValueSchedule", "apply_action", "beam_schedule",
           "collect_states", "dp_schedule", "fit_value_model", "graph_info", "greedy_schedule",
           "hybrid_schedule", "initial_state", "out_of_distribution", "random_conv_net", "schedule_cost", "to_stages",
           "train_value_model", "valid_actions",
           # XLA option choice
           "COMPILE_DECISIONS", "OptionConfig", "OptionData", "OptionModel", "canonical_hlo", "choice_metrics",
           "choose", "choose_options", "compile_decision_features", "fit_option_model", "fixed_choice", "group_folds",
           "hybrid_choice", "option_data", "option_ood", "predict_gain", "predict_members"]
