"""benchmarks/sidco_tree.py's summary (``_summarize``): the measure it reports and the ``--chain`` ratios,
recomputed from the committed H200 JSONs that BENCHMARKS.md and docs/comm.md quote."""

import copy
import json
import pathlib

import numpy as np
import pytest

from benchmarks import sidco_tree as st

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _rows(name):
  d = json.loads((RESULTS / name).read_text())
  return {r["method"]: r for r in copy.deepcopy(d["rows"])}, d["rw_floor_s"]


def test_chain_run_without_topk_row_uses_device_time_and_reports_compressor_shares():
  by, floor = _rows("sidco_chain_s8a_h200.json")
  rows = list(by.values())
  # no plain topk row in this run: the measure is still the device time (it fell back to wall time before)
  assert st._summarize(rows, floor) == "device_s"
  assert "compressor_s" not in by["adam(1e-3)"] and "compressor_s" not in by["flat copy"]
  assert by["chain(topk(0.001), adam)"]["compressor_s"] == pytest.approx(1.368e-3, abs=1e-6)
  assert by["chain(sidco(0.001), adam)"]["compressor_s"] == pytest.approx(1.056e-3, abs=1e-6)
  assert by["chain(sidco(0.001), adam)"]["compressor_speedup_over_topk"] == pytest.approx(1.30, abs=0.005)
  # 1.368 / 1.249 ms = 1.095 (BENCHMARKS.md rounds it to 1.10x)
  assert by["chain(sidco(0.001, per_tensor=True), adam)"]["compressor_speedup_over_topk"] == pytest.approx(
      1.095, abs=0.001)
  assert by["chain(topk(0.001), adam)"]["compressor_speedup_over_topk"] == 1.0
  r = by["chain(sidco(0.001), adam)"]
  assert r["over_flat_copy"] == pytest.approx(r["device_s"] / by["flat copy"]["device_s"])
  assert "speedup_over_topk" not in r


def test_tree_run_ratios_match_the_stored_ones():
  by, floor = _rows("sidco_tree_s8a_h200.json")
  stored = {m: (r["speedup_over_topk"], r["over_flat_copy"]) for m, r in by.items()}
  for r in by.values():
    del r["speedup_over_topk"], r["over_flat_copy"], r["over_rw_floor"]
  assert st._summarize(list(by.values()), floor) == "device_s"
  for m, r in by.items():
    assert (r["speedup_over_topk"], r["over_flat_copy"]) == pytest.approx(stored[m], rel=1e-12), m
    assert "compressor_s" not in r
  assert by["sidco(0.001)"]["speedup_over_topk"] == pytest.approx(1.19, abs=0.005)


def test_quoted_flat_state_figures_s19():
  # docs/comm.md "State buffers and the flat residual on the H200" (session 19), table 3
  by, floor = _rows("sidco_tree_h200_s19.json")
  stored = {m: r["speedup_over_topk"] for m, r in by.items()}
  for r in by.values():
    for k in ("speedup_over_topk", "over_flat_copy", "over_rw_floor", "compressor_s", "compressor_speedup_over_topk"):
      r.pop(k, None)
  assert st._summarize(list(by.values()), floor) == "device_s"
  for m, r in by.items():
    assert r["speedup_over_topk"] == pytest.approx(stored[m], rel=1e-12), m
  f = lambda m, k: round(by[m][k] * 1e3, 3)   # noqa: E731
  assert [f(m, "device_s") for m in ("flat copy", "topk(0.001)", "sidco(0.001)", "sidco(0.001, flat_state=True)",
                                      "sidco(0.001, per_tensor=True)",
                                      "sidco(0.001, per_tensor=True, flat_state=True)")] == \
      [0.057, 1.684, 0.777, 0.999, 0.820, 1.195]
  assert [round(by[m]["speedup_over_topk"], 2) for m in ("sidco(0.001)", "sidco(0.001, flat_state=True)",
                                                         "sidco(0.001, per_tensor=True)")] == [2.17, 1.69, 2.05]
  # the donated training step, wall ms per call of 20 back-to-back calls: the flat residual is faster there
  assert [round(by[m]["train_chain_wall_s"] * 1e3, 2) for m in (
      "topk(0.001)", "sidco(0.001)", "sidco(0.001, flat_state=True)", "chain(sidco(0.001), adam)",
      "chain(sidco(0.001, flat_state=True), adam)")] == [3.06, 2.81, 2.32, 6.27, 2.96]


def test_cpu_rows_use_loop_wall_time():
  rows = [{"method": "flat copy", "loop_wall_s": 1.0}, {"method": "topk(0.001)", "loop_wall_s": 8.0},
          {"method": "adam(1e-3)", "loop_wall_s": 2.0}, {"method": "chain(topk(0.001), adam)", "loop_wall_s": 6.0},
          {"method": "chain(sidco(0.001), adam)", "loop_wall_s": 4.0}]
  assert st._summarize(rows, 0.5) == "loop_wall_s"
  by = {r["method"]: r for r in rows}
  assert by["chain(sidco(0.001), adam)"]["compressor_s"] == 2.0
  assert by["chain(sidco(0.001), adam)"]["compressor_speedup_over_topk"] == 2.0
  assert by["chain(sidco(0.001), adam)"]["speedup_over_topk"] == 2.0
  assert by["topk(0.001)"]["over_rw_floor"] == 16.0


