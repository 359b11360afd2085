"""Shared helpers of the GPU benchmark scripts: environment record, bandwidth probe, JSON output."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform

import jax
import jax.numpy as jnp

from mlsys_jax import stats
from mlsys_jax.cost.dataset import split_calls


@contextlib.contextmanager
def sparse_switches(values: dict):
  """Set module switches of :mod:`mlsys_jax.comm.sparse` (``{"_FLAT_KEPT": "buffer", ...}``) inside the block and
  restore them after it, also on an exception; they are read while a function is traced (and, for some, at
  ``init``), so trace and initialize inside the block."""
  from mlsys_jax.comm import sparse as sp
  prev = {k: getattr(sp, k) for k in values}
  try:
    for k, v in values.items():
      setattr(sp, k, v)
    yield
  finally:
    for k, v in prev.items():
      setattr(sp, k, v)


def parse_args(description: str | None = None, extra=None) -> argparse.Namespace:
  """The flags every benchmark takes: ``--out`` (JSON directory, default $OUT) and ``--small`` (tiny
  sizes for a CPU smoke test); ``extra(parser)`` adds a script's own flags."""
  ap = argparse.ArgumentParser(description=description)
  if extra is not None:
    extra(ap)
  ap.add_argument("--out", default=None, help="directory for the JSON result (default: $OUT)")
  ap.add_argument("--small", action="store_true", help="tiny sizes for a CPU smoke test")
  return ap.parse_args()


def environment() -> dict:
  d = jax.devices()[0]
  return {"date": datetime.date.today().isoformat(), "device": getattr(d, "device_kind", d.platform),
          "platform": d.platform, "num_devices": jax.device_count(), "jax": jax.__version__,
          "python": platform.python_version()}


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
  """Device copy bandwidth in bytes/s, counting bytes read plus bytes written (x -> x * 1 + 0)."""
  n = nbytes // 4
  x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0000001)
  g = jax.jit(lambda a: a + 1.0)
  t = stats.time_interleaved(lambda: f(x), lambda: g(x), repeats=repeats, warmup=3)
  return 2 * 4 * n / min(t.median_a, t.median_b)


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
  """Device read bandwidth in bytes/s by a fixed method: a float32 sum over ``nbytes`` (1 GiB, far larger
  than any L2), inside one jitted loop of 10 reductions, median of ``repeats`` timed calls after warm-up.
  Each reduction reads the array once: ``sum(a * s)`` with a scalar ``s`` that depends on the loop carry
  (so it cannot be hoisted) fuses into one reduction. (Until 2026-12-02 the sum went through an
  optimization barrier on ``a + acc * 0``, which materialized a 1 GiB temporary: three passes counted as
  one, about a third of the true figure, e.g. 1.36 TB/s on an H200.) Use it as the floor of kernels that
  read their input once, so the floor does not move with a copy measurement's write half."""
  import time
  import numpy as np
  n = nbytes // 4
  x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)

  @jax.jit
  def ten_sums(a):
    def body(i, acc):
      return acc + jnp.sum(a * (1.0 + acc * 0.0))
    return jax.lax.fori_loop(0, 10, body, jnp.float32(0))

  jax.block_until_ready(ten_sums(x))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(ten_sums(x))
    ts.append((time.perf_counter() - t0) / 10)
  return 4 * n / float(np.median(ts))


def device_stream_events(run, host: bool = False):
  """Run ``run()`` under one ``jax.profiler`` trace and return the GPU kernel events of every stream line,
  sorted by start: ``(start_ns, end_ns, duration_ns, name)``. Raises ``FileNotFoundError`` when the
  profiler wrote no trace. (Shared by the benchmarks that report device time per launch.) ``host``: also
  return the host planes' events (XLA's thunk and CUDA API TraceMe events), sorted by start, as
  ``(start_ns, end_ns, duration_ns, name, thread)``: a pair ``(device, host)``."""
  import glob
  import tempfile
  with tempfile.TemporaryDirectory(prefix="device_events_") as d:   # (the trace is read here, then removed)
    with jax.profiler.trace(d):
      run()
    files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    if not files:
      raise FileNotFoundError(f"no xplane file under {d}")
    prof = jax.profiler.ProfileData.from_file(files[0])
  events = [(ev.start_ns, ev.end_ns, ev.duration_ns, ev.name)
            for plane in prof.planes if plane.name.startswith("/device:GPU")
            for line in plane.lines if "stream" in line.name.lower()
            for ev in line.events]
  if not host:
    return sorted(events)
  hosts = [(ev.start_ns, ev.end_ns, ev.duration_ns, ev.name, line.name)
           for plane in prof.planes if not plane.name.startswith("/device:")
           for line in plane.lines for ev in line.events]
  return sorted(events), sorted(hosts)


def host_overlap(hosts: list, start_ns: float, end_ns: float, n: int = 12) -> list:
  """The host events ``(start_ns, end_ns, duration_ns, name, thread)`` that overlap ``[start_ns, end_ns]``,
  pooled by name: ``(name, overlapped seconds, count)`` for the ``n`` largest overlaps. What the host was
  doing while the device sat idle (e.g. a command buffer's update, a launch, a synchronisation).

  >>> [(k, round(t * 1e9), c) for k, t, c in host_overlap(
  ...     [(0, 10, 10, "a", "t"), (5, 30, 25, "b", "t"), (40, 50, 10, "a", "t")], 8, 20)]
  [('b', 12, 1), ('a', 2, 1)]
  """
  pooled: dict = {}
  for ev in hosts:
    ov = min(ev[1], end_ns) - max(ev[0], start_ns)
    if ov > 0:
      d, c = pooled.get(ev[3], (0, 0))
      pooled[ev[3]] = (d + ov, c + 1)
  top = sorted(pooled.items(), key=lambda t: -t[1][0])[:n]
  return [(k[:90], d * 1e-9, c) for k, (d, c) in top]


