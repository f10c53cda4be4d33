"""DiT-XL/2 on 512 px ImageNet (64x64x4 latents); everything else is the paper recipe in default.py."""
from configs import default


def get_config():
    c = default.get_config()
    c.model.name = "DiT-XL/2"
    c.model.input_size = 64  # image_size / 8
    c.data.image_size = 512
    c.model.remat = True  # 1024 tokens per image: activations dominate memory
    c.model.dtype = "bfloat16"
    return c
