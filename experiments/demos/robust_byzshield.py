"""Demo rows of mlsys_jax.robust.byzshield: worst-case distortion and a robust server step."""

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax.robust import byzshield as bz

ORDER = 40
TECHNIQUE = "ByzShield"


def run(seed: int):
  mols, detox = bz.mols_assignment(5, 3), bz.detox_assignment(15, 3)
  eps_m = [bz.worst_case_distortion(mols, q)[0] / mols.num_files for q in (2, 3, 4, 5)]
  eps_d = [bz.worst_case_distortion(detox, q)[0] / detox.num_files for q in (2, 3, 4, 5)]
  fg = {"w": jax.random.normal(jax.random.PRNGKey(seed), (25, 1000)) * 0.1 + 1.0}
  _, worst = bz.worst_case_distortion(mols, 3)
  byz = jnp.zeros(15, bool).at[jnp.asarray(worst)].set(True)
  out = jax.jit(lambda g: bz.robust_step(g, mols, byz, attack="constant", aggregator="median"))(fg)
  naive = jax.jit(lambda g: bz.robust_step(g, mols, byz, attack="constant", aggregator="mean",
                                           vote=False))(fg)
  err = lambda g: float(jnp.linalg.norm(g["w"] - fg["w"].mean(0)) / jnp.linalg.norm(fg["w"].mean(0)))
  # Honest copies that differ in the last bits (nondeterministic reductions): exact vote vs tolerance.
  w = np.asarray(bz.files_to_workers(fg, mols)["w"])
  rng = np.random.default_rng(seed)
  w = np.where(rng.random(w.shape) < 0.5, np.nextafter(w, np.inf), w)          # one ulp on half of them
  one = jnp.zeros(15, bool).at[0].set(True)                                    # one Byzantine worker
  attacked = bz.apply_attack({"w": jnp.asarray(w)}, one, "constant")
  lost = lambda v: int(jnp.sum(jnp.max(jnp.abs(v["w"] - fg["w"]), axis=1) > 1e-3))
  first = lost(jax.jit(lambda a: bz.majority_vote(a, mols, fallback="first"))(attacked))
  tol = lost(jax.jit(lambda a: bz.majority_vote(a, mols, rtol=1e-5))(attacked))
  pred = int(bz.distorted_files(mols, np.asarray(one)).sum())
  return [
      ("ByzShield", "honest copies 1 ulp apart, 1 Byzantine worker: files lost, exact vote (paper) / "
       "rtol=1e-5 vote / distorted_files", f"{first} / {tol} / {pred}"),
      ("ByzShield", "worst-case eps for q=2..5, K=15: MOLS vs DETOX",
       " ".join(f"{a:.2f}" for a in eps_m) + " vs " + " ".join(f"{b:.2f}" for b in eps_d)),
      ("ByzShield", "rel. error of the step, q=3 worst-case constant attack: vote+median vs plain mean",
       f"{err(out):.3f} vs {err(naive):.1f}"),
  ]
