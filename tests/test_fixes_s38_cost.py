"""Regression tests for session-38 fixes in mlsys_jax.cost (metrics, graph, hlo)."""

import numpy as np
import pytest

from mlsys_jax import cost
from mlsys_jax.cost import graph as G
from mlsys_jax.cost import hlo as H
from mlsys_jax.cost import metrics as M


# --- 1. fit_roofline rejects non-finite / negative flops and nbytes --------------------------------

@pytest.mark.parametrize("flops, nbytes, name, idx", [
    ([1e9, np.nan], [1e9, 1e9], "flops", 1),
    ([1e9, 1e9], [np.nan, 1e9], "nbytes", 0),
    ([1e9, np.inf], [1e9, 1e9], "flops", 1),
    ([1e9, 1e9, 1e9], [1e9, 1e9, -1.0], "nbytes", 2),
])
def test_fit_roofline_rejects_bad_flops_nbytes(flops, nbytes, name, idx):
  y = [1e-3] * len(flops)
  with pytest.raises(ValueError, match=rf"{name} must be finite and >= 0, got .* at index {idx}"):
    M.fit_roofline(flops, nbytes, y)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fit_roofline_no_finite_error_raises_clearly():
  # Finite but absurd: every relative error |t - y| / y overflows to inf, so no finite error exists
  # (the old code then crashed unpacking None).
  with pytest.raises(ValueError, match="no rates with a finite error"):
    M.fit_roofline([1e300, 1e300], [1e300, 1e300], [1e-300, 1e-300], objective="mape")


def test_fit_roofline_still_fits():
  rng = np.random.default_rng(0)
  f, b = rng.uniform(1e8, 1e11, 32), rng.uniform(1e6, 1e9, 32)
  y = np.maximum(f / 1e13, b / 1e12)
  r = M.fit_roofline(f, b, y)
  assert np.isfinite(r.flops_per_s if hasattr(r, "flops_per_s") else r[0])


# --- 2. unbatch_graph index checks -----------------------------------------------------------------

def _small_graph():
  text = "HloModule m\nENTRY e {\n  p = f32[4]{0} parameter(0)\n  ROOT n = f32[4]{0} negate(p)\n}\n"
  return G.program_graph(H.parse_hlo(text))


def test_unbatch_graph_negative_index_like_python():
  g1 = _small_graph()
  g2 = G.batch_graphs([g1, g1, g1])
  b = G.batch_graphs([g1, g2])  # graphs of sizes 2, 2, 2, 2
  last = G.unbatch_graph(b, -1)
  ref = G.unbatch_graph(b, b.num_graphs - 1)
  assert last.opcode.shape == (2,)
  for x, y in zip(last, ref):
    np.testing.assert_array_equal(x, y)
  first = G.unbatch_graph(b, -b.num_graphs)
  for x, y in zip(first, g1):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("i", [2, 5, -3, -10])
def test_unbatch_graph_out_of_range_raises(i):
  g = _small_graph()
  b = G.batch_graphs([g, g])
  with pytest.raises(IndexError, match=r"out of range for a batch of 2 graph\(s\).*\[-2, 2\)"):
    G.unbatch_graph(b, i)


def test_unbatch_graph_non_integer_index():
  g = _small_graph()
  with pytest.raises(TypeError, match="integer graph index"):
    G.unbatch_graph(G.batch_graphs([g, g]), 0.5)


# --- 3. parse_shape rejects unknown dtypes and non-permutation layouts ----------------------------

@pytest.mark.parametrize("text", ["foo[3]", "foo[3]{0}", "f31[2,2]", "(f32[2], qq[1])", "blob"])
def test_parse_shape_unknown_dtype(text):
  with pytest.raises(ValueError, match="unknown HLO element type"):
    H.parse_shape(text)


@pytest.mark.parametrize("text", ["f32[2,3]{1,0,2}", "f32[2]{5}", "f32[2,3]{0,0}", "f32[2,3]{0}",
                                  "f32[]{0}", "f32[2,3]{1,2:T(8,128)}"])
def test_parse_shape_layout_must_be_permutation(text):
  with pytest.raises(ValueError, match="permutation"):
    H.parse_shape(text)


@pytest.mark.parametrize("text, layout", [
    ("f32[2,3]{1,0}", (1, 0)), ("f32[2,3]{0,1}", (0, 1)), ("f32[]{}", ()),
    ("bf16[8,128]{1,0:T(8,128)(2,1)S(1)}", (1, 0)), ("f32[8]{0:T(128)}", (0,)),
    ("s4[4,2]{1,0:E(4)}", (1, 0)), ("b(f32[8]{0})", (0,)),
])
def test_parse_shape_valid_layouts_still_parse(text, layout):
  assert H.parse_shape(text).layout == layout


def test_parse_shape_token_and_every_known_dtype():
  assert H.parse_shape("token[]").num_bytes == 0 and H.parse_shape("token").dtype == "token"
  for dt, nb in H.DTYPE_BYTES.items():
    if dt in ("token", "opaque"):
      continue
    assert H.parse_shape(f"{dt}[8]{{0}}").num_bytes == 8 * nb


def test_shape_num_bytes_unknown_dtype_raises():
  with pytest.raises(ValueError, match="unknown HLO element type 'foo'"):
    H.Shape("foo", (3,)).num_bytes


# --- 4. kernel_io_bytes sums exactly (float64) -----------------------------------------------------

_BIG = 16777217  # 2**24 + 1 elements: 4 * _BIG bytes is not a float32


def test_kernel_io_bytes_exact_above_float32():
  text = (f"HloModule m\nENTRY e {{\n  p = f32[{_BIG}]{{0}} parameter(0)\n"
          f"  ROOT n = f32[{_BIG}]{{0}} negate(p)\n}}\n")
  mod = H.parse_hlo(text)
  g = G.program_graph(mod)
  exact = 2 * 4 * _BIG
  assert exact == 134217736
  assert sum(k["bytes"] for k in G.kernel_costs(mod)) == exact
  assert float(G.kernel_io_bytes(g).sum()) == exact
  # batched and padded batches too
  b = G.batch_graphs([g, g])
  assert float(G.kernel_io_bytes(b).sum()) == 2 * exact
  p = G.pad_graph(b, 8, 8, 8, 3)
  assert float(G.kernel_io_bytes(p).sum()) == 2 * exact
  # the float32 model feature is unchanged
  assert g.attrs.dtype == np.float32


def test_kernel_io_bytes_repeated_operand_and_kernel_graphs():
  text = ("HloModule m\nENTRY e {\n  p = f32[4]{0} parameter(0)\n"
          "  ROOT a = f32[4]{0} add(p, p)\n}\n")
  mod = H.parse_hlo(text)
  g = G.program_graph(mod)
  assert float(G.kernel_io_bytes(g).sum()) == sum(k["bytes"] for k in G.kernel_costs(mod)) == 48.0
  (_, kg), = G.kernel_graphs(mod)
  assert float(G.kernel_io_bytes(kg).sum()) == 48.0  # operands not nodes: float32 attribute fallback
