"""A deployable byte format for a trained QuickNet: packed binary kernels, int8 float convolutions, a
4-bit VS-Quant head.

Bannink et al., "Larq Compute Engine", MLSys 2021, Sec. 3-5: LCE's converter stores each binary kernel as
bits with the following BatchNorm folded into a per-channel output transform, and keeps the remaining
("full-precision") layers in float32 or, with post-training quantization, in 8 bits. In a QuickNet those
remaining layers (stem, transition 1x1 convolutions, the 513k-parameter head) are 5% of the parameters
but, in float32, 64% of the packed model's bytes. Here they are stored the way a deployment would, but
smaller:

- binary blocks: the packed kernel (1 bit per weight, :func:`pack_conv2d`'s words) and the fused
  ``ReLU -> BatchNorm`` transform ``clip(dot, 0, .) mul + add`` (float32 per channel);
- transition convolutions: symmetric int8 codes with one float32 scale per output channel (the stem's
  three small convolutions stay float32 by default);
- every other BatchNorm: folded to ``x mul + add`` (two float32 per channel instead of four);
- the head: VS-Quant (Dai et al., MLSys 2021, Sec. 3) 4-bit codes (two per byte) with 8-bit per-vector
  scales (``head_vector`` inputs per vector) and one float32 scale per class, plus a float32 bias.

The fixed blur kernels of the transitions are part of the architecture (``[1,2,1] x [1,2,1] / 16``) and
are not stored. :func:`serialize` writes one self-describing blob (magic, JSON header with the model's
hyperparameters and each array's dtype/shape/offset, then the raw little-endian arrays);
:func:`load_quicknet` rebuilds the inference function from the blob alone, and
:func:`serialized_nbytes` reports its exact size by part.

Example:
  >>> import jax, jax.numpy as jnp
  >>> m = QuickNet(section_blocks=(1, 1), section_filters=(32, 64), num_classes=3, stem_strides=(1, 1))
  >>> v = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 1)))
  >>> blob = serialize(compress_quicknet(m, v, (8, 8, 1)))
  >>> infer, _ = load_quicknet(blob)
  >>> infer(jnp.ones((2, 8, 8, 1))).shape, serialized_nbytes(blob)["total"] == len(blob)
  ((2, 3), True)
"""

from __future__ import annotations

import json
import struct as _struct
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax._checks import check_choice, check_int
from mlsys_jax.quant.binary import quicknet as qn
from mlsys_jax.quant.binary.packed import (PackedConv2D, _pack_quicknet_block, _packed_block_call,
                                           _quicknet_modules, _sub, _Transform, fold_batchnorm)
from mlsys_jax.quant.binary.quicknet import QuickNet, QuickNetBlock
from mlsys_jax.quant.vsquant import VSQuantizedTensor, vs_dequantize, vs_quantize

__all__ = ["compress_quicknet", "deserialize", "load_quicknet", "serialize", "serialized_nbytes"]

MAGIC = b"MLSJQN01"
_HYPER = ("section_blocks", "section_filters", "num_classes", "clip", "shortcut", "stem_strides",
          "stem_momentum")


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
  """Signed 4-bit codes in [-7, 7] -> uint8, two per byte (element 2i in the low nibble), offset 8."""
  u = (codes.astype(np.int16).ravel() + 8).astype(np.uint8)
  if u.size % 2:
    u = np.concatenate([u, np.zeros(1, np.uint8)])
  return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(b: np.ndarray, shape) -> np.ndarray:
  n = int(np.prod(shape))
  u = np.stack([b & 0xF, b >> 4], axis=-1).ravel()[:n]
  return (u.astype(np.int16) - 8).astype(np.int8).reshape(shape)


