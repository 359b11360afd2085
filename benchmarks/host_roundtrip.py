"""Host <-> device round trip of a tiny jitted call: where the latency of a batch-1 request goes.

MicroRec's server (issue 27) and Nimble's request stream (issue 29) are host-bound on the H200 host: a jitted
call that takes one small numpy array and returns one cost ~430 us there with no device work, against ~10 us
of device time. This script times the pieces and the alternatives a user could pick, all on the same tiny
program (``x + 1`` on ``int32[n]``), every variant timed round-robin (``--rounds`` rounds of ``--calls``
calls each, medians per call), so that one run says which path is cheapest on that host:

- ``device_in_device_out``: inputs already on the device, ``block_until_ready`` on the result (the floor of a
  jitted call);
- ``numpy_in_block``: numpy input (jit transfers it), block on the device result;
- ``device_put_then_call``: ``jax.device_put`` first, then the call, block;
- ``numpy_in_numpy_out``: numpy in, ``np.asarray`` of the result (what a user of a server does);
- ``numpy_in_numpy_out_async``: the same with ``copy_to_host_async()`` issued right after dispatch;
- ``device_get``: ``jax.device_get`` of the result instead of ``np.asarray``;
- ``pinned_out``: the jitted call writes its result to ``pinned_host`` memory (``out_shardings`` with
  ``memory_kind="pinned_host"``), then ``np.asarray`` (skipped where the backend has no such memory kind);
- ``pinned_in_pinned_out``: input put in ``pinned_host`` memory too (the program moves it to the device);
- ``d2h_only`` / ``h2d_only``: ``np.asarray`` of a fresh ``device_put`` array (so it includes that upload) /
  ``device_put`` of a numpy array (recorded before 15:25 UTC 2026-12-02 as ``np.asarray(x_dev + 0)``: an eager
  add's dispatch included).

Usage (GPU): ``PYTHONPATH=. python benchmarks/host_roundtrip.py --out $OUT``; CPU smoke: ``--small``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common


def _flags(ap):
  ap.add_argument("--n", type=int, default=64, help="int32 elements in and out")
  ap.add_argument("--calls", type=int, default=200)
  ap.add_argument("--rounds", type=int, default=7)


def _variants(n: int) -> dict:
  dev = jax.devices()[0]
  f = jax.jit(lambda x: x + 1)
  x_np = np.arange(n, dtype=np.int32)
  x_dev = jax.device_put(x_np, dev)
  jax.block_until_ready(f(x_dev))
  v = {
      "device_in_device_out": lambda: jax.block_until_ready(f(x_dev)),
      "numpy_in_block": lambda: jax.block_until_ready(f(x_np)),
      "device_put_then_call": lambda: jax.block_until_ready(f(jax.device_put(x_np, dev))),
      "numpy_in_numpy_out": lambda: np.asarray(f(x_np)),
      "device_get": lambda: jax.device_get(f(x_np)),
      "d2h_only": lambda: np.asarray(jax.device_put(x_np, dev)),
      "h2d_only": lambda: jax.block_until_ready(jax.device_put(x_np, dev)),
  }

  def async_out():
    y = f(x_np)
    y.copy_to_host_async()
    return np.asarray(y)
  v["numpy_in_numpy_out_async"] = async_out
  try:
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    on_dev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    fp = jax.jit(lambda x: x + 1, out_shardings=pinned)
    np.asarray(fp(x_np))
    v["pinned_out"] = lambda: np.asarray(fp(x_np))
    fpp = jax.jit(lambda x: jax.device_put(x, on_dev) + 1, in_shardings=pinned, out_shardings=pinned)
    np.asarray(fpp(jax.device_put(x_np, pinned)))
    v["pinned_in_pinned_out"] = lambda: np.asarray(fpp(jax.device_put(x_np, pinned)))
  except Exception as e:  # noqa: BLE001 - a backend without pinned_host memory: record and go on
    print(f"pinned_host variants skipped: {type(e).__name__}: {str(e)[:200]}")
  for fn in v.values():
    fn()
  return v


def main():
  args = common.parse_args(__doc__.splitlines()[0], _flags)
  calls = 20 if args.small else args.calls
  rounds = 3 if args.small else args.rounds
  variants = _variants(args.n)
  per_call = {k: [] for k in variants}
  names = list(variants)
  for r in range(rounds):
    for k in names[r % len(names):] + names[:r % len(names)]:
      fn = variants[k]
      t0 = time.perf_counter()
      for _ in range(calls):
        fn()
      per_call[k].append((time.perf_counter() - t0) / calls)
  rows = [{"variant": k, "us_per_call": 1e6 * float(np.median(t)),
           "min_round_us": 1e6 * float(np.min(t)), "max_round_us": 1e6 * float(np.max(t))}
          for k, t in per_call.items()]
  base = next(r["us_per_call"] for r in rows if r["variant"] == "numpy_in_numpy_out")
  for r in rows:
    r["vs_numpy_in_numpy_out"] = base / r["us_per_call"]
  common.print_table(rows, ["variant", "us_per_call", "min_round_us", "max_round_us", "vs_numpy_in_numpy_out"])
  common.write_json(args.out, "host_roundtrip" + ("_small" if args.small else ""),
                    {"env": common.environment(), "args": vars(args), "rows": rows,
                     "seconds_per_call": {k: [float(x) for x in t] for k, t in per_call.items()}})


if __name__ == "__main__":
  main()
