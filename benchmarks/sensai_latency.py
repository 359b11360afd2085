"""Batch-1 latency of sensAI class-group subnets (Wang et al., MLSys 2021) against the original network, on
XLA CPU with simulated host devices (one class group per device), in ONE process:

1. train the original briefly (synthetic CIFAR-like data, or CIFAR-10 from ``--data_dir``), group the
   classes (equal-size k-means on penultimate features), APoZ per group, prune to ``--keep`` of the
   channels per layer, build the ``m + 1``-way subnets (no retraining: latency does not depend on the
   weights' values; the widths come from the real pipeline);
2. compile every entry under every XLA CPU option set of ``--options`` (per executable, through
   ``jit(...).lower(...).compile(options)``): the original, each subnet alone, the one-device branch
   ensemble (``make_branch_predictor``) and the ``shard_map`` ensemble (``make_sharded_predictor``: one
   group per device, weights placed once, one ``all_gather``);
3. time everything round-robin (every round calls every entry once, in a rotating order): ``call`` is
   one call per inference as a user makes it, a fresh numpy image each time (host-to-device transfer,
   dispatch, compute, result ready), ``--inner`` calls in a row per entry and round, the first of them
   (caches cold after the other entries) reported apart; ``loop`` is the time per inference of ``--loop`` dependent
   inferences inside one jitted ``fori_loop`` (compute and, for the ensemble, its collectives).

Speed-ups are reported against the same option set's original and against the BEST original over all
option sets (the strongest one-device baseline). Raw medians (seconds) go to the JSON.

  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      PYTHONPATH=. python benchmarks/sensai_latency.py --out $OUT --tag cpu8   # multi-core CPU host
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      PYTHONPATH=. python benchmarks/sensai_latency.py --small                 # smoke test
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mlsys_jax import data, models  # noqa: E402
from mlsys_jax.infer import sensai  # noqa: E402

_YNN_ALL = "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
# XLA CPU option sets (DebugOptions fields), applied per executable to every entry alike.
OPTION_SETS = {
    "default": {},
    "default_st": {"xla_cpu_multi_thread_eigen": False},
    "ynn_conv": {"xla_cpu_experimental_ynn_fusion_type": _YNN_ALL},
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "eigen_st": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_multi_thread_eigen": False},
    # XLA's own loops (pools, bias + ReLU fusions) at 512-bit vectors (default 256) where the CPU has AVX-512
    "eigen_v512": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_prefer_vector_width": 512},
    "eigen_st_v512": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_multi_thread_eigen": False,
                      "xla_cpu_prefer_vector_width": 512},
    # XNNPACK (built for batch-1 NHWC inference) per convolution / dot; oneDNN custom calls (Intel CPUs)
    "xnn_ind": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_experimental_xnn_fusion_type": _YNN_ALL,
                "xla_cpu_prefer_vector_width": 512},
    "onednn": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_experimental_onednn_custom_call": True,
               "xla_cpu_prefer_vector_width": 512},
}

CONFIGS = {   # name: (model, input shape, keep fraction)
    "cnn-small": (models.CNN(num_classes=10, channels=(16, 32), hidden=64), (16, 16, 3)),
    "cnn-cifar": (models.CNN(num_classes=10, channels=(64, 128, 256), hidden=512), (32, 32, 3)),
    "cnn-cifar-wide": (models.CNN(num_classes=10, channels=(128, 256, 512), hidden=1024), (32, 32, 3)),
    "resnet20-w64": (models.ResNet20(num_classes=10, width=64), (32, 32, 3)),
}


def loop_fn(apply_fn, n: int):
  """``n`` dependent batch-1 inferences in ONE jitted loop, ``(variables, x) -> x``: each input is nudged
  by the previous output, so nothing is hoisted."""
  def run(variables, x):
    def body(_, x):
      return x + 1e-6 * jnp.tanh(jnp.sum(apply_fn(variables, x)))
    return jax.lax.fori_loop(0, n, body, x)
  return jax.jit(run)


def batch1_latency(entries: dict, x1, *, repeats: int = 100, loop: int = 200) -> dict:
  """Latency (seconds) of every entry ``name -> (apply_fn(variables, x), variables)`` at batch 1, each
  timed interleaved with the FIRST entry (the baseline), per call and per inference inside a loop
  (used by ``experiments/sensai_eval.py``)."""
  from mlsys_jax import stats
  names = list(entries)
  f0, v0 = entries[names[0]]
  j0, l0 = jax.jit(f0), loop_fn(f0, loop)
  out = {}
  for name in names[1:]:
    f, v = entries[name]
    j, lf = jax.jit(f), loop_fn(f, loop)
    tc = stats.time_interleaved(lambda: j0(v0, x1), lambda: j(v, x1), repeats=repeats, warmup=5)
    tl = stats.time_interleaved(lambda: l0(v0, x1), lambda: lf(v, x1), repeats=max(15, repeats // 5), warmup=2)
    out[name] = {"call_baseline_s": tc.median_a, "call_s": tc.median_b, "call_speedup": tc.ratio ** -1,
                 "call_p_faster": 1.0 - tc.p_a_faster,
                 "loop_baseline_s": tl.median_a / loop, "loop_s": tl.median_b / loop,
                 "loop_speedup": tl.median_a / tl.median_b}
  return out


def round_robin(fns: dict, rounds: int, inner: int = 1, warmup: int = 2) -> dict:
  """Timing (seconds) of zero-argument callables, round-robin: every round runs every entry (the order
  rotating by one each round) for ``inner`` consecutive calls, each blocked on and timed alone. With
  ``inner > 1`` the first call of a block (caches cold after the other entries) is kept apart as
  ``cold_median_s``; the statistics come from the other ``inner - 1`` calls (a server calling the same
  network again and again)."""
  names = list(fns)
  warm = {k: [] for k in names}
  cold = {k: [] for k in names}
  for r in range(warmup + rounds):
    for i in range(len(names)):
      k = names[(i + r) % len(names)]
      for j in range(inner):
        t0 = time.perf_counter()
        jax.block_until_ready(fns[k]())
        dt = time.perf_counter() - t0
        if r >= warmup:
          (cold if j == 0 and inner > 1 else warm)[k].append(dt)
  out = {}
  for k, t in warm.items():
    out[k] = {"median_s": float(np.median(t)), "p25_s": float(np.percentile(t, 25)),
              "p75_s": float(np.percentile(t, 75)), "min_s": float(np.min(t)), "n": len(t)}
    if cold[k]:
      out[k]["cold_median_s"] = float(np.median(cold[k]))
  return out


def profile_ops(fn, calls: int = 30) -> dict:
  """Per-operation profile of ``fn()`` (a compiled XLA CPU executable compiled with
  ``xla_cpu_enable_xprof_traceme``) over ``calls`` calls: mean microseconds per call of every event name
  and how many events ran on each kind of thread (the client thread that launched the program, or the
  intra-op pool ``XLAEigen``)."""
  import collections
  import glob
  import tempfile
  for _ in range(3):
    jax.block_until_ready(fn())
  d = tempfile.mkdtemp()
  with jax.profiler.trace(d):
    for _ in range(calls):
      jax.block_until_ready(fn())
  files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
  if not files:
    return {}
  ops, threads = collections.defaultdict(float), collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(files[0]).planes:
    for line in plane.lines:
      kind = line.name.split("/")[0]
      for ev in line.events:
        if ev.name.startswith("$"):   # Python frames
          continue
        ops[f"{kind}:{ev.name[:60]}"] += ev.duration_ns / 1e3 / calls
        threads[kind] += 1
  top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:30])
  return {"us_per_call": top, "events_per_thread_kind": {k: v / calls for k, v in threads.items()}}


def parse_keep(spec: str) -> dict:
  """``"0.3"`` -> keep_fraction 0.3; ``"0.3m8"`` -> also every width rounded up to a multiple of 8."""
  f, _, m = str(spec).partition("m")
  return {"keep_fraction": float(f), "multiple_of": int(m) if m else None}


def build(name: str, keeps: list[str], groups: int, data_dir: str | None, epochs: int, seed: int = 0) -> dict:
  """Train briefly, group, APoZ, prune: the real pipeline, returning the model and its subnets."""
  model, shape = CONFIGS[name]
  t0 = time.perf_counter()
  if data_dir and shape == (32, 32, 3):
    ds = data.load_dataset("cifar10", seed=seed, data_dir=data_dir)
    n = 4096
    ds = ds._replace(x_train=ds.x_train[:n], y_train=ds.y_train[:n], x_test=ds.x_test[:512],
                     y_test=ds.y_test[:512])
  else:
    ds = data.synthetic_classification(seed=seed, num_samples=1280, shape=shape, num_classes=10, noise=1.0)
  variables, hist = models.train_classifier(model, ds, optax.adam(1e-3), epochs=epochs, batch_size=64,
                                            seed=seed)
  t_train = time.perf_counter() - t0
  feats = sensai.penultimate_features(model, variables, ds.x_train)
  cls = sensai.group_classes(feats, ds.y_train, groups)
  stats = [sensai.channel_stats(model, variables, ds.x_train[np.isin(ds.y_train, g)]) for g in cls]
  subs = {keep: [sensai.make_subnet(model, variables, g, sensai.prune_masks(st, **parse_keep(keep)))
                 for g, st in zip(cls, stats)] for keep in keeps}
  return {"model": model, "variables": variables, "shape": shape, "subnets": subs, "groups": cls,
          "data": ds.name, "train_s": t_train, "prune_s": time.perf_counter() - t0 - t_train,
          "original_test_accuracy": float(hist["test_accuracy"][-1])}


def run_config(name: str, args, options: list[str], t_start: float) -> dict:
  t_config = time.perf_counter()
  keeps = str(args.keep).split(",")
  b = build(name, keeps, args.groups, args.data_dir, args.epochs)
  model, variables, shape, subs_by_keep = b["model"], b["variables"], b["shape"], b["subnets"]
  dev0 = jax.devices()[0]
  put0 = lambda t: jax.device_put(t, dev0)
  apply = lambda m: (lambda v, xx: m.apply(v, xx, train=False))
  one_device = {"original": (apply(model), put0(variables))}
  sharded_entries = {}
  for keep, subs in subs_by_keep.items():
    tag = "" if len(keeps) == 1 else f"@{keep}"
    s = len(subs)
    for i, sub in enumerate(subs[:args.max_subnets]):
      one_device[f"subnet_{i}{tag}"] = (apply(sub.model), put0(sub.variables))
    if not args.no_branch:
      branch = sensai.make_branch_predictor(subs, 10)
      one_device[f"branch_ensemble{tag}"] = (branch.func, put0(branch.args[0]))
    if jax.device_count() >= s:
      sharded = sensai.make_sharded_predictor(subs, 10)   # one group per device, weights placed once
      sharded_entries[f"shard_map_ensemble_{s}dev{tag}"] = (sharded.fn, sharded.variables,
                                                            loop_fn(sharded.fn, args.loop), None)
      if not args.no_hostcombine:
        host = sensai.make_sharded_predictor(subs, 10, combine_on_host=True)   # no collective; numpy combine
        sharded_entries[f"shard_map_hostcombine_{s}dev{tag}"] = (
            host.fn, host.variables, None,
            lambda z, host=host: sensai._combine_padded_np(np.asarray(z), host.valid, host.assign,
                                                           host.temperatures))
  entries = {k: (jax.jit(f), v, loop_fn(f, args.loop), None) for k, (f, v) in one_device.items()}
  entries.update(sharded_entries)
  rng = np.random.default_rng(1)
  images = [rng.normal(size=(1, *shape)).astype(np.float32) for _ in range(16)]
  x_dev = {}
  calls, loops, compile_s = {}, {}, {}
  for n_opt, opt in enumerate(options):
    if n_opt and time.perf_counter() - t_config > args.compile_budget_s:
      print(f"{name}: compile_budget_s spent, option sets {options[n_opt:]} left out", flush=True)
      break
    o = OPTION_SETS[opt]
    for k, (jf, v, lf, post) in entries.items():
      t0 = time.perf_counter()
      try:
        c = jf.lower(v, images[0]).compile(o)
        xs = c.input_shardings[0][1]
        x_dev[k] = jax.device_put(images[0], xs)
        cl = None if lf is None else lf.lower(v, x_dev[k]).compile(o)
      except Exception as e:   # an option set this XLA does not know: record it, skip the entry
        print(f"{name} {opt} {k}: compile failed: {str(e)[:200]}")
        continue
      compile_s[f"{opt}/{k}"] = time.perf_counter() - t0
      ctr = iter(range(1 << 30))
      post = post or (lambda z: z)
      calls[f"{opt}/{k}"] = (lambda c=c, v=v, ctr=ctr, post=post: post(c(v, images[next(ctr) % len(images)])))
      if args.aligned:   # as ShardedPredictor.__call__: the numpy image copied to a 64-byte aligned one
        ctr3 = iter(range(1 << 30))   # (the copy is timed; XLA CPU can use an aligned array in place)
        calls[f"{opt}/{k}+aligned"] = (lambda c=c, v=v, ctr=ctr3, post=post:
                                       post(c(v, sensai.host_aligned(images[next(ctr) % len(images)]))))
      if args.put:   # as ShardedPredictor.__call__: ONE explicit device_put of the numpy image, then the call
        ctr2 = iter(range(1 << 30))
        calls[f"{opt}/{k}+put"] = (lambda c=c, v=v, ctr=ctr2, post=post, xs=xs:
                                   post(c(v, jax.device_put(images[next(ctr) % len(images)], xs))))
      if cl is not None:
        loops[f"{opt}/{k}"] = (lambda cl=cl, v=v, x=x_dev[k]: cl(v, x))
      if args.placed and (k == "original" or k.startswith("shard_map_ensemble")):
        # the same executable called on an image already on its device(s): transfer left out
        calls[f"{opt}/{k}+placed"] = (lambda c=c, v=v, x=x_dev[k]: c(v, x))
  # exactness of what is timed: the sharded ensemble against the one-device branch program
  check = {}
  for keep, subs in subs_by_keep.items():
    ref = np.asarray(sensai.make_branch_predictor(subs, 10)(images[0]))
    tag = "" if len(keeps) == 1 else f"@{keep}"
    check.update({k: float(np.max(np.abs(np.asarray(f()) - ref))) for k, f in calls.items()
                  if ("ensemble" in k or "shard_map" in k) and k.split("+")[0].endswith(tag)})
  print(f"{name}: trained {b['train_s']:.1f}s, pruned {b['prune_s']:.1f}s, compiled {sum(compile_s.values()):.1f}s "
        f"({len(calls)} entries); elapsed {time.perf_counter() - t_start:.0f}s", flush=True)
  profile = {}
  if args.profile:
    o = dict(OPTION_SETS[options[0]], xla_cpu_enable_xprof_traceme=True)
    for k in ("original", "subnet_0" if len(keeps) == 1 else f"subnet_0@{keeps[-1]}"):
      jf, v, _, _ = entries[k]
      try:
        c = jf.lower(v, images[0]).compile(o)
        profile[k] = profile_ops(lambda c=c, v=v: c(v, images[0]))
      except Exception as e:
        profile[k] = {"error": str(e)[:200]}
  call_t = round_robin(calls, args.repeats, inner=args.inner)
  loop_t = round_robin(loops, args.loop_repeats, warmup=1)
  for t in loop_t.values():
    for q in ("median_s", "p25_s", "p75_s", "min_s", "cold_median_s"):
      if q not in t:
        continue
      t[q] /= args.loop
  widths = {str(keep): [[int(np.shape(a)[-1]) for a in jax.tree_util.tree_leaves(sub.variables["params"])
                         if np.ndim(a) == 1] for sub in subs] for keep, subs in subs_by_keep.items()}
  return {"config": name, "input_shape": list(shape), "data": b["data"], "groups": [list(g) for g in b["groups"]],
          "keep_fraction": keeps, "train_s": b["train_s"], "prune_s": b["prune_s"],
          "original_test_accuracy": b["original_test_accuracy"],
          "original_flops": sensai.count_flops(model, variables, shape),
          "subnet_flops": {str(keep): [sensai.count_flops(sub.model, sub.variables, shape) for sub in subs]
                           for keep, subs in subs_by_keep.items()},
          "original_params": sensai.count_params(variables),
          "subnet_params": {str(keep): [sensai.count_params(sub.variables) for sub in subs]
                            for keep, subs in subs_by_keep.items()},
          "subnet_bias_widths": widths, "options": {k: OPTION_SETS[k] for k in options},
          "compile_s": compile_s, "ensemble_max_abs_diff_vs_branch": check, "profile": profile,
          "call": call_t, "loop": loop_t, "loop_length": args.loop, "summary": summarise(call_t, loop_t)}


def summarise(call_t: dict, loop_t: dict) -> dict:
  """Speed-ups (original time / entry time) against the same option set's original and the best one
  (``...+placed`` entries against the original called on a placed image; every other call entry against
  the fastest of the original called on the numpy image, ``original+put`` and ``original+aligned``)."""
  out = {}
  for mode, t in (("call", call_t), ("loop", loop_t)):
    origs, origs_placed = ({k.split("/")[0]: v["median_s"] for k, v in t.items() if k.endswith(suffix)}
                           for suffix in ("/original", "/original+placed"))
    for k, v in t.items():
      if k.endswith("/original+put") or k.endswith("/original+aligned"):
        o = k.split("/")[0]
        origs[o] = min(origs.get(o, np.inf), v["median_s"])
    if not origs:
      continue
    best_opt = min(origs, key=origs.get)
    entries = sorted({k.split("/")[1] for k in t})
    per = {}
    for e in entries:
      base = origs_placed if e.endswith("+placed") and origs_placed else origs
      best_base = min(base.values())
      times = {k.split("/")[0]: v["median_s"] for k, v in t.items() if k.split("/")[1] == e}
      bo = min(times, key=times.get)
      per[e] = {"best_option": bo, "best_s": times[bo], "speedup_vs_best_original": best_base / times[bo],
                "speedup_same_option": {o: base[o] / times[o] for o in times if o in base}}
    out[mode] = {"best_original_option": best_opt, "best_original_s": origs[best_opt], "entries": per}
  return out


def main():
  from benchmarks.common import environment, parse_args, print_table, write_json

  def extra(ap):
    ap.add_argument("--configs", default="cnn-cifar,cnn-cifar-wide")
    ap.add_argument("--options", default="default,default_st,ynn_conv,eigen,eigen_st")
    ap.add_argument("--keep", default="0.4", help="keep_fraction of every pruned layer (comma-separated: "
                    "several sets of subnets, each against the same original); '0.3m8': widths rounded up "
                    "to multiples of 8")
    ap.add_argument("--no_hostcombine", action="store_true", help="leave out the host-combination entry")
    ap.add_argument("--placed", action="store_true", help="also time calls of the original and the sharded "
                    "ensemble on an image already placed on the device(s)")
    ap.add_argument("--max_subnets", type=int, default=None, help="time only the first N subnets of each "
                    "keep alone (all subnets of one keep fraction have the same widths)")
    ap.add_argument("--no_branch", action="store_true", help="leave out the one-device branch ensemble")
    ap.add_argument("--aligned", action="store_true", help="also time every call with the numpy image "
                    "first copied to a 64-byte aligned array (sensai.host_aligned, as ShardedPredictor does)")
    ap.add_argument("--put", action="store_true", help="also time every call with an explicit "
                    "jax.device_put of the numpy image to the entry's input sharding before the call")
    ap.add_argument("--sync_dispatch", action="store_true",
                    help="jax_cpu_enable_async_dispatch=False: each one-device call runs in the calling thread")
    ap.add_argument("--profile", action="store_true",
                    help="per-operation profile (xprof) of the original and subnet_0 under the first option set")
    ap.add_argument("--groups", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=12, help="round-robin rounds of the per-call timing")
    ap.add_argument("--inner", type=int, default=6, help="consecutive calls of one entry per round (the "
                    "first, cache-cold, is reported apart)")
    ap.add_argument("--loop", type=int, default=20, help="inferences per jitted loop")
    ap.add_argument("--loop_repeats", type=int, default=8)
    ap.add_argument("--data_dir", default=None, help="CIFAR-10 binary batches (default: synthetic data)")
    ap.add_argument("--budget_s", type=float, default=1e9, help="start no new config after this many s")
    ap.add_argument("--compile_budget_s", type=float, default=1e9,
                    help="per config: compile no further option set (beyond the first) after this many s")
    ap.add_argument("--tag", default="", help="suffix of the JSON name (e.g. cpu8)")
  args = parse_args(__doc__, extra)
  if args.sync_dispatch:   # before the backend starts
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  t_start = time.perf_counter()
  env = environment()
  env.update({"xla_flags": os.environ.get("XLA_FLAGS", ""), "async_dispatch": not args.sync_dispatch, "os_cpu_count": os.cpu_count(),
              "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None})
  try:
    env["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if "model name" in l)
  except (OSError, StopIteration):
    pass
  if args.small:
    args.configs, args.repeats, args.inner, args.loop, args.loop_repeats = "cnn-small", 4, 3, 5, 3
    args.options = "default,eigen_st"
  options = args.options.split(",")
  name = "sensai_latency" + (f"_{args.tag}" if args.tag else "")
  results, rows = [], []
  for c in args.configs.split(","):
    if time.perf_counter() - t_start > args.budget_s:
      print(f"budget spent: {c} skipped")
      continue
    r = run_config(c, args, options, t_start)
    results.append(r)
    write_json(args.out, name, {"env": env, "args": vars(args), "results": results})
    for mode in r["summary"]:
      sm = r["summary"][mode]
      for e, v in sm["entries"].items():
        rows.append({"config": c, "mode": mode, "entry": e, "best option": v["best_option"],
                     "us": v["best_s"] * 1e6, "best orig us": sm["best_original_s"] * 1e6,
                     "x vs best orig": v["speedup_vs_best_original"],
                     **{f"x {o}": v["speedup_same_option"].get(o, "") for o in options}})
  print(env)
  print_table(rows, ["config", "mode", "entry", "best option", "us", "best orig us", "x vs best orig",
                     *[f"x {o}" for o in options]])
  print(f"total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
  main()