def compress_quicknet(model: QuickNet, variables: dict, input_shape: tuple[int, int, int],
                      head_bits: int = 4, head_vector: int = 16, transition_bits: int = 8,
                      stem_bits: int = 32) -> dict:
  """Trained :class:`QuickNet` variables -> ``{'meta': ..., 'arrays': {name: np.ndarray}}`` (see module doc).

  Args:
    model: a binary QuickNet (any variant).
    variables: ``{'params', 'batch_stats'}`` after training.
    input_shape: ``(H, W, C)`` of the images (stored; the binary convolutions pad with +1, so the packed
      layers do not depend on it).
    head_bits: bits of the head's VS-Quant codes (4: two per byte; 8: one per byte); 32: float32 kernel.
    head_vector: inputs per VS-Quant vector of the head (one 8-bit scale each).
    transition_bits: 8 (int8 codes, one float32 scale per output channel) or 32 (float32) for the
      transitions' 1x1 convolutions (172k parameters in QuickNet).
    stem_bits: the same for the three stem convolutions (1.6k parameters in QuickNet; float32 by default:
      the stem feeds the first binarization, where a rounding error flips signs).

  Returns:
    A dict for :func:`serialize`.
  """
  if not isinstance(model, QuickNet) or not model.binary:
    raise ValueError("compress_quicknet needs a binary QuickNet (binary=True).")
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C), got {input_shape}.")
  check_choice("head_bits", head_bits, (4, 8, 32))
  check_choice("transition_bits", transition_bits, (8, 32))
  check_choice("stem_bits", stem_bits, (8, 32))
  check_int("head_vector", head_vector, 2)
  params, stats = variables["params"], variables.get("batch_stats", {})
  arrays: dict[str, np.ndarray] = {}
  layers = []                   # (kind, path, extra) in call order
  modules = _quicknet_modules(model, variables, input_shape)
  for path, (mod, shape) in modules.items():
    name = "/".join(path)
    if len(path) > 1 and path[0].startswith("QuickNetBlock"):
      continue                  # inside a binary block: packed with it
    if isinstance(mod, QuickNetBlock):
      layer, mul, add = _pack_quicknet_block(params, stats, modules, path)
      arrays[name + "/words"] = np.asarray(layer.words)
      arrays[name + "/mul"], arrays[name + "/add"] = mul, add
      layers.append(("block", name, int(shape[-1])))
    elif isinstance(mod, nn.BatchNorm):
      p = _sub(params, path) if path[0] in params else {}
      s = _sub(stats, path)
      mul, add = fold_batchnorm(p.get("scale"), p.get("bias"), s["mean"], s["var"], mod.epsilon)
      arrays[name + "/mul"], arrays[name + "/add"] = mul, add
      layers.append(("bn", name, 0))
    elif isinstance(mod, nn.Dense):
      k = np.asarray(_sub(params, path)["kernel"], np.float32)
      arrays[name + "/bias"] = np.asarray(_sub(params, path)["bias"], np.float32)
      layers.append(("head", name, list(k.shape)))
      if head_bits == 32:
        arrays[name + "/kernel"] = k
        continue
      qt = vs_quantize(jnp.asarray(k), head_bits, axis=0, vector_size=head_vector, scale_bits=8)
      codes = np.asarray(qt.codes)
      arrays[name + "/codes"] = _pack_nibbles(codes) if head_bits == 4 else codes.astype(np.int8)
      arrays[name + "/vector_scale"] = np.asarray(qt.vector_scale, np.uint8)
      arrays[name + "/coarse_scale"] = np.asarray(qt.coarse_scale, np.float32).ravel()
    elif isinstance(mod, nn.Conv):
      k = np.asarray(_sub(params, path)["kernel"], np.float32)
      if (stem_bits if path[-1].startswith("Stem") else transition_bits) == 32:
        arrays[name + "/kernel"] = k
      else:
        amax = np.max(np.abs(k), axis=(0, 1, 2))
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        arrays[name + "/codes"] = np.clip(np.round(k / scale), -127, 127).astype(np.int8)
        arrays[name + "/scale"] = scale
      layers.append(("conv", name, list(k.shape)))
  meta = {"format": MAGIC.decode(), "class": type(model).__name__, "input_shape": list(input_shape),
          "hyper": {h: getattr(model, h) for h in _HYPER}, "head_bits": head_bits, "head_vector": head_vector,
          "stem_bits": stem_bits, "transition_bits": transition_bits, "layers": layers}
  meta["hyper"] = json.loads(json.dumps(meta["hyper"]))       # tuples -> lists
  return {"meta": meta, "arrays": arrays}


def serialize(compressed: dict) -> bytes:
  """``MAGIC | uint32 header length | JSON header | arrays`` (each array 8-byte aligned, little-endian)."""
  entries, chunks, offset = [], [], 0
  for name, a in compressed["arrays"].items():
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
      a = a.astype(a.dtype.newbyteorder("<"))
    pad = -offset % 8
    chunks.append(b"\0" * pad)
    offset += pad
    entries.append([name, a.dtype.str, list(a.shape), offset])
    chunks.append(a.tobytes())
    offset += a.nbytes
  header = json.dumps({"meta": compressed["meta"], "arrays": entries}, separators=(",", ":")).encode()
  return MAGIC + _struct.pack("<I", len(header)) + header + b"".join(chunks)


