"""``flat_state=True`` (sidco, topk, dgc, randomk): the residual (and velocity) as one vector in ``ravel_pytree``
order, with every output, residual value and counter bitwise those of the tree layout (issue 18 item 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax._compat import shard_map
from mlsys_jax.comm import density_warmup, dgc, randomk, sidco, topk
from mlsys_jax.comm import sparse as sp

# leaves of several sizes: with per_tensor=True at 1% "b" (2 entries) and "d" (0.07) are pooled with their
# neighbours, so the working buffer has several padded segments and the flat residual maps through them
_SHAPES = {"a": (300, 20), "b": (200,), "c": (50, 40, 3), "d": (7,), "e": (900, 30)}


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32) for k, s in _SHAPES.items()}


def _steps(tx, n=5, nan_at=3):
  """``n`` jitted updates (a NaN in leaf "b" at step ``nan_at``): outputs and final state."""
  st = tx.init(_tree(0))
  upd = jax.jit(tx.update)
  outs = []
  for i in range(n):
    g = _tree(10 + i, 1.0 + i)
    if i == nan_at:
      g = {**g, "b": g["b"].at[3].set(jnp.nan)}
    o, st = upd(g, st)
    outs.append(o)
  return outs, st


@pytest.fixture(params=["concat", "dus"])
def build(request, monkeypatch):
  """sidco's flat working buffer, both builds (``sparse._FLAT_BUILD``, read at trace time)."""
  monkeypatch.setattr(sp, "_FLAT_BUILD", request.param)
  return request.param


@pytest.fixture(params=["concat", pytest.param("dus", marks=pytest.mark.slow)])
def build_default(request, monkeypatch):
  """:func:`build` with the benchmark switch ``"dus"`` in the slow suite only (the default suite compares it with
  the tree layout bitwise in :func:`test_flat_state_is_bitwise_the_tree_layout` and in 16-bit floats)."""
  monkeypatch.setattr(sp, "_FLAT_BUILD", request.param)
  return request.param


def _same(a, b):
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


_TREE_RUNS = {}   # sidco's tree-layout runs by kw, shared by test_flat_state_is_bitwise_the_tree_layout's builds
_KWS = {"flat": {}, "per_tensor": {"per_tensor": True}, "momentum": {"momentum": 0.9, "per_tensor": True},
        "estimator": {"exact": False, "per_tensor": True}}


# ("dus" with the estimator in the slow suite: the build only writes the buffer and the residual back, the same
# code for every threshold rule; "dus" per tensor and the estimator with "concat" stay in the default suite)
@pytest.mark.parametrize("build,kw", [pytest.param(b, kw, id=f"{b}-{name}",
                                                   marks=pytest.mark.slow if (b, name) == ("dus", "estimator") else ())
                                      for b in ("concat", "dus") for name, kw in _KWS.items()], indirect=["build"])
def test_flat_state_is_bitwise_the_tree_layout(kw, build):
  key = tuple(sorted(kw.items()))   # (the tree layout does not read _FLAT_BUILD: one run per kw serves both builds)
  if key not in _TREE_RUNS:
    _TREE_RUNS[key] = _steps(sidco(0.01, **kw))
  outs_t, st_t = _TREE_RUNS[key]
  outs_f, st_f = _steps(sidco(0.01, flat_state=True, **kw))
  for o_t, o_f in zip(outs_t, outs_f):
    assert _same(o_t, o_f)
  assert st_f.residual.shape == (sum(int(np.prod(s)) for s in _SHAPES.values()),)
  assert bool(jnp.array_equal(ravel_pytree(st_t.residual)[0], st_f.residual))
  if kw.get("momentum"):
    assert bool(jnp.array_equal(ravel_pytree(st_t.velocity)[0], st_f.velocity))
  # the NaN step was skipped in both, and something was sent on the others
  assert int(st_f.nonfinite_steps) == int(st_t.nonfinite_steps) == 1
  for f in ("density", "bytes_sent", "total_bytes", "overflow_steps", "stages", "step"):
    assert float(getattr(st_f, f)) == float(getattr(st_t, f)), f
  assert float(st_f.total_bytes) > 0


@pytest.mark.parametrize("make", [lambda f: topk(0.01, momentum=0.9, flat_state=f),
                                  lambda f: dgc(0.01, exact=True, flat_state=f),
                                  lambda f: randomk(0.01, seed=3, flat_state=f)], ids=["topk", "dgc", "randomk"])
def test_flat_state_of_the_raveled_compressors_is_bitwise_the_tree_layout(make):
  outs_t, st_t = _steps(make(False))
  outs_f, st_f = _steps(make(True))
  for o_t, o_f in zip(outs_t, outs_f):
    assert _same(o_t, o_f)
  assert bool(jnp.array_equal(ravel_pytree(st_t.residual)[0], st_f.residual))
  if not isinstance(st_t.velocity, tuple):
    assert bool(jnp.array_equal(ravel_pytree(st_t.velocity)[0], st_f.velocity))
  assert int(st_f.nonfinite_steps) == 1 and float(st_f.total_bytes) == float(st_t.total_bytes) > 0


