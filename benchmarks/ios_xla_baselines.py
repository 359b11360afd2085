"""XLA baselines for the IOS benchmark networks (Ding et al., "IOS: Inter-Operator Scheduler for CNN
Acceleration", MLSys 2021): batch-1 latency of plain ``jax.jit`` against the strongest per-jit XLA
configurations a user can choose (command buffers that include cuDNN convolutions, concurrent
command-buffer scheduling, the latency-hiding scheduler), with a roofline floor per net.

  PYTHONPATH=. python benchmarks/ios_xla_baselines.py --out $OUT          # GPU
  PYTHONPATH=. python benchmarks/ios_xla_baselines.py --small             # CPU smoke test

On one H100 the three smaller nets take ~5 min (RandWire ~135 s per dtype, mostly the first call of
each executable: ~0.25 s per depthwise conv, see ``_CONV_FUSION``); NasNet (440 depthwise convs)
needs a call of its own and the ``*_convfusion`` configs, e.g.
``--nets nasnet --configs jit,cmdbuf_conv_concurrent_convfusion``.

Importable by other benchmarks (e.g. the IOS scheduler's ``benchmarks/ios_latency.py``)::

  from benchmarks.ios_xla_baselines import XLA_CONFIGS, measure_configs
  res = measure_configs(model.apply, (params, x), XLA_CONFIGS)   # name -> {"median_s": ..., ...}
  best = min((r for r in res.values() if r["ok"]), key=lambda r: r["median_s"])
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import time
from typing import Any, Callable, Mapping, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import copy_bandwidth, environment, print_table, write_json  # noqa: E402
from mlsys_jax import models  # noqa: E402
from mlsys_jax.sched.emit import CB_TYPES  # noqa: E402
from mlsys_jax.sched.xla import CONV_FUSION_OPTIONS, XLA_CONFIGS  # noqa: E402,F401

# The configurations live in the library (``mlsys_jax.sched.xla``), where ``ios_schedule``'s check uses them.
COMMAND_BUFFER_WITH_CONV = CB_TYPES


def compile_config(fn: Callable, args: Sequence[Any], options: Mapping[str, Any]):
  """``jax.jit(fn, compiler_options=options).lower(*args).compile()``.

  Returns ``(compiled, seconds, None)``, or ``(None, seconds, message)`` when XLA rejects an option
  name or value (e.g. an enum value that this jaxlib does not know) or compilation fails.
  """
  t0 = time.perf_counter()
  try:
    compiled = jax.jit(fn, compiler_options=dict(options) or None).lower(*args).compile()
  except Exception as e:  # XLA raises JaxRuntimeError / XlaRuntimeError with INVALID_ARGUMENT
    return None, time.perf_counter() - t0, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  return compiled, time.perf_counter() - t0, None


def cudnn_conv_count(compiled) -> int:
  """cuDNN convolution custom calls in the optimized HLO (command buffers are formed later, on the
  thunk sequence, so they do not show in this text)."""
  try:
    return compiled.as_text().count("__cudnn$conv")
  except Exception:  # pragma: no cover - some backends cannot print
    return -1


def measure_configs(fn: Callable, args: Sequence[Any], configs: Mapping[str, Mapping[str, Any]], *,
                    repeats: int = 30, warmup: int = 3, inner: int = 1, check: bool = True,
                    rtol: float = 1e-2, verbose: bool = False) -> dict[str, dict[str, Any]]:
  """Compile ``fn`` once per XLA configuration and time all of them interleaved.

  Like :func:`mlsys_jax.stats.time_interleaved` for N callables: after ``warmup`` discarded rounds,
  each of ``repeats`` rounds calls every compiled variant once (``inner`` calls, blocking on the
  last), starting at a rotating position so that drift hits all equally; medians are reported.

  Args:
    fn: the function to compile (e.g. ``model.apply``).
    args: its arguments (device arrays).
    configs: name -> ``compiler_options`` (e.g. :data:`XLA_CONFIGS`); ``{}`` is plain ``jax.jit``.
    repeats, warmup, inner: as in ``time_interleaved``.
    check: compare every variant's output with the first accepted one (``max_rel_diff``).
    rtol: relative tolerance of that comparison (``agrees``).
    verbose: print each compile as it finishes.

  Returns:
    name -> dict with ``ok`` (compiled), ``error`` (why not), ``compile_s``, ``median_s``,
    ``first_call_s`` (the first run sets up the executable and its cuDNN plans: seconds for
    hundreds of convolutions), ``times_s`` (per round), ``p25_s``/``p75_s``, ``max_rel_diff``,
    ``agrees``, ``cudnn_convs``; plus ``ratio_vs_first`` (median of the first accepted config
    divided by this one: > 1 means faster than it).
  """
  res: dict[str, dict[str, Any]] = {}
  compiled: dict[str, Any] = {}
  ref = None
  for name, opts in configs.items():
    c, secs, err = compile_config(fn, args, opts)
    if verbose and err:
      print(f"  {name}: REJECTED {err}", flush=True)
    res[name] = {"ok": c is not None, "error": err, "compile_s": round(secs, 2),
                 "options": {k: v for k, v in opts.items()}}
    if c is None:
      continue
    t0 = time.perf_counter()
    out = jax.block_until_ready(c(*args))
    res[name]["first_call_s"] = round(time.perf_counter() - t0, 2)  # executable and cuDNN plan setup
    res[name]["cudnn_convs"] = cudnn_conv_count(c)
    res[name]["cost"] = {k: v for k, v in _cost(c).items() if k in ("flops", "bytes accessed")}
    if check:
      leaf = np.asarray(jax.tree_util.tree_leaves(out)[0], np.float32)
      if ref is None:
        ref = leaf
      d = float(np.max(np.abs(leaf - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
      res[name].update(max_rel_diff=d, agrees=bool(d <= rtol) and bool(np.all(np.isfinite(leaf))))
    compiled[name] = c
    if verbose:
      print(f"  {name}: compile {secs:.1f} s, first call {res[name]['first_call_s']:.1f} s", flush=True)
  names = list(compiled)
  if not names:
    return res

  def run(c):
    t0 = time.perf_counter()
    for _ in range(inner - 1):
      c(*args)
    jax.block_until_ready(c(*args))
    return (time.perf_counter() - t0) / inner

  for _ in range(warmup):
    for n in names:
      run(compiled[n])
  times = {n: [] for n in names}
  for i in range(repeats):
    k = i % len(names)
    for n in names[k:] + names[:k]:
      times[n].append(run(compiled[n]))
  first = float(np.median(times[names[0]]))
  for n in names:
    t = np.asarray(times[n])
    med = float(np.median(t))
    res[n].update(median_s=med, p25_s=float(np.percentile(t, 25)), p75_s=float(np.percentile(t, 75)),
                  times_s=[float(v) for v in t], ratio_vs_first=first / med)
  return res


def matmul_peak(dtype, n: int = 8192, repeats: int = 10) -> float:
  """Measured dense matmul rate in FLOP/s (default precision: f32 may use TF32 on tensor cores)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  f = jax.jit(lambda p, q: p @ q)
  jax.block_until_ready(f(a, b))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    ts.append(time.perf_counter() - t0)
  return 2 * n ** 3 / float(np.median(ts))


