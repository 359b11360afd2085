"""sensAI (Wang et al., MLSys 2021) on small data: accuracy of the combined class-group subnets against
the original CNN over seeds, parameter and FLOP reduction per subnet, and batch-1 CPU latency.

Per seed: train the CNN; group the classes (equal-size k-means on per-class mean penultimate features);
per group, measure APoZ on the group's training images, prune, retrain the subnet one-vs-rest
(m + 1 outputs), fit its temperature on a held-out part of the training set; combine on the test set.

  python experiments/sensai_eval.py                                   # digits, 5 seeds
  python experiments/sensai_eval.py --dataset=mnist1d --seeds=5
  python experiments/sensai_eval.py --keep_fraction=0 --seeds=1       # the paper's APoZ thresholds only
  python experiments/sensai_eval.py --dataset=cifar10 --data_dir=DIR --arch=resnet20 --retrain=stacked

Writes ``<out_dir>/sensai_<dataset>[_resnet20].json`` (raw per-seed numbers, summary, the flags).
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
from mlsys_jax.infer import sensai  # noqa: E402
from benchmarks.sensai_latency import batch1_latency  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "digits", ["digits", "mnist1d", "cifar10"], "Data set (cifar10 needs "
                              "--data_dir with the binary batches; nothing is downloaded).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Folder with the CIFAR-10 binary batches.")
_ARCH = flags.DEFINE_enum("arch", "cnn", ["cnn", "resnet20"], "Original network: the library's CNN or ResNet-20 "
                          "(images only; its block-inner channels are pruned).")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds (data split, initialisation, shuffling).")
_GROUPS = flags.DEFINE_integer("groups", 5, "Number of class groups.")
_GROUPING = flags.DEFINE_enum("grouping", "kmeans", ["kmeans", "contiguous"], "How classes are grouped.")
_CHANNELS = flags.DEFINE_list("channels", ["64", "128"], "Conv channels of the original CNN.")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "Hidden dense width of the original CNN.")
_EPOCHS = flags.DEFINE_integer("epochs", 20, "Training epochs of the original model.")
_RETRAIN_EPOCHS = flags.DEFINE_integer("retrain_epochs", 15, "Retraining epochs of every subnet.")
_LR = flags.DEFINE_float("lr", 2e-3, "Adam learning rate of the original model.")
_RETRAIN_LR = flags.DEFINE_float("retrain_lr", 1e-3, "Adam learning rate of the subnets' retraining.")
_APOZ = flags.DEFINE_float("apoz_threshold", 0.73, "Prune iff APoZ > this ...")
_MEAN = flags.DEFINE_float("mean_threshold", 0.01, "... and mean |a| < this (the paper's rule).")
_KEEP = flags.DEFINE_float("keep_fraction", 0.4, "If > 0: keep this fraction of channels per layer (lowest "
                           "APoZ first) instead of the thresholds (a FLOP budget; beyond the paper).")
_MULTIPLE = flags.DEFINE_integer("multiple_of", 0, "If > 0: round every layer's kept channels to a multiple of "
                                 "this (8 / 16: the float32 lanes of AVX2 / AVX-512; prune_masks(multiple_of=...)).")
_RETRAIN = flags.DEFINE_enum("retrain", "separate", ["separate", "stacked"], "Retrain each subnet in its own "
                             "loop (retrain_subnet) or all at once as one vmapped program (retrain_subnets).")
_HOLDOUT = flags.DEFINE_float("holdout", 0.15, "Fraction of the training set held out for temperatures.")
_LATENCY_REPEATS = flags.DEFINE_integer("latency_repeats", 200, "Interleaved timing rounds (seed 0 only).")
_SUFFIX = flags.DEFINE_string("suffix", "", "Suffix of the JSON name (e.g. _keep03_m8).")
_OUT_DIR = flags.DEFINE_string("out_dir", "experiments/results", "Output directory.")


def _split_holdout(ds: data.Dataset, frac: float, seed: int):
  perm = np.random.default_rng(seed + 7).permutation(len(ds.x_train))
  n = int(round(frac * len(perm)))
  ho, tr = perm[:n], perm[n:]
  return ds._replace(x_train=ds.x_train[tr], y_train=ds.y_train[tr]), ds.x_train[ho], ds.y_train[ho]


def _model(ds):
  if _ARCH.value == "resnet20":
    if len(ds.input_shape) != 3:
      raise ValueError("--arch=resnet20 needs images (digits or cifar10).")
    return models.ResNet20(num_classes=ds.num_classes)
  chans = tuple(int(c) for c in _CHANNELS.value)
  if ds.name == "mnist1d":
    return models.CNN(num_classes=ds.num_classes, channels=chans, hidden=_HIDDEN.value, dims=1, kernel_size=5)
  return models.CNN(num_classes=ds.num_classes, channels=chans, hidden=_HIDDEN.value)


def run_seed(seed: int, timing: bool) -> dict:
  ds = data.load_dataset(_DATASET.value, seed=seed, data_dir=_DATA_DIR.value or None)
  train, x_ho, y_ho = _split_holdout(ds, _HOLDOUT.value, seed)
  model = _model(ds)
  t0 = time.perf_counter()
  variables, _ = models.train_classifier(model, train, optax.adam(_LR.value), epochs=_EPOCHS.value, seed=seed)
  acc_orig = models.evaluate(model, variables, ds.x_test, ds.y_test)
  print(f"[seed {seed}] original: test accuracy {acc_orig:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)

  if _GROUPING.value == "kmeans":
    feats = sensai.penultimate_features(model, variables, train.x_train)
    groups = sensai.group_classes(feats, train.y_train, _GROUPS.value, seed=42)
  else:
    groups = sensai.group_classes_contiguous(ds.num_classes, _GROUPS.value)
  print(f"[seed {seed}] groups {groups}", flush=True)

  shape = ds.input_shape
  flops0 = sensai.count_flops(model, variables, shape)
  params0 = sensai.count_params(variables)
  subnets, per_group = [], []
  for g in groups:
    xg = train.x_train[np.isin(train.y_train, g)]
    st = sensai.channel_stats(model, variables, xg)
    masks = sensai.prune_masks(st, apoz_threshold=_APOZ.value, mean_threshold=_MEAN.value,
                               keep_fraction=_KEEP.value if _KEEP.value > 0 else None,
                               multiple_of=_MULTIPLE.value or None)
    paper_masks = sensai.prune_masks(st, apoz_threshold=_APOZ.value, mean_threshold=_MEAN.value)
    subnets.append(sensai.make_subnet(model, variables, g, masks))
    per_group.append({"classes": list(g), "widths": {k: int(m.sum()) for k, m in masks.items()},
                      "paper_rule_widths": {k: int(m.sum()) for k, m in paper_masks.items()},
                      "full_widths": {k: int(m.size) for k, m in masks.items()}})
  t0 = time.perf_counter()
  tx = optax.adam(_RETRAIN_LR.value)
  if _RETRAIN.value == "stacked":
    subnets, hist = sensai.retrain_subnets(subnets, train, tx, epochs=_RETRAIN_EPOCHS.value, seed=seed)
    group_acc = [float(a) for a in hist["test_accuracy"][-1]]
  else:
    trained = [sensai.retrain_subnet(s, train, tx, epochs=_RETRAIN_EPOCHS.value, seed=seed) for s in subnets]
    subnets = [t[0] for t in trained]
    group_acc = [t[1]["test_accuracy"][-1] for t in trained]
  print(f"[seed {seed}] retrained {len(subnets)} subnets ({_RETRAIN.value}) in {time.perf_counter() - t0:.0f}s",
        flush=True)
  temps = []
  for sub, info, acc in zip(subnets, per_group, group_acc):
    t = sensai.calibrate_temperature(sensai.subnet_predict(sub, x_ho), sensai.relabel(y_ho, sub.classes))
    temps.append(t)
    info.update({"params": sensai.count_params(sub.variables),
                 "flops": sensai.count_flops(sub.model, sub.variables, shape),
                 "group_task_test_accuracy": acc, "temperature": t})
    print(f"[seed {seed}] group {sub.classes}: widths {info['widths']} (paper rule would keep "
          f"{info['paper_rule_widths']}), FLOPs {info['flops'] / flops0:.3f} of the original, "
          f"group-task acc {acc:.4f}, T={t:.2f}", flush=True)

  classes = [s.classes for s in subnets]
  logits = [sensai.subnet_predict(s, ds.x_test) for s in subnets]
  acc_plain = float(np.mean(np.argmax(sensai.combine(logits, classes, ds.num_classes), -1) == ds.y_test))
  acc_cal = float(np.mean(np.argmax(sensai.combine(logits, classes, ds.num_classes, temps), -1) == ds.y_test))
  joint = sensai.calibrate_temperatures_joint([sensai.subnet_predict(s, x_ho) for s in subnets], classes, y_ho,
                                              ds.num_classes)
  acc_joint = float(np.mean(np.argmax(sensai.combine(logits, classes, ds.num_classes, joint), -1) == ds.y_test))
  ens = sensai.stack_subnets(subnets, ds.num_classes, temps)
  probs = np.asarray(sensai.ensemble_predict(ens, ds.x_test))
  acc_ens = float(np.mean(np.argmax(probs, -1) == ds.y_test))
  print(f"[seed {seed}] combined accuracy: {acc_cal:.4f} calibrated per subnet, {acc_joint:.4f} calibrated "
        f"jointly (T={np.round(joint, 2).tolist()}), {acc_plain:.4f} uncalibrated, vmapped ensemble {acc_ens:.4f}; "
        f"original {acc_orig:.4f}", flush=True)
  res = {"seed": seed, "groups": [list(g) for g in groups], "original_accuracy": acc_orig,
         "combined_accuracy": acc_cal, "combined_accuracy_uncalibrated": acc_plain,
         "combined_accuracy_joint": acc_joint, "joint_temperatures": joint.tolist(),
         "ensemble_accuracy": acc_ens, "original_params": params0, "original_flops": flops0,
         "subnets": per_group}
  if timing:
    x1 = jnp.asarray(ds.x_test[:1])
    apply = lambda m: (lambda v, x: m.apply(v, x))
    entries = {"original": (apply(model), variables)}
    for i, s in enumerate(subnets):
      entries[f"subnet_{i}"] = (apply(s.model), s.variables)
    entries["vmapped_ensemble"] = (lambda v, x: sensai._ensemble_predict(ens.model, v, ens.valid, ens.assign,
                                                                         ens.temperatures, x), ens.variables)
    branches = sensai.make_branch_predictor(subnets, ds.num_classes, temps)
    entries["branch_ensemble"] = (branches.func, branches.args[0])
    res["latency"] = batch1_latency(entries, x1, repeats=_LATENCY_REPEATS.value)
    for k, v in res["latency"].items():
      print(f"[seed {seed}] batch-1 latency {k}: per call {v['call_s'] * 1e6:.0f} us vs original "
            f"{v['call_baseline_s'] * 1e6:.0f} us ({v['call_speedup']:.2f}x); in a jitted loop "
            f"{v['loop_s'] * 1e6:.1f} us vs {v['loop_baseline_s'] * 1e6:.1f} us ({v['loop_speedup']:.2f}x)",
            flush=True)
  return res


def _diff_summary(comb, orig) -> dict:
  """Mean combined - original accuracy over paired seeds, its range and a bootstrap 95% interval."""
  diff = np.asarray(comb) - np.asarray(orig)
  rng = np.random.default_rng(0)
  boots = diff[rng.integers(0, len(diff), size=(4000, len(diff)))].mean(1)
  out = {"mean": float(np.mean(comb)), "diff_mean": float(diff.mean()), "diff_min": float(diff.min()),
         "diff_max": float(diff.max()),
         "diff_ci95": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]}
  if len(diff) >= 2:
    c = stats.compare(comb, orig)
    out.update({"p_beats_original": c.p, "p_ci": [c.ci_low, c.ci_high], "verdict": c.verdict})
  return out


def summarize(runs: list[dict]) -> dict:
  orig = [r["original_accuracy"] for r in runs]
  summary = {"seeds": len(runs), "original_accuracy_mean": float(np.mean(orig))}
  for key, name in (("combined_accuracy_uncalibrated", "uncalibrated"),
                    ("combined_accuracy", "per_subnet_temperature"),
                    ("combined_accuracy_joint", "joint_temperature")):
    if key in runs[0]:
      summary[name] = _diff_summary([r[key] for r in runs], orig)
  fr = [s["flops"] / r["original_flops"] for r in runs for s in r["subnets"]]
  summary.update({"flop_fraction_max": float(max(fr)), "flop_fraction_mean": float(np.mean(fr)),
                  "param_fraction_max": float(max(s["params"] / r["original_params"] for r in runs
                                                  for s in r["subnets"]))})
  if "latency" in runs[0]:
    lat = runs[0]["latency"]
    subs = [v for k, v in lat.items() if k.startswith("subnet_")]
    summary["subnet_call_speedup_min"] = min(v["call_speedup"] for v in subs)
    summary["subnet_loop_speedup_min"] = min(v["loop_speedup"] for v in subs)
    summary["ensemble_call_speedup"] = lat["vmapped_ensemble"]["call_speedup"]
    summary["ensemble_loop_speedup"] = lat["vmapped_ensemble"]["loop_speedup"]
    if "branch_ensemble" in lat:
      summary["branch_ensemble_call_speedup"] = lat["branch_ensemble"]["call_speedup"]
      summary["branch_ensemble_loop_speedup"] = lat["branch_ensemble"]["loop_speedup"]
  return summary


def main(argv):
  del argv
  runs = [run_seed(s, timing=(s == 0)) for s in range(_SEEDS.value)]
  summary = summarize(runs)
  print(json.dumps(summary, indent=1))
  out = pathlib.Path(_OUT_DIR.value)
  out.mkdir(parents=True, exist_ok=True)
  payload = {"flags": {f.name: f.value for f in flags.FLAGS.get_key_flags_for_module(sys.argv[0])},
             "jax": jax.__version__, "device": jax.devices()[0].platform, "summary": summary, "runs": runs,
             "provenance": provenance.record(   # every seed's split: x_train, y_train, x_test, y_test each
                 data_arrays=[a for s in range(_SEEDS.value) for a in data.load_dataset(
                     _DATASET.value, seed=s, data_dir=_DATA_DIR.value or None)[:4]],
                 script=__file__, code=("mlsys_jax", "benchmarks/*.py"))}
  path = out / f"sensai_{_DATASET.value}{'' if _ARCH.value == 'cnn' else '_' + _ARCH.value}{_SUFFIX.value}.json"
  path.write_text(json.dumps(payload, indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
