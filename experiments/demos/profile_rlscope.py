"""Demo row of mlsys_jax.profile: RL-Scope (Gleeson et al., MLSys 2021) on CPU: on-policy A2C vs
off-policy DQN on a numpy CartPole, time per operation and category (intercept level, no trace, to stay
fast), and the calibrated per-event cost of an operation scope."""

from mlsys_jax import profile

ORDER = 120
TECHNIQUE = "RL-Scope"


def _shares(algo, seed):
  w = profile.make_workload(algo, "cartpole", "numpy", steps=96, seed=seed)
  w()  # compile
  with profile.Profiler("intercept") as p:
    w()
  rows = profile.table_rows(profile.attribute(p))
  tot = sum(r["total"] for r in rows)
  share = {r["operation"]: r["total"] / tot for r in rows}
  return share, tot


def run(seed: int):
  on, t_on = _shares("a2c", seed)
  off, t_off = _shares("dqn", seed)
  cal = profile.calibrate_micro(n=1500, repeats=3)
  ratio = on.get("simulation", 0.0) / max(off.get("simulation", 0.0), 1e-12)
  return [
      ("RL-Scope", "A2C (on-policy) per op, 96 CartPole steps, numpy sim",
       ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(on.items(), key=lambda kv: -kv[1])) +
       f" of {1e3 * t_on:.0f} ms"),
      ("RL-Scope", "DQN (off-policy) per op, same",
       ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(off.items(), key=lambda kv: -kv[1])) +
       f" of {1e3 * t_off:.0f} ms"),
      ("RL-Scope", "simulation share on-policy / off-policy (paper: >= 3.5x on MuJoCo)", f"{ratio:.2f}x"),
      ("RL-Scope", "calibrated cost per event: scope / intercepted call / trace event",
       f"{cal.delta_ns['scope']:.0f} / {cal.delta_ns['intercept']:.0f} / {cal.delta_ns['trace']:.0f} ns"),
  ]
