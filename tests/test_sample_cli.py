"""dit-jax-sample on a tiny converted PyTorch checkpoint: PNG grid, latents, seeding, errors, download path."""
import argparse
import functools
import http.server
import os
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturbed_torch_dit, rel_err
from convert import load_any
from dit_jax.cli import sample, sample_args
from dit_jax.diffusion import create_diffusion
from dit_jax.sampling import image_keys, latents_fn
from dit_jax.utils import xla_cpu
from dit_jax.utils.images import make_grid

TINY = dict(depth=2, input_size=8, num_classes=10)  # DiT-S/2 with 2 blocks on 8x8x4 latents


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(perturbed_torch_dit("DiT-S/2", **TINY).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def flax_ckpt(ckpt, tmp_path_factory):
    """The same weights as a dit_jax directory (what a command line reads without importing torch)."""
    from dit_jax.pretrained import save_pretrained

    model, params = load_any(ckpt)
    return save_pretrained(params, model, str(tmp_path_factory.mktemp("flax") / "tiny-flax"))


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    import diffusers
    torch.manual_seed(1)
    m = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                norm_num_groups=32, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "vae"
    m.save_pretrained(path)
    return str(path)


COMMON = ["--num-sampling-steps", "4", "--no-progress"]
# Where the property does not depend on the steps, the labels or the guidance: the same sampling program (2 DDPM
# steps, labels 1 2, the default cfg-scale 4; test_cli_faults' dit-jax-sample run too), compiled once (the
# compilation cache) and read by several tests.
SHARED = ["--num-sampling-steps", "2", "--no-progress", "--class-labels", "1", "2"]


def test_png_grid_with_tiny_vae(ckpt, tiny_vae_dir, tmp_path):
    out = tmp_path / "grid.png"
    lat = tmp_path / "lat.npy"
    sample.main(["--ckpt", ckpt, "--vae", tiny_vae_dir, "--class-labels", "1", "2", "3", "--cfg-scale", "4",
                 "--sampler", "ddim", "--out", str(out), "--save-latents", str(lat)] + COMMON)
    img = np.asarray(Image.open(out))
    # The tiny VAE downsamples by 2: 8x8 latents -> 16x16 images; 3 images in one row, 2 px black padding.
    assert img.shape == (16 + 4, 3 * 18 + 2, 3) and img.dtype == np.uint8
    assert img[:2].max() == 0 and img[2:18, 2:18].std() > 0
    z = np.load(lat)
    assert z.shape == (3, 8, 8, 4) and np.isfinite(z).all()
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


def test_latents_match_direct_loop_and_do_not_depend_on_batch_size(ckpt, tmp_path):
    runs = {}
    for bs in ("3", "2"):
        lat = tmp_path / f"lat{bs}.npy"
        sample.main(["--ckpt", ckpt, "--vae", "none", "--class-labels", "4", "5", "6", "--cfg-scale", "1.5",
                     "--batch-size", bs, "--out", str(tmp_path / f"g{bs}.png"), "--save-latents", str(lat)] + COMMON)
        runs[bs] = np.load(lat)
    assert rel_err(runs["2"], runs["3"]) <= 1e-5
    # The same numbers from the library calls the command is made of (DDPM, 4 steps, guided).
    model, params = load_any(ckpt)
    fn = latents_fn(model, create_diffusion("4"), "ddpm", cfg_scale=1.5)
    want = xla_cpu.jit(fn)(params, jnp.array([4, 5, 6]), image_keys(0, [0, 1, 2]))  # compiled as the command's
    assert rel_err(runs["3"], want) <= 1e-5
    # A different seed or guidance scale gives different latents.
    other = jax.jit(latents_fn(model, create_diffusion("4"), "ddpm", cfg_scale=1.0))(
        params, jnp.array([4, 5, 6]), image_keys(0, [0, 1, 2]))
    assert rel_err(other, want) > 1e-3


def test_errors_name_the_bad_flag(ckpt, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    cases = [
        (["--ckpt", ckpt, "--model", "DiT-XL/2", "--vae", "none"], "--model DiT-XL/2 expects depth=28"),
        (["--ckpt", ckpt, "--vae", "none", "--class-labels", "10"], "--class-labels [10]"),
        (["--ckpt", ckpt, "--vae", "none", "--image-size", "256", "--class-labels", "1"], "--image-size 256 does not match"),
        (["--ckpt", str(tmp_path / "missing.pt"), "--vae", "none"], "missing.pt: no such file"),
        (["--ckpt", ckpt, "--vae", "nowhere"], "--vae nowhere"),
    ]
    for flags, message in cases:
        assert sample.main(flags + ["--out", out] + COMMON) == 1, flags
        err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the one error line
        assert message in err[-1] and err[-1].startswith("dit-jax-sample: error:"), (flags, err)
        assert not any("Traceback" in line for line in err)
    assert not os.path.exists(out)


def test_attention_impl_flag_picks_the_kernel_and_keeps_the_latents(ckpt, tmp_path):
    """--attention-impl (default auto: the matmul kernel on CPU) reaches the model; xla gives the same latents."""
    lat = {}
    for impl in ("auto", "xla"):
        lat[impl] = tmp_path / f"{impl}.npy"
        flags = [] if impl == "auto" else ["--attention-impl", impl]
        assert sample.main(["--ckpt", ckpt, "--vae", "none", "--out", str(tmp_path / f"{impl}.png"),
                            "--save-latents", str(lat[impl])] + flags + SHARED) == 0
    assert rel_err(np.load(lat["xla"]), np.load(lat["auto"])) <= 1e-5
    p = argparse.ArgumentParser()
    sample_args.add_common_args(p)
    assert p.parse_args([]).attention_impl == "auto"
    model, _ = sample_args.load_model(p.parse_args(["--ckpt", ckpt, "--attention-impl", "pallas_tpu"]))
    assert model.attention_impl == "pallas_tpu"


def test_make_grid_layout():
    imgs = np.stack([np.full((2, 3, 3), i + 1, np.uint8) for i in range(5)])
    g = make_grid(imgs, nrow=4, padding=1)
    assert g.shape == (2 * 3 + 1, 4 * 4 + 1, 3)
    assert g[1, 1, 0] == 1 and g[1, 13, 0] == 4 and g[4, 1, 0] == 5 and g[4, 5, 0] == 0


def test_no_ckpt_downloads_release_file_from_local_server(ckpt, tmp_path, monkeypatch):
    """Without --ckpt the release DiT-XL/2 file is fetched into the cache (here from 127.0.0.1)."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(ckpt, served / "DiT-XL-2-256x256.pt")  # the tiny model under the release file name
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("DIT_JAX_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        cache = tmp_path / "cache"
        out = tmp_path / "dl.png"
        sample.main(["--vae", "none", "--cache-dir", str(cache), "--out", str(out)] + SHARED)
        assert (cache / "DiT-XL-2-256x256.pt").stat().st_size == (served / "DiT-XL-2-256x256.pt").stat().st_size
        assert out.exists()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_bfloat16_close_to_float32(ckpt, tmp_path):
    lat = {}
    for dt in ("float32", "bfloat16"):
        lat[dt] = tmp_path / f"{dt}.npy"
        sample.main(["--ckpt", ckpt, "--vae", "none", "--dtype", dt, "--out", str(tmp_path / f"{dt}.png"),
                     "--save-latents", str(lat[dt])] + SHARED)
    a, b = np.load(lat["bfloat16"]), np.load(lat["float32"])
    # bf16 matmuls: close, but not the float32 numbers (measured 1.4e-2 here, 1.7e-2 with 4 steps and cfg-scale 1;
    # 7.5e-2 with 4 steps and the guidance of 4)
    assert 0 < rel_err(a, b) <= 5e-2


def test_console_script_in_a_subprocess(flax_ckpt, tmp_path):
    """The `python -m dit_jax.cli.sample` entry point, with the progress bar on stderr."""
    ckpt = flax_ckpt
    import subprocess
    import sys

    out = tmp_path / "cli.png"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-m", "dit_jax.cli.sample", "--ckpt", ckpt, "--vae", "none",
                           "--class-labels", "3", "--num-sampling-steps", "3", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists() and "3/3" in proc.stderr and f"wrote {out}" in proc.stderr


def test_flax_directory_checkpoint_gives_the_same_latents(ckpt, flax_ckpt, tmp_path):
    flax_dir = flax_ckpt
    lat = {}
    for name, path in (("pt", ckpt), ("flax", flax_dir)):
        lat[name] = tmp_path / f"{name}.npy"
        sample.main(["--ckpt", path, "--vae", "none", "--out", str(tmp_path / f"{name}.png"),
                     "--save-latents", str(lat[name])] + SHARED)
    np.testing.assert_array_equal(np.load(lat["pt"]), np.load(lat["flax"]))


def test_checkpoint_without_learned_sigma(tmp_path):
    m = perturbed_torch_dit("DiT-S/2", seed=4, learn_sigma=False, **TINY)
    path = tmp_path / "fixed_sigma.pt"
    torch.save(m.state_dict(), path)
    lat = tmp_path / "z.npy"
    sample.main(["--ckpt", str(path), "--vae", "none", "--class-labels", "1", "2", "--out", str(tmp_path / "g.png"),
                 "--save-latents", str(lat), "--num-sampling-steps", "2", "--no-progress"])
    assert np.load(lat).shape == (2, 8, 8, 4)
