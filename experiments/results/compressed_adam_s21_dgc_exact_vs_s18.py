"""Session 21: dgc(exact=True) in the 0.1% recipe (mnist1d, seeds 100-129, this run) paired with session 18's
dgc (default, 2k payload slots) on the same seeds. Session 21's Adam and Top-k accuracies equal session 18's seed
for seed (checked here), so the arms are paired as if run together. Writes
compressed_adam_mnist1d_600_0.001_s21_dgc_exact_vs_s18.json next to this script.

    python3 experiments/results/compressed_adam_s21_dgc_exact_vs_s18.py
"""

import json
import pathlib

import numpy as np

from mlsys_jax import stats

HERE = pathlib.Path(__file__).resolve().parent
ARM = " 0.001 rmsfrom@1 dwarmup300 start0.01"


def compare(a, b):
  diff = np.asarray(a) - np.asarray(b)
  boot = np.random.default_rng(0).choice(diff, (2000, len(diff))).mean(1)   # as compressed_adam.py's _compare
  lo, hi = np.quantile(boot, [0.025, 0.975])
  c = stats.compare(a, b)
  return {**c._asdict(), "mean_diff": float(diff.mean()), "mean_diff_ci95": [float(lo), float(hi)]}


def main():
  s21 = json.loads((HERE / "compressed_adam_mnist1d_600_0.001_s21_dgc_exact_seeds100-129.json").read_text())
  s18 = [json.loads((HERE / f"compressed_adam_mnist1d_600_0.001_s18_recipe_seeds{r}.json").read_text())
         for r in ("100-114", "115-129")]
  acc18 = {k: s18[0]["accuracy"][k] + s18[1]["accuracy"][k] for k in s18[0]["accuracy"]}
  assert s21["seeds"] == s18[0]["seeds"] + s18[1]["seeds"] == list(range(100, 130))
  for k in ("adam", "topk" + ARM):
    if s21["accuracy"][k] != acc18[k]:
      raise SystemExit(f"{k}: session 21's accuracies differ from session 18's; the arms are not paired")
  acc = {"adam": acc18["adam"], "topk" + ARM: acc18["topk" + ARM], "dgc" + ARM: acc18["dgc" + ARM],
         "dgc_exact" + ARM: s21["accuracy"]["dgc_exact" + ARM]}
  pairs = [("dgc_exact", "adam"), ("dgc", "adam"), ("topk", "adam"), ("dgc_exact", "dgc"), ("dgc_exact", "topk")]
  out = {"seeds": s21["seeds"], "accuracy": acc,
         "mb_per_worker": {"dgc_exact" + ARM: s21["bytes_per_worker"]["dgc_exact" + ARM][0] / 1e6,
                           "dgc" + ARM: s18[0]["bytes_per_worker"]["dgc" + ARM][0] / 1e6},
         "comparisons": {}}
  for a, b in pairs:
    ka, kb = (a + ARM if a != "adam" else a), (b + ARM if b != "adam" else b)
    c = out["comparisons"][f"{ka} vs {kb}"] = compare(acc[ka], acc[kb])
    print(f"{a} vs {b}: {100 * c['mean_diff']:+.2f} pt [{100 * c['mean_diff_ci95'][0]:+.2f}, "
          f"{100 * c['mean_diff_ci95'][1]:+.2f}]; P(A>B) {c['p']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]")
  (HERE / "compressed_adam_mnist1d_600_0.001_s21_dgc_exact_vs_s18.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
