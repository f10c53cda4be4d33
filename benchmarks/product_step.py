"""The training step the benchmarks time: the one `dit-jax-train` runs, built the same way.

    cfg = bench_config("DiT-XL/2", 256, batch=256, dtype="bfloat16")
    step = ProductStep(cfg)                  # train.setup -> train.jit_train_step (shardings, donation)
    compiled = step.compile()                # from abstract shapes: memory_analysis() before any allocation
    step.init_state(params)                  # optional release-layout params (benchmarks.common.make_pair)
    loss = step()                            # one optimizer step on a fixed batch of latents

The config is configs/default.py's (the paper's recipe: AdamW lr 1e-4 without weight decay, EMA 0.9999,
class dropout 0.1, learned sigma) with the benchmark's size, batch, dtype, remat and attention; the batch is
pre-extracted latents (`data.name="latents"`), so the step samples the posterior, draws t and the noise,
runs the diffusion loss, the backward, AdamW and the EMA exactly as training does.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import sharding as shd
from dit_jax import train
from dit_jax.training.state import TrainState, init_state, with_shardings


def bench_config(model: str, image_size: int, batch: int, depth: Optional[int] = None, dtype: str = "float32",
                 remat: bool = False, attention_impl: str = "auto", num_devices: Optional[int] = 1):
    """configs/default.py for `model` ("DiT-XL/2") at `image_size` px with a latents batch of `batch`."""
    # ml_collections: the GPU machine has it only once benchmarks/gpu.sh installed it, so not at import time
    from dit_jax.cli.config_file import load_config

    c = load_config(f"default:{model[len('DiT-'):]}")  # as dit-jax-train --config default:XL/2 reads it
    c.model.input_size = image_size // 8
    c.data.image_size = image_size
    if depth is not None:
        c.model.depth = depth
    c.model.dtype, c.model.remat, c.model.attention_impl = dtype, bool(remat), attention_impl
    c.global_batch_size = int(batch)
    c.data.name = "latents"
    c.mesh.num_devices = num_devices
    c.sample.every_steps = c.eval.every_steps = c.checkpoint.every_steps = 0
    return c


class ProductStep:
    """dit-jax-train's jitted step for `config`, with its own state and a fixed batch on the run's mesh.

    model_transform: applied to the model `train.setup` built (benchmark variants: a different attention,
    unrolled blocks, precise CPU dots); everything else is the product's."""

    def __init__(self, config, model_transform: Optional[Callable] = None, seed: int = 0):
        s = train.setup(config)
        if model_transform is not None:
            s = dataclasses.replace(s, model=model_transform(s.model))
        self.config, self.setup = config, s
        self.jitted = train.jit_train_step(config, s)
        self.rng = jax.random.PRNGKey(seed)
        self.batch = _latent_batch(config, s, seed)
        self.state: Optional[TrainState] = None
        self.compiled = None

    @property
    def model(self):
        return self.setup.model

    def abstract_args(self):
        return with_shardings(self.setup.abstract_state, self.setup.state_shardings), self.batch, self.rng, None

    def lower(self):
        with self.setup.mesh:  # as the training loop calls it ("auto" attention reads the mesh's platform)
            return self.jitted.lower(*self.abstract_args())

    def compile(self, compiler_options: Optional[dict] = None):
        """Compile from abstract shapes (nothing allocated); `compiler_options` go on top of the product's."""
        self.compiled = self.lower().compile(compiler_options)
        return self.compiled

    def init_state(self, params=None) -> None:
        """A fresh state as training makes it, or one holding `params` (EMA = params, fresh AdamW moments)."""
        s = self.setup
        if params is None:
            self.state = init_state(s.model, s.tx, self.rng, s.state_shardings)
            return

        @functools.partial(jax.jit, out_shardings=s.state_shardings)
        def from_params(p):
            p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)
            return TrainState(step=jnp.zeros((), jnp.int32), params=p,
                              ema_params=jax.tree_util.tree_map(jnp.copy, p), opt_state=s.tx.init(p))

        self.state = from_params(params)

    def __call__(self, compiled=None):
        """One step (the old state is donated) with `compiled` (default: self.compile()'s program, e.g. another
        compilation of the same step); -> the step's mean loss (a device scalar)."""
        if compiled is None:
            compiled = self.compiled if self.compiled is not None else self.compile()
        if self.state is None:
            self.init_state()
        self.state, metrics = compiled(self.state, self.batch, self.rng, None)
        return metrics["loss"]


def _latent_batch(config, s, seed: int):
    """A global batch of VAE posteriors (mean, std) and labels, sharded over the batch axes."""
    b, m = int(config.global_batch_size), s.model
    rs = np.random.RandomState(seed)
    local = {"latent_mean": rs.randn(b, m.input_size, m.input_size, m.in_channels).astype(np.float32) * 5.0,
             "latent_std": np.full((b, m.input_size, m.input_size, m.in_channels), 0.1, np.float32),
             "y": rs.randint(0, m.num_classes, size=b).astype(np.int32)}
    return shd.global_batch_from_local(local, s.mesh, b)
