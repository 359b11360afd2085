"""SIDCo experiments: (1) achieved density versus target on gradients recorded while training a real model,
for SIDCo (each distribution, adaptive stages), DGC and Top-k; (2) data-parallel training on several
workers (8 simulated workers mapped with jax.vmap and an axis name) with compressed gradients versus no compression.

  python experiments/sidco_eval.py
  python experiments/sidco_eval.py --dataset=digits --steps=400 --seeds=3
  # momentum SGD (the SIDCo authors' optimizer) with DGC momentum correction in the compressed arms
  python experiments/sidco_eval.py --skip_density --optimizer=momentum --seeds=5 --out_name=sidco_mnist1d_momentum
  # the same with one threshold per tensor (the configuration that matches uncompressed accuracy)
  python experiments/sidco_eval.py --skip_density --optimizer=momentum --per_tensor --seeds=5 \
      --arms=none,sidco,topk --out_name=sidco_mnist1d_momentum_per_tensor
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
import numpy as np  # noqa: E402
import optax  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import data, models, stats  # noqa: E402
from mlsys_jax.comm import sparse as sp  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "mnist1d", ["mnist1d", "digits"], "Data set.")
_RATIOS = flags.DEFINE_list("ratios", ["0.1", "0.01", "0.001"], "Target densities for part (1).")
_RECORD = flags.DEFINE_integer("record", 40, "Gradients recorded for part (1).")
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps for part (2).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds for part (2).")
_TRAIN_RATIO = flags.DEFINE_float("train_ratio", 0.01, "Density for part (2).")
_PER_TENSOR = flags.DEFINE_bool("per_tensor", False, "Part (2): one threshold per tensor instead of one "
                                "for the flattened gradient.")
_SKIP_DENSITY = flags.DEFINE_bool("skip_density", False, "Skip part (1).")
_OPT = flags.DEFINE_enum("optimizer", "adam", ["adam", "momentum"], "Part (2): Adam (lr 1e-3) on the "
                         "decompressed gradient, or SGD with momentum 0.9 (lr --lr): uncompressed runs use "
                         "optax.sgd(lr, momentum), compressed ones DGC's momentum correction inside the "
                         "sparsifier followed by plain SGD.")
_LR = flags.DEFINE_float("lr", 0.05, "Learning rate of --optimizer=momentum.")
_WARMUP = flags.DEFINE_integer("warmup_epochs", 0, "Part (2): DGC-style density warm-up over this many "
                              "epochs (25% down to --train_ratio); 0: none.")
_ARMS = flags.DEFINE_list("arms", ["none", "sidco", "topk"], "Part (2) arms.")
_SEED0 = flags.DEFINE_integer("seed_offset", 0, "First seed of part (2).")
_OUT = flags.DEFINE_string("out_dir", "results/sidco", "Output directory.")
_NAME = flags.DEFINE_string("out_name", "results", "Output JSON name (without .json).")


def _setup():
  ds = data.load_mnist1d(seed=0) if _DATASET.value == "mnist1d" else data.load_digits(seed=0)
  model = (models.CNN(dims=1, kernel_size=5, channels=(32, 64)) if ds.name == "mnist1d"
           else models.CNN(channels=(32, 64)))
  return ds, model


def record_gradients(ds, model):
  """Gradients of the CNN along an Adam training run (every 5th step)."""
  params = model.init(jax.random.PRNGKey(0), ds.x_train[:2])["params"]
  tx = optax.adam(1e-3)
  opt = tx.init(params)
  grad = jax.jit(jax.grad(lambda p, x, y: models.cross_entropy(model.apply({"params": p}, x), y)))
  out, step = [], 0
  while len(out) < _RECORD.value:
    for xb, yb in data.batches(ds.x_train, ds.y_train, 64, seed=step):
      g = grad(params, xb, yb)
      if step % 5 == 0:
        out.append(g)
      upd, opt = tx.update(g, opt, params)
      params = optax.apply_updates(params, upd)
      step += 1
      if len(out) >= _RECORD.value:
        break
  return params, out


def density_quality(grads):
  table = {}
  for r in [float(v) for v in _RATIOS.value]:
    # capacity 4k so that the density measures the threshold, not the payload cap
    methods = {f"SIDCo {d}": sp.sidco(r, distribution=d, adapt_every=5, capacity_factor=4.0)
               for d in sp.DISTRIBUTIONS}
    methods["DGC"] = sp.dgc(r, capacity_factor=4.0)
    methods["Top-k"] = sp.topk(r)
    for name, tx in methods.items():
      st = tx.init(grads[0])
      upd = jax.jit(tx.update)
      dens = []
      for g in grads:
        _, st = upd(g, st)
        dens.append(float(st.density) / r)
      d = np.array(dens[len(dens) // 4:])  # after the first quarter (adaptation warm-up)
      a = np.array(dens)                    # every step, the warm-up included
      table.setdefault(str(r), {})[name] = {"mean": float(d.mean()), "min": float(d.min()),
                                            "max": float(d.max()), "all_steps_mean": float(a.mean()),
                                            "all_steps_min": float(a.min()), "all_steps_max": float(a.max()),
                                            "all": dens}
      print(f"  ratio {r:<6g} {name:18s} achieved/target over all steps mean {a.mean():.3f} "
            f"[{a.min():.3f}, {a.max():.3f}]; after the first quarter {d.mean():.3f} "
            f"[{d.min():.3f}, {d.max():.3f}]", flush=True)
  return table


def warmup_schedule(target: float, epochs: int, steps_per_epoch: int) -> list[tuple[float, int]]:
  """DGC's warm-up (Lin et al., ICLR 2018, Sec. 3.3): density decays exponentially from 25% to the target
  over the first ``epochs`` epochs; returns ``[(density, first step), ...]`` ending with the target."""
  phases = [(0.25 * (target / 0.25) ** (i / epochs), i * steps_per_epoch) for i in range(epochs)]
  return phases + [(target, epochs * steps_per_epoch)]


@functools.lru_cache(maxsize=None)
def _make_step(model, make_compressor, density):
  """The optimizer and jitted data-parallel step of one arm at one density, built once and shared by every
  seed (and warm-up phase) that uses it: one compilation each, not one per run."""
  if _OPT.value == "adam":
    opt = optax.adam(1e-3)
  else:
    opt = optax.sgd(_LR.value, momentum=0.9) if make_compressor is None else optax.sgd(_LR.value)
  compressor = None if make_compressor is None else make_compressor(density)
  tx = opt if compressor is None else optax.chain(compressor, opt)
  return tx, models.make_simulated_data_parallel_step(model, tx, axis_name="d",
                                                      average_grads=compressor is None)


def train_parallel(ds, model, make_compressor, seed, workers: int = 8):
  """Data-parallel training with ``workers`` simulated workers.

  The workers are mapped with ``jax.vmap(..., axis_name='d')``: the transforms' collectives (all-gather of
  payloads, pmean) run over the mapped axis exactly as they do over devices in ``shard_map`` (which the
  unit tests cover), without the thread rendezvous of simulated CPU devices, which can stall on a
  loaded 2-core machine. ``make_compressor(density)`` builds the sparsifier (None: uncompressed); with
  ``--warmup_epochs`` the density follows :func:`warmup_schedule`, switching transforms between phases
  while the sparsifier state (residual, velocity, stages, byte counters) carries over: the state does
  not depend on the density, only the static payload capacity of each phase does.
  """
  b = 32
  steps_per_epoch = max(1, len(ds.x_train) // (workers * b))
  r = _TRAIN_RATIO.value
  phases = ([(r, 0)] if make_compressor is None or _WARMUP.value == 0
            else warmup_schedule(r, _WARMUP.value, steps_per_epoch))
  make_step = functools.partial(_make_step, model, make_compressor)
  params = model.init(jax.random.PRNGKey(seed), ds.x_train[:2])["params"]
  tx, step = make_step(phases[0][0])
  # Every worker keeps its own optimizer state (and error-feedback residual).
  state = models.replicate(tx.init(params), workers)
  starts = {s: d for d, s in phases}
  rng = np.random.default_rng(seed)
  for i in range(_STEPS.value):
    if i in starts and i > 0:
      _, step = make_step(starts[i])
    idx = rng.choice(len(ds.x_train), workers * b, replace=False)
    xb = ds.x_train[idx].reshape(workers, b, *ds.x_train.shape[1:])
    yb = ds.y_train[idx].reshape(workers, b)
    params, state = step(params, state, xb, yb)
  acc = models.evaluate(model, {"params": params}, ds.x_test, ds.y_test)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  if make_compressor is None:
    sent = 4.0 * n_params * _STEPS.value          # the uncompressed all-reduce input of one worker
  else:
    sent = float(state[0].total_bytes[0])
  return acc, sent


def main(argv):
  del argv
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  ds, model = _setup()
  t0 = time.perf_counter()
  print(f"(1) density vs target on {_RECORD.value} recorded gradients ({ds.name} CNN)", flush=True)
  quality = {} if _SKIP_DENSITY.value else density_quality(record_gradients(ds, model)[1])
  print(f"(2) data-parallel training with 8 simulated workers, {_STEPS.value} steps "
        f"({time.perf_counter() - t0:.0f}s so far)", flush=True)
  r = _TRAIN_RATIO.value
  pt = _PER_TENSOR.value
  mom = 0.9 if _OPT.value == "momentum" else 0.0
  all_comps = {"none": ("none", None),
               "sidco": (f"SIDCo gpareto {r}", lambda d: sp.sidco(d, distribution="gpareto", axis_name="d",
                                                                  per_tensor=pt, momentum=mom)),
               "topk": (f"Top-k {r}", lambda d: sp.topk(d, axis_name="d", per_tensor=pt, momentum=mom))}
  comps = dict(all_comps[a] for a in _ARMS.value)
  acc, sent = {}, {}
  seeds = list(range(_SEED0.value, _SEED0.value + _SEEDS.value))
  for name, c in comps.items():
    for s in seeds:
      a, b = train_parallel(ds, model, c, s)
      acc.setdefault(name, []).append(a)
      sent.setdefault(name, []).append(b)
    print(f"  {name:22s} accuracy {np.mean(acc[name]):.4f} +- {np.std(acc[name]):.4f}  "
          f"MB sent per device {np.mean(sent[name]) / 1e6:.2f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
  comparisons = {}
  names = list(comps)
  for i, a_name in enumerate(names):
    for b_name in names[i + 1:]:
      diff = np.asarray(acc[a_name]) - np.asarray(acc[b_name])      # paired: same seeds
      boot = np.random.default_rng(0).choice(diff, (2000, len(diff))).mean(1)
      lo, hi = np.quantile(boot, [0.025, 0.975])
      c = stats.compare(acc[a_name], acc[b_name])
      comparisons[f"{a_name} vs {b_name}"] = {
          **c._asdict(), "mean_diff": float(diff.mean()), "mean_diff_ci95": [float(lo), float(hi)]}
      print(f"  {a_name} vs {b_name}: mean difference {diff.mean() * 100:+.2f} pt "
            f"[{lo * 100:+.2f}, {hi * 100:+.2f}] (paired bootstrap); {c}")
  path = out / f"{_NAME.value}.json"
  path.write_text(json.dumps({
      "dataset": ds.name, "per_tensor": _PER_TENSOR.value, "optimizer": _OPT.value,
      "warmup_epochs": _WARMUP.value,
      "lr": _LR.value if _OPT.value == "momentum" else 1e-3, "density_quality": quality,
      "train": {"accuracy": acc, "bytes_per_device": sent, "steps": _STEPS.value, "workers": 8,
                "seeds": seeds},
      "comparisons": comparisons,
      "provenance": provenance.record(data_arrays=(ds.x_train, ds.y_train, ds.x_test, ds.y_test),
                                      script=__file__)}, indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
