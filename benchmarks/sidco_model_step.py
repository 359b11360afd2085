"""Compression inside a whole training step: ResNet-50 forward + backward + ``optax.chain(<compressor>, adam)``.

Issue 18 asks for SIDCo "fast as users run it". ``benchmarks/sidco_tree.py`` times the optimizer alone; there
the host dispatch of a 161-leaf tree bounds every optimizer called back to back (2-14 ms per call), and the
block select's cub sorts split the jitted update's command buffer (1.4-1.7 ms of idle device time in one
isolated step, session 15). Neither says what a user training a real model pays. This script times the step a
user runs: one jitted ``train_step(params, opt_state, x, y)`` (params and optimizer state donated, fed back step
to step) of a ResNet-50 (He et al., 2016; bottleneck blocks, 25.56M parameters in 161 leaves, the same shapes as
``benchmarks.powersgd_step.resnet50_shapes``; a per-channel affine stands in for batch norm so that every
parameter is in the optimizer's tree and the step has no running statistics), on synthetic images.

Rows (``--rows``): ``adam`` (``optax.adam(1e-3)`` alone), ``topk``, ``sidco`` (the default exact search:
``sparse._EXACT_SEARCH = "auto"``, on a GPU the counting search with Pallas passes for one segment, the block select
per tensor), ``sidco_blocks`` (the block select, the default before session 37; ``_blocks`` on any sidco row),
``sidco_counts`` (``sparse._EXACT_SEARCH = "counts"``), ``sidco_pt`` (``per_tensor=True``),
``sidco_pt_counts`` (both; ``sidco_flat_counts`` / ``sidco_pt_flat_counts`` with ``flat_state=True``; any row
with a suffix ``_w<N>``, e.g. ``sidco_pt_flat_counts_w32``: traced with ``sparse._SEARCH_WAYS = sparse._PASS_WAYS = N``,
the counting search's thresholds per pass (defaults 8 for XLA's passes, 16 for the Pallas ones); ``_fpass``: one Pallas kernel per counting pass, ``sparse._COUNT_PASS =
"pallas"``; ``_pwrite`` / ``_pwriter``: the Pallas leaf writer, ``sparse._OUT_WRITE = "pallas"`` / ``"pallas_res"``
(residuals only, in place), e.g. ``sidco_counts_fpass_pwrite_w16``; ``_fkeep`` / ``_fkeepi`` / ``_fout`` on a
``flat_state`` row: ``sparse._FLAT_KEPT = "pallas"`` / ``"pallas_inplace"`` (the one-segment flat residual by
``kept_from_padded``, fresh or in place); ``_fbuf``: ``sparse._FLAT_KEPT = "buffer"`` (the residual kept padded, the
buffer itself with its sent entries zeroed by ``zero_sent``; the outputs by ``write_sent`` only with ``_fout``:
``sparse._FLAT_OUT = "pallas"``); ``_klist`` / ``_xlist``: ``sparse._KTH_LIST = "pallas"``
(the exact search's handoff between its levels in two kernels, the default since session 40) / ``"xla"``, e.g.
``sidco_flat_fkeepi_fout``; these suffixes before ``_w<N>``), each
``optax.chain(<compressor>(ratio), optax.adam(1e-3))``; ``sidco_flat`` /
``sidco_pt_flat``: ``sidco(..., flat_state=True)`` (the residual as one buffer instead of 161); ``adam_flat``:
``optax.flatten(optax.adam(1e-3))`` (Adam's moments as two buffers) and ``sidco_flat_adam_flat``: both;
``topk_flat``: ``topk(..., flat_state=True)``; ``sidco_flat_dus`` / ``sidco_pt_flat_dus`` /
``sidco_flat_dus_adam_flat``: the flat rows traced with ``sparse._FLAT_BUILD = "dus"`` (the working buffer and the
new residual written leaf by leaf in chunks, no 161-operand concatenation and no gather into the padded layout;
bitwise the same values); ``sidco_est`` / ``sidco_pt_est`` / ``sidco_flat_est``: SIDCo's estimator
(``exact=False``: the paper's closed-form threshold, no exact search; traced with the module's
``sparse._BRANCHES``), and the same rows with ``_cond`` / ``_where``: traced with ``_BRANCHES = "cond"``
(the stage ``while_loop`` and the floor's and ceiling's ``lax.cond``) / ``"where"`` (no data-dependent control
flow; the same payloads bitwise); ``sidco_est_where_noceil`` (``max_fraction=0``: no ceiling) and
``sidco_est_where_s1`` (``stages=1``: no later stages) split the branch-free estimator's cost (other payloads);
``*_cblocks`` / ``*_csearch``: the ceiling by the block select (``sparse._CEILING = "blocks"``, the GPU default
since session 24) / the bit search (the same payloads); ``sidco_est_cond_s2`` / ``sidco_est_where_s2``: ``stages=2`` (no stage loop: the
floor's and ceiling's two ``lax.cond``s alone against none); ``dgc``: ``dgc(ratio)`` (its second round on overflow steps: one ``lax.cond`` before session 24,
branch-free on GPU since; ``dgc_cond`` / ``dgc_where`` force either; ``dgc_pt*``: ``per_tensor=True``, one per
leaf, selected leaf by leaf; ``dgc_ptb*``: the same with ``sparse._BATCH_LEAVES``, the leaves of one size selected
by one vmapped call); ``recipe``: the 0.1% recipe of docs/comm.md (``density_warmup`` of ``sidco`` with ``rms_selection``: a
``lax.switch`` over its three stages every step); ``recipe_fixed``: its final stage compiled alone
(``fixed_stage=2``: the step a GPU user compiles for steps 300 on, no switch); ``recipe_fixed_flatpre``: that with
the RMS selection on the raveled gradient (``precondition=optax.flatten(rms_selection(...))``: one buffer instead of
one per leaf; the same values); ``recipe_fixed_flat``: that with ``sidco(..., flat_state=True)`` too; ``powersgd`` / ``accordion``: ``powersgd(4, clamp_rank=True)`` and
``accordion("powersgd", 4, 1, clamp_rank=True)`` (a ``lax.cond`` per compressed leaf: rank 4 or 1), ``--ratio`` unused;
``accordion_nodecide``: the same with no decision during the run (``interval=10**6``: rank 4 throughout, under its
conditionals); ``accordion_static``: that with ``regime=`` every leaf critical (rank 4, no conditional).
``--command_buffer``: the command types of every row's compile (e.g. with ``WHILE``). Per row:
- ``step_s``: wall seconds per step of ``--steps`` steps dispatched back to back (one block at the end: the
  host runs ahead of the device, as in a training loop), median of ``--repeats`` rounds;
- ``device_s`` / ``busy_s`` / ``idle_s``: device span, kernel time (the time at least one kernel ran: overlapping
  kernels counted once, since session 44; ``kernel_sum_s``, the durations summed, is what ``busy_s`` was before) and
  idle time per step from one profiler trace of ``--profile_steps`` steps run back to back (GPU only);
- ``overhead_s``: the median over rounds of this row's step time minus the ``adam`` row's in the same round
  (rounds are interleaved, so the pair ran seconds apart), with its interquartile range ``overhead_s_iqr``:
  the compressor's cost in the step; ``vs_topk``: topk's overhead over this row's.
Every row's compile shares one XLA autotune cache (``--autotune_cache``), so the model's convolutions and
GEMMs run the same algorithms in every row and differences in ``busy_s`` are the optimizer's.
Rows run interleaved round by round (every row compiled first), so drift hits all rows alike.

Usage:
  PYTHONPATH=. python benchmarks/sidco_model_step.py --out $OUT --batch 64 --dtype bfloat16
  PYTHONPATH=. python benchmarks/sidco_model_step.py --small --out /tmp/sm    # CPU smoke test
"""

