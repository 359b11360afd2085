"""Data loaders that return numpy arrays with a fixed, seeded train/test split.

Nothing here downloads anything at run time:

- :func:`load_digits`: the 8x8 handwritten digits that ship inside scikit-learn (1797 images).
- :func:`load_mnist1d`: MNIST-1D (Greydanus, 2020), generated procedurally by the ``mnist1d`` package.
- :func:`load_cifar10`: CIFAR-10 from the standard binary files (``cifar-10-batches-bin``) in a directory.
- :func:`synthetic_classification`: Gaussian class clusters of any shape, for tests.
- :func:`batches`: a seeded minibatch iterator.
"""

from mlsys_jax.data.loaders import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASETS,
    Dataset,
    batches,
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist1d,
    read_cifar10_batch,
    synthetic_classification,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "Dataset",
    "batches",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist1d",
    "read_cifar10_batch",
    "synthetic_classification",
]
