"""Demo rows of mlsys_jax.quant: per-vector vs per-channel 4-bit weights of a trained CNN on digits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
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
  # Quantization-aware training on the integer path: its gradient is the emulation's straight-through one.
  x, t = ds.x_train[:64].reshape(64, -1), jax.nn.one_hot(ds.y_train[:64], 10)
  w0 = jax.random.normal(jax.random.PRNGKey(seed), (x.shape[1], 10)) * 0.1
  grads = {}
  for name, integer in (("integer", True), ("emulation", False)):
    dg = quant.quantized_dot_general(quant.QuantConfig(quant.QuantSpec(8, "vector", 16, scale_bits=6),
                                                       quant.QuantSpec(8, "vector", 16), integer))
    grads[name] = jax.jit(jax.grad(lambda w: jnp.mean((dg(x, w, (((1,), (0,)), ((), ()))) - t) ** 2)))(w0)
  grads["float"] = jax.grad(lambda w: jnp.mean((x @ w - t) ** 2))(w0)
  cos = lambda a, b: float(np.dot(np.ravel(a), np.ravel(b)) / np.linalg.norm(a) / np.linalg.norm(b))
  rows.append(("VS-Quant", "W8A8 per-vector integer-path weight gradient: cosine to emulation / to float",
               f"{cos(grads['integer'], grads['emulation']):.4f} / {cos(grads['integer'], grads['float']):.4f}"))
  rows.append(("VS-Quant", "digits accuracy float / W4A8 per-channel / W4A8 per-vector (static calib.)",
               f"{hist['test_accuracy'][-1]:.3f} / {accs['per-channel']:.3f} / {accs['per-vector']:.3f}"))
  return rows
