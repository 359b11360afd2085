"""Triton attributes that Pallas does not emit (or emits stricter), set on the kernels of this package
that ask for them.

Pallas (Triton backend) lowers a kernel to a Triton IR module and hands it to Triton's compiler. Two
attributes that Triton's own Python front end sets are missing there:

- ``tt.num_stages`` on a loop (Triton's ``tl.range(..., num_stages=n)``). Triton's software pipeliner
  (``cp.async`` copies into ``n`` shared-memory buffers, issued ``n - 1`` iterations ahead) only stages
  loads that feed a ``tt.dot``, unless the loop carries this attribute ("pipelineWithoutDot" in
  Triton's AssignLatencies pass). Without it the weight loads of a CUDA-core GEMV are issued one loop
  step at a time, and memory latency is hidden only across programs.
- ``maxNumImpreciseAcc`` on a ``tt.dot`` with 8-bit float operands. With the default 0 Triton refuses
  Hopper's ``wgmma`` for an FP8 product with a float32 accumulator ("we cannot use MMA_V3 if we need to
  accumulate in F32 within the MMA op", AccelerateMatmul) and falls back to ``mma.sync``; Triton's
  front end sets ``2^30`` on sm_90. A value ``>= K`` of the product lets ``wgmma`` accumulate the whole
  product in its own (reduced-precision) accumulator; smaller values make Triton promote to a float32
  sum every that many elements. The per-block FP8 GEMM multiplies one 128-element K block per
  ``tt.dot`` and adds the scaled result in float32 (DeepGEMM's promotion per 128), so 128 suffices.
- ``sem`` of ``tt.atomic_rmw``: Pallas's ``atomic_add`` always asks for acquire-release ordering, which
  on sm_90 compiles to ``MEMBAR.ALL.GPU`` before and ``CCTL.IVALL`` (invalidate the SM's whole L1,
  the other resident programs' cached lines included) after each ``ATOMG``. An add whose result is not
  read and whose output is read only after the kernel ends needs no ordering: relaxed, it compiles to a
  fire-and-forget ``REDG`` (offline sm_90a compile of the W4A16 GEMV's split-K adds).

A kernel asks by its name: ``pallas_call(name=...)`` ending in ``_ls<n>`` (loops), ``_ia<n>`` (dots)
and/or ``_rx`` (relaxed atomics), in that order (``..._ls3``, ``..._ia128``, ``..._ls3_ia128``, ``..._rx``). :func:`install` wraps Pallas's
``lower_jaxpr_to_triton_module`` once per process; modules with other names pass through untouched. If
this jax has no such function, kernels compile without the attributes (same results, slower) and
``HOOK["error"]`` says why. The interpreter (CPU) never lowers to Triton, so it is unaffected.
"""

from __future__ import annotations

import functools
import re

__all__ = ["HOOK", "install", "kernel_name", "set_attributes"]

HOOK = {"installed": False, "loops": 0, "dots": 0, "atomics": 0, "error": None}
_TAGS = re.compile(r"(?:_ls(\d+))?(?:_ia(\d+))?(_rx)?$")
_RELAXED = 1                   # triton::MemSemantic::RELAXED (ACQUIRE_RELEASE is 4)


def kernel_name(base: str, loop_stages: int = 0, imprecise_acc: int = 0, relaxed: bool = False) -> str:
  """``base`` with the tags that ask for the attributes (none when all are off).

  Example:
    >>> kernel_name("gemv", 3), kernel_name("gemm", 0, 128), kernel_name("k"), kernel_name("g", relaxed=True)
    ('gemv_ls3', 'gemm_ia128', 'k', 'g_rx')
  """
  return (base + (f"_ls{loop_stages}" if loop_stages else "") + (f"_ia{imprecise_acc}" if imprecise_acc else "")
          + ("_rx" if relaxed else ""))


def set_attributes(module) -> tuple[int, int, int]:
  """Set the attributes a Triton module's name asks for; returns (loops, dots, atomics) changed."""
  from jax._src.lib.mlir import ir
  op = module.operation
  m = _TAGS.search(ir.StringAttr(op.attributes["sym_name"]).value)
  stages, acc = (int(g) if g else 0 for g in m.groups()[:2])
  relaxed = m.group(3) is not None
  if not stages and not acc and not relaxed:
    return 0, 0, 0
  counts = [0, 0, 0]
  with module.context, ir.Location.unknown():
    i32 = ir.IntegerType.get_signless(32)

    def walk(o):
      for region in o.regions:
        for block in region.blocks:
          for child in block.operations:
            name = child.operation.name
            if stages and name == "scf.for":
              child.operation.attributes["tt.num_stages"] = ir.IntegerAttr.get(i32, stages)
              counts[0] += 1
            elif acc and name == "tt.dot":
              child.operation.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(i32, acc)
              counts[1] += 1
            elif relaxed and name == "tt.atomic_rmw":
              child.operation.attributes["sem"] = ir.IntegerAttr.get(i32, _RELAXED)
              counts[2] += 1
            walk(child.operation)
    walk(op)
  return counts[0], counts[1], counts[2]


def install() -> bool:
  """Wrap Pallas's Triton lowering (once per process); whether the hook is in place."""
  if HOOK["installed"]:
    return True
  try:
    from jax._src.pallas.triton import lowering as tl
    orig = tl.lower_jaxpr_to_triton_module
    if not getattr(orig, "_mlsys_jax_hook", False):
      @functools.wraps(orig)
      def lower(*args, **kwargs):
        result = orig(*args, **kwargs)
        try:
          loops, dots, atomics = set_attributes(result.module)
          HOOK["loops"] += loops
          HOOK["dots"] += dots
          HOOK["atomics"] += atomics
        except Exception as e:  # never break a lowering for a performance attribute
          HOOK["error"] = f"{type(e).__name__}: {e}"
        return result
      lower._mlsys_jax_hook = True
      tl.lower_jaxpr_to_triton_module = lower
    HOOK["installed"] = True
  except Exception as e:  # pragma: no cover - a jax without this lowering function
    HOOK["error"] = f"{type(e).__name__}: {e}"
  return HOOK["installed"]
