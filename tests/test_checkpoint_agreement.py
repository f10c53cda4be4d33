"""Checkpoint verdicts on a bucket (gs:// on the GCS emulator, behind tests/faulty_gcs_proxy.py): a value
changed so that the files still decode is found by its checksum and set aside; storage errors are retried
and rename nothing, and when they persist the run stops with one line; with two processes both reach the
same verdict, whichever of them saw the evidence."""
import logging
import re
import uuid

import numpy as np
import pytest
import tensorstore as ts

import cheap_commands
from command_site import fast_retries
from cli_inprocess import run_main
from conftest import tiny_config, train_command
from dit_jax import checkpoint as ckpt_lib, train
from dit_jax.utils import paths
from faulty_gcs_proxy import FaultyProxy
from gcs_emulator import BUCKET
from test_preemption import run_two


@pytest.fixture(scope="module", autouse=True)
def cheap():
    """The command lines of this module wait 20x shorter between storage retries (DIT_TEST_FAST_RETRIES), and
    cache every program they compile, process 1's too (tests/cheap_commands.py, tests/command_site)."""
    with cheap_commands.settings(DIT_TEST_FAST_RETRIES="1"):
        yield


@pytest.fixture(scope="module")
def proxy(gcs_emulator):
    """The emulator's own proxy: its rules fail requests of every process."""
    return gcs_emulator.proxy


@pytest.fixture(scope="module")
def trained(proxy):
    """A run on the bucket with checkpoints at steps 1 and 2 (`tiny`). The verdicts do not depend on the mesh
    that wrote it: the 2-process tests restore it on data=2 x fsdp=4 over both processes."""
    wd = f"gs://{BUCKET}/agreement-{uuid.uuid4().hex[:8]}/trained"
    train.train_and_evaluate(tiny(2), wd)
    return wd


@pytest.fixture
def run(trained, proxy):
    """A copy of `trained` for one test (the proxy's rules are cleared afterwards)."""
    dst = f"{trained.rsplit('/', 1)[0]}/{uuid.uuid4().hex[:8]}"
    fs = ckpt_lib._bucket_fs(paths.as_path(trained))
    src = trained.split("://", 1)[1]
    files = fs.find(src)
    fs.copy([f"gs://{f}" for f in files], [dst + f[len(src):] for f in files])
    yield dst
    proxy.clear()


def names(workdir):
    d = ckpt_lib.checkpoint_dir(workdir)
    ckpt_lib._refresh_listings(d)
    return sorted(p.name for p in d.iterdir())


def tiny(num_steps):
    """The tiny model on one device (the program of the other tiny one-device runs; measured for this 2-step
    run in a fresh process: 9 CPU seconds, 14 on data=2 x fsdp=4), a checkpoint after every step, all kept."""
    c = tiny_config(num_steps=num_steps)
    c.mesh.num_devices = 1
    c.checkpoint.every_steps, c.checkpoint.keep = 1, 5
    return c


@pytest.mark.slow
def test_a_value_changed_so_that_the_files_decode_is_found_by_its_checksum(run, caplog):
    """One element of one stored array is rewritten through tensorstore (valid zarr chunks, a valid OCDBT
    manifest): restoring works, only the checksum can tell. Step 2 is set aside, step 1 resumed."""
    state_dir = f"{run}/checkpoints/2/state/"
    keys = [k.decode() for k in ts.KvStore.open({"driver": "ocdbt", "base": state_dir}).result().list().result()]
    key = sorted(k for k in keys if k.startswith("params.") and k.endswith("/.zarray"))[0][:-len(".zarray")]
    arr = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": state_dir, "path": key}}).result()
    first = tuple(0 for _ in arr.shape)
    arr[first].write(np.asarray(arr[first].read().result()) + 1.0).result()

    with caplog.at_level(logging.INFO, logger="dit_jax"):
        out = train.train_and_evaluate(tiny(3), run)
    text = caplog.text
    assert "resumed from checkpoint step 1" in text, text[-3000:]
    assert re.search(r"checkpoint \S+/checkpoints/2 is damaged \(checksums of 1 arrays differ, e\.g\. "
                     r"\['params'\]", text), text[-3000:]
    moved = [n for n in names(run) if n.startswith("damaged-2-")]
    assert len(moved) == 1 and [n for n in names(run) if n.isdigit()] == ["1", "2", "3"], names(run)
    # The copy is complete (its commit file too, so orbax never takes it for an unfinished save).
    aside = ckpt_lib.checkpoint_dir(run) / moved[0]
    assert (aside / ckpt_lib.COMMIT_FILE).exists() and (aside / "state" / "manifest.ocdbt").exists()
    assert sorted(out.losses) == [2, 3]


