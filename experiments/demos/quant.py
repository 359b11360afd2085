"""Demo rows of mlsys_jax.quant: per-vector vs per-channel 4-bit weights of a trained CNN on digits."""

import functools

import optax

from mlsys_jax import data, models, quant

ORDER = 10
TECHNIQUE = "VS-Quant"


def run(seed: int):
  ds = data.load_digits(seed=seed)
  m = models.CNN(channels=(16, 32), hidden=64)
  variables, hist = models.train_classifier(m, ds, optax.adam(2e-3), epochs=4, batch_size=32, seed=seed)
  w = variables["params"]["Dense_0"]["kernel"]
  pc = quant.sqnr_db(w, quant.dequantize(quant.quantize(w, 4, axis=0)))
  pv = quant.sqnr_db(w, quant.vs_dequantize(quant.vs_quantize(w, 4, axis=0, vector_size=16,
                                                              scale_bits=6)))
  rows = [("VS-Quant", "4-bit weight SQNR of the hidden dense layer: per-channel -> per-vector V=16 M=6",
           f"{float(pc):.1f} dB -> {float(pv):.1f} dB")]
  accs = {}
  for name, (wg, ag, sb) in {"per-channel": ("channel", "tensor", None),
                             "per-vector": ("vector", "vector", 6)}.items():
    cfg = quant.QuantConfig(quant.QuantSpec(4, wg, 16, scale_bits=sb),
                            quant.QuantSpec(8, ag, 16, scale_bits=sb, calibration="percentile"))
    qm = models.CNN(channels=(16, 32), hidden=64,
                    dot_general_cls=functools.partial(quant.QuantDotGeneral, config=cfg),
                    conv_general_dilated_cls=functools.partial(quant.QuantConv, config=cfg))
    _, st = qm.apply(variables, ds.x_train[:256], mutable=["quant_calib"])
    qv = {**variables, "quant": quant.calibration_to_amax(st["quant_calib"], cfg)}
    accs[name] = models.evaluate(qm, qv, ds.x_test, ds.y_test)
  rows.append(("VS-Quant", "digits accuracy float / W4A8 per-channel / W4A8 per-vector (static calib.)",
               f"{hist['test_accuracy'][-1]:.3f} / {accs['per-channel']:.3f} / {accs['per-vector']:.3f}"))
  return rows
