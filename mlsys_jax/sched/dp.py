"""The IOS dynamic program (Ding et al., MLSys 2021, Sec. 4, Algorithm 1) over "ending" sets.

``cost[S] = min over endings S' of S and strategies of cost[S - S'] + stage_latency(S')``, where an
ending S' of S is a successor-closed subset (no edge from S' to S - S'). States are int bitmasks of the
units still to schedule inside one part; every reachable state is a down-set.

Stage candidates, as in the official ``ending_iterator`` / ``check_merge``:
  * concurrent execution ('parallel'): chain-decompose the transitive closure; from each chain choose at
    most one root among the last ``r`` units present in S; the group of root u is ``desc(u) & S`` and
    must hold at most ``r`` units; groups must be disjoint; at most ``s`` groups;
  * operator merge ('merge'): a subset (>= 2) of the sinks of S that are convolutions reading the same
    value with compatible parameters (see ``merge_key``); one conv with concatenated, zero-padded
    kernels.

Example:
  >>> succ = {0: {1, 2}, 1: {3}, 2: {3}, 3: set()}
  >>> stages, cost = ios_dp([0, 1, 2, 3], succ, lambda st: float(max(len(g) for g in st.groups)),
  ...                       merge_key=lambda u: None)
  >>> [s.groups for s in stages]
  [((0,),), ((1,), (2,)), ((3,),)]
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from typing import Callable, Hashable, Optional, Sequence

import numpy as np

from mlsys_jax._checks import check_int


@dataclasses.dataclass(frozen=True)
class Stage:
  """A stage: strategy 'parallel' (groups run concurrently, each a chain in order) or 'merge'
  (the units, all convs on one input, become one conv). Units are global unit indices.

  Example:
    >>> st = Stage("parallel", ((0, 1), (2,)))             # chain 0 -> 1 beside unit 2
    >>> st.units
    (0, 1, 2)
  """
  kind: str
  groups: tuple  # tuple of tuples of unit indices (for 'merge': one group)

  @property
  def units(self) -> tuple:
    return tuple(u for g in self.groups for u in g)


@contextlib.contextmanager
def _recursion_limit(depth: int):
  """Raise Python's recursion limit to at least ``depth`` frames above the current stack for the
  duration of the block, then restore the previous limit (the process-wide setting is not left
  changed)."""
  old = sys.getrecursionlimit()
  frame, used = sys._getframe(), 0
  while frame is not None:
    used, frame = used + 1, frame.f_back
  need = depth + used
  if need > old:
    sys.setrecursionlimit(need)
  try:
    yield
  finally:
    sys.setrecursionlimit(old)


def _bits(mask: int):
  while mask:
    low = mask & -mask
    yield low.bit_length() - 1
    mask ^= low


def _ideal_values(n: int, succ_m: list, pred_m: list, unit_cost: list) -> list:
  """Optimal cost of every down-set of a part whose candidate stages are single units alone, level by level.

  For IOS-Merge on a part without two units of one merge key, the DP's candidates of state S are its
  sinks ``i`` (one unit per stage) and ``cost[S] = min_i cost[S - i] + c_i``. Here every down-set (as a
  uint64 bitmask, ``n <= 63``) is enumerated by size from the empty set and its cost computed with numpy in
  the same float64 sums as the recursive DP (``cost[S - i] + c_i``), so the minima are the same bit for
  bit. Returns ``[(sorted masks, costs)]`` per size 0..n.
  """
  one = np.uint64(1)
  bits = [one << np.uint64(i) for i in range(n)]
  preds = [np.uint64(m) for m in pred_m]
  succs = [np.uint64(m) for m in succ_m]
  levels = [(np.zeros(1, np.uint64), np.zeros(1))]
  for _ in range(n):
    prev, prev_cost = levels[-1]
    grown = []
    for i in range(n):   # add a unit whose predecessors are all in the set
      ok = ((prev & bits[i]) == 0) & ((prev & preds[i]) == preds[i])
      if ok.any():
        grown.append(prev[ok] | bits[i])
    cur = np.unique(np.concatenate(grown))
    best = np.full(cur.shape, np.inf)
    for i in range(n):   # remove a sink: the rest is a down-set one unit smaller
      ok = ((cur & bits[i]) != 0) & ((cur & succs[i]) == 0)
      if ok.any():
        tot = prev_cost[np.searchsorted(prev, cur[ok] ^ bits[i])] + unit_cost[i]
        best[ok] = np.minimum(best[ok], tot)
    levels.append((cur, best))
  return levels


def ios_dp(nodes: Sequence[int], succ: dict, stage_cost: Callable[[Stage], float], *, r: int = 3,
           s: int = 8, strategy: str = "both",
           merge_key: Optional[Callable[[int], Optional[Hashable]]] = None,
           max_merge: int = 8, rank: Optional[Callable[[Stage], float]] = None,
           top_k: int = 0) -> tuple[list, float]:
  """Optimal stage sequence of one part under the pruning parameters ``r`` (max units per group) and
  ``s`` (max groups per stage).

  Args:
    nodes: unit indices of the part, each once, in a topological order (every edge of ``succ`` between two
      of them goes from an earlier to a later one; ``ValueError`` otherwise, so a cycle is refused too).
    succ: unit -> set of successor units (units outside ``nodes`` are ignored).
    stage_cost: Stage -> latency (seconds); called once per distinct stage (memoized here).
    r, s: the IOS pruning parameters (paper defaults r=3, s=8), integers >= 1.
    strategy: 'both', 'parallel' or 'merge' (IOS-Both / IOS-Parallel / IOS-Merge). With 'merge' a
      parallel stage is a single unit (sequential execution plus merges).
    merge_key: unit -> hashable key, equal for units that may be merged, None if not mergeable.
    max_merge: largest number of units in one merge stage.
    rank, top_k: the hybrid search (Value Learning, Steiner et al., MLSys 2021, applied to IOS): with
      ``rank`` (Stage -> predicted latency, e.g. a learned model) and ``top_k >= 1``, each state keeps
      only the ``top_k`` candidate stages with the lowest predicted total (``rank`` of the stage + the
      optimum of the rest under ``rank``), and ``stage_cost`` (the profiler) is called for those alone;
      if all of them cost inf, the next ones in predicted order are tried. ``top_k = 0``: every
      candidate is costed (IOS).

  Returns:
    (stages in execution order, total predicted latency).

  Example:
    >>> succ = {0: {2}, 1: {2}, 2: set()}                 # two convs on one input, then their sum
    >>> cost = lambda st: 1.0 if st.kind == "merge" else float(len(st.units))
    >>> stages, total = ios_dp([0, 1, 2], succ, cost, merge_key=lambda u: "conv" if u < 2 else None)
    >>> [(st.kind, st.groups) for st in stages], total
    ([('merge', ((0, 1),)), ('parallel', ((2,),))], 2.0)
  """
  check_int("r", r)
  check_int("s", s)
  if r < 1 or s < 1:
    raise ValueError(f"r and s must be >= 1 (units per group, groups per stage), got r={r}, s={s}")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0: cost every candidate), got {top_k!r}")
  if top_k and rank is None:
    raise ValueError("top_k >= 1 needs rank, the predicted stage latency that picks the candidates")
  if strategy not in ("both", "parallel", "merge"):
    raise ValueError(f"strategy must be 'both', 'parallel' or 'merge', got {strategy!r}")
  n = len(nodes)
  if n == 0:
    return [], 0.0
  pos = {}
  for i, u in enumerate(nodes):
    if u in pos:
      raise ValueError(f"nodes lists unit {u!r} twice (positions {pos[u]} and {i}); pass each unit of the part "
                       "once.")
    pos[u] = i
  succ_m = [0] * n
  for u in nodes:
    for v in succ.get(u, ()):
      if v in pos:
        if pos[v] <= pos[u]:
          what = "a self-loop" if v == u else "a cycle or nodes not in topological order"
          raise ValueError(f"edge {u!r} -> {v!r} goes backwards in nodes (position {pos[u]} -> {pos[v]}): "
                           f"{what}. Pass the units of an acyclic part in a topological order (every "
                           "edge from an earlier to a later unit).")
        succ_m[pos[u]] |= 1 << pos[v]
  # transitive closure (descendants incl. self), reverse topological order
  tc = [0] * n
  for i in range(n - 1, -1, -1):
    m = 1 << i
    for j in _bits(succ_m[i]):
      m |= tc[j]
    tc[i] = m
  pred_m = [0] * n
  for i in range(n):
    for j in _bits(succ_m[i]):
      pred_m[j] |= 1 << i
  # chain decomposition: repeatedly take a longest path among remaining nodes
  remaining = (1 << n) - 1
  chains = []
  while remaining:
    best_len = [0] * n
    nxt = [-1] * n
    for i in range(n - 1, -1, -1):
      if not remaining >> i & 1:
        continue
      bl, bn = 1, -1
      for j in _bits(tc[i] & remaining & ~(1 << i)):
        if best_len[j] + 1 > bl:
          bl, bn = best_len[j] + 1, j
      best_len[i], nxt[i] = bl, bn
    start = max((i for i in range(n) if remaining >> i & 1), key=lambda i: best_len[i])
    chain = []
    i = start
    while i != -1:
      chain.append(i)
      i = nxt[i]
    for i in chain:
      remaining &= ~(1 << i)
    chains.append(chain)
  keys = [merge_key(u) if merge_key is not None else None for u in nodes]
  cost_memo: dict = {}

  group_memo: dict = {}

  def group_order(gmask: int) -> tuple:
    g_ = group_memo.get(gmask)
    if g_ is None:
      g_ = group_memo[gmask] = tuple(nodes[i] for i in _bits(gmask))  # ascending = topological
    return g_

  def cost_of(stage_masks: tuple, kind: str) -> float:
    k = (kind, stage_masks)
    if k not in cost_memo:
      st = Stage(kind, tuple(group_order(m) for m in stage_masks))
      c = float(stage_cost(st))
      cost_memo[k] = float("inf") if c != c else c  # NaN: an invalid stage
    return cost_memo[k]

  # Per state S the candidates are enumerated in the same order as IOS's ``ending_iterator`` (and this
  # module's first version, kept in tests/test_sched_dp_fast.py as the reference): the DP keeps the first
  # of equally cheap candidates, so the order decides ties and with it the schedule. Enumeration works on
  # bitmasks: the last ``r`` units of a chain present in S are its top ``r`` bits (chains ascend in the
  # topological order), chains with no candidate root are dropped before the search over root choices
  # (they only add a 'skip' level, which leaves the order of the choices unchanged), and merges are
  # enumerated only over units whose merge key another unit of the part shares (a key held by one unit
  # yields no merge of >= 2 units).
  chain_masks = []
  for ch in chains:
    cm = 0
    for i in ch:
      cm |= 1 << i
    chain_masks.append(cm)
  chain_masks_rev = chain_masks[::-1]
  key_count: dict = {}
  for k in keys:
    if k is not None:
      key_count[k] = key_count.get(k, 0) + 1
  mergeable = 0
  for i, k in enumerate(keys):
    if k is not None and key_count[k] > 1:
      mergeable |= 1 << i
  merge_only = strategy == "merge"
  max_groups = 1 if merge_only else s

  def merge_endings(S: int, res: list) -> None:
    # sinks of S (ascending) that share a merge key with another unit of the part, grouped by key
    by_key: dict = {}
    m_ = S & mergeable
    while m_:
      low = m_ & -m_
      m_ ^= low
      i = low.bit_length() - 1
      if not succ_m[i] & S:
        by_key.setdefault(keys[i], []).append(i)
    for members in by_key.values():
      members = members[:max_merge]
      m = len(members)
      for sub in range(1, 1 << m):
        if sub & (sub - 1) == 0:
          continue   # fewer than 2 units
        gm = 0
        for t in range(m):
          if sub >> t & 1:
            gm |= 1 << members[t]
        res.append(("merge", (gm,)))

  def endings(S: int):
    out = []
    if merge_only:
      # one unit per parallel stage: the sink of S on each chain (its last unit present, if that has no
      # successor in S), last chain first (the order of the skip-first search over chains)
      for cm in chain_masks_rev:
        p = cm & S
        if p:
          i = p.bit_length() - 1
          if not succ_m[i] & S:
            out.append((1 << i,))
    else:
      lists = []
      for cm in chain_masks:
        p = cm & S
        if not p:
          continue
        top = []
        while p and len(top) < r:
          i = p.bit_length() - 1
          top.append(i)
          p ^= 1 << i
        cands = []
        for i in reversed(top):   # ascending, as the chain lists them
          gm = tc[i] & S
          if gm.bit_count() <= r:
            cands.append(gm)
        if cands:
          lists.append(cands)
      # every choice of at most one root per chain (disjoint groups, at most max_groups of them) in the
      # order of a depth-first search over the chains that tries 'no root' before each root: built from
      # the last chain back, the selections of chains k.. are those of k+1.. (no root at k), then for each
      # root of k, those of k+1.. it is disjoint from and can join
      sel = [(0, ())]
      for cands in reversed(lists):
        nxt = list(sel)
        for gm in cands:
          nxt.extend([(gm | u_, (gm,) + g_) for u_, g_ in sel if not gm & u_ and len(g_) < max_groups])
        sel = nxt
      out = [tuple(sorted(g_)) for _, g_ in sel[1:]]   # sel[0]: no root at all
    # opaque/unmergeable units are handled by stage_cost (inf for invalid stages); set() as in IOS (and
    # the reference): its iteration order is part of the tie-breaking
    res = [("parallel", groups) for groups in set(out)]
    if mergeable and strategy in ("both", "merge"):
      merge_endings(S, res)
    return res

  def ending_mask(groups: tuple) -> int:
    em = 0
    for gm in groups:
      em |= gm
    return em

  hybrid = rank is not None and top_k >= 1
  if hybrid:  # both DPs enumerate every state's candidates: enumerate once
    endings = functools.lru_cache(maxsize=None)(endings)
  rank_memo: dict = {}
  rank_best: dict = {0: 0.0}

  def rank_of(groups: tuple, kind: str) -> float:
    k = (kind, groups)
    if k not in rank_memo:
      c = float(rank(Stage(kind, tuple(group_order(m) for m in groups))))
      rank_memo[k] = float("inf") if c != c else c
    return rank_memo[k]

  def solve_rank(S: int) -> float:  # the DP under the predicted costs alone
    if S not in rank_best:
      rank_best[S] = min((rank_of(g_, k_) + solve_rank(S & ~ending_mask(g_)) for k_, g_ in endings(S)),
                         default=float("inf"))
    return rank_best[S]

  def ordered(S: int):
    ends = endings(S)
    if not hybrid:
      return ends, len(ends)
    pred = [rank_of(g_, k_) + solve_rank(S & ~ending_mask(g_)) for k_, g_ in ends]
    order = sorted(range(len(ends)), key=lambda i: pred[i])
    return [ends[i] for i in order], top_k

  memo: dict = {0: (0.0, None)}
  inf = float("inf")

  def solve(S: int) -> float:
    if S in memo:
      return memo[S][0]
    best, arg = inf, None
    cands, keep = ordered(S)
    for i, (kind, groups) in enumerate(cands):
      if i >= keep and best < inf:
        break  # hybrid: only the top_k predicted candidates (more only while none is finite)
      em = ending_mask(groups)
      c = cost_of(groups, kind)
      if c >= best:
        continue
      tot = solve(S & ~em) + c
      if tot < best:
        best, arg = tot, (kind, groups, em)
    memo[S] = (best, arg)
    return best

  def solve_all(S: int) -> float:
    # ``solve`` without the hybrid's candidate ranking (every candidate costed), inlined: the same
    # candidates in the same order, the same sums and comparisons, so the same optimum and ties
    hit = memo.get(S)
    if hit is not None:
      return hit[0]
    best, arg = inf, None
    for cand in endings(S):
      c = cost_memo.get(cand)   # keys are (kind, group masks): the candidate itself
      if c is None:
        c = cost_of(cand[1], cand[0])
      if c >= best:
        continue
      groups = cand[1]
      em = groups[0]
      for gm in groups[1:]:
        em |= gm
      rest = S & ~em
      h = memo.get(rest)
      tot = (solve_all(rest) if h is None else h[0]) + c
      if tot < best:
        best, arg = tot, (cand[0], groups, em)
    memo[S] = (best, arg)
    return best

  full = (1 << n) - 1
  # IOS-Merge on a part with nothing to merge (every candidate one unit alone, e.g. all of NasNet-A and
  # RandWire: 2.45M states in NasNet-A's parts): the optimum of every state by numpy, level by level, then
  # the choice at each state of the optimal path as ``solve_all`` makes it (the first candidate, in its
  # order, whose total equals the optimum; with costs >= 0 the pruning ``c >= best`` skips no strictly
  # better one). Same stages and total as the recursive DP (tests/test_sched_dp_fast.py).
  unit_cost = None
  if merge_only and not hybrid and not mergeable and n <= 63:
    unit_cost = [cost_of((1 << i,), "parallel") for i in range(n)]
    if min(unit_cost) < 0:
      unit_cost = None
  if unit_cost is not None:
    levels = _ideal_values(n, succ_m, pred_m, unit_cost)

    def value(S: int) -> float:
      masks, costs = levels[S.bit_count()]
      return float(costs[np.searchsorted(masks, np.uint64(S))])

    total = value(full)
    S = full
    while S and total != inf:
      v = value(S)
      for kind, groups in endings(S):
        em = groups[0]
        if value(S & ~em) + cost_memo[(kind, groups)] == v:
          memo[S] = (v, (kind, groups, em))
          break
      S &= ~memo[S][1][2]
  else:
    # depth <= n states, a few frames each (twice that with the predicted DP nested); restored on exit
    with _recursion_limit((8 if hybrid else 4) * n + 200):
      total = (solve if hybrid else solve_all)(full)
  if total == float("inf"):
    raise ValueError(f"ios_dp: every schedule of this part ({n} units) has infinite cost: the stage "
                     "cost model returned inf (or NaN) for all candidate stages of some state, e.g. "
                     "for single-unit stages; check the profiler (a failed measurement?) or that "
                     "stage_cost returns finite seconds for every one-unit stage")
  stages = []
  S = full
  while S:
    _, (kind, groups, em) = memo[S]
    stages.append(Stage(kind, tuple(group_order(m) for m in groups)))
    S &= ~em
  stages.reverse()
  return stages, total
