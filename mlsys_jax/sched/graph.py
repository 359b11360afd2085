"""Jaxpr -> operator DAG for IOS (Ding et al., "IOS: Inter-Operator Scheduler for CNN Acceleration",
MLSys 2021, Sec. 3: the computation graph whose nodes are operators).

Steps (see ``build_graph``):
  1. trace ``fn`` to a closed jaxpr; inline nested ``jit``/``pjit``, ``closed_call``, ``custom_jvp_call``,
     ``custom_vjp_call`` and ``checkpoint`` so that the program is one flat list of equations over integer
     value ids;
  2. hoist weight-only computation: an equation whose inputs are all constants is evaluated once, at
     schedule time (BN scale/shift, weight reshapes, fake-quantized kernels). Equations that would
     *expand* a constant (``broadcast_in_dim`` to an activation shape, ``iota``) are kept "lazy" and
     re-emitted next to their consumer so that XLA fuses them instead of reading a large constant; a
     constant expression that comes back to the size of the largest constant it derives from (per-channel
     quantization scales broadcast against their kernel: ``w / broadcast(s)``) is evaluated once too;
  3. group equations into *units* (IOS operators): a heavy primitive (conv, dot, pooling, reduction)
     starts a unit and light single-producer equations (bias, BN affine, activation, reshape) attach to it
     as an epilogue; multi-input light equations (add, concatenate) are units of their own, like IOS's
     ``Identity`` nodes; control flow and unknown higher-order primitives become *opaque* units that are
     always scheduled alone;
  4. partition the unit DAG into blocks at cut points (units on every source->sink path, as RAF's port of
     IOS does) and split large blocks into parts of at most ``part_size`` units.

Example:
  >>> import jax, jax.numpy as jnp
  >>> g = build_graph(lambda x: jax.nn.relu(x @ jnp.ones((3, 2))), jnp.ones((1, 3)))
  >>> [u.kind for u in g.units]
  ['dot_general']
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable

import numpy as np
import jax
from jax.extend import core as jex_core

from mlsys_jax._checks import check_int

HEAVY = frozenset({
    "conv_general_dilated", "dot_general", "reduce_window_sum", "reduce_window_max",
    "reduce_window_min", "reduce_window", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
    "argmax", "argmin", "sort", "cumsum", "cumprod", "cummax", "cummin", "reduce_and", "reduce_or",
    "reduce_precision_sum",
})
INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                    "custom_vjp_call_jaxpr", "checkpoint", "remat", "remat2", "custom_lin"})
OPAQUE_HINT = frozenset({"cond", "while", "scan", "custom_call", "pure_callback", "io_callback",
                         "shard_map", "pallas_call"})


@dataclasses.dataclass(frozen=True)
class Lit:
  """A literal operand (python scalar or small array) of a flat equation.

  Example:
    >>> w = jnp.ones((4, 4))
    >>> g = build_graph(lambda x: jnp.tanh(x @ w) + 1.0, jnp.ones((1, 4)))
    >>> lit = g.eqns[-1].inputs[1]                         # the 1.0 of the add
    >>> isinstance(lit, Lit), float(lit.val)
    (True, 1.0)
  """
  val: Any


@dataclasses.dataclass
class FlatEqn:
  """One equation of the flattened program: a primitive, its parameters, input value ids (or
  :class:`Lit`) and output value ids.

  Example:
    >>> w = jnp.ones((4, 4))                               # closed over: a constant of the graph
    >>> g = build_graph(lambda x: jnp.tanh(x @ w) + 1.0, jnp.ones((1, 4)))
    >>> [e.prim.name for e in g.eqns], g.eqns[0].inputs, list(g.consts)    # x is value 0, w value 1
    (['dot_general', 'tanh', 'add'], (0, 1), [1])
  """
  prim: Any
  params: dict
  inputs: tuple  # ints (value ids) or Lit
  outputs: tuple  # ints


@dataclasses.dataclass
class Unit:
  """One IOS operator: a heavy (or multi-input / opaque) equation plus its attached light equations.

  Example:
    >>> f = lambda x: jnp.tanh(x @ jnp.ones((4, 4))) + x @ jnp.ones((4, 4))
    >>> g = build_graph(f, jnp.ones((1, 4)))
    >>> u = g.units[0]                                     # the first dot, tanh attached as its epilogue
    >>> u.kind, sorted(u.succs), g.units[2].kind, sorted(g.units[2].preds)     # the add reads both dots
    ('dot_general', [2], 'identity', [0, 1])
  """
  idx: int
  kind: str  # primitive name of the anchor, 'identity' for light multi-input units, or 'opaque:<prim>'
  eqns: list  # indices into Graph.eqns, topological
  anchor: int  # index into Graph.eqns of the anchor equation
  inputs: list = dataclasses.field(default_factory=list)  # external dynamic value ids read
  outputs: list = dataclasses.field(default_factory=list)  # value ids used outside the unit
  opaque: bool = False
  preds: set = dataclasses.field(default_factory=set)
  succs: set = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class Graph:
  """The IOS unit DAG of a traced function (built by :func:`build_graph`): flat equations over integer
  value ids, the units (operators) that group them, constants, and the blocks/parts the DP runs on.

  Example:
    >>> f = lambda x: jnp.tanh(x @ jnp.ones((4, 4))) + x @ jnp.ones((4, 4))
    >>> g = build_graph(f, jnp.ones((1, 4)))
    >>> [u.kind for u in g.units], g.blocks               # two dots side by side, then their sum
    (['dot_general', 'dot_general', 'identity'], [[0, 1, 2]])
  """
  eqns: list
  units: list
  consts: dict  # value id -> concrete array (weights, hoisted results)
  lazy: dict  # value id -> eqn index of a constant-expanding equation re-emitted by consumers
  avals: dict  # value id -> ShapedArray
  in_ids: list  # flat dynamic input ids
  out_ids: list  # flat outputs (value ids or Lit)
  in_tree: Any
  out_tree: Any
  producer: dict  # value id -> unit index
  blocks: list  # list of parts, each a list of unit indices (topological)
  _fb: dict = dataclasses.field(default_factory=dict, repr=False)

  def fingerprint(self) -> str:
    """A hash of the unit structure *and* of every equation's primitive, parameters (strides,
    padding, dimension numbers, window sizes, ...) and operand shapes; a saved schedule (or a
    profiler cache alias) is only applied to a graph with the same one, so two graphs that differ
    only in, e.g., a conv's padding or kernel layout never share one."""
    h = hashlib.sha256()
    for u in self.units:
      h.update(f"{u.kind}|{sorted(u.preds)}|{[str(self.avals[o]) for o in u.outputs]}".encode())
      for ei in u.eqns:
        e = self.eqns[ei]
        ins = [str(self.avals[v]) if isinstance(v, int) else repr(np.asarray(v.val).tolist())
               for v in e.inputs]
        h.update(f"|{e.prim.name}{_param_sig(e.params)}{ins}".encode())
      h.update(b";")
    return h.hexdigest()[:16]

  def unit_flops_bytes(self, ui: int) -> tuple[float, float]:
    """Analytical FLOPs and DRAM bytes of a unit (inputs + outputs + weights read once)."""
    if ui in self._fb:
      return self._fb[ui]
    u = self.units[ui]
    flops = 0.0
    consts_read = set()
    for ei in u.eqns:
      e = self.eqns[ei]
      flops += eqn_flops(e, self.avals)
      for v in e.inputs:
        if isinstance(v, int) and v in self.consts:
          consts_read.add(v)
    nbytes = sum(_nbytes(self.avals[v]) for v in u.inputs)
    nbytes += sum(_nbytes(self.avals[v]) for v in u.outputs)
    nbytes += sum(_nbytes(self.avals[v]) for v in consts_read)
    self._fb[ui] = (flops, float(nbytes))
    return self._fb[ui]


