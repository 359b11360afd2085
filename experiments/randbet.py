"""Bit error robustness: Normal vs weight clipping vs clipping + RandBET (Stutz et al., MLSys 2021).

Trains the library's CNN three ways at each precision, quantizes the weights with robust fixed-point
quantization (per-layer asymmetric, rounded, unsigned), and reports the clean error Err and the robust
error RErr (mean +- std over fixed random bit-error patterns) for several bit error rates, plus a plot.

  python experiments/randbet.py                       # digits, 8 and 4 bits, 25 patterns
  python experiments/randbet.py --dataset=mnist1d --patterns=50
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import data, models  # noqa: E402
from mlsys_jax.robust import bit_errors as be  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "digits", ["digits", "mnist1d", "cifar10"], "Data set.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "CIFAR-10 binary directory.")
_BITS = flags.DEFINE_list("bits", ["8", "4"], "Precisions.")
_WMAX = flags.DEFINE_float("w_max", 0.1, "Weight clipping bound of Clipping and RandBET.")
_PTRAIN = flags.DEFINE_float("p_train", 0.01, "Bit error rate during RandBET training.")
_RATES = flags.DEFINE_list("rates", ["0.0001", "0.001", "0.005", "0.01", "0.025"], "Evaluation rates p.")
_PATTERNS = flags.DEFINE_integer("patterns", 25, "Error patterns per rate.")
_EPOCHS = flags.DEFINE_integer("epochs", 15, "Training epochs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_OUT = flags.DEFINE_string("out_dir", "results/randbet", "Output directory.")


def _data():
  return data.load_dataset(_DATASET.value, seed=0, data_dir=_DATA_DIR.value or None)


def _model(ds):
  if ds.name == "mnist1d":
    return models.CNN(num_classes=10, dims=1, kernel_size=5, channels=(32, 64))
  return models.CNN(num_classes=ds.num_classes, channels=(32, 64))


def train(ds, method: str, bits: int, seed: int):
  """method: 'normal' (float training), 'clipping' (QAT + clipping), 'randbet' (+ random bit errors)."""
  model = _model(ds)
  w_max = None if method == "normal" else _WMAX.value
  tx = optax.adam(2e-3) if w_max is None else optax.chain(optax.adam(2e-3), be.clip_weights(w_max))
  key = jax.random.PRNGKey(seed)
  params = model.init(key, ds.x_train[:2])["params"]
  if w_max is not None:
    params = jax.tree_util.tree_map(lambda w: jnp.clip(w, -w_max, w_max), params)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, xb, yb, k):
    loss = lambda p: models.cross_entropy(model.apply({"params": p}, xb), yb)
    if method == "normal":
      l, g = jax.value_and_grad(loss)(params)
    else:
      (l, _), g = be.randbet_value_and_grad(loss, params, k, p=_PTRAIN.value, bits=bits, w_max=w_max,
                                            perturbed=(method == "randbet"))
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, l

  for epoch in range(_EPOCHS.value):
    for xb, yb in data.batches(ds.x_train, ds.y_train, 32, seed=seed * 1000 + epoch):
      key, sub = jax.random.split(key)
      params, opt, _ = step(params, opt, xb, yb, sub)
  return model, params, w_max


def main(argv):
  del argv
  ds = _data()
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  rates = [float(r) for r in _RATES.value]
  results = []
  t0 = time.perf_counter()
  trained = {}
  for bits in [int(b) for b in _BITS.value]:
    for method in ("normal (symmetric quant.)", "normal", "clipping", "randbet"):
      base = method.split()[0]
      if (base, bits) not in trained:  # both 'normal' rows evaluate one float-trained model
        trained[base, bits] = train(ds, base, bits, _SEED.value)
      model, params, w_max = trained[base, bits]
      apply = lambda p, x: model.apply({"params": p}, x)
      row = {"bits": bits, "method": method, "w_max": w_max, "rerr": {}, "rerr_std": {}}
      for p in rates:
        r = be.robust_error(apply, params, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test), p=p, bits=bits,
                            num_patterns=_PATTERNS.value, w_max=w_max, symmetric="symmetric" in method)
        row["err"] = 100 * r.err
        row["rerr"][p] = 100 * r.rerr_mean
        row["rerr_std"][p] = 100 * r.rerr_std
      results.append(row)
      print(f"[{time.perf_counter() - t0:5.0f}s] {bits}-bit {method:26s} Err {row['err']:.2f}%  " +
            "  ".join(f"RErr@{100 * p:g}% {row['rerr'][p]:.2f}+-{row['rerr_std'][p]:.2f}" for p in rates),
            flush=True)
  (out / "results.json").write_text(json.dumps({"dataset": ds.name, "patterns": _PATTERNS.value,
                                                "p_train": _PTRAIN.value, "epochs": _EPOCHS.value,
                                                "results": results,
                                                "provenance": provenance.record(
                                                    data_arrays=(ds.x_train, ds.y_train, ds.x_test, ds.y_test),
                                                    script=__file__)},
                                               indent=1))
  hdr = "bits  method" + " " * 21 + "Err%   " + "  ".join(f"RErr@{100 * p:g}%".ljust(14) for p in rates)
  print("\n" + hdr)
  for r in results:
    print(f"{r['bits']:>4}  {r['method']:26s} {r['err']:5.2f}   " +
          "  ".join(f"{r['rerr'][p]:6.2f}+-{r['rerr_std'][p]:<5.2f}" for p in rates))
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(_BITS.value), figsize=(5 * len(_BITS.value), 3.5), squeeze=False)
    for ax, bits in zip(axes[0], [int(b) for b in _BITS.value]):
      for r in (r for r in results if r["bits"] == bits):
        ys = [r["rerr"][p] for p in rates]
        ax.errorbar([100 * p for p in rates], ys, yerr=[r["rerr_std"][p] for p in rates], label=r["method"],
                    marker="o", capsize=3)
      ax.set_xscale("log")
      ax.set_xlabel("bit error rate p (%)")
      ax.set_ylabel("RErr (%)")
      ax.set_title(f"{ds.name}, {bits}-bit weights")
      ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rerr.png", dpi=120)
    print(f"wrote {out / 'rerr.png'}")
  except ImportError:
    print("matplotlib missing: no plot")
  print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
