"""mlsys_jax.sched: execution decisions.

- IOS, the inter-operator scheduler (Ding et al., MLSys 2021), on jaxprs: the names below.
- ``mlsys_jax.sched.dynamic``: Nimble (Shen et al., MLSys 2021): bucketed jit, bucket choice, symbolic export,
  batched dynamic control flow (Tree-LSTM); import from the subpackage.
- ``mlsys_jax.sched.placement``: FirePlace (Balaji et al., MLSys 2021): VM placement simulator, baselines and
  hindsight imitation; import from the subpackage.

Public API of IOS:
  ios_schedule(fn, *example_args, r=3, s=8, profiler=None, strategy='both', predictor=None, top_k=0,
               ...) -> Schedule   (predictor: learned stage costs, e.g. cost.value_ios.StagePredictor;
               top_k > 0 profiles only the k best-predicted candidates per DP state)
  Schedule (apply / __call__, summary, measure, to_json, from_json)
  sequential_schedule(graph) -> [Stage]  the baseline: one unit per stage
  AnalyticalCost, StageProfiler          stage cost models (roofline; on-device differential timing)
  calibrate.calibrate_cost               AnalyticalCost fitted to whole programs measured in-graph
  build_graph, Graph, Unit               jaxpr -> unit DAG with blocks/parts
  relayout_conv_kernels                  conv kernels stored in the layout the GPU conv reads
  ios_dp, Stage                          the dynamic program over ending sets
  compiler_options, stream_call, stream_call_available, merge_key   emission helpers
  longest_paths, path_program            critical-path floor of any schedule (time a chain alone)
  stage_critical_path                     predicted latency of a schedule with independent stages overlapped
  XLA_CONFIGS, CHECK_CONFIGS, CONV_FUSION_OPTIONS   per-jit XLA options; the never-slower check's set
  check_configs                                   the check's set for a function (adds conv fusion for grouped convs)
"""

from mlsys_jax.sched import calibrate
from mlsys_jax.sched.api import Schedule, ios_schedule, sequential_schedule
from mlsys_jax.sched.bound import longest_paths, path_program, stage_critical_path
from mlsys_jax.sched.cost import AnalyticalCost, StageProfiler
from mlsys_jax.sched.dp import Stage, ios_dp
from mlsys_jax.sched.emit import (CUDA_GRAPH_OPTIONS, compiler_options, merge_key, stream_call,
                                  stream_call_available)
from mlsys_jax.sched.graph import Graph, Unit, build_graph, relayout_conv_kernels
from mlsys_jax.sched.xla import CHECK_CONFIGS, CONV_FUSION_OPTIONS, GROUPED_CONV_CHECK_CONFIGS, XLA_CONFIGS, check_configs

__all__ = ["calibrate", "ios_schedule", "Schedule", "sequential_schedule", "AnalyticalCost", "StageProfiler",
           "Stage", "ios_dp", "CUDA_GRAPH_OPTIONS", "compiler_options", "merge_key", "stream_call",
           "stream_call_available", "Graph", "Unit", "build_graph", "relayout_conv_kernels",
           "longest_paths", "path_program", "stage_critical_path", "XLA_CONFIGS", "CHECK_CONFIGS", "CONV_FUSION_OPTIONS",
           "GROUPED_CONV_CHECK_CONFIGS", "check_configs"]
