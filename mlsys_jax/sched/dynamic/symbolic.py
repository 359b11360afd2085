"""Export a function once with a symbolic length (``jax.export``), then call it at any length.

Nimble (Shen et al., MLSys 2021, section 3) types a dynamic dimension as ``Any`` and derives output
shapes with shape functions, so one compiled module serves every length. ``jax.export`` offers the
nearest JAX equivalent: the function is traced and lowered ONCE to StableHLO with a symbolic dimension
``n`` (shape polymorphism; output shapes are symbolic expressions, i.e. shape functions). XLA itself
compiles static shapes only, so each new concrete length still compiles the exported module once
(after shape refinement) -- no retracing, but no fewer compilations than per-shape ``jit``; combining
the export with buckets (``buckets=...``) bounds them. Checked with jax 0.10.2; the API
(``jax.export.export``, ``jax.export.symbolic_shape``, ``Exported.call``) is the same in 0.11.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from mlsys_jax._checks import check_int
from mlsys_jax.sched.dynamic.bucketed import _leaf_axis, _normalize_dims, _pad_host, _slice_leaf
from mlsys_jax.sched.dynamic.buckets import bucket_for

__all__ = ["SymbolicFunction", "export_symbolic"]


class SymbolicFunction:
  """A function exported once with a symbolic length ``n`` (Nimble's ``Any`` dimension, Shen et al.,
  MLSys 2021, Sec. 3); see :func:`export_symbolic` for the arguments.

  Calling it with concrete arrays returns ``fn``'s outputs as numpy arrays, the same as calling ``fn``
  (with ``length_arg`` = the true length) directly; with ``buckets`` the dynamic inputs are zero-padded
  to the smallest bucket ``>= n`` and the outputs' ``n``-sized axes sliced back. ``.exported`` is traced
  once; ``.compile_count`` counts the distinct concrete input shapes seen (one XLA compile each), so
  with buckets it is at most the number of buckets; ``.calls`` counts calls.

  Raises (at construction): ``TypeError`` for a non-callable ``fn`` or bad ``dims``; ``ValueError`` for
  ``dims`` naming an argument not in ``example_args``, a bucket ``< 1``, or ``out_dims`` not 'infer'/None.
  At call time: ``ValueError`` for a wrong argument count, dynamic lengths that disagree, or a length
  above the largest bucket.
  """

  def __init__(self, fn: Callable, example_args: Sequence, dims, *, length_arg: str | None = "length",
               mask_arg: str | None = None, buckets: Sequence[int] | None = None, out_dims="infer",
               symbol: str = "n"):
    if not callable(fn):
      raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
    self.dims = _normalize_dims(dims)
    example_args = tuple(example_args)
    self.num_args = len(example_args)
    if max(self.dims) >= len(example_args):
      raise ValueError(f"dims names argument {max(self.dims)} but only {len(example_args)} example "
                       "argument(s) were given; pass one example per positional argument of fn.")
    if buckets is not None:
      buckets = tuple(buckets)
      if not buckets:
        raise ValueError("buckets is empty; give at least one size or pass None (no padding).")
      for b in buckets:
        check_int("each of buckets", b, 1)
    self.buckets = None if buckets is None else tuple(sorted({int(b) for b in buckets}))
    self.fn, self.length_arg, self.mask_arg = fn, length_arg, mask_arg
    (n_sym,) = jax_export.symbolic_shape(symbol)

    def wrapped(length, *args):
      kw = {}
      if length_arg is not None:
        kw[length_arg] = length
      if mask_arg is not None:
        i, axis = next(iter(self.dims.items()))
        leaf = jax.tree_util.tree_leaves(args[i])[0]
        kw[mask_arg] = jnp.arange(leaf.shape[axis % leaf.ndim]) < length
      return fn(*args, **kw)

    def struct(leaf, axis):
      shape = list(np.shape(leaf))
      if axis is not None:
        shape[_leaf_axis(leaf, axis, "example argument")] = n_sym
      return jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(leaf))

    structs = [jax.tree_util.tree_map(lambda l, a=self.dims.get(i): struct(l, a), x)
               for i, x in enumerate(example_args)]
    t0 = time.perf_counter()
    self.exported = jax_export.export(jax.jit(wrapped))(jax.ShapeDtypeStruct((), jnp.int32), *structs)
    self.export_seconds = time.perf_counter() - t0
    out_avals = self.exported.out_avals
    if out_dims == "infer":
      self.out_axes = tuple(tuple(k for k, s in enumerate(a.shape) if not isinstance(s, int))
                            for a in out_avals)
      for a, ax in zip(out_avals, self.out_axes):
        if any(str(a.shape[k]) != symbol for k in ax):
          raise ValueError(f"an output has shape {a.shape}: only axes of size exactly {symbol} can be "
                           "sliced back; pass out_dims=None to return them padded.")
    elif out_dims is None:
      self.out_axes = tuple(() for _ in out_avals)
    else:
      raise ValueError(f"out_dims must be 'infer' or None, got {out_dims!r}.")
    self._call = jax.jit(self.exported.call)
    self._seen: set = set()
    self.compile_count = 0
    self.calls = 0

  def __call__(self, *args):
    if len(args) != self.num_args:
      raise ValueError(f"this function was exported with {self.num_args} positional argument(s), got "
                       f"{len(args)}.")
    n = None
    for i, axis in self.dims.items():
      for leaf in jax.tree_util.tree_leaves(args[i]):
        m = int(np.shape(leaf)[_leaf_axis(leaf, axis, f"argument {i}")])
        if n is not None and m != n:
          raise ValueError(f"dynamic inputs disagree on the length: {n} vs {m}.")
        n = m
    size = n
    if self.buckets is not None:
      size = bucket_for(n, self.buckets)
      if size is None:
        raise ValueError(f"length {n} exceeds the largest bucket {self.buckets[-1]}; add a bucket.")
      args = tuple(jax.tree_util.tree_map(
          lambda l, a=self.dims[i]: _pad_host(l, _leaf_axis(l, a, "input"), size, None), x)
          if i in self.dims else x for i, x in enumerate(args))
    key = tuple((np.shape(l), str(jnp.result_type(l))) for l in jax.tree_util.tree_leaves(args))
    if key not in self._seen:  # a new concrete shape: the exported module is compiled for it
      self._seen.add(key)
      self.compile_count += 1
    out = self._call(np.int32(n), *args)
    self.calls += 1
    leaves, tree = jax.tree_util.tree_flatten(out)
    if size == n:
      return jax.tree_util.tree_unflatten(tree, [np.asarray(y) for y in leaves])
    return jax.tree_util.tree_unflatten(
        tree, [_slice_leaf(y, ax, n, "host") for y, ax in zip(leaves, self.out_axes)])


def export_symbolic(fn: Callable, *example_args, dims, length_arg: str | None = "length",
                    mask_arg: str | None = None, buckets: Sequence[int] | None = None,
                    out_dims="infer") -> SymbolicFunction:
  """Trace and lower ``fn`` once with the dynamic axes symbolic (``jax.export`` shape polymorphism).

  Same conventions as :func:`bucketed_jit`: ``dims`` maps positional arguments to their dynamic axis,
  ``fn`` gets the true length under ``length_arg`` (here it equals the symbolic size unless ``buckets``
  pads the inputs) and optionally a mask. Outputs are returned as numpy arrays. ``.exported`` is the
  ``jax.export.Exported`` (serialisable with ``.serialize()`` when ``flatbuffers`` is installed);
  ``.compile_count`` counts the concrete shapes it has been compiled for.

  >>> f = export_symbolic(lambda x, length: jnp.cumsum(x, 0) / length, np.ones(3, np.float32), dims={0: 0})
  >>> f.exported.out_avals[0].shape, f(np.ones(4, np.float32)).tolist(), f.compile_count
  ((n,), [0.25, 0.5, 0.75, 1.0], 1)
  """
  return SymbolicFunction(fn, example_args, dims, length_arg=length_arg, mask_arg=mask_arg,
                          buckets=buckets, out_dims=out_dims)
