"""Kernel roofline, session 19 (issue 24 target (b)): the sort and scatter terms that predicted the new H200
collections' ``topk_sort`` and ``segment_sum`` programs ~2x too fast (docs/value.md, "session 19: scatter and
sort diagnosis").

- cub's radix sort of a *batch* of rows is ``DeviceSegmentedRadixSort``: 6-bit digits (5 for one-byte keys),
  ``ceil(bits / 6)`` passes -- 6 for 32-bit keys, 3 for 16-bit keys -- not onesweep's ``ceil(bits / 8)``
  (:func:`cub_sort_passes`; one array keeps onesweep's count).
- a scatter's atomic work is the longer of its chain of updates to one address (16-bit elements only: CAS
  loops) and its element updates over ``SCATTER_STEP_ELEMENTS`` (:func:`scatter_atomic_steps`); before, only
  the chain counted, so a 16-bit scatter of 33.5M element updates at chain 2 cost 2 steps.

Checked against closed forms on hand-written HLO (each table test fails on the session-16 tables) and bad input.
"""

import numpy as np
import pytest

from mlsys_jax.cost import kernel_roofline as KR


def _cub(key="u32", val="f32", dims=(16, 4096)):
  """A cub radix-sort custom call on keys ``key[dims]`` (with values ``val``, or keys only when None)."""
  d = ",".join(map(str, dims))
  lay = ",".join(map(str, range(len(dims) - 1, -1, -1)))
  k, v = f"{key}[{d}]{{{lay}}}", (f"{val}[{d}]{{{lay}}}" if val else None)
  if v:
    return (f"HloModule c\nENTRY %e {{\n  %x = {k} parameter(0)\n  %v = {v} parameter(1)\n"
            f"  ROOT %cc = ({k}, {v}, u8[1024]{{0}}) custom-call(%x, %v), custom_call_target=\"xla.gpu.ext.cub_sort_pairs\"\n}}\n")
  return (f"HloModule c\nENTRY %e {{\n  %x = {k} parameter(0)\n"
          f"  ROOT %cc = ({k}, u8[1024]{{0}}) custom-call(%x), custom_call_target=\"xla.gpu.ext.cub_sort_keys\"\n}}\n")


def _scatter(dtype="bf16", n=4096, t=256, d=64, combiner="add", unique=False, fused=True):
  """``segment_sum``'s scatter: ``n`` update rows of width ``d`` added into ``t`` target rows (in a fusion
  by default, as XLA emits it)."""
  if combiner == "add":
    body = f"  %p = {dtype}[] parameter(0)\n  %q = {dtype}[] parameter(1)\n  ROOT %r = {dtype}[] add(%p, %q)"
  else:
    body = f"  %p = {dtype}[] parameter(0)\n  ROOT %q = {dtype}[] parameter(1)"
  attrs = ("update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, "
           "index_vector_dim=1" + (", unique_indices=true" if unique else ""))
  tgt, idx, upd = f"{dtype}[{t},{d}]{{1,0}}", f"s32[{n},1]{{1,0}}", f"{dtype}[{n},{d}]{{1,0}}"
  sc = lambda a, b, c: f"ROOT %s = {tgt} scatter({tgt} %{a}, {idx} %{b}, {upd} %{c}), {attrs}, to_apply=%comb"
  params = f"%op = {tgt} parameter(0)\n  %ix = {idx} parameter(1)\n  %up = {upd} parameter(2)"
  if not fused:
    return f"HloModule m\n%comb {{\n{body}\n}}\nENTRY %e {{\n  {params}\n  {sc('op', 'ix', 'up')}\n}}\n"
  fparams = f"%f0 = {tgt} parameter(0)\n  %f1 = {idx} parameter(1)\n  %f2 = {upd} parameter(2)"
  return (f"HloModule m\n%comb {{\n{body}\n}}\n%fc {{\n  {fparams}\n  {sc('f0', 'f1', 'f2')}\n}}\n"
          f"ENTRY %e {{\n  {params}\n  ROOT %fu = {tgt} fusion(%op, %ix, %up), kind=kInput, calls=%fc\n}}\n")


def test_cub_sort_passes_closed_forms():
  assert KR.cub_sort_passes(4, 1) == 4 == KR.radix_sort_passes(32)     # one array: onesweep, 8-bit digits
  assert KR.cub_sort_passes(2, 1) == 2
  assert KR.cub_sort_passes(4, 2048) == 6                              # segmented: ceil(32 / 6)
  assert KR.cub_sort_passes(2, 256) == 3                               # ceil(16 / 6)
  assert KR.cub_sort_passes(8, 2) == 11                                # ceil(64 / 6)
  assert KR.cub_sort_passes(1, 8) == 2                                 # one-byte keys: 5-bit digits


@pytest.mark.parametrize("args", [(0, 4), (4, 0), (4, 1.5), (-2, 4), (4, True)])
def test_cub_sort_passes_bad_input(args):
  with pytest.raises(ValueError, match="need key_bytes > 0 and an integer batch >= 1"):
    KR.cub_sort_passes(*args)


