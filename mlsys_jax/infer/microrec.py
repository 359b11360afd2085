"""MicroRec: fewer embedding lookups by Cartesian combination of tables (Jiang et al., MLSys 2021).

Recommendation inference is bound by random embedding lookups. MicroRec (Jiang, He, Zhang, Preusser, Zeng,
Feng, Zhang, Liu, Li, Zhou, Zhang, Alonso, "MicroRec: Efficient Recommendation Inference by Hardware and
Data Structure Solutions", MLSys 2021, section 3) replaces the lookups into small one-hot tables A
(n_A x d_A) and B (n_B x d_B) by ONE lookup into their Cartesian product

    C[i * n_B + j] = concat(A[i], B[j])          (n_A * n_B rows of width d_A + d_B)

(more tables: mixed-radix index, first table most significant). The result is bit-identical; the price is
storage, n_A n_B (d_A + d_B) - n_A d_A - n_B d_B extra elements, so it only pays for small tables.

This module has

- table specs: :data:`ALIBABA_47` and :data:`ALIBABA_98` (the authors' public ``embedding_dimension.npy``
  of their 47- and 98-table wide&deep models) and :data:`CRITEO_26` (the public Criteo Kaggle cardinalities);
- plans (:class:`Plan`: which tables share one lookup) with storage/lookup accounting (:func:`plan_report`);
- planners: :func:`authors_plan` (the authors' outer-inner pairing of the 2i smallest tables),
  :func:`greedy_plan` (merge the cheapest extra bytes per saved lookup) and :func:`optimal_plan` (an exact
  integer program over pairs and triples of table *types*: most lookups saved within the budget, then
  least storage);
- the lookup stage (:class:`EmbeddingStage`, :func:`build_stage`, :func:`lookup`): per-table ``take``, one
  fused gather per embedding width over concatenated tables (row offsets), and combined tables (fused or
  not); :func:`sharded_lookup` places whole physical tables on the devices of one host (LPT balance of
  bytes) and gathers them under ``shard_map``;
- :class:`DLRM`, a flax bottom-MLP / embeddings / dot (or concat, wide&deep) interaction / top-MLP model
  whose embedding stage is an input, and :func:`synthetic_batch` (uniform or Zipf access);
- :class:`Server`, the serving entry point: one table buffer, weights compiled in, one int32 array in and
  one out per call (what makes a small-batch call cheap is mostly not the lookups; see its docstring).

Out-of-range indices: with concrete indices :func:`lookup` raises ``ValueError`` naming the table; with
traced indices (inside ``jit``) each index is clamped into its table and the number of out-of-range
indices is returned next to the embeddings (never a silent wrong answer). Multi-hot features (bags) are
refused in a combined table: the product only represents one row per table.

Example:
  >>> import jax, numpy as np
  >>> from mlsys_jax.infer import microrec as mr
  >>> specs = (mr.TableSpec(3, 2), mr.TableSpec(4, 2), mr.TableSpec(50, 2))
  >>> tables = mr.init_tables(0, specs)
  >>> plan = mr.Plan(((0, 1), (2,)))
  >>> idx = np.array([[2, 3, 7], [0, 1, 49]])
  >>> a, _ = mr.lookup(mr.build_stage(tables, mr.Plan.identity(3)), idx)
  >>> b, bad = mr.lookup(mr.build_stage(tables, plan), idx)
  >>> bool(np.array_equal(a, b)), int(bad), mr.plan_report(specs, plan).lookups
  (True, 0, 2)
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax._checks import check_choice, check_int, check_range, is_concrete

__all__ = [
    "TableSpec", "ALIBABA_47", "ALIBABA_98", "CRITEO_26", "Plan", "PlanReport", "plan_report",
    "combine_tables", "combined_index", "authors_plan", "greedy_plan", "optimal_plan", "frontier",
    "EmbeddingStage", "build_stage", "lookup", "pallas_supported", "PALLAS_KERNELS", "PALLAS_DEFAULTS", "init_tables",
    "balanced_placement", "ShardedStage", "shard_stage", "sharded_lookup",
    "DLRM", "Server", "synthetic_batch", "INDEX_LIMIT",
]

INDEX_LIMIT = 2**31 - 1  # combined row indices are int32 (jax's default integer width).


class TableSpec(NamedTuple):
  """One embedding table: ``rows`` (cardinality) x ``dim`` (width)."""
  rows: int
  dim: int


def _specs(pairs) -> tuple[TableSpec, ...]:
  return tuple(TableSpec(int(r), int(d)) for d, r in pairs)


# The authors' table specs, (dim, rows) pairs of `keras_wide_deep*/cartesian_analysis/embedding_dimension.npy`
# in WenqiJiang/FPGA-Accelerator-for-Recommender-Systems (353,669,600 and 3,776,852,800 parameters).
ALIBABA_47 = _specs([(4, 100)] * 4 + [(4, 500)] * 2 + [(4, 1000)] * 10 + [(8, 3000)] + [(8, 10000)] * 15
                    + [(8, 20000), (8, 30000)] + [(8, 100000)] * 10 + [(16, 500000), (16, 1000000),
                                                                       (32, 10000000)])
ALIBABA_98 = _specs([(4, 100)] * 12 + [(4, 500)] * 6 + [(4, 1000)] * 9 + [(8, 5000)] * 14 + [(8, 15000)] * 2
                    + [(8, 50000)] * 30 + [(8, 100000)] * 2 + [(8, 150000)] * 2 + [(16, 500000)] * 16
                    + [(16, 1000000)] * 2 + [(16, 5000000), (32, 10000000), (32, 100000000)])
# Criteo Kaggle (Display Advertising Challenge) categorical cardinalities C1..C26, as counted by the DLRM
# preprocessing; width 16 as in the H200 measurement.
CRITEO_26 = tuple(TableSpec(n, 16) for n in (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992, 5461306,
    10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572))


def _check_specs(specs) -> tuple[TableSpec, ...]:
  specs = tuple(TableSpec(*s) for s in specs)
  if not specs:
    raise ValueError("specs is empty; pass at least one TableSpec(rows, dim).")
  for i, s in enumerate(specs):
    check_int(f"specs[{i}].rows", s.rows, 1)
    check_int(f"specs[{i}].dim", s.dim, 1)
  return specs


# ----------------------------------------------------------------------------------------------------
# Plans and accounting.

class Plan(NamedTuple):
  """Which tables share one lookup: ``groups`` partitions ``range(num_tables)``; a group of 2+ tables is
  one Cartesian-product table (index order = radix order, first table most significant)."""
  groups: tuple[tuple[int, ...], ...]

  @staticmethod
  def identity(num_tables: int) -> "Plan":
    return Plan(tuple((i,) for i in range(num_tables)))


def _check_plan(plan: Plan, specs: Sequence[TableSpec], multi_hot: Sequence[int] = ()) -> Plan:
  if not isinstance(plan, Plan):
    raise TypeError(f"plan must be a microrec.Plan, got {type(plan).__name__}.")
  groups = tuple(tuple(int(i) for i in g) for g in plan.groups)
  flat = [i for g in groups for i in g]
  if any(len(g) == 0 for g in groups):
    raise ValueError("plan has an empty group; every group needs at least one table index.")
  if sorted(flat) != list(range(len(specs))):
    raise ValueError(f"plan.groups must partition range({len(specs)}) (each table exactly once), got "
                     f"{groups}.")
  hot = set(int(i) for i in multi_hot)
  for g in groups:
    if len(g) > 1 and hot & set(g):
      raise ValueError(f"tables {sorted(hot & set(g))} are multi-hot but sit in the combined group {g}; a "
                       "Cartesian product holds one row per table (one-hot only). Keep multi-hot tables alone.")
    n = math.prod(specs[i].rows for i in g)
    if n > INDEX_LIMIT:
      raise ValueError(f"group {g} would have {n} rows, more than int32 indices address ({INDEX_LIMIT}); "
                       "combine smaller tables.")
  return Plan(groups)


class PlanReport(NamedTuple):
  """Accounting of a plan (element counts; multiply by the dtype size for bytes).

  Attributes:
    lookups: random row lookups per sample (number of groups); ``tables``: lookups without combination.
    base_elements: elements of the separate tables; ``elements``: elements the plan stores.
    overhead: ``elements / base_elements - 1`` (the combined tables replace their members).
    authors_overhead: the authors' trade-off-script convention, ``sum_{|g|>1} prod(rows) * sum(dims)`` over
      ``base_elements`` (members are kept as well).
  """
  lookups: int
  tables: int
  base_elements: int
  elements: int
  overhead: float
  authors_overhead: float


def _group_elements(specs, g) -> int:
  return math.prod(specs[i].rows for i in g) * sum(specs[i].dim for i in g)


def plan_report(specs: Sequence[TableSpec], plan: Plan) -> PlanReport:
  """Lookups and storage of ``plan`` on ``specs`` (see :class:`PlanReport`)."""
  specs = _check_specs(specs)
  plan = _check_plan(plan, specs)
  base = sum(s.rows * s.dim for s in specs)
  elems = sum(_group_elements(specs, g) for g in plan.groups)
  prod = sum(_group_elements(specs, g) for g in plan.groups if len(g) > 1)
  return PlanReport(len(plan.groups), len(specs), base, elems, elems / base - 1.0, prod / base)


def _extra(specs, g) -> int:
  """Extra elements of combining group ``g`` instead of storing its members separately."""
  return _group_elements(specs, g) - sum(specs[i].rows * specs[i].dim for i in g)


def _budget_elements(specs, budget: float) -> float:
  check_range("budget", budget, 0.0)
  return budget * sum(s.rows * s.dim for s in specs)


def _finish(specs, groups, num_tables) -> Plan:
  used = {i for g in groups for i in g}
  out = [tuple(g) for g in groups] + [(i,) for i in range(num_tables) if i not in used]
  return Plan(tuple(sorted(out, key=lambda g: g[0])))


# ----------------------------------------------------------------------------------------------------
# Planners.

def authors_plan(specs: Sequence[TableSpec], budget: float, *, num_pairs: int | None = None) -> Plan:
  """The authors' heuristic: sort tables by size, take the ``2i`` smallest, pair the ``j``-th with the
  ``(2i-1-j)``-th, for the largest ``i`` whose extra storage (``plan_report(...).overhead``) is <= ``budget``
  (a fraction of the separate tables' elements). ``num_pairs=i`` fixes ``i`` instead (``ValueError`` if
  those pairs exceed ``budget``)."""
  specs = _check_specs(specs)
  cap = _budget_elements(specs, budget)
  order = sorted(range(len(specs)), key=lambda i: (specs[i].rows * specs[i].dim, i))
  if num_pairs is not None:
    check_int("num_pairs", num_pairs, 0, len(specs) // 2)
    top = order[:2 * num_pairs]
    pairs = [(top[j], top[-1 - j]) for j in range(num_pairs)]
    extra = sum(_extra(specs, p) for p in pairs)
    if extra > cap:
      raise ValueError(f"the authors' {num_pairs} pairs need {extra / sum(s.rows * s.dim for s in specs):.4f} "
                       f"extra storage, over budget={budget}; raise the budget.")
    return _finish(specs, pairs, len(specs))
  best: list[tuple[int, int]] = []
  for i in range(1, len(specs) // 2 + 1):
    top = order[:2 * i]
    pairs = [(top[j], top[-1 - j]) for j in range(i)]
    if any(math.prod(specs[k].rows for k in p) > INDEX_LIMIT for p in pairs):
      break
    if sum(_extra(specs, p) for p in pairs) > cap:
      break
    best = pairs
  return _finish(specs, best, len(specs))


def greedy_plan(specs: Sequence[TableSpec], budget: float, *, max_group: int = 3,
                multi_hot: Sequence[int] = ()) -> Plan:
  """Greedy on bytes per saved lookup: repeatedly merge the two current groups whose merge adds the fewest
  elements (each merge saves one lookup) while the total extra storage stays <= ``budget`` and groups
  have at most ``max_group`` tables. Multi-hot tables are never merged."""
  specs = _check_specs(specs)
  check_int("max_group", max_group, 2)
  cap = _budget_elements(specs, budget)
  hot = set(int(i) for i in multi_hot)
  groups = [(i,) for i in range(len(specs)) if i not in hot]
  spent = 0
  while True:
    best = None
    # Only the cheapest candidates can win: sort by size and scan pairs of the smallest groups.
    groups.sort(key=lambda g: _group_elements(specs, g))
    lim = min(len(groups), 64)
    for a in range(lim):
      for b in range(a + 1, lim):
        g = groups[a] + groups[b]
        if len(g) > max_group or math.prod(specs[i].rows for i in g) > INDEX_LIMIT:
          continue
        cost = _extra(specs, g) - _extra(specs, groups[a]) - _extra(specs, groups[b])
        if spent + cost <= cap and (best is None or cost < best[0]):
          best = (cost, a, b)
    if best is None:
      break
    cost, a, b = best
    merged = groups[a] + groups[b]
    groups = [g for k, g in enumerate(groups) if k not in (a, b)] + [merged]
    spent += cost
  return _finish(specs, [g for g in groups if len(g) > 1], len(specs))


def _group_types(specs, cand, cap, max_group):
  """Types (rows, dim) of candidate tables with their counts, and every pair/triple of types whose extra
  storage fits ``cap`` (each a combination saving len-1 lookups)."""
  types = sorted({(specs[i].rows, specs[i].dim) for i in cand})
  count = [sum(1 for i in cand if (specs[i].rows, specs[i].dim) == t) for t in types]
  tspecs = [TableSpec(*t) for t in types]
  combos = []
  n = len(types)
  for a in range(n):
    for b in range(a, n):
      sizes = [(a, b)] + ([(a, b, c) for c in range(b, n)] if max_group >= 3 else [])
      for combo in sizes:
        if any(combo.count(t) > count[t] for t in set(combo)):
          continue
        if math.prod(tspecs[t].rows for t in combo) > INDEX_LIMIT:
          continue
        cost = _extra(tspecs, combo)
        if cost <= cap:
          combos.append((combo, cost))
  return types, count, combos


def _milp(count, combos, cap, saved_at_least=None):
  """Integer program over combination multiplicities: maximise lookups saved (then minimise storage) with
  each type used at most ``count`` times and extra storage <= ``cap``; two solves (most saved, then least
  storage at that many saved)."""
  from scipy.optimize import Bounds, LinearConstraint, milp
  m = len(combos)
  saves = np.array([len(c) - 1 for c, _ in combos], float)
  costs = np.array([cost for _, cost in combos], float)
  use = np.zeros((len(count), m))
  for j, (c, _) in enumerate(combos):
    for t in c:
      use[t, j] += 1
  cons = [LinearConstraint(use, 0, np.array(count, float)), LinearConstraint(costs[None], 0, cap)]
  integrality = np.ones(m)
  bounds = Bounds(0, np.inf)
  if saved_at_least is None:
    res = milp(-saves, constraints=cons, integrality=integrality, bounds=bounds)
    if not res.success:
      raise RuntimeError(f"integer program failed: {res.message}")
    s = int(round(saves @ np.round(res.x)))
    saved_at_least = s
  cons.append(LinearConstraint(saves[None], saved_at_least, np.inf))
  res = milp(costs, constraints=cons, integrality=integrality, bounds=bounds)
  if not res.success:
    return None
  return np.round(res.x).astype(int)


def optimal_plan(specs: Sequence[TableSpec], budget: float, *, max_group: int = 3,
                 multi_hot: Sequence[int] = (), min_saved: int | None = None) -> Plan:
  """Exact planner (integer program, ``scipy.optimize.milp``): groups of 2..``max_group`` (2 or 3) tables,
  the most lookups saved with extra storage <= ``budget`` (fraction of the separate tables' elements),
  ties broken by least storage. Tables of equal (rows, dim) are interchangeable, so the program runs over
  multiplicities of type pairs/triples and stays small for any table count.

  ``min_saved`` asks for at least that many saved lookups at least storage; ``ValueError`` if no plan
  within ``budget`` saves that many (raise ``budget`` or lower ``min_saved``).
  """
  specs = _check_specs(specs)
  check_choice("max_group", max_group, (2, 3))
  cap = _budget_elements(specs, budget)
  hot = set(int(i) for i in multi_hot)
  cand = [i for i in range(len(specs)) if i not in hot]
  types, count, combos = _group_types(specs, cand, cap, max_group)
  if not combos:
    if min_saved:
      raise ValueError(f"no combination of tables fits budget={budget} (extra storage as a fraction of "
                       f"{sum(s.rows * s.dim for s in specs)} elements); raise the budget.")
    return Plan.identity(len(specs))
  if min_saved is not None:
    check_int("min_saved", min_saved, 0)
  x = _milp(count, combos, cap, min_saved)
  if x is None:
    raise ValueError(f"no plan saves {min_saved} lookups within budget={budget}; the most that fits is "
                     f"{len(specs) - plan_report(specs, optimal_plan(specs, budget, max_group=max_group, multi_hot=multi_hot)).lookups}.")
  pool = {t: [i for i in cand if (specs[i].rows, specs[i].dim) == t] for t in types}
  groups = []
  for (combo, _), k in zip(combos, x):
    for _ in range(k):
      groups.append(tuple(pool[types[t]].pop(0) for t in combo))
  return _finish(specs, groups, len(specs))


def frontier(specs: Sequence[TableSpec], planner: str, budgets: Sequence[float], **kw) -> list[dict]:
  """Lookups and storage of one planner's plan at each storage budget (a lookups/storage trade-off curve).

  MicroRec (Jiang et al., MLSys 2021, Sec. 3.2) trades storage for fewer lookups; this sweeps that
  trade-off: for every ``b`` in ``budgets`` it runs ``planner`` with ``budget=b`` (extra storage as a
  fraction of the separate tables' elements) and reports the plan with :func:`plan_report`. Every
  planner here saves at least as many lookups at a larger budget, so the curve is monotone.

  Args:
    specs: the tables (:class:`TableSpec` or ``(rows, dim)`` pairs).
    planner: ``'authors'`` (:func:`authors_plan`), ``'greedy'`` (:func:`greedy_plan`) or ``'optimal'``
      (:func:`optimal_plan`).
    budgets: a non-empty sequence of finite budgets ``>= 0``, in the order to report them.
    **kw: passed to the planner (e.g. ``max_group=2``; ``num_pairs`` for ``'authors'``).

  Returns:
    One dict per budget: ``{'budget': float(b), **plan_report(...)._asdict()}`` (keys ``lookups``,
    ``tables``, ``base_elements``, ``elements``, ``overhead``, ``authors_overhead``).

  Example:
    >>> specs = (TableSpec(3, 2), TableSpec(4, 2), TableSpec(50, 2))
    >>> [(r["budget"], r["lookups"], r["elements"]) for r in frontier(specs, "greedy", [0.0, 0.3])]
    [(0.0, 3, 114), (0.3, 2, 148)]
  """
  check_choice("planner", planner, ("authors", "greedy", "optimal"))
  specs = _check_specs(specs)
  if isinstance(budgets, (str, bytes)) or not hasattr(budgets, "__len__") or len(budgets) == 0:
    raise ValueError(f"budgets must be a non-empty sequence of storage budgets (fractions >= 0), got "
                     f"{budgets!r}; e.g. frontier(specs, planner, [0.0, 0.1, 0.5]).")
  budgets = list(budgets)
  for i, b in enumerate(budgets):
    check_range(f"budgets[{i}]", b, 0.0)
  fn = {"authors": authors_plan, "greedy": greedy_plan, "optimal": optimal_plan}[planner]
  out = []
  for b in budgets:
    r = plan_report(specs, fn(specs, b, **kw))
    out.append({"budget": float(b), **r._asdict()})
  return out


# ----------------------------------------------------------------------------------------------------
# Combination and lookups.

def combine_tables(tables: Sequence[jax.Array]) -> jax.Array:
  """Cartesian product of 2+ tables: row ``combined_index(i, rows)`` is ``concat(t0[i0], t1[i1], ...)``."""
  if len(tables) == 0:
    raise ValueError("combine_tables needs at least one table.")
  rows = [t.shape[0] for t in tables]
  k = len(tables)
  # Concrete tables are combined on the host (a one-off preprocessing step, no per-shape compiles).
  xp = np if all(is_concrete(t) for t in tables) else jnp
  parts = []
  for j, t in enumerate(tables):
    shape = [1] * k + [t.shape[1]]
    shape[j] = rows[j]
    parts.append(xp.broadcast_to(xp.asarray(t).reshape(shape), tuple(rows) + (t.shape[1],)))
  return jnp.asarray(xp.concatenate(parts, axis=-1).reshape(math.prod(rows), -1))


def combined_index(idx: jax.Array, rows: Sequence[int]) -> jax.Array:
  """Mixed-radix row of a combined table: ``idx[..., 0] * prod(rows[1:]) + ... + idx[..., -1]``."""
  out = idx[..., 0]
  for j in range(1, len(rows)):
    out = out * rows[j] + idx[..., j]
  return out


class _Layout(NamedTuple):
  rows: tuple[int, ...]
  dims: tuple[int, ...]
  groups: tuple[tuple[int, ...], ...]
  fuse: str  # "none", "width" or "chunks"
  # per physical table: (buffer id, row offset); buffers are concatenations of equal-width tables, or with
  # fuse="chunks" one buffer of `chunk`-wide rows (offset in chunk rows).
  where: tuple[tuple[int, int], ...]
  chunk: int = 0


@jax.tree_util.register_pytree_node_class
class EmbeddingStage:
  """Physical embedding buffers of a plan (a pytree; the layout is static). Build with :func:`build_stage`."""

  def __init__(self, buffers, layout: _Layout):
    self.buffers = tuple(buffers)
    self.layout = layout

  def tree_flatten(self):
    return self.buffers, self.layout

  @classmethod
  def tree_unflatten(cls, layout, buffers):
    return cls(buffers, layout)

  @property
  def lookups(self) -> int:
    return len(self.layout.groups)

  @property
  def gathers(self) -> int:
    return len(self.buffers)


def init_tables(seed: int, specs: Sequence[TableSpec], dtype=jnp.float32, scale: float = 0.05):
  """Separate tables ``N(0, scale^2)`` of the given specs (a list of jax arrays), drawn on the host with
  numpy (one-off; no per-shape compiles)."""
  specs = _check_specs(specs)
  check_int("seed", seed, 0)
  rng = np.random.default_rng(seed)
  return [jnp.asarray((scale * rng.standard_normal((s.rows, s.dim), dtype=np.float32)).astype(dtype))
          for s in specs]


def build_stage(tables: Sequence[jax.Array], plan: Plan, *, fuse: bool | str = False,
                multi_hot: Sequence[int] = ()) -> EmbeddingStage:
  """Physical tables of ``plan``: each group becomes one Cartesian-product table.

  ``fuse``: ``False`` one gather per physical table (``Plan.identity(n)``: the per-table baseline);
  ``True`` physical tables of equal width concatenated into one buffer (row offsets): one gather per
  distinct width; ``"chunks"``: every physical table cut into rows of ``c = gcd(widths)`` elements and
  all concatenated, so the whole stage is ONE gather of ``width / c`` adjacent chunk rows per table
  (a combined row stays contiguous in memory).
  """
  tables = list(tables)
  for i, t in enumerate(tables):
    if getattr(t, "ndim", None) != 2:
      raise ValueError(f"tables[{i}] must be a (rows, dim) array, got shape {getattr(t, 'shape', None)}.")
  specs = tuple(TableSpec(t.shape[0], t.shape[1]) for t in tables)
  plan = _check_plan(plan, specs, multi_hot)
  phys = [tables[g[0]] if len(g) == 1 else combine_tables([tables[i] for i in g]) for g in plan.groups]
  check_choice("fuse", fuse, (False, True, "chunks"))
  chunk = 0
  if fuse == "chunks":
    chunk = math.gcd(*[int(p.shape[1]) for p in phys])
    wh, off, parts = [], 0, []
    for p in phys:
      wh.append((0, off))
      off += p.shape[0] * (p.shape[1] // chunk)
      parts.append(p.reshape(-1, chunk))
    if off > INDEX_LIMIT:
      raise ValueError(f"chunked buffer would have {off} rows (> int32); use fuse=True.")
    xp = np if all(is_concrete(q) for q in parts) else jnp
    buffers = [jnp.asarray(xp.concatenate([xp.asarray(q) for q in parts], axis=0))]
    where = tuple(wh)
  elif not fuse:
    where = tuple((k, 0) for k in range(len(phys)))
    buffers = phys
  else:
    widths = sorted({p.shape[1] for p in phys})
    members = {w: [k for k, p in enumerate(phys) if p.shape[1] == w] for w in widths}
    wh = [None] * len(phys)
    buffers = []
    for b, w in enumerate(widths):
      off = 0
      for k in members[w]:
        wh[k] = (b, off)
        off += phys[k].shape[0]
      if off > INDEX_LIMIT:
        raise ValueError(f"fused buffer of width {w} would have {off} rows (> int32); use fuse=False.")
      parts = [phys[k] for k in members[w]]
      xp = np if all(is_concrete(q) for q in parts) else jnp
      buffers.append(jnp.asarray(xp.concatenate([xp.asarray(q) for q in parts], axis=0)))
    where = tuple(wh)
  mode = "chunks" if fuse == "chunks" else ("width" if fuse else "none")
  layout = _Layout(tuple(s.rows for s in specs), tuple(s.dim for s in specs), plan.groups, mode, where, chunk)
  return EmbeddingStage(buffers, layout)


def _check_indices(idx, rows, multi_hot_ok):
  if idx.ndim not in (2, 3) or idx.shape[1] != len(rows):
    raise ValueError(f"indices must be (batch, {len(rows)}) one-hot or (batch, {len(rows)}, bag) multi-hot, "
                     f"got shape {idx.shape}.")
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise TypeError(f"indices must be integers, got dtype {idx.dtype}.")
  if idx.ndim == 3 and idx.shape[2] > 1 and not multi_hot_ok:
    raise ValueError("multi-hot indices (batch, tables, bag>1) cannot be looked up in a combined table: a "
                     "Cartesian product holds one row per table. Use a plan without combined groups.")
  if is_concrete(idx):
    a = np.asarray(idx)
    r = np.asarray(rows).reshape((1, -1) + (1,) * (a.ndim - 2))
    bad = (a < 0) | (a >= r)
    if bad.any():
      t = int(np.argwhere(bad)[0][1])
      col = a[:, t]
      raise ValueError(f"index out of range for table {t} ({rows[t]} rows): values in [{col.min()}, "
                       f"{col.max()}]; indices must lie in [0, rows).")


def _as_index_array(idx) -> jax.Array:
  """``idx`` (already checked by :func:`_check_indices`) as a jax array of at least 32 bits: the row counts,
  the combined rows and the offsets are int32 numbers, which a narrower dtype (int8/int16/uint8/uint16) would
  not hold."""
  idx = jnp.asarray(idx)
  return idx.astype(jnp.int32) if jnp.iinfo(idx.dtype).bits < 32 else idx


def pallas_supported(stage: EmbeddingStage) -> bool:
  """Whether :func:`lookup` can run ``stage`` with ``impl="pallas"``: ONE chunk buffer (``fuse="chunks"``)
  of a power-of-two chunk width that divides every table width, under 2^31 elements."""
  lay = stage.layout
  c = lay.chunk
  return (lay.fuse == "chunks" and c > 0 and c & (c - 1) == 0 and all(d % c == 0 for d in lay.dims)
          and int(np.prod(stage.buffers[0].shape)) < 2**31)


PALLAS_KERNELS = ("tile", "tile_direct", "tile_grouped", "tile_ef", "tile_atomic", "rows", "rows_loads_first",
                  "rows_wide")


def _tile_columns(lay: _Layout, grouped: bool = False) -> tuple[np.ndarray, int, int, int]:
  """Static per-column tables of the ``"tile"`` kernels. Tile row ``p`` (``Q = sum(dims) / c`` of them,
  padded to ``L``, a power of two >= the table count) holds output chunk column ``q = out[p]`` (``p``
  itself, or with ``grouped`` the columns in group-major order: the chunks of one combined row adjacent,
  as in memory) and reads chunk row ``base[p] + sum_m clip(idx[:, member[m][p]], 0, rows[m][p] - 1) *
  mult[m][p]`` of the buffer: ``member`` are the raw tables of the column's group (mixed radix, ``mult`` =
  radix stride x the group's chunk width; unused slots of a smaller group have ``mult`` 0), ``base`` the
  group's offset plus the column's chunk within the combined row. Row 0 holds the raw tables' row
  counts (for the out-of-range count, by table). Returns ``(meta int32 (3 + 3 G, L), L, G, Q)``: rows
  0, then ``(member, rows, mult)`` of each slot, ``base``, ``out``."""
  c, rows, dims = lay.chunk, lay.rows, lay.dims
  nt = len(rows)
  ncol = sum(dims) // c
  width = 1 << max(0, (max(ncol, nt) - 1).bit_length())
  gmax = max(len(g) for g in lay.groups)
  meta = np.zeros((3 + 3 * gmax, width), np.int64)
  meta[0, :nt] = rows
  meta[2:2 + 3 * gmax:3] = 1  # rows of unused/padding slots: clip to [0, 0]
  meta[-1] = np.arange(width)
  col = np.concatenate([[0], np.cumsum(dims)]) // c
  for g, (_, off) in zip(lay.groups, lay.where):
    gw = sum(dims[i] for i in g) // c
    strides = [math.prod(rows[i] for i in g[m + 1:]) for m in range(len(g))]
    j = 0
    for i in g:
      for k in range(dims[i] // c):
        q = col[i] + k
        for m in range(gmax):
          if m < len(g):
            meta[1 + 3 * m:4 + 3 * m, q] = (g[m], rows[g[m]], strides[m] * gw)
          else:
            meta[1 + 3 * m:4 + 3 * m, q] = (g[0], 1, 0)
        meta[-2, q] = off + j + k
      j += dims[i] // c
  if grouped:  # tile row p <- output column order[p]
    order = [col[i] + k for g in lay.groups for i in g for k in range(dims[i] // c)]
    order += list(range(ncol, width))
    meta[1:] = meta[1:, order]
  if meta.max() > INDEX_LIMIT:
    raise ValueError("stage too large for int32 chunk rows; use impl='xla'.")
  return meta.astype(np.int32), width, gmax, ncol


def _pallas_lookup(stage: EmbeddingStage, idx: jax.Array, block: int, num_warps: int,
                   interpret: bool | None, kernel: str = "tile", count: str = "total") -> tuple[jax.Array, jax.Array]:
  """The whole stage as ONE Pallas kernel (Triton on GPU, interpreter elsewhere); the per-program
  out-of-range counts are summed by XLA (``count="total"``) or returned as they are (``"partial"``: an
  int32 vector, one entry per program, for a consumer that fuses the sum). Kernels (``kernel``):

  - ``"tile"``: each program takes ``block`` samples as ONE ``(block * L, c)`` tile of output chunk
    columns (``L`` = the column count padded to a power of two, :func:`_tile_columns`): it loads the raw
    indices of every column's group members, clamps them, forms the chunk rows, issues ONE gather load of
    the whole tile (all rows in flight at once) and ONE contiguous store of the samples' output rows.
  - ``"tile_direct"``: the same, but where every chunk column is its own table's only member (the per-table
    plan, every width one chunk) the clamped raw index is the row: no second, dependent index load per column
    (other plans: as ``"tile"``).
  - ``"tile_grouped"``: the same with the tile rows in group-major order (the chunks of a combined row in
    adjacent rows, so one warp instruction can cover the whole row), stored to their output columns.
  - ``"tile_ef"``: the same with the table loads marked evict-first (rows are never reused).
  - ``"tile_atomic"``: the same with the out-of-range count added atomically (only by programs that saw
    one) into a zeroed counter aliased to the output, instead of per-program counts summed by XLA.
  - ``"rows"``: a loop over groups, one ``(block, c)`` load and store per chunk of each group (the first
    version: each store waits for its load before the next load issues).
  - ``"rows_loads_first"``: the same loads, all issued before the first store.
  - ``"rows_wide"``: the same with ONE ``(block, width)`` load per group (a whole combined row, lanes
    padded to a power of two), its lanes stored to their tables' output columns.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  from mlsys_jax._compat import triton_compiler_params
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  lay = stage.layout
  b, nt = idx.shape
  c, rows, dims = lay.chunk, lay.rows, lay.dims
  col = [int(x) for x in np.concatenate([[0], np.cumsum(dims)]) // c]
  nb = min(block, 1 << max(0, (b - 1).bit_length()))
  grid = -(-b // nb)

  def rows_kernel(idx_ref, buf_ref, out_ref, bad_ref):
    pid = pl.program_id(0)
    zero = jnp.zeros((), jnp.int32)
    r = pid * nb + jnp.arange(nb, dtype=jnp.int32)
    valid = r < b
    cnt = jnp.int32(0)
    cl = []
    for t in range(nt):
      v = plgpu.load(idx_ref.at[r * nt + t], mask=valid, other=zero)
      cnt += jnp.sum((((v < 0) | (v >= rows[t])) & valid).astype(jnp.int32))
      cl.append(jnp.clip(v, 0, rows[t] - 1))
    vmask = jnp.broadcast_to(valid[:, None], (nb, c))
    lane = jnp.arange(c, dtype=jnp.int32)[None, :]
    pending = []
    for g, (_, off) in zip(lay.groups, lay.where):
      row = cl[g[0]]
      for i in g[1:]:
        row = row * rows[i] + cl[i]
      row = row * (sum(dims[i] for i in g) // c) + off
      if kernel == "rows_wide":  # the whole combined row in one load, lanes padded to a power of two
        width_g = sum(dims[i] for i in g)
        ln = jnp.arange(1 << (width_g - 1).bit_length(), dtype=jnp.int32)
        dst = ln + col[g[0]] * c  # output element of each lane: member m's lanes go to its own columns
        start = 0
        for i in g:
          dst = jnp.where(ln >= start, ln - start + col[i] * c, dst)
          start += dims[i]
        m = valid[:, None] & (ln < width_g)[None, :]
        x = plgpu.load(buf_ref.at[(row * c)[:, None] + ln[None, :]], mask=m, other=jnp.zeros((), buf_ref.dtype))
        pending.append((x, (r * (col[-1] * c))[:, None] + dst[None, :], m))
        continue
      j = 0
      for i in g:
        for k in range(dims[i] // c):
          x = plgpu.load(buf_ref.at[(row + (j + k))[:, None] * c + lane])
          pending.append((x, (r * col[-1] + (col[i] + k))[:, None] * c + lane, vmask))
          if kernel == "rows":
            plgpu.store(out_ref.at[pending[-1][1]], x, mask=vmask)
        j += dims[i] // c
    if kernel != "rows":  # every load issued before the first store
      for x, where, m in pending:
        plgpu.store(out_ref.at[where], x, mask=m)
    bad_ref[pl.ds(pid, 1)] = jnp.full((1,), cnt, jnp.int32)

  grouped = kernel == "tile_grouped"
  meta, width, gmax, ncol = _tile_columns(lay, grouped)
  # "tile_direct" on a plan whose column q is table q alone: the raw index (already loaded) is the row
  direct = (kernel == "tile_direct" and gmax == 1 and ncol == nt
            and bool((meta[1, :nt] == np.arange(nt)).all()) and bool((meta[2, :nt] == meta[0, :nt]).all()))
  shift = width.bit_length() - 1
  # "tile_ef": the table rows (never reused) evicted first (a cache modifier such as .cg does not lower in
  # jax 0.10's Pallas-Triton: its check and its table disagree on the leading dot)
  hints = dict(eviction_policy="evict_first") if kernel == "tile_ef" and not interpret else {}

  atomic = kernel == "tile_atomic"

  def tile_kernel(meta_ref, idx_ref, buf_ref, *refs):
    out_ref, bad_ref = refs[-2:]  # (with "tile_atomic" the zero count input, aliased to bad_ref, comes first)
    pid = pl.program_id(0)
    zero = jnp.zeros((), jnp.int32)
    i = jnp.arange(nb * width, dtype=jnp.int32)
    q = i & (width - 1)  # output chunk column
    s = pid * nb + (i >> shift)  # sample
    ok = (s < b) & (q < ncol)
    raw = plgpu.load(idx_ref.at[s * nt + q], mask=(s < b) & (q < nt), other=zero)
    lim = plgpu.load(meta_ref.at[q])
    cnt = jnp.sum((((raw < 0) | (raw >= lim)) & (s < b) & (q < nt)).astype(jnp.int32))
    src = plgpu.load(meta_ref.at[(1 + 3 * gmax) * width + q])
    oc = plgpu.load(meta_ref.at[(2 + 3 * gmax) * width + q]) if grouped else q  # output chunk column
    if direct:  # member of column q is table q: its clamped raw index, times the chunk width (mult)
      src = src + jnp.clip(raw, 0, lim - 1) * plgpu.load(meta_ref.at[3 * width + q])
    for m in range(0 if direct else gmax):
      mem = plgpu.load(meta_ref.at[(1 + 3 * m) * width + q])
      rm = plgpu.load(meta_ref.at[(2 + 3 * m) * width + q])
      mult = plgpu.load(meta_ref.at[(3 + 3 * m) * width + q])
      v = plgpu.load(idx_ref.at[s * nt + mem], mask=ok, other=zero)
      src = src + jnp.clip(v, 0, rm - 1) * mult
    lane = jnp.arange(c, dtype=jnp.int32)[None, :]
    tmask = jnp.broadcast_to(ok[:, None], (nb * width, c))
    x = plgpu.load(buf_ref.at[src[:, None] * c + lane], mask=tmask, other=jnp.zeros((), buf_ref.dtype), **hints)
    plgpu.store(out_ref.at[(s * ncol + oc)[:, None] * c + lane], x, mask=tmask)
    if atomic and interpret:  # the interpreter runs programs one after the other (and has no atomics)
      bad_ref[pl.ds(0, 1)] = bad_ref[pl.ds(0, 1)] + cnt
    elif atomic:  # only programs that saw a bad index touch the one counter
      plgpu.atomic_add(bad_ref, 0, cnt, mask=cnt > 0)
    else:
      bad_ref[pl.ds(pid, 1)] = jnp.full((1,), cnt, jnp.int32)

  buf = stage.buffers[0]
  args = (idx.astype(jnp.int32).reshape(-1), buf.reshape(-1))
  tiled = kernel.startswith("tile")
  if tiled:
    args = (jnp.asarray(meta.reshape(-1)),) + args
  aliases = {}
  if atomic:
    args = args + (jnp.zeros((1,), jnp.int32),)
    aliases = {len(args) - 1: 1}
  out, bad = pl.pallas_call(
      tile_kernel if tiled else rows_kernel, grid=(grid,), name=f"microrec_stage_{kernel}",
      out_shape=(jax.ShapeDtypeStruct((b * col[-1] * c,), buf.dtype),
                 jax.ShapeDtypeStruct((1 if atomic else grid,), jnp.int32)),
      input_output_aliases=aliases,
      interpret=interpret, compiler_params=None if interpret else triton_compiler_params(num_warps, 1),
  )(*args)
  out = out.reshape(b, col[-1] * c)
  if count == "partial":
    return out, bad
  return out, (bad[0] if atomic else jnp.sum(bad))


# Launch of the Pallas stage (:func:`lookup`): the fastest in device time at batch 4096 on an H200 (26 Criteo
# tables, d=16, per-table plan: 6.13-6.24 us per stage, count included, in three runs, against 6.50-6.51 us for
# "tile" whose count is summed by a separate XLA reduction; benchmarks/microrec_lookup.py --parts=stage_sweep;
# docs/microrec.md).
PALLAS_DEFAULTS = {"kernel": "tile_atomic", "block": 1, "num_warps": 2}


def lookup(stage: EmbeddingStage, idx: jax.Array, *, impl: str = "xla", block: int | None = None,
           num_warps: int | None = None, kernel: str | None = None,
           interpret: bool | None = None, count: str = "total") -> tuple[jax.Array, jax.Array]:
  """Embeddings of ``idx`` ((batch, tables) int, or (batch, tables, bag) multi-hot summed over the bag
  when no table is combined; any integer dtype, computed in int32 or wider; batch may be 0), concatenated
  in the ORIGINAL table order: (batch, sum(dims)).

  Returns ``(embeddings, num_out_of_range)``. Concrete out-of-range indices raise ``ValueError``; traced
  ones (inside ``jit``) are clamped into their table and counted in ``num_out_of_range`` (int32).

  ``impl="xla"``: XLA gathers (any layout); ``"pallas"``: the whole stage as one Pallas kernel (one-hot,
  a stage with :func:`pallas_supported`; ``kernel`` one of :data:`PALLAS_KERNELS`, ``block`` samples per
  program (a power of two), ``num_warps``; ``None`` takes :data:`PALLAS_DEFAULTS`; Triton on GPU, Pallas's
  interpreter elsewhere or with ``interpret=True``), same output bit for bit.

  ``count="total"``: ``num_out_of_range`` is an int32 scalar; ``"partial"``: an int32 vector whose sum is
  that count (the Pallas stage's per-program counts, shape ``(programs,)``; XLA: shape ``(1,)``), for a
  consumer that fuses the sum into its own work instead of a separate reduction after the stage.
  """
  check_choice("impl", impl, ("xla", "pallas"))
  check_choice("count", count, ("total", "partial"))
  lay = stage.layout
  if is_concrete(idx) and not isinstance(idx, jax.Array):
    idx = np.asarray(idx)  # check before any int64 -> int32 conversion could wrap a value into range
  _check_indices(idx, lay.rows, all(len(g) == 1 for g in lay.groups))
  idx = _as_index_array(idx)
  if impl == "pallas":
    if not pallas_supported(stage) or idx.ndim != 2:
      raise ValueError("impl='pallas' needs one-hot (batch, tables) indices and a stage built with "
                       "fuse='chunks' whose chunk width is a power of two dividing every table width "
                       "(pallas_supported(stage)); use impl='xla'.")
    kernel = PALLAS_DEFAULTS["kernel"] if kernel is None else kernel
    block = PALLAS_DEFAULTS["block"] if block is None else block
    num_warps = PALLAS_DEFAULTS["num_warps"] if num_warps is None else num_warps
    check_choice("kernel", kernel, PALLAS_KERNELS)
    check_int("block", block, 1)
    if block & (block - 1):
      raise ValueError(f"block must be a power of two (Triton tile sizes), got {block}.")
    check_int("num_warps", num_warps, 1)
    if idx.shape[0] == 0:  # nothing to gather (a zero-program grid is not a valid launch)
      empty = jnp.zeros((0, sum(lay.dims)), stage.buffers[0].dtype)
      return empty, (jnp.zeros((1,), jnp.int32) if count == "partial" else jnp.zeros((), jnp.int32))
    return _pallas_lookup(stage, idx, block, num_warps, interpret, kernel, count)
  emb, bad = _xla_lookup(stage, idx)
  return emb, (bad[None] if count == "partial" else bad)


def _xla_lookup(stage: EmbeddingStage, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
  lay = stage.layout
  rows = jnp.asarray(lay.rows, idx.dtype).reshape((1, -1) + (1,) * (idx.ndim - 2))
  bad = jnp.sum((idx < 0) | (idx >= rows)).astype(jnp.int32)
  idx = jnp.clip(idx, 0, rows - 1).astype(jnp.int32)
  bag = idx.ndim == 3
  # row of each group in its physical table, then in its buffer
  grows = []
  for g, (b, off) in zip(lay.groups, lay.where):
    r = combined_index(idx[:, list(g)] if not bag else idx[:, list(g)].transpose(0, 2, 1),
                       [lay.rows[i] for i in g]) if len(g) > 1 else idx[:, g[0]]
    grows.append(r + off if off and not lay.chunk else r)
  out_g = [None] * len(lay.groups)
  if lay.chunk:  # one gather of adjacent chunk rows
    gw = [sum(lay.dims[i] for i in g) // lay.chunk for g in lay.groups]
    cols = [(r * m + off)[..., None] + jnp.arange(m, dtype=jnp.int32)
            for r, m, (_, off) in zip(grows, gw, lay.where)]
    v = jnp.take(stage.buffers[0], jnp.concatenate(cols, axis=-1), axis=0, mode="clip")
    if bag:
      v = v.sum(1)
    v = v.reshape(v.shape[0], sum(gw) * lay.chunk)  # explicit width: -1 is undefined for an empty batch
    c = 0
    for k, m in enumerate(gw):
      out_g[k] = v[:, c:c + m * lay.chunk]
      c += m * lay.chunk
  for b, buf in enumerate(stage.buffers if not lay.chunk else ()):
    ks = [k for k, (bb, _) in enumerate(lay.where) if bb == b]
    if len(ks) == 1:
      v = jnp.take(buf, grows[ks[0]], axis=0, mode="clip")
      if bag:
        v = v.sum(1)
      out_g[ks[0]] = v
    else:
      r = jnp.stack([grows[k] for k in ks], axis=1)  # (batch, n[, bag])
      v = jnp.take(buf, r, axis=0, mode="clip")
      if bag:
        v = v.sum(2)
      for j, k in enumerate(ks):
        out_g[k] = v[:, j]
  # back to the original table order (static column split)
  pieces = {}
  for g, v in zip(lay.groups, out_g):
    c = 0
    for i in g:
      pieces[i] = v[:, c:c + lay.dims[i]]
      c += lay.dims[i]
  return jnp.concatenate([pieces[i] for i in range(len(lay.rows))], axis=-1), bad


# ----------------------------------------------------------------------------------------------------
# Tables sharded across the devices of one host.

def balanced_placement(sizes: Sequence[int], num_devices: int) -> tuple[tuple[int, ...], ...]:
  """LPT: place items (physical tables, by bytes) largest first on the least-loaded device. Returns the
  items of each device (4/3-approximation of the optimal makespan)."""
  check_int("num_devices", num_devices, 1)
  load = [0] * num_devices
  out: list[list[int]] = [[] for _ in range(num_devices)]
  for k in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
    d = min(range(num_devices), key=lambda d: (load[d], d))
    out[d].append(k)
    load[d] += int(sizes[k])
  return tuple(tuple(sorted(o)) for o in out)


@jax.tree_util.register_pytree_node_class
class ShardedStage:
  """Physical tables of a :class:`Plan` spread over devices whole (MicroRec, Jiang et al., MLSys 2021:
  combined tables placed on memory channels; here on devices). A pytree; build with :func:`shard_stage`.

  Attributes:
    buffers: (devices, rows_per_device, width): device ``d``'s physical tables stacked along rows, each
      zero-padded to the widest table's width, then zero rows up to ``rows_per_device``.
    offsets: int32 (devices, slots): row of ``buffers[d]`` where slot ``s``'s table starts (0 for empty
      slots).
    slot_group: static tuple per device of one group id (index into ``layout.groups``) per slot, or -1
      for an empty slot; every group appears exactly once.
    layout: the static layout of the unsharded stage (:func:`build_stage`).
  """

  def __init__(self, buffers, offsets, slot_group, layout: _Layout):
    if isinstance(buffers, (jax.Array, np.ndarray)) and isinstance(offsets, (jax.Array, np.ndarray)):
      # Checked on arrays (also tracers); skipped for the placeholders jax.tree_util may pass.
      if buffers.ndim != 3 or offsets.ndim != 2 or buffers.shape[0] != offsets.shape[0]:
        raise ValueError(f"ShardedStage: buffers must be (devices, rows, width) and offsets (devices, slots) "
                         f"with the same devices, got {buffers.shape} and {offsets.shape}; build it with "
                         "shard_stage.")
      sg = tuple(tuple(int(k) for k in row) for row in slot_group)
      if len(sg) != offsets.shape[0] or any(len(row) != offsets.shape[1] for row in sg):
        raise ValueError(f"ShardedStage: slot_group must hold one group id (or -1) per (device, slot) of "
                         f"offsets {offsets.shape}, got {slot_group}.")
      ids = sorted(k for row in sg for k in row if k >= 0)
      if ids != list(range(len(layout.groups))):
        raise ValueError(f"ShardedStage: slot_group must place each of the {len(layout.groups)} groups "
                         f"exactly once, got group ids {ids}.")
    self.buffers = buffers  # (devices, rows_per_device, width)
    self.offsets = offsets  # (devices, slots) row offset of each slot's table
    self.slot_group = slot_group
    self.layout = layout

  def tree_flatten(self):
    return (self.buffers, self.offsets), (self.slot_group, self.layout)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)


def shard_stage(tables: Sequence[jax.Array], plan: Plan, num_devices: int) -> ShardedStage:
  """Physical tables of ``plan`` placed whole on ``num_devices`` devices (:func:`balanced_placement` on
  bytes), each device's tables concatenated and zero-padded to the widest table."""
  stage = build_stage(tables, plan)
  phys = stage.buffers
  place = balanced_placement([p.size for p in phys], num_devices)
  width = max(p.shape[1] for p in phys)
  slots = max(1, max(len(p) for p in place))
  rows_dev = max(1, max(sum(phys[k].shape[0] for k in p) for p in place))
  bufs, offs, slot_group = [], [], []
  for p in place:
    parts, off, o = [], [], 0
    for k in p:
      t = phys[k]
      parts.append(jnp.pad(t, ((0, 0), (0, width - t.shape[1]))))
      off.append(o)
      o += t.shape[0]
    parts.append(jnp.zeros((rows_dev - o, width), phys[0].dtype))
    bufs.append(jnp.concatenate(parts, 0))
    offs.append(off + [0] * (slots - len(p)))
    slot_group.append(tuple(p) + (-1,) * (slots - len(p)))
  return ShardedStage(jnp.stack(bufs), jnp.asarray(offs, jnp.int32), tuple(slot_group), stage.layout)


def sharded_lookup(sh: ShardedStage, idx: jax.Array, mesh, axis_name: str) -> tuple[jax.Array, jax.Array]:
  """:func:`lookup` with the physical tables spread over ``mesh``'s ``axis_name`` (one table per device
  slot, indices replicated): each device gathers its tables' rows, one ``all_gather`` brings them together.
  Same output and out-of-range rule as :func:`lookup`. ``idx``: one-hot, (batch, tables) or (batch, tables, 1),
  any integer dtype; multi-hot bags are not supported here (sum them with :func:`lookup` on an unsharded stage)."""
  from jax.sharding import PartitionSpec as P

  from mlsys_jax.comm.distributed import shard_map
  lay = sh.layout
  if is_concrete(idx) and not isinstance(idx, jax.Array):
    idx = np.asarray(idx)  # check before any int64 -> int32 conversion could wrap a value into range
  if getattr(idx, "ndim", None) == 3 and idx.shape[2] != 1:
    raise ValueError(f"sharded_lookup takes one-hot indices, (batch, {len(lay.rows)}) or (batch, {len(lay.rows)}, "
                     f"1), got shape {idx.shape} (a bag of {idx.shape[2]}); sum multi-hot bags with lookup() on an "
                     "unsharded stage (build_stage).")
  _check_indices(idx, lay.rows, False)
  idx = _as_index_array(idx)
  if idx.ndim == 3:
    idx = idx[:, :, 0]
  rows = jnp.asarray(lay.rows, idx.dtype)[None]
  bad = jnp.sum((idx < 0) | (idx >= rows)).astype(jnp.int32)
  idx = jnp.clip(idx, 0, rows - 1).astype(jnp.int32)
  grows = jnp.stack([combined_index(idx[:, list(g)], [lay.rows[i] for i in g]) if len(g) > 1 else idx[:, g[0]]
                     for g in lay.groups], axis=1)  # (batch, groups)
  ndev = sh.buffers.shape[0]
  if mesh.shape[axis_name] != ndev:
    raise ValueError(f"stage was sharded for {ndev} devices but mesh axis '{axis_name}' has "
                     f"{mesh.shape[axis_name]}.")
  sel = np.array([[max(g, 0) for g in s] for s in sh.slot_group], np.int32)  # (devices, slots)
  slot_rows = jnp.take(grows, jnp.asarray(sel.reshape(-1)), axis=1).reshape(idx.shape[0], ndev, sel.shape[1])
  slot_rows = slot_rows.transpose(1, 0, 2)  # (devices, batch, slots)

  def local(buf, off, r):
    v = jnp.take(buf[0], r[0] + off[0][None, :], axis=0, mode="clip")  # (batch, slots, width)
    return jax.lax.all_gather(v, axis_name)  # (devices, batch, slots, width)

  spec = P(axis_name)
  g = shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=P(), check=False)(
      sh.buffers, sh.offsets, slot_rows)
  pieces = {}
  for d, slots in enumerate(sh.slot_group):
    for s, k in enumerate(slots):
      if k < 0:
        continue
      c = 0
      for i in lay.groups[k]:
        pieces[i] = g[d, :, s, c:c + lay.dims[i]]
        c += lay.dims[i]
  return jnp.concatenate([pieces[i] for i in range(len(lay.rows))], axis=-1), bad


# ----------------------------------------------------------------------------------------------------
# Model and data.

class DLRM(nn.Module):
  """DLRM / wide&deep style model (Naumov et al. 2019; MicroRec's section 2 workloads): bottom MLP on the
  dense features, embeddings from an :class:`EmbeddingStage` (an input, so any plan or lookup path plugs
  in), ``interaction='dot'`` (pairwise dots of the bottom output and every table's vector; all widths
  equal to ``bottom[-1]``) or ``'concat'`` (wide&deep: concatenate), then the top MLP (one logit).
  ``__call__(stage, dense, idx)`` returns ``(logits (batch,), num_out_of_range)``."""
  bottom: Sequence[int] = (64, 16)
  top: Sequence[int] = (64, 32)
  interaction: str = "dot"
  lookup_impl: str = "xla"  # :func:`lookup`'s ``impl``

  @nn.compact
  def __call__(self, stage: EmbeddingStage, dense: jax.Array, idx: jax.Array):
    check_choice("interaction", self.interaction, ("dot", "concat"))
    x = dense
    for h in self.bottom:
      x = nn.relu(nn.Dense(h)(x))
    emb, bad = lookup(stage, idx, impl=self.lookup_impl)
    if self.interaction == "dot":
      dims = set(stage.layout.dims)
      if dims != {x.shape[-1]}:
        raise ValueError(f"dot interaction needs every table width == bottom[-1] ({x.shape[-1]}), got "
                         f"widths {sorted(dims)}; use interaction='concat' or bottom=(..., width).")
      emb = emb.reshape(emb.shape[0], len(stage.layout.dims), x.shape[-1])  # explicit: the batch may be empty
      z = jnp.concatenate([x[:, None, :], emb], axis=1)
      dots = jnp.einsum("bid,bjd->bij", z, z)
      iu, ju = np.triu_indices(z.shape[1], k=1)
      feats = jnp.concatenate([x, dots[:, iu, ju]], axis=-1)
    else:
      feats = jnp.concatenate([x, emb], axis=-1)
    for h in self.top:
      feats = nn.relu(nn.Dense(h)(feats))
    return nn.Dense(1)(feats)[:, 0], bad


class Server:
  """Serving entry point of a :class:`DLRM`: one device call per request batch, numpy in, numpy out.

  What a call costs at small batch is mostly not the lookups: on the H200 86-96% of a batch-1 DLRM call is
  host work (dispatch, argument handling, the host<->device copies of the request and the result), the
  model's kernels ~20-25 us. The server makes the call itself cheap, for any ``plan``:

  - all physical tables of ``plan`` in ONE buffer (``build_stage(..., fuse="chunks")``: gcd-wide chunk rows
    with row offsets; a combined row stays contiguous), the only large argument;
  - MLP weights ``weights="constants"`` closed over (compiled into the executable, no argument),
    ``"packed"`` one flat buffer (``ravel_pytree``) or ``"pytree"`` passed as is (for comparison);
  - dense features and raw per-table indices travel as ONE int32 array (dense bit-cast), the combined-row
    arithmetic (mixed radix + offsets) runs on the device, and the logits and the out-of-range count come
    back as ONE int32 array (one device->host copy). Batches above ``pack_max_batch`` (64) travel as two
    arrays instead: there packing costs a host copy of the request (on the H200 host a packed 4096-row
    request took ~190 us longer than the same model called with two arrays) while one more transfer costs
    little next to its size;
  - ``output_memory="auto"`` (default): on a GPU the program writes its one result array straight into
    pinned host memory (``out_shardings`` with ``memory_kind="pinned_host"``), so no separate
    device->host copy follows the call: on the H200 host a tiny jitted call with numpy input took 118 us
    that way against 217 us with ``np.asarray`` of a device result (``benchmarks/host_roundtrip.py``).
    ``"device"``: a device result (as before; the default on CPU), ``"pinned_host"``: force it
    (``server.output_memory`` says which is used; a backend without pinned host memory falls back to
    ``"device"`` under ``"auto"`` and raises under ``"pinned_host"``);
  - ``impl="xla"`` (default): XLA gathers; ``"pallas"``: the embedding stage as ONE Pallas kernel
    (:func:`lookup` ``impl="pallas"``); ``"auto"``: Pallas on a GPU when it passes a self-test against the
    XLA gathers at construction, else XLA (``server.impl`` says which ran, ``server.fallback`` why not
    Pallas). On the H200 the Pallas stage cut the model's kernel time per batch-1 call (19.4 vs 25.4 us)
    but not the wall time of a call (142 vs 131 us with XLA), hence the default.

  ``server(dense, idx)`` returns ``(logits float32 (batch,), num_out_of_range)``; indices out of range raise
  ``ValueError`` naming the table (``on_bad="raise"``, checked from the count the device returns, so the
  good path pays nothing) or are clamped and counted (``on_bad="count"``). ``server.call(packed)`` is the
  device function alone (input from :meth:`pack`, output a device array; :meth:`unpack` splits it).

  Example:
    >>> import jax, numpy as np
    >>> from mlsys_jax.infer import microrec as mr
    >>> specs = [mr.TableSpec(r, 4) for r in (3, 5, 40)]
    >>> tables = mr.init_tables(0, specs)
    >>> model = mr.DLRM(bottom=(8, 4), top=(8,))
    >>> dense, idx = mr.synthetic_batch(0, specs, 2, num_dense=3)
    >>> variables = model.init(jax.random.PRNGKey(0), mr.build_stage(tables, mr.Plan.identity(3)), dense, idx)
    >>> server = mr.Server(model, variables, tables, mr.Plan(((0, 1), (2,))), num_dense=3)
    >>> logits, bad = server(dense, idx)
    >>> ref, _ = model.apply(variables, mr.build_stage(tables, mr.Plan.identity(3)), dense, idx)
    >>> bool(np.allclose(logits, ref, rtol=1e-5, atol=1e-6)), bad, server.lookups
    (True, 0, 2)
  """

  def __init__(self, model: DLRM, variables, tables: Sequence[jax.Array] | EmbeddingStage, plan: Plan | None = None,
               *, num_dense: int, weights: str = "constants", on_bad: str = "raise", impl: str = "xla",
               pack_max_batch: int = 64, output_memory: str = "auto"):
    from jax.flatten_util import ravel_pytree
    if not isinstance(model, DLRM):
      raise TypeError(f"model must be a microrec.DLRM, got {type(model).__name__}.")
    check_int("num_dense", num_dense, 0)
    check_choice("weights", weights, ("constants", "packed", "pytree"))
    check_choice("on_bad", on_bad, ("raise", "count"))
    check_int("pack_max_batch", pack_max_batch, 0)
    self.pack_max_batch = pack_max_batch
    if isinstance(tables, EmbeddingStage):  # a stage built with fuse="chunks" (shared between servers)
      if tables.layout.fuse != "chunks" or plan is not None:
        raise ValueError("pass either (tables, plan) or one stage built with build_stage(..., fuse='chunks') "
                         "and plan=None.")
      self.stage = tables
    else:
      if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a microrec.Plan, got {type(plan).__name__}.")
      self.stage = build_stage(tables, plan, fuse="chunks")
    self.table = self.stage.buffers[0]
    check_choice("impl", impl, ("auto", "xla", "pallas"))
    self.fallback = ""
    if impl == "auto":
      impl, self.fallback = self._choose_impl()
    self.impl = impl
    model = model.clone(lookup_impl=impl)
    self.num_dense, self.weights, self.on_bad = num_dense, weights, on_bad
    self.rows = np.asarray(self.stage.layout.rows, np.int64)
    layout, nd = self.stage.layout, num_dense
    if weights == "constants":
      const = jax.tree.map(np.asarray, variables)
      self.weight_args: tuple = ()
      params_of = lambda: const
    elif weights == "packed":
      flat, unravel = ravel_pytree(variables)
      self.weight_args = (flat,)
      params_of = unravel
    else:
      self.weight_args = (variables,)
      params_of = lambda v: v

    def run(table, w, dense, idx):
      logits, bad = model.apply(params_of(*w), EmbeddingStage([table], layout), dense, idx)
      return jnp.concatenate([jax.lax.bitcast_convert_type(logits.astype(jnp.float32), jnp.int32), bad[None]])

    def device_call(table, *rest):
      *w, x = rest
      return run(table, w, jax.lax.bitcast_convert_type(x[:, :nd], jnp.float32), x[:, nd:])

    def device_call_split(table, *rest):
      *w, dense, idx = rest
      return run(table, w, dense, idx)

    self.device_call = device_call  # (table, *weight_args, packed) -> int32 (batch + 1,); traceable
    check_choice("output_memory", output_memory, ("auto", "device", "pinned_host"))
    requested = output_memory
    if output_memory == "auto":
      output_memory = "pinned_host" if jax.default_backend() == "gpu" else "device"
    out_sh = None
    if output_memory == "pinned_host":
      dev = next(iter(self.table.devices()))
      out_sh = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
      try:  # a tiny program with the same output placement, run once: a backend without the memory kind fails
        # here, for the packed and the split program alike (both only differ in their inputs)
        np.asarray(jax.jit(lambda x: x + 1, out_shardings=out_sh)(np.zeros((2,), np.int32)))
      except Exception as e:  # noqa: BLE001 - any failure: no pinned output on this backend
        if requested == "pinned_host":
          raise ValueError(f"output_memory='pinned_host' is not supported here ({type(e).__name__}: "
                           f"{str(e)[:200]}); use output_memory='device' or 'auto'.") from e
        output_memory, out_sh = "device", None
    self.output_memory = output_memory
    self._fn = jax.jit(device_call, out_shardings=out_sh)
    self._fn_split = jax.jit(device_call_split, out_shardings=out_sh)

  def _choose_impl(self) -> tuple[str, str]:
    if jax.default_backend() != "gpu":
      return "xla", "not a GPU (the Pallas kernel would run in the interpreter)"
    if not pallas_supported(self.stage):
      return "xla", "stage layout not supported by the Pallas kernel (pallas_supported)"
    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(-1, r + 1, 257) for r in self.stage.layout.rows], 1).astype(np.int32)
    try:
      got = jax.jit(lambda st, i: lookup(st, i, impl="pallas"))(self.stage, idx)
      ref = jax.jit(lookup)(self.stage, idx)
      same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, ref))
    except Exception as e:  # noqa: BLE001 - any lowering/compile failure means: use XLA
      return "xla", f"Pallas kernel failed: {type(e).__name__}: {str(e)[:200]}"
    return ("pallas", "") if same else ("xla", "Pallas kernel differs from the XLA gathers on the self-test")

  @property
  def lookups(self) -> int:
    return self.stage.lookups

  def pack(self, dense, idx) -> np.ndarray:
    """``(batch, num_dense + tables)`` int32: dense float32 bits, then the raw per-table indices."""
    dense, idx = self._prepare(dense, idx)
    return np.concatenate((dense.view(np.int32), idx), axis=1)

  def _prepare(self, dense, idx) -> tuple[np.ndarray, np.ndarray]:
    dense = np.asarray(dense, np.float32)
    idx = np.asarray(idx)
    nt = len(self.rows)
    if dense.ndim != 2 or dense.shape[1] != self.num_dense:
      raise ValueError(f"dense must be (batch, {self.num_dense}), got shape {dense.shape}.")
    if idx.shape != (dense.shape[0], nt):
      raise ValueError(f"indices must be (batch, {nt}) one-hot with batch {dense.shape[0]}, got {idx.shape}.")
    if idx.dtype != np.int32:
      if idx.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}.")
      if idx.size and (idx.min() < 0 or idx.max() > INDEX_LIMIT):
        self._raise_bad(idx)  # would wrap in int32
      idx = idx.astype(np.int32)
    return dense, idx

  def call(self, packed) -> jax.Array:
    """The device function: ``packed`` from :meth:`pack` -> int32 ``(batch + 1,)`` (logit bits, count)."""
    return self._fn(self.table, *self.weight_args, packed)

  @staticmethod
  def unpack(out) -> tuple[np.ndarray, int]:
    """Host ``(logits float32, num_out_of_range)`` of a :meth:`call` result (one device->host copy)."""
    out = np.asarray(out)
    return out[:-1].view(np.float32), int(out[-1])

  def _raise_bad(self, idx):
    bad = (idx < 0) | (idx >= self.rows[None])
    t = int(np.argwhere(bad)[0][1])
    raise ValueError(f"index out of range for table {t} ({self.rows[t]} rows): values in "
                     f"[{idx[:, t].min()}, {idx[:, t].max()}]; indices must lie in [0, rows).")

  def __call__(self, dense, idx) -> tuple[np.ndarray, int]:
    d, i = self._prepare(dense, idx)
    if d.shape[0] <= self.pack_max_batch:  # one host->device copy instead of two
      out = self._fn(self.table, *self.weight_args, np.concatenate((d.view(np.int32), i), axis=1))
    else:  # large batch: packing would cost a host copy of the whole request; send both arrays as they are
      out = self._fn_split(self.table, *self.weight_args, d, i)
    logits, bad = self.unpack(out)
    if bad and self.on_bad == "raise":
      self._raise_bad(np.asarray(idx))
    return logits, bad


