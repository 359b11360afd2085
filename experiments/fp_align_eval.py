"""Accuracy versus alignment bits of FP inner products (Abdelaziz et al., MLSys 2021).

Trains the library's CNN (float32) on digits (and optionally a 1-D CNN on mnist1d), then evaluates the
whole test set with every convolution and dense product computed by ``fp_align.fp_dot``: operands
rounded to FP16 or FP8-E4M3 (power-of-two per-tensor scaling), exact products, an accumulator with
``w`` alignment bits (``w = 2..28``; 'drop' and 'truncate' conventions), one rounding to float32.
Reports, per seed: test accuracy, agreement of the predictions with exact accumulation, the smallest
``w`` whose accuracy is within 0.1 point of exact accumulation, and per-layer histograms of the
alignment shifts (the exponent spread that motivates the paper). With ``--bfp`` it adds MX-style block
floating point (shared exponent over blocks of 32 along the reduction; elements keep ``w`` bits below
the block's largest exponent) on the same axis.

  python experiments/fp_align_eval.py                      # digits CNN, 3 seeds, FP16 + FP8
  python experiments/fp_align_eval.py --models=digits_cnn,mnist1d_cnn --seeds=2
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import data, models, stats  # noqa: E402
from mlsys_jax.quant import fp_align  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["digits_cnn"], "digits_cnn and/or mnist1d_cnn.")
_FMTS = flags.DEFINE_list("fmts", ["fp16", "fp8_e4m3"], "Input formats.")
_CONVS = flags.DEFINE_list("conventions", ["truncate", "drop"], "Alignment conventions.")
_WMIN = flags.DEFINE_integer("w_min", 2, "Smallest alignment width.")
_WMAX = flags.DEFINE_integer("w_max", 28, "Largest alignment width.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Training seeds.")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Training epochs.")
_BFP = flags.DEFINE_bool("bfp", True, "Add the MX-style block floating point curve.")
_OUT = flags.DEFINE_string("out_dir", "results/fp_align", "Output directory.")
_NAME = flags.DEFINE_string("out_name", "fp_align_eval", "Output JSON/PNG name.")
_RESUM = flags.DEFINE_string("resummarize", "", "Recompute the summary and plot of this results JSON "
                             "(no training) and write it back.")


def _setup(name: str, seed: int):
  if name == "digits_cnn":
    return data.load_digits(seed=0), dict(channels=(16, 32), hidden=64)
  if name == "mnist1d_cnn":
    return data.load_mnist1d(seed=0), dict(channels=(16, 32), hidden=64, dims=1, kernel_size=5)
  raise ValueError(f"unknown model {name!r}")


def _hooked(kw, cfg=None, dot=None, conv=None):
  if cfg is not None:
    dot, conv = fp_align.fp_align_dot_general(cfg), fp_align.fp_align_conv_general_dilated(cfg)
  return models.CNN(dot_general=dot, conv_general_dilated=conv, **kw)


def _eval_fn(kw, fmt: str, conv: str, wmax: int):
  """jit(w, variables, x) -> logits: one compiled program for every w of a sweep."""

  @jax.jit
  def f(w, variables, x):
    cfg = fp_align.FpAlignConfig(fmt, w, conv, max_align_bits=wmax)
    return _hooked(kw, cfg).apply(variables, x)

  return f


def _bfp_fn(kw, fmt: str, wmax: int):
  @jax.jit
  def f(w, variables, x):
    cfg = fp_align.BfpConfig(fmt, w, block=32)
    return _hooked(kw, dot=fp_align.bfp_dot_general(cfg),
                   conv=fp_align.bfp_conv_general_dilated(cfg)).apply(variables, x)

  return f


def _spread(kw, fmt, variables, x):
  mk = lambda cls: functools.partial(cls, config=fp_align.FpAlignConfig(fmt, None), max_rows=256)
  model = models.CNN(dot_general_cls=mk(fp_align.FpAlignDotGeneral),
                     conv_general_dilated_cls=mk(fp_align.FpAlignConv), **kw)
  apply = jax.jit(lambda v, xb: model.apply(v, xb, mutable=[fp_align.SPREAD_COLLECTION]))
  _, st = apply(variables, x)
  out = {}
  for path, h in jax.tree_util.tree_flatten_with_path(st[fp_align.SPREAD_COLLECTION])[0]:
    h = np.asarray(h).astype(np.int64)
    d = np.arange(h.size)
    layer = jax.tree_util.keystr(path[:1]).strip("[]'")
    out[layer] = {"counts": h.tolist(), "products": int(h.sum()),
                  "mean_shift": float((h * d).sum() / max(1, h.sum())),
                  "p99_shift": int(d[np.searchsorted(np.cumsum(h), 0.99 * h.sum())]),
                  "max_shift": int(d[h > 0].max()) if h.sum() else 0,
                  "frac_shift_gt_8": float(h[9:].sum() / max(1, h.sum()))}
  return out


def _summary(res, ws):
  """Per format/convention over seeds: smallest w within 0.1 point, accuracy and agreement curves."""
  summ = {}
  run0 = res["runs"][0]["fmts"]
  for fmt in run0:
    keys = list(run0[fmt]["conventions"]) + (["bfp32"] if "bfp32" in run0[fmt] else [])
    for conv in keys:
      get = (lambda r: r["fmts"][fmt]["bfp32"]) if conv == "bfp32" else (
          lambda r: r["fmts"][fmt]["conventions"][conv])
      sw = [get(r)["smallest_w_within_0.1pt"] for r in res["runs"]]
      acc = np.array([get(r)["accuracy"] for r in res["runs"]])
      agree = np.array([get(r)["agreement_with_exact"] for r in res["runs"]])
      exact = np.array([r["fmts"][fmt]["exact_accuracy"] for r in res["runs"]])
      mean_acc = acc.mean(0)
      # P(limited-alignment accuracy >= exact accuracy) over paired seeds, a few widths
      p_ok = {str(w): float(stats.prob_outperform(acc[:, i] + 1e-9, exact))
              for i, w in enumerate(ws) if w in (4, 6, 8, 10, 12)}
      summ[f"{fmt}/{conv}"] = {
          "smallest_w_per_seed": sw,
          "max_smallest_w": max((s for s in sw if s is not None), default=None),
          "smallest_w_mean_within_0.1pt": _smallest_w(ws, mean_acc.tolist(), float(exact.mean())),
          "smallest_w_mean_agreement_99.5": _smallest_w(ws, agree.mean(0).tolist(), 1.0, tol=0.005),
          "mean_accuracy": mean_acc.tolist(), "mean_agreement": agree.mean(0).tolist(),
          "mean_exact_accuracy": float(exact.mean()),
          "min_accuracy_minus_exact": (acc - exact[:, None]).min(0).tolist(),
          "prob_at_least_exact": p_ok}
  return summ


def _smallest_w(ws, accs, exact, tol=0.001):
  ok = [w for w, a in zip(ws, accs) if a >= exact - tol]
  # smallest w from which every larger w also stays within tol
  for i, w in enumerate(ws):
    if all(a >= exact - tol for a in accs[i:]):
      return w
  return None if not ok else ok[-1]


def main(argv):
  del argv
  if _RESUM.value:
    path = pathlib.Path(_RESUM.value)
    results = json.loads(path.read_text())
    for res in results["models"].values():
      res["summary"] = _summary(res, results["ws"])
    path.write_text(json.dumps(results, indent=1, default=float))
    _plot(results, path.with_suffix(".png"))
    _print_summary(results)
    return
  ws = list(range(_WMIN.value, _WMAX.value + 1))
  out_dir = pathlib.Path(_OUT.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  results = {"ws": ws, "epochs": _EPOCHS.value, "seeds": _SEEDS.value, "models": {}}
  t_start = time.perf_counter()
  for mname in _MODELS.value:
    res = {"runs": []}
    for seed in range(_SEEDS.value):
      ds, kw = _setup(mname, seed)
      model = models.CNN(num_classes=ds.num_classes, **kw)
      variables, hist = models.train_classifier(model, ds, optax.adam(2e-3), epochs=_EPOCHS.value,
                                                batch_size=32, seed=seed)
      x, y = jnp.asarray(ds.x_test), ds.y_test
      float_logits = np.asarray(jax.jit(model.apply)(variables, x))
      run = {"seed": seed, "float32_accuracy": float(np.mean(float_logits.argmax(-1) == y)),
             "fmts": {}}
      print(f"[{mname} seed {seed}] float32 test accuracy {run['float32_accuracy']:.4f} "
            f"({time.perf_counter() - t_start:.0f}s)", flush=True)
      for fmt in _FMTS.value:
        t0 = time.perf_counter()
        exact_cfg = fp_align.FpAlignConfig(fmt, None)
        ex_logits = np.asarray(jax.jit(_hooked(kw, exact_cfg).apply)(variables, x))
        t_eval = time.perf_counter() - t0
        ex_pred = ex_logits.argmax(-1)
        fr = {"exact_accuracy": float(np.mean(ex_pred == y)), "exact_eval_seconds_incl_compile": t_eval,
              "conventions": {}}
        for conv in _CONVS.value:
          f = _eval_fn(kw, fmt, conv, _WMAX.value)
          accs, agree, relerr, secs = [], [], [], []
          for w in ws:
            t1 = time.perf_counter()
            lg = np.asarray(f(jnp.int32(w), variables, x))
            secs.append(time.perf_counter() - t1)
            accs.append(float(np.mean(lg.argmax(-1) == y)))
            agree.append(float(np.mean(lg.argmax(-1) == ex_pred)))
            relerr.append(float(np.linalg.norm(lg - ex_logits) / np.linalg.norm(ex_logits)))
          fr["conventions"][conv] = {
              "accuracy": accs, "agreement_with_exact": agree, "logit_rel_error": relerr,
              "eval_seconds": secs, "smallest_w_within_0.1pt": _smallest_w(ws, accs, fr["exact_accuracy"]),
              "smallest_w_full_agreement": _smallest_w(ws, agree, 1.0, tol=0.0)}
          c = fr["conventions"][conv]
          print(f"  {fmt} {conv}: exact acc {fr['exact_accuracy']:.4f}; acc at w=2/4/8/12: "
                f"{accs[ws.index(2)] if 2 in ws else '-'} / {accs[ws.index(4)] if 4 in ws else '-'} / "
                f"{accs[ws.index(8)] if 8 in ws else '-'} / {accs[ws.index(12)] if 12 in ws else '-'}; "
                f"smallest w within 0.1pt {c['smallest_w_within_0.1pt']}, full agreement from "
                f"{c['smallest_w_full_agreement']}; median eval {np.median(secs):.2f}s "
                f"({time.perf_counter() - t_start:.0f}s)", flush=True)
        if _BFP.value and hasattr(fp_align, "BfpConfig"):
          f = _bfp_fn(kw, fmt, _WMAX.value)
          accs, agree = [], []
          for w in ws:
            lg = np.asarray(f(jnp.int32(w), variables, x))
            accs.append(float(np.mean(lg.argmax(-1) == y)))
            agree.append(float(np.mean(lg.argmax(-1) == ex_pred)))
          fr["bfp32"] = {"accuracy": accs, "agreement_with_exact": agree,
                         "smallest_w_within_0.1pt": _smallest_w(ws, accs, fr["exact_accuracy"])}
          print(f"  {fmt} BFP32: smallest w within 0.1pt {fr['bfp32']['smallest_w_within_0.1pt']}",
                flush=True)
        if seed == 0:
          fr["shift_histograms"] = _spread(kw, fmt, variables, x[:128])
          for layer, h in fr["shift_histograms"].items():
            print(f"    {layer}: mean shift {h['mean_shift']:.2f}, p99 {h['p99_shift']}, max "
                  f"{h['max_shift']}, share > 8: {h['frac_shift_gt_8']:.4f}", flush=True)
        run["fmts"][fmt] = fr
      res["runs"].append(run)
    res["summary"] = _summary(res, ws)
    results["models"][mname] = res
  results["seconds"] = time.perf_counter() - t_start
  results["provenance"] = provenance.record(   # each model's data set in --models order (one split, all seeds)
      data_arrays=[a for m in _MODELS.value for a in _setup(m, 0)[0][:4]], script=__file__)
  path = out_dir / f"{_NAME.value}.json"
  path.write_text(json.dumps(results, indent=1, default=float))
  print(f"wrote {path}")
  _plot(results, out_dir / f"{_NAME.value}.png")
  _print_summary(results)


def _print_summary(results):
  for mname, res in results["models"].items():
    for key, s in res["summary"].items():
      print(f"{mname} {key}: exact acc {s['mean_exact_accuracy']:.4f}; smallest w within 0.1 pt per "
            f"seed {s['smallest_w_per_seed']} (of the mean curve: {s['smallest_w_mean_within_0.1pt']}); "
            f"mean agreement >= 99.5% from w = {s['smallest_w_mean_agreement_99.5']}")


def _plot(results, path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed: no plot")
    return
  names = list(results["models"])
  fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.2), squeeze=False)
  ws = results["ws"]
  for ax, mname in zip(axes[0], names):
    summ = results["models"][mname]["summary"]
    for key, s in summ.items():
      ax.plot(ws, np.array(s["mean_accuracy"]) * 100, marker=".", label=key)
    for fmt in {k.split("/")[0] for k in summ}:
      ex = next(s["mean_exact_accuracy"] for k, s in summ.items() if k.startswith(fmt))
      ax.axhline(ex * 100, ls=":", lw=0.8, color="gray")
    ax.set_xlabel("alignment bits w")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.set_title(f"{mname}: limited-alignment FP dot products")
    ax.axvline(8, ls="--", lw=0.8, color="k")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
