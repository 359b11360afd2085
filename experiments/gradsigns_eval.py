"""GradSigns: embed a signature in a CNN through its input gradients, read it back white-box and
black-box, attack it (fine-tuning, pruning, overwriting, quantization) and check that independently
trained models are never claimed (Aramoon et al., MLSys 2021).

  python experiments/gradsigns_eval.py                 # digits, 64-bit signature, 3 seeds
  python experiments/gradsigns_eval.py --dataset=mnist1d --bits=64
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
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mlsys_jax import data, models, quant, stats  # noqa: E402
from mlsys_jax.robust import gradsigns as gs  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "digits", list(data.DATASETS), "Data set.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "CIFAR-10 binary directory.")
_BITS = flags.DEFINE_integer("bits", 64, "Signature length N.")
_CAPACITY = flags.DEFINE_list("capacity_bits", ["32", "64", "128", "256"], "N values for the capacity sweep.")
_LAMBDA = flags.DEFINE_float("lam", 1.0, "Regularizer weight lambda.")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Training epochs (fine-tuning uses as many).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Trials.")
_OUT = flags.DEFINE_string("out_dir", "results/gradsigns", "Output directory.")


def _model(ds):
  if ds.name == "mnist1d":
    return models.CNN(dims=1, kernel_size=5, channels=(32, 64))
  if ds.name == "cifar10":
    return models.ResNet20()
  return models.CNN(channels=(32, 64))


def train(ds, model, wm, seed, epochs, state=None, lam=None):
  xt = jnp.asarray(ds.x_train[ds.y_train == (wm.target_class if wm else 0)][:64])
  extra = None
  if wm is not None:
    lam = _LAMBDA.value if lam is None else lam
    extra = lambda p, xb, yb, k: gs.gradsigns_regularizer(
        lambda x: model.apply({"params": p}, x), xt, wm, weight=lam)
  tx = optax.adam(1e-3)
  if state is not None:
    state = models.TrainState(state["params"], {}, tx.init(state["params"]), jnp.zeros((), jnp.int32))
  v, h = models.train_classifier(model, ds, tx, epochs=epochs, batch_size=32, seed=seed, loss_extra=extra,
                                 state=state)
  return v, h["test_accuracy"][-1]


def ber(model, v, xt, wm):
  return gs.signature_ber(gs.extract_whitebox(lambda x: model.apply(v, x), xt, wm), wm)


def prune(params, fraction):
  leaves = [l for l in jax.tree_util.tree_leaves(params) if l.ndim > 1]
  thr = jnp.quantile(jnp.concatenate([jnp.abs(l).ravel() for l in leaves]), fraction)
  return jax.tree_util.tree_map(lambda w: jnp.where((w.ndim > 1) & (jnp.abs(w) < thr), 0.0, w), params)


def quantize_weights(params, bits):
  def q(w):
    if w.ndim < 2:
      return w
    return quant.dequantize(quant.quantize(w, bits, axis=tuple(range(w.ndim - 1))))
  return jax.tree_util.tree_map(q, params)


def main(argv):
  del argv
  ds = data.load_dataset(_DATASET.value, seed=0, data_dir=_DATA_DIR.value or None)
  model = _model(ds)
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  res = {"plain_acc": [], "wm_acc": [], "ber_whitebox": [], "ber_blackbox": [], "queries": 0,
         "attacks": {}, "false_claim": []}
  xt_all = jnp.asarray(ds.x_test[ds.y_test == 0])
  for seed in range(_SEEDS.value):
    wm = gs.gradsigns_keygen(jax.random.PRNGKey(1000 + seed), ds.input_shape, _BITS.value)
    vp, ap = train(ds, model, None, seed, _EPOCHS.value)
    vw, aw = train(ds, model, wm, seed, _EPOCHS.value)
    res["plain_acc"].append(ap)
    res["wm_acc"].append(aw)
    res["ber_whitebox"].append(ber(model, vw, xt_all, wm))
    bb, q = gs.extract_blackbox(lambda x: jax.nn.softmax(model.apply(vw, x)), xt_all[:50], wm)
    res["ber_blackbox"].append(gs.signature_ber(bb, wm))
    res["queries"] = q
    # the plain model of this seed is an independent model for this key
    res["false_claim"].append(gs.verify(gs.extract_whitebox(lambda x: model.apply(vp, x), xt_all, wm),
                                        wm)._asdict())
    att = {}
    vf, af = train(ds, model, None, seed + 100, _EPOCHS.value, state=vw)
    att["fine-tuning"] = (ber(model, vf, xt_all, wm), af)
    for frac in (0.5, 0.8):
      pv = {"params": prune(vw["params"], frac)}
      att[f"pruning {int(frac * 100)}%"] = (ber(model, pv, xt_all, wm),
                                            models.evaluate(model, pv, ds.x_test, ds.y_test))
    other = gs.gradsigns_keygen(jax.random.PRNGKey(5000 + seed), ds.input_shape, _BITS.value)
    vo, ao = train(ds, model, other, seed + 200, _EPOCHS.value, state=vw)
    att["overwriting (new signature)"] = (ber(model, vo, xt_all, wm), ao)
    for b in (8, 4):
      qv = {"params": quantize_weights(vw["params"], b)}
      att[f"quantization {b}-bit"] = (ber(model, qv, xt_all, wm),
                                      models.evaluate(model, qv, ds.x_test, ds.y_test))
    for k, (e, a) in att.items():
      res["attacks"].setdefault(k, {"ber": [], "acc": []})
      res["attacks"][k]["ber"].append(e)
      res["attacks"][k]["acc"].append(a)
    print(f"[seed {seed + 1}/{_SEEDS.value}, {time.perf_counter() - t0:.0f}s] plain {ap:.4f} wm {aw:.4f} "
          f"BER wb {res['ber_whitebox'][-1]:.3f} bb {res['ber_blackbox'][-1]:.3f} ({q} queries) | " +
          ", ".join(f"{k}: BER {e:.3f}" for k, (e, a) in att.items()), flush=True)
  cap = {}
  for n in [int(v) for v in _CAPACITY.value]:
    wm = gs.gradsigns_keygen(jax.random.PRNGKey(77), ds.input_shape, n)
    v, a = train(ds, model, wm, 0, _EPOCHS.value)
    cap[n] = {"ber": ber(model, v, xt_all, wm), "acc": a}
    print(f"  capacity N={n}: BER {cap[n]['ber']:.3f} accuracy {a:.4f}", flush=True)
  res["capacity"] = cap
  res["accuracy_comparison"] = stats.compare(res["wm_acc"], res["plain_acc"])._asdict()
  (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
  print(f"\naccuracy plain {np.mean(res['plain_acc']):.4f} vs watermarked {np.mean(res['wm_acc']):.4f}; "
        f"BER white-box {np.mean(res['ber_whitebox']):.4f}, black-box {np.mean(res['ber_blackbox']):.4f} "
        f"with {res['queries']} queries; N={_BITS.value}")
  for k, d in res["attacks"].items():
    print(f"  {k:28s} BER {np.mean(d['ber']):.3f}  accuracy {np.mean(d['acc']):.4f}")
  print("  independent models claimed:", sum(f["owned"] for f in res["false_claim"]), "of",
        len(res["false_claim"]), "; max false-claim probability at their matches:",
        f"{max(f['false_claim_probability'] for f in res['false_claim']):.3g}")
  print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
