"""Kernel roofline, session 16 (issue 24 target (b)): the kernel-table options of ``program_kernels``.

``sort_model``: XLA's bitonic sort kernels get class ``sort`` and the bytes of every stage of the network;
cub's radix-sort custom calls get class ``radix_sort`` and ``cub_sort_passes`` launches per run (session 19:
``ceil(key bits / 8)`` for one array, ``ceil(key bits / 6)`` for a batch of rows). ``scatter_contention``:
scatters get class ``scatter`` / ``scatter_narrow`` (by element width) and ``scatter_atomic_steps`` as FLOPs
(session 19: the longer of the 16-bit update chain and the element updates over ``SCATTER_STEP_ELEMENTS``). Checked against closed forms on hand-written
HLO, the defaults unchanged (tables and fits), the unseen-scatter fallback, and bad input."""

import numpy as np
import pytest

from mlsys_jax.cost import kernel_roofline as KR

C = KR.CLASS_ID

_SORT = """HloModule s
%cmp (a: f32[], b: f32[], c: s32[], d: s32[]) -> pred[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  %c = s32[] parameter(2)
  %d = s32[] parameter(3)
  ROOT %gt = pred[] compare(%a, %b), direction=GT
}
ENTRY %e (x: f32[64,1000], i: s32[64,1000]) -> (f32[64,1000], s32[64,1000]) {
  %x = f32[64,1000]{1,0} parameter(0)
  %i = s32[64,1000]{1,0} parameter(1)
  ROOT %sort.1 = (f32[64,1000]{1,0}, s32[64,1000]{1,0}) sort(%x, %i), dimensions={1}, to_apply=%cmp
}
"""

_CUB = """HloModule c
ENTRY %e (x: u32[16,4096], v: f32[16,4096]) -> (u32[16,4096], f32[16,4096]) {
  %x = u32[16,4096]{1,0} parameter(0)
  %v = f32[16,4096]{1,0} parameter(1)
  %cc = (u32[16,4096]{1,0}, f32[16,4096]{1,0}, u8[1024]{0}) custom-call(%x, %v), custom_call_target="xla.gpu.ext.cub_sort_pairs"
  %k = u32[16,4096]{1,0} get-tuple-element(%cc), index=0
  %w = f32[16,4096]{1,0} get-tuple-element(%cc), index=1
  ROOT %t = (u32[16,4096]{1,0}, f32[16,4096]{1,0}) tuple(%k, %w)
}
"""


def _scatter(dtype="bf16", n=4096, t=256, d=64, combiner="add", unique=False, fused=False):
  """A segment-sum scatter: ``n`` update rows of width ``d`` into ``t`` target rows (or, with
  ``fused``, a fusion holding it)."""
  if combiner == "add":
    body = f"  %p = {dtype}[] parameter(0)\n  %q = {dtype}[] parameter(1)\n  ROOT %r = {dtype}[] add(%p, %q)"
  else:   # an overwrite: the combiner returns the update
    body = f"  %p = {dtype}[] parameter(0)\n  ROOT %q = {dtype}[] parameter(1)"
  attrs = ("update_window_dims={1,2}, inserted_window_dims={}, scatter_dims_to_operand_dims={0}, "
           "index_vector_dim=1" + (", unique_indices=true" if unique else ""))
  tgt, idx, upd = f"{dtype}[{t},{d}]{{1,0}}", f"s32[{n},1]{{1,0}}", f"{dtype}[{n},1,{d}]{{2,1,0}}"

  def sc(a, b, c):
    return f"ROOT %s = {tgt} scatter({tgt} %{a}, {idx} %{b}, {upd} %{c}), {attrs}, to_apply=%comb"
  params = f"%op = {tgt} parameter(0)\n  %ix = {idx} parameter(1)\n  %up = {upd} parameter(2)"
  if not fused:
    return f"HloModule m\n%comb {{\n{body}\n}}\nENTRY %e {{\n  {params}\n  {sc('op', 'ix', 'up')}\n}}\n"
  fparams = f"%f0 = {tgt} parameter(0)\n  %f1 = {idx} parameter(1)\n  %f2 = {upd} parameter(2)"
  fused_c = f"%fc {{\n  {fparams}\n  {sc('f0', 'f1', 'f2')}\n}}"
  entry = f"  {params}\n  ROOT %fu = {tgt} fusion(%op, %ix, %up), kind=kInput, calls=%fc"
  return f"HloModule m\n%comb {{\n{body}\n}}\n{fused_c}\nENTRY %e {{\n{entry}\n}}\n"


