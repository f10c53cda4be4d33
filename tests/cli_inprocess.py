"""A console script's main(argv) in this process, read like a finished subprocess (returncode, stdout, stderr).

Starting a command line costs ~1.5 CPU-s of imports (jax, flax, orbax); a test about the message and the exit
code of an error checked before any work does not need a process of its own. The modules that use this keep at
least one real subprocess per command (the entry point, the process's exit status).

dit-jax-train parses its flags with absl, whose flags are process-wide: ml_collections reads the
--config.FIELD overrides from sys.argv and defines one flag per override while parsing. `run_main` gives the
command the argv it would see, then removes those flags and unparses the rest, so the next call parses afresh;
it also puts back what the commands change in this process (the "dit_jax" logger's console handler, the root
logger, absl's verbosity).
"""
import contextlib
import importlib
import io
import logging
import sys
from types import SimpleNamespace

MAINS = {  # console script -> the module whose main() it runs (setup.py's entry points)
    "dit-jax-train": "dit_jax.cli.train",
    "dit-jax-sample": "dit_jax.cli.sample",
    "dit-jax-sample-many": "dit_jax.cli.sample_many",
    "dit-jax-convert": "dit_jax.cli.convert",
    "dit-jax-extract-latents": "dit_jax.cli.extract_latents",
}
ABSL_COMMANDS = {"dit-jax-train"}  # main(argv) takes sys.argv-like argv (the program name first)


def run_main(script: str, *args) -> SimpleNamespace:
    """`script ARGS` through its main() here -> SimpleNamespace(returncode, stdout, stderr)."""
    from absl import flags
    from absl import logging as absl_logging

    module = importlib.import_module(MAINS[script])
    argv = [str(a) for a in args]
    loggers = [logging.getLogger("dit_jax"), logging.getLogger()]
    saved_loggers = [(lg, list(lg.handlers), lg.propagate, lg.level) for lg in loggers]
    saved_verbosity, saved_argv = absl_logging.get_verbosity(), sys.argv
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if script in ABSL_COMMANDS:
                    sys.argv = [script, *argv]  # ml_collections finds the --config.FIELD overrides here
                    code = module.main([script, *argv])
                else:
                    code = module.main(argv)
            except SystemExit as e:  # argparse: usage errors (2), --help (0)
                code = e.code
                if isinstance(code, str):  # as the interpreter does: the message on stderr, exit status 1
                    print(code, file=sys.stderr)
                    code = 1
                code = 0 if code is None else code
    finally:
        sys.argv = saved_argv
        if script in ABSL_COMMANDS:
            for name in [n for n in list(flags.FLAGS) if n.startswith("config.")]:
                delattr(flags.FLAGS, name)  # the per-override flags of this parse
            flags.FLAGS.unparse_flags()
        absl_logging.set_verbosity(saved_verbosity)
        for lg, handlers, propagate, level in saved_loggers:
            lg.handlers[:] = handlers
            lg.propagate = propagate
            lg.setLevel(level)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
