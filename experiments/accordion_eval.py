"""ACCORDION vs static compression: data-parallel training of the CNN on mnist1d with 8 simulated workers
(mapped with jax.vmap and an axis name, as in sidco_eval.py), momentum SGD with a step learning-rate
decay (so that critical regimes exist after the start and after each decay). For each compressor:
static low compression, static high compression and ACCORDION switching between the two per layer;
several seeds; final test accuracy, bytes each worker sent, and a PNG of the level every layer used
over time.

  python experiments/accordion_eval.py                               # PowerSGD rank 4 vs 1, Top-k 10% vs 1%
  python experiments/accordion_eval.py --compressors=powersgd --seeds=5
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
from mlsys_jax.comm import accordion, powersgd, topk  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "mnist1d", ["mnist1d", "digits"], "Data set.")
_COMPRESSORS = flags.DEFINE_list("compressors", ["powersgd", "topk"], "Underlying compressors.")
_RANKS = flags.DEFINE_list("ranks", ["4", "1"], "PowerSGD ranks: low compression, high compression.")
_DENSITIES = flags.DEFINE_list("densities", ["0.1", "0.01"], "Top-k densities: low, high compression.")
_EPOCHS = flags.DEFINE_integer("epochs", 60, "Training epochs.")
_DECAY = flags.DEFINE_list("decay_epochs", ["30", "45"], "Epochs at which the learning rate drops 10x.")
_LR = flags.DEFINE_float("lr", 0.05, "Initial learning rate (momentum SGD, 0.9).")
_INTERVAL = flags.DEFINE_integer("interval_epochs", 2, "Epochs between ACCORDION decisions.")
_ETA = flags.DEFINE_float("eta", 0.5, "ACCORDION's detector threshold.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size per worker.")
_WORKERS = flags.DEFINE_integer("workers", 8, "Simulated data-parallel workers.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per configuration.")
_ONLY = flags.DEFINE_string("only", "", "Run only configurations whose name contains this (probing).")
_OUT = flags.DEFINE_string("out", "experiments/results/accordion_mnist1d", "Output path prefix "
                           "(.json and .png are appended).")


def _setup():
  ds = data.load_dataset(_DATASET.value, seed=0)
  model = (models.CNN(dims=1, kernel_size=5, channels=(32, 64)) if ds.name == "mnist1d"
           else models.CNN(channels=(32, 64)))
  return ds, model


def make_step(model, compressor, schedule):
  """The optimizer and the jitted data-parallel step of one configuration, built once and shared by its
  seeds (one compilation per configuration)."""
  tx = optax.chain(compressor, optax.sgd(schedule, momentum=0.9))
  return tx, models.make_simulated_data_parallel_step(model, tx, axis_name="d")


def train(ds, model, tx, step, steps, seed, record_levels=False):
  """Data-parallel training with ``(tx, step)`` from :func:`make_step`; returns (accuracy, bytes one
  worker sent, per-step level record)."""
  workers, b = _WORKERS.value, _BATCH.value
  params = model.init(jax.random.PRNGKey(seed), ds.x_train[:2])["params"]
  state = models.replicate(tx.init(params), workers)

  rng = np.random.default_rng(seed)
  levels = []
  for _ in range(steps):
    idx = rng.choice(len(ds.x_train), workers * b, replace=False)
    xb = ds.x_train[idx].reshape(workers, b, *ds.x_train.shape[1:])
    yb = ds.y_train[idx].reshape(workers, b)
    params, state = step(params, state, xb, yb)
    if record_levels:
      levels.append(state[0].critical[0])
  acc = models.evaluate(model, {"params": params}, ds.x_test, ds.y_test)
  sent = float(np.asarray(state[0].total_bytes)[0])
  levels = np.asarray(jnp.stack(levels)) if levels else None
  return acc, sent, levels


def _plot(path, records, names, steps_per_epoch, decay_epochs, interval):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(records), 1, figsize=(9, 1.0 + 0.35 * len(names) * len(records)),
                           squeeze=False)
  for ax, (title, lv) in zip(axes[:, 0], records.items()):
    ax.imshow(lv.T.astype(float), aspect="auto", cmap="RdYlGn_r", vmin=0, vmax=1, interpolation="nearest",
              extent=(0, lv.shape[0] / steps_per_epoch, len(names) - 0.5, -0.5))
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    for e in decay_epochs:
      ax.axvline(e, color="k", ls="--", lw=1)
    for e in np.arange(interval, lv.shape[0] / steps_per_epoch + 1e-9, interval):
      ax.axvline(e, color="gray", ls=":", lw=0.6)
    ax.set_title(f"{title}: red = low compression (critical), green = high compression; "
                 "dashed = lr decay, dotted = decisions", fontsize=8)
  axes[-1, 0].set_xlabel("epoch")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  ds, model = _setup()
  workers, b = _WORKERS.value, _BATCH.value
  steps_per_epoch = len(ds.x_train) // (workers * b)
  steps = _EPOCHS.value * steps_per_epoch
  decay = [int(e) for e in _DECAY.value]
  schedule = optax.piecewise_constant_schedule(_LR.value, {e * steps_per_epoch: 0.1 for e in decay})
  interval = _INTERVAL.value * steps_per_epoch
  params = model.init(jax.random.PRNGKey(0), ds.x_train[:2])["params"]
  names = [jax.tree_util.keystr(p).replace("['", "").replace("']", "/").rstrip("/")
           for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f"{ds.name}: {steps} steps ({steps_per_epoch}/epoch), {workers} workers x {b}, lr decay at "
        f"epochs {decay}, decisions every {_INTERVAL.value} epochs on the last epoch's accumulated "
        f"gradient, eta {_ETA.value}; {n_params} parameters", flush=True)
  t0 = time.perf_counter()
  results, level_records = {}, {}
  for comp in _COMPRESSORS.value:
    if comp == "powersgd":
      lo, hi = (int(r) for r in _RANKS.value)
      configs = {f"PowerSGD rank {lo} (static low)": lambda: powersgd(lo, axis_name="d"),
                 f"PowerSGD rank {hi} (static high)": lambda: powersgd(hi, axis_name="d"),
                 f"ACCORDION PowerSGD {lo}/{hi}": lambda: accordion(
                     "powersgd", low=lo, high=hi, eta=_ETA.value, interval=interval,
                     accumulate=steps_per_epoch, lr_schedule=schedule, axis_name="d")}
    elif comp == "topk":
      lo, hi = (float(r) for r in _DENSITIES.value)
      configs = {f"Top-k {lo:g} (static low)": lambda: topk(lo, axis_name="d", per_tensor=True),
                 f"Top-k {hi:g} (static high)": lambda: topk(hi, axis_name="d", per_tensor=True),
                 f"ACCORDION Top-k {lo:g}/{hi:g}": lambda: accordion(
                     "topk", low=lo, high=hi, eta=_ETA.value, interval=interval,
                     accumulate=steps_per_epoch, lr_schedule=schedule, axis_name="d")}
    else:
      raise ValueError(f"unknown compressor {comp!r}; use powersgd or topk.")
    res = {}
    for name, make in configs.items():
      if _ONLY.value not in name:
        continue
      accs, sent, crit_frac = [], [], []
      tx, step = make_step(model, make(), schedule)
      for s in range(_SEEDS.value):
        is_acc = name.startswith("ACCORDION")
        a, nb, lv = train(ds, model, tx, step, steps, s, record_levels=is_acc)
        accs.append(a)
        sent.append(nb)
        if is_acc:
          crit_frac.append(lv.mean(0).tolist())
          if s == 0:
            level_records[name] = lv
      res[name] = {"accuracy": accs, "bytes_per_worker": sent}
      if crit_frac:
        res[name]["critical_fraction_per_layer"] = dict(zip(names, np.mean(crit_frac, 0).tolist()))
      print(f"  {name:34s} accuracy {np.mean(accs):.4f} +- {np.std(accs):.4f} {accs}  "
            f"MB/worker {np.mean(sent) / 1e6:.2f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    keys = list(res)
    if len(keys) < 3:
      results[comp] = {"runs": res}
      continue
    low, high, acc_name = keys
    vs_low = stats.compare(res[acc_name]["accuracy"], res[low]["accuracy"])
    summary = {
        "bytes_ratio_low_over_accordion": float(np.mean(res[low]["bytes_per_worker"])
                                                / np.mean(res[acc_name]["bytes_per_worker"])),
        "bytes_ratio_accordion_over_high": float(np.mean(res[acc_name]["bytes_per_worker"])
                                                 / np.mean(res[high]["bytes_per_worker"])),
        "accordion_mean_minus_low_mean": float(np.mean(res[acc_name]["accuracy"]) - np.mean(res[low]["accuracy"])),
        "low_seed_spread": [float(np.min(res[low]["accuracy"])), float(np.max(res[low]["accuracy"]))],
        "accordion_within_low_spread": bool(np.min(res[low]["accuracy"]) - 1e-9
                                            <= np.mean(res[acc_name]["accuracy"])
                                            <= np.max(res[low]["accuracy"]) + 1e-9
                                            or np.mean(res[acc_name]["accuracy"]) >= np.mean(res[low]["accuracy"])),
        "accordion_vs_low": vs_low._asdict(),
        "accordion_vs_high": stats.compare(res[acc_name]["accuracy"], res[high]["accuracy"])._asdict(),
    }
    print(f"  {comp}: low/ACCORDION bytes {summary['bytes_ratio_low_over_accordion']:.2f}x; ACCORDION - low "
          f"accuracy {summary['accordion_mean_minus_low_mean']:+.4f} (low spread {summary['low_seed_spread']}); "
          f"vs low: {vs_low}", flush=True)
    results[comp] = {"runs": res, "summary": summary}
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  payload = {"dataset": ds.name, "epochs": _EPOCHS.value, "steps": steps, "steps_per_epoch": steps_per_epoch,
             "workers": workers, "batch_per_worker": b, "lr": _LR.value, "decay_epochs": decay,
             "interval_epochs": _INTERVAL.value, "eta": _ETA.value, "seeds": _SEEDS.value,
             "dense_bytes_per_worker": 4.0 * n_params * steps, "layers": names, "results": results,
             "wall_s": time.perf_counter() - t0,
             "provenance": provenance.record(data_arrays=(ds.x_train, ds.y_train, ds.x_test, ds.y_test),
                                             script=__file__)}
  pathlib.Path(str(out) + ".json").write_text(json.dumps(payload, indent=1, default=float))
  if level_records:
    _plot(str(out) + ".png", level_records, names, steps_per_epoch, decay, _INTERVAL.value)
  print(f"wrote {out}.json / .png ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
  app.run(main)
