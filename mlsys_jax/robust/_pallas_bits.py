"""Counter-based random bit errors drawn in registers: a Pallas (Triton) kernel and the same hash in XLA.

Used by :func:`mlsys_jax.robust.bit_errors.inject_bit_errors` and
:func:`~mlsys_jax.robust.bit_errors.inject_stuck_at` (Stutz et al., MLSys 2021, Sec. 3: independent flips
with rate p per stored bit). The fault model is the one documented there: every faulty-capable bit j
(a *lane*) owns a uniform 32-bit draw ``U_j``, and the bit is faulty at rate p iff ``U_j < t(p)`` with
``t(p) = floor(p * 2^32)``. So the faults at p1 < p2 are a subset of those at p2 for a fixed key, every
lane fails independently with probability t / 2^32, and the decision never looks at the stored value
(0->1 and 1->0 flips are equally likely).

Nothing is stored: ``U_j`` is never materialised. The codes are packed 32 lanes to a word (4 uint8 or 2
uint16 codes, lane = ``width * slot + plane``), and the binary digits of all 32 lanes' draws at one
level (most significant first) form one *level word*, the output of a counter-based hash of
``(key, word index, level)``. The comparison ``U < t`` is decided, bit-sliced over 32 lanes with a
few logical operations per word, at the first level where a lane's digit differs from t's digit; a
lane whose digits all equal t's is not below it. Evaluation stops once every lane of a tile is decided
(about log2(lanes per tile) + 2 levels instead of 32, and p = 0 or 1 stops at once): the result is
exactly that of the full 32-level comparison, whatever the stopping point, so the kernel (tiles) and the
XLA path (one tile) give identical bits.

The hash is Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011;
the generator of cuRAND's and XLA's Philox), written in 32-bit jnp operations so that the same function
runs inside the kernel and in XLA: ``(level words 4m ... 4m + 3) = philox4x32((k0, k1), (word index, m,
0, 0))``. The high halves of its 32x32-bit products are PTX ``mul.hi.u32`` in the compiled kernel and
16-bit limbs elsewhere (the same bits). Threefry-2x32-20 (the generator of ``jax.random``'s default
keys; 2 level words per call) is kept as an alternative (``hash='threefry'``). The key pair (k0, k1)
is ``jax.random.bits(key, (2,))`` (any key type). The stream differs from
``jax.random.bits(key, codes.shape + (bits,))`` (what this module replaced): same distribution,
different patterns for the same key.

Cost. Every level costs one 32-bit hash output per word whether or not its lanes are still undecided,
and a tile runs until its last lane is decided, so a word costs about 3-4 Philox calls (12-16 levels);
on the H200 the 'levels' kernel is bound by this arithmetic. Kernel knobs that never change the bits:
``words`` (32-bit words per program), ``sub``/``unroll`` (a program's tile split into sub-blocks, all
loads first, one sub-block per loop step, or such a loop that loads the next sub-block first:
``'prefetch'``), ``num_warps``, ``io`` ('words': the codes are loaded and
stored as 32-bit words through a bitcast outside the kernel, when their number is a multiple of the codes
per word; 'bytes' otherwise), ``pre`` (steps run before the first early-stop test, straight-line code the
compiler can interleave), ``draw`` (how 'binomial' evaluates its lane draws: ``'take'`` one by one with
separate early-stop tests, ``'popc'``/``'popcx'`` through the unions of the draws with one early-stop
test in the common case, or ``'lean'``/``'leanf'``: the common case by comparisons alone; see
:func:`binomial_words`). Early stopping is decided per sub-block.

``method='binomial'`` (the default, ``METHOD``, since the 2026-12-02 H200 sweeps: on 25M uint8 codes at
p = 1%, 27.3 us of device time per call with the default tile against 79.5 us for 'levels' at its best
tile, 0 mismatches against the XLA path) is a second
stream that needs about one Philox-2x32-10 call per word (half the products of a Philox-4x32 call):
its first output ``u`` gives the number C of faulty
lanes of the word, ``C = #{c : u < s_c}`` with ``s_c = floor(P(C > c) * 2^32)`` for
``C ~ Binomial(lanes, t / 2^32)`` (float32 log-space pmf summed from the top, relative error about
1e-6: the lane rate is t / 2^32 to that precision, not exactly); the second output gives lane
draws of ceil(log2 lanes) bits, and the faulty lanes are the first C distinct valid draws (a uniform
C-subset, so the lanes are independent Bernoulli; more draws from Philox-4x32-10 on the counters
``(word, m, 0, 0)``, m >= 1, when needed). The draw order does not depend on p and C grows with p, so the subset property
holds (for rates whose float32 thresholds are ordered, i.e. that differ by more than about 1e-6
relative). The thresholds are computed once by XLA and shared by the kernel and the XLA path (identical
bits on one backend; another backend's float32 ``log``/``exp`` may move a threshold by an ulp, changing
a word with probability below 1e-7). Stuck-at values always use the per-lane ('levels') stream.

On GPU the kernel is compared once per process with the XLA path on a small input (``default_impl``);
any compile error or mismatch falls back to the XLA path with a warning.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

try:  # Pallas and its Triton-specific load/store with masks
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu
except Exception:  # pragma: no cover - jax without Pallas/Triton support
  pl = plgpu = None

from mlsys_jax._compat import run_outside_traces, triton_compiler_params

WORDS = 256        # 32-lane words per program (the program's tile: 1024 uint8 codes)
SUB = 128          # words per sub-block processed at a time inside a program (None: the whole tile)
UNROLL = True      # sub-blocks: all loads of the tile first, straight-line (True), or a loop (False)
                   # (256 sub 128 loads-first since s11b/s11c, H200, 'popc' without the hoisting: 23.78/23.65
                   # us vs 24.73/24.49 at 512 sub 128 in the same runs; s11a 512 sub 128 24.59 us; until then
                   # 256 words, one block, 26.07/26.24 us)
NUM_WARPS = 1      # warps per program (one warp: the early-stop tests are warp reductions, no barrier)
HASH = "philox"    # counter hash of the level words: 'philox' (Philox-4x32-10) or 'threefry'
IO = "words"       # kernel reads/writes 32-bit words ('words') or the codes' own dtype ('bytes')
PRE = 3            # steps the kernel runs before its first early-stop test
DRAW = "popc"      # how 'binomial' evaluates its draws: 'take', 'popc' or 'popcx' (the same bits). H200,
                   # 2026-12-03, two runs: default tile 'popc' 26.11/26.21 us vs 'take' 27.23/27.25 us
DRAWS = ("take", "popc", "popcx", "lean", "leanf")   # 'lean'/'leanf' (session 10): comparisons, same bits
_LEAN = ("lean", "leanf")                             # ('lean4', session 11, was slower and is removed)
# The parts of 'lean' (measurement switches, read at trace time; none changes the bits): lane bits by the
# funnel shift, the early-stop test as a sum, the rare path's Philox counter kept loop-variant.
LEAN_PARTS = {"wrap": True, "sum": True, "nohoist": True}
# Session 11 measurement switches (read at trace time; none changes the bits): 'popc'/'popcx' with the rare
# path's Philox counter loop-variant as in 'lean' (the s10b ablation: hoisting it costs 'lean' 5.2%; s11a:
# 'popc' 26.07 -> 24.89 us at the default tile) or the early-stop test as a sum, and
# the codes' loads and stores of the word-io kernel with the 'evict_first' L2 policy (streamed once).
POPC_PARTS = {"nohoist": True, "sum": True}    # 'sum': the early-stop test as a sum, as in 'lean'
# ('nohoist' on by default since two agreeing H200 runs, s11a/s11b: 24.89/25.08 us vs 26.07/26.24 at 256 words;
# 'sum' since s11b/s11c: 512 sub 128 24.46/24.38 us vs 24.73/24.49 without, 256 sub 128 23.35 vs 23.65 us (s11c))
EVICT = False
METHOD = "binomial"  # "binomial" (count, then lanes; fastest on the H200, 2026-12-02) or "levels" (one
                     # bit-sliced draw per lane: the stream of the first releases)
HASHES = ("philox", "philox7", "threefry")
_ROT = ((13, 15, 26, 6), (17, 29, 16, 24))
_U32 = jnp.uint32


def available() -> bool:
  """Whether the Pallas Triton primitives exist in this jax."""
  return plgpu is not None and hasattr(plgpu, "load") and hasattr(plgpu, "store")


def _popcount(x):
  """Set bits of each uint32 of ``x``, as uint32, counted on the int32 view: Pallas lowers an int32
  ``population_count`` to ``__nv_popc`` but a uint32 one to ``math.ctpop``, which Triton rejects (the
  session-7 'popc' kernels did not compile on the H200). The same bits on every backend."""
  pc = jax.lax.population_count(jax.lax.bitcast_convert_type(x, jnp.int32))
  return jax.lax.bitcast_convert_type(pc, _U32)   # 0 .. 32


def _shl1_wrap_asm(v):
  """``1 << (v mod 32)`` for uint32 ``v`` by one PTX funnel shift (``shf.l.wrap.b32`` of the pair
  (1, 0)): the lane bit of a 5-bit draw in the low bits of ``v`` without masking them out (compiled
  Triton only; elsewhere ``1 << (v & 31)``: the same bits)."""
  i32 = jnp.int32
  v32 = jax.lax.bitcast_convert_type(v, i32)
  one, zero = jnp.ones(v.shape, i32), jnp.zeros(v.shape, i32)
  r = plgpu.elementwise_inline_asm("shf.l.wrap.b32 $0, $1, $2, $3;", args=[zero, one, v32],
                                   constraints="=r,r,r,r", pack=1,
                                   result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, i32)])[0]
  return jax.lax.bitcast_convert_type(r, _U32)


def _rotl(x, r: int):
  return (x << _U32(r)) | (x >> _U32(32 - r))


def threefry2x32(k0, k1, x0, x1, rounds: int = 20):
  """Threefry-2x32 block function (Salmon et al. 2011) on uint32 arrays: ``(y0, y1)``.

  With 20 rounds it equals jax's own ``threefry_2x32`` (checked in the tests).
  """
  if rounds % 4:
    raise ValueError(f"rounds must be a multiple of 4, got {rounds}.")
  ks = (k0, k1, k0 ^ k1 ^ _U32(0x1BD11BDA))
  x0 = x0 + ks[0]
  x1 = x1 + ks[1]
  for g in range(rounds // 4):
    for r in _ROT[g % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r) ^ x0
    x0 = x0 + ks[(g + 1) % 3]
    x1 = x1 + ks[(g + 2) % 3] + _U32(g + 1)
  return x0, x1


_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo_split(a, m: int):
  """(hi, lo) 32-bit halves of the 64-bit product a * m in 32-bit arithmetic (16-bit limbs)."""
  mh, ml = _U32(m >> 16), _U32(m & 0xFFFF)
  ah, al = a >> _U32(16), a & _U32(0xFFFF)
  lh, hl = al * mh, ah * ml
  mid = ((al * ml) >> _U32(16)) + (lh & _U32(0xFFFF)) + (hl & _U32(0xFFFF))
  hi = ah * mh + (lh >> _U32(16)) + (hl >> _U32(16)) + (mid >> _U32(16))
  return hi, a * _U32(m)


def _mulhilo_asm(a, m: int):
  """The same product with PTX ``mul.hi.u32`` for the high half (compiled Triton only; ptxas pairs it
  with the low half's multiplication). One result per inline-asm call: Pallas lowers only those."""
  i32 = jnp.int32   # the asm takes and gives int32 (Pallas types unsigned results apart); same bits
  a32 = jax.lax.bitcast_convert_type(a, i32)
  b32 = jnp.full(a.shape, np.uint32(m).view(np.int32), i32)
  hi = plgpu.elementwise_inline_asm("mul.hi.u32 $0, $1, $2;", args=[a32, b32], constraints="=r,r,r",
                                    pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, i32)])[0]
  return jax.lax.bitcast_convert_type(hi, _U32), a * _U32(m)


