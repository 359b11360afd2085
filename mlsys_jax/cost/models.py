"""Learned cost models (flax): GraphSAGE over HLO graphs, an MLP on aggregate features, and losses.

Kaufman et al. (MLSys 2021, Sec. 3.2-3.3): opcode embeddings and node features go through GraphSAGE
layers (each node combines its own state with the mean of its neighbours' states), node embeddings are
reduced to one embedding per kernel, and a feed-forward head predicts the kernel's runtime. Here a
program's runtime is the sum of its kernels' predicted runtimes (each kernel a non-negative number via
exp of a predicted log), and the model outputs the log of that sum. Losses: squared error on log runtime (the fusion
task) and a pairwise logistic ranking loss among variants of the same program (the tile-size task,
Sec. 4).

Example:
  >>> from mlsys_jax.cost import capture, make_batch, parse_hlo, program_graph
  >>> g = program_graph(parse_hlo(capture(lambda x: jnp.tanh(x @ x), jnp.ones((8, 8))).hlo_text))
  >>> from mlsys_jax.cost import node_features, pad_graph
  >>> g = pad_graph(g, 64, 128, 8, 2)                    # static sizes: nodes, edges, kernels, graphs
  >>> batch = make_batch(g, node_features(g))            # a GraphBatch of one program
  >>> model = GraphSAGECostModel(num_opcodes=len(OPCODES))
  >>> params = model.init(jax.random.PRNGKey(0), batch)
  >>> model.apply(params, batch).shape                   # log runtime (us) per graph (+ padding graph)
  (2,)
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax._checks import check_choice
from mlsys_jax.cost.graph import ATTR_ID, OPCODES, HloGraph, kernel_io_bytes


class GraphBatch(NamedTuple):
  """Device-ready padded batch: an :class:`HloGraph`'s index arrays plus node features.

  ``kernel_graph`` maps each kernel to its graph; ``graph_mask`` is True for real graphs and False for
  the padding graphs :func:`~mlsys_jax.cost.graph.pad_graph` appends (every graph without a node of
  non-padding opcode).
  """
  opcode: jnp.ndarray        # int32 [N]
  x: jnp.ndarray             # float32 [N, F]
  senders: jnp.ndarray       # int32 [E]
  receivers: jnp.ndarray     # int32 [E]
  kernel: jnp.ndarray        # int32 [N]
  kernel_graph: jnp.ndarray  # int32 [K]
  graph_mask: jnp.ndarray    # bool [G]
  top: jnp.ndarray           # float32 [N]: 1 for entry-level (kernel) nodes, 0 inside fused bodies
  flops: jnp.ndarray         # float32 [N]: shape-based flops of each node
  io_bytes: jnp.ndarray      # float32 [N]: operand + output bytes of kernel (top-level) nodes, else 0


def make_batch(g: HloGraph, x: np.ndarray) -> GraphBatch:
  """Build a :class:`GraphBatch` from a padded :class:`HloGraph` and its node features."""
  n_graph = g.num_graphs
  k = int(g.n_kernel.sum())
  kernel_graph = np.repeat(np.arange(n_graph, dtype=np.int32), g.n_kernel)
  if kernel_graph.shape[0] != k:
    raise ValueError("n_kernel does not add up to the kernel count.")
  if x.ndim != 2 or x.shape[0] != g.opcode.shape[0]:
    raise ValueError(f"x must be [N, F] with N = {g.opcode.shape[0]} nodes (pad it with the graph), "
                     f"got {x.shape}.")
  node_graph = np.repeat(np.arange(n_graph), g.n_node)
  if node_graph.shape[0] != g.opcode.shape[0]:
    raise ValueError("n_node does not add up to the node count.")
  real = np.bincount(node_graph, weights=(g.opcode != 0), minlength=n_graph) > 0
  top = ((g.attrs[:, ATTR_ID["depth"]] == 0) & (g.opcode != 0)).astype(np.float32)
  io = kernel_io_bytes(g)
  return GraphBatch(g.opcode.astype(np.int32), x.astype(np.float32), g.senders.astype(np.int32),
                    g.receivers.astype(np.int32), g.kernel.astype(np.int32), kernel_graph, real, top,
                    g.attrs[:, ATTR_ID["flops"]].astype(np.float32), io.astype(np.float32))


def _check_width(owner: str, name: str, value, low: int, what: str = "") -> None:
  """Raise ``ValueError`` unless a module attribute ``value`` is a (non-bool) integer ``>= low``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{owner}.{name} must be an integer >= {low}{what}, got {value!r}.")


