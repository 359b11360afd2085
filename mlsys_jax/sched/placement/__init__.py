"""mlsys_jax.sched.placement: FirePlace, online VM placement by hindsight imitation (Balaji, Kakovitch,
Narayanaswamy, MLSys 2021).

Public API:
  Cluster, make_cluster, Trace, Spec, Observation, SimResult   data types
  simulate(trace, cluster, policy, spec=...) -> SimResult      jittable/vmappable lax.scan simulator
  par_per_step, par_objective                                  the peak-to-average objective
  hindsight_scores, validate_trace
  synthetic_trace, make_trace, load_csv_trace, WORKLOADS, VM_SIZES   workloads
  random_policy, round_robin, first_fit, best_fit, least_loaded, power_of_two, forecast,
  hindsight_oracle, BASELINES                                  baseline policies
  switch_policy                                                several policies in one compiled simulation
  simulate_numpy, NUMPY_POLICIES                               numpy reference simulator
  machine_features, PlacementNet, imitation_policy, train_imitation, imitation_loss,
  ImitationResult, offline_optimum, dagger_rollouts           hindsight imitation (DAgger), brute force
  train_ppo, ppo_policy, step_rewards, PPOResult               off-the-shelf RL baseline (PPO)
"""

from mlsys_jax.sched.placement.hindsight import (ImitationResult, PlacementNet, dagger_rollouts,
                                                 imitation_loss, imitation_policy, machine_features, offline_optimum,
                                                 train_imitation)
from mlsys_jax.sched.placement.policies import (BASELINES, NUMPY_POLICIES, best_fit, first_fit, forecast,
                                                hindsight_oracle, least_loaded, power_of_two,
                                                random_policy, round_robin, simulate_numpy,
                                                switch_policy)
from mlsys_jax.sched.placement.ppo import PPOResult, ppo_policy, step_rewards, train_ppo
from mlsys_jax.sched.placement.sim import (Cluster, Observation, SimResult, Spec, Trace, hindsight_scores,
                                           make_cluster, par_objective, par_per_step, simulate,
                                           validate_trace)
from mlsys_jax.sched.placement.traces import (VM_SIZES, WORKLOADS, load_csv_trace, make_trace,
                                              synthetic_trace)

__all__ = ["Cluster", "Observation", "SimResult", "Spec", "Trace", "hindsight_scores", "make_cluster",
           "par_objective", "par_per_step", "simulate", "validate_trace", "VM_SIZES", "WORKLOADS",
           "load_csv_trace", "make_trace", "synthetic_trace", "BASELINES", "NUMPY_POLICIES", "best_fit",
           "first_fit", "forecast", "hindsight_oracle", "least_loaded", "power_of_two", "random_policy",
           "round_robin", "simulate_numpy", "switch_policy", "ImitationResult", "PlacementNet", "imitation_loss",
           "imitation_policy", "machine_features", "offline_optimum", "train_imitation", "dagger_rollouts",
           "PPOResult", "ppo_policy", "step_rewards", "train_ppo"]
