"""Baseline placement policies (FirePlace, Balaji et al., MLSys 2021, Sec. 4 baselines) and a numpy
reference simulator.

Each policy is a pure function ``policy(params, obs, key) -> scores[M]`` for
:func:`~mlsys_jax.sched.placement.sim.simulate`: the simulator takes the feasible machine with the highest
score (ties: lowest index). ``params`` is ignored by the baselines. Loads are summed over resources
as fractions of each machine's capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax.sched.placement.sim import (_CAP_TOL, Cluster, Observation, SimResult, Spec,
                                           validate_trace)

__all__ = ["random_policy", "round_robin", "first_fit", "best_fit", "least_loaded", "power_of_two",
           "forecast", "hindsight_oracle", "switch_policy", "BASELINES", "simulate_numpy", "NUMPY_POLICIES"]


def _check_obs(obs, fname: str) -> None:
  """TypeError/ValueError unless ``obs`` is one arrival's :class:`Observation` (shapes only: runs on
  tracers inside ``simulate``)."""
  if not isinstance(obs, Observation):
    raise TypeError(f"{fname}: obs must be a placement Observation (what simulate passes a policy), got "
                    f"{type(obs).__name__}.")
  if np.ndim(obs.usage_hist) != 3:
    raise ValueError(f"{fname}: obs.usage_hist must be [machines, window, resources], got shape "
                     f"{np.shape(obs.usage_hist)}; call the policy on one arrival (vmap over a batch).")
  m, _, r = np.shape(obs.usage_hist)
  for name in ("reserved", "size_frac"):
    if np.shape(getattr(obs, name)) != (m, r):
      raise ValueError(f"{fname}: obs.{name} must have shape [machines, resources] = {(m, r)} like "
                       f"obs.usage_hist, got {np.shape(getattr(obs, name))}.")


def random_policy(params, obs: Observation, key) -> jax.Array:
  """Uniformly random feasible machine (Gumbel scores).

  Example:
    >>> from mlsys_jax.sched.placement import sim, traces
    >>> tr = traces.synthetic_trace(jax.random.PRNGKey(0), n_vms=16, horizon=32, max_life=8)
    >>> r = sim.simulate(tr, sim.make_cluster(2), random_policy, spec=sim.Spec(32))
    >>> set(r.actions.tolist()) <= {0, 1}
    True
  """
  del params
  return jax.random.gumbel(key, obs.feasible.shape)


def round_robin(params, obs: Observation, key) -> jax.Array:
  """Machine ``index mod M``; if it is full, the next feasible one in cyclic order."""
  del params, key
  m = obs.feasible.shape[0]
  return -((jnp.arange(m) - obs.index) % m).astype(jnp.float32)


def first_fit(params, obs: Observation, key) -> jax.Array:
  """The lowest-index machine where the VM fits."""
  del params, key
  return -jnp.arange(obs.feasible.shape[0], dtype=jnp.float32)


def best_fit(params, obs: Observation, key) -> jax.Array:
  """The machine left fullest (summed reserved fraction after placing the VM): tightest fit.

  The bin-packing Best Fit rule, one of FirePlace's baselines (Balaji et al., MLSys 2021, Sec. 4):
  ``score[m] = sum_r (reserved[m, r] + size_frac[m, r])``, so
  :func:`~mlsys_jax.sched.placement.sim.simulate` picks the feasible machine whose reservations after
  placement are highest (ties: lowest index). ``params`` and ``key``
  are ignored.

  Returns:
    ``[M]`` scores (float).

  Raises:
    TypeError, ValueError: ``obs`` is not one arrival's :class:`Observation`.

  Example:
    >>> from mlsys_jax.sched.placement import sim, traces
    >>> tr = traces.make_trace([0, 1], np.full((2, 2, 1), 0.3), np.full((2, 1), 0.3))
    >>> sim.simulate(tr, sim.Cluster(jnp.ones((3, 1))), best_fit, spec=sim.Spec(4)).actions.tolist()
    [0, 0]
  """
  _check_obs(obs, "best_fit")
  del params, key
  return jnp.sum(obs.reserved + obs.size_frac, axis=-1)


def least_loaded(params, obs: Observation, key) -> jax.Array:
  """The machine with the lowest usage now (summed utilisation over resources)."""
  del params, key
  return -jnp.sum(obs.usage_hist[:, -1], axis=-1)


def power_of_two(params, obs: Observation, key) -> jax.Array:
  """Power of two choices: sample two distinct feasible machines, take the less loaded now."""
  del params
  m = obs.feasible.shape[0]
  g = jax.random.gumbel(key, (m,)) + jnp.where(obs.feasible, 0.0, -jnp.inf)
  _, two = jax.lax.top_k(g, min(2, m))
  load = jnp.where(obs.feasible, jnp.sum(obs.usage_hist[:, -1], axis=-1), jnp.inf)
  pick = two[jnp.argmin(load[two])]
  return jnp.where(jnp.arange(m) == pick, 1.0, jnp.where(jnp.isin(jnp.arange(m), two), 0.0, -1.0))


def forecast(params, obs: Observation, key) -> jax.Array:
  """Forecasting baseline: each machine's usage predicted by its moving average over the observed
  window; the VM goes to the machine with the lowest predicted load.

  FirePlace's forecasting baseline (Balaji et al., MLSys 2021, Sec. 4), with a moving-average forecaster:
  ``score[m] = -sum_r mean_w usage_hist[m, w, r]`` (the window holds zeros before time 0). ``params``
  and ``key`` are ignored.

  Returns:
    ``[M]`` scores (float): minus each machine's forecast load.

  Raises:
    TypeError, ValueError: ``obs`` is not one arrival's :class:`Observation`.

  Example:
    >>> from mlsys_jax.sched.placement import sim, traces
    >>> tr = traces.make_trace([0, 1], np.full((2, 2, 1), 0.3), np.full((2, 1), 0.3))
    >>> sim.simulate(tr, sim.Cluster(jnp.ones((3, 1))), forecast, spec=sim.Spec(4)).actions.tolist()
    [0, 1]
  """
  _check_obs(obs, "forecast")
  del params, key
  return -jnp.sum(jnp.mean(obs.usage_hist, axis=1), axis=-1)


def hindsight_oracle(params, obs: Observation, key) -> jax.Array:
  """NOT causal: the candidate with the lowest hindsight cost (reads the true future; needs
  ``simulate(..., with_hindsight=True)``). The label FirePlace imitates; a reference, not a baseline."""
  del params, key
  return -obs.hindsight


def switch_policy(*policies):
  """One policy that runs ``policies[index]`` with ``params = (index, inner_params)`` (``lax.switch``),
  so that several policies share one compiled simulation (create it once and reuse it: jit caches on
  the function object).

  Example:
    >>> from mlsys_jax.sched.placement import sim, traces
    >>> both = switch_policy(first_fit, least_loaded)
    >>> tr = traces.synthetic_trace(jax.random.PRNGKey(0), n_vms=16, horizon=32, max_life=8)
    >>> a = sim.simulate(tr, sim.make_cluster(3), both, spec=sim.Spec(32), params=(0, None))
    >>> b = sim.simulate(tr, sim.make_cluster(3), first_fit, spec=sim.Spec(32))
    >>> bool(jnp.all(a.actions == b.actions))
    True
  """
  if not policies:
    raise ValueError("switch_policy needs at least one policy.")

  def branch(pol):
    return lambda p, obs, key: pol(p, obs, key).astype(jnp.float32)

  branches = [branch(p) for p in policies]

  def policy(params, obs, key):
    index, inner = params
    return jax.lax.switch(jnp.clip(index, 0, len(branches) - 1), branches, inner, obs, key)

  return policy


BASELINES = {"random": random_policy, "round_robin": round_robin, "first_fit": first_fit,
             "best_fit": best_fit, "least_loaded": least_loaded, "power_of_two": power_of_two,
             "forecast": forecast}


# ---------------------------------------------------------------- numpy reference (deterministic policies)
def _np_scores(name: str, hist, reserved, size_frac, index):
  m = hist.shape[0]
  if name == "round_robin":
    return -((np.arange(m) - index) % m).astype(np.float32)
  if name == "first_fit":
    return -np.arange(m, dtype=np.float32)
  if name == "best_fit":
    return np.sum(reserved + size_frac, axis=-1, dtype=np.float32)
  if name == "least_loaded":
    return -np.sum(hist[:, -1], axis=-1, dtype=np.float32)
  if name == "forecast":
    return -np.sum(np.mean(hist, axis=1, dtype=np.float32), axis=-1, dtype=np.float32)
  raise ValueError(f"no numpy reference for policy {name!r}; choose from {NUMPY_POLICIES}.")


NUMPY_POLICIES = ("round_robin", "first_fit", "best_fit", "least_loaded", "forecast")


def simulate_numpy(trace, cluster: Cluster, policy: str, *, spec: Spec, check: bool = True) -> SimResult:
  """A straightforward numpy simulator (a Python loop over arrivals, float32), the reference for the
  jax one and the baseline of ``benchmarks/placement_sim.py``.

  Keeps per-machine usage and reservation timelines ([M, T + L, R] arrays, time t at index t) and adds
  each placed VM's usage over ``L`` steps and its size over its lifetime. ``policy`` names a
  deterministic baseline (:data:`NUMPY_POLICIES`); ``check=False`` skips :func:`validate_trace`.
  """
  if check:
    validate_trace(trace, cluster, spec.horizon, n_types=spec.n_types)
  cap = np.asarray(cluster.capacity, np.float32)
  arr, usage, life = np.asarray(trace.arrival), np.asarray(trace.usage), np.asarray(trace.lifetime)
  size, valid = np.asarray(trace.size), np.asarray(trace.valid)
  m, r = cap.shape
  n, l, _ = usage.shape
  t_len, w = spec.horizon, spec.window
  use = np.zeros((m, t_len + l, r), np.float32)
  res = np.zeros((m, t_len + l, r), np.float32)
  actions = np.full(n, -1, np.int32)
  rejected = 0
  cap_tol = cap * np.float32(1 + _CAP_TOL)
  for i in range(n):
    if not valid[i]:
      continue
    a = int(arr[i])
    reserved = res[:, a]
    feasible = np.all(reserved + size[i][None] <= cap_tol, axis=-1)
    if not feasible.any():
      rejected += 1
      continue
    lo = a - w + 1
    hist = np.zeros((m, w, r), np.float32)
    hist[:, max(0, -lo):] = use[:, max(lo, 0):a + 1]
    s = _np_scores(policy, hist / cap[:, None, :], reserved / cap, size[i][None] / cap, i)
    j = int(np.argmax(np.where(feasible, s, -np.inf)))
    actions[i] = j
    use[j, a:a + l] += usage[i] * (np.arange(l) < life[i])[:, None]  # masked after the lifetime
    res[j, a:a + life[i]] += size[i]
  out = use[:, :t_len]
  util = out / cap[:, None, :]
  mean, peak = util.mean(0, dtype=np.float64), util.max(0)
  unused = mean == 0  # not `mean > 0`: NaN usage (check=False) must give a NaN objective, not PAR 1
  par = np.where(unused, 1.0, peak / np.where(unused, 1.0, mean))
  return SimResult(actions, np.int32(rejected), float(par.mean()), out, np.int32(0))
