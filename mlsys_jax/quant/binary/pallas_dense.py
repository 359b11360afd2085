"""A Pallas (Triton backend) kernel for the packed binary dense layer: XOR + popcount on uint32 words.

Bannink et al., MLSys 2021, Sec. 4 (LCE's binary kernels), ported to a GPU: for small batches
(1-8, the LCE setting of single-image inference) a binary dense layer reads 16x fewer weight bytes
than bf16 (8x fewer than int8); at batch 1 the read bounds it, at batch 8 the popcounts (8 per weight
word, issued at 16 per clock per SM on an H100/H200) do. The grid splits the ``N`` output
channels into ``N / block_n`` programs (and optionally the ``W`` words of the reduction into ``splits``
parts, summed by XLA afterwards). Each program reads its ``(block_n, W / splits)`` slab of packed weights
as contiguous ``block_k``-word rows, XORs them with the packed activations (one register accumulator
per batch row), counts bits with ``lax.population_count`` and returns ``K - 2 popcount`` in int32:
the same numbers as :func:`mlsys_jax.quant.binary.packed_dense` (tested in Pallas interpret mode on CPU).

Variants of the inner loop (``variant``):

- ``'acc'``: one ``(block_n, block_k)`` int32 accumulator per batch element, summed along the words
  only once at the end (no cross-thread reduction inside the loop);
- ``'rows'``: the same, but each step reduces its popcounts to ``(block_n,)`` immediately;
- ``'rows2'``: as ``'rows'``, but the popcounts of two batch rows are added as ``lo + (hi << 16)``
  before the row sum (every sum fits in 15 bits), so one cross-thread reduction serves two rows;
- ``'bcast'``: one ``(B, block_n, block_k)`` broadcast XOR per step;
- ``'csa'``: as ``'acc'``, but each step splits its ``block_k`` words into 8 slices and adds them with
  a carry-save adder tree (:func:`_csa_count`): 4 popcounts per 8 words instead of 8, for 2 logic
  operations (one LOP3 each on NVIDIA) per adder (popcount issues at a quarter of the rate of the
  logic operations on NVIDIA GPUs);
- ``'csa4'``: the same with 4 slices: one full adder and a plain count, 3 popcounts per 4 words;
  ``'csa4r2'``: with the final row sums paired as in ``'rows2'``;
- ``'sub'``: each program counts its ``block_n`` outputs ``block_k`` rows at a time (unrolled, at most
  16 sub-tiles), each sub-tile whole weight rows (``W / splits`` words) against activations loaded once:
  every load is issued up front and the sub-tiles are counted in order, so a warp can start on its first
  rows while later ones are still arriving;
- ``'pipe'``: the same sub-tiles in a ``fori_loop``, so that the loads are paced instead of all issued at
  once: with ``num_stages >= 2`` the trip count is static, left to Triton's pipeliner (meant to prefetch
  ``num_stages - 1`` sub-tiles ahead through shared memory; in a local sm_90 compile these 2-4 step loops
  were fully unrolled with every load hoisted and no ``cp.async``, docs/binary.md); with
  ``num_stages = 1`` the loop carries the next sub-tile in registers (load ``r + 1``, count ``r``) and its
  trip count cannot be folded, so it stays a loop. (Why pace: with every load up front, each warp's rows
  arrive spread over the whole read, the lines of all programs interleaving in the memory system, so
  counting starts only near its end);
- ``'pipe4'``: ``'pipe'`` with each sub-tile's words in 4 slices counted as in ``'csa4'``.

Measured and removed (H200, 2026-12-02, docs/binary.md): ``'hs'`` and ``'hs2'`` (Harley-Seal with the
adders carried across loop steps); neither beat ``'rows'`` at any shape. ``'ntile'`` (20:17 UTC run:
8.3 us at best at 8192 batch 8, 256 programs) is ``'pipe'`` with ``num_stages >= 2``. The batch-loop
carry-save variants ``'csab'``/``'csab4'``/``'csab1'``/``'csabq'`` (weight slab loaded once, a loop over
batch rows; fewer POPC in SASS) lost on the device (binary_dense_h200_s7a.json, 8192 batch 8: best
``'csab4'`` 8.78 us against 7.96 us for the default ``'rows2'``).

Triton's ``population_count`` lowering takes int32, so the XOR of the uint32 words is bitcast to int32
inside the kernel (the bit pattern, hence the count, is unchanged).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mlsys_jax._checks import check_choice, check_int

__all__ = ["DenseConfig", "default_config", "kernel_applies", "kernel_self_test", "pallas_packed_dense"]

VARIANTS = ("acc", "rows", "rows2", "bcast", "csa", "csa4", "csa4r2", "sub", "pipe", "pipe4")
_SLICES = {"csa": 8, "csa4": 4, "csa4r2": 4}         # slices per step of the carry-save variants


class DenseConfig(NamedTuple):
  """Launch parameters of :func:`pallas_packed_dense` (see its arguments)."""
  variant: str = "acc"
  block_n: int = 32
  block_k: int = 64
  splits: int = 1
  num_warps: int = 4
  num_stages: int = 2


def default_config(b: int, n: int, wn: int) -> DenseConfig:
  """The tuned launch parameters for ``b`` activation rows (the entry of the smallest tuned batch
  ``>= b``), ``n`` outputs and ``wn`` words, with ``block_n``/``block_k`` shrunk to the largest powers
  of two that divide ``n`` and ``wn / splits`` (so that every shape fits; :func:`kernel_applies` says
  when it is worth launching).

  >>> default_config(1, 8192, 256).block_n <= 8192
  True
  """
  keys = sorted(_TUNED)
  cfg = _TUNED[next((t for t in keys if t >= b), keys[-1])]
  splits = cfg.splits if wn % cfg.splits == 0 else 1
  ws = wn // splits
  return cfg._replace(block_n=min(cfg.block_n, n & -n), block_k=min(cfg.block_k, ws & -ws), splits=splits)


# H200, 2026-12-02. Sweep 1 (binary_dense_h200_sweep1.json): 14 configurations at 8192/16384 x batch
# 1/8, wall time per launch, which at 8192 is the launch floor; the final run
# (binary_dense_h200_final.json) timed the 7 front runners by device time (profiler): batch 1 ->
# 'acc', 8 x 256 words, 2 warps (4.0 us at 8192, 10.3 us at 16384; 'rows' 64 x 128 took 5.1 / 10.4);
# batch 8 -> 'rows', 64 x 128 words, 8 warps, 3 stages (8.8 / 25.0 us; every other >= 30 us at 16384).
# Batches 2 and 4 (binary_dense_h200_b24.json, 14:12 UTC, device time): batch 2 -> 'acc' 8 x 256 (4.6 us
# at 8192, 11.7 at 16384; 'rows' 64 x 128 took 6.9 / 11.9); batch 4 -> 'rows' 64 x 128 (6.5 / 14.8 us;
# 'acc' 8 x 256 took 5.7 / 21.0, i.e. faster at 8192 but 1.4x slower at 16384).
# Batch 8 with split-K (binary_dense_h200_b8_splitk.json, 14:28 UTC, 11 configurations at 16384, 6 at 8192 where the others do not
# divide W = 256; device time):
# 'rows' 32 x 128 words, 2 K splits, 8 warps, 3 stages: 7.8 us at 8192, 22.4 at 16384 (the unsplit 64 x 128
# took 8.8 / 25.0): 4x the programs (half the rows each, 2 K splits), so more warps per SM to hide the popcount latency.
# H200 17:15 and 17:42 UTC (binary_dense_h200_b8_hs_sweep.json, binary_dense_h200_final2.json, device time):
# at batch 8 no carry-save form beats 'rows' 32 x 128 / 2 splits (7.7 us at 8192: 'hs' 8.6, 'csa' 8.8, 'hs2'
# 9.3; 16384: 22.6 us vs 'hs2' 25.8); at batch 4 that same configuration takes 5.2 us at 8192 and 14.2 at
# 16384 against 6.5 / 15.0 for 'rows' 64 x 128 (unsplit), so batches 3-4 use it too.
# H200 21:35 and 22:10 UTC (binary_dense_h200_b8_16384_rows2.json, binary_dense_h200_rows2_c1/_c2.json): batch
# 8 -> 'rows2' (same tile, two batch rows per cross-thread reduction): 16384 24.1 / 24.0 us against 26.3 / 26.0
# for 'rows' in the same runs; 8192 7.89 / 7.87 against 7.88 / 7.87 (a tie, two processes).
# Keys: the largest batch an entry is for (batch 3 uses the batch-4 entry, 5-7 the batch-8 one).
_TUNED = {1: DenseConfig("acc", 8, 256, 1, 2, 1), 2: DenseConfig("acc", 8, 256, 1, 2, 1),
          4: DenseConfig("rows", 32, 128, 2, 8, 3), 8: DenseConfig("rows2", 32, 128, 2, 8, 3)}

MAX_BATCH = 8      # one accumulator per activation row: larger batches go to XLA's path
MIN_BLOCK = 16     # N and W must be multiples of 16 for the kernel path


def kernel_applies(b: int, n: int, wn: int) -> bool:
  """Whether :func:`mlsys_jax.quant.binary.packed_dense` routes ``b`` rows x ``(n, wn)`` words to the
  kernel: ``1 <= b <= 8`` and ``n``, ``wn`` multiples of 16 (otherwise XLA's packed path runs).

  >>> kernel_applies(1, 8192, 256), kernel_applies(64, 8192, 256), kernel_applies(1, 100, 4)
  (True, False, False)
  """
  return 1 <= b <= MAX_BATCH and n % MIN_BLOCK == 0 and wn % MIN_BLOCK == 0


@functools.lru_cache(maxsize=None)
def kernel_self_test() -> bool:
  """Once per process: compile the kernel with the default launch parameters of every tuned batch group
  (B = 1, 3 and 8: ``acc``, split-K ``rows`` and ``rows2``; K not a multiple of 32) and compare each
  with XLA's packed path. On failure (a
  compile error or a mismatch) warn and return False: ``packed_dense`` then keeps the XLA path.

  >>> kernel_self_test()          # in the interpreter here; compiled through Triton on a GPU
  True
  """
  import warnings

  import numpy as np

  from mlsys_jax._compat import run_outside_traces

  def check():
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.integers(0, 2**32, size=(96, 32), dtype=np.uint64).astype(np.uint32))
    k = 32 * 32 - 7
    ok = jnp.bool_(True)
    for b in (1, 3, 8):
      a = jnp.asarray(rng.integers(0, 2**32, size=(b, 32), dtype=np.uint64).astype(np.uint32))
      ref = k - 2 * jnp.sum(jax.lax.population_count(a[:, None, :] ^ w[None]).astype(jnp.int32), -1)
      ok = ok & jnp.array_equal(pallas_packed_dense(a, w, k, interpret=not _on_gpu()), ref)
    return ok

  try:
    if not bool(run_outside_traces(jax.jit(check))):
      raise RuntimeError("kernel and XLA's packed path differ")
    return True
  except Exception as e:
    warnings.warn(f"mlsys_jax.quant.binary: the Pallas packed dense kernel failed its self-test "
                  f"({e!r:.300}); using XLA's packed path.", RuntimeWarning, stacklevel=3)
    return False


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _as_int32(x):
  return x if x.dtype == jnp.int32 else jax.lax.bitcast_convert_type(x, jnp.int32)


def _popc(x, a):
  """popcount(x XOR a) of uint32 (or int32-viewed) words, counted on the int32 bit pattern."""
  return jax.lax.population_count(_as_int32(jnp.bitwise_xor(x, a)))


def _csa(x, y, z):
  """Carry-save adder on bit vectors: ``x + y + z = sum + 2 carry`` bitwise (one LOP3 each on NVIDIA)."""
  t = jnp.bitwise_xor(x, y)
  return jnp.bitwise_xor(t, z), jnp.bitwise_or(jnp.bitwise_and(x, y), jnp.bitwise_and(t, z))


def _csa_count(xs):
  """``sum(popcount(x) for x in xs)`` (int32, elementwise) with fewer popcounts: bit vectors of equal
  weight are compressed three at a time by :func:`_csa` (a Wallace tree: the sum keeps the weight, the
  carry doubles it) until at most two of each weight are left; those are counted and scaled. 8 inputs:
  4 popcounts (ones twice, twos, fours); 4 inputs: 3; 3 inputs: 2.

  >>> xs = [jnp.uint32(v) for v in (0xFFFFFFFF, 7, 1 << 31, 12345)]
  >>> int(_csa_count(xs)) == sum(int(jax.lax.population_count(x)) for x in xs)
  True
  """
  by_weight, out = {1: list(xs)}, 0
  weight = 1
  while weight in by_weight:
    vs = by_weight.pop(weight)
    while len(vs) >= 3:
      s, c = _csa(vs.pop(0), vs.pop(0), vs.pop(0))
      vs.append(s)
      by_weight.setdefault(2 * weight, []).append(c)
    for v in vs:
      out = out + weight * jax.lax.population_count(_as_int32(v))
    weight *= 2
  return out


def _row_sums(xs, paired: bool):
  """``[jnp.sum(x, axis=1) for x in xs]``; ``paired``: two tensors per reduction as ``lo + (hi << 16)``
  (every row sum must be < 2^15: the callers' checks bound the words per program), half the
  cross-thread reductions for one shift-add per element."""
  if not paired or len(xs) == 1:
    return [jnp.sum(x, axis=1) for x in xs]
  out = []
  for lo, hi in zip(xs[0::2], xs[1::2]):
    both = jnp.sum(lo + jnp.left_shift(hi, 16), axis=1)
    out += [jnp.bitwise_and(both, 0xFFFF), jnp.right_shift(both, 16)]
  return out + [jnp.sum(x, axis=1) for x in xs[len(out):]]


def _kernel(a_ref, w_ref, o_ref, *, variant: str, k: int | None, block_k: int, num_k: int,
            batch: int, num_stages: int = 1):
  """Popcounts of one ``(block_n, num_k * block_k)`` weight slab against ``batch`` activation rows.

  Writes ``k - 2 acc`` (``k`` given: the whole reduction is in this program) or ``acc`` (split K)."""
  block_n = w_ref.shape[0]
  words = lambda i: pl.ds(i * block_k, block_k)

  if variant == "sub":                      # block_k = output rows per sub-tile; all words at once
    sub_n = block_k
    a_rows = [a_ref[b, :] for b in range(batch)]                     # hoisted: (W/splits,) each
    for r in range(block_n // sub_n):         # unrolled: every load issued up front, counted in order
      w = w_ref[pl.ds(r * sub_n, sub_n), :]                          # (sub_n, W/splits)
      for b in range(batch):
        acc = jnp.sum(_popc(w, a_rows[b][None, :]), axis=1)
        o_ref[b, pl.ds(r * sub_n, sub_n)] = acc if k is None else k - 2 * acc
    return

  if variant in ("pipe", "pipe4"):          # as 'sub', but a loop over the sub-tiles: loads paced
    sub_n, steps = block_k, block_n // block_k
    nsl = 4 if variant == "pipe4" else 1    # pipe4: words in 4 slices, counted by a carry-save tree
    ws = w_ref.shape[1] // nsl
    a_sl = [[a_ref[b, pl.ds(j * ws, ws)] for j in range(nsl)] for b in range(batch)]
    tile = lambda r: tuple(w_ref[pl.ds(r * sub_n, sub_n), pl.ds(j * ws, ws)] for j in range(nsl))

    def count(r, w):
      for b in range(batch):
        xs = [jnp.bitwise_xor(w[j], a_sl[b][j][None, :]) for j in range(nsl)]
        acc = jnp.sum(_csa_count(xs), axis=1)
        o_ref[b, pl.ds(r * sub_n, sub_n)] = acc if k is None else k - 2 * acc

    if num_stages > 1:                      # static trip count: left to Triton's pipeliner (see module doc)
      jax.lax.fori_loop(0, steps, lambda r, c: (count(r, tile(r)), c)[1], 0)
    else:                                   # one tile ahead in registers: load r + 1, count r
      def body(r, w):
        w_next = tile(jnp.minimum(r + 1, steps - 1))
        count(jnp.minimum(r, steps - 1), w)
        return w_next
      # A trip count the compiler cannot fold (the program id is read at run time; pid >> 30 is 0 for
      # any grid that fits in memory, and an extra step would only recount the last sub-tile), so that
      # the loop is not unrolled with every load hoisted to the top again.
      jax.lax.fori_loop(0, steps + jax.lax.shift_right_logical(pl.program_id(0), 30), body, tile(0))
    return

  if variant == "bcast":
    def body(i, acc):
      x = jnp.bitwise_xor(a_ref[:, words(i)][:, None, :], w_ref[:, words(i)][None, :, :])
      pc = jax.lax.population_count(_as_int32(x))
      return acc + jnp.sum(pc, axis=2)
    acc = jax.lax.fori_loop(0, num_k, body, jnp.zeros((batch, block_n), jnp.int32))
    o_ref[...] = acc if k is None else k - 2 * acc
    return

  if variant in _SLICES:                    # carry-save tree over the step's slices
    nsl = _SLICES[variant]
    sub = block_k // nsl
    sl = lambda i, j: pl.ds(i * block_k + j * sub, sub)

    def body(i, accs):
      ws = [w_ref[:, sl(i, j)] for j in range(nsl)]                  # (block_n, sub) each
      return tuple(accs[b] + _csa_count([jnp.bitwise_xor(ws[j], a_ref[b, sl(i, j)][None, :])
                                         for j in range(nsl)])
                   for b in range(batch))

    accs = jax.lax.fori_loop(0, num_k, body,
                             tuple(jnp.zeros((block_n, sub), jnp.int32) for _ in range(batch)))
    for b, acc in enumerate(_row_sums(accs, paired=variant.endswith("r2"))):
      o_ref[b, :] = acc if k is None else k - 2 * acc
    return

  wide = variant == "acc"

  def body(i, accs):
    w = w_ref[:, words(i)]                                          # (block_n, block_k) uint32
    pcs = [_popc(w, a_ref[b, words(i)][None, :]) for b in range(batch)]
    if wide:
      return tuple(acc + pc for acc, pc in zip(accs, pcs))
    # rows2: each row sum is <= 32 block_k < 2^15, so two fit in one int32 (one warp shuffle/REDUX
    # chain for two batch rows; the unpacking is exact).
    return tuple(acc + s for acc, s in zip(accs, _row_sums(pcs, paired=variant == "rows2")))

  shape = (block_n, block_k) if wide else (block_n,)
  accs = jax.lax.fori_loop(0, num_k, body, tuple(jnp.zeros(shape, jnp.int32) for _ in range(batch)))
  for b in range(batch):
    acc = jnp.sum(accs[b], axis=1) if wide else accs[b]
    o_ref[b, :] = acc if k is None else k - 2 * acc


def _check_config(n: int, wn: int, cfg: DenseConfig) -> None:
  check_choice("variant", cfg.variant, VARIANTS)
  for name in ("block_n", "block_k", "splits", "num_warps"):
    v = getattr(cfg, name)
    check_int(name, v, 1)
    if v & (v - 1):
      raise ValueError(f"{name} must be a power of two, got {v}.")
  check_int("num_stages", cfg.num_stages, 1)
  if cfg.variant == "rows2" and cfg.block_k > 512:
    raise ValueError(f"variant 'rows2' adds two row sums in 16-bit halves: block_k must be <= 512, got "
                     f"{cfg.block_k}.")
  if cfg.variant == "csa4r2" and wn // cfg.splits > 512:
    raise ValueError(f"variant 'csa4r2' adds two row sums in 16-bit halves: W / splits must be <= 512, got "
                     f"{wn // cfg.splits}.")
  if cfg.variant in _SLICES and cfg.block_k < _SLICES[cfg.variant]:
    raise ValueError(f"variant '{cfg.variant}' splits each step into {_SLICES[cfg.variant]} slices: block_k "
                     f"must be >= {_SLICES[cfg.variant]}, got {cfg.block_k}.")
  if cfg.variant in ("pipe", "pipe4"):
    parts = cfg.splits * (4 if cfg.variant == "pipe4" else 1)
    if n % cfg.block_n or wn % parts or cfg.block_n % cfg.block_k:
      raise ValueError(f"variant '{cfg.variant}' loops over block_k={cfg.block_k} output rows at a time: "
                       f"N={n} must be a multiple of block_n={cfg.block_n}, block_n of block_k and W={wn} of "
                       f"splits={cfg.splits} (x 4 slices for 'pipe4').")
    return
  if cfg.variant == "sub":
    if n % cfg.block_n or wn % cfg.splits or cfg.block_n % cfg.block_k or cfg.block_n // cfg.block_k > 16:
      raise ValueError(f"variant 'sub' counts block_k={cfg.block_k} output rows at a time (at most 16 "
                       f"sub-tiles per program): N={n} must be a multiple of block_n={cfg.block_n}, block_n "
                       f"of block_k (and block_n <= 16 block_k), W={wn} of splits={cfg.splits}.")
    return
  if n % cfg.block_n or wn % cfg.splits or (wn // cfg.splits) % cfg.block_k:
    raise ValueError(f"N={n} must be a multiple of block_n={cfg.block_n} and W={wn} of "
                     f"splits * block_k={cfg.splits} * {cfg.block_k}; pick smaller blocks "
                     "(default_config(b, n, w) fits them) or pad N and W.")


@functools.partial(jax.jit, static_argnames=("k", "variant", "block_n", "block_k", "splits", "num_warps",
                                             "num_stages", "interpret"))
def pallas_packed_dense(a_words: jax.Array, w_words: jax.Array, k: int, variant: str | None = None,
                        block_n: int | None = None, block_k: int | None = None, splits: int | None = None,
                        num_warps: int | None = None, num_stages: int | None = None,
                        interpret: bool = False) -> jax.Array:
  """``(B, W)`` packed activations x ``(N, W)`` packed weights -> ``(B, N)`` int32 +-1 dot products.

  Args:
    a_words: uint32 ``(B, W)`` from :func:`pack_bits` (B is padded to a power of two inside; the
      kernel keeps one accumulator per row, so it is meant for B <= 8 or so).
    w_words: uint32 ``(N, W)``, e.g. ``pack_dense(kernel).words``; ``N % block_n == 0`` and
      ``W % (splits * block_k) == 0``.
    k: the true reduction length (``<= 32 W``).
    variant: ``'acc'``, ``'rows'``, ``'rows2'``, ``'bcast'``, ``'csa'``, ``'csa4'``, ``'csa4r2'``,
      ``'sub'``, ``'pipe'`` or ``'pipe4'`` (module docstring; for ``'sub'`` and ``'pipe*'`` ``block_k``
      is the number of OUTPUT rows per sub-tile).
    block_n, block_k: tile of output channels and of words per loop step (powers of two).
    splits: split the words into this many parts (more programs; XLA sums the parts).
    num_warps, num_stages: Triton launch parameters.
    interpret: run in Pallas interpret mode (CPU tests).
    Parameters left None come from :func:`default_config`.

  >>> from mlsys_jax.quant.binary import pack_bits
  >>> a = pack_bits(-jnp.ones((1, 64)))
  >>> w = pack_bits(jnp.ones((16, 64)))
  >>> pallas_packed_dense(a, w, 64, interpret=True)[0, :3]
  Array([-64, -64, -64], dtype=int32)
  """
  if a_words.dtype != jnp.uint32 or w_words.dtype != jnp.uint32:
    raise TypeError(f"expected uint32 packed words, got {a_words.dtype} and {w_words.dtype}.")
  if a_words.ndim != 2 or w_words.ndim != 2 or a_words.shape[1] != w_words.shape[1]:
    raise ValueError(f"expected a (B, W) and w (N, W), got {a_words.shape} and {w_words.shape}.")
  b, wn = a_words.shape
  n = w_words.shape[0]
  check_int("k", k, 1, 32 * wn)
  given = dict(variant=variant, block_n=block_n, block_k=block_k, splits=splits, num_warps=num_warps,
               num_stages=num_stages)
  cfg = default_config(b, n, wn)._replace(**{f: v for f, v in given.items() if v is not None})
  _check_config(n, wn, cfg)
  bp = 1 << max(0, (b - 1).bit_length())
  a = a_words if bp == b else jnp.pad(a_words, ((0, bp - b), (0, 0)))
  return packed_dot_call(a, w_words, k, cfg, interpret)[:b]


def packed_dot_call(a: jax.Array, w: jax.Array, k: int, cfg: DenseConfig, interpret: bool = False):
  """The pallas_call (plus the split-K sum) on uint32 ``a (Bp, W)``, Bp a power of two, ``w (N, W)``
  (or both viewed as int32); no argument checks (use :func:`pallas_packed_dense`)."""
  bp, wn = a.shape
  n = w.shape[0]
  ws = wn // cfg.splits                     # words per split
  kernel = functools.partial(_kernel, variant=cfg.variant, k=k if cfg.splits == 1 else None,
                             block_k=cfg.block_k, num_k=ws // cfg.block_k, batch=bp, num_stages=cfg.num_stages)
  params = {}
  if not interpret:
    from mlsys_jax._compat import triton_compiler_params
    cp = triton_compiler_params(cfg.num_warps, cfg.num_stages)
    if cp is not None:
      params["compiler_params"] = cp
  if cfg.splits == 1:
    out_shape = jax.ShapeDtypeStruct((bp, n), jnp.int32)
    out_spec = pl.BlockSpec((bp, cfg.block_n), lambda j, s: (0, j))
  else:
    out_shape = jax.ShapeDtypeStruct((cfg.splits, bp, n), jnp.int32)
    out_spec = pl.BlockSpec((None, bp, cfg.block_n), lambda j, s: (s, 0, j))
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(n // cfg.block_n, cfg.splits),
      in_specs=[pl.BlockSpec((bp, ws), lambda j, s: (0, s)),
                pl.BlockSpec((cfg.block_n, ws), lambda j, s: (j, s))],
      out_specs=out_spec,
      interpret=interpret,
      **params,
  )(a, w)
  if cfg.splits > 1:
    out = k - 2 * jnp.sum(out, axis=0)
  return out
