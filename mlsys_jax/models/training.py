"""A minimal, explicit training loop for the library's classifiers.

Experiments share it so that every technique is compared under the same loop. It is deliberately
plain: a jitted step over ``(params, model_state, opt_state)``, shuffled minibatches from
:func:`mlsys_jax.data.batches`, and an optional extra loss term (e.g. a GradSigns regularizer).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax._checks import check_int, is_concrete
from mlsys_jax.data import Dataset, batches

LossExtra = Callable[[Any, jnp.ndarray, jnp.ndarray, jax.Array], jnp.ndarray]


class TrainState(NamedTuple):
  """Everything a training step carries: parameters, non-trainable model state, optimizer state.

  Example:
    >>> from mlsys_jax.models import MLP
    >>> s = create_train_state(MLP(features=(8,), num_classes=2), jax.random.PRNGKey(0), jnp.ones((4, 3)),
    ...                        optax.sgd(0.1))
    >>> int(s.step), sorted(s.variables), s.model_state                # MLP has no batch statistics
    (0, ['params'], {})
  """
  params: Any
  model_state: Any  # e.g. {'batch_stats': ...}; an empty dict for stateless models
  opt_state: Any
  step: jnp.ndarray

  @property
  def variables(self) -> dict:
    return {"params": self.params, **self.model_state}


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Mean softmax cross-entropy of ``logits (n, c)`` against integer ``labels (n,)`` in ``[0, c)``.

  Concrete labels outside ``[0, c)`` raise ``ValueError``; under ``jit``/``grad`` tracing the labels are not
  checked (an out-of-range label then gives a meaningless loss, e.g. NaN), so validate them beforehand.

  Example:
    >>> round(float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)    # uniform logits: log(4)
    1.3863
  """
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"cross_entropy expects logits (n, c) and labels (n,), got {logits.shape} and "
                     f"{labels.shape}.")
  if is_concrete(labels) and labels.size:
    lab = np.asarray(labels)   # one transfer for both bounds
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0 or hi >= logits.shape[1]:
      bad = lo if lo < 0 else hi
      raise ValueError(f"cross_entropy labels must be class indices in [0, {logits.shape[1]}) (logits have "
                       f"{logits.shape[1]} classes), got label {bad}. Fix the labels or the number of classes.")
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def create_train_state(model: nn.Module, key: jax.Array, sample_x: jnp.ndarray,
                       tx: optax.GradientTransformation) -> TrainState:
  """Initialise the model on ``sample_x`` (a batch) and the optimizer on its parameters.

  Example:
    >>> from mlsys_jax.models import MLP
    >>> s = create_train_state(MLP(features=(8,), num_classes=2), jax.random.PRNGKey(0), jnp.ones((4, 3)),
    ...                        optax.sgd(0.1))
    >>> s.params["Dense_0"]["kernel"].shape, int(s.step)
    ((3, 8), 0)
  """
  variables = model.init(key, jnp.asarray(sample_x), train=False)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return TrainState(params, model_state, tx.init(params), jnp.zeros((), jnp.int32))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    loss_extra: LossExtra | None = None, jit: bool = True):
  """Return ``step(state, xb, yb, key) -> (state, metrics)`` for cross-entropy training.

  ``loss_extra(params, xb, yb, key)``, if given, is added to the task loss (its value is reported as
  ``metrics['extra']``). ``tx.update`` receives the parameters, so projections such as weight clipping
  work as optax transforms.

  Example:
    >>> from mlsys_jax.models import MLP
    >>> model, tx = MLP(features=(8,), num_classes=2), optax.sgd(0.1)
    >>> s = create_train_state(model, jax.random.PRNGKey(0), jnp.ones((4, 3)), tx)
    >>> step = make_train_step(model, tx)
    >>> s, metrics = step(s, jnp.ones((4, 3)), jnp.array([0, 1, 0, 1]), jax.random.PRNGKey(1))
    >>> int(s.step), sorted(metrics), float(metrics["accuracy"])      # identical inputs, half the labels each
    (1, ['accuracy', 'extra', 'loss'], 0.5)
  """
  def loss_fn(params, model_state, xb, yb, key):
    variables = {"params": params, **model_state}
    if model_state:
      logits, new_state = model.apply(variables, xb, train=True, mutable=list(model_state))
    else:
      logits, new_state = model.apply(variables, xb, train=True), model_state
    task = cross_entropy(logits, yb)
    extra = loss_extra(params, xb, yb, key) if loss_extra is not None else jnp.zeros(())
    acc = jnp.mean(jnp.argmax(logits, -1) == yb)
    return task + extra, (new_state, task, extra, acc)

  def step(state: TrainState, xb, yb, key):
    grads, (new_state, task, extra, acc) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.model_state, xb, yb, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": task, "extra": extra, "accuracy": acc}
    return TrainState(params, new_state, opt_state, state.step + 1), metrics

  return jax.jit(step) if jit else step


