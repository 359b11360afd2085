"""PowerSGD: rank-r gradient compression with error feedback, as an optax transform.

Vogels, Karimireddy and Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization", NeurIPS 2019, Algorithm 1 (one step of subspace iteration, warm-started) inside
Algorithm 2 (error feedback). Per gradient tensor, with the error-compensated gradient as a matrix M:

    P = M Q;  P <- all-reduce-mean(P);  P <- orthogonalize(P)
    Q = M^T P;  Q <- all-reduce-mean(Q);  M~ = P Q^T;  e <- M - M~   (per worker)

and the Q of this step warm-starts the next one (so repeated steps are power iterations and the
approximation approaches the best rank-r one, the truncated SVD).

Matrix convention: a tensor of shape ``(d0, ..., dk)`` becomes ``(d0 * ... * d(k-1), dk)``, i.e. the
last (output) axis is kept: a flax conv kernel HWIO is ``(H*W*I, O)`` and a dense kernel ``(in, out)``
stays as is. The reference code (PyTorch, OIHW) views ``(O, I*H*W)``, the transpose of ours: the rank-r
subspace and the bytes are the same, P and Q swap sides.

Uncompressed leaves: tensors of rank <= 1 (biases, norms) and tensors with fewer than ``min_size``
entries are all-reduced dense (no residual), as in the paper.

Bytes: per step a device passes ``(n + m) * r * itemsize`` for each compressed ``n x m`` leaf (P and
Q) plus ``size * itemsize`` for each dense leaf to the collectives (``state.bytes_sent``,
``state.total_bytes``; :func:`powersgd_bytes` gives the formula without running anything).

Rank: a compressed leaf needs ``rank <= min(n, m)``; otherwise :func:`powersgd` raises ``ValueError`` at
``init`` (pass ``clamp_rank=True`` for the reference's behaviour, ``min(n, m, rank)`` per leaf).

Orthogonalization is modified Gram-Schmidt with a second projection pass; a column that is
numerically dependent on the earlier ones (what is left after projection is below ``sqrt(eps)`` of its
norm, e.g. a rank-deficient M or an all-zero gradient) becomes zero instead of NaN, and the warm-start
Q keeps its previous column there so the rank is not lost for later steps.

Non-finite gradients: if any device's incoming gradient holds NaN/inf (checked with one collective
``pmax`` of a flag when ``axis_name`` is set, so every device agrees), the step sends nothing, returns
zeros, leaves residuals and Q unchanged and increments ``state.nonfinite_steps`` (the flag's 4 bytes
are not counted in ``bytes_sent``). So does a step whose mean message is non-finite with finite gradients (a
16-bit P, Q or dense leaf out of range; the same on every device, no extra collective), so the residual never
turns NaN. 16-bit leaves are sent in their dtype; their P and Q are averaged as sums of ``x / n`` and
orthogonalized in float32.

Example:
  >>> tx = optax.chain(powersgd(rank=2), optax.sgd(0.1, momentum=0.9))
  >>> # data parallel: inside shard_map/pmap over axis 'd'
  >>> tx = optax.chain(powersgd(rank=2, axis_name='d'), optax.sgd(0.1))
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax._checks import check_floating, check_int
from mlsys_jax.comm.sparse import _check_axis, _global_finite  # noqa: F401 (accordion imports it from here)
from mlsys_jax.comm.sparse import _apply_precondition, _check_like, _check_precondition, _keep_on_skip

__all__ = [
    "PowerSGDState",
    "matrix_shape",
    "orthogonalize",
    "powersgd",
    "powersgd_bytes",
    "powersgd_layout",
    "powersgd_step",
    "total_bytes",
]


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
  """The ``(n, m)`` matrix a tensor of ``shape`` is compressed as: all leading axes times the last one.

  >>> matrix_shape((3, 3, 16, 32))   # HWIO conv kernel
  (144, 32)
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2:
    raise ValueError(f"matrix_shape needs a tensor of rank >= 2, got shape {shape}.")
  return int(np.prod(shape[:-1])), shape[-1]


def powersgd_layout(params: Any, rank: int, *, min_size: int = 0, clamp_rank: bool = False
                    ) -> list[int]:
  """Rank used for each leaf of ``params`` (flatten order); 0 means the leaf is sent dense.

  Raises ``ValueError`` when a compressed leaf has ``min(n, m) < rank`` and ``clamp_rank`` is False, and
  for a ``rank`` that is not an integer >= 1 (or a negative ``min_size``).
  """
  check_int("rank", rank, 1)
  check_int("min_size", min_size, 0)
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    shape = np.shape(leaf)
    if len(shape) < 2 or int(np.prod(shape)) < min_size:
      out.append(0)
      continue
    n, m = matrix_shape(shape)
    if rank > min(n, m):
      if not clamp_rank:
        raise ValueError(
            f"powersgd rank {rank} exceeds min(n, m) = {min(n, m)} of leaf {jax.tree_util.keystr(path)} "
            f"(shape {shape} -> matrix {n}x{m}). Lower the rank, send that leaf dense with a larger "
            f"min_size (> {n * m}), or pass clamp_rank=True to use min(n, m, rank) per leaf.")
      out.append(min(n, m))
    else:
      out.append(rank)
  return out


