"""Nimble (Shen et al., MLSys 2021) on the CPU: a request stream with log-normal lengths served end to
end (compilation included) by per-shape jit, pad-to-max, bucketed_jit with power-of-two and DP-chosen
buckets, and jax.export symbolic shapes; and a batched level-by-level Tree-LSTM against per-tree
execution. Small sizes so it runs in a few minutes on a shared CPU; the GPU-scale run is
``benchmarks/dynamic_stream.py`` (same code).

  python experiments/dynamic_stream.py
  python experiments/dynamic_stream.py --requests=300 --d_model=64 --out_dir=results/dynamic_stream
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import provenance  # noqa: E402  (experiments/provenance.py)
from benchmarks import common  # noqa: E402
from benchmarks.dynamic_stream import stream_benchmark, tree_benchmark  # noqa: E402

_REQUESTS = flags.DEFINE_integer("requests", 150, "Requests in the stream.")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per request.")
_D_MODEL = flags.DEFINE_integer("d_model", 64, "Encoder width.")
_LAYERS = flags.DEFINE_integer("num_layers", 2, "Encoder layers.")
_MIN_LEN = flags.DEFINE_integer("min_len", 8, "Shortest request.")
_MAX_LEN = flags.DEFINE_integer("max_len", 256, "Longest request.")
_BUCKETS = flags.DEFINE_integer("max_buckets", 8, "Most buckets the DP may choose.")
_BUDGET = flags.DEFINE_float("budget_s", 15.0, "Seconds per per-shape method before extrapolating.")
_TREE_BATCH = flags.DEFINE_integer("tree_batch", 16, "Trees per batch for the Tree-LSTM part.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/dynamic_stream", "Output directory.")


def _plot(res, path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:  # pragma: no cover
    return
  m = res["stream"]["methods"]
  names = list(m)
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  ax[0].barh(names, [m[k]["seconds"] for k in names],
             color=["tab:gray" if m[k].get("extrapolated") else "tab:blue" for k in names])
  ax[0].set_xscale("log")
  ax[0].set_xlabel("stream seconds, compilation included (gray: extrapolated)")
  w = res["stream"].get("warm", {})
  names = [k for k in w if "serial" in w[k] and k != "pad_to_max"]
  x = range(len(names))
  ax[1].bar([i - 0.2 for i in x], [w[k]["serial"]["speedup_vs_pad_to_max"] for k in names], 0.4,
            label="serial")
  ax[1].bar([i + 0.2 for i in x], [w[k].get("pipelined", {}).get("speedup_vs_pad_to_max", 0) for k in names],
            0.4, label="pipelined")
  ax[1].set_xticks(list(x), names)
  ax[1].legend()
  ax[1].axhline(1.0, color="k", lw=0.8)
  ax[1].set_ylabel("after warm-up: speed-up over pad-to-max")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(_):
  out = pathlib.Path(_OUT_DIR.value)
  out.mkdir(parents=True, exist_ok=True)
  res = {"environment": common.environment(), "complete": False,
         "provenance": provenance.record(script=__file__, code=("mlsys_jax", "benchmarks/*.py"))}   # synthetic

  def save(part):  # the JSON is rewritten after every step: an interrupted run keeps what it measured
    def write(r):
      res[part] = r
      (out / "dynamic_stream.json").write_text(json.dumps(res, indent=1))
    return write

  stream_benchmark(num_layers=_LAYERS.value, d_model=_D_MODEL.value, num_heads=4, batch=_BATCH.value,
                   requests=_REQUESTS.value, min_len=_MIN_LEN.value, max_len=_MAX_LEN.value,
                   budget_s=_BUDGET.value, max_buckets=_BUCKETS.value, seed=_SEED.value, warm_repeats=2,
                   warm_modes=("serial",), on_update=save("stream"))
  tree_benchmark(batch=_TREE_BATCH.value, hidden=64, d_in=32, lo=4, hi=40, seed=_SEED.value,
                 budget_s=10.0, on_update=save("tree_lstm"))
  res["complete"] = True
  save("complete")(True)
  _plot(res, out / "dynamic_stream.png")
  print(f"wrote {out / 'dynamic_stream.json'}")


if __name__ == "__main__":
  app.run(main)
