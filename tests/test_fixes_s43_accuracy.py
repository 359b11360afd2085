"""Review fixes (session 43) of the accuracy pipeline of experiments/compressed_adam.py (issue 18).

Each check runs in a child process: the script's absl flags (--steps, --lr, ...) would collide with other
experiment modules' flags in a shared pytest worker."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

RUN = {"dataset": "digits", "steps": 600, "workers": 8, "batch": 32, "lr": 0.001, "per_tensor": False,
       "residual_decay": 1.0, "seeds": [0, 1], "compressors": ["topk"],
       "accuracy": {"adam": [0.9, 0.91], "topk 0.01 chain": [0.89, 0.9]},
       "bytes_per_worker": {"adam": [1.0, 1.0], "topk 0.01 chain": [0.1, 0.1]}}


def _child(code: str, flags: list) -> subprocess.CompletedProcess:
  prog = textwrap.dedent("""
      import sys
      sys.path.insert(0, "experiments")
      from absl import flags
      import compressed_adam as ca
      flags.FLAGS(["x"] + ARGV)
      """).replace("ARGV", repr(flags)) + textwrap.dedent(code)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, timeout=300,
                        cwd=ROOT)


_FAKE_DS = """
import numpy as np
ds = type("DS", (), {"name": "digits", "x_train": np.zeros(2), "y_train": np.zeros(2), "x_test": np.zeros(2),
                     "y_test": np.zeros(2)})()
try:
  print("ACCEPTED", ca._adam_from(PATH, ds, [0, 1]))
except ValueError as e:
  print("REFUSED", e)
"""


def test_adam_from_a_pooled_json_checks_the_pooled_runs_settings(tmp_path):
  # a pooled entry (compressed_adam_pool.py) records no steps: the steps check used to be skipped, so Adam of
  # 600-step runs was paired with a 300-step arm
  (tmp_path / "run.json").write_text(json.dumps(RUN))
  pooled = {"digits": {"files": ["run.json"], "seeds": [0, 1], "adam": [0.9, 0.91],
                       "mb_per_worker": {"adam": [1.0, 1.0]}}}
  (tmp_path / "pooled.json").write_text(json.dumps(pooled))
  p = _child(_FAKE_DS.replace("PATH", repr(str(tmp_path / "pooled.json"))), ["--steps=300"])
  assert p.returncode == 0, p.stderr[-3000:]
  assert "REFUSED" in p.stdout and "steps=600" in p.stdout and "this run: 300" in p.stdout, p.stdout
  # the same settings are accepted, with the pooled Adam accuracies by seed
  p = _child(_FAKE_DS.replace("PATH", repr(str(tmp_path / "pooled.json"))), ["--steps=600"])
  assert "ACCEPTED ([0.9, 0.91], [1.0, 1.0])" in p.stdout, p.stdout + p.stderr[-3000:]


def test_adam_from_checks_lr_batch_and_workers(tmp_path):
  # only the steps were checked: Adam trained with another learning rate / batch / worker count was accepted
  (tmp_path / "run.json").write_text(json.dumps({**RUN, "lr": 0.01}))
  p = _child(_FAKE_DS.replace("PATH", repr(str(tmp_path / "run.json"))), ["--steps=600", "--lr=0.001"])
  assert "REFUSED" in p.stdout and "lr=0.01" in p.stdout, p.stdout + p.stderr[-3000:]
  (tmp_path / "run.json").write_text(json.dumps({**RUN, "batch": 16, "workers": 4}))
  p = _child(_FAKE_DS.replace("PATH", repr(str(tmp_path / "run.json"))), ["--steps=600"])
  assert "REFUSED" in p.stdout and "batch=16" in p.stdout and "workers=4" in p.stdout, p.stdout + p.stderr[-3000:]


def test_merge_refuses_runs_with_settings_outside_the_arm_names(tmp_path):
  # --per_tensor / --residual_decay are not in the arm names: merged under the first run's settings, a
  # per-tensor, decayed arm was labelled per_tensor=False, residual_decay=1 and compared with Top-k as if alike
  other = {**RUN, "per_tensor": True, "residual_decay": 0.99, "compressors": ["sidco"],
           "accuracy": {"adam": RUN["accuracy"]["adam"], "sidco 0.01 chain": [0.8, 0.8]},
           "bytes_per_worker": {"adam": [1.0, 1.0], "sidco 0.01 chain": [0.1, 0.1]}}
  (tmp_path / "a.json").write_text(json.dumps(RUN))
  (tmp_path / "b.json").write_text(json.dumps(other))
  (tmp_path / "c.json").write_text(json.dumps({**other, "per_tensor": False, "residual_decay": 1.0}))
  code = """
  try:
    ca.merge([A, B], OUT)
    print("MERGED")
  except ValueError as e:
    print("REFUSED", e)
  """
  paths = {k: repr(str(tmp_path / f)) for k, f in (("A", "a.json"), ("B", "b.json"), ("C", "c.json"),
                                                    ("OUT", "m.json"))}
  p = _child(code.replace("A,", paths["A"] + ",").replace("B]", paths["B"] + "]").replace("OUT", paths["OUT"]), [])
  assert "REFUSED" in p.stdout and "per_tensor=True" in p.stdout and "residual_decay=0.99" in p.stdout, (
      p.stdout + p.stderr[-3000:])
  assert not (tmp_path / "m.json").exists()
  # runs of the same settings still merge
  p = _child(code.replace("A,", paths["A"] + ",").replace("B]", paths["C"] + "]").replace("OUT", paths["OUT"]), [])
  assert "MERGED" in p.stdout, p.stdout + p.stderr[-3000:]
  m = json.loads((tmp_path / "m.json").read_text())
  assert sorted(m["accuracy"]) == ["adam", "sidco 0.01 chain", "topk 0.01 chain"]
