"""PyTorch re-statements of the DiT release model and diffusion, for parity tests and speed benchmarks."""
