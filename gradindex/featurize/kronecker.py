"""Kronecker-factored (LoGra-style) projection of per-item gradients, never forming most of them.

For a ``Linear`` or ``Conv2d`` weight, item i's gradient is G_i = Σ_pos δ_pos a_posᵀ ([out, in·kh·kw];
a_pos the input patch at output position pos, δ_pos the output gradient). Its projection by
P_out ⊗ P_in is P_out G_i P_inᵀ = Σ_pos (P_out δ_pos)(P_in a_pos)ᵀ: project the layer's inputs
(for a convolution, one extra convolution with P_in as its kernel) and its output gradients
separately, then multiply the small factors — [d_out, d_in] per item instead of [out, in·kh·kw].
With independent Gaussian factors, E[P_outᵀP_out] = I and E[P_inᵀP_in] = I, so
E[⟨P g, P h⟩] = ⟨g, h⟩ (unbiased, like every gradindex projector).

ReTrac needs each draw's gradient norm in full space. Per layer it is exact either way:
- ghost: ‖G_i‖² = Σ_{pos,pos'} (a_pos·a_pos')(δ_pos·δ_pos'), costing L²·(in·kh·kw + out) for L
  positions — cheap for small maps (late UNet blocks, attention projections over few tokens);
- formed: G_i built one layer at a time (in a small scratch buffer, then dropped), costing
  L·in·kh·kw·out — cheaper for large maps.
The cheaper one is chosen per layer. The norm of a mean over M noise draws uses the same
identity over the M·L positions of the draws (or the sum of the formed gradients).

Parameters it cannot factor (biases, GroupNorm / LayerNorm / Embedding weights, grouped
convolutions) take the dense path: per-item gradients via ``gradindex.featurize.persample`` hooks in the
same forward/backward, projected by a sparse JL map into their share of the output.

Holds ``KroneckerGradients`` (the hooks and the plan), ``LayerPlan`` (one parameter's route) and
``KroneckerFeaturizer`` (a ``GradientFeaturizer`` whose rows are these projections).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradindex.errors import ModelError
from gradindex.featurize.gradients import MAX_ITEMS, GradientFeaturizer
from gradindex.featurize.layer_grads import conv2d_item_weight_grads, factorable, forward_hook
from gradindex.featurize.losses import item_loss_fn
from gradindex.featurize.persample import HookGradients
from gradindex.featurize.projection import derived_seed, make_projector
from gradindex.featurize.taps import (
    Call,
    HookError,
    Tap,
    forward_hooks,
    parameter_owners,
    run_taps,
    saved_input,
)
from gradindex.inputs.models import Checkpoint
from gradindex.spec import BuildSpec

# share of the output dimension kept for the dense (unfactored) parameters, at most their count
DENSE_SHARE = 1 / 8
_FORMED_BYTES = 64 * 2**20  # cap on one layer's formed per-item gradients held at once
# a formed norm's cost per FLOP against the ghost identity's (batched Gram matmuls): measured
# at one thread, 1.5-2 made the per-layer choice the fastest of the two on every layer of the
# 35.7M CIFAR-10 DDPM UNet (norms 1.19 instead of 1.40 CPU-s per 8 items) and the demo UNet
FORMED_COST = 2.0


@dataclass
class LayerPlan:
    """How one selected parameter is projected: ``kronecker`` (d_out × d_in factors, ``norm``
    'ghost' or 'formed') or ``dense`` (sparse JL over the unfactored parameters)."""

    name: str
    route: str  # "kronecker" | "dense"
    shape: tuple[int, ...]
    d_out: int = 0
    d_in: int = 0
    norm: str = ""  # "ghost" | "formed" for kronecker layers
    offset: int = 0  # first output column of a kronecker layer

    def describe(self) -> str:
        if self.route == "dense":
            return "dense"
        return f"kronecker {self.d_out}x{self.d_in}, {self.norm} norm"


def _factorable(module: nn.Module, attr: str) -> bool:
    return attr == "weight" and factorable(module)


class KroneckerGradients:
    """Projected per-item gradients [I, out_dim] and exact per-item / per-group squared norms,
    from one batched forward/backward over a batch-independent model (see persample)."""

    def __init__(
        self,
        model: nn.Module,
        param_names: list[str],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        out_dim: int,
        seed: int,
        nnz: int = 4,
        device: torch.device | str = "cpu",
        precision: str = "float32",
    ):
        if not HookGradients.supports(model, param_names):
            raise ModelError(
                "projection='kronecker' needs a batch-independent model (no BatchNorm) whose "
                "selected parameters belong to Linear, Conv2d, GroupNorm, LayerNorm or Embedding "
                "modules; use projection='sjlt'"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.precision = precision  # the forward's (BuildSpec.precision)
        device = torch.device(device)
        named = dict(model.named_parameters())
        owners = parameter_owners(model)
        factored: list[tuple[str, nn.Module]] = []
        dense: list[str] = []
        for name in param_names:
            holders = owners[id(named[name])]
            if len(holders) == 1 and _factorable(*holders[0]):
                factored.append((name, holders[0][0]))
            else:
                dense.append(name)
        p_dense = sum(named[n].numel() for n in dense)
        d_dense = min(p_dense, max(1, int(out_dim * DENSE_SHARE))) if dense else 0
        if factored and out_dim - d_dense < len(factored):
            raise ModelError(
                f"proj_dim={out_dim} is too small for {len(factored)} Kronecker-factored layers "
                f"(at least one output per layer); raise proj_dim to >= {len(factored) + d_dense}"
            )
        budget = max(1, (out_dim - d_dense) // max(1, len(factored)))  # outputs per layer
        self.plan: list[LayerPlan] = []
        self._layers: dict[nn.Module, dict] = {}
        offset = 0
        for j, (name, module) in enumerate(factored):
            w = named[name]
            c_out, a_dim = w.shape[0], w[0].numel()
            d_out = min(c_out, math.isqrt(budget))  # about square, within the layer's shape
            d_in = min(a_dim, budget // d_out)
            plan = LayerPlan(name, "kronecker", tuple(w.shape), d_out, d_in, "", offset)
            gen = torch.Generator().manual_seed(derived_seed("kronecker", seed, j))
            p_out = torch.randn(d_out, c_out, generator=gen) / math.sqrt(d_out)
            p_in = torch.randn(d_in, a_dim, generator=gen) / math.sqrt(d_in)
            self._layers[module] = {
                "plan": plan,
                "p_out": p_out.to(device),
                "p_in": p_in.to(device).view(d_in, *w.shape[1:]),  # a conv kernel for convs
            }
            self.plan.append(plan)
            offset += d_out * d_in
        d_dense = out_dim - offset if dense else 0  # the dense block takes what is left
        if dense and d_dense <= 0:
            raise ModelError(f"proj_dim={out_dim} leaves no room for the dense parameters")
        self.kron_dim = offset
        self.out_dim = offset + d_dense
        self.plan += [LayerPlan(n, "dense", tuple(named[n].shape)) for n in dense]
        self._dense: HookGradients | None = None
        self._dense_proj = None
        if dense:
            self._dense = HookGradients(model, dense, loss_fn, precision)
            self._dense_proj = make_projector(
                "sjlt",
                p_dense,
                d_dense,
                derived_seed("kronecker-dense", seed) >> 2,
                nnz=min(nnz, d_dense),
                device=device,
            )

    def item_rows(
        self,
        x_t: Tensor,
        t: Tensor,
        target: Tensor,
        group: int = 1,
        cond: dict[str, Tensor] | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Items [I, ...] in consecutive groups of ``group`` (the noise draws of one (timestep,
        sample)) → projected per-item gradients [I, out_dim] (into ``out`` when given, e.g. the
        featurizer's reusable buffer), their full-space squared norms [I], and the squared norms
        of each group's gradient sum [I / group]."""
        n = x_t.shape[0]
        if n % group:
            raise ValueError(f"{n} items do not split into groups of {group}")
        if out is None:
            rows = torch.zeros(n, self.out_dim, device=x_t.device)
        elif out.shape != (n, self.out_dim) or out.dtype != torch.float32:
            raise ValueError(f"out must be a float32 [{n}, {self.out_dim}] tensor")
        else:
            rows = out.zero_()
        item_sq = torch.zeros(n, device=x_t.device)
        group_sq = torch.zeros(n // group, device=x_t.device)
        dense_out = None
        if self._dense is not None:
            dense_out = torch.empty(n, self._dense.num_params, device=x_t.device)
        call = Call(dense_out if dense_out is not None else rows[:, :0], False)
        state = _KronCall(rows, item_sq, group_sq, group)
        with self._hooks(call, state):
            run_taps(self.model, self.loss_fn, x_t, t, target, cond, call.anchor, self.precision)
        if dense_out is not None and self._dense_proj is not None:
            for start, stop in self._dense._all_slots - call.written:  # unused parameters
                dense_out[:, start:stop] = 0.0
            item_sq += dense_out.pow(2).sum(1)
            group_sq += dense_out.view(n // group, group, -1).sum(1).pow(2).sum(1)
            rows[:, self.kron_dim :] = self._dense_proj.project(dense_out)
        return rows, item_sq, group_sq

    def _hooks(self, call: Call, state: _KronCall) -> AbstractContextManager[None]:
        hooks = [(m, _kron_hook(m, layer, call, state)) for m, layer in self._layers.items()]
        if self._dense is not None:
            hooks += [(m, forward_hook(slots, call)) for m, slots in self._dense._slots.items()]
        return forward_hooks(hooks)


@dataclass
class _KronCall:
    rows: Tensor  # [I, out_dim]
    item_sq: Tensor  # [I]
    group_sq: Tensor  # [I / group]
    group: int
    seen: set[str] = field(default_factory=set)  # layers already projected in this call


def _kron_hook(module: nn.Module, layer: dict, call: Call, state: _KronCall) -> Callable:
    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        take = saved_input(mod, args, kwargs, output, call.items)

        def on_grad(delta: Tensor) -> None:
            with torch.no_grad():
                _project_layer(mod, layer, take().float(), delta.float(), state)

        return Tap.apply(output, call.anchor, on_grad, False)

    return hook


def _project_layer(module: nn.Module, layer: dict, a: Tensor, delta: Tensor, s: _KronCall) -> None:
    """Adds this layer call's projected gradients into s.rows and its squared norms into
    s.item_sq / s.group_sq. (A module called twice per forward would need the cross terms of
    its two calls in the norm; UNets call each module once, and this is checked.)"""
    plan: LayerPlan = layer["plan"]
    if plan.name in s.seen:
        raise ModelError(
            f"{plan.name}: its module runs more than once per forward, which the 'kronecker' "
            "projection cannot follow; build with --projection sjlt (BuildSpec(projection='sjlt'))"
        )
    s.seen.add(plan.name)
    n = a.shape[0]
    if isinstance(module, nn.Linear):
        a2 = a.reshape(n, -1, a.shape[-1])  # [I, L, in]
        d2 = delta.reshape(n, -1, delta.shape[-1])  # [I, L, out]
        a_proj = a2 @ layer["p_in"].T  # [I, L, d_in]
        d_proj = d2 @ layer["p_out"].T  # [I, L, d_out]
        patches_t = a2  # [I, L, in]
        d_t = d2  # [I, L, out]
    else:  # Conv2d (groups 1, numeric zero padding)
        a_proj = F.conv2d(a, layer["p_in"], None, module.stride, module.padding, module.dilation)
        a_proj = a_proj.flatten(2).transpose(1, 2)  # [I, L, d_in]
        d_t = delta.flatten(2).transpose(1, 2)  # [I, L, out]
        d_proj = d_t @ layer["p_out"].T  # [I, L, d_out]
        patches_t = None
    g_proj = torch.bmm(d_proj.transpose(1, 2), a_proj)  # [I, d_out, d_in]
    cols = slice(plan.offset, plan.offset + plan.d_out * plan.d_in)
    s.rows[:, cols] += g_proj.reshape(n, -1)
    positions = d_t.shape[1]
    a_dim = layer["p_in"][0].numel()
    c_out = d_t.shape[2]
    if not plan.norm:  # choose once, by cost per item
        ghost = s.group * positions * (a_dim + c_out) < FORMED_COST * a_dim * c_out
        plan.norm = "ghost" if ghost else "formed"
    if plan.norm == "ghost":
        if patches_t is None:
            patches_t = F.unfold(
                a, module.kernel_size, module.dilation, module.padding, module.stride
            ).transpose(1, 2)  # [I, L, in·kh·kw]
        _ghost_norms(patches_t, d_t, s)
    else:
        _formed_norms(module, a, delta, patches_t, d_t, s)


def _ghost_norms(patches_t: Tensor, d_t: Tensor, s: _KronCall) -> None:
    """‖Σ_pos δ_pos a_posᵀ‖² = Σ_{pos,pos'} (a_pos·a_pos')(δ_pos·δ_pos'), per item and over each
    group's concatenated positions (the norm of the group's gradient sum)."""
    n, positions = d_t.shape[:2]
    groups = n // s.group
    a_g = patches_t.reshape(groups, s.group * positions, -1)  # [G, M·L, a]
    d_g = d_t.reshape(groups, s.group * positions, -1)  # [G, M·L, out]
    prod = torch.bmm(a_g, a_g.transpose(1, 2)).mul_(torch.bmm(d_g, d_g.transpose(1, 2)))
    total = prod.sum((1, 2))  # [G]
    s.group_sq += total
    if s.group == 1:
        s.item_sq += total
        return
    blocks = prod.view(groups, s.group, positions, s.group, positions)
    diag = torch.diagonal(blocks, dim1=1, dim2=3)  # [G, L, L, M]
    s.item_sq += diag.sum((1, 2)).reshape(n)


def _formed_norms(
    module: nn.Module, a: Tensor, delta: Tensor, patches_t: Tensor | None, d_t: Tensor, s: _KronCall
) -> None:
    """Squared norms from this layer's per-item gradients, formed a few groups at a time."""
    n = a.shape[0]
    c_out = d_t.shape[2]
    a_dim = module.weight[0].numel()
    per_group = s.group * c_out * a_dim * 4
    step = max(1, _FORMED_BYTES // per_group) * s.group  # items per chunk, whole groups
    for start in range(0, n, step):
        stop = min(n, start + step)
        if isinstance(module, nn.Linear):
            g = torch.bmm(d_t[start:stop].transpose(1, 2), patches_t[start:stop])  # [i, out, in]
        else:
            g = torch.empty(stop - start, c_out, a_dim, device=a.device)
            conv2d_item_weight_grads(module, a[start:stop], delta[start:stop], g, True)
        sq = g.pow(2).sum((1, 2))
        s.item_sq[start:stop] += sq
        if s.group > 1:
            sq = g.view(-1, s.group, c_out, a_dim).sum(1).pow(2).sum((1, 2))
        s.group_sq[start // s.group : stop // s.group] += sq


class KroneckerFeaturizer(GradientFeaturizer):
    """A ``GradientFeaturizer`` whose rows are Kronecker-projected gradients [I, d] with exact
    full-space norms, so TracIn / ReTrac aggregation runs unchanged in projected space (both are
    linear in the rows once each draw's norm is known)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        spec: BuildSpec,
        seed: int,
        device: str | torch.device = "cpu",
        max_items: int = MAX_ITEMS,
    ):
        super().__init__(checkpoint, spec, device, max_items=max_items)
        self.kron = KroneckerGradients(
            self.model,
            self.param_names,
            item_loss_fn(spec.loss),
            spec.proj_dim,
            seed,
            nnz=spec.sjlt_nnz,
            device=self.device,
            precision=spec.precision,
        )
        self.row_dim = self.kron.out_dim
        self.backend = "kronecker"

    def _draw_rows(
        self,
        x_t: Tensor,
        t: Tensor,
        target: Tensor,
        flat: Tensor,
        group: int,
        cond: dict[str, Tensor] | None,
    ) -> tuple[list[tuple[int, Tensor]], Tensor | None, Tensor | None]:
        out = flat[: x_t.shape[0] * self.row_dim].view(x_t.shape[0], self.row_dim)
        try:
            rows, item_sq, group_sq = self.kron.item_rows(x_t, t, target, group, cond, out=out)
        except HookError as exc:  # the layer hooks are the projection: no vmap route
            raise ModelError(
                f"{exc.reason}; the 'kronecker' projection cannot follow it: build with "
                "--projection sjlt (BuildSpec(projection='sjlt'))"
            ) from None
        return [(0, rows)], item_sq.sqrt(), group_sq.sqrt()
