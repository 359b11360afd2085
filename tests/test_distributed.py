"""mlsys_jax.comm.distributed: data parallelism across processes (jax.distributed, gloo on CPU).

The multi-process tests start real processes on 127.0.0.1 with ``experiments/train_distributed.py``
(each with its own XLA_FLAGS: 4 simulated CPU devices), under a hard timeout. The in-process tests use
the 8 simulated devices of conftest.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mlsys_jax import robust
from mlsys_jax.comm import distributed as dist
from mlsys_jax.comm import powersgd, sidco

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "train_distributed.py"
CHILD_TIMEOUT = 300   # seconds; hard limit per child (the 2-core CI machine is shared)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env(devices: int) -> dict:
  """Environment of a child: its own device count; XLA's backend optimizations off (a third less CPU to
  compile on the 2-core CI machine; every child, reference included, compiles with the same flags, and
  the same equalities hold at the default level: docs/distributed.md, 200 steps)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  if "--xla_cpu_use_fusion_emitters=false" in os.environ.get("XLA_FLAGS", ""):   # conftest.py's choice
    env["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _popen(cmd: list[str], devices: int, log: pathlib.Path) -> subprocess.Popen:
  with open(log, "w") as f:   # the child keeps its own copy of the descriptor
    return subprocess.Popen(cmd, env=_child_env(devices), cwd=str(ROOT), stdout=f, stderr=subprocess.STDOUT)


def _start(args: list[str], devices: int, log: pathlib.Path) -> subprocess.Popen:
  """``experiments/train_distributed.py`` with ``devices`` simulated CPU devices, output to ``log``."""
  return _popen([sys.executable, str(SCRIPT), f"--local_devices={devices}", *args], devices, log)


def _wait(procs: list[subprocess.Popen], logs: list[pathlib.Path], timeout: float) -> list[int]:
  deadline = time.time() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      tails = "\n".join(f"--- {l}:\n{l.read_text()[-3000:]}" for l in logs)
      pytest.fail(f"child processes did not finish within {timeout} s:\n{tails}")
  return codes


def _cluster(n: int, port: int, extra: list[list[str]] | list[str]) -> list[list[str]]:
  """Arguments of the ``n`` processes of one cluster (``extra``: shared, or one list per process)."""
  per = extra if extra and isinstance(extra[0], list) else [extra] * n
  return [[f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}", *per[i]]
          for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# Two processes x 4 devices == one process x 8 devices.

METHODS = ("sidco", "accordion", "byzshield")
BITWISE = ("sidco", "byzshield")   # all-gathers + the same local arithmetic: no reduction order involved
TRAIN_FLAGS = [f"--method={','.join(METHODS)}", "--steps=3", "--log_every=1", "--hidden=32", "--batch=8",
               "--accordion_interval=2", "--attack=constant", "--byzantine=0", "--save_params"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("dist")
  port = _free_port()
  procs, logs = [], []
  t0 = time.time()
  for i, args in enumerate(_cluster(2, port, TRAIN_FLAGS + [f"--out_dir={out / 'multi'}",
                                                          "--initialization_timeout=120"])):
    logs.append(out / f"p{i}.log")
    procs.append(_start(args, 4, logs[-1]))
  logs.append(out / "single.log")
  procs.append(_start(TRAIN_FLAGS + [f"--out_dir={out / 'single'}"], 8, logs[-1]))
  codes = _wait(procs, logs, CHILD_TIMEOUT)
  wall = time.time() - t0
  for code, log in zip(codes, logs):
    assert code == 0, f"{log} exited with {code}:\n{log.read_text()[-4000:]}"
  return out, wall


def _params(folder: pathlib.Path, method: str, pid: int) -> dict:
  with np.load(folder / f"params_{method}_process{pid}.npz") as z:
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_single_process_8_devices(two_process_run, method):
  out, wall = two_process_run
  single = _params(out / "single", method, 0)
  p0, p1 = _params(out / "multi", method, 0), _params(out / "multi", method, 1)
  assert single.keys() == p0.keys() == p1.keys() and len(single) == 4
  for k in single:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=f"{method} {k}: processes hold different replicas")
    if method in BITWISE:
      np.testing.assert_array_equal(p0[k], single[k], err_msg=f"{method} {k} (expected bitwise)")
    else:   # pmean over gloo vs in-process: float32 rounding of the reduction order, through 3 Adam steps
      np.testing.assert_allclose(p0[k], single[k], rtol=1e-5, atol=2e-6, err_msg=f"{method} {k}")
  r0 = json.loads((out / "multi" / "results.json").read_text())
  r1 = json.loads((out / "multi" / "results_process1.json").read_text())
  rs = json.loads((out / "single" / "results.json").read_text())
  assert (r0["process_count"], r0["devices"], r0["local_devices"]) == (2, 8, 4)
  assert (rs["process_count"], rs["devices"]) == (1, 8)
  m0, m1, ms = r0["methods"][method], r1["methods"][method], rs["methods"][method]
  assert m0["replicas_agree"] and m1["replicas_agree"] and ms["replicas_agree"]
  assert m0["params_checksum"] == m1["params_checksum"]
  assert m0["bytes_per_worker"] == ms["bytes_per_worker"] > 0
  assert m0["reduce"] == ms["reduce"] == ("byzshield" if method == "byzshield" else "tx")
  np.testing.assert_allclose(m0["loss"], ms["loss"], rtol=1e-5)
  assert len(m0["loss"]) == 3 and np.isfinite(m0["loss"]).all() and m0["loss"][0] != m0["loss"][-1]
  print(f"two-process run + single-process reference: {wall:.1f} s wall")


# A light child (jax and mlsys_jax.comm only) for the failure cases: argv = process id, port, repo root,
# then "die" (process 1 exits after one psum) or "init <hidden> <seed>" (data_parallel_init of a
# {"Dense_0": {"bias", "kernel"}} tree of that width, from that seed).
CHILD = """
import os, sys, time
pid, port, root, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, root)
import jax, numpy as np, optax
from jax.sharding import PartitionSpec as P
from mlsys_jax.comm import distributed as dist
dist.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=120,
                heartbeat_timeout=10 if mode == "die" else 100)
mesh = dist.global_mesh()
if mode == "init":
  h, seed = int(sys.argv[5]), int(sys.argv[6])
  rng = np.random.default_rng(seed)
  params = {"Dense_0": {"bias": np.zeros((h,), np.float32), "kernel": rng.normal(size=(64, h)).astype(np.float32)}}
  dist.data_parallel_init(params, optax.sgd(0.1), mesh)
  print("init passed", flush=True)
  sys.exit(0)
f = jax.jit(dist.shard_map(lambda a: jax.lax.psum(a, "d"), mesh=mesh, in_specs=P("d"), out_specs=P("d")))
x = dist.shard_batch(mesh, np.ones(jax.local_device_count(), np.float32))
print("first step", float(np.asarray(f(x).addressable_data(0))[0]), flush=True)
if pid == 1:
  print("process 1 dies", time.time(), flush=True)
  os._exit(1)
for i in range(1000):   # the next psum waits for process 1, which is gone
  f(x).block_until_ready()
print("process 0 was not stopped", flush=True)
"""


def _light_cluster(tmp_path: pathlib.Path, name: str, args: list[list[str]], devices: list[int]):
  child = tmp_path / "child.py"
  child.write_text(CHILD)
  port = str(_free_port())
  logs = [tmp_path / f"{name}{i}.log" for i in range(2)]
  procs = [_popen([sys.executable, str(child), str(i), port, str(ROOT), *args[i]], devices[i], logs[i])
           for i in range(2)]
  return procs, logs


def test_process_that_never_joins_or_dies_fails_within_bounded_time(tmp_path):
  # (a) num_processes=2 but only process 0 is started (the experiment script, as a user runs it):
  # TimeoutError after initialization_timeout.
  port = _free_port()
  lone = tmp_path / "lone.log"
  args = _cluster(2, port, ["--method=dense", "--steps=1", "--initialization_timeout=3"])[0]
  t0 = time.time()
  procs = [_start(args, 4, lone)]
  # (b) both join, run one psum, then process 1 exits: process 0's next collective cannot complete and
  # jax.distributed's heartbeat (10 s here) terminates it with a message naming the dead task.
  more, logs = _light_cluster(tmp_path, "dies", [["die"], ["die"]], [4, 4])
  codes = _wait(procs + more, [lone, *logs], CHILD_TIMEOUT)
  t_end = time.time()
  text = lone.read_text()
  assert codes[0] != 0, text[-3000:]
  assert "TimeoutError" in text and "could not join the jax.distributed cluster" in text, text[-3000:]
  assert f"127.0.0.1:{port}" in text and "initialization_timeout=3 s" in text
  assert "process 0 of 2" in text
  dies0, dies1 = logs[0].read_text(), logs[1].read_text()
  assert "first step 8.0" in dies0 and "process 1 dies" in dies1, dies0[-2000:] + dies1[-2000:]
  assert codes[1] != 0 and codes[2] == 1, (codes, dies0[-3000:])
  assert "stopped sending heartbeats" in dies0 and "process 0 was not stopped" not in dies0, dies0[-3000:]
  died_at = float(dies1.split("process 1 dies")[1].split()[0])
  assert t_end - died_at < 10 + 80, "process 0 was not stopped within heartbeat_timeout + slack"
  print(f"lone process / dead peer: {t_end - t0:.1f} s wall; process 0 stopped "
        f"<= {t_end - died_at:.1f} s after its peer died")


def test_processes_with_different_params_or_devices_name_the_mismatch(tmp_path):
  runs = [
      ("shape", [["init", "32", "0"], ["init", "16", "0"]], [4, 4],
       "params['Dense_0']['bias'] has shape (16,) float32 on process 1 but shape (32,) float32 on process 0"),
      ("values", [["init", "32", "0"], ["init", "32", "1"]], [4, 4],
       "params['Dense_0']['kernel'] holds different values on process 1 than on process 0"),
      ("devices", [["init", "32", "0"], ["init", "32", "0"]], [4, 2],
       "process 1 has 2 local cpu device(s) but process 0 has 4"),
  ]
  started = [(name, msg, *_light_cluster(tmp_path, name, args, devices)) for name, args, devices, msg in runs]
  codes = _wait([p for *_, procs, _ in started for p in procs], [l for *_, logs in started for l in logs],
                CHILD_TIMEOUT)
  for k, (name, msg, _, logs) in enumerate(started):
    for i, log in enumerate(logs):
      text = log.read_text()   # (identical processes pass the same check: the two-process run above)
      assert codes[2 * k + i] != 0 and "init passed" not in text, (name, text[-3000:])
      assert f"ValueError: processes disagree: {msg}" in text, (name, text[-3000:])


# ----------------------------------------------------------------------------------------------------
# In-process (8 simulated devices): the step's math and its errors.

def _mlp():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params = {"w1": 0.3 * jax.random.normal(k1, (6, 5)), "b1": jnp.zeros((5,)),
            "w2": 0.3 * jax.random.normal(k2, (5, 3))}

  def loss(p, batch):
    x, y = batch
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  rng = np.random.default_rng(0)
  x = rng.normal(size=(72, 6)).astype(np.float32)
  y = rng.integers(0, 3, size=72).astype(np.int32)
  return params, loss, x, y


def _full_batch_reference(params, loss, x, y, steps, lr):
  """Adam on the whole batch on one device (float32): what data parallelism must reproduce."""
  tx = optax.adam(lr)
  st = tx.init(params)
  for _ in range(steps):
    g = jax.grad(loss)(params, (x, y))
    u, st = tx.update(g, st, params)
    params = optax.apply_updates(params, u)
  return params


def test_dense_mean_and_byzshield_equal_full_batch_adam_and_ignore_a_byzantine_worker(devices):
  params, loss, x, y = _mlp()
  mesh = dist.global_mesh("d", devices)
  ref = _full_batch_reference(params, loss, x[:64], y[:64], 2, 0.05)
  tx = optax.adam(0.05)
  state = dist.data_parallel_init(params, tx, mesh)
  step = dist.data_parallel_step(loss, tx, mesh)
  for _ in range(2):
    state, m = step(state, dist.shard_batch(mesh, (x[:64], y[:64])))
  assert step.mode() == "mean" and bool(m["replicas_agree"])
  assert float(m["bytes_sent"]) == 4 * (30 + 5 + 15)
  chex_close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
  jax.tree_util.tree_map(chex_close, state.params, ref)
  # ByzShield, no attack, mean aggregator: each file's r copies agree, the mean of the 9 file gradients
  # (8 rows each) is the full-batch gradient of the 72 rows.
  ref72 = _full_batch_reference(params, loss, x, y, 2, 0.05)
  spec = dist.byzshield_reduce(robust.ramanujan_assignment(3, 3), "mean")
  state = dist.data_parallel_init(params, tx, mesh)
  step = dist.data_parallel_step(loss, tx, mesh, reduce=spec)
  batch = dist.byzshield_batch(mesh, spec, (x, y))
  assert batch[0].shape == (16, 3, 8, 6)          # 9 workers on 8 devices: 2 slots each, 3 files of 8 rows
  for _ in range(2):
    state, m = step(state, batch)
  assert step.mode() == "byzshield" and bool(m["replicas_agree"])
  # bytes_sent = what one device all-gathers: its (16 / 8 = 2 slots, padding included) x (l = 3 files)
  # gradients of 50 float32 parameters, i.e. its share of the gathered (16, 3, ...) stack.
  payload = batch[0].shape[0] // 8 * batch[0].shape[1] * 4 * (30 + 5 + 15)
  assert float(m["bytes_sent"]) == payload == 1200
  jax.tree_util.tree_map(chex_close, state.params, ref72)
  # One Byzantine worker of 9 (r = 3) sending -1000 everywhere wins no vote: bitwise the clean run.
  attacked = dist.byzshield_reduce(robust.ramanujan_assignment(3, 3), "mean", byzantine=(4,),
                                   attack="constant", scale=1e3)
  state_a = dist.data_parallel_init(params, tx, mesh)
  step_a = dist.data_parallel_step(loss, tx, mesh, reduce=attacked)
  for _ in range(2):
    state_a, _ = step_a(state_a, dist.byzshield_batch(mesh, attacked, (x, y)))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         state_a.params, state.params)


def test_step_errors_name_the_mismatch(devices):
  params, loss, x, y = _mlp()
  mesh = dist.global_mesh("d", devices)
  batch = dist.shard_batch(mesh, (x[:64], y[:64]))
  cases = [
      (optax.chain(sidco(0.1), optax.sgd(0.1)), "auto", "used outside its collective context"),
      (optax.chain(powersgd(1, axis_name="batch"), optax.sgd(0.1)), "auto",
       "collective over axis 'batch' but the data-parallel mesh axis is 'd'"),
      (optax.sgd(0.1), "tx", "runs no collective over 'd'"),
      (optax.chain(sidco(0.1, axis_name="d"), optax.sgd(0.1)), "mean", "already communicates over 'd'"),
  ]
  for tx, reduce, msg in cases:
    state = dist.data_parallel_init(params, tx, mesh)
    with pytest.raises(ValueError, match=msg):
      dist.data_parallel_step(loss, tx, mesh, reduce=reduce)(state, batch)
  tx = optax.sgd(0.1)
  state = dist.data_parallel_init(params, tx, mesh)
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    dist.data_parallel_step(loss, tx, mesh)(state, (jnp.zeros((4, 6)), jnp.zeros((4,), jnp.int32)))
  with pytest.raises(ValueError, match="not an axis of the mesh"):
    dist.data_parallel_step(loss, tx, mesh, axis_name="x")
  with pytest.raises(ValueError, match="reduce must be one of"):
    dist.data_parallel_step(loss, tx, mesh, reduce="sum")
  with pytest.raises(TypeError, match="must be a mlsys_jax.robust.Assignment"):
    dist.byzshield_reduce(np.eye(8))
  with pytest.raises(ValueError, match="needs an attack"):
    dist.byzshield_reduce(robust.ramanujan_assignment(3, 3), byzantine=(1,))


def test_initialize_checks_arguments():
  with pytest.raises(ValueError, match=r"process_id must lie in \[0, num_processes\)"):
    dist.initialize("127.0.0.1:1234", 2, 2)
  with pytest.raises(ValueError, match="needs coordinator_address"):
    dist.initialize(None, 2, 0)
  with pytest.raises(ValueError, match="host:port"):
    dist.initialize("127.0.0.1", 2, 0)
  with pytest.raises(ValueError, match="host:port"):
    dist.initialize("127.0.0.1:70000", 2, 0)
  with pytest.raises(ValueError, match="initialization_timeout"):
    dist.initialize("127.0.0.1:1234", 2, 0, initialization_timeout=0)
  info = dist.initialize()
  assert (info.process_index, info.process_count) == (0, 1)
  dist.check_same_across_processes({"a": np.zeros(3)})   # one process: nothing to compare


def test_collective_axes_and_helpers(devices):
  mesh = dist.global_mesh("d", devices)
  f = dist.shard_map(lambda a: jax.lax.psum(a, "d") + jax.lax.all_gather(a, "d").sum(), mesh=mesh,
                     in_specs=P("d"), out_specs=P("d"))
  axes = dist.collective_axes(f, jax.ShapeDtypeStruct((8,), jnp.float32))
  assert set(axes) == {"d"} and {"psum", "all_gather"} <= axes["d"]
  assert dist.collective_axes(lambda a: a * 2, jnp.ones(3)) == {}
  assert dist.local_batch_slice(64, mesh) == slice(0, 64)
  # the shim is mlsys_jax._compat's shard_map with the check keyword mapped: check=True rejects a
  # device-varying output declared replicated, check=False (data-parallel default) lets it through
  from mlsys_jax import _compat
  assert dist._CHECK_KW == ("check_vma" if _compat._SHARD_MAP_NEW else "check_rep")
  x = jnp.arange(8.0)
  assert np.asarray(dist.shard_map(lambda a: a, mesh=mesh, in_specs=P("d"), out_specs=P())(x)).shape == (1,)
  with pytest.raises(Exception, match="(?i)vary|replicat"):
    dist.shard_map(lambda a: a, mesh=mesh, in_specs=P("d"), out_specs=P(), check=True)(x)
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    dist.local_batch_slice(12, mesh)


# ----------------------------------------------------------------------------------------------------
# Replica check: divergences that a linear (weighted-sum) fingerprint cancels must be caught.

def test_fingerprint_sees_sign_flips_swaps_and_exponent_bits():
  jfp = jax.jit(dist._fingerprint)
  fp = lambda t: tuple(np.asarray(jfp(t)))
  f32 = lambda *v: np.array(v, np.float32)
  same = [({"w": f32(0, 1)}, {"w": f32(0, -1)}),                        # sign bit at an odd index
          ({"w": f32(0, 0, 0, 2)}, {"w": f32(0, 0, 0, 0)}),              # 2**30 bit at index 3 mod 4
          ({"u": f32(1), "v": f32(2)}, {"u": f32(2), "v": f32(1)}),      # values swapped between leaves
          ({"w": f32(3, 5)}, {"w": f32(5, 3)}),                          # swapped inside a leaf
          ({"w": np.array([1.0, 2.0])}, {"w": np.array([1.0, -2.0])}),   # float64 / 8-byte words
          ({"w": np.array([1, 2], np.int8)}, {"w": np.array([2, 1], np.int8)}),
          ({"w": np.array([1.0, -1.0], jnp.bfloat16)}, {"w": np.array([-1.0, 1.0], jnp.bfloat16)})]
  for a, b in same:
    assert fp(a) != fp(b), (a, b)
    assert fp(a) == fp(jax.tree_util.tree_map(np.copy, a))
  nan = {"w": f32(np.nan, 1)}
  assert fp(nan) == fp(jax.tree_util.tree_map(np.copy, nan))   # bit patterns, not float ==
  # random single-element changes of a 1000-element tree: never a collision
  rng = np.random.default_rng(0)
  base = {"a": rng.normal(size=(10, 50)).astype(np.float32), "b": rng.normal(size=500).astype(np.float32)}
  ref = fp(base)
  for _ in range(20):
    t = jax.tree_util.tree_map(np.copy, base)
    leaf = t["a" if rng.random() < 0.5 else "b"].reshape(-1)
    leaf[rng.integers(leaf.size)] *= -1
    assert fp(t) != ref


def _diverging_tx(device: int, from_step: int):
  """No update, except that from step ``from_step`` on, device ``device`` negates element 1 of 'w1'
  exactly (p + (-2p) == -p): a sign flip at an odd index on one replica."""
  def update(g, count, p):
    me = jax.lax.axis_index("d")
    flip = (me == device) & (count >= from_step)
    u = jax.tree_util.tree_map(jnp.zeros_like, g)
    w = p["w1"].reshape(-1)
    hit = (jnp.arange(w.size) == 1) & flip
    u["w1"] = jnp.where(hit, -2.0 * w, 0.0).reshape(p["w1"].shape)
    return u, count + 1
  return optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32), update)


def test_replicas_that_diverge_are_reported_and_the_first_step_raises(devices):
  params, loss, x, y = _mlp()
  mesh = dist.global_mesh("d", devices)
  batch = dist.shard_batch(mesh, (x[:64], y[:64]))
  tx = _diverging_tx(device=1, from_step=0)
  state = dist.data_parallel_init(params, tx, mesh)
  with pytest.raises(RuntimeError, match="parameters differ between devices"):
    dist.data_parallel_step(loss, tx, mesh)(state, batch)
  tx = _diverging_tx(device=5, from_step=1)   # first step clean, second diverges: only the metric says so
  state = dist.data_parallel_init(params, tx, mesh)
  step = dist.data_parallel_step(loss, tx, mesh)
  state, m = step(state, batch)
  assert step.mode() == "mean" and bool(m["replicas_agree"])
  state, m = step(state, batch)
  assert not bool(m["replicas_agree"])
  w1 = [np.asarray(s.data) for s in state.params["w1"].addressable_shards]
  assert w1[5].reshape(-1)[1] == -w1[0].reshape(-1)[1] != 0   # the replicas really differ
