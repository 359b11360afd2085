"""MicroRec (Jiang et al., MLSys 2021): where a small-batch DLRM call goes, the serving entry point, and the
embedding stage against the random-row gather floor.

Tables: 26 Criteo-sized tables, width 16 (``--spec criteo``); the combined plan is ``optimal_plan`` within
``--budget`` extra storage (26 -> 17 lookups at 5%). The model is the DLRM of the earlier runs (bottom MLP
13-512-256-64-16, dot interaction, top 512-256-1). Three parts (``--parts``), all raw seconds:

``dispatch``: what a jitted call costs before any work: a trivial jitted function with k = 1..48 device
arguments (``noop_s``), the same with one numpy argument (host->device copy), and one device->host copy.

``serve`` (batches ``--serve_batches``): the whole model per call, in two modes. ``user``: numpy dense and
indices in, numpy logits out (as a serving user calls it); ``device``: inputs already on the device, block
on the result. Variants, timed round-robin in the same process (median of ``--serve_rounds``):

- ``per_table``: user code: ``jax.jit(model.apply)(variables, stage, dense, idx)``, one table per
  argument (26 buffers), one ``take`` per table, weights as a pytree (14 arrays);
- ``concat``: the same with the 26 tables concatenated into one buffer (row offsets, one gather);
- ``combined_pytree``: the combined plan through the same user code (buffers per width: 16 and 32);
- ``server_identity``: :class:`microrec.Server` with the per-table plan (one buffer, weights compiled in,
  one int32 array in and one out): the serving design without combination;
- ``server``: :class:`microrec.Server` with the combined plan (``server_auto``: ``impl="auto"``, the
  one-kernel Pallas stage on a GPU; ``server_packed``, ``server_pytree``: its weights as one flat buffer /
  as a pytree argument instead of compiled in; ``server_device_out``: its result as a device array copied
  with ``np.asarray``, instead of written to pinned host memory by the program, the GPU default). Batches
  above 64 travel as two arrays;
- ``per_table_pinned_out`` (user mode): the per-table user code with ``out_shardings`` in pinned host
  memory, to show how much of the server's gain that alone gives.

``model_loop_s``: device time per whole-model call, ``--loop`` calls in one jitted ``fori_loop`` (indices
shift every iteration), and ``empty_loop_s`` the loop alone (index shift + a sum).

``stage`` (batches ``--batches``): the embedding stage per lookup batch for ``per_table``, ``fused`` (one
gather over all tables), ``combined`` (plan, one gather per width) and ``combined_chunks`` (plan, one
gather of gcd-wide chunk rows over ONE buffer): ``stage_loop_s`` inside a ``fori_loop``, ``stage_unrolled_s``
as ``--unroll`` independent lookups in one jitted call (no loop overhead; the kernels queue back to back).
``floor_read_s``: the issue's random-row gather floor, rows x ceil(row bytes / 32) x 32 B over the
measured copy bandwidth (read+write bytes per second); ``floor_rw_s`` adds writing the output once.

``stage_sweep`` (one batch, ``--sweep_batch`` 4096): the stage in DEVICE time from a profiler trace. Each
variant (the XLA paths ``per_table``, ``fused``, ``combined_chunks``, and the Pallas launches of
``--configs``, ``kernel:block:num_warps``; ``identity/...``: on the per-table plan, no combination) is one
jitted call of ``--chain`` lookups on as many index arrays,
chained by optimization barriers (each lookup its own launches, in order); all are compiled and checked bit
for bit against per-table lookups first (embeddings, and the count of out-of-range indices: the last index
array holds 5), then each runs ``--calls`` times alone under ONE trace. Per lookup:
``busy_s`` (its kernels' durations summed: the stage's device time), ``span_s`` (first kernel start to last
end, launch gaps included), ``main_kernel_s`` (the longest kernel alone: for Pallas the one-kernel stage
without the count sum), each over the read and the read+write floor; ``wall_per_lookup_s`` for reference.

  PYTHONPATH=. python benchmarks/microrec_lookup.py --out $OUT          # GPU (H200)
  PYTHONPATH=. python benchmarks/microrec_lookup.py --parts=stage_sweep --tag=sweep --out $OUT
  python benchmarks/microrec_lookup.py --small                           # CPU smoke test (tiny tables)
"""

from __future__ import annotations

import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from mlsys_jax.infer import microrec as mr  # noqa: E402


