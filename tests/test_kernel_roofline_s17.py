"""Kernel roofline, session 17 (issue 24 target (b)): cuDNN convolution FLOPs by direction
(``program_kernels(conv_model=True)``, :func:`cudnn_conv_flops`), XLA's shared kernels in the profiler labels
(``match_kernel_times(shared_kernels=True)``), and the fit options ``l2_bytes`` (an L2-residency speed-up),
``overhead_overlap`` and the ``huber_log`` objective. Checked against hand / numpy computations on small
HLO snippets, defaults unchanged, and bad input."""

import numpy as np
import pytest

from mlsys_jax.cost import hlo
from mlsys_jax.cost import kernel_roofline as KR

C = KR.CLASS_ID


def _conv_module(target: str, a: str, b: str, out: str, window="{size=1x1 stride=2x2}", tuned=True) -> str:
  cfg = ', backend_config={"cudnn_conv_backend_config":{"algorithm":{"algo_id":"1"}}}' if tuned else ""
  return (f"HloModule m\nENTRY %e (p0: {a}, p1: {b}) -> {out} {{\n  %p0 = {a} parameter(0)\n  %p1 = {b} parameter(1)\n"
          f"  %cc = ({out}, u8[0]{{0}}) custom-call(%p0, %p1), window={window}, dim_labels=b01f_o01i->b01f, "
          f"custom_call_target=\"{target}\"{cfg}\n"
          f"  ROOT %r = {out} get-tuple-element(%cc), index=0\n}}\n")


# one strided 1x1 convolution: x [8,28,28,128] -> y [8,14,14,64], w [64,1,1,128]
_X, _Y, _W = "bf16[8,28,28,128]{3,2,1,0}", "bf16[8,14,14,64]{3,2,1,0}", "bf16[64,1,1,128]{3,2,1,0}"
_FWD_FLOPS = 2.0 * 8 * 14 * 14 * 64 * 1 * 1 * 128     # 2 * |y| * (kh kw Cin)


@pytest.mark.parametrize("target,a,b,out", [
    ("__cudnn$convForward", _X, _W, _Y),
    ("__cudnn$convBackwardInput", _Y, _W, _X),
    ("__cudnn$convBackwardFilter", _X, _Y, _W)])
def test_conv_model_counts_the_forward_multiply_adds(target, a, b, out):
  m = hlo.parse_hlo(_conv_module(target, a, b, out))
  kt = KR.program_kernels(m, conv_model=True)
  assert kt.flops.size == 1 and kt.klass[0] == C["conv"]
  np.testing.assert_allclose(kt.flops[0], _FWD_FLOPS, rtol=1e-12)
  default = KR.program_kernels(m)
  np.testing.assert_allclose(default.bytes, kt.bytes)            # only the FLOPs change
  if target.endswith("Forward"):
    np.testing.assert_allclose(default.flops, kt.flops)
  else:   # the shape-based count on the permuted shapes, 2 |result| prod(operand 1 dims but the first, 'o'):
    # 2 * |dx| * 128 and 2 * |dw| * (14 * 14 * 64), both 8x the forward's multiply-adds here
    res, op1 = {"Input": (8 * 28 * 28 * 128, 1 * 1 * 128), "Filter": (64 * 128, 14 * 14 * 64)}[target.split("Backward")[1]]
    np.testing.assert_allclose(default.flops[0], 2.0 * res * op1, rtol=1e-12)
    np.testing.assert_allclose(default.flops[0], 8 * _FWD_FLOPS, rtol=1e-12)


