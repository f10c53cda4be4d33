"""Sharded DiT training: setup, the jitted step, and the loop (called by `dit-jax-train`, dit_jax/cli/train.py).

    from dit_jax import train
    result = train.train_and_evaluate(config, workdir)   # config: configs/*.py get_config()

Sections: (1) `setup(config)` builds and validates everything from the config before any compute; (2)
`jit_train_step` jits the pure step of dit_jax.training.step with the state's shardings and donates the old
state; (3) `train_and_evaluate` restores or initialises the state, then runs data -> step -> logs / samples /
checkpoints. Per-step randomness is fold_in(PRNGKey(seed), step) and the data of step s is source.batch(s),
so a resumed run is identical to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from dit_jax import checkpoint as ckpt_lib, data, mesh_plan, sharding as shd
from dit_jax.training import build, preemption
from dit_jax.analysis import mfu, state_split
from dit_jax.diffusion import GaussianDiffusion
from dit_jax.utils.errors import ConfigError, NonFiniteLossError
from dit_jax.model import DiT, abstract_params, count_params
from dit_jax.training.sample_quality import Evaluator, InceptionLoader, check_eval_config, load_converted_inception
from dit_jax.training.samples import SampleDecoder, VaeLoader, make_sampler, write_samples
from dit_jax.training.state import TrainState, abstract_state, init_state, state_shardings, with_shardings
from dit_jax.topology import memory_per_chip
from dit_jax.training.step import make_loss_fn, make_train_step
from dit_jax.utils import paths, xla_cpu
from dit_jax.utils.atomic import write_text
from dit_jax.utils.metric_writer import MetricWriter
from dit_jax.vae_weights import load_vae as load_vae_safetensors

log = logging.getLogger("dit_jax.train")


# ====================================================================================================
# (1) Setup
# ====================================================================================================
@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What a run is built from, validated before any compute (no device memory used yet)."""

    mesh: Mesh
    plan: mesh_plan.MeshPlan  # how config.mesh was resolved for these devices, and why
    model: DiT
    tx: optax.GradientTransformation
    diffusion: GaussianDiffusion
    abstract_state: TrainState  # ShapeDtypeStructs
    state_shardings: TrainState  # NamedShardings of the same tree
    local_batch: int  # examples this process reads per step
    batch_kind: str  # "x" | "latent" | "image" (build.batch_kind)


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    losses: Dict[int, float]  # step -> mean loss of that step (every step)
    metrics: Dict[int, Dict[str, float]]  # step -> loss terms, grad_norm, lr, ... (logged and saved steps)
    model: DiT
    mesh: Mesh
    preempted: Optional[int] = None  # the step saved after a SIGTERM on any process (the run stopped there)


def setup(config, devices=None, process_count: Optional[int] = None) -> TrainSetup:
    """Mesh, model, optimizer, shardings and batch sizes from the config; errors name the field.

    devices / process_count: the run's devices and processes (default: this JAX runtime's);
    `dit-jax-train --compile-only` passes a TPU topology's compile-only devices and host count."""
    build.validate_config(config)
    check_eval_config(config)
    devices = shd.select_devices(config.mesh, devices, process_count)
    model = build.build_model(config, devices[0].platform)
    kind = build.batch_kind(config)
    params = abstract_params(model)
    plan = mesh_plan.plan_mesh(config, devices, model, params, memory_per_chip(config.mesh, devices[0])[0],
                               image_batch=kind == "image")
    mesh = shd.make_mesh(plan.shape, devices, plan.fsdp_groups)
    state_split.warn_if_uneven(params, mesh, config.sharding, log)  # a prime of fsdp dividing no width
    local_batch, _ = build.validate_batch_config(config, mesh, process_count)
    if config.data.name == "digits" and config.model.in_channels != 1:
        raise ConfigError(f"digits are 1-channel images; config.model.in_channels={config.model.in_channels}")
    if config.data.name not in data.SOURCES:
        raise ConfigError(f"config.data.name={config.data.name!r}; expected one of {data.SOURCES}")
    tx = build.build_optimizer(config)
    state = abstract_state(model, tx)
    return TrainSetup(mesh=mesh, plan=plan, model=model, tx=tx, diffusion=build.build_diffusion(config), abstract_state=state,
                      state_shardings=state_shardings(state, mesh, config.sharding, tx), local_batch=local_batch,
                      batch_kind=kind)


