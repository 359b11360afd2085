"""Pool the 1% plain-chain runs of session 9 (seeds 0-4 and 5-14; `chain(topk(0.01), adam)`, which sends SIDCo's
default set) into one 15-seed comparison per data set. Run from the repository root."""
import json, sys
sys.path.insert(0, "experiments")
from compressed_adam import _compare
from provenance import check_same_data
R = "experiments/results/"
KEY = "topk 0.01 chain"
out = {}
for D in ("mnist1d", "digits"):
  files = [f"compressed_adam_{D}_600_0.01_s9_topk_chain_seeds0-4.json",
           f"compressed_adam_{D}_600_0.01_s9_topk_chain_seeds5-14.json"]
  runs = [json.load(open(R + f)) for f in files]
  assert check_same_data(runs[0], runs[1], tuple(files))  # raises on different data; False: no digest to compare
  assert not set(runs[0]["seeds"]) & set(runs[1]["seeds"]), "seed sets overlap"
  A = sum([r["accuracy"]["adam"] for r in runs], [])
  T = sum([r["accuracy"][KEY] for r in runs], [])
  seeds = sum([r["seeds"] for r in runs], [])
  c = _compare(T, A)
  sets = [_compare(r["accuracy"][KEY], r["accuracy"]["adam"])["mean_diff"] for r in runs]
  out[D] = {"files": files, "seeds": seeds, "adam": A, "topk": T, "pooled_vs_adam": c, "per_set_mean_diff": sets,
            "mb_per_worker": runs[0]["bytes_per_worker"], "provenance": runs[0].get("provenance")}
  print(D, seeds, "pooled %+.2f [%+.2f, %+.2f]" % (100 * c["mean_diff"], 100 * c["mean_diff_ci95"][0],
        100 * c["mean_diff_ci95"][1]), "sets", ["%+.2f" % (100 * s) for s in sets], "P", c["p"],
        "adam %.2f topk %.2f" % (100 * sum(A) / len(A), 100 * sum(T) / len(T)))
json.dump(out, open(R + "compressed_adam_0.01_chain_topk_s9_pooled15.json", "w"), indent=1)
