"""Model FLOPs utilisation: the analytic training FLOPs of a DiT and the rated dense bf16 peak of each chip.

    flops = mfu.train_flops_per_example(model)            # 6 x forward multiply-adds (2 FLOPs each, fwd + 2x bwd)
    mfu.throughput_metrics(images_per_sec, model, devices) # {"tflops_per_device": ..., "mfu": ...}

The definition is the field's usual one (PaLM's "model FLOPs utilisation"): the FLOPs the model needs per
example -- forward multiply-adds x 2 FLOPs x 3 (forward, and a backward of twice the forward) -- whatever the
program really executes (rematerialised forwards, the VAE encoder of image batches, the optimizer and the
elementwise work are not counted), divided by the chip's RATED dense bf16 peak from its vendor (not a
measured matmul peak, not the 2:4-sparse figure). The training log, metrics.jsonl, TensorBoard,
`--compile-only` and benchmarks/gpu_bench.py all use these two functions. Unknown chips (and CPUs) get
TFLOP/s but no MFU.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, Optional, Sequence

GIGA = 1e9
TERA = 1e12


# ----------------------------------------------------------------------------------------------------
# Analytic FLOPs
# ----------------------------------------------------------------------------------------------------
def forward_macs(model) -> Dict[str, int]:
    """Multiply-adds of one forward pass of one example (the DiT paper's "Gflops"), split blocks / other.

    Counted from the layer shapes: per block the adaLN modulation (D x 6D), qkv (T x D x 3D), attention
    (QK^T and PV: 2 x T x T x D), proj (T x D x D) and the MLP (2 x T x D x 4D); outside the blocks the patch
    embedding, the timestep MLP and the final layer. benchmarks/flops.py checks it against the paper's Table 4
    (tests/test_compile_only.py: within 0.1%)."""
    p, d, depth = model.patch_size, model.hidden_size, model.depth
    t = (model.input_size // p) ** 2
    mlp = int(d * model.mlp_ratio)
    block = d * 6 * d + t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * mlp
    other = (t * p * p * model.in_channels * d  # patch embedding
             + 256 * d + d * d  # timestep MLP
             + d * 2 * d + t * d * p * p * model.out_channels)  # final layer
    return {"blocks": depth * block, "other": other, "total": depth * block + other}


def train_flops_per_example(model) -> float:
    """Model FLOPs of one training example: 2 FLOPs per multiply-add x 3 (forward + backward) x forward MACs."""
    return 2.0 * 3.0 * forward_macs(model)["total"]


# ----------------------------------------------------------------------------------------------------
# Rated peaks
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RatedPeak:
    name: str  # the chip as its vendor names it
    bf16_tflops: float  # dense (no 2:4 sparsity) bf16 matrix peak per chip (JAX device)
    source: str


_NV_H100 = ("NVIDIA H100 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h100/): BF16 Tensor "
            "Core {sparse} TFLOPS with sparsity, dense is half")
_TPU = "Cloud TPU system architecture, https://cloud.google.com/tpu/docs/{gen}: peak compute per chip (bf16)"
# (regular expression on jax.Device.device_kind, peak). A TPU v4/v5p JAX device is one chip (megacore).
RATED_PEAKS: Sequence = (
    (r"^NVIDIA H100 (80GB HBM3|SXM)", RatedPeak("H100 SXM", 989.4, _NV_H100.format(sparse="1,979"))),
    (r"^NVIDIA H100 PCIe", RatedPeak("H100 PCIe", 756.5, _NV_H100.format(sparse="1,513"))),
    (r"^NVIDIA H200$", RatedPeak("H200 SXM", 989.4, "NVIDIA H200 datasheet (https://www.nvidia.com/en-us/"
                                 "data-center/h200/): BF16 Tensor Core 1,979 TFLOPS with sparsity, dense is half "
                                 "(the H100's GH100 compute)")),
    (r"^NVIDIA A100", RatedPeak("A100", 312.0, "NVIDIA A100 datasheet (https://www.nvidia.com/content/dam/en-zz/"
                                "Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): "
                                "BF16 Tensor Core 312 TFLOPS (624 with sparsity), SXM and PCIe")),
    (r"^TPU v4$", RatedPeak("TPU v4", 275.0, _TPU.format(gen="v4"))),
    (r"^TPU v5 ?(lite|e)$", RatedPeak("TPU v5e", 197.0, _TPU.format(gen="v5e"))),
    (r"^TPU v5p?$", RatedPeak("TPU v5p", 459.0, _TPU.format(gen="v5p"))),
    (r"^TPU v6 ?(lite|e)$", RatedPeak("TPU v6e", 918.0, _TPU.format(gen="v6e"))),
)


def rated_peak(device_kind: str) -> Optional[RatedPeak]:
    """The rated dense bf16 peak of a `jax.Device.device_kind` ("NVIDIA H100 80GB HBM3", "TPU v5 lite"), or
    None for a chip not in RATED_PEAKS (an H100 NVL, a CPU, ...: better no MFU than a wrong one)."""
    for pattern, peak in RATED_PEAKS:
        if re.search(pattern, device_kind.strip()):
            return peak
    return None


# ----------------------------------------------------------------------------------------------------
# The numbers that get logged
# ----------------------------------------------------------------------------------------------------
def tflops_and_mfu(images_per_sec: float, flops_per_example: float, num_devices: int,
                   device_kind: str) -> Dict[str, float]:
    """{"tflops_per_device": model TFLOP/s per device, "mfu": that / the rated peak} ("mfu" only for a
    chip in RATED_PEAKS)."""
    tflops = images_per_sec * flops_per_example / num_devices / TERA
    out = {"tflops_per_device": tflops}
    peak = rated_peak(device_kind)
    if peak is not None:
        out["mfu"] = tflops / peak.bf16_tflops
    return out


def throughput_metrics(images_per_sec: float, model, devices) -> Dict[str, float]:
    """tflops_and_mfu for a run of `model` on `devices` (a mesh's devices: all of one kind)."""
    devices = list(devices)
    return tflops_and_mfu(images_per_sec, train_flops_per_example(model), len(devices), devices[0].device_kind)


def step_time_at(mfu: float, flops_per_device_per_step: float, peak_tflops: float) -> float:
    """Seconds per step at a given MFU (what `--compile-only` states for a pod)."""
    return flops_per_device_per_step / (mfu * peak_tflops * TERA)
