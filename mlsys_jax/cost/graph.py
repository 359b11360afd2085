"""HLO module -> flat, padded graph container (program-level and kernel-level graphs).

Kaufman et al. (MLSys 2021, Sec. 3.1) feed a GNN one graph per kernel (a fused computation): nodes are
HLO instructions with opcode, output shape, layout and instruction constants (window, dot dimensions),
edges are operand dependencies. :class:`HloGraph` holds a batch of such graphs the way
``jraph.GraphsTuple`` does: node and edge arrays concatenated over graphs, ``senders``/``receivers`` as
global node indices, and per-graph counts ``n_node``/``n_edge``; plus the kernel each node belongs to
(``kernel``, a global kernel index) and per-graph kernel counts ``n_kernel``, so a model can reduce nodes
to kernels (``segment_sum``) and kernels to programs.

A *program graph* (:func:`program_graph`) holds every instruction of the entry computation and, inlined,
the instructions of the computations it fuses or calls; each node's kernel is the entry instruction it
belongs to. A *kernel graph* (:func:`kernel_graphs`) holds one kernel alone.

Example:
  >>> from mlsys_jax.cost.hlo import parse_hlo
  >>> mod = parse_hlo(jax.jit(lambda x: jnp.tanh(x @ x)).lower(jnp.ones((4, 4))).compile().as_text())
  >>> g = program_graph(mod)
  >>> int(g.n_node[0]) == g.opcode.shape[0]
  True
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, Sequence

import numpy as np

from mlsys_jax.cost.hlo import (Computation, HloModule, Instruction, Shape, backend_tiles, capture,
                                int_list, parse_hlo, parse_window, reducer_opcode)

MAX_RANK = 6

OPCODES: tuple[str, ...] = (
    "<pad>", "<unknown>",
    "abs", "add", "add-dependency", "after-all", "all-gather", "all-gather-done", "all-gather-start",
    "all-reduce", "all-reduce-done", "all-reduce-start", "all-to-all", "and", "async-done",
    "async-start", "async-update", "atan2", "batch-norm-grad", "batch-norm-inference",
    "batch-norm-training", "bitcast", "bitcast-convert", "broadcast", "call", "cbrt", "ceil", "cholesky",
    "clamp", "clz", "collective-broadcast", "collective-permute", "collective-permute-done",
    "collective-permute-start", "compare", "complex", "concatenate", "conditional", "constant",
    "convert", "convolution", "copy", "copy-done", "copy-start", "cosine", "custom-call", "divide",
    "domain", "dot", "dynamic-reshape", "dynamic-slice", "dynamic-update-slice", "erf", "exponential",
    "exponential-minus-one", "fft", "floor", "fusion", "gather", "get-dimension-size",
    "get-tuple-element", "imag", "infeed", "iota", "is-finite", "log", "log-plus-one", "logistic", "map",
    "maximum", "minimum", "multiply", "negate", "not", "optimization-barrier", "or", "outfeed", "pad",
    "parameter", "partition-id", "popcnt", "power", "real", "recv", "recv-done", "reduce",
    "reduce-precision", "reduce-scatter", "reduce-window", "remainder", "replica-id", "reshape",
    "reverse", "rng", "rng-bit-generator", "rng-get-and-update-state", "round-nearest-afz",
    "round-nearest-even", "rsqrt", "scatter", "select", "select-and-scatter", "send", "send-done",
    "set-dimension-size", "shift-left", "shift-right-arithmetic", "shift-right-logical", "sign", "sine",
    "slice", "sort", "sqrt", "stochastic-convert", "subtract", "tan", "tanh", "topk", "transpose",
    "triangular-solve", "tuple", "while", "xor", "ragged-all-to-all", "ragged-dot", "composite",
    "fusion-start", "fusion-done", "call-start", "call-done",
    "reduce-scatter-start", "reduce-scatter-done", "fusion-update", "all-to-all-start", "all-to-all-done",
    "collective-broadcast-start", "collective-broadcast-done", "ragged-all-to-all-start",
    "ragged-all-to-all-done", "erf-inv", "scan",
)
"""Opcode vocabulary; an opcode outside it (a newer XLA's) gets id 1, ``<unknown>``."""
OPCODE_ID = {name: i for i, name in enumerate(OPCODES)}

DTYPES: tuple[str, ...] = ("<pad>", "<other>", "pred", "s8", "s16", "s32", "s64", "u8", "u16", "u32",
                           "u64", "f16", "bf16", "f32", "f64", "c64", "c128", "f8e4m3fn", "f8e5m2",
                           "s4", "u4", "token", "tuple")
DTYPE_ID = {name: i for i, name in enumerate(DTYPES)}

FUSION_KINDS = ("none", "kLoop", "kInput", "kOutput", "kCustom")
CUSTOM_TARGETS = ("none", "gemm", "conv", "triton", "other")
REDUCERS = ("none", "add", "maximum", "minimum", "multiply", "other")

# Columns of HloGraph.attrs (raw values; features.py normalizes them).
ATTR_NAMES: tuple[str, ...] = (
    "window_size", "window_stride", "window_pad", "window_dilation", "window_rank",
    "feature_group_count", "batch_group_count", "dot_contract_size", "dot_batch_dims",
    "dimensions_attr", "reducer", "num_operands", "is_root", "depth", "operand_bytes",
    "block_m", "block_n", "block_k", "split_k", "num_stages", "num_warps", "custom_target",
    "fusion_kind", "scalar_constant", "flops", "transcendentals",
    "tile_second_minor", "tile_minor", "memory_space",
)
"""Columns of :attr:`HloGraph.attrs`. The last three keep TPU layouts: the first tile of the output's
layout (``{1,0:T(8,128)}`` -> 8, 128; 0 if untiled) and its memory space (``S(1)`` -> 1)."""
ATTR_ID = {n: i for i, n in enumerate(ATTR_NAMES)}
NUM_ATTRS = len(ATTR_NAMES)

_TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "logistic", "tanh",
                   "sine", "cosine", "tan", "sqrt", "rsqrt", "cbrt", "power", "erf", "atan2"}
