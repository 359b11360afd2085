"""Collect a cost-model dataset: compile many programs under several XLA option sets, time them.

Kaufman et al. (MLSys 2021) train on measured kernel/program runtimes of XLA HLO. This script builds the
same kind of data for XLA as JAX uses it: programs from :mod:`mlsys_jax.cost.programs` (12 families),
each compiled under the option variants of :func:`option_variants` (fusion, autotuning, GEMM backend),
optimized HLO + XLA cost analysis captured, duplicates (same optimized HLO) dropped, and each variant
timed robustly: warm-up, an inner loop long enough to hide dispatch, variants of one program timed
interleaved round by round in a new order every round (``dataset.timing_orders``: each variant at each
position equally often; the H100 collection ``h100_collect_a`` used one fixed order, which biased
identical compilations by up to ~9%), median over rounds, outlier rounds beyond 5 MADs dropped, and a program
flagged ``noisy`` when its interquartile range exceeds 20% of the median or its time is within 2x the
measured dispatch floor.

Phases run against a wall-clock budget so the dataset is written before a device call's limit:
compile (thread pool) until ``--compile_frac`` of ``--max_seconds``, then time until the end, saving
partial results every ``--save_every`` seconds.

  python3 experiments/cost_collect.py --small --max_seconds 60          # CPU smoke test
  python3 experiments/cost_collect.py --max_seconds 480 --out $OUT      # GPU collection
  python3 experiments/cost_collect.py --families=all --seed 2 --exclude=mlsys_jax/cost/data/h100_collect_a.npz \
      --max_seconds 250 --out $OUT --name h200_collect_s12b                        # more programs, no repeats

Programs are deduplicated before compiling (family + config) and after (the graph of the default
compilation, :func:`mlsys_jax.cost.dataset.graph_fingerprint`), within the run and against ``--exclude``.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime
import hashlib
import json
import os
import platform
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax.cost import dataset as ds  # noqa: E402
from mlsys_jax.cost import hlo as hlo_lib  # noqa: E402
from mlsys_jax.cost import programs  # noqa: E402
from mlsys_jax.cost._value_options import canonical_hlo  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "output directory (default $OUT, else experiments/data)")
flags.DEFINE_string("name", "cost_dataset", "file name stem of the dataset")
flags.DEFINE_bool("small", False, "tiny programs for a CPU smoke test")
flags.DEFINE_float("max_seconds", 480.0, "wall-clock budget of the whole collection")
flags.DEFINE_float("compile_frac", 0.55, "fraction of the budget spent compiling")
flags.DEFINE_integer("threads", 0, "compile threads (0: number of CPUs)")
flags.DEFINE_integer("max_groups", 100000, "stop after this many programs")
flags.DEFINE_integer("seed", 0, "program sampling seed")
flags.DEFINE_integer("rounds", 10, "timing rounds per variant (interleaved across variants)")
flags.DEFINE_float("target_ms", 3.0, "minimum wall time of one timed batch (inner loop)")
flags.DEFINE_float("save_every", 60.0, "seconds between partial saves")
flags.DEFINE_list("families", list(programs.FAMILIES),
                  "program families to draw from ('all': the 12 original + the session-12 extra families); a "
                  "family listed twice is drawn twice as often")
flags.DEFINE_list("exclude", [], "datasets (npz) whose programs are not collected again: a draw with the "
                  "family + config of one of their programs is skipped before compiling, and a program whose "
                  "default compilation has the graph (dataset.graph_fingerprint) of one of theirs is dropped")
flags.DEFINE_list("skip_variants", [], "option variants to leave out (e.g. after a backend crash)")
flags.DEFINE_integer("profile_calls", 0, "> 0: also run every variant this many times under the profiler "
                     "(one jax.profiler trace per --profile_chunk programs) and record its device time "
                     "(first kernel start to last kernel end, median over calls), summed kernel time, "
                     "kernel count and per-kernel median times; 0: off")
flags.DEFINE_integer("profile_chunk", 16, "programs per profiler trace")
flags.DEFINE_float("profile_gap_ms", 3.0, "host sleep between profiled calls (the idle gap that splits calls)")


def _now():
  return time.perf_counter()


def _time_batch(fn, args, n):
  t0 = _now()
  out = None
  for _ in range(n):
    out = fn(*args)
  jax.block_until_ready(out)
  return (_now() - t0) / n


def measure_peaks(small: bool) -> dict:
  """Peak matmul rate (bf16 and f32) and copy bandwidth, measured here (MLSys method: measure ceilings)."""
  out = {}
  n = 256 if small else 8192
  for dt in ("bfloat16", "float32"):
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dt)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    t = min(_time_batch(f, (a, a), 3 if small else 10) for _ in range(3))
    out[f"matmul_{dt}_flops_per_s"] = 2 * n ** 3 / t
  m = (1 << 16) if small else (1 << 28)
  x = jax.random.normal(jax.random.PRNGKey(2), (m,), jnp.float32)
  g = jax.jit(lambda a: a * 1.0001)
  jax.block_until_ready(g(x))
  t = min(_time_batch(g, (x,), 5 if small else 20) for _ in range(3))
  out["copy_bytes_per_s"] = 8.0 * m / t
  out["dispatch_floor_s"] = make_floor_probe()(200, 5)
  return out


def make_floor_probe():
  """A probe of the host's dispatch floor: ``probe(calls, reps)`` is the median over ``reps`` batches of the wall
  time per call of a trivial jitted program (``a + 1`` on 8 floats) called ``calls`` times back to back. The
  collection records it before any program (``meta['dispatch_floor_s']``), before each program's timing
  (``meta['dispatch_floor_timing_s']``: their median and quartiles) and at the end (``meta['dispatch_floor_end_s']``),
  so that a cost model can read the host's state while the programs were timed, not only at the start."""
  f1 = jax.jit(lambda a: a + 1)
  s = jnp.ones((8,))
  jax.block_until_ready(f1(s))

  def probe(calls: int = 20, reps: int = 3) -> float:
    if calls < 1 or reps < 1:
      raise ValueError(f"make_floor_probe: calls and reps must be >= 1, got {calls}, {reps}.")
    return float(np.median([_time_batch(f1, (s,), calls) for _ in range(reps)]))

  return probe


