"""Regression tests of session 43's review of comm.shared_select (leader_topk, union_topk), comm.distributed and
experiments/train_distributed.py; each failed on the code before the fix."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

from mlsys_jax import robust  # noqa: E402
from mlsys_jax._compat import shard_map  # noqa: E402
from mlsys_jax.comm import distributed as dist  # noqa: E402
from mlsys_jax.comm import leader_topk, union_topk  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
_KINDS = {"leader": leader_topk, "union": union_topk}


@pytest.fixture(scope="module")
def mesh8():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  return Mesh(np.array(jax.devices()[:8]), ("d",))


# --- shared_select: a mean that overflows the gradients' dtype was sent as inf -------------------------------

@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_float16_gradients_over_float32_residual_skip_instead_of_sending_inf(kind):
  # one worker, k = 1 of 2: step 1 sends 60000 and keeps 50000 (float16 49984) in the float32 residual; step 2's
  # buffer [0, 49984 + 30000] is finite in float32 but its sent value is inf in float16. Before: out [0, inf],
  # residual [0, 0] (the mass became inf), nonfinite_steps 0.
  tx = _KINDS[kind](0.5)
  s = tx.init({"w": jnp.zeros(2, jnp.float32)})
  _, s = tx.update({"w": jnp.array([60000., 50000.], jnp.float16)}, s)
  res1 = np.asarray(s.residual["w"], np.float64)
  np.testing.assert_array_equal(res1, [0.0, float(np.float16(50000.))])
  out, s = tx.update({"w": jnp.array([0., 30000.], jnp.float16)}, s)
  assert out["w"].dtype == jnp.float16
  assert np.all(np.isfinite(np.asarray(out["w"], np.float64)))
  np.testing.assert_array_equal(np.asarray(out["w"], np.float64), [0.0, 0.0])
  np.testing.assert_array_equal(np.asarray(s.residual["w"], np.float64), res1)   # skipped: residual kept
  assert int(s.nonfinite_steps) == 1 and float(s.bytes_sent) == 0.0 and float(s.density) == 0.0
  # a later step that fits sends again, with exact error feedback (float64: sent + residual == g + old residual)
  g3 = np.array([0., -40000.])
  out, s = tx.update({"w": jnp.asarray(g3, jnp.float16)}, s)
  np.testing.assert_array_equal(np.asarray(out["w"], np.float64) + np.asarray(s.residual["w"], np.float64),
                                g3 + res1)
  assert int(s.nonfinite_steps) == 1


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_float16_mean_over_workers_does_not_overflow_in_the_sum(kind, mesh8):
  # 8 workers, float16 everywhere, each with 10000 at entry 0: the mean, 10000, fits float16, but the psum, 80000,
  # does not. Before: every replica returned inf at entry 0 and zeroed its residual there (the mass became inf),
  # with nonfinite_steps 0. Now the 16-bit mean is a sum of x / n (as comm.powersgd's): 10000, against float64.
  tx = _KINDS[kind](0.25, axis_name="d")
  p = {"w": jnp.zeros(4, jnp.float16)}

  def two_steps(g):
    s = tx.init(p)
    out1, s = tx.update({"w": g[0, 0]}, s)           # [1000, 1, 2, 3] on every worker
    res1 = s.residual["w"]
    out2, s = tx.update({"w": g[0, 1]}, s)           # [10000, 1, 2, 3]: the sum of the workers' entries overflows
    return (out1["w"][None], res1[None], out2["w"][None], s.residual["w"][None], s.nonfinite_steps[None],
            s.bytes_sent[None])

  g = np.zeros((8, 2, 4), np.float32)
  g[:, 0] = [1000., 1., 2., 3.]
  g[:, 1] = [10000., 1., 2., 3.]
  fn = jax.jit(shard_map(two_steps, mesh=mesh8, in_specs=P("d"), out_specs=P("d"), check_vma=False))
  out1, res1, out2, res2, nf, nb = (np.asarray(x) for x in fn(jnp.asarray(g, jnp.float16)))
  # float64 reference (k = 1 of 4; every worker holds the same buffer, so the mean is that buffer's entry 0)
  np.testing.assert_array_equal(out1.astype(np.float64), np.tile([1000., 0., 0., 0.], (8, 1)))
  np.testing.assert_array_equal(res1.astype(np.float64), np.tile([0., 1., 2., 3.], (8, 1)))
  assert np.all(out2 == out2[:1])                               # the same on every replica
  # the float16 sum of eight 1250s rounds on the way (9992 against 10000: one float16 ulp at 10^4)
  np.testing.assert_allclose(out2[0].astype(np.float64), [10000., 0., 0., 0.], rtol=8 * 2.0 ** -10)
  np.testing.assert_array_equal(res2.astype(np.float64), np.tile([0., 2., 4., 6.], (8, 1)))   # acc - sent, exact
  np.testing.assert_array_equal(nf, np.zeros(8, np.int32))
  assert np.all(nb > 0)


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_tree_without_entries_raises_a_clear_error_at_init(kind):
  # before: init passed and the update failed inside lax.top_k ("k argument to top_k must be no larger than size")
  tx = _KINDS[kind](0.5)
  with pytest.raises(ValueError, match="at least one parameter entry"):
    tx.init({"w": jnp.zeros((0,)), "b": jnp.zeros((3, 0))})
  tx.init({"w": jnp.zeros((0,)), "b": jnp.ones(())})             # one entry in all is enough


# --- distributed: an empty batch trained silently on NaN losses ----------------------------------------------

def test_empty_batches_raise_instead_of_training_on_nan_losses(mesh8):
  # before: shard_batch / byzshield_batch accepted 0 rows (0 is a multiple of every count) and the step returned
  # loss NaN with replicas_agree True
  mesh = dist.global_mesh()
  x0, y0 = np.ones((0, 4), np.float32), np.ones((0, 2), np.float32)
  with pytest.raises(ValueError, match="positive multiple"):
    dist.shard_batch(mesh, (x0, y0))
  spec = dist.byzshield_reduce(robust.ramanujan_assignment(3, 3))
  with pytest.raises(ValueError, match="at least one row per file"):
    dist.byzshield_batch(mesh, spec, (x0, y0))
  params = {"w": jnp.zeros((4, 2))}
  loss = lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2)
  tx = optax.sgd(0.1)
  state = dist.data_parallel_init(params, tx, mesh)
  with pytest.raises(ValueError, match="positive multiple"):     # a global array built without shard_batch
    dist.data_parallel_step(loss, tx, mesh)(state, (jnp.ones((0, 4)), jnp.ones((0, 2))))
  n = mesh.devices.size
  with pytest.raises(ValueError, match="rows per file >= 1"):
    dist.data_parallel_step(loss, tx, mesh, reduce=spec)(state, (jnp.ones((16, 3, 0, 4)), jnp.ones((16, 3, 0, 2))))
  # a real batch still trains
  xb, yb = np.ones((2 * n, 4), np.float32), np.ones((2 * n, 2), np.float32)
  _, m = dist.data_parallel_step(loss, tx, mesh)(state, dist.shard_batch(mesh, (xb, yb)))
  assert float(np.asarray(m["loss"].addressable_data(0))) == pytest.approx(1.0)


# --- experiments/train_distributed.py: flag handling --------------------------------------------------------

# Run in a child process: the script defines its flags on absl's global FLAGS, where other experiment modules that
# tests import in the same worker define some of the same names (e.g. --seed).
_FLAGS_CHILD = r"""
import importlib.util, pathlib, sys
from absl import flags
root = pathlib.Path(sys.argv[1])
sys.path.insert(0, str(root / "experiments"))
spec = importlib.util.spec_from_file_location("train_distributed", root / "experiments" / "train_distributed.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
for flag in ["--log_every=0", "--steps=-5", "--hidden=0", "--batch=0", "--local_devices=-1"]:
  try:
    flags.FLAGS(["train_distributed", flag])
    print("ACCEPTED", flag)
  except flags.IllegalFlagValueError as e:
    print("REFUSED", flag, flag.split("=")[0].lstrip("-") in str(e))
  flags.FLAGS.unparse_flags()
flags.FLAGS(["train_distributed", "--log_every=1", "--steps=1", "--hidden=1", "--batch=1", "--local_devices=0"])
flags.FLAGS.unparse_flags()
cfg = {"methods": ["dense", "sgd"], "steps": 1, "batch": 2, "lr": 1e-3, "hidden": 8, "ratio": 0.1, "rank": 1,
       "accordion_interval": 5, "aggregator": "median", "attack": "none", "byzantine": ["0"], "seed": 0,
       "log_every": 1, "save_params": False, "out_dir": ""}
logs = []
try:
  mod.run(cfg, log=logs.append)
  print("METHOD ACCEPTED")
except ValueError as e:
  print("METHOD REFUSED", "sgd" in str(e), len(logs))
"""


def test_bad_flags_and_unknown_methods_are_rejected_before_any_training():
  # before: --log_every=0 / --hidden=0 died with ZeroDivisionError after compiling, --steps=-5 wrote results with a
  # negative dense byte count, --batch=0 / --local_devices=-1 went on; --method=dense,sgd trained 'dense' for every
  # step, then raised, and nothing was written
  import subprocess
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", _FLAGS_CHILD, str(ROOT)], env=env, cwd=str(ROOT), capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  for flag in ["--log_every=0", "--steps=-5", "--hidden=0", "--batch=0", "--local_devices=-1"]:
    assert f"REFUSED {flag} True" in lines, done.stdout
  assert "METHOD REFUSED True 0" in lines, done.stdout


# --- distributed: the replica fingerprint -------------------------------------------------------------------

def test_fingerprint_sees_a_swap_between_positions_whose_linear_keys_collide():
  # before: the position key fmix32(i c + l c' + seed) was equal under both seeds for word i of leaf l and word
  # i + 2414777 of leaf l + 97 (i c + l c' == i' c + l' c' mod 2**32), so swapping those two values gave the same
  # 64-bit fingerprint: replicas_agree would report True for replicas that differ
  from mlsys_jax.comm.distributed import _fingerprint
  leaves = [jnp.zeros((1,), jnp.float32) for _ in range(97)] + [jnp.zeros((2414778,), jnp.float32)]
  a, b = list(leaves), list(leaves)
  a[0], a[97] = jnp.array([1.0], jnp.float32), leaves[97].at[2414777].set(2.0)
  b[0], b[97] = jnp.array([2.0], jnp.float32), leaves[97].at[2414777].set(1.0)
  fa, fb = np.asarray(_fingerprint(a)), np.asarray(_fingerprint(b))
  assert np.all(fa != fb)                                        # both 32-bit halves differ
  np.testing.assert_array_equal(fa, np.asarray(_fingerprint(list(a))))   # equal trees: equal fingerprints


def test_complex_parameters_get_a_fingerprint_and_a_step(mesh8):
  # before: bitcast_convert_type rejected complex leaves, so data_parallel_step failed at its first trace with a
  # TypeError from inside lax
  from mlsys_jax.comm.distributed import _fingerprint
  f = lambda c: np.asarray(_fingerprint({"c": jnp.asarray(c, jnp.complex64)}))
  assert np.all(f([1 + 1j, 2]) != f([1 + 2j, 2])) and np.all(f([1 + 1j, 2]) != f([1 + 1j, -2]))
  np.testing.assert_array_equal(f([1 + 1j, 2]), f([1 + 1j, 2]))
  mesh = dist.global_mesh()
  n = mesh.devices.size
  params = {"w": jnp.zeros((4, 2), jnp.complex64)}
  loss = lambda p, b: jnp.mean(jnp.abs(b[0] @ p["w"] - b[1]) ** 2)
  tx = optax.sgd(0.1)
  state = dist.data_parallel_init(params, tx, mesh)
  x = np.ones((2 * n, 4), np.complex64)
  y = np.full((2 * n, 2), 1 + 1j, np.complex64)
  state, m = dist.data_parallel_step(loss, tx, mesh)(state, dist.shard_batch(mesh, (x, y)))
  assert bool(np.asarray(m["replicas_agree"].addressable_data(0)))
  w = np.asarray(state.params["w"].addressable_data(0))
  assert np.all(w != 0)   # it trained


# --- distributed: processes whose steps differ hung in mismatched collectives ---------------------------------

_CHILD = """
import sys
pid, port, root, ratio = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
sys.path.insert(0, root)
import jax, jax.numpy as jnp, numpy as np, optax
from mlsys_jax.comm import distributed as dist, sidco
dist.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=60)
mesh = dist.global_mesh()
tx = optax.chain(sidco(ratio, axis_name="d"), optax.sgd(0.1))
loss = lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2)
state = dist.data_parallel_init({"w": np.zeros((8, 2), np.float32)}, tx, mesh)
n = jax.local_device_count()
x = np.arange(2 * n * 8, dtype=np.float32).reshape(2 * n, 8) / 100 + pid
state, m = dist.data_parallel_step(loss, tx, mesh)(state, dist.shard_batch(mesh, (x, np.ones((2 * n, 2), np.float32))))
print("step passed", bool(np.asarray(m["replicas_agree"].addressable_data(0))), flush=True)
"""


def test_processes_with_different_compression_ratios_fail_with_a_clear_error_not_a_hang(tmp_path):
  # before: process 0 with sidco(0.25) and process 1 with sidco(0.5) all-gather payloads of different capacities;
  # both waited in the collective until killed (4 min with the experiment script's --ratio, session 43).
  # Control: the same ratio on both passes (no false alarm from the program comparison).
  import socket
  import subprocess
  import time
  child = tmp_path / "child.py"
  child.write_text(_CHILD)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  procs, logs = [], []
  for name, ratios in (("same", (0.25, 0.25)), ("differ", (0.25, 0.5))):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = str(s.getsockname()[1])
    for i in range(2):
      logs.append(tmp_path / f"{name}{i}.log")
      with open(logs[-1], "w") as f:
        procs.append(subprocess.Popen([sys.executable, str(child), str(i), port, str(ROOT), str(ratios[i])],
                                      env=env, cwd=str(ROOT), stdout=f, stderr=subprocess.STDOUT))
  deadline, codes = time.time() + 150, []
  try:
    for p in procs:
      codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
  except subprocess.TimeoutExpired:
    pytest.fail("children still running after 150 s (a hang):\n" +
                "\n".join(f"--- {l.name}: {l.read_text()[-1500:]}" for l in logs))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = [l.read_text() for l in logs]
  for i in (0, 1):
    assert codes[i] == 0 and "step passed True" in texts[i], texts[i][-3000:]
  for i in (2, 3):
    assert codes[i] != 0 and "step passed" not in texts[i], texts[i][-3000:]
    assert ("ValueError: processes disagree: the data-parallel step compiles to a different program on process 1"
            in texts[i]), texts[i][-3000:]


def test_local_compression_after_byzshield_is_accepted_not_sent_round_in_circles(mesh8):
  # before: a compressor built with axis_name=None after ByzShield raised "Build it with axis_name='d'", and with
  # axis_name='d' the next check raised "use a local optimizer (no axis_name) after ByzShield": no way through.
  # After ByzShield every device holds the same aggregate, so a local transform is what it needs.
  from mlsys_jax.comm import topk
  mesh = dist.global_mesh()
  params = {"w": jnp.zeros((4, 2))}
  loss = lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2)
  spec = dist.byzshield_reduce(robust.ramanujan_assignment(3, 3))
  rng = np.random.default_rng(0)
  gb = (rng.normal(size=(18, 4)).astype(np.float32), rng.normal(size=(18, 2)).astype(np.float32))
  batch = dist.byzshield_batch(mesh, spec, gb)
  plain = optax.sgd(1.0)                                         # new params = -aggregate, exactly
  s, _ = dist.data_parallel_step(loss, plain, mesh, reduce=spec)(dist.data_parallel_init(params, plain, mesh), batch)
  agg = -np.asarray(s.params["w"].addressable_data(0), np.float64).reshape(-1)
  tx = optax.chain(topk(0.5), optax.sgd(1.0))
  step = dist.data_parallel_step(loss, tx, mesh, reduce=spec)
  s, m = step(dist.data_parallel_init(params, tx, mesh), batch)
  assert step.mode() == "byzshield" and bool(np.asarray(m["replicas_agree"].addressable_data(0)))
  want = np.zeros(8)
  top = np.argsort(-np.abs(agg), kind="stable")[:4]              # k = 4 of 8 entries
  want[top] = agg[top]
  np.testing.assert_array_equal(-np.asarray(s.params["w"].addressable_data(0), np.float64).reshape(-1), want)
  with pytest.raises(ValueError, match="use a local optimizer"):   # a compressor that communicates: still refused
    tx_d = optax.chain(topk(0.5, axis_name="d"), optax.sgd(1.0))
    dist.data_parallel_step(loss, tx_d, mesh, reduce=spec)(dist.data_parallel_init(params, tx_d, mesh), batch)
