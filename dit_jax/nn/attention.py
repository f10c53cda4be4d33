"""The attention kernels of the DiT and the "auto" choice among them (`DiT(attention_impl=...)`).

    out = attention.dot_product_attention(q, k, v, "auto")   # q, k, v, out: (N, T, H, Dh), softmax(q k^T / sqrt(Dh)) v

Implementations (all the same maths; tests/test_attention.py checks forward and gradient against "matmul"):
  "matmul"      head-major batched matmuls with a hand-written backward (model_ops.head_major_attention):
                the fastest on CPU (docs/performance.md).
  "xla"         `jax.nn.dot_product_attention(implementation="xla")`: XLA's own fusions on any platform.
  "cudnn"       cuDNN flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs; bf16/fp16 and a
                head dim that is a multiple of 8, <= 128: DiT's 64 and 72 qualify).
  "pallas_tpu"  Pallas splash attention for TPU (`jax.experimental.pallas.ops.tpu.splash_attention`; the
                logits never reach HBM), run per device under `shard_map` over the enclosing mesh.
  "auto"        (the default) resolved when the model is traced, from the platform the program is built for:
                CPU -> matmul; GPU -> cudnn where its shapes/dtypes allow, else xla; TPU -> pallas_tpu from
                PALLAS_TPU_MIN_TOKENS tokens (512 px), else xla.
None or "" mean "matmul" (the default before "auto" existed).

The platform of the computation is that of the enclosing mesh's devices (`jax.set_mesh(mesh)` or a legacy
`with mesh:` block: the training step and `--compile-only` run inside one, so a TPU topology compiled on a
CPU machine gets the TPU kernels), else JAX's default backend.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

try:  # the mesh of a legacy `with mesh:` block has no public accessor
    from jax._src import mesh as jax_mesh
except ImportError:  # a JAX that moved it: only jax.set_mesh meshes are seen
    jax_mesh = None

from dit_jax.nn.model_ops import head_major_attention, recomputing_attention
from dit_jax.nn.remat import ATTN_OUT, checkpoint_name

log = logging.getLogger("dit_jax.nn.attention")

IMPLEMENTATIONS = ("auto", "matmul", "xla", "cudnn", "pallas_tpu")
# Tokens from which "auto" takes the Pallas kernel on TPU. From --compile-only on v5e (DiT-XL/2, docs/performance.md
# "Attention kernels"): at 1024 tokens (512 px, patch 2) ~14% fewer HBM bytes per block and, from 4 examples per
# chip, 15% fewer temporaries; at 256 tokens no saving, so XLA's attention stays there.
PALLAS_TPU_MIN_TOKENS = 1024
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128  # Ampere's limit (Hopper takes 256); DiT's heads are 64 or 72 wide
_SPLASH_BLOCKS = (512, 256, 128)  # splash tiles must divide T; 128 is its lane width
_interpret = False  # run "pallas_tpu" through the Pallas interpreter (tests on CPU; see pallas_interpret)


def check_impl(impl: Optional[str]) -> str:
    """The canonical name of `impl`; a ValueError names the choices."""
    if impl in (None, ""):
        return "matmul"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention_impl {impl!r}; use one of {', '.join(IMPLEMENTATIONS)} "
                         f"(None means matmul)")
    return impl


# ----------------------------------------------------------------------------------------------------
# Which platform a program is built for, and "auto"
# ----------------------------------------------------------------------------------------------------
def context_mesh():
    """The concrete mesh of the enclosing `jax.set_mesh` / legacy `with mesh:` block, or None."""
    for get in (lambda: jax_mesh.get_concrete_mesh(), lambda: jax_mesh.thread_resources.env.physical_mesh):
        try:
            mesh = get()
        except AttributeError:  # an accessor this JAX version does not have (or no jax_mesh)
            continue
        if mesh is not None and not mesh.empty:
            return mesh
    return None


def computation_platform() -> str:
    """"cpu" | "gpu" | "tpu" | ...: the platform of the enclosing mesh's devices, else the default backend."""
    mesh = context_mesh()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def cudnn_eligible(dtype, head_dim: int) -> bool:
    return any(dtype == d for d in CUDNN_DTYPES) and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM


def pallas_tpu_eligible(seq_len: int) -> bool:
    return seq_len % _SPLASH_BLOCKS[-1] == 0


def resolve(impl: Optional[str], platform: str, seq_len: int, head_dim: int, dtype) -> str:
    """The implementation `impl` stands for on `platform` with these shapes ("auto" decided; others checked)."""
    impl = check_impl(impl)
    if impl != "auto":
        return impl
    if platform == "cpu":
        return "matmul"
    if platform == "gpu":
        return "cudnn" if cudnn_eligible(dtype, head_dim) else "xla"
    if platform == "tpu":
        return "pallas_tpu" if seq_len >= PALLAS_TPU_MIN_TOKENS and pallas_tpu_eligible(seq_len) else "xla"
    return "xla"


