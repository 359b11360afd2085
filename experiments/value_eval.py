"""Value Learning (Steiner et al., MLSys 2021) for IOS schedules: value model vs the DP, CPU, analytical.

The LSTM value model of :mod:`mlsys_jax.cost.value` is trained on random Inception-style conv nets plus
all IOS benchmark nets but the held-out one (leave one net out), with targets from rollouts costed by
:class:`mlsys_jax.sched.AnalyticalCost` (and the DP's own schedule, as IOS's stage cache would give).
On each held-out net it reports the predicted latency (analytical model) of: the sequential schedule,
the DP (IOS search with every stage costed), greedy decoding (no stage costed) and the top-k hybrid
(only the k final candidates costed), with search times and stage-cost calls.

  python experiments/value_eval.py                        # small nets, ~minutes on a loaded CPU
  python experiments/value_eval.py --nets=squeezenet --random_nets=4 --steps=200   # quick look
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mlsys_jax import sched  # noqa: E402
from mlsys_jax.cost import value as V  # noqa: E402
from mlsys_jax.models import ios_benchmark_nets, ios_init_params  # noqa: E402
from mlsys_jax.sched.api import _check_cover  # noqa: E402

_NETS = flags.DEFINE_list("nets", ["squeezenet", "inception_v3", "randwire", "nasnet"], "IOS nets.")
_RANDOM = flags.DEFINE_integer("random_nets", 8, "Random conv nets added to the training set.")
_ROLLOUTS = flags.DEFINE_integer("rollouts", 12, "Random rollouts per training graph.")
_STEPS = flags.DEFINE_integer("steps", 500, "Adam steps.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Training rounds (>1: model-greedy rollouts added).")
_K = flags.DEFINE_integer("k", 4, "Hybrid: beam width = candidates costed.")
_R = flags.DEFINE_integer("r", 2, "Max units per group (IOS r).")
_S = flags.DEFINE_integer("s", 4, "Max groups per stage (IOS s).")
_PART = flags.DEFINE_integer("part_size", 20, "Units per DP part.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_OUT = flags.DEFINE_string("out_dir", "results/value_eval", "Output directory.")


def _net_graph(name: str):
  model, shape = ios_benchmark_nets(small=True)[name]
  params = ios_init_params(model, shape)
  return sched.build_graph(lambda x: model.apply(params, x), jnp.ones(shape), part_size=_PART.value)


def _seq_cost(g, cost):
  return V.schedule_cost(g, [sched.Stage("parallel", ((u,),)) for u in range(len(g.units))], cost)


def main(_):
  cost = sched.AnalyticalCost()
  r, s = _R.value, _S.value
  t0 = time.perf_counter()
  nets = {}
  for n in _NETS.value:
    nets[n] = _net_graph(n)
    print(f"graph {n}: {len(nets[n].units)} units, {len(nets[n].blocks)} parts "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
  rand = [sched.build_graph(*V.random_conv_net(i, blocks=1 + i % 3), part_size=_PART.value)
          for i in range(_RANDOM.value)]
  rows = {}
  for held in _NETS.value:
    g = nets[held]
    train = rand + [nets[n] for n in _NETS.value if n != held]
    t = time.perf_counter()
    model, stats = V.train_value_model(train, cost, rounds=_ROUNDS.value, rollouts=_ROLLOUTS.value,
                                       steps=_STEPS.value, seed=_SEED.value, r=r, s=s)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    dp_stages, dp_cost, dp_calls = V.dp_schedule(g, cost, r, s)
    dp_s = time.perf_counter() - t
    gr = V.greedy_schedule(model, g)
    _check_cover(g, gr.stages)
    gr_cost = V.schedule_cost(g, gr.stages, cost)
    hy = V.hybrid_schedule(model, g, cost, k=_K.value)
    _check_cover(g, hy.stages)
    seq = _seq_cost(g, cost)
    rows[held] = {
        "units": len(g.units), "parts": len(g.blocks), "train_states": stats["states"],
        "train_s": train_s, "sequential_s": seq, "dp_s": dp_cost, "dp_search_s": dp_s,
        "dp_stage_calls": dp_calls, "greedy_s": gr_cost, "greedy_pred_s": gr.predicted_s,
        "greedy_search_s": gr.search_s, "greedy_over_dp": gr_cost / dp_cost,
        "hybrid_s": hy.cost_s, "hybrid_over_dp": hy.cost_s / dp_cost, "hybrid_stage_calls": hy.evaluated,
        "hybrid_search_s": hy.search_s, "hybrid_fallback": hy.fallback,
        "ood": [[int(u), why] for u, why in gr.ood][:20], "n_ood": len(gr.ood),
        "final_loss": stats["losses"][-1][-1],
    }
    print(f"{held}: seq/dp {seq / dp_cost:.3f}  greedy/dp {gr_cost / dp_cost:.3f} ({gr.search_s:.2f} s, 0 "
          f"stage calls)  hybrid/dp {hy.cost_s / dp_cost:.3f} ({hy.search_s:.2f} s, {hy.evaluated} calls"
          f"{', fallback' if hy.fallback else ''})  dp {dp_s:.2f} s, {dp_calls} calls; ood {len(gr.ood)}",
          flush=True)
  out = {"config": {k: getattr(f, "value") for k, f in
                    [("nets", _NETS), ("random_nets", _RANDOM), ("rollouts", _ROLLOUTS), ("steps", _STEPS),
                     ("rounds", _ROUNDS), ("k", _K), ("r", _R), ("s", _S), ("part_size", _PART),
                     ("seed", _SEED)]},
         "cost_model": "AnalyticalCost (H100-like roofline), CPU", "nets": rows,
         "geomean_greedy_over_dp": float(np.exp(np.mean([np.log(v["greedy_over_dp"]) for v in rows.values()]))),
         "geomean_hybrid_over_dp": float(np.exp(np.mean([np.log(v["hybrid_over_dp"]) for v in rows.values()]))),
         "total_s": time.perf_counter() - t0}
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "value_eval.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