def deserialize(blob: bytes) -> dict:
  """Inverse of :func:`serialize`."""
  if not isinstance(blob, (bytes, bytearray, memoryview)) or bytes(blob[:8]) != MAGIC:
    raise ValueError("not a serialized QuickNet (bad magic); pass the bytes that serialize() returned.")
  (n,) = _struct.unpack("<I", bytes(blob[8:12]))
  header = json.loads(bytes(blob[12:12 + n]))
  base = 12 + n
  arrays = {}
  for name, dtype, shape, off in header["arrays"]:
    dt = np.dtype(dtype)
    count = int(np.prod(shape)) if shape else 1
    arrays[name] = np.frombuffer(blob, dt, count, base + off).reshape(shape).copy()
  return {"meta": header["meta"], "arrays": arrays}


def serialized_nbytes(blob: bytes) -> dict:
  """Exact byte counts of a serialized QuickNet, by part; ``total`` is ``len(blob)``."""
  c = deserialize(blob)
  parts = {"binary_kernels": 0, "binary_transforms": 0, "float_convs": 0, "batchnorm": 0, "head": 0}
  kinds = {name: kind for kind, name, _ in c["meta"]["layers"]}
  for name, a in c["arrays"].items():
    layer, field = name.rsplit("/", 1)
    kind = kinds[layer]
    key = {"block": "binary_kernels" if field == "words" else "binary_transforms", "conv": "float_convs",
           "bn": "batchnorm", "head": "head"}[kind]
    parts[key] += a.nbytes
  parts["header_and_alignment"] = len(blob) - sum(parts.values())
  parts["total"] = len(blob)
  return parts


def load_quicknet(blob: bytes) -> tuple[Callable, QuickNet]:
  """A serialized QuickNet -> ``(infer(x) -> logits, model)``, from the bytes alone.

  Binary blocks run packed (:func:`packed_conv2d`, bit-exact accumulators, fused transform), the stem and
  transition convolutions and the head run in float32 on their dequantized weights, BatchNorms as
  ``x mul + add``.
  """
  c = deserialize(blob)
  meta, arr = c["meta"], c["arrays"]
  hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["hyper"].items()}
  model = getattr(qn, meta["class"])(binary=True, **hyper)
  params, blocks, bns = {}, {}, {}
  for kind, name, extra in meta["layers"]:
    path = tuple(name.split("/"))
    if kind == "block":
      cin = extra
      t = _Transform(mul=jnp.asarray(arr[name + "/mul"]), bias=jnp.asarray(arr[name + "/add"]), lo=0, hi=None)
      blocks[path] = PackedConv2D(jnp.asarray(arr[name + "/words"]), None, t, (3, 3), cin, (1, 1),
                                  ((1, 1), (1, 1)))
    elif kind == "bn":
      bns[path] = (jnp.asarray(arr[name + "/mul"]), jnp.asarray(arr[name + "/add"]))
    elif kind == "conv":
      if name + "/kernel" in arr:
        k = arr[name + "/kernel"]
      else:
        k = arr[name + "/codes"].astype(np.float32) * arr[name + "/scale"]
      params[path[-1]] = {"kernel": jnp.asarray(k)}
    elif kind == "head":
      kin, nout = extra
      v = meta["head_vector"]
      if meta["head_bits"] == 32:
        params[path[-1]] = {"kernel": jnp.asarray(arr[name + "/kernel"]), "bias": jnp.asarray(arr[name + "/bias"])}
        continue
      codes = (_unpack_nibbles(arr[name + "/codes"], (kin, nout)) if meta["head_bits"] == 4
               else arr[name + "/codes"])
      qt = VSQuantizedTensor(jnp.asarray(codes), jnp.asarray(arr[name + "/vector_scale"]),
                             jnp.asarray(arr[name + "/coarse_scale"]).reshape(1, 1, nout), meta["head_bits"], 8, v,
                             0)
      params[path[-1]] = {"kernel": vs_dequantize(qt), "bias": jnp.asarray(arr[name + "/bias"])}

  def intercept(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == "__call__" and isinstance(mod, QuickNetBlock):
      return _packed_block_call(mod, args[0], blocks[mod.path])
    if context.method_name == "__call__" and isinstance(mod, nn.BatchNorm):
      mul, add = bns[mod.path]
      return args[0] * mul + add
    return next_fun(*args, **kwargs)

  @jax.jit
  def infer(x):
    with nn.intercept_methods(intercept):
      return model.apply({"params": params}, x, train=False)

  return infer, model
