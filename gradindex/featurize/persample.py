"""Per-item gradients from one batched forward/backward, via module hooks (Opacus / BackPACK style).

Holds:
- ``HookGradients``: per-item gradients of Σ_i loss_i over selected parameters of ``Linear``,
  ``Conv2d``, ``GroupNorm``, ``LayerNorm`` and ``Embedding`` (class labels) modules. A forward
  hook keeps each selected module's input a (per call: a module may run twice) and wraps its
  output in ``_Tap``, whose backward receives δ = ∂(Σ_i loss_i)/∂output and forms the per-item
  gradient right away, in place in the result (Linear: g_W[i] = Σ_pos δ[i]ᵀ a[i]; Conv2d: the
  same over the kh×kw patches of a; norms: Σ_pos δ ⊙ x̂ with x̂ recomputed from a; bias: Σ_pos δ;
  Embedding: δ[i] scattered into the rows a[i] indexes), then drops a. The result is [I, p]
  rows (``item_gradients``) or the same numbers as one contiguous [I, n] block per parameter
  (``item_gradient_blocks``, what builds use: torch runs a batched matmul as one MKL call only
  when its output batch is contiguous).
- ``SUPPORTED_MODULES``: the module types whose parameters it can differentiate.
- ``HookError``: a model the hooks cannot follow but ``vmap`` can (a module that moves the batch
  dimension); ``in_place_error``: the one-line error of a model that modifies a layer's input in
  place after the layer used it (no backend can differentiate that).

Assumption: the model is *batch-independent*: item i's output depends on item i's input only
(a diffusers ``UNet2DModel`` in eval mode is: GroupNorm and attention act per sample). Then the
gradient of Σ_i loss_i with respect to item i's activations is item i's own gradient, and the
per-item weight gradients above are exact. BatchNorm breaks this; ``supports`` refuses models
holding it, and models holding parameters in modules of types it does not know.

No parameter gradient is ever formed by autograd: every selected module output passes through an
identity ``_Tap`` tied to a scalar leaf (the anchor), and the backward is
``torch.autograd.grad(Σ loss, anchor)``, so autograd runs only the input-gradient path from the
loss down to the earliest selected module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradindex.errors import ModelError
from gradindex.featurize.scratch import scratch
from gradindex.inputs.models import model_output

logger = logging.getLogger(__name__)

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Embedding,
)
_PATCH_BYTES = 128 * 2**20  # cap on the Conv2d input patches copied at once
# modules known to act on each item separately; they may hold (unselected) parameters
_PER_ITEM_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


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


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
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
    ):
        """``loss_fn(output [I, ...], target [I, ...]) -> per-item losses [I]``; the columns of
        ``item_gradients`` follow ``param_names``, each parameter flattened as ``p.reshape(-1)``."""
        if not self.supports(model, param_names):
            raise ModelError(
                "HookGradients supports Linear, Conv2d (zero padding), GroupNorm, LayerNorm and "
                "Embedding parameters of batch-independent models (no BatchNorm); use the vmap path"
            )
        self.model = model
        self.param_names = list(param_names)
        self.loss_fn = loss_fn
        named = dict(model.named_parameters())
        owners = _owners(model)
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
        owners = _owners(model)
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
        self._run(x_t, t, target, cond, lambda: _Call(out, self._clone))
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
        batch; into a block it runs batched (measured 1.35× faster per call on the demo UNet).
        ``flat``: a float32 buffer of at least I·p elements to write into (kept by the caller)."""
        n = x_t.shape[0]
        if flat is None:
            flat = torch.empty(n * self.num_params, device=x_t.device, dtype=torch.float32)
        elif flat.dtype != torch.float32 or flat.numel() < n * self.num_params:
            raise ValueError(f"flat must be a float32 buffer of at least {n * self.num_params}")
        flat = flat.reshape(-1)[: n * self.num_params]
        self._run(x_t, t, target, cond, lambda: _Call(flat.view(n, -1), self._clone, True))
        return [flat[n * a : n * b].view(n, b - a) for a, b in self._blocks]

    def _run(
        self,
        x_t: Tensor,
        t: Tensor,
        target: Tensor,
        cond: dict[str, Tensor] | None,
        new_call: Callable[[], _Call],
    ) -> None:
        try:
            self._write_all(x_t, t, target, cond, new_call())
        except RuntimeError as exc:
            if self._clone or "custom Function" not in str(exc):
                raise
            # the model modifies a selected module's output in place, which autograd forbids on
            # the view _Tap returns: tap copies instead (same numbers, one copy per output)
            logger.info(
                "a selected module's output is modified in place; tapping copies of outputs"
            )
            self._clone = True
            self._write_all(x_t, t, target, cond, new_call())

    def _write_all(
        self, x_t: Tensor, t: Tensor, target: Tensor, cond: dict[str, Tensor] | None, call: _Call
    ) -> None:
        with self._hooks(call):
            run_taps(self.model, self.loss_fn, x_t, t, target, cond, call.anchor)
        for slot in self._all_slots - call.written:  # parameters the forward never used
            call.target(slot, (slot[1] - slot[0],))[0].zero_()

    @contextmanager
    def _hooks(self, call: _Call) -> Iterator[None]:
        handles = [
            module.register_forward_hook(_forward_hook(slots, call), with_kwargs=True)
            for module, slots in self._slots.items()
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def run_taps(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x_t: Tensor,
    t: Tensor,
    target: Tensor,
    cond: dict[str, Tensor] | None,
    anchor: Tensor,
) -> None:
    """One forward and the backward of Σ_i loss_i down to ``anchor``, which runs every ``_Tap``
    the registered hooks put on module outputs (and computes no parameter gradient)."""
    n = x_t.shape[0]
    with torch.enable_grad():
        losses = loss_fn(model_output(model, x_t, t, cond), target)  # [I]
        if losses.shape != (n,):
            raise ValueError(
                f"loss_fn must return per-item losses of shape [{n}], got {tuple(losses.shape)}"
            )
        if losses.requires_grad:
            torch.autograd.grad(losses.sum(), anchor, allow_unused=True)


class _Call:
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


class _Tap(torch.autograd.Function):
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


def _forward_hook(slots: dict[str, tuple[int, int]], call: _Call) -> Callable:
    n = call.items

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        a = (args[0] if args else kwargs["input"]).detach()
        if a.shape[0] != n or output.shape[0] != n:
            raise HookError(
                f"a {type(module).__name__} saw a leading dimension of {a.shape[0]}, not the {n} "
                "items (the model moves the batch dimension)"
            )
        saved = {"a": a, "version": a._version}

        def on_grad(delta: Tensor) -> None:
            a = saved.pop("a")  # freed once this layer's gradient is formed
            if a._version != saved["version"]:
                raise in_place_error(module)
            with torch.no_grad():
                a = a.float() if a.is_floating_point() else a  # Embedding: indices stay long
                _write_layer_grads(module, a, delta.float(), slots, call)

        return _Tap.apply(output, call.anchor, on_grad, call.clone)

    return hook


def _write_layer_grads(
    module: nn.Module, a: Tensor, delta: Tensor, slots: dict[str, tuple[int, int]], call: _Call
) -> None:
    """Per-item gradients of the selected parameters of one module call, into ``call.out``."""
    n = a.shape[0]
    if isinstance(module, nn.Linear):
        d = delta.reshape(n, -1, module.out_features)  # [I, L, out]
        if "weight" in slots:
            view, first = call.target(slots["weight"], (module.out_features, module.in_features))
            _bmm_into(view, d.transpose(1, 2), a.reshape(n, -1, module.in_features), first)
        if "bias" in slots:
            call.write(slots["bias"], d.sum(1))  # [I, out]
    elif isinstance(module, nn.Conv2d):
        if "weight" in slots:
            _conv2d_weight_grads(module, a, delta, slots["weight"], call)
        if "bias" in slots:
            call.write(slots["bias"], delta.sum((2, 3)))  # [I, out]
    elif isinstance(module, nn.GroupNorm):
        d = delta.reshape(n, module.num_channels, -1)  # [I, C, L]
        if "weight" in slots:
            x_hat = F.group_norm(a, module.num_groups, None, None, module.eps)
            call.write(slots["weight"], (d * x_hat.reshape(d.shape)).sum(2))  # [I, C]
        if "bias" in slots:
            call.write(slots["bias"], d.sum(2))
    elif isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape
        d = delta.reshape(n, -1, *shape)  # [I, L, *shape]
        if "weight" in slots:
            x_hat = F.layer_norm(a, shape, None, None, module.eps)
            call.write(slots["weight"], (d * x_hat.reshape(d.shape)).sum(1))
        if "bias" in slots:
            call.write(slots["bias"], d.sum(1))
    elif isinstance(module, nn.Embedding):  # g_W[i] = Σ_pos onehot(a[i, pos]) δ[i, pos]
        idx = a.reshape(n, -1)  # [I, L] long
        d = delta.reshape(n, idx.shape[1], module.embedding_dim)  # [I, L, E]
        if module.padding_idx is not None:  # torch gives the padding row no gradient
            d = d * (idx != module.padding_idx).unsqueeze(-1)
        view, first = call.target(slots["weight"], (module.num_embeddings, module.embedding_dim))
        if first:
            view.zero_()
        items = torch.arange(n, device=idx.device).unsqueeze(1).expand_as(idx)  # [I, L]
        view.index_put_(
            (items.reshape(-1), idx.reshape(-1)), d.reshape(-1, d.shape[-1]), accumulate=True
        )
    else:  # guarded by supports()
        raise TypeError(f"no per-item gradient rule for {type(module).__name__}")


def _bmm_into(view: Tensor, x: Tensor, y: Tensor, first: bool) -> None:
    """view (+)= x @ y per item, [i, m, k] @ [i, k, n], written in place into a strided view."""
    if first:
        torch.bmm(x, y, out=view)
    else:
        view.baddbmm_(x, y)


def _conv2d_weight_grads(
    module: nn.Conv2d, a: Tensor, delta: Tensor, slot: tuple[int, int], call: _Call
) -> None:
    """Per-item weight gradients of one Conv2d call into its slot of ``call.out``."""
    c_out, c_in = module.out_channels, module.in_channels // module.groups
    kh, kw = module.kernel_size
    view, first = call.target(slot, (c_out, c_in * kh * kw))
    conv2d_item_weight_grads(module, a, delta, view, first)


def conv2d_item_weight_grads(
    module: nn.Conv2d, a: Tensor, delta: Tensor, view: Tensor, first: bool
) -> None:
    """view [I, out, in/groups·kh·kw] (+)= g_W[i] = δ[i] · patches(a[i])ᵀ, two ways (CPU timings
    differ by up to 5× either way): patches as a strided view of the padded input (copied a few
    items at a time, a no-op for 1×1 kernels), or one convolution weight gradient whose groups
    are the items (a as [1, I·in, H, W], δ as [1, I·out, H', W']; fast for large maps, few
    channels)."""
    n, c_in = a.shape[:2]
    c_out, groups = module.out_channels, module.groups
    kh, kw = module.kernel_size
    positions = delta.shape[2] * delta.shape[3]
    if isinstance(module.padding, str):  # 'same' / 'valid': possibly asymmetric
        pad = tuple(module._reversed_padding_repeated_twice)
    else:
        pad = (module.padding[1], module.padding[1], module.padding[0], module.padding[0])
    if any(pad):
        a = F.pad(a, pad)
    if groups > 1 or (kh * kw > 1 and positions >= 256 and c_in * c_out <= 8192):
        g = torch.nn.grad.conv2d_weight(
            a.reshape(1, n * c_in, *a.shape[2:]),
            (n * c_out, c_in // groups, kh, kw),
            delta.reshape(1, n * c_out, *delta.shape[2:]),
            module.stride,
            0,
            module.dilation,
            n * groups,
        ).view(n, c_out, -1)  # [I, out, in/groups·kh·kw]
        if first:
            view.copy_(g)
        else:
            view += g
        return
    d = delta.reshape(n, c_out, positions)  # [I, out, L]
    s0, s1, s2, s3 = a.stride()
    (dh, dw), (sh, sw) = module.dilation, module.stride
    step = max(1, _PATCH_BYTES // (c_in * kh * kw * positions * a.element_size()))
    for s in range(0, n, step):
        chunk = a[s : s + step]
        windows = chunk.as_strided(
            (chunk.shape[0], c_in, kh, kw, delta.shape[2], delta.shape[3]),
            (s0, s1, s2 * dh, s3 * dw, s2 * sh, s3 * sw),
        )
        if kh * kw == 1 or a.dtype != torch.float32:  # 1×1, stride 1: reshape is a view
            patches = windows.reshape(chunk.shape[0], c_in * kh * kw, positions)
        else:  # copied into a kept buffer: a fresh one of > 32 MiB page-faults on every call
            patches = scratch.get("patches", windows.shape, a.device)
            patches = patches.copy_(windows).view(chunk.shape[0], c_in * kh * kw, positions)
        _bmm_into(view[s : s + step], d[s : s + step], patches.transpose(1, 2), first)
