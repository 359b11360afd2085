"""Test fixtures. The environment (8 simulated CPU devices, collective time-outs) is set up by the root
``conftest.py`` before jax is imported."""

import jax
import pytest


@pytest.fixture(scope="session")
def devices():
  devs = jax.devices()
  assert len(devs) >= 8, f"expected 8 simulated devices, got {len(devs)}; check XLA_FLAGS"
  return devs[:8]
