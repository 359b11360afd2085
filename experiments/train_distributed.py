"""Data-parallel training across processes (jax.distributed) with compressed collectives or ByzShield.

Trains an MLP on sklearn digits with every device of every process as one data-parallel worker
(:mod:`mlsys_jax.comm.distributed`): the gradient is reduced by SIDCo's sparse all-gather, PowerSGD's or
ACCORDION's low-rank all-reduces, ByzShield's vote + robust aggregation, or a dense all-reduce, and these
collectives cross process boundaries. Each method starts from the same parameters and sees the same
global batches, so a run with 2 processes x 4 devices computes what 1 process x 8 devices does.

Two processes on one machine (CPU, 4 simulated devices each; gloo collectives):

  python experiments/train_distributed.py --coordinator_address=127.0.0.1:12355 --num_processes=2 \\
      --process_id=0 --local_devices=4 --method=sidco,byzshield &
  python experiments/train_distributed.py --coordinator_address=127.0.0.1:12355 --num_processes=2 \\
      --process_id=1 --local_devices=4 --method=sidco,byzshield

One process with 8 devices (the reference): ``--local_devices=8`` and no coordinator flags. Writes
``<out_dir>/results.json`` (process 0; other processes ``results_process<i>.json``) with, per method, the
loss curve, test accuracy, bytes each worker sent, a checksum of the final parameters, and (with
``--save_params``) ``params_<method>_process<i>.npz``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import time
import zlib

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import data, models, robust  # noqa: E402
from mlsys_jax.comm import accordion, powersgd, sidco  # noqa: E402
from mlsys_jax.comm import distributed as dist  # noqa: E402

METHODS = ("dense", "sidco", "powersgd", "accordion", "byzshield")

dist.define_flags()
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps per method.", lower_bound=1)
_METHOD = flags.DEFINE_list("method", ["sidco"], f"Comma-separated methods, each of {METHODS}.")
_LOCAL_DEVICES = flags.DEFINE_integer("local_devices", 0, "Simulated CPU devices in this process (0: leave "
                                      "jax's devices as they are, e.g. the GPUs).", lower_bound=0)
_BATCH = flags.DEFINE_integer("batch", 16, "Examples per device per step.", lower_bound=1)
_LR = flags.DEFINE_float("lr", 3e-3, "Adam learning rate (after the compressor).")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "Width of the MLP's hidden layer.", lower_bound=1)
_RATIO = flags.DEFINE_float("ratio", 0.01, "SIDCo target density.")
_RANK = flags.DEFINE_integer("rank", 2, "PowerSGD rank (ACCORDION: low-compression rank; high is 1).")
_INTERVAL = flags.DEFINE_integer("accordion_interval", 20, "Steps between ACCORDION decisions.")
_AGGREGATOR = flags.DEFINE_enum("aggregator", "median", list(robust.AGGREGATORS), "ByzShield aggregator.")
_ATTACK = flags.DEFINE_enum("attack", "none", ["none", *robust.ATTACKS], "ByzShield: attack of the Byzantine "
                            "workers (simulated).")
_BYZANTINE = flags.DEFINE_list("byzantine", ["0"], "ByzShield: ids of the Byzantine workers (with --attack).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters and of the batch order.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Print progress every this many steps.", lower_bound=1)
_SAVE_PARAMS = flags.DEFINE_bool("save_params", False, "Also write the final parameters (.npz).")
_OUT = flags.DEFINE_string("out_dir", "results/train_distributed", "Output folder.")


def set_local_devices(n: int) -> None:
  """Simulate ``n`` CPU devices in this process (before jax's backend starts)."""
  if n <= 0:
    return
  jax.config.update("jax_platforms", "cpu")
  if "jax_num_cpu_devices" in getattr(jax.config, "values", {}):
    jax.config.update("jax_num_cpu_devices", n)
  else:  # older jax: the XLA flag, read when the CPU backend starts
    flags_ = os.environ.get("XLA_FLAGS", "")
    flags_ = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags_)
    os.environ["XLA_FLAGS"] = f"{flags_} --xla_force_host_platform_device_count={n}".strip()


def make_tx(method: str, cfg: dict, axis: str):
  adam = optax.adam(cfg["lr"])
  if method == "sidco":
    return optax.chain(sidco(cfg["ratio"], axis_name=axis), adam)
  if method == "powersgd":
    return optax.chain(powersgd(cfg["rank"], axis_name=axis), adam)
  if method == "accordion":
    return optax.chain(accordion("powersgd", low=cfg["rank"], high=1, interval=cfg["accordion_interval"],
                                 axis_name=axis), adam)
  return adam   # dense (all-reduce mean) and ByzShield (vote + aggregation) use Adam locally


def checksum(params) -> dict:
  """CRC-32 of the parameters' bytes (flatten order) and their float64 sum."""
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]
  crc = 0
  for x in leaves:
    crc = zlib.crc32(np.ascontiguousarray(x).tobytes(), crc)
  return {"crc32": int(crc), "sum": float(sum(np.sum(x, dtype=np.float64) for x in leaves))}


