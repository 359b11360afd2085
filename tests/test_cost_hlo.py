"""Tests of mlsys_jax.cost HLO capture, parsing and graph building."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax import cost
from mlsys_jax.cost import graph as graph_lib
from mlsys_jax.cost import hlo as hlo_lib
from mlsys_jax.cost import programs

DATA = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "mlsys_jax", "cost", "data", "*.npz")))


def _check_graph(g: cost.HloGraph):
  n, e = int(g.n_node.sum()), int(g.n_edge.sum())
  assert g.opcode.shape == (n,) and g.attrs.shape == (n, graph_lib.NUM_ATTRS)
  assert g.senders.shape == (e,) and g.receivers.shape == (e,)
  if e:
    assert g.senders.min() >= 0 and g.senders.max() < n
    assert g.receivers.min() >= 0 and g.receivers.max() < n
  assert g.kernel.min() >= 0 and g.kernel.max() < int(g.n_kernel.sum())
  assert np.all(g.opcode > 0)  # no padding opcode, no unknown opcode in real graphs
  assert np.all(g.opcode != 1), [graph_lib.OPCODES[o] for o in g.opcode]


def test_parse_shape():
  s = cost.parse_shape("f32[8,16]{1,0}")
  assert s == hlo_lib.Shape("f32", (8, 16), (1, 0)) and s.num_bytes == 512
  t = cost.parse_shape("(bf16[4]{0}, s32[], (pred[2]{0}))")
  assert t.is_tuple and t.num_bytes == 8 + 4 + 2
  assert cost.parse_shape("f32[<=10,3]{1,0:T(8,128)}").dims == (10, 3)
  assert cost.parse_shape("token[]").num_elements == 1
  with pytest.raises(ValueError):
    cost.parse_shape("f32[8,x]")


def test_capture_matmul_flops_match_xla():
  cap = cost.capture(jnp.dot, jnp.ones((64, 32)), jnp.ones((32, 16)))
  mod = cost.parse_hlo(cap.hlo_text)
  kc = cost.kernel_costs(mod)
  assert sum(k["flops"] for k in kc) == 2 * 64 * 32 * 16 == cap.cost["flops"]
  # Bytes of the kernel: both operands read, output written once.
  assert max(k["bytes"] for k in kc) == 4 * (64 * 32 + 32 * 16 + 64 * 16)
  assert cost.capture_kernels(jnp.dot, jnp.ones((64, 32)), jnp.ones((32, 16))) == kc


def test_conv_flops_closed_form():
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  cap = cost.capture(f, x, w)
  flops = sum(k["flops"] for k in cost.kernel_costs(cost.parse_hlo(cap.hlo_text)))
  assert flops == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)


def test_strip_metadata_keeps_graph():
  cap = cost.capture(lambda x: jax.nn.softmax(jnp.tanh(x), -1).sum(), jnp.ones((8, 16)))
  g1 = cost.program_graph(cost.parse_hlo(cap.hlo_text))
  stripped = cost.strip_metadata(cap.hlo_text)
  assert "metadata=" not in stripped and "StackFrames" not in stripped
  g2 = cost.program_graph(cost.parse_hlo(stripped))
  for a, b in zip(g1, g2):
    np.testing.assert_array_equal(a, b)


def test_program_graph_structure():
  cap = cost.capture(lambda x, w: jnp.tanh(x @ w) + 1.0, jnp.ones((4, 8)), jnp.ones((8, 2)))
  mod = cost.parse_hlo(cap.hlo_text)
  g = cost.program_graph(mod)
  _check_graph(g)
  n_entry = len(mod.entry.instructions)
  assert int(g.n_kernel[0]) == n_entry
  # Every instruction of the entry plus every instruction of fused/called computations is a node.
  called = list(hlo_lib.iter_called(mod, mod.entry))
  assert int(g.n_node[0]) == n_entry + sum(len(c.instructions) for c in called)
  # Each operand edge inside a computation is present.
  edges = set(zip(g.senders.tolist(), g.receivers.tolist()))
  assert sum(len(i.operands) for i in mod.entry.instructions) <= len(edges)
  kg = cost.kernel_graphs(mod)
  assert len(kg) >= 1 and all(int(k.n_kernel[0]) == 1 for _, k in kg)


@pytest.mark.parametrize("family", programs.FAMILIES)
def test_parse_every_family_cpu(family):
  rng = np.random.default_rng(3)
  spec = programs.sample_program(family, rng, "cpu")
  for name, opts in programs.option_variants("cpu")[:1]:
    cap = cost.capture(spec.fn, *spec.args, compiler_options=opts or None)
    g = cost.program_graph(cost.parse_hlo(cap.hlo_text))
    _check_graph(g)
    x = cost.node_features(g)
    assert x.shape == (int(g.n_node[0]), cost.NUM_NODE_FEATURES) and np.isfinite(x).all()


def test_while_loop_and_conditional():
  def f(x, p):
    y = jax.lax.fori_loop(0, 5, lambda i, c: jnp.sin(c) * 1.1, x)
    return jax.lax.cond(p > 0, lambda a: a + 1, lambda a: a * 2, y)
  cap = cost.capture(f, jnp.ones((16,)), 1.0)
  mod = cost.parse_hlo(cap.hlo_text)
  ops = {i.opcode for c in mod.computations.values() for i in c.instructions}
  assert "while" in ops
  _check_graph(cost.program_graph(mod))


GPU_HLO = """HloModule jit_fn, is_scheduled=true, entry_computation_layout={(f32[64,32]{1,0}, f32[32,16]{1,0})->f32[64,16]{1,0}}

