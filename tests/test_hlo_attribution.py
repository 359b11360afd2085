"""benchmarks/hlo_attribution.py: profiled kernels charged to the library function that emitted them."""

import jax
import jax.numpy as jnp

from benchmarks import hlo_attribution as ha
from mlsys_jax.comm import sparse


def _hlo():
  tx = sparse.sidco(0.01)
  g = {"a": jnp.linspace(-1.0, 1.0, 4096), "b": jnp.cos(jnp.arange(8192.0))}
  st = tx.init(g)
  return jax.jit(tx.update).lower(g, st).compile().as_text()


def test_fusions_are_charged_to_their_library_function_and_the_rest_is_named():
  text = _hlo()
  names, frames = ha.instruction_frames(text)
  assert frames and names
  fused = [n for n in names if "fusion" in n]
  # every fusion of the update has a frame in sparse.py: none is charged outside the package
  groups = ha.attribute([(n.replace(".", "_"), 1e-6, 1) for n in fused], text)
  assert abs(sum(groups.values()) - len(fused) * 1e-6) < 1e-9   # every kernel charged once
  assert all(g.startswith("sparse.py:") for g in groups), groups
  assert any("update_fn" in g or "_sidco_segments" in g or "_segmented_step" in g for g in groups)
  # kernels with no instruction of that name, and the thunks XLA names itself
  extra = ha.attribute([("void cub::DeviceRadixSortOnesweepKernel", 2e-6, 1), ("Memset 3", 1e-6, 1),
                        ("MemcpyD2D", 3e-6, 1), ("no_such_fusion_9", 4e-6, 1)], text)
  assert extra == {"cub sort": 2e-6, "memset": 1e-6, "memcpy": 3e-6, "unmatched": 4e-6}
  by_line = ha.attribute([(fused[0].replace(".", "_"), 1e-6, 1)], text, by="line")
  (key,) = by_line
  assert key.startswith("sparse.py:") and key.rsplit(":", 1)[1].isdigit()


def test_hlo_file_names_a_row_as_the_benchmarks_write_it():
  assert ha.hlo_file("out", "run", "sidco_pt_flat") == "out/run_sidco_pt_flat.hlo.txt.gz"
  assert ha.hlo_file("out", "run", "sidco(0.001, per_tensor=True)") == "out/run_sidco_0.001__per_tensor_True_.hlo.txt.gz"


def test_main_single_reads_the_single_updates_kernels_and_hlo(tmp_path, capsys, monkeypatch):
  """``--single`` (sidco_tree.py --single --hlo rows): the row's single_top_kernels and busy time against the HLO
  written as ``<name>_<row>@single``; without it the loop's top_kernels and HLO."""
  import gzip
  import json
  import sys
  text = _hlo()
  fused = [n.replace(".", "_") for n in ha.instruction_frames(text)[0] if "fusion" in n][:2]
  row = {"method": "sidco(0.001)", "busy_s": 9e-6, "top_kernels": [(fused[0], 9e-6, 1)],
         "single_busy_s": 5e-6, "single_top_kernels": [(fused[1], 3e-6, 1), ("Memset 3", 2e-6, 1)]}
  (tmp_path / "r.json").write_text(json.dumps({"rows": [row]}))
  for suffix in ("", "@single"):
    with gzip.open(ha.hlo_file(str(tmp_path), "r", "sidco(0.001)" + suffix), "wt") as f:
      f.write(text)
  monkeypatch.setattr(sys, "argv", ["hlo_attribution.py", str(tmp_path / "r.json"), "--single"])
  ha.main()
  out = capsys.readouterr().out
  assert "busy 0.005 ms, attributed 0.005 ms" in out and "memset" in out
  monkeypatch.setattr(sys, "argv", ["hlo_attribution.py", str(tmp_path / "r.json")])
  ha.main()
  out = capsys.readouterr().out
  assert "busy 0.009 ms, attributed 0.009 ms" in out and "memset" not in out
