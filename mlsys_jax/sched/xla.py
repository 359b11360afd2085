"""Per-jit XLA configurations that matter for small-batch CNN latency on GPUs, and the choice between an
IOS schedule and the unscheduled function under the best of them.

On one H100 at batch 1 (``benchmarks/results/ios_xla_baselines.json``) command buffers that include cuDNN
convolutions cut latency 1.9-3.2x against plain ``jax.jit``; a schedule is only worth running when it
beats *that* program, so :func:`ios_schedule` ends its search by timing the emitted schedule against the
unscheduled function under these configurations (``check=``) and keeps the faster program.

Example:
  >>> from mlsys_jax.sched import XLA_CONFIGS
  >>> sorted(XLA_CONFIGS["cmdbuf_conv_concurrent"])
  ['xla_gpu_command_buffer_scheduling_mode', 'xla_gpu_enable_command_buffer', 'xla_gpu_graph_min_graph_size']
"""

from __future__ import annotations

from typing import Any

from mlsys_jax._compat import sub_jaxprs
from mlsys_jax.sched.emit import CB_TYPES

# The default of jaxlib 0.10.2 is FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,CONDITIONAL,
# DYNAMIC_SLICE_FUSION (no CONVOLUTION, so every cuDNN conv thunk splits the CUDA graphs). Per jit,
# a comma-separated string *replaces* that list ("+CONVOLUTION" is accepted only in XLA_FLAGS).
_CMDBUF = {"xla_gpu_enable_command_buffer": CB_TYPES, "xla_gpu_graph_min_graph_size": 1}
_CONCURRENT = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}  # default: LHS
_LHS = {"xla_gpu_enable_latency_hiding_scheduler": True}  # default: False
# Convolutions as cuDNN fusions planned at compile time instead of cuDNN custom calls whose runner is
# built on the first execution. On an H100 a depthwise conv's runtime-compiled plan costs ~0.25 s per
# conv instance on the first call of every executable (RandWire ~28 s, NasNet-A ~110 s); with conv fusion
# the first call of a 64-conv program took 0.7 s and the program ran faster
# (``benchmarks/results/ios_compile_probe_h100.json``).
CONV_FUSION_OPTIONS: dict[str, Any] = {"xla_gpu_experimental_enable_conv_fusion": True}

#: name -> per-jit ``compiler_options``. "jit" is the plain default; ``xla_gpu_autotune_level`` is at its
#: maximum by default, so it is not varied.
XLA_CONFIGS: dict[str, dict[str, Any]] = {
    "jit": {},
    "cmdbuf_conv": dict(_CMDBUF),
    "cmdbuf_conv_concurrent": {**_CMDBUF, **_CONCURRENT},
    "lhs": dict(_LHS),
    "cmdbuf_conv_concurrent_lhs": {**_CMDBUF, **_CONCURRENT, **_LHS},
    "no_cmdbuf": {"xla_gpu_enable_command_buffer": ""},
    "convfusion": dict(CONV_FUSION_OPTIONS),
    "cmdbuf_conv_concurrent_convfusion": {**_CMDBUF, **_CONCURRENT, **CONV_FUSION_OPTIONS},
    "cmdbuf_conv_concurrent_lhs_convfusion": {**_CMDBUF, **_CONCURRENT, **_LHS, **CONV_FUSION_OPTIONS},
}

#: The configurations ``ios_schedule(check='measure')`` times the unscheduled function under by default:
#: plain jit and the two that were fastest for the IOS networks on the H100.
CHECK_CONFIGS: tuple[str, ...] = ("jit", "cmdbuf_conv_concurrent", "cmdbuf_conv_concurrent_lhs")
#: Added to :data:`CHECK_CONFIGS` for functions with grouped (e.g. depthwise) convolutions: with cuDNN conv
#: fusion they were the fastest XLA program of RandWire and NasNet-A on the H100
#: (``benchmarks/results/ios_isolated_randwire_f32.json``), and without them the check would compare a
#: schedule against a slower XLA program than the user can get.
GROUPED_CONV_CHECK_CONFIGS: tuple[str, ...] = ("cmdbuf_conv_concurrent_convfusion",
                                               "cmdbuf_conv_concurrent_lhs_convfusion")


def check_configs(eqns) -> tuple[str, ...]:
  """The XLA configurations the never-slower check times a function under, from its equations.

  :data:`CHECK_CONFIGS`, plus :data:`GROUPED_CONV_CHECK_CONFIGS` when any equation (nested jaxprs
  included) is a convolution with ``feature_group_count`` or ``batch_group_count`` above 1.

  Args:
    eqns: the function's jaxpr equations (``jax.make_jaxpr(f)(*args).eqns``) or a ``Graph``'s flat ones.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> dw = lambda x: jax.lax.conv_general_dilated(x, jnp.ones((3, 3, 1, 4)), (1, 1), "SAME",
    ...     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
    >>> check_configs(jax.make_jaxpr(dw)(jnp.ones((1, 8, 8, 4))).eqns)[-1]
    'cmdbuf_conv_concurrent_lhs_convfusion'
    >>> check_configs(jax.make_jaxpr(jnp.tanh)(jnp.ones(3)).eqns) == CHECK_CONFIGS
    True
  """
  def grouped(es) -> bool:
    for e in es:
      prim = getattr(e, "primitive", None) or getattr(e, "prim", None)   # jaxpr eqn or the Graph's FlatEqn
      if prim is not None and prim.name == "conv_general_dilated" and (
          e.params.get("feature_group_count", 1) > 1 or e.params.get("batch_group_count", 1) > 1):
        return True
      if any(grouped(sub.eqns) for v in e.params.values() for sub in sub_jaxprs(v)):   # jit/cond/scan bodies
        return True
    return False

  return CHECK_CONFIGS + (GROUPED_CONV_CHECK_CONFIGS if grouped(eqns) else ())


__all__ = ["XLA_CONFIGS", "CHECK_CONFIGS", "GROUPED_CONV_CHECK_CONFIGS", "CONV_FUSION_OPTIONS", "check_configs"]
