"""One process of a 2-process `dit-jax-train` run (tests/test_preemption.py, tests/test_checkpoint_agreement.py).

    python -m tests.preemption_worker PORT PROCESS_ID NUM_PROCESSES WORKDIR STEP_SLEEP_S PROGRESS [--config.x=y ...]
Each process has 4 CPU devices (gloo collectives) and runs the real command line (dit_jax.cli.train.main) on
the tiny digits config with mesh data=2, fsdp=4 plus the given flags. Its data source sleeps STEP_SLEEP_S per
batch, so that the run is long enough to be interrupted, and writes the step it was asked for to
PROGRESS.<PROCESS_ID> (a file of the test, outside the run's workdir; "-" for none). When DIT_TEST_GCS_URL_<ID>
is set, this process's storage clients talk to that URL (a fault-injecting proxy in front of the emulator).
When DIT_TEST_THEN_TRAIN names another workdir and the command succeeded, the same processes then train that
workdir from scratch with the same config (dit_jax.train.train_and_evaluate, real data, no signals): an
uninterrupted reference run without the ~13 CPU seconds of starting two more processes.
Exits with the command's status.
"""
import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
_OWN_URL = os.environ.get(f"DIT_TEST_GCS_URL_{sys.argv[2]}")
if _OWN_URL:  # before any storage client reads the variables
    os.environ["STORAGE_EMULATOR_HOST"] = os.environ["TENSORSTORE_GCS_HTTP_URL"] = _OWN_URL

from dit_jax import train  # noqa: E402
from dit_jax.cli import train as train_cli  # noqa: E402
from tests.conftest import ROOT, TINY_FLAGS  # noqa: E402  (run with -m and the repository on PYTHONPATH)


def main():
    port, pid, nproc, workdir, sleep_s, progress = sys.argv[1:7]
    flags = sys.argv[7:]
    real = train.make_source

    class Slow:
        """The real source, slowed down, telling the test how far the run got."""

        def __init__(self, src):
            self.src, self.num_examples = src, src.num_examples

        def batch(self, step):
            if progress != "-":
                with open(f"{progress}.{pid}", "w") as f:
                    f.write(str(step))
            time.sleep(float(sleep_s))
            return self.src.batch(step)

        def close(self):
            self.src.close()

    train.make_source = lambda c: Slow(real(c))
    argv = [train_cli.PROG, "--config", os.path.join(ROOT, "configs", "digits.py"), "--workdir", workdir,
            *TINY_FLAGS, "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.checkpoint.every_steps=0",
            f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={nproc}", f"--process_id={pid}", *flags]
    sys.argv = argv  # ml_collections finds the --config.* overrides in sys.argv
    rc = train_cli.main(argv)
    then = os.environ.get("DIT_TEST_THEN_TRAIN")
    if rc == 0 and then:
        train.make_source = real
        train.train_and_evaluate(train_cli.FLAGS.config, then)
    return rc


if __name__ == "__main__":
    sys.exit(main())
