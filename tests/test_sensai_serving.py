"""sensAI serving path: 64-byte aligned host inputs (host_aligned) and ShardedPredictor on numpy input."""

from __future__ import annotations

import numpy as np
import pytest

from mlsys_jax.infer import sensai
from tests.test_sensai_parallel import _combine64, _subnets


@pytest.mark.parametrize("offset", [0, 1, 3, 5])
def test_host_aligned(offset):
  base = np.arange(4 * 7 * 5, dtype=np.float32)
  x = base[offset:offset + 4 * 7 * 4].reshape(4, 7, 4)[:, :, 1:]   # often unaligned and not contiguous
  a = sensai.host_aligned(x)
  assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous
  np.testing.assert_array_equal(a, x)
  assert a.dtype == x.dtype
  assert sensai.host_aligned(a) is a                                  # no copy when already aligned
  assert sensai.host_aligned(a, alignment=32) is a
  with pytest.raises(ValueError, match="alignment"):
    sensai.host_aligned(x, alignment=0)


def test_predictor_on_unaligned_numpy_input():
  """The predictor aligns a numpy input itself: every offset gives the float64 reference."""
  subs, x = _subnets([(0, 1), (2,), (3, 4), (5,)], 6)
  predict = sensai.make_sharded_predictor(subs, 6)
  ref = _combine64(subs, x, 6, [1.0] * 4)
  buf = np.zeros(x.size + 16, np.float32)
  for off in (0, 1, 2, 3):
    xu = buf[off:off + x.size].reshape(x.shape)
    xu[...] = x
    np.testing.assert_allclose(np.asarray(predict(xu)), ref, rtol=1e-5, atol=1e-6)
