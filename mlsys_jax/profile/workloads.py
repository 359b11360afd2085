"""Small RL and supervised workloads annotated the RL-Scope way (Gleeson et al., MLSys 2021, Sec. 5):
operations ``inference``, ``simulation`` (with a :func:`~mlsys_jax.profile.simulator` scope),
``replay_buffer``, ``backpropagation``, ``data_loading``.

Environments, written here twice with the same dynamics (classic-control equations, as in Gym):

* ``cartpole`` (Barto, Sutton & Anderson 1983; 2 actions, episodes end at |x| > 2.4, |theta| > 12 deg or
  200 steps) and ``pendulum`` (torque discretised to {-2, 0, 2} so both agents apply; 200-step episodes);
* backend ``'numpy'`` (a Python/numpy simulator, like Gym's) or ``'jax'`` (a jitted pure step function,
  like gymnax; its time shows as dispatch/wait inside the ``simulation`` operation).

Agents in flax + optax: ``a2c`` (on-policy: one gradient step per 32-step rollout) and ``dqn``
(off-policy: one gradient step on a 64-sample replay batch per environment step, target network every
100 steps); ``supervised``: an MLP regression (no simulator).

:func:`make_workload` returns a zero-argument callable running ``steps`` environment steps (or
training steps) per call and carrying its state between calls, ready for :func:`calibrate`/
:func:`validate`/``with Profiler(): workload()``.

>>> from mlsys_jax import profile
>>> e = profile.CartPoleNP(seed=0)
>>> obs, reward, done = e.step(1)
>>> obs.shape, reward, done
((4,), 1.0, False)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax._checks import check_choice, check_int
from mlsys_jax.profile.scopes import block_until_ready, device_get, device_put, jit, operation, simulator

ALGOS = ("a2c", "dqn", "supervised")
ENVS = ("cartpole", "pendulum")
BACKENDS = ("numpy", "jax")
PENDULUM_TORQUES = (-2.0, 0.0, 2.0)

# ---- environments: numpy ----------------------------------------------------------------------------
_G, _MC, _MP, _L, _FMAG, _TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
_THETA_LIM, _X_LIM, _HORIZON = 12 * 2 * math.pi / 360, 2.4, 200


def _check_np_action(env: str, a: Any, n_actions: int, allowed: str) -> None:
  """Refuse anything but one Python/numpy integer action in ``[0, n_actions)`` for ``<env>.step``."""
  if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
    raise TypeError(f"{env}.step: a must be one integer action in [0, {n_actions}), got "
                    f"{type(a).__name__} {a!r}; cast it with int(a).")
  if not 0 <= int(a) < n_actions:
    raise ValueError(f"{env}.step: action a must {allowed}, got {int(a)}.")


class CartPoleNP:
  """CartPole in numpy (Gym's classic-control equations, Euler integration, tau = 0.02 s)."""
  n_actions, obs_dim = 2, 4

  def __init__(self, seed: int = 0):
    self.rng = np.random.default_rng(seed)
    self.reset()

  def reset(self) -> np.ndarray:
    self.s = self.rng.uniform(-0.05, 0.05, 4)
    self.t = 0
    return self.s.astype(np.float32)

  def step(self, a: int) -> tuple[np.ndarray, float, bool]:
    _check_np_action("CartPoleNP", a, self.n_actions, "be 0 (push left) or 1 (push right)")
    x, xd, th, thd = self.s
    force = _FMAG if a == 1 else -_FMAG
    ct, st = math.cos(th), math.sin(th)
    pml = _MP * _L
    temp = (force + pml * thd * thd * st) / (_MC + _MP)
    thacc = (_G * st - ct * temp) / (_L * (4.0 / 3.0 - _MP * ct * ct / (_MC + _MP)))
    xacc = temp - pml * thacc * ct / (_MC + _MP)
    self.s = np.array([x + _TAU * xd, xd + _TAU * xacc, th + _TAU * thd, thd + _TAU * thacc])
    self.t += 1
    done = bool(abs(self.s[0]) > _X_LIM or abs(self.s[2]) > _THETA_LIM or self.t >= _HORIZON)
    return self.s.astype(np.float32), 1.0, done


class PendulumNP:
  """Pendulum swing-up in numpy (Gym's classic-control Pendulum-v1 equations, as in :func:`pendulum_step`:
  unit mass and length, g = 10, dt = 0.05 s, torque ``u = PENDULUM_TORQUES[a]``).

  State ``(th, thd)`` in float64, reset to ``th ~ U(-pi, pi)``, ``thd ~ U(-1, 1)``; ``step(a)`` returns
  ``(obs = [cos th', sin th', thd'] float32, reward = -cost of the state before the step, done)`` with
  ``done`` after 200 steps. ``a`` must be an integer in [0, 3).
  """
  n_actions, obs_dim = len(PENDULUM_TORQUES), 3

  def __init__(self, seed: int = 0):
    check_int("seed", seed, 0)
    self.rng = np.random.default_rng(seed)
    self.reset()

  def _obs(self) -> np.ndarray:
    return np.array([math.cos(self.th), math.sin(self.th), self.thd], np.float32)

  def reset(self) -> np.ndarray:
    self.th, self.thd = self.rng.uniform(-math.pi, math.pi), self.rng.uniform(-1.0, 1.0)
    self.t = 0
    return self._obs()

  def step(self, a: int) -> tuple[np.ndarray, float, bool]:
    _check_np_action("PendulumNP", a, self.n_actions,
                     f"lie in [0, {self.n_actions}) (an index into PENDULUM_TORQUES)")
    u = PENDULUM_TORQUES[int(a)]
    th_n = ((self.th + math.pi) % (2 * math.pi)) - math.pi
    cost = th_n ** 2 + 0.1 * self.thd ** 2 + 0.001 * u ** 2
    thd = self.thd + (3 * 10.0 / 2 * math.sin(self.th) + 3.0 * u) * 0.05
    self.thd = min(max(thd, -8.0), 8.0)
    self.th = self.th + self.thd * 0.05
    self.t += 1
    return self._obs(), -cost, self.t >= _HORIZON


# ---- environments: JAX (pure, jitted; state is an array, t carried in it) ----------------------------
def _check_key(key: Any) -> None:
  ok = isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 0
                                       or key.dtype == jnp.uint32 and key.shape == (2,))
  if not ok:
    raise TypeError(f"key must be one PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), got "
                    f"{type(key).__name__} {getattr(key, 'dtype', '')}{list(np.shape(key))}; "
                    "use jax.vmap over a batch of keys.")


