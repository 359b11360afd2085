"""Session 45's fixes, each with a test that fails on the code before it."""

import json

from tests.test_fixes_s44_pack import RUN, _pool_child

DGC = "dgc 0.01 chain"
SAMPLE_NOW = {"base_fraction": 0.01, "min_count": 16}
SAMPLE_OLD = {"base_fraction": 0.01, "min_count": 64}


def _dgc_run(seeds, sample, arm=DGC):
  run = {**RUN, "compressors": [arm.split()[0]], "seeds": seeds,
         "accuracy": {"adam": RUN["accuracy"]["adam"], arm: [0.88, 0.9]},
         "bytes_per_worker": {"adam": [1.0, 1.0], arm: [0.2, 0.2]}}
  return {**run, "dgc_default_sample": sample} if sample is not None else run


def test_pools_refuse_dgc_runs_trained_with_another_default_sample(tmp_path):
  """A pool put DGC runs of two default samples (min_count 16 and 64: both are in experiments/results/) together as
  one setting's seeds, silently; now a ValueError names both samples. Runs without the record (older) and Top-k
  arms are not compared."""
  cases = {"other": (SAMPLE_NOW, SAMPLE_OLD, DGC), "same": (SAMPLE_NOW, SAMPLE_NOW, DGC),
           "unrecorded": (SAMPLE_NOW, None, DGC), "topk": (SAMPLE_NOW, SAMPLE_OLD, "topk 0.01 chain")}
  for name, (a, b, arm) in cases.items():
    for D in ("mnist1d", "digits"):
      (tmp_path / f"{name}_{D}_a.json").write_text(json.dumps({**_dgc_run([0, 1], a, arm), "dataset": D}))
      (tmp_path / f"{name}_{D}_b.json").write_text(json.dumps({**_dgc_run([2, 3], b, arm), "dataset": D}))
  r = _pool_child(f"""
      cap.R = {str(tmp_path) + '/'!r}
      for name, arm in {[(n, c[2]) for n, c in cases.items()]!r}:
        cap.POOLS[name] = (arm, [name + "_{{D}}_a.json", name + "_{{D}}_b.json"], name + "_out.json")
        try:
          cap.pool(name)
          print(name, "POOLED")
        except ValueError as e:
          print(name, "REFUSED", e)
      """)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.split() and ln.split()[0] in cases}
  assert "REFUSED" in lines["other"] and "other_mnist1d_b.json" in lines["other"], r.stdout
  assert "'min_count': 64" in lines["other"] and "'min_count': 16" in lines["other"], r.stdout
  for name in ("same", "unrecorded", "topk"):
    assert "POOLED" in lines[name], r.stdout
