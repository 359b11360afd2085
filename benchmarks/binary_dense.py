"""Packed binary dense layer (Pallas XOR+popcount) vs bf16, int8 and plain-XLA xor+popcount, batch 1-8.

Bannink et al., MLSys 2021 (LCE): a binary layer at small batch is bound by reading its weights; packed
weights are 16x fewer bytes than bf16. Every method runs ``--reps`` times inside ONE jitted function:

- every launch gets its OWN weights and activations (separate jit arguments, never slices of one array:
  a slice would add a copy kernel per launch; shared weights let XLA merge dots that share an operand
  -- DotMerger, sibling fusion -- which made the earlier 16384 bf16 baseline "run" at 12 TB/s);
  ``reps`` distinct weight sets also span far more than the 50 MB L2;
- every output element is consumed, by ONE fused sum over all launches at the end (no per-launch
  reduction kernel, and nothing for XLA to slice into the dot);
- an EMPTY Pallas kernel (same grid, writes its output, reads nothing) runs in the same loop shape: its
  time per launch is the floor of launch + write + consumption that every method pays here.

All functions of one shape (every kernel configuration, the floor, the baselines) are compiled first,
then timed round-robin (``--repeats`` rounds, each call ``--inner`` times back to back, order rotated
per round); medians per launch are reported with the read floor (packed weight bytes at the measured
read bandwidth). With ``--profile`` one ``jax.profiler`` trace per shape also gives each loop's DEVICE
time per launch (the kernels' own durations, without the host-side launch cost that dominates the wall
time of short kernels). ``best_config`` is the exact configuration with the lowest geometric mean over
shapes (wall time); ``device_best_config`` per row by device time.

  python benchmarks/binary_dense.py --profile --out benchmarks/results     # GPU
  python benchmarks/binary_dense.py --small                      # CPU smoke test (interpret mode)
  python benchmarks/binary_dense.py --conv_only                  # binary convs (CPU: LCE's setting)
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from benchmarks import common  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.quant.binary import packed as pk  # noqa: E402
from mlsys_jax.quant.binary.pallas_dense import (DenseConfig, _check_config, default_config,  # noqa: E402
                                                 packed_dot_call, pallas_packed_dense)

# Sweep 1 (binary_dense_h200_sweep1.json) tried 14 ('sweep1'); these are its front runners, timed by
# the final run (binary_dense_h200_final.json).
DEFAULT_CONFIGS = ("default,acc:32:128:1:4:2,csa:16:256:1:4:1,acc:8:256:1:2:1,rows:32:256:1:8:4,acc:32:64:1:8:3,"
                   "rows:128:64:1:8:3")
SWEEP1_CONFIGS = ("acc:32:64:1:4:2,acc:16:128:1:4:2,acc:32:128:1:4:2,acc:8:256:1:2:1,acc:32:64:2:4:2,"
                  "acc:128:32:1:8:3,acc:32:32:1:4:3,rows:32:256:1:8:4,rows:64:128:1:8:3,bcast:32:64:1:4:3,"
                  "acc:16:64:1:2:3,csa:32:128:1:4:2,csa:64:128:1:8:2,csa:16:256:1:4:1")


def _extra(ap):
  ap.add_argument("--sizes", default="8192,16384")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--reps", type=int, default=32, help="launches per timed call, each on its own weights")
  ap.add_argument("--repeats", type=int, default=15, help="timed rounds")
  ap.add_argument("--inner", type=int, default=2, help="back-to-back calls per timing")
  ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                  help="'default', 'sweep1' (the 14 of sweep 1) or variant:block_n:block_k:splits:num_warps:"
                       "num_stages, comma-separated")
  ap.add_argument("--deadline_s", type=float, default=1e9,
                  help="stop starting new shapes after this many seconds (results so far are written)")
  ap.add_argument("--no_baselines", action="store_true", help="time only the Pallas configurations")
  ap.add_argument("--baselines", default="xla_packed,bf16,int8,int8_weight_only",
                  help="which same-run baselines to time (comma-separated subset of the default)")
  ap.add_argument("--old_loop", action="store_true",
                  help="also time the previous loop shape (sliced arguments, one reduction per launch) "
                       "with the empty kernel and the default config, at the first shape")
  ap.add_argument("--profile", action="store_true",
                  help="also measure device time per launch from a profiler trace (GPU)")
  ap.add_argument("--conv_only", action="store_true",
                  help="only the binary-conv section (e.g. on CPU, LCE's setting: float32 baseline)")
  ap.add_argument("--with_conv", action="store_true", help="also run the binary-conv section")
  ap.add_argument("--conv_repeats", type=int, default=10)
  ap.add_argument("--batch_configs", default="",
                  help="per-batch overrides of --configs: 'B=cfg,cfg;B=cfg' (e.g. a sweep at batch 8 and only "
                       "the default elsewhere)")
  ap.add_argument("--steady_inner", type=int, default=0,
                  help="also time every function with this many back-to-back calls per timing (5 rounds): the "
                       "steady-state wall per launch, where the host dispatch of one call overlaps the "
                       "previous call's kernels (0: off)")
  ap.add_argument("--probes", action="store_true",
                  help="also time two diagnostic kernels on the default batch-8 tile (rows 32 x 128, 2 splits): "
                       "the weight read alone ('probe_load') and the counting alone, weights from L2 ('probe_compute')")
  ap.add_argument("--l2_configs", default="",
                  help="configurations (as --configs) also timed with every program reading program 0's weight "
                       "tile, i.e. their counting without the DRAM read ('l2:<config>')")
  ap.add_argument("--tag", default="", help="suffix of the JSON name (binary_dense_<tag>.json), e.g. one per "
                  "XLA_FLAGS setting measured in its own process")
  ap.add_argument("--no_bandwidth", action="store_true",
                  help="skip the read/copy bandwidth probes (read_floor_seconds is then NaN; the floor at the "
                       "bf16 kernel's read rate is still reported)")


def _parse_configs(text: str, b: int, n: int, wn: int) -> list[DenseConfig]:
  out = []
  for c in text.replace("sweep1", SWEEP1_CONFIGS).split(","):
    if c == "default":
      cfg = default_config(b, n, wn)
    else:
      v, bn, bk, s, nw, ns = c.split(":")
      cfg = DenseConfig(v, int(bn), int(bk), int(s), int(nw), int(ns))
    try:
      _check_config(n, wn, cfg)
    except ValueError:      # does not fit this shape
      continue
    if cfg not in out:
      out.append(cfg)
  return out


def _name(cfg: DenseConfig) -> str:
  return "pallas:" + ":".join(str(v) for v in cfg)


def _empty_kernel(a_ref, w_ref, o_ref):
  o_ref[...] = jnp.zeros(o_ref.shape, jnp.int32)


def _empty_call(a, w, block_n: int = 32):
  """The floor: a Pallas call with the kernel's grid and output that reads nothing."""
  bp, wn = a.shape
  n = w.shape[0]
  return pl.pallas_call(
      _empty_kernel, out_shape=jax.ShapeDtypeStruct((bp, n), jnp.int32), grid=(n // block_n,),
      in_specs=[pl.BlockSpec((bp, wn), lambda j: (0, 0)), pl.BlockSpec((block_n, wn), lambda j: (j, 0))],
      out_specs=pl.BlockSpec((bp, block_n), lambda j: (0, j)),
      interpret=jax.devices()[0].platform != "gpu")(a, w)


def _probe_load_kernel(a_ref, w_ref, o_ref, *, batch: int):
  """Diagnostic (a wrong answer on purpose): read the weight tile, one sum per row, no popcounts."""
  s = jnp.sum(jax.lax.bitcast_convert_type(w_ref[...], jnp.int32), axis=1)
  for b in range(batch):
    o_ref[b, :] = s + b


def _probe_call(a, w, kind: str, cfg: DenseConfig):
  """Diagnostics on the grid, tiles and launch parameters of ``cfg``: 'load' reads every weight tile
  and sums it (the read, launch and store without the popcounts); 'compute' runs the configuration's
  own kernel but every program reads the weight tile of program 0 (from L2 after the first), i.e. the
  counting without the DRAM read (split-K form: partial sums, summed by XLA)."""
  import functools

  from mlsys_jax.quant.binary.pallas_dense import _kernel
  bp, wn = a.shape
  n = w.shape[0]
  ws = wn // cfg.splits
  params = {}
  if jax.devices()[0].platform == "gpu":
    from mlsys_jax._compat import triton_compiler_params
    cp = triton_compiler_params(cfg.num_warps, cfg.num_stages)
    if cp is not None:
      params["compiler_params"] = cp
  if kind == "load":
    kernel = functools.partial(_probe_load_kernel, batch=bp)
    w_map = lambda j, s: (j, s)
  else:
    kernel = functools.partial(_kernel, variant=cfg.variant, k=None, block_k=cfg.block_k,
                               num_k=ws // cfg.block_k, batch=bp, num_stages=cfg.num_stages)
    w_map = lambda j, s: (0, s)
  out = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((cfg.splits, bp, n), jnp.int32), grid=(n // cfg.block_n, cfg.splits),
      in_specs=[pl.BlockSpec((bp, ws), lambda j, s: (0, s)), pl.BlockSpec((cfg.block_n, ws), w_map)],
      out_specs=pl.BlockSpec((None, bp, cfg.block_n), lambda j, s: (s, 0, j)),
      interpret=jax.devices()[0].platform != "gpu", **params)(a, w)
  return jnp.sum(out, axis=0)


def _looped(op, reps: int):
  """``f(xs, ws)`` over two lists of ``reps`` distinct arrays: ``sum(op(x_r, w_r))`` over every output
  element of every launch, with one fused reduction at the end; also returns launch 0's output (for
  the exactness check, without compiling the op a second time)."""
  def f(xs, ws):
    total, first = None, None
    for r in range(reps):
      o = op(xs[r], ws[r])
      first = o if first is None else first
      total = o.astype(jnp.float32) if total is None else total + o.astype(jnp.float32)
    return jnp.sum(total), first
  return jax.jit(f)


def _looped_old(op, reps: int):
  """The previous loop shape, kept to measure its overhead: stacked (sliced) activations, one
  reduction per launch."""
  def f(xs, ws):
    return sum(jnp.sum(op(xs[r], ws[r]).astype(jnp.float32)) for r in range(reps))
  return jax.jit(f)


def _device_profile(fns: dict, calls: int, reps: int, gap_s: float = 0.02) -> dict:
  """Device time per launch of each loop from ONE ``jax.profiler`` trace: every function runs ``calls``
  times back to back, then the host sleeps ``gap_s``; GPU kernel events are split into clusters at
  gaps longer than half of ``gap_s`` (one cluster per function, in order). Per launch: ``busy`` = sum of
  kernel durations / (calls * reps) (the kernels' own time), ``span`` = first start to last end /
  (calls * reps) (the device timeline including launch gaps)."""
  names = list(fns)

  def run():
    for nm in names:
      out = None
      for _ in range(calls):
        out = fns[nm]()
      jax.block_until_ready(out)
      time.sleep(gap_s)

  try:
    clusters = common.idle_clusters(common.device_stream_events(run), gap_s * 1e9 / 2)
    if len(clusters) != len(names):
      return {"error": f"{len(clusters)} kernel clusters for {len(names)} functions"}
    out = {}
    for nm, cl in zip(names, clusters):
      kinds = {}
      for ev in cl:
        kinds[ev[3][:50]] = kinds.get(ev[3][:50], 0) + 1
      out[nm] = {"busy": sum(ev[2] for ev in cl) * 1e-9 / (calls * reps),
                 "span": (max(ev[1] for ev in cl) - cl[0][0]) * 1e-9 / (calls * reps),
                 "kernels_per_call": len(cl) / calls,
                 "top_kernels": sorted(kinds.items(), key=lambda t: -t[1])[:3]}
    return out
  except Exception as e:  # diagnostics: never fatal
    return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


class _Skip(Exception):
  pass


def _entry_ops(f, *args) -> dict:
  """Kernel-launching ops in the compiled ENTRY computation of ``f(*args)`` (fusions, custom calls,
  library calls), and whether XLA wrapped them in command buffers (CUDA graphs)."""
  try:
    text = f.lower(*args).compile().as_text()
  except Exception as e:  # diagnostics only
    return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
  entry = text[text.index("ENTRY"):]
  entry = entry[:entry.index("\n}")]
  ops = {"fusion": 0, "custom-call": 0, "call": 0, "other": 0}
  for line in entry.splitlines()[1:]:
    if "=" not in line:
      continue
    rhs = line.split("=", 1)[1]
    for op in ("fusion(", "custom-call(", "call("):
      if f" {op}" in rhs:
        ops[op[:-1]] += 1
        break
    else:
      ops["other"] += 1
  ops["command_buffer"] = "command_buffer" in text
  return ops


def _timed(fn, inner: int) -> float:
  t0 = time.perf_counter()
  out = None
  for _ in range(inner):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / inner


def _round_robin(fns: dict, repeats: int, inner: int, warmup: int = 2) -> dict:
  """Seconds per call of each zero-argument callable: ``repeats`` rounds, each timing every callable
  once (order rotated per round so that drift hits all alike). Returns ``{name: array of times}``."""
  names = list(fns)
  for _ in range(warmup):
    for nm in names:
      _timed(fns[nm], inner)
  times = {nm: [] for nm in names}
  for i in range(repeats):
    order = names[i % len(names):] + names[:i % len(names)]
    if i % 2:
      order = order[::-1]
    for nm in order:
      times[nm].append(_timed(fns[nm], inner))
  return {nm: np.asarray(t) for nm, t in times.items()}


def _uint32(rng, shape):
  return jnp.asarray(rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32))


def _shape_row(args, n: int, b: int, reps: int, packed_w, dense_w, interpret: bool, read_bw: float,
               old_loop: bool) -> dict:
  k = n
  wn = k // 32
  bp = 1 << max(0, (b - 1).bit_length())
  rng = np.random.default_rng(1000 * n + b)
  xs_p = [_uint32(rng, (b, wn)) for _ in range(reps)]
  ref = pk._popcount_dot(xs_p[0], packed_w[0], k)
  fns, exact, errors = {}, {}, {}
  t_compile = time.perf_counter()
  overrides = dict(kv.split("=", 1) for kv in args.batch_configs.split(";") if kv)
  for cfg in _parse_configs(overrides.get(str(b), args.configs), b, n, wn):
    op = lambda x, w, cfg=cfg: pallas_packed_dense(x, w, k, *cfg, interpret=interpret)
    try:
      f = _looped(op, reps)
      exact[_name(cfg)] = bool(jnp.all(f(xs_p, packed_w)[1] == ref))   # compiles it now
    except Exception as e:  # a configuration Triton cannot lower is recorded and skipped
      errors[_name(cfg)] = f"{type(e).__name__}: {str(e)[:300]}"
      continue
    fns[_name(cfg)] = (lambda f=f: f(xs_p, packed_w))
  xs_e = [jnp.pad(x, ((0, bp - b), (0, 0))) for x in xs_p]
  # The default configuration on int32 views of the words (bitcast outside the kernel, as in runs 1-3;
  # diagnostic run only).
  i32 = lambda x: jax.lax.bitcast_convert_type(x, jnp.int32)
  xs_i, ws_i = [i32(x) for x in xs_e], [i32(w) for w in packed_w]
  cfg = default_config(b, n, wn)
  try:
    if not old_loop:
      raise _Skip
    f_i = _looped(lambda x, w: packed_dot_call(x, w, k, cfg, interpret), reps)
    exact["int32_view_" + _name(cfg)] = bool(jnp.all(f_i(xs_i, ws_i)[1][:b] == ref))
    fns["int32_view_" + _name(cfg)] = lambda: f_i(xs_i, ws_i)
  except _Skip:
    pass
  except Exception as e:
    errors["int32_view_" + _name(cfg)] = f"{type(e).__name__}: {str(e)[:300]}"
  if args.probes:
    pcfg = DenseConfig("rows", 32, wn // 2, 2, 8, 3)
    for kind in ("load", "compute"):
      f_p = _looped(lambda x, w, kind=kind: _probe_call(x, w, kind, pcfg), reps)
      fns["probe_" + kind] = lambda f_p=f_p: f_p(xs_e, packed_w)
  for cfg in (_parse_configs(args.l2_configs, b, n, wn) if args.l2_configs else []):
    f_l = _looped(lambda x, w, cfg=cfg: _probe_call(x, w, "compute", cfg), reps)
    fns["l2:" + _name(cfg)[len("pallas:"):]] = lambda f_l=f_l: f_l(xs_e, packed_w)
  f_empty = _looped(lambda x, w: _empty_call(x, w), reps)
  fns["empty_kernel"] = lambda: f_empty(xs_e, packed_w)
  # The same call with the same 2 * reps arguments and no per-launch kernel (one word of each pair,
  # fused into the final sum): the per-CALL cost (dispatch, argument handling, synchronization) / reps.
  f_args = _looped(lambda x, w: jnp.bitwise_xor(x[:, :1], w[:1, :1]), reps)
  fns["args_only"] = lambda: f_args(xs_p, packed_w)
  if old_loop:
    cfg = default_config(b, n, wn)
    xs_stack = jnp.stack(xs_p)
    f_old_e = _looped_old(lambda x, w: _empty_call(x, w), reps)
    f_old_k = _looped_old(lambda x, w: pallas_packed_dense(x, w, k, *cfg, interpret=interpret), reps)
    xs_stack_e = jnp.stack(xs_e)
    fns["old_loop_empty_kernel"] = lambda: f_old_e(xs_stack_e, packed_w)
    fns["old_loop_" + _name(cfg)] = lambda: f_old_k(xs_stack, packed_w)
  if not args.no_baselines:
    wb, wi = dense_w
    xb = [jax.random.normal(jax.random.PRNGKey(10 + r), (b, k), jnp.bfloat16) for r in range(reps)]
    xi = [jax.random.randint(jax.random.PRNGKey(50 + r), (b, k), -127, 128, jnp.int8) for r in range(reps)]
    f_xla = _looped(lambda x, w: pk._popcount_dot(x, w, k), reps)
    f_bf16 = _looped(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), reps)
    f_int8 = _looped(lambda x, w: jax.lax.dot(x, w, preferred_element_type=jnp.int32), reps)
    f_w8 = _looped(lambda x, w: jnp.dot(x, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32),
                   reps)
    base = {"xla_packed": lambda: f_xla(xs_p, packed_w), "bf16": lambda: f_bf16(xb, wb),
            "int8": lambda: f_int8(xi, wi), "int8_weight_only": lambda: f_w8(xb, wi)}
    for nm in args.baselines.split(","):
      fns[nm] = base[nm]
  for nm, fn in fns.items():  # compile what is left
    jax.block_until_ready(fn())
  t_compile = time.perf_counter() - t_compile
  hlo = {}
  if old_loop:   # what each loop shape launches, once
    dflt = default_config(b, n, wn)
    hlo["pallas_default"] = _entry_ops(_looped(lambda x, w: pallas_packed_dense(x, w, k, *dflt,
                                                                                 interpret=interpret),
                                               reps), xs_p, packed_w)
    hlo["old_loop_pallas_default"] = _entry_ops(f_old_k, xs_stack, packed_w)
    if not args.no_baselines:
      hlo["bf16"] = _entry_ops(f_bf16, xb, wb)
  times = _round_robin(fns, args.repeats, args.inner)
  per = {nm: float(np.median(t)) / reps for nm, t in times.items()}
  steady = {}
  if args.steady_inner:
    st = _round_robin(fns, 5, args.steady_inner, warmup=1)
    steady = {nm: float(np.median(t)) / reps for nm, t in st.items()}
  dev = _device_profile(fns, 3, reps) if args.profile else {}
  row = {"n": n, "k": k, "batch": b, "reps": reps, "inner": args.inner, "repeats": args.repeats,
         "compile_and_check_seconds": t_compile, "seconds_per_launch": per, "exact": exact,
         "config_errors": errors, "packed_weight_bytes": n * wn * 4, "bf16_weight_bytes": n * k * 2,
         "int8_weight_bytes": n * k, "read_floor_seconds": n * wn * 4 / read_bw,
         "empty_kernel_seconds": per["empty_kernel"], "args_only_seconds": per["args_only"],
         "seconds_per_launch_steady": steady, "steady_inner": args.steady_inner,
         "entry_ops": hlo, "device": dev}
  ok = [nm for nm in per if nm.startswith("pallas:") and exact.get(nm)]
  if ok:
    best = min(ok, key=per.get)
    dflt = _name(default_config(b, n, wn))
    row.update(best_config=best, pallas_seconds=per[best], default_config=dflt,
               default_seconds=per.get(dflt))
    for base in ("bf16", "int8", "int8_weight_only", "xla_packed"):
      if base in per:
        row[f"{base}_seconds"] = per[base]
        row[f"speedup_vs_{base}"] = per[base] / per[best]
        row[f"p_pallas_faster_than_{base}"] = stats.prob_outperform(times[best], times[base],
                                                                    lower_is_better=True)
    if "int8" in per or "int8_weight_only" in per:
      strongest = min(per.get("int8", math.inf), per.get("int8_weight_only", math.inf))
      row["speedup_vs_strongest_int8"] = strongest / per[best]
  if ok and dev and "error" not in dev:
    busy = {nm: v["busy"] for nm, v in dev.items()}
    dbest = min((nm for nm in ok if nm in busy), key=busy.get)
    row.update(device_best_config=dbest, device_pallas_busy_seconds=busy[dbest],
               device_default_busy_seconds=busy.get(row["default_config"]),
               device_empty_kernel_busy_seconds=busy["empty_kernel"])
    for base in ("bf16", "int8", "int8_weight_only", "xla_packed"):
      if base in busy:
        row[f"device_{base}_busy_seconds"] = busy[base]
        row[f"device_speedup_vs_{base}"] = busy[base] / busy[dbest]
        row[f"device_default_speedup_vs_{base}"] = busy[base] / busy[row["default_config"]]
    if "bf16" in busy:   # the packed bytes at the rate the bf16 kernel reads its weights
      row["floor_at_bf16_read_rate_seconds"] = n * wn * 4 * busy["bf16"] / (n * k * 2)
  return row


def main():
  args = common.parse_args(__doc__, _extra)
  on_gpu = jax.devices()[0].platform == "gpu"
  interpret = not on_gpu
  if args.conv_only:
    conv = _conv_section(args, interpret)
    common.write_json(args.out, "binary_conv_cpu" if interpret else "binary_conv",
                      {"env": common.environment(), "conv": conv})
    return
  t0 = time.perf_counter()
  sizes = [256] if args.small else [int(s) for s in args.sizes.split(",")]
  batches = [1, 3] if args.small else [int(b) for b in args.batches.split(",")]
  reps = 2 if args.small else args.reps
  if args.small:
    args.repeats, args.inner = 3, 1
    args.configs = "default,acc:32:4:2:4:2,rows:64:8:1:4:3,bcast:16:8:1:4:3,csa:32:8:1:4:2,csa4:32:4:1:4:2,sub:32:8:2:4:1"
  # The floor is the packed bytes at the device read rate (common.read_bandwidth, fixed 2026-12-02: sweep
  # 1 used the old method's 1.36 TB/s, a third of the true rate). The copy rate is recorded too.
  nbytes, rep = 1 << (24 if args.small else 30), 5 if args.small else 20
  if args.no_bandwidth:
    read_bw = copy_bw = float("nan")
  else:
    read_bw = common.read_bandwidth(nbytes, repeats=rep)
    copy_bw = common.copy_bandwidth(nbytes, repeats=rep)
  print(f"device read bandwidth {read_bw / 1e12:.2f} TB/s, copy {copy_bw / 1e12:.2f} TB/s", flush=True)
  payload = {"env": common.environment(), "read_bandwidth_bytes_per_s": read_bw,
             "copy_bandwidth_bytes_per_s": copy_bw, "rows": [],
             "small": bool(args.small), "interpret": interpret, "args": vars(args),
             "xla_flags": os.environ.get("XLA_FLAGS", "")}
  name = "binary_dense" + (f"_{args.tag}" if args.tag else "")
  rng = np.random.default_rng(0)
  weights = {}
  for n in sizes:   # all sizes at once (~33 GB at 8192 + 16384): shapes then run in priority order
    weights[n] = ([_uint32(rng, (n, n // 32)) for _ in range(reps)], None)
    if not args.no_baselines:
      weights[n] = (weights[n][0],
                    ([jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.bfloat16) for i in range(reps)],
                     [jax.random.randint(jax.random.PRNGKey(100 + i), (n, n), -127, 128, jnp.int8)
                      for i in range(reps)]))
  first = True
  for b in batches:          # batch-major: every size at batch 1 first, then the next batch
    for n in sizes:
      if time.perf_counter() - t0 > args.deadline_s:
        payload.setdefault("stopped_at_deadline", [n, b])
        continue
      row = _shape_row(args, n, b, reps, *weights[n], interpret, read_bw, args.old_loop and first)
      first = False
      payload["rows"].append(row)
      print({kk: vv for kk, vv in row.items() if kk not in ("seconds_per_launch", "exact", "device")},
            flush=True)
      print("  per launch (us): " + ", ".join(f"{nm} {s * 1e6:.2f}"
                                              for nm, s in sorted(row["seconds_per_launch"].items(),
                                                                  key=lambda t: t[1])), flush=True)
      if row["device"] and "error" not in row["device"]:
        print("  device busy per launch (us): " + ", ".join(
            f"{nm} {v['busy'] * 1e6:.2f}" for nm, v in sorted(row["device"].items(),
                                                               key=lambda t: t[1]["busy"])), flush=True)
      payload["elapsed_seconds"] = time.perf_counter() - t0
      common.write_json(args.out, name, payload)     # survives a time-out
  del weights
  payload["best_config"] = _overall_best(payload["rows"])
  payload["best_config_by_batch"] = {b: _overall_best([r for r in payload["rows"] if r["batch"] == b])
                                     for b in sorted({r["batch"] for r in payload["rows"]})}
  print("best_config", payload["best_config"], "by batch", payload["best_config_by_batch"], flush=True)
  if args.with_conv:
    payload["conv"] = _conv_section(args, interpret)
  payload["elapsed_seconds"] = time.perf_counter() - t0
  common.write_json(args.out, name, payload)
  common.print_table(payload["rows"], ["n", "batch", "pallas_seconds", "empty_kernel_seconds",
                                       "bf16_seconds", "int8_seconds", "int8_weight_only_seconds",
                                       "xla_packed_seconds", "read_floor_seconds", "speedup_vs_bf16",
                                       "speedup_vs_strongest_int8", "best_config"])


def _overall_best(rows: list[dict]) -> str | None:
  """The configuration, exact at every shape, with the lowest geometric mean of time / best time."""
  rows = [r for r in rows if "pallas_seconds" in r]
  common_names = None
  for r in rows:
    names = {nm for nm, ok in r["exact"].items()
             if ok and nm.startswith("pallas:") and nm in r["seconds_per_launch"]}
    common_names = names if common_names is None else common_names & names
  if not common_names:
    return None
  def score(nm):
    return sum(math.log(r["seconds_per_launch"][nm] / r["pallas_seconds"]) for r in rows)
  return min(sorted(common_names), key=score)


def _conv_section(args, interpret):
  """Binary 3x3 convolution, batch 1: packed XLA im2col XOR-popcount vs a bf16 (tensor-core) conv on
  GPU, vs a float32 conv on CPU."""
  out = []
  shapes = [(8, 32)] if args.small else [(56, 256), (28, 256), (14, 512), (7, 512)]
  reps = 2 if (args.small or interpret) else 16
  fdt = jnp.float32 if interpret else jnp.bfloat16
  rng = np.random.default_rng(1)
  for hw, c in shapes:
    try:
      w = np.where(rng.random((3, 3, c, c)) < 0.5, -1.0, 1.0).astype(np.float32)
      layer = pk.pack_conv2d(w, (hw, hw), 1, "SAME", 0.0)   # zero padding, as lax (corrected)
      xs = jnp.asarray(np.where(rng.random((reps, 1, hw, hw, c)) < 0.5, -1.0, 1.0), jnp.float32)
      xw = jnp.stack([pk.pack_bits(x, pad=True) for x in xs])
      wb = jnp.asarray(w, fdt)
      conv_b = lambda x: jax.lax.conv_general_dilated(x, wb, (1, 1), "SAME",
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                      preferred_element_type=jnp.float32)
      fp = jax.jit(lambda xw: sum(jnp.sum(pk.packed_conv2d(xw[r], layer).astype(jnp.float32))
                                  for r in range(reps)))
      fb = jax.jit(lambda xs: sum(jnp.sum(conv_b(xs[r])) for r in range(reps)))   # whole outputs
      xsb = xs.astype(fdt)
      exact = bool(jnp.all(pk.packed_conv2d(xw[0], layer) == conv_b(xsb[0]).astype(jnp.int32)))
      t = stats.time_interleaved(lambda: fp(xw), lambda: fb(xsb), repeats=args.conv_repeats
                                 if not args.small else 3, warmup=2)
      row = {"hw": hw, "c": c, "packed_xla_seconds": t.median_a / reps,
             "float_dtype": str(jnp.dtype(fdt)), "float_seconds": t.median_b / reps,
             "speedup_packed_vs_float": t.ratio, "p_packed_faster": t.p_a_faster, "exact": exact,
             "binary_macs": hw * hw * 9 * c * c}
    except Exception as e:  # recorded, not fatal
      row = {"hw": hw, "c": c, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(row, flush=True)
    out.append(row)
  return out


if __name__ == "__main__":
  main()
