"""experiments/value_eval.py --part=program_mape --option_test_data (session 19): every model is fitted once
on --option_data and scored on the new files only. Two tiny collections are written here: a training file
and a test file that repeats one training graph (dropped by the merge), repeats one training program's
family and config with another graph (kept, not scored: it shares a program key), and holds three new
programs, one row of which is flagged noisy.

The script runs in a subprocess: its absl flags would collide with those of other experiment scripts that
tests import in-process."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mlsys_jax.cost import dataset as cds
from tests.test_value_s26_diagnosis import run_value_eval_flag_checks

ROOT = pathlib.Path(__file__).resolve().parents[1]

_HLO = """HloModule m{n}
%fused_add (p0: {t}[{n},{n}], p1: {t}[{n},{n}]) -> {t}[{n},{n}] {{
  %p0 = {t}[{n},{n}]{{1,0}} parameter(0)
  %p1 = {t}[{n},{n}]{{1,0}} parameter(1)
  ROOT %a = {t}[{n},{n}]{{1,0}} add(%p0, %p1)
}}
ENTRY %e (x: {t}[{n},{n}], y: {t}[{n},{n}], w: f32[{n},{n}]) -> f32[{n},{n}] {{
  %x = {t}[{n},{n}]{{1,0}} parameter(0)
  %y = {t}[{n},{n}]{{1,0}} parameter(1)
  %w = f32[{n},{n}]{{1,0}} parameter(2)
  %loop_add_fusion.0 = {t}[{n},{n}]{{1,0}} fusion(%x, %y), kind=kLoop, calls=%fused_add
  %cublas-lt-matmul.1 = (f32[{n},{n}]{{1,0}}, s8[1024]{{0}}) custom-call(%loop_add_fusion.0, %w), custom_call_target="__cublas$lt$matmul"
  ROOT %g = f32[{n},{n}]{{1,0}} get-tuple-element(%cublas-lt-matmul.1), index=0
}}
"""
_TYPES = (("f32", 4), ("bf16", 2), ("f64", 8))   # three compilations (variants) of one program: element types


def _program(group: int, n: int, config: str, noisy_variant: int = -1, default_scale: float = 1.0) -> list[dict]:
  """Three variant rows of one program of size n: runtime 20 us + matmul at 50 TFLOP/s, with profiler columns
  (the default variant's runtime times ``default_scale``)."""
  rows = []
  for v, (ty, b) in enumerate(_TYPES):
    t = (20e-6 + 2 * n ** 3 / 5e13 + 3 * b * n * n / 3e12) * (default_scale if v == 0 else 1.0)
    rows.append({"hlo": _HLO.format(n=n, t=ty), "group": group, "family": "f", "config": config,
                 "variant": "default" if v == 0 else f"v{v}", "runtime_s": t, "runtime_iqr_s": 1e-7,
                 "runtime_min_s": t, "n_inner": 10, "n_rounds": 3, "noisy": v == noisy_variant, "flops": -1.0,
                 "bytes_accessed": (3 * b + 12.0) * n * n, "transcendentals": 0.0, "compile_s": 0.1,
                 "device_span_s": 0.8 * t, "device_busy_s": 0.7 * t, "device_kernels": 2.0,
                 "kernel_times": {"loop_add_fusion_0": 3 * b * n * n / 3e12 + 1e-6,
                                  "sm90_xmma_gemm_f32f32": 2 * n ** 3 / 5e13}})
  return rows


def _write(tmp_path) -> tuple[str, str]:
  meta = {"device": "NVIDIA H200", "variants": [["default", {}], ["v1", {}], ["v2", {}]]}
  train = [r for g, n in enumerate((64, 96, 128, 192, 256, 384, 512, 768)) for r in _program(g, n, f"c{n}")]
  test = (_program(0, 64, "c64")                          # the graph of training program 0: dropped by the merge
          + _program(1, 100, "c96")                       # training program 1's config, another graph: not scored
          + _program(2, 160, "n160") + _program(3, 320, "n320", noisy_variant=2) + _program(4, 640, "n640"))
  tr, te = str(tmp_path / "train.npz"), str(tmp_path / "test.npz")
  cds.save_dataset(tr, train, meta)
  cds.save_dataset(te, test, meta)
  return tr, te


def _run(args, tmp_path, part="program_mape"):
  return subprocess.run([sys.executable, "experiments/value_eval.py", f"--part={part}", f"--out_dir={tmp_path}",
                         *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_option_test_data_fits_on_train_scores_test_only(tmp_path):
  tr, te = _write(tmp_path)
  r = _run([f"--option_data={tr}", f"--option_test_data={te}", "--kr_host_floor", "--kr_host_launch", "--kr_labels",
            "--kr_bytes_ridge=0.03", "--kr_bytes_ridge_grid=0.03", "--kr_kernel_options_grid=sort+scatter+conv+shared+huber",
            "--kr_blend", "--kr_gap_library_only", "--kr_wall_scale", "--kr_inner_folds=2", "--kr_steps=30",
            "--option_tag=_t"], tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((tmp_path / "value_program_mape_t.json").read_text())
  assert "program" not in res and "family" not in res
  td = res["dataset"]["test_data"]
  # 8 training programs; of the test file's 5, one is a graph duplicate (dropped), one shares a program key
  assert td["training_programs"] == 8 and td["test_programs"] == 4 and td["test_rows"] == 12
  assert td["test_programs_sharing_a_program_key_with_training"] == 1 and td["test_rows_not_scored_shared_key"] == 3
  assert [s["test"] for s in td["per_source"]] == [False, True]
  t = res["test_data"]
  # scored: the three new programs' rows but the noisy one (not one training row, not the shared-key program)
  src = t["per_test_source"]["test.npz"]
  assert src["rows"] == 8 and src["programs"] == 3
  assert t["per_family"]["f"]["rows"] == 8
  assert t["noisy_test_rows"]["rows"] == 1
  assert t["kendall_tau"]["kernel_roofline"]["programs"] == 2   # programs with >= 3 scored rows
  assert list(t["per_device"]) == []                             # one device: no per-device table
  for k in ("analytical", "kernel_roofline", "kernel_roofline_labels", "kernel_roofline_blend"):
    assert np.isfinite(t[f"mape_{k}"]) and 0 <= t[f"mape_{k}"] < 10, (k, t[f"mape_{k}"])
    assert t[f"mape_{k}"] == pytest.approx(src[k], rel=1e-12)
  lo, hi = t["analytical_over_kernel_roofline_ci95"]
  assert lo <= t["analytical_over_kernel_roofline"] <= hi
  assert len(t["kernel_roofline_blend_weight_chosen"]) == 1      # one outer fold: one blend weight


def test_option_test_data_refuses_bad_combinations(tmp_path):
  """Every refusal of --option_test_data, in one process (tests/test_value_s26_diagnosis.py's harness: the script's
  ``main`` raises the ValueError the command line prints); the options parts' refusals too."""
  tr, te = _write(tmp_path)
  run_value_eval_flag_checks("VE._OTEST.value == []", [
      ([f"--option_data={tr}", f"--option_test_data={te}", "--option_split=program"],
       "--option_test_data replaces the folds of --option_split"),
      ([f"--option_data={tr},{te}", f"--option_test_data={te}"], "must name distinct files"),
      ([f"--option_data={te}", f"--option_test_data={te.replace('test.npz', './test.npz')}"], "must name distinct files"),
      (["--part=options", f"--option_data={tr}", f"--option_test_data={te}", "--option_split=program"],
       "--option_test_data replaces the folds"),
      (["--part=options_nested", f"--option_data={tr}", f"--option_test_data={te}"],
       "read by --part=options and --part=program_mape only")])


def test_option_test_data_refusal_reaches_the_command_line(tmp_path):
  """One refusal through the command line: a non-zero exit and the ValueError's message on stderr."""
  tr, te = _write(tmp_path)
  r = _run([f"--option_data={tr},{te}", f"--option_test_data={te}"], tmp_path)
  assert r.returncode != 0 and "ValueError" in r.stderr and "must name distinct files" in r.stderr


def test_program_folds_report_each_data_file(tmp_path):
  """--option_split=program over two files: ``per_source`` splits the held-out rows by file (session 22: the H100
  file's rows among the folds), and the files' rows add up to every scored row."""
  tr, te = _write(tmp_path)
  r = _run([f"--option_data={tr},{te}", "--option_split=program", "--kr_steps=20", "--option_tag=_t"], tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  p = json.loads((tmp_path / "value_program_mape_t.json").read_text())["program"]
  src = p["per_source"]
  # 8 + 5 programs, one test program a graph duplicate (dropped by the merge), one noisy row
  assert set(src) == {"train.npz", "test.npz"}
  assert (src["train.npz"]["programs"], src["test.npz"]["programs"]) == (8, 4)
  assert src["train.npz"]["rows"] == 24 and src["test.npz"]["rows"] == 11
  n = sum(s["rows"] for s in src.values())
  for k in ("analytical", "kernel_roofline"):
    assert p[f"mape_{k}"] == pytest.approx(sum(s[k] * s["rows"] for s in src.values()) / n, rel=1e-9), k


def test_source_index_maps_groups_to_files():
  r = subprocess.run([sys.executable, "-c", "import sys, json, numpy as np; sys.path.insert(0, 'experiments');"
                      "import value_eval as VE\n"
                      "class D: group = np.array([0, 2, 3, 4])\n"
                      "print(json.dumps(VE._source_index(D, [{'programs_kept': 3}, {'programs_kept': 2}]).tolist()))\n"
                      "D.group = np.array([5])\n"
                      "try: VE._source_index(D, [{'programs_kept': 3}, {'programs_kept': 2}])\n"
                      "except ValueError as e: print(json.dumps(str(e)))"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout.strip().splitlines()
  assert json.loads(out[-2]) == [0, 0, 1, 1]
  assert "do not match" in json.loads(out[-1])


def test_options_part_with_test_data_scores_the_new_programs_only(tmp_path):
  """--part=options --option_test_data (session 23): one fit on the training file; the choice is scored on the
  test file's programs only, without the shared-key one; the per-device table and the family breakdown come from
  the same rows."""
  tr, te = _write(tmp_path)
  # a second test file from another device: two new programs, one whose default runs 1.3x its best variant
  te2 = str(tmp_path / "test2.npz")
  cds.save_dataset(te2, _program(0, 200, "m200") + _program(1, 450, "m450", default_scale=1.3),
                   {"device": "NVIDIA H100 80GB HBM3", "variants": [["default", {}], ["v1", {}], ["v2", {}]]})
  r = _run([f"--option_data={tr}", f"--option_test_data={te},{te2}", "--option_steps=20", "--option_ensemble=2",
            "--option_gbdt=false", "--option_tag=_t"], tmp_path, part="options")
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((tmp_path / "value_options_t.json").read_text())
  assert list(res["results"]) == ["test_data/fresh"]
  td = res["dataset"]["test_data"]
  assert td["training_programs"] == 8 and td["test_programs"] == 6
  assert td["test_programs_sharing_a_program_key_with_training"] == 1
  for target in ("measured", "pooled"):
    m = res["results"]["test_data/fresh"][target]
    assert res["results"]["test_data/fresh"]["folds"] == 1
    # the five new programs (the shared-key one and every training program are not scored)
    for k in ("value_model", "always_default", "global_option_from_training", "hybrid_top2"):
      assert m[k]["programs"] == 5, (target, k)
    assert m["hybrid_top2"]["timed_exhaustive"] == 15               # 5 programs x 3 variants
    assert m["per_family"]["f"]["value_model"]["programs"] == 5
    # always-default, recomputed from the construction: within 5% of the best except the 1.3x program
    assert m["always_default"]["within_tol"] == pytest.approx(4 / 5)
    # regret = chosen / best - 1 per program (the best is the bf16 variant: fewest bytes), mean over the five
    t = lambda n, b: 20e-6 + 2 * n ** 3 / 5e13 + 3 * b * n * n / 3e12   # noqa: E731
    regrets = [t(n, 4) / t(n, 2) - 1 for n in (160, 320, 640, 200)] + [1.3 * t(450, 4) / t(450, 2) - 1]
    assert m["always_default"]["mean_regret"] == pytest.approx(np.mean(regrets), rel=1e-6)
    dev = m["per_device"]
    assert sorted(dev) == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    assert dev["NVIDIA H200"]["always_default"]["programs"] == 3
    assert dev["NVIDIA H200"]["always_default"]["within_tol"] == 1.0
    assert dev["NVIDIA H100 80GB HBM3"]["always_default"]["programs"] == 2
    assert dev["NVIDIA H100 80GB HBM3"]["always_default"]["within_tol"] == 0.5
    assert 0.0 <= m["value_model"]["within_tol"] <= 1.0


@pytest.mark.slow   # (~18 s on 2 CPU cores: five runs of the script; the default suite checks the options part's other flags)
def test_options_part_tunes_pessimism_and_margin_inside_training(tmp_path):
  """--option_tune (session 24): (pessimism, margin) chosen by family-grouped folds inside the training programs;
  the JSON records every pair's inner score and the choice is the best of them (most within 5%, then lowest mean
  regret); a margin of 10 (log) never leaves the default, so its inner score is always-default's."""
  meta = {"device": "NVIDIA H200", "variants": [["default", {}], ["v1", {}], ["v2", {}]]}
  train = []
  for g, n in enumerate((64, 96, 128, 192, 256, 384, 512, 768)):
    for row in _program(g, n, f"c{n}", default_scale=1.2 if g % 2 else 1.0):
      train.append({**row, "family": f"f{g % 4}"})
  tr, te = str(tmp_path / "train4.npz"), str(tmp_path / "test4.npz")
  cds.save_dataset(tr, train, meta)
  cds.save_dataset(te, _program(0, 160, "n160") + _program(1, 640, "n640", default_scale=1.2), meta)
  args = [f"--option_data={tr}", f"--option_test_data={te}", "--option_steps=20", "--option_ensemble=2",
          "--option_gbdt=false", "--option_tune", "--option_inner_folds=2", "--option_pessimism_grid=0,2",
          "--option_margin_grid=0,10", "--option_tag=_t"]
  r = _run(args, tmp_path, part="options")
  assert r.returncode == 0, r.stderr[-3000:]
  cfg = json.loads((tmp_path / "value_options_t.json").read_text())["config"]
  scores = cfg["tuned"]
  assert sorted(scores) == ["0.0/0.0", "0.0/10.0", "2.0/0.0", "2.0/10.0"]
  best = max(scores, key=lambda k: (scores[k]["within_tol"], -scores[k]["mean_regret"]))
  assert f"{cfg['pessimism']}/{cfg['margin']}" == best
  # margin 10: always the default; 4 of the 8 training programs run their default 1.2x slower than the best
  assert scores["0.0/10.0"]["within_tol"] == pytest.approx(0.5)
  assert scores["0.0/10.0"] == scores["2.0/10.0"]
  r = _run([a for a in args if not a.startswith("--option_test_data")], tmp_path, part="options")
  assert r.returncode != 0 and "--option_tune needs --option_test_data" in r.stderr
  r = _run(args + ["--option_margin=0.1"], tmp_path, part="options")
  assert r.returncode != 0 and "drop --option_pessimism / --option_margin" in r.stderr
  r = _run([a for a in args if not a.startswith("--option_inner_folds")] + ["--option_inner_folds=5"], tmp_path,
           part="options")
  assert r.returncode != 0 and "fewer than --option_inner_folds=5" in r.stderr
  # the test programs' runtimes are never read by the tuning: scale them and the tuned scores stay the same
  scaled = str(tmp_path / "test4_scaled.npz")
  cds.save_dataset(scaled, [{**row, "runtime_s": row["runtime_s"] * (3.0 if row["variant"] == "default" else 0.5)}
                            for row in _program(0, 160, "n160") + _program(1, 640, "n640", default_scale=1.2)], meta)
  r = _run([a if not a.startswith("--option_test_data") else f"--option_test_data={scaled}" for a in args]
           [:-1] + ["--option_tag=_t2"], tmp_path, part="options")
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((tmp_path / "value_options_t2.json").read_text())["config"]["tuned"] == scores
