"""Sparse-JL rows of per-item gradients formed one layer at a time: memory that scales with
activations, not with items × parameters.

The default path (``GradientFeaturizer``) writes each gradient call's per-item gradients as
[items, p] floats, aggregates them into [B, 2, p] TracIn / ReTrac features and projects those:
at 35.7M parameters that is 2.3 GB per 16 items plus 4.6 GB of features. Projection is linear
and the sjlt map acts on column ranges independently (``SJLTProjector.add_columns``), so here
each layer's per-item gradient, formed in the backward hook a few items at a time in a small
reused buffer, is at once

- squared and summed into its items' full-space norms (and its groups' sums, the norm of a
  mean over M noise draws),
- projected by its columns of the same map P_c and added into the items' [items, d] rows,

and dropped. Rows then aggregate in projected space: P a_c = mean_k P g_k and P r_c =
mean_k P ḡ_k / ‖ḡ_k‖ with the exact norms, the numbers of the default path up to float32
summation order (tested against a per-sample autograd loop). No [items, p] buffer exists.

Holds ``StreamedFeaturizer`` (a ``GradientFeaturizer`` whose rows are these projections) and
``streamable`` (whether a model and spec can take this path).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradindex.errors import ModelError
from gradindex.featurize.gradients import MAX_ITEMS, GradientFeaturizer
from gradindex.featurize.layer_grads import factor_dtypes, write_layer_grads
from gradindex.featurize.persample import HookGradients
from gradindex.featurize.projection import SJLTProjector, make_projector
from gradindex.featurize.scratch import scratch
from gradindex.featurize.taps import Call, HookError, Tap, forward_hooks, run_taps, saved_input
from gradindex.inputs.models import Checkpoint
from gradindex.spec import BuildSpec

# cap on one layer's per-item gradients held at once (items are taken in chunks below it)
LAYER_BYTES = 32 * 2**20


def streamable(model: nn.Module, param_names: list[str], spec: BuildSpec) -> bool:
    """True when the streamed path can compute this spec's rows: an sjlt projection, a model the
    layer hooks support, and every selected parameter held by one module (a weight shared by
    two modules would need the cross terms of both in its norm)."""
    if spec.projection != "sjlt" or not HookGradients.supports(model, param_names):
        return False
    named = dict(model.named_parameters())
    holders: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    return all(holders.get(id(named[n]), 0) == 1 for n in param_names)


@dataclass
class _StreamCall:
    """One gradient call's projected rows and norms, filled layer by layer by the hooks."""

    rows_t: Tensor  # [d, I]: P g_i as columns
    item_sq: Tensor  # [I]
    group_sq: Tensor  # [I / group]
    group: int
    anchor: Tensor
    seen: set[nn.Module] = field(default_factory=set)


