"""benchmarks/sidco_model_step.py's summary (``_summarize``) and kernel classes, recomputed from the committed H200
JSONs whose figures BENCHMARKS.md and docs/comm.md quote (SIDCo inside a whole ResNet-50 training step)."""

import copy
import json
import pathlib

import pytest

from benchmarks import sidco_model_step as ms

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DERIVED = ("overhead_s", "overhead_s_iqr", "overhead_s_of_medians", "busy_overhead_s", "vs_topk", "busy_vs_topk")


def _rows(name, strip=True):
  rows = copy.deepcopy(json.loads((RESULTS / name).read_text())["rows"])
  if strip:
    for r in rows:
      for k in DERIVED:
        r.pop(k, None)
  return rows


@pytest.mark.parametrize("name", ["sidco_model_step_h200_s16b.json", "sidco_model_step_h200_s16c.json",
                                  "sidco_model_step_h200_s16d.json", "sidco_model_step_h200_s16e.json",
                                  "sidco_model_step_h200_s16f.json", "sidco_model_step_h200_s16g.json",
                                  "sidco_model_step_h200_s16h.json", "sidco_model_step_h200_s16i.json",
                                  "sidco_model_step_h200_s19a.json", "sidco_model_step_h200_s19b.json",
                                  "sidco_model_step_h100_s22a.json", "sidco_model_step_h100_s22b.json",
                                  "sidco_model_step_h200_s23_est.json", "sidco_model_step_h200_s23a.json",
                                  "sidco_model_step_h100_s25.json"])
def test_summary_reproduces_the_stored_fields(name):
  stored = {r["row"]: r for r in _rows(name, strip=False)}
  rows = _rows(name)
  ms._summarize(rows)
  for r in rows:
    for k in DERIVED:
      assert (k in r) == (k in stored[r["row"]]), (r["row"], k)
      if k in r:
        assert r[k] == pytest.approx(stored[r["row"]][k], rel=1e-9, abs=1e-12), (r["row"], k)


def test_quoted_training_step_figures():
  def by(name):
    rows = _rows(name)
    ms._summarize(rows)
    return {r["row"]: r for r in rows}
  c, g, i, d, e, b = (by(f"sidco_model_step_h200_s16{x}.json") for x in "cgideb")
  # f32 batch 64 (two runs): topk +0.914 / +0.904 ms, sidco +0.203 / +0.186 ms: 4.5x / 4.9x; per tensor 3.3x / 2.9x
  assert c["topk"]["overhead_s"] * 1e3 == pytest.approx(0.914, abs=5e-4)
  assert c["sidco"]["overhead_s"] * 1e3 == pytest.approx(0.203, abs=5e-4)
  assert c["sidco"]["vs_topk"] == pytest.approx(4.5, abs=0.05)
  assert c["sidco_pt"]["vs_topk"] == pytest.approx(3.3, abs=0.05)
  assert g["sidco"]["vs_topk"] == pytest.approx(4.9, abs=0.05)
  assert g["sidco_pt"]["vs_topk"] == pytest.approx(2.9, abs=0.05)
  # f32 batch 32 with conv command buffers: +0.061 vs +0.861 ms, 14x
  assert i["sidco"]["overhead_s"] * 1e3 == pytest.approx(0.061, abs=5e-4)
  assert i["sidco"]["vs_topk"] == pytest.approx(14.0, abs=0.5)
  # device-bound bf16: SIDCo's step is faster than Adam alone; host-bound bf16: 2.50 vs 1.89 ms
  assert d["sidco"]["overhead_s"] < 0 and e["sidco"]["overhead_s"] < 0 and "vs_topk" not in d["sidco"]
  assert b["sidco"]["overhead_s"] * 1e3 == pytest.approx(2.495, abs=5e-4)
  assert b["topk"]["overhead_s"] * 1e3 == pytest.approx(1.886, abs=5e-4)


def test_quoted_flat_state_step_figures():
  # docs/comm.md "State buffers and the flat residual on the H200" (session 19), table 2
  def by(name):
    rows = _rows(name)
    ms._summarize(rows)
    return {r["row"]: r for r in rows}
  a, b = by("sidco_model_step_h200_s19a.json"), by("sidco_model_step_h200_s19b.json")
  over = lambda r, k: r[k]["overhead_s"] * 1e3   # noqa: E731
  assert {k: round(over(b, k), 3) for k in ("topk", "sidco", "sidco_flat", "sidco_pt", "sidco_pt_flat")} == \
      {"topk": 0.893, "sidco": 0.171, "sidco_flat": 0.076, "sidco_pt": 0.292, "sidco_pt_flat": 0.257}
  assert [round(b[k]["vs_topk"], 1) for k in ("sidco", "sidco_flat", "sidco_pt", "sidco_pt_flat")] == \
      [5.2, 11.7, 3.1, 3.5]
  # against one read+write pass of the gradients (0.068 ms, sidco_tree_h200_s19.json's rw_floor_s)
  rw = json.loads((RESULTS / "sidco_tree_h200_s19.json").read_text())["rw_floor_s"] * 1e3
  assert rw == pytest.approx(0.068, abs=5e-4)
  assert [round(over(b, k) / rw, 1) for k in ("sidco_flat", "sidco", "sidco_pt_flat")] == [1.1, 2.5, 3.8]
  assert {k: round(over(a, k), 3) for k in ("topk", "topk_flat", "sidco", "sidco_flat", "adam_flat",
                                             "sidco_flat_adam_flat")} == \
      {"topk": 0.606, "topk_flat": 0.404, "sidco": -0.309, "sidco_flat": -0.251, "adam_flat": -0.866,
       "sidco_flat_adam_flat": -0.127}


def test_kernel_classes_of_the_breakdown_run():
  # (s16f ran the classifier before XLA fusion names were matched first: its "conv" class also holds fusions whose
  # name contains "conv", e.g. convert fusions; the sums below are what docs/comm.md quotes from that run)
  rows = {r["row"]: r for r in _rows("sidco_model_step_h200_s16f.json")}
  added = {}
  for m in ("topk", "sidco"):
    cls = rows[m]["kernel_classes_s"]
    base = rows["adam"]["kernel_classes_s"]
    added[m] = sum(cls.get(k, 0.0) - base.get(k, 0.0) for k in ("sort", "reduce", "fusion", "other", "scatter"))
  # docs/comm.md: "+1.14 ms for topk and +0.29 ms for sidco, 3.9x less"
  assert added["topk"] * 1e3 == pytest.approx(1.14, abs=0.005)
  assert added["sidco"] * 1e3 == pytest.approx(0.29, abs=0.005)
  assert added["topk"] / added["sidco"] == pytest.approx(3.9, abs=0.05)


def test_kernel_class_names():
  assert ms._kernel_class("sm90_xmma_fprop_implicit_gemm_bf16") == "conv"
  assert ms._kernel_class("void cub::detail::radix_sort::DeviceRadixSortOnesweepKernel") == "sort"
  assert ms._kernel_class("nvjet_sm90_tst_256x128") == "gemm"
  assert ms._kernel_class("input_multiply_reduce_fusion_2") == "reduce"
  assert ms._kernel_class("loop_select_fusion") == "fusion"
  assert ms._kernel_class("memcpy128") == "copy"
  assert ms._kernel_class("loop_convert_fusion_3") == "fusion"   # not a convolution
  assert ms._kernel_class("input_scatter_fusion_1") == "scatter"
  # cuBLAS's split-K reduction is a GEMM's, not a cub sort (its name holds "cub")
  assert ms._kernel_class("void cublasLt::splitKreduce_kernel<32, 16, int, float, float>") == "gemm"
  # XLA's Triton GEMM fusions (names as in the H200 profiles of mlsys_jax/cost/data/h200/h200_collect_s16a.npz)
  assert ms._kernel_class("gemm_fusion_dot_general_5") == "gemm"
  assert ms._kernel_class("gemm_fusion_dot") == "gemm" and ms._kernel_class("triton_gemm_dot_3") == "gemm"
  assert ms._kernel_class("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop") == "conv"
  by_class, top = ms._kernel_breakdown([(0, 1, 2000, "loop_add_fusion"), (1, 2, 1000, "loop_add_fusion"),
                                        (2, 3, 4000, "memcpy128")], steps=2)
  assert by_class == pytest.approx({"fusion": 1.5e-6, "copy": 2e-6})
  assert top[0] == ("memcpy128", pytest.approx(2e-6), 0.5) and top[1][2] == 1.0


