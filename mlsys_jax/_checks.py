"""Boundary checks shared by the whole library.

Every public function validates its Python-level arguments with these helpers so that a bad
hyperparameter or a wrong input fails at call time with a message that says what is wrong and how to
fix it. Checks on array *values* (NaN/inf) run only on concrete arrays; under ``jit`` each technique
documents what it does with non-finite values instead.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_inclusive: bool = True, high_inclusive: bool = True) -> None:
  """Raise ``ValueError`` unless ``value`` is a finite real number inside the given interval."""
  if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0:
    if isinstance(value, jax.core.Tracer):
      return  # a traced hyperparameter cannot be checked here; callers document this.
    value = float(value)
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r}).")
  if not math.isfinite(float(value)):
    raise ValueError(f"{name} must be finite, got {value!r}.")
  lo_ok = low is None or (value >= low if low_inclusive else value > low)
  hi_ok = high is None or (value <= high if high_inclusive else value < high)
  if not (lo_ok and hi_ok):
    lb = "-inf" if low is None else f"{low}"
    hb = "inf" if high is None else f"{high}"
    interval = ("[" if low_inclusive else "(") + f"{lb}, {hb}" + ("]" if high_inclusive else ")")
    raise ValueError(f"{name} must lie in {interval}, got {value!r}.")


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
  """Raise unless ``value`` is a Python/numpy integer inside ``[low, high]``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r}).")
  if (low is not None and value < low) or (high is not None and value > high):
    lb = "-inf" if low is None else low
    hb = "inf" if high is None else high
    raise ValueError(f"{name} must be an integer in [{lb}, {hb}], got {value}.")


def check_bool(name: str, value: Any) -> None:
  """Raise ``TypeError`` unless ``value`` is a Python or numpy bool (not an int, not an array)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r}).")


def check_choice(name: str, value: Any, choices) -> None:
  """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {sorted(map(str, choices))}, got {value!r}.")


def check_floating(name: str, tree: Any) -> None:
  """Raise ``TypeError`` unless every leaf of ``tree`` is a floating-point array."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  if not leaves:
    raise ValueError(f"{name} is an empty pytree; pass at least one array.")
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{name}{jax.tree_util.keystr(path)} must be a floating-point array, got dtype "
                      f"{dtype}. Cast it first, e.g. x.astype(jnp.float32).")


def is_concrete(x: Any) -> bool:
  """True when ``x`` holds concrete values (not a tracer inside jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_finite(name: str, tree: Any) -> None:
  """Raise ``ValueError`` if a *concrete* leaf of ``tree`` holds NaN or inf (tracers are skipped)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not is_concrete(leaf):
      continue
    arr = np.asarray(leaf)
    if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
      bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
      raise ValueError(f"{name}{jax.tree_util.keystr(path)} holds {bad} NaN/inf value(s); "
                       "clean the input (e.g. jnp.nan_to_num) or find where it diverged.")


def check_rank(name: str, x: Any, rank: int | tuple[int, ...]) -> None:
  """Raise ``ValueError`` unless ``x.ndim`` equals ``rank`` (or is one of them)."""
  ranks = (rank,) if isinstance(rank, int) else tuple(rank)
  if np.ndim(x) not in ranks:
    raise ValueError(f"{name} must have rank {' or '.join(map(str, ranks))}, got shape {np.shape(x)}.")
