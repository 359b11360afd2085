"""ByzShield experiments: (1) worst-case fraction of distorted files eps(q) for the paper's settings;
(2) training under the ALIE attack with an omniscient adversary, ByzShield vs DETOX vs median-only.

  python experiments/byzshield_eval.py                  # table + training on digits, 5 seeds
  python experiments/byzshield_eval.py --skip_training  # only the eps table
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import data, models, stats  # noqa: E402
from mlsys_jax.robust import byzshield as bz  # noqa: E402

_SKIP = flags.DEFINE_bool("skip_training", False, "Only compute the eps table.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Paired training trials.")
_STEPS = flags.DEFINE_integer("steps", 150, "Training steps.")
_QS = flags.DEFINE_list("q", ["3", "5", "7"], "Numbers of Byzantine workers for training (K=15).")
_FILE = flags.DEFINE_integer("file_size", 12, "Samples per file. As in the paper's code, every scheme uses "
                             "files of the same size, so a step of ByzShield (f=25) sees 25 files, DETOX (f=5) "
                             "5 and the baseline (f=15) 15: ByzShield workers compute l=5 files each.")
_AGG = flags.DEFINE_enum("aggregator", "median", list(bz.AGGREGATORS), "Stage-2 aggregator.")
_VOTE_RTOL = flags.DEFINE_float("vote_rtol", 0.0, "Relative tolerance of the majority vote (0 = exact bits; "
                                "the simulated honest copies here are bit-identical, so exact voting is safe).")
_OUT = flags.DEFINE_string("out_dir", "results/byzshield", "Output directory.")

# (name, assignment, q values): the settings of the ByzShield paper's worst-case tables.
SETTINGS = [
    ("K=15 r=3", [("ByzShield MOLS", bz.mols_assignment(5, 3)),
                  ("ByzShield Ramanujan", bz.ramanujan_assignment(5, 3)),
                  ("DETOX", bz.detox_assignment(15, 3)), ("baseline", bz.baseline_assignment(15))],
     range(2, 8)),
    ("K=21 r=3", [("ByzShield MOLS", bz.mols_assignment(7, 3)),
                  ("DETOX", bz.detox_assignment(21, 3)), ("baseline", bz.baseline_assignment(21))],
     range(2, 11)),
    ("K=25 r=5", [("ByzShield Ramanujan", bz.ramanujan_assignment(5, 5)),
                  ("DETOX", bz.detox_assignment(25, 5)), ("baseline", bz.baseline_assignment(25))],
     range(2, 13)),
]


def eps_table():
  table = {}
  for setting, schemes, qs in SETTINGS:
    table[setting] = {}
    print(f"\n{setting}: eps = c_max / f (exact search)")
    print("  q  " + "".join(f"{n:>22s}" for n, _ in schemes))
    for q in qs:
      vals = []
      for name, a in schemes:
        c, _ = bz.worst_case_distortion(a, q)
        vals.append(c / a.num_files)
        table[setting].setdefault(name, {})[q] = {"c_max": c, "f": a.num_files, "eps": c / a.num_files}
      print(f"  {q:<3d}" + "".join(f"{v:22.3f}" for v in vals), flush=True)
  return table


def train(ds, assignment, q, seed, vote):
  """Data-parallel training with K=15 simulated workers; the q worst-case workers attack with ALIE."""
  model = models.CNN(channels=(16, 32), hidden=64)
  tx = optax.sgd(0.05, momentum=0.9)
  params = model.init(jax.random.PRNGKey(seed), ds.x_train[:2])["params"]
  opt = tx.init(params)
  f = assignment.num_files
  b = f * _FILE.value
  _, worst = bz.worst_case_distortion(assignment, q) if vote else (0, np.arange(q))
  byz = jnp.zeros(assignment.num_workers, bool).at[jnp.asarray(worst)].set(True)
  c_max = int(bz.distorted_files(assignment, np.asarray(byz)).sum()) if vote else q

  def file_grad(p, xb, yb):
    return jax.grad(lambda p: models.cross_entropy(model.apply({"params": p}, xb), yb))(p)

  @jax.jit
  def step(p, opt, xb, yb):
    xs = xb.reshape(f, b // f, *xb.shape[1:])
    ys = yb.reshape(f, b // f)
    fg = jax.vmap(file_grad, in_axes=(None, 0, 0))(p, xs, ys)
    g = bz.robust_step(fg, assignment, byz, attack="alie", aggregator=_AGG.value,
                       num_byzantine_files=c_max, vote=vote, vote_rtol=_VOTE_RTOL.value)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt

  rng = np.random.default_rng(seed)
  for _ in range(_STEPS.value):
    idx = rng.choice(len(ds.x_train), b, replace=False)
    params, opt = step(params, opt, ds.x_train[idx], ds.y_train[idx])
  return models.evaluate(model, {"params": params}, ds.x_test, ds.y_test)


def main(argv):
  del argv
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  result = {"eps": eps_table()}
  if not _SKIP.value:
    ds = data.load_digits(seed=0)
    schemes = {"ByzShield (MOLS l=5 r=3)": (bz.mols_assignment(5, 3), True),
               "DETOX (r=3)": (bz.detox_assignment(15, 3), True),
               "median only (no redundancy)": (bz.baseline_assignment(15), False)}
    acc = {}
    t0 = time.perf_counter()
    for q in [int(v) for v in _QS.value]:
      for name, (a, vote) in schemes.items():
        acc.setdefault(str(q), {})[name] = [train(ds, a, q, s, vote) for s in range(_SEEDS.value)]
        print(f"[{time.perf_counter() - t0:5.0f}s] q={q} {name:30s} accuracy "
              f"{np.mean(acc[str(q)][name]):.4f} +- {np.std(acc[str(q)][name]):.4f}", flush=True)
    comps = {}
    for q in acc:
      c = stats.compare(acc[q]["ByzShield (MOLS l=5 r=3)"], acc[q]["DETOX (r=3)"])
      comps[q] = c._asdict()
      print(f"q={q}: ByzShield vs DETOX: {c}")
    result.update({"accuracy": acc, "comparisons": comps, "aggregator": _AGG.value, "vote_rtol": _VOTE_RTOL.value, "steps": _STEPS.value,
                   "seeds": _SEEDS.value, "attack": "alie (z=1), omniscient worst-case workers"})
  result["provenance"] = provenance.record(
      data_arrays=None if _SKIP.value else (ds.x_train, ds.y_train, ds.x_test, ds.y_test), script=__file__)
  (out / "results.json").write_text(json.dumps(result, indent=1))
  print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
