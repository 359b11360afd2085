"""Demo rows of mlsys_jax.infer.sensai: a digits CNN split into 5 class-group subnets (equal-size k-means
groups, APoZ-ranked pruning to 40% of the channels per layer, one-vs-rest retraining of all subnets as
one vmapped program), combined by the vmapped ensemble; accuracy and FLOPs against the original."""

import numpy as np
import optax

from mlsys_jax import data, models
from mlsys_jax.infer import sensai

ORDER = 60
TECHNIQUE = "sensAI"


def run(seed: int):
  ds = data.load_digits(seed=seed)
  model = models.CNN(num_classes=10, channels=(32, 64), hidden=128)
  variables, _ = models.train_classifier(model, ds, optax.adam(2e-3), epochs=12, seed=seed)
  acc0 = models.evaluate(model, variables, ds.x_test, ds.y_test)
  groups = sensai.group_classes(sensai.penultimate_features(model, variables, ds.x_train), ds.y_train, 5)
  subs = []
  for g in groups:
    st = sensai.channel_stats(model, variables, ds.x_train[np.isin(ds.y_train, g)])
    subs.append(sensai.make_subnet(model, variables, g, sensai.prune_masks(st, keep_fraction=0.4)))
  subs, _ = sensai.retrain_subnets(subs, ds, optax.adam(1e-3), epochs=8, seed=seed)
  ens = sensai.stack_subnets(subs, 10)
  acc = float(np.mean(np.argmax(np.asarray(sensai.ensemble_predict(ens, ds.x_test)), -1) == ds.y_test))
  f0 = sensai.count_flops(model, variables, ds.input_shape)
  frac = max(sensai.count_flops(s.model, s.variables, ds.input_shape) for s in subs) / f0
  return [
      ("sensAI", f"digits CNN -> 5 class-group subnets {list(groups)}: combined test accuracy (vmapped, "
       "uncalibrated) vs original", f"{acc:.3f} vs {acc0:.3f}"),
      ("sensAI", "largest subnet's FLOPs / original (keep 40% of channels, lowest APoZ)", f"{frac:.3f}"),
  ]
