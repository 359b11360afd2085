"""README rot checks: the README's commands and Python examples must keep matching the code.

Every fenced ```python block of README.md is checked in three steps:

1. it compiles, and its import statements run (a renamed module or public name fails here);
2. every ``alias.name`` on an imported module exists, and every call of an imported function or class
   binds to its signature (unknown keyword, too many positional arguments: the error names the README
   line);
3. the whole block runs on CPU when it is self-contained, i.e. every name it uses is defined or imported
   in the block itself (found with :mod:`symtable`). A block that uses hidden context (``params``,
   ``loss_fn``, ``x`` ...) is not run: the skip reason lists the names it needs.

Rule for the README: a block that is self-contained but must not run in CI (it needs a GPU, data, a
cluster or minutes) carries the marker comment ``# readme-test: no-run`` (steps 1-2 still apply).

The two shell blocks are checked against the code as well: the install/test commands against
``.ci/run`` and ``pyproject.toml``, the flags of ``experiments/*.py`` commands against the flags the
script defines (absl ``DEFINE_*``; ``dist.define_flags()`` adds jax.distributed's).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pathlib
import re
import symtable

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NO_RUN_MARKER = "# readme-test: no-run"


def _blocks(lang: str | None = None):
  """(language, first line number of the code, code) of every fenced block of README.md."""
  text = README.read_text()
  out = []
  for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
    if lang is None or m.group(1) == lang:
      out.append((m.group(1), text[:m.start()].count("\n") + 2, m.group(2)))
  return out


PY_BLOCKS = _blocks("python")


def _free_names(src: str) -> set[str]:
  """Names the block reads but never binds (imports, assignments, lambda/def parameters), minus builtins."""
  top = symtable.symtable(src, "<readme>", "exec")
  bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
  free: set[str] = set()

  def walk(table, is_top):
    for s in table.get_symbols():
      if not s.is_referenced():
        continue
      if is_top:
        unbound = not (s.is_assigned() or s.is_imported())
      else:
        unbound = s.is_global() and not s.is_assigned()
      if unbound and s.get_name() not in bound:
        free.add(s.get_name())
    for child in table.get_children():
      walk(child, False)

  walk(top, True)
  return free - set(dir(builtins))


def _import_namespace(tree: ast.Module, where: str) -> dict:
  """Run only the block's import statements; return the namespace they create."""
  ns: dict = {"__name__": "__readme__"}
  imports = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
  exec(compile(imports, where, "exec"), ns)  # noqa: S102 (README code, on purpose)
  return ns


def _resolve(node: ast.AST, ns: dict):
  """The object an ``alias`` / ``alias.a.b`` expression names, if it starts at an imported name."""
  if isinstance(node, ast.Name):
    return ns.get(node.id, None), node.id in ns
  if isinstance(node, ast.Attribute):
    base, known = _resolve(node.value, ns)
    if not known or not inspect.ismodule(base) and not inspect.isclass(base):
      return None, False
    if not hasattr(base, node.attr):
      raise AssertionError(f"{ast.unparse(node)}: {getattr(base, '__name__', base)!s} has no attribute "
                           f"{node.attr!r}")
    return getattr(base, node.attr), True
  return None, False


def _check_names_and_calls(tree: ast.Module, ns: dict, line0: int) -> list[str]:
  errors = []
  for node in ast.walk(tree):
    where = f"README.md:{line0 + getattr(node, 'lineno', 1) - 1}"
    if isinstance(node, ast.Attribute):
      try:
        _resolve(node, ns)
      except AssertionError as e:
        errors.append(f"{where}: {e}")
    if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
      if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
        continue
      try:
        fn, known = _resolve(node.func, ns)
      except AssertionError:
        continue  # reported above
      if not known or not callable(fn):
        continue
      try:
        sig = inspect.signature(fn)
      except (TypeError, ValueError):
        continue  # builtins / C functions without a signature
      try:
        sig.bind_partial(*range(len(node.args)), **{k.arg: None for k in node.keywords})
      except TypeError as e:
        errors.append(f"{where}: {ast.unparse(node.func)}(...) does not match {sig}: {e}")
  return errors


@pytest.mark.parametrize("line0,src", [(b[1], b[2]) for b in PY_BLOCKS],
                         ids=[f"README.md:{b[1]}" for b in PY_BLOCKS])
def test_python_block(line0, src):
  where = f"README.md python block at line {line0}"
  tree = ast.parse(src, where)
  ns = _import_namespace(tree, where)
  errors = _check_names_and_calls(tree, ns, line0)
  assert not errors, "README example out of date:\n" + "\n".join(errors)
  free = _free_names(src)
  if NO_RUN_MARKER in src:
    pytest.skip(f"marked {NO_RUN_MARKER!r}: imports and signatures checked only")
  if free:
    pytest.skip(f"uses names defined outside the block ({', '.join(sorted(free))}): imports and "
                "signatures checked only")
  exec(compile(src, where, "exec"), {"__name__": "__readme__"})  # noqa: S102


def test_every_python_block_found():
  # A broken fence would silently drop blocks from the test above (7 python blocks on 2026-12-04).
  assert PY_BLOCKS
  n_fences = README.read_text().count("\n```")
  assert n_fences == 2 * len(_blocks()), "unbalanced ``` fences in README.md"


def test_free_names_finds_hidden_context():
  # The rule that decides what runs must see through lambdas and comprehensions.
  assert _free_names("import jax\ny = jax.jit(lambda a: a + b)(x)\nz = [i for i in range(3)]") == {"b", "x"}
  assert _free_names("from m import f\nf(1)") == set()


def test_install_and_test_commands_match_ci():
  """The README's two commands are the ones CI runs (.ci/run) and pyproject defines."""
  install = next(code for lang, _, code in _blocks("bash") if "pytest" in code)
  commands = [ln.split("#")[0].strip() for ln in install.splitlines() if ln.split("#")[0].strip()]
  ci = (ROOT / ".ci" / "run").read_text()
  pip, demo, tests = commands
  assert pip.startswith("python3 -m pip install") and '-e ".[dev]"' in pip
  assert re.search(r'python3 -m pip install (--quiet )?-e "\.\[dev\]"', ci), "install line of .ci/run changed"
  assert tests in ci.splitlines(), f"README test command {tests!r} is not a line of .ci/run"
  script = demo.split()[1]
  assert demo.startswith("python3 ") and (ROOT / script).is_file(), demo
  pyproject = (ROOT / "pyproject.toml").read_text()
  m = re.search(r'requires-python\s*=\s*">=\s*([\d.]+)"', pyproject)
  assert m and f"Python >= {m.group(1)}" in install, "README's Python version differs from pyproject"


def _script_flags(script: pathlib.Path) -> set[str]:
  src = script.read_text()
  names = set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", src))
  if re.search(r"\bdefine_flags\(\)", src):
    from absl import flags
    fv = flags.FlagValues()
    importlib.import_module("mlsys_jax.comm.distributed").define_flags(fv)
    names |= set(fv)
  return names


def test_experiment_commands_use_defined_flags():
  checked = 0
  for _, line0, code in _blocks("bash"):
    for cmd in code.replace("\\\n", " ").splitlines():
      m = re.search(r"python3 (experiments/\w+\.py)(.*)", cmd)
      if not m or not re.search(r"--\w", m.group(2)):
        continue
      defined = _script_flags(ROOT / m.group(1))
      used = set(re.findall(r"--(\w+)", m.group(2)))
      assert used <= defined, f"README.md:{line0}: {m.group(1)} has no flag(s) {sorted(used - defined)}"
      checked += 1
  assert checked >= 3, checked
