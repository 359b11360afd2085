"""Timing order of the cost collection (experiments/cost_collect.py, issue 24: fixed-order bias)."""

from __future__ import annotations

import numpy as np
import pytest

from mlsys_jax.cost.dataset import timing_orders


@pytest.mark.parametrize("n,rounds", [(1, 4), (2, 10), (3, 9), (5, 12), (4, 0)])
def test_rows_are_permutations(n, rounds):
  o = timing_orders(n, rounds, np.random.default_rng(1))
  assert o.shape == (rounds, n)
  for row in o:
    assert sorted(row.tolist()) == list(range(n))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_each_variant_at_each_position_equally_often(n):
  o = timing_orders(n, 4 * n, np.random.default_rng(n))
  for pos in range(n):
    np.testing.assert_array_equal(np.bincount(o[:, pos], minlength=n), np.full(n, 4))


def test_first_variant_is_not_always_first_and_predecessors_vary():
  # The bias seen in the H100 data: variant 1 always timed right after variant 0. Over many blocks both
  # orders of the pair occur, each about half the time.
  o = timing_orders(2, 400, np.random.default_rng(0))
  first0 = np.mean(o[:, 0] == 0)
  assert first0 == 0.5  # exact: complete blocks
  o5 = timing_orders(5, 500, np.random.default_rng(0))
  after0 = [int(r[(list(r).index(0) + 1) % 5]) for r in o5 if list(r).index(0) < 4]
  counts = np.bincount(after0, minlength=5)
  assert counts[0] == 0 and (counts[1:] > 0.15 * len(after0)).all()


def test_deterministic_per_seed_and_differs_across_seeds():
  a = timing_orders(4, 8, np.random.default_rng(7))
  b = timing_orders(4, 8, np.random.default_rng(7))
  c = timing_orders(4, 8, np.random.default_rng(8))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("n,rounds", [(0, 3), (-1, 3), (2, -1), (2.0, 3), (True, 3)])
def test_bad_input(n, rounds):
  with pytest.raises(ValueError, match="timing_orders"):
    timing_orders(n, rounds, np.random.default_rng(0))
