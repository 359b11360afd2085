"""sensAI: a trained classifier split into small class-group subnets that run in parallel.

Wang, Liu, Hsieh, Zhuang, Gonzalez, Darrell and Stoica, "sensAI: ConvNets Decomposition via Class
Parallelism for Fast Inference on Live Data", MLSys 2021. The recipe (paper Sec. 3, and the authors'
code ``GuanhuaWang/sensAI``):

1. **Group the classes** (:func:`group_classes`): average the penultimate features of the trained model
   per class and cluster the class means with *equal-size* k-means (:func:`balanced_kmeans`); or take
   contiguous blocks of classes (the paper's ImageNet setting).
2. **Measure every ReLU output channel on a group's data** (:func:`channel_stats`): the average
   percentage of zeros ``APoZ_c = mean over (n, spatial) of 1[|a| <= 0.005]`` and ``avg_c = mean |a|``.
3. **Prune** (:func:`prune_masks`, :func:`prune`): drop channel ``c`` iff ``APoZ_c > 0.73`` and
   ``avg_c < 0.01`` (the paper's thresholds, APoZ as a fraction here), physically, as surgery on the
   flax variables: the producing layer's output axis (conv/dense kernel, bias, batch norm) and the next
   layer's input axis. At least one channel per layer is kept (with a warning). Beyond the paper,
   ``keep_fraction`` keeps a fixed share of each layer (lowest APoZ first) and ``multiple_of`` rounds
   the widths up to the CPU's vector width (8 / 16 float32 lanes).
4. **Retrain** each pruned subnet one-vs-rest with ``m + 1`` outputs, output 0 meaning "other"
   (:func:`make_subnet`, :func:`group_dataset`, :func:`retrain_subnet`); positives are oversampled.
5. **Combine** (:func:`combine`): softmax each subnet, drop its "other" column, put the columns back in
   class order. Beyond the paper, each subnet's logits are divided by a temperature fitted on held-out
   data (:func:`calibrate_temperature`, Guo et al. 2017) so that independently trained softmaxes are
   comparable, and the result is renormalised to a distribution (the argmax is unchanged by that).
   The arithmetic is done in log space (``log_softmax``, then a max-shifted softmax over the classes),
   so the result is finite for finite logits at any temperature.
6. **Execute**: one device runs all subnets as ONE program, zero-padded to a common width and mapped
   with ``jax.vmap`` (:func:`stack_subnets`, :func:`ensemble_predict`; exact, because padded channels
   have zero weights, zero bias and zero batch-norm affine parameters); several devices run one group
   of subnets each under ``shard_map`` and add their class columns with one ``pmax`` + ``psum``
   (:func:`ensemble_predict_sharded`); for serving, :func:`make_sharded_predictor` places the weights
   once, runs each device's group (at its own width with ``own_width``) and combines after ONE
   ``all_gather``; it hands numpy inputs to XLA 64-byte aligned (:func:`host_aligned`).

Supported models (the surgery follows their structure exactly, and refuses anything else, naming the
layer): :class:`mlsys_jax.models.CNN` (every conv and the hidden dense layer are pruned; the flatten
between the last conv and the dense layer is followed), :class:`mlsys_jax.models.MLP` (every hidden
layer), and :class:`mlsys_jax.models.ResNet20` (the inner channels of every basic block, i.e. the
output of its first conv + batch norm + ReLU; the residual stream is left whole, so residual adds keep
matching shapes). A pruned ResNet-20 is a :class:`SlimResNet20`, which is ResNet-20 with per-block
inner widths and the same variable names. Injected ``dot_general``/``conv_general_dilated`` functions
are kept; injected *modules* (``*_cls``, which may hold their own variables) are refused.

Activations are read with flax's ``capture_intermediates``: a pruning site is a module whose output
goes straight into a ReLU (``Conv_i``/``Dense_i`` of the CNN and MLP, ``BatchNorm_0`` inside a ResNet
block), and its ReLU output is ``max(z, 0)`` of the captured ``z``.

Example (a tiny CNN on random data; real use trains the model first):

>>> import jax, numpy as np
>>> from mlsys_jax import models
>>> from mlsys_jax.infer import sensai
>>> model = models.CNN(num_classes=4, channels=(4, 8), hidden=16)
>>> x = np.random.default_rng(0).normal(size=(32, 8, 8, 1)).astype(np.float32)
>>> variables = model.init(jax.random.PRNGKey(0), x[:1])
>>> groups = sensai.group_classes_contiguous(4, 2)
>>> groups
((0, 1), (2, 3))
>>> keep = sensai.prune_masks(sensai.channel_stats(model, variables, x), keep_fraction=0.5)
>>> sub = sensai.make_subnet(model, variables, groups[0], keep)
>>> sub.model.channels, sub.model.hidden, sub.model.num_classes
((2, 4), 8, 3)
>>> ens = sensai.stack_subnets([sub, sensai.make_subnet(model, variables, groups[1], keep)], 4)
>>> probs = sensai.ensemble_predict(ens, x[:3])
>>> probs.shape, bool(np.allclose(probs.sum(-1), 1.0, atol=1e-5))
((3, 4), True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax import models as _models
from mlsys_jax._checks import check_finite, check_int, check_range
from mlsys_jax._compat import shard_map
from mlsys_jax.data import Dataset

__all__ = [
    "ChannelStats",
    "Ensemble",
    "SlimResNet20",
    "Subnet",
    "balanced_kmeans",
    "balanced_sizes",
    "calibrate_temperature",
    "calibrate_temperatures_joint",
    "channel_stats",
    "combine",
    "count_flops",
    "count_params",
    "ensemble_logits",
    "ensemble_predict",
    "ensemble_predict_sharded",
    "group_classes",
    "group_classes_contiguous",
    "group_dataset",
    "make_branch_predictor",
    "make_subnet",
    "penultimate_features",
    "prune",
    "prune_masks",
    "relabel",
    "retrain_subnet",
    "retrain_subnets",
    "stack_subnets",
    "subnet_predict",
    "zero_pruned",
]

APOZ_EPS = 0.005  # |a| <= this counts as a zero (the authors' apoz_policy.py)


# ----------------------------------------------------------------------------------------------------
# A ResNet-20 whose blocks have their own inner widths (what pruning a ResNet-20 produces).
# ----------------------------------------------------------------------------------------------------

class _SlimBlock(nn.Module):
  filters: int
  inner: int
  strides: int
  conv_general_dilated: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k, s: nn.Conv(f, (k, k), (s, s), padding="SAME", use_bias=False,
                                   conv_general_dilated=self.conv_general_dilated)
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.relu(norm()(conv(self.inner, 3, self.strides)(x)))
    y = norm()(conv(self.filters, 3, 1)(y))
    if x.shape != y.shape:
      x = norm()(conv(self.filters, 1, self.strides)(x))
    return nn.relu(x + y)


class SlimResNet20(nn.Module):
  """:class:`mlsys_jax.models.ResNet20` with a per-block inner width (the pruned form of a ResNet-20).

  Block ``b`` computes ``relu(bn(conv3x3(x)))`` with ``inner[b]`` channels, then ``bn(conv3x3(.))``
  back to the stage width, plus the (projected) shortcut. With ``inner`` equal to the stage widths it
  is ResNet-20 itself, with the same variable names (``_BasicBlock_i/Conv_0`` ...).
  """
  num_classes: int = 10
  width: int = 16
  blocks_per_stage: int = 3
  inner: Sequence[int] = ()
  dot_general: Any = None
  conv_general_dilated: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if x.ndim != 4:
      raise ValueError(f"SlimResNet20 expects images (batch, h, w, c), got shape {x.shape}.")
    if len(self.inner) != 3 * self.blocks_per_stage:
      raise ValueError(f"SlimResNet20 needs one inner width per block ({3 * self.blocks_per_stage}), got "
                       f"{len(self.inner)}.")
    x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False,
                conv_general_dilated=self.conv_general_dilated)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    b = 0
    for stage in range(3):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = _SlimBlock(self.width * 2**stage, int(self.inner[b]), strides, self.conv_general_dilated,
                       name=f"_BasicBlock_{b}")(x, train)
        b += 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dot_general=self.dot_general)(x)


# ----------------------------------------------------------------------------------------------------
# Layer plans: where the ReLU outputs are and which variables carry each channel.
# ----------------------------------------------------------------------------------------------------

Path = tuple  # a tuple of keys into the variables dict, e.g. ('params', 'Conv_0', 'kernel')


@dataclasses.dataclass(frozen=True)
class _Site:
  name: str                       # e.g. 'Conv_0' or '_BasicBlock_3/BatchNorm_0'
  module: tuple[str, ...]         # module path of the layer whose output enters the ReLU
  producers: tuple[tuple[Path, int], ...]   # (leaf path, output axis)
  consumers: tuple[tuple[Path, int, bool], ...]  # (leaf path, input axis, follows a flatten)


@dataclasses.dataclass(frozen=True)
class _Plan:
  sites: tuple[_Site, ...]
  head: tuple[str, ...]           # module path of the logits layer (a Dense)
  collections: tuple[str, ...]
  rebuild: Callable[[dict, int], nn.Module]   # (width per site name, outputs) -> model
  penultimate: Callable[[dict], np.ndarray]  # captured intermediates -> (n, features)
  # A small input shape for ``jax.eval_shape(model.init, ...)`` built from the variables (their input
  # channels / features), and the (leaf path, axis) pairs whose size depends on the input's spatial
  # size and so is not declared by the model (the CNN's dense rows after the flatten).
  example_input: Callable[[dict], tuple[int, ...]] = lambda v: ()
  input_axes: frozenset = frozenset()


def _relu_of(inter: dict, module: tuple[str, ...]) -> np.ndarray:
  node = inter
  for k in module:
    node = node[k]
  return np.maximum(np.asarray(node["__call__"][0]), 0)


def _refuse_cls(model: nn.Module) -> None:
  for attr in ("dot_general_cls", "conv_general_dilated_cls"):
    if getattr(model, attr, None) is not None:
      raise ValueError(f"sensAI surgery cannot follow {type(model).__name__}.{attr}: an injected module may "
                       "hold variables of its own that carry channels. Prune the float model, then inject.")


def _plan(model: nn.Module) -> _Plan:
  """The pruning plan of a supported model; anything else is refused with the reason."""
  _refuse_cls(model)
  if type(model) is _models.CNN:
    n = len(model.channels)
    sites = []
    for i in range(n):
      conv = f"Conv_{i}"
      nxt = ((("params", f"Conv_{i + 1}", "kernel"), -2, False) if i + 1 < n
             else (("params", "Dense_0", "kernel"), 0, True))
      sites.append(_Site(conv, (conv,), ((("params", conv, "kernel"), -1), (("params", conv, "bias"), 0)),
                         (nxt,)))
    sites.append(_Site("Dense_0", ("Dense_0",), ((("params", "Dense_0", "kernel"), -1),
                                                  (("params", "Dense_0", "bias"), 0)),
                       ((("params", "Dense_1", "kernel"), 0, False),)))

    def rebuild(w, out):
      return model.clone(channels=tuple(w[f"Conv_{i}"] for i in range(n)), hidden=w["Dense_0"],
                         num_classes=out, parent=None)
    def example_input(v):
      c_in = _get(v, ("params", "Conv_0", "kernel")).shape[-2] if n else 1
      return (1, *(4,) * model.dims, c_in)
    return _Plan(tuple(sites), ("Dense_1",), ("params",), rebuild,
                 lambda inter: _relu_of(inter, ("Dense_0",)), example_input,
                 frozenset({(("params", "Dense_0", "kernel"), 0)}))
  if type(model) is _models.MLP:
    n = len(model.features)
    if n == 0:
      raise ValueError("sensAI surgery needs at least one hidden layer; MLP(features=()) has none.")
    sites = tuple(_Site(f"Dense_{i}", (f"Dense_{i}",),
                        ((("params", f"Dense_{i}", "kernel"), -1), (("params", f"Dense_{i}", "bias"), 0)),
                        ((("params", f"Dense_{i + 1}", "kernel"), 0, False),)) for i in range(n))

    def rebuild(w, out):
      return model.clone(features=tuple(w[f"Dense_{i}"] for i in range(n)), num_classes=out, parent=None)
    return _Plan(sites, (f"Dense_{n}",), ("params",), rebuild,
                 lambda inter: _relu_of(inter, (f"Dense_{n - 1}",)),
                 lambda v: (1, _get(v, ("params", "Dense_0", "kernel")).shape[0]))
  if type(model) in (_models.ResNet20, SlimResNet20):
    nb = 3 * model.blocks_per_stage
    sites = []
    for b in range(nb):
      blk = f"_BasicBlock_{b}"
      prods = ((("params", blk, "Conv_0", "kernel"), -1), (("params", blk, "BatchNorm_0", "scale"), 0),
               (("params", blk, "BatchNorm_0", "bias"), 0), (("batch_stats", blk, "BatchNorm_0", "mean"), 0),
               (("batch_stats", blk, "BatchNorm_0", "var"), 0))
      sites.append(_Site(f"{blk}/BatchNorm_0", (blk, "BatchNorm_0"), prods,
                         ((("params", blk, "Conv_1", "kernel"), -2, False),)))

    def rebuild(w, out):
      return SlimResNet20(num_classes=out, width=model.width, blocks_per_stage=model.blocks_per_stage,
                          inner=tuple(w[f"_BasicBlock_{b}/BatchNorm_0"] for b in range(nb)),
                          dot_general=model.dot_general, conv_general_dilated=model.conv_general_dilated)

    def penult(inter):
      return np.mean(np.asarray(inter[f"_BasicBlock_{nb - 1}"]["__call__"][0]), axis=(1, 2))
    def example_input(v):   # 4x4: the stride-2 stages shrink it as they do a real image
      return (1, 4, 4, _get(v, ("params", "Conv_0", "kernel")).shape[-2])
    return _Plan(tuple(sites), ("Dense_0",), ("params", "batch_stats"), rebuild, penult, example_input)
  raise TypeError(f"sensAI surgery follows mlsys_jax.models.CNN, MLP, ResNet20 and sensai.SlimResNet20; "
                  f"{type(model).__name__} is none of them, so its channels cannot be traced. Express the "
                  "model as one of these or add a layer plan for it in mlsys_jax/infer/sensai.py.")


def _get(tree: dict, path: Path):
  node = tree
  for k in path:
    node = node[k]
  return node


@functools.lru_cache(maxsize=64)
def _declared_shapes_cached(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
  return _declared_shapes_uncached(model, input_shape)


def _declared_shapes_uncached(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x),
                          jax.ShapeDtypeStruct(input_shape, jnp.float32))
  return {tuple(getattr(k, "key", k) for k in p): tuple(a.shape)
          for p, a in jax.tree_util.tree_flatten_with_path(_plain(shapes))[0]}


def _declared_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
  """Shape of every variable ``model`` declares for inputs of ``input_shape`` (``jax.eval_shape`` of
  ``model.init``: nothing is computed), cached per (model, input shape) when the model is hashable."""
  try:
    hash(model)
  except TypeError:   # e.g. a SlimResNet20 given its inner widths as a list
    return _declared_shapes_uncached(model, input_shape)
  return _declared_shapes_cached(model, input_shape)


def _fit_hint(model: nn.Module, fit: nn.Module) -> str:
  """How to construct the model that the variables' widths describe, as the fields that differ."""
  fields = [f.name for f in dataclasses.fields(fit) if f.name not in ("parent", "name")]
  diff = [f"{k}={getattr(fit, k)!r}" for k in fields
          if type(fit) is not type(model) or getattr(fit, k) != getattr(model, k, None)]
  if type(fit) is type(model):
    return f"model.clone({', '.join(diff)})"
  return f"{type(fit).__name__}({', '.join(diff)})"


