"""dit-jax-train: flags -> train.train_and_evaluate(config, workdir).

    dit-jax-train --config digits --workdir runs/digits [--config.optim.lr=2e-4 ...]
    dit-jax-train --config default:B/2 --workdir gs://bucket/run --export-torch dit.pt
    dit-jax-train --config configs/default.py --workdir /tmp/check --compile-only --topology v5e:16x16
    dit-jax-train --config my_experiment.py:variant --workdir runs/mine

--config takes a file with get_config() (PATH[:VARIANT]) or the name of a shipped config (digits, default);
a PATH that does not exist but names a shipped config (configs/digits.py) reads the installed one, so the
commands above work from any directory. A missing or broken config file is one line naming it (exit 1).

Multi-host: on TPU pods, SLURM and Open MPI `jax.distributed.initialize()` finds the cluster itself
(--distributed=auto); elsewhere pass --coordinator_address HOST:PORT --num_processes N --process_id I on
every process (or the env variables DIT_COORDINATOR_ADDRESS, DIT_NUM_PROCESSES, DIT_PROCESS_ID).
--compile-only compiles the training step for a TPU pod on this machine (docs/tpu.md) and exits 0 when it fits,
1 when it does not. SIGTERM (a preempted spot VM) or Ctrl-C on any process stops every process at the same
step, saved. Exit codes: 0 trained (or nothing left to train), 1 an error (one line on stderr; --debug for the
traceback), 2 a usage error, 75 preempted (EX_TEMPFAIL of sysexits.h, "try again": a restart loop reruns the
same command while it exits 75 and stops on anything else), 130 interrupted with Ctrl-C (the step it stopped
at is saved; rerun to resume).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

import jax
from absl import flags
from absl import logging as absl_logging
from jax.experimental import multihost_utils

import convert
from convert import vae_weights, writers
from convert.inception_weights import inception_params
from dit_jax import checkpoint as ckpt_lib, compile_report, topology
from dit_jax.training import build
from dit_jax.cli.common import (EXIT_USAGE, check_writable_file, report_error, run_command, setup_console_logging,
                                start_distributed)
from dit_jax.cli.config_file import OVERRIDE_ERRORS, ConfigFileError, define_config_flag, override_error
from dit_jax.utils.errors import ConfigError
from dit_jax.pretrained import model_config
from dit_jax.train import train_and_evaluate
from dit_jax.utils import cpu_malloc, paths

PROG = "dit-jax-train"
# A run stopped by SIGTERM on any process: saved, rerun it to resume. Not 0, so that a restart loop can tell
# "preempted" from "finished"; 75 is sysexits.h's EX_TEMPFAIL ("a temporary failure; try again").
EXIT_PREEMPTED = 75
FLAGS = flags.FLAGS
define_config_flag("config")  # PATH[:VARIANT] or a shipped config's name (dit_jax/cli/config_file.py)
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
flags.DEFINE_bool("debug", False, "print the traceback of an error")
flags.DEFINE_bool("compile-only", False, "compile the training step for --topology and report the memory per chip "
                  "(writes WORKDIR/compile_report.json; exit 1 when it does not fit); trains nothing")
flags.DEFINE_string("topology", None, "with --compile-only: a TPU slice like v5e:16x16, v4:4x4x8, v5p:4x4x4, v6e:16x16")

def parse_flags(argv: Sequence[str]) -> Optional[str]:
    """absl parsing; returns a one-line usage error (a bad flag, an unknown config field) or None."""
    try:
        rest = FLAGS(list(argv))
    except flags.Error as e:
        return f"{e} (pass --help for usage)"
    except OVERRIDE_ERRORS as e:  # ml_collections: an override that does not fit the config
        return override_error(e, argv)
    if len(rest) > 1:
        return f"unexpected arguments: {rest[1:]}"
    return None


def export_torch(path: str, result) -> None:
    """EMA weights -> release-format state_dict .pt (loads into the release DiT with strict=True)."""
    host = (multihost_utils.process_allgather(result.state.ema_params, tiled=True) if jax.process_count() > 1
            else jax.device_get(result.state.ema_params))
    if jax.process_index() == 0:
        paths.as_path(path).parent.mkdir(parents=True, exist_ok=True)  # local folders; a bucket needs none
        state = convert.flax_to_torch(host, model_config(result.model), as_numpy=True)
        writers.write_pt(state, path, overwrite=True)
        logging.getLogger("dit_jax.train").info("exported EMA weights to %s", path)


def step_bytes(config) -> int:
    """Estimated temporaries of one training step (0 when the model config is invalid: reported later)."""
    try:
        d = build.model_dims(config.model)
    except ConfigError:
        return 0
    tokens = (config.model.input_size // d["patch_size"]) ** 2
    return cpu_malloc.training_step_bytes(d["depth"], d["hidden_size"], d["num_heads"], tokens,
                                          int(config.global_batch_size))


def compile_only(config, workdir: str) -> int:
    """The pod check: report on stdout and in WORKDIR/compile_report.json; 0 when it fits, else 1."""
    if not FLAGS.topology:
        raise ConfigError("--compile-only needs --topology (e.g. --topology v5e:16x16)")
    jax.config.update("jax_platforms", "cpu")  # compile only: never initialise an accelerator here
    report = compile_report.compile_for_topology(config, topology.tpu_topology(FLAGS.topology))
    print(compile_report.format_report(report), flush=True)
    print(f"report: {compile_report.write_report(report, workdir)}", flush=True)
    return 0 if report["fits"] else 1


def train(config, workdir: str) -> int:
    if FLAGS["compile-only"].value or FLAGS.topology:
        if not FLAGS["compile-only"].value:
            raise ConfigError("--topology is for --compile-only")
        return compile_only(config, workdir)
    export = FLAGS["export-torch"].value
    if export:
        check_writable_file(export, "--export-torch")
    cpu_malloc.configure(step_bytes(config), verbose=True)  # before JAX creates its CPU client
    start_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                      FLAGS.cpu_collectives, flag_word_sep="_")
    config, why = compile_report.mesh_by_compiling(config)  # config.mesh.plan="compile" on an accelerator
    if why:
        print(f"mesh data={config.mesh.data} fsdp={config.mesh.fsdp} tensor={config.mesh.tensor}: {why}", flush=True)
    result = train_and_evaluate(config, workdir, load_vae=vae_weights.load_vae, load_inception=inception_params)
    if result.preempted is not None:
        return EXIT_PREEMPTED
    if export:
        export_torch(export, result)
    return 0


def interrupted_note(workdir: str) -> str:
    step = ckpt_lib.latest_saved_step(workdir)
    return (f"the last checkpoint is step {step} in {ckpt_lib.checkpoint_dir(workdir)}; rerun the same command "
            f"to resume" if step is not None else "no checkpoint was written")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + FLAGS.module_help(sys.modules[__name__]))
        return 0
    try:
        error = parse_flags(argv)
    except ConfigFileError as e:  # the --config file itself: one line naming it (exit 1), not a usage error
        return report_error(PROG, e, argv[1:])
    if error is None and (FLAGS.config is None or FLAGS.workdir is None):
        error = "--config and --workdir are required (pass --help for usage)"
    if error is not None:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/absl chatter only from WARNING up
    setup_console_logging()
    return run_command(PROG, lambda: train(FLAGS.config, FLAGS.workdir), argv[1:],
                       on_interrupt=lambda: interrupted_note(FLAGS.workdir))


if __name__ == "__main__":
    raise SystemExit(main())
