"""mlsys_jax.cost: learned performance models of XLA programs (Kaufman et al., MLSys 2021).

Pipeline: capture optimized HLO and XLA cost analysis from ``jax.jit`` (:func:`capture`) -> parse the
text (:func:`parse_hlo`) -> graphs (:func:`program_graph`, :func:`kernel_graphs`, an
:class:`HloGraph` container) -> features (:func:`node_features`, :func:`program_features`) -> models
(:class:`GraphSAGECostModel`, :class:`MLPCostModel`, the :class:`Roofline` baseline) -> metrics
(:func:`mape`, :func:`kendall_tau`, :func:`topk_slowdown`). Datasets: :func:`load_dataset` (ours,
collected by experiments/cost_collect.py; :func:`merge_datasets` joins collections of several devices and drops
graph duplicates by :func:`graph_fingerprint`) and :func:`load_tpugraphs_npz` (TpuGraphs). :func:`parse_hlo`
reads the grammar XLA's own parser reads (checked against it, :func:`xla_structure`). Whole-program latency
as a sum of per-kernel rooflines with per-class rates fitted on timed programs: :func:`program_kernels`,
:func:`fit_kernel_roofline`, :func:`predict_kernel_roofline`. Value Learning
(Steiner et al., MLSys 2021) for IOS schedules: ``from mlsys_jax.cost import value``; its stage-cost
predictor for ``sched.ios_schedule(..., predictor=...)``: ``from mlsys_jax.cost import value_ios``.

Example:
  >>> from mlsys_jax import cost
  >>> cap = cost.capture(lambda x: jnp.tanh(x @ x), jnp.ones((64, 64)))
  >>> g = cost.program_graph(cost.parse_hlo(cap.hlo_text))
  >>> cap.cost["flops"] >= 2 * 64 ** 3      # XLA's cost analysis of the matmul (+ the tanh)
  True
"""

from mlsys_jax.cost.dataset import (CostDataset, TpuGraphsExample, graph_fingerprint, load_dataset,
                                    load_tpugraphs_npz, merge_datasets, save_dataset)
from mlsys_jax.cost.features import (NUM_NODE_FEATURES, NUM_PROGRAM_FEATURES, node_features,
                                     program_features)
from mlsys_jax.cost.graph import (ATTR_NAMES, OPCODES, HloGraph, batch_graphs, capture_kernels,
                                  kernel_costs, kernel_graphs, pad_graph, program_graph, unbatch_graph)
from mlsys_jax.cost.kernel_roofline import (KERNEL_CLASSES, KernelLabels, KernelRoofline, KernelRooflineConfig,
                                            KernelTable, device_time_oracle, fit_kernel_roofline, kernel_roofline_ood,
                                            match_kernel_times, predict_kernel_roofline, profile_name, program_kernels,
                                            scale_kernel_roofline)
from mlsys_jax.cost.hlo import (Capture, HloModule, HloParseError, capture, cost_dict,
                                parse_hlo, parse_shape, strip_metadata, xla_hlo_parser, xla_structure)
from mlsys_jax.cost.metrics import (Roofline, bootstrap_mean_ci, fit_roofline, group_metrics,
                                    kendall_tau, mape, mape_scale, ordered_pair_accuracy,
                                    topk_slowdown)
from mlsys_jax.cost.models import (GraphBatch, GraphSAGECostModel, MLPCostModel, log_mse_loss,
                                   make_batch, pairwise_rank_loss, segment_logsumexp)
from mlsys_jax.cost.programs import FAMILIES, ProgramSpec, make_args, option_variants, sample_program
from mlsys_jax.cost.train import GNNConfig, MLPConfig, fit_gnn, fit_mlp, predict_gnn, predict_mlp

__all__ = [
    "ATTR_NAMES", "Capture", "CostDataset", "FAMILIES", "GNNConfig", "GraphBatch", "GraphSAGECostModel",
    "HloGraph", "HloModule", "HloParseError", "MLPConfig", "MLPCostModel", "NUM_NODE_FEATURES",
    "NUM_PROGRAM_FEATURES", "OPCODES", "ProgramSpec", "Roofline", "TpuGraphsExample", "batch_graphs",
    "bootstrap_mean_ci", "capture", "capture_kernels", "cost_dict", "fit_gnn", "fit_mlp", "fit_roofline",
    "graph_fingerprint",
    "group_metrics", "kendall_tau", "kernel_costs", "kernel_graphs", "load_dataset", "load_tpugraphs_npz",
    "log_mse_loss", "make_args", "make_batch", "mape", "mape_scale", "merge_datasets", "node_features", "option_variants",
    "ordered_pair_accuracy", "pad_graph", "pairwise_rank_loss", "parse_hlo", "parse_shape",
    "predict_gnn", "predict_mlp", "program_features", "program_graph", "sample_program", "save_dataset",
    "segment_logsumexp", "strip_metadata", "topk_slowdown", "unbatch_graph", "xla_hlo_parser",
    "xla_structure",
    # whole-program latency as a sum of per-kernel rooflines (kernel_roofline)
    "KERNEL_CLASSES", "KernelLabels", "KernelRoofline", "KernelRooflineConfig", "KernelTable", "device_time_oracle",
    "fit_kernel_roofline", "kernel_roofline_ood", "match_kernel_times", "predict_kernel_roofline", "profile_name",
    "program_kernels", "scale_kernel_roofline",
]
