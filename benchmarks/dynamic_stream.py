"""Nimble (Shen et al., MLSys 2021) in JAX: a stream of requests of varying length, end to end with
compilation, served by per-shape jit, pad-to-max, bucketed_jit (power-of-two and DP-chosen buckets) and
jax.export symbolic shapes; plus a batched Tree-LSTM against per-tree execution.

  # H200 (the lead's GPU run): 2-layer d=256 encoder, batch 8, 2000 requests, lengths 8-512
  python benchmarks/dynamic_stream.py --out=$OUT
  # CPU smoke test
  python benchmarks/dynamic_stream.py --small --out=/tmp/dyn

Requests are token ids (batch, n) drawn with a log-normal length distribution clipped to
[min_len, max_len] (a fit to sentence/paragraph token counts: median ~ 48, sigma 0.9); the served
function embeds them, runs a masked transformer encoder and returns the masked mean embedding
(batch, d). Every method returns host numpy results (what a server sends back). Per-shape methods
(jit, symbolic export) compile once per distinct length; they run until --budget_s and the rest of
the stream is extrapolated from their measured compile and call times (reported as such).
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mlsys_jax import stats  # noqa: E402
from mlsys_jax.sched import dynamic as dyn  # noqa: E402

try:
  from benchmarks import common  # noqa: E402
except ImportError:  # pragma: no cover - run as a plain script from benchmarks/
  import common  # type: ignore  # noqa: E402


# --------------------------------------------------------------------------- the served model
def sample_lengths(seed: int, count: int, lo: int, hi: int, median: float = 48.0,
                   sigma: float = 0.9) -> np.ndarray:
  """Log-normal lengths (a fit to sentence/paragraph token counts) clipped to [lo, hi]."""
  rng = np.random.default_rng(seed)
  return np.clip(np.rint(rng.lognormal(np.log(median), sigma, count)), lo, hi).astype(np.int64)


def make_model(num_layers: int, d_model: int, num_heads: int, vocab: int, max_len: int, seed: int = 0):
  """``(served(params, ids, length) -> pooled (batch, d), params)``: embedding + masked encoder."""
  enc = dyn.TransformerEncoder(num_layers=num_layers, d_model=d_model, num_heads=num_heads)
  key = jax.random.PRNGKey(seed)
  v = enc.init(key, jnp.zeros((1, 8, d_model)), 8)
  params = {"enc": v, "emb": 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (vocab, d_model)),
            "pos": 0.1 * jax.random.normal(jax.random.fold_in(key, 2), (max_len, d_model))}

  def served(params, ids, length):
    x = params["emb"][ids] + params["pos"][jnp.arange(ids.shape[1])]  # a gather: also symbolic n
    return enc.apply(params["enc"], x, length)[1]

  return served, params


def _requests(lengths, batch, vocab, seed):
  rng = np.random.default_rng(seed + 1)
  pool = rng.integers(1, vocab, size=(batch, int(lengths.max())), dtype=np.int32)
  return [np.ascontiguousarray(pool[:, :n]) for n in lengths]


# --------------------------------------------------------------------------- methods
def run_stream(call, reqs, *, budget_s=None, new_shape=None, compile_count=None):
  """One pass over the stream; returns outputs and timing. With ``budget_s`` stops early and
  extrapolates the rest from the measured new-shape (compile + first call) and repeat-call times."""
  outs, t_new, t_rep, n_new, n_rep = [], 0.0, 0.0, 0, 0
  seen = set()
  t0 = time.perf_counter()
  done = len(reqs)
  for i, ids in enumerate(reqs):
    new = ids.shape not in seen
    seen.add(ids.shape)
    t = time.perf_counter()
    outs.append(call(ids))
    dt = time.perf_counter() - t
    if new:
      t_new, n_new = t_new + dt, n_new + 1
    else:
      t_rep, n_rep = t_rep + dt, n_rep + 1
    if budget_s is not None and time.perf_counter() - t0 > budget_s and i + 1 < len(reqs):
      done = i + 1
      break
  measured = time.perf_counter() - t0
  rest = reqs[done:]
  rest_new = len({r.shape for r in rest} - seen)
  rest_rep = len(rest) - rest_new
  mean_new = t_new / max(n_new, 1)
  if n_rep >= 5:
    mean_rep = t_rep / n_rep
  else:  # too few repeats seen: time repeated calls of shapes already compiled
    ts = []
    for ids in reqs[max(0, done - 5):done]:
      t = time.perf_counter()
      call(ids)
      ts.append(time.perf_counter() - t)
    mean_rep = float(np.median(ts))
  total = measured + rest_new * mean_new + rest_rep * mean_rep
  return outs, {"seconds": total, "measured_seconds": measured, "requests_measured": done,
                "extrapolated": done < len(reqs), "new_shape_calls": n_new + rest_new,
                "new_shape_seconds_mean": mean_new, "repeat_call_seconds_mean": mean_rep}


def calibrate(served, params, batch, sizes, repeats=7):
  """Compile and call time at a few bucket sizes (an offline calibration for the DP's cost model):
  an affine fit ``t(b) = t0 + t1 b`` with ``t1 >= 0`` (the fastest of ``repeats`` calls per size, so a
  loaded machine adds less noise); if the fit has no slope, time proportional to the padded work."""
  rows = []
  for s in sizes:
    f = dyn.bucketed_jit(served, dims={1: 1}, buckets=(s,))
    ids = np.ones((batch, s), np.int32)
    c = f.compile_all(params, ids)
    f(params, ids)
    ts = []
    for _ in range(repeats):
      t = time.perf_counter()
      f(params, ids)
      ts.append(time.perf_counter() - t)
    rows.append({"size": int(s), "compile_s": c, "call_s": float(np.min(ts))})
  x = np.array([r["size"] for r in rows], np.float64)
  y = np.array([r["call_s"] for r in rows])
  t1, t0 = np.polyfit(x, y, 1)
  if t1 <= 0:
    t0, t1, model = 0.0, float(y.max() / x.max()), "proportional to padded work (no slope measured)"
  else:
    t0, model = max(t0, 0.0), "affine"
  return rows, {"t0": float(t0), "t1": float(t1), "model": model}, (lambda b: t0 + t1 * b), float(
      np.mean([r["compile_s"] for r in rows]))


def _max_diff(outs, ref, upto):
  d = [float(np.max(np.abs(a - b))) for a, b in zip(outs[:upto], ref[:upto])]
  scale = max(float(np.max(np.abs(b))) for b in ref[:upto])
  return max(d), scale


def stream_benchmark(*, num_layers, d_model, num_heads, batch, requests, min_len, max_len, vocab=1000,
                     budget_s=120.0, max_buckets=8, seed=0, warm_repeats=3,
                     warm_modes=("serial", "pipelined"), log=print) -> dict:
  served, params = make_model(num_layers, d_model, num_heads, vocab, max_len, seed)
  lengths = sample_lengths(seed, requests, min_len, max_len)
  history = sample_lengths(seed + 1000, requests, min_len, max_len)  # the DP plans from past traffic
  reqs = _requests(lengths, batch, vocab, seed)
  res = {"config": dict(num_layers=num_layers, d_model=d_model, num_heads=num_heads, batch=batch,
                        requests=requests, min_len=min_len, max_len=max_len, vocab=vocab,
                        budget_s=budget_s, max_buckets=max_buckets, seed=seed),
         "distinct_lengths": int(np.unique(lengths).size),
         "length_quantiles": {q: float(np.quantile(lengths, q / 100)) for q in (10, 50, 90, 99)},
         "methods": {}}
  log(f"{requests} requests, {res['distinct_lengths']} distinct lengths, median "
      f"{res['length_quantiles'][50]:.0f}")

  t = time.perf_counter()
  cal_sizes = sorted({min_len, int(np.sqrt(min_len * max_len)), max_len})
  cal_rows, coef, run_cost, compile_s = calibrate(served, params, batch, cal_sizes)
  res["calibration"] = {"rows": cal_rows, "run_cost": coef, "compile_s_mean": compile_s,
                        "seconds": time.perf_counter() - t}
  log(f"calibration: {cal_rows}")
  pow2 = dyn.pow2_buckets(max_len, min_len)
  plan_e2e = dyn.choose_buckets(history, max_buckets, run_cost=run_cost, compile_cost=compile_s,
                                stream_length=requests, candidates=range(8, max_len + 8, 8))
  plan_warm = dyn.choose_buckets(history, max_buckets, run_cost=run_cost, compile_cost=0.0,
                                 candidates=range(8, max_len + 8, 8), exact_k=True)
  plan_warm_pow2k = dyn.choose_buckets(history, len(pow2), run_cost=run_cost,
                                       candidates=range(8, max_len + 8, 8), exact_k=True)
  res["plans"] = {k: {"buckets": list(p.buckets), "predicted_seconds": p.total_cost,
                      "padding_overhead": p.padding_overhead}
                  for k, p in (("dp_e2e", plan_e2e), ("dp_warm", plan_warm),
                               ("dp_warm_k_pow2", plan_warm_pow2k))}
  log(f"plans: {res['plans']}")

  bucketed = {"pad_to_max": (max_len,), "pow2": pow2, "dp_e2e": plan_e2e.buckets,
              "dp_warm": plan_warm.buckets, "dp_warm_k_pow2": plan_warm_pow2k.buckets}
  fns = {}
  for name, bs in bucketed.items():
    f = dyn.bucketed_jit(served, dims={1: 1}, buckets=bs)
    call = lambda ids, f=f: f(params, ids)
    outs, r = run_stream(call, reqs)
    r.update(compiles=f.compile_count, compile_seconds=f.compile_seconds, buckets=list(bs),
             padding_overhead=f.stats()["padding_overhead"])
    res["methods"][name] = r
    fns[name] = (f, outs)
    log(f"{name}: {r['seconds']:.2f} s end to end, {f.compile_count} compiles "
        f"({f.compile_seconds:.2f} s)")
  # ahead-of-time: compile every bucket before the stream (the DP warm plan), reported separately
  f = dyn.bucketed_jit(served, dims={1: 1}, buckets=plan_warm.buckets)
  aot = f.compile_all(params, reqs[0])
  _, r = run_stream(lambda ids: f(params, ids), reqs)
  r.update(compiles=f.compile_count, aot_compile_seconds=aot, stream_seconds=r["seconds"])
  r["seconds"] += aot  # end to end: the AOT compilation counts too
  res["methods"]["dp_warm_aot"] = r
  log(f"dp_warm_aot: {aot:.2f} s AOT compile + {r['stream_seconds']:.2f} s stream")

  sym_b = dyn.export_symbolic(served, params, reqs[0], dims={1: 1}, buckets=pow2)
  outs, r = run_stream(lambda ids: sym_b(params, ids), reqs)
  r.update(compiles=sym_b.compile_count, export_seconds=sym_b.export_seconds)
  r["seconds"] += sym_b.export_seconds
  res["methods"]["symbolic_pow2"] = r
  fns["symbolic_pow2"] = (None, outs)
  log(f"symbolic_pow2: {r['seconds']:.2f} s, {sym_b.compile_count} compiles")

  per = jax.jit(served)
  ref, r = run_stream(lambda ids: np.asarray(per(params, ids, np.int32(ids.shape[1]))), reqs,
                      budget_s=budget_s)
  r.update(compiles=r["new_shape_calls"])
  res["methods"]["per_shape_jit"] = r
  how = f"extrapolated from {r['requests_measured']} requests" if r["extrapolated"] else "measured"
  log(f"per_shape_jit: {r['seconds']:.2f} s ({how})")

  sym = dyn.export_symbolic(served, params, reqs[0], dims={1: 1})
  _, r = run_stream(lambda ids: sym(params, ids), reqs, budget_s=budget_s)
  r["seconds"] += sym.export_seconds
  r.update(compiles=r["new_shape_calls"], export_seconds=sym.export_seconds)
  res["methods"]["symbolic_per_shape"] = r
  log(f"symbolic_per_shape: {r['seconds']:.2f} s")

  # correctness: padded results vs the unpadded per-shape computation (requests it ran)
  upto = len(ref)
  res["max_abs_diff_vs_unpadded"] = {}
  for name, (_, outs) in fns.items():
    d, scale = _max_diff(outs, ref, upto)
    res["max_abs_diff_vs_unpadded"][name] = d
  res["output_scale"] = scale
  res["requests_compared"] = upto
  log(f"max |padded - unpadded| over {upto} requests: {res['max_abs_diff_vs_unpadded']} (scale {scale:.2f})")

  # after warm-up: the whole stream again with every program compiled, the methods interleaved round
  # by round (medians over rounds); "serial" waits for each result on the host (one request at a time),
  # "pipelined" dispatches every request and waits at the end (the pooled output has no dynamic axis,
  # so unpad='device' returns device arrays without slicing)
  names = ["pad_to_max", "pow2", "dp_warm", "dp_warm_k_pow2", "dp_e2e"]

  def serial(f):
    return lambda: [f(params, x) for x in reqs]

  def pipelined(f):
    def run():
      f.unpad = "device"
      try:
        return jax.block_until_ready([f(params, x) for x in reqs])
      finally:
        f.unpad = "host"
    return run

  warm = {k: {} for k in names}
  for mode in warm_modes:
    wrap = serial if mode == "serial" else pipelined
    if mode == "pipelined" and any(any(fns[k][0].out_axes) for k in names):
      continue
    times = {k: [] for k in names}
    for r in range(warm_repeats):
      for k in (names if r % 2 == 0 else names[::-1]):
        t = time.perf_counter()
        wrap(fns[k][0])()
        times[k].append(time.perf_counter() - t)
    base = float(np.median(times["pad_to_max"]))
    for k in names:
      med = float(np.median(times[k]))
      warm[k][mode] = {"seconds": med, "seconds_all": times[k], "pad_to_max_seconds": base,
                       "speedup_vs_pad_to_max": base / med,
                       "requests_per_s": len(reqs) / med}
      log(f"warm {mode} {k}: {med:.3f} s per stream ({base / med:.2f}x pad-to-max)")
  res["warm"] = warm
  e2e = {k: v["seconds"] for k, v in res["methods"].items()}
  res["speedup_e2e_vs_per_shape"] = {k: e2e["per_shape_jit"] / v for k, v in e2e.items()}
  res["speedup_e2e_vs_pad_to_max"] = {k: e2e["pad_to_max"] / v for k, v in e2e.items()}
  return res


# --------------------------------------------------------------------------- Tree-LSTM
def random_trees(seed, count, lo, hi, d):
  """Random binary-ish parse trees: a random split of each sentence until single tokens."""
  rng = np.random.default_rng(seed)
  trees, feats = [], []
  for _ in range(count):
    n_leaves = int(rng.integers(lo, hi + 1))
    parents = []

    def build(a, b, parent):
      j = len(parents)
      parents.append(parent)
      if b - a > 1:
        m = int(rng.integers(a + 1, b))
        build(a, m, j)
        build(m, b, j)
    build(0, n_leaves, -1)
    trees.append(parents)
    feats.append(rng.normal(size=(len(parents), d)).astype(np.float32))
  return trees, feats


def tree_benchmark(*, batch, hidden, d_in, lo, hi, seed=0, budget_s=60.0, repeats=5, log=print) -> dict:
  trees, feats = random_trees(seed, batch, lo, hi, d_in)
  m = dyn.ChildSumTreeLSTM(hidden)
  enc = dyn.encode_trees(trees, feats)
  v = m.init(jax.random.PRNGKey(seed), enc)
  res = {"config": dict(batch=batch, hidden=hidden, d_in=d_in, leaves=[lo, hi], seed=seed),
         "nodes": int(sum(len(t) for t in trees)),
         "levels": int(enc.level_nodes.shape[0])}
  batched = jax.jit(m.apply)
  t = time.perf_counter()
  root = np.asarray(batched(v, enc)[0])
  res["batched_first_call_s"] = time.perf_counter() - t

  def run_batched():
    b = dyn.encode_trees(trees, feats)
    return np.asarray(batched(v, b)[0])

  def run_batched_device():
    return batched(v, enc)[0].block_until_ready()

  rec = jax.jit(dyn.tree_lstm_recursive, static_argnums=1)
  t0, compiled = time.perf_counter(), 0
  keys = [tuple(p) for p in trees]
  for k, f in zip(keys, feats):
    if time.perf_counter() - t0 > budget_s:
      break
    rec(v, k, f).block_until_ready()
    compiled += 1
  res["per_tree_jit_compile_s_mean"] = (time.perf_counter() - t0) / max(compiled, 1)
  res["per_tree_jit_compiled"] = compiled
  sub = list(zip(keys, feats))[:compiled]

  def run_per_tree():
    return [np.asarray(rec(v, k, f)) for k, f in sub]

  p = v["params"]
  cell = jax.jit(dyn.tree_lstm_cell)
  hd = hidden

  def run_per_node():
    outs = []
    for parents, f in zip(trees, feats):
      children = [[] for _ in parents]
      for j, q in enumerate(parents):
        if q >= 0:
          children[q].append(j)
      order, stack = [], [parents.index(-1)]
      while stack:
        j = stack.pop()
        order.append(j)
        stack.extend(children[j])
      hc = {}
      for j in reversed(order):
        if children[j]:
          ch = jnp.stack([hc[k][0] for k in children[j]])
          cc = jnp.stack([hc[k][1] for k in children[j]])
        else:
          ch = cc = jnp.zeros((0, hd), jnp.float32)
        hc[j] = cell(p, f[j], ch, cc)
      outs.append(np.asarray(hc[order[0]][0]))
    return outs

  ref = run_per_node()  # also warms the per-node cell programs
  res["max_abs_diff_batched_vs_per_node"] = float(np.max(np.abs(root[:batch] - np.stack(ref))))
  per_tree_out = run_per_tree()
  res["max_abs_diff_batched_vs_per_tree_jit"] = float(
      np.max(np.abs(root[:compiled] - np.stack(per_tree_out)))) if compiled else None

  def timed(fn):
    ts = []
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t)
    return float(np.median(ts))

  run_batched()
  tb, tbd = timed(run_batched), timed(run_batched_device)
  tpt = timed(run_per_tree) * batch / max(compiled, 1)  # scaled to the whole batch
  tpn = timed(run_per_node)
  res.update(batched_s=tb, batched_device_only_s=tbd, per_tree_jit_s=tpt, per_node_cell_s=tpn,
             trees_per_s={"batched": batch / tb, "per_tree_jit_warm": batch / tpt,
                          "per_node_cell": batch / tpn},
             speedup_vs_per_tree_jit_warm=tpt / tb, speedup_vs_per_node=tpn / tb,
             per_tree_jit_e2e_s=compiled and (res["per_tree_jit_compile_s_mean"] * batch + tpt))
  log(f"tree-lstm batch {batch}: batched {tb * 1e3:.2f} ms (device only {tbd * 1e3:.2f} ms), per-tree "
      f"jit warm {tpt * 1e3:.2f} ms ({tpt / tb:.1f}x), per-node cell {tpn * 1e3:.1f} ms ({tpn / tb:.1f}x); "
      f"per-tree compile {res['per_tree_jit_compile_s_mean']:.2f} s/tree")
  return res


def main():
  def extra(ap):
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--num_layers", type=int, default=2)
    ap.add_argument("--num_heads", type=int, default=4)
    ap.add_argument("--min_len", type=int, default=8)
    ap.add_argument("--max_len", type=int, default=512)
    ap.add_argument("--max_buckets", type=int, default=8)
    ap.add_argument("--budget_s", type=float, default=90.0,
                    help="seconds per per-shape method before extrapolating the rest of the stream")
    ap.add_argument("--parts", default="stream,tree", help="comma list: stream, tree")
    ap.add_argument("--matmul_precision", default="highest",
                    help="jax_default_matmul_precision ('highest': true float32, so padded and unpadded "
                    "results can be compared to float32 rounding; 'default': XLA's, TF32 on GPUs)")
    ap.add_argument("--tree_batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
  args = common.parse_args(__doc__.splitlines()[0], extra)
  if args.small:
    args.requests, args.d_model, args.num_layers, args.batch = 120, 32, 2, 2
    args.max_len, args.budget_s, args.tree_batch = 128, 15.0, 16
  if args.matmul_precision != "default":
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
  payload = {"environment": common.environment(), "matmul_precision": args.matmul_precision}
  parts = set(args.parts.split(","))
  if "stream" in parts:
    payload["stream"] = stream_benchmark(
        num_layers=args.num_layers, d_model=args.d_model, num_heads=args.num_heads, batch=args.batch,
        requests=args.requests, min_len=args.min_len, max_len=args.max_len, budget_s=args.budget_s,
        max_buckets=args.max_buckets, seed=args.seed)
  if "tree" in parts:
    payload["tree_lstm"] = tree_benchmark(batch=args.tree_batch, hidden=64 if args.small else 256,
                                          d_in=32 if args.small else 256, lo=4, hi=40, seed=args.seed,
                                          budget_s=10.0 if args.small else 60.0)
  common.write_json(args.out, "dynamic_stream" + ("_small" if args.small else ""), payload)


if __name__ == "__main__":
  main()
