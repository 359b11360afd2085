"""mlsys_jax.comm: gradient compression for data-parallel training.

- ``sparse``: static-capacity sparse payloads, selection kernels, Top-k, DGC, SIDCo (MLSys 2021).
- ``lowrank``: PowerSGD (Vogels et al., 2019).
- ``accordion``: ACCORDION adaptive compression (Agarwal et al., MLSys 2021).
"""

from mlsys_jax.comm.sparse import *  # noqa: F401,F403
from mlsys_jax.comm.lowrank import *  # noqa: F401,F403
from mlsys_jax.comm.accordion import *  # noqa: F401,F403
