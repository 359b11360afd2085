"""W4A16 GEMV (packed int4 weights, per-group scales, Pallas Triton kernel) vs a bf16 GEMV, batch 1-16.

At small batch a matmul is bound by reading its weights: packed int4 is 0.5 byte per weight plus one
scale per group (bf16: 2 bytes per ``group_size`` weights) against 2 bytes for bf16, so the ceiling is
about 4x. Baselines in the same run: ``x @ W`` in bf16 with float32 accumulation (XLA; cuBLAS/Triton
GEMV), and XLA on the packed weights (dequantize to bf16 then dot; with ``--xla_f32`` also dequantize to
float32 then dot, the library's reference path). Floors: the packed bytes over the measured device copy
bandwidth (read + write, ``common.copy_bandwidth``) and read bandwidth (``common.read_bandwidth``).

Method: every method runs ``--reps`` (16) times inside ONE jitted function, each launch on a different
activation AND a different weight (16 copies, far more than the L2, and no two dots share an operand
that XLA's dot merger could batch), so weights come from HBM; activations and weights enter as separate
arguments (no slicing inside the timed function); the sum of every output element is returned (nothing
can be sliced away). Packed weights are random words (every nibble 0..15 is a valid code) with random
positive scales, bf16 weights random normal: generated on the device in a few ms. All kernel
configurations of a case are compiled first (in parallel threads), checked against the XLA path (the
first launch's output is returned too), then each is timed with ``mlsys_jax.stats.time_interleaved``
(``--inner`` calls per measurement) against the bf16 baseline in the same process. ``--budget_s``: a
case is skipped (and listed in the JSON) when the time left is under the previous case's time.

Device time: after the pairs, one ``jax.profiler`` trace runs every method of the case ``--device_rounds``
times with its outputs returned as they are (no consumer kernel); per launch, the span from the first
kernel's start to the last kernel's end of a call over ``--reps`` (gaps, the atomic path's zero fill and
the written-out split K's XLA sum included), median over the rounds: ``device_seconds`` and
``device_speedup_vs_bf16`` per configuration, ``row["device"]`` with the kernels by name.

  python benchmarks/w4a16_gemv.py --out $OUT --batches 1,2,16 --budget_s 85 --no_consumer_top 0 \
      --device_rounds 5 --public                                     # GPU (about 60 s)
  python benchmarks/w4a16_gemv.py --small                         # CPU smoke test (interpret mode)
"""

from __future__ import annotations

import concurrent.futures
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.quant import _pallas_gemv as pg  # noqa: E402
from mlsys_jax.quant import weight_only as wo  # noqa: E402

# variant:block_n:blocks_per_step:split_k:num_warps:num_stages:prefetch[:atomic[:peel[:loop_stages]]]. H200 sweeps of
# 2026-12-02 14:26 and 15:04 UTC: best 'fma:64:2:16' (8192x8192 batch 1, 24.4 us), 'fma:64:2:8'
# (8192x28672), 'dot:256:1:4:8:3' with prefetch at batch 4-16. This sweep: the same with the split-K sum
# as atomic adds in the kernel (one launch), and the 'fmad' variant (one AND + one FMA per weight) over
# split_k 8-64, 1-4 blocks per step, block_n 32-128, 2-8 warps, prefetch. 21:00 UTC run (device time
# per launch, 8192x8192 batch 1): fmad:64:2:8 with atomics 17.6 us (fma:64:2:16, the old default, 19.5
# us; bf16 34.9 us). This sweep: 'fmad4'/'fmad2' (2.8-3.1 SASS instructions per weight, 'fmad' 3.7)
# around one or two waves of programs (registers from the offline sm_90a compile: fmad4:256:1:16:8 64,
# fmad4:128:1:16:4 56, fmad4:64:1:16:2 64 registers), with and without step 0 peeled (9th field).
SWEEP = ("fma:64:2:16:4:3:0:0,fmad:64:2:8:4:3:0:1,"
         "fmad4:256:1:16:8:3:0:1,fmad4:128:1:16:4:3:0:1,fmad4:64:1:16:2:3:0:1,fmad4:256:1:32:8:3:0:1,"
         "fmad4:128:1:32:4:3:0:1,fmad4:64:1:32:2:3:0:1,fmad4:256:2:8:8:3:0:1,fmad4:256:1:16:4:3:0:1,"
         "fmad4:128:2:8:4:3:0:1,fmad4:64:2:8:2:3:0:1,fmad4:256:1:8:8:3:0:1,fmad4:128:1:8:4:3:0:1,"
         "fmad2:128:1:16:4:3:0:1,fmad2:64:1:16:2:3:0:1,fmad2:128:1:32:4:3:0:1,fmad4:256:1:16:8:3:0:0,"
         "fmad4:256:1:16:8:3:1:1,fmad4:256:1:16:8:3:0:1:1,fmad4:128:1:16:4:3:0:1:1,fmad4:128:1:16:4:3:0:0")
