"""IOS on networks that are not flax: a plain-jax network (parameters in a dict, lax convolutions) and an
equinox network (NCHW convolutions under vmap), scheduled end to end with the analytical model (CPU)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax import lax

from mlsys_jax import sched


def _plain_params(key, cin=8):
  ks = jax.random.split(key, 8)
  he = lambda k, shape: jax.random.normal(k, shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
  return {"b1": he(ks[0], (1, 1, cin, 8)), "b2a": he(ks[1], (1, 1, cin, 6)), "b2b": he(ks[2], (3, 3, 6, 8)),
          "b3a": he(ks[3], (1, 1, cin, 4)), "b3b": he(ks[4], (5, 5, 4, 8)),
          "bias": {k: 0.01 * jax.random.normal(ks[5 + i % 3], (w,)) for i, (k, w) in
                   enumerate([("b1", 8), ("b2a", 6), ("b2b", 8), ("b3a", 4), ("b3b", 8)])},
          "head": he(ks[7], (24, 10))}


def _plain_net(p, x):
  """An Inception-style block in plain jax: three branches from one input, concatenated, pooled."""
  conv = lambda h, name: jax.nn.relu(lax.conv_general_dilated(
      h, p[name], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"][name])
  b1 = conv(x, "b1")
  b2 = conv(conv(x, "b2a"), "b2b")
  b3 = conv(conv(x, "b3a"), "b3b")
  y = jnp.concatenate([b1, b2, b3], axis=-1)
  return jnp.mean(y, axis=(1, 2)) @ p["head"]


def test_plain_jax_network_scheduled_end_to_end():
  p = _plain_params(jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 8))
  s = sched.ios_schedule(_plain_net, p, x, static_argnums=(0,), strategy="merge")
  np.testing.assert_allclose(s(x), _plain_net(p, x), rtol=2e-5, atol=2e-5)
  # the three 1x1 convs read the same input: IOS-Merge joins them into one kernel
  assert s.counts()["merge_stages"] >= 1 and s.counts()["merged_units"] >= 2
  assert s.info["check"]["method"] == "analytical"


def test_equinox_network_scheduled_end_to_end():
  eqx = pytest.importorskip("equinox")

  class Block(eqx.Module):
    a: eqx.nn.Conv2d
    b: eqx.nn.Conv2d
    c: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
      ka, kb, kc, kh = jax.random.split(key, 4)
      self.a = eqx.nn.Conv2d(4, 8, 1, key=ka)
      self.b = eqx.nn.Conv2d(4, 8, 3, padding=1, key=kb)
      self.c = eqx.nn.Conv2d(8, 8, 3, padding=1, key=kc)
      self.head = eqx.nn.Linear(16, 5, key=kh)

    def __call__(self, x):                     # x: (C, H, W), equinox's layout
      h = jnp.concatenate([jax.nn.relu(self.a(x)), self.c(jax.nn.relu(self.b(x)))], axis=0)
      return self.head(jnp.mean(h, axis=(1, 2)))

  model = Block(jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 12, 12))
  f = jax.vmap(model)
  s = sched.ios_schedule(f, x)
  np.testing.assert_allclose(s(x), f(x), rtol=2e-5, atol=2e-5)
  assert s.counts()["units"] >= 3
