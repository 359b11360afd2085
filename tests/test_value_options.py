"""Per-program XLA option choice with a value model (mlsys_jax.cost.value, issue 24 item 2b)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.cost import dataset as cds
from mlsys_jax.cost import hlo as hlo_lib
from mlsys_jax.cost import value as V
from mlsys_jax.cost._value_options import _TRIVIAL_BC

_DATA = os.path.join(os.path.dirname(__file__), "..", "mlsys_jax", "cost", "data", "h100_collect_a.npz")


def test_canonical_hlo_merges_only_empty_backend_configs():
  base = 'ROOT f = f32[4]{0} fusion(x), kind=kLoop, calls=%c'
  head = 'HloModule m, frontend_attributes={fingerprint_before_lhs="%s"}\n'
  a = head % "ab12" + base + _TRIVIAL_BC
  b = head % "cd34" + base
  assert V.canonical_hlo(a) == V.canonical_hlo(b)
  tuned = base + ', backend_config={"cudnn_conv_backend_config":{"algorithm":{"algo_id":"51"}}}'
  assert V.canonical_hlo(tuned) != V.canonical_hlo(base)


def test_decision_features_counts_and_shares():
  text = "\n".join([
      'a = f32[2] custom-call(x), custom_call_target="__cudnn$convForward", backend_config='
      '{"cudnn_conv_backend_config":{"activation_mode":"kNone","algorithm":{"algo_id":"1"}}}',
      'b = f32[2] custom-call(x), custom_call_target="__cudnn$convForward", backend_config='
      '{"cudnn_conv_backend_config":{"activation_mode":"kNone"}}',
      'c = f32[2] custom-call(x), custom_call_target="__cublas$lt$matmul", backend_config='
      '{"gemm_backend_config":{"epilogue":"GELU"}}',
      'd = f32[2] fusion(x), kind=kCustom, calls=%t, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}',
  ])
  f = dict(zip(V.COMPILE_DECISIONS, V.compile_decision_features(text).astype(np.float64)))
  assert f["cudnn_conv"] == pytest.approx(np.log1p(2))
  assert f["cudnn_conv_tuned"] == pytest.approx(np.log1p(1))
  assert f["cudnn_conv_untuned"] == pytest.approx(np.log1p(1))
  assert f["share_conv_untuned"] == pytest.approx(0.5)
  assert f["share_gemm_triton"] == pytest.approx(0.5)       # 1 Triton GEMM of 2 GEMMs
  assert f["share_gemm_epilogue"] == pytest.approx(1.0)
  assert f["kCustom"] == pytest.approx(np.log1p(1))
  empty = V.compile_decision_features("")
  assert empty.shape == (len(V.COMPILE_DECISIONS),) and np.all(empty == 0)


def test_choose_margin_flags_and_errors():
  pred = np.array([0.0, -0.1, 0.3, 0.0, -0.01])
  grp = np.array([0, 0, 0, 1, 1])
  dm = np.array([True, False, False, True, False])
  assert V.choose(pred, grp) == {0: 1, 1: 4}
  assert V.choose(pred, grp, default_mask=dm, margin=0.05) == {0: 1, 1: 3}   # 0.01 gain < margin
  flagged = np.array([False, True, False, False, False])
  assert V.choose(pred, grp, default_mask=dm, flagged=flagged) == {0: 0, 1: 4}
  with pytest.raises(ValueError, match="one shape"):
    V.choose(pred, grp[:3])


def test_choice_metrics_fixed_and_hybrid_against_numpy():
  rt = np.array([1.0, 0.9, 2.0, 1.0, 1.2, 0.5, 0.52])
  grp = np.array([0, 0, 0, 1, 1, 2, 2])
  opt = np.array([0, 1, 4, 0, 4, 0, 1])   # program 1 has no option-1 row: its default is used
  ch = V.fixed_choice(1, opt, grp)
  assert ch == {0: 1, 1: 3, 2: 6}
  m = V.choice_metrics(ch, rt, grp)
  reg = np.array([0.0, 0.0, 0.52 / 0.5 - 1])
  assert m["within_tol"] == pytest.approx(np.mean(reg <= 0.05))
  assert m["mean_regret"] == pytest.approx(reg.mean())
  assert m["max_regret"] == pytest.approx(reg.max())
  pred = np.array([0.0, 0.5, -1.0, 0.0, 0.1, 0.0, 0.2])    # ranks the slowest option first in program 0
  h1, t1 = V.hybrid_choice(pred, rt, grp, k=1)
  assert t1 == 3 and h1 == V.choose(pred, grp)
  h2, t2 = V.hybrid_choice(pred, rt, grp, k=2)
  assert t2 == 6 and h2[0] == 0                            # times rows 2 and 0, keeps the faster
  hall, tall = V.hybrid_choice(pred, rt, grp, k=3)
  assert tall == 7 and V.choice_metrics(hall, rt, grp)["max_regret"] == 0.0
  hf, tf = V.hybrid_choice(pred, rt, grp, k=1, flagged=np.array([0, 0, 0, 0, 0, 0, 1], bool))
  assert tf == 4 and hf[2] == 5                            # the flagged program is timed in full


def _synthetic(n_prog, seed):
  """Programs with 3 options; option 1 helps when feature 0 > 0, hurts a lot otherwise; option 2 costs
  a constant 10%. Features: a program part (2 cols) and a one-hot of the option."""
  rng = np.random.default_rng(seed)
  xs, ys, gs, os_ = [], [], [], []
  for p in range(n_prog):
    z = rng.normal(size=2)
    for o in range(3):
      y = 0.0 if o == 0 else (-0.3 if (o == 1 and z[0] > 0) else (0.8 if o == 1 else 0.1))
      xs.append(np.concatenate([z, np.eye(3)[o]]))
      ys.append(y + rng.normal(scale=0.01))
      gs.append(p)
      os_.append(o)
  return (np.asarray(xs, np.float32), np.asarray(ys), np.asarray(gs), np.asarray(os_))


def test_fit_option_model_learns_the_rule_on_held_out_programs():
  x, y, g, o = _synthetic(80, 0)
  xt, yt, gt, ot = _synthetic(60, 1)
  rt = np.exp(yt)
  m = V.fit_option_model(x, y, g, V.OptionConfig(steps=250, ensemble=2, hidden=32, pessimism=1.0))
  ch, flagged = V.choose_options(m, xt, gt, ot == 0)
  got = V.choice_metrics(ch, rt, gt)
  base = V.choice_metrics(V.fixed_choice(0, ot, gt), rt, gt)
  assert got["within_tol"] >= 0.8 and got["within_tol"] >= base["within_tol"] + 0.2
  assert got["mean_regret"] < base["mean_regret"]
  assert flagged == []
  # predict_gain is the members' mean + pessimism * std
  mem = V.predict_members(m, xt)
  np.testing.assert_allclose(V.predict_gain(m, xt, 1.5), mem.mean(0) + 1.5 * mem.std(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(V.predict_gain(m, xt, None), mem.mean(0) + 1.0 * mem.std(0), rtol=1e-6, atol=1e-6)
  # out of distribution: a program part far outside the training range
  far = xt[:3].copy()
  far[:, 0] = 50.0
  assert V.option_ood(m, far).all() and not V.option_ood(m, x[:20]).any()
  _, fl = V.choose_options(m, np.concatenate([xt[:3], far]), np.array([0, 0, 0, 1, 1, 1]),
                           np.array([1, 0, 0, 1, 0, 0], bool))
  assert fl == [1]


def test_fit_option_model_rejects_bad_input():
  x, y, g, _ = _synthetic(4, 0)
  with pytest.raises(ValueError, match="finite"):
    V.fit_option_model(x, np.where(np.arange(len(y)) == 0, np.nan, y), g, V.OptionConfig(steps=1, ensemble=1))
  with pytest.raises(ValueError, match="agree"):
    V.fit_option_model(x[:-1], y, g, V.OptionConfig(steps=1, ensemble=1))
  with pytest.raises(TypeError):
    V.fit_option_model(x, y, g, V.OptionConfig(steps=2.5, ensemble=1))


def _tiny_dataset(with_default=True):
  """Two programs compiled on this CPU, each under two 'options' (the same text twice for one)."""
  f1 = jax.jit(lambda a: jnp.tanh(a) * 2.0).lower(jnp.ones((64,))).compile()
  f2 = jax.jit(lambda a: a @ a.T).lower(jnp.ones((32, 16))).compile()
  f3 = jax.jit(lambda a: jnp.tanh(a) * 3.0).lower(jnp.ones((64,))).compile()
  t1, t2, t3 = (hlo_lib.strip_metadata(f.as_text()) for f in (f1, f2, f3))
  rows = [("default", 0, t1, 1.0e-5), ("autotune0", 0, t3, 0.9e-5),
          ("default", 1, t2, 2.0e-5), ("no_fusion", 1, t1, 3.0e-5)]
  if not with_default:
    rows = rows[1:]
  n = len(rows)
  return cds.CostDataset(
      hlo=[r[2] for r in rows], group=np.array([r[1] for r in rows]), family=np.array(["f"] * n),
      variant=np.array([r[0] for r in rows]), config=np.array(["{}"] * n),
      runtime_s=np.array([r[3] for r in rows]), runtime_iqr_s=np.zeros(n), runtime_min_s=np.zeros(n),
      n_inner=np.ones(n, int), n_rounds=np.ones(n, int), noisy=np.zeros(n, bool), flops=np.full(n, 1e6),
      bytes_accessed=np.full(n, 1e4), transcendentals=np.zeros(n),
      compile_s=np.zeros(n), meta={"variants": [["default", {}], ["autotune0", {}], ["no_fusion", {}]]})


def test_option_data_targets_pooling_and_features():
  od = V.option_data(_tiny_dataset())
  assert od.x.shape == (4, len(od.feature_names)) and np.all(np.isfinite(od.x))
  np.testing.assert_allclose(od.y, np.log([1.0, 0.9, 1.0, 1.5]))
  np.testing.assert_allclose(od.runtime_pooled, od.runtime_s)   # no two compilations are one program
  assert list(od.option) == [0, 1, 0, 2]
  d = od.feature_names.index("d_log_roofline_s")
  np.testing.assert_allclose(od.x[[0, 2], d], 0.0)        # differences to the default are 0 on the default
  ds2 = _tiny_dataset()
  lines = ds2.hlo[0].splitlines()
  root = next(i for i, l in enumerate(lines) if l.strip().startswith("ROOT"))
  ds2.hlo[1] = ds2.hlo[0].replace(lines[root], lines[root] + _TRIVIAL_BC, 1)  # only an empty backend_config
  od2 = V.option_data(ds2)
  np.testing.assert_allclose(od2.runtime_pooled[:2], np.sqrt(1.0e-5 * 0.9e-5))
  np.testing.assert_allclose(od2.runtime_pooled[2:], od2.runtime_s[2:])
  with pytest.raises(ValueError, match="'default' rows"):
    V.option_data(_tiny_dataset(with_default=False))


@pytest.mark.slow
def test_option_choice_on_the_committed_h100_dataset_beats_default():
  """One fold of the program split of the committed H100 dataset (~1 min on a loaded 2-core CPU)."""
  od = V.option_data(cds.load_dataset(_DATA))
  te = V.group_folds(od.group, 5, 0)[0]
  m = V.fit_option_model(od.x[~te], od.y[~te], od.group[~te], V.OptionConfig(steps=300, ensemble=2))
  ch, _ = V.choose_options(m, od.x[te], od.group[te], od.option[te] == 0)
  got = V.choice_metrics(ch, od.runtime_pooled[te], od.group[te])
  base = V.choice_metrics(V.fixed_choice(0, od.option[te], od.group[te]), od.runtime_pooled[te], od.group[te])
  assert got["within_tol"] > base["within_tol"] and got["mean_regret"] < base["mean_regret"]


def test_option_data_of_a_merged_dataset_keys_rows_by_device():
  """Two collections on two devices: rows keep their device (one-hot features) and each device's
  roofline uses its own measured peaks; one device alone gives the single-device features."""
  a = _tiny_dataset()
  a = cds.CostDataset(**{**a._asdict(), "config": np.array([f'{{"p": {g}}}' for g in a.group])})
  b = a
  # (CostDataset defines __len__ as its row count, so NamedTuple._replace cannot be used)
  a = cds.CostDataset(**{**a._asdict(), "meta": {**a.meta, "device": "GPU-A", "copy_bytes_per_s": 1e9,
                                                 "dispatch_floor_s": 0.0}})
  b = cds.CostDataset(**{**b._asdict(), "runtime_s": b.runtime_s * 0.5,
                         "meta": {**b.meta, "device": "GPU-B", "copy_bytes_per_s": 1e10, "dispatch_floor_s": 0.0}})
  m, info = cds.merge_datasets([a, b], ["a", "b"])
  assert info.duplicates_dropped == 0 and info.unique_programs == 2   # the same 2 programs on 2 devices
  od = V.option_data(m)
  names = list(od.feature_names)
  assert names[-2:] == ["device_GPU-A", "device_GPU-B"]
  np.testing.assert_array_equal(od.x[:, -2], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(od.x[:, -1], 1 - od.x[:, -2])
  r = names.index("log_roofline_s")
  np.testing.assert_allclose(od.x[:4, r] - od.x[4:, r], np.log(10.0), rtol=1e-5)  # 10x the bandwidth
  np.testing.assert_allclose(od.y[:4], od.y[4:])                  # ratios to each device's own default
  single = V.option_data(a)
  assert single.x.shape[1] == od.x.shape[1] - 2
  np.testing.assert_allclose(single.x, od.x[:4, :-2], rtol=1e-6)