def test_flat_state_error_feedback_is_exact():
  """sent + new residual == gradient + old residual (their float32 sum), entry by entry: nothing is lost (one
  worker: the output is what was sent, and each entry is either sent or kept, never split)."""
  tx = sidco(0.01, per_tensor=True, flat_state=True)
  st = tx.init(_tree(0))
  upd = jax.jit(tx.update)
  for i in range(3):
    g = _tree(20 + i)
    out, new = upd(g, st)
    sent_v, kept = np.asarray(ravel_pytree(out)[0]), np.asarray(new.residual)
    assert not np.any((sent_v != 0) & (kept != 0))
    lhs = sent_v + kept
    rhs = np.asarray(ravel_pytree(g)[0]) + np.asarray(st.residual)   # float32, as the transform sums
    np.testing.assert_array_equal(lhs, rhs)
    sent = np.count_nonzero(np.asarray(ravel_pytree(out)[0]))
    assert sent == round(float(new.density) * lhs.size)
    st = new


def test_flat_state_under_shard_map_matches_the_tree_layout_and_keeps_replicas_identical(devices, build_default):
  """8 devices: worker 5 has a NaN at step 1, so every replica skips it; outputs and residuals equal the tree
  layout's bitwise, and the replicas' updates are identical."""
  w = len(devices)
  g_w = [[_tree(100 * s + d) for s in range(2)] for d in range(w)]
  g_w[5][1] = {**g_w[5][1], "c": g_w[5][1]["c"].at[0, 0, 0].set(jnp.inf)}
  stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x).reshape(w, 2, *x[0].shape),
                                   *[g for per in g_w for g in per])

  def run(flat):
    tx = sidco(0.02, per_tensor=True, axis_name="d", flat_state=flat)

    def body(gw):
      st = tx.init(_tree(0))
      outs = []
      for s in range(2):
        o, st = tx.update(jax.tree_util.tree_map(lambda x: x[0, s], gw), st)
        outs.append(o)
      res = st.residual if flat else ravel_pytree(st.residual)[0]
      return jax.tree_util.tree_map(lambda x: x[None], (outs, res, st.nonfinite_steps, st.total_bytes))

    mesh = Mesh(np.array(devices), ("d",))
    return jax.jit(shard_map(body, mesh=mesh, in_specs=(P("d"),), out_specs=P("d"), check_vma=False))(stacked)

  (outs_t, res_t, nf_t, tb_t), (outs_f, res_f, nf_f, tb_f) = run(False), run(True)
  assert _same(outs_t, outs_f)
  assert bool(jnp.array_equal(res_t, res_f))
  np.testing.assert_array_equal(np.asarray(nf_f), 1)                # every replica skipped step 1
  np.testing.assert_array_equal(np.asarray(tb_f), np.asarray(tb_t))
  for leaf in jax.tree_util.tree_leaves(outs_f):                      # replicas apply the same update
    assert bool(jnp.all(leaf == leaf[:1]))


def test_flat_state_in_a_density_warmup_with_per_tensor_segments(build_default):
  """The flat layout does not depend on the ratio (the per-tensor pooling does), so stages of different
  densities share it; bitwise the tree layout through the switch. Three stages (not DGC's default four): 25%
  pools differently (four segments) from 6.25% and the final 0.5% (three segments, the same pooling at two
  densities), the NaN step in the final stage."""
  make = lambda flat: density_warmup(lambda r: sidco(r, per_tensor=True, flat_state=flat), 0.005, steps=2,
                                     ratios=(0.25, 0.0625))
  outs_t, st_t = _steps(make(False), n=6)
  outs_f, st_f = _steps(make(True), n=6)
  for o_t, o_f in zip(outs_t, outs_f):
    assert _same(o_t, o_f)
  assert bool(jnp.array_equal(ravel_pytree(st_t.inner_state.residual)[0], st_f.inner_state.residual))


def test_flat_state_with_a_traced_ratio_schedule(build_default):
  tx = optax.inject_hyperparams(sidco, static_args=("max_ratio", "flat_state"))(
      ratio=optax.linear_schedule(0.05, 0.01, 3), max_ratio=0.05, flat_state=True)
  ref = optax.inject_hyperparams(sidco, static_args=("max_ratio",))(
      ratio=optax.linear_schedule(0.05, 0.01, 3), max_ratio=0.05)
  outs_f, st_f = _steps(tx, n=4, nan_at=-1)
  outs_t, st_t = _steps(ref, n=4, nan_at=-1)
  for o_t, o_f in zip(outs_t, outs_f):
    assert _same(o_t, o_f)
  assert bool(jnp.array_equal(ravel_pytree(st_t.inner_state.residual)[0], st_f.inner_state.residual))


