"""Per-frame latency of exact range-bound video inference (Wakatsuki, Kanai, Fujiwara, MLSys 2021,
``mlsys_jax.infer.video``) against dense per-frame inference of the same flax ReLU CNN under its best
XLA configuration, across scene activity levels of synthetic surveillance-like video.

Baseline. Dense per-frame inference is compiled once per XLA configuration, each as its own program
(GPU: ``mlsys_jax.sched.xla.XLA_CONFIGS`` -- command buffers with convolutions, concurrent scheduling,
latency-hiding scheduler, cuDNN conv fusion; the autotune level is already at its maximum by default;
CPU: plain jit, YNNPACK fusions off, XNNPACK off); every configuration is timed interleaved and the
fastest is the baseline ("best"). Configurations whose outputs differ from plain jit in any bit are
recorded (``dense_configs[*].differing_outputs``) but still allowed as the baseline. The range-bound
model runs under plain jit and under the best dense configuration; the JSON keeps both and every
speed-up is given against plain-jit dense and against best dense.

Timing. Each loop runs a ping-pong stream (frames 2..N, then N-1..1) inside ONE jitted ``lax.scan``
whose carry is donated: the range-bound model carries its state, dense inference carries its output
(so the output of every frame is written to memory, as for any consumer), and every call continues the
stream where the last one ended (no per-call copy of the state, no change that the stream does not
have). All loops of an activity level are timed round-robin (order rotated every round) after warm-up;
per-frame seconds = median loop time / frames per loop; the spread of the per-round ratios (quartiles)
shows the noise. Exactness is checked in a separate scan that counts outputs whose bits differ from
dense inference (plain jit) and the largest absolute difference. Thresholds of the dense fallback are
measured first on the device (``--max_active_fraction calibrate``: ``video.calibrate_active_fraction``).
Weights: flax init made zero-mean with bias -0.05 (``video.highpass_variables``, a stand-in for trained
detector sparsity); reuse does not depend on weights. ``--precision highest`` (default) makes every
conv a float32 dot product, the margin's assumption; ``default`` lets XLA use TF32 on GPU and sets the
margin's ``unit_roundoff`` to 2**-10. ``--time_budget_s``: activity levels that would not finish in
time are left out (the JSON is rewritten after every step, so a run cut short keeps what it measured).

  PYTHONPATH=. python benchmarks/video_conv.py --out $OUT                   # GPU: 1280x720, 3x64 channels
  python benchmarks/video_conv.py --height 224 --width 224 --channels 64,64  # CPU target size
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
from mlsys_jax.infer import video  # noqa: E402
from mlsys_jax.sched.xla import XLA_CONFIGS  # noqa: E402

#: XLA:CPU configurations of the dense baseline (per-jit ``compiler_options``).
CPU_CONFIGS = {
    "jit": {},
    "no_ynn_fusion": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "no_xnnpack": {"xla_cpu_use_xnnpack": False},
}


def _extra(ap):
  ap.add_argument("--height", type=int, default=720)
  ap.add_argument("--width", type=int, default=1280)
  ap.add_argument("--channels", default="64,64,64")
  ap.add_argument("--tile", type=int, default=16)
  ap.add_argument("--frames", type=int, default=8)
  ap.add_argument("--activity", default="full,low,static,medium,high")
  ap.add_argument("--max_active_fraction", default="calibrate",
                  help="dense-fallback threshold: a float, comma-separated floats (one per layer), or "
                       "'calibrate' (measured per layer on this device by video.calibrate_active_fraction)")
  ap.add_argument("--calibration_fractions", default="0.0625,0.125,0.25,0.375,0.5")
  ap.add_argument("--calibration_repeats", type=int, default=5)
  ap.add_argument("--precision", default="highest", choices=["highest", "default"])
  ap.add_argument("--xla_configs", default="all",
                  help="'all' or comma-separated names of the dense baseline's XLA configurations")
  ap.add_argument("--config_set", default="auto", choices=["auto", "gpu", "cpu"],
                  help="which XLA configurations (auto: by backend; gpu on CPU compiles, flags unused)")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--time_budget_s", type=float, default=0.0, help="0: no limit")


def _round_robin(fns: dict, repeats: int, warmup: int = 2) -> dict:
  """Seconds per call of every zero-argument function, timed in rounds (order rotated each round)."""
  names = list(fns)
  for _ in range(warmup):
    for n in names:
      jax.block_until_ready(fns[n]())
  times = {n: [] for n in names}
  for r in range(repeats):
    k = r % len(names)
    for n in names[k:] + names[:k]:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[n]())
      times[n].append(time.perf_counter() - t0)
  return {n: np.asarray(v) for n, v in times.items()}


def _output_copies(hlo_text: str, h: int, w: int, chans) -> int:
  """Copies of a layer output (``f32[H,W,C]``) in an optimized HLO program's text."""
  import re
  shapes = "|".join(sorted({f"{h},{w},{c}" for c in chans} | {f"1,{h},{w},{c}" for c in chans}))
  return len(re.findall(rf"= f32\[(?:{shapes})\]\{{[^}}]*\}} copy\(", hlo_text))


