"""Bop, the latent-free binary optimizer, as an optax transform; Larq's CaseOptimizer via multi_transform.

Helwegen et al., "Latent Weights Do Not Exist: Rethinking Binarized Neural Network Optimization",
NeurIPS 2019 (Algorithm 1), as shipped in Larq (``larq.optimizers.Bop``) and used in Bannink et al.,
MLSys 2021. With gradient ``g``, adaptivity rate ``gamma`` and threshold ``tau``::

    m <- m + gamma (g - m)                      (exponential moving average, never reset)
    w <- sign(-sign(w m - tau) w)               (flip w iff w m > tau; sign(0) = +1)

The transform returns the update ``w_new - w`` (``-2 w`` on a flip), so ``optax.apply_updates`` lands on
the new binary weight. ``gamma`` and ``tau`` may be optax schedules (functions of the step count).
The state records the fraction of weights flipped by the last step (``flip_ratio``), Larq's training
metric. NaN/inf gradients make the moving average, and hence the weights, NaN (never a silent flip).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mlsys_jax._checks import check_range
from mlsys_jax.quant.binary.quantizers import larq_sign

__all__ = ["BopState", "binary_param_labels", "bop", "case_optimizer", "flip_ratio"]

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


class BopState(NamedTuple):
  """State of :func:`bop`: step count, gradient moving average, last step's flip statistics."""
  count: jax.Array       # int32 scalar
  momentum: Any          # pytree like params
  flip_ratio: jax.Array  # float32 scalar: flipped / total weights at the last step
  num_flips: jax.Array   # int32 scalar: number of weights flipped at the last step


def _value(v: ScalarOrSchedule, count):
  return v(count) if callable(v) else v


