"""Everything a training run builds from its config, validated before any compute: the model, the diffusion,
the optimizer, the batch sizes and the kind of batch the data gives. Errors are ConfigError naming the field.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from dit_jax.nn import remat as remat_lib
from dit_jax import sharding as shd
from dit_jax.diffusion import GaussianDiffusion, create_diffusion
from dit_jax.utils.errors import ConfigError
from dit_jax.model import DTYPES, DiT, parse_model_name

MODEL_DIM_FIELDS = ("patch_size", "depth", "hidden_size", "num_heads")


def model_dims(model_cfg) -> Dict[str, int]:
    """{patch_size, depth, hidden_size, num_heads} from config.model: the name's size, each field set overriding it."""
    dims: Dict[str, int] = {}
    if model_cfg.name is not None:
        try:
            depth, hidden, heads, patch = parse_model_name(model_cfg.name)
        except ValueError as e:
            raise ConfigError(f"config.model.name: {e}") from None
        dims = dict(patch_size=patch, depth=depth, hidden_size=hidden, num_heads=heads)
    for f in MODEL_DIM_FIELDS:
        if model_cfg.get(f) is not None:
            dims[f] = int(model_cfg[f])
    missing = [f for f in MODEL_DIM_FIELDS if f not in dims]
    if missing:
        raise ConfigError(f"config.model.name is None (a custom size) but config.model.{', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not set")
    bad = [f"config.model.{f}={v}" for f, v in dims.items() if v < 1]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: must be >= 1")
    if dims["hidden_size"] % dims["num_heads"]:
        raise ConfigError(f"config.model.hidden_size={dims['hidden_size']} is not divisible by "
                          f"num_heads={dims['num_heads']}")
    return dims


def state_config(config) -> Dict[str, object]:
    """The config fields that shape the training state, flattened: a checkpoint resumes only with equal values."""
    m = config.model
    out: Dict[str, object] = {f"model.{k}": v for k, v in model_dims(m).items()}
    out.update({f"model.{k}": m[k] for k in ("input_size", "in_channels", "num_classes", "learn_sigma")})
    out["model.class_dropout_prob > 0"] = bool(m.class_dropout_prob > 0)  # the null-class row of the label table
    out["optim.grad_clip > 0"] = bool(config.optim.grad_clip > 0)  # clipping adds a stage to the optimizer state
    out["seed"] = int(config.seed)  # per-step randomness and the data order
    return out


def remat_policy(config, platform: str) -> str:
    """config.model.remat_policy, or the default for devices of `platform` when it is unset (dit_jax/nn/remat.py);
    the older boolean config.model.remat=True means "full"."""
    m = config.model
    name = m.get("remat_policy")
    if name is not None and name not in remat_lib.POLICIES:
        raise ConfigError(f"config.model.remat_policy={name!r}; expected one of {list(remat_lib.POLICIES)} "
                          f"(or unset: {remat_lib.default_policy(platform)!r} on {platform})")
    if m.get("remat"):
        if name not in (None, "full"):
            raise ConfigError(f"config.model.remat=True (the older name of remat_policy='full') conflicts with "
                              f"config.model.remat_policy={name!r}; set only remat_policy")
        return "full"
    return name or remat_lib.default_policy(platform)


def build_model(config, platform: Optional[str] = None) -> DiT:
    """The DiT of config.model; `platform` ("cpu", "tpu", "gpu"; default: JAX's default backend) picks the
    remat policy when config.model.remat_policy is unset."""
    m = config.model
    if m.dtype not in DTYPES:
        raise ConfigError(f"config.model.dtype={m.dtype!r}; expected one of {sorted(DTYPES)}")
    dims = model_dims(m)
    if m.input_size % dims["patch_size"]:
        raise ConfigError(f"config.model.input_size={m.input_size} is not divisible by the patch size "
                          f"{dims['patch_size']}")
    if not 0.0 <= m.class_dropout_prob < 1.0:
        raise ConfigError(f"config.model.class_dropout_prob={m.class_dropout_prob}: must be in [0, 1)")
    return DiT(input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
               class_dropout_prob=m.class_dropout_prob, learn_sigma=m.learn_sigma, dtype=DTYPES[m.dtype],
               remat_policy=remat_policy(config, platform or jax.default_backend()),
               attention_impl=m.attention_impl, **dims)


def build_diffusion(config, respacing: str = "") -> GaussianDiffusion:
    return create_diffusion(respacing, noise_schedule=config.diffusion.noise_schedule,
                            learn_sigma=config.model.learn_sigma, diffusion_steps=config.diffusion.steps)


def lr_schedule(config) -> optax.Schedule:
    o = config.optim
    if o.warmup_steps > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)],
                                    [o.warmup_steps])
    return optax.constant_schedule(o.lr)


