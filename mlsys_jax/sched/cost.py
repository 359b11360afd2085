"""Stage-latency cost models for the IOS search (Ding et al., MLSys 2021, Sec. 4.3 "profiling").

* ``AnalyticalCost``: a roofline with an under-utilisation term and a per-kernel launch cost; cheap,
  deterministic, used for CPU runs and tests. A unit of F flops and B bytes takes
  ``launch + max(max(F, F_sat) / peak, B / bw)``; a concurrent stage takes
  ``launch * (groups - 1) + max(longest group, sum F / peak, sum B / bw)
  + serial_fraction * (sum of groups - longest group)``; a merge stage is one conv over the padded
  kernels. Its parameters can be fitted to whole programs measured on the device
  (:func:`mlsys_jax.sched.calibrate.calibrate_cost`).
* ``StageProfiler``: measures a candidate stage on the device. The stage is emitted exactly as in the
  final program (same merge code, same XLA options), compiled, warmed up, and timed by *differential
  timing*: a program with K copies chained through ``lax.optimization_barrier`` (each copy reads the
  previous copy's barrier outputs, so copies run in order and cannot be CSE'd) against K=1;
  latency = (T_K - T_1) / (K - 1), T the minimum over ``repeat`` rounds of ``number`` calls. This cancels the
  per-call dispatch cost (~10 us), which is as large as a batch-1 stage. Results are cached by a
  signature of the stage program (its jaxpr text, the XLA options and the device kind), in memory and
  in a JSON file, so a second search is fast.

Example:
  >>> import jax.numpy as jnp
  >>> from mlsys_jax.sched import graph, dp
  >>> g = graph.build_graph(lambda x: x @ jnp.ones((4, 4)), jnp.ones((2, 4)))
  >>> AnalyticalCost()(g, dp.Stage('parallel', ((0,),))) > 0
  True
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import weakref
from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

from mlsys_jax._checks import check_int
from mlsys_jax.sched import emit
from mlsys_jax.sched.dp import Stage
from mlsys_jax.sched.graph import Graph

INF = float("inf")


def roofline_time(f, b, peak: float, bw: float, sat: float):
  """``max(max(F, min(sat, 50 F)) / peak, B / bw)``: the work time of a kernel of ``F`` FLOPs and ``B`` bytes
  (the FLOP term never below ``min(sat, 50 F) / peak``: small kernels under-fill the device). Python floats in,
  a float out (the DP's path); numpy arrays in, elementwise (:mod:`mlsys_jax.sched.calibrate`'s fit).

  The roofline model (Williams, Waterman, Patterson, CACM 2009) stands in for IOS's measured stage
  latencies (Ding et al., MLSys 2021, Sec. 4.3) in :class:`AnalyticalCost`.

  Args:
    f: FLOPs (>= 0), a number or a numpy array.
    b: DRAM bytes (>= 0), a number or a numpy array broadcastable with ``f``.
    peak: peak FLOP/s (> 0, finite).  bw: bandwidth in bytes/s (> 0, finite).
    sat: FLOPs a kernel needs to fill the device (>= 0, finite).

  Returns:
    Seconds: a float, or an array of the broadcast shape of ``f`` and ``b``.

  Raises:
    ValueError: a parameter is out of range, NaN or inf, or ``f``/``b`` is negative or not finite.

  Example:
    >>> roofline_time(1e6, 1e3, peak=1e12, bw=1e12, sat=0.0)      # compute-bound: 1e6 / 1e12
    1e-06
    >>> roofline_time(1e3, 0.0, peak=1e12, bw=1e12, sat=1e6)      # under-filled: 50 * 1e3 / 1e12
    5e-08
    >>> roofline_time(1e3, 1e6, peak=1e12, bw=1e9, sat=0.0)       # memory-bound: 1e6 / 1e9
    0.001
  """
  if isinstance(f, np.ndarray) or isinstance(b, np.ndarray):
    fa, ba = np.asarray(f, np.float64), np.asarray(b, np.float64)
    if not (0 < peak < INF and 0 < bw < INF and 0 <= sat < INF) or not (
        np.all((fa >= 0) & (fa < INF)) and np.all((ba >= 0) & (ba < INF))):
      _roofline_error(f, b, peak, bw, sat)
    return _roofline_arrays(fa, ba, peak, bw, sat)   # (the checked arrays: a list f would repeat under f * 50)
  # one chained comparison (this runs for every merge stage the DP costs); NaN fails every comparison
  if not (0 < peak < INF and 0 < bw < INF and 0 <= sat < INF and 0 <= f < INF and 0 <= b < INF):
    _roofline_error(f, b, peak, bw, sat)
  return max(max(f, min(sat, f * 50)) / peak, b / bw)


def _roofline_arrays(f, b, peak, bw, sat):
  """:func:`roofline_time` on numpy arrays without its checks, for callers that validated ``f`` and ``b`` once
  and evaluate the formula many times (:mod:`mlsys_jax.sched.calibrate`'s fit: a per-call check costs as much as
  the formula)."""
  return np.maximum(np.maximum(f, np.minimum(sat, f * 50)) / peak, b / bw)


def _roofline_error(f, b, peak, bw, sat):
  """Raise the ValueError of :func:`roofline_time` naming the argument that is wrong."""
  for name, v, lo_strict in (("peak", peak, True), ("bw", bw, True), ("sat", sat, False)):
    if not isinstance(v, (int, float, np.integer, np.floating)) or not (
        (0 < v if lo_strict else 0 <= v) and v < INF):
      raise ValueError(f"roofline_time: {name} must be a finite number {'> 0' if lo_strict else '>= 0'}, got "
                       f"{v!r} (peak: FLOP/s, bw: bytes/s, sat: FLOPs that fill the device).")
  for name, v in (("f", f), ("b", b)):
    a = np.asarray(v, np.float64)
    if not np.all((a >= 0) & (a < INF)):
      raise ValueError(f"roofline_time: {name} (the kernel's {'FLOPs' if name == 'f' else 'bytes'}) must be finite "
                       f"and >= 0, got {v!r}.")
  raise ValueError("roofline_time: invalid arguments.")   # unreachable: one of the checks above fired


def merge_flops_bytes(g: Graph, st: Stage) -> tuple[float, float, int]:
  """FLOPs and DRAM bytes of a merge stage run as one conv over the concatenated, centred zero-padded
  kernels (the input is read once), and the number of convs merged.

  IOS operator merge (Ding et al., MLSys 2021, Sec. 4): the merged conv has ``sum_i C_out,i`` output
  channels and the largest kernel window ``K`` (per spatial dim), so
  ``F = 2 * sum_i out_elems_i * C_in * prod(K)`` (a 1x1 merged into a 3x3 costs 9x its own FLOPs) and
  ``B = sum_i bytes_i - (n - 1) * input bytes`` (the units' inputs, outputs and weights, with the shared
  input read once).

  Raises:
    ValueError: ``st`` is not a merge stage of ``g``'s convolution units.
  """
  if not isinstance(st, Stage) or st.kind != "merge" or len(st.groups) != 1 or not st.groups[0]:
    raise ValueError(f"merge_flops_bytes: st must be a merge Stage with one non-empty group of conv units, "
                     f"got {st!r}.")
  units = st.groups[0]
  ok = [isinstance(u, (int, np.integer)) and 0 <= u < len(g.units) for u in units]
  if not all(ok) or any(g.units[u].kind != "conv_general_dilated" for u in units):
    kinds = [g.units[u].kind if k else "not a unit" for u, k in zip(units, ok)]
    raise ValueError(f"merge_flops_bytes: every unit of a merge stage must be a convolution unit of g, got "
                     f"units {tuple(units)} of kinds {kinds}.")
  e0 = g.eqns[g.units[units[0]].anchor]
  dn = e0.params["dimension_numbers"]
  ws = [g.avals[g.eqns[g.units[u].anchor].inputs[1]] for u in units]
  ksp = int(np.prod([max(w.shape[d] for w in ws) for d in dn.rhs_spec[2:]]))
  kin = ws[0].shape[dn.rhs_spec[1]]
  out_elems = sum(int(np.prod(g.avals[g.eqns[g.units[u].anchor].outputs[0]].shape)) for u in units)
  f = 2.0 * out_elems * kin * ksp
  b = float(sum(g.unit_flops_bytes(u)[1] for u in units))
  b -= (len(units) - 1) * g.avals[e0.inputs[0]].size * g.avals[e0.inputs[0]].dtype.itemsize
  return f, b, len(units)


def _valid(g: Graph, st: Stage) -> bool:
  units = st.units
  if len(units) > 1 and any(g.units[u].opaque for u in units):
    return False
  return True


class AnalyticalCost:
  """Roofline cost model of a stage (seconds). Defaults resemble an H100 at batch 1.

  Example:
    >>> from mlsys_jax.sched import build_graph
    >>> w1, w2 = jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))
    >>> conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> g = build_graph(lambda x: jax.nn.relu(conv(x, w1)) + conv(x, w2), jnp.ones((1, 8, 8, 4)))
    >>> cost = AnalyticalCost()                             # microseconds below: launch-bound at this size
    >>> [round(cost(g, st) * 1e6, 2) for st in (Stage("parallel", ((0,), (1,))), Stage("merge", ((0, 1),)))]
    [4.0, 2.51]
  """

  def __init__(self, peak_flops: float = 400e12, bandwidth: float = 3.0e12, launch_s: float = 2e-6,
               sat_flops: float = 2e9, merge_launch_s: Optional[float] = None, serial_fraction: float = 0.0):
    vals = dict(peak_flops=peak_flops, bandwidth=bandwidth, launch_s=launch_s, sat_flops=sat_flops,
                merge_launch_s=0.0 if merge_launch_s is None else merge_launch_s, serial_fraction=serial_fraction)
    bad = [f"{k}={v!r}" for k, v in vals.items() if not np.isfinite(v)]
    if bad:
      raise ValueError(f"AnalyticalCost: every parameter must be a finite number, got {', '.join(bad)}")
    if peak_flops <= 0 or bandwidth <= 0 or launch_s < 0 or sat_flops < 0 or vals["merge_launch_s"] < 0:
      raise ValueError("AnalyticalCost: peak_flops, bandwidth > 0 and launch_s, sat_flops, merge_launch_s >= 0, "
                       f"got {vals}")
    if not 0.0 <= serial_fraction <= 1.0:
      raise ValueError(f"AnalyticalCost: serial_fraction is the part of a concurrent stage's shorter groups "
                       f"that does not overlap the longest one, in [0, 1], got {serial_fraction!r}")
    self.peak, self.bw, self.launch, self.sat = peak_flops, bandwidth, launch_s, sat_flops
    self.merge_launch = launch_s if merge_launch_s is None else merge_launch_s
    self.serial = float(serial_fraction)
    self._units: dict = {}  # id(graph) -> (weakref to the graph, model parameters, {unit: (time, flops, bytes)})

  def _unit_terms(self, g: Graph) -> dict:
    """This graph's memo of ``unit -> (unit_time, flops, bytes)``, emptied when the graph at this
    address or the model's parameters changed (the IOS-Both DP costs ~500k stages of RandWire)."""
    params = (self.peak, self.bw, self.launch, self.sat)
    ent = self._units.get(id(g))
    if ent is None or ent[0]() is not g or ent[1] != params:
      ent = (weakref.ref(g), params, {})
      self._units[id(g)] = ent
    return ent[2]

  def _unit(self, g: Graph, u: int) -> tuple:
    memo = self._unit_terms(g)
    t = memo.get(u)
    if t is None:
      f, b = g.unit_flops_bytes(u)
      t = memo[u] = (self.launch + roofline_time(f, b, self.peak, self.bw, self.sat), f, b)
    return t

  def unit_time(self, g: Graph, u: int) -> float:
    return self._unit(g, u)[0]

  def __call__(self, g: Graph, st: Stage) -> float:
    if not _valid(g, st):
      return INF
    if st.kind == "merge":
      f, b, n = merge_flops_bytes(g, st)
      return self.merge_launch + roofline_time(f, b, self.peak, self.bw, self.sat) + self.launch * 0.25 * (n - 1)
    memo = self._unit_terms(g)
    terms = [[memo.get(u) or self._unit(g, u) for u in grp] for grp in st.groups]
    groups = [sum(t[0] for t in grp) for grp in terms]   # the same sums, in the same order, as per unit
    tot_f = sum(t[1] for grp in terms for t in grp)
    tot_b = sum(t[2] for grp in terms for t in grp)
    longest = max(groups)
    t = self.launch * (len(st.groups) - 1) + max(longest, tot_f / self.peak, tot_b / self.bw)
    if self.serial:
      t += self.serial * (sum(groups) - longest)
    return t

  def params(self) -> dict:
    """The model's parameters, as keyword arguments of the constructor."""
    return dict(peak_flops=self.peak, bandwidth=self.bw, launch_s=self.launch, sat_flops=self.sat,
                merge_launch_s=self.merge_launch, serial_fraction=self.serial)


