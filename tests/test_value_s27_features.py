"""Session 27 (helper): two opt-in kernel-table options of the kernel roofline, from the session-26 diagnosis.

- ``program_kernels(scatter_width=True)`` (value_eval token ``scatterw``, with ``scatter``): a 16-bit scatter's
  atomic-work feature is ``scatter_serial_steps = c + E / SCATTER_SERIAL_STEP_ELEMENTS`` chain steps (the chain's
  compare-and-swap rounds and the element updates add) instead of ``max(c, E / SCATTER_STEP_ELEMENTS)``.
- ``program_kernels(conv_direction=True)`` (token ``convdir``): untuned cuDNN backward-input / backward-filter calls
  get class ``conv_untuned_bwd``.

Checked on hand-written HLO snippets against hand-computed numbers; without the options every table is as before,
and the new class appears only with its option."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mlsys_jax.cost import hlo
from mlsys_jax.cost import kernel_roofline as KR
from tests.test_kernel_roofline_s19 import _scatter as _scatter_s19

ROOT = pathlib.Path(__file__).resolve().parents[1]
C = KR.CLASS_ID
F = KR.SCATTER_CHAIN_FLOPS


def _scatter(dtype="bf16", n=16384, t=256, d=16, combiner="add", fused=True) -> str:
  """``segment_sum``'s scatter: ``n`` update rows of width ``d`` added into ``t`` target rows (the builder of
  ``test_kernel_roofline_s19`` with this file's defaults)."""
  return _scatter_s19(dtype, n=n, t=t, d=d, combiner=combiner, fused=fused)


# ------------------------------------------------------------------------------------------------ scatter_width

def test_scatter_serial_steps_closed_forms():
  e0 = KR.SCATTER_SERIAL_STEP_ELEMENTS
  assert e0 == 6e5
  # chain 64 (16384 rows into 256 segments), width 16 and 256: 262144 and 4194304 element updates
  assert KR.scatter_serial_steps(16384, 256, 262144, True) == 64 + 262144 / 6e5
  assert KR.scatter_serial_steps(16384, 256, 4194304, True) == 64 + 4194304 / 6e5
  # the session-19 feature gives both 64 steps
  assert KR.scatter_atomic_steps(16384, 256, 262144, True) == KR.scatter_atomic_steps(16384, 256, 4194304, True) == 64
  # no contention (chain 1): 1 + E / E0, 4.2M updates -> 1 + 6.99 steps (session 19: max(1, 4.19) = 4.19)
  assert KR.scatter_serial_steps(16384, 65536, 4194304, True) == pytest.approx(1 + 6.990506666666667, rel=1e-15)
  # 32-bit elements: unchanged (native reductions, no chain term)
  for args in ((262144, 256, 262144 * 64), (16384, 65536, 4194304), (8, 4, 0)):
    assert KR.scatter_serial_steps(*args, False) == KR.scatter_atomic_steps(*args, False)
  assert KR.scatter_serial_steps(0, 1, 0, True) == 1.0


@pytest.mark.parametrize("args,err", [((16, 4, -1, True), ValueError), ((16, 4, np.inf, True), ValueError),
                                      ((16, 0, 8, True), ValueError), ((16, 4, 8, 1), TypeError)])
def test_scatter_serial_steps_bad_input(args, err):
  with pytest.raises(err, match="need|must be a bool"):
    KR.scatter_serial_steps(*args)


@pytest.mark.parametrize("fused", [False, True])
def test_program_kernels_scatter_width(fused):
  for n, t, d in ((16384, 256, 16), (16384, 256, 256), (65536, 4096, 128), (16384, 65536, 256)):
    text = _scatter("bf16", n=n, t=t, d=d, fused=fused)
    old = KR.program_kernels(text, scatter_contention=True)
    new = KR.program_kernels(text, scatter_contention=True, scatter_width=True)
    c = max(1.0, n / t)
    assert new.flops[0] == pytest.approx((c + n * d / 6e5) * F, rel=1e-12)
    assert old.flops[0] == pytest.approx(max(c, n * d / 1e6) * F, rel=1e-12)
    assert new.klass[0] == old.klass[0] == C["scatter_narrow"]
    np.testing.assert_array_equal(new.bytes, old.bytes)
    np.testing.assert_array_equal(new.count, old.count)
  # 32-bit scatters and scatters without read-modify-write: unchanged
  for text in (_scatter("f32", n=262144, t=256, d=64, fused=fused),
               _scatter("bf16", n=262144, t=256, d=64, combiner="overwrite", fused=fused)):
    a = KR.program_kernels(text, scatter_contention=True)
    b = KR.program_kernels(text, scatter_contention=True, scatter_width=True)
    np.testing.assert_array_equal(a.flops, b.flops)
    np.testing.assert_array_equal(a.klass, b.klass)