def largest_gap_interval(cluster: list) -> tuple:
  """``(start_ns, end_ns)`` of the longest idle gap inside one call's sorted kernel events (``(0, 0)`` when
  there is none).

  >>> largest_gap_interval([(0, 10, 10, "a"), (30, 40, 10, "b"), (41, 50, 9, "c")])
  (10, 30)
  """
  best, end = (0, 0), None
  for ev in cluster:
    if end is not None and ev[0] - end > best[1] - best[0]:
      best = (end, ev[0])
    if end is None or ev[1] >= end:
      end = ev[1]
  return best


def idle_clusters(events: list, gap_ns: float) -> list[list]:
  """Split ``(start_ns, end_ns, ...)`` events, sorted by start, where the device was idle > ``gap_ns``
  (:func:`mlsys_jax.cost.dataset.split_calls`, which the cost collector uses too)."""
  return split_calls(events, gap_ns)


def busy_ns(events) -> float:
  """Nanoseconds in which at least one of ``events`` ``(start_ns, end_ns, ...)`` ran: the union of their intervals.
  Kernels of one command buffer (a CUDA graph whose independent nodes run concurrently) or of several streams
  overlap in time, and the sum of their durations counts the overlap more than once (``busy_s`` of
  ``sidco_tree.py`` / ``sidco_model_step.py`` until session 44, ``kernel_sum_s`` since).

  >>> busy_ns([(0, 10), (5, 12), (20, 30), (21, 22)])
  22
  """
  total, cur_s, cur_e = 0, None, None
  for s, e, *_ in sorted(events):
    if cur_e is None or s > cur_e:
      if cur_e is not None:
        total += cur_e - cur_s
      cur_s, cur_e = s, e
    else:
      cur_e = max(cur_e, e)
  if cur_e is not None:
    total += cur_e - cur_s
  return total


def largest_gaps(cluster: list, n: int = 8) -> tuple[float, list]:
  """The device's idle time inside one call's kernel events ``(start_ns, end_ns, duration_ns, name)``
  (sorted by start): the summed idle seconds between the first start and the last end, and the ``n``
  longest idle gaps as ``(seconds, kernel before, kernel after)``, longest first. Idle gaps are where the
  device waited for the host (launch overhead, a host sync such as a conditional's predicate).

  >>> largest_gaps([(0, 10, 10, "a"), (30, 40, 10, "b"), (41, 50, 9, "c")], 2)
  (2.1e-08, [(2e-08, 'a', 'b'), (1e-09, 'b', 'c')])
  """
  gaps, end, prev = [], None, None
  for ev in cluster:
    if end is not None and ev[0] > end:
      gaps.append(((ev[0] - end) * 1e-9, prev, ev[3]))
    if end is None or ev[1] >= end:
      end, prev = ev[1], ev[3]
  gaps.sort(key=lambda g: -g[0])
  return sum(g[0] for g in gaps), gaps[:n]


def call_device_times(fns: dict, calls: int, per_call: int = 1, gap_s: float = 0.004) -> dict:
  """Device time per operation from ONE profiler trace: each function of ``fns`` runs ``calls`` times alone
  (block, then sleep ``gap_s``); the GPU kernel events split into one cluster per call at idle gaps >
  ``gap_s / 2`` (:func:`idle_clusters`). Per function, per operation (a call makes ``per_call``):
  ``span_s`` (first kernel start to last kernel end, median over calls), ``busy_s`` (kernel durations
  summed), ``kernels`` (launches) and ``kernel_s`` (each kernel name's durations in seconds, every call).
  Raises ``RuntimeError`` when the trace does not split into one cluster per call."""
  import time
  import numpy as np
  names = list(fns)

  def run():
    for nm in names:
      for _ in range(calls):
        jax.block_until_ready(fns[nm]())
        time.sleep(gap_s)

  clusters = idle_clusters(device_stream_events(run), gap_s * 1e9 / 2)
  if len(clusters) != len(names) * calls:
    raise RuntimeError(f"{len(clusters)} kernel clusters for {len(names)} functions x {calls} calls")
  res = {}
  for i, nm in enumerate(names):
    cl = clusters[i * calls:(i + 1) * calls]
    by_name: dict = {}
    for c in cl:
      for ev in c:
        by_name.setdefault(ev[3], []).append(ev[2] * 1e-9)
    res[nm] = {"span_s": float(np.median([max(ev[1] for ev in c) - c[0][0] for c in cl])) * 1e-9 / per_call,
               "busy_s": sum(ev[2] for c in cl for ev in c) * 1e-9 / (calls * per_call),
               "kernels": sum(len(c) for c in cl) / (calls * per_call), "kernel_s": by_name}
  return res


def write_json(out: str | None, name: str, payload: dict) -> None:
  out = out or os.environ.get("OUT") or "results/benchmarks"
  path = pathlib.Path(out)
  path.mkdir(parents=True, exist_ok=True)
  (path / f"{name}.json").write_text(json.dumps(payload, indent=1))
  print(f"wrote {path / (name + '.json')}")


def _cell(v) -> str:
  """Table text of one value: floats with 4 significant digits, everything else as str."""
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def print_table(rows: list[dict], cols: list[str]) -> None:
  """Print ``rows`` (dicts of raw values: seconds, counts, ratios) as an aligned text table. Store the raw
  rows in the JSON; only this printout is formatted."""
  cells = [[_cell(r.get(c, "")) for c in cols] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
  print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
  print("-+-".join("-" * w for w in widths))
  for row in cells:
    print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))