_ELEMENTWISE = {"abs", "add", "and", "atan2", "ceil", "clamp", "compare", "divide", "floor",
                "maximum", "minimum", "multiply", "negate", "not", "or", "remainder", "round-nearest-afz",
                "round-nearest-even", "select", "sign", "subtract", "xor", "is-finite", "convert",
                "shift-left", "shift-right-arithmetic", "shift-right-logical", "popcnt", "clz"} | _TRANSCENDENTAL
# Entry instructions that launch no kernel of their own.
TRIVIAL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
           "add-dependency", "optimization-barrier", "partition-id", "replica-id"}


class HloGraph(NamedTuple):
  """A batch of HLO graphs as flat arrays (jraph ``GraphsTuple`` layout, jit-friendly once padded).

  Attributes:
    opcode: int32[N] index into :data:`OPCODES` (0 = padding).
    dtype: int32[N] index into :data:`DTYPES`.
    dims: int64[N, MAX_RANK] output dimensions (0 beyond the rank; a tuple output has rank 0).
    rank: int32[N].
    layout: int32[N, MAX_RANK] minor-to-major dimension order, -1 beyond the rank or when absent.
    num_bytes: float64[N] bytes of the output (tuple: sum of elements).
    attrs: float32[N, NUM_ATTRS] instruction constants, see :data:`ATTR_NAMES`.
    kernel: int32[N] global kernel index of each node.
    senders, receivers: int32[E] edge from operand (sender) to user (receiver), global node indices.
    n_node, n_edge, n_kernel: int32[G] counts per graph.
  """
  opcode: np.ndarray
  dtype: np.ndarray
  dims: np.ndarray
  rank: np.ndarray
  layout: np.ndarray
  num_bytes: np.ndarray
  attrs: np.ndarray
  kernel: np.ndarray
  senders: np.ndarray
  receivers: np.ndarray
  n_node: np.ndarray
  n_edge: np.ndarray
  n_kernel: np.ndarray

  @property
  def num_graphs(self) -> int:
    return int(self.n_node.shape[0])


