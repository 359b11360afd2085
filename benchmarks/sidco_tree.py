"""Device time of the sparsifiers' update on a ResNet-50-shaped gradient tree (161 leaves, 25.56M float32,
``powersgd_step.resnet50_shapes``), ratio 0.001, measured the way a training step uses it (issue 18).

Primary measure (``device_s``): ONE jitted call runs ``--steps`` updates in a ``lax.fori_loop`` with the
transform's state carried and the gradients changing every step (the pool's tree plus ``1e-6 i``, or times
``1 + 1e-3 i`` with ``--change scale``, fused into the update's first read); one ``jax.profiler`` trace of ``--calls`` such calls, the GPU kernels split into
one cluster per call at idle gaps: first kernel start to last kernel end, / steps (launch gaps included,
host time excluded). ``busy_s``: the sum of kernel durations / steps; ``kernels``: kernels per update;
``top_kernels``: the kernels with the largest total time per update (name, seconds, count).

Rows (all in the same run):

- ``sidco(0.001)`` and ``sidco(0.001, per_tensor=True)`` (the defaults: ``exact=True``, which since session 9
  finds every segment's k-th largest by the block select with no SIDCo fit, cuts ties at the cut by prefix
  counts (since session 10; no sort, no conditional) and writes the error-compensated buffer in place, ``dus``,
  into a zero fill of its own), the transform the package exports, and
  ``--variants`` of them (module switches of :mod:`mlsys_jax.comm.sparse`), each checked bitwise equal over
  the whole loop to the row without brackets (``loop_same_as_default``; that row runs whenever one of its
  variants does, ``--only`` or not). The default variants are the path
  before session 9, ``[bits fit notrimskip two]`` (the fit first, the 8-way bit search on the steps where it
  missed, the trim's sort on every step, two concatenations), flat and per tensor: the same-run comparison;
- with ``--chain``, the step a user runs: ``optax.adam(1e-3)`` alone and ``optax.chain(<compressor>, adam)``;
  a compressor's cost inside a training step is its chain row minus the adam row (``compressor_s``, and
  ``compressor_speedup_over_topk`` against ``chain(topk, adam)``'s; the decompressed per-leaf outputs feed
  Adam's per-leaf update, where XLA fuses them, so the per-leaf output pass that a standalone ``tx.update``
  must materialize is mostly not an extra cost there). The single-step wall rows (without ``--no_wall``)
  are not run for these (their state is a tuple, not the sparsifier's);
- ``topk(0.001)``: the package's Top-k transform (``lax.top_k`` of the raveled tree, error feedback);
- ``lax.top_k`` and ``lax.approx_max_k`` (recall 0.95) of one flat 25.56M vector: the selection alone, the
  strongest Top-k a user could write (no tree, no error feedback);
- floors: ``flat copy`` (``x * s`` over one flat 25.56M vector: one read + one write of the gradients'
  bytes in one kernel), ``tree copy`` (the same per leaf: 161 outputs) and ``tree error-feedback pass``
  (per leaf ``(g, r) -> (g + r, g - r)``: two reads and two writes, what any error-feedback update
  must at least move).

With ``--single``, every row also gets the device time of ONE jitted update outside the loop
(``single_device_s``, ``single_busy_s``, ``single_kernels``, ``single_top_kernels``): the update as the entry
computation, where XLA's horizontal loop fusion (which runs on the entry computation only) may merge the
small per-leaf kernels that a loop body keeps apart; ``--donate``: that call with the state donated. ``--top N``
keeps N kernels in ``top_kernels``.

Secondary (``wall_s``): the jitted ``tx.update`` called from Python once per step, dispatch included (the
measure of the earlier tables: it is dominated by the host's handling of 161 argument and ~320 result
buffers), interleaved with ``topk(0.001)`` (``stats.time_interleaved``); and the loop's wall time / steps.
``rw_floor_s``: 8 bytes per parameter at the device-timed bandwidth of a 1 GiB copy (``_rw_floor``; before session
44 at ``common.copy_bandwidth``, wall time of dispatched copies, kept as ``rw_floor_wall_s``). ``busy_s`` counts
overlapping kernels once (the union of their intervals; ``kernel_sum_s``, the durations summed, is what it was
before session 44).

  PYTHONPATH=. python benchmarks/sidco_tree.py --out $OUT                # H200: ~90 s
  PYTHONPATH=. python benchmarks/sidco_tree.py --small --out /tmp/st     # CPU smoke test (widths / 8)
  PYTHONPATH=. python benchmarks/sidco_tree.py --out $OUT --no_wall --change shift --only "flat copy,adam,chain" --chain
  # session 9's defaults against the old path, same run (H200, ~90 s; --change shift, the default: see --change)
  PYTHONPATH=. python benchmarks/sidco_tree.py --out $OUT --no_wall --change shift --budget_s 90 \
    --only "flat copy,tree copy,topk,sidco" --name sidco_tree_s9_h200
"""

from __future__ import annotations

import gzip
import os
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import (busy_ns, copy_bandwidth, device_stream_events, environment, host_overlap,  # noqa: E402
                               idle_clusters, largest_gap_interval, largest_gaps, parse_args, print_table,
                               write_json)
from benchmarks.hlo_attribution import hlo_file  # noqa: E402
from benchmarks.powersgd_step import resnet50_shapes  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.comm import sparse as sp  # noqa: E402

fast = None   # (the tree-native SIDCo of session 5, mlsys_jax/comm/_sidco_tree.py, was 5x slower: removed)

RATIO = 0.001
OLD_PATH = "bits fit sorttrim notrimskip two"   # sidco(exact=True) before session 9 (variant tokens)


