"""The paper's ImageNet recipe: DiT-XL/2 on 256 px images (32x32x4 VAE latents), and its variants.

    --config configs/default.py              DiT-XL/2, 256 px (the paper's headline model)
    --config configs/default.py:B/2          any of the 12 sizes: S|B|L|XL / 2|4|8
    --config configs/default.py:XL/2,512     512 px (64x64x4 latents; bfloat16 compute)

Change a field on the command line with `--config.optim.lr=2e-4`; a field that does not exist here is an
error. Fields that default to None ("unset") take their value from another field, as their comment says.
"""
from typing import Optional

import ml_collections
from ml_collections.config_dict import placeholder

RESOLUTIONS = (256, 512)


def parse_variant(variant: Optional[str]):
    """"XL/2,512" -> ("DiT-XL/2", 512); "" or None -> ("DiT-XL/2", 256)."""
    name, _, res = (variant or "XL/2").partition(",")
    res = int(res) if res else 256
    if res not in RESOLUTIONS:
        raise ValueError(f"config variant {variant!r}: resolution must be one of {RESOLUTIONS}")
    return f"DiT-{name}", res


def get_config(variant: Optional[str] = None) -> ml_collections.ConfigDict:
    model_name, resolution = parse_variant(variant)
    c = ml_collections.ConfigDict()
    c.seed = 0  # base PRNG seed: init, per-step rngs (folded with the step) and the data order
    c.num_steps = 400_000  # total optimizer steps (the paper's ablations; its final XL/2 ran 7M)
    c.global_batch_size = 256  # examples per optimizer step over all processes
    c.grad_accum_steps = 1  # micro-batches per step (each micro-batch is global_batch_size / this)

    # ---- model (dit_jax.model.DiT_models) ----
    c.model = ml_collections.ConfigDict()
    # one of DiT-{S,B,L,XL}/{2,4,8}; None: a custom size given by the four fields below
    c.model.name = ml_collections.FieldReference(model_name, field_type=str)
    c.model.patch_size = placeholder(int)  # None: the name's patch size
    c.model.depth = placeholder(int)  # None: the name's depth; set it for small models
    c.model.hidden_size = placeholder(int)  # None: the name's width (a custom width still exports to .pt)
    c.model.num_heads = placeholder(int)  # None: the name's head count; needed with a custom hidden_size
    c.model.input_size = resolution // 8  # spatial size of the model input: image_size / 8 for VAE latents
    c.model.in_channels = 4  # 4 VAE latent channels (1 for digits in pixel space)
    c.model.num_classes = 1000  # ImageNet classes (a null class is added when class_dropout_prob > 0)
    c.model.class_dropout_prob = 0.1  # label dropout for classifier-free guidance
    c.model.learn_sigma = True  # predict the variance too (output has 2 * in_channels channels)
    # compute dtype: "float32" or "bfloat16" (parameters stay float32); 512 px uses bfloat16 to fit
    c.model.dtype = "bfloat16" if resolution == 512 else "float32"
    # what the backward pass keeps of each block (dit_jax/nn/remat.py): "none", "full" (only the block's input;
    # ~30% more compute), "save_dots" (the matmul outputs), "save_dots_except_fc1", "save_qkv_proj";
    # None: by platform, "none" on CPU, "save_qkv_proj" on TPU, "save_dots" on GPU (docs/performance.md)
    c.model.remat_policy = ml_collections.FieldReference(None, field_type=str)
    c.model.remat = False  # older name: True means remat_policy="full"
    # "auto": per platform (CPU head-major matmuls; GPU cuDNN flash attention; TPU Pallas flash attention at
    # 512 px, else XLA's); or one kernel everywhere: "matmul", "xla", "cudnn", "pallas_tpu" (dit_jax/nn/attention.py)
    c.model.attention_impl = "auto"

    # ---- diffusion (dit_jax.diffusion.create_diffusion) ----
    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.steps = 1000  # training diffusion steps
    c.diffusion.noise_schedule = "linear"  # betas 1e-4..0.02 scaled by 1000/steps
    c.latent_scale = 0.18215  # VAE latents are multiplied by this before diffusion

    # ---- optimizer (optax.adamw) ----
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4  # constant learning rate after warmup
    c.optim.warmup_steps = 0  # linear warmup from 0 (the paper uses none)
    c.optim.weight_decay = 0.0  # the paper: no weight decay
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.grad_clip = 0.0  # clip by global norm when > 0 (the paper does not clip)
    c.ema_decay = 0.9999  # EMA of the parameters, updated every step; samples and exports use it

    # ---- devices and sharding (dit_jax.sharding) ----
    c.mesh = ml_collections.ConfigDict()
    # Axis sizes: n, -1 (the devices the other axes leave) or None = auto (dit_jax.mesh_plan: fsdp is the
    # smallest size whose estimated memory per chip fits the accelerator, data the rest; tensor > 1 only
    # when the micro-batch has fewer examples than there are devices). `--compile-only` reports the choice.
    c.mesh.data = placeholder(int)  # data-parallel axis (the batch is split over data x fsdp); None: auto
    c.mesh.fsdp = placeholder(int)  # parameters, optimizer state and EMA sharded over this axis; None: auto
    c.mesh.tensor = placeholder(int)  # tensor (Megatron-style) axis for attention heads and MLP units; None: auto
    c.mesh.num_devices = placeholder(int)  # None: all devices; n: only the first n (single-process debugging)
    # How auto picks fsdp on an accelerator: "compile" (compile the step for the estimate's choice and its
    # neighbours, keep the smallest fsdp whose compiled bytes fit: the measured number, on that hardware) or
    # "estimate" (dit_jax.mesh_plan's model alone, no extra compile). CPU: no memory limit, fsdp 1 either way.
    c.mesh.plan = "compile"
    c.mesh.memory_per_chip_gib = placeholder(float)  # None: the chip's memory; n: plan for n GiB per chip
    c.sharding = ml_collections.ConfigDict()
    c.sharding.fsdp_min_size = 2**10  # parameters with fewer elements stay replicated (at 512 chips the
    #                                   biases of 1152-6912 elements are 1/3 of the state per chip if replicated)
    # Logical axis rules: (logical name, mesh axis). Names come from dit_jax.sharding.PARAM_AXES.
    c.sharding.logical_axis_rules = (("heads", "tensor"), ("mlp", "tensor"))

    # ---- data (the contract with dit_jax.data; "digits" is dit_jax.data_digits) ----
    c.data = ml_collections.ConfigDict()
    c.data.name = "tfds"  # "digits" | "tfds" | "folder" | "latents"
    c.data.tfds_name = "imagenet2012"  # tfds dataset name
    c.data.data_dir = ""  # tfds data_dir ("" = tfds default)
    c.data.manual_dir = ""  # tfds manual_dir (ImageNet's tar files)
    c.data.split = "train"  # dataset split
    c.data.folder = ""  # for "folder": a folder of class sub-folders
    c.data.latents_dir = ""  # for "latents": pre-extracted VAE posteriors (dit-jax-extract-latents)
    c.data.image_size = resolution  # pixels (latent size is image_size / 8)
    c.data.random_flip = True  # horizontal flips
    c.data.encode_on_the_fly = True  # images -> VAE inside the train step (else latents are expected)
    c.data.vae = "ema"  # "mse" | "ema" | a path to converted VAE weights
    c.data.num_workers = 8  # host-side decode threads
    c.data.prefetch = 2  # batches prefetched per process
    c.data.shuffle_seed = placeholder(int)  # None: use c.seed

    # ---- checkpoints (orbax) ----
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 10_000  # save every N steps (and at the last step)
    c.checkpoint.keep = 3  # keep the K newest checkpoints
    c.checkpoint.async_save = True  # write in a background thread while training goes on
    c.checkpoint.resume = True  # resume from the newest complete checkpoint in workdir/checkpoints

    # ---- logging and samples ----
    c.log_every_steps = 100  # console + TensorBoard scalars (loss, grad norm, lr, steps/s, images/s)
    c.sample = ml_collections.ConfigDict()
    c.sample.every_steps = 20_000  # EMA sample grid PNG (and TensorBoard image); 0 disables
    c.sample.classes = (207, 360, 387, 974, 88, 979, 417, 279)  # class labels drawn in the grid
    c.sample.per_class = 1  # samples per class in the grid
    c.sample.respacing = "ddim50"  # sampler steps (dit_jax.diffusion respacing string)
    c.sample.cfg_scale = 4.0  # classifier-free guidance scale (1.0 = none)
    c.sample.seed = 0  # noise seed of the grid (same every time, so grids are comparable)
    # channels guided by CFG (3: the release's quirk; None: all eps channels)
    c.sample.guidance_channels = ml_collections.FieldReference(3, field_type=int)
    c.sample.clip_denoised = False  # clip predicted x_0 to [-1, 1] (useful in pixel space only)
    # ---- sample quality during training (dit_jax/training/sample_quality.py) ----
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # score the EMA model every N steps (and at the last step); 0: off
    c.eval.kind = "inception"  # "inception": FID, sFID, IS vs reference_stats; "digits": the digits network
    c.eval.num_samples = 10_000  # samples per evaluation (balanced classes; ADM uses 50,000 once at the end)
    c.eval.respacing = "ddim50"  # sampler steps
    c.eval.cfg_scale = 1.5  # guidance scale of the evaluation samples (the paper's FID-50K setting)
    c.eval.batch_size = 64  # samples per sampling call; images per device per Inception call
    c.eval.reference_stats = placeholder(str)  # .npz of mu, sigma, mu_s, sigma_s (dit-jax-eval --save-stats)
    c.eval.inception = placeholder(str)  # pytorch-fid's .pth or a converted .npz; None: download once
    c.eval.seed = 1  # noise of the evaluation samples (fixed: successive scores differ only by the weights)
    c.tensorboard = True  # write TensorBoard event files to workdir/tb (besides workdir/metrics.jsonl)
    return c
