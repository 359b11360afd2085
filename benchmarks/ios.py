"""One entry point for the IOS benchmarks (Ding et al., MLSys 2021); each mode is a script of its own:

  check      ios_schedule(check='measure') over nets, dtypes and batch sizes: IOS vs the best XLA program
             and which one runs (benchmarks/ios_check.py)
  batch      batch-size specialization: best XLA vs IOS-Merge vs IOS-Both per batch, and the cross table
             (schedule found at b1 run at b2) (ios_batch.py)
  baselines  plain jit vs per-jit XLA configurations of the unscheduled nets (ios_xla_baselines.py)
  isolated   IOS and XLA programs, each timed in a fresh process (ios_isolated.py)
  chain      the longest dependency chain alone: a bound on any schedule (ios_chain_bound.py)
  latency    search + in-process interleaved timing, one process (ios_latency.py)
  probe      network / stage probes with kernel traces (ios_probe.py)
  compile    first-call cost of programs with many depthwise convs (ios_compile_probe.py)

  PYTHONPATH=. python3 benchmarks/ios.py MODE [mode arguments]     # e.g. check --small; MODE --help
"""

from __future__ import annotations

import importlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

MODES = {"check": "ios_check", "batch": "ios_batch", "baselines": "ios_xla_baselines", "isolated": "ios_isolated",
         "chain": "ios_chain_bound", "latency": "ios_latency", "probe": "ios_probe",
         "compile": "ios_compile_probe"}


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1] not in MODES:
    raise SystemExit(f"usage: ios.py MODE [args]; MODE is one of {sorted(MODES)}\n\n{__doc__}")
  mode = sys.argv.pop(1)
  importlib.import_module(f"benchmarks.{MODES[mode]}").main()


if __name__ == "__main__":
  main()