def _check_step_args(env: str, s: Any, a: Any, state_dim: int, n_actions: int) -> None:
  """Static checks (shapes, dtypes: also under jit) and, for a concrete action, its range."""
  if np.shape(s) != (state_dim,) or not jnp.issubdtype(jnp.result_type(s), jnp.floating):
    raise ValueError(f"{env}_step: s must be a float state of shape ({state_dim},) from {env}_reset (the last "
                     f"entry is the step count t), got {jnp.result_type(s)}{list(np.shape(s))}; use jax.vmap "
                     "for a batch of states.")
  if np.ndim(a) != 0 or not jnp.issubdtype(jnp.result_type(a), jnp.integer):
    raise TypeError(f"{env}_step: a must be one integer action in [0, {n_actions}), got "
                    f"{jnp.result_type(a)}{list(np.shape(a))}; cast it, e.g. jnp.int32(a).")
  if not isinstance(a, jax.core.Tracer) and not 0 <= int(a) < n_actions:
    raise ValueError(f"{env}_step: action a must lie in [0, {n_actions}), got {int(a)}.")


def cartpole_reset(key: jax.Array) -> jax.Array:
  """Initial JAX CartPole state ``[x, x_dot, theta, theta_dot, t]``: the four physical variables drawn
  uniformly from [-0.05, 0.05] (Gym's classic-control CartPole, after Barto, Sutton & Anderson, IEEE
  SMC 1983) and the step count ``t = 0``.

  Args:
    key: one PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).

  Returns:
    float32 [5].

  Raises:
    TypeError: ``key`` is not a single PRNG key.

  Example:
    >>> s = jax.jit(cartpole_reset)(jax.random.PRNGKey(0))
    >>> s.shape, float(s[4]), bool(jnp.all(jnp.abs(s[:4]) <= 0.05))
    ((5,), 0.0, True)
  """
  _check_key(key)
  return jnp.concatenate([jax.random.uniform(key, (4,), minval=-0.05, maxval=0.05), jnp.zeros(1)])


