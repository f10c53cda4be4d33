"""The paper's ImageNet recipe: DiT-XL/2 on 256 px images (32x32x4 VAE latents).

Every other config imports this one and overrides fields. Change a field on the command line with
`--config.optim.lr=2e-4`; a field that does not exist here is an error.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # base PRNG seed: init, per-step rngs (folded with the step) and the data order
    c.num_steps = 400_000  # total optimizer steps (the paper's ablations; its final XL/2 ran 7M)
    c.global_batch_size = 256  # examples per optimizer step over all processes
    c.grad_accum_steps = 1  # micro-batches per step (each micro-batch is global_batch_size / this)

    # ---- model (dit_jax.model.DiT_models) ----
    c.model = ml_collections.ConfigDict()
    c.model.name = "DiT-XL/2"  # one of DiT-{S,B,L,XL}/{2,4,8}
    c.model.input_size = 32  # spatial size of the model input: image_size / 8 for VAE latents
    c.model.in_channels = 4  # 4 VAE latent channels (1 for digits in pixel space)
    c.model.num_classes = 1000  # ImageNet classes (a null class is added when class_dropout_prob > 0)
    c.model.class_dropout_prob = 0.1  # label dropout for classifier-free guidance
    c.model.learn_sigma = True  # predict the variance too (output has 2 * in_channels channels)
    c.model.depth = 0  # 0: the size's standard depth; > 0 overrides it (small models)
    c.model.hidden_size = 0  # 0: the size's standard width; > 0 overrides it (small models, not convertible
    #                          to a release checkpoint name but exportable to .pt all the same)
    c.model.num_heads = 0  # 0: the size's standard head count; needed with hidden_size
    c.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (parameters stay float32)
    c.model.remat = False  # rematerialise each block in the backward pass (less memory, ~30% more compute)
    c.model.attention_impl = ""  # "": head-major matmuls (fastest on CPU); "xla", or "cudnn" (flash attention on GPU)

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
    # Axis sizes: n, -1 (the devices the other axes leave) or 0 = auto (dit_jax.mesh_plan: fsdp is the
    # smallest size whose estimated memory per chip fits the accelerator, data the rest; tensor > 1 only
    # when the micro-batch has fewer examples than there are devices). `--compile-only` reports the choice.
    c.mesh.data = 0  # data-parallel axis (the batch is split over data x fsdp)
    c.mesh.fsdp = 0  # parameters, optimizer state and EMA sharded over this axis (and the batch too)
    c.mesh.tensor = 0  # tensor (Megatron-style) parallel axis for attention heads and MLP hidden units
    c.mesh.num_devices = 0  # 0: all devices; n: only the first n (single-process debugging and tests)
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
    c.data.image_size = 256  # pixels (latent size is image_size / 8)
    c.data.random_flip = True  # horizontal flips
    c.data.encode_on_the_fly = True  # images -> VAE inside the train step (else latents are expected)
    c.data.vae = "ema"  # "mse" | "ema" | a path to converted VAE weights
    c.data.num_workers = 8  # host-side decode threads
    c.data.prefetch = 2  # batches prefetched per process
    c.data.shuffle_seed = 0  # 0: use c.seed

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
    c.sample.guidance_channels = 3  # channels guided by CFG (3: the release's quirk; 0: all eps channels)
    c.sample.clip_denoised = False  # clip predicted x_0 to [-1, 1] (useful in pixel space only)
    c.tensorboard = True  # write TensorBoard event files to workdir/tb (besides workdir/metrics.jsonl)
    return c