def _flags(ap):
  ap.add_argument("--spec", default="criteo", choices=["criteo", "alibaba47"])
  ap.add_argument("--budget", type=float, default=0.05, help="extra storage allowed to the combined plan")
  ap.add_argument("--parts", default="dispatch,serve,profile,stage")
  ap.add_argument("--batches", default="1,256,1024,4096", help="stage part")
  ap.add_argument("--serve_batches", default="1,4096")
  ap.add_argument("--tag", default="", help="suffix of the JSON name")
  ap.add_argument("--loop", type=int, default=100, help="calls per jitted fori_loop")
  ap.add_argument("--unroll", type=int, default=8, help="independent stage lookups per unrolled call")
  ap.add_argument("--rounds", type=int, default=30, help="timed rounds (stage part)")
  ap.add_argument("--serve_rounds", type=int, default=200, help="timed rounds (serve and dispatch parts)")
  ap.add_argument("--profile_calls", type=int, default=20, help="calls per profiled variant (profile part)")
  ap.add_argument("--zipf", type=float, default=0.0, help="Zipf exponent of the access pattern (0: uniform)")
  ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                  help="stage_sweep part: Pallas launches kernel:block:num_warps, comma separated")
  ap.add_argument("--sweep_batch", type=int, default=4096, help="stage_sweep part: lookup batch")
  ap.add_argument("--chain", type=int, default=8, help="stage_sweep part: lookups per timed call (own indices each)")
  ap.add_argument("--calls", type=int, default=10, help="stage_sweep part: profiled calls per variant")
  ap.add_argument("--traces", type=int, default=1,
                  help="stage_sweep part: profiler traces (each variant's figures: median over traces)")
  ap.add_argument("--compile_budget_s", type=float, default=1e9,
                  help="stage_sweep part: compile no further --configs after this many seconds of the run (the "
                       "ones compiled are still timed)")


DEFAULT_CONFIGS = ("identity/tile:1:2,identity/tile_atomic:1:2,identity/tile_direct:1:2,"
                   "identity/tile_direct:1:2:partial,identity/tile:1:2:partial,identity/tile_atomic:1:2:partial,"
                   "identity/rows_wide:4:1,identity/rows_wide:4:1:partial,identity/tile_direct:1:1:partial,"
                   "tile:1:2,tile_atomic:1:2,tile:1:2:partial")


def sector_bytes(width: int, itemsize: int = 4) -> int:
  return int(math.ceil(width * itemsize / 32) * 32)


def round_robin(fns: dict, rounds: int, warmup: int = 5) -> dict:
  """Time zero-argument callables round-robin (order rotated every round); each call ends when its result
  is ready (``block_until_ready``, or a host numpy value). Returns name -> array of seconds."""
  names = list(fns)
  for _ in range(warmup):
    for n in names:
      jax.block_until_ready(fns[n]())
  out = {n: np.empty(rounds) for n in names}
  for r in range(rounds):
    k = r % len(names)
    for n in names[k:] + names[:k]:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[n]())
      out[n][r] = time.perf_counter() - t0
  return out


def summary(ts: np.ndarray) -> dict:
  return {"median_s": float(np.median(ts)), "p10_s": float(np.percentile(ts, 10)),
          "p90_s": float(np.percentile(ts, 90))}


def part_dispatch(rounds):
  fns, res = {}, {}
  for k in (1, 2, 4, 8, 16, 32, 48):
    xs = [jnp.full((4,), float(i)) for i in range(k)]
    f = jax.jit(lambda *a: a[0] + a[-1])
    fns[f"noop_{k}"] = (lambda f=f, xs=xs: f(*xs))
  x_np = np.zeros((1, 39), np.int32)
  g = jax.jit(lambda a: a + 1)
  x_dev = jnp.asarray(x_np)
  fns["numpy_arg_1"] = lambda: g(x_np)
  fns["device_arg_1"] = lambda: g(x_dev)
  fns["device_arg_1_to_host"] = lambda: np.asarray(g(x_dev))  # minus device_arg_1: one device->host copy
  ts = round_robin(fns, rounds)
  for n, t in ts.items():
    res[n] = summary(t)
  return res


