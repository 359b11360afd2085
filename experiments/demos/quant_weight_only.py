"""Demo rows of mlsys_jax.quant.weight_only: W4A16 packed int4 weights with per-group (VS-Quant) scales.

The speed claim (a batch-1 GEMV reads 4x fewer bytes) needs a GPU: see docs/weight_only.md and
benchmarks/w4a16_gemv.py. Here: the bytes, the accuracy of per-group vs per-channel scales on a
heavy-tailed weight, and the Pallas kernel (interpreted on CPU) against the XLA path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax.quant import weight_only as wo

ORDER = 11
TECHNIQUE = "W4A16 weight-only"


def run(seed: int):
  rows = []
  shapes = jax.eval_shape(lambda w: wo.pack_int4(w, 128), jax.ShapeDtypeStruct((8192, 8192), jnp.float32))
  packed_bytes = wo.Int4Weights(*shapes).nbytes()
  rows.append((TECHNIQUE, "bytes read by a batch-1 8192x8192 matmul: bf16 / int4 + bf16 scales (G=128)",
               f"{2 * 8192 ** 2 / 2**20:.0f} MiB / {packed_bytes / 2**20:.0f} MiB "
               f"({2 * 8192 ** 2 / packed_bytes:.2f}x fewer)"))
  # A heavy-tailed weight (Student-t, 3 dof; trained LLM weights have such outliers).
  kw, kx = jax.random.split(jax.random.PRNGKey(seed))
  w = jax.random.t(kw, 3.0, (1024, 256)) * 0.02
  x = jax.random.normal(kx, (4, 1024))
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  errs = []
  for gs in (None, 128, 32):
    y = np.asarray(wo.w4a16_matmul(x, wo.pack_int4(w, gs)), np.float64)
    errs.append(np.linalg.norm(y - ref) / np.linalg.norm(ref))
  rows.append((TECHNIQUE, "relative output error of x @ W_int4, heavy-tailed W: per-channel / G=128 / G=32",
               " / ".join(f"{e:.3f}" for e in errs)))
  p = wo.pack_int4(w[:128, :32], 64)
  xb = x[:1, :128].astype(jnp.bfloat16)
  yk = wo.w4a16_matmul(xb, p, impl="pallas", block_n=32)        # Pallas interpreter on CPU
  yx = wo.w4a16_matmul(xb, p, impl="xla")
  rows.append((TECHNIQUE, "Pallas GEMV kernel (interpreted) vs XLA dequantize-then-dot, relative difference",
               f"{float(jnp.linalg.norm(yk - yx) / jnp.linalg.norm(yx)):.1e}"))
  return rows
