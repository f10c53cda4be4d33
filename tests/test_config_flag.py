"""`--config` of the installed commands, run from a directory outside the checkout: the shipped configs by name
(`digits`, `default:B/2`) and by the documented path (`configs/digits.py`, resolved to the installed file when
the working directory has none), and one-line errors (exit 1) naming the file for every broken config file.

dit-jax-train's training run and dit-jax-extract-latents' shipped config run as a user runs them (`run`: the
installed script in a subprocess); the other cases go through the same script's main(argv) in this process
(`call`, tests/cli_inprocess.py: the same exit code and stderr, without ~1.5 CPU-s of imports per case), from
the same directory.
"""
import os
import subprocess
import sys

import pytest

from cli_inprocess import run_main
from conftest import TINY_FLAGS
from dit_jax.cli.config_file import ConfigFileError, load_config

BIN = os.path.dirname(sys.executable)
# conftest's tiny model on one of the test process's devices: the program of the other tiny 1-device runs
TINY = [*TINY_FLAGS, "--config.checkpoint.async_save=False", "--config.mesh.num_devices=1"]


def run(script, *args, cwd):
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([os.path.join(BIN, script), *map(str, args)], capture_output=True, text=True, env=e,
                          cwd=cwd, timeout=300)


def call(script, *args, cwd):
    """`script ARGS` through its main() in this process, from `cwd`."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        return run_main(script, *args)
    finally:
        os.chdir(here)


def error_line(r, code=1) -> str:
    errors = [l for l in r.stderr.strip().splitlines() if ": error: " in l]
    assert r.returncode == code and len(errors) == 1, (r.returncode, r.stderr[-3000:])
    assert r.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


def test_shipped_config_by_name_trains_from_any_directory(tmp_path):
    r = run("dit-jax-train", "--config", "digits", "--workdir", tmp_path / "w", *TINY, "--config.num_steps=1",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "w" / "config.txt").exists()


@pytest.mark.parametrize("spec", ["digits", "digits.py", "configs/digits.py", "default:B/2", "configs/default.py:S/8,512"])
def test_shipped_config_loads_from_any_directory(tmp_path, spec):
    """num_steps=0 is rejected after the config loaded and took the override: the error names the field, so
    the config file itself was found and read."""
    r = call("dit-jax-train", "--config", spec, "--workdir", tmp_path / "w", "--config.num_steps=0", cwd=tmp_path)
    assert error_line(r).endswith("config.num_steps=0: must be >= 1"), r.stderr[-3000:]


def test_a_file_in_the_working_directory_wins(tmp_path):
    """configs/digits.py that exists here is the file read, not the shipped one."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "digits.py").write_text("def get_config():\n    raise RuntimeError('the local one')\n")
    line = error_line(call("dit-jax-train", "--config", "configs/digits.py", "--workdir", tmp_path / "w",
                           cwd=tmp_path))
    assert line == ("dit-jax-train: error: --config configs/digits.py: get_config() of configs/digits.py raised "
                    "RuntimeError: the local one")


BROKEN = {  # name: (file text or None for no file, the --config value, what the one line must say)
    "missing": (None, "nope.py", "--config nope.py: no such file (relative to "),
    "missing_shipped_like": (None, "configs/nope.py", "--config configs/nope.py: no such file"),
    "syntax_error": ("def get_config(:\n", "c.py", "--config c.py: syntax error (line 1)"),
    "import_error": ("import no_such_module_here\n", "c.py",
                     "--config c.py: running the file raised ModuleNotFoundError: No module named 'no_such_module_here'"),
    "no_get_config": ("x = 1\n", "c.py", "--config c.py: defines no get_config() function"),
    "variant_not_taken": ("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict()\n",
                          "c.py:B/2", "--config c.py:B/2: get_config() of c.py takes no variant; drop ':B/2'"),
    "variant_needed": ("def get_config(v):\n    pass\n", "c.py", "--config c.py: get_config() needs a variant"),
    "not_a_config": ("def get_config():\n    return {'a': 1}\n", "c.py",
                     "--config c.py: get_config() returned dict, expected an ml_collections.ConfigDict"),
    "bad_shipped_variant": (None, "default:XL/2,300",
                            "raised ValueError: config variant 'XL/2,300': resolution must be one of (256, 512)"),
    "directory": (None, ".", "--config .: is a directory"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_config_file_is_named(tmp_path, monkeypatch, case):
    """The loader's message for every case (in this process: starting the command costs seconds each)."""
    text, spec, needle = BROKEN[case]
    if text is not None:
        (tmp_path / "c.py").write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigFileError) as e:
        load_config(spec)
    assert str(e.value).startswith("--config ") and needle in str(e.value) and "\n" not in str(e.value), e.value


@pytest.mark.parametrize("case", ["missing", "syntax_error", "variant_not_taken", "bad_shipped_variant"])
def test_the_command_prints_one_line_and_exits_1(tmp_path, case):
    text, spec, needle = BROKEN[case]
    if text is not None:
        (tmp_path / "c.py").write_text(text)
    line = error_line(call("dit-jax-train", "--config", spec, "--workdir", tmp_path / "w", cwd=tmp_path))
    assert line.startswith("dit-jax-train: error: --config ") and needle in line, line
    assert not (tmp_path / "w").exists()


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "c.py").write_text("def get_config(:\n")
    r = call("dit-jax-train", "--config", "c.py", "--workdir", tmp_path / "w", "--debug", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr and "SyntaxError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("dit-jax-train: error: --config c.py: syntax error")


def test_extract_latents_reads_shipped_configs_and_reports_broken_ones(tmp_path):
    """The other command with --config: a shipped name works from here (the next error is the data's), a
    broken file is one line naming it."""
    line = error_line(run("dit-jax-extract-latents", "--config", "default:XL/2,512", "--folder", tmp_path / "none",
                          "--out", tmp_path / "lat", cwd=tmp_path))
    assert "--config" not in line and "none" in line, line
    (tmp_path / "c.py").write_text("def get_config(:\n")
    line = error_line(call("dit-jax-extract-latents", "--config", "c.py", "--folder", tmp_path, "--out",
                           tmp_path / "lat", cwd=tmp_path))
    assert "--config c.py: syntax error (line 1)" in line, line
