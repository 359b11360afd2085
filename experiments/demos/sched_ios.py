"""Demo row of mlsys_jax.sched: IOS (Ding et al., MLSys 2021) schedules a small Inception-like CNN on
the CPU with the analytical cost model; the scheduled function is checked against the original; the cost model
is calibrated on this machine's timings of the schedules at four batch sizes (sched.calibrate) and predicts a
fifth."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mlsys_jax import sched
from mlsys_jax.sched import calibrate

ORDER = 90
TECHNIQUE = "IOS"


def _cnn(key, cin=8):
  dn = ("NHWC", "HWIO", "NHWC")
  shapes = [(1, 1, cin, 16), (1, 1, cin, 12), (5, 5, 12, 16), (1, 1, cin, 16), (3, 3, 16, 24),
            (3, 3, 24, 24), (1, 1, cin, 8)]
  ws = [jax.random.normal(jax.random.fold_in(key, i), s) * (2.0 / np.prod(s[:3])) ** 0.5
        for i, s in enumerate(shapes)]
  bs = [jax.random.normal(jax.random.fold_in(key, 100 + i), (s[3],)) * 0.1 for i, s in enumerate(shapes)]
  conv = lambda x, i: jax.nn.relu(lax.conv_general_dilated(x, ws[i], (1, 1), "SAME",
                                                           dimension_numbers=dn) + bs[i])
  proj = jax.random.normal(jax.random.fold_in(key, 999), (64, cin)) * 0.1

  def block(x):
    a = conv(x, 0)
    b = conv(conv(x, 1), 2)
    c = conv(conv(conv(x, 3), 4), 5)
    d = conv(lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME") / 9.0, 6)
    return jnp.concatenate([a, b, c, d], -1) @ proj  # 64 -> cin channels, so blocks chain

  return lambda x: jnp.mean(block(block(x)), axis=(1, 2))


def run(seed: int):
  key = jax.random.PRNGKey(seed)
  f = _cnn(key)
  x = jax.random.normal(jax.random.fold_in(key, 1), (1, 16, 16, 8))
  cost = sched.AnalyticalCost()
  s = sched.ios_schedule(f, x, r=3, s=8, strategy="both", profiler=cost)
  t_seq = sum(cost(s.graph, st) for st in sched.sequential_schedule(s.graph))
  x2 = jax.random.normal(jax.random.fold_in(key, 2), x.shape)
  err = float(jnp.max(jnp.abs(s(x2) - jax.jit(f)(x2))))
  c = s.counts()
  (cp, chain), = sched.longest_paths(s.graph, [cost.unit_time(s.graph, u) for u in range(len(s.graph.units))])
  # whole-program prediction: IOS-Merge / IOS-Both schedules timed whole here at batch 1, 2, 8, 16, the cost
  # model fitted to them (sched.calibrate), batch 4 predicted and timed
  timed = {}
  for b in (1, 2, 4, 8, 16):
    xb = jax.random.normal(jax.random.fold_in(key, 3), (b,) + x.shape[1:])
    for strat in ("merge", "both"):
      sb = sched.ios_schedule(f, xb, strategy=strat, profiler=cost, check="off")
      timed[(b, strat)] = (sb, sb.measure(xb, number=20, repeat=5)["ios_s"])
  cal = calibrate.calibrate_cost([p for (b, _), (p, _) in timed.items() if b != 4],
                                 [t for (b, _), (_, t) in timed.items() if b != 4])
  held = [(strat, cal.predict(p) / t - 1, calibrate.predict_latency(cost, p) / t - 1)
          for (b, strat), (p, t) in timed.items() if b == 4]
  return [
      ("IOS", "units -> stages (merges, concurrent stages), 2 Inception-like blocks, r=3 s=8",
       f"{c['units']} -> {c['stages']} ({c['merge_stages']} merges of {c['merged_units']} convs, "
       f"{c['concurrent_stages']} concurrent)"),
      ("IOS", "predicted latency, analytical H100 model: IOS-Both vs sequential",
       f"{s.predicted_latency * 1e6:.1f} us vs {t_seq * 1e6:.1f} us ({t_seq / s.predicted_latency:.2f}x)"),
      ("IOS", "longest dependency chain (floor of any schedule; analytical) vs IOS-Both predicted",
       f"{cp * 1e6:.1f} us ({len(chain)} of {c['units']} units) vs {s.predicted_latency * 1e6:.1f} us"),
      ("IOS", "max |scheduled - original| on fresh input (float32)", f"{err:.1e}"),
      ("IOS", "whole-program latency at batch 4 on this CPU, cost model calibrated on batches 1, 2, 8, 16 "
              "(sched.calibrate): prediction error (default model's)",
       ", ".join(f"{strat} {e:+.0%} ({e0:+.0%})" for strat, e, e0 in held)),
  ]
