"""Kronecker-factored (LoGra-style) projection of per-item gradients, never forming most of them.

For a ``Linear`` or ``Conv2d`` weight, item i's gradient is G_i = Σ_pos δ_pos a_posᵀ ([out, in·kh·kw];
a_pos the input patch at output position pos, δ_pos the output gradient). Its projection by
P_out ⊗ P_in is P_out G_i P_inᵀ = Σ_pos (P_out δ_pos)(P_in a_pos)ᵀ: project the layer's inputs
(for a convolution, one extra convolution with P_in as its kernel) and its output gradients
separately, then multiply the small factors — [d_out, d_in] per item instead of [out, in·kh·kw].
With independent Gaussian factors, E[P_outᵀP_out] = I and E[P_inᵀP_in] = I, so
E[⟨P g, P h⟩] = ⟨g, h⟩ (unbiased, like every gradindex projector).

ReTrac needs each draw's gradient norm. ``norms='exact'``: in full space, per layer by the
ghost identity or the layer's gradient formed, whichever is cheaper (``kron_norms``); either
costs about the layer's weight gradient wherever maps are large, so exact norms keep a build at
the per-sample loop's FLOPs. ``norms='projected'`` ('auto' for large models) takes each draw's
norm as that of its projection (‖P g‖², unbiased for ‖g‖²): ReTrac becomes the mean of
projected unit vectors, and no layer does full-space work beyond the backward to its inputs.

Two layouts: ``'kronecker'`` splits d over the layers (~30 outputs each on a 113-layer UNet at
d = 4,096: poor where a few layers hold most of a gradient). ``'kronecker-sjlt'`` gives every
layer ``LAYER_DIM`` outputs (d_out / d_in shaped so both projections cost alike; a layer of at
most ``LAYER_DIM`` weights kept whole, a factor keeping its whole side the identity), keeps the
dense gradients whole, and maps all of it (at least d) to d by one sparse JL map S:
P = S ∘ (⊕_l P_out,l ⊗ P_in,l ⊕ I), unbiased. Its projected norms are those before S.

Parameters it cannot factor (biases, GroupNorm / LayerNorm / Embedding weights, grouped
convolutions) take the dense path: per-item gradients via ``persample`` hooks in the same pass
('kronecker': projected by a sparse JL map into their share of d).

Holds ``KroneckerGradients`` (hooks, plan), ``LayerPlan``, ``KroneckerFeaturizer`` (its rows).
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
from gradindex.featurize.kron_norms import cheaper_norm, formed_norms, ghost_norms
from gradindex.featurize.layer_grads import factorable, forward_hook
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
# 'kronecker-sjlt': each factored layer's outputs before the final sparse JL map ('kronecker''s
# even split of d leaves ~30 per layer on a 113-layer UNet; docs/build-speed.md compares them)
LAYER_DIM = 1024


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


def _factor_shape(budget: int, c_out: int, a_dim: int, cost_aware: bool) -> tuple[int, int]:
    """(d_out, d_in) with d_out·d_in ≤ budget within the layer's [c_out, a_dim] shape: about
    square, or (``cost_aware``) shaped so projecting the inputs (a_dim per output) and the output
    gradients (c_out per output) cost alike, d_out / d_in ≈ a_dim / c_out."""
    if cost_aware:
        d_out = max(1, min(c_out, budget, round(math.sqrt(budget * a_dim / c_out))))
    else:  # as 'kronecker' indexes were built: their factors must not change
        d_out = min(c_out, math.isqrt(budget))
    return d_out, max(1, min(a_dim, budget // d_out))


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
        norms: str = "exact",
        layer_dim: int | None = None,
    ):
        if not HookGradients.supports(model, param_names):
            raise ModelError(
                f"projection={'kronecker-sjlt' if layer_dim else 'kronecker'!r} needs a batch-"
                "independent model (no BatchNorm) whose selected parameters belong to Linear, "
                "Conv2d, GroupNorm, LayerNorm or Embedding modules; use projection='sjlt'"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.precision = precision  # the forward's (BuildSpec.precision)
        self.norms = norms  # BuildSpec.norms: 'exact' (full space) or 'projected' (the rows')
        device = torch.device(device)
        named = dict(model.named_parameters())
        owners = parameter_owners(model)
        factored: list[tuple[str, nn.Module]] = []
        dense: list[str] = []
        for name in param_names:
            holders = owners[id(named[name])]
            small = bool(layer_dim) and named[name].numel() <= layer_dim  # kept whole: exact
            if len(holders) == 1 and _factorable(*holders[0]) and not small:
                factored.append((name, holders[0][0]))
            else:
                dense.append(name)
        p_dense = sum(named[n].numel() for n in dense)
        # kronecker-sjlt: layer_dim outputs per layer, dense gradients whole, then S to out_dim
        d_dense = p_dense if layer_dim else min(p_dense, max(1, int(out_dim * DENSE_SHARE)))
        d_dense = d_dense if dense else 0
        if not layer_dim and factored and out_dim - d_dense < len(factored):
            raise ModelError(
                f"proj_dim={out_dim} is too small for {len(factored)} Kronecker-factored layers "
                f"(at least one output per layer); raise proj_dim to >= {len(factored) + d_dense}"
            )
        per_layer = max(1, (out_dim - d_dense) // max(1, len(factored)))
        budget = layer_dim or per_layer  # outputs per layer
        self.plan: list[LayerPlan] = []
        self._layers: dict[nn.Module, dict] = {}
        offset = self._plan_factored(factored, budget, seed, device, bool(layer_dim))
        if not layer_dim:
            d_dense = out_dim - offset if dense else 0  # the dense block takes what is left
            if dense and d_dense <= 0:
                raise ModelError(f"proj_dim={out_dim} leaves no room for the dense parameters")
        self.kron_dim = offset
        self.inner_dim = offset + d_dense  # the rows before the final map (if any)
        self.out_dim = out_dim if layer_dim else self.inner_dim
        self.plan += [LayerPlan(n, "dense", tuple(named[n].shape)) for n in dense]
        self._dense: HookGradients | None = None
        self._dense_proj = None
        if dense:
            self._dense = HookGradients(model, dense, loss_fn, precision)
        if dense and not layer_dim:
            self._dense_proj = make_projector(
                "sjlt",
                p_dense,
                d_dense,
                derived_seed("kronecker-dense", seed) >> 2,
                nnz=min(nnz, d_dense),
                device=device,
            )
        self._final = None
        if layer_dim:  # E[SᵀS] = I, so S ∘ (P_out ⊗ P_in ⊕ I) stays unbiased
            self._final = make_projector(
                "sjlt",
                self.inner_dim,
                out_dim,
                derived_seed("kronecker-sjlt", seed) >> 2,
                nnz=nnz,
                device=device,
            )

    def _plan_factored(
        self,
        factored: list[tuple[str, nn.Module]],
        budget: int,
        seed: int,
        device: torch.device,
        cost_aware: bool,
    ) -> int:
        """Each factored layer's Gaussian P_out [d_out, c_out] and P_in [d_in, a_dim] (seeded by
        its place), its LayerPlan and its columns; returns the columns taken."""
        offset = 0
        for j, (name, module) in enumerate(factored):
            w = module.weight
            c_out, a_dim = w.shape[0], w[0].numel()
            d_out, d_in = _factor_shape(budget, c_out, a_dim, cost_aware)
            norm = "projected" if self.norms == "projected" else ""  # else chosen at first call
            plan = LayerPlan(name, "kronecker", tuple(w.shape), d_out, d_in, norm, offset)
            gen = torch.Generator().manual_seed(derived_seed("kronecker", seed, j))
            p_out = torch.randn(d_out, c_out, generator=gen) / math.sqrt(d_out)
            p_in = torch.randn(d_in, a_dim, generator=gen) / math.sqrt(d_in)
            if cost_aware:  # kronecker-sjlt: a factor keeping its whole side is exact
                p_out = torch.eye(c_out) if d_out == c_out else p_out
                p_in = torch.eye(a_dim) if d_in == a_dim else p_in
            self._layers[module] = {
                "plan": plan,
                "p_out": p_out.to(device),
                "p_in": p_in.to(device).view(d_in, *w.shape[1:]),  # a conv kernel for convs
            }
            self.plan.append(plan)
            offset += d_out * d_in
        return offset

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
        featurizer's reusable buffer), their squared norms [I], and the squared norms of each
        group's gradient sum [I / group]: in full space, or (``norms='projected'``) of the
        projections before any final map, which spares every layer's full-space work."""
        n = x_t.shape[0]
        if n % group:
            raise ValueError(f"{n} items do not split into groups of {group}")
        if out is not None and (out.shape != (n, self.out_dim) or out.dtype != torch.float32):
            raise ValueError(f"out must be a float32 [{n}, {self.out_dim}] tensor")
        if self._final is None and out is not None:
            inner = out.zero_()
        else:  # kronecker-sjlt: layers' factors and dense gradients, before the final map
            inner = torch.zeros(n, self.inner_dim, device=x_t.device)
        item_sq = torch.zeros(n, device=x_t.device)
        group_sq = torch.zeros(n // group, device=x_t.device)
        dense_out = None
        if self._dense is not None:
            dense_out = torch.empty(n, self._dense.num_params, device=x_t.device)
        call = Call(dense_out if dense_out is not None else inner[:, :0], False)
        state = _KronCall(inner, item_sq, group_sq, group)
        with self._hooks(call, state):
            run_taps(self.model, self.loss_fn, x_t, t, target, cond, call.anchor, self.precision)
        if dense_out is not None and self._dense is not None:
            for start, stop in self._dense._all_slots - call.written:  # unused parameters
                dense_out[:, start:stop] = 0.0
            if self.norms == "exact":
                item_sq += dense_out.pow(2).sum(1)
                group_sq += dense_out.view(n // group, group, -1).sum(1).pow(2).sum(1)
            dense = dense_out if self._dense_proj is None else self._dense_proj.project(dense_out)
            inner[:, self.kron_dim :] = dense
        if self.norms == "projected":  # of the widest projection held: inner
            item_sq = inner.pow(2).sum(1)
            sums = inner.view(n // group, group, -1).sum(1) if group > 1 else inner
            group_sq = sums.pow(2).sum(1)
        if self._final is None:
            return inner, item_sq, group_sq
        rows = self._final.project(inner)
        if out is not None:
            rows = out.copy_(rows)
        return rows, item_sq, group_sq

    def _hooks(self, call: Call, state: _KronCall) -> AbstractContextManager[None]:
        hooks = [(m, _kron_hook(m, layer, call, state)) for m, layer in self._layers.items()]
        if self._dense is not None:
            hooks += [(m, forward_hook(slots, call)) for m, slots in self._dense._slots.items()]
        return forward_hooks(hooks)


@dataclass
class _KronCall:
    rows: Tensor  # [I, inner_dim]: the layers' projected gradients, before any final map
    item_sq: Tensor  # [I]
    group_sq: Tensor  # [I / group]
    group: int
    seen: set[str] = field(default_factory=set)  # layers already projected in this call


def _kron_hook(module: nn.Module, layer: dict, call: Call, state: _KronCall) -> Callable:
    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        take = saved_input(mod, args, kwargs, output, call.items)

        def on_grad(delta: Tensor) -> None:
            with torch.no_grad():
                _project_layer(mod, layer, take(), delta, state)

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
    if plan.norm != "projected":  # exact norms: float32 factors
        a, delta = a.float(), delta.float()
    # the factors' projections in the dtype the layer ran in (bfloat16 under autocast), summed
    # over positions in float32
    p_in, p_out = layer["p_in"].to(a.dtype), layer["p_out"].to(delta.dtype)
    n = a.shape[0]
    if isinstance(module, nn.Linear):
        a2 = a.reshape(n, -1, a.shape[-1])  # [I, L, in]
        d2 = delta.reshape(n, -1, delta.shape[-1])  # [I, L, out]
        a_proj = (a2 @ p_in.T).float().transpose(1, 2)  # [I, d_in, L]
        d_proj = (d2 @ p_out.T).float().transpose(1, 2)  # [I, d_out, L]
        patches_t = a2  # [I, L, in]
        d_t = d2  # [I, L, out]
    else:  # Conv2d (groups 1, numeric zero padding)
        a_proj = F.conv2d(a, p_in, None, module.stride, module.padding, module.dilation)
        a_proj = a_proj.float().flatten(2)  # [I, d_in, L]
        d_flat = delta.flatten(2)  # [I, out, L]
        d_proj = torch.matmul(p_out, d_flat).float()  # [I, d_out, L]: no transposed copy
        d_t = d_flat.transpose(1, 2)  # [I, L, out], a view (the norms' layout)
        patches_t = None
    g_proj = torch.bmm(d_proj, a_proj.transpose(1, 2))  # [I, d_out, d_in]
    cols = slice(plan.offset, plan.offset + plan.d_out * plan.d_in)
    s.rows[:, cols] += g_proj.reshape(n, -1)
    if plan.norm == "projected":  # the rows' own norms, taken once the call is done
        return
    positions = d_t.shape[1]
    a_dim = layer["p_in"][0].numel()
    c_out = d_t.shape[2]
    if not plan.norm:  # choose once, by cost per item
        plan.norm = cheaper_norm(s.group * positions, a_dim, c_out)
    if plan.norm == "ghost":
        if patches_t is None:
            patches_t = F.unfold(
                a, module.kernel_size, module.dilation, module.padding, module.stride
            ).transpose(1, 2)  # [I, L, in·kh·kw]
        ghost_norms(patches_t, d_t, s)
    else:
        formed_norms(module, a, delta, patches_t, d_t, s)


class KroneckerFeaturizer(GradientFeaturizer):
    """A ``GradientFeaturizer`` whose rows are Kronecker-projected gradients [I, d] and their
    norms (``BuildSpec.norms``): TracIn / ReTrac aggregate in projected space unchanged."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        spec: BuildSpec,
        seed: int,
        device: str | torch.device = "cpu",
        max_items: int = MAX_ITEMS,
    ):
        super().__init__(checkpoint, spec, device, max_items=max_items)
        spec = self.spec  # 'auto' decided
        self.kron = KroneckerGradients(
            self.model,
            self.param_names,
            item_loss_fn(spec.loss),
            spec.proj_dim,
            seed,
            nnz=spec.sjlt_nnz,
            device=self.device,
            precision=spec.precision,
            norms=spec.norms,
            layer_dim=LAYER_DIM if spec.projection == "kronecker-sjlt" else None,
        )
        self.row_dim = self.kron.out_dim
        self.backend = "kronecker"
        if self.kron.inner_dim < self.row_dim:  # S would widen the rows, adding only noise
            why = f"is more than the {self.kron.inner_dim:,} layer outputs it maps from here"
            raise ModelError(f"proj_dim={self.row_dim} {why}; lower it or use projection='sjlt'")

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
