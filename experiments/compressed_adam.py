"""Compressed gradients before Adam (issue 18): ``optax.chain(<compressor>, optax.adam(lr))`` against
``optax.adam(lr)``, and the same compressors applied after the local moment update
(``<compressor>(..., precondition=optax.scale_by_adam())`` chained with ``optax.sgd(lr)``, as 1-bit Adam
compresses after the moment update), at the same number of steps, with 8 simulated data-parallel workers.

  python experiments/compressed_adam.py                                   # digits, density 0.01, 5 seeds
  python experiments/compressed_adam.py --ratios=0.01,0.001 --seeds=5 --steps=150
  python experiments/compressed_adam.py --dataset=mnist1d --steps=300
  # density 0.1% (issue 18's recipe): selection on each worker's gradient over its own RMS (Adam-aware),
  # after a gentle warm-up (1% -> 0.25% over 300 steps); DGC with a 10x sample too (dgc@F: sample_fraction F;
  # plain dgc: its default sample, >= 16 entries above the threshold; dgc@0.01: the default before session 8)
  python experiments/compressed_adam.py --dataset=mnist1d --steps=600 --ratios=0.001 --modes=rms \
    --density_warmup=300 --dwarmup_start=0.01 --compressors=sidco,topk,dgc,dgc@0.1
  # the current 0.1% recipe: raw selection in the 1% stage, the RMS selection from the 0.25% stage on
  python experiments/compressed_adam.py --dataset=mnist1d --steps=600 --ratios=0.001 --modes=rmsfrom@1 \
    --density_warmup=300 --dwarmup_start=0.01 --compressors=sidco,topk,dgc,dgc@0.1
  # --eval_every=50: the test accuracy every 50 steps too (the JSON's 'curve')
  # --merge=a.json,b.json --out_name=c: one JSON of two runs (same seeds, equal Adam) with all comparisons
  # hosts without the mnist1d package: MLSYS_JAX_MNIST1D_CACHE=<folder with a pre-generated copy> (data.load_mnist1d)
  # comm.adaptive_ef.decay_residual (error feedback that forgets): --residual_decay=0.99
  # comm.adaptive_ef.spread_releases variants on the plain chain
  python experiments/compressed_adam.py --ratios=0.001 --modes=chain --spread=none,leaky@100,linear@50
  # issue 18's 1% option (session 11): each release spread over min(interval, 16) steps before Adam
  python experiments/compressed_adam.py --dataset=mnist1d --steps=600 --seeds=15 --compressors=sidco \
    --modes=chain --spread=leaky@16 --ratios=0.01
  # 0.1% recipe with the releases of its raw 1% stage (the first 150 steps) spread over min(interval, 16)
  # steps (session 13: spread_releases(..., until=150); 'leaky@16u150')
  python experiments/compressed_adam.py --dataset=mnist1d --steps=600 --ratios=0.001 --modes=rmsfrom@1 \
    --density_warmup=300 --dwarmup_start=0.01 --compressors=topk --spread=leaky@16u150
  # the same with DGC's warm-up from 25% (raw down to 1.56%, the RMS selection from 0.39%) and the RMS stages'
  # releases delivered in gradient units (comm.adaptive_ef.gradient_units; session 13's chosen arm)
  python experiments/compressed_adam.py --dataset=mnist1d --steps=600 --ratios=0.001 --modes=rmsfrom@3 \
    --density_warmup=300 --dwarmup_start=0.25 --compressors=topk --gradient_units=on
  # rate holding (session 17): a release's rate B / T emitted from the release on, with a mass-exact correction
  python experiments/compressed_adam.py --dataset=mnist1d --steps=600 --ratios=0.01 --modes=chain \
    --compressors=topk --spread=rate@16,rate@32 --adam_from=<this host's Adam JSON of the same seeds>
  # staleness-aware selection (session 16): Top-k on |acc| * (1 + age / TAU), values and error feedback as Top-k's
  python experiments/compressed_adam.py --dataset=mnist1d --steps=600 --ratios=0.01 --modes=chain \
    --compressors=stale@8,stale@16,stale@32 --adam_from=experiments/results/compressed_adam_0.01_chain_topk_s9_pooled15.json
  # shared index selection (session 18): ScaleCom's cyclic local Top-k (comm.leader_topk), 1% plain chain and
  # the 0.1% recipe with the leader's selection in every stage
  python experiments/compressed_adam.py --dataset=mnist1d --steps=600 --ratios=0.01 --modes=chain \
    --compressors=leader,topk --adam_from=<this host's Adam JSON of the same seeds>
  python experiments/compressed_adam.py --dataset=mnist1d --steps=600 --ratios=0.001 --modes=rmsfrom@1 \
    --density_warmup=300 --dwarmup_start=0.01 --compressors=leader,topk --adam_from=<...>
  # the same exact-mean exchange on the union of the workers' own Top-k sets (comm.union_topk): --compressors=union
  # screens: --adam_from=<earlier JSON> reuses its Adam accuracies (same data digest, steps, seeds);
  # --modes=decay@0.95: the plain chain with comm.adaptive_ef.decay_residual(c, 0.95) (per arm)

Each seed draws the initialisation and the batch order once and shares them between all arms (paired
trials); comparisons use ``mlsys_jax.stats.compare`` (P(A>B) with its bootstrap interval) and a paired
bootstrap interval of the accuracy difference. Bytes are what one worker passes to the collectives.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import time
from typing import NamedTuple

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import comm, data, models, stats  # noqa: E402
from mlsys_jax.comm import sparse as sp  # noqa: E402
from mlsys_jax.comm.adaptive_ef import (decay_residual, gradient_units, rms_selection,  # noqa: E402
                                        scale_by_frozen_rms, scale_by_leaf_rms, spread_releases,
                                        staleness_topk)
from mlsys_jax.comm.lowrank import _state_field, total_bytes  # noqa: E402
from mlsys_jax.comm.warmup import (dense_warmup, density_warmup, dgc_density_schedule,  # noqa: E402
                                   stage_boundaries)

_DATASET = flags.DEFINE_enum("dataset", "digits", ["mnist1d", "digits"], "Data set.")
_RATIOS = flags.DEFINE_list("ratios", ["0.01"], "Target densities.")
_STEPS = flags.DEFINE_integer("steps", 150, "Training steps (every arm).")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Paired seeds.")
_FIRST_SEED = flags.DEFINE_integer("first_seed", 0, "First seed (seeds first_seed .. first_seed + seeds - 1).")
_LR = flags.DEFINE_float("lr", 1e-3, "Adam learning rate (also of sgd after a preconditioned compressor).")
_WORKERS = flags.DEFINE_integer("workers", 8, "Simulated data-parallel workers.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch per worker.")
_COMPRESSORS = flags.DEFINE_list("compressors", ["sidco", "topk", "dgc"], "Compressors: sidco (its default: "
                                  "exact target count), sidco_fitonly (exact=False: the paper's estimator "
                                  "alone, as before issue 18's fix), topk, dgc, dgc_exact (dgc(exact=True): "
                                  "the payload trimmed to k, Top-k's bytes), randomk (density --ratios); "
                                  "stale@TAU: comm.adaptive_ef.staleness_topk(ratio, tau=TAU) (Top-k on "
                                  "|acc| * (1 + age / TAU), chain/raw selection only); leader: "
                                  "comm.leader_topk (ScaleCom's cyclic local Top-k: every worker sends its "
                                  "values at one rotating leader's Top-k indices; bytes: k values per worker "
                                  "plus k indices on the leader's steps; leader@B: with ScaleCom's memory "
                                  "low-pass filter beta=B); union: comm.union_topk (every worker "
                                  "sends its values on the union of the workers' own Top-k sets: exact means at "
                                  "Top-k's coverage; bytes: k indices + |union| values per worker); "
                                  "powersgd2, powersgd4, accordion (rank 1 <-> 4; every mode: their "
                                  "precondition= since session 29).")
_MODES = flags.DEFINE_list("modes", ["chain", "precondition"], "chain: chain(c, adam); precondition: "
                           "chain(c(precondition=scale_by_adam()), sgd); precondition_adam: "
                           "chain(c(precondition=scale_by_adam()), adam); rms: chain(c(precondition="
                           "scale_by_rms()), adam) (each worker selects and sends its gradient over the RMS "
                           "of its own gradients; rms@0.999: scale_by_rms(decay=0.999)); rmslate: rms in the "
                           "final density stage only; rmsearly: rms in the warm-up stages only; rmspow@P: "
                           "g / rms^P; rmsfreeze@N: comm.adaptive_ef.scale_by_frozen_rms(N); leafrms: "
                           "comm.adaptive_ef.scale_by_leaf_rms() (one scale per tensor); rmsfrom@J: "
                           "precondition=comm.adaptive_ef.rms_selection(stage >= J) inside --density_warmup "
                           "(raw selection in the stages before J, rms from J on; issue 18's 0.1% recipe: "
                           "rmsfrom@1); rmsfromc@J / rmsfromz@J: the same with the residual divided by the RMS "
                           "/ dropped at the switch (screens); decay@D: the plain chain with "
                           "comm.adaptive_ef.decay_residual(c, D) (per arm; --residual_decay sets all arms).")
_SIDCO_DIST = flags.DEFINE_enum("sidco_distribution", "exponential", ["exponential", "gpareto", "gamma"],
                                "SIDCo's fitted distribution (sidco's own default, 'exponential').")
_WARMUP = flags.DEFINE_list("warmup", ["0"], "Dense warm-up steps (comm.dense_warmup) to compare; 0 = none.")
_DWARMUP = flags.DEFINE_list("density_warmup", ["0"], "Density warm-up steps (comm.density_warmup, DGC's "
                              "0.25 -> 0.0625 -> ... schedule down to the target) to compare; 0 = none.")
_DW_START = flags.DEFINE_list("dwarmup_start", ["0.25"], "First densities of --density_warmup to compare (then "
                              "/ 4 per stage while above the target; DGC: 0.25).")
_SPREAD = flags.DEFINE_list("spread", ["none"], "comm.adaptive_ef.spread_releases around the compressor: none, "
                             "leaky, linear, hold, rate (each release delivered as a rate over the interval it "
                             "stands for; rate: held after it, mass-exact); 'leaky@100' sets max_interval 100, "
                             "'rate@16h32' max_interval 16 and hold 32, 'leaky@100f1' also floor 1, "
                             "'leaky@16u150' until=150 (only the releases of steps < 150 spread); "
                             "'matched@64x8s150': mode 'matched' (each release B after T steps spread over "
                             "S = clip(round(8 B^2 / T), 1, min(T, 64)) steps), scale 8, start 150 (the releases "
                             "of earlier steps delivered at once; x and s optional: scale 1, start 0); "
                             "'matched@64x8s150c': the same with consistent=True (only releases with the sign of "
                             "the coordinate's latest delivery are spread).")
_UNITS = flags.DEFINE_list("gradient_units", ["off"], "comm.adaptive_ef.gradient_units around the compressor "
                            "(modes rmsfrom@J with --density_warmup: the releases of the RMS stages delivered "
                            "in gradient units, one factor per leaf): off, on, both (two arms), or freeze (the factor "
                            "of the switch step kept: gradient_units(freeze=True)).")
_SPREAD_MAX = flags.DEFINE_integer("spread_max", 0, "max_interval of spread_releases (0 = no limit).")
_SPREAD_FLOOR = flags.DEFINE_float("spread_floor", 0.0, "floor of spread_releases (0 = none).")
_PER_TENSOR = flags.DEFINE_bool("per_tensor", False, "per_tensor=True in sidco/topk/dgc/randomk (a density "
                                 "target per leaf, at least one entry per leaf).")
_DGC_SAMPLE = flags.DEFINE_float("dgc_sample_fraction", 0.0, "sample_fraction of dgc (0 = dgc's default: 1% of "
                                 "the entries, enlarged to hold >= 16 above the threshold; 0.01 = the old default).")
_DGC_MIN = flags.DEFINE_integer("dgc_min_count", 0, "Screen: sparse.DGC_MIN_SAMPLE_COUNT for dgc's default sample "
                                "(the minimum sampled count above the threshold; 0 = the library's, 16).")
_RES_DECAY = flags.DEFINE_float("residual_decay", 1.0, "comm.adaptive_ef.decay_residual around the compressor "
                                "(1 = plain error feedback).")
_ADAM_FROM = flags.DEFINE_string("adam_from", "", "Screens: take the Adam arm's accuracies from this JSON (a "
                                  "run of the same data, steps and seeds: Adam is deterministic on this CPU; "
                                  "the data digest is checked) instead of training it again.")
_MERGE = flags.DEFINE_list("merge", [], "Merge the result JSONs of runs with the same settings and seeds (their "
                            "Adam arms must agree seed by seed) into --out_dir/--out_name with every paired "
                            "comparison; nothing is trained.")
_COMPARE = flags.DEFINE_list("compare", [], "Extra paired comparisons 'A~B' of two arm names (as in the JSON, e.g. "
                              "'stale@8 0.01 chain~topk 0.01 chain'), added to the JSON's comparisons (with --merge "
                              "too: arms of other runs on the same seeds).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 0, "Also record the test accuracy every N steps (0 = only at "
                                   "the end): the JSON's 'curve' (arm -> per seed, [step, accuracy] pairs).")
_RELEASE_STATS = flags.DEFINE_bool("release_stats", False, "For stale@TAU arms (comm.adaptive_ef.staleness_topk): "
                                    "per leaf, how often the workers' payloads together release each parameter "
                                    "(from the ages in the state): the JSON's 'release_stats' (arm -> seed -> leaf).")
_RELEASED = flags.DEFINE_bool("released_count", False, "Also record, per compressed arm and seed, the mean fraction "
                               "of the parameters that the aggregated update (what reaches the optimizer) holds "
                               "nonzero per step: the JSON's 'released_per_step' (Top-k: the union of the workers' "
                               "sets; leader: the leader's k). A pass-through between the compressor and Adam.")
_DW_FACTOR = flags.DEFINE_float("dwarmup_factor", 4.0, "Density ratio between --density_warmup stages (DGC: 4).")
_OUT = flags.DEFINE_string("out_dir", "results/compressed_adam", "Output directory.")
_NAME = flags.DEFINE_string("out_name", "results", "Output JSON name (without .json).")


def _setup():
  ds = data.load_mnist1d(seed=0) if _DATASET.value == "mnist1d" else data.load_digits(seed=0)
  model = (models.CNN(dims=1, kernel_size=5, channels=(32, 64)) if ds.name == "mnist1d"
           else models.CNN(channels=(32, 64)))
  return ds, model


def make_tx(compressor: str | None, mode: str, ratio: float, lr: float, warmup: int = 0, dwarmup: int = 0,
            stage: int | None = None, spread: str = "none", dw_start: float = 0.25, units: bool = False
            ) -> optax.GradientTransformation:
  """The optimizer of one arm: dense Adam (compressor None), ``chain(c, adam)`` or the preconditioned
  compressor followed by SGD; ``warmup > 0`` wraps the compressor in ``comm.dense_warmup``, ``dwarmup > 0``
  in ``comm.density_warmup`` (DGC's density schedule over the first ``dwarmup`` steps); ``spread`` other than
  'none' wraps the result in ``comm.adaptive_ef.spread_releases(mode=spread)``."""
  if compressor is None:
    return optax.adam(lr)
  if dwarmup:
    sched = dgc_density_schedule(ratio, start=dw_start, factor=_DW_FACTOR.value)
    c = density_warmup(lambda r: _compressor(compressor, mode, r, final=r == ratio,
                                             stage=sched.index(r) if r in sched else len(sched)),
                       ratio, steps=dwarmup, ratios=sched, fixed_stage=stage)
  else:
    c = _compressor(compressor, mode, ratio)
  if units:   # the RMS stages' releases in gradient units (comm.adaptive_ef.gradient_units)
    if not (mode.startswith("rmsfrom@") and dwarmup):
      raise ValueError("--gradient_units needs --modes=rmsfrom@J and --density_warmup.")
    j = int(mode.partition("@")[2])
    ends = stage_boundaries(dwarmup, len(sched))
    c = gradient_units(c, ends[j - 1] if j > 0 else 0, axis_name="d", freeze=units == "freeze")
  if mode.startswith("decay@"):   # per arm: comm.adaptive_ef.decay_residual(c, D) on the plain chain
    c = decay_residual(c, float(mode[6:]))
  elif _RES_DECAY.value != 1.0:
    c = decay_residual(c, _RES_DECAY.value)
  if warmup:
    c = dense_warmup(c, warmup, axis_name="d")
  if spread != "none":
    # 'leaky', 'leaky@50' (max_interval 50), 'leaky@50f1' (floor 1), 'linear@100n0.35' (noise 0.35),
    # 'leaky@16u150' (until=150: only the releases of the first 150 steps spread); 'matched@64x8s150'
    # (session 20: the magnitude-matched spread S = clip(round(8 B^2 / T), 1, min(T, 64)) from step 150 on)
    mode_, _, mx = spread.partition("@")
    mx, _, un = mx.partition("u")
    mx, _, hd = mx.partition("h")   # 'rate@16h32': mode 'rate', hold 32
    mx, _, ns = mx.partition("n")
    mx, _, fl = mx.partition("f")
    mx, cons, tail = mx.partition("c")   # 'matched@64x8s150c': consistent=True (the sign gate)
    if tail:
      raise ValueError(f"--spread={spread!r}: 'c' (consistent) must end the value, as in 'matched@64x8s150c'; "
                       f"got {tail!r} after it.")
    mx, _, st = mx.partition("s")   # 'matched@64x8s150': mode 'matched', cap 64, scale 8, start 150
    mx, _, sc = mx.partition("x")
    if (st or sc or cons) and mode_ != "matched":
      raise ValueError(f"--spread={spread!r}: 's' (start), 'x' (scale) and 'c' (consistent) are for "
                       f"'matched@CAPxSCALEsSTART[c]'.")
    matched = (dict(start=int(st) if st else None, scale=float(sc) if sc else None, consistent=bool(cons))
               if mode_ == "matched" else {})
    c = spread_releases(c, mode=mode_, max_interval=int(mx) if mx else (_SPREAD_MAX.value or None),
                        floor=float(fl) if fl else _SPREAD_FLOOR.value, noise=float(ns) if ns else 0.0,
                        until=int(un) if un else None, hold=int(hd) if hd else None, **matched)
  return optax.chain(c, *([_count_released()] if _RELEASED.value else []),
                     optax.sgd(lr) if mode == "precondition" else optax.adam(lr))


class _ReleasedState(NamedTuple):
  released_sum: jax.Array     # nonzero entries of the updates, summed over the steps
  released_steps: jax.Array   # steps counted


def _count_released() -> optax.GradientTransformation:
  """--released_count: the updates passed through unchanged; their nonzero entries counted in the state."""
  def init(params):
    return _ReleasedState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

  def update(u, s, p=None):
    nz = sum(jnp.sum(x != 0, dtype=jnp.float32) for x in jax.tree_util.tree_leaves(u))
    return u, _ReleasedState(s.released_sum + nz, s.released_steps + 1)
  return optax.GradientTransformation(init, update)


def _rms_state_only(decay: float = 0.9) -> optax.GradientTransformation:
  """``scale_by_rms``'s state, updated, with the gradient passed through unscaled: the warm-up stages of
  mode 'rmslate' (same state layout as the final stage, whose RMS is then warm)."""
  rms = optax.scale_by_rms(decay=decay)
  return optax.GradientTransformation(rms.init, lambda u, s, p=None: (u, rms.update(u, s, p)[1]))


def _scale_by_rms_power(power: float, decay: float = 0.9, eps: float = 1e-8) -> optax.GradientTransformation:
  """``g / rms^power`` (rms: the root of an EMA of g^2, as ``optax.scale_by_rms``): power 1 is
  ``scale_by_rms``, 0 the raw gradient (mode 'rmspow@P')."""
  rms = optax.scale_by_rms(decay=decay, eps=0.0)

  def update(u, s, p=None):
    _, s = rms.update(u, s, p)
    return jax.tree_util.tree_map(lambda g, n: g / (jnp.power(n, power / 2) + eps), u, s.nu), s
  return optax.GradientTransformation(rms.init, update)


def _compressor(compressor: str, mode: str, ratio: float, final: bool = True, stage: int = 0
                ) -> optax.GradientTransformation:
  pre = (rms_selection(stage >= int(mode.partition("@")[2])) if mode.startswith("rmsfrom") else
         _scale_by_rms_power(float(mode[7:])) if mode.startswith("rmspow@") else
         scale_by_frozen_rms(int(mode[10:])) if mode.startswith("rmsfreeze@") else
         optax.scale_by_adam() if mode.startswith("precondition") else
         optax.scale_by_rms(decay=float(mode[4:] or 0.9)) if mode.startswith("rms@") or mode == "rms" else
         (optax.scale_by_rms() if final else _rms_state_only()) if mode == "rmslate" else
         (_rms_state_only() if final else optax.scale_by_rms()) if mode == "rmsearly" else
         scale_by_leaf_rms() if mode == "leafrms" else None)
  pt = _PER_TENSOR.value
  compressor, _, opt = compressor.partition("@")   # 'dgc@0.1': sample_fraction 0.1; 'dgc@0.1c1': capacity 1
  sf, _, cf = opt.partition("c")
  sf = float(sf) if sf else (_DGC_SAMPLE.value or None)
  cf = float(cf) if cf else None
  if compressor in ("leader", "union"):   # comm.leader_topk (ScaleCom's CLT-k) / comm.union_topk (exact means on
    if pt or (opt and compressor == "union"):   # the union of the workers' Top-k sets); 'leader@0.1': beta 0.1
      raise ValueError(f"{compressor} runs over the whole raveled gradient (no --per_tensor); only leader takes "
                       f"an '@' option (leader@B: ScaleCom's memory filter beta B).")
    if compressor == "leader" and opt:
      return comm.leader_topk(ratio, axis_name="d", precondition=pre, beta=float(opt))
    if mode.startswith("precondition"):
      raise ValueError(f"{compressor} runs before Adam with the raw or RMS selection (modes chain, rms*, rmsfrom@J).")
    return (comm.leader_topk if compressor == "leader" else comm.union_topk)(ratio, axis_name="d", precondition=pre)
  if compressor == "stale":   # 'stale@16': staleness-aware Top-k, tau 16 (comm.adaptive_ef.staleness_topk)
    if pre is not None or pt:
      raise ValueError("stale@TAU runs with the raw selection only (modes chain/decay@D, no --per_tensor).")
    if not opt:
      raise ValueError("stale needs its tau: stale@16 (or stale@inf for plain Top-k).")
    return staleness_topk(ratio, tau=float(opt), axis_name="d")
  c = {"sidco": lambda: sp.sidco(ratio, distribution=_SIDCO_DIST.value, axis_name="d", precondition=pre,
                                 per_tensor=pt),
       "sidco_fitonly": lambda: sp.sidco(ratio, distribution=_SIDCO_DIST.value, axis_name="d",
                                         precondition=pre, exact=False, per_tensor=pt),
       "topk": lambda: sp.topk(ratio, axis_name="d", precondition=pre, per_tensor=pt),
       "dgc": lambda: sp.dgc(ratio, axis_name="d", precondition=pre, per_tensor=pt,
                             sample_fraction=sf, capacity_factor=cf),
       # DGC's sampled threshold with its payload trimmed to k slots: at most Top-k's count, Top-k's bytes
       "dgc_exact": lambda: sp.dgc(ratio, axis_name="d", precondition=pre, per_tensor=pt,
                                   sample_fraction=sf, capacity_factor=cf, exact=True),
       "randomk": lambda: sp.randomk(ratio, axis_name="d", precondition=pre, seed=0, per_tensor=pt),
       # low-rank compressors: the density flag does not apply (rank 2 / 4 and ACCORDION's 1 <-> 4 switch)
       "powersgd2": lambda: comm.powersgd(2, axis_name="d", precondition=pre),
       "powersgd4": lambda: comm.powersgd(4, axis_name="d", precondition=pre),
       "accordion": lambda: comm.accordion("powersgd", 4, 1, interval=100, axis_name="d",
                                           precondition=pre)}[compressor]()
  return c


@functools.lru_cache(maxsize=None)
def _step(model, compressor, mode, ratio, warmup, dwarmup=0, stage=None, spread="none", dw_start=0.25,
          units=False):
  """One compiled data-parallel step per arm (per density stage with --density_warmup), shared by all seeds."""
  tx = make_tx(compressor, mode, ratio, _LR.value, warmup, dwarmup, stage, spread, dw_start, units)
  return tx, models.make_simulated_data_parallel_step(model, tx, axis_name="d",
                                                      average_grads=compressor is None)


def train(ds, model, compressor, mode, ratio, seed, warmup=0, dwarmup=0, spread="none", dw_start=0.25,
          units=False):
  """Test accuracy, bytes per worker, the accuracy curve (``--eval_every``), the release statistics
  (``--release_stats``, else ``{}``) and the mean released fraction per step (``--released_count``, else None)
  after ``--steps`` steps of one arm and seed.

  With ``dwarmup`` the density stages run as separately compiled steps (``density_warmup(...,
  fixed_stage=j)``, switched at ``stage_boundaries``) on one carried state: under the simulated workers'
  ``vmap`` the un-fixed transform's ``lax.switch`` would compute every stage on every step (same result,
  tested in tests/test_comm_warmup.py, at ~4x the time)."""
  tx, step = _step(model, compressor, mode, ratio, warmup, dwarmup, spread=spread, dw_start=dw_start, units=units)
  ends = []
  if dwarmup:
    ends = stage_boundaries(dwarmup, len(dgc_density_schedule(ratio, start=dw_start, factor=_DW_FACTOR.value)))
    stage_steps = [_step(model, compressor, mode, ratio, warmup, dwarmup, j, spread, dw_start, units)[1]
                   for j in range(len(ends) + 1)]
  w, b = _WORKERS.value, _BATCH.value
  params = model.init(jax.random.PRNGKey(seed), ds.x_train[:2])["params"]
  state = models.replicate(tx.init(params), w)
  rng = np.random.default_rng(seed)
  curve = []
  track = _ReleaseTracker(params) if _RELEASE_STATS.value and _state_field(state, "age") is not None else None
  for t in range(_STEPS.value):
    if dwarmup:
      j = sum(t >= e for e in ends)
      step = stage_steps[j]
      if mode[:9] in ("rmsfromc@", "rmsfromz@") and t > 0 and j == int(mode[9:]) and t == ends[j - 1]:
        state = _residual_over_rms(state, zero=mode[7] == "z")   # raw residual -> rms units (or dropped)
    idx = rng.choice(len(ds.x_train), w * b, replace=False)
    params, state = step(params, state, ds.x_train[idx].reshape(w, b, *ds.x_train.shape[1:]),
                         ds.y_train[idx].reshape(w, b))
    if track is not None:
      track.update(t, _state_field(state, "age"))
    if _EVAL_EVERY.value and (t + 1) % _EVAL_EVERY.value == 0 and t + 1 < _STEPS.value:
      curve.append([t + 1, float(models.evaluate(model, {"params": params}, ds.x_test, ds.y_test))])
  off = _state_field(state, "off_schedule_steps")
  off = 0 if off is None else int(np.max(np.asarray(off)))
  if off:   # the stage dispatch above must follow the counter
    raise RuntimeError(f"density_warmup ran {off} steps at a stage other than its step counter's: the "
                       f"fixed_stage steps were switched at the wrong steps.")
  acc = models.evaluate(model, {"params": params}, ds.x_test, ds.y_test)
  if compressor is None:
    sent = 4.0 * sum(x.size for x in jax.tree_util.tree_leaves(params)) * _STEPS.value
  else:
    sent = total_bytes(state)   # worker 0's count (the wrapper's total when warmed up)
  last = _state_field(state, "last")   # spread_releases: the fraction of parameters ever released
  if last is not None:
    ever = [np.asarray(x)[0] >= 0 for x in jax.tree_util.tree_leaves(last)]
    print(f"    released at least once: {sum(e.sum() for e in ever) / sum(e.size for e in ever):.3f} of the "
          f"parameters; per leaf {[round(float(e.mean()), 3) for e in ever]}", flush=True)
  releases = track.summary(_STEPS.value) if track is not None else {}
  rel_sum = _state_field(state, "released_sum")
  released = None
  if rel_sum is not None:   # worker 0's count (the update is the same on every worker)
    n_par = sum(x.size for x in jax.tree_util.tree_leaves(params))
    released = float(np.asarray(rel_sum).reshape(-1)[0]) / (
        float(np.asarray(_state_field(state, "released_steps")).reshape(-1)[0]) * n_par)
  return acc, sent, curve + [[_STEPS.value, float(acc)]], releases, released


class _ReleaseTracker:
  """--release_stats: per parameter, the steps at which any worker sent it (a worker's age is 0 right after
  it sent the entry), the waits between releases and how many were never released."""

  def __init__(self, params):
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    self.names = [jax.tree_util.keystr(p) for p, _ in leaves]
    self.last = [np.full(np.size(x), -1, np.int64) for _, x in leaves]
    self.count = [np.zeros(np.size(x), np.int64) for _, x in leaves]
    self.waits = [np.zeros(0, np.int64) for _ in leaves]

  def update(self, t, age):
    for j, a in enumerate(jax.tree_util.tree_leaves(age)):
      rel = np.any(np.asarray(a).reshape(a.shape[0], -1) == 0, axis=0)   # (workers, n) -> any worker sent
      self.waits[j] = np.concatenate([self.waits[j], t - self.last[j][rel]])
      self.last[j][rel] = t
      self.count[j] += rel

  def summary(self, steps):
    return {n: {"size": int(c.size), "never_released": float(np.mean(c == 0)),
                "steps_per_release": float(steps * c.size / max(1, c.sum())),
                "wait_median": float(np.median(w)) if w.size else None,
                "wait_p90": float(np.quantile(w, 0.9)) if w.size else None}
            for n, c, w in zip(self.names, self.count, self.waits)}


def _residual_over_rms(state, eps: float = 1e-8, zero: bool = False):
  """Mode 'rmsfromc@J': at the switch to the rms selection, divide the error-feedback residual (held in
  raw gradient units) by the worker's RMS, the units it is accumulated in from then on; 'rmsfromz@J':
  drop it (screens)."""
  dw, rest = state[0], state[1:]
  inner = dw.inner_state
  nu = inner.precondition.nu
  res = jax.tree_util.tree_map(lambda r, n: 0 * r if zero else r / (jnp.sqrt(n) + eps), inner.residual, nu)
  return (dw._replace(inner_state=inner._replace(residual=res)),) + tuple(rest)


def _compare(a, b):
  diff = np.asarray(a) - np.asarray(b)
  boot = np.random.default_rng(0).choice(diff, (2000, len(diff))).mean(1)
  lo, hi = np.quantile(boot, [0.025, 0.975])
  c = stats.compare(a, b)
  return {**c._asdict(), "mean_diff": float(diff.mean()), "mean_diff_ci95": [float(lo), float(hi)]}


def _comparisons(acc, extra=()):
  """Paired comparisons of the arms: every arm against Adam, every compressor arm against Top-k at the same
  ratio and mode, and every 'dgc@F' / 'dgc[minM]' arm against the plain 'dgc' arm (its default sample)."""
  comparisons = {}

  def add(name, ref):
    comparisons[f"{name} vs {ref}"] = c = _compare(acc[name], acc[ref])
    print(f"  {name} vs {ref}: {c['mean_diff'] * 100:+.2f} pt [{c['mean_diff_ci95'][0] * 100:+.2f}, "
          f"{c['mean_diff_ci95'][1] * 100:+.2f}]; P(A>B) {c['p']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]",
          flush=True)

  for name in acc:
    if name != "adam":
      add(name, "adam")
  for name in acc:
    rest = name[name.index(" "):] if " " in name else None
    for ref in ("topk" + rest, "dgc" + rest) if rest else ():
      if ref in acc and ref != name and (ref.startswith("topk") or name.startswith(("dgc@", "dgc["))):
        add(name, ref)
  for name, ref in _compare_pairs(extra, acc):   # --compare='A~B'
    add(name, ref)
  return comparisons


def _compare_pairs(extra, arms) -> list:
  """The --compare='A~B' values as (A, B) pairs, checked against the arm names ``arms`` (ValueError naming the
  arms otherwise); main() calls it before training, so a typo does not cost the whole run."""
  pairs = []
  for pair in extra:
    name, sep, ref = pair.partition("~")
    if not sep or name not in arms or ref not in arms:
      raise ValueError(f"--compare={pair!r}: pass 'A~B' with A and B among the arms {sorted(arms)}.")
    pairs.append((name, ref))
  return pairs


_MERGE_SAME = ("dataset", "steps", "workers", "batch", "lr", "sidco_distribution", "per_tensor", "dgc_sample_fraction",
               "dwarmup_factor", "residual_decay", "spread_max", "spread_floor")   # not in the arm names


def check_same_settings(base, run, names, why: str = ""):
  """Refuse (ValueError naming ``names[1]``, each setting and both values) a run whose settings outside the arm
  names (``_MERGE_SAME``: data set, steps, workers, batch, lr and the flags the arm names do not carry) differ from
  ``base``'s (a setting recorded by only one of the two is not compared). Used by --merge and by the pools of
  ``experiments/results/compressed_adam_pool.py``: runs put together may differ in their seeds only."""
  other = [f"{k}={run[k]!r} ({names[0]}: {base[k]!r})" for k in _MERGE_SAME
           if k in run and k in base and run[k] != base[k]]
  if other:
    raise ValueError(f"{names[1]}: run with other settings than {names[0]}: {', '.join(other)}; {why}")


def check_same_dgc_sample(base, run, names, why: str = ""):
  """Refuse (ValueError naming ``names[1]`` and both settings) a run whose DGC arms were trained with another
  default sample (``dgc_default_sample``: the sampled fraction and minimum count of ``dgc``'s threshold estimate,
  changed in session 18) than ``base``'s, where both runs hold DGC arms and record it (older runs do not: not
  compared). --merge keeps such runs apart by renaming the arms (``dgc[minM] ...``); a pool would count their seeds
  as one setting's."""
  dgc = lambda r: any(a.startswith("dgc") for a in r.get("accuracy", {}))   # noqa: E731
  a, b = base.get("dgc_default_sample"), run.get("dgc_default_sample")
  if dgc(base) and dgc(run) and a is not None and b is not None and a != b:
    raise ValueError(f"{names[1]}: DGC arms trained with another default sample than {names[0]}'s: {b} ({names[0]}: "
                     f"{a}); {why}")


