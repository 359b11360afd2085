"""Weight-only int4 (W4A16) GEMV for small batches as a Pallas (Triton backend) kernel.

At batch 1-16 a matmul ``x (B, K) @ W (K, N)`` is bound by reading W: bf16 weights are 2 bytes per
element, packed int4 codes 0.5 bytes plus a per-group scale. The kernel reads the packed words once,
unpacks them in registers, multiplies in float32 and applies the per-group scales (VS-Quant's
per-vector scaling along K: Dai et al., "VS-Quant", MLSys 2021, Sec. 3, with one float scale per V = G
elements instead of the two-level integer scales):

    y[b, n] = sum_g  s[g, n] * sum_{k in group g} x[b, k] * c[k, n],     c in [-7, 7].

Layout (see :func:`mlsys_jax.quant.weight_only.pack_int4`): ``words (K/8, N)`` uint32, K cut in blocks
of 128; within block ``t``, word row ``16 t + j`` holds in nibble ``i`` (bits ``4i .. 4i+3``) the code of
element ``k = 128 t + 16 i + j`` plus 8 (offset binary, 1..15). So nibble plane ``i`` of a block is a
``(16, N)`` slab of codes whose activations ``x[:, 128 t + 16 i : + 16]`` are contiguous.

Unpacking uses the exponent trick: ``bitcast_f32(((w >> 4i) & 15) | 0x4B000000) = 2^23 + u`` exactly, so
``c = that - (2^23 + 8)`` is the signed code as a float in three integer/float instructions (a shift, one
and-or, one subtraction) without an int -> float conversion instruction.

Variants ``'fma_shift'``/``'dot_shift'`` unpack exactly so; ``'fma'``/``'dot'`` skip the per-plane shift
(see :func:`_unpack_plane`): the nibble is masked in place, ``f = 2^23 + u 16^j`` (planes 0-4 in ``w``,
planes 5-7 in ``w >> 12``, one shift per word), and one exact fused multiply-add,
``f 16^-j - (2^(23-4j) + 8) = c``, unpacks it. Inner products:
  - ``'fma*'``: for each batch row, ``acc (16, block_n) += c * x[b, plane][:, None]`` on the CUDA cores
    (float32 products and sums), reduced over the 16 rows once at the end. Per weight at batch 1: one
    and-or, one unpacking FMA, one product FMA (4.0-4.2 SASS instructions in the sm_90 loop with the
    loads and the activations).
  - ``'dot*'``: ``x[:, plane] (16, 16) @ c (16, block_n)`` on the tensor cores (codes are exact in bf16;
    the batch is padded to 16 rows, batch 1 by repeating the row in registers), float32 accumulation;
    only the real rows are stored (5.8-6.2 SASS instructions per weight: the unpacked operand goes
    through shared memory).
  - ``'fmad'``: the CUDA-core kernel without any unpacking arithmetic: the nibble masked in place at bit
    ``pos`` (< 24) IS a float32, ``u 2^(pos - 149)`` (denormal; exact), so per weight one AND and one
    FMA with the activation pre-scaled by ``2^(126 - e - pos)`` (``|x| < 2^e`` over the program); the
    offset 8 enters as minus 8 times the activations' sum per group, and ``2^(e + 23)`` undoes the
    scaling at the end. Needs denormals kept (the GPU default; XLA on the CPU flushes them, so the
    interpreter forms the same products from ``u 2^pos`` by an int -> float conversion).
  - ``'fmadr'`` (``'fmadr2'``, ``'fmadr4'``): ``'fmad'`` with the exponent ``e`` per plane row ``j``
    (the elementwise maximum of the program's activation planes, ``|x[16 p + j]| < 2^e_j`` over planes
    ``p``) instead of one over the program (a block-wide reduction: a barrier in the prologue); the
    accumulators of row ``j`` are scaled back by ``2^(e_j + 23)`` (exact) before the sum over the rows.
    One step per program (the scaling must hold over all of a row's planes).
  - ``'dotb'``: ``'dot'`` with the codes made in bf16 by 16-bit operations (``(u | 0x4300) - 136``, exact),
    which lets Triton load the words straight into the tensor-core operand layout (no shared-memory
    round trip per plane for the weights).
Per group the partial sums are multiplied by the group's scale row and added to the output accumulator.

Grid: ``(N / block_n, split_k)``; with ``split_k > 1`` each program covers ``K / split_k`` and the partial
outputs are summed by XLA afterwards, or (``atomic=True``) added by the kernel itself with float32
atomic adds into a zero-initialized output (one launch; summation order then varies between runs). Off the GPU the kernel runs in Pallas's interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mlsys_jax._checks import check_choice, check_int
from mlsys_jax._compat import triton_compiler_params
from mlsys_jax.quant import _triton_hooks

__all__ = ["BLOCK_K", "VARIANTS", "default_config", "int4_gemv", "on_gpu"]

BLOCK_K = 128                  # K elements per packing block: 16 uint32 rows x 8 nibbles
PLANE = 16                     # K elements per nibble plane
VARIANTS = ("fma", "fmad", "fmad2", "fmad4", "fmadr", "fmadr2", "fmadr4", "fma_shift", "dot", "dotb",
            "dot_shift")
_MAGIC_I = 0x4B000000          # bit pattern of 2^23
_MAGIC_F = 8388616.0           # 2^23 + 8: removes the exponent and the +8 offset of the codes

# The launch parameters used when none are given, by batch, from the H200 sweeps (jax 0.11.2,
# benchmarks/w4a16_gemv.py, device time per launch from the profiler; docs/weight_only.md).
# Batch 1 (runs s10a and s10b of 2026-12-03): 'fmad2' in ONE-STEP programs: each program covers
# blocks_per_step = 2 K blocks (8 KiB of words at block_n 64), split_k = K's blocks / 2 (at most
# MAX_SPLIT_B1), step 0's loads issued ahead of the activation prologue (peel; all weight loads before
# the first barrier in the sm_90a SASS, where a looped program has ptxas issue part of them between the
# FMAs), the split-K sum by relaxed atomic adds (REDG, no L1 flush): 14.9 us at 8192x8192 against 17.7
# us for the previous default ('fmad:64:2:8', acquire-release adds), 42.8 us at 8192x28672 (51.2).
# Where K's blocks do not allow one step (more than MAX_SPLIT_B1 * 2 blocks, or splits limited by the
# scale groups) the program loops, without the peel (it costs registers in a loop).
# Batch 2: 'fma' with split_k for about 2048 programs (the best or within 1% at batch 2 in both runs
# of 2026-12-02: a second FMA per weight outweighs 'fmad's saving). Batch 3-16: the tensor-core
# kernel, dot:256:1:4:8:3 with prefetch (best at batch 4 and 16 of 8192x8192, within 5% at 8192x28672).
_DEFAULT_B1 = dict(variant="fmad2", block_n=64, blocks_per_step=2, split_k=32, num_warps=2,
                   num_stages=3, prefetch=False, atomic=True, peel=True, relaxed=True)
_DEFAULT_SMALL = dict(variant="fma", block_n=64, blocks_per_step=2, split_k=16, num_warps=4,
                      num_stages=3, prefetch=False)
_DEFAULT_LARGE = dict(variant="dot", block_n=256, blocks_per_step=1, split_k=4, num_warps=8,
                      num_stages=3, prefetch=True)
SMALL_BATCH = 2                # batches up to this use the CUDA-core kernels
TARGET_PROGRAMS = {2: 2048}    # batch 2: split_k = the power of two reaching this, at most 16
MAX_SPLIT_B1 = 32


def on_gpu() -> bool:
  """Whether the default JAX backend is a GPU (where the kernel compiles through Triton)."""
  return jax.default_backend() == "gpu"


# ``loop_stages=n``: Triton's pipeliner stages only loads that feed a ``dot`` unless the loop carries
# ``tt.num_stages`` (Pallas emits none); the kernel is named ``..._ls<n>`` and ``_triton_hooks`` sets it.
LOOP_STAGES_HOOK = _triton_hooks.HOOK


def _pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def default_config(batch: int, k: int, n: int, groups: int = 1 << 30) -> dict:
  """Launch parameters for ``(batch, K) @ (K, N)`` with ``groups`` scale groups along K: the tuned
  defaults (batch 1: one-step programs, ``split_k`` = K's blocks over ``blocks_per_step``; batch 2:
  ``split_k`` per shape, see ``TARGET_PROGRAMS``), ``block_n`` shrunk for narrow N (batch 1 falls back
  to ``'fmad'`` below 32 columns), ``split_k`` and ``blocks_per_step`` halved until they divide K's
  128-blocks (and ``split_k`` the groups).

  Example:
    >>> [(c["variant"], c["split_k"], c["blocks_per_step"]) for c in (default_config(1, 8192, n)
    ...                                                           for n in (8192, 28672))]
    [('fmad2', 32, 2), ('fmad2', 32, 2)]
    >>> default_config(2, 8192, 8192)["variant"], default_config(16, 8192, 8192)["variant"]
    ('fma', 'dot')
  """
  small = batch <= SMALL_BATCH
  cfg = dict(_DEFAULT_B1 if batch == 1 else _DEFAULT_SMALL if small else _DEFAULT_LARGE)
  cfg["block_n"] = min(cfg["block_n"], max(16, _pow2(n)))
  nb = k // BLOCK_K
  if batch == 1:
    if cfg["block_n"] < 32:
      cfg["variant"] = "fmad"                     # 'fmad2' needs two sub-tiles of >= 16 columns
    cfg["split_k"] = min(MAX_SPLIT_B1, _pow2(max(1, nb // cfg["blocks_per_step"])))
  elif small:
    split = _pow2(-(-TARGET_PROGRAMS[batch] // -(-n // cfg["block_n"])))
    cfg["split_k"] = min(cfg["split_k"], max(split, 1))
  while cfg["split_k"] > 1 and (nb % cfg["split_k"] or groups % cfg["split_k"]):
    cfg["split_k"] //= 2
  while cfg["blocks_per_step"] > 1 and (nb // cfg["split_k"]) % cfg["blocks_per_step"]:
    cfg["blocks_per_step"] //= 2
  if batch == 1:
    cfg["peel"] = nb == cfg["split_k"] * cfg["blocks_per_step"]     # one step per program
  return cfg


def _dn_parts(variant: str) -> tuple[bool, int]:
  """('fmad*' variants) whether the activation scaling is per row (``'fmadr*'``) and the column sub-tiles."""
  rows = variant.startswith("fmadr")
  tail = variant[5:] if rows else variant[4:]
  return rows, int(tail) if tail else 1


def _unpack_plane(words, hi, i: int, shift: bool, magic):
  """Nibble plane ``i`` of uint32 words as float32 codes ``c`` (exact).

  ``shift``: ``((w >> 4i) & 15) | 2^23 bits`` minus ``2^23 + 8`` gives ``c``. Otherwise (no per-plane
  shift): the nibble is masked in place, ``f = bitcast((src & (15 << 4j)) | 2^23 bits) = 2^23 + u 16^j``
  exactly (the nibble stays inside the 23 mantissa bits: ``j <= 4``), with ``src = w`` for planes 0-4
  (``j = i``) and ``src = hi = w >> 12`` for planes 5-7 (``j = i - 3``, bits 8-19); then one fused
  multiply-add ``f 16^-j - (2^(23-4j) + 8) = c`` (exact: both terms are ``f`` and ``2^23 + 8 16^j``
  scaled by a power of two). ``magic`` is the ``2^23`` bit pattern (read from memory by the kernel).
  """
  if shift:
    u = words if i == 0 else jax.lax.shift_right_logical(words, jnp.uint32(4 * i))
    bits = jnp.bitwise_or(jnp.bitwise_and(u, jnp.uint32(15)), magic)
    return jax.lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(_MAGIC_F)
  src, j = (words, i) if i <= 4 else (hi, i - 3)
  bits = jnp.bitwise_or(jnp.bitwise_and(src, jnp.uint32(15 << (4 * j))), magic)
  f = jax.lax.bitcast_convert_type(bits, jnp.float32)
  if j == 0:
    return f - jnp.float32(_MAGIC_F)
  return f * jnp.float32(16.0 ** -j) - jnp.float32(2.0 ** (23 - 4 * j) + 8)


def _gemv_kernel(x_ref, w_ref, s_ref, m_ref, *refs, variant: str, batch: int, blocks_per_step: int,
                 steps: int, group_size: int, precision, prefetch: bool, atomic: bool,
                 denormals: bool = True, peel: bool = False, evict: bool = False, interpret: bool = False):
  o_ref = refs[-1]                 # with atomic=True refs = (zeros, out): the same buffer (aliased)
  bn = w_ref.shape[1]
  step_k = BLOCK_K * blocks_per_step
  planes = step_k // PLANE
  per_group = min(group_size // PLANE, planes)     # consecutive planes sharing one scale row
  groups_per_step = planes // per_group
  dot = variant.startswith("dot")
  shift = variant.endswith("_shift")
  dn = variant.startswith("fmad")
  # 'fmad2'/'fmad4': the block_n columns as 2/4 sub-tiles loaded separately; equal shapes get equal
  # register layouts, so each activation a thread loads, converts and scales serves 2/4 times the weights.
  rowscale, nsub = _dn_parts(variant) if dn else (False, 1)
  sub = bn // nsub
  # The 2^23 bit pattern is read from memory (m_ref holds it), not written as a literal: the bit mask
  # is then the and-or's one immediate and the pattern stays in one register, where a literal made the
  # compiler re-materialize a constant before about every second and-or (SASS of sm_90).
  magic = m_ref[0]
  dnp = {}

  def dn_setup(xs=None):
    """The 'fmad' scaling constants, from this program's activations (after step 0's loads are issued).
    'fmadr*' (``xs``: the one step's activation planes): per batch row b and plane row j, from the planes'
    elementwise maximum (no reduction across threads, so no barrier); arrays of shape (16,) per b."""
    if rowscale:
      ex = []
      for b in range(batch):
        amax = functools.reduce(jnp.maximum, [jnp.abs(xp[b].astype(jnp.float32)) for xp in xs])   # (16,)
        ex.append(amax)
      return dn_scales(ex)
    return dn_scales([jnp.max(jnp.abs(x_ref[...].astype(jnp.float32)))])

  def dn_scales(amaxes):
    """The constants from the activations' ranges ``amaxes`` (one per batch row, arrays (16,); or one
    scalar for the whole program)."""
    # 'fmad': the masked nibble IS the float, u 2^(pos - 149) (a denormal, or for bit 23 the smallest
    # normal exponent, exact either way); each activation is scaled by 2^(126 - e - pos) with |x| < 2^e
    # over this program's activations, so every product is u x 2^(-23 - e) exactly and the sums run in
    # that scaled domain; 2^(e + 23) undoes it at the end. Per weight: one AND and one FMA.
    pow2 = lambda ex: jax.lax.bitcast_convert_type(jax.lax.shift_left(ex + 127, 23), jnp.float32)
    lg = max(0, (min(group_size // PLANE, blocks_per_step * 8) - 1).bit_length())   # planes per sum < 2^lg
    xscale, cscale, back, f8 = [], [], [], []
    for amax in amaxes:
      e = jnp.clip(jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(amax, jnp.int32), 23) - 126,
                   -1, 128) if denormals or rowscale else jnp.zeros(jnp.shape(amax), jnp.int32) - 23
      # Where denormals are flushed (XLA on the CPU, i.e. the interpreter) the same products are formed
      # unscaled (e = -23) as (u 2^pos, an exact int -> float conversion) times x 2^-pos: no denormal
      # ('fmadr*': u 2^pos times x 2^(-23 - e - pos) with the rows' e, the kernel's scaled domain).
      xscale.append({pos: pow2(126 - e - pos) if denormals else pow2(-23 - e - pos) for pos in range(0, 24, 4)})
      # The code offset 8: x summed over a group's planes (< 2^(e + lg)), scaled, times 8 2^(lg - 149).
      cscale.append(pow2(126 - e - lg) if denormals else pow2(-23 - e - lg))
      f8.append(jax.lax.bitcast_convert_type(e * 0 + (8 << lg), jnp.float32) if denormals else   # (traced)
                jnp.float32(8 << lg))
      back.append((pow2((e + 23) // 2), pow2(e + 23 - (e + 23) // 2)))
    if not rowscale:   # one set of scalars for every batch row
      xscale, cscale, back, f8 = xscale * batch, cscale * batch, back * batch, f8 * batch
    dnp.update(xscale=xscale, cscale=cscale, f8=f8, back=back)


  def mult(x, m):
    return x if isinstance(x, int) else pl.multiple_of(x, m)

  def wload(ref, *idx):
    """A weight block: ``evict`` streams it with the L2 evict-first policy (read once; the interpreter
    loads it plainly)."""
    if not evict:
      return ref[idx]
    return plgpu.load(ref.at[idx], **({} if interpret else dict(eviction_policy="evict_first")))

  def load_x(it):
    """The activation planes of step ``it``."""
    k0 = mult(it * step_k, step_k)
    xs = []
    for p in range(planes):
      kk = mult(k0 + p * PLANE, PLANE)
      xs.append(x_ref[:, pl.ds(kk, PLANE)] if dot else
                [x_ref[b, pl.ds(kk, PLANE)] for b in range(batch)])
    return xs

  def load(it, with_x=True):
    """Everything step ``it`` reads: its weight words, its scale rows and (``with_x``) its activation
    planes."""
    k0 = mult(it * step_k, step_k)
    if nsub > 1:
      words = [[wload(w_ref, pl.ds(mult((it * blocks_per_step + u) * PLANE, PLANE), PLANE), pl.ds(c * sub, sub))
                for c in range(nsub)] for u in range(blocks_per_step)]
      srows = [[s_ref[pl.ds(jax.lax.div(k0 + q * per_group * PLANE, jnp.int32(group_size)), 1),
                      pl.ds(c * sub, sub)] for c in range(nsub)] for q in range(groups_per_step)]
    else:
      words = [wload(w_ref, pl.ds(mult((it * blocks_per_step + u) * PLANE, PLANE), PLANE), slice(None))
               for u in range(blocks_per_step)]
      srows = [s_ref[pl.ds(jax.lax.div(k0 + q * per_group * PLANE, jnp.int32(group_size)), 1), :]
               for q in range(groups_per_step)]
    return words, srows, (load_x(it) if with_x else None)

  def compute_dn(acc, loaded):
    """acc: ``batch * nsub`` tiles ``(16, sub)``, index ``b * nsub + c``."""
    words, srows, xs = loaded
    if nsub == 1:
      words, srows = [[w] for w in words], [[r] for r in srows]
    his = [[jax.lax.shift_right_logical(w, jnp.uint32(8)) for w in wu] for wu in words]   # nibbles 6, 7
    for q in range(groups_per_step):
      ps = range(q * per_group, (q + 1) * per_group)
      xv = {(p, b): xs[p][b].astype(jnp.float32) for p in ps for b in range(batch)}
      xsc = {(p, b): xv[p, b] * dnp["xscale"][b][4 * (p % 8) if p % 8 <= 5 else 4 * (p % 8) - 8]
             for p in ps for b in range(batch)}
      part = []
      for b in range(batch):        # start from minus the offset: 8 x 2^(-23 - e) summed over the planes
        xr = functools.reduce(lambda a, v: a + v, [xv[p, b] for p in ps])
        corr = -((xr * dnp["cscale"][b]) * dnp["f8"][b])[:, None]
        part += [jnp.broadcast_to(corr, (PLANE, sub))] * nsub
      for p in ps:
        u, i = divmod(p, 8)
        pos = 4 * i if i <= 5 else 4 * i - 8
        for c in range(nsub):
          bits = jnp.bitwise_and(words[u][c] if i <= 5 else his[u][c], jnp.uint32(15 << pos))
          f = (jax.lax.bitcast_convert_type(bits, jnp.float32) if denormals else
               bits.astype(jnp.int32).astype(jnp.float32))
          for b in range(batch):
            part[b * nsub + c] = part[b * nsub + c] + f * xsc[p, b][:, None]
      srow = [r.astype(jnp.float32) for r in srows[q]]
      acc = [a + pt * srow[t % nsub] for t, (a, pt) in enumerate(zip(acc, part))]
    return acc

  def compute(acc, loaded):
    if dn:
      return compute_dn(acc, loaded)
    words, srows, xs = loaded
    his = [None if shift else jax.lax.shift_right_logical(w, jnp.uint32(12)) for w in words]
    for q in range(groups_per_step):
      part = None
      for p in range(q * per_group, (q + 1) * per_group):
        u, i = divmod(p, 8)
        if variant == "dotb":        # bf16 codes from 16-bit operations (exact): 128 + u, minus 136
          u16 = jnp.bitwise_and(jax.lax.shift_right_logical(words[u], jnp.uint32(4 * i)) if i else words[u],
                                jnp.uint32(15)).astype(jnp.uint16)
          c = jax.lax.bitcast_convert_type(jnp.bitwise_or(u16, jnp.uint16(0x4300)), jnp.bfloat16)
          c = c - jnp.bfloat16(136)
        else:
          c = _unpack_plane(words[u], his[u], i, shift, magic)             # (16, bn) f32 codes
        if dot:
          xp = xs[p]                                                     # (Bx, 16)
          if xp.shape[0] < PLANE:      # batch 1: the row repeated to the smallest tensor-core tile
            xp = jnp.broadcast_to(xp, (PLANE, PLANE))
          pr = jax.lax.dot(xp, c.astype(xp.dtype), precision=precision,
                           preferred_element_type=jnp.float32)         # (Bp, bn)
          part = pr if part is None else part + pr
        else:
          pr = []
          for b in range(batch):
            xb = xs[p][b].astype(jnp.float32)
            pr.append(c * xb[:, None])
          part = pr if part is None else [a + v for a, v in zip(part, pr)]
      srow = srows[q].astype(jnp.float32)                              # (1, bn)
      acc = acc + part * srow if dot else [a + pt * srow for a, pt in zip(acc, part)]
    return acc

  mrows = max(PLANE, x_ref.shape[0])
  init = (jnp.zeros((mrows, bn), jnp.float32) if dot else
          [jnp.zeros((PLANE, sub), jnp.float32) for _ in range(batch * nsub)] if dn else
          [jnp.zeros((PLANE, bn), jnp.float32) for _ in range(batch)])
  if prefetch == 2:
    # Only the activations one step ahead in registers (the weights and scales are left to Triton's
    # pipeliner with loop_stages): a 16-element bf16 slice in a row-sliced layout is one element per
    # thread, too narrow (< 32 bits) for cp.async, so without this every step waits for its L2 loads.
    def body(it, carry):
      acc, xs = carry
      nx = load_x(jax.lax.min(it + 1, jnp.int32(steps - 1)))
      words, srows, _ = load(it, with_x=False)
      return compute(acc, (words, srows, xs)), nx
    xs0 = load_x(0)
    if dn:
      dn_setup()
    acc, _ = jax.lax.fori_loop(0, steps, body, (init, xs0))
  elif prefetch:
    # Software pipelining in registers: issue the loads of step it + 1 before computing step it, so
    # the memory latency hides behind the unpacking and the products (the last step reloads itself:
    # peeling it off instead doubled the registers, 96 -> 226 at fma:64:2, in the sm_90 SASS).
    def body(it, carry):
      acc, cur = carry
      nxt = load(jax.lax.min(it + 1, jnp.int32(steps - 1)))
      return compute(acc, cur), nxt
    cur = load(0)
    if dn:
      dn_setup()
    acc, _ = jax.lax.fori_loop(0, steps, body, (init, cur))
  elif rowscale:
    # 'fmadr*': one step (checked by int4_gemv); the scaling from that step's activation planes.
    cur = load(0)
    dn_setup(cur[2])
    acc = compute(init, cur)
  elif dn and peel:
    # Step 0 peeled: its loads are issued before the activations' range is reduced over the program
    # (a barrier), so the first weights are in flight during that prologue.
    cur = load(0)
    dn_setup()
    acc = compute(init, cur)
    acc = jax.lax.fori_loop(1, steps, lambda it, acc: compute(acc, load(it)), acc)
  else:
    if dn:
      dn_setup()
    acc = jax.lax.fori_loop(0, steps, lambda it, acc: compute(acc, load(it)), init)
  if dn:
    for t, a in enumerate(acc):
      b, c = divmod(t, nsub)
      bk = dnp["back"][b]
      if rowscale:   # each plane row back to the common scale (exact), then the sum over the rows
        v = jnp.sum((a * bk[0][:, None]) * bk[1][:, None], axis=0)
      else:
        v = (jnp.sum(a, axis=0) * bk[0]) * bk[1]
      if atomic:
        plgpu.atomic_add(o_ref, (pl.ds(b, 1), pl.ds(c * sub, sub)), v[None, :])
      else:
        o_ref[b, pl.ds(c * sub, sub)] = v.astype(o_ref.dtype)
  elif atomic:                     # split K in one launch: add the partial rows into the float32 output
    if dot and batch == mrows:
      plgpu.atomic_add(o_ref, (pl.ds(0, batch), pl.ds(0, bn)), acc)
    else:
      rows = jax.lax.broadcasted_iota(jnp.int32, acc.shape, 0) if dot else None
      for b in range(batch):
        v = jnp.sum(jnp.where(rows == b, acc, 0.0) if dot else acc[b], axis=0)
        plgpu.atomic_add(o_ref, (pl.ds(b, 1), pl.ds(0, bn)), v[None, :])
  elif dot and batch == mrows:
    o_ref[...] = acc.astype(o_ref.dtype)
  elif dot:                        # store only the real rows (no 16-row partial outputs for batch 1)
    rows = jax.lax.broadcasted_iota(jnp.int32, acc.shape, 0)
    for b in range(batch):
      o_ref[b, :] = jnp.sum(jnp.where(rows == b, acc, 0.0), axis=0).astype(o_ref.dtype)
  else:
    for b in range(batch):
      o_ref[b, :] = jnp.sum(acc[b], axis=0).astype(o_ref.dtype)


def int4_gemv(x: jax.Array, words: jax.Array, scales: jax.Array, *, out_dtype=jnp.float32,
              variant: str | None = None, block_n: int | None = None,
              blocks_per_step: int | None = None, split_k: int | None = None,
              num_warps: int | None = None, num_stages: int | None = None,
              prefetch: int | bool | None = None, atomic: bool | None = None, peel: bool | None = None,
              loop_stages: int | None = None, relaxed: bool | None = None, evict: bool | None = None,
              interpret: bool | None = None) -> jax.Array:
  """``x (B, K) @ dequantize(words, scales)`` by the Pallas kernel, float32 arithmetic.

  Args:
    x: ``(B, K)`` bfloat16 or float32 activations, ``K % 128 == 0``.
    words: ``(K / 8, N)`` uint32 packed codes (layout in the module docstring).
    scales: ``(K / group_size, N)`` float scales (bfloat16 or float32), ``group_size`` a power of two
      >= 16 or K itself (one scale per column).
    out_dtype: output dtype (the float32 result is cast once when stored).
    variant: one of ``VARIANTS`` (module docstring); None (and each launch parameter left None):
      :func:`default_config`. ``'fmadr'``/``'fmadr2'``/``'fmadr4'``: ``'fmad*'`` with the activation
      scaling per plane row from the one step's planes (no block-wide reduction, so no barrier in the
      prologue; one step per program: ``split_k * blocks_per_step`` = K's blocks).
    block_n: output columns per program (power of two >= 16); N is zero-padded to a multiple.
    blocks_per_step: 128-element K blocks per loop step (power of two).
    split_k: programs along K (a power of two dividing the K blocks); partial outputs summed by XLA.
    num_warps, num_stages: Triton launch / pipelining parameters.
    prefetch: 0/False: none; 1/True: load step ``s + 1``'s words, scales and activations before
      computing step ``s`` (software pipelining through registers; Triton's own pipeliner only serves
      ``dot`` operands unless ``loop_stages`` is set); 2: only the activations one step ahead (with
      ``loop_stages`` for the weights).
    atomic: with ``split_k > 1``, add the partial outputs into a zero-initialized float32 output with
      atomic adds in the kernel itself (one launch; the float32 sum in a run-dependent order) instead of
      writing ``(split_k, B, N)`` partials that XLA sums in a second launch.
    peel: ('fmad*' without prefetch) issue step 0's loads before the activation-range prologue (its
      barrier) by peeling step 0 off the loop; costs registers in multi-step programs.
    loop_stages: 0 (off) or n >= 2: let Triton software-pipeline the K loop's loads through shared
      memory (``cp.async``, n buffers) by putting ``tt.num_stages = n`` on the loop (see
      :mod:`mlsys_jax.quant._triton_hooks`); ignored by the interpreter (same results either way).
    relaxed: (with ``atomic``) make the split-K atomic adds relaxed instead of Pallas's acquire-release
      (through :mod:`mlsys_jax.quant._triton_hooks`): a fire-and-forget ``REDG`` per add instead of
      ``MEMBAR.ALL.GPU`` + ``ATOMG`` + ``CCTL.IVALL`` (an L1 flush) in the sm_90 SASS. The output is read
      only after the kernel, so the sum is the same; the interpreter ignores it.
    evict: load the weight words with the L2 ``evict_first`` policy (they are read once; the same
      results; the interpreter ignores the policy). Default: the configuration's (off).
    interpret: run in Pallas's interpreter; default: on every backend but the GPU.

  Returns:
    ``(B, N)`` in ``out_dtype``.

  Example:
    >>> words = jnp.full((16, 16), 0x99999999, jnp.uint32)       # every code 9 - 8 = 1
    >>> int4_gemv(jnp.ones((1, 128)), words, jnp.full((1, 16), 0.5))[0, :3].tolist()
    [64.0, 64.0, 64.0]
  """
  b, k = x.shape
  n = words.shape[1]
  group_size = k // scales.shape[0]
  cfg = default_config(b, k, n, scales.shape[0])
  bn = block_n or cfg["block_n"]
  if variant is None and cfg["variant"].startswith("fmad") and bn < 16 * _dn_parts(cfg["variant"])[1]:
    variant = "fmadr" if _dn_parts(cfg["variant"])[0] else "fmad"   # the default's sub-tiles do not fit a
                                                                     # narrow block_n given by hand
  variant = variant or cfg["variant"]
  check_choice("variant", variant, VARIANTS)
  bps = blocks_per_step or cfg["blocks_per_step"]
  sk = split_k or cfg["split_k"]
  nw, ns = num_warps or cfg["num_warps"], num_stages or cfg["num_stages"]
  nb = k // BLOCK_K
  for name, v in (("block_n", bn), ("blocks_per_step", bps), ("split_k", sk)):
    check_int(name, v, 1)
    if v & (v - 1):
      raise ValueError(f"{name} must be a power of two, got {v}.")
  check_int("block_n", bn, 16, 1024)
  rowscale, nsub = _dn_parts(variant) if variant.startswith("fmad") else (False, 1)
  if nsub > 1 and bn < 16 * nsub:
    raise ValueError(f"variant {variant!r} cuts block_n into {nsub} sub-tiles of at least 16 columns; "
                     f"got block_n={bn}. Pass block_n >= {16 * nsub}.")
  if nb % (sk * bps):
    raise ValueError(f"K={k} has {nb} blocks of {BLOCK_K}; split_k * blocks_per_step = {sk * bps} must "
                     f"divide it. Pass smaller values.")
  if rowscale and nb != sk * bps:
    raise ValueError(f"variant {variant!r} scales the activations per row from the program's one step: "
                     f"split_k * blocks_per_step must equal K's {nb} blocks of {BLOCK_K}, got "
                     f"{sk} * {bps}.")
  if scales.shape[0] % sk:
    raise ValueError(f"split_k={sk} must divide the number of scale groups ({scales.shape[0]}); per-column "
                     f"scales (one group) need split_k=1.")
  if interpret is None:
    interpret = not on_gpu()
  pf = int(cfg["prefetch"] if prefetch is None else prefetch)
  check_int("prefetch", pf, 0, 2)
  at = cfg.get("atomic", False) if atomic is None else bool(atomic)
  # The default peel applies to one-step programs only (in a loop it costs registers).
  pe = (cfg.get("peel", False) and nb == sk * bps) if peel is None else bool(peel)
  ls = cfg.get("loop_stages", 0) if loop_stages is None else loop_stages
  check_int("loop_stages", ls, 0, 8)
  if ls == 1:
    raise ValueError("loop_stages=1 is no pipelining; pass 0 (off) or 2..8 buffers.")
  rx = bool(cfg.get("relaxed", False) if relaxed is None else relaxed) and at and sk > 1
  ev = bool(cfg.get("evict", False) if evict is None else evict)
  if (ls or rx) and not interpret:
    _triton_hooks.install()
  return _launch(x, words, scales, jnp.dtype(out_dtype), variant, bn, bps, sk, nw, ns, pf, at and sk > 1, pe,
                 ls, rx, bool(interpret), ev)


@functools.partial(jax.jit, static_argnums=tuple(range(3, 17)))
def _launch(x, words, scales, out_dtype, variant, bn, bps, sk, nw, ns, pf, atomic, peel, ls, rx, interpret,
            evict=False):
  b, k = x.shape
  n = words.shape[1]
  group_size = k // scales.shape[0]
  bp = _pow2(b)                                  # output rows (and x rows of the fma variants)
  bx = (1 if b == 1 else max(16, bp)) if variant.startswith("dot") else bp   # x rows in the kernel
  xp = x if bx == b else jnp.pad(x, ((0, bx - b), (0, 0)))
  np_ = -(-n // bn) * bn
  w = words                                      # uint32 into the kernel: no XLA bitcast copy
  s = scales
  if np_ != n:
    w = jnp.pad(w, ((0, 0), (0, np_ - n)))
    s = jnp.pad(s, ((0, 0), (0, np_ - n)))
  kc, gc = k // sk, scales.shape[0] // sk
  precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  kernel = functools.partial(_gemv_kernel, variant=variant, batch=bp, blocks_per_step=bps,
                             steps=kc // (BLOCK_K * bps), group_size=group_size, precision=precision,
                             prefetch=pf, atomic=atomic, denormals=not interpret, peel=peel, evict=evict,
                             interpret=interpret)
  odt = out_dtype if sk == 1 else jnp.float32
  in_specs = [pl.BlockSpec((bx, kc), lambda j, q: (0, q)),
              pl.BlockSpec((kc // 8, bn), lambda j, q: (q, j)),
              pl.BlockSpec((gc, bn), lambda j, q: (q, j)),
              pl.BlockSpec((PLANE,), lambda j, q: (0,))]
  args = [xp, w, s, jnp.full((PLANE,), _MAGIC_I, jnp.uint32)]
  if atomic:   # every K split adds into the same (bp, bn) block of one zero-initialized output
    in_specs.append(pl.BlockSpec((bp, bn), lambda j, q: (0, j)))
    args.append(jnp.zeros((bp, np_), jnp.float32))
    out_shape = jax.ShapeDtypeStruct((bp, np_), jnp.float32)
    out_spec = pl.BlockSpec((bp, bn), lambda j, q: (0, j))
  else:
    out_shape = jax.ShapeDtypeStruct((sk, bp, np_), odt)
    out_spec = pl.BlockSpec((None, bp, bn), lambda j, q: (q, 0, j))
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(np_ // bn, sk),
      in_specs=in_specs,
      out_specs=out_spec,
      input_output_aliases={4: 0} if atomic else {},
      compiler_params=None if interpret else triton_compiler_params(nw, ns),
      interpret=interpret,
      name=_triton_hooks.kernel_name(f"w4a16_gemv_{variant}", ls, relaxed=rx),
  )(*args)
  if atomic:
    out = out.astype(out_dtype)
  else:
    out = out[0] if sk == 1 else jnp.sum(out, axis=0).astype(out_dtype)
  if bp != b or np_ != n:
    out = out[:b, :n]
  return out
