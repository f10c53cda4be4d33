"""`dit-jax-train ARGS` that kills itself (SIGKILL) while its checkpoint save number KILL_AT is being written.

    python -m tests.kill_in_save_worker KILL_AT -- ARGS...
Used by tests/test_train_resume.py. The kill lands right after orbax started the asynchronous write (its
temporary folder exists, the rename into place has not happened), which a test polling from outside catches
only by luck. Prints "killing during the save of step N (TMPNAME)" on stderr first.
"""
import os
import signal
import sys
import time

from dit_jax import checkpoint as ckpt_lib
from dit_jax.cli import train as train_cli


def main():
    kill_at, args = int(sys.argv[1]), sys.argv[3:]
    real_save, calls = ckpt_lib.save, [0]

    def save_then_die(manager, step, state, meta):
        real_save(manager, step, state, meta)
        calls[0] += 1
        if calls[0] == kill_at:
            folder = ckpt_lib.checkpoint_dir(args[args.index("--workdir") + 1])
            deadline, tmp = time.time() + 2.0, []
            while not tmp and time.time() < deadline:  # wait for the temporary folder if orbax makes it later
                tmp = [n for n in os.listdir(folder) if ".orbax-checkpoint-tmp" in n]
            print(f"killing during the save of step {step} ({tmp[0] if tmp else 'no temporary folder'})",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt_lib.save = save_then_die
    return train_cli.main([train_cli.PROG] + args)


if __name__ == "__main__":
    sys.exit(main())
