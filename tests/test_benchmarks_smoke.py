"""Each benchmark runs once on a tiny config so it does not rot (timings are not checked here; the sampling
benchmark's JAX and PyTorch DDIM outputs are: the speed ratio must compare the same computation).
benchmarks/attention_tpu's smoke run is in tests/test_attention.py, on the programs that module compiles anyway."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dit_jax.analysis import mfu
from dit_jax.model import DiT_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def quick_compiles(monkeypatch):
    """conftest's quick compiles (jax_disable_most_optimizations, here and in the processes a test starts) for
    one test: the smoke runs that check only that a benchmark runs and reports its numbers. The tests that
    compare JAX with PyTorch (sampling) or read TPU memory (pods, attention) keep the programs users get."""
    import jax

    if os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") == "0":  # conftest's opt-out
        yield
        return
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    jax.config.update("jax_disable_most_optimizations", True)
    jax.clear_caches()
    yield
    jax.config.update("jax_disable_most_optimizations", False)
    jax.clear_caches()


def test_flops_matches_table4_for_s2():
    from benchmarks.flops import PAPER_GFLOPS, measure

    params, macs, xla_half = measure("DiT-S/2", 256)
    assert params == 32_963_360
    # The paper's "Gflops" are multiply-adds of the matmuls; ours must agree within 1%.
    assert abs(macs / 1e9 - PAPER_GFLOPS[("DiT-S/2", 256)]) / PAPER_GFLOPS[("DiT-S/2", 256)] < 0.01
    assert xla_half >= macs  # XLA also counts elementwise work


@pytest.mark.slow
def test_throughput_tiny(quick_compiles):
    from benchmarks import throughput

    res = throughput.main(["--tiny"])
    for key in ("jax_forward_ips", "torch_forward_ips", "jax_train_ips", "torch_train_ips"):
        assert res[key] > 0


def test_sampling_tiny():
    from benchmarks import sampling

    res = sampling.main(["--tiny"])
    assert set(res) == {"ddim5", "ddpm5"}
    assert all(r["jax_s"] > 0 and r["torch_s"] > 0 for r in res.values())
    # Same weights, same noise, eta 0: the PyTorch loop (convert/torch_diffusion.py) and the JAX loop agree.
    # (Measured 9e-7; giving the PyTorch model the respaced index instead of the original timestep: 1.9e-2.)
    assert res["ddim5"]["ddim_rel_diff"] <= 1e-4, res["ddim5"]["ddim_rel_diff"]


@pytest.mark.slow
def test_gpu_script_runs_on_cpu_tiny(tmp_path, quick_compiles):
    """benchmarks/gpu.sh end to end with the imports of the GPU machine (tests/gpu_box_env: no tensorflow, tfds,
    diffusers): every section runs, the JSON has each number the GPU run is for."""
    path = os.pathsep.join([str(ROOT / "tests" / "gpu_box_env"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "PYTHONPATH": path}
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny"], check=True, env=env, cwd=ROOT,
                   capture_output=True, text=True, timeout=600)
    res = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert "errors" not in res, res["errors"]
    for key in ("jax_train_ips", "torch_train_ips", "train_ratio", "jax_sample_s_per_image",
                "torch_sample_s_per_image", "sample_speedup", "measured_peak_tflops"):
        assert res[key] > 0, key
    assert res["xla_sweep"]["defaults"]["vs_defaults"] == 1.0 and len(res["xla_sweep"]) == 2  # --tiny: 1 candidate
    # the product's step: the config's model, "auto" attention (head-major matmuls on a CPU)
    assert res["jax_attention"] == "matmul" and res["train_gflop_per_image"] == pytest.approx(
        6 * mfu.forward_macs(DiT_models["DiT-S/2"](input_size=8, depth=2))["total"] / 1e9)
    assert "8 images through FeatureExtractor.extract" in (tmp_path / "inception_speed.log").read_text()


@pytest.mark.slow
def test_inception_speed_tiny(quick_compiles):
    from benchmarks import inception_speed

    res = inception_speed.main(["--tiny", "--images", "8"])
    names = {r["name"] for r in res}
    assert "jax-fused" in names and "extract" in names and all(r["images_per_s"] > 0 for r in res)


@pytest.mark.slow
def test_compile_time_tiny(quick_compiles):
    from benchmarks import compile_time

    res = compile_time.main(["--tiny", "--unrolled"])
    assert res["depth"] == 2 and res["forward_s"] > 0 and res["train_step_s"] > 0 and res["train_step_unrolled_s"] > 0


def test_fsdp_split_table(capsys):
    from benchmarks import fsdp_split

    assert fsdp_split.main(["--models", "DiT-L/2", "--fsdp", "96", "256"]) == 0
    out = capsys.readouterr().out
    assert "| 96 | **2.01** |" in out and "| 256 | 1.00 |" in out  # 96 = 32 x 3: no width of L/2 has a 3


@pytest.mark.slow
def test_pod_table_batch_per_chip_and_reprint(tmp_path, capsys):
    from benchmarks import pod_table

    out = tmp_path / "rows.jsonl"
    args = ["--configs", "configs/digits.py", "--pods", "v5e:2x2", "--config.model.depth=1", "--per-chip", "1", "4",
            "--table", "batch", "--out", str(out)]
    assert pod_table.main(args) == 0
    first = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[1] for line in first[2:]] == ["4", "16"]  # global batch = per chip x 4 chips
    assert pod_table.main(["--from", str(out), "--table", "pods"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 2 and all("data-parallel by choice" in r and "| float32 | save_qkv_proj | v5e:2x2 |" in r for r in rows)  # TPU's default
    reports = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["overrides"] for r in reports] == [["--config.model.depth=1"]] * 2


def test_pod_table_reads_configs_and_overrides_as_dit_jax_train(monkeypatch, capsys):
    """--configs and --config.FIELD=VALUE through dit-jax-train's loader (shipped names, ml_collections' types,
    each override applied to every config); no compile: compile_for_topology records what it is given."""
    from benchmarks import pod_table
    from dit_jax import compile_report

    seen = []
    monkeypatch.setattr(compile_report, "compile_for_topology",
                        lambda cfg, topo: seen.append((cfg, topo.name)) or {"fits": True})
    monkeypatch.setitem(pod_table.TABLES, "pods", ("HEADER", lambda r: f"ROW {r['config']}"))
    args = ["--configs", "digits", "configs/default.py:B/2", "--pods", "v5e:2x2", "--config.model.depth=1",
            "--config.model.dtype", "bfloat16", "--config.model.remat=true", "--config.mesh.num_devices=4"]
    assert pod_table.main(args) == 0
    assert capsys.readouterr().out.splitlines() == ["HEADER", "ROW digits", "ROW configs/default.py:B/2"]
    assert [c.model.name for c, _ in seen] == [None, "DiT-B/2"] and {t for _, t in seen} == {"v5e:2x2"}
    for c, _ in seen:
        assert (c.model.depth, c.model.dtype, c.model.remat, c.mesh.num_devices) == (1, "bfloat16", True, 4)


@pytest.mark.parametrize("args, line", [
    (["--config.model.nope=1"], "benchmarks.pod_table: error: unknown config field in --config.model.nope: "),
    (["--config.model.depth=two"], "benchmarks.pod_table: error: flag --config.model.depth=two: invalid literal"),
    (["--configs", "nope.py"], "benchmarks.pod_table: error: --config nope.py: no such file"),
])
def test_pod_table_config_errors_are_one_line_before_any_compile(monkeypatch, capsys, args, line):
    from benchmarks import pod_table
    from dit_jax import compile_report

    monkeypatch.setattr(compile_report, "compile_for_topology", lambda *a: pytest.fail("compiled"))
    with pytest.raises(SystemExit) as e:  # the interpreter prints the message on stderr and exits 1
        pod_table.main(["--configs", "digits", *args])
    assert isinstance(e.value.code, str) and e.value.code.startswith(line) and "\n" not in e.value.code, e.value.code
    assert capsys.readouterr().out == ""


def test_pod_table_old_set_flag_names_the_new_syntax(monkeypatch, capsys):
    from benchmarks import pod_table
    from dit_jax import compile_report

    monkeypatch.setattr(compile_report, "compile_for_topology", lambda *a: pytest.fail("compiled"))
    with pytest.raises(SystemExit) as e:
        pod_table.main(["--set", "data.name=latents"])
    assert e.value.code == 2 and "config overrides are --config.FIELD=VALUE" in capsys.readouterr().err
