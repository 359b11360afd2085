"""Hindsight imitation (FirePlace, Balaji et al., MLSys 2021, Sec. 3) and an exact offline optimum.

During training the whole trace is known. Each arrival on a visited state is labelled with the machine
that would have been best *in hindsight*: the candidate minimising the summed PAR over the VM's lifetime
window when the VM's true future usage is added to the true future usage of the VMs already placed
(:func:`~mlsys_jax.sched.placement.sim.hindsight_scores`, a vmap over candidates). A policy that sees only
arrival-time observables (machine usage now and over a recent window, reservations, per-type counts,
the VM's type and size) is trained to imitate the labels, and DAgger (Ross et al., 2011) relabels the
states the policy itself visits: rollout ``k`` follows the oracle with probability ``beta**k`` per
decision and the current policy otherwise; all visited states are aggregated and the policy retrained.

The policy is permutation-equivariant over machines: one shared per-machine MLP (with a mean-pooled
context, as in Deep Sets) gives a score per machine; a softmax over feasible machines is the policy.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax._checks import check_int, check_range
from mlsys_jax.sched.placement.policies import hindsight_oracle
from mlsys_jax.sched.placement.sim import (_CAP_TOL, Cluster, Observation, Spec, Trace, _type_one_hot,
                                           par_objective, simulate, validate_trace)

__all__ = ["machine_features", "PlacementNet", "imitation_policy", "ImitationResult", "train_imitation",
           "dagger_rollouts",
           "imitation_loss", "offline_optimum"]


def machine_features(obs: Observation, n_types: int | None = None) -> jax.Array:
  """Per-machine features observable at arrival, [M, F] (F = 2 (5R + K) + K + R).

  Per machine: utilisation now, mean and max over the window, reserved fraction, reserved fraction
  after placing the VM, active VMs per type / 8; each also centred on its mean over machines; then the
  VM's one-hot type and size fraction (the same for every machine). A type outside ``[0, K)`` (only on
  traced input: :func:`~mlsys_jax.sched.placement.sim.simulate` refuses it) gives NaN type features, so
  the policy's scores are NaN and counted in ``SimResult.nonfinite`` instead of a silently wrong one-hot.
  """
  m, _, r = obs.usage_hist.shape
  k = obs.counts.shape[-1] if n_types is None else n_types
  own = jnp.concatenate([obs.usage_hist[:, -1], jnp.mean(obs.usage_hist, 1), jnp.max(obs.usage_hist, 1),
                         obs.reserved, obs.reserved + obs.size_frac, obs.counts / 8.0], axis=-1)
  rel = own - jnp.mean(own, axis=0, keepdims=True)
  vm = jnp.broadcast_to(_type_one_hot(obs.vm_type, k, own.dtype), (m, k))
  return jnp.concatenate([own, rel, vm, obs.size_frac], axis=-1)


class PlacementNet(nn.Module):
  """Permutation-equivariant machine scorer: shared per-machine MLP + mean-pooled context -> [M] logits."""
  hidden: Sequence[int] = (64, 64)

  @nn.compact
  def __call__(self, feats: jax.Array) -> jax.Array:
    h = nn.relu(nn.Dense(self.hidden[0])(feats))
    ctx = jnp.broadcast_to(jnp.mean(h, axis=-2, keepdims=True), h.shape)
    h = jnp.concatenate([h, ctx], axis=-1)
    for width in self.hidden[1:]:
      h = nn.relu(nn.Dense(width)(h))
    return nn.Dense(1)(h)[..., 0]


_NET = PlacementNet()


def imitation_policy(params, obs: Observation, key) -> jax.Array:
  """The learned policy (greedy over the net's scores); ``params`` from :func:`train_imitation`."""
  del key
  return _NET.apply(params, machine_features(obs))


def _dagger_policy(params, obs: Observation, key) -> jax.Array:
  net_params, beta = params
  use_oracle = jax.random.bernoulli(key, beta)
  return jnp.where(use_oracle, hindsight_oracle(None, obs, key), imitation_policy(net_params, obs, key))


def imitation_loss(params, feats, hindsight, feasible, temperature: float = 0.1):
  """Cross-entropy between the net's softmax over feasible machines and soft hindsight labels
  ``softmax(-(h - min h) / (temperature * std h))`` (std over feasible candidates; states with fewer
  than two feasible machines or equal costs carry no label and get weight 0)."""
  logits = _NET.apply(params, feats)
  big = jnp.float32(1e9)
  h = jnp.where(feasible, hindsight, big)
  hmin = jnp.min(h, axis=-1, keepdims=True)
  nf = jnp.sum(feasible, axis=-1, keepdims=True)
  mu = jnp.sum(jnp.where(feasible, hindsight, 0.0), -1, keepdims=True) / jnp.maximum(nf, 1)
  sd = jnp.sqrt(jnp.sum(jnp.where(feasible, (hindsight - mu) ** 2, 0.0), -1, keepdims=True)
                / jnp.maximum(nf, 1))
  target = jax.nn.softmax(jnp.where(feasible, -(h - hmin) / (temperature * sd + 1e-9), -jnp.inf), -1)
  logp = jax.nn.log_softmax(jnp.where(feasible, logits, -1e9), -1)
  ce = -jnp.sum(jnp.where(feasible, target * logp, 0.0), -1)
  w = ((nf[:, 0] >= 2) & (sd[:, 0] > 1e-6)).astype(jnp.float32)
  return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0)


