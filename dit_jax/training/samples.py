"""Sample grids during training: the EMA model sampled with DDIM across the mesh, one row per class,
written to workdir/samples/step_<step>.png and TensorBoard. Latent samples are decoded with the VAE when
it can be loaded (otherwise their first three channels are shown).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dit_jax import sharding as shd
from dit_jax.training import build
from dit_jax.guidance import dit_model_fn
from dit_jax.model import DiT
from dit_jax.utils.images import make_grid, to_uint8
from dit_jax.utils import paths, xla_cpu
from dit_jax.utils.metric_writer import MetricWriter
from dit_jax.vae import decode_latents

log = logging.getLogger("dit_jax.train")
Sampler = Callable[[Any, np.ndarray, np.ndarray], np.ndarray]
VaeLoader = Callable[[str], Tuple[Any, Any]]  # config.data.vae -> (AutoencoderKL, params)


def make_sampler(config, model: DiT, mesh: Mesh, respacing: Optional[str] = None,
                 cfg_scale: Optional[float] = None) -> Sampler:
    """sample(ema_params, labels (N,), x_T (N,S,S,C)) -> x_0 (N,S,S,C) NumPy, replicated on all processes.

    DDIM with config.sample's respacing, guidance and clipping unless `respacing` / `cfg_scale` are given."""
    d = build.build_diffusion(config, respacing or config.sample.respacing)
    gc = config.sample.guidance_channels
    scale = float(config.sample.cfg_scale if cfg_scale is None else cfg_scale)

    @functools.partial(jax.jit, out_shardings=shd.replicated(mesh),
                       compiler_options=xla_cpu.compiler_options(mesh.devices.flat[0].platform))
    def run(params, labels, noise):
        # batch_chunk 0: the batch may be sharded over the mesh
        fn = dit_model_fn(model, params, labels, scale, gc, batch_chunk=0)
        return d.ddim_sample_loop(fn, noise.shape, noise=noise, eta=0.0,
                                  clip_denoised=bool(config.sample.clip_denoised))

    def sample(params, labels, noise):
        with mesh:
            return np.asarray(jax.device_get(run(params, jnp.asarray(labels), jnp.asarray(noise))))

    return sample


def grid_labels_noise(config, model: DiT) -> Tuple[np.ndarray, np.ndarray]:
    """Labels (rows = config.sample.classes, per_class each) and the fixed x_T of the grid."""
    classes = np.asarray(config.sample.classes, np.int32)
    labels = np.repeat(classes, int(config.sample.per_class))  # row r of the grid = classes[r]
    s, c = model.input_size, model.in_channels
    noise = np.random.default_rng(int(config.sample.seed)).standard_normal((len(labels), s, s, c)).astype(np.float32)
    return labels, noise


class SampleDecoder:
    """Samples -> displayable images in [-1, 1]: pixels as they are, latents through the VAE (loaded once)."""

    def __init__(self, config, load_vae: VaeLoader):
        self.config, self.load_vae = config, load_vae
        self._vae: Optional[Tuple[Any, Any]] = None
        self._failed = False

    def __call__(self, x0: np.ndarray) -> np.ndarray:
        if build.batch_kind(self.config) == "x":  # a pixel-space model: its samples are images
            return x0
        if self._vae is None and not self._failed:
            try:
                self._vae = self.load_vae(self.config.data.vae)
            except (OSError, ValueError, RuntimeError) as e:  # e.g. no weights offline: a preview still helps
                log.warning("could not load VAE %r to decode sample grids (%s); showing latent channels 0-2",
                            self.config.data.vae, " ".join(str(e).split()))
                self._failed = True
        if self._vae is None:
            return np.clip(x0[..., :3] / 4.0, -1, 1)  # a picture of the latents, not an image
        vae, params = self._vae
        return np.asarray(decode_latents(vae, params, jnp.asarray(x0)))


def write_samples(config, model: DiT, sampler: Sampler, decode: SampleDecoder, ema_params, step: int,
                  workdir: paths.PathLike, writer: Optional[MetricWriter],
                  between: Optional[Callable[[], None]] = None) -> np.ndarray:
    """EMA sample grid (rows = config.sample.classes) -> workdir/samples/step_<step>.png and TensorBoard.

    Sampled in calls of at most config.eval.batch_size samples; `between()` runs before each call and may
    raise to stop (the train loop's preemption.Watcher.raise_if_stopping: a stop does not wait for the grid)."""
    labels, noise = grid_labels_noise(config, model)
    chunk = max(1, int(config.eval.batch_size))
    parts = []
    for start in range(0, len(labels), chunk):
        if between is not None:
            between()
        parts.append(sampler(ema_params, labels[start:start + chunk], noise[start:start + chunk]))
    images = decode(np.concatenate(parts))  # (N, H, W, C) in [-1, 1]
    if writer is not None:
        rows = len(config.sample.classes)
        # grey separators: samples are often black at the edges, so black lines would merge the cells
        grid = make_grid(to_uint8(images), nrow=-(-len(images) // rows), pad_value=128,
                         upscale=max(1, 64 // images.shape[1]))
        writer.image(step, "samples/ema", grid, paths.as_path(workdir) / "samples" / f"step_{step:08d}.png")
    return images
