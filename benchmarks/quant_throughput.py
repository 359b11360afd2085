"""GPU throughput of mlsys_jax.quant: quantize/dequantize/fake-quant against the bandwidth floor, and an
int8 matmul with scales against a bf16 matmul of the same shape.

  PYTHONPATH=. python benchmarks/quant_throughput.py --out $OUT
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import copy_bandwidth, environment, parse_args, print_table, write_json  # noqa: E402
from mlsys_jax import quant, stats  # noqa: E402


def main():
  args = parse_args(__doc__)
  env = environment()
  n_rows, n_cols = (256, 256) if args.small else (8192, 4096)       # 32M floats = 128 MB
  mm = (256, 256, 256) if args.small else (8192, 8192, 8192)
  bw = copy_bandwidth(1 << 22 if args.small else 1 << 30)
  print(f"{env}\ncopy bandwidth (read+write): {bw / 1e12:.2f} TB/s")
  x = jax.random.normal(jax.random.PRNGKey(0), (n_rows, n_cols), jnp.float32)
  n = x.size
  copy = jax.jit(lambda a: a * 1.0000001)

  q8 = jax.jit(lambda a: quant.quantize(a, 8, axis=0))
  qt = q8(x)
  deq = jax.jit(quant.dequantize)
  fq = jax.jit(lambda a: quant.fake_quant(a, 8, axis=0))
  vsq = jax.jit(lambda a: quant.vs_quantize(a, 4, axis=0, vector_size=16, scale_bits=8))
  vqt = vsq(x)
  vdeq = jax.jit(quant.vs_dequantize)
  rows = []
  # (name, fn, bytes that must move at least once)
  cases = [
      ("quantize int8 per-channel", lambda: q8(x), 4 * n + n),
      ("dequantize int8 per-channel", lambda: deq(qt), n + 4 * n),
      ("fake_quant int8 per-channel", lambda: fq(x), 4 * n + 4 * n),
      ("vs_quantize 4b V=16 M=8", lambda: vsq(x), 4 * n + n + n // 16),
      ("vs_dequantize 4b V=16 M=8", lambda: vdeq(vqt), n + n // 16 + 4 * n),
  ]
  for name, fn, nbytes in cases:
    t = stats.time_interleaved(fn, lambda: copy(x), repeats=30, warmup=3)
    floor = nbytes / bw
    rows.append({"op": name, "MB": f"{nbytes / 1e6:.0f}", "ms": f"{t.median_a * 1e3:.3f}",
                 "floor ms": f"{floor * 1e3:.3f}", "% of bandwidth": f"{100 * floor / t.median_a:.0f}",
                 "vs copy (x1)": f"{t.median_a / t.median_b:.2f}"})

  m, k, nn = mm
  a = jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.float32)
  w = jax.random.normal(jax.random.PRNGKey(2), (k, nn), jnp.float32)
  a16, w16 = a.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  bf16 = jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32))
  qa = quant.quantize(a, 8, axis=1)
  qw = quant.quantize(w, 8, axis=0)

  @jax.jit
  def int8_mm(ca, sa, cw, sw):
    acc = jax.lax.dot(ca, cw, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * sa * sw

  cfg = quant.QuantConfig(quant.QuantSpec(8, "channel"), quant.QuantSpec(8, "channel"), integer=True)
  qdot = jax.jit(lambda p, q: quant.quantized_dot_general(cfg)(p, q, (((1,), (0,)), ((), ()))))
  vcfg = quant.QuantConfig(quant.QuantSpec(8, "vector", 64, scale_bits=8),
                           quant.QuantSpec(8, "vector", 64, scale_bits=8), integer=True)
  vdot = jax.jit(lambda p, q: quant.quantized_dot_general(vcfg)(p, q, (((1,), (0,)), ((), ()))))
  flops = 2 * m * k * nn
  mm_rows = []
  for name, fn in [("int8 codes x int8 codes -> int32, rescale", lambda: int8_mm(qa.codes, qa.scale, qw.codes, qw.scale)),
                   ("quantize both + int8 matmul (per-channel)", lambda: qdot(a, w)),
                   ("quantize both + per-vector int8 (V=64, M=8)", lambda: vdot(a, w))]:
    t = stats.time_interleaved(fn, lambda: bf16(a16, w16), repeats=20, warmup=3)
    mm_rows.append({"op": name, "shape": f"{m}x{k}x{nn}", "ms": f"{t.median_a * 1e3:.3f}",
                    "bf16 ms": f"{t.median_b * 1e3:.3f}", "speed-up vs bf16": f"{t.ratio:.2f}",
                    "TOP/s": f"{flops / t.median_a / 1e12:.0f}"})
  print()
  print_table(rows, ["op", "MB", "ms", "floor ms", "% of bandwidth", "vs copy (x1)"])
  print()
  print_table(mm_rows, ["op", "shape", "ms", "bf16 ms", "speed-up vs bf16", "TOP/s"])
  write_json(args.out, "quant_throughput", {"env": env, "copy_bandwidth_Bps": bw, "elementwise": rows,
                                            "matmul": mm_rows})


if __name__ == "__main__":
  main()