def test_closed_forms():
  # bitonic network on 1000 elements: L = 10 levels, 55 stages; each moves every element's 8 bytes
  assert KR.bitonic_sort_bytes(64 * 1000, 1000, 8.0) == 64 * 1000 * 8.0 * 55
  assert KR.bitonic_sort_bytes(10, 1, 4.0) == 40.0     # nothing to sort: one pass
  assert KR.bitonic_sort_bytes(8, 2, 4.0) == 32.0      # L = 1: one stage
  assert [KR.radix_sort_passes(b) for b in (8, 16, 32, 64, 33)] == [1, 2, 4, 8, 5]
  assert KR.radix_sort_passes(32, digit_bits=6) == 6
  assert KR.scatter_chain(262144, 256) == 1024.0 and KR.scatter_chain(100, 1000) == 1.0


@pytest.mark.parametrize("call", [lambda: KR.bitonic_sort_bytes(-1, 4, 4.0), lambda: KR.bitonic_sort_bytes(4, 0, 4.0),
                                  lambda: KR.bitonic_sort_bytes(4, 4, -1.0), lambda: KR.radix_sort_passes(0),
                                  lambda: KR.radix_sort_passes(32, digit_bits=0),
                                  lambda: KR.radix_sort_passes(32, digit_bits=2.5),
                                  lambda: KR.scatter_chain(-1, 4), lambda: KR.scatter_chain(4, 0)])
def test_closed_forms_bad_input(call):
  with pytest.raises(ValueError, match="need"):
    call()


def test_sort_model_xla_sort():
  base = KR.program_kernels(_SORT)
  opt = KR.program_kernels(_SORT, sort_model=True)
  assert [KR.KERNEL_CLASSES[c] for c in base.klass] == ["other"]
  assert [KR.KERNEL_CLASSES[c] for c in opt.klass] == ["sort"]
  assert opt.bytes[0] == KR.bitonic_sort_bytes(64 * 1000, 1000, 4.0 + 4.0)
  assert opt.bytes[0] != base.bytes[0]
  assert opt.count[0] == base.count[0] == 1.0 and opt.flops[0] == base.flops[0]
  # the scatter option alone leaves a sort as it was
  same = KR.program_kernels(_SORT, scatter_contention=True)
  np.testing.assert_array_equal(same.bytes, base.bytes)
  np.testing.assert_array_equal(same.klass, base.klass)


def test_sort_model_cub_radix_sort():
  base = KR.program_kernels(_CUB)
  opt = KR.program_kernels(_CUB, sort_model=True)
  assert KR.KERNEL_CLASSES[base.klass[0]] == "other" and base.count[0] == 1.0
  assert KR.KERNEL_CLASSES[opt.klass[0]] == "radix_sort"
  n = 16 * 4096
  # 16 rows sorted at once: cub's segmented radix sort, 6-bit digits, ceil(32 / 6) = 6 passes for 32-bit keys
  # (session 19; a single array would take onesweep's 4 passes of 8 bits: KR.cub_sort_passes(4, 1) == 4)
  assert opt.count[0] == 6.0 and KR.cub_sort_passes(4, 1) == 4
  assert opt.bytes[0] == 2.0 * n * (4 + 4)              # one pass: keys and values read and written
  assert opt.library[0] and opt.names == base.names


@pytest.mark.parametrize("fused", [False, True])
def test_scatter_contention(fused):
  hi = KR.program_kernels(_scatter("bf16", n=262144, t=256, fused=fused), scatter_contention=True)
  lo = KR.program_kernels(_scatter("f32", n=1024, t=65536, fused=fused), scatter_contention=True)
  base = KR.program_kernels(_scatter("bf16", n=262144, t=256, fused=fused))
  assert KR.KERNEL_CLASSES[base.klass[0]] == "other"
  assert KR.KERNEL_CLASSES[hi.klass[0]] == "scatter_narrow" and KR.KERNEL_CLASSES[lo.klass[0]] == "scatter"
  assert hi.flops[0] == 1024 * KR.SCATTER_CHAIN_FLOPS
  assert lo.flops[0] == 1.0 * KR.SCATTER_CHAIN_FLOPS
  assert hi.bytes[0] == base.bytes[0] and hi.count[0] == base.count[0]
  # no read-modify-write: an overwrite, or indices promised unique
  for text in (_scatter(n=262144, t=256, combiner="overwrite", fused=fused),
               _scatter(n=262144, t=256, unique=True, fused=fused)):
    assert KR.program_kernels(text, scatter_contention=True).flops[0] == KR.SCATTER_CHAIN_FLOPS


