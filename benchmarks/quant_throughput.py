"""GPU throughput of mlsys_jax.quant: quantize/dequantize/fake-quant against the bandwidth floor (XLA path
and one-pass Pallas kernels), and an int8 matmul with scales against a bf16 matmul of the same shape.

Floor of an elementwise op: the bytes it must move at least once (input read once, codes/output written
once, scales) over the same run's copy bandwidth (``benchmarks.common.copy_bandwidth``: a float32
x -> x * c copy of 1 GiB, bytes read plus written). Each op is timed interleaved with a float32 copy of
the input (``mlsys_jax.stats.time_interleaved``, 10 calls per measurement, median of 30). The one-pass
kernels (``mlsys_jax/quant/_pallas_quant.py``) are checked on the device against the XLA path bit for bit,
and the number of kernels in each compiled program is counted from its HLO.

  PYTHONPATH=. python benchmarks/quant_throughput.py --out $OUT [--skip_matmul]
"""

from __future__ import annotations

import pathlib
import re
import sys
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import copy_bandwidth, environment, parse_args, print_table, write_json  # noqa: E402
from mlsys_jax import quant, stats  # noqa: E402
from mlsys_jax.quant import _pallas_quant as pq  # noqa: E402
from mlsys_jax.quant import fixed_point as fp  # noqa: E402
from mlsys_jax.quant import vsquant as vs  # noqa: E402


def _extra(ap):
  ap.add_argument("--skip_matmul", action="store_true", help="only the elementwise ops")


def _compiled(fn, *args, kernels: bool):
  """jit-compile ``fn`` with the one-pass kernels on or off (the choice is made while tracing)."""
  old = pq.ENABLED
  pq.ENABLED = kernels
  try:
    return jax.jit(fn).lower(*args).compile()
  finally:
    pq.ENABLED = old


def _num_kernels(compiled) -> int:
  """Fusions and custom calls (a Pallas kernel is one) in the entry computation of a compiled program."""
  text = compiled.as_text()
  entry = text[text.index("ENTRY"):]
  entry = entry[:entry.index("\n}")]
  return len(re.findall(r"\b(fusion|custom-call)\(", entry))


def _mismatch(a, b) -> int:
  """Elements that differ (NaN equal to NaN) across the leaves of two results."""
  total = 0
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.dtype != y.dtype:
      return -1
    total += int(np.sum(~((x == y) | (np.isnan(x) & np.isnan(y))))) if x.dtype.kind == "f" else int(np.sum(x != y))
  return total