def powersgd_bytes(params: Any, rank: int, *, min_size: int = 0, clamp_rank: bool = False) -> int:
  """Bytes one device passes to the collectives per PowerSGD step (P and Q of compressed leaves, the
  dense leaves whole), from shapes and dtypes only."""
  total = 0
  for leaf, r in zip(jax.tree_util.tree_leaves(params), powersgd_layout(params, rank, min_size=min_size,
                                                                         clamp_rank=clamp_rank)):
    item = jnp.dtype(jnp.result_type(leaf)).itemsize
    if r == 0:
      total += int(np.prod(np.shape(leaf))) * item
    else:
      n, m = matrix_shape(np.shape(leaf))
      total += (n + m) * r * item
  return total


def orthogonalize(p: jax.Array, rtol: float | None = None) -> jax.Array:
  """Orthonormal columns spanning the column space of ``p`` (n, r), by modified Gram-Schmidt.

  Each column is projected off the earlier ones twice (re-orthogonalization keeps it orthogonal to
  working precision). A column whose norm after projection is at most ``rtol`` (default
  ``sqrt(eps)`` of the dtype) times its norm before, or zero, is returned as zero: the result has
  orthonormal or zero columns and never NaN for a finite ``p``, rank-deficient ones included. A column
  that holds NaN/inf stays non-finite (it is not zeroed), so the error propagates. A 16-bit ``p`` is
  orthogonalized in float32 (its norms would overflow float16) and returned in its dtype.
  """
  if p.ndim != 2:
    raise ValueError(f"orthogonalize expects a matrix (n, r), got shape {p.shape}.")
  tol = float(np.sqrt(np.finfo(np.dtype(p.dtype)).eps)) if rtol is None else rtol
  dtype = p.dtype   # 16-bit input: computed in float32 (a float16 column with entries ~300 has an inf norm)
  p = p.astype(jnp.promote_types(dtype, jnp.float32))
  cols = []
  for i in range(p.shape[1]):
    c = p[:, i]
    before = jnp.linalg.norm(c)
    if cols:
      u = jnp.stack(cols, axis=1)            # (n, i): the orthonormal (or zero) columns so far
      for _ in range(2):
        c = c - u @ (u.T @ c)
    after = jnp.linalg.norm(c)
    keep = (after > tol * before) | ~jnp.isfinite(before)   # NaN/inf columns propagate, never become zeros
    cols.append(jnp.where(keep, c / jnp.where(keep, after, 1.0), 0.0))
  return (jnp.stack(cols, axis=1) if cols else p).astype(dtype)


def _pmean(x: jax.Array, axis_name: str) -> jax.Array:
  """``pmean`` over ``axis_name``; for 16-bit floats the sum of ``x / n``, so that a mean within the dtype's
  range does not overflow in the sum (float16: 8 workers' entries of 10^4 sum past 65504)."""
  if jnp.dtype(x.dtype).itemsize >= 4:
    return jax.lax.pmean(x, axis_name)
  return jax.lax.psum(x / jax.lax.psum(1, axis_name), axis_name)


