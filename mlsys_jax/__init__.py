"""mlsys-jax: pure, composable JAX transforms from the systems papers of MLSys 2021.

Import techniques from their subpackage, e.g. ``from mlsys_jax.comm import sidco``.
"""

__version__ = "0.1.0"
