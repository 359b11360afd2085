"""Per-step diagnostics of chain(sidco, adam) vs chain(topk, adam) on digits, 8 simulated workers (issue 18
item 1; exploratory, the summary is compressed_adam_sidco_trace_digits_300.json and docs/comm.md).

  python3 experiments/results/compressed_adam_sidco_trace.py 300 0 sidco_gp,topk_replay,topk
  DIST=gpareto python3 experiments/results/compressed_adam_sidco_trace.py 150 0 topk   # fit count per step

Arms: sidco_gp / sidco_exp (exact=False), sidco_gp_exact / sidco_exp_exact (the default), topk, topk_pt,
topk_replay (exact top-k with sidco_gp's per-step count; run after sidco_gp). Writes diag_*.json in the working directory.
"""
import pathlib, sys, time, json
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import jax, jax.numpy as jnp, numpy as np, optax
from mlsys_jax import data, models
from mlsys_jax.comm import sparse as sp

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
SEED = int(sys.argv[2]) if len(sys.argv) > 2 else 0
ARMS = sys.argv[3].split(",") if len(sys.argv) > 3 else ["sidco_gp", "topk"]
W, B, LR, R = 8, 32, 1e-3, 0.01
import os; DIST = os.environ.get("DIST", "exponential")
ds = data.load_digits(seed=0)
model = models.CNN(channels=(32, 64))

def make(arm):
  c = {"sidco_gp": lambda: sp.sidco(R, distribution="gpareto", axis_name="d", exact=False),
       "sidco_gp_exact": lambda: sp.sidco(R, distribution="gpareto", axis_name="d"),
       "sidco_exp_exact": lambda: sp.sidco(R, axis_name="d"),
       "sidco_exp": lambda: sp.sidco(R, axis_name="d", exact=False),
       "topk": lambda: sp.topk(R, axis_name="d"),
       "topk_pt": lambda: sp.topk(R, axis_name="d", per_tensor=True),
       "topk_replay": lambda: optax.inject_hyperparams(sp.topk, static_args=("max_ratio", "axis_name"))(ratio=R, max_ratio=2 * R, axis_name="d"),
       }[arm]()
  return optax.chain(c, optax.adam(LR))

def make_step(tx):
  def local(params, state, xb, yb):
    loss, g = jax.value_and_grad(lambda p: models.cross_entropy(model.apply({"params": p}, xb), yb))(params)
    sst = lambda s: s.inner_state if hasattr(s, 'inner_state') else s
    res0 = sst(state[0]).residual
    acc = jax.tree_util.tree_map(jnp.add, g, res0)
    upd, state = tx.update(g, state, params)
    new_res = sst(state[0]).residual
    leaves_acc = jax.tree_util.tree_leaves(acc)
    leaves_new = jax.tree_util.tree_leaves(new_res)
    sel = [((a != r) | ((a != 0) & (r == 0))) for a, r in zip(leaves_acc, leaves_new)]
    fa = jnp.concatenate([jnp.abs(a).ravel() for a in leaves_acc])
    fs = jnp.concatenate([s.ravel() for s in sel])
    n = fa.shape[0]; k = int(round(R * n))
    cnt = jnp.sum(fs)
    order = jnp.argsort(-fa)
    rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    ov_k = jnp.sum(fs & (rank < k)) / k
    ov_same = jnp.sum(fs & (rank < cnt)) / jnp.maximum(cnt, 1)
    per_leaf = jnp.stack([jnp.sum(s) for s in sel])
    # top-k allocation per leaf
    offs = np.cumsum([0] + [l.size for l in leaves_acc])
    tk = rank < k
    per_leaf_topk = jnp.stack([jnp.sum(tk[offs[i]:offs[i+1]]) for i in range(len(leaves_acc))])
    resn = jnp.sqrt(sum(jnp.sum(r * r) for r in leaves_new))
    gn = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(g)))
    # magnitude ratio: smallest sent vs k-th largest
    kth = -jnp.sort(-fa)[k - 1]
    leaves_l = leaves_acc
    sizes = [int(np.prod(l.shape)) for l in leaves_l]
    lay = sp._Layout(sizes, sp._segments(sizes, False, R, 16))
    flat = lay.flatten(leaves_l, jnp.float32)
    kk = jnp.asarray([round(R * n) for n in lay.seg_n], jnp.int32)
    capx = int(2 * round(R * lay.n_real))
    outs = sp._sidco_segments(flat, lay, R * 1.5, capx, DIST, 2, 0.25, None, None, packing="xla", exact=(kk, int(sum(round(R * n) for n in lay.seg_n)), None))
    fitc = outs[1] / kk.sum()
    aux = dict(fitc=fitc, loss=loss, cnt=cnt / k, ov_k=ov_k, ov_same=ov_same, per_leaf=per_leaf / k, per_leaf_topk=per_leaf_topk / k,
               resn=resn, gn=gn, stages=sst(state[0]).stages, rsum=sst(state[0]).ratio_sum, kth=kth,
               vmax=jnp.max(jnp.sqrt(jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(state[1][0].nu)]))))
    return optax.apply_updates(params, upd), state, aux
  @jax.jit
  def step(params, state, xb, yb):
    p, s, aux = jax.vmap(local, in_axes=(None, 0, 0, 0), axis_name="d")(params, state, xb, yb)
    return jax.tree_util.tree_map(lambda x: x[0], p), s, aux
  return step