_TRIVIAL_IDS = np.asarray([OPCODE_ID[o] for o in TRIVIAL if o in OPCODE_ID])


def _check_graph(name: str, g: HloGraph) -> None:
  if not isinstance(g, HloGraph):
    raise TypeError(f"{name} must be an HloGraph (from program_graph/kernel_graphs/batch_graphs), got "
                    f"{type(g).__name__}.")
  n = np.shape(g.opcode)
  if len(n) != 1 or np.shape(g.attrs) != (n[0], NUM_ATTRS) or np.shape(g.num_bytes) != n:
    raise ValueError(f"{name} is inconsistent: opcode {np.shape(g.opcode)}, attrs {np.shape(g.attrs)} "
                     f"(expected [N, {NUM_ATTRS}]), num_bytes {np.shape(g.num_bytes)} (expected [N]); build it "
                     "with program_graph/kernel_graphs and combine with batch_graphs/pad_graph.")


def kernel_nodes(g: HloGraph) -> np.ndarray:
  """Mask of the nodes that launch a kernel: entry-level instructions that are neither padding nor
  :data:`TRIVIAL` (parameters, constants, tuples, bitcasts... launch nothing).

  Kaufman et al. (MLSys 2021, Sec. 3.1) cost a program as the sum over its kernels; in a program graph
  these are the entry computation's instructions (``depth == 0``), while the inlined fused instructions
  (``depth >= 1``) only describe what a kernel computes.

  Args:
    g: an :class:`HloGraph` (one graph, a batch, or a padded batch).

  Returns:
    bool [N], one entry per node of ``g``.

  Example:
    >>> from mlsys_jax.cost.hlo import parse_hlo
    >>> g = program_graph(parse_hlo(jax.jit(lambda x: x @ x).lower(jnp.ones((4, 4))).compile().as_text()))
    >>> [OPCODES[o] for o in g.opcode[kernel_nodes(g)]]
    ['dot']
  """
  _check_graph("g", g)
  return (g.attrs[:, ATTR_ID["depth"]] == 0) & (g.opcode != 0) & ~np.isin(g.opcode, _TRIVIAL_IDS)


def kernel_io_bytes(g: HloGraph) -> np.ndarray:
  """Bytes each kernel must move at least: operand bytes plus output bytes of every kernel-launching
  node (:func:`kernel_nodes`), 0 for the other nodes.

  This is the memory term of a roofline (Williams et al., CACM 2009; the analytical baseline of Kaufman
  et al., MLSys 2021): a kernel reads each operand and writes its output at least once. Summed over a
  :func:`program_graph` it equals the ``bytes`` of :func:`kernel_costs` exactly: operand bytes are
  summed in float64 from the operand nodes' ``num_bytes`` over the operand edges. A node whose operands
  are not nodes of ``g`` (the single entry node of a :func:`kernel_graphs` graph) falls back to the
  float32 ``operand_bytes`` attribute, exact up to 2**24 bytes and rounded to float32 above.

  Args:
    g: an :class:`HloGraph`.

  Returns:
    float64 [N].

  Example:
    >>> from mlsys_jax.cost.hlo import parse_hlo
    >>> g = program_graph(parse_hlo(jax.jit(lambda x: x @ x).lower(jnp.ones((4, 4))).compile().as_text()))
    >>> float(kernel_io_bytes(g).sum())     # two f32[4,4] operands read, one written
    192.0
  """
  mask = kernel_nodes(g)
  depth0 = g.attrs[:, ATTR_ID["depth"]] == 0
  senders, receivers = np.asarray(g.senders, np.int64), np.asarray(g.receivers, np.int64)
  # Edges between two entry-level nodes are exactly the operand edges (one per operand, repeats
  # included); fused/called computations only connect to depth >= 1 nodes or back from their root.
  op_edge = depth0[senders] & depth0[receivers] & (g.opcode[senders] != 0)
  exact = np.zeros(len(mask), np.float64)
  count = np.zeros(len(mask), np.int64)
  np.add.at(exact, receivers[op_edge], np.asarray(g.num_bytes, np.float64)[senders[op_edge]])
  np.add.at(count, receivers[op_edge], 1)
  has_all = count == np.rint(g.attrs[:, ATTR_ID["num_operands"]]).astype(np.int64)
  operand = np.where(has_all, exact, g.attrs[:, ATTR_ID["operand_bytes"]].astype(np.float64))
  return np.where(mask, operand + g.num_bytes, 0.0)