def _flags(ap):
  ap.add_argument("--div", type=int, default=None, help="divide the channel widths (default 1; 8 with --small)")
  ap.add_argument("--steps", type=int, default=None, help="updates per jitted loop (default 20; 3 with --small)")
  ap.add_argument("--calls", type=int, default=3, help="profiled loop calls per row")
  ap.add_argument("--repeats", type=int, default=None, help="wall-time rounds (default 15; 3 with --small)")
  ap.add_argument("--budget_s", type=float, default=75.0, help="stop adding rows after this many seconds")
  ap.add_argument("--only", default="", help="comma-separated row-name prefixes to run (default: all); separated by "
                  "';' instead when one holds a comma")
  ap.add_argument("--name", default="sidco_tree", help="JSON file name (without .json)")
  ap.add_argument("--no_wall", action="store_true", help="loop device time only (no single-step compile)")
  ap.add_argument("--single", action="store_true",
                  help="also the device time of ONE jitted update outside the loop (``single_device_s``, ``single_busy_s``, "
                       "``single_kernels``, ``single_top_kernels``), for every row, also with --no_wall: XLA's horizontal "
                       "loop fusion (small per-leaf kernels into one) runs on the entry computation only, not in a loop body")
  ap.add_argument("--top", type=int, default=20, help="kernels kept in top_kernels (by total time per update)")
  ap.add_argument("--hlo", action="store_true",
                  help="also write each row's optimized loop HLO (gzipped) beside the JSON as "
                       "<name>_<row>.hlo.txt.gz (benchmarks/hlo_attribution.py joins it with top_kernels)")
  ap.add_argument("--donate", action="store_true",
                  help="--single with the state donated (jax.jit(update, donate_argnums=1)), each call taking the state "
                       "the previous call returned, as a training loop that donates its optimizer state runs it (until "
                       "session 14b each call took a fresh copy; s14b and s14c show the same idle gap after a cub sort "
                       "either way)")
  ap.add_argument("--single_configs", default="",
                  help="with --single: also time the single update under these per-jit XLA configurations "
                       "(names of sched.XLA_CONFIGS, 'cmdbuf_while': command buffers with WHILE added, 'nocub': XLA's own sort "
                       "kernels instead of cub's radix sort), rows "
                       "'single@<name>' (device_s, busy_s, kernels, idle_s, the longest idle gaps)")
  ap.add_argument("--sequence", action="store_true",
                  help="with --single: also the median call's kernels in launch order (single_sequence: name, start "
                       "offset and duration in us), to see what runs after each sort and where the device waits")
  ap.add_argument("--host_gap", action="store_true",
                  help="with --single: record the host threads' events (XLA thunks, CUDA API calls) during the single "
                       "call's longest device-idle gap (single_gap_host) and over the whole call (single_host_top)")
  ap.add_argument("--train_step", action="store_true",
                  help="for every optax row: the optimizer half of a training step, step(params, state, grads) -> "
                       "(apply_updates(params, updates), state), jitted with params and state donated and chained call to "
                       "call (train_device_s, train_idle_s, train_kernels, train_chain_wall_s, ...)")
  ap.add_argument("--change", default="shift", choices=("scale", "shift"),
                  help="how step i changes its pool gradient: times 1 + 1e-3 i, or plus 1e-6 i (default since session 9: "
                       "sidco's default buffer 'dus' and the old path's 'two' then stay bitwise comparable; with "
                       "'scale' the multiply fuses into dus's add as an FMA and rounds differently)")
  ap.add_argument("--pool", type=int, default=3, help="independent gradient draws the loop cycles through")
  ap.add_argument("--materialize", action="store_true",
                  help="each step's gradient written to memory before the update reads it (an optimization_barrier), as "
                       "a training step hands it over: no row fuses the change into its first read (since session 31, "
                       "whose Pallas sum kernel reads materialized gradients while XLA's build fused the change); the "
                       "'tree copy' row then shows the cost of the materialization itself")
  ap.add_argument("--chain", action="store_true",
                  help="add the step a user runs: optax.adam(1e-3) alone, chain(topk, adam), chain(sidco, adam) (flat "
                       "and per tensor): a compressor's cost in a training step is its row minus adam's (the per-leaf "
                       "output pass fuses into Adam's per-leaf update there)")
  ap.add_argument("--chain_variants", default="", help="comma-separated variant rows of chain(sidco, adam) and of "
                  "chain(topk, adam), each checked bitwise against its default chain row (tokens as --variants)")
  ap.add_argument("--flat_variants", default="", help="comma-separated variant rows of sidco(flat_state=True), flat and "
                  "per tensor (tokens as --variants; a leading '-': flat only, '+': per tensor only)")
  ap.add_argument("--topk_variants", default="", help="comma-separated variant rows of topk (tokens as --variants)")
  ap.add_argument("--variants", default=OLD_PATH,
                  help="comma-separated variant rows of sidco flat and per tensor (a leading '-': flat only, '+': "
                       "per tensor only; default: the path before session 9, flat and per tensor); "
                       "tokens: blocks/counts/bits = sparse._EXACT_SEARCH (how the k-th largest is found), fit/nofit = "
                       "sparse._EXACT_FIT (SIDCo's fit first), trimskip/notrimskip = sparse._TRIM_SKIP, quota/sorttrim = "
                       "sparse._TRIM (the tie cut by prefix counts, or the sort trim under a cond), zfill/zfused = sparse._DUS_BASE "
                       "(dus's zero buffer a fill of its own, or fused into the first chunk's write), narrowseg/wideseg = "
                       "sparse._SEG_KEY (the per-segment sorts' second key uint8/uint16, or int32), two/groups/dus = "
                       "sparse._SUM_FLATTEN and _RAVEL_SUM_FLATTEN (the error-compensated buffer of sidco, of topk), "
                       "g<N> = sparse._GROUP_LEAVES, s<N> = sparse._GROUP_SIZE (a leaf of >= N entries a chunk of its own), kthkeys/kthpairs = "
                       "sparse._KTH_KEYS_ONLY (the block select's third sort on keys alone, one segment), pwrite/xwrite = sparse._OUT_WRITE "
                       "(every leaf's residual and output by the Pallas leaf writer, or one XLA fusion per leaf), flatdus/flatconcat = "
                       "sparse._FLAT_BUILD (flat_state rows: the buffer written leaf by leaf, or concatenated), fkeep/fkeepi/fbuf/xkeep = "
                       "sparse._FLAT_KEPT (flat_state, one segment: the new residual by kept_from_padded, fresh or in place, "
                       "the buffer itself with its sent entries zeroed by zero_sent (the residual kept padded), or XLA's fusion), fout/xout = sparse._FLAT_OUT (flat_state: the outputs by write_sent, reading only "
                       "candidate blocks, or XLA's per-leaf fusions), klist/xlist = sparse._KTH_LIST (the exact search's handoff "
                       "between its levels by two kernels, or XLA's prefix sums and compaction), pbuild/xbuild = "
                       "sparse._SUM_BUILD (the buffer and its statistics by the Pallas sum kernel, or XLA's sums and the "
                       "statistics kernel), fpass/xpass = sparse._COUNT_PASS (the counting search's passes one Pallas "
                       "kernel each, or four XLA kernels), sg<N> = _pallas_pack.SUM_GROUP (leaves per sum kernel: fewer launches), wg<N> = _pallas_pack.WRITE_GROUP "
                       "(leaves per leaf-writer kernel), sw<N> / ww<N> = _pallas_pack.SUM_WARPS / WRITE_WARPS (warps per program of the sum / "
                       "writer kernels), wt<N> = _pallas_pack.WRITE_TILE (entries per writer program), pwritei = the writer "
                       "in place (residuals aliased to the old ones), pwriter = the writer for the residuals only (in place; outputs "
                       "per-leaf XLA fusions); with bits only: a number = search ways, pallas/xla/bisect = the "
                       "search's count, skip/noskip = sparse._COUNT_SKIP; with two only: gather/concat = sparse._FLATTEN")


