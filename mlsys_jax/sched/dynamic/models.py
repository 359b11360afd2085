"""Length-masked flax models whose results do not depend on padding: an LSTM and a transformer encoder.

Nimble (Shen et al., MLSys 2021, section 6) evaluates LSTM, Tree-LSTM and BERT on inputs of varying
length. Both models here take ``(x, length)`` with ``x`` of shape ``(batch, n, d)`` and ``length`` a
scalar or ``(batch,)`` array of true lengths ``<= n``; positions ``>= length`` are ignored, so padding
``n`` up to a bucket leaves the first ``length`` outputs unchanged (to float32 rounding). They plug into
:func:`mlsys_jax.sched.dynamic.bucketed_jit` directly (``length`` is its default keyword).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["MaskedLSTM", "TransformerEncoder"]


def _mask(length, batch: int, n: int):
  length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (batch,))
  return jnp.arange(n)[None, :] < length[:, None], length


class MaskedLSTM(nn.Module):
  """A one-layer LSTM over ``(batch, n, d)`` that stops at each row's true length.

  Returns ``(outputs, final_h)``: ``outputs`` ``(batch, n, features)`` (zero past the length) and the
  hidden state at the last true step ``(batch, features)``.

  >>> m = MaskedLSTM(4)
  >>> x = jnp.ones((2, 5, 3))
  >>> v = m.init(jax.random.PRNGKey(0), x, 5)
  >>> out, h = m.apply(v, x, jnp.array([2, 5]))
  >>> out.shape, h.shape, bool(jnp.all(out[0, 2:] == 0))
  ((2, 5, 4), (2, 4), True)
  """
  features: int

  @nn.compact
  def __call__(self, x, length):
    b, n, _ = x.shape
    h_dim = self.features
    gates_x = nn.Dense(4 * h_dim, name="wx")(x)  # (b, n, 4h), all steps at once
    wh = self.param("wh", nn.initializers.orthogonal(), (h_dim, 4 * h_dim), x.dtype)
    mask, _ = _mask(length, b, n)

    def step(carry, inp):
      h, c = carry
      gx, m = inp
      g = gx + h @ wh
      i, f, u, o = jnp.split(g, 4, axis=-1)
      c_new = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(u)
      h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
      m = m[:, None]
      h, c = jnp.where(m, h_new, h), jnp.where(m, c_new, c)
      return (h, c), jnp.where(m, h_new, 0.0)

    zeros = jnp.zeros((b, h_dim), x.dtype)
    (h, _), ys = lax.scan(step, (zeros, zeros), (jnp.swapaxes(gates_x, 0, 1), mask.T))
    return jnp.swapaxes(ys, 0, 1), h


class TransformerEncoder(nn.Module):
  """Pre-norm transformer encoder with key-padding masks over ``(batch, n, d_model)``.

  Returns ``(tokens, pooled)``: per-token outputs ``(batch, n, d_model)`` (padded rows hold finite
  values to be sliced off) and the masked mean over true tokens ``(batch, d_model)``.

  >>> m = TransformerEncoder(num_layers=1, d_model=8, num_heads=2)
  >>> x = jnp.ones((1, 3, 8))
  >>> v = m.init(jax.random.PRNGKey(0), x, 3)
  >>> [a.shape for a in m.apply(v, x, 2)]
  [(1, 3, 8), (1, 8)]
  """
  num_layers: int = 2
  d_model: int = 256
  num_heads: int = 4
  d_ff: int | None = None

  @nn.compact
  def __call__(self, x, length):
    b, n, d = x.shape
    mask, length = _mask(length, b, n)
    attn_mask = mask[:, None, None, :]  # (b, 1, q, k): every query sees the true keys only
    for i in range(self.num_layers):
      y = nn.LayerNorm(name=f"ln_a{i}")(x)
      y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name=f"attn{i}")(y, y, mask=attn_mask)
      x = x + y
      y = nn.LayerNorm(name=f"ln_f{i}")(x)
      y = nn.Dense(self.d_ff or 4 * d, name=f"ff_in{i}")(y)
      y = nn.Dense(d, name=f"ff_out{i}")(jax.nn.gelu(y))
      x = x + y
    x = nn.LayerNorm(name="ln_out")(x)
    m = mask[..., None].astype(x.dtype)
    pooled = (x * m).sum(1) / jnp.maximum(length, 1)[:, None].astype(x.dtype)
    return x, pooled
