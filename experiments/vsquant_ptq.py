"""Post-training quantization with per-tensor, per-channel and per-vector (VS-Quant) scales.

Trains the library's CNN (float) on the chosen data for several seeds, then quantizes weights and
activations with static activation ranges calibrated on a few training batches and reports test
accuracy and per-layer weight SQNR for W4A4, W4A8, W6A6, W8A8 and per-vector scale widths, with the
variance-aware comparison (Bouthillier et al., MLSys 2021) of per-vector against per-channel.

  python experiments/vsquant_ptq.py --seeds=5
  python experiments/vsquant_ptq.py --dataset=cifar10 --data_dir=/data/cifar-10-batches-bin --model=resnet20
  python experiments/vsquant_ptq.py --seeds=2 --integer_check   # also per-vector configs on integer=True

``--integer_check`` (issue 21) re-evaluates every per-vector config of the table with
``QuantConfig(integer=True)`` on the dense layers (int8 codes, int32 partial sums per vector, VS-Quant
Sec. 3 datapath: the Pallas GEMM on a GPU where it applies, XLA integer ops otherwise) and compares it
with the emulation the table reports. Convolutions stay on emulation in both models: the library has no
per-vector integer convolution. Results go under the JSON key ``integer_check``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys
import time
import warnings

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import data, models, quant, stats  # noqa: E402
from mlsys_jax.quant import _pallas_gemm  # noqa: E402
from mlsys_jax.quant import layers as quant_layers  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "digits", ["digits", "mnist1d", "cifar10"], "Data set.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "CIFAR-10 binary directory (for --dataset=cifar10).")
_MODEL = flags.DEFINE_enum("model", "cnn", ["cnn", "resnet20"], "Model.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Paired trials (training seeds).")
_EPOCHS = flags.DEFINE_integer("epochs", 8, "Training epochs.")
_VECTOR = flags.DEFINE_integer("vector_size", 16, "V for per-vector scales.")
_CALIB = flags.DEFINE_enum("calibration", "percentile", ["max", "percentile", "mse"],
                           "Activation range calibration.")
_OUT = flags.DEFINE_string("out_dir", "results/vsquant_ptq", "Where to write results.json.")
_INTEGER_CHECK = flags.DEFINE_bool(
    "integer_check", False, "Also evaluate each per-vector config with integer=True dense layers "
    "(Pallas int8 GEMM on a GPU) and compare with emulation (JSON key 'integer_check').")

PRECISIONS = ((4, 4), (4, 8), (6, 6), (8, 8))


def _schemes(v: int):
  """name -> (weight spec maker, activation granularity, scale_bits)."""
  return {
      "per-tensor": ("tensor", "tensor", None),
      "per-channel": ("channel", "tensor", None),
      f"per-vector V={v} (fp scales)": ("vector", "vector", None),
      f"per-vector V={v} M=4": ("vector", "vector", 4),
      f"per-vector V={v} M=6": ("vector", "vector", 6),
  }


def _primitive_counts(jaxpr, counts: dict | None = None) -> dict:
  """Occurrences of each primitive in a (closed) jaxpr, sub-jaxprs (jit, custom_vjp, scan) included;
  integer products (``dot_general``/``conv_general_dilated`` with int32 accumulation) are counted
  apart as ``<name>[int32]``."""
  counts = {} if counts is None else counts
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ("dot_general", "conv_general_dilated") and \
        str(eqn.params.get("preferred_element_type")) == "int32":
      name += "[int32]"
    counts[name] = counts.get(name, 0) + 1
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else (v,)):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          _primitive_counts(sub, counts)
  return counts


def _predict_with_layers(model, variables: dict, x: np.ndarray, batch_size: int):
  """Logits of ``model`` on ``x`` and every module's output per batch (flax ``capture_intermediates``),
  keyed by module path: ``(logits, [ {path: output} per batch ])``. One compile per batch shape."""
  apply = jax.jit(functools.partial(model.apply, train=False, capture_intermediates=True,
                                    mutable=["intermediates"]))
  logits, layers = [], []
  for i in range(0, len(x), batch_size):
    out, st = apply(variables, x[i:i + batch_size])
    logits.append(np.asarray(out))
    layers.append({jax.tree_util.keystr(p): np.asarray(a)
                   for p, a in jax.tree_util.tree_flatten_with_path(st["intermediates"])[0]})
  return np.concatenate(logits), layers


def integer_check(make_model, qvars: dict, config: quant.QuantConfig, x: np.ndarray, y: np.ndarray,
                  batch_size: int = 1024) -> dict:
  """Compare a PTQ model's emulation path with its integer path (``QuantConfig(integer=True)``).

  The emulation model is ``make_model(config, config)``; the integer model is
  ``make_model(replace(config, integer=True), conv_config)`` with ``conv_config`` the emulation config
  when the scales are per-vector (``integer=True`` has no per-vector convolution) and the integer one
  otherwise. Both use the same variables, including the static activation ranges ``qvars['quant']``.
  On a GPU, per-vector dense layers with V in ``_pallas_gemm.SUPPORTED_VECTOR_SIZES`` run the Pallas
  per-vector int8 GEMM (VS-Quant, Dai et al. 2021, Sec. 3: ``sum_g s_a[m, g] s_w[g, n] (a_g . w_g)``
  with int32 ``a_g . w_g``) once its self-test passed; elsewhere XLA int8 products with int32
  accumulation. Per layer the two paths agree up to float32 summation order.

  Args:
    make_model: ``(dot_config, conv_config) -> flax module`` (a classifier returning logits).
    qvars: variables with the ``'quant'`` collection of :func:`quant.calibration_to_amax`.
    config: the emulation config (``integer=False``); both operands at most 8 bits.
    x, y: evaluation examples and integer labels.
    batch_size: evaluation batch size.

  Returns:
    A JSON-ready dict: ``accuracy_emulation``, ``accuracy_integer``, ``identical_prediction_fraction``,
    ``max_abs_logit_diff``, ``max_rel_logit_diff`` (over ``max |logit|`` of emulation), the number
    of examples whose logits differ by more than ``1e-5 max |logit|``, each module's
    output difference relative to its ``max |output|`` (``layer_max_rel_diff``:
    per layer the paths agree to float32 rounding; a last-bit difference can flip a rounding decision
    where the next layer quantizes, and that flip, not the product, makes the larger logit gaps), the
    ``backend``, ``dense_path`` (``'pallas_vs_int8_matmul'``, ``'xla_int32'``), ``conv_path`` and
    the primitive counts of the integer model's jaxpr (``pallas_call`` = kernels that ran).

  Raises:
    ValueError: on an integer config, mismatched ``x``/``y`` or a config the integer path refuses.

  Example:
    >>> r = integer_check(make_model, qvars, cfg, ds.x_test, ds.y_test)   # doctest: +SKIP
    >>> r["identical_prediction_fraction"], r["dense_path"]               # doctest: +SKIP
    (1.0, 'xla_int32')
  """
  if not isinstance(config, quant.QuantConfig):
    raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}.")
  if config.integer:
    raise ValueError("config must be the emulation config (integer=False); the integer one is derived.")
  if len(x) != len(y) or len(x) == 0:
    raise ValueError(f"integer_check needs matching, non-empty x and y, got {len(x)} and {len(y)}.")
  int_cfg = dataclasses.replace(config, integer=True)
  per_vector = any(s is not None and s.granularity == "vector"
                   for s in (config.weight, config.activation))
  conv_cfg = config if per_vector else int_cfg
  emu_model = make_model(config, config)
  int_model = make_model(int_cfg, conv_cfg)
  with warnings.catch_warnings(record=True) as caught:   # kernel self-test failures warn
    warnings.simplefilter("always")
    logits_e, layers_e = _predict_with_layers(emu_model, qvars, x, batch_size)
    logits_i, layers_i = _predict_with_layers(int_model, qvars, x, batch_size)
  pred_e, pred_i = np.argmax(logits_e, -1), np.argmax(logits_i, -1)
  row_diff = np.max(np.abs(logits_e.astype(np.float64) - logits_i), -1)   # per example
  diff = float(np.max(row_diff))
  scale = float(np.max(np.abs(logits_e)))
  tiny = np.finfo(np.float32).tiny
  layer_diff = {k: max(float(np.max(np.abs(le[k].astype(np.float64) - li[k]))) for le, li in
                       zip(layers_e, layers_i))
                   / max(max(float(np.max(np.abs(le[k]))) for le in layers_e), tiny)
                for k in layers_e[0]}
  jaxpr = jax.make_jaxpr(lambda v, xb: int_model.apply(v, xb, train=False))(qvars, x[:batch_size])
  counts = _primitive_counts(jaxpr)
  v = config.weight.vector_size if per_vector else None
  pallas = bool(per_vector and quant_layers._use_pallas_kernel(v))  # what _dot_int selects
  return {
      "accuracy_emulation": float(np.mean(pred_e == y)),
      "accuracy_integer": float(np.mean(pred_i == y)),
      "identical_prediction_fraction": float(np.mean(pred_e == pred_i)),
      "max_abs_logit_diff": diff,
      "max_abs_logit": scale,
      "max_rel_logit_diff": diff / max(scale, tiny),
      "examples_with_rel_logit_diff_above_1e-5": int(np.sum(row_diff > 1e-5 * scale)),
      "layer_max_rel_diff": layer_diff,
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "dense_path": "pallas_vs_int8_matmul" if pallas else "xla_int32",
      "conv_path": "emulation (no per-vector integer convolution)" if per_vector else "xla_int32",
      "pallas_kernel": {"on_gpu": _pallas_gemm.on_gpu(), "vector_size": v,
                        "vector_size_supported": v in _pallas_gemm.SUPPORTED_VECTOR_SIZES,
                        "self_test_passed": (bool(_pallas_gemm.kernel_self_test(v))
                                             if per_vector and _pallas_gemm.on_gpu() else None)},
      "integer_model_primitives": {k: counts.get(k, 0) for k in
                                   ("pallas_call", "dot_general[int32]", "dot_general",
                                    "conv_general_dilated[int32]", "conv_general_dilated")},
      "warnings": [str(w.message)[:300] for w in caught],
  }


def _load():
  return data.load_dataset(_DATASET.value, seed=0, data_dir=_DATA_DIR.value or None)


def _model(ds, **hooks):
  if _MODEL.value == "resnet20":
    return models.ResNet20(num_classes=ds.num_classes, **hooks)
  dims = 1 if ds.name == "mnist1d" else 2
  return models.CNN(num_classes=ds.num_classes, dims=dims, kernel_size=5 if dims == 1 else 3,
                    channels=(32, 64), **hooks)


def _weight_sqnr(params, v):
  """4-bit weight SQNR (dB) of every kernel, per channel vs per vector (reduction = all but last axis)."""
  out = {}
  for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
    if "kernel" not in jax.tree_util.keystr(path):
      continue
    w2 = w.reshape(-1, w.shape[-1])
    pc = quant.dequantize(quant.quantize(w2, 4, axis=0))
    pv = quant.vs_dequantize(quant.vs_quantize(w2, 4, axis=0, vector_size=v, scale_bits=6))
    pf = quant.vs_dequantize(quant.vs_quantize(w2, 4, axis=0, vector_size=v, scale_bits=None))
    out[jax.tree_util.keystr(path)] = {"per_channel_db": float(quant.sqnr_db(w2, pc)),
                                       "per_vector_M6_db": float(quant.sqnr_db(w2, pv)),
                                       "per_vector_fp_db": float(quant.sqnr_db(w2, pf))}
  return out


def _summarize_integer_check(checks: dict) -> dict:
  """Per config: means over seeds, worst-case agreement, the per-seed records."""
  configs = {}
  for k, rs in checks.items():
    configs[k] = {
        "accuracy_emulation_mean": float(np.mean([r["accuracy_emulation"] for r in rs])),
        "accuracy_integer_mean": float(np.mean([r["accuracy_integer"] for r in rs])),
        "identical_prediction_fraction_min": min(r["identical_prediction_fraction"] for r in rs),
        "max_abs_logit_diff_max": max(r["max_abs_logit_diff"] for r in rs),
        "max_rel_logit_diff_max": max(r["max_rel_logit_diff"] for r in rs),
        "dense_path": sorted({r["dense_path"] for r in rs}),
        "per_seed": rs}
  return {"what": "each per-vector config evaluated again with QuantConfig(integer=True) on the dense "
                  "layers (int8 codes, int32 partial sums per vector); convolutions stay on emulation "
                  "in both models (integer=True has no per-vector convolution)",
          "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "jax_version": jax.__version__,
          "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
          "configs": configs}


def main(argv):
  del argv
  ds = _load()
  out_dir = pathlib.Path(_OUT.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  schemes = _schemes(_VECTOR.value)
  acc = {"float": []}
  sqnr = []
  int_checks = {}
  t0 = time.perf_counter()
  for seed in range(_SEEDS.value):
    fmodel = _model(ds)
    variables, hist = models.train_classifier(fmodel, ds, optax.adam(2e-3), epochs=_EPOCHS.value,
                                              batch_size=64, seed=seed)
    acc["float"].append(hist["test_accuracy"][-1])
    sqnr.append(_weight_sqnr(variables["params"], _VECTOR.value))
    calib_x = ds.x_train[:512]
    for (wb, ab) in PRECISIONS:
      for name, (wg, ag, m) in schemes.items():
        cfg = quant.QuantConfig(
            quant.QuantSpec(wb, wg, _VECTOR.value, scale_bits=m),
            quant.QuantSpec(ab, ag, _VECTOR.value, scale_bits=m, calibration=_CALIB.value))
        qmodel = _model(ds, dot_general_cls=functools.partial(quant.QuantDotGeneral, config=cfg),
                        conv_general_dilated_cls=functools.partial(quant.QuantConv, config=cfg))
        _, st = qmodel.apply(variables, calib_x, mutable=["quant_calib"])
        qvars = {**variables, "quant": quant.calibration_to_amax(st["quant_calib"], cfg)}
        a = models.evaluate(qmodel, qvars, ds.x_test, ds.y_test)
        acc.setdefault(f"W{wb}A{ab} {name}", []).append(a)
        if _INTEGER_CHECK.value and wg == "vector" and wb <= 8 and ab <= 8:
          make = lambda dc, cc: _model(
              ds, dot_general_cls=functools.partial(quant.QuantDotGeneral, config=dc),
              conv_general_dilated_cls=functools.partial(quant.QuantConv, config=cc))
          r = integer_check(make, qvars, cfg, ds.x_test, ds.y_test)
          r["emulation_matches_table"] = r["accuracy_emulation"] == a
          int_checks.setdefault(f"W{wb}A{ab} {name}", []).append(r)
    print(f"[seed {seed + 1}/{_SEEDS.value}] float {acc['float'][-1]:.4f}  "
          f"W4A8 per-channel {acc['W4A8 per-channel'][-1]:.4f}  "
          f"W4A8 per-vector M=6 {acc[f'W4A8 per-vector V={_VECTOR.value} M=6'][-1]:.4f}  "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

  v = _VECTOR.value
  comparisons = {}
  for (wb, ab) in PRECISIONS:
    c = stats.compare(acc[f"W{wb}A{ab} per-vector V={v} M=6"], acc[f"W{wb}A{ab} per-channel"])
    comparisons[f"W{wb}A{ab}: per-vector M=6 vs per-channel"] = c._asdict()
  layers = sorted(sqnr[0])
  sqnr_mean = {l: {k: float(np.mean([s[l][k] for s in sqnr])) for k in sqnr[0][l]} for l in layers}
  result = {"dataset": ds.name, "model": _MODEL.value, "seeds": _SEEDS.value, "epochs": _EPOCHS.value,
            "calibration": _CALIB.value, "vector_size": v,
            "accuracy_mean": {k: float(np.mean(a)) for k, a in acc.items()},
            "accuracy_std": {k: float(np.std(a)) for k, a in acc.items()},
            "accuracy": acc, "weight_sqnr_4bit_db": sqnr_mean, "comparisons": comparisons,
            "provenance": provenance.record(data_arrays=(ds.x_train, ds.y_train, ds.x_test, ds.y_test),
                                            script=__file__)}
  if _INTEGER_CHECK.value:
    result["integer_check"] = _summarize_integer_check(int_checks)
  (out_dir / "results.json").write_text(json.dumps(result, indent=1))

  print(f"\n{ds.name} / {_MODEL.value}: test accuracy over {_SEEDS.value} seeds (mean +- std)")
  print(f"{'config':44s} {'accuracy':>16s}")
  for k in acc:
    print(f"{k:44s} {np.mean(acc[k]):.4f} +- {np.std(acc[k]):.4f}")
  print("\n4-bit weight SQNR per layer (dB): per-channel | per-vector V=%d M=6 | per-vector fp scales" % v)
  for l in layers:
    print(f"  {l:40s} {sqnr_mean[l]['per_channel_db']:6.2f}  {sqnr_mean[l]['per_vector_M6_db']:6.2f}"
          f"  {sqnr_mean[l]['per_vector_fp_db']:6.2f}")
  print("\nVariance-aware comparisons (P(per-vector > per-channel)):")
  for k, c in comparisons.items():
    print(f"  {k}: {stats.Comparison(**c)}")
  if _INTEGER_CHECK.value:
    print("\nInteger path vs emulation (per-vector configs; convolutions on emulation):")
    for k, r in result["integer_check"]["configs"].items():
      print(f"  {k:36s} acc emu {r['accuracy_emulation_mean']:.4f} int {r['accuracy_integer_mean']:.4f}"
            f"  same pred {r['identical_prediction_fraction_min']:.4f}"
            f"  max|dlogit| {r['max_abs_logit_diff_max']:.3g}  dense: {r['dense_path']}")
  print(f"\nwrote {out_dir / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