%fused_relu (param_0: f32[64,16]) -> f32[64,16] {
  %param_0 = f32[64,16]{1,0} parameter(0)
  %c = f32[] constant(0)
  %b = f32[64,16]{1,0} broadcast(%c), dimensions={}
  ROOT %m = f32[64,16]{1,0} maximum(%param_0, %b)
}

%gemm_fusion_dot (p0: f32[64,32], p1: f32[32,16]) -> f32[64,16] {
  %p0 = f32[64,32]{1,0} parameter(0)
  %p1 = f32[32,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.3 (x.1: f32[64,32], w.1: f32[32,16]) -> f32[64,16] {
  %x.1 = f32[64,32]{1,0} parameter(0), metadata={op_name="x"}
  %w.1 = f32[32,16]{1,0} parameter(1), metadata={op_name="w"}
  %gemm = f32[64,16]{1,0} fusion(%x.1, %w.1), kind=kCustom, calls=%gemm_fusion_dot, backend_config={"fusion_backend_config":{"kind":"__triton_gemm","triton_gemm_config":{"block_m":"32","block_n":"16","block_k":"32","split_k":"1","num_stages":"4","num_warps":"2","num_ctas":"1"}}}
  %cc = (f32[64,16]{1,0}, s8[1024]{0}) custom-call(%x.1, %w.1), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %gte = f32[64,16]{1,0} get-tuple-element(%cc), index=0
  %sum = f32[64,16]{1,0} add(%gemm, %gte)
  ROOT %relu = f32[64,16]{1,0} fusion(%sum), kind=kLoop, calls=%fused_relu
}
"""


def test_gpu_dialect_text():
  mod = cost.parse_hlo(GPU_HLO)
  g = cost.program_graph(mod)
  _check_graph(g)
  A = graph_lib.ATTR_ID
  gemm = [i for i, o in enumerate(g.opcode) if graph_lib.OPCODES[o] == "fusion"
          and g.attrs[i, A["fusion_kind"]] == graph_lib.FUSION_KINDS.index("kCustom")]
  assert len(gemm) == 1
  assert g.attrs[gemm[0], A["block_m"]] == 32 and g.attrs[gemm[0], A["num_warps"]] == 2
  cc = [i for i, o in enumerate(g.opcode) if graph_lib.OPCODES[o] == "custom-call"][0]
  assert g.attrs[cc, A["custom_target"]] == graph_lib.CUSTOM_TARGETS.index("gemm")
  kc = {k["name"]: k for k in cost.kernel_costs(mod)}
  assert kc["gemm"]["flops"] == kc["cc"]["flops"] == 2 * 64 * 32 * 16
  assert kc["relu"]["fusion_kind"] == "kLoop" and kc["gte"]["trivial"]


@pytest.mark.parametrize("bad, line, what", [
    ("  %b = f32[64,16]{1,0} broadcast(%c, dimensions={}", 6, "unbalanced"),
    ("  %b = f32[64,1x]{1,0} broadcast(%c), dimensions={}", 6, "dimension"),
    ("  %b = f32[64,16]{1,0} broadcast(%nope), dimensions={}", 6, "not defined"),
    ("  %b f32[64,16]{1,0} broadcast(%c), dimensions={}", 6, "expected an instruction"),
])
def test_malformed_reports_line(bad, line, what):
  lines = GPU_HLO.splitlines()
  assert "%b = f32[64,16]{1,0} broadcast(%c)" in lines[line - 1]
  lines[line - 1] = bad
  with pytest.raises(cost.HloParseError) as e:
    cost.parse_hlo("\n".join(lines))
  assert e.value.lineno == line and what in str(e.value) and f"line {line}" in str(e.value)


def test_malformed_structure():
  with pytest.raises(cost.HloParseError, match="not closed"):
    cost.parse_hlo(GPU_HLO.rstrip().rstrip("}"))
  # No header: XLA accepts it, so do we (the module is named after its entry).
  assert cost.parse_hlo("ENTRY %m () -> f32[] {\n  ROOT %c = f32[] constant(1)\n}").name == "module_m"
  with pytest.raises(cost.HloParseError, match="no computation"):
    cost.parse_hlo("HloModule x")
  with pytest.raises(cost.HloParseError, match="unknown computation"):
    cost.parse_hlo(GPU_HLO.replace("calls=%fused_relu", "calls=%missing"))
  with pytest.raises(TypeError):
    cost.parse_hlo(b"HloModule x")


def test_duplicate_instruction_reports_its_line():
  # The second definition of %c (line 6) is the error, not the computation header (line 3).
  text = GPU_HLO.replace("  %b = f32[64,16]{1,0} broadcast(%c)", "  %c = f32[] constant(1)\n  %b = f32[64,16]{1,0} broadcast(%c)", 1)
  with pytest.raises(cost.HloParseError, match="duplicate instruction name 'c'") as e:
    cost.parse_hlo(text)
  assert e.value.lineno == 6


def test_batch_pad_unbatch_roundtrip():
  gs = [cost.program_graph(cost.parse_hlo(cost.capture(f, jnp.ones((4, 4))).hlo_text))
        for f in (jnp.sin, lambda x: x @ x, lambda x: jnp.exp(x).sum(0))]
  b = cost.batch_graphs(gs)
  for i, g in enumerate(gs):
    for u, v in zip(cost.unbatch_graph(b, i), g):
      np.testing.assert_array_equal(u, v)
  n, e, k = int(b.n_node.sum()), int(b.n_edge.sum()), int(b.n_kernel.sum())
  p = cost.pad_graph(b, n + 5, e + 3, k + 2, 5)
  assert p.opcode.shape == (n + 5,) and p.senders.shape == (e + 3,)
  assert int(p.n_node.sum()) == n + 5 and int(p.n_kernel.sum()) == k + 2 and p.n_node.shape == (5,)
  assert np.all(p.opcode[n:] == 0) and np.all(p.kernel[n:] == k + 1)
  with pytest.raises(ValueError, match="exceed"):
    cost.pad_graph(b, n, e, k + 1, 5)


def test_resnet20_hlo():
  from mlsys_jax.models import ResNet20
  m = ResNet20()
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  v = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)  # abstract variables: no eager init
  cap = cost.capture(lambda v, x: m.apply(v, x), v, x)
  mod = cost.parse_hlo(cap.hlo_text)
  g = cost.program_graph(mod)
  _check_graph(g)
  assert int(g.n_node[0]) > 300
  # Shape-based flops are close to XLA's (XLA also counts a few elementwise ops differently).
  ours = sum(k["flops"] for k in cost.kernel_costs(mod))
  assert 0.8 < ours / cap.cost["flops"] < 1.25


def test_ios_nets_hlo():
  ios = pytest.importorskip("mlsys_jax.models.ios_nets")
  nets = ios.ios_benchmark_nets(small=True)
  assert set(nets) >= {"inception_v3", "squeezenet", "randwire", "nasnet"}
  for name, (m, shape) in nets.items():
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    v = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)  # abstract variables: nothing computed
    lowered = jax.jit(lambda v, x, m=m: m.apply(v, x)).lower(v, x)
    # Pre-optimization HLO of every net (no compile), optimized HLO of the smallest one.
    text = lowered.compiler_ir("hlo").as_hlo_text()
    mod = cost.parse_hlo(text)
    n_conv = sum(i.opcode == "convolution" for c in mod.computations.values() for i in c.instructions)
    if name == "nasnet":  # the small NasNet has fewer cells than IOS's
      assert n_conv > 10
    else:  # one HLO convolution per conv_general_dilated of the net
      assert n_conv == ios.IOS_OP_COUNTS[name]["conv"], (name, n_conv)
    _check_graph(cost.program_graph(mod))
    if name == "squeezenet":
      _check_graph(cost.program_graph(cost.parse_hlo(lowered.compile().as_text())))


@pytest.mark.skipif(not DATA, reason="no committed dataset")
def test_parse_every_collected_program():
  for path in DATA:
    d = cost.load_dataset(path)
    assert len(d) > 100
    for i, text in enumerate(d.hlo):
      mod = cost.parse_hlo(text)  # every collected program parses
      if i % 4 == 0:  # graph checks on a quarter of them (time)
        _check_graph(cost.program_graph(mod))


# ------------------------------------------------------------------------------------------------
# Corpus: every text XLA's own parser accepts goes through parse_hlo + program_graph with finite
# costs; every text it rejects raises HloParseError at the expected line.

import re  # noqa: E402

CORPUS = os.path.join(os.path.dirname(__file__), "data", "hlo")
GOOD = sorted(f for f in glob.glob(os.path.join(CORPUS, "*.hlo")) if not os.path.basename(f).startswith("bad_"))
BAD = sorted(glob.glob(os.path.join(CORPUS, "bad_*.hlo")))


def _read(path):
  with open(path) as f:
    return f.read()


def _same_structure_as_xla(text, mod):
  want = hlo_lib.xla_structure(text)  # raises ValueError if XLA rejects the text
  if want is None:
    return
  assert sorted(mod.computations) == sorted(want)
  for cname, comp in mod.computations.items():
    assert [i.name for i in comp.instructions] == want[cname], cname


def test_corpus_is_there():
  assert len(GOOD) >= 20 and len(BAD) >= 8


@pytest.mark.parametrize("path", GOOD, ids=os.path.basename)
def test_corpus_accepted(path):
  text = _read(path)
  mod = cost.parse_hlo(text)
  _same_structure_as_xla(text, mod)
  g = cost.program_graph(mod)
  _check_graph(g)
  assert np.all(np.isfinite(g.attrs)) and np.all(np.isfinite(g.num_bytes))
  kc = cost.kernel_costs(mod)
  assert all(np.isfinite(k["flops"]) and np.isfinite(k["bytes"]) for k in kc)
  assert np.isfinite(cost.node_features(g)).all()
  # XLA's canonical re-print of the module parses to the same structure.
  parser = hlo_lib.xla_hlo_parser()
  if parser is not None:
    again = cost.parse_hlo(parser(text).to_string())
    assert {c: sorted(i.name for i in v.instructions) for c, v in again.computations.items()} == {
        c: sorted(i.name for i in v.instructions) for c, v in mod.computations.items()}


@pytest.mark.parametrize("path", BAD, ids=os.path.basename)
def test_corpus_rejected_with_line(path):
  text = _read(path)
  want = int(re.search(r"expect-line: (\d+)", text).group(1))
  if hlo_lib.xla_hlo_parser() is not None:
    with pytest.raises(ValueError, match="XLA rejects"):
      hlo_lib.xla_structure(text)
  with pytest.raises(cost.HloParseError) as e:
    cost.parse_hlo(text)
  assert e.value.lineno == want, str(e.value)


def test_grammar_features_parsed_into_values():
  A = graph_lib.ATTR_ID
  # Several lines per instruction: attributes on the continuation lines are kept.
  mod = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_multiline.hlo")))
  d = mod.entry.by_name()["d"]
  assert d.attrs["lhs_contracting_dims"] == "{1}" and d.shape.dims == (8, 4) and d.lineno == 13
  assert sum(k["flops"] for k in cost.kernel_costs(mod)) == 2 * 8 * 16 * 4 + 8 * 4
  # Inferred shapes agree with XLA's shape rules (written out by hand here).
  ins = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_inferred.hlo"))).entry.by_name()
  assert ins["d"].shape.dims == (4, 5) and ins["tr"].shape.dims == (3, 4) and ins["r"].shape.dims == (4,)
  assert ins["cmp"].shape.dtype == "pred" and ins["cat"].shape.dims == (8, 3)
  assert ins["cl"].shape.dims == (4, 3) and ins["g"].shape.dims == (4, 5)
  # Spaces inside shapes; comments (a '//' inside a quoted string is not one).
  sp = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_spaces.hlo"))).entry.by_name()
  assert sp["q"].shape == hlo_lib.Shape("f32", (3, 5), (1, 0)) and sp["d"].operands == ["p", "q"]
  cm = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_comments.hlo")))
  assert cm.entry.root.attrs["metadata"] == '{op_name="a // not a comment"}'
  # TPU tiling and memory space are features, not dropped.
  tpu = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_tpu_layout.hlo")))
  b, c = tpu.entry.by_name()["b"].shape, tpu.entry.by_name()["c"].shape
  assert b.tiles == ((8, 128), (2, 1)) and b.memory_space == 0 and c.memory_space == 1
  g = cost.program_graph(tpu)
  assert g.attrs[2, A["memory_space"]] == 1 and g.attrs[1, A["tile_minor"]] == 128
  assert g.attrs[1, A["tile_second_minor"]] == 8
  # XLA's async syntax sugar (<op>-start/-update/-done without an async pair of its own) becomes
  # async-start/-update/-done around a computation wrapping <op>, as XLA's parser builds it; the
  # wrapped op is a node of the program graph (inlined under its async-start).
  for f, op in [("hand_async_collectives.hlo", "reduce-scatter"), ("hand_fusion_update.hlo", "fusion")]:
    mod = cost.parse_hlo(_read(os.path.join(CORPUS, f)))
    wrapped = mod.computations["async_wrapped"]
    assert [i.opcode for i in wrapped.instructions] == ["parameter", op]
    starts = [i for i in mod.entry.instructions if i.opcode == "async-start"]
    assert len(starts) == 1 and starts[0].attrs["calls"] == "async_wrapped"
    assert wrapped.root.shape == starts[0].shape.elements[1]
    g = cost.program_graph(mod)
    names = {graph_lib.OPCODES[o] for o in g.opcode}
    assert {"async-start", "async-done", op} <= names, names
  rs = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_async_collectives.hlo"))).computations["async_wrapped"]
  assert rs.root.attrs["to_apply"] == "%add" and rs.root.attrs["dimensions"] == "{0}"


def test_unknown_opcode_maps_to_unknown_id():
  text = "ENTRY e {\n  p = f32[4] parameter(0)\n  ROOT q = f32[4] frobnicate-start(p), flavour=new\n}"
  g = cost.program_graph(cost.parse_hlo(text))
  assert graph_lib.OPCODES[g.opcode[1]] == "<unknown>" and np.isfinite(g.attrs).all()
  with pytest.raises(cost.HloParseError, match="cannot infer"):
    cost.parse_hlo(text.replace("f32[4] frobnicate", "frobnicate"))


def test_whitespace_insensitive_matches_one_line_form():
  one = _read(os.path.join(CORPUS, "jax_softmax.hlo"))
  # Put every attribute and operand list on lines of its own; XLA reads it the same.
  spread = re.sub(r", ([a-z_]+=)", r",\n      \1", one).replace("(%", "(\n  %")
  a, b = cost.program_graph(cost.parse_hlo(one)), cost.program_graph(cost.parse_hlo(spread))
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  _same_structure_as_xla(spread, cost.parse_hlo(spread))


def test_names_shared_across_computations_renamed_as_xla_does():
  mod = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_shared_names.hlo")))
  names = {c: [i.name for i in comp.instructions] for c, comp in mod.computations.items()}
  # XLA's NameUniquer: a taken name gets the next free numeric suffix of its root, module-wide.
  assert names == {"sq": ["x", "y", "y.1"], "ng": ["x.1", "y.2"], "entry": ["x.2", "a", "b", "y.3"]}
  ins = mod.entry.by_name()
  assert ins["y.3"].operands == ["a", "b"] and ins["a"].operands == ["x.2"]
  assert mod.computations["ng"].root.operands == ["x.1"]
  deps = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_control_deps.hlo")))
  assert deps.entry.root.name == "c.1" and deps.entry.root.attrs["control-predecessors"] == "{%a.1, %b.1}"
  assert deps.computations["body"].root.attrs["control-predecessors"] == "{%b}"
  uq = hlo_lib._NameUniquer()
  assert [uq(n) for n in ("p", "p", "p.0", "p.7", "p", "__q", "a.b.2")] == [
      "p", "p.1", "p.2", "p.7", "p.3", "a_q", "a.b.2"]


def test_attribute_values_with_spaces():
  mod = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_attr_values.hlo")))
  ins = mod.entry.by_name()
  assert ins["bound"].attrs["literal"] == "s32[] 16"
  assert ins["ag"].attrs["replica_groups"] == "[1,4]<=[4]"
  assert ins["ar"].attrs["replica_groups"] == "mesh['x'=2,'y'=2] {'y'}"
  assert ins["ar"].attrs["to_apply"] == "%sum"


def test_nested_instructions_and_async_sugar():
  mod = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_nested.hlo")))
  ins = mod.entry.by_name()
  assert [i.name for i in mod.entry.instructions][:4] == [
      "parameter.anon", "parameter.anon.1", "exponential.anon", "s"]
  assert ins["s"].operands == ["parameter.anon", "exponential.anon"]
  assert ins["exponential.anon"].operands == ["parameter.anon.1"]
  assert ins["parameter.anon.2"].literal == "2" and ins["n"].operands == ["parameter.anon.2"]
  # Shapes left out inside the nesting are inferred (multiply of f32[6], tuple, get-tuple-element).
  assert ins["multiply.anon"].shape.dims == (6,) and mod.entry.root.shape.dims == (6,)
  assert ins["tuple.anon"].operands == ["s", "multiply.anon"]
  # custom-call-start with two operands: two async_param parameters, attributes moved to the op.
  mod = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_async_sugar.hlo")))
  w = mod.computations["async_wrapped"]
  assert [p.shape.dims for p in w.instructions[:2]] == [(16,), (16,)]
  assert w.root.attrs == {"custom_call_target": '"my_target"'} and w.root.operands == ["async_param", "async_param.1"]
  start = mod.entry.by_name()["cs"]
  assert start.attrs == {"async_execution_thread": '"side"', "calls": "async_wrapped"}
  assert [i.opcode for i in mod.entry.instructions][2:5] == ["async-start", "async-update", "async-done"]
  # The wrapped computation runs once: inlined under async-start only (6 entry + 3 wrapped nodes).
  assert [i.called() for i in mod.entry.instructions[2:5]] == [["async_wrapped"], [], []]
  assert int(cost.program_graph(mod).n_node[0]) == 6 + 3
  with pytest.raises(cost.HloParseError, match="nested operand"):
    cost.parse_hlo("ENTRY e {\n  ROOT r = f32[2] add(f32[2] parameter(0), f32[2,x] parameter(1))\n}")


def test_inline_computations_single_instruction_and_line_ends():
  mod = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_inline_computation.hlo")))
  assert list(mod.computations) == ["_", "_.1", "main"] and mod.entry_name == "main"
  ins = mod.entry.by_name()
  assert ins["f"].attrs["calls"] == "_" and hlo_lib.reducer_opcode(mod, ins["r"]) == "add"
  assert [c.name for c in hlo_lib.iter_called(mod, mod.entry)] == ["_"]
  br = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_inline_branches.hlo")))
  assert br.entry.root.attrs["branch_computations"] == "{_, _.1}" and br.entry.root.shape.dims == (4,)
  assert br.entry.root.called() == ["_", "_.1"]
  # One instruction alone is a module: a parameter per operand, in the entry computation "_".
  one = cost.parse_hlo(_read(os.path.join(CORPUS, "hand_single_instruction.hlo")))
  assert one.name == one.entry_name == "_"
  assert [(i.name, i.opcode, i.literal) for i in one.entry.instructions] == [
      ("lhs", "parameter", "0"), ("rhs", "parameter", "1"), ("d", "dot", None)]
  assert sum(k["flops"] for k in cost.kernel_costs(one)) == 2 * 4 * 16 * 8
  anon = cost.parse_hlo("f32[3] add(f32[3], f32[3])").entry
  assert [i.name for i in anon.instructions] == ["_0", "_1", "_"] and anon.root.operands == ["_0", "_1"]
  with pytest.raises(cost.HloParseError, match="needs its shape"):
    cost.parse_hlo("%m = f32[3] multiply(%a, %b)")
  # DOS (CRLF) and old Mac (CR) line ends read as newlines; '//' comments end at them.
  text = _read(os.path.join(CORPUS, "hand_comments.hlo"))
  want = cost.program_graph(cost.parse_hlo(text))
  for eol in ("\r\n", "\r"):
    other = text.replace("\n", eol)
    _same_structure_as_xla(other, cost.parse_hlo(other))
    for u, v in zip(cost.program_graph(cost.parse_hlo(other)), want):
      np.testing.assert_array_equal(u, v)


def test_buffer_shapes_and_deep_nesting():
  # A buffer shape b(array) is costed as the array it holds.
  assert cost.parse_shape("b(f32[8,16]{1,0})") == cost.parse_shape("f32[8,16]{1,0}")
  mod = cost.parse_hlo("ENTRY e {\n  p = b(f32[8,16]{1,0}) parameter(0)\n  ROOT t = (b(f32[8,16]{1,0}), s32[]) "
                       "tuple(p, s32[] constant(1))\n}")
  assert mod.entry.root.shape.elements[0].dims == (8, 16) and mod.entry.root.operands == ["p", "constant.anon"]
  # Nested operands in a one-instruction text; nesting too deep is a clear error, not a RecursionError.
  deep = "f32[] " + "add(f32[] constant(0), f32[] " * 30 + "constant(0)" + ")" * 30
  one = cost.parse_hlo(deep)
  # XLA looks each operand's name up first (a nested operand's opcode), making parameters of them.
  assert [i.name for i in one.entry.instructions[:4]] == ["constant", "constant.anon", "add", "constant.anon.1"]
  assert len(one.entry.instructions) == 2 + 61 and one.entry.root.name == "_"
  _same_structure_as_xla(deep, one)
  with pytest.raises(cost.HloParseError, match="parameter number"):
    cost.parse_hlo("par0 = f32[3,5] parameter(-1)")
  with pytest.raises(cost.HloParseError, match="nested too deeply"):
    cost.parse_hlo("f32[] " + "negate(f32[] " * 600 + "constant(0)" + ")" * 600)
