"""Pool the three 5-seed sets (0-4, 5-9, 10-14) of the 0.1% Top-k recipe run on the session-8 code."""
import json, sys
import numpy as np
sys.path.insert(0, "experiments")
from compressed_adam import _compare
R = "experiments/results/"
KEY = "topk 0.001 rmsfrom@1 dwarmup300 start0.01"
out = {}
for D in ("mnist1d", "digits"):
  files = [f"compressed_adam_{D}_600_0.001_rmsfrom1_dw300_dgc_sample_ref.json",
           f"compressed_adam_{D}_600_0.001_rmsfrom1_dw300_s8_seeds5-9.json",
           f"compressed_adam_{D}_600_0.001_rmsfrom1_dw300_s8_seeds10-14.json"]
  runs = [json.load(open(R + f)) for f in files]
  A = sum([r["accuracy"]["adam"] for r in runs], [])
  T = sum([r["accuracy"][KEY] for r in runs], [])
  seeds = sum([r["seeds"] for r in runs], [])
  c = _compare(T, A)
  sets = [_compare(r["accuracy"][KEY], r["accuracy"]["adam"])["mean_diff"] for r in runs]
  out[D] = {"files": files, "seeds": seeds, "adam": A, "topk": T, "pooled_vs_adam": c, "per_set_mean_diff": sets,
            "mb_per_worker": runs[1]["bytes_per_worker"]}
  print(D, seeds, "pooled %+.2f [%+.2f, %+.2f]" % (100 * c["mean_diff"], 100 * c["mean_diff_ci95"][0],
        100 * c["mean_diff_ci95"][1]), "sets", ["%+.2f" % (100 * s) for s in sets], "P", c["p"])
json.dump(out, open(R + "compressed_adam_0.001_rmsfrom1_dw300_topk_s8_pooled15.json", "w"), indent=1)