def bop(threshold: ScalarOrSchedule = 1e-8, gamma: ScalarOrSchedule = 1e-4) -> optax.GradientTransformation:
  """Bop (Helwegen et al., 2019, Alg. 1; Larq ``Bop``): flip a binary weight when ``w m > tau``.

  Edge case (as in Larq's code): where ``w m == tau`` exactly, ``sign(w m - tau) = 0`` and the new weight is
  ``sign(-0 w) = sign(0) = +1`` whatever ``w`` was. In particular with ``threshold=0`` and a zero gradient
  (``m = 0``) every -1 weight flips to +1 on the first step, and +1 weights stay: ``[1, -1] -> [1, 1]``,
  flip ratio 0.5. Larq's default ``threshold=1e-8`` avoids this.

  Args:
    threshold: tau >= 0, or an optax schedule (Larq's default 1e-8).
    gamma: adaptivity rate in (0, 1], or an optax schedule (Larq's default 1e-4).

  Returns:
    A transform whose ``update(grads, state, params)`` needs ``params`` (the current weights).

  Example:
    >>> tx = bop(threshold=0.0, gamma=1.0)
    >>> w = jnp.array([1.0, 1.0, -1.0, -1.0])
    >>> u, s = tx.update(jnp.array([0.5, -0.5, 0.5, -0.5]), tx.init(w), w)
    >>> optax.apply_updates(w, u), float(s.flip_ratio)
    (Array([-1.,  1., -1.,  1.], dtype=float32), 0.5)
  """
  if not callable(threshold):
    check_range("threshold", threshold, 0.0, None)
  if not callable(gamma):
    check_range("gamma", gamma, 0.0, 1.0, low_inclusive=False)

  def init_fn(params):
    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    return BopState(jnp.zeros((), jnp.int32), m, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

  def update_fn(grads, state: BopState, params=None):
    if params is None:
      raise ValueError("bop needs the current binary weights: call tx.update(grads, state, params).")
    g_rate = _value(gamma, state.count)
    tau = _value(threshold, state.count)
    m = jax.tree_util.tree_map(lambda m, g: m + jnp.asarray(g_rate, m.dtype) * (g - m),
                               state.momentum, grads)

    def new_w(w, m):
      return larq_sign(-jnp.sign(w * m - jnp.asarray(tau, w.dtype)) * w)

    neww = jax.tree_util.tree_map(new_w, params, m)
    updates = jax.tree_util.tree_map(lambda n, w: n - w, neww, params)
    flips = [jnp.sum(larq_sign(n) != larq_sign(w), dtype=jnp.int32)
             for n, w in zip(jax.tree_util.tree_leaves(neww), jax.tree_util.tree_leaves(params))]
    total = sum(int(jnp.size(w)) for w in jax.tree_util.tree_leaves(params))
    nflip = sum(flips) if flips else jnp.zeros((), jnp.int32)
    ratio = jnp.asarray(nflip, jnp.float32) / max(total, 1)
    return updates, BopState(state.count + 1, m, ratio, jnp.asarray(nflip, jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _default_is_binary(path: tuple[str, ...], leaf) -> bool:
  del leaf
  return bool(path) and path[-1] == "kernel" and any("binary" in p.lower() for p in path[:-1])


def binary_param_labels(params: Any, is_binary: Callable[[tuple[str, ...], Any], bool] | None = None,
                        binary_label: str = "binary", default_label: str = "default") -> Any:
  """Label tree for ``optax.multi_transform``: ``'binary'`` for binary kernels, ``'default'`` otherwise.

  Larq tags binary variables by their quantizer's precision; here a predicate on the parameter path
  decides. The default predicate: the leaf is named ``kernel`` and a module on its path has ``binary``
  in its name (case-insensitive), as the ``BinaryConv`` inside each ``QuickNetBlock_<i>`` of
  :class:`mlsys_jax.quant.binary.QuickNet`.

  Args:
    params: the parameter pytree (flax dict or nnx State).
    is_binary: ``f(path_names, leaf) -> bool`` with ``path_names`` a tuple of strings.

  >>> binary_param_labels({'QuickNetBlock_0': {'BinaryConv': {'kernel': 0.0}}, 'Head': {'kernel': 0.0}})
  {'Head': {'kernel': 'default'}, 'QuickNetBlock_0': {'BinaryConv': {'kernel': 'binary'}}}
  """
  pred = is_binary or _default_is_binary
  return jax.tree_util.tree_map_with_path(
      lambda p, x: binary_label if pred(tuple(_key_name(k) for k in p), x) else default_label, params)


def case_optimizer(binary_tx: optax.GradientTransformation, default_tx: optax.GradientTransformation,
                   is_binary: Callable[[tuple[str, ...], Any], bool] | None = None,
                   require_binary: bool = True) -> optax.GradientTransformation:
  """Larq's ``CaseOptimizer``: ``binary_tx`` (e.g. :func:`bop`) on binary kernels, ``default_tx`` elsewhere.

  A thin ``optax.multi_transform`` over :func:`binary_param_labels`. With ``require_binary`` the first
  ``init`` raises when no parameter is labelled binary (Larq raises when an optimizer claims nothing).

  >>> tx = case_optimizer(bop(), optax.adam(1e-3))
  >>> state = tx.init({'BinaryDense_0': {'kernel': jnp.ones((2, 2))}, 'Dense_0': {'kernel': jnp.ones(2)}})
  """
  labels = lambda params: binary_param_labels(params, is_binary)
  tx = optax.multi_transform({"binary": binary_tx, "default": default_tx}, labels)

  def init_fn(params):
    if require_binary and "binary" not in jax.tree_util.tree_leaves(labels(params)):
      raise ValueError("case_optimizer: no parameter is labelled binary. Name binary layers with "
                       "'binary' in the module name, or pass is_binary=(path, leaf) -> bool.")
    return tx.init(params)

  return optax.GradientTransformation(init_fn, tx.update)


def flip_ratio(opt_state: Any) -> jax.Array:
  """The flip ratio of the (first) :class:`BopState` found in an optimizer state (e.g. a multi_transform's)."""
  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, BopState))
           if isinstance(s, BopState)]
  if not found:
    raise ValueError("no BopState in this optimizer state; was it built with bop()?")
  return found[0].flip_ratio