_PER_ARM = ("curve", "released_per_step", "release_stats", "mb_per_worker")   # run-JSON entries keyed by arm name


def merge(paths, out_path, compare=()):
  """One JSON from several runs' JSONs (same seeds, Adam equal seed by seed, so every arm is paired); the entries
  keyed by arm (accuracy, bytes, and ``_PER_ARM``: curves, release statistics) come from every run."""
  runs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
  base = runs[0]
  acc, sent = {}, {}
  per_arm = {k: {} for k in _PER_ARM if any(k in r for r in runs)}   # (every run's, not only the first's)
  for p, r in zip(paths, runs):
    provenance.check_same_data(base, r, names=(paths[0], p))   # ValueError: trained on other data
    # settings that the arm names do not carry: the merged JSON records base's, so they must agree
    check_same_settings(base, r, (paths[0], p), why=(
        f"its arms would be labelled with {paths[0]}'s settings. Merge only runs of the same settings (compare "
        f"the others with --adam_from or in a pool that keeps each run's settings)."))
    if r["seeds"] != base["seeds"] or r["accuracy"]["adam"] != base["accuracy"]["adam"]:
      raise ValueError(f"{p}: seeds {r['seeds']} / Adam {r['accuracy']['adam']} differ from {paths[0]}'s "
                       f"({base['seeds']} / {base['accuracy']['adam']}); its arms are not paired with the others.")
    # a run whose dgc default sample differs from the library's now: its 'dgc ...' arms become 'dgc[minM] ...'
    m = r.get("dgc_default_sample", {}).get("min_count")
    tag = f"dgc[min{m}]" if m is not None and m != sp.DGC_MIN_SAMPLE_COUNT else "dgc"
    for name in r["accuracy"]:
      new = tag + name[3:] if name.startswith("dgc ") else name
      if new in acc and name != "adam":
        raise ValueError(f"{p}: arm {new!r} is in two of the merged runs.")
      acc[new], sent[new] = r["accuracy"][name], r["bytes_per_worker"][name]
    for key, into in per_arm.items():
      for name, v in r.get(key, {}).items():
        into.setdefault(tag + name[3:] if name.startswith("dgc ") else name, v)   # (Adam's: the first run's)
  merged = {**base, **per_arm, "compressors": [c for r in runs for c in r["compressors"]], "accuracy": acc,
            "bytes_per_worker": sent, "comparisons": _comparisons(acc, compare), "merged_from": list(paths),
            "dgc_default_sample": {"base_fraction": sp.DGC_BASE_SAMPLE_FRACTION, "min_count": sp.DGC_MIN_SAMPLE_COUNT}}
  pathlib.Path(out_path).write_text(json.dumps(merged, indent=1))
  print(f"wrote {out_path}", flush=True)


