"""The random numbers of one (timestep, noise) draw: a pure function of (seed, k, m).

Every sample uses the same K·M draws (common random numbers), so a training image embedded at
query time reproduces its stored row; ``BuildSpec.draws`` lists them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gradindex.errors import SpecError


def draw_seed(seed: int, k: int, m: int) -> int:
    """A 63-bit seed that depends only on (seed, k, m) (numpy SeedSequence mixing)."""
    state = np.random.SeedSequence([int(seed), int(k), int(m)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def draw_noise(
    seed: int, shape: Sequence[int], noise_offset: float, input_perturbation: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(target noise, input noise) of one draw, in diffusers' training scripts' order of random
    calls: ε [C, H, W]; then, with noise_offset, ε += offset · N(0, 1) of shape [C, 1, 1];
    then, with input_perturbation p, the noise x_t is made from is ε + p · N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    if noise_offset:
        offset = torch.randn((shape[0], 1, 1), generator=gen, dtype=torch.float32)
        eps = eps + noise_offset * offset
    if not input_perturbation:
        return eps, eps
    xi = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    return eps, eps + input_perturbation * xi


def grid_timesteps(timesteps: int | tuple[int, ...], num_train_timesteps: int | None) -> list[int]:
    """The K timesteps: an explicit list as given; a count K gives the centred grid
    t_k = floor((k + ½)·T / K) over the scheduler's training range T."""
    if isinstance(timesteps, tuple):
        return list(timesteps)
    if num_train_timesteps is None:
        raise SpecError(
            "BuildSpec.num_train_timesteps is not set: build_index fills it from the scheduler; "
            "set it yourself to call draws() directly"
        )
    T, K = num_train_timesteps, timesteps
    return [int((k + 0.5) * T / K) for k in range(K)]