def test_cudnn_conv_flops_closed_form_and_groups():
  s = lambda *d: hlo.Shape("f32", tuple(d), tuple(range(len(d) - 1, -1, -1)))
  x, w, y = s(2, 9, 9, 16), s(32, 3, 3, 4), s(2, 7, 7, 32)     # 4 groups: the filter's i dim is 16 / 4
  want = 2.0 * y_n * 3 * 3 * 4 if (y_n := 2 * 7 * 7 * 32) else 0
  assert KR.cudnn_conv_flops("__cudnn$convForward", [x, w], y, "b01f_o01i->b01f") == want
  assert KR.cudnn_conv_flops("__cudnn$convBackwardInput", [y, w], x, "b01f_o01i->b01f") == want
  assert KR.cudnn_conv_flops("__cudnn$convBackwardFilter", [x, y], w, "b01f_o01i->b01f") == want
  with pytest.raises(ValueError, match="dim_labels"):
    KR.cudnn_conv_flops("__cudnn$convForward", [x, w], y, "nonsense")
  with pytest.raises(ValueError, match="rank"):
    KR.cudnn_conv_flops("__cudnn$convForward", [x, s(3, 3)], y, "b01f_o01i->b01f")
  with pytest.raises(ValueError, match=">= 2 operands"):
    KR.cudnn_conv_flops("__cudnn$convForward", [x], y, "b01f_o01i->b01f")
  with pytest.raises(TypeError, match="conv_model"):
    KR.program_kernels(hlo.parse_hlo(_conv_module("__cudnn$convForward", _X, _W, _Y)), conv_model=1)


_SHARED = """HloModule s
%f1 (a: f32[64,64], b: f32[64,64]) -> f32[64,64] {
  %a = f32[64,64]{1,0} parameter(0)
  %b = f32[64,64]{1,0} parameter(1)
  ROOT %d = f32[64,64]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
%f2 (a: f32[64,64], b: f32[64,64]) -> f32[64,64] {
  %a = f32[64,64]{1,0} parameter(0)
  %b = f32[64,64]{1,0} parameter(1)
  ROOT %d = f32[64,64]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
%f3 (a: f32[64,64]) -> f32[64,64] {
  %a = f32[64,64]{1,0} parameter(0)
  ROOT %t = f32[64,64]{1,0} tanh(%a)
}
ENTRY %e (x: f32[64,64], y: f32[64,64]) -> f32[64,64] {
  %x = f32[64,64]{1,0} parameter(0)
  %y = f32[64,64]{1,0} parameter(1)
  %g1 = f32[64,64]{1,0} fusion(%x, %y), kind=kCustom, calls=%f1
  %g2 = f32[64,64]{1,0} fusion(%g1, %y), kind=kCustom, calls=%f2
  %c = (f32[64,64]{1,0}, u8[0]{0}) custom-call(%g2, %y), custom_call_target="__cublas$gemm"
  %h = f32[64,64]{1,0} get-tuple-element(%c), index=0
  ROOT %out = f32[64,64]{1,0} fusion(%h), kind=kLoop, calls=%f3
}
"""


def test_shared_kernels_join_the_named_kernel_group():
  kt = KR.program_kernels(_SHARED)
  assert kt.names == ("g1", "g2", "c", "out")
  times = {"g1": 6e-6, "out": 1e-6, "sm90_xmma_gemm_f32": 3e-6}   # g2 ran as g1's kernel; the cuBLAS GEMM
  old = KR.match_kernel_times(kt, times)
  new = KR.match_kernel_times(kt, times, shared_kernels=True)
  grp = lambda lab: {kt.names[r]: float(lab.time_s[g]) for r, g in zip(lab.rows, lab.group)}
  assert grp(old) == {"g1": 6e-6, "out": 1e-6, "g2": 3e-6, "c": 3e-6}          # g2 pooled with the library call
  assert grp(new) == {"g1": 6e-6, "g2": 6e-6, "out": 1e-6, "c": 3e-6}          # g2 in g1's group, c alone
  assert sorted(new.time_s.tolist()) == sorted([6e-6, 1e-6, 3e-6])
  assert new.matched_s == old.matched_s and new.library_s == old.library_s
  with pytest.raises(TypeError, match="shared_kernels"):
    KR.match_kernel_times(kt, times, shared_kernels="yes")