class ImitationResult(NamedTuple):
  """Outcome of :func:`train_imitation`: ``params`` of the policy, per-iteration training ``losses``
  (last epoch), mean objective of each DAgger rollout (``rollout_objective``), samples seen."""
  params: Any
  losses: list
  rollout_objective: list
  n_samples: int


@functools.partial(jax.jit, static_argnames=("spec",))
def _rollouts(traces: Trace, capacity, spec: Spec, params, keys):
  def one(tr, key):
    return simulate(tr, Cluster(capacity), _dagger_policy, spec=spec, key=key, params=params,
                    record=True, with_hindsight=True)
  return jax.vmap(one)(traces, keys)


def dagger_rollouts(traces: Trace, cluster: Cluster, *, spec: Spec, params, beta: float, key: jax.Array):
  """Roll out the DAgger mixture on a batch of traces: each decision follows the hindsight oracle with
  probability ``beta`` and the imitation policy (``params``) otherwise (``beta=0``: the learned policy;
  ``beta=1``: the oracle). Returns the batched :class:`SimResult` with observations and hindsight costs
  recorded (one compilation per trace shape and spec, shared with :func:`train_imitation`).

  DAgger (Ross, Gordon, Bagnell, AISTATS 2011) as FirePlace uses it (Balaji et al., MLSys 2021, Sec. 3):
  the rollouts visit states of the mixture ``beta * oracle + (1 - beta) * policy``; every visited state
  is labelled with the hindsight costs of all candidates.

  Args:
    traces: a batch of ``B`` traces (``arrival`` of shape ``[B, N]``) with the cluster's resources.
    cluster: the machines (``M``).
    spec: simulation sizes.
    params: :class:`PlacementNet` parameters (``train_imitation(...).params``).
    beta: probability of following the oracle at each decision, in ``[0, 1]``.
    key: PRNG key (split into one key per trace).

  Returns:
    :class:`~mlsys_jax.sched.placement.sim.SimResult` with a leading ``[B]`` axis: ``actions [B, N]``,
    ``objective [B]``, ``usage [B, M, horizon, R]`` and ``obs`` stacked over arrivals
    (``obs.hindsight [B, N, M]``, ``obs.feasible [B, N, M]``, ...).

  Raises:
    ValueError: ``beta`` outside ``[0, 1]``, ``traces`` not a batch, or a trace the simulator cannot run
      (:func:`~mlsys_jax.sched.placement.sim.validate_trace`).

  Example:
    >>> from mlsys_jax.sched.placement import sim, traces as T
    >>> trs = jax.vmap(lambda k: T.synthetic_trace(k, n_vms=8, horizon=16, max_life=4))(
    ...     jax.random.split(jax.random.PRNGKey(0), 2))
    >>> net = PlacementNet().init(jax.random.PRNGKey(1), jnp.zeros((2, 2 * (5 * 2 + 4) + 4 + 2)))
    >>> res = dagger_rollouts(trs, sim.make_cluster(2), spec=sim.Spec(16), params=net, beta=0.5,
    ...                       key=jax.random.PRNGKey(2))
    >>> res.actions.shape, res.obs.hindsight.shape
    ((2, 8), (2, 8, 2))
  """
  check_range("beta", beta, 0.0, 1.0)
  if np.ndim(traces.arrival) != 2:
    raise ValueError(f"dagger_rollouts: traces must be a batch (arrival of shape [B, N]), got "
                     f"{np.shape(traces.arrival)}; stack one trace with jax.tree.map(lambda x: x[None], trace).")
  validate_trace(traces, cluster, spec.horizon, n_types=spec.n_types)
  b = np.shape(traces.arrival)[0]
  return _rollouts(traces, cluster.capacity, spec, (params, jnp.float32(beta)), jax.random.split(key, b))


