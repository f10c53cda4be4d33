"""Atomic writes: nothing half-written at the target, and the temporaries of a killed writer are removed by
the next write to the same target (a `dit-jax-convert` killed with SIGKILL left 149 MB behind before)."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dit_jax.utils.atomic import atomic_dir, atomic_path, remove_stale_temps

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from dit_jax.utils.atomic import atomic_dir
    with atomic_dir(sys.argv[1]) as tmp:
        open(os.path.join(tmp, "big.bin"), "wb").write(b"x" * 100000)
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs
""")


def test_killed_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    out = tmp_path / "model"
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL
    left = [n for n in os.listdir(tmp_path) if n.startswith(".model.")]
    assert len(left) == 1 and not out.exists()  # the kill left its temporary, and nothing at OUT
    with atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "ok"), "w").write("done")
    assert sorted(os.listdir(tmp_path)) == ["model"] and (out / "ok").read_text() == "done"


KILLED_FILE_WRITER = textwrap.dedent("""
    import os, signal, sys
    from dit_jax.utils.atomic import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        open(tmp, "w").write("half of the new")
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs
""")


def test_killed_file_writer_leaves_the_old_file_whole(tmp_path):
    """A writer killed mid-write (atomic_path, behind metrics, configs and images): the file keeps its old
    content, never a half-written new one; the next write removes the dead writer's temporary."""
    target = tmp_path / "metrics.json"
    target.write_text("old, complete")
    r = subprocess.run([sys.executable, "-c", KILLED_FILE_WRITER, str(target)], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert target.read_text() == "old, complete"
    with atomic_path(str(target)) as tmp:
        open(tmp, "w").write("new")
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"] and target.read_text() == "new"


def test_a_live_writers_temporary_is_kept(tmp_path):
    live = tmp_path / f".model.{os.getpid()}-abcd1234.tmp"  # this process is alive
    live.mkdir()
    assert remove_stale_temps(str(tmp_path / "model")) == [] and live.exists()


def test_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(str(tmp_path / "f.png")) as tmp:
            open(tmp, "w").write("partial")
            raise RuntimeError("disk full")
    with pytest.raises(FileExistsError, match="already exists"):
        (tmp_path / "d").mkdir()
        with atomic_dir(str(tmp_path / "d")):
            pass
    assert sorted(os.listdir(tmp_path)) == ["d"]
