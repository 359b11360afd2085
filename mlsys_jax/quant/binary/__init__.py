"""mlsys_jax.quant.binary: binarized neural networks as in Larq and the Larq Compute Engine.

Bannink et al., "Larq Compute Engine: Design, Benchmark, and Deploy State-of-the-Art Binarized Neural
Networks", MLSys 2021: Larq's quantizers with their exact pseudo-gradients, a weight clip, binary
``dot_general``/convolution injected into flax layers, the Bop optimizer as an optax transform routed
with ``optax.multi_transform``, QuickNet, a bit-packed XOR-popcount inference path, and a deployable byte
format for a trained QuickNet (packed binary kernels, int8 transitions, a 4-bit VS-Quant head).
"""

from mlsys_jax.quant.binary.bop import (BopState, binary_param_labels, bop, case_optimizer,
                                        flip_ratio)
from mlsys_jax.quant.binary.export import (compress_quicknet, deserialize, load_quicknet, serialize,
                                           serialized_nbytes)
from mlsys_jax.quant.binary.layers import binary_conv_general_dilated, binary_dot_general
from mlsys_jax.quant.binary.packed import (PackedConv2D, PackedDense, convert_quicknet, fold_batchnorm,
                                           pack_bits, pack_conv2d, pack_dense, packed_conv2d,
                                           packed_dense, packed_nbytes, unpack_bits)
from mlsys_jax.quant.binary.pallas_dense import pallas_packed_dense
from mlsys_jax.quant.binary.quicknet import (QuickNet, QuickNetBlock, QuickNetLarge, QuickNetSmall,
                                             blur_kernel, larq_param_count)
from mlsys_jax.quant.binary.quantizers import (approx_sign, dorefa, larq_sign, magnitude_aware_sign,
                                               ste_heaviside, ste_sign, ste_tern, swish_sign,
                                               weight_clip)

__all__ = [
    "BopState",
    "PackedConv2D",
    "PackedDense",
    "QuickNet",
    "QuickNetBlock",
    "QuickNetLarge",
    "QuickNetSmall",
    "approx_sign",
    "binary_conv_general_dilated",
    "blur_kernel",
    "binary_dot_general",
    "binary_param_labels",
    "bop",
    "case_optimizer",
    "compress_quicknet",
    "convert_quicknet",
    "deserialize",
    "dorefa",
    "flip_ratio",
    "fold_batchnorm",
    "larq_param_count",
    "larq_sign",
    "load_quicknet",
    "magnitude_aware_sign",
    "pack_bits",
    "pack_conv2d",
    "pack_dense",
    "packed_conv2d",
    "packed_dense",
    "packed_nbytes",
    "pallas_packed_dense",
    "serialize",
    "serialized_nbytes",
    "ste_heaviside",
    "ste_sign",
    "ste_tern",
    "swish_sign",
    "unpack_bits",
    "weight_clip",
]
