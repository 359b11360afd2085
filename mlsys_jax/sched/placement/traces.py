"""Workloads for the placement simulator: synthetic Lambda-like traces and a CSV loader.

FirePlace (Balaji et al., MLSys 2021, Sec. 2) describes AWS Lambda micro-VMs as short-lived, arriving in
bursts, with spiky CPU use over an idle baseline, a handful of VM sizes, and a heavy-tailed lifetime
distribution; its production trace is not public. :func:`synthetic_trace` draws traces with those
properties (seeded, ``jax.random``, jittable, vmappable over keys). Usage values are rounded to
multiples of 1/256 of a unit capacity so that sums are exact in float32 (the jax and numpy simulators then
agree bit for bit).

CSV format (:func:`load_csv_trace`), one row per VM per time step it is alive, header required::

  vm_id,time,cpu,mem,size_cpu,size_mem,type
  a,0,0.05,0.10,0.25,0.125,1
  a,1,0.25,0.10,0.25,0.125,1
  b,1,0.01,0.02,0.125,0.125,0

``time`` is an integer step; a VM arrives at its first ``time`` and lives until its last (missing steps
in between use 0); each ``(vm_id, time)`` appears at most once; ``size_*`` (its reservation) and
``type`` (an integer >= 0) must be constant per VM; VMs must appear in the file in arrival order (sort
by arrival time).
"""

from __future__ import annotations

import csv
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax._checks import check_choice, check_int, check_range
from mlsys_jax.sched.placement.sim import Trace, _check_vm_types

__all__ = ["WORKLOADS", "VM_SIZES", "synthetic_trace", "make_trace", "load_csv_trace"]

WORKLOADS = ("spiky", "bursty", "steady")
# (cpu, mem) sizes of the four VM types, as fractions of a unit machine, and their mix.
VM_SIZES = ((0.0625, 0.0625), (0.125, 0.0625), (0.0625, 0.125), (0.1875, 0.125))
_TYPE_PROBS = (0.4, 0.25, 0.2, 0.15)
_SPIKE_PROB = (0.05, 0.15, 0.35, 0.6)   # per-step probability that a VM of each type is busy
_LIFE_SCALE = (3.0, 6.0, 4.0, 10.0)      # Pareto scale (minimum lifetime) per type
_STEADY_LEVEL = (0.2, 0.4, 0.5, 0.7)     # steady workload: constant CPU use as a fraction of the size
_Q = 256.0                               # usage grid: multiples of 1/256


def _quantize(x):
  return jnp.round(x * _Q) / _Q


@functools.partial(jax.jit, static_argnames=("n_vms", "horizon", "max_life", "workload"))
def _synth(key, n_vms, horizon, max_life, workload, span):
  k_type, k_gap, k_burst, k_life, k_spike, k_amp, k_mem = jax.random.split(key, 7)
  n, l = n_vms, max_life
  typ = jax.random.categorical(k_type, jnp.log(jnp.array(_TYPE_PROBS)), shape=(n,)).astype(jnp.int32)
  sizes = jnp.array(VM_SIZES, jnp.float32)[typ]
  # Arrivals: Poisson (exponential gaps) or bursty (a two-state regime flips with prob 0.05 per arrival;
  # gaps are 8x shorter in a burst). The N arrivals spread over the first ``span`` of the horizon.
  gaps = jax.random.exponential(k_gap, (n,))
  if workload == "bursty":
    regime = jnp.cumsum(jax.random.bernoulli(k_burst, 0.05, (n,))) % 2
    gaps = gaps * jnp.where(regime == 1, 0.25, 2.0)
  t = jnp.cumsum(gaps)
  t = t / t[-1] * span * horizon
  arrival = jnp.clip(jnp.floor(t), 0, horizon - 1).astype(jnp.int32)
  # Heavy-tailed lifetimes: Pareto(alpha=1.2) with a per-type scale, capped at L.
  pareto = jax.random.pareto(k_life, 1.2, (n,))
  life = jnp.clip(jnp.ceil(jnp.array(_LIFE_SCALE)[typ] * pareto), 1, l).astype(jnp.int32)
  alive = jnp.arange(l)[None, :] < life[:, None]
  if workload == "steady":
    cpu = jnp.array(_STEADY_LEVEL)[typ][:, None] * sizes[:, :1] * jnp.ones((n, l))
    mem = 0.6 * sizes[:, 1:2] * jnp.ones((n, l))
  else:
    busy = jax.random.uniform(k_spike, (n, l)) < jnp.array(_SPIKE_PROB)[typ][:, None]
    amp = jax.random.uniform(k_amp, (n, l), minval=0.5, maxval=1.0)
    cpu = sizes[:, :1] * jnp.where(busy, amp, 0.08)
    base = jax.random.uniform(k_mem, (n, 1), minval=0.3, maxval=0.7)
    mem = sizes[:, 1:2] * jnp.minimum(base + 0.25 * busy, 1.0)
  usage = jnp.stack([cpu, mem], -1) * alive[..., None]
  usage = jnp.minimum(_quantize(usage), sizes[:, None, :])
  return Trace(arrival, usage.astype(jnp.float32), life, sizes, typ, jnp.ones((n,), bool))


