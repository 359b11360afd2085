"""How far ``optax.adam`` moves a coordinate after ONE burst of error feedback (issue 18 item 1, density 0.1%).

A coordinate that error feedback releases once after ``t0`` silent steps receives one value B and zeros
after it. Adam (b1=0.9, b2=0.999, eps=1e-8) then moves it by sum_t m_t / sqrt(v_t) ~= lr * c(t0), with
c(t0) = (1 - b1) / sqrt(1 - b2) / (1 - b1 / sqrt(b2)) * sqrt(1 - b2**t0) ~= 31.8 * sqrt(1 - 0.999**t0),
independent of B (closed form: m_t = (1-b1) b1^t B, v_t = (1-b2) b2^t B^2, bias corrections at t0; the
second-moment bias correction is what makes early bursts move less). Dense Adam on a coordinate with a
consistent gradient moves ~lr per step, i.e. ~tau * lr over the tau steps the burst stood for. Run:
``python3 experiments/results/compressed_adam_burst.py`` (writes compressed_adam_burst.json next to it).
"""
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import optax

b1, b2 = 0.9, 0.999
rows = []
for t0 in (10, 30, 100, 300, 600, 1000, 3000, 10000):
  for size in (1e-3, 5.0):
    tx = optax.adam(1.0, b1=b1, b2=b2)
    s, tot = tx.init(jnp.zeros(1)), 0.0
    for t in range(t0 + 300):
      u, s = tx.update(jnp.array([size if t == t0 else 0.0]), s)
      tot += float(-u[0])
    closed = (1 - b1) / np.sqrt(1 - b2) / (1 - b1 / np.sqrt(b2)) * np.sqrt(1 - b2 ** (t0 + 1))
    closed *= 1 - (b1 / np.sqrt(b2)) ** 300   # the 300 steps summed after the burst
    rows.append({"t0": t0, "burst": size, "movement_in_lr": tot, "closed_form": float(closed)})
    print(f"burst at step {t0:5d} of size {size:g}: Adam moves {tot:.2f} lr (closed form {closed:.2f})")
out = pathlib.Path(__file__).with_suffix(".json")
out.write_text(json.dumps({"b1": b1, "b2": b2, "eps": 1e-8, "rows": rows}, indent=1))
print("wrote", out)
