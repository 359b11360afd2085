"""Session 38's review of mlsys_jax.profile and cost.train: a negative or infinite per-event cost made
profile.overhead.correct add time (or NaN), calibrate took repeated or single levels, numpy_jax_agree took
steps < 1 and dropped NaN, predict_gnn failed on no graphs. Each test fails on the code before the fix."""

import numpy as np
import pytest

from mlsys_jax import profile
from mlsys_jax.cost.train import MLPConfig, fit_mlp, predict_gnn
from mlsys_jax.profile import overhead as ov
from mlsys_jax.profile import workloads
from mlsys_jax.profile.attribution import attribute


def _work():
  for _ in range(5):
    with profile.operation("step"):
      sum(range(200))


def test_correct_refuses_negative_or_non_finite_costs_and_only_removes_time():
  with profile.Profiler("scopes") as p:
    _work()
  a = attribute(p)
  for bad in (-1e6, float("inf"), float("nan"), True):
    with pytest.raises(ValueError, match="finite number >= 0"):
      ov.correct(a, {"scope": bad})
  c = ov.correct(a, {"scope": 100.0})
  assert 0.0 <= c.removed_ns <= 5 * 100.0 and c.total_ns <= a.wall_ns + 1e-6


@pytest.mark.parametrize("levels", [("off",), ("off", "off", "scopes"), ("off", "scopes", "scopes"),
                                    ("scopes", "off"), ("off", "bogus")])
def test_calibrate_refuses_levels_it_cannot_measure(levels):
  with pytest.raises(ValueError, match="levels must start with 'off'"):
    ov.calibrate(_work, repeats=1, levels=levels)


def test_numpy_jax_agree_checks_steps_and_keeps_nan(monkeypatch):
  assert 0.0 <= workloads.numpy_jax_agree(steps=3) < 1e-4
  with pytest.raises(ValueError, match="steps"):
    workloads.numpy_jax_agree(steps=-5)
  real = workloads.cartpole_step
  monkeypatch.setattr(workloads, "cartpole_step", lambda s, a: (lambda out: (out[0], out[1] * np.nan, *out[2:]))(
      real(s, a)))
  assert np.isnan(workloads.numpy_jax_agree(steps=3))


def test_predict_gnn_on_no_graphs_is_empty():
  out = predict_gnn({}, [])
  assert out.shape == (0,) and out.dtype == np.float64


def test_fit_deltas_leaves_out_pairs_without_events():
  """One pair recorded 10 scope events over 1 ms (100,000 ns each), the other none: it carries no information
  on the per-event cost (it was divided by 1 before, giving a median of 550,000 ns)."""
  got = ov.fit_deltas([1e-3, 1e-3], [{"scope": 0}, {"scope": 10}], {}, ("scope",))
  assert got == {"scope": pytest.approx(1e5)}


def test_fit_mlp_checks_the_config():
  x, y, g = np.ones((4, 3), np.float32), np.full(4, 1e-3), np.arange(4)
  for cfg in (MLPConfig(epochs=-3), MLPConfig(epochs=0), MLPConfig(hidden=0), MLPConfig(num_layers=-1)):
    with pytest.raises(ValueError, match="cfg"):
      fit_mlp(x, y, g, cfg)