def test_largest_gaps_sums_idle_time_under_overlapping_kernels():
  from benchmarks.common import largest_gaps
  # (start, end, duration, name); "b" runs inside "a" (another stream): no idle time until a ends at 50
  ev = [(0, 50, 50, "a"), (10, 20, 10, "b"), (70, 80, 10, "c"), (81, 90, 9, "d"), (190, 200, 10, "e")]
  idle, gaps = largest_gaps(ev, 2)
  assert idle == pytest.approx((20 + 1 + 100) * 1e-9)
  assert gaps == [(pytest.approx(100e-9), "d", "e"), (pytest.approx(20e-9), "a", "c")]
  assert largest_gaps([], 3) == (0, [])


def test_single_configs_names_resolve_or_fail_clearly():
  from mlsys_jax.sched import XLA_CONFIGS
  assert st._single_options("no_cmdbuf") == XLA_CONFIGS["no_cmdbuf"]
  assert st._single_options("cmdbuf_while")["xla_gpu_enable_command_buffer"].endswith(",WHILE")
  with pytest.raises(ValueError, match="unknown configuration 'cmdbuf'"):
    st._single_options("cmdbuf")


def test_quoted_h100_session22_update_alone():
  """BENCHMARKS.md / docs/comm.md, session 22 (H100, device time per update in a loop): sidco 0.807 vs topk
  1.827 ms (2.26x), flat 1.65x, per tensor flat 1.41x and 1.74x with the "dus" build, the estimator 0.83x."""
  by, floor = _rows("sidco_tree_h100_s22.json")
  stored = {m: r.get("speedup_over_topk") for m, r in by.items()}
  assert st._summarize(list(by.values()), floor) == "device_s"
  assert {m: r.get("speedup_over_topk") for m, r in by.items()} == pytest.approx(stored)
  dev = lambda m: by[m]["device_s"] * 1e3
  assert (dev("sidco(0.001)"), dev("topk(0.001)")) == pytest.approx((0.807, 1.827), abs=5e-4)
  for m, x in [("sidco(0.001)", 2.26), ("sidco(0.001, flat_state=True)", 1.65),
               ("sidco(0.001, per_tensor=True, flat_state=True)", 1.41),
               ("sidco(0.001, per_tensor=True, flat_state=True) [flatdus]", 1.74), ("sidco(0.001, exact=False)", 0.83)]:
    assert by[m]["speedup_over_topk"] == pytest.approx(x, abs=0.005), m
  assert (dev("sidco(0.001, per_tensor=True, flat_state=True)"),
          dev("sidco(0.001, per_tensor=True, flat_state=True) [flatdus]"),
          dev("sidco(0.001, flat_state=True)"), dev("sidco(0.001, flat_state=True) [flatdus]")) == pytest.approx(
              (1.298, 1.050, 1.109, 1.240), abs=5e-4)


def test_quoted_h100_session28_update_alone():
  """BENCHMARKS.md / docs/comm.md, session 28 (H100): in a device loop sidco 0.796 vs topk 1.816 ms (2.28x), the
  counting search 0.832 / 0.880 ms (8 / 32 thresholds, the same values over the loop); one donated update alone
  2.30 ms with 1.54 idle against the counting search's 0.79 with none; back to back 3.52 against 4.94 ms per call."""
  by, floor = _rows("sidco_tree_h100_s28.json")
  stored = {m: r.get("speedup_over_topk") for m, r in by.items()}
  assert st._summarize(list(by.values()), floor) == "device_s"
  assert {m: r.get("speedup_over_topk") for m, r in by.items()} == pytest.approx(stored)
  ms = lambda m, k: round(by[m][k] * 1e3, 3)
  s, c8, c32, tk = "sidco(0.001)", "sidco(0.001) [counts]", "sidco(0.001) [counts 32]", "topk(0.001)"
  assert [ms(m, "device_s") for m in (s, c8, c32, tk)] == [0.796, 0.832, 0.88, 1.816]
  assert round(by[s]["speedup_over_topk"], 2) == 2.28 and by[s]["speedup_over_topk"] < 4.0      # not met
  assert by[c8]["loop_same_as_default"] and by[c32]["loop_same_as_default"] and by[c32]["search_ways"] == 32
  assert [ms(m, "train_device_s") for m in (s, c8, tk)] == [2.299, 0.788, 1.892]
  assert ms(s, "train_idle_s") == 1.54 and ms(c8, "train_idle_s") < 0.01
  assert [ms(m, "train_chain_wall_s") for m in (s, c8, tk)] == [3.515, 4.94, 3.135]


