"""Writes to a bucket (gs:// on the GCS emulator of conftest, real gcsfs): atomic files and folders, a killed
writer, and the metric writer, whose files cannot be appended to on an object store."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2

from conftest import tfrecords
from dit_jax.utils import paths
from dit_jax.utils.atomic import (INCOMPLETE_MARKER, IncompleteOutputError, atomic_dir, atomic_path, check_complete,
                                  check_target, write_text)
from dit_jax.utils.metric_writer import MetricWriter, TensorBoardEvents


def names(folder):
    return sorted(p.name for p in paths.as_path(folder).iterdir())


def events_of(folder):
    """Every TensorBoard event of every event file in folder, files in name order (as TensorBoard reads)."""
    files = sorted(p for p in paths.as_path(folder).iterdir() if p.name.startswith("events.out.tfevents."))
    return files, [event_pb2.Event.FromString(r) for f in files for r in tfrecords(f.read_bytes())]


# ----------------------------------------------------------------------------------------------------
# Atomic files and folders
# ----------------------------------------------------------------------------------------------------
def test_file_appears_only_when_complete(gcs_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of a bucket write may land in the current folder
    target = f"{gcs_dir}/sub/a.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            open(tmp, "w").write("partial")
            raise RuntimeError("disk full")
    assert not paths.as_path(target).exists()
    with atomic_path(target) as tmp:
        open(tmp, "w").write('{"ok": 1}')
    assert json.loads(paths.as_path(target).read_text()) == {"ok": 1}
    write_text(f"{gcs_dir}/b.txt", "hello")
    assert paths.as_path(f"{gcs_dir}/b.txt").read_text() == "hello"
    assert names(gcs_dir) == ["b.txt", "sub"] and os.listdir(tmp_path) == []


def test_folder_is_marked_until_done_and_removed_on_error(gcs_dir):
    out = f"{gcs_dir}/model"
    with atomic_dir(out) as d:
        assert os.fspath(d) == out and names(out) == [INCOMPLETE_MARKER]  # the marker is the first object
        write_text(d / "config.json", "{}")
        check_target(f"{gcs_dir}/elsewhere", overwrite=False)
        with pytest.raises(IncompleteOutputError, match="incomplete, its write was interrupted"):
            check_complete(out)  # a reader during the write sees an incomplete folder
    assert names(out) == ["config.json"]
    check_complete(out)
    with pytest.raises(FileExistsError, match="already exists; remove it"):
        check_target(out, overwrite=False)
    with pytest.raises(ValueError, match="boom"):
        with atomic_dir(out, overwrite=True) as d:  # the old folder is deleted first: a bucket cannot swap
            write_text(d / "half.bin", "x")
            raise ValueError("boom")
    assert not paths.as_path(out).exists()


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from dit_jax.utils.atomic import atomic_dir, atomic_path, write_text
    with atomic_path(sys.argv[1] + "/file.bin") as tmp:
        open(tmp, "wb").write(b"x" * 100000)
        with atomic_dir(sys.argv[1] + "/folder") as d:
            write_text(d / "part.bin", "x")
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs
""")


def test_killed_writer_leaves_no_file_and_a_folder_marked_incomplete(gcs_dir):
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, gcs_dir], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert names(gcs_dir) == ["folder"]  # file.bin was never uploaded
    assert names(f"{gcs_dir}/folder") == [INCOMPLETE_MARKER, "part.bin"]
    with pytest.raises(IncompleteOutputError, match=f"{gcs_dir}/folder: incomplete"):
        check_complete(f"{gcs_dir}/folder")
    with pytest.raises(FileExistsError, match=r"already exists \(an interrupted write\)"):
        check_target(f"{gcs_dir}/folder", overwrite=False)
    with atomic_dir(f"{gcs_dir}/folder", overwrite=True) as d:
        write_text(d / "whole.bin", "y")
    assert names(f"{gcs_dir}/folder") == ["whole.bin"]


# ----------------------------------------------------------------------------------------------------
# Metrics: JSON lines and TensorBoard events on a bucket
# ----------------------------------------------------------------------------------------------------
def test_metrics_upload_at_the_flush_cadence_and_on_close(gcs_dir):
    jsonl = paths.as_path(f"{gcs_dir}/metrics.jsonl")
    w = MetricWriter(gcs_dir, tensorboard=True, flush_secs=3600)
    w.scalars(1, {"loss": 0.5})  # the first record of a file is uploaded at once (no upload before it)
    w.scalars(2, {"loss": 0.25})
    w.image(2, "samples/ema", np.zeros((4, 6, 3), np.uint8), f"{gcs_dir}/samples/step_2.png")
    assert [json.loads(l)["step"] for l in jsonl.read_text().splitlines()] == [1]  # step 2 waits for the cadence
    assert paths.as_path(f"{gcs_dir}/samples/step_2.png").read_bytes()[:4] == b"\x89PNG"  # images: at once
    w.close()
    assert [json.loads(l) for l in jsonl.read_text().splitlines()] == [{"step": 1, "loss": 0.5},
                                                                      {"step": 2, "loss": 0.25}]
    files, events = events_of(f"{gcs_dir}/tb")
    assert len(files) == 1 and events[0].file_version == "brain.Event:2"
    assert [(e.step, v.tag) for e in events[1:] for v in e.summary.value] == [
        (1, "loss"), (2, "loss"), (2, "samples/ema")]
    assert events[2].summary.value[0].simple_value == 0.25

    # A resumed run continues metrics.jsonl (a bucket object cannot be appended: it is rewritten whole).
    w2 = MetricWriter(gcs_dir, tensorboard=False, flush_secs=0)
    w2.scalars(3, {"loss": 0.125})
    assert [json.loads(l)["step"] for l in jsonl.read_text().splitlines()] == [1, 2, 3]  # flush_secs=0: at once
    w2.close()


def test_event_files_rotate_and_read_back_in_order(gcs_dir):
    tb = TensorBoardEvents(paths.as_path(gcs_dir), flush_secs=0, rotate_bytes=150)
    for step in range(12):
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="loss", simple_value=float(step))])
        tb.write(event_pb2.Event(wall_time=1.0, step=step, summary=summary))
    tb.close()
    files, events = events_of(gcs_dir)
    assert len(files) > 2  # rotated: each upload rewrites at most one small file
    assert [e.step for e in events if e.summary.value] == list(range(12))  # name order is write order
    assert all(event_pb2.Event.FromString(tfrecords(f.read_bytes())[0]).file_version == "brain.Event:2"
               for f in files)  # each file starts with its header
