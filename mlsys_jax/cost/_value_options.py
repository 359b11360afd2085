"""Per-program XLA option choice from a learned value model (issue 24 item 2b).

Steiner, Cummins, He, Leather, "Value Learning for Throughput Optimization of Deep Learning Workloads"
(MLSys 2021), Sec. 3-4: a decision is taken from the *predicted* value of its outcome, with no run on
the target. Here the decision is one per program: which XLA option set (``default``, ``autotune0``,
``no_triton_gemm``, ``no_multi_output_fusion``, ``no_fusion``, ... -- the variants of
``experiments/cost_collect.py``) to compile it with. Each candidate is the program compiled under that
option (its optimized HLO: compiling is allowed, timing is not); the model predicts
``log(runtime(option) / runtime(default))`` from the candidate's program features
(:func:`mlsys_jax.cost.program_features` of its HLO graph, XLA's cost analysis), their difference to
the default compilation's, :func:`compile_decision_features` (what XLA decided: tuned cuDNN algorithms,
cuBLAS vs Triton GEMMs, fusion kinds), a roofline estimate and a one-hot of the option, and the option
with the lowest prediction is chosen. Options whose compiled HLO equals an earlier option's were dropped at
collection, so a program's candidates are its *distinct* compilations and the measured best over them
is the exhaustive best.

Training: an ensemble of small flax MLPs, Huber loss on the log-ratio plus a pairwise ranking loss
within each program (the ranking matters, not the scale). The choice is uncertainty-aware: a
candidate's score is the members' mean plus ``pessimism`` times their standard deviation, so an option
the members disagree on (typically one outside what training covered) does not replace the default.
Out of distribution: a candidate whose features lie more than ``ood_margin`` of the training range
outside it is flagged; :func:`choose` can keep the default for such a program, and the hybrid
(:func:`hybrid_choice`) measures all of its candidates.

Timing noise: the dataset holds 188 programs whose ``default`` and ``autotune0`` compilations are the
same program (they differ only in an empty ``backend_config`` annotation, :func:`canonical_hlo`), yet
their medians differ by more than 5% in 69% of them. :func:`option_data` therefore also gives
``runtime_pooled``: the geometric mean over compilations that are the same program, the best estimate
of one program's runtime; both are reported.

Example:
  >>> import numpy as np
  >>> x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
  >>> y = np.array([0.0, -0.3, 0.2, 0.0, 0.1, -0.05]); grp = np.array([0, 0, 0, 1, 1, 1])
  >>> m = fit_option_model(x, y, grp, OptionConfig(steps=50, ensemble=1, hidden=8))
  >>> pick = choose(predict_gain(m, x), grp)     # {program: chosen row}
  >>> sorted(pick), pick[0] in (0, 1, 2), pick[1] in (3, 4, 5)
  ([0, 1], True, True)
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax._checks import check_int, check_range

_TRIVIAL_BC = (', backend_config={"device_type":"DEVICE_TYPE_INVALID","force_earliest_schedule":false,'
               '"native_emitter_backend_config":{"type":"NATIVE_EMITTER_TYPE_INVALID","unroll_factor":0},'
               '"operation_queue_id":"0","reification_cost":[]}')
_FINGERPRINT = re.compile(r'fingerprint_before_lhs="[0-9a-f]*"')


def canonical_hlo(text: str) -> str:
  """``text`` without what does not change the compiled program: the module fingerprint and the
  empty (all-default) fusion ``backend_config`` that XLA's autotuner pass writes or leaves out.

  >>> a = 'f = f32[4]{0} fusion(x), kind=kLoop, calls=%c' + _TRIVIAL_BC
  >>> canonical_hlo(a) == canonical_hlo('f = f32[4]{0} fusion(x), kind=kLoop, calls=%c')
  True
  """
  return _FINGERPRINT.sub("", text.replace(_TRIVIAL_BC, ""))


_DECISIONS = (
    ("cudnn_conv", re.compile(r'custom_call_target="__cudnn\$conv')),
    ("cudnn_conv_tuned", re.compile(r'"cudnn_conv_backend_config":\{[^{}]*"algorithm":\{')),
    ("cublas", re.compile(r'custom_call_target="__cublas\$')),
    ("cublas_lt", re.compile(r'custom_call_target="__cublas\$lt')),
    ("gemm_algo_unset", re.compile(r'"selected_algorithm":"-1"')),
    ("gemm_epilogue", re.compile(r'"epilogue":"(?!DEFAULT)')),
    ("triton_gemm", re.compile(r'"kind":"__triton_gemm"')),
    ("triton_fusion", re.compile(r'"kind":"__triton"')),
    ("triton_nested", re.compile(r'"kind":"__triton_nested')),
    ("custom_fusion", re.compile(r'"kind":"__custom_fusion"')),
    ("cudnn_fusion", re.compile(r'"kind":"__cudnn')),
    ("async_start", re.compile(r'-start\(')),
    ("while", re.compile(r' while\(')),
    ("kLoop", re.compile(r'kind=kLoop')),
    ("kInput", re.compile(r'kind=kInput')),
    ("kCustom", re.compile(r'kind=kCustom')),
    ("kOutput", re.compile(r'kind=kOutput')),
)
COMPILE_DECISIONS = tuple(n for n, _ in _DECISIONS) + (
    "cudnn_conv_untuned", "share_conv_untuned", "share_gemm_triton", "share_gemm_epilogue")


def compile_decision_features(text: str) -> np.ndarray:
  """log1p counts of what XLA decided when compiling: cuDNN convolutions (and how many carry an
  autotuned algorithm), cuBLAS calls (algorithm left unset, fused epilogues), Triton GEMM / Triton /
  cuDNN fusions, fusion kinds, async ops, loops; then the shares (in [0, 1], so that they transfer
  between programs of different sizes) of convolutions without a tuned algorithm, of GEMMs run by
  Triton, and of cuBLAS GEMMs with a fused epilogue. float32 [len(COMPILE_DECISIONS)].

  >>> v = compile_decision_features('c = f32[2] custom-call(a), custom_call_target="__cudnn$convForward"')
  >>> round(float(v[COMPILE_DECISIONS.index("cudnn_conv_untuned")]), 3)
  0.693
  """
  c = {n: len(rx.findall(text)) for n, rx in _DECISIONS}
  c["cudnn_conv_untuned"] = max(c["cudnn_conv"] - c["cudnn_conv_tuned"], 0)
  shares = [c["cudnn_conv_untuned"] / max(c["cudnn_conv"], 1),
            c["triton_gemm"] / max(c["triton_gemm"] + c["cublas"], 1),
            c["gemm_epilogue"] / max(c["cublas"], 1)]
  counts = np.log1p(np.asarray([c[n] for n in COMPILE_DECISIONS[:len(c)]], np.float64))
  return np.concatenate([counts, shares]).astype(np.float32)


_BASE_PROGRAM_FEATURES = 12  # the leading size/count columns of program_features (then opcode counts)


class OptionData(NamedTuple):
  """One row per (program, distinct compilation). ``x`` [R, F] candidate features; ``y`` [R] measured
  log(runtime / runtime of the program's default); ``group`` [R] program id; ``option`` [R] index into
  ``options``; ``family`` [R]; ``runtime_s`` [R] medians; ``runtime_pooled`` [R] (same-program
  compilations pooled, geometric mean); ``noisy`` [R] the collection's noise flag."""
  x: np.ndarray
  y: np.ndarray
  group: np.ndarray
  option: np.ndarray
  family: np.ndarray
  runtime_s: np.ndarray
  runtime_pooled: np.ndarray
  noisy: np.ndarray
  options: tuple
  feature_names: tuple


def _roofline_s(flops, nbytes, meta: dict) -> np.ndarray:
  pf = float(meta.get("matmul_float32_flops_per_s", 4e14))
  pb = float(meta.get("copy_bytes_per_s", 3e12))
  fl = np.maximum(np.asarray(flops, np.float64), 0.0)
  by = np.maximum(np.asarray(nbytes, np.float64), 0.0)
  return np.maximum(fl / pf, by / pb) + float(meta.get("dispatch_floor_s", 5e-6))


def option_data(ds, program_features_fn=None) -> OptionData:
  """Candidate features and targets from a :class:`~mlsys_jax.cost.CostDataset` (rows grouped by
  ``group``; every group needs its ``default`` row). ``program_features_fn(i) -> vector`` overrides
  the per-row program features (default: parse row ``i``'s HLO, :func:`program_features`). A dataset
  merged from several devices (:func:`mlsys_jax.cost.dataset.merge_datasets`) gets each row's roofline
  from its device's peaks and a one-hot of the device as the last features (``device_<kind>``)."""
  from mlsys_jax.cost import features, graph, hlo  # local: keeps this module light to import

  n = len(ds)
  if n == 0:
    raise ValueError("option_data needs a non-empty dataset.")
  variants = [v[0] for v in ds.meta.get("variants", [])] or sorted(set(map(str, ds.variant)))
  options = tuple(variants)
  opt_id = {o: i for i, o in enumerate(options)}
  unknown = sorted(set(map(str, ds.variant)) - set(opt_id))
  if unknown:
    raise ValueError(f"rows have variants {unknown} that ds.meta['variants'] does not list ({list(options)}); "
                     "add them to meta['variants'] or drop those rows (ds.select).")
  if program_features_fn is None:
    def program_features_fn(i):
      g = graph.program_graph(hlo.parse_hlo(ds.hlo[i]))
      return features.program_features(g, {"flops": ds.flops[i], "bytes accessed": ds.bytes_accessed[i],
                                            "transcendentals": ds.transcendentals[i]})
  pf = np.stack([np.asarray(program_features_fn(i), np.float32) for i in range(n)])
  dec = np.stack([compile_decision_features(t) for t in ds.hlo])
  # Several devices (a merged dataset, mlsys_jax.cost.dataset.merge_datasets): each row's roofline from
  # its device's measured peaks, and the device as a one-hot feature (rows of different GPUs are never
  # mixed silently). One device: the features of before.
  from mlsys_jax.cost.dataset import row_devices
  devs = row_devices(ds)
  udev = sorted(set(devs.tolist()))
  dmeta = ds.meta.get("device_meta") or {}
  roof = np.empty(n)
  for dv in udev:
    sel = devs == dv
    roof[sel] = np.log(_roofline_s(ds.flops[sel], ds.bytes_accessed[sel], dmeta.get(dv, ds.meta)))
  rows_of: dict[int, list[int]] = {}
  for i, gid in enumerate(ds.group):
    rows_of.setdefault(int(gid), []).append(i)
  default_row = np.full(n, -1)
  for gid, rows in rows_of.items():
    d = [i for i in rows if str(ds.variant[i]) == "default"]
    if len(d) != 1:
      raise ValueError(f"program group {gid} has {len(d)} 'default' rows; option choice needs exactly one.")
    default_row[rows] = d[0]
  rt = np.asarray(ds.runtime_s, np.float64)
  if not np.all(np.isfinite(rt) & (rt > 0)):
    raise ValueError("runtime_s must be positive and finite for every row (drop failed rows first).")
  pooled = rt.copy()
  for rows in rows_of.values():
    canon = {}
    for i in rows:
      canon.setdefault(canonical_hlo(ds.hlo[i]), []).append(i)
    for same in canon.values():
      if len(same) > 1:
        pooled[same] = np.exp(np.mean(np.log(rt[same])))
  onehot = np.eye(len(options), dtype=np.float32)[[opt_id[str(v)] for v in ds.variant]]
  # Absolute features: only the size-like base of program_features and the decision features (the
  # opcode histogram of a family never seen makes every candidate look out of range); differences to
  # the default compilation: all of them.
  nb = min(_BASE_PROGRAM_FEATURES, pf.shape[1])
  full = np.concatenate([pf, dec], 1)
  dev_hot = (np.asarray(devs)[:, None] == np.asarray(udev)[None, :]).astype(np.float32) if len(udev) > 1 \
      else np.zeros((n, 0), np.float32)
  x = np.concatenate([pf[:, :nb], dec, full - full[default_row], onehot,
                      np.stack([roof, roof - roof[default_row]], 1).astype(np.float32), dev_hot], 1)
  names = tuple([f"program_{j}" for j in range(nb)] + list(COMPILE_DECISIONS)
                + [f"d_program_{j}" for j in range(pf.shape[1])] + [f"d_{k}" for k in COMPILE_DECISIONS]
                + [f"option_{o}" for o in options] + ["log_roofline_s", "d_log_roofline_s"]
                + ([f"device_{d}" for d in udev] if len(udev) > 1 else []))
  y = np.log(rt) - np.log(rt[default_row])
  return OptionData(x=x.astype(np.float32), y=y, group=np.asarray(ds.group, np.int64),
                    option=np.asarray([opt_id[str(v)] for v in ds.variant]), family=np.asarray(ds.family),
                    runtime_s=rt, runtime_pooled=pooled, noisy=np.asarray(ds.noisy, bool),
                    options=options, feature_names=names)


class OptionConfig(NamedTuple):
  """Hyper-parameters of :func:`fit_option_model` and of the choice: MLP width/depth, Adam(W) steps and
  learning rate (cosine decay), weight decay, weight of the pairwise ranking loss, Huber delta (log
  units), ensemble members, ``pessimism`` (score = mean + pessimism x std of the members), ``margin``
  (log gain a non-default option must show), ``ood_margin`` (fraction of the training range) and seed."""
  hidden: int = 64
  layers: int = 2
  steps: int = 600
  lr: float = 3e-3
  weight_decay: float = 1e-4
  rank_weight: float = 1.0
  huber_delta: float = 0.1
  ensemble: int = 4
  pessimism: float = 2.0
  margin: float = 0.0
  ood_margin: float = 0.15
  seed: int = 0


class _MLP(nn.Module):
  hidden: int
  layers: int

  @nn.compact
  def __call__(self, x):
    for _ in range(self.layers):
      x = nn.gelu(nn.Dense(self.hidden)(x))
    return nn.Dense(1)(x)[..., 0]


class OptionModel(NamedTuple):
  """A fitted ensemble: per-member flax params, the input standardisation (``mu``, ``sd``), the training
  range of every feature (``lo``, ``hi``; for :func:`option_ood`) and the :class:`OptionConfig`."""
  params: list
  mu: np.ndarray
  sd: np.ndarray
  lo: np.ndarray
  hi: np.ndarray
  cfg: OptionConfig


def _check_config(cfg: OptionConfig) -> None:
  """Raise unless every field of ``cfg`` is in range (a zero Huber delta or width, a NaN learning rate
  or a negative ranking weight trained silently into NaN or inverted predictions)."""
  if not isinstance(cfg, OptionConfig):
    raise TypeError(f"cfg must be an OptionConfig, got {type(cfg).__name__}.")
  check_int("cfg.hidden", cfg.hidden, 1)
  check_int("cfg.layers", cfg.layers, 0)
  check_int("cfg.steps", cfg.steps, 1)
  check_int("cfg.ensemble", cfg.ensemble, 1)
  check_int("cfg.seed", cfg.seed)
  check_range("cfg.lr", cfg.lr, 0.0, low_inclusive=False)
  check_range("cfg.weight_decay", cfg.weight_decay, 0.0)
  check_range("cfg.rank_weight", cfg.rank_weight, 0.0)
  check_range("cfg.huber_delta", cfg.huber_delta, 0.0, low_inclusive=False)
  check_range("cfg.pessimism", cfg.pessimism, 0.0)
  check_range("cfg.margin", cfg.margin)
  check_range("cfg.ood_margin", cfg.ood_margin, 0.0)


def _check_rows(name: str, x, model: OptionModel) -> np.ndarray:
  """``x`` as float32 with ``model``'s feature count in its last axis."""
  x = np.asarray(x, np.float32)
  if x.shape[-1:] != np.shape(model.mu):
    raise ValueError(f"{name} must have {np.size(model.mu)} features per row (those the model was fitted on), "
                     f"got shape {x.shape}.")
  return x


def fit_option_model(x: np.ndarray, y: np.ndarray, group: np.ndarray,
                     cfg: OptionConfig = OptionConfig()) -> OptionModel:
  """Fit the ensemble to predict ``y`` (log runtime ratio to the default) from ``x``, full batch:
  Huber(pred - y) + ``rank_weight`` x logistic loss on every ordered pair of candidates of one program."""
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.float32)
  group = np.asarray(group)
  if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or y.shape != group.shape or x.shape[0] == 0:
    raise ValueError(f"x [R, F], y [R] and group [R] must agree and be non-empty; got {x.shape}, "
                     f"{y.shape}, {group.shape}.")
  if not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
    raise ValueError("x and y must be finite.")
  _check_config(cfg)
  mu, sd = x.mean(0), x.std(0)
  sd = np.where(sd > 1e-6, sd, np.inf).astype(np.float32)  # constant columns carry nothing: map to 0
  xs = (x - mu) / sd
  same = (group[:, None] == group[None, :]) & (y[:, None] < y[None, :] - 0.02)  # i clearly faster than j
  pairs = np.argwhere(same)
  model = _MLP(cfg.hidden, cfg.layers)
  tx = optax.adamw(optax.cosine_decay_schedule(cfg.lr, cfg.steps), weight_decay=cfg.weight_decay)
  xs_j, y_j = jnp.asarray(xs), jnp.asarray(y)
  pi, pj = jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])

  def loss_fn(p):
    pred = model.apply(p, xs_j)
    reg = jnp.mean(optax.huber_loss(pred, y_j, delta=cfg.huber_delta)) / cfg.huber_delta
    rank = jnp.mean(jax.nn.softplus(pred[pi] - pred[pj])) if pairs.shape[0] else 0.0
    return reg + cfg.rank_weight * rank

  def train_one(key):  # one member: init + all steps in one scan; members vmapped (one compile)
    p = model.init(key, xs_j[:1])

    def step(carry, _):
      p, st = carry
      loss, grads = jax.value_and_grad(loss_fn)(p)
      upd, st = tx.update(grads, st, p)
      return (optax.apply_updates(p, upd), st), loss
    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=cfg.steps)
    return p

  keys = jnp.stack([jax.random.PRNGKey(cfg.seed * 1000 + e) for e in range(cfg.ensemble)])
  stacked = jax.jit(jax.vmap(train_one))(keys)
  if not all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree_util.tree_leaves(stacked)):
    raise FloatingPointError(f"option model training diverged (non-finite parameters); lower cfg.lr (got {cfg.lr}).")
  params = [jax.tree_util.tree_map(lambda a, e=e: np.asarray(a[e]), stacked) for e in range(cfg.ensemble)]
  return OptionModel(params, mu, sd, x.min(0), x.max(0), cfg)