def test_quoted_h100_session32_update_alone():
  """Session 32's H100 runs of one jitted ``tx.update`` on the ResNet-50 tree (``--single --materialize``), as
  README, BENCHMARKS.md and docs/comm.md quote them: the default's span and its idle gap after cub's sorts; the
  Pallas leaf writer with the counting search (no sort: one command buffer) at 3.16x ``topk`` in two runs, at the
  span of XLA's bare error-feedback pass over the tree; with dispatch included (back-to-back calls) that bare pass
  already costs about ``topk``'s time; and every variant bitwise the default over the loop."""
  a, b, c = (_rows(f"sidco_tree_h100_s32{x}.json")[0] for x in "abc")
  ms = lambda r, m, k: round(r[m][k] * 1e3, 3)
  x = lambda r, m, k="single_device_s": round(r["topk(0.001)"][k] / r[m][k], 2)
  s, pt, fl = "sidco(0.001)", "sidco(0.001, per_tensor=True)", "sidco(0.001, flat_state=True)"
  pc, ef = "sidco(0.001) [pwrite counts 16]", "tree error-feedback pass"
  # run c: the default forms, the fastest variants, the bare pass (span of one update, ms, and x topk)
  assert [ms(c, m, "single_device_s") for m in ("topk(0.001)", s, pt, fl, pc, ef)] == [
      1.658, 1.054, 1.054, 0.887, 0.525, 0.515]
  assert [x(c, m) for m in (s, pt, fl, pc, f"{pt} [pwrite counts 16]", f"{fl} [counts 16]", ef)] == [
      1.57, 1.57, 1.87, 3.16, 2.2, 2.89, 3.22]
  assert ms(c, s, "single_idle_s") == 0.405 and ms(c, pc, "single_idle_s") < 0.002
  assert all(r["loop_same_as_default"] for m, r in c.items() if "[" in m)
  # the device loop (gradient materialized): sidco at the bare pass's time
  assert [ms(c, m, "device_s") for m in ("topk(0.001)", s, ef)] == [2.123, 1.038, 1.028]
  assert [x(c, m, "device_s") for m in (s, ef)] == [2.04, 2.06]
  # dispatch included: 20 calls back to back
  assert [ms(c, m, "single_chain_wall_s") for m in ("topk(0.001)", s, fl, ef)] == [1.927, 2.245, 1.373, 1.945]
  table = {m: (ms(c, m, "single_device_s"), ms(c, m, "single_idle_s"), ms(c, m, "device_s"),
               ms(c, m, "single_chain_wall_s")) for m in c}   # docs/comm.md's session-32 table, row by row
  assert table == {"topk(0.001)": (1.658, 0.019, 2.123, 1.927), ef: (0.515, 0.003, 1.028, 1.945),
                   s: (1.054, 0.405, 1.038, 2.245), pt: (1.054, 0.363, 1.182, 2.352), fl: (0.887, 0.292, 1.155, 1.373),
                   pc: (0.525, 0.001, 1.311, 2.275), f"{pt} [pwrite counts 16]": (0.753, 0.002, 1.547, 3.458),
                   f"{fl} [counts 16]": (0.575, 0.001, 1.068, 1.35),
                   f"{fl} [flatdus]": (1.656, 0.754, 1.565, 1.199), f"{fl} [pbuild]": (0.926, 0.33, 1.076, 1.697),
                   f"{pt} [pwrite]": (0.996, 0.366, 1.465, 2.86)}
  # run b: the same variant, and the counting search's ways; no command buffers is slower for every row
  assert [ms(b, m, "single_device_s") for m in (pc, "sidco(0.001) [pwrite counts]", "sidco(0.001) [pwrite counts 32]",
                                               "sidco(0.001) [pwrite]", ef)] == [0.523, 0.566, 0.577, 0.656, 0.514]
  assert x(b, pc) == 3.16 and ms(b, "topk(0.001)", "single_chain_wall_s") == 1.801
  assert ms(b, ef, "single_chain_wall_s") == 2.211
  assert all(r["single@no_cmdbuf"]["device_s"] > r["single_device_s"] for r in b.values())
  assert round(b["topk(0.001)"]["single@no_cmdbuf"]["chain_wall_s"] * 1e3, 3) == 2.556   # (1.801 with them)
  # where the counting-search update's 0.523 ms go (run b, kernels in launch order, us)
  seq = b[pc]["single_sequence"]
  us = lambda pred: round(sum(d for n, _, d in seq if pred(n)))
  assert us(lambda n: n.startswith("sum_leaves")) == 160                      # the buffer and its statistics
  assert us(lambda n: n.startswith("kernel")) == 137                          # write_leaves: residual and output
  assert len(seq) == 126 and not any("cub" in n for n, _, _ in seq)
  # run a: the default's gap is the host launching the command buffer after the last sort; the loop
  assert ms(a, s, "single_device_s") == 0.964 and ms(a, s, "single_idle_s") == 0.315
  gap = dict((n, t) for n, t, _ in a[s]["single_gap_host"])
  assert any(n.startswith("cuGraphLaunch") and round(t * 1e6) == 250 for n, t in gap.items())
  assert [ms(a, m, "device_s") for m in ("topk(0.001)", s)] == [2.109, 1.013]
  host = lambda m, k: round(dict((n, t) for n, t, _ in a[m]["single_host_top"])[k] * 1e3, 2)
  assert [host(m, "PjRtCApiLoadedExecutable::Execute") for m in ("topk(0.001)", s)] == [1.9, 2.25]
  assert [host(m, "Build buffer allocations") for m in ("topk(0.001)", s)] == [0.44, 0.44]
  assert [host(m, "CommonPjRtLoadedExecutable::ExecutePrepare") for m in ("topk(0.001)", s)] == [0.36, 0.4]
  assert [host(m, "[0] GpuExecutable::ExecuteThunks") for m in ("topk(0.001)", s)] == [0.42, 0.8]


def test_quoted_h100_session32_one_kernel_per_pass():
  """Session 32's run d (docs/comm.md, "Session 32"): the counting search's passes as one Pallas kernel each
  (commit d7ca828, reverted) were slower than XLA's four kernels a pass: 10.4 / 11.5 us per pass (block maxima /
  candidate entries), the update's span 0.610 against 0.529 ms; bitwise the default over the loop."""
  d, _ = _rows("sidco_tree_h100_s32d.json")
  span = lambda m: round(d[m]["single_device_s"] * 1e3, 3)
  pc = "sidco(0.001) [pwrite counts 16]"
  assert [span(m) for m in ("topk(0.001)", "sidco(0.001)", pc, pc[:-1] + " fpass]")] == [1.653, 1.097, 0.529, 0.61]
  assert [span(f"sidco(0.001) [pwrite counts{w} fpass]") for w in ("", " 32")] == [0.621, 0.641]
  assert all(r["loop_same_as_default"] for m, r in d.items() if "[" in m)
  per_pass = [t for n, _, t in d[pc[:-1] + " fpass]"]["single_sequence"] if n.startswith("search_counts")]
  assert len(per_pass) == 16
  assert [round(float(np.mean(per_pass[:8])), 1), round(float(np.mean(per_pass[8:])), 1)] == [10.4, 11.5]


