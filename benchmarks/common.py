"""Shared pieces of the JAX-vs-PyTorch benchmarks: one set of weights for both, the release's PyTorch training
step, and a timer that waits for the device. The JAX training step is the product's (benchmarks/product_step.py)."""
from __future__ import annotations

import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn: Callable[[], object], sync: Callable[[object], None], warmup: int, iters: int) -> float:
    """Median seconds per call of fn() after `warmup` calls; `sync` blocks until the result is ready."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def timed_interleaved(fns: Dict[str, Callable[[], object]], syncs: Dict[str, Callable[[object], None]],
                      warmup: int, iters: int) -> Dict[str, Dict[str, float]]:
    """Times several functions round-robin (A B A B ...) so that load from other processes hits all alike.

    Returns name -> {"s": median wall seconds, "cpu_s": median process CPU seconds, "min_s", "max_s"}.
    """
    for _ in range(warmup):
        for name, fn in fns.items():
            syncs[name](fn())
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            syncs[name](fn())
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: {"s": float(np.median(wall[name])), "cpu_s": float(np.median(cpu[name])),
                   "min_s": float(min(wall[name])), "max_s": float(max(wall[name]))} for name in fns}


def jax_sync(x) -> None:
    jax.block_until_ready(x)


def torch_sync_fn(device: str) -> Callable[[object], None]:
    import torch

    def sync(_):
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return sync


def make_pair(name: str, latent: int, num_classes: int = 1000, depth=None, seed: int = 0, device: str = "cpu"):
    """(flax module, flax params, torch module) holding the same random weights (non-zero adaLN/output)."""
    import torch

    import convert
    from convert.reference.torch_dit import DiT_models as TorchModels
    from dit_jax.model import DiT

    torch.manual_seed(seed)
    kw = {} if depth is None else {"depth": depth}
    tmodel = TorchModels[name](input_size=latent, num_classes=num_classes, **kw)
    with torch.no_grad():
        for p in tmodel.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    params, cfg = convert.torch_to_flax(tmodel.state_dict())
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return DiT(**cfg), params, cfg, tmodel.to(device)


def make_torch_train_step(tmodel, tdiffusion, lr: float = 1e-4, ema_decay: float = 0.9999,
                          autocast_dtype=None, forward=None) -> Callable:
    """The release's train.py step: AdamW, diffusion loss, backward, EMA update. Returns step(x, y, t, noise).

    `forward` is an optional torch.compile'd wrapper of tmodel used for the forward/backward."""
    import copy

    import torch

    forward = tmodel if forward is None else forward

    opt = torch.optim.AdamW(tmodel.parameters(), lr=lr, weight_decay=0)
    ema = copy.deepcopy(tmodel).requires_grad_(False)
    trainable = [p for _, p in tmodel.named_parameters() if p.requires_grad]
    ema_params = [e for (_, e), (_, p) in zip(ema.named_parameters(), tmodel.named_parameters()) if p.requires_grad]
    device_type = next(tmodel.parameters()).device.type
    tmodel.train()

    def step(x, y, t, noise):
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = tdiffusion.training_losses(lambda a, b: forward(a, b, y), x, t, noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(ema_params, ema_decay)
            torch._foreach_add_(ema_params, trainable, alpha=1 - ema_decay)
        return loss

    return step


def batch_inputs(batch: int, latent: int, num_classes: int, seed: int = 0) -> Dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    return {
        "x": rs.randn(batch, 4, latent, latent).astype(np.float32),  # NCHW; JAX side transposes
        "y": rs.randint(0, num_classes, size=batch).astype(np.int64),
        "t": rs.randint(0, 1000, size=batch).astype(np.int64),
        "noise": rs.randn(batch, 4, latent, latent).astype(np.float32),
    }
