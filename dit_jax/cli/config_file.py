"""`--config`: a config file with get_config(), or the name of a shipped one, loaded with one-line errors.

    --config digits                 the shipped configs/digits.py (the installed `configs` package)
    --config default:B/2            the shipped configs/default.py, get_config("B/2")
    --config configs/digits.py      that file, relative to the working directory; where it does not exist,
                                    the shipped config of that name (so the documented commands work anywhere)
    --config my/exp.py:variant      any file; what follows the first ':' is passed to get_config

A file that exists is always the one read. Every problem (no such file and no such shipped config, a syntax
error, an error while the file runs, no get_config, a variant the function does not take or rejects, a
result that is not a ConfigDict) is a ConfigFileError whose one-line message names the file.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from typing import List, Tuple

import ml_collections
from absl import flags
from ml_collections import config_flags

import configs as shipped_configs
from dit_jax.utils.errors import DitJaxError

flags.disclaim_key_flags()  # the flag defined here belongs to the command that calls define_config_flag

SHIPPED_DIR = os.path.dirname(os.path.abspath(shipped_configs.__file__))


class ConfigFileError(DitJaxError):
    """A --config that cannot be loaded. Not a ValueError, so absl passes it on instead of rewording it."""


def shipped_names() -> List[str]:
    return sorted(f[:-3] for f in os.listdir(SHIPPED_DIR) if f.endswith(".py") and not f.startswith("_"))


def resolve(path: str) -> str:
    """The file a --config path (without the variant) names: the path itself when it is a file, else the
    shipped config it names (NAME, NAME.py or configs/NAME.py)."""
    if os.path.isfile(path):
        return path
    parent, name = os.path.split(os.path.normpath(path))
    stem = name[:-3] if name.endswith(".py") else name
    if parent in ("", "configs") and stem in shipped_names():
        return os.path.join(SHIPPED_DIR, f"{stem}.py")
    if os.path.isdir(path):
        raise ConfigFileError(f"--config {path}: is a directory; expected a .py file with get_config()")
    raise ConfigFileError(f"--config {path}: no such file (relative to {os.getcwd()}) and no shipped config of "
                          f"that name (shipped: {', '.join(shipped_names())}, e.g. --config digits)")


def split_spec(spec: str) -> Tuple[str, str, bool]:
    """"file.py:variant" -> ("file.py", "variant", True); "file.py" -> ("file.py", "", False)."""
    path, sep, variant = spec.partition(":")
    return path, variant, bool(sep)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """get_config([variant]) of the file or shipped config `spec` (PATH[:VARIANT]) names."""
    path, variant, has_variant = split_spec(spec)
    if not path:
        raise ConfigFileError(f"--config {spec!r}: no file name")
    file = resolve(path)
    shown = path if file == path else f"{path} (the shipped {file})"
    name = "dit_jax_config_" + "".join(c if c.isalnum() else "_" for c in os.path.basename(file)[:-3])
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None:
        raise ConfigFileError(f"--config {shown}: not a Python file (expected a .py file with get_config())")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        where = "" if os.path.abspath(e.filename or file) == os.path.abspath(file) else f"{e.filename}, "
        raise ConfigFileError(f"--config {shown}: syntax error ({where}line {e.lineno}): {e.msg}") from e
    except Exception as e:  # noqa: BLE001 - anything the file runs; reported as one line naming it
        raise ConfigFileError(f"--config {shown}: running the file raised {type(e).__name__}: {e}") from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigFileError(f"--config {shown}: defines no get_config() function")
    params = [p for p in inspect.signature(get_config).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if has_variant and not params:
        raise ConfigFileError(f"--config {spec}: get_config() of {file} takes no variant; drop ':{variant}'")
    if not has_variant and params and params[0].default is inspect.Parameter.empty:
        raise ConfigFileError(f"--config {shown}: get_config() needs a variant: --config {path}:VARIANT")
    try:
        config = get_config(variant) if has_variant else get_config()
    except Exception as e:  # noqa: BLE001 - the config's own check of its variant, or a bug in the file
        call = f"get_config({variant!r})" if has_variant else "get_config()"
        raise ConfigFileError(f"--config {spec}: {call} of {file} raised {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigFileError(f"--config {shown}: get_config() returned {type(config).__name__}, expected an "
                              f"ml_collections.ConfigDict")
    return config


class ConfigFileParser(flags.ArgumentParser):
    """absl parser of --config: load_config, then lock the config (an override of an unknown field fails)."""

    def parse(self, argument: str) -> ml_collections.ConfigDict:
        config = load_config(argument)
        config.lock()
        return config

    def flag_type(self) -> str:
        return "config object"


HELP = ("a config: a file with get_config() as PATH[:VARIANT], or a shipped config by name "
        f"({', '.join(shipped_names())}; e.g. digits, default:B/2). A PATH that does not exist but names a "
        "shipped config (configs/digits.py) reads the installed one, so it works from any directory")


def define_config_flag(name: str = "config") -> flags.FlagHolder:
    """ml_collections' config-file flag (--config.field=value overrides) with load_config as its parser."""
    holder = config_flags.DEFINE_config_file(name, None, HELP, lock_config=True)
    flags.FLAGS[name].parser = ConfigFileParser()
    return holder