def synthetic_batch(seed: int, specs: Sequence[TableSpec], batch: int, *, num_dense: int = 13,
                    zipf: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Synthetic inputs (no download): dense features N(0, 1) (batch, num_dense) float32 and indices
  (batch, tables) int32, uniform or, with ``zipf=a`` (> 0), bounded Zipf: P(rank k) ~ k^-a (continuous
  inverse-CDF approximation), ranks scattered over the table by a fixed bijection ``k -> k*p mod rows``."""
  specs = _check_specs(specs)
  check_int("batch", batch, 1)
  check_int("num_dense", num_dense, 0)
  if zipf is not None:
    check_range("zipf", zipf, 0.0, low_inclusive=False)
  rng = np.random.default_rng(seed)
  dense = rng.standard_normal((batch, num_dense)).astype(np.float32)
  cols = []
  for s in specs:
    if zipf is None:
      cols.append(rng.integers(0, s.rows, batch))
      continue
    u = rng.random(batch)
    n = float(s.rows)
    if abs(zipf - 1.0) < 1e-9:
      k = np.power(n + 1, u)
    else:
      e = 1.0 - zipf
      k = np.power(((n + 1) ** e - 1.0) * u + 1.0, 1.0 / e)
    k = np.clip(np.floor(k).astype(np.int64) - 1, 0, s.rows - 1)
    p = 1_000_003
    while math.gcd(p, s.rows) != 1:
      p += 2
    cols.append((k * p) % s.rows)
  return dense, np.stack(cols, axis=1).astype(np.int32)
