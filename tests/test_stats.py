"""Tests of mlsys_jax.stats on simulated effects with known truth (Bouthillier et al. 2021)."""

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
