"""GPU throughput of bit-error injection on 25M 8-bit codes at p = 1%, against the bandwidth floor.

  PYTHONPATH=. python benchmarks/bit_errors_throughput.py --out $OUT
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import copy_bandwidth, environment, parse_args, print_table, write_json  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.robust import bit_errors as be  # noqa: E402


def main():
  args = parse_args(__doc__)
  env = environment()
  n = 100_000 if args.small else 25_000_000
  bw = copy_bandwidth(1 << 22 if args.small else 1 << 30)
  codes = jax.random.randint(jax.random.PRNGKey(0), (n,), 0, 256).astype(jnp.uint8)
  floor = 2 * n / bw  # read the codes once, write them once
  copy = jax.jit(lambda c: c ^ jnp.uint8(1))
  emap = be.profiled_error_map(jax.random.PRNGKey(3), (n,), 8, flip=True)
  cases = {
      "inject_bit_errors (threefry key)": (jax.jit(lambda k, c: be.inject_bit_errors(k, c, 0.01, 8)),
                                           jax.random.PRNGKey(1)),
      "inject_bit_errors (rbg key)": (jax.jit(lambda k, c: be.inject_bit_errors(k, c, 0.01, 8)),
                                      jax.random.key(1, impl="rbg")),
      "inject_bit_errors (unsafe_rbg key)": (jax.jit(lambda k, c: be.inject_bit_errors(k, c, 0.01, 8)),
                                             jax.random.key(1, impl="unsafe_rbg")),
  }
  rows = []
  for name, (fn, key) in cases.items():
    t = stats.time_interleaved(lambda: fn(key, codes), lambda: copy(codes), repeats=30, warmup=3)
    rows.append({"op": name, "ms": f"{t.median_a * 1e3:.3f}", "xor-copy ms": f"{t.median_b * 1e3:.3f}",
                 "floor ms": f"{floor * 1e3:.4f}", "% of floor": f"{100 * floor / t.median_a:.1f}",
                 "Gcodes/s": f"{n / t.median_a / 1e9:.1f}"})
  # A stored (profiled) map: no random numbers at run time, reads 8 uint32 draws per code.
  apply = jax.jit(lambda c: be.apply_error_map(c, emap, 0.01, 8))
  t = stats.time_interleaved(lambda: apply(codes), lambda: copy(codes), repeats=30, warmup=3)
  rows.append({"op": "apply_error_map (profiled, stored draws)", "ms": f"{t.median_a * 1e3:.3f}",
               "xor-copy ms": f"{t.median_b * 1e3:.3f}", "floor ms": f"{floor * 1e3:.4f}",
               "% of floor": f"{100 * floor / t.median_a:.1f}", "Gcodes/s": f"{n / t.median_a / 1e9:.1f}"})
  mask = be.error_mask(emap, 0.01)
  apply_mask = jax.jit(be.apply_error_mask)
  t = stats.time_interleaved(lambda: apply_mask(codes, mask), lambda: copy(codes), repeats=30, warmup=3)
  rows.append({"op": "apply_error_mask (precomputed fault mask)", "ms": f"{t.median_a * 1e3:.3f}",
               "xor-copy ms": f"{t.median_b * 1e3:.3f}", "floor ms": f"{floor * 1e3:.4f}",
               "% of floor": f"{100 * floor / t.median_a:.1f}", "Gcodes/s": f"{n / t.median_a / 1e9:.1f}"})
  print(f"{env}\ncopy bandwidth {bw / 1e12:.2f} TB/s, {n / 1e6:.0f}M uint8 codes, p = 1%")
  print_table(rows, ["op", "ms", "xor-copy ms", "floor ms", "% of floor", "Gcodes/s"])
  write_json(args.out, "bit_errors_throughput", {"env": env, "n": n, "copy_bandwidth_Bps": bw, "rows": rows})


if __name__ == "__main__":
  main()
