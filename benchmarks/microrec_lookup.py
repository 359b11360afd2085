"""MicroRec (Jiang et al., MLSys 2021) lookup paths: embedding-stage and whole-model latency, batch 1..4096.

Three lookup paths over the same tables (26 Criteo-sized tables, width 16, by default):

- ``per_table``: one ``jnp.take`` per table (the plain baseline);
- ``fused``: one gather over all tables concatenated (row offsets), the strongest baseline;
- ``combined``: the exact planner's Cartesian combination (``optimal_plan`` within ``--budget`` extra
  storage), its physical tables fused per width;
- ``combined_chunks``: the same plan as ONE gather of adjacent gcd-wide chunk rows (``fuse="chunks"``).

Timings, each interleaved with the ``fused`` baseline (``mlsys_jax.stats.time_interleaved``; raw seconds):
``stage_loop_s``: embedding stage, per lookup batch inside one jitted ``fori_loop`` of ``--loop``
iterations (indices shift every iteration, so nothing is hoisted; device time without dispatch);
``model_call_s``: the whole DLRM (bottom MLP 13-512-256-64-16, dot interaction, top 512-256-1) as one
jitted call per batch, as a user makes it. ``floor_s``: the random-row gather floor of the path, rows x
ceil(row bytes / 32) x 32 bytes over the measured copy bandwidth.

  PYTHONPATH=. python benchmarks/microrec_lookup.py --out $OUT          # GPU (H200): the issue's targets
  python benchmarks/microrec_lookup.py --small                           # CPU smoke test (tiny tables)
"""

from __future__ import annotations

import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.infer import microrec as mr  # noqa: E402


def _flags(ap):
  ap.add_argument("--spec", default="criteo", choices=["criteo", "alibaba47"])
  ap.add_argument("--budget", type=float, default=0.05, help="extra storage allowed to the combined plan")
  ap.add_argument("--batches", default="1,4,16,64,256,1024,4096")
  ap.add_argument("--loop", type=int, default=100, help="lookup batches per jitted loop")
  ap.add_argument("--repeats", type=int, default=30)
  ap.add_argument("--zipf", type=float, default=0.0, help="Zipf exponent of the access pattern (0: uniform)")


def sector_bytes(width: int, itemsize: int = 4) -> int:
  return int(math.ceil(width * itemsize / 32) * 32)


def stage_loop(stage, rows, n: int):
  """``n`` lookups of one batch in ONE jitted loop; indices shift by one every iteration."""
  rows = jnp.asarray(rows, jnp.int32)[None]

  @jax.jit
  def run(st, idx):
    def body(i, acc):
      out, _ = mr.lookup(st, (idx + i) % rows)
      return acc + jnp.sum(out)
    return jax.lax.fori_loop(0, n, body, jnp.float32(0))
  return lambda idx: run(stage, idx)