def _param_sig(params: dict) -> str:
  """Stable text of an equation's semantic parameters: scalars, strings, dtypes, tuples of them and
  conv dimension numbers; ``None`` values, shardings and sub-jaxprs are left out (they differ between
  jax versions or are not hashable as text)."""
  def ok(v):
    if isinstance(v, (bool, int, float, str, np.integer, np.floating, np.dtype)):
      return True
    if isinstance(v, (tuple, list)):
      return all(ok(x) for x in v)
    return type(v).__name__ in ("ConvDimensionNumbers", "GatherDimensionNumbers",
                                "ScatterDimensionNumbers", "Precision", "DType")
  items = [f"{k}={v}" for k, v in sorted(params.items())
           if v is not None and "sharding" not in k and ok(v)]
  return "[" + ",".join(items) + "]"


def _nbytes(aval) -> int:
  # extended dtypes (typed PRNG keys: key<fry>) are no numpy dtypes but carry their own itemsize
  size = getattr(aval.dtype, "itemsize", None)
  if size is None:
    size = np.dtype(aval.dtype).itemsize
  return int(np.prod(aval.shape, dtype=np.int64)) * int(size)


def eqn_flops(e: FlatEqn, avals: dict) -> float:
  """Analytical FLOPs of one flat equation (2 per multiply-add for convs and dots).

  The FLOP term of IOS's analytical stage cost (Ding et al., MLSys 2021, Sec. 4.3 profiles
  latencies; :class:`~mlsys_jax.sched.cost.AnalyticalCost` replaces them by a roofline over these
  counts):

  * ``conv_general_dilated``: ``2 * out_elems * C_in_per_group * prod(kernel spatial)`` (the kernel's
    input-feature dimension already holds ``C_in / feature_group_count``);
  * ``dot_general``: ``2 * out_elems * prod(contracting dims of lhs)``;
  * ``reduce_window*`` (pooling): ``out_elems * prod(window_dimensions)``;
  * anything else (elementwise, reductions, data movement): ``max`` of the output's and the inputs'
    element counts (one operation per element touched); ``0`` for an equation without outputs.

  Args:
    e: a flat equation of a :class:`Graph` (``g.eqns[i]``).
    avals: value id -> abstract value (``g.avals``).

  Raises:
    TypeError: ``e`` is not a :class:`FlatEqn`.
    KeyError: an output or operand of ``e`` has no entry in ``avals``.

  Example:
    >>> g = build_graph(lambda x: x @ jnp.ones((4, 4)), jnp.ones((1, 4)))
    >>> eqn_flops(g.eqns[g.units[0].anchor], g.avals)      # 2 * (1 * 4 outputs) * 4
    32.0
  """
  if not isinstance(e, FlatEqn):
    raise TypeError(f"eqn_flops: e must be a FlatEqn (an entry of Graph.eqns), got {type(e).__name__}.")
  missing = [v for v in e.outputs if v not in avals]
  if missing:
    raise KeyError(f"eqn_flops: output value ids {missing} have no abstract value in avals; pass the avals of "
                   "the graph the equation belongs to (g.avals).")
  name = e.prim.name
  out = avals[e.outputs[0]] if e.outputs else None
  if name in ("conv_general_dilated", "dot_general"):
    miss = [v for v in e.inputs[:2] if avals_of(v, avals) is None]
    if miss:
      raise KeyError(f"eqn_flops: operand value ids {miss} of this {name} have no abstract value in avals; "
                     "pass the graph's avals (g.avals).")
  if name == "conv_general_dilated":
    rhs = avals_of(e.inputs[1], avals)
    dn = e.params["dimension_numbers"]
    rs = rhs.shape
    kin = rs[dn.rhs_spec[1]]
    ksp = int(np.prod([rs[d] for d in dn.rhs_spec[2:]]))
    return 2.0 * int(np.prod(out.shape)) * kin * ksp
  if name == "dot_general":
    lhs = avals_of(e.inputs[0], avals)
    (lc, _), _ = e.params["dimension_numbers"]
    k = int(np.prod([lhs.shape[d] for d in lc])) if lc else 1
    return 2.0 * int(np.prod(out.shape)) * k
  if name.startswith("reduce_window"):
    w = int(np.prod(e.params.get("window_dimensions", (1,))))
    return float(int(np.prod(out.shape)) * w)
  if out is None:
    return 0.0
  ins = [avals_of(v, avals) for v in e.inputs]
  return float(max([int(np.prod(out.shape))] + [int(np.prod(a.shape)) for a in ins if a is not None]))


