"""Time of a jitted ``tx.update`` of the sparsifiers on a ResNet-50-shaped gradient tree (161 leaves,
25.56M float32 parameters, ``powersgd_step.resnet50_shapes``), as a user runs it: one device, the update
called from Python every step (dispatch included), ratio 0.001, against the ``topk`` transform and a
copy of the gradient tree measured in the same run (``stats.time_interleaved``).

Cases: the DEFAULT ``sidco(0.001)`` (exponential, adaptive stages: a device-side stage loop), the
configuration the kernel benchmark times (``distribution='gpareto', stages=1``), ``per_tensor=True``,
and ``topk`` flat and per tensor. Raw seconds in the JSON (``seconds``: median per call).

  PYTHONPATH=. python benchmarks/sidco_tree.py --out $OUT
  PYTHONPATH=. python benchmarks/sidco_tree.py --small          # CPU smoke test (widths / 8)
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import environment, parse_args, print_table, write_json  # noqa: E402
from benchmarks.powersgd_step import resnet50_shapes  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.comm import sparse as sp  # noqa: E402

RATIO = 0.001


def main():
  args = parse_args(__doc__)
  env = environment()
  shapes = resnet50_shapes(8 if args.small else 1)
  n_params = int(sum(np.prod(s) for s in shapes))
  key = jax.random.PRNGKey(0)
  grads = {f"{i:03d}": jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32) * 1e-2
           for i, s in enumerate(shapes)}
  cases = {
      "sidco(0.001) default (exponential, adaptive stages)": sp.sidco(RATIO),
      "sidco(0.001, gpareto, stages=1) (kernel benchmark's config)": sp.sidco(RATIO, distribution="gpareto",
                                                                               stages=1),
      "sidco(0.001, gpareto, stages=1, per_tensor=True)": sp.sidco(RATIO, distribution="gpareto", stages=1,
                                                                   per_tensor=True),
      "sidco(0.001, per_tensor=True) default estimator": sp.sidco(RATIO, per_tensor=True),
      "topk(0.001, per_tensor=True)": sp.topk(RATIO, per_tensor=True),
  }
  base_tx = sp.topk(RATIO)
  base_fn = jax.jit(base_tx.update)
  base_st = base_tx.init(grads)
  copy = jax.jit(lambda g: jax.tree_util.tree_map(lambda x: x * 1.0000001, g))
  reps = 5 if args.small else 30
  rows = []
  meta = {"env": env, "n_params": n_params, "n_tensors": len(shapes), "ratio": RATIO, "repeats": reps}
  jax.block_until_ready(base_fn(grads, base_st))
  t = stats.time_interleaved(lambda: copy(grads), lambda: base_fn(grads, base_st), repeats=reps, warmup=2)
  meta["copy_seconds"] = float(t.median_a)
  meta["topk_seconds"] = float(t.median_b)
  print(f"copy of the tree {t.median_a * 1e3:.3f} ms, topk(0.001) {t.median_b * 1e3:.3f} ms", flush=True)
  t0 = time.perf_counter()
  for name, tx in cases.items():
    fn = jax.jit(tx.update)
    st = tx.init(grads)
    tc = time.perf_counter()
    _, st1 = jax.block_until_ready(fn(grads, st))
    compile_s = time.perf_counter() - tc
    t = stats.time_interleaved(lambda: fn(grads, st), lambda: base_fn(grads, base_st), repeats=reps, warmup=2)
    rows.append({"method": name, "seconds": float(t.median_a), "topk_seconds": float(t.median_b),
                 "speedup_over_topk": float(t.median_b / t.median_a),
                 "over_copy": float(t.median_a / meta["copy_seconds"]),
                 "p_faster_than_topk": float(t.p_a_faster),
                 "density": float(st1.density), "bytes_sent": float(st1.bytes_sent),
                 "compile_seconds": float(compile_s)})
    print(rows[-1], flush=True)
    write_json(args.out, "sidco_tree", {**meta, "rows": rows, "partial": True})
  print(f"\n{env}\n{len(shapes)} tensors, {n_params:,} parameters; total {time.perf_counter() - t0:.0f}s")
  print_table(rows, ["method", "seconds", "topk_seconds", "speedup_over_topk", "over_copy", "density"])
  write_json(args.out, "sidco_tree", {**meta, "rows": rows})


if __name__ == "__main__":
  main()
