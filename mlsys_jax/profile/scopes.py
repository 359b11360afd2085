"""Operation scopes, phases and interception points of the RL-Scope profiler (Gleeson et al., MLSys 2021).

RL-Scope (Gleeson, Krishnan, Gabel, Janapa Reddi, de Lara, Pekhimenko, "RL-Scope: Cross-stack Profiling for
Deep Reinforcement Learning Workloads", MLSys 2021, Sec. 3) lets the user annotate high-level *operations*
(``inference``, ``simulation``, ``backpropagation``) and *phases*; the profiler then attributes the time
inside each operation to event categories. Here the categories mean something in JAX:

* ``python``: time inside an operation not covered by any other category (the user's Python);
* ``simulator``: time inside a user-marked :func:`simulator` scope (RL-Scope's "Simulator" category);
* ``dispatch``: time inside a call of a :func:`jit`-wrapped function (tracing-cache lookup, argument
  handling, launching the executable; on the CPU backend small programs also run inline here);
* ``compile``: jaxpr tracing, lowering and backend compilation, reported by ``jax.monitoring``;
* ``transfer``: :func:`device_put` / :func:`device_get` (host <-> device copies);
* ``wait``: :func:`block_until_ready` (the host waits for the device).

Time is read with ``time.perf_counter_ns`` (tens of nanoseconds per read). Innermost wins: at every
instant the time belongs to the innermost open operation and the innermost open category.

Global state is limited to one documented context variable, the *current profiler*
(:data:`CURRENT`), set by ``with profiler:``; module-level :func:`operation`, :func:`simulator`,
:func:`jit`, ... record into it and are no-ops (a few hundred nanoseconds) when no profiler is active,
so library code can stay annotated. One ``jax.monitoring`` duration listener is registered while a
profiler is active (removed when the last one stops) to catch compile events.

Bad scopes are errors, never a silent mis-attribution: closing a scope that is not the innermost open one
(unbalanced), opening an operation whose name is already open (nested same name; use distinct names) and
stopping a profiler with scopes still open all raise ``ValueError``.

>>> import jax.numpy as jnp
>>> from mlsys_jax import profile
>>> f = profile.jit(lambda x: x * 2.0)
>>> with profile.Profiler(level="intercept") as prof:
...   with profile.operation("inference"):
...     y = profile.block_until_ready(f(jnp.ones(3)))
>>> [r.name for r in prof.records if r.kind == "operation"]
['inference']
"""

from __future__ import annotations

import contextvars
import functools
import threading
import time
from typing import Any, Callable, NamedTuple

import jax

from mlsys_jax._checks import check_choice

LEVELS = ("off", "scopes", "intercept", "trace")
"""Instrumentation levels, each including the previous: ``off`` records nothing (the uninstrumented
baseline), ``scopes`` records operations/phases/simulator scopes, ``intercept`` also records dispatch,
compile and transfer events, ``trace`` also collects a ``jax.profiler`` trace and emits a
``TraceAnnotation`` per scope (device time)."""

HOST_CATEGORIES = ("python", "simulator", "dispatch", "compile", "transfer", "wait")
SOURCES = ("scope", "intercept", "trace")
"""Instrumentation sources whose per-event cost is calibrated (see :mod:`mlsys_jax.profile.overhead`)."""

_now = time.perf_counter_ns
_DEFAULT_PHASE = "default"  # the phase before the first set_phase

CURRENT: contextvars.ContextVar["Profiler | None"] = contextvars.ContextVar("mlsys_jax_profile_current",
                                                                            default=None)
"""The current profiler (set by ``with Profiler(...)``); the only global state of this package."""


class Record(NamedTuple):
  """One host interval. ``kind`` is ``'operation'`` or a host category; times are perf_counter ns."""
  kind: str
  name: str
  start: int
  end: int
  phase: str


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")

_listener_lock = threading.Lock()
_listener_users = 0


