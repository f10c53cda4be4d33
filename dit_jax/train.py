"""Sharded DiT training: mesh, train state, one jitted train_step, orbax checkpoints, logging, samples.

    from dit_jax import train
    train.train_and_evaluate(config, workdir)   # config: configs/*.py get_config()

Sections: (1) build and validate everything from the config (errors before any compute), (2) the pure
train_step(state, batch, rng, vae_params), (3) the loop: data -> step -> logs / samples / checkpoints.
The state is a dict {"step", "params", "ema_params", "opt_state"}; per-step randomness is
fold_in(PRNGKey(seed), step), and the data of step s is source.batch(s), so a resumed run is identical
to an uninterrupted one.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dit_jax import checkpoint as ckpt_lib
from dit_jax import mesh_plan
from dit_jax import preemption
from dit_jax import sharding as shd
from dit_jax.topology import device_hbm_bytes
from dit_jax.model import DiT, get_model

log = logging.getLogger("dit_jax.train")

PIXEL_SOURCES = ("digits",)  # data sources whose "x" is pixels (no VAE anywhere)


class ConfigError(ValueError):
    pass


class NonFiniteLossError(FloatingPointError):
    pass


# ====================================================================================================
# (1) Building blocks
# ====================================================================================================
def build_model(config) -> DiT:
    m = config.model
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if m.dtype not in dtypes:
        raise ConfigError(f"config.model.dtype={m.dtype!r}; expected one of {sorted(dtypes)}")
    kwargs = dict(input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                  class_dropout_prob=m.class_dropout_prob, learn_sigma=m.learn_sigma, dtype=dtypes[m.dtype],
                  remat=m.remat, attention_impl=m.attention_impl or None)
    if m.depth:
        kwargs["depth"] = m.depth
    try:
        model = get_model(m.name, **kwargs)
    except ValueError as e:
        raise ConfigError(f"config.model.name: {e}") from None
    if m.hidden_size or m.num_heads:  # a non-standard width: same patch size and depth, new width/heads
        hidden, heads = m.hidden_size or model.hidden_size, m.num_heads or model.num_heads
        if hidden % heads:
            raise ConfigError(f"config.model.hidden_size={hidden} is not divisible by num_heads={heads}")
        model = model.clone(hidden_size=hidden, num_heads=heads)
    if m.input_size % model.patch_size:
        raise ConfigError(f"config.model.input_size={m.input_size} is not divisible by the patch size "
                          f"{model.patch_size} of {m.name}")
    return model


def torch_config(model: DiT) -> Dict[str, Any]:
    """The DiT keyword arguments that convert.flax_to_torch / convert/torch_dit.DiT need."""
    return dict(input_size=model.input_size, patch_size=model.patch_size, in_channels=model.in_channels,
                hidden_size=model.hidden_size, depth=model.depth, num_heads=model.num_heads,
                mlp_ratio=model.mlp_ratio, class_dropout_prob=model.class_dropout_prob,
                num_classes=model.num_classes, learn_sigma=model.learn_sigma)


def build_diffusion(config, respacing: str = ""):
    from dit_jax.diffusion import create_diffusion

    return create_diffusion(respacing, noise_schedule=config.diffusion.noise_schedule,
                            learn_sigma=config.model.learn_sigma, diffusion_steps=config.diffusion.steps)


def lr_schedule(config) -> optax.Schedule:
    o = config.optim
    if o.warmup_steps > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)],
                                    [o.warmup_steps])
    return optax.constant_schedule(o.lr)


def build_optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    tx = optax.adamw(lr_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if o.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    return tx


def validate_batch_config(config, mesh, process_count: Optional[int] = None) -> Tuple[int, int]:
    """-> (per-process batch, micro-batch). Errors name the numbers that do not divide."""
    b, accum = int(config.global_batch_size), int(config.grad_accum_steps)
    procs = jax.process_count() if process_count is None else int(process_count)
    dp = shd.data_parallel_size(mesh)
    if accum < 1:
        raise ConfigError(f"config.grad_accum_steps={accum} must be >= 1")
    if b % accum:
        raise ConfigError(f"config.global_batch_size={b} is not divisible by config.grad_accum_steps={accum}")
    if (b // accum) % dp:
        raise ConfigError(f"micro-batch {b // accum} (config.global_batch_size={b} / grad_accum_steps={accum}) "
                          f"is not divisible by the {dp} data-parallel devices (mesh data x fsdp = "
                          f"{shd.axis_size(mesh, 'data')} x {shd.axis_size(mesh, 'fsdp')})")
    if b % procs:
        raise ConfigError(f"config.global_batch_size={b} is not divisible by the {procs} processes")
    return b // procs, b // accum


def make_source(config):
    """The data source of the contract (digits here, everything else in dit_jax.data)."""
    seed = int(config.data.shuffle_seed or config.seed)
    kw = dict(global_batch_size=int(config.global_batch_size), process_index=jax.process_index(),
              process_count=jax.process_count(), seed=seed)
    if config.data.name == "digits":
        from dit_jax.data_digits import DigitsSource

        return DigitsSource(config.data, **kw)
    from dit_jax.data import make_source as make_data_source  # lazy: may import tensorflow

    return make_data_source(config.data, **kw)


def config_batch_kind(config) -> str:
    """The batch kind config.data gives ("x" pixels, "latent" posteriors, "image" for the VAE in the step)."""
    if config.data.name in PIXEL_SOURCES:
        return "x"
    if config.data.name == "latents":
        return "latent"
    return "image" if config.data.encode_on_the_fly else "x"


def check_batch(batch: Dict[str, np.ndarray], model: DiT, local_batch: int) -> str:
    """Names the batch kind; errors before compute when shapes disagree with the model."""
    if "y" not in batch:
        raise ConfigError(f"data batch has keys {sorted(batch)}; a 'y' label array is required")
    if len(batch["y"]) != local_batch:
        raise ConfigError(f"data source returned {len(batch['y'])} examples; this process needs {local_batch}")
    s, c = model.input_size, model.in_channels
    if "x" in batch:
        kind, shape, want = "x", batch["x"].shape[1:], (s, s, c)
    elif "latent_mean" in batch:
        kind, shape, want = "latent", batch["latent_mean"].shape[1:], (s, s, c)
    elif "image" in batch:
        kind, shape, want = "image", batch["image"].shape[1:], (8 * s, 8 * s, 3)
    else:
        raise ConfigError(f"data batch has keys {sorted(batch)}; expected 'x', 'latent_mean'/'latent_std' or 'image'")
    if tuple(shape) != want:
        raise ConfigError(f"data batch kind {kind!r} has per-example shape {tuple(shape)} but {type(model).__name__} "
                          f"(config.model.input_size={s}, in_channels={c}) needs {want}")
    if kind == "image" and c != 4:
        raise ConfigError(f"image batches are VAE-encoded to 4 channels but config.model.in_channels={c}")
    return kind


def state_shardings(abstract_state: Dict[str, Any], mesh, config) -> Dict[str, Any]:
    """Shardings of the whole state: params and EMA by the rules; optimizer moments like their parameter."""
    p_sh = shd.param_shardings(abstract_state["params"], mesh, config.sharding)
    by_path = {shd.path_str(p): (s, x.shape) for (p, s), x in zip(
        jax.tree_util.tree_flatten_with_path(p_sh)[0], jax.tree_util.tree_leaves(abstract_state["params"]))}
    rep = shd.replicated(mesh)

    def opt_leaf(path, x):
        ps = shd.path_str(path)
        for name, (s, shape) in by_path.items():
            if (ps == name or ps.endswith("/" + name)) and tuple(x.shape) == tuple(shape):
                return s
        return rep

    o_sh = jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt_state"])
    return {"step": rep, "params": p_sh, "ema_params": p_sh, "opt_state": o_sh}


# ====================================================================================================
# (2) The train step
# ====================================================================================================
def make_train_step(config, model: DiT, tx: optax.GradientTransformation, diffusion, vae=None) -> Callable:
    accum = int(config.grad_accum_steps)
    decay = float(config.ema_decay)
    scale = float(config.latent_scale)
    schedule = lr_schedule(config)
    num_t = int(diffusion.num_timesteps)

    def model_input(batch, rng, vae_params):
        """Batch of any kind -> diffusion input x_start (n, S, S, C) float32."""
        if "x" in batch:
            return batch["x"].astype(jnp.float32)
        if "latent_mean" in batch:  # pre-extracted posterior: sample it with this step's rng
            eps = jax.random.normal(rng, batch["latent_mean"].shape, jnp.float32)
            return (batch["latent_mean"] + batch["latent_std"] * eps) * scale
        mean, logvar = vae.apply({"params": vae_params}, batch["image"], method=type(vae).encode)
        eps = jax.random.normal(rng, mean.shape, jnp.float32)
        return jax.lax.stop_gradient((mean + jnp.exp(0.5 * logvar) * eps) * scale)

    def loss_fn(params, mb, rng, vae_params):
        r_lat, r_t, r_noise, r_drop = jax.random.split(rng, 4)
        x = model_input(mb, r_lat, vae_params)  # (n, S, S, C)
        n = x.shape[0]
        t = jax.random.randint(r_t, (n,), 0, num_t)
        noise = jax.random.normal(r_noise, x.shape, jnp.float32)
        model_fn = lambda xt, tt: model.apply({"params": params}, xt, tt, mb["y"], train=True,  # noqa: E731
                                              rngs={"dropout": r_drop})
        terms = diffusion.training_losses(model_fn, x, t, noise=noise)
        return jnp.mean(terms["loss"]), {k: jnp.mean(v) for k, v in terms.items()}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, rng, vae_params):
        step_rng = jax.random.fold_in(rng, state["step"])
        params = state["params"]
        if accum == 1:
            (_, terms), grads = grad_fn(params, batch, step_rng, vae_params)
        else:
            # Micro-batch i takes rows i, i+A, i+2A, ... so every device holds an equal share of it.
            mbs = jax.tree_util.tree_map(
                lambda a: a.reshape((a.shape[0] // accum, accum) + a.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, xs):
                g_sum, t_sum = carry
                i, mb = xs
                (_, terms), g = grad_fn(params, mb, jax.random.fold_in(step_rng, i), vae_params)
                return (jax.tree_util.tree_map(jnp.add, g_sum, g), jax.tree_util.tree_map(jnp.add, t_sum, terms)), None

            zeros_g = jax.tree_util.tree_map(jnp.zeros_like, params)
            zeros_t = {k: jnp.zeros((), jnp.float32) for k in ("loss", "mse", "vb")}
            (g_sum, t_sum), _ = jax.lax.scan(body, (zeros_g, zeros_t), (jnp.arange(accum), mbs))
            grads = jax.tree_util.tree_map(lambda g: g / accum, g_sum)
            terms = {k: v / accum for k, v in t_sum.items()}
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema_params"], params)
        new_state = {"step": state["step"] + 1, "params": params, "ema_params": ema, "opt_state": opt_state}
        metrics = dict(terms, grad_norm=optax.global_norm(grads), lr=schedule(state["step"]))
        return new_state, metrics

    train_step.loss_fn = loss_fn  # (params, batch, rng, vae_params) -> (loss, terms): for tests
    return train_step


# ====================================================================================================
# Samples
# ====================================================================================================
def make_sampler(config, model: DiT, mesh) -> Callable[[Any, np.ndarray, np.ndarray], np.ndarray]:
    """sample(ema_params, labels (N,), x_T (N,S,S,C)) -> x_0 (N,S,S,C) NumPy, replicated on all processes."""
    from dit_jax.diffusion import dit_model_fn

    d = build_diffusion(config, config.sample.respacing)
    gc = int(config.sample.guidance_channels) or None

    @functools.partial(jax.jit, out_shardings=shd.replicated(mesh))
    def run(params, labels, noise):
        # batch_chunk 0: the batch may be sharded over the mesh, and these grids are small
        fn = dit_model_fn(model, params, labels, float(config.sample.cfg_scale), gc, batch_chunk=0)
        return d.ddim_sample_loop(fn, noise.shape, noise=noise, eta=0.0,
                                  clip_denoised=bool(config.sample.clip_denoised))

    def sample(params, labels, noise):
        with mesh:
            return np.asarray(jax.device_get(run(params, jnp.asarray(labels), jnp.asarray(noise))))

    return sample


def grid_labels_noise(config, model: DiT) -> Tuple[np.ndarray, np.ndarray]:
    classes = np.asarray(config.sample.classes, np.int32)
    labels = np.repeat(classes, int(config.sample.per_class))  # row r of the grid = classes[r]
    s, c = model.input_size, model.in_channels
    noise = np.random.default_rng(int(config.sample.seed)).standard_normal((len(labels), s, s, c)).astype(np.float32)
    return labels, noise


# ====================================================================================================
# (3) The loop
# ====================================================================================================
def _host_metrics(metrics) -> Dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _check_finite(step: int, m: Dict[str, float], last_good: Optional[int], workdir: str) -> None:
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        where = (f"the last good checkpoint is step {last_good} in {ckpt_lib.checkpoint_dir(workdir)}"
                 if last_good is not None else "no checkpoint was written")
        raise NonFiniteLossError(f"non-finite training loss at step {step} (loss={m['loss']}, "
                                 f"grad_norm={m['grad_norm']}); stopping without saving; {where}. "
                                 f"Lower config.optim.lr, set config.optim.grad_clip, or use float32.")


def export_torch(path: str, model: DiT, ema_params) -> None:
    """EMA weights -> release-format state_dict .pt (loads into convert/torch_dit.DiT with strict=True)."""
    import torch

    import convert

    from jax.experimental import multihost_utils

    host = multihost_utils.process_allgather(ema_params, tiled=True) if jax.process_count() > 1 \
        else jax.device_get(ema_params)
    if jax.process_index() != 0:
        return
    state = convert.flax_to_torch(host, torch_config(model))
    from dit_jax.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    log.info("exported EMA weights to %s", path)


def setup(config, workdir: str, devices=None, process_count: Optional[int] = None) -> Dict[str, Any]:
    """Everything the loop needs, validated before any compute: mesh, model, optimizer, shardings, source.

    devices / process_count: the devices and processes of the run (default: this JAX runtime's);
    `dit-jax-train --compile-only` passes a TPU topology's compile-only devices here."""
    model = build_model(config)
    if config.data.name == "digits" and config.model.in_channels != 1:
        raise ConfigError(f"digits are 1-channel images; config.model.in_channels={config.model.in_channels}")
    tx = build_optimizer(config)
    diffusion = build_diffusion(config)
    abstract_params = jax.eval_shape(lambda r: model.init(r, *_dummy_inputs(model))["params"],
                                     jax.random.PRNGKey(0))
    devices = shd.select_devices(config.mesh, devices, process_count)
    plan = mesh_plan.plan_mesh(config, devices, model, abstract_params, device_hbm_bytes(devices[0])[0],
                               image_batch=config_batch_kind(config) == "image")
    mesh = shd.make_mesh(plan.shape, devices, plan.fsdp_groups)
    local_batch, _ = validate_batch_config(config, mesh, process_count)
    abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
                      "ema_params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params)}
    st_sh = state_shardings(abstract_state, mesh, config)
    return dict(mesh=mesh, mesh_plan=plan, model=model, tx=tx, diffusion=diffusion, abstract_state=abstract_state,
                state_shardings=st_sh, local_batch=local_batch)


def jit_train_step(train_step: Callable, mesh, state_sh) -> Callable:
    """The train step jitted with the run's shardings (state donated); the loop and --compile-only use it."""
    rep = shd.replicated(mesh)
    return jax.jit(train_step, in_shardings=(state_sh, shd.batch_sharding(mesh), rep, rep),
                   out_shardings=(state_sh, rep), donate_argnums=(0,))


def _dummy_inputs(model: DiT):
    s, c = model.input_size, model.in_channels
    return (jnp.zeros((1, s, s, c), jnp.float32), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))