def test_variant_rows_name_sidco_and_its_per_tensor_twin():
  """--variants / --flat_variants: a leading '-' keeps the one-threshold row only, '+' the per-tensor row only."""
  assert st._variant_rows("pwrite,-counts 16,+x", ", flat_state=True") == [
      ("sidco(0.001, flat_state=True) [pwrite]", False), ("sidco(0.001, per_tensor=True, flat_state=True) [pwrite]", True),
      ("sidco(0.001, flat_state=True) [counts 16]", False), ("sidco(0.001, per_tensor=True, flat_state=True) [x]", True)]
  assert st._variant_rows(st.OLD_PATH) == [(f"sidco(0.001) [{st.OLD_PATH}]", False),
                                           (f"sidco(0.001, per_tensor=True) [{st.OLD_PATH}]", True)]
  assert st._variant_rows("") == []


def test_quoted_h200_session33_update_alone():
  """Session 33's H200 runs of one jitted update (``sidco_tree_h200_s33{a,b}.json``), as BENCHMARKS.md, README and
  docs/comm.md quote them: the switch row (counting search + Pallas writer, 48-leaf kernels then) at 3.22-3.24x
  ``topk``; smaller sum kernels (24 leaves), wider writer kernels (96) and one kernel per counting pass each
  faster, together 3.51x (faster than XLA's bare error-feedback pass, 3.17x); per tensor the first segmented pass
  kernel slower; the group sizes each row ran with recorded. (The rows with one kernel per counting pass are quoted
  as withdrawn since session 34, which found that switch's answer different from the default's on the device.)"""
  a, b = (_rows(f"sidco_tree_h200_s33{x}.json")[0] for x in "ab")
  ms = lambda r, m: round(r[m]["single_device_s"] * 1e3, 4)
  x = lambda r, m: round(r["topk(0.001)"]["single_device_s"] / r[m]["single_device_s"], 2)
  pc, pt = "sidco(0.001) [pwrite counts 16", "sidco(0.001, per_tensor=True) [pwrite counts 16"
  ef = "tree error-feedback pass"
  assert [ms(a, m) for m in ("topk(0.001)", pc + "]", pc + " fpass]", pc + " sg24]", pc + " wg96]", pc + " sg161]",
                             "sidco(0.001) [pwrite counts 8 fpass]", pt + "]", pt + " fpass]", ef)] == [
      1.5329, 0.4735, 0.4668, 0.4535, 0.4661, 0.8342, 0.481, 0.7, 0.9642, 0.4842]
  assert [x(a, m) for m in (pc + "]", pc + " fpass]", pc + " sg24]", pc + " wg96]", pt + "]", pt + " fpass]", ef)] == [
      3.24, 3.28, 3.38, 3.29, 2.19, 1.59, 3.17]
  assert [ms(b, m) for m in ("topk(0.001)", pc + "]", pc + " fpass sg24 wg96]", pc + " sg16 fpass wg96]",
                             pc + " sg32 fpass wg96]")] == [1.5341, 0.4762, 0.4368, 0.4455, 0.4487]
  assert [x(b, m) for m in (pc + "]", pc + " fpass sg24 wg96]")] == [3.22, 3.51]
  rows = list(a.values())[1:] + list(b.values())[1:]
  assert all(r["single_idle_s"] < 4e-6 for r in rows)   # (no sort: no idle)
  groups = lambda r: (r["sum_group"], r["write_group"], r["count_pass"])
  assert groups(a[pc + "]"]) == (48, 48, "xla") and groups(b[pc + " fpass sg24 wg96]"]) == (24, 96, "pallas")
  # the kernels of one update (us): the sum kernels and the writer by group size, the counting passes
  kern = lambda r, pre: round(sum(d for n, _, d in r["single_sequence"] if n.startswith(pre)), 1)
  assert [kern(a[m], "sum_leaves") for m in (pc + "]", pc + " sg24]", pc + " sg161]")] == [138.8, 121.6, 502.1]
  assert [kern(b[m], "sum_leaves") for m in (pc + "]", pc + " fpass sg24 wg96]")] == [141.6, 122.3]
  assert [kern(a[m], "kernel") for m in (pc + "]", pc + " wg96]")] == [116.6, 107.5]
  assert [kern(a[pc + " fpass]"], "search_pass"), kern(a[pt + " fpass]"], "seg_search_pass")] == [90.6, 570.0]


