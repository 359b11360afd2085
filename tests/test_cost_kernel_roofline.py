"""Per-kernel roofline (mlsys_jax.cost.kernel_roofline): kernel tables of tiny hand-written HLO modules
against hand-computed flops/bytes/classes/launch counts, predictions against a numpy loop, the fit
recovering known parameters on synthetic programs, OOD flags and bad input."""

import numpy as np
import pytest

from mlsys_jax.cost import kernel_roofline as KR
from mlsys_jax.cost.hlo import parse_hlo

C = KR.CLASS_ID

GEMM_LOOP = """HloModule m
%body (t: (s32[], f32[4,8], f32[16,4,8])) -> (s32[], f32[4,8], f32[16,4,8]) {
  %t = (s32[], f32[4,8]{1,0}, f32[16,4,8]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %h = f32[4,8]{1,0} get-tuple-element(%t), index=1
  %xs = f32[16,4,8]{2,1,0} get-tuple-element(%t), index=2
  %z = s32[] constant(0)
  %x = f32[1,4,8]{2,1,0} dynamic-slice(%xs, %i, %z, %z), dynamic_slice_sizes={1,4,8}
  %w = f32[8,8]{1,0} constant({...})
  %d = f32[4,8]{1,0} dot(%h, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %i1 = s32[] add(%i, %one)
  ROOT %r = (s32[], f32[4,8]{1,0}, f32[16,4,8]{2,1,0}) tuple(%i1, %d, %xs)
}
%cond (c: (s32[], f32[4,8], f32[16,4,8])) -> pred[] {
  %c = (s32[], f32[4,8]{1,0}, f32[16,4,8]{2,1,0}) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(16)
  ROOT %lt = pred[] compare(%ci, %n), direction=LT
}
ENTRY %e (h0: f32[4,8], xs0: f32[16,4,8]) -> (s32[], f32[4,8], f32[16,4,8]) {
  %h0 = f32[4,8]{1,0} parameter(0)
  %xs0 = f32[16,4,8]{2,1,0} parameter(1)
  %i0 = s32[] constant(0)
  %t0 = (s32[], f32[4,8]{1,0}, f32[16,4,8]{2,1,0}) tuple(%i0, %h0, %xs0)
  ROOT %wl = (s32[], f32[4,8]{1,0}, f32[16,4,8]{2,1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"16"}}
}
"""

FUSIONS = """HloModule f
%slice_add (p0: f32[64,32], p1: s32[], p2: f32[32]) -> f32[1,32] {
  %p0 = f32[64,32]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %p2 = f32[32]{0} parameter(2)
  %z = s32[] constant(0)
  %ds = f32[1,32]{1,0} dynamic-slice(%p0, %p1, %z), dynamic_slice_sizes={1,32}
  %b = f32[1,32]{1,0} reshape(%p2)
  ROOT %a = f32[1,32]{1,0} add(%ds, %b)
}
%dus (q0: f32[64,32], q1: f32[1,32], q2: s32[]) -> f32[64,32] {
  %q0 = f32[64,32]{1,0} parameter(0)
  %q1 = f32[1,32]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %z2 = s32[] constant(0)
  ROOT %u = f32[64,32]{1,0} dynamic-update-slice(%q0, %q1, %q2, %z2)
}
%sum (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}
%red (r0: f32[64,32]) -> f32[64] {
  %r0 = f32[64,32]{1,0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %rs = f32[64]{0} reduce(%r0, %zero), dimensions={1}, to_apply=%sum
}
ENTRY %e (a: f32[64,32], i: s32[], v: f32[32], x: bf16[8,16,16,4], k: bf16[3,3,4,8]) -> (f32[64,32], f32[64], bf16[8,16,16,8]) {
  %a = f32[64,32]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %v = f32[32]{0} parameter(2)
  %x = bf16[8,16,16,4]{3,2,1,0} parameter(3)
  %k = bf16[3,3,4,8]{3,2,1,0} parameter(4)
  %f1 = f32[1,32]{1,0} fusion(%a, %i, %v), kind=kLoop, calls=%slice_add
  %f2 = f32[64,32]{1,0} fusion(%a, %f1, %i), kind=kLoop, calls=%dus
  %f3 = f32[64]{0} fusion(%f2), kind=kInput, calls=%red
  %cv = (bf16[8,16,16,8]{3,2,1,0}, u8[0]{0}) custom-call(%x, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", backend_config={"cudnn_conv_backend_config":{"activation_mode":"kNone"}}
  %y = bf16[8,16,16,8]{3,2,1,0} get-tuple-element(%cv), index=0
  ROOT %out = (f32[64,32]{1,0}, f32[64]{0}, bf16[8,16,16,8]{3,2,1,0}) tuple(%f2, %f3, %y)
}
"""


