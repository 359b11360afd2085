"""Session 21 (public-API tests of quant/infer): CPU cost of tests/test_public_api_quant_infer.py and the
before/after behaviour of the two bugs the tests found. Run from the repo root:

  nice -n 5 python3 experiments/results/s21_api_quant_infer/measure.py BEFORE_COMMIT

BEFORE_COMMIT: a commit before the fixes (e.g. 652ddb2); its fixed_point.py / quantizers.py are loaded from
git next to the current ones. Writes timing_and_regressions.json beside this file.
"""
import importlib.util, json, os, re, subprocess, sys, tempfile, time

root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
os.chdir(root)
before = sys.argv[1]
out = {"before_commit": before, "head": subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()}

def pytest_run(extra):
  cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
         "tests/test_public_api_quant_infer.py", "--durations=0"] + extra
  t0 = os.times()
  w0 = time.time()
  r = subprocess.run(cmd, capture_output=True, text=True)
  t1 = os.times()
  durs = [float(m.group(1)) for m in re.finditer(r"^([\d.]+)s (?:call|setup|teardown)", r.stdout, re.M)]
  return {"command": " ".join(cmd[1:]), "returncode": r.returncode, "summary": r.stdout.strip().splitlines()[-1],
          "child_user_cpu_s": round(t1.children_user - t0.children_user, 2),
          "child_sys_cpu_s": round(t1.children_system - t0.children_system, 2),
          "wall_s": round(time.time() - w0, 2), "sum_of_reported_test_durations_s": round(sum(durs), 2)}

full = pytest_run([])
empty = pytest_run(["-k", "no_test_has_this_name"])     # import + collection only
out["tests"] = {"full": full, "collect_only_baseline": empty,
                "test_cpu_s_estimate": round(full["child_user_cpu_s"] + full["child_sys_cpu_s"]
                                             - empty["child_user_cpu_s"] - empty["child_sys_cpu_s"], 2),
                "load_average_1min_at_start": os.getloadavg()[0]}

def load(path, name):
  src = subprocess.check_output(["git", "show", f"{before}:{path}"], text=True)
  d = tempfile.mkdtemp()
  f = os.path.join(d, name + ".py")
  open(f, "w").write(src)
  spec = importlib.util.spec_from_file_location(name, f)
  m = importlib.util.module_from_spec(spec)
  sys.modules[name] = m
  spec.loader.exec_module(m)
  return m

sys.path.insert(0, root)
import jax, jax.numpy as jnp, numpy as np
from mlsys_jax.quant import fixed_point as new_fx
from mlsys_jax.quant.binary import quantizers as new_q
old_fx = load("mlsys_jax/quant/fixed_point.py", "old_fixed_point")
old_q = load("mlsys_jax/quant/binary/quantizers.py", "old_quantizers")
x = jnp.array([0.5, -0.2, 3.0])
reg = {}
for tag, m in (("before", old_fx), ("after", new_fx)):
  f = jax.jit(lambda v, b: m.dequantize(m.quantize(v, 8, bounds=b)))
  reg[f"quantize_nan_bounds_under_jit_{tag}"] = [None if np.isnan(v) else float(v) for v in np.asarray(f(x, jnp.float32(np.nan)))]
reg["quantize_nan_bounds_input"] = {"x": x.tolist(), "bits": 8, "bounds": "NaN (traced)"}
reg["larq_sign_int_before"] = np.asarray(old_q.larq_sign(jnp.array([0, -3, 2]))).tolist()
try:
  new_q.larq_sign(jnp.array([0, -3, 2]))
  reg["larq_sign_int_after"] = "no error"
except TypeError as e:
  reg["larq_sign_int_after"] = f"TypeError: {e}"
out["regressions"] = reg
json.dump(out, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "timing_and_regressions.json"), "w"), indent=1)
print(json.dumps(out, indent=1))
