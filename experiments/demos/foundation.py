"""Demo rows of the foundation: the data, the models, the training loop and the variance-aware stats."""

import optax

from mlsys_jax import data, models, stats

ORDER = 0
TECHNIQUE = "foundation"


def run(seed: int):
  ds = data.load_digits(seed=seed)
  cnn_acc, mlp_acc = [], []
  for s in range(3):  # three paired trials: same split, init seed s, data order s
    _, h = models.train_classifier(models.CNN(channels=(16, 32), hidden=64), ds, optax.adam(2e-3),
                                   epochs=4, batch_size=32, seed=seed + s)
    cnn_acc.append(h["test_accuracy"][-1])
    _, h = models.train_classifier(models.MLP(features=(64,)), ds, optax.adam(2e-3), epochs=4,
                                   batch_size=32, seed=seed + s)
    mlp_acc.append(h["test_accuracy"][-1])
  c = stats.compare(cnn_acc, mlp_acc)
  return [
      ("data+models", "CNN test accuracy on sklearn digits (4 epochs, mean of 3 seeds)",
       f"{sum(cnn_acc) / 3:.3f}"),
      ("stats (Bouthillier)", "P(CNN > MLP) on digits, 3 paired trials [95% CI] (3 trials cannot be "
       "significant: the interval spans 0.5 however large the gap; Noether's N below)",
       f"{c.p:.2f} [{c.ci_low:.2f}, {c.ci_high:.2f}]"),
      ("stats (Bouthillier)", "Noether trials needed for gamma=0.75", str(stats.noether_sample_size(0.75))),
  ]