def test_program_kernels_scatter_width_needs_scatter_contention():
  with pytest.raises(ValueError, match="scatter_contention=True"):
    KR.program_kernels(_scatter(), scatter_width=True)
  with pytest.raises(TypeError, match="scatter_width must be a bool"):
    KR.program_kernels(_scatter(), scatter_contention=True, scatter_width="yes")


# ------------------------------------------------------------------------------------------------ conv_direction

_X, _Y, _W = "bf16[8,28,28,128]{3,2,1,0}", "bf16[8,14,14,64]{3,2,1,0}", "bf16[64,1,1,128]{3,2,1,0}"
_TUNED = ', backend_config={"cudnn_conv_backend_config":{"activation_mode":"kNone","algorithm":{"algo_id":"1"}}}'
_UNTUNED = ', backend_config={"cudnn_conv_backend_config":{"activation_mode":"kNone"}}'


def _conv_program(tuned_fwd=False, tuned_bwd=False) -> str:
  """Forward, backward-input and backward-filter cuDNN calls of one strided 1x1 convolution, then a bare elementwise."""
  cc = lambda nm, tgt, a, b, out, tuned: (
      f"  %{nm} = ({out}, u8[0]{{0}}) custom-call({a}, {b}), window={{size=1x1 stride=2x2}}, "
      f"dim_labels=b01f_o01i->b01f, custom_call_target=\"{tgt}\"{_TUNED if tuned else _UNTUNED}\n")
  return ("HloModule m\nENTRY %e (x: bf16[8,28,28,128], w: bf16[64,1,1,128], dy: bf16[8,14,14,64]) -> "
          f"({_Y}, {_X}, {_W}) {{\n  %x = {_X} parameter(0)\n  %w = {_W} parameter(1)\n  %dy = {_Y} parameter(2)\n"
          + cc("fw", "__cudnn$convForward", "%x", "%w", _Y, tuned_fwd)
          + cc("bi", "__cudnn$convBackwardInput", "%dy", "%w", _X, tuned_bwd)
          + cc("bf", "__cudnn$convBackwardFilter", "%x", "%dy", _W, tuned_bwd)
          + f"  %y = {_Y} get-tuple-element(%fw), index=0\n  %dx = {_X} get-tuple-element(%bi), index=0\n"
          f"  %dw = {_W} get-tuple-element(%bf), index=0\n  %y2 = {_Y} negate(%y)\n"
          f"  ROOT %r = ({_Y}, {_X}, {_W}) tuple(%y2, %dx, %dw)\n}}\n")


def test_conv_direction_classes():
  m = hlo.parse_hlo(_conv_program())
  base = KR.program_kernels(m)
  assert [KR.KERNEL_CLASSES[k] for k in base.klass] == ["conv_untuned"] * 3 + ["elementwise"]
  opt = KR.program_kernels(m, conv_direction=True)
  assert [KR.KERNEL_CLASSES[k] for k in opt.klass] == ["conv_untuned", "conv_untuned_bwd", "conv_untuned_bwd",
                                                       "elementwise"]
  for a in ("flops", "bytes", "count", "library"):
    np.testing.assert_array_equal(getattr(opt, a), getattr(base, a))
  # with conv_model: the forward multiply-adds (2 |y| Cin = 2 * 8*14*14*64 * 128) in every direction, class by direction
  both = KR.program_kernels(m, conv_model=True, conv_direction=True)
  np.testing.assert_array_equal(both.flops[:3], 2.0 * 8 * 14 * 14 * 64 * 128)
  np.testing.assert_array_equal(both.klass, opt.klass)
  # tuned backward calls keep their tuned class; a tuned forward stays conv
  tuned = KR.program_kernels(hlo.parse_hlo(_conv_program(tuned_fwd=True, tuned_bwd=True)), conv_direction=True)
  assert [KR.KERNEL_CLASSES[k] for k in tuned.klass] == ["conv"] * 3 + ["elementwise"]
  with pytest.raises(TypeError, match="conv_direction must be a bool"):
    KR.program_kernels(m, conv_direction=None)


def test_untuned_conv_is_backward_inside_a_fusion():
  text = ("HloModule m\n%fc (a: bf16[8,14,14,64], b: bf16[64,1,1,128]) -> bf16[8,28,28,128] {\n"
          f"  %a = {_Y} parameter(0)\n  %b = {_W} parameter(1)\n"
          f"  %c = ({_X}, u8[0]{{0}}) custom-call(%a, %b), window={{size=1x1 stride=2x2}}, dim_labels=b01f_o01i->b01f, "
          f"custom_call_target=\"__cudnn$convBackwardInput\"{_UNTUNED}\n"
          f"  ROOT %g = {_X} get-tuple-element(%c), index=0\n}}\n"
          f"ENTRY %e (p: bf16[8,14,14,64], q: bf16[64,1,1,128]) -> bf16[8,28,28,128] {{\n  %p = {_Y} parameter(0)\n"
          f"  %q = {_W} parameter(1)\n  ROOT %f = {_X} fusion(%p, %q), kind=kCustom, calls=%fc\n}}\n")
  m = hlo.parse_hlo(text)
  assert KR.untuned_conv_is_backward(m, m.entry.by_name()["f"])
  assert KR.KERNEL_CLASSES[KR.program_kernels(m).klass[0]] == "conv_untuned"
  assert KR.KERNEL_CLASSES[KR.program_kernels(m, conv_direction=True).klass[0]] == "conv_untuned_bwd"
  with pytest.raises(TypeError, match="HloModule"):
    KR.untuned_conv_is_backward(text, None)


