"""mlsys_jax.sched: see README.md. Public names are re-exported here."""
