"""Regenerate the jax-compiled part of this HLO corpus: ``python3 tests/data/hlo/generate.py``.

Writes ``jax_<name>.hlo`` (optimized CPU HLO from ``jax.jit(f).lower(...).compile().as_text()``, with
metadata stripped to keep the files small) for a spread of programs: matmul, conv, reductions, while,
conditional, scan, sort, gather/scatter, cumsum, FFT, an 8-device all-reduce. The hand-written files
(``hand_*.hlo`` accepted by XLA's parser, ``bad_*.hlo`` rejected by it) are written by hand.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mlsys_jax.cost.hlo import strip_metadata  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def programs():
  x, m = jnp.ones((8, 16)), jnp.ones((16, 4))
  img, w = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  yield "matmul_tanh", lambda a, b: jnp.tanh(a @ b), (x, m)
  yield "conv_relu", lambda a, b: jax.nn.relu(jax.lax.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))), (img, w)
  yield "softmax", lambda a: jax.nn.softmax(a, axis=-1), (x,)
  yield "while", lambda a: jax.lax.fori_loop(0, 3, lambda i, c: jnp.sin(c) + i, a), (x,)
  yield "cond", lambda a: jax.lax.cond(a.sum() > 0, jnp.sin, jnp.cos, a), (x,)
  yield "scan", lambda a: jax.lax.scan(lambda c, r: (c + r, c * r), a[0], a)[1], (x,)
  yield "sort_topk", lambda a: (jnp.sort(a, axis=1), jax.lax.top_k(a, 3)[0]), (x,)
  yield "gather_scatter", lambda a, i: a.at[i].add(a[i] * 2.0), (x, jnp.arange(4))
  yield "cumsum_argmax", lambda a: (jnp.cumsum(a, 0), jnp.argmax(a, 1)), (x,)
  yield "fft", lambda a: jnp.abs(jnp.fft.rfft(a, axis=1)), (x,)
  yield "maxpool", lambda a: jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                                   (1, 2, 2, 1), "VALID"), (img,)
  yield "int_bits", lambda a: (a.astype(jnp.int32) >> 1) ^ 3, (x,)
  if jax.device_count() >= 8:
    yield "pmap_psum", jax.pmap(lambda a: jax.lax.psum(a, "i"), axis_name="i"), (jnp.ones((8, 4)),)


def main():
  for name, fn, args in programs():
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    text = strip_metadata(jitted.lower(*args).compile().as_text())
    with open(os.path.join(HERE, f"jax_{name}.hlo"), "w") as f:
      f.write(text.rstrip() + "\n")
    print(name, len(text))


if __name__ == "__main__":
  main()
