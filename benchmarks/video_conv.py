"""Per-frame latency of exact range-bound video inference (Wakatsuki, Kanai, Fujiwara, MLSys 2021,
``mlsys_jax.infer.video``) against dense per-frame inference of the same flax ReLU CNN, across scene
activity levels of synthetic surveillance-like video.

Both run frames 2..N of a stream of ``--frames`` frames inside ONE jitted ``lax.scan`` (state carried
frame to frame, no dispatch; the range-bound model's state after its dense first frame is an input),
timed interleaved (``mlsys_jax.stats.time_interleaved``); per-frame seconds = loop time / (N - 1): the
steady state. Exactness is checked in a separate scan that counts outputs whose bits differ from dense
inference and the largest absolute difference. Both loops keep every frame's output in memory (the
dense loop carries it; otherwise XLA fuses the last layer's bias + ReLU into the per-frame checksum and
never writes the output, which no real consumer allows). The dense-fallback threshold of every layer is measured
first on the device (``--max_active_fraction calibrate``, ``video.calibrate_active_fraction``). Weights: flax init made zero-mean with bias
-0.05 (``video.highpass_variables``, a stand-in for trained detector sparsity); reuse does not depend on
weights. ``--precision highest`` (default) makes every conv a float32 dot product, the margin's
assumption; ``default`` lets XLA use TF32 on GPU and sets the margin's ``unit_roundoff`` to 2**-10.

  PYTHONPATH=. python benchmarks/video_conv.py --out $OUT                   # GPU: 1280x720, 3x64 channels
  python benchmarks/video_conv.py --small                                   # CPU smoke test
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks import common  # noqa: E402
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.infer import video  # noqa: E402


def _extra(ap):
  ap.add_argument("--height", type=int, default=720)
  ap.add_argument("--width", type=int, default=1280)
  ap.add_argument("--channels", default="64,64,64")
  ap.add_argument("--tile", type=int, default=16)
  ap.add_argument("--frames", type=int, default=12)
  ap.add_argument("--activity", default="static,low,medium,high,full")
  ap.add_argument("--max_active_fraction", default="calibrate",
                  help="dense-fallback threshold: a float, comma-separated floats (one per layer), or "
                       "'calibrate' (measured per layer on this device by video.calibrate_active_fraction)")
  ap.add_argument("--calibration_repeats", type=int, default=5)
  ap.add_argument("--precision", default="highest", choices=["highest", "default"])
  ap.add_argument("--repeats", type=int, default=10)


def main():
  args = common.parse_args(__doc__.splitlines()[0], _extra)
  if args.small:
    args.height, args.width, args.channels, args.tile, args.frames, args.repeats = 48, 64, "8,8", 8, 4, 3
    args.calibration_repeats = 2
  chans = [int(c) for c in args.channels.split(",")]
  prec = lax.Precision.HIGHEST if args.precision == "highest" else None
  u = 2.0 ** -24 if args.precision == "highest" else 2.0 ** -10
  import flax.linen as nn
  net = nn.Sequential(sum(([nn.Conv(c, (3, 3), precision=prec), nn.relu] for c in chans), []))
  h, w = args.height, args.width
  variables = video.highpass_variables(net.init(jax.random.PRNGKey(0), jnp.zeros((1, h, w, 3))), -0.05)
  t_cal = time.time()
  if args.max_active_fraction == "calibrate":
    fracs, cal = video.calibrate_active_fraction(net, variables, (h, w, 3), tile=args.tile,
                                                 unit_roundoff=u, repeats=args.calibration_repeats,
                                                 return_timings=True)
    cal = [{"dense_s": c["dense_s"], "sparse_s": {str(k): v for k, v in c["sparse_s"].items()}}
           for c in cal]
  else:
    fracs = tuple(float(f) for f in args.max_active_fraction.split(","))
    fracs, cal = (fracs * len(chans) if len(fracs) == 1 else fracs), None
  t_cal = time.time() - t_cal
  print(f"max_active_fraction per layer: {fracs} ({t_cal:.1f} s); calibration: {cal}", flush=True)
  rb = video.range_bound_model(net, variables, (h, w, 3), tile=args.tile, max_active_fraction=fracs,
                               unit_roundoff=u)
  dense = lambda f: net.apply(variables, f[None])[0]
  flops, cin = 0, 3
  for c in chans:
    flops += 2 * h * w * 9 * cin * c
    cin = c

  @jax.jit
  def sparse_loop(st, frames):
    def body(st, f):
      st, y, s = rb.step(st, f)
      return st, (jnp.sum(y), tuple(l.computed for l in s), tuple(l.skipped for l in s),
                  tuple(l.reused for l in s), tuple(l.dense for l in s))
    return lax.scan(body, st, frames)[1]

  @jax.jit
  def dense_loop(y0, frames):  # carries each frame's output: it exists in memory, as for any consumer
    def body(y, f):
      y = dense(f)
      return y, jnp.sum(y)
    return lax.scan(body, y0, frames)[1]

  @jax.jit
  def check_loop(frames):
    st, _ = rb.init(frames[0])
    def body(st, f):
      st, y, _ = rb.step(st, f)
      r = dense(f)
      nd = jnp.sum(lax.bitcast_convert_type(y, jnp.int32) != lax.bitcast_convert_type(r, jnp.int32))
      return st, (nd, jnp.max(jnp.abs(y - r)))
    return lax.scan(body, st, frames[1:])[1]

  def dump(rows):
    common.write_json(args.out, "video_conv" + ("_small" if args.small else ""),
                      {"env": common.environment(), "args": vars(args), "max_active_fraction": list(fracs),
                       "capacities": [list(c) for c in rb.capacities], "calibration_s": t_cal,
                       "calibration": cal, "rows": rows})

  rows = []
  n_tiles = (-(-h // args.tile)) * (-(-w // args.tile))
  for act in args.activity.split(","):
    t0 = time.time()
    frames = jnp.asarray(video.synthetic_video(0, args.frames, h, w, 3, act))
    nd, md = check_loop(frames)
    st0, _ = rb.init(frames[0])  # the first frame is dense; timed: frames 2..N
    rest = frames[1:]
    _, comp, skip, reuse, dns = sparse_loop(st0, rest)
    y0 = dense(frames[0])
    t = stats.time_interleaved(lambda: sparse_loop(st0, rest), lambda: dense_loop(y0, rest),
                               repeats=args.repeats, warmup=2)
    nf = args.frames - 1
    row = {"activity": act, "sparse_frame_s": t.median_a / nf, "dense_frame_s": t.median_b / nf,
           "speedup": t.ratio, "p_sparse_faster": t.p_a_faster,
           "dense_tflops": flops / (t.median_b / nf) / 1e12, "dense_flops_per_frame": flops,
           "bitwise_differing_outputs": int(np.sum(nd)), "max_abs_diff": float(np.max(md)),
           "tiles_per_layer": n_tiles,
           "computed_frac": [float(np.mean(c)) / n_tiles for c in comp],
           "skipped_frac": [float(np.mean(c)) / n_tiles for c in skip],
           "reused_frac": [float(np.mean(c)) / n_tiles for c in reuse],
           "dense_fallback_rate": [float(np.mean(c)) for c in dns], "wall_s": time.time() - t0}
    rows.append(row)
    dump(rows)  # after every activity level: a run cut short still leaves its rows
    print(f"{act}: sparse {row['sparse_frame_s'] * 1e3:.3f} ms, dense {row['dense_frame_s'] * 1e3:.3f} ms "
          f"({row['speedup']:.2f}x), diff={row['bitwise_differing_outputs']}", flush=True)
  common.print_table(rows, ["activity", "sparse_frame_s", "dense_frame_s", "speedup", "dense_tflops",
                            "bitwise_differing_outputs", "max_abs_diff"])


if __name__ == "__main__":
  main()
