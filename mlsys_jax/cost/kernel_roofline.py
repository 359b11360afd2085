"""Per-kernel roofline: whole-program latency as a sum of per-kernel rooflines (issue 24, target (b)).

A whole-program roofline ``max(F / R_f, B / R_b) + c`` on XLA's program totals (``metrics.fit_roofline``)
extrapolates in FLOPs and bytes, but one max over the whole program cannot tell a compute-bound GEMM
followed by twenty memory-bound elementwise kernels from one kernel of the same totals, and it has no
per-launch cost. Here the optimized HLO is cut into the kernels it launches (:func:`program_kernels`),
each with its own FLOPs and bytes, a class (what the kernel mostly does: GEMM or convolution -- by operand
width, and untuned cuDNN convolutions apart -- reduction, transpose, elementwise, slicing, loop control,
other; :data:`KERNEL_CLASSES`) and a multiplicity (kernels in a ``while`` body run
``known_trip_count`` times), and the program's latency is predicted as

    T = O_d + sum_k m_k * ( max(f_k / F_{c(k),d}, b_k / B_{c(k),d}) + o_{c(k),d} )

(Williams et al., "Roofline", CACM 2009, Eq. 1, applied per kernel; the per-class rates are the
achieved fraction of peak of that kind of kernel, the per-class ``o`` its launch and tail cost, ``O_d``
the program's dispatch cost on device ``d``). The parameters (three per class and device, one per
device) are fitted on training programs in log space (:func:`fit_kernel_roofline`): a handful of
numbers, so the model extrapolates to larger programs the way a roofline does, kernel by kernel.

Example:
  >>> from mlsys_jax.cost import hlo
  >>> text = '''HloModule m
  ... ENTRY e { a = f32[64,64]{1,0} parameter(0)
  ...   b = f32[64,64]{1,0} parameter(1)
  ...   ROOT d = f32[64,64]{1,0} dot(a, b), lhs_contracting_dims={1}, rhs_contracting_dims={0} }'''
  >>> kt = program_kernels(hlo.parse_hlo(text))
  >>> KERNEL_CLASSES[int(kt.klass[0])], float(kt.flops[0]), float(kt.bytes[0])
  ('gemm_f32', 524288.0, 49152.0)
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple, Sequence

import numpy as np

from mlsys_jax.cost.graph import TRIVIAL, _node_costs
from mlsys_jax.cost.hlo import DTYPE_BYTES, Computation, HloModule, Instruction, Shape, parse_hlo

BASE_KERNEL_CLASSES: tuple[str, ...] = ("gemm", "gemm_f32", "conv", "conv_f32", "conv_untuned", "reduce",
                                        "transpose", "elementwise", "slice", "loop", "other")
"""The classes :func:`program_kernels` assigns by default."""
OPTION_KERNEL_CLASSES: tuple[str, ...] = ("sort", "radix_sort", "scatter", "scatter_narrow", "conv_untuned_bwd")
"""Classes assigned only with :func:`program_kernels`'s options: ``sort`` (XLA's own bitonic sort kernels)
and ``radix_sort`` (cub's radix sort custom calls) with ``sort_model``; ``scatter`` (32/64-bit element
atomics) and ``scatter_narrow`` (16-bit and narrower elements, whose atomic adds are emulated) with
``scatter_contention``; ``conv_untuned_bwd`` (untuned cuDNN backward-input / backward-filter calls, session 27)
with ``conv_direction``. Without the options these kernels are ``other``, and a fit on such tables is the
same as with the base classes alone (:func:`fit_kernel_roofline` averages its penalty over the base
classes plus the option classes present in the training tables)."""
KERNEL_CLASSES: tuple[str, ...] = BASE_KERNEL_CLASSES + OPTION_KERNEL_CLASSES
"""Kernel classes, in order of precedence: a fusion holding a dot is a GEMM even if it also reduces.
GEMMs and convolutions are split by operand width (``_f32``: 4-byte or wider inputs, run as TF32/FP32;
else 16-bit or narrower, tensor-core rates), and cuDNN convolutions that carry no autotuned algorithm
(``conv_untuned``: XLA compiled without autotuning, cuDNN's heuristic choice, up to 50x slower) are a
class of their own; the last five (:data:`OPTION_KERNEL_CLASSES`) appear only with options."""
CLASS_ID = {c: i for i, c in enumerate(KERNEL_CLASSES)}

# Instructions that launch nothing (besides graph.TRIVIAL): the async pair's second half, control.
_NO_KERNEL = TRIVIAL | {"async-update", "async-done", "copy-done", "send-done", "recv-done",
                        "all-reduce-done", "all-gather-done", "collective-permute-done"}
_SLICING = {"slice", "dynamic-slice", "gather"}
_COMM_IO = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
            "collective-broadcast", "ragged-all-to-all", "send", "recv", "infeed", "outfeed"}
_GEMM_TARGETS = ("cublas", "gemm", "matmul")
_CONV_TARGETS = ("cudnn$conv", "conv")


class KernelTable(NamedTuple):
  """The kernels one program launches (arrays of length K).

  Attributes:
    flops: float64[K] FLOPs of one launch (dots 2*M*N*K, convolutions 2*out*window*Cin/groups,
      elementwise one per output element, reductions one per input element).
    bytes: float64[K] bytes one launch must move at least: operands read (a fused parameter only read
      through slices counts the slices) plus the output written (an in-place dynamic-update-slice counts
      the update).
    klass: int32[K] index into :data:`KERNEL_CLASSES`.
    count: float64[K] launches per program run (product of the enclosing loops' trip counts).
    unknown_trips: number of ``while`` loops without ``known_trip_count`` (counted as one trip).
    names: the HLO instruction name of each kernel (None when the table was built by hand); the
      profiler names a kernel after it (:func:`profile_name`), see :func:`match_kernel_times`.
    library: bool[K], True for library calls (``custom-call``: cuBLAS, cuDNN, ...), whose profiler
      kernels carry the library's own names (None: unknown).
    bodies: per kernel, a canonical text of the computation it runs (:func:`kernel_body`, no names), or
      None: XLA compiles kernels with equal bodies once (``match_kernel_times(kernel_bodies=True)``).
  """
  flops: np.ndarray
  bytes: np.ndarray
  klass: np.ndarray
  count: np.ndarray
  unknown_trips: int = 0
  names: tuple | None = None
  library: np.ndarray | None = None
  bodies: tuple | None = None


_BODY_SKIP_ATTRS = {"metadata", "backend_config", "frontend_attributes", "statistics", "origin", "sharding",
                    "control-predecessors", "calls", "to_apply", "condition", "body", "called_computations",
                    "branch_computations", "schedule_id", "scheduling_group_id"}


def _ins_text(ins: Instruction, pos: dict) -> str:
  attrs = ",".join(f"{k}={v.strip()}" for k, v in sorted(ins.attrs.items()) if k not in _BODY_SKIP_ATTRS)
  ops = ",".join(str(pos.get(o, "?")) for o in ins.operands)
  return f"{ins.opcode}:{ins.shape}:{ins.literal}:({ops}):{attrs}"


def kernel_body(module: HloModule, ins: Instruction, names: dict | None = None) -> str:
  r"""Canonical text of what kernel-launching instruction ``ins`` runs, without any name: for a fusion, each
  instruction of its fused computation (nested computations included, in order) as opcode, shape,
  literal, operand positions and attributes (``metadata``, ``backend_config`` and the names of called
  computations left out), plus the fusion's kind and operand shapes; for another instruction, itself with
  its operand shapes. XLA compiles one kernel for fusions whose fused computations are identical and
  launches it under the name of the first (its kernel reuse cache keys on the fused computation's
  fingerprint), so two kernels with equal bodies are one profiler kernel.

  Args:
    module: the :class:`~mlsys_jax.cost.hlo.HloModule` holding ``ins``.
    ins: a kernel-launching instruction of one of its computations.
    names: that computation's name table (``Computation.by_name()``; for the operand shapes).
  Returns:
    str.

  >>> m = parse_hlo('HloModule m\n%f (p: f32[8]) -> f32[8] { %p = f32[8]{0} parameter(0)\n'
  ...               '  ROOT %e = f32[8]{0} exponential(%p) }\n%g (q: f32[8]) -> f32[8] { %q = f32[8]{0} parameter(0)\n'
  ...               '  ROOT %t = f32[8]{0} exponential(%q) }\nENTRY %m { %a = f32[8]{0} parameter(0)\n'
  ...               '  %x = f32[8]{0} fusion(%a), kind=kLoop, calls=%f\n  ROOT %y = f32[8]{0} fusion(%x), kind=kLoop, calls=%g }')
  >>> ent = m.entry.by_name(); kernel_body(m, ent["x"], ent) == kernel_body(m, ent["y"], ent)
  True
  """
  if not isinstance(module, HloModule) or not isinstance(ins, Instruction):
    raise TypeError("kernel_body needs an HloModule and one of its Instructions.")
  names = names if names is not None else {}
  head = f"{ins.opcode}|{ins.attrs.get('kind', '').strip()}|{ins.shape}|" + ",".join(
      str(names[o].shape) if o in names else "?" for o in ins.operands)
  called = [c for c in ins.called() if c in module.computations] if ins.opcode in ("fusion", "fusion-start") else []
  if not called:
    return head + "|" + _ins_text(ins, {})
  parts, stack, seen = [], [module.computations[called[0]]], {called[0]}
  while stack:
    c = stack.pop(0)
    pos = {x.name: i for i, x in enumerate(c.instructions)}
    parts.append(";".join(_ins_text(x, pos) for x in c.instructions))
    for x in c.instructions:
      for n in x.called():
        if n in module.computations and n not in seen:
          seen.add(n)
          stack.append(module.computations[n])
  return head + "|" + "||".join(parts)


def _trip_count(ins: Instruction) -> int | None:
  m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', ins.attrs.get("backend_config", ""))
  return int(m.group(1)) if m else None


def _first(shape: Shape) -> Shape:
  """A custom call's result (its output tuple's first element: the rest is workspace)."""
  return shape.elements[0] if shape.is_tuple and shape.elements else shape


_TUNED_CONV = re.compile(r'"cudnn_conv_backend_config":\{[^{}]*"algorithm":\{')


def _wide(dtype: str) -> bool:
  return dtype in ("f32", "f64", "s32", "u32", "s64", "u64", "c64", "c128")


def _custom_class(ins: Instruction, operand_dtype: str = "f32") -> int:
  t = ins.attrs.get("custom_call_target", "").strip().strip('"').lower()
  if any(s in t for s in _CONV_TARGETS):
    if not _TUNED_CONV.search(ins.attrs.get("backend_config", "")):
      return CLASS_ID["conv_untuned"]
    return CLASS_ID["conv_f32" if _wide(operand_dtype) else "conv"]
  if any(s in t for s in _GEMM_TARGETS):
    return CLASS_ID["gemm_f32" if _wide(operand_dtype) else "gemm"]
  return CLASS_ID["other"]


def _body_class(module: HloModule, comp: Computation) -> int:
  """Class of a fused computation from the opcodes it holds (nested fusions included)."""
  ops: set[str] = set()
  heavy: list[int] = []  # classes of the dots / convolutions / library calls inside
  stack, seen = [comp], {comp.name}
  while stack:
    c = stack.pop()
    names = c.by_name()
    for ins in c.instructions:
      ops.add(ins.opcode)
      dt = names[ins.operands[0]].shape.dtype if ins.operands and ins.operands[0] in names else "f32"
      if ins.opcode in ("custom-call", "dot", "ragged-dot", "convolution"):
        heavy.append(_single_class(ins, dt))
      for n in ins.called():
        if n in module.computations and n not in seen:
          seen.add(n)
          stack.append(module.computations[n])
  for cls in ("conv_untuned", "gemm", "gemm_f32", "conv", "conv_f32"):
    if CLASS_ID[cls] in heavy:
      return CLASS_ID[cls]
  if ops & {"reduce", "reduce-window", "select-and-scatter"}:
    return CLASS_ID["reduce"]
  if ops & {"sort", "scatter", "custom-call", "fft", "rng", "rng-bit-generator", "topk"}:
    return CLASS_ID["other"]
  if ops & {"dynamic-update-slice", "dynamic-slice", "gather"} and not (ops & _ELEMENTWISE_OPS):
    return CLASS_ID["slice"]
  if ops & {"transpose", "copy"}:
    return CLASS_ID["transpose"]
  return CLASS_ID["elementwise"]


_ELEMENTWISE_OPS = {"add", "subtract", "multiply", "divide", "exponential", "tanh", "logistic", "log",
                    "maximum", "minimum", "negate", "sqrt", "rsqrt", "power", "select", "compare", "abs"}


def _single_class(ins: Instruction, operand_dtype: str = "f32") -> int:
  op = ins.opcode
  if op == "custom-call":
    return _custom_class(ins, operand_dtype)
  if op in ("dot", "ragged-dot"):
    return CLASS_ID["gemm_f32" if _wide(operand_dtype) else "gemm"]
  if op == "convolution":
    return CLASS_ID["conv_f32" if _wide(operand_dtype) else "conv"]
  if op in ("reduce", "reduce-window", "select-and-scatter"):
    return CLASS_ID["reduce"]
  if op in ("transpose", "copy", "copy-start"):
    return CLASS_ID["transpose"]
  if op in ("dynamic-slice", "dynamic-update-slice", "slice", "gather", "concatenate", "pad"):
    return CLASS_ID["slice"]
  if op in ("sort", "scatter", "fft", "rng", "rng-bit-generator", "topk", "cholesky", "triangular-solve"):
    return CLASS_ID["other"]
  if op in _COMM_IO or (op.endswith("-start") and op[:-len("-start")] in _COMM_IO):
    return CLASS_ID["other"]      # network / host transfers: not an HBM elementwise rate
  return CLASS_ID["elementwise"]


def _comp_flops(module: HloModule, comp: Computation) -> float:
  """FLOPs of one run of a fused computation (nested fusions included), as ``graph.kernel_costs``."""
  total, stack, seen = 0.0, [comp], {comp.name}
  while stack:
    c = stack.pop()
    names = c.by_name()
    for ins in c.instructions:
      total += _node_costs(ins, [names[o].shape for o in ins.operands if o in names])[0]
      for n in ins.called():
        if n in module.computations and n not in seen and ins.opcode != "while":
          seen.add(n)
          stack.append(module.computations[n])
  return total


def _fusion_bytes(module: HloModule, ins: Instruction, comp: Computation, names: dict,
                  call_result_only: bool = False) -> float:
  """Bytes a fusion must move: each operand once, or only the slices read of it; its output, or only
  the update of an in-place dynamic-update-slice (whose buffer operand is then not read). With
  ``call_result_only`` a root that is a custom call counts its result's first element only (the rest of
  its tuple is the library's workspace, as for a bare custom call: ``_first``)."""
  fnames = comp.by_name()
  users: dict[str, list[Instruction]] = {}
  for f in comp.instructions:
    for o in f.operands:
      users.setdefault(o, []).append(f)
  in_place: set[str] = set()
  out = 0.0
  root = comp.root
  roots = [fnames[o] for o in root.operands if o in fnames] if root.opcode == "tuple" else [root]
  for r in roots:
    if r.opcode == "dynamic-update-slice" and len(r.operands) >= 2 and r.operands[1] in fnames:
      buf = fnames.get(r.operands[0])
      if buf is not None and buf.opcode == "parameter":
        in_place.add(buf.name)
      out += fnames[r.operands[1]].shape.num_bytes
    elif call_result_only and r.opcode == "custom-call":
      out += _first(r.shape).num_bytes
    else:
      out += r.shape.num_bytes
  read = 0.0
  for p in comp.instructions:
    if p.opcode != "parameter" or p.name in in_place:
      continue
    us = users.get(p.name, [])
    if us and all(u.opcode in _SLICING and u.operands and u.operands[0] == p.name for u in us):
      read += sum(u.shape.num_bytes for u in us)
    else:
      try:
        num = int(p.literal or 0)
      except ValueError:
        num = 0
      src = names.get(ins.operands[num]) if num < len(ins.operands) else None
      read += (src.shape.num_bytes if src is not None else p.shape.num_bytes)
  return read + out


def _kernel(module: HloModule, ins: Instruction, names: dict) -> tuple[float, float, int]:
  """(flops, bytes, class) of one kernel-launching instruction."""
  op = ins.opcode
  if op in ("fusion", "fusion-start") and ins.called():
    comp = module.computations[ins.called()[0]]
    return _comp_flops(module, comp), _fusion_bytes(module, ins, comp, names), _body_class(module, comp)
  operand_shapes = [names[o].shape for o in ins.operands if o in names]
  flops = _node_costs(ins, operand_shapes)[0]
  out = _first(ins.shape).num_bytes if op == "custom-call" else ins.shape.num_bytes
  if op in ("dynamic-slice", "slice", "gather"):
    read = out
  elif op == "dynamic-update-slice" and len(operand_shapes) >= 2:
    read, out = operand_shapes[1].num_bytes, operand_shapes[1].num_bytes
  else:  # each distinct operand read once
    read = sum(names[o].shape.num_bytes for o in dict.fromkeys(ins.operands) if o in names)
  return flops, read + out, _single_class(ins, operand_shapes[0].dtype if operand_shapes else "f32")


L2_BYTES = 50e6
"""L2 capacity of the H100 SXM and H200 (50 MB), the ``KernelRooflineConfig.l2_bytes`` of the session-17 runs."""

SCATTER_CHAIN_FLOPS = 1e9
"""FLOP-equivalents counted per step of a scatter's longest chain of atomic updates to one address
(``scatter_contention``): a chain step costs ~5 us for 16-bit scatters on the H200 data, which at the
starting FLOP rate (2e14/s) is ~1e9 FLOPs; this keeps the fitted rate of the scatter classes near the
others' so the ridge does not pull it far."""


SCATTER_STEP_ELEMENTS = 1e6
"""Element updates of a scatter that cost as much as one step of its chain of atomic updates to one address
(``scatter_contention``; :func:`scatter_atomic_steps`): on the H200 data of session 14 (``s14b``) a chain
step of a 16-bit scatter costs ~7.6 us (chain 1024) and 16-bit scatters at low contention update
~1.3e11 elements/s (4.2M-33.5M elements in 35-258 us), so ~1e6 element updates take one chain step."""

_SCATTER_IDS = (CLASS_ID["scatter"], CLASS_ID["scatter_narrow"])


def _find_op(module: HloModule, comp: Computation, opcode: str):
  """The first instruction ``opcode`` in a fused computation (nested fusions included) and the name
  table of its computation, or (None, None)."""
  stack, seen = [comp], {comp.name}
  while stack:
    c = stack.pop()
    for ins in c.instructions:
      if ins.opcode == opcode:
        return ins, c.by_name()
      for n in ins.called():
        if n in module.computations and n not in seen:
          seen.add(n)
          stack.append(module.computations[n])
  return None, None


def _elem_bytes(shape: Shape) -> float:
  return float(DTYPE_BYTES.get(shape.dtype, 4))


def bitonic_sort_bytes(n_elements: float, sort_dim: int, bytes_per_element: float) -> float:
  """Bytes moved by a bitonic sort network (XLA's GPU sort kernels): every one of the
  ``L (L + 1) / 2`` compare-exchange stages, ``L = ceil(log2 sort_dim)``, reads and writes each element
  once (in shared memory for the stages inside a tile, in HBM for the others) -- Batcher, "Sorting
  networks and their applications", AFIPS 1968, stages of the bitonic merge network. On the H200 data
  the XLA sort kernels take n * stages * bytes / (8.6-9.4 TB/s) for n from 2e5 to 6.7e7.

  >>> bitonic_sort_bytes(1024, 1024, 8.0)   # L = 10: 55 stages
  450560.0
  """
  if not (n_elements >= 0 and sort_dim >= 1 and bytes_per_element >= 0):
    raise ValueError(f"need n_elements >= 0, sort_dim >= 1, bytes_per_element >= 0; got {n_elements}, "
                     f"{sort_dim}, {bytes_per_element}.")
  levels = int(np.ceil(np.log2(sort_dim))) if sort_dim > 1 else 0
  return float(n_elements) * bytes_per_element * max(levels * (levels + 1) // 2, 1)


SORT_TILE = 2048
"""Elements of the sort dimension XLA's GPU sort sorts in one thread block's shared memory (``kTileSize`` of
its sort emitter: ``min(2048, 2^stages)``)."""

SORT_SHARED_MEMORY_BYTES = 48 * 1024
"""Shared memory per thread block XLA's sort emitter may use without opt-in (48 KiB on the H100/H200): a sort
whose tile of every operand (``SORT_TILE`` x the operands' element bytes) does not fit is not tiled."""

SMEM_HBM_RATIO = 0.125
"""HBM over shared-memory bandwidth, the cost of one shared-memory compare-exchange step of the bitonic network
as a fraction of one HBM pass over the same bytes: H100 SXM 3.35 TB/s and H200 4.8 TB/s of HBM against
132 SMs x 128 bytes/clock x 1.98 GHz = 33.4 TB/s of shared memory (0.10 and 0.14; NVIDIA's H100 and H200
datasheets and the Hopper tuning guide); 1/8 lies between them. A spec ratio, not fitted."""


def xla_sort_launches(sort_dim: int, bytes_per_element: float = 8.0) -> tuple[int, int]:
  """Kernel launches and shared-memory compare-exchange steps of XLA's GPU sort of ``sort_dim`` elements
  per row (``IrEmitterUnnested::EmitSort``): the bitonic network of ``L = ceil(log2 sort_dim)`` stages has
  ``L (L + 1) / 2`` steps (xor masks ``2^(s+1) - 1`` then ``2^m``, ``m = s-1 .. 0``, for stage ``s``;
  Batcher, AFIPS 1968); a step whose mask is at least the tile ``T = min(SORT_TILE, 2^L)`` compares
  elements of different tiles and is a launch of its own, and every run of consecutive steps with masks
  below ``T`` is one launch that loads a tile per thread block into shared memory and runs them there. A
  sort whose tile does not fit ``SORT_SHARED_MEMORY_BYTES`` (``T * bytes_per_element``) is not tiled:
  one launch per step.

  Args:
    sort_dim: elements along the sorted dimension (>= 1).
    bytes_per_element: bytes of one element of all operands together (keys + values; > 0).
  Returns:
    (launches, shared-memory steps): each launch reads and writes every operand from HBM once.

  >>> xla_sort_launches(1024), xla_sort_launches(8192), xla_sort_launches(32000)
  ((1, 55), (6, 88), (15, 110))
  """
  if isinstance(sort_dim, bool) or not isinstance(sort_dim, (int, np.integer)) or sort_dim < 1 \
      or not (bytes_per_element > 0):
    raise ValueError(f"need an integer sort_dim >= 1 and bytes_per_element > 0, got {sort_dim!r}, "
                     f"{bytes_per_element!r}.")
  levels = int(np.ceil(np.log2(sort_dim))) if sort_dim > 1 else 0
  if levels == 0:
    return 1, 0
  tile = min(SORT_TILE, 2 ** levels)
  tiled = tile * bytes_per_element <= SORT_SHARED_MEMORY_BYTES
  launches, steps, run = 0, 0, 0
  for stage in range(levels):
    for m in range(stage, -1, -1):
      mask = (1 << (stage + 1)) - 1 if m == stage else 1 << m
      if mask >= tile or not tiled:
        launches += 1 + (run > 0)
        run = 0
      else:
        run += 1
        steps += 1
  launches += run > 0
  return int(launches), int(steps)


def bitonic_sort_hbm_bytes(n_elements: float, sort_dim: int, bytes_per_element: float) -> float:
  """HBM-equivalent bytes of XLA's tiled bitonic sort (``sort_tiles``): every launch of
  :func:`xla_sort_launches` reads and writes all ``n_elements`` elements once, and every shared-memory
  step reads and writes them in shared memory at ``SMEM_HBM_RATIO`` of an HBM pass:
  ``2 n b (launches + SMEM_HBM_RATIO * steps)``. On the H200 data the profiled XLA sort kernels take
  this over 2.4-3.7 TB/s (1,024 to 8,192 per row, 0.26M to 67M elements), the HBM rates of other
  memory-bound kernels; :func:`bitonic_sort_bytes` counts every step as an HBM pass (8.5-9.7 TB/s).

  >>> bitonic_sort_hbm_bytes(1024, 1024, 8.0)    # 1 launch, 55 steps: 2 * 8192 * (1 + 6.875)
  129024.0
  """
  if not (n_elements >= 0):
    raise ValueError(f"need n_elements >= 0, got {n_elements!r}.")
  launches, steps = xla_sort_launches(sort_dim, bytes_per_element)
  return 2.0 * float(n_elements) * bytes_per_element * (launches + SMEM_HBM_RATIO * steps)


def radix_sort_passes(key_bits: float, digit_bits: int = 8) -> int:
  """Digit passes of an LSD radix sort (cub's onesweep: Adinets and Merrill, "Onesweep: a faster least
  significant digit radix sort for GPUs", arXiv 2206.01784, Sec. 3; 8-bit digits): ``ceil(key_bits /
  digit_bits)``, each reading and writing every key and value once.

  >>> radix_sort_passes(32), radix_sort_passes(16), radix_sort_passes(1)
  (4, 2, 1)
  """
  if not (key_bits > 0 and isinstance(digit_bits, (int, np.integer)) and digit_bits >= 1):
    raise ValueError(f"need key_bits > 0 and an integer digit_bits >= 1, got {key_bits!r}, {digit_bits!r}.")
  return int(np.ceil(key_bits / digit_bits))


def cub_sort_passes(key_bytes: float, batch: int) -> int:
  """Digit passes (kernel launches) of the cub radix sort XLA's GPU sort custom call runs
  (``xla.gpu.ext.cub_sort_keys`` / ``cub_sort_pairs``): one array (``batch`` 1) is sorted by cub's
  ``DeviceRadixSort`` (onesweep, 8-bit digits: :func:`radix_sort_passes`), a batch of rows by
  ``DeviceSegmentedRadixSort``, whose digits are ``SEGMENTED_RADIX_BITS`` = 6 bits for keys wider than one
  byte, 5 for one-byte keys (cub's ``DeviceRadixSortPolicy``; the alternate kernel takes one bit fewer on
  some passes without changing their number): ``ceil(key bits / 6)`` passes -- 6 for 32-bit keys, 3 for
  16-bit keys (Merrill and Grimshaw, "High performance and scalable radix sorting", Parallel Processing
  Letters 21(2), 2011, Sec. 3: one pass per digit). On the H200 data every cub sort is batched, and the
  profiler shows 2 + 4 launches of ``DeviceSegmentedRadixSortKernel`` (plain + alternate digits) for
  32-bit keys and 1 + 2 for 16-bit keys, each of about the same time.

  Args:
    key_bytes: bytes per key (> 0).
    batch: rows sorted independently (>= 1; the product of the key array's dimensions but the last).
  Returns:
    int passes.

  >>> cub_sort_passes(4, 1), cub_sort_passes(4, 2048), cub_sort_passes(2, 256), cub_sort_passes(1, 8)
  (4, 6, 3, 2)
  """
  if not (key_bytes > 0) or isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
    raise ValueError(f"need key_bytes > 0 and an integer batch >= 1, got {key_bytes!r}, {batch!r}.")
  if batch == 1:
    return radix_sort_passes(8.0 * key_bytes)
  return radix_sort_passes(8.0 * key_bytes, digit_bits=6 if key_bytes > 1 else 5)


def cudnn_conv_flops(target: str, operand_shapes: Sequence[Shape], result: Shape, dim_labels: str) -> float:
  """FLOPs of a cuDNN convolution custom call in any direction: ``2 |y| prod(w dims but 'o')``, the forward
  convolution's multiply-adds (Chetlur et al., "cuDNN: efficient primitives for deep learning",
  arXiv 1410.0759, Sec. 2: forward, backward-data and backward-filter convolutions do the same
  ``N K C R S P Q`` multiply-adds). XLA's cuDNN calls keep the *forward* convolution's ``window`` and
  ``dim_labels`` whatever the direction, with operands and result permuted: forward ``(x, w) -> y``,
  backward input ``(dy, w) -> dx``, backward filter ``(x, dy) -> dw``; the shape-based count of
  ``graph`` (``2 |result| prod(operand 1 dims but 'o')``) is right only for the forward direction and
  counts a strided convolution's backward passes ``stride^2`` times or more (on the H200 data the three
  directions of one convolution take about the same time, backward filter ~2x).

  Args:
    target: the custom call target (``__cudnn$convBackwardInput`` ...; forward unless it names
      ``backwardinput`` / ``backwardfilter``, case-insensitive).
    operand_shapes: the call's operand shapes (at least 2).
    result: the call's result (its tuple's first element: the rest is workspace).
    dim_labels: the forward convolution's ``dim_labels`` (``b01f_o01i->b01f``).
  Returns:
    float FLOPs of one launch.

  >>> s = lambda *d: Shape("bf16", tuple(d), tuple(range(len(d) - 1, -1, -1)))
  >>> dy, w, x = s(8, 14, 14, 64), s(64, 1, 1, 128), s(8, 28, 28, 128)   # 1x1, stride 2
  >>> cudnn_conv_flops("__cudnn$convBackwardInput", [dy, w], x, "b01f_o01i->b01f")   # = the forward
  25690112.0
  """
  if len(operand_shapes) < 2:
    raise ValueError(f"a cuDNN convolution has >= 2 operands, got {len(operand_shapes)}.")
  parts = re.match(r"^\s*(\w+)_(\w+)->(\w+)\s*$", dim_labels or "")
  if parts is None:
    raise ValueError(f"dim_labels must look like 'b01f_o01i->b01f', got {dim_labels!r}.")
  t = str(target).lower()
  if "backwardinput" in t:
    y, w = operand_shapes[0], operand_shapes[1]
  elif "backwardfilter" in t:
    y, w = operand_shapes[1], result
  else:
    y, w = result, operand_shapes[1]
  rhs = parts.group(2)
  if len(rhs) != len(w.dims):
    raise ValueError(f"filter labels {rhs!r} do not match the filter's rank {len(w.dims)} ({w.dims}).")
  per_out = float(np.prod([d for ch, d in zip(rhs, w.dims) if ch != "o"])) if w.dims else 1.0
  return 2.0 * float(y.num_elements) * per_out


def scatter_chain(n_updates: float, n_targets: float) -> float:
  """Updates per distinct target of a scatter with atomic combining: ``max(1, N / T)`` for ``N`` update
  indices spread over ``T`` target positions (the expected longest chain of atomic read-modify-writes to
  one address when the indices are spread evenly; atomics to one address serialise).

  >>> scatter_chain(262144, 256), scatter_chain(16384, 65536)
  (1024.0, 1.0)
  """
  if not (n_updates >= 0 and n_targets >= 1):
    raise ValueError(f"need n_updates >= 0 and n_targets >= 1, got {n_updates!r}, {n_targets!r}.")
  return float(max(1.0, n_updates / n_targets))


def scatter_atomic_steps(n_updates: float, n_targets: float, n_elements: float, narrow: bool) -> float:
  """Cost of a scatter's atomic combining in chain steps (``scatter_contention``'s feature, times
  :data:`SCATTER_CHAIN_FLOPS`): ``max(c, E / SCATTER_STEP_ELEMENTS)`` -- the longer of the serial chain
  ``c`` of updates to one address and the throughput time of all ``E`` element updates (a roofline
  of the atomic unit: latency-bound at high contention, throughput-bound at low; Williams et al.,
  "Roofline", CACM 2009). ``c`` is :func:`scatter_chain` for ``narrow`` (16-bit and narrower) elements,
  whose atomic adds are compare-and-swap loops that retry under contention, and 1 for 32/64-bit
  elements, whose adds are native reductions at L2 (on the H200 data of session 14, 32-bit scatters with
  chains of 4, 64 and 256 take 2.9, 8.8 and 14.9 us: proportional to their 1.0M, 4.2M and 8.4M element
  updates, not to the chain).

  Args:
    n_updates: update indices N (>= 0).
    n_targets: distinct target positions T (>= 1).
    n_elements: element updates E (>= 0: every element of the updates operands).
    narrow: bool, elements of fewer than 4 bytes.
  Returns:
    float chain steps (>= 1).

  >>> scatter_atomic_steps(131072, 65536, 131072 * 256, True)    # chain 2, 33.5M elements
  33.554432
  >>> scatter_atomic_steps(262144, 256, 262144 * 64, True), scatter_atomic_steps(262144, 256, 262144 * 64, False)
  (1024.0, 16.777216)
  """
  if not isinstance(narrow, (bool, np.bool_)):
    raise TypeError(f"narrow must be a bool, got {narrow!r}.")
  if not (n_elements >= 0 and np.isfinite(n_elements)):
    raise ValueError(f"need n_elements >= 0 and finite, got {n_elements!r}.")
  chain = scatter_chain(n_updates, n_targets) if narrow else 1.0
  return float(max(chain, n_elements / SCATTER_STEP_ELEMENTS))


SCATTER_SERIAL_STEP_ELEMENTS = 6e5
"""Element updates of a 16-bit scatter that cost one chain step when chain and element updates do not overlap
(``program_kernels(scatter_width=True)``, :func:`scatter_serial_steps`, session 27): ``E0 = L X`` with a chain
step's compare-and-swap latency ``L`` ~5 us and the element-update throughput ``X`` ~1.2e11 /s of the profiled
16-bit scatters of the ten profiled files among the fourteen before session 26 (rounded from the least-squares value 6.3e5 of
``t = r_d (c + E / E0)`` over their 129 profiled 16-bit scatter kernels, one rate ``r_d`` per device;
leaving out any one file gives 5.4e5-6.8e5)."""


def scatter_serial_steps(n_updates: float, n_targets: float, n_elements: float, narrow: bool) -> float:
  """Cost of a scatter's atomic combining in chain steps when the chain's latency and the element updates' throughput
  add instead of overlapping (``program_kernels(scatter_width=True)``, session 27): for ``narrow`` (16-bit and
  narrower) elements ``c + E / SCATTER_SERIAL_STEP_ELEMENTS``, for 32/64-bit elements
  :func:`scatter_atomic_steps` (``max(1, E / SCATTER_STEP_ELEMENTS)``: native reductions at L2, no chain).

  Mechanism: a 16-bit atomic add is a compare-and-swap loop on the 32-bit word that holds the element; the ``c = N /
  T`` updates to one address (:func:`scatter_chain`) serialise, so the scatter runs as ``c`` rounds, and in each
  round the ``E / c`` updates to distinct addresses are issued at the atomic unit's throughput ``X``; the next
  round's update to an address cannot issue until the previous one has completed (read, compare, write back), so
  a round costs the latency ``L`` plus its issue time ``(E / c) / X``: ``t = c (L + E / (c X)) = L (c + E / E0)``
  with ``E0 = L X`` -- the chain times a width factor ``1 + (E / c) / E0``. The session-19 feature
  (:func:`scatter_atomic_steps`) is the overlapped roofline ``L max(c, E / E0)``, under which the update width
  does not change a contended scatter's time; measured, it does (H100, chain 64: 0.26M element updates 157 us,
  4.2M 325 us; s26 diagnosis: chain 256 at 2.4 MB 1.30 ms, at 34 MB 1.90 ms). On the 129 profiled 16-bit scatter
  kernels of the pre-session-26 files, one fitted rate per device, the log-RMS error of the kernel time is 0.40
  with ``max(c, E / 1e6)``, 0.30 with ``c + E / 1e6`` and 0.25 with ``c + E / 6e5`` (a superlinear growth with
  the chain, ~c^1.2, remains: chain 1024 at 4.2M updates runs ~1.5x the form's time).

  Args:
    n_updates: update indices N (>= 0).
    n_targets: distinct target positions T (>= 1).
    n_elements: element updates E (>= 0, finite).
    narrow: bool, elements of fewer than 4 bytes.
  Returns:
    float chain steps (>= 1).

  >>> scatter_serial_steps(16384, 256, 16384 * 16, True), scatter_serial_steps(16384, 256, 16384 * 256, True)
  (64.43690666666667, 70.99050666666666)
  >>> scatter_serial_steps(262144, 256, 262144 * 64, False) == scatter_atomic_steps(262144, 256, 262144 * 64, False)
  True
  """
  if not isinstance(narrow, (bool, np.bool_)):
    raise TypeError(f"narrow must be a bool, got {narrow!r}.")
  if not (n_elements >= 0 and np.isfinite(n_elements)):
    raise ValueError(f"need n_elements >= 0 and finite, got {n_elements!r}.")
  if not narrow:
    return scatter_atomic_steps(n_updates, n_targets, n_elements, False)
  return float(scatter_chain(n_updates, n_targets) + n_elements / SCATTER_SERIAL_STEP_ELEMENTS)


def _scatter_is_atomic(module: HloModule, ins: Instruction) -> bool:
  """False for scatters without read-modify-write: ``unique_indices=true``, or a combiner that returns
  the update (an overwrite)."""
  if ins.attrs.get("unique_indices", "").strip().lower() == "true":
    return False
  comb = ins.attrs.get("to_apply", "").strip().lstrip("%")
  if comb in module.computations:
    root = module.computations[comb].root
    if root is not None and root.opcode == "parameter":
      return False
  return True


def _op_in(module: HloModule, ins: Instruction, names: dict, opcode: str):
  """``ins`` itself when it is an ``opcode`` instruction, else the first ``opcode`` inside the fusion it
  launches, each with the name table to read its operands from; (None, None) when neither."""
  if ins.opcode == opcode:
    return ins, names
  called = ins.called()
  if ins.opcode in ("fusion", "fusion-start") and called and called[0] in module.computations:
    return _find_op(module, module.computations[called[0]], opcode)
  return None, None


def untuned_conv_is_backward(module: HloModule, ins: Instruction) -> bool:
  """True when kernel-launching instruction ``ins`` is an untuned cuDNN backward convolution
  (``program_kernels(conv_direction=True)``'s class ``conv_untuned_bwd``, session 27): a ``custom-call`` -- or the
  library call a fusion wraps -- whose ``custom_call_target`` names a backward-input or backward-filter
  convolution (``__cudnn$convBackwardInput``, ``__cudnn$convBackwardFilter``) and whose ``backend_config`` holds
  no autotuned ``algorithm`` (cuDNN's heuristic choice, class ``conv_untuned`` by default).

  Mechanism: without autotuning cuDNN picks its algorithm by heuristics per direction; the backward passes get
  the slower ones (the session-26 diagnosis: conv_grad's profiled library time, which pools one program's untuned
  forward, backward-input and backward-filter calls, ran ~2x the class's fitted time per FLOP, 167 ms measured vs
  86 ms predicted on s26's largest group, while untuned forward convolutions were within 0.7-1.1x), so the
  backward directions get rates of their own.

  Args:
    module: the :class:`~mlsys_jax.cost.hlo.HloModule` holding ``ins``.
    ins: one of its instructions.
  Returns:
    bool.
  """
  if not isinstance(module, HloModule) or not isinstance(ins, Instruction):
    raise TypeError("untuned_conv_is_backward needs an HloModule and one of its Instructions.")
  call, _ = _op_in(module, ins, {}, "custom-call")   # the call itself, or the one its fusion wraps
  if call is None:
    return False
  t = call.attrs.get("custom_call_target", "").strip().strip('"').lower()
  return (any(s_ in t for s_ in _CONV_TARGETS) and ("backwardinput" in t or "backwardfilter" in t)
          and not _TUNED_CONV.search(call.attrs.get("backend_config", "")))


def _special_kernel(module: HloModule, ins: Instruction, names: dict, sort_model: bool,
                    scatter_contention: bool, conv_model: bool, scatter_width: bool = False):
  """(flops, bytes per launch, class, launches per run) of a sort, scatter or cuDNN convolution kernel under
  the options, or None (not such a kernel, or its option is off: the default count of ``_kernel`` holds)."""
  op = ins.opcode
  target = ins.attrs.get("custom_call_target", "")
  if conv_model and op == "custom-call" and "dim_labels" in ins.attrs and \
      any(s_ in target.lower() for s_ in _CONV_TARGETS):
    shapes = [names[o].shape for o in ins.operands if o in names]
    if len(shapes) >= 2:
      _, b, k = _kernel(module, ins, names)
      return cudnn_conv_flops(target, shapes, _first(ins.shape), ins.attrs["dim_labels"]), b, k, 1.0
  if sort_model and op == "custom-call" and "cub_sort" in target.lower():
    outs = list(ins.shape.elements) if ins.shape.is_tuple else [ins.shape]
    arrays = outs[:-1] if len(outs) > 1 else outs        # the last element is cub's scratch buffer
    keys = arrays[0]
    n = float(keys.num_elements)
    passes = cub_sort_passes(_elem_bytes(keys), max(int(np.prod(keys.dims[:-1])), 1))   # rows sorted at once
    per_pass = 2.0 * n * sum(_elem_bytes(a) for a in arrays)
    return 0.0, per_pass, CLASS_ID["radix_sort"], float(passes)
  if sort_model:
    srt, snames = _op_in(module, ins, names, "sort")
    if srt is not None:
      shapes = [snames[o].shape for o in srt.operands if o in snames]
      if shapes:
        dims = [int(v) for v in re.findall(r"\d+", srt.attrs.get("dimensions", ""))]
        d = dims[0] if dims and dims[0] < len(shapes[0].dims) else len(shapes[0].dims) - 1
        size = shapes[0].dims[d] if shapes[0].dims else 1
        b = bitonic_sort_bytes(shapes[0].num_elements, max(int(size), 1), sum(_elem_bytes(s) for s in shapes))
        f = _kernel(module, ins, names)[0]
        return f, b, CLASS_ID["sort"], 1.0
  if scatter_contention:
    sct, snames = _op_in(module, ins, names, "scatter")
    if sct is not None and len(sct.operands) >= 3 and all(o in snames for o in sct.operands[:3]):
      nops = (len(sct.operands) - 1) // 2                 # variadic: operands..., indices, updates...
      target, idx = snames[sct.operands[0]].shape, snames[sct.operands[nops]].shape
      ivd = int(sct.attrs.get("index_vector_dim", str(len(idx.dims))).strip() or len(idx.dims))
      n_upd = float(np.prod([v for i, v in enumerate(idx.dims) if i != ivd])) if idx.dims else 1.0
      sdims = [int(v) for v in re.findall(r"\d+", sct.attrs.get("scatter_dims_to_operand_dims", ""))]
      n_tgt = float(np.prod([target.dims[i] for i in sdims if i < len(target.dims)])) if sdims else 1.0
      narrow = _elem_bytes(target) < 4
      n_elem = float(sum(snames[o].shape.num_elements for o in sct.operands[nops + 1:] if o in snames))
      steps_fn = scatter_serial_steps if scatter_width else scatter_atomic_steps
      steps = steps_fn(n_upd, max(n_tgt, 1.0), n_elem, narrow) if _scatter_is_atomic(module, sct) else 1.0
      _, b, _ = _kernel(module, ins, names)
      klass = CLASS_ID["scatter_narrow" if narrow else "scatter"]
      return steps * SCATTER_CHAIN_FLOPS, b, klass, 1.0
  return None


def _tiled_sort_kernel(module: HloModule, ins: Instruction, names: dict):
  """(flops, bytes per launch, class ``sort``, launches) of an XLA sort kernel under ``sort_tiles``, or None
  (not a sort, or cub's custom call)."""
  srt, snames = _op_in(module, ins, names, "sort")
  if srt is None:
    return None
  shapes = [snames[o].shape for o in srt.operands if o in snames]
  if not shapes:
    return None
  dims = [int(v) for v in re.findall(r"\d+", srt.attrs.get("dimensions", ""))]
  d = dims[0] if dims and dims[0] < len(shapes[0].dims) else len(shapes[0].dims) - 1
  size = max(int(shapes[0].dims[d]) if shapes[0].dims else 1, 1)
  bpe = sum(_elem_bytes(s_) for s_ in shapes)
  launches, _ = xla_sort_launches(size, bpe)
  b = bitonic_sort_hbm_bytes(shapes[0].num_elements, size, bpe)
  return _kernel(module, ins, names)[0], b / launches, CLASS_ID["sort"], float(launches)


def _library_fusion_call(module: HloModule, ins: Instruction) -> Instruction | None:
  """The library call a fusion of kind ``kCustom`` wraps, or None: XLA's custom fusions -- the
  dynamic-slice fusion (``custom_fusion_config`` ``dynamic_slice_fusion``) that runs a cuBLAS call on an
  address offset of a loop-carried buffer -- are a computation whose root is the library ``custom-call``
  and whose other instructions (slices, bitcasts) only compute its operand addresses; no kernel of XLA's
  own is launched (the profiler shows only the library's kernels, e.g. cuBLAS's ``nvjet_*``)."""
  if ins.opcode not in ("fusion", "fusion-start") or ins.attrs.get("kind", "").strip() != "kCustom":
    return None
  called = ins.called()
  if not called or called[0] not in module.computations:
    return None
  root = module.computations[called[0]].root
  return root if root is not None and root.opcode == "custom-call" else None


def _default_time(rows) -> float:
  """Time of (flops, bytes, class, count) rows at the fit's starting roofline (branch choice only)."""
  cfg = KernelRooflineConfig()
  return sum(r[3] * (max(r[0] / cfg.init_flops_rate, r[1] / cfg.init_bytes_rate) + cfg.init_overhead_s)
             for r in rows)


def program_kernels(module: HloModule | str, sort_model: bool = False,
                    scatter_contention: bool = False, conv_model: bool = False,
                    custom_fusion_calls: bool = False, sort_tiles: bool = False,
                    scatter_width: bool = False, conv_direction: bool = False) -> KernelTable:
  """The kernels a program launches, with per-launch FLOPs and bytes, class and launch count.

  Walks the entry computation: every instruction that is not bookkeeping (parameters, tuples,
  bitcasts, the second half of async pairs, ...) launches one kernel; ``call`` and async wrappers are
  walked into; a ``while`` loop's body runs ``known_trip_count`` times (XLA's annotation; 1 and counted
  in ``unknown_trips`` when absent); its condition, class ``loop``, runs ``trips + 1`` = 2 times when the
  trip count is unknown and never when it is known (XLA's GPU ``WhileThunk`` then runs the body
  ``trip_count`` times without evaluating the condition: the condition's rows have count 0); a
  ``conditional`` counts its costliest branch.

  Options (off by default: the tables are then as before them):

  - ``sort_model``: a sort gets a class of its own and the bytes of its algorithm. XLA's own sort
    kernels (a ``sort`` instruction, or a fusion holding one): class ``sort``, bytes
    :func:`bitonic_sort_bytes` (every element of every operand read and written once per stage of the
    bitonic network along the sort dimension). cub's radix sort custom calls (target ``*cub_sort*``):
    class ``radix_sort``, :func:`cub_sort_passes` launches per program run (``ceil(key bits / 8)`` for
    one array, ``ceil(key bits / 6)`` for a batch of rows, cub's segmented sort; count times the passes:
    each pass pays the class's per-launch cost), each moving ``2 n (key bytes + value bytes)``.
  - ``scatter_contention``: a scatter (or a fusion holding one) gets class ``scatter`` (32/64-bit
    elements) or ``scatter_narrow`` (16-bit and narrower: emulated atomics, ~100x slower per conflicting
    update on the H200 data), and its FLOPs become the atomic-work feature ``scatter_atomic_steps(N, T,
    E, narrow) * SCATTER_CHAIN_FLOPS`` (the longer of the chain of updates per distinct target -- 16-bit
    scatters only -- and the element updates ``E`` over :data:`SCATTER_STEP_ELEMENTS`, from the index,
    operand and update shapes; 1 for scatters that overwrite or have ``unique_indices``), so the
    roofline's time is ``max(steps / rate, bytes / bandwidth)``.
  - ``conv_model``: a cuDNN convolution custom call counts the FLOPs of its direction
    (:func:`cudnn_conv_flops`: backward-input and backward-filter calls do the forward convolution's
    multiply-adds; the default count takes the forward formula on the permuted shapes, 4x or more too
    many for strided or 1x1 convolutions' backward passes).

  - ``custom_fusion_calls`` (session 20): a fusion of kind ``kCustom`` whose root is a library custom call
    (XLA's dynamic-slice fusion, :func:`_library_fusion_call`: a cuBLAS GEMM on a slice of a loop-carried
    buffer, in ``rnn``'s loop bodies when Triton GEMMs are off) is that library call: its bytes count the
    call's result without the workspace element of its tuple (the default counts the 32 MiB cuBLAS
    workspace as written bytes on every launch), and it is flagged ``library`` (its profiler kernels carry
    cuBLAS's names, and it pays the library launch gap).
  - ``sort_tiles`` (session 20): XLA's own sort kernels get class ``sort`` (as with ``sort_model``) and the
    launches and HBM-equivalent bytes of XLA's tiled bitonic sort (:func:`xla_sort_launches`,
    :func:`bitonic_sort_hbm_bytes`): compare-exchange steps of distance below the 2,048-element tile run in
    shared memory inside one launch, the others one launch each; every launch reads and writes the
    operands from HBM once, and each shared-memory step costs ``SMEM_HBM_RATIO`` of an HBM pass. The
    default (``sort_model``) counts every step of the network as an HBM pass over the operands.
  - ``scatter_width`` (session 27; needs ``scatter_contention``): a 16-bit scatter's FLOPs are
    :func:`scatter_serial_steps` ``(N, T, E) * SCATTER_CHAIN_FLOPS`` = ``(c + E / SCATTER_SERIAL_STEP_ELEMENTS)``
    chain steps -- the chain and the element updates add (compare-and-swap rounds that do not overlap) instead
    of ``max(c, E / SCATTER_STEP_ELEMENTS)``; 32/64-bit scatters unchanged.
  - ``conv_direction`` (session 27): an untuned cuDNN backward-input or backward-filter convolution
    (:func:`untuned_conv_is_backward`) gets class ``conv_untuned_bwd`` instead of ``conv_untuned`` (its own
    fitted rates and overhead); FLOPs and bytes unchanged.
  Args:
    module: a parsed :class:`~mlsys_jax.cost.hlo.HloModule` or HLO text.
    sort_model: bool, the sort option above.
    scatter_contention: bool, the scatter option above.
    conv_model: bool, the convolution option above.
    custom_fusion_calls: bool, the custom-fusion option above.
    sort_tiles: bool, the tiled-sort option above (takes precedence over ``sort_model`` for XLA's sorts).
    scatter_width: bool, the serial scatter-steps option above (with ``scatter_contention`` only).
    conv_direction: bool, the untuned backward-convolution class above.
  Returns:
    A :class:`KernelTable` (possibly empty: a program that only forwards its parameters).
  """
  if isinstance(module, str):
    module = parse_hlo(module)
  if not isinstance(module, HloModule):
    raise TypeError(f"program_kernels needs an HloModule or HLO text, got {type(module).__name__}.")
  for nm, v in (("sort_model", sort_model), ("scatter_contention", scatter_contention),
                ("conv_model", conv_model), ("custom_fusion_calls", custom_fusion_calls),
                ("sort_tiles", sort_tiles), ("scatter_width", scatter_width), ("conv_direction", conv_direction)):
    if not isinstance(v, (bool, np.bool_)):
      raise TypeError(f"program_kernels: {nm} must be a bool (True/False), got {v!r}.")
  if scatter_width and not scatter_contention:
    raise ValueError("program_kernels: scatter_width changes scatter_contention's atomic-work feature: pass "
                     "scatter_contention=True too.")
  rows: list[tuple[float, float, int, float, str, bool, str]] = []
  unknown = [0]

  def walk(comp: Computation, mult: float, force_class: int | None, depth: int) -> None:
    if depth > 16:
      raise ValueError(f"computation nesting deeper than 16 at {comp.name!r} (a recursive call graph?).")
    names = comp.by_name()
    for ins in comp.instructions:
      op = ins.opcode
      if op in _NO_KERNEL:
        continue
      called = [c for c in ins.called() if c in module.computations]
      if op == "while":
        n = _trip_count(ins)
        # XLA's GPU WhileThunk runs a loop of known trip count as `trip_count` runs of the body alone: the
        # condition is never launched (no predicate copied back to the host); its rows stay, with count 0
        cond_runs = 0 if n is not None else 2
        if n is None:
          unknown[0] += 1 if mult > 0 else 0   # a loop that never runs (inside a count-0 body) is no guess
          n = 1
        body = ins.attrs.get("body", "").strip().lstrip("%")
        cond = ins.attrs.get("condition", "").strip().lstrip("%")
        if body in module.computations:
          walk(module.computations[body], mult * n, force_class, depth + 1)
        if cond in module.computations:
          walk(module.computations[cond], mult * cond_runs, CLASS_ID["loop"], depth + 1)
        continue
      if op in ("call", "async-start") and called:
        for c in called:
          walk(module.computations[c], mult, force_class, depth + 1)
        continue
      if op == "conditional" and called:   # the costliest branch by the default roofline's time estimate
        best: list = []
        best_unknown = 0
        for c in called:
          rows_before, unknown_before = len(rows), unknown[0]
          walk(module.computations[c], mult, force_class, depth + 1)
          sub_rows = rows[rows_before:]
          del rows[rows_before:]
          sub_unknown, unknown[0] = unknown[0] - unknown_before, unknown_before
          if not best or _default_time(sub_rows) >= _default_time(best):
            best, best_unknown = sub_rows, sub_unknown
        rows.extend(best)
        unknown[0] += best_unknown
        continue
      special = _tiled_sort_kernel(module, ins, names) if sort_tiles else None
      if special is None and (sort_model or scatter_contention or conv_model):
        special = _special_kernel(module, ins, names, sort_model, scatter_contention, conv_model,
                                  scatter_width=scatter_width)
      library = op == "custom-call"
      if special is None and custom_fusion_calls and _library_fusion_call(module, ins) is not None:
        f, _, k = _kernel(module, ins, names)
        b = _fusion_bytes(module, ins, module.computations[ins.called()[0]], names, call_result_only=True)
        launches, library = 1.0, True
      elif special is None:
        f, b, k = _kernel(module, ins, names)
        launches = 1.0
      else:
        f, b, k, launches = special
      if conv_direction and k == CLASS_ID["conv_untuned"] and untuned_conv_is_backward(module, ins):
        k = CLASS_ID["conv_untuned_bwd"]
      rows.append((f, b, force_class if force_class is not None else k, mult * launches, ins.name.lstrip("%"),
                   library, kernel_body(module, ins, names)))

  walk(module.entry, 1.0, None, 0)
  if not rows:
    z = np.zeros(0)
    return KernelTable(z, z.copy(), np.zeros(0, np.int32), z.copy(), unknown[0], (), np.zeros(0, bool), ())
  f, b, k, m, nm, lib, body = zip(*rows)
  return KernelTable(np.asarray(f, np.float64), np.asarray(b, np.float64), np.asarray(k, np.int32),
                     np.asarray(m, np.float64), unknown[0], tuple(nm), np.asarray(lib, bool), tuple(body))


# ------------------------------------------------------------------------------------------------
# Per-kernel labels from the profiler.

def profile_name(hlo_name: str) -> str:
  """The name the GPU profiler gives the kernel of HLO instruction ``hlo_name``: XLA names a kernel
  after its fusion (or ``wrapped_<opcode>`` fusion) with every character outside ``[A-Za-z0-9_]``
  replaced by ``_`` (``gemm_fusion_dot.3`` -> ``gemm_fusion_dot_3``).

  >>> profile_name("%gemm_fusion_dot.3"), profile_name("loop_add_fusion")
  ('gemm_fusion_dot_3', 'loop_add_fusion')
  """
  if not isinstance(hlo_name, str) or not hlo_name.strip("%"):
    raise ValueError(f"profile_name needs a non-empty HLO instruction name, got {hlo_name!r}.")
  return re.sub(r"[^A-Za-z0-9_]", "_", hlo_name.lstrip("%"))


class KernelLabels(NamedTuple):
  """Measured device time of groups of one program's kernels (rows of its :class:`KernelTable`).

  Attributes:
    rows: int32[R] kernel-table rows that carry a label.
    group: int32[R] label group of each of those rows (0..G-1); a group's measured time is the time
      of all launches of all its rows in one program run.
    time_s: float64[G] measured seconds per program run of each group (> 0).
    matched_s: profiler seconds assigned to a kernel by name.
    library_s: profiler seconds pooled onto the program's unmatched kernels (names that are no HLO
      kernel: cuBLAS/cuDNN/CUTLASS kernels, their split-K reductions and workspace memsets, sort passes).
    unassigned_s: profiler seconds left without a kernel (no name match and every kernel matched, or a
      name match to a kernel whose table count is 0).
  """
  rows: np.ndarray
  group: np.ndarray
  time_s: np.ndarray
  matched_s: float
  library_s: float
  unassigned_s: float


def match_kernel_times(table: KernelTable, kernel_times: dict, shared_kernels: bool = False,
                       kernel_bodies: bool = False, kernel_suffixes: bool = False) -> KernelLabels:
  """Assign the profiler's per-kernel times of one program run to the rows of its kernel table.

  Rule: a profiler kernel whose name is :func:`profile_name` of a kernel's HLO name labels that kernel
  alone (XLA's own fusions and ``wrapped_*`` kernels). Every other profiler kernel -- library kernels
  named by cuBLAS/cuDNN/CUTLASS (GEMM, split-K reduce, epilogue, workspace memset), which cannot be told
  apart from each other, and the several kernels of a sort fusion, named after the sort inside -- is
  pooled into one group labelling all the program's kernels that no profiler name matched (its
  library calls, ``table.library``, and such fusions); with no such kernel its time stays unassigned.
  Kernels whose ``table.count`` is 0 (a loop with ``known_trip_count`` 0) launch nothing and get no
  label (a name match to one is unassigned time), so every group can be fitted.

  With ``shared_kernels``: XLA compiles identical fusions (same fused computation and shapes) once and
  launches that one kernel, named after the first of them, for each (on the H200 data ``rnn``'s loop body
  holds ``gemm_fusion_dot_general.2`` and ``.3``, and the profiler shows only ``..._2``, with the time of
  both); so a kernel that no profiler name matched, not a library call, whose (class, FLOPs, bytes) equal
  those of a name-matched kernel joins that kernel's group instead of the pool.

  With ``kernel_bodies`` (session 20; needs ``table.bodies``): the shared-kernel rule joins an unmatched
  kernel to a name-matched kernel of the same :func:`kernel_body` -- the same fused computation, which is
  what XLA's kernel reuse keys on -- instead of any kernel of the same (class, FLOPs, bytes): on the H200
  data an attention program has four transposes of one size, ``input_transpose_fusion`` and three
  ``wrapped_transpose``; the profiler shows ``wrapped_transpose_2`` with two launches' time (its twin
  ``wrapped_transpose`` ran as it), and the signature rule gave that twin to ``input_transpose_fusion``,
  whose label then covered two kernels with one kernel's time (and ``wrapped_transpose_2``'s one kernel
  with two kernels' time). Implies ``shared_kernels``.

  With ``kernel_suffixes`` (session 20): a profiler kernel ``<name>__<k>`` whose ``<name>`` labels a kernel
  is that kernel's ``k``-th further launch group (XLA names the several kernels one HLO instruction emits
  -- its sort's launches, :func:`xla_sort_launches` -- ``<name>``, ``<name>__1``, ...): its time joins
  that kernel's label instead of the pool.

  Args:
    table: a :class:`KernelTable` from :func:`program_kernels` (with ``names`` and ``library``).
    kernel_times: profiler kernel name -> seconds per program run (``dataset.load_device_times``).
    shared_kernels: bool, the rule for XLA's shared kernels above (default off: as before).
    kernel_bodies: bool, the shared-kernel rule by fused computation (default off).
    kernel_suffixes: bool, the ``<name>__<k>`` rule (default off).
  Returns:
    :class:`KernelLabels` (possibly with no groups).
  """
  for nm_, v_ in (("shared_kernels", shared_kernels), ("kernel_bodies", kernel_bodies),
                  ("kernel_suffixes", kernel_suffixes)):
    if not isinstance(v_, (bool, np.bool_)):
      raise TypeError(f"{nm_} must be a bool, got {v_!r}.")
  if not isinstance(table, KernelTable):
    raise TypeError(f"match_kernel_times needs a KernelTable, got {type(table).__name__}.")
  if table.names is None or table.library is None or len(table.names) != table.flops.size \
      or np.shape(table.library) != table.flops.shape:
    raise ValueError("match_kernel_times needs a KernelTable with names and library flags for every kernel "
                     "(from program_kernels).")
  if not isinstance(kernel_times, dict):
    raise TypeError(f"kernel_times must be a dict (kernel name -> seconds), got {type(kernel_times).__name__}.")
  for k, v in kernel_times.items():
    if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
        or not np.isfinite(v) or v < 0:
      raise ValueError(f"kernel_times[{k!r}] = {v!r}: need a finite time >= 0 seconds under a str name.")
  if kernel_bodies and (table.bodies is None or len(table.bodies) != table.flops.size):
    raise ValueError("kernel_bodies needs KernelTable.bodies, one per kernel (build the table with program_kernels).")
  by_name: dict[str, list[int]] = {}
  for i, n in enumerate(table.names):
    by_name.setdefault(profile_name(n), []).append(i)
  if kernel_suffixes:   # '<name>__<k>': further launches of kernel <name>; their times add to its label
    merged: dict = {}
    for n, v in kernel_times.items():
      m_ = re.match(r"^(.*)__(\d+)$", n)
      key = m_.group(1) if (m_ and m_.group(1) in by_name) else n
      merged[key] = merged.get(key, 0.0) + float(v)
    kernel_times = merged
  rows, group, times = [], [], []
  matched_rows: set[int] = set()
  matched = pooled = lost = 0.0
  if shared_kernels or kernel_bodies:   # unmatched, non-library kernels identical to a name-matched one run as its kernel
    sig = (lambda i: table.bodies[i]) if kernel_bodies else \
        (lambda i: (int(table.klass[i]), float(table.flops[i]), float(table.bytes[i])))
    named = {i for n in kernel_times for i in by_name.get(n, [])}
    owner: dict = {}
    for n in sorted(kernel_times):
      for i in by_name.get(n, []):
        owner.setdefault(sig(i), n)
    by_name = {n: list(ix) for n, ix in by_name.items()}
    for i in range(table.flops.size):
      if i not in named and not table.library[i] and sig(i) in owner:
        by_name[owner[sig(i)]].append(i)
  for name in sorted(kernel_times):
    v = float(kernel_times[name])
    ix = by_name.get(name)
    if ix is None:
      pooled += v
      continue
    matched_rows.update(ix)
    if not any(table.count[i] > 0 for i in ix):   # a kernel the table says never launches (count 0)
      lost += v
      continue
    matched += v
    if v > 0:
      rows += ix
      group += [len(times)] * len(ix)
      times.append(v)
  lib = [i for i in range(table.flops.size) if i not in matched_rows and table.count[i] > 0]
  unassigned = pooled
  if lib and pooled > 0:
    rows += lib
    group += [len(times)] * len(lib)
    times.append(pooled)
    unassigned = 0.0
  return KernelLabels(np.asarray(rows, np.int32), np.asarray(group, np.int32), np.asarray(times, np.float64),
                      matched, pooled - unassigned, unassigned + lost)


# ------------------------------------------------------------------------------------------------
# The model: per-class, per-device rates and overheads.

class KernelRoofline(NamedTuple):
  """Fitted per-kernel roofline (log-space parameters; ``D`` devices x ``C`` = len(KERNEL_CLASSES)).

  Attributes:
    devices: the device names, in the order of the first axis.
    log_flops_rate: float64[D, C] log FLOP/s each kernel class achieves.
    log_bytes_rate: float64[D, C] log byte/s.
    log_overhead: float64[D, C] log seconds added per launch.
    log_program_overhead: float64[D] log seconds added per program run (dispatch).
    sharpness: ``p`` of the soft maximum ``(a^p + b^p)^(1/p)`` of the compute and memory times (large:
      the roofline's max; 1: their sum, no overlap).
    train_kernels: float64[D, C] kernels of each class and device in the training programs (0: the
      class's parameters are the median of the device's fitted classes; see :func:`kernel_roofline_ood`).
    log_launch_gap: float64[D, C] log seconds added per launch of a class beyond the kernel's device time
      (the idle gap before it: host-side launch, library setup), or None (0). Fitted only with per-kernel
      labels (:func:`fit_kernel_roofline` ``kernel_labels``): then ``softmax + o`` is a kernel's measured
      device time and the gap and ``O_d`` carry the rest of the wall time.
    log_host_floor: float64[D] log seconds of the host's per-call floor, or None: the wall time of a
      program timed in back-to-back calls is ``softmax_q(T_device, H_d)`` (sharpness ``floor_sharpness``):
      while the device runs, the host dispatches the next call, so a program shorter than the host's
      dispatch time costs about ``H_d`` however small its kernels (fitted with
      ``KernelRooflineConfig.host_floor``).
    log_host_launch: float64[D, C] log seconds the host spends issuing one launch of a class, or None (0):
      the host side of the overlap then grows with the launches, ``H_d + sum_k m_k h_{c(k),d}``, and the
      wall time is ``softmax_q(T_device, H_d + sum_k m_k h_{c,d})`` (fitted with
      ``KernelRooflineConfig.host_launch``; needs ``log_host_floor``).
    gap_library_only: the launch gap applies to library calls only (``KernelTable.library``).
    log_wall_scale: float64[D] log of ``s_d``, the ratio of a kernel's share of the wall time to its
      profiled device time, or None (1): ``T = O_d + sum_k m_k (s_d (softmax + o) + g)`` (fitted with
      per-kernel labels and ``KernelRooflineConfig.wall_scale``; on the profiled H200 programs the timed
      wall time of long programs is ~1.1x their profiled busy time).
    l2_bytes, log_l2_speedup: the L2-residency term (``KernelRooflineConfig.l2_bytes``), or None: a
      kernel's first ``l2_bytes`` bytes move ``r_d = exp(log_l2_speedup[d])`` times faster than the class's
      byte rate, the rest at it (:func:`l2_effective_bytes`).
    overhead_overlap: a kernel's time is ``softmax_p(f/F, b/B, o)`` (its fixed latency overlaps its work)
      instead of ``softmax_p(f/F, b/B) + o`` (``KernelRooflineConfig.overhead_overlap``).
    gap_on_host: the launch gap is host time on the host side of the overlap, ``softmax_q(T, H_d + sum_k m_k
      g)``, instead of device idle time added to ``T`` (``KernelRooflineConfig.gap_on_host``).
    host_scale: float64[2] ``(gamma_h, gamma_o)``, or None: fitted with a per-program ``host_covariate`` ``z``
      (:func:`fit_kernel_roofline`; e.g. the log of the collection's measured dispatch floor): the host side of
      the overlap (``H_d``, the per-launch host costs, a host-side launch gap) is ``exp(gamma_h z)`` times, the
      program overhead ``O_d`` ``exp(gamma_o z)`` times the device's; prediction then needs ``z`` too.
    host_scale_launch: ``gamma_k``, or None: fitted with ``fit_kernel_roofline(host_covariate_launch=True)``
      (session 27): the covariate scales the per-launch device-side wall costs instead of the program overhead,
      ``T = O_d + sum_k m_k (s_d softmax_p(f/F, b/B, o e^{gamma_k z}) + g e^{gamma_k z})`` (``host_scale`` is then
      ``(gamma_h, 0)``); the busy time (``what='busy'``) keeps ``o`` unscaled.
    library_scale: float64[D] ``gamma_{L,d}``, or None: fitted with ``fit_kernel_roofline(library_covariate=...)``
      (session 28): the host-side costs of library calls (``KernelTable.library``: their per-launch host cost
      ``h_{c,d}`` and a host-side launch gap ``g``) are ``exp(gamma_{L,d} z_L)`` times the device's, ``z_L`` a
      per-program covariate (the log of the collection's dispatch floor); prediction then needs ``z_L`` too.
  """
  devices: tuple
  log_flops_rate: np.ndarray
  log_bytes_rate: np.ndarray
  log_overhead: np.ndarray
  log_program_overhead: np.ndarray
  sharpness: float
  train_kernels: np.ndarray | None = None
  log_launch_gap: np.ndarray | None = None
  log_host_floor: np.ndarray | None = None
  floor_sharpness: float = 8.0
  log_host_launch: np.ndarray | None = None
  log_wall_scale: np.ndarray | None = None
  gap_library_only: bool = False
  l2_bytes: float | None = None
  log_l2_speedup: np.ndarray | None = None
  overhead_overlap: bool = False
  gap_on_host: bool = False
  host_scale: np.ndarray | None = None
  host_scale_launch: float | None = None
  library_scale: np.ndarray | None = None


def _host_covariate(host_covariate, n: int, model_has: bool | None = None, name: str = "host_covariate",
                    field: str = "host_scale") -> np.ndarray | None:
  """``host_covariate`` as float64[n] (finite), or None; with ``model_has`` (predict), it must be given exactly
  when the model was fitted with one (``name`` / ``field``: the argument and the model field the errors name)."""
  if model_has is not None and (host_covariate is None) == model_has:
    raise ValueError(f"{name}: pass one value per program exactly when the model was fitted with one "
                     f"(model.{field} is {'set' if model_has else 'None'}).")
  if host_covariate is None:
    return None
  z = np.asarray(host_covariate, np.float64)
  if z.shape != (n,) or not np.all(np.isfinite(z)):
    raise ValueError(f"{name} must be {n} finite values (one per program), got shape {z.shape}"
                     f"{'' if z.shape != (n,) else ' with non-finite entries'}.")
  return z


def l2_effective_bytes(nbytes, l2_bytes: float, log_speedup, xp=np):
  """HBM-equivalent bytes of kernels whose working set may sit in the last-level cache:
  ``min(b, L) / r + max(b - L, 0)`` with ``r = exp(log_speedup)`` -- a two-level memory roofline
  (Ilic, Pratas and Sousa, "Cache-aware roofline model", IEEE CAL 2014, Eq. 2-3: the bandwidth of the
  level the data come from): a kernel moving less than the L2 capacity ``L`` (50 MB on the H100/H200)
  mostly reads what the previous kernel, or the previous timed call, left in L2 (on the H200 data,
  ~1 us kernels of a few MB in ``rnn``'s loop bodies run above the HBM bandwidth), the bytes beyond it
  stream from HBM.

  >>> float(l2_effective_bytes(np.asarray(3e7), 5e7, np.log(2.0))), float(l2_effective_bytes(np.asarray(8e7), 5e7, 0.0))
  (15000000.0, 80000000.0)
  """
  if not (np.isfinite(l2_bytes) and l2_bytes > 0):
    raise ValueError(f"l2_bytes must be positive and finite, got {l2_bytes!r}.")
  return xp.minimum(nbytes, l2_bytes) * xp.exp(-log_speedup) + xp.maximum(nbytes - l2_bytes, 0.0)


def _kernel_time(a, c, o, p, overlap: bool, xp=np):
  """One launch's device time: ``softmax_p(a, c) + o``, or with ``overlap`` ``softmax_p(softmax_p(a, c), o)``."""
  return _soft_max(_soft_max(a, c, p, xp), o, p, xp) if overlap else _soft_max(a, c, p, xp) + o


def _soft_max(a, b, p, xp=np):
  """``(a^p + b^p)^(1/p)`` for a, b >= 0, computed without overflow (0 where both are 0)."""
  m = xp.maximum(a, b)
  pos = m > 0
  safe = xp.where(pos, m, 1.0)
  # the untaken branch must stay differentiable too: 0 ** (1 / p) has an infinite derivative
  inner = xp.where(pos, (a / safe) ** p + (b / safe) ** p, 1.0)
  return xp.where(pos, safe * inner ** (1.0 / p), 0.0)


def _check_tables(tables: Sequence[KernelTable], devices: Sequence[str]) -> np.ndarray:
  if len(tables) == 0:
    raise ValueError("need at least one program (KernelTable).")
  if len(devices) != len(tables):
    raise ValueError(f"need one device per program: {len(tables)} tables, {len(devices)} devices.")
  for i, t in enumerate(tables):
    if not isinstance(t, KernelTable):
      raise TypeError(f"tables[{i}] is a {type(t).__name__}, not a KernelTable (use program_kernels).")
    n = t.flops.shape
    if not (t.bytes.shape == t.klass.shape == t.count.shape == n) or len(n) != 1:
      raise ValueError(f"tables[{i}]: flops, bytes, klass, count need one 1-D shape.")
    if np.any(t.flops < 0) or np.any(t.bytes < 0) or np.any(t.count < 0) or not (
        np.all(np.isfinite(t.flops)) and np.all(np.isfinite(t.bytes)) and np.all(np.isfinite(t.count))):
      raise ValueError(f"tables[{i}]: flops, bytes and count must be finite and >= 0.")
    if not np.issubdtype(np.asarray(t.klass).dtype, np.integer):
      raise TypeError(f"tables[{i}]: klass must be integer indices into KERNEL_CLASSES, got dtype "
                      f"{np.asarray(t.klass).dtype}.")
    if t.klass.size and (t.klass.min() < 0 or t.klass.max() >= len(KERNEL_CLASSES)):
      raise ValueError(f"tables[{i}]: klass must index KERNEL_CLASSES (0..{len(KERNEL_CLASSES) - 1}).")
  return np.asarray(devices, dtype=object)


def _library_flags(tables: Sequence[KernelTable]) -> np.ndarray:
  """float64 1/0 per kernel of all tables (library call or not), for ``gap_library_only``: every table
  needs its ``library`` flags, one per kernel (a missing flag would silently drop the gap)."""
  parts = []
  for i, t in enumerate(tables):
    if t.library is None or np.shape(t.library) != t.flops.shape:
      raise ValueError(f"tables[{i}]: gap_library_only needs KernelTable.library, one flag per kernel (got "
                       f"{None if t.library is None else np.shape(t.library)} for {t.flops.size} kernels); build "
                       "the tables with program_kernels, or fit without gap_library_only.")
    parts.append(np.asarray(t.library, np.float64))
  return np.concatenate(parts) if parts else np.zeros(0)


def _flatten(tables: Sequence[KernelTable]):
  rows = np.concatenate([np.full(t.flops.size, i, np.int32) for i, t in enumerate(tables)])
  cat = lambda f: np.concatenate([getattr(t, f) for t in tables]) if rows.size else np.zeros(0)
  return cat("flops"), cat("bytes"), cat("klass").astype(np.int32), cat("count"), rows


def predict_kernel_roofline(model: KernelRoofline, tables: Sequence[KernelTable],
                            devices: Sequence[str], what: str = "wall", host_covariate=None,
                            library_covariate=None) -> np.ndarray:
  """Predicted runtime (seconds) of each program: ``T = O_d + sum_k m_k (softmax_p(f_k/F, b_k/B) + o + g)``
  (``o``, ``g``: the kernel class's overhead and launch gap on device ``d``; ``g`` = 0 without
  ``model.log_launch_gap``; the kernel terms times ``s_d`` with ``model.log_wall_scale``), and
  ``softmax_q(T, H_d)`` with a host floor (``model.log_host_floor``), or
  ``softmax_q(T, H_d + sum_k m_k h_{c,d})`` with per-launch host costs too (``model.log_host_launch``).
  A kernel of a scatter class the model saw no training kernel of on its device (``train_kernels`` 0)
  gets no FLOP term: its FLOPs are ``program_kernels``' contention feature, whose cost is not identified
  (the class's other parameters are the median of the fitted classes, and :func:`kernel_roofline_ood`
  flags it).

  Args:
    model: a fitted :class:`KernelRoofline`.
    tables: one :class:`KernelTable` per program (:func:`program_kernels`).
    devices: the device of each program (one of ``model.devices``).
    what: 'wall' (the program's runtime) or 'busy' (the summed device time of its kernels,
      ``sum_k m_k (softmax + o)``: what the profiler's ``device_busy_s`` measures; meaningful for a model
      fitted with per-kernel labels).
    host_covariate: per program ``z`` (as in :func:`fit_kernel_roofline`), exactly when ``model.host_scale`` is set.
    library_covariate: per program ``z_L`` (:func:`fit_kernel_roofline`'s ``library_covariate``), exactly when
      ``model.library_scale`` is set.
  Returns:
    float64[len(tables)] seconds.
  """
  if what not in ("wall", "busy"):
    raise ValueError(f"what must be 'wall' or 'busy', got {what!r}.")
  dev = _check_tables(tables, devices)
  known = {d: i for i, d in enumerate(model.devices)}
  bad = sorted({str(d) for d in dev if d not in known})
  if bad:
    raise ValueError(f"devices {bad} were not in the training data (model devices: {list(model.devices)}).")
  di = np.asarray([known[d] for d in dev], np.int64)
  z = _host_covariate(host_covariate, len(tables), model.host_scale is not None)
  zl = _host_covariate(library_covariate, len(tables), model.library_scale is not None, "library_covariate",
                      "library_scale")
  f, b, k, m, rows = _flatten(tables)
  kd = di[rows]
  # the library flags, once: for the launch gap of library calls only and for the library covariate
  lib = _library_flags(tables) if zl is not None or (model.log_launch_gap is not None and model.gap_library_only) \
      else None
  lib_f = None   # session 28: library calls' host-side costs x e^{gamma_{L,d} z_L} (1 for XLA's own kernels)
  if zl is not None:
    lib_f = 1.0 + lib * (np.exp(model.library_scale[kd] * zl[rows]) - 1.0)
  a = f / np.exp(model.log_flops_rate[kd, k])
  if model.train_kernels is not None:
    # a scatter class without training kernels on the device: its FLOPs are the contention feature
    # (program_kernels' scatter_contention), whose cost no training kernel identified -- bandwidth only
    a = np.where(np.isin(k, _SCATTER_IDS) & (model.train_kernels[kd, k] == 0), 0.0, a)
  if model.l2_bytes is not None:
    b = l2_effective_bytes(b, model.l2_bytes, model.log_l2_speedup[kd])
  c = b / np.exp(model.log_bytes_rate[kd, k])
  o = np.exp(model.log_overhead[kd, k])
  launch_f = None
  if what == "wall" and model.host_scale_launch is not None:   # session 27: per-launch wall costs x e^{gamma_k z}
    launch_f = np.exp(model.host_scale_launch * z[rows])
    o = o * launch_f
  t = m * _kernel_time(a, c, o, model.sharpness, model.overhead_overlap)
  if what == "busy":
    out = np.zeros(len(tables))
  else:
    out = np.exp(model.log_program_overhead[di])
    if z is not None:   # the program overhead's factor
      out = out * np.exp(model.host_scale[1] * z)
    if model.log_wall_scale is not None:
      t = t * np.exp(model.log_wall_scale[kd])
    g_t = None
    if model.log_launch_gap is not None:
      g_t = m * np.exp(model.log_launch_gap[kd, k]) * (lib if model.gap_library_only else 1.0)
      if not model.gap_on_host:
        t = t + (g_t if launch_f is None else g_t * launch_f)
  np.add.at(out, rows, t)
  if what == "wall" and model.log_host_floor is not None:
    host = np.exp(model.log_host_floor[di])
    if model.gap_on_host and g_t is not None:
      np.add.at(host, rows, g_t if lib_f is None else g_t * lib_f)
    if model.log_host_launch is not None:
      hl_t = m * np.exp(model.log_host_launch[kd, k])
      np.add.at(host, rows, hl_t if lib_f is None else hl_t * lib_f)
    if z is not None:   # the whole host side: floor, launches, host-side gap
      host = host * np.exp(model.host_scale[0] * z)
    out = _soft_max(out, host, model.floor_sharpness)
  elif what == "wall" and model.log_host_launch is not None:
    raise ValueError("model.log_host_launch needs model.log_host_floor (the host side of the overlap).")
  return out


class KernelRooflineConfig(NamedTuple):
  """Fitting settings of :func:`fit_kernel_roofline`.

  Attributes:
    sharpness: ``p`` of the soft maximum (kept fixed, not fitted).
    ridge: weight of the L2 penalty that pulls each class's log parameters toward the device's shared
      value and each device's toward the shared one (a class with no training kernels gets the median of
      the device's fitted classes; :func:`kernel_roofline_ood` flags the programs that use one).
    objective: 'log' (squared log error), 'mape' (mean absolute percentage error), or 'huber_log' (the
      pseudo-Huber loss of the log error, :data:`HUBER_DELTA`; also on the kernel labels).
    calibrate: after fitting, scale every predicted time by the one factor that minimises the training
      programs' MAPE (``metrics.mape_scale``; a log-error fit predicts the median, MAPE is minimised
      lower); the scale is folded into the rates and overheads.
    steps, learning_rate: Adam on the log parameters (full batch).
    init_flops_rate, init_bytes_rate, init_overhead_s, init_program_overhead_s: starting point (and the
      value the penalty pulls unseen classes toward, through the shared terms).
    kernel_weight: weight of the per-kernel loss (squared log error of each labelled group's summed
      device time) against the per-program loss, when ``kernel_labels`` are given.
    init_launch_gap_s: starting per-launch gap (with ``kernel_labels`` only).
    gap_per_class: with ``kernel_labels``, a launch gap per class and device (True) or one per device.
    host_floor: also fit a per-device host floor ``H_d``: wall = ``softmax_q(T, H_d)``, q = ``floor_sharpness``
      (see :class:`KernelRoofline`).
    init_host_floor_s, floor_sharpness: its starting value and the (fixed) sharpness.
    host_launch: with ``host_floor``, also fit a host cost per launch ``h_{c,d}`` (parameterised and
      penalised like the rates): the host side becomes ``H_d + sum_k m_k h_{c,d}`` -- the host issues every
      launch (a ``while`` loop's too) while the device runs, so a program of many short kernels costs its
      launches, not their device time plus a per-launch overhead (see :class:`KernelRoofline`).
    init_host_launch_s: its starting value.
    host_launch_per_class: one host cost per class and device (True) or one per device (False).
    bytes_ridge: the penalty weight of the byte rates' class and interaction terms (None: ``ridge``). A
      large value ties every class's memory-bound rate to the device's one bandwidth, so a class seen
      only in small, latency-bound training kernels does not carry a low rate into large kernels.
    wall_scale: with ``kernel_labels``, also fit ``s_d`` per device: the wall time counts each kernel's
      labelled device time ``s_d`` times (see :class:`KernelRoofline`; without labels the rates would
      absorb it: :func:`fit_kernel_roofline` raises then).
    gap_library_only: with ``kernel_labels`` (raises without), the launch gap ``g`` is added to library calls only
      (``KernelTable.library``: cuBLAS / cuDNN custom calls, whose host-side set-up leaves the device idle);
      XLA's own kernels are queued back to back (on the profiled H200 programs, wall - busy time grows by
      ~0.1-0.3 us per launch, but ~4-5 us per library call).
    l2_bytes: None (off), or the last-level cache capacity in bytes (``L2_BYTES``): also fit a per-device
      L2 speed-up ``r_d`` (log parameter, starting at 1, no penalty): each kernel's bytes count as
      :func:`l2_effective_bytes` ``(b, l2_bytes, log r_d)``.
    overhead_overlap: a kernel's device time is ``softmax_p(softmax_p(f/F, b/B), o)``: the per-launch
      latency ``o`` (launch, block scheduling, tail: ~1.1 us for the smallest kernels on the H200 data)
      is a floor that the kernel's work hides, as in a roofline with a latency ceiling, instead of a
      cost added to every launch (on the H200 data a 4.7 MB reduction inside ``rnn``'s loop takes 1.8 us:
      less than 1.1 us plus its bytes at the HBM bandwidth).
    gap_on_host: (session 20; needs ``kernel_labels`` and ``host_floor``) the launch gap is the host's time to
      issue the launch (cuBLAS / cuDNN set-up on the host, with ``gap_library_only``), which overlaps the
      device's work: it goes to the host side of the floor's overlap, ``wall = softmax_q(T, H_d + sum_k m_k
      g_{c,d})``, not into ``T``. The host issues launches ahead of the device, so a library call's set-up
      leaves the device idle only when the host falls behind: on the profiled H200 programs of less than
      60 us of device time, wall - busy is 55 us without a library call, 80-85 us with one cuDNN call and
      94-117 us with three (not 1 + 3 x 50 us), and in ``rnn``'s loops a cuBLAS call adds ~2 us of wall
      time per trip when the trip's kernels take ~35 us, ~7 us when they take ~12 us.
    conv_gemm_rates: (session 20) the autotuned convolution classes (``conv``, ``conv_f32``) take the FLOP and
      byte rates of the GEMM class of their width (``gemm``, ``gemm_f32``) and keep their own per-launch
      overhead and launch gap: cuDNN runs a tuned convolution as an implicit GEMM on the tensor cores (on
      the H200 data every profiled tuned convolution, forward and backward, runs
      ``sm90_xmma_{fprop,dgrad,wgrad}_implicit_gemm_*`` or CUTLASS ``tensorop`` kernels, the family of
      cuBLAS's ``sm90_xmma_gemm_*``; Chetlur et al. 2014, Sec. 3: an ``N P Q`` x ``K`` x ``C R S`` GEMM
      whose operand is gathered from the image on the fly), while cuDNN's set-up on the host and its
      workspace kernels are its own. Without it, a held-out convolution family gets rates fitted on the
      few small tuned convolutions of the other families (~100 TFLOP/s; the large bf16 convolutions of
      ``conv`` run at ~480).
  """
  sharpness: float = 16.0
  ridge: float = 0.001
  objective: str = "log"
  calibrate: bool = True
  steps: int = 1500
  learning_rate: float = 0.05
  init_flops_rate: float = 2e14
  init_bytes_rate: float = 2e12
  init_overhead_s: float = 3e-6
  init_program_overhead_s: float = 3e-5
  kernel_weight: float = 1.0
  init_launch_gap_s: float = 2e-6
  gap_per_class: bool = True
  host_floor: bool = False
  init_host_floor_s: float = 5e-5
  floor_sharpness: float = 8.0
  host_launch: bool = False
  init_host_launch_s: float = 1e-6
  host_launch_per_class: bool = True
  bytes_ridge: float | None = None
  wall_scale: bool = False
  gap_library_only: bool = False
  l2_bytes: float | None = None
  overhead_overlap: bool = False
  gap_on_host: bool = False
  conv_gemm_rates: bool = False


_RATE_SOURCE = np.arange(len(KERNEL_CLASSES))
_RATE_SOURCE[CLASS_ID["conv"]], _RATE_SOURCE[CLASS_ID["conv_f32"]] = CLASS_ID["gemm"], CLASS_ID["gemm_f32"]


HUBER_DELTA = 0.1
"""Scale (log units: ~10%) below which the ``huber_log`` objective is quadratic, above which linear."""


def _log_loss(e, objective: str, xp=np):
  """Per-error loss of log errors ``e``: ``e^2`` ('log', and 'mape' for the kernel labels), or the
  pseudo-Huber loss ``2 delta^2 (sqrt(1 + (e / delta)^2) - 1)`` ('huber_log'; Charbonnier et al., ICIP 1994;
  quadratic like ``e^2`` for ``|e| << delta`` = :data:`HUBER_DELTA`, ``~2 delta |e|`` beyond: a median-like
  fit that a few 2-50x outlier programs do not pull)."""
  if objective != "huber_log":
    return e ** 2
  return 2.0 * HUBER_DELTA ** 2 * (xp.sqrt(1.0 + (e / HUBER_DELTA) ** 2) - 1.0)


def _label_arrays(tables, kernel_labels, n_prog):
  """Flatten per-program :class:`KernelLabels` into (global kernel rows, global groups, times)."""
  if kernel_labels is None:
    return None
  if len(kernel_labels) != n_prog:
    raise ValueError(f"need one kernel_labels entry (KernelLabels or None) per program: {n_prog} programs, "
                     f"{len(kernel_labels)} entries.")
  off = np.cumsum([0] + [t.flops.size for t in tables])
  rows, groups, times = [], [], []
  g0 = 0
  for i, lab in enumerate(kernel_labels):
    if lab is None:
      continue
    if not isinstance(lab, KernelLabels):
      raise TypeError(f"kernel_labels[{i}] is a {type(lab).__name__}, not KernelLabels (match_kernel_times).")
    r, g, t = np.asarray(lab.rows), np.asarray(lab.group), np.asarray(lab.time_s, np.float64)
    if not (np.issubdtype(r.dtype, np.integer) and np.issubdtype(g.dtype, np.integer)):
      raise TypeError(f"kernel_labels[{i}]: rows and group must be integer indices, got dtypes {r.dtype}, "
                      f"{g.dtype} (match_kernel_times builds them).")
    if r.ndim != 1 or r.shape != g.shape or t.ndim != 1 or \
        (r.size and (r.min() < 0 or r.max() >= tables[i].flops.size)) or \
        (g.size and (g.min() < 0 or g.max() >= t.size)) or not np.all(np.isfinite(t) & (t > 0)):
      raise ValueError(f"kernel_labels[{i}]: rows must index its table, groups its times, times be > 0.")
    # each group's predicted time sum_k m_k (...) must be able to be > 0: a group without a row, or whose
    # rows never launch (count 0), would put log(0) into the loss (ignored or NaN)
    launches = np.bincount(g, weights=tables[i].count[r], minlength=t.size)
    if np.any(launches <= 0):
      raise ValueError(f"kernel_labels[{i}]: groups {np.flatnonzero(launches <= 0).tolist()} have no row that "
                       "launches (no row, or only rows with count 0): drop them from the labels.")
    rows.append(r + off[i])
    groups.append(g + g0)
    times.append(t)
    g0 += t.size
  if g0 == 0:
    raise ValueError("kernel_labels hold no labelled kernel; pass kernel_labels=None to fit on runtimes only.")
  return np.concatenate(rows).astype(np.int32), np.concatenate(groups).astype(np.int32), np.concatenate(times)


def fit_kernel_roofline(tables: Sequence[KernelTable], runtime_s: Sequence[float], devices: Sequence[str],
                        config: KernelRooflineConfig = KernelRooflineConfig(),
                        kernel_labels: Sequence[KernelLabels | None] | None = None,
                        host_covariate: Sequence[float] | None = None,
                        host_covariate_overhead: bool = True,
                        host_group: Sequence[int] | None = None,
                        host_covariate_tied: bool = False,
                        host_covariate_exponents: tuple[float, float] | None = None,
                        host_covariate_launch: bool = False,
                        host_covariate_bound: float | None = None,
                        library_covariate: Sequence[float] | None = None) -> KernelRoofline:
  """Fit the per-kernel roofline's log parameters to measured program runtimes (and kernel times).

  Each log parameter is ``shared + device[d] + class[c] + interaction[d, c]`` (per-program overhead:
  ``shared + device[d]``); class and interaction terms carry the ridge penalty, so classes and devices
  with few kernels stay near the shared roofline. Full-batch Adam (optax) on the squared log error or
  the MAPE of the predicted program runtimes.

  With ``kernel_labels`` (profiler times, :func:`match_kernel_times`), each kernel's
  ``m_k (softmax + o_c)`` is its predicted device time, fitted to the labelled groups' measured times
  (squared log error, weight ``config.kernel_weight``), and a per-class, per-device launch gap
  ``g_{c,d}`` (parameterised and penalised like the others) joins the program's time:
  ``T = O_d + sum_k m_k (softmax + o_c + g_{c,d})``: the class rates and kernel overheads then come from
  kernel physics, the gaps and the dispatch term from the wall times.

  The non-device side of the wall time (``KernelRooflineConfig``): ``host_floor`` (``softmax_q(T, H_d)``,
  back-to-back calls), ``host_launch`` (the host side grows by ``h_{c,d}`` per launch), and with labels
  ``gap_library_only`` (the gap on cuBLAS/cuDNN calls only) and ``wall_scale`` (``s_d``: wall time per
  second of profiled kernel time); ``bytes_ridge`` penalises the byte rates' class terms apart.

  Args:
    tables: one :class:`KernelTable` per training program.
    runtime_s: measured runtime of each program (seconds, > 0).
    devices: the device of each program (any hashable names; one parameter set per distinct name).
    config: :class:`KernelRooflineConfig`.
    kernel_labels: None, or per program a :class:`KernelLabels` or None (no profile).
    host_covariate: None, or per program a number ``z`` (session 25: the log of its collection's measured dispatch
      floor, ``meta["dispatch_floor_s"]``): then two more parameters, shared by the devices and not penalised, scale
      the host side of the overlap (``H_d``, per-launch host costs, a host-side launch gap) by ``exp(gamma_h z)`` and
      the program overhead ``O_d`` by ``exp(gamma_o z)`` (:attr:`KernelRoofline.host_scale`): a collection whose
      host dispatches faster gets a lower floor on the same device. ``z`` = 0 everywhere gives the model without it.
    host_covariate_overhead: with ``host_covariate``, fit ``gamma_o`` (True) or keep it 0 (the covariate scales the
      host side only).
    host_covariate_tied: (session 26 diagnosis; default off) with ``host_covariate``, one fitted exponent for both
      terms, ``gamma_o = gamma_h``: the program overhead is host dispatch time like the floor, so a collection whose
      host is ``x`` times as fast scales both the same way (free exponents let the overhead's alone take whatever a
      few training files put on it: 5.5 with ``h100_collect_a``, 0.8 without). Needs ``host_covariate_overhead``.
    host_covariate_exponents: (session 26 diagnosis; default None) with ``host_covariate``, fixed ``(gamma_h, gamma_o)``
      instead of fitted ones (e.g. ``(1, 1)``: the host side and the program overhead proportional to the measured
      floor ``exp(z)``); not with ``host_covariate_tied`` or ``host_covariate_overhead=False``.
    host_covariate_launch: (session 27 helper; default off) with ``host_covariate``, the covariate scales the
      per-launch device-side wall costs instead of the program overhead: one fitted exponent ``gamma_k`` (not
      penalised; :attr:`KernelRoofline.host_scale_launch`), ``gamma_o`` held at 0, ``gamma_h`` fitted as before:
      ``T = O_d + sum_k m_k (s_d softmax_p(f_k/F, b_k/B, o_c e^{gamma_k z}) + g_{c,d} e^{gamma_k z})``, host side
      ``x exp(gamma_h z)``. Mechanism: a slower host (higher dispatch floor) leaves idle gaps *between* kernels,
      also inside long device-bound programs (s27a: wall / profiled busy time 1.108 above 1 ms of busy time, against
      1.027-1.033 on the earlier H100 hosts), an idle that grows with the number of launches; a per-program overhead
      cannot carry it, so ``gamma_o`` had to reach 5.5-7 and multiplied small programs' overhead ~5x on s27a
      (measured by leave-one-file-out in ``value_program_mape_s27host_note.md``: better on 5 of 7 folds, much worse on
      the two highest-floor files; not recommended). The labelled
      kernel-time fit (busy time) keeps ``o_c`` unscaled. A host-side launch gap (``gap_on_host``) is scaled by
      ``gamma_h`` with the rest of the host side. Not with ``host_covariate_tied``, ``host_covariate_exponents`` or
      ``host_covariate_overhead=False``.
    host_covariate_bound: (session 27 helper; default None) with ``host_covariate``, every fitted exponent is kept
      inside ``(-B, B)`` by the smooth map ``gamma = B tanh(u / B)`` of an unconstrained ``u`` (slope 1 at 0, so a
      small exponent fits as without the bound): a shrinkage of the exponents that stops one or two training files
      with an extreme floor from setting a response far steeper than the per-call idle's (free ``gamma_o`` reached
      5.5-7: on s27a's +26% floor the overhead x5, where the idle grew ~3x for a ~1.8x floor, a slope of ~2;
      ``value_program_mape_s27host_note.md``: B = 2 better on 5 of 7 folds, worse on the two highest-floor files).
      ``B`` > 0, finite; not with ``host_covariate_exponents`` (nothing fitted).
    library_covariate: (session 28 helper; default None) per program a number ``z_L`` (the log of its collection's
      dispatch floor over 40 us): one more parameter per device, ``gamma_{L,d}`` (not penalised; start 0;
      :attr:`KernelRoofline.library_scale`), scales the host-side costs of library calls (``KernelTable.library``:
      their per-launch host cost ``h_{c,d}`` with ``config.host_launch``, a host-side launch gap with
      ``gap_on_host``) by ``exp(gamma_{L,d} z_L)``; XLA's own kernels, the floor ``H_d`` and the device side are
      unchanged. Mechanism: on the profiled H100 files the idle (wall - busy) of programs with cuBLAS / cuDNN
      calls is ~9-12 us per library call on the low-floor hosts (s24a-s26b, in-timing floor 28-32 us) and ~31-49
      us on the high-floor ones (s22a, s27a-c, 35-50 us), while the H100 terms are fitted on both; per device,
      because the H200 files' per-call idle (~31-34 us) does not follow their floor. Needs ``config.host_floor``
      (the host side) and tables with library flags; with neither host-side library cost the exponents stay 0.
      Independent of ``host_covariate``.
    host_group: None, or per program an integer group (session 25: its data file): in the fit each group gets a
      factor on the host side of the overlap and one on the program overhead, centred in log space over the groups of
      each device (a device's terms are then its groups' equal-weight average, not the average of its programs:
      one large collection with a slower host does not set the device's floor); prediction uses the device's terms
      (a new collection is a typical one). Not stored in the model. With ``host_covariate`` too, ``z`` must vary
      inside some group: a covariate constant per group (a file's dispatch floor per file) is absorbed by the group
      factors, and that raises ValueError.
  Returns:
    A :class:`KernelRoofline`.
  """
  import jax
  import jax.numpy as jnp
  import optax

  dev = _check_tables(tables, devices)
  y = np.asarray(runtime_s, np.float64)
  if y.shape != (len(tables),) or not np.all(np.isfinite(y) & (y > 0)):
    raise ValueError(f"runtime_s must be {len(tables)} positive finite runtimes, got shape {y.shape}.")
  if config.objective not in ("log", "mape", "huber_log"):
    raise ValueError(f"objective must be 'log', 'mape' or 'huber_log', got {config.objective!r}.")
  for nm in ("calibrate", "gap_per_class", "host_floor", "host_launch", "host_launch_per_class", "wall_scale",
             "gap_library_only", "overhead_overlap", "gap_on_host", "conv_gemm_rates"):
    if not isinstance(getattr(config, nm), (bool, np.bool_)):
      raise TypeError(f"KernelRooflineConfig.{nm} must be a bool (True/False), got {getattr(config, nm)!r}.")
  for nm in ("ridge", "init_host_launch_s", "bytes_ridge"):
    v = getattr(config, nm)
    if v is None and nm == "bytes_ridge":
      continue
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
      raise TypeError(f"KernelRooflineConfig.{nm} must be a number{' or None' if nm == 'bytes_ridge' else ''}, "
                      f"got {v!r}.")
    if not np.isfinite(v):
      raise ValueError(f"KernelRooflineConfig.{nm} must be finite, got {v!r}.")
  if not (config.sharpness >= 1.0) or config.ridge < 0 or config.steps < 1 or not config.learning_rate > 0 \
      or not (config.kernel_weight >= 0) or not (config.init_launch_gap_s > 0) \
      or not (config.init_host_floor_s > 0) or not (config.floor_sharpness >= 1.0) \
      or not (config.init_host_launch_s > 0) or not (config.bytes_ridge is None or config.bytes_ridge >= 0):
    raise ValueError(f"need sharpness >= 1, ridge >= 0, steps >= 1, learning_rate > 0, kernel_weight >= 0, "
                     f"init_launch_gap_s > 0, init_host_floor_s > 0, floor_sharpness >= 1, init_host_launch_s > 0, "
                     f"bytes_ridge None or >= 0; got {config}.")
  if config.l2_bytes is not None and (isinstance(config.l2_bytes, (bool, np.bool_)) or not isinstance(
      config.l2_bytes, (int, float, np.integer, np.floating)) or not (np.isfinite(config.l2_bytes) and config.l2_bytes > 0)):
    raise ValueError(f"KernelRooflineConfig.l2_bytes must be None or a positive finite number of bytes, got "
                     f"{config.l2_bytes!r}.")
  if config.host_launch and not config.host_floor:
    raise ValueError("host_launch adds per-launch costs to the host floor's side of the overlap: set "
                     "host_floor=True too.")
  if config.gap_on_host and (kernel_labels is None or not config.host_floor):
    raise ValueError("gap_on_host puts the launch gap (fitted with kernel_labels) on the host floor's side of the "
                     "overlap: pass kernel_labels and set host_floor=True.")
  if kernel_labels is None and (config.wall_scale or config.gap_library_only):
    raise ValueError("wall_scale and gap_library_only act on the launch gap and the labelled kernel times: pass "
                     "kernel_labels (match_kernel_times), or set them False to fit on runtimes only.")
  hz = _host_covariate(host_covariate, len(tables))
  if not isinstance(host_covariate_tied, (bool, np.bool_)):
    raise TypeError(f"host_covariate_tied must be a bool, got {host_covariate_tied!r}.")
  hs_fixed = None
  if host_covariate_exponents is not None:
    hs_fixed = np.asarray(host_covariate_exponents, np.float64)
    if hs_fixed.shape != (2,) or not np.all(np.isfinite(hs_fixed)):
      raise ValueError(f"host_covariate_exponents must be two finite numbers (gamma_h, gamma_o), got "
                       f"{host_covariate_exponents!r}.")
  if (host_covariate_tied or hs_fixed is not None) and hz is None:
    raise ValueError("host_covariate_tied / host_covariate_exponents configure host_covariate: pass it.")
  if (host_covariate_tied or hs_fixed is not None) and not host_covariate_overhead:
    raise ValueError("host_covariate_tied / host_covariate_exponents set gamma_o: drop host_covariate_overhead=False.")
  if host_covariate_tied and hs_fixed is not None:
    raise ValueError("host_covariate_tied fits one exponent, host_covariate_exponents fixes both: pass one of them.")
  if not isinstance(host_covariate_launch, (bool, np.bool_)):
    raise TypeError(f"host_covariate_launch must be a bool, got {host_covariate_launch!r}.")
  if host_covariate_launch and hz is None:
    raise ValueError("host_covariate_launch configures host_covariate (the per-launch costs x exp(gamma_k z)): pass it.")
  if host_covariate_launch and (host_covariate_tied or hs_fixed is not None or not host_covariate_overhead):
    raise ValueError("host_covariate_launch replaces the program overhead's exponent by a per-launch one: not with "
                     "host_covariate_tied, host_covariate_exponents or host_covariate_overhead=False.")
  if host_covariate_bound is not None:
    if isinstance(host_covariate_bound, (bool, np.bool_)) or not isinstance(
        host_covariate_bound, (int, float, np.integer, np.floating)) or not (
        np.isfinite(host_covariate_bound) and host_covariate_bound > 0):
      raise ValueError(f"host_covariate_bound must be None or a positive finite number, got {host_covariate_bound!r}.")
    if hz is None:
      raise ValueError("host_covariate_bound bounds host_covariate's fitted exponents: pass host_covariate.")
    if hs_fixed is not None:
      raise ValueError("host_covariate_bound bounds fitted exponents; host_covariate_exponents fixes them: use one.")
  zlib = _host_covariate(library_covariate, len(tables), name="library_covariate")
  if zlib is not None:
    if not config.host_floor:
      raise ValueError("library_covariate scales the library calls' host-side costs: set host_floor=True (and "
                       "host_launch or gap_on_host).")
  names = tuple(sorted(set(dev.tolist()), key=str))
  di = np.asarray([names.index(d) for d in dev], np.int32)
  D, C = len(names), len(KERNEL_CLASSES)
  f, b, k, m, rows = _flatten(tables)
  labs = _label_arrays(tables, kernel_labels, len(tables))
  # scale to O(1) numbers for float32: time in units of 1 us
  unit = 1e-6
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  fj, bj, mj, kj, rj = f32(f * unit), f32(b * unit), f32(m), jnp.asarray(k), jnp.asarray(rows)
  # per kernel 1 for a library call (every table needs its flags: _library_flags raises), for the launch gap of
  # library calls only and for the library covariate
  libj = f32(_library_flags(tables)) if config.gap_library_only or zlib is not None else None
  kdj = jnp.asarray(di[rows]) if rows.size else jnp.zeros(0, jnp.int32)
  dij, ly = jnp.asarray(di), f32(np.log(y / unit))
  lu = np.log(unit)  # a time in us is f*unit / R_u with R_u = R * unit^2: log R_u = log R + 2 log unit
  base = jnp.asarray([np.log(config.init_flops_rate) + 2 * lu, np.log(config.init_bytes_rate) + 2 * lu,
                      np.log(config.init_overhead_s / unit), np.log(config.init_program_overhead_s / unit)],
                     jnp.float32)
  params = {"dev": jnp.zeros((4, D)), "cls": jnp.zeros((3, C)), "inter": jnp.zeros((3, D, C))}
  if labs is not None:
    params["gap"] = jnp.full((D,), np.log(config.init_launch_gap_s / unit), jnp.float32)
    if config.gap_per_class:
      params["gap_cls"], params["gap_inter"] = jnp.zeros((C,)), jnp.zeros((D, C))
    lrj, lgj, lty = jnp.asarray(labs[0]), jnp.asarray(labs[1]), f32(np.log(labs[2] / unit))
    n_groups = int(labs[2].size)
  if config.host_floor:
    params["floor"] = jnp.full((D,), np.log(config.init_host_floor_s / unit), jnp.float32)
  wall_scale = config.wall_scale
  if wall_scale:
    params["wscale"] = jnp.zeros((D,), jnp.float32)
  if config.l2_bytes is not None:
    params["l2"] = jnp.zeros((D,), jnp.float32)
    l2u = float(config.l2_bytes) * unit
  if config.host_launch:
    params["hl"] = jnp.full((D,), np.log(config.init_host_launch_s / unit), jnp.float32)
    if config.host_launch_per_class:
      params["hl_cls"], params["hl_inter"] = jnp.zeros((C,)), jnp.zeros((D, C))
  if host_group is not None:
    hg = np.asarray(host_group)
    if hg.shape != (len(tables),) or not np.issubdtype(hg.dtype, np.integer):
      raise ValueError(f"host_group must be {len(tables)} integers (one per program), got {hg.shape} {hg.dtype}.")
    # one group per (group, device) pair: a group on two devices counts as two
    pairs, hg_idx = np.unique(np.stack([hg.astype(np.int64), di.astype(np.int64)]), axis=1, return_inverse=True)
    G, g_dev = pairs.shape[1], pairs[1].astype(np.int32)
    if hz is not None and all(np.ptp(hz[hg_idx.reshape(-1) == g]) == 0 for g in range(G)):
      raise ValueError("host_covariate is constant within every host_group: the group factors absorb it, so its "
                       "exponents (host_scale) are not identified and a new group's prediction would depend on an "
                       "arbitrary value; pass host_covariate or host_group, not both.")
    cnt = np.bincount(g_dev, minlength=D).astype(np.float32)
    params["fe"] = jnp.zeros((G, 2), jnp.float32)
    hgj, gdj, cntj = jnp.asarray(hg_idx.reshape(-1).astype(np.int32)), jnp.asarray(g_dev), jnp.asarray(cnt)

    def group_effect(p):   # [n, 2] log factors, centred over each device's groups
      mean_d = jax.ops.segment_sum(p["fe"], gdj, num_segments=D) / jnp.maximum(cntj, 1.0)[:, None]
      return (p["fe"] - mean_d[gdj])[hgj]
  if hz is not None:
    if hs_fixed is None:
      params["hs"] = jnp.zeros((2,), jnp.float32)
    hzj = f32(hz)
    if host_covariate_launch:
      params["hk"] = jnp.zeros((), jnp.float32)
      hzk = hzj[rj] if rows.size else jnp.zeros(0, jnp.float32)   # each kernel's program's z
  if zlib is not None:   # session 28 helper: gamma_{L,d} on the library calls' host-side costs
    params["hlib"] = jnp.zeros((D,), jnp.float32)
    zlk = f32(zlib[rows]) if rows.size else jnp.zeros(0, jnp.float32)

  def lib_factor(p):   # per kernel: e^{gamma_{L,d} z_L} for library calls, 1 for XLA's own kernels
    return 1.0 + libj * (jnp.exp(p["hlib"][kdj] * zlk) - 1.0)

  def bounded(u):   # a fitted exponent: u itself, or B tanh(u / B) with host_covariate_bound
    if host_covariate_bound is None:
      return u
    return float(host_covariate_bound) * jnp.tanh(u / float(host_covariate_bound))

  def host_exponents(p):   # (gamma_h, gamma_o): fitted, tied, or fixed
    if hs_fixed is not None:
      return f32(hs_fixed)
    if host_covariate_tied:
      return jnp.stack([bounded(p["hs"][0]), bounded(p["hs"][0])])
    if host_covariate_launch:   # gamma_o held at 0: the per-launch exponent gamma_k replaces it
      return jnp.stack([bounded(p["hs"][0]), jnp.zeros((), jnp.float32)])
    return bounded(p["hs"])
  P, n = config.sharpness, len(tables)
  n_pen = float(len(BASE_KERNEL_CLASSES) + np.sum(np.isin(np.arange(len(BASE_KERNEL_CLASSES), C), k)))

  row_w = jnp.asarray([config.ridge, config.ridge if config.bytes_ridge is None else config.bytes_ridge,
                       config.ridge], jnp.float32)

  def host_launch(p):  # [D, C] log host seconds (us) per launch
    if not config.host_launch_per_class:
      return jnp.broadcast_to(p["hl"][:, None], (D, C))
    return p["hl"][:, None] + p["hl_cls"][None, :] + p["hl_inter"]

  def logs(p):
    per = base[:3, None, None] + p["dev"][:3, :, None] + p["cls"][:, None, :] + p["inter"]  # [3, D, C]
    if config.conv_gemm_rates:   # tuned convolutions: the GEMM classes' rates, their own overhead
      per = jnp.concatenate([per[:2][:, :, _RATE_SOURCE], per[2:]], 0)
    prog = base[3] + p["dev"][3]
    return per, prog

  def loss(p):
    per, prog = logs(p)
    a = fj / jnp.exp(per[0][kdj, kj])
    bb = bj if config.l2_bytes is None else l2_effective_bytes(bj, l2u, p["l2"][kdj], jnp)
    c = bb / jnp.exp(per[1][kdj, kj])
    t = mj * _kernel_time(a, c, jnp.exp(per[2][kdj, kj]), P, config.overhead_overlap, jnp)
    kerr = 0.0
    if labs is not None:
      grp = jax.ops.segment_sum(t[lrj], lgj, num_segments=n_groups)
      kerr = config.kernel_weight * jnp.mean(_log_loss(jnp.log(grp) - lty, config.objective, jnp))
    if host_covariate_launch:   # the wall's per-launch costs (the busy time above keeps o unscaled)
      launch_f = jnp.exp(bounded(p["hk"]) * hzk)
      t = mj * _kernel_time(a, c, jnp.exp(per[2][kdj, kj]) * launch_f, P, config.overhead_overlap, jnp)
    if labs is not None:
      if wall_scale:
        t = t * jnp.exp(p["wscale"])[kdj]
      gap = p["gap"][:, None] + (p["gap_cls"][None, :] + p["gap_inter"] if config.gap_per_class else 0.0)
      g_t = mj * jnp.exp(gap[kdj, kj]) * (libj if config.gap_library_only else 1.0)
      if not config.gap_on_host:
        t = t + (g_t * launch_f if host_covariate_launch else g_t)
    o_prog = jnp.exp(prog)[dij]
    if hz is not None and host_covariate_overhead:   # (else gamma_o gets no gradient: it stays 0)
      o_prog = o_prog * jnp.exp(host_exponents(p)[1] * hzj)
    if host_group is not None:
      ge = group_effect(p)
      o_prog = o_prog * jnp.exp(ge[:, 1])
    pred = o_prog + jax.ops.segment_sum(t, rj, num_segments=n)
    if config.host_floor:
      host = jnp.exp(p["floor"])[dij]
      if config.gap_on_host:
        host = host + jax.ops.segment_sum(g_t if zlib is None else g_t * lib_factor(p), rj, num_segments=n)
      if config.host_launch:
        hl_t = mj * jnp.exp(host_launch(p)[kdj, kj])
        host = host + jax.ops.segment_sum(hl_t if zlib is None else hl_t * lib_factor(p), rj, num_segments=n)
      if hz is not None:
        host = host * jnp.exp(host_exponents(p)[0] * hzj)
      if host_group is not None:
        host = host * jnp.exp(ge[:, 0])
      pred = _soft_max(pred, host, config.floor_sharpness, jnp)
    lp = jnp.log(pred)
    err = jnp.mean(jnp.abs(jnp.exp(lp - ly) - 1.0)) if config.objective == "mape" else \
        jnp.mean(_log_loss(lp - ly, config.objective, jnp))
    # class and interaction terms of (flops rate, bytes rate, overhead): ridge each, or bytes_ridge for the
    # byte rates (one HBM bandwidth shared by the memory-bound kernels of every class, up to the penalty)
    # means over the base classes plus the option classes present (n_pen): an option class absent from
    # the training tables keeps its terms at 0 and leaves the penalty -- and the fit -- as without it
    per_row = jnp.sum(p["cls"] ** 2, axis=1) / n_pen + jnp.sum(p["inter"] ** 2, axis=(1, 2)) / (D * n_pen)
    pen_rates = jnp.sum(per_row * row_w)
    pen = 0.0
    if labs is not None and config.gap_per_class:
      pen = pen + jnp.sum(p["gap_cls"] ** 2) / n_pen + jnp.sum(p["gap_inter"] ** 2) / (D * n_pen)
    if config.host_launch and config.host_launch_per_class:
      pen = pen + jnp.sum(p["hl_cls"] ** 2) / n_pen + jnp.sum(p["hl_inter"] ** 2) / (D * n_pen)
    return err + kerr + pen_rates + config.ridge * pen

  opt = optax.adam(config.learning_rate)

  @jax.jit
  def run(p):
    def step(carry, _):
      p, s = carry
      l, g = jax.value_and_grad(loss)(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), l
    (p, _), ls = jax.lax.scan(step, (p, opt.init(p)), None, length=config.steps)
    return p, ls

  params, _ = run(params)
  per, prog = logs(params)
  per, prog = np.asarray(per, np.float64), np.asarray(prog, np.float64)
  if not np.all(np.isfinite(per)) or not np.all(np.isfinite(prog)):
    raise FloatingPointError("fit_kernel_roofline diverged (non-finite parameters); lower learning_rate.")
  gap = None
  if labs is not None:
    g = params["gap"][:, None] + (params["gap_cls"][None, :] + params["gap_inter"] if config.gap_per_class
                                  else jnp.zeros((D, C)))
    gap = np.asarray(g, np.float64) + lu
    if not np.all(np.isfinite(gap)):
      raise FloatingPointError("fit_kernel_roofline diverged (non-finite launch gap); lower learning_rate.")
  hl = None
  if config.host_launch:
    hl = np.asarray(host_launch(params), np.float64) + lu
    if not np.all(np.isfinite(hl)):
      raise FloatingPointError("fit_kernel_roofline diverged (non-finite host launch cost); lower learning_rate.")
  seen = np.zeros((D, C))
  np.add.at(seen, (di[rows], k), (m > 0).astype(np.float64))   # kernels that launch (count > 0)
  rate_seen = seen.copy()   # classes whose FLOP and byte rates the fit identified
  if config.conv_gemm_rates:   # a GEMM class's rates are fitted by the tuned convolutions that share them too
    rate_seen[:, _RATE_SOURCE[CLASS_ID["conv"]]] += seen[:, CLASS_ID["conv"]]
    rate_seen[:, _RATE_SOURCE[CLASS_ID["conv_f32"]]] += seen[:, CLASS_ID["conv_f32"]]
  for d in range(D):  # classes without training kernels on a device: the median of its fitted classes
    fitted = seen[d] > 0
    if fitted.any() and not fitted.all():
      med = np.median(per[:, d, fitted], axis=1, keepdims=True)
      per[2:, d, ~fitted] = med[2:]
      per[:2, d, ~(rate_seen[d] > 0)] = med[:2]
      if gap is not None:
        gap[d, ~fitted] = np.median(gap[d, fitted])
      if hl is not None:
        hl[d, ~fitted] = np.median(hl[d, fitted])
  if config.conv_gemm_rates:   # tied after the fallback too: an unseen tuned-convolution class has the GEMM rates
    per[:2] = per[:2][:, :, _RATE_SOURCE]
  floor = None
  if config.host_floor:
    floor = np.asarray(params["floor"], np.float64) + lu
    if not np.all(np.isfinite(floor)):
      raise FloatingPointError("fit_kernel_roofline diverged (non-finite host floor); lower learning_rate.")
  ws = np.asarray(params["wscale"], np.float64) if wall_scale else None
  if ws is not None and not np.all(np.isfinite(ws)):
    raise FloatingPointError("fit_kernel_roofline diverged (non-finite wall scale); lower learning_rate.")
  l2 = np.asarray(params["l2"], np.float64) if config.l2_bytes is not None else None
  if l2 is not None and not np.all(np.isfinite(l2)):
    raise FloatingPointError("fit_kernel_roofline diverged (non-finite L2 speed-up); lower learning_rate.")
  hs = np.asarray(host_exponents(params), np.float64) if hz is not None else None
  if hs is not None and not np.all(np.isfinite(hs)):
    raise FloatingPointError("fit_kernel_roofline diverged (non-finite host scale); lower learning_rate.")
  hk = float(bounded(params["hk"])) if host_covariate_launch else None
  if hk is not None and not np.isfinite(hk):
    raise FloatingPointError("fit_kernel_roofline diverged (non-finite per-launch host scale); lower learning_rate.")
  model = KernelRoofline(names, per[0] - 2 * lu, per[1] - 2 * lu, per[2] + lu, prog + lu, float(P), seen, gap,
                         floor, float(config.floor_sharpness), hl, ws,
                         bool(config.gap_library_only), None if l2 is None else float(config.l2_bytes), l2,
                         bool(config.overhead_overlap), bool(config.gap_on_host), hs, hk)
  lib_kw = {}
  if zlib is not None:
    gl = np.asarray(params["hlib"], np.float64)
    if not np.all(np.isfinite(gl)):
      raise FloatingPointError("fit_kernel_roofline diverged (non-finite library scale); lower learning_rate.")
    model = model._replace(library_scale=gl)
    lib_kw = {"library_covariate": zlib}
  if config.calibrate:
    from mlsys_jax.cost.metrics import mape_scale
    model = scale_kernel_roofline(model, mape_scale(predict_kernel_roofline(model, tables, dev,
                                                                            host_covariate=hz, **lib_kw), y))
  return model


def scale_kernel_roofline(model: KernelRoofline, factor: float) -> KernelRoofline:
  """The model whose every predicted time is ``factor`` times ``model``'s (rates / factor, overheads
  * factor; the soft maximum is homogeneous of degree one)."""
  if not (np.isfinite(factor) and factor > 0):
    raise ValueError(f"factor must be positive and finite, got {factor}.")
  lf = float(np.log(factor))
  return model._replace(log_flops_rate=model.log_flops_rate - lf, log_bytes_rate=model.log_bytes_rate - lf,
                        log_overhead=model.log_overhead + lf,
                        log_program_overhead=model.log_program_overhead + lf,
                        log_launch_gap=None if model.log_launch_gap is None else model.log_launch_gap + lf,
                        log_host_floor=None if model.log_host_floor is None else model.log_host_floor + lf,
                        log_host_launch=None if model.log_host_launch is None else model.log_host_launch + lf)


def kernel_roofline_ood(model: KernelRoofline, tables: Sequence[KernelTable], devices: Sequence[str]
                        ) -> list[list[str]]:
  """Per program, the kernel classes it launches that ``model`` saw no training kernel of on that
  device (their time comes from the median of the fitted classes: an extrapolation, not a fit), plus
  ``'unknown_trip_count'`` when a ``while`` loop had no ``known_trip_count``. Empty list: in
  distribution. A device the model was not fitted on raises, as in :func:`predict_kernel_roofline`."""
  dev = _check_tables(tables, devices)
  if model.train_kernels is None:
    raise ValueError("model has no train_kernels (not made by fit_kernel_roofline).")
  known = {d: i for i, d in enumerate(model.devices)}
  bad = sorted({str(d) for d in dev if d not in known})
  if bad:
    raise ValueError(f"devices {bad} were not in the training data (model devices: {list(model.devices)}).")
  out = []
  for t, d in zip(tables, dev):
    cls = np.unique(t.klass[t.count > 0])   # a kernel that never launches costs nothing
    flags = [KERNEL_CLASSES[c] for c in cls if model.train_kernels[known[d], c] == 0]
    out.append(flags + (["unknown_trip_count"] if t.unknown_trips else []))
  return out


def device_time_oracle(wall, busy, span) -> dict:
  """How well the *measured* device time explains the wall time (in-sample, a grid over 1-3 constants):
  wall ~ span + c; wall ~ busy + c; wall ~ softmax_q(busy + c0, H) (back-to-back calls: the host's dispatch
  of the next call overlaps the device's run). A lower bound on the MAPE of any model that predicts
  device time and adds such a term, up to the grid: c in 0-150 us by 1 us; c0 by 5 us, H by 2 us over the
  same range, q in {2, 4, 8} (a constant reported at 150 us sits on the grid's edge: the bound is loose).

  Args:
    wall, busy, span: seconds per row (timed wall time; ``device_busy_s``, ``device_span_s`` of
      ``dataset.load_device_times``), positive and finite, one shape.
  Returns:
    dict with, per form, the MAPE and the constants (us), and the quartiles of wall - span (us).
  """
  wall, busy, span = (np.asarray(v, np.float64) for v in (wall, busy, span))
  if wall.ndim != 1 or wall.size == 0 or busy.shape != wall.shape or span.shape != wall.shape:
    raise ValueError(f"wall, busy, span must be 1-D of one non-zero length, got {wall.shape}, {busy.shape}, "
                     f"{span.shape}.")
  if not all(np.all(np.isfinite(v) & (v > 0)) for v in (wall, busy, span)):
    raise ValueError("wall, busy and span must be positive and finite (drop rows the profiler missed).")
  from mlsys_jax.cost.metrics import mape as _mape
  cs = np.linspace(0.0, 150e-6, 151)
  mape = lambda pr: _mape(pr, wall)
  out = {"rows": int(wall.size)}
  for nm, x in (("span", span), ("busy", busy)):
    e = [mape(x + c) for c in cs]
    out[f"wall_from_{nm}_plus_c"] = {"mape": min(e), "c_us": float(cs[int(np.argmin(e))] * 1e6)}
  best = None
  for q in (2.0, 4.0, 8.0):
    for c0 in cs[::5]:
      for h in cs[::2]:
        v = mape(_soft_max(busy + c0, np.full_like(busy, h), q))
        if best is None or v < best[0]:
          best = (v, q, c0, h)
  out["wall_from_softmax_busy_plus_c0_floor_h"] = {"mape": best[0], "q": best[1], "c0_us": float(best[2] * 1e6),
                                                   "h_us": float(best[3] * 1e6)}
  out["wall_minus_span_us_quartiles"] = [float(v) for v in np.percentile((wall - span) * 1e6, [25, 50, 75])]
  return out
