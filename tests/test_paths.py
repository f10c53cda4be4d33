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


def test_unknown_scheme_is_named():
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        paths.as_path("ftp://host/x")


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
