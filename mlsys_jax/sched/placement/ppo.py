"""An off-the-shelf RL baseline for placement: PPO (Schulman et al., 2017) on the same simulator.

FirePlace (Balaji et al., MLSys 2021, Sec. 4) reports that off-the-shelf RL is "not always" good for
this problem. This is a small, standard PPO: the actor is the same permutation-equivariant
:class:`~mlsys_jax.sched.placement.hindsight.PlacementNet` over :func:`machine_features` (softmax over
feasible machines), the critic a mean-pooled per-machine MLP with the elapsed time fraction. Rewards are
dense and sum to the objective: once VM i is placed, the time steps ``[a_i, a_{i+1})`` can no longer
change (every VM that uses them has arrived), so decision i earns ``-sum_t mean_r (PAR_r(t) - 1) / T``
over those steps (the last decision gets every step to the horizon). GAE(gamma, lambda), clipped
surrogate, entropy bonus, Adam.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax._checks import check_int, check_range
from mlsys_jax.sched.placement.hindsight import _NET, machine_features
from mlsys_jax.sched.placement.sim import (Cluster, Observation, Spec, Trace, par_per_step, simulate,
                                           validate_trace)

__all__ = ["PPOResult", "ppo_policy", "train_ppo", "step_rewards"]


class _Critic(nn.Module):
  @nn.compact
  def __call__(self, feats, tfrac):
    h = nn.relu(nn.Dense(64)(feats))
    h = jnp.concatenate([jnp.mean(h, axis=-2), tfrac[..., None]], -1)
    return nn.Dense(1)(nn.relu(nn.Dense(64)(h)))[..., 0]


_CRITIC = _Critic()


def ppo_policy(params, obs: Observation, key) -> jax.Array:
  """Greedy PPO actor (highest logit); ``params`` = ``PPOResult.params`` (actor, critic).

  The off-the-shelf RL baseline of FirePlace (Balaji et al., MLSys 2021, Sec. 4), PPO (Schulman et al.,
  2017): the actor is the permutation-equivariant :class:`~mlsys_jax.sched.placement.hindsight.PlacementNet`
  over :func:`~mlsys_jax.sched.placement.hindsight.machine_features`; its logits are the scores, so
  :func:`~mlsys_jax.sched.placement.sim.simulate` takes the feasible machine with the highest logit
  (training samples from the softmax instead). The critic and ``key`` are not used.

  Returns:
    ``[M]`` logits.

  Raises:
    TypeError: ``params`` is not an ``(actor, critic)`` pair.

  Example:
    >>> from mlsys_jax.sched.placement import sim, traces
    >>> from mlsys_jax.sched.placement.hindsight import PlacementNet
    >>> actor = PlacementNet().init(jax.random.PRNGKey(0), jnp.zeros((2, 34)))   # untrained; critic unused
    >>> tr = traces.synthetic_trace(jax.random.PRNGKey(5), n_vms=8, horizon=16, max_life=4)
    >>> a = sim.simulate(tr, sim.make_cluster(2), ppo_policy, spec=sim.Spec(16), params=(actor, None)).actions
    >>> a.shape, bool(jnp.all(a < 2))
    ((8,), True)
  """
  if not isinstance(params, (tuple, list)) or len(params) != 2:
    what = type(params).__name__ + (f" of length {len(params)}" if isinstance(params, (tuple, list)) else "")
    raise TypeError(f"ppo_policy: params must be the (actor, critic) pair of PPOResult.params, got {what}.")
  del key
  return _NET.apply(params[0], machine_features(obs))


def _ppo_sample(params, obs: Observation, key) -> jax.Array:
  return _NET.apply(params[0], machine_features(obs)) + jax.random.gumbel(key, obs.feasible.shape)


def step_rewards(usage: jax.Array, capacity: jax.Array, arrival: jax.Array, valid: jax.Array) -> jax.Array:
  """Per-decision rewards whose sum is ``-(objective - 1) * (T - a_0) / T`` up to steps before the first
  arrival: decision i gets ``-sum_{t in [a_i, a_next)} mean_r (PAR_r(t) - 1) / T`` (padding: 0)."""
  t_len = usage.shape[1]
  excess = jnp.mean(par_per_step(usage, capacity), axis=-1) - 1.0
  cum = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(excess)])
  big = jnp.int32(t_len)
  a = jnp.where(valid, arrival, big)
  # next arrival strictly later in order (the same step shared by several VMs goes to the last of them)
  nxt = jnp.concatenate([a[1:], jnp.array([big])])
  nxt = jnp.minimum(jnp.where(valid, nxt, big), big)
  return jnp.where(valid, -(cum[nxt] - cum[jnp.minimum(a, big)]) / t_len, 0.0)


class PPOResult(NamedTuple):
  """``params`` = (actor, critic); ``rollout_objective``: mean objective of each iteration's rollouts."""
  params: Any
  rollout_objective: list