def _segment_mean(data, ids, n):
  s = jax.ops.segment_sum(data, ids, n)
  c = jax.ops.segment_sum(jnp.ones((data.shape[0], 1), data.dtype), ids, n)
  return s / jnp.maximum(c, 1.0)


class SAGELayer(nn.Module):
  """One GraphSAGE layer (Hamilton et al., NeurIPS 2017, Alg. 1 with the mean aggregator) over a directed
  graph, aggregating operands and users separately (Kaufman et al., MLSys 2021, Sec. 3.2).

  For node ``v`` with state ``h_v``, edges ``senders[e] -> receivers[e]`` (operand -> user)::

      m_in(v)  = mean of h_u over edges u -> v      (0 when v has no operand)
      m_out(v) = mean of h_w over edges v -> w      (0 when v has no user)
      h'_v     = LayerNorm(relu(W [h_v ; m_in(v) ; m_out(v)] + b))

  A node with several parallel edges to the same neighbour counts that neighbour once per edge.

  Attributes:
    features: output width (``>= 1``).

  Call args: ``h`` float [N, F] node states; ``senders``, ``receivers`` integer [E] node indices in
  [0, N). Returns float [N, features].
  """
  features: int

  @nn.compact
  def __call__(self, h, senders, receivers):
    _check_width("SAGELayer", "features", self.features, 1, " (the output width)")
    if np.ndim(h) != 2:
      raise ValueError(f"SAGELayer: h must be node states [N, F], got shape {np.shape(h)}; use jax.vmap for "
                       "a batch of graphs.")
    for name, e in (("senders", senders), ("receivers", receivers)):
      if np.ndim(e) != 1 or not jnp.issubdtype(jnp.result_type(e), jnp.integer):
        raise ValueError(f"SAGELayer: {name} must be an integer [E] array of node indices, got "
                         f"{jnp.result_type(e)}{list(np.shape(e))}.")
    if np.shape(senders) != np.shape(receivers):
      raise ValueError(f"SAGELayer: senders {np.shape(senders)} and receivers {np.shape(receivers)} must have "
                       "the same length (one entry per edge).")
    n = h.shape[0]
    from_operands = _segment_mean(h[senders], receivers, n)
    from_users = _segment_mean(h[receivers], senders, n)
    z = nn.Dense(self.features)(jnp.concatenate([h, from_operands, from_users], -1))
    return nn.LayerNorm()(nn.relu(z))


def segment_logsumexp(x: jnp.ndarray, ids: jnp.ndarray, n: int) -> jnp.ndarray:
  """``log(segment_sum(exp(x)))`` computed stably; empty segments give a large negative number."""
  m = jax.ops.segment_max(x, ids, n)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  s = jax.ops.segment_sum(jnp.exp(x - m[ids]), ids, n)
  return jnp.log(jnp.maximum(s, 1e-30)) + m


