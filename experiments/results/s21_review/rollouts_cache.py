"""Time random rollouts of cost.value's decision process on SqueezeNet and Inception-V3 (the IOS benchmark
nets, small=True, part_size=20 as experiments/value_eval.py builds them) with the unit -> part map cached
per graph (head) against the map rebuilt from g.blocks on every call (before: the pre-cache body of
value._part_of, patched in). Both variants run in ONE process, interleaved repeat by repeat, with the
same seeds; the script also checks that both give the same actions (every decision's action list and
choice) and the same final schedules.

Usage (from the repository root):
  nice -n 5 python experiments/results/s21_review/rollouts_cache.py \
      --out experiments/results/s21_review/rollouts_cache.json --repeats 7 --rollouts 20"""
import argparse, hashlib, json, platform, statistics, subprocess, sys, time

import jax.numpy as jnp
import numpy as np

import mlsys_jax
from mlsys_jax import sched
from mlsys_jax.cost import value as V
from mlsys_jax.models.ios_nets import ios_benchmark_nets, ios_init_params

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--repeats", type=int, default=7)
ap.add_argument("--rollouts", type=int, default=20)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()

cached_part_of = V._part_of


def uncached_part_of(g):   # value._part_of before the cache (session 21), verbatim
  return {u: i for i, part in enumerate(g.blocks) for u in part}


def run(info, seed, n, log=None):
  rng = np.random.default_rng(seed)
  pol = V.random_policy(rng, 0.3)
  if log is not None:
    inner = pol

    def pol(state, u, acts):
      c = inner(state, u, acts)
      log.update(repr((u, acts, c)).encode())
      return c
  finals = []
  t0 = time.perf_counter()
  for _ in range(n):
    finals.append(V.rollout(info, pol, 3, 8)[1].stages)
  return time.perf_counter() - t0, finals


res = {"argv": sys.argv, "mlsys_jax": mlsys_jax.__file__, "python": platform.python_version(),
       "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
       "rollouts_per_timing": a.rollouts, "repeats": a.repeats, "r": 3, "s": 8, "p_new": 0.3, "nets": {}}
for net in ("squeezenet", "inception_v3"):
  model, shape = ios_benchmark_nets(small=True)[net]
  params = ios_init_params(model, shape)
  g = sched.build_graph(lambda x: model.apply(params, x), jnp.ones(shape), part_size=20)
  info = V.graph_info(g)
  # identical outputs: action lists, choices and final schedules of the same seeds
  same = {}
  for name, fn in (("before", uncached_part_of), ("cached", cached_part_of)):
    V._part_of = fn
    h = hashlib.sha256()
    _, finals = run(info, a.seed, a.rollouts, h)
    same[name] = (h.hexdigest(), finals)
  V._part_of = cached_part_of
  identical = same["before"] == same["cached"]
  assert identical, f"{net}: the cached part map changed the rollouts"
  times = {"before": [], "cached": []}
  run(info, a.seed, 2)   # warm-up (caches of merge keys are per rollout; nothing compiles)
  for rep in range(a.repeats):
    order = ("before", "cached") if rep % 2 == 0 else ("cached", "before")
    for name in order:
      V._part_of = uncached_part_of if name == "before" else cached_part_of
      t, _ = run(info, a.seed + 1 + rep, a.rollouts)
      times[name].append(t / a.rollouts * 1e3)
  V._part_of = cached_part_of
  med = {k: statistics.median(v) for k, v in times.items()}
  res["nets"][net] = {"units": len(g.units), "parts": len(g.blocks), "decisions_per_rollout": len(info.order),
                      "identical_actions_and_schedules": identical, "actions_sha256": same["cached"][0],
                      "ms_per_rollout": {k: {"runs": v, "median": med[k]} for k, v in times.items()},
                      "speedup_median": med["before"] / med["cached"]}
  print(net, len(g.units), "units", {k: round(v, 3) for k, v in med.items()},
        "speedup", round(med["before"] / med["cached"], 3), flush=True)
json.dump(res, open(a.out, "w"), indent=1)