def _selected(names: list[str], only: list[str]) -> list[str]:
  """The rows to run, in order: every name starting with one of the prefixes ``only`` (all when empty), and the
  default row of every variant among them (``X [tokens]`` needs ``X``), so that each variant's loop is compared with
  its default bitwise (session 34: switch rows run without their default row timed a different answer unnoticed).

  >>> _selected(["topk(0.001)", "sidco(0.001)", "sidco(0.001, per_tensor=True)", "sidco(0.001) [counts]"],
  ...           ["topk", "sidco(0.001) ["])
  ['topk(0.001)', 'sidco(0.001)', 'sidco(0.001) [counts]']
  """
  picked = [n for n in names if not only or any(n.startswith(o) for o in only)]
  need = {n.split(" [")[0] for n in picked if " [" in n}
  return [n for n in names if n in picked or n in need]


def _variant_rows(spec: str, suffix: str = "") -> list[tuple[str, bool]]:
  """``(row name, per tensor)`` of every variant in the comma-separated ``spec`` (``--variants``,
  ``--flat_variants``): ``sidco(0.001<suffix>) [v]`` and its per-tensor twin, only the first with a leading '-',
  only the twin with a leading '+'.

  >>> _variant_rows("pwrite,-counts 16", ", flat_state=True")[1:]
  [('sidco(0.001, per_tensor=True, flat_state=True) [pwrite]', True), ('sidco(0.001, flat_state=True) [counts 16]', False)]
  """
  out = []
  for v in filter(None, spec.split(",")):
    tok = v.lstrip("-+")
    if not v.startswith("+"):
      out.append((f"sidco(0.001{suffix}) [{tok}]", False))
    if not v.startswith("-"):
      out.append((f"sidco(0.001, per_tensor=True{suffix}) [{tok}]", True))
  return out


def _same_array(x, y) -> bool:
  """``x`` equals ``y`` bitwise; a 1-D ``x`` longer than a 1-D ``y`` (a flat residual kept in the padded buffer's
  layout, ``sparse._FLAT_KEPT = "buffer"``) when its first entries are ``y`` and the rest zeros."""
  if x.ndim == 1 and y.ndim == 1 and x.shape[0] != y.shape[0]:
    x, y = (x, y) if x.shape[0] > y.shape[0] else (y, x)
    return bool(jnp.array_equal(x[:y.shape[0]], y)) and not bool(jnp.any(x[y.shape[0]:]))
  return bool(jnp.array_equal(x, y))


def _residual_leaves(residual, like) -> list:
  """The residual's leaves in the order of ``like``'s: a tree's leaves, or a flat residual
  (``sidco(flat_state=True)``: the leaves concatenated in tree order) cut and reshaped like ``like``."""
  leaves = jax.tree_util.tree_leaves(like)
  if jax.tree_util.tree_structure(residual) == jax.tree_util.tree_structure(like):
    return jax.tree_util.tree_leaves(residual)
  out, off = [], 0
  for l in leaves:
    out.append(residual[off:off + l.size].reshape(l.shape))
    off += l.size
  return out


def _loop(update, steps: int, pool: int, change: str = "scale", materialize: bool = False):
  """jit((pool of gradients, state, out0) -> (state, out)): ``steps`` updates, the state carried; step ``i``
  takes gradient ``i % pool`` of the pool (leading axis of every leaf) times ``1 + 1e-3 i`` (``change``
  "scale"), or plus ``1e-6 i`` ("shift": an add, which no fusion contracts with the update's own add into
  an FMA, so variants that fuse the producer differently stay bitwise comparable). ``materialize``: that gradient
  behind an ``optimization_barrier``, written to memory before the update reads it, as a training step's backward
  pass or a jitted ``tx.update``'s arguments hand it over (no row can fuse the change into its first read)."""
  def run(gp, st, out0):
    def body(i, c):
      st, _ = c
      if change == "scale":
        s = 1.0 + 1e-3 * i.astype(jnp.float32)
        g = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, i % pool, keepdims=False) * s, gp)
      else:
        s = 1e-6 * i.astype(jnp.float32)
        g = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, i % pool, keepdims=False) + s, gp)
      if materialize:
        g = jax.lax.optimization_barrier(g)
      o, st = update(g, st)
      return st, o
    return jax.lax.fori_loop(0, steps, body, (st, out0))
  return jax.jit(run)


TOP = 20   # kernels kept in top_kernels (--top)


def _single_call(one, g, st, donate: bool):
  """A no-argument call of the jitted single update ``one(g, state)``. Donated: the state each call returns
  is the next call's (a training loop that donates its optimizer state; the outputs alias the donated
  inputs); otherwise the same state every call."""
  if not donate:
    return lambda: one(g, st)
  cur = [jax.tree_util.tree_map(jnp.copy, st)]

  def call():
    out, cur[0] = one(g, cur[0])
    return out
  return call


