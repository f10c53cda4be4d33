"""MFU (dit_jax/analysis/mfu.py): the analytic FLOPs, the rated peaks per device kind, and the values training logs."""
import json
import os

import pytest

from benchmarks.flops import measure, measure_model
from conftest import tiny_config
from dit_jax import compile_report, topology, train
from dit_jax.training import build
from dit_jax.analysis import mfu
from dit_jax.model import DiT_models


@pytest.mark.parametrize("kind,name,peak", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
    ("NVIDIA H200", "H200 SXM", 989.4),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("TPU v4", "TPU v4", 275.0),
    ("TPU v5 lite", "TPU v5e", 197.0),
    ("TPU v5", "TPU v5p", 459.0),
    ("TPU v5p", "TPU v5p", 459.0),
    ("TPU v6 lite", "TPU v6e", 918.0),
])
def test_rated_peaks_by_device_kind(kind, name, peak):
    got = mfu.rated_peak(kind)
    assert (got.name, got.bf16_tflops) == (name, peak) and got.source.startswith(("NVIDIA", "Cloud TPU"))


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA GeForce RTX 4090", "TPU v3"])
def test_unknown_chips_get_no_peak(kind):
    assert mfu.rated_peak(kind) is None
    assert set(mfu.tflops_and_mfu(10.0, 1e12, 1, kind)) == {"tflops_per_device"}


def test_every_topology_generation_has_a_rated_peak():
    """dit_jax/topology.py takes its bf16 peaks from mfu's table (one table): each TPU generation must be in it."""
    assert {g: mfu.rated_peak(spec["device_kind"]).bf16_tflops for g, spec in topology.GENERATIONS.items()} == \
        {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}


@pytest.mark.parametrize("name,latent", [("DiT-S/2", 32), ("DiT-B/4", 32), ("DiT-XL/2", 64)])
def test_forward_macs_equal_the_dots_of_the_lowered_program(name, latent):
    """The analytic count against every dot_general of the lowered forward (benchmarks/flops.py), depth 2."""
    model = DiT_models[name](input_size=latent, depth=2)
    assert mfu.forward_macs(model)["total"] == measure(name, 8 * latent, depth=2)[1]


@pytest.mark.slow
def test_training_logs_tflops_and_mfu_that_images_per_sec_and_the_flops_give(tmp_path, monkeypatch):
    """Each logged step's tflops_per_device and mfu, recomputed here from its images_per_sec, the dot MACs of the
    lowered model and a rated peak given to the CPU for the test."""
    monkeypatch.setattr(mfu, "RATED_PEAKS", tuple(mfu.RATED_PEAKS) + (("^cpu$", mfu.RatedPeak("test", 0.5, "test")),))
    cfg = tiny_config(num_steps=3)
    train.train_and_evaluate(cfg, str(tmp_path))
    model = build.build_model(cfg)
    macs = measure_model(model)[1]  # one example's forward, counted from the program
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        tflops = r["images_per_sec"] * 6 * macs / 8 / 1e12  # 8 simulated devices
        assert r["tflops_per_device"] == pytest.approx(tflops, rel=1e-9)
        assert r["mfu"] == pytest.approx(tflops / 0.5, rel=1e-9)


def test_compile_only_states_the_same_definition():
    """--compile-only's MFU fields: the model FLOPs per chip per step and the step time an MFU means."""
    model = DiT_models["DiT-XL/2"](input_size=32)
    f = compile_report.mfu_fields(model, 256, 256, "TPU v5 lite")
    per_chip = 6 * 118_640_000_000 * 256 / 256  # the paper's 118.64 GMACs per image (ours: within 0.1%)
    assert f["mfu_flops_per_chip"] == pytest.approx(per_chip, rel=1e-3)
    assert f["rated_peak_bf16_tflops"] == 197.0 and "cloud.google.com/tpu/docs/v5e" in f["rated_peak_source"]
    assert f["seconds_per_step_at_mfu"]["0.50"] == pytest.approx(f["mfu_flops_per_chip"] / (0.5 * 197e12))
    assert compile_report.mfu_fields(model, 256, 256, "cpu")["seconds_per_step_at_mfu"] == {}
