"""``ios_schedule``: IOS (Ding et al., "IOS: Inter-Operator Scheduler for CNN Acceleration", MLSys 2021)
on jaxprs: trace -> unit graph -> per-part dynamic program -> one jitted function.

Weights are *static*: schedule a function that closes over them, e.g.
``ios_schedule(lambda x: model.apply(variables, x), x)``; or name the static positional arguments with
``static_argnums`` (their example values are then baked in, and the scheduled function takes only the
remaining arguments). Closed-over arrays are constants, so weight-only computation is hoisted and
merged kernels are precomputed once.

Example:
  >>> import jax, jax.numpy as jnp
  >>> w1, w2 = jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))
  >>> def f(x):
  ...   c = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
  ...                                             dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ...   return jax.nn.relu(c(w1)) + c(w2)
  >>> sched = ios_schedule(f, jnp.ones((1, 8, 8, 4)))
  >>> bool(jnp.allclose(sched(jnp.ones((1, 8, 8, 4))), f(jnp.ones((1, 8, 8, 4)))))
  True
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import jax
import jax.numpy as jnp

from mlsys_jax.sched import emit
from mlsys_jax.sched.cost import AnalyticalCost, StageProfiler, time_calls
from mlsys_jax.sched.dp import Stage, ios_dp
from mlsys_jax.sched.graph import Graph, build_graph, relayout_conv_kernels, summarize_graph
from mlsys_jax.sched.xla import CHECK_CONFIGS, XLA_CONFIGS, check_configs

SCHEMA = "mlsys_jax.sched.ios/1"


def _bind_static(fn, example_args, static_argnums):
  static_argnums = tuple(sorted(set(int(i) for i in static_argnums)))
  for i in static_argnums:
    if not -len(example_args) <= i < len(example_args):
      raise ValueError(f"static_argnums entry {i} out of range for {len(example_args)} arguments")
  static_argnums = tuple(i % len(example_args) for i in static_argnums)
  if not static_argnums:
    return fn, tuple(example_args)
  static_vals = {i: example_args[i] for i in static_argnums}
  dyn = tuple(a for i, a in enumerate(example_args) if i not in static_vals)

  def bound(*dargs):
    it = iter(dargs)
    full = [static_vals[i] if i in static_vals else next(it) for i in range(len(example_args))]
    return fn(*full)

  return bound, dyn


@dataclasses.dataclass
class Schedule:
  """An IOS schedule of a traced function and its emitted program.

  Attributes:
    graph: the unit graph (``mlsys_jax.sched.graph.Graph``).
    stages: list of ``Stage`` in execution order.
    stage_latency: predicted latency of each stage (seconds, from the cost model used in the search).
    emission: 'cuda_graph', 'cuda_graph_lhs', 'streams' or 'plain' (see ``mlsys_jax.sched.emit``).
    search_s: seconds spent in the search (graph + DP + profiling).
    info: extra numbers (r, s, strategy, profiler hits/misses, measured latencies once ``measure`` ran,
      and ``info["check"]``: the never-slower check's method, times and choice, see :func:`ios_schedule`).

  Example:
    >>> w1, w2 = jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))
    >>> conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> sched = ios_schedule(lambda x: jax.nn.relu(conv(x, w1)) + conv(x, w2), jnp.ones((1, 8, 8, 4)))
    >>> [(st.kind, st.groups) for st in sched.stages]      # both convs read x: merged into one conv
    [('merge', ((0, 1),)), ('parallel', ((2,),))]
    >>> sched.counts()["merged_units"], sched.program
    (2, 'ios')
  """
  graph: Graph
  stages: list
  stage_latency: list
  emission: str = "cuda_graph"
  search_s: float = 0.0
  info: dict = dataclasses.field(default_factory=dict)
  _jitted: Any = None
  _consts: Any = None
  _fn: Any = None            # the unscheduled function (static arguments bound): the fallback program
  _xla: Any = None

  @property
  def program(self) -> str:
    """'ios' when calls run the emitted schedule, 'xla' when the never-slower check found the unscheduled
    function faster under ``info['check']['xla_config']`` (calls then run that program)."""
    return self.info.get("check", {}).get("choice", "ios")

  def _xla_program(self):
    if self._xla is None:
      if self._fn is None:
        raise ValueError("this schedule chose the unscheduled XLA program but holds no function; rebuild it "
                         "with Schedule.from_json(text, fn, *example_args)")
      opts = XLA_CONFIGS[self.info["check"]["xla_config"]]
      self._xla = jax.jit(self._fn, compiler_options=opts or None)
    return self._xla

  # ------------------------------------------------------------------ running
  def _build(self):
    if self._jitted is None:
      merges = emit.prepare_merges(self.graph, self.stages,
                                   fuse_epilogue=self.info.get("fuse_epilogue", True))
      g = self.graph
      merged_units = {u for st in self.stages if st.kind == "merge" for u in st.units}
      used = {o for o in g.out_ids if isinstance(o, int) and o in g.consts}
      for u in g.units:
        for ei in u.eqns:
          if u.idx in merged_units and ei == u.anchor:
            continue  # its kernel is part of the merged kernel
          used.update(v for v in g.eqns[ei].inputs if isinstance(v, int) and v in g.consts)
      consts = {k: v for k, v in g.consts.items() if k in used}  # only what the program reads
      next_id = max(list(self.graph.avals) + list(consts) + [0]) + 1
      merges_ids = {}
      for i, (kernel, params, ranges, epi) in merges.items():
        consts[next_id] = kernel
        merges_ids[i] = (next_id, params, ranges, epi)
        next_id += 1
      run = emit.make_program(self.graph, self.stages, self.emission, merges_ids,
                              keep_alive=self.info.get("keep_alive", False))
      opts = {**emit.compiler_options(self.emission, self.info.get("s", 8)),
              **self.info.get("compiler_options", {})}
      if self.info.get("embed_consts", True):
        # weights as compile-time constants, as XLA sees them in ``jax.jit(lambda x: f(w, x))``: no
        # per-call argument handling for ~200 weight arrays (~0.1-0.3 ms of host time per call at
        # batch 1, more than the whole GPU program in bf16) and layouts fixed at compile time
        closed = consts
        self._jitted = jax.jit(lambda _unused, *args: run(closed, *args),
                               compiler_options=opts or None)
        self._consts = {}
      else:
        self._jitted = jax.jit(run, compiler_options=opts or None)
        self._consts = consts
    return self._jitted, self._consts

  def apply(self, *args):
    """Run the scheduled program on arguments shaped like the example arguments (minus static ones); when
    the never-slower check chose the unscheduled function (``program == 'xla'``), run that instead."""
    if self.program == "xla":
      return self._xla_program()(*args)
    f, consts = self._build()
    return f(consts, *args)

  __call__ = apply

  def as_function(self) -> Callable:
    """A plain function ``f(*args)`` running the schedule."""
    return lambda *args: self.apply(*args)

  def lower(self, *args):
    """Lower the program calls run (the emitted schedule, or the XLA program the check chose)."""
    if self.program == "xla":
      return self._xla_program().lower(*args)
    f, consts = self._build()
    return f.lower(consts, *args)

  # ------------------------------------------------------------------ reporting
  @property
  def predicted_latency(self) -> float:
    """Sum of the stage latencies (IOS's objective: stages one after another)."""
    return float(sum(self.stage_latency))

  @property
  def predicted_critical_path(self) -> float:
    """Longest path of the stage DAG under the stage latencies (independent stages fully overlapped, as
    CONCURRENT CUDA graphs may run them); see ``bound.stage_critical_path``."""
    from mlsys_jax.sched.bound import stage_critical_path
    return stage_critical_path(self.graph, self.stages, self.stage_latency)

  def counts(self) -> dict:
    merges = [s for s in self.stages if s.kind == "merge"]
    par = [s for s in self.stages if s.kind == "parallel" and len(s.groups) > 1]
    return {"units": len(self.graph.units), "stages": len(self.stages), "merge_stages": len(merges),
            "merged_units": sum(len(s.units) for s in merges), "concurrent_stages": len(par),
            "max_groups": max((len(s.groups) for s in self.stages), default=0)}

  def measure(self, *args, number: int = 50, repeat: int = 7, baseline: Optional[Callable] = None
              ) -> dict:
    """Median wall time per call of the program calls run (and of ``baseline``), interleaved. ("ios" in
    the result is that program: the emitted schedule, or the XLA program the never-slower check chose.)

    A quick in-process check. For figures you report, time the programs in fresh processes (save the
    schedule with ``to_json``, reload it with ``from_json``): in a process that has run a GPU search,
    XLA's autotuning of later compilations (``baseline`` included) has failed (see ``StageProfiler``).
    Use weights with realistic values: XLA folds all-zero constants (e.g. the zero biases of a freshly
    initialised flax model), which changes the program it builds for ``baseline``."""
    if self.program == "xla":
      f, call_args = self._xla_program(), tuple(args)
    else:
      f, consts = self._build()
      call_args = (consts,) + tuple(args)
    out = {}
    fns = {"ios": (f, call_args)}
    if baseline is not None:
      fns["baseline"] = (baseline, tuple(args))
    ts = {k: [] for k in fns}
    for _ in range(repeat):
      for k, (fn, a) in fns.items():
        ts[k] += time_calls(fn, a, number, 1)
    for k in fns:
      out[f"{k}_s"] = float(np.median(ts[k]))
    if baseline is not None:
      out["speedup"] = out["baseline_s"] / out["ios_s"]
    self.info["measured"] = out
    return out

  def summary(self, max_stages: int = 30) -> str:
    c = self.counts()
    lines = [f"IOS schedule ({self.info.get('strategy', '?')}, r={self.info.get('r')}, "
             f"s={self.info.get('s')}, emission={self.emission}): {c['units']} units in "
             f"{len(self.graph.blocks)} parts -> {c['stages']} stages ({c['merge_stages']} merges of "
             f"{c['merged_units']} units, {c['concurrent_stages']} concurrent, max {c['max_groups']} "
             f"groups)", f"predicted latency {self.predicted_latency * 1e3:.4f} ms; search "
             f"{self.search_s:.2f} s"]
    if "check" in self.info:
      c = self.info["check"]
      if c["method"] == "measured":
        lines.append(f"check (measured, {c['device']}): IOS {c['ios_s'] * 1e3:.4f} ms vs unscheduled "
                     f"{c['xla_s'] * 1e3:.4f} ms under {c['xla_config']!r} -> runs {c['choice']}")
      else:
        lines.append(f"check: NOT verified (no device timing; analytical model only): IOS "
                     f"{c['ios_s'] * 1e3:.4f} ms vs sequential {c['sequential_s'] * 1e3:.4f} ms predicted; "
                     "run ios_schedule(check='measure') on the target device to verify")
    if "measured" in self.info:
      m = self.info["measured"]
      lines.append("measured " + ", ".join(f"{k}={v * 1e3:.4f} ms" if k.endswith("_s") else
                                           f"{k}={v:.3f}" for k, v in m.items()))
    for i, (st, lat) in enumerate(zip(self.stages, self.stage_latency)):
      if i >= max_stages:
        lines.append(f"  ... {len(self.stages) - max_stages} more stages")
        break
      desc = " | ".join(",".join(f"{u}:{self.graph.units[u].kind.split('_')[0]}" for u in grp)
                        for grp in st.groups)
      lines.append(f"  stage {i:3d} {st.kind:8s} {lat * 1e6:9.2f} us  [{desc}]")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.summary()

  # ------------------------------------------------------------------ serialization
  def to_json(self) -> str:
    return json.dumps({
        "schema": SCHEMA, "fingerprint": self.graph.fingerprint(), "emission": self.emission,
        "search_s": self.search_s, "info": self.info, "device": _device_kind(), "jax": jax.__version__,
        "stages": [{"kind": s.kind, "groups": [list(g) for g in s.groups], "latency_s": lat}
                   for s, lat in zip(self.stages, self.stage_latency)]}, indent=1)

  @classmethod
  def from_json(cls, text: str, fn: Callable, *example_args, static_argnums: Sequence[int] = (),
                part_size: int = 50, emission: Optional[str] = None, check: str = "auto") -> "Schedule":
    """Rebuild a schedule saved by ``to_json`` for ``fn`` without a new search (the function must
    trace to the same unit graph; otherwise ValueError).

    The never-slower choice saved with it is kept when the device kind and jax version match the saved
    ones; otherwise (or with ``check='measure'``) the check runs again here (``check`` as in
    :func:`ios_schedule`; ``'off'`` keeps the saved choice regardless)."""
    d = json.loads(text)
    if d.get("schema") != SCHEMA:
      raise ValueError(f"not an IOS schedule JSON (schema {d.get('schema')!r}, expected {SCHEMA!r})")
    emission = emission or d["emission"]
    if emission not in emit.EMISSION_MODES:
      raise ValueError(f"emission must be one of {emit.EMISSION_MODES}, got {emission!r}")
    bound, dyn = _bind_static(fn, example_args, static_argnums)
    g = relayout_conv_kernels(build_graph(bound, *dyn, part_size=part_size),
                              d.get("info", {}).get("kernel_layout", "keep"))
    if g.fingerprint() != d["fingerprint"]:
      raise ValueError("the saved schedule was made for a different graph (fingerprint "
                       f"{d['fingerprint']} vs {g.fingerprint()}); run ios_schedule again")
    stages = [Stage(s["kind"], tuple(tuple(gr) for gr in s["groups"])) for s in d["stages"]]
    _check_cover(g, stages)
    _check_mode(check)
    sched = cls(g, stages, [s["latency_s"] for s in d["stages"]], emission,
                d.get("search_s", 0.0), dict(d.get("info", {})), _fn=bound)
    same_place = (d.get("device") == _device_kind() and d.get("jax") == jax.__version__ and
                  sched.info.get("check", {}).get("emission", emission) == emission)
    if check in ("measure", "analytical") or (check == "auto" and not same_place):
      sched.info.pop("check", None)
      _never_slower(sched, dyn, _auto_method() if check == "auto" else check, AnalyticalCost())
    return sched


def _check_cover(g: Graph, stages: list) -> None:
  """Check that ``stages`` is a valid schedule of ``g``: every unit exactly once, every unit after its
  predecessors (earlier stage, or earlier in the same group of a parallel stage; groups of one stage
  independent), and every merge stage made of >= 2 convolutions with one common ``merge_key`` (a merge
  of incompatible convolutions would compute wrong values, e.g. a saved schedule applied to a function
  whose conv paddings differ but whose unit graph has the same fingerprint)."""
  seen = []
  for st in stages:
    seen.extend(st.units)
  if sorted(seen) != list(range(len(g.units))):
    raise ValueError("schedule does not cover every unit exactly once")
  done = set()
  for i, st in enumerate(stages):
    if st.kind == "merge":
      keys = {emit.merge_key(g, u) for u in st.units}
      if len(st.groups) != 1 or len(st.units) < 2 or None in keys or len(keys) != 1:
        raise ValueError(f"stage {i} merges units {st.units} that are not mergeable convolutions "
                         "(same input, strides, padding, layout, dtype); run ios_schedule again")
    elif st.kind != "parallel":
      raise ValueError(f"stage {i} has kind {st.kind!r}; expected 'parallel' or 'merge'")
    for grp in st.groups:
      earlier = set()
      for u in grp:
        for p in g.units[u].preds:
          if p not in done and (st.kind == "merge" or p not in earlier):
            raise ValueError(f"schedule runs unit {u} before its predecessor {p} (stage {i})")
        earlier.add(u)
    done.update(st.units)


def _device_kind() -> str:
  d = jax.devices()[0]
  return str(getattr(d, "device_kind", d.platform))


_CHECK_MODES = ("auto", "measure", "analytical", "off")


def _check_mode(check: str) -> None:
  if check not in _CHECK_MODES:
    raise ValueError(f"check must be one of {_CHECK_MODES}, got {check!r}: 'measure' times the schedule "
                     "against the unscheduled function, 'analytical' compares predicted latencies, 'off' "
                     "skips the check")


def _auto_method() -> str:
  return "measure" if jax.default_backend() == "gpu" else "analytical"


def _never_slower(sched: "Schedule", dyn: tuple, method: str, model, *,
                  configs: Sequence[str] | None = None, number: int = 20, repeat: int = 7) -> None:
  """Decide which program ``sched`` runs: its emission or the unscheduled function, whichever is faster.

  'measure': compile the emitted schedule and the unscheduled function under each of ``configs``
  (default :func:`~mlsys_jax.sched.xla.check_configs` of the graph: ``CHECK_CONFIGS``, plus the cuDNN
  conv-fusion configurations when the function has grouped convolutions; all compiled before any runs), then time them in interleaved rounds of ``number`` calls (median of
  ``repeat`` rounds); the schedule runs only if its median is not above the fastest XLA program's.
  'analytical': no timing; the schedule's predicted latency is compared with the sequential schedule's
  under ``model`` (the analytical roofline), which is all a machine without a GPU can say.
  Records ``sched.info['check']``."""
  if method == "off":
    return
  if method == "analytical":
    # Without a device to time on, nothing here can show the schedule slower than XLA's program: the DP
    # minimised this very model, so the schedule is never predicted slower than one unit per stage. Record
    # the predicted gain, keep the schedule, and say that it was not verified.
    seq = sum(model(sched.graph, st) for st in sequential_schedule(sched.graph))
    ios = sum(model(sched.graph, st) for st in sched.stages)
    sched.info["check"] = {"method": "analytical", "verified": False, "ios_s": float(ios),
                           "sequential_s": float(seq), "choice": "ios", "device": _device_kind(),
                           "emission": sched.emission}
    return
  configs = tuple(check_configs(sched.graph.eqns) if configs is None else configs)
  unknown = [c for c in configs if c not in XLA_CONFIGS]
  if unknown:
    raise ValueError(f"unknown XLA configurations {unknown}; choose from {sorted(XLA_CONFIGS)}")
  f, consts = sched._build()
  progs = {"ios": (f.lower(consts, *dyn).compile(), (consts,) + tuple(dyn))}
  for name in configs:
    opts = XLA_CONFIGS[name]
    progs[name] = (jax.jit(sched._fn, compiler_options=opts or None).lower(*dyn).compile(), tuple(dyn))
  # The two programs must compute the same function before either may stand in for the other.
  err = _rel_err(progs["ios"][0](*progs["ios"][1]), progs[configs[0]][0](*progs[configs[0]][1]))
  if not err <= _CHECK_RTOL:
    raise ValueError(f"ios_schedule check: the emitted schedule's outputs differ from the unscheduled "
                     f"function's by {err:.3g} (relative L2 > {_CHECK_RTOL}); this is a scheduling bug, "
                     "please report it (check='off' skips the check)")
  times = {k: [] for k in progs}
  for _ in range(repeat):
    for k, (prog, a) in progs.items():
      times[k] += time_calls(prog, a, number, 1)
  med = {k: float(np.median(v)) for k, v in times.items()}
  best = min(configs, key=lambda k: med[k])
  sched.info["check"] = {"method": "measured", "verified": True, "ios_s": med["ios"], "xla_s": med[best],
                         "xla_config": best, "xla_all_s": {k: med[k] for k in configs}, "number": number,
                         "repeat": repeat, "rel_err": err, "choice": "ios" if med["ios"] <= med[best] else "xla",
                         "device": _device_kind(), "emission": sched.emission}


_CHECK_RTOL = 1e-2   # TF32 convs differ by up to ~1e-3 between programs that pick different algorithms


def _rel_err(a, b) -> float:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  num = sum(float(jnp.sum((jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)) ** 2)) for x, y in zip(la, lb))
  den = sum(float(jnp.sum(jnp.asarray(y, jnp.float32) ** 2)) for y in lb)
  return float(np.sqrt(num / max(den, 1e-30)))