def predict_gain(model: OptionModel, x: np.ndarray, pessimism: float | None = 0.0) -> np.ndarray:
  """Predicted log(runtime / runtime of the default) per candidate row: the ensemble mean plus
  ``pessimism`` (None: ``model.cfg.pessimism``) times the ensemble's standard deviation (> 0: a
  candidate the members disagree on looks slower, so the choice stays with what they agree on)."""
  pessimism = model.cfg.pessimism if pessimism is None else pessimism
  check_range("pessimism", pessimism, 0.0, None)
  xs = (_check_rows("x", x, model) - model.mu) / model.sd
  net = _MLP(model.cfg.hidden, model.cfg.layers)
  p = np.stack([np.asarray(net.apply(q, xs), np.float64) for q in model.params])
  return p.mean(0) + (pessimism * p.std(0) if pessimism else 0.0)


def predict_members(model: OptionModel, x: np.ndarray) -> np.ndarray:
  """Each ensemble member's prediction, [members, R]."""
  xs = (_check_rows("x", x, model) - model.mu) / model.sd
  net = _MLP(model.cfg.hidden, model.cfg.layers)
  return np.stack([np.asarray(net.apply(q, xs), np.float64) for q in model.params])


def option_ood(model: OptionModel, x: np.ndarray) -> np.ndarray:
  """Bool [R]: the candidate has a feature more than ``ood_margin`` of the training range outside it
  (a count never seen, e.g. an opcode absent from training, or sizes beyond the training programs), or a
  NaN feature."""
  x = _check_rows("x", x, model)
  if x.ndim != 2:
    raise ValueError(f"x must be [rows, features], got shape {x.shape}.")
  span = np.maximum(model.hi - model.lo, 1e-6)
  m = model.cfg.ood_margin
  return np.any((x < model.lo - m * span) | (x > model.hi + m * span) | np.isnan(x), axis=1)