def _random_like(aval, key):
  if jnp.issubdtype(aval.dtype, jnp.floating):
    return jax.random.normal(key, aval.shape, aval.dtype)
  if jnp.issubdtype(aval.dtype, jnp.integer):
    return jax.random.randint(key, aval.shape, 0, 2, aval.dtype)
  return jnp.zeros(aval.shape, aval.dtype)


def chain_program(fn, k: int):
  """K copies of ``fn(consts, xs)`` chained through optimization barriers (for differential timing).

  ``run(consts, xs)`` returns the list of the ``k`` copies' outputs, each equal to ``fn(consts, xs)``;
  each copy reads ``xs`` through the previous copy's ``lax.optimization_barrier``, so XLA runs the copies
  in order and cannot merge them (IOS profiles stages on the device, Ding et al., MLSys 2021, Sec. 4.3;
  :class:`StageProfiler` takes ``(T_k - T_1) / (k - 1)``).

  Raises:
    TypeError: ``fn`` is not callable or ``k`` is not an integer.  ValueError: ``k < 1``.

  Example:
    >>> run = chain_program(lambda consts, xs: (xs[0] * 2,), 3)     # 3 copies, each reads the same xs
    >>> [float(ys[0][0]) for ys in run({}, (jnp.ones(2),))]
    [2.0, 2.0, 2.0]
  """
  if not callable(fn):
    raise TypeError(f"chain_program: fn must be a callable fn(consts, xs) -> outputs, got {type(fn).__name__}.")
  check_int("k", k, 1)

  def run(consts, xs):
    res = []
    cur = tuple(xs)
    for _ in range(k):
      ys = fn(consts, cur)
      cur, ys = lax.optimization_barrier((cur, ys))
      res.append(ys)
    return res
  return run