def philox4x32(k0, k1, c0, c1, c2, c3, rounds: int = 10, asm: bool = False):
  """Philox-4x32 block function (Salmon et al. 2011) on uint32 arrays: four output words.

  ``asm`` uses PTX inline assembly for the 32x32->64 multiplications (inside a compiled Triton kernel);
  otherwise they are computed in 16-bit limbs: the same bits.
  """
  mulhilo = _mulhilo_asm if asm else _mulhilo_split
  for r in range(rounds):
    if r:
      k0, k1 = k0 + _U32(_PHILOX_W[0]), k1 + _U32(_PHILOX_W[1])
    hi0, lo0 = mulhilo(c0, _PHILOX_M[0])
    hi1, lo1 = mulhilo(c2, _PHILOX_M[1])
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
  return c0, c1, c2, c3


_PHILOX2_M = 0xD256D193
_ROUNDS2 = 10   # rounds of the binomial stream's Philox-2x32 (10; other values only to measure its cost)


def philox2x32(k, c0, c1, rounds: int = 10, asm: bool = False):
  """Philox-2x32 block function (Salmon et al. 2011) on uint32 arrays: two output words (one
  32x32-bit product per round, half of Philox-4x32's)."""
  mulhilo = _mulhilo_asm if asm else _mulhilo_split
  for r in range(rounds):
    if r:
      k = k + _U32(_PHILOX_W[0])
    hi, lo = mulhilo(c0, _PHILOX2_M)
    c0, c1 = hi ^ k ^ c1, lo
  return c0, c1


