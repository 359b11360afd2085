"""Flax models shared by experiments and benchmarks.

Every layer that multiplies accepts an injected ``dot_general`` (dense layers) and
``conv_general_dilated`` (convolutions), forwarded to ``flax.linen.Dense``/``Conv``, so number formats
(``mlsys_jax.quant``) plug in without new layer classes.

The four IOS benchmark networks (Inception-V3, SqueezeNet, RandWire, NasNet-A; Ding et al., MLSys
2021) live in :mod:`mlsys_jax.models.ios_nets`; ``ios_benchmark_nets()`` returns them with their input
shapes.
"""

from mlsys_jax.models.ios_nets import (
    IOS_OP_COUNTS,
    InceptionV3,
    NasNetA,
    RandWire,
    SqueezeNet,
    ios_benchmark_nets,
    ios_init_params,
    watts_strogatz_dag,
)
from mlsys_jax.models.nets import CNN, MLP, ResNet20
from mlsys_jax.models.training import (
    TrainState,
    create_train_state,
    cross_entropy,
    evaluate,
    make_simulated_data_parallel_step,
    make_train_step,
    predict,
    replicate,
    train_classifier,
)

__all__ = [
    "CNN",
    "IOS_OP_COUNTS",
    "InceptionV3",
    "MLP",
    "NasNetA",
    "RandWire",
    "ResNet20",
    "SqueezeNet",
    "TrainState",
    "create_train_state",
    "cross_entropy",
    "evaluate",
    "make_simulated_data_parallel_step",
    "make_train_step",
    "predict",
    "replicate",
    "train_classifier",
    "ios_benchmark_nets",
    "ios_init_params",
    "watts_strogatz_dag",
]
