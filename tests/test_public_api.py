"""The public API is what each package's ``__all__`` lists: every name resolves, and every public function
and class has a docstring of its own (not the signature Python generates for a NamedTuple/dataclass)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import mlsys_jax

_PACKAGES = sorted(m.name for m in pkgutil.walk_packages(mlsys_jax.__path__, "mlsys_jax.") if m.ispkg)
_MODULES = ["mlsys_jax.stats", "mlsys_jax.infer.sensai", "mlsys_jax.infer.microrec", "mlsys_jax.infer.video",
            "mlsys_jax.quant.fp_align", "mlsys_jax.comm.distributed", "mlsys_jax.cost.value"]   # imported as modules


def _undocumented(mod) -> list[str]:
  bad = []
  for name in mod.__all__:
    obj = getattr(mod, name)
    if inspect.isfunction(obj) or inspect.isclass(obj):
      doc = inspect.getdoc(obj) or ""
      if not doc.strip() or doc.startswith(f"{name}("):    # no docstring / the generated one
        bad.append(name)
  return bad


@pytest.mark.parametrize("name", _PACKAGES + _MODULES)
def test_every_package_lists_its_public_names_and_documents_them(name):
  mod = importlib.import_module(name)
  assert hasattr(mod, "__all__"), f"{name} has no __all__: list what is public"
  missing = [n for n in mod.__all__ if not hasattr(mod, n)]
  assert not missing, f"{name}.__all__ names what it does not define: {missing}"
  assert len(set(mod.__all__)) == len(mod.__all__), f"{name}.__all__ has duplicates"
  assert not _undocumented(mod), f"{name}: public names without a docstring: {_undocumented(mod)}"


def test_the_check_catches_an_undocumented_name():
  """A documented function passes."""
  import types
  from typing import NamedTuple

  class Bare(NamedTuple):
    x: int

  def f():
    pass

  mod = types.SimpleNamespace(__all__=["Bare", "f", "documented"], Bare=Bare, f=f,
                              documented=test_the_check_catches_an_undocumented_name)
  assert _undocumented(mod) == ["Bare", "f"]