def lane_mask(bits: int, width: int) -> int:
  """32-bit word with the lanes of the low ``bits`` planes of each ``width``-bit code slot set."""
  one = (1 << bits) - 1
  return sum(one << (width * s) for s in range(32 // width))


def check_hash(hash: str) -> str:
  if hash not in HASHES:
    raise ValueError(f"hash must be one of {HASHES}, got {hash!r}.")
  return hash


def level_words(k0, k1, word_idx, m, hash: str = "philox", asm: bool = False):
  """The level words of step ``m`` (levels ``step * m`` ... ``step * m + step - 1``, most significant
  first) of the words ``word_idx``: 4 per step with Philox-4x32-10 ('philox') or Philox-4x32-7
  ('philox7', measured only: Salmon et al. report BigCrush passes from 7 rounds, 10 is their default),
  2 with Threefry-2x32-20."""
  mu = jnp.full(word_idx.shape, m, _U32)
  if hash in ("philox", "philox7"):
    z = jnp.zeros(word_idx.shape, _U32)
    return philox4x32(k0, k1, word_idx, mu, z, z, rounds=10 if hash == "philox" else 7, asm=asm)
  if hash == "threefry":
    return threefry2x32(k0, k1, word_idx, mu)
  check_hash(hash)


def below_words(k0, k1, t, always, word_idx, lanes, hash: str = "philox", asm: bool = False,
                pre: int = 0):
  """Bit-sliced ``U_j < t`` for the 32 lanes of each word of ``word_idx`` (uint32 array).

  ``t`` is the uint32 threshold, ``always`` (bool) forces every lane of ``lanes`` on (p = 1); lanes
  outside ``lanes`` are never set. Runs ``pre`` steps of levels unconditionally (straight-line code the
  compiler can interleave), then steps until every lane is decided. The result does not depend on
  ``pre``: levels past a lane's decision do not change it.
  """
  step = 2 if hash == "threefry" else 4
  lanes = jnp.full(word_idx.shape, lanes, _U32)
  zero = jnp.zeros(word_idx.shape, _U32)
  und0 = jnp.where(always | (t == _U32(0)), zero, lanes)
  lt0 = jnp.where(always, lanes, zero)

  def cond(c):
    m, _, und = c
    return (m < 32 // step) & (jnp.max((und != _U32(0)).astype(jnp.int32)) > 0)

  def level(lt, und, r, bit):
    tm = _U32(0) - ((t >> bit) & _U32(1))      # all ones where t's digit is 1
    lt = lt | (und & ~r & tm)                    # digit 0 < 1: decided below
    und = und & ~(r ^ tm)                        # still equal: undecided
    return lt, und

  def body(c):
    m, lt, und = c
    mu = m.astype(_U32)
    for j, r in enumerate(level_words(k0, k1, word_idx, mu, hash, asm)):
      lt, und = level(lt, und, r, _U32(31 - j) - _U32(step) * mu)
    return m + 1, lt, und

  c = (jnp.int32(0), lt0, und0)
  for _ in range(min(pre, 32 // step)):
    c = body(c)
  _, lt, _ = jax.lax.while_loop(cond, body, c)
  return lt


# ----------------------------------------------------------------------------------------------------
# 'binomial': the count of faulty lanes of a word, then which lanes.


def binomial_thresholds(t, n_lanes: int) -> jax.Array:
  """uint32[32] ``s_c = floor(P(C > c) * 2^32)`` (c = 0 .. n_lanes - 1, zero past) for the number C of
  faulty lanes of a word, ``C ~ Binomial(n_lanes, q)`` with the lane rate ``q = t / 2^32``.

  float32 log-space pmf, summed from the top so that the tails keep their relative precision (about 1e-6);
  the thresholds decrease in c. ``t`` may be traced.
  """
  q = jnp.clip(jnp.asarray(t, _U32).astype(jnp.float32) * np.float32(2.0 ** -32), 0.0,
               np.float32(1.0 - 2.0 ** -24))
  i = np.arange(1, n_lanes + 1, dtype=np.float64)
  from math import lgamma
  logc = np.asarray([lgamma(n_lanes + 1) - lgamma(k + 1) - lgamma(n_lanes - k + 1) for k in i], np.float32)
  logpmf = logc + i.astype(np.float32) * jnp.log(q) + (n_lanes - i).astype(np.float32) * jnp.log1p(-q)
  pmf = jnp.where(q > 0, jnp.exp(logpmf), 0.0)                 # P(C = i), i = 1 .. n_lanes
  surv = jnp.cumsum(pmf[::-1])[::-1]                             # P(C > c) = sum_{i > c}, c = 0 .. n_lanes-1
  s = jnp.floor(jnp.clip(surv * np.float32(2.0 ** 32), 0.0, np.float32(4294967040.0))).astype(_U32)
  return jnp.concatenate([s, jnp.zeros((32 - n_lanes,), _U32)])


def binomial_words(k0, k1, always, thr, word_idx, n_lanes: int, width: int, bits: int, asm: bool = False,
                   pre: int = 0, draw: str | None = None):
  """Faulty lanes of each word of ``word_idx``: the first C distinct lanes of a random sequence.

  One Philox-2x32-10 call, key k0, counter ``(word, k1)``, gives the count's uniform ``u`` (its first
  word: ``C = #{c : u < s_c}`` with the thresholds ``thr(c)`` of :func:`binomial_thresholds`) and
  ``32 // db`` lane draws of ``db = ceil(log2 n_lanes)`` bits from its second word; more draws, when a
  word needs them, come from Philox-4x32-10 calls ``(word, m, 0, 0)``, m = 1, 2, ... (four words each). A draw ``v >= n_lanes``
  or a lane already chosen is skipped, so the chosen lanes are the first C distinct ones of a uniform
  random order of the word's lanes: a uniform C-subset, hence independent Bernoulli(q) lanes when C is
  binomial, and for a fixed key the lanes at a lower rate are the first ones of those at a higher rate.
  ``always`` (bool) selects every lane. ``thr(c)`` returns threshold c (a uint32 scalar). The first
  ``pre`` thresholds and draws run unconditionally (no early-stop test); the result does not depend on it.

  ``draw`` (default ``DRAW``; never changes the bits) is how the kernel evaluates this: ``'take'`` counts
  the count first (its own early-stop tests), then takes the draws one by one, each adding its lane if
  valid, new and still needed, with an early-stop test after each draw past the first ``pre``;
  ``'popc'`` keeps the union ``m`` of the lanes drawn so far and takes ``chosen = m`` while
  ``popcount(m) <= C`` (a draw adds at most one lane, so this is the set at the first draw where C
  distinct lanes are reached, and draws past it change nothing), and decides with ONE early-stop test
  after the unconditional steps whether any word needs a further threshold or draw; the rest runs inside
  a loop that runs once if so. ``'popcx'`` is 'popc' with that rest flat (its loops run zero times when no
  word needs more). The popcounts are taken on int32 (:func:`_popcount`), which Triton compiles.
  ``'lean'`` (power-of-two lane counts; others use 'popc') decides the common case, C <= 3 with C
  distinct lanes among the first three draws, by comparisons only: ``u`` with s_0 .. s_3 and the three
  draws' lane bits with each other (C = 1: draw 0; C = 2: draws 0 and 1 if distinct, else 0 and 2;
  C = 3: all three if distinct), the lane bits by one funnel shift each in the compiled kernel (PTX
  ``shf.l.wrap``, no masking), and one early-stop test; every other word sends its tile through the
  'popc' rest (thresholds from s_0, unions, further draws), whose Philox-4x32 counter is made
  loop-variant so that the compiler does not hoist the first rounds into the common path. ``pre`` is not
  used; the compiled kernel takes its early-stop test as a sum. ``'leanf'`` is 'lean' with integer work
  moved from the ALU pipe to the FMA pipe: the draws' shifts as ``mul.hi`` by powers of two (compiled
  kernel) and the chosen set as a sum of distinct lane bits. SASS of the default tile (pip Triton 3.9 +
  ptxas, sm_90), common path per program (8 words per thread): 'popc' (pre = 3) 622 instructions, 339
  of them on the ALU pipe (LOP3, ISETP, SEL, SHF, ...), 118 registers; 'lean' 519 / 306 / 98;
  'leanf' 517 / 290 / 98.
  """
  draw = draw or DRAW
  if draw not in DRAWS:
    raise ValueError(f"draw must be one of {DRAWS}, got {draw!r}.")
  db = max(1, (n_lanes - 1).bit_length())
  per_word = 32 // db
  zero = jnp.zeros(word_idx.shape, _U32)
  u, d = philox2x32(k0, word_idx, jnp.full(word_idx.shape, k1, _U32), rounds=_ROUNDS2, asm=asm)
  npc = min(pre, n_lanes)                      # thresholds tested unconditionally
  npre = min(pre, per_word)                    # draws taken unconditionally
  pow2 = (1 << db) == n_lanes                  # every draw names a valid lane
  if draw in _LEAN and not pow2:              # 'lean' decides by comparing lanes: power-of-two lanes only
    draw = "popc"
  if draw in _LEAN:                           # its own fixed common path (below); pre is not used
    npc, npre = 0, 3

  def ccond(c):
    j, _, more = c
    return (j < n_lanes) & more

  def cbody(c):
    j, cnt, _ = c
    hit = u < thr(j)
    return j + 1, cnt + hit.astype(_U32), jnp.max(hit.astype(jnp.int32)) > 0

  def any_(x):
    return jnp.max(x.astype(jnp.int32)) > 0

  def lane_of(v):
    return v if bits == width else _U32(width) * (v // _U32(bits)) + v % _U32(bits)

  def draw_bits(r, j: int | jax.Array):
    return (r >> (_U32(db) * j)) & _U32((1 << db) - 1)

  def extension(m, go, consume):
    """Draws from Philox-4x32-10 calls m = 1, 2, ... while ``go`` (some word still needs lanes)."""
    def rcond(c):
      return c[-1] & (c[0] < (1 << 20))

    def rbody(c):
      mm, *st, g = c
      # 'lean': the word counter made loop-variant with a zero the compiler cannot fold (mm < 2^20), so
      # that the first rounds (which do not depend on m) are not hoisted into the common path
      nohoist = LEAN_PARTS["nohoist"] if draw in _LEAN else draw in ("popc", "popcx") and POPC_PARTS["nohoist"]
      wi = word_idx | (mm >> _U32(24)) if nohoist else word_idx
      more = philox4x32(k0, k1, wi, jnp.full(word_idx.shape, mm, _U32), zero, zero, asm=asm)
      *st, g = consume(more, 4 * per_word, *st, needed=g)
      return (mm + _U32(1), *st, g)
    return jax.lax.while_loop(rcond, rbody, (_U32(1), *m, go))[1:-1]

  def pool_word(pool, ju):
    wsel = ju // _U32(per_word)
    r = pool[0]
    for idx in range(1, len(pool)):
      r = jnp.where(wsel == _U32(idx), pool[idx], r)
    return r

  def draw_loop(pool, nd: int, start: int, state, go, step):
    """Draws start .. nd-1 of the words ``pool`` while ``go``: ``step(draw, *state) -> (*state, go)``
    (go: some word still needs lanes, the early-stop test of the last step, so no step repeats it).
    Returns ``(*state, go)``."""
    def cond(c):
      return c[-1] & (c[0] < nd)

    def body(c):
      j, *st, _ = c
      ju = j.astype(_U32)
      return (j + 1, *step(draw_bits(pool_word(pool, ju), ju % _U32(per_word)), *st))
    return jax.lax.while_loop(cond, body, (jnp.int32(start), *state, go))[1:]

  cnt = zero
  for j in range(npc):                          # hits are nested (s_c decreases): counting is order-free
    cnt = cnt + (u < thr(j)).astype(_U32)

  if draw in ("popc", "popcx") + _LEAN:

    def lane_bit(v):
      if pow2:
        return _U32(1) << lane_of(v)
      return jnp.where(v < _U32(n_lanes), _U32(1) << jnp.minimum(lane_of(v), _U32(31)), _U32(0))

    def unions(cn):
      """The unconditional draws' unions m_1 .. m_npre (they do not depend on C) and the chosen set
      among them for the count ``cn``: the last union with at most cn lanes."""
      m, ch = zero, zero
      for j in range(npre):
        m = m | lane_bit(draw_bits(d, j))
        ok = (cn > _U32(0)) if (j == 0 and pow2) else (_popcount(m) <= cn)
        ch = jnp.where(ok, m, ch)
      return m, ch

    def consume(pool, nd: int, mm, ch, cn, needed, start: int = 0):
      """Draws start .. nd-1 of the words ``pool`` while ``needed`` (some word has fewer lanes in its
      union than its count cn); returns whether some word still has."""
      def step(v, mm, ch):
        mm = mm | lane_bit(v)
        pc = _popcount(mm)
        return mm, jnp.where(pc <= cn, mm, ch), any_(pc < cn)

      return draw_loop(pool, nd, start, (mm, ch), needed, step)

    def lean_common():
      """'lean': the chosen set of the words with C <= 3 whose first three draws hold C distinct lanes,
      by comparisons of the count's u with s_0..s_3 and of the draws' lanes (no popcount), and the short
      words (the others). The same sets as 'popc' with pre = 3: C = 1: draw 0; C = 2: draws 0, 1 if
      distinct, else 0 and 2; C = 3: all three if distinct."""
      fma = draw == "leanf"                   # integer work moved from the ALU pipe to the FMA pipe
      if asm and bits == width and db == 5 and LEAN_PARTS["wrap"]:   # 1 << (v mod 32): one shf.l.wrap
        def shifted(j):                        # d >> 5j; 'leanf': the high half of d * 2^(32 - 5j)
          return d if j == 0 else _mulhilo_asm(d, 1 << (32 - db * j))[0] if fma else d >> _U32(db * j)

        def bit_of(j):
          return _shl1_wrap_asm(shifted(j))
      else:
        def bit_of(j):
          return _U32(1) << lane_of(draw_bits(d, j))
      b0, b1, b2 = bit_of(0), bit_of(1), bit_of(2)
      a0, a1, a2, a3 = (u < thr(j) for j in range(4))   # C > 0, 1, 2, 3 (s_c = 0 past n_lanes)
      e01, e02, e12 = b0 == b1, b0 == b2, b1 == b2
      if fma:   # sums of distinct lane bits (the sets of the short words are not used)
        chosen = (jnp.where(a0, b0, zero) + jnp.where(a1, jnp.where(e01, b2, b1), zero)
                  + jnp.where(a2, b2, zero))
      else:
        m2 = b0 | b1
        m3 = m2 | b2
        chosen = jnp.where(a2, m3, jnp.where(a1, jnp.where(e01, m3, m2), jnp.where(a0, b0, zero)))
      short = a3 | (a2 & (e01 | e02 | e12)) | (a1 & e01 & e02)
      return chosen, short

    def finish(cnt, go):
      """The rest for the tiles with a short word: the remaining thresholds, then the remaining draws
      (extra thresholds and draws change nothing)."""
      _, cnt, _ = jax.lax.while_loop(ccond, cbody, (jnp.int32(npc), cnt, go))
      cnt = jnp.where(always, _U32(0), cnt)     # p = 1: every lane, no draws
      m, chosen = unions(cnt)
      if npre < per_word:
        m, chosen, still = consume((d,), per_word, m, chosen, cnt, go, npre)
      else:
        still = go & any_(_popcount(m) < cnt)
      return extension((m, chosen), still, lambda pool, nd, mm, ch, needed: consume(
          pool, nd, mm, ch, cnt, needed))[1]

    if draw in _LEAN:
      chosen, short = lean_common()
    else:
      # ONE early-stop test: a word is short if its count may exceed the thresholds tested (u < s_npc)
      # or the lanes of its union so far; with no short word, cnt is C and the chosen set is among
      # m_1..m_npre.
      m, chosen = unions(cnt)
      short = (_popcount(m) < cnt) if npre else (cnt > _U32(0))
      if npc < n_lanes:
        short = short | (u < thr(npc))
    # 'lean', compiled: the early-stop test as a sum over the tile (LLVM turns a max of 0/1 flags into
    # more ALU operations); elsewhere the max (a sum over a whole XLA array could overflow int32)
    lean_sum = asm and (LEAN_PARTS["sum"] if draw in _LEAN else POPC_PARTS["sum"])
    go = (jnp.sum(short.astype(jnp.int32)) > 0 if lean_sum else any_(short)) & ~always
    if draw == "popcx":                         # flat: the loops follow (each runs 0 times when not go)
      chosen = jnp.where(go, finish(cnt, go), chosen)
    else:                                       # the slow path inside a loop that runs once if go
      chosen = jax.lax.while_loop(lambda c: c[0], lambda c: (~c[0], finish(cnt, c[0])),   # ~go: False
                                  (go, chosen))[1]
    return jnp.where(always, jnp.full(word_idx.shape, lane_mask(bits, width), _U32), chosen)

  # draw == "take": the count first (its own early-stop tests), then the draws one by one
  _, cnt, _ = jax.lax.while_loop(ccond, cbody, (jnp.int32(npc), cnt, jnp.bool_(True)))
  cnt = jnp.where(always, _U32(0), cnt)          # p = 1: every lane, no draws

  def need(k):
    return any_(k < cnt)

  def take(v, ch, kk):
    """One draw ``v`` (db bits): its lane joins the chosen ones if valid, new and still needed."""
    bit = _U32(1) << jnp.minimum(lane_of(v), _U32(31))
    new = (v < _U32(n_lanes)) & (kk < cnt) & ((ch & bit) == _U32(0))
    return ch | jnp.where(new, bit, _U32(0)), kk + new.astype(_U32)

  def consume_take(pool, nd: int, chosen, k, start: int = 0, needed=None):
    """Draws start .. nd-1 of the words ``pool`` while some word still needs lanes; also returns whether
    some word still does (the early-stop test of the last step, so no step repeats it). ``needed``: that
    flag when the caller knows it already."""
    def step(v, ch, kk):
      ch, kk = take(v, ch, kk)
      return ch, kk, need(kk)

    return draw_loop(pool, nd, start, (chosen, k), need(k) if needed is None else needed, step)

  chosen, k = zero, zero
  for j in range(npre):
    chosen, k = take(draw_bits(d, j), chosen, k)
  chosen, k, still = consume_take((d,), per_word, chosen, k, npre)
  chosen = extension((chosen, k), still, consume_take)[0]
  return jnp.where(always, jnp.full(word_idx.shape, lane_mask(bits, width), _U32), chosen)


def _unpack(words, cpw: int, width: int, dtype):
  """(W,) uint32 words -> (W, cpw) codes of ``width`` bits (slot s = bits width*s ...)."""
  sh = (jnp.arange(cpw, dtype=jnp.int32) * width).astype(_U32)
  return ((words[:, None] >> sh[None, :]) & _U32((1 << width) - 1)).astype(dtype)


def key_words(key) -> jax.Array:
  """Two uint32 hash-key words from any jax PRNG key (raw uint32[2] or typed)."""
  return jax.random.bits(key, (2,), jnp.uint32)


def _params(kw, t, always):
  return jnp.stack([kw[0], kw[1], jnp.asarray(t, _U32), jnp.asarray(always, _U32)])


def _faults(params, off: int, word_idx, method: str, lanes: int, hash: str, width: int, bits: int,
            asm: bool = False, pre: int = 0, draw: str | None = None):
  """Faulty lanes of the words ``word_idx`` from ``params[off:]`` (a ref or an array)."""
  k0, k1, t, always = params[off], params[off + 1], params[off + 2], params[off + 3] != _U32(0)
  if method == "levels":
    return below_words(k0, k1, t, always, word_idx, lanes, hash, asm, pre)
  return binomial_words(k0, k1, always, lambda c: params[off + 4 + c], word_idx, bits * (32 // width),
                        width, bits, asm, pre, draw)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6, 7, 8))
def _faults_xla(params, off: int, nw: int, method: str, lanes: int, hash: str, width: int, bits: int,
                draw: str):
  return _faults(params, off, jnp.arange(nw, dtype=_U32), method, lanes, hash, width, bits, draw=draw)


def _tiling(words: int | None, sub: int | None) -> tuple[int, int]:
  """(words per program, words per sub-block): powers of two, the sub-block dividing the tile."""
  w = WORDS if words is None else words
  # sub None: the default sub-block with the default tile, the whole tile with a tile given by hand
  s = ((SUB or w) if words is None else w) if sub is None else sub
  for name, v in (("words", w), ("sub", s)):
    if not isinstance(v, (int, np.integer)) or v < 1 or v & (v - 1):
      raise ValueError(f"{name} must be a power of two (a Triton block size), got {v!r}.")
  if s > w:
    raise ValueError(f"sub ({s}) must not exceed words ({w}): a program's tile is split into sub-blocks.")
  return int(w), int(s)


def inject(codes: jax.Array, bits: int, flip_params, one_params=None, *, impl: str = "xla",
           words: int | None = None, num_warps: int | None = None, hash: str | None = None,
           io: str | None = None, pre: int | None = None, method: str | None = None,
           sub: int | None = None, unroll: bool | None = None, draw: str | None = None) -> jax.Array:
  """Faults on the flat codes: flips (``one_params`` None) or stuck-at values.

  ``flip_params``/``one_params``: uint32[4] ``(k0, k1, t, always)`` of the faulty-bit draw and of the
  stuck value draw (a faulty bit reads 1 where the second draw is below its threshold).
  ``impl``: ``'xla'``, ``'pallas'`` (compiled Triton) or ``'interpret'`` (the kernel in Pallas' interpreter).
  ``hash``: one of ``HASHES`` (default ``HASH``); ``words``: 32-bit words per program (the tile, a power of
  two; default ``WORDS``); ``sub``: words per sub-block (default ``SUB`` with the default tile, the whole
  tile with ``words`` given): a program processes its tile ``words // sub`` sub-blocks at a time, with every
  load of the tile issued first (``unroll=True``, straight-line code) or one sub-block per loop step (``unroll=False``; ``'prefetch'``:
  a loop step issues the next sub-block's load before its own arithmetic); ``num_warps``:
  warps per program; ``io``: ``'words'`` (the kernel loads and stores the codes as 32-bit words, a free
  bitcast outside; used when the number of codes is a multiple of the codes per word, else ``'bytes'``) or
  ``'bytes'`` (loads of the codes' own dtype). ``hash`` changes the pattern; ``impl``, ``words``, ``sub``,
  ``unroll``, ``num_warps`` and ``io`` never do; nor does ``pre`` (kernel steps before the first
  early-stop test), nor ``draw`` (default ``DRAW``: how 'binomial' evaluates its draws, see
  :func:`binomial_words`). ``method``: ``'binomial'`` (default ``METHOD``; Philox only) or ``'levels'``:
  different patterns.
  """
  hash = check_hash(hash or HASH)
  method = method or METHOD
  draw = draw or DRAW
  if draw not in DRAWS:
    raise ValueError(f"draw must be one of {DRAWS}, got {draw!r}.")
  if method not in ("binomial", "levels"):
    raise ValueError(f"method must be 'binomial' or 'levels', got {method!r}.")
  io = io or IO
  if io not in ("words", "bytes"):
    raise ValueError(f"io must be 'words' or 'bytes', got {io!r}.")
  if impl not in ("xla", "pallas", "interpret"):
    raise ValueError(f"impl must be 'xla', 'pallas' or 'interpret', got {impl!r}.")
  w, sb = _tiling(words, sub)
  unroll = UNROLL if unroll is None else unroll if unroll == "prefetch" else bool(unroll)
  shape, dtype = codes.shape, codes.dtype
  width = jnp.iinfo(dtype).bits
  cpw = 32 // width
  flat = codes.reshape(-1)
  n = flat.shape[0]
  if n == 0:
    return codes
  nw = -(-n // cpw)
  lanes = lane_mask(bits, width)
  stuck = one_params is not None
  if method == "binomial":
    n_lanes = bits * cpw
    flip_params = jnp.concatenate([flip_params, binomial_thresholds(flip_params[2], n_lanes)])
  off = flip_params.shape[0]
  one_method = "levels"   # the stuck values need no subset property across p_one; levels decide p_one = 0.5 at once
  allp = jnp.concatenate([flip_params, one_params]) if stuck else flip_params

  def combine(c, f, o):
    return (c & ~f) | (f & o) if stuck else c ^ f

  if impl == "xla":
    f = _faults_xla(allp, 0, nw, method, lanes, hash, width, bits, draw)
    o = _faults_xla(allp, off, nw, one_method, lanes, hash, width, bits, draw) if stuck else None
    c = jnp.pad(flat, (0, nw * cpw - n)).reshape(nw, cpw)
    out = combine(c, _unpack(f, cpw, width, dtype), _unpack(o, cpw, width, dtype) if stuck else None)
    return out.reshape(-1)[:n].reshape(shape)
  interpret = impl == "interpret"
  asm = not interpret
  as_words = io == "words" and n % cpw == 0
  grid = -(-nw // w)
  nsub = w // sb
  pre = PRE if pre is None else pre

  def faults(p_ref, wu):
    f = _faults(p_ref, 0, wu, method, lanes, hash, width, bits, asm, pre, draw)
    o = _faults(p_ref, off, wu, one_method, lanes, hash, width, bits, asm, pre, draw) if stuck else None
    return f, o

  ev = dict(eviction_policy="evict_first") if EVICT and not interpret else {}

  def word_io(c_ref, o_ref):
    def load(widx):
      return plgpu.load(c_ref.at[widx], mask=widx < nw, other=jnp.zeros((), _U32), **ev)

    def store(widx, c, f, o):
      plgpu.store(o_ref.at[widx], combine(c, f, o), mask=widx < nw, **ev)
    return load, store

  def byte_io(c_ref, o_ref):
    def offsets(widx):
      return widx[:, None] * cpw + jnp.arange(cpw, dtype=jnp.int32)[None, :]

    def load(widx):
      offs = offsets(widx)
      return plgpu.load(c_ref.at[offs], mask=offs < n, other=jnp.zeros((), dtype))

    def store(widx, c, f, o):
      offs = offsets(widx)
      o = None if o is None else _unpack(o, cpw, width, dtype)
      plgpu.store(o_ref.at[offs], combine(c, _unpack(f, cpw, width, dtype), o), mask=offs < n)
    return load, store

  def kernel(p_ref, c_ref, o_ref):
    load, store = (word_io if as_words else byte_io)(c_ref, o_ref)
    base = pl.program_id(0) * w

    def block(j):
      return base + j * sb + jnp.arange(sb, dtype=jnp.int32)

    def finish(widx, c):
      f, o = faults(p_ref, widx.astype(_U32))
      store(widx, c, f, o)

    if nsub == 1 or unroll is True:   # every load of the tile in flight before the first sub-block's math
      idx = [block(j) for j in range(nsub)]
      cs = [load(i) for i in idx]
      for i, c in zip(idx, cs):
        finish(i, c)
    elif unroll == "prefetch":   # loop; the next sub-block's load issued before this one's arithmetic
      def step(j, c):
        nxt = load(block(jnp.minimum(j + 1, nsub - 1)))   # the last step reloads its own block (cached)
        finish(block(j), c)
        return nxt
      jax.lax.fori_loop(0, nsub, step, load(block(0)))
    else:
      def step(j, carry):
        widx = block(j)
        finish(widx, load(widx))
        return carry
      jax.lax.fori_loop(0, nsub, step, jnp.int32(0))

  cp = None if interpret else triton_compiler_params(num_warps or NUM_WARPS, 1)
  if as_words:   # 4 uint8 / 2 uint16 codes per word, slot s in bits width*s... (little-endian bitcast)
    cw = jax.lax.bitcast_convert_type(flat.reshape(nw, cpw), _U32)
    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((nw,), _U32), grid=(grid,),
                         interpret=interpret, compiler_params=cp)(allp, cw)
    return jax.lax.bitcast_convert_type(out, dtype).reshape(shape)
  out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((n,), dtype), grid=(grid,),
                       interpret=interpret, compiler_params=cp)(allp, flat)
  return out.reshape(shape)


ENABLED = True   # False sends inject_bit_errors / inject_stuck_at to the XLA path everywhere


@functools.lru_cache(maxsize=None)
def _kernel_self_test(method: str | None = None) -> bool:
  """Once per process and method: compile the kernel on small inputs and compare it with the XLA path bit
  for bit (flips and stuck-at, uint8 and uint16, word and byte io). On failure warn and use the XLA path
  (same bits, slower)."""
  import warnings
  method = method or METHOD
  def same():
    kw = jnp.asarray([0x12345678, 0x9ABCDEF0], _U32)
    fp = _params(kw, jnp.uint32(int(0.05 * 2 ** 32)), False)
    op = _params(kw[::-1], jnp.uint32(2 ** 31), False)
    out = []
    for dtype, bits, n in ((jnp.uint8, 8, 5000), (jnp.uint8, 8, 5001), (jnp.uint16, 11, 5000),
                           (jnp.uint16, 11, 5001)):     # even lengths load words, odd ones bytes
      codes = (jnp.arange(n, dtype=_U32) * _U32(2654435761) % _U32(2 ** bits)).astype(dtype)
      for one in (None, op):
        out.append(jnp.all(inject(codes, bits, fp, one, impl="pallas", method=method) ==
                           inject(codes, bits, fp, one, impl="xla", method=method)))
    return jnp.stack(out)

  try:
    ok = run_outside_traces(jax.jit(same))
    if not ok.all():
      raise RuntimeError(f"kernel and XLA path differ ({method}; cases (uint8, uint16) x (words, bytes) "
                         f"x (flips, stuck-at): {ok.tolist()})")
    return True
  except Exception as e:  # pragma: no cover - GPU only
    warnings.warn(f"mlsys_jax.robust: the Pallas bit-error kernel failed its self-test ({e!r:.300}); "
                  "using the XLA path (identical bits, slower).", RuntimeWarning, stacklevel=3)
    return False


def default_impl(method: str | None = None) -> str:
  """``'pallas'`` on a GPU backend with Pallas Triton whose kernel (for ``method``, default ``METHOD``)
  passed its self-test, ``'xla'`` elsewhere."""
  gpu = ENABLED and jax.default_backend() == "gpu" and available()
  return "pallas" if gpu and _kernel_self_test(method or METHOD) else "xla"

