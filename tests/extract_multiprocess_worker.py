"""One process of a real 2-process `dit-jax-extract-latents` run on 127.0.0.1 (tests/test_latents_bucket.py).

    python -m tests.extract_multiprocess_worker PORT PROCESS_ID NUM_PROCESSES VAE_PICKLE -- CLI ARGS...
Joins jax.distributed (what --distributed does on a pod, with the address given here), replaces the VAE
download by the test's pickled tiny VAE, and runs the command line's main with CLI ARGS; exits with its status.
"""
import os
import pickle
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from dit_jax.cli import extract_latents as cli  # noqa: E402


def main() -> int:
    port, pid, nproc, vae_pickle = sys.argv[1:5]
    args = sys.argv[sys.argv.index("--") + 1:]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(nproc), process_id=int(pid))
    with open(vae_pickle, "rb") as f:
        vae, params = pickle.load(f)
    cli.vae_weights.load_vae = lambda name, *a, **k: (vae, params)  # no download in tests
    rc = cli.main(args)
    jax.distributed.shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
