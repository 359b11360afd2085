"""What a rerun must match to reproduce an experiment's JSON: the data, the code and the package versions.

Session 8 found that the ``mnist1d`` package generated different arrays on a new machine (other package
versions) and that numbers from runs made while the code changed did not reproduce. Every script in
``experiments/`` therefore writes ``"provenance": record(...)`` into its JSON:

  {"data_sha256": <SHA-256 of the data arrays, or None>, "git_rev": <HEAD, or None>,
   "git_dirty": <uncommitted changes in the code that computes the result, or None>,
   "versions": {package: version or None}, **extra}

and scripts that combine several JSONs call :func:`check_same_data` first. Scripts whose numbers are
timings, schedules or simulations of generated programs pass no arrays (``data_sha256`` None); the code
that generates their inputs is covered by ``git_rev``/``git_dirty`` and the package versions. Pure
functions; nothing here changes a computed result.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib
import subprocess
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
"""The repository root (the folder above ``experiments/``)."""

PACKAGES = ("jax", "jaxlib", "optax", "flax", "numpy", "scipy", "mnist1d")
"""Packages whose versions :func:`record` stores by default (those that compute the results and the data)."""

_FIELDS = ("data_sha256", "git_rev", "git_dirty", "git_rev_at_start", "versions")


def data_digest(*arrays: Any) -> str:
  """SHA-256 (hex) of the arrays' bytes, in C order, concatenated in argument order.

  Sensitivity, by design (it is the digest ``compressed_adam.py`` has written since session 8, so old and
  new JSONs compare): the digest changes when any element's bytes change, when the arrays come in another
  order, and when a cast changes the bytes (``float32`` -> ``float64``, ``int32`` 1 -> ``float32`` 1.0).
  It covers the bytes only: the same bytes under another shape (``reshape``) or under a dtype with the same
  byte pattern (``int32`` -> ``uint32`` of non-negative values), or split differently between arguments,
  give the same digest. Call it with the same arrays in the same order (train inputs, train labels, test
  inputs, test labels for a :class:`mlsys_jax.data.Dataset`).

  Args:
    *arrays: numpy or jax arrays (or anything ``np.asarray`` turns into a numeric array), at least one;
      a ``bytes`` argument is hashed as is and a ``str`` as its UTF-8 bytes (file contents, HLO texts).

  Returns:
    The 64-character hex digest.

  Raises:
    ValueError: no arrays, or an array of Python objects (their bytes are memory addresses).

  Example:
    >>> data_digest(np.zeros(2, np.float32)) == data_digest(np.zeros((1, 2), np.float32))
    True
  """
  if not arrays:
    raise ValueError("data_digest needs at least one array (the data a result was computed on).")
  h = hashlib.sha256()
  for i, a in enumerate(arrays):
    if isinstance(a, (bytes, str)):
      h.update(a.encode("utf-8") if isinstance(a, str) else a)
      continue
    a = np.asarray(a)
    if a.dtype.hasobject:
      raise ValueError(f"data_digest: argument {i} has dtype {a.dtype} (Python objects, whose bytes are "
                       "addresses); pass numeric arrays.")
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def git_state(repo_dir: str | os.PathLike = ROOT, paths: Sequence[str] | None = None) -> dict:
  """The git revision of ``repo_dir`` and whether it has uncommitted changes; never raises.

  Args:
    repo_dir: a folder inside the checkout.
    paths: limit the dirty check to these paths (relative to ``repo_dir``; untracked files count as
      changes); None checks the whole checkout.

  Returns:
    ``{"git_rev": <40-hex HEAD or None>, "git_dirty": <bool or None>}``; None where git is missing,
    ``repo_dir`` is not in a repository, or git fails or takes over 10 s. Where git cannot answer (a
    copy of the tree without ``.git``, e.g. on a remote GPU machine) the environment variables
    ``MLSYS_JAX_GIT_REV`` and ``MLSYS_JAX_GIT_DIRTY`` (``0``/``1``), set by whoever made the copy, are
    used instead.

  Example:
    >>> sorted(git_state("/"))
    ['git_dirty', 'git_rev']
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]

  def git(*args: str) -> str | None:
    try:
      r = subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError, ValueError):
      return None
    return r.stdout.strip() if r.returncode == 0 else None

  rev = git("rev-parse", "HEAD")
  status = git("status", "--porcelain", *(("--", *map(str, paths)) if paths else ())) if rev else None
  if rev is None and os.environ.get("MLSYS_JAX_GIT_REV"):   # a copy without .git: the copier's record
    dirty = os.environ.get("MLSYS_JAX_GIT_DIRTY")
    return {"git_rev": os.environ["MLSYS_JAX_GIT_REV"],
            "git_dirty": None if dirty not in ("0", "1") else dirty == "1"}
  return {"git_rev": rev, "git_dirty": None if status is None else bool(status)}