def _dim_labels(value: str | None) -> tuple[str, str, str] | None:
  if not value or "->" not in value or "_" not in value:
    return None
  lhs_rhs, out = value.split("->")
  lhs, rhs = lhs_rhs.split("_")
  return lhs, rhs, out


def _custom_target(ins: Instruction) -> int:
  t = ins.attrs.get("custom_call_target", "").strip('"').lower()
  if not t:
    return 0
  if "gemm" in t or "matmul" in t or "cublas" in t:
    return 1
  if "conv" in t or "cudnn" in t:
    return 2
  if "triton" in t:
    return 3
  return 4


def _dims_product(shape: Shape, dims: Sequence[int]) -> int:
  """Product of ``shape.dims[d]`` over the listed dimensions (out-of-range ones skipped): a dot's K."""
  k = 1
  for d in dims:
    if 0 <= d < len(shape.dims):
      k *= shape.dims[d]
  return k


def _node_costs(ins: Instruction, operand_shapes) -> tuple[float, float]:
  """(flops, transcendentals) of one instruction from shapes alone."""
  out = ins.shape.num_elements if not ins.shape.is_tuple else 0
  op = ins.opcode
  if op == "custom-call" and len(operand_shapes) >= 2:
    # cuBLAS / cuDNN calls return (result, workspace): cost them as the dot / convolution they are.
    res = ins.shape.elements[0] if ins.shape.is_tuple and ins.shape.elements else ins.shape
    target = _custom_target(ins)
    if target == 1:
      m = re.search(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]', ins.attrs.get("backend_config", ""))
      k = _dims_product(operand_shapes[0], int_list(m.group(1)) if m else [])
      return 2.0 * res.num_elements * k, 0.0
    if target == 2 and "dim_labels" in ins.attrs:
      ins = Instruction(ins.name, "convolution", res, ins.operands, ins.attrs)
      out, op = res.num_elements, "convolution"
  if op == "dot" and len(operand_shapes) >= 2:
    return 2.0 * out * _dims_product(operand_shapes[0], int_list(ins.attrs.get("lhs_contracting_dims"))), 0.0
  if op == "convolution" and len(operand_shapes) >= 2:
    labels = _dim_labels(ins.attrs.get("dim_labels"))
    rhs = operand_shapes[1]
    per_out = 1
    if labels and len(labels[1]) == len(rhs.dims):
      for ch, d in zip(labels[1], rhs.dims):
        if ch != "o":
          per_out *= d
    else:
      per_out = max(rhs.num_elements, 1)
    return 2.0 * out * per_out, 0.0
  if op in _ELEMENTWISE:
    return float(out) if op not in ("convert", "compare", "select") else 0.0, float(
        out if op in _TRANSCENDENTAL else 0)
  if op == "reduce" and operand_shapes:
    n_in = sum(s.num_elements for s in operand_shapes[: max(1, len(operand_shapes) // 2)])
    return float(n_in), 0.0
  if op == "reduce-window":
    w = parse_window(ins.attrs.get("window")).get("size", [1])
    return float(out * int(np.prod(w))), 0.0
  return 0.0, 0.0


def _node_row(module: HloModule, ins: Instruction, names: dict[str, Instruction], depth: int,
              fusion_kind: int) -> tuple:
  shape = ins.shape
  rank = 0 if shape.is_tuple else min(len(shape.dims), MAX_RANK)
  dims = np.zeros(MAX_RANK, np.int64)
  layout = -np.ones(MAX_RANK, np.int32)
  if not shape.is_tuple:
    dims[:rank] = [max(d, 0) for d in shape.dims[:rank]]
    if shape.layout is not None:
      lay = [d for d in shape.layout if d < MAX_RANK][:MAX_RANK]
      layout[:len(lay)] = lay
  attrs = np.zeros(NUM_ATTRS, np.float32)
  a = attrs
  win = parse_window(ins.attrs.get("window"))
  if win:
    a[ATTR_ID["window_size"]] = float(np.prod(win.get("size", [1])))
    a[ATTR_ID["window_stride"]] = float(np.prod(win.get("stride", [1])))
    a[ATTR_ID["window_pad"]] = float(sum(win.get("pad", [0])))
    a[ATTR_ID["window_dilation"]] = float(np.prod(win.get("lhs_dilate", [1])) * np.prod(
        win.get("rhs_dilate", [1])))
    a[ATTR_ID["window_rank"]] = float(len(win.get("size", [])))
  a[ATTR_ID["feature_group_count"]] = float(ins.attrs.get("feature_group_count", "1").strip() or 1)
  a[ATTR_ID["batch_group_count"]] = float(ins.attrs.get("batch_group_count", "1").strip() or 1)
  operand_shapes = [names[o].shape for o in ins.operands if o in names]
  if ins.opcode == "dot" and operand_shapes:
    k = _dims_product(operand_shapes[0], int_list(ins.attrs.get("lhs_contracting_dims")))
    a[ATTR_ID["dot_contract_size"]] = float(k)
    a[ATTR_ID["dot_batch_dims"]] = float(len(int_list(ins.attrs.get("lhs_batch_dims"))))
  a[ATTR_ID["dimensions_attr"]] = float(len(int_list(ins.attrs.get("dimensions"))))
  red = reducer_opcode(module, ins)
  if red is not None:
    a[ATTR_ID["reducer"]] = float(REDUCERS.index(red) if red in REDUCERS else len(REDUCERS) - 1)
  a[ATTR_ID["num_operands"]] = float(len(ins.operands))
  a[ATTR_ID["is_root"]] = float(ins.is_root)
  a[ATTR_ID["depth"]] = float(depth)
  a[ATTR_ID["operand_bytes"]] = float(sum(s.num_bytes for s in operand_shapes))
  tiles = backend_tiles(ins.attrs.get("backend_config"))
  for k in ("block_m", "block_n", "block_k", "split_k", "num_stages", "num_warps"):
    a[ATTR_ID[k]] = tiles.get(k, 0.0)
  a[ATTR_ID["custom_target"]] = float(_custom_target(ins))
  a[ATTR_ID["fusion_kind"]] = float(fusion_kind)
  if ins.opcode == "constant" and rank == 0 and ins.literal:
    try:
      v = float(ins.literal)
      a[ATTR_ID["scalar_constant"]] = float(np.clip(v, -1e6, 1e6)) if not np.isnan(v) else 0.0
    except ValueError:
      pass
  if shape.tiles:
    t = shape.tiles[0]
    a[ATTR_ID["tile_minor"]] = float(max(t[-1], 0))
    a[ATTR_ID["tile_second_minor"]] = float(max(t[-2], 0)) if len(t) > 1 else 1.0
  a[ATTR_ID["memory_space"]] = float(shape.memory_space)
  flops, trans = _node_costs(ins, operand_shapes)
  a[ATTR_ID["flops"]] = flops
  a[ATTR_ID["transcendentals"]] = trans
  dt = shape.dtype if shape.dtype in DTYPE_ID else "<other>"
  return (OPCODE_ID.get(ins.opcode, 1), DTYPE_ID[dt], dims, rank, layout, float(shape.num_bytes), attrs)


def _fusion_kind(ins: Instruction) -> int:
  if ins.opcode not in ("fusion", "fusion-start"):
    return 0
  k = ins.attrs.get("kind", "").strip()
  return FUSION_KINDS.index(k) if k in FUSION_KINDS else 4


class _Builder:
  def __init__(self, module: HloModule):
    self.module = module
    self.rows: list[tuple] = []
    self.kernel: list[int] = []
    self.senders: list[int] = []
    self.receivers: list[int] = []

  def add_computation(self, comp: Computation, kernels: Sequence[int] | int, depth: int,
                      fusion_kind: int | None = None, max_depth: int = 8) -> dict[str, int]:
    names = comp.by_name()
    index: dict[str, int] = {}
    for j, ins in enumerate(comp.instructions):
      kern = kernels[j] if isinstance(kernels, (list, tuple)) else kernels
      fk = _fusion_kind(ins) if fusion_kind is None else fusion_kind
      index[ins.name] = len(self.rows)
      self.rows.append(_node_row(self.module, ins, names, depth, fk))
      self.kernel.append(kern)
    for ins in comp.instructions:
      for op in ins.operands:
        self.senders.append(index[op])
        self.receivers.append(index[ins.name])
    if depth >= max_depth:
      return index
    for j, ins in enumerate(comp.instructions):
      kern = kernels[j] if isinstance(kernels, (list, tuple)) else kernels
      fk = _fusion_kind(ins) if fusion_kind is None else fusion_kind
      for cname in ins.called():
        sub = self.module.computations[cname]
        sub_index = self.add_computation(sub, kern, depth + 1, fk, max_depth)
        offset = 0
        if ins.opcode == "conditional":
          offset = 1 + ins.called().index(cname)
        for p in sub.instructions:
          if p.opcode == "parameter":
            try:
              num = int(p.literal or 0)
            except ValueError:
              num = 0
            src = num + offset if ins.opcode != "conditional" else offset
            if src < len(ins.operands):
              self.senders.append(index[ins.operands[src]])
              self.receivers.append(sub_index[p.name])
        if cname != ins.attrs.get("condition", "").lstrip("%"):
          self.senders.append(sub_index[sub.root.name])
          self.receivers.append(index[ins.name])
    return index

  def finish(self, n_kernel: int) -> HloGraph:
    n = len(self.rows)
    if n == 0:
      raise ValueError("empty graph: the computation has no instructions.")
    op, dt, dims, rank, lay, nb, attrs = zip(*self.rows)
    return HloGraph(
        opcode=np.asarray(op, np.int32), dtype=np.asarray(dt, np.int32),
        dims=np.stack(dims).astype(np.int64), rank=np.asarray(rank, np.int32),
        layout=np.stack(lay).astype(np.int32), num_bytes=np.asarray(nb, np.float64),
        attrs=np.stack(attrs).astype(np.float32), kernel=np.asarray(self.kernel, np.int32),
        senders=np.asarray(self.senders, np.int32), receivers=np.asarray(self.receivers, np.int32),
        n_node=np.asarray([n], np.int32), n_edge=np.asarray([len(self.senders)], np.int32),
        n_kernel=np.asarray([n_kernel], np.int32))


def program_graph(module: HloModule, max_depth: int = 8) -> HloGraph:
  """One graph for the whole program: entry instructions plus inlined fused/called computations.

  Node ``i`` belongs to kernel ``kernel[i]`` = position of its entry instruction; edges also connect a
  fusion's operands to the fused parameters and the fused root back to the fusion node.
  """
  b = _Builder(module)
  entry = module.entry
  b.add_computation(entry, list(range(len(entry.instructions))), 0, None, max_depth)
  return b.finish(len(entry.instructions))


def kernel_graphs(module: HloModule, include_trivial: bool = False) -> list[tuple[str, HloGraph]]:
  """One graph per kernel (entry instruction) of the module: ``[(name, graph), ...]``.

  A fusion's graph holds the fusion node and its fused computation; other kernels (a custom-call, a
  lone convolution, a copy) hold one node. ``include_trivial`` keeps parameters, tuples, bitcasts...
  """
  out = []
  entry = module.entry
  names = entry.by_name()
  for ins in entry.instructions:
    if not include_trivial and ins.opcode in TRIVIAL:
      continue
    b = _Builder(module)
    # Operands outside the kernel are not nodes: rebuild the row with the entry's name table.
    b.rows.append(_node_row(module, ins, names, 0, _fusion_kind(ins)))
    b.kernel.append(0)
    for cname in ins.called():
      c = module.computations[cname]
      idx = b.add_computation(c, 0, 1, _fusion_kind(ins))
      if cname != ins.attrs.get("condition", "").lstrip("%"):
        b.senders.append(idx[c.root.name])
        b.receivers.append(0)
    out.append((ins.name, b.finish(1)))
  return out


def kernel_costs(module: HloModule) -> list[dict]:
  """Analytical cost of each kernel of the entry computation, from shapes alone.

  ``flops`` sums the fused instructions' flops (2·out·K for dots, 2·out·window·Cin/groups for
  convolutions, one per output element for elementwise ops, one per input element for reductions);
  ``bytes`` is what the kernel must read and write at least: its operands plus its output.
  """
  rows = []
  entry = module.entry
  names = entry.by_name()
  g = program_graph(module)
  flops = np.zeros(len(entry.instructions))
  trans = np.zeros(len(entry.instructions))
  np.add.at(flops, g.kernel, g.attrs[:, ATTR_ID["flops"]].astype(np.float64))
  np.add.at(trans, g.kernel, g.attrs[:, ATTR_ID["transcendentals"]].astype(np.float64))
  for j, ins in enumerate(entry.instructions):
    trivial = ins.opcode in TRIVIAL
    nbytes = 0.0 if trivial else ins.shape.num_bytes + sum(names[o].shape.num_bytes for o in ins.operands)
    rows.append({"name": ins.name, "opcode": ins.opcode, "fusion_kind": FUSION_KINDS[_fusion_kind(ins)],
                 "trivial": trivial, "flops": float(flops[j]), "transcendentals": float(trans[j]),
                 "bytes": float(nbytes)})
  return rows


def batch_graphs(graphs: Sequence[HloGraph]) -> HloGraph:
  """Concatenate graphs into one batch, offsetting node and kernel indices (jraph ``batch``)."""
  if not graphs:
    raise ValueError("batch_graphs needs at least one graph.")
  node_off = np.cumsum([0] + [int(g.n_node.sum()) for g in graphs])[:-1]
  kern_off = np.cumsum([0] + [int(g.n_kernel.sum()) for g in graphs])[:-1]
  cat = lambda f: np.concatenate([getattr(g, f) for g in graphs])
  return HloGraph(
      opcode=cat("opcode"), dtype=cat("dtype"), dims=cat("dims"), rank=cat("rank"), layout=cat("layout"),
      num_bytes=cat("num_bytes"), attrs=cat("attrs"),
      kernel=np.concatenate([g.kernel + o for g, o in zip(graphs, kern_off)]).astype(np.int32),
      senders=np.concatenate([g.senders + o for g, o in zip(graphs, node_off)]).astype(np.int32),
      receivers=np.concatenate([g.receivers + o for g, o in zip(graphs, node_off)]).astype(np.int32),
      n_node=cat("n_node"), n_edge=cat("n_edge"), n_kernel=cat("n_kernel"))


def unbatch_graph(g: HloGraph, i: int) -> HloGraph:
  """Graph ``i`` of a batch, with indices relative to it again; a negative ``i`` counts from the end
  like Python indexing (``-1`` is the last graph, the padding graph of a padded batch).

  Raises:
    IndexError: ``i`` is outside ``[-num_graphs, num_graphs)``.
  """
  _check_graph("g", g)
  if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
    raise TypeError(f"i must be an integer graph index, got {type(i).__name__} ({i!r}).")
  G = g.num_graphs
  if not -G <= i < G:
    raise IndexError(f"graph index {i} is out of range for a batch of {G} graph(s); use an index in "
                     f"[{-G}, {G}).")
  i = int(i) % G
  n0, n1 = int(g.n_node[:i].sum()), int(g.n_node[:i + 1].sum())
  e0, e1 = int(g.n_edge[:i].sum()), int(g.n_edge[:i + 1].sum())
  k0 = int(g.n_kernel[:i].sum())
  sl = slice(n0, n1)
  return HloGraph(g.opcode[sl], g.dtype[sl], g.dims[sl], g.rank[sl], g.layout[sl], g.num_bytes[sl],
                  g.attrs[sl], g.kernel[sl] - k0, g.senders[e0:e1] - n0, g.receivers[e0:e1] - n0,
                  g.n_node[i:i + 1], g.n_edge[i:i + 1], g.n_kernel[i:i + 1])


def pad_graph(g: HloGraph, n_node: int, n_edge: int, n_kernel: int, n_graph: int) -> HloGraph:
  """Pad a batch to fixed sizes with one extra padding graph (jraph ``pad_with_graphs``).

  Padding nodes have opcode 0 and belong to the last (padding) kernel; padding edges join the last
  padding node to itself. Requires ``n_node > N``, ``n_kernel > K``, ``n_graph > G``, ``n_edge >= E``.
  """
  N, E, K, G = int(g.n_node.sum()), int(g.n_edge.sum()), int(g.n_kernel.sum()), g.num_graphs
  if n_node <= N or n_edge < E or n_kernel <= K or n_graph <= G:
    raise ValueError(f"pad sizes (nodes {n_node}, edges {n_edge}, kernels {n_kernel}, graphs {n_graph}) "
                     f"must exceed the batch's ({N}, {E}, {K}, {G}); nodes/kernels/graphs need one "
                     "more for the padding graph.")
  pn, pe, pk, pg = n_node - N, n_edge - E, n_kernel - K, n_graph - G
  padn = lambda a, v: np.concatenate([a, np.full((pn,) + a.shape[1:], v, a.dtype)])
  pad_counts = lambda a, v, p: np.concatenate([a, np.asarray([v] + [0] * (p - 1), a.dtype)])
  return HloGraph(
      opcode=padn(g.opcode, 0), dtype=padn(g.dtype, 0), dims=padn(g.dims, 0), rank=padn(g.rank, 0),
      layout=padn(g.layout, -1), num_bytes=padn(g.num_bytes, 0), attrs=padn(g.attrs, 0),
      kernel=padn(g.kernel, n_kernel - 1),
      senders=np.concatenate([g.senders, np.full(pe, n_node - 1, np.int32)]),
      receivers=np.concatenate([g.receivers, np.full(pe, n_node - 1, np.int32)]),
      n_node=pad_counts(g.n_node, pn, pg), n_edge=pad_counts(g.n_edge, pe, pg),
      n_kernel=pad_counts(g.n_kernel, pk, pg))


def capture_kernels(fn: Callable, *args, **kwargs) -> list[dict]:
  """Per-kernel view of :func:`capture`: one dict per kernel of the entry computation with its name,
  opcode, fusion kind and the analytical flops/bytes of :func:`kernel_costs`."""
  cap = capture(fn, *args, **kwargs)
  return kernel_costs(parse_hlo(cap.hlo_text))


__all__ = ["ATTR_ID", "ATTR_NAMES", "CUSTOM_TARGETS", "DTYPES", "DTYPE_ID", "FUSION_KINDS", "HloGraph", "MAX_RANK",
           "NUM_ATTRS", "OPCODES", "OPCODE_ID", "REDUCERS", "TRIVIAL", "batch_graphs", "capture_kernels",
           "kernel_costs", "kernel_graphs", "kernel_io_bytes", "kernel_nodes", "pad_graph", "program_graph",
           "unbatch_graph"]