def test_program_kernels_loop_counts_and_gemm():
  kt = KR.program_kernels(GEMM_LOOP)
  names = [KR.KERNEL_CLASSES[c] for c in kt.klass]
  # body: dynamic-slice, dot, add (per trip, 16 trips); condition: compare (class loop), never launched with a
  # known trip count (XLA's WhileThunk runs the body alone), twice (1 assumed trip + exit) without one
  assert names == ["slice", "gemm_f32", "elementwise", "loop"]
  np.testing.assert_array_equal(kt.count, [16, 16, 16, 0])
  assert kt.flops[1] == 2 * 4 * 8 * 8                      # 2 M N K
  assert kt.bytes[1] == 4 * (4 * 8 + 8 * 8 + 4 * 8)        # operands + output, f32
  assert kt.bytes[0] == 2 * 4 * (1 * 4 * 8)                # a slice reads only what it returns
  assert kt.unknown_trips == 0
  no_trip = KR.program_kernels(GEMM_LOOP.replace(', backend_config={"known_trip_count":{"n":"16"}}', ""))
  np.testing.assert_array_equal(no_trip.count, [1, 1, 1, 2])
  assert no_trip.unknown_trips == 1


def test_program_kernels_fusion_bytes_and_classes():
  kt = KR.program_kernels(parse_hlo(FUSIONS))
  names = [KR.KERNEL_CLASSES[c] for c in kt.klass]
  assert names == ["elementwise", "slice", "reduce", "conv_untuned"]
  f4 = 4.0
  # f1 reads one row of %a (through the slice), the scalar index and %v, writes one row
  assert kt.bytes[0] == 32 * f4 + 4 + 32 * f4 + 32 * f4
  # f2 updates %a in place: reads the update row and the index, writes the row
  assert kt.bytes[1] == 32 * f4 + 4 + 32 * f4
  assert kt.bytes[2] == 64 * 32 * f4 + 64 * f4
  assert kt.flops[2] == 64 * 32                            # one per input element
  # convolution: 2 * out elements * window * Cin; bytes: inputs + result (not the workspace)
  assert kt.flops[3] == 2 * (8 * 16 * 16 * 8) * (3 * 3 * 4)
  assert kt.bytes[3] == 2 * (8 * 16 * 16 * 4 + 3 * 3 * 4 * 8 + 8 * 16 * 16 * 8)
  tuned = FUSIONS.replace('{"activation_mode":"kNone"}', '{"activation_mode":"kNone","algorithm":{"algo_id":"1"}}')
  assert KR.KERNEL_CLASSES[KR.program_kernels(tuned).klass[3]] == "conv"
  np.testing.assert_array_equal(kt.count, 1)


def test_program_kernels_empty_and_bad_input():
  kt = KR.program_kernels("HloModule m\nENTRY e { ROOT p = f32[4]{0} parameter(0) }")
  assert kt.flops.size == 0 and kt.klass.dtype == np.int32
  with pytest.raises(TypeError, match="HloModule or HLO text"):
    KR.program_kernels(3)


def _table(rng, classes, n):
  k = rng.choice(classes, n).astype(np.int32)
  return KR.KernelTable(flops=10 ** rng.uniform(6, 11, n) * (rng.random(n) < 0.7),
                        bytes=10 ** rng.uniform(4, 8, n), klass=k, count=rng.choice([1.0, 4.0], n))


def _model(devices, rng):
  D, Cn = len(devices), len(KR.KERNEL_CLASSES)
  return KR.KernelRoofline(tuple(devices), np.log(10 ** rng.uniform(13, 14.5, (D, Cn))),
                           np.log(10 ** rng.uniform(11.5, 12.5, (D, Cn))), np.log(10 ** rng.uniform(-6, -5, (D, Cn))),
                           np.log(np.full(D, 3e-5)), 4.0, np.ones((D, Cn)))


