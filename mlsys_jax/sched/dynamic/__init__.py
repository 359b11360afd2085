"""mlsys_jax.sched.dynamic: Nimble (Shen et al., MLSys 2021) ideas for dynamic shapes in JAX.

Public API:
  bucketed_jit(fn, dims, buckets, ...) -> BucketedFunction   pad to buckets, one program per bucket;
    .map(requests, chunk_size) / .stream(...)    serve a request stream: one transfer per bucket and
                                                 chunk each way, device-resident per-call inputs
  length_mask, check_padding_invariance, PaddingInvarianceError
  pow2_buckets, bucket_for, choose_buckets -> BucketPlan, expected_cost, length_distribution
  export_symbolic(fn, *example_args, dims) -> SymbolicFunction   jax.export with a symbolic length
  MaskedLSTM, TransformerEncoder                 length-masked flax models (padding invariant)
  ChildSumTreeLSTM, TreeBatch, encode_trees, tree_levels, tree_lstm_cell, tree_lstm_levels,
  tree_lstm_recursive                            Tree-LSTM: batched level by level vs per-tree recursion
"""

from mlsys_jax.sched.dynamic.bucketed import (BucketedFunction, PaddingInvarianceError, bucketed_jit,
                                              check_padding_invariance, length_mask)
from mlsys_jax.sched.dynamic.buckets import (BucketPlan, bucket_for, choose_buckets, expected_cost,
                                             length_distribution, pow2_buckets)
from mlsys_jax.sched.dynamic.models import MaskedLSTM, TransformerEncoder
from mlsys_jax.sched.dynamic.symbolic import SymbolicFunction, export_symbolic
from mlsys_jax.sched.dynamic.tree import (ChildSumTreeLSTM, TreeBatch, encode_trees, tree_levels,
                                          tree_lstm_cell, tree_lstm_levels, tree_lstm_recursive)

__all__ = ["bucketed_jit", "BucketedFunction", "PaddingInvarianceError", "check_padding_invariance",
           "length_mask", "BucketPlan", "bucket_for", "choose_buckets", "expected_cost",
           "length_distribution", "pow2_buckets", "SymbolicFunction", "export_symbolic", "MaskedLSTM",
           "TransformerEncoder", "ChildSumTreeLSTM", "TreeBatch", "encode_trees", "tree_levels",
           "tree_lstm_cell", "tree_lstm_levels", "tree_lstm_recursive"]
