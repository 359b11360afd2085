"""Session 21 (public-API tests of sched): what tests/test_public_api_sched.py costs, whether each of its
tests catches a deliberate bug in the function it covers, and the tree_lstm_levels bug before/after. Run from
the repo root:

  nice -n 5 python3 experiments/results/s21_api_sched/measure.py BEFORE_COMMIT

BEFORE_COMMIT: a commit before the session's fixes (e.g. 652ddb2). Deliberate bugs are applied to a copy of
the package in a temporary directory (the checkout is never modified). Writes measure.json beside this file.
"""
import json, os, re, shutil, subprocess, sys, tempfile, time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TEST = "tests/test_public_api_sched.py"
os.chdir(ROOT)
before = sys.argv[1]
out = {"before_commit": before, "head": subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip(),
       "load_average_1min_at_start": os.getloadavg()[0]}


def pytest_cpu(cwd, extra, pin=None):
  cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", TEST, "--durations=0"] + extra
  if pin is not None and shutil.which("taskset"):
    cmd = ["taskset", "-c", str(pin)] + cmd
  t0, w0 = os.times(), time.time()
  r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
  t1 = os.times()
  durs = [float(m.group(1)) for m in re.finditer(r"^([\d.]+)s (?:call|setup|teardown)", r.stdout, re.M)]
  last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr.strip()[-300:]
  return {"command": " ".join(cmd), "returncode": r.returncode, "summary": last,
          "child_cpu_s": round(t1.children_user - t0.children_user + t1.children_system - t0.children_system, 2),
          "wall_s": round(time.time() - w0, 2), "sum_of_test_durations_s": round(sum(durs), 2)}


full = pytest_cpu(ROOT, [], pin=0)
empty = pytest_cpu(ROOT, ["-k", "no_test_has_this_name"], pin=0)
out["timing_pinned_to_one_core"] = {"full": full, "collect_only": empty,
                                    "tests_cpu_s": round(full["child_cpu_s"] - empty["child_cpu_s"], 2)}