def test_quoted_h100_session22_figures():
  """BENCHMARKS.md / docs/comm.md, session 22 (H100): the "dus" flat build loses inside the step, and SIDCo's
  estimator (exact=False) adds several ms of host-synced idle."""
  def by(name):
    rows = _rows(name)
    ms._summarize(rows)
    return {r["row"]: r for r in rows}
  a, b = by("sidco_model_step_h100_s22a.json"), by("sidco_model_step_h100_s22b.json")
  busy = lambda r, row: r[row]["busy_overhead_s"] * 1e3
  # kernel time over Adam: topk 1.217, sidco 0.396, flat 0.417 -> dus 0.490, per tensor flat 0.501 -> dus 0.555 ms
  for row, ms_ in [("topk", 1.217), ("sidco", 0.396), ("sidco_flat", 0.417), ("sidco_flat_dus", 0.490),
                   ("sidco_pt_flat", 0.501), ("sidco_pt_flat_dus", 0.555)]:
    assert busy(a, row) == pytest.approx(ms_, abs=5e-4), row
  assert busy(a, "sidco_flat_dus") > busy(a, "sidco_flat") and busy(a, "sidco_pt_flat_dus") > busy(a, "sidco_pt_flat")
  assert a["sidco"]["busy_vs_topk"] == pytest.approx(3.07, abs=0.01)
  assert a["sidco_flat"]["busy_vs_topk"] == pytest.approx(2.92, abs=0.01)
  # wall with a flattened Adam: +0.149 (concat) vs +0.320 ms ("dus"), topk +0.893, 6.0x; the estimator +7.42 ms
  assert b["sidco_flat_adam_flat"]["overhead_s"] * 1e3 == pytest.approx(0.149, abs=5e-4)
  assert b["sidco_flat_dus_adam_flat"]["overhead_s"] * 1e3 == pytest.approx(0.320, abs=5e-4)
  assert b["topk"]["overhead_s"] * 1e3 == pytest.approx(0.893, abs=5e-4)
  assert b["sidco_flat_adam_flat"]["vs_topk"] == pytest.approx(6.0, abs=0.05)
  assert b["sidco_est"]["overhead_s"] * 1e3 == pytest.approx(7.416, abs=5e-4)
  assert [b[r]["overhead_s"] * 1e3 for r in ("sidco_pt_est", "sidco_flat_est")] == pytest.approx([8.001, 6.443], abs=5e-4)
  assert all(5.0 < b[r]["idle_s"] * 1e3 < 7.1 for r in ("sidco_est", "sidco_pt_est", "sidco_flat_est"))


def test_quoted_h200_session23_figures():
  """BENCHMARKS.md / docs/comm.md, session 23 (H200): the branch-free estimator (sparse._BRANCHES = "where")
  against the while_loop / lax.cond path in the same f32 batch-64 step, and the second run of session 19's flat rows."""
  def by(name):
    rows = _rows(name)
    ms._summarize(rows)
    return {r["row"]: r for r in rows}
  e, c = by("sidco_model_step_h200_s23_est.json"), by("sidco_model_step_h200_s23a.json")
  over = lambda r, k: round(r[k]["overhead_s"] * 1e3, 3)   # noqa: E731
  iqr = lambda r, k: [round(v * 1e3, 3) for v in r[k]["overhead_s_iqr"]]   # noqa: E731
  busy = lambda r, k: round(r[k]["busy_overhead_s"] * 1e3, 3)   # noqa: E731
  # the estimator: +7.764 [6.789, 8.334] ms with cond, +1.171 [1.086, 1.205] ms without; per tensor +7.611 -> +1.103
  assert (over(e, "sidco_est_cond"), iqr(e, "sidco_est_cond")) == (7.764, [6.789, 8.334])
  assert (over(e, "sidco_est_where"), iqr(e, "sidco_est_where")) == (1.171, [1.086, 1.205])
  assert (over(e, "sidco_pt_est_cond"), over(e, "sidco_pt_est_where")) == (7.611, 1.103)
  assert round(over(e, "sidco_est_cond") / over(e, "sidco_est_where"), 1) == 6.6
  assert round(over(e, "sidco_pt_est_cond") / over(e, "sidco_pt_est_where"), 1) == 6.9
  # kernel time over Adam: 0.373 (cond) -> 1.448 ms (where); idle in the trace 10.0 ms -> none
  assert (busy(e, "sidco_est_cond"), busy(e, "sidco_est_where")) == (0.373, 1.448)
  assert round(e["sidco_est_cond"]["idle_s"] * 1e3, 1) == 10.0 and e["sidco_est_where"]["idle_s"] < 0
  assert (over(e, "topk"), over(e, "sidco")) == (0.811, 0.061)
  # the second H200 run of session 19's flat rows: flat 14.05x less than topk (s19: 11.7x), "dus" loses again
  assert over(c, "topk") == 0.854
  assert {k: over(c, k) for k in ("sidco", "sidco_flat", "sidco_flat_dus", "sidco_pt_flat", "sidco_pt_flat_dus")} == \
      {"sidco": 0.153, "sidco_flat": 0.061, "sidco_flat_dus": 0.183, "sidco_pt_flat": 0.242, "sidco_pt_flat_dus": 0.264}
  assert [round(c[k]["vs_topk"], 2) for k in ("sidco", "sidco_flat", "sidco_flat_dus", "sidco_pt_flat")] == \
      [5.57, 14.05, 4.67, 3.53]
  assert iqr(c, "sidco_flat") == [0.049, 0.091]
  rw = json.loads((RESULTS / "sidco_tree_h200_s19.json").read_text())["rw_floor_s"] * 1e3
  assert [round(over(c, k) / rw, 1) for k in ("sidco_flat", "sidco_pt_flat")] == [0.9, 3.6]


def test_quoted_h100_session24_figures():
  """docs/comm.md, session 24 (H100): what a lax.cond costs in the f32 batch-64 step (the estimator with two fixed
  stages, DGC, ACCORDION) and the ceiling's block select against the bit search."""
  rows = _rows("sidco_model_step_h100_s24_est2.json")
  ms._summarize(rows)
  r = {x["row"]: x for x in rows}
  ms_ = lambda k, f="overhead_s": round(r[k][f] * 1e3, 2)   # noqa: E731
  assert round(r["adam"]["step_s"] * 1e3, 2) == 21.01
  assert {k: ms_(k) for k in ("topk", "sidco_est_where", "sidco_est_where_cblocks", "sidco_est_cond_s2",
                              "sidco_est_where_s2", "dgc", "powersgd", "accordion")} == \
      {"topk": 0.98, "sidco_est_where": 1.56, "sidco_est_where_cblocks": 1.27, "sidco_est_cond_s2": 4.01,
       "sidco_est_where_s2": 0.80, "dgc": 4.23, "powersgd": 1.83, "accordion": 5.51}
  assert {k: ms_(k, "idle_s") for k in ("sidco_est_cond_s2", "dgc", "accordion")} == \
      {"sidco_est_cond_s2": 3.08, "dgc": 3.14, "accordion": 1.69}
  assert all(r[k]["idle_s"] <= 0 for k in ("topk", "sidco_est_where", "sidco_est_where_cblocks", "sidco_est_where_s2",
                                           "powersgd"))
  assert {k: ms_(k, "busy_overhead_s") for k in ("topk", "sidco_est_where", "sidco_est_where_cblocks",
                                                 "sidco_est_cond_s2", "sidco_est_where_s2", "dgc", "powersgd",
                                                 "accordion")} == \
      {"topk": 1.23, "sidco_est_where": 1.73, "sidco_est_where_cblocks": 1.46, "sidco_est_cond_s2": 0.54,
       "sidco_est_where_s2": 0.99, "dgc": 0.74, "powersgd": 1.79, "accordion": 3.86}


