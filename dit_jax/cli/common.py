"""What every command line shares: one-line errors and exit codes, console logging, output checks.

Exit codes of every dit-jax command: 0 success; 1 an error in the input, the data, a file or the config (one
line on stderr naming it; `--debug` shows the traceback); 2 a command-line usage error (argparse/absl);
130 interrupted with Ctrl-C (SIGINT).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
import warnings
from typing import Callable, Iterator, Optional, Sequence

import jax

from dit_jax.utils import paths
from dit_jax.utils.errors import ConfigError, DitJaxError
from dit_jax.utils.platforms import skip_absent_tpu

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXPECTED_ERRORS = (DitJaxError, OSError)  # a missing/unwritable file is the user's to fix, not a bug


def log_line(msg: str) -> None:
    """A progress line on stderr (stdout stays free for results)."""
    print(msg, file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    """The message of an error on one line (multi-line messages are joined)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def run_command(prog: str, fn: Callable[[], object], argv: Optional[Sequence[str]] = None,
                on_interrupt: Optional[Callable[[], str]] = None) -> int:
    """Run `fn()`; map expected errors to one line + exit 1, Ctrl-C to exit 130. Returns the exit code:
    fn's own when it returns an int (e.g. 1: a compile-only check that does not fit), else 0.

    `on_interrupt()` may say what was kept (e.g. the last checkpoint). With `--debug` in argv the traceback
    of an error is printed too.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    skip_absent_tpu()  # before JAX starts: libtpu without a TPU chip would only cost seconds and noise
    try:
        rc = fn()
    except KeyboardInterrupt:
        extra = on_interrupt() if on_interrupt is not None else ""
        print(f"{prog}: interrupted" + (f"; {extra}" if extra else ""), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except EXPECTED_ERRORS as e:
        return report_error(prog, e, argv)
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else EXIT_OK


def report_error(prog: str, e: BaseException, argv: Sequence[str]) -> int:
    """An expected error as one line `PROG: error: ...` on stderr (the traceback first with --debug in argv);
    returns the exit code 1. Call it from inside the `except` block."""
    if "--debug" in argv:
        traceback.print_exc()
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
    return EXIT_ERROR


@contextlib.contextmanager
def one_line_warnings(prog: str) -> Iterator[None]:
    """Inside: a warning prints as one line `PROG: warning: ...` on stderr (Python's own format adds the file,
    the line number and the source line of the warn call, which mean nothing to a user)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {one_line(message)}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def setup_console_logging(verbose: bool = True) -> None:
    """Our progress lines at INFO on stderr ("HH:MM:SS message"); library chatter stays quiet."""
    ours = logging.getLogger("dit_jax")
    if not ours.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        ours.addHandler(h)
        ours.propagate = False
    ours.setLevel(logging.INFO if verbose else logging.WARNING)


def check_writable_file(path: str, flag: str) -> None:
    """Before any work: `path` must not be a directory and its folder must exist (or be creatable) and be
    writable. A bucket URL: not a folder, and its bucket exists."""
    where = paths.as_path(path)
    if where.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file name")
    check_writable_dir(where.parent, flag, path)


def check_bucket(url: paths.PathLike, flag: str, shown: str) -> None:
    """A bucket URL's bucket must exist (what can be checked without writing; permissions show on the write)."""
    bucket = paths.bucket_of(url)
    try:
        found = paths.as_path(bucket).exists()
    except OSError as e:  # no credentials, no network: name the flag, not the library's internals
        raise ConfigError(f"{flag} {shown}: cannot reach bucket {bucket} ({one_line(e)})") from None
    if not found:
        raise ConfigError(f"{flag} {shown}: bucket {bucket} does not exist (or this account cannot see it)")


def check_writable_dir(folder: paths.PathLike, flag: str, shown: Optional[str] = None) -> None:
    """Before any work: `folder` (or its nearest existing parent, if it will be created) must be writable.
    A bucket URL: its bucket exists and no file has the folder's name."""
    shown = shown or os.fspath(folder)
    if paths.is_url(folder):
        check_bucket(folder, flag, shown)
        if paths.is_file(folder):
            raise ConfigError(f"{flag} {shown}: {paths.display(folder)} is a file, not a folder")
        return
    probe = os.fspath(paths.as_path(folder))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"{flag} {shown}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {shown}: folder {probe} is not writable")


def check_local_dir(folder: Optional[str], flag: str) -> None:
    """A folder that must be on the local disk (the download cache): a bucket URL is refused up front."""
    if folder and paths.is_url(folder):
        raise ConfigError(f"{flag} {folder}: the download cache must be a local folder (downloads are resumed "
                          f"and renamed in place there); put the weights in the bucket and pass their path instead")


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """--distributed and the coordinator flags of a multi-host run (TPU pods and SLURM/MPI need none)."""
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host jobs; on TPU pods, SLURM and Open "
                        "MPI it finds the cluster itself)")
    p.add_argument("--coordinator-address", default=os.environ.get("DIT_COORDINATOR_ADDRESS"),
                   help="HOST:PORT of process 0 elsewhere (with --num-processes and --process-id; implies "
                        "--distributed); env DIT_COORDINATOR_ADDRESS")
    p.add_argument("--num-processes", type=int, default=int(os.environ.get("DIT_NUM_PROCESSES", "0")) or None,
                   help="number of processes (env DIT_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int,
                   default=int(os.environ["DIT_PROCESS_ID"]) if "DIT_PROCESS_ID" in os.environ else None,
                   help="this process's index, 0..num-processes-1 (env DIT_PROCESS_ID)")


def init_distributed(args) -> None:
    """jax.distributed.initialize() as the flags of add_distributed_args ask; before any device is touched."""
    if args.coordinator_address is not None:
        if args.num_processes is None or args.process_id is None:
            raise ConfigError("--coordinator-address needs --num-processes and --process-id")
        check_range(args.process_id, "--process-id", 0, args.num_processes - 1)
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def check_range(value, name: str, low=None, high=None, kind: str = "") -> None:
    """A numeric flag or config field within [low, high] (either end optional); the error states the range."""
    bad = (low is not None and value < low) or (high is not None and value > high)
    if bad:
        if low is not None and high is not None:
            want = f"between {low} and {high}"
        elif low is not None:
            want = f">= {low}"
        else:
            want = f"<= {high}"
        raise ConfigError(f"{name}={value}: must be {want}{kind}")
