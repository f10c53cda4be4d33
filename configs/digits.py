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

    # A custom size, none of the 12: 4 blocks of width 192 with 6 heads, 2.84M parameters. Patch size 4 on
    # 8x8 pixels gives 4 tokens of 16 pixels (cheap on a CPU).
    c.model.name = None
    c.model.patch_size = 4
    c.model.depth = 4
    c.model.hidden_size = 192
    c.model.num_heads = 6
    c.model.input_size = 8
    c.model.in_channels = 1
    c.model.num_classes = 10

    c.optim.lr = 1e-3  # a tiny model on a tiny dataset tolerates (and needs) a larger step
    c.optim.warmup_steps = 100
    c.optim.grad_clip = 1.0
    c.ema_decay = 0.995  # short run: a 0.9999 EMA would still remember the random init (half-life ~140 steps)

    c.mesh.num_devices = None  # all devices (a plain CPU is one device; tests simulate 8)

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
    c.sample.guidance_channels = None  # all channels (no guidance at cfg_scale 1 anyway)
    c.sample.clip_denoised = True
    c.eval.every_steps = 250  # the quality curve: digits_fd and digits_class_acc (metrics.jsonl, TensorBoard)
    c.eval.kind = "digits"
    c.eval.num_samples = 500
    c.eval.respacing = "ddim25"
    c.eval.cfg_scale = 1.0
    c.eval.batch_size = 500
    return c