# ------------------------------------------------------------------------------------------------ defaults

def test_class_ids_of_before_unchanged_and_new_class_last():
  before = ("gemm", "gemm_f32", "conv", "conv_f32", "conv_untuned", "reduce", "transpose", "elementwise", "slice",
            "loop", "other", "sort", "radix_sort", "scatter", "scatter_narrow")
  assert KR.KERNEL_CLASSES[:len(before)] == before
  assert KR.KERNEL_CLASSES[len(before):] == ("conv_untuned_bwd",) and KR.OPTION_KERNEL_CLASSES[-1] == "conv_untuned_bwd"


def test_new_options_off_give_the_tables_of_before():
  for text in (_conv_program(), _scatter(), _scatter(fused=False)):
    m = hlo.parse_hlo(text)
    for kw in ({}, {"scatter_contention": True}, {"conv_model": True}):
      a = KR.program_kernels(m, **kw)
      b = KR.program_kernels(m, **kw, scatter_width=False, conv_direction=False)
      for f in ("flops", "bytes", "klass", "count", "library"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
      assert C["conv_untuned_bwd"] not in a.klass


def test_fit_gets_own_rate_for_backward_convolutions():
  """Synthetic programs of one forward and one backward untuned convolution, the backward at half the forward's
  FLOP rate: with conv_direction's class the fit recovers the 2x; the rows' classes decide it alone."""
  rng = np.random.default_rng(0)
  tabs, rt = [], []
  for _ in range(40):
    fl = 10 ** rng.uniform(9, 11, 2)
    tabs.append(KR.KernelTable(fl, np.full(2, 1e3), np.asarray([C["conv_untuned"], C["conv_untuned_bwd"]], np.int32),
                               np.ones(2), 0, ("a", "b"), np.ones(2, bool)))
    rt.append(fl[0] / 1e13 + fl[1] / 5e12 + 2e-5)
  cfg = KR.KernelRooflineConfig(steps=1500, ridge=0.0, calibrate=False)
  model = KR.fit_kernel_roofline(tabs, np.asarray(rt), np.asarray(["d"] * len(tabs)), cfg)
  r = np.exp(model.log_flops_rate[0, C["conv_untuned"]] - model.log_flops_rate[0, C["conv_untuned_bwd"]])
  assert 1.6 < r < 2.5, r


# ------------------------------------------------------------------------------------------------ value_eval tokens

_SCRIPT = r"""
import json, sys
sys.path.insert(0, "experiments")
import value_eval as VE
out = {"norm": [VE._kernel_option(v) for v in ("convdir+scatterw+scatter", "scatter+scatterw", "convdir",
                                               "sort+scatter+conv+tiles+cfusion+shared+huber+bodies+hostgap+convgemm")],
       "tables": VE._kopt_tables("sort+scatter+scatterw+convdir+shared"),
       "kwargs": {k: VE._kopt_table_kwargs(VE._kernel_option(k)) for k in
                  ("none", "sort+scatter+conv+tiles+cfusion+shared", "scatter+scatterw", "convdir")}}
try:
  VE._kernel_option("scatterw")
  out["bad"] = "accepted"
except ValueError as e:
  out["bad"] = str(e)
print(json.dumps(out))
"""


def test_value_eval_tokens():
  r = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["norm"] == ["scatter+scatterw+convdir", "scatter+scatterw", "convdir",
                         "sort+scatter+conv+tiles+cfusion+shared+huber+bodies+hostgap+convgemm"]
  assert out["tables"] == "sort+scatter+scatterw+convdir"
  f, t = False, True
  base = {"sort_model": f, "scatter_contention": f, "conv_model": f}
  assert out["kwargs"]["none"] == base     # the call of before: no new keyword passed
  assert out["kwargs"]["sort+scatter+conv+tiles+cfusion+shared"] == {
      "sort_model": t, "scatter_contention": t, "conv_model": t, "sort_tiles": t, "custom_fusion_calls": t}
  assert out["kwargs"]["scatter+scatterw"] == {**base, "scatter_contention": t, "scatter_width": t}
  assert out["kwargs"]["convdir"] == {**base, "conv_direction": t}
  assert "add 'scatter'" in out["bad"]
