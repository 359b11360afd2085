"""Learned stage costs for the IOS search: predict instead of profiling, or profile only the top-k.

Steiner, Cummins, He, Leather, "Value Learning for Throughput Optimization of Deep Learning Workloads"
(MLSys 2021), Sec. 3-4: a sequence model over the operators of a (partial) schedule, each step fed the
operator's features and its decision, predicts the schedule's latency, so decisions can be made without
runs on the target. IOS (Ding et al., MLSys 2021, Sec. 4.3) spends its search time profiling candidate
stages. Here the value model of :mod:`mlsys_jax.cost.value` (``ValueLSTM``) is applied to the schedule
made of *one stage*: its operators in the stage's order with their decision features (group, merge,
stage size, stage FLOPs/bytes); its value is that stage's latency. Trained on stages whose latency is
known (the stage profiler's cache, or an analytical model on CPU), it stands in for the profiler:

- ``ios_schedule(fn, x, predictor=p)``: every candidate stage costed by the model (no profiling);
- ``ios_schedule(fn, x, predictor=p, top_k=k)``: the hybrid; each DP state profiles only its k best
  candidates by predicted total (``sched.ios_dp(rank=..., top_k=k)``);
- parts with units unlike the training data (:meth:`StagePredictor.ood`: kind never seen, or static
  features outside the training range) are profiled as without a model, and listed in
  ``Schedule.info["predictor"]``.

Example:
  >>> from mlsys_jax import sched
  >>> from mlsys_jax.cost import value
  >>> g = sched.build_graph(*value.random_conv_net(0))
  >>> st = candidate_stages(g, r=2, s=2)[0]
  >>> stage_features(g, st).shape[1] == value.NUM_FEATURES
  True
"""

from __future__ import annotations

import ast
import math
import time
import weakref
from typing import Any, Callable, Sequence

import numpy as np

from mlsys_jax._checks import check_choice, check_int, check_range
from mlsys_jax.cost import value as V
from mlsys_jax.sched import emit
from mlsys_jax.sched.dp import Stage, ios_dp
from mlsys_jax.sched.graph import Graph


def _state_of(g: Graph, st: Stage) -> V.State:
  part = 0
  groups = tuple(tuple(int(u) for u in grp) for grp in st.groups)
  where = tuple((u, 0, gi) for gi, grp in enumerate(groups) for u in grp)
  return V.State((("merge" if st.kind == "merge" else "parallel", groups, part),), where, len(where),
                 tuple(u for grp in groups for u in grp))


def stage_features(g: Graph, st: Stage, static: np.ndarray | None = None,
                   fb: np.ndarray | None = None) -> np.ndarray:
  """The value model's input for the schedule made of the single stage ``st``: one row per unit.

  Value Learning (Steiner et al., MLSys 2021, Sec. 3.2) feeds its sequence model, per operator, the
  operator's static features and its scheduling decision. For one stage the rows are its units in
  group order (group 0 first, each group in chain order); each row is the unit's
  :func:`~mlsys_jax.cost.value.static_features` followed by its
  :func:`~mlsys_jax.cost.value.decision_features` in a schedule holding ``st`` alone (stage index 0:
  decided, merge flag, stage units / 8, stage groups / 8, group length / 3, position in group / 3, 0,
  first-of-stage flag, log1p(stage FLOPs) / 25, log1p(stage bytes) / 20).

  Args:
    g: the unit graph.
    st: a :class:`~mlsys_jax.sched.Stage` of ``g`` (distinct units of ``g``).
    static: ``value.static_features(g)``, float [units, NUM_STATIC], to skip recomputing it.
    fb: per-unit (FLOPs, bytes), float [units, 2] (``g.unit_flops_bytes``), to skip recomputing it.

  Returns:
    float32 [len(st.units), ``value.NUM_FEATURES``].

  Raises:
    TypeError: ``st`` is not a Stage. ValueError: a unit outside ``g`` or repeated, an empty stage, or
    ``static``/``fb`` of the wrong shape.

  Example:
    >>> from mlsys_jax import sched
    >>> g = sched.build_graph(*V.random_conv_net(0))
    >>> st = candidate_stages(g, r=2, s=2)[0]
    >>> stage_features(g, st).shape == (len(st.units), V.NUM_FEATURES)
    True
  """
  if not isinstance(st, Stage):
    raise TypeError(f"st must be a mlsys_jax.sched.Stage, got {type(st).__name__}.")
  units = [u for grp in st.groups for u in grp]
  n = len(g.units)
  if not units:
    raise ValueError(f"stage {st} has no units; a stage holds at least one unit of g.")
  bad = [u for u in units if isinstance(u, bool) or not isinstance(u, (int, np.integer)) or not 0 <= u < n]
  if bad:
    raise ValueError(f"stage units {bad} are not unit indices of g (0..{n - 1}); was the stage built for "
                     "another graph?")
  if len(set(units)) != len(units):
    raise ValueError(f"stage {st} repeats a unit; each unit appears once in a stage.")
  static = V.static_features(g) if static is None else np.asarray(static)
  if static.shape != (n, V.NUM_STATIC):
    raise ValueError(f"static must be value.static_features(g) with shape ({n}, {V.NUM_STATIC}), got "
                     f"{static.shape}.")
  if fb is None:
    fb = np.asarray([g.unit_flops_bytes(u.idx) for u in g.units], np.float64).reshape(n, 2)
  elif np.shape(fb) != (n, 2):
    raise ValueError(f"fb must hold (FLOPs, bytes) per unit of g, shape ({n}, 2), got {np.shape(fb)}.")
  state = _state_of(g, st)
  return np.concatenate([static[list(state.order)], V.decision_features(g, state, fb)], axis=1)


