"""Where a profiled step's kernel time goes, by the library function that emitted each kernel.

A row of ``benchmarks/sidco_model_step.py --top N --hlo`` (or ``benchmarks/sidco_tree.py --top N --hlo``) holds ``top_kernels`` (kernel name, seconds per step,
launches per step) and its optimized HLO (``<name>_<row>.hlo.txt.gz``). XLA names a fusion's kernel after the
fusion instruction (``loop_select_fusion.6`` launches ``loop_select_fusion_6``), and every instruction carries a
``stack_frame_id`` into the module's own table of Python frames (file, function, line). This script joins the two:
each kernel is charged to the innermost frame of a file under ``--package`` (default ``mlsys_jax/``), or to
"outside the package" (the model, and optax, whose frames JAX filters out of the table) or "no frame"; cub's radix sorts, memsets and memcpys, which XLA launches
from custom calls and thunks under other names, are charged to "cub sort" / "memset" / "memcpy".

    python3 benchmarks/hlo_attribution.py RESULT.json --rows sidco_pt_flat,sidco_flat [--by line] [--top 25]

Prints, for every row, the seconds per step of each group, largest first, and writes nothing. A name in
``top_kernels`` that no instruction of the HLO carries is charged to "unmatched" (a kernel of a library call, or
``--top`` too small to keep every kernel: the sum of the groups is then below the row's ``busy_s``).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re

_SECTION = re.compile(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\s*$")
_ENTRY = re.compile(r"^(\d+)\s+(.*)$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\b([a-z][\w\-]*)\(")
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")


def hlo_file(out_dir: str, name: str, row: str) -> str:
  """Where a benchmark writes row ``row``'s HLO: ``<out_dir>/<name>_<row>.hlo.txt.gz``, the row's name with every
  character other than letters, digits and ``._-`` replaced by ``_``."""
  safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in row)
  return os.path.join(out_dir, f"{name}_{safe}.hlo.txt.gz")


def parse_frames(lines):
  """The module's frame tables: ``{frame_id: (file, function, line, parent_id)}``."""
  section, files, funcs, locs, frames = None, {}, {}, {}, {}
  for line in lines:
    m = _SECTION.match(line)
    if m:
      section = m.group(1)
      continue
    if section is None:
      continue
    e = _ENTRY.match(line)
    if not e:
      if line.strip() and not line.startswith(" "):
        section = None
      continue
    i, body = int(e.group(1)), e.group(2)
    if section in ("FileNames", "FunctionNames"):
      (files if section == "FileNames" else funcs)[i] = body.strip().strip('"')
    elif section == "FileLocations":
      f = dict(re.findall(r"(\w+)=(\d+)", body))
      locs[i] = (int(f["file_name_id"]), int(f["function_name_id"]), int(f["line"]))
    else:
      f = dict(re.findall(r"(\w+)=(\d+)", body))
      frames[i] = (int(f["file_location_id"]), int(f["parent_frame_id"]))
  out = {}
  for i, (loc, parent) in frames.items():
    fi, fu, ln = locs[loc]
    out[i] = (files.get(fi, "?"), funcs.get(fu, "?"), ln, parent)
  return out


def stack(frames, frame_id: int, limit: int = 64):
  """Innermost first: ``[(file, function, line), ...]``."""
  out, seen = [], set()
  while frame_id in frames and frame_id not in seen and len(out) < limit:
    seen.add(frame_id)
    f, fn, ln, parent = frames[frame_id]
    out.append((f, fn, ln))
    if parent == frame_id:
      break
    frame_id = parent
  return out


def instruction_frames(text: str) -> tuple[dict, dict]:
  """``({instruction name: frame id}, frames)`` for every instruction with a ``stack_frame_id``."""
  lines = text.splitlines()
  frames = parse_frames(lines)
  names = {}
  for line in lines:
    m = _INSTR.match(line)
    if not m:
      continue
    f = _FRAME_ID.search(line)
    if f:
      names.setdefault(m.group(1), int(f.group(1)))
  return names, frames


def label(stk, package: str, by: str) -> str:
  """The group of a kernel whose instruction has the stack ``stk`` (innermost first)."""
  for f, fn, ln in stk:
    if package in f:
      return f"{os.path.basename(f)}:{fn}" + (f":{ln}" if by == "line" else "")
  return "outside the package" if stk else "no frame"


def attribute(top_kernels, hlo_text: str, package: str = "mlsys_jax/", by: str = "function") -> dict:
  """Seconds per step of each group (see the module docstring)."""
  names, frames = instruction_frames(hlo_text)
  out = collections.Counter()
  for name, sec, _count in top_kernels:
    low = name.lower()
    if "cub::" in name or "radix_sort" in low or "onesweep" in low:
      out["cub sort"] += sec
      continue
    if low.startswith("memset"):
      out["memset"] += sec
      continue
    if low.startswith("memcpy"):
      out["memcpy"] += sec
      continue
    cand = [name, name.replace("_", ".")]
    head, _, tail = name.rpartition("_")
    if head and tail.isdigit():
      cand.append(f"{head}.{tail}")
    fid = next((names[c] for c in cand if c in names), None)
    if fid is None:
      out["unmatched"] += sec
      continue
    out[label(stack(frames, fid), package, by)] += sec
  return dict(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("result", help="a sidco_model_step JSON written with --hlo (its .hlo.txt.gz files beside it)")
  ap.add_argument("--rows", default="", help="comma-separated rows (default: every row with an HLO file)")
  ap.add_argument("--package", default="mlsys_jax/", help="frames of files whose path holds this are named")
  ap.add_argument("--by", default="function", choices=("function", "line"))
  ap.add_argument("--top", type=int, default=30, help="groups printed per row")
  ap.add_argument("--single", action="store_true",
                  help="sidco_tree.py --single --hlo rows: the single update's kernels (single_top_kernels) against "
                       "its own HLO (<name>_<row>@single.hlo.txt.gz) instead of the loop's")
  args = ap.parse_args()
  res = json.load(open(args.result))
  base = os.path.splitext(args.result)[0]
  want = [r for r in args.rows.split(",") if r]
  pre = "single_" if args.single else ""
  for row in res["rows"]:
    name = row.get("row") or row.get("method", "")   # (sidco_model_step's rows, sidco_tree's methods)
    path = hlo_file(os.path.dirname(base), os.path.basename(base), name + ("@single" if args.single else ""))
    if (want and name not in want) or not os.path.exists(path):
      continue
    with gzip.open(path, "rt") as f:
      groups = attribute(row.get(pre + "top_kernels", []), f.read(), args.package, args.by)
    total = sum(groups.values())
    print(f"== {name}: busy {row.get(pre + 'busy_s', float('nan')) * 1e3:.3f} ms, attributed {total * 1e3:.3f} ms")
    for g, s in sorted(groups.items(), key=lambda kv: -kv[1])[:args.top]:
      print(f"  {s * 1e6:9.1f} us  {g}")


if __name__ == "__main__":
  main()
