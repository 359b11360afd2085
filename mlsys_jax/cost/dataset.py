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

import hashlib
import json
import os
import re
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


def _cost_dataset_replace(self: CostDataset, **fields) -> CostDataset:
  """The dataset with ``fields`` replaced. NamedTuple's own ``_replace`` checks ``len(self)``, which for a
  :class:`CostDataset` is the row count, not the number of fields (a NamedTuple may not define
  ``_replace`` in its body, hence the assignment below)."""
  unknown = set(fields) - set(self._fields)
  if unknown:
    raise ValueError(f"CostDataset has no fields {sorted(unknown)}; fields are {self._fields}.")
  return CostDataset(**{**self._asdict(), **fields})


CostDataset._replace = _cost_dataset_replace


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
      meta=np.asarray(json.dumps(meta)), **_device_columns(rows))
  os.replace(tmp, path)


DEVICE_TIME_KEYS = ("device_span_s", "device_busy_s", "device_kernels")


def _device_columns(rows: Sequence[dict]) -> dict:
  """Optional profiler columns (only when some row has them; NaN / "{}" for rows without)."""
  if not any("device_span_s" in r for r in rows):
    return {}
  out = {k: np.asarray([r.get(k, np.nan) for r in rows], np.float64) for k in DEVICE_TIME_KEYS}
  out["kernel_times"] = np.asarray([json.dumps(r.get("kernel_times", {}), sort_keys=True) for r in rows], str)
  return out


