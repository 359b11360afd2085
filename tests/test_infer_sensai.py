"""Tests of mlsys_jax.infer.sensai: grouping, APoZ, pruning surgery, subnets, combination, execution."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from mlsys_jax import data, models
from mlsys_jax.infer import sensai


def _init(model, shape, seed=0):
  """Random variables of ``model`` without compiling its initialisers (slow on a loaded CPU): shapes
  from ``jax.eval_shape``, kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.1), BN scale 1 / var 1."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))

  def fill(path, a):
    name = getattr(path[-1], "key", "")
    if name == "kernel":
      return jnp.asarray(rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1])), jnp.float32)
    if name in ("scale", "var"):
      return jnp.ones(a.shape, jnp.float32)
    return jnp.asarray(0.1 * rng.normal(size=a.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _bn_randomise(variables, seed):
  """Give batch-norm statistics and affine parameters non-trivial values (as after training)."""
  rng = np.random.default_rng(seed)
  def f(path, a):
    name = getattr(path[-1], "key", "")
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype)
    if name in ("mean", "bias"):
      return jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype)
    if name == "scale":
      return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype)
    return a
  return jax.tree_util.tree_map_with_path(f, variables)


# ---------------------------------------------------------------------------------------------- grouping

def test_balanced_sizes_and_contiguous_groups():
  assert sensai.balanced_sizes(10, 4) == (3, 3, 2, 2)
  assert sensai.balanced_sizes(9, 3) == (3, 3, 3)
  assert sensai.group_classes_contiguous(10, 3) == ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
  with pytest.raises(ValueError, match="num_items"):
    sensai.balanced_sizes(3, 4)
  with pytest.raises(TypeError):
    sensai.balanced_sizes(10, 2.0)


def test_min_cost_assignment_matches_brute_force():
  rng = np.random.default_rng(0)
  for n, m in [(5, 5), (4, 6), (6, 6)]:
    cost = rng.normal(size=(n, m))
    col = sensai._min_cost_assignment(cost)
    assert len(set(col.tolist())) == n
    best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    np.testing.assert_allclose(cost[np.arange(n), col].sum(), best, rtol=1e-12)


def test_balanced_kmeans_recovers_separated_clusters_with_equal_sizes():
  rng = np.random.default_rng(1)
  centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  truth = np.repeat(np.arange(3), 4)
  pts = centres[truth] + 0.1 * rng.normal(size=(12, 2))
  lab, inertia = sensai.balanced_kmeans(pts, 3, seed=0)
  # same partition up to renaming
  assert {frozenset(np.flatnonzero(lab == g)) for g in range(3)} == {
      frozenset(np.flatnonzero(truth == g)) for g in range(3)}
  assert inertia < 12 * 0.1
  # 10 points in 3 groups: sizes 4, 3, 3 whatever the geometry (an unbalanced 8/1/1 cloud)
  pts = np.concatenate([rng.normal(size=(8, 2)), [[50.0, 50.0], [-50.0, 50.0]]])
  lab, _ = sensai.balanced_kmeans(pts, 3, seed=0)
  assert sorted(np.bincount(lab, minlength=3).tolist()) == [3, 3, 4]


def test_group_classes_uses_class_means():
  rng = np.random.default_rng(2)
  # classes 0, 2, 4 near one point, 1, 3, 5 near another
  means = np.where(np.arange(6)[:, None] % 2 == 0, 0.0, 5.0) + 0.1 * rng.normal(size=(6, 3))
  y = np.repeat(np.arange(6), 20)
  feats = means[y] + 0.3 * rng.normal(size=(120, 3))
  assert sensai.group_classes(feats, y, 2) == ((0, 2, 4), (1, 3, 5))
  with pytest.raises(ValueError, match="no examples"):
    sensai.group_classes(feats[y != 3], y[y != 3], 2)


# ---------------------------------------------------------------------------------------------- APoZ