def test_quoted_h100_session24_dgc_and_cmdbuf_figures():
  """docs/comm.md / BENCHMARKS.md, session 24's second H100 call: DGC's second round with and without its
  lax.cond, the recipe's stage switch, and the same conditionals under conditional command buffers."""
  def by(name):
    rows = _rows(name)
    ms._summarize(rows)
    return {r["row"]: r for r in rows}
  d, c = by("sidco_model_step_h100_s24_dgc.json"), by("sidco_model_step_h100_s24_cmdbuf.json")
  ms_ = lambda r, k, f="overhead_s": round(r[k][f] * 1e3, 2)   # noqa: E731
  assert (round(d["adam"]["step_s"] * 1e3, 2), round(c["adam"]["step_s"] * 1e3, 2)) == (21.09, 20.88)
  assert (ms_(d, "dgc_cond"), ms_(d, "dgc_where"), ms_(d, "recipe")) == (5.31, 0.53, 6.41)
  assert (ms_(d, "dgc_cond", "idle_s"), ms_(d, "recipe", "idle_s")) == (3.55, 7.16) and d["dgc_where"]["idle_s"] < 0
  assert round(d["dgc_cond"]["overhead_s"] / d["dgc_where"]["overhead_s"]) == 10
  assert (ms_(d, "dgc_cond", "busy_overhead_s"), ms_(d, "dgc_where", "busy_overhead_s")) == (0.73, 0.73)
  assert (ms_(c, "dgc_cond"), ms_(c, "accordion")) == (5.39, 5.18)
  assert (ms_(c, "dgc_cond", "idle_s"), ms_(c, "accordion", "idle_s")) == (5.19, 2.07)
  assert "CONDITIONAL" in json.loads((RESULTS / "sidco_model_step_h100_s24_cmdbuf.json").read_text())[
      "compiler_options"]["xla_gpu_enable_command_buffer"]


def test_quoted_h100_session25_figures():
  """docs/comm.md "Session 25" / README / BENCHMARKS.md: DGC's branch-free second round (with the tie fix) against
  its lax.cond, SIDCo per tensor, ACCORDION's static regime and the recipe's final stage compiled alone."""
  rows = _rows("sidco_model_step_h100_s25.json")
  ms._summarize(rows)
  r = {x["row"]: x for x in rows}
  ms_ = lambda k, f="overhead_s": round(r[k][f] * 1e3, 2)   # noqa: E731
  assert round(r["adam"]["step_s"] * 1e3, 2) == 21.10
  assert {k: ms_(k) for k in r if k != "adam"} == {
      "topk": 0.95, "dgc_cond": 4.41, "dgc_where": 0.77, "sidco_pt_flat": 0.27, "accordion_nodecide": 5.38,
      "accordion_static": 3.30, "recipe": 5.16, "recipe_fixed": 1.93}
  iqr = lambda k: [round(v * 1e3, 2) for v in r[k]["overhead_s_iqr"]]   # noqa: E731
  assert (iqr("topk"), iqr("dgc_cond"), iqr("dgc_where")) == ([0.95, 0.97], [3.98, 4.45], [0.74, 0.79])
  assert (iqr("sidco_pt_flat"), iqr("accordion_static"), iqr("recipe_fixed")) == ([0.23, 0.32], [3.29, 3.32],
                                                                                  [1.91, 1.95])
  assert round(r["dgc_cond"]["overhead_s"] / r["dgc_where"]["overhead_s"], 1) == 5.7
  assert round(r["topk"]["overhead_s"] / r["dgc_where"]["overhead_s"], 1) == 1.2
  assert round(r["sidco_pt_flat"]["vs_topk"], 1) == 3.5 < 4.0            # per tensor: the 4x target not met
  assert (ms_("dgc_cond", "idle_s"), ms_("accordion_nodecide", "idle_s"), ms_("accordion_static", "idle_s")) == \
      (4.29, 1.77, 0.18)
  for k in ("topk", "dgc_where", "sidco_pt_flat", "recipe_fixed"):
    assert r[k]["idle_s"] < 0                                            # no idle beyond the trace's noise
  assert {k: ms_(k, "busy_overhead_s") for k in ("topk", "dgc_cond", "dgc_where", "sidco_pt_flat",
                                                 "accordion_nodecide", "accordion_static", "recipe",
                                                 "recipe_fixed")} == \
      {"topk": 1.12, "dgc_cond": 0.65, "dgc_where": 1.0, "sidco_pt_flat": 0.47, "accordion_nodecide": 3.83,
       "accordion_static": 3.03, "recipe": 1.23, "recipe_fixed": 2.02}
  adam = r["adam"]
  assert round((r["recipe_fixed"]["kernel_classes_s"]["fusion"] - adam["kernel_classes_s"]["fusion"]) * 1e3, 2) == 1.47
  assert r["recipe_fixed"]["kernels"] - adam["kernels"] == 329
  log = (RESULTS / "sidco_model_step_h100_s25_killed_compile.log").read_text()
  assert "compiled dgc_pt_cond in 99.6 s" in log and "compiled dgc_pt_where in 118.0 s" in log
  assert "compiled dgc_cond in 7.1 s" in log


@pytest.mark.parametrize("row", ["recipe_fixed_flatpre", "recipe_fixed_flat"])
def test_raveled_recipe_rows_match_recipe_fixed(row):
  """The rows queued for the GPU (the recipe's final stage with its RMS selection on the raveled gradient, and with
  the flat residual too) build the same training step as ``recipe_fixed`` on CPU: same updates over three steps."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  shapes = {"conv": (3, 3, 8, 16), "dense": (128, 64), "bias": (64,)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  ref, tx = ms._tx("recipe_fixed", 0.002), ms._tx(row, 0.002)   # 0.002 < 0.01: the RMS selection is on
  rs, ts = ref.init(params), tx.init(params)
  for step in range(3):
    g = {k: jax.random.normal(jax.random.fold_in(keys[i], step), s) for i, (k, s) in enumerate(shapes.items())}
    ru, rs = jax.jit(ref.update)(g, rs, params)
    tu, ts = jax.jit(tx.update)(g, ts, params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), tu, ru)


def test_quoted_h100_session26_figures():
  """Session 26's H100 rows as docs/comm.md, BENCHMARKS.md and sparse.py quote them: the recipe's final stage with
  its RMS selection raveled (``optax.flatten``), SIDCo per tensor twice more, and per-tensor DGC leaf by leaf vs
  batched (``sparse._BATCH_LEAVES``, now "auto": on GPU)."""
  a = {x["row"]: x for x in json.loads((RESULTS / "sidco_model_step_h100_s26a.json").read_text())["rows"]}
  b = {x["row"]: x for x in json.loads((RESULTS / "sidco_model_step_h100_s26b.json").read_text())["rows"]}
  ms_ = lambda r, k, f="overhead_s": round(r[k][f] * 1e3, 2)   # noqa: E731
  assert (ms_(a, "adam", "step_s"), ms_(b, "adam", "step_s")) == (21.07, 21.2)
  assert {k: ms_(a, k) for k in a if k != "adam"} == {
      "topk": 1.01, "recipe_fixed": 2.08, "recipe_fixed_flatpre": 0.4, "recipe_fixed_flat": 0.34,
      "sidco_flat": 0.17, "sidco_pt_flat": 0.25}
  assert {k: ms_(b, k) for k in b if k != "adam"} == {
      "topk": 0.92, "sidco_pt_flat": 0.29, "dgc_pt_where": 18.08, "dgc_ptb_where": 5.39}
  assert round(a["recipe_fixed"]["overhead_s"] / a["recipe_fixed_flat"]["overhead_s"], 1) == 6.1
  assert round(a["topk"]["overhead_s"] / a["recipe_fixed_flat"]["overhead_s"], 1) == 3.0
  assert [round(v * 1e3, 2) for v in a["recipe_fixed_flatpre"]["overhead_s_iqr"]] == [0.35, 2.51]   # a slow round
  assert a["recipe_fixed"]["kernels"] - a["recipe_fixed_flat"]["kernels"] == 436
  assert (round(a["sidco_pt_flat"]["vs_topk"], 2), round(b["sidco_pt_flat"]["vs_topk"], 2)) == (4.03, 3.24)
  assert round(a["sidco_flat"]["vs_topk"], 1) == 5.8
  assert round(a["sidco_pt_flat"]["idle_s"] * 1e3, 1) == 8.1   # that row's one profiled round had a gap
  assert round(b["dgc_pt_where"]["overhead_s"] / b["dgc_ptb_where"]["overhead_s"], 1) == 3.4
  assert round(b["dgc_ptb_where"]["overhead_s"] / b["topk"]["overhead_s"], 1) == 5.8
  log = (RESULTS / "sidco_model_step_h100_s26b.log").read_text()
  assert "compiled dgc_pt_where in 115.4 s" in log and "compiled dgc_ptb_where in 51.3 s" in log
  for r in (a, b):
    assert all(x["loss_finite"] for x in r.values())


def test_quoted_h100_session27_figures():
  """Session 27's H100 rows as docs/comm.md and BENCHMARKS.md quote them: SIDCo flat and per tensor against Top-k
  once more (nine rounds), on a slower host than session 26's (``sidco_model_step_h100_s27.json``)."""
  r = {x["row"]: x for x in json.loads((RESULTS / "sidco_model_step_h100_s27.json").read_text())["rows"]}
  assert json.loads((RESULTS / "sidco_model_step_h100_s27.json").read_text())["repeats"] == 9
  assert round(r["adam"]["step_s"] * 1e3, 2) == 20.92
  assert {k: round(r[k]["overhead_s"] * 1e3, 2) for k in r if k != "adam"} == {
      "topk": 1.03, "sidco_flat": 0.23, "sidco_pt_flat": 0.31}
  assert (round(r["sidco_flat"]["vs_topk"], 2), round(r["sidco_pt_flat"]["vs_topk"], 2)) == (4.39, 3.33)
  assert r["sidco_pt_flat"]["vs_topk"] < 4.0 < r["sidco_flat"]["vs_topk"]   # per tensor: the target is not met
  assert all(x["loss_finite"] for x in r.values())