def test_l2_effective_bytes_closed_form():
  b = np.array([0.0, 1e6, 5e7, 8e7])
  got = KR.l2_effective_bytes(b, 5e7, np.log(4.0))
  np.testing.assert_allclose(got, [0.0, 2.5e5, 1.25e7, 1.25e7 + 3e7])
  np.testing.assert_allclose(KR.l2_effective_bytes(b, 5e7, 0.0), b)
  with pytest.raises(ValueError, match="l2_bytes"):
    KR.l2_effective_bytes(b, 0.0, 0.0)


def _tables():
  rng = np.random.default_rng(0)
  tabs, rts = [], []
  for _ in range(24):
    n = int(rng.integers(1, 5))
    f, b = rng.uniform(1e6, 1e10, n), rng.uniform(1e4, 2e8, n)
    k = rng.choice([C["gemm"], C["elementwise"], C["reduce"]], n).astype(np.int32)
    tabs.append(KR.KernelTable(f, b, k, np.ones(n)))
    rts.append(float(np.sum(np.maximum(f / 3e14, b / 3e12) + 2e-6) + 2e-5))
  return tabs, np.asarray(rts)


def test_fit_options_predict_by_hand():
  tabs, rt = _tables()
  dev = ["H200"] * len(tabs)
  cfg = KR.KernelRooflineConfig(steps=150, l2_bytes=KR.L2_BYTES, overhead_overlap=True, objective="huber_log")
  m = KR.fit_kernel_roofline(tabs, rt, dev, cfg)
  assert m.l2_bytes == KR.L2_BYTES and m.log_l2_speedup.shape == (1,) and m.overhead_overlap
  # the prediction by hand (numpy): bytes through the L2 term, then softmax(softmax(f/F, b/B), o), + O_d
  t = tabs[3]
  F, B, o = (np.exp(v[0, t.klass]) for v in (m.log_flops_rate, m.log_bytes_rate, m.log_overhead))
  be = np.minimum(t.bytes, 5e7) / np.exp(m.log_l2_speedup[0]) + np.maximum(t.bytes - 5e7, 0.0)
  p = m.sharpness
  sm = lambda a, c: (a ** p + c ** p) ** (1 / p)
  want = np.exp(m.log_program_overhead[0]) + np.sum(sm(sm(t.flops / F, be / B), o))
  got = KR.predict_kernel_roofline(m, [t], ["H200"])[0]
  np.testing.assert_allclose(got, want, rtol=1e-9)


def test_fit_defaults_unchanged():
  tabs, rt = _tables()
  dev = ["H200"] * len(tabs)
  a = KR.fit_kernel_roofline(tabs, rt, dev, KR.KernelRooflineConfig(steps=100))
  b = KR.fit_kernel_roofline(tabs, rt, dev, KR.KernelRooflineConfig(steps=100, l2_bytes=None, overhead_overlap=False,
                                                                     objective="log"))
  assert a.l2_bytes is None and a.log_l2_speedup is None and not a.overhead_overlap
  np.testing.assert_allclose(KR.predict_kernel_roofline(a, tabs, dev), KR.predict_kernel_roofline(b, tabs, dev))


@pytest.mark.parametrize("bad,match", [({"l2_bytes": -1.0}, "l2_bytes"), ({"l2_bytes": True}, "l2_bytes"),
                                       ({"overhead_overlap": 1}, "overhead_overlap"),
                                       ({"objective": "huber"}, "objective")])
def test_fit_options_bad_input(bad, match):
  tabs, rt = _tables()
  with pytest.raises((ValueError, TypeError), match=match):
    KR.fit_kernel_roofline(tabs, rt, ["H200"] * len(tabs), KR.KernelRooflineConfig(steps=5, **bad))


def test_huber_log_loss_closed_form():
  e = np.array([0.0, 0.01, 1.0])
  d = KR.HUBER_DELTA
  np.testing.assert_allclose(KR._log_loss(e, "huber_log"), 2 * d * d * (np.sqrt(1 + (e / d) ** 2) - 1))
  np.testing.assert_allclose(KR._log_loss(e, "log"), e ** 2)
  assert KR._log_loss(np.array(0.01), "huber_log") == pytest.approx(0.01 ** 2, rel=1e-2)   # quadratic near 0
