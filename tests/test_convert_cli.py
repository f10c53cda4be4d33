"""`dit-jax-convert` end to end on a tiny model: release .pt -> to-flax -> to-torch, outputs compared.

Tolerance: the converted Flax model matches the PyTorch model to rel_err <= 1e-5 (conftest.rel_err, float32
CPU); the .pt written back is bit-identical to the original, so its outputs are equal.
"""
import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import torch

from cli_inprocess import run_main
from conftest import ROOT, perturbed_torch_dit, rel_err
from convert.reference.torch_dit import DiT
from dit_jax.cli import convert as cli
from dit_jax.pretrained import load_pretrained


def tiny_release_pt(path):
    m = perturbed_torch_dit("DiT-S/4", depth=2, input_size=16, num_classes=10)
    torch.save(m.state_dict(), path)
    return m


@pytest.mark.filterwarnings("ignore:diffusers' DiTTransformer2DModel divides")  # expected, tested elsewhere
def test_to_flax_then_to_torch(tmp_path, capsys):
    tm = tiny_release_pt(tmp_path / "tiny.pt")
    assert cli.main(["to-flax", str(tmp_path / "tiny.pt"), str(tmp_path / "flax")]) == 0
    out = capsys.readouterr()
    cfg = json.loads(out.out.split(" ", 1)[1])  # "DiT {...}" on stdout: the inferred config
    assert cfg["depth"] == 2 and cfg["patch_size"] == 4 and cfg["num_classes"] == 10 and cfg["input_size"] == 16
    for step in ("reading", "converting 32 tensors", "writing"):
        assert step in out.err
    assert json.loads((tmp_path / "flax" / "config.json").read_text())["_format"] == "dit_jax"

    model, params = load_pretrained(tmp_path / "flax")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t, y = torch.tensor([10.0, 900.0]), torch.tensor([3, 7])
    with torch.no_grad():
        ref = tm(x, t, y).numpy()
    apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))  # one compile, not one per op
    out_jax = apply(params, x.permute(0, 2, 3, 1).numpy(), t.numpy(), y.numpy())
    err = rel_err(np.asarray(out_jax).transpose(0, 3, 1, 2), ref)
    print(f"\nCLI to-flax parity rel_err={err:.2e}")
    assert err <= 1e-5

    for fmt, name in (("pt", "back.pt"), ("train", "back_train.pt"), ("safetensors", "back.safetensors")):
        argv = ["to-torch", str(tmp_path / "flax"), str(tmp_path / name)] + (["--format", fmt] if fmt == "train" else [])
        assert cli.main(argv) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    original = torch.load(tmp_path / "tiny.pt", weights_only=True)
    assert list(back) == list(original) and all(torch.equal(back[k], original[k]) for k in original)
    m2 = DiT(input_size=16, patch_size=4, hidden_size=384, depth=2, num_heads=6, num_classes=10).eval()
    m2.load_state_dict(back, strict=True)
    with torch.no_grad():
        np.testing.assert_array_equal(m2(x, t, y).numpy(), ref)
    ema = torch.load(tmp_path / "back_train.pt", weights_only=True)["ema"]
    assert all(torch.equal(ema[k], original[k]) for k in original)
    # Re-encoding between PyTorch formats works too (safetensors -> diffusers folder -> flax).
    assert cli.main(["to-torch", str(tmp_path / "back.safetensors"), str(tmp_path / "diff")]) == 0
    assert (tmp_path / "diff" / "diffusion_pytorch_model.safetensors").exists()
    assert cli.main(["to-flax", str(tmp_path / "diff"), str(tmp_path / "flax2")]) == 0


def test_module_entry_point_and_no_torch_for_safetensors(tmp_path):
    """`python -m dit_jax.cli.convert` works as a program (a dit_jax directory to .safetensors: a process that
    needs no torch, ~1.4 CPU-s less); convert.load_any reads .safetensors without torch."""
    tiny_release_pt(tmp_path / "tiny.pt")
    assert cli.main(["to-flax", str(tmp_path / "tiny.pt"), str(tmp_path / "flax")]) == 0
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "dit_jax.cli.convert", "to-torch", str(tmp_path / "flax"),
                        str(tmp_path / "w.safetensors")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = run_main("dit-jax-convert", "to-flax", tmp_path / "missing.pt", tmp_path / "out")  # main(argv) here
    assert r.returncode == 1 and r.stderr.strip().endswith("dit_jax Flax directory") and not (tmp_path / "out").exists()
    code = ("import sys; from convert import load_any; "
            f"m, p = load_any({str(tmp_path / 'w.safetensors')!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(m.depth)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "2", r.stderr


def convert_command(*args):
    """dit-jax-convert's main(argv) in this process (test_module_entry_point_and_no_torch_for_safetensors and
    test_cli_faults start real ones): its exit code and stderr. A warning that did not go through the command's
    one-line printer would be printed by Python as "...: UserWarning: ..." in a process; here every warning is
    recorded instead, and there must be none."""
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        r = run_main("dit-jax-convert", *args)
    assert not escaped, [str(w.message) for w in escaped]
    return r


def warning_lines(r):
    return [l for l in r.stderr.splitlines() if "warning" in l.lower() and "TPU" not in l]


def test_writing_into_the_other_format_family_warns_in_one_line_with_the_measured_size(tmp_path):
    """release .pt -> diffusers folder, and that folder -> .pt: each one line naming the measured difference;
    release -> release says nothing."""
    from convert.diffusers_keys import GAP_RANDOM, GAP_TRAINED_FROM_DIFFUSERS, GAP_TRAINED_TO_DIFFUSERS

    tiny_release_pt(tmp_path / "tiny.pt")
    r = convert_command("to-torch", tmp_path / "tiny.pt", tmp_path / "diff", "--format", "diffusers")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = warning_lines(r)
    assert len(lines) == 1 and lines[0].startswith("dit-jax-convert: warning: diffusers' DiTTransformer2DModel "
                                                   "divides its timestep frequencies by (half - 1)"), r.stderr
    for number in (f"{GAP_TRAINED_TO_DIFFUSERS:.1%}", f"{GAP_RANDOM['DiT-S/2']:.0%} (S/2)",
                   f"{GAP_RANDOM['DiT-B/4']:.0%} (B/4)"):
        assert number in lines[0], (number, lines[0])
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr

    r = convert_command("to-torch", tmp_path / "diff", tmp_path / "back.pt")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = warning_lines(r)
    assert len(lines) == 1 and lines[0].startswith("dit-jax-convert: warning: these weights come from diffusers "
                                                   "(timestep_freq_shift=1.0, mlp_norm_eps=1e-06)"), r.stderr
    assert f"{GAP_TRAINED_FROM_DIFFUSERS:.1%}" in lines[0] and "this pt file" in lines[0], lines[0]

    r = convert_command("to-torch", tmp_path / "tiny.pt", tmp_path / "same.safetensors")
    assert r.returncode == 0 and warning_lines(r) == [], r.stderr[-3000:]
