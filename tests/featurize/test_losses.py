"""The one loss definition (gradindex.featurize.losses) against torch's own losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradindex.errors import SpecError
from gradindex.featurize.losses import (
    ELEMENTWISE,
    diffusion_loss,
    item_loss_fn,
    item_losses,
    noisy_input_and_target,
)
from gradindex.spec import LOSSES, BuildSpec

# independent definitions: torch.nn.functional, one sample at a time
REFERENCE = {
    "mse": lambda out, target: F.mse_loss(out, target),
    "l1": lambda out, target: F.l1_loss(out, target),
    "square": lambda out, target: F.mse_loss(out, torch.zeros_like(out)),
}


def test_every_spec_loss_is_defined_once_and_only_those():
    """A loss added to one list and not the other fails here, not at the first build."""
    assert set(ELEMENTWISE) == set(LOSSES) == set(REFERENCE)


@pytest.mark.parametrize("loss", LOSSES)
def test_both_reductions_match_torch(loss):
    gen = torch.Generator().manual_seed(0)
    out, target = torch.randn(5, 2, 3, 4, generator=gen), torch.randn(5, 2, 3, 4, generator=gen)
    want = torch.stack([REFERENCE[loss](out[i], target[i]) for i in range(5)])
    torch.testing.assert_close(item_losses(out, target, loss), want)
    torch.testing.assert_close(item_loss_fn(loss)(out, target), want)
    for i in range(5):  # the vmap backend's form: one sample with a leading item axis of 1
        torch.testing.assert_close(diffusion_loss(out[i : i + 1], target[i : i + 1], loss), want[i])


def test_unknown_loss_is_a_spec_error():
    with pytest.raises(SpecError, match="unknown loss 'huber'"):
        item_loss_fn("huber")
    with pytest.raises(SpecError, match="unknown loss"):
        diffusion_loss(torch.zeros(1, 2), torch.zeros(1, 2), "huber")
    with pytest.raises(SpecError):
        BuildSpec(loss="huber")


def test_unknown_prediction_type_is_a_spec_error():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(SpecError, match=r"^scheduler prediction_type 'flow' is not supported$"):
        noisy_input_and_target(x, x, torch.zeros(1, dtype=torch.long), torch.ones(3) / 2, "flow")