def test_quoted_h100_session28_figures():
  """Session 28's H100 rows as docs/comm.md and BENCHMARKS.md quote them: the block select against the sort-free
  counting search (8, 32, 256 thresholds per pass) inside the step, flat and per tensor (nine rounds each)."""
  a = {x["row"]: x for x in json.loads((RESULTS / "sidco_model_step_h100_s28a.json").read_text())["rows"]}
  b = {x["row"]: x for x in json.loads((RESULTS / "sidco_model_step_h100_s28b.json").read_text())["rows"]}
  assert (round(a["adam"]["step_s"] * 1e3, 2), round(b["adam"]["step_s"] * 1e3, 2)) == (20.97, 20.93)
  ov = lambda r: {k: round(r[k]["overhead_s"] * 1e3, 3) for k in r if k != "adam"}
  assert ov(a) == {"topk": 1.033, "sidco_flat": 0.174, "sidco_flat_counts": 0.18, "sidco_pt_flat": 0.294,
                   "sidco_pt_flat_counts": 0.566}
  assert ov(b) == {"topk": 0.938, "sidco_flat": 0.156, "sidco_flat_counts_w32": 0.155, "sidco_flat_counts_w256": 0.424,
                   "sidco_pt_flat": 0.272, "sidco_pt_flat_counts_w32": 0.344, "sidco_pt_flat_counts_w256": 2.589}
  vs = lambda r: {k: round(r[k]["vs_topk"], 2) for k in r if k not in ("adam", "topk")}
  assert vs(a) == {"sidco_flat": 5.95, "sidco_flat_counts": 5.73, "sidco_pt_flat": 3.52, "sidco_pt_flat_counts": 1.82}
  assert vs(b) == {"sidco_flat": 6.03, "sidco_flat_counts_w32": 6.05, "sidco_flat_counts_w256": 2.21,
                   "sidco_pt_flat": 3.44, "sidco_pt_flat_counts_w32": 2.73, "sidco_pt_flat_counts_w256": 0.36}
  for r in (a, b):   # per tensor: the target is not met; every counting row loses to the block select per tensor
    assert r["sidco_pt_flat"]["vs_topk"] < 4.0
    assert all(r[k]["overhead_s"] > r["sidco_pt_flat"]["overhead_s"] for k in r if k.startswith("sidco_pt_flat_counts"))
    assert all(x["loss_finite"] for x in r.values())
  cls = lambda r, k, c: round(r[k]["kernel_classes_s"][c] * 1e3, 2)
  assert (cls(a, "sidco_pt_flat", "sort"), cls(a, "adam", "sort")) == (0.31, 0.13)          # cub's sorts: ~0.18 ms
  assert round((b["sidco_pt_flat_counts_w32"]["kernel_classes_s"]["reduce"]
                - b["sidco_pt_flat"]["kernel_classes_s"]["reduce"]) * 1e3, 2) == 0.28


def test_way_suffix_traces_the_row_with_that_many_thresholds():
  assert ms._ways("sidco_pt_flat_counts_w32") == ("sidco_pt_flat_counts", 32)
  assert ms._ways("dgc_pt_where") == ("dgc_pt_where", None)
  sw = ms._switches("sidco_flat_counts_w256")
  assert sw["_SEARCH_WAYS"] == 256 and sw["_EXACT_SEARCH"] == "counts"
  assert ms._switches("sidco_flat")["_SEARCH_WAYS"] == ms.sp._SEARCH_WAYS
  ms._tx("sidco_pt_flat_counts_w32", 0.001)   # a known row with the suffix builds
  with pytest.raises(SystemExit, match="unknown row"):
    ms._tx("sidco_nope_w32", 0.001)


def test_quoted_h100_session30_figures():
  """Session 30's H100 rows and kernel attribution as docs/comm.md and BENCHMARKS.md quote them: SIDCo flat and
  per tensor against Top-k in two runs, three flat-residual forms (removed again: none was faster), and where the
  per-tensor step's kernel time goes (benchmarks/hlo_attribution.py on the committed HLO of run a)."""
  import gzip

  from benchmarks import hlo_attribution as ha
  a = {x["row"]: x for x in json.loads((RESULTS / "sidco_model_step_h100_s30a.json").read_text())["rows"]}
  b = {x["row"]: x for x in json.loads((RESULTS / "sidco_model_step_h100_s30b.json").read_text())["rows"]}
  assert (round(a["adam"]["step_s"] * 1e3, 2), round(b["adam"]["step_s"] * 1e3, 2)) == (21.04, 21.09)
  ov = lambda r: {k: round(r[k]["overhead_s"] * 1e3, 3) for k in r if k != "adam"}
  assert ov(a) == {"topk": 0.981, "sidco_flat": 0.169, "sidco_pt_flat": 0.282, "sidco_pt_flat_ppad": 0.305,
                   "sidco_pt_flat_cmp": 0.507, "sidco_pt_flat_ppad_cmp": 0.431}
  assert ov(b) == {"topk": 1.025, "sidco_flat": 0.179, "sidco_flat_sum": 0.155, "sidco_pt_flat": 0.217}
  vs = lambda r: {k: round(r[k]["vs_topk"], 2) for k in r if k not in ("adam", "topk")}
  assert vs(a) == {"sidco_flat": 5.82, "sidco_pt_flat": 3.48, "sidco_pt_flat_ppad": 3.22, "sidco_pt_flat_cmp": 1.94,
                   "sidco_pt_flat_ppad_cmp": 2.28}
  assert vs(b) == {"sidco_flat": 5.74, "sidco_flat_sum": 6.6, "sidco_pt_flat": 4.73}
  iqr = lambda r, k: [round(v * 1e3, 3) for v in r[k]["overhead_s_iqr"]]
  assert iqr(b, "sidco_flat") == [0.136, 0.251] and iqr(b, "sidco_flat_sum") == [0.097, 0.217]
  assert (round(a["sidco_flat"]["busy_overhead_s"] * 1e3, 3), round(a["sidco_pt_flat"]["busy_overhead_s"] * 1e3, 3)) == (
      0.485, 0.548)   # kernel time over Adam: per tensor 63 us above flat
  # none of the three forms beat its default row of the same run
  assert all(a[k]["overhead_s"] > a["sidco_pt_flat"]["overhead_s"] for k in a if k.startswith("sidco_pt_flat_"))
  assert b["sidco_flat"]["overhead_s"] > b["sidco_flat_sum"]["overhead_s"]
  # the per-tensor and flat steps' kernel time by library function (us per step)
  groups = {}
  for row in ("sidco_flat", "sidco_pt_flat"):
    with gzip.open(RESULTS / f"sidco_model_step_h100_s30a_{row}.hlo.txt.gz", "rt") as f:
      g = ha.attribute(a[row]["top_kernels"], f.read())
    groups[row] = {k: round(v * 1e6) for k, v in g.items()}
    assert sum(g.values()) == pytest.approx(a[row]["busy_s"], rel=1e-6)   # (--top kept every kernel)
  f, p = groups["sidco_flat"], groups["sidco_pt_flat"]
  assert (f["cub sort"], p["cub sort"]) == (140, 180)
  assert (f["sparse.py:_Layout.pad"], p["sparse.py:_Layout.pad"]) == (66, 153)
  assert (f["sparse.py:_concat_leaves"], p["sparse.py:_concat_leaves"]) == (79, 80)
  assert (f["sparse.py:_seg_quota"], p["sparse.py:_seg_quota"]) == (11, 35)
  assert (f["sparse.py:_sort_seg_desc"], p["sparse.py:_sort_seg_desc"]) == (7, 18)


