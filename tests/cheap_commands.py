"""What keeps the command lines that tests start cheap (a module's fixture: `with cheap_commands.settings()`).

For the processes started inside it (they inherit the variables):
- tests/command_site on PYTHONPATH: its sitecustomize makes every process of a multi-process command write
  the XLA cache (JAX writes from process 0 only, and process 1's keys differ: it compiled its training step
  again at every start) and collects garbage less often (see there);
- every compiled program cached: tests/conftest.py writes only programs that took 0.5 s to compile, and a
  run compiles dozens of small ones besides its training step (orbax's slice of each array at a save, the
  checkpoint checksums, the state initialisation), ~40 ms each, ~2 CPU seconds a process start;
- one OpenBLAS thread: its threads wait for work by spinning, so on 2 shared cores a Fréchet distance of
  2048-d statistics (`dit-jax-eval`) took 7 CPU seconds instead of 2.2, and no less wall time.
In this process: every compiled program cached and the same GC threshold.
What a command computes is unchanged: a cache entry is the program the compiler returned for that key, and
the thread count only changes how a BLAS call is split up.
"""
import contextlib
import gc
import os

SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "command_site")
ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "OPENBLAS_NUM_THREADS": "1"}
GC_THRESHOLD = (10_000, 10, 10)  # as tests/command_site/sitecustomize.py


@contextlib.contextmanager
def settings(**extra_env):
    """ENV (and `extra_env`) plus tests/command_site first on PYTHONPATH for the processes started meanwhile;
    here every program cached and GC_THRESHOLD. Everything is restored afterwards."""
    import jax

    env = dict(ENV, **extra_env, PYTHONPATH=os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH")) if p))
    saved_env = {k: os.environ.get(k) for k in env}
    saved_min, saved_gc = jax.config.jax_persistent_cache_min_compile_time_secs, gc.get_threshold()
    os.environ.update(env)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    gc.set_threshold(*GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*saved_gc)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved_min)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
