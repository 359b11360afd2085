"""Tests of mlsys_jax.cost features, models, losses, metrics, datasets and a tiny training run."""

import glob
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax import cost
from mlsys_jax.cost import graph as graph_lib
from mlsys_jax.cost import models as models_lib

DATA = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "mlsys_jax", "cost", "data", "*.npz")))


def _graphs():
  fns = [jnp.sin, lambda x: x @ x, lambda x: jnp.exp(x).sum(0), lambda x: jnp.tanh(x @ x.T) * 2]
  return [cost.program_graph(cost.parse_hlo(cost.capture(f, jnp.ones((8, 8))).hlo_text)) for f in fns]


# ------------------------------------------------------------------------------------------ metrics

def _tau_ref(a, b):
  """Kendall tau-b by explicit pair counting (float64 reference)."""
  conc = disc = tx = ty = 0
  for i, j in itertools.combinations(range(len(a)), 2):
    sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    if sa == 0 and sb == 0:
      continue
    if sa == 0:
      tx += 1
    elif sb == 0:
      ty += 1
    elif sa == sb:
      conc += 1
    else:
      disc += 1
  return (conc - disc) / np.sqrt((conc + disc + tx) * (conc + disc + ty))


def test_kendall_tau_matches_reference():
  rng = np.random.default_rng(0)
  for _ in range(20):
    a = rng.integers(0, 5, 9).astype(float)
    b = rng.integers(0, 5, 9).astype(float)
    if len(set(a)) > 1 and len(set(b)) > 1:
      assert cost.kendall_tau(a, b) == pytest.approx(_tau_ref(a, b))
  assert cost.kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
  assert np.isnan(cost.kendall_tau([1, 1], [1, 2]))


def test_mape_slowdown_opa():
  assert cost.mape([1.1, 1.8], [1.0, 2.0]) == pytest.approx(0.1)
  with pytest.raises(ValueError):
    cost.mape([1.0], [0.0])
  t = np.array([3.0, 1.0, 2.0])
  assert cost.topk_slowdown([0.1, 0.3, 0.2], t, 1) == pytest.approx(2.0)  # picks 3.0 vs best 1.0
  assert cost.topk_slowdown([0.1, 0.3, 0.2], t, 2) == pytest.approx(1.0)  # best of {3, 2}
  assert cost.topk_slowdown(t, t, 1) == 0.0
  assert cost.ordered_pair_accuracy(t, t) == 1.0 and cost.ordered_pair_accuracy(-t, t) == 0.0
  gm = cost.group_metrics(np.array([1., 2., 5., 4., 7.]), np.array([1., 2., 4., 5., 9.]),
                          np.array([0, 0, 1, 1, 2]))
  assert list(gm.groups) == [0, 1] and list(gm.tau) == [1.0, -1.0]
  p, t = np.array([1.0, 2.0, 4.0]), np.array([1.0, 1.0, 1.0])
  c = cost.mape_scale(p, t)
  grid = np.linspace(0.1, 2, 1901)
  best = grid[np.argmin([cost.mape(g * p, t) for g in grid])]
  assert cost.mape(c * p, t) <= cost.mape(best * p, t) + 1e-9
  lo, hi = cost.bootstrap_mean_ci(np.arange(100.0))
  assert lo < 49.5 < hi


def test_group_metrics_scores_the_same_groups_for_every_model():
  target = np.array([1., 2., 3., 5., 4., 7., 7.])
  group = np.array([0, 0, 0, 1, 1, 2, 2])          # group 2 has tied targets: no ranking to score
  good = cost.group_metrics(target, target, group)
  flat = cost.group_metrics(np.ones(7), target, group)   # no ranking information at all
  assert list(good.groups) == list(flat.groups) == [0, 1]
  np.testing.assert_array_equal(good.tau, [1.0, 1.0])
  np.testing.assert_array_equal(flat.tau, [0.0, 0.0])
  np.testing.assert_array_equal(flat.opa, [0.0, 0.0])  # tied predictions order no pair
  with pytest.raises(ValueError, match="1-D shape"):
    cost.group_metrics(target, target[:-1], group)
  with pytest.raises(ValueError, match="finite"):
    cost.group_metrics(np.r_[np.nan, target[1:]], target, group)