def test_predict_matches_numpy_loop():
  rng = np.random.default_rng(0)
  devs = ["a", "b"]
  m = _model(devs, rng)
  tables = [_table(rng, [0, 2, 5, 7], int(rng.integers(0, 6))) for _ in range(7)]
  dv = [devs[i % 2] for i in range(7)]
  got = KR.predict_kernel_roofline(m, tables, dv)
  for t, d, g in zip(tables, dv, got):
    di = devs.index(d)
    ref = np.exp(m.log_program_overhead[di])
    for f, b, c, n in zip(t.flops, t.bytes, t.klass, t.count):
      a, bb = f / np.exp(m.log_flops_rate[di, c]), b / np.exp(m.log_bytes_rate[di, c])
      ref += n * ((a ** 4 + bb ** 4) ** 0.25 + np.exp(m.log_overhead[di, c]))
    np.testing.assert_allclose(g, ref, rtol=1e-12)
  np.testing.assert_allclose(KR.predict_kernel_roofline(KR.scale_kernel_roofline(m, 1.7), tables, dv), 1.7 * got,
                             rtol=1e-12)
  with pytest.raises(ValueError, match="not in the training data"):
    KR.predict_kernel_roofline(m, tables[:1], ["c"])
  with pytest.raises(ValueError, match="one device per program"):
    KR.predict_kernel_roofline(m, tables, dv[:3])
  bad = KR.KernelTable(-np.ones(1), np.ones(1), np.zeros(1, np.int32), np.ones(1))
  with pytest.raises(ValueError, match="finite and >= 0"):
    KR.predict_kernel_roofline(m, [bad], ["a"])
  with pytest.raises(TypeError, match="not a KernelTable"):
    KR.predict_kernel_roofline(m, [(1, 2)], ["a"])


def test_fit_recovers_synthetic_programs_and_flags_unseen_classes():
  rng = np.random.default_rng(1)
  truth = _model(["a"], rng)._replace(sharpness=16.0)
  seen = [C["gemm"], C["reduce"], C["elementwise"]]
  tables = [_table(rng, seen, int(rng.integers(1, 8))) for _ in range(120)]
  y = KR.predict_kernel_roofline(truth, tables, ["a"] * 120)
  cfg = KR.KernelRooflineConfig(steps=1500, learning_rate=0.05, calibrate=False, ridge=0.0)
  m = KR.fit_kernel_roofline(tables[:90], y[:90], ["a"] * 90, cfg)
  p = KR.predict_kernel_roofline(m, tables[90:], ["a"] * 30)
  assert np.mean(np.abs(p / y[90:] - 1)) < 0.05          # exact model class: held-out programs within 5%
  base = np.mean(np.abs(p * 0 + np.median(y[:90]) - y[90:]) / y[90:])
  assert base > 0.5                                       # ... where a constant is far off
  # classes never seen: the median of the fitted ones, and flagged
  unseen = [c for c in range(len(KR.KERNEL_CLASSES)) if c not in seen]
  np.testing.assert_allclose(m.log_flops_rate[0, unseen], np.median(m.log_flops_rate[0, seen]))
  assert m.train_kernels[0, unseen].sum() == 0 and m.train_kernels[0, seen].min() > 0
  t_new = KR.KernelTable(np.ones(2), np.ones(2), np.asarray([C["gemm"], C["conv"]], np.int32), np.ones(2))
  assert KR.kernel_roofline_ood(m, [tables[0], t_new], ["a", "a"]) == [[], ["conv"]]
  # calibration: one scale, MAPE on the training programs no worse
  mc = KR.fit_kernel_roofline(tables[:90], y[:90] * 1.3, ["a"] * 90, cfg._replace(calibrate=True, steps=300))
  mu = KR.fit_kernel_roofline(tables[:90], y[:90] * 1.3, ["a"] * 90, cfg._replace(steps=300))
  mape = lambda mm: np.mean(np.abs(KR.predict_kernel_roofline(mm, tables[:90], ["a"] * 90) / (1.3 * y[:90]) - 1))
  assert mape(mc) <= mape(mu) + 1e-9


def test_fit_bad_input():
  rng = np.random.default_rng(2)
  t = [_table(rng, [0], 3) for _ in range(3)]
  with pytest.raises(ValueError, match="positive finite runtimes"):
    KR.fit_kernel_roofline(t, [1e-3, -1.0, 1e-3], ["a"] * 3)
  with pytest.raises(ValueError, match="objective"):
    KR.fit_kernel_roofline(t, [1e-3] * 3, ["a"] * 3, KR.KernelRooflineConfig(objective="l1"))
  with pytest.raises(ValueError, match="sharpness"):
    KR.fit_kernel_roofline(t, [1e-3] * 3, ["a"] * 3, KR.KernelRooflineConfig(sharpness=0.5))
  with pytest.raises(ValueError, match="at least one program"):
    KR.fit_kernel_roofline([], [], [])
  with pytest.raises(ValueError, match="positive and finite"):
    KR.scale_kernel_roofline(_model(["a"], rng), 0.0)