def candidate_stages(g: Graph, r: int = 3, s: int = 8, strategy: str = "both",
                     merge_kernels: str = "any") -> list:
  """Every distinct stage IOS's DP (:func:`mlsys_jax.sched.ios_dp`) considers for ``g`` under ``r``,
  ``s`` and ``strategy``: the stages a profiler would be asked about (a DP with constant costs visits
  every state, so none is pruned). In the order first asked. ``merge_kernels``: 'any' or 'same' (as
  :func:`mlsys_jax.sched.ios_schedule`)."""
  check_choice("merge_kernels", merge_kernels, ("any", "same"))
  same = merge_kernels == "same"
  mk = (lambda u: emit.merge_key(g, u, same)) if strategy in ("both", "merge") else None
  succ = {u.idx: u.succs for u in g.units}
  asked: dict = {}

  def record(st):
    asked[st] = None
    return 1.0

  for part in g.blocks:
    ios_dp(part, succ, record, r=r, s=s, strategy=strategy, merge_key=mk)
  return list(asked)


def _valid(g: Graph, st: Stage) -> bool:
  return not (len(st.units) > 1 and any(g.units[u].opaque for u in st.units))


class StagePredictor:
  """A learned stage cost ``(graph, Stage) -> seconds`` (the value model on one-stage schedules), for
  ``sched.ios_schedule(..., predictor=...)``.

  Args:
    model: a ``value.ValueModel`` fitted on stage latencies (:func:`fit_stage_model`).
    margin: how far (features scale to about [0, 1]) a unit's static features may lie outside the
      training range before :meth:`ood` flags it.
    batch: stages per model call in :meth:`prefetch`.
    base: None (the model predicts the stage latency) or the stage cost the model was fitted to
      correct (``fit_stage_model(base=...)``, e.g. ``sched.AnalyticalCost()``): the prediction is
      ``base(g, stage) * exp(model)``.

  ``calls`` counts model evaluations (stages predicted), ``predict_s`` their seconds.
  """

  def __init__(self, model: V.ValueModel, margin: float = 0.15, batch: int = 512,
               base: Callable | None = None):
    check_range("margin", margin, low=0.0)
    check_int("batch", batch, low=1)
    if base is not None and not callable(base):
      raise TypeError(f"base must be a stage cost (graph, Stage) -> seconds, got {type(base).__name__}")
    self.model, self.margin, self.batch, self.base = model, float(margin), int(batch), base
    self.calls = 0
    self.predict_s = 0.0
    self._graphs: dict = {}  # id(g) -> (weakref(g), static features, fb, {Stage: seconds})

  def _graph(self, g: Graph):
    ent = self._graphs.get(id(g))
    if ent is None or ent[0]() is not g:
      fb = np.asarray([g.unit_flops_bytes(u.idx) for u in g.units], np.float64).reshape(len(g.units), 2)
      ent = self._graphs[id(g)] = (weakref.ref(g), V.static_features(g), fb, {})
    return ent

  def ood(self, g: Graph) -> list:
    """[(unit, reason)] for units of ``g`` whose kind the model never saw or whose static features lie
    more than ``margin`` outside the training range; predictions for stages of such units are not to
    be trusted (``ios_schedule`` profiles their parts instead)."""
    _, static, _, _ = self._graph(g)
    m, out = self.model, []
    for u in g.units:
      if u.kind not in m.vocab:
        out.append((u.idx, f"kind {u.kind!r} unseen in training"))
        continue
      f = static[u.idx]
      bad = np.nonzero((f < m.feat_lo - self.margin) | (f > m.feat_hi + self.margin))[0]
      if bad.size:
        out.append((u.idx, f"features {bad.tolist()} outside the training range"))
    return out

  def log_predict(self, g: Graph, stages: Sequence[Stage]) -> np.ndarray:
    """Predicted log seconds of ``stages`` (no cache; invalid stages -> inf)."""
    _, static, fb, _ = self._graph(g)
    out = np.full(len(stages), np.inf)
    ok = [i for i, st in enumerate(stages) if _valid(g, st)]
    t0 = time.perf_counter()
    for c0 in range(0, len(ok), self.batch):
      idx = ok[c0:c0 + self.batch]
      ref = None if self.base is None else [self._base(g, stages[i]) for i in idx]
      feats = [stage_features(g, stages[i], static, fb) for i in idx]
      ids = [[self.model.vocab.get(g.units[u].kind, 0) for grp in stages[i].groups for u in grp]
             for i in idx]
      nb = V._bucket(len(feats)) if len(feats) < self.batch else self.batch  # few compiled shapes
      pad = nb - len(feats)
      k, x, ln = V._pad(feats + feats[:1] * pad, ids + ids[:1] * pad, V._bucket(max(len(f) for f in feats)))
      out[idx] = V.predict(self.model, k, x, ln)[:len(feats)]
      if ref is not None:
        out[idx] += np.log(ref)
      self.calls += len(feats)
    self.predict_s += time.perf_counter() - t0
    return out

  def _base(self, g: Graph, st: Stage) -> float:
    """``base(g, st)``, at least 1e-30 (a zero-cost stage); NaN or negative is refused (it was turned
    into inf, or into a stage that costs nothing)."""
    c = float(self.base(g, st))
    if not c >= 0.0:
      raise ValueError(f"base(g, {st}) returned {c}; the base stage cost must be a non-negative number of "
                       "seconds. Fix the base cost function.")
    return max(c, 1e-30)

  def prefetch(self, g: Graph, stages: Sequence[Stage]) -> int:
    """Predict the not-yet-cached ``stages`` in batches; returns how many were predicted."""
    cache = self._graph(g)[3]
    todo = list(dict.fromkeys(st for st in stages if st not in cache))
    if todo:
      for st, lp in zip(todo, self.log_predict(g, todo)):
        cache[st] = float(math.exp(lp)) if np.isfinite(lp) else math.inf
    return len(todo)

  def __call__(self, g: Graph, st: Stage) -> float:
    cache = self._graph(g)[3]
    if st not in cache:
      self.prefetch(g, [st])
    return cache[st]