def powersgd_step(m: jax.Array, q: jax.Array, axis_name: str | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One PowerSGD compression round of a matrix ``m`` (n, m) with warm-start ``q`` (m, r).

  Returns ``(approx, p, q_new)``: the decompressed (global, when ``axis_name`` is set) rank-r matrix
  ``P Q^T``, the orthonormal ``P`` (n, r) and ``Q`` (m, r). Collectives: ``pmean`` of P and of Q.
  Repeating it with ``q = q_new`` on a fixed ``m`` is subspace iteration: ``approx`` converges to
  the truncated SVD of ``m`` when its r-th and (r+1)-th singular values differ.
  """
  if jnp.dtype(q.dtype).itemsize < 4:   # 16-bit: a unit-column warm start (the same P after orthogonalize), so
    # that M Q is ~ sigma_1(M), not sigma_1^2 (Q = M^T P carries sigma_1; float16 overflows at sigma_1 ~ 256)
    q32 = q.astype(jnp.float32)
    nrm = jnp.linalg.norm(q32, axis=0)
    q = jnp.where(nrm > 0, q32 / jnp.where(nrm > 0, nrm, 1.0), q32).astype(q.dtype)
  p = m @ q
  if axis_name is not None:
    p = _pmean(p, axis_name)
  p = orthogonalize(p)
  q_new = m.T @ p
  if axis_name is not None:
    q_new = _pmean(q_new, axis_name)
  return p @ q_new.T, p, q_new


def _keep_warm(q_new: jax.Array, q_old: jax.Array) -> jax.Array:
  """Warm start for the next step: columns of ``q_new`` that are exactly zero keep ``q_old``."""
  alive = jnp.any(q_new != 0, axis=0, keepdims=True)
  return jnp.where(alive, q_new, q_old)


class PowerSGDState(NamedTuple):
  """State of :func:`powersgd`.

  Attributes:
    residual: error-feedback memory per leaf (zeros for dense leaves).
    q: tuple (flatten order) of warm-start matrices (m, r) per leaf; None for dense leaves (a (0, 0) array in
      states before session 45, still accepted).
    step: steps taken (int32).
    bytes_sent: bytes this device passed to the collectives in the last step (float32).
    total_bytes: cumulative ``bytes_sent``.
    nonfinite_steps: steps skipped because some device's gradient held NaN/inf.
    precondition: state of the local ``precondition`` transform (e.g. Adam's moments of this worker's
      gradients), or ``()`` without one.
  """
  residual: Any
  q: tuple
  step: jax.Array
  bytes_sent: jax.Array
  total_bytes: jax.Array
  nonfinite_steps: jax.Array
  precondition: Any = ()


def _state_field(state: Any, name: str):
  """The first ``name`` field of a compression state found in ``state`` (itself, or nested in an optax
  chain's tuple of states), or None."""
  if hasattr(state, name):
    return getattr(state, name)
  if isinstance(state, (tuple, list)):
    for s in state:
      f = _state_field(s, name)
      if f is not None:
        return f
  return None


def _init_counted(who: str, compressor, params, use: str):
  """``compressor.init(params)`` for a wrapper ``who``, refusing a state without the ``bytes_sent`` counter
  that the wrappers report (``use``: which compressors to wrap instead)."""
  inner = compressor.init(params)
  if _state_field(inner, "bytes_sent") is None:
    raise TypeError(f"{who}: the compressor's state has no bytes_sent field; {use}.")
  return inner


def total_bytes(state: Any) -> float:
  """Cumulative bytes one device sent, from a :class:`PowerSGDState`, an ACCORDION state, a
  ``SparsifierState``, or an optax chain state that contains one of them (first found). The states keep it as a
  float32 running sum, exact below 2**24 bytes and rounded per addition beyond (``SparsifierState``'s docstring);
  for exact totals of long runs sum each step's ``bytes_sent`` on the host."""
  f = _state_field(state, "total_bytes")
  if f is None:
    raise ValueError(f"no compression state with total_bytes found in {type(state).__name__}.")
  return float(np.asarray(f).reshape(-1)[0])


def _initial_q(leaves: Sequence[Any], ranks: Sequence[int], seed: int) -> tuple:
  """Random warm starts Q (m, r) per leaf from ``seed`` (the same on every device: no broadcast), leaf i
  drawn with ``fold_in(key, i)``; None where the rank is 0 (dense leaves: no array, so a state maps through
  ``pmap`` / ``shard_map`` without a zero-size operand, on which jax 0.11.2's Shardy partitioner crashes the
  compiler; states of earlier sessions hold a (0, 0) array there, still accepted: :func:`_no_q`)."""
  key = jax.random.PRNGKey(seed)
  return tuple(
      None if r == 0 else
      jax.random.normal(jax.random.fold_in(key, i), (matrix_shape(leaf.shape)[1], r), jnp.result_type(leaf))
      for i, (leaf, r) in enumerate(zip(leaves, ranks)))


def _no_q(q) -> bool:
  """Whether a state's warm start ``q`` marks a dense leaf: None, or a (0, 0) array (states before session 45)."""
  return q is None or np.size(q) == 0


def powersgd(rank: int, *, min_size: int = 0, clamp_rank: bool = False, seed: int = 0,
             axis_name: str | None = None,
             precondition: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
  """PowerSGD compression with error feedback (Vogels et al., NeurIPS 2019, Algorithms 1-2).

  Args:
    rank: rank r of the approximation of every compressed leaf (>= 1).
    min_size: leaves with fewer entries (and every leaf of rank <= 1) are all-reduced dense.
    clamp_rank: use ``min(n, m, rank)`` for leaves whose matrix is smaller than ``rank`` (the
      reference code's rule) instead of raising ``ValueError`` at ``init``.
    seed: seed of the random initial Q (the same on every device, so no broadcast is needed).
    axis_name: mapped axis (pmap/shard_map) of the data-parallel workers; None for one device.
      With it, the update is the decompressed global (mean) gradient, the same on every device.
    precondition: a local optax transform applied to this worker's gradient before error feedback (e.g.
      ``optax.scale_by_adam()``, then ``optax.sgd(lr)`` after the compressor: the low-rank approximation of
      the local Adam direction, as 1-bit Adam compresses after the moment update; or
      :func:`~mlsys_jax.comm.rms_selection` before ``optax.adam``). Its state is kept per worker in
      ``state.precondition`` and left unchanged on skipped (non-finite) steps, so a NaN on one worker never
      reaches its moments. The same updates as ``optax.chain(precondition, powersgd(...))`` on finite steps.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`PowerSGDState`.

  Example:
    >>> tx = optax.chain(powersgd(2), optax.sgd(0.05, momentum=0.9))
    >>> params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros((6,))}
    >>> grads = {"w": jnp.ones((8, 6)), "b": jnp.ones((6,))}
    >>> state = tx.init(params); updates, state = tx.update(grads, state, params)
    >>> updates["w"].shape
    (8, 6)
  """
  check_int("rank", rank, 1)
  check_int("min_size", min_size, 0)
  _check_precondition("powersgd", precondition)

  def init_fn(params):
    check_floating("powersgd.init", params)
    leaves = jax.tree_util.tree_leaves(params)
    ranks = powersgd_layout(params, rank, min_size=min_size, clamp_rank=clamp_rank)
    z = jnp.zeros((), jnp.float32)
    return PowerSGDState(jax.tree_util.tree_map(jnp.zeros_like, params), _initial_q(leaves, ranks, seed),
                         jnp.zeros((), jnp.int32), z, z, jnp.zeros((), jnp.int32),
                         precondition.init(params) if precondition is not None else ())

  def update_fn(updates, state, params=None):
    check_floating("powersgd.update", updates)
    _check_like("powersgd.update", updates, state.residual)
    _check_axis(axis_name)
    grads = jax.tree_util.tree_leaves(updates)
    updates, pre_state = _apply_precondition(precondition, updates, state.precondition, params)
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    res_leaves = treedef.flatten_up_to(state.residual)
    finite = _global_finite(leaves if precondition is None else leaves + grads, axis_name)
    n_leaves = len(leaves)
    outs, new_res, new_q, nbytes = [None] * n_leaves, [None] * n_leaves, list(state.q), 0
    accs = [jnp.where(finite, g.astype(res.dtype) + res, 0) for g, res in zip(leaves, res_leaves)]
    groups: dict = {}
    for i, (acc, q) in enumerate(zip(accs, state.q)):
      item = jnp.dtype(acc.dtype).itemsize
      if _no_q(q):   # dense leaf: all-reduced whole, no residual
        outs[i] = _pmean(acc, axis_name) if axis_name is not None else acc
        new_res[i] = res_leaves[i]
        nbytes += acc.size * item
      else:
        n, m = matrix_shape(acc.shape)
        groups.setdefault((n, m, q.shape[1], acc.dtype), []).append(i)
        nbytes += (n + m) * q.shape[1] * item
    # Leaves whose matrices have the same shape are compressed together (one batched matmul per
    # stage instead of one per leaf: far fewer kernels for ResNet-like models).
    step = jax.vmap(lambda mat, q: powersgd_step(mat, q, axis_name))
    for (n, m, _, _), idx in groups.items():
      mats = jnp.stack([accs[i].reshape(n, m) for i in idx])
      qs = jnp.stack([state.q[i] for i in idx])
      approx, _, qn = step(mats, qs)
      for j, i in enumerate(idx):
        outs[i] = approx[j].reshape(accs[i].shape)
        new_q[i] = qn[j]
    # A message that overflowed (16-bit) or a residual+gradient that did (acc inf) gives a non-finite mean on
    # every replica alike (it is the collectives' output): the step is skipped as for a NaN gradient, so the
    # residual never turns NaN.
    finite = finite & _global_finite(outs, None)   # (the means: the same on every replica)
    for i, q in enumerate(state.q):
      if not _no_q(q):
        new_res[i] = jnp.where(finite, accs[i] - outs[i], res_leaves[i])
        new_q[i] = jnp.where(finite, _keep_warm(new_q[i], q), q)
    outs = [jnp.where(finite, o, 0).astype(g.dtype) for o, g in zip(outs, grads)]
    nb = jnp.where(finite, jnp.float32(nbytes), 0.0)
    new_state = PowerSGDState(jax.tree_util.tree_unflatten(treedef, new_res), tuple(new_q),
                              state.step + 1, nb, state.total_bytes + nb,
                              state.nonfinite_steps + (~finite).astype(jnp.int32),
                              _keep_on_skip(finite, pre_state, state.precondition))
    return jax.tree_util.tree_unflatten(treedef, outs), new_state

  return optax.GradientTransformation(init_fn, update_fn)