def synthetic_trace(key: jax.Array, *, n_vms: int = 1024, horizon: int = 512, max_life: int = 64,
                    workload: str = "spiky", span: float = 0.9) -> Trace:
  """A synthetic Lambda-like trace (see the module docstring).

  Four VM types with sizes :data:`VM_SIZES` (CPU, memory as fractions of a unit machine); heavy-tailed
  (Pareto 1.2) lifetimes capped at ``max_life``; usage depends on the type, which is observable at
  arrival while the usage is not.

  Args:
    key: PRNG key (the seed of the trace).
    n_vms: VMs in the trace.  horizon: time steps.  max_life: longest lifetime ``L`` (buffer length).
    workload: ``'spiky'`` (Poisson arrivals; each step a VM is busy, using 50-100% of its CPU size, with
      a per-type probability, else idles at 8%; memory: a per-VM baseline of 30-70% of its size, +25%
      when busy), ``'bursty'`` (the same usage, arrivals in bursts), ``'steady'`` (Poisson arrivals,
      constant per-type usage).
    span: the arrivals spread over the first ``span`` (in (0, 1]) of the horizon (smaller: more load).

  Returns:
    A :class:`Trace` with ``N = n_vms`` VMs and ``L = max_life``.

  Example:
    >>> tr = synthetic_trace(jax.random.PRNGKey(0), n_vms=16, horizon=32, max_life=8)
    >>> tr.usage.shape, bool(jnp.all(tr.usage <= tr.size[:, None, :]))
    ((16, 8, 2), True)
  """
  check_int("n_vms", n_vms, 1)
  check_int("horizon", horizon, 1)
  check_int("max_life", max_life, 1)
  check_choice("workload", workload, WORKLOADS)
  check_range("span", span, 0.0, 1.0, low_inclusive=False)
  return _synth(key, n_vms, horizon, max_life, workload, jnp.float32(span))


def make_trace(arrival, usage, size, vm_type=None, lifetime=None) -> Trace:
  """Build a :class:`Trace` from arrays (checked: rank, negative usage, unsorted arrivals, negative or
  non-integer types; :func:`~mlsys_jax.sched.placement.sim.simulate` checks types against ``n_types``).

  Args:
    arrival: [N] integer arrival steps, non-decreasing.
    usage: [N, L, R] usage by age.
    size: [N, R] reservations.
    vm_type: [N] integer types >= 0 (default 0).
    lifetime: [N] lifetimes (default: one past the last nonzero usage step, at least 1).

  Example:
    >>> tr = make_trace([0, 1], np.ones((2, 3, 2)) * 0.25, np.full((2, 2), 0.5))
    >>> tr.lifetime.tolist()
    [3, 3]
  """
  arrival = np.asarray(arrival)
  usage = np.asarray(usage, np.float32)
  size = np.asarray(size, np.float32)
  if arrival.ndim != 1 or usage.ndim != 3 or size.ndim != 2:
    raise ValueError(f"expected arrival [N], usage [N, L, R], size [N, R]; got shapes {arrival.shape}, "
                     f"{usage.shape}, {size.shape}.")
  n = arrival.shape[0]
  if usage.shape[0] != n or size.shape != (n, usage.shape[2]):
    raise ValueError(f"shapes disagree: arrival {arrival.shape}, usage {usage.shape}, size {size.shape}.")
  if not np.issubdtype(arrival.dtype, np.integer):
    raise TypeError(f"arrival must hold integer time steps, got dtype {arrival.dtype}.")
  if np.any(usage < 0) or np.any(size < 0):
    raise ValueError("usage and size must be non-negative (resource amounts).")
  if np.any(np.diff(arrival) < 0):
    i = int(np.argmax(np.diff(arrival) < 0))
    raise ValueError(f"arrivals must be sorted (non-decreasing): VM {i + 1} arrives at {arrival[i + 1]} "
                     f"after VM {i} at {arrival[i]}. Sort the VMs by arrival time.")
  if lifetime is None:
    nz = np.any(usage > 0, axis=2)
    last = np.where(nz.any(1), usage.shape[1] - np.argmax(nz[:, ::-1], axis=1), 1)
    lifetime = np.maximum(last, 1)
  if vm_type is None:
    vm_type = np.zeros(n, np.int32)
  else:
    vm_type = np.asarray(vm_type)
    _check_vm_types(vm_type, np.ones(n, bool), None, "make_trace")
    vm_type = vm_type.astype(np.int32)
  return Trace(jnp.asarray(arrival, jnp.int32), jnp.asarray(usage), jnp.asarray(lifetime, jnp.int32),
               jnp.asarray(size), jnp.asarray(vm_type), jnp.ones((n,), bool))