from __future__ import annotations

import gzip
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import (busy_ns, device_stream_events, sparse_switches, environment, idle_clusters, parse_args, print_table,  # noqa: E402
                               write_json)
from benchmarks.hlo_attribution import hlo_file  # noqa: E402
from mlsys_jax.comm import accordion, density_warmup, powersgd, rms_selection  # noqa: E402
from mlsys_jax.comm import sparse as sp  # noqa: E402

ROWS = ("adam", "topk", "sidco", "sidco_blocks", "sidco_flat_blocks", "sidco_counts", "sidco_pt", "sidco_pt_counts", "sidco_flat", "sidco_pt_flat",
        "sidco_pbuild", "sidco_pt_pbuild", "sidco_flat_pbuild", "sidco_pt_flat_pbuild",
        "sidco_flat_counts", "sidco_pt_flat_counts",
        "adam_flat", "sidco_flat_adam_flat", "topk_adam_flat", "sidco_adam_flat", "sidco_pt_adam_flat", "topk_flat",
        "sidco_flat_dus", "sidco_pt_flat_dus",
        "sidco_flat_dus_adam_flat", "sidco_est", "sidco_pt_est", "sidco_flat_est", "sidco_est_cond",
        "sidco_pt_est_cond", "sidco_flat_est_cond", "sidco_est_where", "sidco_pt_est_where", "sidco_flat_est_where",
        "sidco_est_where_noceil", "sidco_est_where_s1", "sidco_est_where_cblocks", "sidco_est_cond_cblocks",
        "sidco_est_cond_s2", "sidco_est_where_s2", "dgc", "powersgd", "accordion", "dgc_cond", "dgc_where",
        "dgc_pt", "dgc_pt_cond", "dgc_pt_where", "sidco_est_where_csearch", "recipe", "accordion_nodecide",
        "accordion_static", "recipe_fixed", "recipe_fixed_flatpre", "recipe_fixed_flat", "dgc_ptb_cond",
        "dgc_ptb_where")


