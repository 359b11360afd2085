"""Capture optimized HLO from JAX and parse its text into a module of computations.

The learned TPU performance model (Kaufman et al., "A Learned Performance Model for Tensor Processing
Units", MLSys 2021, Sec. 3) reads XLA HLO *after* fusion: every fused computation is one kernel, its
instructions are the nodes of a graph and operands are its edges. This module gets that HLO out of
``jax.jit`` (``lower(...).compile().as_text()``) together with XLA's own ``cost_analysis`` and parses the
text (CPU and GPU dialects: ``fusion`` with ``kind=kLoop/kInput/kOutput/kCustom``, ``custom-call`` with
``custom_call_target`` and JSON ``backend_config``, async pairs, ``while``/``conditional``/``call``).

Example:
  >>> cap = capture(lambda x: jnp.tanh(x @ x), jnp.ones((4, 4)))
  >>> mod = parse_hlo(cap.hlo_text)
  >>> mod.entry.root.opcode
  'fusion'
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax

# ------------------------------------------------------------------------------------------------
# Shapes.

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "s4": 0.5, "s8": 1, "s16": 2, "s32": 4, "s64": 8, "u2": 0.25, "u4": 0.5,
    "u8": 1, "u16": 2, "u32": 4, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
    "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "f8e4m3b11fnuz": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5, "token": 0, "opaque": 0,
}


class HloParseError(ValueError):
  """Malformed HLO text; ``lineno`` is the 1-based line of the problem (0 if not tied to a line)."""

  def __init__(self, message: str, lineno: int = 0, line: str = ""):
    self.lineno = lineno
    self.line = line
    where = f"line {lineno}: " if lineno else ""
    snippet = f"\n  {line.strip()[:200]}" if line else ""
    super().__init__(f"HLO parse error at {where}{message}{snippet}")


class Shape(NamedTuple):
  """An HLO shape: ``dtype`` ('f32', ..., or 'tuple'), ``dims``, minor-to-major ``layout`` (or None)
  and, for tuples, the element shapes."""
  dtype: str
  dims: tuple[int, ...] = ()
  layout: tuple[int, ...] | None = None
  elements: tuple["Shape", ...] = ()

  @property
  def is_tuple(self) -> bool:
    return self.dtype == "tuple"

  @property
  def num_elements(self) -> int:
    if self.is_tuple:
      return sum(e.num_elements for e in self.elements)
    n = 1
    for d in self.dims:
      n *= max(d, 0)
    return n

  @property
  def num_bytes(self) -> float:
    if self.is_tuple:
      return sum(e.num_bytes for e in self.elements)
    return self.num_elements * DTYPE_BYTES.get(self.dtype, 4)


_ARRAY_SHAPE = re.compile(r"^([a-z][a-z0-9]*)\[([^\]]*)\](\{[^}]*\})?$")


def parse_shape(text: str) -> Shape:
  """Parse an HLO shape such as ``f32[8,16]{1,0}``, ``bf16[<=4,2]``, ``(f32[], s32[2]{0})``."""
  s = text.strip()
  if s.startswith("("):
    if not s.endswith(")"):
      raise ValueError(f"unbalanced tuple shape {text!r}")
    inner = s[1:-1].strip()
    parts = split_top_level(inner) if inner else []
    return Shape("tuple", (), None, tuple(parse_shape(p) for p in parts))
  m = _ARRAY_SHAPE.match(s)
  if not m:
    if re.fullmatch(r"[a-z][a-z0-9]*", s):  # token / opaque without brackets
      return Shape(s)
    raise ValueError(f"not an HLO shape: {text!r}")
  dtype, dims_s, layout_s = m.groups()
  dims: list[int] = []
  for d in filter(None, (x.strip() for x in dims_s.split(","))):
    d = d.lstrip("<=")
    if d == "?":
      d = "-1"
    if not re.fullmatch(r"-?\d+", d):
      raise ValueError(f"bad dimension {d!r} in shape {text!r}")
    dims.append(int(d))
  layout = None
  if layout_s:
    body = layout_s[1:-1].split(":")[0]
    layout = tuple(int(x) for x in re.findall(r"\d+", body))
  return Shape(dtype, tuple(dims), layout)


# ------------------------------------------------------------------------------------------------
# Module / computation / instruction.

@dataclasses.dataclass
class Instruction:
  """One HLO instruction: ``name = shape opcode(operands), attrs``."""
  name: str
  opcode: str
  shape: Shape
  operands: list[str]
  attrs: dict[str, str]
  is_root: bool = False
  lineno: int = 0
  literal: str | None = None  # parameter number or constant literal

  def called(self) -> list[str]:
    """Names of the computations this instruction calls (fusion/call/while/conditional/custom-call),
    excluding scalar reducers (``to_apply``)."""
    out: list[str] = []
    for key in ("calls", "body", "condition", "branch_computations", "called_computations"):
      if key in self.attrs:
        out.extend(n.lstrip("%") for n in re.findall(r"%?[\w.\-]+", self.attrs[key].strip("{}")))
    for key in ("true_computation", "false_computation"):
      if key in self.attrs:
        out.append(self.attrs[key].lstrip("%"))
    return out


@dataclasses.dataclass
class Computation:
  name: str
  instructions: list[Instruction]
  is_entry: bool = False
  lineno: int = 0

  @property
  def root(self) -> Instruction:
    for ins in self.instructions:
      if ins.is_root:
        return ins
    return self.instructions[-1]

  def by_name(self) -> dict[str, Instruction]:
    return {i.name: i for i in self.instructions}


@dataclasses.dataclass
class HloModule:
  name: str
  computations: dict[str, Computation]
  entry_name: str

  @property
  def entry(self) -> Computation:
    return self.computations[self.entry_name]


# ------------------------------------------------------------------------------------------------
# Text helpers.

_OPEN = {"(": ")", "{": "}", "[": "]"}
_CLOSE = {")": "(", "}": "{", "]": "["}


def _scan(s: str, start: int = 0) -> Iterable[tuple[int, int]]:
  """Yield ``(i, depth)`` for each character ``s[i]`` from ``start`` on that lies outside double-quoted
  strings, ``depth`` being the number of brackets open after it. Raise ValueError at a closing bracket
  that does not match, or at the end if a bracket or a quote is still open."""
  stack, quote, esc = [], False, False
  for i in range(start, len(s)):
    ch = s[i]
    if quote:
      if esc:
        esc = False
      elif ch == "\\":
        esc = True
      elif ch == '"':
        quote = False
      continue
    if ch == '"':
      quote = True
      continue
    if ch in _OPEN:
      stack.append(ch)
    elif ch in _CLOSE:
      if not stack or stack[-1] != _CLOSE[ch]:
        raise ValueError(f"unbalanced {ch!r}")
      stack.pop()
    yield i, len(stack)
  if stack or quote:
    raise ValueError("unbalanced brackets or quotes")


def split_top_level(s: str, sep: str = ",") -> list[str]:
  """Split ``s`` at ``sep`` outside brackets and quoted strings; raise ValueError if unbalanced."""
  cuts = [i for i, depth in _scan(s) if depth == 0 and s[i] == sep]
  parts = [s[a + 1:b].strip() for a, b in zip([-1] + cuts, cuts + [len(s)])]
  return parts if cuts or parts[0] else []


def _matching(s: str, start: int) -> int:
  """Index of the bracket closing the one at ``s[start]`` (quotes respected); -1 if none."""
  try:
    return next(i for i, depth in _scan(s, start) if depth == 0)
  except (ValueError, StopIteration):
    return -1


_SECTION_NAMES = {"FileNames", "FunctionNames", "FileLocations", "StackFrames"}
_NAME = r"%?[A-Za-z_][\w.\-]*"
_COMP_HEADER = re.compile(rf"^(ENTRY\s+)?({_NAME})\s*(\(.*\))?\s*(->\s*.*)?\{{$")
_COMMENT = re.compile(r"/\*.*?\*/")
_INSTR = re.compile(rf"^(ROOT\s+)?({_NAME})\s*=\s*(.*)$")


def _parse_instruction(line: str, lineno: int) -> Instruction:
  m = _INSTR.match(line)
  if not m:
    raise HloParseError("expected an instruction 'name = shape opcode(operands), attrs'", lineno, line)
  is_root, name, rest = bool(m.group(1)), m.group(2).lstrip("%"), m.group(3).strip()
  # Shape: a parenthesized tuple or one token.
  if rest.startswith("("):
    end = _matching(rest, 0)
    if end < 0:
      raise HloParseError("unbalanced parentheses in tuple shape", lineno, line)
    shape_s, rest = rest[:end + 1], rest[end + 1:].strip()
  else:
    sp = rest.find(" ")
    if sp < 0:
      raise HloParseError("missing opcode after the shape", lineno, line)
    shape_s, rest = rest[:sp], rest[sp + 1:].strip()
  try:
    shape = parse_shape(shape_s)
  except ValueError as e:
    raise HloParseError(str(e), lineno, line) from None
  m2 = re.match(r"^([a-z][\w\-]*)\(", rest)
  if not m2:
    raise HloParseError("expected 'opcode(' after the shape", lineno, line)
  opcode = m2.group(1)
  open_at = m2.end() - 1
  close_at = _matching(rest, open_at)
  if close_at < 0:
    raise HloParseError(f"unbalanced operand list of {opcode}", lineno, line)
  ops_s, tail = rest[open_at + 1:close_at], rest[close_at + 1:].strip()
  attrs: dict[str, str] = {}
  if tail:
    if not tail.startswith(","):
      raise HloParseError(f"unexpected text after the operands: {tail[:40]!r}", lineno, line)
    try:
      items = split_top_level(tail[1:])
    except ValueError as e:
      raise HloParseError(f"attributes: {e}", lineno, line) from None
    for it in items:
      if not it:
        continue
      k, eq, v = it.partition("=")
      if not eq:
        raise HloParseError(f"attribute without '=': {it[:40]!r}", lineno, line)
      attrs[k.strip()] = v.strip()
  literal = None
  operands: list[str] = []
  if opcode in ("parameter", "constant"):
    literal = ops_s.strip()
  else:
    try:
      parts = split_top_level(ops_s) if ops_s.strip() else []
    except ValueError as e:
      raise HloParseError(f"operands: {e}", lineno, line) from None
    for p in parts:
      tok = p.split()[-1] if p.split() else ""
      if not re.fullmatch(_NAME, tok):
        raise HloParseError(f"bad operand {p!r} of {opcode}", lineno, line)
      operands.append(tok.lstrip("%"))
  return Instruction(name, opcode, shape, operands, attrs, is_root, lineno, literal)


def strip_metadata(hlo_text: str) -> str:
  """Drop ``metadata={...}`` attributes and the source-location sections (smaller stored text;
  :func:`parse_hlo` gives the same graph on the result)."""
  out, skipping = [], False
  for line in hlo_text.splitlines():
    s = line.strip()
    if s in _SECTION_NAMES:
      skipping = True
      continue
    if skipping:
      if not s or re.match(r"^\d+\s", s):
        continue
      skipping = False
    i = line.find(", metadata={")
    if i >= 0:
      j = _matching(line, i + len(", metadata="))
      if j > 0:
        line = line[:i] + line[j + 1:]
    out.append(line)
  return "\n".join(out)


def parse_hlo(text: str) -> HloModule:
  """Parse HLO text (``HloModule ...`` followed by computations) into an :class:`HloModule`.

  Raises:
    HloParseError: with the 1-based line number, for unbalanced brackets, bad shapes, an instruction
      that is not ``name = shape opcode(...)``, an operand or called computation that does not exist,
      a computation left open, or a module without ENTRY.

  Example:
    >>> mod = parse_hlo(jax.jit(jnp.sin).lower(1.0).compile().as_text())
    >>> mod.entry.instructions[0].opcode, mod.entry.root.shape.dims
    ('parameter', ())
  """
  if not isinstance(text, str):
    raise TypeError(f"parse_hlo expects HLO text (str), got {type(text).__name__}.")
  lines = text.splitlines()
  name, comps, entry = None, {}, None
  cur: Computation | None = None
  in_section = False
  for lineno, raw in enumerate(lines, start=1):
    line = raw.strip()
    if not line or line.startswith("//") or line.startswith("#"):
      continue
    if cur is None:
      if line.startswith("HloModule"):
        parts = line.split(None, 1)
        if len(parts) < 2:
          raise HloParseError("HloModule without a name", lineno, raw)
        name = parts[1].split(",")[0].strip()
        in_section = False
        continue
      if line in _SECTION_NAMES:
        in_section = True
        continue
      if in_section and re.match(r"^\d+\s", line):
        continue
      m = _COMP_HEADER.match(line)
      if m:
        in_section = False
        if name is None:
          raise HloParseError("computation before the 'HloModule' header", lineno, raw)
        cname = m.group(2).lstrip("%")
        if cname in comps:
          raise HloParseError(f"computation {cname!r} defined twice", lineno, raw)
        cur = Computation(cname, [], bool(m.group(1)), lineno)
        continue
      raise HloParseError("expected 'HloModule', a computation header '... {' or a section", lineno, raw)
    if line == "}":
      if not cur.instructions:
        raise HloParseError(f"computation {cur.name!r} has no instructions", lineno, raw)
      comps[cur.name] = cur
      if cur.is_entry:
        if entry is not None:
          raise HloParseError("two ENTRY computations", lineno, raw)
        entry = cur.name
      cur = None
      continue
    if "/*" in line:
      line = _COMMENT.sub("", line)
    cur.instructions.append(_parse_instruction(line, lineno))
  if cur is not None:
    raise HloParseError(f"computation {cur.name!r} is not closed with '}}' at end of text",
                        len(lines), lines[-1] if lines else "")
  if name is None:
    raise HloParseError("no 'HloModule' header found; pass the text of compiled.as_text()", 1,
                        lines[0] if lines else "")
  if entry is None:
    if not comps:
      raise HloParseError("module has no computations", len(lines))
    entry = list(comps)[-1]  # entry is printed last when not marked
  # Resolve names.
  for comp in comps.values():
    names = comp.by_name()
    if len(names) != len(comp.instructions):
      seen: set[str] = set()
      dup = next(i for i in comp.instructions if i.name in seen or seen.add(i.name))
      raise HloParseError(f"duplicate instruction name {dup.name!r} in {comp.name!r}", dup.lineno)
    for ins in comp.instructions:
      for op in ins.operands:
        if op not in names:
          raise HloParseError(f"operand {op!r} of {ins.name!r} is not defined in computation "
                              f"{comp.name!r}", ins.lineno)
      for c in ins.called() + ([ins.attrs["to_apply"].lstrip("%")] if "to_apply" in ins.attrs else []):
        if c not in comps:
          raise HloParseError(f"{ins.name!r} calls unknown computation {c!r}", ins.lineno)
  return HloModule(name, comps, entry)


# ------------------------------------------------------------------------------------------------
# Attributes -> numbers.

def int_list(value: str | None) -> list[int]:
  """``{0,1}`` -> ``[0, 1]``; None/empty -> ``[]``."""
  if not value:
    return []
  return [int(x) for x in re.findall(r"-?\d+", value)]


def parse_window(value: str | None) -> dict[str, list[int]]:
  """``{size=3x3 stride=2x2 pad=1_1x1_1 rhs_dilate=2x2}`` -> lists per key (pad as low+high)."""
  out: dict[str, list[int]] = {}
  if not value:
    return out
  for item in value.strip("{}").split():
    k, _, v = item.partition("=")
    if k == "pad":
      out[k] = [sum(int(a) for a in p.split("_")) for p in v.split("x")]
    else:
      out[k] = [int(a) for a in v.split("x") if re.fullmatch(r"-?\d+", a)]
  return out


_TILE_KEYS = ("block_m", "block_n", "block_k", "split_k", "num_stages", "num_warps", "num_ctas")


def backend_tiles(value: str | None) -> dict[str, float]:
  """Kernel-level tile parameters from a GPU ``backend_config`` (Triton GEMM ``block_m``...)."""
  out: dict[str, float] = {}
  if not value:
    return out
  for k in _TILE_KEYS:
    m = re.search(rf'"{k}"\s*:\s*"?(\d+)', value)
    if m:
      out[k] = float(m.group(1))
  m = re.search(r'"kind"\s*:\s*"([^"]+)"', value)
  if m:
    out["kind:" + m.group(1)] = 1.0
  return out


# ------------------------------------------------------------------------------------------------
# Capture.

class Capture(NamedTuple):
  """Optimized HLO of one compiled program and XLA's cost analysis (a dict of floats)."""
  hlo_text: str
  cost: dict[str, float]
  compiled: Any


