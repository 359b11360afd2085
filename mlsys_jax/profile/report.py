"""Per-operation table and stacked-bar plot (RL-Scope, Gleeson et al., MLSys 2021, Fig. 4-7 style:
one bar per operation, stacked by category; CPU-only / overlap / device-only split alongside).

>>> import time
>>> from mlsys_jax import profile
>>> with profile.Profiler("scopes") as p:
...   with profile.operation("sim"), profile.simulator():
...     time.sleep(0.002)
>>> print(profile.format_table(profile.table_rows(profile.attribute(p)))[:9])
operation
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mlsys_jax.profile.attribution import NONE_OP, RESOURCES, Attribution
from mlsys_jax.profile.overhead import Corrected
from mlsys_jax.profile.scopes import HOST_CATEGORIES

COLUMNS = ("total", *HOST_CATEGORIES, "device", *RESOURCES)


def _is_none(name: str) -> bool:
  # The row of time outside every operation: '(none)', or 'phase/(none)' with by_phase; a user operation
  # whose name merely ends in '(none)' (e.g. 'warmup(none)') is an operation.
  return name == NONE_OP or name.endswith("/" + NONE_OP)


def _real(v: Any) -> bool:
  # A finite real scalar (Python or numpy number, 0-d array); not bool or str.
  if isinstance(v, (bool, str)):
    return False
  try:
    return np.ndim(v) == 0 and math.isfinite(float(v))
  except (TypeError, ValueError, OverflowError):
    return False


def _check_rows(name: str, rows: Any, columns: tuple) -> None:
  if not isinstance(rows, (list, tuple)):
    raise TypeError(f"{name} must be a list of row dicts from table_rows, got {type(rows).__name__}.")
  for i, r in enumerate(rows):
    if not isinstance(r, dict):
      raise TypeError(f"{name}[{i}] must be a dict (a row of table_rows), got {type(r).__name__}.")
    missing = [c for c in ("operation", *columns) if c not in r]
    if missing:
      raise ValueError(f"{name}[{i}] lacks column(s) {missing}; build the rows with table_rows(...), which "
                       f"has {list(COLUMNS) + ['share']}.")


def table_rows(a: Attribution | Corrected, by_phase: bool = False) -> list[dict]:
  """One row per operation of an attributed run, in seconds: RL-Scope's per-operation breakdown
  (Gleeson et al., MLSys 2021, Sec. 3.2 and Fig. 4-7) as data.

  Each row is ``{'operation': name, c: seconds for c in COLUMNS, 'share': total / sum of totals}``:
  ``COLUMNS`` are ``'total'``, the host categories (:data:`~mlsys_jax.profile.HOST_CATEGORIES`),
  ``'device'`` and the resources (:data:`~mlsys_jax.profile.RESOURCES`). The phases of an operation
  are summed unless ``by_phase`` (then the name is ``'phase/operation'``). Rows are sorted by total,
  largest first, with time outside every operation (``'(none)'``) last. Shares sum to 1 (all 0 when
  the total is 0).

  Args:
    a: an :class:`~mlsys_jax.profile.Attribution` (:func:`~mlsys_jax.profile.attribute`) or a
      :class:`~mlsys_jax.profile.Corrected` (:func:`~mlsys_jax.profile.correct`); tables in ns.
    by_phase: one row per (phase, operation) instead of per operation.

  Returns:
    ``list[dict]``.

  Raises:
    TypeError: ``a`` has no per-(phase, operation) ``table``. ValueError: a value of a column is not a
    finite real number (NaN or an infinity would make every share NaN).

  Example:
    >>> from mlsys_jax.profile import Attribution
    >>> a = Attribution({("train", "sim"): {"total": 3e9, "simulator": 3e9},
    ...                  ("train", "nn"): {"total": 1e9, "python": 1e9}}, {}, 4_000_000_000, False, "")
    >>> [(r["operation"], r["total"], r["share"]) for r in table_rows(a)]
    [('sim', 3.0, 0.75), ('nn', 1.0, 0.25)]
  """
  table = getattr(a, "table", None)
  if not isinstance(table, dict) or not all(isinstance(k, tuple) and len(k) == 2 for k in table):
    raise TypeError(f"a must be an Attribution (profile.attribute) or Corrected (profile.correct) with a "
                    f"table keyed by (phase, operation), got {type(a).__name__}.")
  merged: dict = {}
  for (ph, op), row in table.items():
    if not isinstance(row, dict):
      raise TypeError(f"a.table[{(ph, op)!r}] must be a dict of column -> ns, got {type(row).__name__}.")
    bad = {c: row[c] for c in COLUMNS if c in row and not _real(row[c])}
    if bad:
      raise ValueError(f"a.table[{(ph, op)!r}] holds {bad}: every column must be a finite real number of ns; "
                       "build the table with profile.attribute (and profile.correct).")
    key = f"{ph}/{op}" if by_phase else op
    acc = merged.setdefault(key, {c: 0.0 for c in COLUMNS})
    for c in COLUMNS:
      acc[c] += row.get(c, 0) / 1e9
  total = sum(r["total"] for r in merged.values()) or 1.0
  rows = [{"operation": k, **v, "share": v["total"] / total} for k, v in merged.items()]
  return sorted(rows, key=lambda r: (_is_none(str(r["operation"])), -r["total"]))


def format_table(rows: list[dict], columns: tuple = ("total", "share", *HOST_CATEGORIES, "device")) -> str:
  """A fixed-width text table of :func:`table_rows`: a header line, then one line per row; the
  operation name left-aligned in 22 characters, each column right-aligned in 11, in milliseconds with
  2 decimals (``'share'`` in percent with 1 decimal). A longer name (or column name, or value) widens its
  column for every line, so the columns stay aligned and separated by at least one space whatever the
  lengths.

  Args:
    rows: rows of :func:`table_rows` (or any dicts with ``'operation'`` and the ``columns``).
    columns: the columns to show, in order.

  Returns:
    The table as one string (lines joined by ``\\n``, no trailing newline).

  Raises:
    TypeError/ValueError: ``columns`` is a string or not a sequence of names, or ``rows`` is not a list
    of dicts holding ``'operation'`` and every column.

  Example:
    >>> print(format_table([{"operation": "sim", "total": 0.0125, "share": 0.5}], ("total", "share")))
    operation                   total      share
    sim                         12.50      50.0%
  """
  if isinstance(columns, str) or not isinstance(columns, (list, tuple)) or not all(
      isinstance(c, str) for c in columns):
    raise TypeError(f"columns must be a tuple of column names such as ('total', 'share'), got {columns!r}"
                    + (f"; for one column write ({columns!r},)." if isinstance(columns, str) else "."))
  columns = tuple(columns)
  _check_rows("rows", rows, columns)
  names = [str(r["operation"]) for r in rows]
  cells = [[f"{100 * r[c]:.1f}%" if c == "share" else f"{1e3 * r[c]:.2f}" for c in columns] for r in rows]
  # Widths from the longest entry of each column (at least 22 / 11 as before), one space of separation.
  w_name = max([22] + [len(n) + 1 for n in names])
  w = [max([11, len(c) + 1] + [len(row[j]) + 1 for row in cells]) for j, c in enumerate(columns)]
  lines = [f"{'operation':<{w_name}}" + "".join(f"{c:>{wj}}" for c, wj in zip(columns, w))]
  for n, row in zip(names, cells):
    lines.append(f"{n:<{w_name}}" + "".join(f"{v:>{wj}}" for v, wj in zip(row, w)))
  return "\n".join(lines)


_COLORS = {"python": "#4c72b0", "simulator": "#55a868", "dispatch": "#c44e52", "compile": "#8172b2",
           "transfer": "#ccb974", "wait": "#64b5cd"}


def plot_stacked(groups: dict[str, list[dict]], path: str, title: str = "") -> None:
  """Stacked horizontal bars (RL-Scope, Gleeson et al., MLSys 2021, Fig. 4-7 style): one bar per
  (group, operation), its segments the host categories in milliseconds; ``'(none)'`` rows are left out.
  Writes a PNG (or any format matplotlib infers from ``path``). Needs matplotlib.

  Args:
    groups: ``{workload name: table_rows(...)}``, drawn in that order.
    path: output file; its directory must exist.
    title: figure title.

  Raises:
    TypeError/ValueError: ``groups`` is not a dict of row lists with every host category, there is no
    operation to draw, or ``path``'s directory does not exist. ImportError: matplotlib is missing.

  Example (writes a file; see tests/test_public_api_core.py).
  """
  import os
  if not isinstance(groups, dict):
    raise TypeError(f"groups must map a workload name to its table_rows, got {type(groups).__name__}.")
  for g, rs in groups.items():
    _check_rows(f"groups[{g!r}]", rs, HOST_CATEGORIES)
  if not any(not _is_none(str(r["operation"])) for rs in groups.values() for r in rs):
    raise ValueError("groups holds no operation to draw (only '(none)' rows or none at all); annotate the "
                     "workload with profile.operation(...).")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise ValueError(f"path {path!r}: directory {folder} does not exist; create it first.")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels, rows = [], []
  for g, rs in groups.items():
    for r in rs:
      if _is_none(str(r["operation"])):
        continue
      labels.append(f"{g}: {r['operation']}")
      rows.append(r)
  fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.5))
  left = [0.0] * len(rows)
  for c in HOST_CATEGORIES:
    w = [1e3 * r[c] for r in rows]
    ax.barh(range(len(rows)), w, left=left, color=_COLORS[c], label=c)
    left = [a + b for a, b in zip(left, w)]
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels(labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("time per run (ms, overhead-corrected)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def to_jsonable(rows: list[dict]) -> list[dict[str, Any]]:
  """Rows of :func:`table_rows` with every value a plain Python ``float`` (numpy scalars and 0-d
  arrays converted) except ``'operation'`` (kept), ready for ``json.dump``. New dicts; the input is not
  modified.

  Args:
    rows: rows of :func:`table_rows`.

  Returns:
    ``list[dict]``.

  Raises:
    TypeError/ValueError: a row is not a dict, lacks ``'operation'``, or holds a value that is not a
    real number (NaN and infinities included: JSON has no such numbers and ``json.dump`` would write
    invalid ``NaN``/``Infinity`` tokens).

  Example:
    >>> to_jsonable([{"operation": "sim", "total": np.float32(0.5)}])
    [{'operation': 'sim', 'total': 0.5}]
  """
  _check_rows("rows", rows, ())
  out = []
  for i, r in enumerate(rows):
    row = {}
    for k, v in r.items():
      if k == "operation":
        row[k] = v
        continue
      try:
        if isinstance(v, (bool, str)) or np.ndim(v) != 0:
          raise TypeError
        row[k] = float(v)
        if not np.isfinite(row[k]):
          raise ValueError
      except (TypeError, ValueError):
        raise ValueError(f"rows[{i}][{k!r}] = {v!r} is not a real number; to_jsonable converts table_rows' "
                         "numeric columns only.") from None
    out.append(row)
  return out
