"""dit_jax: DiT (Diffusion Transformers) in JAX/Flax with weights that move both ways with PyTorch."""
from setuptools import find_packages, setup

# Model, diffusion and sampling need only the JAX stack; the data stack (tensorflow, tfds) is imported
# lazily so a GPU box without it can still sample and benchmark.
core = [
    "jax>=0.7",  # jax.shard_map
    "flax>=0.8.5",
    "optax>=0.2.2",
    "orbax-checkpoint>=0.6",
    "numpy",
    "pillow",
    "safetensors",
    "tqdm",
    "ml_collections",
    "huggingface_hub",
    "tensorboard",
    "etils[epath]",  # the one path type (dit_jax/utils/paths.py); orbax uses it too
    "gcsfs",  # gs:// paths through epath's fsspec backend
]
data = ["tensorflow-cpu", "tensorflow-datasets", "scikit-learn"]
torch_side = ["torch>=2.0", "diffusers>=0.30"]
# libtpu, at the version the installed jax pins: runs on TPU VMs, and on any machine compiles the training
# step for a TPU pod (`dit-jax-train --compile-only --topology v5e:16x16`, docs/tpu.md).
tpu = ["jax[tpu]"]
# The FID Inception parity tests also need pytorch-fid==0.3.0 and torchvision==0.28.0, installed with
# `pip install --no-deps` by scripts/setup_env.sh: as extras here, pip would resolve torchvision's torch pin
# and could pull a CUDA torch. dit_jax itself never imports either (nor torch outside convert/).

setup(
    name="dit_jax",
    version="0.1.0",
    description="DiT (Peebles & Xie) in JAX/Flax: training, sampling, and PyTorch weight conversion",
    packages=find_packages(include=["dit_jax", "dit_jax.*", "convert", "convert.*", "configs", "configs.*"]),
    python_requires=">=3.10",
    install_requires=core,
    extras_require={
        "data": data,
        "torch": torch_side,
        "tpu": tpu,
        "test": data + torch_side + ["pytest", "pytest-timeout", "pytest-xdist",
                                      "gcp-storage-emulator"],  # gs:// tests on 127.0.0.1
    },
    entry_points={
        "console_scripts": [
            "dit-jax-convert=dit_jax.cli.convert:main",
            "dit-jax-train=dit_jax.cli.train:main",
            "dit-jax-sample=dit_jax.cli.sample:main",
            "dit-jax-sample-many=dit_jax.cli.sample_many:main",
            "dit-jax-extract-latents=dit_jax.cli.extract_latents:main",
            "dit-jax-eval=dit_jax.cli.eval:main",
        ]
    },
)