def test_quoted_h100_session31_figures():
  """Session 31's H100 rows as README, docs/comm.md and BENCHMARKS.md quote them: the buffer and its statistics
  from the Pallas sum kernel (``_pbuild`` rows, the default since) against XLA's build in the step (runs a, b; run
  c with the new default), the update alone (the in-loop gradient no longer fuses into the build), and the build
  timed alone (sum_build.py). Every Pallas loop bitwise the XLA build's."""
  rows = lambda n: {x["row"]: x for x in json.loads((RESULTS / f"sidco_model_step_h100_s31{n}.json").read_text())["rows"]}
  a, b, c = rows("a"), rows("b"), rows("c")
  assert [round(r["adam"]["step_s"] * 1e3, 2) for r in (a, b, c)] == [21.01, 21.14, 21.07]
  ov = lambda r: {k: round(r[k]["overhead_s"] * 1e3, 3) for k in r if k != "adam"}
  assert ov(a) == {"topk": 1.019, "sidco_flat": 0.177, "sidco_flat_pbuild": 0.052, "sidco_pt_flat": 0.328,
                   "sidco_pt_flat_pbuild": 0.32}
  assert ov(b) == {"topk": 0.952, "sidco_flat": 0.174, "sidco_flat_pbuild": -0.003, "sidco_pt_flat": 0.272,
                   "sidco_pt_flat_pbuild": 0.11, "sidco": 0.209, "sidco_pbuild": 0.075, "sidco_pt": 0.321,
                   "sidco_pt_pbuild": 0.173}
  assert ov(c) == {"topk": 1.009, "sidco": 0.103, "sidco_pt": 0.157, "sidco_flat": 0.035, "sidco_pt_flat": 0.11}
  vs = lambda r, k: round(r["topk"]["overhead_s"] / r[k]["overhead_s"], 2)
  assert [vs(b, k) for k in ("sidco_pbuild", "sidco_pt_pbuild", "sidco_pt_flat_pbuild")] == [12.66, 5.51, 8.62]
  assert [vs(c, k) for k in ("sidco", "sidco_pt", "sidco_flat", "sidco_pt_flat")] == [9.81, 6.4, 28.69, 9.14]
  assert [vs(b, k) for k in ("sidco", "sidco_pt", "sidco_flat", "sidco_pt_flat")] == [4.56, 2.97, 5.48, 3.5]
  iqr = lambda r, k: [round(v * 1e3, 3) for v in r[k]["overhead_s_iqr"]]
  assert iqr(b, "sidco_flat_pbuild") == [-0.023, 0.013] and iqr(b, "sidco_pt_flat_pbuild") == [0.086, 0.128]
  # per tensor with the sum kernel: >= 5.5x topk in every row of runs b and c (tree and flat residual)
  assert min(vs(b, "sidco_pt_pbuild"), vs(b, "sidco_pt_flat_pbuild"), vs(c, "sidco_pt"), vs(c, "sidco_pt_flat")) > 5.5
  # run a had the flat per-tensor residual recomputed by XLA (no gain); b writes it from the buffer (kept_from_padded)
  assert a["sidco_pt_flat_pbuild"]["overhead_s"] > 0.9 * a["sidco_pt_flat"]["overhead_s"]
  tree = {x["method"]: x for x in json.loads((RESULTS / "sidco_tree_h100_s31b.json").read_text())["rows"]}
  ms = lambda k, f: round(tree[k][f] * 1e3, 3)
  assert [ms(k, "device_s") for k in ("topk(0.001)", "sidco(0.001)", "sidco(0.001) [pbuild]")] == [1.806, 0.808, 1.119]
  assert [ms(k, "single_busy_s") for k in ("topk(0.001)", "sidco(0.001)", "sidco(0.001) [pbuild]")] == [1.651, 0.741, 0.648]
  assert [ms(k, "single_device_s") for k in ("sidco(0.001)", "sidco(0.001) [pbuild]")] == [1.047, 1.407]
  assert all(x["loop_same_as_default"] for k, x in tree.items() if "[" in k)
  tree_a = json.loads((RESULTS / "sidco_tree_h100_s31a.json").read_text())["rows"]
  assert all(x["loop_same_as_default"] for x in tree_a if "[" in x["method"])
  sb = {x["row"]: x for x in json.loads((RESULTS / "sum_build_h100_s31a.json").read_text())["rows"]}
  us = lambda k: round(sb[k]["busy_s"] * 1e6)
  assert [us(k) for k in ("copy", "xla flat/tree", "pallas flat/tree", "xla per_tensor/flat", "pallas per_tensor/flat")] == [
      68, 206, 156, 232, 149]
  assert all(x["same_as_xla"] for k, x in sb.items() if k != "copy" and "[w4]" not in k)


def test_row_suffixes_set_the_module_switches():
  """A row's suffixes name the ``sparse`` switches it is traced with (the counting search, its Pallas passes, the
  leaf writer, the ways), and the compressor under them is the row's base transform."""
  from mlsys_jax.comm import sparse as sp
  sw = ms._switches("sidco_counts_fpass_pwriter_w16")
  assert (sw["_EXACT_SEARCH"], sw["_COUNT_PASS"], sw["_OUT_WRITE"], sw["_SEARCH_WAYS"]) == (
      "counts", "pallas", "pallas_res", 16)
  sw = ms._switches("sidco_pt_counts_pwrite")
  assert (sw["_EXACT_SEARCH"], sw["_COUNT_PASS"], sw["_OUT_WRITE"]) == ("counts", sp._COUNT_PASS, "pallas")
  sw = ms._switches("sidco")
  assert (sw["_EXACT_SEARCH"], sw["_OUT_WRITE"]) == (sp._EXACT_SEARCH, sp._OUT_WRITE)
  assert ms._tx("sidco_pt_counts_fpass_pwrite_w16", 0.01) is not None
  with pytest.raises(SystemExit, match="unknown row"):
    ms._tx("sidco_fpass_bogus", 0.01)


def _step_figures(name: str):
  """One committed step JSON's rows and the figures the docs quote from it, ms rounded to 3 places: kernel time
  over Adam's (``busy``), x ``topk`` (``vs``), wall over Adam with its IQR (``wall``), and the kernels only the
  compressor launches, the Pallas and sort classes (``own``)."""
  d = json.loads((RESULTS / name).read_text())
  r = {x["row"]: x for x in d["rows"]}
  ms_ = lambda x: round(x * 1e3, 3)   # noqa: E731
  busy = {k: ms_(v["busy_overhead_s"]) for k, v in r.items() if k != "adam"}
  vs = {k: round(v["busy_vs_topk"], 2) for k, v in r.items() if "busy_vs_topk" in v}
  wall = {k: (ms_(v["overhead_s"]), [ms_(x) for x in v["overhead_s_iqr"]]) for k, v in r.items() if k != "adam"}
  own = {k: ms_(sum(v["kernel_classes_s"].get(c, 0.0) for c in ("other", "sort"))) for k, v in r.items()}
  return d, r, busy, vs, wall, own