def replicate(tree: Any, workers: int) -> Any:
  """``tree`` with a leading axis of ``workers`` copies (one optimizer state per simulated worker).

  Example:
    >>> jax.tree_util.tree_map(jnp.shape, replicate({"a": jnp.zeros(3), "b": 1.0}, 4))
    {'a': (4, 3), 'b': (4,)}
  """
  check_int("workers", workers, 1)
  return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (workers,) + jnp.shape(x)), tree)


def make_simulated_data_parallel_step(model: nn.Module, tx: optax.GradientTransformation, *,
                                      axis_name: str = "d", average_grads: bool = False) -> Callable:
  """A jitted step of data-parallel training over simulated workers in ONE program.

  ``vmap`` over a leading worker axis bound to ``axis_name``, so transforms that take ``axis_name``
  (``mlsys_jax.comm``: SIDCo, Top-k, PowerSGD, ACCORDION) run their collectives across the workers,
  without the thread rendezvous of simulated CPU devices. Each worker computes the cross-entropy gradient
  of its own batch and keeps its own optimizer state (error-feedback residuals); ``average_grads=True``
  averages the gradients first (uncompressed all-reduce). The parameters are shared: the transform must
  return the same update on every worker (an averaging collective does), and worker 0's copy is kept.

  Returns ``step(params, worker_states, xb, yb) -> (params, worker_states)`` with ``worker_states``
  from :func:`replicate` and ``xb``/``yb`` of shape ``(workers, batch, ...)``.

  Example:
    >>> from mlsys_jax.models import MLP
    >>> model, tx = MLP(features=(8,), num_classes=2), optax.sgd(0.1)
    >>> params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
    >>> step = make_simulated_data_parallel_step(model, tx, average_grads=True)
    >>> xb, yb = jnp.ones((2, 4, 3)), jnp.zeros((2, 4), jnp.int32)   # 2 workers, batch 4 each
    >>> params, states = step(params, replicate(tx.init(params), 2), xb, yb)
    >>> params["Dense_0"]["kernel"].shape                             # one shared copy, 2 workers' states
    (3, 8)
  """
  def local_step(params, state, xb, yb):
    g = jax.grad(lambda p: cross_entropy(model.apply({"params": p}, xb), yb))(params)
    if average_grads:
      g = jax.lax.pmean(g, axis_name)
    upd, state = tx.update(g, state, params)
    return optax.apply_updates(params, upd), state

  @jax.jit
  def step(params, state, xb, yb):
    new_params, state = jax.vmap(local_step, in_axes=(None, 0, 0, 0), axis_name=axis_name)(
        params, state, xb, yb)
    return jax.tree_util.tree_map(lambda x: x[0], new_params), state

  return step


@functools.partial(jax.jit, static_argnums=0)
def _apply_eval(model: nn.Module, variables: dict, x: jax.Array) -> jax.Array:
  # One compiled function per (model, shapes), shared by every predict/evaluate call.
  return model.apply(variables, x, train=False)


def predict(model: nn.Module, variables: dict, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
  """Logits of ``model`` on ``x`` in evaluation mode, computed in batches (empty ``x``: shape ``(0, c)``).

  Example:
    >>> from mlsys_jax.models import MLP
    >>> model = MLP(features=(8,), num_classes=2)
    >>> variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
    >>> predict(model, variables, np.ones((5, 3)), batch_size=2).shape
    (5, 2)
  """
  check_int("batch_size", batch_size, 1)
  if len(x) == 0:   # no batch to run: the shape of one example's logits, from shapes alone, with batch 0
    one = jax.ShapeDtypeStruct((1,) + tuple(np.shape(x)[1:]), jnp.result_type(x))
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, one)
    return np.zeros((0,) + tuple(out.shape[1:]), out.dtype)
  return np.concatenate([np.asarray(_apply_eval(model, variables, x[i:i + batch_size]))
                         for i in range(0, len(x), batch_size)])


