"""Device check of the counting search's pass kernels (``_pallas_pack.search_bits`` / ``seg_search_bits``, the
``sparse._COUNT_PASS = "pallas"`` switch of issue 18) against the same kernels in Pallas' interpreter and
against the XLA search (``sparse._search_bits`` with an XLA count), on the sizes of a ResNet-50 update at ratio
0.001 (level 1: the block maxima; level 2: the candidate blocks' entries, started from level 1's threshold), and
``sidco`` with and without the switch over a few steps of a smaller tree.

Not a timing: a correctness check on the device, where the CPU tests can only run the interpreter. Prints one
line per case and writes JSON (``--out``): the thresholds' bits from each path, and for the kernels the first
pass whose counters differ between the compiled kernel and the interpreter. Session 35 on an H100: every compiled
count zero (``benchmarks/results/search_pass_check_h100_s35a.json``: ``plgpu.atomic_add`` of an int32 vector lowers
to a float add), then, with the counts added by ``jax.ref.addupdate``, every case the same (``_s35b``).

  PYTHONPATH=. python benchmarks/search_pass_check.py --out $OUT
  PYTHONPATH=. python benchmarks/search_pass_check.py --out /tmp/spc --small   # CPU: interpreter against XLA only
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import environment, sparse_switches, write_json  # noqa: E402
from mlsys_jax.comm import _pallas_pack as pp  # noqa: E402
from mlsys_jax.comm import sparse as sp  # noqa: E402


def _bits(t) -> list[int]:
  return np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(t, jnp.float32), jnp.int32)).reshape(-1).tolist()


def _error(e: Exception) -> str:
  """An exception recorded in a row (the start of its message: a compile error's first lines name the kernel)."""
  return "".join(traceback.format_exception_only(type(e), e))[:3000]


def _with_same(row: dict) -> dict:
  """``row`` with ``same``: the interpreter's (and, where it ran, the compiled kernel's) bits are the XLA search's."""
  row["same"] = row["interpret_bits"] == row["xla_bits"] and row.get("compiled_bits", row["xla_bits"]) == row["xla_bits"]
  return row


def _xla_search(x_rows, row_seg, k, top, ways):
  """The XLA search over ``x_rows`` (rows; row r in segment row_seg[r]) for every segment's k: (S,) float32."""
  ns = top.shape[0]
  onehot = (row_seg[:, None] == jnp.arange(ns)[None, :]).astype(jnp.int32)          # (rows, S)

  def ok(tm):   # tm (S, W)
    c = jnp.sum(x_rows[:, :, None] > tm[row_seg][:, None, :], axis=1, dtype=jnp.int32)   # (rows, W)
    return jnp.einsum("rs,rw->sw", onehot, c) >= k[:, None]

  return sp._search_bits(ok, top, keep_low=True, ways=ways)


def _passes(x, bounds, ways, interpret):
  """Every pass's counters of the one-segment kernel chain (list of arrays)."""
  passes = pp.search_passes(ways)
  c = jnp.zeros((passes * ways,), jnp.int32)
  out = []
  for j in range(passes):
    c = pp.search_pass(x, bounds, c, j, ways=ways, interpret=interpret)
    out.append(np.asarray(c).reshape(passes, ways)[j].tolist())
  return out


def _case_one(name, x, k, lo_bits, ways, gpu):
  top = jnp.asarray(_bits(jnp.max(x) * 2 + 1e-30)[0], jnp.int32)
  row = {"case": name, "n": int(x.shape[0]), "k": int(k), "ways": ways}
  xla = _xla_search(x[:, None], jnp.zeros(x.shape, jnp.int32), jnp.asarray([k], jnp.int32), top[None], ways)
  row["xla_bits"] = _bits(xla)
  bounds = jnp.stack([jnp.asarray(lo_bits, jnp.int32), top, jnp.asarray(k, jnp.int32)])
  row["interpret_bits"] = _bits(pp.search_bits(x, k, top, lo_bits, ways=ways, interpret=True))
  ci = _passes(x, bounds, ways, True)
  if gpu:
    try:
      row["compiled_bits"] = _bits(pp.search_bits(x, k, top, lo_bits, ways=ways, interpret=False))
      cg = _passes(x, bounds, ways, False)
      diff = [j for j in range(len(ci)) if ci[j] != cg[j]]
      row["first_pass_differing"] = diff[0] if diff else None
      if diff:
        row["interpret_counts"], row["compiled_counts"] = ci[diff[0]], cg[diff[0]]
    except Exception as e:   # noqa: BLE001 (recorded)
      row["error"] = _error(e)
  return _with_same(row)


def _case_seg(name, rows, row_seg, k, ways, gpu):
  ns = k.shape[0]
  top = jnp.asarray([_bits(jnp.max(rows) * 2 + 1e-30)[0]] * ns, jnp.int32)
  row = {"case": name, "rows": int(rows.shape[0]), "segments": ns, "ways": ways}
  row["xla_bits"] = _bits(_xla_search(rows, row_seg, k, top, ways))
  row["interpret_bits"] = _bits(pp.seg_search_bits(rows, row_seg, k, top, ways=ways, interpret=True))
  if gpu:
    try:
      row["compiled_bits"] = _bits(pp.seg_search_bits(rows, row_seg, k, top, ways=ways, interpret=False))
    except Exception as e:   # noqa: BLE001 (recorded)
      row["error"] = _error(e)
  return _with_same(row)


def _case_sidco(name, shapes, switches, steps=3, per_tensor=False):
  """sidco(0.001) over ``steps`` updates of a tree of ``shapes`` with and without ``switches`` (sparse module
  attributes): the number of output / state arrays that differ."""
  rng = np.random.default_rng(0)
  grads = [[jnp.asarray(rng.normal(size=s) * (1 + i % 7), jnp.float32) for i, s in enumerate(shapes)]
           for _ in range(steps)]

  def run():
    tx = sp.sidco(0.001, per_tensor=per_tensor)
    st = tx.init(grads[0])
    outs = []
    upd = jax.jit(tx.update)
    for g in grads:
      u, st = upd(g, st)
      outs += jax.tree_util.tree_leaves((u, st))
    return [np.asarray(o) for o in outs]

  ref = run()
  with sparse_switches(switches):
    got = run()
  differ = sum(not np.array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))
               for a, b in zip(ref, got))
  return {"case": name, "switches": switches, "arrays": len(ref), "arrays_differing": differ, "same": differ == 0}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--name", default="search_pass_check")
  ap.add_argument("--small", action="store_true", help="sizes / 16 (a CPU smoke run)")
  ap.add_argument("--quick", action="store_true", help="the first case of each kind only (a short device call)")
  args = ap.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  div = 16 if args.small else 1
  rng = np.random.default_rng(1)
  n = 25_557_032 // div
  k = max(1, n // 1000)
  rows_out = []
  bm = jnp.asarray(np.abs(rng.standard_t(3, size=(-(-n // 64) // 64) * 64)), jnp.float32)
  t1 = _bits(_xla_search(bm.reshape(-1, 64), jnp.zeros((bm.shape[0] // 64,), jnp.int32), jnp.asarray([k], jnp.int32),
                         jnp.asarray(_bits(jnp.max(bm) * 2)[0:1], jnp.int32), 16))[0]
  cand = jnp.asarray(np.abs(rng.standard_t(3, size=k * 64)), jnp.float32)
  ties = jnp.asarray(np.round(np.abs(rng.normal(size=1 << 16)) * 4) / 4, jnp.float32)
  cases = [("level 1, block maxima", bm, k, 0, 16), ("level 1, 8 ways", bm, k, 0, 8),
           ("level 2, candidates from 0", cand, k, 0, 16),
           ("level 2, candidates from level 1's threshold", cand, k, min(t1, _bits(jnp.sort(cand)[-k])[0] - 1), 16),
           ("ties (quarter steps)", ties, 1000, 0, 16), ("k = n", ties, ties.shape[0], 0, 16)]
  if args.quick:
    cases = [cases[0], cases[3]]
  for name, x, kk, lo, w in cases:
    r = _case_one(name, x, kk, lo, w, gpu)
    rows_out.append(r)
    print(r["case"], "same" if r["same"] else "DIFFERENT", {q: r[q] for q in r if q.endswith("bits") or "pass" in q
                                                               or q == "error"}, flush=True)
  if gpu:   # two searches in one jitted program (their zero counters of one shape)
    tops = [_bits(jnp.max(x) * 2)[0] for x in (bm, cand)]   # (top bits found outside the jitted program)
    both = jax.jit(lambda a, b: (pp.search_bits(a, k, tops[0], ways=16), pp.search_bits(b, k, tops[1], ways=16)))
    try:
      ta, tb = both(bm, cand)
      alone = [_bits(pp.search_bits(x, k, t, ways=16))[0] for x, t in zip((bm, cand), tops)]
      r = {"case": "two searches in one program", "one_program_bits": _bits(ta) + _bits(tb), "alone_bits": alone}
      r["same"] = r["one_program_bits"] == alone
    except Exception as e:   # noqa: BLE001 (recorded)
      r = {"case": "two searches in one program", "same": False, "error": _error(e)}
    rows_out.append(r)
    print(r["case"], "same" if r["same"] else "DIFFERENT", r, flush=True)
  nseg = 40
  rr = jnp.asarray(np.abs(rng.standard_t(3, size=(4096 // div * 4, 64))), jnp.float32)
  seg = jnp.asarray(np.sort(rng.integers(0, nseg, size=rr.shape[0])), jnp.int32)
  kseg = jnp.asarray(rng.integers(1, 50, size=nseg), jnp.int32)
  for name, s in (("segments, sorted rows", seg), ("segments, interleaved rows", jnp.asarray(
      rng.integers(0, nseg, size=rr.shape[0]), jnp.int32)))[:1 if args.quick else 2]:
    r = _case_seg(name, rr, s, kseg, 16, gpu)
    rows_out.append(r)
    print(r["case"], "same" if r["same"] else "DIFFERENT", {q: r[q] for q in r if q == "error"}, flush=True)
  if gpu:
    from benchmarks.powersgd_step import resnet50_shapes
    shapes = resnet50_shapes()[:60]
    fp = {"_EXACT_SEARCH": "counts", "_SEARCH_WAYS": 16, "_COUNT_PASS": "pallas"}
    sidco_cases = (("sidco counts 16", {"_EXACT_SEARCH": "counts", "_SEARCH_WAYS": 16}),
                   ("sidco counts 16 fpass", fp),
                   ("sidco counts 16 fpass pwrite", {**fp, "_OUT_WRITE": "pallas"}),
                   ("sidco per tensor counts 16 fpass", fp))
    if args.quick:
      sidco_cases = sidco_cases[1:2] + sidco_cases[3:]
    for name, sw in sidco_cases:
      try:
        r = _case_sidco(name, shapes, sw, per_tensor="per tensor" in name)
      except Exception as e:   # noqa: BLE001 (recorded)
        r = {"case": name, "same": False, "error": _error(e)}
      rows_out.append(r)
      print(r["case"], "same" if r["same"] else "DIFFERENT", r.get("arrays_differing"), r.get("error", ""), flush=True)
  write_json(args.out, args.name, {"env": environment(), "rows": rows_out})


if __name__ == "__main__":
  main()