@pytest.mark.slow
def test_a_few_failed_reads_are_retried_and_rename_nothing(run, proxy, monkeypatch):
    """14 failed reads of meta (more than gcsfs's own retries absorb: the first try fails, the second
    succeeds) and 3 of the state's manifest (tensorstore retries them itself): the run resumes from step 2,
    nothing is renamed. The command line's main in this process (the retries are the subject, not the
    process; the 2-process tests below start the command), its waits between tries shortened as in the
    command lines of this module: what is retried, how often and what is reported stay as they are."""
    import gcsfs.retry

    monkeypatch.setattr(gcsfs.retry, "asyncio", fast_retries.FastSleepAsyncio())
    monkeypatch.setattr(ckpt_lib, "BACKOFF_S", ckpt_lib.BACKOFF_S * fast_retries.SCALE)
    meta = proxy.fail("GET", r"checkpoints/2/meta/metadata", times=14)
    manifest = proxy.fail("GET", r"checkpoints/2/state/manifest\.ocdbt", times=3)
    r = run_main("dit-jax-train", *train_command(run, "--config.num_steps=3", "--config.mesh.num_devices=1",
                                                 "--config.checkpoint.keep=5")[3:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert proxy.failed[meta] == 14 and proxy.failed[manifest] == 3
    assert re.search(r"checkpoints/2: reading its meta failed \(.*503.*\); try 1 of 3", r.stderr), r.stderr[-3000:]
    assert "resumed from checkpoint step 2" in r.stderr
    assert names(run) == ["1", "2", "3"]


@pytest.mark.slow
def test_storage_that_keeps_failing_on_one_host_stops_both_with_one_line(run, proxy, gcs_emulator, tmp_path):
    """Process 1's storage answers 503 to every read of step 2's meta: both processes retry together, then
    both stop with exit 1 and one line; nothing is renamed."""
    other = FaultyProxy(gcs_emulator.url)
    try:
        other.fail("GET", r"checkpoints/2/meta/metadata", times=10_000)
        results = run_two(run, tmp_path, flags=["--config.num_steps=3", "--config.checkpoint.keep=5"],
                          env={"DIT_TEST_GCS_URL_1": other.url})
    finally:
        other.stop()
    lines = []
    for i, (rc, out) in enumerate(results):
        assert rc == 1, f"process {i} exited {rc}:\n{out[-3000:]}"
        last = [line for line in out.strip().splitlines() if line][-1]
        assert re.fullmatch(rf"dit-jax-train: error: checkpoint {run}/checkpoints/2: reading its meta failed 3 times "
                            r"\(.*\); this is not evidence of damage, so nothing was renamed; rerun when the storage "
                            r"answers", last), last
        lines.append(last)
    assert "failed on process [1]" in lines[0] and "503" in lines[1]
    assert names(run) == ["1", "2"]


@pytest.mark.slow
def test_damage_seen_by_one_host_is_the_verdict_of_both(run, gcs_emulator, tmp_path):
    """Only process 1 finds step 2's state missing (its storage answers 404): both set step 2 aside (process 0
    moves it), both resume from step 1 and finish."""
    other = FaultyProxy(gcs_emulator.url)
    try:
        other.fail("GET", r"checkpoints/2/state/", times=10_000, status=404)
        results = run_two(run, tmp_path, flags=["--config.num_steps=3", "--config.checkpoint.keep=5"],
                          env={"DIT_TEST_GCS_URL_1": other.url})
    finally:
        other.stop()
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{out[-3000:]}"
        assert "resumed from checkpoint step 1" in out, out[-3000:]
    assert "is damaged (it cannot be restored on process [1]); moved to" in results[0][1]
    assert re.search(r"is damaged \(it cannot be restored: .*\); process 0 moves it aside", results[1][1])
    moved = [n for n in names(run) if n.startswith("damaged-2-")]
    assert len(moved) == 1 and [n for n in names(run) if n.isdigit()] == ["1", "3"], names(run)  # every_steps=0


@pytest.mark.parametrize("error,damage", [
    (FileNotFoundError("gs://b/run/checkpoints/2/meta/metadata"), True),
    (ValueError("NOT_FOUND: Error opening \"zarr\" driver: Metadata at \"params.w/.zarray\" does not exist"), True),
    (ValueError("DATA_LOSS: Error reading \"params.w/0.0\": checksum mismatch"), True),
    (ValueError("OUT_OF_RANGE: Requested byte range [0, 3811) is not valid for value of size 100"), True),
    (ValueError("FAILED_PRECONDITION: Error reading: ZSTD_decompressStream() failed: Data corruption detected"), True),
    (ValueError("UNAVAILABLE: Error reading gs://b/run/checkpoints/2/state/manifest.ocdbt: HTTP 503"), False),
    (ValueError("DEADLINE_EXCEEDED: Error reading gs://b/run/checkpoints/2/state/d/ab12"), False),
    (ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB"), False),
    (ValueError("FAILED_PRECONDITION: Generation mismatch"), False),
    (OSError("Forbidden: b/run/checkpoints/2/meta/metadata"), False),
    (TimeoutError(), False),
    (MemoryError(), False),
    (RuntimeError("anything else"), False),
])
def test_what_counts_as_damage(error, damage):
    """The rules of dit_jax/checkpoint.py: missing files and bytes that do not decode are damage; storage
    errors, timeouts, out-of-memory and anything unknown are not (retried, then the run stops)."""
    assert ckpt_lib.is_damage_evidence(error) is damage
    wrapped = Exception("Encountered error while reading array index")
    wrapped.__cause__ = error  # orbax wraps tensorstore's error
    assert ckpt_lib.is_damage_evidence(wrapped) is damage


def test_a_missing_file_that_was_handled_is_no_evidence():
    """An error raised while handling a FileNotFoundError (a client's fallback that then times out) is not
    damage: only what an error was raised *from* counts."""
    try:
        try:
            raise FileNotFoundError("gs://b/run/checkpoints/2/meta/metadata")
        except FileNotFoundError:
            raise TimeoutError("listing gs://b/run/checkpoints/2/meta")
    except TimeoutError as e:
        assert e.__context__ is not None and not ckpt_lib.is_damage_evidence(e)


def test_a_phase_is_tried_three_times_before_the_run_stops(monkeypatch, caplog):
    """One restore phase on one process, no storage (the retries through real storage are the slow tests above):
    two storage errors then the value is a success on the third try; three errors stop the run with one line
    that says nothing was renamed."""
    monkeypatch.setattr(ckpt_lib, "BACKOFF_S", 0.0)
    unavailable = ValueError("UNAVAILABLE: Error reading gs://b/run/checkpoints/2/meta/metadata: HTTP 503")

    def failing(times):
        calls = []

        def fn():
            calls.append(1)
            if len(calls) <= times:
                raise unavailable
            return 7
        return fn, calls

    fn, calls = failing(2)
    with caplog.at_level(logging.WARNING, logger="dit_jax"):
        value, rows = ckpt_lib._together("reading its meta", "it cannot be restored", "w/2", fn, lambda v: [v], 1)
    assert value == 7 and len(calls) == 3 and rows.tolist() == [[7]]
    assert "reading its meta failed (ValueError: UNAVAILABLE" in caplog.text and "try 2 of 3" in caplog.text
    fn, calls = failing(3)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"reading its meta failed 3 times .* nothing was renamed"):
        ckpt_lib._together("reading its meta", "it cannot be restored", "w/2", fn, lambda v: [v], 1)
    assert len(calls) == 3
