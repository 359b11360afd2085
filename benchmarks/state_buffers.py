"""What the number of optimizer-state buffers costs a training step (issue 18 item 4).

A training loop jits ``step(params, opt_state, grads) -> (apply_updates(params, updates), opt_state)`` with
params and state donated and fed back call to call. Every donated buffer is host work per call (the runtime
checks, aliases and hands back each one): ``optax.adam`` carries 2 buffers per parameter leaf,
``chain(sidco, adam)`` 3 (the error-feedback residual), ``sidco(flat_state=True)`` one residual vector for
the whole tree, ``optax.flatten(adam)`` Adam's moments as 2 vectors. This script times such steps back to
back (the host runs ahead; one block per round), rows interleaved round by round after every row is
compiled, on ResNet-50's 161 parameter shapes with the channel widths divided by ``--div`` (large ``--div``:
tiny tensors, so the step is host-bound and the per-buffer cost shows; ``--div 1``: the real sizes).

Per row: ``step_s`` (median over rounds of the wall seconds per step), ``entry_fusions`` / ``entry_ops`` (fusions
and all instructions of the compiled step's entry computation: on a GPU each fusion is a kernel launch),
``vs_tree`` (the matching row with the
residual as a tree over this row: > 1 means faster), ``state_buffers``, and ``same_as_tree`` (the flat rows'
updates and parameters after the timed steps equal the tree rows' bitwise: every row starts from the same
state and sees the same gradients).

Usage:
  PYTHONPATH=. python3 benchmarks/state_buffers.py --out $OUT --div 16
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from benchmarks.powersgd_step import resnet50_shapes  # noqa: E402
from mlsys_jax.comm import sidco, topk  # noqa: E402

# row -> (transform factory, the tree-state row it must equal bitwise, or None). Rows (ratio r):
# adam = optax.adam(1e-3); adam_flat = optax.flatten(adam); topk / sidco / sidco_pt = chain(<c>(r), adam);
# topk_flat / sidco_flat / sidco_pt_flat = the same with flat_state=True; sidco_flat_adam_flat = chain(sidco(r,
# flat_state=True), optax.flatten(adam))
ROWS = {
    "adam": (lambda r: optax.adam(1e-3), None),
    "adam_flat": (lambda r: optax.flatten(optax.adam(1e-3)), None),
    "topk": (lambda r: optax.chain(topk(r), optax.adam(1e-3)), None),
    "topk_flat": (lambda r: optax.chain(topk(r, flat_state=True), optax.adam(1e-3)), "topk"),
    "sidco": (lambda r: optax.chain(sidco(r), optax.adam(1e-3)), None),
    "sidco_flat": (lambda r: optax.chain(sidco(r, flat_state=True), optax.adam(1e-3)), "sidco"),
    "sidco_flat_adam_flat": (
        lambda r: optax.chain(sidco(r, flat_state=True), optax.flatten(optax.adam(1e-3))), None),
    "sidco_pt": (lambda r: optax.chain(sidco(r, per_tensor=True), optax.adam(1e-3)), None),
    "sidco_pt_flat": (
        lambda r: optax.chain(sidco(r, per_tensor=True, flat_state=True), optax.adam(1e-3)),
        "sidco_pt"),
}


def _entry_ops(hlo: str) -> dict:
  """Opcode counts of the compiled program's entry computation (each fusion or custom call is a kernel
  launch on a GPU; on a CPU a loop nest)."""
  entry = hlo[hlo.index("ENTRY"):]
  entry = entry[:entry.index("\n}") if "\n}" in entry else len(entry)]
  ops = {}
  for op in re.findall(r"= \S+ ([\w-]+)\(", entry):
    ops[op] = ops.get(op, 0) + 1
  return ops


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True, help="output directory (JSON)")
  ap.add_argument("--name", default="state_buffers", help="JSON name")
  ap.add_argument("--div", type=int, default=16, help="divide ResNet-50's channel widths (1: real sizes)")
  ap.add_argument("--ratio", type=float, default=0.001)
  ap.add_argument("--steps", type=int, default=30, help="steps per timed round")
  ap.add_argument("--repeats", type=int, default=9, help="timed rounds")
  ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {list(ROWS)}")
  args = ap.parse_args()
  names = [r for r in args.rows.split(",") if r]
  for r in names:
    if r not in ROWS:
      raise SystemExit(f"--rows: unknown row {r!r}; use some of {list(ROWS)}")
  if args.div < 1 or args.steps < 1 or args.repeats < 1 or not 0 < args.ratio < 1:
    raise SystemExit("--div, --steps and --repeats must be >= 1 and --ratio in (0, 1)")

  rng = np.random.default_rng(0)
  shapes = resnet50_shapes(args.div)
  params = [jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.05 + 0.01) for s in shapes]
  grads = [[jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes] for _ in range(2)]
  n = sum(int(np.prod(s)) for s in shapes)
  print(f"{len(shapes)} leaves, {n:,} parameters, ratio {args.ratio}, {jax.devices()[0].platform}")

  progs = {}
  for r in names:
    tx = ROWS[r][0](args.ratio)

    def step(p, st, g, tx=tx):
      u, st = tx.update(g, st, p)
      return optax.apply_updates(p, u), st

    st = jax.tree_util.tree_map(jnp.copy, tx.init(params))   # distinct buffers (init may share zeros)
    p = jax.tree_util.tree_map(jnp.copy, params)
    t0 = time.perf_counter()
    fn = jax.jit(step, donate_argnums=(0, 1)).lower(p, st, grads[0]).compile()
    ops = _entry_ops(fn.as_text())
    p, st = jax.block_until_ready(fn(p, st, grads[0]))
    print(f"compiled {r} in {time.perf_counter() - t0:.1f} s")
    progs[r] = [fn, p, st, len(jax.tree_util.tree_leaves(st)), ops]

  times = {r: [] for r in names}
  for rep in range(args.repeats):
    for r in names:
      fn, p, st = progs[r][:3]
      t0 = time.perf_counter()
      for i in range(args.steps):
        p, st = fn(p, st, grads[(i + 1) % 2])
      jax.block_until_ready(p)
      times[r].append((time.perf_counter() - t0) / args.steps)
      progs[r][1], progs[r][2] = p, st

  rows = []
  for r in names:
    t = np.asarray(times[r])
    row = {"row": r, "state_buffers": progs[r][3], "entry_fusions": progs[r][4].get("fusion", 0),
           "entry_ops": sum(progs[r][4].values()), "step_s": float(np.median(t)),
           "step_s_iqr": [float(np.percentile(t, 25)), float(np.percentile(t, 75))]}
    ref = ROWS[r][1]
    if ref in progs:   # same start, same gradients, same number of steps: the same parameters bitwise
      row["same_as_tree"] = all(bool(jnp.array_equal(a, b)) for a, b in zip(progs[r][1], progs[ref][1]))
      row["vs_tree"] = float(np.median(times[ref]) / np.median(t))
      row["tree_row"] = ref
    rows.append(row)
  print_table(rows, ["row", "state_buffers", "entry_fusions", "step_s", "step_s_iqr", "vs_tree", "same_as_tree"])
  write_json(args.out, args.name, {"env": environment(), "args": vars(args), "leaves": len(shapes),
                                   "parameters": n, "rows": rows})


if __name__ == "__main__":
  main()
