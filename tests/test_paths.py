"""dit_jax.utils.paths against a real GCS emulator on 127.0.0.1: the one path type for local and bucket paths."""
import os

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from dit_jax.utils import paths


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = paths.as_path("runs/x")
    assert os.fspath(p) == os.path.join(str(tmp_path), "runs", "x") and not paths.is_url(p)


def test_urls_stay_urls():
    assert os.fspath(paths.as_path("gs://b/run/ck")) == "gs://b/run/ck"
    assert paths.is_url("gs://b/run") and paths.is_url(paths.as_path("gs://b/run"))


def test_unknown_scheme_is_named(capsys):
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        paths.as_path("ftp://host/x")
    from dit_jax.cli import sample_many

    # A command line: one line and exit 1 (a DitJaxError), before any weights are read.
    assert sample_many.main(["--ckpt", "ftp://host/x.pt", "--out-dir", "ftp://host/out"]) == 1
    assert capsys.readouterr().err.strip() == (
        "dit-jax-sample-many: error: ftp://host/x.pt: unsupported URL scheme 'ftp'; use a local path or one of "
        "gs://, s3://, az://, hf://")


def test_files_and_orbax_on_the_emulator(gcs_dir):
    """epath (gcsfs) and orbax (tensorstore) both write to and read from the emulated bucket."""
    root = paths.as_path(gcs_dir)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "sub" / "a.txt").write_text("hello")
    assert (root / "sub" / "a.txt").read_text() == "hello"
    assert [p.name for p in (root / "sub").iterdir()] == ["a.txt"]
    mgr = ocp.CheckpointManager(root / "ck", options=ocp.CheckpointManagerOptions(create=True),
                                item_names=("state",))
    state = {"w": jnp.arange(6.0).reshape(2, 3)}
    mgr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mgr.wait_until_finished()
    assert mgr.all_steps() == [3]
    back = mgr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(state)))["state"]
    assert (back["w"] == state["w"]).all()
    mgr.close()


def test_files_below_lists_the_same_tree_locally_and_on_a_bucket(gcs_dir, tmp_path):
    rel = ["a.png", "a/b.png", "a/c/d.txt", "z.jpg"]  # "a.png" before "a/...": sorted as text, like a listing
    for name in rel:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
        paths.as_path(f"{gcs_dir}/tree/{name}").write_text(name)
    local = [os.path.relpath(os.fspath(p), tmp_path) for p in paths.files_below(tmp_path)]
    bucket = [os.fspath(p)[len(gcs_dir) + len("/tree/"):] for p in paths.files_below(f"{gcs_dir}/tree")]
    assert local == bucket == rel
    assert paths.is_file(f"{gcs_dir}/tree/a.png") and not paths.is_file(f"{gcs_dir}/tree/a")
    assert not paths.is_file(f"{gcs_dir}/tree/missing.png")
    assert paths.join("runs/x", "a", "b") == os.path.join("runs/x", "a", "b")  # the user's form, not absolute
    assert paths.join("gs://b/run/", "a") == "gs://b/run/a" and paths.bucket_of("gs://b/run/a") == "gs://b"


def test_a_missing_bucket_is_named_before_any_work(gcs_emulator, capsys):
    from dit_jax.cli.common import check_writable_dir, check_writable_file
    from dit_jax.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="--out-dir gs://no-such-bucket/x: bucket gs://no-such-bucket does not "
                                          "exist"):
        check_writable_dir("gs://no-such-bucket/x", "--out-dir")
    check_writable_dir("gs://bkt/new/folder", "--out-dir")  # an existing bucket: folders need no creating
    paths.as_path("gs://bkt/a_file").write_text("x")
    with pytest.raises(ConfigError, match="--npz gs://bkt/a_file/x.npz: gs://bkt/a_file is a file, not a folder"):
        check_writable_file("gs://bkt/a_file/x.npz", "--npz")
