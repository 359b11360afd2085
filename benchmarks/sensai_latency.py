"""Batch-1 latency of sensAI class-group subnets (Wang et al., MLSys 2021) against the original network:
each subnet alone, all subnets as one vmapped program, and (where several devices exist) one group of
subnets per device under shard_map.

Subnets come from the library's pipeline (APoZ on random inputs, ``keep_fraction`` of the channels per
layer, ``m + 1``-way heads) on randomly initialised weights: latency does not depend on the values.
Two timings per entry, each interleaved with the original (``mlsys_jax.stats.time_interleaved``):
``call`` is one jitted call per inference as a server would make it (dispatch included); ``loop`` is
the time per inference of ``--loop`` dependent inferences inside one jitted ``fori_loop`` (device
compute without dispatch).

  PYTHONPATH=. python benchmarks/sensai_latency.py --out $OUT                       # GPU
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      PYTHONPATH=. python benchmarks/sensai_latency.py --out $OUT --tag cpu8        # multi-core CPU host
  python benchmarks/sensai_latency.py --small                                       # CPU smoke test
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from mlsys_jax import models, stats  # noqa: E402
from mlsys_jax.infer import sensai  # noqa: E402


def loop_fn(apply_fn, variables, n: int):
  """``n`` dependent batch-1 inferences in ONE jitted loop: each input is nudged by the previous output
  (so nothing is hoisted); returns a function of the first input."""
  @jax.jit
  def run(x):
    def body(_, x):
      return x + 1e-6 * jnp.tanh(jnp.sum(apply_fn(variables, x)))
    return jax.lax.fori_loop(0, n, body, x)
  return run


def batch1_latency(entries: dict, x1, *, repeats: int = 100, loop: int = 200) -> dict:
  """Latency (seconds) of every entry ``name -> (apply_fn(variables, x), variables)`` at batch 1, each
  timed interleaved with the FIRST entry (the baseline), per call and per inference inside a loop."""
  names = list(entries)
  f0, v0 = entries[names[0]]
  j0 = jax.jit(f0)
  l0 = loop_fn(f0, v0, loop)
  out = {}
  for name in names[1:]:
    f, v = entries[name]
    j = jax.jit(f)
    lf = loop_fn(f, v, loop)
    tc = stats.time_interleaved(lambda: j0(v0, x1), lambda: j(v, x1), repeats=repeats, warmup=5)
    tl = stats.time_interleaved(lambda: l0(x1), lambda: lf(x1), repeats=max(15, repeats // 5), warmup=2)
    out[name] = {"call_baseline_s": tc.median_a, "call_s": tc.median_b, "call_speedup": tc.ratio ** -1,
                 "call_p_faster": 1.0 - tc.p_a_faster,
                 "loop_baseline_s": tl.median_a / loop, "loop_s": tl.median_b / loop,
                 "loop_speedup": tl.median_a / tl.median_b}
  return out


def _config(name: str):
  if name == "cnn-digits":
    return models.CNN(num_classes=10, channels=(64, 128), hidden=256), (8, 8, 1), 5, 0.4
  if name == "cnn-cifar":
    return models.CNN(num_classes=10, channels=(64, 128, 256), hidden=512), (32, 32, 3), 5, 0.4
  if name == "resnet20-cifar":
    return models.ResNet20(num_classes=10), (32, 32, 3), 5, 0.25
  raise ValueError(name)


def run_config(name: str, repeats: int, loop: int) -> dict:
  model, shape, ngroups, keep = _config(name)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, *shape)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
  masks = sensai.prune_masks(sensai.channel_stats(model, variables, x), keep_fraction=keep)
  groups = sensai.group_classes_contiguous(10, ngroups)
  subs = [sensai.make_subnet(model, variables, g, masks) for g in groups]
  ens = sensai.stack_subnets(subs, 10)
  x1 = jnp.asarray(x[:1])
  apply = lambda m: (lambda v, xx: m.apply(v, xx, train=False))
  entries = {"original": (apply(model), variables), "subnet_0": (apply(subs[0].model), subs[0].variables),
             "vmapped_ensemble": (lambda v, xx: sensai._ensemble_predict(
                 ens.model, v, ens.valid, ens.assign, ens.temperatures, xx), ens.variables)}
  branches = sensai.make_branch_predictor(subs, 10)   # a partial of a jitted fn(variables, x)
  entries["branch_ensemble"] = (branches.func, branches.args[0])
  if jax.device_count() >= 2:
    divisors = [k for k in range(2, min(len(subs), jax.device_count()) + 1) if len(subs) % k == 0]
    if divisors:
      d = max(divisors)
      mesh = Mesh(np.array(jax.devices()[:d]), ("g",))
      f = sensai._sharded_fn(ens.model, mesh, "g")
      entries[f"shard_map_ensemble_{d}dev"] = (
          lambda v, xx: f(v, ens.valid, ens.assign, ens.temperatures, xx), ens.variables)
  lat = batch1_latency(entries, x1, repeats=repeats, loop=loop)
  flops0 = sensai.count_flops(model, variables, shape)
  return {"config": name, "input_shape": list(shape), "groups": ngroups, "keep_fraction": keep,
          "original_flops": flops0, "subnet_flops": sensai.count_flops(subs[0].model, subs[0].variables, shape),
          "original_params": sensai.count_params(variables), "subnet_params": sensai.count_params(subs[0].variables),
          "latency": lat}


def main():
  from benchmarks.common import environment, parse_args, print_table, write_json

  def extra(ap):
    ap.add_argument("--configs", default="cnn-digits,cnn-cifar,resnet20-cifar")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--loop", type=int, default=200)
    ap.add_argument("--tag", default="", help="suffix of the JSON name (e.g. cpu8)")
  args = parse_args(__doc__, extra)
  env = environment()
  configs = ["cnn-digits"] if args.small else args.configs.split(",")
  repeats, loop = (20, 20) if args.small else (args.repeats, args.loop)
  results, rows = [], []
  for c in configs:
    r = run_config(c, repeats, loop)
    results.append(r)
    for k, v in r["latency"].items():
      rows.append({"config": c, "entry": k, "flops frac": round(r["subnet_flops"] / r["original_flops"], 3)
                   if k == "subnet_0" else "", "call us": round(v["call_s"] * 1e6, 1),
                   "orig call us": round(v["call_baseline_s"] * 1e6, 1), "call x": round(v["call_speedup"], 2),
                   "loop us": round(v["loop_s"] * 1e6, 2), "orig loop us": round(v["loop_baseline_s"] * 1e6, 2),
                   "loop x": round(v["loop_speedup"], 2)})
  print(env)
  print_table(rows, ["config", "entry", "flops frac", "call us", "orig call us", "call x", "loop us",
                     "orig loop us", "loop x"])
  write_json(args.out, "sensai_latency" + (f"_{args.tag}" if args.tag else ""), {"env": env, "results": results})


if __name__ == "__main__":
  main()