def make_source(config):
    """This process's data source (dit_jax.data.make_source with the run's batch and process layout)."""
    seed = int(config.data.shuffle_seed if config.data.shuffle_seed is not None else config.seed)
    return data.make_source(config.data, global_batch_size=int(config.global_batch_size),
                            process_index=jax.process_index(), process_count=jax.process_count(), seed=seed)


# ====================================================================================================
# (2) The jitted step
# ====================================================================================================
def jit_train_step(config, s: TrainSetup, vae=None):
    """train_step(state, batch, rng, vae_params) jitted with in/out shardings, the old state donated."""
    loss_fn = make_loss_fn(s.model, s.diffusion, float(config.latent_scale), vae)
    step = make_train_step(loss_fn, s.tx, build.lr_schedule(config), float(config.ema_decay),
                           int(config.grad_accum_steps))
    rep = shd.replicated(s.mesh)
    return jax.jit(step, in_shardings=(s.state_shardings, shd.batch_sharding(s.mesh), rep, rep),
                   out_shardings=(s.state_shardings, rep), donate_argnums=(0,),
                   compiler_options=xla_cpu.compiler_options(s.mesh.devices.flat[0].platform))


# ====================================================================================================
# (3) The loop
# ====================================================================================================
def restore(manager, s: TrainSetup, config) -> Optional[Tuple[int, TrainState, Dict[str, Any]]]:
    """(step, state placed in s.state_shardings, meta) of the newest intact checkpoint, or None."""
    target = with_shardings(s.abstract_state.to_dict(), s.state_shardings.to_dict())
    restored = ckpt_lib.restore_latest(manager, target, build.state_config(config))
    if restored is None:
        return None
    step, state, meta = restored
    return step, TrainState.from_dict(state), meta


def load_latest(workdir: str, s: TrainSetup, config) -> Optional[Tuple[int, TrainState, Dict[str, Any]]]:
    """`restore` from workdir/checkpoints without a training run (for evaluation and tests)."""
    manager = ckpt_lib.make_manager(workdir, keep=0, async_save=False)
    try:
        return restore(manager, s, config)
    finally:
        manager.close()


def restore_or_init(config, s: TrainSetup, manager, rng: jax.Array) -> Tuple[int, TrainState, bool]:
    """(start step, state, resumed?) from the newest complete checkpoint, or a fresh state."""
    restored = restore(manager, s, config) if config.checkpoint.resume else None
    if restored is None:
        return 0, init_state(s.model, s.tx, rng, s.state_shardings), False
    step, state, meta = restored
    log.info("resumed from checkpoint step %d", step)
    return step, state, True


def check_finite(step: int, m: Dict[str, float], last_good: Optional[int], workdir: str) -> None:
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        where = (f"the last good checkpoint is step {last_good} in {ckpt_lib.checkpoint_dir(workdir)}"
                 if last_good is not None else "no checkpoint was written")
        raise NonFiniteLossError(f"non-finite training loss at step {step} (loss={m['loss']}, "
                                 f"grad_norm={m['grad_norm']}); stopping without saving; {where}. "
                                 f"Lower config.optim.lr, set config.optim.grad_clip, or use float32.")


def host_metrics(metrics) -> Dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def load_step_vae(config, s: TrainSetup, load_vae: VaeLoader):
    """(vae, replicated params) when batches are images encoded inside the step, else (None, None)."""
    if s.batch_kind != "image":
        return None, None
    vae, params = load_vae(config.data.vae)
    return vae, jax.device_put(params, shd.replicated(s.mesh))


