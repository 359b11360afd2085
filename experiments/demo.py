"""The main job of mlsys-jax: a demo of every technique on small embedded data, printed as one table.

  python experiments/demo.py            # every technique, CPU: several minutes on 2 cores
  python experiments/demo.py --only=quant,comm --json_out=/tmp/demo.json

Each technique contributes rows from a module in ``experiments/demos/`` (see its ``__init__``).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import sys
import time
import traceback

# Collective demos need several devices: on a CPU-only machine simulate 8 (ignored by GPU backends).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_ONLY = flags.DEFINE_list("only", [], "Run only demo modules whose name contains one of these words.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for every demo.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Optional path for the table as JSON.")

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent))


def _discover():
  mods = []
  for path in sorted((_HERE / "demos").glob("*.py")):
    if path.name.startswith("_"):
      continue
    name = path.stem
    if _ONLY.value and not any(w in name for w in _ONLY.value):
      continue
    mod = importlib.import_module(f"demos.{name}")
    mods.append(mod)
  return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def _print_table(rows):
  headers = ("technique", "what was measured", "value", "seconds")
  widths = [max(len(str(r[i])) for r in rows + [headers]) for i in range(4)]
  line = "+".join("-" * (w + 2) for w in widths)
  fmt = " | ".join("{:<%d}" % w for w in widths)
  print(line)
  print(fmt.format(*headers))
  print(line)
  for r in rows:
    print(fmt.format(*map(str, r)))
  print(line)


def main(argv):
  del argv
  import jax
  print(f"mlsys-jax demo on {jax.devices()[0].platform} ({len(jax.devices())} device(s)), jax {jax.__version__}",
        flush=True)
  rows, failures = [], []
  for mod in _discover():
    t0 = time.perf_counter()
    print(f"[demo] {mod.TECHNIQUE} ...", flush=True)
    try:
      out = mod.run(_SEED.value)
    except Exception:  # one failing technique must not hide the others; it fails the run below.
      traceback.print_exc()
      failures.append(mod.TECHNIQUE)
      out = [(mod.TECHNIQUE, "FAILED (traceback above)", "-")]
    dt = time.perf_counter() - t0
    rows.extend((*r, f"{dt:.1f}") for r in out)
  _print_table(rows)
  if _JSON_OUT.value:
    pathlib.Path(_JSON_OUT.value).write_text(json.dumps(
        [dict(zip(("technique", "measured", "value", "seconds"), r)) for r in rows], indent=1))
  if failures:
    raise SystemExit(f"demo rows failed: {failures}")


if __name__ == "__main__":
  app.run(main)