class _Affine(nn.Module):
  """Per-channel scale and bias (batch norm's parameters without its statistics)."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return x * scale.astype(x.dtype) + bias.astype(x.dtype)


class _ConvAffine(nn.Module):
  features: int
  kernel: int
  stride: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride), padding="SAME",
                use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)(x)
    return _Affine()(x)


class ResNet50(nn.Module):
  """ResNet-50 with bottleneck blocks (3, 4, 6, 3); ``div`` divides the widths (smoke tests)."""
  num_classes: int = 1000
  div: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda v: max(1, v // self.div)
    x = nn.relu(_ConvAffine(c(64), 7, 2, self.dtype)(x.astype(self.dtype)))
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
      for b in range(blocks):
        stride = 2 if (b == 0 and stage > 0) else 1
        y = nn.relu(_ConvAffine(c(width), 1, 1, self.dtype)(x))
        y = nn.relu(_ConvAffine(c(width), 3, stride, self.dtype)(y))
        y = _ConvAffine(c(4 * width), 1, 1, self.dtype)(y)
        if b == 0:
          x = _ConvAffine(c(4 * width), 1, stride, self.dtype)(x)
        x = nn.relu(x + y)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)(x).astype(jnp.float32)


def _flags(ap):
  ap.add_argument("--batch", type=int, default=None, help="images per step (default 64; 2 with --small)")
  ap.add_argument("--image", type=int, default=None, help="image side (default 224; 32 with --small)")
  ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype")
  ap.add_argument("--ratio", type=float, default=0.001, help="compressor density")
  ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {ROWS}")
  ap.add_argument("--steps", type=int, default=None, help="steps per timed round (default 20; 3 with --small)")
  ap.add_argument("--repeats", type=int, default=None, help="timed rounds per row (default 7; 2 with --small)")
  ap.add_argument("--profile_steps", type=int, default=10, help="steps in each row's profiler trace (GPU)")
  ap.add_argument("--top", type=int, default=25, help="kernels kept per row in top_kernels (by total time per step)")
  ap.add_argument("--name", default="sidco_model_step", help="JSON file name (without .json)")
  ap.add_argument("--hlo", action="store_true",
                  help="also write each row's optimized HLO (gzipped text, with the ops' source lines) next to the "
                       "JSON as <name>_<row>.hlo.txt.gz: a kernel of top_kernels is the HLO fusion of that name")
  ap.add_argument("--autotune_cache", default="auto",
                  help="directory for XLA's per-fusion autotune cache, shared by every row's compile so that "
                       "all rows run the same convolution and GEMM algorithms (else each compile autotunes on "
                       "its own and the model's kernels differ row to row); 'auto': a fresh temporary "
                       "directory; 'none': off")
  ap.add_argument("--command_buffer", default="",
                  help="comma-separated command types for every row's compile (xla_gpu_enable_command_buffer, "
                       "replacing the --xla_config's or XLA's default list), e.g. with WHILE; '' keeps it")
  ap.add_argument("--xla_config", default="jit",
                  help="per-jit XLA options of every row, a name of mlsys_jax.sched.XLA_CONFIGS (e.g. 'cmdbuf_conv': "
                       "command buffers that include the cuDNN convolutions, which cut the host's launch work)")


def _ways(row: str) -> tuple[str, int | None]:
  """``row`` without a trailing ``_w<N>`` (the counting search's ways, ``sparse._SEARCH_WAYS = N``), and N."""
  head, _, tail = row.rpartition("_w")
  if head and tail.isdigit():
    return head, int(tail)
  return row, None


def _tx(row: str, ratio: float, n_leaves: int = 161) -> optax.GradientTransformation:
  row, _ = _ways(row)
  for sw in ("_pbuild", "_xbuild", "_fpass", "_pwriter", "_pwrite", "_blocks", "_fkeepi", "_fkeep", "_fbuf", "_fout", "_klist",
             "_xlist"):
    # (switches: _switches)
    row = row.replace(sw, "")
  adam = optax.adam(1e-3)
  if row == "adam":
    return adam
  if row == "adam_flat":
    return optax.flatten(adam)
  comp = {"topk": lambda: sp.topk(ratio), "sidco": lambda: sp.sidco(ratio),
          "sidco_counts": lambda: sp.sidco(ratio), "sidco_pt": lambda: sp.sidco(ratio, per_tensor=True),
          "sidco_pt_counts": lambda: sp.sidco(ratio, per_tensor=True),
          "sidco_flat": lambda: sp.sidco(ratio, flat_state=True),
          "sidco_pt_flat": lambda: sp.sidco(ratio, per_tensor=True, flat_state=True),
          "sidco_flat_adam_flat": lambda: sp.sidco(ratio, flat_state=True),
          "topk_adam_flat": lambda: sp.topk(ratio), "sidco_adam_flat": lambda: sp.sidco(ratio),
          "sidco_pt_adam_flat": lambda: sp.sidco(ratio, per_tensor=True),
          "topk_flat": lambda: sp.topk(ratio, flat_state=True)}
  comp["sidco_flat_counts"], comp["sidco_pt_flat_counts"] = comp["sidco_flat"], comp["sidco_pt_flat"]
  comp.update({"sidco_flat_dus": comp["sidco_flat"], "sidco_pt_flat_dus": comp["sidco_pt_flat"],
               "sidco_flat_dus_adam_flat": comp["sidco_flat"],
               "sidco_est": lambda: sp.sidco(ratio, exact=False),
               "sidco_pt_est": lambda: sp.sidco(ratio, per_tensor=True, exact=False),
               "sidco_flat_est": lambda: sp.sidco(ratio, flat_state=True, exact=False)})
  for base in ("sidco_est", "sidco_pt_est", "sidco_flat_est"):
    comp[base + "_cond"] = comp[base + "_where"] = comp[base]
  comp["sidco_est_where_noceil"] = lambda: sp.sidco(ratio, exact=False, max_fraction=0.0)
  comp["sidco_est_where_s1"] = lambda: sp.sidco(ratio, exact=False, stages=1)
  comp["sidco_est_where_cblocks"] = comp["sidco_est_cond_cblocks"] = comp["sidco_est"]
  comp["sidco_est_cond_s2"] = comp["sidco_est_where_s2"] = lambda: sp.sidco(ratio, exact=False, stages=2)
  comp["dgc"] = comp["dgc_cond"] = comp["dgc_where"] = lambda: sp.dgc(ratio)
  comp["dgc_pt"] = comp["dgc_pt_cond"] = comp["dgc_pt_where"] = lambda: sp.dgc(ratio, per_tensor=True)
  comp["dgc_ptb_cond"] = comp["dgc_ptb_where"] = comp["dgc_pt"]
  comp["sidco_est_where_csearch"] = comp["sidco_est"]

  def recipe(fixed_stage=None, flat_pre=False, flat_state=False):   # the 0.1% recipe of docs/comm.md
    pre = optax.flatten if flat_pre else (lambda t: t)
    return density_warmup(lambda r: sp.sidco(r, precondition=pre(rms_selection(r < 0.01)), flat_state=flat_state),
                          ratio, steps=300, ratios=[0.01, 0.0025], fixed_stage=fixed_stage)

  comp["recipe"] = recipe
  comp["recipe_fixed"] = lambda: recipe(2)
  comp["recipe_fixed_flatpre"] = lambda: recipe(2, flat_pre=True)
  comp["recipe_fixed_flat"] = lambda: recipe(2, flat_pre=True, flat_state=True)
  comp["powersgd"] = lambda: powersgd(4, clamp_rank=True)
  comp["accordion"] = lambda: accordion("powersgd", 4, 1, clamp_rank=True)
  comp["accordion_nodecide"] = lambda: accordion("powersgd", 4, 1, clamp_rank=True, interval=10 ** 6)
  comp["accordion_static"] = lambda: accordion("powersgd", 4, 1, clamp_rank=True, interval=10 ** 6,
                                               regime=(True,) * n_leaves)
  if row not in comp:
    raise SystemExit(f"--rows: unknown row {row!r}; use some of {ROWS}")
  return optax.chain(comp[row](), optax.flatten(adam) if row.endswith("_adam_flat") else adam)


def _switches(row: str) -> dict:
  """The ``mlsys_jax.comm.sparse`` module switches a row is traced with (they are read at trace time)."""
  row, ways = _ways(row)
  return {"_SEARCH_WAYS": ways or sp._SEARCH_WAYS, "_PASS_WAYS": ways or sp._PASS_WAYS,
          "_EXACT_SEARCH": "counts" if "_counts" in row else "blocks" if "_blocks" in row else sp._EXACT_SEARCH,
          "_COUNT_PASS": "pallas" if "_fpass" in row else sp._COUNT_PASS,
          "_OUT_WRITE": "pallas_res" if "_pwriter" in row else "pallas" if "_pwrite" in row else sp._OUT_WRITE,
          "_FLAT_BUILD": "dus" if "_dus" in row else sp._FLAT_BUILD,
          "_FLAT_KEPT": ("pallas_inplace" if "_fkeepi" in row else "pallas" if "_fkeep" in row else
                         "buffer" if "_fbuf" in row else sp._FLAT_KEPT),
          "_FLAT_OUT": "pallas" if "_fout" in row else sp._FLAT_OUT,
          "_KTH_LIST": "pallas" if "_klist" in row else "xla" if "_xlist" in row else sp._KTH_LIST,
          "_SUM_BUILD": "pallas" if "_pbuild" in row else "xla" if "_xbuild" in row else sp._SUM_BUILD,
          "_BRANCHES": ("cond" if "_est_cond" in row or row.endswith("_cond") else
                        "where" if "_est_where" in row or row.endswith("_where") else sp._BRANCHES),
          "_CEILING": "blocks" if row.endswith("_cblocks") else "search" if row.endswith("_csearch") else sp._CEILING,
          "_BATCH_LEAVES": True if row.startswith("dgc_ptb") else False if row.startswith("dgc_pt") else sp._BATCH_LEAVES}


def _make_step(model, tx, switches: dict, options: dict | None = None):
  """The jitted step (params, opt_state, x, y) -> (params, opt_state, loss); ``switches``: the
  ``mlsys_jax.comm.sparse`` attributes in force while it traces (:func:`_switches`)."""

  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  jitted = jax.jit(step, donate_argnums=(0, 1))

  def compile_with(*args):
    with sparse_switches(switches):
      return jitted.lower(*args).compile(dict(options or {}))
  return compile_with


def _use_autotune_cache(spec: str) -> str | None:
  """Point XLA's per-fusion autotune cache at one directory (before the backend starts): the first compile
  autotunes each convolution / GEMM, every later compile of the same instruction reads its choice."""
  if spec == "none":
    return None
  d = tempfile.mkdtemp(prefix="autotune_") if spec == "auto" else spec
  os.makedirs(d, exist_ok=True)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_gpu_per_fusion_autotune_cache_dir={d}").strip()
  return d


def _kernel_class(name: str) -> str:
  """A coarse class of a GPU kernel from its name: XLA's generated kernels first (``loop_*`` / ``input_*`` fusions,
  as reduce / scatter / fusion, so that e.g. ``loop_convert_fusion`` is not taken for a convolution; XLA's Triton
  GEMM fusions, ``gemm_fusion_dot*`` / ``triton_gemm*``, as gemm), then library kernels (cuDNN convolutions, cub
  sorts, cuBLAS / cuBLASLt GEMMs, copies)."""
  n = name.lower()
  if n.startswith(("gemm_fusion", "triton_gemm")):
    return "gemm"
  if n.startswith(("loop_", "input_", "wrapped_")) or "fusion" in n:
    if "reduce" in n or "reduction" in n:
      return "reduce"
    return "scatter" if "scatter" in n else "fusion"
  # cub's kernels by the namespace "cub::": "cublasLt::splitKreduce_kernel" (a GEMM's split-K reduction) holds "cub"
  # too (sessions before 28 matched "cub" and counted its ~0.13 ms per f32 ResNet-50 step, in every row, as "sort")
  for cls, keys in (("conv", ("cudnn", "xmma", "implicit", "wgrad", "dgrad", "conv")),
                    ("sort", ("radix", "sort", "cub::")), ("gemm", ("gemm", "cutlass", "nvjet", "cublas")),
                    ("copy", ("copy", "memcpy", "memset"))):
    if any(k in n for k in keys):
      return cls
  return "other"


def _kernel_breakdown(events, steps: int, top: int = 25):
  """Per step: kernel seconds by class, and the ``top`` kernel names by total time as ``(name, s, count)``."""
  by_class, by_name = {}, {}
  for e in events:
    cls = _kernel_class(e[3])
    by_class[cls] = by_class.get(cls, 0.0) + e[2] * 1e-9 / steps
    t, c = by_name.get(e[3], (0.0, 0))
    by_name[e[3]] = (t + e[2] * 1e-9 / steps, c + 1)
  names = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
  return by_class, [(k[:120], t, c / steps) for k, (t, c) in names]


def _class_detail(events, steps: int, cls: str = "copy", top: int = 12):
  """Per step: the number of kernels of each class, and the ``top`` kernels of class ``cls`` by count as
  ``(name, s, count)``: the small kernels (copies, memsets) that ``top_kernels``, ranked by time, leaves out.

  >>> counts, names = _class_detail([(0, 1, 2000, "copy_12"), (1, 2, 1000, "memcpy32_post"),
  ...                                (2, 3, 1000, "memcpy32_post"), (3, 4, 4000, "loop_add_fusion")], 1)
  >>> counts, [(n, round(t * 1e9), c) for n, t, c in names]
  ({'copy': 3.0, 'fusion': 1.0}, [('memcpy32_post', 2000, 2.0), ('copy_12', 2000, 1.0)])
  """
  counts, by_name = {}, {}
  for e in events:
    c = _kernel_class(e[3])
    counts[c] = counts.get(c, 0.0) + 1.0 / steps
    if c == cls:
      t, n = by_name.get(e[3], (0.0, 0))
      by_name[e[3]] = (t + e[2] * 1e-9 / steps, n + 1)
  names = sorted(by_name.items(), key=lambda kv: (-kv[1][1], -kv[1][0], kv[0]))[:top]
  return dict(sorted(counts.items())), [(k[:120], t, n / steps) for k, (t, n) in names]


def _profile(events, steps: int) -> dict:
  """Per step, from the GPU events ``(start_ns, end_ns, duration_ns, name)`` of ``steps`` steps run back to back:
  ``device_s`` (first start to last end), ``busy_s`` (time with at least one event running: the union of the
  events' intervals, so kernels that overlap are not counted twice), ``idle_s`` (``device_s - busy_s``, >= 0),
  ``kernel_sum_s`` (the events' durations summed: more than ``busy_s`` where they overlap; what ``busy_s`` was
  before session 44 and what ``kernel_classes_s`` adds up to), ``kernels`` and ``clusters`` (runs of events
  separated by more than 5 ms of idle device: 1 when the host kept ahead).

  >>> p = _profile([(0, 10, 10, "a"), (5, 15, 10, "b"), (20, 30, 10, "c")], 1)
  >>> [round(p[k] * 1e9) for k in ("device_s", "busy_s", "idle_s", "kernel_sum_s")], p["kernels"], p["clusters"]
  ([30, 25, 5, 30], 3.0, 1)
  """
  cl = idle_clusters(sorted(events), 5e6)   # one cluster: the steps ran back to back
  span = max(e[1] for e in events) - min(e[0] for e in events)
  busy = busy_ns(events)
  return {"device_s": span * 1e-9 / steps, "busy_s": busy * 1e-9 / steps, "idle_s": (span - busy) * 1e-9 / steps,
          "kernel_sum_s": sum(e[2] for e in events) * 1e-9 / steps, "busy_measure": "union",
          "kernels": len(events) / steps, "clusters": len(cl)}


def _summarize(out: list) -> None:
  """Add each row's cost over the ``adam`` row, in place: ``overhead_s`` (median over rounds of the row's step time
  minus Adam's in the same round, from ``step_s_all``; rounds are interleaved, so a pair ran seconds apart and drift
  cancels), its interquartile range ``overhead_s_iqr``, ``busy_overhead_s`` (profiled kernel time; with
  ``kernel_sum_overhead_s``, the same on the summed durations, and ``device_overhead_s`` on the device span, where
  the JSON has ``kernel_sum_s``), ``classes_over_adam_s`` (the summed kernel time of each class minus Adam's),
  ``copy_over_adam_s`` and ``noncopy_overhead_s`` (every class but ``copy``: the kernels a compressor adds, without
  crediting it the ~0.24 ms of copy kernels that Adam's own step runs and no compressor row of session 43 does),
  ``vs_topk`` / ``busy_vs_topk`` / ``noncopy_vs_topk`` (``topk``'s cost over this row's, where this row's is
  positive), and, where an ``adam_flat`` row ran (``optax.flatten(optax.adam)``: the faster Adam, without plain Adam's
  per-leaf copies), ``over_adam_flat_s`` (median over rounds of the paired step difference) and
  ``kernels_over_adam_flat_s`` (the summed kernel time minus ``adam_flat``'s)."""
  flat = next((o for o in out if o["row"] == "adam_flat"), None)
  if flat is not None:   # the faster Adam a user can pick: optax.flatten(optax.adam(lr)), no per-leaf copies
    for o in out:
      diffs = np.asarray(o["step_s_all"]) - np.asarray(flat["step_s_all"])
      o["over_adam_flat_s"] = float(np.median(diffs))
      if "kernel_classes_s" in o and "kernel_classes_s" in flat:
        o["kernels_over_adam_flat_s"] = sum(o["kernel_classes_s"].values()) - sum(flat["kernel_classes_s"].values())
  base = next((o for o in out if o["row"] == "adam"), None)
  if base is None:
    return
  for o in out:
    diffs = np.asarray(o["step_s_all"]) - np.asarray(base["step_s_all"])
    o["overhead_s"] = float(np.median(diffs))
    o["overhead_s_iqr"] = [float(np.percentile(diffs, 25)), float(np.percentile(diffs, 75))]
    o["overhead_s_of_medians"] = o["step_s"] - base["step_s"]
    if "busy_s" in o and "busy_s" in base:
      o["busy_overhead_s"] = o["busy_s"] - base["busy_s"]
    if "kernel_sum_s" in o and "kernel_sum_s" in base:   # (the summed durations: busy_overhead_s before session 44)
      o["kernel_sum_overhead_s"] = o["kernel_sum_s"] - base["kernel_sum_s"]
      o["device_overhead_s"] = o["device_s"] - base["device_s"]   # (the span: idle the host left included)
    if "kernel_classes_s" in o and "kernel_classes_s" in base:
      mine, adam = o["kernel_classes_s"], base["kernel_classes_s"]
      o["classes_over_adam_s"] = {k: mine.get(k, 0.0) - adam.get(k, 0.0) for k in sorted(set(mine) | set(adam))}
      o["copy_over_adam_s"] = o["classes_over_adam_s"].get("copy", 0.0)
      o["noncopy_overhead_s"] = sum(v for k, v in o["classes_over_adam_s"].items() if k != "copy")
  tk = next((o for o in out if o["row"] == "topk"), None)
  for o in out:
    if tk is not None and o["row"] not in ("adam", "topk") and o["overhead_s"] > 0:
      o["vs_topk"] = tk["overhead_s"] / o["overhead_s"]
    if tk is not None and o["row"] not in ("adam", "topk") and o.get("busy_overhead_s", 0) > 0:
      o["busy_vs_topk"] = tk["busy_overhead_s"] / o["busy_overhead_s"]
    if tk is not None and o["row"] not in ("adam", "topk") and o.get("noncopy_overhead_s", 0) > 0 and \
        "noncopy_overhead_s" in tk:
      o["noncopy_vs_topk"] = tk["noncopy_overhead_s"] / o["noncopy_overhead_s"]


def main():
  args = parse_args(__doc__, _flags)
  cache = _use_autotune_cache(args.autotune_cache)
  small = args.small
  batch = args.batch or (2 if small else 64)
  image = args.image or (32 if small else 224)
  steps = args.steps or (3 if small else 20)
  repeats = args.repeats or (2 if small else 7)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  rows = [r for r in args.rows.split(",") if r]
  for r in rows:
    _tx(r, args.ratio)   # a typo fails before any compile
  from mlsys_jax.sched import XLA_CONFIGS
  if args.xla_config not in XLA_CONFIGS:
    raise SystemExit(f"--xla_config: unknown {args.xla_config!r}; use one of {sorted(XLA_CONFIGS)}")
  options = XLA_CONFIGS[args.xla_config] if jax.default_backend() == "gpu" else {}
  if args.command_buffer and jax.default_backend() == "gpu":
    options = {**options, "xla_gpu_enable_command_buffer": args.command_buffer}
  model = ResNet50(num_classes=1000, div=8 if small else 1, dtype=dtype)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (batch, image, image, 3), jnp.float32)
  y = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, 1000)
  params0 = model.init(jax.random.fold_in(key, 2), x[:1])["params"]
  leaves = jax.tree_util.tree_leaves(params0)
  n_params = int(sum(v.size for v in leaves))
  meta = {"env": environment(), "argv": sys.argv[1:], "autotune_cache": cache, "xla_config": args.xla_config,
          "compiler_options": {k: str(v) for k, v in options.items()}, "batch": batch, "image": image, "dtype": args.dtype, "ratio": args.ratio,
          "steps": steps, "repeats": repeats, "n_params": n_params, "n_leaves": len(leaves)}
  print(f"ResNet-50 (div {8 if small else 1}): {len(leaves)} leaves, {n_params:,} parameters; batch {batch}, "
        f"{image}x{image}, {args.dtype}", flush=True)

  # compile every row first, each with its own copy of the state (donated step to step)
  prog, state = {}, {}
  for r in rows:
    tx = _tx(r, args.ratio, len(leaves))
    p = jax.tree_util.tree_map(jnp.copy, params0)
    with sparse_switches(_switches(r)):   # (at init too: _FLAT_KEPT = "buffer" keeps the residual in a padded layout)
      s = jax.tree_util.tree_map(jnp.copy, tx.init(p))   # distinct buffers (donation)
    t0 = time.perf_counter()
    prog[r] = _make_step(model, tx, _switches(r), options)(p, s, x, y)
    state[r] = [p, s]
    if args.hlo:
      os.makedirs(args.out, exist_ok=True)
      with gzip.open(hlo_file(args.out, args.name, r), "wt") as f:
        f.write(prog[r].as_text())
    print(f"compiled {r} in {time.perf_counter() - t0:.1f} s", flush=True)

  def run(r, n):
    p, s = state[r]
    loss = None
    for _ in range(n):
      p, s, loss = prog[r](p, s, x, y)
    state[r] = [p, s]
    return loss

  for r in rows:
    jax.block_until_ready(run(r, 2))   # warm-up
  walls = {r: [] for r in rows}
  for _ in range(repeats):   # interleaved rounds
    for r in rows:
      t0 = time.perf_counter()
      jax.block_until_ready(run(r, steps))
      walls[r].append((time.perf_counter() - t0) / steps)
  out = []
  for r in rows:
    row = {"row": r, "step_s": float(np.median(walls[r])), "step_s_all": walls[r],
           "loss_finite": bool(np.isfinite(float(run(r, 1))))}
    if jax.default_backend() == "gpu":
      try:
        evs = device_stream_events(lambda: jax.block_until_ready(run(r, args.profile_steps)))
        row.update(_profile(evs, args.profile_steps))
        row["kernel_classes_s"], row["top_kernels"] = _kernel_breakdown(evs, args.profile_steps, args.top)
        row["kernel_class_counts"], row["copy_kernels"] = _class_detail(evs, args.profile_steps)
      except Exception as e:  # diagnostics: never fatal
        row["device_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    out.append(row)
  _summarize(out)
  print_table(out, ["row", "step_s", "overhead_s", "overhead_s_iqr", "vs_topk", "device_s", "busy_s", "idle_s", "kernels",
                    "busy_overhead_s", "busy_vs_topk", "kernel_sum_s", "kernel_sum_overhead_s", "device_overhead_s",
                    "noncopy_overhead_s", "noncopy_vs_topk", "over_adam_flat_s", "kernels_over_adam_flat_s"])
  write_json(args.out, args.name, {**meta, "rows": out})


if __name__ == "__main__":
  main()