# ------------------------------------------------------------------ deliberate bugs, in a copy of the package
# (name, file, original text, buggy text, -k selection of the tests that must fail)
M = [
 ("stream_call", "mlsys_jax/sched/emit.py", "return fn(f, compute_type", "return fn(lambda *xs: f(*xs[::-1]), compute_type", "stream_call"),
 ("const_value", "mlsys_jax/sched/emit.py", "  if v in g.consts:\n    return g.consts[v]", "  if v in g.consts and False:\n    return g.consts[v]", "const_value"),
 ("epilogue_chain", "mlsys_jax/sched/emit.py", "operand = np.array(np.broadcast_to(vec, (shape[axis],)))", "operand = np.array(np.broadcast_to(vec[::-1], (shape[axis],)))", "epilogue_chain"),
 ("merged_conv_params", "mlsys_jax/sched/emit.py", "pads = [(0, 0), (0, 0)] + [((K[d] - w.shape[2 + d]) // 2, K[d] - w.shape[2 + d] -\n                                 (K[d] - w.shape[2 + d]) // 2) for d in range(len(K))]", "pads = [(0, 0), (0, 0)] + [(0, K[d] - w.shape[2 + d]) for d in range(len(K))]", "merged_conv_params"),
 ("merge_entry", "mlsys_jax/sched/emit.py", "  return conv + (epi,)", "  return conv + (None,)", "merge_entry"),
 ("prepare_merges", "mlsys_jax/sched/emit.py", "  return {i: merge_entry(g, st.groups[0], fuse_epilogue)", "  return {i: merge_entry(g, st.groups[0])", "prepare_merges"),
 ("run_merge", "mlsys_jax/sched/emit.py", "  for u, (a, b) in zip(units, ranges):\n    env[g.units[u].outputs[0]]", "  for u, (a, b) in zip(units, ranges[::-1]):\n    env[g.units[u].outputs[0]]", "run_merge"),
 ("run_group", "mlsys_jax/sched/emit.py", "  for u in group:\n    run_unit(g, u, env, consts)", "  for u in group[:-1]:\n    run_unit(g, u, env, consts)", "run_group"),
 ("run_stage(streams)", "mlsys_jax/sched/emit.py", "      env[o] = val\n  run_group(g, st.groups[main], env, consts)", "      env[o] = val", "run_stage"),
 ("run_stage(plain)", "mlsys_jax/sched/emit.py", "    for grp in st.groups:\n      run_group(g, grp, env, consts)\n    return", "    for grp in st.groups[:1]:\n      run_group(g, grp, env, consts)\n    return", "run_stage"),
 ("make_program", "mlsys_jax/sched/emit.py", "run_stage(g, st, env, consts, mode, merges.get(i))", "run_stage(g, st, env, consts, mode, merges.get(i + 1))", "make_program_computes"),
 ("eqn_flops", "mlsys_jax/sched/graph.py", "    kin = rs[dn.rhs_spec[1]]", "    kin = rs[dn.rhs_spec[0]]", "eqn_flops"),
 ("avals_of", "mlsys_jax/sched/graph.py", "  return avals.get(v)", "  return avals.get(v + 1)", "avals_of"),
 ("partition_blocks", "mlsys_jax/sched/graph.py", "    if crossed[i + 1] == 0:", "    if crossed[i] == 0:", "partition_blocks"),
 ("summarize_graph", "mlsys_jax/sched/graph.py", "    kinds[u.kind] = kinds.get(u.kind, 0) + 1", "    kinds[u.kind] = 1", "summarize_graph"),
 ("roofline_time(scalar)", "mlsys_jax/sched/cost.py", "  return max(max(f, min(sat, f * 50)) / peak, b / bw)", "  return max(max(f, sat) / peak, b / bw)", "roofline_time_matches"),
 ("roofline_time(array)", "mlsys_jax/sched/cost.py", "np.maximum(np.maximum(f, np.minimum(sat, f * 50)) / peak, b / bw)", "np.maximum(np.maximum(f, np.minimum(sat, f * 50)) / peak, b / peak)", "roofline_time_matches"),
 ("merge_flops_bytes", "mlsys_jax/sched/cost.py", "  b -= (len(units) - 1) *", "  b -= len(units) *", "merge_flops_bytes"),
 ("chain_program", "mlsys_jax/sched/cost.py", "      cur, ys = lax.optimization_barrier((cur, ys))", "      cur, ys = cur, ys", "chain_program"),
 ("time_calls", "mlsys_jax/sched/cost.py", "    ts.append((time.perf_counter() - t0) / number)", "    ts.append(time.perf_counter() - t0)", "time_calls"),
 ("length_distribution", "mlsys_jax/sched/dynamic/buckets.py", "  return uniq.astype(np.int64), p / p.sum()", "  return uniq.astype(np.int64), p / len(lengths)", "length_distribution_matches"),
 ("tree_lstm_cell", "mlsys_jax/sched/dynamic/tree.py", "  c = jax.nn.sigmoid(i) * jnp.tanh(u) + (f * child_c).sum(0)", "  c = jax.nn.sigmoid(i) * jnp.tanh(u) + child_c.sum(0)", "tree_lstm_cell_matches"),
 ("tree_lstm_levels", "mlsys_jax/sched/dynamic/tree.py", "    f = jax.nn.sigmoid(wx_f[par] + h @ p[\"U_f\"])", "    f = jax.nn.sigmoid(wx_f[idx] + h @ p[\"U_f\"])", "tree_lstm_levels_matches"),
 ("tree_lstm_levels(numpy batch)", "mlsys_jax/sched/dynamic/tree.py", "  batch = TreeBatch(*(jnp.asarray(a) for a in batch))\n", "", "tree_lstm_levels_matches"),
 ("best_fit", "mlsys_jax/sched/placement/policies.py", "  return jnp.sum(obs.reserved + obs.size_frac, axis=-1)", "  return -jnp.sum(obs.reserved + obs.size_frac, axis=-1)", "best_fit_scores"),
 ("forecast", "mlsys_jax/sched/placement/policies.py", "  return -jnp.sum(jnp.mean(obs.usage_hist, axis=1), axis=-1)", "  return -jnp.sum(obs.usage_hist[:, -1], axis=-1)", "forecast_scores"),
 ("ppo_policy", "mlsys_jax/sched/placement/ppo.py", "  del key\n  return _NET.apply(params[0], machine_features(obs))", "  del key\n  return -_NET.apply(params[0], machine_features(obs))", "ppo_policy"),
 ("dagger_rollouts", "mlsys_jax/sched/placement/hindsight.py", "(params, jnp.float32(beta)), jax.random.split(key, b))", "(params, jnp.float32(1 - beta)), jax.random.split(key, b))", "dagger_rollouts_shapes"),
 ("train_imitation(no update)", "mlsys_jax/sched/placement/hindsight.py", "        params, opt_state, loss = update(params, opt_state,", "        _, opt_state, loss = update(params, opt_state,", "train_imitation"),
 ("train_imitation(no aggregation)", "mlsys_jax/sched/placement/hindsight.py", "np.concatenate([d, x])[-max_samples:]", "x[-max_samples:]", "train_imitation"),
]


