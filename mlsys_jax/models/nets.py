"""Small flax.linen classifiers: MLP, a 1-D/2-D CNN and the CIFAR-style ResNet-20."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

DotGeneral = Callable[..., Any] | None
ConvGeneral = Callable[..., Any] | None


class MLP(nn.Module):
  """Multi-layer perceptron on flattened inputs.

  Attributes:
    features: widths of the hidden layers.
    num_classes: number of output logits.
    dot_general: optional replacement for ``lax.dot_general`` in every ``Dense`` (e.g. a quantized one).

  Example:
    >>> model = MLP(features=(8,), num_classes=3)
    >>> init = lambda x: model.init_with_output(jax.random.PRNGKey(0), x)
    >>> out, v = jax.eval_shape(init, jnp.ones((2, 4, 4)))          # shapes only: nothing is computed
    >>> out.shape, v["params"]["Dense_0"]["kernel"].shape          # inputs are flattened to 16 features
    ((2, 3), (16, 8))
  """
  features: Sequence[int] = (128, 128)
  num_classes: int = 10
  dot_general: DotGeneral = None
  dot_general_cls: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    x = x.reshape(x.shape[0], -1)
    dense = lambda f: nn.Dense(f, dot_general=self.dot_general, dot_general_cls=self.dot_general_cls)
    for f in self.features:
      x = nn.relu(dense(f)(x))
    return dense(self.num_classes)(x)


class CNN(nn.Module):
  """A small convolutional classifier for 1-D sequences (``dims=1``) or images (``dims=2``).

  Each entry of ``channels`` is a ``kernel_size`` convolution with ReLU followed by 2x max pooling
  (skipped once the spatial size is 1), then a hidden dense layer and the logits.

  Attributes:
    num_classes: number of output logits.
    channels: output channels of the convolutions.
    dims: 1 for inputs ``(n, length, c)``, 2 for ``(n, h, w, c)``.
    kernel_size: spatial size of every convolution kernel (per dimension).
    hidden: width of the dense layer before the logits.
    dot_general / conv_general_dilated: injected primitives for ``Dense`` / ``Conv``.
    dot_general_cls / conv_general_dilated_cls: injected flax modules (they may hold variables, e.g.
      calibration statistics); they take precedence over the functions.

  Example:
    >>> model = CNN(num_classes=5, channels=(4,), dims=1, hidden=8)   # 1-D, e.g. MNIST-1D sequences
    >>> init = lambda x: model.init_with_output(jax.random.PRNGKey(0), x)
    >>> out, v = jax.eval_shape(init, jnp.ones((2, 40, 1)))
    >>> out.shape, v["params"]["Conv_0"]["kernel"].shape
    ((2, 5), (3, 1, 4))
  """
  num_classes: int = 10
  channels: Sequence[int] = (32, 64)
  dims: int = 2
  kernel_size: int = 3
  hidden: int = 128
  dot_general: DotGeneral = None
  conv_general_dilated: ConvGeneral = None
  dot_general_cls: Any = None
  conv_general_dilated_cls: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    if x.ndim != self.dims + 2:
      raise ValueError(f"CNN(dims={self.dims}) expects inputs of rank {self.dims + 2} "
                       f"(batch, spatial..., channels), got shape {x.shape}.")
    for c in self.channels:
      x = nn.Conv(c, (self.kernel_size,) * self.dims, padding="SAME",
                  conv_general_dilated=self.conv_general_dilated,
                  conv_general_dilated_cls=self.conv_general_dilated_cls)(x)
      x = nn.relu(x)
      if min(x.shape[1:-1]) >= 2:
        x = nn.max_pool(x, (2,) * self.dims, strides=(2,) * self.dims)
    x = x.reshape(x.shape[0], -1)
    dense = lambda f: nn.Dense(f, dot_general=self.dot_general, dot_general_cls=self.dot_general_cls)
    x = nn.relu(dense(self.hidden)(x))
    return dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
  filters: int
  strides: int
  conv_general_dilated: ConvGeneral = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k, s: nn.Conv(f, (k, k), (s, s), padding="SAME", use_bias=False,
                                   conv_general_dilated=self.conv_general_dilated)
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.relu(norm()(conv(self.filters, 3, self.strides)(x)))
    y = norm()(conv(self.filters, 3, 1)(y))
    if x.shape != y.shape:  # projection shortcut (1x1 convolution), as in He et al. option B
      x = norm()(conv(self.filters, 1, self.strides)(x))
    return nn.relu(x + y)


class ResNet20(nn.Module):
  """ResNet-20 for 32x32 images (He et al., 2016, Sec. 4.2): 3 stages of 3 basic blocks, 16/32/64 filters.

  Call with ``train=True`` (and ``mutable=['batch_stats']``) while training.

  Example:
    >>> model = ResNet20(num_classes=10)
    >>> init = lambda x: model.init_with_output(jax.random.PRNGKey(0), x)
    >>> out, v = jax.eval_shape(init, jnp.ones((2, 32, 32, 3)))
    >>> out.shape, sorted(v), sum(p.size for p in jax.tree_util.tree_leaves(v["params"]))
    ((2, 10), ['batch_stats', 'params'], 272474)
  """
  num_classes: int = 10
  width: int = 16
  blocks_per_stage: int = 3
  dot_general: DotGeneral = None
  conv_general_dilated: ConvGeneral = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if x.ndim != 4:
      raise ValueError(f"ResNet20 expects images (batch, h, w, c), got shape {x.shape}.")
    x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False,
                conv_general_dilated=self.conv_general_dilated)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage in range(3):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = _BasicBlock(self.width * 2**stage, strides, self.conv_general_dilated)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dot_general=self.dot_general)(x)
