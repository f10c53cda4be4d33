"""One process of a real 2-process data run on 127.0.0.1 (used by tests/test_data_multiprocess.py).

    python -m tests.data_multiprocess_worker PORT PROCESS_ID NUM_PROCESSES FOLDER BATCH STEPS OUT_JSON
Joins jax.distributed, builds the folder source for jax.process_index()/process_count(), reads STEPS steps
and writes which examples it read to OUT_JSON and every local batch, array by array, to OUT_JSON's .npz.
"""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dit_jax.data import make_source  # noqa: E402


def main():
    port, pid, nproc, folder, batch, steps, out = sys.argv[1:8]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(nproc), process_id=int(pid))

    cfg = {"name": "folder", "folder": folder, "image_size": 16, "random_flip": True, "num_workers": 2, "prefetch": 0}
    src = make_source(cfg, global_batch_size=int(batch), process_index=jax.process_index(),
                      process_count=jax.process_count(), seed=1)
    record = {"process_index": jax.process_index(), "process_count": jax.process_count(), "indices": []}
    arrays = {}  # "<key>_<step>" -> this process's slice of the batch
    for step in range(int(steps)):
        record["indices"].append(src.order.local_indices(step).tolist())
        for key, value in src.batch(step).items():
            arrays[f"{key}_{step}"] = np.asarray(value)
    src.close()
    np.savez(os.path.splitext(out)[0] + ".npz", **arrays)
    with open(out, "w") as f:
        json.dump(record, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