def package_versions(names: Iterable[str] = PACKAGES) -> dict:
  """Installed versions of the named distributions, None for those not installed.

  Args:
    names: distribution names as pip knows them (``"jax"``, ``"mnist1d"``); not one bare string.

  Returns:
    ``{name: version string or None}`` in the order given.

  Example:
    >>> package_versions(["no-such-package-here"])
    {'no-such-package-here': None}
  """
  if isinstance(names, str):
    raise TypeError(f"package_versions takes a list of names, got the string {names!r}; "
                    f"use package_versions([{names!r}]).")
  versions = {}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def record(data_arrays: Sequence[Any] | None = None, extra: Mapping[str, Any] | None = None, *,
           script: str | os.PathLike | None = None, code: Sequence[str] = ("mlsys_jax",),
           packages: Iterable[str] = PACKAGES, repo_dir: str | os.PathLike = ROOT) -> dict:
  """The ``"provenance"`` entry of an experiment's JSON.

  Args:
    data_arrays: the arrays the result was trained or evaluated on (see :func:`data_digest` for the order);
      None or empty where the script has no data arrays (``data_sha256`` is then None).
    extra: more JSON-serialisable fields (what the data is, its seed), added after the standard ones;
      they may not reuse the standard names.
    script: the script's file (``__file__``); its uncommitted changes count in ``git_dirty``.
    code: folders (relative to ``repo_dir``) of the code that computes the result, for ``git_dirty``.
    packages: distributions whose versions are stored.
    repo_dir: the checkout.

  Returns:
    ``{"data_sha256", "git_rev", "git_dirty", "versions", **extra}``, plus ``"git_rev_at_start"`` (the
    checkout's revision when this module was imported) when HEAD has moved since: the result then comes
    from the code of ``git_rev_at_start``, with whatever was uncommitted at the time.

  Raises:
    ValueError: ``extra`` reuses a standard field name; bad arrays (see :func:`data_digest`).

  Example:
    >>> list(record([np.arange(3)], {"data": "arange"}))
    ['data_sha256', 'git_rev', 'git_dirty', 'versions', 'data']
  """
  extra = dict(extra or {})
  clash = sorted(set(extra) & set(_FIELDS))
  if clash:
    raise ValueError(f"record: extra fields {clash} would overwrite the standard fields {list(_FIELDS)}; "
                     "rename them.")
  paths = list(code)
  if script is not None:
    s = pathlib.Path(script).resolve()
    try:
      paths.append(str(s.relative_to(pathlib.Path(repo_dir).resolve())))
    except ValueError:
      paths.append(str(s))
  digest = data_digest(*data_arrays) if data_arrays is not None and len(data_arrays) else None
  state = git_state(repo_dir, paths)
  moved = {}
  if (pathlib.Path(repo_dir).resolve() == ROOT and _AT_IMPORT["git_rev"] is not None
      and state["git_rev"] != _AT_IMPORT["git_rev"]):
    # HEAD moved while the run was going (commits landing in a shared checkout): the code that ran is the
    # revision of when this module was imported (scripts import it at the top), not the one of now.
    moved = {"git_rev_at_start": _AT_IMPORT["git_rev"]}
  return {"data_sha256": digest, **state, **moved, "versions": package_versions(packages), **extra}


_AT_IMPORT = git_state(ROOT)   # the revision the run starts from (a script imports this module at its top)


def _digest_of(x: Mapping[str, Any] | None) -> str | None:
  if x is None:
    return None
  if not isinstance(x, Mapping):
    raise TypeError(f"check_same_data takes provenance records or result JSON dicts, got {type(x).__name__}.")
  p = x.get("provenance", x)
  return p.get("data_sha256") if isinstance(p, Mapping) else None


def check_same_data(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None,
                    names: tuple[str, str] = ("a", "b")) -> bool:
  """Refuse to combine two results computed on different data.

  Args:
    a, b: provenance records (:func:`record`) or whole result JSON dicts holding one under
      ``"provenance"``; None or a dict without a digest (a JSON from before provenance) is allowed.
    names: what to call ``a`` and ``b`` in the error (their file names).

  Returns:
    True when both digests are there and equal; False when either is missing (nothing to check).

  Raises:
    ValueError: the two digests differ; the message names both.

  Example:
    >>> check_same_data({"data_sha256": "ab"}, {"provenance": {"data_sha256": "ab"}})
    True
  """
  da, db = _digest_of(a), _digest_of(b)
  if da is None or db is None:
    return False
  if da != db:
    raise ValueError(f"{names[1]} was computed on different data than {names[0]} (data_sha256 {db} vs {da}); "
                     "combine only runs of one data set build.")
  return True
