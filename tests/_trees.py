"""Small parameter/gradient pytrees shared by the comm tests (a conv kernel, a dense kernel, a bias)."""

import jax
import jax.numpy as jnp


def params():
  return {"conv": jnp.zeros((3, 3, 4, 8)), "dense": jnp.zeros((40, 10)), "bias": jnp.zeros((10,))}


def grads(seed, scale=1.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {"conv": scale * jax.random.normal(ks[0], (3, 3, 4, 8)),
          "dense": scale * jax.random.normal(ks[1], (40, 10)),
          "bias": scale * jax.random.normal(ks[2], (10,))}


def replicated_updates(tx, params, grads, mesh, axis="d"):
  """One ``tx.update`` per device under ``shard_map`` over ``mesh``'s ``axis``: ``grads`` carries a leading
  device axis (one gradient per device), the state starts at ``tx.init(params)``; returns the updates with the
  device axis in front (for replica-equality checks)."""
  from jax.sharding import PartitionSpec as P
  from mlsys_jax._compat import shard_map

  st = tx.init(params)

  def body(g, st):
    u, _ = tx.update(jax.tree_util.tree_map(lambda x: x[0], g), st)
    return jax.tree_util.tree_map(lambda x: x[None], u)

  return jax.jit(shard_map(body, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(axis), check_vma=False))(grads, st)


def vmapped_under_modes(monkeypatch, module, switch: str, modes, make_tx):
  """``{mode: (updates, residual)}`` of one jitted, vmapped ``tx.update`` (three workers' states, a (30, 40) and a
  (900,) leaf) with ``module.<switch>`` set to each of ``modes`` in turn (``make_tx()`` builds the transform)."""
  import numpy as np

  rng = np.random.default_rng(0)
  g = {"a": jnp.asarray(rng.normal(size=(3, 30, 40)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(3, 900)), jnp.float32)}
  res = {}
  for mode in modes:
    monkeypatch.setattr(module, switch, mode)
    tx = make_tx()
    o, st = jax.jit(jax.vmap(tx.update))(g, jax.vmap(tx.init)(g))
    res[mode] = (o, st.residual)
  return res


def pmap_one_bad_worker_under_modes(monkeypatch, module, settings, make_tx, seed: int):
  """Two ``tx.update`` steps under ``jax.pmap`` over 2 devices (axis ``"d"``; a (30, 40) and a (900,) leaf), worker
  1's first gradient holding a NaN, once per entry of ``settings`` (``{name: {module attribute: value}}``, set
  before ``make_tx()`` builds the transform); checks the first entry's run: every replica skipped the bad step,
  the averaged updates are identical across replicas and non-zero on the good step. Returns ``{name: [(updates,
  state), ...]}`` (for the caller's comparison of the entries)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  shapes = {"a": (30, 40), "b": (900,)}
  gs = [{k: jnp.asarray(rng.normal(size=(2,) + s), jnp.float32) for k, s in shapes.items()} for _ in range(2)]
  gs[0]["b"] = gs[0]["b"].at[1, 7].set(jnp.nan)   # (worker 1 only, first step)
  # The state placed as pmap places its outputs (split over 2 devices on a mesh axis named as pmap's): a state
  # stacked on one device would make the second step compile the whole update again (another placement).
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  pmapped = NamedSharding(Mesh(np.asarray(jax.local_devices()[:2]), ("d",)), P("d"))
  res = {}
  for name, attrs in settings.items():
    for attr, value in attrs.items():
      monkeypatch.setattr(module, attr, value)
    tx = make_tx()
    st = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), tx.init(jax.tree_util.tree_map(lambda x: x[0], gs[0])))
    st = jax.device_put(st, pmapped)   # (where pmap's outputs live: the second step reuses the first's program)
    step, outs = jax.pmap(tx.update, axis_name="d"), []
    for g in gs:
      o, st = step(g, st)
      outs.append((o, st))
    res[name] = outs
  (o0, s0), (o1, _) = res[next(iter(settings))]
  assert np.asarray(s0.nonfinite_steps).tolist() == [1, 1]   # (both replicas skipped the bad step)
  for leaf in jax.tree_util.tree_leaves((o0, o1)):
    np.testing.assert_array_equal(np.asarray(leaf)[0], np.asarray(leaf)[1])
  assert float(np.abs(np.asarray(jax.tree_util.tree_leaves(o1)[0])).max()) > 0
  return res


def nan_and_tie_steps(tx, seed: int, nan_step: bool = True):
  """Three jitted ``tx.update`` steps on five integer-valued leaves (a (30, 40), (40,), (900,), (1,) and (70, 3)
  gradient: ties at any cut), the second with a NaN in leaf "b" (nothing sent, residual kept) unless ``nan_step``
  is False: ``[(updates, state), ...]``, for comparing the transform under two module switches bitwise."""
  import numpy as np

  rng = np.random.default_rng(seed)
  shapes = {"a": (30, 40), "b": (40,), "c": (900,), "d": (1,), "e": (70, 3)}
  gs = [{k: jnp.asarray(np.round(rng.standard_normal(s) * 2), jnp.float32) for k, s in shapes.items()}
        for _ in range(3)]
  if nan_step:
    gs[1]["b"] = gs[1]["b"].at[3].set(jnp.nan)
  st, step, res = tx.init(gs[0]), jax.jit(tx.update), []
  for g in gs:
    o, st = step(g, st)
    res.append((o, st))
  return res
