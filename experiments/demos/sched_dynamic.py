"""Demo rows of mlsys_jax.sched.dynamic: Nimble (Shen et al., MLSys 2021) ideas in JAX. A stream of
requests with log-normal lengths served by per-shape jit vs bucketed_jit (compilations and seconds,
compilation included), buckets chosen by the DP vs powers of two, padded vs unpadded results, and the
batched Tree-LSTM against per-tree recursion."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax.sched import dynamic as dyn

ORDER = 91
TECHNIQUE = "Nimble"


def _layer(x, w, length):  # masked token projection + masked mean: padding-invariant by construction
  m = dyn.length_mask(length, x.shape[0], x.dtype)[:, None]
  h = jnp.tanh(x @ w) * m
  return h, h.sum(0) / length


def run(seed: int):
  rng = np.random.default_rng(seed)
  lengths = np.clip(np.rint(rng.lognormal(np.log(24), 0.8, 30)), 4, 128).astype(int)
  w = rng.normal(size=(8, 8)).astype(np.float32)
  xs = [rng.normal(size=(int(n), 8)).astype(np.float32) for n in lengths]

  per = jax.jit(_layer)
  t = time.perf_counter()
  ref = [jax.tree_util.tree_map(np.asarray, per(x, w, len(x))) for x in xs]
  t_per = time.perf_counter() - t
  buckets = dyn.pow2_buckets(128, 8)
  f = dyn.bucketed_jit(_layer, dims={0: 0}, buckets=buckets)
  t = time.perf_counter()
  outs = [f(x, w) for x in xs]
  t_b = time.perf_counter() - t
  err = max(float(np.max(np.abs(o[i] - r[i]))) for o, r in zip(outs, ref) for i in (0, 1))

  hist = np.clip(np.rint(rng.lognormal(np.log(24), 0.8, 2000)), 4, 128).astype(int)  # past traffic
  plan = dyn.choose_buckets(hist, num_buckets=len(buckets), exact_k=True)
  plan_k3 = dyn.choose_buckets(hist, num_buckets=3, exact_k=True)
  pow2_work = dyn.expected_cost(buckets, hist)

  trees = [[-1, 0, 0, 1, 1], [-1, 0], [-1]]
  feats = [rng.normal(size=(len(p), 4)).astype(np.float32) for p in trees]
  m = dyn.ChildSumTreeLSTM(4)
  batch = dyn.encode_trees(trees, feats)
  v = jax.jit(m.init)(jax.random.PRNGKey(seed), batch)
  roots = np.asarray(jax.jit(m.apply)(v, batch)[0])
  rec = np.stack([dyn.tree_lstm_recursive(v, p, x) for p, x in zip(trees, feats)])
  return [
      ("Nimble", f"compiled programs, {len(xs)} requests (lengths {lengths.min()}-{lengths.max()}): "
       "per-shape jit vs bucketed_jit (pow2)",
       f"{len(set(lengths.tolist()))} vs {f.compile_count}"),
      ("Nimble", "stream seconds with compilation: per-shape jit vs bucketed_jit",
       f"{t_per:.2f} s vs {t_b:.2f} s ({t_per / t_b:.1f}x)"),
      ("Nimble", "max |bucketed - unpadded| over the stream (float32)", f"{err:.1e}"),
      ("Nimble", f"expected padded length (true mean {hist.mean():.1f}): {len(buckets)} powers of 2 vs DP "
       f"with {len(plan.buckets)} / 3 buckets",
       f"{pow2_work:.1f} vs {plan.run_cost:.1f} / {plan_k3.run_cost:.1f}"),
      ("Nimble", "Tree-LSTM: max |batched level-by-level - per-tree recursion| (3 trees)",
       f"{float(np.max(np.abs(roots[:3] - rec))):.1e}"),
  ]