def _collect(traces: Trace, capacity, spec: Spec, params, keys):
  res = _rollouts(traces, capacity, spec, params, keys)
  feats, hs, fe = _flat_samples(res.obs)
  keep = np.asarray(fe.sum(-1) >= 2)
  return (np.asarray(feats)[keep], np.asarray(hs)[keep], np.asarray(fe)[keep],
          float(jnp.mean(res.objective)))


@jax.jit
def _flat_samples(obs: Observation):
  feats = jax.vmap(jax.vmap(machine_features))(obs)
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  return flat(feats), flat(obs.hindsight), flat(obs.feasible)


def train_imitation(traces: Trace, cluster: Cluster, *, spec: Spec, key: jax.Array, iterations: int = 4,
                    beta: float = 0.5, epochs: int = 3, batch_size: int = 512, learning_rate: float = 1e-3,
                    temperature: float = 0.1, max_samples: int = 200_000, verbose: bool = False
                    ) -> ImitationResult:
  """Train the FirePlace policy by hindsight imitation with DAgger.

  Args:
    traces: a batch of training traces (leading axis B; they must have the cluster's resources).
    cluster: the machines.
    spec: simulation sizes.
    key: PRNG key (init, rollouts, minibatch order).
    iterations: DAgger rollouts; rollout ``k`` (from 0) follows the oracle with probability
      ``beta**k`` per decision (k = 0: pure oracle, i.e. behaviour cloning of the hindsight labels).
    beta: DAgger mixing base in [0, 1].
    epochs, batch_size, learning_rate: Adam training on the aggregated states after each rollout.
    temperature: label softness (see :func:`imitation_loss`).
    max_samples: keep at most this many (most recent) states.
    verbose: print progress.

  Returns:
    :class:`ImitationResult`; use ``simulate(..., imitation_policy, params=result.params)``.

  Example:
    >>> from mlsys_jax.sched.placement import sim, traces as T
    >>> spec = sim.Spec(horizon=32)
    >>> trs = jax.vmap(lambda k: T.synthetic_trace(k, n_vms=24, horizon=32, max_life=8))(
    ...     jax.random.split(jax.random.PRNGKey(0), 2))
    >>> res = train_imitation(trs, sim.make_cluster(3), spec=spec, key=jax.random.PRNGKey(1),
    ...                       iterations=2, epochs=1)
    >>> len(res.losses), res.n_samples > 0
    (2, True)
  """
  check_int("iterations", iterations, 1)
  check_int("epochs", epochs, 1)
  check_int("batch_size", batch_size, 1)
  check_range("beta", beta, 0.0, 1.0)
  check_range("learning_rate", learning_rate, 0.0, low_inclusive=False)
  check_range("temperature", temperature, 0.0, low_inclusive=False)
  if np.ndim(traces.arrival) != 2:
    raise ValueError(f"traces must be a batch (arrival of shape [B, N]), got {np.shape(traces.arrival)}.")
  validate_trace(traces, cluster, spec.horizon, n_types=spec.n_types)
  b = traces.arrival.shape[0]
  k_init, key = jax.random.split(key)
  m, r = cluster.capacity.shape
  f = 2 * (5 * r + spec.n_types) + spec.n_types + r
  params = _NET.init(k_init, jnp.zeros((m, f)))
  opt = optax.adam(learning_rate)
  opt_state = opt.init(params)

  @jax.jit
  def update(params, opt_state, feats, hs, fe):
    loss, g = jax.value_and_grad(imitation_loss)(params, feats, hs, fe, temperature)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, loss

  data = None
  losses, objs = [], []
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
  for it in range(iterations):
    key, k_roll = jax.random.split(key)
    mix = (params, jnp.float32(beta ** it))
    feats, hs, fe, obj = _collect(traces, cluster.capacity, spec, mix, jax.random.split(k_roll, b))
    objs.append(obj)
    new = (feats, hs, fe)
    data = new if data is None else tuple(np.concatenate([d, x])[-max_samples:] for d, x in zip(data, new))
    n = data[0].shape[0]
    for _ in range(epochs):
      perm = rng.permutation(n)
      ep = []
      for s in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
        idx = perm[s:s + batch_size]
        params, opt_state, loss = update(params, opt_state, data[0][idx], data[1][idx], data[2][idx])
        ep.append(float(loss))
    losses.append(float(np.mean(ep)))
    if verbose:
      print(f"  DAgger iteration {it}: beta={beta ** it:.3f} rollout objective {obj:.4f} "
            f"samples {n} loss {losses[-1]:.4f}", flush=True)
  return ImitationResult(params, losses, objs, int(data[0].shape[0]))