def write_config(config, workdir: paths.PathLike, s: TrainSetup) -> None:
    write_text(paths.as_path(workdir) / "config.txt", str(config))
    log.info("mesh %s over %d devices (%d processes; %s); model %s with %.2fM parameters",
             shd.logical_shape(s.mesh), s.mesh.size, jax.process_count(), s.plan.reason,
             config.model.name or "(custom size)",
             count_params(s.abstract_state.params) / 1e6)


class _Loop:
    """The loop's bookkeeping: losses read one step behind (so the device stays busy), logging, saving."""

    def __init__(self, config, workdir: str, s: TrainSetup, manager, writer: Optional[MetricWriter],
                 start_step: int, resumed: bool):
        self.config, self.workdir, self.s, self.manager, self.writer = config, workdir, s, manager, writer
        self.losses: Dict[int, float] = {}
        self.metrics: Dict[int, Dict[str, float]] = {}
        self.pending: Optional[Tuple[int, Any]] = None  # (step, metrics) not yet read back
        self.last_good = start_step if resumed else None
        self.t_last, self.s_last = time.time(), start_step
        self.state_config = build.state_config(config)

    def read_pending(self) -> None:
        if self.pending is not None:
            m = host_metrics(self.pending[1])
            check_finite(self.pending[0], m, self.last_good, self.workdir)
            self.losses[self.pending[0]] = m["loss"]
            self.pending = None

    def after_step(self, done: int, state: TrainState, metrics, stopping: bool = False) -> None:
        c = self.config
        self.read_pending()
        every = int(c.checkpoint.every_steps)
        is_last = done == int(c.num_steps)
        log_now = done % int(c.log_every_steps) == 0 or is_last
        save_now = (every > 0 and done % every == 0) or is_last or stopping
        if not (log_now or save_now):
            self.pending = (done, metrics)
            return
        m = host_metrics(metrics)
        check_finite(done, m, self.last_good, self.workdir)
        self.losses[done] = m["loss"]
        self.metrics[done] = dict(m)
        if log_now:
            sps = (done - self.s_last) / max(time.time() - self.t_last, 1e-9)
            m.update(steps_per_sec=sps, images_per_sec=sps * int(c.global_batch_size))
            m.update(mfu.throughput_metrics(m["images_per_sec"], self.s.model, self.s.mesh.devices.flat))
            if self.writer:
                self.writer.scalars(done, m)
            self.t_last, self.s_last = time.time(), done
        if save_now:
            self.save(done, state)

    def save(self, done: int, state: TrainState) -> None:
        """Checkpoint step `done` (every process calls it; nothing happens when it is saved already)."""
        if self.last_good == done:
            return
        self.read_pending()
        meta = {"step": done, "seed": int(self.config.seed), "data_position": done,
                "num_processes": jax.process_count(), "mesh": shd.logical_shape(self.s.mesh),
                "state_config": self.state_config}
        ckpt_lib.save(self.manager, done, state.to_dict(), meta)
        self.last_good = done
        if self.writer:  # a bucket's metrics reach at least the newest checkpoint
            self.writer.flush()