def test_channel_stats_matches_numpy_reference_on_mlp():
  model = models.MLP(features=(7, 5), num_classes=3)
  variables = _init(model, (6,))
  x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
  st = sensai.channel_stats(model, variables, x, batch_size=16)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
  h0 = np.maximum(x.astype(np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
  h1 = np.maximum(h0 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], 0)
  for name, h in (("Dense_0", h0), ("Dense_1", h1)):
    np.testing.assert_allclose(st.apoz[name], np.mean(np.abs(h) <= 0.005, 0), atol=1e-12)
    np.testing.assert_allclose(st.mean_abs[name], np.mean(np.abs(h), 0), rtol=1e-5)
  assert st.count == 50 and set(st.apoz) == {"Dense_0", "Dense_1"}


def test_channel_stats_cnn_counts_spatial_positions():
  model = models.CNN(num_classes=3, channels=(4, 6), hidden=8)
  variables = _init(model, (8, 8, 1))
  x = np.random.default_rng(0).normal(size=(9, 8, 8, 1)).astype(np.float32)
  st = sensai.channel_stats(model, variables, x)
  assert [st.apoz[k].shape for k in ("Conv_0", "Conv_1", "Dense_0")] == [(4,), (6,), (8,)]
  # APoZ is a fraction of 9 * 64 positions for Conv_0
  assert np.allclose(st.apoz["Conv_0"] * 9 * 64, np.round(st.apoz["Conv_0"] * 9 * 64))
  assert all(np.all((a >= 0) & (a <= 1)) for a in st.apoz.values())


def test_prune_masks_paper_rule_budget_and_keep_one():
  st = sensai.ChannelStats({"a": np.array([0.9, 0.9, 0.5, 0.8]), "b": np.array([0.99, 0.98])},
                           {"a": np.array([0.001, 0.5, 0.001, 0.005]), "b": np.array([0.0, 0.0])}, 10)
  with pytest.warns(UserWarning, match="every channel of b"):
    m = sensai.prune_masks(st)
  np.testing.assert_array_equal(m["a"], [False, True, True, False])
  np.testing.assert_array_equal(m["b"], [False, True])   # the lower APoZ survives
  m = sensai.prune_masks(st, keep_fraction=0.5)
  np.testing.assert_array_equal(m["a"], [False, False, True, True])
  np.testing.assert_array_equal(m["b"], [False, True])
  with pytest.raises(ValueError):
    sensai.prune_masks(st, apoz_threshold=1.5)


# ---------------------------------------------------------------------------------------------- surgery

@pytest.mark.parametrize("kind", ["cnn2", "cnn1", "mlp", "resnet"])
def test_pruned_model_equals_original_with_zeroed_channels(kind):
  if kind == "cnn2":
    model, shape = models.CNN(num_classes=5, channels=(6, 8), hidden=10), (8, 8, 1)
  elif kind == "cnn1":
    model, shape = models.CNN(num_classes=5, channels=(6, 8, 4), hidden=10, dims=1, kernel_size=5), (12, 2)
  elif kind == "mlp":
    model, shape = models.MLP(features=(9, 7), num_classes=5), (6,)
  else:
    model, shape = models.ResNet20(num_classes=5, width=4, blocks_per_stage=1), (8, 8, 3)
  variables = _bn_randomise(_init(model, shape, seed=3), seed=3)
  x = np.random.default_rng(4).normal(size=(7, *shape)).astype(np.float32)
  st = sensai.channel_stats(model, variables, x)
  rng = np.random.default_rng(5)
  masks = {k: rng.random(v.shape) < 0.5 for k, v in st.apoz.items()}
  for k in masks:
    masks[k][rng.integers(len(masks[k]))] = True
  pm, pv = sensai.prune(model, variables, masks)
  zv = sensai.zero_pruned(model, variables, masks)
  out_p = jax.jit(pm.apply)(pv, x)
  full = jax.jit(model.apply)
  out_z = full(zv, x)
  np.testing.assert_allclose(out_p, out_z, rtol=1e-5, atol=1e-5)
  out_full = full(variables, x)
  assert not np.allclose(out_z, out_full, atol=1e-3)  # the zeroing did change things
  if kind == "resnet":   # a SlimResNet20 with the full inner widths IS ResNet-20 (same variable names)
    slim = sensai.SlimResNet20(num_classes=5, width=4, blocks_per_stage=1, inner=(4, 8, 16))
    np.testing.assert_allclose(jax.jit(slim.apply)(variables, x), out_full, rtol=1e-5, atol=1e-6)
  assert sensai.count_params(pv) < sensai.count_params(variables)
  widths = {k: int(m.sum()) for k, m in masks.items()}
  assert {s.name: sensai._check_structure(pm, pv, sensai._plan(pm))[s.name]
          for s in sensai._plan(pm).sites} == widths


def test_surgery_refuses_what_it_cannot_follow():
  class Other(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(2)(x)
  with pytest.raises(TypeError, match="Other"):
    sensai.prune(Other(), {"params": {}}, {})
  cnn = models.CNN(num_classes=3, channels=(4,), hidden=6)
  v = _init(cnn, (4, 4, 1))
  with pytest.raises(ValueError, match="conv_general_dilated_cls"):
    sensai.prune(cnn.clone(conv_general_dilated_cls=nn.Dense), v, {})
  bad = {"params": {**v["params"], "Conv_0": {**v["params"]["Conv_0"], "scale": jnp.ones(4)}}}
  with pytest.raises(ValueError, match="Conv_0.*scale"):
    sensai.prune(cnn, bad, {"Conv_0": np.ones(4, bool), "Dense_0": np.ones(6, bool)})
  with pytest.raises(ValueError, match="collection"):
    sensai.prune(cnn, {**v, "quant": {}}, {})
  with pytest.raises(ValueError, match="Dense_0.*shape"):
    sensai.prune(cnn, v, {"Conv_0": np.ones(4, bool), "Dense_0": np.ones(5, bool)})
  with pytest.warns(UserWarning, match="every channel"):
    pm, _ = sensai.prune(cnn, v, {"Conv_0": np.zeros(4, bool), "Dense_0": np.ones(6, bool)})
  assert pm.channels == (1,)


def test_count_flops_closed_form():
  model = models.CNN(num_classes=3, channels=(4, 6), hidden=8)
  variables = _init(model, (8, 8, 1))
  expect = 2 * (64 * 9 * 1 * 4 + 16 * 9 * 4 * 6 + 4 * 6 * 8 + 8 * 3)
  assert sensai.count_flops(model, variables, (8, 8, 1)) == expect


# ---------------------------------------------------------------------------------------------- combination

def _softmax64(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def test_combine_matches_float64_reference():
  rng = np.random.default_rng(0)
  groups = [(4, 0, 2), (1,), (3, 5)]
  logits = [rng.normal(size=(6, len(g) + 1)).astype(np.float32) * 3 for g in groups]
  temps = [0.5, 2.0, 1.3]
  out = sensai.combine(logits, groups, 6, temps)
  ref = np.zeros((6, 6))
  for z, g, t in zip(logits, groups, temps):
    ref[:, list(g)] = _softmax64(z.astype(np.float64) / t)[:, 1:]
  ref /= ref.sum(1, keepdims=True)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="exactly once"):
    sensai.combine(logits[:2], groups[:2], 6)
  with pytest.raises(ValueError, match="positive"):
    sensai.combine(logits, groups, 6, [1.0, -1.0, 1.0])


def _combine64(logits, groups, num_classes, temps):
  """The combination formula in float64 log space: log q_k = log_softmax(z_s / T_s)[j] for the (s, j)
  that owns class k, normalised over the classes."""
  lq = np.full((np.shape(logits[0])[0], num_classes), -np.inf)
  for z, g, t in zip(logits, groups, temps):
    zt = np.asarray(z, np.float64) / t
    zt = zt - zt.max(-1, keepdims=True)
    lq[:, list(g)] = (zt - np.log(np.exp(zt).sum(-1, keepdims=True)))[:, 1:]
  lq -= lq.max(-1, keepdims=True)
  q = np.exp(lq)
  return q / q.sum(-1, keepdims=True)


def test_combine_is_finite_when_every_subnet_says_other_at_small_temperature():
  # reviewer's repro: margin 7 for "other" at T = 0.05 underflows every class probability (exp(-140))
  out = sensai.combine([np.array([[7.0, 0, 0]]), np.array([[7.0, 0, 0]])], [(0, 1), (2, 3)], 4,
                       temperatures=[0.05, 0.05])
  np.testing.assert_allclose(out, np.full((1, 4), 0.25), rtol=1e-6)
  logits = [np.array([[7.0, 1.0, 0.0], [200.0, 0.0, 3.0]], np.float32),
            np.array([[7.0, 0.0, 0.5], [300.0, 1.0, 0.0]], np.float32)]
  for temps in ([0.05, 0.05], [1.0, 1.0], [0.05, 0.2]):
    out = sensai.combine(logits, [(0, 1), (2, 3)], 4, temperatures=temps)
    ref = _combine64(logits, [(0, 1), (2, 3)], 4, temps)
    assert np.isfinite(out).all(), (temps, out)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
  # T = 1, margin 200/300: class 1 (logit 1, "other" 7) beats class 2 at row 0; row 1: class 1 (3 - 200)
  assert list(sensai.combine(logits, [(0, 1), (2, 3)], 4).argmax(-1)) == [0, 1]
  nan = [np.array([[np.nan, 0, 0]]), np.array([[7.0, 0, 0]])]   # NaN logits still propagate
  assert np.isnan(sensai.combine(nan, [(0, 1), (2, 3)], 4)).all()


def test_calibrate_temperature_recovers_the_generating_temperature():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(4000, 4)) * 4
  y = np.array([rng.choice(4, p=p) for p in _softmax64(z / 2.5)])
  t = sensai.calibrate_temperature(z, y)
  assert abs(t - 2.5) < 0.25
  nll = lambda tt: sensai._nll(z, y, tt)
  assert nll(t) <= min(nll(t * 1.05), nll(t / 1.05))
  with pytest.raises(ValueError, match="NaN"):
    sensai.calibrate_temperature(np.full((2, 2), np.nan), np.zeros(2, int))
  sep = np.array([[5.0, -5.0], [-5.0, 5.0]] * 10)   # perfectly separated: T is not identified
  with pytest.warns(UserWarning, match="not identified"):
    sensai.calibrate_temperature(sep, np.array([0, 1] * 10))


def test_joint_temperatures_recover_the_generating_ones():
  rng = np.random.default_rng(1)
  groups = [(0, 3), (1, 4), (2,)]
  n = 2000
  logits = [rng.normal(size=(n, len(g) + 1)) * 3 for g in groups]
  t0 = np.array([0.6, 1.0, 2.0])
  p = sensai.combine(logits, groups, 5, t0).astype(np.float64)
  cdf = np.cumsum(p / p.sum(1, keepdims=True), 1)
  y = np.minimum((rng.random((n, 1)) > cdf).sum(1), 4)   # one draw per row from p
  t = sensai.calibrate_temperatures_joint(logits, groups, y, 5, steps=300)
  np.testing.assert_allclose(t, t0, rtol=0.2)


def test_relabel_and_group_dataset_oversample():
  ds = data.synthetic_classification(seed=0, num_samples=200, shape=(3,), num_classes=4)
  np.testing.assert_array_equal(sensai.relabel(np.array([0, 1, 2, 3, 1]), (3, 1)), [0, 2, 0, 1, 2])
  g = sensai.group_dataset(ds, (2,))
  pos = int(np.sum(ds.y_train == 2))
  reps = round((len(ds.y_train) - pos) / pos)
  assert g.num_classes == 2 and int(np.sum(g.y_train == 1)) == reps * pos
  assert int(np.sum(g.y_train == 0)) == len(ds.y_train) - pos
  np.testing.assert_array_equal(g.y_test, (ds.y_test == 2).astype(np.int32))


def test_retrained_subnet_learns_its_group_task():
  ds = data.synthetic_classification(seed=1, num_samples=400, shape=(8,), num_classes=4, noise=0.6)
  model = models.MLP(features=(16,), num_classes=4)
  variables = _init(model, (8,), seed=1)
  st = sensai.channel_stats(model, variables, ds.x_train[ds.y_train < 2])
  sub = sensai.make_subnet(model, variables, (0, 1), sensai.prune_masks(st, keep_fraction=0.5))
  assert sub.model.features == (8,) and sub.model.num_classes == 3
  gy = sensai.relabel(ds.y_test, (0, 1))
  before = np.mean(np.argmax(sensai.subnet_predict(sub, ds.x_test), -1) == gy)
  sub2, hist = sensai.retrain_subnet(sub, ds, optax.adam(1e-2), epochs=4, batch_size=32)
  after = np.mean(np.argmax(sensai.subnet_predict(sub2, ds.x_test), -1) == gy)
  assert after > 0.85 and after > before
  assert hist["test_accuracy"][-1] == pytest.approx(after)


# ---------------------------------------------------------------------------------------------- execution

def _cnn_subnets(num_classes, groups, seed=0):
  model = models.CNN(num_classes=num_classes, channels=(6, 8), hidden=10)
  variables = _init(model, (8, 8, 1), seed=seed)
  x = np.random.default_rng(seed).normal(size=(5, 8, 8, 1)).astype(np.float32)
  st = sensai.channel_stats(model, variables, x)
  subs = []
  for i, g in enumerate(groups):   # different widths per subnet
    subs.append(sensai.make_subnet(model, variables, g, sensai.prune_masks(st, keep_fraction=0.3 + 0.2 * (i % 3))))
  return subs, x


def test_vmapped_ensemble_equals_separate_subnets():
  groups = [(0, 3, 4), (1,), (2, 5)]
  subs, x = _cnn_subnets(6, groups)
  assert len({s.model.channels for s in subs}) == 3
  temps = [0.7, 1.0, 1.8]
  ens = sensai.stack_subnets(subs, 6, temps)
  assert ens.model.channels == tuple(max(s.model.channels[i] for s in subs) for i in range(2))
  logits = sensai.ensemble_logits(ens, x)
  for i, s in enumerate(subs):
    m = len(s.classes) + 1
    np.testing.assert_allclose(logits[i, :, :m], sensai.subnet_predict(s, x), rtol=1e-5, atol=1e-5)
  ref = sensai.combine([sensai.subnet_predict(s, x) for s in subs], groups, 6, temps)
  np.testing.assert_allclose(sensai.ensemble_predict(ens, x), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sensai.make_branch_predictor(subs, 6, temps)(x), ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="exactly once"):
    sensai.stack_subnets(subs[:2], 6)


def test_shard_map_ensemble_equals_vmapped(devices):
  """One subnet per device on 8 devices (the several-subnets-per-device case: the slow test below)."""
  groups = [(c,) for c in range(8)]
  subs, x = _cnn_subnets(8, groups, seed=1)
  ens = sensai.stack_subnets(subs, 8, np.linspace(0.5, 2.0, 8))
  ref = np.asarray(sensai.ensemble_predict(ens, x))
  out = sensai.ensemble_predict_sharded(ens, x)   # one subnet per device on 8 devices
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  # tiny temperatures: every class probability underflows in probability space; both paths stay finite
  # and match the float64 log-space formula
  head = [k for k, v in ens.variables["params"].items() if v.get("bias", np.zeros(0)).shape == (8, 2)]
  assert len(head) == 1
  params = dict(ens.variables["params"])
  params[head[0]] = dict(params[head[0]], bias=params[head[0]]["bias"].at[:, 0].add(50.0))  # all: "other"
  cold = ens._replace(variables=dict(ens.variables, params=params),
                      temperatures=jnp.full((8,), 0.05, jnp.float32))
  ref64 = _combine64(list(np.asarray(sensai.ensemble_logits(cold, x))), groups, 8, [0.05] * 8)
  for got in (sensai.ensemble_predict(cold, x), sensai.ensemble_predict_sharded(cold, x)):
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref64, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="dividing"):
    sensai.ensemble_predict_sharded(ens, x, Mesh(np.array(devices[:3]), ("g",)))


