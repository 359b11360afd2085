"""Per-block scaled FP8 / int8 GEMM for Hopper as a Pallas Mosaic GPU kernel (wgmma, TMA, warp specialization).

The datapath is VS-Quant's (Dai et al., "VS-Quant: Per-vector Scaled Quantization for Accurate Low-Precision
Neural Network Inference", MLSys 2021, Sec. 3, Fig. 3): a length-K dot product is cut into K/V vectors, each
vector pair gives a partial sum on the tensor cores, the partial sum is multiplied by the product of the two
vector scales and accumulated in float32:

    out[m, n] = sum_g  sa[m, g] * sw[g, n] * P_g[m, n],     P_g = A[:, g*V:(g+1)*V] @ W[g*V:(g+1)*V, :]

``P_g`` is exact int32 for int8 codes and the tensor core's float32 sum for FP8 (E4M3) codes. This is also the
fine-grained-scaled FP8 GEMM deployed on Hopper (DeepSeek's DeepGEMM: 1 x 128 activation and 128 x 128 weight
scale blocks, partial sums promoted to float32 once per 128-element K block).

How the kernel reaches the tensor cores (what the Triton kernel of :mod:`._pallas_gemm` cannot express):

- one CTA computes a ``W * tile_m x tile_n`` output tile with ``W`` (2 or 3) *compute warpgroups* (``tile_m``
  rows each) and one *memory warpgroup* that streams the K blocks of A (``W * tile_m x V``), W (``tile_n x V``, K-major as
  Hopper's 8-bit ``wgmma`` requires) and the two scale vectors into a ring of ``stages`` shared-memory slots
  with TMA (``plgpu.emit_pipeline_warp_specialized``);
- per K block each compute warpgroup issues ``wgmma`` into a fresh register accumulator, waits for it, and
  folds it into its float32 accumulator with ``acc += P * sa[:, None] * sw[None, :]``. While one warpgroup
  runs this epilogue on the CUDA cores another's ``wgmma`` keeps the tensor cores busy (the warpgroups are
  scheduled independently), which is how the per-block promotion is hidden; with two K blocks per pipeline step
  a warpgroup also folds the first block while its second is on the tensor cores. ``persistent=True`` keeps
  one CTA per SM looping over output tiles;
- the float32 tile leaves through shared memory with a TMA store.

Shapes must be multiples of the tile (``M % (W * tile_m)``, ``N % tile_n``, ``K % V``): the public wrapper
(:func:`scaled_matmul`) pads. Only NVIDIA Hopper (sm_90a) runs it; :func:`available` says whether this
process can (a GPU of compute capability 9.x and a jax with Pallas Mosaic GPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from mlsys_jax._compat import run_outside_traces

__all__ = ["MgpuConfig", "available", "default_config", "fp8_block_quantize", "kernel_self_test", "scaled_matmul",
           "scaled_matmul_padded", "KINDS", "VECTOR_SIZES"]

KINDS = ("fp8", "int8")
VECTOR_SIZES = {"fp8": (128,), "int8": (64, 128)}


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
  """Launch parameters of :func:`scaled_matmul_padded`.

  Attributes:
    tile_m: rows per compute warpgroup (a multiple of 64); the CTA covers ``compute_wgs * tile_m`` rows.
    tile_n: output columns per CTA (a multiple of 8, at most 256).
    stages: shared-memory slots of the TMA ring (pipeline steps in flight).
    grid_group: row tiles visited together (tile order for L2 reuse of the weight tiles).
    blocks_per_step: K blocks per pipeline step (1 or 2). With 2 a warpgroup issues both blocks' ``wgmma``
      into two accumulators, waits only for the first (``wait_n=1``) and scales it while the second is still
      on the tensor cores, so half the epilogues also overlap inside one warpgroup.
    compute_wgs: compute warpgroups per CTA (2 or 3; with 3 a third warpgroup's products can run while two
      scale theirs, at ~150 registers per thread).
    cluster_m: 1, or 2: CTAs in clusters of two along M that share every weight block through a TMA multicast
      (one L2 read of each W tile per pair instead of two).
    persistent: one CTA (one cluster with ``cluster_m=2``) per SM loops over the output tiles (grouped order,
      ``plgpu.nd_loop``) with one set of pipeline buffers, so the memory warpgroup loads tile ``t + 1``'s first
      blocks and the TMA store of tile ``t`` drains while the compute warpgroups run tile ``t + 1`` (no CTA
      launch and pipeline fill per tile).
  """
  tile_m: int = 64
  tile_n: int = 128
  stages: int = 4
  grid_group: int = 8
  blocks_per_step: int = 1
  compute_wgs: int = 2
  cluster_m: int = 1
  persistent: bool = False

  def __post_init__(self):
    for name, allowed in (("cluster_m", (1, 2)), ("compute_wgs", (2, 3)), ("blocks_per_step", (1, 2)),
                          ("persistent", (False, True))):
      if getattr(self, name) not in allowed:
        raise ValueError(f"MgpuConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if self.tile_m % 64 or not 8 <= self.tile_n <= 256 or self.tile_n % 8:
      raise ValueError(f"MgpuConfig needs tile_m a multiple of 64 and tile_n a multiple of 8 in [8, 256], got "
                       f"tile_m={self.tile_m}, tile_n={self.tile_n}")
    if self.stages < 1 or self.grid_group < 1:
      raise ValueError(f"MgpuConfig needs stages >= 1 and grid_group >= 1, got stages={self.stages}, "
                       f"grid_group={self.grid_group}")


def default_config(kind: str, vector_size: int) -> MgpuConfig:
  """The launch parameters :func:`scaled_matmul` uses when none are given (one configuration for both kinds and
  every vector size), from H200 runs at 8192^3 (``benchmarks/results/vsquant_mgpu_h200_s*.json``; docs/quant.md
  has the tables): 128 x 128 CTA tiles (two warpgroups of 64 rows), two K blocks per pipeline step, 2 stages,
  persistent CTAs (one per SM). Persistent against the same kernel launched per tile, two runs: FP8 1.188 / 1.265
  ms vs 1.286 / 1.330 ms, int8 V=64 2.085 / 2.106 vs 2.254 / 2.185 ms (``_s11c`` / ``_s12a``; int8 V=128 1.391 vs
  1.447 ms in ``_s12a``). Two blocks per step against one (4 stages): FP8 1.248 / 1.286 vs 1.410 / 1.396 ms
  (``_s11a`` / ``_s11c``). Larger tiles, three warpgroups, clusters, a one-block-late fold and other int32 ->
  float32 conversions were slower."""
  del kind, vector_size
  return MgpuConfig(stages=2, blocks_per_step=2, persistent=True)


def available() -> bool:
  """Whether this process can run the kernel: a Hopper GPU (compute capability 9.x) as the default backend
  and ``jax.experimental.pallas.mosaic_gpu`` importable."""
  try:
    import jax.experimental.pallas.mosaic_gpu  # noqa: F401
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")
  except Exception:  # noqa: BLE001 - any import/backend problem means "not here"
    return False


def _num_sms() -> int:
  """Streaming multiprocessors of the default device (one persistent CTA each); 132 (H100 / H200 SXM) where the
  backend does not say (CPU lowering, the interpreter)."""
  try:
    return int(getattr(jax.devices()[0], "core_count", 0)) or 132
  except Exception:  # noqa: BLE001
    return 132


def _interpret_params():
  """Pallas's Mosaic GPU interpreter parameters (a private module in jax 0.10; the interpreter runs the kernel on
  the CPU, simulating shared memory, barriers and TMA)."""
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()


def scaled_matmul_padded(a_codes: jax.Array, sa_t: jax.Array, w_nk: jax.Array, sw: jax.Array, *,
                         vector_size: int, config: MgpuConfig = MgpuConfig(), w_tile_scales: bool = False,
                         promote: bool = True, interpret: bool = False) -> jax.Array:
  """The kernel on tile-aligned operands: ``a_codes (M, K)``, ``sa_t (K/V, M)`` float32 (the activation vector
  scales, transposed so one K block's scales are contiguous), ``w_nk (N, K)`` (weights K-major), ``sw (K/V, N)``
  float32; returns float32 ``(M, N)``. Use :func:`scaled_matmul` for the checked, padded entry point.

  ``w_tile_scales=True``: every ``tile_n`` columns of ``sw`` repeat one value per K block (weight scales per
  ``V x tile_n`` block, DeepGEMM's 128 x 128 blocks); the kernel reads the tile's first column and a block's fold
  is one fused multiply-add per element, ``acc + P * (sa * sw)``, instead of ``acc + (P * sa) * sw``.
  ``promote=False`` is a diagnostic, not a GEMM of this module: the tensor cores accumulate all K blocks with no
  scale (the product of the codes): the same pipeline without the per-block epilogue, but no ceiling of it (the
  one accumulator chains every ``wgmma`` on the previous one; H200: slower than ``w_tile_scales=True``).
  ``interpret=True`` runs Pallas's Mosaic GPU interpreter (CPU; slow, for tests on small shapes)."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  m, k = a_codes.shape
  n = w_nk.shape[0]
  v = vector_size
  tm, tn = config.tile_m, config.tile_n
  wgs, bps, cm, persistent = config.compute_wgs, config.blocks_per_step, config.cluster_m, config.persistent
  cta_m = wgs * tm
  acc_dtype = jnp.float32 if a_codes.dtype == jnp.float8_e4m3fn else jnp.int32
  swizzle = plgpu.find_swizzle(v * 8)   # one K block per swizzle row group: blocks slice on tiles
  transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
  out_swizzle = plgpu.find_swizzle(tn * 32)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // 4)), plgpu.SwizzleTransform(out_swizzle))
  m_tiles, n_tiles, k_steps = m // cta_m, n // tn, k // (v * bps)
  stages = min(config.stages, k_steps)   # a ring longer than the K loop never fills (it would wait forever)
  m_units = m_tiles // cm                # row tiles, or pairs of row tiles (one cluster) with cluster_m=2
  group = max(1, min(config.grid_group, m_units))
  n_ctas = m_units * n_tiles             # CTAs (clusters with cluster_m=2) of the grid
  if persistent:
    n_ctas = min(n_ctas, max(1, _num_sms() // cm))

  def kernel(a_gmem, sa_gmem, w_gmem, sw_gmem, out_gmem, out_smem):
    wg = lax.axis_index("wg")

    def run_tile(lin, allocations):
      """One CTA output tile (linear index ``lin`` in the grouped order) through the K pipeline."""
      # grouped tile order: `group` row tiles share each weight column tile while it is in L2
      per_group = group * n_tiles
      first_m = (lin // per_group) * group
      rows_here = jnp.minimum(m_units - first_m, group)
      mi = first_m + (lin % per_group) % rows_here
      ni = (lin % per_group) // rows_here
      if cm > 1:
        mi = mi * cm + lax.axis_index("cluster")
      m_sl, n_sl, wg_rows = pl.ds(mi * cta_m, cta_m), pl.ds(ni * tn, tn), pl.ds(wg * tm, tm)

      def store(acc):
        if persistent:   # the previous tile's store had this tile's K loop to drain
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        out_smem.at[wg][...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[m_sl, n_sl].at[wg_rows])
        if not persistent:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

      def compute_context(eval_pipeline):
        if promote or interpret:   # the carry is the float32 accumulator (registers)
          acc0 = jnp.zeros((tm, tn), jnp.float32)
          store(eval_pipeline(acc0 if interpret else plgpu.layout_cast(acc0, plgpu.Layout.WGMMA)))
          return

        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), acc_dtype))
        def _unscaled(acc_ref):   # diagnostic: one accumulator through every K block
          eval_pipeline(acc_ref)
          store(acc_ref[...].astype(jnp.float32))

      def fold(acc, part, j, sa_smem, sw_smem):
        """acc + P * sa[:, None] * sw[None, :] for K block j of the step (P: its tensor-core sum)."""
        sa_ref, sw_ref = sa_smem.at[j], sw_smem.at[j]
        if interpret:   # the interpreter has no rule for plgpu.load; plain reads give the same values
          sa = sa_ref[wg_rows]
        else:
          sa = plgpu.load(sa_ref.at[wg_rows], (), layout=plgpu.Layout.WGMMA.reduce(1))
        part = part.astype(jnp.float32)
        if w_tile_scales:   # one scale for the tile's columns: one multiply-add per element
          return acc + part * lax.broadcast_in_dim(sa * sw_ref[0], (tm, tn), [0])
        sw = sw_ref[...] if interpret else plgpu.load(sw_ref, (), layout=plgpu.Layout.WGMMA.reduce(0))
        part = part * lax.broadcast_in_dim(sa, (tm, tn), [0])
        return acc + part * lax.broadcast_in_dim(sw, (tm, tn), [1])

      def block_operands(a_smem, w_smem, j):
        if bps == 1:
          return a_smem.at[wg_rows], plgpu.transpose_ref(w_smem, (1, 0))
        return (a_smem.at[wg_rows, pl.ds(j * v, v)],
                plgpu.transpose_ref(w_smem.at[:, pl.ds(j * v, v)], (1, 0)))

      def body(_, a_smem, sa_smem, w_smem, sw_smem, acc):
        if interpret:   # the interpreter cannot feed a transposed ref to wgmma: the same products by jnp.dot
          for j in range(bps):
            part = jnp.dot(a_smem[wg_rows, pl.ds(j * v, v)], w_smem[:, pl.ds(j * v, v)].T,
                           preferred_element_type=acc_dtype)
            acc = fold(acc, part, j, sa_smem, sw_smem) if promote else acc + part.astype(jnp.float32)
          return acc
        if not promote:   # (acc: the ACC reference)
          for j in range(bps):
            plgpu.wgmma(acc, *block_operands(a_smem, w_smem, j))
          plgpu.wgmma_wait(0)
          return acc
        if bps == 1:
          def mma(p_ref):
            plgpu.wgmma(p_ref, *block_operands(a_smem, w_smem, 0))
            return p_ref[...]
          return fold(acc, pl.run_scoped(mma, plgpu.ACC((tm, tn), acc_dtype)), 0, sa_smem, sw_smem)

        def mma2(p0, p1):
          plgpu.wgmma(p0, *block_operands(a_smem, w_smem, 0))
          plgpu.wgmma(p1, *block_operands(a_smem, w_smem, 1))
          acc1 = fold(acc, plgpu.wgmma_accumulator_load(p0, wait_n=1), 0, sa_smem, sw_smem)
          return fold(acc1, p1[...], 1, sa_smem, sw_smem)
        return pl.run_scoped(mma2, plgpu.ACC((tm, tn), acc_dtype), plgpu.ACC((tm, tn), acc_dtype))

      pipeline = make_pipeline(body, compute_context)
      pipeline(a_gmem.at[m_sl], sa_gmem.at[:, m_sl], w_gmem.at[n_sl], sw_gmem.at[:, n_sl], **(
          {"allocations": allocations} if allocations is not None else {}))

    if not persistent:
      run_tile(lax.axis_index("tiles"), None)
      return
    ignore = lambda *_, **__: None   # the allocations do not depend on the body
    allocs = make_pipeline(ignore, ignore).get_allocations(a_gmem.at[pl.ds(0, cta_m)], sa_gmem.at[:, pl.ds(0, cta_m)],
                                                           w_gmem.at[pl.ds(0, tn)], sw_gmem.at[:, pl.ds(0, tn)])

    @functools.partial(pl.run_scoped, allocations=allocs, collective_axes="wg")
    def _scope(allocations):
      @plgpu.nd_loop((m_units * n_tiles,), collective_axes="tiles")   # the CTAs of a cluster: the same tiles
      def _tiles(info):
        run_tile(info.index[0], allocations)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last tile's store

  def make_pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_steps,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((cta_m, v * bps), lambda s: (0, s), transforms=transforms),
            plgpu.BlockSpec((bps, cta_m), lambda s: (s, 0)),
            plgpu.BlockSpec((tn, v * bps), lambda s: (0, s), transforms=transforms,
                            collective_axes=("cluster",) if cm > 1 else ()),
            plgpu.BlockSpec((bps, tn), lambda s: (s, 0)),
        ],
        wg_axis="wg",
        num_compute_wgs=wgs,
        max_concurrent_steps=stages,
        compute_context=compute_context,
    )

  f = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m, n), jnp.float32),
      scratch_types=[plgpu.SMEM((wgs, tm, tn), jnp.float32, transforms=out_transforms)],
      grid=(n_ctas,),
      grid_names=("tiles",),
      **({"cluster": (cm,), "cluster_names": ("cluster",)} if cm > 1 else {}),
      num_threads=wgs + 1,
      thread_name="wg",
      **({"interpret": _interpret_params()} if interpret else {}),
  )
  return f(a_codes, sa_t, w_nk, sw)


