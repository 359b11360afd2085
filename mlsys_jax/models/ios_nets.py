"""The four benchmark networks of IOS, in flax.linen (NHWC, batch norm folded into conv biases).

Ding, Zhu, Jia, Pekhimenko, Han, "IOS: Inter-Operator Scheduler for CNN Acceleration", MLSys 2021,
Sec. 6 (benchmarks). The graphs follow the definitions in the authors' repository
(``mit-han-lab/inter-operator-scheduler``, ``python/ios/models``): every convolution is a
convolution with bias followed by its activation (batch norm folded in), an "identity" node sums the
values inside each *term* and concatenates the terms along channels, and the networks end at global
average pooling (no dense classifier), exactly as IOS measures them.

=============  =======  ==========================================  ============================
net            input    IOS schedulable operators                   lax primitives in the jaxpr
=============  =======  ==========================================  ============================
inception_v3   299x299  119 = 94 conv + 14 pool + 11 identity       94 conv, 14 pool
squeezenet     224x224   50 = 30 conv +  4 pool + 16 identity       30 conv,  4 pool
randwire       224x224  120 = 112 ReLU-SepConv + 2 conv + relu +    226 conv, 1 pool
                        pool + 4 identity
nasnet         331x331  374 = 267 ReLU-(Sep)Conv + 71 pool +        488 conv, 71 pool
                        34 identity + stem conv + relu
=============  =======  ==========================================  ============================

("conv" counts ``conv_general_dilated``; a separable convolution is a depthwise plus a pointwise
one; "pool" counts ``reduce_window`` max/sum plus the final global mean.) :data:`IOS_OP_COUNTS`
holds these numbers.

Example:
  >>> import jax, jax.numpy as jnp
  >>> nets = ios_benchmark_nets(small=True)
  >>> model, shape = nets["squeezenet"]
  >>> params = ios_init_params(model, shape)                   # host-side random weights, fast
  >>> jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct(shape, jnp.float32)).shape
  (1, 16)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "IOS_OP_COUNTS",
    "InceptionV3",
    "NasNetA",
    "RandWire",
    "SqueezeNet",
    "ios_benchmark_nets",
    "ios_init_params",
    "watts_strogatz_dag",
]

ConvGeneral = Callable[..., Any] | None
Pair = tuple[int, int]

# Counts of the full-size networks: IOS's own operators and the lax primitives they lower to.
IOS_OP_COUNTS: dict[str, dict[str, int]] = {
    "inception_v3": {"ios_ops": 119, "conv": 94, "pool": 14, "identity": 11},
    "squeezenet": {"ios_ops": 50, "conv": 30, "pool": 4, "identity": 16},
    "randwire": {"ios_ops": 120, "conv": 226, "pool": 1, "identity": 4},
    "nasnet": {"ios_ops": 374, "conv": 488, "pool": 71, "identity": 34},
}


def _pair(v: int | Sequence[int]) -> Pair:
  if isinstance(v, int):
    return (v, v)
  a, b = v
  return (int(a), int(b))


class _Ops:
  """The IOS building blocks, bound to one parent module (creates its ``nn.Conv`` children)."""

  def __init__(self, dtype: Any, param_dtype: Any, conv_general_dilated: ConvGeneral):
    self.dtype, self.param_dtype, self.conv_fn = dtype, param_dtype, conv_general_dilated

  def conv_layer(self, features: int, kernel=1, stride=1, padding=0, groups: int = 1) -> nn.Conv:
    """The ``nn.Conv`` of :meth:`conv` (bias, explicit padding), not yet applied."""
    kh, kw = _pair(kernel)
    ph, pw = _pair(padding)
    kwargs = {} if self.conv_fn is None else {"conv_general_dilated": self.conv_fn}
    return nn.Conv(int(features), (kh, kw), strides=_pair(stride), padding=((ph, ph), (pw, pw)),
                   feature_group_count=groups, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                   **kwargs)

  @staticmethod
  def activation(y, act: str):
    if act == "relu":
      return nn.relu(y)
    if act == "identity":
      return y
    raise ValueError(f"unknown activation {act!r}; use 'relu' or 'identity'.")

  def conv(self, x, features: int, kernel=1, stride=1, padding=0, groups: int = 1,
           act: str = "relu"):
    """IOS ``conv2d``: convolution with bias (folded batch norm) and activation; explicit padding."""
    return self.activation(self.conv_layer(features, kernel, stride, padding, groups)(x), act)

  def sep_conv(self, x, features: int, kernel, stride, padding, relu: bool = True):
    """IOS ``relu_sep_conv``: ReLU, depthwise conv (groups = channels), pointwise 1x1 conv."""
    if relu:
      x = nn.relu(x)
    x = self.conv(x, x.shape[-1], kernel, stride, padding, groups=x.shape[-1], act="identity")
    return self.conv(x, features, 1, 1, 0, act="identity")

  def relu_conv(self, x, features: int, kernel=1, stride=1, padding=0):
    """IOS ``relu_conv``: ReLU then a convolution without activation."""
    return self.conv(nn.relu(x), features, kernel, stride, padding, act="identity")

  @staticmethod
  def max_pool(x, kernel=3, stride=2, padding=0):
    ph, pw = _pair(padding)
    return nn.max_pool(x, _pair(kernel), strides=_pair(stride), padding=((ph, ph), (pw, pw)))

  @staticmethod
  def avg_pool(x, kernel=3, stride=1, padding=1):
    # cuDNN CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING, as in the IOS runtime.
    ph, pw = _pair(padding)
    return nn.avg_pool(x, _pair(kernel), strides=_pair(stride), padding=((ph, ph), (pw, pw)),
                       count_include_pad=True)

  @staticmethod
  def global_avg(x):
    return jnp.mean(x, axis=(1, 2))

  @staticmethod
  def identity(*terms):
    """IOS ``identity``: each term (a value or a list of values) is summed; terms are concatenated."""
    outs = []
    for t in terms:
      if isinstance(t, (list, tuple)):
        s = t[0]
        for v in t[1:]:
          s = s + v
        outs.append(s)
      else:
        outs.append(t)
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


def _check_input(name: str, x, min_hw: int) -> None:
  if x.ndim != 4:
    raise ValueError(f"{name} expects NHWC inputs of rank 4 (batch, height, width, channels), got shape "
                     f"{x.shape}.")
  if min(x.shape[1:3]) < min_hw:
    raise ValueError(f"{name} needs a spatial size of at least {min_hw}x{min_hw} (its strided convs and "
                     f"pools would reach zero size), got {x.shape[1]}x{x.shape[2]}.")


def _ch(c: int, width: float) -> int:
  return max(1, int(round(c * width)))


class InceptionV3(nn.Module):
  """Inception-V3 as IOS defines it: 13 blocks (front, 3xA, B, 4xC, D, 2xE, global average pool).

  Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016; IOS (Ding et al., MLSys 2021)
  benchmark at 299x299, batch norm folded, no dense classifier. Output: ``(batch, 2048 * width)``.

  Attributes:
    width: multiplier of every channel count (1.0 = the real net; smaller for CPU tests).
    dtype, param_dtype: computation and parameter dtypes of the convolutions.
    conv_general_dilated: optional replacement for ``lax.conv_general_dilated``.

  Example:
    >>> m = InceptionV3(width=0.125)
    >>> x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
    >>> v = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)    # shapes only: nothing is computed
    >>> jax.eval_shape(m.apply, v, x).shape
    (1, 256)
  """
  width: float = 1.0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  conv_general_dilated: ConvGeneral = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    _check_input("InceptionV3", x, 75)
    o = _Ops(self.dtype, self.param_dtype, self.conv_general_dilated)
    c = lambda n: _ch(n, self.width)
    for _, _, block, kw in INCEPTION_V3_BLOCKS:
      x = block(o, c, x, **kw)
    return x


# Inception-V3's blocks, shared by InceptionV3 and the Pallas emission of mlsys_jax.sched._pallas_net: each
# takes the ops ``o`` (convs are created, or read, in call order), the channel map ``c`` and the input.
def _inception_stem(o, c, x):
  x = o.conv(x, c(32), 3, 2)
  x = o.conv(x, c(32), 3)
  x = o.conv(x, c(64), 3, padding=1)
  x = o.max_pool(x, 3, 2)
  x = o.conv(x, c(80), 1)
  x = o.conv(x, c(192), 3)
  return o.max_pool(x, 3, 2)


def _inception_a(o, c, x, pool_features: int):
  b1 = o.conv(x, c(64), 1)
  b5 = o.conv(o.conv(x, c(48), 1), c(64), 5, padding=2)
  b3 = o.conv(x, c(64), 1)
  b3 = o.conv(o.conv(b3, c(96), 3, padding=1), c(96), 3, padding=1)
  bp = o.conv(o.avg_pool(x), c(pool_features), 1)
  return o.identity(b1, b5, b3, bp)


def _inception_b(o, c, x):
  b3 = o.conv(x, c(384), 3, 2)
  bd = o.conv(o.conv(o.conv(x, c(64), 1), c(96), 3, padding=1), c(96), 3, 2)
  bp = o.max_pool(x, 3, 2)
  return o.identity(b3, bd, bp)


def _inception_c(o, c, x, c7: int):
  b1 = o.conv(x, c(192), 1)
  b7 = o.conv(x, c(c7), 1)
  b7 = o.conv(b7, c(c7), (1, 7), padding=(0, 3))
  b7 = o.conv(b7, c(192), (7, 1), padding=(3, 0))
  bd = o.conv(x, c(c7), 1)
  bd = o.conv(bd, c(c7), (7, 1), padding=(3, 0))
  bd = o.conv(bd, c(c7), (1, 7), padding=(0, 3))
  bd = o.conv(bd, c(c7), (7, 1), padding=(3, 0))
  bd = o.conv(bd, c(192), (1, 7), padding=(0, 3))
  bp = o.conv(o.avg_pool(x), c(192), 1)
  return o.identity(b1, b7, bd, bp)


def _inception_d(o, c, x):
  b3 = o.conv(o.conv(x, c(192), 1), c(320), 3, 2)
  b7 = o.conv(x, c(192), 1)
  b7 = o.conv(b7, c(192), (1, 7), padding=(0, 3))
  b7 = o.conv(b7, c(192), (7, 1), padding=(3, 0))
  b7 = o.conv(b7, c(192), 3, 2)
  bp = o.max_pool(x, 3, 2)
  return o.identity(b3, b7, bp)


def _inception_e(o, c, x):
  b1 = o.conv(x, c(320), 1)
  b3 = o.conv(x, c(384), 1)
  b3a = o.conv(b3, c(384), (1, 3), padding=(0, 1))
  b3b = o.conv(b3, c(384), (3, 1), padding=(1, 0))
  bd = o.conv(o.conv(x, c(448), 1), c(384), 3, padding=1)
  bda = o.conv(bd, c(384), (1, 3), padding=(0, 1))
  bdb = o.conv(bd, c(384), (3, 1), padding=(1, 0))
  bp = o.conv(o.avg_pool(x), c(192), 1)
  return o.identity(b1, b3a, b3b, bda, bdb, bp)


#: Inception-V3's 13 blocks in order: (name, kind, block function, its keyword arguments); kinds stem, a-e
#: (Szegedy et al. 2016: A Fig. 5, C Fig. 6, E Fig. 7, B/D the grid reductions) and head (global average pool).
INCEPTION_V3_BLOCKS = (
    ("stem", "stem", _inception_stem, {}),
    *((f"Mixed_5{s}", "a", _inception_a, {"pool_features": pf}) for s, pf in zip("bcd", (32, 64, 64))),
    ("Mixed_6a", "b", _inception_b, {}),
    *((f"Mixed_6{s}", "c", _inception_c, {"c7": c7}) for s, c7 in zip("bcde", (128, 160, 160, 192))),
    ("Mixed_7a", "d", _inception_d, {}),
    *((f"Mixed_7{s}", "e", _inception_e, {}) for s in "bc"),
    ("head", "head", lambda o, c, x: o.global_avg(x), {}),
)


class SqueezeNet(nn.Module):
  """SqueezeNet with complex bypass, as IOS defines it (12 blocks, 8 fire modules).

  Iandola et al., "SqueezeNet", arXiv:1602.07360 (complex-bypass variant: a 1x1 conv bypass where the
  channel counts differ, the identity elsewhere); IOS (Ding et al., MLSys 2021) benchmark at
  224x224. Ends with a 1x1 conv to ``num_classes`` channels (ReLU) and global average pooling.

  Attributes:
    width: multiplier of every fire-module channel count.
    num_classes: output channels of the last 1x1 convolution.
    dtype, param_dtype, conv_general_dilated: as in :class:`InceptionV3`.

  Example:
    >>> m = SqueezeNet(width=0.25, num_classes=10)
    >>> x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    >>> v = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)    # shapes only: nothing is computed
    >>> jax.eval_shape(m.apply, v, x).shape
    (1, 10)
  """
  width: float = 1.0
  num_classes: int = 1000
  dtype: Any = None
  param_dtype: Any = jnp.float32
  conv_general_dilated: ConvGeneral = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    _check_input("SqueezeNet", x, 48)
    o = _Ops(self.dtype, self.param_dtype, self.conv_general_dilated)
    c = lambda n: _ch(n, self.width)

    def fire(v, squeeze, expand):
      s = o.conv(v, c(squeeze), 1)
      e = o.identity(o.conv(s, c(expand), 3, padding=1), o.conv(s, c(expand), 1))
      if e.shape[-1] != v.shape[-1]:
        v = o.conv(v, 2 * c(expand), 1)
      return o.identity([e, v])

    x = o.conv(x, c(96), 7, 2, 3)
    x = o.max_pool(x, 3, 2)
    x = fire(x, 16, 64)
    x = fire(x, 16, 64)
    x = fire(x, 32, 128)
    x = o.max_pool(x, 3, 2)
    x = fire(x, 32, 128)
    x = fire(x, 48, 192)
    x = fire(x, 48, 192)
    x = fire(x, 64, 256)
    x = o.max_pool(x, 3, 2)
    x = fire(x, 64, 256)
    x = o.conv(x, self.num_classes, 1)
    return o.global_avg(x)


def watts_strogatz_dag(n: int, k: int, p: float, seed: int) -> tuple[tuple[int, int], ...]:
  """A Watts-Strogatz small-world graph, oriented from lower to higher node index (a DAG).

  Watts & Strogatz, "Collective dynamics of 'small-world' networks", Nature 1998, as used by
  RandWire (Xie et al., "Exploring Randomly Wired Neural Networks", ICCV 2019, Sec. 3.2): a ring where
  every node links to its ``k/2`` nearest neighbours on each side; then, for every node ``i`` and
  offset ``j = 1..k/2`` in turn, with probability ``p`` the edge ``(i, i+j mod n)`` is replaced by
  an edge from ``i`` to a node drawn uniformly among those not yet linked to ``i``. Rewiring keeps
  the number of edges at ``n*k/2``. Deterministic for a given ``seed`` (numpy ``default_rng``).

  Args:
    n: number of nodes (> k).
    k: even number of ring neighbours per node (>= 2).
    p: rewiring probability in [0, 1].
    seed: integer seed.

  Returns:
    Sorted edges ``(u, v)`` with ``u < v``.

  Example:
    >>> len(watts_strogatz_dag(16, 4, 0.75, seed=2))
    32
  """
  if not (isinstance(k, int) and k >= 2 and k % 2 == 0):
    raise ValueError(f"k must be an even integer >= 2 (neighbours per node), got {k!r}.")
  if not (isinstance(n, int) and n > k):
    raise ValueError(f"n must be an integer larger than k={k}, got {n!r}.")
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"p is a probability and must lie in [0, 1], got {p!r}.")
  adj = np.zeros((n, n), dtype=bool)
  for i in range(n):
    for j in range(1, k // 2 + 1):
      adj[i, (i + j) % n] = adj[(i + j) % n, i] = True
  rng = np.random.default_rng(seed)
  for i in range(n):
    for j in range(1, k // 2 + 1):
      if rng.random() >= p:
        continue
      free = np.flatnonzero(~adj[i])
      free = free[free != i]
      if free.size == 0:
        continue
      t = int(rng.choice(free))
      cur = (i + j) % n
      adj[i, cur] = adj[cur, i] = False
      adj[i, t] = adj[t, i] = True
  u, v = np.nonzero(np.triu(adj, 1))
  return tuple((int(a), int(b)) for a, b in zip(u, v))


# The four stage graphs of IOS's randwire_large: ws-{16,32,32,32}-4-0.75 (IOS ships files generated
# with seeds 2..5; here the same seeds drive our own generator).
RANDWIRE_LARGE_GRAPHS = ((16, 4, 0.75, 2), (32, 4, 0.75, 3), (32, 4, 0.75, 4), (32, 4, 0.75, 5))


class RandWire(nn.Module):
  """RandWire (randwire_large of IOS): a 3x3/2 conv, four random-graph stages, ReLU, 1x1 conv, pool.

  Xie et al., "Exploring Randomly Wired Neural Networks for Image Recognition", ICCV 2019; IOS (Ding
  et al., MLSys 2021) benchmark at 224x224 with channels 154 and Watts-Strogatz graphs
  ws-{16,32,32,32}-4-0.75. Every graph node is a ReLU-SepConv unit (ReLU, 3x3 depthwise, 1x1
  pointwise) whose inputs are summed; source nodes read the stage input with stride 2, and the
  stage output is the sum of the sink nodes. Stage ``s`` has ``channels * 2**s`` channels.
  Output: ``(batch, head_channels)``.

  Attributes:
    channels: channels of the first stage (154 in IOS); the front conv has ``channels // 2``.
    graphs: one ``(n, k, p, seed)`` per stage for :func:`watts_strogatz_dag`.
    head_channels: output channels of the final 1x1 conv (1280).
    dtype, param_dtype, conv_general_dilated: as in :class:`InceptionV3`.

  Example:
    >>> m = RandWire(channels=8, graphs=((6, 4, 0.75, 0),), head_channels=16)
    >>> x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    >>> v = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)    # shapes only: nothing is computed
    >>> jax.eval_shape(m.apply, v, x).shape
    (1, 16)
  """
  channels: int = 154
  graphs: tuple[tuple[int, int, float, int], ...] = RANDWIRE_LARGE_GRAPHS
  head_channels: int = 1280
  dtype: Any = None
  param_dtype: Any = jnp.float32
  conv_general_dilated: ConvGeneral = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    _check_input("RandWire", x, 2 ** (len(self.graphs) + 1))
    o = _Ops(self.dtype, self.param_dtype, self.conv_general_dilated)
    x = o.conv(x, self.channels // 2, 3, 2, 1, act="identity")
    for s, (n, k, p, seed) in enumerate(self.graphs):
      ch = self.channels * 2 ** s
      ins: list[list[int]] = [[] for _ in range(n)]
      has_out = [False] * n
      for a, b in watts_strogatz_dag(n, k, p, seed):
        ins[b].append(a)
        has_out[a] = True
      outs: list[Any] = [None] * n
      for u in range(n):  # index order is a topological order (edges go from low to high)
        if not ins[u]:
          outs[u] = o.sep_conv(x, ch, 3, 2, 1)
        else:
          outs[u] = o.sep_conv(o.identity([outs[a] for a in ins[u]]), ch, 3, 1, 1)
      x = o.identity([outs[u] for u in range(n) if not has_out[u]])
    x = o.conv(nn.relu(x), self.head_channels, 1, act="identity")
    return o.global_avg(x)


class NasNetA(nn.Module):
  """NasNet-A as IOS defines it (default: large, 6@4032, stem 96, filters 168, 331x331).

  Zoph et al., "Learning Transferable Architectures for Scalable Image Recognition", CVPR 2018; IOS
  (Ding et al., MLSys 2021) benchmark: stem conv, two stem cells, then three stages of one "first"
  cell and ``num_normal`` normal cells, with a reduction cell between stages; ReLU and global average
  pooling at the end. Cells are built from ReLU-SepConv pairs, ReLU-1x1-conv projections and 3x3
  pools, as in IOS's ``nasnet.py`` (which differs in details from the original NasNet: e.g. its
  normal cell concatenates five branches). Output: ``(batch, 20 * filters)``.

  Attributes:
    stem_filters: channels of the first 3x3/2 conv (96).
    filters: cell filters of the first stage (168); ``filters // 4`` must be positive.
    num_normal: normal cells per stage (5 gives IOS's 374 operators).
    dtype, param_dtype, conv_general_dilated: as in :class:`InceptionV3`.

  Example:
    >>> m = NasNetA(stem_filters=8, filters=8, num_normal=1)
    >>> x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    >>> v = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)    # shapes only: nothing is computed
    >>> jax.eval_shape(m.apply, v, x).shape
    (1, 160)
  """
  stem_filters: int = 96
  filters: int = 168
  num_normal: int = 5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  conv_general_dilated: ConvGeneral = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.filters < 4 or self.filters % 4:
      raise ValueError(f"NasNetA filters must be a positive multiple of 4 (the stem uses filters // 4), "
                       f"got {self.filters}.")
    _check_input("NasNetA", x, 32)
    o = _Ops(self.dtype, self.param_dtype, self.conv_general_dilated)

    def branch_sep(v, out, k, stride, stem=False):
      mid = out if stem else v.shape[-1]
      v = o.sep_conv(v, mid, k, stride, k // 2)
      return o.sep_conv(v, out, k, 1, k // 2)

    def stem0(x, f):
      x1 = o.relu_conv(x, f)
      c0 = o.identity([branch_sep(x1, f, 5, 2), branch_sep(x, f, 7, 2, stem=True)])
      c1 = o.identity([o.max_pool(x1, 3, 2, 1), branch_sep(x, f, 7, 2, stem=True)])
      c2l = o.avg_pool(x1, 3, 2, 1)
      c2r = branch_sep(x, f, 5, 2, stem=True)
      c3r = o.avg_pool(c0)
      c4l = branch_sep(c0, f, 3, 1)
      c4r = o.max_pool(x1, 3, 2, 1)
      return o.identity(c1, [c2l, c2r], [c3r, c0], [c4l, c4r])

    def stem1(hp, h, f):
      xl = o.relu_conv(hp, f)
      xr = o.identity([o.relu_conv(h, f // 2, 1, 2), o.relu_conv(h, f // 2, 1, 2)])
      c0 = o.identity([branch_sep(xl, f, 5, 2), branch_sep(xr, f, 7, 2)])
      c1 = o.identity([o.max_pool(xl, 3, 2, 1), branch_sep(xr, f, 7, 2)])
      c2l = o.avg_pool(xl, 3, 2, 1)
      c2r = branch_sep(xr, f, 5, 2)
      c3r = o.avg_pool(c0)
      c4l = branch_sep(c0, f, 3, 1)
      c4r = o.max_pool(xl, 3, 2, 1)
      return o.identity(c1, [c2l, c2r], [c3r, c1], [c4l, c4r])

    def first_cell(x, xp, fl, fr):
      xl = o.identity(o.relu_conv(xp, fl, 1, 2), o.relu_conv(xp, fl, 1, 2))
      xr = o.relu_conv(x, fr)
      c0l, c0r = branch_sep(xr, fr, 5, 1), branch_sep(xr, fr, 3, 1)
      c1l, c1r = branch_sep(xl, fr, 5, 1), branch_sep(xl, fr, 3, 1)
      c2l = o.avg_pool(xr)
      c3l, c3r = o.avg_pool(xl), o.avg_pool(xl)
      c4l = branch_sep(xr, fr, 3, 1)
      return o.identity(xl, [c0l, c0r], [c1l, c1r], [c2l, xl], [c3l, c3r], [c4l, xr])

    def normal_cell(x, xp, fl, fr):
      xl = o.relu_conv(xp, fl)
      xr = o.relu_conv(x, fr)
      c0l, c0r = branch_sep(xr, fr, 5, 1), branch_sep(xl, fl, 3, 1)
      c1l, c1r = branch_sep(xl, fl, 5, 1), branch_sep(xl, fl, 3, 1)
      c2l = o.avg_pool(xr)
      c3l, c3r = o.avg_pool(xl), o.avg_pool(xl)
      c4l = branch_sep(xr, fr, 3, 1)
      return o.identity([c0l, c0r], [c1l, c1r], [c2l, xl], [c3l, c3r], [c4l, xr])

    def reduction_cell(x, xp, fl, fr):
      xl = o.relu_conv(xp, fl)
      xr = o.relu_conv(x, fr)
      c0 = o.identity([branch_sep(xr, fr, 5, 2), branch_sep(xl, fr, 7, 2)])
      c1l = o.max_pool(xr, 3, 2, 1)
      c1r = branch_sep(xl, fr, 7, 2)
      c1 = o.identity([c1l, c1r])
      c2l = o.avg_pool(xr, 3, 2, 1)
      c2r = branch_sep(xl, fr, 5, 2)
      c3r = o.avg_pool(c0)
      c4l = branch_sep(c0, fr, 3, 1)
      c4r = o.max_pool(xr, 3, 2, 1)
      return o.identity([c1l, c1r], [c2l, c2r], [c1, c3r], [c4l, c4r])

    f = self.filters
    v1 = o.conv(x, self.stem_filters, 3, 2, 0, act="identity")
    v2 = stem0(v1, f // 4)
    v3 = stem1(v2, v1, f // 2)
    prev, cur = v2, v3
    for stage in range(3):
      m = 2 ** stage
      if stage > 0:  # reduction, then the first cell reads the output from before the last normal one
        red = reduction_cell(cur, prev, m * f, m * f)
        before = prev
        prev, cur = cur, red
        nxt = first_cell(cur, before, m * f // 2, m * f)
      else:
        nxt = first_cell(cur, prev, f // 2, f)
      prev, cur = cur, nxt
      for _ in range(self.num_normal):
        prev, cur = cur, normal_cell(cur, prev, m * f, m * f)
    return o.global_avg(nn.relu(cur))


def ios_benchmark_nets(small: bool = False, dtype: Any = None) -> dict[str, tuple[nn.Module, tuple]]:
  """The four IOS benchmark networks with their input shapes (NHWC, batch 1).

  Args:
    small: tiny configurations for CPU tests (fewer channels, small inputs, fewer NasNet cells;
      RandWire keeps IOS's graphs and Inception/SqueezeNet keep their structure, so the operator
      graphs stay the same except for NasNet's cell count).
    dtype: parameter and computation dtype (e.g. ``jnp.bfloat16``); None means float32.

  Returns:
    ``{"inception_v3", "squeezenet", "randwire", "nasnet"} -> (module, input_shape)``; at full size
    the shapes are (1, 299, 299, 3), (1, 224, 224, 3), (1, 224, 224, 3) and (1, 331, 331, 3).

  Example:
    >>> model, shape = ios_benchmark_nets()["inception_v3"]
    >>> shape
    (1, 299, 299, 3)
  """
  kw = {"dtype": dtype, "param_dtype": jnp.float32 if dtype is None else dtype}
  if small:
    return {
        "inception_v3": (InceptionV3(width=0.125, **kw), (1, 75, 75, 3)),
        "squeezenet": (SqueezeNet(width=0.25, num_classes=16, **kw), (1, 64, 64, 3)),
        "randwire": (RandWire(channels=8, head_channels=32, **kw), (1, 64, 64, 3)),
        "nasnet": (NasNetA(stem_filters=8, filters=8, num_normal=1, **kw), (1, 64, 64, 3)),
    }
  return {
      "inception_v3": (InceptionV3(**kw), (1, 299, 299, 3)),
      "squeezenet": (SqueezeNet(**kw), (1, 224, 224, 3)),
      "randwire": (RandWire(**kw), (1, 224, 224, 3)),
      "nasnet": (NasNetA(**kw), (1, 331, 331, 3)),
  }


def ios_init_params(model: nn.Module, input_shape: Sequence[int], seed: int = 0) -> dict:
  """Fast random variables for ``model`` without compiling ``model.init``.

  ``model.init`` draws every kernel with threefry inside one program, which takes tens of seconds
  to compile for these 100-500-convolution nets (on CPU and GPU alike). This helper takes the variable
  *structure* from ``jax.eval_shape(model.init, ...)``
  (nothing is computed) and fills it on the host with He-normal kernels (std ``sqrt(2 / fan_in)``,
  fan_in = kernel height x width x input channels per group) and small normal biases
  (std 0.01), from ``numpy.random.default_rng(seed)``. Dtypes follow the model's ``param_dtype``.
  Nonzero biases matter for latency when the weights are closed over (XLA constants): XLA folds adds
  of all-zero constants, so ``model.init``'s zero biases give a different program (on an H100, XLA's
  Inception-V3 ran 0.77 ms with them vs 0.54 ms with these; ``benchmarks/ios_isolated.py --init``).
  ``model.init(key, x)`` remains the flax way and gives the same structure.

  Args:
    model: a flax module (e.g. from :func:`ios_benchmark_nets`).
    input_shape: NHWC input shape.
    seed: numpy seed.

  Returns:
    The variables dict ``{"params": ...}`` of device arrays.

  Example:
    >>> m, shape = ios_benchmark_nets(small=True)["squeezenet"]
    >>> v = ios_init_params(m, shape)
    >>> sum(p.size for p in jax.tree_util.tree_leaves(v)), jax.eval_shape(m.apply, v, jnp.ones(shape)).shape
    (72800, (1, 16))
  """
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(leaf):
    if len(leaf.shape) == 4:  # conv kernel (kh, kw, cin / groups, cout)
      std = np.sqrt(2.0 / float(np.prod(leaf.shape[:3])))
    else:
      std = 0.01
    a = rng.standard_normal(leaf.shape, dtype=np.float32) * np.float32(std)
    return jnp.asarray(a, dtype=leaf.dtype)

  return jax.tree_util.tree_map(fill, shapes)