def _compile_listener(event: str, duration_secs: float, **kwargs) -> None:
  if event not in _COMPILE_EVENTS:
    return
  p = CURRENT.get()
  if p is None or p._lvl < 2:
    return
  end = _now()
  p._records.append(Record("compile", event.rsplit("/", 1)[-1], end - int(duration_secs * 1e9), end, p._phase))


def _listener_acquire() -> None:
  global _listener_users
  with _listener_lock:
    if _listener_users == 0:
      jax.monitoring.register_event_duration_secs_listener(_compile_listener)
    _listener_users += 1


def _listener_release() -> None:
  global _listener_users
  with _listener_lock:
    _listener_users -= 1
    if _listener_users == 0:
      unreg = getattr(jax.monitoring, "unregister_event_duration_listener", None)
      if unreg is None:  # older jax: private helper
        from jax._src import monitoring as _m
        unreg = getattr(_m, "_unregister_event_duration_listener_by_callback")
      unreg(_compile_listener)


class Profiler:
  """Records operations, phases and JAX events of one run (RL-Scope, Gleeson et al., MLSys 2021, Sec. 3).

  Args:
    level: one of :data:`LEVELS`.
    trace_dir: where ``level='trace'`` writes the ``jax.profiler`` trace (a fresh temporary directory
      when ``None``, kept after the run for :attr:`trace_path`: remove it when done). If the profiler
      backend cannot start, the profiler degrades to ``'intercept'`` (CPU categories only), removes the
      directory it made, and says so once with a ``RuntimeWarning``.

  Use it as a context manager (``with Profiler() as prof:``), which makes it :data:`CURRENT`; after the
  block, :attr:`records` holds the host intervals, :attr:`counts` the instrumentation events per source,
  :attr:`phase_changes` the timestamped :meth:`set_phase` calls, :attr:`wall_ns` the elapsed time and
  :attr:`trace_path` the perfetto trace (or ``None``).
  """

  def __init__(self, level: str = "intercept", trace_dir: str | None = None):
    check_choice("level", level, LEVELS)
    self.level = level
    self._lvl = LEVELS.index(level)
    self.trace_dir = trace_dir
    self._records: list[Record] = []
    self._stack: list[tuple[str, int]] = []
    self._open: set[str] = set()
    self._phase = _DEFAULT_PHASE
    self._phase_log: list[tuple[int, str]] = []  # (perf_counter ns, phase) of every set_phase, in order
    self.counts = {s: 0 for s in SOURCES}
    self.trace_kinds: dict = {}  # level='trace': the 'trace' events split by kind (attribution.TRACE_KINDS)
    self.trace_path: str | None = None
    self.degraded: str | None = None
    self.start_ns = self.end_ns = 0
    self.thread_ns = self.process_ns = 0  # CPU time of the calling thread / the process in the window
    self.setup_ns = 0  # one-time trace start/stop cost, outside [start_ns, end_ns]
    self._token = None
    self._annotations: list[Any] = []
    self._tracing = False

  # -- lifecycle ----------------------------------------------------------------------------------
  def __enter__(self) -> "Profiler":
    if self._token is not None:
      raise ValueError("this Profiler is already active; create a new Profiler per run.")
    if self._lvl >= 2:
      _listener_acquire()
    if self._lvl >= 3:
      t = _now()
      self._start_trace()
      self.setup_ns += _now() - t
    self._token = CURRENT.set(self)
    self._t_thread, self._t_proc = time.thread_time_ns(), time.process_time_ns()
    self.start_ns = _now()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.end_ns = _now()
    self.thread_ns = time.thread_time_ns() - self._t_thread
    self.process_ns = time.process_time_ns() - self._t_proc
    CURRENT.reset(self._token)
    if self._lvl >= 2:
      _listener_release()
    if self._tracing:
      t = _now()
      self._stop_trace()
      self.setup_ns += _now() - t
    if self._stack and exc_type is None:
      names = [n for n, _ in self._stack]
      raise ValueError(f"unbalanced scopes: {names} still open when the profiler stopped; close every "
                       "operation (use `with profile.operation(...)`) before leaving the profiler block.")

  @property
  def wall_ns(self) -> int:
    return self.end_ns - self.start_ns

  @property
  def records(self) -> list[Record]:
    return list(self._records)

  @property
  def phase_changes(self) -> list[tuple[int, str]]:
    """Every :meth:`set_phase` as ``(time_ns, phase)``, in call order, on the records' clock
    (``perf_counter_ns``). Phase ``'default'`` is active before the first change;
    :func:`~mlsys_jax.profile.attribute` charges time outside every operation to the phase active at that
    instant."""
    return list(self._phase_log)

  def _start_trace(self) -> None:
    import shutil
    import tempfile
    made = self.trace_dir is None
    if made:
      self.trace_dir = tempfile.mkdtemp(prefix="mlsys_jax_profile_")
    try:
      opts = None
      if hasattr(jax.profiler, "ProfileOptions"):  # no Python-function tracer: it costs ~1 us per call
        opts = jax.profiler.ProfileOptions()
        opts.python_tracer_level = 0
      try:
        jax.profiler.start_trace(self.trace_dir, create_perfetto_trace=True, profiler_options=opts)
      except TypeError:  # an older jax without these options
        jax.profiler.start_trace(self.trace_dir)
      self._tracing = True
    except Exception as e:  # no profiler backend: CPU categories only
      if made:  # nothing was written: leave no empty temporary directory behind
        shutil.rmtree(self.trace_dir, ignore_errors=True)
        self.trace_dir = None
      self._degrade(f"jax.profiler trace unavailable ({type(e).__name__}: {e})")

  def _stop_trace(self) -> None:
    import glob
    import os
    jax.profiler.stop_trace()
    self._tracing = False
    found = sorted(glob.glob(os.path.join(self.trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
                   + glob.glob(os.path.join(self.trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if found:
      self.trace_path = found[-1]
      from mlsys_jax.profile.attribution import TRACE_KINDS, load_trace, parse_trace
      ops = [r for r in self._records if r.kind == "operation"]
      if ops:  # the tracer's events in the window: the unit of the 'trace' overhead source
        kinds: list = []
        host = parse_trace(load_trace(self.trace_path), ops, kinds)[1]
        inside = [k for t, k in zip(host, kinds) if self.start_ns <= t < self.end_ns]
        self.counts["trace"] = len(inside)
        self.trace_kinds = {k: inside.count(k) for k in TRACE_KINDS}
    else:
      self._degrade(f"no trace file written under {self.trace_dir}")

  def _degrade(self, why: str) -> None:
    import warnings
    self.degraded = why
    self._lvl = min(self._lvl, 2)
    if why not in _warned:
      _warned.add(why)
      warnings.warn(f"mlsys_jax.profile: {why}; device time unavailable, reporting CPU categories only.",
                    RuntimeWarning, stacklevel=3)

  # -- scopes ---------------------------------------------------------------------------------------
  def push(self, name: str) -> None:
    """Open operation ``name`` (prefer ``with operation(name)``)."""
    if self._lvl == 0:
      return
    if name in self._open:
      raise ValueError(f"operation {name!r} is already open (nested scopes with the same name would "
                       "double-count its time); give the inner scope a distinct name.")
    self.counts["scope"] += 1
    if self._tracing:
      a = jax.profiler.TraceAnnotation(_ANN_PREFIX + name)
      a.__enter__()
      self._annotations.append(a)
    self._open.add(name)
    self._stack.append((name, _now()))

  def pop(self, name: str) -> None:
    """Close operation ``name``; it must be the innermost open operation."""
    if self._lvl == 0:
      return
    t1 = _now()
    if not self._stack or self._stack[-1][0] != name:
      top = self._stack[-1][0] if self._stack else None
      raise ValueError(f"unbalanced scopes: closing {name!r} but the innermost open operation is {top!r}.")
    _, t0 = self._stack.pop()
    self._open.discard(name)
    self._records.append(Record("operation", name, t0, t1, self._phase))
    if self._annotations:
      self._annotations.pop().__exit__(None, None, None)

  def set_phase(self, name: str) -> None:
    """Label every following record with phase ``name`` (RL-Scope's ``set_phase``).

    The change is timestamped (:attr:`phase_changes`, at every level: one clock read per call), so that
    :func:`~mlsys_jax.profile.attribute` charges time outside every operation to the phase active at that
    instant rather than to the last phase of the run. An operation keeps the phase current when it closes.
    """
    if not isinstance(name, str) or not name:
      raise TypeError(f"phase must be a non-empty string, got {name!r}.")
    self._phase_log.append((_now(), name))
    self._phase = name

  def _category(self, kind: str, name: str, t0: int, t1: int) -> None:
    self._records.append(Record(kind, name, t0, t1, self._phase))


_warned: set[str] = set()
_ANN_PREFIX = "rlscope/"  # no ":" (the trace converter splits names at ":")


class _Scope:
  """Context manager and decorator for :func:`operation` / :func:`simulator`."""
  __slots__ = ("name", "kind", "_prof", "_t0")

  def __init__(self, name: str, kind: str):
    if not isinstance(name, str) or not name:
      raise TypeError(f"scope name must be a non-empty string, got {name!r}.")
    self.name, self.kind = name, kind
    self._prof = None

  def __enter__(self):
    p = CURRENT.get()
    if p is None or p._lvl == 0:
      self._prof = None
      return self
    if self._prof is not None:
      raise ValueError(f"scope {self.name!r} object is already entered; create a new scope per use "
                       "(call profile.operation(...) again) or use it as a decorator.")
    self._prof = p
    if self.kind == "operation":
      p.push(self.name)
    else:
      p.counts["scope"] += 1
      self._t0 = _now()
    return self

  def __exit__(self, exc_type, exc, tb):
    p, self._prof = self._prof, None
    if p is None:
      return False
    if self.kind == "operation":
      p.pop(self.name)
    else:
      p._category(self.kind, self.name, self._t0, _now())
    return False

  def __call__(self, fn: Callable) -> Callable:
    name, kind = self.name, self.kind

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
      with _Scope(name, kind):
        return fn(*args, **kwargs)
    return wrapped


def operation(name: str) -> _Scope:
  """An operation scope (context manager or decorator) on the current profiler; a no-op without one."""
  return _Scope(name, "operation")


def simulator(name: str = "simulator") -> _Scope:
  """Mark time as ``simulator`` (RL-Scope's Simulator category) inside the enclosing operation."""
  return _Scope(name, "simulator")


def set_phase(name: str) -> None:
  """Set the phase of the current profiler (no-op without one)."""
  p = CURRENT.get()
  if p is not None:
    p.set_phase(name)


def _intercepted(kind: str, name: str, fn: Callable, *args, **kwargs):
  p = CURRENT.get()
  if p is None or p._lvl < 2:
    return fn(*args, **kwargs)
  p.counts["intercept"] += 1
  t0 = _now()
  out = fn(*args, **kwargs)
  p._records.append(Record(kind, name, t0, _now(), p._phase))
  return out


def jit(fn: Callable, **jit_kwargs) -> Callable:
  """``jax.jit(fn, **jit_kwargs)`` whose calls are recorded as ``dispatch`` (compile inside them as
  ``compile``) when a profiler at level >= ``'intercept'`` is current."""
  jf = jax.jit(fn, **jit_kwargs)
  name = getattr(fn, "__name__", "jitted")

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    return _intercepted("dispatch", name, jf, *args, **kwargs)
  wrapped.jitted = jf
  return wrapped


def device_put(x: Any, *args, **kwargs) -> Any:
  """``jax.device_put`` recorded as ``transfer``."""
  return _intercepted("transfer", "device_put", jax.device_put, x, *args, **kwargs)


def device_get(x: Any) -> Any:
  """``jax.device_get`` recorded as ``transfer``."""
  return _intercepted("transfer", "device_get", jax.device_get, x)


def block_until_ready(x: Any) -> Any:
  """``jax.block_until_ready`` recorded as ``wait``."""
  return _intercepted("wait", "block_until_ready", jax.block_until_ready, x)
