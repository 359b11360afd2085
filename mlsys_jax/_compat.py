"""Small shims over JAX APIs that moved between the versions we support (0.7 .. 0.11)."""

from __future__ import annotations

import jax

try:  # jax >= 0.6 exposes shard_map at the top level.
  shard_map = jax.shard_map  # type: ignore[attr-defined]
  _SHARD_MAP_NEW = True
except AttributeError:  # pragma: no cover - older jax
  from jax.experimental.shard_map import shard_map  # type: ignore[no-redef]  # noqa: F401
  _SHARD_MAP_NEW = False


def axis_size(axis_name) -> int:
  """Size of a bound mapped axis; raises a clear NameError if it is not bound."""
  try:
    return jax.lax.axis_size(axis_name)  # type: ignore[attr-defined]
  except AttributeError:  # pragma: no cover - older jax
    return jax.lax.psum(1, axis_name)
