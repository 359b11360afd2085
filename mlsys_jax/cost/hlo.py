"""Capture optimized HLO from JAX and parse its text into a module of computations.

The learned TPU performance model (Kaufman et al., "A Learned Performance Model for Tensor Processing
Units", MLSys 2021, Sec. 3) reads XLA HLO *after* fusion: every fused computation is one kernel, its
instructions are the nodes of a graph and operands are its edges. This module gets that HLO out of
``jax.jit`` (``lower(...).compile().as_text()``) together with XLA's own ``cost_analysis`` and parses the
text (CPU and GPU dialects: ``fusion`` with ``kind=kLoop/kInput/kOutput/kCustom``, ``custom-call`` with
``custom_call_target`` and JSON ``backend_config``, async pairs, ``while``/``conditional``/``call``).

Example:
  >>> cap = capture(lambda x: jnp.tanh(x @ x) + 1.0, jnp.ones((4, 4)))
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
  """An HLO shape: ``dtype`` ('f32', ..., or 'tuple'), ``dims``, minor-to-major ``layout`` (or None),
  for tuples the element shapes; TPU-style layouts also give their ``tiles`` (``T(8,128)(2,1)`` ->
  ``((8, 128), (2, 1))``) and ``memory_space`` (``S(1)`` -> 1; 0 = default memory)."""
  dtype: str
  dims: tuple[int, ...] = ()
  layout: tuple[int, ...] | None = None
  elements: tuple["Shape", ...] = ()
  tiles: tuple[tuple[int, ...], ...] = ()
  memory_space: int = 0

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
    _check_dtype(self.dtype, str(self))
    return self.num_elements * DTYPE_BYTES[self.dtype]


_ARRAY_SHAPE = re.compile(r"^([a-z][a-z0-9]*)\s*\[([^\]]*)\]\s*(\{[^{}]*\})?$")
_BUFFER_SHAPE = re.compile(r"b\s*\((.*)\)", re.S)
_TILE = re.compile(r"T((?:\([^()]*\))+)")
_MEMSPACE = re.compile(r"S\((\d+)\)")


def _parse_layout(layout_s: str, text: str, rank: int | None = None
                  ) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], int]:
  """``{1,0:T(8,128)(2,1)S(1)}`` -> (minor_to_major, tiles, memory_space); with ``rank`` given, the
  minor-to-major list must be a permutation of ``range(rank)`` (tiling/memory-space annotations after ':'
  are not part of it)."""
  body, _, extra = layout_s[1:-1].partition(":")
  if not re.fullmatch(r"[\d\s,]*", body):
    raise ValueError(f"bad layout {layout_s!r} in shape {text!r}")
  layout = tuple(int(x) for x in re.findall(r"\d+", body))
  if rank is not None and sorted(layout) != list(range(rank)):
    raise ValueError(f"bad layout {layout_s!r} in shape {text!r}: the minor-to-major list before ':' must be a "
                     f"permutation of 0..{rank - 1} (one entry per dimension of the rank-{rank} shape), got "
                     f"{list(layout)}.")
  tiles: tuple[tuple[int, ...], ...] = ()
  space = 0
  m = _TILE.search(extra)
  if m:
    tiles = tuple(tuple(int(x) if x.strip() not in ("*", "") else -1 for x in t.split(","))
                  for t in re.findall(r"\(([^()]*)\)", m.group(1)))
  m = _MEMSPACE.search(extra)
  if m:
    space = int(m.group(1))
  return layout, tiles, space


def _check_dtype(dtype: str, text: str) -> None:
  if dtype not in DTYPE_BYTES:
    raise ValueError(f"unknown HLO element type {dtype!r} in shape {text!r}; known types: "
                     f"{', '.join(DTYPE_BYTES)}. Add it to mlsys_jax.cost.hlo.DTYPE_BYTES with its size in "
                     "bytes if a newer XLA emits it.")


def parse_shape(text: str) -> Shape:
  """Parse an HLO shape such as ``f32[8,16]{1,0}``, ``bf16[<=4, 2]``, ``(f32[], s32[2]{0})`` or a
  TPU shape ``f32[8,128]{1,0:T(8,128)S(1)}`` (tiling and memory space kept in the :class:`Shape`);
  a buffer shape ``b(f32[8]{0})`` gives the shape of the array it holds."""
  s = text.strip()
  m = _BUFFER_SHAPE.fullmatch(s) if s[:1] == "b" else None
  if m:  # a buffer ``b(f32[8]{0})``: costed as the array it holds
    return parse_shape(m.group(1))
  if s.startswith("("):
    if not s.endswith(")"):
      raise ValueError(f"unbalanced tuple shape {text!r}")
    inner = s[1:-1].strip()
    parts = split_top_level(inner) if inner else []
    return Shape("tuple", (), None, tuple(parse_shape(p) for p in parts))
  m = _ARRAY_SHAPE.match(s)
  if not m:
    if re.fullmatch(r"[a-z][a-z0-9]*", s):  # token / opaque without brackets
      _check_dtype(s, text)
      return Shape(s)
    raise ValueError(f"not an HLO shape: {text!r}")
  dtype, dims_s, layout_s = m.groups()
  _check_dtype(dtype, text)
  dims: list[int] = []
  for d in filter(None, (x.strip() for x in dims_s.split(","))):
    d = d.lstrip("<=").strip()
    if d == "?":
      d = "-1"
    if not re.fullmatch(r"-?\d+", d):
      raise ValueError(f"bad dimension {d!r} in shape {text!r}")
    dims.append(int(d))
  if not layout_s:
    return Shape(dtype, tuple(dims))
  layout, tiles, space = _parse_layout(layout_s, text, len(dims))
  return Shape(dtype, tuple(dims), layout, (), tiles, space)


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
    if self.opcode in ("async-update", "async-done"):
      return out  # the computation runs once, under its async-start
    for key in ("calls", "body", "condition", "branch_computations", "called_computations"):
      if key in self.attrs:
        out.extend(n.lstrip("%") for n in re.findall(r"%?[\w.\-]+", self.attrs[key].strip("{}")))
    for key in ("true_computation", "false_computation"):
      if key in self.attrs:
        out.append(self.attrs[key].lstrip("%"))
    if self.opcode == "call" and "to_apply" in self.attrs and not out:  # XLA's form of a call
      out.append(self.attrs["to_apply"].lstrip("%"))
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
  """A parsed HLO module (:func:`parse_hlo`): its ``name``, its ``computations`` by name in the text's order
  (callees before callers, as XLA prints them) and the name of the ENTRY computation (``entry``)."""
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
_NAME_AT = re.compile(r"%?[\w.\-]+")
_OPCODE_AT = re.compile(r"[a-z][\w\-]*(?=\s*\()")
_DTYPE_AT = re.compile(r"[a-z][a-z0-9]*(?=\s*\[)")
_LAYOUT_AT = re.compile(r"\s*\{[^{}=%\"]*\}")
_KEY_AT = re.compile(r"[A-Za-z_][\w.\-]*")
_BUFFER_AT = re.compile(r"b(?=\s*\(\s*[a-z][a-z0-9]*\s*\[)")
_SHAPE_VALUE = re.compile(r"[a-z][a-z0-9]*\[[^\]]*\](\{[^{}]*\})?")
_SECTION_LINE = re.compile(r"\n\s*\d+[ \t][^\n]*")


_COMMENT_OR_STRING = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/|(?m:^[ \t]*#[^\n]*)|/\*', re.S)


def _strip_comments(text: str) -> str:
  """Blank out ``// ...`` and ``/* ... */`` comments (and lines starting with ``#``) outside quoted
  strings, keeping every newline so that offsets map to the same line numbers."""
  if "/" not in text and "#" not in text:
    return text

  def blank(m: re.Match) -> str:
    t = m.group(0)
    if t.startswith('"'):
      return t
    if t == "/*":
      lineno = text.count("\n", 0, m.start()) + 1
      raise HloParseError("block comment '/*' is never closed with '*/'", lineno,
                          text.splitlines()[lineno - 1])
    return re.sub(r"[^\n]", " ", t)

  return _COMMENT_OR_STRING.sub(blank, text)


class _Reader:
  """Cursor over comment-free HLO text (whitespace, newlines included, is insignificant, as in XLA's
  own parser), with 1-based line numbers for errors."""

  def __init__(self, text: str, raw: str, parent: "_Reader | None" = None):
    self.s, self.i, self.n = text, 0, len(text)
    self.lines = raw.splitlines()
    # Computations written inline as attribute values, in the order XLA adds them (shared with
    # the reader of an enclosing text).
    self.inline: list[Computation] = parent.inline if parent is not None else []
    self.n_inline = 0

  def lineno(self, at: int | None = None) -> int:
    return self.s.count("\n", 0, self.i if at is None else at) + 1

  def error(self, msg: str, at: int | None = None) -> HloParseError:
    ln = self.lineno(at)
    return HloParseError(msg, ln, self.lines[ln - 1] if 0 < ln <= len(self.lines) else "")

  def ws(self) -> None:
    while self.i < self.n and self.s[self.i].isspace():
      self.i += 1

  def peek(self) -> str:
    return self.s[self.i] if self.i < self.n else ""

  def keyword(self, word: str) -> bool:
    j = self.i + len(word)
    if self.s.startswith(word, self.i) and (j >= self.n or not (self.s[j].isalnum() or self.s[j] in "_.-%")):
      self.i = j
      return True
    return False

  def match(self, pattern: re.Pattern) -> str | None:
    m = pattern.match(self.s, self.i)
    if not m:
      return None
    self.i = m.end()
    return m.group(0)

  def balanced(self) -> str:
    """The bracketed (or quoted) group starting at the cursor, brackets and quotes nested."""
    start, stack, quote = self.i, [], False
    while self.i < self.n:
      ch = self.s[self.i]
      self.i += 1
      if quote:
        if ch == "\\":
          self.i += 1
        elif ch == '"':
          quote = False
          if not stack:
            return self.s[start:self.i]
        continue
      if ch == '"':
        quote = True
      elif ch in _OPEN:
        stack.append(ch)
      elif ch in _CLOSE:
        if not stack or stack[-1] != _CLOSE[ch]:
          raise self.error(f"unbalanced {ch!r} (group opened here)", start)
        stack.pop()
      if not stack and not quote:
        return self.s[start:self.i]
    raise self.error("unbalanced brackets or quotes: group opened here is never closed", start)

  def shape(self) -> str | None:
    """Text of the shape at the cursor, or None (cursor unchanged) if no shape starts here."""
    start = self.i
    if self.peek() == "(":
      return self.balanced()
    if self.peek() == "b" and self.match(_BUFFER_AT):  # b(array shape)
      self.balanced()
      return self.s[start:self.i]
    d = self.match(_DTYPE_AT)
    if d is None:
      m = re.match(r"(token|opaque)\b(?=\s+[a-z][\w\-]*\s*\()", self.s[self.i:self.i + 80])
      if m:
        self.i += m.end()
        return m.group(0)
      return None
    self.ws()
    self.balanced()  # [dims]
    self.match(_LAYOUT_AT)
    return self.s[start:self.i]

  def value(self) -> str:
    """An attribute value: characters up to a top-level ',', whitespace or unmatched '}'."""
    start = self.i
    while self.i < self.n:
      ch = self.s[self.i]
      if ch in _OPEN or ch == '"':
        self.balanced()
      elif ch.isspace():
        # A value may go on after spaces with a bracket (``mesh['x'=2] {'x'}`` replica groups);
        # nothing else starts with one where an attribute ends.
        j = self.i
        while j < self.n and self.s[j].isspace():
          j += 1
        if j < self.n and self.i > start and (
            self.s[j] in "{[" or (self.s[j] not in ",}" and _SHAPE_VALUE.fullmatch(self.s, start, self.i))):
          self.i = j  # ... or a literal goes on after its shape (``literal=s32[] 1``)
          continue
        break
      elif ch == "," or ch in _CLOSE:
        break
      else:
        self.i += 1
    return self.s[start:self.i]

  def attributes(self) -> dict[str, str]:
    """``, key=value, key=value`` (possibly over several lines) up to the first non-comma."""
    attrs: dict[str, str] = {}
    while True:
      save = self.i
      self.ws()
      if self.peek() != ",":
        self.i = save
        return attrs
      self.i += 1
      self.ws()
      at = self.i
      key = self.match(_KEY_AT)
      self.ws()
      if key is None or self.peek() != "=":
        raise self.error(f"attribute without '=': {self.s[at:at + 40].split(chr(10))[0]!r}", at)
      self.i += 1
      self.ws()
      if key in _COMP_ATTRS and _INLINE_BODY.match(self.s, self.i):
        attrs[key] = _parse_inline(self)
        continue
      if key in _COMP_LIST_ATTRS and _INLINE_LIST.match(self.s, self.i):  # {{...}, {...}}
        self.i += 1
        names = []
        while True:
          self.ws()
          if self.peek() == "{":
            names.append(_parse_inline(self))
            self.ws()
          if self.peek() == ",":
            self.i += 1
            continue
          if self.peek() != "}":
            raise self.error(f"expected ',' or '}}' in the computations of {key!r}", self.i)
          self.i += 1
          break
        attrs[key] = "{" + ", ".join(names) + "}"
        continue
      v = self.value()
      if not v:
        raise self.error(f"attribute {key!r} has no value", at)
      attrs[key] = v


_OPERAND_NAME = re.compile(r"%?[\w.\-]+")
_NESTED_AT = re.compile(r"(?:\(.*\)|[a-z][a-z0-9]*\s*\[[^\]]*\](?:\s*\{[^{}]*\})?|token|opaque)?\s*"
                        r"[a-z][\w\-]*\s*\(.*\)", re.S)


def _parse_instruction_at(r: _Reader, anon: dict[str, int]) -> list[Instruction]:
  """One ``[ROOT] name = [shape] opcode(operands), attrs``; returns the instructions it defines: those
  nested as operands (XLA's older form ``add(f32[] parameter(0), ...)``, named ``<opcode>.anon``),
  then the instruction itself."""
  start = r.i
  lineno = r.lineno()
  is_root = r.keyword("ROOT")
  r.ws()
  name = r.match(_NAME_AT)
  r.ws()
  if name is None or r.peek() != "=":
    raise r.error("expected an instruction 'name = shape opcode(operands), attrs'", start)
  r.i += 1
  r.ws()
  return _parse_rhs(r, name.lstrip("%"), is_root, lineno, start, anon, True)


def _parse_rhs(r: _Reader, name: str | None, is_root: bool, lineno: int, start: int,
               anon: dict[str, int], with_attrs: bool,
               hook: Callable[[str, str | None, list], None] | None = None) -> list[Instruction]:
  """``[shape] opcode(operands)[, attrs]``; ``hook(name, shape, out)`` (one-instruction texts) sees
  each operand's name -- a nested operand's opcode -- before it is read, as XLA's parser does."""
  at = r.i
  shape_s = r.shape()
  shape = None
  if shape_s is not None:
    try:
      shape = parse_shape(shape_s)
    except ValueError as e:
      raise r.error(str(e), at) from None
  r.ws()
  at = r.i
  opcode = r.match(_OPCODE_AT)
  if opcode is None:
    raise r.error("expected 'opcode(' after the shape", at)
  r.ws()
  ops_s = r.balanced()[1:-1]
  attrs = r.attributes() if with_attrs else {}
  literal = None
  operands: list[str] = []
  out: list[Instruction] = []
  if opcode in ("parameter", "constant"):
    literal = " ".join(ops_s.split())
    if opcode == "parameter" and not literal.isdigit():
      raise r.error(f"parameter number must be an integer >= 0, got {literal!r}", start)
  else:
    try:
      parts = split_top_level(ops_s) if ops_s.strip() else []
    except ValueError as e:
      raise r.error(f"operands: {e}", start) from None
    for k, p in enumerate(parts):
      tok = p.split()[-1] if p.split() else ""
      is_name = _OPERAND_NAME.fullmatch(tok) is not None
      if is_name and hook is None:
        operands.append(tok.lstrip("%"))
        continue
      nested_p = not is_name and _NESTED_AT.fullmatch(p) is not None
      if hook is not None and not nested_p:  # one-instruction text: 'shape [name]' operands
        sub = _Reader(p, p)
        s_ = sub.shape()
        if s_ is None:
          raise r.error(f"operand {p!r} of a single instruction needs its shape (XLA: 'Operand had "
                        "no shape in HLO text')", start)
        sub.ws()
        oname = (sub.match(_NAME_AT) or "").lstrip("%") or f"_{k}"
        hook(oname, s_, out)
        operands.append(oname)
      elif nested_p:  # an instruction nested as an operand (no name, no attributes)
        sub = _Reader(p, p)
        try:
          if hook is not None:  # XLA looks the opcode up as an operand name first
            s_ = sub.shape()
            sub.ws()
            op_tok = sub.match(_OPCODE_AT)
            if s_ is not None and op_tok:
              hook(op_tok, s_, out)
            sub.i = 0
          nested = _parse_rhs(sub, None, False, lineno, 0, anon, False, hook)
          sub.ws()
          if sub.i != sub.n:
            raise sub.error(f"unexpected {p[sub.i:sub.i + 20]!r} after the nested instruction")
        except HloParseError as e:
          raise r.error(f"nested operand {p[:60]!r} of {opcode}: {e}", start) from None
        out.extend(nested)
        operands.append(nested[-1].name)
      else:
        raise r.error(f"bad operand {p!r} of {opcode}", start)
  if name is None:
    k = anon.get(opcode, 0)
    anon[opcode] = k + 1
    name = f"{opcode}.anon" + (f".{k}" if k else "")
  out.append(Instruction(name, opcode, shape, operands, attrs, is_root, lineno, literal))
  return out


def _parse_body(r: _Reader, cname: str, is_entry: bool, at: int) -> Computation:
  """Instructions of a computation after its ``{``, up to and with the closing ``}``."""
  cur = Computation(cname, [], is_entry, r.lineno(at))
  anon: dict[str, int] = {}
  while True:
    r.ws()
    if r.i >= r.n:
      raise r.error(f"computation {cname!r} is not closed with '}}' at end of text",
                    len(r.s.rstrip()))
    if r.peek() == "}":
      r.i += 1
      break
    cur.instructions.extend(_parse_instruction_at(r, anon))
  if not cur.instructions:
    raise r.error(f"computation {cname!r} has no instructions", at)
  roots = [i for i in cur.instructions if i.is_root]
  if len(roots) > 1:
    raise HloParseError(f"computation {cname!r} has more than one ROOT instruction",
                        roots[1].lineno, r.lines[roots[1].lineno - 1])
  return cur


# Attributes whose value is a computation, which XLA also reads written inline: ``calls={ ... }``.
_COMP_ATTRS = {"calls", "to_apply", "condition", "body", "true_computation", "false_computation",
               "select", "scatter"}
_COMP_LIST_ATTRS = {"branch_computations", "called_computations"}
_INLINE_LIST = re.compile(r"\{\s*\{\s*(?:ROOT\s+)?%?[\w.\-]+\s*=")
_INLINE_BODY = re.compile(r"\{\s*(?:ROOT\s+)?%?[\w.\-]+\s*=")


def _parse_inline(r: _Reader) -> str:
  """A computation written as an attribute value (cursor at its ``{``): parsed, queued in
  ``r.inline`` (XLA adds it to the module before the computation that uses it), named ``_``."""
  at = r.i
  r.i += 1
  comp = _parse_body(r, "_", False, at)
  comp.name = "_" + (f".{r.n_inline}" if r.n_inline else "")  # named when complete, as XLA does
  r.n_inline += 1
  r.inline.append(comp)
  return comp.name


def _parse_single_instruction(r: _Reader) -> tuple[dict[str, Computation], str]:
  """A text that is one instruction (XLA's ``ParseAndReturnUnverifiedModule`` accepts it): the entry
  computation ``_`` gets a parameter per operand name (a plain operand's name, else ``_<k>``, and a
  nested operand's opcode, as XLA looks it up), created where XLA creates it, then the instructions
  nested as operands and the instruction itself (named ``_`` if it has no name); inline computations
  follow it."""
  start = r.i
  lineno = r.lineno()
  is_root = r.keyword("ROOT")
  r.ws()
  save = r.i
  name = r.match(_NAME_AT)
  r.ws()
  if name is None or r.peek() != "=":
    r.i, name = save, "_"
  else:
    r.i += 1
    r.ws()
  r.n_inline = 1  # the entry is "_"; inline computations are "_.1", "_.2", ...
  if r.shape() is None:
    raise r.error("expected an HLO module, a computation or one instruction "
                  "'[name =] shape opcode(shape operand, ...)'", start)
  r.i = save if name == "_" else r.i
  if name != "_":
    r.i = start
    r.keyword("ROOT")
    r.ws()
    r.match(_NAME_AT)
    r.ws()
    r.i += 1
    r.ws()
  params: dict[str, Instruction] = {}

  def hook(oname: str, shape_s: str | None, out: list) -> None:
    if oname in params:
      return
    try:
      shape = parse_shape(shape_s) if shape_s is not None else None
    except ValueError as e:
      raise r.error(str(e), start) from None
    params[oname] = Instruction(oname, "parameter", shape, [], {}, False, lineno, str(len(params)))
    out.append(params[oname])

  instrs = _parse_rhs(r, name.lstrip("%"), is_root, lineno, start, {}, True, hook)
  r.ws()
  if r.i != r.n:
    raise r.error("unexpected text after the instruction (one instruction alone, or a module with "
                  "computations)", r.i)
  comps = {"_": Computation("_", instrs, True, lineno)}
  for c in r.inline:
    comps[c.name] = c
  return comps, "_"


def _skip_section(r: _Reader) -> None:
  """Skip a source-location section (``FileNames`` then lines ``<number> <text>``)."""
  while r.i < r.n and r.s[r.i] != "\n":
    r.i += 1
  while r.match(_SECTION_LINE):
    pass


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


_SAME_SHAPE = {"abs", "add", "and", "atan2", "cbrt", "ceil", "clamp", "copy", "cosine", "divide",
               "erf", "exponential", "exponential-minus-one", "floor", "is-finite", "log", "log-plus-one",
               "logistic", "maximum", "minimum", "multiply", "negate", "not", "or", "popcnt", "power",
               "remainder", "round-nearest-afz", "round-nearest-even", "rsqrt", "shift-left",
               "shift-right-arithmetic", "shift-right-logical", "sign", "sine", "sqrt", "subtract",
               "tan", "tanh", "xor", "clz", "reduce-precision", "optimization-barrier"}


def _infer_shape(module_comps: dict, ins: Instruction, ops: list[Shape]) -> Shape | None:
  """Shape of an instruction written without one, for the opcodes whose shape XLA's parser infers
  (elementwise, compare, select, tuple, get-tuple-element, dot, transpose, reduce, concatenate,
  broadcast of a scalar with ``dimensions={}``, call/fusion/while). None if it cannot be inferred."""
  op = ins.opcode
  arr = [s for s in ops if not s.is_tuple]
  if op in _SAME_SHAPE and ops:
    return ops[0]
  if op == "select" and len(ops) == 3:
    return ops[1]
  if op == "compare" and arr:
    return Shape("pred", arr[0].dims, arr[0].layout)
  if op == "tuple":
    return Shape("tuple", (), None, tuple(ops))
  if op == "get-tuple-element" and ops and ops[0].is_tuple:
    idx = int_list(ins.attrs.get("index"))
    if idx and 0 <= idx[0] < len(ops[0].elements):
      return ops[0].elements[idx[0]]
  if op == "dot" and len(arr) == 2:
    lb, rb = int_list(ins.attrs.get("lhs_batch_dims")), int_list(ins.attrs.get("rhs_batch_dims"))
    lc, rc = int_list(ins.attrs.get("lhs_contracting_dims")), int_list(ins.attrs.get("rhs_contracting_dims"))
    lhs, rhs = arr
    dims = ([lhs.dims[d] for d in lb] + [x for d, x in enumerate(lhs.dims) if d not in lb + lc]
            + [x for d, x in enumerate(rhs.dims) if d not in rb + rc])
    return Shape(lhs.dtype, tuple(dims))
  if op == "transpose" and arr:
    perm = int_list(ins.attrs.get("dimensions"))
    if sorted(perm) == list(range(len(arr[0].dims))):
      return Shape(arr[0].dtype, tuple(arr[0].dims[p] for p in perm))
  if op == "reduce" and arr:
    red = set(int_list(ins.attrs.get("dimensions")))
    half = max(1, len(ops) // 2)
    outs = [Shape(s.dtype, tuple(x for d, x in enumerate(s.dims) if d not in red)) for s in ops[:half]]
    return outs[0] if half == 1 else Shape("tuple", (), None, tuple(outs))
  if op == "concatenate" and arr:
    ax = int_list(ins.attrs.get("dimensions"))
    if ax and all(len(s.dims) == len(arr[0].dims) for s in arr) and 0 <= ax[0] < len(arr[0].dims):
      dims = list(arr[0].dims)
      dims[ax[0]] = sum(s.dims[ax[0]] for s in arr)
      return Shape(arr[0].dtype, tuple(dims))
  if op == "broadcast" and arr and not int_list(ins.attrs.get("dimensions")):
    return arr[0]
  if op in ("call", "fusion", "while", "conditional", "async-start", "fusion-start", "call-start") or op.endswith("-start"):
    called = ins.called()
    if called and called[0] in module_comps:
      root = module_comps[called[0]].root
      if op == "while":
        return ops[0] if ops else root.shape
      return root.shape
  return None


_MAX_NESTING = 500
_PAREN = re.compile(r"[()]")


def parse_hlo(text: str) -> HloModule:
  """Parse HLO text into an :class:`HloModule`, accepting what XLA's own HLO parser accepts.

  Whitespace, newlines included, is insignificant (an instruction may span several lines, several may
  share one), ``//`` and ``/* */`` comments are ignored, the ``HloModule`` header is optional, shapes
  may hold spaces (``f32[2, 3]``) and TPU layouts (``{1,0:T(8,128)S(1)}``), and a shape may be left out
  where XLA infers it (elementwise, dot, reduce, tuple, get-tuple-element, ...). Opcodes are not
  checked against a list: a new one parses, and :func:`~mlsys_jax.cost.graph.program_graph` maps it to
  the ``<unknown>`` id.

  Raises:
    HloParseError: with the 1-based line number, for unbalanced brackets, bad shapes, an instruction
      that is not ``name = [shape] opcode(...)``, an operand or called computation that does not exist,
      a shape that cannot be inferred, a computation left open, or text with no computation.

  Example:
    >>> mod = parse_hlo(jax.jit(jnp.sin).lower(1.0).compile().as_text())
    >>> mod.entry.instructions[0].opcode, mod.entry.root.shape.dims
    ('parameter', ())
    >>> parse_hlo("ENTRY e {\\n p = f32[2, 3] parameter(0)\\n ROOT n = negate(\\n   p) /* c */\\n}").entry.root.shape
    Shape(dtype='f32', dims=(2, 3), layout=None, elements=(), tiles=(), memory_space=0)
  """
  if not isinstance(text, str):
    raise TypeError(f"parse_hlo expects HLO text (str), got {type(text).__name__}.")
  if text.count("(") > _MAX_NESTING:  # cheap guard before the recursive descent
    depth = 0
    for m in _PAREN.finditer(text):
      depth += 1 if m.group(0) == "(" else -1
      if depth > _MAX_NESTING:
        lineno = text.count("\n", 0, m.start()) + 1
        raise HloParseError(f"brackets nested more than {_MAX_NESTING} deep: instructions or computations "
                            "nested too deeply to parse (XLA also rejects nesting past its maximum "
                            "recursion depth)", lineno, text.splitlines()[lineno - 1][:200])
  try:
    return _parse_hlo(text)
  except RecursionError:
    raise HloParseError("instructions or computations nested too deeply to parse (XLA also rejects "
                        "nesting past its maximum recursion depth)") from None


def _parse_hlo(text: str) -> HloModule:
  if "\r" in text:  # DOS and old Mac line ends, as XLA's lexer reads them
    text = text.replace("\r\n", "\n").replace("\r", "\n")
  r = _Reader(_strip_comments(text), text)
  name: str | None = None
  comps: dict[str, Computation] = {}
  entry: str | None = None
  r.ws()
  if r.keyword("HloModule"):
    r.ws()
    at = r.i
    name = r.value()
    if not name:
      raise r.error("HloModule without a name", at)
    r.attributes()
  elif not r.s.startswith("ENTRY", r.i):
    save = r.i
    r.keyword("ROOT")
    r.ws()
    first = r.match(_NAME_AT)
    r.ws()
    single = r.s.startswith("ROOT", save) or (r.peek() != "" and r.peek() in "=[") or (
        first is None and r.peek() == "(")
    r.i = save
    if single:  # one instruction, not a module: XLA builds a module around it
      comps, entry = _parse_single_instruction(r)
      return _finish_module("_", comps, entry, r)
  while True:
    r.ws()
    if r.i >= r.n:
      break
    at = r.i
    for sec in _SECTION_NAMES:
      if r.keyword(sec):
        _skip_section(r)
        break
    else:
      is_entry = r.keyword("ENTRY")
      r.ws()
      cname = r.match(_NAME_AT)
      if cname is None:
        raise r.error("expected 'HloModule', a computation header '[ENTRY] name [(params) -> shape] {' "
                      "or a section", at)
      cname = cname.lstrip("%")
      r.ws()
      if r.peek() == "(":
        r.balanced()
        r.ws()
      if r.s.startswith("->", r.i):
        r.i += 2
        r.ws()
        if r.shape() is None:
          raise r.error("expected the result shape after '->'")
        r.ws()
      if r.peek() != "{":
        raise r.error(f"expected '{{' to open computation {cname!r}", at)
      r.i += 1
      if cname in comps:
        raise r.error(f"computation {cname!r} defined twice", at)
      cur = _parse_body(r, cname, is_entry, at)
      r.attributes()  # e.g. ", execution_thread=..." after the closing brace
      for c in r.inline:  # computations written inline as attribute values come first
        comps[c.name] = c
      r.inline = []
      comps[cname] = cur
      if is_entry:
        if entry is not None:
          raise r.error("two ENTRY computations", at)
        entry = cname
  if not comps:
    raise HloParseError("no computation found: expected HLO text such as compiled.as_text() "
                        "('HloModule name' then '[ENTRY] name {...}' blocks)", 1,
                        text.splitlines()[0] if text.splitlines() else "")
  if entry is None:
    entry = list(comps)[-1]  # entry is printed last when not marked
  if name is None:
    name = f"module_{entry}"
  return _finish_module(name, comps, entry, r)


def _finish_module(name: str, comps: dict[str, Computation], entry: str, r: _Reader) -> HloModule:
  comps = _desugar_async(comps)
  # Resolve names, infer left-out shapes (operands first, in dependency order).
  for comp in comps.values():
    names = comp.by_name()
    if len(names) != len(comp.instructions):
      seen: set[str] = set()
      dup = next(i for i in comp.instructions if i.name in seen or seen.add(i.name))
      raise HloParseError(f"duplicate instruction name {dup.name!r} in {comp.name!r}", dup.lineno,
                          r.lines[dup.lineno - 1])
    for ins in comp.instructions:
      for op in ins.operands:
        if op not in names:
          raise HloParseError(f"operand {op!r} of {ins.name!r} is not defined in computation "
                              f"{comp.name!r}", ins.lineno, r.lines[ins.lineno - 1])
      for op in re.findall(r"%?([\w.\-]+)", ins.attrs.get("control-predecessors", "")):
        if op not in names:
          raise HloParseError(f"control predecessor {op!r} of {ins.name!r} is not defined in "
                              f"computation {comp.name!r}", ins.lineno, r.lines[ins.lineno - 1])
      for c in ins.called() + ([ins.attrs["to_apply"].lstrip("%")] if "to_apply" in ins.attrs else []):
        if c not in comps:
          raise HloParseError(f"{ins.name!r} calls unknown computation {c!r}", ins.lineno,
                              r.lines[ins.lineno - 1])
  comps, entry = _uniquify_names(comps, entry)
  _infer_missing_shapes(comps, r)
  return HloModule(name, comps, entry)


# Opcodes XLA has as asynchronous pairs of their own; any other ``<op>-start/-update/-done`` is XLA's
# syntax sugar for ``async-start/-update/-done`` around a computation that wraps ``<op>``.
_NATIVE_ASYNC = {"all-reduce-start", "all-reduce-done", "all-gather-start", "all-gather-done",
                 "collective-permute-start", "collective-permute-done", "copy-start", "copy-done",
                 "send-done", "recv-done", "async-start", "async-update", "async-done"}
_ASYNC_KEEP = {"async_execution_thread", "backend_config", "frontend_attributes", "metadata",
               "control-predecessors", "sharding", "origin", "statistics"}


def _desugar_async(comps: dict[str, Computation]) -> dict[str, Computation]:
  """Rewrite ``x = shape custom-call-start(ops), attrs`` (and ``-update``/``-done``) as XLA's parser
  does: ``async-start`` calling a new computation ``async_wrapped`` (parameters ``async_param``, then
  the ``<op>`` with the attributes), which is placed before the computation that uses it."""
  from mlsys_jax.cost.graph import OPCODE_ID  # pylint: disable=import-outside-toplevel

  def base(op: str) -> tuple[str, str] | None:
    for suffix in ("-start", "-update", "-done"):
      if op.endswith(suffix) and op not in _NATIVE_ASYNC and op[:-len(suffix)] in OPCODE_ID:
        return op[:-len(suffix)], suffix[1:]
    return None

  if not any(base(i.opcode) for c in comps.values() for i in c.instructions):
    return comps
  out: dict[str, Computation] = {}
  k = 0
  for cname, comp in comps.items():
    for ins in comp.instructions:
      b = base(ins.opcode)
      if b is None:
        continue
      op, kind = b
      ins.opcode = f"async-{kind}"
      if kind != "start":
        continue
      wname = "async_wrapped" + (f".{k}" if k else "")
      k += 1
      shapes = (ins.shape.elements[0].elements if ins.shape is not None and ins.shape.is_tuple
                and ins.shape.elements and ins.shape.elements[0].is_tuple else ())
      by_name = comp.by_name()
      params = []
      for n, o in enumerate(ins.operands):
        shape = shapes[n] if n < len(shapes) else by_name[o].shape
        params.append(Instruction("async_param" + (f".{n}" if n else ""), "parameter", shape, [], {},
                                  False, ins.lineno, str(n)))
      res = (ins.shape.elements[1] if ins.shape is not None and ins.shape.is_tuple
             and len(ins.shape.elements) > 1 else None)
      wrapped = Instruction(op, op, res, [p.name for p in params],
                            {a: v for a, v in ins.attrs.items() if a not in _ASYNC_KEEP}, True,
                            ins.lineno)
      out[wname] = Computation(wname, params + [wrapped], False, ins.lineno)
      ins.attrs = {a: v for a, v in ins.attrs.items() if a in _ASYNC_KEEP}
      ins.attrs["calls"] = wname
    out[cname] = comp
  return out


class _NameUniquer:
  """XLA's ``NameUniquer`` (separator '.'): a name ``root.N`` registers id N under ``root``; a taken
  id is replaced by the next free one, so a second ``p`` becomes ``p.1`` -- as XLA renames, module-wide,
  instructions that share a name across computations when it builds the module it parsed."""

  def __init__(self):
    self.used: dict[str, set[int]] = {}
    self.next: dict[str, int] = {}

  def __call__(self, name: str) -> str:
    root = name
    if root.startswith("__") and not root.startswith("__xla_"):
      root = "a" + root[1:]
    suffix, has_suffix = 0, False
    k = root.rfind(".")
    if 0 < k < len(root) - 1 and root[k + 1:].isdigit():
      suffix, has_suffix, root = int(root[k + 1:]), True, root[:k]
    used = self.used.setdefault(root, set())
    if suffix in used:
      nxt = self.next.get(root, 0)
      while nxt in used:
        nxt += 1
      suffix = nxt
      self.next[root] = nxt + 1
    used.add(suffix)
    if suffix == 0:
      return f"{root}.0" if has_suffix else root
    return f"{root}.{suffix}"


_CALL_KEYS = ("calls", "body", "condition", "branch_computations", "called_computations",
              "true_computation", "false_computation", "to_apply")


def _uniquify_names(comps: dict[str, Computation], entry: str) -> tuple[dict[str, Computation], str]:
  """Rename computations and instructions as XLA does when it adds parsed computations to a module
  (text order; separate uniquers for computations and for instructions; names unique module-wide).
  Texts printed by XLA are already unique, so this is the identity on them."""
  cu, iu = _NameUniquer(), _NameUniquer()
  cmap = {c: cu(c) for c in comps}
  for comp in comps.values():
    rename = {}
    for ins in comp.instructions:
      new = iu(ins.name)
      if new != ins.name:
        rename[ins.name] = new
        ins.name = new
    if rename:
      for ins in comp.instructions:
        ins.operands = [rename.get(o, o) for o in ins.operands]
        cp = ins.attrs.get("control-predecessors")
        if cp:
          ins.attrs["control-predecessors"] = re.sub(
              r"(%?)([\w.\-]+)", lambda m: m.group(1) + rename.get(m.group(2), m.group(2)), cp)
  if all(k == v for k, v in cmap.items()):
    return comps, entry
  out: dict[str, Computation] = {}
  for old, comp in comps.items():
    comp.name = cmap[old]
    for ins in comp.instructions:
      for key in _CALL_KEYS:
        if key in ins.attrs:
          ins.attrs[key] = re.sub(r"%?[\w.\-]+", lambda m: (
              ("%" if m.group(0).startswith("%") else "") + cmap.get(m.group(0).lstrip("%"), m.group(0).lstrip("%"))),
              ins.attrs[key])
    out[comp.name] = comp
  return out, cmap[entry]


def _infer_missing_shapes(comps: dict[str, Computation], r: _Reader) -> None:
  pending = [(c, i) for c in comps.values() for i in c.instructions if i.shape is None]
  while pending:
    left = []
    for comp, ins in pending:
      names = comp.by_name()
      ops = [names[o].shape for o in ins.operands]
      if any(s is None for s in ops) or any(
          comps[c].root.shape is None for c in ins.called() if c in comps):
        left.append((comp, ins))
        continue
      shape = _infer_shape(comps, ins, ops)
      if shape is None:
        raise HloParseError(f"cannot infer the shape of {ins.name!r} (opcode {ins.opcode}); write it "
                            "before the opcode, as XLA requires", ins.lineno, r.lines[ins.lineno - 1])
      ins.shape = shape
    if len(left) == len(pending):
      comp, ins = left[0]
      raise HloParseError(f"cannot infer the shape of {ins.name!r}: its operands' shapes are cyclic "
                          "or missing", ins.lineno, r.lines[ins.lineno - 1])
    pending = left


# ------------------------------------------------------------------------------------------------
# XLA's own parser (the oracle), behind a version-checked adapter.

def xla_hlo_parser() -> Callable[[str], Any] | None:
  """XLA's own HLO text parser from this jaxlib, or None where it does not ship one.

  jaxlib exposes it as ``xla_client.hlo.hlo_module_from_text`` (jax 0.10/0.11) and, in older
  releases, as ``xla_client._xla.hlo_module_from_text``; it returns an XLA ``HloModule`` (with
  ``computations()`` / ``instructions()``) and raises on text it rejects.
  """
  try:
    from jax._src.lib import xla_client as xc  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return None
  for owner in (getattr(xc, "hlo", None), getattr(xc, "_xla", None)):
    fn = getattr(owner, "hlo_module_from_text", None) if owner is not None else None
    if callable(fn):
      return fn
  return None


def xla_structure(text: str) -> dict[str, list[str]] | None:
  """``{computation: [instruction names]}`` as XLA's own parser reads ``text``; None if this jaxlib
  has no parser (:func:`xla_hlo_parser`). Raises ValueError (with XLA's message) if XLA rejects it.

  Example:
    >>> s = xla_structure("ENTRY e {\\n p = f32[2] parameter(0)\\n ROOT n = negate(p)\\n}")
    >>> s is None or s == {"e": ["p", "n"]}
    True
  """
  fn = xla_hlo_parser()
  if fn is None:
    return None
  try:
    mod = fn(text)
  except Exception as e:  # XLA raises XlaRuntimeError / JaxRuntimeError (names vary by version)
    raise ValueError(f"XLA rejects the HLO text: {e}") from None
  return {c.name: [i.name for i in c.instructions()] for c in mod.computations()}


# ------------------------------------------------------------------------------------------------
# Attributes -> numbers.

def _check_attr(name: str, value: Any) -> None:
  if value is not None and not isinstance(value, str):
    raise TypeError(f"{name} must be an HLO attribute value (a str, e.g. ins.attrs.get(...)) or None, got "
                    f"{type(value).__name__} ({value!r}).")


def int_list(value: str | None) -> list[int]:
  """The integers of an HLO list attribute, in order: ``'{0,1}'`` -> ``[0, 1]``.

  XLA's HLO text writes dimension lists (``dimensions={1,0}``, ``lhs_contracting_dims={1}``) as braced,
  comma-separated integers; a JSON ``backend_config`` writes them as quoted strings (``["1","0"]``). Both
  read the same: every signed integer in ``value``, anything else ignored. Kaufman et al. (MLSys 2021,
  Sec. 3.1) feed such instruction constants to the cost model.

  Args:
    value: the attribute text, or None / ``''`` for an absent attribute.

  Returns:
    ``list[int]`` (``[]`` when absent).

  Raises:
    TypeError: ``value`` is neither a str nor None.

  Example:
    >>> int_list("{1,0}"), int_list('["-1","2"]'), int_list(None)
    ([1, 0], [-1, 2], [])
  """
  _check_attr("value", value)
  if not value:
    return []
  return [int(x) for x in re.findall(r"-?\d+", value)]


def parse_window(value: str | None) -> dict[str, list[int]]:
  """An HLO ``window`` attribute as integer lists per key, one entry per spatial dimension.

  ``{size=3x3 stride=2x2 pad=1_1x0_2 rhs_dilate=2x2}`` -> ``{'size': [3, 3], 'stride': [2, 2],
  'pad': [2, 2], 'rhs_dilate': [2, 2]}``: dimensions are separated by ``x``; a ``pad`` entry is
  ``low_high`` and is returned as the total padding ``low + high`` of that dimension (XLA's window
  grammar; the convolution/reduce-window features of Kaufman et al., MLSys 2021, Sec. 3.1).

  Args:
    value: the attribute text (with or without the braces), or None / ``''`` when absent.

  Returns:
    ``{key: list[int]}`` (``{}`` when absent).

  Raises:
    TypeError: ``value`` is neither a str nor None. ValueError: an entry is not ``key=AxB...`` with
    integer fields (the message names it).

  Example:
    >>> parse_window("{size=3x3 stride=2x1 pad=1_1x0_2}")
    {'size': [3, 3], 'stride': [2, 1], 'pad': [2, 2]}
  """
  _check_attr("value", value)
  out: dict[str, list[int]] = {}
  if not value:
    return out
  for item in value.strip().strip("{}").split():
    k, eq, v = item.partition("=")
    try:
      if not eq or not k:
        raise ValueError
      if k == "pad":
        out[k] = [sum(int(a) for a in p.split("_")) for p in v.split("x")]
      else:
        out[k] = [int(a) for a in v.split("x")]
    except ValueError:
      raise ValueError(f"window entry {item!r} of {value!r} is not 'key=AxB...' with integer fields "
                       "(pad fields as low_high); pass the window attribute of an HLO instruction.") from None
  return out


_TILE_KEYS = ("block_m", "block_n", "block_k", "split_k", "num_stages", "num_warps", "num_ctas")


def backend_tiles(value: str | None) -> dict[str, float]:
  """Kernel tile parameters from a GPU ``backend_config`` (JSON text).

  XLA's Triton GEMM fusions carry their tiling in ``backend_config``
  (``"triton_gemm_config":{"block_m":"64","block_n":"32",...}``); the tile shape decides a GEMM's
  speed as much as its shape does, so the cost model reads it as node features (Kaufman et al., MLSys
  2021, Sec. 3.1: kernel-level tile-size features). Keys read: ``block_m``, ``block_n``, ``block_k``,
  ``split_k``, ``num_stages``, ``num_warps``, ``num_ctas`` (quoted or bare integers) and the fusion
  ``"kind"`` (returned as ``'kind:<name>': 1.0``). Absent keys are absent from the result.

  Args:
    value: the ``backend_config`` text, or None / ``''``.

  Returns:
    ``{key: float}``.

  Raises:
    TypeError: ``value`` is neither a str nor None.

  Example:
    >>> backend_tiles('{"fusion_backend_config":{"kind":"__triton_gemm","triton_gemm_config":'
    ...               '{"block_m":"64","block_n":"32","split_k":1}}}')
    {'block_m': 64.0, 'block_n': 32.0, 'split_k': 1.0, 'kind:__triton_gemm': 1.0}
  """
  _check_attr("value", value)
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
                          "strip_metadata", "xla_hlo_parser", "xla_structure")
