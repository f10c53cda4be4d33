"""One process of a 2-process training run that may get SIGTERM (used by tests/test_preemption.py).

    python -m tests.preemption_worker PORT PROCESS_ID NUM_PROCESSES WORKDIR NUM_STEPS STEP_SLEEP_S
Each process has 4 CPU devices (gloo collectives); a source that sleeps STEP_SLEEP_S per batch keeps the
run long enough to be interrupted. Prints "process I preempted=STEP|None" at the end.
"""
import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from dit_jax import train  # noqa: E402
from dit_jax.cli.train import init_distributed  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402  (run with -m from the repository root)


def main():
    port, pid, nproc, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    num_steps, sleep_s = int(sys.argv[5]), float(sys.argv[6])
    init_distributed("auto", f"127.0.0.1:{port}", nproc, pid, "gloo")
    assert jax.process_count() == nproc

    real = train.make_source

    class Slow:
        def __init__(self, src):
            self.src, self.num_examples = src, src.num_examples

        def batch(self, step):
            time.sleep(sleep_s)
            return self.src.batch(step)

        def close(self):
            self.src.close()

    train.make_source = lambda c: Slow(real(c))
    cfg = tiny_config(num_steps=num_steps)
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    cfg.checkpoint.every_steps = 0  # only the last step and the preemption step
    out = train.train_and_evaluate(cfg, workdir)
    print(f"process {pid} preempted={out.preempted}", flush=True)


if __name__ == "__main__":
    main()
