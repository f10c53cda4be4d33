"""Storage retries without the long waits, for command lines started by tests (tests/test_checkpoint_agreement.py).

Put this folder first on PYTHONPATH. gcsfs waits about 1, 2, 4, 8 and 16 s between the six tries of a failing
request, and dit_jax.checkpoint 2 then 4 s between its own tries of a restore phase: a test that makes storage
fail on purpose spent almost all of its two minutes asleep. Here every such wait is 20 times shorter; the number
of tries, what is retried and what the run reports stay as they are. The modules are patched when they are
first imported (nothing is imported early: a worker still sets XLA_FLAGS before jax is loaded).
"""
import asyncio
import importlib.machinery
import sys

SCALE = 0.05


class _FastSleepAsyncio:
    """The asyncio module as gcsfs.retry sees it, with shorter sleeps."""

    def __getattr__(self, name):
        return getattr(asyncio, name)

    @staticmethod
    async def sleep(seconds, *args, **kwargs):
        return await asyncio.sleep(seconds * SCALE, *args, **kwargs)


def _patch(name, module):
    if name == "gcsfs.retry":
        module.asyncio = _FastSleepAsyncio()
    elif name == "dit_jax.checkpoint":
        module.BACKOFF_S *= SCALE


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
        if spec is not None and spec.loader is not None and name in ("gcsfs.retry", "dit_jax.checkpoint"):
            spec.loader = _PatchingLoader(spec.loader, name)
        return spec


sys.meta_path[:] = [_PatchingFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