COND = """HloModule c
%small (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %n = f32[8]{0} negate(%a)
}
%big (b: f32[8]) -> f32[8] {
  %b = f32[8]{0} parameter(0)
  %e = f32[8]{0} exponential(%b)
  ROOT %m = f32[8]{0} multiply(%e, %e)
}
ENTRY %e (p: pred[], x: f32[8]) -> f32[8] {
  %p = pred[] parameter(0)
  %x = f32[8]{0} parameter(1)
  ROOT %c = f32[8]{0} conditional(%p, %x, %x), true_computation=%small, false_computation=%big
}
"""


def test_program_kernels_conditional_counts_costliest_branch():
  kt = KR.program_kernels(COND)
  assert [KR.KERNEL_CLASSES[c] for c in kt.klass] == ["elementwise", "elementwise"]  # %big: 2 kernels
  np.testing.assert_array_equal(kt.bytes, [64.0, 64.0])


# review fixes (session 13): a kernel with no flops and no bytes, a GEMM branch, collectives, integer classes
def test_fit_survives_an_empty_kernel():
  rng = np.random.default_rng(3)
  truth = _model(["a"], rng)._replace(sharpness=16.0)
  tables = [_table(rng, [C["gemm"], C["elementwise"]], int(rng.integers(1, 6))) for _ in range(30)]
  y = KR.predict_kernel_roofline(truth, tables, ["a"] * 30)
  t0 = tables[0]   # an f32[0] op: flops 0, bytes 0 (its launch overhead only)
  tables[0] = KR.KernelTable(np.append(t0.flops, 0.0), np.append(t0.bytes, 0.0),
                             np.append(t0.klass, C["elementwise"]).astype(np.int32), np.append(t0.count, 1.0))
  m = KR.fit_kernel_roofline(tables, y, ["a"] * 30, KR.KernelRooflineConfig(steps=50))
  assert np.all(np.isfinite(m.log_flops_rate)) and np.all(np.isfinite(KR.predict_kernel_roofline(m, tables, ["a"] * 30)))


_GEMM_BRANCH = """HloModule m
gemm_branch { p = (f32[2048,2048]{1,0}) parameter(0)
  a = f32[2048,2048]{1,0} get-tuple-element(p), index=0
  ROOT d = f32[2048,2048]{1,0} dot(a, a), lhs_contracting_dims={1}, rhs_contracting_dims={0} }
copy_branch { q = (f32[2048,2048]{1,0}) parameter(0)
  b = f32[2048,2048]{1,0} get-tuple-element(q), index=0
  e = f32[2048,2048]{1,0} exponential(b)
  f = f32[2048,2048]{1,0} exponential(e)
  ROOT g = f32[2048,2048]{1,0} exponential(f) }
ENTRY e { i = s32[] parameter(0)
  x = f32[2048,2048]{1,0} parameter(1)
  t = (f32[2048,2048]{1,0}) tuple(x)
  ROOT c = f32[2048,2048]{1,0} conditional(i, t, t), branch_computations={gemm_branch, copy_branch} }"""


def test_conditional_branch_chosen_by_time_not_bytes_and_collectives_are_not_elementwise():
  # the GEMM branch (17 GFLOP, 50 MB: 86 us at the default rates) outlasts three exponentials (100 MB: 59 us);
  # by bytes alone the exponentials would win
  kt = KR.program_kernels(_GEMM_BRANCH)
  assert [KR.KERNEL_CLASSES[c] for c in kt.klass] == ["gemm_f32"]
  ar = """HloModule m
sum { a = f32[] parameter(0)
  b = f32[] parameter(1)
  ROOT s = f32[] add(a, b) }
ENTRY e { x = f32[1024]{0} parameter(0)
  ROOT r = f32[1024]{0} all-reduce(x), to_apply=sum }"""
  assert [KR.KERNEL_CLASSES[c] for c in KR.program_kernels(ar).klass] == ["other"]


def test_tables_need_integer_classes():
  t = KR.KernelTable(np.ones(1), np.ones(1), np.asarray([2.7]), np.ones(1))
  with pytest.raises(TypeError, match="integer indices"):
    KR.predict_kernel_roofline(_model(["a"], np.random.default_rng(0)), [t], ["a"])