def train_ppo(traces: Trace, cluster: Cluster, *, spec: Spec, key: jax.Array, iterations: int = 20,
              epochs: int = 4, minibatch: int = 2048, learning_rate: float = 3e-4, gamma: float = 0.99,
              lam: float = 0.95, clip: float = 0.2, entropy: float = 0.01, verbose: bool = False
              ) -> PPOResult:
  """Train the PPO baseline on a batch of traces (each iteration rolls out every trace once).

  Example:
    >>> from mlsys_jax.sched.placement import sim, traces as T
    >>> trs = jax.vmap(lambda k: T.synthetic_trace(k, n_vms=16, horizon=32, max_life=8))(
    ...     jax.random.split(jax.random.PRNGKey(0), 2))
    >>> r = train_ppo(trs, sim.make_cluster(3), spec=sim.Spec(32), key=jax.random.PRNGKey(0),
    ...               iterations=2, minibatch=16)
    >>> len(r.rollout_objective)
    2
  """
  check_int("iterations", iterations, 1)
  check_int("epochs", epochs, 1)
  check_int("minibatch", minibatch, 1)
  for name, v in (("gamma", gamma), ("lam", lam)):
    check_range(name, v, 0.0, 1.0)
  check_range("learning_rate", learning_rate, 0.0, low_inclusive=False)
  check_range("clip", clip, 0.0, low_inclusive=False)
  if np.ndim(traces.arrival) != 2:
    raise ValueError(f"traces must be a batch (arrival of shape [B, N]), got {np.shape(traces.arrival)}.")
  # outside jit: checks are skipped on tracers
  validate_trace(traces, cluster, spec.horizon, n_types=spec.n_types)
  m, r = cluster.capacity.shape
  f = 2 * (5 * r + spec.n_types) + spec.n_types + r
  k1, k2, key = jax.random.split(key, 3)
  params = (_NET.init(k1, jnp.zeros((m, f))), _CRITIC.init(k2, jnp.zeros((m, f)), jnp.zeros(())))
  opt = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(learning_rate))
  opt_state = opt.init(params)
  b, n = traces.arrival.shape
  cap = cluster.capacity

  @jax.jit
  def rollout(params, keys):
    res = jax.vmap(lambda tr, k: simulate(tr, Cluster(cap), _ppo_sample, spec=spec, key=k, params=params,
                                          record=True))(traces, keys)
    feats = jax.vmap(jax.vmap(machine_features))(res.obs)
    tfrac = res.obs.time.astype(jnp.float32) / spec.horizon
    rew = jax.vmap(lambda u, a, v: step_rewards(u, cap, a, v))(res.usage, traces.arrival, traces.valid)
    logits = _NET.apply(params[0], feats)
    fe = res.obs.feasible
    logp_all = jax.nn.log_softmax(jnp.where(fe, logits, -1e9), -1)
    act = jnp.maximum(res.actions, 0)
    logp = jnp.take_along_axis(logp_all, act[..., None], -1)[..., 0]
    value = _CRITIC.apply(params[1], feats, tfrac)
    mask = (res.actions >= 0) & (jnp.sum(fe, -1) >= 2)

    def gae(carry, x):
      r_t, v_t, v_next = x
      delta = r_t + gamma * v_next - v_t
      carry = delta + gamma * lam * carry
      return carry, carry

    v_next = jnp.concatenate([value[:, 1:], jnp.zeros((b, 1))], 1)
    _, adv = jax.lax.scan(gae, jnp.zeros((b,)), (rew.T, value.T, v_next.T), reverse=True)
    adv = adv.T
    return feats, fe, tfrac, act, logp, adv, adv + value, mask, jnp.mean(res.objective)

  def loss_fn(params, feats, fe, tfrac, act, logp_old, adv, ret, mask):
    logits = _NET.apply(params[0], feats)
    logp_all = jax.nn.log_softmax(jnp.where(fe, logits, -1e9), -1)
    logp = jnp.take_along_axis(logp_all, act[:, None], -1)[:, 0]
    ratio = jnp.exp(logp - logp_old)
    w = mask.astype(jnp.float32)
    mu = jnp.sum(w * adv) / jnp.maximum(w.sum(), 1)
    sd = jnp.sqrt(jnp.sum(w * (adv - mu) ** 2) / jnp.maximum(w.sum(), 1)) + 1e-8
    a = (adv - mu) / sd
    pg = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - clip, 1 + clip) * a)
    p = jnp.exp(logp_all)
    ent = -jnp.sum(jnp.where(fe, p * logp_all, 0.0), -1)
    v = _CRITIC.apply(params[1], feats, tfrac)
    scale = jnp.mean(jnp.abs(ret)) + 1e-8  # returns are small; a scale-free value loss
    vl = ((v - ret) / scale) ** 2
    tot = pg + 0.5 * vl - entropy * ent
    return jnp.sum(w * tot) / jnp.maximum(w.sum(), 1)

  @jax.jit
  def update(params, opt_state, batch):
    g = jax.grad(loss_fn)(params, *batch)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state

  objs = []
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
  for it in range(iterations):
    key, kr = jax.random.split(key)
    *data, obj = rollout(params, jax.random.split(kr, b))
    objs.append(float(obj))
    data = [np.asarray(x).reshape((b * n,) + x.shape[2:]) for x in data]
    tot = b * n
    for _ in range(epochs):
      perm = rng.permutation(tot)
      for s in range(0, max(tot - minibatch, 0) + 1, minibatch):
        idx = perm[s:s + minibatch]
        params, opt_state = update(params, opt_state, tuple(d[idx] for d in data))
    if verbose:
      print(f"  PPO iteration {it}: rollout objective {objs[-1]:.4f}", flush=True)
  return PPOResult(params, objs)