def profile_calls(fn, calls: int, top: int = 12) -> dict:
  """``calls`` calls of ``fn`` under ``jax.profiler`` (perfetto trace): per call, the host events (by name:
  microseconds and count) and the device events per device thread (kernels, copies; ``XLA Modules`` spans),
  the ``top`` names by time. Device threads exist on GPU only."""
  import collections
  import glob
  import gzip
  import json
  import re
  import tempfile
  for _ in range(3):
    jax.block_until_ready(fn())
  d = tempfile.mkdtemp(prefix="microrec_prof")
  with jax.profiler.trace(d, create_perfetto_trace=True):
    for _ in range(calls):
      with jax.profiler.TraceAnnotation("microrec_call"):
        jax.block_until_ready(fn())
  path = glob.glob(d + "/**/perfetto_trace.json.gz", recursive=True)[0]
  with gzip.open(path, "rt") as f:
    t = json.load(f)
  ev = t["traceEvents"] if isinstance(t, dict) else t
  pname = {e["pid"]: str(e["args"]["name"]) for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
  tname = {(e["pid"], e["tid"]): str(e["args"]["name"]) for e in ev
           if e.get("ph") == "M" and e.get("name") == "thread_name"}
  xs = [e for e in ev if e.get("ph") == "X" and "dur" in e and "ts" in e]
  calls_iv = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in xs if e.get("name") == "microrec_call")
  starts = np.asarray([a for a, _ in calls_iv])
  ends = np.asarray([b for _, b in calls_iv])
  acc = collections.defaultdict(lambda: np.zeros((2, max(1, len(starts)))))  # per call: us, count
  for e in xs:
    a = float(e["ts"])
    k = int(np.searchsorted(starts, a, side="right")) - 1  # events inside one timed call only
    if k < 0 or a + float(e["dur"]) > ends[k] + 1e-3:
      continue
    proc = pname.get(e["pid"], "?")
    where = "device/" + re.sub(r"\d+", "#", tname.get((e["pid"], e["tid"]), "?")) if proc.startswith("/device") \
        else "host"
    name = re.sub(r"\.\d+$", "", str(e.get("name", "")))[:80]
    acc[(where, name)][:, k] += (float(e["dur"]), 1)
  groups = collections.defaultdict(list)
  for (where, name), (us, n) in acc.items():  # medians over the calls (one slow call does not skew them)
    groups[where].append({"name": name, "us_per_call": float(np.median(us)), "count_per_call": float(np.median(n))})
  out = {}
  for where, lst in groups.items():
    lst.sort(key=lambda r: -r["us_per_call"])
    # host events nest (inclusive times): their sum means nothing; device events of one thread do not
    out[where] = {"count_per_call": sum(r["count_per_call"] for r in lst), "top": lst[:top]}
    if where != "host":
      out[where]["total_us_per_call"] = sum(r["us_per_call"] for r in lst)
  out["call_us_median"] = float(np.median(ends - starts)) if len(starts) else float("nan")
  return out


def chained(look, partial: bool = False):
  """jit(stage, [idx_0, ..]) -> [look(stage, idx_k)]: one lookup per index array, in order, each its own
  launch(es): index array k+1 passes an optimization barrier together with result k, so XLA can neither
  merge the lookups (horizontal fusion) nor reorder them. ``partial``: the lookups return per-program
  out-of-range counts (``count="partial"``, each lookup's checked by summing it on the host) and ONE
  reduction after the chain sums them all (``sum(c_0 + .. + c_k)``, one kernel: the consumer's sum, its
  cost shared by the chain's lookups, as a model's consumer would fuse it); returns ``(outs, total)``.
  (Stacking the vectors instead costs one copy per lookup: the 21:00 run.)"""
  def run(st, idxs):
    outs = []
    for i in idxs:
      if outs:
        i, _ = jax.lax.optimization_barrier((i, outs[-1]))
      outs.append(look(st, i))
    if partial:
      acc = outs[0][1]
      for _, c in outs[1:]:
        acc = acc + c
      return outs, jnp.sum(acc)
    return outs
  return jax.jit(run)


def device_times(fns: dict, calls: int, per_call: int, gap_s: float = 0.004) -> dict:
  """Device seconds per lookup from ONE profiler trace (``common.call_device_times``: each function runs
  ``calls`` times alone, the kernels clustered per call). Per lookup (a call makes ``per_call``): ``span_s``,
  ``busy_s`` (kernel durations summed), ``kernels`` (launches), and the kernel with the most time
  (``main_kernel``, its median duration ``main_kernel_s``: for the Pallas stage the one-kernel stage itself).
  When the trace does not split into one cluster per call, each variant gets its own trace instead; a
  variant that still does not gets ``device_error``; ``{"error": ...}`` when the trace has no GPU kernels."""
  try:
    got, one = common.call_device_times(fns, calls, per_call, gap_s), True
  except RuntimeError:  # fall back to one trace per variant
    got, one = {}, False
    for nm in fns:
      try:
        got.update(common.call_device_times({nm: fns[nm]}, calls, per_call, gap_s))
      except RuntimeError as e:
        got[nm] = {"device_error": str(e)}
  if all("device_error" in r for r in got.values()) and got:
    return {"error": "no per-call kernel clusters in the trace"}
  res = {}
  for nm, r in got.items():
    if "device_error" in r:
      res[nm] = r
      continue
    by_name = r.pop("kernel_s")
    main = max(by_name, key=lambda n: sum(by_name[n]))
    res[nm] = {**r, "main_kernel": main[:120], "main_kernel_s": float(np.median(by_name[main])),
               "main_kernel_per_lookup": len(by_name[main]) / (calls * per_call),
               "kernel_names": sorted(n[:80] for n in by_name)[:8], "one_trace": one}
  return res


H200_SPEC_BANDWIDTH = 4.8e12  # bytes/s, NVIDIA H200 (SXM) HBM3e data-sheet figure


