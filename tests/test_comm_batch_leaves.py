"""Per-tensor DGC with same-size leaves batched (``sparse._BATCH_LEAVES``, session 25).

``dgc(per_tensor=True)`` selects one payload per leaf (a sampled threshold, a packing, a second round on overflow).
With ``_BATCH_LEAVES`` the leaves of one size and dtype are stacked and selected by one ``vmap``ped call, so the
compiled step holds one instance of the selection per size (ResNet-50: 22 sizes for 161 leaves) instead of one per
leaf. The payloads, updates and states must be bitwise those of the leaf-by-leaf path: each leaf keeps its own key
(``fold_in(key, leaf index)``), count, capacity and second round. ``topk`` / ``randomk`` stay leaf by leaf (batched
``lax.top_k`` was slower on the CPU).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from mlsys_jax.comm import dgc, randomk, topk
from mlsys_jax.comm import sparse as sp

from _trees import replicated_updates  # tests/_trees.py

# three leaves of 256 entries (two float32, one bfloat16: a separate group), two of 1000, one alone
_SHAPES = {"a": (16, 16), "b": (256,), "c": (1000,), "d": (10, 100), "e": (4, 64), "f": (3, 3, 4, 8)}
_DTYPES = {"e": jnp.bfloat16}


def _params():
  return {n: jnp.zeros(s, _DTYPES.get(n, jnp.float32)) for n, s in _SHAPES.items()}


def _grad(rng, k):
  g = {n: rng.standard_cauchy(s) if k % 2 else 0.1 * rng.standard_normal(s) for n, s in _SHAPES.items()}
  if k % 3 == 0:   # ties: one leaf of +-1 everywhere (DGC's second round on its overflow)
    g["d"] = np.where(rng.random(_SHAPES["d"]) < 0.5, -1.0, 1.0)
  return {n: jnp.asarray(v, _DTYPES.get(n, jnp.float32)) for n, v in g.items()}


def _run(batch, make, monkeypatch, steps=6):
  monkeypatch.setattr(sp, "_BATCH_LEAVES", batch)
  tx = make()
  st = tx.init(_params())
  upd = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  outs = []
  for k in range(steps):
    u, st = upd(_grad(rng, k), st)
    outs.append((u, st))
  return outs, upd.lower(_grad(rng, 0), st).as_text()


def _same(a, b):
  return all(np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32), equal_nan=True)
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


_MAKERS = {
    "dgc": lambda: dgc(0.02, per_tensor=True, seed=3),
    "dgc_exact": lambda: dgc(0.02, per_tensor=True, exact=True),
    "dgc_sample": lambda: dgc(0.05, per_tensor=True, sample_fraction=0.5, capacity_factor=1.5),
    "dgc_precondition": lambda: dgc(0.02, per_tensor=True, precondition=__import__("optax").scale_by_rms()),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("dgc_exact", "dgc_precondition")
                                  else n for n in sorted(_MAKERS)])   # (~12 s; the batched grouping: dgc, dgc_sample)
def test_batched_equals_leaf_by_leaf_bitwise(name, monkeypatch):
  if name == "dgc_precondition" and "xla_backend_optimization_level=0" in os.environ.get("XLA_FLAGS", "") and \
      tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11):
    # (jax 0.11's XLA:CPU keeps its MLIR fusion emitters, which conftest.py turns off on 0.10 only: at level 0 the
    # preconditioned values differ by 1 ulp in more entries, and the first step's RMS-scaled magnitudes are nearly
    # all equal, so 6 entries of a leaf flipped in session 45's run; at the default level the paths agree)
    pytest.skip("at XLA optimisation level 0 on jax 0.11 near-ties flip in several entries; run with "
                "MLSYS_JAX_TEST_XLA_OPT=1 (conftest.py)")
  (one, one_hlo), (bat, bat_hlo) = (_run(b, _MAKERS[name], monkeypatch) for b in (False, True))
  if name == "dgc_precondition":
    # The precondition's arithmetic is fused into the stacking in one path and not the other: at the tests' XLA
    # optimisation level (0) the preconditioned values differ by 1 ulp (identical at the default level), which
    # can flip a near-tie in the selection: values to 1 ulp, at most one entry per leaf and step sent differently.
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(bat)):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      both = (a != 0) & (b != 0)
      np.testing.assert_allclose(a[both], b[both], rtol=1e-6, atol=0)
      assert int(np.sum((a == 0) != (b == 0))) <= 1
  else:
    assert _same(one, bat)
  for u, _ in bat:   # something is sent in every leaf
    assert all(float(jnp.sum(jnp.abs(x.astype(jnp.float32)))) > 0 for x in jax.tree_util.tree_leaves(u))
  # the batched program holds fewer top_k instances (the sampled thresholds): one per (size, dtype) group
  assert bat_hlo.count("top_k") < one_hlo.count("top_k")


@pytest.mark.parametrize("make", [lambda: topk(0.05, per_tensor=True), lambda: randomk(0.05, per_tensor=True)],
                         ids=["topk", "randomk"])
def test_topk_and_randomk_stay_leaf_by_leaf(make, monkeypatch):
  (_, one_hlo), (_, bat_hlo) = (_run(b, make, monkeypatch, steps=1) for b in (False, True))
  assert bat_hlo == one_hlo


@pytest.mark.slow   # (~10 s; both branch modes of dgc leaf by leaf: tests/test_comm_dgc_branch_free.py)
def test_dgc_under_both_branch_modes(monkeypatch):
  """The batched path under lax.cond (CPU default) and branch-free (GPU default): the same updates."""
  outs = {}
  for mode in ("cond", "where"):
    monkeypatch.setattr(sp, "_BRANCHES", mode)
    outs[mode] = _run(True, _MAKERS["dgc"], monkeypatch)[0]
  assert _same(outs["cond"], outs["where"])


def test_under_shard_map_replicas_identical(monkeypatch):
  devs = jax.devices()[:4]
  if len(devs) < 4:
    pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = Mesh(np.asarray(devs), ("d",))
  rng = np.random.default_rng(5)
  grads = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[_grad(rng, w) for w in range(4)])

  def run(batch):
    monkeypatch.setattr(sp, "_BATCH_LEAVES", batch)
    return replicated_updates(dgc(0.02, per_tensor=True, axis_name="d"), _params(), grads, mesh)

  a, b = run(False), run(True)
  assert _same(a, b)
  for leaf in jax.tree_util.tree_leaves(b):
    for w in range(1, 4):
      np.testing.assert_array_equal(np.asarray(leaf, np.float32)[0], np.asarray(leaf, np.float32)[w])


def test_quoted_cpu_compile_figures():
  """sparse.py's comment on _BATCH_LEAVES quotes benchmarks/results/per_tensor_compile_cpu_s25.json."""
  import json
  import pathlib
  res = json.loads((pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" /
                    "per_tensor_compile_cpu_s25.json").read_text())
  r = {x["row"]: x for x in res["rows"]}
  assert res["div"] == 8 and all(x["leaves"] == 161 for x in r.values())
  assert [round(r[k]["compile_s"], 1) for k in ("dgc:cond:1", "dgc:cond:0", "dgc:where:1", "dgc:where:0")] == \
      [30.8, 42.6, 33.7, 48.9]
  assert [round(r[k]["run_ms"], 1) for k in ("dgc:cond:1", "dgc:cond:0", "dgc:where:1", "dgc:where:0")] == \
      [42.7, 36.6, 41.2, 35.1]
  for m in ("cond", "where"):   # less compile time, more run time
    assert r[f"dgc:{m}:1"]["compile_s"] < r[f"dgc:{m}:0"]["compile_s"]
    assert r[f"dgc:{m}:1"]["run_ms"] > r[f"dgc:{m}:0"]["run_ms"]


