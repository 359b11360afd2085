"""Time per step of PowerSGD (compress + collectives + decompress + error feedback) on ResNet-50-shaped
gradients (161 tensors, 25.56M float32 parameters, flax HWIO layout), against the uncompressed
all-reduce (``pmean`` of the dense gradient) measured in the same run, on all local devices
(``shard_map`` over axis 'd'; with one device the collectives are local copies, so the numbers are
the compute overhead of compression, and the bytes column is what a multi-host run would move).
The JSON holds raw numbers (seconds, bytes, ratios); only the printed table is formatted.

  PYTHONPATH=. python benchmarks/powersgd_step.py --out $OUT
  PYTHONPATH=. python benchmarks/powersgd_step.py --small      # CPU smoke test (widths / 8)
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks.common import environment, parse_args, print_table, write_json  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax._compat import shard_map  # noqa: E402
from mlsys_jax.comm import accordion, lowrank  # noqa: E402


def resnet50_shapes(div: int = 1) -> list[tuple[int, ...]]:
  """Parameter shapes of torchvision's ResNet-50 (He et al., 2016) in flax layout: conv kernels HWIO,
  batch-norm scale and bias, the 2048 x 1000 classifier and its bias (25,557,032 entries at div=1)."""
  c = lambda x: max(1, x // div)
  shapes = []

  def conv_bn(k, cin, cout):
    shapes.extend([(k, k, cin, cout), (cout,), (cout,)])

  conv_bn(7, 3, c(64))
  cin = c(64)
  for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
    for b in range(blocks):
      w, out = c(width), c(4 * width)
      conv_bn(1, cin, w)
      conv_bn(3, w, w)
      conv_bn(1, w, out)
      if b == 0:
        conv_bn(1, cin, out)          # projection shortcut
      cin = out
  shapes.extend([(cin, 1000), (1000,)])
  return shapes


def main():
  args = parse_args(__doc__)
  env = environment()
  shapes = resnet50_shapes(8 if args.small else 1)
  n_params = int(sum(np.prod(s) for s in shapes))
  devs = jax.devices()
  mesh = Mesh(np.array(devs), ("d",))
  nd = len(devs)
  key = jax.random.PRNGKey(0)
  grads = {f"{i:03d}": jax.device_put(
      jax.random.normal(jax.random.fold_in(key, i), (nd,) + s, jnp.float32) * 1e-2,
      NamedSharding(mesh, P("d"))) for i, s in enumerate(shapes)}
  params = {k: jnp.zeros(v.shape[1:], v.dtype) for k, v in grads.items()}
  spec = {k: P("d") for k in grads}

  def make(tx, force_high=False):
    st0 = tx.init(params)
    if force_high:
      st0 = st0._replace(critical=jnp.zeros_like(st0.critical))

    def local(g):
      g = {k: v[0] for k, v in g.items()}
      out, st = tx.update(g, st0)
      return {k: v[None] for k, v in out.items()}, st.bytes_sent[None]

    return jax.jit(shard_map(local, mesh=mesh, in_specs=(spec,), out_specs=(spec, P("d")),
                             check_vma=False))

  def allreduce(g):
    return {k: jax.lax.pmean(v, "d") for k, v in g.items()}, jnp.full((1,), 4.0 * n_params)

  base = jax.jit(shard_map(allreduce, mesh=mesh, in_specs=(spec,), out_specs=(spec, P("d")),
                           check_vma=False))
  cases = {f"PowerSGD rank {r}": make(lowrank.powersgd(r, axis_name="d")) for r in (1, 4)}
  cases["ACCORDION (4 vs 1), normal: rank 1"] = make(accordion("powersgd", low=4, high=1,
                                                               axis_name="d"), force_high=True)
  rows = []
  meta = {"env": env, "n_params": n_params, "n_tensors": len(shapes), "devices": nd}
  t0 = time.perf_counter()
  jax.block_until_ready(base(grads))
  for name, fn in cases.items():
    tc = time.perf_counter()
    _, nb = jax.block_until_ready(fn(grads))
    compile_s = time.perf_counter() - tc
    t = stats.time_interleaved(lambda: fn(grads), lambda: base(grads), repeats=10 if not args.small else 5,
                               warmup=2)
    nbytes = float(np.asarray(nb)[0])
    rows.append({"method": name, "seconds": float(t.median_a), "allreduce_seconds": float(t.median_b),
                 "time_over_allreduce": float(1 / t.ratio), "bytes_sent": nbytes,
                 "compression": float(4.0 * n_params / nbytes), "compile_seconds": float(compile_s)})
    print(rows[-1], flush=True)
    write_json(args.out, "powersgd_step", {**meta, "rows": rows, "partial": True})
  print(f"\n{env}\n{len(shapes)} tensors, {n_params:,} parameters, {nd} device(s); dense all-reduce "
        f"input {4 * n_params / 1e6:.1f} MB; total {time.perf_counter() - t0:.0f}s")
  print_table(rows, ["method", "seconds", "allreduce_seconds", "time_over_allreduce", "bytes_sent",
                     "compression", "compile_seconds"])
  write_json(args.out, "powersgd_step", {**meta, "rows": rows})


if __name__ == "__main__":
  main()