def test_flat_state_in_chain_with_adam_trains_like_the_tree_layout():
  p0 = _tree(0)
  target = _tree(1)
  loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)

  def train(flat):
    tx = optax.chain(sidco(0.05, flat_state=flat), optax.adam(1e-2))
    p, st = p0, tx.init(p0)

    @jax.jit
    def step(p, st):
      u, st = tx.update(jax.grad(loss)(p), st, p)
      return optax.apply_updates(p, u), st

    for _ in range(20):
      p, st = step(p, st)
    return p, float(loss(p))

  (p_t, l_t), (p_f, l_f) = train(False), train(True)
  assert _same(p_t, p_f)
  assert l_f < 0.97 * float(loss(p0))   # (5% of the entries per step: 20 steps move it ~5%)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_flat_build_dus_writes_the_buffer_without_a_gather(per_tensor, monkeypatch):
  """``_FLAT_BUILD = "dus"`` builds the padded buffer and the new residual by chunked in-place writes
  (dynamic-update-slices of ``_GROUP_LEAVES``-leaf chunks), where the "concat" build concatenates the leaves
  and, with several segments (per tensor), gathers them into the padded layout and maps the payload's indices
  back by a second gather: the "dus" program has those two gathers fewer (and the same selection's)."""
  shapes = [(100 + i, 50) for i in range(30)]    # 30 leaves: two chunks of _GROUP_LEAVES (24); per tensor
  g = {f"w{i:02d}": jnp.ones(s, jnp.float32) * (i + 1) for i, s in enumerate(shapes)}   # 30 segments

  def hlo(mode):
    monkeypatch.setattr(sp, "_FLAT_BUILD", mode)
    tx = sidco(0.05, per_tensor=per_tensor, flat_state=True)
    text = jax.jit(tx.update).lower(g, tx.init(g)).as_text()
    ops = [line.split(" = ", 1)[1].split("(")[0].split()[0].strip('"') for line in text.splitlines()
           if " = " in line and line.lstrip().startswith("%")]
    return ops.count("stablehlo.gather"), ops.count("stablehlo.dynamic_update_slice")

  (gather_c, dus_c), (gather_d, dus_d) = hlo("concat"), hlo("dus")
  assert gather_c - gather_d == (2 if per_tensor else 0)
  assert dus_c == 0
  assert dus_d >= 4   # two chunks into the buffer, two into the new residual


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_flat_state_error_feedback_is_exact_in_16_bit(dtype, per_tensor, build):
  """In bfloat16/float16 every entry of ``g + residual`` is either sent or kept, exactly once: the sum is
  rounded once for the selection and the new residual alike. (Before session 20's fix the one-segment "concat"
  build let XLA keep the sum in float32 in some fusions (excess precision): entries tied at the threshold were
  sent and kept, or neither.) With one segment the "concat" build is also bitwise the tree layout."""
  def tree16(seed):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in _SHAPES.items()}

  def run(flat):
    tx = sidco(0.01, per_tensor=per_tensor, flat_state=flat)
    st, upd, outs, bad = tx.init(tree16(0)), jax.jit(tx.update), [], 0
    for i in range(5):
      g = tree16(10 + i)
      prev = ravel_pytree(st.residual)[0] if not flat else st.residual
      acc = (ravel_pytree(g)[0] + prev).astype(np.float32)            # the 16-bit sum, rounded once
      o, st = upd(g, st)
      res = (ravel_pytree(st.residual)[0] if not flat else st.residual).astype(np.float32)
      out = ravel_pytree(o)[0].astype(np.float32)
      bad += int(jnp.sum(out + res != acc))
      outs.append(out)
    return bad, outs

  bad_f, outs_f = run(True)
  assert bad_f == 0
  if not per_tensor and build == "concat":   # (per tensor, and with "dus", XLA's fusions may compare a tie's
    # unrounded sums in one layout and not the other: both exact, tied entries chosen differently)
    bad_t, outs_t = run(False)
    assert bad_t == 0
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(outs_t, outs_f))


def test_flat_build_switch_rejects_an_unknown_build(monkeypatch):
  monkeypatch.setattr(sp, "_FLAT_BUILD", "gather")
  tx = sidco(0.1, flat_state=True)
  with pytest.raises(ValueError, match="_FLAT_BUILD"):
    tx.update({"a": jnp.ones((4, 3))}, tx.init({"a": jnp.ones((4, 3))}))


def test_flat_state_bad_input():
  mixed = {"a": jnp.ones((4, 3), jnp.float32), "b": jnp.ones((5,), jnp.bfloat16)}
  with pytest.raises(ValueError, match="one dtype"):
    sidco(0.1, flat_state=True).init(mixed)
  tx = sidco(0.1, flat_state=True)
  st = tx.init({"a": jnp.ones((4, 3))})
  with pytest.raises(ValueError, match="12"):
    tx.update({"a": jnp.ones((4, 4))}, st)
  with pytest.raises(ValueError, match="one vector"):
    tx.update({"a": jnp.ones((4, 3))}, sidco(0.1).init({"a": jnp.ones((4, 3))}))
  with pytest.raises(TypeError, match="True or False"):
    sidco(0.1, flat_state="yes")
  with pytest.raises(ValueError, match="per_tensor=True needs sidco"):
    topk(0.1, per_tensor=True, flat_state=True)
  with pytest.raises(TypeError, match="True or False"):
    dgc(0.1, flat_state=1.5)
  with pytest.raises(ValueError, match="at least one"):
    sidco(0.1, flat_state=True).init({"a": jnp.ones((0,))})
