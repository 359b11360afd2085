import sys; sys.argv=[sys.argv[0]]+sys.argv[1:]
sys.path.insert(0,'experiments'); sys.path.insert(0,'.')
import compressed_adam as ca
from absl import flags
import jax, numpy as np, optax
from mlsys_jax import models
from mlsys_jax.comm import sparse as sp
flags.FLAGS(sys.argv)
ds, model = ca._setup()
def run(tx_fn, seed, tag):
  tx = tx_fn()
  step = models.make_simulated_data_parallel_step(model, tx, axis_name="d", average_grads=False)
  params = model.init(jax.random.PRNGKey(seed), ds.x_train[:2])["params"]
  state = models.replicate(tx.init(params), 8)
  rng = np.random.default_rng(seed); out=[]
  for t in range(600):
    idx = rng.choice(len(ds.x_train), 8 * 32, replace=False)
    params, state = step(params, state, ds.x_train[idx].reshape(8, 32, *ds.x_train.shape[1:]), ds.y_train[idx].reshape(8, 32))
    if t % 50 == 49:
      out.append(round(models.evaluate(model, {"params": params}, ds.x_test, ds.y_test),3))
  print(tag, out, flush=True)
import os
mode=os.environ.get("MODE","pre")
if mode=="pre":
  run(lambda: optax.chain(sp.topk(0.01, axis_name="d", precondition=optax.scale_by_adam()), optax.sgd(1e-3)), 3, "topk pre s3")
elif mode=="eps":
  run(lambda: optax.chain(sp.topk(0.01, axis_name="d", precondition=optax.scale_by_adam(eps=1e-3)), optax.sgd(1e-3)), 3, "topk pre eps1e-3 s3")
elif mode=="b2":
  run(lambda: optax.chain(sp.topk(0.01, axis_name="d", precondition=optax.scale_by_adam(b2=0.99)), optax.sgd(1e-3)), 3, "topk pre b2 .99 s3")
