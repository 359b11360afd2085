"""A family of realistic JAX programs for cost-model datasets, with XLA option variants.

Each :class:`ProgramSpec` is one program (a function plus abstract arguments) of one *family* (MLP,
convolution, attention, ...). Compiling a spec under several XLA option sets (:func:`option_variants`)
gives *variants of the same program* whose runtimes a cost model must rank, as in the tile-size and
fusion tasks of Kaufman et al. (MLSys 2021, Sec. 5); families let an evaluation hold out whole kinds of
programs.

Example:
  >>> rng = np.random.default_rng(0)
  >>> spec = sample_program("mlp", rng, scale="cpu")
  >>> hlo = jax.jit(spec.fn).lower(*spec.args).compile().as_text()
  >>> "ENTRY" in hlo
  True
"""

from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FAMILIES: tuple[str, ...] = ("mlp", "conv", "attention", "norm", "elementwise", "reduction",
                             "softmax_xent", "embedding", "transpose", "resblock", "rnn", "batched_matmul")
# Families added in session 12 (issue 24 item 3): training steps (backward passes), whole blocks, and
# kinds of operator the first twelve lack (depthwise/grouped convolutions, pooling, sort/top-k, scatter).
EXTRA_FAMILIES: tuple[str, ...] = ("transformer_block", "mlp_train", "conv_grad", "depthwise_conv", "pooling",
                                   "gated_mlp", "topk_sort", "segment_sum")
ALL_FAMILIES: tuple[str, ...] = FAMILIES + EXTRA_FAMILIES


class ProgramSpec(NamedTuple):
  """One program: ``fn(*args)`` with ``args`` as ``jax.ShapeDtypeStruct`` (int args carry ``high``)."""
  family: str
  config: dict
  fn: Callable
  args: tuple
  int_high: tuple  # per argument: None for floats, upper bound (exclusive) for integer arguments

  @property
  def name(self) -> str:
    return self.family + ":" + json.dumps(self.config, sort_keys=True)


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


def _pick(rng, xs):
  return xs[int(rng.integers(len(xs)))]


_ACTS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh, "silu": jax.nn.silu}


def _mlp(rng, big):
  b = int(_pick(rng, [1024, 4096, 8192, 16384] if big else [8, 16, 32]))
  depth = int(rng.integers(1, 4))
  widths = [int(_pick(rng, [256, 512, 1024, 2048, 4096] if big else [16, 32, 48])) for _ in range(depth + 1)]
  act, dt = _pick(rng, list(_ACTS)), _pick(rng, ["float32", "bfloat16"])
  cfg = dict(batch=b, widths=widths, act=act, dtype=dt)

  def fn(x, *ws):
    for w in ws:
      x = _ACTS[act](x @ w)
    return x
  args = [_sds((b, widths[0]), dt)] + [_sds((widths[i], widths[i + 1]), dt) for i in range(depth)]
  return cfg, fn, args


def _conv(rng, big):
  b = int(_pick(rng, [8, 32, 64] if big else [2, 4]))
  hw = int(_pick(rng, [14, 28, 56] if big else [8, 12]))
  cin, cout = (int(_pick(rng, [32, 64, 128, 256])) for _ in range(2)) if big else (int(_pick(rng, [3, 8])),
                                                                                  int(_pick(rng, [8, 16])))
  k, stride = int(_pick(rng, [1, 3, 5])), int(_pick(rng, [1, 2]))
  dt = _pick(rng, ["float32", "bfloat16"])
  layout = _pick(rng, ["NHWC", "NCHW"])
  cfg = dict(batch=b, hw=hw, cin=cin, cout=cout, k=k, stride=stride, dtype=dt, layout=layout)
  dn = (layout, "HWIO", layout)

  def fn(x, w, bias):
    y = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=dn)
    shp = (1, 1, 1, cout) if layout == "NHWC" else (1, cout, 1, 1)
    return jax.nn.relu(y + bias.reshape(shp))
  xs = (b, hw, hw, cin) if layout == "NHWC" else (b, cin, hw, hw)
  return cfg, fn, [_sds(xs, dt), _sds((k, k, cin, cout), dt), _sds((cout,), dt)]


