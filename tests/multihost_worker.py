"""One process of a real 2-process run on 127.0.0.1 (used by tests/test_train_multihost.py).

    python tests/multihost_worker.py PORT PROCESS_ID NUM_PROCESSES WORKDIR
Each process has 4 CPU devices; collectives go through gloo; process 0 writes metrics and checkpoints.
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from dit_jax.main import init_distributed  # noqa: E402


def main():
    port, pid, nproc, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    init_distributed("auto", f"127.0.0.1:{port}", nproc, pid, "gloo")
    assert jax.process_count() == nproc and len(jax.devices()) == 4 * nproc, (jax.process_count(), jax.devices())
    from dit_jax import train
    from tests.train_tiny import tiny_config

    cfg = tiny_config()
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    train.train_and_evaluate(cfg, workdir)
    print(f"process {pid} done", flush=True)


if __name__ == "__main__":
    main()