def bandwidth_probes(small: bool, gap_s: float = 0.004) -> dict:
  """The device bandwidth measured several ways in this process (bytes/s; every figure counts the bytes
  the probe moves): ``copy_wall``: ``common.copy_bandwidth`` (1 GiB ``x * c``, read + write, wall time),
  the best of 3 repetitions; ``copy_device``: the same copy's kernel alone in DEVICE time (profiler, the
  stage's own clock), 256 MiB and 1 GiB, the best of both (kernel time per call, mean over 10 calls); ``read_device``: a
  float32 sum over 1 GiB in device time (reads only); ``read_wall``: ``common.read_bandwidth``. ``best``
  is the largest measured figure: the most demanding floor. ``spec`` is the H200 data-sheet figure
  (not measured)."""
  big = 1 << (24 if small else 30)
  res = {"copy_wall_each": [common.copy_bandwidth(big, repeats=5 if small else 10) for _ in range(3)]}
  res["copy_wall"] = max(res["copy_wall_each"])
  res["read_wall"] = common.read_bandwidth(big, repeats=3 if small else 5)
  fns, nbytes = {}, {}
  for nb in ((1 << 22,) if small else (1 << 28, 1 << 30)):
    x = jax.random.normal(jax.random.PRNGKey(nb), (nb // 4,), jnp.float32)
    f, g = jax.jit(lambda a: a * 1.0000001), jax.jit(lambda a: jnp.sum(a))
    fns[f"copy_{nb}"], nbytes[f"copy_{nb}"] = (lambda f=f, x=x: f(x)), 2 * nb
    fns[f"read_{nb}"], nbytes[f"read_{nb}"] = (lambda g=g, x=x: g(x)), nb
    for fn in (fns[f"copy_{nb}"], fns[f"read_{nb}"]):
      jax.block_until_ready(fn())
  try:
    dt = common.call_device_times(fns, 10, 1, gap_s)
    for nm, r in dt.items():  # the call's kernels (a large sum may take two), mean over the calls
      res[f"{nm}_device_s"] = r["busy_s"]
      res[f"{nm}_device_Bps"] = nbytes[nm] / r["busy_s"]
      res[f"{nm}_kernels"] = r["kernels"]
    res["copy_device"] = max(v for k, v in res.items() if k.startswith("copy_") and k.endswith("_device_Bps"))
    res["read_device"] = max(v for k, v in res.items() if k.startswith("read_") and k.endswith("_device_Bps"))
  except Exception as e:  # noqa: BLE001 - no profiler trace (e.g. CPU): wall figures only
    res["device_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  res["best"] = max(res[k] for k in ("copy_wall", "read_wall", "copy_device", "read_device") if k in res)
  res["best_method"] = max((k for k in ("copy_wall", "read_wall", "copy_device", "read_device") if k in res),
                           key=lambda k: res[k])
  res["spec"] = H200_SPEC_BANDWIDTH
  return res


def part_stage_sweep(args, specs, plan, tables, out, name, t_start):
  """The stage at one batch (``--sweep_batch``), device time from a profiler trace: the Pallas launches
  of ``--configs`` against the XLA paths (per-table ``take``, one fused gather over all tables, the plan's
  one chunk-row gather) and the random-row gather floor. Compiles everything first, checks each output
  bit for bit against per-table lookups, then profiles; JSON after each step."""
  b, k = args.sweep_batch, args.chain
  nt = len(specs)
  ident = mr.Plan.identity(nt)
  stages = {"per_table": mr.build_stage(tables, ident), "fused": mr.build_stage(tables, ident, fuse=True),
            "combined_chunks": mr.build_stage(tables, plan, fuse="chunks")}
  print(f"sweep: stages built ({time.perf_counter() - t_start:.0f} s)")
  probes = bandwidth_probes(args.small)
  bw = probes["best"]  # the most demanding floor: the largest bandwidth measured in this process
  gw = [sum(specs[i].dim for i in g) for g in plan.groups]
  read = b * sum(sector_bytes(w) for w in gw)
  write = b * sum(s.dim for s in specs) * 4
  sw = {"batch": b, "chain": k, "calls": args.calls, "bandwidth_Bps": probes, "floor_bandwidth_Bps": bw,
        "floor_method": f"{b} samples x the 32-byte sectors of every row they look up (ceil(row bytes / 32) "
                        "x 32 B per row) over the bandwidth; floor_read_s uses the largest bandwidth measured in "
                        "this run (bandwidth_Bps['best'])",
        "copy_bandwidth_Bps": probes["copy_wall"], "read_bytes": read, "write_bytes": write,
        "floor_read_s": read / bw, "floor_rw_s": (read + write) / bw,
        "floor_read_s_by_method": {m: read / probes[m] for m in ("copy_wall", "read_wall", "copy_device",
                                                                 "read_device", "spec") if m in probes},
        "floor_read_per_table_s": b * sum(sector_bytes(s.dim) for s in specs) / bw}
  print(f"bandwidth probes (TB/s): " + ", ".join(f"{m} {v / 1e12:.3f}" for m, v in probes.items()
                                                 if isinstance(v, float) and v > 1e9))
  out["stage_sweep"] = sw
  idxs = [mr.synthetic_batch(1000 + j, specs, b, zipf=args.zipf or None)[1] for j in range(k)]
  rng = np.random.default_rng(7)  # the last array: a few out-of-range indices (clamped and counted)
  for t in rng.integers(0, nt, 5):
    idxs[-1][rng.integers(0, b), t] = specs[t].rows + 3 if t % 2 else -2
  idxs = [jnp.asarray(i) for i in idxs]
  variants = {n: (st, {}) for n, st in stages.items()}
  for cfg in args.configs.split(","):
    ident = cfg.startswith("identity/")  # the Pallas stage on the per-table plan (no combination)
    kern, blk, nw, *cnt = cfg.removeprefix("identity/").split(":")  # ":partial": count summed by the consumer
    if ident and "identity_chunks" not in stages:
      stages["identity_chunks"] = mr.build_stage(tables, mr.Plan.identity(nt), fuse="chunks")
    variants[f"pallas{'_identity' if ident else ''}_{kern}_b{blk}_w{nw}{''.join('_' + c for c in cnt)}"] = (
        stages["identity_chunks" if ident else "combined_chunks"],
        {"impl": "pallas", "kernel": kern, "block": int(blk), "num_warps": int(nw), **({"count": cnt[0]} if cnt else {})})
  ref = [(np.asarray(e), int(c)) for e, c in chained(mr.lookup)(stages["per_table"], idxs)]
  sw["out_of_range_in_last_array"] = ref[-1][1]
  fns, rows = {}, {}
  for n, (st, kw) in variants.items():
    t0 = time.perf_counter()
    if kw and t0 - t_start > args.compile_budget_s:
      rows[n] = {"variant": n, "error": "skipped: --compile_budget_s spent"}
      continue
    try:
      f = chained(lambda s, i, kw=kw: mr.lookup(s, i, **kw), partial=kw.get("count") == "partial")
      res = f(st, idxs)  # compile and run once
      if kw.get("count") == "partial":
        res, total = res
        same = int(total) == sum(r[1] for r in ref)
        res = [(e, int(np.sum(np.asarray(c)))) for e, c in res]
      else:
        same = True
      same = same and all(np.array_equal(np.asarray(e), r[0]) and int(c) == r[1] for (e, c), r in zip(res, ref))
      rows[n] = {"variant": n, **{kk: v for kk, v in kw.items() if kk != "impl"}, "bit_identical": bool(same),
                 "compile_s": time.perf_counter() - t0}
      if same:
        fns[n] = (lambda f=f, st=st: f(st, idxs))
    except Exception as e:  # noqa: BLE001 - a launch that does not compile is a result, not a crash
      rows[n] = {"variant": n, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    sw["variants"] = list(rows.values())
    common.write_json(args.out, name, out)
    print(f"  {n}: {rows[n]}")
  # reference: a contiguous copy of the floor's read bytes (read once, written once), chained the same way
  srcs = [jax.random.normal(jax.random.PRNGKey(j), (read // 4,), jnp.float32) for j in range(k)]
  cp = chained(lambda _, x: (x * 1.0000001,))
  jax.block_until_ready(cp(None, srcs))
  fns["contiguous_copy_of_read_bytes"] = lambda: cp(None, srcs)
  rows["contiguous_copy_of_read_bytes"] = {"variant": "contiguous_copy_of_read_bytes", "bit_identical": None}
  print(f"sweep: compiled and checked ({time.perf_counter() - t_start:.0f} s)")
  wall = round_robin(fns, 3 if args.small else 20, warmup=1)  # wall per chained call (dispatch included)
  for n, t in wall.items():
    rows[n]["wall_per_lookup_s"] = float(np.median(t)) / k
  common.write_json(args.out, name, out)
  dts = []
  for _ in range(args.traces):
    try:
      dts.append(device_times(fns, args.calls, k))
    except Exception as e:  # noqa: BLE001 - no profiler trace (e.g. CPU): report, keep the rest
      dts.append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
  sw["device_error"] = "; ".join(d["error"] for d in dts if isinstance(d.get("error"), str))
  dt = {}
  for n in fns:  # median over traces of each figure; the per-trace values kept
    got = [d[n] for d in dts if "busy_s" in d.get(n, {})]
    if got:
      dt[n] = dict(got[0])
      for m in ("span_s", "busy_s", "main_kernel_s"):
        dt[n][m] = float(np.median([g[m] for g in got]))
        dt[n][f"{m}_traces"] = [g[m] for g in got]
  for n, r in rows.items():
    if n in dt:
      r.update(dt[n])
      for m in ("span_s", "busy_s", "main_kernel_s") if "busy_s" in r else ():
        r[f"{m[:-2]}_vs_floor_read"] = r[m] / sw["floor_read_s"]
        r[f"{m[:-2]}_vs_floor_rw"] = r[m] / sw["floor_rw_s"]
      for meth, fl in sw["floor_read_s_by_method"].items():  # every way of measuring the bandwidth
        r[f"busy_vs_floor_read_{meth}"] = r["busy_s"] / fl
  for n, r in rows.items():
    if "busy_s" in r and "busy_s" in rows.get("fused", {}):
      r["busy_vs_fused"] = r["busy_s"] / rows["fused"]["busy_s"]
  sw["variants"] = sorted(rows.values(), key=lambda r: r.get("busy_s", float("inf")))
  common.write_json(args.out, name, out)
  common.print_table(sw["variants"], ["variant", "bit_identical", "kernels", "span_s", "busy_s", "main_kernel_s",
                                      "busy_vs_floor_read", "busy_vs_floor_rw", "busy_vs_fused", "wall_per_lookup_s"])
  print(f"floor read {sw['floor_read_s'] * 1e6:.2f} us, read+write {sw['floor_rw_s'] * 1e6:.2f} us "
        f"(bandwidth {bw / 1e12:.2f} TB/s, {probes['best_method']}; by method: "
        + ", ".join(f"{m} {v * 1e6:.2f} us" for m, v in sw["floor_read_s_by_method"].items())
        + f"); {sw['device_error']}")


def shifted(idx, i, rows):
  return (idx + i) % rows


def main():
  args = common.parse_args(__doc__.splitlines()[0], _flags)
  parts = set(args.parts.split(","))
  specs = {"criteo": mr.CRITEO_26, "alibaba47": mr.ALIBABA_47}[args.spec]
  batches = [int(b) for b in args.batches.split(",")]
  serve_batches = [int(b) for b in args.serve_batches.split(",")]
  loop, rounds, srounds = args.loop, args.rounds, args.serve_rounds
  if args.small:
    specs = tuple(mr.TableSpec(min(s.rows, 5000), s.dim) for s in specs)
    batches, serve_batches, loop, rounds, srounds = [1, 1024], [1, 64], 10, 5, 20
    args.sweep_batch, args.chain, args.calls = min(args.sweep_batch, 64), 2, 2
  out = {"env": common.environment(), "args": vars(args)}
  name = "microrec_lookup" + ("_small" if args.small else "") + (f"_{args.tag}" if args.tag else "")
  t_start = time.perf_counter()
  if "dispatch" in parts:
    out["dispatch"] = part_dispatch(srounds)
    print("dispatch:", {k: round(v["median_s"] * 1e6, 1) for k, v in out["dispatch"].items()}, "us")
    common.write_json(args.out, name, out)
  dims = {s.dim for s in specs}
  interaction = "dot" if len(dims) == 1 else "concat"
  width = dims.pop() if interaction == "dot" else 16
  nt, nd = len(specs), 13
  plan = mr.optimal_plan(specs, args.budget)
  rep = mr.plan_report(specs, plan)
  out["plan"] = {"groups": [list(g) for g in plan.groups], **rep._asdict()}
  print(f"{args.spec}: {nt} tables -> {rep.lookups} lookups, storage +{100 * rep.overhead:.2f}%")
  tables = mr.init_tables(0, specs)
  if "stage_sweep" in parts:
    part_stage_sweep(args, specs, plan, tables, out, name, t_start)
    if parts == {"stage_sweep"}:
      out["wall_s"] = time.perf_counter() - t_start
      common.write_json(args.out, name, out)
      return
  ident = mr.Plan.identity(nt)
  stages = {"per_table": mr.build_stage(tables, ident), "fused": mr.build_stage(tables, ident, fuse=True),
            "combined": mr.build_stage(tables, plan, fuse=True),
            "combined_chunks": mr.build_stage(tables, plan, fuse="chunks")}
  ident_chunks = mr.build_stage(tables, ident, fuse="chunks")
  del tables
  print(f"stages built ({time.perf_counter() - t_start:.0f} s)")
  rows = np.asarray([s.rows for s in specs], np.int32)
  _, idx_chk = mr.synthetic_batch(123, specs, 256, zipf=args.zipf or None)
  look = jax.jit(mr.lookup)
  ref = np.asarray(look(stages["per_table"], idx_chk)[0])
  out["bit_identical"] = {n: bool(np.array_equal(np.asarray(look(st, idx_chk)[0]), ref))
                          for n, st in list(stages.items()) + [("identity_chunks", ident_chunks)]}
  look_p = jax.jit(lambda st, i: mr.lookup(st, i, impl="pallas"))
  for n, st in (("pallas", stages["combined_chunks"]), ("pallas_identity", ident_chunks)):
    try:
      out["bit_identical"][n] = bool(np.array_equal(np.asarray(look_p(st, idx_chk)[0]), ref))
    except Exception as e:  # noqa: BLE001 - report, and the stage part skips nothing else
      out["bit_identical"][n] = f"failed: {type(e).__name__}: {str(e)[:300]}"
  print("bit-identical to per-table lookups:", out["bit_identical"])

  if "serve" in parts:
    model = mr.DLRM(bottom=(512, 256, 64, width), top=(512, 256), interaction=interaction)
    d0, i0 = mr.synthetic_batch(0, specs, 1, num_dense=nd)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), stages["fused"], d0, i0)
    apply = jax.jit(model.apply)
    servers = {"server_identity": mr.Server(model, variables, ident_chunks, num_dense=nd),
               "server": mr.Server(model, variables, stages["combined_chunks"], num_dense=nd),
               "server_auto": mr.Server(model, variables, stages["combined_chunks"], num_dense=nd, impl="auto"),
               "server_packed": mr.Server(model, variables, stages["combined_chunks"], num_dense=nd,
                                          weights="packed"),
               "server_pytree": mr.Server(model, variables, stages["combined_chunks"], num_dense=nd,
                                          weights="pytree"),
               "server_device_out": mr.Server(model, variables, stages["combined_chunks"], num_dense=nd,
                                              output_memory="device")}
    pinned = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    apply_pinned = jax.jit(model.apply, out_shardings=pinned)
    user_stages = {"per_table": stages["per_table"], "concat": stages["fused"], "combined_pytree": stages["combined"]}
    out["server_impl"] = {n: {"impl": sv.impl, "fallback": sv.fallback} for n, sv in servers.items()}
    print("server lookup impl:", out["server_impl"])
    serve = []
    for b in serve_batches:
      dense, idx = mr.synthetic_batch(b, specs, b, num_dense=nd, zipf=args.zipf or None)
      dd, di = jnp.asarray(dense), jnp.asarray(idx)
      ref_logits = np.asarray(apply(variables, stages["per_table"], dd, di)[0])
      fns = {}
      for n, st in user_stages.items():
        fns[f"user/{n}"] = (lambda st=st: np.asarray(apply(variables, st, dense, idx)[0]))
        fns[f"device/{n}"] = (lambda st=st: apply(variables, st, dd, di))
      # the same user code with its result written to pinned host memory (what the server does by default)
      fns["user/per_table_pinned_out"] = lambda: np.asarray(apply_pinned(variables, stages["per_table"], dense, idx)[0])
      agree = {}
      for n, sv in servers.items():
        packed = jnp.asarray(sv.pack(dense, idx))
        fns[f"user/{n}"] = (lambda sv=sv: sv(dense, idx)[0])
        fns[f"device/{n}"] = (lambda sv=sv, p=packed: sv.call(p))
        lg, bad = sv(dense, idx)
        agree[n] = {"max_abs_diff": float(np.max(np.abs(lg - ref_logits))), "bad": bad,
                    "bit_identical": bool(np.array_equal(lg, ref_logits))}
      ts = round_robin(fns, srounds)
      row = {"batch": b, "agreement_with_per_table": agree, "times": {n: summary(t) for n, t in ts.items()}}
      serve.append(row)
      out["serve"] = serve
      common.write_json(args.out, name, out)  # partial results survive a timeout
      med = {n: round(v["median_s"] * 1e6, 1) for n, v in row["times"].items()}
      print(f"serve batch {b}: {med} us\n  agreement: {agree}  ({time.perf_counter() - t_start:.0f} s)")
      if b != serve_batches[0]:
        continue
      # device time of one whole-model call (first batch only): calls inside one fori_loop
      sv = servers["server"]
      packed = jnp.asarray(sv.pack(dense, idx))
      shift = jnp.concatenate([jnp.zeros((nd,), jnp.int32), jnp.ones((nt,), jnp.int32)])
      modulus = jnp.concatenate([jnp.full((nd,), 2**31 - 1, jnp.int32), jnp.asarray(rows)])

      def model_loop(st):
        @jax.jit
        def run(v, st, dense, idx):
          def body(i, acc):
            y, _ = model.apply(v, st, dense, shifted(idx, i, rows))
            return acc + jnp.sum(y)
          return jax.lax.fori_loop(0, loop, body, jnp.float32(0))
        return lambda: run(variables, st, dd, di)

      @jax.jit
      def server_loop(table, p):
        def body(i, acc):
          q = jnp.where(shift > 0, (p + i * shift) % modulus, p)
          return acc + jnp.sum(sv.device_call(table, q)[:-1])
        return jax.lax.fori_loop(0, loop, body, jnp.int32(0))

      @jax.jit
      def empty_loop(idx):
        def body(i, acc):
          return acc + jnp.sum(shifted(idx, i, rows))
        return jax.lax.fori_loop(0, loop, body, jnp.int32(0))

      lfns = {"per_table": model_loop(stages["per_table"]), "concat": model_loop(stages["fused"]),
              "server": lambda: server_loop(sv.table, packed), "empty": lambda: empty_loop(di)}
      lts = round_robin(lfns, max(5, rounds // 3), warmup=2)
      row["model_loop_s"] = {n: float(np.median(t)) / loop for n, t in lts.items()}
      common.write_json(args.out, name, out)
      print(f"  device loop per call: {({n: round(v * 1e6, 1) for n, v in row['model_loop_s'].items()})} us")
    out["serve"] = serve
    common.write_json(args.out, name, out)
    if "profile" in parts:  # where the time of one call goes, batch 1, host and device events
      dense, idx = mr.synthetic_batch(1, specs, 1, num_dense=nd, zipf=args.zipf or None)
      dd, di = jnp.asarray(dense), jnp.asarray(idx)
      sv = servers["server"]
      packed = jnp.asarray(sv.pack(dense, idx))
      variants = {"user/per_table": lambda: np.asarray(apply(variables, stages["per_table"], dense, idx)[0]),
                  "device/per_table": lambda: apply(variables, stages["per_table"], dd, di),
                  "device/concat": lambda: apply(variables, stages["fused"], dd, di),
                  "user/server": lambda: sv(dense, idx)[0], "device/server": lambda: sv.call(packed)}
      out["profile"] = {n: profile_calls(f, args.profile_calls) for n, f in variants.items()}
      for n, pr in out["profile"].items():
        print(f"profile {n}: call {pr['call_us_median']:.1f} us; " + "; ".join(
            f"{w}: {v.get('total_us_per_call', float('nan')):.1f} us, {v['count_per_call']:.1f} events, top "
            f"{[(r['name'][:40], round(r['us_per_call'], 1)) for r in v['top'][:4]]}"
            for w, v in pr.items() if w != "call_us_median"))
      common.write_json(args.out, name, out)

  if "stage" in parts:
    bw = common.copy_bandwidth(1 << (24 if args.small else 30), repeats=5 if args.small else 20)
    out["copy_bandwidth_Bps"] = bw
    # path -> (stage, lookup keyword arguments)
    paths = {n: (st, {}) for n, st in stages.items()}
    pallas_ok = out["bit_identical"].get("pallas") is True
    if pallas_ok:
      paths["pallas"] = (stages["combined_chunks"], {"impl": "pallas"})
    if out["bit_identical"].get("pallas_identity") is True:
      paths["pallas_identity"] = (ident_chunks, {"impl": "pallas"})
    gw = {n: [sum(specs[i].dim for i in g) for g in st.layout.groups] for n, (st, _) in paths.items()}
    stage_rows = []

    def stage_fns(st, kw, di, name, with_loop=True):
      @jax.jit
      def lp(st, idx):
        def body(i, acc):
          return acc + jnp.sum(mr.lookup(st, shifted(idx, i, rows), **kw)[0])
        return jax.lax.fori_loop(0, loop, body, jnp.float32(0))

      @jax.jit
      def unrolled(st, idx):
        return [mr.lookup(st, shifted(idx, i, rows), **kw)[0] for i in range(args.unroll)]

      fns = {f"unrolled/{name}": lambda: unrolled(st, di)}
      if with_loop:
        fns[f"loop/{name}"] = lambda: lp(st, di)
      return fns

    for b in batches:
      _, idx = mr.synthetic_batch(b, specs, b, zipf=args.zipf or None)
      di = jnp.asarray(idx)
      fns = {}
      for n, (st, kw) in paths.items():
        fns.update(stage_fns(st, kw, di, n))
      ts = round_robin(fns, rounds, warmup=2)
      read = b * sum(sector_bytes(w) for w in gw["combined_chunks"])
      write = b * sum(s.dim for s in specs) * 4
      for n, (st, _) in paths.items():
        read = b * sum(sector_bytes(w) for w in gw[n])
        r = {"batch": b, "path": n, "lookups": st.lookups, "gathers": st.gathers,
             "stage_loop_s": float(np.median(ts[f"loop/{n}"])) / loop,
             "stage_unrolled_s": float(np.median(ts[f"unrolled/{n}"])) / args.unroll,
             "floor_read_s": read / bw, "floor_rw_s": (read + write) / bw}
        r["loop_vs_floor_read"] = r["stage_loop_s"] / r["floor_read_s"]
        r["unrolled_vs_floor_read"] = r["stage_unrolled_s"] / r["floor_read_s"]
        r["unrolled_vs_floor_rw"] = r["stage_unrolled_s"] / r["floor_rw_s"]
        stage_rows.append(r)
      print(f"stage batch {b} done ({time.perf_counter() - t_start:.0f} s)")
    common.print_table(stage_rows, ["batch", "path", "lookups", "stage_loop_s", "stage_unrolled_s", "floor_read_s",
                                    "unrolled_vs_floor_read", "unrolled_vs_floor_rw"])
    out["stage"] = stage_rows
    common.write_json(args.out, name, out)
  out["wall_s"] = time.perf_counter() - t_start
  common.write_json(args.out, name, out)


if __name__ == "__main__":
  main()