_LIB_PROBE_TARGETS = ("cublas", "cudnn", "gemm", "conv", "matmul", "onednn", "eigen")


def make_library_probe():
  """A probe of the host cost of programs that launch library calls (issue 24, session 27; recorded, not yet read
  by a model): ``probe(calls, reps)`` is a dict with the median over ``reps`` batches of the wall time per call of
  two small jitted programs called ``calls`` times back to back -- ``gemm``: one f32[128,128] x f32[128,128] dot,
  ``conv``: one 3x3 convolution of f32[1,16,16,16] to 16 channels -- each a single library call on a GPU (cuBLAS,
  cuDNN) whose device time is a few microseconds, so the time per call is the host's dispatch of a library call.
  Session 26's diagnosis found programs with library calls predicted ~1.2-1.6x slow on a new H100 host whose
  per-call idle the trivial-program floor (:func:`make_floor_probe`) did not track. ``probe.targets`` names the
  library call targets of each compiled probe (its optimized HLO's custom calls; empty on a backend that lowers
  them to its own kernels), so a reader knows what was timed."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  a = jax.random.normal(k1, (128, 128), jnp.float32)
  x = jax.random.normal(k2, (1, 16, 16, 16), jnp.float32)
  w = jax.random.normal(k1, (3, 3, 16, 16), jnp.float32) * 0.1
  gemm = jax.jit(lambda p, q: p @ q)
  conv = jax.jit(lambda p, q: jax.lax.conv_general_dilated(p, q, (1, 1), "SAME",
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC")))
  progs = {"gemm": (gemm, (a, a)), "conv": (conv, (x, w))}
  targets = {}
  for name, (fn, args) in progs.items():
    text = fn.lower(*args).compile().as_text() or ""
    found = sorted({t for t in re.findall(r'custom_call_target="([^"]+)"', text)
                    if any(s in t.lower() for s in _LIB_PROBE_TARGETS)})
    targets[name] = found
    jax.block_until_ready(fn(*args))

  def probe(calls: int = 20, reps: int = 3) -> dict:
    if calls < 1 or reps < 1:
      raise ValueError(f"make_library_probe: calls and reps must be >= 1, got {calls}, {reps}.")
    return {name: float(np.median([_time_batch(fn, args, calls) for _ in range(reps)]))
            for name, (fn, args) in progs.items()}

  probe.targets = targets
  return probe


def library_summary(probes) -> dict:
  """``meta['library_floor_timing_s']``: per probe program, the median, quartiles and count of the library-call
  probes taken during timing (``probes``: a list of :func:`make_library_probe` results)."""
  if not probes:
    return {}
  names = sorted(probes[0])
  if any(sorted(p) != names for p in probes):
    raise ValueError("library_summary: every probe must time the same programs.")
  return {n: floor_summary([p[n] for p in probes]) for n in names}


def floor_summary(floors) -> dict:
  """``meta['dispatch_floor_timing_s']``: the median, quartiles and count of the floors probed during timing."""
  f = np.asarray(floors, np.float64)
  if f.size == 0:
    return {"n": 0}
  if not np.all(np.isfinite(f) & (f > 0)):
    raise ValueError("floor_summary: every probed floor must be finite and > 0.")
  return {"n": int(f.size), "median": float(np.median(f)), "q25": float(np.quantile(f, 0.25)),
          "q75": float(np.quantile(f, 0.75))}


def compile_group(gid: int, spec: programs.ProgramSpec, variants, platform_name: str,
                  start_by: float = float("inf")) -> dict:
  """Compile one program under every option variant; keep distinct optimized HLO. A program whose
  thread becomes free only after ``start_by`` (perf_counter) is not compiled (``rec["late"]``): it
  would run past the compile phase and delay the timing phase."""
  rec = {"group": gid, "spec": spec, "variants": [], "errors": [], "late": False, "wall_s": 0.0}
  t_start = _now()
  if t_start > start_by:
    rec["late"] = True
    return rec
  seen = set()
  try:
    lowered = jax.jit(spec.fn).lower(*spec.args)
  except Exception as e:  # noqa: BLE001 - a program that does not lower is skipped
    rec["errors"].append(("lower", repr(e)[:300]))
    return rec
  for vname, opts in variants:
    t0 = _now()
    try:
      compiled = lowered.compile(compiler_options=opts) if opts else lowered.compile()
    except Exception as e:  # noqa: BLE001 - unknown option on this backend
      rec["errors"].append((vname, repr(e)[:300]))
      continue
    dt = _now() - t0
    text = hlo_lib.strip_metadata(compiled.as_text())
    h = hashlib.sha1(text.encode()).hexdigest()
    if h in seen:
      continue
    seen.add(h)
    cost = hlo_lib.cost_dict(compiled)
    rec["variants"].append({"variant": vname, "options": opts, "compiled": compiled, "hlo": text,
                            "compile_s": dt, "flops": cost.get("flops", 0.0),
                            "bytes_accessed": cost.get("bytes accessed", 0.0),
                            "transcendentals": cost.get("transcendentals", 0.0)})
  rec["wall_s"] = _now() - t_start
  return rec


def _device_events(trace_dir: str) -> list[tuple]:
  """GPU kernel events ``(start_ns, end_ns, duration_ns, name)`` of every stream line of the trace in
  ``trace_dir``, sorted by start (as ``benchmarks/common.device_stream_events``)."""
  import glob
  files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
  if not files:
    raise FileNotFoundError(f"no xplane file under {trace_dir}")
  prof = jax.profiler.ProfileData.from_file(files[0])
  return sorted((ev.start_ns, ev.end_ns, ev.duration_ns, ev.name)
                for plane in prof.planes if plane.name.startswith("/device:GPU")
                for line in plane.lines if "stream" in line.name.lower()
                for ev in line.events)


def profile_chunk(items: list, calls: int, gap_s: float) -> list:
  """Device times from ONE profiler trace: each ``(fn, args)`` of ``items`` runs ``calls`` times alone
  (block, sleep ``gap_s``); the kernel events are split into calls at idle gaps > ``gap_s / 2``
  (``ds.split_calls``). Returns per item ``{"device_span_s", "device_busy_s", "device_kernels",
  "kernel_times"}`` (see ``ds.call_times``). Raises when the trace does not split into one cluster per
  call (the caller then records no device times for the chunk)."""
  import shutil
  import tempfile
  d = tempfile.mkdtemp()
  try:
    with jax.profiler.trace(d):
      for fn, args in items:
        for _ in range(calls):
          jax.block_until_ready(fn(*args))
          time.sleep(gap_s)
    events = _device_events(d)
  finally:
    shutil.rmtree(d, ignore_errors=True)
  clusters = ds.split_calls(events, gap_s * 1e9 / 2)
  if len(clusters) != len(items) * calls:
    raise RuntimeError(f"{len(clusters)} kernel clusters for {len(items)} programs x {calls} calls")
  return [ds.call_times(clusters[k * calls:(k + 1) * calls]) for k in range(len(items))]


def time_group(rec: dict, rounds: int, target_s: float, floor_s: float, deadline: float,
               rng: np.random.Generator, args=None) -> list[dict]:
  """Time the variants of one program interleaved, in a new order every round
  (:func:`mlsys_jax.cost.dataset.timing_orders`); return dataset rows."""
  spec = rec["spec"]
  if args is None:
    args = programs.make_args(spec, rec["group"])
  jax.block_until_ready(args)
  vs = rec["variants"]
  inner, first = [0] * len(vs), [0.0] * len(vs)
  for j in rng.permutation(len(vs)):
    fn = vs[j]["compiled"]
    jax.block_until_ready(fn(*args))  # warm-up (loads the executable)
    t1 = _time_batch(fn, args, 1)
    t1 = min(t1, _time_batch(fn, args, 1))
    first[j] = t1
    inner[j] = int(np.clip(np.ceil(target_s / max(t1, 1e-7)), 1, 1000))
  times = [[] for _ in vs]
  slowest = max(first)
  if slowest > 0.02:  # long programs: fewer rounds (their timing noise is relatively small)
    rounds = max(5, rounds // 2)
  for order in ds.timing_orders(len(vs), rounds, rng):
    if _now() > deadline:
      break
    for j in order:
      times[j].append(_time_batch(vs[j]["compiled"], args, inner[j]))
  rows = []
  for j, v in enumerate(vs):
    t = np.asarray(times[j])
    if t.size < 3:
      continue
    med = float(np.median(t))
    mad = float(np.median(np.abs(t - med))) + 1e-12
    kept = t[np.abs(t - med) <= 5 * 1.4826 * mad]
    med = float(np.median(kept))
    q25, q75 = np.percentile(kept, [25, 75])
    iqr = float(q75 - q25)
    noisy = bool(iqr > 0.2 * med or med < 2 * floor_s)
    rows.append({"hlo": v["hlo"], "group": rec["group"], "family": spec.family, "variant": v["variant"],
                 "config": json.dumps(spec.config, sort_keys=True), "runtime_s": med,
                 "runtime_iqr_s": iqr, "runtime_min_s": float(kept.min()), "n_inner": inner[j],
                 "n_rounds": int(t.size), "noisy": noisy, "flops": v["flops"],
                 "bytes_accessed": v["bytes_accessed"], "transcendentals": v["transcendentals"],
                 "compile_s": v["compile_s"]})
  del args
  return rows


def main(argv):
  del argv
  t_start = _now()
  budget = FLAGS.max_seconds
  out_dir = FLAGS.out or os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "data")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, FLAGS.name + ".npz")
  dev = jax.devices()[0]
  plat = dev.platform
  variants = [v for v in programs.option_variants(plat) if v[0] not in FLAGS.skip_variants]
  print(f"device {getattr(dev, 'device_kind', plat)} ({plat}), jax {jax.__version__}, "
        f"{len(variants)} option variants, budget {budget:.0f}s", flush=True)
  peaks = measure_peaks(FLAGS.small)
  print("peaks:", {k: f"{v:.3g}" for k, v in peaks.items()}, flush=True)
  meta = {"device": getattr(dev, "device_kind", plat), "platform": plat, "jax": jax.__version__,
          "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
          "variants": [[n, o] for n, o in variants], "families": FLAGS.families, "seed": FLAGS.seed,
          "small": FLAGS.small, "rounds": FLAGS.rounds, "target_ms": FLAGS.target_ms,
          "timing_order": "rotated_random_per_round", **peaks,
          "provenance": provenance.record(script=__file__)}   # the dataset's meta: no input data

  # Phase 1: compile in a thread pool until the compile deadline.
  compile_deadline = t_start + FLAGS.compile_frac * budget
  threads = FLAGS.threads or (os.cpu_count() or 2)
  rng = np.random.default_rng(FLAGS.seed)
  fams = list(programs.ALL_FAMILIES) if list(FLAGS.families) == ["all"] else list(FLAGS.families)
  meta["families"] = fams
  # Dedupe: configs and graphs of the excluded datasets and of this run (graph, not raw text: names and
  # autotuning attributes differ between compiles of one program).
  seen_cfg, seen_fp = set(), set()
  for p in FLAGS.exclude:
    d = ds.load_dataset(p)
    seen_cfg.update(f"{f}:{c}" for f, c in zip(d.family, d.config))
    seen_fp.update(ds.graph_fingerprint(d.hlo[i]) for i in np.flatnonzero(d.variant == "default"))
  print(f"excluding {len(seen_cfg)} configs, {len(seen_fp)} graphs of {len(FLAGS.exclude)} datasets "
        f"({_now() - t_start:.0f} s)", flush=True)
  n_skip_cfg = n_skip_graph = n_no_default = n_late = 0
  fam_wall: dict = {}  # family -> compile wall times of its programs (one thread each)
  exhausted = False
  compiled: list[dict] = []
  n_err = {}
  gid = 0
  last_print = _now()
  with cf.ThreadPoolExecutor(threads) as pool:
    pending = set()
    while _now() < compile_deadline and gid < FLAGS.max_groups and not (exhausted and not pending):
      while len(pending) < 2 * threads and gid < FLAGS.max_groups and not exhausted:
        fam = fams[gid % len(fams)]
        spec = programs.sample_program(fam, rng, "cpu" if FLAGS.small else "gpu")
        gid += 1
        key = f"{spec.family}:{json.dumps(spec.config, sort_keys=True)}"
        if key in seen_cfg:  # drawn before (here or in an excluded dataset): no compile
          n_skip_cfg += 1
          exhausted = n_skip_cfg > 100 * (len(compiled) + 100)  # the configuration spaces are used up
          continue
        seen_cfg.add(key)
        # a program starts only if it should finish by the compile deadline: its family's longest
        # compile so far (of any family before one of its own; no limit before any), x 1.2
        walls = fam_wall.get(spec.family) or [max((w for v in fam_wall.values() for w in v), default=0.0)]
        pending.add(pool.submit(compile_group, gid - 1, spec, variants, plat,
                                compile_deadline - 1.2 * max(walls)))
      done, pending = cf.wait(pending, timeout=1.0, return_when=cf.FIRST_COMPLETED)
      for f in done:  # results are gathered here, in the main thread only
        rec = f.result()
        if rec["late"]:
          n_late += 1
          continue
        fam_wall.setdefault(rec["spec"].family, []).append(rec["wall_s"])
        for v, _ in rec["errors"]:
          n_err[v] = n_err.get(v, 0) + 1
        if not rec["variants"]:
          continue
        dflt = [v for v in rec["variants"] if v["variant"] == "default"]
        if not dflt:  # option choice needs the default compilation of every program
          n_no_default += 1
          continue
        try:
          fp = ds.graph_fingerprint(dflt[0]["hlo"])
        except Exception:  # noqa: BLE001 - text the parser rejects: dedupe on the canonical text instead
          fp = "text:" + hashlib.sha1(canonical_hlo(dflt[0]["hlo"]).encode()).hexdigest()
        if fp in seen_fp:
          n_skip_graph += 1
          continue
        seen_fp.add(fp)
        compiled.append(rec)
      if _now() - last_print > 30:
        last_print = _now()
        print(f"[{_now() - t_start:6.1f}s] compiled {len(compiled)} programs "
              f"({sum(len(r['variants']) for r in compiled)} variants), errors {n_err}", flush=True)
    for f in pending:
      f.cancel()
  n_var = sum(len(r["variants"]) for r in compiled)
  print(f"[{_now() - t_start:6.1f}s] compiled {len(compiled)} programs, {n_var} distinct variants; "
        f"compile errors by variant: {n_err}; skipped {n_skip_cfg} repeated configs, {n_skip_graph} repeated "
        f"graphs, {n_no_default} without a default compilation, {n_late} not started (too late)", flush=True)
  print("compile wall per program (median s): " + ", ".join(f"{k} {np.median(v):.1f}" for k, v in sorted(fam_wall.items())),
        flush=True)
  if n_err:
    ex = next((r["errors"][0] for r in compiled if r["errors"]), None)
    print("  example error:", ex, flush=True)

  # Phase 2: time, interleaving variants of one program; save partial results.
  order = np.random.default_rng(FLAGS.seed + 1).permutation(len(compiled))
  rows: list[dict] = []
  last_save = _now()
  deadline = t_start + budget
  n_timed = 0
  chunk: list = []   # (rows of one program, its variants, its args) awaiting the profiler
  n_prof = {"programs": 0, "failed_chunks": 0, "skipped_programs": 0}
  probe = make_floor_probe()
  floors: list[float] = []   # the host's dispatch floor before each program's timing
  lib_probe = make_library_probe()
  meta["library_probe_targets"] = lib_probe.targets
  meta["library_floor_s"] = lib_probe(100, 5)
  lib_floors: list[dict] = []   # the host cost of a library-call program, before each program's timing

  def run_profiler():
    items = [(v["compiled"], a) for _, vs, a in chunk for v in vs]
    est = sum(FLAGS.profile_calls * (r["runtime_s"] + FLAGS.profile_gap_ms / 1e3) for rr, _, _ in chunk for r in rr)
    if _now() + 2.0 + 1.5 * est > deadline - 5:
      n_prof["skipped_programs"] += len(chunk)
      return
    try:
      res = profile_chunk(items, FLAGS.profile_calls, FLAGS.profile_gap_ms / 1e3)
    except Exception as e:  # noqa: BLE001 - no device trace: the chunk keeps no device times
      n_prof["failed_chunks"] += 1
      print(f"  profiler chunk failed: {repr(e)[:200]}", flush=True)
      return
    k = 0
    for rr, vs, _ in chunk:
      by_variant = {r["variant"]: r for r in rr}
      for v in vs:
        if v["variant"] in by_variant:
          by_variant[v["variant"]].update(res[k])
        k += 1
      n_prof["programs"] += 1

  for k, i in enumerate(order):
    if _now() > deadline - 5:
      break
    rec = compiled[i]
    floors.append(probe(20, 3))
    lib_floors.append(lib_probe(10, 3))
    try:
      args = programs.make_args(rec["spec"], rec["group"])
      new_rows = time_group(rec, FLAGS.rounds, FLAGS.target_ms / 1e3, peaks["dispatch_floor_s"],
                            deadline - 5, np.random.default_rng([FLAGS.seed, 2, int(rec["group"])]), args)
      rows.extend(new_rows)
      n_timed += 1
      if FLAGS.profile_calls > 0 and new_rows:
        timed = {r["variant"] for r in new_rows}
        chunk.append((new_rows, [v for v in rec["variants"] if v["variant"] in timed], args))
    except Exception as e:  # noqa: BLE001 - e.g. out of memory for one program
      print(f"  group {rec['group']} ({rec['spec'].family}) failed to run: {repr(e)[:200]}", flush=True)
    args = None
    compiled[i] = None  # free executables (those awaiting the profiler are held by the chunk)
    if chunk and len(chunk) >= FLAGS.profile_chunk:
      run_profiler()
      chunk = []
    if _now() - last_save > FLAGS.save_every:
      ds.save_dataset(path, rows, {**meta, "partial": True})
      last_save = _now()
      print(f"[{_now() - t_start:6.1f}s] timed {n_timed}/{len(order)} programs, {len(rows)} rows "
            f"(saved; device times of {n_prof['programs']})", flush=True)
  if chunk:
    run_profiler()
    chunk = []
  meta["profile"] = {"calls": FLAGS.profile_calls, "chunk": FLAGS.profile_chunk, "gap_ms": FLAGS.profile_gap_ms,
                     **n_prof}
  meta["dispatch_floor_timing_s"] = floor_summary(floors)
  meta["dispatch_floor_end_s"] = probe(200, 5)
  meta["library_floor_timing_s"] = library_summary(lib_floors)
  meta["library_floor_end_s"] = lib_probe(100, 5)
  meta["partial"] = False
  meta["programs_compiled"] = len(order)
  meta["programs_timed"] = n_timed
  meta["compile_errors"] = n_err
  meta["skipped"] = {"repeated_config": n_skip_cfg, "repeated_graph": n_skip_graph, "no_default": n_no_default,
                     "late": n_late}
  meta["compile_wall_s"] = {k: float(np.median(v)) for k, v in fam_wall.items()}
  meta["exclude"] = [os.path.basename(p) for p in FLAGS.exclude]
  meta["name"] = FLAGS.name
  meta["seconds"] = _now() - t_start
  ds.save_dataset(path, rows, meta)
  noisy = sum(r["noisy"] for r in rows)
  fam_counts = {}
  for r in rows:
    fam_counts[r["family"]] = fam_counts.get(r["family"], 0) + 1
  print(f"[{_now() - t_start:6.1f}s] wrote {path}: {len(rows)} rows from {n_timed} programs, "
        f"{noisy} noisy; {os.path.getsize(path) / 1e6:.2f} MB; profiler: {meta['profile']}", flush=True)
  span = np.asarray([r.get("device_span_s", np.nan) for r in rows])
  if np.isfinite(span).any():
    wall = np.asarray([r["runtime_s"] for r in rows])
    ok = np.isfinite(span)
    print(f"device time / timed wall time: median {np.median(span[ok] / wall[ok]):.3f} "
          f"({ok.sum()} rows); rows with device time < 50% of wall: {np.mean(span[ok] < 0.5 * wall[ok]):.2f}",
          flush=True)
  print("rows per family:", fam_counts, flush=True)
  ft = meta["dispatch_floor_timing_s"]
  lt = meta["library_floor_timing_s"]
  print(f"dispatch floor (us): start {meta['dispatch_floor_s'] * 1e6:.1f}, in-timing median "
        f"{ft.get('median', float('nan')) * 1e6:.1f}, end {meta['dispatch_floor_end_s'] * 1e6:.1f}", flush=True)
  for n in sorted(meta["library_floor_s"]):
    print(f"library probe {n} {meta['library_probe_targets'].get(n)} (us): start "
          f"{meta['library_floor_s'][n] * 1e6:.1f}, in-timing median "
          f"{lt.get(n, {}).get('median', float('nan')) * 1e6:.1f}, end {meta['library_floor_end_s'][n] * 1e6:.1f}",
          flush=True)
  if rows:
    rt = np.asarray([r["runtime_s"] for r in rows])
    print(f"runtime median {np.median(rt) * 1e6:.1f} us, range {rt.min() * 1e6:.1f} .. "
          f"{rt.max() * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
  app.run(main)