def test_quoted_h100_session34_update_alone():
  """Session 34's H100 run of one jitted update (``sidco_tree_h100_s34a.json``), as BENCHMARKS.md and docs/comm.md
  quote it: the default rows; per tensor the counting search with the Pallas writer at 2.24x ``topk`` and equal to
  its default over the whole loop; every one-kernel-per-pass row NOT equal to its default (255 of 331 loop arrays);
  the kernel-size rows' sum-kernel and writer times (profiler averages, us); the per-tensor pass row failed."""
  a = _rows("sidco_tree_h100_s34a.json")[0]
  ms = lambda m: round(a[m]["single_device_s"] * 1e3, 3)
  x = lambda m: round(a["topk(0.001)"]["single_device_s"] / a[m]["single_device_s"], 2)
  pc, pt = "sidco(0.001) [pwrite counts 16 fpass", "sidco(0.001, per_tensor=True) [pwrite counts 16"
  assert [ms(m) for m in ("topk(0.001)", "sidco(0.001)", "sidco(0.001, per_tensor=True)", pt + "]", pc + " schain]",
                          pc + "]", pc + " sw4]", pc + " sw16]", pc + " ww8]", pc + " wt8192]")] == [
      1.663, 1.001, 1.018, 0.741, 0.477, 0.489, 0.639, 0.479, 0.481, 0.542]
  assert [x(m) for m in ("sidco(0.001)", "sidco(0.001, per_tensor=True)", pt + "]", pc + " schain]")] == [
      1.66, 1.63, 2.24, 3.49]
  assert a[pt + "]"]["loop_same_as_default"] and a[pt + "]"]["loop_arrays_differing"] == [0, 331]
  fp = [r for m, r in a.items() if " fpass" in m and "per_tensor" not in m]
  assert len(fp) == 6 and all(r["loop_arrays_differing"] == [255, 331] for r in fp)
  assert "error" in a[pt + " fpass]"] and "single_device_s" not in a[pt + " fpass]"]
  tk = lambda m, f: round(sum(d for n, d, _ in a[m]["single_top_kernels"] if f(n)) * 1e6)
  summ = lambda m: tk(m, lambda n: n.startswith("sum_leaves"))
  writer = lambda m: tk(m, lambda n: n in ("kernel", "kernel__1"))
  assert [summ(m) for m in ("sidco(0.001)", "sidco(0.001, per_tensor=True)", pt + "]", pc + " schain]", pc + "]",
                            pc + " sw4]", pc + " sw16]")] == [156, 150, 153, 144, 157, 308, 148]
  assert [writer(m) for m in (pt + "]", pc + " schain]", pc + "]", pc + " ww8]", pc + " wt8192]")] == [
      131, 127, 126, 120, 181]


def test_quoted_h100_session34_training_step():
  """Session 34's H100 training step (``sidco_model_step_h100_s34a.json``) as BENCHMARKS.md, README and docs/comm.md
  quote it: cost over Adam (wall, ms, and kernel time) of sidco with session 33's kernel sizes and of the switches."""
  rows = {r["row"]: r for r in json.loads((RESULTS / "sidco_model_step_h100_s34a.json").read_text())["rows"]}
  ov = lambda r: round(rows[r]["overhead_s"] * 1e3, 3)
  busy = lambda r: round(rows[r]["busy_overhead_s"] * 1e3, 3)
  names = ("topk", "sidco", "sidco_pt", "sidco_counts_fpass_w16", "sidco_counts_fpass_pwriter_w16",
           "sidco_counts_fpass_pwrite_w16", "sidco_pt_counts_pwriter_w16")
  assert [ov(r) for r in names] == [0.971, 0.029, 0.139, -0.026, 0.034, 0.492, 0.302]
  assert [busy(r) for r in names] == [1.254, 0.263, 0.32, 0.269, 0.348, 0.641, 0.526]
  assert [round(rows[r]["vs_topk"], 1) for r in ("sidco", "sidco_pt")] == [33.5, 7.0]
  assert [round(rows[r]["busy_vs_topk"], 2) for r in ("sidco", "sidco_pt", "sidco_counts_fpass_w16")] == [
      4.78, 3.92, 4.66]
  assert [round(x * 1e3, 3) for x in rows["sidco"]["overhead_s_iqr"]] == [0.011, 0.045]


def test_quoted_h100_session35_update_alone():
  """Session 35's H100 run (``sidco_tree_h100_s35a.json``) as BENCHMARKS.md, README and docs/comm.md quote it: spans
  (ms), x ``topk``, launches, both switch rows equal to the default over the whole loop; the device checks
  (``search_pass_check_h100_s35{a,b}.json``): before the fix every compiled count zero, after it every case equal."""
  a = _rows("sidco_tree_h100_s35a.json")[0]
  names = ("topk(0.001)", "sidco(0.001)", "sidco(0.001, per_tensor=True)", "sidco(0.001) [pwrite counts 16]",
           "sidco(0.001) [pwrite counts 16 fpass]")
  assert [round(a[m]["single_device_s"] * 1e3, 3) for m in names] == [1.661, 1.345, 1.363, 0.496, 0.471]
  assert [round(a["topk(0.001)"]["single_device_s"] / a[m]["single_device_s"], 2) for m in names[1:]] == [
      1.23, 1.22, 3.35, 3.53]
  assert [int(a[m]["single_kernels"]) for m in names] == [61, 138, 134, 122, 78]
  assert [round(a["sidco(0.001)"][k] * 1e3, 3) for k in ("single_busy_s", "single_idle_s")] == [0.632, 0.714]
  assert all(a[m]["loop_same_as_default"] and a[m]["loop_arrays_differing"] == [0, 331] for m in names[3:])
  raw = json.loads((RESULTS / "sidco_tree_h100_s35a.json").read_text())
  assert round(raw["rw_floor_s"] * 1e3, 3) == 0.085 and round(0.471 / 0.085, 1) == 5.5
  before, after = ({r["case"]: r for r in json.loads((RESULTS / f"search_pass_check_h100_s35{t}.json").read_text())[
      "rows"]} for t in "ab")
  lvl1 = before["level 1, block maxima"]
  assert lvl1["compiled_bits"] == [0] and lvl1["xla_bits"] == [1077370114] and not any(lvl1["compiled_counts"])
  assert set(before["segments, sorted rows"]["compiled_bits"]) == {0}
  assert before["sidco counts 16 fpass"]["arrays_differing"] == 86
  assert all(r["same"] for r in after.values()) and len(after) == 8
  assert after["sidco per tensor counts 16 fpass"]["arrays_differing"] == 0
  assert after["sidco per tensor counts 16 fpass"]["arrays"] == 387


