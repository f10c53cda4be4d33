"""dit-jax-train: flags -> train.train_and_evaluate(config, workdir).

    dit-jax-train --config configs/digits.py --workdir runs/digits [--config.optim.lr=2e-4 ...]
    dit-jax-train --config configs/default.py --workdir gs://bucket/run --export-torch dit.pt
    dit-jax-train --config configs/default.py --workdir /tmp/check --compile-only --topology v5e:16x16

Multi-host: on TPU pods, SLURM and Open MPI `jax.distributed.initialize()` finds the cluster itself
(--distributed=auto); elsewhere pass --coordinator_address HOST:PORT --num_processes N --process_id I on
every process (or the env variables DIT_COORDINATOR_ADDRESS, DIT_NUM_PROCESSES, DIT_PROCESS_ID).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from dit_jax import cpu_malloc

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "a configs/*.py file with get_config()", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, logs, TensorBoard events and sample grids go here")
flags.DEFINE_string("export-torch", None, "write the final EMA weights as a release-format PyTorch .pt here")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize(): auto = when a cluster (TPU pod, SLURM, MPI) or the "
                  "coordinator flags are detected, on = always, off = never")
flags.DEFINE_string("coordinator_address", os.environ.get("DIT_COORDINATOR_ADDRESS"),
                    "HOST:PORT of process 0 (GPU clusters without SLURM/MPI)")
flags.DEFINE_integer("num_processes", int(os.environ.get("DIT_NUM_PROCESSES", "0")) or None, "number of processes")
flags.DEFINE_integer("process_id", int(os.environ["DIT_PROCESS_ID"]) if "DIT_PROCESS_ID" in os.environ else None,
                     "this process's index, 0..num_processes-1")
flags.DEFINE_string("cpu_collectives", "gloo", "CPU cross-process collectives when distributed (gloo | mpi)")
flags.DEFINE_bool("compile-only", False, "compile the training step for --topology and report the memory per chip "
                  "(writes WORKDIR/compile_report.json; exit 1 when it does not fit); trains nothing")
flags.DEFINE_string("topology", None, "with --compile-only: a TPU slice like v5e:16x16, v4:4x4x8, v5p:4x4x4, v6e:16x16")
flags.mark_flags_as_required(["config", "workdir"])

_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def init_distributed(mode: str, coordinator_address, num_processes, process_id, cpu_collectives: str) -> None:
    """Must run before anything touches a JAX device."""
    import jax

    explicit = coordinator_address is not None
    if mode == "off" or (mode == "auto" and not explicit and not any(k in os.environ for k in _CLUSTER_ENV)):
        return
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if explicit:
        if num_processes is None or process_id is None:
            raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()


def setup_console_logging() -> None:
    """Our progress lines at INFO on stderr; library chatter (orbax, absl) only from WARNING up."""
    from absl import logging as absl_logging

    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    ours = logging.getLogger("dit_jax")
    if not ours.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        ours.addHandler(h)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def parse_flags(argv):
    """absl parsing, with a one-line error for a config field that does not exist (a typo)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}\nPass --help for usage.")
    except (AttributeError, KeyError) as e:  # ml_collections: an override names an unknown field
        bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        msg = " ".join(str(e.args[0] if e.args else e).replace("\\n", " ").split()).replace("\\", "").replace("'", "")
        sys.exit(f"error: unknown config field in {' '.join(bad)}: {msg}")


def main(argv=None) -> None:
    if argv is None:  # the console script calls main() with no arguments
        return app.run(main, flags_parser=parse_flags)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS["compile-only"].value or FLAGS.topology:  # a pod check on this machine: no devices, no data
        if not FLAGS["compile-only"].value:
            sys.exit("error: --topology is for --compile-only")
        from dit_jax import compile_report

        sys.exit(compile_report.main(FLAGS.config, FLAGS.workdir, FLAGS.topology))
    try:  # before JAX creates its CPU client; a bad model config is reported by train_and_evaluate below
        step_bytes = cpu_malloc.training_step_bytes(FLAGS.config)
    except (KeyError, ValueError, AttributeError, IndexError, TypeError):
        step_bytes = 0
    cpu_malloc.configure(step_bytes, verbose=True)
    setup_console_logging()
    init_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                     FLAGS.cpu_collectives)
    from dit_jax import train  # after distributed init

    train.train_and_evaluate(FLAGS.config, FLAGS.workdir, export_torch_path=FLAGS["export-torch"].value)


if __name__ == "__main__":
    main()
