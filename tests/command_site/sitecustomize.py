"""Start-up of the command lines tests start with this folder on PYTHONPATH (tests/cheap_commands.py puts it
there). Nothing is imported early: a worker still sets XLA_FLAGS before it loads jax; modules are patched
when they are first imported.

Always:
- a larger first GC generation (10000 allocations instead of 700): tracing JAX programs allocates millions of
  objects, and with Python's default a fifth of a command's CPU went to collecting a heap of long-lived
  module objects again and again (a 2-process training start: 14 -> 12 CPU seconds).
- every process writes what it compiles to the XLA cache. JAX writes cache entries from process 0 only
  (jax._src.compiler._cache_write: contended writes to a shared bucket), and on CPU the key of process 1
  differs from process 0's (it hashes the topology as that process sees it): process 1 of a 2-process
  command never found an entry and compiled its training step again at every start (~4 CPU seconds). The
  tests' cache is a local folder and the processes write different keys.
With DIT_TEST_FAST_RETRIES=1 (tests/test_checkpoint_agreement.py), storage retries without the long waits:
  gcsfs waits about 1, 2, 4, 8 and 16 s between the six tries of a failing request, and dit_jax.checkpoint
  2 then 4 s between its own tries of a restore phase: a test that makes storage fail on purpose spent
  almost all of its two minutes asleep. Here every such wait is 20 times shorter (fast_retries.py, which
  that module also uses in its own process); the number of tries, what is retried and what the run reports
  stay as they are.
What a command computes is unchanged: a cache entry is the program the compiler returned for that key.
"""
import gc
import importlib.machinery
import os
import sys

from fast_retries import SCALE, FastSleepAsyncio  # this folder is on the path; it imports nothing

gc.set_threshold(10_000, 10, 10)

FAST_RETRIES = os.environ.get("DIT_TEST_FAST_RETRIES") == "1"


def _cache_from_every_process(compiler) -> None:
    original = compiler._cache_write

    def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
        from jax._src import compilation_cache, config, distributed

        if distributed.global_state.process_id == 0 or host_callbacks:
            return original(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
        if compile_time_secs >= config.persistent_cache_min_compile_time_secs.value:
            compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                      int(compile_time_secs))
        return None

    compiler._cache_write = cache_write


def _patch(name, module):
    if name == "jax._src.compiler":
        _cache_from_every_process(module)
    elif name == "gcsfs.retry":
        module.asyncio = FastSleepAsyncio()
    elif name == "dit_jax.checkpoint":
        module.BACKOFF_S *= SCALE


PATCHED = ("jax._src.compiler",) + (("gcsfs.retry", "dit_jax.checkpoint") if FAST_RETRIES else ())


class _PatchingLoader:
    def __init__(self, loader, name):
        self.loader, self.name = loader, name

    def __getattr__(self, attr):
        return getattr(self.loader, attr)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _patch(self.name, module)


class _PatchingFinder(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        spec = super().find_spec(name, path, target)
        if spec is not None and spec.loader is not None and name in PATCHED:
            spec.loader = _PatchingLoader(spec.loader, name)
        return spec


sys.meta_path[:] = [_PatchingFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
