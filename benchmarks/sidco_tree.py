"""Time of a jitted ``tx.update`` of the sparsifiers on a ResNet-50-shaped gradient tree (161 leaves,
25.56M float32 parameters, ``powersgd_step.resnet50_shapes``), as a user runs it: one device, the update
called from Python every step (dispatch included), ratio 0.001, each case interleaved with the ``topk``
transform in the same run (``stats.time_interleaved``), against two floors measured in the same run:

- ``rw_floor_seconds``: one read plus one write of the gradients' bytes at the device's copy bandwidth
  (``benchmarks.common.copy_bandwidth``, 1 GiB flat array): ``8 n / bandwidth``;
- ``tree_copy_seconds``: a jitted copy of the gradient tree (``x * 1.0000001`` per leaf), i.e. the same
  bytes with the tree's dispatch and per-leaf kernels.

Cases: the default ``sidco(0.001)`` (exponential, adaptive stages), ``sidco(0.001, per_tensor=True)``
(per-segment thresholds), the same two with ``distribution='gpareto', stages=1`` (the kernel benchmark's
estimator), and, with ``--topk_per_tensor``, ``topk(0.001, per_tensor=True)`` (a Python loop of
``lax.top_k`` over the leaves). Raw seconds in the JSON (``seconds``: median per call).

  PYTHONPATH=. python benchmarks/sidco_tree.py --out $OUT       # H200: about 2 minutes
  PYTHONPATH=. python benchmarks/sidco_tree.py --out $OUT --packing xla   # the XLA packing path
  PYTHONPATH=. python benchmarks/sidco_tree.py --small          # CPU smoke test (widths / 8)
  PYTHONPATH=. python benchmarks/sidco_tree.py --div 2          # CPU, a mid size (widths / 2)
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (copy_bandwidth, environment, parse_args, print_table, read_bandwidth,  # noqa: E402
                               write_json)
from benchmarks.powersgd_step import resnet50_shapes  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.comm import sparse as sp  # noqa: E402

RATIO = 0.001


def _flags(ap):
  ap.add_argument("--div", type=int, default=None, help="divide the channel widths (default 1; 8 with --small)")
  ap.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 30; 5 with --small)")
  ap.add_argument("--topk_per_tensor", action="store_true", help="also time topk(per_tensor=True) (slow)")
  ap.add_argument("--packing", default="auto", choices=sp.PACKINGS,
                  help="packing of the sidco transform's flat buffer (auto: Pallas kernels on GPU)")


def main():
  args = parse_args(__doc__, _flags)
  env = environment()
  sp._TRANSFORM_PACKING = args.packing
  div = args.div or (8 if args.small else 1)
  shapes = resnet50_shapes(div)
  n_params = int(sum(np.prod(s) for s in shapes))
  key = jax.random.PRNGKey(0)
  # heavy-tailed (Laplace) leaves of one scale: the fitted thresholds land near the target, so these
  # cases time the usual step (no floor, no ceiling). The last case spreads the leaves' scales over
  # two decades: the flat exponential fit then overshoots the payload on the first step, and the
  # ceiling (bisection + second packing) runs on every timed call (state not advanced): its cost.
  grads = {f"{i:03d}": jax.random.laplace(jax.random.fold_in(key, i), s, jnp.float32) * 1e-3
           for i, s in enumerate(shapes)}
  mixed = {k: v * float(10.0 ** (-1 + 2 * ((i * 37) % 11) / 10)) for i, (k, v) in enumerate(grads.items())}
  cases = {
      "sidco(0.001) default (exponential, adaptive stages)": (sp.sidco(RATIO), grads),
      "sidco(0.001, per_tensor=True)": (sp.sidco(RATIO, per_tensor=True), grads),
      "sidco(0.001, gpareto, stages=1)": (sp.sidco(RATIO, distribution="gpareto", stages=1), grads),
      "sidco(0.001, gpareto, stages=1, per_tensor=True)": (
          sp.sidco(RATIO, distribution="gpareto", stages=1, per_tensor=True), grads),
      "sidco(0.001) on mixed-scale leaves (ceiling on every call)": (sp.sidco(RATIO), mixed),
  }
  if args.topk_per_tensor:
    cases["topk(0.001, per_tensor=True)"] = (sp.topk(RATIO, per_tensor=True), grads)
  reps = args.repeats or (5 if args.small else 30)
  on_cpu = jax.default_backend() == "cpu"
  bw_bytes = (1 << 26) if on_cpu else (1 << 30)
  copy_bw = copy_bandwidth(bw_bytes, repeats=5 if on_cpu else 20)
  read_bw = read_bandwidth(bw_bytes, repeats=5 if on_cpu else 20)
  rw_floor = 8 * n_params / copy_bw
  base_tx = sp.topk(RATIO)
  base_fn = jax.jit(base_tx.update)
  base_st = base_tx.init(grads)
  copy = jax.jit(lambda g: jax.tree_util.tree_map(lambda x: x * 1.0000001, g))
  meta = {"env": env, "packing": args.packing, "n_params": n_params, "n_tensors": len(shapes), "ratio": RATIO, "repeats": reps,
          "div": div, "copy_bandwidth": copy_bw, "read_bandwidth": read_bw, "rw_floor_seconds": rw_floor,
          "read_floor_seconds": 4 * n_params / read_bw}
  jax.block_until_ready(base_fn(grads, base_st))
  t = stats.time_interleaved(lambda: copy(grads), lambda: base_fn(grads, base_st), repeats=reps, warmup=2)
  meta["tree_copy_seconds"] = float(t.median_a)
  meta["topk_seconds"] = float(t.median_b)
  print(f"{len(shapes)} tensors, {n_params:,} parameters; read+write floor {rw_floor * 1e3:.3f} ms, "
        f"tree copy {t.median_a * 1e3:.3f} ms, topk(0.001) {t.median_b * 1e3:.3f} ms", flush=True)
  rows = []
  t0 = time.perf_counter()
  for name, (tx, g_case) in cases.items():
    fn = jax.jit(tx.update)
    st = tx.init(g_case)
    tc = time.perf_counter()
    out, st1 = jax.block_until_ready(fn(g_case, st))
    compile_s = time.perf_counter() - tc
    # exact error feedback on this tree (a wrong fast path is not a result)
    exact = all(bool(jnp.array_equal(o + r, g)) for o, r, g in zip(
        jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(st1.residual), jax.tree_util.tree_leaves(g_case)))
    t = stats.time_interleaved(lambda: fn(g_case, st), lambda: base_fn(grads, base_st), repeats=reps, warmup=2)
    rows.append({"method": name, "seconds": float(t.median_a), "topk_seconds": float(t.median_b),
                 "speedup_over_topk": float(t.median_b / t.median_a),
                 "over_rw_floor": float(t.median_a / rw_floor),
                 "over_tree_copy": float(t.median_a / meta["tree_copy_seconds"]),
                 "p_faster_than_topk": float(t.p_a_faster),
                 "density": float(st1.density), "bytes_sent": float(st1.bytes_sent),
                 "overflow": int(st1.overflow_steps), "exact_error_feedback": exact,
                 "compile_seconds": float(compile_s)})
    print(rows[-1], flush=True)
    write_json(args.out, "sidco_tree", {**meta, "rows": rows, "partial": True})
  print(f"\n{env}\n{len(shapes)} tensors, {n_params:,} parameters; total {time.perf_counter() - t0:.0f}s")
  print_table(rows, ["method", "seconds", "topk_seconds", "speedup_over_topk", "over_rw_floor", "over_tree_copy",
                     "density"])
  write_json(args.out, "sidco_tree", {**meta, "rows": rows})


if __name__ == "__main__":
  main()
