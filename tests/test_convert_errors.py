"""Bad input: each case gives an error naming the key/shape/file and what was expected; the CLI exits
non-zero with one line and leaves nothing at OUT."""
import fractions
import os

import numpy as np
import pytest
import torch

import convert
from convert import ConversionError, writers
from dit_jax.cli import convert as cli
from convert.api import load_torch_checkpoint
from convert.reference.torch_dit import DiT_models


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return DiT_models["DiT-S/2"](depth=2, input_size=8, num_classes=10).state_dict()


def run_cli(capsys, *argv):
    rc = cli.main(list(map(str, argv)))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    return rc, errors


def assert_cli_fails(capsys, tmp_path, src, needle, *extra):
    out = tmp_path / "out"
    rc, errors = run_cli(capsys, "to-flax", src, out, *extra)
    assert rc == 1 and len(errors) == 1, errors
    assert needle in errors[0], errors[0]
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")], "temporary output left behind"
    return errors[0]


def test_missing_key(state, tmp_path, capsys):
    bad = dict(state)
    del bad["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"missing keys \(1\): \['blocks\.1\.mlp\.fc2\.bias'\]"):
        convert.torch_to_flax(bad)
    torch.save(bad, tmp_path / "bad.pt")
    assert_cli_fails(capsys, tmp_path, tmp_path / "bad.pt", "blocks.1.mlp.fc2.bias")


def test_unexpected_key(state, tmp_path, capsys):
    bad = dict(state, **{"blocks.0.attn.q_norm.weight": torch.ones(64)})
    with pytest.raises(ConversionError, match=r"unexpected keys \(1\): \['blocks\.0\.attn\.q_norm\.weight'\]"):
        convert.torch_to_flax(bad)
    torch.save(bad, tmp_path / "bad.pt")
    assert_cli_fails(capsys, tmp_path, tmp_path / "bad.pt", "q_norm")


def test_wrong_shape(state, tmp_path, capsys):
    bad = dict(state, **{"blocks.1.attn.proj.weight": torch.zeros(384, 380)})
    msg = r"key 'blocks\.1\.attn\.proj\.weight' has shape \(384, 380\), expected \(384, 384\)"
    with pytest.raises(ConversionError, match=msg):
        convert.torch_to_flax(bad)
    torch.save(bad, tmp_path / "bad.pt")
    assert_cli_fails(capsys, tmp_path, tmp_path / "bad.pt", "(384, 380), expected (384, 384)")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(state, tmp_path, capsys, suffix):
    full = tmp_path / f"full{suffix}"
    writers.write(state, {}, str(full), "pt" if suffix == ".pt" else "safetensors")
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ConversionError, match=rf"cut\{suffix}: truncated"):
        load_torch_checkpoint(str(cut))
    assert_cli_fails(capsys, tmp_path, cut, "truncated")


@pytest.mark.parametrize("name", ["notes.txt", "weights.pt", "weights.safetensors"])
def test_non_checkpoint_file(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_text("this is a text file, not a checkpoint\n" * 3)
    with pytest.raises(ConversionError, match=rf"{name}: .*(not a|truncated).*expected|{name}: not a \.safetensors"):
        load_torch_checkpoint(str(path))
    assert_cli_fails(capsys, tmp_path, path, name)


def test_missing_path_and_empty_dir(tmp_path, capsys):
    with pytest.raises(ConversionError, match="no such file or directory"):
        load_torch_checkpoint(str(tmp_path / "nope.pt"))
    (tmp_path / "empty").mkdir()
    assert_cli_fails(capsys, tmp_path, tmp_path / "empty", "directory without config.json")


def test_other_architecture(tmp_path, capsys):
    resnet = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                 torch.nn.Flatten(), torch.nn.Linear(8, 10))
    with pytest.raises(ConversionError, match=r"missing key 'x_embedder\.proj\.weight': this does not look like a "
                                              r"DiT state_dict \(first keys: \['0\.bias'"):
        convert.torch_to_flax(resnet.state_dict())
    torch.save(resnet.state_dict(), tmp_path / "resnet.pt")
    assert_cli_fails(capsys, tmp_path, tmp_path / "resnet.pt", "does not look like a DiT state_dict")