def conv_flops(fn: Callable, args: Sequence[Any]) -> int:
  """2 x multiply-adds of every ``conv_general_dilated`` in the jaxpr of ``fn(*args)``."""
  total = 0
  for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns:
    if e.primitive.name == "conv_general_dilated":
      out = e.outvars[0].aval
      rhs = e.invars[1].aval
      dn = e.params["dimension_numbers"]
      spatial = [rhs.shape[d] for d in dn.rhs_spec[2:]]
      cin_per_group = rhs.shape[dn.rhs_spec[1]]
      total += 2 * int(np.prod(out.shape)) * int(np.prod(spatial)) * cin_per_group
  return total


def _cost(compiled_or_lowered) -> dict:
  try:
    c = compiled_or_lowered.cost_analysis()
  except Exception:  # pragma: no cover
    return {}
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  return dict(c or {})


def _parse_args():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None, help="directory for the JSON result (default: $OUT)")
  ap.add_argument("--small", action="store_true", help="tiny nets on CPU (smoke test)")
  ap.add_argument("--nets", default="squeezenet,inception_v3,randwire,nasnet")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--configs", default=",".join(n for n in XLA_CONFIGS
                                                if n != "no_cmdbuf" and "convfusion" not in n),
                  help=f"comma-separated names from {list(XLA_CONFIGS)}")
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--time_budget_s", type=float, default=300.0,
                  help="skip the remaining (net, dtype) pairs once this much wall time has passed")
  return ap.parse_args()


