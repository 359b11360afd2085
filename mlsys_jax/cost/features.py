"""Node features of HLO graphs and aggregate program features.

Kaufman et al. (MLSys 2021, Sec. 3.1) embed each node's opcode and concatenate normalized numeric
features: output shape and layout, data type and instruction constants. :func:`node_features` gives
that numeric part (the opcode stays an integer for a learned embedding, ``HloGraph.opcode``); sizes
enter as ``log1p`` scaled to about [0, 1]. :func:`program_features` summarises a whole program (XLA cost
analysis, kernel counts, opcode histogram) for the MLP baseline.

Example:
  >>> from mlsys_jax.cost import capture, parse_hlo, program_graph
  >>> g = program_graph(parse_hlo(capture(lambda x: jnp.tanh(x @ x), jnp.ones((8, 8))).hlo_text))
  >>> x = node_features(g)                 # float32 [N, NUM_NODE_FEATURES]
  >>> x.shape == (g.opcode.shape[0], NUM_NODE_FEATURES)
  True
"""

from __future__ import annotations

import numpy as np

from mlsys_jax.cost.graph import (ATTR_ID, CUSTOM_TARGETS, DTYPES, FUSION_KINDS, MAX_RANK, OPCODES,
                                  REDUCERS, HloGraph, OPCODE_ID, kernel_nodes)

_CATEGORICAL = {"reducer": len(REDUCERS), "custom_target": len(CUSTOM_TARGETS),
                "fusion_kind": len(FUSION_KINDS)}
_LOG_ATTRS = [n for n in ATTR_ID if n not in _CATEGORICAL and n not in ("is_root", "depth", "scalar_constant")]

NUM_NODE_FEATURES = (MAX_RANK + 3 + len(DTYPES) + 2 + MAX_RANK + len(_LOG_ATTRS) + 3
                     + sum(_CATEGORICAL.values()))


def _slog(x):
  return np.sign(x) * np.log1p(np.abs(x))


def node_features(g: HloGraph) -> np.ndarray:
  """Numeric node features, float32 [N, NUM_NODE_FEATURES] (padding nodes give zeros in the size
  columns).

  Columns: log1p(dim)/10 per dimension; rank/6; log1p(elements)/20; log1p(bytes)/25; dtype one-hot;
  layout (is it the default descending order; minor-most dim/6) and the one-hot position of each dim in
  minor-to-major order scaled by 1/6; log1p of numeric attributes /20 (window, dot contraction size,
  operand bytes, tile sizes, flops...); is_root, depth/4, signed log of scalar constants /10; one-hots
  of reducer, custom-call target and fusion kind.
  """
  n = g.opcode.shape[0]
  cols = []
  cols.append(np.log1p(g.dims.astype(np.float64)) / 10.0)
  cols.append(g.rank[:, None] / 6.0)
  elems = np.prod(np.maximum(g.dims, 1), axis=1)  # dims beyond the rank are 0 in an HloGraph: factor 1
  cols.append(np.log1p(elems.astype(np.float64))[:, None] / 20.0)
  cols.append(np.log1p(g.num_bytes)[:, None] / 25.0)
  cols.append(np.eye(len(DTYPES))[np.clip(g.dtype, 0, len(DTYPES) - 1)])
  lay = g.layout
  default = np.ones(n, bool)
  for r in range(MAX_RANK):
    want = g.rank - 1 - r
    default &= np.where(r < g.rank, lay[:, r] == want, True)
  cols.append(np.stack([default.astype(np.float64), np.where(lay[:, 0] >= 0, lay[:, 0], 0) / 6.0], 1))
  cols.append(np.where(lay >= 0, lay, 0) / 6.0)
  a = g.attrs.astype(np.float64)
  cols.append(np.log1p(np.maximum(a[:, [ATTR_ID[k] for k in _LOG_ATTRS]], 0)) / 20.0)
  cols.append(np.stack([a[:, ATTR_ID["is_root"]], a[:, ATTR_ID["depth"]] / 4.0,
                        _slog(a[:, ATTR_ID["scalar_constant"]]) / 10.0], 1))
  for k, size in _CATEGORICAL.items():
    cols.append(np.eye(size)[np.clip(a[:, ATTR_ID[k]].astype(int), 0, size - 1)])
  x = np.nan_to_num(np.concatenate(cols, axis=1), nan=0.0, posinf=1.0, neginf=-1.0).astype(np.float32)
  x[g.opcode == 0] = 0.0
  assert x.shape[1] == NUM_NODE_FEATURES, (x.shape, NUM_NODE_FEATURES)
  return x


NUM_PROGRAM_FEATURES = 12 + (len(OPCODES) - 2) + len(FUSION_KINDS)  # base, opcode histogram, kinds


def program_features(g: HloGraph, xla_cost: dict | None = None) -> np.ndarray:
  """Aggregate features of one program graph for the MLP baseline, float32 [NUM_PROGRAM_FEATURES].

  log1p of: XLA flops, bytes accessed, transcendentals (from ``xla_cost``); our shape-based flops and
  transcendentals; nodes, edges, kernels, non-trivial kernels; entry-level output bytes, largest
  tensor, fusion count; plus log1p counts of each opcode over all nodes (fused bodies included) and of
  each fusion kind over the non-trivial entry kernels.
  """
  c = xla_cost or {}
  a = g.attrs.astype(np.float64)
  top = a[:, ATTR_ID["depth"]] == 0
  nontrivial = kernel_nodes(g)
  base = [c.get("flops", 0.0), c.get("bytes accessed", c.get("bytes_accessed", 0.0)),
          c.get("transcendentals", 0.0), a[:, ATTR_ID["flops"]].sum(), a[:, ATTR_ID["transcendentals"]].sum(),
          g.opcode.shape[0], g.senders.shape[0], int(g.n_kernel.sum()), nontrivial.sum(),
          g.num_bytes[nontrivial].sum(), g.num_bytes.max() if g.num_bytes.size else 0,
          (g.opcode[top] == OPCODE_ID["fusion"]).sum()]
  hist = np.bincount(g.opcode, minlength=len(OPCODES))[2:]
  fk = np.bincount(a[nontrivial, ATTR_ID["fusion_kind"]].astype(int), minlength=len(FUSION_KINDS))
  v = np.maximum(np.concatenate([np.asarray(base, np.float64), hist, fk[:len(FUSION_KINDS)]]), 0.0)
  return np.log1p(v).astype(np.float32)  # XLA reports -1 and similar for unknown costs: clamp at 0