def offline_optimum(trace: Trace, cluster: Cluster, *, spec: Spec, chunk: int = 4096):
  """Exact offline optimum by brute force over all M^N assignments (tiny instances only).

  Knowing the whole trace, the best assignment of every VM to a machine such that the reservations fit
  at every time step; its :func:`par_objective` bounds every online policy from below (an online
  policy that places every VM produces one of these feasible assignments).

  Returns:
    ``(objective, assignment)`` as (float, int array [N]); ``(inf, None)`` if no assignment fits.

  Example:
    >>> from mlsys_jax.sched.placement.traces import make_trace
    >>> tr = make_trace([0, 0], np.full((2, 2, 1), 0.5), np.full((2, 1), 0.5))
    >>> obj, a = offline_optimum(tr, Cluster(jnp.ones((2, 1))), spec=Spec(horizon=2))
    >>> obj, sorted(a.tolist())       # one VM per machine: perfectly balanced
    (1.0, [0, 1])
  """
  validate_trace(trace, cluster, spec.horizon, n_types=spec.n_types)
  cap = np.asarray(cluster.capacity, np.float32)
  m = cap.shape[0]
  valid = np.asarray(trace.valid)
  idx = np.flatnonzero(valid)
  n = idx.size
  if n == 0:
    raise ValueError(f"offline_optimum: the trace has no valid VMs (valid is all False over its "
                     f"{valid.shape[0]} rows), so there is nothing to place; give a trace with at least "
                     "one VM (padding rows are skipped).")
  if m ** n > 2_000_000:
    raise ValueError(f"{m}^{n} assignments is too many for brute force; use <= 2e6 (tiny instances).")
  t_len = spec.horizon
  arr, usage = np.asarray(trace.arrival)[idx], np.asarray(trace.usage)[idx]
  life, size = np.asarray(trace.lifetime)[idx], np.asarray(trace.size)[idx]
  l = usage.shape[1]
  pu = np.zeros((n, t_len + l, usage.shape[2]), np.float32)
  pr = np.zeros_like(pu)
  for i in range(n):
    pu[i, arr[i]:arr[i] + l] = usage[i]
    pr[i, arr[i]:arr[i] + life[i]] = size[i]
  pu, pr = jnp.asarray(pu[:, :t_len]), jnp.asarray(pr[:, :t_len])
  capj = jnp.asarray(cap)

  @jax.jit
  def score(assign):
    oh = jax.nn.one_hot(assign, m, dtype=jnp.float32)           # [S, N, M]
    use = jnp.einsum("snm,ntr->smtr", oh, pu)
    res = jnp.einsum("snm,ntr->smtr", oh, pr)
    ok = jnp.all(res <= capj[None, :, None, :] * (1 + _CAP_TOL), axis=(1, 2, 3))
    obj = jax.vmap(lambda u: par_objective(u, capj))(use)
    return jnp.where(ok, obj, jnp.inf)

  best, best_a = np.inf, None
  all_a = itertools.product(range(m), repeat=n)
  while True:
    block = np.array(list(itertools.islice(all_a, chunk)), np.int32).reshape(-1, n)
    if block.shape[0] == 0:
      break
    rows = block.shape[0]
    if rows < chunk:  # pad to one shape (one compilation)
      block = np.concatenate([block, np.repeat(block[:1], chunk - rows, 0)])
    s = np.asarray(score(jnp.asarray(block)))[:rows]
    j = int(np.argmin(s))
    if s[j] < best:
      best, best_a = float(s[j]), block[j]
  if best_a is None:
    return float("inf"), None
  full = np.full(valid.shape[0], -1, np.int32)
  full[idx] = best_a
  return best, full
