"""Configs for the benchmarks as `dit-jax-train` reads them: `--config.FIELD=VALUE` beside a benchmark's flags.

    args, overrides = config_args.parse_args(ap, argv)    # overrides: the --config.* arguments, in order
    config = config_args.load(PROG, "default:XL/2", overrides + ["--config.data.name=latents"])

load is dit_jax.cli.config_file.parse_config (ml_collections' config flag, shipped names such as `digits` or
`default:B/2`, PATH[:VARIANT]); a bad config or override ends the program with one line naming it (exit 1).
"""
from __future__ import annotations

import argparse
from typing import List, Sequence, Tuple


def split_overrides(extra: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(the --config.FIELD=VALUE and --config.FIELD VALUE arguments, the others argparse did not know)."""
    overrides, unknown = [], []
    for a in extra:
        after_field = overrides and overrides[-1].startswith("--config.") and "=" not in overrides[-1]
        if a.startswith("--config.") or (after_field and not a.startswith("-")):
            overrides.append(a)
        else:
            unknown.append(a)
    return overrides, unknown


def parse_args(ap: argparse.ArgumentParser, argv=None) -> Tuple[argparse.Namespace, List[str]]:
    """ap's arguments and the config overrides among the rest; anything else is argparse's usage error."""
    args, extra = ap.parse_known_args(argv)
    overrides, unknown = split_overrides(extra)
    if unknown:
        hint = " (config overrides are --config.FIELD=VALUE, as dit-jax-train takes them)" if "--set" in unknown else ""
        ap.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args, overrides


def load(prog: str, spec: str, overrides: Sequence[str] = ()):
    """dit-jax-train's config for `--config SPEC` + overrides; a problem exits with `PROG: error: ...` (1)."""
    # ml_collections: the GPU machine has it only once benchmarks/gpu.sh installed it, so not at import time
    from dit_jax.cli.config_file import ConfigFileError, ConfigOverrideError, parse_config

    try:
        return parse_config(spec, overrides)
    except (ConfigFileError, ConfigOverrideError) as e:
        raise SystemExit(f"{prog}: error: {e}") from None