def _ratio_stats(num: np.ndarray, den: np.ndarray) -> dict:
  """Median-time ratio ``median(num) / median(den)`` and the quartiles of the per-round ratios."""
  r = num / den
  return {"ratio": float(np.median(num) / np.median(den)), "round_ratio_q25": float(np.quantile(r, 0.25)),
          "round_ratio_q75": float(np.quantile(r, 0.75))}


def main():
  args = common.parse_args(__doc__.splitlines()[0], _extra)
  t_start = time.time()
  if args.small:
    args.height, args.width, args.channels, args.tile, args.frames, args.repeats = 48, 64, "8,8", 8, 4, 3
    args.calibration_repeats, args.calibration_fractions = 2, "0.125,0.25"
  over = lambda: args.time_budget_s > 0 and time.time() - t_start > args.time_budget_s
  chans = [int(c) for c in args.channels.split(",")]
  prec = lax.Precision.HIGHEST if args.precision == "highest" else None
  u = 2.0 ** -24 if args.precision == "highest" else 2.0 ** -10
  import flax.linen as nn
  net = nn.Sequential(sum(([nn.Conv(c, (3, 3), precision=prec), nn.relu] for c in chans), []))
  h, w = args.height, args.width
  variables = video.highpass_variables(net.init(jax.random.PRNGKey(0), jnp.zeros((1, h, w, 3))), -0.05)
  dense = lambda f: net.apply(variables, f[None])[0]
  flops, cin = 0, 3
  for c in chans:
    flops += 2 * h * w * 9 * cin * c
    cin = c
  n_tiles = (-(-h // args.tile)) * (-(-w // args.tile))

  def stream(act):  # ping-pong: a call ends on the first frame, so the next call continues the stream
    f = video.synthetic_video(0, args.frames, h, w, 3, act)
    return jnp.asarray(f[0]), jnp.asarray(np.concatenate([f[1:], f[-2::-1]]))
  nseq = 2 * (args.frames - 1)

  def dense_body(y, f):  # the carry is the only consumer: each output is written once, nothing else
    return dense(f), None

  def dense_loop(y, seq):  # carries (and returns) each frame's output: it exists in memory
    return lax.scan(dense_body, y, seq)

  out = {"env": common.environment(), "args": vars(args), "dense_flops_per_frame": flops,
         "tiles_per_layer": n_tiles, "frames_per_loop": nseq}
  dump = lambda: common.write_json(args.out, "video_conv" + ("_small" if args.small else ""), out)

  # 1. the dense baseline under every XLA configuration, each its own program
  gpu = args.config_set == "gpu" or (args.config_set == "auto" and jax.default_backend() == "gpu")
  configs = XLA_CONFIGS if gpu else CPU_CONFIGS
  if args.xla_configs != "all":
    names = args.xla_configs.split(",")
    unknown = [n for n in names if n not in configs]
    if unknown or "jit" not in names:
      raise ValueError(f"--xla_configs: {unknown or 'jit missing'}; choose from {sorted(configs)} "
                       "(plain jit is always needed)")
    configs = {k: configs[k] for k in names}
  f0, seq = stream("full")
  ref_y = None
  dense_fns, dense_rec = {}, {}
  for name, opts in configs.items():
    t0 = time.time()
    try:
      y0 = dense(f0)
      fn = jax.jit(dense_loop, donate_argnums=0, compiler_options=opts or None).lower(y0, seq).compile()
      copies = _output_copies(fn.as_text(), h, w, chans)
      y, _ = fn(y0, seq)
      y = np.asarray(y)
    except Exception as e:  # an option this XLA version does not know: recorded, not timed
      dense_rec[name] = {"options": {k: str(v) for k, v in opts.items()}, "error": str(e)[:300]}
      continue
    ref_y = y if ref_y is None else ref_y
    box = [jnp.asarray(y)]

    def call(fn=fn, box=box):
      box[0] = fn(box[0], seq)[0]
      return box[0]
    dense_fns[name] = call
    dense_rec[name] = {"options": {k: str(v) for k, v in opts.items()}, "compile_s": time.time() - t0,
                       "differing_outputs": int(np.sum(y.view(np.uint32) != ref_y.view(np.uint32))),
                       "hlo_output_copies": copies}
  t = _round_robin(dense_fns, args.repeats)
  for name, v in t.items():
    dense_rec[name]["frame_s"] = float(np.median(v)) / nseq
    dense_rec[name]["times_s"] = v.tolist()
  best = min(t, key=lambda n: np.median(t[n]))
  out.update(dense_configs=dense_rec, best_dense_config=best)
  print("dense per frame: " + ", ".join(f"{n} {r['frame_s'] * 1e3:.3f} ms" for n, r in dense_rec.items()
                                        if "frame_s" in r) + f"; best: {best}", flush=True)
  dump()

  # 2. dense-fallback thresholds measured on this device
  t_cal = time.time()
  if args.max_active_fraction == "calibrate":
    fracs, cal = video.calibrate_active_fraction(
        net, variables, (h, w, 3), tile=args.tile, unit_roundoff=u, repeats=args.calibration_repeats,
        fractions=tuple(float(f) for f in args.calibration_fractions.split(",")), return_timings=True)
    conv = lambda c: {"dense_s": c["dense_s"], "sparse_s": {str(k): v for k, v in c["sparse_s"].items()}}
    cal = [{**conv(c), **({"network": conv(c["network"])} if "network" in c else {})} for c in cal]
  else:
    fracs = tuple(float(f) for f in args.max_active_fraction.split(","))
    fracs, cal = (fracs * len(chans) if len(fracs) == 1 else fracs), None
  rb = video.range_bound_model(net, variables, (h, w, 3), tile=args.tile, max_active_fraction=fracs,
                               unit_roundoff=u)
  out.update(max_active_fraction=list(fracs), capacities=[list(c) for c in rb.capacities],
             calibration_s=time.time() - t_cal, calibration=cal)
  print(f"max_active_fraction per layer: {fracs} ({out['calibration_s']:.1f} s)", flush=True)
  dump()

  # 3. the range-bound model (plain jit and the best dense configuration) per activity level
  def rb_loop(st, seq):
    def body(st, f):
      st, y, s = rb.step(st, f)
      return st, (tuple(l.computed for l in s), tuple(l.skipped for l in s),
                  tuple(l.reused for l in s), tuple(l.dense for l in s))
    return lax.scan(body, st, seq)

  @jax.jit
  def check_loop(f0, seq):
    st, _ = rb.init(f0)
    def body(st, f):
      st, y, _ = rb.step(st, f)
      r = dense(f)
      nd = jnp.sum(lax.bitcast_convert_type(y, jnp.int32) != lax.bitcast_convert_type(r, jnp.int32))
      return st, (nd, jnp.max(jnp.abs(y - r)))
    return lax.scan(body, st, seq)[1]

  rb_cfgs = ["jit"] + ([best] if best != "jit" else [])
  rb_fns, rb_copies, t_rb = {}, {}, time.time()
  for c in rb_cfgs:  # compiled once, here; the optimized program's copies of layer outputs are counted
    st0 = rb.init(f0)[0]
    rb_fns[c] = jax.jit(rb_loop, donate_argnums=0, compiler_options=configs[c] or None).lower(
        st0, seq).compile()
    rb_copies[c] = _output_copies(rb_fns[c].as_text(), h, w, chans)
  out.update(rb_hlo_output_copies=rb_copies, rb_compile_s=time.time() - t_rb)
  print(f"range-bound compiled ({time.time() - t_rb:.1f} s); copies of layer "
        f"outputs in the optimized programs: {rb_copies}", flush=True)
  rows, walls = [], []
  out["rows"] = rows
  for act in args.activity.split(","):
    # the next level costs its stream, one check pass and (repeats + 3) calls of every loop; the
    # last level's call times tell (its wall time may hold the compilations)
    est = walls and 2.0 + (args.repeats + 3) * sum(
        [*rows[-1]["rb_frame_s"].values(), rows[-1]["dense_jit_frame_s"], rows[-1]["dense_best_frame_s"]]
    ) * nseq
    if args.time_budget_s > 0 and walls and time.time() - t_start + est > args.time_budget_s:
      print(f"{act}: left out (time budget)", flush=True)
      out.setdefault("left_out", []).append(act)
      continue
    t0 = time.time()
    f0, seq = stream(act)
    nd, md = check_loop(f0, seq)
    fns, first = {}, None
    for c in rb_cfgs:
      box = [rb.init(f0)[0]]
      box[0], s = rb_fns[c](box[0], seq)  # compile + one pass: per-frame tile counts
      if first is None:
        first, net_dense = s, int(box[0].dense_frames)

      def call(c=c, box=box):
        box[0] = rb_fns[c](box[0], seq)[0]
        return box[0]
      fns["rb_" + c] = call
    fns.update({"dense_jit": dense_fns["jit"], "dense_best": dense_fns[best]} if best != "jit" else
               {"dense_jit": dense_fns["jit"]})
    t = _round_robin(fns, args.repeats)
    t["dense_best"] = t["dense_" + best] if best == "jit" else t["dense_best"]
    comp, skip, reuse, dns = first
    med = {k: float(np.median(v)) / nseq for k, v in t.items()}
    rb_best = min(rb_cfgs, key=lambda c: med["rb_" + c])
    row = {"activity": act, "rb_frame_s": {c: med["rb_" + c] for c in rb_cfgs},
           "dense_jit_frame_s": med["dense_jit"], "dense_best_frame_s": med["dense_best"],
           "rb_best_config": rb_best, "sparse_frame_s": med["rb_" + rb_best],
           # against the faster of the two dense programs in this level's rounds (the strongest)
           "speedup_vs_best": min(med["dense_best"], med["dense_jit"]) / med["rb_" + rb_best],
           "speedup_vs_jit": med["dense_jit"] / med["rb_" + rb_best],
           "speedup_jit_vs_best": med["dense_best"] / med["rb_jit"],
           "round_ratios_vs_best": _ratio_stats(
               t["dense_best"] if med["dense_best"] <= med["dense_jit"] else t["dense_jit"],
               t["rb_" + rb_best]),
           "times_s": {k: v.tolist() for k, v in t.items()},
           "dense_best_tflops": flops / med["dense_best"] / 1e12,
           "bitwise_differing_outputs": int(np.sum(nd)), "max_abs_diff": float(np.max(md)),
           "network_dense_frame_rate": net_dense / nseq,
           "computed_frac": [float(np.mean(c)) / n_tiles for c in comp],
           "skipped_frac": [float(np.mean(c)) / n_tiles for c in skip],
           "reused_frac": [float(np.mean(c)) / n_tiles for c in reuse],
           "dense_fallback_rate": [float(np.mean(c)) for c in dns], "wall_s": time.time() - t0}
    rows.append(row)
    walls.append(row["wall_s"])
    dump()
    print(f"{act}: range-bound {row['sparse_frame_s'] * 1e3:.3f} ms ({rb_best}), dense best "
          f"{row['dense_best_frame_s'] * 1e3:.3f} ms ({best}), jit {row['dense_jit_frame_s'] * 1e3:.3f} ms: "
          f"{row['speedup_vs_best']:.3f}x vs best (rounds {row['round_ratios_vs_best']['round_ratio_q25']:.3f}"
          f"..{row['round_ratios_vs_best']['round_ratio_q75']:.3f}), diff={row['bitwise_differing_outputs']}",
          flush=True)
  out["total_s"] = time.time() - t_start
  dump()
  common.print_table(rows, ["activity", "sparse_frame_s", "dense_best_frame_s", "dense_jit_frame_s",
                            "speedup_vs_best", "speedup_vs_jit", "bitwise_differing_outputs"])


if __name__ == "__main__":
  main()
