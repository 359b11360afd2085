"""mlsys_jax.cost: see README.md. Public names are re-exported here."""
