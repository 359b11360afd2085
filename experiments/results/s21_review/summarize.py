import json, statistics as S, sys, glob
rows = {}
pre = sys.argv[1]
for lab in ("base", "head"):
  for f in sorted(glob.glob(f"{pre}_{lab}_*.json")):
    d = json.load(open(f))
    for k, v in d.get("dp", {}).items(): rows.setdefault(("dp_s", k), {}).setdefault(lab, []).extend(v["seconds"])
    for k, v in d.get("value", {}).items():
      rows.setdefault(("greedy_s", k), {}).setdefault(lab, []).extend(v["greedy_s"])
      rows.setdefault(("rollouts10_s", k), {}).setdefault(lab, []).extend(v["rollouts10_s"])
    for k, v in d.get("micro_us_per_call", {}).items(): rows.setdefault(("micro_us", k), {}).setdefault(lab, []).extend(v["runs"])
out = {}
for k, v in rows.items():
  b, h = S.median(v["base"]), S.median(v["head"])
  out[f"{k[0]}:{k[1]}"] = {"base_median": b, "head_median": h, "head_over_base": h / b, "n_base": len(v["base"]), "n_head": len(v["head"])}
  print(f"{k[0]:12s} {k[1]:30s} base {b:.6g} head {h:.6g} ratio {h/b:.3f}")
if len(sys.argv) > 2: json.dump(out, open(sys.argv[2], "w"), indent=1)
