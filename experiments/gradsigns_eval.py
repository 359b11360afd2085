"""GradSigns: embed a signature in a CNN through its input gradients, read it back white-box and
black-box, attack it (fine-tuning at several learning rates, pruning, overwriting, quantization), check that
independently trained models are never claimed, and sweep the capacity (Aramoon et al., MLSys 2021).

Each trial (seed) trains a plain and a watermarked model from the same initialisation and batch order;
the watermark regularizer sees a fresh random sample of target-class training inputs at every step (the
paper takes the target-class inputs of each minibatch). Extraction uses the held-out test inputs of the
target class (and, as the owner's key set, the training inputs of the target class).

  python experiments/gradsigns_eval.py                                   # digits, hinge, 64 bits, 3 seeds
  python experiments/gradsigns_eval.py --loss=bce --lam=1                # the paper's sigmoid BCE
  python experiments/gradsigns_eval.py --dataset=mnist1d --capacity_bits= --paper_baseline=false
"""

from __future__ import annotations

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
from mlsys_jax import data, models, quant, stats  # noqa: E402
from mlsys_jax.robust import gradsigns as gs  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "digits", list(data.DATASETS), "Data set.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "CIFAR-10 binary directory.")
_BITS = flags.DEFINE_integer("bits", 64, "Signature length N.")
_LOSS = flags.DEFINE_enum("loss", "hinge", ["hinge", "bce"], "Embedding loss (bce = the paper's).")
_MARGIN = flags.DEFINE_float("margin", 0.5, "Hinge margin relative to rms(K g).")
_LAMBDA = flags.DEFINE_float("lam", 3.0, "Regularizer weight lambda.")
_PER_EXAMPLE = flags.DEFINE_bool("per_example", True, "Add the per-input hinge.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Plain epochs before the regularizer is switched on (part "
                               "of --epochs).")
_N_TARGET = flags.DEFINE_integer("n_target", 32, "Target-class inputs drawn per step for the regularizer.")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Training epochs (fine-tuning uses as many).")
_LR = flags.DEFINE_float("lr", 1e-3, "Adam learning rate of training.")
_FT_LRS = flags.DEFINE_list("ft_lrs", ["1e-3", "1e-4", "1e-5"], "Fine-tuning learning rates.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Trials.")
_CAPACITY = flags.DEFINE_list("capacity_bits", ["32", "64", "128", "256"], "N of the capacity sweep.")
_CAPACITY_LAMS = flags.DEFINE_list("capacity_lams", ["1", "3", "10"], "lambda of the capacity sweep.")
_FT_DIAG = flags.DEFINE_bool("ft_diagnostic", True, "Also fine-tune the plain model: relative weight "
                              "change and how many of its own projected-gradient signs flip.")
_PAPER = flags.DEFINE_bool("paper_baseline", True, "Also train the paper's loss (BCE, lambda=1).")
_OUT = flags.DEFINE_string("out", "", "Output JSON (default experiments/results/gradsigns_<dataset>.json).")


def _model(ds):
  if ds.name == "mnist1d":
    return models.CNN(dims=1, kernel_size=5, channels=(32, 64))
  if ds.name == "cifar10":
    return models.ResNet20()
  return models.CNN(channels=(32, 64))


def _fresh(params, tx):
  return models.TrainState(params, {}, tx.init(params), jnp.zeros((), jnp.int32))


def train(ds, model, seed, epochs, *, wm=None, cfg=None, params=None, lr=None):
  """Plain training (``wm=None``) or watermark embedding with ``cfg`` = (loss, lam, margin, per_example,
  warmup); ``params`` continues from a model (fine-tuning, overwriting)."""
  tx = optax.adam(_LR.value if lr is None else lr)
  state = None if params is None else _fresh(params, tx)
  extra = None
  if wm is not None:
    loss, lam, margin, per_example, warmup = cfg
    pool = jnp.asarray(ds.x_train[ds.y_train == wm.target_class])
    n = min(_N_TARGET.value, pool.shape[0])

    def extra(p, xb, yb, k):
      xt = pool[jax.random.choice(k, pool.shape[0], (n,), replace=False)]
      return gs.gradsigns_regularizer(lambda x: model.apply({"params": p}, x), xt, wm, lam, loss=loss,
                                      margin=margin, per_example=per_example)
    if warmup and params is None:
      v, _ = models.train_classifier(model, ds, tx, epochs=warmup, batch_size=32, seed=seed)
      state, epochs = _fresh(v["params"], tx), epochs - warmup
  v, h = models.train_classifier(model, ds, tx, epochs=epochs, batch_size=32, seed=seed, loss_extra=extra,
                                 state=state)
  return v, h["test_accuracy"][-1]


