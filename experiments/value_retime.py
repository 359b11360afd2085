"""How well a lent GPU's timing of a program repeats on another lease: the label noise under target (b) of issue 24.

Every fresh test of issue 24's target (b) scores a model trained on earlier collections against the wall times of a new
collection, timed on whichever host the device tool lent that day. How close can any predictor that does not see the
host come? This script compares one collection (``--original``) with a re-timing of the same programs on another
lease (``--retime``: ``experiments/cost_collect.py`` run again with the original's ``--seed`` and no ``--exclude`` draws
the same configurations in the same order, so most programs compile again) and reports, over the rows kept (not
flagged noisy) in both, matched by family, configuration and option variant:

* ``median_ratio``: the median of new / old (a host-wide speed difference),
* ``mape_old_as_prediction``: mean |old - new| / new, the error of "the earlier timing" as a predictor of the new one,
  with a 95% bootstrap interval over programs; ``mape_after_scale``: the same after dividing out ``median_ratio``
  (what a per-host scale, if it were known, would leave),
* the same split by runtime (< 100 us, 100 us - 1 ms, > 1 ms), by family and for library-call rows,
* each file's dispatch floor and library probe.

Usage (the JSON goes to ``--out``)::

  python3 experiments/value_retime.py --original=mlsys_jax/cost/data/h100/h100_collect_s29b.npz \\
      --retime=mlsys_jax/cost/data/h100_retime/h100_retime_s29b.npz \\
      --out=experiments/results/value_eval/value_retime_s29b.json
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mlsys_jax.cost import dataset as ds   # noqa: E402
from mlsys_jax.cost.kernel_roofline import program_kernels   # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("original", None, "the collection timed first (npz)")
flags.DEFINE_string("retime", None, "the same programs timed again on another lease (npz)")
flags.DEFINE_string("out", None, "JSON path for the results")
flags.DEFINE_integer("bootstrap", 2000, "bootstrap resamples over programs for the intervals")
flags.DEFINE_integer("seed", 0, "bootstrap seed")

RUNTIME_BUCKETS = ((0.0, 100e-6, "under_100us"), (100e-6, 1e-3, "100us_to_1ms"), (1e-3, np.inf, "over_1ms"))


def _rows_by_key(d: ds.CostDataset) -> dict:
  """``(family, config, variant) -> row`` of one collection (a repeated key keeps its first row)."""
  out = {}
  for i in range(len(d)):
    out.setdefault((str(d.family[i]), str(d.config[i]), str(d.variant[i])), i)
  return out


def _floors(d: ds.CostDataset) -> dict:
  m = d.meta
  t = m.get("dispatch_floor_timing_s") or {}
  lib = (m.get("library_floor_timing_s") or {}).get("conv") or {}
  us = lambda x: None if x is None else round(float(x) * 1e6, 1)   # noqa: E731
  return {"dispatch_floor_us": [us(m.get("dispatch_floor_s")), us(t.get("median")), us(m.get("dispatch_floor_end_s"))],
          "conv_probe_us": [us((m.get("library_floor_s") or {}).get("conv")), us(lib.get("median")),
                            us((m.get("library_floor_end_s") or {}).get("conv"))],
          "device": m.get("device"), "seed": m.get("seed"), "date": m.get("date")}


def _summary(old: np.ndarray, new: np.ndarray, prog: np.ndarray, scale: float, rng, n_boot: int) -> dict:
  """Errors of ``old`` as a prediction of ``new`` (and after dividing out ``scale``), with program-bootstrap CIs."""
  ape = np.abs(old - new) / new
  ape_s = np.abs(old * scale - new) / new
  out = {"rows": int(len(old)), "programs": int(len(np.unique(prog))),
         "mape_old_as_prediction": float(ape.mean()) if len(ape) else None,
         "mape_after_scale": float(ape_s.mean()) if len(ape) else None,
         "median_abs_log_ratio": float(np.median(np.abs(np.log(new / old)))) if len(ape) else None}
  if len(ape) and n_boot > 0:
    progs = np.unique(prog)
    idx = [np.flatnonzero(prog == p) for p in progs]
    boot, boot_s = [], []
    for _ in range(n_boot):
      pick = np.concatenate([idx[j] for j in rng.integers(0, len(progs), len(progs))])
      boot.append(ape[pick].mean())
      boot_s.append(ape_s[pick].mean())
    out["mape_old_as_prediction_ci95"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    out["mape_after_scale_ci95"] = [float(np.percentile(boot_s, 2.5)), float(np.percentile(boot_s, 97.5))]
  return out


def compare(original: ds.CostDataset, retime: ds.CostDataset, n_boot: int = 2000, seed: int = 0) -> dict:
  """Match the rows of two timings of the same programs and measure how the wall times repeat (module docstring).

  Raises ValueError when the two collections ran on different device kinds or share no kept row."""
  dev_o, dev_r = original.meta.get("device"), retime.meta.get("device")
  if dev_o != dev_r:
    raise ValueError(f"compare: the collections ran on different devices ({dev_o!r} and {dev_r!r}); a re-timing "
                     "must use the original's device kind.")
  ko, kr = _rows_by_key(original), _rows_by_key(retime)
  common = sorted(set(ko) & set(kr))
  kept = [k for k in common if not original.noisy[ko[k]] and not retime.noisy[kr[k]]]
  if not kept:
    raise ValueError(f"compare: no row kept (not flagged noisy) in both collections ({len(common)} rows matched by "
                     "family, config and variant): re-time with the original's --seed and without --exclude.")
  io = np.array([ko[k] for k in kept])
  ir = np.array([kr[k] for k in kept])
  old = np.asarray(original.runtime_s, np.float64)[io]
  new = np.asarray(retime.runtime_s, np.float64)[ir]
  if not (np.all(np.isfinite(old)) and np.all(np.isfinite(new)) and np.all(old > 0) and np.all(new > 0)):
    raise ValueError("compare: a matched runtime is not a positive finite number; the collection is damaged.")
  prog = np.array([f"{k[0]}:{k[1]}" for k in kept])
  ratio = new / old
  scale = float(np.median(ratio))
  rng = np.random.default_rng(seed)
  res = {"original": _floors(original), "retime": _floors(retime),
         "programs_original": int(len(np.unique(original.group))), "programs_retime": int(len(np.unique(retime.group))),
         "programs_matched": int(len({f"{k[0]}:{k[1]}" for k in common})), "rows_matched": len(common),
         "median_ratio": scale, "ratio_quartiles": [float(q) for q in np.percentile(ratio, [25, 75])],
         "all": _summary(old, new, prog, scale, rng, n_boot)}
  part = lambda m: {**_summary(old[m], new[m], prog[m], scale, rng, 0),   # noqa: E731 (a subset, no interval)
                     "median_ratio": float(np.median(ratio[m]))}
  buckets = [(name, (old >= lo) & (old < hi)) for lo, hi, name in RUNTIME_BUCKETS]
  res["by_runtime"] = {name: part(m) for name, m in buckets if m.any()}
  fam = np.array([k[0] for k in kept])
  res["by_family"] = {f: part(fam == f) for f in sorted(set(fam))}
  # a library call as the kernel roofline counts one (a custom call among the program's kernels: cuBLAS, cuDNN, ...)
  lib = np.array([bool(np.any(program_kernels(original.hlo[i]).library)) for i in io])
  res["library_call_rows"] = {name: part(m) if m.any() else None
                              for name, m in (("with_library_call", lib), ("without", ~lib))}
  return res


def main(argv):
  del argv
  if not (FLAGS.original and FLAGS.retime and FLAGS.out):
    raise app.UsageError("--original, --retime and --out are required.")
  res = compare(ds.load_dataset(FLAGS.original), ds.load_dataset(FLAGS.retime), FLAGS.bootstrap, FLAGS.seed)
  res["files"] = {"original": os.path.relpath(FLAGS.original), "retime": os.path.relpath(FLAGS.retime)}
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(res, f, indent=1)
  a = res["all"]
  print(f"{res['programs_matched']} programs / {res['rows_matched']} rows matched, {a['rows']} rows of "
        f"{a['programs']} programs kept in both; median new/old {res['median_ratio']:.3f} "
        f"(quartiles {res['ratio_quartiles'][0]:.3f}-{res['ratio_quartiles'][1]:.3f})")
  print(f"old timing as a prediction of the new: MAPE {a['mape_old_as_prediction']:.3f} "
        f"{[round(x, 3) for x in a.get('mape_old_as_prediction_ci95', [])]}; after the median scale "
        f"{a['mape_after_scale']:.3f} {[round(x, 3) for x in a.get('mape_after_scale_ci95', [])]}")
  for name, v in res["by_runtime"].items():
    print(f"  {name:14s} rows {v['rows']:4d}  MAPE {v['mape_old_as_prediction']:.3f}  after scale "
          f"{v['mape_after_scale']:.3f}  median ratio {v['median_ratio']:.3f}")
  for name, v in res["library_call_rows"].items():
    if v:
      print(f"  {name:18s} rows {v['rows']:4d}  MAPE {v['mape_old_as_prediction']:.3f}  median ratio "
            f"{v['median_ratio']:.3f}")
  print(f"floors (us) original {res['original']['dispatch_floor_us']}, retime {res['retime']['dispatch_floor_us']}")
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
