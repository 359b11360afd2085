"""Tests of mlsys_jax.stats on simulated effects with known truth (Bouthillier et al. 2021)."""

import json
import pathlib

import numpy as np
import pytest

from mlsys_jax import stats


def test_prob_outperform_basic_and_ties():
  assert stats.prob_outperform([1, 2, 3], [0, 2, 4]) == pytest.approx((1 + 0.5 + 0) / 3)
  assert stats.prob_outperform([1, 2, 3], [0, 2, 4], lower_is_better=True) == pytest.approx(1.5 / 3)
  # Unpaired = Mann-Whitney U / (n m), checked by brute force.
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=7), rng.normal(size=5)
  u = sum((x > y) + 0.5 * (x == y) for x in a for y in b) / 35
  assert stats.prob_outperform(a, b, paired=False) == pytest.approx(u)


def test_noether_matches_formula():
  assert stats.noether_sample_size(0.75) == 29
  assert stats.noether_sample_size(0.7) == 46
  assert stats.noether_sample_size(0.8) == 21
  with pytest.raises(ValueError, match="gamma"):
    stats.noether_sample_size(0.4)


def _decision_rates(gap, n, sims=200, seed=0):
  rng = np.random.default_rng(seed)
  sig = mean_ = 0
  for s in range(sims):
    shared = rng.normal(size=n)  # common random numbers: the same seeds for A and B
    a = shared + gap + rng.normal(size=n)
    b = shared + rng.normal(size=n)
    c = stats.compare(a, b, n_boot=400, seed=s)
    sig += c.significant
    mean_ += c.significant and c.meaningful
  return sig / sims, mean_ / sims


def test_large_effect_is_detected():
  # With independent unit noise per method the difference has std sqrt(2); a gap of 1.5 gives
  # P(A>B) = Phi(1.5/sqrt 2) = 0.856 > 0.75: the decision must almost always be "better".
  sig, meaningful = _decision_rates(1.5, 29)
  assert sig > 0.95 and meaningful > 0.8


def test_no_effect_false_positive_rate():
  sig, _ = _decision_rates(0.0, 29, sims=300, seed=1)
  assert sig < 0.08  # nominal 2.5% one-sided; bootstrap percentile intervals are a bit liberal


def test_small_effect_significant_but_not_meaningful():
  # P(A>B) = Phi(0.4 / sqrt 2) = 0.61: with many trials it is significant but not meaningful.
  rng = np.random.default_rng(2)
  n = 2000
  shared = rng.normal(size=n)
  c = stats.compare(shared + 0.4 + rng.normal(size=n), shared + rng.normal(size=n))
  assert c.significant and not c.meaningful
  assert 0.58 < c.p < 0.64 and c.ci_low < c.p < c.ci_high
  assert "not meaningful" in c.verdict


@pytest.mark.parametrize("n", [1, 3, 5, 29])
def test_every_trial_won_gets_the_exact_bound_not_a_point(n):
  """All wins: every bootstrap resample is all wins, so the percentile interval is [1, 1] at any n (one won
  trial read as significant before). The lower bound is then Clopper-Pearson's for n wins of n, the p with
  P(n wins | p) = p^n = (1 - level) / 2; all losses mirror it; unpaired, the smaller group's size counts."""
  a, b = 0.9 + 0.01 * np.arange(1, n + 1), 0.9 + 0.01 * np.arange(n)
  assert stats.bootstrap_ci(a, b) == (1.0, 1.0)                  # the degenerate percentile interval
  c = stats.compare(a, b)
  assert c.p == 1.0 and c.ci_high == 1.0 and c.ci_low ** n == pytest.approx(0.025, rel=1e-12)
  assert c.significant == (n >= 6)                               # 0.025 ** (1 / 6) = 0.54 > 0.5
  assert stats.compare(a, b, level=0.5).ci_low ** n == pytest.approx(0.25, rel=1e-12)
  lost = stats.compare(b, a)
  assert lost.p == 0.0 and lost.ci_low == 0.0 and 1 - lost.ci_high == pytest.approx(c.ci_low, rel=1e-12)
  assert (lost.verdict == "B better (significant)") == (n >= 6)
  unpaired = stats.compare(a[: max(1, n - 1)] + 1.0, b, paired=False)   # complete separation, groups n - 1 and n
  assert unpaired.p == 1.0 and unpaired.ci_low ** max(1, n - 1) == pytest.approx(0.025, rel=1e-12)


