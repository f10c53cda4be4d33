"""Two real processes on 127.0.0.1 (jax.distributed) read disjoint slices that cover the data set once per
epoch, and their slices are exactly the single-process global batches."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dit_jax.data import make_source
from test_data_folder import write_folder

WORKER = Path(__file__).with_name("data_multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_real_processes_read_disjoint_shards_covering_each_epoch(tmp_path, rng):
    root = write_folder(tmp_path / "d", rng)  # 12 images
    batch, steps_per_epoch, epochs = 4, 3, 2
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(p), "2", str(root), str(batch),
                               str(steps_per_epoch * epochs), str(tmp_path / f"p{p}.json")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-2000:]
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