SWEEP_B1 = ("fma:64:2:8:4:3:0:0,fmad:64:2:8:4:3:0:1,fmad4:256:1:4:8:3:0:1,fmad4:256:1:8:8:3:0:1,"
            "fmad4:128:1:4:4:3:0:1,fmad4:64:1:4:2:3:0:1,fmad4:128:1:8:4:3:0:1,fmad4:256:1:16:8:3:0:1")
OTHER = "dot:256:1:4:8:3:1:0,dot:256:1:8:8:3:1:1,dot:256:1:4:8:3:1:1"
# Session 10 (11th field: relaxed atomic adds, REDG instead of MEMBAR + ATOMG + CCTL.IVALL). The offline
# sm_90a SASS of the looped kernels shows ptxas issuing part of each step's weight loads after the FMAs
# have started (fmad2:64:1:16:2: 2 of 4 LDG.128 mid-step) and the register prefetch's loads at the END of
# the loop body, so a step waits for memory about twice. "One-step" programs (split_k * blocks_per_step
# = K's blocks, step 0 peeled ahead of the activation prologue) issue every weight load up front (all
# LDG before the first barrier); the rows span their registers (ptxas -v): fmad2:64:2:32:2 96,
# fmad2:64:4:16:2 168, fmad4:128:2:32:4 96, fmad4:128:4:16:4 168, fmad:64:2:32:4 71, fmad2:32:4:16:1
# 157, fmad2:32:2:32:1 75, fmad2:128:2:32:4 96, fmad2:64:1:64:2 64, fmad2:128:1:64:4 56, fmad4:256:2:32:8 93
# (the one-warp ones reuse registers for later weight loads). The default and the best looped
# configuration with and without relaxed adds isolate that change. --s10 selects these lists (8192x8192, then 8192x28672).
SWEEP_S10 = ("fmad:64:2:8:4:3:0:1:0:0:0,fmad2:64:1:16:2:3:0:1:0:0:0,fmad:64:2:8:4:3:0:1:0:0:1,"
             "fmad2:64:1:16:2:3:0:1:0:0:1,fmad2:64:2:32:2:3:0:1:1:0:0,fmad2:64:2:32:2:3:0:1:1:0:1,"
             "fmad2:64:4:16:2:3:0:1:1:0:1,fmad4:128:2:32:4:3:0:1:1:0:1,fmad4:128:4:16:4:3:0:1:1:0:1,"
             "fmad:64:2:32:4:3:0:1:1:0:1,fmad4:64:2:32:2:3:0:1:1:0:1,fmad4:64:4:16:2:3:0:1:1:0:1,"
             "fmad2:32:4:16:1:3:0:1:1:0:1,fmad2:32:2:32:1:3:0:1:1:0:1,fmad2:128:2:32:4:3:0:1:1:0:1,"
             "fmad2:128:4:16:4:3:0:1:1:0:1,fmad2:64:1:64:2:3:0:1:1:0:1,fmad2:128:1:64:4:3:0:1:1:0:1,"
             "fmad4:256:2:32:8:3:0:1:1:0:1")
SWEEP_S10_B1 = ("fmad:64:2:8:4:3:0:1:0:0:0,fmad2:64:1:8:2:3:0:1:0:0:0,fmad:64:2:8:4:3:0:1:0:0:1,"
                "fmad2:64:1:8:2:3:0:1:0:0:1,fmad2:64:2:32:2:3:0:1:1:0:1,fmad2:64:4:16:2:3:0:1:1:0:1,"
                "fmad4:128:2:32:4:3:0:1:1:0:1,fmad4:128:4:16:4:3:0:1:1:0:1,fmad:64:2:32:4:3:0:1:1:0:1,"
                "fmad2:32:4:16:1:3:0:1:1:0:1,fmad2:128:4:16:4:3:0:1:1:0:1,fmad2:64:1:64:2:3:0:1:1:0:1")
