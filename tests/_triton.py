"""The Triton IR of a Pallas kernel, lowered for CUDA without a GPU (shared by the quant kernel tests), and the
context every test that lowers for CUDA on a CPU host enters (:func:`cuda_target`)."""

import contextlib

import jax


def cuda_target(device_kind: str = "NVIDIA H100"):
  """A context in which ``.lower(lowering_platforms=("cuda",))`` of a Pallas-Triton kernel works without a GPU:
  jax 0.11 reads the target GPU from the abstract mesh (an ``AbstractDevice``: "No supported GPU devices found"
  otherwise), jax 0.10 lowers without one. Nothing is entered where a GPU is the default device."""
  if jax.default_backend() == "gpu" or not hasattr(jax.sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  mesh = jax.sharding.AbstractMesh((1,), ("cuda_target",),
                                   abstract_device=jax.sharding.AbstractDevice(device_kind, None, "cuda"))
  return jax.sharding.use_abstract_mesh(mesh)


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
  with cuda_target():
    jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
  assert len(seen) == 1
  return seen[0]