def run(cfg: dict, log=print) -> dict:
  """Train every method of ``cfg['methods']`` on the mesh of all processes' devices; returns the results
  (also what ``main`` writes). ``jax.distributed`` must be initialized already when it is used."""
  ds = data.load_digits(seed=cfg["seed"])
  mesh = dist.global_mesh("d")
  n_dev = mesh.devices.size
  pid = jax.process_index()
  model = models.MLP(features=(cfg["hidden"],))
  params0 = model.init(jax.random.PRNGKey(cfg["seed"]), ds.x_train[:1])["params"]

  def loss_fn(p, batch):
    x, y = batch
    return models.cross_entropy(model.apply({"params": p}, x), y)

  unknown = [m for m in cfg["methods"] if m not in METHODS]
  if unknown:   # before any training (a later method's typo would otherwise end the run unwritten)
    raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}.")
  out = {"process_index": pid, "process_count": jax.process_count(), "devices": n_dev,
         "local_devices": jax.local_device_count(), "jax": jax.__version__, "config": cfg, "methods": {},
         "provenance": provenance.record(data_arrays=(ds.x_train, ds.y_train, ds.x_test, ds.y_test),
                                         script=__file__)}
  for method in cfg["methods"]:
    if method not in METHODS:
      raise ValueError(f"unknown method {method!r}; choose from {METHODS}.")
    tx = make_tx(method, cfg, "d")
    reduce = "auto"
    global_batch = cfg["batch"] * n_dev
    if method == "byzshield":
      assignment = robust.ramanujan_assignment(3, 3)   # K = 9 workers, f = 9 files, r = l = 3
      attack = None if cfg["attack"] == "none" else cfg["attack"]
      reduce = dist.byzshield_reduce(assignment, cfg["aggregator"], attack=attack,
                                     byzantine=[int(w) for w in cfg["byzantine"]] if attack else (),
                                     num_byzantine_files=1, seed=cfg["seed"])
      global_batch -= global_batch % assignment.num_files
    state = dist.data_parallel_init(params0, tx, mesh)
    step = dist.data_parallel_step(loss_fn, tx, mesh, reduce=reduce)
    rows = dist.local_batch_slice(global_batch, mesh) if method != "byzshield" else None
    losses, agree, sent = [], True, 0.0
    t0 = time.time()
    for i in range(cfg["steps"]):
      idx = np.random.default_rng([cfg["seed"], i]).choice(len(ds.x_train), global_batch, replace=False)
      xb, yb = ds.x_train[idx], ds.y_train[idx]
      if method == "byzshield":
        batch = dist.byzshield_batch(mesh, reduce, (xb, yb))
      else:
        batch = dist.shard_batch(mesh, (xb[rows], yb[rows]))
      state, m = step(state, batch)
      losses.append(float(np.asarray(m["loss"].addressable_data(0))))
      agree &= bool(np.asarray(m["replicas_agree"].addressable_data(0)))
      sent += float(np.asarray(m["bytes_sent"].addressable_data(0)))
      if (i + 1) % cfg["log_every"] == 0 or i + 1 == cfg["steps"]:
        log(f"[process {pid}] {method}: step {i + 1}/{cfg['steps']} loss {losses[-1]:.4f} "
            f"bytes/worker {sent / 1e3:.1f} KB ({time.time() - t0:.1f} s)")
    params = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), state.params)
    acc = models.evaluate(model, {"params": params}, ds.x_test, ds.y_test)
    dense = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)) * cfg["steps"]
    out["methods"][method] = {
        "reduce": step.mode(), "loss": losses, "test_accuracy": float(acc), "replicas_agree": agree,
        "bytes_per_worker": sent, "dense_allreduce_bytes_per_worker": float(dense),
        "global_batch": global_batch, "seconds": time.time() - t0, "params_checksum": checksum(params)}
    if cfg.get("save_params") and cfg.get("out_dir"):
      path = pathlib.Path(cfg["out_dir"])
      path.mkdir(parents=True, exist_ok=True)
      flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
      np.savez(path / f"params_{method}_process{pid}.npz", **flat)
    log(f"[process {pid}] {method}: test accuracy {acc:.4f}, {sent / 1e3:.1f} KB sent per worker "
        f"(dense all-reduce {dense / 1e3:.1f} KB), replicas agree: {agree}")
  return out


def main(argv):
  del argv
  set_local_devices(_LOCAL_DEVICES.value)
  info = dist.initialize_from_flags()
  print(f"process {info.process_index} of {info.process_count}: {info.local_device_count} local / "
        f"{info.device_count} devices ({jax.devices()[0].platform})", flush=True)
  cfg = {"methods": list(_METHOD.value), "steps": _STEPS.value, "batch": _BATCH.value, "lr": _LR.value,
         "hidden": _HIDDEN.value, "ratio": _RATIO.value, "rank": _RANK.value,
         "accordion_interval": _INTERVAL.value, "aggregator": _AGGREGATOR.value, "attack": _ATTACK.value,
         "byzantine": list(_BYZANTINE.value), "seed": _SEED.value, "log_every": _LOG_EVERY.value,
         "save_params": _SAVE_PARAMS.value, "out_dir": _OUT.value}
  out = run(cfg, log=lambda s: print(s, flush=True))
  path = pathlib.Path(_OUT.value)
  path.mkdir(parents=True, exist_ok=True)
  name = "results.json" if info.process_index == 0 else f"results_process{info.process_index}.json"
  (path / name).write_text(json.dumps(out, indent=1))
  print(f"wrote {path / name}", flush=True)


if __name__ == "__main__":
  app.run(main)
