"""Training and prediction loops for the cost models (CPU-friendly, static padded shapes).

Batches keep all variants of a program together so the pairwise ranking loss of Kaufman et al. (MLSys
2021, Sec. 4) sees every pair; batches are padded to power-of-two node/edge/kernel counts so ``jit``
compiles a handful of shapes only.

Example:
  >>> from mlsys_jax.cost import capture, parse_hlo, program_graph
  >>> fns = [lambda x: jnp.tanh(x @ x), lambda x: jnp.sin(x) @ x]
  >>> graphs = [program_graph(parse_hlo(capture(f, jnp.ones((8, 8))).hlo_text)) for f in fns]
  >>> cfg = GNNConfig(epochs=2)
  >>> params = fit_gnn(graphs, np.array([2e-6, 3e-6]), np.array([0, 0]), cfg)   # doctest: +ELLIPSIS
  ...
  >>> predict_gnn(params, graphs, cfg).shape                # seconds, one per graph
  (2,)
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple, Sequence

import jax
import numpy as np
import optax

from mlsys_jax._checks import check_int
from mlsys_jax.cost.features import node_features
from mlsys_jax.cost.graph import HloGraph, batch_graphs, pad_graph
from mlsys_jax.cost.models import (GraphSAGECostModel, MLPCostModel, log_mse_loss, make_batch,
                                   pairwise_rank_loss)


class GNNConfig(NamedTuple):
  """Hyperparameters of :func:`fit_gnn`. ``rank_weight`` scales the pairwise loss against the MSE;
  pairs whose runtimes differ by less than ``rank_min_gap`` (relative) are left out of it."""
  hidden: int = 64
  embed_dim: int = 32
  num_layers: int = 3
  reduction: str = "sum_max"
  lr: float = 2e-3
  epochs: int = 60
  graphs_per_batch: int = 48
  rank_weight: float = 2.0
  rank_min_gap: float = 0.05
  weight_decay: float = 1e-5
  seed: int = 0
  verbose: bool = False


def _bucket(n: int, lo: int = 64) -> int:
  return max(lo, 1 << int(np.ceil(np.log2(n + 1))))


def _chunks(idx: np.ndarray, per_batch: int, group: np.ndarray | None,
            rng: np.random.Generator | None) -> list[np.ndarray]:
  """Split ``idx`` into batches of at most ``per_batch`` graphs (more only for a group that is larger);
  with ``group``, all variants of one program stay in one batch, group order shuffled if ``rng``."""
  if group is None:
    return [idx[i:i + per_batch] for i in range(0, len(idx), per_batch)]
  gids = np.unique(group[idx])
  if rng is not None:
    gids = rng.permutation(gids)
  chunks, cur = [], []
  for g in gids:
    members = idx[group[idx] == g]
    if cur and len(cur) + len(members) > per_batch:
      chunks.append(np.asarray(cur))
      cur = []
    cur.extend(members.tolist())
  if cur:
    chunks.append(np.asarray(cur))
  return chunks


def _batches(graphs: Sequence[HloGraph], feats: Sequence[np.ndarray], chunks: Sequence[np.ndarray],
             per_batch: int):
  """Yield (index array, padded GraphBatch, padded graph count) for each chunk of graph indices."""
  cap = max(per_batch, max(len(c) for c in chunks))
  for c in chunks:
    gb = batch_graphs([graphs[i] for i in c])
    x = np.concatenate([feats[i] for i in c])
    n, e, k = int(gb.n_node.sum()), int(gb.n_edge.sum()), int(gb.n_kernel.sum())
    padded = pad_graph(gb, _bucket(n + 1), _bucket(e), _bucket(k + 1), cap + 1)
    xp = np.zeros((padded.opcode.shape[0], x.shape[1]), np.float32)
    xp[:n] = x
    yield c, make_batch(padded, xp), cap + 1


def _log_us(runtime_s) -> np.ndarray:
  r = np.asarray(runtime_s, np.float64)
  if not np.all(np.isfinite(r) & (r > 0)):
    raise ValueError("runtime_s must be positive and finite seconds (drop failed or unmeasured rows).")
  return np.log(r * 1e6).astype(np.float32)


def _model(cfg: GNNConfig) -> GraphSAGECostModel:
  return GraphSAGECostModel(embed_dim=cfg.embed_dim, hidden=cfg.hidden, num_layers=cfg.num_layers,
                            reduction=cfg.reduction)


@functools.lru_cache(maxsize=16)
def _jitted_apply(embed_dim: int, hidden: int, num_layers: int, reduction: str):
  """One jitted ``apply`` per architecture, so repeated :func:`predict_gnn` calls reuse compilations."""
  return jax.jit(GraphSAGECostModel(embed_dim=embed_dim, hidden=hidden, num_layers=num_layers,
                                    reduction=reduction).apply)


def fit_gnn(graphs: Sequence[HloGraph], runtime_s: np.ndarray, group: np.ndarray,
            cfg: GNNConfig = GNNConfig(), feats: Sequence[np.ndarray] | None = None) -> dict:
  """Train :class:`GraphSAGECostModel` on log-microsecond runtimes with MSE + pairwise ranking loss.

  Returns the flax parameters. ``feats`` (node features per graph) default to :func:`node_features`.
  """
  if not graphs or len(graphs) != len(runtime_s) or len(graphs) != len(group):
    raise ValueError("graphs, runtime_s and group must have one entry per program variant (at least one).")
  feats = list(feats) if feats is not None else [node_features(g) for g in graphs]
  if len(feats) != len(graphs):
    raise ValueError(f"feats has {len(feats)} entries for {len(graphs)} graphs.")
  y = _log_us(runtime_s)
  group = np.asarray(group)
  model = _model(cfg)
  rng = np.random.default_rng(cfg.seed)
  idx = np.arange(len(graphs))
  _, b0, _ = next(_batches(graphs, feats, [idx[:2]], cfg.graphs_per_batch))
  params = jax.jit(model.init)(jax.random.PRNGKey(cfg.seed), b0)
  # Keeping groups together leaves batches part-full, so count the real steps for the cosine schedule.
  epoch_chunks = [_chunks(idx, cfg.graphs_per_batch, group, rng) for _ in range(cfg.epochs)]
  tx = optax.adamw(optax.cosine_decay_schedule(cfg.lr, max(1, sum(len(c) for c in epoch_chunks))),
                   weight_decay=cfg.weight_decay)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, b, yt, gt, mask):
    def loss_fn(p):
      pred = model.apply(p, b)
      rank = pairwise_rank_loss(pred, yt, gt, mask, min_gap=float(np.log1p(cfg.rank_min_gap)))
      return log_mse_loss(pred, yt, mask) + cfg.rank_weight * rank
    loss, grads = jax.value_and_grad(loss_fn)(params)
    upd, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, loss

  t0 = time.time()
  for ep, chunks in enumerate(epoch_chunks):
    losses = []
    for c, b, gcap in _batches(graphs, feats, chunks, cfg.graphs_per_batch):
      yt = np.zeros(gcap, np.float32)
      yt[:len(c)] = y[c]
      gt = -np.ones(gcap, np.int32)
      gt[:len(c)] = group[c]
      mask = np.zeros(gcap, bool)
      mask[:len(c)] = True
      params, opt_state, loss = step(params, opt_state, b, yt, gt, mask)
      losses.append(loss)  # device scalars: read back only when printed, not once per step
    if cfg.verbose and (ep % 10 == 0 or ep == cfg.epochs - 1):
      print(f"  gnn epoch {ep:3d} loss {np.mean([float(l) for l in losses]):.4f} ({time.time() - t0:.0f}s)",
            flush=True)
  return params


def predict_gnn(params: dict, graphs: Sequence[HloGraph], cfg: GNNConfig = GNNConfig(),
                feats: Sequence[np.ndarray] | None = None) -> np.ndarray:
  """Predicted runtimes in seconds, one per graph (an empty array for no graphs)."""
  if len(graphs) == 0:
    return np.zeros(0)
  feats = list(feats) if feats is not None else [node_features(g) for g in graphs]
  apply = _jitted_apply(cfg.embed_dim, cfg.hidden, cfg.num_layers, cfg.reduction)
  out = np.zeros(len(graphs))
  chunks = _chunks(np.arange(len(graphs)), cfg.graphs_per_batch, None, None)
  for c, b, _ in _batches(graphs, feats, chunks, cfg.graphs_per_batch):
    out[c] = np.asarray(apply(params, b))[:len(c)]
  return np.exp(np.clip(out, -20.0, 25.0)) / 1e6  # log-microseconds, clipped against overflow


class MLPConfig(NamedTuple):
  """Hyper-parameters of :func:`fit_mlp` (the aggregate-feature MLP baseline of the cost model): width and
  depth, Adam learning rate, full-batch epochs, the weight of the pairwise ranking loss against the log-MSE
  loss, and the seed."""
  hidden: int = 128
  num_layers: int = 2
  lr: float = 2e-3
  epochs: int = 300
  rank_weight: float = 1.0
  seed: int = 0


def fit_mlp(x: np.ndarray, runtime_s: np.ndarray, group: np.ndarray, cfg: MLPConfig = MLPConfig()):
  """Train :class:`MLPCostModel` full-batch (inputs standardised).

  Returns ``(params, mean, std, log_lo, log_hi)``; predictions are clipped to the training range of
  log runtime widened by log(10) on each side (an MLP on aggregate features extrapolates wildly on
  program families it has not seen).
  """
  for name, low in (("hidden", 1), ("num_layers", 1), ("epochs", 1)):
    check_int(f"cfg.{name}", getattr(cfg, name), low)
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or not x.shape[0] == len(runtime_s) == len(group) or x.shape[0] == 0:
    raise ValueError(f"x must be [P, F] with one row per entry of runtime_s ({len(runtime_s)}) and "
                     f"group ({len(group)}), got {x.shape}.")
  mu, sd = x.mean(0), x.std(0)
  # A feature constant on the training rows (say the count of 'while' when every loop family is held
  # out) carries nothing learnable; dividing by a tiny std would blow its held-out values up to ~1e6
  # and drive the MLP to its clip. An infinite std maps it to 0 at training and at prediction time.
  sd = np.where(sd > 1e-6, sd, np.inf).astype(np.float32)
  xs = (x - mu) / sd
  y = _log_us(runtime_s)
  g = np.asarray(group)
  model = MLPCostModel(cfg.hidden, cfg.num_layers)
  params = model.init(jax.random.PRNGKey(cfg.seed), xs[:1])
  tx = optax.adam(cfg.lr)
  st = tx.init(params)
  mask = np.ones(len(y), bool)

  @jax.jit  # full batch, closed over as constants: one compile; the pair matrix is [P, P]
  def step(params, st):
    def loss_fn(p):
      pred = model.apply(p, xs)
      return log_mse_loss(pred, y, mask) + cfg.rank_weight * pairwise_rank_loss(pred, y, g, mask)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    upd, st = tx.update(grads, st, params)
    return optax.apply_updates(params, upd), st, loss
  for _ in range(cfg.epochs):
    params, st, _ = step(params, st)
  return params, mu, sd, float(y.min() - np.log(10.0)), float(y.max() + np.log(10.0))


def predict_mlp(state, x: np.ndarray, cfg: MLPConfig = MLPConfig()) -> np.ndarray:
  """Runtimes in seconds predicted by a model from :func:`fit_mlp` for feature rows ``x``
  (``cfg`` must be the one it was trained with)."""
  params, mu, sd, lo, hi = state
  model = MLPCostModel(cfg.hidden, cfg.num_layers)
  out = np.asarray(model.apply(params, (np.asarray(x, np.float32) - mu) / sd), np.float64)
  return np.exp(np.clip(out, lo, hi)) / 1e6
