"""Session 21 diagnostic: does the 0.1% recipe's gap to Adam early in training predict its final gap, seed by seed?

Reads compressed_adam_mnist1d_600_0.001_s21_recipe_curves_seeds100-129.json (the recipe with Top-k and Adam, test
accuracy every 50 steps, seeds 100-129) and writes ..._analysis.json next to it: for every evaluation step, the
mean paired gap (recipe - Adam) and its Pearson and Spearman correlations with the final gap over the seeds.

    python3 experiments/results/compressed_adam_s21_curves_analysis.py
"""

import json
import pathlib

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
NAME = "compressed_adam_mnist1d_600_0.001_s21_recipe_curves_seeds100-129"
ARM = "topk 0.001 rmsfrom@1 dwarmup300 start0.01"


def _ranks(v):
  order = np.argsort(v, kind="stable")
  r = np.empty(len(v))
  r[order] = np.arange(len(v))
  for val in np.unique(v):            # average ranks for ties
    m = v == val
    r[m] = r[m].mean()
  return r


def main():
  d = json.loads((HERE / f"{NAME}.json").read_text())
  adam = np.array([[a for _, a in c] for c in d["curve"]["adam"]])      # (seeds, evals)
  rec = np.array([[a for _, a in c] for c in d["curve"][ARM]])
  steps = [s for s, _ in d["curve"]["adam"][0]]
  gap = 100 * (rec - adam)                                               # points
  final = gap[:, -1]
  rows = []
  for j, s in enumerate(steps):
    g = gap[:, j]
    pear = float(np.corrcoef(g, final)[0, 1]) if g.std() > 0 else float("nan")
    spear = float(np.corrcoef(_ranks(g), _ranks(final))[0, 1]) if g.std() > 0 else float("nan")
    rows.append({"step": s, "mean_gap_pt": float(g.mean()), "median_gap_pt": float(np.median(g)),
                 "pearson_with_final": pear, "spearman_with_final": spear})
    print(f"step {s:4d}: gap mean {g.mean():+6.2f} median {np.median(g):+6.2f} pt; corr with final gap "
          f"Pearson {pear:+.2f}, Spearman {spear:+.2f}")
  out = {"source": f"{NAME}.json", "seeds": d["seeds"], "steps": steps, "per_step": rows,
         "gap_pt_per_seed": gap.round(2).tolist()}
  (HERE / f"{NAME}_analysis.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