def cartpole_step(s: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One CartPole step, the equations of :class:`CartPoleNP` (Gym's classic control; Barto, Sutton &
  Anderson 1983; Florian 2007 for the pole dynamics), pure and jit-able.

  With force ``F = +10 N`` for ``a == 1`` else ``-10 N``, cart mass 1 kg, pole mass 0.1 kg, pole
  half-length ``l = 0.5`` m, ``g = 9.8``::

      temp = (F + m_p l thd^2 sin th) / (m_c + m_p)
      thacc = (g sin th - cos th temp) / (l (4/3 - m_p cos^2 th / (m_c + m_p)))
      xacc = temp - m_p l thacc cos th / (m_c + m_p)

  then one explicit Euler step of ``tau = 0.02`` s (positions with the old velocities). The episode is
  done when ``|x| > 2.4``, ``|theta| > 12 deg`` or ``t >= 200``.

  Args:
    s: float [5] state ``[x, x_dot, theta, theta_dot, t]`` (:func:`cartpole_reset`).
    a: integer scalar action, 0 (push left) or 1 (push right). Checked when concrete; under ``jit``
      any value other than 1 pushes left.

  Returns:
    ``(new state [5], observation [4] = new state[:4], reward 1.0, done bool)``.

  Raises:
    ValueError: ``s`` not a float [5] array, or a concrete ``a`` outside {0, 1}. TypeError: ``a``
    not an integer scalar.

  Example:
    >>> ns, obs, r, done = jax.jit(cartpole_step)(jnp.zeros(5), 1)   # 88/451 m/s, -12/41 rad/s
    >>> [round(float(v), 5) for v in ns]
    [0.0, 0.19512, 0.0, -0.29268, 1.0]
  """
  _check_step_args("cartpole", s, a, 5, 2)
  x, xd, th, thd, t = s[0], s[1], s[2], s[3], s[4]
  force = jnp.where(a == 1, _FMAG, -_FMAG)
  ct, st = jnp.cos(th), jnp.sin(th)
  pml = _MP * _L
  temp = (force + pml * thd * thd * st) / (_MC + _MP)
  thacc = (_G * st - ct * temp) / (_L * (4.0 / 3.0 - _MP * ct * ct / (_MC + _MP)))
  xacc = temp - pml * thacc * ct / (_MC + _MP)
  ns = jnp.stack([x + _TAU * xd, xd + _TAU * xacc, th + _TAU * thd, thd + _TAU * thacc, t + 1])
  done = (jnp.abs(ns[0]) > _X_LIM) | (jnp.abs(ns[2]) > _THETA_LIM) | (ns[4] >= _HORIZON)
  return ns, ns[:4], jnp.float32(1.0), done


def pendulum_reset(key: jax.Array) -> jax.Array:
  """Initial JAX Pendulum state ``[theta, theta_dot, t]``: ``theta`` uniform in [-pi, pi],
  ``theta_dot`` uniform in [-1, 1] (Gym's classic-control Pendulum-v1), step count ``t = 0``.

  Args:
    key: one PRNG key.

  Returns:
    float32 [3].

  Raises:
    TypeError: ``key`` is not a single PRNG key.

  Example:
    >>> s = jax.jit(pendulum_reset)(jax.random.PRNGKey(0))
    >>> s.shape, float(s[2])
    ((3,), 0.0)
  """
  _check_key(key)
  k1, k2 = jax.random.split(key)
  return jnp.stack([jax.random.uniform(k1, minval=-math.pi, maxval=math.pi),
                    jax.random.uniform(k2, minval=-1.0, maxval=1.0), jnp.float32(0.0)])


def pendulum_step(s: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One Pendulum step, the equations of :class:`PendulumNP` (Gym's classic-control Pendulum-v1: unit
  mass and length, ``g = 10``, ``dt = 0.05``), pure and jit-able.

  With torque ``u = PENDULUM_TORQUES[a]`` (-2, 0 or 2) and ``angle_normalize(th)`` in [-pi, pi)::

      cost = angle_normalize(th)^2 + 0.1 thd^2 + 0.001 u^2        (of the state before the step)
      thd' = clip(thd + (3 g / 2 sin th + 3 u) dt, -8, 8),  th' = th + thd' dt

  Args:
    s: float [3] state ``[theta, theta_dot, t]`` (:func:`pendulum_reset`).
    a: integer scalar action index into :data:`PENDULUM_TORQUES`. Checked when concrete; under ``jit``
      an index outside [0, 3) is clamped (JAX's indexing).

  Returns:
    ``(new state [3], observation [cos th', sin th', thd'], reward -cost, done = t' >= 200)``.

  Raises:
    ValueError: ``s`` not a float [3] array, or a concrete ``a`` outside [0, 3). TypeError: ``a`` not
    an integer scalar.

  Example:
    >>> ns, obs, r, done = jax.jit(pendulum_step)(jnp.zeros(3), 2)   # u = 2: thd' = 3 u dt
    >>> [round(float(v), 4) for v in ns], round(float(r), 6)
    ([0.015, 0.3, 1.0], -0.004)
  """
  _check_step_args("pendulum", s, a, 3, len(PENDULUM_TORQUES))
  th, thd, t = s[0], s[1], s[2]
  u = jnp.asarray(PENDULUM_TORQUES)[a]
  th_n = ((th + math.pi) % (2 * math.pi)) - math.pi
  cost = th_n ** 2 + 0.1 * thd ** 2 + 0.001 * u ** 2
  thd = jnp.clip(thd + (3 * 10.0 / 2 * jnp.sin(th) + 3.0 * u) * 0.05, -8.0, 8.0)
  th = th + thd * 0.05
  ns = jnp.stack([th, thd, t + 1])
  return ns, jnp.stack([jnp.cos(th), jnp.sin(th), thd]), -cost, ns[2] >= _HORIZON


class _JaxEnv:
  """Host-side handle of a jitted JAX environment: state, obs and done stay device arrays."""

  def __init__(self, name: str, seed: int):
    reset, step = (cartpole_reset, cartpole_step) if name == "cartpole" else (pendulum_reset, pendulum_step)
    self.n_actions, self.obs_dim = (2, 4) if name == "cartpole" else (len(PENDULUM_TORQUES), 3)
    self._reset, self._step = jit(reset), jit(step)
    self._obs_of = jit((lambda s: s[:4]) if name == "cartpole" else
                       (lambda s: jnp.stack([jnp.cos(s[0]), jnp.sin(s[0]), s[1]])))
    self.key = jax.random.PRNGKey(seed)
    self.reset()

  def reset(self):
    self.key, k = jax.random.split(self.key)
    self.s = self._reset(k)
    return self._obs_of(self.s)

  def step(self, a):
    self.s, obs, r, done = self._step(self.s, a)
    return obs, r, done


def _make_env(env: str, backend: str, seed: int):
  if backend == "jax":
    return _JaxEnv(env, seed)
  return CartPoleNP(seed) if env == "cartpole" else PendulumNP(seed)


def _sim_step(e, a, backend: str):
  """One simulation step with auto-reset; returns (obs, reward, done) with ``done`` a host bool."""
  with operation("simulation"), simulator():
    obs, r, done = e.step(a)
    if backend == "jax":
      done = bool(device_get(done))
    if done:
      obs = e.reset()
  return obs, r, done


class _MLP(nn.Module):
  out: int
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(self.hidden)(x))
    x = nn.tanh(nn.Dense(self.hidden)(x))
    return nn.Dense(self.out)(x)


def _a2c(env: str, backend: str, steps: int, seed: int, n_rollout: int = 32, gamma: float = 0.99):
  e = _make_env(env, backend, seed)
  net = _MLP(e.n_actions + 1)
  params = jax.jit(net.init)(jax.random.PRNGKey(seed), jnp.zeros((1, e.obs_dim)))
  opt = optax.adam(7e-4)
  st = {"params": params, "opt": opt.init(params), "key": jax.random.PRNGKey(seed + 1), "obs": e.reset(),
        "buf": []}

  def act(p, obs, key):
    key, k = jax.random.split(key)
    logits = net.apply(p, obs[None])[0, :-1]
    return jax.random.categorical(k, logits), key

  def loss(p, obs, acts, rets):
    out = net.apply(p, obs)
    logits, v = out[:, :-1], out[:, -1]
    logp = jax.nn.log_softmax(logits)[jnp.arange(acts.shape[0]), acts]
    adv = rets - v
    ent = -(jax.nn.softmax(logits) * jax.nn.log_softmax(logits)).sum(-1).mean()
    return -(logp * jax.lax.stop_gradient(adv)).mean() + 0.5 * (adv ** 2).mean() - 0.01 * ent

  def update(p, o, obs, acts, rews, dones, last_obs):
    last_v = net.apply(p, last_obs[None])[0, -1]

    def back(ret, xs):
      r, d = xs
      ret = r + gamma * ret * (1.0 - d)
      return ret, ret
    _, rets = jax.lax.scan(back, last_v, (rews, dones), reverse=True)
    g = jax.grad(loss)(p, obs, acts, jax.lax.stop_gradient(rets))
    upd, o = opt.update(g, o, p)
    return optax.apply_updates(p, upd), o

  act_j, update_j = jit(act), jit(update)

  def run():
    for _ in range(steps):
      with operation("inference"):
        a, st["key"] = act_j(st["params"], jnp.asarray(st["obs"]), st["key"])
        if backend == "numpy":
          a = int(device_get(a))
      obs, r, done = _sim_step(e, a, backend)
      st["buf"].append((st["obs"], a, r, float(done)))
      st["obs"] = obs
      if len(st["buf"]) == n_rollout:
        with operation("backpropagation"):
          o_, a_, r_, d_ = zip(*st["buf"])
          batch = (jnp.stack([jnp.asarray(x) for x in o_]), jnp.asarray(np.array(a_) if backend == "numpy" else
                                                                          jnp.stack(a_)),
                   jnp.asarray(np.array(r_, np.float32) if backend == "numpy" else jnp.stack(r_)),
                   jnp.asarray(np.array(d_, np.float32)))
          st["params"], st["opt"] = update_j(st["params"], st["opt"], *batch, jnp.asarray(obs))
          block_until_ready(st["params"])
        st["buf"] = []
  return run


def _dqn(env: str, backend: str, steps: int, seed: int, batch: int = 64, capacity: int = 10_000,
         gamma: float = 0.99, eps: float = 0.1, target_every: int = 100):
  e = _make_env(env, backend, seed)
  net = _MLP(e.n_actions)
  params = jax.jit(net.init)(jax.random.PRNGKey(seed), jnp.zeros((1, e.obs_dim)))
  opt = optax.adam(1e-3)
  rng = np.random.default_rng(seed)
  buf = {"o": np.zeros((capacity, e.obs_dim), np.float32), "a": np.zeros(capacity, np.int32),
         "r": np.zeros(capacity, np.float32), "o2": np.zeros((capacity, e.obs_dim), np.float32),
         "d": np.zeros(capacity, np.float32)}
  st = {"params": params, "target": params, "opt": opt.init(params), "obs": e.reset(), "n": 0, "t": 0}

  def greedy(p, obs):
    return jnp.argmax(net.apply(p, obs[None])[0])

  def update(p, tp, o, ob, a, r, ob2, d):
    def loss(p):
      q = net.apply(p, ob)[jnp.arange(a.shape[0]), a]
      y = r + gamma * (1.0 - d) * net.apply(tp, ob2).max(-1)
      return optax.huber_loss(q, jax.lax.stop_gradient(y)).mean()
    g = jax.grad(loss)(p)
    upd, o = opt.update(g, o, p)
    return optax.apply_updates(p, upd), o

  greedy_j, update_j = jit(greedy), jit(update)

  def run():
    for _ in range(steps):
      with operation("inference"):
        a = greedy_j(st["params"], jnp.asarray(st["obs"]))
        a = int(device_get(a))
        if rng.random() < eps:
          a = int(rng.integers(e.n_actions))
      obs, r, done = _sim_step(e, a if backend == "numpy" else jnp.int32(a), backend)
      with operation("replay_buffer"):
        i = st["n"] % capacity
        o2 = np.asarray(device_get(obs)) if backend == "jax" else obs
        buf["o"][i], buf["a"][i], buf["r"][i] = np.asarray(device_get(st["obs"])), a, float(device_get(r))
        buf["o2"][i], buf["d"][i] = o2, float(done)
        st["n"] += 1
        idx = rng.integers(min(st["n"], capacity), size=batch) if st["n"] >= batch else None
        mb = None if idx is None else device_put({k: v[idx] for k, v in buf.items()})
      st["obs"] = obs
      if mb is not None:
        with operation("backpropagation"):
          st["params"], st["opt"] = update_j(st["params"], st["target"], st["opt"], mb["o"], mb["a"], mb["r"],
                                             mb["o2"], mb["d"])
          block_until_ready(st["params"])
      st["t"] += 1
      if st["t"] % target_every == 0:
        st["target"] = st["params"]
  return run


def _supervised(steps: int, seed: int, batch: int = 64, n: int = 2048, dim: int = 16):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, dim)).astype(np.float32)
  y = (np.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]).astype(np.float32)
  net = _MLP(1)
  params = jax.jit(net.init)(jax.random.PRNGKey(seed), jnp.zeros((1, dim)))
  opt = optax.adam(1e-3)
  st = {"params": params, "opt": opt.init(params)}

  def update(p, o, xb, yb):
    g = jax.grad(lambda p: ((net.apply(p, xb) - yb) ** 2).mean())(p)
    upd, o = opt.update(g, o, p)
    return optax.apply_updates(p, upd), o

  update_j = jit(update)

  def run():
    for _ in range(steps):
      with operation("data_loading"):
        idx = rng.integers(n, size=batch)
        xb, yb = device_put(x[idx]), device_put(y[idx])
      with operation("backpropagation"):
        st["params"], st["opt"] = update_j(st["params"], st["opt"], xb, yb)
        block_until_ready(st["params"])
  return run


