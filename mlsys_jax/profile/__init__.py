"""mlsys_jax.profile: RL-Scope (Gleeson et al., MLSys 2021) for JAX: where the time of a workload goes,
per user operation and category, with the profiler's own overhead calibrated and subtracted.

Public API:
  Profiler(level='intercept'|'off'|'scopes'|'trace', trace_dir=None)   records one run (context manager)
  CURRENT                                  the current-profiler context variable (the only global state)
  operation(name), simulator(name), set_phase(name)   scopes (context managers / decorators)
  jit(fn), device_put, device_get, block_until_ready  intercepted JAX calls (dispatch/compile/transfer/wait)
  attribute(prof, trace=None) -> Attribution          (phase, op) x category table, device overlap
  Record                                   one recorded host interval (Profiler.records)
  summarize(attribution), load_trace(path), device_intervals(trace, ops)
  calibrate(workload, repeats=5, levels=LEVELS) -> Calibration     per-event cost of each source
  calibrate_micro(n=4000) -> Calibration                         the same from book-keeping-bound loops
  calibrate_insitu(workload, fixed, fit=('trace',)) -> InSitu    fitted on the workload's off/traced pairs,
                                           with held-out (cross-validated) bias; crossvalidate, fit_deltas, run_pairs
  correct(attribution, calibration) -> Corrected                   overhead subtracted where it ran
  validate(workload, calibration, level='trace') -> Validation    corrected vs uninstrumented totals
  run_levels, spin_ns
  make_workload(algo, env, backend, steps, seed)   a2c/dqn/supervised on cartpole/pendulum, numpy or JAX sim
  table_rows(attribution_or_corrected), format_table(rows), plot_stacked(groups, path), to_jsonable
  CartPoleNP, PendulumNP, cartpole_step/reset, pendulum_step/reset, numpy_jax_agree
  LEVELS, HOST_CATEGORIES, RESOURCES, SOURCES
"""

from mlsys_jax.profile.attribution import (RESOURCES, Attribution, attribute, device_intervals, load_trace,
                                           summarize)
from mlsys_jax.profile.overhead import (Calibration, Corrected, InSitu, Validation, calibrate, calibrate_insitu,
                                        calibrate_micro, correct, crossvalidate, fit_deltas, run_levels, run_pairs,
                                        spin_ns, validate)
from mlsys_jax.profile.workloads import (CartPoleNP, PendulumNP, cartpole_reset, cartpole_step, make_workload,
                                         numpy_jax_agree, pendulum_reset, pendulum_step)
from mlsys_jax.profile.report import format_table, plot_stacked, table_rows, to_jsonable
from mlsys_jax.profile.scopes import (CURRENT, HOST_CATEGORIES, LEVELS, SOURCES, Profiler, Record,
                                      block_until_ready, device_get, device_put, jit, operation, set_phase,
                                      simulator)

__all__ = ["Profiler", "Record", "CURRENT", "operation", "simulator", "set_phase", "jit", "device_put",
           "device_get", "block_until_ready", "attribute", "Attribution", "summarize", "load_trace",
           "device_intervals", "calibrate", "calibrate_micro", "calibrate_insitu", "InSitu", "crossvalidate",
           "fit_deltas", "run_pairs", "Calibration", "correct", "Corrected", "validate", "Validation",
           "run_levels", "spin_ns", "make_workload", "CartPoleNP", "PendulumNP", "cartpole_reset",
           "cartpole_step", "pendulum_reset", "pendulum_step", "numpy_jax_agree", "table_rows",
           "format_table", "plot_stacked", "to_jsonable", "LEVELS", "HOST_CATEGORIES", "RESOURCES", "SOURCES"]
