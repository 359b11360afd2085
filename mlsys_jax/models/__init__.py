"""Flax models shared by experiments and benchmarks.

Every layer that multiplies accepts an injected ``dot_general`` (dense layers) and
``conv_general_dilated`` (convolutions), forwarded to ``flax.linen.Dense``/``Conv``, so number formats
(``mlsys_jax.quant``) plug in without new layer classes.
"""

from mlsys_jax.models.nets import CNN, MLP, ResNet20
from mlsys_jax.models.training import (
    TrainState,
    create_train_state,
    cross_entropy,
    evaluate,
    make_train_step,
    predict,
    train_classifier,
)

__all__ = [
    "CNN",
    "MLP",
    "ResNet20",
    "TrainState",
    "create_train_state",
    "cross_entropy",
    "evaluate",
    "make_train_step",
    "predict",
    "train_classifier",
]
