"""Per-sample, per-draw loss gradients and their aggregation into TracIn / ReTrac vectors.

Holds:
- ``select_parameters``: the parameters gradients are taken over (glob patterns on names).
- ``GradientFeaturizer``: for one checkpoint, turns a batch of clean images into
  a_c (TracIn, raw mean over draws), r_c (ReTrac, mean over timesteps of unit-normalized
  per-timestep means) and the per-draw gradient norms — all in full parameter space, before
  any projection (projection is linear, so aggregating first costs one projection per vector).

Per-item gradients come from one of two backends, over items that fold (timestep, sample,
noise draw) into batches of at most ``max_items`` rows and ``max_bytes`` of gradients:
- ``hooks`` (``gradindex.featurize.persample.HookGradients``): one batched forward/backward with module
  hooks; needs a batch-independent model whose selected parameters sit in Linear, Conv2d,
  GroupNorm, LayerNorm or Embedding modules (a diffusers UNet2DModel qualifies, class-conditional
  too). Close to the cost of a plain batched backward.
- ``vmap``: torch.func ``vmap(grad(loss))``; any model, but on CPU diffusers' attention has no
  vmap batching rule, so it runs close to a per-item loop.
``auto`` (the default) takes hooks when the model supports them, vmap otherwise.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from gradindex.errors import ModelError, SpecError
from gradindex.featurize.aggregate import accumulate, norm_over_blocks
from gradindex.featurize.auto import resolve_auto
from gradindex.featurize.budget import ACTIVATION_FACTOR, activation_bytes, items_per_call
from gradindex.featurize.losses import (
    diffusion_loss,
    item_loss_fn,
    loss_weights,
    noisy_input_and_target,
)
from gradindex.featurize.persample import HookGradients
from gradindex.featurize.precision import compute_precision
from gradindex.featurize.scratch import scratch
from gradindex.featurize.taps import HookError
from gradindex.inputs.models import Checkpoint, model_output
from gradindex.inputs.optimizer_state import flat_scale
from gradindex.spec import METHODS, BuildSpec

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "hooks", "vmap")


def select_parameters(model: torch.nn.Module, patterns: tuple[str, ...] | None) -> list[str]:
    """Names of the parameters matching any glob pattern, frozen ones too, or the trainable ones
    (None); in ``named_parameters`` order — the order of the flattened gradient vector."""
    names = [n for n, p in model.named_parameters() if p.requires_grad or patterns is not None]
    if patterns is None:
        chosen = names
    else:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not chosen:
        raise SpecError(
            f"BuildSpec.params={list(patterns) if patterns else None!r} matches no parameter; "
            f"names look like {names[:3]}"
        )
    return chosen


@dataclass
class Features:
    """Full-space features of a batch for one checkpoint."""

    tracin: torch.Tensor  # [B, p]  a_c = mean_k ḡ_k
    retrac: torch.Tensor  # [B, p]  r_c = mean_k ḡ_k / ‖ḡ_k‖
    norms: torch.Tensor  # [B, K·M] ‖g_{k,m}‖ per draw, draws in spec order

    FIELDS = (*METHODS, "norms")


# Items per gradient call: the default batch (16 images x 10 timesteps) in one call, faster than
# smaller calls (docs/build-speed.md); the [items, p] buffer stays under ``max_bytes``.
MAX_ITEMS = 160


class GradientFeaturizer:
    """Per-sample gradients of one checkpoint over the selected parameters.

    ``backend``: "auto" (hooks when the model supports them, else vmap), "hooks" or "vmap"; all
    give the same numbers. ``max_items`` / ``max_bytes``: caps on the items (timestep × sample ×
    noise draw) of one batched gradient call and on their [items, p] float32 gradients, which
    bound memory (activations grow with items too); a call holds whole timesteps, so at least
    the B·M items of one."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        spec: BuildSpec,
        device: str | torch.device = "cpu",
        backend: str = "auto",
        max_items: int = MAX_ITEMS,
        max_bytes: int = 512 * 2**20,
    ):
        if backend not in BACKENDS:
            raise SpecError(f"backend={backend!r}: must be one of {', '.join(BACKENDS)}")
        if not isinstance(max_items, int) or max_items <= 0:
            raise SpecError(f"max_items={max_items!r}: must be a positive integer")
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise SpecError(f"max_bytes={max_bytes!r}: must be a positive integer")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.device = torch.device(device)
        self.model = checkpoint.model.to(self.device).eval()
        self.prediction_type = checkpoint.prediction_type
        self.alphas_cumprod = checkpoint.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.param_names = select_parameters(self.model, spec.params)
        spec = resolve_auto(spec, self.model, self.param_names, self.device)
        compute_precision(spec.precision, device)  # a device autocast cannot run: refused now
        self.spec = spec
        named = dict(self.model.named_parameters())
        self.params = {n: named[n].detach() for n in self.param_names}
        chosen = set(self.param_names)
        self.frozen = {n: p.detach() for n, p in named.items() if n not in chosen}
        self.frozen.update(dict(self.model.named_buffers()))
        self.num_params = sum(p.numel() for p in self.params.values())
        self.row_dim = self.num_params  # width of the featurize output (projected ones: d)
        self.scale = _preconditioner(checkpoint, spec, self.param_names, self.device)  # [p]
        weights = loss_weights(spec, checkpoint.scheduler, checkpoint.prediction_type)  # [T]
        self.loss_weight = None if weights is None else weights.to(self.device)
        self._input_noise: dict[tuple[int, ...], list[torch.Tensor] | None] = {}
        self._per_item_grad = vmap(grad(self._item_loss), in_dims=(None, 0, 0, 0, 0))
        self._hooks: HookGradients | None = None
        supported = HookGradients.supports(self.model, self.param_names)
        if backend == "hooks" and not supported:
            raise ModelError(
                "backend='hooks' needs a batch-independent model (no BatchNorm) whose selected "
                "parameters belong to Linear, Conv2d, GroupNorm, LayerNorm or Embedding modules; "
                "use 'vmap'"
            )
        if backend != "vmap" and supported:
            loss_fn = item_loss_fn(spec.loss)
            self._hooks = HookGradients(self.model, self.param_names, loss_fn, spec.precision)
        self.backend = "hooks" if self._hooks is not None else "vmap"
        self._auto = backend == "auto"
        # bytes the per-item work of a call may take (set by ``Embedder`` from the memory
        # budget; None: no budget) and the items per call that fit it, measured on first use
        self.memory_left: int | None = None
        self.budget = 0
        self.memory_spare: int | None = None  # an automatic budget's room (budget.items_per_call)
        self._fitted_items: int | None = None
        logger.info(
            "%s: per-item gradients via %s (%d parameters)",
            checkpoint.source,
            self.backend,
            self.num_params,
        )

    def _item_loss(
        self,
        params: dict[str, torch.Tensor],
        x_t: torch.Tensor,
        t: torch.Tensor,
        target: torch.Tensor,
        cond: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        params = {**self.frozen, **params}
        with compute_precision(self.spec.precision, self.device):
            out = model_output(
                lambda x, tt, **kw: functional_call(self.model, params, (x, tt), kw),
                x_t[None],
                t[None],
                {name: c[None] for name, c in cond.items()},
            )
        return diffusion_loss(out.float(), target[None], self.spec.loss)

    def item_gradients(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        target: torch.Tensor,
        out: torch.Tensor | None = None,
        cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """[I, C, H, W], [I], [I, C, H, W] → flattened per-item gradients [I, p], columns in
        ``param_names`` order; written into ``out`` ([I, p] float32) when given. ``cond``: the
        model's per-item conditioning keyword arguments, items first (``class_labels`` [I])."""
        if self._hooks is not None:
            try:
                return self._hooks.item_gradients(x_t, t, target, out=out, cond=cond)
            except HookError as exc:
                self._leave_hooks(exc)
        grads = self._per_item_grad(self.params, x_t, t, target, cond or {})
        flat = [grads[n].reshape(x_t.shape[0], -1) for n in self.param_names]
        return torch.cat(flat, dim=1) if out is None else torch.cat(flat, dim=1, out=out)

    def _draw_rows(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        target: torch.Tensor,
        flat: torch.Tensor,
        group: int,
        cond: dict[str, torch.Tensor] | None,
    ) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor | None, torch.Tensor | None]:
        """Rows of one gradient call (items ordered (k, b, m), ``group`` = M draws per (k, b)),
        written into ``flat`` (float32, ≥ I·row_dim elements) as column blocks: (first column,
        [I, n] block) pairs that tile [0, row_dim); plus full-space norms per item [I] and of
        each group's sum [I / M] when the backend has them already (None: take them from the
        rows). The hook backend writes one contiguous block per parameter (see
        ``HookGradients.item_gradient_blocks``), the vmap backend one [I, p] block."""
        if self._hooks is not None:
            try:
                blocks = self._hooks.item_gradient_blocks(x_t, t, target, flat=flat, cond=cond)
            except HookError as exc:
                self._leave_hooks(exc)
                return self._draw_rows(x_t, t, target, flat, group, cond)
            starts = [a for a, _ in self._hooks.column_blocks()]
            return list(zip(starts, blocks, strict=True)), None, None
        rows = flat[: x_t.shape[0] * self.row_dim].view(x_t.shape[0], self.row_dim)
        return [(0, self.item_gradients(x_t, t, target, out=rows, cond=cond))], None, None

    def _leave_hooks(self, exc: HookError) -> None:
        """Under backend='auto', take every later gradient via vmap (same numbers, slower) when
        the hooks cannot follow the model; with backend='hooks' asked for, raise ``exc``."""
        if not self._auto:
            raise exc
        logger.warning("%s; per-item gradients via vmap instead of layer hooks", exc.reason)
        self._hooks = None
        self.backend = "vmap"

    def _items(
        self,
        x0: torch.Tensor,
        draws: list[tuple[int, torch.Tensor]],
        ks: range,
        cond: dict[str, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The items of timesteps ``ks`` for samples x0 [B, C, H, W], ordered (k, b, m) (a
        reshape gives [k, B, M, ...]): x_t, t, the regression target, the conditioning."""
        M, B = self.spec.noise_draws, x0.shape[0]
        shape = x0.shape[1:]  # (C, H, W)

        def per_item(noise: list[torch.Tensor]) -> torch.Tensor:  # [k·M, C, H, W] → items
            eps = torch.stack([noise[k * M + m] for k in ks for m in range(M)]).to(self.device)
            rep = eps.view(len(ks), 1, M, *shape).expand(-1, B, -1, -1, -1, -1)  # [k, B, M, ...]
            return rep.reshape(-1, *shape)

        eps_rep = per_item([eps for _, eps in draws])
        inputs = self._perturbed(tuple(shape))
        eps_in = None if inputs is None else per_item(inputs)
        x_rep = x0.view(1, B, 1, *shape).expand(len(ks), -1, M, -1, -1, -1)  # [k, B, M, C, H, W]
        ts = torch.tensor([[draws[k * M + m][0] for m in range(M)] for k in ks], device=self.device)
        t_rep = ts.view(len(ks), 1, M).expand(-1, B, -1).reshape(-1)  # [k·B·M] long
        x_t, target = noisy_input_and_target(
            x_rep.reshape(-1, *shape),
            eps_rep,
            t_rep,
            self.alphas_cumprod,
            self.prediction_type,
            eps_in,
        )
        cond_rep = {  # [B, ...] → [k·B·M, ...], items ordered (k, b, m) like x_t
            name: c.to(self.device)
            .view(1, B, 1, *c.shape[1:])
            .expand(len(ks), -1, M, *c.shape[1:])
            .reshape(-1, *c.shape[1:])
            for name, c in (cond or {}).items()
        }
        return x_t, t_rep, target, cond_rep

    def _perturbed(self, shape: tuple[int, ...]) -> list[torch.Tensor] | None:
        """The spec's input noise per draw for samples of ``shape`` (None: the draws' own)."""
        if shape not in self._input_noise:
            self._input_noise[shape] = self.spec.input_noise(shape)
        return self._input_noise[shape]

    def featurize(
        self,
        x0: torch.Tensor,
        draws: list[tuple[int, torch.Tensor]],
        cond: dict[str, torch.Tensor] | None = None,
        *,
        reuse: bool = False,
    ) -> Features:
        """x0: [B, C, H, W] in the model's range (latents for a latent model); draws: the spec's
        K·M (t, ε) pairs; cond: per-sample conditioning keyword arguments of the model, samples
        first (``class_labels`` [B], ``encoder_hidden_states`` [B, L, E]), repeated per draw.
        ``reuse=True`` returns views of a buffer that the next call of any featurizer
        overwrites (fresh memory costs a page fault per 4 KiB): for callers that
        consume the features at once, like ``Embedder.embed``."""
        K, M = self.spec.num_timesteps, self.spec.noise_draws
        if len(draws) != K * M:
            raise SpecError(f"expected {K * M} draws, got {len(draws)}")
        x0 = x0.to(self.device, torch.float32)
        items = min(self.max_items, self.max_bytes // (4 * self.row_dim))
        if self.memory_left is not None:
            if self._fitted_items is None:
                self._fitted_items = self._fit_items(x0, draws, cond)
            items = min(items, self._fitted_items)
        per_call = max(1, items // M)  # samples one call can hold (a call holds whole ones)
        if x0.shape[0] <= per_call:
            return self._featurize(x0, draws, cond, reuse, items)
        parts = [
            self._featurize(
                x0[i : i + per_call],
                draws,
                None if cond is None else {k: v[i : i + per_call] for k, v in cond.items()},
                False,
                items,
            )
            for i in range(0, x0.shape[0], per_call)
        ]
        return Features(*(torch.cat([getattr(f, n) for f in parts]) for n in Features.FIELDS))

    def _fit_items(
        self, x0: torch.Tensor, draws: list, cond: dict[str, torch.Tensor] | None
    ) -> int:
        """Items per call that fit ``memory_left``: per item, the activations of one (see
        ``budget``) and its row in the call's buffer."""
        one = None if cond is None else {k: v[:1] for k, v in cond.items()}
        x_t, t, _, c = self._items(x0[:1], draws, range(1), one)
        x1, t1, one_c = x_t[:1], t[:1], {k: v[:1] for k, v in c.items()}
        with compute_precision(self.spec.precision, self.device):  # bfloat16: smaller activations
            act = activation_bytes(self.model, lambda: model_output(self.model, x1, t1, one_c))
        per_item = int(ACTIVATION_FACTOR * act) + 4 * self.row_dim
        assert self.memory_left is not None
        M, left, spare = self.spec.noise_draws, self.memory_left, self.memory_spare
        return items_per_call(left, per_item, M, self.budget, spare)

    def _featurize(
        self,
        x0: torch.Tensor,
        draws: list[tuple[int, torch.Tensor]],
        cond: dict[str, torch.Tensor] | None,
        reuse: bool,
        items: int,
    ) -> Features:
        """``featurize`` of samples that fit one call's ``items`` per timestep."""
        spec = self.spec
        K, M = spec.num_timesteps, spec.noise_draws
        B = x0.shape[0]
        q = self.row_dim
        # per sample: [TracIn row, ReTrac row]
        if reuse:
            acc = scratch.get("features", (B, 2, q), self.device)
        else:
            acc = torch.empty(B, 2, q, device=self.device)
        norms = torch.empty(B, K * M, device=self.device)
        step = max(1, min(K, items // (B * M)))  # timesteps per gradient call, at most
        step = -(-K // -(-K // step))  # as even as the same number of calls allows (8+2 -> 5+5)
        flat = scratch.get("items", (step * B * M * q,), self.device)  # [k·B·M · q]
        for k0 in range(0, K, step):
            ks = range(k0, min(K, k0 + step))
            x_t, t_rep, target, cond_rep = self._items(x0, draws, ks, cond)
            nk = len(ks)
            blocks, item_norms, sum_norms = self._draw_rows(x_t, t_rep, target, flat, M, cond_rep)
            if self.loss_weight is not None:  # ∇(w(t)·ℓ) = w(t)·∇ℓ, w ≥ 0
                w = self.loss_weight[t_rep]  # [I]
                for _, g in blocks:  # [I, n]
                    g.mul_(w[:, None])
                item_norms = None if item_norms is None else item_norms * w
                sum_norms = None if sum_norms is None else sum_norms * w[::M]
            if self.scale is not None:  # g ← s ⊙ g before norms and aggregation
                item_norms, sum_norms = None, None
                for a, g in blocks:  # [I, n]
                    g.mul_(self.scale[a : a + g.shape[-1]])
            blocks = [(a, g.view(nk, B, M, -1)) for a, g in blocks]  # [k, B, M, n] each
            if item_norms is None:
                item_norms = norm_over_blocks([g for _, g in blocks])  # [k, B, M]
            item_norms = item_norms.view(nk, B, M)
            norms[:, k0 * M : (k0 + nk) * M] = item_norms.permute(1, 0, 2).reshape(B, nk * M)
            if M == 1:  # ḡ_k is the draw itself
                s_norm = item_norms[..., 0]  # [k, B]
            elif sum_norms is not None:
                s_norm = sum_norms.view(nk, B)
            else:  # ‖M·ḡ_k‖ from each block's sums over the M draws
                s_norm = norm_over_blocks([g.sum(2) for _, g in blocks])  # [k, B]
            # Both accumulations in one pass over the rows, one small matrix per sample:
            # acc[b] += coef[b] @ g[:, b, m]  with coef[b] = [1/(M·K) ..., 1/(‖M·ḡ_k‖·K) ...].
            # One pass instead of norm + add_ + addcmul_ per timestep (memory-bound).
            coef = torch.empty(B, 2, nk, device=self.device)
            coef[:, 0] = 1.0 / (M * K)
            coef[:, 1] = (1.0 / (s_norm * K)).T
            accumulate(acc, blocks, coef, first=k0 == 0)
            del blocks
        return Features(tracin=acc[:, 0], retrac=acc[:, 1], norms=norms)


def _preconditioner(
    checkpoint: Checkpoint, spec: BuildSpec, names: list[str], device: torch.device
) -> torch.Tensor | None:
    """The per-column scale s [p] of ``spec.precondition`` ('adam': 1/(sqrt(v̂)+eps) in
    ``names`` order), or None for 'none'."""
    if spec.precondition == "none":
        return None
    if checkpoint.scales is None:
        raise ModelError(
            f"{checkpoint.source}: precondition='adam' but the checkpoint carries no Adam "
            "scales; load it with load_checkpoints(..., precondition='adam')"
        )
    return flat_scale(checkpoint.scales, names, checkpoint.source, device)