def test_every_selected_variant_runs_with_its_default_row():
  """--only picks rows by prefix; a variant's default row is added so that its loop is compared bitwise (and only
  that row: a prefix would also pick the flat-state twins)."""
  names = ["topk(0.001)", "sidco(0.001)", "sidco(0.001, per_tensor=True)",
           "sidco(0.001, per_tensor=True, flat_state=True)", "sidco(0.001) [counts 16]",
           "sidco(0.001, per_tensor=True) [counts 16]", "tree copy"]
  assert st._selected(names, ["topk", "sidco(0.001, per_tensor=True) ["]) == [
      "topk(0.001)", "sidco(0.001, per_tensor=True)", "sidco(0.001, per_tensor=True) [counts 16]"]
  assert st._selected(names, []) == names
  assert st._selected(names, ["tree"]) == ["tree copy"]


def test_quoted_h100_session37_update_alone():
  """Session 37's H100 run (``sidco_tree_h100_s37a.json``) as docs/comm.md ("Session 37") and the history of
  BENCHMARKS.md quote it: span of one call (ms), x ``topk``, launches, per update over the loop and back to back
  (ms), every switch row equal to the block select over the loop; the Pallas-writer row's kernel groups."""
  a, floor = _rows("sidco_tree_h100_s37a.json")
  names = ("topk(0.001)", "sidco(0.001)", "sidco(0.001) [counts 16 fpass]", "sidco(0.001) [pwrite counts 16 fpass]",
           "sidco(0.001) [pwrite counts 32 fpass]", "sidco(0.001) [pwrite counts 64 fpass]",
           "sidco(0.001, per_tensor=True)", "sidco(0.001, per_tensor=True) [pwrite counts 16 fpass]")
  ms_ = lambda m, k: round(a[m][k] * 1e3, 3)   # noqa: E731
  assert [ms_(m, "single_device_s") for m in names] == [1.658, 1.062, 0.578, 0.471, 0.478, 0.502, 1.235, 0.726]
  assert [round(a[names[0]]["single_device_s"] / a[m]["single_device_s"], 2) for m in names[1:]] == [
      1.56, 2.87, 3.52, 3.47, 3.3, 1.34, 2.28]
  assert [int(a[m]["single_kernels"]) for m in names] == [61, 138, 130, 78, 76, 74, 134, 106]
  assert [ms_(m, "device_s") for m in names] == [2.114, 1.318, 1.019, 1.194, 1.285, 1.233, 1.146, 1.475]
  assert [ms_(m, "single_chain_wall_s") for m in names] == [2.364, 3.953, 2.965, 1.915, 2.137, 2.663, 2.406, 2.371]
  assert ms_("sidco(0.001)", "single_idle_s") == 0.429
  assert all(a[m]["loop_same_as_default"] and a[m]["loop_arrays_differing"] == [0, 331]
             for m in names if " [" in m)
  assert round(floor * 1e3, 3) == 0.085 and round(0.471 / 0.085, 1) == 5.5
  top = a["sidco(0.001) [pwrite counts 16 fpass]"]["single_top_kernels"]
  us = lambda pred: round(sum(t for n, t, _ in top if pred(n)) * 1e6)   # noqa: E731
  passes = [t * 1e6 for n, t, _ in top if n.startswith("search_pass")]
  assert (us(lambda n: n.startswith("sum_leaves")), us(lambda n: n in ("kernel", "kernel__1"))) == (144, 132)
  assert (len(passes), round(sum(passes)), round(min(passes), 1), round(max(passes), 1)) == (16, 82, 2.5, 7.6)
  small = [t for n, t, _ in top if n.startswith(("loop_", "input_")) and t < 1e-5]
  assert (len(small), round(sum(small) * 1e6)) == (44, 102)


# Session 38's update-alone rows (runs a and c): topk, the default and the forced block select in both layouts,
# the Pallas writer, per tensor.
S38_ROWS = ("topk(0.001)", "sidco(0.001)", "sidco(0.001) [blocks 8]", "sidco(0.001) [pwrite]",
            "sidco(0.001, flat_state=True)", "sidco(0.001, flat_state=True) [blocks 8]",
            "sidco(0.001, per_tensor=True)")


def _s38_spans(a):
  """Span of one call (ms) of every S38_ROWS row and its ratio to ``topk``'s, as the docs round them."""
  return ([round(a[m]["single_device_s"] * 1e3, 3) for m in S38_ROWS],
          [round(a[S38_ROWS[0]]["single_device_s"] / a[m]["single_device_s"], 2) for m in S38_ROWS[1:]])