@pytest.mark.slow
def test_shard_map_ensemble_several_subnets_per_device(devices):
  subs, x = _cnn_subnets(8, [(c,) for c in range(8)], seed=2)
  ens = sensai.stack_subnets(subs, 8)
  two = sensai.ensemble_predict_sharded(ens, x, Mesh(np.array(devices[:2]), ("g",)))  # 4 per device
  np.testing.assert_allclose(two, sensai.ensemble_predict(ens, x), rtol=1e-5, atol=1e-6)


def test_retrain_subnets_trains_the_padded_stack_at_once():
  ds = data.synthetic_classification(seed=1, num_samples=400, shape=(8,), num_classes=4, noise=0.6)
  model = models.MLP(features=(16,), num_classes=4)
  variables = _init(model, (8,), seed=1)
  subs = []
  for i, g in enumerate([(0, 1), (2,), (3,)]):   # different widths and head sizes
    st = sensai.channel_stats(model, variables, ds.x_train[np.isin(ds.y_train, g)])
    subs.append(sensai.make_subnet(model, variables, g, sensai.prune_masks(st, keep_fraction=0.25 + 0.25 * i)))
  out, hist = sensai.retrain_subnets(subs, ds, optax.adam(1e-2), epochs=4, batch_size=32)
  assert [s.model.features for s in out] == [(4,), (8,), (12,)]
  assert [s.model.num_classes for s in out] == [3, 2, 2]
  accs = [np.mean(np.argmax(sensai.subnet_predict(s, ds.x_test), -1) == sensai.relabel(ds.y_test, s.classes))
          for s in out]
  # the cut-out subnets compute what the padded stack computed while training
  np.testing.assert_allclose(accs, hist["test_accuracy"][-1])
  assert min(accs) > 0.75 and np.all(hist["loss"][-1] < hist["loss"][0])
