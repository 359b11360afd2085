"""Speed of the limited-alignment FP inner-product emulator (``quant.fp_align.fp_dot``) against a
float32 matmul of the same shape, timed interleaved in the same run.

Target of issue 23: ``fp_dot`` at 1024x1024x1024 within 20x a float32 matmul on an H200. Cases: FP16
inputs with w = 8 (truncate and drop), w = 28 and exact accumulation; FP8-E4M3 with w = 8. Baselines:
``jnp.matmul`` in float32 at precision HIGHEST (true FP32) and at the default precision (TF32 on GPU).
Raw seconds per call, ratios, and the number of accumulator limbs go into the JSON.

  PYTHONPATH=. python benchmarks/fp_align_dot.py --out $OUT
  PYTHONPATH=. python benchmarks/fp_align_dot.py --small        # CPU smoke test (256^3)
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import environment, parse_args, print_table, write_json  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.quant import fp_align  # noqa: E402


def _extra(ap):
  ap.add_argument("--size", type=int, default=1024, help="M = K = N")
  ap.add_argument("--block_elems", type=int, default=1 << 26,
                  help="fp_dot row blocks of about this many (row, k, col, limb) elements")
  ap.add_argument("--repeats", type=int, default=20)


def main():
  args = parse_args(__doc__, _extra)
  env = environment()
  n = 256 if args.small else args.size
  reps = 5 if args.small else args.repeats
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  x32 = jax.random.normal(ka, (n, n), jnp.float32)
  y32 = jax.random.normal(kb, (n, n), jnp.float32) * 0.05
  mm_hi = jax.jit(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))
  mm_def = jax.jit(lambda a, b: jnp.matmul(a, b))
  cases = [("fp16", 8, "truncate"), ("fp16", 8, "drop"), ("fp16", 28, "truncate"),
           ("fp16", None, "truncate"), ("fp8_e4m3", 8, "truncate")]
  rows = []
  for fmt, w, conv in cases:
    dt = fp_align.FORMATS[fmt].dtype
    scale = 1.0 if fmt == "fp16" else 16.0
    xa, yb = (x32 * scale).astype(dt), (y32 * scale).astype(dt)
    f = jax.jit(lambda a, b, w=w, fmt=fmt, conv=conv: fp_align.fp_dot(
        a, b, fmt=fmt, align_bits=w, convention=conv, block_elems=args.block_elems))
    out = f(xa, yb).block_until_ready()
    ref = mm_hi(xa.astype(jnp.float32), yb.astype(jnp.float32))
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    xf, yf = xa.astype(jnp.float32), yb.astype(jnp.float32)
    t_hi = stats.time_interleaved(lambda: f(xa, yb), lambda: mm_hi(xf, yf), repeats=reps, warmup=2)
    t_def = stats.time_interleaved(lambda: f(xa, yb), lambda: mm_def(xf, yf), repeats=reps, warmup=2)
    nl = fp_align._num_limbs(fp_align.FORMATS[fmt],  # noqa: SLF001 (reported for the record)
                             fp_align.max_alignment_shift(fmt) if w is None else w, n)
    rows.append({"fmt": fmt, "align_bits": -1 if w is None else w, "convention": conv,
                 "m": n, "k": n, "n": n, "limbs": nl,
                 "fp_dot_s": t_hi.median_a, "matmul_f32_highest_s": t_hi.median_b,
                 "matmul_f32_default_s": t_def.median_b,
                 "slowdown_vs_highest": t_hi.median_a / t_hi.median_b,
                 "slowdown_vs_default": t_def.median_a / t_def.median_b,
                 "macs_per_s": n ** 3 / t_hi.median_a,
                 "rel_diff_vs_f32_highest": rel,
                 "times_fp_dot_s": t_hi.times_a.tolist(), "times_highest_s": t_hi.times_b.tolist()})
    r = rows[-1]
    print(f"{fmt} w={w} {conv}: fp_dot {r['fp_dot_s'] * 1e3:.3f} ms, f32 HIGHEST "
          f"{r['matmul_f32_highest_s'] * 1e3:.3f} ms ({r['slowdown_vs_highest']:.1f}x), default "
          f"{r['matmul_f32_default_s'] * 1e3:.3f} ms ({r['slowdown_vs_default']:.1f}x)", flush=True)
  print_table([{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()
                if not k.startswith("times")} for r in rows],
              ["fmt", "align_bits", "convention", "limbs", "fp_dot_s", "matmul_f32_highest_s",
               "slowdown_vs_highest", "slowdown_vs_default", "rel_diff_vs_f32_highest"])
  write_json(args.out, "fp_align_dot" + ("_small" if args.small else ""),
             {"env": env, "target_slowdown": 20.0, "rows": rows})


if __name__ == "__main__":
  main()
