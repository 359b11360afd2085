"""Demo rows of mlsys_jax.quant.binary (Larq / LCE, MLSys 2021): QuickNet size, packed exactness, Bop."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax import data, models
from mlsys_jax.quant import binary as qb

ORDER = 12
TECHNIQUE = "Larq/LCE binary"


class _BinaryMLP(nn.Module):
  """FP input layer -> BN -> binary hidden layer (binary weights and activations) -> BN -> FP logits."""
  binary: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    x = bn()(nn.Dense(128)(x))
    dg = qb.binary_dot_general() if self.binary else None
    x = bn()(nn.Dense(128, use_bias=False, dot_general=dg, name="BinaryDense" if self.binary else "Hidden")(
        x if self.binary else nn.relu(x)))
    return nn.Dense(10)(x if self.binary else nn.relu(x))


def run(seed: int):
  rows = []
  m = qb.QuickNet()
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  c = qb.larq_param_count(m, shapes)
  rows.append((TECHNIQUE, "QuickNet parameters (Larq summary convention) vs Larq Zoo's 13,234,088",
               f"{c['larq_total']:,}"))
  # The packed file's size depends only on the shapes: fill them with random values (a trained model gives the same
  # byte count; docs/binary.md has digits accuracy of the compressed model).
  rng = np.random.default_rng(seed)
  variables = jax.tree_util.tree_map(lambda s: (0.5 + np.abs(rng.standard_normal(s.shape))).astype(s.dtype), shapes)
  blob = qb.serialize(qb.compress_quicknet(m, variables, (32, 32, 3)))
  rows.append((TECHNIQUE, "QuickNet file: packed binary kernels, int8 transitions, 4-bit VS-Quant head / float32",
               f"{len(blob) / 2**20:.2f} MiB / {4 * c['larq_total'] / 2**20:.1f} MiB "
               f"(1/{4 * c['larq_total'] / len(blob):.2f}; target 1/25)"))
  rng = np.random.default_rng(seed)
  x = np.where(rng.random((1, 8, 8, 64)) < 0.5, -1.0, 1.0).astype(np.float32)
  w = np.where(rng.random((3, 3, 64, 32)) < 0.5, -1.0, 1.0).astype(np.float32)
  packed = qb.packed_conv2d(qb.pack_bits(x), qb.pack_conv2d(w, (8, 8), pad_value=0.0))
  ref = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
  rows.append((TECHNIQUE, "XOR-popcount conv (zero padding corrected) == float +-1 conv, elements equal",
               f"{int(np.sum(np.asarray(packed) == np.asarray(ref)))}/{ref.size}"))
  ds = data.load_digits(seed=seed)
  accs = {}
  for name, binary, tx in (
      ("float", False, optax.adam(3e-3)),
      ("binary+Bop", True, qb.case_optimizer(qb.bop(threshold=1e-6, gamma=1e-2), optax.adam(3e-3)))):
    v, hist = models.train_classifier(_BinaryMLP(binary), ds, tx, epochs=6, batch_size=64, seed=seed)
    accs[name] = hist["test_accuracy"][-1]
  rows.append((TECHNIQUE, "digits MLP test accuracy: float / binary hidden layer trained by Bop "
               "(case_optimizer = Larq's CaseOptimizer)", f"{accs['float']:.3f} / {accs['binary+Bop']:.3f}"))
  return rows