def test_quoted_h100_session37_figures():
  """Session 37's H100 step (``sidco_model_step_h100_s37a.json``) as docs/comm.md ("Session 37"), sparse.py and the
  history of BENCHMARKS.md quote it: kernel time over Adam's (ms) and x ``topk``, wall over Adam with its IQR; the
  counting search with Pallas passes (the default since) below the block select for one segment, above it per
  tensor."""
  d, r, busy, vs, wall, _ = _step_figures("sidco_model_step_h100_s37a.json")
  assert d["env"]["device"] == "NVIDIA H100 80GB HBM3" and round(r["adam"]["step_s"] * 1e3, 2) == 21.1
  assert busy == {"topk": 1.221, "sidco": 0.26, "sidco_counts_fpass_w16": 0.219, "sidco_counts_fpass_pwriter_w16": 0.296,
                  "sidco_pt": 0.294, "sidco_pt_counts_fpass_w16": 0.478}
  assert vs == {
      "sidco": 4.7, "sidco_counts_fpass_w16": 5.58, "sidco_counts_fpass_pwriter_w16": 4.13, "sidco_pt": 4.16,
      "sidco_pt_counts_fpass_w16": 2.55}
  assert wall == {"topk": (0.951, [0.927, 0.972]), "sidco": (0.024, [0.008, 0.051]),
                  "sidco_counts_fpass_w16": (-0.087, [-0.103, -0.02]),
                  "sidco_counts_fpass_pwriter_w16": (-0.0, [-0.014, 0.069]),
                  "sidco_pt": (0.083, [0.074, 0.121]), "sidco_pt_counts_fpass_w16": (0.14, [0.108, 0.166])}


def test_blocks_rows_force_the_block_select():
  """``_blocks`` (the default before session 37) forces the block select; the plain rows keep the module's "auto"."""
  assert ms._switches("sidco_blocks")["_EXACT_SEARCH"] == "blocks"
  assert ms._switches("sidco_flat_blocks")["_EXACT_SEARCH"] == "blocks"
  assert ms._switches("sidco")["_EXACT_SEARCH"] == ms.sp._EXACT_SEARCH == "auto"
  assert ms._switches("sidco_counts_w32")["_PASS_WAYS"] == ms._switches("sidco_counts_w32")["_SEARCH_WAYS"] == 32
  assert ms._switches("sidco")["_PASS_WAYS"] == ms.sp._PASS_WAYS
  opt = ms._tx("sidco_flat_blocks", 0.001)
  assert opt is not None


def test_quoted_h100_session38_figures():
  """Session 38's H100 step (``sidco_model_step_h100_s38a.json``), the confirmation run of session 37's default, as
  BENCHMARKS.md and docs/comm.md quote it: kernel time over Adam's and x ``topk``, wall over Adam with its IQR, and
  the kernels only the compressor launches (Pallas and sort classes): the counting search (``sidco``, ``sidco_flat``)
  below the block select (``_blocks``) in both layouts, while the whole kernel time's difference is within the
  convolutions' spread between rows."""
  d, r, busy, vs, wall, own = _step_figures("sidco_model_step_h100_s38a.json")
  assert d["env"]["device"] == "NVIDIA H100 80GB HBM3" and round(r["adam"]["step_s"] * 1e3, 2) == 20.93
  assert busy == {"topk": 1.197, "sidco": 0.248, "sidco_blocks": 0.175, "sidco_flat": 0.169,
                  "sidco_flat_blocks": 0.216, "sidco_pt": 0.323}
  assert vs == {
      "sidco": 4.82, "sidco_blocks": 6.85, "sidco_flat": 7.07, "sidco_flat_blocks": 5.53, "sidco_pt": 3.71}
  assert wall == {"topk": (0.983, [0.959, 1.044]), "sidco": (0.019, [-0.039, 0.037]),
                  "sidco_blocks": (0.051, [0.008, 0.065]), "sidco_flat": (-0.063, [-0.093, -0.058]),
                  "sidco_flat_blocks": (0.024, [0.017, 0.033]), "sidco_pt": (0.055, [0.046, 0.069])}
  assert own == {"adam": 0.0, "topk": 0.907, "sidco": 0.249, "sidco_blocks": 0.3, "sidco_flat": 0.244,
                 "sidco_flat_blocks": 0.297, "sidco_pt": 0.336}
  conv = [v["kernel_classes_s"]["conv"] * 1e3 for v in r.values()]
  assert round(max(conv) - min(conv), 3) == 0.069        # the convolutions alone move this much between rows


def test_quoted_h100_session38_second_run():
  """Session 38's second H100 step (``sidco_model_step_h100_s38b.json``, 9 rounds) as BENCHMARKS.md and docs/comm.md
  quote it: the default against the block select again, the 0.1% recipe's raveled final stage with either search,
  and the flat-state chain with Adam flattened; kernel time, wall with its IQR, and the compressor's own kernels."""
  d, r, busy, vs, wall, own = _step_figures("sidco_model_step_h100_s38b.json")
  assert d["env"]["device"] == "NVIDIA H100 80GB HBM3" and d["repeats"] == 9
  assert round(r["adam"]["step_s"] * 1e3, 2) == 20.94
  assert busy == {"topk": 1.279, "sidco": 0.183, "sidco_blocks": 0.265, "recipe_fixed_flat": 0.51,
                  "recipe_fixed_flat_blocks": 0.568, "adam_flat": -0.219, "sidco_flat_adam_flat": 0.38}
  assert vs == {
      "sidco": 6.98, "sidco_blocks": 4.83, "recipe_fixed_flat": 2.51, "recipe_fixed_flat_blocks": 2.25,
      "sidco_flat_adam_flat": 3.37}
  assert wall == {"topk": (1.095, [1.059, 1.121]), "sidco": (0.03, [0.001, 0.049]),
                  "sidco_blocks": (0.149, [0.126, 0.192]), "recipe_fixed_flat": (0.359, [0.302, 0.408]),
                  "recipe_fixed_flat_blocks": (0.414, [0.398, 0.466]), "adam_flat": (-0.449, [-0.46, -0.419]),
                  "sidco_flat_adam_flat": (0.033, [0.006, 0.055])}
  assert round(r["topk"]["overhead_s"] / r["recipe_fixed_flat"]["overhead_s"], 2) == 3.05
  assert (own["sidco"], own["sidco_blocks"], own["recipe_fixed_flat"], own["recipe_fixed_flat_blocks"]) == (
      0.249, 0.301, 0.141, 0.199)
  assert round(r["adam"]["idle_s"] * 1e3, 1) == 18.1   # (Adam's one profiled step: a long idle gap; busy time is used)


def test_quoted_h100_session40_handoff_kernels():
  """Session 40's two H100 steps (``sidco_model_step_h100_s40{a,b}.json``) as sparse.py (``_KTH_LIST``), BENCHMARKS.md
  and docs/comm.md quote them: the level handoff in two Pallas kernels (``_klist``, the default since) below the XLA
  handoff in kernel time and wall over Adam in all three pairs; the flat-state Pallas writers (``_fkeep``/``_fkeepi``
  with ``_fout``) and the tree layout's Pallas writer (``_pwrite``) above the default."""
  d, r, busy, vs, wall, _ = _step_figures("sidco_model_step_h100_s40a.json")
  assert d["env"]["device"] == "NVIDIA H100 80GB HBM3" and round(r["adam"]["step_s"] * 1e3, 2) == 20.86
  assert busy == {"topk": 1.17, "sidco": 0.149, "sidco_klist": 0.114, "sidco_flat": 0.16, "sidco_flat_fkeep_fout": 0.347,
                  "sidco_flat_fkeepi_fout": 0.25}
  assert (vs["sidco"], vs["sidco_klist"], vs["sidco_flat"]) == (7.85, 10.23, 7.3)
  assert [wall[k][0] for k in ("topk", "sidco", "sidco_klist", "sidco_flat", "sidco_flat_fkeep_fout")] == [
      0.971, -0.049, -0.073, -0.088, 0.136]
  e, s, busy_b, vs_b, wall_b, _ = _step_figures("sidco_model_step_h100_s40b.json")
  assert e["env"]["device"] == "NVIDIA H100 80GB HBM3" and round(s["adam"]["step_s"] * 1e3, 2) == 20.93
  assert busy_b == {"topk": 1.2, "sidco": 0.195, "sidco_klist": 0.136, "sidco_pwrite_klist": 0.55, "sidco_flat": 0.176,
                    "sidco_flat_klist": 0.105}
  assert (vs_b["sidco"], vs_b["sidco_klist"], vs_b["sidco_flat"], vs_b["sidco_flat_klist"]) == (6.15, 8.79, 6.82, 11.44)
  assert [wall_b[k][0] for k in ("topk", "sidco", "sidco_klist", "sidco_pwrite_klist", "sidco_flat", "sidco_flat_klist")] == [
      0.99, -0.033, -0.069, 0.445, -0.068, -0.093]
  for b, w, (xla, pal) in ((busy, wall, ("sidco", "sidco_klist")), (busy_b, wall_b, ("sidco", "sidco_klist")),
                           (busy_b, wall_b, ("sidco_flat", "sidco_flat_klist"))):
    assert b[pal] < b[xla] and w[pal][0] < w[xla][0]


