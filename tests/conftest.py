"""Test configuration: 8 simulated CPU devices for collective code, float32 defaults."""

import os

# Must happen before jax is imported anywhere in the test session.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# Simulated devices are threads; on a loaded 2-core machine a collective can wait longer than XLA's
# default 40 s rendezvous limit, which aborts the process. Allow more time.
if "collective_call_terminate_timeout" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_collective_call_terminate_timeout_seconds=600"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
  devs = jax.devices()
  assert len(devs) >= 8, f"expected 8 simulated devices, got {len(devs)}; check XLA_FLAGS"
  return devs[:8]
