"""Two real processes on 127.0.0.1 (jax.distributed) read disjoint slices that cover the data set once per
epoch, and their slices are exactly the single-process global batches."""
import json
import sys

import numpy as np
import pytest

from conftest import env_without_xla_flags, run_processes, write_folder
from dit_jax.data import make_source


@pytest.mark.slow
def test_two_real_processes_read_disjoint_shards_covering_each_epoch(tmp_path, rng):
    root = write_folder(tmp_path / "d", rng)  # 12 images
    batch, steps_per_epoch, epochs = 4, 3, 2
    def cmd(port, p):
        return [sys.executable, "-m", "tests.data_multiprocess_worker", str(port), str(p), "2", str(root), str(batch),
                str(steps_per_epoch * epochs), str(tmp_path / f"p{p}.json")]

    for rc, out in run_processes(cmd, 2, timeout=240, env=env_without_xla_flags()):
        assert rc == 0, out[-2000:]
    recs = [json.loads((tmp_path / f"p{p}.json").read_text()) for p in range(2)]
    assert [r["process_index"] for r in recs] == [0, 1] and all(r["process_count"] == 2 for r in recs)
    single = make_source({"name": "folder", "folder": str(root), "image_size": 16, "random_flip": True,
                          "num_workers": 2, "prefetch": 0}, global_batch_size=batch, seed=1)
    for epoch in range(epochs):
        steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        seen = [sum((recs[p]["indices"][s] for s in steps), []) for p in range(2)]
        assert not set(seen[0]) & set(seen[1]), "the two processes read the same example"
        assert sorted(seen[0] + seen[1]) == list(range(12)), "an epoch must cover the data set exactly once"
    arrays = [np.load(tmp_path / f"p{p}.npz") for p in range(2)]
    for s in range(steps_per_epoch * epochs):  # process 0's slice + process 1's slice == the global batch
        assert recs[0]["indices"][s] + recs[1]["indices"][s] == single.order.local_indices(s).tolist()
        want = single.batch(s)
        assert set(want) == {k.rsplit("_", 1)[0] for k in arrays[0].files}
        for key, value in want.items():  # pixel for pixel: a flip on the wrong examples keeps every sum
            np.testing.assert_array_equal(np.concatenate([arrays[p][f"{key}_{s}"] for p in range(2)]),
                                          np.asarray(value), err_msg=f"step {s} {key}")
    single.close()
