"""The timesteps (one example each) at which test_model_parity and test_model_precision run the 2-block DiTs at
256 px (latent 32). Both modules use the same t values per size, so their JAX forwards are the same program
(dit_jax's compile options, the same shapes) and the second module loads it from the session's XLA
compilation cache (tests/conftest.py) instead of compiling it again.
"""
SMALL_T = (0, 1, 3, 5, 10)
LARGE_T = (500, 750, 977, 999)
DETAILED_SIZES = ("DiT-S/2", "DiT-B/4")  # measured at every SMALL_T + LARGE_T (S/2 in the quick loop, B/4 slow)
EVERY_SIZE_T = (0, 3, 5, 10, 500, 977, 999)  # the other ten sizes


def depth2_t(name: str) -> tuple:
    """The t values of size `name` at 256 px, 2 blocks."""
    return SMALL_T + LARGE_T if name in DETAILED_SIZES else EVERY_SIZE_T
