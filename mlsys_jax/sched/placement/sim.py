"""A jittable online VM-placement simulator and its objective (FirePlace, Balaji et al., MLSys 2021).

FirePlace places short-lived, spiky Firecracker micro-VMs online, one at a time as they arrive, on one of
``M`` physical machines (PMs) so that the *peak-to-average ratio* (PAR) of resource use across machines
stays low (Balaji, Kakovitch, Narayanaswamy, "FirePlace: Placing Firecracker Virtual Machines with
Hindsight Imitation", MLSys 2021, abstract and Sec. 2). The paper's exact aggregation over time is not
public, so it is fixed here in code:

  util[m, t, r] = usage[m, t, r] / capacity[m, r]                        (utilisation, in [0, 1])
  PAR_r(t)      = max_m util[m, t, r] / mean_m util[m, t, r]             (1 when no machine is used)
  objective     = mean over t in [0, horizon) and r of PAR_r(t)          (``aggregate='mean'``; >= 1)

``aggregate='peak'`` is the other common reading: per resource, the peak over time of the busiest
machine over the time-mean of the machine-mean, averaged over resources. Lower is better for both.

Capacity is enforced on *reservations*: each VM declares a size (its per-resource maximum; its usage
never exceeds it). A machine is feasible for an arriving VM when the sizes of the VMs active on it now plus
the new VM's size fit in its capacity; reservations only shrink afterwards (VMs leave), so actual usage
never exceeds capacity. The simulator masks infeasible machines; a VM that fits nowhere is *rejected*
(not placed, action -1) and counted in ``SimResult.rejected``.

The simulator is a ``lax.scan`` over arrivals holding a (machine x time x resource) usage buffer; every
shape is static, so it runs under ``jit`` and ``vmap`` over thousands of traces. A policy is a pure
function ``policy(params, obs, key) -> scores[M]``: the simulator places the VM on the feasible machine with
the highest score (ties: lowest index). Stochastic policies add Gumbel noise to their scores themselves.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mlsys_jax._checks import check_choice, check_int

__all__ = ["Cluster", "Trace", "Spec", "Observation", "SimResult", "make_cluster", "simulate",
           "par_per_step", "par_objective", "hindsight_scores", "validate_trace"]

# Capacity comparisons allow this relative slack for float rounding of summed sizes.
_CAP_TOL = 1e-6


class Cluster(NamedTuple):
  """The physical machines. ``capacity``: float [M, R], each machine's capacity per resource (> 0)."""
  capacity: jax.Array


