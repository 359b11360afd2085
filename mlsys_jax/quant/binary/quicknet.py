"""QuickNet, QuickNetSmall and QuickNetLarge (Larq Zoo v1.0) in flax linen.

Bannink et al., MLSys 2021, Sec. 5 (QuickNet, the network family designed with LCE), as defined by
``larq_zoo/sota/quicknet.py``:

- stem: conv3x3 s2 (f/4) -> BN -> ReLU -> depthwise 3x3 s2 -> BN (no scale/center) -> conv1x1 (f) -> BN;
- residual block: ``x + BN(ReLU(bconv3x3(x)))`` with ``ste_sign(clip=1.25)`` on input and kernel,
  ``WeightClip(1.25)`` (here: :func:`weight_clip` in the optimizer), ``pad_values=1``, BN momentum 0.9,
  eps 1e-5;
- transition (when the width changes): ReLU -> MaxPool(2, stride 1, valid) -> fixed blur depthwise
  3x3 stride 2 ([1,2,1] x [1,2,1] / 16, not trainable) -> FP conv1x1 -> BN;
- head: ReLU -> global average pool -> Dense (logits; the zoo adds a softmax).

Stem BNs use Keras' defaults (momentum 0.99, eps 1e-3). Binary convolutions are named ``BinaryConv``
so :func:`mlsys_jax.quant.binary.case_optimizer` routes them to Bop. Two switches make the same model a
baseline for experiments: ``binary=False`` (the blocks' convolutions in float, same architecture) and
``shortcut=False`` (no full-precision residual connections). ``stem_strides`` and ``stem_momentum``
adapt the stem to small images and short runs (the zoo uses strides 2, 2 and Keras' momentum 0.99).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax._checks import check_int
from mlsys_jax.quant.binary.layers import binary_conv_general_dilated
from mlsys_jax.quant.binary.quantizers import ste_sign

__all__ = ["QuickNet", "QuickNetBlock", "QuickNetLarge", "QuickNetSmall", "blur_kernel",
           "larq_param_count"]

_HE = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
_GLOROT = nn.initializers.variance_scaling(1.0, "fan_avg", "truncated_normal")


def blur_kernel(channels: int) -> np.ndarray:
  """The fixed anti-aliasing depthwise kernel ``[1,2,1] x [1,2,1] / 16`` as HWIO ``(3, 3, 1, C)`` float32.

  QuickNet's transition blocks (Bannink et al., MLSys 2021, Sec. 5; ``larq_zoo/sota/quicknet.py``) blur
  before the stride-2 downsampling (anti-aliased downsampling, Zhang, ICML 2019). Every channel gets the
  same binomial filter ``outer([1,2,1], [1,2,1]) / 16``: its taps sum to 1 (a constant image is kept) and
  it is separable and symmetric. Use it with ``feature_group_count=C`` (depthwise); it is not trained.

  Args:
    channels: ``C``, the number of channels, an integer ``>= 1``.

  Example:
    >>> k = blur_kernel(2)
    >>> k.shape, (k[:, :, 0, 1] * 16).tolist()
    ((3, 3, 1, 2), [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
  """
  check_int("channels", channels, 1)
  k = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0])
  k = k / k.sum()
  return np.repeat(k[:, :, None, None], channels, axis=3).astype(np.float32)


class QuickNetBlock(nn.Module):
  """QuickNet's residual block (Bannink et al., MLSys 2021, Sec. 5; ``larq_zoo/sota/quicknet.py``):
  ``x + BN(ReLU(bconv3x3(x)))``, or ``BN(ReLU(bconv3x3(x)))`` when ``shortcut=False``.

  ``bconv3x3`` is a 3x3 stride-1 convolution with as many output channels as inputs, no bias, ``'SAME'``
  padding with +1 (LCE's ``pad_values=1``) and ``ste_sign(clip)`` on both its input and its kernel
  (``binary=False``: a float convolution with zero padding). BN: momentum 0.9, eps 1e-5. The output
  has the input's shape (N, H, W, C).

  Attributes:
    clip: STE clip of the sign quantizers (``> 0``; the zoo's 1.25).
    binary: binary (True) or float (False) convolution.
    shortcut: add the full-precision residual ``x``.

  Call args: ``x`` float (N, H, W, C); ``train`` uses batch statistics (pass ``mutable=['batch_stats']``).
  """
  clip: float = 1.25
  binary: bool = True
  shortcut: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    if np.ndim(x) != 4:
      raise ValueError(f"QuickNetBlock expects feature maps (N, H, W, C), got shape {np.shape(x)}.")
    if not (isinstance(self.clip, (int, float, np.floating)) and np.isfinite(self.clip) and self.clip > 0):
      raise ValueError(f"QuickNetBlock.clip must be a finite number > 0 (the STE clip, e.g. 1.25), got "
                       f"{self.clip!r}.")
    c = x.shape[-1]
    if self.binary:
      q = functools.partial(ste_sign, clip=self.clip)
      conv = nn.Conv(c, (3, 3), padding="SAME", use_bias=False, kernel_init=_GLOROT, name="BinaryConv",
                     conv_general_dilated=binary_conv_general_dilated(q, q, pad_value=1.0))
    else:
      conv = nn.Conv(c, (3, 3), padding="SAME", use_bias=False, kernel_init=_GLOROT, name="Conv")
    y = nn.relu(conv(x))
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="BatchNorm")(y)
    return x + y if self.shortcut else y


class QuickNet(nn.Module):
  """QuickNet (Larq Zoo v1.0): blocks (4, 4, 4, 4), filters (64, 128, 256, 512).

  Call with ``train=True`` and ``mutable=['batch_stats']`` while training.

  >>> m = QuickNet(section_blocks=(1, 1), section_filters=(8, 16), num_classes=3)
  >>> v = m.init(jax.random.PRNGKey(0), jnp.ones((1, 16, 16, 3)))
  >>> m.apply(v, jnp.ones((2, 16, 16, 3))).shape
  (2, 3)
  """
  section_blocks: Sequence[int] = (4, 4, 4, 4)
  section_filters: Sequence[int] = (64, 128, 256, 512)
  num_classes: int = 1000
  include_top: bool = True
  clip: float = 1.25
  binary: bool = True
  shortcut: bool = True
  stem_strides: tuple[int, int] = (2, 2)
  stem_momentum: float = 0.99

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"QuickNet expects images (batch, h, w, c), got shape {x.shape}.")
    if len(self.section_blocks) != len(self.section_filters):
      raise ValueError("section_blocks and section_filters must have the same length, got "
                       f"{self.section_blocks} and {self.section_filters}.")
    f0 = self.section_filters[0]
    if f0 % 4:
      raise ValueError(f"the first section's filters must be a multiple of 4, got {f0}.")
    s1, s2 = self.stem_strides
    keras_bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=self.stem_momentum,
                                 epsilon=1e-3)
    x = nn.Conv(f0 // 4, (3, 3), strides=s1, padding="SAME", use_bias=False, kernel_init=_HE,
                name="StemConv")(x)
    x = nn.relu(keras_bn(name="StemBN_0")(x))
    x = nn.Conv(f0 // 4, (3, 3), strides=s2, padding="SAME", use_bias=False,
                feature_group_count=f0 // 4, kernel_init=nn.initializers.glorot_uniform(),
                name="StemDepthwise")(x)
    x = keras_bn(use_scale=False, use_bias=False, name="StemBN_1")(x)
    x = nn.Conv(f0, (1, 1), use_bias=False, kernel_init=_HE, name="StemPointwise")(x)
    x = keras_bn(name="StemBN_2")(x)
    t = 0
    for blocks, filters in zip(self.section_blocks, self.section_filters):
      for _ in range(blocks):
        if filters != x.shape[-1]:
          x = self._transition(x, filters, train, t)
          t += 1
        x = QuickNetBlock(self.clip, self.binary, self.shortcut)(x, train)
    if not self.include_top:
      return x
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=_GLOROT, name="Head")(x)

  def _transition(self, x, filters, train, t):
    c = x.shape[-1]
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(1, 1), padding="VALID")
    x = jax.lax.conv_general_dilated(x, jnp.asarray(blur_kernel(c), x.dtype), (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    x = nn.Conv(filters, (1, 1), use_bias=False, kernel_init=_GLOROT, name=f"TransitionConv_{t}")(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        name=f"TransitionBN_{t}")(x)


class QuickNetSmall(QuickNet):
  """QuickNetSmall (Larq Zoo v1.0): filters (32, 64, 256, 512)."""
  section_filters: Sequence[int] = (32, 64, 256, 512)


class QuickNetLarge(QuickNet):
  """QuickNetLarge (Larq Zoo v1.0): blocks (6, 8, 12, 6)."""
  section_blocks: Sequence[int] = (6, 8, 12, 6)


def larq_param_count(model: QuickNet, variables: Any) -> dict:
  """Parameter counts of a QuickNet in the conventions of flax and of Larq's ``models.summary``.

  Larq's summary (which the zoo's published counts come from) folds each BatchNorm's
  ``(beta, moving_mean)`` and ``(gamma, moving_variance)`` pairs, i.e. counts 2 per channel, and counts
  the fixed blur kernels (``trainable=False`` weights). ``variables`` may be ``jax.eval_shape`` output.

  Returns a dict with ``larq_total``, ``binary`` (1-bit kernels), ``float`` (the rest, Larq's
  convention), ``flax_params``, ``flax_batch_stats``, ``blur`` and ``larq_memory_bytes`` (1 bit per
  binary weight, 32 bits otherwise).
  """
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = lambda p: tuple(getattr(k, "key", str(k)) for k in p)
  size = lambda a: int(np.prod(a.shape))
  binary = sum(size(a) for p, a in flat if "BinaryConv" in names(p))
  flax_params = sum(size(a) for _, a in flat)
  flax_stats = sum(size(a) for a in jax.tree_util.tree_leaves(stats))
  bn_channels = sum(size(a) for p, a in jax.tree_util.tree_flatten_with_path(stats)[0]
                    if names(p)[-1] == "mean")
  bn_params = sum(size(a) for p, a in flat if names(p)[-1] in ("scale", "bias")
                  and any("BN" in n or "BatchNorm" in n for n in names(p)))
  blur = 0
  for t in range(len(model.section_filters)):
    if f"TransitionConv_{t}" in params:
      blur += 9 * params[f"TransitionConv_{t}"]["kernel"].shape[2]
  total = flax_params - bn_params + 2 * bn_channels + blur
  return {"larq_total": total, "binary": binary, "float": total - binary, "flax_params": flax_params,
          "flax_batch_stats": flax_stats, "blur": blur,
          "larq_memory_bytes": (binary + 32 * (total - binary)) / 8}
