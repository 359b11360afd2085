"""experiments/compressed_adam.py --compare='A~B': arm names are checked before any training (a typo used to
surface only after every seed had trained), and a valid pair lands in the JSON's comparisons."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--dataset=digits", "--steps=2", "--seeds=1", "--ratios=0.01", "--modes=chain", "--compressors=topk",
        "--workers=2", "--batch=4"]


def _run(tmp_path, compare):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, str(ROOT / "experiments" / "compressed_adam.py"), *ARGS,
                         f"--compare={compare}", f"--out_dir={tmp_path}", "--out_name=r"],
                        capture_output=True, text=True, env=env, timeout=500, cwd=ROOT)


def test_compare_typo_refused_before_training(tmp_path):
  p = _run(tmp_path, "topk 0.01 chian~adam")
  assert p.returncode != 0 and "ValueError" in p.stderr and "--compare=" in p.stderr, p.stderr[-2000:]
  assert "topk 0.01 chain" in p.stderr          # the message lists the arms
  assert " seed 0 " not in p.stdout              # nothing trained
  assert not (tmp_path / "r.json").exists()


def test_compare_without_separator_refused(tmp_path):
  p = _run(tmp_path, "topk 0.01 chain")
  assert p.returncode != 0 and "pass 'A~B'" in p.stderr, p.stderr[-2000:]
  assert not (tmp_path / "r.json").exists()


def test_compare_valid_pair_in_json(tmp_path):
  p = _run(tmp_path, "adam~topk 0.01 chain")
  assert p.returncode == 0, p.stderr[-3000:]
  comps = json.loads((tmp_path / "r.json").read_text())["comparisons"]
  assert "adam vs topk 0.01 chain" in comps and "topk 0.01 chain vs adam" in comps
  c, d = comps["adam vs topk 0.01 chain"], comps["topk 0.01 chain vs adam"]
  assert abs(c["mean_diff"] + d["mean_diff"]) < 1e-12
