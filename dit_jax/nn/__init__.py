"""The DiT's building blocks: ops, attention kernels, timestep frequencies, remat policies, parameter layout."""
