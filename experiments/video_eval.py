"""Exact video CNN inference (Wakatsuki, Kanai, Fujiwara, MLSys 2021): skip rate per layer against the
true zero fraction, exactness against the flax model, and CPU latency against dense per-frame inference,
across scene activity levels of synthetic surveillance-like video.

  python experiments/video_eval.py                         # 96x96 frames, 3 seeds, a few minutes on CPU
  python experiments/video_eval.py --size=64 --frames=8 --seeds=1 --timing_repeats=5   # quick

Two weight settings: ``random`` (flax default init, zero bias) and ``highpass`` (zero-mean kernels, bias
-0.05: a stand-in for the spatial sparsity of trained detector layers, see
``video.highpass_variables``). Writes ``results/video_eval/video_eval.json``.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.infer import video  # noqa: E402

_OUT = flags.DEFINE_string("out_dir", "results/video_eval", "output directory")
_SIZE = flags.DEFINE_integer("size", 96, "frame height and width")
_FRAMES = flags.DEFINE_integer("frames", 12, "frames per stream")
_SEEDS = flags.DEFINE_integer("seeds", 3, "video seeds")
_TILE = flags.DEFINE_integer("tile", 8, "output tile size")
_CHANNELS = flags.DEFINE_list("channels", ["16", "32", "32"], "conv widths")
_ACTIVITY = flags.DEFINE_list("activity", ["static", "low", "medium", "high", "full"], "activity levels")
_FRACTION = flags.DEFINE_float("max_active_fraction", 0.5, "dense fallback above this tile fraction")
_REPEATS = flags.DEFINE_integer("timing_repeats", 10, "interleaved timing rounds (0: no timing)")


def run_stream(rb, step, ref, frames):
  """Per-frame stats of one stream; asserts nothing, counts differences from the flax model."""
  st, _ = rb.init(frames[0])
  nl = len(rb.layers)
  acc = {k: np.zeros(nl) for k in ("reused", "skipped", "computed", "dense", "zero_tiles", "zero_fraction")}
  n_diff, max_abs, n_out = 0, 0.0, 0
  for f in frames[1:]:
    st, y, s = step(st, f)
    r = np.asarray(ref(f))
    y = np.asarray(y)
    n_diff += int(np.sum(y.view(np.uint32) != r.view(np.uint32)))
    max_abs = max(max_abs, float(np.max(np.abs(y - r))))
    n_out += y.size
    for i, ls in enumerate(s):
      for k in acc:
        acc[k][i] += float(getattr(ls, k))
  nf = len(frames) - 1
  return st, {k: (v / nf).tolist() for k, v in acc.items()}, n_diff, max_abs, n_out


def main(_):
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  size, tile = _SIZE.value, _TILE.value
  net = video.relu_cnn([int(c) for c in _CHANNELS.value])
  base = net.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  weights = {"random": base, "highpass": video.highpass_variables(base, -0.05)}
  n_tiles = (-(-size // tile)) ** 2
  rows = []
  t0 = time.time()
  for wname, variables in weights.items():
    rb = video.range_bound_model(net, variables, (size, size, 3), tile=tile,
                                 max_active_fraction=_FRACTION.value)
    step = jax.jit(rb.step)
    ref = jax.jit(lambda f, v=variables: net.apply(v, f[None])[0])
    for act in _ACTIVITY.value:
      per_seed = []
      for seed in range(_SEEDS.value):
        frames = video.synthetic_video(seed, _FRAMES.value, size, size, 3, act)
        st, agg, n_diff, max_abs, n_out = run_stream(rb, step, ref, frames)
        row = {"weights": wname, "activity": act, "seed": seed, "tiles_per_layer": n_tiles,
               "bitwise_differing_outputs": n_diff, "outputs_checked": n_out,
               "max_abs_diff_vs_dense": max_abs, **{f"{k}_tiles_per_frame": v for k, v in agg.items()
                                                    if k not in ("zero_fraction", "dense")},
               "dense_fallback_rate": agg["dense"], "true_zero_fraction": agg["zero_fraction"],
               "skip_rate": [s / n_tiles for s in agg["skipped"]],
               "zero_tile_rate": [z / n_tiles for z in agg["zero_tiles"]],
               "reuse_rate": [r / n_tiles for r in agg["reused"]]}
        if _REPEATS.value and seed == 0:
          f_prev, f = jnp.asarray(frames[-2]), jnp.asarray(frames[-1])
          st_prev, _ = rb.init(frames[0])
          for g in frames[1:-1]:
            st_prev, _, _ = step(st_prev, g)
          t = stats.time_interleaved(lambda: step(st_prev, f), lambda: ref(f),
                                     repeats=_REPEATS.value, warmup=2)
          row.update(step_s=t.median_a, dense_s=t.median_b, speedup_vs_dense=t.ratio,
                     p_step_faster=t.p_a_faster)
        per_seed.append(row)
        rows.append(row)
      r0 = per_seed[0]
      print(f"[{time.time() - t0:6.1f}s] {wname:8s} {act:6s} skip/layer="
            f"{np.round(np.mean([r['skip_rate'] for r in per_seed], 0), 3).tolist()} "
            f"reuse/layer={np.round(np.mean([r['reuse_rate'] for r in per_seed], 0), 3).tolist()} "
            f"zero-tile/layer={np.round(np.mean([r['zero_tile_rate'] for r in per_seed], 0), 3).tolist()} "
            f"zero-frac={np.round(np.mean([r['true_zero_fraction'] for r in per_seed], 0), 3).tolist()} "
            f"diff={sum(r['bitwise_differing_outputs'] for r in per_seed)} "
            + (f"speedup={r0['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in r0 else ""), flush=True)
  cfg = {"size": size, "frames": _FRAMES.value, "seeds": _SEEDS.value, "tile": tile,
         "channels": [int(c) for c in _CHANNELS.value], "max_active_fraction": _FRACTION.value,
         "backend": jax.default_backend(), "jax": jax.__version__}
  prov = provenance.record(   # the synthetic streams, in the loop's order (activity, then seed)
      data_arrays=[video.synthetic_video(s, _FRAMES.value, size, size, 3, act)
                   for act in _ACTIVITY.value for s in range(_SEEDS.value)], script=__file__)
  (out / "video_eval.json").write_text(json.dumps({"config": cfg, "rows": rows, "provenance": prov}, indent=1))
  print(f"wrote {out / 'video_eval.json'}")


if __name__ == "__main__":
  app.run(main)
