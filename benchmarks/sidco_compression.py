"""GPU time of gradient compression (threshold/selection + packing into a static payload) at ratio 0.001
for 1M, 25M and 100M float32 elements: SIDCo (each distribution), DGC, lax.top_k and lax.approx_max_k,
against the memory-bandwidth floor (read the gradient once).

  PYTHONPATH=. python benchmarks/sidco_compression.py --out $OUT
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import copy_bandwidth, environment, parse_args, print_table, write_json  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.comm import sparse as sp  # noqa: E402


def main():
  args = parse_args(__doc__)
  env = environment()
  sizes = [100_000, 1_000_000] if args.small else [1_000_000, 25_000_000, 100_000_000]
  ratio = 0.001
  bw = copy_bandwidth(1 << 22 if args.small else 1 << 30)
  rows = []
  for n in sizes:
    k1, k2 = jax.random.split(jax.random.PRNGKey(n))
    # heavy-tailed, gradient-like magnitudes
    g = jax.random.laplace(k1, (n,)) * jnp.exp(0.5 * jax.random.normal(k2, (n,)))
    k = max(1, int(n * ratio))
    cap = 2 * k
    top = jax.jit(lambda x: jax.lax.top_k(jnp.abs(x), k))
    cases = {
        "lax.top_k": top,
        "lax.approx_max_k": jax.jit(lambda x: jax.lax.approx_max_k(jnp.abs(x), k)),
        "DGC (1% sample)": jax.jit(lambda x, key=jax.random.PRNGKey(0): sp.compact(
            x, jnp.abs(x) >= sp.dgc_threshold(key, jnp.abs(x), ratio, 0.01), cap)),
    }
    for dist, st in (("exponential", 3), ("gpareto", 1), ("gamma", 2)):
      cases[f"SIDCo {dist} ({st} stage{'s' if st > 1 else ''})"] = jax.jit(
          lambda x, d=dist, s=st: sp.compact(x, jnp.abs(x) > sp.sidco_threshold(jnp.abs(x), ratio, d, s), cap))
      cases[f"  threshold only: {dist}"] = jax.jit(
          lambda x, d=dist, s=st: sp.sidco_threshold(jnp.abs(x), ratio, d, s))
    floor = 4 * n / bw
    for name, fn in cases.items():
      t = stats.time_interleaved(lambda: fn(g), lambda: top(g), repeats=20, warmup=3)
      extra = {}
      if name.startswith("SIDCo") or name.startswith("DGC"):
        extra["density/target"] = f"{int(fn(g).count) / k:.2f}" if not name.startswith("  ") else ""
      rows.append({"n": f"{n / 1e6:g}M", "method": name, "ms": f"{t.median_a * 1e3:.3f}",
                   "speed-up vs top_k": f"{t.ratio:.2f}", "x floor": f"{t.median_a / floor:.1f}",
                   **extra})
      print(rows[-1], flush=True)
  print(f"\n{env}\ncopy bandwidth {bw / 1e12:.2f} TB/s; floor = 4 n bytes / bandwidth; ratio {ratio}")
  print_table(rows, ["n", "method", "ms", "speed-up vs top_k", "x floor", "density/target"])
  write_json(args.out, "sidco_compression", {"env": env, "ratio": ratio, "copy_bandwidth_Bps": bw,
                                             "rows": rows})


if __name__ == "__main__":
  main()
