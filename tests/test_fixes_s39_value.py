"""Regression tests of the session-39 review of the Value Learning cost model (mlsys_jax.cost.value,
value_ios and _value_options). CPU, no training: every check fires before a model is fitted."""

import math

import numpy as np
import pytest

from mlsys_jax import sched
from mlsys_jax.cost import _value_options as O
from mlsys_jax.cost import value as V
from mlsys_jax.cost import value_ios as VI
from mlsys_jax.cost.dataset import CostDataset

COST = sched.AnalyticalCost()


@pytest.fixture(scope="module")
def net():
  return sched.build_graph(*V.random_conv_net(0))


def _dummy_model(nf=V.NUM_STATIC):
  return V.ValueModel(None, None, {}, np.zeros(nf), np.ones(nf), 3, 8)


def _no_training(monkeypatch):
  """Replace the LSTM fit by a stub that records its ``steps`` (no compilation)."""
  calls = []

  def fake(data, vocab=None, **kw):
    calls.append(kw["steps"])
    return _dummy_model(), [0.0]
  monkeypatch.setattr(V, "fit_value_model", fake)
  return calls


# ---- value.py ------------------------------------------------------------------------------------

def test_schedule_cost_refuses_nan_and_negative_stage_costs():
  st = [sched.Stage("parallel", ((0,),))]
  # a NaN total was returned, and hybrid_schedule's np.argmin then picked that schedule as the cheapest
  with pytest.raises(ValueError, match="returned nan"):
    V.schedule_cost(None, st, lambda g, s: float("nan"))
  with pytest.raises(ValueError, match="non-negative"):
    V.schedule_cost(None, st, lambda g, s: -1.0)
  assert V.schedule_cost(None, st, lambda g, s: math.inf) == math.inf
  assert V.schedule_cost(None, st * 2, lambda g, s: 0.25) == 0.5


def test_collect_states_refuses_zero_cost_schedules(net):
  # a zero total was log'd: a bare "math domain error"
  with pytest.raises(ValueError, match="finite and positive"):
    V.collect_states([V.graph_info(net)], lambda g, s: 0.0, 1)


def test_collect_states_checks_demos(net):
  info = V.graph_info(net)
  dp = V.dp_schedule(net, COST)[0]
  with pytest.raises(ValueError, match="one list of schedules per graph"):   # was IndexError
    V.collect_states([info, info], COST, 1, demos=[[dp]])
  with pytest.raises(ValueError, match="leaves units"):                      # was KeyError: 0
    V.collect_states([info], COST, 1, demos=[[dp[:1]]])


def _state_data(n_units=2, n_states=2):
  feats = [np.zeros((n_units, V.NUM_FEATURES), np.float32) for _ in range(n_states)]
  kinds = [["a"] * n_units for _ in range(n_states)]
  return V.StateData(feats, kinds, np.zeros(n_states), list(range(n_states)))


@pytest.mark.parametrize("bad, match", [
    (dict(kinds=[["a"]] * 2), "state 0"),                           # misaligned kind ids, trained silently
    (dict(kinds=[["a", "a"]]), "one kind list and one target"),     # a zero-length state: loss NaN
    (dict(target=np.zeros(1)), "one kind list and one target"),     # the last state never trained on
    (dict(target=np.array([0.0, np.nan])), "non-finite"),           # reported as "diverged; lower lr"
])
def test_fit_value_model_checks_state_data(bad, match):
  with pytest.raises(ValueError, match=match):
    V.fit_value_model(_state_data()._replace(**bad), steps=1, hidden=4)


@pytest.mark.parametrize("kw, match", [(dict(batch=0), "batch"), (dict(batch=-1), "batch"),
                                       (dict(hidden=0), "hidden")])
def test_fit_value_model_checks_batch_and_hidden(kw, match):
  # batch=0 reported "training diverged; lower lr", batch=-1 a numpy error, hidden=0 a ZeroDivisionError
  with pytest.raises(ValueError, match=match):
    V.fit_value_model(_state_data(), **{"steps": 1, "hidden": 4, **kw})


def test_train_value_model_later_rounds_get_at_least_one_step(net, monkeypatch):
  calls = _no_training(monkeypatch)
  # eps=1: every later-round action is random, so the stub model is never asked for a prediction
  V.train_value_model([net], COST, rounds=2, rollouts=2, steps=1, eps=1.0, use_dp=False)
  assert calls == [1, 1]   # round 2 got steps // 2 == 0 and raised "steps must be ... got 0"