def ber(model, v, x, wm):
  return gs.signature_ber(gs.extract_whitebox(lambda xx: model.apply(v, xx), x, wm), wm)


def prune(params, fraction):
  leaves = [l for l in jax.tree_util.tree_leaves(params) if l.ndim > 1]
  thr = jnp.quantile(jnp.concatenate([jnp.abs(l).ravel() for l in leaves]), fraction)
  return jax.tree_util.tree_map(lambda w: jnp.where((w.ndim > 1) & (jnp.abs(w) < thr), 0.0, w), params)


def quantize_weights(params, bits):
  def q(w):
    if w.ndim < 2:
      return w
    return quant.dequantize(quant.quantize(w, bits, axis=tuple(range(w.ndim - 1))))
  return jax.tree_util.tree_map(q, params)


def rel_change(new, old):
  """||new - old|| / ||old|| over all parameters."""
  num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree_util.tree_leaves(new),
                                                          jax.tree_util.tree_leaves(old)))
  return float(np.sqrt(num / sum(float(jnp.sum(b ** 2)) for b in jax.tree_util.tree_leaves(old))))


def summary(x):
  a = np.asarray(x, np.float64)
  return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
          "min": float(a.min()), "max": float(a.max()), "values": a.tolist()}


def main(argv):
  del argv
  ds = data.load_dataset(_DATASET.value, seed=0, data_dir=_DATA_DIR.value or None)
  model = _model(ds)
  out = pathlib.Path(_OUT.value or pathlib.Path(__file__).resolve().parent / "results" /
                     f"gradsigns_{ds.name}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  cfg = (_LOSS.value, _LAMBDA.value, _MARGIN.value, _PER_EXAMPLE.value, _WARMUP.value)
  paper_cfg = ("bce", 1.0, 0.0, False, 0)
  ft_lrs = [float(v) for v in _FT_LRS.value]
  x_test_t = jnp.asarray(ds.x_test[ds.y_test == 0])
  x_train_t = jnp.asarray(ds.x_train[ds.y_train == 0])
  r = {k: [] for k in ("plain_acc", "wm_acc", "ber_whitebox", "ber_whitebox_keyset", "ber_blackbox",
                       "paper_acc", "paper_ber", "false_claim", "owner_claim")}
  attacks, ft_diag = {}, {}

  def record(name, e, a):
    attacks.setdefault(name, {"ber": [], "acc": []})
    attacks[name]["ber"].append(e)
    attacks[name]["acc"].append(a)

  queries = 0
  for seed in range(_SEEDS.value):
    wm = gs.gradsigns_keygen(jax.random.PRNGKey(1000 + seed), ds.input_shape, _BITS.value)
    vp, ap = train(ds, model, seed, _EPOCHS.value)
    vw, aw = train(ds, model, seed, _EPOCHS.value, wm=wm, cfg=cfg)
    r["plain_acc"].append(ap)
    r["wm_acc"].append(aw)
    r["ber_whitebox"].append(ber(model, vw, x_test_t, wm))
    r["ber_whitebox_keyset"].append(ber(model, vw, x_train_t, wm))
    bb, queries = gs.extract_blackbox(lambda x: jax.nn.softmax(model.apply(vw, x)), x_test_t, wm)
    r["ber_blackbox"].append(gs.signature_ber(bb, wm))
    r["owner_claim"].append(gs.verify(bb, wm)._asdict())
    # the plain model of this seed is an independent model for this key
    plain_bits = gs.extract_whitebox(lambda x: model.apply(vp, x), x_test_t, wm)
    r["false_claim"].append(gs.verify(plain_bits, wm)._asdict())
    own = wm._replace(signature=plain_bits)
    for lr in ft_lrs:   # adversary: the full training set, plain cross-entropy, as many epochs as training
      vf, af = train(ds, model, seed + 100, _EPOCHS.value, params=vw["params"], lr=lr)
      record(f"fine-tuning lr={lr:g}", ber(model, vf, x_test_t, wm), af)
      if _FT_DIAG.value:   # the same fine-tuning of the plain model: how stable are its own signs?
        vpf, _ = train(ds, model, seed + 100, _EPOCHS.value, params=vp["params"], lr=lr)
        d = ft_diag.setdefault(f"lr={lr:g}", {"wm_weight_change": [], "plain_weight_change": [],
                                              "plain_own_sign_flips": []})
        d["wm_weight_change"].append(rel_change(vf["params"], vw["params"]))
        d["plain_weight_change"].append(rel_change(vpf["params"], vp["params"]))
        d["plain_own_sign_flips"].append(ber(model, vpf, x_test_t, own))
    for frac in (0.5, 0.8):
      pv = {"params": prune(vw["params"], frac)}
      record(f"pruning {int(frac * 100)}%", ber(model, pv, x_test_t, wm),
             models.evaluate(model, pv, ds.x_test, ds.y_test))
    other = gs.gradsigns_keygen(jax.random.PRNGKey(5000 + seed), ds.input_shape, _BITS.value)
    vo, ao = train(ds, model, seed + 200, _EPOCHS.value, wm=other, cfg=cfg, params=vw["params"])
    record("overwriting (new key, same loss)", ber(model, vo, x_test_t, wm), ao)
    for b in (8, 4):
      qv = {"params": quantize_weights(vw["params"], b)}
      record(f"quantization {b}-bit", ber(model, qv, x_test_t, wm),
             models.evaluate(model, qv, ds.x_test, ds.y_test))
    line = (f"[seed {seed + 1}/{_SEEDS.value}, {time.perf_counter() - t0:.0f}s] plain {ap:.4f} wm {aw:.4f} "
            f"BER wb {r['ber_whitebox'][-1]:.3f} (key set {r['ber_whitebox_keyset'][-1]:.3f}) "
            f"bb {r['ber_blackbox'][-1]:.3f} ({queries} queries)")
    if _PAPER.value:
      va, aa = train(ds, model, seed, _EPOCHS.value, wm=wm, cfg=paper_cfg)
      r["paper_acc"].append(aa)
      r["paper_ber"].append(ber(model, va, x_test_t, wm))
      line += f" | paper BCE lam=1: acc {aa:.4f} BER {r['paper_ber'][-1]:.3f}"
    print(line + "\n  " + ", ".join(f"{k}: BER {d['ber'][-1]:.3f} acc {d['acc'][-1]:.3f}"
                                    for k, d in attacks.items()), flush=True)

  cap = {}
  for lam in [float(v) for v in _CAPACITY_LAMS.value]:
    for n in [int(v) for v in _CAPACITY.value]:
      wm = gs.gradsigns_keygen(jax.random.PRNGKey(77), ds.input_shape, n)
      v, a = train(ds, model, 0, _EPOCHS.value, wm=wm, cfg=(cfg[0], lam) + cfg[2:])
      cap[f"lam={lam:g} N={n}"] = {"lam": lam, "bits": n, "ber": ber(model, v, x_test_t, wm),
                                   "ber_keyset": ber(model, v, x_train_t, wm), "acc": a}
      print(f"  capacity lam={lam:g} N={n}: BER {cap[f'lam={lam:g} N={n}']['ber']:.3f} "
            f"(key set {cap[f'lam={lam:g} N={n}']['ber_keyset']:.3f}) accuracy {a:.4f} "
            f"[{time.perf_counter() - t0:.0f}s]", flush=True)
  largest = {}
  for d in cap.values():
    if d["ber"] == 0.0:
      largest[f"{d['lam']:g}"] = max(largest.get(f"{d['lam']:g}", 0), d["bits"])

  drop = np.asarray(r["plain_acc"]) - np.asarray(r["wm_acc"])
  res = {
      "config": {"dataset": ds.name, "bits": _BITS.value, "carriers": min(6 * _BITS.value, int(np.prod(ds.input_shape))), "loss": cfg[0], "lam": cfg[1],
                 "margin": cfg[2], "per_example": cfg[3], "warmup": cfg[4], "n_target": _N_TARGET.value,
                 "epochs": _EPOCHS.value, "lr": _LR.value, "ft_lrs": ft_lrs, "seeds": _SEEDS.value,
                 "extraction_inputs": int(x_test_t.shape[0]), "queries": queries},
      "plain_acc": summary(r["plain_acc"]), "wm_acc": summary(r["wm_acc"]), "acc_drop": summary(drop),
      "accuracy_comparison_plain_vs_wm": stats.compare(r["plain_acc"], r["wm_acc"])._asdict(),
      "ber_whitebox": summary(r["ber_whitebox"]), "ber_whitebox_keyset": summary(r["ber_whitebox_keyset"]),
      "ber_blackbox": summary(r["ber_blackbox"]), "owner_claim": r["owner_claim"],
      "false_claim": r["false_claim"],
      "attacks": {k: {"ber": summary(d["ber"]), "acc": summary(d["acc"])} for k, d in attacks.items()},
      "fine_tuning_diagnostic": {k: {m: summary(v) for m, v in d.items()} for k, d in ft_diag.items()},
      "capacity": cap, "largest_bits_with_ber0": largest, "seconds": time.perf_counter() - t0,
      "provenance": provenance.record(data_arrays=(ds.x_train, ds.y_train, ds.x_test, ds.y_test),
                                      script=__file__),
  }
  if r["paper_acc"]:
    res["paper_bce_lam1"] = {"acc": summary(r["paper_acc"]), "ber": summary(r["paper_ber"]),
                             "acc_drop": summary(np.asarray(r["plain_acc"]) - np.asarray(r["paper_acc"]))}
  out.write_text(json.dumps(res, indent=1, default=float))
  print(f"\n{ds.name}, N={_BITS.value}, {cfg[0]} lam={cfg[1]:g} margin={cfg[2]:g}, {_SEEDS.value} seeds "
        f"(mean +- std):")
  print(f"  accuracy plain {np.mean(r['plain_acc']):.4f} vs watermarked "
        f"{np.mean(r['wm_acc']):.4f}; drop {drop.mean() * 100:.2f} +- {res['acc_drop']['std'] * 100:.2f} "
        f"points; P(plain > wm) = {res['accuracy_comparison_plain_vs_wm']['p']:.2f}")
  print(f"  BER white-box {np.mean(r['ber_whitebox']):.4f} (owner key set "
        f"{np.mean(r['ber_whitebox_keyset']):.4f}), black-box {np.mean(r['ber_blackbox']):.4f} "
        f"with {queries} queries")
  if r["paper_acc"]:
    print(f"  paper loss (BCE, lam=1): accuracy {np.mean(r['paper_acc']):.4f}, BER "
          f"{np.mean(r['paper_ber']):.4f}")
  for k, d in res["attacks"].items():
    print(f"  {k:34s} BER {d['ber']['mean']:.3f} +- {d['ber']['std']:.3f}  accuracy {d['acc']['mean']:.4f}")
  for k, d in res["fine_tuning_diagnostic"].items():
    print(f"  fine-tuning {k}: relative weight change wm {d['wm_weight_change']['mean']:.3f} plain "
          f"{d['plain_weight_change']['mean']:.3f}; plain model's own signs flipped "
          f"{d['plain_own_sign_flips']['mean']:.3f} (watermark BER {res['attacks'][f'fine-tuning {k}']['ber']['mean']:.3f})")
  print("  independent models claimed:", sum(f["owned"] for f in r["false_claim"]), "of",
        len(r["false_claim"]), "; smallest false-claim probability at their matches:",
        f"{min(f['false_claim_probability'] for f in r['false_claim']):.3g}; owner claimed (black-box):",
        sum(f["owned"] for f in r["owner_claim"]), "of", len(r["owner_claim"]))
  print(f"  largest N with BER 0 per lambda: {largest}")
  print(f"wrote {out} ({res['seconds']:.0f}s)")


if __name__ == "__main__":
  app.run(main)
