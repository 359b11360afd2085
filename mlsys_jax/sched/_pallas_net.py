"""Inception-V3 with its stride-1 Inception blocks as Pallas level kernels (issue 20: first step of an
``emit='pallas'`` path).

At batch 1 XLA's best Inception-V3 program is the latency of ~60 dependent 5-7 us cuDNN kernels, and any
schedule of those kernels (IOS, Ding et al., "IOS: Inter-Operator Scheduler for CNN Acceleration", MLSys
2021) is bounded by the longest chain. :mod:`mlsys_jax.sched._pallas_block` emits one Inception block (a
DAG of stride-1 convolutions plus the concatenation; Szegedy et al., "Rethinking the Inception
Architecture", CVPR 2016, Figs. 5-7) as one Pallas kernel per DAG level. This module applies it to the whole
network of :class:`mlsys_jax.models.ios_nets.InceptionV3` (13 blocks; the convolutions are the flax
children ``Conv_0`` .. ``Conv_93`` in creation order; batch norm is already folded into each conv's bias
by that model, so a conv's ``(kernel, bias)`` map to a :class:`~mlsys_jax.sched._pallas_block.ConvOp`
as they are):

==========  =========  =====================================================  =====================
block       convs      structure                                              runs as
==========  =========  =====================================================  =====================
stem        0-4        3x3/2, 3x3, 3x3 p1, max pool 3/2, 1x1, 3x3, max pool   XLA
Mixed_5b-d  5-25       Inception-A (Fig. 5): 1x1; 1x1-5x5; 1x1-3x3-3x3; pool  Pallas, 3 levels
Mixed_6a    26-29      Inception-B reduction: 3x3/2; 1x1-3x3-3x3/2; max pool  XLA
Mixed_6b-e  30-69      Inception-C (Fig. 6): 1x7/7x1 factorized chains        Pallas, 5 levels
Mixed_7a    70-75      Inception-D reduction: 1x1-3x3/2; 1x1-1x7-7x1-3x3/2    XLA
Mixed_7b-c  76-93      Inception-E (Fig. 7): 1x3 and 3x1 splits of a shared   Pallas, 3 levels
                       1x1 and of a 1x1-3x3; pool
head        -          global average pool                                    XLA
==========  =========  =====================================================  =====================

Inception-E fits :func:`~mlsys_jax.sched._pallas_block.build_block`: its splits are two stride-1 ops
reading the same (non-concatenated) op, and all six branch outputs are concatenated, none read again.
The reductions and the stem stay in XLA: they have stride-2 / unpadded convolutions and max pools, which the
level kernels do not express (``docs/ios.md`` lists what it would take).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp

from mlsys_jax.models import ios_nets
from mlsys_jax.sched import _pallas_block as pb

__all__ = ["BLOCKS", "PALLAS_BLOCKS", "PallasNet", "default_configs", "inception_e_ops", "pallas_inception_v3"]

# per kind: the kernel sizes of its convs, in creation order (checked against the variables)
_KERNELS = {
    "stem": ((3, 3), (3, 3), (3, 3), (1, 1), (3, 3)),
    "a": ((1, 1), (1, 1), (5, 5), (1, 1), (3, 3), (3, 3), (1, 1)),
    "b": ((3, 3), (1, 1), (3, 3), (3, 3)),
    "c": ((1, 1), (1, 1), (1, 7), (7, 1), (1, 1), (7, 1), (1, 7), (7, 1), (1, 7), (1, 1)),
    "d": ((1, 1), (3, 3), (1, 1), (1, 7), (7, 1), (3, 3)),
    "e": ((1, 1), (1, 1), (1, 3), (3, 1), (1, 1), (3, 3), (1, 3), (3, 1), (1, 1)),
    "head": (),
}
# (name, kind, first conv index, convs): ios_nets.INCEPTION_V3_BLOCKS in order, convs numbered as flax creates them
def _layout() -> tuple:
  out, first = [], 0
  for name, kind, *_ in ios_nets.INCEPTION_V3_BLOCKS:
    out.append((name, kind, first, len(_KERNELS[kind])))
    first += len(_KERNELS[kind])
  return tuple(out)


_LAYOUT = _layout()
_N_CONVS = sum(n for *_, n in _LAYOUT)
#: Every block of the network, in order.
BLOCKS: tuple[str, ...] = tuple(n for n, *_ in _LAYOUT)
#: The blocks :func:`pallas_inception_v3` can emit as Pallas level kernels (stride-1 conv DAG + concat).
PALLAS_BLOCKS: tuple[str, ...] = tuple(n for n, k, *_ in _LAYOUT if k in ("a", "c", "e"))
_WHY_XLA = {
    "stem": "stride-2 and unpadded convolutions and max pools",
    "b": "stride-2 convolutions and a max-pool pass-through branch",
    "d": "stride-2 convolutions and a max-pool pass-through branch",
    "head": "a global average pool (a reduction, no convolution)",
}
# per kind: the conv's parameter names (the keys _pallas_block's *_ops read), in creation order
_KEYS = {
    "a": ("b1", "b5_1", "b5_2", "b3_1", "b3_2", "b3_3", "bp"),
    "c": ("b1", "b7_1", "b7_2", "b7_3", "bd_1", "bd_2", "bd_3", "bd_4", "bd_5", "bp"),
    "e": ("b1", "b3_1", "b3a", "b3b", "bd_1", "bd_2", "bda", "bdb", "bp"),
}

_FLAT = pb.BlockConfig(bm=32, bn=32, bk=64, k_mode="flat")
# H200, batch 1, device span vs the best of 9 XLA configurations of the block (benchmarks/ios_block.py,
# benchmarks/results/ios_block_s14a_h200.json): Mixed_5b f32/bf16 32x32x64/flat; Mixed_6b f32
# 32x32x64/flat/k4, bf16 32x32x64/flat. Inception-E was not measured alone: 32x32x64/flat.
_DEFAULTS = {"float32": {"a": _FLAT, "c": _FLAT._replace(split_steps=4), "e": _FLAT},
             "bfloat16": {"a": _FLAT, "c": _FLAT, "e": _FLAT}}


def default_configs(dtype: Any = jnp.float32) -> dict[str, pb.BlockConfig]:
  """The per-block tile configurations measured best on an H200 at batch 1 (see module constants):
  ``{block name: BlockConfig}`` for every block of :data:`PALLAS_BLOCKS`. Float32 tiles for any dtype other
  than bfloat16."""
  table = _DEFAULTS["bfloat16" if jnp.dtype(dtype) == jnp.bfloat16 else "float32"]
  return {n: table[k] for n, k, *_ in _LAYOUT if k in table}


def inception_e_ops(params: Mapping[str, Any]) -> tuple[list[pb.ConvOp], list[str]]:
  """The Inception-E block (``Mixed_7b``/``Mixed_7c``, Szegedy et al. 2016, Fig. 7) as
  :class:`~mlsys_jax.sched._pallas_block.ConvOp` s and its concatenation order, in 3 levels: the four 1x1s
  (b1, b3_1, bd_1 and the pool's); the 1x3 and 3x1 splits of b3_1, bd_1's 3x3 and the pool; the 1x3 and 3x1
  splits of that 3x3.

  Args:
    params: ``{name: (w HWIO, b)}`` for b1, b3_1, b3a, b3b, bd_1, bd_2, bda, bdb, bp.
  """
  p = params
  missing = [k for k in _KEYS["e"] if k not in p]
  if missing:
    raise ValueError(f"inception_e_ops: missing parameters {missing}")
  ops = [pb.ConvOp("b1", "x", *p["b1"], (0, 0)), pb.ConvOp("b3_1", "x", *p["b3_1"], (0, 0)),
         pb.ConvOp("bd_1", "x", *p["bd_1"], (0, 0)), *pb._pool_ops("bp", *p["bp"]),
         pb.ConvOp("b3a", "b3_1", *p["b3a"], (0, 1)), pb.ConvOp("b3b", "b3_1", *p["b3b"], (1, 0)),
         pb.ConvOp("bd_2", "bd_1", *p["bd_2"], (1, 1)),
         pb.ConvOp("bda", "bd_2", *p["bda"], (0, 1)), pb.ConvOp("bdb", "bd_2", *p["bdb"], (1, 0))]
  ops = [o for o in ops if o.name != "bp"] + [o for o in ops if o.name == "bp"]   # heavy tiles first
  return ops, ["b1", "b3a", "b3b", "bda", "bdb", "bp"]


_OPS = {"a": pb.inception_a_ops, "c": pb.inception_c_ops, "e": inception_e_ops}


class _ParamOps(ios_nets._Ops):
  """``ios_nets._Ops`` whose convs read the given parameters in call order instead of creating flax children:
  a block of :data:`ios_nets.INCEPTION_V3_BLOCKS` then runs exactly as ``InceptionV3`` runs it."""

  def __init__(self, model, convs):
    super().__init__(model.dtype, model.param_dtype, None)
    self._convs = iter(convs)

  def conv(self, x, features, kernel=1, stride=1, padding=0, groups=1, act="relu"):
    layer = self.conv_layer(features, kernel, stride, padding, groups)
    return self.activation(layer.apply({"params": next(self._convs)}, x), act)


_BLOCK_FNS = {name: (fn, kw) for name, _, fn, kw in ios_nets.INCEPTION_V3_BLOCKS}


def _xla_block(name, model, convs, i, x):
  """Block ``name`` (first conv ``i``) as ``InceptionV3`` runs it (flax convs, pools, concatenation)."""
  fn, kw = _BLOCK_FNS[name]
  return fn(_ParamOps(model, convs[i:]), lambda n: ios_nets._ch(n, model.width), x, **kw)


class PallasNet:
  """Inception-V3 with some blocks as Pallas level kernels; call it on NHWC input (``jax.jit`` it).

  Attributes:
    model: the :class:`~mlsys_jax.models.ios_nets.InceptionV3`.
    variables: its variables (closed over: the Pallas blocks' packed weights are built from them).
    blocks: ``{block name: PallasBlock}`` of the emitted blocks.
    configs: ``{block name: BlockConfig or per-level sequence}`` they were built with.
    interpret: Pallas interpreter (None: when the backend is not a GPU).
  """

  def __init__(self, model, variables, blocks: dict, configs: dict, interpret: Optional[bool]):
    self.model, self.variables, self.blocks, self.configs, self.interpret = (model, variables, blocks, configs,
                                                                             interpret)

  def __call__(self, x):
    ios_nets._check_input("InceptionV3", x, 75)
    params = self.variables["params"]
    convs = [params[f"Conv_{i}"] for i in range(_N_CONVS)]
    for name, kind, i, _ in _LAYOUT:
      blk = self.blocks.get(name)
      if blk is None:
        x = _xla_block(name, self.model, convs, i, x)
        continue
      if x.dtype != blk.dtype:
        raise ValueError(f"{name} was built for {blk.dtype} activations, the network computes {x.dtype} "
                         f"(pass dtype= to pallas_inception_v3)")
      x = pb.apply_block(blk, x, interpret=self.interpret)
    return x

  def levels(self) -> dict[str, int]:
    """Kernels (levels) per emitted block."""
    return {n: len(b.levels) for n, b in self.blocks.items()}


def _check_names(names, what: str):
  for n in names:
    if n not in BLOCKS:
      raise ValueError(f"{what}: unknown block {n!r}; Inception-V3's blocks are {list(BLOCKS)}")
    if n not in PALLAS_BLOCKS:
      kind = dict((b, k) for b, k, *_ in _LAYOUT)[n]
      raise ValueError(f"{what}: block {n!r} cannot run as Pallas level kernels ({_WHY_XLA[kind]}; "
                       f"supported: {list(PALLAS_BLOCKS)})")


def pallas_inception_v3(model: Any, variables: Mapping, configs: Optional[Mapping[str, Any]] = None,
                        blocks: Optional[Sequence[str]] = None, dtype: Any = None,
                        interpret: Optional[bool] = None) -> PallasNet:
  """The network ``model.apply(variables, x)`` with its stride-1 Inception blocks as Pallas level kernels.

  Every block named in ``blocks`` (default: all of :data:`PALLAS_BLOCKS`: Mixed_5b-d, Mixed_6b-e, Mixed_7b-c)
  runs as :func:`~mlsys_jax.sched._pallas_block.apply_block` (one kernel per level of its convolution DAG,
  writing straight into the concatenated output); its weights are the network's ``Conv_i`` kernels and
  biases (batch norm is folded into them by the model). The stem, the reductions Mixed_6a/Mixed_7a and
  the global average pool run exactly as in ``model`` (flax ``nn.Conv``, pools, concatenation). Weights are
  packed here, once, on the host.

  Args:
    model: an :class:`~mlsys_jax.models.ios_nets.InceptionV3` (any ``width``) without a custom
      ``conv_general_dilated``.
    variables: its variables ``{"params": {"Conv_0": {"kernel", "bias"}, ...}}`` (concrete arrays).
    configs: ``{block name: BlockConfig (or one per level)}``, overriding :func:`default_configs` of ``dtype``
      for those blocks.
    blocks: the blocks to emit (a subset of :data:`PALLAS_BLOCKS`; default all).
    dtype: activation dtype of the kernels (default: ``model.dtype``, else the kernels' dtype); it must be
      the dtype the network computes in at those blocks.
    interpret: Pallas interpreter (default: when the backend is not a GPU).

  Returns:
    A :class:`PallasNet`: ``net(x)`` equals ``model.apply(variables, x)`` up to float rounding.

  Raises:
    ValueError: a model that is not ``InceptionV3`` or has a custom conv, variables not laid out as its 94
      convolutions, a block name that is unknown or not expressible as level kernels (in ``blocks`` or in
      ``configs``), a config key for a block not emitted, a bad ``BlockConfig``.

  Example:
    >>> m, shape = ios_nets.ios_benchmark_nets(small=True)["inception_v3"]
    >>> v = ios_nets.ios_init_params(m, shape)
    >>> net = pallas_inception_v3(m, v, blocks=["Mixed_5b"], configs={"Mixed_5b": pb.BlockConfig(16, 16, 16)})
    >>> net.levels()
    {'Mixed_5b': 3}
  """
  if not isinstance(model, ios_nets.InceptionV3):
    raise ValueError(f"pallas_inception_v3 needs an ios_nets.InceptionV3, got {type(model).__name__}")
  if model.conv_general_dilated is not None:
    raise ValueError("pallas_inception_v3: the model's custom conv_general_dilated cannot be mirrored by the "
                     "Pallas kernels; use InceptionV3(conv_general_dilated=None)")
  params = variables.get("params") if isinstance(variables, Mapping) else None
  want = {f"Conv_{i}" for i in range(_N_CONVS)}
  if not isinstance(params, Mapping) or set(params) != want:
    got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
    raise ValueError(f"variables must be {{'params': {{Conv_0 .. Conv_{_N_CONVS - 1}}}}} (InceptionV3's "
                     f"convs), got params {str(got)[:200]}")
  for name, kind, i, n in _LAYOUT:
    for j, ks in enumerate(_KERNELS[kind]):
      conv = params[f"Conv_{i + j}"]
      if not isinstance(conv, Mapping) or not {"kernel", "bias"} <= set(conv):
        raise ValueError(f"{name}: Conv_{i + j} must hold 'kernel' and 'bias' (an nn.Conv with use_bias=True), "
                         f"got {sorted(conv) if isinstance(conv, Mapping) else type(conv).__name__}")
      shp = tuple(jnp.shape(conv["kernel"]))
      if len(shp) != 4 or shp[:2] != ks:
        raise ValueError(f"{name}: Conv_{i + j} should be a {ks[0]}x{ks[1]} kernel (kh, kw, cin, cout), "
                         f"got shape {shp}")
  if isinstance(blocks, str):
    raise ValueError(f"blocks must be a sequence of block names, got the string {blocks!r} (use [{blocks!r}])")
  blocks = list(PALLAS_BLOCKS if blocks is None else blocks)
  _check_names(blocks, "blocks")
  if len(set(blocks)) != len(blocks):
    raise ValueError(f"blocks lists a block twice: {blocks}")
  configs = dict(configs or {})
  _check_names(configs, "configs")
  extra = [n for n in configs if n not in blocks]
  if extra:
    raise ValueError(f"configs name blocks that are not emitted: {extra} (blocks: {blocks})")
  if dtype is None:
    dtype = model.dtype if model.dtype is not None else params["Conv_0"]["kernel"].dtype
  dtype = jnp.dtype(dtype)
  cfgs = {**{n: c for n, c in default_configs(dtype).items() if n in blocks}, **configs}
  built = {}
  for name, kind, i, n in _LAYOUT:
    if name not in blocks:
      continue
    p = {k: (params[f"Conv_{i + j}"]["kernel"], params[f"Conv_{i + j}"]["bias"]) for j, k in enumerate(_KEYS[kind])}
    ops, concat = _OPS[kind](p)
    try:
      built[name] = pb.build_block(ops, concat, cfgs[name], dtype=dtype)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from None
  return PallasNet(model, variables, built, cfgs, interpret)