@pytest.mark.parametrize("kw", [dict(cin=0), dict(hw=0), dict(blocks=0)])
def test_random_conv_net_checks_sizes(kw):
  # cin=0: ZeroDivisionError; hw=0: an empty input; blocks=0: a net of no operators
  with pytest.raises(ValueError, match=next(iter(kw))):
    V.random_conv_net(0, **kw)


def test_hybrid_schedule_checks_k_on_the_fallback_path_too(net):
  model = _dummy_model()   # empty vocabulary: every unit out of distribution, so the DP runs
  with pytest.raises(ValueError, match="k must be"):
    V.hybrid_schedule(model, net, COST, k=0)


# ---- value_ios.py --------------------------------------------------------------------------------

def test_candidate_stages_refuses_unknown_merge_kernels(net):
  with pytest.raises(ValueError, match="merge_kernels"):   # 'Same' silently meant 'any'
    VI.candidate_stages(net, 2, 2, merge_kernels="Same")


@pytest.mark.parametrize("m", [0, -1])
def test_stage_examples_checks_max_per_graph(net, m):
  with pytest.raises(ValueError, match="max_per_graph"):   # 0: no examples; -1: a numpy error
    VI.stage_examples([net], COST, r=2, s=2, max_per_graph=m)


def test_fit_stage_model_checks_examples_and_margin_before_training(net, monkeypatch):
  calls = _no_training(monkeypatch)
  st = VI.candidate_stages(net, 2, 2)[0]
  with pytest.raises(ValueError, match="triple"):            # was "not enough values to unpack"
    VI.fit_stage_model([(net, st)])
  with pytest.raises(ValueError, match="margin"):            # was raised after the whole fit
    VI.fit_stage_model([(net, st, 1e-6)], margin=-1.0)
  with pytest.raises(ValueError, match="finite positive"):   # True was taken as 1 second
    VI.fit_stage_model([(net, st, True)])
  assert calls == []
  p, stats = VI.fit_stage_model([(net, st, np.int64(1))])    # a numpy integer is a number of seconds
  assert stats["examples"] == 1 and calls == [600]


def test_save_predictor_refuses_a_base_that_loads_differently(tmp_path):
  path = str(tmp_path / "p.npz")
  for base in (sched.AnalyticalCost(peak_flops=1e12), lambda g, s: 1.0):
    p = VI.StagePredictor(_dummy_model(), base=base)
    with pytest.raises(ValueError, match="default arguments"):   # loaded as AnalyticalCost(): other predictions
      VI.save_predictor(path, p, base="analytical")


@pytest.mark.parametrize("val", [float("nan"), -1.0])
def test_predictor_refuses_nan_or_negative_base(net, val):
  # NaN became an inf prediction, -1 a stage predicted to take 1e-30 s
  p = VI.StagePredictor(_dummy_model(), base=lambda g, s: val)
  with pytest.raises(ValueError, match="base stage cost"):
    p(net, sched.Stage("parallel", ((0,),)))


@pytest.mark.parametrize("tail, val, match", [
    ("parallel|((-1,),)", 1e-6, "outside the graph"),
    ("banana|((0,),)", 1e-6, "stage kind"),
    ("parallel|((0,),)", "nan", "finite and positive"),
])
def test_stage_costs_from_cache_refuses_bad_entries(net, tail, val, match):
  cache = {f"alias|cpu|[]|{net.fingerprint()}|plain|5|{tail}": "k", "k": val}
  with pytest.raises(ValueError, match=match):
    VI.stage_costs_from_cache(cache, net)


# ---- _value_options.py ---------------------------------------------------------------------------

X = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
Y = np.array([0.0, -0.3, 0.2, 0.0, 0.1, -0.05])
GRP = np.array([0, 0, 0, 1, 1, 1])
CFG = O.OptionConfig(steps=2, ensemble=1, hidden=4)


@pytest.mark.parametrize("field, val", [("huber_delta", 0.0), ("lr", float("nan")), ("hidden", 0), ("layers", -1),
                                        ("rank_weight", -1.0), ("weight_decay", -1.0), ("pessimism", -1.0),
                                        ("margin", float("nan"))])
def test_fit_option_model_checks_config(field, val):
  # huber_delta=0 and lr=NaN trained into NaN predictions, hidden=0 a ZeroDivisionError, the rest accepted
  with pytest.raises(ValueError, match=f"cfg.{field}"):
    O.fit_option_model(X, Y, GRP, CFG._replace(**{field: val}))