def test_auto_batches_on_gpu_only(monkeypatch):
  """``_BATCH_LEAVES = "auto"`` (the default) batches on GPU only (H100 session 26: compile 51 s against 115 s,
  +5.39 against +18.08 ms per step); True / False force it; anything else is refused by name."""
  assert sp._BATCH_LEAVES == "auto"
  for backend, want in (("gpu", True), ("cpu", False), ("tpu", False)):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert sp._batch_leaves() is want
  monkeypatch.setattr(sp, "_BATCH_LEAVES", True)
  assert sp._batch_leaves() is True
  monkeypatch.setattr(sp, "_BATCH_LEAVES", "yes")
  with pytest.raises(ValueError, match="_BATCH_LEAVES"):
    sp._batch_leaves()


def test_auto_on_gpu_traces_the_batched_form(monkeypatch):
  """With the backend reported as GPU, "auto" builds the same program as ``_BATCH_LEAVES = True`` (one selection
  per leaf size), and on the CPU the leaf-by-leaf one."""
  import optax  # noqa: F401
  def text(batch, backend):
    monkeypatch.setattr(sp, "_BATCH_LEAVES", batch)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    tx = dgc(0.02, per_tensor=True, seed=3)
    st = tx.init(_params())
    return jax.jit(tx.update).lower(_grad(np.random.default_rng(0), 1), st).as_text()
  assert text("auto", "gpu") == text(True, "gpu")
  assert text("auto", "cpu") == text(False, "cpu")
  assert text(True, "cpu") != text(False, "cpu")
