"""The training program: build from a config, the typed state, the step, evaluation, sample grids, preemption, latent extraction."""