_UNITS_ARMS = {"off": [False], "on": [True], "both": [False, True], "freeze": ["freeze"]}


def _units_arms(values) -> list:
  """The gradient-units settings of the arms for ``--gradient_units`` (exactly one of off / on / both / freeze;
  ValueError otherwise: a list such as ``on,off`` ran only its first value, silently, before session 44)."""
  if len(values) != 1 or values[0] not in _UNITS_ARMS:
    raise ValueError(f"--gradient_units takes one of {sorted(_UNITS_ARMS)}, got {','.join(values)!r}; for both "
                     "arms pass --gradient_units=both.")
  return _UNITS_ARMS[values[0]]


def main(argv):
  del argv
  _units_arms(_UNITS.value)   # (before any training: a bad value does not cost the run)
  if _DGC_MIN.value:
    sp.DGC_MIN_SAMPLE_COUNT = _DGC_MIN.value
  if _MERGE.value:
    merge(_MERGE.value, pathlib.Path(_OUT.value) / f"{_NAME.value}.json", _COMPARE.value)
    return
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  ds, model = _setup()
  seeds = list(range(_FIRST_SEED.value, _FIRST_SEED.value + _SEEDS.value))
  t0 = time.perf_counter()
  arms = [] if _ADAM_FROM.value else [("adam", None, "dense", 1.0, 0, 0, "none", 0.25, False)]
  units_arms = _units_arms(_UNITS.value)
  for r in [float(v) for v in _RATIOS.value]:
    for c in _COMPRESSORS.value:
      for m in _MODES.value:
        for w in [int(v) for v in _WARMUP.value]:
          for dw in [int(v) for v in _DWARMUP.value]:
            for st in ([float(v) for v in _DW_START.value] if dw else [0.25]):
              for sp_ in _SPREAD.value:
                for un in units_arms:
                  arms.append((f"{c} {r:g} {m}" + (f" warmup{w}" if w else "") + (f" dwarmup{dw}" if dw else "")
                               + (f" start{st:g}" if st != 0.25 else "")
                               + {False: "", True: " units", "freeze": " unitsfrozen"}[un]
                               + (f" spread-{sp_}" if sp_ != "none" else ""), c, m, r, w, dw, sp_, st, un))
  _compare_pairs(_COMPARE.value, ["adam"] + [a[0] for a in arms])   # before any training
  acc, sent, curves, releases, released = {}, {}, {}, {}, {}
  if _ADAM_FROM.value:
    acc["adam"], sent["adam"] = _adam_from(_ADAM_FROM.value, ds, seeds)
  for i, s in enumerate(seeds):   # seed-major, the JSON rewritten after every seed (a stopped run keeps them)
    for name, c, m, r, w, dw, sp_, st, un in arms:
      a, b, cv, rel, frac = train(ds, model, c, m, r, s, w, dw, sp_, st, un)
      if frac is not None:
        released.setdefault(name, []).append(frac)
      if _EVAL_EVERY.value:
        curves.setdefault(name, []).append(cv)
      acc.setdefault(name, []).append(a)
      if rel:
        releases.setdefault(name, {})[str(s)] = rel
      sent.setdefault(name, []).append(b)
      print(f"  seed {s} {name:28s} accuracy {a:.4f}  MB per worker {b / 1e6:.3f}  "
            + (f"released per step {frac:.5f}  " if frac is not None else "")
            + f"({time.perf_counter() - t0:.0f}s)", flush=True)
      if rel:
        print("    releases (steps per release, never, wait median / p90): " + "; ".join(
            f"{k} {v['steps_per_release']:.1f}, {v['never_released']:.3f}, {v['wait_median']} / {v['wait_p90']}"
            for k, v in rel.items()), flush=True)
    _write(out, ds, seeds[:i + 1], acc, sent, {}, curves, releases, released)
  for name in acc:
    print(f"  {name:28s} accuracy {np.mean(acc[name]):.4f} +- {np.std(acc[name]):.4f}  MB per worker "
          f"{np.mean(sent[name]) / 1e6:.3f}", flush=True)
  comparisons = _comparisons(acc, _COMPARE.value)
  _write(out, ds, seeds, acc, sent, comparisons, curves, releases, released)


