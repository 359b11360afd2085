"""mlsys_jax.robust: faults and adversaries.

- ``bit_errors``: bit-error injection, weight clipping, RandBET (Stutz et al., MLSys 2021).
- ``byzshield``: redundant assignment, majority vote, robust aggregation, attacks (ByzShield, MLSys 2021).
- ``gradsigns``: watermarking through input gradients (GradSigns, MLSys 2021).
"""

from mlsys_jax.robust.bit_errors import *  # noqa: F401,F403
from mlsys_jax.robust.byzshield import *  # noqa: F401,F403
from mlsys_jax.robust.gradsigns import *  # noqa: F401,F403

from mlsys_jax.robust import bit_errors as _bit_errors, byzshield as _byzshield, gradsigns as _gradsigns

__all__ = [*_bit_errors.__all__, *_byzshield.__all__, *_gradsigns.__all__]
