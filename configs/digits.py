"""The embedded default: a small class-conditional DiT on scikit-learn's 8x8 digits, in pixel space.

No download, CPU only, a few minutes on 2 cores:
    dit-jax-train --config configs/digits.py --workdir runs/digits
Writes workdir/samples/step_*.png (one row per digit class, EMA model) and checkpoints.
"""
from configs import default


def get_config():
    c = default.get_config()
    c.num_steps = 2000  # about 5 minutes on 2 CPU cores
    c.global_batch_size = 128

    c.model.name = "DiT-S/4"  # patch size 4 on 8x8 pixels: 4 tokens of 16 pixels (cheap on a CPU)
    c.model.input_size = 8
    c.model.in_channels = 1
    c.model.num_classes = 10
    c.model.depth = 4  # a 0.8M-parameter DiT: 4 blocks of width 192 with 6 heads
    c.model.hidden_size = 192
    c.model.num_heads = 6

    c.optim.lr = 1e-3  # a tiny model on a tiny dataset tolerates (and needs) a larger step
    c.optim.warmup_steps = 100
    c.optim.grad_clip = 1.0
    c.ema_decay = 0.995  # short run: a 0.9999 EMA would still remember the random init (half-life ~140 steps)

    c.mesh.num_devices = 1  # on CPU one device is fastest; multi-device digits runs are for tests

    c.data.name = "digits"
    c.data.image_size = 8
    c.data.random_flip = False  # a flipped digit is another glyph
    c.data.encode_on_the_fly = False

    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 2
    c.log_every_steps = 100
    c.sample.every_steps = 500
    c.sample.classes = tuple(range(10))
    c.sample.per_class = 10
    c.sample.respacing = "ddim50"
    c.sample.cfg_scale = 1.0
    c.sample.guidance_channels = 0
    c.sample.clip_denoised = True
    return c