def evaluate(model: nn.Module, variables: dict, x: np.ndarray, y: np.ndarray,
             batch_size: int = 1024) -> float:
  """Top-1 accuracy of ``model`` on ``(x, y)``; ``y`` holds integer class labels of shape ``(len(x),)``.

  Example:
    >>> from mlsys_jax.models import MLP
    >>> model = MLP(features=(8,), num_classes=2)
    >>> variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
    >>> evaluate(model, variables, np.ones((4, 3)), np.array([0, 1, 0, 1]))   # one class for identical inputs
    0.5
  """
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"evaluate needs integer class labels y of shape (n,), got dtype {y.dtype} and shape "
                     f"{y.shape}. Flatten (n, 1) labels with y.reshape(-1); turn one-hot labels into indices "
                     "with y.argmax(-1).")
  if len(x) != len(y) or len(x) == 0:
    raise ValueError(f"evaluate needs matching, non-empty x and y, got {len(x)} and {len(y)} examples.")
  return float(np.mean(np.argmax(predict(model, variables, x, batch_size), -1) == y))


def train_classifier(model: nn.Module, dataset: Dataset, tx: optax.GradientTransformation, *,
                     epochs: int, batch_size: int = 64, seed: int = 0,
                     loss_extra: LossExtra | None = None, verbose: bool = False,
                     state: TrainState | None = None) -> tuple[dict, dict]:
  """Train ``model`` on ``dataset`` with optimizer ``tx`` for ``epochs`` epochs.

  Args:
    model: a flax module called as ``model.apply(variables, x, train=...)``.
    dataset: a :class:`mlsys_jax.data.Dataset`.
    tx: an optax transformation (it may be a chain with mlsys-jax transforms).
    epochs, batch_size: the schedule; the last partial batch of each epoch is dropped.
    seed: seeds initialisation, shuffling and the keys passed to ``loss_extra``.
    loss_extra: optional extra loss ``f(params, xb, yb, key)``.
    verbose: print one line per epoch.
    state: continue from this state instead of initialising (e.g. fine-tuning).

  Returns:
    ``(variables, history)`` where ``history`` has per-epoch ``loss``, ``train_accuracy``,
    ``test_accuracy`` and ``seconds``.

  Example:
    >>> from mlsys_jax.models import MLP
    >>> from mlsys_jax.data import synthetic_classification
    >>> ds = synthetic_classification(seed=0, num_samples=64, shape=(4,), num_classes=2, noise=0.3)
    >>> variables, hist = train_classifier(MLP(features=(8,), num_classes=2), ds, optax.adam(0.05), epochs=1,
    ...                                    batch_size=16)
    >>> sorted(hist), hist["test_accuracy"]                # well-separated clusters: one epoch suffices
    (['loss', 'seconds', 'test_accuracy', 'train_accuracy'], [1.0])
  """
  check_int("epochs", epochs, 1)
  check_int("batch_size", batch_size, 1)
  key = jax.random.PRNGKey(seed)
  init_key, key = jax.random.split(key)
  if state is None:
    state = create_train_state(model, init_key, dataset.x_train[:batch_size], tx)
  step = make_train_step(model, tx, loss_extra)
  history = {"loss": [], "train_accuracy": [], "test_accuracy": [], "seconds": []}
  for epoch in range(epochs):
    t0 = time.perf_counter()
    losses, accs = [], []
    for xb, yb in batches(dataset.x_train, dataset.y_train, batch_size, seed=seed * 100003 + epoch):
      key, sub = jax.random.split(key)
      state, m = step(state, xb, yb, sub)
      losses.append(m["loss"])
      accs.append(m["accuracy"])
    history["loss"].append(float(np.mean(jax.device_get(losses))))
    history["train_accuracy"].append(float(np.mean(jax.device_get(accs))))
    history["test_accuracy"].append(evaluate(model, state.variables, dataset.x_test, dataset.y_test))
    history["seconds"].append(time.perf_counter() - t0)
    if verbose:
      print(f"  epoch {epoch + 1}/{epochs}: loss {history['loss'][-1]:.4f} "
            f"train acc {history['train_accuracy'][-1]:.4f} test acc {history['test_accuracy'][-1]:.4f} "
            f"({history['seconds'][-1]:.1f}s)", flush=True)
  return state.variables, history