def test_fit_option_model_refuses_column_targets():
  # y [R, 1] with group [R, 1] broadcast the Huber loss to [R, R]
  with pytest.raises(ValueError, match="must agree"):
    O.fit_option_model(X, Y[:, None], GRP[:, None], CFG)


def _option_model():
  return O.OptionModel([], X.mean(0), X.std(0), X.min(0), X.max(0), CFG)


def test_option_ood_flags_nan_features():
  x = X.copy()
  x[1, 2] = np.nan
  assert O.option_ood(_option_model(), x).tolist() == [False, True, False, False, False, False]


def test_predict_checks_feature_count():
  for fn in (O.predict_gain, O.predict_members, O.option_ood):
    with pytest.raises(ValueError, match="3 features per row"):
      fn(_option_model(), X[:, :2])


def test_choose_reads_an_int_default_mask_as_a_mask():
  pred = np.array([0.0, -0.3, 0.2, 0.0, 0.1, -0.05])
  dm = np.array([1, 0, 0, 1, 0, 0])
  # int 0/1 indexed rows: {0: 1, 1: 4}, rows that are not the defaults, though margin=1 keeps the defaults
  assert O.choose(pred, GRP, default_mask=dm, margin=1.0) == {0: 0, 1: 3}
  assert O.choose(pred, GRP, default_mask=dm.astype(bool), margin=1.0) == {0: 0, 1: 3}


def test_choose_refuses_nan_and_bad_masks():
  dm = np.array([1, 0, 0, 1, 0, 0], bool)
  with pytest.raises(ValueError, match="NaN"):      # the NaN row was chosen over the default
    O.choose(np.array([0.0, np.nan, 0.2, 0.0, 0.1, -0.05]), GRP, default_mask=dm)
  with pytest.raises(ValueError, match="margin"):   # NaN margin: never keeps the default
    O.choose(Y, GRP, default_mask=dm, margin=float("nan"))
  with pytest.raises(ValueError, match="default_mask"):   # was IndexError
    O.choose(Y, GRP, default_mask=dm[:3])
  with pytest.raises(ValueError, match="flagged"):
    O.choose(Y, GRP, default_mask=dm, flagged=np.array([True]))


def test_choice_metrics_refuses_rows_of_other_programs():
  rt = np.array([1.0, 0.9, 1.1, 1.0, 1.2, 0.8])
  with pytest.raises(ValueError, match="not a row of program 0"):   # a negative regret was reported
    O.choice_metrics({0: 5}, rt, GRP)
  with pytest.raises(ValueError, match="not a row of program 5"):   # was "zero-size array" from numpy
    O.choice_metrics({5: 0}, rt, GRP)
  assert O.choice_metrics({0: 1, 1: 5}, rt, GRP)["within_tol"] == 1.0


def test_fixed_choice_program_without_option_or_default():
  with pytest.raises(ValueError, match="program 1 has no row"):   # was IndexError
    O.fixed_choice(3, np.array([1, 2, 0, 1, 2, 2]), GRP)


def test_hybrid_choice_checks_shapes_and_nan():
  with pytest.raises(ValueError, match="one shape"):   # a short runtime was read silently
    O.hybrid_choice(np.zeros(3), np.ones(2), np.zeros(3, int), 1)
  with pytest.raises(ValueError, match="NaN"):         # the NaN runtime was kept as the fastest
    O.hybrid_choice(Y, np.array([1.0, np.nan, 1.1, 1.0, 1.0, 1.0]), GRP, 3)


def test_option_data_names_unknown_variants():
  n = 4
  z = np.zeros(n)
  ds = CostDataset(hlo=["x"] * n, group=np.array([0, 0, 1, 1]), family=np.array(["a"] * n),
                   variant=np.array(["default", "autotune0", "default", "no_fusion"]), config=np.array(["c"] * n),
                   runtime_s=np.ones(n), runtime_iqr_s=z, runtime_min_s=z, n_inner=z, n_rounds=z,
                   noisy=np.zeros(n, bool), flops=np.ones(n), bytes_accessed=np.ones(n), transcendentals=z,
                   compile_s=z, meta={"variants": [["default"], ["no_fusion"]]})
  with pytest.raises(ValueError, match=r"\['autotune0'\]"):   # was KeyError: 'autotune0'
    O.option_data(ds, lambda i: np.zeros(14, np.float32))
