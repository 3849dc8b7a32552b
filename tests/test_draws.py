"""draws.py: the draws' random numbers against hand-worked cases and the generator's own
sequence of calls written out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradindex.draws import draw_noise, draw_seed, grid_timesteps
from gradindex.errors import SpecError


def test_grid_timesteps_is_the_centred_grid_worked_by_hand():
    assert grid_timesteps(4, 1000) == [125, 375, 625, 875]  # (k + 1/2) * 1000 / 4
    assert grid_timesteps(3, 10) == [1, 5, 8]  # floor(5/3), floor(15/3), floor(25/3)
    assert grid_timesteps((7, 3, 3), None) == [7, 3, 3]  # an explicit list as given
    with pytest.raises(SpecError, match="num_train_timesteps"):
        grid_timesteps(4, None)


def test_draw_seed_depends_on_seed_k_and_m_only():
    seeds = {draw_seed(s, k, m) for s in range(3) for k in range(4) for m in range(3)}
    assert len(seeds) == 36  # every (seed, k, m) its own stream
    assert draw_seed(5, 2, 1) == draw_seed(5, 2, 1)
    assert 0 <= draw_seed(0, 0, 0) < 2**63
    state = np.random.SeedSequence([5, 2, 1]).generate_state(2, dtype=np.uint32)
    assert draw_seed(5, 2, 1) == (int(state[0]) << 31) ^ int(state[1])


def test_draw_noise_follows_the_training_scripts_order_of_random_calls():
    """ε, then the offset noise [C, 1, 1], then the input perturbation ξ, from one generator."""
    shape, seed = (3, 4, 5), 1234
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(shape, generator=gen)
    offset = torch.randn((3, 1, 1), generator=gen)
    xi = torch.randn(shape, generator=gen)

    target, inp = draw_noise(seed, shape, 0.0, 0.0)
    torch.testing.assert_close(target, eps)
    assert inp is target  # no perturbation: x_t is made from the target noise itself
    target, inp = draw_noise(seed, shape, 0.1, 0.0)
    torch.testing.assert_close(target, eps + 0.1 * offset)
    target, inp = draw_noise(seed, shape, 0.1, 0.05)
    torch.testing.assert_close(target, eps + 0.1 * offset)
    torch.testing.assert_close(inp, eps + 0.1 * offset + 0.05 * xi)
    # without an offset, ξ is the second call
    gen = torch.Generator().manual_seed(seed)
    eps, xi = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    target, inp = draw_noise(seed, shape, 0.0, 0.2)
    torch.testing.assert_close(inp, eps + 0.2 * xi)