def stage_examples(graphs: Sequence[Graph], cost: Callable, *, r: int = 3, s: int = 8,
                   strategy: str = "both", max_per_graph: int | None = None, seed: int = 0) -> list:
  """Training examples ``(graph, stage, seconds)``: the candidate stages of each graph
  (:func:`candidate_stages`; at most ``max_per_graph`` of them, drawn at random) costed with
  ``cost(graph, stage)``; stages of infinite or non-positive cost are left out (NaN as well).
  ``max_per_graph``: None (all) or >= 1."""
  if max_per_graph is not None:
    check_int("max_per_graph", max_per_graph, low=1)
  rng = np.random.default_rng(seed)
  out = []
  for g in graphs:
    cands = candidate_stages(g, r, s, strategy)
    if max_per_graph is not None and len(cands) > max_per_graph:
      cands = [cands[i] for i in sorted(rng.choice(len(cands), max_per_graph, replace=False))]
    for st in cands:
      c = float(cost(g, st))
      if math.isfinite(c) and c > 0:
        out.append((g, st, c))
  return out


def fit_stage_model(examples: Sequence[tuple], *, hidden: int = 64, steps: int = 600, lr: float = 3e-3,
                    seed: int = 0, margin: float = 0.15, base: Callable | None = None
                    ) -> tuple[StagePredictor, dict]:
  """Fit the value model (``value.ValueLSTM``) to the log latency of one-stage schedules.

  Args:
    examples: ``(graph, Stage, seconds)`` triples (:func:`stage_examples`, or measured stage costs
      from a profiler cache, :func:`stage_costs_from_cache`).
    hidden, steps, lr, seed: model width and Adam schedule (``value.fit_value_model``).
    margin: out-of-distribution margin of the returned predictor.
    base: None, or a stage cost ``(graph, Stage) -> seconds`` (e.g. ``sched.AnalyticalCost()``) whose
      error the model learns: targets ``log(seconds / base)``, predictions ``base * exp(model)``.

  Returns:
    (``StagePredictor``, stats: examples, training seconds, loss curve).
  """
  if not examples:
    raise ValueError("fit_stage_model needs at least one (graph, stage, seconds) example")
  check_range("margin", margin, low=0.0)   # before training, not after it
  bad = next((i for i, e in enumerate(examples) if not (isinstance(e, (tuple, list)) and len(e) == 3)), None)
  if bad is not None:
    e = examples[bad]
    what = f"a {len(e)}-tuple" if isinstance(e, (tuple, list)) else f"a {type(e).__name__}"
    raise ValueError(f"examples[{bad}] is {what}; each example is a (graph, Stage, seconds) triple "
                     "(stage_examples returns them).")
  t0 = time.perf_counter()
  statics: dict = {}
  feats, kinds, tgt = [], [], []
  for g, st, sec in examples:
    if not (isinstance(sec, (int, float, np.integer, np.floating)) and not isinstance(sec, bool)
            and math.isfinite(sec) and sec > 0):
      raise ValueError(f"stage latency must be a finite positive number of seconds, got {sec!r}")
    if id(g) not in statics:
      fb = np.asarray([g.unit_flops_bytes(u.idx) for u in g.units], np.float64).reshape(len(g.units), 2)
      statics[id(g)] = (V.static_features(g), fb)
    feats.append(stage_features(g, st, *statics[id(g)]))
    kinds.append([g.units[u].kind for grp in st.groups for u in grp])
    ref = 1.0 if base is None else float(base(g, st))
    if not (math.isfinite(ref) and ref > 0):
      raise ValueError(f"base cost of stage {st} is {ref}; it must be finite and positive")
    tgt.append(math.log(sec / ref))
  data = V.StateData(feats, kinds, np.asarray(tgt), list(range(len(tgt))))
  model, losses = V.fit_value_model(data, hidden=hidden, steps=steps, lr=lr, seed=seed)
  return StagePredictor(model, margin, base=base), {"examples": len(tgt), "train_s": time.perf_counter() - t0,
                                         "losses": losses}


