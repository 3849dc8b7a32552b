"""Per-item gradients from one batched forward/backward, via module hooks (Opacus / BackPACK style).

Holds:
- ``HookGradients``: per-item gradients of Σ_i loss_i over selected parameters of ``Linear``,
  ``Conv2d``, ``GroupNorm``, ``LayerNorm`` and ``Embedding`` (class labels) modules. A forward
  hook keeps each selected module's input a (per call: a module may run twice) and wraps its
  output in a ``Tap``, whose backward receives δ = ∂(Σ_i loss_i)/∂output and forms the per-item
  gradient right away, in place in the result (Linear: g_W[i] = Σ_pos δ[i]ᵀ a[i]; Conv2d: the
  same over the kh×kw patches of a; norms: Σ_pos δ ⊙ x̂ with x̂ recomputed from a; bias: Σ_pos δ;
  Embedding: δ[i] scattered into the rows a[i] indexes), then drops a. The result is [I, p]
  rows (``item_gradients``) or the same numbers as one contiguous [I, n] block per parameter
  (``item_gradient_blocks``, what builds use: torch runs a batched matmul as one MKL call only
  when its output batch is contiguous).
- ``SUPPORTED_MODULES``: the module types whose parameters it can differentiate.

The taps, the call's output and the errors: ``gradindex.featurize.taps``; the per-module
gradient rules and the forward hook: ``gradindex.featurize.layer_grads``.

Assumption: the model is *batch-independent*: item i's output depends on item i's input only
(a diffusers ``UNet2DModel`` in eval mode is: GroupNorm and attention act per sample). Then the
gradient of Σ_i loss_i with respect to item i's activations is item i's own gradient, and the
per-item weight gradients above are exact. BatchNorm breaks this; ``supports`` refuses models
holding it, and models holding parameters in modules of types it does not know.

No parameter gradient is ever formed by autograd: every selected module output passes through an
identity ``Tap`` tied to a scalar leaf (the anchor), and the backward is
``torch.autograd.grad(Σ loss, anchor)``, so autograd runs only the input-gradient path from the
loss down to the earliest selected module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from gradindex.errors import ModelError
from gradindex.featurize.layer_grads import forward_hook
from gradindex.featurize.taps import Call, forward_hooks, parameter_owners, run_taps

logger = logging.getLogger(__name__)

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Embedding,
)
# modules known to act on each item separately; they may hold (unselected) parameters
_PER_ITEM_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _module_ok(module: nn.Module, attr: str) -> bool:
    if type(module) not in SUPPORTED_MODULES or attr not in ("weight", "bias"):
        return False
    if isinstance(module, nn.Embedding):  # max_norm rewrites the weight in the forward
        return module.max_norm is None and not module.scale_grad_by_freq
    return not (isinstance(module, nn.Conv2d) and module.padding_mode != "zeros")


class HookGradients:
    """Per-item gradients of Σ_i loss_i from one batched forward/backward, via module hooks."""

    def __init__(
        self,
        model: nn.Module,
        param_names: list[str],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        precision: str = "float32",
    ):
        """``loss_fn(output [I, ...], target [I, ...]) -> per-item losses [I]``; the columns of
        ``item_gradients`` follow ``param_names``, each parameter flattened as ``p.reshape(-1)``;
        ``precision``: the forward's (``BuildSpec.precision``; gradients are float32 either way)."""
        if not self.supports(model, param_names):
            raise ModelError(
                "HookGradients supports Linear, Conv2d (zero padding), GroupNorm, LayerNorm and "
                "Embedding parameters of batch-independent models (no BatchNorm); use the vmap path"
            )
        self.model = model
        self.param_names = list(param_names)
        self.loss_fn = loss_fn
        self.precision = precision
        named = dict(model.named_parameters())
        owners = parameter_owners(model)
        offset = 0
        # module → {"weight": (start, stop), "bias": (start, stop)} column ranges
        self._slots: dict[nn.Module, dict[str, tuple[int, int]]] = {}
        for name in self.param_names:
            p = named[name]
            for module, attr in owners[id(p)]:
                self._slots.setdefault(module, {})[attr] = (offset, offset + p.numel())
            offset += p.numel()
        self.num_params = offset
        self._all_slots = {s for slots in self._slots.values() for s in slots.values()}
        self._blocks = sorted(self._all_slots)  # column ranges in order: they tile [0, p)
        self._clone = False

    @staticmethod
    def supports(model: nn.Module, param_names: list[str]) -> bool:
        """True iff every selected parameter belongs to a supported module and the model holds
        no BatchNorm nor parameters in modules of unknown type (batch independence)."""
        named = dict(model.named_parameters())
        owners = parameter_owners(model)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                return False
            if any(True for _ in module.parameters(recurse=False)) and not isinstance(
                module, SUPPORTED_MODULES + _PER_ITEM_MODULES
            ):
                return False
        for name in param_names:
            if name not in named:
                return False
            if not all(_module_ok(m, attr) for m, attr in owners[id(named[name])]):
                return False
        return True

    def item_gradients(
        self,
        x_t: Tensor,
        t: Tensor,
        target: Tensor,
        out: Tensor | None = None,
        cond: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """x_t [I, C, H, W], t [I] long, target [I, C, H, W] → per-item gradients [I, p] float32,
        columns in the order of ``param_names``. ``out``: an [I, p] float32 buffer to write into
        (reusing one saves page-faulting fresh memory on every call); returned. ``cond``: the
        model's per-item conditioning keyword arguments (``class_labels`` [I], ...)."""
        n = x_t.shape[0]
        if out is None:
            out = torch.empty(n, self.num_params, device=x_t.device, dtype=torch.float32)
        elif out.shape != (n, self.num_params) or out.dtype != torch.float32 or out.stride(1) != 1:
            raise ValueError(f"out must be a row-major float32 [{n}, {self.num_params}] tensor")
        self._run(x_t, t, target, cond, lambda: Call(out, self._clone))
        return out

    def column_blocks(self) -> list[tuple[int, int]]:
        """The selected parameters' column ranges [start, stop), in order; they tile [0, p)."""
        return list(self._blocks)

    def item_gradient_blocks(
        self,
        x_t: Tensor,
        t: Tensor,
        target: Tensor,
        flat: Tensor | None = None,
        cond: dict[str, Tensor] | None = None,
    ) -> list[Tensor]:
        """The numbers of ``item_gradients`` laid out parameter by parameter: block j, the [I, n_j]
        columns ``column_blocks()[j]`` of every item, is contiguous at flat[I·start_j : I·stop_j].
        Why: a per-item weight gradient (a batched matmul) written into the columns of [I, p]
        rows has a batch stride of p, and torch then runs it item by item instead of as one MKL
        batch; into a block it runs batched.
        ``flat``: a float32 buffer of at least I·p elements to write into (kept by the caller)."""
        n = x_t.shape[0]
        if flat is None:
            flat = torch.empty(n * self.num_params, device=x_t.device, dtype=torch.float32)
        elif flat.dtype != torch.float32 or flat.numel() < n * self.num_params:
            raise ValueError(f"flat must be a float32 buffer of at least {n * self.num_params}")
        flat = flat.reshape(-1)[: n * self.num_params]
        self._run(x_t, t, target, cond, lambda: Call(flat.view(n, -1), self._clone, True))
        return [flat[n * a : n * b].view(n, b - a) for a, b in self._blocks]

    def _run(
        self,
        x_t: Tensor,
        t: Tensor,
        target: Tensor,
        cond: dict[str, Tensor] | None,
        new_call: Callable[[], Call],
    ) -> None:
        try:
            self._write_all(x_t, t, target, cond, new_call())
        except RuntimeError as exc:
            if self._clone or "custom Function" not in str(exc):
                raise
            # the model modifies a selected module's output in place, which autograd forbids on
            # the view Tap returns: tap copies instead (same numbers, one copy per output)
            logger.info(
                "a selected module's output is modified in place; tapping copies of outputs"
            )
            self._clone = True
            self._write_all(x_t, t, target, cond, new_call())

    def _write_all(
        self, x_t: Tensor, t: Tensor, target: Tensor, cond: dict[str, Tensor] | None, call: Call
    ) -> None:
        with self._hooks(call):
            run_taps(self.model, self.loss_fn, x_t, t, target, cond, call.anchor, self.precision)
        for slot in self._all_slots - call.written:  # parameters the forward never used
            call.target(slot, (slot[1] - slot[0],))[0].zero_()

    def _hooks(self, call: Call) -> AbstractContextManager[None]:
        return forward_hooks((m, forward_hook(slots, call)) for m, slots in self._slots.items())