# Run s10a (H200, 2026-12-03 14:35 UTC, w4a16_gemv_h200_s10a.json): one-step fmad2:64:2:32:2 with relaxed
# adds 14.94 us at 8192x8192 (2.30x bf16; the same with acquire-release adds 17.54, the default 17.67, the
# previous best 16.73 / 15.74 relaxed) and 42.80 us at 8192x28672 (2.57x). --s10b: that configuration
# again with its neighbours (no peel: 77 registers and loads spread over the FMAs; 4 warps, 64 registers;
# block_n 32, 4 KiB per program; two steps) and the previous bests, for a second run.
SWEEP_S10B = ("fmad2:64:1:16:2:3:0:1:0:0:0,fmad2:64:2:32:2:3:0:1:1:0:1,fmad2:64:1:16:2:3:0:1:0:0:1,"
              "fmad2:64:2:32:2:3:0:1:0:0:1,fmad2:64:2:32:4:3:0:1:1:0:1,fmad2:32:2:32:2:3:0:1:1:0:1,"
              "fmad2:64:1:32:2:3:0:1:1:0:1,fmad2:128:2:32:4:3:0:1:1:0:1")
SWEEP_S10B_B1 = ("fmad2:64:1:8:2:3:0:1:0:0:0,fmad2:64:2:32:2:3:0:1:1:0:1,fmad2:64:1:8:2:3:0:1:0:0:1,"
                 "fmad2:64:2:32:2:3:0:1:0:0:1,fmad2:64:2:32:4:3:0:1:1:0:1,fmad2:32:2:32:2:3:0:1:1:0:1")

# Session 11 (--s11; 12th field: evict, the weight loads with the L2 evict_first policy): the default
# (one-step fmad2:64:2:32:2, relaxed adds; 14.94 / 14.84 us in s10a / s10b) against 'fmadr2' (the
# activation scaling per plane row from the step's own planes: no block-wide amax reduction, so no barrier
# in the prologue), each with and without evict_first, and the default with its split K written out
# (atomic off: the kernel's own time without the 32 adds per output, plus XLA's sum; s10a: relaxed adds
# alone were worth 2.6 us at this configuration), and 4-warp programs of 4 blocks (16 KiB, the same 32 words
# per thread as the default, half the adds: 16 per output).
SWEEP_S11 = ("fmad2:64:2:32:2:3:0:1:1:0:1:0,fmadr2:64:2:32:2:3:0:1:1:0:1:0,fmad2:64:2:32:2:3:0:1:1:0:1:1,"
             "fmadr2:64:2:32:2:3:0:1:1:0:1:1,fmad2:64:2:32:2:3:0:0:1:0:0:0,fmad2:64:4:16:4:3:0:1:1:0:1:0,"
             "fmadr2:64:4:16:4:3:0:1:1:0:1:0,fmadr4:128:2:32:4:3:0:1:1:0:1:0")

# Session 11 second run (--s11b). Run s11a (H200, 2026-12-03 17:2x UTC, w4a16_gemv_h200_s11a.json): default
# 14.82 us (bf16 34.84), evict_first 14.77, 'fmadr2' 16.82 (slower: the per-row scaling costs more than the
# barrier it removes), 4-warp 16 KiB programs 15.79, and with the split K written out the GEMV kernel alone
# takes 14.78 us (+1.52 us XLA sum): the relaxed adds cost nothing. Now the default and evict again, and two
# diagnostics of where the 14.8 us go: 'memonly' (the same grid and weight loads, one add per word) and
# 'l2:' (the default on ONE weight for all 16 launches, read from L2 after the first: the arithmetic side).
SWEEP_S11B = ("fmad2:64:2:32:2:3:0:1:1:0:1:0,fmad2:64:2:32:2:3:0:1:1:0:1:1,memonly:64:32:2,"
              "l2:fmad2:64:2:32:2:3:0:1:1:0:1:0")