_SAVE_FORMAT = "mlsys_jax.cost.value_ios.StagePredictor/1"


def _is_default_analytical(base: Any) -> bool:
  """Whether ``base`` is a ``sched.AnalyticalCost`` with default arguments (what ``load_predictor``
  rebuilds for ``base='analytical'``)."""
  from mlsys_jax.sched import AnalyticalCost
  if type(base) is not AnalyticalCost:
    return False
  ref = AnalyticalCost()
  return all(getattr(base, a) == getattr(ref, a) for a in ("peak", "bw", "launch", "sat", "merge_launch", "serial"))


def save_predictor(path: str, p: StagePredictor, base: str | None = None) -> None:
  """Write a fitted :class:`StagePredictor` to ``path`` (an ``.npz``: parameters as arrays, vocabulary,
  training feature range and module sizes as JSON), so a model fitted on one machine (CPU) can be used
  for the search on another (GPU). ``base``: ``None`` or ``"analytical"`` (``sched.AnalyticalCost()``
  with default arguments), the stage cost the model corrects; it must match ``p.base``.

  Example:
    >>> import tempfile, os
    >>> from mlsys_jax import sched
    >>> from mlsys_jax.cost import value
    >>> g = sched.build_graph(*value.random_conv_net(0))
    >>> ex = stage_examples([g], sched.AnalyticalCost(), r=2, s=2, max_per_graph=20)
    >>> p, _ = fit_stage_model(ex, hidden=8, steps=2)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "p.npz")
    >>> save_predictor(path, p)
    >>> q = load_predictor(path)
    >>> st = ex[0][1]
    >>> bool(np.isclose(q(g, st), p(g, st), rtol=1e-5))
    True
    >>> tmp.cleanup()
  """
  import json
  import jax
  if (base is None) != (p.base is None):
    raise ValueError(f"save_predictor: base={base!r} but the predictor's base is {p.base!r}; pass "
                     "base='analytical' for a model fitted with base=sched.AnalyticalCost().")
  if base not in (None, "analytical"):
    raise ValueError(f"save_predictor: base must be None or 'analytical', got {base!r}")
  if base == "analytical" and not _is_default_analytical(p.base):
    raise ValueError(f"save_predictor: base='analytical' is loaded as sched.AnalyticalCost() with default "
                     f"arguments, but the predictor's base is {p.base!r} (other parameters or another cost); "
                     "its predictions would change on loading. Fit with base=sched.AnalyticalCost().")
  m = p.model
  leaves, treedef = jax.tree_util.tree_flatten_with_path(m.params)
  arrays = {f"p{i}": np.asarray(v) for i, (_, v) in enumerate(leaves)}
  names = [jax.tree_util.keystr(k) for k, _ in leaves]
  meta = {"format": _SAVE_FORMAT, "names": names, "vocab": m.vocab, "hidden": m.module.hidden,
          "embed": m.module.embed, "vocab_size": m.module.vocab, "r": m.r, "s": m.s,
          "margin": p.margin, "batch": p.batch, "base": base}
  with open(path, "wb") as fh:
    np.savez_compressed(fh, meta=np.asarray(json.dumps(meta)), feat_lo=np.asarray(m.feat_lo),
                        feat_hi=np.asarray(m.feat_hi), **arrays)