def train_and_evaluate(config, workdir: str, load_vae: VaeLoader = load_vae_safetensors,
                       load_inception: InceptionLoader = load_converted_inception) -> TrainResult:
    """Train until config.num_steps, resuming from workdir/checkpoints; returns the final state and losses.

    `load_vae(config.data.vae) -> (AutoencoderKL, params)` loads the VAE for image batches and sample grids,
    `load_inception(config.eval.inception) -> params` the FID network (the command line passes loaders that
    also read PyTorch files)."""
    workdir = paths.display(workdir)  # absolute if local; a bucket URL as it is (gs://b/run)
    s = setup(config)
    source = make_source(config)  # validates the data before anything is written
    # The batch the run most likely starts with, checked against the model before anything is created.
    probe = (ckpt_lib.latest_saved_step(workdir) if config.checkpoint.resume else None) or 0
    first = source.batch(probe) if probe < config.num_steps else None
    if first is not None:
        build.check_batch(first, s.model, s.local_batch)
    is_main = jax.process_index() == 0
    manager = ckpt_lib.make_manager(workdir, config.checkpoint.keep, config.checkpoint.async_save)
    writer = watcher = None
    stopped: Optional[Tuple[str, int]] = None  # (preemption.PREEMPTED or INTERRUPTED, the step saved)
    try:
        # From here on SIGTERM or Ctrl-C on any process stops every process at the same check, saved (a
        # process leaving on its own would leave the others waiting in a collective).
        watcher = preemption.Watcher()
        init_rng, step_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))
        start_step, state, resumed = restore_or_init(config, s, manager, init_rng)
        if start_step != probe and start_step < config.num_steps:  # a damaged newest checkpoint was set aside
            first = source.batch(start_step)
            build.check_batch(first, s.model, s.local_batch)
        vae, vae_params = load_step_vae(config, s, load_vae)
        p_step = jit_train_step(config, s, vae)
        if is_main:
            write_config(config, workdir, s)
            writer = MetricWriter(workdir, tensorboard=bool(config.tensorboard))
        sampler = make_sampler(config, s.model, s.mesh) if config.sample.every_steps else None
        decode = SampleDecoder(config, load_vae)
        every_eval = int(config.eval.every_steps)
        evaluator = Evaluator(config, s.model, s.mesh, load_vae, load_inception) if every_eval else None
        loop = _Loop(config, workdir, s, manager, writer, start_step, resumed)
        t_start = time.time()
        for step in range(start_step, int(config.num_steps)):
            local = first if step == start_step else source.batch(step)
            build.check_labels(local["y"], s.model.num_classes, step)
            batch = shd.global_batch_from_local(local, s.mesh, int(config.global_batch_size))
            with s.mesh:
                state, metrics = p_step(state, batch, step_rng, vae_params)
            done = step + 1
            reason = watcher.check(done)  # the same answer on every process
            loop.after_step(done, state, metrics, stopping=reason is not None)
            if reason is not None:
                stopped = (reason, done)
                break
            inside = ""
            try:  # sample grids and evaluations stop between their batches (watcher.raise_if_stopping)
                if sampler is not None and (done % int(config.sample.every_steps) == 0 or done == config.num_steps):
                    inside = "sample grid"
                    write_samples(config, s.model, sampler, decode, state.ema_params, done, workdir, writer,
                                  between=watcher.raise_if_stopping)
                if evaluator is not None and (done % every_eval == 0 or done == config.num_steps):
                    inside = "evaluation"
                    scores = evaluator(state.ema_params, between=watcher.raise_if_stopping)
                    loop.metrics.setdefault(done, {}).update(scores)
                    if writer:
                        writer.scalars(done, scores)
            except preemption.Stop as e:
                log.info("%s: stopping the %s of step %d", e.reason, inside, done)
                loop.save(done, state)
                stopped = (e.reason, done)
                break
    finally:
        if writer:  # first, before a cleanup step that may raise: on a bucket this uploads the held-back metrics
            writer.close()
        if watcher is not None:
            watcher.close()
        manager.wait_until_finished()
        manager.close()
        source.close()
    if stopped is not None and stopped[0] == preemption.INTERRUPTED:
        log.info("interrupted (Ctrl-C): saved step %d in %s", stopped[1], ckpt_lib.checkpoint_dir(workdir))
        raise KeyboardInterrupt  # after the save above is complete; dit-jax-train exits 130
    preempted = stopped[1] if stopped is not None else None
    if preempted is not None:
        log.info("preempted (SIGTERM): saved step %d in %s; rerun the same command to resume", preempted,
                 ckpt_lib.checkpoint_dir(workdir))
    elif is_main and start_step < int(config.num_steps):
        log.info("finished step %d in %.1f min; checkpoints in %s, sample grids in %s", int(config.num_steps),
                 (time.time() - t_start) / 60, ckpt_lib.checkpoint_dir(workdir), paths.as_path(workdir) / "samples")
    return TrainResult(state=state, losses=loop.losses, metrics=loop.metrics, model=s.model, mesh=s.mesh,
                       preempted=preempted)