@pytest.mark.parametrize("key,val,dims,passes", [("u32", "f32", (16, 4096), 6), ("u16", "bf16", (256, 8192), 3),
                                                 ("s32", None, (2048, 320), 6), ("u32", "s32", (4096,), 4),
                                                 ("u32", "s32", (1, 4096), 4)])
def test_batched_cub_sort_table(key, val, dims, passes):
  """A batch of rows sorts in ``ceil(bits / 6)`` launches (session 16 counted ``ceil(bits / 8)``: 4 and 2);
  one array, or a batch of one row, keeps onesweep's 8-bit digits. Bytes per pass unchanged."""
  kt = KR.program_kernels(_cub(key, val, dims), sort_model=True)
  assert KR.KERNEL_CLASSES[kt.klass[0]] == "radix_sort"
  assert kt.count[0] == passes
  n = int(np.prod(dims))
  kb, vb = (4 if key.endswith("32") else 2), ({"f32": 4, "s32": 4, "bf16": 2}[val] if val else 0)
  assert kt.bytes[0] == 2.0 * n * (kb + vb)
  base = KR.program_kernels(_cub(key, val, dims))          # the option off: as before
  assert KR.KERNEL_CLASSES[base.klass[0]] == "other" and base.count[0] == 1.0


def test_scatter_atomic_steps_closed_forms():
  E = KR.SCATTER_STEP_ELEMENTS
  # 16-bit, chain 2, 33.5M element updates: throughput-bound (session 16's feature: 2 steps)
  assert KR.scatter_atomic_steps(131072, 65536, 131072 * 256, True) == pytest.approx(131072 * 256 / E)
  # 16-bit, chain 1024: chain-bound, as before
  assert KR.scatter_atomic_steps(262144, 256, 262144 * 64, True) == 1024.0
  # 32-bit: native reductions, no chain term
  assert KR.scatter_atomic_steps(262144, 256, 262144 * 64, False) == pytest.approx(262144 * 64 / E)
  assert KR.scatter_atomic_steps(16, 16, 16, False) == 1.0 == KR.scatter_atomic_steps(0, 1, 0, True)


@pytest.mark.parametrize("call,err", [(lambda: KR.scatter_atomic_steps(4, 4, -1, True), ValueError),
                                      (lambda: KR.scatter_atomic_steps(4, 4, np.inf, True), ValueError),
                                      (lambda: KR.scatter_atomic_steps(-1, 4, 4, True), ValueError),
                                      (lambda: KR.scatter_atomic_steps(4, 0, 4, True), ValueError),
                                      (lambda: KR.scatter_atomic_steps(4, 4, 4, 1), TypeError)])
def test_scatter_atomic_steps_bad_input(call, err):
  with pytest.raises(err, match="need|must be a bool"):
    call()


@pytest.mark.parametrize("fused", [False, True])
def test_scatter_low_contention_counts_element_updates(fused):
  """The new collections' kept ``segment_sum`` rows: bf16, 65536-131072 rows of width 256 into 65536 segments
  (chain 1-2). Their scatter kernels take 129-256 us on the H200, ~1.3e11 element updates/s; the session-16
  feature counted 1-2 chain steps (~7 us each) whatever the width."""
  E, F = KR.SCATTER_STEP_ELEMENTS, KR.SCATTER_CHAIN_FLOPS
  for n in (65536, 131072):
    kt = KR.program_kernels(_scatter("bf16", n=n, t=65536, d=256, fused=fused), scatter_contention=True)
    assert KR.KERNEL_CLASSES[kt.klass[0]] == "scatter_narrow"
    assert kt.flops[0] == pytest.approx(n * 256 / E * F)
  # high contention stays chain-bound: 262144 rows into 256 segments, width 64
  hi = KR.program_kernels(_scatter("bf16", n=262144, t=256, d=64, fused=fused), scatter_contention=True)
  assert hi.flops[0] == 1024 * F
  # bytes, class and launches are the session-16 ones
  base = KR.program_kernels(_scatter("bf16", n=131072, t=65536, d=256, fused=fused))
  kt = KR.program_kernels(_scatter("bf16", n=131072, t=65536, d=256, fused=fused), scatter_contention=True)
  assert kt.bytes[0] == base.bytes[0] and kt.count[0] == base.count[0]


@pytest.mark.parametrize("fused", [False, True])
def test_scatter_32bit_has_no_chain_term(fused):
  """32-bit atomic adds are native reductions: a chain of 1024 updates per address costs its 16.8M element
  updates (16.8 steps), not 1024 steps (session 14's f32 rows: chains 4/64/256 -> 2.9/8.8/14.9 us)."""
  kt = KR.program_kernels(_scatter("f32", n=262144, t=256, d=64, fused=fused), scatter_contention=True)
  assert KR.KERNEL_CLASSES[kt.klass[0]] == "scatter"
  assert kt.flops[0] == pytest.approx(262144 * 64 / KR.SCATTER_STEP_ELEMENTS * KR.SCATTER_CHAIN_FLOPS)


def test_scatter_without_atomics_unchanged():
  for text in (_scatter(n=262144, t=256, d=64, combiner="overwrite"), _scatter(n=262144, t=256, d=64, unique=True)):
    assert KR.program_kernels(text, scatter_contention=True).flops[0] == KR.SCATTER_CHAIN_FLOPS
