"""mlsys_jax.quant: number formats.

Fixed-point codes (symmetric/asymmetric, per-tensor/per-channel, signed/unsigned, nearest/stochastic
rounding), VS-Quant per-vector scaled quantization with two-level scales (Dai et al., MLSys 2021),
straight-through fake quantization, range calibration, and quantized ``dot_general``/convolution for
flax layers with an emulation path and an int8/int32 integer path; weight-only int4 (W4A16) with
per-group scales and a Pallas GEMV for small batches (``pack_int4``, ``w4a16_matmul``).

Subpackages and modules imported on their own:

- ``mlsys_jax.quant.binary``: binarized networks as in Larq and the Larq Compute Engine (Bannink et al.,
  MLSys 2021): quantizers, binary dot/conv, Bop, QuickNet, bit-packed XOR-popcount inference.
- ``mlsys_jax.quant.fp_align``: floating-point inner products with limited alignment (Abdelaziz et al., MLSys
  2021): ``fp_dot``, temporal decomposition, block floating point, flax injection.
"""

from mlsys_jax.quant.calibration import CALIBRATION_METHODS, calibrate_amax
from mlsys_jax.quant.fixed_point import (QuantizedTensor, code_dtype, compute_scale, dequantize,
                                         fake_quant, qrange, quantize, sqnr_db, straight_through)
from mlsys_jax.quant.layers import (QuantConfig, QuantConv, QuantDotGeneral, QuantSpec,
                                    calibration_to_amax, quantized_conv_general_dilated,
                                    quantized_dot_general)
from mlsys_jax.quant.vsquant import VSQuantizedTensor, vs_dequantize, vs_fake_quant, vs_quantize
from mlsys_jax.quant.weight_only import Int4Weights, dequantize_int4, pack_int4, w4a16_matmul

__all__ = [
    "CALIBRATION_METHODS",
    "Int4Weights",
    "QuantConfig",
    "QuantConv",
    "QuantDotGeneral",
    "QuantSpec",
    "QuantizedTensor",
    "VSQuantizedTensor",
    "calibrate_amax",
    "calibration_to_amax",
    "code_dtype",
    "compute_scale",
    "dequantize",
    "dequantize_int4",
    "fake_quant",
    "pack_int4",
    "qrange",
    "quantize",
    "quantized_conv_general_dilated",
    "quantized_dot_general",
    "sqnr_db",
    "straight_through",
    "vs_dequantize",
    "vs_fake_quant",
    "vs_quantize",
    "w4a16_matmul",
]