def time_calls(f, args, number: int, repeat: int) -> list:
  """Seconds per call of ``f(*args)`` for each of ``repeat`` rounds of ``number`` back-to-back calls
  (one warm-up call first; each round ends with ``block_until_ready``, so dispatch is amortised).

  ``f`` is called ``1 + number * repeat`` times in all. The minimum over rounds is the usual estimate
  (Ding et al., MLSys 2021, Sec. 4.3 profile each stage on the device the same way).

  Raises:
    TypeError: ``f`` is not callable, ``args`` is not a tuple/list, or ``number``/``repeat`` is not an
      integer.  ValueError: ``number < 1`` or ``repeat < 1``.

  Example:
    >>> ts = time_calls(jax.jit(jnp.sin), (jnp.ones(3),), number=2, repeat=3)
    >>> len(ts), all(t > 0 for t in ts)
    (3, True)
  """
  if not callable(f):
    raise TypeError(f"time_calls: f must be callable, got {type(f).__name__}.")
  if not isinstance(args, (tuple, list)):
    raise TypeError(f"time_calls: args must be the tuple of positional arguments of f, got {type(args).__name__}; "
                    "wrap a single argument as (x,).")
  check_int("number", number, 1)
  check_int("repeat", repeat, 1)
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    for _ in range(number):
      y = f(*args)
    jax.block_until_ready(y)
    ts.append((time.perf_counter() - t0) / number)
  return ts