def _row_mask(name: str, mask, group: np.ndarray) -> np.ndarray | None:
  """``mask`` (None, or one truth value per row) as a bool array of ``group``'s shape: an int 0/1 array
  would otherwise index rows instead of masking them."""
  if mask is None:
    return None
  mask = np.asarray(mask)
  if mask.shape != group.shape:
    raise ValueError(f"{name} must hold one truth value per row, shape {group.shape}, got {mask.shape}.")
  return mask.astype(bool)


def choose(pred: np.ndarray, group: np.ndarray, *, default_mask: np.ndarray | None = None,
           margin: float = 0.0, flagged: np.ndarray | None = None) -> dict:
  """The chosen row per program: the lowest prediction; with ``default_mask`` (True on each
  program's default row), a non-default row only if predicted faster than the default by more than
  ``margin`` (log) and no row of the program is ``flagged`` (out of distribution). ``default_mask`` and
  ``flagged`` hold one truth value per row (0/1 integers are read as False/True); a NaN prediction or
  ``margin`` is refused."""
  pred = np.asarray(pred, np.float64)
  group = np.asarray(group)
  if pred.shape != group.shape:
    raise ValueError(f"pred {pred.shape} and group {group.shape} must have one shape.")
  if np.any(np.isnan(pred)):
    raise ValueError(f"pred holds {int(np.sum(np.isnan(pred)))} NaN value(s) (rows "
                     f"{np.flatnonzero(np.isnan(pred))[:8].tolist()}...); a NaN would be chosen as the best "
                     "candidate. Check the model's inputs (option_ood) or its training.")
  check_range("margin", margin)
  default_mask = _row_mask("default_mask", default_mask, group)
  flagged = _row_mask("flagged", flagged, group)
  out = {}
  for gid in np.unique(group):
    rows = np.flatnonzero(group == gid)
    best = rows[int(np.argmin(pred[rows]))]
    if default_mask is not None:
      d = rows[default_mask[rows]]
      if d.size:
        d = int(d[0])
        bad = flagged is not None and bool(np.any(flagged[rows]))
        if bad or pred[best] > pred[d] - margin:
          best = d
    out[int(gid)] = int(best)
  return out