def build_optimizer(config) -> optax.GradientTransformation:
    """AdamW with the config's schedule, clipped by global norm first when config.optim.grad_clip > 0."""
    o = config.optim
    tx = optax.adamw(lr_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if o.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    return tx


def validate_batch_config(config, mesh: Mesh, process_count: Optional[int] = None) -> Tuple[int, int]:
    """-> (per-process batch, micro-batch). Errors name the numbers that do not divide.

    process_count: the run's processes (default: this JAX runtime's; --compile-only passes a pod's hosts)."""
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


def batch_kind(config) -> str:
    """The kind of batch config.data gives, without reading it: "x" (pixels the model sees as they are),
    "latent" (pre-extracted VAE posteriors) or "image" (pixels VAE-encoded inside the train step)."""
    if config.data.name == "digits":
        return "x"
    if config.data.name == "latents":
        return "latent"
    return "image" if config.data.encode_on_the_fly else "x"


def batch_shapes(kind: str, model: DiT) -> Dict[str, tuple]:
    """Per-example shapes of the arrays of a batch of `kind` for `model` (the "y" labels are scalars)."""
    s, c = model.input_size, model.in_channels
    if kind == "x":
        return {"x": (s, s, c), "y": ()}
    if kind == "latent":
        return {"latent_mean": (s, s, c), "latent_std": (s, s, c), "y": ()}
    return {"image": (8 * s, 8 * s, 3), "y": ()}


def check_batch(batch: Dict[str, np.ndarray], model: DiT, local_batch: int) -> str:
    """Names the batch kind; errors before compute when shapes or labels disagree with the model."""
    if "y" not in batch:
        raise ConfigError(f"data batch has keys {sorted(batch)}; a 'y' label array is required")
    if len(batch["y"]) != local_batch:
        raise ConfigError(f"data source returned {len(batch['y'])} examples; this process needs {local_batch}")
    kind = next((k for k, key in (("x", "x"), ("latent", "latent_mean"), ("image", "image")) if key in batch), None)
    if kind is None:
        raise ConfigError(f"data batch has keys {sorted(batch)}; expected 'x', 'latent_mean'/'latent_std' or 'image'")
    for key, want in batch_shapes(kind, model).items():
        if key != "y" and tuple(batch[key].shape[1:]) != want:
            raise ConfigError(f"data batch kind {kind!r} has per-example shape {tuple(batch[key].shape[1:])} but "
                              f"the model (config.model.input_size={model.input_size}, in_channels="
                              f"{model.in_channels}) needs {want}")
    if kind == "image" and batch["image"].dtype != np.uint8:
        raise ConfigError(f"data batch 'image' has dtype {batch['image'].dtype}; image batches are uint8 pixels "
                          f"(0..255, scaled to [-1, 1] inside the step)")
    if kind == "image" and model.in_channels != 4:
        raise ConfigError(f"image batches are VAE-encoded to 4 channels but config.model.in_channels="
                          f"{model.in_channels}")
    check_labels(batch["y"], model.num_classes)
    return kind


def check_labels(labels: np.ndarray, num_classes: int, step: Optional[int] = None) -> None:
    """Labels outside 0..num_classes-1 would index the null-class row (or past the table): refuse them."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        where = f" in the batch of step {step}" if step is not None else ""
        raise ConfigError(f"data labels{where} span {labels.min()}..{labels.max()} but config.model.num_classes="
                          f"{num_classes} (labels must be in 0..{num_classes - 1})")


# (field, low, high) of every numeric config field; None leaves that end open. Checked by `validate_config`.
MESH_PLANS = ("compile", "estimate")  # how an auto fsdp is chosen (configs/default.py, dit_jax.compile_report)
RANGES = (
    ("seed", 0, 2**32 - 1), ("num_steps", 1, None), ("global_batch_size", 1, None), ("grad_accum_steps", 1, None),
    ("model.input_size", 1, None), ("model.in_channels", 1, None), ("model.num_classes", 1, None),
    ("diffusion.steps", 1, None), ("latent_scale", 1e-12, None),
    ("optim.lr", 1e-12, None), ("optim.warmup_steps", 0, None), ("optim.weight_decay", 0.0, None),
    ("optim.b1", 0.0, 1.0), ("optim.b2", 0.0, 1.0), ("optim.eps", 1e-30, None),
    ("optim.grad_clip", 0.0, None), ("ema_decay", 0.0, 1.0),
    ("sharding.fsdp_min_size", 0, None), ("mesh.memory_per_chip_gib", 1e-9, None), ("data.image_size", 8, None), ("data.num_workers", 1, None),
    ("data.prefetch", 0, None), ("checkpoint.every_steps", 0, None), ("checkpoint.keep", 0, None),
    ("log_every_steps", 1, None), ("sample.every_steps", 0, None), ("sample.per_class", 1, None),
    ("sample.cfg_scale", 1.0, None), ("sample.seed", 0, 2**32 - 1), ("eval.every_steps", 0, None),
    ("eval.num_samples", 2, None), ("eval.batch_size", 1, None), ("eval.cfg_scale", 1.0, None),
    ("eval.seed", 0, 2**32 - 1),
)


def _field(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def validate_config(config) -> None:
    """Every numeric field within its range (RANGES); the error names the field and the range."""
    for name, low, high in RANGES:
        value = _field(config, name)
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            want = (f"between {low} and {high}" if low is not None and high is not None
                    else f">= {low}" if low is not None else f"<= {high}")
            raise ConfigError(f"config.{name}={value}: must be {want}")
    plan = config.mesh.get("plan", "compile")
    if plan not in MESH_PLANS:
        raise ConfigError(f"config.mesh.plan={plan!r}: expected one of {MESH_PLANS}")
    if not config.sample.every_steps:
        return
    if not len(config.sample.classes):
        raise ConfigError("config.sample.classes is empty; give the classes of the sample grid or set "
                          "config.sample.every_steps=0")
    bad = [c for c in config.sample.classes if not 0 <= c < config.model.num_classes]
    if bad:
        raise ConfigError(f"config.sample.classes {bad}: outside 0..{config.model.num_classes - 1} "
                          f"(config.model.num_classes={config.model.num_classes})")