def test_quoted_h100_session41_buffer_residual():
  """Session 41's H100 step (``sidco_model_step_h100_s41a.json``) as sparse.py (``_FLAT_KEPT``), BENCHMARKS.md and
  docs/comm.md quote it: the residual kept in the padded buffer (``_fbuf``) costs more kernel time over Adam than the
  default ``flat_state=True`` (the reason it is a switch), and more by the wall median."""
  d, r, busy, _, wall, own = _step_figures("sidco_model_step_h100_s41a.json")
  assert d["env"]["device"] == "NVIDIA H100 80GB HBM3" and round(r["adam"]["step_s"] * 1e3, 2) == 20.95
  assert busy == {"sidco_flat": 0.131, "sidco_flat_fbuf": 0.213}
  assert (wall["sidco_flat"][0], wall["sidco_flat_fbuf"][0]) == (-0.102, 0.066)
  assert (own["sidco_flat"], own["sidco_flat_fbuf"]) == (0.252, 0.267)


def test_quoted_h100_session41_donated_copy():
  """Session 42's reading of session 41's step trace (``sidco_model_step_h100_s41a.json``), as BENCHMARKS.md and
  docs/comm.md quote it: with the residual kept in the padded buffer (``_fbuf``) the ``copy`` kernels take 0.289 ms
  per step against the default's 0.222 (+67 us of the +81 us of kernel time: the new residual copied into the
  donated one), reductions +36 us and fusions -22 us; the per-class sums add up to the busy times compared."""
  d = json.loads((RESULTS / "sidco_model_step_h100_s41a.json").read_text())
  rows = {row["row"]: row for row in d["rows"]}
  base, fbuf = rows["sidco_flat"], rows["sidco_flat_fbuf"]
  classes = lambda row: {k: round(v * 1e3, 3) for k, v in row["kernel_classes_s"].items()}
  assert (classes(base)["copy"], classes(fbuf)["copy"]) == (0.222, 0.289)
  delta = {k: round((fbuf["kernel_classes_s"][k] - base["kernel_classes_s"][k]) * 1e6) for k in base["kernel_classes_s"]}
  assert (delta["copy"], delta["reduce"], delta["fusion"]) == (67, 36, -22)
  assert round((fbuf["busy_s"] - base["busy_s"]) * 1e6) == 81
  for row in (base, fbuf):   # the classes partition the busy time
    assert abs(sum(row["kernel_classes_s"].values()) - row["busy_s"]) < 1e-6


def test_quoted_h100_session43_steps():
  """Session 43's three H100 steps on the code with the session-42 fixes (``sidco_model_step_h100_s43{a,c,e}.json``)
  as README, BENCHMARKS.md and docs/comm.md quote them: kernel time over Adam (ms) and x ``topk``, wall over Adam; the
  in-place flat residual writer (``_fkeepi``) below the default ``flat_state=True`` in kernel time in all three runs
  (its Pallas kernel, +70 us of ``other``, in place of XLA's residual fusion, -94 us of ``fusion``, in run a), and
  tied by the wall (its median over Adam below the default's in run e, above in runs a and c)."""
  d, r, busy, vs, wall, _ = _step_figures("sidco_model_step_h100_s43c.json")
  assert d["env"]["device"] == "NVIDIA H100 80GB HBM3" and round(r["adam"]["step_s"] * 1e3, 2) == 20.97
  assert busy == {"topk": 1.219, "sidco": 0.11, "sidco_flat": 0.175, "sidco_pt": 0.291, "sidco_flat_fkeepi": 0.103}
  assert vs == {"sidco": 11.03, "sidco_flat": 6.95, "sidco_pt": 4.18, "sidco_flat_fkeepi": 11.89}
  assert {k: v[0] for k, v in wall.items()} == {"topk": 0.932, "sidco": -0.119, "sidco_flat": -0.147, "sidco_pt": 0.146,
                                                "sidco_flat_fkeepi": -0.121}
  e, s, busy_e, vs_e, wall_e, _ = _step_figures("sidco_model_step_h100_s43e.json")
  assert e["env"]["device"] == "NVIDIA H100 80GB HBM3"
  assert busy_e == {"topk": 1.181, "sidco": 0.152, "sidco_flat": 0.151, "sidco_pt": 0.305, "sidco_flat_fkeepi": 0.132}
  assert vs_e == {"sidco": 7.75, "sidco_flat": 7.84, "sidco_pt": 3.88, "sidco_flat_fkeepi": 8.95}
  assert {k: v[0] for k, v in wall_e.items()} == {"topk": 0.932, "sidco": -0.103, "sidco_flat": -0.092,
                                                  "sidco_pt": 0.136, "sidco_flat_fkeepi": -0.138}
  assert (round(wall["topk"][0] / wall["sidco_pt"][0], 1), round(wall_e["topk"][0] / wall_e["sidco_pt"][0], 1)) == (
      6.4, 6.9)
  a, ra, busy_a, _, wall_a, _ = _step_figures("sidco_model_step_h100_s43a.json")
  assert a["env"]["device"] == "NVIDIA H100 80GB HBM3"
  assert busy_a == {"sidco": 0.18, "sidco_flat": 0.177, "sidco_flat_fkeepi": 0.143, "sidco_flat_fkeep": 0.303}
  assert (wall_a["sidco_flat"][0], wall_a["sidco_flat_fkeepi"][0]) == (-0.109, -0.101)
  gain = [round((b["sidco_flat"] - b["sidco_flat_fkeepi"]) * 1e3) for b in (busy_a, busy, busy_e)]
  assert gain == [34, 72, 19]
  cls = lambda row, k: ra[row]["kernel_classes_s"].get(k, 0.0)   # noqa: E731
  assert round((cls("sidco_flat_fkeepi", "other") - cls("sidco_flat", "other")) * 1e6) == 70
  assert round((cls("sidco_flat_fkeepi", "fusion") - cls("sidco_flat", "fusion")) * 1e6) == -94


def test_quoted_h100_session43_span_and_summed_kernels():
  """Session 44's reading of session 43's step traces (``sidco_model_step_h100_s43{c,e}.json``), as BENCHMARKS.md,
  docs/comm.md and README quote it: the "kernel time" of those JSONs (``busy_s``) is the kernels' durations summed,
  which exceeds the device span by 0.22-0.32 ms in the compressor rows (concurrent kernels each counted), while
  Adam's is 0.04-0.09 ms below its span (idle); by the span the ``sidco`` and ``flat_state=True`` steps are 0.17-0.24 ms shorter than
  Adam's, per tensor +0.029 / +0.013 ms, ``topk`` +0.890 / +0.834 ms; 1.6-2.5 passes of the device-timed 0.0705 ms."""
  spans, excess = {}, {}
  for run in ("c", "e"):
    r = {x["row"]: x for x in json.loads((RESULTS / f"sidco_model_step_h100_s43{run}.json").read_text())["rows"]}
    spans[run] = {k: round((v["device_s"] - r["adam"]["device_s"]) * 1e3, 3) for k, v in r.items() if k != "adam"}
    excess[run] = {k: round((v["busy_s"] - v["device_s"]) * 1e3, 2) for k, v in r.items()}
  assert (spans["c"]["topk"], spans["e"]["topk"]) == (0.89, 0.834)
  assert (spans["c"]["sidco_pt"], spans["e"]["sidco_pt"]) == (0.029, 0.013)
  assert all(-0.24 <= spans[run][k] <= -0.17 for run in "ce" for k in ("sidco", "sidco_flat"))
  assert all(0.22 <= v[k] <= 0.32 for v in excess.values() for k in v if k != "adam")   # (sum above the span)
  assert all(0.03 <= -v["adam"] <= 0.09 for v in excess.values())   # (Adam's sum below its span: real idle)
  passes = [round(b / 0.0705, 1) for b in (0.110, 0.152, 0.175, 0.151)]
  assert (min(passes), max(passes)) == (1.6, 2.5)
  assert [round(b / 0.0705, 1) for b in (0.291, 0.305)] == [4.1, 4.3]


