"""Child-sum Tree-LSTM over batches of trees of different shapes: padded level-by-level encoding.

Nimble (Shen et al., MLSys 2021, section 6) runs Tree-LSTM, whose control flow follows each input tree,
with a VM that interprets data-dependent control flow; TF Fold and DyNet batch such models dynamically.
In JAX, Python recursion over a tree under ``jit`` traces the tree's shape into the program, so every
new tree shape compiles again and each tree runs alone. Here a batch of trees becomes flat padded arrays
(nodes, parent pointers, and the nodes of each height level); one ``lax.while_loop`` over the true
number of levels updates all nodes of one level of all trees at once, and padding the array sizes to
powers of two leaves a handful of programs for any stream of trees. The cell is the child-sum Tree-LSTM of Tai, Socher and Manning
(ACL 2015, eq. 2-8):

    h~_j = sum_k h_k,            i, o, u = x_j W + h~_j U + b (split),
    f_jk = sigmoid(x_j W_f + h_k U_f + b_f),
    c_j = sigmoid(i) tanh(u) + sum_k f_jk c_k,     h_j = sigmoid(o) tanh(c_j).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["TreeBatch", "encode_trees", "tree_levels", "ChildSumTreeLSTM", "tree_lstm_levels",
           "tree_lstm_recursive", "tree_lstm_cell"]


class TreeBatch(NamedTuple):
  """Flat padded encoding of a batch of trees (numpy or jax arrays).

  Attributes:
    x: ``(N + 1, d)`` node features; the last row is a dummy node that absorbs padding.
    parent: ``(N + 1,)`` int32 parent index; roots and padding point at the dummy ``N``.
    level_nodes: ``(L, W)`` int32, row ``l`` lists the nodes of height ``l`` (leaves have height 0),
      padded with the dummy.
    roots: ``(T,)`` int32 root of each tree, padded with the dummy.
    num_levels: int32 scalar, the true number of levels (``<= L``): the loop over levels is a
      ``lax.while_loop`` with this trip count, so padded level rows cost nothing.
  """
  x: np.ndarray
  parent: np.ndarray
  level_nodes: np.ndarray
  roots: np.ndarray
  num_levels: np.ndarray


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _flat_parents(parents_list: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Concatenated local parent indices (int64) and the size of each tree, without a Python loop per
  node: numpy arrays are concatenated, lists go through one ``np.fromiter`` over the chained lists."""
  sizes = np.fromiter(map(len, parents_list), np.int64, count=len(parents_list))
  total = int(sizes.sum())
  if all(isinstance(p, np.ndarray) for p in parents_list):
    if any(p.ndim != 1 for p in parents_list):
      raise ValueError("each parent array must be 1-D (one parent index per node).")
    flat = np.concatenate(parents_list)
    if not np.issubdtype(flat.dtype, np.integer):
      raise TypeError(f"parent indices must be integers, got dtype {flat.dtype}.")
    return flat.astype(np.int64, copy=False), sizes
  try:  # via float64 (exact for any index below 2**53) so that a non-integer index is caught
    flat = np.fromiter(itertools.chain.from_iterable(parents_list), np.float64, count=total)
  except (TypeError, ValueError) as e:
    raise TypeError("each parent array must be a 1-D sequence of int node indices (-1 for the root); "
                    f"converting them failed: {e}") from e
  as_int = flat.astype(np.int64)
  if not np.array_equal(as_int, flat):
    raise TypeError("parent indices must be integers (node indices, -1 for the root); got "
                    f"{flat[as_int != flat][:5].tolist()}.")
  return as_int, sizes


