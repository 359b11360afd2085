"""mlsys-jax: pure, composable JAX transforms from the systems papers of MLSys 2021.

Import techniques from their subpackage, e.g. ``from mlsys_jax.comm import sidco``:

- ``mlsys_jax.quant``: VS-Quant, fixed-point codes; ``quant.binary`` (Larq/LCE); ``quant.fp_align``.
- ``mlsys_jax.comm``: SIDCo, Top-k, DGC, Random-k, PowerSGD, ACCORDION; ``comm.distributed`` (jax.distributed).
- ``mlsys_jax.robust``: bit errors and RandBET, ByzShield, GradSigns.
- ``mlsys_jax.sched``: IOS; ``sched.dynamic`` (Nimble); ``sched.placement`` (FirePlace).
- ``mlsys_jax.cost``: learned performance models of XLA HLO; ``cost.value`` (Value Learning).
- ``mlsys_jax.infer``: sensAI, MicroRec, exact range-bound video inference.
- ``mlsys_jax.profile``: RL-Scope-style operation profiling with overhead correction.
- ``mlsys_jax.stats``, ``mlsys_jax.data``, ``mlsys_jax.models``: comparisons, loaders, shared models.
"""

__version__ = "0.1.0"
