"""mlsys_jax.sched.dynamic: Nimble (Shen et al., MLSys 2021) ideas for dynamic shapes in JAX.

Public API:
  bucketed_jit(fn, dims, buckets, ...) -> BucketedFunction   pad to buckets, one program per bucket
  length_mask, PaddingInvarianceError
  pow2_buckets, bucket_for, choose_buckets -> BucketPlan, expected_cost, length_distribution
"""

from mlsys_jax.sched.dynamic.bucketed import (BucketedFunction, PaddingInvarianceError, bucketed_jit,
                                              length_mask)
from mlsys_jax.sched.dynamic.buckets import (BucketPlan, bucket_for, choose_buckets, expected_cost,
                                             length_distribution, pow2_buckets)

__all__ = ["bucketed_jit", "BucketedFunction", "PaddingInvarianceError", "length_mask", "BucketPlan",
           "bucket_for", "choose_buckets", "expected_cost", "length_distribution", "pow2_buckets"]
