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

from typing import Any

from mlsys_jax.profile.attribution import NONE_OP, RESOURCES, Attribution
from mlsys_jax.profile.overhead import Corrected
from mlsys_jax.profile.scopes import HOST_CATEGORIES

COLUMNS = ("total", *HOST_CATEGORIES, "device", *RESOURCES)


def table_rows(a: Attribution | Corrected, by_phase: bool = False) -> list[dict]:
  """Rows ``{'operation', column: seconds, 'share': fraction of the total}``, largest first."""
  merged: dict = {}
  for (ph, op), row in a.table.items():
    key = f"{ph}/{op}" if by_phase else op
    acc = merged.setdefault(key, {c: 0.0 for c in COLUMNS})
    for c in COLUMNS:
      acc[c] += row.get(c, 0) / 1e9
  total = sum(r["total"] for r in merged.values()) or 1.0
  rows = [{"operation": k, **v, "share": v["total"] / total} for k, v in merged.items()]
  return sorted(rows, key=lambda r: (r["operation"].endswith(NONE_OP), -r["total"]))


def format_table(rows: list[dict], columns: tuple = ("total", "share", *HOST_CATEGORIES, "device")) -> str:
  """A fixed-width text table of :func:`table_rows` (milliseconds; share in %)."""
  head = f"{'operation':<22}" + "".join(f"{c:>11}" for c in columns)
  lines = [head]
  for r in rows:
    cells = "".join(f"{100 * r[c]:>10.1f}%" if c == "share" else f"{1e3 * r[c]:>11.2f}" for c in columns)
    lines.append(f"{r['operation']:<22}" + cells)
  return "\n".join(lines)


_COLORS = {"python": "#4c72b0", "simulator": "#55a868", "dispatch": "#c44e52", "compile": "#8172b2",
           "transfer": "#ccb974", "wait": "#64b5cd"}


def plot_stacked(groups: dict[str, list[dict]], path: str, title: str = "") -> None:
  """Stacked horizontal bars, one per (group, operation), stacked by host category (ms). ``groups``
  maps a workload name to its :func:`table_rows`. Needs matplotlib."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels, rows = [], []
  for g, rs in groups.items():
    for r in rs:
      if r["operation"].endswith(NONE_OP):
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
  """Rows with plain floats (seconds), for JSON."""
  return [{k: (float(v) if k != "operation" else v) for k, v in r.items()} for r in rows]
