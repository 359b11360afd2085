"""Tests of the IOS benchmark networks (mlsys_jax.models.ios_nets): operator counts, RandWire graphs,
numerics against a float64 numpy reference, dtypes and jit."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax import models
from mlsys_jax.models import ios_nets

CONV = "conv_general_dilated"
POOLS = ("reduce_window_max", "reduce_window_sum", "reduce_sum")


def _trace(model, shape, dtype=jnp.float32):
  """(primitive counts of the forward jaxpr, output aval, parameter count); nothing is computed."""
  x = jax.ShapeDtypeStruct(shape, dtype)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  closed = jax.make_jaxpr(model.apply)(params, x)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
  return Counter(e.primitive.name for e in closed.jaxpr.eqns), closed.out_avals[0], n_params


FULL_OUT = {"inception_v3": 2048, "squeezenet": 1000, "randwire": 1280, "nasnet": 20 * 168}


@pytest.mark.parametrize("name", ["inception_v3", "squeezenet", "randwire", "nasnet"])
def test_full_size_operator_counts_match_ios(name):
  model, shape = models.ios_benchmark_nets()[name]
  c, out, n_params = _trace(model, shape)
  want = models.IOS_OP_COUNTS[name]
  assert c[CONV] == want["conv"]
  assert sum(c[p] for p in POOLS) == want["pool"]
  assert c["reduce_sum"] == 1  # the final global average pool, nothing else reduces
  assert out.shape == (1, FULL_OUT[name])
  if name == "inception_v3":  # convolutions only: torchvision's 27.2M minus the 2.0M fc, 3.3M aux head
    assert 21.7e6 < n_params < 21.9e6
  if name == "squeezenet":  # SqueezeNet 1.0 (1,248,424) plus the four 1x1 bypass convs
    bypass = 96 * 128 + 128 * 256 + 256 * 384 + 384 * 512 + (128 + 256 + 384 + 512)
    assert n_params == 1_248_424 + bypass


def test_nasnet_counts_follow_the_cell_formula():
  # stem conv + stem0 (1 + 10 x 2) + stem1 (3 + 20) + 3 first cells (3 + 20) + 2 reductions (2 + 20)
  # + 3 * num_normal normal cells (2 + 20); pools: 4 + 4 + 3 * 3 + 2 * 4 + 9 * num_normal + 1.
  conv = lambda n: 1 + 21 + 23 + 69 + 44 + 66 * n
  pool = lambda n: 26 + 9 * n
  c, out, _ = _trace(models.NasNetA(stem_filters=8, filters=8, num_normal=1), (1, 64, 64, 3))
  assert (c[CONV], sum(c[p] for p in POOLS)) == (conv(1), pool(1))
  assert out.shape == (1, 160)
  assert (conv(5), pool(5)) == (models.IOS_OP_COUNTS["nasnet"]["conv"],
                                models.IOS_OP_COUNTS["nasnet"]["pool"])


def test_small_configs_keep_the_operator_graphs():
  small = models.ios_benchmark_nets(small=True)
  for name in ("squeezenet", "randwire"):
    c, _, _ = _trace(*small[name])
    assert c[CONV] == models.IOS_OP_COUNTS[name]["conv"], name
    assert sum(c[p] for p in POOLS) == models.IOS_OP_COUNTS[name]["pool"], name


def test_watts_strogatz_is_deterministic_and_keeps_the_edge_count():
  for n, k, p, seed in ios_nets.RANDWIRE_LARGE_GRAPHS:
    e = models.watts_strogatz_dag(n, k, p, seed)
    assert e == models.watts_strogatz_dag(n, k, p, seed)
    assert len(e) == n * k // 2 and len(set(e)) == len(e)
    assert all(0 <= u < v < n for u, v in e)
  graphs = [models.watts_strogatz_dag(32, 4, 0.75, s) for s in (3, 4, 5)]
  assert len(set(graphs)) == 3
  # p = 0 leaves the ring lattice: i linked to i +- 1, i +- 2 (mod n).
  lattice = {tuple(sorted((i, (i + j) % 10))) for i in range(10) for j in (1, 2)}
  assert set(models.watts_strogatz_dag(10, 4, 0.0, 0)) == lattice
  # p = 1 rewires every lattice edge (i, i + j) of the first node.
  assert not {(0, 1), (0, 2)} & set(models.watts_strogatz_dag(10, 4, 1.0, 0))


@pytest.mark.parametrize("args,match", [((10, 3, 0.5, 0), "even"), ((4, 4, 0.5, 0), "larger than k"),
                                        ((10, 4, 1.5, 0), r"\[0, 1\]")])
def test_watts_strogatz_rejects_bad_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    models.watts_strogatz_dag(*args)


def _np_conv(x, w, b, stride, pad, groups):
  """float64 NHWC convolution with symmetric zero padding and feature groups."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw, cig, co = w.shape
  n, h, wd, _ = x.shape
  ho, wo = (h - kh) // stride + 1, (wd - kw) // stride + 1
  cog = co // groups
  y = np.zeros((n, ho, wo, co))
  for g in range(groups):
    xs = x[..., g * cig:(g + 1) * cig]
    for i in range(kh):
      for j in range(kw):
        patch = xs[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :]
        y[..., g * cog:(g + 1) * cog] += patch @ w[i, j, :, g * cog:(g + 1) * cog]
  return y + b