class Trace(NamedTuple):
  """A padded arrival trace of ``N`` VMs, in arrival order (build with ``traces.synthetic_trace``,
  ``traces.make_trace`` or ``traces.load_csv_trace``).

  Attributes:
    arrival: int32 [N], arrival time step, non-decreasing, in ``[0, horizon)``.
    usage: float32 [N, L, R], usage of each VM by age (step since arrival), zero after its lifetime
      (:func:`validate_trace` rejects usage after the lifetime; on traced input, where validation is
      skipped, the simulator ignores it, so capacity still holds); ``L`` is the longest lifetime the
      buffer holds.
    lifetime: int32 [N], steps the VM stays (1..L); its reservation is held for these steps.
    size: float32 [N, R], the VM's declared size (reservation); ``0 <= usage <= size``.
    vm_type: int32 [N], VM type in ``[0, n_types)`` (observable at arrival, like the size); :func:`simulate`
      refuses other types (on traced input, where validation is skipped, such a VM's per-type counts in
      :class:`Observation` are NaN while it is active).
    valid: bool [N], False for padding rows (skipped: never placed, not counted as rejected).
  """
  arrival: jax.Array
  usage: jax.Array
  lifetime: jax.Array
  size: jax.Array
  vm_type: jax.Array
  valid: jax.Array


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static sizes of a simulation: ``horizon`` time steps scored, ``window`` steps of usage history a
  policy observes, ``n_types`` VM types (for per-type counts)."""
  horizon: int
  window: int = 8
  n_types: int = 4

  def __post_init__(self):
    check_int("horizon", self.horizon, 1)
    check_int("window", self.window, 1)
    check_int("n_types", self.n_types, 1)


class Observation(NamedTuple):
  """What a policy sees when VM ``index`` arrives at time ``time`` (nothing from the future, except
  ``hindsight``, which is zeros unless the simulation was asked for hindsight scores).

  Attributes:
    usage_hist: [M, W, R] utilisation (usage / capacity) of each machine at times ``time-W+1 .. time``
      (zeros before 0). The last entry is the usage now, from VMs placed before this one.
    reserved: [M, R] reserved fraction of each machine's capacity now.
    counts: [M, K] active VMs of each type on each machine now.
    size_frac: [M, R] the arriving VM's size as a fraction of each machine's capacity.
    vm_type: int, the arriving VM's type.
    feasible: bool [M], machines where the VM fits now.
    index: int, arrival index of the VM.  time: int, its arrival time.
    hindsight: [M] hindsight cost of each candidate (see :func:`hindsight_scores`), or zeros.
  """
  usage_hist: jax.Array
  reserved: jax.Array
  counts: jax.Array
  size_frac: jax.Array
  vm_type: jax.Array
  feasible: jax.Array
  index: jax.Array
  time: jax.Array
  hindsight: jax.Array


class SimResult(NamedTuple):
  """Outcome of :func:`simulate`.

  Attributes:
    actions: int32 [N], machine of each VM (-1: rejected or padding).
    rejected: int32, valid VMs that fit on no machine.
    objective: float32, :func:`par_objective` of the final usage (``aggregate='mean'``).
    usage: float32 [M, horizon, R], usage of each machine over time.
    nonfinite: int32, decisions where the policy gave a feasible machine a NaN/inf score (counted,
      never hidden). The VM then still goes to a feasible machine: the first feasible NaN or +inf one;
      a feasible -inf counts as the lowest finite score, so a VM is never placed on a full machine.
    obs: the per-step :class:`Observation` stacked over arrivals (only with ``record=True``, else None).
  """
  actions: jax.Array
  rejected: jax.Array
  objective: jax.Array
  usage: jax.Array
  nonfinite: Any = 0
  obs: Any = None


Policy = Callable[[Any, Observation, jax.Array], jax.Array]


def make_cluster(n_machines: int, capacity=(1.0, 1.0)) -> Cluster:
  """``n_machines`` identical machines of the given per-resource ``capacity`` (default CPU, memory = 1).

  Example:
    >>> make_cluster(3).capacity.shape
    (3, 2)
  """
  if isinstance(n_machines, (int, np.integer)) and not isinstance(n_machines, bool) and n_machines < 1:
    raise ValueError(f"n_machines must be >= 1, got {n_machines}: a cluster needs at least one machine.")
  check_int("n_machines", n_machines, 1)
  cap = np.asarray(capacity, np.float32)
  if cap.ndim != 1 or cap.size == 0 or not np.all(np.isfinite(cap)) or np.any(cap <= 0):
    raise ValueError(f"capacity must be a 1-D sequence of positive finite numbers (one per resource), "
                     f"got {capacity!r}.")
  return Cluster(jnp.asarray(np.tile(cap, (n_machines, 1))))


def _check_cluster(cluster: Cluster) -> None:
  cap = cluster.capacity
  if np.ndim(cap) != 2:
    raise ValueError(f"cluster.capacity must have shape [machines, resources], got {np.shape(cap)}.")
  if np.shape(cap)[0] == 0:
    raise ValueError("the cluster has zero machines; use make_cluster(n_machines >= 1).")
  if not isinstance(cap, jax.core.Tracer) and np.any(np.asarray(cap) <= 0):
    raise ValueError("cluster.capacity must be positive on every machine and resource.")


def validate_trace(trace: Trace, cluster: Cluster, horizon: int, *, n_types: int | None = None) -> None:
  """Raise ``ValueError`` for a trace the simulator cannot run faithfully (concrete arrays only; traced
  arrays, e.g. inside ``vmap``, are skipped: validate before vmapping).

  Checks: shapes agree with the cluster, arrivals are non-decreasing and in ``[0, horizon)``, usage and
  sizes are finite and non-negative, usage never exceeds the VM's size, lifetimes in ``[1, L]``, no usage
  after a VM's lifetime (its reservation is released then), every VM fits on at least one machine
  when it is empty, and VM types are in ``[0, n_types)`` (``n_types=None``: only ``>= 0``; :func:`simulate`
  passes ``spec.n_types``). Padding rows (``valid`` False) are not checked.
  """
  _check_cluster(cluster)
  if n_types is not None:
    check_int("n_types", n_types, 1)
  n, l, r = np.shape(trace.usage)[-3:]
  if np.shape(cluster.capacity)[1] != r:
    raise ValueError(f"trace has {r} resources per VM but the cluster has {np.shape(cluster.capacity)[1]}.")
  if any(isinstance(x, jax.core.Tracer) for x in trace):
    return
  arr = np.asarray(trace.arrival)
  valid = np.asarray(trace.valid, bool)
  usage, size = np.asarray(trace.usage), np.asarray(trace.size)
  life = np.asarray(trace.lifetime)
  if arr.ndim != 1:  # a batch: validate each trace.
    for i in range(arr.shape[0]):
      validate_trace(jax.tree_util.tree_map(lambda x: x[i], trace), cluster, horizon, n_types=n_types)
    return
  _check_vm_types(trace.vm_type, valid, n_types, "trace")
  if not (np.all(np.isfinite(usage)) and np.all(np.isfinite(size))):
    raise ValueError("trace usage/size hold NaN or inf; clean the trace first.")
  if np.any(usage[valid] < 0) or np.any(size[valid] < 0):
    raise ValueError("trace has negative usage or size; usage must be >= 0 (it is a resource amount).")
  va = arr[valid]
  if np.any(np.diff(va) < 0):
    i = int(np.argmax(np.diff(va) < 0))
    raise ValueError(f"trace arrivals must be sorted (non-decreasing); VM {i + 1} arrives at {va[i + 1]} "
                     f"after VM {i} at {va[i]}. Sort the VMs by arrival time.")
  if va.size and (va.min() < 0 or va.max() >= horizon):
    raise ValueError(f"arrivals must lie in [0, horizon={horizon}), got [{va.min()}, {va.max()}].")
  if np.any(life[valid] < 1) or np.any(life[valid] > l):
    raise ValueError(f"lifetimes must lie in [1, {l}] (the usage buffer length), got "
                     f"[{life[valid].min()}, {life[valid].max()}].")
  over = usage > size[:, None, :] * (1 + _CAP_TOL) + 1e-12
  if np.any(over[valid]):
    i = int(np.argmax(np.any(over, axis=(1, 2)) & valid))
    raise ValueError(f"VM {i} uses more than its declared size (max usage {usage[i].max(0)}, size "
                     f"{size[i]}); the size is the reservation and must bound the usage.")
  late = np.any(usage > 0, axis=2) & (np.arange(l)[None, :] >= life[:, None])
  if np.any(late[valid]):
    i = int(np.argmax(np.any(late, axis=1) & valid))
    raise ValueError(f"VM {i} uses resources after its lifetime (lifetime {life[i]}, nonzero usage at age "
                     f"{int(np.flatnonzero(late[i]).max())}); its reservation is released after the "
                     f"lifetime, so usage there could exceed capacity. Set lifetime to at least one past "
                     f"the last nonzero usage step (make_trace's default) or zero the usage after it.")
  cap = np.asarray(cluster.capacity)
  fits = np.all(size[:, None, :] <= cap[None] * (1 + _CAP_TOL), axis=-1).any(axis=1)
  if np.any(~fits & valid):
    i = int(np.argmax(~fits & valid))
    raise ValueError(f"VM {i} (size {size[i]}) is larger than every machine (capacities up to "
                     f"{cap.max(0)}); it can never be placed. Drop it or add larger machines.")


def _par(peak: jax.Array, mean: jax.Array) -> jax.Array:
  """``peak / mean``, 1 exactly where ``mean == 0`` (nothing used). NaN/inf usage gives a NaN/inf mean and
  so a NaN/inf ratio: it propagates (a test on ``mean > 0`` would turn NaN into the best score, 1). The
  inner ``where`` keeps the gradient finite at ``mean == 0``."""
  unused = mean == 0
  return jnp.where(unused, 1.0, peak / jnp.where(unused, 1.0, mean))


def _check_vm_types(vm_type, valid, n_types: int | None, where: str) -> None:
  """ValueError unless every valid VM's type is an integer in ``[0, n_types)`` (``>= 0`` without n_types)."""
  typ, valid = np.asarray(vm_type), np.asarray(valid, bool)
  if typ.shape != valid.shape:
    raise ValueError(f"{where}: vm_type must have shape [N] = {valid.shape} (one type per VM), got {typ.shape}.")
  if not np.issubdtype(typ.dtype, np.integer) and (
      not np.all(np.isfinite(typ[valid])) or np.any(typ[valid] != np.round(typ[valid]))):
    raise ValueError(f"{where}: vm_type must hold integer VM types, got dtype {typ.dtype} with non-integer "
                     "values; cast them with np.asarray(vm_type, np.int32) after checking them.")
  hi = np.inf if n_types is None else n_types
  bad = valid & ((typ < 0) | (typ >= hi))
  if np.any(bad):
    i = int(np.argmax(bad))
    t = typ[i].item()
    allowed = "[0, inf): it is negative" if n_types is None else f"[0, n_types={n_types})"
    fix = ("number the types from 0" if t < 0 else
           f"raise Spec(n_types=...) to at least {int(typ[bad].max()) + 1} or renumber the types")
    raise ValueError(f"{where}: VM {i} has vm_type {t}, outside {allowed} ({int(bad.sum())} VM(s) out of "
                     f"range); such a type has no slot in Observation.counts or the type one-hot, so it "
                     f"would be silently dropped: {fix}.")


