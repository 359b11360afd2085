"""float64 numpy references shared by the comm tests: Top-k with error feedback, per worker."""

import numpy as np


def topk_index(row: np.ndarray, k: int) -> np.ndarray:
  """Indices of the ``k`` largest magnitudes of a 1-D ``row``, ties to the lower index (as ``lax.top_k``)."""
  return np.argsort(-np.abs(row), kind="stable")[:k]


def topk_rows(acc: np.ndarray, k: int) -> np.ndarray:
  """Each worker's (row's) ``k`` largest magnitudes of ``acc`` kept, ties in index order; the rest zero."""
  sent = np.zeros_like(acc)
  for i in range(acc.shape[0]):
    top = topk_index(acc[i], k)
    sent[i, top] = acc[i, top]
  return sent


def topk_error_feedback(flat_g: np.ndarray, ratio: float, decay: float = 1.0, with_residual: bool = False):
  """Top-k with error feedback (the residual times ``decay`` before each step), ``k = max(1, round(ratio n))``:
  flat_g (workers, steps, n) -> the workers' mean sent (steps, n) (and the final residuals (workers, n))."""
  w, steps, n = flat_g.shape
  k = max(1, int(round(ratio * n)))
  res, outs = np.zeros((w, n)), []
  for s in range(steps):
    acc = flat_g[:, s] + decay * res
    sent = topk_rows(acc, k)
    res = acc - sent
    outs.append(sent.mean(0))
  return (np.stack(outs), res) if with_residual else np.stack(outs)
