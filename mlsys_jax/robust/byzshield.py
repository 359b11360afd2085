"""ByzShield: redundant task assignment, majority vote and robust aggregation against Byzantine workers.

Konstantinidis and Ramamoorthy, "ByzShield: An Efficient and Robust System for Distributed Training",
MLSys 2021. A batch is split into ``f`` files; each file is processed by ``r`` workers (``r`` odd) and each
of the ``K`` workers processes ``l`` files (``K l = f r``). The server first takes a majority vote over the
``r`` copies of every file's gradient, then applies a robust aggregator to the ``f`` winners. A file is
*distorted* when at least ``r' = (r + 1) / 2`` of its copies come from Byzantine workers. An omniscient
adversary chooses the ``q`` workers that distort the most files, ``c_max(q)``; ByzShield's assignments,
built from mutually orthogonal Latin squares (MOLS) or Ramanujan bigraphs, keep ``eps = c_max / f``
small because any two workers share at most one file (Sec. 3-4).

Everything here is pure: assignments are static numpy structures; the vote, the aggregators and the
attacks are jit-able functions on pytrees whose leaves are stacked along a leading axis. Pass
``axis_name`` to run them inside ``shard_map`` with the *coordinates* of the gradients sharded over
devices (each device holds a slice of every worker's gradient): the vote and the distance-based
aggregators then reduce over devices with ``psum``.

When exact voting is safe: the vote compares copies bit for bit by default, which is right only when
honest copies of a file are bit-identical: the same file batch, the same parameters, the same compiled
program on the same kind of device, and deterministic kernels (XLA on CPU; on GPU set
``--xla_gpu_deterministic_ops=true``, since atomics in scatter-adds/segment sums and autotuned
convolution algorithms can change the last bits from run to run and device to device). Otherwise pass
``rtol``/``atol`` to :func:`majority_vote`: two copies then agree when every coordinate is within the
tolerance. A copy that wins only by agreeing with Byzantine copies within the tolerance is at most that
far from an honest one. A file whose copies have no strict majority (honest copies that disagree, or a
tie under even replication) is not decided by worker order: the vote falls back to the coordinate-wise
median of the ``r`` copies (with at most ``r' - 1`` Byzantine copies the median lies inside the range of
the honest values) and can report those files (``return_no_majority=True``).

Non-finite values (a Byzantine worker may send NaN/inf): the vote compares bit patterns, so NaN copies
are equal to each other and lose the vote to an honest majority; coordinate-wise aggregators treat NaN as
+inf, so such values sort to the extreme and are trimmed; Krum/Bulyan give a gradient with any
non-finite entry an infinite score, so it is never selected; the plain mean propagates them (it is not
robust).
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax._checks import check_choice, check_int, check_range

__all__ = [
    "Assignment",
    "ATTACKS",
    "AGGREGATORS",
    "aggregate",
    "apply_attack",
    "baseline_assignment",
    "bulyan",
    "byzshield_assignment",
    "coordinate_median",
    "detox_assignment",
    "distorted_files",
    "files_to_workers",
    "majority_vote",
    "mean",
    "mols_assignment",
    "multi_krum",
    "ramanujan_assignment",
    "robust_step",
    "sign_majority",
    "spectral_bound",
    "trimmed_mean",
    "worst_case_distortion",
]


# ----------------------------------------------------------------------------------------------------
# Task assignments.


class Assignment(NamedTuple):
  """A worker-to-file bipartite map.

  Attributes:
    matrix: ``(K, f)`` 0/1 numpy array, ``matrix[w, j] = 1`` iff worker ``w`` processes file ``j``.
    worker_files: ``(K, l)`` file ids of each worker, increasing.
    file_workers: ``(f, r)`` ``(worker, slot)`` pairs holding each file, shape ``(f, r, 2)``.
    name: a short description.

  Example:
    >>> a = mols_assignment(5, 3)
    >>> a.name, a.num_workers, a.num_files, a.load, a.replication, a.majority
    ('MOLS(l=5, r=3)', 15, 25, 5, 3, 2)
  """
  matrix: np.ndarray
  worker_files: np.ndarray
  file_workers: np.ndarray
  name: str

  @property
  def num_workers(self) -> int:
    return self.matrix.shape[0]

  @property
  def num_files(self) -> int:
    return self.matrix.shape[1]

  @property
  def replication(self) -> int:
    return int(self.matrix[:, 0].sum())

  @property
  def load(self) -> int:
    return int(self.matrix[0].sum())

  @property
  def majority(self) -> int:
    """r' = (r + 1) // 2: Byzantine copies needed to win a file's vote."""
    return (self.replication + 1) // 2


def _from_matrix(m: np.ndarray, name: str) -> Assignment:
  m = np.asarray(m, np.int8)
  rows, cols = m.sum(1), m.sum(0)
  if len(set(rows.tolist())) != 1 or len(set(cols.tolist())) != 1:
    raise ValueError(f"{name}: the assignment must be biregular (every worker l files, every file r "
                     f"workers), got worker degrees {sorted(set(rows))} and file degrees {sorted(set(cols))}.")
  r = int(cols[0])
  if r >= 2 and r % 2 == 0:
    warnings.warn(f"{name}: even replication r={r}: r/2 Byzantine copies already tie the vote of a file, "
                  f"so a file is lost with r' = {r // 2} bad copies (distorted_files counts ties as lost; "
                  "majority_vote resolves them with the median of the copies). An odd r protects better "
                  f"at the same cost, e.g. r={r - 1} or r={r + 1}.", UserWarning, stacklevel=3)
  worker_files = np.stack([np.flatnonzero(row) for row in m])
  slot = {(w, j): s for w in range(m.shape[0]) for s, j in enumerate(worker_files[w])}
  file_workers = np.stack([np.array([(w, slot[w, j]) for w in np.flatnonzero(m[:, j])])
                           for j in range(m.shape[1])])
  return Assignment(m, worker_files, file_workers, name)


def _is_prime(n: int) -> bool:
  return n >= 2 and all(n % d for d in range(2, int(math.isqrt(n)) + 1))


def mols_assignment(l: int, r: int) -> Assignment:
  """ByzShield's MOLS assignment (Sec. 4.1): K = r l workers, f = l^2 files, load l, replication r.

  The Latin squares ``L_k(i, j) = (k i + j) mod l`` for ``k = 1..r`` are mutually orthogonal when ``l`` is
  prime; file ``i l + j`` is cell ``(i, j)`` and worker ``(k, s)`` processes the ``l`` cells of square ``k``
  holding symbol ``s``. Exists for prime ``l`` and ``1 <= r <= l - 1``.

  Example:
    >>> a = mols_assignment(5, 3)                            # K = 15 workers, f = 25 files
    >>> overlap = a.matrix.astype(int) @ a.matrix.T.astype(int)
    >>> int((overlap - np.diag(np.diag(overlap))).max())     # two workers share at most one file
    1
  """
  check_int("l", l, 2)
  check_int("r", r, 1)
  if not _is_prime(l):
    raise ValueError(f"mols_assignment needs a prime l (the cyclic MOLS construction), got l={l}; "
                     "prime l in 3, 5, 7, 11, ... give K = r l workers and f = l^2 files.")
  if r > l - 1:
    raise ValueError(f"only l - 1 = {l - 1} mutually orthogonal Latin squares of order {l} exist; "
                     f"r={r} is too large.")
  m = np.zeros((r * l, l * l), np.int8)
  i, j = np.meshgrid(np.arange(l), np.arange(l), indexing="ij")
  for k in range(1, r + 1):
    square = (k * i + j) % l
    for s in range(l):
      m[(k - 1) * l + s, (i * l + j)[square == s]] = 1
  return _from_matrix(m, f"MOLS(l={l}, r={r})")


def ramanujan_assignment(s: int, m: int) -> Assignment:
  """ByzShield's Ramanujan-bigraph assignment (Sec. 4.2), from the array ``B`` whose ``(i, j)`` block is
  ``P^(i j)`` (``P`` the ``s x s`` cyclic shift, ``P[a, a + 1 mod s] = 1``), ``i < s``, ``j < m``; ``B`` is
  ``s^2 x m s``, every row has ``m`` ones and every column ``s`` (the array-code construction of unbalanced
  Ramanujan bigraphs of Burnwal, Sinha and Vidyasagar, arXiv:1910.03937, "Deterministic Completion of
  Rectangular Matrices Using Ramanujan Bigraphs -- II", the reference of the official code).

  - Case 1, ``m < s``: workers are the columns of ``B`` (the assignment is ``B^T``): K = m s, f = s^2,
    l = s, r = m. Worker ``(j, c)`` holds the files ``(i, c - i j mod s)``, ``i < s``; two workers of
    different block columns share exactly one file, of the same block column none (the parameters and
    the sharing pattern of MOLS with l = s, r = m).
  - Case 2, ``m >= s`` and ``s | m``: workers are the rows of ``B``: K = s^2, f = m s, l = m, r = s.
    Worker ``(i, a)`` holds the files ``(j, a + i j mod s)``, ``j < m``; two workers of different block
    rows share exactly ``m / s`` files, of the same block row none. Since ``P^s = I``, block column
    ``j + s`` equals block column ``j``: for ``m = k s`` the matrix is ``k`` side-by-side copies of the
    ``m = s`` one, so for ``k >= 2`` each worker set holds ``k`` files (the columns repeat) and
    ``c_max(q)`` is exactly ``k`` times that of ``m = s`` (same eps, ``k`` times the load). This is the
    paper's construction (and the official code's ``rama_two``), kept as is; ``m = s`` is the setting
    the paper evaluates (K = f = 25, l = r = 5) and the only case-2 one in which workers share at most
    one file.

  In both cases the worker Gram matrix ``A A^T`` has eigenvalues ``l r`` (once), ``l`` and 0, so the
  second singular value of the biadjacency matrix is ``sqrt(l)``, within the Ramanujan bound
  ``sqrt(l - 1) + sqrt(r - 1)`` (``2 sqrt(d - 1)`` when l = r = d) exactly when ``r >= 2``; and
  ``mu_1 = 1 / r`` for :func:`spectral_bound`.

  Exists for prime ``s`` (with composite ``s`` two workers can share more files, e.g. s=4, m=3) and
  ``m >= 2`` (``m = 1`` gives ``s`` workers with disjoint files: r = 1 in case 1, no redundancy, and not
  a Ramanujan bigraph). (The official code's ``P`` is the transpose, ``P[a, a - 1 mod s] = 1``; that only
  reorders the block rows ``i -> -i mod s``, i.e. relabels files in case 1 and workers in case 2.)

  Example:
    >>> a = ramanujan_assignment(5, 3)                       # case 1: K = m s, f = s^2, l = s, r = m
    >>> a.name, a.num_workers, a.num_files, a.load, a.replication
    ('Ramanujan(s=5, m=3, case 1)', 15, 25, 5, 3)
    >>> b = ramanujan_assignment(5, 5)                       # case 2: K = s^2, f = m s, l = m, r = s
    >>> b.name, b.num_workers, b.num_files, b.load, b.replication
    ('Ramanujan(s=5, m=5, case 2)', 25, 25, 5, 5)
  """
  check_int("s", s, 2)
  check_int("m", m, 1)
  if not _is_prime(s):
    raise ValueError(f"ramanujan_assignment needs a prime s, got s={s}.")
  if m < 2:
    raise ValueError(f"ramanujan_assignment needs m >= 2, got m={m}: m = 1 gives s workers with disjoint "
                     "files (replication r = 1, no vote) and its biadjacency matrix is not a Ramanujan "
                     "bigraph (second singular value sqrt(s) > sqrt(s - 1)).")
  if m >= s and m % s:
    raise ValueError(f"case 2 (m >= s) needs s | m, got s={s}, m={m}; use m < s (case 1) or a multiple "
                     f"of s such as m={s * (m // s)} or m={s * (m // s + 1)}.")
  b = np.zeros((s * s, m * s), np.int8)
  a = np.arange(s)
  for i in range(s):
    for j in range(m):
      b[i * s + a, j * s + (a + i * j) % s] = 1
  mat = b.T if m < s else b
  return _from_matrix(mat, f"Ramanujan(s={s}, m={m}, case {1 if m < s else 2})")


def detox_assignment(num_workers: int, r: int) -> Assignment:
  """DETOX (Rajput et al., 2019): disjoint groups of ``r`` consecutive workers, one file per group.

  Example:
    >>> a = detox_assignment(15, 3)                          # 5 groups of 3 workers, one file each
    >>> a.num_files, a.worker_files[:4].ravel().tolist()
    (5, [0, 0, 0, 1])
  """
  check_int("num_workers", num_workers, 1)
  check_int("r", r, 1)
  if num_workers % r:
    raise ValueError(f"DETOX needs r | K, got K={num_workers}, r={r}.")
  m = np.zeros((num_workers, num_workers // r), np.int8)
  m[np.arange(num_workers), np.arange(num_workers) // r] = 1
  return _from_matrix(m, f"DETOX(K={num_workers}, r={r})")


def baseline_assignment(num_workers: int) -> Assignment:
  """No redundancy: worker ``w`` processes file ``w`` (r = l = 1).

  Example:
    >>> a = baseline_assignment(4)
    >>> a.name, a.replication, a.load
    ('baseline(K=4)', 1, 1)
  """
  check_int("num_workers", num_workers, 1)
  return _from_matrix(np.eye(num_workers, dtype=np.int8), f"baseline(K={num_workers})")


def byzshield_assignment(kind: str, **params) -> Assignment:
  """Build an assignment by name: ``'mols'`` (l, r), ``'ramanujan'`` (s, m), ``'detox'``
  (num_workers, r) or ``'baseline'`` (num_workers).

  Example:
    >>> byzshield_assignment("mols", l=5, r=3).name, byzshield_assignment("detox", num_workers=15, r=3).name
    ('MOLS(l=5, r=3)', 'DETOX(K=15, r=3)')
  """
  makers = {"mols": mols_assignment, "ramanujan": ramanujan_assignment, "detox": detox_assignment,
            "baseline": baseline_assignment}
  check_choice("kind", kind, makers)
  return makers[kind](**params)


# ----------------------------------------------------------------------------------------------------
# Worst-case adversary.


def distorted_files(assignment: Assignment, byzantine: np.ndarray) -> np.ndarray:
  """Boolean ``(..., f)``: the files whose vote Byzantine workers win, from a ``(..., K)`` 0/1 mask.

  Example:
    >>> byz = np.zeros(15, bool); byz[[0, 1]] = True          # two workers of DETOX's first group
    >>> lost = lambda a: int(distorted_files(a, byz).sum())
    >>> lost(detox_assignment(15, 3)), lost(mols_assignment(5, 3))
    (1, 0)
  """
  byz = np.asarray(byzantine)
  if byz.shape[-1] != assignment.num_workers:
    raise ValueError(f"byzantine must be a (..., K={assignment.num_workers}) mask, got shape {byz.shape}.")
  return (byz.astype(np.int32) @ assignment.matrix.astype(np.int32)) >= assignment.majority


def worst_case_distortion(assignment: Assignment, q: int, *, exact: bool | None = None,
                          max_subsets: int = 30_000_000, restarts: int = 64, seed: int = 0
                          ) -> tuple[int, np.ndarray]:
  """c_max(q): the most files ``q`` colluding workers can distort, and one worst set.

  ``exact=True`` enumerates all C(K, q) subsets (vectorized in chunks). ``exact=False`` is a heuristic
  local search, not a greedy construction: from each of ``restarts`` uniformly random q-subsets (drawn
  with ``seed``) it swaps one chosen worker for one unchosen worker, taking the first swap that strictly
  increases the number of distorted files, until no single swap does; it returns the best of these
  local optima, a lower bound on c_max. By default the exact search runs when C(K, q) <= ``max_subsets``.

  Returns:
    ``(c_max, workers)``; ``eps = c_max / f``.

  Example:
    >>> c_max, workers = worst_case_distortion(mols_assignment(5, 3), 3)   # exact search over C(15, 3) sets
    >>> c_max, workers.tolist()                                           # eps = 3 / 25
    (3, [0, 5, 11])
  """
  k = assignment.num_workers
  check_int("q", q, 0)
  if q >= k:
    raise ValueError(f"q={q} Byzantine workers must be fewer than K={k}.")
  if q == 0:
    return 0, np.zeros((0,), np.int64)
  n_sub = math.comb(k, q)
  if exact is None:
    exact = n_sub <= max_subsets
  a = assignment.matrix.astype(np.int16)
  rp = assignment.majority
  if exact:
    best, best_set = -1, None
    it = itertools.combinations(range(k), q)
    while True:
      chunk = np.fromiter(itertools.chain.from_iterable(itertools.islice(it, 200_000)), np.int64)
      if chunk.size == 0:
        break
      idx = chunk.reshape(-1, q)
      counts = a[idx].sum(1)                      # (n, f)
      dist = (counts >= rp).sum(1)
      i = int(np.argmax(dist))
      if dist[i] > best:
        best, best_set = int(dist[i]), idx[i].copy()
    return best, best_set
  rng = np.random.default_rng(seed)

  def score(mask):
    return int(((mask.astype(np.int16) @ a) >= rp).sum())

  best, best_set = -1, None
  for _ in range(restarts):
    mask = np.zeros(k, bool)
    mask[rng.choice(k, q, replace=False)] = True
    improved = True
    while improved:
      improved = False
      cur = score(mask)
      ins, outs = np.flatnonzero(mask), np.flatnonzero(~mask)
      for i in ins:
        for o in outs:
          mask[i], mask[o] = False, True
          s = score(mask)
          if s > cur:
            cur, improved = s, True
            break
          mask[i], mask[o] = True, False
        if improved:
          break
    s = score(mask)
    if s > best:
      best, best_set = s, np.flatnonzero(mask)
  return best, best_set


def spectral_bound(assignment: Assignment, q: int) -> float:
  """ByzShield's spectral upper bound on c_max(q) (Sec. 5) from the second eigenvalue mu_1 of H H^T,
  H = A / sqrt(l r): with beta = (q l / r) / (mu_1 + (1 - mu_1) q / K),
  c_max <= (q l - beta) / (r' - 1), where r' - 1 = (r - 1) / 2 for odd r. (A distorted file takes at
  least r' of the q l edges of the Byzantine workers and every other file they touch at least one; under
  even replication a tie is lost, so r' = r / 2 and the divisor is r / 2 - 1, not (r - 1) / 2.)

  Example:
    >>> round(spectral_bound(mols_assignment(5, 3), 3), 3)   # >= c_max(3) = 3
    4.286
  """
  a = assignment.matrix.astype(np.float64)
  k, l, r = assignment.num_workers, assignment.load, assignment.replication
  if r < 3:
    raise ValueError("the spectral bound needs replication r >= 3.")
  check_int("q", q, 0, k)
  if q == 0:
    return 0.0
  h = a / np.sqrt(l * r)
  ev = np.sort(np.linalg.eigvalsh(h @ h.T))[::-1]
  mu1 = float(ev[1])
  beta = (q * l / r) / (mu1 + (1 - mu1) * q / k)
  return (q * l - beta) / (assignment.majority - 1)


# ----------------------------------------------------------------------------------------------------
# Vote and aggregation (pure, jit-able, pytrees stacked on a leading axis).


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _bits(x):
  """Bit pattern of a float array (so NaN == NaN and +0 != -0 exactly as sent)."""
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[jnp.dtype(x.dtype).itemsize]
  return jax.lax.bitcast_convert_type(x, width)


def files_to_workers(file_grads: Any, assignment: Assignment) -> Any:
  """Honest worker stacks ``(K, l, ...)`` from per-file gradients ``(f, ...)``: every worker sends the
  gradient of each of its files (replicas of a file are bit-identical).

  Example:
    >>> a = mols_assignment(5, 3)
    >>> stacks = files_to_workers(jnp.arange(25.0)[:, None], a)   # file j's gradient is [j]
    >>> stacks.shape, stacks[0, :, 0].tolist()                    # worker 0 holds files 0, 9, 13, 17, 21
    ((15, 5, 1), [0.0, 9.0, 13.0, 17.0, 21.0])
  """
  idx = jnp.asarray(assignment.worker_files)
  return jax.tree_util.tree_map(lambda g: g[idx], file_grads)


def majority_vote(worker_grads: Any, assignment: Assignment, axis_name: str | None = None, *,
                  rtol: float = 0.0, atol: float = 0.0, fallback: str = "median",
                  return_no_majority: bool = False) -> Any:
  """Per-file majority vote over the r copies (ByzShield Sec. 3, stage 1).

  Two copies agree when their bit patterns are equal (default: exact voting, safe only for
  bit-identical honest copies, see the module docstring) or, with a tolerance, when every coordinate
  is bit-identical or finite in both with ``|a - b| <= atol + rtol * max(|a|, |b|)`` (so an inf copy
  never agrees with a finite one through ``rtol * inf``). The winner is the copy that agrees with the most
  copies (itself included); it is taken when that count is a strict majority (``> r / 2``). Otherwise
  (honest copies that do not agree, or a tie under even replication) ``fallback='median'`` returns the
  coordinate-wise median of the ``r`` copies (NaN sorted as +inf) and ``fallback='first'`` the first
  most-agreed copy (the rule of the paper's exact vote, which then depends on worker order).

  Args:
    worker_grads: pytree with leaves ``(K, l, ...)``: worker ``w``'s gradient for its ``s``-th file
      (files in increasing id order, ``assignment.worker_files``).
    assignment: the assignment.
    axis_name: mapped axis over which the *coordinates* are sharded (agreement is then global).
    rtol: relative tolerance (>= 0), e.g. ``1e-5`` for float32 gradients from nondeterministic
      reductions.
    atol: absolute tolerance (>= 0), for coordinates near zero whose relative error is large after
      cancellation (in the units of the gradient).
    fallback: ``'median'`` or ``'first'``, for files without a strict majority.
    return_no_majority: also return the ``(f,)`` bool mask of files without a strict majority.

  Returns:
    Pytree with leaves ``(f, ...)`` (and the mask when ``return_no_majority``).

  Example:
    >>> a = mols_assignment(5, 3)
    >>> w = files_to_workers({"g": jnp.arange(50.0).reshape(25, 2)}, a)
    >>> voted = majority_vote(w, a, rtol=1e-5)
    >>> bool(jnp.all(voted["g"] == jnp.arange(50.0).reshape(25, 2)))
    True
  """
  check_range("rtol", rtol, 0.0)
  check_range("atol", atol, 0.0)
  check_choice("fallback", fallback, ("median", "first"))
  fw = jnp.asarray(assignment.file_workers)          # (f, r, 2)
  k = assignment.num_workers
  if not jax.tree_util.tree_leaves(worker_grads):
    raise ValueError("worker_grads is an empty pytree.")
  for leaf in jax.tree_util.tree_leaves(worker_grads):
    if leaf.shape[:2] != (k, assignment.load):
      raise ValueError(f"worker gradients must be stacked as (K, l, ...) = ({k}, {assignment.load}, ...), "
                       f"got a leaf of shape {leaf.shape}.")
  copies = jax.tree_util.tree_map(lambda g: g[fw[..., 0], fw[..., 1]], worker_grads)  # (f, r, ...)
  leaves = jax.tree_util.tree_leaves(copies)
  r = assignment.replication
  flat = [c.reshape(c.shape[0], r, -1) for c in leaves]
  exact = rtol == 0.0 and atol == 0.0

  def mismatch(c, i, j):
    bi, bj = _bits(c[:, i]), _bits(c[:, j])
    same = bi == bj
    if not exact:
      ct = jnp.promote_types(c.dtype, jnp.float32)          # float64 stays float64 (no false agreement)
      a, b = c[:, i].astype(ct), c[:, j].astype(ct)
      tol = atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))
      # only finite values agree within a tolerance: with rtol > 0 an inf copy has tol = inf and would
      # "agree" with every honest copy (non-finite copies agree only bit for bit, above)
      same = same | (jnp.isfinite(a) & jnp.isfinite(b) & (jnp.abs(a - b) <= tol))
    return jnp.sum(~same, axis=-1, dtype=jnp.int32)

  # Mismatch counts of every pair of copies, one fused compare-and-count per pair (no (f, r, r, d) array).
  pair = {}
  for i in range(r):
    for j in range(i + 1, r):
      pair[i, j] = sum(mismatch(c, i, j) for c in flat)
  zero = jnp.zeros((flat[0].shape[0],), jnp.int32)
  diff = jnp.stack([jnp.stack([zero if i == j else pair[min(i, j), max(i, j)] for j in range(r)], -1)
                    for i in range(r)], -2)                                 # (f, r, r)
  diff = _psum(diff, axis_name)
  agree = jnp.sum(diff == 0, axis=-1)                     # copies that agree with copy i
  winner = jnp.argmax(agree, axis=-1)                     # (f,)
  rows = jnp.arange(winner.shape[0])
  no_majority = jnp.max(agree, axis=-1) <= r // 2         # no strict majority
  voted = jax.tree_util.tree_map(lambda c: c[rows, winner], copies)
  if fallback == "median":

    def use_median(voted):
      def one(v, c):
        med = jnp.median(_sanitize(c), axis=1).astype(c.dtype)
        return jnp.where(no_majority.reshape((-1,) + (1,) * (v.ndim - 1)), med, v)
      return jax.tree_util.tree_map(one, voted, copies)

    # Usually every file has a majority: skip the sort then (the flag is global under axis_name).
    voted = jax.lax.cond(jnp.any(no_majority), use_median, lambda v: v, voted)
  return (voted, no_majority) if return_no_majority else voted


def _sanitize(x):
  return jnp.where(jnp.isnan(x), jnp.inf, x)


def mean(grads: Any, axis_name: str | None = None) -> Any:
  """Plain average over the leading axis (not robust; the baseline).

  Example:
    >>> mean(jnp.array([[1.0], [2.0], [3.0], [100.0]])).tolist()    # one outlier moves it far
    [26.5]
  """
  del axis_name
  return jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)


def coordinate_median(grads: Any, axis_name: str | None = None) -> Any:
  """Coordinate-wise median over the leading axis (NaN treated as +inf).

  Example:
    >>> coordinate_median(jnp.array([[1.0], [2.0], [3.0], [100.0], [jnp.nan]])).tolist()   # NaN sorts as +inf
    [3.0]
  """
  del axis_name
  return jax.tree_util.tree_map(lambda g: jnp.median(_sanitize(g), axis=0), grads)


def trimmed_mean(grads: Any, trim: int, axis_name: str | None = None) -> Any:
  """Coordinate-wise mean after dropping the ``trim`` largest and ``trim`` smallest values.

  Example:
    >>> trimmed_mean(jnp.array([[1.0], [2.0], [3.0], [100.0], [jnp.nan]]), 1).tolist()     # mean of 2, 3, 100
    [35.0]
  """
  del axis_name

  def one(g):
    n = g.shape[0]
    if not 0 <= 2 * trim < n:
      raise ValueError(f"trim={trim} must satisfy 0 <= 2 trim < n = {n}.")
    s = jnp.sort(_sanitize(g), axis=0)
    return jnp.mean(s[trim:n - trim], axis=0)

  return jax.tree_util.tree_map(one, grads)


def sign_majority(grads: Any, axis_name: str | None = None) -> Any:
  """signSGD with majority vote (Bernstein et al., 2019): sign of the sum of the signs.

  Example:
    >>> sign_majority(jnp.array([[1.0, -2.0], [3.0, -1.0], [-5.0, -3.0]])).tolist()
    [1.0, -1.0]
  """
  del axis_name
  return jax.tree_util.tree_map(lambda g: jnp.sign(jnp.sum(jnp.sign(jnp.nan_to_num(g)), axis=0)), grads)


def _pairwise_sq_dists(grads, axis_name):
  total = 0
  finite = True
  for g in jax.tree_util.tree_leaves(grads):
    x = g.reshape(g.shape[0], -1).astype(jnp.promote_types(g.dtype, jnp.float32))   # float64 stays
    ok = jnp.all(jnp.isfinite(x), axis=1)
    x = jnp.where(jnp.isfinite(x), x, 0.0)
    # Distances are translation invariant: centre on the coordinate-wise median (local to each coordinate
    # slice under axis_name) so |x|^2 + |y|^2 - 2 x.y does not cancel catastrophically when the gradients
    # share a large common component (float32 would round their small differences away).
    x = x - jnp.median(x, axis=0)
    sq = jnp.sum(x * x, axis=1)
    total = total + sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    finite = finite & ok
  total = _psum(total, axis_name)
  finite = _psum((~finite).astype(jnp.int32), axis_name) == 0
  total = jnp.maximum(total, 0.0)
  bad = ~(finite[:, None] & finite[None, :])
  return jnp.where(bad, jnp.inf, total), finite


def _krum_scores(d, num_byzantine):
  n = d.shape[0]
  m = n - num_byzantine - 2
  if m < 1:
    raise ValueError(f"Krum needs n - b - 2 >= 1, got n={n}, b={num_byzantine}.")
  d = d + jnp.diag(jnp.full((n,), jnp.inf))
  closest = jnp.sort(d, axis=1)[:, :m]
  return jnp.sum(closest, axis=1)


def multi_krum(grads: Any, num_byzantine: int, num_selected: int | None = None,
               axis_name: str | None = None) -> Any:
  """Multi-Krum (Blanchard et al., 2017): average the ``num_selected`` gradients with the lowest Krum
  scores (sum of squared distances to their ``n - b - 2`` nearest neighbours).
  ``num_selected`` defaults to ``n - b``.

  Example:
    >>> g = jnp.array([[1.0, 0.0], [1.1, 0.1], [0.9, -0.1], [1.0, 0.05], [50.0, -50.0]])
    >>> np.asarray(multi_krum(g, 1), float).round(3).tolist()    # the outlier is never selected
    [1.0, 0.013]
  """
  d, _ = _pairwise_sq_dists(grads, axis_name)
  n = d.shape[0]
  m = n - num_byzantine if num_selected is None else num_selected
  check_int("num_selected", m, 1, n)
  scores = _krum_scores(d, num_byzantine)
  sel = jnp.argsort(scores)[:m]
  return jax.tree_util.tree_map(lambda g: jnp.mean(g[sel], axis=0), grads)


def bulyan(grads: Any, num_byzantine: int, axis_name: str | None = None) -> Any:
  """Bulyan (El Mhamdi et al., 2018): pick theta = n - 2b gradients by repeated Krum, then per coordinate
  average the beta = theta - 2b values closest to the median. Needs n >= 4b + 3.

  Example:
    >>> g = jnp.concatenate([jnp.linspace(0.9, 1.1, 6)[:, None], jnp.array([[40.0]])])   # n = 7 = 4b + 3
    >>> np.asarray(jax.jit(bulyan, static_argnums=1)(g, 1), float).round(3).tolist()   # jit: one compile
    [0.98]
  """
  d, _ = _pairwise_sq_dists(grads, axis_name)
  n = d.shape[0]
  b = num_byzantine
  theta = n - 2 * b
  beta = theta - 2 * b
  if beta < 1 or n - b - 2 < 1:
    raise ValueError(f"Bulyan needs n >= 4b + 3, got n={n}, b={b}.")
  chosen = jnp.zeros((n,), bool)
  order = []
  for _ in range(theta):  # static loop: Krum on the remaining gradients
    mask = chosen[:, None] | chosen[None, :]
    dd = jnp.where(mask, jnp.inf, d)
    rem = n - len(order)
    mm = max(rem - b - 2, 1)
    dd = dd + jnp.diag(jnp.full((n,), jnp.inf))
    scores = jnp.sum(jnp.sort(dd, axis=1)[:, :mm], axis=1)
    scores = jnp.where(chosen, jnp.inf, scores)
    i = jnp.argmin(scores)
    order.append(i)
    chosen = chosen.at[i].set(True)
  sel = jnp.stack(order)

  def one(g):
    s = _sanitize(g[sel])
    med = jnp.median(s, axis=0)
    idx = jnp.argsort(jnp.abs(s - med), axis=0)[:beta]
    return jnp.mean(jnp.take_along_axis(s, idx, axis=0), axis=0)

  return jax.tree_util.tree_map(one, grads)


AGGREGATORS = ("mean", "median", "trimmed_mean", "multi_krum", "bulyan", "sign")


def aggregate(grads: Any, method: str, *, num_byzantine: int = 0, trim: int | None = None,
              axis_name: str | None = None) -> Any:
  """Dispatch to a robust aggregator by name (see :data:`AGGREGATORS`).

  Example:
    >>> g = jnp.array([[1.0, 0.0], [1.1, 0.1], [0.9, -0.1], [1.0, 0.05], [50.0, -50.0]])
    >>> agg = lambda method: np.asarray(aggregate(g, method), float).round(3).tolist()
    >>> agg("median"), agg("mean")
    ([1.0, 0.0], [10.8, -9.99])
  """
  check_choice("method", method, AGGREGATORS)
  if method == "mean":
    return mean(grads)
  if method == "median":
    return coordinate_median(grads)
  if method == "trimmed_mean":
    return trimmed_mean(grads, num_byzantine if trim is None else trim)
  if method == "multi_krum":
    return multi_krum(grads, num_byzantine, axis_name=axis_name)
  if method == "bulyan":
    return bulyan(grads, num_byzantine, axis_name=axis_name)
  return sign_majority(grads)


# ----------------------------------------------------------------------------------------------------
# Attacks.

ATTACKS = ("alie", "constant", "reversed", "random", "nan")


def apply_attack(worker_grads: Any, byzantine: jax.Array, attack: str, *, key: jax.Array | None = None,
                 z: float = 1.0, scale: float = 100.0) -> Any:
  """Replace the gradients of Byzantine workers (``byzantine``: ``(K,)`` bool) by an attack.

  Colluding Byzantine workers send identical values for the same file, so they can win votes.

  - ``'alie'`` (A Little Is Enough, Baruch et al. 2019): mu + z sigma, with the coordinate-wise mean and
    std over all honest and Byzantine copies (z = 1 as in ByzShield's code);
  - ``'constant'``: every entry ``-scale``;
  - ``'reversed'``: ``-scale`` times the honest gradient;
  - ``'random'``: Gaussian noise of std ``scale`` (one draw per file id: needs ``key``);
  - ``'nan'``: NaN everywhere (a crashing worker).

  Example:
    >>> grads = files_to_workers(jnp.ones((5, 1)), detox_assignment(15, 3))    # (K=15, l=1, 1)
    >>> byz = jnp.zeros(15, bool).at[jnp.array([0, 1])].set(True)
    >>> apply_attack(grads, byz, "constant")[:4, 0, 0].tolist()        # -scale from the Byzantine ones
    [-100.0, -100.0, 1.0, 1.0]
  """
  check_choice("attack", attack, ATTACKS)
  byz = jnp.asarray(byzantine)
  ks = sorted({leaf.shape[0] for leaf in jax.tree_util.tree_leaves(worker_grads)})
  if len(ks) != 1:
    raise ValueError(f"worker_grads leaves must share the leading worker axis K, got sizes {ks}.")
  if byz.shape != (ks[0],):
    raise ValueError(f"byzantine must be a ({ks[0]},) bool mask, one entry per worker, got shape "
                     f"{byz.shape}.")

  def one(i, g):
    shape = (-1,) + (1,) * (g.ndim - 1)
    mask = byz.reshape(shape)
    if attack == "alie":
      flat = g.reshape((-1,) + g.shape[2:])
      bad = jnp.broadcast_to(jnp.mean(flat, 0) + z * jnp.std(flat, 0), g.shape)
    elif attack == "constant":
      bad = jnp.full_like(g, -scale)
    elif attack == "reversed":
      bad = -scale * g
    elif attack == "nan":
      bad = jnp.full_like(g, jnp.nan)
    else:
      if key is None:
        raise ValueError("attack='random' needs a PRNG key.")
      k = jax.random.fold_in(key, i)
      # one draw per (file slot) so colluders agree: noise depends on the file, not on the worker
      bad = scale * jax.random.normal(k, g.shape[1:], g.dtype)[None]
      bad = jnp.broadcast_to(bad, g.shape)
    return jnp.where(mask, bad.astype(g.dtype), g)

  leaves, treedef = jax.tree_util.tree_flatten(worker_grads)
  return jax.tree_util.tree_unflatten(treedef, [one(i, g) for i, g in enumerate(leaves)])


def robust_step(file_grads: Any, assignment: Assignment, byzantine: jax.Array, *, attack: str,
                aggregator: str, num_byzantine_files: int = 0, key: jax.Array | None = None,
                vote: bool = True, vote_rtol: float = 0.0, vote_atol: float = 0.0) -> Any:
  """One server step of simulated redundant training: honest copies -> attack -> vote -> aggregate.

  Args:
    file_grads: per-file gradients, leaves ``(f, ...)`` (e.g. ``jax.vmap(grad_fn)`` over file batches).
    assignment: worker-to-file map.
    byzantine: ``(K,)`` bool mask of Byzantine workers.
    attack: one of :data:`ATTACKS`.
    aggregator: one of :data:`AGGREGATORS` (applied to the voted file gradients, or to all copies if
      ``vote=False``).
    num_byzantine_files: the ``b`` of Krum/Bulyan/trimmed mean (e.g. c_max for ByzShield).
    key: PRNG key for random attacks.
    vote: majority-vote first (ByzShield, DETOX) or aggregate the ``K l`` copies directly.
    vote_rtol, vote_atol: tolerances of :func:`majority_vote` (0 = exact bits).

  Example:
    >>> a, g = mols_assignment(5, 3), jnp.ones((25, 2))            # every honest file gradient is [1, 1]
    >>> byz = jnp.zeros(15, bool).at[jnp.array([0, 5])].set(True)        # they win the vote of one file
    >>> robust_step(g, a, byz, attack="constant", aggregator="median").tolist()
    [1.0, 1.0]
    >>> no_vote = robust_step(g, a, byz, attack="constant", aggregator="mean", vote=False)   # all 75 copies
    >>> np.asarray(no_vote, float).round(2).tolist()
    [-12.47, -12.47]
  """
  f = assignment.num_files
  for leaf in jax.tree_util.tree_leaves(file_grads):
    if leaf.ndim < 1 or leaf.shape[0] != f:
      raise ValueError(f"file_grads leaves must be stacked as (f, ...) = ({f}, ...), got shape {leaf.shape}.")
  if jnp.shape(byzantine) != (assignment.num_workers,):
    raise ValueError(f"byzantine must be a ({assignment.num_workers},) bool mask, one entry per worker of "
                     f"{assignment.name}, got shape {jnp.shape(byzantine)}.")
  workers = files_to_workers(file_grads, assignment)
  workers = apply_attack(workers, byzantine, attack, key=key)
  if vote:
    voted = majority_vote(workers, assignment, rtol=vote_rtol, atol=vote_atol)
  else:
    voted = jax.tree_util.tree_map(lambda g: g.reshape((-1,) + g.shape[2:]), workers)
  return aggregate(voted, aggregator, num_byzantine=num_byzantine_files)