def _util(usage: jax.Array, capacity: jax.Array) -> jax.Array:
  """``usage / capacity`` per machine, NaN where the usage is negative: such usage is refused on
  concrete traces (:func:`validate_trace`, :func:`make_trace`) but unchecked on traced ones, where it
  would otherwise lower the mean (or peak) and give a plausible but wrong PAR."""
  return jnp.where(usage < 0, jnp.nan, usage) / capacity[:, None, :]


def par_per_step(usage: jax.Array, capacity: jax.Array) -> jax.Array:
  """PAR_r(t) = max_m util / mean_m util per time step and resource, 1 where no machine is used.

  NaN/inf usage (possible only on traced input, where :func:`validate_trace` is skipped) propagates:
  the step's PAR is NaN (or inf), never the best score 1. Negative usage (also unchecked there) is
  treated as NaN: the step's PAR is NaN, never a plausible finite value.

  Args:
    usage: [M, T, R] usage; capacity: [M, R].

  Returns:
    [T, R] peak-to-average ratios (>= 1; NaN/inf where the usage holds NaN/inf, NaN where it is negative).

  Example:
    >>> u = jnp.array([[[2.0]], [[0.0]]])          # two machines, one step, one resource
    >>> float(par_per_step(u, jnp.ones((2, 1)))[0, 0])   # max 2 / mean 1
    2.0
  """
  util = _util(usage, capacity)
  return _par(jnp.max(util, axis=0), jnp.mean(util, axis=0))