# review fixes (session 15): nested loops, the multiplier passed down, and seen classes / OOD of loops that
# launch no condition kernel
def _nested(outer_trips, inner_trips):
  cfg = lambda n: "" if n is None else f', backend_config={{"known_trip_count":{{"n":"{n}"}}}}'
  return f"""HloModule n
%ib (a: (s32[], f32[8])) -> (s32[], f32[8]) {{
  %a = (s32[], f32[8]{{0}}) parameter(0)
  %ai = s32[] get-tuple-element(%a), index=0
  %av = f32[8]{{0}} get-tuple-element(%a), index=1
  %e = f32[8]{{0}} exponential(%av)
  ROOT %r = (s32[], f32[8]{{0}}) tuple(%ai, %e)
}}
%ic (b: (s32[], f32[8])) -> pred[] {{
  %b = (s32[], f32[8]{{0}}) parameter(0)
  %bi = s32[] get-tuple-element(%b), index=0
  %k = s32[] constant(4)
  ROOT %lt = pred[] compare(%bi, %k), direction=LT
}}
%ob (c: (s32[], f32[8])) -> (s32[], f32[8]) {{
  %c = (s32[], f32[8]{{0}}) parameter(0)
  %w = (s32[], f32[8]{{0}}) while(%c), condition=%ic, body=%ib{cfg(inner_trips)}
  %ci = s32[] get-tuple-element(%w), index=0
  %cv = f32[8]{{0}} get-tuple-element(%w), index=1
  %n = f32[8]{{0}} negate(%cv)
  ROOT %s = (s32[], f32[8]{{0}}) tuple(%ci, %n)
}}
%oc (d: (s32[], f32[8])) -> pred[] {{
  %d = (s32[], f32[8]{{0}}) parameter(0)
  %di = s32[] get-tuple-element(%d), index=0
  %m = s32[] constant(3)
  ROOT %lt2 = pred[] compare(%di, %m), direction=LT
}}
ENTRY %e (x: f32[8]) -> (s32[], f32[8]) {{
  %x = f32[8]{{0}} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[8]{{0}}) tuple(%z, %x)
  ROOT %o = (s32[], f32[8]{{0}}) while(%t), condition=%oc, body=%ob{cfg(outer_trips)}
}}
"""


def test_program_kernels_nested_loops_pass_the_multiplier_down():
  # rows in walk order: inner body (exponential), inner condition (compare), outer body (negate), outer condition
  counts = lambda kt: dict(zip(kt.names, kt.count))
  kt = KR.program_kernels(_nested(3, 4))       # both known: bodies 3 x 4 and 3 runs, no condition launched
  assert counts(kt) == {"e": 12.0, "lt": 0.0, "n": 3.0, "lt2": 0.0} and kt.unknown_trips == 0
  kt = KR.program_kernels(_nested(3, None))    # inner unknown: 1 assumed trip per outer trip, its condition 2x3
  assert counts(kt) == {"e": 3.0, "lt": 6.0, "n": 3.0, "lt2": 0.0} and kt.unknown_trips == 1
  kt = KR.program_kernels(_nested(None, 4))    # outer unknown: its condition twice, the inner body 1 x 4
  assert counts(kt) == {"e": 4.0, "lt": 0.0, "n": 1.0, "lt2": 2.0} and kt.unknown_trips == 1
  kt = KR.program_kernels(_nested(0, None))    # an outer loop of 0 trips: nothing inside runs, no guess made
  assert counts(kt) == {"e": 0.0, "lt": 0.0, "n": 0.0, "lt2": 0.0} and kt.unknown_trips == 0
  assert KR.CLASS_ID["loop"] == kt.klass[list(kt.names).index("lt")]


def test_seen_classes_and_ood_count_only_kernels_that_launch():
  """Training programs whose only ``loop`` rows are conditions of known-trip loops (count 0) leave ``loop``
  unseen; a program with such rows is not flagged for them, one whose loop condition runs (unknown trip
  count) is flagged ``loop`` and ``unknown_trip_count``."""
  known, unknown = KR.program_kernels(GEMM_LOOP), KR.program_kernels(
      GEMM_LOOP.replace(', backend_config={"known_trip_count":{"n":"16"}}', ""))
  rng = np.random.default_rng(5)
  scaled = [known._replace(flops=known.flops * s, bytes=known.bytes * s) for s in 10 ** rng.uniform(0, 3, 8)]
  y = 1e-5 + np.asarray([float((t.flops * t.count).sum()) for t in scaled]) / 1e13
  m = KR.fit_kernel_roofline(scaled, y, ["a"] * 8, KR.KernelRooflineConfig(steps=20))
  assert m.train_kernels[0, C["loop"]] == 0 and m.train_kernels[0, C["gemm_f32"]] == 8
  # the unseen class takes the median of the fitted ones
  fitted = m.train_kernels[0] > 0
  np.testing.assert_allclose(m.log_overhead[0, C["loop"]], np.median(m.log_overhead[0, fitted]))
  assert KR.kernel_roofline_ood(m, [known, unknown], ["a", "a"]) == [[], ["loop", "unknown_trip_count"]]