def _adam_from(path, ds, seeds):
  """Adam's accuracies (and bytes) for ``seeds`` from an earlier run's JSON (plain or pooled by
  compressed_adam_pool.py), after checking it trained on the same data and steps."""
  ref = json.loads(pathlib.Path(path).read_text())
  ref = ref.get(ds.name, ref)   # a pooled JSON holds one entry per data set
  digest = provenance.record(data_arrays=(ds.x_train, ds.y_train, ds.x_test, ds.y_test),
                             script=__file__).get("data_sha256")
  if ref.get("provenance", {}).get("data_sha256") not in (None, digest):
    raise ValueError(f"--adam_from={path}: trained on other data (digest differs).")
  cfg = ref
  if "steps" not in ref and ref.get("files"):   # a pooled entry: the settings of the first run it pooled
    cfg = json.loads((pathlib.Path(path).parent / ref["files"][0]).read_text())
  wrong = [f"{k}={cfg.get(k)!r} (this run: {v!r})" for k, v in (
      ("dataset", ds.name), ("steps", _STEPS.value), ("workers", _WORKERS.value), ("batch", _BATCH.value),
      ("lr", _LR.value)) if cfg.get(k) != v]
  if wrong:
    raise ValueError(f"--adam_from={path}: its Adam arm was trained with other settings or does not record them: "
                     f"{', '.join(wrong)}; pass a JSON of a run with this run's --dataset, --steps, --workers, "
                     f"--batch and --lr, or drop --adam_from to train Adam here.")
  adam = ref["accuracy"]["adam"] if "accuracy" in ref else ref["adam"]
  sent = (ref.get("bytes_per_worker") or ref.get("mb_per_worker"))["adam"]
  by_seed = dict(zip(ref["seeds"], zip(adam, sent)))
  missing = [s for s in seeds if s not in by_seed]
  if missing:
    raise ValueError(f"--adam_from={path}: no Adam accuracy for seeds {missing}.")
  return [by_seed[s][0] for s in seeds], [by_seed[s][1] for s in seeds]


