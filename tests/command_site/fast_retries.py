"""Storage retries without the long waits, for the tests that make storage fail on purpose: gcsfs waits about
1, 2, 4, 8 and 16 s between the tries of a failing request, dit_jax.checkpoint 2 then 4 s between the tries of
a restore phase. With these every wait is SCALE as long; the number of tries, what is retried and what is
reported stay as they are. Used by sitecustomize.py here (the command lines, DIT_TEST_FAST_RETRIES=1) and by
tests/test_checkpoint_agreement.py (a command's main in the test process). Imports nothing at import time."""
SCALE = 0.05  # of every retry wait


class FastSleepAsyncio:
    """The asyncio module as gcsfs.retry sees it (`gcsfs.retry.asyncio = FastSleepAsyncio()`), with sleeps SCALE
    times as long."""

    def __getattr__(self, name):
        import asyncio

        return getattr(asyncio, name)

    @staticmethod
    async def sleep(seconds, *args, **kwargs):
        import asyncio

        return await asyncio.sleep(seconds * SCALE, *args, **kwargs)