def choose_options(model: OptionModel, x: np.ndarray, group: np.ndarray, default_mask: np.ndarray
                   ) -> tuple[dict, list]:
  """The value model's option choice: ``({program: chosen row}, [programs with a flagged row])``,
  scored with ``model.cfg.pessimism`` and ``margin``; flagged programs are chosen like the others
  (the caller decides: keep the default, or time all candidates as :func:`hybrid_choice` does)."""
  flagged = option_ood(model, x)
  ch = choose(predict_gain(model, x, None), group, default_mask=default_mask, margin=model.cfg.margin)
  return ch, sorted({int(g) for g in np.asarray(group)[flagged]})


def choice_metrics(chosen: dict, runtime: np.ndarray, group: np.ndarray, tol: float = 0.05) -> dict:
  """Fraction of programs whose chosen runtime is within ``tol`` of the best measured one (with a 95%
  percentile-bootstrap interval over programs), mean, median and max regret (chosen / best - 1), over
  the programs in ``chosen``."""
  runtime = np.asarray(runtime, np.float64)
  group = np.asarray(group)
  if runtime.shape != group.shape or runtime.ndim != 1:
    raise ValueError(f"runtime {runtime.shape} and group {group.shape} must be vectors of one length.")
  check_range("tol", tol, 0.0)
  reg = []
  for gid, row in chosen.items():
    if not (isinstance(row, (int, np.integer)) and 0 <= row < group.size and group[row] == gid):
      raise ValueError(f"chosen[{gid!r}] = {row!r} is not a row of program {gid} (rows "
                       f"{np.flatnonzero(group == gid)[:8].tolist()}); chosen maps each program to one of its "
                       "own rows, as choose and fixed_choice return.")
    best = runtime[group == gid].min()
    reg.append(runtime[row] / best - 1.0)
  reg = np.asarray(reg)
  from mlsys_jax.cost.metrics import bootstrap_mean_ci
  lo, hi = bootstrap_mean_ci((reg <= tol + 1e-12).astype(np.float64))
  return {"programs": int(reg.size), "within_tol": float(np.mean(reg <= tol + 1e-12)) if reg.size else float("nan"),
          "within_tol_ci95": [lo, hi],
          "mean_regret": float(reg.mean()) if reg.size else float("nan"),
          "median_regret": float(np.median(reg)) if reg.size else float("nan"),
          "max_regret": float(reg.max()) if reg.size else float("nan")}