class StageProfiler:
  """Measures stage latency on the default device with differential timing and a persistent cache.

  Args:
    mode: emission mode the stages are compiled with (see ``emit.EMISSION_MODES``).
    k: number of chained copies for differential timing (K >= 2).
    number, repeat, warmup: calls per round, rounds (median taken), warm-up calls.
    cache_path: JSON file of measured latencies keyed by stage signature (loaded if it exists).
    parallel: 'measure' to time concurrent stages of several units on the device, or 'sum' to take
      the sum of their measured single-group latencies (no profiling of concurrency: with CUDA-graph
      emission XLA already overlaps independent kernels, whatever the stage grouping). Merge stages and
      single groups are always measured.
    s: the number of streams used for the 'streams' XLA options.
    compiler_options: extra XLA options on top of the emission's (part of every cache key); pass the
      same ones as ``ios_schedule(..., compiler_options=...)``.
    fuse_epilogue: build merge stages with their epilogue fused on the merged output (True) or applied
      per slice (False), as ``ios_schedule(..., fuse_epilogue=...)`` will emit them.
    compile_threads: threads that compile not-yet-cached stages before any is timed (``prefetch``).
      1 compiles one stage at a time: slower searches, but XLA's autotuner then never measures
      candidates while other compilations run (parallel autotuning may time out its delay kernel and
      time candidates less accurately; XLA keeps one autotuning result per process). Whether that
      avoids the autotuning failure described below has not been measured.

  The profiler compiles and runs hundreds of small programs in the calling process. To compare the
  scheduled program with other programs, save the schedule (``Schedule.to_json``) and compile and time the
  programs in fresh processes (``benchmarks/ios.py isolated``): on an H100, a compilation made later in a
  process that had run such searches once failed autotuning outright.

  Example:
    >>> from mlsys_jax.sched import build_graph
    >>> g = build_graph(lambda x: jnp.tanh(x @ jnp.ones((4, 4))), jnp.ones((1, 4)))
    >>> prof = StageProfiler(mode="plain", k=2, number=2, repeat=2, warmup=1)   # tiny timing run (CPU here)
    >>> t = prof(g, Stage("parallel", ((0,),)))
    >>> t > 0, prof(g, Stage("parallel", ((0,),))) == t, (prof.misses, prof.hits)   # second call: cached
    (True, True, (1, 1))
  """

  def __init__(self, mode: str = "cuda_graph", k: int = 5, number: int = 20, repeat: int = 5,
               warmup: int = 2, cache_path: Optional[str] = None, parallel: str = "sum", s: int = 8,
               compiler_options: Optional[dict] = None, fuse_epilogue: bool = True,
               compile_threads: int = 8):
    if k < 2:
      raise ValueError(f"k must be >= 2 for differential timing, got {k}")
    check_int("compile_threads (1 = compile stages one at a time)", compile_threads, low=1)
    if parallel not in ("measure", "sum"):
      raise ValueError(f"parallel must be 'measure' or 'sum', got {parallel!r}")
    self.mode, self.k, self.number, self.repeat, self.warmup = mode, k, number, repeat, warmup
    self.parallel, self.s = parallel, s
    self.fuse_epilogue = bool(fuse_epilogue)
    self.compile_threads = int(compile_threads)
    self.cache_path = cache_path
    self.cache: dict = {}
    self.hits = self.misses = 0
    self.compile_s = 0.0
    self._dirty = 0
    self._lock = threading.Lock()
    self._memo: dict = {}  # (id(graph), stage) -> cache key (signatures cost a trace each)
    self._fps: dict = {}  # id(graph) -> (weakref to the graph, fingerprint)
    if cache_path and os.path.exists(cache_path):
      with open(cache_path) as fh:
        self.cache = json.load(fh)
    dev = jax.devices()[0]
    self.device = getattr(dev, "device_kind", dev.platform)
    self.options = {**emit.compiler_options(mode, s), **(compiler_options or {})}

  def save(self) -> None:
    if self.cache_path:
      os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
      tmp = self.cache_path + ".tmp"
      with open(tmp, "w") as fh:
        json.dump(self.cache, fh)
      os.replace(tmp, self.cache_path)
      self._dirty = 0

  def __call__(self, g: Graph, st: Stage) -> float:
    if not _valid(g, st):
      return INF
    if st.kind == "parallel" and len(st.groups) > 1 and self.parallel == "sum":
      return sum(self(g, Stage("parallel", (grp,))) for grp in st.groups)
    mk = (self._gid(g), st)
    if mk not in self._memo:  # a saved alias (graph fingerprint + stage) skips the trace
      alias = self.cache.get(self._alias(g, st))
      if alias is not None:
        self._memo[mk] = alias
    if mk in self._memo and self._memo[mk] in self.cache:
      self.hits += 1
      return self.cache[self._memo[mk]]
    key, prog = self._key(g, st)
    self._memo[mk] = key
    self.cache[self._alias(g, st)] = key
    if key in self.cache:
      self.hits += 1
      return self.cache[key]
    self.misses += 1
    compiled = self._compile(prog)
    return self._time(key, compiled)

  def _alias(self, g: Graph, st: Stage) -> str:
    # device and options as in the measurement key: a cache file from another GPU must not answer
    return (f"alias|{self.device}|{sorted(self.options.items())}|{self._fps[self._gid(g)][1]}|"
            f"{self.mode}|{self.k}|{st.kind}|{st.groups}" + ("" if self.fuse_epilogue else "|unfused"))

  def _gid(self, g: Graph) -> int:
    """``id(g)`` for the in-memory memo, after dropping what was memoized for an earlier graph that
    lived at the same address (ids are reused once a graph is freed, e.g. a profiler shared by
    several ``ios_schedule`` calls)."""
    ent = self._fps.get(id(g))
    if ent is None or ent[0]() is not g:
      self._memo = {k: v for k, v in self._memo.items() if k[0] != id(g)}
      self._fps[id(g)] = (weakref.ref(g), g.fingerprint())
    return id(g)

  def _key(self, g: Graph, st: Stage):
    fn, ins, _, cids = emit.stage_program(g, st, self.mode, self.fuse_epilogue)
    consts = {c: g.consts[c] for c in cids}
    in_avals = [g.avals[v] for v in ins]
    sig_src = str(jax.make_jaxpr(fn)(consts, tuple(jax.ShapeDtypeStruct(a.shape, a.dtype)
                                                    for a in in_avals)))
    key = hashlib.sha1(f"{self.device}|{self.mode}|{self.k}|{sorted(self.options.items())}|{sig_src}"
                       .encode()).hexdigest()
    return key, (fn, consts, in_avals)

  def _compile(self, prog):
    fn, consts, in_avals = prog
    xs = tuple(_random_like(a, jax.random.PRNGKey(i)) for i, a in enumerate(in_avals))
    t0 = time.perf_counter()
    f1 = jax.jit(chain_program(fn, 1), compiler_options=self.options or None)
    fk = jax.jit(chain_program(fn, self.k), compiler_options=self.options or None)
    c1 = f1.lower(consts, xs).compile()
    ck = fk.lower(consts, xs).compile()
    with self._lock:
      self.compile_s += time.perf_counter() - t0
    return c1, ck, consts, xs

  def _time(self, key, compiled) -> float:
    c1, ck, consts, xs = compiled
    for _ in range(self.warmup):
      jax.block_until_ready(c1(consts, xs))
      jax.block_until_ready(ck(consts, xs))
    t1, tk = [], []
    for _ in range(self.repeat):  # interleave to share clock drift
      t1 += time_calls(c1, (consts, xs), self.number, 1)
      tk += time_calls(ck, (consts, xs), self.number, 1)
    # minimum over rounds: launch jitter and clock ramps only ever add time
    lat = max((float(np.min(tk)) - float(np.min(t1))) / (self.k - 1), 1e-7)
    self.cache[key] = lat
    self._dirty += 1
    if self._dirty >= 50:
      self.save()
    return lat

  def expand(self, st: Stage) -> list:
    """The stages this profiler measures for ``st`` (its groups when parallel='sum')."""
    if st.kind == "parallel" and len(st.groups) > 1 and self.parallel == "sum":
      return [Stage("parallel", (grp,)) for grp in st.groups]
    return [st]

  def prefetch(self, g: Graph, stages, threads: Optional[int] = None) -> int:
    """Compile the not-yet-cached stages in a thread pool of ``threads`` (default: the profiler's
    ``compile_threads``; XLA compiles in parallel), then, once every compile has finished, time them one
    by one. Returns the number measured.

    Timing only after all compiles matters on GPU: the first execution of a stage may capture cuDNN
    graphs into a CUDA graph, which failed on an H100 ("capturing stream has unjoined work") while other
    threads were still compiling and autotuning."""
    from concurrent.futures import ThreadPoolExecutor
    todo, seen = [], set()
    for st in stages:
      for sub in self.expand(st):
        if not _valid(g, sub):
          continue
        alias = self.cache.get(self._alias(g, sub))
        if alias is not None and alias in self.cache:
          self._memo[(self._gid(g), sub)] = alias
          continue
        key, prog = self._key(g, sub)
        self._memo[(self._gid(g), sub)] = key
        self.cache[self._alias(g, sub)] = key
        if key in self.cache or key in seen:
          continue
        seen.add(key)
        todo.append((key, prog))
    if not todo:
      return 0
    threads = self.compile_threads if threads is None else threads
    if threads <= 1:
      compiled = [(key, self._compile(prog)) for key, prog in todo]
    else:
      with ThreadPoolExecutor(threads) as ex:
        compiled = list(ex.map(lambda kp: (kp[0], self._compile(kp[1])), todo))
    for key, comp in compiled:  # no compile runs while stages execute
      self.misses += 1
      self._time(key, comp)
    self.save()
    return len(todo)
