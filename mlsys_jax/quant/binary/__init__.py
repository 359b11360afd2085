"""mlsys_jax.quant.binary: binarized neural networks as in Larq and the Larq Compute Engine.

Bannink et al., "Larq Compute Engine: Design, Benchmark, and Deploy State-of-the-Art Binarized Neural
Networks", MLSys 2021: Larq's quantizers with their exact pseudo-gradients, a weight clip, binary
``dot_general``/convolution injected into flax layers, the Bop optimizer as an optax transform routed
with ``optax.multi_transform``, QuickNet, and a bit-packed XOR-popcount inference path.
"""

from mlsys_jax.quant.binary.quantizers import (approx_sign, dorefa, larq_sign, magnitude_aware_sign,
                                               ste_heaviside, ste_sign, ste_tern, swish_sign,
                                               weight_clip)

__all__ = [
    "approx_sign",
    "dorefa",
    "larq_sign",
    "magnitude_aware_sign",
    "ste_heaviside",
    "ste_sign",
    "ste_tern",
    "swish_sign",
    "weight_clip",
]
