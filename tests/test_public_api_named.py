"""The team rule "every public function has a test", checked: each function and each class that a mlsys_jax
module exposes (its ``__all__``, else its names without a leading underscore) and defines in mlsys_jax is named in
at least one test file under tests/ or in a docstring example (``>>>`` line) of its own module. The check is by
name, so it is a floor, not a proof of coverage: it catches a public function or class added with no test at all.

Excluded by construction: names imported from elsewhere (jax, optax, ...), private modules (``mlsys_jax.x._y``),
and among classes NamedTuples (states and records) and exceptions."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import re

import mlsys_jax

_TESTS = pathlib.Path(__file__).resolve().parent


def _is_checked_class(obj) -> bool:
  """A class the rule covers: not a NamedTuple (a record/state) and not an exception."""
  if not inspect.isclass(obj):
    return False
  if issubclass(obj, tuple) and hasattr(obj, "_fields"):
    return False
  return not issubclass(obj, BaseException)


def _public_functions() -> dict[tuple[str, str], object]:
  return _public_names(inspect.isfunction)


def _public_classes() -> dict[tuple[str, str], object]:
  return _public_names(_is_checked_class)


def _public_names(kind) -> dict[tuple[str, str], object]:
  out = {}
  for info in pkgutil.walk_packages(mlsys_jax.__path__, "mlsys_jax."):
    if any(part.startswith("_") for part in info.name.split(".")[1:]):
      continue
    mod = importlib.import_module(info.name)
    names = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
    for name in names:
      obj = getattr(mod, name, None)
      home = getattr(obj, "__module__", "") or ""
      if not kind(obj) or not home.startswith("mlsys_jax."):
        continue
      if any(part.startswith("_") for part in home.split(".")[1:]):   # re-exported from a private module
        continue
      out.setdefault((obj.__module__, obj.__name__), obj)
  return out


def test_the_scan_finds_the_known_public_functions():
  found = {name for _, name in _public_functions()}
  # a scan that found nothing (or only one subpackage) would pass the next test vacuously
  assert {"sidco", "topk", "powersgd", "parse_hlo", "program_graph", "inject_bit_errors"} <= found, sorted(found)[:20]
  assert len(found) > 300, len(found)


def test_the_scan_finds_the_known_public_classes():
  found = {name for _, name in _public_classes()}
  # as above: an empty or partial scan would let the class check pass vacuously
  assert {"GraphSAGECostModel", "QuickNet", "BucketedFunction", "PackedDense", "EmbeddingStage"} <= found, \
      sorted(found)[:20]
  assert len(found) > 30, len(found)
  assert not {"GraphBatch", "HloParseError", "PaddingInvarianceError"} & found    # NamedTuple, exceptions


def _missing(public: dict) -> list[str]:
  text = "\n".join(p.read_text() for p in sorted(_TESTS.glob("*.py")) if p.name != pathlib.Path(__file__).name)
  # the test files' words, once: an identifier matches r"\bname\b" somewhere in the text exactly when it is one of
  # the text's maximal runs of word characters (one set look-up per name instead of a scan of every file's text)
  words = set(re.findall(r"\w+", text))
  missing = []
  for (module, name), fn in sorted(public.items()):
    pattern = re.compile(r"\b" + re.escape(name) + r"\b")
    if name in words if re.fullmatch(r"\w+", name) else pattern.search(text):
      continue
    doc = inspect.getdoc(fn) or ""
    mod_doc = inspect.getdoc(importlib.import_module(module)) or ""
    examples = "\n".join(l for l in (doc + "\n" + mod_doc).splitlines() if l.lstrip().startswith((">>>", "...")))
    if pattern.search(examples):
      continue
    missing.append(f"{module}.{name}")
  return missing


def test_every_public_function_is_named_in_a_test_or_its_doctest():
  missing = _missing(_public_functions())
  assert not missing, ("public functions named in no test file and in no docstring example; add a test of each "
                       f"(or make it private with a leading underscore): {missing}")


def test_every_public_class_is_named_in_a_test_or_its_doctest():
  missing = _missing(_public_classes())
  assert not missing, ("public classes (not NamedTuples or exceptions) named in no test file and in no docstring "
                       f"example; add a test of each (or make it private with a leading underscore): {missing}")
