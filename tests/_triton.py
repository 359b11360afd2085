"""The Triton IR of a Pallas kernel, lowered for CUDA without a GPU (shared by the quant kernel tests)."""

import jax


def triton_ir(fn, *shapes, monkeypatch):
  """The Triton IR text of the one Pallas kernel in ``fn``, lowered for CUDA here (no GPU needed), after
  ``mlsys_jax.quant._triton_hooks`` set its attributes."""
  from jax._src.pallas.triton import lowering as tl

  from mlsys_jax.quant import _triton_hooks
  _triton_hooks.install()
  seen, hooked = [], tl.lower_jaxpr_to_triton_module

  def capture(*a, **k):
    r = hooked(*a, **k)
    seen.append(r.module.operation.get_asm(enable_debug_info=False))
    return r
  monkeypatch.setattr(tl, "lower_jaxpr_to_triton_module", capture)
  jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
  assert len(seen) == 1
  return seen[0]
