"""Data-parallel training across processes (``jax.distributed``) with the library's collective transforms.

The comm transforms (:func:`mlsys_jax.comm.sidco`, ``topk``, ``dgc``, ``powersgd``, ``accordion``) and
ByzShield's vote and robust aggregation (:mod:`mlsys_jax.robust`; Konstantinidis and Ramamoorthy, MLSys
2021) are written against a mapped axis name. Inside ``shard_map`` over a mesh that spans the devices of
*every* process, the same collectives (all-gather of SIDCo's static payloads, ``pmean`` of PowerSGD's P
and Q, the all-gather of ByzShield's worker gradients) cross process boundaries: on GPUs through NCCL,
on CPUs through gloo. This module holds the few pieces that turn a single-process program into that:

- :func:`initialize` / :func:`define_flags` + :func:`initialize_from_flags`: ``jax.distributed`` from the
  usual ``--coordinator_address --num_processes --process_id`` arguments, with a bounded wait: a process
  whose peers never join raises ``TimeoutError`` naming the cluster after ``initialization_timeout``
  seconds instead of hanging (or aborting inside XLA).
- :func:`global_mesh`, :func:`shard_batch` (each process's part of the global batch -> one global array),
  :func:`local_batch_slice` (which rows of the global batch this process loads), :func:`byzshield_batch`
  (the redundant worker/file layout of ByzShield; a global batch that differs between processes raises
  ``ValueError`` on every process).
- :func:`check_same_across_processes`: every process must hold the same parameter tree (paths, shapes,
  dtypes and, optionally, values) and the same number of local devices; a mismatch raises ``ValueError``
  naming the leaf or the device counts, on every process (nobody is left waiting in a collective).
- :func:`data_parallel_init` and :func:`data_parallel_step`: parameters replicated on every device, one
  optimizer state per device (error-feedback residuals are per worker), the gradient reduced by the
  optimizer's own collective transforms (``reduce='tx'``), by a dense ``pmean`` (``'mean'``), or by
  ByzShield's vote + aggregator (:func:`byzshield_reduce`). The first call checks that the optimizer's
  collectives use the mesh axis (a mismatched ``axis_name`` or a compression transform built with
  ``axis_name=None`` raises ``ValueError`` naming it); every step reports whether the parameter replicas
  are bitwise identical on all devices (``metrics['replicas_agree']``: a 64-bit non-linear hash of their
  bit patterns compared with ``pmax``/``pmin``; a false "agree" has probability about ``2**-64``), so a
  divergence is never silent.
- :func:`shard_map`: :mod:`mlsys_jax._compat`'s ``shard_map`` with one ``check`` keyword (``check_vma``
  on new jax, ``check_rep`` on old).

Example (one process; the same code runs on every process of a cluster after :func:`initialize`):

>>> import optax, jax.numpy as jnp
>>> from mlsys_jax.comm import sidco
>>> mesh = global_mesh()
>>> n = mesh.devices.size
>>> params = {"w": jnp.zeros((4, 2))}
>>> loss = lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2)
>>> tx = optax.chain(sidco(0.25, axis_name="d"), optax.sgd(0.1))
>>> state = data_parallel_init(params, tx, mesh)
>>> step = data_parallel_step(loss, tx, mesh)
>>> batch = shard_batch(mesh, (jnp.ones((2 * n, 4)), jnp.ones((2 * n, 2))))
>>> state, metrics = step(state, batch)
>>> bool(metrics["replicas_agree"]), int(state.step)
(True, 1)

Limits: every process must run the same program on the same number of local devices; the batch is
split evenly over all devices; a process that dies *after* joining is detected by ``jax.distributed``'s
heartbeat (``heartbeat_timeout``), which terminates the others (XLA's behaviour, not an exception).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
import threading
import zlib
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlsys_jax import _compat
from mlsys_jax._checks import check_choice, check_int, check_range

__all__ = [
    "ByzShieldReduce",
    "DataParallelState",
    "ProcessInfo",
    "byzshield_batch",
    "byzshield_reduce",
    "check_same_across_processes",
    "collective_axes",
    "data_parallel_init",
    "data_parallel_step",
    "define_flags",
    "global_mesh",
    "initialize",
    "initialize_from_flags",
    "local_batch_slice",
    "shard_batch",
    "shard_map",
]


# ----------------------------------------------------------------------------------------------------
# Version shim.

def _check_keyword(fn: Callable) -> str:
  """Name of ``fn``'s replication-check keyword: ``check_vma`` (``jax.shard_map``, jax >= 0.6: 0.10 and
  0.11 here) or ``check_rep`` (``jax.experimental.shard_map``, older jax)."""
  return "check_vma" if "check_vma" in inspect.signature(fn).parameters else "check_rep"


_CHECK_KW = _check_keyword(_compat.shard_map)   # the library's one shard_map (mlsys_jax._compat)


def shard_map(f: Callable, *, mesh: Mesh, in_specs: Any, out_specs: Any, check: bool = False) -> Callable:
  """``mlsys_jax._compat.shard_map`` with a version-independent ``check`` keyword:
  ``jax.shard_map(..., check_vma=check)`` where it exists (jax >= 0.6; 0.10 and 0.11 here), else
  ``jax.experimental.shard_map.shard_map(..., check_rep=check)``.

  ``check=False`` (default) is what data-parallel code over replicated parameters needs: a gradient
  taken inside the map is the device's *local* gradient (with ``check_vma=True`` jax would insert an
  implicit ``psum`` for parameters that enter unvarying), and the reduction is the optimizer's.
  """
  return _compat.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **{_CHECK_KW: check})


# ----------------------------------------------------------------------------------------------------
# Joining the cluster.

class ProcessInfo(NamedTuple):
  """Where this process stands after :func:`initialize`."""
  process_index: int
  process_count: int
  local_device_count: int
  device_count: int
  coordinator_address: str | None


_ADDRESS = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>[0-9]+)$")


def _check_address(address: str) -> None:
  if not isinstance(address, str):
    raise TypeError(f"coordinator_address must be a string 'host:port', got {type(address).__name__}.")
  m = _ADDRESS.match(address)
  if m is None or not 1 <= int(m.group("port")) <= 65535:
    raise ValueError(f"coordinator_address must look like 'host:port' (e.g. '127.0.0.1:12345' or "
                     f"'node0.cluster:8476') with a port in 1..65535, got {address!r}.")


def _distributed_initialized() -> bool:
  fn = getattr(jax.distributed, "is_initialized", None)
  if fn is not None:
    return bool(fn())
  try:  # pragma: no cover - older jax
    from jax._src import distributed as _d
    return _d.global_state.client is not None
  except Exception:  # pragma: no cover
    return False


def _info(address: str | None) -> ProcessInfo:
  return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count(), address)


def initialize(coordinator_address: str | None = None, num_processes: int = 1, process_id: int = 0, *,
               initialization_timeout: float = 300.0, heartbeat_timeout: int | None = None,
               local_device_ids: Sequence[int] | None = None,
               cpu_collectives: str | None = "gloo") -> ProcessInfo:
  """Join a ``jax.distributed`` cluster (jax's conventions), with a bounded wait.

  Process ``process_id`` of ``num_processes`` connects to the coordinator at ``coordinator_address``
  (process 0 runs it, on that address's port). With ``num_processes == 1`` and no address nothing is
  started (a single-process run of the same program). Call it before any other jax computation.

  Args:
    coordinator_address: ``'host:port'`` of process 0, the same string on every process.
    num_processes: number of processes in the cluster (>= 1).
    process_id: this process's index in ``[0, num_processes)``.
    initialization_timeout: seconds to wait for all processes to join. After that a ``TimeoutError``
      names the cluster and the likely causes (a process not started, started with other
      ``--num_processes``/``--coordinator_address``, or crashed). The process cannot join a cluster
      afterwards: let the error end it.
    heartbeat_timeout: seconds without a heartbeat after which ``jax.distributed`` declares a joined
      process dead and terminates the others (jax's default, 100 s, when None).
    local_device_ids: restrict this process to these local devices (e.g. one GPU per process).
    cpu_collectives: cross-process collective implementation for CPU devices (``'gloo'`` or ``'mpi'``);
      None leaves jax's setting. Ignored by GPU devices (NCCL).

  Returns:
    A :class:`ProcessInfo`.

  Raises:
    ValueError/TypeError: bad arguments. TimeoutError: the cluster did not form in time.

  Example:
    >>> initialize().process_count   # single process: nothing to join
    1
  """
  check_int("num_processes", num_processes, 1)
  check_int("process_id", process_id, 0)
  check_range("initialization_timeout", initialization_timeout, 0.0, low_inclusive=False)
  if process_id >= num_processes:
    raise ValueError(f"process_id must lie in [0, num_processes) = [0, {num_processes}), got {process_id}; "
                     f"number the processes 0..{num_processes - 1}.")
  if heartbeat_timeout is not None:
    check_int("heartbeat_timeout", heartbeat_timeout, 1)
  if coordinator_address is None:
    if num_processes > 1:
      raise ValueError(f"num_processes={num_processes} needs coordinator_address='host:port' of process 0 "
                       "(the same on every process), e.g. --coordinator_address=127.0.0.1:12345.")
    return _info(None)
  _check_address(coordinator_address)
  if _distributed_initialized():
    if jax.process_count() != num_processes or jax.process_index() != process_id:
      raise ValueError(f"jax.distributed is already initialized as process {jax.process_index()} of "
                       f"{jax.process_count()}, not {process_id} of {num_processes}.")
    return _info(coordinator_address)
  if cpu_collectives is not None:
    check_choice("cpu_collectives", cpu_collectives, ("gloo", "mpi"))
    if "jax_cpu_collectives_implementation" in getattr(jax.config, "values", {}):
      jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  kwargs: dict[str, Any] = {}
  sig = inspect.signature(jax.distributed.initialize).parameters
  if heartbeat_timeout is not None and "heartbeat_timeout_seconds" in sig:
    kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout)
  if local_device_ids is not None:
    kwargs["local_device_ids"] = list(local_device_ids)
  # jax's own deadline aborts the whole process from C++ (no Python exception); it is set far beyond
  # ours, and the join runs in a helper thread so that this thread can raise a clear error in time.
  kwargs["initialization_timeout"] = int(initialization_timeout) + 3600
  done = threading.Event()
  failure: list[BaseException] = []

  def join():
    try:
      jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    except BaseException as e:  # re-raised in the caller's thread
      failure.append(e)
    finally:
      done.set()

  threading.Thread(target=join, name="jax.distributed.initialize", daemon=True).start()
  if not done.wait(initialization_timeout):
    raise TimeoutError(
        f"process {process_id} of {num_processes} could not join the jax.distributed cluster at "
        f"{coordinator_address} within initialization_timeout={initialization_timeout:g} s: not all "
        f"{num_processes} processes registered with the coordinator (process 0). Start every process "
        f"0..{num_processes - 1} with the same --coordinator_address and --num_processes, check that the "
        f"address is reachable from this host and that no process crashed, or raise the timeout.")
  if failure:
    raise failure[0]
  return _info(coordinator_address)


def define_flags(flag_values=None) -> None:
  """Define absl flags ``--coordinator_address --num_processes --process_id`` (jax.distributed's names),
  ``--initialization_timeout`` and ``--heartbeat_timeout`` on ``flag_values`` (default
  ``absl.flags.FLAGS``); read them back with :func:`initialize_from_flags`."""
  from absl import flags
  fv = flags.FLAGS if flag_values is None else flag_values
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (jax.distributed); unset for "
                      "a single process.", flag_values=fv)
  flags.DEFINE_integer("num_processes", 1, "Number of processes in the cluster.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("process_id", 0, "Index of this process, 0..num_processes-1.", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_float("initialization_timeout", 300.0, "Seconds to wait for every process to join before "
                     "failing with a clear error.", flag_values=fv)
  flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds without a heartbeat after which a joined process "
                       "counts as dead and jax.distributed terminates the others.", lower_bound=1,
                       flag_values=fv)


_FLAG_NAMES = ("coordinator_address", "num_processes", "process_id", "initialization_timeout",
               "heartbeat_timeout")


def initialize_from_flags(flag_values=None, **kwargs) -> ProcessInfo:
  """:func:`initialize` with the values of the flags of :func:`define_flags`.

  The usual ``jax.distributed`` launch arguments (``--coordinator_address --num_processes --process_id``)
  plus this library's bounded wait (``--initialization_timeout``, ``--heartbeat_timeout``), read from
  ``flag_values`` after absl has parsed the command line, and passed to :func:`initialize` (which
  checks them: a ``process_id`` outside ``[0, num_processes)``, a malformed address or a non-positive
  timeout raise there).

  Args:
    flag_values: an ``absl.flags.FlagValues`` on which :func:`define_flags` was called and that has
      been parsed (default ``absl.flags.FLAGS``, parsed by ``absl.app.run``).
    **kwargs: the other keyword arguments of :func:`initialize` (``local_device_ids``,
      ``cpu_collectives``); not the five flag-backed ones.

  Returns:
    The :class:`ProcessInfo` of :func:`initialize`.

  Raises:
    ValueError: a flag is not defined on ``flag_values`` (call :func:`define_flags` first), the flags
      are not parsed yet, or ``kwargs`` repeats a flag-backed argument. TypeError: ``flag_values`` is not
      an absl ``FlagValues``.

  Example:
    >>> from absl import flags
    >>> fv = flags.FlagValues()
    >>> define_flags(fv)
    >>> _ = fv(["prog"])            # parse an empty command line: a single process
    >>> initialize_from_flags(fv).process_count
    1
  """
  from absl import flags
  fv = flags.FLAGS if flag_values is None else flag_values
  if not isinstance(fv, flags.FlagValues):
    raise TypeError(f"flag_values must be an absl.flags.FlagValues (or None for absl.flags.FLAGS), got "
                    f"{type(fv).__name__}.")
  missing = [n for n in _FLAG_NAMES if n not in fv]
  if missing:
    raise ValueError(f"flags {missing} are not defined on flag_values; call "
                     "mlsys_jax.comm.distributed.define_flags(flag_values) before parsing the command line.")
  if not fv.is_parsed():
    raise ValueError("flag_values has not been parsed yet; call initialize_from_flags inside main() of "
                     "absl.app.run (or parse first: flag_values(sys.argv)).")
  dup = sorted(set(kwargs) & set(_FLAG_NAMES))
  if dup:
    raise ValueError(f"{dup} come from the flags; set them on the command line (--{dup[0]}=...) instead of "
                     "passing them to initialize_from_flags, or call initialize() directly.")
  return initialize(fv.coordinator_address, fv.num_processes, fv.process_id,
                    initialization_timeout=fv.initialization_timeout,
                    heartbeat_timeout=fv.heartbeat_timeout, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Mesh and data.

def _sorted_devices() -> list:
  return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def global_mesh(axis_name: str = "d", devices: Sequence[Any] | None = None) -> Mesh:
  """A 1-D mesh over the devices of all processes (process 0's first, then process 1's, ...), named
  ``axis_name``. Device ``k`` of the mesh is data-parallel worker ``k``.

  >>> global_mesh().axis_names
  ('d',)
  """
  if not isinstance(axis_name, str) or not axis_name:
    raise TypeError(f"axis_name must be a non-empty string, got {axis_name!r}.")
  devs = _sorted_devices() if devices is None else list(devices)
  if not devs:
    raise ValueError("global_mesh needs at least one device.")
  return Mesh(np.array(devs, dtype=object), (axis_name,))


def _mesh_axis(mesh: Mesh, axis_name: str) -> int:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (see global_mesh), got {type(mesh).__name__}.")
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh, whose axes are "
                     f"{tuple(mesh.axis_names)}; pass one of them (global_mesh(axis_name=...) names it).")
  if len(mesh.axis_names) != 1:
    raise ValueError(f"data-parallel steps here use a 1-D mesh, got axes {tuple(mesh.axis_names)}; build "
                     "it with global_mesh().")
  return int(mesh.shape[axis_name])


def _local_mesh_devices(mesh: Mesh) -> int:
  pid = jax.process_index()
  return sum(1 for d in mesh.devices.flat if d.process_index == pid)


def local_batch_slice(global_batch_size: int, mesh: Mesh | None = None) -> slice:
  """Rows of a global batch this process loads, for :func:`shard_batch`: the contiguous block that the
  mesh places on this process's devices (process ``p`` of ``P`` with equal device counts: rows
  ``[p B / P, (p + 1) B / P)``).

  >>> local_batch_slice(16)   # one process holds everything
  slice(0, 16, None)
  """
  check_int("global_batch_size", global_batch_size, 1)
  mesh = global_mesh() if mesh is None else mesh
  devs = list(mesh.devices.flat)
  n = len(devs)
  if global_batch_size % n:
    raise ValueError(f"global_batch_size={global_batch_size} must be a multiple of the {n} devices of the "
                     "mesh (every device gets the same number of examples).")
  per = global_batch_size // n
  pid = jax.process_index()
  pos = [i for i, d in enumerate(devs) if d.process_index == pid]
  if not pos or pos != list(range(pos[0], pos[0] + len(pos))):
    raise ValueError("this process's devices are not one contiguous block of the mesh; build it with "
                     "global_mesh(), which orders devices by process.")
  return slice(pos[0] * per, (pos[-1] + 1) * per)


def shard_batch(mesh: Mesh, local_batch: Any, axis_name: str | None = None) -> Any:
  """One global array per leaf of ``local_batch`` (this process's rows), split along its leading axis
  over the mesh: ``jax.make_array_from_process_local_data`` with ``P(axis_name)``. The global batch is
  the processes' rows in process order (:func:`local_batch_slice` says which rows to load).

  Every leaf's leading size must be a multiple of this process's number of mesh devices.
  """
  axis_name = mesh.axis_names[0] if axis_name is None else axis_name
  _mesh_axis(mesh, axis_name)
  n_local = _local_mesh_devices(mesh)
  sharding = NamedSharding(mesh, P(axis_name))

  def one(path, x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] == 0 or x.shape[0] % n_local:
      raise ValueError(f"batch{jax.tree_util.keystr(path)} of shape {x.shape}: the leading (batch) size must "
                       f"be a positive multiple of this process's {n_local} devices.")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map_with_path(one, local_batch)


def _replicate(mesh: Mesh, tree: Any) -> Any:
  sharding = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                                tree)


# ----------------------------------------------------------------------------------------------------
# Cross-process agreement.

def _process_mesh() -> Mesh:
  """One device per process (its first), so that uneven local device counts can still be compared."""
  first: dict[int, Any] = {}
  for d in _sorted_devices():
    first.setdefault(d.process_index, d)
  return Mesh(np.array([first[p] for p in range(jax.process_count())], dtype=object), ("processes",))


@functools.lru_cache(maxsize=None)
def _replicating_identity(mesh: Mesh) -> Callable:
  """One jitted identity per process mesh (a fresh ``jax.jit(lambda ...)`` per call re-traced and
  re-compiled every time: about 30 ms per all-gather on 2 processes x 4 CPU devices)."""
  return jax.jit(_identity, out_shardings=NamedSharding(mesh, P()))


def _identity(a: jax.Array) -> jax.Array:
  return a


def _allgather_processes(x: np.ndarray) -> np.ndarray:
  """Stack a same-shape numpy array from every process: ``(process_count, *x.shape)`` on each."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  mesh = _process_mesh()
  arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P("processes")), x[None])
  out = _replicating_identity(mesh)(arr)
  return np.asarray(out.addressable_data(0))


def _allgather_text(text: str) -> list[str]:
  raw = np.frombuffer(text.encode(), np.uint8)
  lengths = _allgather_processes(np.array([raw.size], np.int64))[:, 0]
  buf = np.zeros((-(-int(lengths.max()) // 256) * 256,), np.uint8)   # few distinct shapes: few compilations
  buf[:raw.size] = raw
  rows = _allgather_processes(buf)
  return [bytes(rows[i, :int(n)]).decode() for i, n in enumerate(lengths)]


def _describe(tree: Any) -> dict:
  leaves = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaves.append([jax.tree_util.keystr(path), list(np.shape(leaf)), str(jnp.result_type(leaf))])
  return {"local_devices": jax.local_device_count(),
          "platform": jax.local_devices()[0].platform,
          "treedef": str(jax.tree_util.tree_structure(tree)),
          "leaves": leaves}


def _leaf_digest(leaf: Any) -> int:
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    leaf = leaf.addressable_data(0)
  return zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes())


def _first_difference(name: str, ref: dict, other: dict, p: int) -> str | None:
  if ref["local_devices"] != other["local_devices"] or ref["platform"] != other["platform"]:
    return (f"process {p} has {other['local_devices']} local {other['platform']} device(s) but process 0 has "
            f"{ref['local_devices']} {ref['platform']} device(s): start every process with the same number "
            "of devices (e.g. the same --local_devices, CUDA_VISIBLE_DEVICES or local_device_ids).")
  a = {k: (tuple(s), d) for k, s, d in ref["leaves"]}
  b = {k: (tuple(s), d) for k, s, d in other["leaves"]}
  for k, (s, d) in a.items():
    if k not in b:
      return f"{name}{k} (shape {s}, {d}) exists on process 0 but not on process {p}."
    if b[k] != (s, d):
      return (f"{name}{k} has shape {b[k][0]} {b[k][1]} on process {p} but shape {s} {d} on process 0: "
              "build the same model (same flags) on every process.")
  for k, (s, d) in b.items():
    if k not in a:
      return f"{name}{k} (shape {s}, {d}) exists on process {p} but not on process 0."
  if ref["treedef"] != other["treedef"]:
    return (f"{name} has a different tree structure on process {p} than on process 0 "
            f"({other['treedef']} vs {ref['treedef']}).")
  return None


def check_same_across_processes(tree: Any, name: str = "params", *, values: bool = True) -> None:
  """Raise ``ValueError`` on every process unless all processes hold the same ``tree`` and device count.

  Compares, against process 0: the number and platform of local devices, the tree structure, each
  leaf's path, shape and dtype, and (``values=True``) each leaf's bytes (a CRC-32 per leaf; for a
  global array, of its first addressable shard). The message names the first mismatch (leaf path and
  both shapes, or both device counts). Must be called by every process (it is a collective: two
  fixed-size all-gathers over one device per process, so it works even when device counts differ).
  With one process it checks nothing and returns.
  """
  if jax.process_count() == 1:
    return
  mine = _describe(tree)
  texts = _allgather_text(json.dumps(mine, sort_keys=True))
  descs = [json.loads(t) for t in texts]
  for p, other in enumerate(descs[1:], start=1):
    msg = _first_difference(name, descs[0], other, p)
    if msg is not None:
      raise ValueError(f"processes disagree: {msg}")
  if values:
    leaves_kp = jax.tree_util.tree_flatten_with_path(tree)[0]
    digests = np.array([_leaf_digest(leaf) for _, leaf in leaves_kp], np.uint32)
    if digests.size:
      every = _allgather_processes(digests)
      for p in range(1, every.shape[0]):
        bad = np.flatnonzero(every[p] != every[0])
        if bad.size:
          path = jax.tree_util.keystr(leaves_kp[int(bad[0])][0])
          raise ValueError(f"processes disagree: {name}{path} holds different values on process {p} than on "
                           "process 0. Initialize with the same seed on every process, or broadcast process "
                           "0's values (jax.experimental.multihost_utils.broadcast_one_to_all).")


def _check_same_program(fn: Callable, args: tuple, what: str) -> None:
  """Raise ``ValueError`` on every process unless the jitted ``fn`` lowers to the same program on every process.

  Processes whose steps differ (another compression ratio or rank, so other payload shapes; another loss or
  model; other batch shapes) would otherwise enter collectives that never match and wait in them for ever.
  Compares a SHA-256 of the lowered StableHLO text (without source locations) through the fixed-size
  all-gathers of :func:`check_same_across_processes`. With one process it checks nothing.
  """
  if jax.process_count() == 1:
    return
  lowered = fn.lower(*args)
  try:
    text = lowered.as_text(debug_info=False)
  except TypeError:  # pragma: no cover - a jax without the keyword
    text = lowered.as_text()
  every = _allgather_text(hashlib.sha256(text.encode()).hexdigest())
  for p in range(1, len(every)):
    if every[p] != every[0]:
      raise ValueError(f"processes disagree: {what} compiles to a different program on process {p} than on "
                       "process 0, so their collectives would never match (a hang). Start every process with "
                       "the same flags: the same optimizer and its hyperparameters (e.g. the compression ratio "
                       "or rank), the same loss and model, and the same per-process batch shapes.")


# ----------------------------------------------------------------------------------------------------
# Collective analysis.

_NOT_COMMUNICATION = ("pvary", "pcast", "pbroadcast", "axis_index", "axis_size")


def _axes_of(jaxpr, found: dict) -> None:
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if not name.startswith(_NOT_COMMUNICATION):
      for key in ("axes", "axis_name"):
        if key in eqn.params:
          val = eqn.params[key]
          vals = val if isinstance(val, (tuple, list, frozenset, set)) else (val,)
          for a in vals:
            if isinstance(a, str):
              found.setdefault(a, set()).add(name)
    for v in eqn.params.values():
      for sub in _compat.sub_jaxprs(v):
        _axes_of(sub, found)


def collective_axes(fn: Callable, *args) -> dict[str, set[str]]:
  """Named axes that ``fn(*args)`` communicates over, with the collective primitives used on each
  (``psum``, ``all_gather``, ``pmax``...; nested jit/cond/scan/shard_map bodies included). Traces ``fn``
  with ``jax.make_jaxpr`` (abstract arguments such as ``jax.ShapeDtypeStruct`` work)."""
  found: dict[str, set[str]] = {}
  _axes_of(jax.make_jaxpr(fn)(*args).jaxpr, found)
  return found


def _comm_states(state: Any) -> list:
  """Compression states (anything with ``bytes_sent`` and ``total_bytes``) inside an optax state."""
  out = []
  if hasattr(state, "bytes_sent") and hasattr(state, "total_bytes"):
    out.append(state)
  elif isinstance(state, dict):
    for v in state.values():
      out.extend(_comm_states(v))
  elif isinstance(state, (tuple, list)):
    for v in state:
      out.extend(_comm_states(v))
  return out


# ----------------------------------------------------------------------------------------------------
# ByzShield across devices.

class ByzShieldReduce(NamedTuple):
  """How :func:`data_parallel_step` aggregates with ByzShield (see :func:`byzshield_reduce`)."""
  assignment: Any
  aggregator: str
  num_byzantine_files: int
  byzantine: tuple
  attack: str | None
  scale: float
  seed: int


def byzshield_reduce(assignment, aggregator: str = "median", *, num_byzantine_files: int = 0,
                     byzantine: Sequence[int] = (), attack: str | None = None, scale: float = 100.0,
                     seed: int = 0) -> ByzShieldReduce:
  """ByzShield's redundant training as the ``reduce`` of :func:`data_parallel_step` (Konstantinidis and
  Ramamoorthy, MLSys 2021, Sec. 3).

  The ``K`` workers of ``assignment`` (:func:`mlsys_jax.robust.byzshield_assignment`) are spread over the
  mesh devices round-robin (worker ``w`` on device ``w mod D``); each computes the gradients of its ``l``
  files, the devices all-gather every worker's gradients (crossing processes), optionally replace the
  ``byzantine`` workers' by an ``attack`` (:func:`mlsys_jax.robust.apply_attack`; simulation), and every
  device runs the same majority vote per file and robust ``aggregator`` (one of
  :data:`mlsys_jax.robust.AGGREGATORS`, with ``num_byzantine_files``), so the update is identical everywhere.
  The batch comes from :func:`byzshield_batch`.
  """
  from mlsys_jax import robust
  if not isinstance(assignment, robust.Assignment):
    raise TypeError(f"assignment must be a mlsys_jax.robust.Assignment (byzshield_assignment(...)), got "
                    f"{type(assignment).__name__}.")
  check_choice("aggregator", aggregator, robust.AGGREGATORS)
  check_int("num_byzantine_files", num_byzantine_files, 0)
  byz = tuple(int(w) for w in byzantine)
  for w in byz:
    check_int("byzantine worker id", w, 0, assignment.num_workers - 1)
  if attack is not None:
    check_choice("attack", attack, robust.ATTACKS)
    if not byz:
      raise ValueError("attack is set but no worker is byzantine; pass byzantine=(worker ids, ...).")
  elif byz:
    raise ValueError(f"byzantine={byz} needs an attack (one of {robust.ATTACKS}).")
  check_range("scale", scale, 0.0)
  check_int("seed", seed, 0)
  return ByzShieldReduce(assignment, aggregator, num_byzantine_files, byz, attack, float(scale), seed)


def _slots(num_workers: int, num_devices: int) -> tuple[int, np.ndarray]:
  """``(workers per device, row of each worker in the device-major gathered stack)``: worker ``w`` sits
  on device ``w mod D`` in slot ``w // D``."""
  wpd = -(-num_workers // num_devices)
  w = np.arange(num_workers)
  return wpd, (w % num_devices) * wpd + w // num_devices


def _batch_leaf_digest(x: np.ndarray) -> str:
  """SHA-256 (hex) of the bytes of a host array (object arrays: of their ``repr``)."""
  if x.dtype.hasobject:
    return hashlib.sha256(repr(x.tolist()).encode()).hexdigest()
  return hashlib.sha256(np.ascontiguousarray(x).reshape(-1).view(np.uint8)).hexdigest()


def _check_same_batch(global_batch: Any, name: str) -> None:
  """Raise ``ValueError`` on every process unless every process passed the same ``global_batch``.

  Compares the tree structure and each leaf's path, shape, dtype and SHA-256 of its bytes, through the
  fixed-size all-gathers of :func:`check_same_across_processes` (one JSON description per process). The
  message names the first leaf that differs, what differs (shape/dtype or content hash) and which processes
  hold each version. With one process it checks nothing (and hashes nothing).
  """
  if jax.process_count() == 1:
    return
  flat, treedef = jax.tree_util.tree_flatten_with_path(global_batch)
  leaves = []
  for path, leaf in flat:
    x = np.asarray(leaf)
    leaves.append([jax.tree_util.keystr(path), list(x.shape), str(x.dtype), _batch_leaf_digest(x)])
  texts = _allgather_text(json.dumps({"treedef": str(treedef), "leaves": leaves}))
  descs = [json.loads(t) for t in texts]
  fix = (f"{name} must be identical on every process: draw it with the same seed on every process (e.g. "
         "np.random.default_rng([seed, step]), not a seed that depends on the process id, and the same "
         "step count), or broadcast process 0's batch (jax.experimental.multihost_utils.broadcast_one_to_all).")

  def procs(ps: list[int]) -> str:
    return f"process {ps[0]}" if len(ps) == 1 else "processes " + ", ".join(map(str, ps))

  def groups(key: Callable[[dict], Any]) -> list[tuple[Any, list[int]]]:
    out: dict[Any, list[int]] = {}
    for p, d in enumerate(descs):
      out.setdefault(key(d), []).append(p)
    return list(out.items())

  structure = groups(lambda d: (d["treedef"], tuple(l[0] for l in d["leaves"])))
  if len(structure) > 1:
    same_paths = len({paths for (_, paths), _ in structure}) == 1   # e.g. a tuple here, a list there
    parts = "; ".join(f"{procs(ps)}: " + (treedef if same_paths else f"leaves {list(paths) if paths else '(none)'}")
                      for (treedef, paths), ps in structure)
    raise ValueError(f"processes disagree: {name} has a different tree structure on different processes "
                     f"({parts}). {fix}")
  for i, (path, _, _, _) in enumerate(descs[0]["leaves"]):
    kinds = groups(lambda d: (tuple(d["leaves"][i][1]), d["leaves"][i][2]))
    if len(kinds) > 1:
      parts = " but ".join(f"shape {shape} {dtype} on {procs(ps)}" for (shape, dtype), ps in kinds)
      raise ValueError(f"processes disagree: {name}{path} has {parts}. {fix}")
    hashes = groups(lambda d: d["leaves"][i][3])
    if len(hashes) > 1:
      shape, dtype = tuple(descs[0]["leaves"][i][1]), descs[0]["leaves"][i][2]
      parts = " but ".join(f"{h[:16]} on {procs(ps)}" for h, ps in hashes)
      raise ValueError(f"processes disagree: {name}{path} (shape {shape} {dtype}) holds different values on "
                       f"different processes (SHA-256 of its bytes {parts}). {fix}")


def byzshield_batch(mesh: Mesh, spec: ByzShieldReduce, global_batch: Any, axis_name: str | None = None, *,
                    check: bool = True) -> Any:
  """The ByzShield layout of a global batch, as global arrays for :func:`data_parallel_step`.

  ``global_batch`` (identical on every process: e.g. the same seeded sampling) is cut into the ``f``
  files of the assignment (consecutive equal blocks of rows); each leaf becomes ``(D * w, l, rows per
  file, ...)`` split over the devices: device ``d``, slot ``s`` holds worker ``s D + d``'s ``l`` files
  (zeros in padding slots). Each process builds only its own devices' rows.

  With several processes and ``check=True`` (default), every call verifies that all processes passed the
  same ``global_batch``: tree structure, each leaf's shape, dtype and SHA-256 of its bytes, compared through
  the small all-gathers of :func:`check_same_across_processes` (0.4 ms of hashing for 252 x 28 x 28 float32
  images + labels, about 2.5 ms in all on 2 processes x 4 CPU devices, against a 31 ms step). A mismatch
  raises ``ValueError: processes disagree: ...`` on every process, naming the leaf, what differs (shapes and
  dtypes, or the hashes) and the process ids; without it the vote would compare "copies" of files that
  differ, silently. Every process must then call it the same number of times (it is a collective, queued
  behind the previous step on each process's first device). ``check=False`` skips it, for a batch that is
  identical by construction (e.g. broadcast from process 0). With one process nothing is compared.

  Example (one process)::

    >>> from mlsys_jax import robust
    >>> spec = byzshield_reduce(robust.ramanujan_assignment(3, 3))   # 9 workers, 9 files, l = 3
    >>> n = len(jax.devices())
    >>> b = byzshield_batch(global_mesh(), spec, np.arange(18.0).reshape(18, 1))
    >>> b.shape == (n * -(-9 // n), 3, 2, 1)
    True
  """
  if not isinstance(spec, ByzShieldReduce):
    raise TypeError(f"spec must be a ByzShieldReduce (byzshield_reduce(assignment, ...)), got {type(spec).__name__}.")
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (see global_mesh), got {type(mesh).__name__}.")
  axis_name = mesh.axis_names[0] if axis_name is None else axis_name
  n_dev = _mesh_axis(mesh, axis_name)
  if check:   # before the local shape checks below, so that a process with another batch shape raises the
    _check_same_batch(global_batch, "global_batch")   # same error as its peers instead of leaving them waiting
  a = spec.assignment
  wpd, _ = _slots(a.num_workers, n_dev)
  sharding = NamedSharding(mesh, P(axis_name))

  def one(path, x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] == 0 or x.shape[0] % a.num_files:
      raise ValueError(f"batch{jax.tree_util.keystr(path)} of shape {x.shape}: the leading size must be a "
                       f"positive multiple of the {a.num_files} files of {a.name} (at least one row per file).")
    fs = x.shape[0] // a.num_files
    files = x.reshape((a.num_files, fs) + x.shape[1:])
    out = np.zeros((n_dev * wpd, a.load, fs) + x.shape[1:], x.dtype)
    for w in range(a.num_workers):
      out[(w % n_dev) * wpd + w // n_dev] = files[a.worker_files[w]]
    return jax.make_array_from_callback(out.shape, sharding, lambda idx: out[idx])

  return jax.tree_util.tree_map_with_path(one, global_batch)


# ----------------------------------------------------------------------------------------------------
# The training step.

class DataParallelState(NamedTuple):
  """Parameters (replicated on every device), per-device optimizer states (leading axis = mesh devices,
  so each worker keeps its own error-feedback residual) and the step count."""
  params: Any
  opt_state: Any
  step: jax.Array


def data_parallel_init(params: Any, tx: optax.GradientTransformation, mesh: Mesh, *,
                       axis_name: str | None = None, check: bool = True) -> DataParallelState:
  """Replicate ``params`` on every device of ``mesh`` and build one ``tx`` state per device.

  ``params`` must be the same on every process (same seed); with ``check`` (default) this is verified
  with :func:`check_same_across_processes` (structure, shapes, dtypes, values, local device counts).
  """
  axis_name = mesh.axis_names[0] if axis_name is None else axis_name
  _mesh_axis(mesh, axis_name)
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}.")
  if check:
    check_same_across_processes(params, "params", values=True)
  rep = _replicate(mesh, params)

  def init(p):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], tx.init(p))

  opt_state = jax.jit(shard_map(init, mesh=mesh, in_specs=(P(),), out_specs=P(axis_name)))(rep)
  step = jax.make_array_from_process_local_data(NamedSharding(mesh, P()), np.zeros((), np.int32))
  return DataParallelState(rep, opt_state, step)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 in which every input bit flips each output
  bit with probability about 1/2 (wrapping uint32 arithmetic)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


_FINGERPRINT_SEEDS = (0x9E3779B9, 0x7F4A7C15)   # two independent 32-bit hashes: a 64-bit fingerprint


def _leaf_words(x: jax.Array) -> jax.Array:
  """The bit pattern of ``x`` as a flat uint32 vector (8-byte elements give two words each; a complex
  element its real and imaginary parts' words)."""
  if jnp.issubdtype(x.dtype, jnp.complexfloating):   # bitcast_convert_type takes no complex operand
    x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
  if x.dtype == jnp.bool_:
    return x.reshape(-1).astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size in (4, 8):
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  word = {1: jnp.uint8, 2: jnp.uint16}[size]
  return jax.lax.bitcast_convert_type(x, word).reshape(-1).astype(jnp.uint32)


def _fingerprint(tree: Any) -> jax.Array:
  """``(2,)`` int32 fingerprint of the bit patterns of every leaf (NaN-safe: bits, not values).

  Each 32-bit word ``b`` at flat position ``i`` of leaf ``l`` is hashed non-linearly,
  ``fmix32(b ^ fmix32(i * c + fmix32(l * c' + seed)))``, and the hashes are summed with wrap-around, for two
  seeds. (The leaf's offset is mixed with the seed: with ``i * c + l * c' + seed`` two positions of two leaves
  shared a key under both seeds, e.g. word ``i`` of leaf ``l`` and word ``i + 2414777`` of leaf ``l + 97``, so
  swapping their values went unseen.) Equal trees give equal fingerprints; for unequal trees every hash that
  differs is a pseudo-random uint32, so the sums collide with probability about ``2**-64`` whatever the structure of
  the difference (a sign flip, a swap of two elements or of two leaves, one changed exponent bit...).
  A *linear* weighted sum of the bits would cancel such differences modulo ``2**32``.
  """
  leaves = jax.tree_util.tree_leaves(tree)
  out = []
  for seed in _FINGERPRINT_SEEDS:
    total = jnp.zeros((), jnp.uint32)
    for l, leaf in enumerate(leaves):
      words = _leaf_words(jnp.asarray(leaf))
      idx = jnp.arange(words.shape[0], dtype=jnp.uint32)
      offset = _fmix32(jnp.uint32((l * 0x85EBCA77 + seed) % 2**32))   # per leaf and seed, non-linear
      key = _fmix32(idx * jnp.uint32(0x9E3779B1) + offset)
      total = total + jnp.sum(_fmix32(words ^ key), dtype=jnp.uint32)
    out.append(total)
  return jax.lax.bitcast_convert_type(jnp.stack(out), jnp.int32)


def _replicas_agree(tree: Any, axis_name: str) -> jax.Array:
  """True (on every device) iff the fingerprints of ``tree`` are equal on all devices of ``axis_name``:
  two scalar-sized all-reduces, not a parameter-sized one."""
  fp = _fingerprint(tree)
  return jnp.all(jax.lax.pmax(fp, axis_name) == jax.lax.pmin(fp, axis_name))


REDUCTIONS = ("auto", "tx", "mean")


def data_parallel_step(loss_fn: Callable[[Any, Any], jax.Array], tx: optax.GradientTransformation,
                       mesh: Mesh, *, axis_name: str | None = None,
                       reduce: str | ByzShieldReduce = "auto") -> Callable:
  """A jitted data-parallel training step over all devices of ``mesh`` (all processes).

  Every device computes ``jax.grad(loss_fn)(params, its part of the batch)``, then:

  - ``reduce='tx'``: ``tx`` reduces across devices itself (``optax.chain(sidco(0.01, axis_name='d'),
    optax.adam(1e-3))``, ``powersgd(..., axis_name='d')``, ``accordion(..., axis_name='d')``): its
    collectives cross process boundaries; each device keeps its own residuals.
  - ``reduce='mean'``: a dense ``pmean`` of the gradients, then ``tx`` (no collectives of its own).
  - ``reduce='auto'`` (default): ``'tx'`` when ``tx``'s update communicates over ``axis_name``, else ``'mean'``.
  - ``reduce=byzshield_reduce(...)``: ByzShield's vote + robust aggregation of every worker's file
    gradients (batch from :func:`byzshield_batch`), then ``tx`` locally.

  Checked at the first call (trace time), with a ``ValueError`` naming the problem: ``tx`` communicating
  over an axis the mesh does not have (a mismatched ``axis_name``); a compression transform in ``tx``
  whose update runs no collective over ``axis_name`` (built with ``axis_name=None``: used outside its
  collective context, each device would apply only its own gradient; allowed after ByzShield, where every
  device holds the same aggregate); ``reduce='tx'`` with a ``tx`` that does not communicate, ``'mean'`` or
  ByzShield with one that does; with several processes, a step that compiles to a different program on some
  process (other hyperparameters, loss or batch shapes; it would wait for ever in collectives that do not
  match), on every process.

  Returns:
    ``step(state, batch) -> (state, metrics)`` with a :class:`DataParallelState` from
    :func:`data_parallel_init` and ``batch`` from :func:`shard_batch` (leading axis split over the
    devices). ``metrics``: ``loss`` (mean over devices), ``bytes_sent`` (what one device passed to the
    gradient collectives this step; float32; with ByzShield its ``ceil(K / D)`` worker slots, padding
    included, times ``l`` file gradients), ``replicas_agree`` (bool: the new parameters are bitwise
    identical on all devices). The first call raises ``RuntimeError`` if ``replicas_agree`` is False;
    after it, ``step.mode()`` says which reduction was chosen (``'tx'``, ``'mean'`` or ``'byzshield'``).
  """
  axis_name = mesh.axis_names[0] if axis_name is None else axis_name
  n_dev = _mesh_axis(mesh, axis_name)
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be a callable (params, batch) -> scalar loss, got {type(loss_fn).__name__}.")
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}.")
  byz = reduce if isinstance(reduce, ByzShieldReduce) else None
  if byz is None:
    check_choice("reduce", reduce, REDUCTIONS)
  squeeze = lambda t: jax.tree_util.tree_map(lambda x: x[0], t)
  expand = lambda t: jax.tree_util.tree_map(lambda x: x[None], t)
  compiled: dict[str, Any] = {}

  def analyse(state: DataParallelState) -> str:
    """Decide and check the reduction from the collectives of ``tx.update`` (traced once)."""
    def upd(p, s):
      u, s2 = tx.update(p, squeeze(s), p)
      return u, expand(s2)

    mapped = shard_map(upd, mesh=mesh, in_specs=(P(), P(axis_name)), out_specs=(P(), P(axis_name)))
    abstract = lambda t: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    try:
      axes = collective_axes(mapped, abstract(state.params), abstract(state.opt_state))
    except NameError as e:
      m = re.search(r"axis_name '([^']+)'|unbound axis name: ([^\s.,]+)", str(e))
      theirs = f" over axis {(m.group(1) or m.group(2))!r}" if m else ""
      raise ValueError(f"the optimizer runs a collective{theirs} but the data-parallel mesh axis is "
                       f"{axis_name!r} (mismatched axis names); build its transforms with "
                       f"axis_name={axis_name!r}. ({e})") from e
    comm = _comm_states(squeeze(state.opt_state))
    names = ", ".join(sorted({type(c).__name__ for c in comm}))
    uses = axis_name in axes
    if byz is not None:   # (first: after ByzShield every device holds the same gradient, so a local transform,
      # compression built with axis_name=None included, is what it needs; the check below asked for an axis)
      if uses:
        raise ValueError(f"reduce=byzshield_reduce(...) aggregates the workers' gradients itself, but the "
                         f"optimizer communicates over {axis_name!r} ({sorted(axes[axis_name])}); use a "
                         "local optimizer (no axis_name) after ByzShield.")
      return "byzshield"
    if comm and not uses:
      raise ValueError(f"the optimizer holds a compression transform ({names}) whose update runs no "
                       f"collective over the data-parallel axis {axis_name!r}: it was built with "
                       f"axis_name=None (one device) and is used outside its collective context. Build it "
                       f"with axis_name={axis_name!r}, e.g. sidco(0.01, axis_name={axis_name!r}).")
    if reduce == "tx" and not uses:
      raise ValueError(f"reduce='tx' but the optimizer runs no collective over {axis_name!r}: each device "
                       "would apply its own gradient. Use a transform with axis_name="
                       f"{axis_name!r} or reduce='mean'.")
    if reduce == "mean" and uses:
      raise ValueError(f"reduce='mean' all-reduces the gradients, but the optimizer already communicates "
                       f"over {axis_name!r} ({sorted(axes[axis_name])}); pass reduce='tx' (or 'auto').")
    return "tx" if uses else "mean"

  def dense_bytes(params):
    return float(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params)))

  def build(mode: str):
    def body(params, opt_state, step, batch):
      opt_state = squeeze(opt_state)
      if mode == "byzshield":
        grads, loss, nbytes = byz_grads(params, batch, step)
      else:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        nbytes = dense_bytes(params)
        if mode == "mean":
          grads = jax.lax.pmean(grads, axis_name)
        loss = jax.lax.pmean(loss, axis_name)
      updates, opt_state = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      comm = _comm_states(opt_state)
      if comm and mode == "tx":
        nbytes = sum(jnp.asarray(c.bytes_sent, jnp.float32).reshape(()) for c in comm)
      agree = _replicas_agree(new_params, axis_name)
      metrics = {"loss": loss, "bytes_sent": jnp.asarray(nbytes, jnp.float32), "replicas_agree": agree}
      return new_params, expand(opt_state), step + 1, metrics

    mapped = shard_map(body, mesh=mesh, in_specs=(P(), P(axis_name), P(), P(axis_name)),
                       out_specs=(P(), P(axis_name), P(), P()))
    return jax.jit(mapped)

  def byz_grads(params, batch, step):
    from mlsys_jax import robust
    a = byz.assignment
    wpd, rows = _slots(a.num_workers, n_dev)
    me = jax.lax.axis_index(axis_name)
    slot_worker = jnp.arange(wpd) * n_dev + me            # worker id of each local slot
    valid = slot_worker < a.num_workers
    per_file = jax.vmap(jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0)), in_axes=(None, 0))
    losses, grads = per_file(params, batch)               # (wpd, l), leaves (wpd, l, ...)
    gathered = jax.lax.all_gather(grads, axis_name, tiled=True)   # (D * wpd, l, ...) device-major
    workers = jax.tree_util.tree_map(lambda g: g[jnp.asarray(rows)], gathered)   # (K, l, ...)
    if byz.attack is not None:
      mask = np.zeros((a.num_workers,), bool)
      mask[list(byz.byzantine)] = True
      key = jax.random.fold_in(jax.random.PRNGKey(byz.seed), step)
      workers = robust.apply_attack(workers, jnp.asarray(mask), byz.attack, key=key, scale=byz.scale)
    voted = robust.majority_vote(workers, a)
    agg = robust.aggregate(voted, byz.aggregator, num_byzantine=byz.num_byzantine_files)
    lsum = jax.lax.psum(jnp.sum(jnp.where(valid[:, None], losses, 0.0)), axis_name)
    loss = lsum / (a.num_workers * a.load)
    # what this device all-gathers: all its wpd slots (padding slots too) x l file gradients
    return agg, loss, wpd * a.load * dense_bytes(params)

  def check_batch(batch):
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
      shape = np.shape(x)
      if byz is not None:
        wpd, _ = _slots(byz.assignment.num_workers, n_dev)
        if len(shape) < 3 or shape[0] != n_dev * wpd or shape[1] != byz.assignment.load or shape[2] == 0:
          raise ValueError(f"batch{jax.tree_util.keystr(path)} has shape {shape}; with ByzShield it must be "
                           f"({n_dev * wpd}, {byz.assignment.load}, rows per file >= 1, ...): build it with "
                           "byzshield_batch.")
      elif len(shape) == 0 or shape[0] == 0 or shape[0] % n_dev:
        raise ValueError(f"batch{jax.tree_util.keystr(path)} has shape {shape}; its leading size must be a "
                         f"positive multiple of the {n_dev} devices (build it with shard_batch).")

  def step(state: DataParallelState, batch: Any):
    if not isinstance(state, DataParallelState):
      raise TypeError(f"state must be a DataParallelState from data_parallel_init, got {type(state).__name__}.")
    check_batch(batch)
    first = "fn" not in compiled
    if first:
      compiled["mode"] = analyse(state)
      compiled["fn"] = build(compiled["mode"])
      _check_same_program(compiled["fn"], (state.params, state.opt_state, state.step, batch),
                          "the data-parallel step")
    params, opt_state, n, metrics = compiled["fn"](state.params, state.opt_state, state.step, batch)
    if first and not bool(np.asarray(metrics["replicas_agree"].addressable_data(0))):
      raise RuntimeError("after the first data-parallel step the parameters differ between devices: the "
                         f"reduction (mode {compiled['mode']!r}) did not give every device the same update. "
                         "Check that the optimizer's collectives average over the whole mesh axis.")
    return DataParallelState(params, opt_state, n), metrics

  step.mode = lambda: compiled.get("mode")  # type: ignore[attr-defined]
  return step