# ----------------------------------------------------------------------------------------------------
# The kernels
# ----------------------------------------------------------------------------------------------------
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: Optional[str] = "auto",
                          platform: Optional[str] = None, recompute_probs: bool = False) -> jax.Array:
    """Softmax attention, q/k/v (N, T, H, Dh) -> (N, T, H, Dh); `platform` default: computation_platform().

    The output is named remat.ATTN_OUT for the remat policies. recompute_probs: the "matmul" kernel's
    backward recomputes the probabilities instead of keeping them (model_ops.recomputing_attention)."""
    _, t, _, dh = q.shape
    name = check_impl(impl)
    if name == "auto":
        name = resolve(name, platform or computation_platform(), t, dh, q.dtype)
        if name == "cudnn":
            try:
                out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
                return checkpoint_name(out, ATTN_OUT)
            except (RuntimeError, NotImplementedError, ValueError) as e:  # no cuDNN, too old, a ROCm GPU...
                _warn_once(f"cuDNN attention unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                           f"using attention_impl='xla'")
                name = "xla"
    if name == "matmul":
        to_heads = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731  (N, T, H, Dh) <-> (N, H, T, Dh)
        kernel = recomputing_attention if recompute_probs else head_major_attention
        return to_heads(kernel(to_heads(q), to_heads(k), to_heads(v)))  # named ATTN_OUT inside (head-major)
    if name in ("xla", "cudnn"):
        return checkpoint_name(jax.nn.dot_product_attention(q, k, v, implementation=name), ATTN_OUT)
    return checkpoint_name(pallas_tpu_attention(q, k, v), ATTN_OUT)  # traces anywhere; compiles for TPU only


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


@contextlib.contextmanager
def pallas_interpret():
    """Within the block, "pallas_tpu" runs through the Pallas interpreter on any platform (tests on CPU)."""
    global _interpret
    old, _interpret = _interpret, True
    try:
        yield
    finally:
        _interpret = old


def _splash():
    from jax.experimental.pallas.ops.tpu import splash_attention  # TPU kernels: loaded only by programs using them

    return splash_attention


def _splash_blocks(t: int):
    splash = _splash()
    b = next(b for b in _SPLASH_BLOCKS if t % b == 0)
    return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                             block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def _splash_heads_major(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """(n, h, T, Dh) each -> (n, h, T, Dh): the splash kernel per example (full, non-causal mask)."""
    _, h, t, dh = q.shape
    splash = _splash()
    mask = splash.MultiHeadMask([splash.FullMask((t, t)) for _ in range(h)])
    kernel = splash.make_splash_mha(mask, block_sizes=_splash_blocks(t), head_shards=1, q_seq_shards=1,
                                    interpret=_interpret)
    scale = jnp.asarray(dh ** -0.5, q.dtype)  # splash does not scale the logits
    return jax.vmap(kernel)(q * scale, k, v)


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Splash attention on (N, T, H, Dh) q/k/v -> (N, T, H, Dh), per device under `shard_map`.

    A Pallas kernel is one custom call that XLA cannot split over devices, so over a mesh every device runs
    it on its own examples (and heads, when a "tensor" axis divides them); the batch and head axes go over
    whichever mesh axes divide them (the axes already manual, inside another shard_map, are left alone)."""
    n, t, h, dh = q.shape
    if not pallas_tpu_eligible(t):
        raise ValueError(f"attention_impl='pallas_tpu' needs a token count divisible by {_SPLASH_BLOCKS[-1]}, "
                         f"got {t}")
    to_heads = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731  (N, T, H, Dh) <-> (N, H, T, Dh)
    q, k, v = to_heads(q), to_heads(k), to_heads(v)  # each (N, H, T, Dh)
    spec = _device_spec(n, h)
    if spec is None:
        return to_heads(_splash_heads_major(q, k, v))
    mesh, pspec = spec
    fn = jax.shard_map(_splash_heads_major, mesh=mesh, in_specs=(pspec, pspec, pspec), out_specs=pspec,
                       check_vma=False)
    return to_heads(fn(q, k, v))


def _device_spec(n: int, h: int):
    """(mesh, PartitionSpec of (N, H, T, Dh)) splitting batch and heads over the free mesh axes, or None."""
    mesh = context_mesh()
    if mesh is None or mesh.size == 1:
        return None
    abstract = jax.sharding.get_abstract_mesh()
    manual = set() if abstract.empty else {a for a, kind in zip(abstract.axis_names, abstract.axis_types)
                                          if kind == jax.sharding.AxisType.Manual}
    free = [a for a in mesh.axis_names if a not in manual and mesh.shape[a] > 1]
    heads = "tensor" if "tensor" in free and h % mesh.shape["tensor"] == 0 else None
    batch, size = [], 1
    for a in free:  # in mesh order, as the batch sharding (data, fsdp...) lists them
        if a != "tensor" and n % (size * mesh.shape[a]) == 0:
            batch.append(a)
            size *= mesh.shape[a]
    if not batch and heads is None:
        return None
    return mesh, P(tuple(batch) or None, heads, None, None)
