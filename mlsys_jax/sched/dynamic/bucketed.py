"""``bucketed_jit``: one compiled program per bucket of a dynamic dimension, not one per shape.

Nimble (Shen et al., "Nimble: Efficiently Compiling Dynamic Neural Networks for Model Inference",
MLSys 2021, sections 3-4) gives a dimension the type ``Any`` and dispatches each concrete size to a few
statically compiled kernels; TVM's ``FlexibleShapeDispatch`` pads a size ``n`` to bucket ``b_i`` when
``b_{i-1} < n <= b_i`` and slices the outputs back. XLA compiles static shapes only, so under
``jax.jit`` every new length is a new compilation (jax-ml/jax#803, #2521). ``bucketed_jit`` does the
padding, passes the true length (and optionally a mask) to the function so it can ignore the padding,
slices the outputs back, counts compilations, compiles every bucket ahead of time on request, and can
check at run time that the padding does not change the results.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax._checks import check_choice, check_int, check_range
from mlsys_jax.sched.dynamic.buckets import bucket_for, pow2_buckets

__all__ = ["bucketed_jit", "BucketedFunction", "PaddingInvarianceError", "length_mask",
           "check_padding_invariance"]


class PaddingInvarianceError(AssertionError):
  """Raised when an output changes with the padding; the message names the output."""


def length_mask(length, size: int, dtype=jnp.bool_):
  """``mask[..., i] = i < length``; ``length`` is a scalar or an array of per-row lengths.

  >>> length_mask(jnp.array([1, 3]), 4).astype(int).tolist()
  [[1, 0, 0, 0], [1, 1, 1, 0]]
  """
  length = jnp.asarray(length)
  return (jnp.arange(size) < length[..., None]).astype(dtype)


def _normalize_dims(dims) -> dict[int, int]:
  if isinstance(dims, Mapping):
    items = dict(dims)
  elif isinstance(dims, Sequence) and not isinstance(dims, str):
    items = {i: a for i, a in enumerate(dims) if a is not None}
  else:
    raise TypeError("dims must map positional argument index -> dynamic axis, e.g. {0: 1}, or be a "
                    f"sequence with one axis (or None) per argument; got {dims!r}.")
  if not items:
    raise ValueError("dims names no dynamic argument; give at least one, e.g. dims={0: 1}.")
  for k, v in items.items():
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
      raise TypeError(f"dims keys are positional argument indices (int >= 0), got {k!r}.")
    if isinstance(v, bool) or not isinstance(v, int):
      raise TypeError(f"dims[{k}] must be an int axis, got {v!r}.")
  return items


def _leaf_axis(leaf, axis: int, where: str) -> int:
  nd = np.ndim(leaf)
  if not -nd <= axis < nd:
    raise ValueError(f"{where} has shape {np.shape(leaf)}; dynamic axis {axis} is out of range.")
  return axis % nd


def _pad_host(x, axis: int, size: int, fill) -> np.ndarray:
  """Pad ``x`` along ``axis`` to ``size`` on the host (numpy; no device program per shape)."""
  x = np.asarray(x)
  n = x.shape[axis]
  if n == size and fill is None:
    return x
  shape = list(x.shape)
  shape[axis] = size
  if fill is None or np.isscalar(fill):
    out = np.full(shape, 0 if fill is None else fill, dtype=x.dtype)
  else:  # a callable producing fill values of a shape/dtype
    out = np.asarray(fill(tuple(shape), x.dtype), dtype=x.dtype)
  sl = [slice(None)] * x.ndim
  sl[axis] = slice(0, n)
  out[tuple(sl)] = x
  return out


def _random_fill(seed: int):
  rng = np.random.default_rng(seed)

  def fill(shape, dtype):
    if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating):
      return rng.normal(0.0, 10.0, shape)
    if dtype == np.bool_:
      return rng.integers(0, 2, shape).astype(bool)
    if np.issubdtype(dtype, np.integer):
      return rng.integers(0, 2, shape)  # small valid-looking ids (e.g. for embedding lookups)
    return np.zeros(shape, dtype)
  return fill


def _slice_leaf(y, axes: tuple[int, ...], n: int, unpad: str):
  if not axes or unpad == "none":
    return y if unpad != "host" else np.asarray(y)
  if unpad == "host":
    y = np.asarray(y)
  sl = [slice(None)] * np.ndim(y)
  for a in axes:
    sl[a] = slice(0, n)
  return y[tuple(sl)]


def _compare_outputs(ref_leaves, got_leaves, paths, rtol, atol, what: str) -> None:
  for r, g, path in zip(ref_leaves, got_leaves, paths):
    r, g = np.asarray(r), np.asarray(g)
    if r.shape != g.shape:
      raise PaddingInvarianceError(f"output{path}: shape {g.shape} {what} vs {r.shape}.")
    same = np.isclose(g, r, rtol=rtol, atol=atol, equal_nan=True) if np.issubdtype(
        r.dtype, np.inexact) else (g == r)
    if not np.all(same):
      bad = int(np.size(same) - np.count_nonzero(same))
      with np.errstate(invalid="ignore"):
        err = (float(np.nanmax(np.abs(g.astype(np.float64) - r.astype(np.float64))))
               if r.size else 0.0)
      raise PaddingInvarianceError(
          f"output{path} depends on the padding: {bad} of {r.size} values changed {what} (max |diff| "
          f"{err:.3g}). Mask the padded positions with the `length`/`mask` argument (e.g. "
          "jnp.where(mask, x, 0) before sums, a large negative before softmax/max).")


@dataclasses.dataclass
class _Program:
  bucket: int
  compiled: Any
  compile_seconds: float
  out_tree: Any = None  # streaming programs: the output structure and per-request output leaves
  out_leaves: tuple = ()


@dataclasses.dataclass(frozen=True)
class _StaticLayout:
  """Where each leaf of the non-dynamic arguments lives in a streaming program's inputs: array leaves
  packed into one flat buffer per dtype (``("pack", k, offset, shape)``), other leaves (Python scalars,
  weakly typed arrays) passed as they are (``("loose", j)``)."""
  positions: tuple  # positional indices of the non-dynamic arguments
  treedefs: tuple  # their tree structures
  slots: tuple
  pack_dtypes: tuple  # numpy dtype per flat buffer
  pack_sizes: tuple

  def unpack(self, packs, loose) -> list:
    out = []
    for slot in self.slots:
      if slot[0] == "pack":
        _, k, off, shape = slot
        size = int(np.prod(shape, dtype=np.int64))
        out.append(jax.lax.slice(packs[k], (off,), (off + size,)).reshape(shape))
      else:
        out.append(loose[slot[1]])
    return out

  def args(self, leaves) -> dict[int, Any]:
    res, start = {}, 0
    for i, tree in zip(self.positions, self.treedefs):
      res[i] = jax.tree_util.tree_unflatten(tree, leaves[start:start + tree.num_leaves])
      start += tree.num_leaves
    return res


_LEAF_TREEDEF = jax.tree_util.tree_structure(0)


def _packable(leaf) -> bool:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return not getattr(leaf, "weak_type", False)
  return isinstance(leaf, (np.ndarray, jax.Array)) and not getattr(leaf, "weak_type", False)


def _static_layout(args, dims, pack: bool) -> tuple[_StaticLayout, list]:
  """The layout of the non-dynamic arguments and their leaves (arrays, structs or scalars)."""
  positions = tuple(i for i in range(len(args)) if i not in dims)
  leaves, treedefs = [], []
  for i in positions:
    ls, tree = jax.tree_util.tree_flatten(args[i])
    leaves.extend(ls)
    treedefs.append(tree)
  slots, dtypes, sizes, n_loose = [], [], [], 0
  for leaf in leaves:
    if pack and _packable(leaf):
      dt = np.dtype(leaf.dtype)
      if dt not in dtypes:
        dtypes.append(dt)
        sizes.append(0)
      k = dtypes.index(dt)
      shape = tuple(int(d) for d in leaf.shape)
      slots.append(("pack", k, sizes[k], shape))
      sizes[k] += int(np.prod(shape, dtype=np.int64))
    else:
      slots.append(("loose", n_loose))
      n_loose += 1
  return _StaticLayout(positions, tuple(treedefs), tuple(slots), tuple(dtypes), tuple(sizes)), leaves


class BucketedFunction:
  """A function compiled once per bucket of one dynamic dimension (Nimble, Shen et al., MLSys 2021,
  Sec. 3-4); see :func:`bucketed_jit` for the arguments.

  Calling it with inputs of length ``n`` returns what ``fn`` returns on the unpadded inputs (with
  ``length_arg`` = ``n``), provided ``fn`` ignores the padding: the inputs are zero-padded to the smallest
  bucket ``>= n``, and the outputs' dynamic axes sliced back to ``n``. ``.compile_count`` grows by one per
  bucket first used (at most ``len(buckets)`` without overflow compiles); ``.calls``,
  ``.true_elements`` and ``.padded_elements`` count calls and the lengths before and after padding.

  Raises (at construction): ``TypeError`` for a non-callable ``fn`` or bad ``dims``; ``ValueError`` for
  empty buckets, a bucket ``< 1``, or an unknown ``unpad``/``overflow``, negative ``rtol``/``atol``.
  """

  def __init__(self, fn: Callable, dims, buckets: Sequence[int], *, out_dims="infer",
               length_arg: str | None = "length", mask_arg: str | None = None, unpad: str = "host",
               overflow: str = "error", donate: bool = False, check_padding: bool = False,
               rtol: float = 1e-5, atol: float = 1e-5, seed: int = 0):
    if not callable(fn):
      raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
    self.fn = fn
    self.dims = _normalize_dims(dims)
    buckets = tuple(buckets)
    if not buckets:
      raise ValueError("buckets is empty; give at least one size, e.g. pow2_buckets(max_length).")
    for b in buckets:
      check_int("each of buckets", b, 1)
    self.buckets = tuple(sorted({int(b) for b in buckets}))
    check_choice("unpad", unpad, ("host", "device", "none"))
    check_choice("overflow", overflow, ("error", "compile"))
    check_range("rtol", rtol, 0.0)
    check_range("atol", atol, 0.0)
    self.length_arg, self.mask_arg = length_arg, mask_arg
    self.unpad, self.overflow, self.donate = unpad, overflow, bool(donate)
    self.check_padding, self.rtol, self.atol, self.seed = bool(check_padding), rtol, atol, seed
    self._out_dims_spec = out_dims
    self.out_axes: tuple[tuple[int, ...], ...] | None = None  # per output leaf, after inference
    self._out_paths: list[str] | None = None
    self._programs: dict[Any, _Program] = {}
    self._static_sig: dict[int, Any] = {}
    self._lengths_on_device: dict[int, jax.Array] = {}
    self._indices_on_device: list[jax.Array] = []
    self._pack_cache: tuple | None = None  # (leaves, layout, packs, loose) of the last streamed call
    self.calls = 0
    self.compile_count = 0
    self.overflow_compiles = 0
    self.compile_seconds = 0.0
    self.true_elements = 0  # sum of true lengths over calls
    self.padded_elements = 0  # sum of bucket sizes over calls
    self.padding_checks = 0
    self.stream_wait_seconds = 0.0  # stream()/map(): host time spent waiting for fetched outputs
    self.stream_dummy_requests = 0  # stream()/map() with steps_per_call > 1: discarded rows computed

  # ---- the function that is compiled: true length first, then the padded arguments ----
  def _padded_fn(self, length, *args):
    kw = {}
    if self.length_arg is not None:
      kw[self.length_arg] = length
    if self.mask_arg is not None:
      size = self._size_of(args)
      kw[self.mask_arg] = jnp.arange(size) < length
    return self.fn(*args, **kw)

  def _size_of(self, args) -> int:
    for i, axis in self.dims.items():
      leaf = jax.tree_util.tree_leaves(args[i])[0]
      return int(np.shape(leaf)[_leaf_axis(leaf, axis, f"argument {i}")])
    raise AssertionError

  def _length(self, args) -> int:
    n = None
    for i, axis in self.dims.items():
      if i >= len(args):
        raise ValueError(f"dims names argument {i} but the call has {len(args)} positional arguments.")
      for leaf in jax.tree_util.tree_leaves(args[i]):
        shape = np.shape(leaf)
        if not -len(shape) <= axis < len(shape):
          raise ValueError(f"argument {i} has a leaf of shape {shape}; dynamic axis {axis} is out of "
                           "range.")
        m = int(shape[axis])
        if n is None:
          n = m
        elif m != n:
          raise ValueError(f"argument {i} has length {m} on dynamic axis {axis}, but another dynamic "
                           f"input has {n}; all dynamic axes share one length per call.")
    if n is None:
      raise ValueError("the dynamic arguments hold no arrays.")
    return n

  def _abstract(self, args, size: int):
    def leaf_struct(leaf, axis):
      shape = list(np.shape(leaf))
      if axis is not None:
        shape[_leaf_axis(leaf, axis, "input")] = size
      return jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(leaf))
    return tuple(jax.tree_util.tree_map(lambda l, a=self.dims.get(i): leaf_struct(l, a), x)
                 for i, x in enumerate(args))

  def _infer_out_axes(self, args, size: int) -> None:
    if self.out_axes is not None:
      return
    probe = lambda s: jax.eval_shape(self._padded_fn, jax.ShapeDtypeStruct((), jnp.int32),
                                     *self._abstract(args, s))
    out1 = probe(size)
    flat1 = jax.tree_util.tree_flatten_with_path(out1)[0]
    self._out_paths = [jax.tree_util.keystr(p) for p, _ in flat1]
    spec = self._out_dims_spec
    if isinstance(spec, str):
      if spec != "infer":
        raise ValueError(f"out_dims must be 'infer', None, an int, a tuple or a pytree; got {spec!r}.")
      other = size - 1 if size > 1 else 2
      try:
        flat2 = jax.tree_util.tree_leaves(probe(other))
      except Exception as e:  # e.g. fn only accepts some sizes
        raise ValueError(f"out_dims='infer' traces fn at length {other} to find the dynamic output axes "
                         f"and that failed ({type(e).__name__}: {e}); declare out_dims explicitly.") from e
      axes = []
      for (path, a), b in zip(flat1, flat2):
        dyn = tuple(k for k, (s1, s2) in enumerate(zip(a.shape, b.shape)) if s1 != s2)
        if len(a.shape) != len(b.shape) or any(a.shape[k] != size or b.shape[k] != other for k in dyn):
          raise ValueError(
              f"output{jax.tree_util.keystr(path)} has shape {a.shape} at length {size} and {b.shape} at "
              f"{other}: a dynamic axis that is not the length itself cannot be sliced back. Declare "
              "out_dims explicitly (None for outputs to return padded) or return length-sized axes.")
        axes.append(dyn)
      self.out_axes = tuple(axes)
      return
    is_spec_leaf = lambda s: s is None or isinstance(s, (int, tuple))
    if is_spec_leaf(spec):
      specs = [spec] * len(flat1)
    else:
      specs = jax.tree_util.tree_leaves(spec, is_leaf=is_spec_leaf)
      if len(specs) != len(flat1):
        raise ValueError(f"out_dims has {len(specs)} entries but fn returns {len(flat1)} arrays; give "
                         "one axis/None/tuple per output (same structure as the outputs).")
    axes = []
    for (path, a), s in zip(flat1, specs):
      t = () if s is None else ((s,) if isinstance(s, int) else tuple(s))
      t = tuple(_leaf_axis(a, k, f"output{jax.tree_util.keystr(path)}") for k in t)
      for k in t:
        if a.shape[k] != size:
          raise ValueError(f"out_dims says axis {k} of output{jax.tree_util.keystr(path)} is dynamic, "
                           f"but its size is {a.shape[k]} at length {size}.")
      axes.append(t)
    self.out_axes = tuple(axes)

  def _signature(self, i: int, x):
    """Hashable (treedef, shapes, dtypes) of argument ``i``; for the non-dynamic arguments (e.g. the
    parameters) it is cached while the caller passes the very same (immutable) arrays again."""
    axis = self.dims.get(i)
    if axis is not None and isinstance(x, (np.ndarray, jax.Array)) and x.ndim:
      # fast path for the usual dynamic argument, one array (same signature as the general path below)
      shape = x.shape
      a = axis % len(shape)
      return (_LEAF_TREEDEF, ((shape[:a] + (None,) + shape[a + 1:], x.dtype),))
    if axis is None:
      last = self._static_sig.get(i)
      # the very same container object as last call (e.g. the parameters): its leaves may have been
      # swapped in place, but the signature only guards the shapes/dtypes, which the compiled program
      # checks itself on every call (a mismatch raises; nothing is computed with the wrong program)
      if last is not None and last[3] is x:
        return last[2]
    leaves, tree = jax.tree_util.tree_flatten(x)
    if axis is None:
      if last is not None and last[0] == tree and len(last[1]) == len(leaves) and all(
          a is b for a, b in zip(last[1], leaves)):
        self._static_sig[i] = (*last[:3], x)
        return last[2]
    sig = []
    for leaf in leaves:
      shape = tuple(np.shape(leaf))
      if axis is not None:
        shape = shape[:axis % len(shape)] + (None,) + shape[axis % len(shape) + 1:]
      dtype = getattr(leaf, "dtype", None)
      sig.append((shape, np.result_type(leaf) if dtype is None else dtype))
    sig = (tree, tuple(sig))
    if axis is None:
      self._static_sig[i] = (tree, tuple(leaves), sig, x)
    return sig

  def _key(self, args, size):
    return (size,) + tuple(self._signature(i, x) for i, x in enumerate(args))

  def _program(self, args, size: int, *, overflow: bool = False) -> _Program:
    key = self._key(args, size)
    prog = self._programs.get(key)
    if prog is None:
      structs = self._abstract(args, size)
      self._infer_out_axes(args, size)
      donate = tuple(1 + i for i in self.dims) if self.donate else ()
      t0 = time.perf_counter()
      with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        compiled = jax.jit(self._padded_fn, donate_argnums=donate).lower(
            jax.ShapeDtypeStruct((), jnp.int32), *structs).compile()
      dt = time.perf_counter() - t0
      prog = _Program(size, compiled, dt)
      self._programs[key] = prog
      self.compile_count += 1
      self.overflow_compiles += int(overflow)
      self.compile_seconds += dt
    return prog

  def _device_length(self, n: int):
    """The true length as a device scalar, made once per distinct length (a host scalar argument is
    one more host-to-device copy per call: ~20 us on an H200 host, benchmarks/dynamic_stream.py
    --parts=dispatch)."""
    v = self._lengths_on_device.get(n)
    if v is None:
      v = self._lengths_on_device[n] = jax.device_put(np.int32(n))
    return v

  def bucket_of(self, n: int) -> int:
    """The bucket a length ``n`` runs in (raises for lengths above the largest bucket)."""
    b = bucket_for(n, self.buckets)
    if b is None:
      if self.overflow == "error":
        raise ValueError(
            f"length {n} exceeds the largest bucket {self.buckets[-1]}; add a larger bucket (buckets="
            f"{self.buckets + (pow2_buckets(n)[-1],)}) or pass overflow='compile' to compile one more "
            "bucket on demand (counted in .overflow_compiles).")
      b = pow2_buckets(n)[-1]
    return b

  def _pad_args(self, args, size: int, fill):
    out = []
    for i, x in enumerate(args):
      axis = self.dims.get(i)
      if axis is None:
        out.append(x)
        continue
      def pad(leaf, axis=axis):
        if fill is None and not self.donate and np.shape(leaf)[_leaf_axis(leaf, axis, "input")] == size:
          return leaf  # already bucket-sized: pass through (no copy, stays on device)
        return _pad_host(leaf, _leaf_axis(leaf, axis, "input"), size, fill)
      out.append(jax.tree_util.tree_map(pad, x))
    return tuple(out)

  def __call__(self, *args, **kwargs):
    if kwargs:
      raise TypeError(f"{type(self).__name__} takes positional arguments only; bind keyword arguments "
                      f"with functools.partial first (got {sorted(kwargs)}).")
    n = self._length(args)
    b = bucket_for(n, self.buckets)
    if b is None:
      b = self.bucket_of(n)
      prog = self._program(args, b, overflow=True)
      self.buckets = tuple(sorted(set(self.buckets) | {b}))
    else:
      prog = self._program(args, b)
    padded = self._pad_args(args, b, None)
    out = prog.compiled(self._device_length(n), *padded)
    self.calls += 1
    self.true_elements += n
    self.padded_elements += b
    leaves, tree = jax.tree_util.tree_flatten(out)
    sliced = [_slice_leaf(y, ax, n, self.unpad) for y, ax in zip(leaves, self.out_axes)]
    if self.check_padding and b > n:
      alt = self._pad_args(args, b, _random_fill(self.seed + self.calls))
      alt_leaves = jax.tree_util.tree_leaves(prog.compiled(np.int32(n), *alt))
      alt_sliced = [_slice_leaf(y, ax, n, "host") for y, ax in zip(alt_leaves, self.out_axes)]
      # compare the valid slices (unpad='none' returns the padded outputs: slice them for the check)
      ref = sliced if self.unpad != "none" else [_slice_leaf(y, ax, n, "host")
                                                 for y, ax in zip(leaves, self.out_axes)]
      self.padding_checks += 1
      _compare_outputs([np.asarray(s) for s in ref], alt_sliced, self._out_paths, self.rtol,
                       self.atol, f"when the padding of length {n} -> bucket {b} is refilled with "
                       "random values")
    return jax.tree_util.tree_unflatten(tree, sliced)

  def compile_all(self, *example_args, chunk_size: int | None = None, pack_static: bool = True,
                  steps_per_call: int = 1) -> float:
    """Compile every bucket ahead of time (``jit(...).lower(...).compile()``) for arguments shaped like
    ``example_args`` (arrays or ``jax.ShapeDtypeStruct``, any length); returns the seconds spent.
    With ``chunk_size`` it compiles the programs :meth:`stream`/:meth:`map` run for that chunk size
    (and ``pack_static``, ``steps_per_call``) instead of the per-call ones."""
    t = self.compile_seconds
    if chunk_size is not None:
      check_int("chunk_size", chunk_size, 1)
      check_int("steps_per_call", steps_per_call, 1)
      layout, _ = _static_layout(example_args, self.dims, pack_static)
      capacity = -(-chunk_size // steps_per_call) * steps_per_call
    for b in self.buckets:
      if chunk_size is None:
        self._program(example_args, b)
      else:
        self._stream_program(example_args, b, capacity, layout, steps=steps_per_call)
    return self.compile_seconds - t

  # ---- streaming: many requests per host<->device transfer, device-resident per-call inputs ----
  def _stream_program(self, args, size: int, capacity: int, layout: _StaticLayout, *,
                      overflow: bool = False, steps: int = 1) -> _Program:
    """The program streamed requests run: ``(index, lengths, packs, loose, stacked, outs) -> outs``
    reads request ``index`` of a chunk's stacked (bucket-padded) inputs, runs ``fn`` on it and writes
    its outputs into row ``index`` of the (donated) chunk output buffers; with ``steps > 1`` it does so
    for requests ``index .. index + steps - 1`` in a ``lax.fori_loop`` (one dispatch for ``steps``
    requests, each computed exactly as alone)."""
    key = ("stream", capacity, steps, layout) + self._key(args, size)
    prog = self._programs.get(key)
    if prog is not None:
      return prog
    structs = self._abstract(args, size)
    self._infer_out_axes(args, size)
    length_struct = jax.ShapeDtypeStruct((), jnp.int32)
    out_leaves, out_tree = jax.tree_util.tree_flatten(jax.eval_shape(self._padded_fn, length_struct,
                                                                     *structs))
    dyn_pos = tuple(sorted(self.dims))
    static_leaves = [l for i in layout.positions for l in jax.tree_util.tree_leaves(structs[i])]
    pack_structs = tuple(jax.ShapeDtypeStruct((n,), d)
                         for d, n in zip(layout.pack_dtypes, layout.pack_sizes))
    loose_structs = tuple(l for l, slot in zip(static_leaves, layout.slots) if slot[0] == "loose")
    stack = lambda x: jax.ShapeDtypeStruct((capacity,) + tuple(x.shape), x.dtype)
    stacked_structs = tuple(jax.tree_util.tree_map(stack, structs[i]) for i in dyn_pos)
    outs_structs = tuple(stack(o) for o in out_leaves)

    def one(static, index, lengths, stacked, outs):
      full = dict(static)
      for i, x in zip(dyn_pos, stacked):
        full[i] = jax.tree_util.tree_map(
            lambda s: jax.lax.dynamic_index_in_dim(s, index, 0, keepdims=False), x)
      y = jax.tree_util.tree_leaves(self._padded_fn(lengths[index], *(full[i] for i in range(len(args)))))
      return tuple(jax.lax.dynamic_update_index_in_dim(o, v.astype(o.dtype), index, 0)
                   for o, v in zip(outs, y))

    def streamed(index, lengths, packs, loose, stacked, outs):
      static = layout.args(layout.unpack(packs, loose))
      if steps == 1:
        return one(static, index, lengths, stacked, outs)
      return jax.lax.fori_loop(0, steps, lambda r, o: one(static, index + r, lengths, stacked, o), outs)

    t0 = time.perf_counter()
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
      compiled = jax.jit(streamed, donate_argnums=(5,)).lower(
          length_struct, jax.ShapeDtypeStruct((capacity,), jnp.int32), pack_structs, loose_structs,
          stacked_structs, outs_structs).compile()
    dt = time.perf_counter() - t0
    prog = _Program(size, compiled, dt, out_tree, tuple(out_leaves))
    self._programs[key] = prog
    self.compile_count += 1
    self.overflow_compiles += int(overflow)
    self.compile_seconds += dt
    return prog

  def _packed_static(self, args, pack: bool):
    """``(layout, packs, loose)``: the non-dynamic arguments, array leaves packed into one flat device
    buffer per dtype (one program argument instead of one per parameter leaf: 111 vs 158 us of host
    time per call on an H200 host, benchmarks/dynamic_stream.py --parts=dispatch). Packing copies the
    leaves; the copy is reused while the very same leaves are passed again, only if they are all
    immutable jax arrays (a numpy array may have been changed in place)."""
    layout, leaves = _static_layout(args, self.dims, pack)
    c = self._pack_cache
    if (c is not None and c[1] == layout and len(c[0]) == len(leaves)
        and all(a is b for a, b in zip(c[0], leaves))
        and all(isinstance(a, jax.Array) for a, slot in zip(leaves, layout.slots) if slot[0] == "pack")):
      return c[1], c[2], c[3]
    groups: list[list] = [[] for _ in layout.pack_dtypes]
    loose = []
    for leaf, slot in zip(leaves, layout.slots):
      if slot[0] == "pack":
        if isinstance(leaf, jax.ShapeDtypeStruct):
          raise TypeError("stream()/map() need array arguments, got a jax.ShapeDtypeStruct.")
        groups[slot[1]].append(np.asarray(leaf).reshape(-1))
      else:
        loose.append(leaf)
    packs = tuple(jax.device_put(np.concatenate(g) if g else np.zeros((0,), d))
                  for g, d in zip(groups, layout.pack_dtypes))
    loose = tuple(loose)
    self._pack_cache = (tuple(leaves), layout, packs, loose)
    return layout, packs, loose

  def _index(self, j: int):
    while len(self._indices_on_device) <= j:
      self._indices_on_device.append(jax.device_put(np.int32(len(self._indices_on_device))))
    return self._indices_on_device[j]

  def _dispatch_chunk(self, chunk, first, start: int, capacity: int, static, steps: int = 1):
    """Validate a chunk, group it by (bucket, dynamic signature), copy each group's padded inputs to
    the device in one transfer, dispatch one call per ``steps`` requests and start the copies of the
    outputs."""
    dyn_pos = tuple(sorted(self.dims))
    static_pos = tuple(i for i in range(len(first)) if i not in self.dims)
    # the usual case, one dynamic argument that is one array: its length without a pytree walk
    one_axis = self.dims[dyn_pos[0]] if len(dyn_pos) == 1 else None
    groups: dict[Any, list] = {}
    for r, req in enumerate(chunk):
      if type(req) is not tuple and not isinstance(req, (tuple, list)):
        raise TypeError(f"request {start + r} is a {type(req).__name__}; each request must be a tuple "
                        "of the positional arguments of one call, e.g. (params, ids).")
      if len(req) != len(first):
        raise ValueError(f"request {start + r} has {len(req)} arguments, the first request "
                         f"{len(first)}; every request passes the same arguments.")
      for i in static_pos:
        if req[i] is not first[i]:
          raise ValueError(
              f"argument {i} of request {start + r} is not the same object as in the first request: "
              "stream()/map() pass the non-dynamic arguments (e.g. the parameters) once; split the "
              "stream where they change, or call the function per request.")
      x = req[dyn_pos[0]] if dyn_pos[0] < len(req) else None
      if one_axis is not None and type(x) is np.ndarray and -x.ndim <= one_axis < x.ndim:
        n = x.shape[one_axis]
      else:
        try:
          n = self._length(req)
        except ValueError as e:
          raise ValueError(f"request {start + r}: {e}") from None
      b = bucket_for(n, self.buckets)
      over = b is None
      if over:
        b = self.bucket_of(n)  # raises for overflow='error'
      gkey = (b,) + tuple(self._signature(i, req[i]) for i in dyn_pos)
      groups.setdefault(gkey, [over, []])[1].append((r, n, req))
    layout, packs, loose = static
    launched = []
    for gkey, (over, items) in groups.items():
      b = gkey[0]
      prog = self._stream_program(items[0][2], b, capacity, layout, overflow=over, steps=steps)
      if over:
        self.buckets = tuple(sorted(set(self.buckets) | {b}))
      lengths = np.zeros((capacity,), np.int32)
      stacked = []
      for i in dyn_pos:
        leaves0, tree = jax.tree_util.tree_flatten(items[0][2][i])
        per_request = ([[req[i]] for _, _, req in items] if tree == _LEAF_TREEDEF
                       else [jax.tree_util.tree_leaves(req[i]) for _, _, req in items])
        bufs = []
        for k, leaf in enumerate(leaves0):
          axis = _leaf_axis(leaf, self.dims[i], f"argument {i}")
          shape = list(np.shape(leaf))
          shape[axis] = b
          buf = np.zeros([capacity] + shape, leaf.dtype)
          pre = (slice(None),) * axis
          for j, (_, n, _) in enumerate(items):
            buf[(j,) + pre + (slice(0, n),)] = np.asarray(per_request[j][k])
          bufs.append(buf)
        stacked.append(jax.tree_util.tree_unflatten(tree, bufs))
      for j, (_, n, _) in enumerate(items):
        lengths[j] = n
      k = len(items)
      dummies = -k % steps  # rows computed (on zeros, length 1) and discarded: the last call's rest
      lengths[k:k + dummies] = 1
      self.stream_dummy_requests += dummies
      dev_lengths, dev_stacked = jax.device_put((lengths, tuple(stacked)))
      outs = tuple(jnp.zeros((capacity,) + tuple(o.shape), o.dtype) for o in prog.out_leaves)
      call = prog.compiled
      for j in range(0, k, steps):
        outs = call(self._index(j), dev_lengths, packs, loose, dev_stacked, outs)
      for o in outs:
        o.copy_to_host_async()
      launched.append((items, prog, outs))
      self.calls += len(items)
      self.true_elements += sum(n for _, n, _ in items)
      self.padded_elements += b * len(items)
    return len(chunk), launched

  def _collect(self, pending) -> list:
    count, launched = pending
    results: list = [None] * count
    mode = "none" if self.unpad == "none" else "host"
    for items, prog, outs in launched:
      t0 = time.perf_counter()
      host = [np.asarray(o) for o in outs]
      self.stream_wait_seconds += time.perf_counter() - t0
      for j, (r, n, _) in enumerate(items):
        leaves = [_slice_leaf(h[j], ax, n, mode) for h, ax in zip(host, self.out_axes)]
        results[r] = jax.tree_util.tree_unflatten(prog.out_tree, leaves)
    return results

  def stream(self, requests: Iterable, *, chunk_size: int = 256, pack_static: bool = True,
             steps_per_call: int = 1) -> Iterator:
    """Serve a stream of requests, yielding each result (host numpy, sliced like ``unpad='host'``;
    padded if ``unpad='none'``) in request order.

    Each request is a tuple of the positional arguments of one call; the non-dynamic ones (e.g. the
    parameters) must be the very same objects in every request. Requests are taken ``chunk_size`` at a
    time; a chunk is validated (lengths above the largest bucket raise before anything of it runs,
    unless ``overflow='compile'``), grouped by bucket, copied to the device in one transfer per bucket
    (zero-padded, stacked), and run with one call per request on device-resident inputs, grouped so
    that calls of one bucket follow each other; each call writes its outputs into a row of one chunk
    buffer per output, fetched with one device-to-host copy per bucket and chunk, after the next chunk
    has been dispatched (the host never waits for the device in between). With ``pack_static`` the
    array leaves of the non-dynamic arguments are passed as one flat buffer per dtype (fewer program
    arguments: less host time per call); the non-dynamic arguments are read once per call of
    ``stream``/``map`` (packed jax arrays are reused across calls while the same immutable arrays are
    passed; numpy arrays are read again each time). These programs (one per bucket and ``chunk_size``) are
    compiled on first use or by ``compile_all(..., chunk_size=...)``; the computation per request is
    the per-call one (the same padded ``fn`` at the same bucket), so results match ``f(*request)``.
    With ``steps_per_call > 1`` one call runs that many requests of a bucket one after the other (a
    ``lax.fori_loop`` in the program: fewer dispatches when the host is the bottleneck); a group
    whose size is not a multiple of it computes up to ``steps_per_call - 1`` discarded rows (zero
    inputs, length 1), counted in ``stats()["stream_dummy_requests"]``.
    """
    check_int("chunk_size", chunk_size, 1)
    check_int("steps_per_call", steps_per_call, 1)
    capacity = -(-chunk_size // steps_per_call) * steps_per_call
    if self.check_padding:
      raise ValueError("stream()/map() do not run the check_padding check; check the function with "
                       "check_padding_invariance (or per-call f(...) with check_padding=True) first and "
                       "stream with check_padding=False.")
    it = iter(requests)
    pending, first, start, static = None, None, 0, None
    while True:
      chunk = list(itertools.islice(it, chunk_size))
      if not chunk:
        break
      if first is None:
        first = chunk[0]
        if not isinstance(first, (tuple, list)):
          raise TypeError(f"request 0 is a {type(first).__name__}; each request must be a tuple of "
                          "the positional arguments of one call, e.g. (params, ids).")
        static = self._packed_static(first, pack_static)
      dispatched = self._dispatch_chunk(chunk, first, start, capacity, static, steps_per_call)
      start += len(chunk)
      if pending is not None:
        yield from self._collect(pending)
      pending = dispatched
    if pending is not None:
      yield from self._collect(pending)

  def map(self, requests: Iterable, *, chunk_size: int = 256, pack_static: bool = True,
          steps_per_call: int = 1) -> list:
    """``list(self.stream(requests, ...))``: every result, in request order; see :meth:`stream`.

    >>> f = bucketed_jit(lambda w, x, length: (x * w).sum(-1), dims={1: 0}, buckets=(4, 8))
    >>> w = np.float32(2.0) * np.ones((), np.float32)
    >>> [y.tolist() for y in f.map([(w, np.ones(n, np.float32)) for n in (3, 6, 2)], chunk_size=2)]
    [6.0, 12.0, 4.0]
    """
    return list(self.stream(requests, chunk_size=chunk_size, pack_static=pack_static,
                            steps_per_call=steps_per_call))

  def stats(self) -> dict:
    """Counters: calls, compiles (overflow ones too), compile seconds (in total and per bucket size, in
    compilation order), padding overhead, seconds :meth:`stream` waited for the device (near 0: the
    host is the bottleneck)."""
    by_bucket: dict[int, float] = {}
    for prog in self._programs.values():
      by_bucket[prog.bucket] = by_bucket.get(prog.bucket, 0.0) + prog.compile_seconds
    return {"calls": self.calls, "compiles": self.compile_count,
            "overflow_compiles": self.overflow_compiles, "compile_seconds": self.compile_seconds,
            "compile_seconds_by_bucket": by_bucket,
            "buckets": list(self.buckets), "padding_checks": self.padding_checks,
            "stream_wait_seconds": self.stream_wait_seconds,
            "stream_dummy_requests": self.stream_dummy_requests,
            "padding_overhead": (self.padded_elements / self.true_elements - 1.0)
            if self.true_elements else 0.0}


def bucketed_jit(fn: Callable, dims, buckets: Sequence[int] | None = None, *, max_length: int | None = None,
                 out_dims="infer", length_arg: str | None = "length", mask_arg: str | None = None,
                 unpad: str = "host", overflow: str = "error", donate: bool = False,
                 check_padding: bool = False, rtol: float = 1e-5, atol: float = 1e-5,
                 seed: int = 0) -> BucketedFunction:
  """Compile ``fn`` once per bucket of a dynamic dimension instead of once per length.

  Nimble (Shen et al., MLSys 2021, sections 3-4; TVM ``FlexibleShapeDispatch``): a length ``n`` runs in
  the smallest bucket ``b >= n``; the dynamic axes of the inputs are zero-padded to ``b`` on the host
  (numpy: no device program per length), ``fn`` receives the true length as a traced int32 scalar
  (keyword ``length_arg``) and, if ``mask_arg`` is set, a boolean mask of shape ``(b,)``, and the
  dynamic axes of the outputs are sliced back to ``n``. ``fn`` must ignore the padding (mask it);
  ``check_padding=True`` verifies this at run time by re-running each padded call with random padding.

  Args:
    fn: the function; positional array (pytree) arguments, plus the ``length``/``mask`` keywords.
    dims: ``{argument index: dynamic axis}`` (every leaf of that argument has the axis), or a sequence
      with one axis or ``None`` per positional argument. All dynamic axes share one length per call.
    buckets: bucket sizes, e.g. ``pow2_buckets(512, 8)`` or ``choose_buckets(...).buckets``; default:
      powers of two up to ``max_length``.
    max_length: used only when ``buckets`` is None.
    out_dims: which output axes are the dynamic length: ``'infer'`` (default: traced with
      ``jax.eval_shape`` at the bucket size and one less; an axis that follows the size is dynamic),
      ``None`` (return everything padded), an int / tuple of ints for every output, or a pytree of
      those per output.
    length_arg, mask_arg: keyword names under which ``fn`` gets the true length / the mask (None: not
      passed).
    unpad: ``'host'`` slices outputs on the host and returns numpy arrays (no per-length device program);
      ``'device'`` returns jax arrays (each new length runs one small slice program of JAX's eager
      cache); ``'none'`` returns the padded outputs.
    overflow: lengths above the largest bucket raise ``ValueError`` (``'error'``) or compile one more
      power-of-two bucket, counted in ``.overflow_compiles`` (``'compile'``).
    donate: donate the padded input buffers to the program (memory reuse for outputs of the same shape;
      inputs are always copied into fresh padded buffers then).
    check_padding: runtime padding-invariance check (doubles the cost of padded calls); raises
      :class:`PaddingInvarianceError` naming the output whose valid slice (the first ``n`` entries of
      each dynamic axis, whatever ``unpad`` is) changed beyond ``rtol``/``atol``.
    seed: seed of the random padding used by the check.

  Returns:
    A :class:`BucketedFunction`: call it like ``fn`` (without ``length``/``mask``); ``.compile_all(*args)``
    compiles every bucket ahead of time; ``.compile_count`` and ``.stats()`` report compilations.

  >>> def mean_pool(x, length):  # x: (batch, n, d); masked mean over the n axis
  ...   m = length_mask(length, x.shape[1], x.dtype)[None, :, None]
  ...   return (x * m).sum(1) / length, x * 2
  >>> f = bucketed_jit(mean_pool, dims={0: 1}, buckets=(4, 8))
  >>> for n in (3, 4, 5, 7):
  ...   pooled, doubled = f(np.ones((2, n, 3), np.float32))
  >>> pooled.shape, doubled.shape, f.compile_count, f.out_axes
  ((2, 3), (2, 7, 3), 2, ((), (1,)))
  """
  if buckets is None:
    if max_length is None:
      raise ValueError("give buckets=... or max_length=... (powers of two up to it).")
    buckets = pow2_buckets(max_length)
  return BucketedFunction(fn, dims, buckets, out_dims=out_dims, length_arg=length_arg, mask_arg=mask_arg,
                          unpad=unpad, overflow=overflow, donate=donate, check_padding=check_padding,
                          rtol=rtol, atol=atol, seed=seed)


def check_padding_invariance(fn: Callable, *args, dims, pad_to: int | Sequence[int],
                             out_dims="infer", length_arg: str | None = "length",
                             mask_arg: str | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                             seed: int = 0) -> dict[str, float]:
  """Check that padding the dynamic axes of ``args`` to each size in ``pad_to`` leaves the (sliced)
  outputs of ``fn`` unchanged: against the unpadded call (zero padding) and against random padding.

  Raises :class:`PaddingInvarianceError` naming the first output that changed beyond ``rtol``/``atol``;
  returns ``{output path: max |padded - unpadded|}`` over all ``pad_to`` sizes otherwise.

  >>> ok = lambda x, length: (x * length_mask(length, x.shape[0], x.dtype)).sum()
  >>> check_padding_invariance(ok, np.ones(3, np.float32), dims={0: 0}, pad_to=(4, 8))
  {'': 0.0}
  >>> bad = lambda x, length: x.mean()
  >>> check_padding_invariance(bad, np.ones(3, np.float32), dims={0: 0}, pad_to=8)
  Traceback (most recent call last):
  ...
  mlsys_jax.sched.dynamic.bucketed.PaddingInvarianceError: output depends on the padding: ...
  """
  sizes = (pad_to,) if isinstance(pad_to, (int, np.integer)) else tuple(pad_to)
  kw = dict(out_dims=out_dims, length_arg=length_arg, mask_arg=mask_arg, rtol=rtol, atol=atol)
  exact = BucketedFunction(fn, dims, (1,), **kw)
  n = exact._length(args)
  exact = BucketedFunction(fn, dims, (n,), **kw)
  ref = jax.tree_util.tree_leaves(exact(*args))
  diffs = {p: 0.0 for p in exact._out_paths}
  for s in sizes:
    if s < n:
      raise ValueError(f"pad_to={s} is smaller than the length {n} of the inputs.")
    padded = BucketedFunction(fn, dims, (s,), check_padding=True, seed=seed, **kw)
    got = jax.tree_util.tree_leaves(padded(*args))
    _compare_outputs(ref, got, exact._out_paths, rtol, atol, f"when length {n} is zero-padded to {s}")
    for p, r, g in zip(exact._out_paths, ref, got):
      if np.size(r):
        diffs[p] = max(diffs[p], float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64)))))
  return diffs