def _chain_wall(call, n: int) -> float:
  """Wall seconds per call of ``n`` back-to-back calls, blocking once at the end (the Python loop of a
  training script: dispatch of call i+1 overlaps device work of call i)."""
  jax.block_until_ready(call())
  t0 = time.perf_counter()
  for _ in range(n - 1):
    call()
  jax.block_until_ready(call())
  return (time.perf_counter() - t0) / n


def _single_options(name: str) -> dict:
  """Per-jit ``compiler_options`` of a ``--single_configs`` name: one of ``sched.XLA_CONFIGS``,
  ``cmdbuf_while`` (``cmdbuf_conv`` with WHILE in the command-buffer types) or ``nocub`` (sorts by XLA's own
  kernels, not cub's radix sort custom call, which splits the command buffer)."""
  from mlsys_jax.sched import XLA_CONFIGS
  from mlsys_jax.sched.emit import CB_TYPES
  if name == "cmdbuf_while":
    return {**XLA_CONFIGS["cmdbuf_conv"], "xla_gpu_enable_command_buffer": CB_TYPES + ",WHILE"}
  if name == "nocub":   # XLA's own sort kernels (fusions, inside the command buffer) instead of cub's radix sort
    return {"xla_gpu_enable_cub_radix_sort": False}
  if name not in XLA_CONFIGS:
    raise ValueError(f"--single_configs: unknown configuration {name!r}; use one of {sorted(XLA_CONFIGS)}, "
                     "'cmdbuf_while' or 'nocub'")
  return dict(XLA_CONFIGS[name])


def _train_step(tx, grads, args) -> dict:
  """The optimizer half of a training step as a user's training loop runs it: ``step(params, opt_state,
  grads) -> (optax.apply_updates(params, updates), new_opt_state)``, jitted with params and optimizer state
  donated, each call taking the previous call's outputs (so every donated buffer aliases its own output, as
  in a ``TrainState`` loop; donating the state of a bare ``jax.jit(tx.update)`` instead lets JAX alias the
  residual buffers to the *updates* outputs of the same shapes, and XLA then copies every residual leaf
  first). Returns ``train_*``: device span, busy and idle time, kernels, the host's longest-gap and whole-call
  events (``--host_gap``) and the wall seconds per call of 20 back-to-back calls (``train_chain_wall_s``)."""
  params = jax.tree_util.tree_map(lambda x: x * 0.5 + 1.0, grads)   # nonzero parameters of the same shapes

  def step(p, st, gr):
    upd, st = tx.update(gr, st, p)
    return optax.apply_updates(p, upd), st

  fn = jax.jit(step, donate_argnums=(0, 1))
  cur = [jax.tree_util.tree_map(jnp.copy, params), jax.tree_util.tree_map(jnp.copy, tx.init(params))]   # distinct buffers

  def call():
    cur[0], cur[1] = fn(cur[0], cur[1], grads)
    return cur[0]
  jax.block_until_ready(call())
  d = _device(call, args.calls, 1, host=args.host_gap)
  d["chain_wall_s"] = _chain_wall(call, 20)
  return {f"train_{k_}": v for k_, v in d.items()}


