"""Review fixes (session 44).

1. :mod:`mlsys_jax.comm._pallas_pack`: the kernels form flat offsets, block ids, positions and counts in int32
   (``program_id * span + arange``, ``ids * 64 + arange``, compared with the static length). Past 2**31 - 1 they
   wrap to negative values that pass the ``offs < n`` masks: wrong entries read or written, silently (or, where a
   static length past int32 met an int32 array, an OverflowError deep in tracing). Every public entry point now
   refuses a size past its limit at trace time with a ValueError naming the size, the limit and what to do. The
   tests use shapes only (``jax.eval_shape``): nothing of 2**31 entries is allocated. Each test checks the
   largest size accepted and the next one refused.
2. ``experiments/results/compressed_adam_pool.py``: pooling refuses runs whose settings outside the arm names
   differ (the check of ``compressed_adam.py --merge``, shared), so that only the seeds may differ between the
   pooled files; every pool of the repository still passes.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.comm import _pallas_pack as pp
from mlsys_jax.comm import sparse

ROOT = pathlib.Path(__file__).resolve().parents[1]
S = jax.ShapeDtypeStruct
F32, I32 = jnp.float32, jnp.int32
M = 2**31 - 1
TILE = 4096

needs_pallas = pytest.mark.skipif(not pp.available(), reason="needs jax.experimental.pallas.triton")


def _accepts(f, *shapes):
  jax.eval_shape(f, *shapes)


def _refuses(f, *shapes, n, limit):
  with pytest.raises(ValueError, match=rf"{n} .*at most {limit} "):
    jax.eval_shape(f, *shapes)


def test_largest_fitting_is_exact():
  # a program span that is not a power of two: offsets reach ceil(n / span) * span - 1
  span = 96 * 64
  limit = (2**31 // span) * span
  assert pp._largest_fitting(lambda m: pp._span_fits(m, span)) == limit == 2147481600
  assert pp._largest_fitting(lambda m: pp._span_fits(m, 4096)) == M


@needs_pallas
def test_tile_stats_limit():
  f = lambda x: pp.tile_stats(x, interpret=True)
  _accepts(f, S((M,), F32))
  _refuses(f, S((M + 1,), F32), n=M + 1, limit=M)
  _refuses(lambda x: pp.block_stats(x, interpret=True), S((M + 1,), F32), n=M + 1, limit=M)


@needs_pallas
def test_tile_stats_limit_with_a_span_that_is_not_a_power_of_two():
  # 96 blocks per program: the last program's offsets wrap below 2**31 entries (old code: silently)
  g = lambda x: pp.tile_stats(x, interpret=True, tile_blocks=96)
  _accepts(g, S((2147481600,), F32))
  _refuses(g, S((2147481601,), F32), n=2147481601, limit=2147481600)


@needs_pallas
@pytest.mark.parametrize("fn", [pp.pack_above, pp.pack_above_all_tiles])
def test_pack_above_limit(fn):
  f = lambda x, b: fn(x, 0.5, 1000, b, interpret=True)
  _accepts(f, S((M,), F32), S((-(-M // 64),), F32))
  _refuses(f, S((M + 1,), F32), S((-(-(M + 1) // 64),), F32), n=M + 1, limit=M)


@needs_pallas
@pytest.mark.parametrize("fn", [pp.pack_above, pp.pack_above_all_tiles])
def test_pack_above_capacity_limit(fn):
  f = lambda x, b: fn(x, 0.5, 2**31 - 100, b, interpret=True)
  with pytest.raises(ValueError, match="capacity 2147483548 is too large"):
    jax.eval_shape(f, S((TILE,), F32), S((64,), F32))


@needs_pallas
def test_compact_above_and_sidco_compress_refuse_on_the_pallas_path():
  n = M + 1
  x, b = S((n,), F32), S((n // 64,), F32)
  _refuses(lambda x, b: sparse.compact_above(x, 0.5, 1000, b, packing="pallas"), x, b, n=n, limit=M)
  _refuses(lambda x: sparse.sidco_compress(x, 0.001, 1000, packing="pallas"), x, n=n, limit=M)


@needs_pallas
def test_search_pass_limit():
  f = lambda x: pp.search_bits(x, 10, 2**30, ways=16, interpret=True)
  _accepts(f, S((M,), F32))
  _refuses(f, S((M + 1,), F32), n=M + 1, limit=M)


@needs_pallas
def test_seg_search_pass_limit():
  # rows x columns entries: live offsets up to rows * columns - 1 and a segment's int32 count
  g = lambda r, s: pp.seg_search_bits(r, s, jnp.asarray([10, 10]), jnp.asarray([2**30, 2**30]), ways=16,
                                      interpret=True)
  nr_ok = M // 16
  _accepts(g, S((nr_ok, 16), F32), S((nr_ok,), I32))
  _refuses(g, S((nr_ok + 1, 16), F32), S((nr_ok + 1,), I32), n=(nr_ok + 1) * 16, limit=M)


@needs_pallas
def test_tile_counts_above_limit():
  # no static length compared in-kernel: the last offset of 2**31 entries (2**31 - 1) still fits
  f = lambda x, t: pp.tile_counts_above(x, t, interpret=True)
  _accepts(f, S((2**31,), F32), S((2**31 // TILE, 8), F32))
  _refuses(f, S((2**31 + TILE,), F32), S((2**31 // TILE + 1, 8), F32), n=2**31 + TILE, limit=2**31)


@needs_pallas
def test_zero_sent_limit():
  g = lambda fl, old, bm: pp.zero_sent(fl, 0.5, 3, 7, True, bm, old, interpret=True)
  n = 2**31
  _accepts(g, S((n,), F32), S((n,), F32), S((n // 64,), F32))
  n += TILE
  _refuses(g, S((n,), F32), S((n,), F32), S((n // 64,), F32), n=n, limit=2**31)


@needs_pallas
def test_kth_blocks_limit():
  f = lambda bm: pp.kth_blocks(bm, 0.5, 10, 100, interpret=True)
  _accepts(f, S((M,), F32))
  _refuses(f, S((M + 1,), F32), n=M + 1, limit=M)
  with pytest.raises(ValueError, match="capacity 2147483600 is too large"):
    jax.eval_shape(lambda bm: pp.kth_blocks(bm, 0.5, 10, 2147483600, interpret=True), S((64,), F32))


def _kept(n_real, start):
  return lambda fl, old: pp.kept_from_padded(fl, [n_real], [start], jnp.ones((1,)), jnp.zeros((1,), I32), 5, True,
                                            old, interpret=True)


@needs_pallas
def test_kept_from_padded_limit_real_entries():
  _accepts(_kept(M, 0), S((2**31,), F32), S((M,), F32))
  _refuses(_kept(2**31, 0), S((2**31,), F32), S((2**31,), F32), n=2**31, limit=M)


@needs_pallas
def test_kept_from_padded_limit_padded_entries():
  # a segment starting near 2**31 in a longer padded buffer: its padded positions wrap
  _accepts(_kept(100, 2**31 - 100), S((2**31,), F32), S((100,), F32))
  _refuses(_kept(100, 2**31 - 50), S((2**31 + TILE,), F32), S((100,), F32), n=2**31 + TILE, limit=2**31)


def _writer(which, sizes, offsets):
  k = len(sizes)
  t, tie = jnp.ones((k,)), jnp.zeros((k,), I32)
  if which == "write_leaves":
    return lambda fl: pp.write_leaves(fl, sizes, offsets, t, tie, 5, True, interpret=True)
  return lambda fl, bm: pp.write_sent(fl, sizes, offsets, t, tie, 5, True, bm, interpret=True)


def _writer_shapes(which, n_flat):
  return (S((n_flat,), F32),) + ((S((-(-n_flat // 64),), F32),) if which == "write_sent" else ())


@needs_pallas
@pytest.mark.parametrize("which", ["write_leaves", "write_sent"])
def test_leaf_writers_limit_flat_buffer(which):
  _accepts(_writer(which, [100], [2**31 - 100]), *_writer_shapes(which, 2**31))
  # a leaf whose positions pass 2**31 - 1 (its int32 offset fits, its in-kernel positions wrap)
  _refuses(_writer(which, [100], [2**31 - 50]), *_writer_shapes(which, 2**31 + TILE), n=2**31 + TILE, limit=2**31)


@needs_pallas
@pytest.mark.parametrize("which", ["write_leaves", "write_sent"])
def test_leaf_writers_limit_one_leaf(which):
  _accepts(_writer(which, [M], [0]), *_writer_shapes(which, 2**31))
  _refuses(_writer(which, [2**31], [0]), *_writer_shapes(which, 2**31), n=2**31, limit=M)


def _sum_leaves(n_real, pad_tiles=0):
  """sum_leaves of one leaf of ``n_real`` entries laid out after ``pad_tiles`` empty tiles."""
  tiles = pad_tiles + -(-n_real // TILE)
  p0 = np.arange(tiles, dtype=np.int64) * TILE
  shift = np.where(np.arange(tiles) < pad_tiles, 0, -pad_tiles * TILE)
  limit = np.where(np.arange(tiles) < pad_tiles, p0, np.minimum(p0 + TILE, n_real + pad_tiles * TILE))
  return lambda a, r: pp.sum_leaves([a], [r], shift, limit, interpret=True)


@needs_pallas
def test_sum_leaves_limit():
  n = 2**31 - TILE   # (the int32 table must hold every tile's end, up to tiles * 4096: at most 2**31 - 1)
  _accepts(_sum_leaves(n), S((n,), F32), S((n,), F32))
  _refuses(_sum_leaves(n + 1), S((n + 1,), F32), S((n + 1,), F32), n=2**31, limit=n)
  # fewer real entries than 2**31 laid out past it (two empty tiles first): the last tile's padded positions
  # wrap (old code: silently, its table cast to int32 wrapped too)
  _refuses(_sum_leaves(n, pad_tiles=2), S((n,), F32), S((n,), F32), n=2**31 + TILE, limit=n)


# ------------------------------------------------------------------------------------------------------------
# 2. compressed_adam_pool: pooled files must share every setting outside the arm names but the seeds.

RUN = {"dataset": "digits", "steps": 600, "workers": 8, "batch": 32, "lr": 0.001, "per_tensor": False,
       "residual_decay": 1.0, "seeds": [0, 1], "compressors": ["topk"], "ratios": [0.01],
       "accuracy": {"adam": [0.9, 0.91], "topk 0.01 chain": [0.89, 0.9]},
       "bytes_per_worker": {"adam": [1.0, 1.0], "topk 0.01 chain": [0.1, 0.1]}}


def _pool_child(code: str, cwd=ROOT) -> subprocess.CompletedProcess:
  prog = textwrap.dedent("""
      import sys
      sys.path.insert(0, ROOTPATH)
      sys.path.insert(0, ROOTPATH + "/experiments")
      import importlib.util
      spec = importlib.util.spec_from_file_location("cap", ROOTPATH + "/experiments/results/compressed_adam_pool.py")
      cap = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(cap)
      """).replace("ROOTPATH", repr(str(ROOT))) + textwrap.dedent(code)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, timeout=300,
                        cwd=cwd)


def _two_runs(tmp_path, **second):
  (tmp_path / "a.json").write_text(json.dumps(RUN))
  (tmp_path / "b.json").write_text(json.dumps({**RUN, "seeds": [2, 3], **second}))


_OTHER_SETTINGS = [("lr", 0.002), ("batch", 64), ("per_tensor", True), ("residual_decay", 0.999), ("steps", 300)]


def test_load_arm_refuses_runs_with_other_settings(tmp_path):
  # runs that differ in the seeds (and in the arm lists, the Adam source) pool; another setting is refused
  # (one child process for every case: each child imports compressed_adam and its absl flags)
  (tmp_path / "a.json").write_text(json.dumps(RUN))
  (tmp_path / "ok.json").write_text(json.dumps({**RUN, "seeds": [2, 3], "compressors": ["topk", "dgc"],
                                                "adam_from": "x.json"}))
  for setting, value in _OTHER_SETTINGS:
    (tmp_path / f"b_{setting}.json").write_text(json.dumps({**RUN, "seeds": [2, 3], setting: value}))
  code = f"""
      cap.R = {str(tmp_path) + '/'!r}
      runs, seeds, A, X = cap._load_arm("t", "arm", "topk 0.01 chain", ["a.json", "ok.json"], {{}})
      assert seeds == [0, 1, 2, 3], seeds
      print("POOLED")
      for setting in {[k for k, _ in _OTHER_SETTINGS]!r}:
        try:
          cap._load_arm("t", "arm", "topk 0.01 chain", ["a.json", f"b_{{setting}}.json"], {{}})
          print("ACCEPTED", setting)
        except ValueError as e:
          print("REFUSED", setting, "|", e)
      """
  r = _pool_child(code)
  assert r.returncode == 0 and "POOLED" in r.stdout, r.stderr[-2000:]
  lines = {l.split()[1]: l for l in r.stdout.splitlines() if l.startswith(("REFUSED", "ACCEPTED"))}
  for setting, value in _OTHER_SETTINGS:
    line = lines[setting]
    assert line.startswith("REFUSED"), line
    assert f"b_{setting}.json" in line and f"{setting}={value!r}" in line and repr(RUN[setting]) in line, line


def test_pool_refuses_runs_with_other_settings(tmp_path):
  for D in ("mnist1d", "digits"):
    (tmp_path / f"{D}_a.json").write_text(json.dumps({**RUN, "dataset": D}))
    (tmp_path / f"{D}_b.json").write_text(json.dumps({**RUN, "dataset": D, "seeds": [2, 3],
                                                      "workers": 4 if D == "digits" else 8}))
  r = _pool_child(f"""
      cap.R = {str(tmp_path) + '/'!r}
      cap.POOLS["t"] = ("topk 0.01 chain", ["{{D}}_a.json", "{{D}}_b.json"], "out.json")
      cap.pool("t")
      """)
  assert r.returncode != 0 and "ValueError" in r.stderr, r.stderr[-2000:]
  assert "digits_b.json" in r.stderr and "workers=4" in r.stderr and "8" in r.stderr, r.stderr[-2000:]


def test_pool_s11_checks_its_runs_against_the_pool_it_is_paired_with(tmp_path):
  # s11's arms are paired seed by seed with the plain chain of s9's pool: the runs behind that pool must share
  # s11's settings too
  prov = {"data_sha256": "d"}
  (tmp_path / "ref.json").write_text(json.dumps({**RUN, "dataset": "mnist1d", "provenance": prov}))
  arm = "sidco 0.01 chain spread-leaky@16"
  run = {**RUN, "dataset": "mnist1d", "provenance": prov, "residual_decay": 0.99,
         "accuracy": {"adam": RUN["accuracy"]["adam"], arm: [0.8, 0.8]},
         "bytes_per_worker": {"adam": [1.0, 1.0], arm: [0.1, 0.1]}}
  (tmp_path / "s11.json").write_text(json.dumps(run))
  (tmp_path / "s9.json").write_text(json.dumps({"mnist1d": {"files": ["ref.json"], "seeds": [0, 1],
                                                            "adam": RUN["accuracy"]["adam"], "topk": [0.89, 0.9],
                                                            "provenance": prov}}))
  code = f"""
      cap.R = {str(tmp_path) + '/'!r}
      cap.POOLS["s9"] = ("topk 0.01 chain", [], "s9.json")
      cap.S11 = {{"mnist1d": ["s11.json"]}}
      cap.pool_s11()
      print("POOLED")
      """
  r = _pool_child(code)
  assert r.returncode != 0 and "ValueError" in r.stderr, r.stdout + r.stderr[-2000:]
  assert "s11.json" in r.stderr and "residual_decay=0.99" in r.stderr and "ref.json" in r.stderr, r.stderr[-2000:]
  (tmp_path / "s11.json").write_text(json.dumps({**run, "residual_decay": 1.0}))
  r = _pool_child(code)
  assert r.returncode == 0 and "POOLED" in r.stdout, r.stdout + r.stderr[-2000:]


def test_every_pool_of_the_repository_still_passes(tmp_path):
  # every pooled combination the repository uses, with the results written to a scratch copy (nothing in
  # experiments/results/ is rewritten)
  r = _pool_child(f"""
      import json, shutil
      cap.R = {str(tmp_path) + '/results/'!r}
      shutil.copytree({str(ROOT / 'experiments' / 'results')!r}, cap.R)
      checked = set()
      check = cap.check_same_settings
      def spy(base, run, names, why=""):
        checked.add(tuple(names))
        return check(base, run, names, why)
      cap.check_same_settings = spy
      for name in list(cap.POOLS):
        cap.pool(name)
      for name, fn in cap.SPECIAL.items():
        fn()
      print("ALL POOLS OK", len({{n for n in checked if n[0] != n[1]}}))
      """)
  assert r.returncode == 0 and "ALL POOLS OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])
  # every pool that puts several files together checked them (36 pairs of distinct files when written)
  assert int(r.stdout.split("ALL POOLS OK")[1].split()[0]) >= 36, r.stdout[-2000:]


def test_gradient_units_takes_exactly_one_value():
  """``--gradient_units=on,off`` trained only the first value's arms, silently; now a ValueError naming the choices
  (checked at the top of main, before any training). One value (each of the four) is accepted as before."""
  code = """
      for v in (["on", "off"], ["off", "both"], ["maybe"], []):
        try:
          print("ACCEPTED", v, ca._units_arms(v))
        except ValueError as e:
          print("REFUSED", v, "|", e)
      print("OK", [ca._units_arms([v]) for v in ("off", "on", "both", "freeze")])
      """
  prog = textwrap.dedent("""
      import sys
      sys.path.insert(0, "experiments")
      import compressed_adam as ca
      """) + textwrap.dedent(code)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = [l for l in r.stdout.splitlines() if l.startswith(("REFUSED", "ACCEPTED"))]
  assert len(lines) == 4 and all(l.startswith("REFUSED") and "--gradient_units takes one of" in l for l in lines), lines
  assert "OK [[False], [True], [False, True], ['freeze']]" in r.stdout


def test_merge_keeps_every_runs_curves_and_release_statistics(tmp_path):
  """``compressed_adam --merge`` took the per-arm curves / released-per-step / release statistics of the first run
  only (``{**base, ...}``): the other runs' arms lost them silently. Now every run's entries are kept (a DGC arm
  renamed as its accuracy is; Adam's from the first run)."""
  run = {"dataset": "digits", "steps": 600, "workers": 8, "batch": 32, "lr": 0.001, "per_tensor": False,
         "residual_decay": 1.0, "seeds": [0, 1], "compressors": ["topk"],
         "accuracy": {"adam": [0.9, 0.91], "topk 0.01 chain": [0.89, 0.9]},
         "bytes_per_worker": {"adam": [1.0, 1.0], "topk 0.01 chain": [0.1, 0.1]},
         "curve": {"adam": [[0.5, 0.9]], "topk 0.01 chain": [[0.4, 0.89]]},
         "released_per_step": {"topk 0.01 chain": [3, 4]}}
  other = {**run, "compressors": ["sidco"],
           "accuracy": {"adam": run["accuracy"]["adam"], "sidco 0.01 chain": [0.8, 0.8]},
           "bytes_per_worker": {"adam": [1.0, 1.0], "sidco 0.01 chain": [0.1, 0.1]},
           "curve": {"adam": [[0.5, 0.9]], "sidco 0.01 chain": [[0.3, 0.8]]},
           "release_stats": {"sidco 0.01 chain": {"mean_interval": 7.5}}}
  (tmp_path / "a.json").write_text(json.dumps(run))
  (tmp_path / "b.json").write_text(json.dumps(other))
  out = tmp_path / "m.json"
  prog = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, "experiments")
      import compressed_adam as ca
      ca.merge([{str(tmp_path / 'a.json')!r}, {str(tmp_path / 'b.json')!r}], {str(out)!r})
      """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  m = json.loads(out.read_text())
  assert m["curve"] == {"adam": [[0.5, 0.9]], "topk 0.01 chain": [[0.4, 0.89]], "sidco 0.01 chain": [[0.3, 0.8]]}
  assert m["released_per_step"] == {"topk 0.01 chain": [3, 4]}
  assert m["release_stats"] == {"sidco 0.01 chain": {"mean_interval": 7.5}}
