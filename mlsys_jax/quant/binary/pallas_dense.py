"""A Pallas (Triton backend) kernel for the packed binary dense layer: XOR + popcount on uint32 words.

Bannink et al., MLSys 2021, Sec. 4 (LCE's binary kernels), ported to a GPU: for small batches
(1-8, the LCE setting of single-image inference) a binary dense layer is bound by reading its weights,
and packed weights are 16x fewer bytes than bf16 (8x fewer than int8). Each program reads a
``(block_n, W)`` slab of packed weights in ``block_k``-word steps, XORs it with the packed activations,
counts bits with ``lax.population_count`` and accumulates ``K - 2 popcount`` in int32: the same
numbers as :func:`mlsys_jax.quant.binary.packed_dense` (tested in Pallas interpret mode on CPU).

Triton's ``population_count`` lowering takes int32, so words are bitcast uint32 -> int32 (the bit
pattern, hence the count, is unchanged).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mlsys_jax._checks import check_choice, check_int

__all__ = ["pallas_packed_dense"]


def _kernel_rows(a_ref, w_ref, o_ref, *, k: int, block_k: int, num_k: int, batch: int):
  """One int32 accumulator row per batch element (batch is small and static)."""
  block_n = w_ref.shape[0]

  def body(i, accs):
    w = w_ref[:, pl.ds(i * block_k, block_k)]                       # (block_n, block_k)
    out = []
    for b in range(batch):
      a = a_ref[b, pl.ds(i * block_k, block_k)]                     # (block_k,)
      x = jnp.bitwise_xor(w, a[None, :])
      out.append(accs[b] + jnp.sum(jax.lax.population_count(x), axis=1))
    return tuple(out)

  accs = jax.lax.fori_loop(0, num_k, body, tuple(jnp.zeros((block_n,), jnp.int32) for _ in range(batch)))
  for b in range(batch):
    o_ref[b, :] = k - 2 * accs[b]


def _kernel_bcast(a_ref, w_ref, o_ref, *, k: int, block_k: int, num_k: int, batch: int):
  """A (batch, block_n, block_k) broadcast XOR per step."""
  block_n = w_ref.shape[0]

  def body(i, acc):
    w = w_ref[:, pl.ds(i * block_k, block_k)]                       # (block_n, block_k)
    a = a_ref[:, pl.ds(i * block_k, block_k)]                       # (batch, block_k)
    x = jnp.bitwise_xor(a[:, None, :], w[None, :, :])
    return acc + jnp.sum(jax.lax.population_count(x), axis=2)

  acc = jax.lax.fori_loop(0, num_k, body, jnp.zeros((batch, block_n), jnp.int32))
  o_ref[...] = k - 2 * acc


_KERNELS = {"rows": _kernel_rows, "bcast": _kernel_bcast}


@functools.partial(jax.jit, static_argnames=("k", "block_n", "block_k", "num_warps", "num_stages",
                                             "variant", "interpret"))
def pallas_packed_dense(a_words: jax.Array, w_words: jax.Array, k: int, block_n: int = 64,
                        block_k: int = 64, num_warps: int = 4, num_stages: int = 3,
                        variant: str = "rows", interpret: bool = False) -> jax.Array:
  """``(B, W)`` packed activations x ``(N, W)`` packed weights -> ``(B, N)`` int32 +-1 dot products.

  Args:
    a_words: uint32 ``(B, W)`` from :func:`pack_bits` (B is padded to a power of two inside).
    w_words: uint32 ``(N, W)``, e.g. ``pack_dense(kernel).words``; ``N % block_n == 0`` and
      ``W % block_k == 0``.
    k: the true reduction length (``<= 32 W``).
    block_n, block_k: tile of output channels and of words per step (powers of two).
    num_warps, num_stages: Triton launch parameters.
    variant: ``'rows'`` (one accumulator row per batch element) or ``'bcast'`` (one 3-D XOR).
    interpret: run in Pallas interpret mode (CPU tests).

  >>> from mlsys_jax.quant.binary import pack_bits
  >>> a = pack_bits(-jnp.ones((1, 64)))
  >>> w = pack_bits(jnp.ones((16, 64)))
  >>> pallas_packed_dense(a, w, 64, block_n=16, block_k=2, interpret=True)[0, :3]
  Array([-64, -64, -64], dtype=int32)
  """
  if a_words.dtype != jnp.uint32 or w_words.dtype != jnp.uint32:
    raise TypeError(f"expected uint32 packed words, got {a_words.dtype} and {w_words.dtype}.")
  if a_words.ndim != 2 or w_words.ndim != 2 or a_words.shape[1] != w_words.shape[1]:
    raise ValueError(f"expected a (B, W) and w (N, W), got {a_words.shape} and {w_words.shape}.")
  b, wn = a_words.shape
  n = w_words.shape[0]
  check_int("k", k, 1, 32 * wn)
  for name, v in (("block_n", block_n), ("block_k", block_k)):
    check_int(name, v, 1)
    if v & (v - 1):
      raise ValueError(f"{name} must be a power of two, got {v}.")
  if n % block_n or wn % block_k:
    raise ValueError(f"N={n} must be a multiple of block_n={block_n} and W={wn} of block_k={block_k}.")
  bp = 1 << max(0, (b - 1).bit_length())
  a = jax.lax.bitcast_convert_type(a_words, jnp.int32)
  w = jax.lax.bitcast_convert_type(w_words, jnp.int32)
  return _pallas_int32(jnp.pad(a, ((0, bp - b), (0, 0))), w, k, block_n, block_k, num_warps, num_stages,
                       variant, interpret)[:b]


def _pallas_int32(a, w, k, block_n, block_k, num_warps, num_stages, variant, interpret):
  """The pallas_call on int32 views: ``a (Bp, W)`` with Bp a power of two, ``w (N, W)``."""
  bp, wn = a.shape
  n = w.shape[0]
  check_choice("variant", variant, tuple(_KERNELS))
  kernel = functools.partial(_KERNELS[variant], k=k, block_k=block_k, num_k=wn // block_k, batch=bp)
  params = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu
    params["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((bp, n), jnp.int32),
      grid=(n // block_n,),
      in_specs=[pl.BlockSpec((bp, wn), lambda j: (0, 0)),
                pl.BlockSpec((block_n, wn), lambda j: (j, 0))],
      out_specs=pl.BlockSpec((bp, block_n), lambda j: (0, j)),
      interpret=interpret,
      **params,
  )(a, w)
