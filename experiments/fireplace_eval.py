"""FirePlace (Balaji et al., MLSys 2021): hindsight imitation vs every baseline on held-out traces.

For each workload: train the hindsight-imitation policy (DAgger) and the PPO baseline on training traces,
then place every VM of >= 29 held-out traces (seeds disjoint from training) with each policy and compare
the objective (mean peak-to-average ratio, lower is better) with ``mlsys_jax.stats.compare``
(paired by trace; P(imitation better), bootstrap interval, significant and meaningful) and the relative
improvement of the mean objective. Writes results JSON and a PNG of usage over time.

  python experiments/fireplace_eval.py                          # 3 workloads, 30 test seeds, ~10 min CPU
  python experiments/fireplace_eval.py --workloads=spiky --ppo_iters=0
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.sched import placement as P  # noqa: E402

_WORKLOADS = flags.DEFINE_list("workloads", ["spiky", "bursty", "steady"], "Workloads (traces.WORKLOADS).")
_SEEDS = flags.DEFINE_integer("seeds", 30, "Held-out test traces per workload (>= 29 for stats.compare).")
_TRAIN = flags.DEFINE_integer("train_traces", 16, "Training traces (their seeds are disjoint from test).")
_MACHINES = flags.DEFINE_integer("machines", 8, "Physical machines.")
_NVMS = flags.DEFINE_integer("n_vms", 1024, "VMs per trace.")
_HORIZON = flags.DEFINE_integer("horizon", 512, "Time steps per trace.")
_LIFE = flags.DEFINE_integer("max_life", 64, "Longest VM lifetime (steps).")
_WINDOW = flags.DEFINE_integer("window", 8, "Usage history a policy observes (steps).")
_ITERS = flags.DEFINE_integer("dagger_iters", 4, "DAgger iterations of hindsight imitation.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Training epochs per DAgger iteration.")
_PPO = flags.DEFINE_integer("ppo_iters", 15, "PPO iterations (0: skip the RL baseline).")
_OUT = flags.DEFINE_string("out_dir", "results/fireplace", "Output directory.")


def _batch(workload, seeds):
  gen = jax.jit(jax.vmap(lambda k: P.synthetic_trace(k, n_vms=_NVMS.value, horizon=_HORIZON.value,
                                                     max_life=_LIFE.value, workload=workload)))
  return gen(jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds)))


def _plot(path, usage_by_policy, capacity, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(usage_by_policy)
  fig, axes = plt.subplots(len(names) + 1, 1, figsize=(10, 2.4 * (len(names) + 1)), sharex=True)
  for ax, name in zip(axes, names):
    u = np.asarray(usage_by_policy[name])[:, :, 0] / np.asarray(capacity)[:, None, 0]
    for m in range(u.shape[0]):
      ax.plot(u[m], lw=0.7)
    ax.set_ylabel("CPU util.")
    ax.set_title(f"{name}: CPU utilisation per machine")
  for name in names:
    par = np.asarray(P.par_per_step(jnp.asarray(usage_by_policy[name]), capacity)).mean(-1)
    w = 16
    axes[-1].plot(np.convolve(par, np.ones(w) / w, mode="same"), label=f"{name} (mean {par.mean():.3f})")
  axes[-1].set_ylabel(f"PAR(t), {w}-step avg")
  axes[-1].set_xlabel("time step")
  axes[-1].legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def run_workload(workload: str, out: pathlib.Path) -> dict:
  spec = P.Spec(horizon=_HORIZON.value, window=_WINDOW.value)
  cl = P.make_cluster(_MACHINES.value)
  train = _batch(workload, np.arange(_TRAIN.value) + 100_000)
  test = _batch(workload, np.arange(_SEEDS.value))
  P.validate_trace(test, cl, spec.horizon)
  t0 = time.time()
  print(f"[{workload}] hindsight imitation (DAgger, {_ITERS.value} iterations) ...", flush=True)
  im = P.train_imitation(train, cl, spec=spec, key=jax.random.PRNGKey(1), iterations=_ITERS.value,
                         epochs=_EPOCHS.value, verbose=True)
  t_im = time.time() - t0
  ppo_params, t_ppo, ppo_curve = None, 0.0, []
  if _PPO.value > 0:
    t0 = time.time()
    print(f"[{workload}] PPO ({_PPO.value} iterations) ...", flush=True)
    pr = P.train_ppo(train, cl, spec=spec, key=jax.random.PRNGKey(2), iterations=_PPO.value, verbose=True)
    ppo_params, t_ppo, ppo_curve = pr.params, time.time() - t0, pr.rollout_objective
  pols = dict(P.BASELINES)
  if ppo_params is not None:
    pols["ppo"] = lambda p, obs, k: P.ppo_policy(p[1], obs, k)
  pols["imitation"] = lambda p, obs, k: P.imitation_policy(p[0], obs, k)
  pols["hindsight_oracle"] = P.hindsight_oracle
  names = list(pols)
  allp = P.switch_policy(*pols.values())
  inner = (im.params, ppo_params)
  evaluate = jax.jit(jax.vmap(
      lambda tr, k, idx: P.simulate(tr, cl, allp, spec=spec, key=k, params=(idx, inner),
                                    with_hindsight=True), in_axes=(0, 0, None)))
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(_SEEDS.value) + 7)
  objs, rej, usage0 = {}, {}, {}
  for i, name in enumerate(names):
    r = evaluate(test, keys, jnp.int32(i))
    objs[name] = np.asarray(r.objective, np.float64)
    rej[name] = int(np.sum(np.asarray(r.rejected)))
    usage0[name] = np.asarray(r.usage[0])
    print(f"  {name:16s} objective {objs[name].mean():.4f} +- {objs[name].std():.4f}  rejected {rej[name]}",
          flush=True)
  baselines = [n for n in names if n not in ("imitation", "hindsight_oracle")]
  best = min(baselines, key=lambda n: objs[n].mean())
  comps = {}
  for b in baselines:
    c = stats.compare(objs["imitation"], objs[b], lower_is_better=True)
    rel = (objs[b].mean() - objs["imitation"].mean()) / objs[b].mean()
    rel_excess = (objs[b].mean() - objs["imitation"].mean()) / (objs[b].mean() - 1.0)
    comps[b] = {"p": c.p, "ci_low": c.ci_low, "ci_high": c.ci_high, "significant": c.significant,
                "meaningful": c.meaningful, "verdict": c.verdict, "relative_improvement": float(rel),
                "relative_improvement_of_excess_par": float(rel_excess),
                "per_seed_relative_improvement_median": float(np.median((objs[b] - objs["imitation"]) / objs[b]))}
    print(f"  imitation vs {b:14s}: {c}  rel. improvement {100 * rel:+.2f}%", flush=True)
  png = out / f"usage_{workload}.png"
  _plot(png, {best: usage0[best], "imitation": usage0["imitation"]}, cl.capacity,
        f"FirePlace, {workload} workload, test trace 0 ({_MACHINES.value} machines)")
  return {"objective": {k: v.tolist() for k, v in objs.items()},
          "mean_objective": {k: float(v.mean()) for k, v in objs.items()},
          "rejected": rej, "best_baseline": best, "compare_imitation_vs": comps,
          "imitation_training": {"losses": im.losses, "rollout_objective": im.rollout_objective,
                                 "samples": im.n_samples, "seconds": t_im},
          "ppo_training": {"rollout_objective": ppo_curve, "seconds": t_ppo}, "plot": str(png)}


def main(argv):
  del argv
  if _SEEDS.value < 29:
    print(f"warning: {_SEEDS.value} seeds < 29 (Noether's n for gamma=0.75); the comparison is underpowered.")
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  cfg = {k: getattr(flags.FLAGS, k) for k in ("workloads", "seeds", "train_traces", "machines", "n_vms",
                                              "horizon", "max_life", "window", "dagger_iters", "epochs",
                                              "ppo_iters")}
  results = {"config": cfg, "objective_definition": "mean over time steps and resources (CPU, memory) of "
             "max_m util / mean_m util across machines (1 when idle); lower is better", "workloads": {},
             "provenance": provenance.record(   # per workload: the training traces, then the test traces
                 data_arrays=[a for w in _WORKLOADS.value for seeds in (np.arange(_TRAIN.value) + 100_000,
                                                                         np.arange(_SEEDS.value))
                              for a in jax.tree_util.tree_leaves(_batch(w, seeds))], script=__file__)}
  t0 = time.time()
  for w in _WORKLOADS.value:
    results["workloads"][w] = run_workload(w, out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
  results["seconds"] = time.time() - t0
  (out / "results.json").write_text(json.dumps(results, indent=1))
  print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
