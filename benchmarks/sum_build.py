"""Device time of sidco's error-compensated buffer and its statistics on a ResNet-50-shaped tree (161 leaves,
25.56M float32, ``powersgd_step.resnet50_shapes``): XLA's build against :func:`mlsys_jax.comm._pallas_pack.sum_leaves`
(issue 18, session 31).

What is timed: the padded buffer ``pad(g_i + r_i)`` of every leaf and, per tile / block, the statistics that
sidco's selection reads (``s1``, ``s2``, ``block_max``), from materialized gradient leaves (as a jitted
``tx.update`` gets them) and a residual kept as a tree (the default) or as one flat vector (``flat_state=True``),
with one threshold segment (``per_tensor=False``) or per-tensor segments. Rows:

- ``copy``: ``x * s`` over one flat vector of the buffer's size (one read + one write: the floor's unit);
- ``xla``: what sidco does with ``sparse._SUM_BUILD = "xla"``: the leafwise sums written into one buffer by
  XLA (``_Layout.flatten_sum(..., "dus")`` for a tree residual; ``pad(concat(g) + r)`` for a flat one, one gather
  per tensor), then the Pallas statistics kernel (``tile_stats``) reads it again;
- ``pallas``: ``sum_leaves`` (one kernel per group of leaves, buffer and statistics from one read), and its
  variants ``pallas[plain]`` (no whole-tile / aligned loads) and ``pallas[w4]`` (4 warps).

Every Pallas row is checked bitwise against the ``xla`` row of its layout (``same_as_xla``). Device time per
call from one ``jax.profiler`` trace (``common.call_device_times``: the kernels of each call, first start to last
end), ``--calls`` calls per row.

  python3 benchmarks/sum_build.py --out $OUT --name sum_build_h100_s31     # GPU, ~1 min
  python3 benchmarks/sum_build.py --small --out /tmp/sb                    # CPU smoke test (interpret mode)
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.common import call_device_times, environment, parse_args, print_table, write_json  # noqa: E402
from benchmarks.powersgd_step import resnet50_shapes  # noqa: E402
from mlsys_jax.comm import _pallas_pack as pp  # noqa: E402
from mlsys_jax.comm import sparse as sp  # noqa: E402


def _flags(ap):
  ap.add_argument("--name", default="sum_build", help="JSON file name (without .json)")
  ap.add_argument("--calls", type=int, default=7, help="profiled calls per row")


def main():
  args = parse_args(__doc__.splitlines()[0], _flags)
  on_gpu = jax.default_backend() == "gpu"
  shapes = resnet50_shapes(8 if args.small else 1)
  sizes = [int(np.prod(s)) for s in shapes]
  rng = np.random.default_rng(0)
  g = [jnp.asarray(rng.standard_normal(n, dtype=np.float32)) for n in sizes]
  r = [jnp.asarray(rng.standard_normal(n, dtype=np.float32) * 0.1) for n in sizes]
  r_flat = jnp.concatenate(r)
  interp = not on_gpu
  fns, refs, meta = {}, {}, {}
  n_pad = None
  for seg in ("flat", "per_tensor"):
    lay = sp._Layout(sizes, sp._segments(sizes, seg == "per_tensor", 0.001, 16))
    n_pad = lay.n_pad if n_pad is None else n_pad
    stats = lambda f: (f,) + tuple(pp.tile_stats(f, interpret=interp, tile_blocks=pp.THR_BLOCKS))
    for res in ("tree", "flat"):
      key = f"{seg}/{res}"
      rin = r if res == "tree" else r_flat
      if res == "tree":
        xla = jax.jit(lambda g, r, lay=lay: stats(lay.flatten_sum(g, r, jnp.float32, "dus")))
      else:
        xla = jax.jit(lambda g, r, lay=lay: stats(lay.pad(sp._concat_leaves(g, jnp.float32) + r)))
      variants = {"pallas": {}, "pallas[plain]": dict(whole_tiles=False, align=False), "pallas[w4]": dict(num_warps=4)}
      fns[f"xla {key}"] = (xla, rin)
      for name, kw in variants.items():
        fns[f"{name} {key}"] = (jax.jit(lambda g, r, lay=lay, kw=kw: pp.sum_leaves(
            g, r, lay.tile_shift, lay.tile_limit, interpret=interp, **kw)), rin)
      meta[key] = {"segments": lay.num_segments, "n_pad": lay.n_pad}
  x = jnp.asarray(rng.standard_normal(n_pad, dtype=np.float32))
  copy = jax.jit(lambda x: x * 1.0001)
  calls = {"copy": lambda: copy(x)}
  outs = {}
  for name, (fn, rin) in fns.items():
    outs[name] = jax.block_until_ready(fn(g, rin))
    calls[name] = lambda fn=fn, rin=rin: fn(g, rin)
  rows = []
  for name in ["copy"] + list(fns):
    row = {"row": name}
    if name != "copy":
      ref = outs["xla " + name.split(" ", 1)[1]]
      row["same_as_xla"] = all(bool(jnp.array_equal(a, b)) for a, b in zip(outs[name], ref))
    rows.append(row)
  if on_gpu:
    times = call_device_times(calls, args.calls)
    for row in rows:
      t = times[row["row"]]
      row.update(span_s=t["span_s"], busy_s=t["busy_s"], kernels=t["kernels"])
    base = {row["row"]: row for row in rows}
    for row in rows:
      if row["row"] != "copy":
        ref = base["xla " + row["row"].split(" ", 1)[1]]
        row["vs_xla"] = ref["span_s"] / row["span_s"]
      row["copies"] = row["span_s"] / base["copy"]["span_s"]
  print_table(rows, ["row", "span_s", "busy_s", "kernels", "vs_xla", "copies", "same_as_xla"])
  write_json(args.out, args.name, {"env": environment(), "argv": sys.argv[1:], "n_params": int(sum(sizes)),
                                   "n_leaves": len(sizes), "layouts": meta, "rows": rows})


if __name__ == "__main__":
  main()