def load_predictor(path: str) -> StagePredictor:
  """Read a predictor written by :func:`save_predictor` (parameters are matched by name to a freshly
  initialised ``value.ValueLSTM`` of the saved sizes, so a changed module fails loudly)."""
  import json
  import jax
  import jax.numpy as jnp
  with np.load(path, allow_pickle=False) as z:
    meta = json.loads(str(z["meta"]))
    if meta.get("format") != _SAVE_FORMAT:
      raise ValueError(f"{path!r} is not a saved StagePredictor (format {meta.get('format')!r}).")
    arrays = {k: z[k] for k in z.files}
  module = V.ValueLSTM(vocab=int(meta["vocab_size"]), hidden=int(meta["hidden"]), embed=int(meta["embed"]))
  t = 8
  ref = module.init(jax.random.PRNGKey(0), jnp.zeros((1, t), jnp.int32),
                    jnp.zeros((1, t, V.NUM_FEATURES), jnp.float32), jnp.ones((1,), jnp.int32))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(ref)
  names = [jax.tree_util.keystr(k) for k, _ in leaves]
  if names != meta["names"]:
    raise ValueError(f"{path!r}: saved parameters {meta['names']} do not match this ValueLSTM's {names}.")
  vals = []
  for i, (_, v) in enumerate(leaves):
    a = arrays[f"p{i}"]
    if a.shape != np.shape(v):
      raise ValueError(f"{path!r}: parameter {names[i]} has shape {a.shape}, expected {np.shape(v)}.")
    vals.append(jnp.asarray(a))
  params = jax.tree_util.tree_unflatten(treedef, vals)
  model = V.ValueModel(module, params, {str(k): int(v) for k, v in meta["vocab"].items()},
                       arrays["feat_lo"], arrays["feat_hi"], int(meta["r"]), int(meta["s"]))
  base = None
  if meta["base"] == "analytical":
    from mlsys_jax.sched import AnalyticalCost
    base = AnalyticalCost()
  return StagePredictor(model, float(meta["margin"]), int(meta["batch"]), base=base)


