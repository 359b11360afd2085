"""Fresh random bit-error injection (Stutz et al., MLSys 2021) on 25M uint8 codes at p = 1% (H200).

Floor (stated method): the codes must be read once and written once, 2 bytes per uint8 code, at the copy
bandwidth of the same run (``benchmarks.common.copy_bandwidth``: float32 ``x -> x * c`` over 1 GiB,
dispatched calls, bytes read plus written). 25 MB per launch is short (17 us at 3 TB/s): launch and tail
cost a few us that a 1 GiB copy does not pay, so the same-size XLA copies below say what a plain copy of
this size reaches in this harness. They are all given as rows, with their own % of the floor:

- ``XLA uint8 XOR-copy``: ``c ^ k`` on the uint8 codes (what XLA does with bytes);
- ``XLA uint32-view XOR-copy``: the same codes bitcast to uint32 words, XOR, bitcast back;
- ``XLA uint32 XOR-copy`` / ``XLA float32 x*c``: arrays of that type holding the same number of bytes;
- ``Pallas XOR-copy``: the kernel's load/store pattern with no fault code (its memory ceiling).

Every row is ONE jitted call that applies the operation to ``--batch`` (default 10) distinct 25M-code
arrays, each with its own key (so XLA cannot merge them; 250 MB in all, none reused from the 50 MB L2),
one launch after the other; time / ``--batch``. All rows are compiled first (in priority order, until
``--compile_budget_s``), then timed round-robin (rotating order, median of ``--repeats`` rounds) in wall
time; on GPU one ``jax.profiler`` trace also gives each row's device time per array (sum of its kernels'
durations) and its kernels per array (a bitcast that is not free would show as an extra kernel).

Rows: the baselines above; the kernel at p = 0 (its memory path: loads, stores, one early-stop test) over
tiles; the kernel sweep at p = 1% (method, words per program, sub-block, all-loads-first or loop, warps);
the public functions. Every kernel row is compared with the XLA path of its method on the same array and
key (mismatched codes; 0 expected); ``best`` names the fastest row of each method with 0 mismatches.
Then the public function as dispatched calls (``stats.time_interleaved`` with the XOR-copy), and the
on-device exactness checks (self-tests, flip rates, stuck-at, uint16 odd length).

  PYTHONPATH=. python benchmarks/bit_errors_throughput.py --out $OUT            # GPU, ~70-90 s
  PYTHONPATH=. python benchmarks/bit_errors_throughput.py --out /tmp/b --small  # CPU smoke run (interpret)
"""

from __future__ import annotations

import glob
import pathlib
import sys
import tempfile
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import copy_bandwidth, environment, parse_args, print_table, write_json  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax._compat import triton_compiler_params  # noqa: E402
from mlsys_jax.robust import _pallas_bits as pb  # noqa: E402
from mlsys_jax.robust import bit_errors as be  # noqa: E402

# Kernel configs: (method, words per program, sub-block words or None, all loads first, warps, pre).
# Listed in priority order: if compiling runs past --compile_budget_s, the rest are skipped.
MEMORY = [("levels", 256, None, False, 4, 0), ("levels", 2048, 256, True, 4, 0),
          ("levels", 2048, 512, True, 4, 0), ("levels", 2048, 256, False, 4, 0),
          ("levels", 2048, None, False, 4, 0), ("levels", 1024, None, False, 4, 0),
          ("levels", 4096, None, False, 8, 0), ("levels", 8192, 1024, True, 8, 0)]