def _extra(ap):
  ap.add_argument("--shapes", default="8192x8192,8192x28672", help="KxN weight shapes")
  ap.add_argument("--batches", default="1,4,16")
  ap.add_argument("--group_size", type=int, default=128)
  ap.add_argument("--reps", type=int, default=16, help="launches per timed call")
  ap.add_argument("--xla_f32", action="store_true", help="also time the float32 XLA reference path")
  ap.add_argument("--repeats", type=int, default=10, help="timed pairs per comparison")
  ap.add_argument("--inner", type=int, default=4, help="calls per timed measurement")
  ap.add_argument("--budget_s", type=float, default=1e9, help="skip cases that would not fit in this")
  ap.add_argument("--configs", default=SWEEP,
                  help="variant:block_n:blocks_per_step:split_k:num_warps:num_stages:prefetch[:atomic[:peel[:"
                       "loop_stages[:relaxed[:evict]]]]], batch 1 "
                       "of the first shape")
  ap.add_argument("--configs_b1", default=SWEEP_B1, help="the same for batch <= 2 of the other cases")
  ap.add_argument("--other_configs", default=OTHER, help="the same for batch > 2")
  ap.add_argument("--fma_max_batch", type=int, default=4, help="skip 'fma' configs above this batch")
  ap.add_argument("--no_consumer_top", type=int, default=3,
                  help="batch <= 2: re-time this many best configurations with the outputs returned as they "
                       "are (no reduction kernel after each launch); 0: skip")
  ap.add_argument("--name", default="w4a16_gemv", help="JSON file name")
  ap.add_argument("--public", action="store_true",
                  help="also time the public path with its default launch parameters (config 'public')")
  ap.add_argument("--s10", action="store_true", help="--configs SWEEP_S10 --configs_b1 SWEEP_S10_B1")
  ap.add_argument("--s10b", action="store_true", help="--configs SWEEP_S10B --configs_b1 SWEEP_S10B_B1")
  ap.add_argument("--s11", action="store_true", help="--configs SWEEP_S11 --configs_b1 SWEEP_S11")
  ap.add_argument("--s11b", action="store_true", help="--configs SWEEP_S11B --configs_b1 SWEEP_S11B")
  ap.add_argument("--device_rounds", type=int, default=3,
                  help="rounds of the profiler pass (device time per launch of every method); 0: skip")