class GraphSAGECostModel(nn.Module):
  """Predicts log runtime (log microseconds) of each graph of a :class:`GraphBatch`.

  Node states: opcode embedding + node features, then ``num_layers`` residual GraphSAGE layers. Each
  kernel's embedding concatenates the segment sum (signed log1p) and max of its node states with the raw
  features of its top-level node (the fusion/custom-call itself: its bytes and shapes reach the head
  linearly), and the log of the kernel's flops and bytes. The head predicts a correction to a learned
  per-kernel roofline prior ``log(flops / R_f + bytes / R_b + overhead)`` (three learned scalars); the program's log runtime is the log-sum-exp
  over its kernels (runtime = sum of kernel runtimes).

  Attributes:
    num_opcodes: opcode vocabulary size (``len(OPCODES)``).
    embed_dim: opcode embedding width.
    hidden: node state width.
    num_layers: GraphSAGE layers.
    reduction: node-to-kernel reduction, 'sum_max' (segment sum and max) or 'mean'.
  """
  num_opcodes: int = len(OPCODES)
  embed_dim: int = 32
  hidden: int = 64
  num_layers: int = 3
  reduction: str = "sum_max"

  @nn.compact
  def kernel_log_runtimes(self, b: GraphBatch) -> jnp.ndarray:
    """Predicted log runtime (log microseconds) of every kernel in the batch, [K]."""
    check_choice("reduction", self.reduction, ("sum_max", "mean"))
    emb = nn.Embed(self.num_opcodes, self.embed_dim, name="opcode_embed")(b.opcode)
    h = nn.relu(nn.Dense(self.hidden, name="input")(jnp.concatenate([emb, b.x], -1)))
    for i in range(self.num_layers):
      h = h + SAGELayer(self.hidden, name=f"sage_{i}")(h, b.senders, b.receivers)
    k = b.kernel_graph.shape[0]
    if self.reduction == "mean":
      parts = [_segment_mean(h, b.kernel, k)]
    else:
      ks = jax.ops.segment_sum(h, b.kernel, k)
      km = jax.ops.segment_max(h, b.kernel, k)
      parts = [jnp.sign(ks) * jnp.log1p(jnp.abs(ks)), jnp.where(jnp.isfinite(km), km, 0.0)]
    top = jax.ops.segment_sum(b.x * b.top[:, None], b.kernel, k)
    top_op = jax.ops.segment_sum(emb * b.top[:, None], b.kernel, k)
    log_f = jnp.log1p(jax.ops.segment_sum(b.flops, b.kernel, k))
    log_b = jnp.log1p(jax.ops.segment_sum(b.io_bytes, b.kernel, k))
    ke = jnp.concatenate(parts + [top, top_op, jnp.stack([log_f, log_b], -1) / 20.0], -1)
    z = nn.relu(nn.Dense(2 * self.hidden, name="head_0")(ke))
    z = nn.relu(nn.Dense(self.hidden, name="head_1")(z))
    correction = nn.Dense(1, name="head_out")(z)[:, 0]
    # Learned per-kernel roofline prior in microseconds: flops/R_f + bytes/R_b + overhead, in log space.
    lf = self.param("log_flops_per_us", lambda _: jnp.asarray(np.log(4e8), jnp.float32))
    lb = self.param("log_bytes_per_us", lambda _: jnp.asarray(np.log(3e6), jnp.float32))
    lo = self.param("log_overhead_us", lambda _: jnp.asarray(np.log(2.0), jnp.float32))
    prior = jnp.logaddexp(jnp.logaddexp(log_f - lf, log_b - lb), lo)
    return prior + correction

  def __call__(self, b: GraphBatch) -> jnp.ndarray:
    kt = self.kernel_log_runtimes(b)
    return segment_logsumexp(kt, b.kernel_graph, b.graph_mask.shape[0])


class MLPCostModel(nn.Module):
  """MLP on aggregate program features (:func:`~mlsys_jax.cost.features.program_features`): the
  feature-vector baseline that Kaufman et al. (MLSys 2021, Sec. 5) compare the GNN against.

  ``num_layers`` hidden layers ``x <- relu(W x + b)`` of width ``hidden``, then a linear output:
  ``x`` float [B, F] -> predicted log runtime [B] (one scalar per program).

  Attributes:
    hidden: hidden width (``>= 1``).
    num_layers: hidden layers (``>= 0``; 0 is a linear model).
  """
  hidden: int = 128
  num_layers: int = 2

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    _check_width("MLPCostModel", "hidden", self.hidden, 1)
    _check_width("MLPCostModel", "num_layers", self.num_layers, 0)
    if np.ndim(x) != 2:
      raise ValueError(f"MLPCostModel: x must be program features [B, F] (one row per program), got shape "
                       f"{np.shape(x)}; reshape a single program to [1, F].")
    for _ in range(self.num_layers):
      x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(1)(x)[:, 0]


def log_mse_loss(pred_log: jnp.ndarray, target_log: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Mean squared error on log runtime over ``mask``ed graphs (Kaufman et al., fusion task)."""
  m = mask.astype(pred_log.dtype)
  return jnp.sum(m * (pred_log - target_log) ** 2) / jnp.maximum(m.sum(), 1.0)


def pairwise_rank_loss(pred: jnp.ndarray, target: jnp.ndarray, group: jnp.ndarray,
                       mask: jnp.ndarray, margin_scale: float = 1.0, min_gap: float = 0.0) -> jnp.ndarray:
  """Pairwise logistic ranking loss among graphs of the same ``group`` (Kaufman et al., tile task).

  For every pair (i, j) of one group with ``target_i + min_gap < target_j`` the loss is
  ``log(1 + exp(-(pred_j - pred_i) * margin_scale))``, averaged over pairs; 0 if there are none.
  With log-runtime targets, ``min_gap = log(1.05)`` ignores pairs closer than 5% (timing noise).
  """
  same = (group[:, None] == group[None, :]) & mask[:, None] & mask[None, :]
  faster = target[:, None] + min_gap < target[None, :]
  pairs = (same & faster).astype(pred.dtype)
  diff = (pred[None, :] - pred[:, None]) * margin_scale
  return jnp.sum(pairs * jax.nn.softplus(-diff)) / jnp.maximum(pairs.sum(), 1.0)
