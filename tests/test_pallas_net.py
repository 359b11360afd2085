"""mlsys_jax.sched._pallas_net: Inception-V3 with its Inception-A/C/E blocks as Pallas level kernels (Pallas
interpreter on the CPU, tiny width and resolution) against the flax network in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.models import ios_nets
from mlsys_jax.sched import _pallas_block as pb
from mlsys_jax.sched import _pallas_net as pn
from _triton import cuda_target  # tests/_triton.py


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def small_net():
  m, shape = ios_nets.ios_benchmark_nets(small=True)["inception_v3"]   # width 0.125, 75x75
  v = ios_nets.ios_init_params(m, shape, seed=0)
  x = jnp.asarray(np.random.default_rng(1).standard_normal(shape, np.float32))
  return m, v, x, jax.jit(lambda u: m.apply(v, u))(x)


def _check_equal(m, v, x, ref, blocks):
  t16 = pb.BlockConfig(bm=16, bn=16, bk=16)
  cfgs = {n: t16 for n in blocks}
  if "Mixed_7c" in cfgs:   # per-level configurations in one E block
    cfgs["Mixed_7c"] = (t16, t16._replace(bk=32, k_mode="flat"))
  # (split-K is tested in test_pallas_block.py: here it would double the interpreter's compile time)
  net = pn.pallas_inception_v3(m, v, configs=cfgs, blocks=blocks)
  assert net.levels() == {n: 5 if n.startswith("Mixed_6") else 3 for n in blocks}
  y = jax.jit(net)(x)
  assert y.shape == ref.shape == (1, 256)
  assert _rel(y, ref) < 1e-5
  return y


def test_one_block_of_each_kind_pallas_matches_flax(small_net):
  # the last block of each kind (the largest conv offsets of its group); every block: the slow test below
  m, v, x, ref = small_net
  y = _check_equal(m, v, x, ref, ["Mixed_5d", "Mixed_6e", "Mixed_7c"])
  # the comparison sees a wrong weight in the last Pallas block: the same check against a perturbed network
  p = dict(v["params"])
  p["Conv_90"] = {**p["Conv_90"], "kernel": p["Conv_90"]["kernel"] * 1.01}     # Mixed_7c's bda (1x3)
  assert _rel(y, jax.jit(m.apply)({"params": p}, x)) > 1e-4


@pytest.mark.slow
def test_all_blocks_pallas_match_flax(small_net):
  # all nine blocks as Pallas (~3x the interpreter's compile time of the test above)
  m, v, x, ref = small_net
  _check_equal(m, v, x, ref, list(pn.PALLAS_BLOCKS))


def test_no_pallas_blocks_is_the_flax_network(small_net):
  # the XLA part (stem, reductions, head, and every block when none is emitted) mirrors InceptionV3 exactly
  m, v, x, ref = small_net
  net = pn.pallas_inception_v3(m, v, blocks=[])
  assert net.blocks == {}
  np.testing.assert_allclose(np.asarray(jax.jit(net)(x)), np.asarray(ref), rtol=1e-6, atol=1e-7)


def test_default_configs_follow_dtype():
  f32, bf16 = pn.default_configs(jnp.float32), pn.default_configs(jnp.bfloat16)
  assert set(f32) == set(bf16) == set(pn.PALLAS_BLOCKS)
  assert f32["Mixed_6b"].split_steps == 4 and bf16["Mixed_6b"].split_steps == 0
  assert f32["Mixed_5b"] == bf16["Mixed_5b"] == pb.BlockConfig(bm=32, bn=32, bk=64, k_mode="flat")


def test_bad_inputs(small_net):
  m, v, _, _ = small_net
  with pytest.raises(ValueError, match="cannot run as Pallas.*stride-2"):
    pn.pallas_inception_v3(m, v, blocks=["Mixed_6a"])
  with pytest.raises(ValueError, match="unknown block 'Mixed_9z'"):
    pn.pallas_inception_v3(m, v, configs={"Mixed_9z": pb.BlockConfig()})
  with pytest.raises(ValueError, match="cannot run as Pallas"):
    pn.pallas_inception_v3(m, v, configs={"head": pb.BlockConfig()})
  with pytest.raises(ValueError, match="not emitted"):
    pn.pallas_inception_v3(m, v, blocks=["Mixed_5b"], configs={"Mixed_6b": pb.BlockConfig()})
  with pytest.raises(ValueError, match="Mixed_5b: BlockConfig.bm"):
    pn.pallas_inception_v3(m, v, blocks=["Mixed_5b"], configs={"Mixed_5b": pb.BlockConfig(bm=24)})
  with pytest.raises(ValueError, match="InceptionV3"):
    pn.pallas_inception_v3(ios_nets.SqueezeNet(), v)
  bad = dict(v["params"])
  bad["Conv_32"] = {**bad["Conv_32"], "kernel": bad["Conv_32"]["kernel"][:, :1]}   # Mixed_6b's 1x7 as 1x1
  with pytest.raises(ValueError, match="Conv_32 should be a 1x7"):
    pn.pallas_inception_v3(m, {"params": bad})
  with pytest.raises(ValueError, match="Conv_32 must hold 'kernel' and 'bias'"):     # was a KeyError
    pn.pallas_inception_v3(m, {"params": {**bad, "Conv_32": {"kernel": v["params"]["Conv_32"]["kernel"]}}})
  with pytest.raises(ValueError, match=r"the string 'Mixed_5b' \(use \['Mixed_5b'\]\)"):   # was "unknown block 'M'"
    pn.pallas_inception_v3(m, v, blocks="Mixed_5b")
  with pytest.raises(ValueError, match="Conv_0 .. Conv_93"):
    pn.pallas_inception_v3(m, {"params": {k: bad[k] for k in list(bad)[:10]}})
  net = pn.pallas_inception_v3(m, v, blocks=["Mixed_5b"], configs={"Mixed_5b": pb.BlockConfig(16, 16, 16)},
                               dtype=jnp.bfloat16)     # the float32 network computes float32 at Mixed_5b
  with pytest.raises(ValueError, match="built for bfloat16"):
    jax.eval_shape(net, jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))


def test_lowers_to_triton_for_cuda(small_net):
  # the GPU path (interpret=False) through Pallas's Triton lowering, here without a GPU: one Triton kernel per
  # level of every emitted block, with the default (H200) tiles, and the XLA parts' convs stay convolutions
  from jax._src.pallas.triton import lowering as tl
  m, v, x, _ = small_net
  seen, hooked = [], tl.lower_jaxpr_to_triton_module

  def capture(*a, **k):
    seen.append(1)
    return hooked(*a, **k)

  net = pn.pallas_inception_v3(m, v, interpret=False)
  try:
    tl.lower_jaxpr_to_triton_module = capture
    with cuda_target():
      text = jax.jit(net).trace(jax.ShapeDtypeStruct(x.shape, x.dtype)).lower(lowering_platforms=("cuda",)).as_text()
  finally:
    tl.lower_jaxpr_to_triton_module = hooked
  assert len(seen) == sum(net.levels().values()) == 5 * 3 + 4 * 5    # A and E: 3 levels, C: 5
  assert text.count("stablehlo.convolution") == 5 + 4 + 6             # stem, Mixed_6a, Mixed_7a