def par_objective(usage: jax.Array, capacity: jax.Array, aggregate: str = "mean") -> jax.Array:
  """The placement objective (lower is better), see the module docstring.

  ``aggregate='mean'``: mean over time and resources of :func:`par_per_step`.
  ``aggregate='peak'``: per resource, max_{t,m} util / mean_{t,m} util (1 if unused), mean over resources.
  A NaN/inf in ``usage`` makes the objective NaN/inf (it propagates; it never scores as unused), and so
  does a negative usage (NaN; refused on concrete traces by :func:`validate_trace`, unchecked on traced
  ones).

  Example:
    >>> u = jnp.array([[[1.0], [1.0]], [[1.0], [0.0]]])   # 2 machines, 2 steps
    >>> float(par_objective(u, jnp.ones((2, 1))))          # (1 + 2) / 2
    1.5
    >>> float(par_objective(u, jnp.ones((2, 1)), "peak"))  # 1 / 0.75
    1.3333333730697632
  """
  check_choice("aggregate", aggregate, ("mean", "peak"))
  if aggregate == "mean":
    return jnp.mean(par_per_step(usage, capacity))
  util = _util(usage, capacity)
  return jnp.mean(_par(jnp.max(util, axis=(0, 1)), jnp.mean(util, axis=(0, 1))))


def hindsight_scores(future: jax.Array, vm_usage: jax.Array, capacity: jax.Array,
                     steps_left: jax.Array) -> jax.Array:
  """Hindsight cost of each candidate machine: the summed PAR over the VM's lifetime window if the VM
  (with its true future usage) joined machine m, given the true future usage of the VMs placed so far
  (FirePlace's hindsight labels, Sec. 3). Lower is better; vmapped over candidates.

  Args:
    future: [M, L, R] usage of the machines over the next L steps (from VMs placed so far).
    vm_usage: [L, R] the arriving VM's usage by age.
    capacity: [M, R].
    steps_left: steps of the window still inside the horizon (later steps do not count).

  Returns:
    [M] cost per candidate machine.
  """
  m, l, _ = future.shape
  inside = (jnp.arange(l) < steps_left)[:, None]

  def cost(j):
    u = future + jax.nn.one_hot(j, m, dtype=future.dtype)[:, None, None] * vm_usage[None]
    return jnp.sum(jnp.where(inside, par_per_step(u, capacity), 0.0))

  return jax.vmap(cost)(jnp.arange(m))


