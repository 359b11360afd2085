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

__all__ = ["XLA_CONFIGS", "CHECK_CONFIGS", "CONV_FUSION_OPTIONS"]