def test_quoted_h100_session38_update_alone():
  """Session 38's H100 run (``sidco_tree_h100_s38a.json``), the confirmation of session 37's default, as BENCHMARKS.md,
  README and docs/comm.md quote it: span of one call (ms), x ``topk``, launches, idle, per update over the loop and
  back to back (ms); the block select forced by ``blocks 8`` and every switch row equal to its default over the loop."""
  a, floor = _rows("sidco_tree_h100_s38a.json")
  names = S38_ROWS
  ms_ = lambda m, k: round(a[m][k] * 1e3, 3)   # noqa: E731
  assert _s38_spans(a) == ([1.653, 0.573, 1.055, 0.472, 0.536, 0.907, 1.088], [2.88, 1.57, 3.5, 3.08, 1.82, 1.52])
  assert [int(a[m]["single_kernels"]) for m in names] == [61, 130, 138, 78, 97, 104, 134]
  assert [ms_(m, "single_idle_s") for m in names] == [0.019, 0.001, 0.424, 0.002, 0.0, 0.326, 0.423]
  assert [ms_(m, "device_s") for m in names] == [2.105, 0.937, 1.368, 1.249, 1.002, 1.253, 1.161]
  assert [ms_(m, "single_chain_wall_s") for m in names] == [2.04, 1.95, 2.684, 2.16, 1.2, 1.495, 2.55]
  assert (a["sidco(0.001) [blocks 8]"]["exact_search"], a["sidco(0.001)"]["exact_search"]) == ("blocks", "auto")
  assert all(a[m]["loop_same_as_default"] and a[m]["loop_arrays_differing"][0] == 0 for m in names if " [" in m)
  assert a["sidco(0.001) [blocks 8]"]["loop_arrays_differing"] == [0, 331]
  assert a["sidco(0.001, flat_state=True) [blocks 8]"]["loop_arrays_differing"] == [0, 171]
  assert round(floor * 1e3, 3) == 0.085 and round(a["sidco(0.001) [pwrite]"]["single_device_s"] / floor, 1) == 5.5
  builds = ["sidco(0.001, flat_state=True) [flatdus]", "sidco(0.001, flat_state=True) [pbuild]"]
  assert [ms_(m, "single_device_s") for m in builds] == [0.832, 0.535]
  assert all(a[m]["loop_same_as_default"] and a[m]["loop_arrays_differing"] == [0, 171] for m in builds)


def test_quoted_h100_session38_repeat():
  """Session 38's second update-alone run (``sidco_tree_h100_s38c.json``, another H100 machine the same hour) as
  BENCHMARKS.md and docs/comm.md quote it: spans (ms) and x ``topk``; the default below the block select alone, over
  the loop and back to back, in both layouts; the copy rate (so the read+write floor) measured lower than in run a."""
  a, floor = _rows("sidco_tree_h100_s38c.json")
  names = S38_ROWS
  assert _s38_spans(a) == ([1.649, 0.572, 0.763, 0.47, 0.532, 0.96, 1.303], [2.88, 2.16, 3.51, 3.1, 1.72, 1.27])
  for default, blocks in ((names[1], names[2]), (names[4], names[5])):
    assert all(a[default][k] < a[blocks][k] for k in ("single_device_s", "device_s", "single_chain_wall_s"))
  assert all(a[m]["loop_same_as_default"] and a[m]["loop_arrays_differing"][0] == 0 for m in names if " [" in m)
  assert round(floor * 1e3, 3) == 0.116


def test_quoted_h100_session40_update_alone():
  """Session 40's H100 runs (``sidco_tree_h100_s40{a,b}.json``) as sparse.py, BENCHMARKS.md, README and docs/comm.md
  quote them: span of one call (ms) and x ``topk``; the level handoff kernels (``klist``, the default since) below the
  XLA handoff in both layouts; the tree layout's Pallas writer with them 3.83x; the flat-state Pallas writers as built
  in session 39 (``fkeep``/``fkeepi`` + ``fout``) slower than the default, with 160-odd extra select launches (the
  per-leaf ``where(finite, out, 0)`` session 40 removed); every switch row equal to its default over the loop."""
  a, _ = _rows("sidco_tree_h100_s40a.json")
  b, _ = _rows("sidco_tree_h100_s40b.json")
  span = lambda r, m: round(r[m]["single_device_s"] * 1e3, 3)   # noqa: E731
  x = lambda r, m: round(r["topk(0.001)"]["single_device_s"] / r[m]["single_device_s"], 2)   # noqa: E731
  fl = "sidco(0.001, flat_state=True)"
  assert [span(a, m) for m in ("topk(0.001)", "sidco(0.001)", fl, "sidco(0.001) [pwrite klist]", fl + " [fkeep fout]",
                               fl + " [fkeepi fout]", fl + " [fkeep fout klist]")] == [
      1.654, 0.573, 0.534, 0.432, 0.726, 0.799, 0.692]
  assert [x(a, m) for m in ("sidco(0.001)", fl, "sidco(0.001) [pwrite klist]", fl + " [fkeep fout klist]")] == [
      2.89, 3.1, 3.83, 2.39]
  assert [span(b, m) for m in ("topk(0.001)", "sidco(0.001)", "sidco(0.001) [klist]", fl, fl + " [klist]")] == [
      1.652, 0.573, 0.535, 0.534, 0.496]
  assert [x(b, m) for m in ("sidco(0.001)", "sidco(0.001) [klist]", fl, fl + " [klist]")] == [2.88, 3.09, 3.09, 3.33]
  sel = lambda r, m: sum(t[2] for t in r[m]["single_top_kernels"] if t[0].startswith("loop_select_fusion"))  # noqa: E731
  assert (sel(a, fl), sel(a, fl + " [fkeep fout]")) == (27, 165)
  for r, n in ((a, 331), (b, 331)):
    assert all(r[m]["loop_same_as_default"] and r[m]["loop_arrays_differing"] in ([0, n], [0, 171]) for m in r if " [" in m)


