"""Demo row of mlsys_jax.sched.placement: FirePlace (Balaji et al., MLSys 2021) hindsight imitation on
small synthetic spiky traces (8 machines, 512 VMs, 256 steps), against the best of three heuristics and
the (non-causal) hindsight oracle on 32 held-out traces. Demo scale: 8 training traces and two DAgger
iterations, so the margin is smaller and noisier than in experiments/fireplace_eval.py."""

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax import stats
from mlsys_jax.sched import placement as P

ORDER = 92
TECHNIQUE = "FirePlace"

_HEUR = {"least_loaded": P.least_loaded, "forecast": P.forecast, "power_of_two": P.power_of_two}
_SWITCH = P.switch_policy(*_HEUR.values())
_B = 8  # training batch; test traces run in chunks of the same shape (one compilation)


def run(seed: int):
  spec = P.Spec(horizon=256, window=8)
  cl = P.make_cluster(8)
  gen = jax.jit(jax.vmap(lambda k: P.synthetic_trace(k, n_vms=512, horizon=256, max_life=32)))
  key = jax.random.PRNGKey(seed)
  train = gen(jax.random.split(jax.random.fold_in(key, 1), _B))
  test = gen(jax.random.split(jax.random.fold_in(key, 2), 4 * _B))
  im = P.train_imitation(train, cl, spec=spec, key=jax.random.fold_in(key, 3), iterations=2, epochs=4)
  chunks = [jax.tree_util.tree_map(lambda x: x[i * _B:(i + 1) * _B], test) for i in range(4)]
  obj = {}
  for name, beta in (("imitation", 0.0), ("hindsight_oracle", 1.0)):
    obj[name] = np.concatenate([np.asarray(P.dagger_rollouts(c, cl, spec=spec, params=im.params, beta=beta,
                                                             key=jax.random.PRNGKey(i)).objective)
                                for i, c in enumerate(chunks)])
  ev = jax.jit(jax.vmap(lambda tr, k, i: P.simulate(tr, cl, _SWITCH, spec=spec, key=k, params=(i, None)).objective,
                        in_axes=(0, 0, None)))
  keys = jax.random.split(jax.random.fold_in(key, 4), 4 * _B)
  for i, n in enumerate(_HEUR):
    obj[n] = np.asarray(ev(test, keys, jnp.int32(i)))
  best = min(_HEUR, key=lambda n: obj[n].mean())
  c = stats.compare(obj["imitation"], obj[best], lower_is_better=True)
  rel = (obj[best].mean() - obj["imitation"].mean()) / obj[best].mean()
  return [
      ("FirePlace", "mean PAR objective (lower is better), 32 test traces: imitation vs best heuristic "
       f"({best}) vs hindsight oracle", f"{obj['imitation'].mean():.3f} vs {obj[best].mean():.3f} "
       f"({100 * rel:+.1f}%) vs {obj['hindsight_oracle'].mean():.3f}"),
      ("FirePlace", f"P(imitation better than {best}), 95% CI", f"{c.p:.2f} [{c.ci_low:.2f}, {c.ci_high:.2f}]"),
  ]
