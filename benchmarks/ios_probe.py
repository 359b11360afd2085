"""GPU probe for IOS emission: which XLA mechanisms run Inception-like branches concurrently on this GPU?

One call answers, on four Inception-A-like blocks (35x35x288, batch 1), for float32 and bfloat16:
  * plain jit; command buffers (CUDA graphs) with CONVOLUTION; + CONCURRENT scheduling; + LHS;
  * stream-annotated branches (compute_on2 / compute_on with 'gpu_stream:N', flat primitives) with and
    without the latency-hiding scheduler and with command buffers;
  * IOS "merge" of the three 1x1 convs that read the block input (one conv + channel slices);
  * merge + stream-annotated branches.
It checks each variant against the sequential float32 result, greps the compiled HLO for
``call-start`` + ``_xla_stream_annotation``, measures the per-stage differential timing trick
(K chained copies through ``lax.optimization_barrier``), and reads a profiler trace to see whether GPU
kernels of different streams overlap in time.

Usage: python3 benchmarks/ios_probe.py [--small]   (JSON to $OUT/ios_probe.json)

``--net inception_v3`` instead probes the whole network (JSON to $OUT/ios_net_probe.json): XLA option
sets, IOS emissions of hand-built schedules (sequential, merges of same-input convs, a saved IOS-Merge
schedule) with and without ``keep_alive`` (every intermediate kept live so that CONCURRENT command
buffers see only true dependencies), all timed interleaved, plus a per-kernel CUPTI trace summary
(kernels, summed kernel time, busy time, overlap, span per call) and HLO statistics.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks import common  # noqa: E402
from mlsys_jax.sched.cost import time_calls  # noqa: E402
from mlsys_jax.sched.emit import CB_TYPES, CUDA_GRAPH_OPTIONS  # noqa: E402

CONFIGS = {
    "default": {},
    "cb_conv": {"xla_gpu_enable_command_buffer": CB_TYPES, "xla_gpu_graph_min_graph_size": 1},
    "cb_conv_conc": dict(CUDA_GRAPH_OPTIONS),
    "lhs8": {"xla_gpu_enable_latency_hiding_scheduler": True,
             "xla_gpu_experimental_parallel_async_compute_limit": 8},
    "cb_conv_conc_lhs8": {**CUDA_GRAPH_OPTIONS, "xla_gpu_enable_latency_hiding_scheduler": True,
                          "xla_gpu_experimental_parallel_async_compute_limit": 8},
}


def stream_wrap(f, stream):
  from jax.experimental import compute_on as m
  fn = getattr(m, "compute_on2", None) or m.compute_on
  return fn(f, compute_type=f"gpu_stream:{stream}", out_memory_spaces=jax.memory.Space.Device)


DN = ("NHWC", "HWIO", "NHWC")


def conv(x, w, b):
  y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
  return lax.max(lax.add(y, lax.broadcast_in_dim(b, y.shape, (3,))), lax.full_like(y, 0))


def avgpool(x):
  s = lax.reduce_window(x, jnp.array(0, x.dtype), lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
  return lax.div(s, lax.full_like(s, 9))


def make_block_params(key, cin, dtype):
  shapes = {"b1": (1, 1, cin, 64), "b2a": (1, 1, cin, 48), "b2b": (5, 5, 48, 64), "b3a": (1, 1, cin, 64),
            "b3b": (3, 3, 64, 96), "b3c": (3, 3, 96, 96), "b4": (1, 1, cin, 64)}
  p = {}
  for i, (k, s) in enumerate(sorted(shapes.items())):
    kk = jax.random.fold_in(key, i)
    fan = s[0] * s[1] * s[2]
    p[k] = (jax.random.normal(kk, s, dtype) * (2.0 / fan) ** 0.5,
            jax.random.normal(jax.random.fold_in(kk, 1), (s[3],), dtype) * 0.1)
  return p


def block_seq(p, x):
  a = conv(x, *p["b1"])
  b = conv(conv(x, *p["b2a"]), *p["b2b"])
  c = conv(conv(conv(x, *p["b3a"]), *p["b3b"]), *p["b3c"])
  d = conv(avgpool(x), *p["b4"])
  return lax.concatenate([a, b, c, d], 3)


def merged_1x1(p):
  w = jnp.concatenate([p["b1"][0], p["b2a"][0], p["b3a"][0]], axis=3)
  b = jnp.concatenate([p["b1"][1], p["b2a"][1], p["b3a"][1]])
  return w, b


def block_merge(p, mp, x):
  m = conv(x, *mp)
  a, b0, c0 = m[..., :64], m[..., 64:112], m[..., 112:176]
  b = conv(b0, *p["b2b"])
  c = conv(conv(c0, *p["b3b"]), *p["b3c"])
  d = conv(avgpool(x), *p["b4"])
  return lax.concatenate([a, b, c, d], 3)


def block_streams(p, x):
  a = conv(x, *p["b1"])
  b = stream_wrap(lambda x: conv(conv(x, *p["b2a"]), *p["b2b"]), 1)(x)
  c = stream_wrap(lambda x: conv(conv(conv(x, *p["b3a"]), *p["b3b"]), *p["b3c"]), 2)(x)
  d = stream_wrap(lambda x: conv(avgpool(x), *p["b4"]), 3)(x)
  return lax.concatenate([a, b, c, d], 3)


def block_merge_streams(p, mp, x):
  m = conv(x, *mp)
  a, b0, c0 = m[..., :64], m[..., 64:112], m[..., 112:176]
  b = conv(b0, *p["b2b"])
  c = stream_wrap(lambda c0: conv(conv(c0, *p["b3b"]), *p["b3c"]), 1)(c0)
  d = stream_wrap(lambda x: conv(avgpool(x), *p["b4"]), 2)(x)
  return lax.concatenate([a, b, c, d], 3)


def make_net(kind, params, mparams):
  def f(x):
    for p, mp in zip(params, mparams):
      if kind == "seq":
        x = block_seq(p, x)
      elif kind == "merge":
        x = block_merge(p, mp, x)
      elif kind == "streams":
        x = block_streams(p, x)
      else:
        x = block_merge_streams(p, mp, x)
    return x
  return f


def time_fn(f, x, number=100, repeat=7):
  """Median seconds per call of ``f(x)`` (``repeat`` rounds of ``number`` back-to-back calls)."""
  return float(np.median(time_calls(f, (x,), number, repeat)))


def _gpu_kernel_events(d):
  """GPU kernel events ``(start_us, dur_us, stream tid, name)`` of the perfetto trace under ``d`` (sorted),
  or an error dict."""
  files = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not files:
    return {"error": "no perfetto trace"}
  with gzip.open(files[0]) as fh:
    tr = json.load(fh)
  ev = tr["traceEvents"] if isinstance(tr, dict) else tr
  pname, tname = {}, {}
  for e in ev:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      pname[e["pid"]] = e["args"].get("name", "")
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      tname[(e["pid"], e["tid"])] = e["args"].get("name", "")
  gpu_pids = {p for p, n in pname.items() if "GPU" in n or "gpu" in n}
  ks = sorted((float(e["ts"]), float(e.get("dur", 0)), e["tid"], e.get("name", ""))
              for e in ev if e.get("ph") == "X" and e.get("pid") in gpu_pids and "Stream" in tname.get(
                  (e["pid"], e["tid"]), "Stream"))
  if not ks:
    return {"error": "no GPU events", "pids": list(pname.values())[:10]}
  return ks


def _busy_overlap(ks):
  """(time with >= 1 kernel running, time with >= 2 running) for events ``(start, dur, ...)``."""
  pts = sorted([(a, 1) for a, *_ in ks] + [(a + b, -1) for a, b, *_ in ks])
  act, last, busy, over = 0, None, 0.0, 0.0
  for t, dlt in pts:
    if last is not None and act >= 1:
      busy += t - last
      if act >= 2:
        over += t - last
    act += dlt
    last = t
  return busy, over


def trace_overlap(f, x, tag):
  """Run f under the profiler; return {streams, kernels, busy_us, overlap_us} from the perfetto trace."""
  d = tempfile.mkdtemp(prefix=f"prof_{tag}_")
  jax.block_until_ready(f(x))
  with jax.profiler.trace(d, create_perfetto_trace=True):
    for _ in range(5):
      y = f(x)
    jax.block_until_ready(y)
  ks = _gpu_kernel_events(d)
  if isinstance(ks, dict):
    return ks
  busy, over = _busy_overlap(ks)
  tids = {t for _, _, t, _ in ks}
  return {"streams": len(tids), "kernels": len(ks) // 5, "busy_us": busy / 5, "overlap_us": over / 5}


def differential(stage, x, ks=(1, 8)):
  """Stage latency by (T_K - T_1)/(K-1) with K chained copies through optimization_barrier."""
  def chain(k):
    def f(x):
      outs = []
      cur = x
      for _ in range(k):
        y = stage(cur)
        cur, y = lax.optimization_barrier((cur, y))
        outs.append(jnp.sum(y[0, 0, 0, :1]).astype(cur.dtype))
        cur = lax.add(cur, lax.full_like(cur, 0) * outs[-1])
      return cur, outs
    return jax.jit(f)
  t = {}
  for k in ks:
    f = chain(k)
    t[k] = time_fn(f, x, number=50, repeat=5)
  return {"t1_ms": t[ks[0]] * 1e3, f"t{ks[1]}_ms": t[ks[1]] * 1e3,
          "stage_ms": (t[ks[1]] - t[ks[0]]) / (ks[1] - ks[0]) * 1e3}


def trace_kernels(f, args, tag, iters=5):
  """Per-call GPU kernel statistics from a CUPTI trace: calls are separated by a sync and a sleep."""
  d = tempfile.mkdtemp(prefix=f"prof_{tag}_")
  jax.block_until_ready(f(*args))
  with jax.profiler.trace(d, create_perfetto_trace=True):
    for _ in range(iters):
      jax.block_until_ready(f(*args))
      time.sleep(0.003)
  ks = _gpu_kernel_events(d)
  if isinstance(ks, dict):
    return ks
  calls, cur, end = [], [], None
  for k in ks:
    if cur and k[0] - end > 1000.0:
      calls.append(cur)
      cur = []
    cur.append(k)
    end = max(end or 0.0, k[0] + k[1]) if cur[1:] else k[0] + k[1]
  calls.append(cur)
  stats_ = []
  for c in calls:
    busy, over = _busy_overlap(c)
    t0 = c[0][0]
    span = max(a + b for a, b, _, _ in c) - t0
    stats_.append({"kernels": len(c), "sum_us": sum(b for _, b, _, _ in c), "busy_us": busy,
                   "overlap_us": over, "span_us": span, "streams": len({t for _, _, t, _ in c})})
  med = {k: float(np.median([s_[k] for s_ in stats_])) for k in stats_[0]}
  last = calls[len(calls) // 2]
  t0 = last[0][0]
  med["kernel_list"] = [(round(a - t0, 2), round(b, 2), t, n[:90]) for a, b, t, n in last]
  return med


def hlo_stats(compiled) -> dict:
  import re
  txt = compiled.as_text()
  convs = re.findall(r"= \(([a-z0-9]+)\[([0-9,]*)\]\{([0-9,]*)\}, u8\[(\d+)\]\{0\}\) custom-call\("
                     r"[^)]*\), custom_call_target=\"(__cudnn\$conv[A-Za-z]*)\"", txt)
  layouts = {}
  for _, _, lay, _, _ in convs:
    layouts[lay] = layouts.get(lay, 0) + 1
  return {"convs": len(convs), "conv_targets": sorted({c[4] for c in convs}),
          "scratch_nonzero": sum(1 for c in convs if int(c[3]) > 0),
          "scratch_max": max([int(c[3]) for c in convs] + [0]), "conv_out_layouts": layouts,
          "fusions": txt.count(" fusion("), "copies": len(re.findall(r"= [a-z0-9]+\[[^\]]*\]\{[^}]*\} copy\(", txt)),
          "transposes": txt.count(" transpose("), "lines": txt.count("\n")}


def merge_groups(g, same_kernel=True, only_1x1=False, max_merge=8):
  """Groups of >= 2 mutually independent convs with one merge key (and one kernel size)."""
  from mlsys_jax.sched import emit as semit
  by = {}
  for u in range(len(g.units)):
    k = semit.merge_key(g, u)
    if k is None:
      continue
    e = g.eqns[g.units[u].anchor]
    w = g.avals[e.inputs[1]]
    ks = tuple(w.shape[d] for d in e.params["dimension_numbers"].rhs_spec[2:])
    if only_1x1 and any(k_ != 1 for k_ in ks):
      continue
    by.setdefault(k + ((ks,) if same_kernel else ()), []).append(u)
  return [tuple(v[:max_merge]) for v in by.values() if len(v) >= 2]


def stages_with_merges(g, groups):
  from mlsys_jax.sched.dp import Stage
  where = {u: grp for grp in groups for u in grp}
  done, out = set(), []
  for u in range(len(g.units)):
    if u in done:
      continue
    if u in where:
      out.append(Stage("merge", (tuple(sorted(where[u])),)))
      done.update(where[u])
    else:
      out.append(Stage("parallel", ((u,),)))
      done.add(u)
  return out


def net_probe(args):
  from mlsys_jax import sched
  from mlsys_jax.sched.graph import relayout_conv_kernels
  from mlsys_jax.models import ios_benchmark_nets, ios_init_params
  env = common.environment()
  print(env, flush=True)
  res = {"env": env, "rows": []}
  cb = CONFIGS["cb_conv_conc"]
  xla = {"jit": {}, "cc": dict(cb), "cc_lhs": {**cb, "xla_gpu_enable_latency_hiding_scheduler": True},
         "cc_nhwc": {**cb, "xla_gpu_force_conv_nhwc": True},
         "cc_nchw": {**cb, "xla_gpu_force_conv_nchw": True}}
  for dt in args.dtypes.split(","):
    dtype = jnp.dtype(dt)
    nets = ios_benchmark_nets(small=args.small, dtype=None if dtype == jnp.float32 else dtype)
    model, shape = nets[args.net]
    x = jax.random.normal(jax.random.PRNGKey(1), shape, dtype)
    if args.init == "flax":  # model.init: zero biases, folded away by XLA as constants (slower XLA program)
      params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    else:  # nonzero biases, like trained weights
      params = ios_init_params(model, shape, seed=0)
    fc = lambda x: model.apply(params, x)
    fns, row, ref = {}, {"net": args.net, "dtype": dt}, None
    on_gpu = jax.default_backend() == "gpu"
    for name, opts in xla.items():
      if not on_gpu and opts:
        continue
      try:
        c = jax.jit(model.apply, compiler_options=opts or None).lower(params, x).compile()
        y = c(params, x)
        if ref is None:
          ref = np.asarray(y.astype(jnp.float32))
        fns[name] = (c, (params, x))
      except Exception as e:  # noqa: BLE001
        row[f"err_{name}"] = f"{type(e).__name__}: {str(e)[:200]}"
      print(dt, name, "ok" if name in fns else row.get(f"err_{name}"), flush=True)
    # weights closed over: XLA sees them as constants and may lay them out at compile time
    const_cfgs = (("jit_const", {}), ("cc_const", dict(cb)),
                  ("cc_const_lhs", {**cb, "xla_gpu_enable_latency_hiding_scheduler": True}))
    for name, opts in const_cfgs if on_gpu else ():
      try:
        t0 = time.perf_counter()
        c = jax.jit(fc, compiler_options=opts or None).lower(x).compile()
        row[f"compile_{name}_s"] = round(time.perf_counter() - t0, 1)
        c(x)
        fns[name] = (c, (x,))
        xla[name] = opts
      except Exception as e:  # noqa: BLE001
        row[f"err_{name}"] = f"{type(e).__name__}: {str(e)[:200]}"
      print(dt, name, "ok" if name in fns else row.get(f"err_{name}"), flush=True)
    g0 = sched.build_graph(fc, x)
    g = relayout_conv_kernels(g0)
    scheds = {"seq": (g, sched.sequential_schedule(g)),
              "m1x1": (g, stages_with_merges(g, merge_groups(g, only_1x1=True))),
              "msame": (g, stages_with_merges(g, merge_groups(g, same_kernel=True))),
              "many": (g, stages_with_merges(g, merge_groups(g, same_kernel=False)))}
    # the library path: IOS-Merge searched with the on-device stage profiler
    for mk in args.search.split(",") if args.search else ():
      try:
        prof = sched.StageProfiler(mode="cuda_graph", parallel="sum") if on_gpu else None
        t0 = time.perf_counter()
        sc = sched.ios_schedule(fc, x, strategy="merge", merge_kernels=mk, profiler=prof,
                                keep_alive=True)
        row[f"search_{mk}_s"] = round(time.perf_counter() - t0, 1)
        row[f"search_{mk}_pred_ms"] = round(sc.predicted_latency * 1e3, 4)
        scheds[f"ios_{mk}"] = (sc.graph, sc.stages)
        open(os.path.join(args.out or os.environ.get("OUT", "/tmp"),
                          f"sched_{dt}_{mk}.json"), "w").write(sc.to_json())
      except Exception as e:  # noqa: BLE001
        row[f"err_search_{mk}"] = f"{type(e).__name__}: {str(e)[:200]}"
        traceback.print_exc()
    row["merges"] = {k: sum(1 for s_ in v[1] if s_.kind == "merge") for k, v in scheds.items()}
    for sname, (gg, stages) in scheds.items():
      for ka, embed in ((False, True), (True, True), (True, False)):
        if not embed and sname != "m1x1":
          continue
        name = f"{sname}{'_ka' if ka else ''}{'' if embed else '_args'}"
        sc = sched.Schedule(gg, stages, [0.0] * len(stages), "cuda_graph", 0.0,
                            {"keep_alive": ka, "fuse_epilogue": True, "embed_consts": embed})
        try:
          jitted, consts = sc._build()
          c = jitted.lower(consts, x).compile()
          y = c(consts, x)
          err = float(np.linalg.norm(np.asarray(y.astype(jnp.float32)) - ref) / np.linalg.norm(ref))
          row[f"relerr_{name}"] = err
          fns[name] = (c, (consts, x))
        except Exception as e:  # noqa: BLE001
          row[f"err_{name}"] = f"{type(e).__name__}: {str(e)[:200]}"
          traceback.print_exc()
        print(dt, name, "ok" if name in fns else row.get(f"err_{name}"), flush=True)
    ts = {k: [] for k in fns}
    for k, (f, a) in fns.items():
      time_fn(lambda _: f(*a), None, number=3, repeat=1)
    for _ in range(args.repeat):
      for k, (f, a) in fns.items():
        ts[k].append(time_fn(lambda _: f(*a), None, number=args.number, repeat=1))
    med = {k: float(np.median(v)) * 1e3 for k, v in ts.items()}
    row["ms"] = {k: round(v, 4) for k, v in med.items()}
    base = [k for k in med if k in xla]
    best = min(base, key=med.get)
    row["best_xla"], row["best_xla_ms"] = best, med[best]
    row["vs_best"] = {k: round(med[best] / v, 3) for k, v in med.items()}
    print(json.dumps(row), flush=True)
    if on_gpu:
      tr = {}
      ios_best = min((k for k in med if k not in xla), key=med.get)
      for k in [best, "cc_const", "seq_ka", "m1x1_ka", "ios_same_ka", "ios_any_ka", ios_best]:
        if k in fns and k not in tr:
          try:
            tr[k] = trace_kernels(fns[k][0], fns[k][1], k)
          except Exception as e:  # noqa: BLE001
            tr[k] = {"error": str(e)[:200]}
          print("trace", dt, k, {a: b for a, b in tr[k].items() if a != "kernel_list"}, flush=True)
      row["trace"] = tr
    res["rows"].append(row)
    common.write_json(args.out, "ios_net_probe", res)


def emit_opts():
  from mlsys_jax.sched import emit as semit
  return semit.compiler_options("cuda_graph")


def main():
  args = common.parse_args(__doc__, extra=lambda ap: (
      ap.add_argument("--net", default=None, help="probe this whole net instead of the blocks"),
      ap.add_argument("--dtypes", default="float32,bfloat16"),
      ap.add_argument("--search", default="same,any", help="merge_kernels values to search with"),
      ap.add_argument("--init", default="random", choices=("random", "flax"),
                      help="weights of --net: ios_init_params (nonzero biases) or model.init (zero biases; "
                           "as in benchmarks/results/ios_net_probe_h100*.json)"),
      ap.add_argument("--number", type=int, default=40),
      ap.add_argument("--repeat", type=int, default=7)))
  if args.net:
    return net_probe(args)
  env = common.environment()
  print(env, flush=True)
  nblocks = 1 if args.small else 4
  res = {"env": env, "rows": [], "hlo": {}, "profiles": {}, "differential": {}}
  key = jax.random.PRNGKey(0)
  for dtype in (jnp.float32, jnp.bfloat16):
    dn = jnp.dtype(dtype).name
    cin = 288 if not args.small else 32
    params = [make_block_params(jax.random.fold_in(key, i), cin, dtype) for i in range(nblocks)]
    if args.small:  # keep channel algebra valid: 64+64+96+64 = 288 output, so use one block
      pass
    mparams = [merged_1x1(p) for p in params]
    hw = 35 if not args.small else 8
    x = jax.random.normal(jax.random.fold_in(key, 99), (1, hw, hw, cin), dtype)
    ref = None
    for kind in ("seq", "merge", "streams", "merge_streams"):
      for cname, opts in CONFIGS.items():
        if args.small and cname not in ("default",):
          continue
        row = {"dtype": dn, "variant": kind, "config": cname}
        try:
          f = jax.jit(make_net(kind, params, mparams), compiler_options=opts)
          t0 = time.perf_counter()
          comp = f.lower(x).compile()
          row["compile_s"] = round(time.perf_counter() - t0, 2)
          txt = comp.as_text()
          row["call_start"] = txt.count("call-start")
          row["annot"] = txt.count("_xla_stream_annotation")
          if cname == "cb_conv_conc_lhs8" or cname == "lhs8":
            res["hlo"][f"{dn}_{kind}_{cname}"] = {"call_start": row["call_start"],
                                                 "annotations": row["annot"],
                                                 "command_buffer": txt.count("command_buffer")}
          y = f(x)
          if ref is None:
            ref = np.asarray(y.astype(jnp.float32))
          err = np.abs(np.asarray(y.astype(jnp.float32)) - ref).max() / (np.abs(ref).max() + 1e-30)
          row["rel_err"] = float(err)
          row["ms"] = round(time_fn(f, x) * 1e3, 4)
        except Exception as e:  # noqa: BLE001
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
          traceback.print_exc()
        print(row, flush=True)
        res["rows"].append(row)
    # profiles: do kernels of different streams overlap?
    if not args.small:
      for kind, cname in (("streams", "lhs8"), ("streams", "default"), ("seq", "cb_conv_conc"),
                          ("streams", "cb_conv_conc_lhs8"), ("merge_streams", "lhs8")):
        try:
          f = jax.jit(make_net(kind, params, mparams), compiler_options=CONFIGS[cname])
          res["profiles"][f"{dn}_{kind}_{cname}"] = trace_overlap(f, x, f"{kind}_{cname}")
        except Exception as e:  # noqa: BLE001
          res["profiles"][f"{dn}_{kind}_{cname}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("profile", kind, cname, res["profiles"][f"{dn}_{kind}_{cname}"], flush=True)
    # differential timing of a single stage (one conv 3x3) with default and cb configs
    p0 = params[0]
    stage = lambda z: conv(z, jnp.zeros((3, 3, cin, 96), dtype) + p0["b3b"][0][:, :, :1, :],
                           p0["b3b"][1])
    try:
      res["differential"][dn] = differential(stage, x)
      t0 = time.perf_counter()
      jax.jit(stage).lower(x).compile()
      res["differential"][dn]["compile_s"] = time.perf_counter() - t0
      res["differential"][dn]["single_call_ms"] = time_fn(jax.jit(stage), x) * 1e3
    except Exception as e:  # noqa: BLE001
      res["differential"][dn] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print("differential", dn, res["differential"][dn], flush=True)
  common.print_table([r for r in res["rows"]], ["dtype", "variant", "config", "ms", "rel_err",
                                                "call_start", "annot", "compile_s", "error"])
  common.write_json(args.out, "ios_probe", res)


if __name__ == "__main__":
  main()