def init_state(model: DiT, tx, rng, shardings) -> Dict[str, Any]:
    @functools.partial(jax.jit, out_shardings=shardings)
    def init(r):
        params = model.init(r, *_dummy_inputs(model))["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "ema_params": jax.tree_util.tree_map(jnp.copy, params), "opt_state": tx.init(params)}

    return init(rng)


def train_and_evaluate(config, workdir: str, export_torch_path: Optional[str] = None) -> Dict[str, Any]:
    """Train until config.num_steps (resuming from workdir/checkpoints); returns the final state and losses."""
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    env = setup(config, workdir)
    mesh, model, tx = env["mesh"], env["model"], env["tx"]
    st_sh = env["state_shardings"]
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.txt"), "w") as f:
            f.write(str(config))
        log.info("mesh %s over %d devices (%d processes; %s); model %s with %.2fM parameters",
                 shd.logical_shape(mesh), mesh.size, jax.process_count(), env["mesh_plan"].reason, config.model.name,
                 sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(env["abstract_state"]["params"])) / 1e6)

    # ---- resume or init ----
    manager = ckpt_lib.make_manager(workdir, config.checkpoint.every_steps, config.checkpoint.keep,
                                    config.checkpoint.async_save)
    restored = None
    if config.checkpoint.resume:
        restored = ckpt_lib.restore_latest(manager, ckpt_lib.abstract_like(env["abstract_state"], st_sh))
    base_rng = jax.random.PRNGKey(int(config.seed))
    init_rng, step_rng = jax.random.split(base_rng)
    if restored is not None:
        start_step, state, meta = restored
        if int(meta.get("seed", config.seed)) != int(config.seed):
            raise ConfigError(f"checkpoint step {start_step} was trained with seed {meta['seed']} but "
                              f"config.seed={config.seed}; use the same seed to resume")
        log.info("resumed from checkpoint step %d", start_step)
    else:
        start_step, state = 0, init_state(model, tx, init_rng, st_sh)
    last_good = start_step if restored is not None else None

    # ---- data and (optional) VAE ----
    source = make_source(config)
    first = source.batch(start_step) if start_step < config.num_steps else None
    kind = check_batch(first, model, env["local_batch"]) if first is not None else "x"
    vae, vae_params = None, None
    if kind == "image":
        from dit_jax.vae import load_vae

        vae, vae_params = load_vae(config.data.vae)
        vae_params = jax.device_put(vae_params, shd.replicated(mesh))

    p_step = jit_train_step(make_train_step(config, model, tx, env["diffusion"], vae), mesh, st_sh)

    writer = None
    if is_main:
        from dit_jax.logging_utils import MetricWriter

        writer = MetricWriter(workdir, tensorboard=bool(config.get("tensorboard", True)))
    sampler = make_sampler(config, model, mesh) if config.sample.every_steps else None
    losses: Dict[int, float] = {}
    every = int(config.checkpoint.every_steps)
    pending = None  # (step, metrics) of the previous step, checked after the next one is dispatched
    t_start = t_last = time.time()
    s_last = start_step
    watcher = preemption.Watcher()  # SIGTERM -> all processes save at one agreed step and stop
    preempted = None
    try:
        for step in range(start_step, int(config.num_steps)):
            local = first if step == start_step else source.batch(step)
            batch = shd.global_batch_from_local(local, mesh, int(config.global_batch_size))
            with mesh:
                state, metrics = p_step(state, batch, step_rng, vae_params)
            if pending is not None:  # the previous step's loss, one step behind so the device stays busy
                m = _host_metrics(pending[1])
                _check_finite(pending[0], m, last_good, workdir)
                losses[pending[0]] = m["loss"]
            pending = (step + 1, metrics)
            done = step + 1
            is_last = done == int(config.num_steps)
            log_now = done % int(config.log_every_steps) == 0 or is_last
            if watcher.reached(done):
                preempted = done
            save_now = (every > 0 and done % every == 0) or is_last or preempted is not None
            if log_now or save_now:
                m = _host_metrics(metrics)
                _check_finite(done, m, last_good, workdir)
                losses[done] = m["loss"]
                pending = None
                if log_now:
                    dt = time.time() - t_last
                    sps = (done - s_last) / max(dt, 1e-9)
                    m.update(steps_per_sec=sps, images_per_sec=sps * int(config.global_batch_size))
                    if writer:
                        writer.scalars(done, m)
                    t_last, s_last = time.time(), done
            if save_now:
                meta = {"step": done, "seed": int(config.seed), "data_position": done,
                        "num_processes": jax.process_count(), "mesh": shd.logical_shape(mesh)}
                ckpt_lib.save(manager, done, state, meta)
                last_good = done
            if preempted is not None:
                break
            if sampler is not None and (done % int(config.sample.every_steps) == 0 or is_last):
                write_samples(config, model, sampler, state["ema_params"], done, workdir, writer)
        if pending is not None:
            m = _host_metrics(pending[1])
            _check_finite(pending[0], m, last_good, workdir)
            losses[pending[0]] = m["loss"]
    finally:
        watcher.close()
        manager.wait_until_finished()
        manager.close()
        source.close()
        if writer:
            writer.close()
    if preempted is not None:
        log.info("preempted: saved step %d in %s; rerun the same command to resume", preempted,
                 ckpt_lib.checkpoint_dir(workdir))
        return {"state": state, "losses": losses, "model": model, "mesh": mesh, "preempted": preempted}
    if export_torch_path:
        export_torch(export_torch_path, model, state["ema_params"])
    if is_main and start_step < int(config.num_steps):
        log.info("finished step %d in %.1f min; checkpoints in %s, sample grids in %s", int(config.num_steps),
                 (time.time() - t_start) / 60, ckpt_lib.checkpoint_dir(workdir), os.path.join(workdir, "samples"))
    return {"state": state, "losses": losses, "model": model, "mesh": mesh, "preempted": None}