def fixed_choice(option_index: int, option: np.ndarray, group: np.ndarray, default_index: int = 0) -> dict:
  """Always the option ``option_index``; where the program has no row for it (its compilation equalled
  an earlier option's and was dropped), the default row (the assumption: the option changed nothing)."""
  option, group = np.asarray(option), np.asarray(group)
  if option.shape != group.shape:
    raise ValueError(f"option {option.shape} and group {group.shape} must have one shape.")
  out = {}
  for gid in np.unique(group):
    rows = np.flatnonzero(group == gid)
    hit = rows[option[rows] == option_index]
    if not hit.size:
      hit = rows[option[rows] == default_index]
    if not hit.size:
      raise ValueError(f"program {gid} has no row of option {option_index} nor of the default option "
                       f"{default_index} (its options: {sorted(set(option[rows].tolist()))}); pass the index "
                       "of its default option as default_index, or drop the program.")
    out[int(gid)] = int(hit[0])
  return out


def hybrid_choice(pred: np.ndarray, runtime: np.ndarray, group: np.ndarray, k: int,
                  flagged: np.ndarray | None = None) -> tuple[dict, int]:
  """Time only the ``k`` best-predicted candidates per program (all of them for a program with a
  flagged row) and keep the fastest measured. Returns the choice and the number of timed candidates."""
  check_int("k", k, 1)
  pred, runtime, group = np.asarray(pred), np.asarray(runtime), np.asarray(group)
  if pred.shape != group.shape or runtime.shape != group.shape:
    raise ValueError(f"pred {pred.shape}, runtime {runtime.shape} and group {group.shape} must have one shape.")
  if np.any(np.isnan(pred)):
    raise ValueError("pred holds NaN values; a NaN candidate would never be timed. Check the model's inputs.")
  flagged = _row_mask("flagged", flagged, group)
  out, timed = {}, 0
  for gid in np.unique(group):
    rows = np.flatnonzero(group == gid)
    if flagged is not None and np.any(flagged[rows]):
      top = rows
    else:
      top = rows[np.argsort(pred[rows], kind="stable")[:k]]
    if np.any(np.isnan(runtime[top])):
      raise ValueError(f"program {gid}: a timed candidate's runtime is NaN (rows {top.tolist()}); a NaN "
                       "would be kept as the fastest. Drop failed measurements first.")
    timed += top.size
    out[int(gid)] = int(top[int(np.argmin(runtime[top]))])
  return out, timed


def group_folds(keys: Sequence, n_folds: int, seed: int = 0) -> list[np.ndarray]:
  """Split the distinct values of ``keys`` into ``n_folds`` random folds; returns, per fold, the bool
  mask of the rows whose key is held out."""
  keys = np.asarray(keys)
  uniq = np.unique(keys)
  check_int("n_folds", n_folds, 2, len(uniq))
  perm = np.random.default_rng(seed).permutation(uniq)
  return [np.isin(keys, perm[f::n_folds]) for f in range(n_folds)]
