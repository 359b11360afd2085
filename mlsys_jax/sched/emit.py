"""Emission of an IOS schedule as one jitted JAX function (Ding et al., MLSys 2021, Sec. 5: the runtime
that executes stages; here XLA plays the runtime).

Four emission modes:
  * ``'cuda_graph'`` (default, what works best on H100, see benchmarks/ios_probe.py): the flat primitives
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

Example:
  >>> stream_call_available()  # doctest: +SKIP
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
  """XLA options for an emission mode; empty on non-GPU backends (the flags are GPU-only)."""
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
  """Whether this jax has the function form of compute_on (compute_on2 or HEAD's compute_on)."""
  try:
    return _compute_on_fn() is not None
  except ImportError:
    return False


def stream_call(f: Callable, stream: int) -> Callable:
  """Wrap ``f`` so that XLA runs it on GPU stream ``stream`` (``_xla_stream_annotation``)."""
  fn = _compute_on_fn()
  if fn is None:
    raise RuntimeError("this jax has no function-form compute_on/compute_on2; use emission='cuda_graph'")
  return fn(f, compute_type=f"gpu_stream:{int(stream)}", out_memory_spaces=jax.memory.Space.Device)


# ------------------------------------------------------------------------------------------ merges
def merge_key(g: Graph, ui: int):
  """Key equal for conv units that IOS may merge: same input value, strides, layout, output size,
  dtype and a padding that stays valid when kernels are zero-padded, centred, to the largest one
  (odd kernels). ``None`` if the unit is not a mergeable convolution.

  Dilated, grouped, string-padded convs and kernels that are not constants are never merged. NaN/inf:
  a merged conv multiplies the zero taps of a padded kernel too, so an inf in the input window of the
  largest kernel but outside a smaller kernel's window turns that smaller conv's output into NaN
  (0 * inf); with finite inputs the result equals the separate convs up to summation order."""
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
  return (lhs, tuple(p["window_strides"]), str(dn), out_sp, str(out.dtype), str(w.dtype),
          str(p.get("preferred_element_type")), str(p.get("precision")), tuple(pad_key))


def merged_conv_params(g: Graph, units: tuple) -> tuple[Any, dict, list]:
  """Concatenated kernel (zero-padded, centred), conv params, and per-unit output channel ranges."""
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


def prepare_merges(g: Graph, stages: list) -> dict:
  """Precompute merged kernels for every merge stage: {stage index: (kernel, params, ranges)}."""
  return {i: merged_conv_params(g, st.groups[0]) for i, st in enumerate(stages) if st.kind == "merge"}


# ------------------------------------------------------------------------------------------ units
def _read(g: Graph, env: dict, consts: dict, v):
  if isinstance(v, Lit):
    return v.val
  if v in consts:
    return consts[v]
  return env[v]


def run_unit(g: Graph, ui: int, env: dict, consts: dict, anchor_out=None) -> None:
  """Evaluate the equations of unit ``ui`` (flat ``bind`` calls), writing results into ``env``."""
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
  kernel, params, ranges = merged
  if isinstance(kernel, int):  # a value id in consts (kernels precomputed by the Schedule)
    kernel = consts[kernel]
  e0 = g.eqns[g.units[units[0]].anchor]
  lhs = _read(g, env, consts, e0.inputs[0])
  y = lax.conv_general_dilated_p.bind(lhs, kernel, **params)
  axis = params["dimension_numbers"].out_spec[1]
  for u, (a, b) in zip(units, ranges):
    run_unit(g, u, env, consts, anchor_out=lax.slice_in_dim(y, a, b, axis=axis))


def run_group(g: Graph, group: tuple, env: dict, consts: dict) -> None:
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


def make_program(g: Graph, stages: list, mode: str = "cuda_graph", merges: Optional[dict] = None):
  """The scheduled program ``run(consts, *args)``; ``consts`` is ``{value id: array}``."""
  merges = prepare_merges(g, stages) if merges is None else merges

  def run(consts, *args):
    _check_args(g, args)  # at trace time only: no cost per call
    flat = jax.tree_util.tree_leaves(args)
    env = dict(zip(g.in_ids, flat))
    for i, st in enumerate(stages):
      run_stage(g, st, env, consts, mode, merges.get(i))
    outs = [_read(g, env, consts, o) for o in g.out_ids]
    return jax.tree_util.tree_unflatten(g.out_tree, outs)

  return run


def stage_program(g: Graph, st: Stage, mode: str):
  """A standalone function for one stage: ``(consts, ins) -> outs`` and the ids it reads/writes."""
  merged = merged_conv_params(g, st.groups[0]) if st.kind == "merge" else None
  own = set()
  for u in st.units:
    for ei in g.units[u].eqns:
      own.update(g.eqns[ei].outputs)
  ins, outs, cids = [], [], []
  for u in st.units:
    for v in g.units[u].inputs:
      if v not in own and v not in ins:
        ins.append(v)
    for ei in g.units[u].eqns:
      for v in g.eqns[ei].inputs:
        if isinstance(v, int) and v in g.consts and v not in cids:
          cids.append(v)
    outs.extend(g.units[u].outputs)

  def fn(consts, xs):
    env = dict(zip(ins, xs))
    run_stage(g, st, env, consts, mode, merged)
    return tuple(env[o] for o in outs)

  return fn, ins, outs, cids