def sequential_schedule(g: Graph) -> list:
  """The baseline schedule: every unit of ``g`` alone in its own stage, in topological order.

  Example:
    >>> g = build_graph(lambda x: jnp.tanh(x @ jnp.ones((4, 4))) + x @ jnp.ones((4, 4)), jnp.ones((1, 4)))
    >>> [st.groups for st in sequential_schedule(g)]
    [((0,),), ((1,),), ((2,),)]
  """
  return [Stage("parallel", ((u,),)) for u in range(len(g.units))]


def fixed_units(g: Graph, merge_key: Callable) -> set:
  """Units of ``g`` that no other unit of their DP part shares a (non-None) ``merge_key`` with: under
  IOS-Merge each runs as a stage of its own in every candidate schedule of its part.

  Example:
    >>> w1, w2 = jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))
    >>> conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> g = build_graph(lambda x: jax.nn.relu(conv(x, w1)) + conv(x, w2), jnp.ones((1, 8, 8, 4)))
    >>> sorted(fixed_units(g, lambda u: emit.merge_key(g, u)))     # the sum; the two convs can merge
    [2]
  """
  out = set()
  for part in g.blocks:
    keys: dict = {}
    for u in part:
      keys.setdefault(merge_key(u), []).append(u)
    for k, us in keys.items():
      if k is None or len(us) == 1:
        out.update(us)
  return out


