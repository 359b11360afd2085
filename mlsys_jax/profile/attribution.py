"""Attribute a profiled run's time to (phase, operation) x category, with device overlap
(RL-Scope, Gleeson et al., MLSys 2021, Sec. 3.2: "CPU-only", "GPU-only" and "CPU + GPU" time per operation).

Host time: at every instant the time belongs to the innermost open operation (``'(none)'`` outside all of
them) and to the innermost open host category (``'python'`` when none is open); the categories of an
operation therefore sum exactly to its own (exclusive) time, its wall time less that of the operations
nested in it, and all operations sum to the profiler's wall time. Phases: an operation's time goes to the
phase its record carries (the phase current when it closed); time outside every operation goes to the
phase active at that instant, from the timestamped phase changes (:attr:`Profiler.phase_changes`, on the
same ``perf_counter_ns`` clock the trace is aligned to).

Device time comes from the ``jax.profiler`` trace: device kernels are the events of ``/device:*``
processes (GPU/TPU); on the CPU backend, where XLA programs run on host worker threads, they are the
events of the XLA:CPU executor threads (``*CpuClient*`` / ``*Eigen*``; compiler threads and bookkeeping
markers excluded). The trace's
clock is aligned with ``perf_counter_ns`` through the ``TraceAnnotation`` each operation emitted (median
offset over all matched operations). The union of device intervals splits each operation's host time into
*CPU-only* (host busy, device idle), *overlap* (both busy), *device-only* (the host waits in
``block_until_ready`` while the device works) and *idle wait* (the host waits and the device is idle).

>>> import time
>>> from mlsys_jax import profile
>>> with profile.Profiler(level="scopes") as prof:
...   with profile.operation("sim"):
...     with profile.simulator():
...       time.sleep(0.01)
>>> a = profile.attribute(prof)
>>> round(a.table[("default", "sim")]["simulator"] / 1e6) >= 9
True
"""

from __future__ import annotations

import bisect
import gzip
import json
import math
import os
import zlib
from typing import Any, NamedTuple

import numpy as np

from mlsys_jax.profile.scopes import _ANN_PREFIX, _DEFAULT_PHASE, HOST_CATEGORIES, SOURCES, Profiler, Record

RESOURCES = ("cpu_only", "overlap", "device_only", "idle_wait")
NONE_OP = "(none)"


class Attribution(NamedTuple):
  """Result of :func:`attribute`. ``table[(phase, op)]`` maps every host category, every resource
  and ``'total'``/``'device'`` (device-busy union inside the op) to nanoseconds; ``counts[(phase, op)]``
  maps each instrumentation source to the number of its events that ran inside that operation."""
  table: dict
  counts: dict
  wall_ns: int
  has_device: bool
  note: str


def _union(iv: list[tuple[int, int]]) -> list[tuple[int, int]]:
  out: list[list[int]] = []
  for a, b in sorted(iv):
    if b <= a:
      continue
    if out and a <= out[-1][1]:
      out[-1][1] = max(out[-1][1], b)
    else:
      out.append([a, b])
  return [(a, b) for a, b in out]


def load_trace(path: str) -> dict:
  """Read a chrome/perfetto JSON trace (``.json`` or ``.json.gz``); ``ValueError`` on another format or a
  damaged file (truncated or corrupt gzip, bytes that are not UTF-8 JSON), ``TypeError`` if ``path`` is not a
  path."""
  try:
    path = os.fspath(path)
  except TypeError:
    raise TypeError(f"path must be the path (str or os.PathLike) of a trace file, got {type(path).__name__}; "
                    "pass Profiler.trace_path.") from None
  if not isinstance(path, str):
    raise TypeError(f"path must be a str path of a trace file, got {type(path).__name__}.")
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt") as f:
      t = json.load(f)
  except (OSError, EOFError, ValueError, zlib.error) as e:  # ValueError: JSON and UTF-8 decoding errors
    raise ValueError(f"{path} is not a JSON trace ({type(e).__name__}: {e}); pass the perfetto_trace.json.gz "
                     "that jax.profiler writes (a truncated file comes from a run that was cut short: "
                     "collect it again).") from e
  if isinstance(t, list):
    t = {"traceEvents": t}
  if not isinstance(t, dict) or not isinstance(t.get("traceEvents"), list):
    raise ValueError(f"{path}: no 'traceEvents' list; this trace comes from an unsupported tool version.")
  return t


