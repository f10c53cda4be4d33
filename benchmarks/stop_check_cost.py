"""What one stop check of the train loop costs with 2 processes (jax.distributed, 2 x 4 CPU devices, gloo).

    python -m benchmarks.stop_check_cost [--calls 300]

dit_jax.training.preemption.Watcher.check() runs after every step on every process. Two ways to make the decision
collective are timed, each with the processes in lock step (a barrier before each timed block):
- "sync manager": JAX's preemption sync point (what the Watcher uses): a local test until a SIGTERM (or a
  Ctrl-C, which the Watcher turns into one) arrives anywhere;
- "all-gather": every process all-gathers its two flags at every check (the Watcher's fallback when the
  preemption service is off).
Process 0 prints the median and 90th percentile per check, in microseconds.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np


def worker(port: int, pid: int, calls: int) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    from jax.experimental import multihost_utils

    from dit_jax.training import preemption

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    watcher = preemption.Watcher()
    steps = iter(range(1, 10 ** 9))
    results = {}
    for name, fn in (("sync manager", lambda: watcher.check(next(steps))),
                     ("all-gather", lambda: preemption._gather_flags([watcher.interrupted, False]))):
        for _ in range(10):  # compile the all-gather, warm up
            fn()
        multihost_utils.sync_global_devices(f"bench {name}")
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        results[name] = np.asarray(times) * 1e6
    assert watcher.sync_manager, "the preemption service is off"
    watcher.close()
    if pid == 0:
        for name, us in results.items():
            print(f"{name:>13}: median {np.median(us):9.1f} us, p90 {np.percentile(us, 90):9.1f} us per check "
                  f"({calls} checks, 2 processes x 4 CPU devices)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--worker", type=int, nargs=2, help=argparse.SUPPRESS)  # PORT PROCESS_ID
    a = ap.parse_args()
    if a.worker:
        worker(a.worker[0], a.worker[1], a.calls)
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.stop_check_cost", "--calls", str(a.calls),
                               "--worker", str(port), str(i)], env=env, stderr=subprocess.DEVNULL) for i in range(2)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
