"""DiT-B/2 on 256 px ImageNet (32x32x4 latents); everything else is the paper recipe in default.py."""
from configs import default


def get_config():
    c = default.get_config()
    c.model.name = "DiT-B/2"
    c.model.input_size = 32  # image_size / 8
    c.data.image_size = 256
    return c
