"""Root pytest configuration: simulated CPU devices before jax is imported, and the names every docstring
example may use without importing them (``jax``, ``jnp``, ``np``, ``optax``, ``flax``, ``nn``)."""

import os

# Must happen before jax is imported anywhere in the session (tests and doctests alike).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
# Simulated devices are threads; on a loaded 2-core machine a collective can wait longer than XLA's
# default 40 s rendezvous limit, which aborts the process. Allow more time.
if "collective_call_terminate_timeout" not in _flags:
  _flags += " --xla_cpu_collective_call_terminate_timeout_seconds=600"
# The suite compiles over a thousand small XLA:CPU programs, and LLVM's optimisation passes are most of
# its CPU time: without them the default suite runs ~2x faster on CI's 2 cores (tests/test_models.py +
# tests/test_profile.py: 58.6 s -> 28.0 s). XLA:CPU emits IEEE arithmetic at every LLVM level (no fast-math)
# and the default suite passes with these flags, but two *different* programs that agree bitwise at full
# optimisation can differ in the last bit here (FMA contraction differs): the one test that compares two
# training programs bitwise (test_exact_sidco_trains_bitwise_like_topk_in_the_experiment_step, slow) is
# skipped unless MLSYS_JAX_TEST_XLA_OPT=1.
# MLSYS_JAX_TEST_XLA_OPT=1 keeps XLA's default optimisation (e.g. to time something under pytest).
if os.environ.get("MLSYS_JAX_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  # XLA:CPU's element-wise emitter compiles large fusions (e.g. the Pallas interpreter's unrolled
  # bit-error kernels: 5.2-6.4 s -> 2.5-3.3 s) about twice as fast as the MLIR fusion emitters, with the
  # same IEEE arithmetic. The flag is known to the jaxlib versions CI installs (0.10.x); an unknown flag
  # would abort XLA, so other versions keep the default.
  try:
    from importlib.metadata import version as _version
    _jaxlib = tuple(int(x) for x in _version("jaxlib").split(".")[:2])
  except Exception:   # not installed or an unusual version string: keep XLA's default
    _jaxlib = ()
  if _jaxlib == (0, 10) and "xla_cpu_use_fusion_emitters" not in _flags:
    _flags += " --xla_cpu_use_fusion_emitters=false"
  # (Not --xla_cpu_parallel_codegen_split_count=1, though it compiles with ~7% less CPU here: one LLVM module per
  # program changes what LLVM contracts and vectorizes, and the slow suite's batched-vs-leaf-by-leaf DGC comparison
  # with a preconditioner then differs in 6 entries; session 41.)
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc  # noqa: E402

# A test process accumulates GBs of jit caches, jaxprs and compiled programs: at Python's default thresholds
# (700, 10, 10) every full collection walks all of it, tens of times a process. A full collection at most every 100
# (not 10) middle-generation collections: the same programs, less CPU (session 41).
if gc.get_threshold() == (700, 10, 10):   # (the interpreter's default: a caller's own setting is kept)
  gc.set_threshold(700, 10, 100)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  doctest_namespace.update(jax=jax, jnp=jnp, np=np, optax=optax, nn=nn)