def test_more_wins_never_read_as_less_significant():
  """Four wins and a tie in five trials: the bootstrap's interval starts at 0.7 (significant), above what five
  wins of five allow; it is held at that bound, so the better result is not the weaker one."""
  a, b = [0.91, 0.93, 0.90, 0.92, 0.95], [0.90, 0.92, 0.90, 0.90, 0.93]
  assert stats.bootstrap_ci(a, b)[0] == pytest.approx(0.7)
  tie, wins = stats.compare(a, b), stats.compare(a, [0.90, 0.92, 0.89, 0.90, 0.93])
  assert tie.ci_low == wins.ci_low == pytest.approx(0.025 ** 0.2) and not tie.significant and not wins.significant


def test_the_bound_leaves_ordinary_intervals_alone():
  """With enough trials and wins and losses both, the interval is the bootstrap's."""
  rng = np.random.default_rng(2)
  b = rng.normal(0.9, 0.01, 40)
  a = b + rng.normal(0.004, 0.01, 40)
  c = stats.compare(a, b)
  assert (c.ci_low, c.ci_high) == stats.bootstrap_ci(a, b) and 0.5 < c.p < 1.0 and c.significant


def test_bad_inputs():
  with pytest.raises(ValueError, match="as many trials"):
    stats.compare([1, 2], [1, 2, 3])
  with pytest.raises(ValueError, match="NaN"):
    stats.compare([1, np.nan], [1, 2])
  with pytest.raises(ValueError, match="non-empty"):
    stats.prob_outperform([], [])


def test_time_interleaved_orders_and_ratio():
  import time
  order = []

  def fast():
    order.append("a")
    return np.zeros(1)

  def slow():
    order.append("b")
    time.sleep(0.002)
    return np.zeros(1)

  t = stats.time_interleaved(fast, slow, repeats=6, warmup=1)
  assert order[2:6] == ["a", "b", "b", "a"]  # ABBA after one warm-up round
  assert t.ratio > 1.5 and t.p_a_faster == 1.0 and len(t.times_a) == 6


ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quoted_session38_restatements():
  """docs/foundation.md: the committed comparisons whose significance the bound withdraws (322, all of five or
  fewer trials); docs/binary.md: its table's intervals recomputed from the JSON's per-seed accuracies."""
  flips, most = 0, 0

  def walk(o):
    nonlocal flips, most
    if isinstance(o, dict):
      if "significant" in o and "ci_low" in o and o.get("n"):
        bound = 0.025 ** (1 / o["n"])
        a_withdrawn = o["significant"] and min(o["ci_low"], bound) <= 0.5
        b_withdrawn = o["ci_high"] < 0.5 <= max(o["ci_high"], 1 - bound)
        if a_withdrawn or b_withdrawn:
          flips, most = flips + 1, max(most, o["n"])
      for v in o.values():
        walk(v)
    elif isinstance(o, list):
      for v in o:
        walk(v)
  results = [ROOT / "experiments" / "results", ROOT / "benchmarks" / "results"]
  for path in sorted(p for folder in results for p in folder.rglob("*.json")):
    try:
      walk(json.loads(path.read_text()))
    except ValueError:
      continue
  assert (flips, most) == (322, 5)
  acc = json.loads((ROOT / "experiments" / "results" / "binary_eval" / "binary_eval.json").read_text())["accuracy"]
  f = np.asarray(acc["float"]["per_seed"])
  got = {}
  for arm in ("adam", "bop", "adam_noshort", "bop_noshort"):
    a = np.asarray(acc[arm]["per_seed"])
    comparisons = (stats.compare(f, a), stats.compare(a + 0.03, f))
    got[arm] = [round(x, 2) for c in comparisons for x in (c.p, c.ci_low, c.ci_high)]
  assert got == {"adam": [0.8, 0.4, 1.0, 1.0, 0.48, 1.0], "bop": [0.4, 0.0, 0.8, 1.0, 0.48, 1.0],
                 "adam_noshort": [0.9, 0.48, 1.0, 1.0, 0.48, 1.0], "bop_noshort": [1.0, 0.48, 1.0, 1.0, 0.48, 1.0]}