def write_samples(config, model: DiT, sampler, ema_params, step: int, workdir: str, writer) -> np.ndarray:
    """EMA sample grid (rows = config.sample.classes) -> workdir/samples/step_<step>.png and TensorBoard."""
    labels, noise = grid_labels_noise(config, model)
    x0 = sampler(ema_params, labels, noise)  # (N, S, S, C)
    images = decode_for_display(config, x0)
    if writer is not None:
        from dit_jax.logging_utils import make_grid

        grid = make_grid(images, rows=len(config.sample.classes), upscale=max(1, 64 // images.shape[1]))
        writer.image(step, "samples/ema", grid, os.path.join(workdir, "samples", f"step_{step:08d}.png"))
    return images


_VAE_CACHE: Dict[str, Any] = {}


def decode_for_display(config, x0: np.ndarray) -> np.ndarray:
    """Pixel-space samples as they are; latents through the VAE decoder (if it can be loaded)."""
    if config.data.name in PIXEL_SOURCES or x0.shape[-1] != 4:
        return x0
    try:
        from dit_jax.vae import decode_latents, load_vae

        if config.data.vae not in _VAE_CACHE:
            _VAE_CACHE[config.data.vae] = load_vae(config.data.vae)
        vae, params = _VAE_CACHE[config.data.vae]
        return np.asarray(decode_latents(vae, params, jnp.asarray(x0)))
    except Exception as e:  # noqa: BLE001  (no weights offline: show the first 3 latent channels)
        log.warning("could not decode sample latents with VAE %r (%s); showing latent channels", config.data.vae, e)
        return np.clip(x0[..., :3] / 4.0, -1, 1)