def _write(out, ds, seeds, acc, sent, comparisons, curves=None, releases=None, released=None):
  path = out / f"{_NAME.value}.json"
  path.write_text(json.dumps({
      "dataset": ds.name, "steps": _STEPS.value, "workers": _WORKERS.value, "batch": _BATCH.value,
      "lr": _LR.value, "sidco_distribution": _SIDCO_DIST.value, "warmup": [int(v) for v in _WARMUP.value],
      "density_warmup": [int(v) for v in _DWARMUP.value], "dwarmup_start": [float(v) for v in _DW_START.value],
      "dwarmup_factor": _DW_FACTOR.value, "per_tensor": _PER_TENSOR.value, "dgc_sample_fraction": _DGC_SAMPLE.value,
      "dgc_default_sample": {"base_fraction": sp.DGC_BASE_SAMPLE_FRACTION, "min_count": sp.DGC_MIN_SAMPLE_COUNT},
      "residual_decay": _RES_DECAY.value, "adam_from": _ADAM_FROM.value, "spread": _SPREAD.value,
      "spread_max": _SPREAD_MAX.value,
      "spread_floor": _SPREAD_FLOOR.value,
      "compressors": _COMPRESSORS.value, "modes": _MODES.value,
      "seeds": seeds, "ratios": [float(v) for v in _RATIOS.value],
      "accuracy": acc, "bytes_per_worker": sent, "comparisons": comparisons,
      "provenance": provenance.record(data_arrays=(ds.x_train, ds.y_train, ds.x_test, ds.y_test),
                                      script=__file__),
      **({"curve": curves} if curves else {}), **({"release_stats": releases} if releases else {}),
      **({"released_per_step": released} if released else {})}, indent=1))
  print(f"wrote {path}", flush=True)


if __name__ == "__main__":
  app.run(main)