def test_pickle_with_objects_needs_unsafe_flag(state, tmp_path, capsys):
    path = tmp_path / "objects.pt"
    torch.save({"model": dict(state), "ema": dict(state), "note": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ConversionError, match=r"A pickle can run arbitrary code.*--unsafe-pickle"):
        load_torch_checkpoint(str(path))
    line = assert_cli_fails(capsys, tmp_path, path, "--unsafe-pickle")
    assert "fractions.Fraction" in line  # names what was refused
    params, cfg = load_torch_checkpoint(str(path), allow_pickle=True)
    assert cfg["depth"] == 2
    rc, errors = run_cli(capsys, "to-flax", path, tmp_path / "ok", "--unsafe-pickle")
    assert rc == 0 and not errors and (tmp_path / "ok" / "config.json").exists()


def test_train_checkpoint_without_ema(state, tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": dict(state), "opt": {}}, path)
    with pytest.raises(ConversionError, match=r"no 'ema' entry \(use --use-model"):
        load_torch_checkpoint(str(path))
    assert_cli_fails(capsys, tmp_path, path, "no 'ema' entry")
    rc, _ = run_cli(capsys, "to-flax", path, tmp_path / "out", "--use-model")
    assert rc == 0


def test_nonstandard_width_needs_num_heads():
    from convert.reference.torch_dit import DiT

    sd = DiT(input_size=8, hidden_size=96, depth=1, num_heads=3, num_classes=10).state_dict()
    with pytest.raises(ConversionError, match="width 96 is not a standard DiT width.*num_heads"):
        convert.torch_to_flax(sd)
    assert convert.torch_to_flax(sd, num_heads=3)[1]["num_heads"] == 3


def test_to_torch_errors_leave_nothing(state, tmp_path, capsys):
    from dit_jax.pretrained import save_pretrained

    params, cfg = convert.torch_to_flax(state)
    save_pretrained(params, cfg, tmp_path / "flax")
    out = tmp_path / "x.weird"
    rc, errors = run_cli(capsys, "to-torch", tmp_path / "flax", out)
    assert rc == 1 and "cannot tell the output format" in errors[0] and not out.exists()
    (tmp_path / "exists.pt").write_bytes(b"keep me")
    rc, errors = run_cli(capsys, "to-torch", tmp_path / "flax", tmp_path / "exists.pt")
    assert rc == 1 and "already exists" in errors[0] and (tmp_path / "exists.pt").read_bytes() == b"keep me"
    rc, errors = run_cli(capsys, "to-torch", tmp_path / "nope", tmp_path / "y.pt")
    assert rc == 1 and "nope: no such file" in errors[0] and not (tmp_path / "y.pt").exists()


@pytest.mark.filterwarnings("ignore:diffusers' DiTTransformer2DModel divides")  # expected, tested elsewhere
@pytest.mark.parametrize("fmt,out", [("pt", "o.pt"), ("safetensors", "o.safetensors"), ("diffusers", "odir")])
def test_writer_failure_is_atomic(state, tmp_path, monkeypatch, fmt, out):
    """A failure in the middle of writing (after bytes hit the disk) leaves neither OUT nor a temp file."""
    def half_then_fail(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", half_then_fail)
    monkeypatch.setattr(writers, "save_file", half_then_fail)
    params, cfg = convert.torch_to_flax(state)
    sd = convert.flax_to_torch(params, cfg, as_numpy=True)
    with pytest.raises(OSError, match="simulated"):
        writers.write(sd, cfg, str(tmp_path / out), fmt)
    assert os.listdir(tmp_path) == []


def test_flax_dir_errors(state, tmp_path):
    from dit_jax.pretrained import PretrainedError, load_pretrained, save_pretrained

    params, cfg = convert.torch_to_flax(state)
    with pytest.raises(PretrainedError, match=r"parameter 'blocks/adaLN_modulation_1/bias' has shape "
                                              r"\(2, 2304\), expected \(2, 3072\) for DiT\(depth=2, hidden_size=512"):
        save_pretrained(params, {**cfg, "hidden_size": 512, "num_heads": 8}, tmp_path / "f")
    assert not (tmp_path / "f").exists()
    save_pretrained(params, cfg, tmp_path / "f")
    (tmp_path / "f" / "config.json").write_text('{"_format": "dit_jax", "depth": 3, "hidden_size": 384, '
                                                '"input_size": 8, "num_classes": 10, "num_heads": 6}')
    with pytest.raises(PretrainedError, match=r"parameter 'blocks/adaLN_modulation_1/bias' has shape \(2, 2304\), "
                                              r"expected \(3, 2304\)"):
        load_pretrained(tmp_path / "f")
    (tmp_path / "f" / "config.json").write_text('{"_class_name": "DiTTransformer2DModel"}')
    with pytest.raises(PretrainedError, match="not a dit_jax config"):
        load_pretrained(tmp_path / "f")
    assert np.isfinite(params["blocks"]["attn"]["qkv"]["kernel"]).all()


def test_flax_to_torch_without_cfg_refuses():
    """Flax params do not determine the latent size (issue 13): no silent 32x32 pos_embed for a 512 px model."""
    torch.manual_seed(0)
    tm = DiT_models["DiT-S/8"](depth=1, input_size=64, num_classes=10)  # 512 px: 8x8 = 64 tokens
    params, cfg = convert.torch_to_flax(tm.state_dict())
    for bad_cfg in (None, {k: v for k, v in cfg.items() if k != "input_size"}):
        with pytest.raises(ConversionError, match=r"latent size is not in Flax params.*pass the model config"):
            convert.flax_to_torch(params, bad_cfg)
    sd = convert.flax_to_torch(params, cfg)
    assert sd["pos_embed"].shape == (1, 64, 384)
    tm.load_state_dict(sd, strict=True)
