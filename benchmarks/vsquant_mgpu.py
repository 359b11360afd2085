"""Per-block scaled FP8 / int8 GEMM: the Mosaic GPU kernel (`mlsys_jax/quant/_mgpu_gemm.py`) against the same
run's bf16 matmul, XLA's FP8 per-tensor and int8 per-channel dots, and the Triton kernels of `_pallas_gemm`.

Every method is compiled first (threads), checked (FP8: against the float64-accurate product of the dequantized
codes; int8: against the Triton kernel, whose int32 partial sums are exact, and on 256 rows against XLA's int32
per-vector partial sums), then timed interleaved with the bf16 dot (`stats.time_interleaved`, wall time per call
of a jitted function, 8192^3 so dispatch is < 1%).

    PYTHONPATH=. python3 benchmarks/vsquant_mgpu.py --out $OUT [--configs 64:128:2:8:x2:ps,64:128:2:8:x2:ps:wb] [--small]
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, parse_args, print_table, write_json
from mlsys_jax import stats
from mlsys_jax.quant import _mgpu_gemm as mg
from mlsys_jax.quant import _pallas_gemm as pg


def _extra(ap):
  ap.add_argument("--configs", default="64:128:2:8:x2,64:128:2:8:x2:ps",
                  help="Mosaic configs tile_m:tile_n:stages[:grid_group] then flags: x2 (two K blocks per step), "
                       "w3 (3 compute warpgroups), c2 (clusters of 2 along M, W by TMA multicast), ps (persistent: "
                       "one CTA per SM loops over tiles), wb (FP8 only: DeepGEMM's 128 x 128 weight scale blocks, "
                       "w_block=128), noscale (diagnostic: no per-block promotion, the codes' plain product); "
                       "'cast' is accepted and ignored (session 10/11 commands)")
  ap.add_argument("--kinds", default="fp8:128,int8:64,int8:128", help="kind:V pairs for the Mosaic kernel")
  ap.add_argument("--triton", type=int, default=1, help="1: also time the Triton per-vector kernels")
  ap.add_argument("--reps", type=int, default=8)
  ap.add_argument("--name", default="vsquant_mgpu")
  ap.add_argument("--budget_s", type=float, default=1e9, help="stop timing new rows after this")
  ap.add_argument("--ptxas", type=int, default=0,
                  help="1: no timing; compile each Mosaic config at 1024^3 with MOSAIC_GPU_DUMP_PTXAS/SASS, write "
                       "each compiler output to <name>_<kind><V>_<config>.txt and a JSON of ptxas lines (registers, "
                       "spills, warnings) and SASS opcode counts")


def _rel(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


_FLAGS = ("x2", "w3", "c2", "ps", "wb", "noscale", "cast")


def _cfg(s: str) -> tuple[mg.MgpuConfig, set]:
  """tile_m:tile_n:stages[:grid_group] then any of _FLAGS (see --configs): the config and the set of flags."""
  p = s.split(":")
  flags = set()
  while p and not p[-1].isdigit():
    flags.add(p.pop())
  if flags - set(_FLAGS):
    raise ValueError(f"unknown config flags {sorted(flags - set(_FLAGS))} in {s!r}; known: {_FLAGS}")
  return mg.MgpuConfig(*[int(x) for x in p], blocks_per_step=2 if "x2" in flags else 1,
                       compute_wgs=3 if "w3" in flags else 2, cluster_m=2 if "c2" in flags else 1,
                       persistent="ps" in flags), flags


def _fn_for(kind, v, cfg, flags):
  """The jitted Mosaic call of one row: scaled_matmul with (N, K) weights, or for 'noscale' the padded kernel
  without promotion (8192^3 needs no padding)."""
  if "noscale" in flags:
    return jax.jit(lambda a, sa, w_nk, sw: mg.scaled_matmul_padded(a, sa.T, w_nk, sw, vector_size=v, config=cfg,
                                                                   promote=False))
  return jax.jit(functools.partial(mg.scaled_matmul, vector_size=v, w_layout="nk", config=cfg,
                                   w_block=128 if "wb" in flags else None))


_OPS = ("HGMMA", "WARPGROUP", "I2F", "I2FP", "FFMA", "FMUL", "FADD", "IADD3", "IMAD", "MOV", "LDS", "STS", "LDL",
        "STL", "BAR", "SYNCS", "SHFL", "F2F", "PRMT", "BRA")


def _ptxas_report(args):
  """Compiler diagnostics of each Mosaic config (no timing): the ptxas summary (registers, spill bytes, any
  warning such as wgmma serialization) and how many of each SASS opcode the kernel holds (whole kernel,
  static count), from Mosaic GPU's MOSAIC_GPU_DUMP_PTXAS / MOSAIC_GPU_DUMP_SASS output."""
  import collections
  import ctypes
  import os
  import re
  import sys
  import tempfile
  os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
  os.environ["MOSAIC_GPU_DUMP_SASS"] = "1"
  m = n = k = 256 if args.small else 1024
  out_dir = args.out or os.environ.get("OUT", ".")
  result = {"env": environment(), "shape": [m, k, n], "rows": [], "command": "benchmarks/vsquant_mgpu.py --ptxas 1"}
  op_re = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*)")
  for kv in args.kinds.split(","):
    kind, v = kv.split(":")
    v = int(v)
    dt = jnp.float8_e4m3fn if kind == "fp8" else jnp.int8
    a = jnp.ones((m, k), dt)
    w = jnp.ones((n, k), dt)
    sa, sw = jnp.ones((k // v, m), jnp.float32), jnp.ones((k // v, n), jnp.float32)
    for cs in args.configs.split(","):
      cfg, flags = _cfg(cs)
      if kind != "fp8" and "wb" in flags:
        continue
      row = {"kind": kind, "V": v, "config": cs, **dataclasses.asdict(cfg)}
      fn = jax.jit(functools.partial(mg.scaled_matmul_padded, vector_size=v, config=cfg,
                                     w_tile_scales="wb" in flags, promote="noscale" not in flags))
      with tempfile.TemporaryFile() as tmp:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
          jax.block_until_ready(fn(a, sa, w, sw))
        except Exception as e:  # recorded, not fatal
          row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        finally:
          sys.stdout.flush()
          sys.stderr.flush()
          try:   # C stdio buffers of the compiler's dump (else they land in the log after the restore)
            ctypes.CDLL(None).fflush(None)
          except Exception:  # noqa: BLE001
            pass
          os.dup2(saved[0], 1)
          os.dup2(saved[1], 2)
          os.close(saved[0])
          os.close(saved[1])
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
      fname = f"{args.name}_{kind}{v}_{cs.replace(':', '-')}.txt"
      with open(os.path.join(out_dir, fname), "w") as f:
        f.write(text[:600_000])
      row["ptxas"] = [l.strip() for l in text.splitlines()
                      if re.search(r"ptxas|registers|[Ss]pill|warning|serializ", l)][:20]
      counts = collections.Counter(mt.group(1) for mt in op_re.finditer(text))
      row["sass_ops"] = {o: counts.get(o, 0) for o in _OPS}
      row["sass_total"] = sum(counts.values())
      row["sass_top"] = dict(counts.most_common(30))
      row["file"] = fname
      print({kk: row[kk] for kk in ("kind", "V", "config", "ptxas", "sass_ops", "sass_total")}, flush=True)
      result["rows"].append(row)
      write_json(args.out, args.name, result)


def main():
  args = parse_args(__doc__, _extra)
  if args.ptxas:
    return _ptxas_report(args)
  t0 = time.perf_counter()
  env = environment()
  print(env, flush=True)
  gpu = mg.available()
  m = k = n = 256 if args.small else 8192
  flops = 2 * m * k * n
  reps, inner = (2, 1) if args.small else (args.reps, 3)
  a = jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.float32)
  w = jax.random.normal(jax.random.PRNGKey(2), (k, n), jnp.float32)
  a16, w16 = a.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  # FP8 per-block codes (1 x 128 activation, 128 x 1 weight scales)
  (fa, fsa), (fw, fsw) = pg.fp8_vector_quantize(a, 1, 128), pg.fp8_vector_quantize(w, 0, 128)
  fw_nk = jnp.asarray(fw.T)
  ref_fp8 = jax.jit(lambda: jnp.dot(fa.astype(jnp.float32) * jnp.repeat(fsa, 128, axis=1)[:, :k],
                                    fw.astype(jnp.float32) * jnp.repeat(fsw, 128, axis=0)[:k],
                                    precision=jax.lax.Precision.HIGHEST))()
  # DeepGEMM's weight format (128 x 128 scale blocks) for the 'wb' rows, and its reference
  bw, bsw = pg.fp8_block_quantize(w, 128)
  bw_nk = jnp.asarray(bw.T)
  ref_fp8_wb = jax.jit(lambda: jnp.dot(fa.astype(jnp.float32) * jnp.repeat(fsa, 128, axis=1)[:, :k],
                                       bw.astype(jnp.float32) * jnp.repeat(jnp.repeat(bsw, 128, 0), 128, 1),
                                       precision=jax.lax.Precision.HIGHEST))()
  rows_chk = min(256, m)   # the 'noscale' diagnostic: the plain product of the codes on the first rows
  ref_fp8_plain = np.asarray(jnp.dot(fa[:rows_chk].astype(jnp.float32), fw.astype(jnp.float32),
                                     precision=jax.lax.Precision.HIGHEST), np.float64)
  ta, tw = jnp.max(jnp.abs(a)) / 448, jnp.max(jnp.abs(w)) / 448
  a8, w8 = (a / ta).astype(jnp.float8_e4m3fn), (w / tw).astype(jnp.float8_e4m3fn)
  # int8 codes with per-vector scales (random positive scales; the kernel does not care how they were found)
  ia = jax.random.randint(jax.random.PRNGKey(3), (m, k), -127, 128, jnp.int32).astype(jnp.int8)
  iw = jax.random.randint(jax.random.PRNGKey(4), (k, n), -127, 128, jnp.int32).astype(jnp.int8)
  iw_nk = jnp.asarray(iw.T)
  ref_int8_plain = np.asarray(jax.lax.dot(ia[:rows_chk], iw, preferred_element_type=jnp.int32), np.float64)
  scales = {}
  for v in (64, 128):
    g = k // v
    scales[v] = (jax.random.uniform(jax.random.PRNGKey(5 + v), (m, g), minval=0.5, maxval=2.0),
                 jax.random.uniform(jax.random.PRNGKey(6 + v), (g, n), minval=0.5, maxval=2.0))
  ca, cw = jax.random.uniform(jax.random.PRNGKey(9), (m, 1)), jax.random.uniform(jax.random.PRNGKey(10), (1, n))

  mm = jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32))
  methods = {   # name -> (fn, args, check)   check: ("ref", array) | ("int8", v) | None
      "bf16 jnp.dot (f32 accumulation)": (mm, (a16, w16), None),
      "XLA FP8 E4M3 dot, per-tensor scale": (jax.jit(lambda p, q, s: jnp.dot(
          p, q, preferred_element_type=jnp.float32) * s), (a8, w8, ta * tw), None),
      "XLA int8 dot, per-channel rescale": (jax.jit(lambda p, q, s, t: jax.lax.dot(
          p, q, preferred_element_type=jnp.int32).astype(jnp.float32) * s * t), (ia, iw, ca, cw), None),
  }
  if args.triton:
    interp = not gpu
    methods["Triton FP8 per-block (session-8 best: 128x128 w8, imprecise_acc=128)"] = (
        jax.jit(functools.partial(pg.vs_fp8_matmul, vector_size=128, w_layout="nk", prefetch=1,
                                  imprecise_acc=128, block_m=128, block_n=128, num_warps=8, interpret=interp)),
        (fa, fsa, fw, fsw), ("ref", ref_fp8))
    methods["Triton int8 per-vector V=64 (defaults)"] = (
        jax.jit(functools.partial(pg.vs_int8_matmul, vector_size=64, interpret=interp)),
        (ia, scales[64][0], iw, scales[64][1]), None)
  # the public functions as users call them (backend=None: Mosaic on Hopper after its self-test)
  methods["public vs_fp8_matmul (backend auto), weights (K, N)"] = (
      jax.jit(functools.partial(pg.vs_fp8_matmul, vector_size=128)), (fa, fsa, fw, fsw), ("ref", ref_fp8))
  methods["public vs_fp8_matmul w_block=128 (backend auto), DeepGEMM weights (K, N)"] = (
      jax.jit(functools.partial(pg.vs_fp8_matmul, vector_size=128, w_block=128)), (fa, fsa, bw, bsw),
      ("ref", ref_fp8_wb))
  methods["public vs_int8_matmul V=64 (backend auto), weights (K, N)"] = (
      jax.jit(functools.partial(pg.vs_int8_matmul, vector_size=64)), (ia, scales[64][0], iw, scales[64][1]),
      ("int8", 64))
  configs = {}   # Mosaic rows: their MgpuConfig
  for kv in args.kinds.split(","):
    kind, v = kv.split(":")
    v = int(v)
    for cs in args.configs.split(","):
      cfg, flags = _cfg(cs)
      if kind != "fp8" and "wb" in flags:
        continue
      name = (f"Mosaic {kind} V={v} tile {cfg.compute_wgs * cfg.tile_m}x{cfg.tile_n} stages {cfg.stages} "
              f"group {cfg.grid_group}" + (" 2 blocks/step" if cfg.blocks_per_step == 2 else "")
              + (" cluster 2 (W multicast)" if cfg.cluster_m == 2 else "")
              + (" persistent" if cfg.persistent else "")
              + (" 128x128 weight scale blocks (DeepGEMM format)" if "wb" in flags else "")
              + (" NO SCALES (diagnostic: no per-block promotion)" if "noscale" in flags else ""))
      fn = _fn_for(kind, v, cfg, flags)
      if "noscale" in flags:
        xs = (fa, fsa, fw_nk, fsw) if kind == "fp8" else (ia, scales[v][0], iw_nk, scales[v][1])
        methods[name] = (fn, xs, ("rows", ref_fp8_plain if kind == "fp8" else ref_int8_plain))
      elif "wb" in flags:
        methods[name] = (fn, (fa, fsa, bw_nk, bsw), ("ref", ref_fp8_wb))
      elif kind == "fp8":
        methods[name] = (fn, (fa, fsa, fw_nk, fsw), ("ref", ref_fp8))
      else:
        methods[name] = (fn, (ia, scales[v][0], iw_nk, scales[v][1]), ("int8", v))
      configs[name] = {**dataclasses.asdict(cfg), "flags": sorted(flags), "config_string": cs}

  def compile_one(name):
    fn, xs, _ = methods[name]
    try:
      return fn.lower(*xs).compile()
    except Exception as e:  # recorded, not fatal
      return e
  with concurrent.futures.ThreadPoolExecutor(8) as ex:
    compiled = dict(zip(methods, ex.map(compile_one, list(methods))))
  print(f"compiled {len(methods)} in {time.perf_counter() - t0:.1f}s", flush=True)

  # int8 references: exact int32 per-vector partial sums on the first 256 rows, scaled in float64
  int8_ref = {}
  for v in (64, 128):
    rows = min(256, m)
    p = jax.lax.dot_general(ia[:rows].reshape(rows, k // v, v), iw.reshape(k // v, v, n),
                            (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)   # (g, rows, n)
    p = np.asarray(p, np.float64)
    sa, sw = np.asarray(scales[v][0][:rows], np.float64), np.asarray(scales[v][1], np.float64)
    int8_ref[v] = np.einsum("gmn,mg,gn->mn", p, sa, sw)

  base = compiled["bf16 jnp.dot (f32 accumulation)"]
  result = {"env": env, "shape": [m, k, n], "rows": [], "command": "benchmarks/vsquant_mgpu.py",
            "mosaic_self_test": {f"{kd}:{v}": mg.kernel_self_test(kd, v) for kd in mg.KINDS
                                 for v in mg.VECTOR_SIZES[kd]}}
  print(result["mosaic_self_test"], flush=True)
  rows = result["rows"]
  for name, (fn, xs, check) in methods.items():
    row = {"op": name, **({"config": configs[name]} if name in configs else {})}
    c = compiled[name]
    if isinstance(c, Exception):
      row["error"] = f"{type(c).__name__}: {str(c)[:600]}"
    elif time.perf_counter() - t0 > args.budget_s:
      row["error"] = "skipped: budget"
    else:
      try:
        out = jax.block_until_ready(c(*xs))
        if check is not None and check[0] == "ref":
          row["rel_err"] = _rel(out, check[1])
        elif check is not None and check[0] == "rows":
          row["rel_err"] = _rel(out[:check[1].shape[0]], check[1])
        elif check is not None:
          got = np.asarray(out[:int8_ref[check[1]].shape[0]], np.float64)
          row["rel_err"] = _rel(got, int8_ref[check[1]])
          row["max_rel_elem"] = float(np.max(np.abs(got - int8_ref[check[1]]) /
                                             (np.abs(int8_ref[check[1]]) + 1e-3 * np.abs(int8_ref[check[1]]).max())))
        t = stats.time_interleaved(lambda: c(*xs), lambda: base(a16, w16), repeats=reps, warmup=2, inner=inner)
        row.update(ms=t.median_a * 1e3, bf16_ms=t.median_b * 1e3, speedup_vs_bf16=t.ratio,
                   TOPs=flops / t.median_a / 1e12, p_faster_than_bf16=t.p_a_faster)
      except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
    print(row, flush=True)
    rows.append(row)
    write_json(args.out, args.name, result)
  print_table(rows, ["op", "ms", "bf16_ms", "speedup_vs_bf16", "TOPs", "rel_err", "error"])
  result["wall_s"] = time.perf_counter() - t0
  write_json(args.out, args.name, result)


if __name__ == "__main__":
  main()