class StreamedFeaturizer(GradientFeaturizer):
    """Per-item gradients projected layer by layer by the checkpoint's sjlt map P_c (``seed``):
    rows [I, d] and exact full-space norms, so TracIn / ReTrac aggregate in projected space."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        spec: BuildSpec,
        seed: int,
        device: str | torch.device = "cpu",
        max_items: int = MAX_ITEMS,
    ):
        super().__init__(checkpoint, spec, device, backend="hooks", max_items=max_items)
        spec = self.spec  # 'auto' decided
        if not streamable(self.model, self.param_names, spec):
            raise ModelError(
                "the streamed featurize path needs projection='sjlt' and a model whose selected "
                "parameters each belong to one Linear, Conv2d, GroupNorm, LayerNorm or Embedding "
                "module; use featurize path 'full'"
            )
        assert self._hooks is not None  # backend='hooks' was accepted above
        self._slots = self._hooks._slots  # module → {attr: (start, stop)} columns
        breaks = tuple(sorted({a for slots in self._slots.values() for a, _ in slots.values()}))
        proj = make_projector(
            "sjlt", self.num_params, spec.proj_dim, seed, nnz=spec.sjlt_nnz, device=self.device,
            breaks=breaks,
        )  # fmt: skip
        assert isinstance(proj, SJLTProjector)
        self.projector = proj
        # the preconditioner scales each layer's block before its norm and projection (here,
        # not in ``featurize``, whose rows are already projected)
        self.column_scale, self.scale = self.scale, None
        self.row_dim = spec.proj_dim
        self.backend = "streamed"

    def _draw_rows(
        self,
        x_t: Tensor,
        t: Tensor,
        target: Tensor,
        flat: Tensor,
        group: int,
        cond: dict[str, Tensor] | None,
    ) -> tuple[list[tuple[int, Tensor]], Tensor | None, Tensor | None]:
        n = x_t.shape[0]
        dev = x_t.device
        state = _StreamCall(
            torch.zeros(self.row_dim, n, device=dev),
            torch.zeros(n, device=dev),
            torch.zeros(n // group, device=dev),
            group,
            torch.zeros((), device=dev, requires_grad=True),
        )
        try:
            with self._stream_hooks(state):
                loss_fn, precision = self._hooks.loss_fn, self.spec.precision
                run_taps(self.model, loss_fn, x_t, t, target, cond, state.anchor, precision)
        except HookError as exc:  # no vmap route: that would form [I, p] again
            raise ModelError(
                f"{exc.reason}; the streamed featurize path cannot follow it: use path 'full'"
            ) from None
        rows = flat[: n * self.row_dim].view(n, self.row_dim)
        rows.copy_(state.rows_t.T)
        return [(0, rows)], state.item_sq.sqrt_(), state.group_sq.sqrt_()

    def _stream_hooks(self, state: _StreamCall) -> AbstractContextManager[None]:
        return forward_hooks((m, self._hook(slots, state)) for m, slots in self._slots.items())

    def _hook(self, slots: dict[str, tuple[int, int]], state: _StreamCall) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
            take = saved_input(module, args, kwargs, output, state.item_sq.shape[0])

            def on_grad(delta: Tensor) -> None:
                a = take()
                if module in state.seen:
                    raise ModelError(
                        f"a {type(module).__name__} runs more than once per forward, which the "
                        "streamed featurize path cannot follow (its norm needs both calls "
                        "together); use featurize path 'full'"
                    )
                state.seen.add(module)
                with torch.no_grad():
                    self._fold_layer(module, *factor_dtypes(module, a, delta), slots, state)

            return Tap.apply(output, state.anchor, on_grad, False)

        return hook

    def _fold_layer(
        self,
        module: nn.Module,
        a: Tensor,
        delta: Tensor,
        slots: dict[str, tuple[int, int]],
        s: _StreamCall,
    ) -> None:
        """One module call's per-item gradients, a few whole groups of items at a time, into
        the call's norms and projected rows."""
        local, width = {}, 0  # the module's parameters side by side in a small buffer
        for attr, (start, stop) in sorted(slots.items(), key=lambda kv: kv[1]):
            local[attr] = (width, width + stop - start)
            width += stop - start
        n, g = a.shape[0], s.group
        step = max(1, LAYER_BYTES // (4 * width * g)) * g
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            buf = scratch.get("streamed", ((hi - lo) * width,), a.device)
            call = Call(buf.view(hi - lo, width), False, True)
            write_layer_grads(module, a[lo:hi], delta[lo:hi], local, call)
            for attr, (l0, l1) in local.items():
                block = buf[(hi - lo) * l0 : (hi - lo) * l1].view(hi - lo, l1 - l0)
                start = slots[attr][0]
                if self.column_scale is not None:  # g ← s ⊙ g before norms and projection
                    block.mul_(self.column_scale[start : start + block.shape[1]])
                s.item_sq[lo:hi] += torch.linalg.vector_norm(block, dim=1).square_()
                if g > 1:
                    sums = block.view(-1, g, block.shape[1]).sum(1)
                    s.group_sq[lo // g : hi // g] += torch.linalg.vector_norm(sums, dim=1).square_()
                s.rows_t[:, lo:hi] += self.projector.add_columns(block, start)