def test_options_bad_input():
  for kw in ({"sort_model": 1}, {"scatter_contention": "yes"}, {"sort_model": None}):
    with pytest.raises(TypeError, match="must be a bool"):
      KR.program_kernels(_SORT, **kw)


def _mem_tables(rng, n):
  """Programs of elementwise and GEMM kernels only (no sort or scatter)."""
  out, rt = [], []
  for _ in range(n):
    k = rng.integers(1, 5)
    f, b = 10 ** rng.uniform(5, 9, k), 10 ** rng.uniform(4, 8, k)
    cls = rng.choice([C["elementwise"], C["gemm"]], k).astype(np.int32)
    out.append(KR.KernelTable(f, b, cls, np.ones(k)))
    rt.append(3e-5 + np.sum(np.maximum(f / 1e14, b / 2e12) + 4e-6) * np.exp(rng.normal(0, 0.05)))
  return out, np.asarray(rt)


def test_fit_without_option_classes_is_unchanged():
  """The penalty is averaged over the base classes plus the option classes present: a fit on tables
  without them is the fit of the base model; with one present, the other option classes stay at their
  fallback and the fit still recovers the rates."""
  rng = np.random.default_rng(0)
  tabs, rt = _mem_tables(rng, 40)
  cfg = KR.KernelRooflineConfig(steps=300)
  m = KR.fit_kernel_roofline(tabs, rt, ["d"] * len(tabs), cfg)
  # every option class is unseen: the median of the fitted classes (scatter: bandwidth only)
  for c in KR.OPTION_KERNEL_CLASSES:
    assert m.train_kernels[0, C[c]] == 0
  # the same programs plus a sort program: the plain programs' predictions move only through the
  # shared terms; the sort class gets a fitted rate of its own
  sort_tab = KR.KernelTable(np.zeros(1), np.full(1, 4e8), np.full(1, C["sort"], np.int32), np.ones(1))
  m2 = KR.fit_kernel_roofline(tabs + [sort_tab], np.append(rt, 4e8 / 9e12 + 3e-5), ["d"] * (len(tabs) + 1), cfg)
  assert m2.train_kernels[0, C["sort"]] == 1
  p1 = KR.predict_kernel_roofline(m, tabs, ["d"] * len(tabs))
  p2 = KR.predict_kernel_roofline(m2, tabs, ["d"] * len(tabs))
  assert np.mean(np.abs(p2 / p1 - 1)) < 0.05


def test_unseen_scatter_class_is_bandwidth_only():
  rng = np.random.default_rng(1)
  tabs, rt = _mem_tables(rng, 30)
  m = KR.fit_kernel_roofline(tabs, rt, ["d"] * len(tabs), KR.KernelRooflineConfig(steps=200))
  sc = KR.KernelTable(np.full(1, 1024 * KR.SCATTER_CHAIN_FLOPS), np.full(1, 1e6),
                      np.full(1, C["scatter_narrow"], np.int32), np.ones(1))
  no_chain = sc._replace(flops=np.zeros(1))
  p_chain, p_none = (KR.predict_kernel_roofline(m, [t], ["d"])[0] for t in (sc, no_chain))
  assert p_chain == pytest.approx(p_none, rel=1e-9)   # the contention term has no identified cost
  assert KR.kernel_roofline_ood(m, [sc], ["d"]) == [["scatter_narrow"]]
  # a seen scatter class keeps its fitted FLOP rate
  sc_tabs = [KR.KernelTable(np.full(1, c * KR.SCATTER_CHAIN_FLOPS), np.full(1, 1e6),
                            np.full(1, C["scatter_narrow"], np.int32), np.ones(1)) for c in (1, 16, 256, 1024)]
  rt2 = np.append(rt, [3e-5 + max(c * 5e-6, 1e6 / 2e12) for c in (1, 16, 256, 1024)])
  m2 = KR.fit_kernel_roofline(tabs + sc_tabs, rt2, ["d"] * len(rt2), KR.KernelRooflineConfig(steps=1500))
  p = KR.predict_kernel_roofline(m2, sc_tabs, ["d"] * 4)
  assert p[3] > 20 * p[0]                              # chain-bound at high contention
