"""experiments/vsquant_ptq.py --integer_check: the integer path (integer=True) agrees with emulation.

A tiny CNN with static activation ranges: per-vector W4A4 (V = 16, integer M = 6 scales) and W8A8
(float scales) evaluated through ``integer_check`` must give identical predictions and logits within float32
rounding of emulation; perturbing one weight vector scale of the integer path only must be caught.
"""

import functools
import pathlib
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

from mlsys_jax import models, quant  # noqa: E402
from mlsys_jax.quant import layers as quant_layers  # noqa: E402
import vsquant_ptq  # noqa: E402

V = 16


def _make(dot_cfg, conv_cfg):
  return models.CNN(num_classes=5, dims=2, kernel_size=3, channels=(8,), hidden=32,
                    dot_general_cls=functools.partial(quant.QuantDotGeneral, config=dot_cfg),
                    conv_general_dilated_cls=functools.partial(quant.QuantConv, config=conv_cfg))


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(96, 8, 8, 1)).astype(np.float32)
  # Shapes from eval_shape (no compile), values from numpy: He-style kernels, small biases.
  shapes = jax.eval_shape(models.CNN(num_classes=5, channels=(8,), hidden=32).init,
                          jax.random.PRNGKey(0), x[:1])
  variables = jax.tree_util.tree_map(
      lambda s: (rng.normal(size=s.shape) * (np.sqrt(2.0 / np.prod(s.shape[:-1])) if len(s.shape) > 1
                                             else 0.1)).astype(np.float32), shapes)
  # The recorded activation statistics do not depend on the config (only their conversion does).
  # Labels = this (dynamic-range W8A8) model's predictions, so accuracies are high, not 1/5.
  cfg = _cfg(8, 8, 6)
  logits, st = jax.jit(functools.partial(_make(cfg, cfg).apply, mutable=["quant_calib"]))(variables, x)
  y = np.argmax(np.asarray(logits), -1)
  return variables, st["quant_calib"], x, y


def _calibrated(setup, cfg):
  variables, calib, _, _ = setup
  return {**variables, "quant": quant.calibration_to_amax(calib, cfg)}


def _cfg(wb, ab, m):
  return quant.QuantConfig(quant.QuantSpec(wb, "vector", V, scale_bits=m),
                           quant.QuantSpec(ab, "vector", V, scale_bits=m, calibration="max"))


@pytest.mark.parametrize("wb,ab,m", [(4, 4, 6), (8, 8, None)])
def test_integer_matches_emulation(setup, wb, ab, m):
  _, _, x, y = setup
  cfg = _cfg(wb, ab, m)
  qvars = _calibrated(setup, cfg)
  r = vsquant_ptq.integer_check(_make, qvars, cfg, x, y, batch_size=len(x))
  assert r["accuracy_emulation"] > 0.5                 # labels = float predictions: not a broken model
  assert r["identical_prediction_fraction"] == 1.0
  assert r["accuracy_integer"] == r["accuracy_emulation"]
  assert r["max_rel_logit_diff"] < 1e-5, r            # float32 summation order only
  assert r["max_abs_logit"] > 0.1
  assert r["examples_with_rel_logit_diff_above_1e-5"] == 0
  layers = r["layer_max_rel_diff"]
  assert layers["['Conv_0']['__call__'][0]"] == 0.0     # convolutions: emulation in both models
  assert 0.0 < layers["['Dense_0']['__call__'][0]"] < 1e-5   # integer vs float products: rounding only
  # Which path ran: on CPU the XLA integer products (int32 dot_generals, no Pallas); both dense layers.
  assert r["backend"] == jax.default_backend() == "cpu"
  assert r["dense_path"] == "xla_int32" and r["pallas_kernel"]["self_test_passed"] is None
  prims = r["integer_model_primitives"]
  assert prims["pallas_call"] == 0 and prims["dot_general[int32]"] >= 2
  assert prims["conv_general_dilated[int32]"] == 0      # per-vector convolutions stay on emulation
  assert r["conv_path"].startswith("emulation")


def test_perturbed_scale_is_caught(setup, monkeypatch):
  """Scale one weight vector scale of the integer path by 1.5: logits must visibly disagree."""
  _, _, x, y = setup
  cfg = _cfg(4, 8, 6)
  qvars = _calibrated(setup, cfg)
  orig = quant_layers._int_operand

  def perturbed(xx, spec, red_axis, amax=None):
    codes, scale = orig(xx, spec, red_axis, amax)
    if red_axis == 0 and spec.granularity == "vector":      # the weight operand: (G, 1, N)
      scale = scale.at[0, 0, 0].multiply(1.5)
    return codes, scale

  monkeypatch.setattr(quant_layers, "_int_operand", perturbed)   # traced afresh: a new jit per call
  r = vsquant_ptq.integer_check(_make, qvars, cfg, x, y, batch_size=len(x))
  assert r["max_rel_logit_diff"] > 1e-3, r
  assert r["layer_max_rel_diff"]["['Dense_0']['__call__'][0]"] > 1e-3


def test_integer_check_errors(setup):
  variables, _, x, y = setup
  cfg = _cfg(8, 8, 6)
  with pytest.raises(ValueError, match="emulation config"):
    vsquant_ptq.integer_check(_make, variables, quant.QuantConfig(integer=True), x, y)
  with pytest.raises(ValueError, match="matching"):
    vsquant_ptq.integer_check(_make, variables, cfg, x, y[:3])
  with pytest.raises(TypeError, match="QuantConfig"):
    vsquant_ptq.integer_check(_make, variables, "W8A8", x, y)