def _choose(scores: jax.Array, feasible: jax.Array) -> jax.Array:
  """Index of the highest-scoring *feasible* machine (ties: lowest index). Non-finite scores are
  sanitised so the choice is always feasible when any machine is: NaN counts as +inf (a NaN machine
  wins, as documented), and -inf as the lowest finite score, so it still beats every infeasible machine.
  When no machine is feasible the result is unused (the VM is rejected)."""
  s = jnp.asarray(scores)
  if not jnp.issubdtype(s.dtype, jnp.floating):
    s = s.astype(jnp.float32)
  s = jnp.where(jnp.isnan(s), jnp.inf, s)
  s = jnp.where(feasible, jnp.maximum(s, jnp.finfo(s.dtype).min), -jnp.inf)
  return jnp.argmax(s).astype(jnp.int32)


def _type_one_hot(typ: jax.Array, n_types: int, dtype=jnp.float32) -> jax.Array:
  """One-hot of a VM type; all NaN for a type outside ``[0, n_types)`` (only reachable on traced input,
  where :func:`validate_trace` is skipped), so the error propagates instead of the VM vanishing from
  the per-type counts."""
  ok = (typ >= 0) & (typ < n_types)
  return jnp.where(ok, jax.nn.one_hot(typ, n_types, dtype=dtype), jnp.nan)


def _sim_core(trace: Trace, capacity: jax.Array, policy: Policy, params: Any, key: jax.Array,
              spec: Spec, record: bool, with_hindsight: bool):
  m, r = capacity.shape
  n, l, _ = trace.usage.shape
  w, t_len, k = spec.window, spec.horizon, spec.n_types
  dtype = trace.usage.dtype
  pad = w - 1  # time t lives at buffer index t + pad (history before 0 reads zeros).
  buf_len = pad + t_len + l
  use0 = jnp.zeros((m, buf_len, r), dtype)
  res0 = jnp.zeros((m, buf_len, r + k), dtype)  # reservations (R) and per-type counts (K)
  ages = jnp.arange(l)

  def step(carry, xs):
    use, res = carry
    i, a, u_vm, life, size, typ, valid, key_i = xs
    # negative usage (unchecked on traced traces) as NaN: summed with other VMs' usage it could stay >= 0
    # on the machine and vanish from the objective; NaN propagates to the objective like NaN usage does
    u_vm = jnp.where(u_vm < 0, jnp.nan, u_vm)
    typ = jnp.where(valid, typ, 0)  # padding rows are unchecked: their type must not reach the features
    hist = lax.dynamic_slice(use, (0, a, 0), (m, w, r))
    now = lax.dynamic_slice(res, (0, a + pad, 0), (m, 1, r + k))[:, 0]
    reserved, counts = now[:, :r], now[:, r:]
    fits = jnp.all(reserved + size[None] <= capacity * (1 + _CAP_TOL), axis=-1)
    feasible = fits & valid
    if with_hindsight:
      future = lax.dynamic_slice(use, (0, a + pad, 0), (m, l, r))
      hs = hindsight_scores(future, u_vm, capacity, t_len - a)
    else:
      hs = jnp.zeros((m,), dtype)
    obs = Observation(hist / capacity[:, None, :], reserved / capacity, counts,
                      size[None] / capacity, typ, feasible, i, a, hs)
    scores = policy(params, obs, key_i)
    action = _choose(scores, feasible)
    placed = jnp.any(feasible)
    alive_b = (ages < life)[:, None]
    alive = alive_b.astype(dtype)
    # usage after the lifetime is masked (the reservation is gone; validate_trace rejects such traces)
    add_u = jnp.where(placed, u_vm * alive, 0.0)[None]
    # a select, not alive * (...): a NaN type one-hot must not outlive the VM (0 * NaN is NaN)
    add_r = jnp.where(placed & alive_b, jnp.concatenate([size, _type_one_hot(typ, k, dtype)])[None], 0.0)
    row_u = lax.dynamic_slice(use, (action, a + pad, 0), (1, l, r))
    use = lax.dynamic_update_slice(use, row_u + add_u, (action, a + pad, 0))
    row_r = lax.dynamic_slice(res, (action, a + pad, 0), (1, l, r + k))
    res = lax.dynamic_update_slice(res, row_r + add_r[None], (action, a + pad, 0))
    bad = jnp.any(feasible & ~jnp.isfinite(scores))
    out = (jnp.where(placed, action, -1), valid & ~placed, bad)
    if record:
      out = out + (obs,)
    return (use, res), out

  keys = jax.random.split(key, n)
  xs = (jnp.arange(n, dtype=jnp.int32), trace.arrival.astype(jnp.int32), trace.usage,
        trace.lifetime.astype(jnp.int32), trace.size, trace.vm_type.astype(jnp.int32),
        trace.valid.astype(bool), keys)
  (use, _), outs = lax.scan(step, (use0, res0), xs)
  usage = use[:, pad:pad + t_len]
  obj = par_objective(usage, capacity)
  return SimResult(outs[0], jnp.sum(outs[1]).astype(jnp.int32), obj, usage,
                   jnp.sum(outs[2]).astype(jnp.int32), outs[3] if record else None)