def _check_declared(model: nn.Module, variables: dict, plan: _Plan, widths: dict[str, int],
                    check_head: bool) -> None:
  """Every variable's shape must be the one ``model`` declares (its widths and number of classes), so
  that a mismatch is reported here, naming the layer and the fix, rather than by flax at apply time."""
  declared = _declared_shapes(model, plan.example_input(variables))
  head = {("params", *plan.head, "kernel"): -1, ("params", *plan.head, "bias"): 0}
  name = type(model).__name__
  for path, expected in declared.items():
    try:
      given = tuple(np.shape(_get(variables, path)))
    except (KeyError, TypeError):
      raise ValueError(f"layer {'/'.join(path[1:-1])} of {name}: the model declares variable "
                       f"{'/'.join(path)} of shape {expected}, which the variables lack; pass the "
                       f"variables this model was initialised or trained with.") from None
    exp = list(expected)
    for p, axis in plan.input_axes:   # set by the input's spatial size, not by the model
      if p == path and len(exp) == len(given):
        exp[axis] = given[axis]
    if not check_head and path in head and len(exp) == len(given):
      exp[head[path]] = given[head[path]]
    if tuple(exp) == given:
      continue
    outputs = _get(variables, ("params", *plan.head, "bias")).shape[0]
    fit = plan.rebuild(widths, outputs)
    try:
      fits = all(tuple(np.shape(_get(variables, q))) == e or any(q == p for p, _ in plan.input_axes)
                 for q, e in _declared_shapes(fit, plan.example_input(variables)).items())
    except (KeyError, TypeError, ValueError):
      fits = False
    how = (f"these variables are those of {_fit_hint(model, fit)}; pass that model (for a pruned or "
           "padded subnet, the model that prune / make_subnet / stack_subnets returned with them)"
           if fits else "pass the model these variables were initialised or trained with")
    raise ValueError(f"layer {'/'.join(path[1:-1])} of {name}: variable {'/'.join(path)} has shape "
                     f"{given}, but the model declares {tuple(expected)}; the variables do not belong to "
                     f"this model. Fix: {how}.")


def _check_structure(model: nn.Module, variables: dict, plan: _Plan, *,
                     check_head: bool = True) -> dict[str, int]:
  """Check that ``variables`` have exactly the layout ``plan`` follows and the shapes ``model``
  declares (its widths; with ``check_head`` also its number of classes); return the width per site."""
  if not isinstance(variables, dict) or "params" not in variables:
    raise TypeError(f"variables must be a flax variables dict with a 'params' collection, got "
                    f"{type(variables).__name__}.")
  extra = sorted(set(variables) - set(plan.collections))
  if extra:
    raise ValueError(f"{type(model).__name__}: variables hold collection(s) {extra} that the sensAI surgery "
                     f"does not follow (it knows {list(plan.collections)}); refusing to prune.")
  leaves = {tuple(getattr(k, "key", k) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]}
  known = set()
  widths = {}
  for s in plan.sites:
    sizes = []
    for path, axis in s.producers:
      if path not in leaves:
        raise ValueError(f"layer {'/'.join(path[1:-1])} of {type(model).__name__}: expected variable "
                         f"{'/'.join(path)}, which is missing; the surgery cannot follow this layer.")
      sizes.append(_get(variables, path).shape[axis])
      known.add(path)
    if len(set(sizes)) != 1:
      raise ValueError(f"layer {s.name}: its variables disagree on the channel count ({sizes}).")
    widths[s.name] = sizes[0]
    for path, axis, flat in s.consumers:
      if path not in leaves:
        raise ValueError(f"layer {'/'.join(path[1:-1])}: expected variable {'/'.join(path)} (input of the "
                         f"channels of {s.name}), which is missing.")
      size = _get(variables, path).shape[axis]
      if (size % sizes[0]) if flat else (size != sizes[0]):
        raise ValueError(f"layer {'/'.join(path[1:-1])}: input axis of size {size} does not match the "
                         f"{sizes[0]} channels of {s.name}.")
  for leaf in ("kernel", "bias"):
    if ("params", *plan.head, leaf) not in leaves:
      raise ValueError(f"logits layer {'/'.join(plan.head)}: variable {leaf!r} missing.")
  # Every variable inside a layer the plan touches must be one the plan knows how to cut (no extra
  # 'scale', no nested module of an injected primitive).
  allowed = set(known) | {c[0] for s in plan.sites for c in s.consumers}
  allowed |= {(c[0][0], *c[0][1:-1], "bias") for s in plan.sites for c in s.consumers}
  allowed |= {("params", *plan.head, "kernel"), ("params", *plan.head, "bias")}
  touched = {p[1:-1] for p in allowed}
  for leaf in sorted(leaves, key=str):
    if leaf not in allowed and any(leaf[1:1 + i] in touched for i in range(1, len(leaf))):
      raise ValueError(f"layer {'/'.join(leaf[1:-1])}: variable {'/'.join(leaf)} is not one the sensAI "
                       "surgery knows how to cut; refusing to prune this model.")
  _check_declared(model, variables, plan, widths, check_head)
  return widths


