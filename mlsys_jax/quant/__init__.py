"""mlsys_jax.quant: see README.md. Public names are re-exported here."""
