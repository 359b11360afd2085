"""Issue 18 screen (session 6). Run: python3 experiments/results/compressed_adam_tstat_screen.py --dataset=mnist1d
--steps=600 --seeds=2 --compressors=topk --modes=tstat --ratios=0.001 --density_warmup=300 --dwarmup_start=0.01
--out_dir=/tmp --out_name=tstat. Exploratory (not kept in the library): Top-k on the RMS-normalised residual divided by sqrt(steps since
this worker last released the coordinate) -- a t-statistic selection; residual kept exactly by the wrapper."""
import sys
import pathlib
ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments")); sys.path.insert(0, str(ROOT))
import compressed_adam as ca
import jax, jax.numpy as jnp, optax
from typing import NamedTuple, Any
from mlsys_jax.comm import sparse as sp

class S(NamedTuple):
  inner: Any
  rms: Any
  res: Any
  age: Any
  bytes_sent: Any
  total_bytes: Any

def tstat(ratio):
  c = sp.topk(ratio, axis_name="d")
  rms = optax.scale_by_rms()
  def init(p):
    z = jax.tree_util.tree_map(jnp.zeros_like, p)
    f = jnp.zeros((), jnp.float32)
    return S(c.init(p), rms.init(p), z, z, f, f)
  def update(g, s, p=None):
    x, rs = rms.update(g, s.rms)
    age = jax.tree_util.tree_map(lambda a: a + 1, s.age)
    acc = jax.tree_util.tree_map(lambda r, v: r + v, s.res, x)
    sc = jax.tree_util.tree_map(lambda a: jnp.sqrt(a), age)
    feed = jax.tree_util.tree_map(lambda a, q: a / q, acc, sc)
    inner = s.inner._replace(residual=jax.tree_util.tree_map(jnp.zeros_like, s.inner.residual))
    out, inner = c.update(feed, inner)
    res = jax.tree_util.tree_map(lambda ir, q: ir * q, inner.residual, sc)
    sent = jax.tree_util.tree_map(lambda f, ir: f != ir, feed, inner.residual)
    age = jax.tree_util.tree_map(lambda a, m: jnp.where(m, 0.0, a), age, sent)
    b = inner.bytes_sent
    return out, S(inner, rs, res, age, b, s.total_bytes + b)
  return optax.GradientTransformation(init, update)

orig = ca._compressor
def patched(compressor, mode, ratio, final=True):
  if mode == "tstat":
    return tstat(ratio)
  return orig(compressor, mode, ratio, final)
ca._compressor = patched
from absl import app
app.run(ca.main)