def test_metrics_reject_bad_input():
  with pytest.raises(ValueError, match="one length"):
    cost.ordered_pair_accuracy([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match="one length"):
    cost.topk_slowdown([], [])
  with pytest.raises(ValueError, match="positive"):
    cost.mape_scale([1.0, 0.0], [1.0, 2.0])
  with pytest.raises(ValueError, match="positive"):
    cost.mape_scale([1.0, np.nan], [1.0, 2.0])
  with pytest.raises(ValueError, match="combine"):
    cost.Roofline(1e12, 1e11, "min").predict(np.ones(2), np.ones(2))
  with pytest.raises(ValueError, match="positive"):
    cost.fit_roofline([1.0, 2.0], [1.0, 2.0], [1e-3, 0.0])


def test_fit_roofline_recovers_rates():
  rng = np.random.default_rng(1)
  f = 10 ** rng.uniform(6, 12, 300)
  b = 10 ** rng.uniform(4, 10, 300)
  truth = cost.Roofline(2e13, 1e12, "max")
  y = truth.predict(f, b)
  for obj in ("log", "mape"):
    r = cost.fit_roofline(f, b, y, "max", objective=obj)
    assert r.flops_per_s == pytest.approx(2e13, rel=0.03) and r.bytes_per_s == pytest.approx(1e12, rel=0.03)
  ys = cost.Roofline(2e13, 1e12, "sum", 5e-6).predict(f, b)
  r = cost.fit_roofline(f, b, ys, "sum", fit_overhead=True)
  assert cost.mape(r.predict(f, b), ys) < 0.05
  with pytest.raises(ValueError):
    cost.fit_roofline(f, b, y, "min")


# ----------------------------------------------------------------------------------- features/models

def test_node_and_program_features():
  for g in _graphs():
    x = cost.node_features(g)
    assert x.shape == (g.opcode.shape[0], cost.NUM_NODE_FEATURES) and np.isfinite(x).all()
    assert np.abs(x).max() <= 2.0  # normalised
    p = cost.program_features(g, {"flops": 10.0, "bytes accessed": -1.0})
    assert p.shape == (cost.NUM_PROGRAM_FEATURES,) and np.isfinite(p).all()
  # log1p(dim)/10 is the first block of columns.
  g = _graphs()[1]
  x = cost.node_features(g)
  np.testing.assert_allclose(x[:, :graph_lib.MAX_RANK], np.log1p(g.dims) / 10, rtol=1e-6)


def test_segment_logsumexp_and_losses_match_numpy():
  x = jnp.asarray([0.5, 1.0, -2.0, 3.0])
  ids = jnp.asarray([0, 0, 1, 1])
  out = np.asarray(models_lib.segment_logsumexp(x, ids, 3))
  np.testing.assert_allclose(out[:2], [np.log(np.exp(.5) + np.exp(1.)), np.log(np.exp(-2.) + np.exp(3.))],
                             rtol=1e-6)
  assert out[2] < -50  # empty segment
  pred = jnp.asarray([1.0, 2.0, 0.0, 5.0])
  tgt = jnp.asarray([1.0, 3.0, 0.5, 4.0])
  grp = jnp.asarray([0, 0, 1, 1])
  mask = jnp.asarray([True, True, True, False])
  assert float(cost.log_mse_loss(pred, tgt, mask)) == pytest.approx((0 + 1 + .25) / 3)
  # Pairs: group 0 only (group 1's second item is masked): target 1 < 3, pred diff = 2 - 1 = 1.
  assert float(cost.pairwise_rank_loss(pred, tgt, grp, mask)) == pytest.approx(np.log1p(np.exp(-1.0)))
  assert float(cost.pairwise_rank_loss(pred, tgt, grp, mask, min_gap=5.0)) == 0.0


def test_gnn_padding_invariance_and_jit():
  gs = _graphs()
  feats = [cost.node_features(g) for g in gs]
  b = cost.batch_graphs(gs)
  n, e, k = int(b.n_node.sum()), int(b.n_edge.sum()), int(b.n_kernel.sum())
  N, E, K, G = n + 64, e + 64, k + 64, len(gs) + 3  # one padded size for every call: one compile

  def padded(g, x):
    p = cost.pad_graph(g, N, E, K, G)
    xp = np.zeros((N, x.shape[1]), np.float32)
    xp[:x.shape[0]] = x
    return cost.make_batch(p, xp)

  model = cost.GraphSAGECostModel(hidden=16, embed_dim=8, num_layers=2)
  batch = padded(b, np.concatenate(feats))
  # Real graphs are unmasked; all three padding graphs (one holding the padding nodes) are masked.
  np.testing.assert_array_equal(batch.graph_mask, [True] * len(gs) + [False] * 3)
  with pytest.raises(ValueError, match="x must be"):
    cost.make_batch(cost.pad_graph(b, N, E, K, G), np.zeros((n, feats[0].shape[1]), np.float32))
  with pytest.raises(ValueError, match="reduction"):
    cost.GraphSAGECostModel(reduction="max").init(jax.random.PRNGKey(0), batch)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
  apply = jax.jit(model.apply)
  y0 = np.asarray(apply(params, batch))[:len(gs)]
  assert np.isfinite(y0).all()
  # Each graph alone, padded differently, gives the same prediction as inside the batch.
  for i, g in enumerate(gs):
    yi = float(apply(params, padded(g, feats[i]))[0])
    assert yi == pytest.approx(float(y0[i]), rel=1e-4, abs=1e-4)


# --------------------------------------------------------------------------------------- datasets

def test_dataset_roundtrip(tmp_path):
  texts = [cost.strip_metadata(cost.capture(f, jnp.ones((4,))).hlo_text) for f in (jnp.sin, jnp.cos)]
  rows = [{"hlo": t, "group": 0, "family": "elementwise", "variant": v, "runtime_s": r, "flops": 4.0,
           "noisy": False, "runtime_iqr_s": 0.0}
          for t, v, r in zip(texts, ["default", "no_fusion"], [1e-5, 2e-5])]
  p = str(tmp_path / "d.npz")
  cost.save_dataset(p, rows, {"device": "cpu"})
  d = cost.load_dataset(p)
  assert len(d) == 2 and d.hlo == texts and list(d.variant) == ["default", "no_fusion"]
  np.testing.assert_array_equal(d.runtime_s, [1e-5, 2e-5])
  assert d.meta["device"] == "cpu" and len(d.select(d.runtime_s > 1.5e-5)) == 1
  np.savez(str(tmp_path / "bad.npz"), x=np.zeros(2))
  with pytest.raises(ValueError, match="missing keys"):
    cost.load_dataset(str(tmp_path / "bad.npz"))
  with pytest.raises(FileNotFoundError):
    cost.load_dataset(str(tmp_path / "none.npz"))


def test_tpugraphs_loader(tmp_path):
  rng = np.random.default_rng(0)
  n, m, c = 7, 9, 5
  edge = np.stack([rng.integers(0, n, m), rng.integers(0, n, m)], 1).astype(np.int64)
  tile = dict(node_feat=rng.normal(size=(n, 140)).astype(np.float32),
              node_opcode=rng.integers(0, 120, n).astype(np.uint8), edge_index=edge,
              config_feat=rng.normal(size=(c, 24)).astype(np.float32),
              config_runtime=rng.integers(1, 1000, c).astype(np.int64),
              config_runtime_normalizers=rng.integers(1, 1000, c).astype(np.int64))
  np.savez(str(tmp_path / "tile.npz"), **tile)
  ex = cost.load_tpugraphs_npz(str(tmp_path / "tile.npz"))
  assert ex.collection == "tile" and ex.config_feat.shape == (c, 24)
  s, r = ex.senders_receivers()
  np.testing.assert_array_equal(s, edge[:, 1])  # [u, v]: u consumes v, so v -> u
  np.testing.assert_array_equal(r, edge[:, 0])
  nc = 3
  layout = dict(node_feat=tile["node_feat"], node_opcode=tile["node_opcode"], edge_index=edge,
                node_config_feat=rng.integers(-1, 5, (c, nc, 18)).astype(np.float32),
                node_config_ids=np.array([0, 2, 5]), node_splits=np.array([[0, 4]]),
                config_runtime=rng.integers(1, 1000, c))
  np.savez(str(tmp_path / "layout.npz"), **layout)
  ex = cost.load_tpugraphs_npz(str(tmp_path / "layout.npz"))
  assert ex.collection == "layout" and ex.node_config_feat.shape == (c, nc, 18)
  bad = dict(layout, node_config_ids=np.array([0, 1]))
  np.savez(str(tmp_path / "bad.npz"), **bad)
  with pytest.raises(ValueError, match="disagree"):
    cost.load_tpugraphs_npz(str(tmp_path / "bad.npz"))
  np.savez(str(tmp_path / "bad2.npz"), **dict(tile, edge_index=edge + n))
  with pytest.raises(ValueError, match="outside"):
    cost.load_tpugraphs_npz(str(tmp_path / "bad2.npz"))


# ---------------------------------------------------------------------------------------- training

@pytest.mark.skipif(not DATA, reason="no committed dataset")
def test_tiny_gnn_learns_on_committed_dataset():
  d = cost.load_dataset(DATA[0])
  ok = (d.runtime_iqr_s <= 0.2 * d.runtime_s) & (d.runtime_s > 2 * d.meta["dispatch_floor_s"])
  groups = [g for g in np.unique(d.group[ok]) if (ok & (d.group == g)).sum() >= 2][:16]
  idx = np.where(ok & np.isin(d.group, groups))[0]
  gs = [cost.program_graph(cost.parse_hlo(d.hlo[i])) for i in idx]
  y, grp = d.runtime_s[idx], d.group[idx]
  # One batch holds every graph: a single compiled training step.
  cfg = cost.GNNConfig(hidden=32, embed_dim=8, num_layers=2, epochs=80, graphs_per_batch=len(gs), lr=1e-2)
  params = cost.fit_gnn(gs, y, grp, cfg)
  pred = cost.predict_gnn(params, gs, cfg)
  assert pred.shape == y.shape and np.all(pred > 0)
  # Training fit: far better than predicting the mean log runtime, and ranks variants mostly right.
  base = np.mean((np.log(y) - np.log(y).mean()) ** 2)
  assert np.mean((np.log(pred) - np.log(y)) ** 2) < 0.3 * base
  assert cost.group_metrics(pred, y, grp).tau.mean() > 0.3
  with pytest.raises(ValueError):
    cost.fit_gnn(gs, y[:-1], grp, cfg)


def test_gnn_cosine_schedule_spans_every_step(monkeypatch):
  # Groups of 3 with 4 graphs per batch: one group per batch, so 2 steps per epoch, not 6 // 4 = 1.
  from mlsys_jax.cost import train as train_lib
  seen = []
  real = train_lib.optax.cosine_decay_schedule
  monkeypatch.setattr(train_lib.optax, "cosine_decay_schedule",
                      lambda lr, steps: seen.append(steps) or real(lr, steps))
  gs = _graphs()
  gs = gs + gs[:2]
  group = np.array([0, 0, 0, 1, 1, 1])
  chunks = train_lib._chunks(np.arange(6), 4, group, np.random.default_rng(0))
  assert sorted(len(c) for c in chunks) == [3, 3] and all(len(set(group[c])) == 1 for c in chunks)
  cfg = cost.GNNConfig(hidden=8, embed_dim=4, num_layers=1, epochs=3, graphs_per_batch=4)
  params = cost.fit_gnn(gs, np.linspace(1e-5, 6e-5, 6), group, cfg)
  assert seen == [3 * 2]
  assert np.all(np.isfinite(cost.predict_gnn(params, gs, cfg)))
  # predict_gnn keeps one jitted apply per architecture: a second call compiles nothing new.
  apply = train_lib._jitted_apply(cfg.embed_dim, cfg.hidden, cfg.num_layers, cfg.reduction)
  assert apply is train_lib._jitted_apply(cfg.embed_dim, cfg.hidden, cfg.num_layers, cfg.reduction)
  size = getattr(apply, "_cache_size", lambda: 0)  # private jax API: 0 == 0 where it is missing
  n_compiled = size()
  np.testing.assert_array_equal(cost.predict_gnn(params, gs, cfg), cost.predict_gnn(params, gs, cfg))
  assert size() == n_compiled
  with pytest.raises(ValueError, match="feats"):
    cost.fit_gnn(gs, np.ones(6), group, cfg, feats=[cost.node_features(gs[0])])
  with pytest.raises(ValueError, match="positive"):
    cost.fit_gnn(gs, np.array([1e-5, np.nan, 1e-5, 1e-5, 1e-5, 1e-5]), group, cfg)
  with pytest.raises(ValueError, match="positive"):
    cost.fit_mlp(np.ones((2, 3)), np.array([1e-5, 0.0]), np.zeros(2))


def test_mlp_baseline_fits_and_clips_extrapolation():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(160, 5)).astype(np.float32)
  runtime = np.exp(3.0 + 0.6 * x[:, 0] - 0.4 * x[:, 1]) * 1e-6           # seconds
  group = np.arange(160) // 4
  cfg = cost.MLPConfig(hidden=32, num_layers=2, epochs=300, rank_weight=0.0)
  state = cost.fit_mlp(x, runtime, group, cfg)
  pred = cost.predict_mlp(state, x, cfg)
  assert pred.shape == (160,) and np.all(pred > 0)
  assert cost.mape(pred, runtime) < 0.15
  # A column constant in training (an opcode absent from the training families) is ignored, not
  # divided by a ~0 std: changing it at prediction time leaves the predictions alone.
  xc = np.concatenate([x, np.zeros((160, 1), np.float32)], 1)
  state_c = cost.fit_mlp(xc, runtime, group, cfg)
  xc_test = xc.copy()
  xc_test[:, -1] = 2.0
  np.testing.assert_allclose(cost.predict_mlp(state_c, xc_test, cfg), cost.predict_mlp(state_c, xc, cfg))
  far = cost.predict_mlp(state, 100 * x, cfg)           # far outside the training range: clipped
  lo, hi = runtime.min() / 10, runtime.max() * 10
  assert np.all(far >= lo * 0.999) and np.all(far <= hi * 1.001)


def test_make_args_and_cost_dict_for_a_sampled_program():
  spec = cost.sample_program("mlp", np.random.default_rng(0), scale="cpu")
  args = cost.make_args(spec, seed=1)
  assert [a.shape for a in args] == [tuple(s.shape) for s in spec.args]
  assert all(np.all(np.isfinite(np.asarray(a))) for a in args)
  assert not np.array_equal(np.asarray(args[0]), np.asarray(cost.make_args(spec, seed=2)[0]))
  m, k, n = 16, 32, 8
  c = cost.cost_dict(jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile())
  assert c["flops"] >= 2 * m * k * n * 0.99