def _check_compiler_options(options) -> dict:
  if options is None:
    return {}
  if not isinstance(options, dict):
    raise TypeError(f"compiler_options must be a dict of XLA option names to values, got "
                    f"{type(options).__name__}")
  for k, v in options.items():
    if not isinstance(k, str) or not isinstance(v, (bool, int, float, str)):
      raise TypeError(f"compiler_options entry {k!r}: {v!r} must map a str to a bool, int, float or "
                      "str (as jax.jit(..., compiler_options=...) takes them)")
  return dict(options)


def ios_schedule(fn: Callable, *example_args, r: int = 3, s: int = 8, profiler: Any = None,
                 strategy: str = "both", part_size: int = 50, emission: str = "cuda_graph",
                 static_argnums: Sequence[int] = (), allow_opaque: bool = True,
                 prefetch: bool = True, merge_kernels: str = "any", kernel_layout: str = "auto",
                 keep_alive: bool = True, fuse_epilogue: bool = True,
                 embed_consts: bool = True, compiler_options: Optional[dict] = None,
                 check: str = "auto", predictor: Any = None, top_k: int = 0,
                 profile_fixed: bool = False, verbose: bool = False) -> Schedule:
  """Search an IOS schedule for ``fn`` and return it (callable).

  Args:
    fn: function of arrays; weights closed over or named in ``static_argnums``.
    *example_args: example inputs (shapes/dtypes; their values are used for static args only).
    r: most units per group of a concurrent stage (paper default 3).
    s: most groups per concurrent stage (paper default 8).
    profiler: stage cost model ``(graph, Stage) -> seconds``: ``AnalyticalCost()`` (default when no GPU)
      or ``StageProfiler(...)`` (default on GPU, measuring on the device).
    strategy: 'both' (IOS-Both), 'merge' (IOS-Merge) or 'parallel' (IOS-Parallel).
    part_size: largest DP part (paper experiments: 50).
    emission: 'cuda_graph' (default), 'cuda_graph_lhs', 'streams' or 'plain'; see ``mlsys_jax.sched.emit``.
    static_argnums: positional arguments treated as constants (e.g. the variables of model.apply).
    prefetch: with a profiler that has ``prefetch`` (``StageProfiler``), first run the DP under the
      analytical model to collect the stages it asks for and compile them in parallel threads.
    allow_opaque: keep control flow / unknown higher-order primitives as sequential units (True) or
      raise ValueError naming them (False).
    merge_kernels: 'any' (IOS: kernels zero-padded to the largest window) or 'same' (merge only
      convs with equal kernel sizes, no padded FLOPs).
    kernel_layout: 'auto' stores conv kernels in the layout the GPU kernels read (OHWI for NHWC
      inputs) so the program has no per-call weight transposes; 'keep' leaves them as traced
      (see ``graph.relayout_conv_kernels``).
    keep_alive: keep every intermediate live to the end of the program (no buffer reuse, so no false
      dependencies between independent operators in CONCURRENT CUDA graphs; see
      ``emit.keep_alive_term``). Costs the memory of all activations at once (tens of MB for
      Inception-V3 at batch 1). It helps where XLA's buffer reuse serialises independent branches
      (Inception-V3 f32 with zero biases: 0.79 -> 0.58 ms on an H100) and may cost a few percent
      where it does not (SqueezeNet bf16, sequential schedule: 4-12%).
    fuse_epilogue: apply the (identical) epilogues of merged convs once on the merged output, before
      the channel slices, so XLA keeps cuDNN's fused conv+bias+activation.
    embed_consts: compile the weights (and merged kernels) into the program as constants (True) or
      pass them as arguments on every call (False).
    compiler_options: extra XLA options for the scheduled program, on top of the emission's (e.g.
      ``{"xla_gpu_experimental_enable_conv_fusion": True}``, which makes the first call of programs with
      hundreds of depthwise convs fast); the default ``StageProfiler`` compiles stages with them too, and
      they are saved with the schedule. Values must be bool, int, float or str.
    check: the never-slower check at the end of the search. 'measure' compiles the emitted schedule and
      the unscheduled function under plain jit and the best command-buffer configurations
      (``sched.CHECK_CONFIGS``; with grouped/depthwise convolutions also their cuDNN conv-fusion variants,
      ``sched.check_configs``), times them interleaved after all compiles, and makes the returned
      ``Schedule`` run whichever is faster (``Schedule.program`` says which; ``summary()`` and
      ``to_json`` record both times and the choice). 'analytical' compares predicted latencies only (the
      schedule vs the sequential schedule under the analytical model) and says so. 'auto' (default):
      'measure' on a GPU, 'analytical' elsewhere. 'off': no check, always the schedule.
    predictor: a learned stage cost ``(graph, Stage) -> seconds`` used *instead of* profiling
      (Value Learning, Steiner et al., MLSys 2021), e.g. ``mlsys_jax.cost.value_ios.StagePredictor``.
      Optional methods: ``prefetch(graph, stages)`` (predict many stages in one batch) and
      ``ood(graph) -> [(unit, reason)]`` (units unlike its training data). Parts of the graph with an
      out-of-distribution unit are searched with ``profiler`` as without a predictor (never a silent
      guess); ``info["predictor"]`` lists them.
    top_k: with ``predictor``: 0 costs every candidate stage with the predictor alone (no profiling);
      k >= 1 is the hybrid: each DP state profiles only its ``k`` best candidates by predicted total
      (``sched.ios_dp(rank=..., top_k=k)``). ``stage_latency`` holds predicted latencies for
      predicted parts (top_k = 0) and ``profiler`` latencies otherwise.

    profile_fixed: with strategy='merge' and a measuring profiler, a unit that no other unit of its part
      can merge with (no equal ``merge_key``) runs alone in every candidate schedule: its stage costs the
      same in all of them and cannot change the DP's choice. False (default): such stages are costed by
      the analytical model, not profiled (Inception-V3: 78 of 159 stages profiled; the schedule is the
      one profiling them would give, up to ties; their ``stage_latency`` entries are analytical and
      ``info["fixed_stages"]`` counts them). True: profile them too.

  Returns:
    a ``Schedule``; ``sched(*dynamic_args)`` runs it.

  Example:
    >>> w1, w2 = jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))
    >>> conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> f = lambda x: jax.nn.relu(conv(x, w1)) + conv(x, w2)
    >>> x = jnp.ones((1, 8, 8, 4))
    >>> sched = ios_schedule(f, x, strategy="parallel")    # IOS-Parallel: no merges
    >>> [s.groups for s in sched.stages], bool(jnp.allclose(sched(x), f(x)))   # the convs run concurrently
    ([((0,), (1,)), ((2,),)], True)
  """
  if strategy not in ("both", "merge", "parallel"):
    raise ValueError(f"strategy must be 'both', 'merge' or 'parallel', got {strategy!r}")
  if emission not in emit.EMISSION_MODES:
    raise ValueError(f"emission must be one of {emit.EMISSION_MODES}, got {emission!r}")
  if merge_kernels not in ("any", "same"):
    raise ValueError(f"merge_kernels must be 'any' or 'same', got {merge_kernels!r}")
  if emission == "streams" and not emit.stream_call_available():
    raise ValueError("emission='streams' needs jax.experimental.compute_on's function form "
                     "(jax >= 0.8); use emission='cuda_graph'")
  compiler_options = _check_compiler_options(compiler_options)
  _check_mode(check)
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0: predicted costs only, k: profile the k best "
                     f"predicted candidates per DP state), got {top_k!r}")
  if top_k and predictor is None:
    raise ValueError("top_k needs a predictor (a learned stage cost, e.g. cost.value_ios.StagePredictor)")
  if predictor is not None and not callable(predictor):
    raise TypeError(f"predictor must be callable as predictor(graph, stage) -> seconds, got "
                    f"{type(predictor).__name__}")
  t0 = time.perf_counter()
  bound, dyn = _bind_static(fn, example_args, static_argnums)
  g = relayout_conv_kernels(build_graph(bound, *dyn, part_size=part_size, allow_opaque=allow_opaque),
                            kernel_layout)
  if profiler is None:
    profiler = (StageProfiler(mode=emission, s=s, compiler_options=compiler_options,
                              fuse_epilogue=fuse_epilogue)
                if jax.default_backend() == "gpu" else AnalyticalCost())
  same = merge_kernels == "same"
  mk = (lambda u: emit.merge_key(g, u, same)) if strategy in ("both", "merge") else None
  succ = {u.idx: u.succs for u in g.units}
  stages, lats = [], []
  fixed = set()
  if strategy == "merge" and not profile_fixed and not isinstance(profiler, AnalyticalCost):
    fixed = fixed_units(g, mk)
  analytical = AnalyticalCost()
  is_fixed = lambda st: st.kind == "parallel" and len(st.groups) == 1 and len(st.groups[0]) == 1 and \
      st.groups[0][0] in fixed
  cost = lambda st: analytical(g, st) if is_fixed(st) else profiler(g, st)
  # With a predictor: parts with an out-of-distribution unit are profiled as without one.
  pinfo: dict = {}
  mode = ["profiled"] * len(g.blocks)
  if predictor is not None:
    ood = [(int(u), str(why)) for u, why in (predictor.ood(g) if hasattr(predictor, "ood") else [])]
    bad = {u for u, _ in ood}
    mode = ["profiled" if bad & set(part) else ("hybrid" if top_k else "predicted") for part in g.blocks]
    pcost = lambda st: predictor(g, st)
    if hasattr(predictor, "prefetch"):
      # every candidate stage of every state of the predicted parts, predicted in batches (a DP with
      # constant costs visits every state: no candidate is pruned by an earlier one's cost)
      asked: dict = {}

      def record_all(st):
        asked[st] = None
        return 1.0

      for part, m in zip(g.blocks, mode):
        if m != "profiled":
          ios_dp(part, succ, record_all, r=r, s=s, strategy=strategy, merge_key=mk)
      predictor.prefetch(g, list(asked))
    pinfo = {"predictor": type(predictor).__name__, "top_k": top_k, "ood": ood[:50], "n_ood": len(ood),
             "profiled_parts": mode.count("profiled"), "parts": len(g.blocks)}
  if hasattr(profiler, "prefetch") and prefetch and any(m != "predicted" for m in mode):
    # pass 1: record the stages a DP asks for (under the analytical model; a hybrid's: its top-k
    # under the predictor), then compile them in parallel and time them; pass 2 (below) hits the
    # profiler's cache.
    wanted: dict = {}
    model = AnalyticalCost()

    def record(st):
      if not is_fixed(st):
        wanted[st] = None
      return model(g, st)

    def record_pred(st):
      if not is_fixed(st):
        wanted[st] = None
      return pcost(st)

    for part, m in zip(g.blocks, mode):
      if m == "predicted":
        continue
      if m == "hybrid":
        ios_dp(part, succ, record_pred, r=r, s=s, strategy=strategy, merge_key=mk, rank=pcost,
               top_k=top_k)
      else:
        ios_dp(part, succ, record, r=r, s=s, strategy=strategy, merge_key=mk)
    n = profiler.prefetch(g, list(wanted))
    if verbose:
      print(f"ios: prefetched {n} stage measurements ({len(wanted)} stages requested)", flush=True)
  profiled: dict = {}

  def counted(st):
    if not is_fixed(st):
      profiled[st] = None
    return cost(st)

  for pi, part in enumerate(g.blocks):
    if mode[pi] == "predicted":
      st, _ = ios_dp(part, succ, pcost, r=r, s=s, strategy=strategy, merge_key=mk)
    elif mode[pi] == "hybrid":
      st, _ = ios_dp(part, succ, counted, r=r, s=s, strategy=strategy, merge_key=mk, rank=pcost,
                     top_k=top_k)
    else:
      st, _ = ios_dp(part, succ, counted, r=r, s=s, strategy=strategy, merge_key=mk)
    for x in st:
      stages.append(x)
      lats.append(pcost(x) if mode[pi] == "predicted" else cost(x))
    if verbose:
      print(f"ios: part {pi + 1}/{len(g.blocks)} ({len(part)} units) -> {len(st)} stages", flush=True)
  if hasattr(profiler, "save"):
    profiler.save()
  _check_cover(g, stages)
  info = {"r": r, "s": s, "strategy": strategy, "graph": summarize_graph(g),
          "profiler": type(profiler).__name__, "merge_kernels": merge_kernels,
          "kernel_layout": kernel_layout, "keep_alive": bool(keep_alive),
          "fuse_epilogue": bool(fuse_epilogue), "embed_consts": bool(embed_consts),
          "compiler_options": compiler_options}
  for k in ("hits", "misses", "compile_s"):
    if hasattr(profiler, k):
      info[f"profiler_{k}"] = getattr(profiler, k)
  info["profiled_stages"] = len(profiled)   # distinct stages the DP asked the profiler for
  info["fixed_stages"] = len(fixed)         # costed analytically: the same in every candidate (profile_fixed)
  if predictor is not None:
    info["predictor"] = pinfo
  sched = Schedule(g, stages, lats, emission, time.perf_counter() - t0, info, _fn=bound)
  _never_slower(sched, dyn, _auto_method() if check == "auto" else check,
                profiler if isinstance(profiler, AnalyticalCost) else AnalyticalCost())
  if verbose:
    for line in sched.summary(0).splitlines():
      if line.startswith("check"):   # none with check='off'
        print("ios: " + line, flush=True)
  return sched