def stage_costs_from_cache(cache: dict, g: Graph) -> dict:
  """Measured stage latencies of graph ``g`` in a ``sched.StageProfiler`` cache (the dict its JSON file
  holds): ``{Stage: seconds}`` for every alias entry of ``g``'s fingerprint (any device, options, K;
  entries of stages built without the fused epilogue are skipped). With several entries for a stage
  the last one wins.

  Example:
    >>> from mlsys_jax import sched
    >>> g = sched.build_graph(lambda x: x @ jnp.ones((4, 4)), jnp.ones((2, 4)))
    >>> cache = {f"alias|cpu|[]|{g.fingerprint()}|plain|5|parallel|((0,),)": "abc", "abc": 1.5e-6}
    >>> stage_costs_from_cache(cache, g)
    {Stage(kind='parallel', groups=((0,),)): 1.5e-06}
  """
  fp = g.fingerprint()
  out = {}
  for key, ref in cache.items():
    if not key.startswith("alias|") or key.endswith("|unfused"):
      continue
    fields = key.split("|")
    if len(fields) < 6 or fields[-5] != fp or ref not in cache:
      continue
    groups = ast.literal_eval(fields[-1])
    st = Stage(fields[-2], tuple(tuple(int(u) for u in grp) for grp in groups))
    if not st.units or not all(0 <= u < len(g.units) for u in st.units):
      raise ValueError(f"cache entry {key!r} names units outside the graph ({len(g.units)} units)")
    if st.kind not in ("parallel", "merge"):
      raise ValueError(f"cache entry {key!r} has stage kind {st.kind!r}, not 'parallel' or 'merge'; is it a "
                       "StageProfiler cache?")
    sec = float(cache[ref])
    if not (math.isfinite(sec) and sec > 0):
      raise ValueError(f"cache entry {ref!r} (for {key!r}) holds latency {sec}; measured latencies are finite "
                       "and positive. Remove the entry or re-profile the stage.")
    out[st] = sec
  return out


_PROGRAM_INFO = ("fuse_epilogue", "keep_alive", "s", "compiler_options", "embed_consts")


def shared_programs(schedules: dict) -> dict:
  """Which schedules of ONE function emit the same program: ``{name: name of the first schedule (in the
  dict's order) with the same program}`` (a schedule maps to itself when it is the first of its kind).

  Two schedules share a program when their graphs have the same fingerprint and they have the same
  stages in the same order, emission, program choice (``Schedule.program``) and the ``info`` settings
  the emitted program reads (fused epilogues, keep-alive, ``s``, compiler options, embedded weights).
  An experiment that times several searches' results compiles each distinct program once (on NasNet-A
  under IOS-Merge every search returns the same 365 single-unit stages, and one emitted program takes
  tens of seconds to compile on a GPU). The schedules must come from one function with the same
  weights: the fingerprint describes the graph's structure, not the weights' values.

  Example:
    >>> from mlsys_jax import sched
    >>> f, x = lambda x: jnp.tanh(x) * 2.0 + 1.0, jnp.ones((4, 4))
    >>> a = sched.ios_schedule(f, x, strategy="merge", emission="plain", check="off")
    >>> b = sched.ios_schedule(f, x, strategy="merge", emission="plain", check="off")
    >>> shared_programs({"a": a, "b": b})
    {'a': 'a', 'b': 'a'}
  """
  if not isinstance(schedules, dict):
    raise TypeError(f"schedules must be a dict of name -> sched.Schedule, got {type(schedules).__name__}")
  first: dict = {}
  out = {}
  for name, sc in schedules.items():
    if not all(hasattr(sc, a) for a in ("graph", "stages", "emission", "info", "program")):
      raise TypeError(f"schedules[{name!r}] is not a sched.Schedule (got {type(sc).__name__})")
    info = tuple((k, repr(sc.info.get(k))) for k in _PROGRAM_INFO)
    key = (sc.graph.fingerprint(), sc.emission, sc.program, tuple(sc.stages), info)
    out[name] = first.setdefault(key, name)
  return out


__all__ = ["StagePredictor", "candidate_stages", "fit_stage_model", "load_predictor", "save_predictor",
           "shared_programs", "stage_costs_from_cache", "stage_examples", "stage_features"]
