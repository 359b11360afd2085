"""GradSigns: watermarking a model through the signs of its expected input gradients.

Aramoon, Chen and Qu, "Don't Forget to Sign the Gradients!", MLSys 2021. The owner picks a target class
t, a secret set of C carrier coordinates of the input, a secret projection K (N x C, entries uniform in
[-1, 1]) and an N-bit signature b. During training a regularizer pushes the projection of the *expected
input gradient* of the cross-entropy on class-t inputs,

    g_bar = E_{x in class t} [ d CE(f(x), t) / dx ],      p = sigmoid(K g_bar[C]),

towards the signature: L = CE + lambda * BCE(b, p). The signature is read back as b_hat = 1[K g_bar[C] >= 0],
from the exact gradients (white-box) or from prediction queries only (black-box): one-sided finite
differences of the cross-entropy of the returned probabilities, one query per carrier and input plus one
for the input itself. Verification compares b_hat with b: an independent model matches each bit with
probability 1/2, so the false-claim probability of m or more matching bits out of N is the binomial tail
P(Bin(N, 1/2) >= m).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax._checks import check_int, check_range

__all__ = [
    "WatermarkKey",
    "extract_blackbox",
    "extract_whitebox",
    "false_claim_probability",
    "gradsigns_keygen",
    "gradsigns_regularizer",
    "mean_input_gradient",
    "signature_ber",
    "verify",
]


class WatermarkKey(NamedTuple):
  """The owner's secret.

  Attributes:
    projection: (N, C) float32, entries uniform in [-1, 1].
    carriers: (C,) int32 indices into the flattened input.
    signature: (N,) int32 bits.
    target_class: the class whose inputs carry the watermark.
    input_shape: shape of one input (without the batch axis).
  """
  projection: jax.Array
  carriers: jax.Array
  signature: jax.Array
  target_class: int
  input_shape: tuple[int, ...]

  @property
  def num_bits(self) -> int:
    return int(self.signature.shape[0])


def gradsigns_keygen(key: jax.Array, input_shape: tuple[int, ...], num_bits: int = 64,
                     num_carriers: int | None = None, target_class: int = 0) -> WatermarkKey:
  """Draw a projection, a carrier set and a signature (Bernoulli(1/2) bits) from ``key``.

  Args:
    key: PRNG key.
    input_shape: shape of one model input, e.g. (8, 8, 1).
    num_bits: N, signature length.
    num_carriers: C, carrier coordinates (default: min(6 N, input size), as the authors' 64-bit model
      uses 384 carriers).
    target_class: class t.
  """
  d = int(np.prod(input_shape))
  check_int("num_bits", num_bits, 1)
  c = min(6 * num_bits, d) if num_carriers is None else num_carriers
  check_int("num_carriers", c, 1, d)
  check_int("target_class", target_class, 0)
  k1, k2, k3 = jax.random.split(key, 3)
  proj = jax.random.uniform(k1, (num_bits, c), jnp.float32, -1.0, 1.0)
  carriers = jnp.sort(jax.random.permutation(k2, d)[:c]).astype(jnp.int32)
  sig = jax.random.bernoulli(k3, 0.5, (num_bits,)).astype(jnp.int32)
  return WatermarkKey(proj, carriers, sig, target_class, tuple(input_shape))


def _check_inputs(wm: WatermarkKey, x: jax.Array) -> None:
  if x.ndim < 1 or x.shape[0] == 0:
    raise ValueError("the carrier set is empty: pass at least one input of the target class.")
  if tuple(x.shape[1:]) != wm.input_shape:
    raise ValueError(f"inputs of shape {tuple(x.shape[1:])} do not match the key's input shape "
                     f"{wm.input_shape}.")


def mean_input_gradient(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array,
                        target_class: int) -> jax.Array:
  """g_bar = mean over ``x`` of d CE(logits(x), t) / dx (one backward pass over the batch)."""

  def total_ce(xx):
    logits = logits_fn(xx)
    if logits.ndim != 2 or not 0 <= target_class < logits.shape[-1]:
      raise ValueError(f"the model must return (batch, classes) logits including the target class "
                       f"{target_class}, got shape {logits.shape}.")
    return -jnp.sum(jax.nn.log_softmax(logits, axis=-1)[:, target_class])

  return jax.grad(total_ce)(x).mean(axis=0)


def _projection(wm: WatermarkKey, g_bar: jax.Array) -> jax.Array:
  return wm.projection @ g_bar.reshape(-1)[wm.carriers]


def gradsigns_regularizer(logits_fn: Callable[[jax.Array], jax.Array], x_target: jax.Array,
                          wm: WatermarkKey, weight: float = 1.0) -> jax.Array:
  """``weight`` (the paper's lambda) times BCE(b, sigmoid(K g_bar[C])) for class-t inputs ``x_target``;
  add it to the task loss.

  ``logits_fn(x)`` must be differentiable in the model's parameters (close over them), e.g.
  ``lambda x: model.apply({'params': params}, x)``; the input gradient inside makes this a double
  backward pass when the loss is differentiated.
  """
  check_range("weight", weight, 0.0)
  _check_inputs(wm, x_target)
  z = _projection(wm, mean_input_gradient(logits_fn, x_target, wm.target_class))
  b = wm.signature.astype(z.dtype)
  return weight * jnp.mean(jnp.maximum(z, 0) - z * b + jnp.log1p(jnp.exp(-jnp.abs(z))))   # stable BCE-with-logits


def extract_whitebox(logits_fn: Callable[[jax.Array], jax.Array], x_target: jax.Array,
                     wm: WatermarkKey) -> jax.Array:
  """Signature bits read from the exact expected input gradient."""
  _check_inputs(wm, x_target)
  return (_projection(wm, mean_input_gradient(logits_fn, x_target, wm.target_class)) >= 0).astype(jnp.int32)


def extract_blackbox(predict_proba: Callable[[jax.Array], jax.Array], x_target: jax.Array,
                     wm: WatermarkKey, step: float = 1e-2) -> tuple[jax.Array, int]:
  """Signature bits estimated from prediction queries only.

  For each input and carrier c: g_c ~ [CE(p(x + h e_c), t) - CE(p(x), t)] / h with the probabilities
  ``p`` the API returns; averaged over inputs, projected and signed.

  Returns:
    ``(bits, queries)`` with queries = n (C + 1).
  """
  _check_inputs(wm, x_target)
  check_range("step", step, 0.0, low_inclusive=False)
  n = x_target.shape[0]
  flat = x_target.reshape(n, -1)
  t = wm.target_class

  def ce(xf):
    p = predict_proba(xf.reshape((-1,) + wm.input_shape))
    if p.ndim != 2 or not 0 <= t < p.shape[-1]:
      raise ValueError(f"predict_proba must return (batch, classes) probabilities including class {t}, "
                       f"got shape {p.shape}.")
    return -jnp.log(jnp.clip(p[:, t], 1e-30, 1.0))

  base = ce(flat)                                                   # n queries
  def one(c):
    return jnp.mean((ce(flat.at[:, c].add(step)) - base) / step)   # n queries per carrier
  g = jax.lax.map(one, wm.carriers)
  bits = (wm.projection @ g >= 0).astype(jnp.int32)
  return bits, int(n * (wm.carriers.shape[0] + 1))


def signature_ber(bits: jax.Array, wm: WatermarkKey) -> float:
  """Fraction of signature bits that differ."""
  return float(jnp.mean(jnp.asarray(bits) != wm.signature))


def false_claim_probability(matches: int, num_bits: int) -> float:
  """P(Bin(N, 1/2) >= matches): the chance that an unrelated model matches at least that many bits."""
  check_int("num_bits", num_bits, 1)
  check_int("matches", matches, 0, num_bits)
  return sum(math.comb(num_bits, k) for k in range(matches, num_bits + 1)) / 2.0 ** num_bits


class Verification(NamedTuple):
  matches: int
  num_bits: int
  false_claim_probability: float
  owned: bool


def verify(bits: jax.Array, wm: WatermarkKey, max_false_claim: float = 1e-6) -> Verification:
  """Claim ownership iff the false-claim probability of the observed matches is at most
  ``max_false_claim``."""
  check_range("max_false_claim", max_false_claim, 0.0, 1.0, low_inclusive=False)
  m = int(jnp.sum(jnp.asarray(bits) == wm.signature))
  p = false_claim_probability(m, wm.num_bits)
  return Verification(m, wm.num_bits, p, p <= max_false_claim)
