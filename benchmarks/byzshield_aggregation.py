"""GPU time of ByzShield's server step (vote + robust aggregation) for K = 25 workers and an
11M-parameter model, against a plain mean of the same gradient copies.

  PYTHONPATH=. python benchmarks/byzshield_aggregation.py --out $OUT
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import environment, parse_args, print_table, write_json  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.robust import byzshield as bz  # noqa: E402


def main():
  args = parse_args(__doc__)
  env = environment()
  d = 20_000 if args.small else 11_000_000
  a = bz.ramanujan_assignment(5, 5)                    # K = 25 workers, f = 25 files, l = r = 5
  fg = {"w": jax.random.normal(jax.random.PRNGKey(0), (a.num_files, d), jnp.float32)}
  workers = bz.files_to_workers(fg, a)
  byz = jnp.zeros(a.num_workers, bool).at[jnp.arange(4)].set(True)
  workers = jax.block_until_ready(bz.apply_attack(workers, byz, "alie"))
  c_max = 1
  plain = jax.jit(lambda w: bz.mean(jax.tree_util.tree_map(lambda g: g.reshape((-1,) + g.shape[2:]), w)))
  cases = {
      "vote only": jax.jit(lambda w: bz.majority_vote(w, a)),
      "vote + mean": jax.jit(lambda w: bz.mean(bz.majority_vote(w, a))),
      "vote + coordinate median": jax.jit(lambda w: bz.coordinate_median(bz.majority_vote(w, a))),
      "vote + trimmed mean": jax.jit(lambda w: bz.trimmed_mean(bz.majority_vote(w, a), c_max)),
      "vote + multi-Krum": jax.jit(lambda w: bz.multi_krum(bz.majority_vote(w, a), c_max)),
      "vote + Bulyan": jax.jit(lambda w: bz.bulyan(bz.majority_vote(w, a), c_max)),
  }
  rows = []
  for name, fn in cases.items():
    t = stats.time_interleaved(lambda: fn(workers), lambda: plain(workers), repeats=15, warmup=2)
    rows.append({"server step": name, "ms": t.median_a * 1e3, "plain mean of K*l copies ms": t.median_b * 1e3,
                 "x plain mean": t.median_a / t.median_b})
  print(f"{env}\nK={a.num_workers} workers, l={a.load}, r={a.replication}, {d / 1e6:.1f}M parameters, "
        f"gradient stack {a.num_workers * a.load * d * 4 / 1e9:.2f} GB")
  print_table(rows, ["server step", "ms", "plain mean of K*l copies ms", "x plain mean"])
  write_json(args.out, "byzshield_aggregation", {"env": env, "params": d, "rows": rows})


if __name__ == "__main__":
  main()
