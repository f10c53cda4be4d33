"""Noise schedules and timestep respacing for the Gaussian diffusion (float64 NumPy, computed once).

Facts follow the DiT / ADM release: linear betas 1e-4..0.02 scaled by 1000/steps, the
"squaredcos_cap_v2" cosine schedule of Nichol & Dhariwal with betas capped at 0.999, and respacing
strings "250" (evenly spread, per section), "10,10,10" (counts per equal section) or "ddim50"
(an exact integer stride).
"""
from __future__ import annotations

import math
from typing import Iterable, List, Sequence, Set, Union

import numpy as np


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """(T,) float64 betas for a named schedule."""
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if name == "linear":
        # The 1e-4..0.02 endpoints were chosen for 1000 steps; scaling keeps the schedule's shape for other T.
        scale = 1000.0 / num_diffusion_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_diffusion_timesteps,
                                   lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise_schedule {name!r}; expected 'linear' or 'squaredcos_cap_v2'")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Betas that make the cumulative product of (1 - beta) follow alpha_bar(s), s in [0, 1]."""
    betas = []
    for i in range(num_diffusion_timesteps):
        s1, s2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1.0 - alpha_bar(s2) / alpha_bar(s1), max_beta))
    return np.asarray(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> Set[int]:
    """The set of original timesteps kept by a respacing.

    "ddimN" takes every k-th step from 0 with the integer stride k that gives exactly N steps.
    Otherwise the T steps are cut into len(section_counts) equal sections (the first T % len sections one
    step longer) and each section of `size` steps keeps `count` of them, ends included: a position that
    starts at 0.0 and grows by the float stride (size - 1) / (count - 1) once per kept step, rounded
    half-to-even. The position is summed step by step, not computed as j * stride, because that is what
    the release does and the two round differently for many counts (e.g. "21" keeps 499, not 500).
    A count of 0 keeps nothing from its section (as in the release); at least one step must be kept.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            if desired == num_timesteps:
                return set(range(num_timesteps))
            raise ValueError(f"respacing {section_counts!r}: no integer stride gives exactly {desired} steps "
                             f"out of {num_timesteps}; use a plain count like '{desired}' instead")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError as e:
            raise ValueError(f"respacing {section_counts!r}: expected 'N', 'ddimN' or 'N1,N2,...'") from e
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    section_counts = list(section_counts)
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 0 or count > size:
            raise ValueError(f"respacing section {i} asks for {count} steps but has {size} (0..{size} allowed)")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))  # round() is half-to-even, as in the release
            position += stride
        start += size
    if not steps:
        raise ValueError(f"respacing {section_counts!r} keeps no timesteps")
    return set(steps)


def respace_betas(base_betas: np.ndarray, use_timesteps: Iterable[int]):
    """Betas of the sub-chain that visits only `use_timesteps` and keeps their alpha_bar values.

    Returns (new_betas float64 (K,), timestep_map int64 (K,)): step k of the new chain is original step
    timestep_map[k], which is what the model must be given.
    """
    use = set(int(t) for t in use_timesteps)
    alphas_cumprod = np.cumprod(1.0 - np.asarray(base_betas, np.float64))
    last, new_betas, timestep_map = 1.0, [], []
    for i, ac in enumerate(alphas_cumprod):
        if i in use:
            new_betas.append(1.0 - ac / last)
            last = ac
            timestep_map.append(i)
    if len(timestep_map) != len(use):
        bad = sorted(t for t in use if not 0 <= t < len(alphas_cumprod))
        raise ValueError(f"timesteps {bad[:5]} are outside 0..{len(alphas_cumprod) - 1}")
    return np.asarray(new_betas, np.float64), np.asarray(timestep_map, np.int64)


def parse_respacing(timestep_respacing, diffusion_steps: int) -> List[int]:
    """Sorted kept timesteps; None or "" means all of them."""
    if timestep_respacing is None or timestep_respacing == "":
        return list(range(diffusion_steps))
    return sorted(space_timesteps(diffusion_steps, timestep_respacing))
