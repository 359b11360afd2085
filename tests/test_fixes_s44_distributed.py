"""Regression tests of session 44: ``comm.distributed.byzshield_batch`` documented that ``global_batch`` must be
identical on every process but never checked it; processes that passed different batches trained silently on
inconsistent data (ByzShield's vote compares copies of files that should be identical). On the code before the fix
the different-batches test failed (both processes built the layout from their own batch and stepped, replicas_agree
True) and the in-process ones failed for want of the check; the equal-batches test passes on both."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mlsys_jax import robust  # noqa: E402
from mlsys_jax.comm import distributed as dist  # noqa: E402
from tests.test_distributed import ROOT, _free_port, _popen, _wait  # noqa: E402  (the 2-process helpers)

CHILD_TIMEOUT = 120   # seconds for a whole cluster (2 processes x 4 CPU devices; a hang would be killed here)

# argv: process id, port, repo root, seed of the sampling, rows of the global batch (a multiple of the 9 files).
# Equal seeds and rows: the same global batch on both processes; then one ByzShield step runs on it.
_CHILD = """
import sys
pid, port, root, seed, rows = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, root)
import jax, jax.numpy as jnp, numpy as np, optax
from mlsys_jax import robust
from mlsys_jax.comm import distributed as dist
dist.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=60)
mesh = dist.global_mesh()
spec = dist.byzshield_reduce(robust.ramanujan_assignment(3, 3), "median")
rng = np.random.default_rng(seed)
x = rng.normal(size=(rows, 4)).astype(np.float32)
y = rng.normal(size=(rows, 2)).astype(np.float32)
batch = dist.byzshield_batch(mesh, spec, (x, y))
print("batch passed", flush=True)
loss = lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2)
tx = optax.sgd(0.1)
state = dist.data_parallel_init({"w": np.zeros((4, 2), np.float32)}, tx, mesh)
state, m = dist.data_parallel_step(loss, tx, mesh, reduce=spec)(state, batch)
batch = dist.byzshield_batch(mesh, spec, (x, y))   # checked again on every call
print("step passed", bool(np.asarray(m["replicas_agree"].addressable_data(0))), flush=True)
"""


def _run_clusters(tmp_path, runs: dict[str, tuple[list[str], list[str]]]) -> dict[str, list[tuple[int, str]]]:
  """Start one 2-process cluster (4 simulated CPU devices each) per entry ``name: (argv of process 0, of
  process 1)``, all at once; ``{name: [(exit code, output) per process]}`` (fails the test after
  CHILD_TIMEOUT s)."""
  child = tmp_path / "child.py"
  child.write_text(_CHILD)
  procs, logs = [], []
  for name, args in runs.items():
    port = str(_free_port())
    for i in range(2):
      logs.append(tmp_path / f"{name}{i}.log")
      procs.append(_popen([sys.executable, str(child), str(i), port, str(ROOT), *args[i]], 4, logs[-1]))
  try:
    codes = _wait(procs, logs, CHILD_TIMEOUT)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  out = [(c, l.read_text()) for c, l in zip(codes, logs)]
  return {name: out[2 * k:2 * k + 2] for k, name in enumerate(runs)}


def test_processes_with_different_global_batches_raise_a_clear_error_on_both(tmp_path):
  # before: both processes built their ByzShield layout from their own batch and trained on it ("batch passed")
  res = _run_clusters(tmp_path, {"values": (["0", "72"], ["1", "72"]),   # sampling seeded by the process id
                                 "rows": (["0", "72"], ["0", "63"])})    # another batch size on process 1
  for name, msg in (("values", "processes disagree: global_batch[0] (shape (72, 4) float32) holds different values "
                               "on different processes (SHA-256 of its bytes "),
                    ("rows", "processes disagree: global_batch[0] has shape (72, 4) float32 on process 0 but "
                             "shape (63, 4) float32 on process 1")):
    for pid, (code, text) in enumerate(res[name]):
      assert code != 0 and "batch passed" not in text, (name, pid, text[-3000:])
      assert f"ValueError: {msg}" in text, (name, pid, text[-3000:])
      assert "the same seed on every process" in text, (name, pid, text[-3000:])
  text = res["values"][0][1]
  assert " on process 0 but " in text and " on process 1). " in text, text[-3000:]


def test_processes_with_equal_global_batches_pass_and_train(tmp_path):
  res = _run_clusters(tmp_path, {"same": (["3", "72"], ["3", "72"])})
  for pid, (code, text) in enumerate(res["same"]):
    assert code == 0 and "step passed True" in text, (pid, text[-3000:])


# --- in-process: one process compares nothing; the messages name leaf, difference and processes -----------------

def test_single_process_compares_nothing(monkeypatch):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = dist.global_mesh("d", jax.devices()[:8])
  spec = dist.byzshield_reduce(robust.ramanujan_assignment(3, 3))
  x = np.arange(72 * 4, dtype=np.float32).reshape(72, 4)
  ref = dist.byzshield_batch(mesh, spec, (x,), check=False)

  def no_gather(*_):
    raise AssertionError("a single process all-gathered a batch description")

  monkeypatch.setattr(dist, "_allgather_text", no_gather)
  monkeypatch.setattr(dist, "_batch_leaf_digest", no_gather)
  out = dist.byzshield_batch(mesh, spec, (x,))
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(ref[0]))


class _Sent(Exception):
  pass


def _descriptions(monkeypatch, batches: list) -> list[str]:
  """What each of ``len(batches)`` processes would all-gather in ``_check_same_batch`` for its batch."""
  texts = []

  def capture(text):
    texts.append(text)
    raise _Sent

  monkeypatch.setattr(jax, "process_count", lambda: len(batches))
  monkeypatch.setattr(dist, "_allgather_text", capture)
  for b in batches:
    with pytest.raises(_Sent):
      dist._check_same_batch(b, "global_batch")
  return texts


@pytest.mark.parametrize("case", ["values", "shape", "dtype", "structure", "container", "same"])
def test_messages_name_the_leaf_the_difference_and_the_processes(monkeypatch, case):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(18, 3)).astype(np.float32), np.arange(18, dtype=np.int32)
  other = {"values": (x, y + 1), "shape": (x[:9], y), "dtype": (x.astype(np.float64), y),
           "structure": (x,), "container": [x, y], "same": (x.copy(), y.copy())}[case]
  batches = [(x, y), other, (x, y)]   # process 1 differs from processes 0 and 2
  descs = _descriptions(monkeypatch, batches)
  monkeypatch.setattr(dist, "_allgather_text", lambda text: list(descs))   # the all-gather's result
  if case == "same":
    dist._check_same_batch((x, y), "global_batch")
    return
  with pytest.raises(ValueError) as e:
    dist._check_same_batch((x, y), "global_batch")
  msg = str(e.value)
  assert msg.startswith("processes disagree: global_batch")
  assert "the same seed on every process" in msg and "broadcast_one_to_all" in msg
  sha = lambda p: json.loads(descs[p])["leaves"][-1][3][:16]   # process p's hash of its last leaf
  expect = {
      "values": "global_batch[1] (shape (18,) int32) holds different values on different processes (SHA-256 of "
                f"its bytes {sha(0)} on processes 0, 2 but {sha(1)} on process 1)",
      "shape": "global_batch[0] has shape (18, 3) float32 on processes 0, 2 but shape (9, 3) float32 on process 1",
      "dtype": "global_batch[0] has shape (18, 3) float32 on processes 0, 2 but shape (18, 3) float64 on process 1",
      "structure": "global_batch has a different tree structure on different processes (processes 0, 2: leaves "
                   "['[0]', '[1]']; process 1: leaves ['[0]'])",
      "container": "global_batch has a different tree structure on different processes (processes 0, 2: "
                   "PyTreeDef((*, *)); process 1: PyTreeDef([*, *]))",
  }[case]
  assert expect in msg, msg


def test_byzshield_batch_names_a_wrong_spec_or_mesh():
  """A spec that is not a ByzShieldReduce (e.g. the assignment itself) or a mesh that is not a Mesh: a TypeError
  naming what to pass (an AttributeError from inside before)."""
  a = robust.ramanujan_assignment(3, 3)
  batch = np.arange(18.0).reshape(18, 1)
  with pytest.raises(TypeError, match=r"spec must be a ByzShieldReduce \(byzshield_reduce"):
    dist.byzshield_batch(dist.global_mesh(), a, batch)
  with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh"):
    dist.byzshield_batch(jax.devices(), dist.byzshield_reduce(a), batch)