PLAIN = [(256, 4), (2048, 4), (4096, 8)]          # Pallas XOR-copy: (words per program, warps)
# Registers per thread from pip Triton 3.9 + ptxas for sm_90 (jaxlib bundles its own Triton; a guide only):
# binomial 256/4: 38; 2048 sub 256 loads-first /4: 64; 2048 sub 256 loop /4: 39; 1024 whole /4: 123;
# 4096 whole /8: 246; 256 whole /1: 123; 512 sub 128 loads-first /1: 83; no spills in any config.
SWEEP = [("binomial", 256, None, False, 4, 3),    # the default before this sweep
         ("binomial", 2048, 256, True, 4, 3), ("binomial", 2048, 512, True, 4, 3),
         ("binomial", 1024, 256, True, 4, 3), ("binomial", 2048, 256, False, 4, 3),
         ("binomial", 2048, 256, True, 4, 6), ("binomial", 1024, None, False, 8, 6),   # all 6 draws of
         # the first Philox call straight-line: fewer loop trips and block reductions, more arithmetic
         ("binomial", 4096, 512, True, 8, 3), ("binomial", 1024, None, False, 8, 3),
         ("binomial", 256, None, False, 1, 3), ("binomial", 512, 128, True, 1, 3),   # one warp: early-stop
         ("binomial", 1024, 256, False, 1, 3),             # tests are warp reductions, no block barrier
         ("binomial", 512, None, False, 4, 3), ("binomial", 1024, 512, True, 4, 3),
         ("binomial", 4096, 256, False, 4, 3), ("binomial", 2048, 512, False, 8, 3),
         ("binomial", 8192, 1024, False, 8, 3), ("binomial", 4096, 1024, True, 8, 3),
         ("binomial", 1024, None, False, 4, 3), ("binomial", 2048, None, False, 8, 3),
         ("levels", 64, None, False, 1, 3),          # the 'levels' default before this sweep
         ("levels", 1024, 256, True, 4, 3), ("levels", 2048, 256, False, 4, 3),
         ("binomial", 4096, None, False, 8, 3)]
SMALL_MEMORY = [("levels", 64, None, False, 2, 0), ("levels", 128, 32, True, 2, 0)]
SMALL_PLAIN = [(128, 2)]
SMALL_SWEEP = [("binomial", 128, 32, True, 2, 3), ("binomial", 128, 64, False, 2, 1),
               ("levels", 64, None, False, 2, 3)]


def _extra(ap):
  ap.add_argument("--batch", type=int, default=10, help="distinct code arrays per timed call")
  ap.add_argument("--repeats", type=int, default=30, help="round-robin timing rounds")
  ap.add_argument("--compile_budget_s", type=float, default=55.0,
                  help="stop compiling further rows after this many seconds from the start")
  ap.add_argument("--no_profile", action="store_true", help="skip the profiler trace (device time)")
  ap.add_argument("--no_checks", action="store_true", help="skip the on-device exactness checks")


def _name(mth, w, sb, unroll, nwarp, pre, p0=False):
  tile = f"words={w}" + ("" if sb in (None, w) else f" sub={sb} {'loads-first' if unroll else 'loop'}")
  return f"kernel {'p=0 (memory path) ' if p0 else ''}{mth} {tile} warps={nwarp} pre={pre}"