def avals_of(v, avals):
  """Abstract value (shape, dtype) of a value id or a literal.

  A :class:`Lit` gives the abstract value of its Python/numpy value; an integer value id gives
  ``avals[v]``, or ``None`` when ``avals`` has no entry for it.

  Raises:
    TypeError: ``v`` is neither an integer value id nor a :class:`Lit`.

  Example:
    >>> w = jnp.ones((4, 4))
    >>> g = build_graph(lambda x: jnp.tanh(x @ w) + 1.0, jnp.ones((1, 4)))
    >>> [avals_of(v, g.avals).shape for v in g.eqns[-1].inputs]    # a value id, then a literal
    [(1, 4), ()]
  """
  if isinstance(v, Lit):
    return jax.typeof(v.val) if hasattr(jax, "typeof") else jax.core.get_aval(v.val)
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
    raise TypeError(f"avals_of: v must be an integer value id or a Lit (an operand of a FlatEqn), got "
                    f"{type(v).__name__} ({v!r}).")
  return avals.get(v)


_FOLD_EMBED_BYTES = 8 << 20
_FOLD_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}  # CPU


class _Builder:

  def __init__(self):
    self.eqns: list[FlatEqn] = []
    self.consts: dict[int, Any] = {}
    self.lazy: dict[int, int] = {}
    self.lazy_source: dict[int, int] = {}  # lazy value id -> size of the largest constant it derives from
    self.avals: dict[int, Any] = {}
    self.to_fold: list[int] = []  # weight-sized constant expressions, evaluated together by ``fold``
    self.next_id = 0

  def new(self, aval) -> int:
    i = self.next_id
    self.next_id += 1
    self.avals[i] = aval
    return i

  def add_const(self, val) -> int:
    arr = jax.numpy.asarray(val)
    i = self.new(jax.core.ShapedArray(arr.shape, arr.dtype))
    self.consts[i] = arr
    return i

  def read(self, env, v):
    if isinstance(v, jex_core.Literal):
      return Lit(v.val)
    return env[v]

  def inline(self, jaxpr, consts, args):
    env = {}
    for var, c in zip(jaxpr.constvars, consts):
      env[var] = self.add_const(c)
    for var, a in zip(jaxpr.invars, args):
      env[var] = a
    for eqn in jaxpr.eqns:
      ins = [self.read(env, v) for v in eqn.invars]
      name = eqn.primitive.name
      if name in INLINE:
        sub = (eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr"))
        if sub is not None:
          if hasattr(sub, "jaxpr"):  # ClosedJaxpr
            sub_j, sub_c = sub.jaxpr, sub.consts
          else:
            sub_j, sub_c = sub, []
          n_skip = len(ins) - len(sub_j.invars)
          if n_skip < 0:
            raise ValueError(f"ios: cannot inline {name}: operand count mismatch")
          outs = self.inline(sub_j, sub_c, [self._materialize(a) for a in ins[n_skip:]])
          for var, o in zip(eqn.outvars, outs):
            if not isinstance(var, jex_core.DropVar):
              env[var] = o
          continue
      for var in eqn.outvars:
        if hasattr(var, "aval") and not all(isinstance(d, (int, np.integer)) for d in var.aval.shape):
          raise ValueError(f"ios: dynamic shape {var.aval} produced by '{name}'; IOS needs static shapes "
                           "(trace with concrete example arguments)")
      if eqn.effects:
        raise ValueError(f"ios: '{name}' has side effects ({', '.join(map(str, eqn.effects))}); a "
                         "schedule may reorder operators around it, so functions with effects (debug "
                         "prints, callbacks, ordered I/O) are refused: schedule the pure part only")
      outs = self.emit(eqn.primitive, dict(eqn.params), ins, [v.aval for v in eqn.outvars],
                       bool(eqn.effects))
      for var, o in zip(eqn.outvars, outs):
        if not isinstance(var, jex_core.DropVar):
          env[var] = o
    return [self.read(env, v) for v in jaxpr.outvars]

  def _materialize(self, a):
    if isinstance(a, Lit):
      return self.add_const(a.val)
    return a

  def fold(self) -> None:
    """Evaluate every weight-sized constant expression (``to_fold``) in ONE jitted call and make each a
    constant. (Evaluating them one primitive at a time, eagerly, compiled one small XLA program per
    distinct operation: 45 s for a small W8 SqueezeNet on a loaded 2-core CPU, against 2-3 s here.)"""
    if not self.to_fold:
      return
    needed: dict[int, None] = {}   # real constants the expressions read

    def collect(a, seen):
      if isinstance(a, Lit) or a in seen:
        return
      seen.add(a)
      if a in self.consts:
        needed[a] = None
        return
      for i in self.eqns[self.lazy[a]].inputs:
        collect(i, seen)

    seen: set = set()
    for o in self.to_fold:
      collect(o, seen)
    ids = list(needed)

    def run(vals):
      env = dict(zip(ids, vals))

      def val(a):
        if isinstance(a, Lit):
          return a.val
        if a not in env:
          e = self.eqns[self.lazy[a]]
          env[a] = e.prim.bind(*[val(i) for i in e.inputs], **e.params)
        return env[a]

      return [val(o) for o in self.to_fold]

    vals = [self.consts[i] for i in ids]
    if sum(int(np.prod(self.avals[i].shape)) * self.avals[i].dtype.itemsize for i in ids) <= _FOLD_EMBED_BYTES:
      # small weights: embedded, XLA folds the whole program at compile time (~2 s for a W8 SqueezeNet
      # on a busy CPU, against 11 s as a program of arguments: no code generation)
      opts = _FOLD_OPTIONS if jax.default_backend() == "cpu" else None
      outs = jax.jit(lambda: run(vals), compiler_options=opts)()
    else:   # large weights: arguments (XLA's constant folding of big arrays runs on its slow evaluator)
      outs = jax.jit(run)(vals)
    for o, v in zip(self.to_fold, outs):
      self.consts[o] = v
      del self.lazy[o]
    self.to_fold = []

  def emit(self, prim, params, ins, out_avals, effectful):
    const_like = all(isinstance(a, Lit) or a in self.consts or a in self.lazy for a in ins)
    if const_like and not effectful and not prim.multiple_results and len(out_avals) == 1:
      out_aval = out_avals[0]
      out_size = int(np.prod(out_aval.shape))
      # the largest real constant this expression derives from (through lazy expressions too)
      source = max([int(np.prod(self.avals[a].shape)) for a in ins if not isinstance(a, Lit) and a in self.consts]
                   + [self.lazy_source[a] for a in ins if not isinstance(a, Lit) and a in self.lazy] + [0])
      if source and out_size <= source:
        # no larger than the weight it comes from (e.g. a fake-quantized kernel: w / broadcast(scale)):
        # evaluated once, at the end of the trace (``fold``), so the kernel is a constant (foldable,
        # mergeable, no per-call work)
        o = self.new(out_aval)
        self.eqns.append(FlatEqn(prim, params, tuple(ins), (o,)))
        self.lazy[o] = len(self.eqns) - 1
        self.lazy_source[o] = source
        self.to_fold.append(o)
        return [o]
      # expands a constant (a bias broadcast to an activation shape, iota): re-emitted by consumers
      o = self.new(out_aval)
      self.eqns.append(FlatEqn(prim, params, tuple(ins), (o,)))
      self.lazy[o] = len(self.eqns) - 1
      self.lazy_source[o] = source
      return [o]
    outs = [self.new(a) for a in out_avals]
    self.eqns.append(FlatEqn(prim, params, tuple(ins), tuple(outs)))
    return outs


def _is_opaque(prim, params) -> bool:
  if prim.name in OPAQUE_HINT:
    return True
  for p in params.values():
    if isinstance(p, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
      return True
    if isinstance(p, (tuple, list)) and p and isinstance(p[0], (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
      return True
  return False


def _link(units, eqns, b, out_set):
  """(Re)compute inputs, outputs, preds and succs of units in place."""
  unit_of_val = {}
  for u in units:
    u.preds, u.succs = set(), set()
    for ei in u.eqns:
      for o in eqns[ei].outputs:
        if o not in b.lazy:
          unit_of_val[o] = u.idx
  for u in units:
    own = set()
    for ei in u.eqns:
      own.update(eqns[ei].outputs)
    ins = []
    for ei in u.eqns:
      for a in eqns[ei].inputs:
        if isinstance(a, int) and a not in own and a not in b.consts and a not in b.lazy and a not in ins:
          ins.append(a)
    u.inputs = ins
    for a in ins:
      if a in unit_of_val:
        p = unit_of_val[a]
        u.preds.add(p)
        units[p].succs.add(u.idx)
  for u in units:
    used = set(out_set)
    for s in u.succs:
      used.update(units[s].inputs)
    u.outputs = [o for ei in u.eqns for o in eqns[ei].outputs if o in used]


def _fuse(units, eqns, b, out_set):
  """Schedule units as IOS does: a light multi-input unit (sum/concat, IOS 'Identity') with a single
  consumer becomes that consumer's prologue (IOS: operator inputs are 'terms'), and a depthwise conv
  whose only consumer is a conv becomes one 'sepconv' unit with it (IOS 'Sequential')."""
  alive = {u.idx: u for u in units}
  changed = True
  while changed:
    changed = False
    for u in sorted(alive.values(), key=lambda u: u.idx):
      if len(u.succs) != 1 or any(o in out_set for o in u.outputs) or u.opaque:
        continue
      (c,) = tuple(u.succs)
      cu = alive[c]
      if cu.opaque:
        continue
      is_identity = u.kind == "identity"
      e = eqns[u.anchor]
      is_dw = (u.kind == "conv_general_dilated" and e.params["feature_group_count"] > 1 and
               cu.kind == "conv_general_dilated" and cu.preds == {u.idx})
      if not (is_identity or is_dw):
        continue
      merged = sorted(set(u.eqns) | set(cu.eqns))
      cu.eqns = merged
      if is_dw:
        cu.kind = "sepconv"
      cu.preds = (cu.preds | u.preds) - {u.idx}
      for p in u.preds:
        alive[p].succs = (alive[p].succs - {u.idx}) | {c}
      del alive[u.idx]
      changed = True
      break
  new = sorted(alive.values(), key=lambda u: u.idx)
  for i, u in enumerate(new):
    u.idx = i
  _link(new, eqns, b, out_set)
  return new


def build_graph(fn: Callable, *example_args, part_size: int = 50, allow_opaque: bool = True,
                fuse: bool = True) -> Graph:
  """Trace ``fn(*example_args)`` and build the IOS unit graph.

  Args:
    fn: a function of arrays. Weights should be closed over (``lambda x: model.apply(variables, x)``):
      closed-over arrays are constants, so weight-only computation is hoisted and conv weights can be
      concatenated for operator merges.
    *example_args: arrays (or pytrees of arrays) with the shapes and dtypes of the real inputs.
    part_size: largest number of units in one DP part (IOS's ``max_part_size``, 50 in the paper's runs).
    fuse: fold single-consumer sum/concat units into their consumer and depthwise+pointwise conv
      pairs into one unit, as IOS's hand-written graphs do (Identity terms, Sequential SepConv).
    allow_opaque: if False, control flow and unknown higher-order primitives raise ``ValueError``
      naming the primitive; if True (default) they become opaque units scheduled alone.

  Returns:
    a ``Graph``.

  Example:
    >>> w1, w2 = jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))
    >>> conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> g = build_graph(lambda x: jax.nn.relu(conv(x, w1)) + conv(x, w2), jnp.ones((1, 8, 8, 4)))
    >>> [u.kind for u in g.units], len(g.eqns)                   # relu is the first conv's epilogue
    (['conv_general_dilated', 'conv_general_dilated', 'identity'], 4)
  """
  if part_size < 1:
    raise ValueError(f"part_size must be >= 1, got {part_size}")
  flat_args, in_tree = jax.tree_util.tree_flatten(example_args)
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example_args)
  out_tree = jax.tree_util.tree_structure(out_shape)
  b = _Builder()
  in_ids = [b.new(v.aval) for v in closed.jaxpr.invars]
  outs = b.inline(closed.jaxpr, closed.consts, in_ids)
  b.fold()
  eqns = b.eqns
  # ---- units
  producer_eqn: dict[int, int] = {}
  for i, e in enumerate(eqns):
    for o in e.outputs:
      producer_eqn[o] = i
  unit_of_val: dict[int, int] = {}
  units: list[Unit] = []

  def dyn_inputs(e):
    return [a for a in e.inputs if isinstance(a, int) and a not in b.consts and a not in b.lazy]

  def add_lazy_deps(unit: Unit, e: FlatEqn, seen: set):
    for a in e.inputs:
      if isinstance(a, int) and a in b.lazy:
        li = b.lazy[a]
        if li not in seen:
          add_lazy_deps(unit, eqns[li], seen)
          seen.add(li)
          unit.eqns.append(li)

  unit_lazy_seen: dict[int, set] = {}
  for i, e in enumerate(eqns):
    if e.outputs and (e.outputs[0] in b.lazy or e.outputs[0] in b.consts):
      continue   # a constant expression: re-emitted by its consumers, or folded into a constant
    name = e.prim.name
    opaque = _is_opaque(e.prim, e.params)
    if opaque and not allow_opaque:
      raise ValueError(f"ios: unsupported primitive '{name}' (control flow or higher-order); pass "
                       "allow_opaque=True to schedule it as a sequential node")
    dyn = dyn_inputs(e)
    prods = {unit_of_val[a] for a in dyn if a in unit_of_val}
    from_input = any(a not in unit_of_val for a in dyn)
    if name in HEAVY or opaque or len(prods) != 1 or from_input or e.prim.multiple_results:
      kind = ("opaque:" + name) if opaque else (name if name in HEAVY else "identity")
      u = Unit(len(units), kind, [], i, opaque=opaque)
      unit_lazy_seen[u.idx] = set()
      units.append(u)
    else:
      u = units[prods.pop()]
    add_lazy_deps(u, e, unit_lazy_seen[u.idx])
    u.eqns.append(i)
    for o in e.outputs:
      unit_of_val[o] = u.idx
  out_set = {o for o in outs if isinstance(o, int)}
  _link(units, eqns, b, out_set)
  if fuse:
    units = _fuse(units, eqns, b, out_set)
  for o in outs:
    if isinstance(o, int) and o in b.lazy:
      raise ValueError("ios: an output is a constant expression; schedule a function whose outputs "
                       "depend on its inputs")
  unit_of_val = {o: u.idx for u in units for ei in u.eqns for o in eqns[ei].outputs
                 if o not in b.lazy}
  g = Graph(eqns, units, b.consts, b.lazy, b.avals, in_ids, outs, in_tree, out_tree, unit_of_val, [])
  g.blocks = partition_blocks(g, part_size)
  return g


def partition_blocks(g: Graph, part_size: int) -> list:
  """Blocks between cut points (units that every source->sink path crosses), split into parts.

  IOS (Ding et al., MLSys 2021, Sec. 4) bounds the DP's cost by partitioning the graph into blocks and
  scheduling each block alone (``max_part_size`` in the official code). A unit is a cut point when every
  path from a graph input to a graph output goes through it; in a topological order this holds exactly
  when no edge jumps over the unit. Each block ends with a cut point (the last may not) and is cut into
  consecutive parts of at most ``part_size`` units.

  Args:
    g: the unit graph (units in topological order, as :func:`build_graph` makes them).
    part_size: largest number of units in one part, an integer >= 1.

  Returns:
    A list of parts, each a list of unit indices; their concatenation is ``0 .. len(g.units) - 1``.

  Raises:
    TypeError: ``g`` is not a :class:`Graph` or ``part_size`` is not an integer.
    ValueError: ``part_size < 1``.

  Example:
    >>> g = build_graph(lambda x: jnp.tanh(x @ jnp.ones((4, 4))) @ jnp.ones((4, 2)), jnp.ones((1, 4)))
    >>> partition_blocks(g, 50)                           # a chain: every unit is a cut point
    [[0], [1]]
    >>> f = lambda x: jnp.tanh(x @ jnp.ones((4, 4))) + x @ jnp.ones((4, 4))
    >>> partition_blocks(build_graph(f, jnp.ones((1, 4))), 2)   # one block of 3 units, parts of <= 2
    [[0, 1], [2]]
  """
  if not isinstance(g, Graph):
    raise TypeError(f"partition_blocks: g must be a Graph (from build_graph), got {type(g).__name__}.")
  check_int("part_size", part_size, 1)
  n = len(g.units)
  if n == 0:
    return []
  edges = []  # positions shifted by 1; virtual source at 0, sink at n+1
  for u in g.units:
    if not u.preds or any(a not in g.producer for a in u.inputs):
      edges.append((0, u.idx + 1))
    for s in u.succs:
      edges.append((u.idx + 1, s + 1))
    if any(o in g.out_ids for o in u.outputs) or not u.succs:
      edges.append((u.idx + 1, n + 1))
  diff = np.zeros(n + 3, np.int64)
  for a, b in edges:
    if b > a + 1:
      diff[a + 1] += 1
      diff[b] -= 1
  crossed = np.cumsum(diff)[: n + 2]
  blocks, cur = [], []
  for i in range(n):
    cur.append(i)
    if crossed[i + 1] == 0:  # unit i is a cut point
      blocks.append(cur)
      cur = []
  if cur:
    blocks.append(cur)
  parts = []
  for blk in blocks:
    for s in range(0, len(blk), part_size):
      parts.append(blk[s:s + part_size])
  return parts


def summarize_graph(g: Graph) -> dict:
  """Counts of a unit graph: units, equations, blocks, the largest part and units per kind.

  The size of the IOS search problem (Ding et al., MLSys 2021, Sec. 4: the DP's cost grows with the
  part size), recorded next to every schedule.

  Returns:
    ``{"units", "eqns", "blocks", "largest_part", "kinds"}``: numbers of units, flat equations and DP
    parts, the units of the largest part (0 for an empty graph) and ``{unit kind: count}``.

  Raises:
    TypeError: ``g`` is not a :class:`Graph`.

  Example:
    >>> f = lambda x: jnp.tanh(x @ jnp.ones((4, 4))) + x @ jnp.ones((4, 4))
    >>> s = summarize_graph(build_graph(f, jnp.ones((1, 4))))
    >>> s["units"], s["blocks"], s["kinds"]
    (3, 1, {'dot_general': 2, 'identity': 1})
  """
  if not isinstance(g, Graph):
    raise TypeError(f"summarize_graph: g must be a Graph (from build_graph), got {type(g).__name__}.")
  kinds: dict[str, int] = {}
  for u in g.units:
    kinds[u.kind] = kinds.get(u.kind, 0) + 1
  return {"units": len(g.units), "eqns": len(g.eqns), "blocks": len(g.blocks),
          "largest_part": max((len(p) for p in g.blocks), default=0), "kinds": kinds}


def relayout_conv_kernels(g: Graph, layout: str = "auto") -> Graph:
  """A copy of ``g`` whose constant convolution kernels are stored in the layout the GPU conv
  kernels read, with the convs' ``dimension_numbers`` rewritten to match (same function).

  With ``layout='auto'`` a kernel is stored as (O, spatial..., I) when the conv's input is
  channels-last (NHWC: cuDNN's KRSC filter layout) and as (O, I, spatial...) when it is channels-first
  (NCHW: KCRS). A traced HWIO kernel that is a jit argument or a constant in another order makes XLA
  transpose it on every call: one extra kernel per convolution (94 for Inception-V3), measured on the
  H100 as ~190 us of the ~1 ms batch-1 critical path (benchmarks/results/ios_net_probe_h100.json). ``'keep'``
  returns ``g`` unchanged.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> w = jnp.ones((3, 3, 4, 8))  # HWIO
    >>> f = lambda x: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
    ...                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    >>> g = relayout_conv_kernels(build_graph(f, jnp.ones((1, 5, 5, 4))))
    >>> g.avals[g.eqns[g.units[0].anchor].inputs[1]].shape  # OHWI
    (8, 3, 3, 4)
  """
  if layout not in ("auto", "keep"):
    raise ValueError(f"kernel layout must be 'auto' or 'keep', got {layout!r}")
  if layout == "keep":
    return g
  eqns, consts, avals = list(g.eqns), dict(g.consts), dict(g.avals)
  next_id = max(list(avals) + [0]) + 1
  done: dict = {}
  for i, e in enumerate(eqns):
    if e.prim.name != "conv_general_dilated":
      continue
    rhs = e.inputs[1]
    if not isinstance(rhs, int) or rhs not in g.consts:
      continue
    dn = e.params["dimension_numbers"]
    nd = len(dn.rhs_spec)
    channels_last = dn.lhs_spec[1] == nd - 1
    if channels_last:
      perm = (dn.rhs_spec[0],) + tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1],)
      new_spec = (0, nd - 1) + tuple(range(1, nd - 1))
    else:
      perm = tuple(dn.rhs_spec)
      new_spec = tuple(range(nd))
    if perm == tuple(range(nd)):
      continue
    key = (rhs, perm)
    if key not in done:
      w = jax.numpy.transpose(g.consts[rhs], perm)
      consts[next_id] = w
      avals[next_id] = jax.core.ShapedArray(w.shape, w.dtype)
      done[key] = next_id
      next_id += 1
    params = dict(e.params)
    params["dimension_numbers"] = jax.lax.ConvDimensionNumbers(
        lhs_spec=tuple(dn.lhs_spec), rhs_spec=new_spec, out_spec=tuple(dn.out_spec))
    eqns[i] = FlatEqn(e.prim, params, (e.inputs[0], done[key]) + tuple(e.inputs[2:]), e.outputs)
  if not done:
    return g
  return dataclasses.replace(g, eqns=eqns, consts=consts, avals=avals, _fb={})