@functools.partial(jax.jit, static_argnames=("policy", "spec", "record", "with_hindsight"))
def _sim_jit(trace, capacity, policy, params, key, spec, record, with_hindsight):
  return _sim_core(trace, capacity, policy, params, key, spec, record, with_hindsight)


def simulate(trace: Trace, cluster: Cluster, policy: Policy, *, spec: Spec, key: jax.Array | None = None,
             params: Any = None, record: bool = False, with_hindsight: bool = False) -> SimResult:
  """Place every VM of ``trace`` online with ``policy`` and score the result.

  Jitted; works inside ``jit``/``vmap`` (vmap it over a batch of traces and keys; call
  :func:`validate_trace` on the concrete batch first, as checks are skipped on tracers). On a traced
  trace, a placed VM's NaN or negative usage makes its machine's usage NaN from its arrival on, and so
  the objective NaN (never a plausible score).

  Args:
    trace: a :class:`Trace` (one trace; leading dims [N, ...]).
    cluster: a :class:`Cluster` with ``M >= 1`` machines.
    policy: ``policy(params, obs, key) -> scores[M]`` (hashable: a module-level function or a
      ``functools.partial``); the highest-scoring feasible machine is chosen.
    spec: static sizes (:class:`Spec`).
    key: PRNG key for stochastic policies (default ``PRNGKey(0)``).
    params: passed to the policy (e.g. network weights); traced, so new params do not recompile.
    record: also return the per-step observations (for training).
    with_hindsight: fill ``Observation.hindsight`` with :func:`hindsight_scores` (costs M^2 L R per
      arrival; only the hindsight oracle and label collection need it).

  Returns:
    :class:`SimResult`.

  Example:
    >>> from mlsys_jax.sched.placement import traces, policies
    >>> tr = traces.synthetic_trace(jax.random.PRNGKey(0), n_vms=32, horizon=64, max_life=16)
    >>> res = simulate(tr, make_cluster(4), policies.least_loaded, spec=Spec(horizon=64))
    >>> res.actions.shape, int(res.rejected), bool(res.objective >= 1.0)
    ((32,), 0, True)
  """
  _check_cluster(cluster)
  if not isinstance(spec, Spec):
    raise TypeError(f"spec must be a Spec(horizon=..., window=..., n_types=...), got {type(spec).__name__}.")
  if not callable(policy):
    hint = (f" (for the numpy reference by name use simulate_numpy(..., {policy!r}, ...))"
            if isinstance(policy, str) else "")
    raise TypeError(f"policy must be a function policy(params, obs, key) -> scores, such as "
                    f"placement.least_loaded, got {type(policy).__name__} {policy!r}{hint}.")
  if np.ndim(trace.arrival) == 1 and not any(isinstance(x, jax.core.Tracer) for x in trace):
    validate_trace(trace, cluster, spec.horizon, n_types=spec.n_types)
  if np.ndim(trace.arrival) != 1:
    raise ValueError(f"simulate takes one trace (arrival of rank 1), got arrival shape "
                     f"{np.shape(trace.arrival)}; use jax.vmap for a batch.")
  key = jax.random.PRNGKey(0) if key is None else key
  return _sim_jit(trace, cluster.capacity, policy, params, key, spec, record, with_hindsight)