def _pallas_xor(c, k, words: int, nwarp: int, interpret: bool):
  """uint32 words XOR k[0] by a Pallas kernel with the fault kernel's loads and stores and nothing else."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu
  nw = c.shape[0] // 4
  cw = jax.lax.bitcast_convert_type(c.reshape(nw, 4), jnp.uint32)

  def kernel(k_ref, c_ref, o_ref):
    idx = pl.program_id(0) * words + jnp.arange(words, dtype=jnp.int32)
    x = plgpu.load(c_ref.at[idx], mask=idx < nw, other=jnp.zeros((), jnp.uint32))
    plgpu.store(o_ref.at[idx], x ^ k_ref[0], mask=idx < nw)
  cp = None if interpret else triton_compiler_params(nwarp, 1)
  out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((nw,), jnp.uint32), grid=(-(-nw // words),),
                       interpret=interpret, compiler_params=cp)(k, cw)
  return jax.lax.bitcast_convert_type(out, jnp.uint8).reshape(-1)


def _batched(step):
  """jit(arrays, kw) -> [step(arrays[i], (kw0 ^ i, kw1))]: one traced step per array, each its own key."""
  one = jax.jit(step)

  def run(arrays, kw):
    return [one(a, jnp.stack([kw[0] ^ jnp.uint32(i), kw[1]])) for i, a in enumerate(arrays)]
  return jax.jit(run)


def _round_robin(fns: dict, repeats: int, per_call: int) -> dict:
  """Wall seconds per operation of each zero-argument function (median), timed in rotating order."""
  names = list(fns)
  times = {nm: [] for nm in names}
  for r in range(repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for nm in order:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[nm]())
      times[nm].append((time.perf_counter() - t0) / per_call)
  return {nm: float(np.median(v)) for nm, v in times.items()}


def _device_times(fns: dict, calls: int, per_call: int, gap_s: float = 0.03) -> dict:
  """Device seconds per operation from ONE profiler trace: each function runs ``calls`` times, then the
  host sleeps ``gap_s``; GPU kernel events are split into one cluster per function at gaps longer than
  ``gap_s / 2``. Per operation: ``busy_s`` (sum of kernel durations / (calls * per_call)), kernels per
  operation, and the most frequent kernel names. Diagnostics: never fatal."""
  names = list(fns)
  d = tempfile.mkdtemp()
  try:
    with jax.profiler.trace(d):
      for nm in names:
        out = None
        for _ in range(calls):
          out = fns[nm]()
        jax.block_until_ready(out)
        time.sleep(gap_s)
    files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    prof = jax.profiler.ProfileData.from_file(files[0])
    events = []
    for plane in prof.planes:
      if plane.name.startswith("/device:GPU"):
        for line in plane.lines:
          if "stream" in line.name.lower():
            events += [(ev.start_ns, ev.end_ns, ev.duration_ns, ev.name) for ev in line.events]
    events.sort()
    clusters, cur, last = [], [], None
    for ev in events:
      if cur and ev[0] - last > gap_s * 1e9 / 2:
        clusters.append(cur)
        cur = []
      cur.append(ev)
      last = ev[1] if last is None or len(cur) == 1 else max(last, ev[1])
    if cur:
      clusters.append(cur)
    if len(clusters) != len(names):
      return {"error": f"{len(clusters)} kernel clusters for {len(names)} functions"}
    res = {}
    for nm, cl in zip(names, clusters):
      kinds = {}
      for ev in cl:
        kinds[ev[3][:60]] = kinds.get(ev[3][:60], 0) + 1
      res[nm] = {"busy_s": sum(ev[2] for ev in cl) * 1e-9 / (calls * per_call),
                 "kernels_per_op": len(cl) / (calls * per_call),
                 "top_kernels": sorted(kinds.items(), key=lambda t: -t[1])[:3]}
    return res
  except Exception as e:  # diagnostics only
    return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def main():
  args = parse_args(__doc__, _extra)
  t_start = time.perf_counter()
  env = environment()
  n = 40_000 if args.small else 25_000_000
  p = 0.01
  gpu = jax.default_backend() == "gpu"
  kimpl = "pallas" if gpu else "interpret"
  batch = 2 if args.small else args.batch
  repeats = 3 if args.small else args.repeats
  bw = copy_bandwidth(1 << 22 if args.small else 1 << 30)
  floor = 2 * n / bw  # read the codes once, write them once
  codes = jax.random.randint(jax.random.PRNGKey(0), (n,), 0, 256).astype(jnp.uint8)
  sets = {"u8": [codes ^ jnp.uint8(i) for i in range(batch)]}
  sets["u32"] = [jax.lax.bitcast_convert_type(a.reshape(-1, 4), jnp.uint32) for a in sets["u8"]]
  sets["f32"] = [jax.random.normal(jax.random.PRNGKey(i), (n // 4,), jnp.float32) for i in range(batch)]
  key = jax.random.PRNGKey(1)
  kw = pb.key_words(key)
  t, always = be._threshold(p)
  t0_, a0_ = be._threshold(0.0)

  def kernel_step(method, w, sb, unroll, nwarp, pre, thr=(t, always), impl=kimpl):
    def step(c, k):
      fp = jnp.stack([k[0], k[1], thr[0], thr[1].astype(jnp.uint32)])
      return pb.inject(c, 8, fp, impl=impl, words=w, sub=sb, unroll=unroll, num_warps=nwarp, pre=pre,
                       method=method)
    return step

  def u32_view_xor(c, k):
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(c.reshape(-1, 4), jnp.uint32) ^ k[0],
                                        jnp.uint8).reshape(-1)

  # name -> (array set, step, group of the bit check: 'p0', a method, or None)
  rows = {"XLA uint8 XOR-copy": ("u8", lambda c, k: c ^ k[0].astype(jnp.uint8), None),
          "XLA uint32-view XOR-copy (uint8 codes bitcast to words)": ("u8", u32_view_xor, None),
          "XLA uint32 XOR-copy (uint32 arrays, same bytes)": ("u32", lambda c, k: c ^ k[0], None),
          "XLA float32 x*c (float32 arrays, same bytes)": (
              "f32", lambda c, k: c * (1.0 + k[0].astype(jnp.float32) * 1e-12), None)}
  mem, plain, sweep = (SMALL_MEMORY, SMALL_PLAIN, SMALL_SWEEP) if args.small else (MEMORY, PLAIN, SWEEP)
  cands = []
  for i in range(max(len(mem), len(plain), len(sweep))):   # interleave the groups: priority by position
    if i < len(sweep):
      cands.append((_name(*sweep[i]), ("u8", kernel_step(*sweep[i]), sweep[i][0])))
    if i < len(mem):
      cands.append((_name(*mem[i], p0=True), ("u8", kernel_step(*mem[i], thr=(t0_, a0_)), "p0")))
    if i < len(plain):
      w, nwarp = plain[i]
      cands.append((f"Pallas XOR-copy (no fault code) words={w} warps={nwarp}", ("u8", lambda c, k, w=w,
                    nwarp=nwarp: _pallas_xor(c, k, w, nwarp, not gpu), None)))
    if i == 1:
      cands.append(("inject_bit_errors (public)", ("u8", lambda c, k: be.inject_bit_errors(k, c, p, 8),
                                                   "public")))
      cands.append(("inject_stuck_at (public)", ("u8", lambda c, k: be.inject_stuck_at(k, c, p, 8), None)))
  rows.update(cands)

  fns, errors, compile_s, last, skipped = {}, {}, {}, {}, []
  for name, (aset, step, _) in rows.items():   # compile everything first
    if time.perf_counter() - t_start > args.compile_budget_s:
      skipped.append(name)
      continue
    try:
      f = _batched(step)
      t_c = time.perf_counter()
      last[name] = jax.block_until_ready(f(sets[aset], kw))[-1]
      compile_s[name] = time.perf_counter() - t_c
      fns[name] = (lambda f=f, a=sets[aset]: f(a, kw))
    except Exception as e:  # keep the other rows if one variant fails to compile
      errors[name] = "".join(traceback.format_exception_only(type(e), e))[-1500:]
      print("FAILED", name, errors[name], flush=True)
  print(f"compiled {len(fns)} rows after {time.perf_counter() - t_start:.1f} s; skipped {skipped}", flush=True)

  # Bits: every kernel row against the XLA path of its method on the last array with the same key.
  k_last = jnp.stack([kw[0] ^ jnp.uint32(batch - 1), kw[1]])
  refs = {}
  mismatched = {}
  for name, (_, _, group) in rows.items():
    if name not in last or group is None:
      continue
    if group == "p0":
      mismatched[name] = int(jnp.sum(last[name] != sets["u8"][-1]))
      continue
    if group not in refs:
      ref_step = (lambda c, k: be._inject(k, c, p, 8, impl="xla")) if group == "public" else kernel_step(
          group, None, None, None, None, None, impl="xla")
      refs[group] = jax.jit(ref_step)(sets["u8"][-1], k_last)
    mismatched[name] = int(jnp.sum(last[name] != refs[group]))
  del last, refs
  print(f"bit checks done after {time.perf_counter() - t_start:.1f} s", flush=True)

  wall = _round_robin(fns, repeats, batch)
  dev = _device_times(fns, 3, batch) if gpu and not args.no_profile else {}
  print(f"timed after {time.perf_counter() - t_start:.1f} s", flush=True)
  copy_s = wall.get("XLA uint8 XOR-copy", float("nan"))
  out_rows = []
  for nm, s in wall.items():
    r = {"op": nm, "s": s, "fraction_of_floor": floor / s, "vs_uint8_xor_copy": s / copy_s,
         "codes_per_s": n / s, "mismatched_codes_vs_xla": mismatched.get(nm), "compile_s": compile_s[nm]}
    dv = dev.get(nm) if isinstance(dev.get(nm), dict) else None
    if dv:
      r.update(device_s=dv["busy_s"], device_fraction_of_floor=floor / dv["busy_s"] if dv["busy_s"] else None,
               kernels_per_op=dv["kernels_per_op"], top_kernels=dv["top_kernels"])
    out_rows.append(r)
  best = {}
  for r in out_rows:
    if r["op"].startswith("kernel ") and "p=0" not in r["op"] and r["mismatched_codes_vs_xla"] == 0:
      mth = r["op"].split()[1]
      if mth not in best or r["s"] < best[mth]["s"]:   # by the stated method (wall); device time beside
        best[mth] = {"op": r["op"], "s": r["s"], "device_s": r.get("device_s"),
                     "fraction_of_floor": r["fraction_of_floor"]}
  base = {"env": env, "n": n, "p": p, "copy_bandwidth_Bps": bw, "floor_s": floor, "batch": batch,
          "repeats": repeats,
          "method": "floor = 2 bytes per uint8 code (read + write) / float32 copy bandwidth of the same run "
                    "(1 GiB x*c, dispatched calls, read+write bytes); each row: one jitted call over "
                    f"{batch} distinct arrays (own key each), wall time / {batch}, median over {repeats} "
                    "round-robin rounds, all rows compiled first; device_s: kernel time per array from one "
                    "profiler trace (3 calls per row)",
          "kernel_defaults": {"method": pb.METHOD, "hash": pb.HASH, "words": pb.WORDS, "sub": pb.SUB,
                              "unroll": pb.UNROLL, "num_warps": pb.NUM_WARPS, "io": pb.IO, "pre": pb.PRE},
          "rows": out_rows, "errors": errors, "skipped": skipped, "best_zero_mismatch": best,
          "profile_error": dev.get("error") if isinstance(dev.get("error"), str) else None}
  print(f"{env}\ncopy bandwidth {bw / 1e12:.3f} TB/s, {n / 1e6:.2f}M uint8 codes, p = 1%, floor "
        f"{floor * 1e6:.2f} us; {batch} arrays per jitted call, median of {repeats} round-robin rounds")
  print_table([{**r, "wall us": r["s"] * 1e6, "% floor": 100 * r["fraction_of_floor"],
                "dev us": r.get("device_s", float("nan")) * 1e6,
                "dev % floor": 100 * (r.get("device_fraction_of_floor") or float("nan")),
                "k/op": r.get("kernels_per_op", ""), "mism": r["mismatched_codes_vs_xla"]} for r in out_rows],
              ["op", "wall us", "% floor", "dev us", "dev % floor", "k/op", "mism"])
  print("best (0 mismatches):", best, "profile error:", base["profile_error"], flush=True)
  write_json(args.out, "bit_errors_throughput", base)   # rewritten below with the checks

  # The public function as dispatched calls, interleaved with the XOR-copy.
  copy1 = jax.jit(lambda c: c ^ jnp.uint8(1))
  pub = jax.jit(lambda k, c: be.inject_bit_errors(k, c, p, 8))
  td = stats.time_interleaved(lambda: pub(key, codes), lambda: copy1(codes), repeats=min(repeats, 10),
                              warmup=2, inner=20)
  dispatched = {"s": td.median_a, "xor_copy_s": td.median_b, "fraction_of_floor": floor / td.median_a}
  print("public, dispatched (time_interleaved, inner=20):", dispatched, flush=True)
  write_json(args.out, "bit_errors_throughput", {**base, "public_dispatched": dispatched})

  checks = {"public path": pb.default_impl(), "default method": pb.METHOD}
  if not args.no_checks:   # on-device exactness with the default tile
    try:
      for mth in ("binomial", "levels"):
        checks[f"kernel self-test passed ({mth})"] = pb.default_impl(mth) == "pallas"
        for pp in (0.01, 0.3):
          a = be._inject(key, codes, pp, 8, impl=kimpl, method=mth)
          b = be._inject(key, codes, pp, 8, impl="xla", method=mth)
          checks[f"mismatched codes kernel vs xla {mth} p={pp}"] = int(jnp.sum(a != b))
          checks[f"flip rate {mth} p={pp}"] = float(
              jnp.sum(jax.lax.population_count(a ^ codes).astype(jnp.int32)) / (8 * n))
        a = be._inject(key, codes, 0.05, 8, p_one=0.5, impl=kimpl, method=mth)
        b = be._inject(key, codes, 0.05, 8, p_one=0.5, impl="xla", method=mth)
        checks[f"mismatched codes stuck-at kernel vs xla {mth}"] = int(jnp.sum(a != b))
        a16 = (codes.astype(jnp.uint16) * 7)[: n // 2 - 1] >> 4     # odd length: the byte-load path
        checks[f"mismatched uint16 12-bit odd length kernel vs xla {mth}"] = int(jnp.sum(
            be._inject(key, a16, 0.02, 12, impl=kimpl, method=mth)
            != be._inject(key, a16, 0.02, 12, impl="xla", method=mth)))
    except Exception as e:
      checks["error"] = "".join(traceback.format_exception_only(type(e), e))[-1500:]
  print(checks)
  total = time.perf_counter() - t_start
  print(f"total {total:.1f} s")
  write_json(args.out, "bit_errors_throughput", {**base, "public_dispatched": dispatched, "checks": checks,
                                                 "total_s": total})


if __name__ == "__main__":
  main()
