"""featurize/embedding.py: which rows ``Embedder.embed`` flags as unusable (a non-finite value
in either method's row or in any draw's norm, or a zero norm at any draw), and each
checkpoint's own projection seed."""

from __future__ import annotations

import numpy as np
import torch

import gradindex as gi
from gradindex.featurize import gradients
from gradindex.featurize.embedding import Embedder, projection_seed
from gradindex.inputs.models import load_checkpoints
from tests.conftest import scheduler, tiny_unet


def test_a_bad_value_in_any_part_of_a_row_flags_that_row_alone(monkeypatch):
    """Sample 1: a NaN in its ReTrac features only; 2: one draw's norm 0 of four; 3: one norm
    infinite; 0 and 4 untouched."""
    original = gradients.GradientFeaturizer.featurize

    def poisoned(self, x0, draws, cond=None, **kw):
        f = original(self, x0, draws, cond, **kw)
        f.retrac[1, 3] = float("nan")
        f.norms[2, 1] = 0.0
        f.norms[3, 2] = float("inf")
        return f

    monkeypatch.setattr(gradients.GradientFeaturizer, "featurize", poisoned)
    spec = gi.BuildSpec(proj_dim=16, timesteps=2, noise_draws=2, num_train_timesteps=1000)
    ckpts = load_checkpoints([(tiny_unet(1), scheduler())], None, None, "none")
    x0 = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    emb = Embedder(ckpts, spec, path="full").embed(x0)
    assert emb.flagged.tolist() == [False, True, True, True, False]
    assert np.isfinite(emb.tracin[1]).all() and np.isfinite(emb.tracin[3]).all()


def test_each_checkpoint_and_seed_gets_its_own_map():
    """P_c is seeded by (proj_seed, c): numpy's SeedSequence of the pair, so two checkpoints of
    one build never share a map and stored rows keep their meaning across versions."""
    seeds = {projection_seed(s, c) for s in (0, 1, 7) for c in range(4)}
    assert len(seeds) == 12
    want = int(np.random.SeedSequence([7, 2]).generate_state(1)[0])
    assert projection_seed(7, 2) == want