def device_intervals(trace: dict, ops: list[Record]) -> list[tuple[int, int]]:
  """Device-busy intervals of ``trace`` on the ``perf_counter_ns`` clock, aligned through the
  operations' annotations. ``ValueError`` if no annotation of ``ops`` is found in the trace."""
  return parse_trace(trace, ops)[0]


TRACE_KINDS = ("annotation", "host_thread", "executor", "device")


def parse_trace(trace: dict, ops: list[Record], kinds: list | None = None) -> tuple[list[tuple[int, int]], list[int]]:
  """Device-busy intervals and tracer events of a ``jax.profiler`` trace, on the ``perf_counter_ns``
  clock of the profiler's records (RL-Scope, Gleeson et al., MLSys 2021, Sec. 3.2 and 4: device time
  for the CPU/GPU overlap split, and every event the tracer records as one unit of the ``trace``
  overhead source).

  Clock alignment: the k-th ``'rlscope/<name>'`` annotation (a complete event, ``ph == 'X'``, in
  microseconds) is matched with the k-th recorded operation ``<name>`` of ``ops`` (by start time); the
  offset is the median of ``annotation ts * 1e3 - record start`` over all matches, and is subtracted
  from every event. Device intervals are the complete events of ``/device:*`` processes (GPU/TPU);
  when there is none (the CPU backend) the events of XLA:CPU executor threads (``*CpuClient*`` /
  ``*Eigen*``, excluding the annotating threads, bookkeeping markers and compiler passes). Their union
  is returned.

  Args:
    trace: a chrome-trace dict with a ``'traceEvents'`` list (:func:`load_trace`).
    ops: the profiler's operation records (``Record`` with ``kind == 'operation'``).
    kinds: None, or a list that receives one label of :data:`TRACE_KINDS` per complete event, in
      event order: ``annotation`` (this profiler's), ``host_thread`` (other events on an annotating
      thread), ``device`` (device processes), ``executor`` (any other thread).

  Returns:
    ``(device-busy union [(start_ns, end_ns)] sorted and disjoint, sorted start times (ns) of all
    complete events)``.

  Raises:
    TypeError: ``trace`` has no ``'traceEvents'`` list, or ``kinds`` is not a list. ValueError: ``ops``
    is non-empty but the trace has no annotation, or none matches a recorded operation (the trace
    belongs to another run); or a complete event's ``ts``/``dur`` is not a finite number or ``dur < 0``
    (a corrupt trace).

  Example:
    >>> from mlsys_jax.profile.scopes import Record
    >>> ev = [{"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
    ...       {"ph": "X", "name": "rlscope/step", "pid": 1, "tid": 1, "ts": 10.0, "dur": 5.0},
    ...       {"ph": "X", "name": "kernel", "pid": 2, "tid": 7, "ts": 11.0, "dur": 2.0}]
    >>> parse_trace({"traceEvents": ev}, [Record("operation", "step", 1000, 6000, "p")])
    ([(2000, 4000)], [1000, 2000])
  """
  if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
    raise TypeError(f"trace must be a chrome-trace dict with a 'traceEvents' list (profile.load_trace(path)), "
                    f"got {type(trace).__name__}" + (f" with keys {sorted(trace)[:5]}" if isinstance(trace, dict)
                                                      else "") + ".")
  if kinds is not None and not isinstance(kinds, list):
    raise TypeError(f"kinds must be None or a list to fill with one TRACE_KINDS label per event, got "
                    f"{type(kinds).__name__}.")
  ev = trace["traceEvents"]
  pname: dict = {}
  tname: dict = {}
  for e in ev:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      pname[e.get("pid")] = str(e.get("args", {}).get("name", ""))
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      tname[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
  xs = [e for e in ev if e.get("ph") == "X" and "ts" in e and "dur" in e]
  _check_events(xs)
  anns = [e for e in xs if str(e.get("name", "")).startswith(_ANN_PREFIX)]
  if not anns and ops:
    raise ValueError("the trace has no operation annotations ('rlscope/<name>' TraceAnnotations); it was not "
                     "collected by this profiler at level='trace' or comes from another tool version.")
  # Align: k-th annotation of a name <-> k-th recorded operation of that name.
  by_name: dict[str, list[float]] = {}
  for e in sorted(anns, key=lambda e: float(e["ts"])):
    by_name.setdefault(e["name"][len(_ANN_PREFIX):], []).append(float(e["ts"]))
  offs = []
  seen: dict[str, int] = {}
  for r in sorted(ops, key=lambda r: r.start):
    k = seen.get(r.name, 0)
    seen[r.name] = k + 1
    lst = by_name.get(r.name, [])
    if k < len(lst):
      offs.append(lst[k] * 1e3 - r.start)
  if ops and not offs:
    raise ValueError("no trace annotation matches a recorded operation; the trace belongs to another run.")
  off = float(np.median(offs)) if offs else 0.0
  dev_pids = {p for p, n in pname.items() if n.startswith("/device:")}
  ann_threads = {(e.get("pid"), e.get("tid")) for e in anns}
  out = []
  host = []
  for e in xs:
    name = str(e.get("name", ""))
    key = (e.get("pid"), e.get("tid"))
    host.append(int(float(e["ts"]) * 1e3 - off))
    if kinds is not None:
      kinds.append("annotation" if name.startswith(_ANN_PREFIX) else "device" if e.get("pid") in dev_pids
                   else "host_thread" if key in ann_threads else "executor")
    if dev_pids:
      if e.get("pid") not in dev_pids:
        continue
    else:  # CPU backend: XLA worker threads of the host process
      tn = tname.get(key, "").lower()
      if key in ann_threads or not any(w in tn for w in _CPU_EXECUTOR_THREADS):
        continue
      if name.startswith(("ThreadpoolListener", "end: ", "$", "ThunkExecutor")) or _is_compiler(name):
        continue
    s = float(e["ts"]) * 1e3 - off
    out.append((int(s), int(s + float(e["dur"]) * 1e3)))
  return _union(out), sorted(host)


def _check_events(xs: list) -> None:
  # A corrupt complete event would crash below with a bare float/int error (NaN, inf, not a number) or, with
  # a negative duration, silently drop device time: refuse it here, naming the event.
  for e in xs:
    bad = None
    try:
      ts, dur = float(e["ts"]), float(e["dur"])
    except (TypeError, ValueError):
      bad = "ts and dur must be numbers"
    else:
      if not (math.isfinite(ts) and math.isfinite(dur)):
        bad = "ts and dur must be finite"
      elif dur < 0:
        bad = "dur must be >= 0"
    if bad:
      raise ValueError(f"trace event {e.get('name', '')!r} (pid {e.get('pid')}, tid {e.get('tid')}) has "
                       f"ts={e['ts']!r}, dur={e['dur']!r}: {bad} (microseconds); the trace is corrupt, "
                       "collect it again with Profiler(level='trace').")


_CPU_EXECUTOR_THREADS = ("cpuclient", "eigen")  # XLA:CPU program threads (compiler threads differ)


def _is_compiler(name: str) -> bool:
  # The CPU backend compiles on the same worker threads that run programs; keep compiler passes out.
  low = name.lower()
  return low.endswith("pass") or "compil" in low or "lower" in low or "optimiz" in low or "llvm" in low


def _innermost(active: list[Record]) -> Record | None:
  best = None
  for r in active:
    if best is None or r.start > best.start or (r.start == best.start and r.end < best.end):
      best = r
  return best


def attribute(prof: Profiler, trace: dict | None = None) -> Attribution:
  """Split the wall time of a finished profiler run by (phase, operation) and category.

  ``trace`` defaults to the profiler's own trace (``prof.trace_path``) when it collected one; without a
  trace, device columns are zero and ``has_device`` is False (CPU categories only). A trace is aligned
  with the profiler's clock through the operations' annotations: when the run recorded no operation it
  cannot be aligned, so it is not used either (``has_device`` False, ``note`` says why).

  Raises:
    TypeError: ``prof`` is not a :class:`Profiler`. ValueError: it has not run, or ``trace`` is
    malformed or belongs to another run (:func:`parse_trace`).
  """
  if not isinstance(prof, Profiler):
    raise TypeError(f"prof must be a finished profile.Profiler (`with Profiler(...) as prof:`), got "
                    f"{type(prof).__name__}.")
  if prof.end_ns <= prof.start_ns:
    raise ValueError("the profiler has not run; use it as `with Profiler(...) as prof:` first.")
  lo, hi = prof.start_ns, prof.end_ns
  recs = [r._replace(start=max(r.start, lo), end=min(r.end, hi)) for r in prof._records]
  recs = [r for r in recs if r.end > r.start]
  ops = [r for r in recs if r.kind == "operation"]
  cats = [r for r in recs if r.kind != "operation"]
  note = prof.degraded or ""
  dev: list[tuple[int, int]] = []
  host_ev: list[int] = []
  has_device = False
  if trace is None and prof.trace_path:
    trace = load_trace(prof.trace_path)
  if trace is not None:
    dev_all, host_ev = parse_trace(trace, ops)
    if ops:
      dev = [(max(a, lo), min(b, hi)) for a, b in dev_all if b > lo and a < hi]
      host_ev = [t for t in host_ev if lo <= t < hi]
      has_device = True
    else:  # no annotation to align the trace's clock with: its times would land anywhere
      host_ev = []
      note = "; ".join(n for n in (note, "device trace not used: no operation was recorded to align its clock "
                                   "(wrap the workload in profile.operation(...)); CPU categories only") if n)
  elif not note:
    note = f"no device trace (level={prof.level!r}); CPU categories only"
  # Phase changes are timestamped on the records' clock: time outside every operation belongs to the phase
  # active at that instant (segments are split at each change), not to the phase current when the run ended.
  ph_t = [t for t, _ in prof._phase_log]
  ph_n = [n for _, n in prof._phase_log]

  def phase_at(t: int) -> str:
    i = bisect.bisect_right(ph_t, t) - 1
    return ph_n[i] if i >= 0 else _DEFAULT_PHASE

  pts = sorted({lo, hi, *(r.start for r in recs), *(r.end for r in recs), *(a for a, _ in dev),
                *(b for _, b in dev), *(t for t in ph_t if lo < t < hi)})
  zero = {c: 0 for c in (*HOST_CATEGORIES, *RESOURCES, "total", "device")}
  table: dict = {}
  by_start_o = sorted(ops, key=lambda r: r.start)
  by_start_c = sorted(cats, key=lambda r: r.start)
  io = ic = idev = 0
  act_o: list[Record] = []
  act_c: list[Record] = []
  seg_t: list[int] = []
  seg_key: list[tuple] = []
  for t0, t1 in zip(pts[:-1], pts[1:]):
    while io < len(by_start_o) and by_start_o[io].start <= t0:
      act_o.append(by_start_o[io]); io += 1
    while ic < len(by_start_c) and by_start_c[ic].start <= t0:
      act_c.append(by_start_c[ic]); ic += 1
    act_o = [r for r in act_o if r.end > t0]
    act_c = [r for r in act_c if r.end > t0]
    o = _innermost(act_o)
    c = _innermost(act_c)
    key = (o.phase, o.name) if o is not None else (phase_at(t0), NONE_OP)
    cat = c.kind if c is not None else "python"
    while idev < len(dev) and dev[idev][1] <= t0:
      idev += 1
    busy = idev < len(dev) and dev[idev][0] <= t0
    d = t1 - t0
    row = table.setdefault(key, dict(zero))
    row[cat] += d
    row["total"] += d
    if busy:
      row["device"] += d
    if cat == "wait":
      row["device_only" if busy else "idle_wait"] += d
    else:
      row["overlap" if busy else "cpu_only"] += d
    seg_t.append(t0)
    seg_key.append(key)
  # Instrumentation events, located where their book-keeping ran.
  counts: dict = {k: {s: 0 for s in SOURCES} for k in table}

  def where(t: int) -> tuple:
    i = bisect.bisect_right(seg_t, t) - 1
    return seg_key[i] if i >= 0 else (phase_at(t), NONE_OP)

  for r in recs:
    if r.kind == "operation" or r.kind == "simulator":
      k = where(r.start - 1)  # enter/exit cost lands in the enclosing operation
      counts.setdefault(k, {s: 0 for s in SOURCES})
      counts[k]["scope"] += 1
    elif r.kind != "compile":
      k = where(r.start)
      counts.setdefault(k, {s: 0 for s in SOURCES})
      counts[k]["intercept"] += 1
  for t in host_ev:
    k = where(t)
    counts.setdefault(k, {s: 0 for s in SOURCES})
    counts[k]["trace"] += 1
  for k in counts:
    table.setdefault(k, dict(zero))
  return Attribution(table, counts, hi - lo, has_device, note)


def summarize(a: Attribution, by_phase: bool = False) -> dict:
  """Merge ``a.table`` over phases (or keep ``(phase, op)`` keys) into ``{op: {column: seconds}}``."""
  out: dict = {}
  for (ph, op), row in a.table.items():
    key = f"{ph}/{op}" if by_phase else op
    acc = out.setdefault(key, {})
    for c, v in row.items():
      acc[c] = acc.get(c, 0.0) + v / 1e9
  return out
