"""Binarized QuickNet-style CNN on digits: latent-weight Adam vs Bop, with/without FP shortcuts, vs float.

Bannink et al., MLSys 2021 (Larq / LCE) and Helwegen et al., NeurIPS 2019 (Bop). The same architecture
(``mlsys_jax.quant.binary.QuickNet`` with a stride-1 stem for 8x8 images) is trained

- ``float``: every convolution in float (``binary=False``), Adam;
- ``adam``: binary blocks (ste_sign, clip 1.25, +1 padding), latent weights trained by Adam + weight
  clip (1.25), the rest by Adam (``case_optimizer``);
- ``bop``: binary kernels trained by Bop, the rest by Adam (``case_optimizer``, Larq's CaseOptimizer);
- ``adam_noshort`` / ``bop_noshort``: the same without the full-precision residual shortcuts;

over ``--seeds`` paired seeds (same split, init and batch order per seed). Each binary arm is compared
with the float model (``mlsys_jax.stats``: P(binary >= float - 3 points) and P(float > binary), bootstrap
intervals). Also reports, for the trained Bop model, whether the bit-packed converter reproduces the
predictions, and the packed binary-weight memory.

  python experiments/binary_eval.py                       # 5 seeds, digits, a few minutes on CPU
  python experiments/binary_eval.py --seeds=2 --epochs=3  # smoke test
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import data, models, stats  # noqa: E402
from mlsys_jax.quant import binary as qb  # noqa: E402

_SEEDS = flags.DEFINE_integer("seeds", 5, "Paired seeds.")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Training epochs.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_LR = flags.DEFINE_float("lr", 3e-3, "Adam learning rate of the float parameters (cosine decay).")
_LR_BIN = flags.DEFINE_float("lr_binary", 1e-2, "Adam learning rate of the latent binary kernels.")
_GAMMA = flags.DEFINE_float("bop_gamma", 1e-2, "Bop adaptivity rate (decayed x0.01 by cosine).")
_TAU = flags.DEFINE_float("bop_threshold", 1e-6, "Bop threshold.")
_ARMS = flags.DEFINE_list("arms", ["float", "adam", "bop", "adam_noshort", "bop_noshort"], "Arms to run.")
_BLOCKS = flags.DEFINE_list("blocks", ["2", "2"], "Residual blocks per section.")
_FILTERS = flags.DEFINE_list("filters", ["32", "64"], "Filters per section.")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/binary_eval", "Output directory.")


def make_model(arm: str) -> qb.QuickNet:
  return qb.QuickNet(section_blocks=tuple(map(int, _BLOCKS.value)),
                     section_filters=tuple(map(int, _FILTERS.value)), num_classes=10,
                     stem_strides=(1, 1), stem_momentum=0.9, binary=arm != "float", shortcut="noshort" not in arm)


def make_tx(arm: str, steps: int) -> optax.GradientTransformation:
  sched = lambda lr: optax.cosine_decay_schedule(lr, steps)
  default = optax.adam(sched(_LR.value))
  if arm == "float":
    return default
  if arm.startswith("adam"):
    binary = optax.chain(optax.adam(sched(_LR_BIN.value)), qb.weight_clip(1.25))
  else:
    gamma = optax.cosine_decay_schedule(_GAMMA.value, steps, alpha=0.01)
    binary = qb.bop(threshold=_TAU.value, gamma=gamma)
  return qb.case_optimizer(binary, default)


def main(argv):
  del argv
  out = pathlib.Path(_OUT_DIR.value)
  out.mkdir(parents=True, exist_ok=True)
  acc = {a: [] for a in _ARMS.value}
  packed_check = []
  t0 = time.time()
  for seed in range(_SEEDS.value):
    ds = data.load_digits(seed=seed)
    steps = _EPOCHS.value * (len(ds.x_train) // _BATCH.value)
    for arm in _ARMS.value:
      m = make_model(arm)
      variables, hist = models.train_classifier(m, ds, make_tx(arm, steps), epochs=_EPOCHS.value,
                                                batch_size=_BATCH.value, seed=seed)
      acc[arm].append(hist["test_accuracy"][-1])
      print(f"seed {seed} {arm:13s} test acc {acc[arm][-1]:.4f}  ({time.time() - t0:.0f}s)", flush=True)
      if arm == "bop" and seed == 0:
        infer, layers = qb.convert_quicknet(m, variables, ds.x_train.shape[1:])
        pred_packed = np.concatenate([np.argmax(np.asarray(infer(ds.x_test[i:i + 256])), -1)
                                      for i in range(0, len(ds.x_test), 256)])
        pred_float = np.argmax(models.predict(m, variables, ds.x_test), -1)
        packed_check = {"agreement": float(np.mean(pred_packed == pred_float)),
                        "packed_accuracy": float(np.mean(pred_packed == ds.y_test)),
                        "packed_binary_weight_bytes": sum(qb.packed_nbytes(l.words) for l in layers.values()),
                        "float32_binary_weight_bytes": sum(
                            int(np.prod(l.words.shape)) * 4 * 32 for l in layers.values())}
  summary = {}
  for arm in _ARMS.value:
    a = np.asarray(acc[arm])
    summary[arm] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
                    "per_seed": acc[arm]}
    if arm != "float" and "float" in acc:
      f = np.asarray(acc["float"])
      c = stats.compare(f, a)
      within = stats.compare(a + 0.03, f)   # P(binary + 3 points > float)
      summary[arm]["gap_to_float_points"] = float(100 * (f.mean() - a.mean()))
      summary[arm]["float_better"] = c._asdict()
      summary[arm]["within_3_points"] = within._asdict()
      print(f"{arm:13s} {a.mean():.4f} +- {summary[arm]['std']:.4f}  gap to float "
            f"{summary[arm]['gap_to_float_points']:+.2f} pts; float vs binary: {c}; "
            f"binary+3pts vs float: {within}")
  result = {"config": {k: v.value for k, v in flags.FLAGS.__flags.items()
                       if k in ("seeds", "epochs", "batch_size", "lr", "lr_binary", "bop_gamma",
                                "bop_threshold", "arms", "blocks", "filters")},
            "accuracy": summary, "packed_check_seed0": packed_check, "seconds": time.time() - t0,
            "jax": jax.__version__,
            "provenance": provenance.record(   # every seed's split: x_train, y_train, x_test, y_test each
                data_arrays=[a for s in range(_SEEDS.value) for a in data.load_digits(seed=s)[:4]],
                script=__file__)}
  (out / "binary_eval.json").write_text(json.dumps(result, indent=1))
  print(f"wrote {out / 'binary_eval.json'}; packed converter check: {packed_check}")


if __name__ == "__main__":
  app.run(main)
