"""Post-training quantization with per-tensor, per-channel and per-vector (VS-Quant) scales.

Trains the library's CNN (float) on the chosen data for several seeds, then quantizes weights and
activations with static activation ranges calibrated on a few training batches and reports test
accuracy and per-layer weight SQNR for W4A4, W4A8, W6A6, W8A8 and per-vector scale widths, with the
variance-aware comparison (Bouthillier et al., MLSys 2021) of per-vector against per-channel.

  python experiments/vsquant_ptq.py --seeds=5
  python experiments/vsquant_ptq.py --dataset=cifar10 --data_dir=/data/cifar-10-batches-bin --model=resnet20
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mlsys_jax import data, models, quant, stats  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "digits", ["digits", "mnist1d", "cifar10"], "Data set.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "CIFAR-10 binary directory (for --dataset=cifar10).")
_MODEL = flags.DEFINE_enum("model", "cnn", ["cnn", "resnet20"], "Model.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Paired trials (training seeds).")
_EPOCHS = flags.DEFINE_integer("epochs", 8, "Training epochs.")
_VECTOR = flags.DEFINE_integer("vector_size", 16, "V for per-vector scales.")
_CALIB = flags.DEFINE_enum("calibration", "percentile", ["max", "percentile", "mse"],
                           "Activation range calibration.")
_OUT = flags.DEFINE_string("out_dir", "results/vsquant_ptq", "Where to write results.json.")

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


def main(argv):
  del argv
  ds = _load()
  out_dir = pathlib.Path(_OUT.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  schemes = _schemes(_VECTOR.value)
  acc = {"float": []}
  sqnr = []
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
            "accuracy": acc, "weight_sqnr_4bit_db": sqnr_mean, "comparisons": comparisons}
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
  print(f"\nwrote {out_dir / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
