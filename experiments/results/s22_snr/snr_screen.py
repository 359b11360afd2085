"""Scratch screen (session 22): SNR selection. Top-k on |acc| / (1 + age)^P (age: steps since this worker last
sent the entry), values and error feedback as Top-k's, inside the 0.1% recipe (rms_selection from stage 1)."""
import sys, jax.numpy as jnp, numpy as np, optax
_ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]
sys.path.insert(0, str(_ROOT)); sys.path.insert(0, str(_ROOT / "experiments"))
from absl import app
import compressed_adam as ca
from mlsys_jax.comm import adaptive_ef as aef

_SIGN = [1.0]
def _scores(acc, age, p):   # the sign is read at trace time (one compiled step per arm)
  return jnp.abs(acc) / (1.0 + jnp.asarray(age).astype(jnp.float32)) ** jnp.float32(_SIGN[0] * p)
aef.staleness_scores = _scores
_orig = ca._compressor
def _patched(compressor, mode, ratio, final=True, stage=0):
  if compressor.startswith("snr"):
    p = float(compressor.partition("@")[2])
    _SIGN[0] = -1.0 if p < 0 else 1.0
    p = abs(p)
    pre = aef.rms_selection(stage >= int(mode.partition("@")[2]))
    return optax.chain(pre, aef.staleness_topk(ratio, tau=p, axis_name="d"))
  return _orig(compressor, mode, ratio, final, stage)
ca._compressor = _patched
if __name__ == "__main__":
  app.run(ca.main)