def _attention(rng, big):
  b = int(_pick(rng, [4, 8, 16] if big else [1, 2]))
  s = int(_pick(rng, [256, 512, 1024, 2048] if big else [16, 32]))
  h = int(_pick(rng, [4, 8, 16] if big else [2]))
  d = int(_pick(rng, [32, 64, 128] if big else [8, 16]))
  causal = bool(rng.integers(2))
  dt = _pick(rng, ["float32", "bfloat16"])
  cfg = dict(batch=b, seq=s, heads=h, head_dim=d, causal=causal, dtype=dt)

  def fn(q, k, v):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d).astype(np.float32)
    if causal:
      mask = jnp.tril(jnp.ones((s, s), bool))
      logits = jnp.where(mask, logits, -1e9)
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)
  return cfg, fn, [_sds((b, s, h, d), dt)] * 3


def _norm(rng, big):
  rows = int(_pick(rng, [4096, 16384, 65536] if big else [8, 32]))
  cols = int(_pick(rng, [256, 768, 1024, 4096] if big else [16, 64]))
  kind = _pick(rng, ["layernorm", "rmsnorm", "batchnorm"])
  dt = _pick(rng, ["float32", "bfloat16"])
  cfg = dict(rows=rows, cols=cols, kind=kind, dtype=dt)

  def fn(x, g, bta):
    xf = x.astype(jnp.float32)
    if kind == "layernorm":
      mu = xf.mean(-1, keepdims=True)
      y = (xf - mu) * jax.lax.rsqrt(((xf - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    elif kind == "rmsnorm":
      y = xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + 1e-6)
    else:
      mu = xf.mean(0, keepdims=True)
      y = (xf - mu) * jax.lax.rsqrt(xf.var(0, keepdims=True) + 1e-5)
    return (y * g + bta).astype(x.dtype)
  return cfg, fn, [_sds((rows, cols), dt), _sds((cols,), "float32"), _sds((cols,), "float32")]


_UNARY = ["sin", "exp", "tanh", "abs", "sqrt_abs", "square", "sigmoid", "log1p_abs", "neg", "cos"]
_BINARY = ["add", "mul", "sub", "max", "min", "div_safe"]


def _apply_unary(op, x):
  return {"sin": jnp.sin, "exp": lambda a: jnp.exp(-jnp.abs(a)), "tanh": jnp.tanh, "abs": jnp.abs,
          "sqrt_abs": lambda a: jnp.sqrt(jnp.abs(a)), "square": lambda a: a * a,
          "sigmoid": jax.nn.sigmoid, "log1p_abs": lambda a: jnp.log1p(jnp.abs(a)),
          "neg": lambda a: -a, "cos": jnp.cos}[op](x)


def _apply_binary(op, x, y):
  return {"add": jnp.add, "mul": jnp.multiply, "sub": jnp.subtract, "max": jnp.maximum,
          "min": jnp.minimum, "div_safe": lambda a, b: a / (1.0 + jnp.abs(b))}[op](x, y)


def _elementwise(rng, big):
  n = int(_pick(rng, [1 << 22, 1 << 24, 1 << 26] if big else [256, 1024]))
  cols = int(_pick(rng, [1, 128, 1024]))
  length = int(rng.integers(2, 12))
  ops = [(_pick(rng, _UNARY), None) if rng.random() < 0.6 else (_pick(rng, _BINARY), int(rng.integers(2)))
         for _ in range(length)]
  dt = _pick(rng, ["float32", "bfloat16", "float16"])
  bcast = bool(rng.integers(2)) and cols > 1
  cfg = dict(n=n, cols=cols, ops=[o[0] for o in ops], dtype=dt, broadcast=bcast)
  shape = (n // cols, cols) if cols > 1 else (n,)

  def fn(x, y, r):
    for op, which in ops:
      if which is None:
        x = _apply_unary(op, x)
      else:
        x = _apply_binary(op, x, r if (bcast and which) else y)
    return x
  rshape = (1, cols) if cols > 1 else (1,)
  return cfg, fn, [_sds(shape, dt), _sds(shape, dt), _sds(rshape, dt)]


def _reduction(rng, big):
  shape = tuple(int(_pick(rng, [256, 1024, 4096] if big else [4, 8, 16])) for _ in range(
      int(rng.integers(2, 4))))
  axis = int(rng.integers(len(shape)))
  kind = _pick(rng, ["sum", "max", "logsumexp", "var", "argmax", "mean_sq"])
  dt = _pick(rng, ["float32", "bfloat16"])
  cfg = dict(shape=list(shape), axis=axis, kind=kind, dtype=dt)

  def fn(x):
    if kind == "sum":
      return x.sum(axis)
    if kind == "max":
      return x.max(axis)
    if kind == "logsumexp":
      return jax.nn.logsumexp(x.astype(jnp.float32), axis)
    if kind == "var":
      return x.astype(jnp.float32).var(axis)
    if kind == "argmax":
      return jnp.argmax(x, axis)
    return (x * x).mean(axis)
  if big and int(np.prod(shape)) > (1 << 28):
    shape = shape[:-1] + (max(1, (1 << 28) // int(np.prod(shape[:-1]))),)
    cfg["shape"] = list(shape)
  return cfg, fn, [_sds(shape, dt)]


def _softmax_xent(rng, big):
  b = int(_pick(rng, [1024, 4096, 16384] if big else [8, 16]))
  v = int(_pick(rng, [1000, 8192, 32000, 50257] if big else [10, 50]))
  if big and b * v > (1 << 28):
    b = max(256, (1 << 28) // v)
  dt = _pick(rng, ["float32", "bfloat16"])
  smooth = float(_pick(rng, [0.0, 0.1]))
  cfg = dict(batch=b, vocab=v, dtype=dt, smoothing=smooth)

  def fn(logits, labels):
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(lp, labels[:, None], -1)[:, 0]
    return ((1 - smooth) * nll - smooth * lp.mean(-1)).mean()
  return cfg, fn, [_sds((b, v), dt), _sds((b,), "int32")], (None, v)


def _embedding(rng, big):
  vocab = int(_pick(rng, [8192, 32768, 131072] if big else [32, 100]))
  d = int(_pick(rng, [128, 512, 1024] if big else [8, 16]))
  b, L = (int(_pick(rng, [64, 256])), int(_pick(rng, [256, 1024]))) if big else (4, 8)
  pool = _pick(rng, ["sum", "mean", "none"])
  dt = _pick(rng, ["float32", "bfloat16"])
  cfg = dict(vocab=vocab, dim=d, batch=b, length=L, pool=pool, dtype=dt)

  def fn(table, ids):
    e = jnp.take(table, ids, axis=0)
    if pool == "sum":
      return e.sum(1)
    if pool == "mean":
      return e.mean(1)
    return e * 2.0
  return cfg, fn, [_sds((vocab, d), dt), _sds((b, L), "int32")], (None, vocab)


def _transpose(rng, big):
  rank = int(rng.integers(2, 5))
  base = [128, 256, 512, 1024] if big else [4, 8]
  shape = [int(_pick(rng, base)) for _ in range(rank)]
  while big and int(np.prod(shape)) > (1 << 26):
    shape[int(np.argmax(shape))] //= 2
  perm = [int(p) for p in rng.permutation(rank)]
  if perm == sorted(perm):
    perm = perm[::-1]
  dt = _pick(rng, ["float32", "bfloat16"])
  extra = _pick(rng, ["none", "add", "scale"])
  cfg = dict(shape=shape, perm=perm, dtype=dt, extra=extra)

  def fn(x, y):
    t = jnp.transpose(x, perm)
    if extra == "add":
      return t + jnp.transpose(y, perm)
    if extra == "scale":
      return t * 0.5
    return t
  return cfg, fn, [_sds(shape, dt), _sds(shape, dt)]


def _resblock(rng, big):
  b = int(_pick(rng, [16, 32, 64] if big else [2]))
  hw = int(_pick(rng, [8, 16, 32] if big else [8]))
  c = int(_pick(rng, [32, 64, 128] if big else [8]))
  dt = _pick(rng, ["float32", "bfloat16"])
  cfg = dict(batch=b, hw=hw, channels=c, dtype=dt)
  dn = ("NHWC", "HWIO", "NHWC")

  def bn(y):
    yf = y.astype(jnp.float32)
    mu, var = yf.mean((0, 1, 2)), yf.var((0, 1, 2))
    return ((yf - mu) * jax.lax.rsqrt(var + 1e-5)).astype(y.dtype)

  def fn(x, w1, w2):
    y = jax.nn.relu(bn(jax.lax.conv_general_dilated(x, w1, (1, 1), "SAME", dimension_numbers=dn)))
    y = bn(jax.lax.conv_general_dilated(y, w2, (1, 1), "SAME", dimension_numbers=dn))
    return jax.nn.relu(x + y)
  return cfg, fn, [_sds((b, hw, hw, c), dt), _sds((3, 3, c, c), dt), _sds((3, 3, c, c), dt)]


def _rnn(rng, big):
  t = int(_pick(rng, [16, 32, 64] if big else [4, 6]))
  b = int(_pick(rng, [64, 256, 1024] if big else [4]))
  h = int(_pick(rng, [256, 512, 1024] if big else [8]))
  cell = _pick(rng, ["tanh", "gru_like"])
  dt = _pick(rng, ["float32", "bfloat16"])
  cfg = dict(steps=t, batch=b, hidden=h, cell=cell, dtype=dt)

  def fn(xs, w, u):
    def step(hh, x):
      z = hh @ w + x @ u
      if cell == "tanh":
        nh = jnp.tanh(z)
      else:
        g = jax.nn.sigmoid(z)
        nh = g * hh + (1 - g) * jnp.tanh(z)
      return nh, nh.sum()
    hT, s = jax.lax.scan(step, jnp.zeros((b, h), xs.dtype), xs)
    return hT, s
  return cfg, fn, [_sds((t, b, h), dt), _sds((h, h), dt), _sds((h, h), dt)]


def _batched_matmul(rng, big):
  bt = int(_pick(rng, [1, 8, 32, 128] if big else [2, 3]))
  m, k, n = (int(_pick(rng, [256, 512, 1024, 2048, 4096] if big else [4, 8, 16])) for _ in range(3))
  while big and bt * (m * k + k * n + m * n) > (1 << 27):
    bt = max(1, bt // 2)
    if bt == 1:
      m = max(128, m // 2)
  dt = _pick(rng, ["float32", "bfloat16", "float16"])
  epi = _pick(rng, ["none", "relu", "bias", "scale_cast"])
  cfg = dict(batch=bt, m=m, k=k, n=n, dtype=dt, epilogue=epi)

  def fn(a, bb, c):
    y = jnp.einsum("bmk,bkn->bmn", a, bb)
    if epi == "relu":
      return jax.nn.relu(y)
    if epi == "bias":
      return y + c
    if epi == "scale_cast":
      return (y * 0.5).astype(jnp.float32)
    return y
  return cfg, fn, [_sds((bt, m, k), dt), _sds((bt, k, n), dt), _sds((n,), dt)]


def _layernorm(x, eps=1e-5):
  xf = x.astype(jnp.float32)
  mu = xf.mean(-1, keepdims=True)
  return ((xf - mu) * jax.lax.rsqrt(((xf - mu) ** 2).mean(-1, keepdims=True) + eps)).astype(x.dtype)


def _transformer_block(rng, big):
  """Pre-LN transformer block: LN, QKV projection, softmax attention, output projection, residual, LN,
  MLP (GELU, ratio 2-4), residual."""
  b = int(_pick(rng, [1, 2, 4, 8] if big else [1, 2]))
  s = int(_pick(rng, [128, 256, 512, 1024] if big else [8, 16]))
  d = int(_pick(rng, [256, 512, 768, 1024] if big else [16, 32]))
  h = int(_pick(rng, [4, 8, 16] if big else [2, 4]))
  ratio = int(_pick(rng, [2, 4]))
  causal = bool(rng.integers(2))
  dt = _pick(rng, ["float32", "bfloat16"])
  cfg = dict(batch=b, seq=s, d_model=d, heads=h, mlp_ratio=ratio, causal=causal, dtype=dt)
  hd = d // h

  def fn(x, wqkv, wo, w1, w2):
    y = _layernorm(x)
    q, k, v = jnp.split((y @ wqkv).reshape(b, s, 3, h, hd), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    lg = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(hd).astype(np.float32)
    if causal:
      lg = jnp.where(jnp.tril(jnp.ones((s, s), bool)), lg, -1e9)
    p = jax.nn.softmax(lg, axis=-1).astype(x.dtype)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, s, d) @ wo
    return x + jax.nn.gelu(_layernorm(x) @ w1) @ w2
  return cfg, fn, [_sds((b, s, d), dt), _sds((d, 3 * d), dt), _sds((d, d), dt), _sds((d, ratio * d), dt),
                   _sds((ratio * d, d), dt)]


def _mlp_train(rng, big):
  """One SGD step of an MLP regression loss: forward, backward (transposed GEMMs), update."""
  b = int(_pick(rng, [256, 1024, 4096, 8192] if big else [8, 16]))
  depth = int(rng.integers(1, 4))
  widths = [int(_pick(rng, [256, 512, 1024, 2048] if big else [16, 32])) for _ in range(depth + 1)]
  act, dt = _pick(rng, list(_ACTS)), _pick(rng, ["float32", "bfloat16"])
  cfg = dict(batch=b, widths=widths, act=act, dtype=dt)

  def loss(ws, x, t):
    for w in ws[:-1]:
      x = _ACTS[act](x @ w)
    return jnp.mean(((x @ ws[-1]).astype(jnp.float32) - t) ** 2)

  def fn(x, t, *ws):
    g = jax.grad(loss)(list(ws), x, t)
    return [w - (0.01 * gw).astype(w.dtype) for w, gw in zip(ws, g)]
  args = [_sds((b, widths[0]), dt), _sds((b, widths[-1]), "float32")]
  args += [_sds((widths[i], widths[i + 1]), dt) for i in range(depth)]
  return cfg, fn, args


def _conv_grad(rng, big):
  """Gradients of a convolution + ReLU loss w.r.t. input and weights (the backward convolutions)."""
  b = int(_pick(rng, [8, 16, 32] if big else [2]))
  hw = int(_pick(rng, [14, 28, 56] if big else [8]))
  cin, cout = (int(_pick(rng, [32, 64, 128])) for _ in range(2)) if big else (4, 8)
  k, stride = int(_pick(rng, [1, 3])), int(_pick(rng, [1, 2]))
  dt = _pick(rng, ["float32", "bfloat16"])
  cfg = dict(batch=b, hw=hw, cin=cin, cout=cout, k=k, stride=stride, dtype=dt)
  dn = ("NHWC", "HWIO", "NHWC")

  def loss(x, w):
    y = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=dn)
    return jnp.sum(jax.nn.relu(y).astype(jnp.float32) ** 2)

  def fn(x, w):
    return jax.grad(loss, argnums=(0, 1))(x, w)
  return cfg, fn, [_sds((b, hw, hw, cin), dt), _sds((k, k, cin, cout), dt)]


def _depthwise_conv(rng, big):
  """MobileNet-style separable block: depthwise (grouped) k x k convolution, ReLU6, pointwise 1 x 1."""
  b = int(_pick(rng, [8, 32, 64] if big else [2]))
  hw = int(_pick(rng, [14, 28, 56, 112] if big else [8]))
  c = int(_pick(rng, [32, 64, 128, 256] if big else [4, 8]))
  cout = int(_pick(rng, [64, 128, 256] if big else [8]))
  k, stride = int(_pick(rng, [3, 5])), int(_pick(rng, [1, 2]))
  while big and b > 1 and b * hw * hw * max(c, cout) > (1 << 26):
    b //= 2
  dt = _pick(rng, ["float32", "bfloat16"])
  cfg = dict(batch=b, hw=hw, channels=c, cout=cout, k=k, stride=stride, dtype=dt)
  dn = ("NHWC", "HWIO", "NHWC")

  def fn(x, wd, wp):
    y = jax.lax.conv_general_dilated(x, wd, (stride, stride), "SAME", dimension_numbers=dn,
                                     feature_group_count=c)
    y = jnp.clip(y, 0, 6)
    return jax.lax.conv_general_dilated(y, wp, (1, 1), "SAME", dimension_numbers=dn)
  return cfg, fn, [_sds((b, hw, hw, c), dt), _sds((k, k, 1, c), dt), _sds((1, 1, c, cout), dt)]


def _pooling(rng, big):
  """Max or average pooling (``reduce_window``), optionally followed by a global mean."""
  b = int(_pick(rng, [8, 32, 64] if big else [2]))
  hw = int(_pick(rng, [28, 56, 112] if big else [8]))
  c = int(_pick(rng, [32, 64, 128, 256] if big else [4]))
  k, stride = int(_pick(rng, [2, 3])), int(_pick(rng, [1, 2]))
  kind = _pick(rng, ["max", "avg"])
  glob = bool(rng.integers(2))
  while big and b > 1 and b * hw * hw * c > (1 << 26):
    b //= 2
  dt = _pick(rng, ["float32", "bfloat16"])
  cfg = dict(batch=b, hw=hw, channels=c, k=k, stride=stride, kind=kind, global_mean=glob, dtype=dt)

  def fn(x):
    win, st = (1, k, k, 1), (1, stride, stride, 1)
    if kind == "max":
      y = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, win, st, "SAME")
    else:
      y = (jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, win, st, "SAME") / (k * k))
    return y.mean((1, 2)) if glob else y
  return cfg, fn, [_sds((b, hw, hw, c), dt)]


def _gated_mlp(rng, big):
  """SwiGLU / GeGLU feed-forward: ``(act(x W_g) * (x W_u)) W_d``."""
  t = int(_pick(rng, [512, 2048, 8192] if big else [8, 16]))
  d = int(_pick(rng, [256, 512, 1024, 2048] if big else [16]))
  f = int(_pick(rng, [1024, 2048, 4096] if big else [32]))
  act = _pick(rng, ["silu", "gelu"])
  dt = _pick(rng, ["float32", "bfloat16"])
  cfg = dict(tokens=t, d_model=d, d_ff=f, act=act, dtype=dt)

  def fn(x, wg, wu, wd):
    return (_ACTS[act](x @ wg) * (x @ wu)) @ wd
  return cfg, fn, [_sds((t, d), dt), _sds((d, f), dt), _sds((d, f), dt), _sds((f, d), dt)]


def _topk_sort(rng, big):
  """Sort, top-k or cumulative sum along the last axis."""
  rows = int(_pick(rng, [256, 1024, 4096, 16384] if big else [4, 8]))
  cols = int(_pick(rng, [128, 1024, 8192, 32000] if big else [16, 32]))
  while big and rows * cols > (1 << 26):
    rows //= 2
  kind = _pick(rng, ["sort", "topk", "cumsum", "argsort"])
  k = int(_pick(rng, [1, 8, 64]))
  dt = _pick(rng, ["float32", "bfloat16"])
  cfg = dict(rows=rows, cols=cols, kind=kind, k=k, dtype=dt)

  def fn(x):
    if kind == "sort":
      return jnp.sort(x, axis=-1)
    if kind == "topk":
      return jax.lax.top_k(x, min(k, cols))
    if kind == "cumsum":
      return jnp.cumsum(x.astype(jnp.float32), axis=-1)
    return jnp.argsort(x, axis=-1)
  return cfg, fn, [_sds((rows, cols), dt)]


def _segment_sum(rng, big):
  """Scatter-add of rows into segments (``jax.ops.segment_sum``), as in graph networks and sparse
  embedding gradients, optionally after a gather."""
  n = int(_pick(rng, [1 << 14, 1 << 16, 1 << 18] if big else [32, 64]))
  d = int(_pick(rng, [16, 64, 128, 256] if big else [4, 8]))
  while big and n * d > (1 << 25):
    n //= 2
  seg = int(_pick(rng, [256, 4096, 65536] if big else [4, 16]))
  gather = bool(rng.integers(2))
  dt = _pick(rng, ["float32", "bfloat16"])
  cfg = dict(rows=n, dim=d, segments=seg, gather=gather, dtype=dt)

  def fn(x, ids):
    v = jnp.take(x, ids[::-1] % n, axis=0) if gather else x
    return jax.ops.segment_sum(v, ids, num_segments=seg)
  return cfg, fn, [_sds((n, d), dt), _sds((n,), "int32")], (None, seg)


_MAKERS = {"mlp": _mlp, "conv": _conv, "attention": _attention, "norm": _norm,
           "elementwise": _elementwise, "reduction": _reduction, "softmax_xent": _softmax_xent,
           "embedding": _embedding, "transpose": _transpose, "resblock": _resblock, "rnn": _rnn,
           "batched_matmul": _batched_matmul, "transformer_block": _transformer_block,
           "mlp_train": _mlp_train, "conv_grad": _conv_grad, "depthwise_conv": _depthwise_conv,
           "pooling": _pooling, "gated_mlp": _gated_mlp, "topk_sort": _topk_sort,
           "segment_sum": _segment_sum}


def sample_program(family: str, rng: np.random.Generator, scale: str = "gpu") -> ProgramSpec:
  """Draw one program of ``family`` (see :data:`ALL_FAMILIES`); ``scale='cpu'`` gives tiny shapes."""
  if family not in _MAKERS:
    raise ValueError(f"family must be one of {sorted(_MAKERS)}, got {family!r}.")
  if scale not in ("cpu", "gpu"):
    raise ValueError(f"scale must be 'cpu' or 'gpu', got {scale!r}.")
  out = _MAKERS[family](rng, scale == "gpu")
  cfg, fn, args = out[:3]
  highs = tuple(out[3]) if len(out) > 3 else (None,) * len(args)
  return ProgramSpec(family, cfg, fn, tuple(args), highs)


_POOL: list[np.ndarray] = []


def make_args(spec: ProgramSpec, seed: int) -> list[jax.Array]:
  """Random concrete arguments for ``spec`` on the default device (normal floats drawn from one host
  pool at a seed-dependent offset, so no shape-specific random program is compiled; uniform ints below
  ``int_high``)."""
  if not _POOL:
    _POOL.append(np.random.default_rng(1234).standard_normal(1 << 24, dtype=np.float32))
  pool = _POOL[0]
  rng = np.random.default_rng(seed)
  out = []
  for a, hi in zip(spec.args, spec.int_high):
    n = int(np.prod(a.shape)) if a.shape else 1
    if jnp.issubdtype(a.dtype, jnp.integer):
      host = rng.integers(0, hi or 2, size=a.shape).astype(a.dtype)
    else:
      off = int(rng.integers(pool.size))
      # The pool read cyclically from off: a view unless it wraps (no 64 MB roll per argument).
      flat = pool[off:off + n] if off + n <= pool.size else np.resize(np.roll(pool, -off), n)
      host = flat.reshape(a.shape).astype(a.dtype)
    out.append(jax.device_put(host))
  return out


def option_variants(platform: str) -> list[tuple[str, dict[str, Any]]]:
  """XLA option sets that change how one program is compiled (fusion, autotuning, GEMM backend).

  Options a backend does not know make its compile fail; a collector skips those variants, and drops
  variants whose optimized HLO equals one already kept.
  """
  if platform == "gpu":
    return [
        ("default", {}),
        ("autotune0", {"xla_gpu_autotune_level": 0}),
        ("no_triton_gemm", {"xla_gpu_enable_triton_gemm": False}),
        ("no_fusion", {"xla_disable_hlo_passes":
                       "priority-fusion,fusion,multi_output_fusion,horizontal-loop-fusion"}),
    ]
  return [
      ("default", {}),
      ("no_fusion_emitters", {"xla_cpu_use_fusion_emitters": False}),
      ("fast_math", {"xla_cpu_enable_fast_math": True}),
  ]