def _take(a, idx: np.ndarray, axis: int, fill: float = 0.0) -> np.ndarray:
  """``a`` indexed along ``axis`` by ``idx``; entries ``-1`` become ``fill`` (padding). Surgery runs in
  numpy on the host: it is a one-off rewrite of the variables, and eager jax ops would compile per shape."""
  a = np.asarray(a)
  out = np.take(a, np.maximum(idx, 0), axis=axis)
  if np.any(idx < 0):
    shape = [1] * a.ndim
    shape[axis] = len(idx)
    out = np.where((idx >= 0).reshape(shape), out, np.asarray(fill, a.dtype))
  return out


def _take_flat(a, idx: np.ndarray, width: int) -> np.ndarray:
  """Rows of a dense kernel after a flatten of ``(..., width)`` channels: index the channel part."""
  a = np.asarray(a)
  rows, out = a.shape
  return _take(a.reshape(rows // width, width, out), idx, 1).reshape(-1, out)


def _set(tree: dict, path: Path, value) -> dict:
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _plain(variables) -> dict:
  """A mutable-free nested dict copy (flax may hand out FrozenDicts)."""
  if hasattr(variables, "unfreeze"):
    variables = variables.unfreeze()
  return jax.tree_util.tree_map(lambda x: x, dict(variables))


def _resize(model: nn.Module, variables: dict, index: dict[str, np.ndarray]) -> tuple[nn.Module, dict]:
  """Gather (or zero-pad, index -1) every site's channels."""
  plan = _plan(model)
  variables = _plain(variables)
  # the head may already be a subnet's m + 1 outputs (make_subnet) while the model declares K classes
  widths = _check_structure(model, variables, plan, check_head=False)
  new = variables
  for s in plan.sites:
    idx = np.asarray(index[s.name], np.int64)
    for path, axis in s.producers:
      fill = 1.0 if path[-1] == "var" else 0.0
      new = _set(new, path, _take(_get(new, path), idx, axis, fill))
    for path, axis, flat in s.consumers:
      a = _get(new, path)
      new = _set(new, path, _take_flat(a, idx, widths[s.name]) if flat else _take(a, idx, axis))
  new = jax.tree_util.tree_map(jnp.asarray, new)
  outputs = _get(new, ("params", *plan.head, "bias")).shape[0]
  return plan.rebuild({s.name: len(index[s.name]) for s in plan.sites}, outputs), new


# ----------------------------------------------------------------------------------------------------
# 1. Class grouping
# ----------------------------------------------------------------------------------------------------

def balanced_sizes(num_items: int, num_groups: int) -> tuple[int, ...]:
  """Group sizes that differ by at most one: the first ``num_items % num_groups`` groups get one more.

  >>> balanced_sizes(10, 4)
  (3, 3, 2, 2)
  """
  check_int("num_groups", num_groups, 1)
  check_int("num_items", num_items, num_groups)
  q, r = divmod(num_items, num_groups)
  return tuple(q + 1 if g < r else q for g in range(num_groups))


def group_classes_contiguous(num_classes: int, num_groups: int) -> tuple[tuple[int, ...], ...]:
  """Contiguous blocks of classes (the paper's ImageNet grouping), sizes from :func:`balanced_sizes`."""
  sizes = balanced_sizes(num_classes, num_groups)
  starts = np.concatenate([[0], np.cumsum(sizes)])
  return tuple(tuple(range(int(starts[g]), int(starts[g + 1]))) for g in range(num_groups))


def _min_cost_assignment(cost: np.ndarray) -> np.ndarray:
  """Hungarian algorithm (potentials form) for a rectangular ``(n, m)`` cost, ``n <= m``: returns the
  column of each row minimising the total cost, every column used at most once."""
  n, m = cost.shape
  inf = np.inf
  u, v = np.zeros(n + 1), np.zeros(m + 1)
  p = np.zeros(m + 1, np.int64)   # p[j]: row (1-based) matched to column j
  way = np.zeros(m + 1, np.int64)
  for i in range(1, n + 1):
    p[0] = i
    j0 = 0
    minv = np.full(m + 1, inf)
    used = np.zeros(m + 1, bool)
    while True:
      used[j0] = True
      i0 = p[j0]
      delta, j1 = inf, 0
      for j in range(1, m + 1):
        if not used[j]:
          cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
          if cur < minv[j]:
            minv[j], way[j] = cur, j0
          if minv[j] < delta:
            delta, j1 = minv[j], j
      for j in range(m + 1):
        if used[j]:
          u[p[j]] += delta
          v[j] -= delta
        else:
          minv[j] -= delta
      j0 = j1
      if p[j0] == 0:
        break
    while j0:
      j1 = way[j0]
      p[j0] = p[j1]
      j0 = j1
  col = np.empty(n, np.int64)
  for j in range(1, m + 1):
    if p[j]:
      col[p[j] - 1] = j - 1
  return col


def balanced_kmeans(points: np.ndarray, num_groups: int, *, seed: int = 42, n_init: int = 10,
                    max_iter: int = 100) -> tuple[np.ndarray, float]:
  """Equal-size k-means: Lloyd iterations whose assignment step is an exact balanced assignment.

  Each cluster holds :func:`balanced_sizes` ``(n, num_groups)`` points (sizes differ by at most one when
  ``num_groups`` does not divide ``n``); the assignment step solves the min-cost matching of points to
  cluster *slots* (squared Euclidean distance) with the Hungarian algorithm, so it never increases the
  objective. ``n_init`` seeded restarts (k-means++ initial centres); the best objective is kept.

  Returns:
    ``(labels (n,), inertia)``: cluster of each point and the sum of squared distances to its centre.
  """
  x = np.asarray(points, np.float64)
  if x.ndim != 2:
    raise ValueError(f"points must be (n, features), got shape {x.shape}.")
  check_finite("points", x)
  n = x.shape[0]
  sizes = balanced_sizes(n, num_groups)
  check_int("n_init", n_init, 1)
  check_int("max_iter", max_iter, 1)
  slot_cluster = np.repeat(np.arange(num_groups), sizes)
  rng = np.random.default_rng(seed)
  best = (None, np.inf)
  for _ in range(n_init):
    centres = [x[rng.integers(n)]]
    for _ in range(1, num_groups):   # k-means++
      d = np.min([np.sum((x - c) ** 2, 1) for c in centres], axis=0)
      pr = d / d.sum() if d.sum() > 0 else np.full(n, 1.0 / n)
      centres.append(x[rng.choice(n, p=pr)])
    centres = np.stack(centres)
    labels = None
    for _ in range(max_iter):
      d = np.sum((x[:, None, :] - centres[None]) ** 2, -1)  # (n, k)
      new = slot_cluster[_min_cost_assignment(d[:, slot_cluster])]
      if labels is not None and np.array_equal(new, labels):
        break
      labels = new
      centres = np.stack([x[labels == g].mean(0) for g in range(num_groups)])
    inertia = float(sum(np.sum((x[labels == g] - centres[g]) ** 2) for g in range(num_groups)))
    if inertia < best[1] - 1e-12:
      best = (labels, inertia)
  return best[0], best[1]


def penultimate_features(model: nn.Module, variables: dict, x: np.ndarray,
                         batch_size: int = 512) -> np.ndarray:
  """The input of the logits layer (after its ReLU / global pooling) for every example of ``x``.

  sensAI (Wang et al., MLSys 2021, Sec. 3.1) groups classes by the per-class means of these features
  (:func:`group_classes`). The logits are ``features @ W + b`` of the logits layer, exactly.

  Args:
    model: a supported model (see the module docstring): for :class:`mlsys_jax.models.MLP` and ``CNN``
      the ReLU output of the last hidden ``Dense``; for ResNet-20 (and :class:`SlimResNet20`) the global
      average pool of the last block's output.
    variables: its flax variables (checked against the model's layer layout).
    x: ``(n, *input_shape)`` inputs, ``n >= 1``, finite.
    batch_size: examples per forward pass (``>= 1``); the result depends on it only through float32
      rounding (XLA may order a matrix product's sums differently for different batch shapes).

  Returns:
    ``(n, d)`` numpy array, ``d`` the logits layer's input width.

  Raises:
    TypeError / ValueError: an unsupported model, variables that do not match it, an empty or non-finite
      ``x``, ``batch_size < 1``, or non-finite features (the variables hold NaN/inf or overflow).

  Example:
    >>> from mlsys_jax import models
    >>> model = models.MLP(features=(3,), num_classes=2)
    >>> x = np.ones((4, 2), np.float32)
    >>> shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)     # weights all 0.5:
    >>> variables = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, np.float32), shapes)
    >>> penultimate_features(model, variables, x, batch_size=3).tolist()  # relu(2 * 0.5 + 0.5)
    [[1.5, 1.5, 1.5], [1.5, 1.5, 1.5], [1.5, 1.5, 1.5], [1.5, 1.5, 1.5]]
  """
  plan = _plan(model)
  _check_structure(model, _plain(variables), plan)
  check_int("batch_size", batch_size, 1)
  if np.ndim(x) < 1 or len(x) == 0:
    raise ValueError(f"x must hold at least one example (shape (n, *input_shape), n >= 1), got shape "
                     f"{np.shape(x)}.")
  check_finite("x", x)
  fn = _captured_fn(model)
  out = np.concatenate([np.asarray(plan.penultimate(fn(variables, jnp.asarray(x[i:i + batch_size]))))
                        for i in range(0, len(x), batch_size)])
  check_finite("penultimate features (check the variables)", out)
  return out


def group_classes(features: np.ndarray, labels: np.ndarray, num_groups: int, *, seed: int = 42,
                  n_init: int = 10) -> tuple[tuple[int, ...], ...]:
  """sensAI's class grouping: equal-size k-means over the per-class means of penultimate ``features``.

  Args:
    features: ``(n, d)`` penultimate features (:func:`penultimate_features`) of the training set.
    labels: ``(n,)`` integer labels in ``[0, K)``; every class must occur.
    num_groups: number of groups ``G <= K``; when ``G`` does not divide ``K`` the group sizes differ by
      at most one (:func:`balanced_sizes`).
    seed, n_init: seed (42 as in the authors' code) and restarts of :func:`balanced_kmeans`.

  Returns:
    ``G`` sorted tuples of class ids, ordered by their smallest class.
  """
  f = np.asarray(features, np.float64)
  y = np.asarray(labels)
  if f.ndim != 2 or y.shape != (f.shape[0],):
    raise ValueError(f"features must be (n, d) and labels (n,), got {f.shape} and {y.shape}.")
  k = int(y.max()) + 1
  missing = sorted(set(range(k)) - set(np.unique(y).tolist()))
  if missing:
    raise ValueError(f"classes {missing} have no examples; every class needs features to be grouped.")
  check_int("num_groups", num_groups, 1, k)
  means = np.stack([f[y == c].mean(0) for c in range(k)])
  lab, _ = balanced_kmeans(means, num_groups, seed=seed, n_init=n_init)
  groups = [tuple(int(c) for c in np.flatnonzero(lab == g)) for g in range(num_groups)]
  return tuple(sorted(groups))


# ----------------------------------------------------------------------------------------------------
# 2. APoZ statistics and structured pruning
# ----------------------------------------------------------------------------------------------------

class ChannelStats(NamedTuple):
  """Per-channel statistics of every ReLU output (site name -> ``(channels,)`` float64 arrays).

  Attributes:
    apoz: fraction of activations with ``|a| <= 0.005`` over examples and positions (APoZ / 100).
    mean_abs: mean of ``|a|``.
    count: number of examples they were computed on.
  """
  apoz: dict
  mean_abs: dict
  count: int


@functools.lru_cache(maxsize=64)
def _captured_fn(model: nn.Module):
  @jax.jit
  def fn(variables, x):
    _, st = model.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
    return st["intermediates"]
  return fn


def channel_stats(model: nn.Module, variables: dict, x: np.ndarray, batch_size: int = 256) -> ChannelStats:
  """APoZ and mean ``|activation|`` of every prunable ReLU output channel on the examples ``x``.

  The paper (Sec. 3.2) averages per-batch means; here the statistics are exact means over all examples
  and spatial positions (the same when every batch has the same size).

  Args:
    model, variables: a supported model (see the module docstring) and its trained variables.
    x: inputs of ONE class group, ``(n, *input_shape)``.
    batch_size: examples per forward pass.
  """
  plan = _plan(model)
  _check_structure(model, _plain(variables), plan)
  check_int("batch_size", batch_size, 1)
  if len(x) == 0:
    raise ValueError("channel_stats needs at least one example.")
  fn = _captured_fn(model)
  zeros = {s.name: 0.0 for s in plan.sites}
  sums = dict(zeros)
  counts = dict(zeros)
  for i in range(0, len(x), batch_size):
    inter = fn(variables, jnp.asarray(x[i:i + batch_size]))
    for s in plan.sites:
      a = np.asarray(_relu_of(inter, s.module), np.float64)
      a = a.reshape(-1, a.shape[-1])
      counts[s.name] = counts[s.name] + np.sum(np.abs(a) <= APOZ_EPS, 0)
      sums[s.name] = sums[s.name] + np.sum(np.abs(a), 0)
      zeros[s.name] += a.shape[0]
  apoz = {k: counts[k] / zeros[k] for k in zeros}
  mean = {k: sums[k] / zeros[k] for k in zeros}
  for k in zeros:
    check_finite(f"activations of {k}", mean[k])
  return ChannelStats(apoz, mean, int(len(x)))


def prune_masks(stats: ChannelStats, *, apoz_threshold: float = 0.73, mean_threshold: float = 0.01,
                keep_fraction: float | None = None, multiple_of: int | None = None) -> dict[str, np.ndarray]:
  """Which channels to keep, per site.

  Paper rule (Sec. 3.2, the authors' ``apoz_policy.py``): prune channel ``c`` iff
  ``APoZ_c > apoz_threshold`` and ``mean|a|_c < mean_threshold``. With ``keep_fraction`` (beyond the
  paper, for a FLOP budget) each layer instead keeps the ``ceil(keep_fraction * channels)`` channels
  with the lowest APoZ (ties: larger mean ``|a|`` first). Either way at least one channel per layer is
  kept: if the rule would remove all of them, the channel with the lowest APoZ stays and a
  ``UserWarning`` names the layer.

  ``multiple_of=m`` (beyond the paper; for the SIMD width of the CPU: AVX2 holds 8 float32, AVX-512
  16, so a layer of 39 channels wastes lanes in every vector op) rounds every layer's kept count to a
  multiple of ``m``, UPWARDS (the next lowest-APoZ channels join, so a layer never keeps fewer
  channels than without it), capped at the layer's channels. The FLOPs grow accordingly: count them
  with :func:`count_flops`.

  Returns:
    ``{site name: bool array (channels,)}``, True = keep.

  Example:

  >>> st = ChannelStats({"Conv_0": np.linspace(0, 1, 64)}, {"Conv_0": np.ones(64)}, 100)
  >>> [int(prune_masks(st, keep_fraction=0.3, multiple_of=m)["Conv_0"].sum()) for m in (None, 8, 16)]
  [20, 24, 32]
  >>> bool(prune_masks(st, keep_fraction=0.3, multiple_of=8)["Conv_0"][:16].all())   # lowest APoZ kept
  True
  """
  check_range("apoz_threshold", apoz_threshold, 0.0, 1.0)
  check_range("mean_threshold", mean_threshold, 0.0)
  if keep_fraction is not None:
    check_range("keep_fraction", keep_fraction, 0.0, 1.0, low_inclusive=False)
  if multiple_of is not None:
    check_int("multiple_of", multiple_of, 1)
  masks = {}
  for name, apoz in stats.apoz.items():
    apoz = np.asarray(apoz)
    mean = np.asarray(stats.mean_abs[name])
    order = np.lexsort((-mean, apoz))  # lowest APoZ first, then largest mean
    if keep_fraction is None:
      keep = ~((apoz > apoz_threshold) & (mean < mean_threshold))
    else:
      keep = np.zeros(apoz.shape, bool)
      keep[order[:max(1, math.ceil(keep_fraction * apoz.size - 1e-9))]] = True
    if not keep.any():
      warnings.warn(f"sensAI pruning would remove every channel of {name}; keeping channel {order[0]} "
                    "(lowest APoZ).", UserWarning, stacklevel=2)
      keep[order[0]] = True
    if multiple_of is not None:   # round the count up to a multiple
      n = min(apoz.size, -(-int(keep.sum()) // multiple_of) * multiple_of)
      keep[[c for c in order if not keep[c]][:n - int(keep.sum())]] = True
    masks[name] = keep
  return masks


def _mask_index(masks: dict, widths: dict, model: nn.Module) -> dict[str, np.ndarray]:
  index = {}
  for name, w in widths.items():
    if name not in masks:
      raise ValueError(f"no keep mask for layer {name} of {type(model).__name__}; masks cover "
                       f"{sorted(masks)}.")
    m = np.asarray(masks[name])
    if m.dtype != bool or m.shape != (w,):
      raise ValueError(f"keep mask of {name} must be a bool array of shape ({w},), got {m.dtype} {m.shape}.")
    if not m.any():
      warnings.warn(f"keep mask of {name} removes every channel; keeping channel 0.", UserWarning,
                    stacklevel=3)
      m = m.copy()
      m[0] = True
    index[name] = np.flatnonzero(m)
  return index


def prune(model: nn.Module, variables: dict, masks: dict[str, np.ndarray]) -> tuple[nn.Module, dict]:
  """Structured pruning as pytree surgery: remove the channels whose mask is False.

  Each removed channel disappears from its producing layer (conv/dense kernel output axis, bias, batch
  norm scale/bias/mean/var) and from the next layer's input axis (through the flatten for the CNN's
  first dense layer). The logits layer is untouched.

  Returns:
    ``(pruned_model, pruned_variables)``: a model of the same family with the new widths.
  """
  plan = _plan(model)
  widths = _check_structure(model, _plain(variables), plan)
  return _resize(model, variables, _mask_index(masks, widths, model))


def zero_pruned(model: nn.Module, variables: dict, masks: dict[str, np.ndarray]) -> dict:
  """The original model's variables with the producers of the masked-out channels zeroed.

  The zeroed channels output ``relu(0) = 0``, so the model computes exactly what :func:`prune`'s
  smaller model computes (a check of the surgery).
  """
  plan = _plan(model)
  variables = _plain(variables)
  widths = _check_structure(model, variables, plan)
  _mask_index(masks, widths, model)
  out = variables
  for s in plan.sites:
    keep = np.asarray(masks[s.name])
    for path, axis in s.producers:
      if path[0] == "batch_stats":
        continue  # BN output is scale * (.) + bias = 0 once both are zero
      a = np.asarray(_get(variables, path))
      shape = [1] * a.ndim
      shape[axis] = a.shape[axis]
      out = _set(out, path, jnp.asarray(np.where(keep.reshape(shape), a, np.zeros((), a.dtype))))
  return out


# ----------------------------------------------------------------------------------------------------
# 3. Subnets: one-vs-rest heads, retraining, calibration, combination
# ----------------------------------------------------------------------------------------------------

class Subnet(NamedTuple):
  """One class group's model: output 0 is "other", output ``j + 1`` is class ``classes[j]``."""
  model: nn.Module
  variables: dict
  classes: tuple[int, ...]


def relabel(y: np.ndarray, classes: Sequence[int]) -> np.ndarray:
  """Labels of a group's task: 0 for classes outside ``classes``, ``j + 1`` for ``classes[j]``."""
  y = np.asarray(y)
  out = np.zeros(y.shape, np.int32)
  for j, c in enumerate(classes):
    out[y == c] = j + 1
  return out


def _check_classes(classes, num_classes: int | None = None) -> tuple[int, ...]:
  classes = tuple(int(c) for c in classes)
  if not classes or len(set(classes)) != len(classes) or min(classes) < 0:
    raise ValueError(f"classes must be distinct non-negative class ids, got {classes}.")
  if num_classes is not None and max(classes) >= num_classes:
    raise ValueError(f"class {max(classes)} is outside the model's {num_classes} classes.")
  return classes


def make_subnet(model: nn.Module, variables: dict, classes: Sequence[int],
                masks: dict[str, np.ndarray] | None = None) -> Subnet:
  """Prune ``model`` with ``masks`` (None: keep every channel) and give it an ``m + 1``-way head.

  The head starts from the original logits layer: the columns of the group's classes are copied, and
  the "other" column is the mean of the remaining classes' columns (weights and bias).
  """
  plan = _plan(model)
  variables = _plain(variables)
  widths = _check_structure(model, variables, plan)
  kernel = np.asarray(_get(variables, ("params", *plan.head, "kernel")))
  bias = np.asarray(_get(variables, ("params", *plan.head, "bias")))
  classes = _check_classes(classes, bias.shape[0])
  rest = [c for c in range(bias.shape[0]) if c not in classes]
  if not rest:
    raise ValueError(f"group {classes} holds every class; a subnet needs an 'other' class outside it.")
  hk = np.concatenate([kernel[:, rest].mean(1, keepdims=True), kernel[:, list(classes)]], 1)
  hb = np.concatenate([bias[rest].mean(keepdims=True), bias[list(classes)]])
  index = (_mask_index(masks, widths, model) if masks is not None
           else {k: np.arange(w) for k, w in widths.items()})
  variables = _set(variables, ("params", *plan.head, "kernel"), hk.astype(kernel.dtype))
  variables = _set(variables, ("params", *plan.head, "bias"), hb.astype(bias.dtype))
  m, v = _resize(model, variables, index)
  return Subnet(m, v, classes)


def group_dataset(dataset: Dataset, classes: Sequence[int], *, oversample: bool = True) -> Dataset:
  """The one-vs-rest data set of a group: labels from :func:`relabel`; with ``oversample`` the group's
  training examples are repeated ``max(1, round(n_other / n_group))`` times (the paper oversamples the
  positives). The test split is relabelled, not resampled."""
  classes = _check_classes(classes, dataset.num_classes)
  ytr = relabel(dataset.y_train, classes)
  xtr = dataset.x_train
  pos = np.flatnonzero(ytr > 0)
  if oversample and len(pos):
    reps = max(1, int(round((len(ytr) - len(pos)) / len(pos))))
    idx = np.concatenate([np.arange(len(ytr))] + [pos] * (reps - 1))
    xtr, ytr = xtr[idx], ytr[idx]
  return Dataset(xtr, ytr, dataset.x_test, relabel(dataset.y_test, classes), len(classes) + 1,
                 f"{dataset.name}-group{'-'.join(map(str, classes))}")


def retrain_subnet(subnet: Subnet, dataset: Dataset, tx: optax.GradientTransformation, *, epochs: int,
                   batch_size: int = 64, seed: int = 0, oversample: bool = True,
                   verbose: bool = False) -> tuple[Subnet, dict]:
  """Fine-tune a pruned subnet on its group's one-vs-rest task (paper Sec. 3.3).

  ``dataset`` has the ORIGINAL labels; it is turned into the group task with :func:`group_dataset`.
  The paper uses SGD (momentum 0.9, weight decay 5e-4, lr 0.01 with 10x drops); pass any optax ``tx``.

  Returns:
    ``(subnet with the new variables, history of mlsys_jax.models.train_classifier)``.
  """
  gds = group_dataset(dataset, subnet.classes, oversample=oversample)
  variables = _plain(subnet.variables)
  params = variables["params"]
  state = _models.TrainState(params, {k: v for k, v in variables.items() if k != "params"},
                             tx.init(params), jnp.zeros((), jnp.int32))
  new_vars, hist = _models.train_classifier(subnet.model, gds, tx, epochs=epochs, batch_size=batch_size,
                                            seed=seed, verbose=verbose, state=state)
  return subnet._replace(variables=_plain(new_vars)), hist


def _unpad(ens_model: nn.Module, variables: dict, like: Subnet) -> Subnet:
  """Cut one subnet's slice of a padded stack back to the widths and head of ``like``."""
  plan = _plan(ens_model)
  widths = _check_structure(like.model, _plain(like.variables), _plan(like.model))
  model, v = _resize(ens_model, variables, {k: np.arange(w) for k, w in widths.items()})
  m = len(like.classes) + 1
  for leaf, cut in (("kernel", lambda a: a[:, :m]), ("bias", lambda a: a[:m])):
    v = _set(v, ("params", *plan.head, leaf), cut(_get(v, ("params", *plan.head, leaf))))
  return Subnet(_plan(model).rebuild(widths, m), v, like.classes)


def retrain_subnets(subnets: Sequence[Subnet], dataset: Dataset, tx: optax.GradientTransformation, *,
                    epochs: int, batch_size: int = 64, seed: int = 0, oversample: bool = True,
                    verbose: bool = False) -> tuple[list[Subnet], dict]:
  """Retrain ALL subnets at once: one jitted, vmapped training step over the zero-padded stack.

  Equivalent in what it optimises to :func:`retrain_subnet` per subnet (each subnet sees minibatches
  of its own one-vs-rest set, :func:`group_dataset`, and has its own optimizer state), but compiled
  once and run as one program. Padding stays exact while training: a padded channel outputs
  ``relu(0) = 0`` whose gradient is 0, padded logits are masked out of the loss, so every update of a
  padded weight is 0 (for optax transforms that map a zero gradient on a zero weight to a zero update,
  e.g. SGD, momentum, Adam, weight decay); this is checked after training (``RuntimeError`` if not).
  An epoch is ``len(dataset.x_train) // batch_size`` steps; each subnet cycles through its own shuffled
  (oversampled) training set.

  Returns:
    ``(retrained subnets at their original widths, history)`` with per-epoch ``loss`` ``(S,)`` and
    group-task ``test_accuracy`` ``(S,)``.
  """
  check_int("epochs", epochs, 1)
  check_int("batch_size", batch_size, 1)
  ens = stack_subnets(subnets, dataset.num_classes)
  model = ens.model
  sets = [group_dataset(dataset, s.classes, oversample=oversample) for s in subnets]
  params = ens.variables["params"]
  state = {k: v for k, v in ens.variables.items() if k != "params"}
  opt_state = jax.vmap(tx.init)(params)

  def loss_fn(p, st, xb, yb, valid):
    v = {"params": p, **st}
    if st:
      logits, new = model.apply(v, xb, train=True, mutable=list(st))
    else:
      logits, new = model.apply(v, xb, train=True), st
    logits = jnp.where(valid[None], logits, -1e9)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new

  def one(p, st, o, xb, yb, valid):
    (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(p, st, xb, yb, valid)
    upd, o = tx.update(g, o, p)
    return optax.apply_updates(p, upd), new, o, loss

  step = jax.jit(jax.vmap(one))
  predict = jax.jit(jax.vmap(lambda v, x: model.apply(v, x, train=False), in_axes=(0, None)))
  steps = len(dataset.x_train) // batch_size
  if steps == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {len(dataset.x_train)} training examples.")
  rng = np.random.default_rng(seed)
  y_test = np.stack([g.y_test for g in sets])
  history = {"loss": [], "test_accuracy": []}
  for epoch in range(epochs):
    idx = []
    for g in sets:
      n = len(g.y_train)
      reps = -(-steps * batch_size // n)
      idx.append(np.concatenate([rng.permutation(n) for _ in range(reps)])[:steps * batch_size])
    losses = []
    for i in range(steps):
      sl = slice(i * batch_size, (i + 1) * batch_size)
      xb = np.stack([g.x_train[ix[sl]] for g, ix in zip(sets, idx)])
      yb = np.stack([g.y_train[ix[sl]] for g, ix in zip(sets, idx)])
      params, state, opt_state, loss = step(params, state, opt_state, xb, yb, ens.valid)
      losses.append(loss)
    logits = np.asarray(predict({"params": params, **state}, jnp.asarray(dataset.x_test)))
    logits = np.where(np.asarray(ens.valid)[:, None, :], logits, -np.inf)
    history["loss"].append(np.mean(np.asarray(jax.device_get(losses)), 0))
    history["test_accuracy"].append(np.mean(np.argmax(logits, -1) == y_test, 1))
    if verbose:
      print(f"  epoch {epoch + 1}/{epochs}: loss {np.round(history['loss'][-1], 4).tolist()} group-task "
            f"test acc {np.round(history['test_accuracy'][-1], 4).tolist()}", flush=True)
  trained = {"params": params, **state}
  out = [_unpad(model, jax.tree_util.tree_map(lambda a: a[i], trained), s) for i, s in enumerate(subnets)]
  # Padding must have stayed exact: re-padding the cut subnets gives back the trained parameters.
  again = stack_subnets(out, dataset.num_classes).variables["params"]
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(again)):
    if not np.array_equal(np.asarray(a), np.asarray(b)):
      raise RuntimeError(f"retrain_subnets: padded entries of {jax.tree_util.keystr(path)} moved away from 0 "
                         f"during training; use an optimizer that keeps zero weights with zero gradients "
                         "at zero, or retrain_subnet per subnet.")
  return out, history


def subnet_predict(subnet: Subnet, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
  """Logits ``(n, m + 1)`` of one subnet."""
  return _models.predict(subnet.model, subnet.variables, x, batch_size)


def _nll(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
  z = logits / t
  z = z - z.max(1, keepdims=True)
  lse = np.log(np.exp(z).sum(1))
  return float(np.mean(lse - z[np.arange(len(labels)), labels]))


def calibrate_temperature(logits: np.ndarray, labels: np.ndarray, *, low: float = 0.05,
                          high: float = 20.0) -> float:
  """Temperature ``T`` minimising the held-out NLL of ``softmax(logits / T)`` (Guo et al., 2017).

  A log-spaced grid over ``[low, high]`` followed by a golden-section refinement in log ``T`` around
  the best grid point (float64 numpy). Use it per subnet on its relabelled held-out data
  (:func:`relabel`) before :func:`combine`.
  """
  z = np.asarray(logits, np.float64)
  y = np.asarray(labels)
  if z.ndim != 2 or y.shape != (z.shape[0],) or z.shape[0] == 0:
    raise ValueError(f"logits must be (n, c) and labels (n,) with n > 0, got {z.shape} and {y.shape}.")
  check_finite("logits", z)
  if y.min() < 0 or y.max() >= z.shape[1]:
    raise ValueError(f"labels must lie in [0, {z.shape[1]}), got [{y.min()}, {y.max()}].")
  check_range("low", low, 0.0, low_inclusive=False)
  check_range("high", high, low, low_inclusive=False)
  grid = np.linspace(np.log(low), np.log(high), 61)
  f = [_nll(z, y, np.exp(g)) for g in grid]
  i = int(np.argmin(f))
  a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
  g = (math.sqrt(5) - 1) / 2
  for _ in range(40):
    c, d = b - g * (b - a), a + g * (b - a)
    if _nll(z, y, np.exp(c)) < _nll(z, y, np.exp(d)):
      b = d
    else:
      a = c
  t = float(np.exp((a + b) / 2))
  if i in (0, len(grid) - 1):
    warnings.warn(f"calibrate_temperature: the held-out NLL is smallest at the search bound T={t:.3g} "
                  f"(the logits {'separate the held-out data perfectly' if i == 0 else 'carry no signal'}); "
                  "the temperature is not identified. Use more (or harder) held-out data, or "
                  "calibrate_temperatures_joint.", UserWarning, stacklevel=2)
  return t


def calibrate_temperatures_joint(logits: Sequence[np.ndarray], classes: Sequence[Sequence[int]],
                                 labels: np.ndarray, num_classes: int, *, steps: int = 300,
                                 learning_rate: float = 0.05, low: float = 0.05,
                                 high: float = 20.0) -> np.ndarray:
  """Temperatures of ALL subnets fitted together on the NLL of the *combined* distribution.

  Beyond the paper: per-subnet calibration (:func:`calibrate_temperature`) makes each softmax honest
  about its own task, but the combination compares the subnets' class columns with each other; this
  fits ``log T`` (one per subnet, clipped to ``[low, high]``) by Adam on
  ``-mean log combine(logits, classes, T)[label]`` with the original held-out ``labels``. Starts at 1.

  Args:
    logits: per subnet ``(n, m_s + 1)`` held-out logits (column 0 "other").
    classes: per subnet its ``m_s`` original class ids; the groups partition ``range(num_classes)``.
    labels: ``(n,)`` integer ORIGINAL class ids in ``[0, num_classes)`` (not relabelled).
    num_classes: ``K``.
    steps, learning_rate: Adam steps (>= 1) and step size (> 0) on ``log T``.
    low, high: temperature bounds, ``0 < low < high`` (finite).

  Returns:
    ``(S,)`` float64 temperatures.
  """
  classes = [_check_classes(c, num_classes) for c in classes]
  if len(logits) != len(classes):
    raise ValueError(f"got {len(logits)} logit arrays for {len(classes)} groups; pass one per group.")
  check_int("steps", steps, 1)
  check_range("learning_rate", learning_rate, 0.0, low_inclusive=False)
  check_range("low", low, 0.0, low_inclusive=False)
  check_range("high", high, low, low_inclusive=False)
  y = np.asarray(labels)
  if y.ndim != 1 or y.shape[0] == 0:
    raise ValueError(f"labels must be (n,) with n > 0 (one original class id per held-out sample), got shape "
                     f"{y.shape}.")
  if not np.issubdtype(y.dtype, np.integer):
    raise TypeError(f"labels must be integer class ids, got dtype {y.dtype}; cast them, e.g. labels.astype(int).")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}) (original class ids), got [{y.min()}, {y.max()}].")
  padded, valid = _pad_group_logits(logits, classes, y.shape[0])
  width = padded.shape[2]
  check_finite("logits", padded)
  assign = jnp.asarray(_assignment(classes, num_classes, width - 1))
  z, valid, yj = jnp.asarray(padded), jnp.asarray(valid), jnp.asarray(y)
  lo, hi = math.log(low), math.log(high)

  def loss(log_t):
    p = _combine_padded(z, valid, assign, jnp.exp(jnp.clip(log_t, lo, hi)))
    return -jnp.mean(jnp.log(jnp.take_along_axis(p, yj[:, None], 1) + 1e-30))

  opt = optax.adam(learning_rate)

  @jax.jit
  def fit(log_t):
    def body(_, carry):
      lt, st = carry
      g = jax.grad(loss)(lt)
      upd, st = opt.update(g, st)
      return jnp.clip(optax.apply_updates(lt, upd), lo, hi), st
    return jax.lax.fori_loop(0, steps, body, (log_t, opt.init(log_t)))[0]

  return np.exp(np.asarray(fit(jnp.zeros(len(classes))), np.float64))


def _class_log_scores(logits: jnp.ndarray, valid: jnp.ndarray, assign: jnp.ndarray,
                      temperatures: jnp.ndarray) -> jnp.ndarray:
  """(S, n, M+1) padded logits -> (n, K) unnormalised class log-scores of these subnets.

  Class ``k`` owned by output ``j + 1`` of subnet ``s`` gets ``log_softmax(z_s / T_s)[j + 1]``; a class
  that none of these subnets owns (the other devices' classes, under ``shard_map``) gets ``-inf``.
  Everything stays in log space, so no class probability underflows. NaN logits propagate.
  """
  z = jnp.where(valid[:, None, :], logits / temperatures[:, None, None], -jnp.inf)
  lp = jax.nn.log_softmax(z, axis=-1)[:, :, 1:]                     # (S, n, M)
  s, n, m = lp.shape
  owners = assign.reshape(s * m, -1)                                 # (S M, K) 0/1
  owner = jnp.argmax(owners, axis=0)                                 # row of each class's owner
  lp = jnp.moveaxis(lp, 1, 0).reshape(n, s * m)
  return jnp.where(jnp.max(owners, axis=0) > 0, lp[:, owner], -jnp.inf)


def _normalise_log_scores(lq: jnp.ndarray, axis_name: str | None = None) -> jnp.ndarray:
  """``softmax`` over the classes of (n, K) log-scores, the classes optionally split over the devices of
  ``axis_name`` (each device: its own classes, ``-inf`` elsewhere; one ``pmax`` and one ``psum``).

  Shifted by the row maximum: the largest term is ``exp(0) = 1``, so the sum never underflows to 0.
  """
  mx = jnp.max(lq, axis=-1, keepdims=True)
  if axis_name is not None:
    mx = jax.lax.pmax(mx, axis_name)
  mx = jax.lax.stop_gradient(jnp.where(jnp.isfinite(mx), mx, 0.0))   # NaN rows stay NaN through lq
  e = jnp.exp(lq - mx)
  if axis_name is not None:
    e = jax.lax.psum(e, axis_name)
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _combine_padded(logits: jnp.ndarray, valid: jnp.ndarray, assign: jnp.ndarray,
                    temperatures: jnp.ndarray) -> jnp.ndarray:
  """(S, n, M+1) padded logits -> (n, K) class distribution (computed in log space; finite for finite
  logits at any temperature). NaN logits propagate to the output."""
  return _normalise_log_scores(_class_log_scores(logits, valid, assign, temperatures))


def _pad_group_logits(logits: Sequence[np.ndarray], classes: Sequence[tuple[int, ...]],
                      n: int) -> tuple[np.ndarray, np.ndarray]:
  """Stack per-group logits ``(n, m_s + 1)`` into ``(G, n, max m + 1)`` float32 with a validity mask
  ``(G, max m + 1)``; ValueError naming the group whose shape is wrong."""
  width = max(len(c) for c in classes) + 1
  padded = np.zeros((len(classes), n, width), np.float32)
  valid = np.zeros((len(classes), width), bool)
  for s, (z, cl) in enumerate(zip(logits, classes)):
    if np.shape(z) != (n, len(cl) + 1):
      raise ValueError(f"logits of group {s} must be ({n}, {len(cl) + 1}), got {np.shape(z)}.")
    padded[s, :, :len(cl) + 1] = z
    valid[s, :len(cl) + 1] = True
  return padded, valid


def _check_temperatures(temperatures: Sequence[float] | None, num: int) -> np.ndarray:
  """``(num,)`` float64 temperatures (default 1), each positive and finite in float32 (the combination runs in
  float32: 1e-50 would become 0 and 1e39 inf there); ValueError otherwise."""
  if temperatures is None:
    return np.ones(num)
  temps = np.asarray(temperatures, np.float64)
  with np.errstate(over="ignore", under="ignore"):
    t32 = temps.astype(np.float32)
  if temps.shape != (num,) or not (np.all(np.isfinite(t32)) and np.all(t32 > 0)):
    raise ValueError(f"temperatures must be {num} positive finite numbers (representable in float32), one per "
                     f"subnet, got {temperatures!r}; use None for 1, or fit them with calibrate_temperature or "
                     "calibrate_temperatures_joint.")
  return temps


def _assignment(classes: Sequence[tuple[int, ...]], num_classes: int, width: int) -> np.ndarray:
  assign = np.zeros((len(classes), width, num_classes), np.float32)
  seen = []
  for s, cl in enumerate(classes):
    for j, c in enumerate(cl):
      assign[s, j, c] = 1.0
      seen.append(c)
  if sorted(seen) != list(range(num_classes)):
    raise ValueError(f"the groups {list(classes)} must cover each of the {num_classes} classes exactly once.")
  return assign


def combine(logits: Sequence[np.ndarray], classes: Sequence[Sequence[int]], num_classes: int,
            temperatures: Sequence[float] | None = None) -> np.ndarray:
  """Class distribution ``(n, K)`` from per-subnet logits (paper Sec. 3.4, with temperatures).

  ``softmax(logits_s / T_s)`` per subnet, drop column 0 ("other"), scatter columns ``1..m`` to
  ``classes[s]`` and renormalise over the ``K`` classes. The groups must partition the classes;
  ``temperatures`` (default 1) must be positive and finite (ValueError otherwise).
  Computed in log space: ``log q_k = log_softmax(logits_s / T_s)[j]`` for the output ``j`` owning class
  ``k``, then a softmax over ``k``; finite for finite logits even when every class probability would
  underflow (all subnets confident in "other" at a small temperature). NaN logits give NaN rows.

  >>> p = combine([np.array([[7., 0, 0]]), np.array([[7., 0, 1]])], [(0, 1), (2, 3)], 4, [0.05, 0.05])
  >>> np.round(p, 3).tolist()   # exp(-140) in probability space: 0 / 0 without the log space
  [[0.0, 0.0, 0.0, 1.0]]
  """
  classes = [_check_classes(c, num_classes) for c in classes]
  if len(logits) != len(classes):
    raise ValueError(f"got {len(logits)} logit arrays for {len(classes)} groups.")
  temps = _check_temperatures(temperatures, len(classes))
  padded, valid = _pad_group_logits(logits, classes, np.shape(logits[0])[0])
  width = padded.shape[2]
  return np.asarray(_combine_padded(jnp.asarray(padded), jnp.asarray(valid),
                                    jnp.asarray(_assignment(classes, num_classes, width - 1)),
                                    jnp.asarray(temps, jnp.float32)))


# ----------------------------------------------------------------------------------------------------
# 4. Execution: one vmapped program, or one subnet group per device
# ----------------------------------------------------------------------------------------------------

class Ensemble(NamedTuple):
  """Subnets zero-padded to a common width and stacked along a leading axis of size ``S``.

  Attributes:
    model: the common-width model (one copy of the architecture, ``M + 1`` outputs).
    variables: its variables with a leading subnet axis ``S``.
    valid: ``(S, M + 1)`` bool, which outputs of each subnet are real.
    assign: ``(S, M, K)`` 0/1, output ``j + 1`` of subnet ``s`` is class ``k``.
    temperatures: ``(S,)`` float32.
  """
  model: nn.Module
  variables: Any
  valid: jnp.ndarray
  assign: jnp.ndarray
  temperatures: jnp.ndarray


def stack_subnets(subnets: Sequence[Subnet], num_classes: int,
                  temperatures: Sequence[float] | None = None) -> Ensemble:
  """Pad every subnet to the widest width of each layer (zero channels) and stack them.

  Padding is exact: a padded channel has zero weights and bias (and zero batch-norm scale and bias),
  so it outputs ``relu(0) = 0``, and the next layer's rows for it are zero as well. Padded outputs are
  masked to ``-inf`` before the softmax. The groups of the subnets must partition the classes;
  ``temperatures`` (default 1), one per subnet, must be positive and finite (ValueError otherwise).
  """
  if not subnets:
    raise ValueError("stack_subnets needs at least one subnet.")
  plans = [_plan(s.model) for s in subnets]
  widths = [_check_structure(s.model, _plain(s.variables), p) for s, p in zip(subnets, plans)]
  names = [tuple(w) for w in widths]
  if len(set(names)) != 1 or len({type(s.model) for s in subnets}) != 1:
    raise ValueError("stack_subnets needs subnets of one architecture (same layers); got "
                     f"{[type(s.model).__name__ for s in subnets]} with layers {set(names)}.")
  common = {k: max(w[k] for w in widths) for k in widths[0]}
  width = max(len(s.classes) for s in subnets) + 1
  models_ = {p.rebuild(common, width) for p in plans}
  if len(models_) != 1:
    raise ValueError(f"stack_subnets needs subnets of one architecture; padded to common widths they differ: "
                     f"{models_}.")
  model = models_.pop()
  padded_vars = []
  for s, p, w in zip(subnets, plans, widths):
    index = {k: np.concatenate([np.arange(w[k]), -np.ones(common[k] - w[k], np.int64)]) for k in w}
    _, v = _resize(s.model, s.variables, index)   # pads the head's input rows too when it consumes a site
    hk = _get(v, ("params", *p.head, "kernel"))
    hb = _get(v, ("params", *p.head, "bias"))
    extra = width - hb.shape[0]
    v = _set(_set(v, ("params", *p.head, "kernel"), np.pad(np.asarray(hk), ((0, 0), (0, extra)))),
             ("params", *p.head, "bias"), np.pad(np.asarray(hb), (0, extra)))
    padded_vars.append(v)
  stacked = jax.tree_util.tree_map(lambda *a: jnp.asarray(np.stack([np.asarray(b) for b in a])),
                                   *padded_vars)
  classes = [s.classes for s in subnets]
  valid = np.zeros((len(subnets), width), bool)
  for i, cl in enumerate(classes):
    valid[i, :len(cl) + 1] = True
  temps = _check_temperatures(temperatures, len(subnets))
  return Ensemble(model, stacked, jnp.asarray(valid), jnp.asarray(_assignment(classes, num_classes, width - 1)),
                  jnp.asarray(temps, jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def _ensemble_logits(model, variables, x):
  return jax.vmap(lambda v: model.apply(v, x, train=False))(variables)


def ensemble_logits(ens: Ensemble, x: jnp.ndarray) -> jnp.ndarray:
  """Padded logits ``(S, n, M + 1)`` of every subnet, computed by ONE vmapped program."""
  return _ensemble_logits(ens.model, ens.variables, jnp.asarray(x))


@functools.partial(jax.jit, static_argnums=0)
def _ensemble_predict(model, variables, valid, assign, temps, x):
  logits = jax.vmap(lambda v: model.apply(v, x, train=False))(variables)
  return _combine_padded(logits, valid, assign, temps)


def ensemble_predict(ens: Ensemble, x: jnp.ndarray) -> jnp.ndarray:
  """Combined class distribution ``(n, K)`` of the stacked subnets on one device (jitted, vmapped)."""
  return _ensemble_predict(ens.model, ens.variables, ens.valid, ens.assign, ens.temperatures, jnp.asarray(x))


def make_branch_predictor(subnets: Sequence[Subnet], num_classes: int,
                          temperatures: Sequence[float] | None = None) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """A jitted ``x -> (n, K)`` class distribution that runs every subnet at its OWN width as an
  independent branch of one program (no padding; XLA may schedule the branches concurrently), then
  combines them as :func:`combine` does. The alternative to :func:`ensemble_predict` when the subnets'
  widths differ a lot, or where a batched (grouped) convolution is slow (XLA CPU)."""
  ens = stack_subnets(subnets, num_classes, temperatures)   # validates and builds valid/assign/temps
  mods = [s.model for s in subnets]
  variables = [s.variables for s in subnets]
  width = ens.valid.shape[1]

  @jax.jit
  def predict(variables, x):
    logits = [m.apply(v, x, train=False) for m, v in zip(mods, variables)]
    padded = jnp.stack([jnp.pad(z, ((0, 0), (0, width - z.shape[1]))) for z in logits])
    return _combine_padded(padded, ens.valid, ens.assign, ens.temperatures)

  return functools.partial(predict, variables)


def ensemble_predict_sharded(ens: Ensemble, x: jnp.ndarray, mesh: Mesh | None = None,
                             axis_name: str = "g") -> jnp.ndarray:
  """Combined class distribution with the subnets split over devices under ``shard_map``.

  Each device runs its ``S / D`` subnets (vmapped) on the replicated input and computes the log-scores
  of its classes (temperature ``log_softmax``, ``-inf`` for the other devices' classes); a ``pmax`` of
  the row maxima and a ``psum`` of the shifted exponentials over ``axis_name`` give the normalised,
  replicated distribution (the same code as :func:`combine`, in log space). Equal to :func:`ensemble_predict` up to float rounding.

  Args:
    ens: from :func:`stack_subnets`.
    x: inputs ``(n, ...)``, replicated to every device.
    mesh: a 1-D mesh whose size divides ``S``; default: the first ``d`` devices, ``d`` the largest
      divisor of ``S`` not above ``jax.device_count()``.
    axis_name: the mesh axis name.
  """
  s = ens.valid.shape[0]
  if mesh is None:
    mesh = _default_mesh(s, axis_name)
  if mesh.axis_names != (axis_name,) or s % mesh.size:
    raise ValueError(f"mesh must be 1-D with axis {axis_name!r} and a size dividing the {s} subnets, got "
                     f"axes {mesh.axis_names} of size {mesh.size}.")
  return _sharded_fn(ens.model, mesh, axis_name)(ens.variables, ens.valid, ens.assign, ens.temperatures,
                                                 jnp.asarray(x))


def _local_logits(model, variables, x):
  """Padded logits ``(k, n, M + 1)`` of the ``k`` stacked subnets of one device, each applied on its own
  (an unrolled loop: ``vmap`` over conv weights becomes a grouped convolution, slow on XLA CPU)."""
  k = jax.tree_util.tree_leaves(variables)[0].shape[0]
  return jnp.stack([model.apply(jax.tree_util.tree_map(lambda a: a[i], variables), x, train=False)
                    for i in range(k)])


def _default_mesh(num_subnets: int, axis_name: str) -> Mesh:
  d = max(k for k in range(1, min(num_subnets, jax.device_count()) + 1) if num_subnets % k == 0)
  return Mesh(np.array(jax.devices()[:d]), (axis_name,))


def _combine_padded_np(logits: np.ndarray, valid: np.ndarray, assign: np.ndarray,
                       temperatures: np.ndarray) -> np.ndarray:
  """numpy (float64) twin of :func:`_combine_padded` for the host: (S, n, M+1) padded logits -> (n, K)
  class distribution, in log space; NaN logits give NaN rows."""
  z = np.where(valid[:, None, :], np.asarray(logits, np.float64) / temperatures[:, None, None], -np.inf)
  mz = np.max(z, axis=-1, keepdims=True)
  lp = (z - mz - np.log(np.sum(np.exp(z - mz), axis=-1, keepdims=True)))[:, :, 1:]   # (S, n, M)
  s, n, m = lp.shape
  owners = assign.reshape(s * m, -1)
  lq = np.moveaxis(lp, 1, 0).reshape(n, s * m)[:, np.argmax(owners, axis=0)]        # (n, K)
  mx = np.max(lq, axis=-1, keepdims=True)
  e = np.exp(lq - np.where(np.isfinite(mx), mx, 0.0))
  return (e / np.sum(e, axis=-1, keepdims=True)).astype(np.float32)


def host_aligned(x, alignment: int = 64):
  """``x`` as a numpy array whose data starts at a multiple of ``alignment`` bytes (a copy only when
  it does not already).

  XLA CPU can use an aligned host array in place (no copy per device); an unaligned one is copied to
  every device it goes to. On the 16-core host of the latency benchmark this made a batch-1 call of the
  5-device ``shard_map`` ensemble 60-110 us faster, of the one-device original 40-60 us
  (``benchmarks/sensai_latency.py --aligned``). :class:`ShardedPredictor` applies it to numpy inputs.

  >>> a = host_aligned(np.arange(6, dtype=np.float32).reshape(2, 3)[:, 1:])
  >>> a.ctypes.data % 64, a.tolist()
  (0, [[1.0, 2.0], [4.0, 5.0]])
  """
  check_int("alignment", alignment, 1)
  x = np.asarray(x)
  if x.ctypes.data % alignment == 0 and x.flags.c_contiguous:
    return x
  buf = np.empty(x.nbytes + alignment, np.uint8)
  off = (-buf.ctypes.data) % alignment
  out = buf[off:off + x.nbytes].view(x.dtype).reshape(x.shape)
  out[...] = x
  return out


class ShardedPredictor(NamedTuple):
  """Class-parallel predictor from :func:`make_sharded_predictor`; call it as ``predictor(x)``.

  Attributes:
    fn: the jitted ``fn(variables, x)`` (replace it by ``fn.lower(variables, x).compile(options)`` for
      other XLA options): the ``(n, K)`` distribution, or with ``combine_on_host`` the padded logits
      ``(S, n, M + 1)``, sharded over the devices.
    variables: the subnets' weights, placed on the devices.
    combine_on_host: whether ``__call__`` combines the logits on the host (numpy, float64). A numpy
      input is first made 64-byte aligned (:func:`host_aligned`).
    valid, assign, temperatures: numpy arrays of the combination (see :class:`Ensemble`).
  """
  fn: Callable
  variables: Any
  combine_on_host: bool
  valid: np.ndarray
  assign: np.ndarray
  temperatures: np.ndarray

  def __call__(self, x):
    if isinstance(x, np.ndarray):   # 64-byte aligned host input: XLA CPU uses it in place
      x = host_aligned(x)
    out = self.fn(self.variables, x)
    if self.combine_on_host:
      return _combine_padded_np(np.asarray(out), self.valid, self.assign, self.temperatures)
    return out


def make_sharded_predictor(subnets: Sequence[Subnet], num_classes: int,
                           temperatures: Sequence[float] | None = None, *, mesh: Mesh | None = None,
                           axis_name: str = "g", own_width: bool | None = None,
                           combine_on_host: bool = False) -> ShardedPredictor:
  """A jitted ``x -> (n, K)`` class distribution with the subnets split over the devices of ``mesh``
  under ``shard_map``, their weights placed on the devices ONCE (here, not at every call).

  The paper's execution (Wang et al., MLSys 2021, Sec. 3.4): every device runs its group's subnet on
  the same input at the same time. Each device computes the padded logits ``(S / D, n, M + 1)`` of
  its subnets; ONE ``all_gather`` (a few numbers per example) gives every device all ``S`` subnets'
  logits, and the combination of :func:`combine` (temperatures, log space) runs locally. The input is
  replicated to the devices by the jitted function's input sharding (a numpy array goes straight from
  the host to every device). With ``combine_on_host`` the devices run without any collective: each
  returns its logits and the host combines them (numpy, float64), for callers who want numpy anyway.

  Args:
    subnets: from :func:`make_subnet` (their groups partition the classes).
    num_classes: ``K``.
    temperatures: per-subnet temperatures (default 1).
    mesh: a 1-D mesh whose size divides the number of subnets; default: the first ``d`` devices, ``d``
      the largest divisor of ``S`` not above ``jax.device_count()``.
    axis_name: the mesh axis name.
    own_width: one subnet per device, each at its OWN widths (``lax.switch`` on the device index; every
      device holds every subnet's weights, which are small), instead of all zero-padded to the widest
      width of each layer and sharded. Needs ``mesh.size == S``. Default: when the widths differ and
      ``mesh.size == S``.
    combine_on_host: see above; the call then returns a numpy array.

  Returns:
    A :class:`ShardedPredictor`; ``predictor(x)`` gives the ``(n, K)`` distribution.

  Example (8 CPU devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; here one device):

  >>> import jax, numpy as np
  >>> from mlsys_jax import models
  >>> from mlsys_jax.infer import sensai
  >>> model = models.CNN(num_classes=4, channels=(4,), hidden=8)
  >>> x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)
  >>> variables = model.init(jax.random.PRNGKey(0), x[:1])
  >>> keep = sensai.prune_masks(sensai.channel_stats(model, variables, x), keep_fraction=0.5)
  >>> subs = [sensai.make_subnet(model, variables, g, keep) for g in ((0, 1), (2, 3))]
  >>> predict = sensai.make_sharded_predictor(subs, 4)
  >>> bool(np.allclose(predict(x[:2]), sensai.ensemble_predict(sensai.stack_subnets(subs, 4), x[:2]),
  ...                  atol=1e-6))
  True
  """
  ens = stack_subnets(subnets, num_classes, temperatures)   # validates; valid / assign / temperatures
  s = len(subnets)
  mesh = _default_mesh(s, axis_name) if mesh is None else mesh
  if mesh.axis_names != (axis_name,) or s % mesh.size:
    raise ValueError(f"mesh must be 1-D with axis {axis_name!r} and a size dividing the {s} subnets, got "
                     f"axes {mesh.axis_names} of size {mesh.size}.")
  shapes = {tuple(np.shape(a) for a in jax.tree_util.tree_leaves(sub.variables)) for sub in subnets}
  if own_width is None:
    own_width = len(shapes) > 1 and mesh.size == s
  if own_width and mesh.size != s:
    raise ValueError(f"own_width=True runs one subnet per device: the mesh has {mesh.size} devices for "
                     f"{s} subnets; pass a mesh of {s} devices or own_width=False.")
  width = ens.valid.shape[1]
  repl = jax.sharding.NamedSharding(mesh, P())
  if own_width:
    mods = [sub.model for sub in subnets]

    def branch(j, variables, x):
      z = mods[j].apply(variables[j], x, train=False)
      return jnp.pad(z, ((0, 0), (0, width - z.shape[1])))

    def local_logits(variables, x):   # only this device's branch runs
      i = jax.lax.axis_index(axis_name)
      return jax.lax.switch(i, [functools.partial(branch, j) for j in range(s)], variables, x)[None]

    placed = jax.device_put([_plain(sub.variables) for sub in subnets], repl)
    var_spec, var_sharding = P(), repl
  else:
    def local_logits(variables, x):
      return _local_logits(ens.model, variables, x)

    var_spec = P(axis_name)
    var_sharding = jax.sharding.NamedSharding(mesh, var_spec)
    placed = jax.device_put(ens.variables, var_sharding)
  valid, assign = np.asarray(ens.valid), np.asarray(ens.assign)
  temps = np.asarray(ens.temperatures, np.float64)

  def local(variables, x):
    logits = jax.lax.all_gather(local_logits(variables, x), axis_name, tiled=True)   # (S, n, M + 1)
    return _combine_padded(logits, valid, assign, temps.astype(np.float32))

  if combine_on_host:
    out_sharding = jax.sharding.NamedSharding(mesh, P(axis_name))
    f = shard_map(local_logits, mesh=mesh, in_specs=(var_spec, P()), out_specs=P(axis_name), check_vma=False)
  else:
    out_sharding = repl
    f = shard_map(local, mesh=mesh, in_specs=(var_spec, P()), out_specs=P(), check_vma=False)
  fn = jax.jit(f, in_shardings=(var_sharding, repl), out_shardings=out_sharding)
  return ShardedPredictor(fn, placed, combine_on_host, valid, assign, temps)


@functools.lru_cache(maxsize=32)
def _sharded_fn(model, mesh, axis_name):
  def local(variables, valid, assign, temps, x):
    logits = _local_logits(model, variables, x)
    return _normalise_log_scores(_class_log_scores(logits, valid, assign, temps), axis_name)

  spec = P(axis_name)
  f = shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec, P()), out_specs=P(), check_vma=False)
  return jax.jit(f)


# ----------------------------------------------------------------------------------------------------
# Cost accounting
# ----------------------------------------------------------------------------------------------------

def count_params(variables: dict) -> int:
  """Number of trainable parameters (the ``params`` collection)."""
  return int(sum(np.size(a) for a in jax.tree_util.tree_leaves(variables["params"])))


def count_flops(model: nn.Module, variables: dict, input_shape: Sequence[int]) -> int:
  """Floating-point operations of one example: ``2 x`` the multiply-adds of every conv and dense layer.

  A conv layer costs ``2 * prod(output spatial) * kernel.size``, a dense layer ``2 * kernel.size``
  (shapes from ``capture_intermediates`` on one example). Biases, batch norm, ReLU and pooling are
  left out (they are a few percent at most for these models).
  """
  x = jnp.zeros((1, *tuple(input_shape)), jnp.float32)
  inter = _captured_fn(model)(variables, x)
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
    keys = tuple(getattr(k, "key", k) for k in path)
    if keys[-1] != "kernel":
      continue
    node = inter
    for k in keys[:-1]:
      node = node[k]
    out = node["__call__"][0]
    spatial = int(np.prod(out.shape[1:-1])) if leaf.ndim > 2 else 1
    total += 2 * spatial * int(np.size(leaf))
  return total
