"""Demo rows of mlsys_jax.infer.video (Wakatsuki, Kanai, Fujiwara, MLSys 2021): a 2-layer ReLU CNN over
synthetic surveillance-like video; outputs bit-identical to the flax model, and the fraction of output
tiles reused (receptive field unchanged) or skipped (proved zero) instead of computed."""

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax.infer import video

ORDER = 62
TECHNIQUE = "exact video CNN"


def run(seed: int):
  size, tile = 32, 8
  net = video.relu_cnn([8, 8])
  variables = video.highpass_variables(net.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3))))
  rb = video.range_bound_model(net, variables, (size, size, 3), tile=tile, buckets=())
  step = jax.jit(rb.step, donate_argnums=0)
  ref = jax.jit(lambda f: net.apply(variables, f[None])[0])
  rows = []
  for act in ("low", "full"):
    frames = video.synthetic_video(seed, 5, size, size, 3, act)
    st, _ = rb.init(frames[0])
    diff, avoided, total = 0, 0, 0
    for f in frames[1:]:
      st, y, s = step(st, f)
      diff += int(np.sum(np.asarray(y).view(np.uint32) != np.asarray(ref(f)).view(np.uint32)))
      avoided += sum(int(l.reused) + int(l.skipped) for l in s)
      total += sum(int(l.reused) + int(l.skipped) + int(l.computed) for l in s)
    rows.append((TECHNIQUE, f"{act} activity: outputs differing from the flax model (bits), 4 frames", diff))
    rows.append((TECHNIQUE, f"{act} activity: tiles reused or proved zero / all tiles (2 layers)",
                 f"{avoided / total:.3f}"))
    rows.append((TECHNIQUE, f"{act} activity: frames run by the dense network (fallback), of 4",
                 int(st.dense_frames)))
  return rows