def test_quoted_h100_session41_buffer_residual():
  """Session 41's H100 run (``sidco_tree_h100_s41a.json``) as sparse.py (``_FLAT_KEPT``), BENCHMARKS.md, README and
  docs/comm.md quote it: span of one call (ms) and x ``topk``; the residual kept in the padded buffer with the Pallas
  output writer (``fbuf fout``) 4.11x, the first form at or above the issue's 4x alone; without that writer
  (``fbuf``: 161 outputs from gradient + old residual) slower than the default; ``zero_sent`` 16-17 us where the
  default's residual fusion takes 99; over the loop (loop-carried state) neither below the default; both equal to the
  default over the loop."""
  r, _ = _rows("sidco_tree_h100_s41a.json")
  fl = "sidco(0.001, flat_state=True)"
  span = lambda m: round(r[m]["single_device_s"] * 1e3, 3)   # noqa: E731
  x = lambda m: round(r["topk(0.001)"]["single_device_s"] / r[m]["single_device_s"], 2)   # noqa: E731
  assert [span(m) for m in ("topk(0.001)", fl, fl + " [fbuf]", fl + " [fbuf fout]")] == [1.661, 0.499, 0.62, 0.404]
  assert [x(m) for m in (fl, fl + " [fbuf]", fl + " [fbuf fout]")] == [3.33, 2.68, 4.11]
  us = lambda m, k: [round(t[1] * 1e6, 1) for t in r[m]["single_top_kernels"] if t[0] == k]   # noqa: E731
  assert us(fl, "loop_select_fusion") == [99.3] and us(fl + " [fbuf]", "zero_sent") == [16.5]
  assert us(fl + " [fbuf fout]", "zero_sent") == [17.2]
  assert [round(r[m]["device_s"] * 1e3, 3) for m in (fl, fl + " [fbuf]", fl + " [fbuf fout]")] == [0.846, 1.194, 0.868]
  assert all(r[m]["loop_same_as_default"] and r[m]["loop_arrays_differing"] == [0, 171]
             for m in (fl + " [fbuf]", fl + " [fbuf fout]"))


def test_quoted_h100_session43_update_alone():
  """Session 43's two H100 runs (``sidco_tree_h100_s43{b,d}.json``) as README, BENCHMARKS.md and docs/comm.md quote
  them: span of one call (ms) and x ``topk`` of the defaults on the code with the session-42 fixes; per tensor's
  kernel time 0.67 ms as in session 38 (``_s38a``: 0.667), its idle after cub's sorts 0.635 / 0.685 ms; one
  read+write pass 0.089 / 0.081 ms, so the default ``flat_state=True`` spans 5.6 / 6.2 passes."""
  pt, fl = "sidco(0.001, per_tensor=True)", "sidco(0.001, flat_state=True)"
  for name, spans, xs, idle, floor in (
      ("sidco_tree_h100_s43b.json", [1.649, 0.539, 0.501, 1.304], [3.06, 3.29, 1.26], 0.635, 0.089),
      ("sidco_tree_h100_s43d.json", [1.654, 0.539, 0.501, 1.353], [3.07, 3.3, 1.22], 0.685, 0.081)):
    r, rw = _rows(name)
    span = lambda m: round(r[m]["single_device_s"] * 1e3, 3)   # noqa: E731
    assert [span(m) for m in ("topk(0.001)", "sidco(0.001)", fl, pt)] == spans
    x = lambda m: round(r["topk(0.001)"]["single_device_s"] / r[m]["single_device_s"], 2)   # noqa: E731
    assert [x(m) for m in ("sidco(0.001)", fl, pt)] == xs
    assert round(r[pt]["single_idle_s"] * 1e3, 3) == idle and round(r[pt]["single_busy_s"] * 1e3, 2) == 0.67
    assert round(rw * 1e3, 3) == floor
  r38, _ = _rows("sidco_tree_h100_s38a.json")
  assert round(r38[pt]["single_busy_s"] * 1e3, 3) == 0.667
  assert [round(0.501 / f, 1) for f in (0.089, 0.081)] == [5.6, 6.2]


def test_quoted_device_timed_read_write_pass():
  """BENCHMARKS.md / docs/comm.md (session 44): the device-timed copy of the 25.56M floats (``flat copy`` rows of
  s28, s31b, s32a) takes 0.070-0.071 ms, while the runs' ``rw_floor_s`` (wall time of dispatched 1 GiB copies) read
  0.078-0.089 ms in s38a-s43d; against 0.0705 ms the fastest update alone (``fbuf fout``, 0.404) is 5.7 passes and
  the default ``flat_state=True`` (0.501) 7.1; 3 passes 0.21 ms."""
  copies = [round(_rows(f"sidco_tree_h100_{run}.json")[0]["flat copy"]["single_device_s"] * 1e3, 4)
            for run in ("s28", "s31b", "s32a")]
  assert copies == [0.0712, 0.0707, 0.0704]
  floors = [round(_rows(f"sidco_tree_h100_{run}.json")[1] * 1e3, 3) for run in ("s38a", "s40b", "s41a", "s43b", "s43d")]
  assert min(floors) >= 0.078 and max(floors) <= 0.089
  assert [round(t / 0.0705, 1) for t in (0.404, 0.501)] == [5.7, 7.1] and round(3 * 0.0705, 2) == 0.21
