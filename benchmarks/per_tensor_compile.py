"""Compile and run time of a per-tensor compressor's jitted update on ResNet-50's 161 leaves, with and without
``sparse._BATCH_LEAVES`` (the leaves of one size selected by one vmapped call), each configuration in a fresh
process.

    python3 benchmarks/per_tensor_compile.py --out $OUT --name per_tensor_compile_cpu_s25 [--div 8] [--rows ...]

Rows ``<compressor>:<branches>:<batch>``: compressor ``dgc`` / ``topk`` (``per_tensor=True``, ratio 0.001),
``sparse._BRANCHES`` ``cond`` / ``where``, ``_BATCH_LEAVES`` 0 / 1 (``topk`` never batches: its rows show the
switch changes nothing there). Per row: compile seconds of ``jax.jit(tx.update).lower(g, state).compile()`` and
the median wall ms of 10 calls (run after one warm-up call), on random normal gradients.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, parse_args, print_table, write_json  # noqa: E402

_CHILD = r"""
import json, sys, time
import numpy as np
import jax, jax.numpy as jnp
sys.path.insert(0, ".")
from benchmarks.sidco_model_step import ResNet50
from mlsys_jax.comm import sparse as sp
name, mode, batch, div = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
sp._BATCH_LEAVES, sp._BRANCHES = batch, mode
m = ResNet50(num_classes=1000, div=div)
p = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
leaves, tdef = jax.tree_util.tree_flatten(p)
keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
g = jax.tree_util.tree_unflatten(tdef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
tx = {"dgc": lambda: sp.dgc(0.001, per_tensor=True), "topk": lambda: sp.topk(0.001, per_tensor=True)}[name]()
st = tx.init(p)
t0 = time.perf_counter(); c = jax.jit(tx.update).lower(g, st).compile(); tc = time.perf_counter() - t0
jax.block_until_ready(c(g, st))
ts = []
for _ in range(10):
  t0 = time.perf_counter(); jax.block_until_ready(c(g, st)); ts.append(time.perf_counter() - t0)
print(json.dumps({"compile_s": tc, "run_ms": 1e3 * float(np.median(ts)), "leaves": len(leaves),
                  "params": int(sum(x.size for x in leaves))}))
"""

ROWS = "dgc:cond:0,dgc:cond:1,dgc:where:0,dgc:where:1,topk:cond:0,topk:cond:1"


def _flags(ap):
  ap.add_argument("--name", default="per_tensor_compile")
  ap.add_argument("--div", type=int, default=8, help="ResNet-50 width divisor (1: full size)")
  ap.add_argument("--rows", default=ROWS)


def main():
  args = parse_args(__doc__, _flags)
  rows = []
  for spec in [r for r in args.rows.split(",") if r]:
    name, mode, batch = spec.split(":")
    if name not in ("dgc", "topk") or mode not in ("cond", "where") or batch not in ("0", "1"):
      raise SystemExit(f"--rows: bad row {spec!r}; use <dgc|topk>:<cond|where>:<0|1>")
    r = subprocess.run([sys.executable, "-c", _CHILD, name, mode, batch, str(args.div)], capture_output=True,
                       text=True, cwd=pathlib.Path(__file__).resolve().parents[1], env=os.environ)
    if r.returncode != 0:
      raise SystemExit(f"row {spec} failed:\n{r.stderr[-2000:]}")
    rows.append({"row": spec, **json.loads(r.stdout.strip().splitlines()[-1])})
    print(f"{spec}: {rows[-1]}", flush=True)
  print_table(rows, ["row", "compile_s", "run_ms", "leaves", "params"])
  write_json(args.out, args.name, {"env": environment(), "argv": sys.argv[1:], "div": args.div, "rows": rows})


if __name__ == "__main__":
  main()
