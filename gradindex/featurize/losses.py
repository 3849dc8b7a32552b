"""The per-sample losses gradients are taken of: one definition each, for both gradient backends.

A loss is an elementwise function of (model output, regression target); one sample's loss is
its mean over that sample's elements (DESIGN §1). Both backends reduce the same function:
- ``diffusion_loss``: one sample's scalar loss (the vmap backend takes ``grad`` of it per item);
- ``item_losses`` / ``item_loss_fn``: a batch's per-item losses [I] (the hook and Kronecker
  backends differentiate their sum in one backward).

To add a loss: add its elementwise function to ``ELEMENTWISE`` below and its name to
``gradindex.spec.LOSSES`` (which checks ``BuildSpec.loss`` and lists the CLI's ``--loss``
choices); tests/test_losses.py checks the two name the same losses.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from gradindex.errors import SpecError

ELEMENTWISE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": lambda output, target: (output - target).pow(2),  # DDPM's training loss
    "l1": lambda output, target: (output - target).abs(),  # the ReTrac paper's reference
    "square": lambda output, target: output.pow(2),  # D-TRAK: the output's own size, no target
}


def elementwise(loss: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The elementwise function of the loss named ``loss``."""
    try:
        return ELEMENTWISE[loss]
    except KeyError:
        raise SpecError(f"unknown loss {loss!r}; one of {', '.join(ELEMENTWISE)}") from None


def diffusion_loss(output: Tensor, target: Tensor, loss: str) -> Tensor:
    """One sample's loss: the mean over its elements."""
    return elementwise(loss)(output, target).mean()


def item_losses(output: Tensor, target: Tensor, loss: str) -> Tensor:
    """Per-item ``diffusion_loss`` of a batch: output, target [I, ...] → [I]."""
    return elementwise(loss)(output, target).flatten(1).mean(1)


def item_loss_fn(loss: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``item_losses`` for the loss named ``loss`` as a two-argument function (the ``loss_fn``
    of ``HookGradients`` / ``KroneckerGradients``); an unknown name fails here, not at the first
    backward."""
    fn = elementwise(loss)
    return lambda output, target: fn(output, target).flatten(1).mean(1)