def _device(fn, calls: int, per_call: int, gap_s: float = 0.02, host: bool = False, sequence: bool = False) -> dict:
  """Device time per step from one profiler trace of ``calls`` calls of ``fn`` (each alone). ``host``: also
  ``gap_host``, what the host threads were doing during the median call's longest idle gap
  (``common.host_overlap``), and ``host_top``, the host events from 3 ms before that call's first kernel (its
  dispatch, and the tail of the sleep before it) to its last kernel's end, pooled by name. ``sequence``: also
  ``sequence``, the median call's kernels in launch order as ``(name, start offset us, duration us)``."""
  if jax.default_backend() != "gpu":
    return {}

  def run():
    for _ in range(calls):
      jax.block_until_ready(fn())
      time.sleep(gap_s)

  try:
    evs = device_stream_events(run, host=host)
    evs, hosts = evs if host else (evs, None)
    clusters = idle_clusters(evs, gap_s * 1e9 / 2)
    if len(clusters) != calls:
      return {"device_error": f"{len(clusters)} kernel clusters for {calls} calls"}
    kinds: dict = {}
    for c in clusters:
      for ev in c:
        k = ev[3][:70]
        d, n = kinds.get(k, (0, 0))
        kinds[k] = (d + ev[2], n + 1)
    top = sorted(kinds.items(), key=lambda t: -t[1][0])[:TOP]
    norm = 1e-9 / (calls * per_call)
    spans = [max(ev[1] for ev in c) - c[0][0] for c in clusters]
    med = clusters[int(np.argsort(spans)[len(spans) // 2])]
    idle, gaps = largest_gaps(med, 8)   # the median call's
    extra = {}
    if host:
      g0, g1 = largest_gap_interval(med)
      extra["gap_host"] = host_overlap(hosts, g0, g1, 16)
      extra["host_top"] = host_overlap(hosts, med[0][0] - 3e6, max(ev[1] for ev in med), 24)
    if sequence:
      extra["sequence"] = [(ev[3][:70], round((ev[0] - med[0][0]) * 1e-3, 2), round(ev[2] * 1e-3, 2)) for ev in med]
    return {**extra, "device_s": float(np.median(spans)) * 1e-9 / per_call,
            "idle_s": idle / per_call, "gaps": [(g, a[:60], b[:60]) for g, a, b in gaps],
            "busy_s": sum(busy_ns(c) for c in clusters) * norm,   # (overlapping kernels once: busy_ns)
            "kernel_sum_s": sum(ev[2] for c in clusters for ev in c) * norm,
            "kernels": sum(len(c) for c in clusters) / (calls * per_call),
            "top_kernels": [(k, d * norm, n / (calls * per_call)) for k, (d, n) in top]}
  except Exception as e:  # diagnostics: never fatal
    return {"device_error": f"{type(e).__name__}: {str(e)[:300]}"}


def _rw_floor(n: int, wall_bandwidth: float, calls: int = 5, nbytes: int = 1 << 30) -> dict:
  """The read+write floor of ``n`` float32 (8 bytes each) and the copy bandwidth it uses: on a GPU the device
  span of one jitted 1 GiB copy (``x * 1.0000001``, read once and written once; median of ``calls`` profiled
  calls, ``_device``), else ``wall_bandwidth`` (``common.copy_bandwidth``: wall time of dispatched copies, the
  only measure before session 44; dispatch and synchronisation included, it read 1.76-2.61 TB/s on H100 runs whose
  device-timed 'flat copy' row ran at ~2.9 TB/s, so the floor came out 11-65% high)."""
  out = {"copy_bandwidth_wall": wall_bandwidth, "copy_bandwidth": wall_bandwidth, "rw_floor_measure": "wall"}
  if jax.default_backend() == "gpu":
    x = jax.random.normal(jax.random.PRNGKey(1), (nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0000001)
    jax.block_until_ready(f(x))
    d = _device(lambda: f(x), calls, 1)
    if d.get("device_s"):
      bw = 8 * (nbytes // 4) / d["device_s"]
      out.update(copy_bandwidth=bw, copy_bandwidth_device=bw, rw_floor_measure="device")
    else:
      out["copy_device_error"] = d.get("device_error", "no device time")
    del x
  out["rw_floor_s"] = 8 * n / out["copy_bandwidth"]
  out["rw_floor_wall_s"] = 8 * n / wall_bandwidth
  return out


def _wall(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


ADAM_ROW, CHAIN_TOPK_ROW = "adam(1e-3)", "chain(topk(0.001), adam)"


def _summarize(rows: list, rw_floor_s: float) -> str:
  """Adds the ratios to ``rows`` (in place) and returns the measure they use: ``device_s`` when any row has
  it (GPU), else ``loop_wall_s``. Per row: ``speedup_over_topk`` (the ``topk(0.001)`` row / this row),
  ``over_flat_copy``, ``over_rw_floor``; for ``--chain`` rows (name ``chain(...)``) also ``compressor_s``
  (the row minus ``adam(1e-3)`` alone: the compressor's cost inside the training step) and
  ``compressor_speedup_over_topk`` (``chain(topk(0.001), adam)``'s compressor_s / this row's); with
  ``--single`` rows also ``single_speedup_over_topk`` (on ``single_device_s``) and
  ``single_chain_speedup_over_topk`` (on ``single_chain_wall_s``, back-to-back calls from Python)."""
  key_ = "device_s" if any("device_s" in r for r in rows) else "loop_wall_s"
  by = {r["method"]: r for r in rows}
  floor = by.get("flat copy", {}).get(key_)
  tk = by.get("topk(0.001)", {}).get(key_)
  adam = by.get(ADAM_ROW, {}).get(key_)
  for r in rows:
    if key_ in r:
      if tk:
        r["speedup_over_topk"] = tk / r[key_]
      if floor:
        r["over_flat_copy"] = r[key_] / floor
      r["over_rw_floor"] = r[key_] / rw_floor_s
      if adam and r["method"].startswith("chain("):
        r["compressor_s"] = r[key_] - adam
  for m in ("device_s", "chain_wall_s"):   # (--single: one jitted update as the entry computation)
    tk1 = by.get("topk(0.001)", {}).get(f"single_{m}")
    for r in rows:
      if tk1 and r.get(f"single_{m}"):
        r["single_speedup_over_topk" if m == "device_s" else "single_chain_speedup_over_topk"] = tk1 / r[f"single_{m}"]
  tk_share = by.get(CHAIN_TOPK_ROW, {}).get("compressor_s")
  for r in rows:
    if tk_share and r.get("compressor_s", 0) > 0:
      r["compressor_speedup_over_topk"] = tk_share / r["compressor_s"]
  return key_


def main():
  args = parse_args(__doc__, _flags)
  for cfg in filter(None, args.single_configs.split(",")):
    _single_options(cfg)   # a typo fails here, not after the first rows
  global TOP
  TOP = args.top
  t_start = time.perf_counter()
  env = environment()
  div = args.div or (8 if args.small else 1)
  steps = args.steps or (3 if args.small else 20)
  reps = args.repeats or (3 if args.small else 15)
  shapes = resnet50_shapes(div)
  n = int(sum(np.prod(s) for s in shapes))
  key = jax.random.PRNGKey(0)
  # heavy-tailed (Laplace) leaves of one scale: the fits land near the target (the usual step)
  # heavy-tailed (Laplace) leaves of one scale, ``--pool`` independent draws: the loop cycles through them,
  # so the error-compensated vectors change every step as in training (one gradient, only rescaled, makes
  # every unsent entry grow linearly: the fit then misses its band on most steps and the exact-count
  # fallback runs)
  pool = {f"{i:03d}": jnp.stack([jax.random.laplace(jax.random.fold_in(key, 1000 * p + i), s, jnp.float32) * 1e-3
                                 for p in range(args.pool)]) for i, s in enumerate(shapes)}
  grads = jax.tree_util.tree_map(lambda x: x[0], pool)
  flat_pool = jnp.concatenate([g.reshape(args.pool, -1) for g in jax.tree_util.tree_leaves(pool)], axis=1)
  k = max(1, round(RATIO * n))
  on_cpu = jax.default_backend() == "cpu"
  copy_bw = copy_bandwidth((1 << 26) if on_cpu else (1 << 30), repeats=5 if on_cpu else 20)
  meta = {"env": env, "argv": sys.argv[1:], "pool": args.pool, "change": args.change, "materialize": args.materialize,
          "n_params": n, "n_tensors": len(shapes), "ratio": RATIO, "k": k, "steps": steps,
          "calls": args.calls, "repeats": reps, "div": div, **_rw_floor(n, copy_bw),
          "pallas": sp._pallas_mode("auto")[0], "fast_module": fast is not None}
  print(f"{len(shapes)} tensors, {n:,} parameters, k={k}; read+write floor at copy bandwidth "
        f"{meta['rw_floor_s'] * 1e3:.4f} ms", flush=True)

  topk_tx = sp.topk(RATIO)
  ident = lambda g, st: (jax.tree_util.tree_map(lambda x: x * 1.0000001, g), st)

  def ef_pass(g, st):   # st: a residual tree
    return jax.tree_util.tree_map(jnp.add, g, st), jax.tree_util.tree_map(jnp.subtract, g, st)

  # rows in priority order (a row past --budget_s is skipped): name -> (update, kind, FLATTEN of the fast module)
  rows_spec = {
      "flat copy": (lambda x, st: (x * 1.0000001, st), "flat", None),
      "tree copy": (ident, None, None),
      "topk(0.001)": (topk_tx.update, topk_tx, None),
      "sidco(0.001)": (None, sp.sidco(RATIO), None),
  }
  if fast is not None:
    rows_spec["fast sidco(0.001)"] = (None, fast.sidco(RATIO), "concat")
    rows_spec["fast[chunks] sidco(0.001)"] = (None, fast.sidco(RATIO), "chunks")
  rows_spec["sidco(0.001, per_tensor=True)"] = (None, sp.sidco(RATIO, per_tensor=True), None)
  rows_spec["sidco(0.001, flat_state=True)"] = (None, sp.sidco(RATIO, flat_state=True), None)
  rows_spec["sidco(0.001, per_tensor=True, flat_state=True)"] = (
      None, sp.sidco(RATIO, per_tensor=True, flat_state=True), None)
  rows_spec["sidco(0.001, flat_state=True) [flatdus]"] = (None, sp.sidco(RATIO, flat_state=True), None)
  for pt in ("", "per_tensor=True, "):   # the buffer and its statistics by the Pallas sum kernel (session 31)
    rows_spec[f"sidco(0.001, {pt}flat_state=True) [pbuild]"] = (None, sp.sidco(RATIO, per_tensor=bool(pt),
                                                                                flat_state=True), None)
  # SIDCo's estimator (the paper's closed-form threshold, no exact search; the default before issue 18's accuracy
  # fix made exact=True the default): the configuration issue 18's speed target was first measured with
  for kw in ("exact=False", "per_tensor=True, exact=False", "flat_state=True, exact=False",
             "per_tensor=True, flat_state=True, exact=False"):
    rows_spec[f"sidco(0.001, {kw})"] = (None, sp.sidco(RATIO, exact=False, per_tensor="per_tensor" in kw,
                                                       flat_state="flat_state" in kw), None)
  rows_spec["sidco(0.001, per_tensor=True, flat_state=True) [flatdus]"] = (
      None, sp.sidco(RATIO, per_tensor=True, flat_state=True), None)
  if args.chain:   # what a training step pays: Adam's per-leaf pass is there anyway
    with_adam = lambda tx: (None, optax.chain(tx, optax.adam(1e-3)), None)
    rows_spec[ADAM_ROW] = (None, optax.adam(1e-3), None)
    rows_spec[CHAIN_TOPK_ROW] = with_adam(sp.topk(RATIO))
    rows_spec["chain(sidco(0.001), adam)"] = with_adam(sp.sidco(RATIO))
    rows_spec["chain(sidco(0.001, per_tensor=True), adam)"] = with_adam(sp.sidco(RATIO, per_tensor=True))
    rows_spec["chain(sidco(0.001, flat_state=True), adam)"] = with_adam(sp.sidco(RATIO, flat_state=True))
    for v in [v for v in args.chain_variants.split(",") if v]:
      rows_spec[f"chain(sidco(0.001), adam) [{v}]"] = with_adam(sp.sidco(RATIO))
      rows_spec[f"{CHAIN_TOPK_ROW} [{v}]"] = with_adam(sp.topk(RATIO))
  if fast is not None:
    rows_spec["fast sidco(0.001, per_tensor=True)"] = (None, fast.sidco(RATIO, per_tensor=True), "concat")
  # variants of the module switches (the old exact path, the bit search's ways and count, the buffers):
  # same results, checked over the whole loop against the row without brackets
  for v in [v for v in args.topk_variants.split(",") if v]:   # the Top-k baseline with the same switches
    rows_spec[f"topk(0.001) [{v}]"] = (None, sp.topk(RATIO), None)
  for spec, flat in ((args.variants, False), (args.flat_variants, True)):   # (sidco's rows; flat_state=True's)
    for name, pt in _variant_rows(spec, ", flat_state=True" if flat else ""):
      rows_spec[name] = (None, sp.sidco(RATIO, per_tensor=pt, flat_state=flat), None)
  rows_spec["lax.top_k (flat vector)"] = (lambda x, st: (jax.lax.top_k(jnp.abs(x), k)[1], st), "flat", None)
  rows_spec["lax.approx_max_k (flat vector)"] = (
      lambda x, st: (jax.lax.approx_max_k(jnp.abs(x), k, recall_target=0.95)[1], st), "flat", None)
  rows_spec["tree error-feedback pass"] = (ef_pass, "residual", None)
  only = [s for s in args.only.split(";" if ";" in args.only else ",") if s]
  run_names = set(_selected(list(rows_spec), only))
  rows, ref_first, ref_loop = [], {}, {}
  # every module switch a variant token may set, restored to its value at start before each row
  switches = [(sp, n) for n in ("_SEARCH_WAYS", "_PASS_WAYS", "_COUNT_IMPL", "_FLATTEN", "_COUNT_SKIP", "_EXACT_SEARCH", "_EXACT_FIT",
                                "_SUM_FLATTEN", "_GROUP_LEAVES", "_TRIM_SKIP", "_RAVEL_SUM_FLATTEN", "_TRIM", "_DUS_BASE",
                                "_SEG_KEY", "_GROUP_SIZE", "_KTH_KEYS_ONLY", "_OUT_WRITE", "_FLAT_BUILD", "_SUM_BUILD",
                                "_COUNT_PASS", "_FLAT_KEPT", "_FLAT_OUT", "_KTH_LIST")]
  switches += [(sp._pallas_pack, n) for n in ("SUM_GROUP", "WRITE_GROUP", "SUM_WARPS", "WRITE_WARPS", "WRITE_TILE")]
  switches0 = [(mod, n, getattr(mod, n)) for mod, n in switches]
  topk_step = jax.jit(topk_tx.update)
  topk_st = topk_tx.init(grads)
  for name, (update, kind, flatten) in rows_spec.items():
    if name not in run_names:
      continue
    if time.perf_counter() - t_start > args.budget_s:
      print(f"budget reached: skipping {name}", flush=True)
      continue
    row = {"method": name}
    variant = name.split(" [")[1].rstrip("]") if " [" in name else ""
    # variant tokens: see --variants
    for mod, n, v in switches0:
      setattr(mod, n, v)
    for tok in variant.split():
      if tok.isdigit():   # (the XLA passes' ways and the Pallas passes')
        sp._SEARCH_WAYS = sp._PASS_WAYS = int(tok)
      elif tok in ("pallas", "xla", "bisect"):
        sp._COUNT_IMPL = tok
      elif tok in ("gather", "concat"):
        sp._FLATTEN = tok
      elif tok in ("skip", "noskip"):
        sp._COUNT_SKIP = tok == "skip"
      elif tok in ("two", "groups", "dus"):   # (sidco's buffer and topk's raveled one)
        sp._SUM_FLATTEN = sp._RAVEL_SUM_FLATTEN = tok
      elif tok.startswith("s") and tok[1:].isdigit():
        sp._GROUP_SIZE = int(tok[1:])
      elif tok.startswith("g") and tok[1:].isdigit():
        sp._GROUP_LEAVES = int(tok[1:])
      elif tok in ("trimskip", "notrimskip"):
        sp._TRIM_SKIP = tok == "trimskip"
      elif tok in ("kthkeys", "kthpairs"):
        sp._KTH_KEYS_ONLY = tok == "kthkeys"
      elif tok in ("narrowseg", "wideseg"):
        sp._SEG_KEY = "narrow" if tok == "narrowseg" else "int32"
      elif tok in ("zfill", "zfused"):
        sp._DUS_BASE = "fill" if tok == "zfill" else "fused"
      elif tok in ("quota", "sorttrim"):
        sp._TRIM = "quota" if tok == "quota" else "sort"
      elif tok in ("pwrite", "pwritei", "pwriter", "xwrite"):
        sp._OUT_WRITE = {"pwrite": "pallas", "pwritei": "pallas_inplace", "pwriter": "pallas_res", "xwrite": "xla"}[tok]
      elif tok in ("fkeep", "fkeepi", "fbuf", "xkeep"):
        sp._FLAT_KEPT = {"fkeep": "pallas", "fkeepi": "pallas_inplace", "fbuf": "buffer", "xkeep": "xla"}[tok]
      elif tok in ("klist", "xlist"):
        sp._KTH_LIST = "pallas" if tok == "klist" else "xla"
      elif tok in ("fout", "xout"):
        sp._FLAT_OUT = "pallas" if tok == "fout" else "xla"
      elif tok in ("flatdus", "flatconcat"):
        sp._FLAT_BUILD = tok[4:]
      elif tok in ("pbuild", "xbuild"):
        sp._SUM_BUILD = "pallas" if tok == "pbuild" else "xla"
      elif tok.startswith("sg") and tok[2:].isdigit():
        sp._pallas_pack.SUM_GROUP = int(tok[2:])
      elif tok.startswith("wg") and tok[2:].isdigit():
        sp._pallas_pack.WRITE_GROUP = int(tok[2:])
      elif tok.startswith("sw") and tok[2:].isdigit():
        sp._pallas_pack.SUM_WARPS = int(tok[2:])
      elif tok.startswith("ww") and tok[2:].isdigit():
        sp._pallas_pack.WRITE_WARPS = int(tok[2:])
      elif tok.startswith("wt") and tok[2:].isdigit():
        sp._pallas_pack.WRITE_TILE = int(tok[2:])
      elif tok in ("fpass", "xpass"):
        sp._COUNT_PASS = "pallas" if tok == "fpass" else "xla"
      elif tok in ("blocks", "counts", "bits"):
        sp._EXACT_SEARCH = tok
      elif tok in ("fit", "nofit"):
        sp._EXACT_FIT = tok == "fit"
      else:
        raise SystemExit(f"unknown variant token {tok!r}")
    row["flatten"], row["count_skip"] = sp._FLATTEN, sp._COUNT_SKIP
    row["search_ways"], row["count_impl"] = sp._SEARCH_WAYS, sp._COUNT_IMPL
    row["exact_search"], row["exact_fit"] = sp._EXACT_SEARCH, sp._EXACT_FIT
    row["sum_flatten"], row["group_leaves"], row["trim_skip"] = sp._SUM_FLATTEN, sp._GROUP_LEAVES, sp._TRIM_SKIP
    row["ravel_sum_flatten"], row["trim"], row["dus_base"] = sp._RAVEL_SUM_FLATTEN, sp._TRIM, sp._DUS_BASE
    row["seg_key"], row["group_size"], row["kth_keys_only"] = sp._SEG_KEY, sp._GROUP_SIZE, sp._KTH_KEYS_ONLY
    row["out_write"], row["flat_build"], row["sum_build"] = sp._OUT_WRITE, sp._FLAT_BUILD, sp._SUM_BUILD
    row["sum_group"], row["write_group"] = sp._pallas_pack.SUM_GROUP, sp._pallas_pack.WRITE_GROUP
    row["count_pass"], row["pass_ways"] = sp._COUNT_PASS, sp._PASS_WAYS
    row["sum_warps"], row["write_warps"] = sp._pallas_pack.SUM_WARPS, sp._pallas_pack.WRITE_WARPS
    row["write_tile"] = sp._pallas_pack.WRITE_TILE
    row["flat_kept"], row["flat_out"], row["kth_list"] = sp._FLAT_KEPT, sp._FLAT_OUT, sp._KTH_LIST
    if flatten is not None:
      fast.FLATTEN = row["flatten"] = flatten
    if update is None:
      update = kind.update
    try:
      tc = time.perf_counter()
      if kind == "flat":
        g, st = flat_pool, jnp.zeros((), jnp.float32)
      elif kind == "residual":
        g, st = pool, jax.tree_util.tree_map(jnp.zeros_like, grads)
      elif kind is None:
        g, st = pool, jnp.zeros((), jnp.float32)
      else:
        g, st = pool, kind.init(grads)
      out0 = jax.eval_shape(update, jax.tree_util.tree_map(lambda x: x[0], g), st)[0]
      out0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out0)
      loop = _loop(update, steps, args.pool, args.change, args.materialize)
      res = jax.block_until_ready(loop(g, st, out0))
      row["compile_s"] = time.perf_counter() - tc
      if args.hlo:   # (a second compile of the same loop, after the timed one's)
        os.makedirs(args.out, exist_ok=True)
        with gzip.open(hlo_file(args.out, args.name, name), "wt") as f:
          f.write(loop.lower(g, st, out0).compile().as_text())
      if name.startswith("fast") and name.split("] ")[-1].replace("fast ", "") in ref_loop:
        # the whole loop (every step's selection, the carried residual, the last update) equals the package's
        row["loop_same_as_package"] = all(bool(jnp.array_equal(x, y)) for x, y in zip(
            jax.tree_util.tree_leaves(res), jax.tree_util.tree_leaves(ref_loop[name.split("] ")[-1].replace("fast ", "")])))
      elif " [" in name and name.split(" [")[0] in ref_loop:
        same = [_same_array(x, y) for x, y in zip(
            jax.tree_util.tree_leaves(res), jax.tree_util.tree_leaves(ref_loop[name.split(" [")[0]]))]
        row["loop_same_as_default"] = all(same)
        row["loop_arrays_differing"] = [len(same) - sum(same), len(same)]   # (outputs and state arrays)
      elif name.startswith(("sidco", "topk", "chain")):
        ref_loop[name] = res
      if " [" in name and not name.startswith("fast") and "loop_same_as_default" not in row:
        row["loop_same_as_default"] = None   # (its default row did not run: not checked)
      if kind not in ("flat", "residual", None) and not args.no_wall and hasattr(res[0], "density"):
        st_end = res[0]
        row["density"] = float(st_end.density)
        row["overflow_steps"] = int(st_end.overflow_steps)
        row["bytes_sent"] = float(st_end.bytes_sent)
        # one update from zero state: exact error feedback, and the same selection as the package's
        step = jax.jit(kind.update)
        out1, st1 = jax.block_until_ready(step(grads, st))
        row["exact_error_feedback"] = all(bool(jnp.array_equal(o + r, x)) for o, r, x in zip(
            jax.tree_util.tree_leaves(out1), _residual_leaves(st1.residual, grads), jax.tree_util.tree_leaves(grads)))
        base = name.replace("fast[concat] ", "").replace("fast ", "")
        if name.startswith("fast") and base in ref_first:
          row["same_as_package"] = all(bool(jnp.array_equal(a, b)) for a, b in zip(
              jax.tree_util.tree_leaves((out1, st1.residual)), jax.tree_util.tree_leaves(ref_first[base])))
        elif not name.startswith("fast"):
          ref_first[name] = (out1, st1.residual)
        if "flat_state=True" in name and name.replace(", flat_state=True", "") in ref_first:
          # the flat residual is the tree layout's, raveled: the same first update and residual, bitwise
          ref_out, ref_res = ref_first[name.replace(", flat_state=True", "")]
          row["same_as_tree_state"] = all(bool(jnp.array_equal(a, b)) for a, b in zip(
              jax.tree_util.tree_leaves((out1, _residual_leaves(st1.residual, grads))),
              jax.tree_util.tree_leaves((ref_out, ref_res))))
        row.update({f"single_{k_}": v for k_, v in _device(lambda: step(grads, st), args.calls, 1).items()
                    if k_ in ("device_s", "busy_s", "kernels")})
        tw = stats.time_interleaved(lambda: step(grads, st), lambda: topk_step(grads, topk_st),
                                    repeats=reps, warmup=2)
        row["wall_s"] = float(tw.median_a)
        row["wall_topk_s"] = float(tw.median_b)
      row.update(_device(lambda: loop(g, st, out0), args.calls, steps))
      if args.single:   # one jitted update as the entry computation (its small leaves' kernels may fuse horizontally)
        g1 = jax.tree_util.tree_map(lambda x: x[0], g)
        for cfg in [None] + list(filter(None, args.single_configs.split(","))):   # per-jit XLA options
          one = jax.jit(update, donate_argnums=1 if args.donate else (),
                        compiler_options=_single_options(cfg) if cfg else None)
          call = _single_call(one, g1, st, args.donate)
          jax.block_until_ready(call())
          d = _device(call, args.calls, 1, host=args.host_gap, sequence=args.sequence)
          d["chain_wall_s"] = _chain_wall(call, 20)
          if args.hlo and cfg is None:   # the single update's optimized HLO: hlo_attribution.py --single
            with gzip.open(hlo_file(args.out, args.name, name + "@single"), "wt") as f:
              f.write(one.lower(g1, st).compile().as_text())
          if cfg is None:
            row.update({f"single_{k_}": v for k_, v in d.items()})
          else:
            row[f"single@{cfg}"] = {k_: d[k_] for k_ in ("device_s", "busy_s", "kernel_sum_s", "kernels", "idle_s", "gaps",
                                                         "chain_wall_s", "device_error", "gap_host", "host_top",
                                                         "sequence")
                                    if k_ in d}
        row["single_donated"] = bool(args.donate)
      if args.train_step and kind not in ("flat", "residual", None):
        row.update(_train_step(kind, jax.tree_util.tree_map(lambda x: x[0], g), args))
      row["loop_wall_s"] = _wall(lambda: loop(g, st, out0), max(3, reps // 3)) / steps
    except Exception as e:  # record and go on
      msg = "".join(traceback.format_exception_only(type(e), e))
      row["error"] = msg if len(msg) <= 3000 else msg[:1500] + " ... " + msg[-1500:]   # (compile errors: both ends)
    rows.append(row)
    print({k_: v for k_, v in row.items() if k_ != "top_kernels"}, flush=True)
    for t in row.get("top_kernels", [])[:6]:
      print("    ", t, flush=True)
    write_json(args.out, args.name, {**meta, "rows": rows, "partial": True})
  key_ = meta["measure"] = _summarize(rows, meta["rw_floor_s"])
  meta["total_s"] = time.perf_counter() - t_start
  print_table(rows, ["method", key_, "busy_s", "kernels", "speedup_over_topk", "over_flat_copy", "over_rw_floor",
                     "compressor_s", "compressor_speedup_over_topk", "single_device_s", "single_kernels",
                     "single_speedup_over_topk", "single_idle_s", "single_chain_wall_s",
                     "single_chain_speedup_over_topk", "train_device_s", "train_kernels", "train_idle_s",
                     "train_chain_wall_s", "loop_wall_s", "wall_s"])
  write_json(args.out, args.name, {**meta, "rows": rows})


if __name__ == "__main__":
  main()