def _mem_only(words, bn: int, sk: int, nw: int, interpret: bool):
  """Diagnostic, not a GEMV: the batch-1 kernel's grid ``(N / bn, sk)`` and weight blocks (``K / 8 / sk``
  rows of ``bn`` words), each program loading its block as 'fmad2' does (16-row blocks, two column
  halves) and writing the int32 sum of its words per column: the weight reads alone, next to no
  arithmetic (about one add per word against about 24 instructions per word in the GEMV)."""
  from jax.experimental import pallas as pl
  from mlsys_jax._compat import triton_compiler_params
  rows, n, half = words.shape[0] // sk, words.shape[1], bn // 2

  def kernel(w_ref, o_ref):
    accs = [None, None]
    for u in range(rows // 16):
      for c in range(2):
        t = w_ref[pl.ds(u * 16, 16), pl.ds(c * half, half)].astype(jnp.int32)
        accs[c] = t if accs[c] is None else accs[c] + t
    for c in range(2):
      o_ref[0, pl.ds(c * half, half)] = jnp.sum(accs[c], axis=0)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((sk, 1, n), jnp.int32), grid=(n // bn, sk),
      in_specs=[pl.BlockSpec((rows, bn), lambda j, q: (q, j))],
      out_specs=pl.BlockSpec((None, 1, bn), lambda j, q: (q, 0, j)),
      compiler_params=None if interpret else triton_compiler_params(nw, 3), interpret=interpret)(words)


def _parse(spec: str):
  out = []
  for c in spec.split(","):
    if c:
      v, *ints = c.split(":")
      if v == "public":               # the public path with its defaults: w4a16_matmul(x, packed)
        out.append((v,))
        continue
      if v == "memonly":              # diagnostic: memonly:block_n:split_k:num_warps (see _mem_only)
        out.append((v, *map(int, ints)))
        continue
      if v == "l2":                   # diagnostic: l2:<config>, the config on ONE weight (L2-resident)
        out.append(("l2", *_parse(":".join(ints))[0]))
        continue
      if len(ints) == 5:
        ints.append("1")
      if len(ints) == 6:
        ints.append("0")
      if len(ints) == 7:
        ints.append("0")
      if len(ints) == 8:
        ints.append("0")
      if len(ints) == 9:
        ints.append("0")
      if len(ints) == 10:
        ints.append("0")
      out.append((v, *map(int, ints)))
  return out


def _looped(op, copies, reps, consume: bool = True):
  """``op(x_r, w_{r mod copies})`` for ``reps`` different activations (a tuple of arrays), in one jitted
  function: summed over every output element (``consume``: each launch is followed by a small reduction
  kernel, as a matmul in a model is followed by its consumer), or all outputs returned as they are (no
  kernel but the op's own: the bf16 GEMV is then one kernel per launch, the Pallas GEMV with split_k > 1
  two, the kernel and XLA's sum of its partial outputs)."""
  def f(xs, ws):
    outs = [op(xs[r], ws[r % copies]) for r in range(reps)]
    if not consume:
      return tuple(outs), outs[0]
    return sum(jnp.sum(o.astype(jnp.float32)) for o in outs), outs[0]   # outs[0]: the exactness check
  return jax.jit(f)


def _device_times(fns: dict, args: dict, reps: int, rounds: int, gap_s: float = 0.003) -> dict:
  """Device time per launch of every ``fns[name](*args[name])`` (compiled, warm) from ONE profiler trace:
  ``rounds`` rounds, each calling every function once (same order, a host sync and ``gap_s`` idle between
  calls), the kernels of each call found as one cluster of the device timeline. Per launch: ``span``
  (first kernel start to last kernel end of the call, gaps between its kernels included) and ``busy``
  (sum of kernel durations), both over ``reps``, median over the rounds; name -> dict, or {"error": ...}."""
  names = list(fns)

  def run():
    for _ in range(rounds):
      for nm in names:
        jax.block_until_ready(fns[nm](*args[nm]))
        time.sleep(gap_s)

  try:
    clusters = common.idle_clusters(common.device_stream_events(run), gap_s * 1e9 / 2)
    if len(clusters) != rounds * len(names):
      return {"error": f"{len(clusters)} kernel clusters for {rounds * len(names)} calls"}
    out = {nm: {"span": [], "busy": []} for nm in names}
    for i, cl in enumerate(clusters):
      nm = names[i % len(names)]
      out[nm]["span"].append((max(ev[1] for ev in cl) - cl[0][0]) * 1e-9 / reps)
      out[nm]["busy"].append(sum(ev[2] for ev in cl) * 1e-9 / reps)
      out[nm]["kernels_per_call"] = len(cl)
      kinds = {}
      for ev in cl:
        kinds[ev[3][:60]] = kinds.get(ev[3][:60], 0.0) + ev[2] * 1e-9 / reps
      out[nm]["busy_by_kernel"] = sorted(kinds.items(), key=lambda t: -t[1])[:4]
    for nm in names:
      out[nm]["span_median"] = float(np.median(out[nm]["span"]))
      out[nm]["busy_median"] = float(np.median(out[nm]["busy"]))
    return out
  except Exception as e:  # diagnostics: never fatal
    return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def _compile_all(fns: dict, args: dict) -> dict:
  """Compile every ``fns[name]`` on ``args[name]`` in parallel threads: name -> compiled or exception."""
  def one(name):
    try:
      return fns[name].lower(*args[name]).compile()
    except Exception as e:  # recorded per configuration
      return e
  with concurrent.futures.ThreadPoolExecutor(16) as ex:
    return dict(zip(fns, ex.map(one, list(fns))))


def main():
  args = common.parse_args(__doc__, _extra)
  on_gpu = jax.devices()[0].platform == "gpu"
  interpret = not on_gpu
  if args.small:
    shapes, batches, reps0, repeats = [(256, 96), (512, 64)], [1, 4], 2, 3
    sweep = [("fma", 32, 1, 1, 4, 3, 1, 0, 0, 0, 0), ("fmad", 32, 1, 2, 4, 3, 0, 1, 1, 0, 0),
             ("dot", 32, 1, 2, 4, 3, 1, 0, 0, 0, 0), ("fmad2", 32, 1, 1, 2, 3, 0, 1, 0, 3, 0),
             ("fmad2", 32, 1, 2, 1, 3, 0, 1, 1, 0, 1)]
    sweep_b1 = [("fma", 32, 1, 2, 4, 3, 0, 0, 0, 0, 0), ("fmad2", 32, 1, 2, 4, 3, 0, 1, 0, 3, 0)]
    other = [("fma", 32, 1, 1, 4, 3, 1, 0, 0, 0, 0), ("dot", 32, 1, 2, 4, 3, 1, 1, 0, 0, 0)]
    gs = 64
  else:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    reps0, repeats = args.reps, args.repeats
    if args.s10:
      args.configs, args.configs_b1 = SWEEP_S10, SWEEP_S10_B1
    if args.s10b:
      args.configs, args.configs_b1 = SWEEP_S10B, SWEEP_S10B_B1
    if args.s11:
      args.configs = args.configs_b1 = SWEEP_S11
    if args.s11b:
      args.configs = args.configs_b1 = SWEEP_S11B
    sweep, sweep_b1, other = _parse(args.configs), _parse(args.configs_b1), _parse(args.other_configs)
    gs = args.group_size
  t_start = time.time()
  bw_copy = common.copy_bandwidth(1 << (22 if args.small else 30), repeats=3 if args.small else 20)
  bw_read = common.read_bandwidth(1 << (22 if args.small else 30), repeats=3 if args.small else 20)
  print(f"copy bandwidth {bw_copy / 1e12:.3f} TB/s (read + write), read bandwidth {bw_read / 1e12:.3f} "
        f"TB/s", flush=True)
  rows, skipped = [], []
  first = True
  last_case = 0.0
  # A distinct weight for EVERY launch, for every method: with fewer copies than launches XLA merges
  # the dots that share a weight into one (its dot merger), so the bf16 baseline read each weight once
  # per several launches (run 1: a "bf16 GEMV" of 8192x28672 in 18 us = 26 TB/s).
  reps = copies = copies_b = reps0
  weights = {}

  def get_weights(k, n):
    if (k, n) not in weights:
      t_gen = time.time()
      gen_words = jax.jit(lambda key: jax.random.bits(key, (k // 8, n), jnp.uint32))
      gen_scales = jax.jit(
          lambda key: (0.001 + 0.01 * jax.random.uniform(key, (k // gs, n))).astype(jnp.bfloat16))
      gen_bf16 = jax.jit(lambda key: (0.02 * jax.random.normal(key, (k, n), jnp.float32)).astype(jnp.bfloat16))
      packed = tuple(wo.Int4Weights(gen_words(jax.random.PRNGKey(i)), gen_scales(jax.random.PRNGKey(10_000 + i)))
                     for i in range(copies))
      wb = tuple(gen_bf16(jax.random.PRNGKey(20_000 + i)) for i in range(copies_b))
      weights[(k, n)] = jax.block_until_ready((packed, wb))
      print(f"{k}x{n}: {copies} packed and {copies_b} bf16 weights in {time.time() - t_gen:.1f} s", flush=True)
    return weights[(k, n)]

  # Batch-major: batch 1 (the target) on every shape before the larger batches.
  for b in batches:
    for k, n in shapes:
      t_case = time.time()
      if t_case - t_start + last_case > args.budget_s:
        skipped.append({"k": k, "n": n, "batch": b})
        print(f"skipping {k}x{n} batch {b}: {t_case - t_start:.0f} s spent of --budget_s {args.budget_s}",
              flush=True)
        continue
      packed, wb = get_weights(k, n)
      xs = tuple(jax.random.normal(jax.random.PRNGKey(1000 * b + r), (b, k), jnp.float32).astype(jnp.bfloat16)
                 for r in range(reps))
      ref = np.asarray(wo.w4a16_matmul(xs[0], packed[0], impl="xla"))
      cfgs = other if b > 2 else sweep if first else sweep_b1
      cfgs = [c for c in cfgs if not (c[0].startswith("fma") and b > args.fma_max_batch)]
      if args.public:
        cfgs = [("public",)] + cfgs
      first = first and b > 2
      fns, fargs, single = {}, {}, {}   # single: the kernel configurations (checked for exactness)
      ops = {}                          # name -> (op, copies): the device-time pass's no-consumer versions
      for c in cfgs:
        name = ":".join(map(str, c))
        if c[0] == "public":
          op = lambda x, p: wo.w4a16_matmul(x, p, impl="pallas", interpret=interpret)
          fns[name], fargs[name] = _looped(op, copies, reps), (xs, packed)
          ops[name] = (op, copies)
          single[name] = True
          continue
        if c[0] == "memonly":        # diagnostic rows: not checked (not a GEMV), kept out of "configs"
          _, bn, sk, nw = c
          op = lambda x, p, bn=bn, sk=sk, nw=nw: _mem_only(p.words, bn, sk, nw, interpret)
          fns[name], fargs[name] = _looped(op, copies, reps), (xs, packed)
          ops[name] = (op, copies)
          continue
        l2 = c[0] == "l2"             # the same weight for every launch: read from L2 after the first
        v, bn, bps, sk, nw, ns, pf, at, pe, ls, rx, *ev = c[1:] if l2 else c
        kw = dict(variant=v, block_n=bn, blocks_per_step=bps, split_k=sk, num_warps=nw, num_stages=ns,
                  prefetch=pf, atomic=bool(at), peel=bool(pe), loop_stages=ls, relaxed=bool(rx),
                  evict=bool(ev and ev[0]), interpret=interpret)
        op = lambda x, p, kw=kw: pg.int4_gemv(x, p.words, p.scales, **kw)
        fns[name], fargs[name] = _looped(op, 1 if l2 else copies, reps), (xs, packed)
        ops[name] = (op, 1 if l2 else copies)
        if not l2:
          single[name] = True
      ops["bf16"] = (lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), copies_b)
      ops["xla_packed_bf16"] = (
          lambda x, p: jnp.dot(x, wo.dequantize_int4(p, jnp.bfloat16), preferred_element_type=jnp.float32),
          copies)
      fargs["bf16"], fargs["xla_packed_bf16"] = (xs, wb), (xs, packed)
      if args.xla_f32:
        ops["xla_packed_f32"] = (lambda x, p: wo.w4a16_matmul(x, p, impl="xla"), copies)
        fargs["xla_packed_f32"] = (xs, packed)
      for nm in ("bf16", "xla_packed_bf16", "xla_packed_f32"):
        if nm in ops:
          fns[nm] = _looped(ops[nm][0], ops[nm][1], reps)
      # The device-time pass times every method with its outputs returned as they are (no consumer
      # kernel after each launch): its kernels alone, compiled here with the others.
      nc = {f"nc:{nm}": _looped(op, c, reps, consume=False) for nm, (op, c) in ops.items()} \
          if args.device_rounds else {}
      compiled = _compile_all({**fns, **nc}, {**fargs, **{f"nc:{nm}": fargs[nm] for nm in ops}})
      t_compiled = time.time()
      row = {"k": k, "n": n, "batch": b, "group_size": gs, "reps": reps, "copies": copies,
             "packed_bytes": packed[0].nbytes(), "bf16_bytes": 2 * k * n,
             "read_floor_seconds": packed[0].nbytes() / bw_read,
             "copy_floor_seconds": packed[0].nbytes() / bw_copy,
             "bf16_read_floor_seconds": 2 * k * n / bw_read,
             "bf16_copy_floor_seconds": 2 * k * n / bw_copy, "configs": []}
      fb = compiled["bf16"]
      if isinstance(fb, Exception):
        raise fb
      for name in list(fns):
        if name == "bf16":
          continue
        fc = compiled[name]
        entry = {"config": name}
        if isinstance(fc, Exception):
          entry["error"] = f"{type(fc).__name__}: {str(fc)[:300]}"
        else:
          try:
            if name in single:
              got = np.asarray(fc(*fargs[name])[1])
              entry["rel_error_vs_xla"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            t = stats.time_interleaved(lambda: fc(*fargs[name]), lambda: fb(*fargs["bf16"]),
                                       repeats=repeats, warmup=2, inner=1 if args.small else args.inner)
            entry.update(seconds=t.median_a / reps, bf16_seconds=t.median_b / reps,
                         speedup_vs_bf16=t.ratio, p_faster_than_bf16=t.p_a_faster)
          except Exception as e:
            entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if name in single:
          row["configs"].append(entry)
        else:
          row[name] = entry
        print(b, k, n, entry, flush=True)
      if args.device_rounds:
        # Device time from the profiler (one trace, every function of the case in each round, outputs
        # returned as they are): the op's kernels alone (for split K without atomics also XLA's sum of the
        # partials; with atomics the zero fill), without the host's dispatch and synchronization and
        # without the consumer kernel of the wall-clock numbers above.
        good = {nm: compiled[f"nc:{nm}"] for nm in ops if not isinstance(compiled[f"nc:{nm}"], Exception)}
        dev = _device_times(good, fargs, reps, args.device_rounds)
        row["device"] = dev
        if "error" not in dev:
          bd = dev["bf16"]["span_median"]
          for e in row["configs"] + [row[nm] for nm in ("xla_packed_bf16", "xla_packed_f32") if nm in row]:
            if e["config"] in dev and "span_median" in dev[e["config"]]:
              e.update(device_seconds=dev[e["config"]]["span_median"],
                       device_busy_seconds=dev[e["config"]]["busy_median"], device_bf16_seconds=bd,
                       device_speedup_vs_bf16=bd / dev[e["config"]]["span_median"])
          row["device_bf16_seconds"] = bd
          print(b, k, n, "device", {nm: (round(d["span_median"] * 1e6, 2), round(d["busy_median"] * 1e6, 2))
                                    for nm, d in dev.items()}, flush=True)
        else:
          print("device times:", dev["error"], flush=True)
      ok = [e for e in row["configs"] if "seconds" in e and e.get("rel_error_vs_xla", 1) < 1e-5]
      if ok:
        best = min(ok, key=lambda e: e["seconds"])
        dok = [e for e in ok if "device_seconds" in e]
        if dok:
          dbest = min(dok, key=lambda e: e["device_seconds"])
          row.update(device_best_config=dbest["config"], device_pallas_seconds=dbest["device_seconds"],
                     device_speedup_vs_bf16=dbest["device_speedup_vs_bf16"],
                     device_fraction_of_read_floor=row["read_floor_seconds"] / dbest["device_seconds"])
        row.update(best_config=best["config"], pallas_seconds=best["seconds"],
                   bf16_seconds=best["bf16_seconds"], speedup_vs_bf16=best["speedup_vs_bf16"],
                   p_faster_than_bf16=best["p_faster_than_bf16"],
                   fraction_of_read_floor=row["read_floor_seconds"] / best["seconds"],
                   fraction_of_copy_floor=row["copy_floor_seconds"] / best["seconds"])
        for base in ("xla_packed_bf16", "xla_packed_f32"):
          if "seconds" in row.get(base, {}):
            row[f"speedup_vs_{base}"] = row[base]["seconds"] / best["seconds"]
        if args.no_consumer_top and b <= 2:
          # The best configurations again with every output returned (no reduction after each launch),
          # against the bf16 GEMV returned the same way: the GEMVs alone, without their consumer.
          top = sorted(ok, key=lambda e: e["seconds"])[:args.no_consumer_top]
          nfns = {"bf16": _looped(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), copies_b,
                                  reps, consume=False)}
          nargs = {"bf16": fargs["bf16"]}
          for e in top:
            nfns[e["config"]] = _looped(ops[e["config"]][0], copies, reps, consume=False)
            nargs[e["config"]] = fargs[e["config"]]
          ncomp = _compile_all(nfns, nargs)
          row["no_consumer"] = []
          for name in nfns:
            if name == "bf16" or isinstance(ncomp[name], Exception) or isinstance(ncomp["bf16"], Exception):
              continue
            t = stats.time_interleaved(lambda: ncomp[name](*nargs[name]), lambda: ncomp["bf16"](*nargs["bf16"]),
                                       repeats=repeats, warmup=2, inner=1 if args.small else args.inner)
            ent = {"config": name, "seconds": t.median_a / reps, "bf16_seconds": t.median_b / reps,
                   "speedup_vs_bf16": t.ratio, "p_faster_than_bf16": t.p_a_faster}
            row["no_consumer"].append(ent)
            print(b, k, n, "no consumer", ent, flush=True)
      row["compile_seconds"] = t_compiled - t_case
      row["case_seconds"] = last_case = time.time() - t_case
      print(f"case {k}x{n} batch {b}: {row['case_seconds']:.1f} s (compile {row['compile_seconds']:.1f} s)",
            flush=True)
      rows.append(row)
      common.write_json(args.out, args.name, {"env": common.environment(), "rows": rows, "partial": True,
                                              "skipped": skipped,
                                              "copy_bandwidth_bytes_per_s": bw_copy,
                                              "read_bandwidth_bytes_per_s": bw_read})
  payload = {"env": common.environment(), "copy_bandwidth_bytes_per_s": bw_copy,
             "loop_stages_hook": dict(pg.LOOP_STAGES_HOOK),    # also counts the relaxed atomics
             "read_bandwidth_bytes_per_s": bw_read, "rows": rows, "skipped": skipped, "small": bool(args.small),
             "interpret": interpret, "total_seconds": time.time() - t_start}
  common.write_json(args.out, args.name, payload)
  common.print_table([{kk: vv for kk, vv in r.items() if not isinstance(vv, (list, dict))} for r in rows],
                     ["k", "n", "batch", "best_config", "pallas_seconds", "bf16_seconds", "speedup_vs_bf16",
                      "device_best_config", "device_pallas_seconds", "device_bf16_seconds", "device_speedup_vs_bf16",
                      "speedup_vs_xla_packed_bf16", "copy_floor_seconds", "fraction_of_copy_floor",
                      "fraction_of_read_floor"])


if __name__ == "__main__":
  main()
