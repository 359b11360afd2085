"""Small parameter/gradient pytrees shared by the comm tests (a conv kernel, a dense kernel, a bias)."""

import jax
import jax.numpy as jnp


def params():
  return {"conv": jnp.zeros((3, 3, 4, 8)), "dense": jnp.zeros((40, 10)), "bias": jnp.zeros((10,))}


def grads(seed, scale=1.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {"conv": scale * jax.random.normal(ks[0], (3, 3, 4, 8)),
          "dense": scale * jax.random.normal(ks[1], (40, 10)),
          "bias": scale * jax.random.normal(ks[2], (10,))}
