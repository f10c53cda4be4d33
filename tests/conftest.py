"""Shared test setup: 8 simulated CPU devices (set before JAX is imported), fixtures and the few helpers
several test files use. Tests import the helpers with `from conftest import ...` (pytest puts tests/ on the
path); nothing else here is imported across test files.
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One thread for PyTorch (OpenMP/MKL) and NumPy's OpenBLAS, here and in the command lines tests start (set before
# either is imported). Their pools of one thread per core spin while they wait for each other; on the 2-core
# machine, with the second pytest-xdist worker or other jobs on the other core, that cost 6x the CPU time and
# the wall time of one thread (measured: a DiT-S/2 depth-2 forward 2.5 vs 0.4 CPU-s for 50 calls, the digits
# scorer's MLP fit 6.6 vs 0.9 s, a 2048x2048 eigh 6.8 vs 1.1 s). XLA's own pool is not affected.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# NumPy's transparent-huge-page advice off (here and in the command lines): NumPy asks for huge pages on every
# array of 4 MB or more, and on a long-running machine the kernel compacts memory to find them, inside the
# allocating call. The full-depth XL/2's conversions and random params (2.7 GB per copy) spent 35 of their
# 45 CPU-s in the kernel that way, 13 of 22 with the advice off (tests/test_model_parity.py). Same values.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
# One XLA compilation cache for the session: this process, the pytest-xdist workers and every command line a
# test starts inherit it. Dozens of runs compile the same tiny training step; each compiles in ~9 s and loads
# from the cache in well under one. Entries are keyed by the program, the compile options and the jax
# version, so a cached program is the program that would have been compiled. Removed at the end of the run.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dit-jax-tests-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------------
def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the parity metric used throughout the tests."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def nhwc(x) -> np.ndarray:
    """(N, C, H, W) torch tensor or array -> (N, H, W, C) NumPy."""
    x = x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nchw(x) -> np.ndarray:
    """(N, H, W, C) -> (N, C, H, W) NumPy."""
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------
def perturbed_torch_dit(name: str = "DiT-S/2", seed: int = 0, **kwargs):
    """The PyTorch reference DiT `name` (kwargs to its factory), release init, then noise on every trained
    parameter: larger on the zero-initialised adaLN / output layers, so every block reaches the output."""
    import torch

    from convert.reference.torch_dit import DiT_models

    torch.manual_seed(seed)
    model = DiT_models[name](**kwargs).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key == "pos_embed":  # fixed sin-cos table, not trained
                continue
            std = 0.1 if ("adaLN" in key or key.startswith("final_layer")) else 0.02
            p.add_(torch.randn_like(p) * std)
    return model


def perturbed_jax_dit(seed: int = 0, scale: float = 0.05, **dit_kwargs):
    """(DiT(**dit_kwargs), params): the release init plus N(0, scale) noise, so no layer is zero."""
    import jax

    from dit_jax.model import DiT, init_params

    model = DiT(**dit_kwargs)
    params = init_params(model, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return model, jax.tree_util.tree_unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                                      for p, k in zip(leaves, keys)])


# ----------------------------------------------------------------------------------------------------
# Training configs
# ----------------------------------------------------------------------------------------------------
def set_fields(c, overrides: dict):
    """c["a.b"] = v for each dotted key of overrides."""
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def tiny_config(**overrides):
    """configs/digits.py shrunk to a 1-block width-32 DiT, 3 steps of batch 16 on all 8 simulated devices."""
    from configs import digits

    c = digits.get_config()
    c.num_steps = 3
    c.global_batch_size = 16
    c.model.depth = 1
    c.model.hidden_size = 32
    c.model.num_heads = 2
    c.mesh.num_devices = None  # all 8 simulated devices unless a test says otherwise
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.sharding.fsdp_min_size = 64  # so that the tiny parameters really get sharded
    c.optim.warmup_steps = 0
    c.checkpoint.every_steps = 0  # only at the end
    c.checkpoint.async_save = False
    c.log_every_steps = 1
    c.sample.every_steps = 0
    c.eval.every_steps = 0
    c.tensorboard = False
    return set_fields(c, overrides)


# The same tiny model as command-line overrides of configs/digits.py (for subprocess tests).
TINY_FLAGS = ["--config.model.depth=1", "--config.model.hidden_size=32", "--config.model.num_heads=2",
              "--config.global_batch_size=16", "--config.optim.warmup_steps=0", "--config.sharding.fsdp_min_size=64",
              "--config.log_every_steps=1", "--config.sample.every_steps=0", "--config.eval.every_steps=0",
              "--config.tensorboard=False"]


def train_command(workdir, *flags):
    """`python -m dit_jax.cli.train` on configs/digits.py with the tiny model and `flags`."""
    return [sys.executable, "-m", "dit_jax.cli.train", "--config", os.path.join(ROOT, "configs", "digits.py"),
            "--workdir", str(workdir), *TINY_FLAGS, *flags]


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
def write_folder(root, rng, per_class=(5, 4, 3), size=(40, 30)):
    """root/<class>/<i>.{png,jpg,JPEG,webp}: 12 images in 3 classes (of varying sizes), a nested sub-folder and
    a non-image file per class."""
    exts = [".png", ".jpg", ".JPEG", ".webp"]
    for c, n in enumerate(per_class):
        d = root / f"class_{c}"
        (d / "nested").mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size[1] + i, size[0], 3), dtype=np.uint8)
            where = d / "nested" if i == 0 else d
            Image.fromarray(arr).save(where / f"img{i}{exts[(c + i) % len(exts)]}")
        (d / "notes.txt").write_text("not an image")
    return root


def tfrecords(data: bytes) -> list:
    """The records of a TFRecord file's bytes ((uint64 length, crc, data, crc) each), checking both masked
    crc32c (a TensorBoard event file is one)."""
    import struct

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    out, pos = [], 0
    while pos < len(data):
        head = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", head)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(head)
        record = data[pos + 12:pos + 12 + n]
        assert len(record) == n and struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == masked_crc32c(record)
        out.append(record)
        pos += 16 + n
    return out


# ----------------------------------------------------------------------------------------------------
# Processes on 127.0.0.1
# ----------------------------------------------------------------------------------------------------
PORT_IN_USE = ("Address already in use", "address already in use", "Failed to bind", "bind failed")


def free_port() -> int:
    """A port that was free a moment ago; use it through `run_processes`, which retries if it was taken."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(make_cmd, n: int, timeout: float = 300, env=None, attempts: int = 3, cwd=ROOT,
                  on_start=None):
    """Start n processes `make_cmd(port, i)` that rendezvous on a fresh port and wait for them.

    A port picked by `free_port` can be taken by someone else before the coordinator binds it; then every
    process fails with a bind error and the whole group is started again on another port (up to `attempts`).
    `on_start(procs)` runs once the processes are up (e.g. to signal one). -> [(returncode, output)].
    """
    env = dict(os.environ if env is None else env)
    for attempt in range(attempts):
        port = free_port()
        procs = [subprocess.Popen(make_cmd(port, i), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(n)]
        try:
            if on_start is not None:
                on_start(procs)
            deadline = time.time() + timeout
            outs = [(p.communicate(timeout=max(1.0, deadline - time.time()))[0], p.returncode) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        if not any(rc != 0 and any(m in out for m in PORT_IN_USE) for out, rc in outs) or attempt == attempts - 1:
            return [(rc, out) for out, rc in outs]
    raise AssertionError("unreachable")


def env_without_xla_flags(**extra):
    """os.environ minus the 8-device XLA_FLAGS of the test process (workers choose their own)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(extra)
    return env


def tiny_vae(size: int = 16):
    """(AutoencoderKL, params): a tiny random VAE for the encoder side, its params drawn with NumPy (no flax
    init compile: keeps tests fast). The conv weights do not depend on the image size."""
    import jax
    import jax.numpy as jnp

    from dit_jax.vae import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    shapes = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                             method=AutoencoderKL.encode))["params"]
    r = np.random.default_rng(0)
    return vae, jax.tree.map(lambda s: (r.standard_normal(s.shape) * 0.3).astype(np.float32), shapes)


# ----------------------------------------------------------------------------------------------------
# Quick compiles where the numbers are compared only with themselves
# ----------------------------------------------------------------------------------------------------
# These modules test behaviour (errors, files, stopping and resuming, sharded against one device, two processes
# against one): every number they compare comes from programs compiled the same way. They compile with jax's
# `jax_disable_most_optimizations` (XLA's backend optimisation level 0), in this process and in the command
# lines they start (the variable is inherited): a third less CPU for the tiny training steps (measured on
# test_train_sharding + test_diffusion: 119 -> 77 CPU-s). Results differ from the optimised programs' in the
# last bits (~1e-7 relative), so every module that compares with PyTorch, float64 or NumPy references, or
# compiles for a TPU or GPU, keeps the programs users get; a module not named here does too.
FAST_COMPILE_MODULES = {
    "test_atomic", "test_bucket_writes", "test_checkpoint_agreement", "test_checksum", "test_cli_faults",
    "test_config_flag", "test_data_folder", "test_data_latents", "test_data_multiprocess", "test_data_preprocess",
    "test_data_tfds", "test_data_train", "test_data_uint8_images", "test_latents_bucket", "test_mesh_by_compiling", "test_paths",
    "test_preemption", "test_state_split", "test_train_batch_kinds", "test_train_errors", "test_train_eval",
    "test_train_resume", "test_train_sharding", "test_param_layout", "test_mfu", "test_sample_cli", "test_sample_many",
    "test_model_chunks", "test_model_options",
    "test_bucket_commands", "test_train_multihost",  # the first keeps its TPU compile and Inception optimised
}
_FAST = "JAX_DISABLE_MOST_OPTIMIZATIONS"


@pytest.fixture(scope="module", autouse=True)
def _compile_mode(request):
    """Quick compiles for FAST_COMPILE_MODULES (see above), the default programs for every other module."""
    import jax

    fast = request.module.__name__.rsplit(".", 1)[-1] in FAST_COMPILE_MODULES and os.environ.get(_FAST) != "0"
    if not fast:
        yield
        return
    saved = os.environ.get(_FAST)
    os.environ[_FAST] = "1"
    jax.config.update("jax_disable_most_optimizations", True)
    jax.clear_caches()  # no program compiled the other way is reused, nor one of these afterwards
    yield
    jax.config.update("jax_disable_most_optimizations", False)
    jax.clear_caches()
    if saved is None:
        os.environ.pop(_FAST, None)
    else:
        os.environ[_FAST] = saved


# ----------------------------------------------------------------------------------------------------
# Reference computations on one thread
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread_references():
    """PyTorch and NumPy's BLAS on one thread for a module (`pytestmark = pytest.mark.usefixtures(...)`), restored
    afterwards. On this machine's 2 shared cores their second thread mostly waits: measured on DiT forwards,
    PyTorch used 1.3x the CPU time on two threads, NumPy's float64 reference (OpenBLAS) 3x, and neither finished
    sooner. XLA's threads are left as they are (the compiled programs stay the ones users get)."""
    import torch
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency (the test extra)

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(saved)


# ----------------------------------------------------------------------------------------------------
# Cloud storage: a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py)
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def gcs_emulator():
    """One emulator per test process; its variables are set in os.environ (clients and child processes)."""
    from gcs_emulator import GcsEmulator

    emu = GcsEmulator()
    saved = {k: os.environ.get(k) for k in emu.env}
    os.environ.update(emu.env)
    yield emu
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    emu.stop()


@pytest.fixture
def gcs_dir(gcs_emulator, request):
    """A fresh gs:// folder for one test: gs://bkt/<test name>-<random>."""
    import uuid

    from gcs_emulator import BUCKET

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
    return f"gs://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


# ----------------------------------------------------------------------------------------------------
# Skips are failures in CI
# ----------------------------------------------------------------------------------------------------
# A skipped parity test (a missing optional package, a platform check) passes silently; CI installs every
# extra, so there it must not happen. `--fail-on-skip` (what .ci/run passes) prints every skip with its
# reason and turns the run's exit status into a failure; locally skips stay skips.
def pytest_addoption(parser):
    parser.addoption("--fail-on-skip", action="store_true",
                     help="exit with a failure if any test or test module was skipped (CI)")


_skips = []


def _record_skip(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report):  # a module-level skip (pytest.importorskip at import time)
    _record_skip(report)


def pytest_runtest_logreport(report):  # a skip mark, or pytest.skip() in a fixture or test
    _record_skip(report)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.getoption("--fail-on-skip") and _skips:
        terminalreporter.section("skipped tests (--fail-on-skip: the run fails)", sep="=", red=True)
        for line in _skips:
            terminalreporter.line(line)


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--fail-on-skip") and _skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def slow_except(names, quick):
    """Parametrize values: the names in `quick` as they are, every other one marked `slow` (pytest.ini: the
    quick loop keeps one or a few sizes of a check, the README command and CI run them all)."""
    return [n if n in quick else pytest.param(n, marks=pytest.mark.slow) for n in names]


def pytest_collection_modifyitems(session, config, items):
    """Modules with slow tests first (order inside a module kept): with pytest-xdist (`-n 2 --dist loadfile`,
    scripts/test.sh) the long modules then overlap instead of leaving one worker alone at the end."""
    slow_modules = {it.module.__name__ for it in items if it.get_closest_marker("slow") and hasattr(it, "module")}
    items.sort(key=lambda it: getattr(getattr(it, "module", None), "__name__", "") not in slow_modules)


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the controller made it; xdist workers share it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