def main():
  args = _parse_args()
  t_start = time.perf_counter()
  env = environment()
  repeats = args.repeats or (5 if args.small else 40)
  configs = {n: XLA_CONFIGS[n] for n in args.configs.split(",")}
  bw = copy_bandwidth(1 << 22 if args.small else 1 << 30)
  peak = {d: matmul_peak(jnp.dtype(d), 256 if args.small else 8192) for d in args.dtypes.split(",")}
  print(f"{env}\ncopy bandwidth {bw / 1e12:.2f} TB/s; matmul peak "
        + ", ".join(f"{d} {p / 1e12:.0f} TFLOP/s" for d, p in peak.items()), flush=True)
  payload = {"env": env, "copy_bandwidth_Bps": bw, "matmul_peak_flops": peak, "configs": configs,
             "repeats": repeats, "small": args.small, "results": [], "skipped": []}
  rows = []
  for name in args.nets.split(","):
    for dname in args.dtypes.split(","):
      dtype = jnp.dtype(dname)
      nets = models.ios_benchmark_nets(small=args.small, dtype=None if dname == "float32" else dtype)
      if time.perf_counter() - t_start > args.time_budget_s:
        payload["skipped"].append(f"{name}/{dname}")
        print(f"skip {name} {dname}: time budget", flush=True)
        continue
      model, shape = nets[name]
      params = models.ios_init_params(model, shape, seed=0)
      x = jnp.asarray(np.random.default_rng(1).uniform(size=shape), dtype)
      flops = conv_flops(model.apply, (params, x))
      weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(params))
      t0 = time.perf_counter()
      res = measure_configs(model.apply, (params, x), configs, repeats=repeats,
                            rtol=5e-2 if dname == "bfloat16" else 1e-2, verbose=True)
      ok = {n: r for n, r in res.items() if r["ok"] and "median_s" in r}
      best = min(ok, key=lambda n: ok[n]["median_s"])
      jit_s = ok["jit"]["median_s"] if "jit" in ok else float("nan")
      compute_floor = flops / peak[dname]
      weight_floor = weight_bytes / bw
      rec = {"net": name, "dtype": dname, "input_shape": list(shape), "conv_flops": flops,
             "weight_bytes": weight_bytes,
             # XLA's cost analysis of the compiled program leaves out the cuDNN custom calls, so its
             # flops are ~1% of conv_flops; kept for the bytes of the fused elementwise work.
             "compiled_cost": res.get("jit", {}).get("cost", {}),
             "floor_s": max(compute_floor, weight_floor), "compute_floor_s": compute_floor,
             "weight_floor_s": weight_floor, "best": best, "best_s": ok[best]["median_s"],
             "jit_s": jit_s, "best_speedup_vs_jit": jit_s / ok[best]["median_s"],
             "wall_s": round(time.perf_counter() - t0, 1), "configs": res}
      payload["results"].append(rec)
      for n, r in res.items():
        rows.append({"net": name, "dtype": dname, "config": n,
                     "ms": f"{r['median_s'] * 1e3:.3f}" if "median_s" in r else "rejected",
                     "vs jit": f"{jit_s / r['median_s']:.2f}x" if "median_s" in r else "",
                     "floor ms": f"{rec['floor_s'] * 1e3:.3f}",
                     "floor/ms": f"{rec['floor_s'] / r['median_s']:.2f}" if "median_s" in r else "",
                     "compile s": r["compile_s"], "1st call s": r.get("first_call_s", ""),
                     "agrees": r.get("agrees", ""), "error": (r["error"] or "")[:60]})
      print(f"{name} {dname}: best {best} {ok[best]['median_s'] * 1e3:.3f} ms, jit {jit_s * 1e3:.3f} ms, "
            f"floor {rec['floor_s'] * 1e3:.3f} ms ({rec['wall_s']} s)", flush=True)
      write_json(args.out, "ios_xla_baselines", payload)  # after every net: a timeout keeps the rest
  print_table(rows, ["net", "dtype", "config", "ms", "vs jit", "floor ms", "floor/ms", "compile s",
                     "1st call s", "agrees", "error"])
  payload["total_wall_s"] = round(time.perf_counter() - t_start, 1)
  write_json(args.out, "ios_xla_baselines", payload)


if __name__ == "__main__":
  main()