def load_csv_trace(path: str, *, max_life: int | None = None, n_pad: int | None = None) -> Trace:
  """Load a trace in the CSV format of the module docstring.

  Args:
    path: CSV file.
    max_life: buffer length ``L`` (default: the longest lifetime in the file); longer VMs are an error.
    n_pad: pad to this many VMs with invalid rows (so traces of different lengths can be batched).

  Returns:
    A :class:`Trace` (resources: CPU, memory).

  Raises:
    ValueError: a missing column, an unparsable value, negative usage or type, two rows for the same
      ``(vm_id, time)``, a VM whose size or type changes, VMs out of arrival order, or a VM longer than
      ``max_life``.
  """
  rows: dict[str, list] = {}
  order: list[str] = []
  seen: dict[tuple[str, int], int] = {}  # (vm_id, time) -> line of its row
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    need = {"vm_id", "time", "cpu", "mem", "size_cpu", "size_mem", "type"}
    if reader.fieldnames is None or not need <= set(reader.fieldnames):
      raise ValueError(f"{path}: the header must name the columns {sorted(need)}, got {reader.fieldnames}.")
    for ln, row in enumerate(reader, start=2):
      try:
        rec = (int(row["time"]), float(row["cpu"]), float(row["mem"]), float(row["size_cpu"]),
               float(row["size_mem"]), int(row["type"]))
      except (TypeError, ValueError) as e:
        raise ValueError(f"{path}:{ln}: cannot parse {row} ({e}).") from None
      if rec[1] < 0 or rec[2] < 0:
        raise ValueError(f"{path}:{ln}: negative usage {rec[1:3]} for VM {row['vm_id']}; usage must be >= 0.")
      if rec[5] < 0:
        raise ValueError(f"{path}:{ln}: negative type {rec[5]} for VM {row['vm_id']}; VM types are integers "
                         "numbered from 0.")
      first = seen.setdefault((row["vm_id"], rec[0]), ln)
      if first != ln:
        raise ValueError(f"{path}:{ln}: VM {row['vm_id']} has a second row for time {rec[0]} (the first is on "
                         f"line {first}); give one row per VM per time step (sum or drop the duplicates).")
      if row["vm_id"] not in rows:
        rows[row["vm_id"]] = []
        order.append(row["vm_id"])
      rows[row["vm_id"]].append(rec)
  if not order:
    raise ValueError(f"{path}: no VMs in the file.")
  arrival, lives, sizes, types = [], [], [], []
  for v in order:
    recs = rows[v]
    times = [r[0] for r in recs]
    arrival.append(min(times))
    lives.append(max(times) - min(times) + 1)
    if len({r[3:] for r in recs}) != 1:
      raise ValueError(f"{path}: VM {v} changes its size or type between rows; they must be constant.")
    sizes.append(recs[0][3:5])
    types.append(recs[0][5])
  l = max(lives) if max_life is None else max_life
  if max(lives) > l:
    raise ValueError(f"a VM lives {max(lives)} steps, longer than max_life={l}; raise max_life.")
  n = len(order) if n_pad is None else n_pad
  if n < len(order):
    raise ValueError(f"n_pad={n_pad} is smaller than the {len(order)} VMs in the file.")
  usage = np.zeros((n, l, 2), np.float32)
  for i, v in enumerate(order):
    for t, c, mem, *_ in rows[v]:
      usage[i, t - arrival[i]] = (c, mem)
  arr = np.asarray(arrival + [max(arrival)] * (n - len(order)), np.int64)
  if np.any(np.diff(arr[:len(order)]) < 0):
    i = int(np.argmax(np.diff(arr) < 0))
    raise ValueError(f"{path}: VMs must appear in arrival order; {order[i + 1]} arrives at {arr[i + 1]} "
                     f"after {order[i]} at {arr[i]}. Sort the file by arrival time.")
  size = np.zeros((n, 2), np.float32)
  size[:len(order)] = sizes
  typ = np.zeros(n, np.int32)
  typ[:len(order)] = types
  life = np.ones(n, np.int32)
  life[:len(order)] = lives
  valid = np.arange(n) < len(order)
  return Trace(jnp.asarray(arr, jnp.int32), jnp.asarray(usage), jnp.asarray(life), jnp.asarray(size),
               jnp.asarray(typ), jnp.asarray(valid))
