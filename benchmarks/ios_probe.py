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

CB_TYPES = "FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,CONDITIONAL,DYNAMIC_SLICE_FUSION,CONVOLUTION"
CONFIGS = {
    "default": {},
    "cb_conv": {"xla_gpu_enable_command_buffer": CB_TYPES, "xla_gpu_graph_min_graph_size": 1},
    "cb_conv_conc": {"xla_gpu_enable_command_buffer": CB_TYPES, "xla_gpu_graph_min_graph_size": 1,
                     "xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"},
    "lhs8": {"xla_gpu_enable_latency_hiding_scheduler": True,
             "xla_gpu_experimental_parallel_async_compute_limit": 8},
    "cb_conv_conc_lhs8": {"xla_gpu_enable_command_buffer": CB_TYPES, "xla_gpu_graph_min_graph_size": 1,
                          "xla_gpu_command_buffer_scheduling_mode": "CONCURRENT",
                          "xla_gpu_enable_latency_hiding_scheduler": True,
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
  jax.block_until_ready(f(x))
  ts = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    for _ in range(number):
      y = f(x)
    jax.block_until_ready(y)
    ts.append((time.perf_counter() - t0) / number)
  return float(np.median(ts))


def trace_overlap(f, x, tag):
  """Run f under the profiler; return {streams, kernels, busy_us, overlap_us} from the perfetto trace."""
  d = tempfile.mkdtemp(prefix=f"prof_{tag}_")
  jax.block_until_ready(f(x))
  with jax.profiler.trace(d, create_perfetto_trace=True):
    for _ in range(5):
      y = f(x)
    jax.block_until_ready(y)
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
  ks = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["tid"], e.get("name", ""))
        for e in ev if e.get("ph") == "X" and e.get("pid") in gpu_pids and "Stream" in tname.get(
            (e["pid"], e["tid"]), "Stream")]
  if not ks:
    return {"error": "no GPU events", "pids": list(pname.values())[:10]}
  pts = sorted([(a, 1) for a, _, _, _ in ks] + [(b, -1) for _, b, _, _ in ks])
  act, last, busy, over = 0, None, 0.0, 0.0
  for t, dlt in pts:
    if last is not None and act >= 1:
      busy += t - last
      if act >= 2:
        over += t - last
    act += dlt
    last = t
  streams = sorted({tname.get((0, t), str(t)) for _, _, t, _ in ks})
  return {"streams": len({t for _, _, t, _ in ks}), "kernels": len(ks) // 5, "busy_us": busy / 5,
          "overlap_us": over / 5, "stream_names": [tname.get((p, t), "") for p in gpu_pids
                                                   for t in {k[2] for k in ks}][:8]}


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


def main():
  args = common.parse_args(__doc__)
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
