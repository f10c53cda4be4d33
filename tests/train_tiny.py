"""A tiny training config shared by the tests/test_train_*.py files (a 1-block DiT on 8x8 digits)."""
from configs import digits


def tiny_config(**overrides):
    c = digits.get_config()
    c.num_steps = 3
    c.global_batch_size = 16
    c.model.name = "DiT-S/4"
    c.model.depth = 1
    c.model.hidden_size = 32
    c.model.num_heads = 2
    c.mesh.num_devices = 0  # all 8 simulated devices unless a test says otherwise
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.sharding.fsdp_min_size = 64  # so that the tiny parameters really get sharded
    c.optim.warmup_steps = 0
    c.checkpoint.every_steps = 0  # only at the end
    c.checkpoint.async_save = False
    c.log_every_steps = 1
    c.sample.every_steps = 0
    c.tensorboard = False
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


# The same tiny model as command-line overrides of configs/digits.py (for subprocess tests).
TINY_FLAGS = ["--config.model.name=DiT-S/4", "--config.model.depth=1", "--config.model.hidden_size=32",
              "--config.model.num_heads=2", "--config.global_batch_size=16", "--config.optim.warmup_steps=0",
              "--config.sharding.fsdp_min_size=64", "--config.log_every_steps=1", "--config.sample.every_steps=0",
              "--config.tensorboard=False"]
