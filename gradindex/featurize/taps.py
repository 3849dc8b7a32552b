"""The hook machinery both hook backends share: taps on module outputs, one call's output.

Holds:
- ``Tap``: an identity on a module output whose backward hands δ = ∂(Σ_i loss_i)/∂output to a
  callback; tied to a scalar leaf (the anchor), so ``run_taps``, which differentiates with
  respect to the anchor only, runs every tap and forms no parameter gradient.
- ``Call``: the output buffer of one gradient call ([I, p] rows, or the same numbers laid out
  parameter by parameter) and which parameters' slots were written.
- ``parameter_owners``: every (module, attribute) holding each parameter (shared weights
  included).
- ``HookError``: a model the hooks cannot follow but ``vmap`` can; ``in_place_error``: a model
  that changes a layer's input in place after the layer used it (no backend can follow that).

Used by ``persample.HookGradients`` (per-item gradients) and ``kronecker.KroneckerGradients``
(per-item projected gradients); the per-module rules are in ``layer_grads``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from gradindex.errors import ModelError
from gradindex.featurize.precision import compute_precision
from gradindex.inputs.models import model_output


class HookError(ModelError):
    """The model does something the hook backend cannot follow but the vmap backend can."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"{reason}; the hook gradient backend cannot follow it: use backend='vmap'"
        )
        self.reason = reason


def in_place_error(module: nn.Module) -> ModelError:
    """A layer input changed in place after the layer's forward: its weight gradient (and
    autograd's own) would be computed from the changed values."""
    name = type(module).__name__
    return ModelError(
        f"the model modifies the input of a {name} in place after the {name} used it, so its "
        "gradient cannot be computed; make that operation out of place (x = x * 2, not x.mul_(2))"
    )


@contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Each (module, hook) registered as a keyword-taking forward hook for the block, then
    removed, whatever happens inside."""
    handles = [module.register_forward_hook(hook, with_kwargs=True) for module, hook in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def saved_input(
    module: nn.Module, args: tuple, kwargs: dict, output: Tensor, items: int
) -> Callable[[], Tensor]:
    """The input of a hooked layer call, checked to hold one row per item, kept for the
    backward: the function returns it once (then frees it), refusing it if it was modified in
    place after the layer used it."""
    a = (args[0] if args else kwargs["input"]).detach()
    if a.shape[0] != items or output.shape[0] != items:
        raise HookError(
            f"a {type(module).__name__} saw a leading dimension of {a.shape[0]}, not the "
            f"{items} items (the model moves the batch dimension)"
        )
    saved, version = {"a": a}, a._version

    def take() -> Tensor:
        a = saved.pop("a")  # freed once this layer's gradient is formed
        if a._version != version:
            raise in_place_error(module)
        return a

    return take


def parameter_owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) → every (module, attribute) holding it directly (shared weights included)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    seen: set[int] = set()
    for module in model.modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module, attr))
    return owners


def run_taps(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x_t: Tensor,
    t: Tensor,
    target: Tensor,
    cond: dict[str, Tensor] | None,
    anchor: Tensor,
    precision: str = "float32",
) -> None:
    """One forward and the backward of Σ_i loss_i down to ``anchor``, which runs every ``Tap``
    the registered hooks put on module outputs (and computes no parameter gradient). The forward
    runs in ``precision`` (``BuildSpec.precision``), the loss in float32 of its output."""
    n = x_t.shape[0]
    with torch.enable_grad():
        with compute_precision(precision, x_t.device):
            output = model_output(model, x_t, t, cond)
        losses = loss_fn(output.float(), target)  # [I]
        if losses.shape != (n,):
            raise ValueError(
                f"loss_fn must return per-item losses of shape [{n}], got {tuple(losses.shape)}"
            )
        if losses.requires_grad:
            torch.autograd.grad(losses.sum(), anchor, allow_unused=True)


class Call:
    """State of one gradient call: the output, the anchor, the slots written. The output is
    [I, p] rows, or (``blocked``) the same I·p numbers laid out parameter by parameter
    (``HookGradients.item_gradient_blocks``), passed as its [I, p]-shaped view."""

    def __init__(self, out: Tensor, clone: bool, blocked: bool = False):
        self.out = out  # [I, p]
        self.items = out.shape[0]
        self.clone = clone
        self.blocked = blocked
        self.anchor = torch.zeros((), device=out.device, requires_grad=True)
        self.written: set[tuple[int, int]] = set()

    def target(self, slot: tuple[int, int], shape: tuple[int, ...]) -> tuple[Tensor, bool]:
        """The [I, *shape] view of one parameter's numbers, and whether this is its first write
        (else the caller accumulates: a module called twice, or a weight shared by two)."""
        first = slot not in self.written
        self.written.add(slot)
        n = self.items
        if self.blocked:  # contiguous over items too: batched matmuls write it in one call
            return self.out.view(-1)[n * slot[0] : n * slot[1]].view(n, *shape), first
        return self.out[:, slot[0] : slot[1]].view(n, *shape), first

    def write(self, slot: tuple[int, int], g: Tensor) -> None:
        view, first = self.target(slot, tuple(g.shape[1:]))
        if first:
            view.copy_(g)
        else:
            view += g


class Tap(torch.autograd.Function):
    """Identity on a module output whose backward hands δ to ``on_grad``; its second input (the
    anchor) is what ``torch.autograd.grad`` differentiates with respect to, so autograd runs
    every tap and no parameter gradient."""

    @staticmethod
    def forward(
        ctx, x: Tensor, anchor: Tensor, on_grad: Callable[[Tensor], None], clone: bool
    ) -> Tensor:
        ctx.on_grad = on_grad
        return x.clone() if clone else x

    @staticmethod
    def backward(ctx, delta: Tensor) -> tuple[Tensor, None, None, None]:
        ctx.on_grad(delta)
        return delta, None, None, None
