"""Versioned, compressed dataset of (optimized HLO, measured runtime) records, and a TpuGraphs loader.

Our format (``np.savez_compressed``, ``format_version`` = 1): one row per compiled program variant.
HLO text (metadata stripped) is stored as UTF-8 bytes concatenated in ``hlo_bytes`` with ``hlo_offsets``
(P + 1), so the parser can be re-run as it evolves. Per row: ``group`` (variants of one program share
it), ``family``, ``variant``, ``config`` (JSON of the program's hyperparameters), ``runtime_s``
(median), ``runtime_iqr_s``, ``runtime_min_s``, ``n_inner``, ``n_rounds``, ``noisy``, XLA's
``flops``/``bytes_accessed``/``transcendentals`` and ``compile_s``; ``meta`` is a JSON string (device,
versions, dispatch floor, measured peak rates).

TpuGraphs (Phothilimthana et al., 2023, google-research-datasets/tpu_graphs) stores one graph per npz:
``node_feat`` (n, 140) float32, ``node_opcode`` (n,) uint8, ``edge_index`` (m, 2) int where row
``[u, v]`` means node u consumes node v's output, and either tile-collection keys ``config_feat``
(c, 24), ``config_runtime`` (c,), ``config_runtime_normalizers`` (c,), or layout-collection keys
``node_config_feat`` (c, nc, 18), ``node_config_ids`` (nc,), ``node_splits``, ``config_runtime`` (c,).
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence

import numpy as np

FORMAT_VERSION = 1

_REQUIRED = ("hlo_bytes", "hlo_offsets", "group", "family", "variant", "runtime_s")


class CostDataset(NamedTuple):
  """Rows of a collected dataset (numpy arrays of length P, plus ``meta`` dict)."""
  hlo: list[str]
  group: np.ndarray
  family: np.ndarray
  variant: np.ndarray
  config: np.ndarray
  runtime_s: np.ndarray
  runtime_iqr_s: np.ndarray
  runtime_min_s: np.ndarray
  n_inner: np.ndarray
  n_rounds: np.ndarray
  noisy: np.ndarray
  flops: np.ndarray
  bytes_accessed: np.ndarray
  transcendentals: np.ndarray
  compile_s: np.ndarray
  meta: dict

  def __len__(self) -> int:
    return len(self.hlo)

  def select(self, mask_or_index) -> "CostDataset":
    idx = np.arange(len(self))[mask_or_index]
    fields = {f: getattr(self, f)[idx] for f in self._fields if f not in ("hlo", "meta")}
    return CostDataset(hlo=[self.hlo[i] for i in idx], meta=self.meta, **fields)


def timing_orders(n: int, rounds: int, rng: np.random.Generator) -> np.ndarray:
  """Order in which ``n`` variants of one program are timed in each of ``rounds`` rounds.

  A fixed order biases the collection: on the H100 dataset, 187 programs whose ``default`` and
  ``autotune0`` compilations are one program (timed in that order in every round) differ by more than
  5% in 70% of them, ``autotune0`` (always second) usually the faster. Here every block of ``n`` rounds
  is the ``n`` cyclic rotations of a fresh random permutation, in random order: within a complete block
  each variant is timed exactly once at each position, and which variant precedes which changes from
  block to block. A last incomplete block takes the first rotations of its shuffled list.

  Returns an int array of shape ``(rounds, n)``; row ``k`` is a permutation of ``range(n)``.

  >>> o = timing_orders(3, 6, np.random.default_rng(0))
  >>> o.shape, sorted(o[0].tolist())
  ((6, 3), [0, 1, 2])
  >>> [sorted(np.bincount(o[:3, j], minlength=3).tolist()) for j in range(3)]  # each position: once each
  [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
  """
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"timing_orders: n must be a positive int (number of variants), got {n!r}.")
  if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
    raise ValueError(f"timing_orders: rounds must be an int >= 0, got {rounds!r}.")
  out = []
  while len(out) < rounds:
    base = rng.permutation(n)
    for s in rng.permutation(n):
      out.append(np.roll(base, -int(s)))
  return np.asarray(out[:rounds], np.int64).reshape(rounds, n)


def save_dataset(path: str, rows: Sequence[dict], meta: dict) -> None:
  """Write rows (dicts with ``hlo`` and the fields of :class:`CostDataset`) to a compressed npz."""
  texts = [r["hlo"].encode("utf-8") for r in rows]
  offsets = np.cumsum([0] + [len(t) for t in texts]).astype(np.int64)
  col = lambda k, dt, d=0: np.asarray([r.get(k, d) for r in rows], dt)
  tmp = path + ".tmp.npz"
  np.savez_compressed(
      tmp, format_version=np.int32(FORMAT_VERSION),
      hlo_bytes=np.frombuffer(b"".join(texts), np.uint8), hlo_offsets=offsets,
      group=col("group", np.int32), family=np.asarray([r["family"] for r in rows], str),
      variant=np.asarray([r["variant"] for r in rows], str),
      config=np.asarray([r.get("config", "{}") for r in rows], str),
      runtime_s=col("runtime_s", np.float64, np.nan), runtime_iqr_s=col("runtime_iqr_s", np.float64, np.nan),
      runtime_min_s=col("runtime_min_s", np.float64, np.nan), n_inner=col("n_inner", np.int32),
      n_rounds=col("n_rounds", np.int32), noisy=col("noisy", bool, False),
      flops=col("flops", np.float64), bytes_accessed=col("bytes_accessed", np.float64),
      transcendentals=col("transcendentals", np.float64), compile_s=col("compile_s", np.float64),
      meta=np.asarray(json.dumps(meta)))
  os.replace(tmp, path)


def load_dataset(path: str) -> CostDataset:
  """Read a dataset written by :func:`save_dataset` (checks the format version and required keys)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no cost dataset at {path!r}; collect one with experiments/cost_collect.py.")
  with np.load(path, allow_pickle=False) as z:
    missing = [k for k in _REQUIRED if k not in z.files]
    if missing:
      raise ValueError(f"{path!r} is not a cost dataset: missing keys {missing}.")
    ver = int(z["format_version"]) if "format_version" in z.files else 0
    if ver != FORMAT_VERSION:
      raise ValueError(f"{path!r} has format_version {ver}; this code reads {FORMAT_VERSION}.")
    raw, off = z["hlo_bytes"].tobytes(), z["hlo_offsets"]
    hlo = [raw[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]
    get = lambda k: z[k]
    return CostDataset(
        hlo=hlo, group=get("group"), family=get("family"), variant=get("variant"), config=get("config"),
        runtime_s=get("runtime_s"), runtime_iqr_s=get("runtime_iqr_s"), runtime_min_s=get("runtime_min_s"),
        n_inner=get("n_inner"), n_rounds=get("n_rounds"), noisy=get("noisy"), flops=get("flops"),
        bytes_accessed=get("bytes_accessed"), transcendentals=get("transcendentals"),
        compile_s=get("compile_s"), meta=json.loads(str(z["meta"])))


# ------------------------------------------------------------------------------------------------
# TpuGraphs.

class TpuGraphsExample(NamedTuple):
  """One TpuGraphs npz graph. ``edge_index[i] = [u, v]``: node u consumes node v.

  Tile collection: ``config_feat`` (c, 24), ``config_runtime_normalizers`` (c,). Layout collection:
  ``node_config_feat`` (c, nc, 18), ``node_config_ids`` (nc,), ``node_splits``. Absent fields are None.
  """
  node_feat: np.ndarray
  node_opcode: np.ndarray
  edge_index: np.ndarray
  config_runtime: np.ndarray
  config_feat: np.ndarray | None = None
  config_runtime_normalizers: np.ndarray | None = None
  node_config_feat: np.ndarray | None = None
  node_config_ids: np.ndarray | None = None
  node_splits: np.ndarray | None = None

  @property
  def collection(self) -> str:
    return "tile" if self.config_feat is not None else "layout"

  def senders_receivers(self) -> tuple[np.ndarray, np.ndarray]:
    """Edges in this library's direction: operand (sender, = v) -> user (receiver, = u)."""
    return self.edge_index[:, 1].astype(np.int32), self.edge_index[:, 0].astype(np.int32)


def load_tpugraphs_npz(path: str) -> TpuGraphsExample:
  """Load one TpuGraphs npz file (tile or layout collection) and check its shapes.

  Example:
    >>> ex = load_tpugraphs_npz("tpu_graphs/npz/tile/xla/train/some_graph.npz")  # doctest: +SKIP
    >>> ex.collection, ex.node_feat.shape                                         # doctest: +SKIP
    ('tile', (N, 140))
  """
  with np.load(path, allow_pickle=False) as z:
    keys = set(z.files)
    for k in ("node_feat", "node_opcode", "edge_index", "config_runtime"):
      if k not in keys:
        raise ValueError(f"{path!r} is not a TpuGraphs npz: missing {k!r} (has {sorted(keys)}).")
    get = lambda k: z[k] if k in keys else None
    ex = TpuGraphsExample(node_feat=z["node_feat"], node_opcode=z["node_opcode"],
                          edge_index=z["edge_index"], config_runtime=z["config_runtime"],
                          config_feat=get("config_feat"),
                          config_runtime_normalizers=get("config_runtime_normalizers"),
                          node_config_feat=get("node_config_feat"), node_config_ids=get("node_config_ids"),
                          node_splits=get("node_splits"))
  n = ex.node_feat.shape[0]
  if ex.node_opcode.shape != (n,):
    raise ValueError(f"{path!r}: node_opcode has shape {ex.node_opcode.shape}, expected ({n},).")
  if ex.edge_index.ndim != 2 or ex.edge_index.shape[1] != 2:
    raise ValueError(f"{path!r}: edge_index must be (m, 2), got {ex.edge_index.shape}.")
  if ex.edge_index.size and (ex.edge_index.min() < 0 or ex.edge_index.max() >= n):
    raise ValueError(f"{path!r}: edge_index refers to nodes outside [0, {n}).")
  c = ex.config_runtime.shape[0]
  if ex.config_feat is not None and ex.config_feat.shape[0] != c:
    raise ValueError(f"{path!r}: config_feat has {ex.config_feat.shape[0]} rows, config_runtime {c}.")
  if ex.node_config_feat is not None:
    if ex.node_config_feat.shape[0] != c:
      raise ValueError(f"{path!r}: node_config_feat has {ex.node_config_feat.shape[0]} configs, "
                       f"config_runtime {c}.")
    if ex.node_config_ids is not None and ex.node_config_feat.shape[1] != ex.node_config_ids.shape[0]:
      raise ValueError(f"{path!r}: node_config_feat and node_config_ids disagree on nc.")
  return ex