def test_quoted_h100_session43_kernels_a_compressor_adds():
  """Session 45's reading of session 43's step traces (``sidco_model_step_h100_s43{c,e}.json``), as README,
  BENCHMARKS.md and docs/comm.md quote it: Adam's own step runs 0.46-0.47 ms of ``copy`` kernels, every compressor row
  0.21-0.24 ms less and 83-167 fewer kernels; by every class but ``copy`` (``noncopy_overhead_s``) ``sidco`` adds
  0.350 / 0.391 ms, ``flat_state=True`` 0.416 / 0.389, per tensor 0.503 / 0.517, ``topk`` 1.450 / 1.411: 4.14x /
  3.61x, 3.49x / 3.62x, 2.88x / 2.73x, 5.0-5.9 passes of the device-timed 0.0705 ms."""
  added, vs, passes = {}, {}, []
  for run in "ce":
    rows = _rows(f"sidco_model_step_h100_s43{run}.json")
    ms._summarize(rows)
    r = {x["row"]: x for x in rows}
    assert 0.46 <= round(r["adam"]["kernel_classes_s"]["copy"] * 1e3, 2) <= 0.47
    for k, v in r.items():
      if k != "adam":
        assert -0.24 <= round(v["copy_over_adam_s"] * 1e3, 2) <= -0.21, (run, k)
        assert -167 <= v["kernels"] - r["adam"]["kernels"] <= -83, (run, k)
        # (the per-class differences add up to the summed kernel time over Adam)
        assert v["noncopy_overhead_s"] + v["copy_over_adam_s"] == pytest.approx(v["busy_overhead_s"], abs=1e-9)
    added[run] = {k: round(v["noncopy_overhead_s"] * 1e3, 3) for k, v in r.items() if k in ("topk", "sidco", "sidco_flat", "sidco_pt")}
    vs[run] = {k: round(r[k]["noncopy_vs_topk"], 2) for k in ("sidco", "sidco_flat", "sidco_pt")}
    passes += [round(r[k]["noncopy_overhead_s"] * 1e3 / 0.0705, 1) for k in ("sidco", "sidco_flat")]
  assert added == {"c": {"topk": 1.45, "sidco": 0.35, "sidco_flat": 0.416, "sidco_pt": 0.503},
                   "e": {"topk": 1.411, "sidco": 0.391, "sidco_flat": 0.389, "sidco_pt": 0.517}}
  assert vs == {"c": {"sidco": 4.14, "sidco_flat": 3.49, "sidco_pt": 2.88},
                "e": {"sidco": 3.61, "sidco_flat": 3.62, "sidco_pt": 2.73}}
  assert (min(passes), max(passes)) == (5.0, 5.9)


def test_class_detail_counts_every_class_and_ranks_copies_by_count():
  events = [(0, 1, 1000, "memcpy128"), (1, 2, 1000, "memcpy128"), (2, 3, 9000, "copy_7"),
            (3, 4, 5000, "loop_multiply_fusion"), (4, 5, 3000, "void cub::DeviceRadixSortOnesweepKernel")]
  counts, names = ms._class_detail(events, steps=2, top=1)
  assert counts == {"copy": 1.5, "fusion": 0.5, "sort": 0.5}
  assert names == [("memcpy128", pytest.approx(1e-6), 1.0)]   # the most frequent, not the longest
  rows = [{"row": "adam", "step_s_all": [1.0], "step_s": 1.0, "kernel_classes_s": {"copy": 3.0, "fusion": 1.0}},
          {"row": "topk", "step_s_all": [1.5], "step_s": 1.5, "kernel_classes_s": {"copy": 1.0, "fusion": 4.0, "sort": 2.0}},
          {"row": "sidco", "step_s_all": [1.1], "step_s": 1.1, "kernel_classes_s": {"copy": 1.0, "fusion": 2.5}}]
  ms._summarize(rows)
  assert rows[1]["classes_over_adam_s"] == {"copy": -2.0, "fusion": 3.0, "sort": 2.0}
  assert (rows[1]["noncopy_overhead_s"], rows[2]["noncopy_overhead_s"], rows[2]["noncopy_vs_topk"]) == (5.0, 1.5, 5.0 / 1.5)
  assert rows[0]["noncopy_overhead_s"] == 0.0 and "noncopy_vs_topk" not in rows[0]


def test_quoted_flattened_adam_is_the_stronger_baseline():
  """Session 45's reading, as README, BENCHMARKS.md and docs/comm.md quote it: ``optax.flatten(optax.adam)`` alone
  (``adam_flat``) runs the compressor rows' copy time, not plain Adam's, the same kernel time in every other class,
  and is 0.449 / 0.632 ms faster per step than plain Adam (H100 f32, ``_s38b`` / ``_s22b``; H200 bf16 ``_s19a``: 0.866);
  over it in ``_s38b``: ``sidco`` +0.469 ms wall / +0.403 ms kernels, ``topk`` +1.544 / +1.498 (3.3x / 3.7x), the
  flat chain +0.478 / +0.599."""
  over, kern = {}, {}
  for run in ("h100_s38b", "h100_s22b", "h200_s19a"):
    rows = _rows(f"sidco_model_step_{run}.json")
    ms._summarize(rows)
    r = {x["row"]: x for x in rows}
    over[run] = {k: round(v["over_adam_flat_s"] * 1e3, 3) for k, v in r.items()}
    kern[run] = {k: round(v["kernels_over_adam_flat_s"] * 1e3, 3) for k, v in r.items()}
    copy = lambda k: r[k]["kernel_classes_s"]["copy"] * 1e3   # noqa: E731
    if run != "h200_s19a":
      assert 0.216 <= round(copy("adam_flat"), 3) <= 0.221 and 0.456 <= round(copy("adam"), 3) <= 0.462
      noncopy = lambda k: sum(v for c, v in r[k]["kernel_classes_s"].items() if c != "copy") * 1e3   # noqa: E731
      assert -0.022 <= noncopy("adam") - noncopy("adam_flat") <= -0.012
      assert 194 <= r["adam"]["kernels"] - r["adam_flat"]["kernels"] <= 206
  assert (over["h100_s38b"]["adam"], over["h100_s22b"]["adam"], over["h200_s19a"]["adam"]) == (0.449, 0.632, 0.866)
  b = over["h100_s38b"]
  assert (b["sidco"], b["topk"], b["sidco_flat_adam_flat"]) == (0.469, 1.544, 0.478)
  k = kern["h100_s38b"]
  assert (k["sidco"], k["topk"], k["sidco_flat_adam_flat"]) == (0.403, 1.498, 0.599)
  assert (round(b["topk"] / b["sidco"], 1), round(k["topk"] / k["sidco"], 1), round(k["sidco"] / 0.0705, 1)) == (3.3, 3.7, 5.7)


def test_flattened_adam_rows_chain_the_compressor_with_a_flattened_adam():
  import jax.numpy as jnp
  params = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((4,))}
  for row in ("topk_adam_flat", "sidco_adam_flat", "sidco_pt_adam_flat", "adam_flat"):
    state = ms._tx(row, 0.1).init(params)
    adam = state[-1] if row != "adam_flat" else state
    # optax.flatten's state holds Adam's moments as one raveled vector of all 10 entries
    assert [x.shape for x in __import__("jax").tree_util.tree_leaves(adam) if x.ndim == 1] == [(10,), (10,)], row


def test_flattened_adam_figures_need_no_plain_adam_row():
  rows = [{"row": "adam_flat", "step_s_all": [1.0, 1.2], "step_s": 1.1, "kernel_classes_s": {"copy": 1.0, "fusion": 2.0}},
          {"row": "topk_adam_flat", "step_s_all": [1.5, 1.9], "step_s": 1.7,
           "kernel_classes_s": {"copy": 1.0, "fusion": 2.5, "sort": 1.0}}]
  ms._summarize(rows)
  assert rows[1]["over_adam_flat_s"] == pytest.approx(0.6) and rows[1]["kernels_over_adam_flat_s"] == pytest.approx(1.5)
  assert "overhead_s" not in rows[1]   # (the figures over plain Adam need its row)
