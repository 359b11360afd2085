"""Emission of an IOS schedule as one jitted JAX function (Ding et al., MLSys 2021, Sec. 5: the runtime
that executes stages; here XLA plays the runtime).

Four emission modes:
  * ``'cuda_graph'`` (default, what works best on H100, see benchmarks/results/ios_net_probe_h100.json): the flat primitives
    are emitted in schedule order, merge stages as one convolution with concatenated, zero-padded
    kernels plus channel slices; the function is compiled with command buffers that include
    convolutions (``xla_gpu_enable_command_buffer`` += CONVOLUTION, ``xla_gpu_graph_min_graph_size=1``)
    and ``xla_gpu_command_buffer_scheduling_mode=CONCURRENT``, so independent operators of a stage run
    concurrently inside one CUDA graph (XLA builds the graph's DAG from buffer dependencies);
  * ``'streams'``: every group of a concurrent stage except the largest is wrapped in
    ``compute_on('gpu_stream:N')`` (``compute_on2`` in jax 0.8-0.11) as flat primitives, and the
    latency-hiding scheduler is turned on with ``parallel_async_compute_limit = s``; the compiled HLO then
    holds ``call-start`` ops with ``_xla_stream_annotation``.
  * ``'cuda_graph_lhs'``: as 'cuda_graph' plus the latency-hiding scheduler (the best XLA option set
    for the unscheduled float32 Inception-V3 on H100);
  * ``'plain'``: schedule order and merges only, default XLA options.

What the emission does for an H100 at batch 1 (benchmarks/ios.py isolated): XLA builds the CONCURRENT
CUDA graph's DAG from buffer conflicts, and its buffer assignment can reuse memory freed by one branch
for the next, so independent branches wait on each other (write-after-read edges);
``make_program(..., keep_alive=True)`` keeps every intermediate live to the end, which leaves only true
dependencies (Inception-V3 f32 with zero biases, where XLA's program serialises: 0.79 -> 0.58 ms; with
nonzero biases XLA's program already overlaps and it changes nothing). Merge stages apply a common epilogue once on
the merged output (``merged_epilogue``) before slicing, and conv kernels are stored in the layout the
conv reads (``graph.relayout_conv_kernels``) and embedded as constants (``Schedule``), so no weight is
transposed per call.

Example:
  >>> isinstance(stream_call_available(), bool)   # True with jax >= 0.8 (streams emission possible)
  True
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

from mlsys_jax._checks import check_choice, check_int
from mlsys_jax.sched.graph import Graph, Lit
from mlsys_jax.sched.dp import Stage

CB_TYPES = "FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,CONDITIONAL,DYNAMIC_SLICE_FUSION,CONVOLUTION"
CUDA_GRAPH_OPTIONS = {"xla_gpu_enable_command_buffer": CB_TYPES, "xla_gpu_graph_min_graph_size": 1,
                      "xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}
EMISSION_MODES = ("cuda_graph", "cuda_graph_lhs", "streams", "plain")


def compiler_options(mode: str, s: int = 8, backend: Optional[str] = None) -> dict:
  """XLA options for an emission mode; empty on non-GPU backends (the flags are GPU-only).

  Example:
    >>> compiler_options("cuda_graph", backend="cpu")         # the flags are GPU-only
    {}
    >>> compiler_options("cuda_graph_lhs", backend="gpu")["xla_gpu_enable_latency_hiding_scheduler"]
    True
  """
  if mode not in EMISSION_MODES:
    raise ValueError(f"emission must be one of {EMISSION_MODES}, got {mode!r}")
  backend = backend or jax.default_backend()
  if backend != "gpu" or mode == "plain":
    return {}
  opts = dict(CUDA_GRAPH_OPTIONS)
  if mode == "cuda_graph_lhs":
    opts["xla_gpu_enable_latency_hiding_scheduler"] = True
  if mode == "streams":
    opts.update({"xla_gpu_enable_latency_hiding_scheduler": True,
                 "xla_gpu_experimental_parallel_async_compute_limit": max(2, int(s)),
                 "xla_gpu_experimental_stream_annotation": True})
  return opts


def _compute_on_fn():
  from jax.experimental import compute_on as m
  f = getattr(m, "compute_on2", None)
  if f is not None:
    return f
  f = getattr(m, "compute_on", None)
  if f is None:
    return None
  import inspect
  try:
    params = inspect.signature(f).parameters
  except (TypeError, ValueError):
    return None
  # HEAD: function form compute_on(f, *, compute_type, out_memory_spaces); 0.6/0.7: context manager
  if "compute_type" in params and "out_memory_spaces" in params:
    return f
  return None


def stream_call_available() -> bool:
  """Whether this jax has the function form of compute_on (compute_on2 or HEAD's compute_on).

  Example:
    >>> isinstance(stream_call_available(), bool)             # True with jax >= 0.8 (compute_on2)
    True
  """
  try:
    return _compute_on_fn() is not None
  except ImportError:
    return False


def stream_call(f: Callable, stream: int) -> Callable:
  """Wrap ``f`` so that XLA runs it on GPU stream ``stream`` (``_xla_stream_annotation``).

  IOS (Ding et al., MLSys 2021, Sec. 5) runs the groups of a concurrent stage on separate CUDA streams;
  this is the JAX spelling of one such group: ``compute_on2(f, compute_type='gpu_stream:<stream>')``.
  The wrapped function computes exactly what ``f`` computes (on CPU the annotation is ignored).

  Args:
    f: the function to run on the stream (its arguments and results are arrays).
    stream: stream index, an integer >= 0 (``run_stage`` numbers the side streams of a stage 1, 2, ...).

  Raises:
    TypeError: ``f`` is not callable or ``stream`` is not an integer.
    ValueError: ``stream`` is negative.
    RuntimeError: this jax has no function form of ``compute_on`` (see :func:`stream_call_available`).

  Example:
    >>> f = stream_call(lambda x: x + 1, 1) if stream_call_available() else (lambda x: x + 1)
    >>> jax.jit(f)(jnp.ones(2)).tolist()                      # the stream annotation matters on GPU only
    [2.0, 2.0]
  """
  if not callable(f):
    raise TypeError(f"stream_call: f must be a callable (the function to run on the stream), got "
                    f"{type(f).__name__}.")
  check_int("stream", stream, 0)
  fn = _compute_on_fn()
  if fn is None:
    raise RuntimeError("this jax has no function-form compute_on/compute_on2; use emission='cuda_graph'")
  return fn(f, compute_type=f"gpu_stream:{int(stream)}", out_memory_spaces=jax.memory.Space.Device)


# ------------------------------------------------------------------------------------------ merges
def merge_key(g: Graph, ui: int, same_kernel: bool = False):
  """Key equal for conv units that IOS may merge: same input value, strides, layout, output size,
  dtype and a padding that stays valid when kernels are zero-padded, centred, to the largest one
  (odd kernels). ``None`` if the unit is not a mergeable convolution.

  Dilated, grouped, string-padded convs and kernels that are not constants are never merged. NaN/inf:
  a merged conv multiplies the zero taps of a padded kernel too, so an inf in the input window of the
  largest kernel but outside a smaller kernel's window turns that smaller conv's output into NaN
  (0 * inf); with finite inputs the result equals the separate convs up to summation order.

  ``same_kernel=True`` also keys on the kernel's spatial size, so only convs with equal windows merge
  (no zero-padded taps: a 1x1 merged into a 3x3 or 5x5 conv costs 9x or 25x its FLOPs).

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> w1, w2 = jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))
    >>> conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> g = build_graph(lambda x: jax.nn.relu(conv(x, w1)) + conv(x, w2), jnp.ones((1, 8, 8, 4)))
    >>> merge_key(g, 0) == merge_key(g, 1), merge_key(g, 2)        # the two convs may merge; the add not
    (True, None)
    >>> merge_key(g, 0, same_kernel=True) == merge_key(g, 1, same_kernel=True)   # 1x1 vs 3x3 window
    False
  """
  u = g.units[ui]
  if u.kind != "conv_general_dilated" or u.opaque:
    return None
  e = g.eqns[u.anchor]
  p = e.params
  lhs, rhs = e.inputs
  if not isinstance(lhs, int) or lhs not in u.inputs or not isinstance(rhs, int) or rhs not in g.consts:
    return None
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    return None
  if any(d != 1 for d in p["lhs_dilation"]) or any(d != 1 for d in p["rhs_dilation"]):
    return None
  if isinstance(p["padding"], str):
    return None
  dn = p["dimension_numbers"]
  w = g.avals[rhs]
  ks = [w.shape[d] for d in dn.rhs_spec[2:]]
  pad_key = []
  for k, (lo, hi) in zip(ks, p["padding"]):
    if k % 2 == 1:
      pad_key.append(("odd", lo - (k - 1) // 2, hi - (k - 1) // 2))
    else:
      pad_key.append(("even", k, lo, hi))
  out = g.avals[e.outputs[0]]
  out_sp = tuple(out.shape[d] for d in dn.out_spec[2:])
  key = (lhs, tuple(p["window_strides"]), str(dn), out_sp, str(out.dtype), str(w.dtype),
         str(p.get("preferred_element_type")), str(p.get("precision")), tuple(pad_key))
  return key + (tuple(ks),) if same_kernel else key


def _check_graph(g, fname: str) -> None:
  if not isinstance(g, Graph):
    raise TypeError(f"{fname}: g must be a Graph (from mlsys_jax.sched.build_graph), got {type(g).__name__}.")


def _check_unit(g: Graph, ui, fname: str, name: str = "ui") -> None:
  """TypeError/ValueError unless ``ui`` is the index of a unit of ``g``."""
  if isinstance(ui, bool) or not isinstance(ui, (int, np.integer)):
    raise TypeError(f"{fname}: {name} must be an integer unit index, got {type(ui).__name__} ({ui!r}).")
  if not 0 <= ui < len(g.units):
    raise ValueError(f"{fname}: {name}={ui} is not a unit of this graph; unit indices are 0..{len(g.units) - 1}.")


def _check_units(g: Graph, units, fname: str, name: str = "units") -> None:
  if not isinstance(units, (tuple, list)) or not units:
    raise TypeError(f"{fname}: {name} must be a non-empty tuple of unit indices, got {units!r}.")
  for u in units:
    _check_unit(g, u, fname, f"{name} entry")


def _check_merge_units(g: Graph, units, fname: str) -> None:
  """ValueError unless ``units`` are convolutions IOS may merge (one common, non-None ``merge_key``)."""
  _check_graph(g, fname)
  _check_units(g, units, fname)
  keys = [merge_key(g, u) for u in units]
  if None in keys or len(set(keys)) != 1:
    bad = [u for u, k in zip(units, keys) if k is None]
    why = (f"units {bad} are not mergeable convolutions" if bad else
           "their input, strides, layout, output size, dtype or padding differ")
    raise ValueError(f"{fname}: units {tuple(units)} cannot be merged into one convolution: {why}. Merge only "
                     "units with one common merge_key(g, u) (what ios_schedule's merge stages hold).")


def merged_conv_params(g: Graph, units: tuple) -> tuple[Any, dict, list]:
  """Concatenated kernel (zero-padded, centred), conv params, and per-unit output channel ranges.

  IOS's "operator merge" stage strategy (Ding et al., MLSys 2021, Sec. 4): convolutions that read the same
  input become one convolution whose kernel is the concatenation, along the output-channel axis, of the
  kernels zero-padded (centred) to the largest spatial size; the padding of the largest kernel is used,
  so the output channels ``ranges[i] = (a, b)`` of the merged conv equal unit ``units[i]``'s conv
  output (the zero taps add nothing; up to summation order).

  Args:
    g: the unit graph.
    units: two or more (one is allowed) conv units with one common :func:`merge_key`.

  Returns:
    ``(kernel, params, ranges)``: the merged kernel in the layout of the first unit's kernel, the
    ``conv_general_dilated`` params (the largest kernel's padding) and each unit's ``(start, stop)``
    output channels, in the order of ``units``.

  Raises:
    TypeError, ValueError: ``units`` is empty, holds a non-unit, or units that cannot merge.

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> w1, w2 = jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))
    >>> conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> g = build_graph(lambda x: jax.nn.relu(conv(x, w1)) + conv(x, w2), jnp.ones((1, 8, 8, 4)))
    >>> kernel, params, ranges = merged_conv_params(g, (0, 1))
    >>> kernel.shape, ranges                                # 1x1 zero-padded to 3x3; 8 + 8 output channels
    ((3, 3, 4, 16), [(0, 8), (8, 16)])
  """
  _check_merge_units(g, units, "merged_conv_params")
  e0 = g.eqns[g.units[units[0]].anchor]
  dn = e0.params["dimension_numbers"]
  ws = [np.asarray(g.consts[g.eqns[g.units[u].anchor].inputs[1]]) for u in units]
  perm = tuple(dn.rhs_spec)
  inv = tuple(int(i) for i in np.argsort(perm))
  wt = [np.transpose(w, perm) for w in ws]  # (O, I, *spatial)
  K = [max(w.shape[2 + d] for w in wt) for d in range(len(perm) - 2)]
  padded, ranges, start = [], [], 0
  for w in wt:
    pads = [(0, 0), (0, 0)] + [((K[d] - w.shape[2 + d]) // 2, K[d] - w.shape[2 + d] -
                                 (K[d] - w.shape[2 + d]) // 2) for d in range(len(K))]
    padded.append(np.pad(w, pads))
    ranges.append((start, start + w.shape[0]))
    start += w.shape[0]
  merged = np.transpose(np.concatenate(padded, axis=0), inv)
  # padding of the merged conv: that of the largest kernel per dimension
  params = dict(e0.params)
  new_pad = []
  for d in range(len(K)):
    for u, w in zip(units, wt):
      if w.shape[2 + d] == K[d]:
        new_pad.append(tuple(g.eqns[g.units[u].anchor].params["padding"][d]))
        break
  params["padding"] = tuple(new_pad)
  return jnp.asarray(merged, dtype=ws[0].dtype), params, ranges


# elementwise primitives an epilogue may hold to be applied once on a merged conv's output
_EPILOGUE_PRIMS = frozenset({"add", "sub", "mul", "div", "max", "min", "neg", "abs", "exp", "log",
                             "tanh", "logistic", "convert_element_type", "integer_pow", "sqrt",
                             "rsqrt", "square", "sign", "exp2", "log1p", "expm1", "erf"})


def const_value(g: Graph, v):
  """Concrete value of a literal, constant or lazy (constant-expanding) value id.

  Weight-only values are known at schedule time (Ding et al., MLSys 2021, Sec. 5: IOS specialises the
  schedule to fixed weights): a ``Lit`` gives its value, a constant its array in ``g.consts``, and a
  lazy value (``g.lazy``, e.g. a bias broadcast to an activation shape) is evaluated from its
  constant inputs, recursively.

  Raises:
    KeyError: ``v`` depends on the function's inputs (it has no value before the program runs).

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> g = build_graph(lambda x: x @ jnp.ones((4, 4)) + 1.0, jnp.ones((1, 4)))
    >>> g.lazy, const_value(g, 1).shape                    # jnp.ones is re-emitted next to its consumer
    ({1: 0}, (4, 4))
  """
  if isinstance(v, Lit):
    return v.val
  if v in g.consts:
    return g.consts[v]
  if v in g.lazy:
    e = g.eqns[g.lazy[v]]
    vals = [const_value(g, a) for a in e.inputs]
    with jax.ensure_compile_time_eval():
      out = e.prim.bind(*vals, **e.params)
    return out[0] if e.prim.multiple_results else out
  raise KeyError(f"const_value: value {v!r} is not a literal, a constant (g.consts) or a lazy constant "
                 "expression (g.lazy): it is computed from the function's inputs, so it has no value at "
                 "schedule time. Read it from the environment of a running program instead.")


def epilogue_chain(g: Graph, ui: int):
  """The epilogue of conv unit ``ui`` as a list of ``(prim, params, chain_pos, operand)`` steps if it
  is a chain of elementwise equations whose other operands are literals or per-output-channel
  constants (bias, folded BN scale, ReLU's 0); ``operand`` is a ``Lit`` or a 1-D numpy channel
  vector. ``None`` if the epilogue is anything else (then merged convs slice before the epilogue).

  Applying the steps in order to the unit's conv output reproduces the unit's output: for step
  ``(prim, params, pos, op)`` the running value goes in operand slot ``pos`` and ``op`` (broadcast along
  the output-channel axis) in the other slot (``op=None``: a unary step). Because every operand is
  per-channel, the chain can run once on the output of merged convs (IOS operator merge, Ding et al.,
  MLSys 2021, Sec. 4) before the channel slices.

  Raises:
    TypeError, ValueError: ``ui`` is not the index of a convolution unit of ``g``.

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> w, b = jnp.ones((1, 1, 4, 8)), jnp.arange(8.0)
    >>> conv = lambda x: lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> g = build_graph(lambda x: jax.nn.relu(conv(x) + b), jnp.ones((1, 8, 8, 4)))
    >>> [(prim.name, type(op).__name__) for prim, _, _, op in epilogue_chain(g, 0)]   # bias vector, relu's 0
    [('add', 'ndarray'), ('max', 'Lit')]
  """
  _check_graph(g, "epilogue_chain")
  _check_unit(g, ui, "epilogue_chain")
  u = g.units[ui]
  e0 = g.eqns[u.anchor]
  if u.opaque or e0.prim.name != "conv_general_dilated":
    raise ValueError(f"epilogue_chain: unit {ui} is a {u.kind!r} unit; the epilogue chain is defined for "
                     "convolution units only (see merge_key for which units merge).")
  axis = e0.params["dimension_numbers"].out_spec[1]
  cur = e0.outputs[0]
  shape = g.avals[cur].shape
  steps = []
  for ei in u.eqns[u.eqns.index(u.anchor) + 1:]:
    e = g.eqns[ei]
    if len(e.outputs) == 1 and e.outputs[0] in g.lazy:
      continue
    if e.prim.name not in _EPILOGUE_PRIMS or len(e.outputs) != 1:
      return None
    pos = [i for i, a in enumerate(e.inputs) if a == cur]
    if len(pos) != 1 or g.avals[e.outputs[0]].shape != shape:
      return None
    operand = None
    for i, a in enumerate(e.inputs):
      if i == pos[0]:
        continue
      if isinstance(a, Lit):
        operand = a
        continue
      if not (a in g.consts or a in g.lazy):
        return None
      c = np.asarray(const_value(g, a))
      if c.ndim != len(shape) or any(c.shape[d] not in (1, shape[d]) for d in range(len(shape))):
        return None
      idx = tuple(slice(None) if d == axis else 0 for d in range(c.ndim))
      vec = c[idx].reshape(-1)   # c.shape[axis] entries: 1 or the channel count
      expect = np.broadcast_to(vec.reshape([-1 if d == axis else 1 for d in range(c.ndim)]), c.shape)
      if not np.array_equal(expect, c, equal_nan=True):
        return None                # varies along a non-channel dim (e.g. a (1, H, W, 1) map)
      operand = np.array(np.broadcast_to(vec, (shape[axis],)))
    if len(e.inputs) > 2:
      return None
    steps.append((e.prim, dict(e.params), pos[0], operand))
    cur = e.outputs[0]
  if list(u.outputs) != [cur]:
    return None
  return steps


def merged_epilogue(g: Graph, units: tuple):
  """One epilogue for the concatenated output channels of merged convs, or ``None`` when their
  epilogues differ in structure (see ``epilogue_chain``).

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> w, b = jnp.ones((1, 1, 4, 8)), jnp.arange(8.0)
    >>> conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> f = lambda x: jax.nn.relu(conv(x, w) + b) + jax.nn.relu(conv(x, 2 * w) + b)
    >>> g = build_graph(f, jnp.ones((1, 8, 8, 4)))
    >>> [(prim.name, getattr(op, "shape", None)) for prim, _, _, op in merged_epilogue(g, (0, 1))]
    [('add', (16,)), ('max', None)]
  """
  chains = [epilogue_chain(g, u) for u in units]
  if any(c is None for c in chains) or len({len(c) for c in chains}) != 1:
    return None
  out = []
  for steps in zip(*chains):
    prims = {s[0] for s in steps}
    if len(prims) != 1 or len({s[2] for s in steps}) != 1 or any(s[1] != steps[0][1] for s in steps):
      return None
    ops = [s[3] for s in steps]
    if all(o is None for o in ops):
      op = None
    elif all(isinstance(o, Lit) for o in ops) and all(
        np.array_equal(np.asarray(o.val), np.asarray(ops[0].val)) for o in ops):
      op = ops[0]
    else:
      vecs = []
      for u, o in zip(units, ops):
        e = g.eqns[g.units[u].anchor]
        c = g.avals[e.outputs[0]].shape[e.params["dimension_numbers"].out_spec[1]]
        if o is None:
          return None
        vecs.append(np.broadcast_to(np.asarray(o.val if isinstance(o, Lit) else o), (c,)))
      dtypes = {v.dtype for v in vecs}
      if len(dtypes) != 1:
        return None
      op = jnp.asarray(np.concatenate(vecs))
    out.append((steps[0][0], steps[0][1], steps[0][2], op))
  return out


def prepare_merges(g: Graph, stages: list, fuse_epilogue: bool = True) -> dict:
  """Precompute merged kernels for every merge stage: {stage index: (kernel, params, ranges, epi)};
  ``epi`` is the merged epilogue (``merged_epilogue``) or None (slice first, then each unit's own
  epilogue).

  Done once per schedule, at schedule time (IOS operator merge, Ding et al., MLSys 2021, Sec. 4), so
  the emitted program reads ready merged kernels. ``fuse_epilogue=False`` gives ``epi=None`` for
  every merge. Parallel stages get no entry.

  Raises:
    TypeError: ``stages`` is not a sequence of :class:`~mlsys_jax.sched.dp.Stage`.
    ValueError: a merge stage has more than one group or holds units that cannot merge.

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> w1, w2 = jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))
    >>> conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> g = build_graph(lambda x: jax.nn.relu(conv(x, w1)) + conv(x, w2), jnp.ones((1, 8, 8, 4)))
    >>> merges = prepare_merges(g, [Stage("merge", ((0, 1),)), Stage("parallel", ((2,),))])
    >>> list(merges), merges[0][0].shape, merges[0][3]      # epilogues differ (relu on one): slice first
    ([0], (3, 3, 4, 16), None)
  """
  _check_graph(g, "prepare_merges")
  _check_stages(stages, "prepare_merges")
  return {i: merge_entry(g, st.groups[0], fuse_epilogue)
          for i, st in enumerate(stages) if st.kind == "merge"}


def _check_stages(stages, fname: str) -> None:
  if not isinstance(stages, (list, tuple)) or not all(isinstance(st, Stage) for st in stages):
    raise TypeError(f"{fname}: stages must be a list of Stage (from ios_dp / Schedule.stages), got "
                    f"{type(stages).__name__}.")
  for i, st in enumerate(stages):
    if st.kind not in ("parallel", "merge"):
      raise ValueError(f"{fname}: stage {i} has kind {st.kind!r}; expected 'parallel' or 'merge'.")
    if st.kind == "merge" and len(st.groups) != 1:
      raise ValueError(f"{fname}: merge stage {i} must hold exactly one group (the convs merged), got "
                       f"{len(st.groups)} groups.")


def merge_entry(g: Graph, units: tuple, fuse_epilogue: bool = True) -> tuple:
  """``(kernel, params, ranges, epi)`` of one merge of ``units`` (see ``prepare_merges``).

  ``(kernel, params, ranges)`` as in :func:`merged_conv_params`; ``epi`` the common epilogue of the
  units (:func:`merged_epilogue`: a list of steps, ``[]`` when no unit has an epilogue, ``None`` when
  the epilogues differ) or ``None`` with ``fuse_epilogue=False``. The result is what
  :func:`run_merge` and :func:`run_stage` take as ``merged``.

  Raises:
    TypeError, ValueError: as :func:`merged_conv_params`.

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> w1, w2 = jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))
    >>> conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> g = build_graph(lambda x: conv(x, w1) + conv(x, w2), jnp.ones((1, 8, 8, 4)))
    >>> kernel, params, ranges, epi = merge_entry(g, (0, 1))
    >>> kernel.shape, ranges, epi                          # no epilogue on either conv
    ((3, 3, 4, 16), [(0, 8), (8, 16)], [])
  """
  conv = merged_conv_params(g, units)   # checks that the units can merge
  epi = merged_epilogue(g, units) if fuse_epilogue else None
  return conv + (epi,)


# ------------------------------------------------------------------------------------------ units
def _read(g: Graph, env: dict, consts: dict, v):
  if isinstance(v, Lit):
    return v.val
  if v in consts:
    return consts[v]
  return env[v]


def run_unit(g: Graph, ui: int, env: dict, consts: dict, anchor_out=None) -> None:
  """Evaluate the equations of unit ``ui`` (flat ``bind`` calls), writing results into ``env``.

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> w = jnp.ones((4, 4))
    >>> g = build_graph(lambda x: jnp.tanh(x @ w) + x @ (2 * w), jnp.ones((1, 4)))
    >>> env = {g.in_ids[0]: jnp.ones((1, 4))}
    >>> run_unit(g, 0, env, g.consts)                      # the first dot and its tanh
    >>> round(float(env[g.units[0].outputs[0]][0, 0]), 4)   # tanh(4)
    0.9993
  """
  u = g.units[ui]
  for ei in u.eqns:
    e = g.eqns[ei]
    if anchor_out is not None and ei == u.anchor:
      outs = [anchor_out]
    else:
      vals = [_read(g, env, consts, v) for v in e.inputs]
      outs = e.prim.bind(*vals, **e.params)
      if not e.prim.multiple_results:
        outs = [outs]
    for o, val in zip(e.outputs, outs):
      env[o] = val


def run_merge(g: Graph, units: tuple, merged, env: dict, consts: dict) -> None:
  """Run the convs ``units`` as one conv with the kernel of ``merged`` (``merge_entry``), then slice
  each unit's output channels (and its epilogue) into ``env``.

  The emission of an IOS merge stage (Ding et al., MLSys 2021, Sec. 4-5): after the call, ``env`` holds
  every unit's outputs, equal (up to summation order; see :func:`merge_key` for inf inputs) to running
  the units one by one. With ``epi`` (the fourth entry of ``merged``) not ``None`` the common epilogue
  runs once on the merged output before the slices; otherwise each slice runs its unit's own
  epilogue. ``merged``'s kernel may be a value id of ``consts`` (how ``Schedule`` embeds it).

  Raises:
    TypeError: ``merged`` is not a ``(kernel, params, ranges, epi)`` tuple.
    ValueError: ``units`` cannot merge, or ``ranges`` does not hold one channel range per unit.
    KeyError: the convs' input is not in ``env``.

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> w1, w2 = jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))
    >>> conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> x = jnp.ones((1, 8, 8, 4))
    >>> g = build_graph(lambda x: conv(x, w1) + conv(x, w2), x)
    >>> env = {g.in_ids[0]: x}
    >>> run_merge(g, (0, 1), merge_entry(g, (0, 1)), env, g.consts)
    >>> [bool(jnp.allclose(env[g.units[u].outputs[0]], conv(x, w))) for u, w in ((0, w1), (1, w2))]
    [True, True]
  """
  _check_merge_units(g, units, "run_merge")
  _run_merge(g, units, merged, env, consts)


def _run_merge(g: Graph, units: tuple, merged, env: dict, consts: dict) -> None:
  """:func:`run_merge` for ``units`` already known to merge (``make_program`` checked the schedule)."""
  if not isinstance(merged, tuple) or len(merged) != 4:
    raise TypeError("run_merge: merged must be the (kernel, params, ranges, epi) tuple of merge_entry(g, units), "
                    f"got {type(merged).__name__}.")
  kernel, params, ranges, epi = merged
  if len(ranges) != len(units):
    raise ValueError(f"run_merge: merged holds {len(ranges)} channel ranges for {len(units)} units; build it "
                     "with merge_entry(g, units) for these units.")
  if isinstance(kernel, int):  # a value id in consts (kernels precomputed by the Schedule)
    kernel = consts[kernel]
  e0 = g.eqns[g.units[units[0]].anchor]
  lhs = _read(g, env, consts, e0.inputs[0])
  y = lax.conv_general_dilated_p.bind(lhs, kernel, **params)
  axis = params["dimension_numbers"].out_spec[1]
  if epi is None:
    for u, (a, b) in zip(units, ranges):
      run_unit(g, u, env, consts, anchor_out=lax.slice_in_dim(y, a, b, axis=axis))
    return
  # one epilogue on the merged output (keeps XLA's conv+bias+activation fusion), then slices
  for prim, p, pos, op in epi:
    if op is None:
      args = [y]
    else:
      other = op.val if isinstance(op, Lit) else lax.broadcast_in_dim(op, y.shape, (axis,))
      args = [other, other]
      args[pos] = y
    y = prim.bind(*args, **p)
  for u, (a, b) in zip(units, ranges):
    env[g.units[u].outputs[0]] = lax.slice_in_dim(y, a, b, axis=axis)


def run_group(g: Graph, group: tuple, env: dict, consts: dict) -> None:
  """Run the units of one group (a chain) in order (see :func:`run_unit`).

  One group of an IOS concurrent stage (Ding et al., MLSys 2021, Sec. 4): its units run one after
  another, each writing its outputs into ``env`` (value id -> array); values the group reads must be
  in ``env`` (dynamic values) or ``consts`` (weights).

  Raises:
    TypeError, ValueError: ``group`` is not a non-empty sequence of unit indices of ``g``.
    KeyError: a unit reads a value that is in neither ``env`` nor ``consts`` (a predecessor has not run).

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> w = jnp.ones((4, 4))
    >>> g = build_graph(lambda x: jnp.tanh(x @ w) + x @ (2 * w), jnp.ones((1, 4)))
    >>> env = {g.in_ids[0]: jnp.ones((1, 4))}
    >>> run_group(g, (0, 1, 2), env, g.consts)             # all three units in order
    >>> round(float(env[g.out_ids[0]][0, 0]), 4)           # tanh(4) + 8
    8.9993
  """
  _check_units(g, group, "run_group", "group")
  _run_group(g, group, env, consts)


def _run_group(g: Graph, group: tuple, env: dict, consts: dict) -> None:
  for u in group:
    run_unit(g, u, env, consts)


def _group_io(g: Graph, group: tuple):
  own, ins, outs = set(), [], []
  for u in group:
    for ei in g.units[u].eqns:
      own.update(g.eqns[ei].outputs)
  for u in group:
    for v in g.units[u].inputs:
      if v not in own and v not in ins:
        ins.append(v)
    outs.extend(g.units[u].outputs)
  return ins, outs


def run_stage(g: Graph, st: Stage, env: dict, consts: dict, mode: str, merged=None) -> None:
  """Emit one stage into ``env``: a merge (``merged`` from ``merge_entry``) or its groups, the groups
  wrapped for GPU streams under ``mode='streams'``.

  A stage of an IOS schedule (Ding et al., MLSys 2021, Sec. 4-5). Under ``'streams'`` every group but
  the longest is wrapped in :func:`stream_call` on streams 1, 2, ... (opaque groups run inline); the
  values computed are the same in every mode.

  Raises:
    ValueError: ``mode`` is not an emission mode, or a merge stage comes without ``merged``.
    TypeError: ``st`` is not a :class:`~mlsys_jax.sched.dp.Stage`.

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> w = jnp.ones((4, 4))
    >>> g = build_graph(lambda x: jnp.tanh(x @ w) + x @ (2 * w), jnp.ones((1, 4)))
    >>> env = {g.in_ids[0]: jnp.ones((1, 4))}
    >>> for st in (Stage("parallel", ((0,), (1,))), Stage("parallel", ((2,),))):
    ...   run_stage(g, st, env, g.consts, "plain")
    >>> round(float(env[g.out_ids[0]][0, 0]), 4)
    8.9993
  """
  check_choice("mode", mode, EMISSION_MODES)
  _check_stages([st], "run_stage")
  _run_stage(g, st, env, consts, mode, merged, check_units=True)


def _run_stage(g: Graph, st: Stage, env: dict, consts: dict, mode: str, merged=None, *,
               check_units: bool = False) -> None:
  """:func:`run_stage` after its ``mode``/``st`` checks. ``check_units=False`` (``make_program``, which
  validated the whole schedule once with ``_check_cover``) skips re-checking the units of each stage
  (indices, ``merge_key``) while the program is traced."""
  if st.kind == "merge":
    if merged is None:
      raise ValueError("run_stage: a merge stage needs merged=merge_entry(g, st.groups[0]) (or the entry of "
                       "prepare_merges for this stage).")
    if check_units:
      _check_merge_units(g, st.groups[0], "run_merge")
    _run_merge(g, st.groups[0], merged, env, consts)
    return
  if check_units:
    for grp in st.groups:
      _check_units(g, grp, "run_group", "group")
  if mode != "streams" or len(st.groups) == 1:
    for grp in st.groups:
      _run_group(g, grp, env, consts)
    return
  order = sorted(range(len(st.groups)), key=lambda i: -len(st.groups[i]))
  main, others = order[0], order[1:]
  for k, gi in enumerate(others):
    grp = st.groups[gi]
    if any(g.units[u].opaque for u in grp):
      _run_group(g, grp, env, consts)
      continue
    ins, outs = _group_io(g, grp)

    def body(*xs, grp=grp, ins=ins, outs=outs):
      local = dict(zip(ins, xs))
      _run_group(g, grp, local, consts)
      return tuple(local[o] for o in outs)

    res = stream_call(body, k + 1)(*[env[v] for v in ins])
    for o, val in zip(outs, res):
      env[o] = val
  _run_group(g, st.groups[main], env, consts)


def _check_args(g: Graph, args: tuple) -> None:
  """TypeError unless ``args`` has the structure, shapes and dtypes of the example arguments the
  graph was traced with (other shapes would run the traced program on the wrong sizes or drop
  extra arguments silently)."""
  flat, tree = jax.tree_util.tree_flatten(args)
  if tree != g.in_tree:
    raise TypeError(f"ios: the scheduled function takes arguments structured as {g.in_tree} (the "
                    f"example arguments minus static ones), got {tree}")
  for i, (v, x) in enumerate(zip(g.in_ids, flat)):
    want = g.avals[v]
    if tuple(np.shape(x)) != tuple(want.shape) or jnp.result_type(x) != want.dtype:
      raise TypeError(f"ios: argument leaf {i} has shape {tuple(np.shape(x))} and dtype "
                      f"{jnp.result_type(x)}, but the schedule was traced for {want.str_short()}; "
                      "schedule again for new shapes/dtypes")


def keep_alive_term(vals: list):
  """A scalar that reads one element of every array in ``vals`` and is exactly 0: adding it to an
  output keeps those buffers live until the end of the program, so XLA's buffer assignment cannot
  reuse their memory for later values. On GPU with CONCURRENT command buffers, whose DAG edges come
  from buffer conflicts, reuse adds false write-after-read edges between independent branches; with
  every intermediate kept live only true data dependencies remain. ``min(|v|, 1)`` on finite
  elements bounds the sum, so ``0 * sum`` is exactly +0 and ``out - term`` equals ``out`` bit for bit
  for every ``out`` (NaN, inf and -0 included; ``out + term`` would turn -0 into +0).

  Example:
    >>> t = keep_alive_term([jnp.array([jnp.inf, 2.0]), jnp.ones((2, 2))])
    >>> float(t), bool(jnp.signbit(jnp.array(-0.0) - t))    # exactly 0; out - t keeps -0
    (0.0, True)
  """
  acc = None
  for v in vals:
    x = lax.convert_element_type(lax.reshape(lax.slice(v, (0,) * v.ndim, (1,) * v.ndim), ()),
                                 jnp.float32)
    x = lax.select(lax.is_finite(x), lax.min(lax.abs(x), jnp.float32(1)), jnp.float32(0))
    acc = x if acc is None else lax.add(acc, x)
  return None if acc is None else lax.mul(acc, jnp.float32(0))


def make_program(g: Graph, stages: list, mode: str = "cuda_graph", merges: Optional[dict] = None,
                 keep_alive: bool = False):
  """The scheduled program ``run(consts, *args)``; ``consts`` is ``{value id: array}``.

  ``keep_alive=True`` keeps every unit output live to the end (see ``keep_alive_term``).

  The IOS runtime (Ding et al., MLSys 2021, Sec. 5) as one traced JAX function: the stages run in order
  (:func:`run_stage`), merge stages with the merged kernels of ``merges`` (default
  ``prepare_merges(g, stages)``; a kernel may be a value id of ``consts``). ``run(g.consts, *args)``
  computes what the traced function computes on ``args`` (same structure, shapes and dtypes as the
  example arguments, else ``TypeError``), up to summation order in merged convs.

  Raises:
    ValueError: ``mode`` is not one of ``EMISSION_MODES``, or ``stages`` is not a valid schedule of
      ``g`` (each unit exactly once, after its predecessors; merge stages of mergeable convs).
    TypeError: ``stages`` is not a list of :class:`~mlsys_jax.sched.dp.Stage`.

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> w1, w2 = jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))
    >>> conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> f = lambda x: jax.nn.relu(conv(x, w1)) + conv(x, w2)
    >>> x = jnp.ones((1, 8, 8, 4))
    >>> g = build_graph(f, x)
    >>> run = make_program(g, [Stage("merge", ((0, 1),)), Stage("parallel", ((2,),))], mode="plain")
    >>> bool(jnp.allclose(jax.jit(run)(g.consts, x), f(x)))
    True
  """
  check_choice("mode", mode, EMISSION_MODES)
  _check_graph(g, "make_program")
  _check_stages(stages, "make_program")
  from mlsys_jax.sched.api import _check_cover   # the schedule-validity check Schedule applies (lazy: api imports emit)
  _check_cover(g, list(stages))
  merges = prepare_merges(g, stages) if merges is None else merges
  missing = [i for i, st in enumerate(stages) if st.kind == "merge" and i not in merges]
  if missing:
    raise ValueError(f"make_program: merges has no entry for merge stages {missing}; pass "
                     "merges=prepare_merges(g, stages) or leave merges=None.")

  def run(consts, *args):
    _check_args(g, args)  # at trace time only: no cost per call
    flat = jax.tree_util.tree_leaves(args)
    env = dict(zip(g.in_ids, flat))
    for i, st in enumerate(stages):
      _run_stage(g, st, env, consts, mode, merges.get(i))   # schedule checked above, once
    outs = [_read(g, env, consts, o) for o in g.out_ids]
    if keep_alive:
      out_set = {o for o in g.out_ids if isinstance(o, int)}
      vals = [env[o] for u in g.units if not u.opaque for o in u.outputs
              if o not in out_set and o in env and hasattr(env[o], "ndim") and env[o].size > 0
              and (jnp.issubdtype(env[o].dtype, jnp.floating) or
                   jnp.issubdtype(env[o].dtype, jnp.integer))]
      term = keep_alive_term(vals)
      if term is not None:
        for i, o in enumerate(outs):
          if (hasattr(o, "dtype") and o.size > 0 and  # x - 0 == x exactly for these dtypes
              any(jnp.issubdtype(o.dtype, t) for t in (jnp.floating, jnp.complexfloating, jnp.integer))):
            outs[i] = lax.sub(o, lax.convert_element_type(term, o.dtype))
            break
    return jax.tree_util.tree_unflatten(g.out_tree, outs)

  return run


def stage_program(g: Graph, st: Stage, mode: str, fuse_epilogue: bool = True):
  """A standalone function for one stage: ``(consts, ins) -> outs`` and the ids it reads/writes.

  ``fuse_epilogue`` as in ``prepare_merges``: the merge stage is built as the scheduled program will run it.

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> f = lambda x: jnp.tanh(x @ jnp.ones((4, 4))) + x @ jnp.ones((4, 4))
    >>> g = build_graph(f, jnp.ones((1, 4)))
    >>> fn, ins, outs, const_ids = stage_program(g, Stage("parallel", ((0,), (1,))), "plain")
    >>> ys = fn({c: g.consts[c] for c in const_ids}, (jnp.ones((1, 4)),))
    >>> len(ins), len(outs), [y.shape for y in ys]          # reads x; writes both dots' outputs
    (1, 2, [(1, 4), (1, 4)])
  """
  merged = None
  if st.kind == "merge":
    merged = merge_entry(g, st.groups[0], fuse_epilogue)
  ins, outs = _group_io(g, st.units)
  cids = []
  for u in st.units:
    for ei in g.units[u].eqns:
      for v in g.eqns[ei].inputs:
        if isinstance(v, int) and v in g.consts and v not in cids:
          cids.append(v)

  def fn(consts, xs):
    env = dict(zip(ins, xs))
    run_stage(g, st, env, consts, mode, merged)
    return tuple(env[o] for o in outs)

  return fn, ins, outs, cids
