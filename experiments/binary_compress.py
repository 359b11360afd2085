"""Deployable size of a packed QuickNet and the accuracy of the compressed model on digits.

Bannink et al., MLSys 2021 (LCE): a converted binary network stores binary kernels as bits; the rest
(stem, transitions, head, BatchNorm) stays "full precision" and, in QuickNet, dominates the bytes. This
script serializes models with :func:`mlsys_jax.quant.binary.export.serialize` under several storage
settings of the non-binary layers and reports

- the exact serialized size of the Larq Zoo QuickNet (ImageNet shapes, 13,234,088 parameters in Larq's
  count) against its float32 parameters (the issue's target: <= 1/25);
- on the digits QuickNet-style model (Bop-trained, the recipe of ``experiments/binary_eval.py``), over
  ``--seeds`` seeds: test accuracy of the float-emulated flax model, of the bit-exact packed converter and
  of each compressed blob loaded back from its bytes (:func:`load_quicknet`), and prediction agreement
  with the flax model; ``mlsys_jax.stats`` on the paired accuracies.

  python experiments/binary_compress.py                          # 5 seeds, ~8 min on a 2-core CPU
  python experiments/binary_compress.py --seeds=1 --epochs=2     # smoke test
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

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import data, models, stats  # noqa: E402
from mlsys_jax.quant import binary as qb  # noqa: E402
from mlsys_jax.quant.binary import export  # noqa: E402

_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds (one trained model each).")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Training epochs.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/binary_compress", "Output directory.")

# (name, head_bits, transition_bits, stem_bits)
SETTINGS = [("float32", 32, 32, 32), ("head4_trans8", 4, 8, 32), ("head8_trans8", 8, 8, 32),
            ("head4_trans8_stem8", 4, 8, 8), ("head4_trans32", 4, 32, 32)]


def make_model() -> qb.QuickNet:
  return qb.QuickNet(section_blocks=(2, 2), section_filters=(32, 64), num_classes=10, stem_strides=(1, 1),
                     stem_momentum=0.9)


def make_tx(steps: int) -> optax.GradientTransformation:
  """The Bop arm of experiments/binary_eval.py: Bop (gamma 1e-2 cosine-decayed x0.01, tau 1e-6) + Adam 3e-3."""
  gamma = optax.cosine_decay_schedule(1e-2, steps, alpha=0.01)
  return qb.case_optimizer(qb.bop(threshold=1e-6, gamma=gamma),
                           optax.adam(optax.cosine_decay_schedule(3e-3, steps)))


def zoo_sizes() -> dict:
  """Exact serialized bytes of the Larq Zoo QuickNet (ImageNet shapes) under every setting."""
  m = qb.QuickNet()
  v = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)))
  count = qb.larq_param_count(m, v)
  f32 = 4 * count["larq_total"]
  out = {"larq_params": count["larq_total"], "float32_bytes": f32, "settings": {}}
  for name, hb, tb, sb in SETTINGS:
    blob = export.serialize(export.compress_quicknet(m, v, (224, 224, 3), head_bits=hb, transition_bits=tb,
                                                     stem_bits=sb))
    parts = export.serialized_nbytes(blob)
    out["settings"][name] = {"bytes": len(blob), "parts": parts, "fraction_of_float32": len(blob) / f32,
                             "float32_over_bytes": f32 / len(blob)}
    print(f"QuickNet {name:20s} {len(blob):>10,d} bytes = 1/{f32 / len(blob):.2f} of float32 {parts}", flush=True)
  return out


def main(argv):
  del argv
  out = pathlib.Path(_OUT_DIR.value)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  result = {"zoo_quicknet": zoo_sizes()}
  acc = {"flax": [], "packed_exact": [], **{n: [] for n, *_ in SETTINGS}}
  agree = {"packed_exact": [], **{n: [] for n, *_ in SETTINGS}}
  digits_bytes = {}
  for seed in range(_SEEDS.value):
    ds = data.load_digits(seed=seed)
    steps = _EPOCHS.value * (len(ds.x_train) // _BATCH.value)
    m = make_model()
    variables, _ = models.train_classifier(m, ds, make_tx(steps), epochs=_EPOCHS.value,
                                           batch_size=_BATCH.value, seed=seed)
    pred_flax = np.argmax(models.predict(m, variables, ds.x_test), -1)
    acc["flax"].append(float(np.mean(pred_flax == ds.y_test)))
    infer, _ = qb.convert_quicknet(m, variables, ds.x_train.shape[1:])
    pred = np.argmax(np.asarray(infer(ds.x_test)), -1)
    acc["packed_exact"].append(float(np.mean(pred == ds.y_test)))
    agree["packed_exact"].append(float(np.mean(pred == pred_flax)))
    for name, hb, tb, sb in SETTINGS:
      blob = export.serialize(export.compress_quicknet(m, variables, ds.x_train.shape[1:], head_bits=hb,
                                                       transition_bits=tb, stem_bits=sb))
      digits_bytes[name] = export.serialized_nbytes(blob)
      infer_c, _ = export.load_quicknet(blob)              # from the bytes alone
      pred = np.argmax(np.asarray(infer_c(ds.x_test)), -1)
      acc[name].append(float(np.mean(pred == ds.y_test)))
      agree[name].append(float(np.mean(pred == pred_flax)))
    print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in acc.items())
          + f"; agreement {', '.join(f'{k} {v[-1]:.4f}' for k, v in agree.items())} ({time.time() - t0:.0f}s)",
          flush=True)
  summary = {}
  f = np.asarray(acc["flax"])
  for name, a in acc.items():
    a = np.asarray(a)
    summary[name] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
                     "per_seed": a.tolist()}
    if name != "flax":
      summary[name]["agreement_with_flax"] = agree[name]
      summary[name]["accuracy_drop_points"] = float(100 * (f.mean() - a.mean()))
      if a.size > 1:
        summary[name]["flax_better"] = stats.compare(f, a)._asdict()
  f32_digits = 4 * qb.larq_param_count(make_model(), variables)["larq_total"]
  result.update({"config": {"seeds": _SEEDS.value, "epochs": _EPOCHS.value, "batch_size": _BATCH.value,
                            "model": "QuickNet(section_blocks=(2, 2), section_filters=(32, 64), stem_strides=(1, 1))",
                            "optimizer": "Bop (gamma 1e-2 cosine x0.01, tau 1e-6) + Adam 3e-3 (case_optimizer)",
                            "settings": SETTINGS},
                 "digits_accuracy": summary, "digits_bytes": digits_bytes, "digits_float32_bytes": f32_digits,
                 "seconds": time.time() - t0, "jax": jax.__version__,
                 "provenance": provenance.record(   # every seed's split: x_train, y_train, x_test, y_test each
                     data_arrays=[a for s in range(_SEEDS.value) for a in data.load_digits(seed=s)[:4]],
                     script=__file__)})
  (out / "binary_compress.json").write_text(json.dumps(result, indent=1))
  print(json.dumps(summary, indent=1))
  print(f"wrote {out / 'binary_compress.json'}")


if __name__ == "__main__":
  app.run(main)
