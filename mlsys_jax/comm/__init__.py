"""mlsys_jax.comm: gradient compression for data-parallel training.

- ``sparse``: static-capacity sparse payloads, selection kernels, Top-k, DGC, Random-k, SIDCo (MLSys 2021).
- ``lowrank``: PowerSGD (Vogels et al., NeurIPS 2019): ``powersgd``, ``powersgd_step``,
  ``orthogonalize``, ``powersgd_bytes``, ``total_bytes``.
- ``shared_select``: ScaleCom's cyclic local Top-k (Chen et al., NeurIPS 2020): ``leader_topk`` (every worker
  sends its values at one rotating leader's Top-k indices, with error feedback).
- ``accordion``: ACCORDION adaptive compression (Agarwal et al., MLSys 2021): ``accordion`` (per-layer
  switching of PowerSGD ranks or Top-k densities), ``critical_regime``, ``accordion_batch_size``,
  ``accordion_regime``, ``accordion_report``.

- ``distributed`` (import the module: ``from mlsys_jax.comm import distributed``): data-parallel training
  across processes with ``jax.distributed`` (bounded join, global mesh, per-process batches, cross-process
  checks, a step that runs these transforms and ByzShield's vote over all processes' devices).

Every transform takes ``axis_name`` for its collectives (None: one device) and counts the bytes each
device sends in its state.

Note: ``from mlsys_jax.comm import accordion`` gives the *function* (the public name follows the
paper); the module is ``mlsys_jax.comm.accordion`` in ``sys.modules`` (``from mlsys_jax.comm.accordion
import ...`` works as usual).
"""

from mlsys_jax.comm.sparse import *  # noqa: F401,F403
from mlsys_jax.comm.lowrank import *  # noqa: F401,F403
from mlsys_jax.comm.accordion import *  # noqa: F401,F403
from mlsys_jax.comm.warmup import *  # noqa: F401,F403
from mlsys_jax.comm.adaptive_ef import *  # noqa: F401,F403
from mlsys_jax.comm.shared_select import *  # noqa: F401,F403

import sys as _sys

from mlsys_jax.comm import (adaptive_ef as _adaptive_ef, lowrank as _lowrank, shared_select as _shared_select,
                            sparse as _sparse, warmup as _warmup)

# what is public: the submodules' own lists (``accordion`` here is the function; its module is in sys.modules)
__all__ = [*_sparse.__all__, *_lowrank.__all__, *_sys.modules["mlsys_jax.comm.accordion"].__all__,
           *_warmup.__all__, *_adaptive_ef.__all__, *_shared_select.__all__]