def main():
  args = parse_args(__doc__, _extra)
  env = environment()
  n_rows, n_cols = (256, 256) if args.small else (8192, 4096)       # 32M floats = 128 MB
  mm = (256, 256, 256) if args.small else (8192, 8192, 8192)
  bw = copy_bandwidth(1 << 22 if args.small else 1 << 30)
  print(f"{env}\ncopy bandwidth (read+write): {bw / 1e12:.2f} TB/s")
  x = jax.random.normal(jax.random.PRNGKey(0), (n_rows, n_cols), jnp.float32)
  x2 = jax.random.normal(jax.random.PRNGKey(5), (n_rows, n_cols), jnp.float32) * jnp.exp(
      jax.random.uniform(jax.random.PRNGKey(6), (1, n_cols), minval=-4, maxval=4))
  n = x.size
  copy = jax.jit(lambda a: a * 1.0000001)
  gpu = jax.default_backend() == "gpu"
  kimpl = "pallas" if gpu else "interpret"

  qt = jax.jit(lambda a: quant.quantize(a, 8, axis=0))(x)
  deq = jax.jit(quant.dequantize)
  vqt = jax.jit(lambda a: quant.vs_quantize(a, 4, axis=0, vector_size=16, scale_bits=8))(x)
  vdeq = jax.jit(quant.vs_dequantize)

  q_ch = lambda a: quant.quantize(a, 8, axis=0)
  q_row = lambda a: quant.quantize(a, 8, axis=1)
  q_asym = lambda a: quant.quantize(a, 8, axis=0, symmetric=False, unsigned=True)
  v_two = lambda a: quant.vs_quantize(a, 4, axis=0, vector_size=16, scale_bits=8)
  v_one = lambda a: quant.vs_quantize(a, 4, axis=0, vector_size=16, scale_bits=None)
  # (name, function, bytes that must move at least once, one-pass kernel variants)
  ops = [
      ("quantize int8 per-channel (axis=0)", q_ch, 4 * n + n,
       {"cols=32 chunk=256": lambda a: fp._quantize_onepass(a, 8, True, False, (0,), "cols", kimpl, cols=32, chunk=256),
        "cols=16 chunk=512": lambda a: fp._quantize_onepass(a, 8, True, False, (0,), "cols", kimpl, cols=16, chunk=512),
        "cols=64 chunk=128": lambda a: fp._quantize_onepass(a, 8, True, False, (0,), "cols", kimpl, cols=64, chunk=128),
        "cols=32 chunk=128 warps=4": lambda a: fp._quantize_onepass(a, 8, True, False, (0,), "cols", kimpl, cols=32, chunk=128, num_warps=4),
        "cols=32 chunk=256 stages=3": lambda a: fp._quantize_onepass(a, 8, True, False, (0,), "cols", kimpl, cols=32, chunk=256, num_stages=3)}),
      ("quantize uint8 asymmetric per-channel (axis=0)", q_asym, 4 * n + n, {}),
      ("quantize int8 per-row (axis=1)", q_row, 4 * n + n,
       {"row_elems=8192": lambda a: fp._quantize_onepass(a, 8, True, False, (1,), "rows", kimpl, row_elems=8192),
        "row_elems=16384": lambda a: fp._quantize_onepass(a, 8, True, False, (1,), "rows", kimpl, row_elems=16384),
        "row_elems=4096 warps=4": lambda a: fp._quantize_onepass(a, 8, True, False, (1,), "rows", kimpl, row_elems=4096, num_warps=4)}),
      ("vs_quantize 4b V=16 M=8", v_two, 4 * n + n + n // 16,
       {"cols=32 chunk=256": lambda a: vs._vs_quantize_onepass(a, 4, 16, 8, kimpl, cols=32, chunk=256),
        "cols=16 chunk=512": lambda a: vs._vs_quantize_onepass(a, 4, 16, 8, kimpl, cols=16, chunk=512),
        "cols=64 chunk=128": lambda a: vs._vs_quantize_onepass(a, 4, 16, 8, kimpl, cols=64, chunk=128),
        "cols=32 chunk=256 stages=3": lambda a: vs._vs_quantize_onepass(a, 4, 16, 8, kimpl, cols=32, chunk=256, num_stages=3)}),
      ("vs_quantize 4b V=16 float scales", v_one, 4 * n + n + 4 * n // 16, {}),
  ]
  rows, errors = [], {}
  checks = {"public path": pq.default_impl() or "XLA"}   # 'pallas' once the kernels passed their self-test

  def timed(name, variant, fn, nbytes, kernels):
    t = stats.time_interleaved(lambda: fn(x), lambda: copy(x), repeats=30, warmup=3, inner=10)
    floor = nbytes / bw
    rows.append({"op": name, "path": variant, "bytes": nbytes, "s": t.median_a, "copy_s": t.median_b,
                 "floor_s": floor, "fraction_of_floor": floor / t.median_a, "kernels": kernels})

  for name, fn, nbytes, variants in ops:
    try:
      xla = _compiled(fn, x, kernels=False)
      timed(name, "XLA", xla, nbytes, _num_kernels(xla))
      if gpu:
        pub = _compiled(fn, x, kernels=True)
        timed(name, "public (one-pass kernel)", pub, nbytes, _num_kernels(pub))
        for data_name, data in (("normal", x), ("mixed ranges", x2), ("bf16", x2.astype(jnp.bfloat16))):
          ref = _compiled(fn, data, kernels=False)(data)
          checks[f"{name}: mismatches vs XLA ({data_name})"] = _mismatch(
              _compiled(fn, data, kernels=True)(data), ref)
    except Exception as e:
      errors[name] = "".join(traceback.format_exception_only(type(e), e))[-2000:]
      print("FAILED", name, errors[name])
    for vname, vfn in (variants.items() if (gpu or args.small) else []):
      try:
        comp = jax.jit(vfn).lower(x).compile()
        timed(name, "kernel " + vname, comp, nbytes, _num_kernels(comp))
        checks[f"{name} kernel {vname}: mismatches vs XLA"] = _mismatch(comp(x2), _compiled(fn, x2, kernels=False)(x2))
      except Exception as e:
        errors[f"{name} {vname}"] = "".join(traceback.format_exception_only(type(e), e))[-2000:]
        print("FAILED", name, vname, errors[f"{name} {vname}"])
      if args.small:
        break
  for name, fn, nbytes in [("dequantize int8 per-channel", lambda: deq(qt), n + 4 * n),
                           ("fake_quant int8 per-channel", None, 4 * n + 4 * n),
                           ("vs_dequantize 4b V=16 M=8", lambda: vdeq(vqt), n + n // 16 + 4 * n)]:
    if fn is None:
      fq = _compiled(lambda a: quant.fake_quant(a, 8, axis=0), x, kernels=False)
      fn = lambda: fq(x)
    t = stats.time_interleaved(fn, lambda: copy(x), repeats=30, warmup=3, inner=10)
    rows.append({"op": name, "path": "XLA", "bytes": nbytes, "s": t.median_a, "copy_s": t.median_b,
                 "floor_s": nbytes / bw, "fraction_of_floor": nbytes / bw / t.median_a})

  mm_rows = []
  if not args.skip_matmul:
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
    for name, fn in [("int8 codes x int8 codes -> int32, rescale", lambda: int8_mm(qa.codes, qa.scale, qw.codes, qw.scale)),
                     ("quantize both + int8 matmul (per-channel)", lambda: qdot(a, w)),
                     ("quantize both + per-vector int8 (V=64, M=8)", lambda: vdot(a, w))]:
      t = stats.time_interleaved(fn, lambda: bf16(a16, w16), repeats=20, warmup=3)
      mm_rows.append({"op": name, "shape": [m, k, nn], "s": t.median_a, "bf16_s": t.median_b,
                      "speedup_vs_bf16": t.ratio, "ops_per_s": flops / t.median_a})
  print()
  print_table([{**r, "ms": r["s"] * 1e3, "floor ms": r["floor_s"] * 1e3, "% of floor": 100 * r["fraction_of_floor"]}
               for r in rows], ["op", "path", "ms", "floor ms", "% of floor", "kernels"])
  if mm_rows:
    print()
    print_table([{**r, "ms": r["s"] * 1e3, "bf16 ms": r["bf16_s"] * 1e3} for r in mm_rows],
                ["op", "ms", "bf16 ms", "speedup_vs_bf16"])
  print(checks)
  write_json(args.out, "quant_throughput", {
      "env": env, "copy_bandwidth_Bps": bw,
      "method": "floor = bytes that must move once (input read + codes written + scales) / copy bandwidth "
                "of the same run (float32 copy of 1 GiB, read + write); time_interleaved with a float32 "
                "copy of the input, inner=10, median of 30",
      "elementwise": rows, "matmul": mm_rows, "checks": checks, "errors": errors})


if __name__ == "__main__":
  main()
