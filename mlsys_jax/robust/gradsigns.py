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

Two embedding losses are offered. ``loss="bce"`` is the paper's sigmoid BCE (as in the authors' Keras
code): it never stops pushing |K g_bar| up, so it keeps the target class from becoming confident and
costs accuracy. ``loss="hinge"`` asks only for the right sign with a margin relative to the RMS of the
projection, max(0, kappa - s_i z_i / rms(z)) with s = 2b - 1: it is scale-free, stops at the margin and,
on 8x8 digits, keeps accuracy within about a point of an unwatermarked model at BER 0 (see
experiments/gradsigns_eval.py). ``per_example=True`` adds the same hinge on every input's own gradient:
the mean of gradients that all satisfy the signs does too, whatever positive weights later training gives
the inputs.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax._checks import check_choice, check_int, check_range, is_concrete

__all__ = [
    "Verification",
    "WatermarkKey",
    "check_watermark_key",
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
    num_classes: number of logits the model returns.

  Example:
    >>> wm = gradsigns_keygen(jax.random.PRNGKey(0), (8, 8, 1), num_bits=32)
    >>> wm.num_bits, wm.target_class, wm.input_shape, wm.num_classes
    (32, 0, (8, 8, 1), 10)
  """
  projection: jax.Array
  carriers: jax.Array
  signature: jax.Array
  target_class: int
  input_shape: tuple[int, ...]
  num_classes: int = 10

  @property
  def num_bits(self) -> int:
    return int(self.signature.shape[0])


def gradsigns_keygen(key: jax.Array, input_shape: tuple[int, ...], num_bits: int = 64,
                     num_carriers: int | None = None, target_class: int = 0,
                     num_classes: int = 10) -> WatermarkKey:
  """Draw a projection, a carrier set and a signature (Bernoulli(1/2) bits) from ``key``.

  Aramoon et al. (MLSys 2021); as in the authors' code the carriers are a uniformly random subset
  of the flattened input coordinates and the projection entries are U(-1, 1).

  Args:
    key: PRNG key.
    input_shape: shape of one model input, e.g. (8, 8, 1).
    num_bits: N, signature length.
    num_carriers: C, carrier coordinates (default: min(6 N, input size), as the authors' 64-bit model
      uses 384 carriers). The extracted bits are signs of N linear functions of C numbers, so a random
      N-bit signature is always reachable for N <= C and, by Cover's counting, only with probability
      ~1/2 at N = 2C and ~0 beyond.
    target_class: class t.
    num_classes: number of logits of the model (checked when the key is used).

  Example:
    >>> wm = gradsigns_keygen(jax.random.PRNGKey(0), (8, 8, 1), num_bits=32)
    >>> wm.projection.shape, wm.carriers.shape, wm.signature.shape
    ((32, 64), (64,), (32,))
  """
  if isinstance(input_shape, int) or not all(isinstance(n, (int, np.integer)) and n > 0
                                              for n in tuple(input_shape)) or len(tuple(input_shape)) == 0:
    raise ValueError(f"input_shape must be a non-empty tuple of positive ints (one input, no batch axis), "
                     f"got {input_shape!r}.")
  d = int(np.prod(input_shape))
  check_int("num_bits", num_bits, 1)
  c = min(6 * num_bits, d) if num_carriers is None else num_carriers
  check_int("num_carriers", c, 1, d)
  check_int("num_classes", num_classes, 2)
  check_int("target_class", target_class, 0, num_classes - 1)
  k1, k2, k3 = jax.random.split(key, 3)
  proj = jax.random.uniform(k1, (num_bits, c), jnp.float32, -1.0, 1.0)
  carriers = jnp.sort(jax.random.permutation(k2, d)[:c]).astype(jnp.int32)
  sig = jax.random.bernoulli(k3, 0.5, (num_bits,)).astype(jnp.int32)
  return WatermarkKey(proj, carriers, sig, target_class, tuple(int(n) for n in input_shape), num_classes)


def check_watermark_key(wm: WatermarkKey) -> None:
  """Raise ``ValueError`` unless the parts of ``wm`` fit together (a key built by hand or loaded from
  disk): projection (N, C), carriers (C,) distinct indices inside the input, signature (N,) of 0/1 bits,
  target class below ``num_classes``.

  Example:
    >>> wm = gradsigns_keygen(jax.random.PRNGKey(0), (8, 8, 1), num_bits=32)
    >>> check_watermark_key(wm._replace(carriers=wm.carriers.at[1].set(wm.carriers[0])))
    Traceback (most recent call last):
    ValueError: carriers must be distinct input coordinates.
  """
  d = int(np.prod(wm.input_shape))
  c = np.shape(wm.carriers)
  if np.ndim(wm.signature) != 1 or np.shape(wm.signature)[0] == 0:
    raise ValueError(f"the signature must be a non-empty vector of bits, got shape {np.shape(wm.signature)}.")
  if len(c) != 1 or c[0] == 0:
    raise ValueError(f"the carrier set is empty or not a vector (shape {c}); draw the key with "
                     f"gradsigns_keygen(num_carriers >= 1).")
  n = np.shape(wm.signature)[0]
  if np.shape(wm.projection) != (n, c[0]):
    raise ValueError(f"projection of shape {np.shape(wm.projection)} does not match the signature and "
                     f"carriers: expected (N, C) = {(n, c[0])}.")
  if is_concrete(wm.carriers):
    car = np.asarray(wm.carriers)
    if not np.issubdtype(car.dtype, np.integer) or car.min() < 0 or car.max() >= d:
      raise ValueError(f"carriers must be integer indices into the flattened input of size {d} "
                       f"(input_shape {wm.input_shape}), got values in [{car.min()}, {car.max()}].")
    if len(np.unique(car)) != len(car):
      raise ValueError("carriers must be distinct input coordinates.")
  if is_concrete(wm.signature) and not np.isin(np.asarray(wm.signature), (0, 1)).all():
    raise ValueError("the signature must hold only 0/1 bits.")
  check_int("num_classes", wm.num_classes, 2)
  check_int("target_class", wm.target_class, 0, wm.num_classes - 1)


def _check_inputs(wm: WatermarkKey, x: jax.Array) -> None:
  check_watermark_key(wm)
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"x_target must hold real-valued (floating-point) inputs, got dtype {dtype}: the "
                    "watermark lives in input gradients, which integer inputs do not have (and a finite-"
                    "difference step would be rounded away). Cast the inputs the model sees, e.g. "
                    "x.astype(jnp.float32).")
  if x.ndim < 1 or x.shape[0] == 0:
    raise ValueError("the carrier set is empty: pass at least one input of the target class.")
  if tuple(x.shape[1:]) != wm.input_shape:
    raise ValueError(f"inputs of shape {tuple(x.shape[1:])} do not match the key's input shape "
                     f"{wm.input_shape}: pass a batch (n,) + input_shape of target-class inputs.")


def _input_gradients(logits_fn, x, target_class, num_classes=None):
  def total_ce(xx):
    logits = logits_fn(xx)
    if logits.ndim != 2 or not 0 <= target_class < logits.shape[-1] or (
        num_classes is not None and logits.shape[-1] != num_classes):
      want = "" if num_classes is None else f" = (batch, {num_classes}) (the key's num_classes)"
      raise ValueError(f"the model must return (batch, classes){want} logits including the target class "
                       f"{target_class}, got shape {logits.shape}.")
    return -jnp.sum(jax.nn.log_softmax(logits, axis=-1)[:, target_class])

  return jax.grad(total_ce)(x)     # row i = d CE(f(x_i), t) / d x_i (inputs do not interact)


def mean_input_gradient(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array,
                        target_class: int) -> jax.Array:
  """g_bar = mean over ``x`` of d CE(logits(x), t) / dx (one backward pass over the batch).

  The model must treat inputs independently (no batch statistics in ``logits_fn``: use evaluation mode
  or fixed statistics for batch norm).

  Example:
    >>> f = lambda x: x @ jnp.eye(4, 3)                      # logits = first 3 inputs
    >>> np.asarray(mean_input_gradient(f, jnp.zeros((2, 4)), 0), float).round(3).tolist()   # softmax - onehot
    [-0.667, 0.333, 0.333, 0.0]
  """
  return _input_gradients(logits_fn, x, target_class).mean(axis=0)


def _projection(wm: WatermarkKey, g_bar: jax.Array) -> jax.Array:
  return wm.projection @ g_bar.reshape(-1)[wm.carriers]


def _hinge(z: jax.Array, s: jax.Array, margin: float) -> jax.Array:
  rms = jnp.sqrt(jnp.mean(jnp.square(z), axis=-1, keepdims=True))
  return jnp.mean(jax.nn.relu(margin - s * z / (rms + 1e-30)))


def gradsigns_regularizer(logits_fn: Callable[[jax.Array], jax.Array], x_target: jax.Array,
                          wm: WatermarkKey, weight: float = 1.0, *, loss: str = "bce",
                          margin: float = 0.5, per_example: bool = False) -> jax.Array:
  """The GradSigns embedding loss on class-t inputs ``x_target``; add it to the task loss.

  Aramoon et al. (MLSys 2021), the watermarked training objective L = CE + lambda * reg; with z = K g_bar[C],

  * ``loss="bce"`` (the paper): ``weight * BCE(b, sigmoid(z))``, averaged over bits;
  * ``loss="hinge"``: ``weight * mean_i max(0, margin - s_i z_i / rms(z))`` with s = 2b - 1: zero once
    every bit has the right sign with a margin of ``margin`` times the RMS of z (scale-free, so it does
    not force the gradient to stay large). ``margin`` must be below 1 (rms(z) bounds the smallest |z_i|).
  * ``per_example=True`` (hinge only) adds the same hinge averaged over each input's own projected
    gradient, at no extra cost (the per-input gradients are the rows of the same backward pass).

  ``logits_fn(x)`` must be differentiable in the model's parameters (close over them), e.g.
  ``lambda x: model.apply({'params': params}, x)``; the input gradient inside makes this a double
  backward pass when the loss is differentiated. The paper draws the class-t inputs from each minibatch
  (10 of 100); any sample of class-t training inputs works, e.g. a fresh random subset per step.

  Args:
    logits_fn: ``(n,) + input_shape -> (n, num_classes)`` logits.
    x_target: ``(n,) + input_shape`` inputs of the target class, n >= 1.
    wm: the key.
    weight: lambda >= 0.
    loss: "bce" or "hinge".
    margin: hinge margin kappa in [0, 1).
    per_example: add the per-input hinge.

  Example:
    >>> wm = gradsigns_keygen(jax.random.PRNGKey(0), (4,), num_bits=4, num_classes=3)
    >>> f = lambda x: x @ jnp.ones((4, 3))
    >>> float(gradsigns_regularizer(f, jnp.ones((2, 4)), wm, loss="hinge")) >= 0
    True
  """
  check_range("weight", weight, 0.0)
  check_choice("loss", loss, ("bce", "hinge"))
  check_range("margin", margin, 0.0, 1.0, high_inclusive=False)
  if per_example and loss != "hinge":
    raise ValueError("per_example=True needs loss='hinge'.")
  _check_inputs(wm, x_target)
  grads = _input_gradients(logits_fn, x_target, wm.target_class, wm.num_classes)
  z = _projection(wm, grads.mean(axis=0))
  b = wm.signature.astype(z.dtype)
  if loss == "bce":
    return weight * jnp.mean(jnp.maximum(z, 0) - z * b + jnp.log1p(jnp.exp(-jnp.abs(z))))  # stable BCE
  s = 2.0 * b - 1.0
  value = _hinge(z, s, margin)
  if per_example:
    zs = grads.reshape(grads.shape[0], -1)[:, wm.carriers] @ wm.projection.T
    value = value + _hinge(zs, s, margin)
  return weight * value


def extract_whitebox(logits_fn: Callable[[jax.Array], jax.Array], x_target: jax.Array,
                     wm: WatermarkKey) -> jax.Array:
  """Signature bits read from the exact expected input gradient: b_hat = 1[K g_bar[C] >= 0].

  Example:
    >>> wm = gradsigns_keygen(jax.random.PRNGKey(0), (4,), num_bits=8, num_classes=3)
    >>> extract_whitebox(lambda x: x @ jnp.ones((4, 3)), jnp.ones((2, 4)), wm).shape
    (8,)
  """
  _check_inputs(wm, x_target)
  g = _input_gradients(logits_fn, x_target, wm.target_class, wm.num_classes).mean(axis=0)
  return (_projection(wm, g) >= 0).astype(jnp.int32)


def extract_blackbox(predict_proba: Callable[[jax.Array], jax.Array], x_target: jax.Array,
                     wm: WatermarkKey, step: float = 1e-2) -> tuple[jax.Array, int]:
  """Signature bits estimated from prediction queries only.

  For each input and carrier c: g_c ~ [CE(p(x + h e_c), t) - CE(p(x), t)] / h with the probabilities
  ``p`` the API returns; averaged over inputs, projected and signed. ``x_target`` must be floating point
  (``TypeError`` otherwise): an integer input cannot be moved by a step h < 1, so every difference
  would be zero and the bits meaningless.

  Returns:
    ``(bits, queries)`` with queries = n (C + 1).

  Example:
    >>> wm = gradsigns_keygen(jax.random.PRNGKey(0), (4,), num_bits=8, num_classes=3)
    >>> w = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    >>> x = jax.random.normal(jax.random.PRNGKey(2), (5, 4))
    >>> bits, queries = extract_blackbox(lambda x: jax.nn.softmax(x @ w), x, wm)
    >>> bool(jnp.all(bits == extract_whitebox(lambda x: x @ w, x, wm))), queries   # n (C + 1) = 5 * 5
    (True, 25)
  """
  _check_inputs(wm, x_target)
  check_range("step", step, 0.0, low_inclusive=False)
  n = x_target.shape[0]
  flat = x_target.reshape(n, -1)
  t = wm.target_class

  def ce(xf):
    p = predict_proba(xf.reshape((-1,) + wm.input_shape))
    if p.ndim != 2 or p.shape[-1] != wm.num_classes:
      raise ValueError(f"predict_proba must return (batch, num_classes) = (n, {wm.num_classes}) "
                       f"probabilities, got shape {p.shape}.")
    return -jnp.log(jnp.clip(p[:, t], 1e-30, 1.0))

  base = ce(flat)                                                   # n queries
  def one(c):
    return jnp.mean((ce(flat.at[:, c].add(step)) - base) / step)   # n queries per carrier
  g = jax.lax.map(one, wm.carriers)
  bits = (wm.projection @ g >= 0).astype(jnp.int32)
  return bits, int(n * (wm.carriers.shape[0] + 1))


def _check_bits(bits, wm: WatermarkKey):
  bits = jnp.asarray(bits)
  if bits.shape != wm.signature.shape:
    raise ValueError(f"extracted bits of shape {bits.shape} do not match the key's signature of shape "
                     f"{wm.signature.shape}.")
  return bits


def signature_ber(bits: jax.Array, wm: WatermarkKey) -> float:
  """Fraction of signature bits that differ.

  Example:
    >>> wm = gradsigns_keygen(jax.random.PRNGKey(0), (8, 8, 1), num_bits=32)
    >>> signature_ber(wm.signature, wm), signature_ber(1 - wm.signature, wm)
    (0.0, 1.0)
  """
  return float(jnp.mean(_check_bits(bits, wm) != wm.signature))


def false_claim_probability(matches: int, num_bits: int) -> float:
  """P(Bin(N, 1/2) >= matches): the chance that an unrelated model matches at least that many bits.

  Computed exactly with integers (sum of binomial coefficients / 2^N, correctly rounded to a float), so
  it works for any N; below about 1e-308 it rounds to 0.0.

  Example:
    >>> false_claim_probability(32, 32), round(false_claim_probability(16, 32), 3)   # 2^-32; a coin toss
    (2.3283064365386963e-10, 0.57)
  """
  check_int("num_bits", num_bits, 1)
  check_int("matches", matches, 0, num_bits)
  return sum(math.comb(num_bits, k) for k in range(matches, num_bits + 1)) / 2 ** num_bits


class Verification(NamedTuple):
  """Outcome of :func:`verify`: matching bits, signature length, their false-claim probability and the
  ownership decision.

  Example:
    >>> wm = gradsigns_keygen(jax.random.PRNGKey(0), (8, 8, 1), num_bits=32)
    >>> v = verify(wm.signature, wm)
    >>> v.matches, v.num_bits, v.owned
    (32, 32, True)
  """
  matches: int
  num_bits: int
  false_claim_probability: float
  owned: bool


def verify(bits: jax.Array, wm: WatermarkKey, max_false_claim: float = 1e-6) -> Verification:
  """Claim ownership iff the false-claim probability of the observed matches is at most
  ``max_false_claim``.

  Example:
    >>> wm = gradsigns_keygen(jax.random.PRNGKey(0), (8, 8, 1), num_bits=32)
    >>> verify(wm.signature.at[:4].set(1 - wm.signature[:4]), wm)    # 28 of 32 bits: P ~ 1e-5 > 1e-6
    Verification(matches=28, num_bits=32, false_claim_probability=9.650597348809242e-06, owned=False)
  """
  check_range("max_false_claim", max_false_claim, 0.0, 1.0, low_inclusive=False)
  m = int(jnp.sum(_check_bits(bits, wm) == wm.signature))
  p = false_claim_probability(m, wm.num_bits)
  return Verification(m, wm.num_bits, p, p <= max_false_claim)