def fp8_block_quantize(w: jax.Array, block: int = 128) -> tuple[jax.Array, jax.Array]:
  """E4M3 codes of a ``(K, N)`` weight with one float32 scale per ``block x block`` tile (``amax / 448``; 1 for
  an all-zero tile): DeepGEMM's weight format, the input of ``scaled_matmul(..., vector_size=128,
  w_block=128)``. K and N need not be multiples of ``block`` (the last tiles are partial).

  Returns:
    ``(codes (K, N) float8_e4m3fn, scales (ceil(K / block), ceil(N / block)) float32)``.

  Example:
    >>> codes, s = fp8_block_quantize(jnp.full((256, 200), 2.0))
    >>> str(codes.dtype), s.shape, float(codes[0, 0].astype(jnp.float32) * s[0, 0])
    ('float8_e4m3fn', (2, 2), 2.0)
  """
  w = jnp.asarray(w, jnp.float32)
  if w.ndim != 2 or not isinstance(block, int) or block < 1:
    raise ValueError(f"fp8_block_quantize needs a 2-D weight and a positive int block, got shape {w.shape}, "
                     f"block={block!r}")
  k, n = w.shape
  gk, gn = -(-k // block), -(-n // block)
  wp = jnp.pad(w, ((0, gk * block - k), (0, gn * block - n))).reshape(gk, block, gn, block)
  amax = jnp.max(jnp.abs(wp), axis=(1, 3))
  s = jnp.where(amax > 0, amax / 448.0, 1.0)
  codes = (wp / s[:, None, :, None]).astype(jnp.float8_e4m3fn).reshape(gk * block, gn * block)[:k, :n]
  return codes, s


def _round_up(x: int, to: int) -> int:
  return -(-x // to) * to


def scaled_matmul(a_codes: jax.Array, a_scale: jax.Array, w_codes: jax.Array, w_scale: jax.Array, *,
                  vector_size: int, w_layout: str = "kn", w_block: int | None = None,
                  config: MgpuConfig | None = None, interpret: bool = False) -> jax.Array:
  """Per-vector (per-block) scaled GEMM ``(M, K) x (K, N) -> float32 (M, N)`` on Hopper's tensor cores.

  ``out[m, n] = sum_g a_scale[m, g] * w_scale[g, n] * P_g[m, n]`` (VS-Quant Sec. 3; DeepGEMM's per-block FP8
  promotion), ``P_g`` the tensor-core product of K block ``g`` (V elements).

  Args:
    a_codes: ``(M, K)`` int8 or float8_e4m3fn codes.
    a_scale: ``(M, ceil(K / V))`` float scales of the activation vectors.
    w_codes: weight codes of the same dtype, ``(K, N)`` (``w_layout='kn'``) or ``(N, K)`` (``'nk'``, K-major:
      what the kernel reads; pass weights stored that way to skip a transpose per call).
    w_scale: ``(ceil(K / V), N)`` float scales of the weight vectors, or with ``w_block`` ``(ceil(K / V),
      ceil(N / w_block))``: one scale per ``V x w_block`` weight block.
    vector_size: V; 128 for FP8 (one promotion per 128 elements), 64 or 128 for int8.
    w_layout: ``'kn'`` or ``'nk'``.
    w_block: None (per-vector weight scales), or the columns of one weight scale block, a multiple of the
      config's ``tile_n`` (128 by default): DeepGEMM's FP8 format is ``vector_size=128, w_block=128`` (1 x 128
      activation and 128 x 128 weight scale blocks). Each output tile then has one weight scale per K block and a
      block's fold costs one fused multiply-add per element instead of two multiplies and an add.
    config: launch parameters (:class:`MgpuConfig`); None: :func:`default_config`.
    interpret: run Pallas's Mosaic GPU interpreter on the CPU (tests; small shapes only).

  Returns:
    float32 ``(M, N)``.

  Raises:
    ValueError: wrong dtypes, shapes or vector size (the message names the argument).
  """
  if a_codes.ndim != 2 or w_codes.ndim != 2:
    raise ValueError(f"a_codes and w_codes must be 2-D, got {a_codes.shape} and {w_codes.shape}")
  if a_codes.dtype not in (jnp.int8, jnp.float8_e4m3fn) or w_codes.dtype != a_codes.dtype:
    raise ValueError("a_codes and w_codes must both be int8 or both float8_e4m3fn, got "
                     f"{a_codes.dtype} and {w_codes.dtype}")
  if w_layout not in ("kn", "nk"):
    raise ValueError(f"w_layout must be 'kn' or 'nk', got {w_layout!r}")
  v = int(vector_size)
  allowed = VECTOR_SIZES["fp8" if a_codes.dtype == jnp.float8_e4m3fn else "int8"]
  if v not in allowed:
    raise ValueError(f"vector_size must be one of {allowed} for {a_codes.dtype} codes, got {vector_size}")
  w_nk = w_codes if w_layout == "nk" else w_codes.T
  m, k = a_codes.shape
  n, k2 = w_nk.shape
  if k2 != k:
    raise ValueError(f"contracting sizes differ: a_codes has K={k}, w_codes has K={k2}")
  g = -(-k // v)
  cfg = config or default_config("fp8" if a_codes.dtype == jnp.float8_e4m3fn else "int8", v)
  if w_block is not None and (not isinstance(w_block, int) or w_block < 1 or w_block % cfg.tile_n):
    raise ValueError(f"w_block must be None or a positive multiple of the tile's {cfg.tile_n} columns "
                     f"(config.tile_n), got {w_block!r}")
  w_cols = n if w_block is None else -(-n // w_block)
  if a_scale.shape != (m, g) or w_scale.shape != (g, w_cols):
    raise ValueError(f"scales must be a_scale (M, K/V) = {(m, g)} and w_scale "
                     f"{'(K/V, N)' if w_block is None else '(K/V, ceil(N/w_block))'} = {(g, w_cols)}, got "
                     f"{a_scale.shape} and {w_scale.shape}")
  if w_block is not None:   # per column again (the kernel reads each tile's first column)
    w_scale = jnp.repeat(w_scale, w_block, axis=1, total_repeat_length=w_cols * w_block)[:, :n]
  g = _round_up(g, cfg.blocks_per_step)   # whole pipeline steps: zero blocks with zero scales add nothing
  mp, np_, kp = _round_up(m, cfg.compute_wgs * cfg.tile_m * cfg.cluster_m), _round_up(n, cfg.tile_n), g * v
  a_p = jnp.pad(a_codes, ((0, mp - m), (0, kp - k)))
  w_p = jnp.pad(w_nk, ((0, np_ - n), (0, kp - k)))
  g0 = a_scale.shape[1]
  sa_t = jnp.pad(a_scale.astype(jnp.float32).T, ((0, g - g0), (0, mp - m)))
  sw_p = jnp.pad(w_scale.astype(jnp.float32), ((0, g - g0), (0, np_ - n)))
  out = scaled_matmul_padded(a_p, sa_t, w_p, sw_p, vector_size=v, config=cfg, w_tile_scales=w_block is not None,
                             interpret=interpret)
  return out[:m, :n]


# the self-test's problem: M, N and K = blocks * V + extra (ragged in all three, several tiles on a GPU)
_SELF_TEST_SHAPE = {"m": 300, "n": 200, "blocks": 3, "extra": 40}


@functools.lru_cache(maxsize=None)
def kernel_self_test(kind: str, vector_size: int) -> bool:
  """Once per process, kind and V: whether the kernel runs here and agrees with XLA on a ragged problem (several
  tiles; M, N and K not multiples of the tiles). int8: XLA's exact int32 per-vector partial sums scaled in
  float32, relative error < 1e-6; FP8: XLA's float32 product of the codes per block, < 2e-3 (Hopper's FP8
  ``wgmma`` sums each block in a reduced-precision accumulator; 1.3e-4 at 8192^3). False off Hopper, or with a
  warning on any compile error or mismatch; callers then keep the Triton kernel.

  Example:
    >>> kernel_self_test("fp8", 128)      # False off a Hopper GPU
    False
  """
  import warnings
  if kind not in KINDS or vector_size not in VECTOR_SIZES.get(kind, ()) or not available():
    return False
  try:
    v = vector_size

    def check():
      shape = _SELF_TEST_SHAPE
      m, n, k = shape["m"], shape["n"], shape["blocks"] * v + shape["extra"]
      ks = jax.random.split(jax.random.PRNGKey(7), 4)
      if kind == "fp8":
        a = jax.random.normal(ks[0], (m, k)).astype(jnp.float8_e4m3fn)
        w = jax.random.normal(ks[1], (k, n)).astype(jnp.float8_e4m3fn)
      else:
        a = jax.random.randint(ks[0], (m, k), -127, 128).astype(jnp.int8)
        w = jax.random.randint(ks[1], (k, n), -127, 128).astype(jnp.int8)
      g = -(-k // v)
      sa = jax.random.uniform(ks[2], (m, g), minval=0.5, maxval=2.0)
      sw = jax.random.uniform(ks[3], (g, n), minval=0.5, maxval=2.0)
      out = scaled_matmul(a, sa, w, sw, vector_size=v)
      pad = g * v - k
      a3 = jnp.pad(a, ((0, 0), (0, pad))).reshape(m, g, v)
      w3 = jnp.pad(w, ((0, pad), (0, 0))).reshape(g, v, n)
      if kind == "fp8":
        a3, w3 = a3.astype(jnp.float32), w3.astype(jnp.float32)
      p = jax.lax.dot_general(a3, w3, (((2,), (1,)), ((1,), (0,))),
                              preferred_element_type=jnp.int32 if kind == "int8" else jnp.float32,
                              precision=jax.lax.Precision.HIGHEST)          # (g, m, n)
      ref = jnp.einsum("gmn,mg,gn->mn", p.astype(jnp.float32), sa, sw, precision=jax.lax.Precision.HIGHEST)
      return jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)

    # on a fresh thread: the first call may come from inside a jit trace (a user's jitted layer)
    err = float(run_outside_traces(jax.jit(check)))
    ok = err < (1e-6 if kind == "int8" else 2e-3)
    if not ok:
      warnings.warn(f"Mosaic GPU {kind} GEMM (V={v}) disagrees with XLA (relative error {err:.2e}); using the "
                    f"Triton kernel.")
    return ok
  except Exception as e:  # noqa: BLE001 - any compile/runtime problem: fall back, say why
    warnings.warn(f"Mosaic GPU {kind} GEMM (V={vector_size}) unavailable ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200]}); using the Triton kernel.")
    return False