def cost_dict(compiled) -> dict[str, float]:
  """XLA's cost analysis as a flat dict of floats (jax versions return a dict or a list of dicts)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pragma: no cover - backends without cost analysis
    return {}
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return {str(k): float(v) for k, v in (ca or {}).items()}


def capture(fn: Callable, *args, compiler_options: dict | None = None, **kwargs) -> Capture:
  """Compile ``jax.jit(fn)`` for ``args`` and return its optimized HLO text and cost analysis.

  Args:
    fn: any function ``jax.jit`` accepts (or an already jitted one).
    *args, **kwargs: example arguments (arrays or ``jax.ShapeDtypeStruct``).
    compiler_options: XLA options for this compile only, e.g. ``{"xla_gpu_autotune_level": 0}``.

  Example:
    >>> cap = capture(jnp.dot, jnp.ones((8, 4)), jnp.ones((4, 2)))
    >>> cap.cost["flops"]
    128.0
  """
  if not callable(fn):
    raise TypeError(f"capture expects a callable, got {type(fn).__name__}.")
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  lowered = jitted.lower(*args, **kwargs)
  compiled = lowered.compile(compiler_options=compiler_options) if compiler_options else lowered.compile()
  return Capture(compiled.as_text(), cost_dict(compiled), compiled)


def iter_called(module: HloModule, comp: Computation) -> Iterable[Computation]:
  """Computations reachable from ``comp`` through fusion/call/while/conditional (depth first)."""
  seen: set[str] = set()
  stack = [comp]
  while stack:
    c = stack.pop()
    for ins in c.instructions:
      for n in ins.called():
        if n not in seen and n in module.computations:
          seen.add(n)
          yield module.computations[n]
          stack.append(module.computations[n])


def reducer_opcode(module: HloModule, ins: Instruction) -> str | None:
  """Root opcode of the scalar computation in ``to_apply`` (e.g. 'add' for a sum reduction)."""
  name = ins.attrs.get("to_apply")
  if not name:
    return None
  comp = module.computations.get(name.lstrip("%"))
  return comp.root.opcode if comp else None


__all__: Sequence[str] = ("Capture", "Computation", "HloModule", "HloParseError", "Instruction",
                          "Shape", "capture", "cost_dict", "parse_hlo", "parse_shape",
                          "strip_metadata")
