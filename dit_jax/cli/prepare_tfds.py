"""Prepare a tensorflow-datasets data set for dit_jax (array_record: random access).

    python -m dit_jax.cli.prepare_tfds imagenet2012 --data_dir ~/tensorflow_datasets --manual_dir ~/imagenet_tars

Exit codes: 0 prepared, 1 an error (one line on stderr; --debug for the traceback), 2 a usage error.
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from dit_jax.cli.common import run_command
from dit_jax.data import tfds

PROG = "python -m dit_jax.cli.prepare_tfds"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--data_dir", default="")
    p.add_argument("--manual_dir", default="")
    p.add_argument("--file_format", default="array_record", choices=["array_record", "tfrecord"])
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    def prepare():
        b = tfds.prepare(a.name, a.data_dir, a.manual_dir, a.file_format)
        print(f"prepared {a.name} in {b.data_dir}: "
              + ", ".join(f"{k}={v.num_examples}" for k, v in b.info.splits.items()))

    return run_command(PROG, prepare, argv)


if __name__ == "__main__":
    raise SystemExit(main())