out = {}
for arm in ARMS:
  t0 = time.time()
  tx = make(arm); step = make_step(tx)
  params = model.init(jax.random.PRNGKey(SEED), ds.x_train[:2])["params"]
  state = models.replicate(tx.init(params), W)
  if arm == "topk_replay":
    REPLAY = [t["cnt"] for t in out["sidco_gp"]["trace"]]
    hp = state[0].hyperparams; hp["ratio"] = jnp.full_like(hp["ratio"], R * REPLAY[0])
  rng = np.random.default_rng(SEED)
  tr = []
  for i in range(STEPS):
    idx = rng.choice(len(ds.x_train), W * B, replace=False)
    params, state, aux = step(params, state, ds.x_train[idx].reshape(W, B, *ds.x_train.shape[1:]), ds.y_train[idx].reshape(W, B))
    tr.append(jax.tree_util.tree_map(lambda x: np.asarray(x).mean(0).tolist(), aux)); tr[-1]["cnt_w"] = np.asarray(aux["cnt"]).tolist()
    if arm == "topk_replay":
      hp = state[0].hyperparams
      hp["ratio"] = jnp.full_like(hp["ratio"], R * min(2.0, REPLAY[min(i + 1, len(REPLAY) - 1)]))
    if (i + 1) % 50 == 0:
      tr[-1]["test"] = float(models.evaluate(model, {"params": params}, ds.x_test, ds.y_test))
  acc = float(models.evaluate(model, {"params": params}, ds.x_test, ds.y_test))
  out[arm] = dict(acc=acc, trace=tr)
  c = np.array([t["cnt"] for t in tr]); ovk = np.array([t["ov_k"] for t in tr]); ovs = np.array([t["ov_same"] for t in tr])
  rn = np.array([t["resn"] for t in tr]); gn = np.array([t["gn"] for t in tr]); st = np.array([t["stages"] for t in tr])
  print(f"{arm}: acc {acc:.4f}  ({time.time()-t0:.0f}s) test@50s", [t.get("test") for t in tr if "test" in t], "loss/50", np.round([np.mean([t["loss"] for t in tr[j:j+50]]) for j in range(0, STEPS, 50)], 3).tolist())
  for a, b in [(0, 10), (10, 30), (30, 100), (100, 200), (200, STEPS)]:
    if a >= STEPS: break
    sl = slice(a, b)
    print(f"  steps {a:3d}-{b:3d}: cnt/k {c[sl].mean():.2f} [{c[sl].min():.2f},{c[sl].max():.2f}] ov_k {ovk[sl].mean():.3f} ov_same {ovs[sl].mean():.3f} "
          f"res/grad {np.mean(rn[sl]/gn[sl]):.2f} resn {rn[sl].mean():.3f} stages {st[sl].mean():.2f}")
  fc = np.array([t["fitc"] for t in tr]); print("  fit count/k quantiles", np.round(np.quantile(fc, [.05, .25, .5, .75, .95]), 2), "in [1,2]:", np.mean((fc >= 1) & (fc <= 2)))
  pl = np.array([t["per_leaf"] for t in tr]); plt = np.array([t["per_leaf_topk"] for t in tr])
  print("  per-leaf share sel:", np.round(pl[STEPS//2:].mean(0), 3), " topk-of-acc:", np.round(plt[STEPS//2:].mean(0), 3))
json.dump(out, open(f"diag_{SEED}_{STEPS}_{'_'.join(ARMS)}.json", "w"))