def load_device_times(path: str) -> dict | None:
  """The profiler columns of a dataset written with ``cost_collect.py --profile_calls``: per row
  ``device_span_s`` (first kernel start to last kernel end, median over calls), ``device_busy_s``
  (summed kernel durations), ``device_kernels`` (launches per call) and ``kernel_times`` (list of
  dicts, kernel name -> median seconds per call); NaN / {} for rows the profiler missed. None when
  the file has no profiler columns."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no cost dataset at {path!r}.")
  with np.load(path, allow_pickle=False) as z:
    if "device_span_s" not in z.files:
      return None
    out = {k: z[k] for k in DEVICE_TIME_KEYS}
    out["kernel_times"] = [json.loads(str(t)) for t in z["kernel_times"]]
  return out


def split_calls(events: Sequence[tuple], gap_ns: float) -> list[list]:
  """Split device events ``(start_ns, end_ns, ...)``, sorted by start, into clusters wherever the
  device was idle for more than ``gap_ns`` (one cluster per profiled call when calls are separated by
  a longer host sleep than any gap inside a call).

  >>> [len(c) for c in split_calls([(0, 5), (6, 9), (100, 120), (121, 130), (300, 301)], 50)]
  [2, 2, 1]
  """
  clusters, cur, last_end = [], [], 0
  for ev in events:
    if cur and ev[0] - last_end > gap_ns:
      clusters.append(cur)
      cur = []
    last_end = ev[1] if not cur else max(last_end, ev[1])
    cur.append(ev)
  if cur:
    clusters.append(cur)
  return clusters


def call_times(clusters: Sequence[Sequence[tuple]]) -> dict:
  """Device time of one program from the clusters of its profiled calls (events ``(start_ns, end_ns,
  duration_ns, name)``): ``device_span_s`` (median over calls of last end - first start),
  ``device_busy_s`` (median of the summed durations), ``device_kernels`` (median launches per call),
  ``kernel_times`` (per kernel name, the median over calls of its summed duration in the call).

  >>> t = call_times([[(0, 10, 10, "a"), (12, 20, 8, "b")], [(100, 112, 12, "a"), (113, 120, 7, "b")]])
  >>> [round(v * 1e9, 6) for v in (t["device_span_s"], t["device_busy_s"], t["kernel_times"]["a"])], t["device_kernels"]
  ([20.0, 18.5, 11.0], 2.0)
  """
  if not clusters or any(not c for c in clusters):
    raise ValueError("call_times needs one non-empty cluster of events per call.")
  span = [max(e[1] for e in c) - min(e[0] for e in c) for c in clusters]
  busy = [sum(e[2] for e in c) for c in clusters]
  names = sorted({e[3] for c in clusters for e in c})
  per = {n: float(np.median([sum(e[2] for e in c if e[3] == n) for c in clusters])) * 1e-9 for n in names}
  return {"device_span_s": float(np.median(span)) * 1e-9, "device_busy_s": float(np.median(busy)) * 1e-9,
          "device_kernels": float(np.median([len(c) for c in clusters])), "kernel_times": per}


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
# Graph identity and merging collections (several devices).

# Attributes that do not change the program's graph: debug info, and the autotuner's per-device choices
# (tile sizes, algorithms) that a recompile of the same graph may change.
_NON_GRAPH_ATTRS = frozenset({"metadata", "backend_config", "frontend_attributes", "statistics", "origin",
                              "original_value", "result_accuracy"})
_TOKEN = re.compile(r"%?[A-Za-z_][\w.\-]*")


def graph_fingerprint(text: str) -> str:
  r"""SHA-1 of an HLO module's *graph*, independent of every name XLA chose and of debug/autotuning
  attributes: two texts give one fingerprint when their computations, in order, have the same
  instructions (opcode, shape with layout, literal/parameter number, operands by position, attributes
  other than ``metadata``, ``backend_config``, ``frontend_attributes``, ``statistics``, origins, with the
  computations and instructions they name replaced by their positions). Instructions are renamed
  consistently (``%add.3`` vs ``%add.7``) and ``HloModule`` names ignored. Raises
  :class:`~mlsys_jax.cost.hlo.HloParseError` on text the parser rejects.

  >>> a = "HloModule m\nENTRY e { x = f32[4]{0} parameter(0)\n ROOT y = f32[4]{0} negate(x) }"
  >>> b = "HloModule n\nENTRY main { p.1 = f32[4]{0} parameter(0)\n ROOT neg.9 = f32[4]{0} negate(p.1) }"
  >>> graph_fingerprint(a) == graph_fingerprint(b), graph_fingerprint(a) == graph_fingerprint(a.replace("negate", "abs"))
  (True, False)
  """
  from mlsys_jax.cost import hlo  # local: the dataset module stays light to import

  if not isinstance(text, str):
    raise TypeError(f"graph_fingerprint: text must be a str of HLO, got {type(text).__name__}.")
  mod = hlo.parse_hlo(text)
  comp_ix = {name: k for k, name in enumerate(mod.computations)}
  h = hashlib.sha1()
  for cname, comp in mod.computations.items():
    ins_ix = {ins.name: k for k, ins in enumerate(comp.instructions)}

    def sub(v: str) -> str:
      def one(m: re.Match) -> str:
        t = m.group(0).lstrip("%")
        if t in ins_ix:
          return f"#{ins_ix[t]}"
        if t in comp_ix:
          return f"@{comp_ix[t]}"
        return m.group(0)
      return _TOKEN.sub(one, v)

    h.update(f"C{'E' if comp.is_entry or cname == mod.entry_name else ''}|".encode())
    for ins in comp.instructions:
      ops = ",".join(f"#{ins_ix[o]}" if o in ins_ix else sub(o) for o in ins.operands)
      attrs = ";".join(f"{k}={sub(v)}" for k, v in sorted(ins.attrs.items()) if k not in _NON_GRAPH_ATTRS)
      h.update(f"{ins.opcode}|{ins.shape!r}|{ins.literal}|{int(ins.is_root)}|{ops}|{attrs}\n".encode())
  return h.hexdigest()


def row_devices(ds: CostDataset) -> np.ndarray:
  """The device kind of every row: from a merged dataset's ``meta["group_device"]`` (see
  :func:`merge_datasets`), else ``meta["device"]`` for all rows (``"unknown"`` when absent)."""
  gd = ds.meta.get("group_device")
  if gd is None:
    return np.full(len(ds), str(ds.meta.get("device", "unknown")), dtype=object).astype(str)
  return np.asarray([gd[str(int(g))] for g in ds.group], dtype=str)


def program_keys(ds: CostDataset) -> np.ndarray:
  """Per row, an int identifying the *program* independent of the device it was timed on (for
  held-out-program folds that keep one program's timings on several devices in the same fold):
  ``meta["group_program"]`` of a merged dataset, else the group id."""
  gp = ds.meta.get("group_program")
  if gp is None:
    return np.asarray(ds.group, np.int64)
  return np.asarray([gp[str(int(g))] for g in ds.group], np.int64)


class MergeInfo(NamedTuple):
  """What :func:`merge_datasets` did: per source, its device, programs and rows read and kept; the
  programs dropped as graph duplicates (of an earlier program on the same device); for those, the
  ratio max/min of the two timings of their default compilations (a direct measure of timing noise
  between two collections or two draws of one program); and the number of distinct programs (graphs)
  over all devices."""
  sources: list
  duplicates_dropped: int
  duplicate_default_ratios: np.ndarray
  programs: int
  unique_programs: int


def _union_find(n: int):
  parent = list(range(n))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  def union(a, b):
    ra, rb = find(a), find(b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)
  return find, union


def merge_datasets(datasets: Sequence[CostDataset], names: Sequence[str] | None = None,
                   dedupe: bool = True) -> tuple[CostDataset, MergeInfo]:
  """Concatenate collections, keeping the device kind of every program as a key, and drop
  repeated programs by graph.

  Group ids are renumbered (source by source, in order) so no two sources share one. A program
  (group) is identified by the :func:`graph_fingerprint` of its ``default`` compilation; with
  ``dedupe``, a program whose fingerprint was already seen *on the same device* (``meta["device"]``
  of its source) is dropped with all its rows (its default's runtime ratio to the kept one is
  recorded). The same graph on another device is kept -- another measurement, not a copy -- and
  shares its ``program_keys`` id (programs are also joined when family and config are equal).

  The result's ``meta``: ``device`` (the one device, or ``"mixed"``), ``devices``, ``group_device``
  and ``group_program`` (str(group) -> device / program id; read them with :func:`row_devices`,
  :func:`program_keys`), ``device_meta`` (per device: the first source's measured peaks and
  dispatch floor), ``variants`` (the union, in first-seen order, ``default`` first) and ``sources``.
  """
  if isinstance(datasets, CostDataset) or not len(datasets):
    raise ValueError("merge_datasets needs a non-empty sequence of CostDataset.")
  names = list(names) if names is not None else [f"source{k}" for k in range(len(datasets))]
  if len(names) != len(datasets):
    raise ValueError(f"merge_datasets: {len(names)} names for {len(datasets)} datasets.")
  peak_keys = ("matmul_bfloat16_flops_per_s", "matmul_float32_flops_per_s", "copy_bytes_per_s",
               "dispatch_floor_s")
  rows_hlo, cols, group_device, group_prog_key, seen = [], {}, {}, {}, {}
  variants, device_meta, sources, ratios = [], {}, [], []
  dropped, next_gid = 0, 0
  fields = [f for f in CostDataset._fields if f not in ("hlo", "meta", "group")]
  keys_fp, keys_cfg, gids, alias_cfg = [], [], [], []
  for d, name in zip(datasets, names):
    if not isinstance(d, CostDataset):
      raise TypeError(f"merge_datasets: {name} is a {type(d).__name__}, not a CostDataset.")
    if "group_device" in d.meta:
      raise ValueError(f"merge_datasets: {name} is already a merged dataset; merge the collections.")
    dev = str(d.meta.get("device", "unknown"))
    device_meta.setdefault(dev, {k: d.meta[k] for k in peak_keys if k in d.meta})
    for v in d.meta.get("variants", []) or [[str(x), {}] for x in dict.fromkeys(map(str, d.variant))]:
      if v[0] not in [w[0] for w in variants]:
        variants.append(list(v))
    src = {"name": name, "device": dev, "date": d.meta.get("date"), "jax": d.meta.get("jax"),
           "seed": d.meta.get("seed"), "programs": int(len(np.unique(d.group))), "rows": len(d),
           "programs_kept": 0, "rows_kept": 0}
    for g in np.unique(d.group):
      rows = np.flatnonzero(d.group == g)
      dflt = [i for i in rows if str(d.variant[i]) == "default"]
      if len(dflt) != 1:
        raise ValueError(f"merge_datasets: {name} group {int(g)} has {len(dflt)} 'default' rows.")
      fp = graph_fingerprint(d.hlo[dflt[0]])
      cfg_key = f"{d.family[dflt[0]]}:{d.config[dflt[0]]}"
      if dedupe and (dev, fp) in seen:
        dropped += 1
        kept_rt, kept_k = seen[(dev, fp)]
        rt = float(d.runtime_s[dflt[0]])
        ratios.append(max(rt, kept_rt) / min(rt, kept_rt))
        alias_cfg.append((kept_k, cfg_key))  # its config still names the kept program
        continue
      seen.setdefault((dev, fp), (float(d.runtime_s[dflt[0]]), len(gids)))
      gid = next_gid
      next_gid += 1
      group_device[str(gid)] = dev
      keys_fp.append(fp)
      keys_cfg.append(cfg_key)
      gids.append(gid)
      for i in rows:
        rows_hlo.append(d.hlo[i])
        cols.setdefault("group", []).append(gid)
        for f in fields:
          cols.setdefault(f, []).append(getattr(d, f)[i])
      src["programs_kept"] += 1
      src["rows_kept"] += len(rows)
    sources.append(src)
  # program identity across devices: same default graph, or same family + config
  find, union = _union_find(len(gids))
  for keys in (list(enumerate(keys_fp)), list(enumerate(keys_cfg)) + alias_cfg):
    first = {}
    for k, key in keys:
      if key in first:
        union(first[key], k)
      else:
        first[key] = k
  roots = [find(k) for k in range(len(gids))]
  prog_id = {r: j for j, r in enumerate(dict.fromkeys(roots))}
  group_prog_key = {str(g): prog_id[r] for g, r in zip(gids, roots)}
  variants.sort(key=lambda v: v[0] != "default")
  devs = sorted(set(group_device.values()))
  meta = {"device": devs[0] if len(devs) == 1 else "mixed", "devices": devs, "group_device": group_device,
          "group_program": group_prog_key, "device_meta": device_meta, "variants": variants,
          "sources": sources}
  if len(devs) == 1:
    meta.update(device_meta[devs[0]])
  arr = {"group": np.asarray(cols.get("group", []), np.int64)}
  for f in fields:
    ref = getattr(datasets[0], f)
    arr[f] = np.asarray(cols.get(f, []), dtype=ref.dtype if ref.dtype.kind not in "US" else str)
  out = CostDataset(hlo=rows_hlo, meta=meta, **arr)
  info = MergeInfo(sources=sources, duplicates_dropped=dropped, duplicate_default_ratios=np.asarray(ratios),
                   programs=len(gids), unique_programs=len(prog_id))
  return out, info


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
