"""Why do executables with hundreds of (depthwise) convolutions take so long before their first result?

Probe for the IOS benchmark nets (Ding et al., MLSys 2021; RandWire and NasNet-A are chains of
ReLU-SepConv units = depthwise k x k conv + pointwise 1x1 conv). Every variant runs in a fresh Python
process (so no in-process autotune or cuDNN state leaks between variants) and reports lower, compile,
first-call and second-call seconds of ``jax.jit(f)`` where ``f`` chains ``n`` SepConv units with
distinct weights (identical shapes, as inside a RandWire stage). With ``profile`` the first call is
traced (jax.profiler) and the host events with the largest total time are listed.

  PYTHONPATH=. python3 benchmarks/ios_compile_probe.py --out $OUT     # GPU (one call, ~2 min)
  PYTHONPATH=. python3 benchmarks/ios_compile_probe.py --small        # CPU smoke test
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mlsys_jax.sched.emit import CUDA_GRAPH_OPTIONS as CC  # noqa: E402

# name -> (settings for the child, extra XLA_FLAGS)
VARIANTS = {
    "sep_n32": ({"n": 32}, ""),
    "sep_n16": ({"n": 16}, ""),
    "dw_only_n32": ({"n": 32, "parts": "dw"}, ""),
    "pw_only_n32": ({"n": 32, "parts": "pw"}, ""),
    "sep_n32_autotune0": ({"n": 32}, "--xla_gpu_autotune_level=0"),
    "sep_n32_bf16": ({"n": 32, "dtype": "bfloat16"}, ""),
    "sep_n32_k7": ({"n": 32, "k": 7}, ""),
    "sep_n32_conv_fusion": ({"n": 32}, "--xla_gpu_experimental_enable_conv_fusion=true"),
    "sep_n32_dw_shift": ({"n": 32, "parts": "sep_shift"}, ""),
    "sep_n32_profile": ({"n": 32, "profile": True}, ""),
    "sep_n32_cache_fill": ({"n": 32, "cache": True}, ""),
    "sep_n32_cache_hit": ({"n": 32, "cache": True}, ""),
}


def child(cfg: dict) -> dict:
  import numpy as np
  import jax
  import jax.numpy as jnp
  from jax import lax

  if cfg.get("cache"):
    jax.config.update("jax_compilation_cache_dir", cfg["cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  n, k, c, hw = cfg.get("n", 32), cfg.get("k", 3), cfg.get("c", 154), cfg.get("hw", 28)
  parts = cfg.get("parts", "sep")
  dt = jnp.dtype(cfg.get("dtype", "float32"))
  rng = np.random.default_rng(0)
  dn = ("NHWC", "HWIO", "NHWC")
  params = []
  for _ in range(n):
    params.append({"dw": jnp.asarray(rng.normal(size=(k, k, 1, c)) / k, dt),
                   "db": jnp.asarray(rng.normal(size=(c,)) * 0.1, dt),
                   "pw": jnp.asarray(rng.normal(size=(1, 1, c, c)) / np.sqrt(c), dt),
                   "pb": jnp.asarray(rng.normal(size=(c,)) * 0.1, dt)})

  def f(ps, x):
    for p in ps:
      x = jnp.maximum(x, 0)
      if parts == "sep_shift":  # depthwise conv as k*k shifted multiply-adds (one XLA fusion)
        xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
        acc = p["db"]
        for i in range(k):
          for j in range(k):
            acc = acc + xp[:, i:i + hw, j:j + hw, :] * p["dw"][i, j, 0]
        x = acc
      if parts in ("sep", "dw"):
        x = lax.conv_general_dilated(x, p["dw"], (1, 1), [(k // 2, k // 2)] * 2, dimension_numbers=dn,
                                     feature_group_count=c) + p["db"]
      if parts in ("sep", "pw", "sep_shift"):
        x = lax.conv_general_dilated(x, p["pw"], (1, 1), [(0, 0)] * 2, dimension_numbers=dn) + p["pb"]
    return x

  x = jnp.asarray(rng.normal(size=(1, hw, hw, c)), dt)
  out = {}
  t0 = time.perf_counter()
  lowered = jax.jit(f).lower(params, x)
  out["lower_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  comp = lowered.compile()
  out["compile_s"] = time.perf_counter() - t0
  out["cudnn_convs"] = comp.as_text().count("__cudnn$conv")
  tracedir = None
  if cfg.get("profile"):
    tracedir = tempfile.mkdtemp()
    jax.profiler.start_trace(tracedir)
  t0 = time.perf_counter()
  jax.block_until_ready(comp(params, x))
  out["first_call_s"] = time.perf_counter() - t0
  if tracedir:
    jax.profiler.stop_trace()
  t0 = time.perf_counter()
  jax.block_until_ready(comp(params, x))
  out["second_call_s"] = time.perf_counter() - t0
  ts = []
  for _ in range(20):
    t0 = time.perf_counter()
    jax.block_until_ready(comp(params, x))
    ts.append(time.perf_counter() - t0)
  out["steady_ms"] = float(np.median(ts)) * 1e3
  # a second executable of the same function (other XLA options) in the same process
  t0 = time.perf_counter()
  comp2 = jax.jit(f, compiler_options=CC).lower(params, x).compile()
  out["cc_compile_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(comp2(params, x))
  out["cc_first_call_s"] = time.perf_counter() - t0
  y1, y2 = comp(params, x), comp2(params, x)
  out["cc_rel_diff"] = float(jnp.max(jnp.abs(y1 - y2)) / jnp.max(jnp.abs(y1)))
  if tracedir:
    out["top_events"] = _top_events(tracedir)
  return out


def _top_events(tracedir: str, top: int = 25) -> list:
  from jax._src.lib import _profile_data
  files = glob.glob(os.path.join(tracedir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    return [f"no xplane.pb under {tracedir}"]
  prof = _profile_data.ProfileData.from_file(files[0])
  agg: dict = {}
  for plane in prof.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name.startswith("$"):
          continue
        key = (plane.name[:24], line.name[:24], ev.name[:90])
        tot, cnt = agg.get(key, (0.0, 0))
        agg[key] = (tot + ev.duration_ns / 1e9, cnt + 1)
  rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]
  return [{"plane": k[0], "line": k[1], "name": k[2], "total_s": round(v[0], 4), "count": v[1]}
          for k, v in rows]


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", default=None)
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
    return
  out_dir = args.out or os.environ.get("OUT") or "results/benchmarks"
  os.makedirs(out_dir, exist_ok=True)
  cache_dir = tempfile.mkdtemp()
  res = {}
  for name in args.variants.split(","):
    cfg, flags = VARIANTS[name]
    cfg = dict(cfg, cache_dir=cache_dir)
    if args.small:
      cfg.update(n=min(cfg["n"], 4), c=8, hw=8)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], env=env,
                       capture_output=True, text=True, timeout=300)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    r = json.loads(line[-1][7:]) if line else {"error": p.stderr[-800:]}
    r["process_s"] = round(time.perf_counter() - t0, 2)
    r["xla_flags"] = flags
    res[name] = r
    short = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "top_events"}
    print(name, json.dumps(short), flush=True)
    for ev in r.get("top_events", []):
      print("   ", ev, flush=True)
    with open(os.path.join(out_dir, "ios_compile_probe.json"), "w") as fh:
      json.dump(res, fh, indent=1)


if __name__ == "__main__":
  main()
