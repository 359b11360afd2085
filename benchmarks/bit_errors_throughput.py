"""GPU throughput of bit-error injection on 25M 8-bit codes at p = 1%, against the bandwidth floor.

Floor: the codes are read once and written once, 2 bytes per code, at the same run's copy bandwidth
(``benchmarks.common.copy_bandwidth``: a float32 x -> x * c copy of 1 GiB, bytes read plus written).
Each case is timed interleaved with a uint8 XOR-copy of the codes (``mlsys_jax.stats.time_interleaved``,
20 calls per measurement, median of 30). Rows: the previous implementation (8 stored 32-bit draws per
code from ``jax.random.bits``), the in-register kernel (``inject_bit_errors``, Philox-4x32-10 and
Threefry-2x32-20 level words, a few tile sizes), the same hash in XLA, stuck-at faults, and the stored
fault map / mask. It also checks on the device that the kernel's flips equal the XLA path's bit for bit.

  PYTHONPATH=. python benchmarks/bit_errors_throughput.py --out $OUT
"""

from __future__ import annotations

import pathlib
import sys
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import copy_bandwidth, environment, parse_args, print_table, write_json  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.robust import _pallas_bits  # noqa: E402
from mlsys_jax.robust import bit_errors as be  # noqa: E402


def _previous(key, codes, p, bits):
  """The implementation this kernel replaced: one stored 32-bit draw per (code, bit)."""
  u = jax.random.bits(key, tuple(codes.shape) + (bits,), jnp.uint32)
  return jnp.bitwise_xor(codes, be._plane_mask(u, p, codes.dtype))


def main():
  args = parse_args(__doc__)
  env = environment()
  n = 100_000 if args.small else 25_000_000
  p = 0.01
  bw = copy_bandwidth(1 << 22 if args.small else 1 << 30)
  codes = jax.random.randint(jax.random.PRNGKey(0), (n,), 0, 256).astype(jnp.uint8)
  floor = 2 * n / bw  # read the codes once, write them once
  copy = jax.jit(lambda c: c ^ jnp.uint8(1))
  gpu = jax.default_backend() == "gpu"
  kimpl = "pallas" if gpu else "interpret"
  key = jax.random.PRNGKey(1)

  def inj(**kw):
    return jax.jit(lambda k, c: be._inject(k, c, p, 8, **kw))

  cases = [("previous: jax.random.bits, 8 stored draws per code (threefry key)",
            jax.jit(lambda k, c: _previous(k, c, p, 8)), key),
           ("previous: jax.random.bits, 8 stored draws per code (rbg key)",
            jax.jit(lambda k, c: _previous(k, c, p, 8)), jax.random.key(1, impl="rbg")),
           ("inject_bit_errors (public: kernel on GPU)",
            jax.jit(lambda k, c: be.inject_bit_errors(k, c, p, 8)), key)]
  variants = [("philox", 32, 1), ("philox", 64, 2), ("philox", 128, 4), ("philox", 256, 4), ("philox", 512, 8),
              ("philox", 1024, 8), ("threefry", 256, 4)]
  if args.small:
    variants = variants[3:4]
  for h, w, nwarp in variants:
    cases.append((f"kernel {h} words={w} warps={nwarp}", inj(impl=kimpl, hash=h, words=w, num_warps=nwarp),
                  key))
  cases += [("same hash in XLA (philox)", inj(impl="xla", hash="philox"), key),
            ("same hash in XLA (threefry)", inj(impl="xla", hash="threefry"), key),
            ("inject_stuck_at (public)", jax.jit(lambda k, c: be.inject_stuck_at(k, c, p, 8)), key)]
  rows, errors = [], {}
  for name, fn, k in cases:
    try:
      t = stats.time_interleaved(lambda: fn(k, codes), lambda: copy(codes), repeats=30, warmup=3, inner=20)
    except Exception as e:  # keep the other rows if one variant fails to compile
      errors[name] = "".join(traceback.format_exception_only(type(e), e))[-2000:]
      print("FAILED", name, errors[name])
      continue
    rows.append({"op": name, "s": t.median_a, "xor_copy_s": t.median_b, "floor_s": floor,
                 "fraction_of_floor": floor / t.median_a, "codes_per_s": n / t.median_a})
  emap = be.profiled_error_map(jax.random.PRNGKey(3), (n,), 8, flip=True)
  apply = jax.jit(lambda c: be.apply_error_map(c, emap, p, 8))
  mask = be.error_mask(emap, p)
  apply_mask = jax.jit(be.apply_error_mask)
  for name, fn in [("apply_error_map (profiled, stored draws)", lambda: apply(codes)),
                   ("apply_error_mask (precomputed fault mask)", lambda: apply_mask(codes, mask))]:
    t = stats.time_interleaved(fn, lambda: copy(codes), repeats=30, warmup=3, inner=20)
    rows.append({"op": name, "s": t.median_a, "xor_copy_s": t.median_b, "floor_s": floor,
                 "fraction_of_floor": floor / t.median_a, "codes_per_s": n / t.median_a})
  del emap, mask

  # On-device exactness: the kernel against the XLA path of the same hash, and the flip rate.
  checks = {"public path": be._pallas_bits.default_impl()}   # 'pallas' once the kernel passed its self-test
  try:
    for pp in (0.01, 0.3):
      a = be._inject(key, codes, pp, 8, impl=kimpl)
      b = be._inject(key, codes, pp, 8, impl="xla")
      checks[f"mismatched codes kernel vs xla p={pp}"] = int(jnp.sum(a != b))
      checks[f"flip rate p={pp}"] = float(jnp.sum(jax.lax.population_count(a ^ codes).astype(jnp.int32))
                                          / (8 * n))
    a = be._inject(key, codes, 0.05, 8, p_one=0.5, impl=kimpl)
    b = be._inject(key, codes, 0.05, 8, p_one=0.5, impl="xla")
    checks["mismatched codes stuck-at kernel vs xla"] = int(jnp.sum(a != b))
    a16 = (codes.astype(jnp.uint16) * 7)[: n // 2]
    checks["mismatched uint16 12-bit kernel vs xla"] = int(jnp.sum(
        be._inject(key, a16, 0.02, 12, impl=kimpl) != be._inject(key, a16, 0.02, 12, impl="xla")))
  except Exception as e:
    checks["error"] = "".join(traceback.format_exception_only(type(e), e))[-2000:]
  print(f"{env}\ncopy bandwidth {bw / 1e12:.2f} TB/s, {n / 1e6:.0f}M uint8 codes, p = 1%, floor "
        f"{floor * 1e6:.1f} us")
  print_table([{**r, "ms": r["s"] * 1e3, "xor-copy ms": r["xor_copy_s"] * 1e3,
                "% of floor": 100 * r["fraction_of_floor"]} for r in rows],
              ["op", "ms", "xor-copy ms", "% of floor"])
  print(checks)
  write_json(args.out, "bit_errors_throughput",
             {"env": env, "n": n, "p": p, "copy_bandwidth_Bps": bw, "floor_s": floor,
              "method": "floor = 2 bytes per code (read + write) / copy bandwidth of the same run; "
                        "time_interleaved with a uint8 XOR-copy, inner=20, median of 30",
              "kernel_defaults": {"hash": _pallas_bits.HASH, "words": _pallas_bits.WORDS,
                                  "num_warps": _pallas_bits.NUM_WARPS},
              "rows": rows, "checks": checks, "errors": errors})


if __name__ == "__main__":
  main()
