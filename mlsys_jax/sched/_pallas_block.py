"""A small DAG of stride-1 convolutions (an Inception block) as a few Pallas (Triton backend) kernels.

Issue 20's stretch item: at batch 1, Inception-V3 under XLA's best program is the latency of ~60 dependent
cuDNN kernels of 5-7 us each, and any schedule of *those* kernels (IOS, Ding et al., "IOS: Inter-Operator
Scheduler for CNN Acceleration", MLSys 2021) is bounded by the longest chain. Only fewer, faster kernels
can beat it. This module emits one block (Szegedy et al., "Rethinking the Inception Architecture", CVPR
2016, Fig. 5: the merged 1x1 convolutions, the spatial branches, the concatenation) as one Pallas kernel
per *level* of its convolution DAG:

  level 1   every convolution that reads the block input (the 1x1 convs of all branches, IOS's merge),
  level d   every convolution whose source was computed at level d-1,

each level one launch whose grid is the union of its convolutions' output tiles (``pl.when`` on the
program id selects the convolution). A convolution is an implicit GEMM: for an output tile of ``bm``
pixels x ``bn`` channels, the reduction dimension ``K = kh * kw * cin`` is walked ``bk`` at a time; the
activation tile is gathered straight from the NHWC source (zero padding by masks, no im2col buffer), the
weight tile read from a ``(K, cout)`` matrix, and ``jnp.dot`` accumulates in float32 on tensor cores
(TF32 for float32 operands, as XLA's convolutions by default). Bias, a scale and ReLU are fused into
the store, which writes straight into the channel slice of the concatenated block output (a buffer every
level aliases, so there is no concatenation kernel) or of a per-level intermediate buffer.

The average-pool branch (3x3, stride 1, padding 1, ``count_include_pad``, then a 1x1 conv) is linear up to
its bias, so ``avgpool(x) @ W = avgpool(x @ W)``: its 1x1 conv runs in level 1 with the other 1x1 convs
(no bias, no ReLU) and the pool becomes a 3x3 convolution with identity taps, scale 1/9, then bias and
ReLU, in level 2.

Off the GPU the kernels run in Pallas's interpreter (``interpret=True``), which is how the CPU tests check
them against ``lax.conv_general_dilated``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BlockConfig", "ConvOp", "PallasBlock", "apply_block", "block_flops", "build_block",
           "inception_a_ops", "inception_a_xla", "init_inception_a", "inception_c_ops", "inception_c_xla",
           "init_inception_c"]


class BlockConfig(NamedTuple):
  """Launch parameters of every level kernel.

  Attributes:
    bm: output pixels per program (power of two >= 16).
    bn: output channels per program (power of two >= 16).
    bk: reduction elements per step (power of two >= 16).
    num_warps, num_stages: Triton launch parameters.
    k_mode: ``'tap'`` walks K one tap at a time in chunks of ``bk`` input channels (scalar tap per step,
      contiguous loads; a conv with ``cin % bk != 0`` falls back to ``'flat'``), ``'flat'`` walks the
      flattened ``kh * kw * cin`` (per-element tap arithmetic, no wasted lanes when ``cin`` is small).
    split_steps: 0, or split every conv below level 1 whose K walk is longer than this many steps into
      chunks of at most this many (split-K: more programs, each a shorter dependent chain of loads and
      dots; partial sums added atomically into float32; see :func:`build_block`).
    split_last: also split the last level's convs (their epilogue then needs one more launch).
  """
  bm: int = 32
  bn: int = 32
  bk: int = 32
  num_warps: int = 4
  num_stages: int = 3
  k_mode: str = "tap"
  split_steps: int = 0
  split_last: bool = True


class ConvOp(NamedTuple):
  """One stride-1 convolution of the block: ``act(scale * conv(src, w) + b)``.

  Attributes:
    name: unique name; other ops and ``concat`` refer to it.
    src: ``'x'`` (the block input) or the name of another op.
    w: kernel ``(kh, kw, cin, cout)`` (HWIO).
    b: bias ``(cout,)`` or None.
    padding: ``(ph, pw)`` zero padding (output size equals input size: ``kh = 2 ph + 1``).
    relu: apply ReLU after the bias.
    scale: multiplies the accumulator before the bias (1/9 for an average pool as identity taps).
  """
  name: str
  src: str
  w: Any
  b: Any
  padding: tuple[int, int]
  relu: bool = True
  scale: float = 1.0


class _Task(NamedTuple):
  kind: str                 # 'conv'; 'zero' (fill a float32 accumulator); 'final' (dst = act(scale * acc + b))
  src: int                  # input index of the source buffer
  src_c: int                # channels of the source buffer
  src_off: int              # first channel of this task's input in it
  cin: int
  dst: int                  # output index of the destination buffer
  dst_c: int
  dst_off: int
  cout: int
  n_pad: int                # cout padded to whole bn tiles
  kh: int = 1
  kw: int = 1
  ph: int = 0
  pw: int = 0
  relu: bool = False
  scale: float = 1.0
  bk: int = 16
  flat: bool = False
  s_lo: int = 0             # the K steps [s_lo, s_hi) this task walks (a chunk of a split conv)
  s_hi: int = 0
  atomic: bool = False      # add the partial sums into a float32 accumulator; epilogue in the next level
  src_acc: bool = False     # the source is an accumulator: act(src_scale * v + src_bias) on load
  src_relu: bool = False
  src_scale: float = 1.0
  w: int = -1               # level-local indices of the task's constants: weights, bias, source bias
  b: int = -1
  sb: int = -1


class _Level(NamedTuple):
  config: BlockConfig
  tasks: tuple[_Task, ...]
  consts: tuple[Any, ...]          # weights (K_pad * n_pad,), biases (n_pad,), source biases (cin,)
  inputs: tuple[str, ...]          # buffer names read (x, out, mid<d>, acc<d>)
  outputs: tuple[str, ...]         # buffer names written
  aliases: tuple[tuple[int, int], ...]   # (input index, output index): the same buffer


class PallasBlock(NamedTuple):
  """A block emitted by :func:`build_block`: levels of packed weights and tasks (apply with
  :func:`apply_block`)."""
  levels: tuple[_Level, ...]
  cin: int
  cout: int
  config: tuple[BlockConfig, ...]          # per level (the last one repeats)
  dtype: Any
  channels: tuple[tuple[str, int], ...]    # every buffer's channels (accumulators are float32)


def _pow2(v: int) -> bool:
  return v >= 16 and v & (v - 1) == 0


def build_block(ops: Sequence[ConvOp], concat: Sequence[str],
                config: Optional[BlockConfig | Sequence[BlockConfig]] = None, dtype: Any = None) -> PallasBlock:
  """Plan a DAG of stride-1 convolutions as level kernels and pack the weights (once, outside ``jit``).

  Level ``d`` runs every op at depth ``d`` (ops reading ``x`` are depth 1). With ``config.split_steps``
  > 0, an op at depth >= 2 whose K walk has more steps than that is split into chunks of at most
  ``split_steps`` steps, each its own programs, which add their partial sums atomically into a float32
  accumulator that level ``d - 1`` zeroed; its bias/scale/ReLU are applied by its readers in level
  ``d + 1`` as they load it, and a concatenated op's by a 'final' task there (one extra level when the
  last level is split).

  Args:
    ops: the convolutions (:class:`ConvOp`), each reading ``'x'`` or an earlier op.
    concat: op names whose outputs, concatenated along channels in this order, are the block output.
    config: :class:`BlockConfig` (default ``BlockConfig()``), or one per level (the last one is used for
      the remaining levels).
    dtype: dtype of the activations and weights in the kernels (default: the first op's weight dtype).

  Returns:
    A :class:`PallasBlock`.

  Raises:
    ValueError: unknown or duplicate names, a source computed nowhere, a kernel whose padding does not
      keep the spatial size, a concatenated op that another op reads, mismatched channels, bad config.
  """
  cfgs = (BlockConfig(),) if config is None else (config,) if isinstance(config, BlockConfig) else tuple(config)
  if not cfgs or not all(isinstance(c, BlockConfig) for c in cfgs):
    raise ValueError(f"config must be a BlockConfig or a non-empty sequence of them, got {config!r}")
  for cfg in cfgs:
    for f in ("bm", "bn", "bk"):
      if not _pow2(getattr(cfg, f)):
        raise ValueError(f"BlockConfig.{f} must be a power of two >= 16, got {getattr(cfg, f)}")
    if cfg.k_mode not in ("tap", "flat"):
      raise ValueError(f"BlockConfig.k_mode must be 'tap' or 'flat', got {cfg.k_mode!r}")
    if cfg.split_steps < 0:
      raise ValueError(f"BlockConfig.split_steps must be >= 0 (0: no split), got {cfg.split_steps}")
  cfg_of = lambda d: cfgs[min(d, len(cfgs)) - 1]
  if not ops:
    raise ValueError("build_block needs at least one ConvOp")
  by_name = {}
  for op in ops:
    if op.name in by_name or op.name == "x":
      raise ValueError(f"duplicate or reserved op name {op.name!r}")
    w = np.asarray(op.w)
    if w.ndim != 4:
      raise ValueError(f"op {op.name!r}: kernel must be (kh, kw, cin, cout), got shape {w.shape}")
    kh, kw = w.shape[:2]
    ph, pw = op.padding
    if kh != 2 * ph + 1 or kw != 2 * pw + 1:
      raise ValueError(f"op {op.name!r}: a {kh}x{kw} kernel needs padding ({(kh - 1) // 2}, {(kw - 1) // 2}) "
                       f"to keep the spatial size (stride 1 only), got {op.padding}")
    by_name[op.name] = op
  cin = None
  depth = {}

  def get_depth(name, seen=()):
    if name == "x":
      return 0
    if name not in by_name:
      raise ValueError(f"source {name!r} is neither 'x' nor an op name")
    if name in seen:
      raise ValueError(f"cycle through op {name!r}")
    if name not in depth:
      depth[name] = 1 + get_depth(by_name[name].src, seen + (name,))
    return depth[name]

  chans = {}
  for op in ops:
    get_depth(op.name)
    chans[op.name] = np.shape(op.w)[3]
  for op in ops:
    need = np.shape(op.w)[2]
    have = chans.get(op.src) if op.src != "x" else None
    if op.src == "x":
      if cin is not None and cin != need:
        raise ValueError(f"op {op.name!r} reads x with {need} channels, another op with {cin}")
      cin = need
    elif have != need:
      raise ValueError(f"op {op.name!r} expects {need} input channels, {op.src!r} has {have}")
  if cin is None:
    raise ValueError("no op reads the block input 'x'")
  unknown = [c for c in concat if c not in by_name]
  if unknown or len(set(concat)) != len(concat) or not concat:
    raise ValueError(f"concat must list distinct op names, got {list(concat)} (unknown: {unknown})")
  readers = {op.src for op in ops}
  bad = [c for c in concat if c in readers]
  if bad:
    raise ValueError(f"ops {bad} are both concatenated and read by other ops; not supported")
  dtype = jnp.dtype(dtype if dtype is not None else np.asarray(ops[0].w).dtype)

  # K walk of every op, and which ops are split
  walk = {}
  for op in ops:
    kh, kw, ci, _ = np.shape(op.w)
    cfg = cfg_of(depth[op.name])
    flat = cfg.k_mode == "flat" or ci % cfg.bk != 0
    steps = -(-(kh * kw * ci) // cfg.bk) if flat else kh * kw * (ci // cfg.bk)
    chunks = 1
    last = depth[op.name] == max(depth.values())
    if cfg.split_steps and depth[op.name] >= 2 and steps > cfg.split_steps and (cfg.split_last or not last):
      chunks = -(-steps // cfg.split_steps)
    walk[op.name] = (flat, steps, chunks)
  split = {n for n, (_, _, c) in walk.items() if c > 1}
  # buffers: 'out' (concatenation), 'mid<d>' (unsplit intermediates of level d), 'acc<d>' (float32
  # accumulators of the split ops of level d); (buffer, channel offset) of every op's result
  n_levels = max(depth.values()) + (1 if any(depth[n] == max(depth.values()) for n in split) else 0)
  where, ch = {}, {"out": 0}
  for c in concat:
    if c not in split:
      where[c] = ("out", ch["out"])
    ch["out"] += chans[c]
  cout = ch["out"]
  out_off = {}
  off = 0
  for c in concat:
    out_off[c] = off
    off += chans[c]
  for op in ops:
    d = depth[op.name]
    if op.name in split:
      buf = f"acc{d}"
    elif op.name in out_off:
      continue
    else:
      buf = f"mid{d}"
    where[op.name] = (buf, ch.get(buf, 0))
    ch[buf] = ch.get(buf, 0) + chans[op.name]
  ch["x"] = cin
  levels, existing = [], ["x"]
  for d in range(1, n_levels + 1):
    cfg = cfg_of(d)
    inputs = list(existing)
    outputs = ["out"] + [b for b in (f"mid{d}",) if b in ch]
    if f"acc{d}" in ch:
      outputs.append(f"acc{d}")
    if f"acc{d + 1}" in ch:
      outputs.append(f"acc{d + 1}")
    aliases = tuple((inputs.index(b), outputs.index(b)) for b in outputs if b in inputs)
    tasks, consts = [], []

    def add_const(a):
      consts.append(a)
      return len(consts) - 1

    def pad_bias(v, n_pad, co):
      bv = np.zeros((n_pad,), np.float32)
      if v is not None:
        v = np.asarray(v, np.float32)
        if v.shape != (co,):
          raise ValueError(f"bias must have shape ({co},), got {v.shape}")
        bv[:co] = v
      return jnp.asarray(bv)

    for op in ops:
      if depth[op.name] != d:
        continue
      w = np.asarray(op.w, np.float32)
      kh, kw, ci, co = w.shape
      flat, steps, chunks = walk[op.name]
      sbuf, soff = ("x", 0) if op.src == "x" else where[op.src]
      dbuf, doff = where[op.name] if op.name in where else ("out", out_off[op.name])
      k = kh * kw * ci
      k_pad = -(-k // cfg.bk) * cfg.bk
      n_pad = -(-co // cfg.bn) * cfg.bn
      wm = np.zeros((k_pad, n_pad), np.float32)
      wm[:k, :co] = w.reshape(k, co)          # row index = (i * kw + j) * cin + c
      wi = add_const(jnp.asarray(wm.reshape(-1), dtype))
      try:
        bi = add_const(pad_bias(op.b, n_pad, co))
      except ValueError as e:
        raise ValueError(f"op {op.name!r}: {e}") from None
      src_acc = op.src in split
      sb, s_relu, s_scale = -1, False, 1.0
      if src_acc:
        p = by_name[op.src]
        sb = add_const(pad_bias(p.b, ci, ci))
        s_relu, s_scale = bool(p.relu), float(p.scale)
      per = -(-steps // chunks)
      for j in range(chunks):
        tasks.append(_Task(
            "conv", inputs.index(sbuf), ch[sbuf], soff, ci, outputs.index(dbuf), ch[dbuf], doff, co, n_pad,
            kh, kw, op.padding[0], op.padding[1], bool(op.relu), float(op.scale), cfg.bk, flat,
            j * per, min(steps, (j + 1) * per), chunks > 1, src_acc, s_relu, s_scale, wi, bi, sb))
    for c in concat:   # split concatenated ops of the previous level: their epilogue, into the output
      if c in split and depth[c] == d - 1:
        p = by_name[c]
        co = chans[c]
        n_pad = -(-co // cfg.bn) * cfg.bn
        buf, aoff = where[c]
        tasks.append(_Task("final", inputs.index(buf), ch[buf], aoff, co, 0, cout, out_off[c], co, n_pad,
                           relu=bool(p.relu), scale=float(p.scale), b=add_const(pad_bias(p.b, n_pad, co))))
    if f"acc{d + 1}" in ch:
      ca = ch[f"acc{d + 1}"]
      tasks.append(_Task("zero", 0, 0, 0, 0, outputs.index(f"acc{d + 1}"), ca, 0, ca,
                         -(-ca // cfg.bn) * cfg.bn))
    levels.append(_Level(cfg, tuple(tasks), tuple(consts), tuple(inputs), tuple(outputs), aliases))
    existing += [b for b in outputs if b not in existing]
  return PallasBlock(tuple(levels), cin, cout, cfgs, dtype, tuple(sorted(ch.items())))


def _tile_index(q, t: _Task, n_img: int, h: int, wd: int, cfg: BlockConfig):
  bm, bn = cfg.bm, cfg.bn
  tn = t.n_pad // bn
  pm, pn = jax.lax.div(q, tn), jax.lax.rem(q, tn)
  m = pm * bm + jnp.arange(bm, dtype=jnp.int32)
  cols = pn * bn + jnp.arange(bn, dtype=jnp.int32)
  ok = (m < n_img * h * wd)[:, None] & (cols < t.cout)[None, :]
  return m, cols, ok


def _store(dst, t: _Task, m, cols, ok, val, m_total: int, interpret: bool):
  from jax.experimental.pallas import triton as plgpu
  oidx = m[:, None] * t.dst_c + t.dst_off + cols[None, :]
  if interpret:   # the interpreter scatters every lane: send masked lanes out of bounds (dropped)
    oidx = jnp.where(ok, oidx, m_total * t.dst_c)
  if t.atomic:
    if interpret:     # the interpreter's atomic takes no mask
      plgpu.atomic_add(dst, (oidx,), jnp.where(ok, val, 0.0))
    else:
      plgpu.atomic_add(dst, (oidx,), val, mask=ok)
  else:
    plgpu.store(dst.at[oidx], val.astype(dst.dtype), mask=ok)


def _elementwise_tile(q, t: _Task, srcs, consts, dst, n_img, h, wd, cfg, interpret):
  """'zero' and 'final' tasks: one ``bm x bn`` tile."""
  from jax.experimental.pallas import triton as plgpu
  m_total = n_img * h * wd
  m, cols, ok = _tile_index(q, t, n_img, h, wd, cfg)
  if t.kind == "zero":
    _store(dst, t, m, cols, ok, jnp.zeros((cfg.bm, cfg.bn), jnp.float32), m_total, interpret)
    return
  idx = m[:, None] * t.src_c + t.src_off + cols[None, :]
  if interpret:
    idx = jnp.where(ok, idx, 0)
  v = plgpu.load(srcs[t.src].at[idx], mask=ok, other=jnp.zeros((), jnp.float32))
  v = v * t.scale + plgpu.load(consts[t.b].at[cols])[None, :]
  if t.relu:
    v = jnp.maximum(v, 0.0)
  _store(dst, t, m, cols, ok, v, m_total, interpret)


def _conv_tile(q, t: _Task, srcs, consts, dst, n_img: int, h: int, wd: int, cfg: BlockConfig,
               interpret: bool, dot_dtype):
  """One ``bm x bn`` output tile of conv task ``t`` (local program id ``q``) as an implicit GEMM."""
  from jax.experimental.pallas import triton as plgpu
  src, w_ref = srcs[t.src], consts[t.w]
  bm, bn, bk = cfg.bm, cfg.bn, t.bk
  m_total = n_img * h * wd
  m, cols, ok_out = _tile_index(q, t, n_img, h, wd, cfg)
  mvalid = m < m_total
  r = jax.lax.rem(m, h * wd)           # all indices are >= 0: truncating division
  hh0, ww0 = jax.lax.div(r, wd), jax.lax.rem(r, wd)
  kk = jnp.arange(bk, dtype=jnp.int32)
  k_total = t.kh * t.kw * t.cin
  zero = jnp.zeros((), src.dtype)

  def prologue(a, ok, c):
    """The source's epilogue when it is a split op's float32 accumulator (zero padding stays zero)."""
    if not t.src_acc:
      return a
    a = a * t.src_scale + plgpu.load(consts[t.sb].at[c])
    if t.src_relu:
      a = jnp.maximum(a, 0.0)
    return jnp.where(ok, a, 0.0).astype(dot_dtype)

  if t.flat:
    def body(s, acc):
      k = s * bk + kk
      tap = jax.lax.div(k, t.cin)
      c = k - tap * t.cin
      di = jax.lax.div(tap, t.kw)
      dh = di - t.ph
      dw = tap - di * t.kw - t.pw
      hh = hh0[:, None] + dh[None, :]
      ww = ww0[:, None] + dw[None, :]
      ok = (mvalid[:, None] & (k < k_total)[None, :] & (hh >= 0) & (hh < h) & (ww >= 0) & (ww < wd))
      idx = (m[:, None] + dh[None, :] * wd + dw[None, :]) * t.src_c + t.src_off + c[None, :]
      if interpret:
        idx = jnp.where(ok, idx, 0)
      a = prologue(plgpu.load(src.at[idx], mask=ok, other=zero), ok, c[None, :])
      b = plgpu.load(w_ref.at[(s * bk + kk)[:, None] * t.n_pad + cols[None, :]])
      return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)
  else:
    nkc = t.cin // bk

    def body(s, acc):
      tap = jax.lax.div(s, nkc)
      c0 = (s - tap * nkc) * bk
      di = jax.lax.div(tap, t.kw)
      dh = di - t.ph
      dw = tap - di * t.kw - t.pw
      hh = hh0 + dh
      ww = ww0 + dw
      okr = mvalid & (hh >= 0) & (hh < h) & (ww >= 0) & (ww < wd)
      row = (m + dh * wd + dw) * t.src_c + t.src_off + c0
      if interpret:
        row = jnp.where(okr, row, 0)
      ok = jnp.broadcast_to(okr[:, None], (bm, bk))
      a = prologue(plgpu.load(src.at[row[:, None] + kk[None, :]], mask=ok, other=zero), ok,
                   (c0 + kk)[None, :])
      b = plgpu.load(w_ref.at[(s * bk + kk)[:, None] * t.n_pad + cols[None, :]])
      return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(t.s_lo, t.s_hi, body, jnp.zeros((bm, bn), jnp.float32))
  if not t.atomic:
    if t.scale != 1.0:
      acc = acc * t.scale
    acc = acc + plgpu.load(consts[t.b].at[cols])[None, :]
    if t.relu:
      acc = jnp.maximum(acc, 0.0)
  _store(dst, t, m, cols, ok_out, acc, m_total, interpret)


def _run_level(lv: _Level, bufs: dict, n_img: int, h: int, wd: int, dtype, channels: dict, interpret: bool,
               name: str = "pallas_block_level"):
  from jax.experimental import pallas as pl
  from mlsys_jax._compat import triton_compiler_params
  cfg = lv.config
  m_total = n_img * h * wd
  tm = -(-m_total // cfg.bm)
  starts, total = [], 0
  for t in lv.tasks:
    starts.append(total)
    total += tm * (t.n_pad // cfg.bn)
  ni, nc = len(lv.inputs), len(lv.consts)

  def kernel(*refs):
    srcs, consts, outs = refs[:ni], refs[ni:ni + nc], refs[ni + nc:]
    pid = pl.program_id(0)
    for t, st in zip(lv.tasks, starts):
      ntiles = tm * (t.n_pad // cfg.bn)

      @pl.when((pid >= st) & (pid < st + ntiles))
      def _(t=t, st=st):
        if t.kind == "conv":
          _conv_tile(pid - st, t, srcs, consts, outs[t.dst], n_img, h, wd, cfg, interpret, dtype)
        else:
          _elementwise_tile(pid - st, t, srcs, consts, outs[t.dst], n_img, h, wd, cfg, interpret)

  out_shape = tuple(jax.ShapeDtypeStruct((m_total * channels[b],), jnp.float32 if b.startswith("acc")
                                         else dtype) for b in lv.outputs)
  res = pl.pallas_call(
      kernel, grid=(total,), out_shape=out_shape, input_output_aliases=dict(lv.aliases),
      interpret=interpret, name=name,
      compiler_params=None if interpret else triton_compiler_params(cfg.num_warps, cfg.num_stages),
  )(*(bufs[b] for b in lv.inputs), *lv.consts)
  return dict(zip(lv.outputs, res))


def apply_block(block: PallasBlock, x, interpret: Optional[bool] = None):
  """Run a :class:`PallasBlock` on NHWC ``x``: one ``pallas_call`` per level.

  Args:
    block: from :func:`build_block`.
    x: ``(n, h, w, cin)`` activations (cast to the block's dtype).
    interpret: Pallas interpreter (default: when the backend is not a GPU).

  Returns:
    ``(n, h, w, cout)`` in the block's dtype: the concatenated outputs.

  Example:
    >>> ops = [ConvOp("a", "x", np.ones((1, 1, 16, 16), np.float32), None, (0, 0))]
    >>> blk = build_block(ops, ["a"], BlockConfig(bm=16, bn=16, bk=16))
    >>> float(apply_block(blk, jnp.ones((1, 4, 4, 16)))[0, 0, 0, 0])
    16.0
  """
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if x.ndim != 4 or x.shape[-1] != block.cin:
    raise ValueError(f"apply_block expects NHWC input with {block.cin} channels, got shape {x.shape}")
  n_img, h, wd, _ = x.shape
  bufs = {"x": x.astype(block.dtype).reshape(-1)}
  channels = dict(block.channels)
  for d, lv in enumerate(block.levels, start=1):   # kernels named by level (device traces tell them apart)
    bufs.update(_run_level(lv, bufs, n_img, h, wd, block.dtype, channels, interpret,
                           name=f"pallas_block_level{d}"))
  out = bufs["out"]
  return out.reshape(n_img, h, wd, block.cout)


# ============================================================================ Inception blocks

def _conv_ref(x, w, b, padding, relu=True):
  y = jax.lax.conv_general_dilated(x, jnp.asarray(w, x.dtype), (1, 1), [(padding[0],) * 2, (padding[1],) * 2],
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = y + jnp.asarray(b, y.dtype)
  return jnp.maximum(y, 0) if relu else y


def _avg_pool3(x):
  s = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                            ((0, 0), (1, 1), (1, 1), (0, 0)))
  return s / jnp.asarray(9, x.dtype)       # count_include_pad, as the IOS runtime (cuDNN)


def _init(seed: int, shapes: dict, dtype) -> dict:
  """He-scaled normal kernels and N(0, 0.1) biases from a numpy generator (host-side, no compiles)."""
  rng = np.random.default_rng(seed)
  params = {}
  for name, (kh, kw, ci, co) in shapes.items():
    w = rng.standard_normal((kh, kw, ci, co), np.float32) * np.float32(math.sqrt(2.0 / (kh * kw * ci)))
    b = 0.1 * rng.standard_normal((co,), np.float32)
    params[name] = (jnp.asarray(w, dtype), jnp.asarray(b, dtype))
  return params


def init_inception_a(seed: int = 0, cin: int = 192, pool_features: int = 32, width: float = 1.0,
                     dtype: Any = jnp.float32) -> dict:
  """Random (He-scaled) weights and nonzero biases of an Inception-A block (``Mixed_5b`` with the
  defaults: 35x35x192 -> 256 channels), channel counts times ``width`` as in ``ios_nets.InceptionV3``.
  ``seed`` seeds a numpy generator.

  Returns:
    ``{name: (w HWIO, b)}`` for b1, b5_1, b5_2, b3_1, b3_2, b3_3, bp.
  """
  c = lambda v: max(1, int(round(v * width)))
  shapes = {"b1": (1, 1, cin, c(64)), "b5_1": (1, 1, cin, c(48)), "b5_2": (5, 5, c(48), c(64)),
            "b3_1": (1, 1, cin, c(64)), "b3_2": (3, 3, c(64), c(96)), "b3_3": (3, 3, c(96), c(96)),
            "bp": (1, 1, cin, c(pool_features))}
  return _init(seed, shapes, dtype)


def inception_a_xla(params: dict, x):
  """The Inception-A block as ``ios_nets.InceptionV3`` writes it (conv + bias + ReLU per branch; 3x3
  average pool, count_include_pad, then a 1x1 conv; concatenation b1, b5, b3, pool), in lax."""
  p = params
  b1 = _conv_ref(x, *p["b1"], (0, 0))
  b5 = _conv_ref(_conv_ref(x, *p["b5_1"], (0, 0)), *p["b5_2"], (2, 2))
  b3 = _conv_ref(_conv_ref(_conv_ref(x, *p["b3_1"], (0, 0)), *p["b3_2"], (1, 1)), *p["b3_3"], (1, 1))
  bp = _conv_ref(_avg_pool3(x), *p["bp"], (0, 0))
  return jnp.concatenate([b1, b5, b3, bp], axis=-1)


def _pool_ops(name, w, b):
  """Average pool then 1x1 conv as 1x1 conv (level 1, no bias) then a 3x3 identity-tap conv, scale 1/9."""
  co = np.shape(w)[3]
  eye = np.broadcast_to(np.eye(co, dtype=np.float32), (3, 3, co, co))
  return [ConvOp(name + "_1x1", "x", w, None, (0, 0), relu=False),
          ConvOp(name, name + "_1x1", eye, b, (1, 1), relu=True, scale=1.0 / 9.0)]


def inception_a_ops(params: dict) -> tuple[list[ConvOp], list[str]]:
  """The Inception-A block as :class:`ConvOp` s and its concatenation order (3 levels: the four 1x1
  convs; the 5x5, the first 3x3 and the pool; the second 3x3)."""
  p = params
  ops = [ConvOp("b1", "x", *p["b1"], (0, 0)), ConvOp("b5_1", "x", *p["b5_1"], (0, 0)),
         ConvOp("b3_1", "x", *p["b3_1"], (0, 0)), *_pool_ops("bp", *p["bp"]),
         ConvOp("b5", "b5_1", *p["b5_2"], (2, 2)), ConvOp("b3_2", "b3_1", *p["b3_2"], (1, 1)),
         ConvOp("b3", "b3_2", *p["b3_3"], (1, 1))]
  # put the pool's 3x3 after the spatial convs of its level (heavy tiles first in the grid)
  ops = [o for o in ops if o.name != "bp"] + [o for o in ops if o.name == "bp"]
  return ops, ["b1", "b5", "b3", "bp"]


def init_inception_c(seed: int = 0, cin: int = 768, c7: int = 128, width: float = 1.0, dtype: Any = jnp.float32) -> dict:
  """Random weights of an Inception-C block (``Mixed_6b`` with the defaults: 17x17x768 -> 768 channels,
  1x7/7x1 convolutions), channel counts times ``width`` as in ``ios_nets.InceptionV3``."""
  c = lambda v: max(1, int(round(v * width)))
  shapes = {"b1": (1, 1, cin, c(192)), "b7_1": (1, 1, cin, c(c7)), "b7_2": (1, 7, c(c7), c(c7)),
            "b7_3": (7, 1, c(c7), c(192)), "bd_1": (1, 1, cin, c(c7)), "bd_2": (7, 1, c(c7), c(c7)),
            "bd_3": (1, 7, c(c7), c(c7)), "bd_4": (7, 1, c(c7), c(c7)), "bd_5": (1, 7, c(c7), c(192)),
            "bp": (1, 1, cin, c(192))}
  return _init(seed, shapes, dtype)


def inception_c_xla(params: dict, x):
  """The Inception-C block as ``ios_nets.InceptionV3`` writes it, in lax."""
  p = params
  b1 = _conv_ref(x, *p["b1"], (0, 0))
  b7 = _conv_ref(_conv_ref(_conv_ref(x, *p["b7_1"], (0, 0)), *p["b7_2"], (0, 3)), *p["b7_3"], (3, 0))
  bd = _conv_ref(x, *p["bd_1"], (0, 0))
  for name, pad in (("bd_2", (3, 0)), ("bd_3", (0, 3)), ("bd_4", (3, 0)), ("bd_5", (0, 3))):
    bd = _conv_ref(bd, *p[name], pad)
  bp = _conv_ref(_avg_pool3(x), *p["bp"], (0, 0))
  return jnp.concatenate([b1, b7, bd, bp], axis=-1)


def inception_c_ops(params: dict) -> tuple[list[ConvOp], list[str]]:
  """The Inception-C block as :class:`ConvOp` s (5 levels: the 1x1s; 1x7, 7x1 and the pool; 7x1, 1x7;
  7x1; 1x7) and its concatenation order."""
  p = params
  ops = [ConvOp("b1", "x", *p["b1"], (0, 0)), ConvOp("b7_1", "x", *p["b7_1"], (0, 0)),
         ConvOp("bd_1", "x", *p["bd_1"], (0, 0)), *_pool_ops("bp", *p["bp"]),
         ConvOp("b7_2", "b7_1", *p["b7_2"], (0, 3)), ConvOp("bd_2", "bd_1", *p["bd_2"], (3, 0)),
         ConvOp("b7", "b7_2", *p["b7_3"], (3, 0)), ConvOp("bd_3", "bd_2", *p["bd_3"], (0, 3)),
         ConvOp("bd_4", "bd_3", *p["bd_4"], (3, 0)), ConvOp("bd", "bd_4", *p["bd_5"], (0, 3))]
  ops = [o for o in ops if o.name != "bp"] + [o for o in ops if o.name == "bp"]
  return ops, ["b1", "b7", "bd", "bp"]


def block_flops(params: dict, h: int, w: int, n: int = 1) -> float:
  """Multiply-add FLOPs (2 per MAC) of the block's convolutions as the network writes them (the average
  pool's adds not counted)."""
  return float(sum(2 * n * h * w * np.prod(np.shape(wt)) for wt, _ in params.values()))