def main():
  args = common.parse_args(__doc__.splitlines()[0], _flags)
  specs = {"criteo": mr.CRITEO_26, "alibaba47": mr.ALIBABA_47}[args.spec]
  batches = [int(b) for b in args.batches.split(",")]
  loop, repeats = args.loop, args.repeats
  if args.small:
    specs = tuple(mr.TableSpec(min(s.rows, 5000), s.dim) for s in specs)
    batches, loop, repeats = [1, 64, 1024], 20, 7
  dims = {s.dim for s in specs}
  interaction = "dot" if len(dims) == 1 else "concat"
  width = dims.pop() if interaction == "dot" else 16
  plan = mr.optimal_plan(specs, args.budget)
  rep = mr.plan_report(specs, plan)
  print(f"{args.spec}: {len(specs)} tables -> {rep.lookups} lookups, storage +{100 * rep.overhead:.2f}%")
  tables = mr.init_tables(0, specs)
  stages = {"per_table": mr.build_stage(tables, mr.Plan.identity(len(specs))),
            "fused": mr.build_stage(tables, mr.Plan.identity(len(specs)), fuse=True),
            "combined": mr.build_stage(tables, plan, fuse=True),
            "combined_chunks": mr.build_stage(tables, plan, fuse="chunks")}
  del tables
  bw = common.copy_bandwidth(1 << (24 if args.small else 30), repeats=5 if args.small else 20)
  model = mr.DLRM(bottom=(512, 256, 64, width), top=(512, 256), interaction=interaction)
  dense0, idx0 = mr.synthetic_batch(0, specs, 1)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), stages["fused"], dense0, idx0)
  apply = jax.jit(model.apply)
  rows = [s.rows for s in specs]
  group_widths = {name: [sum(specs[i].dim for i in g) for g in st.layout.groups] for name, st in stages.items()}
  print({name: st.gathers for name, st in stages.items()}, "gathers per stage")
  # the combined paths must return the per-table embeddings bit for bit on this device too
  _, idx_chk = mr.synthetic_batch(123, specs, 256, zipf=args.zipf or None)
  look = jax.jit(mr.lookup)
  ref = np.asarray(look(stages["per_table"], idx_chk)[0])
  identical = {name: bool(np.array_equal(np.asarray(look(st, idx_chk)[0]), ref)) for name, st in stages.items()}
  print("bit-identical to per-table lookups:", identical)
  results = []
  for b in batches:
    dense, idx = mr.synthetic_batch(b, specs, b, zipf=args.zipf or None)
    dense, idx = jnp.asarray(dense), jnp.asarray(idx)
    base_loop = stage_loop(stages["fused"], rows, loop)
    for name in ("per_table", "combined", "combined_chunks"):
      st = stages[name]
      lp = stage_loop(st, rows, loop)
      tl = stats.time_interleaved(lambda: base_loop(idx), lambda: lp(idx), repeats=repeats, warmup=2)
      tm = stats.time_interleaved(lambda: apply(variables, stages["fused"], dense, idx),
                                  lambda: apply(variables, st, dense, idx), repeats=repeats * 3, warmup=3)
      row = {"batch": b, "path": name, "lookups": st.lookups, "gathers": st.gathers,
             "stage_loop_s": tl.median_b / loop, "fused_stage_loop_s": tl.median_a / loop,
             "stage_vs_fused": tl.median_b / tl.median_a, "stage_p_faster_than_fused": 1.0 - tl.p_a_faster,
             "model_call_s": tm.median_b, "fused_model_call_s": tm.median_a,
             "floor_s": b * sum(sector_bytes(w) for w in group_widths[name]) / bw,
             "fused_floor_s": b * sum(sector_bytes(w) for w in group_widths["fused"]) / bw}
      row["stage_vs_floor"] = row["stage_loop_s"] / row["floor_s"]
      results.append(row)
  # whole-model per-call: combined against per_table directly (the batch-1 target)
  direct = []
  for b in batches[:2]:
    dense, idx = mr.synthetic_batch(b, specs, b, zipf=args.zipf or None)
    for name in ("combined", "combined_chunks"):
      t = stats.time_interleaved(lambda: apply(variables, stages["per_table"], dense, idx),
                                 lambda: apply(variables, stages[name], dense, idx), repeats=repeats * 3,
                                 warmup=3)
      direct.append({"batch": b, "path": name, "per_table_model_call_s": t.median_a, "model_call_s": t.median_b,
                     "speedup": t.median_a / t.median_b, "p_faster": 1.0 - t.p_a_faster})
  common.print_table(results, ["batch", "path", "lookups", "stage_loop_s", "fused_stage_loop_s", "stage_vs_fused",
                               "floor_s", "stage_vs_floor", "model_call_s", "fused_model_call_s"])
  common.print_table(direct, ["batch", "path", "per_table_model_call_s", "model_call_s", "speedup"])
  common.write_json(args.out, "microrec_lookup" + ("_small" if args.small else ""), {
      "env": common.environment(), "args": vars(args), "copy_bandwidth_Bps": bw,
      "plan": {"groups": [list(g) for g in plan.groups], **rep._asdict()},
      "bit_identical": identical, "rows": results, "model_direct": direct})


if __name__ == "__main__":
  main()
