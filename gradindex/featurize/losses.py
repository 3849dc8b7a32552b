"""The per-sample losses gradients are taken of: one definition each, for both gradient backends.

A loss is an elementwise function of (model output, regression target); one sample's loss is
its mean over that sample's elements (DESIGN §1). Both backends reduce the same function:
- ``diffusion_loss``: one sample's scalar loss (the vmap backend takes ``grad`` of it per item);
- ``item_losses`` / ``item_loss_fn``: a batch's per-item losses [I] (the hook and Kronecker
  backends differentiate their sum in one backward).

- ``noisy_input_and_target``: x_t and the regression target of one (x0, t, ε).
- ``loss_weights``: the per-timestep weight of a sample's loss that the run trained with
  (``BuildSpec.snr_weighting``), from diffusers' own ``training_utils.compute_snr``; the
  featurizer multiplies each item's gradient by it (the gradient of w(t)·ℓ is w(t)·∇ℓ).

To add a loss: add its elementwise function to ``ELEMENTWISE`` below and its name to
``gradindex.spec.LOSSES`` (which checks ``BuildSpec.loss`` and lists the CLI's ``--loss``
choices); tests/featurize/test_losses.py checks the two name the same losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradindex.errors import ModelError, SpecError
from gradindex.spec import BuildSpec

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


def loss_weights(spec: BuildSpec, scheduler: Any, prediction_type: str) -> Tensor | None:
    """w(t) for every training timestep t [T] (float32), or None when the spec weights
    nothing. snr(t) = ᾱ_t / (1 − ᾱ_t) from ``diffusers.training_utils.compute_snr``:
    'snr' → snr(t) (train_unconditional.py, sample prediction); 'min_snr' → min(snr, γ) / snr
    for epsilon, / (snr + 1) for v_prediction, unnormalised for sample (train_text_to_image*.py
    with --snr_gamma). Refuses weights that are not finite at the spec's timesteps."""
    if spec.snr_weighting == "none":
        return None
    from diffusers.training_utils import compute_snr  # loads only when a weighting is asked

    T = int(scheduler.config.num_train_timesteps)
    snr = compute_snr(scheduler, torch.arange(T))  # [T] float32
    if spec.snr_weighting == "snr":
        weights = snr
    else:
        weights = torch.minimum(snr, torch.full_like(snr, float(spec.snr_gamma)))
        if prediction_type == "epsilon":
            weights = weights / snr
        elif prediction_type == "v_prediction":
            weights = weights / (snr + 1)
    ts = spec.timestep_values()
    bad = [t for t, w in zip(ts, weights[torch.tensor(ts)].tolist()) if not math.isfinite(w)]
    if bad:
        raise ModelError(
            f"BuildSpec.snr_weighting={spec.snr_weighting!r} is not finite at timestep(s) "
            f"{bad[:5]} (snr(t) is 0 or infinite there); leave them out of BuildSpec.timesteps"
        )
    return weights.float()


def noisy_input_and_target(
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    eps_in: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε_in and the regression target of the scheduler's prediction
    type, made from ε (ε_in = ε unless the run trained with input perturbation).
    Shapes: x0, eps, eps_in [I, C, H, W]; t [I] (long)."""
    a = alphas_cumprod.to(x0.device, x0.dtype)[t].view(-1, 1, 1, 1)
    sa, s1a = a.sqrt(), (1.0 - a).sqrt()
    x_t = sa * x0 + s1a * (eps if eps_in is None else eps_in)
    if prediction_type == "epsilon":
        target = eps
    elif prediction_type == "v_prediction":
        target = sa * eps - s1a * x0
    elif prediction_type == "sample":
        target = x0
    else:
        raise SpecError(f"scheduler prediction_type {prediction_type!r} is not supported")
    return x_t, target
