"""One Inception block as a few Pallas kernels vs XLA's best program for it (issue 20, stretch item).

At batch 1 Inception-V3 under XLA's best program is the latency of ~60 dependent 5-7 us cuDNN kernels, and
any IOS schedule of those kernels is bounded by the longest chain (~1.27x f32 / ~1.43x bf16). This script
tests whether fewer, faster kernels beat it on one block: ``mlsys_jax.sched._pallas_block`` emits the
block as one Pallas (Triton) kernel per level of its convolution DAG (Inception-A, ``Mixed_5b`` at
35x35x192: three kernels; Inception-C, ``Mixed_6b`` at 17x17x768: five), each writing straight into the
concatenated output's channel slices.

Programs, per (block, dtype), all compiled before anything runs:
  xla:<config>    the block as the network writes it (weights closed over) under every per-jit XLA
                  configuration of ``sched.XLA_CONFIGS`` (plain jit, command buffers incl. convolutions,
                  CONCURRENT, latency-hiding scheduler, cuDNN conv fusion)
  ios             ``sched.ios_schedule(..., strategy='merge', check='off')`` of the same function
  pallas:<tile>:<config>   the Pallas levels per tile configuration (``parse_tile``), under the
                  command-buffer configuration (or plain jit: ``--pallas_opts``, ``tile@jit``)

Measured: (1) device time per call from profiler traces (``benchmarks.common.call_device_times``: span
from the first kernel's start to the last kernel's end, median over calls; kernels per call; summed kernel
time), two rounds in opposite orders; (2) wall time per call, back-to-back calls, programs interleaved
(``benchmarks/ios.py``'s ``interleaved_times``). Ratios are against the best XLA program of the same run
(``best_xla_span`` over the device spans, ``best_xla_wall`` over wall times). Relative L2 errors are
against the float32 block at HIGHEST precision.

With ``--network inception_v3`` the same programs and measurements for the whole network at batch 1 (per
dtype): ``xla:<config>`` (``model.apply`` under every ``sched.XLA_CONFIGS`` entry), ``ios`` (IOS-Merge) and
``pallas:<config>``: ``mlsys_jax.sched._pallas_net.pallas_inception_v3``, every stride-1 Inception block
(Mixed_5b-d, 6b-e, 7b-c) as Pallas level kernels with per-block tiles (``--net_tiles``; default the H200
per-block bests), the stem, the reductions and the head in XLA, under ``--net_pallas_opts`` (default the
command-buffer configuration and plain jit); ``--net_variants`` adds Pallas networks with other tiles or with
blocks left in XLA. Rows add ``pallas_kernels`` / ``pallas_busy_s`` (the level kernels' launches and summed
time per call).

  PYTHONPATH=. python3 benchmarks/ios_block.py --out $OUT --name ios_block_h200          # GPU
  PYTHONPATH=. python3 benchmarks/ios_block.py --small                                   # CPU smoke test
  PYTHONPATH=. python3 benchmarks/ios_block.py --network inception_v3 --out $OUT --name ios_net_h200
  PYTHONPATH=. python3 benchmarks/ios_block.py --network inception_v3 --small             # CPU smoke test
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import call_device_times, environment, print_table, write_json  # noqa: E402
from mlsys_jax import sched  # noqa: E402
from mlsys_jax.sched import _pallas_block as pb  # noqa: E402

BLOCKS = {
    # name: (init, xla function, ops, (h, w, cin) full size, (h, w, cin, width) small)
    "a": (pb.init_inception_a, pb.inception_a_xla, pb.inception_a_ops, (35, 35, 192), (6, 5, 16, 0.25)),
    "c": (pb.init_inception_c, pb.inception_c_xla, pb.inception_c_ops, (17, 17, 768), (5, 4, 32, 0.125)),
}


def xla_and_ios_programs(f, x, args, on_gpu: bool) -> tuple[dict, dict]:
  """``f`` compiled under every configuration of ``--xla_configs`` (``xla:<name>``) and, with ``--ios``, IOS-Merge's
  schedule of it (``ios``; analytical costs unless ``--ios_cost profiler`` on a GPU): the compiled programs and
  per program ``compile_s`` (IOS: ``search_compile_s``, search and compile, and its stage ``counts``)."""
  progs, info = {}, {}
  for cfg in args.xla_configs.split(","):
    tc = time.perf_counter()
    progs[f"xla:{cfg}"] = jax.jit(f, compiler_options=sched.XLA_CONFIGS[cfg] or None).lower(x).compile()
    info[f"xla:{cfg}"] = {"compile_s": time.perf_counter() - tc}
  if args.ios:
    prof = sched.StageProfiler() if on_gpu and args.ios_cost == "profiler" else sched.AnalyticalCost()
    ts = time.perf_counter()
    sc = sched.ios_schedule(f, x, strategy="merge", profiler=prof, check="off")
    jf, consts = sc._build()
    cprog = jf.lower(consts, x).compile()
    progs["ios"] = lambda v, c=cprog, k=consts: c(k, v)
    info["ios"] = {"search_compile_s": time.perf_counter() - ts, "counts": sc.counts()}
  return progs, info


def parse_tile(s: str):
  """``BMxBNxBK`` with optional ``/flat``, ``/wN`` (warps), ``/sN`` (stages), ``/kN`` (split-K: chunks of at
  most N steps below level 1) and ``/nl`` (no split in the last level), e.g. ``32x32x64/flat/k4/nl``; several
  joined by ``+`` are per-level configurations (the last one repeats), e.g. ``64x64x64+32x32x64/flat/k4``."""
  if "+" in s:
    return tuple(parse_tile(p) for p in s.split("+"))
  parts = s.split("/")
  bm, bn, bk = (int(v) for v in parts[0].split("x"))
  kw = {}
  for p in parts[1:]:
    if p == "flat":
      kw["k_mode"] = "flat"
    elif p.startswith("k"):
      kw["split_steps"] = int(p[1:])
    elif p == "nl":
      kw["split_last"] = False
    elif p.startswith("w"):
      kw["num_warps"] = int(p[1:])
    elif p.startswith("s"):
      kw["num_stages"] = int(p[1:])
    else:
      raise ValueError(f"unknown tile option {p!r} in {s!r}")
  return pb.BlockConfig(bm=bm, bn=bn, bk=bk, **kw)


def relerr(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def measure(progs: dict, x, ref, flops: float, args, on_gpu: bool, payload: dict, labels: dict):
  """Relative error vs ``ref``, wall time (interleaved) and, on a GPU, the device span of every compiled
  program ``progs[name](x)``; rows with ratios against the best ``xla:*`` program of the same run.

  Returns:
    ``(rows, best_wall_row, best_span_row)``.
  """
  from benchmarks.ios import interleaved_times   # noqa: E402  (shared timing helper)
  errs = {k: relerr(p(x), ref) for k, p in progs.items()}
  fns = {k: (p, (x,)) for k, p in progs.items()}
  wall = interleaved_times(fns, args.number, args.repeat)
  dev = {}
  if on_gpu:
    names = list(progs)
    for order in (names, names[::-1]):
      try:
        r = call_device_times({k: (lambda p=progs[k]: p(x)) for k in order}, args.calls)
      except (RuntimeError, FileNotFoundError) as e:   # keep the wall times of this case
        print(f"device trace failed: {e!r}", flush=True)
        payload.setdefault("trace_errors", []).append(repr(e))
        continue
      for k in order:
        dev.setdefault(k, []).append(r[k])
  rows = []
  for k in progs:
    row = {**labels, "program": k, "wall_s": float(np.median(wall[k])), "wall_all_s": wall[k], "rel_err": errs[k]}
    if dev.get(k):
      spans = [d["span_s"] for d in dev[k]]
      row.update({"span_s": float(min(spans)), "span_rounds_s": spans, "kernels": dev[k][0]["kernels"],
                  "busy_s": float(np.median([d["busy_s"] for d in dev[k]])),
                  "kernel_s": {n: float(np.median(v)) for n, v in dev[k][0]["kernel_s"].items()}})
      # Pallas level kernels: their summed time per call (median per kernel name, times its launches per call)
      pk = {n: v for n, v in dev[k][0]["kernel_s"].items() if n.startswith("pallas_block")}
      if pk:
        row["pallas_busy_s"] = float(sum(np.sum(v) for v in pk.values()) / args.calls)
        row["pallas_kernels"] = sum(len(v) for v in pk.values()) / args.calls
      row["tflops"] = flops / row["span_s"] / 1e12
    rows.append(row)
  xla_rows = [r for r in rows if r["program"].startswith("xla:")]
  best_wall = min(xla_rows, key=lambda r: r["wall_s"])
  best_span = min(xla_rows, key=lambda r: r.get("span_s", r["wall_s"]))
  for r in rows:
    r["vs_best_xla_wall"] = best_wall["wall_s"] / r["wall_s"]
    if "span_s" in r:
      r["vs_best_xla_span"] = best_span["span_s"] / r["span_s"]
  return rows, best_wall, best_span


def parse_net_tiles(spec: str) -> dict:
  """``'Mixed_6b=32x32x64/flat/k4,e=32x32x32,Mixed_7c=xla'`` -> ``{block name: BlockConfig(s) or 'xla'}`` (a/c/e:
  every Inception-A/C/E block; ``xla``: leave the block in XLA)."""
  from mlsys_jax.sched import _pallas_net as pn
  kinds = {"a": [n for n in pn.PALLAS_BLOCKS if n.startswith("Mixed_5")],
           "c": [n for n in pn.PALLAS_BLOCKS if n.startswith("Mixed_6")],
           "e": [n for n in pn.PALLAS_BLOCKS if n.startswith("Mixed_7")]}
  out = {}
  for item in filter(None, spec.split(",")):
    name, eq, tile = item.partition("=")
    if not eq:
      raise ValueError(f"--net_tiles item {item!r} is not NAME=TILE")
    for n in kinds.get(name, [name]):
      out[n] = "xla" if tile == "xla" else parse_tile(tile)
  return out


def _tile_str(c) -> str:
  if not isinstance(c, pb.BlockConfig):
    return "+".join(_tile_str(v) for v in c)
  s = f"{c.bm}x{c.bn}x{c.bk}" + ("/flat" if c.k_mode == "flat" else "")
  s += f"/k{c.split_steps}" if c.split_steps else ""
  s += "/nl" if c.split_steps and not c.split_last else ""
  s += f"/w{c.num_warps}" if c.num_warps != 4 else ""
  return s + (f"/s{c.num_stages}" if c.num_stages != 3 else "")


def net_flops(model, variables, x) -> float:
  """Multiply-add FLOPs (2 per MAC) of every ``nn.Conv`` of ``model`` (dense convs), from the captured output
  shapes (``jax.eval_shape``: nothing is computed)."""
  import flax.linen as nn
  _, st = jax.eval_shape(lambda v: model.apply(variables, v, capture_intermediates=lambda m, _: isinstance(m, nn.Conv),
                                               mutable=["intermediates"]), x)
  outs = st["intermediates"]
  return float(sum(2 * np.prod(p["kernel"].shape) * np.prod(outs[name]["__call__"][0].shape[:3])
                   for name, p in variables["params"].items()))


def network_main(args):
  """``--network inception_v3``: the whole network at batch 1 per dtype, every program compiled before any runs:
  ``xla:<config>`` (``model.apply`` with the weights closed over, every ``sched.XLA_CONFIGS`` entry), ``ios``
  (IOS-Merge, analytical search, check off) and ``pallas:<config>`` (``_pallas_net.pallas_inception_v3``: the
  A/C/E blocks as Pallas level kernels, the rest XLA). Measured as in block mode (:func:`measure`)."""
  from mlsys_jax.models import ios_benchmark_nets, ios_init_params
  from mlsys_jax.sched import _pallas_net as pn
  t_start = time.perf_counter()
  on_gpu = jax.default_backend() == "gpu"
  env = environment()
  print(env, flush=True)
  payload = {"env": env, "argv": sys.argv[1:], "network": args.network, "cases": []}
  overrides = parse_net_tiles(args.net_tiles)
  model32, shape = ios_benchmark_nets(small=args.small)[args.network]
  params32 = ios_init_params(model32, shape, seed=0)      # nonzero biases, like trained (BN-folded) weights
  x32 = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32)
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(lambda v: model32.apply(params32, v))(x32)
  flops = net_flops(model32, params32, x32)
  rows_all, last_case_s = [], 0.0
  for dt_name in args.dtypes.split(","):
    elapsed = time.perf_counter() - t_start
    if elapsed + last_case_s > args.time_budget_s:
      print(f"time budget: {elapsed:.0f} s + {last_case_s:.0f} s (previous dtype) > {args.time_budget_s:.0f} s; "
            f"skipping {dt_name}", flush=True)
      payload.setdefault("skipped", []).append(dt_name)
      continue
    t_case = time.perf_counter()
    dtype = jnp.dtype(dt_name)
    if dtype == jnp.float32:
      model, params = model32, params32
    else:
      model = ios_benchmark_nets(small=args.small, dtype=dtype)[args.network][0]
      params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params32)
    x = x32.astype(dtype)
    f = lambda v, m=model, p=params: m.apply(p, v)
    t0 = time.perf_counter()
    progs, info = xla_and_ios_programs(f, x, args, on_gpu)
    variants = [("", {}, args.net_pallas_opts.split(","))]
    for item in filter(None, args.net_variants.split(";")):
      label, _, spec = item.partition("=")
      variants.append((label, parse_net_tiles(spec), args.net_pallas_opts.split(",")[:1]))
    for label, extra, opts_list in variants:
      spec = {**pn.default_configs(dtype), **overrides, **extra}
      emit = [n for n, c in spec.items() if c != "xla"]
      net = pn.pallas_inception_v3(model, params, configs={n: spec[n] for n in emit}, blocks=emit, dtype=dtype)
      tag = f"pallas[{label}]" if label else "pallas"
      info[tag] = {"levels": net.levels(), "kernels": sum(net.levels().values()),
                   "tiles": {n: _tile_str(c) for n, c in net.configs.items()},
                   "xla_blocks": [n for n in pn.BLOCKS if n not in net.blocks]}
      for o in opts_list:
        tc = time.perf_counter()
        try:
          progs[f"{tag}:{o}"] = jax.jit(net, compiler_options=sched.XLA_CONFIGS[o] or None).lower(x).compile()
        except Exception as e:   # one variant failing to compile must not lose the run
          print(f"{tag}:{o} failed to compile: {e!r:.500}", flush=True)
          info[f"{tag}:{o}:error"] = repr(e)[:2000]
        info[f"{tag}:{o}"] = {"compile_s": time.perf_counter() - tc}
    compile_s = time.perf_counter() - t0
    print(f"{args.network} {dt_name}: {len(progs)} programs compiled in {compile_s:.1f} s", flush=True)
    rows, best_wall, best_span = measure(progs, x, ref, flops, args, on_gpu, payload,
                                         {"network": args.network, "dtype": dt_name})
    payload["cases"].append({"network": args.network, "dtype": dt_name, "shape": list(shape), "flops": flops,
                             "compile_s": compile_s, "best_xla_wall": best_wall["program"],
                             "best_xla_span": best_span["program"], "info": info, "rows": rows})
    rows_all += rows
    last_case_s = time.perf_counter() - t_case
    payload["wall_s"] = time.perf_counter() - t_start
    write_json(args.out, args.name, payload)
  cols = ["dtype", "program", "wall_s", "vs_best_xla_wall", "rel_err"]
  if on_gpu:
    cols[3:3] = ["span_s", "vs_best_xla_span", "kernels", "pallas_kernels", "busy_s", "pallas_busy_s"]
  for r in rows_all:
    for c in ("wall_s", "span_s", "busy_s", "pallas_busy_s"):
      if c in r:
        r[c[:-2] + "_us"] = r[c] * 1e6
  print_table(rows_all, [c[:-2] + "_us" if c in ("wall_s", "span_s", "busy_s", "pallas_busy_s") else c
                         for c in cols])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None)
  ap.add_argument("--name", default="ios_block")
  ap.add_argument("--small", action="store_true", help="tiny block, Pallas interpreter (CPU smoke test)")
  ap.add_argument("--blocks", default="a")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--xla_configs", default=",".join(sched.XLA_CONFIGS))
  ap.add_argument("--tiles", default="32x32x64/flat,32x32x64/flat/k4,32x32x64/flat/k4@jit")
  ap.add_argument("--tiles_c", default=None, help="tiles for block c (default: --tiles)")
  ap.add_argument("--pallas_opts", default="cmdbuf_conv_concurrent", help="XLA configurations of the Pallas "
                  "programs (comma-separated; a tile 'T@config' is compiled under that configuration only)")
  ap.add_argument("--ios", type=int, default=1, help="1: also the IOS-Merge schedule (analytical search)")
  ap.add_argument("--ios_cost", default="analytical", choices=("analytical", "profiler"),
                  help="IOS search cost model (profiler: on-device stage timing, GPU only)")
  ap.add_argument("--calls", type=int, default=30, help="traced calls per program and round")
  ap.add_argument("--number", type=int, default=20)
  ap.add_argument("--repeat", type=int, default=7)
  ap.add_argument("--time_budget_s", type=float, default=1e9, help="skip remaining cases after this (--network: "
                  "skip a dtype when the time so far plus the previous dtype's would pass it)")
  ap.add_argument("--network", default=None, choices=("inception_v3",), help="the whole network instead of one "
                  "block: XLA configs, IOS-Merge and the Pallas-emitted network (sched._pallas_net)")
  ap.add_argument("--net_tiles", default="", help="--network: per-block tile overrides 'NAME=TILE,...' (NAME a "
                  "block such as Mixed_6b, or a/c/e for every block of that kind; default: "
                  "_pallas_net.default_configs of the dtype)")
  ap.add_argument("--net_pallas_opts", default="cmdbuf_conv_concurrent,jit",
                  help="--network: XLA configurations of the Pallas-emitted network")
  ap.add_argument("--net_variants", default="", help="--network: more Pallas networks 'LABEL=SPEC;...' (SPEC as "
                  "--net_tiles, on top of it; NAME=xla leaves a block in XLA), each compiled under the first "
                  "--net_pallas_opts configuration only, e.g. 'e_xla=e=xla;e_k4=e=32x32x64/flat/k4'")
  args = ap.parse_args()
  if args.small:   # the Pallas interpreter takes ~0.1 s a call
    args.number, args.repeat = 1, 2
  if args.network:
    return network_main(args)
  t_start = time.perf_counter()
  on_gpu = jax.default_backend() == "gpu"
  env = environment()
  print(env, flush=True)
  payload = {"env": env, "argv": sys.argv[1:], "cases": []}
  rows_all = []
  for blk_name in args.blocks.split(","):
    init, xla_fn, ops_fn, full, small = BLOCKS[blk_name]
    for dt_name in args.dtypes.split(","):
      if time.perf_counter() - t_start > args.time_budget_s:
        print(f"time budget reached: skipping {blk_name} {dt_name}", flush=True)
        continue
      dtype = jnp.dtype(dt_name)
      if args.small:
        h, w, cin, width = small
        params32 = init(0, cin=cin, width=width)
      else:
        h, w, cin = full
        params32 = init(0, cin=cin)
      params = {k: (a.astype(dtype), b.astype(dtype)) for k, (a, b) in params32.items()}
      x32 = jax.random.normal(jax.random.PRNGKey(1), (1, h, w, cin), jnp.float32)
      x = x32.astype(dtype)
      with jax.default_matmul_precision("highest"):
        ref = jax.jit(lambda v: xla_fn(params32, v))(x.astype(jnp.float32))
      flops = pb.block_flops(params32, h, w)
      f = lambda v, p=params: xla_fn(p, v)
      t0 = time.perf_counter()
      progs, info = xla_and_ios_programs(f, x, args, on_gpu)
      ops, concat = ops_fn(params)
      tiles = args.tiles_c if blk_name == "c" and args.tiles_c else args.tiles
      for tile_opt in tiles.split(","):
        tile, _, only = tile_opt.partition("@")
        cfg = parse_tile(tile)
        blk = pb.build_block(ops, concat, cfg, dtype=dtype)
        for o in ([only] if only else args.pallas_opts.split(",")):
          opts = sched.XLA_CONFIGS[o]
          g = jax.jit(lambda v, b=blk: pb.apply_block(b, v), compiler_options=opts or None)
          try:
            progs[f"pallas:{tile}:{o}"] = g.lower(x).compile()
          except Exception as e:   # one variant failing to compile must not lose the run
            print(f"pallas:{tile}:{o} failed to compile: {e!r:.500}", flush=True)
            info[f"pallas:{tile}:{o}:error"] = repr(e)[:2000]
        info[f"pallas:{tile}"] = {"levels": len(blk.levels), "tasks": [
            [(t.kind, t.s_hi - t.s_lo, t.n_pad // lv.config.bn * -(-h * w // lv.config.bm)) for t in lv.tasks]
            for lv in blk.levels], "programs_per_level": [
            sum(-(-h * w // lv.config.bm) * (t.n_pad // lv.config.bn) for t in lv.tasks) for lv in blk.levels]}
      compile_s = time.perf_counter() - t0
      print(f"block {blk_name} {dt_name}: {len(progs)} programs compiled in {compile_s:.1f} s", flush=True)
      rows, best_wall, best_span = measure(progs, x, ref, flops, args, on_gpu, payload,
                                           {"block": blk_name, "dtype": dt_name})
      case = {"block": blk_name, "dtype": dt_name, "shape": [1, h, w, cin], "flops": flops,
              "compile_s": compile_s, "best_xla_wall": best_wall["program"],
              "best_xla_span": best_span["program"], "info": info, "rows": rows}
      payload["cases"].append(case)
      rows_all += rows
      payload["wall_s"] = time.perf_counter() - t_start
      write_json(args.out, args.name, payload)
  cols = ["block", "dtype", "program", "wall_s", "vs_best_xla_wall", "rel_err"]
  if on_gpu:
    cols[4:4] = ["span_s", "vs_best_xla_span", "kernels", "busy_s", "tflops"]
  for r in rows_all:
    for c in ("wall_s", "span_s", "busy_s"):
      if c in r:
        r[c.replace("_s", "_us")] = r[c] * 1e6
  print_table(rows_all, [c.replace("_s", "_us") if c in ("wall_s", "span_s", "busy_s") else c for c in cols])


if __name__ == "__main__":
  main()