def make_workload(algo: str, env: str = "cartpole", backend: str = "numpy", *, steps: int = 256,
                  seed: int = 0) -> Callable[[], None]:
  """A zero-argument annotated workload: ``steps`` environment steps of ``algo`` on ``env`` simulated
  with ``backend`` per call (``algo='supervised'``: ``steps`` training steps; env/backend ignored)."""
  check_choice("algo", algo, ALGOS)
  check_choice("env", env, ENVS)
  check_choice("backend", backend, BACKENDS)
  check_int("steps", steps, 1)
  check_int("seed", seed, 0)
  if algo == "supervised":
    return _supervised(steps, seed)
  return (_a2c if algo == "a2c" else _dqn)(env, backend, steps, seed)


def numpy_jax_agree(env: str = "cartpole", steps: int = 50, seed: int = 0) -> float:
  """Max |obs_numpy - obs_jax| over ``steps`` steps from the same start and actions (a consistency check
  of the two simulators; float32 JAX vs float64 numpy). NaN if the simulators disagree by NaN (it is not
  dropped); ``steps >= 1``."""
  check_choice("env", env, ENVS)
  check_int("steps", steps, 1)
  e = CartPoleNP(seed) if env == "cartpole" else PendulumNP(seed)
  if env == "cartpole":
    s = jnp.concatenate([jnp.asarray(e.s, jnp.float32), jnp.zeros(1)])
    step = jax.jit(cartpole_step)
  else:
    s = jnp.asarray([e.th, e.thd, 0.0], jnp.float32)
    step = jax.jit(pendulum_step)
  rng = np.random.default_rng(seed)
  err = 0.0
  for _ in range(steps):
    a = int(rng.integers(e.n_actions))
    o_np, _, d = e.step(a)
    s, o_j, _, _ = step(s, jnp.int32(a))
    d = float(np.max(np.abs(o_np - np.asarray(o_j))))
    err = d if d > err or np.isnan(d) else err   # (a NaN, once seen, stays: nothing compares above it)
    if d:
      break
  return err
