"""Small shims over JAX APIs that moved between the versions we support (0.7 .. 0.11)."""

from __future__ import annotations

from typing import Any

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


def triton_compiler_params(num_warps: int | None, num_stages: int | None):
  """Pallas-Triton compiler parameters under either name (``CompilerParams`` in newer jax,
  ``TritonCompilerParams`` before); None when this jax has neither (Pallas then uses its defaults)."""
  from jax.experimental.pallas import triton as plgpu
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
  return None if cls is None else cls(num_warps=num_warps, num_stages=num_stages)


def run_outside_traces(fn):
  """``fn()`` (a pytree) as numpy arrays, computed on a fresh thread: JAX's trace state is per thread, so
  this compiles and runs now even when the caller is being traced (``jit``, ``grad``, ``vmap``). Used by
  the GPU kernels' once-per-process self-tests against the XLA path."""
  import concurrent.futures

  import numpy as np
  with concurrent.futures.ThreadPoolExecutor(1) as ex:
    return ex.submit(lambda: jax.tree_util.tree_map(np.asarray, fn())).result()


def sub_jaxprs(value: Any):
  """The jaxprs inside one equation parameter (a ``Jaxpr``, a ``ClosedJaxpr``, or tuples/lists of them,
  e.g. ``cond``'s branches), as ``Jaxpr``s; nothing for other values. For walks over nested jit, cond,
  scan, shard_map and custom_jvp bodies."""
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from sub_jaxprs(v)