def _heights(flat: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validate concatenated trees and compute node heights by a bottom-up level sweep over arrays.

  Returns ``(global_parent, height, roots)``: parent indices into the concatenation (``-1`` at roots),
  each node's height (leaves 0, a parent 1 + its highest child) and the root of each tree. A sweep
  (Kahn's topological order by rounds) starts from the leaves; a node enters round ``r`` when its last
  child left round ``r - 1``, so its round is exactly ``1 + max(child heights)``. One round costs a
  few numpy calls over the nodes of that height (or one flag sweep over all nodes when many finish),
  so a batch costs one short Python step per level, not per node.
  """
  t_count, total = sizes.size, flat.size
  if t_count == 0:
    raise ValueError("give at least one tree.")
  if np.any(sizes == 0):
    raise ValueError(f"trees {np.flatnonzero(sizes == 0).tolist()} are empty; every tree needs a root.")
  offsets = np.cumsum(sizes) - sizes
  tree_of = np.repeat(np.arange(t_count), sizes)
  is_root = flat == -1
  bad = (flat < -1) | (flat >= sizes[tree_of])
  root_count = np.bincount(tree_of[is_root], minlength=t_count)
  if np.any(bad) or np.any(root_count != 1):
    t = int(tree_of[np.flatnonzero(bad)[0]]) if np.any(bad) else int(np.flatnonzero(root_count != 1)[0])
    p = flat[offsets[t]:offsets[t] + sizes[t]]
    raise ValueError("parents must hold exactly one root (-1) and indices of nodes of the same tree; "
                     f"tree {t} has {p.tolist()}.")
  gparent = np.where(is_root, -1, flat + offsets[tree_of])
  children_left = np.bincount(gparent[~is_root], minlength=total)
  height = np.full(total, -1, np.int64)
  frontier = np.flatnonzero(children_left == 0)  # the leaves
  ready = np.zeros(total, bool)
  h = 0
  while frontier.size:
    height[frontier] = h
    par = gparent[frontier]
    par = par[par >= 0]
    np.subtract.at(children_left, par, 1)
    done = par[children_left[par] == 0]  # parents whose last child is in this level (repeated per child)
    if done.size * 32 < total:  # few: sort them; many: a flag sweep over all nodes
      frontier = np.unique(done)
    else:
      ready[done] = True
      frontier = np.flatnonzero(ready)
      ready[frontier] = False
    h += 1
  if np.any(height < 0):
    t = int(tree_of[np.flatnonzero(height < 0)[0]])
    raise ValueError(f"parents holds a cycle (some node never reaches the root) in tree {t}.")
  return gparent, height, np.flatnonzero(is_root)


def tree_levels(parents: Sequence[int]) -> np.ndarray:
  """Height of every node (leaves 0, a parent 1 + its highest child); checks the parent array.

  >>> tree_levels([-1, 0, 0, 1]).tolist()
  [2, 1, 0, 0]
  """
  p = np.asarray(parents)
  if p.ndim != 1 or p.size == 0:
    raise ValueError(f"parents must be a non-empty 1-D sequence, got shape {p.shape}.")
  if not np.issubdtype(p.dtype, np.integer):
    raise TypeError(f"parent indices must be integers, got dtype {p.dtype}.")
  return _heights(p.astype(np.int64, copy=False), np.array([p.size], np.int64))[1]


def encode_trees(parents_list: Sequence[Sequence[int]], features: Sequence[np.ndarray], *,
                 pad: str = "pow2", num_nodes: int | None = None, num_levels: int | None = None,
                 width: int | None = None, num_trees: int | None = None) -> TreeBatch:
  """Encode trees (parent arrays, ``-1`` for the root, plus ``(n_i, d)`` node features) as a
  :class:`TreeBatch`. Sizes are padded to powers of two (``pad='pow2'``, few compiled programs) or kept
  exact (``pad='exact'``); ``num_nodes``/``num_levels``/``width``/``num_trees`` force sizes.

  Vectorised over the whole batch (no Python loop per node): the parents are concatenated into one
  array, heights come from a bottom-up sweep with one numpy step per level, and the nodes of each
  level are listed (in increasing node index: tree by tree, node by node) by one stable argsort of the
  heights. 64 trees of 4-40 leaves (~3,000 nodes) take ~0.4 ms of CPU time for the structure, ~0.6-0.8
  ms with the copy of d=256 features into the padded ``x`` (the per-node loop it replaced: 4-5 ms).

  >>> b = encode_trees([[-1, 0, 0], [-1]], [np.ones((3, 2)), np.ones((1, 2))], pad="exact")
  >>> b.x.shape, b.level_nodes.tolist(), b.roots.tolist()
  ((5, 2), [[1, 2, 3], [0, 4, 4]], [0, 3])
  """
  if pad not in ("pow2", "exact"):
    raise ValueError(f"pad must be 'pow2' or 'exact', got {pad!r}.")
  if len(parents_list) != len(features) or not len(parents_list):
    raise ValueError(f"give one feature array per tree: {len(parents_list)} parent arrays, "
                     f"{len(features)} feature arrays.")
  flat, tree_sizes = _flat_parents(parents_list)
  feats = [np.asarray(f) for f in features]
  d = feats[0].shape[-1] if feats[0].ndim else 0
  for t, f in enumerate(feats):
    if f.ndim != 2 or f.shape != (tree_sizes[t], d):
      raise ValueError(f"features[{t}] must have shape ({tree_sizes[t]}, {d}), got {f.shape}.")
  gparent, height, root_idx = _heights(flat, tree_sizes)
  total = flat.size
  levels = int(height.max()) + 1
  counts = np.bincount(height, minlength=levels)
  w = int(counts.max())
  rnd = _pow2 if pad == "pow2" else int
  sizes = {"num_nodes": (num_nodes, total), "num_levels": (num_levels, levels), "width": (width, w),
           "num_trees": (num_trees, len(feats))}
  out = {}
  for k, (forced, need) in sizes.items():
    out[k] = rnd(need) if forced is None else int(forced)
    if out[k] < need:
      raise ValueError(f"{k}={forced} is smaller than the {need} the trees need.")
  n_pad, dummy = out["num_nodes"], out["num_nodes"]
  x = np.zeros((n_pad + 1, d), feats[0].dtype)
  np.concatenate(feats, axis=0, out=x[:total], casting="unsafe")
  parent = np.full(n_pad + 1, dummy, np.int32)
  parent[:total] = np.where(gparent >= 0, gparent, dummy)
  order = np.argsort(height, kind="stable")  # by level, node index increasing within a level
  h_sorted = height[order]
  starts = np.cumsum(counts) - counts
  level_nodes = np.full((out["num_levels"], out["width"]), dummy, np.int32)
  level_nodes[h_sorted, np.arange(total) - starts[h_sorted]] = order
  roots = np.full(out["num_trees"], dummy, np.int32)
  roots[:len(feats)] = root_idx
  return TreeBatch(x, parent, level_nodes, roots, np.int32(levels))


_CELL_KEYS = ("W_iou", "b_iou", "U_iou", "W_f", "b_f", "U_f")


def _check_cell_params(params, d: int, fname: str) -> int:
  """Check the Tree-LSTM parameter dict for input size ``d`` (shapes only: works on tracers) and return the
  hidden size."""
  if not hasattr(params, "keys") or any(k not in params for k in _CELL_KEYS):
    have = sorted(params.keys()) if hasattr(params, "keys") else type(params).__name__
    raise ValueError(f"{fname}: params must be a dict with keys {list(_CELL_KEYS)} (e.g. "
                     f"ChildSumTreeLSTM(...).init(...)['params']), got {have}.")
  hd = np.shape(params["U_f"])[-1] if np.ndim(params["U_f"]) == 2 else None
  # no usable hidden size: every expected shape is unknown, so the first key is reported
  want = dict.fromkeys(_CELL_KEYS) if not hd else {
      "W_iou": (d, 3 * hd), "b_iou": (3 * hd,), "U_iou": (hd, 3 * hd), "W_f": (d, hd), "b_f": (hd,),
      "U_f": (hd, hd)}
  for k, shape in want.items():
    if shape is None or tuple(np.shape(params[k])) != shape:
      got = {q: tuple(np.shape(params[q])) for q in _CELL_KEYS}
      raise ValueError(f"{fname}: params['{k}'] must have shape {shape} for input size d={d} and hidden size "
                       f"h=params['U_f'].shape[1]; got shapes {got}.")
  return int(hd)


def tree_lstm_cell(params, x_j, child_h, child_c):
  """One child-sum Tree-LSTM node: ``x_j`` ``(d,)``, children ``(k, h)`` (``k`` may be 0).

  Tai, Socher and Manning (ACL 2015), child-sum Tree-LSTM, eq. 2-8 (the module docstring):
  ``h~ = sum_k h_k``; ``[i, o, u] = x_j W_iou + b_iou + h~ U_iou``;
  ``f_k = sigmoid(x_j W_f + b_f + h_k U_f)``; ``c = sigmoid(i) tanh(u) + sum_k f_k c_k``;
  ``h = sigmoid(o) tanh(c)``. A leaf (``k = 0``) has ``h~ = 0`` and no forget term.

  Args:
    params: dict of ``W_iou (d, 3h)``, ``b_iou (3h,)``, ``U_iou (h, 3h)``, ``W_f (d, h)``, ``b_f (h,)``,
      ``U_f (h, h)`` (``ChildSumTreeLSTM``'s parameters); ``i, o, u`` are the three ``h``-wide slices of
      ``iou``, in that order.
    x_j: ``(d,)`` node input.
    child_h, child_c: ``(k, h)`` hidden and memory states of the node's children.

  Returns:
    ``(h, c)``, each ``(h,)``.

  Raises:
    ValueError: a key of ``params`` is missing or a shape does not match.

  >>> p = {"W_iou": jnp.zeros((2, 6)), "b_iou": jnp.zeros(6), "U_iou": jnp.zeros((2, 6)),
  ...      "W_f": jnp.zeros((2, 2)), "b_f": jnp.zeros(2), "U_f": jnp.zeros((2, 2))}
  >>> h, c = tree_lstm_cell(p, jnp.ones(2), jnp.zeros((0, 2)), jnp.zeros((0, 2)))   # a leaf
  >>> c.tolist()                                        # sigmoid(0) * tanh(0)
  [0.0, 0.0]
  """
  if np.ndim(x_j) != 1:
    raise ValueError(f"tree_lstm_cell: x_j must be one node's input of shape (d,), got {np.shape(x_j)}; "
                     "use jax.vmap for a batch of nodes.")
  hd = _check_cell_params(params, np.shape(x_j)[0], "tree_lstm_cell")
  if np.ndim(child_h) != 2 or np.shape(child_h) != np.shape(child_c) or np.shape(child_h)[1] != hd:
    raise ValueError(f"tree_lstm_cell: child_h and child_c must both have shape (k, {hd}) (k children, "
                     f"k may be 0), got {np.shape(child_h)} and {np.shape(child_c)}.")
  h_sum = child_h.sum(0)
  iou = x_j @ params["W_iou"] + params["b_iou"] + h_sum @ params["U_iou"]
  i, o, u = jnp.split(iou, 3, axis=-1)
  f = jax.nn.sigmoid(x_j @ params["W_f"] + params["b_f"] + child_h @ params["U_f"])
  c = jax.nn.sigmoid(i) * jnp.tanh(u) + (f * child_c).sum(0)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


class ChildSumTreeLSTM(nn.Module):
  """Child-sum Tree-LSTM (Tai et al. 2015) run level by level over a :class:`TreeBatch`.

  Returns ``(root_h, node_h)``: ``(T, features)`` root states (zero for padded trees) and ``(N + 1,
  features)`` states of every node. Work per level is one matmul over the ``W`` nodes of that level of
  all trees; padded slots scatter into the dummy node with zero weight, so results do not depend on the
  padding or on which trees share the batch.

  >>> trees = [[-1, 0, 0, 1], [-1, 0]]
  >>> b = encode_trees(trees, [np.ones((4, 3)), np.ones((2, 3))])
  >>> m = ChildSumTreeLSTM(5)
  >>> v = m.init(jax.random.PRNGKey(0), b)
  >>> root_h, _ = m.apply(v, b)
  >>> ref = tree_lstm_recursive(v, trees[1], jnp.ones((2, 3)))
  >>> bool(jnp.allclose(root_h[1], ref, atol=1e-6)), root_h.shape
  (True, (2, 5))
  """
  features: int

  @nn.compact
  def __call__(self, batch: TreeBatch):
    x = jnp.asarray(batch.x)
    parent = jnp.asarray(batch.parent)
    d, hd = x.shape[-1], self.features
    init = nn.initializers.lecun_normal()
    p = {"W_iou": self.param("W_iou", init, (d, 3 * hd), x.dtype),
         "b_iou": self.param("b_iou", nn.initializers.zeros, (3 * hd,), x.dtype),
         "U_iou": self.param("U_iou", init, (hd, 3 * hd), x.dtype),
         "W_f": self.param("W_f", init, (d, hd), x.dtype),
         "b_f": self.param("b_f", nn.initializers.ones, (hd,), x.dtype),
         "U_f": self.param("U_f", init, (hd, hd), x.dtype)}
    return tree_lstm_levels(p, TreeBatch(x, parent, jnp.asarray(batch.level_nodes),
                                         jnp.asarray(batch.roots), jnp.asarray(batch.num_levels)))


def tree_lstm_levels(p, batch: TreeBatch):
  """The level-by-level computation of :class:`ChildSumTreeLSTM` on a params dict.

  Every node gets the child-sum Tree-LSTM state of :func:`tree_lstm_cell` (Tai et al., ACL 2015,
  eq. 2-8), computed for all nodes of one height of all trees at once: level ``l`` reads the summed
  child states ``h~`` and ``sum_k f_k c_k`` accumulated by level ``l - 1`` and scatters its own into its
  parents, in a ``lax.fori_loop`` over ``batch.num_levels`` (Nimble's dynamic control flow, Shen et
  al., MLSys 2021, Sec. 6: the trip count is data, so one program serves every tree shape of the
  padded sizes).

  Args:
    p: the parameter dict of :func:`tree_lstm_cell` (``d = batch.x.shape[1]``).
    batch: a :class:`TreeBatch` from :func:`encode_trees` (numpy or jax arrays).

  Returns:
    ``(root_h, node_h)``: ``(T, h)`` root states (zeros for padded roots) and ``(N + 1, h)`` states of
    every node (zeros for padding and the dummy row).

  Raises:
    TypeError: ``batch`` is not a :class:`TreeBatch`.
    ValueError: a key or shape of ``p`` or of ``batch`` is wrong.

  >>> b = encode_trees([[-1, 0]], [np.ones((2, 3), np.float32)])
  >>> v = ChildSumTreeLSTM(4).init(jax.random.PRNGKey(0), b)
  >>> root_h, node_h = tree_lstm_levels(v["params"], b)
  >>> root_h.shape, node_h.shape                          # 1 tree; 2 nodes padded to 2, plus the dummy
  ((1, 4), (3, 4))
  """
  if not isinstance(batch, TreeBatch):
    raise TypeError(f"tree_lstm_levels: batch must be a TreeBatch (from encode_trees), got {type(batch).__name__}.")
  if np.ndim(batch.x) != 2:
    raise ValueError(f"tree_lstm_levels: batch.x must be (N + 1, d) node features, got shape {np.shape(batch.x)}.")
  _check_cell_params(p, np.shape(batch.x)[1], "tree_lstm_levels")
  n1 = np.shape(batch.x)[0]
  if np.shape(batch.parent) != (n1,) or np.ndim(batch.level_nodes) != 2 or np.ndim(batch.roots) != 1:
    raise ValueError(f"tree_lstm_levels: batch must hold parent (N + 1,), level_nodes (L, W) and roots (T,) for "
                     f"x of shape {np.shape(batch.x)}; got parent {np.shape(batch.parent)}, level_nodes "
                     f"{np.shape(batch.level_nodes)}, roots {np.shape(batch.roots)}. Build it with encode_trees.")
  # encode_trees returns numpy arrays; a numpy level_nodes cannot be indexed by the loop's traced level
  batch = TreeBatch(*(jnp.asarray(a) for a in batch))
  x, parent = batch.x, batch.parent
  dummy = x.shape[0] - 1
  hd = p["U_f"].shape[0]
  wx_iou = x @ p["W_iou"] + p["b_iou"]
  wx_f = x @ p["W_f"] + p["b_f"]
  zeros = jnp.zeros((x.shape[0], hd), x.dtype)

  def level(l, carry):
    h_all, h_sum, fc_sum = carry
    idx = batch.level_nodes[l]
    iou = wx_iou[idx] + h_sum[idx] @ p["U_iou"]
    i, o, u = jnp.split(iou, 3, axis=-1)
    c = jax.nn.sigmoid(i) * jnp.tanh(u) + fc_sum[idx]
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    par = parent[idx]
    real = (idx != dummy)[:, None]
    to_parent = real & (par != dummy)[:, None]
    f = jax.nn.sigmoid(wx_f[par] + h @ p["U_f"])  # forget gate of the parent for this child
    h_sum = h_sum.at[par].add(jnp.where(to_parent, h, 0.0))
    fc_sum = fc_sum.at[par].add(jnp.where(to_parent, f * c, 0.0))
    h_all = h_all.at[idx].set(jnp.where(real, h, 0.0))
    return h_all, h_sum, fc_sum

  # a data-dependent trip count (Nimble's dynamic control flow): padded level rows are never run
  h_all, _, _ = lax.fori_loop(0, batch.num_levels, level, (zeros, zeros, zeros))
  h_all = h_all.at[dummy].set(0.0)
  return h_all[batch.roots], h_all


def tree_lstm_recursive(variables, parents: Sequence[int], x):
  """Root state of ONE tree by Python recursion over its structure (the per-tree baseline). Under
  ``jax.jit(..., static_argnums=1)`` every distinct tree shape compiles a new program.

  Args:
    variables: :class:`ChildSumTreeLSTM` variables (or their ``'params'`` dict).
    parents: the parent index of each node, ``-1`` for the one root (as for :func:`tree_levels`).
    x: ``(n, d)`` node features, one row per entry of ``parents``.

  Returns:
    ``(h,)`` hidden state of the root.

  Raises:
    ValueError: ``parents`` is not one tree (no root or several roots, i.e. a forest: encode it with
      :func:`encode_trees` and use :func:`tree_lstm_levels`; an index out of range; a cycle), or ``x``
      has another number of rows.
  """
  p = variables["params"] if "params" in variables else variables
  parents = [int(q) for q in parents]
  n_roots = parents.count(-1)
  if n_roots != 1:
    raise ValueError(f"tree_lstm_recursive computes ONE tree, which has exactly one root (-1), but parents "
                     f"has {n_roots} roots: {parents}. For a forest, run each tree separately or encode them "
                     "with encode_trees and use tree_lstm_levels / ChildSumTreeLSTM.")
  tree_levels(np.asarray(parents, np.int64))  # index range and cycles (a cycle would recurse forever)
  if np.ndim(x) != 2 or np.shape(x)[0] != len(parents):
    raise ValueError(f"tree_lstm_recursive: x must have shape ({len(parents)}, d), one row per node of "
                     f"parents, got {np.shape(x)}.")
  children = [[] for _ in parents]
  for j, q in enumerate(parents):
    if q >= 0:
      children[q].append(j)
  hd = p["U_f"].shape[0]

  def node(j):
    if children[j]:
      hs, cs = zip(*(node(k) for k in children[j]))
      ch, cc = jnp.stack(hs), jnp.stack(cs)
    else:
      ch = cc = jnp.zeros((0, hd), x.dtype)
    return tree_lstm_cell(p, x[j], ch, cc)

  return node(parents.index(-1))[0]