tmp = tempfile.mkdtemp(prefix="s21_sched_mut_")
for item in ("mlsys_jax", "tests", "conftest.py", "pyproject.toml"):
  p = os.path.join(ROOT, item)
  (shutil.copytree if os.path.isdir(p) else shutil.copy)(p, os.path.join(tmp, item))
where = subprocess.check_output([sys.executable, "-c", "import mlsys_jax; print(mlsys_jax.__file__)"], cwd=tmp,
                                text=True).strip()
assert where.startswith(tmp), f"the copy does not shadow the checkout: {where}"
muts = []
for name, path, old, new, sel in M:
  f = os.path.join(tmp, path)
  orig = open(f).read()
  assert orig.count(old) == 1, (name, orig.count(old))
  open(f, "w").write(orig.replace(old, new))
  try:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-x", "-p", "no:cacheprovider", TEST,
                        "-k", sel], cwd=tmp, capture_output=True, text=True)
  finally:
    open(f, "w").write(orig)
  muts.append({"function_and_bug": name, "file": path, "original": old, "bug": new, "tests": sel,
               "caught": r.returncode != 0, "pytest_summary": r.stdout.strip().splitlines()[-1]})
  print(name, "caught" if r.returncode else "NOT CAUGHT", flush=True)
clean = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", TEST], cwd=tmp,
                       capture_output=True, text=True)
shutil.rmtree(tmp)
out["deliberate_bugs"] = {"all_caught": all(m["caught"] for m in muts), "n": len(muts), "runs": muts,
                          "unmodified_copy_passes": clean.returncode == 0}

# ------------------------------------------------------------------ tree_lstm_levels on encode_trees' numpy batch
code = """
import importlib.util, sys, json, numpy as np, jax
spec = importlib.util.spec_from_file_location("tree_mod", sys.argv[1]); m = importlib.util.module_from_spec(spec)
sys.modules["tree_mod"] = m   # flax modules look their class module up
spec.loader.exec_module(m)
b = m.encode_trees([[-1, 0, 0]], [np.ones((3, 2), np.float32)])
v = m.ChildSumTreeLSTM(4).init(jax.random.PRNGKey(0), b)
try:
  r, _ = m.tree_lstm_levels(v["params"], b)
  print(json.dumps({"ok": True, "root_h_shape": list(r.shape)}))
except Exception as e:
  print(json.dumps({"ok": False, "error": type(e).__name__ + ": " + str(e).splitlines()[0]}))
"""
reg = {}
for tag, ref in (("before", before), ("after", "HEAD")):
  d = tempfile.mkdtemp()
  f = os.path.join(d, "tree.py")
  open(f, "w").write(subprocess.check_output(["git", "show", f"{ref}:mlsys_jax/sched/dynamic/tree.py"], text=True))
  r = subprocess.run([sys.executable, "-c", code, f], capture_output=True, text=True, cwd=ROOT)
  reg[tag] = json.loads(r.stdout.strip().splitlines()[-1])
  shutil.rmtree(d)
out["tree_lstm_levels_numpy_treebatch"] = reg

# ------------------------------------------------------------------ the imitation test's losses
sys.path.insert(0, ROOT)
import jax, numpy as np
import tests.test_public_api_sched as T
from mlsys_jax.sched import placement as P
from mlsys_jax.sched.placement import hindsight as H
trs = T._traces()
res = P.train_imitation(trs, T._CL, spec=T._SPEC, key=jax.random.PRNGKey(3), iterations=2, beta=1.0, epochs=20,
                        batch_size=16, learning_rate=1e-2)
ro = P.dagger_rollouts(trs, T._CL, spec=T._SPEC, params=res.params, beta=1.0, key=jax.random.PRNGKey(4))
feats = jax.vmap(jax.vmap(H.machine_features))(ro.obs).reshape(-1, 3, T._F)
args = (feats, ro.obs.hindsight.reshape(-1, 3), ro.obs.feasible.reshape(-1, 3))
out["train_imitation_fixed_expert"] = {
    "setup": "test_train_imitation_reduces_the_loss_on_a_fixed_expert: 2 traces x 12 VMs, 3 machines, beta=1, "
             "iterations=2, epochs=20, batch_size=16, lr=1e-2",
    "imitation_loss_untrained_net": float(P.imitation_loss(T._net(7), *args)),
    "imitation_loss_trained": float(P.imitation_loss(res.params, *args)),
    "test_threshold": "trained < 0.7 * untrained"}
json.dump(out, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "measure.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in out.items() if k != "deliberate_bugs"}, indent=1))
print("deliberate bugs caught:", out["deliberate_bugs"]["all_caught"], out["deliberate_bugs"]["n"])
