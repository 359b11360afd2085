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

  Example:
    >>> f = stream_call(lambda x: x + 1, 1) if stream_call_available() else (lambda x: x + 1)
    >>> jax.jit(f)(jnp.ones(2)).tolist()                      # the stream annotation matters on GPU only
    [2.0, 2.0]
  """
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


def merged_conv_params(g: Graph, units: tuple) -> tuple[Any, dict, list]:
  """Concatenated kernel (zero-padded, centred), conv params, and per-unit output channel ranges.

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
  raise KeyError(f"value {v} is not constant")


def epilogue_chain(g: Graph, ui: int):
  """The epilogue of conv unit ``ui`` as a list of ``(prim, params, chain_pos, operand)`` steps if it
  is a chain of elementwise equations whose other operands are literals or per-output-channel
  constants (bias, folded BN scale, ReLU's 0); ``operand`` is a ``Lit`` or a 1-D numpy channel
  vector. ``None`` if the epilogue is anything else (then merged convs slice before the epilogue).

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> w, b = jnp.ones((1, 1, 4, 8)), jnp.arange(8.0)
    >>> conv = lambda x: lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> g = build_graph(lambda x: jax.nn.relu(conv(x) + b), jnp.ones((1, 8, 8, 4)))
    >>> [(prim.name, type(op).__name__) for prim, _, _, op in epilogue_chain(g, 0)]   # bias vector, relu's 0
    [('add', 'ndarray'), ('max', 'Lit')]
  """
  u = g.units[ui]
  e0 = g.eqns[u.anchor]
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
  return {i: merge_entry(g, st.groups[0], fuse_epilogue)
          for i, st in enumerate(stages) if st.kind == "merge"}


def merge_entry(g: Graph, units: tuple, fuse_epilogue: bool = True) -> tuple:
  """``(kernel, params, ranges, epi)`` of one merge of ``units`` (see ``prepare_merges``).

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
  epi = merged_epilogue(g, units) if fuse_epilogue else None
  return merged_conv_params(g, units) + (epi,)


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
  kernel, params, ranges, epi = merged
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

  Example:
    >>> from mlsys_jax.sched.graph import build_graph
    >>> w = jnp.ones((4, 4))
    >>> g = build_graph(lambda x: jnp.tanh(x @ w) + x @ (2 * w), jnp.ones((1, 4)))
    >>> env = {g.in_ids[0]: jnp.ones((1, 4))}
    >>> run_group(g, (0, 1, 2), env, g.consts)             # all three units in order
    >>> round(float(env[g.out_ids[0]][0, 0]), 4)           # tanh(4) + 8
    8.9993
  """
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
  if st.kind == "merge":
    run_merge(g, st.groups[0], merged, env, consts)
    return
  if mode != "streams" or len(st.groups) == 1:
    for grp in st.groups:
      run_group(g, grp, env, consts)
    return
  order = sorted(range(len(st.groups)), key=lambda i: -len(st.groups[i]))
  main, others = order[0], order[1:]
  for k, gi in enumerate(others):
    grp = st.groups[gi]
    if any(g.units[u].opaque for u in grp):
      run_group(g, grp, env, consts)
      continue
    ins, outs = _group_io(g, grp)

    def body(*xs, grp=grp, ins=ins, outs=outs):
      local = dict(zip(ins, xs))
      run_group(g, grp, local, consts)
      return tuple(local[o] for o in outs)

    res = stream_call(body, k + 1)(*[env[v] for v in ins])
    for o, val in zip(outs, res):
      env[o] = val
  run_group(g, st.groups[main], env, consts)


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
  merges = prepare_merges(g, stages) if merges is None else merges

  def run(consts, *args):
    _check_args(g, args)  # at trace time only: no cost per call
    flat = jax.tree_util.tree_leaves(args)
    env = dict(zip(g.in_ids, flat))
    for i, st in enumerate(stages):
      run_stage(g, st, env, consts, mode, merges.get(i))
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