def test_randwire_matches_a_numpy_reference():
  graph = (4, 2, 0.0, 0)  # ring 0-1-2-3-0 -> DAG 0->1, 1->2, 2->3, 0->3: one source, one sink
  model = models.RandWire(channels=4, graphs=(graph,), head_channels=3)
  x = np.random.default_rng(0).standard_normal((1, 8, 8, 3))
  v = models.ios_init_params(model, x.shape, seed=1)
  got = np.asarray(model.apply(v, jnp.asarray(x, jnp.float32)))

  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
  convs = [p[f"Conv_{i}"] for i in range(len(p))]
  it = iter(convs)

  def conv(h, stride, pad, groups=1):
    c = next(it)
    return _np_conv(h, c["kernel"], c["bias"], stride, pad, groups)

  def sep(h, stride):
    h = np.maximum(h, 0)
    return conv(conv(h, stride, 1, groups=h.shape[-1]), 1, 0)

  h = conv(x.astype(np.float64), 2, 1)
  edges = models.watts_strogatz_dag(*graph)
  assert edges == ((0, 1), (0, 3), (1, 2), (2, 3))
  o0 = sep(h, 2)
  o1 = sep(o0, 1)
  o2 = sep(o1, 1)
  o3 = sep(o0 + o2, 1)
  want = conv(np.maximum(o3, 0), 1, 0).mean(axis=(1, 2))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)


def test_jit_runs_on_small_squeezenet():
  model, shape = models.ios_benchmark_nets(small=True)["squeezenet"]
  v = models.ios_init_params(model, shape)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=shape), jnp.float32)
  y = jax.jit(model.apply)(v, x)
  assert y.shape == (1, 16) and bool(jnp.all(jnp.isfinite(y)))
  assert bool(jnp.all(y >= 0)) and float(y.max()) > 0  # the last conv has a ReLU, then a mean


def test_init_params_structure_dtype_and_scale():
  model, shape = models.ios_benchmark_nets(small=True, dtype=jnp.bfloat16)["squeezenet"]
  v = models.ios_init_params(model, shape, seed=3)
  ref = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, jnp.float32))
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(ref)
  assert all(a.shape == b.shape and a.dtype == jnp.bfloat16
             for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(ref)))
  k = np.asarray(v["params"]["Conv_29"]["kernel"], np.float32)  # the last 1x1 conv, 128 -> 16
  assert abs(k.std() - np.sqrt(2.0 / np.prod(k.shape[:3]))) < 0.05 * np.sqrt(2.0 / np.prod(k.shape[:3]))
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  assert jax.eval_shape(model.apply, v, x).dtype == jnp.bfloat16


def test_injected_conv_is_used_for_every_convolution():
  calls = []

  def counting_conv(*a, **k):
    calls.append(1)
    return jax.lax.conv_general_dilated(*a, **k)

  _, shape = models.ios_benchmark_nets(small=True)["squeezenet"]
  model = models.SqueezeNet(width=0.25, num_classes=16, conv_general_dilated=counting_conv)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  calls.clear()
  jax.eval_shape(model.apply, params, x)
  assert len(calls) == models.IOS_OP_COUNTS["squeezenet"]["conv"]


@pytest.mark.parametrize("model,shape,match", [
    (models.InceptionV3(), (1, 299, 299), "rank 4"),
    (models.InceptionV3(), (1, 64, 64, 3), "at least 75x75"),
    (models.NasNetA(filters=10), (1, 64, 64, 3), "multiple of 4"),
])
def test_bad_inputs_raise(model, shape, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, jnp.float32))
